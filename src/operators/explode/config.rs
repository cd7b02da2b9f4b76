//! `- explode: {field: items, as: item}`: its config and checks.

use serde_yaml_ng::Value as Yaml;

use crate::config::{ConfigErrors, FieldType, Fields, Key, Schema, Section, Shape, ShapeError};

/// The body of an `explode` step.
pub const SECTION: Section = Section {
    about: "one record per element of a list field",
    keys: &[
        Key::required("field", Shape::String, "the list field (a dotted path)"),
        Key::optional("as", Shape::String, "the name each element gets (default: the field's last part)"),
    ],
};

#[derive(Debug, Clone, PartialEq)]
pub struct Explode {
    /// The list field (a dotted path).
    pub field: String,
    /// The name each element gets (default: `field`'s last part).
    pub name: String,
}

impl Explode {
    /// Reads an explode step's body: `field` must be a list of the records it sees.
    pub fn parse(body: &Yaml, input: Option<&Schema>, location: &str, problems: &mut ConfigErrors) -> Option<Explode> {
        let location = format!("{location}.explode");
        let before = problems.problems.len();
        let mut fields = Fields::of(body, &location, &SECTION, problems)?;
        let field: Option<String> = fields.required("field", problems);
        let name: Option<String> = fields.optional("as", problems);
        fields.finish(problems);
        let field = field?;
        let name = name.unwrap_or_else(|| field.rsplit('.').next().unwrap_or(&field).to_string());
        if name.is_empty() || name.contains('.') {
            problems.push(format!("{location}.as"), "must be a field name (no dots): the name each element gets");
        }
        let explode = Explode { field, name };
        if let Some(input) = input
            && problems.problems.len() == before
            && let Err(problem) = explode.output_schema(input)
        {
            problems.push(format!("{location}.field"), problem.to_string());
        }
        (problems.problems.len() == before && input.is_some()).then_some(explode)
    }

    /// The records it hands on: the list field gone, its element under `name` (in the
    /// list's place for a top-level list, else last).
    pub fn output_schema(&self, input: &Schema) -> Result<Schema, ShapeError> {
        let element = match input.field_type(&self.field) {
            Some(FieldType::Array(element)) => (**element).clone(),
            Some(other) => return Err(ShapeError::NotAList { field: self.field.clone(), found: other.describe() }),
            None => return Err(ShapeError::NoSuchField(self.field.clone())),
        };
        let mut schema = input.clone();
        match schema.fields.iter().position(|(name, _)| *name == self.field) {
            Some(position) => {
                schema.fields.retain(|(name, _)| *name == self.field || *name != self.name);
                let position = schema.fields.iter().position(|(name, _)| *name == self.field).unwrap_or(position);
                schema.fields[position] = (self.name.clone(), element);
            }
            None => {
                schema = schema.without_field(&self.field)?;
                schema.fields.retain(|(name, _)| *name != self.name);
                schema.fields.push((self.name.clone(), element));
            }
        }
        Ok(schema)
    }
}
