//! [`ConfigErrors`]: every problem found in the settings and the pipeline file, each with
//! where it is (a key path, and the environment variable where one applies).

use std::fmt;

/// One thing wrong with the settings or the pipeline, located precisely enough to fix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// Where: a settings key with its environment variable, or a pipeline path such as
    /// `steps[1].filter`.
    pub location: String,
    pub message: String,
    /// Where in the pipeline file, when it is there.
    pub position: Option<Position>,
}

/// A line and column, both counted from 1.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Position {
    pub line: usize,
    pub column: usize,
}

impl fmt::Display for Problem {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.position {
            Some(Position { line, column }) => write!(formatter, "{}: {} (line {line}, column {column})", self.location, self.message),
            None => write!(formatter, "{}: {}", self.location, self.message),
        }
    }
}

/// "unknown <what> '<name>'; did you mean '<closest>'? known <what>s: a, b, c": the closest
/// known name is offered when it is near enough to be a slip: a letter or two wrong,
/// missing, extra or swapped (one per four letters).
pub fn unknown(what: &str, name: &str, known: &[&str]) -> String {
    let name_lower = name.to_lowercase();
    let allowed = (name.chars().count() / 4).max(1);
    let closest = known
        .iter()
        .map(|candidate| (strsim::osa_distance(&name_lower, &candidate.to_lowercase()), *candidate))
        .filter(|(distance, _)| *distance <= allowed)
        .min_by_key(|(distance, _)| *distance);
    let hint = match closest {
        Some((_, candidate)) => format!("; did you mean '{candidate}'?"),
        None => ";".to_string(),
    };
    format!("unknown {what} '{name}'{hint} known {what}s: {}", known.join(", "))
}

/// All the problems found in one load; never empty when returned as an error.
#[derive(Debug, Clone, Default, thiserror::Error)]
pub struct ConfigErrors {
    pub problems: Vec<Problem>,
}

impl ConfigErrors {
    pub fn push(&mut self, location: impl Into<String>, message: impl Into<String>) {
        self.problems.push(Problem {
            location: location.into(),
            message: message.into(),
            position: None,
        });
    }

    pub fn is_empty(&self) -> bool {
        self.problems.is_empty()
    }
}

impl fmt::Display for ConfigErrors {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        let count = self.problems.len();
        writeln!(
            formatter,
            "{count} configuration problem{}:",
            if count == 1 { "" } else { "s" }
        )?;
        for problem in &self.problems {
            writeln!(formatter, "  - {problem}")?;
        }
        Ok(())
    }
}
