//! CEL expressions over a record: compiled once against the schema of the records a step
//! sees, typed there (so that `set` and `select` know the schema they make, and a field that
//! is not there is a config error naming it), and evaluated per record.
//!
//! The record's fields are variables by name; its metadata is there too: `_topic`,
//! `_partition`, `_offset`, `_timestamp` (epoch ms), `_key` (UTF-8 text) and `_headers` (a
//! map of UTF-8 text). Records a step derived (window results) have no metadata: it reads as
//! null there. A failure at run time (a wrong type, an overflow, a missing map key) is a
//! [`ProcessError`] for that record, never a crash.

use std::collections::HashMap;
use std::sync::Arc;

use cel::common::ast::{operators, EntryExpr, Expr, IdedExpr, LiteralValue};
use cel::objects::{Key, Value as CelValue};
use cel::common::value::{CowVal, Val};
use cel::context::VariableResolver;
use cel::{Context, Env, Program};
use serde_json::{Map, Value};

use super::{BuildError, ProcessError, Record};
use crate::config::{FieldType, Schema};

pub const METADATA_VARIABLES: &[&str] = &["_topic", "_partition", "_offset", "_timestamp", "_key", "_headers"];

/// What an expression gives, as far as the schema tells before any record is seen.
#[derive(Debug, Clone, PartialEq)]
pub enum ValueType {
    Known(FieldType),
    /// Always null (the literal `null`).
    Null,
    /// `_headers`: a map of text.
    Headers,
    /// Not known before run time (a list, a map literal, a function weir does not type).
    Unknown,
}

impl ValueType {
    fn describe(&self) -> String {
        match self {
            ValueType::Known(field_type) => field_type.describe(),
            ValueType::Null => "null".into(),
            ValueType::Headers => "map of text".into(),
            ValueType::Unknown => "a type known only at run time".into(),
        }
    }
}

/// A compiled expression and the type it gives.
pub struct Expression {
    text: String,
    program: Program,
    value_type: ValueType,
    /// What it reads of a record: the variables it names, and the headers it reads by name
    /// (an absent one reads as null, not as a failure).
    reads: Reads,
}

/// What expressions read of a record: the top-level variables they name (fields, metadata)
/// and the header names they read by name (`_headers.region`, `_headers['x-id']`). A
/// record's bindings hold these alone: making a CEL value of every field for every record
/// cost more than evaluating the expressions.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Reads {
    variables: Vec<String>,
    headers: Vec<String>,
}

impl Reads {
    /// What any of `expressions` reads, each name once.
    pub fn of<'e>(expressions: impl IntoIterator<Item = &'e Expression>) -> Reads {
        let mut reads = Reads::default();
        for expression in expressions {
            reads.variables.extend(expression.reads.variables.iter().cloned());
            reads.headers.extend(expression.reads.headers.iter().cloned());
        }
        reads.deduplicated()
    }

    /// These reads with each name once.
    fn deduplicated(mut self) -> Reads {
        for names in [&mut self.variables, &mut self.headers] {
            names.sort_unstable();
            names.dedup();
        }
        self
    }

    /// The top-level names read: fields and metadata (`_topic`, ...).
    pub fn variables(&self) -> &[String] {
        &self.variables
    }

    /// The header names read by name.
    pub fn headers(&self) -> &[String] {
        &self.headers
    }
}

impl std::fmt::Debug for Expression {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.debug_struct("Expression").field("text", &self.text).field("value_type", &self.value_type).finish()
    }
}

impl Expression {
    /// Compiles `text` against the fields of `schema`; the error names what is wrong in words
    /// a user can act on (an unknown field, int and double mixed, branches of two types).
    pub fn compile(text: &str, schema: &Schema) -> Result<Expression, BuildError> {
        let program = parse(text)?;
        let references = program.references();
        let mut unknown: Vec<&str> = references
            .variables()
            .into_iter()
            .filter(|name| schema.field_type(name).is_none() && !METADATA_VARIABLES.contains(name))
            .collect();
        unknown.sort_unstable();
        if !unknown.is_empty() {
            let fields: Vec<&str> = schema.fields.iter().map(|(name, _)| name.as_str()).collect();
            return Err(BuildError(format!(
                "'{text}' names {} not in the record; fields: {}; metadata: {}",
                unknown.iter().map(|name| format!("'{name}'")).collect::<Vec<_>>().join(", "),
                fields.join(", "),
                METADATA_VARIABLES.join(", ")
            )));
        }
        if let Some(missing) = references.functions().into_iter().find(|name| !interpreter_has(name)) {
            return Err(BuildError(format!(
                "'{text}' calls '{missing}', which weir's CEL interpreter does not have (it would fail on every record); \
                 see \"Functions that work\" in docs/pipeline.md"
            )));
        }
        let value_type = type_of(program.expression(), schema).map_err(|problem| BuildError(format!("'{text}': {problem}")))?;
        let mut headers = Vec::new();
        header_names(program.expression(), &mut headers);
        let variables = references.variables().into_iter().map(str::to_string).collect();
        let reads = Reads { variables, headers }.deduplicated();
        Ok(Expression { text: text.to_string(), program, value_type, reads })
    }

    /// Checks only that `text` parses (the fields it may name are not known).
    pub fn check_syntax(text: &str) -> Result<(), BuildError> {
        parse(text).map(drop)
    }

    pub fn text(&self) -> &str {
        &self.text
    }

    pub fn value_type(&self) -> &ValueType {
        &self.value_type
    }

    /// What it reads of a record (see [`Bindings::of`]).
    pub fn reads(&self) -> &Reads {
        &self.reads
    }

    /// The field type this expression's values have, for a schema: a known type, or an
    /// error saying how to make it one.
    pub fn field_type(&self) -> Result<FieldType, BuildError> {
        match &self.value_type {
            ValueType::Known(field_type) => Ok(field_type.clone()),
            other => Err(BuildError(format!(
                "'{}' gives {}, which a record field cannot hold; convert it with string(), int(), double() or bool()",
                self.text,
                other.describe()
            ))),
        }
    }

    /// The parsed CEL tree (for [`super::native::Native::compile`]).
    pub fn tree(&self) -> &IdedExpr {
        self.program.expression()
    }

    /// Evaluates the expression for the record `bindings` were made from.
    pub fn evaluate(&self, bindings: &Bindings<'_>) -> Result<CelValue, ProcessError> {
        if let Some(problem) = &bindings.unusable {
            return Err(ProcessError(format!("'{}' failed: {problem}", self.text)));
        }
        // The interpreter asks `bindings` for each variable it meets: the values are made
        // once per record and lent, not copied into a scope per expression.
        let mut context = Context::with_env(bindings.environment.clone());
        context.set_variable_resolver(bindings);
        // The CEL interpreter sees the record's values; a panic there is this record's
        // process error.
        crate::panics::contain(|| self.program.execute(&context))
            .map_err(|panic| ProcessError(format!("'{}' panicked: {panic}", self.text)))?
            .map_err(|error| ProcessError(format!("'{}' failed: {error}", self.text)))
    }

    /// Evaluates the expression to a field value of its type.
    pub fn evaluate_field(&self, bindings: &Bindings<'_>) -> Result<Value, ProcessError> {
        let value = self.evaluate(bindings)?;
        let field_type = match &self.value_type {
            ValueType::Known(field_type) => Some(field_type),
            _ => None,
        };
        from_cel(&value, field_type).map_err(|problem| ProcessError(format!("'{}' gave {problem}", self.text)))
    }
}

fn parse(text: &str) -> Result<Program, BuildError> {
    Program::compile(text).map_err(|error| BuildError(format!("'{text}' is not a valid CEL expression: {error}")))
}

/// A record's fields and metadata as CEL variables, made once per record for all the
/// expressions a step evaluates on it.
pub struct Bindings<'r> {
    environment: Arc<Env>,
    /// By name (the expressions read a few): each value as the interpreter holds it.
    variables: Vec<(&'r str, Box<dyn Val>)>,
    /// A value the interpreter could not take, as this record's error (none of JSON's values
    /// is one).
    unusable: Option<String>,
}

impl VariableResolver for Bindings<'_> {
    fn resolve<'b>(&'b self, variable: &str) -> Option<CowVal<'b, 'b>> {
        self.variables.iter().find(|(name, _)| *name == variable).map(|(_, value)| CowVal::Borrowed(&**value))
    }
}

impl<'r> Bindings<'r> {
    /// The variables `reads` names, of `record`: its fields, and the metadata (which wins
    /// over a field of the same name); a header read by name that the record lacks is null.
    pub fn of(record: &Record<'_>, environment: &Arc<Env>, reads: &'r Reads) -> Bindings<'r> {
        let provenance = record.provenance;
        let text = |bytes: &[u8]| CelValue::from(String::from_utf8_lossy(bytes).into_owned());
        let mut variables: Vec<(&str, Box<dyn Val>)> = Vec::with_capacity(reads.variables.len());
        let mut unusable = None;
        for name in &reads.variables {
            let value = match name.as_str() {
                "_topic" => provenance.map_or(CelValue::Null, |p| CelValue::from(p.topic)),
                "_partition" => provenance.map_or(CelValue::Null, |p| CelValue::Int(i64::from(p.partition))),
                "_offset" => provenance.map_or(CelValue::Null, |p| CelValue::Int(p.offset)),
                "_timestamp" => provenance.and_then(|p| p.timestamp).map_or(CelValue::Null, CelValue::Int),
                "_key" => provenance.and_then(|p| p.key).map_or(CelValue::Null, text),
                "_headers" => {
                    let mut map: HashMap<Key, CelValue> = reads.headers.iter().map(|name| (Key::from(name.clone()), CelValue::Null)).collect();
                    // As Kafka keeps them, in order: of a name given twice, the last one counts.
                    for (name, value) in provenance.map(|provenance| provenance.headers.list()).unwrap_or_default().iter() {
                        map.insert(Key::from(name.to_string()), value.map_or(CelValue::Null, text));
                    }
                    CelValue::from(map)
                }
                // A field the record does not have stays unbound, as the interpreter expects.
                field => match crate::codec::field(&record.fields, field) {
                    Some(value) => to_cel(value),
                    None => continue,
                },
            };
            match Box::<dyn Val>::try_from(value) {
                Ok(value) => variables.push((name.as_str(), value)),
                Err(error) => unusable = Some(format!("{name} cannot be read: {error}")),
            }
        }
        Bindings { environment: environment.clone(), variables, unusable }
    }
}

/// Whether the CEL interpreter has a function `name`, as a global or a member function. Its
/// parser takes any name and only running a call tells, so a call of each form is run once
/// with no arguments: an unknown name is an undeclared reference, a known one fails on its
/// arguments (or works).
fn interpreter_has(name: &str) -> bool {
    static ENVIRONMENT: std::sync::OnceLock<Arc<Env>> = std::sync::OnceLock::new();
    let environment = ENVIRONMENT.get_or_init(standard_environment);
    let context = Context::with_env(environment.clone());
    [format!("{name}()"), format!("null.{name}()")].iter().any(|probe| match environment.compile(probe) {
        Ok(program) => !matches!(
            crate::panics::contain(|| program.execute(&context)),
            Ok(Err(cel::ExecutionError::UndeclaredReference(reference))) if reference.as_str() == name
        ),
        // Not a call the parser takes alone (a macro such as `exists`): not this check's business.
        Err(_) => true,
    })
}

/// The standard functions, shared by a step's expressions.
pub fn standard_environment() -> Arc<Env> {
    Arc::new(Env::stdlib())
}

pub fn to_cel(value: &Value) -> CelValue {
    match value {
        Value::Null => CelValue::Null,
        Value::Bool(flag) => CelValue::Bool(*flag),
        Value::Number(number) => {
            if let Some(whole) = number.as_i64() {
                CelValue::Int(whole)
            } else if let Some(unsigned) = number.as_u64() {
                CelValue::UInt(unsigned)
            } else {
                CelValue::Float(number.as_f64().unwrap_or(f64::NAN))
            }
        }
        Value::String(text) => CelValue::String(Arc::new(text.clone())),
        Value::Array(items) => CelValue::List(Arc::new(items.iter().map(to_cel).collect())),
        Value::Object(object) => {
            let map: HashMap<Key, CelValue> = object.iter().map(|(name, value)| (Key::from(name.clone()), to_cel(value))).collect();
            CelValue::from(map)
        }
    }
}

/// A CEL value as a field value; `expected` (when known) orders an object's fields and
/// checks the kind of value. The error says what the value was.
pub fn from_cel(value: &CelValue, expected: Option<&FieldType>) -> Result<Value, ProcessError> {
    let mismatch = |what: &str| Err(ProcessError(format!("{what}, not a {}", expected.map(FieldType::describe).unwrap_or_default())));
    match (value, expected) {
        (CelValue::Null, _) => Ok(Value::Null),
        (CelValue::Bool(flag), None | Some(FieldType::Boolean)) => Ok(Value::Bool(*flag)),
        (CelValue::Int(whole), None | Some(FieldType::Long | FieldType::Timestamp)) => Ok(Value::from(*whole)),
        (CelValue::UInt(whole), None | Some(FieldType::Long | FieldType::Timestamp)) => match i64::try_from(*whole) {
            Ok(whole) => Ok(Value::from(whole)),
            Err(_) => Err(ProcessError(format!("{whole}, over the largest long"))),
        },
        (CelValue::Float(number), None | Some(FieldType::Double)) => match serde_json::Number::from_f64(*number) {
            Some(number) => Ok(Value::Number(number)),
            None => Err(ProcessError(format!("{number}, which no record field can hold"))),
        },
        (CelValue::String(text), None | Some(FieldType::String)) => Ok(Value::String(text.as_str().to_string())),
        (CelValue::List(items), None) => items.iter().map(|item| from_cel(item, None)).collect::<Result<Vec<_>, _>>().map(Value::Array),
        (CelValue::List(items), Some(FieldType::Array(element))) => {
            items.iter().map(|item| from_cel(item, Some(element))).collect::<Result<Vec<_>, _>>().map(Value::Array)
        }
        (CelValue::Map(map), Some(FieldType::Object(schema))) => {
            let mut object = Map::new();
            for (name, field_type) in &schema.fields {
                let value = map.map.get(&Key::from(name.clone())).map_or(Ok(Value::Null), |value| from_cel(value, Some(field_type)))?;
                object.insert(name.clone(), value);
            }
            Ok(Value::Object(object))
        }
        (CelValue::Map(map), None) => {
            let mut object = Map::new();
            for (key, value) in map.map.iter() {
                let Key::String(name) = key else {
                    return Err(ProcessError(format!("a map with the key {key:?}, not text")));
                };
                object.insert(name.as_str().to_string(), from_cel(value, None)?);
            }
            Ok(Value::Object(object))
        }
        (CelValue::Bool(flag), _) => mismatch(&flag.to_string()),
        (CelValue::Int(whole), _) => mismatch(&whole.to_string()),
        (CelValue::UInt(whole), _) => mismatch(&whole.to_string()),
        (CelValue::Float(number), _) => mismatch(&number.to_string()),
        (CelValue::String(text), _) => mismatch(&format!("'{text}'")),
        (CelValue::List(_), _) => mismatch("a list"),
        (CelValue::Map(_), _) => mismatch("a map"),
        (other, _) => Err(ProcessError(format!("{:?}, which no record field can hold", other.type_of()))),
    }
}

/// Collects the header names `expression` reads by name.
fn header_names(expression: &IdedExpr, names: &mut Vec<String>) {
    let is_headers = |operand: &IdedExpr| matches!(&operand.expr, Expr::Ident(name) if name == "_headers");
    let mut children: Vec<&IdedExpr> = Vec::new();
    match &expression.expr {
        Expr::Select(select) => {
            if is_headers(&select.operand) {
                names.push(select.field.clone());
            }
            children.push(&select.operand);
        }
        Expr::Call(call) => {
            if let (operators::INDEX | operators::OPT_INDEX, [operand, index]) = (call.func_name.as_str(), call.args.as_slice())
                && is_headers(operand)
                && let Expr::Literal(LiteralValue::String(name)) = &index.expr
            {
                names.push(name.to_string());
            }
            children.extend(call.target.as_deref());
            children.extend(call.args.iter());
        }
        Expr::List(list) => children.extend(list.elements.iter()),
        Expr::Map(map) => {
            for entry in &map.entries {
                if let EntryExpr::MapEntry(entry) = &entry.expr {
                    children.extend([&entry.key, &entry.value]);
                }
            }
        }
        Expr::Comprehension(comprehension) => children.extend([
            &comprehension.iter_range,
            &comprehension.accu_init,
            &comprehension.loop_cond,
            &comprehension.loop_step,
            &comprehension.result,
        ]),
        _ => {}
    }
    for child in children {
        header_names(child, names);
    }
}

/// The type of an expression, from the schema of the record it reads. Err: it cannot
/// work (int and double mixed, an object without the field named, branches of two types).
fn type_of(expression: &IdedExpr, schema: &Schema) -> Result<ValueType, BuildError> {
    use ValueType::{Headers, Known, Null, Unknown};
    let long = || Known(FieldType::Long);
    match &expression.expr {
        Expr::Literal(literal) => Ok(match literal {
            LiteralValue::Boolean(_) => Known(FieldType::Boolean),
            LiteralValue::Int(_) | LiteralValue::UInt(_) => long(),
            LiteralValue::Double(_) => Known(FieldType::Double),
            LiteralValue::String(_) => Known(FieldType::String),
            LiteralValue::Null => Null,
            LiteralValue::Bytes(_) => Unknown,
        }),
        Expr::Ident(name) => Ok(match name.as_str() {
            "_topic" | "_key" => Known(FieldType::String),
            "_partition" | "_offset" => long(),
            "_timestamp" => Known(FieldType::Timestamp),
            "_headers" => Headers,
            field => schema.field_type(field).cloned().map_or(Unknown, Known),
        }),
        Expr::Select(select) if select.test => Ok(Known(FieldType::Boolean)),
        Expr::Select(select) => match type_of(&select.operand, schema)? {
            Known(FieldType::Object(inner)) => match inner.field_type(&select.field) {
                Some(field_type) => Ok(Known(field_type.clone())),
                None => Err(BuildError(format!(
                    "'{}' is not a field of {}",
                    select.field,
                    inner.describe()
                ))),
            },
            Headers => Ok(Known(FieldType::String)),
            Known(other) => Err(BuildError(format!("'.{}' reads a field of a {}, which has none", select.field, other.describe()))),
            _ => Ok(Unknown),
        },
        Expr::Call(call) => {
            let args: Vec<ValueType> = call.args.iter().map(|arg| type_of(arg, schema)).collect::<Result<_, _>>()?;
            // A method's target is typed for its problems only (`item.colour.size()`).
            call.target.as_deref().map(|target| type_of(target, schema)).transpose()?;
            let name = call.func_name.as_str();
            match name {
                operators::LOGICAL_AND | operators::LOGICAL_OR | operators::LOGICAL_NOT | operators::EQUALS
                | operators::NOT_EQUALS | operators::GREATER | operators::GREATER_EQUALS | operators::LESS
                | operators::LESS_EQUALS | operators::IN | operators::NOT_STRICTLY_FALSE | "has" | "contains"
                | "startsWith" | "endsWith" | "matches" | "bool" | "exists" | "all" | "exists_one" => {
                    Ok(Known(FieldType::Boolean))
                }
                operators::ADD | operators::SUBSTRACT | operators::MULTIPLY | operators::DIVIDE | operators::MODULO => {
                    arithmetic(name, &args)
                }
                operators::NEGATE => Ok(args.into_iter().next().unwrap_or(Unknown)),
                operators::CONDITIONAL => match (args.get(1), args.get(2)) {
                    (Some(yes), Some(no)) if yes == no => Ok(yes.clone()),
                    (Some(Null), Some(other)) | (Some(other), Some(Null)) => Ok(other.clone()),
                    (Some(Unknown), _) | (_, Some(Unknown)) => Ok(Unknown),
                    (Some(yes), Some(no)) => Err(BuildError(format!(
                        "the branches give {} and {}; convert one so both give the same type",
                        yes.describe(),
                        no.describe()
                    ))),
                    _ => Ok(Unknown),
                },
                operators::INDEX | operators::OPT_INDEX => match args.first() {
                    Some(Headers) => Ok(Known(FieldType::String)),
                    Some(Known(FieldType::Array(element))) => Ok(Known((**element).clone())),
                    _ => Ok(Unknown),
                },
                "int" | "uint" | "size" => Ok(long()),
                "double" => Ok(Known(FieldType::Double)),
                "string" => Ok(Known(FieldType::String)),
                _ => Ok(Unknown),
            }
        }
        _ => Ok(Unknown),
    }
}

/// The type of `+ - * / %` over operands of these types: CEL does not mix int and double,
/// so an expression that does would fail on every record.
fn arithmetic(operator: &str, args: &[ValueType]) -> Result<ValueType, BuildError> {
    use FieldType::{Double, Long, String as Text, Timestamp};
    let numeric = |value: &ValueType| match value {
        ValueType::Known(Long | Timestamp) => Some(Long),
        ValueType::Known(Double) => Some(Double),
        _ => None,
    };
    match args {
        [ValueType::Known(Text), ValueType::Known(Text)] if operator == operators::ADD => Ok(ValueType::Known(Text)),
        [left, right] => match (numeric(left), numeric(right)) {
            (Some(left), Some(right)) if left == right => Ok(ValueType::Known(left)),
            (Some(_), Some(_)) => Err(
                BuildError(
                    "mixes int and double, which CEL does not do on its own; write a double literal (100.0) or convert with double() or int()"
                        .to_string(),
                ),
            ),
            _ if [left, right].iter().any(|arg| matches!(arg, ValueType::Known(FieldType::Boolean | FieldType::Object(_)))) => {
                Err(BuildError(format!("{} {} {} cannot work", left.describe(), symbol(operator), right.describe())))
            }
            _ => Ok(ValueType::Unknown),
        },
        _ => Ok(ValueType::Unknown),
    }
}

fn symbol(operator: &str) -> &str {
    operator.trim_matches('_')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn schema() -> Schema {
        let item = Schema { fields: vec![("sku".into(), FieldType::String), ("qty".into(), FieldType::Long), ("price".into(), FieldType::Double)] };
        Schema {
            fields: vec![
                ("id".into(), FieldType::String),
                ("amount".into(), FieldType::Double),
                ("count".into(), FieldType::Long),
                ("item".into(), FieldType::Object(item.clone())),
                ("tags".into(), FieldType::Array(Box::new(FieldType::String))),
                ("lines".into(), FieldType::Array(Box::new(FieldType::Object(item)))),
            ],
        }
    }

    /// The type an expression gives, or the problem with it, in words.
    fn type_text(text: &str) -> Result<String, BuildError> {
        Expression::compile(text, &schema()).map(|expression| expression.value_type().describe())
    }

    #[test]
    fn expressions_are_typed_from_the_schema() {
        assert_eq!(type_text("int(amount * 100.0)").unwrap(), "long");
        assert_eq!(type_text("amount * 100.0").unwrap(), "double");
        assert_eq!(type_text("item.qty * count").unwrap(), "long");
        assert_eq!(type_text("item.qty * item.price").unwrap_err().to_string(), "'item.qty * item.price': mixes int and double, which CEL does not do on its own; write a double literal (100.0) or convert with double() or int()");
        assert_eq!(type_text("id + '-' + item.sku").unwrap(), "string");
        assert_eq!(type_text("_headers.region").unwrap(), "string");
        assert_eq!(type_text("_headers['region']").unwrap(), "string");
        assert_eq!(type_text("_topic").unwrap(), "string");
        assert_eq!(type_text("_offset + 1").unwrap(), "long");
        assert_eq!(type_text("count > 2 ? id : null").unwrap(), "string");
        assert_eq!(type_text("item").unwrap(), "{sku: string, qty: long, price: double}");
        assert_eq!(type_text("tags").unwrap(), "[string]");
        assert_eq!(type_text("tags[0] + '!'").unwrap(), "string");
        assert_eq!(type_text("size(tags) > 1").unwrap(), "boolean");
        assert_eq!(type_text("lines[1].qty * 2").unwrap(), "long");
        assert!(type_text("count > 2 ? id : count").unwrap_err().to_string().contains("the branches give string and long"));
        assert!(type_text("item.colour").unwrap_err().to_string().contains("'colour' is not a field of {sku: string"));
        assert!(type_text("colour == 'red'").unwrap_err().to_string().contains("names 'colour' not in the record"));
    }

    /// What an expression gives for a record of these fields (read from partition 3).
    fn value_for(text: &str, fields: Value) -> Result<CelValue, ProcessError> {
        let expression = Expression::compile(text, &schema()).unwrap();
        let mut record = crate::operators::test_record(fields, 0);
        record.provenance = Some(crate::operators::Provenance {
            topic: "orders",
            partition: 3,
            offset: 7,
            timestamp: None,
            headers: crate::operators::InputHeaders::Read(&[]),
            key: None,
        });
        let bindings = Bindings::of(&record, &standard_environment(), expression.reads());
        expression.evaluate(&bindings)
    }

    /// The record's fields and metadata are what the expression reads, a comprehension's
    /// variable shadows a field of its name, and a field the record lacks is an error.
    #[test]
    fn expressions_read_the_records_values() {
        let fields = serde_json::json!({"id": "a", "count": 2, "tags": ["a", "b"]});
        assert_eq!(value_for("id == 'a' && count * 2 == 4 && _partition == 3 && _offset == 7", fields.clone()).unwrap(), CelValue::Bool(true));
        assert_eq!(value_for("tags.exists(id, id == 'b')", fields.clone()).unwrap(), CelValue::Bool(true));
        assert_eq!(value_for("tags.all(id, id == 'a')", fields.clone()).unwrap(), CelValue::Bool(false));
        assert_eq!(value_for("_topic + '/' + id", fields.clone()).unwrap(), CelValue::from("orders/a"));
        let missing = value_for("amount > 1.0", fields).unwrap_err().0;
        assert!(missing.contains("'amount > 1.0' failed") && missing.contains("amount"), "{missing}");
    }

    #[test]
    fn an_untyped_value_asks_for_a_conversion() {
        let expression = Expression::compile("[1, 2]", &schema()).unwrap();
        assert!(expression.field_type().unwrap_err().0.contains("convert it with string(), int(), double() or bool()"));
    }

    #[test]
    fn values_come_back_as_their_field_type() {
        let object = FieldType::Object(Schema { fields: vec![("b".into(), FieldType::Long), ("a".into(), FieldType::String)] });
        let map: HashMap<Key, CelValue> = [(Key::from("a".to_string()), CelValue::from("x")), (Key::from("b".to_string()), CelValue::Int(1))].into();
        assert_eq!(from_cel(&CelValue::from(map), Some(&object)).unwrap().to_string(), r#"{"b":1,"a":"x"}"#);
        assert_eq!(from_cel(&CelValue::Float(f64::NAN), Some(&FieldType::Double)).unwrap_err().to_string(), "NaN, which no record field can hold");
        assert_eq!(from_cel(&CelValue::UInt(u64::MAX), None).unwrap_err().to_string(), "18446744073709551615, over the largest long");
        assert_eq!(from_cel(&CelValue::Int(3), Some(&FieldType::String)).unwrap_err().to_string(), "3, not a string");
    }
}
