//! The few pieces of the protobuf wire format the gRPC echo messages need: varints and
//! length-delimited fields. Decoding skips fields it does not know, as protobuf requires, and
//! returns an error (never panics) on truncated or malformed input.

/// Wire type of varint fields (int32, uint64, bool, enums).
const VARINT: u8 = 0;
/// Wire type of 8-byte fields (fixed64, double).
const FIXED64: u8 = 1;
/// Wire type of length-delimited fields (string, bytes, messages, map entries).
const LEN: u8 = 2;
/// Wire type of 4-byte fields (fixed32, float).
const FIXED32: u8 = 5;

/// Field numbers are 29 bits.
const MAX_FIELD: u32 = (1 << 29) - 1;

/// A varint is at most 10 bytes long: 64 bits in groups of 7.
const MAX_VARINT_LEN: usize = 10;

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("message truncated")]
    Truncated,
    #[error("varint longer than 10 bytes")]
    VarintTooLong,
    #[error("field {field} has wire type {wire_type}, which this decoder does not support")]
    UnsupportedWireType { field: u32, wire_type: u8 },
    #[error("field number {0} is out of range")]
    BadFieldNumber(u64),
    #[error("field {field} has wire type {wire_type}; expected a length-delimited value")]
    NotLengthDelimited { field: u32, wire_type: u8 },
    #[error("string field {field} is not valid UTF-8")]
    InvalidUtf8 { field: u32 },
}

/// One field read off the wire. Length-delimited values borrow from the input.
#[derive(Debug, PartialEq, Eq)]
pub enum Value<'a> {
    Varint(u64),
    Fixed64(u64),
    Len(&'a [u8]),
    Fixed32(u32),
}

/// Reads the fields of one message in order.
pub struct Fields<'a> {
    rest: &'a [u8],
}

impl<'a> Fields<'a> {
    pub fn new(message: &'a [u8]) -> Self {
        Fields { rest: message }
    }

    /// The next field number and value, `None` at the end of the message.
    pub fn next_field(&mut self) -> Result<Option<(u32, Value<'a>)>, DecodeError> {
        if self.rest.is_empty() {
            return Ok(None);
        }
        let key = self.varint()?;
        let field = match u32::try_from(key >> 3) {
            Ok(field) if (1..=MAX_FIELD).contains(&field) => field,
            _ => return Err(DecodeError::BadFieldNumber(key >> 3)),
        };
        // The low three bits are the wire type; the cast cannot lose anything after the mask.
        let wire_type = (key & 0x7) as u8;
        let value = match wire_type {
            VARINT => Value::Varint(self.varint()?),
            FIXED64 => {
                let bytes = self.take(8)?;
                let mut le = [0u8; 8];
                le.copy_from_slice(bytes);
                Value::Fixed64(u64::from_le_bytes(le))
            }
            LEN => {
                let len = usize::try_from(self.varint()?).map_err(|_| DecodeError::Truncated)?;
                Value::Len(self.take(len)?)
            }
            FIXED32 => {
                let bytes = self.take(4)?;
                let mut le = [0u8; 4];
                le.copy_from_slice(bytes);
                Value::Fixed32(u32::from_le_bytes(le))
            }
            _ => return Err(DecodeError::UnsupportedWireType { field, wire_type }),
        };
        Ok(Some((field, value)))
    }

    fn varint(&mut self) -> Result<u64, DecodeError> {
        let mut value = 0u64;
        for (i, &byte) in self.rest.iter().enumerate().take(MAX_VARINT_LEN) {
            value |= u64::from(byte & 0x7f) << (7 * i);
            if byte & 0x80 == 0 {
                self.rest = &self.rest[i + 1..];
                return Ok(value);
            }
        }
        if self.rest.len() < MAX_VARINT_LEN {
            Err(DecodeError::Truncated)
        } else {
            Err(DecodeError::VarintTooLong)
        }
    }

    fn take(&mut self, len: usize) -> Result<&'a [u8], DecodeError> {
        if self.rest.len() < len {
            return Err(DecodeError::Truncated);
        }
        let (taken, rest) = self.rest.split_at(len);
        self.rest = rest;
        Ok(taken)
    }
}

impl Value<'_> {
    pub fn wire_type(&self) -> u8 {
        match self {
            Value::Varint(_) => VARINT,
            Value::Fixed64(_) => FIXED64,
            Value::Len(_) => LEN,
            Value::Fixed32(_) => FIXED32,
        }
    }
}

/// A bytes, string or embedded-message field's value.
pub fn len_delimited(field: u32, value: Value<'_>) -> Result<&[u8], DecodeError> {
    match value {
        Value::Len(bytes) => Ok(bytes),
        other => Err(DecodeError::NotLengthDelimited {
            field,
            wire_type: other.wire_type(),
        }),
    }
}

/// A string field's value, checked to be UTF-8 as proto3 requires.
pub fn string(field: u32, value: Value<'_>) -> Result<String, DecodeError> {
    let bytes = len_delimited(field, value)?;
    std::str::from_utf8(bytes)
        .map(str::to_owned)
        .map_err(|_| DecodeError::InvalidUtf8 { field })
}

pub fn put_varint(buf: &mut Vec<u8>, mut value: u64) {
    while value >= 0x80 {
        // Low seven bits plus the continuation bit; the mask makes the cast exact.
        buf.push((value & 0x7f) as u8 | 0x80);
        value >>= 7;
    }
    buf.push(value as u8);
}

/// A length-delimited field: a string, bytes or an embedded message.
pub fn put_bytes(buf: &mut Vec<u8>, field: u32, bytes: &[u8]) {
    put_varint(buf, u64::from(field) << 3 | u64::from(LEN));
    put_varint(buf, bytes.len() as u64);
    buf.extend_from_slice(bytes);
}

/// A string field; proto3 leaves empty strings off the wire.
pub fn put_string(buf: &mut Vec<u8>, field: u32, s: &str) {
    if !s.is_empty() {
        put_bytes(buf, field, s.as_bytes());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn varints_round_trip() {
        for value in [0, 1, 127, 128, 300, u64::from(u32::MAX), u64::MAX] {
            let mut buf = Vec::new();
            put_varint(&mut buf, value);
            // A varint field 1 wrapped around the value reads back through the field reader.
            let mut field = vec![0x08];
            field.extend_from_slice(&buf);
            let mut fields = Fields::new(&field);
            assert_eq!(fields.next_field(), Ok(Some((1, Value::Varint(value)))));
            assert_eq!(fields.next_field(), Ok(None));
        }
    }

    #[test]
    fn string_field_matches_protobuf_encoding() {
        let mut buf = Vec::new();
        put_string(&mut buf, 1, "hi");
        assert_eq!(buf, [0x0a, 0x02, b'h', b'i']);
        put_string(&mut buf, 2, "");
        assert_eq!(buf.len(), 4, "empty strings are not encoded");
    }

    #[test]
    fn every_field_kind_is_read_or_skipped() {
        let message = [
            0x08, 0x96, 0x01, // field 1 varint 150
            0x11, 1, 0, 0, 0, 0, 0, 0, 0, // field 2 fixed64 1
            0x1a, 0x01, b'x', // field 3 len "x"
            0x25, 2, 0, 0, 0, // field 4 fixed32 2
        ];
        let mut fields = Fields::new(&message);
        assert_eq!(fields.next_field(), Ok(Some((1, Value::Varint(150)))));
        assert_eq!(fields.next_field(), Ok(Some((2, Value::Fixed64(1)))));
        assert_eq!(fields.next_field(), Ok(Some((3, Value::Len(b"x")))));
        assert_eq!(fields.next_field(), Ok(Some((4, Value::Fixed32(2)))));
        assert_eq!(fields.next_field(), Ok(None));
    }

    #[test]
    fn malformed_input_is_an_error() {
        let cases: &[(&[u8], DecodeError)] = &[
            (&[0x0a, 0x05, b'a'], DecodeError::Truncated),
            (&[0x08, 0x80], DecodeError::Truncated),
            (
                &[
                    0x08, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01,
                ],
                DecodeError::VarintTooLong,
            ),
            (
                &[0x0b],
                DecodeError::UnsupportedWireType {
                    field: 1,
                    wire_type: 3,
                },
            ),
            (&[0x02, 0x00], DecodeError::BadFieldNumber(0)),
            (&[0x11, 1, 2], DecodeError::Truncated),
        ];
        for (input, want) in cases {
            assert_eq!(
                Fields::new(input).next_field().as_ref(),
                Err(want),
                "input {input:x?}"
            );
        }
    }

    #[test]
    fn strings_must_be_utf8() {
        assert_eq!(
            string(1, Value::Len(&[0xff])),
            Err(DecodeError::InvalidUtf8 { field: 1 })
        );
        assert_eq!(
            string(1, Value::Varint(1)),
            Err(DecodeError::NotLengthDelimited {
                field: 1,
                wire_type: VARINT
            })
        );
    }
}
