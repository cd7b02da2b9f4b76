//! `- filter: "<CEL expression>"`: its config and checks.

use serde_yaml_ng::Value as Yaml;

use super::FilterExpression;
use crate::config::{ConfigErrors, Schema};

#[derive(Debug, Clone)]
pub struct Filter {
    pub expression: String,
}

impl Filter {
    /// Reads a filter step's body; the expression must compile against the fields of the
    /// records it sees (`input`), or at least parse when those are unknown.
    pub fn parse(body: &Yaml, input: Option<&Schema>, location: &str, problems: &mut ConfigErrors) -> Option<Filter> {
        let Some(expression) = body.as_str() else {
            problems.push(format!("{location}.filter"), "must be an expression string");
            return None;
        };
        Filter::check(expression, input, &format!("{location}.filter"), problems)
    }

    /// A filter from an expression written elsewhere (an output's `when`), its problems
    /// located at `location`.
    pub fn check(expression: &str, input: Option<&Schema>, location: &str, problems: &mut ConfigErrors) -> Option<Filter> {
        let checked = match input {
            Some(input) => FilterExpression::compile(expression, input).map(drop),
            None => FilterExpression::check_syntax(expression),
        };
        if let Err(message) = checked {
            problems.push(location, message.to_string());
            return None;
        }
        Some(Filter { expression: expression.to_string() })
    }
}
