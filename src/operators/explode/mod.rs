//! `explode`: one record per element of a list field, the element under its own name and
//! the other fields copied. An empty or null list makes no record (counted as filtered);
//! a value that is not a list is the record's process error.

pub mod config;

use serde_json::{Map, Value};

use super::{Emitted, ProcessError, Record, StepOutcome};
use config::Explode;

pub struct ExplodeOperator {
    path: Vec<String>,
    name: String,
    description: String,
}

impl ExplodeOperator {
    pub fn new(explode: &Explode) -> ExplodeOperator {
        ExplodeOperator {
            path: explode.field.split('.').map(str::to_string).collect(),
            name: explode.name.clone(),
            description: format!("explode {} as {}", explode.field, explode.name),
        }
    }

    pub fn describe(&self) -> String {
        self.description.clone()
    }

    pub fn process<'a>(&mut self, mut record: Record<'a>, out: &mut Vec<Emitted<'a>>) -> Result<StepOutcome, ProcessError> {
        // Where the element goes: the list's place at the top level, else last.
        let mut position = match self.path.as_slice() {
            [top] => record.fields.keys().position(|name| name == top),
            _ => None,
        };
        let items = take(&mut record.fields, &self.path);
        // A field of the element's name gives way to it.
        if let Some(index) = record.fields.keys().position(|name| *name == self.name) {
            record.fields.shift_remove(&self.name);
            position = position.map(|position| if index < position { position - 1 } else { position });
        }
        let items = match items {
            None | Some(Value::Null) => return Ok(StepOutcome::Dropped),
            Some(Value::Array(items)) => items,
            Some(other) => {
                return Err(ProcessError(format!("explode: '{}' holds {other}, not a list", self.path.join("."))));
            }
        };
        if items.is_empty() {
            return Ok(StepOutcome::Dropped);
        }
        let position = position.map(|position| position.min(record.fields.len()));
        let last = items.len() - 1;
        let mut items = items.into_iter().enumerate();
        for (index, item) in items.by_ref() {
            // The last element takes the record itself; the others a copy.
            let mut copy = if index == last { std::mem::replace(&mut record.fields, Map::new()) } else { record.fields.clone() };
            match position {
                Some(position) => {
                    copy.shift_insert(position, self.name.clone(), item);
                }
                None => {
                    copy.insert(self.name.clone(), item);
                }
            }
            out.push(Emitted::Record(Record { fields: copy, ..record.clone() }));
        }
        Ok(StepOutcome::Passed)
    }
}

/// Removes and returns the value at `path`.
fn take(fields: &mut Map<String, Value>, path: &[String]) -> Option<Value> {
    let (last, parents) = path.split_last()?;
    let mut target = fields;
    for part in parents {
        match target.get_mut(part) {
            Some(Value::Object(inner)) => target = inner,
            _ => return None,
        }
    }
    target.shift_remove(last)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{ConfigErrors, FieldType, Schema};

    fn schema() -> Schema {
        let line = Schema { fields: vec![("sku".into(), FieldType::String), ("qty".into(), FieldType::Long)] };
        Schema {
            fields: vec![
                ("order".into(), FieldType::String),
                ("lines".into(), FieldType::Array(Box::new(FieldType::Object(line)))),
                ("meta".into(), FieldType::Object(Schema { fields: vec![("tags".into(), FieldType::Array(Box::new(FieldType::String)))] })),
            ],
        }
    }

    fn explode(body: &str) -> Result<(ExplodeOperator, Schema), Vec<String>> {
        let mut problems = ConfigErrors::default();
        let body: serde_yaml_ng::Value = serde_yaml_ng::from_str(body).unwrap();
        match Explode::parse(&body, Some(&schema()), "steps[0]", &mut problems) {
            Some(explode) => Ok((ExplodeOperator::new(&explode), explode.output_schema(&schema()).unwrap())),
            None => Err(problems.problems.iter().map(ToString::to_string).collect()),
        }
    }

    fn run(operator: &mut ExplodeOperator, value: serde_json::Value) -> (StepOutcome, Vec<String>) {
        let record = Record { fields: value.as_object().unwrap().clone(), event_time: 0, provenance: None, key: None, upsert: false, id: None };
        let mut out = Vec::new();
        let outcome = operator.process(record, &mut out).unwrap();
        let texts = out
            .into_iter()
            .map(|emitted| match emitted {
                Emitted::Record(record) => Value::Object(record.fields).to_string(),
                _ => panic!("not a record"),
            })
            .collect();
        (outcome, texts)
    }

    #[test]
    fn each_element_becomes_a_record_in_the_lists_place() {
        let (mut operator, schema) = explode("{field: lines, as: line}").unwrap();
        assert_eq!(schema.describe(), "{order: string, line: {sku: string, qty: long}, meta: {tags: [string]}}");
        let (outcome, records) = run(&mut operator, serde_json::json!({"order": "o1", "lines": [{"sku": "a", "qty": 1}, {"sku": "b", "qty": 2}], "meta": null}));
        assert_eq!(outcome, StepOutcome::Passed);
        assert_eq!(
            records,
            [
                r#"{"order":"o1","line":{"sku":"a","qty":1},"meta":null}"#,
                r#"{"order":"o1","line":{"sku":"b","qty":2},"meta":null}"#,
            ]
        );
        for empty in [serde_json::json!([]), serde_json::Value::Null] {
            let (outcome, records) = run(&mut operator, serde_json::json!({"order": "o2", "lines": empty, "meta": null}));
            assert_eq!((outcome, records.len()), (StepOutcome::Dropped, 0));
        }
    }

    #[test]
    fn a_nested_list_s_elements_come_last_under_their_name() {
        let (mut operator, schema) = explode("{field: meta.tags}").unwrap();
        assert_eq!(schema.describe(), "{order: string, lines: [{sku: string, qty: long}], meta: {}, tags: string}");
        let (_, records) = run(&mut operator, serde_json::json!({"order": "o1", "lines": [], "meta": {"tags": ["x", null]}}));
        assert_eq!(records, [r#"{"order":"o1","lines":[],"meta":{},"tags":"x"}"#, r#"{"order":"o1","lines":[],"meta":{},"tags":null}"#]);
    }

    #[test]
    fn a_field_of_the_elements_name_gives_way_as_the_schema_says() {
        for (body, value) in [
            ("{field: lines, as: order}", serde_json::json!({"order": "o1", "lines": [{"sku": "a", "qty": 1}], "meta": null})),
            ("{field: meta.tags, as: meta}", serde_json::json!({"order": "o1", "lines": [], "meta": {"tags": ["x"]}})),
        ] {
            let (mut operator, schema) = explode(body).unwrap();
            let (_, records) = run(&mut operator, value);
            let record: serde_json::Value = serde_json::from_str(&records[0]).unwrap();
            let names: Vec<&String> = record.as_object().unwrap().keys().collect();
            let expected: Vec<&String> = schema.fields.iter().map(|(name, _)| name).collect();
            assert_eq!(names, expected, "{body}");
        }
    }

    #[test]
    fn only_a_list_explodes() {
        assert_eq!(explode("{field: order}").err().unwrap(), ["steps[0].explode.field: 'order' is a string, not a list ([T])"]);
        assert_eq!(explode("{field: nothing}").err().unwrap(), ["steps[0].explode.field: 'nothing' is not a field of the record"]);
        assert_eq!(explode("{field: lines, as: a.b}").err().unwrap(), ["steps[0].explode.as: must be a field name (no dots): the name each element gets"]);
    }
}
