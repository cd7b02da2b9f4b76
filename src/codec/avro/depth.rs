//! How deep an Avro datum nests, measured without building its values.
//!
//! apache-avro decodes nested values by recursion with no depth limit, so a datum of a
//! recursive writer schema (a linked list, a tree) that nests thousands of levels deep, a few
//! kilobytes, overflows the thread's stack, and a stack overflow ends the process: no
//! `catch_unwind` contains it. Only a recursive schema (one that refers to a named type
//! around it) can nest deeper than the schema itself, so only datums of those are walked,
//! iteratively over the bytes, before apache-avro decodes them.

use std::collections::HashMap;

use apache_avro::schema::{Name, ResolvedSchema};
use apache_avro::Schema as AvroSchema;

/// The deepest a datum of a recursive schema may nest (records, arrays, maps and unions
/// within each other). Far beyond any list or tree a record carries, and far below what the
/// loop's stack (see `main.rs`) holds while apache-avro decodes it.
pub const MAX_DEPTH: usize = 200;

/// Why a datum cannot be read: it nests too deep, or its bytes end or lie.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct DepthError(pub String);

/// The named types of a recursive writer schema, by name.
pub type Names = HashMap<Name, AvroSchema>;

/// The named types of a writer schema, when it refers to one of them from inside (it is
/// recursive); None for a schema whose datums nest no deeper than the schema itself.
pub fn recursive_names(schema: &AvroSchema) -> Option<Names> {
    if !refers_to_a_name(schema) {
        return None;
    }
    let resolved = ResolvedSchema::try_from(schema).ok()?;
    Some(resolved.get_names().iter().map(|(name, schema)| (name.clone(), (*schema).clone())).collect())
}

fn refers_to_a_name(schema: &AvroSchema) -> bool {
    match schema {
        AvroSchema::Ref { .. } => true,
        AvroSchema::Array(array) => refers_to_a_name(&array.items),
        AvroSchema::Map(map) => refers_to_a_name(&map.types),
        AvroSchema::Union(union) => union.variants().iter().any(refers_to_a_name),
        AvroSchema::Record(record) => record.fields.iter().any(|field| refers_to_a_name(&field.schema)),
        _ => false,
    }
}

/// Checks that `datum` nests at most `max_depth` levels deep. Errors say why it cannot be read
/// (too deep, or cut short); a datum that passes may still fail to decode for other reasons.
pub fn check_depth(schema: &AvroSchema, names: &Names, datum: &[u8], max_depth: usize) -> Result<(), DepthError> {
    let mut reader = Reader { bytes: datum, position: 0 };
    // Work still to do: a schema to read at a depth, or the rest of an array's or map's block.
    enum Work<'s> {
        Value(&'s AvroSchema, usize),
        Items { items: &'s AvroSchema, left: i64, depth: usize, keys: bool },
    }
    let mut stack = vec![Work::Value(schema, 0)];
    while let Some(work) = stack.pop() {
        let (schema, depth) = match work {
            Work::Value(schema, depth) => (schema, depth),
            Work::Items { items, left, depth, keys } => {
                let left = if left == 0 { reader.block_count()? } else { left };
                if left == 0 {
                    continue;
                }
                let before = reader.position;
                if keys {
                    reader.skip_length()?;
                }
                stack.push(Work::Items { items, left: left - 1, depth, keys });
                // An item that takes no bytes nests nothing: the rest of the block is the same.
                if reader.position == before && takes_no_bytes(items) {
                    stack.pop();
                    stack.push(Work::Items { items, left: 0, depth, keys });
                    // The block's remaining items are skipped; the next count is read next.
                    continue;
                }
                (items, depth)
            }
        };
        if depth > max_depth {
            return Err(DepthError(format!("the datum nests deeper than {max_depth} levels")));
        }
        match schema {
            AvroSchema::Null => {}
            AvroSchema::Boolean => reader.skip(1)?,
            AvroSchema::Float => reader.skip(4)?,
            AvroSchema::Double => reader.skip(8)?,
            AvroSchema::Duration => reader.skip(12)?,
            AvroSchema::Fixed(fixed) => reader.skip(fixed.size)?,
            AvroSchema::Int
            | AvroSchema::Long
            | AvroSchema::Enum(_)
            | AvroSchema::Date
            | AvroSchema::TimeMillis
            | AvroSchema::TimeMicros
            | AvroSchema::TimestampMillis
            | AvroSchema::TimestampMicros
            | AvroSchema::TimestampNanos
            | AvroSchema::LocalTimestampMillis
            | AvroSchema::LocalTimestampMicros
            | AvroSchema::LocalTimestampNanos => {
                reader.long()?;
            }
            AvroSchema::Bytes | AvroSchema::String | AvroSchema::BigDecimal | AvroSchema::Uuid => reader.skip_length()?,
            AvroSchema::Decimal(decimal) => stack.push(Work::Value(&decimal.inner, depth)),
            AvroSchema::Array(array) => stack.push(Work::Items { items: &array.items, left: 0, depth: depth + 1, keys: false }),
            AvroSchema::Map(map) => stack.push(Work::Items { items: &map.types, left: 0, depth: depth + 1, keys: true }),
            AvroSchema::Union(union) => {
                let index = reader.long()?;
                let variant = usize::try_from(index).ok().and_then(|index| union.variants().get(index));
                let Some(variant) = variant else {
                    return Err(DepthError(format!("union branch {index} does not exist")));
                };
                stack.push(Work::Value(variant, depth + 1));
            }
            AvroSchema::Record(record) => {
                // Fields are read in order: pushed last to first.
                for field in record.fields.iter().rev() {
                    stack.push(Work::Value(&field.schema, depth + 1));
                }
            }
            AvroSchema::Ref { name } => {
                let found = names.get(name).or_else(|| names.iter().find(|(known, _)| known.name == name.name).map(|(_, schema)| schema));
                let Some(found) = found else {
                    return Err(DepthError(format!("the schema refers to '{}', which it does not define", name.name)));
                };
                stack.push(Work::Value(found, depth));
            }
        }
    }
    Ok(())
}

/// Whether a value of this schema is written as no bytes at all.
fn takes_no_bytes(schema: &AvroSchema) -> bool {
    match schema {
        AvroSchema::Null => true,
        AvroSchema::Fixed(fixed) => fixed.size == 0,
        AvroSchema::Record(record) => record.fields.iter().all(|field| takes_no_bytes(&field.schema)),
        _ => false,
    }
}

struct Reader<'a> {
    bytes: &'a [u8],
    position: usize,
}

impl Reader<'_> {
    fn skip(&mut self, count: usize) -> Result<(), DepthError> {
        let end = self.position.checked_add(count).filter(|end| *end <= self.bytes.len());
        match end {
            Some(end) => {
                self.position = end;
                Ok(())
            }
            None => Err(DepthError("the datum ends early".to_string())),
        }
    }

    /// A zigzag varint, as Avro writes int and long.
    fn long(&mut self) -> Result<i64, DepthError> {
        let mut value: u64 = 0;
        for shift in (0..70).step_by(7) {
            let Some(byte) = self.bytes.get(self.position).copied() else {
                return Err(DepthError("the datum ends early".to_string()));
            };
            self.position += 1;
            if shift >= 64 {
                return Err(DepthError("a number is longer than 10 bytes".to_string()));
            }
            value |= u64::from(byte & 0x7f) << shift;
            if byte & 0x80 == 0 {
                return Ok(((value >> 1) as i64) ^ -((value & 1) as i64));
            }
        }
        Err(DepthError("a number is longer than 10 bytes".to_string()))
    }

    fn skip_length(&mut self) -> Result<(), DepthError> {
        let length = self.long()?;
        let length = usize::try_from(length).map_err(|_| DepthError(format!("a negative length {length}")))?;
        self.skip(length)
    }

    /// The item count of the next block of an array or map (0 at the end); a negative count
    /// is followed by the block's size in bytes.
    fn block_count(&mut self) -> Result<i64, DepthError> {
        let count = self.long()?;
        if count < 0 {
            self.long()?;
            return count.checked_neg().ok_or_else(|| DepthError("an item count out of range".to_string()));
        }
        Ok(count)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIST: &str = r#"{"type":"record","name":"Node","fields":[
        {"name":"id","type":"string"},{"name":"next","type":["null","Node"]}]}"#;

    fn list(levels: usize) -> Vec<u8> {
        let mut datum = Vec::new();
        for _ in 0..levels {
            datum.extend_from_slice(&[0x00, 0x02]);
        }
        datum.extend_from_slice(&[0x00, 0x00]);
        datum
    }

    #[test]
    fn only_recursive_schemas_are_walked() {
        let flat = AvroSchema::parse_str(r#"{"type":"record","name":"Flat","fields":[{"name":"a","type":{"type":"array","items":"long"}}]}"#).unwrap();
        assert!(recursive_names(&flat).is_none());
        assert!(recursive_names(&AvroSchema::parse_str(LIST).unwrap()).is_some());
    }

    #[test]
    fn a_list_deeper_than_the_limit_is_refused_and_one_within_it_passes() {
        let schema = AvroSchema::parse_str(LIST).unwrap();
        let names = recursive_names(&schema).unwrap();
        // Each list level is a record inside a union: two levels of depth.
        assert_eq!(check_depth(&schema, &names, &list(90), MAX_DEPTH), Ok(()));
        let error = check_depth(&schema, &names, &list(100_000), MAX_DEPTH).unwrap_err();
        assert!(error.0.contains("deeper than 200"), "{error}");
        // What passes the walk decodes as before (a short list: apache-avro's recursion takes
        // much stack in an unoptimized test build).
        assert_eq!(check_depth(&schema, &names, &list(5), MAX_DEPTH), Ok(()));
        // Decoding sets apache-avro's allocation limit for the process: weir's goes first.
        super::super::limit_decode_allocations();
        let value = apache_avro::from_avro_datum(&schema, &mut &list(5)[..], None);
        assert!(value.is_ok(), "{value:?}");
    }

    #[test]
    fn arrays_and_maps_of_nested_values_count_their_depth() {
        let tree = AvroSchema::parse_str(
            r#"{"type":"record","name":"Tree","fields":[{"name":"children","type":{"type":"map","values":{"type":"array","items":"Tree"}}}]}"#,
        )
        .unwrap();
        let names = recursive_names(&tree).unwrap();
        // A tree of depth 2: root -> {"a": [leaf]} ; leaf has an empty map.
        let datum = [0x02, 0x02, b'a', 0x02, 0x00, 0x00, 0x00, 0x00];
        assert_eq!(check_depth(&tree, &names, &datum, MAX_DEPTH), Ok(()));
        super::super::limit_decode_allocations();
        assert!(apache_avro::from_avro_datum(&tree, &mut &datum[..], None).is_ok());
        assert!(check_depth(&tree, &names, &datum, 2).is_err());
        // Cut short: an error, not a panic.
        assert!(check_depth(&tree, &names, &datum[..3], MAX_DEPTH).is_err());
    }
}
