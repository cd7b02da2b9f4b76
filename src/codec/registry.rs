//! The schema registry, over the Confluent REST API (schema_registry_converter's client).
//!
//! Calls block the loop's thread on the service's tokio runtime; the loop makes them only
//! for a schema id it has not met yet, and once at start to register the sink's schema.

use std::sync::Arc;

use apache_avro::Schema as AvroSchema;
use schema_registry_converter::async_impl::schema_registry::{get_schema_by_id, post_schema, SrSettings};
use schema_registry_converter::error::SRCError;
use schema_registry_converter::schema_registry_common::{SchemaType, SuppliedSchema};
use tokio::runtime::Handle;

use super::avro::{NoWriterSchema, WriterSchema};
use super::SchemaError;
use crate::config::RegistrySettings;

/// Why a registry call failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RegistryError {
    /// Not reached, timed out, or answered 5xx: try again later; no record is at fault.
    #[error("the schema registry is unreachable: {0}")]
    Unreachable(String),
    /// Credentials refused (401/403): retrying will not help.
    #[error("the schema registry refused weir's credentials: {0}")]
    Unauthorized(String),
    /// A definite answer against the request (404, 409, 422, a schema that does not parse).
    #[error("{0}")]
    Rejected(String),
}

impl RegistryError {
    pub fn is_retriable(&self) -> bool {
        matches!(self, RegistryError::Unreachable(_))
    }
}

pub struct Registry {
    settings: SrSettings,
    handle: Handle,
}

impl Registry {
    /// Needs to be called within the service's tokio runtime (its handle is kept).
    pub fn new(settings: &RegistrySettings) -> Result<Registry, SchemaError> {
        let (first, rest) = settings.urls.split_first().ok_or_else(|| SchemaError("no schema_registry.url is set".into()))?;
        let mut builder = SrSettings::new_builder(first.clone());
        for url in rest {
            builder.add_url(url.clone());
        }
        if let Some(username) = &settings.username {
            builder.set_basic_authorization(username, settings.password.as_deref());
        }
        builder.set_timeout(settings.timeout);
        let settings = builder.build().map_err(|error| SchemaError(format!("setting up the schema registry client: {}", describe(&error))))?;
        let handle = Handle::try_current().map_err(|_| SchemaError("the schema registry client needs a tokio runtime".to_string()))?;
        Ok(Registry { settings, handle })
    }

    /// The writer schema registered under `id`. `Ok(Err(..))`: the registry answered, and the
    /// id is no usable Avro schema (unknown, or not Avro): the records naming it are bad.
    pub fn writer_schema(&self, id: u32) -> Result<WriterSchema, RegistryError> {
        let registered = match self.handle.block_on(get_schema_by_id(id, &self.settings)) {
            Ok(registered) => registered,
            // Only the registry's own "schema not found" makes the id a bad one; any other
            // refusal (a wrong URL behind a proxy, say) is a setup problem, not a bad record.
            Err(error) if schema_not_found(&error) => {
                return Ok(Err(NoWriterSchema(format!("the schema registry does not know it ({})", describe(&error)))));
            }
            Err(error) => return Err(classify(&error)),
        };
        if registered.schema_type != SchemaType::Avro {
            return Ok(Err(NoWriterSchema(format!("the schema registry says it is a {:?} schema, not Avro", registered.schema_type))));
        }
        if !registered.references.is_empty() {
            return Ok(Err("it references other schemas, which weir does not resolve yet".into()));
        }
        Ok(AvroSchema::parse_str(&registered.schema)
            .map(Arc::new)
            .map_err(|error| NoWriterSchema(format!("the registered schema is not valid Avro: {error}"))))
    }

    /// Registers `schema` (Avro JSON) under `subject`, or finds it there; returns its id.
    /// The registry refuses a schema its compatibility rules reject: `Rejected`.
    pub fn register(&self, subject: &str, schema: &str) -> Result<u32, RegistryError> {
        self.handle
            .block_on(post_schema(&self.settings, subject.to_string(), avro_schema(schema)))
            .map(|registered| registered.id)
            .map_err(|error| classify(&error))
    }
}

/// An Avro schema (JSON text) as the registry client sends it.
pub fn avro_schema(schema: &str) -> SuppliedSchema {
    SuppliedSchema {
        name: None,
        schema_type: SchemaType::Avro,
        schema: schema.to_string(),
        references: Vec::new(),
        properties: None,
        tags: None,
    }
}

/// The HTTP status in one of the client's messages ("... failed with status 404 Not Found").
fn status(error: &SRCError) -> Option<u16> {
    let (_, after) = error.error.split_once("status ")?;
    after.split_whitespace().next()?.parse().ok()
}

/// Confluent's 404 with error code 40403: no schema has this id.
fn schema_not_found(error: &SRCError) -> bool {
    status(error) == Some(404) && error.cause.as_deref().is_some_and(|cause| cause.contains("error_code: 40403"))
}

fn describe(error: &SRCError) -> String {
    match &error.cause {
        Some(cause) => format!("{}: {cause}", error.error),
        None => error.error.clone(),
    }
}

fn classify(error: &SRCError) -> RegistryError {
    let text = describe(error);
    match status(error) {
        _ if error.retriable => RegistryError::Unreachable(text),
        Some(401 | 403) => RegistryError::Unauthorized(text),
        Some(status) if status >= 500 || status == 408 || status == 429 => RegistryError::Unreachable(text),
        Some(_) => RegistryError::Rejected(text),
        // No answer to go by (e.g. a body that is not the registry's JSON): as if unreachable.
        None => RegistryError::Unreachable(text),
    }
}
