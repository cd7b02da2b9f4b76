//! `- lookup: {table: customers, on: {customer_id: customer_id}, type: left, as: customer}`:
//! a stream-table join against a table source; its config, checks and output schema.

use serde_yaml_ng::{Mapping, Value as Yaml};

use crate::config::{ConfigErrors, FieldType, Fields, Key, Schema, Section, Shape, Source};

/// The body of a `lookup` step.
pub const SECTION: Section = Section {
    about: "join each record with the row of a table source under its key",
    keys: &[
        Key::required("table", Shape::String, "the table source's name"),
        Key::required("on", Shape::MapOf(&Shape::String), "record field → the table's key field, for each key field"),
        Key::optional("type", Shape::OneOf(&["inner", "left"]), "inner drops a record the table has no row for; left keeps it with a null row (default inner)"),
        Key::optional("as", Shape::String, "the field the row appears as (default: the table's name)"),
    ],
};

#[derive(Debug, Clone, PartialEq)]
pub struct Lookup {
    /// The table source's name.
    pub table: String,
    /// (stream field, table key field), in the order of the table's key.
    pub on: Vec<(String, String)>,
    pub kind: LookupKind,
    /// The field the table's row appears as.
    pub name: String,
    /// The fields of the table's rows.
    pub row: Schema,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LookupKind {
    /// A record whose key the table lacks is dropped.
    Inner,
    /// A record whose key the table lacks goes on with the row null.
    Left,
}

impl Lookup {
    /// Reads a lookup step's body against the records it sees (`input`) and the pipeline's
    /// table sources.
    /// `tables`: None when the sources had problems (then the table is not checked).
    pub fn parse(body: &Yaml, input: Option<&Schema>, tables: Option<&[Source]>, location: &str, problems: &mut ConfigErrors) -> Option<Lookup> {
        let location = format!("{location}.lookup");
        let before = problems.problems.len();
        let mut fields = Fields::of(body, &location, &SECTION, problems)?;
        let table_name: Option<String> = fields.required("table", problems);
        let on: Option<Mapping> = fields.required("on", problems);
        let kind: Option<String> = fields.optional("type", problems);
        let name: Option<String> = fields.optional("as", problems);
        fields.finish(problems);
        let names: Vec<&str> = tables.unwrap_or_default().iter().map(|table| table.name.as_str()).collect();
        let table = table_name.as_ref().and_then(|wanted| {
            let found = tables.unwrap_or_default().iter().find(|table| &table.name == wanted);
            if found.is_none() && tables.is_some() {
                let known = match names.is_empty() {
                    true => "there is none: give a source `table: {key: [...]}`".to_string(),
                    false => format!("the tables: {}", names.join(", ")),
                };
                problems.push(format!("{location}.table"), format!("'{wanted}' is not a table source ({known})"));
            }
            found
        });
        let kind = match kind.as_deref() {
            None | Some("inner") => LookupKind::Inner,
            Some("left") => LookupKind::Left,
            Some(other) => {
                problems.push(format!("{location}.type"), format!("'{other}' is not inner or left"));
                LookupKind::Inner
            }
        };
        let name = name.or_else(|| table_name.clone()).unwrap_or_default();
        if name.is_empty() || name.contains('.') {
            problems.push(format!("{location}.as"), "must be a field name (no dots)");
        } else if input.is_some_and(|schema| schema.field_type(&name).is_some()) {
            problems.push(format!("{location}.as"), format!("the records have a field '{name}' already: name the row otherwise"));
        }
        let on = match (on, table) {
            (Some(on), Some(table)) => check_on(&on, input, table, &format!("{location}.on"), problems),
            _ => Vec::new(),
        };
        if problems.problems.len() > before {
            return None;
        }
        let row = table?.record_schema();
        Some(Lookup { table: table_name?, on, kind, name, row })
    }

    /// The records it hands on: those it receives, with the row as field `as` (nullable for
    /// a left lookup).
    pub fn output_schema(&self, input: &Schema) -> Schema {
        let row = FieldType::Object(self.row.clone());
        let row = match self.kind {
            LookupKind::Inner => row,
            LookupKind::Left => FieldType::Nullable(Box::new(row)),
        };
        let mut fields = input.fields.clone();
        fields.push((self.name.clone(), row));
        Schema { fields }
    }
}

/// `on`: each stream field names one key field of the table, every key field is named once,
/// and the two have one type.
fn check_on(on: &Mapping, input: Option<&Schema>, table: &Source, location: &str, problems: &mut ConfigErrors) -> Vec<(String, String)> {
    let key = table.table.clone().unwrap_or_default();
    let row = table.record_schema();
    let mut pairs = Vec::new();
    for (stream, table_field) in on {
        let (Some(stream), Some(table_field)) = (stream.as_str(), table_field.as_str()) else {
            problems.push(location, "each entry is `stream_field: table_key_field`");
            continue;
        };
        if !key.iter().any(|field| field == table_field) {
            problems.push(
                format!("{location}.{stream}"),
                format!("'{table_field}' is not a key field of table '{}' (its key: {})", table.name, key.join(", ")),
            );
            continue;
        }
        match input.map(|schema| schema.field_type(stream)) {
            Some(None) => problems.push(format!("{location}.{stream}"), format!("'{stream}' is not a field of the record")),
            Some(Some(stream_type)) if Some(stream_type) != row.field_type(table_field) => problems.push(
                format!("{location}.{stream}"),
                format!(
                    "'{stream}' is a {} and the table's '{table_field}' a {}: convert one with a set step first",
                    stream_type.describe(),
                    row.type_or_string(table_field).describe()
                ),
            ),
            _ => {}
        }
        pairs.push((stream.to_string(), table_field.to_string()));
    }
    let mut ordered = Vec::with_capacity(key.len());
    for field in &key {
        let named: Vec<&(String, String)> = pairs.iter().filter(|(_, table_field)| table_field == field).collect();
        match named.as_slice() {
            [pair] => ordered.push((*pair).clone()),
            [] => problems.push(location, format!("names no stream field for the table's key field '{field}'")),
            _ => problems.push(location, format!("names the table's key field '{field}' more than once")),
        }
    }
    ordered
}

#[cfg(test)]
mod tests {
    use crate::plan::parse_pipeline;

    fn problems_of(table_extra: &str, step: &str) -> Vec<String> {
        let text = format!(
            "name: p\nsources:\n  orders:\n    topics: [orders]\n    format: json\n    schema: {{ order_id: string, customer: string, n: long }}\n  \
             customers:\n    topics: [customers]\n    format: json\n    schema: {{ id: string, region: long, tier: string }}\n    \
             table: {{ key: [id, region] }}\n{table_extra}steps:\n  - lookup: {step}\nsink: {{ topic: out }}\n"
        );
        match parse_pipeline(&text) {
            Ok(_) => Vec::new(),
            Err(problems) => problems.problems.iter().map(|problem| format!("{}: {}", problem.location, problem.message)).collect(),
        }
    }

    /// A lookup names a table source, maps stream fields onto every key field of it once, with
    /// matching types, and names the row where no field is; a table source is read whole,
    /// without what a stream is read by.
    #[test]
    fn a_lookup_and_its_table_are_checked() {
        assert_eq!(problems_of("", "{ table: customers, on: { customer: id, n: region }, type: left }"), Vec::<String>::new());
        let locations = |problems: Vec<String>| -> Vec<String> {
            problems.iter().map(|problem| problem.split(": ").next().unwrap_or_default().to_string()).collect()
        };
        let unknown = problems_of("", "{ table: accounts, on: { customer: id } }");
        assert!(unknown.len() == 1 && unknown[0].contains("the tables: customers"), "{unknown:#?}");
        let wrong = problems_of("", "{ table: customers, on: { customer: tier, order_id: region }, type: outer, as: n }");
        assert_eq!(
            locations(wrong.clone()),
            ["steps[0].lookup.type", "steps[0].lookup.as", "steps[0].lookup.on.customer", "steps[0].lookup.on.order_id", "steps[0].lookup.on"],
            "{wrong:#?}"
        );
        assert!(wrong[3].contains("'order_id' is a string and the table's 'region' a long"), "{wrong:#?}");
        assert!(wrong[4].contains("key field 'id'"), "{wrong:#?}");
        let streamish = problems_of(
            "    starting_offsets: latest\n    event_time: { field: region }\n",
            "{ table: customers, on: { customer: id, n: region } }",
        );
        assert_eq!(locations(streamish), ["sources.customers.event_time", "sources.customers.starting_offsets"]);
    }
}
