//! `set`, `select` and `drop`: stateless steps that reshape each record's fields. Every
//! expression of a `set` or `select` reads the record as it came in (not the fields the same
//! step writes). A record whose expression fails goes where `on_error.process` says.

pub mod config;

use std::sync::Arc;

use cel::Env;
use serde_json::{Map, Value};

use super::expression::{standard_environment, Bindings, Expression, Reads};
use super::{BuildError, Emitted, ProcessError, Record, StepOutcome};
use crate::config::Schema;
use config::{Assignments, Drop};

pub enum Reshape {
    Set(Vec<(Vec<String>, Expression)>),
    Select(Vec<(Vec<String>, Expression)>),
    Drop(Vec<Vec<String>>),
}

pub struct ReshapeOperator {
    reshape: Reshape,
    /// The header names its expressions read by name.
    /// What its expressions read of a record.
    reads: Reads,
    description: String,
    environment: Arc<Env>,
}

impl ReshapeOperator {
    /// A `set` (`select: false`) or a `select`, compiled against `input`.
    pub fn assign(assignments: &Assignments, select: bool, input: &Schema) -> Result<ReshapeOperator, BuildError> {
        let compiled = assignments
            .assignments
            .iter()
            .map(|assignment| Ok((split(&assignment.path), Expression::compile(&assignment.expression, input)?)))
            .collect::<Result<Vec<_>, BuildError>>()?;
        let written: Vec<String> =
            assignments.assignments.iter().map(|assignment| format!("{} = {}", assignment.path, assignment.expression)).collect();
        let reads = Reads::of(compiled.iter().map(|(_, expression)| expression));
        let (reshape, kind) = match select {
            true => (Reshape::Select(compiled), "select"),
            false => (Reshape::Set(compiled), "set"),
        };
        Ok(ReshapeOperator { reshape, reads, description: format!("{kind} {}", written.join(", ")), environment: standard_environment() })
    }

    pub fn drop(drop: &Drop) -> ReshapeOperator {
        ReshapeOperator {
            reshape: Reshape::Drop(drop.paths.iter().map(|path| split(path)).collect()),
            reads: Reads::default(),
            description: format!("drop {}", drop.paths.join(", ")),
            environment: standard_environment(),
        }
    }

    pub fn describe(&self) -> String {
        self.description.clone()
    }

    /// The step's kind, as in the pipeline file.
    pub fn kind(&self) -> &'static str {
        match self.reshape {
            Reshape::Set(_) => "set",
            Reshape::Select(_) => "select",
            Reshape::Drop(_) => "drop",
        }
    }

    pub fn process<'a>(&mut self, mut record: Record<'a>, out: &mut Vec<Emitted<'a>>) -> Result<StepOutcome, ProcessError> {
        match &self.reshape {
            Reshape::Set(assignments) => {
                let values = evaluate(assignments, &record, &self.environment, &self.reads)?;
                for ((path, _), value) in assignments.iter().zip(values) {
                    write_path(&mut record.fields, path, value);
                }
            }
            Reshape::Select(assignments) => {
                let values = evaluate(assignments, &record, &self.environment, &self.reads)?;
                let mut fields = Map::with_capacity(assignments.len());
                for ((path, _), value) in assignments.iter().zip(values) {
                    write_path(&mut fields, path, value);
                }
                record.fields = fields;
            }
            Reshape::Drop(paths) => {
                for path in paths {
                    remove_path(&mut record.fields, path);
                }
            }
        }
        out.push(Emitted::Record(record));
        Ok(StepOutcome::Passed)
    }
}

fn split(path: &str) -> Vec<String> {
    path.split('.').map(str::to_string).collect()
}

/// Every expression's value for `record`, read before any is written.
fn evaluate(
    assignments: &[(Vec<String>, Expression)],
    record: &Record<'_>,
    environment: &Arc<Env>,
    reads: &Reads,
) -> Result<Vec<Value>, ProcessError> {
    let bindings = Bindings::of(record, environment, reads);
    assignments.iter().map(|(_, expression)| expression.evaluate_field(&bindings)).collect()
}

/// Writes `value` at `path`, making the objects on the way (a null or missing one becomes an
/// object; the schema check made sure no other value is in the way).
fn write_path(fields: &mut Map<String, Value>, path: &[String], value: Value) {
    let Some((last, parents)) = path.split_last() else {
        return;
    };
    let mut target = fields;
    for part in parents {
        let slot = target.entry(part.clone()).or_insert_with(|| Value::Object(Map::new()));
        if !slot.is_object() {
            *slot = Value::Object(Map::new());
        }
        let Value::Object(inner) = slot else {
            return;
        };
        target = inner;
    }
    target.insert(last.clone(), value);
}

fn remove_path(fields: &mut Map<String, Value>, path: &[String]) {
    let Some((last, parents)) = path.split_last() else {
        return;
    };
    let mut target = fields;
    for part in parents {
        match target.get_mut(part) {
            Some(Value::Object(inner)) => target = inner,
            _ => return,
        }
    }
    target.shift_remove(last);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{ConfigErrors, FieldType};
    use crate::operators::{InputHeaders, Provenance};

    fn schema() -> Schema {
        let item = Schema { fields: vec![("sku".into(), FieldType::String), ("qty".into(), FieldType::Long), ("price".into(), FieldType::Double)] };
        Schema {
            fields: vec![
                ("order_id".into(), FieldType::String),
                ("amount".into(), FieldType::Double),
                ("item".into(), FieldType::Object(item)),
                ("debug".into(), FieldType::String),
            ],
        }
    }

    fn record<'a>(provenance: Option<Provenance<'a>>) -> Record<'a> {
        let fields = serde_json::json!({"order_id": "o1", "amount": 12.5, "item": {"sku": "s9", "qty": 3, "price": 2.5}, "debug": "x"});
        Record { fields: fields.as_object().unwrap().clone(), event_time: 0, provenance, key: None, upsert: false, id: None }
    }

    fn step(kind: &str, body: &str) -> Result<(ReshapeOperator, Schema), Vec<String>> {
        let mut problems = ConfigErrors::default();
        let body: serde_yaml_ng::Value = serde_yaml_ng::from_str(body).unwrap();
        let built = match kind {
            "drop" => Drop::parse(&body, Some(&schema()), "steps[0]", &mut problems)
                .map(|drop| (ReshapeOperator::drop(&drop), drop.output_schema(&schema()).unwrap())),
            _ => Assignments::parse(kind, &body, Some(&schema()), "steps[0]", &mut problems).map(|assignments| {
                let select = kind == "select";
                (ReshapeOperator::assign(&assignments, select, &schema()).unwrap(), assignments.output_schema(select, &schema()).unwrap())
            }),
        };
        built.ok_or_else(|| problems.problems.iter().map(ToString::to_string).collect())
    }

    fn run(operator: &mut ReshapeOperator, record: Record<'_>) -> Result<String, ProcessError> {
        let mut out = Vec::new();
        operator.process(record, &mut out)?;
        match out.pop() {
            Some(Emitted::Record(record)) => Ok(Value::Object(record.fields).to_string()),
            _ => panic!("no record"),
        }
    }

    #[test]
    fn set_adds_and_replaces_fields_from_the_record_as_it_came_in() {
        let (mut set, schema) = step("set", r#"{amount_cents: "int(amount * 100.0)", amount: "amount * 2.0", item.total: "double(item.qty) * item.price", origin.topic: "_topic"}"#).unwrap();
        assert_eq!(
            schema.describe(),
            "{order_id: string, amount: double, item: {sku: string, qty: long, price: double, total: double}, debug: string, amount_cents: long, origin: {topic: string}}"
        );
        let headers = [("region", Some(&b"eu"[..]))];
        let provenance = Provenance { topic: "orders", partition: 2, offset: 7, timestamp: Some(5), headers: InputHeaders::Read(&headers), key: Some(b"k1") };
        assert_eq!(
            run(&mut set, record(Some(provenance))).unwrap(),
            r#"{"order_id":"o1","amount":25.0,"item":{"sku":"s9","qty":3,"price":2.5,"total":7.5},"debug":"x","amount_cents":1250,"origin":{"topic":"orders"}}"#
        );
    }

    #[test]
    fn select_makes_exactly_the_named_fields_in_order() {
        let (mut select, schema) = step("select", r#"{sku: item.sku, order.id: order_id, region: "_headers.region", key: _key}"#).unwrap();
        assert_eq!(schema.describe(), "{sku: string, order: {id: string}, region: string, key: string}");
        let headers = [("region", Some(&b"eu"[..]))];
        let provenance = Provenance { topic: "orders", partition: 2, offset: 7, timestamp: None, headers: InputHeaders::Read(&headers), key: Some(b"k1") };
        assert_eq!(run(&mut select, record(Some(provenance))).unwrap(), r#"{"sku":"s9","order":{"id":"o1"},"region":"eu","key":"k1"}"#);
        // A derived record has no metadata: null.
        assert_eq!(run(&mut select, record(None)).unwrap(), r#"{"sku":"s9","order":{"id":"o1"},"region":null,"key":null}"#);
    }

    #[test]
    fn drop_removes_fields_and_nested_paths() {
        let (mut drop, schema) = step("drop", "[debug, item.price]").unwrap();
        assert_eq!(schema.describe(), "{order_id: string, amount: double, item: {sku: string, qty: long}}");
        assert_eq!(run(&mut drop, record(None)).unwrap(), r#"{"order_id":"o1","amount":12.5,"item":{"sku":"s9","qty":3}}"#);
    }

    #[test]
    fn problems_name_the_step_and_the_field() {
        assert_eq!(step("drop", "[nothing]").err().unwrap(), ["steps[0].drop: 'nothing' is not a field of the record"]);
        assert_eq!(
            step("set", r#"{amount.cents: "1"}"#).err().unwrap(),
            ["steps[0].set: 'amount.cents' cannot be written: 'amount' is a double, not an object with fields"]
        );
        let problems = step("select", r#"{total: "item.qty * item.price", tags: "[1, 2]", _topic: "1"}"#).err().unwrap();
        assert_eq!(problems.len(), 3, "{problems:?}");
        assert!(problems[0].starts_with("steps[0].select.total: 'item.qty * item.price': mixes int and double"), "{problems:?}");
        assert!(problems[1].starts_with("steps[0].select.tags: '[1, 2]' gives a type known only at run time"), "{problems:?}");
        assert!(problems[2].starts_with("steps[0].select._topic: is record metadata"), "{problems:?}");
        assert!(step("set", "[a]").err().unwrap()[0].contains("must be a mapping of field names to expressions"));
    }

    #[test]
    fn a_failing_expression_is_the_records_process_error() {
        let (mut set, _) = step("set", r#"{ratio: "item.qty / (item.qty - 3)"}"#).unwrap();
        let error = run(&mut set, record(None)).unwrap_err();
        assert!(error.0.starts_with("'item.qty / (item.qty - 3)' failed: "), "{error}");
    }
}
