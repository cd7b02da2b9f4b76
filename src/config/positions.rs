//! Where each key of a pipeline file is, so that a config error names its line and column
//! as well as its key path (`steps[1].dedup.within: is required (line 12, column 7)`).
//!
//! serde's YAML values carry no positions, so the text is read a second time, as events, by
//! saphyr's parser; only when there are problems to place.

use std::collections::HashMap;

use saphyr_parser::{Event, Parser};

use super::error::{Position, Problem};

/// Gives each problem the position of the deepest key of its location that the text has
/// (a missing key's problem gets its mapping's key).
pub fn place(text: &str, problems: &mut [Problem]) {
    if problems.is_empty() {
        return;
    }
    let positions = key_positions(text);
    for problem in problems {
        let mut path = problem.location.as_str();
        problem.position = loop {
            if let Some(position) = positions.get(path) {
                break Some(*position);
            }
            match path.rfind(['.', '[']) {
                Some(cut) if cut > 0 => path = &path[..cut],
                _ => break None,
            }
        };
    }
}

enum Frame {
    Mapping { path: String, key: Option<String> },
    Sequence { path: String, next: usize },
}

/// Key path (`sources.clicks.format`, `steps[2]`) → where that key (or list item) starts.
fn key_positions(text: &str) -> HashMap<String, Position> {
    let mut positions = HashMap::new();
    let mut frames: Vec<Frame> = Vec::new();
    for item in Parser::new_from_str(text) {
        // A text serde could read but this parser cannot gets no positions past that point.
        let Ok((event, span)) = item else { break };
        let position = Position { line: span.start.line(), column: span.start.col() + 1 };
        let starts_node = matches!(event, Event::Scalar(..) | Event::MappingStart(..) | Event::SequenceStart(..) | Event::Alias(_));
        if starts_node {
            // The path of this node, or None when it is a mapping's key (then recorded).
            let path = match frames.last_mut() {
                None => Some(String::new()),
                Some(Frame::Sequence { path, next }) => {
                    let item = format!("{path}[{next}]");
                    *next += 1;
                    positions.insert(item.clone(), position);
                    Some(item)
                }
                Some(Frame::Mapping { path, key }) => match key.take() {
                    Some(key) => Some(key),
                    None => {
                        let name = match &event {
                            Event::Scalar(value, ..) => value.to_string(),
                            _ => "?".to_string(),
                        };
                        let full = if path.is_empty() { name } else { format!("{path}.{name}") };
                        positions.insert(full.clone(), position);
                        *key = Some(full);
                        None
                    }
                },
            };
            match (event, path) {
                (Event::MappingStart(..), path) => frames.push(Frame::Mapping { path: path.unwrap_or_default(), key: None }),
                (Event::SequenceStart(..), path) => frames.push(Frame::Sequence { path: path.unwrap_or_default(), next: 0 }),
                _ => {}
            }
        } else if matches!(event, Event::MappingEnd | Event::SequenceEnd) {
            frames.pop();
        }
    }
    positions
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = "name: demo\nsources:\n  clicks: {format: json, topics: [a]}\nsteps:\n  - filter: \"x > 1\"\n  - dedup:\n      key: [user]\n";

    #[test]
    fn keys_and_list_items_have_their_line_and_column() {
        let positions = key_positions(TEXT);
        assert_eq!(positions["name"], Position { line: 1, column: 1 });
        assert_eq!(positions["sources.clicks"], Position { line: 3, column: 3 });
        assert_eq!(positions["sources.clicks.topics"], Position { line: 3, column: 26 });
        assert_eq!(positions["steps[1]"], Position { line: 6, column: 5 });
        assert_eq!(positions["steps[1].dedup.key"], Position { line: 7, column: 7 });
    }

    #[test]
    fn a_missing_key_is_placed_at_its_mapping() {
        let mut problems = vec![
            Problem { location: "steps[1].dedup.within".into(), message: "is required".into(), position: None },
            Problem { location: "kafka.bootstrap_servers (env X)".into(), message: "bad".into(), position: None },
        ];
        place(TEXT, &mut problems);
        assert_eq!(problems[0].position, Some(Position { line: 6, column: 5 }));
        assert_eq!(problems[1].position, None);
        assert_eq!(problems[0].to_string(), "steps[1].dedup.within: is required (line 6, column 5)");
    }
}
