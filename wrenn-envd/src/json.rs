//! Serde helpers for the protobuf JSON mapping (proto3 canonical JSON).
//!
//! The mapping differs from plain serde in a few places that matter on the wire:
//! 64-bit integers travel as strings, `bytes` as base64, enums by name and
//! timestamps as RFC 3339. Parsers are lenient in the ways protojson is:
//! numbers are accepted for 64-bit ints and enums, every base64 alphabet is accepted.

use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD, URL_SAFE, URL_SAFE_NO_PAD};
use base64::Engine;
use bytes::Bytes;
use serde::de::{self, Deserializer, Unexpected, Visitor};
use serde::Serializer;
use std::fmt;

/// Decodes base64 in any of the alphabets protojson accepts.
pub fn decode_base64(s: &str) -> Option<Vec<u8>> {
    let s = s.trim_end_matches('=');
    STANDARD_NO_PAD
        .decode(s)
        .or_else(|_| URL_SAFE_NO_PAD.decode(s))
        .or_else(|_| STANDARD.decode(s))
        .or_else(|_| URL_SAFE.decode(s))
        .ok()
}

/// `bytes` fields: standard base64 with padding on output.
pub mod b64 {
    use super::*;

    pub fn serialize<S: Serializer>(v: &Bytes, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&STANDARD.encode(v))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Bytes, D::Error> {
        let s: Option<String> = serde::Deserialize::deserialize(d)?;
        match s {
            None => Ok(Bytes::new()),
            Some(s) => decode_base64(&s)
                .map(Bytes::from)
                .ok_or_else(|| de::Error::invalid_value(Unexpected::Str(&s), &"base64 data")),
        }
    }
}

struct IntVisitor<T>(std::marker::PhantomData<T>);

impl<T> Visitor<'_> for IntVisitor<T>
where
    T: TryFrom<i64> + TryFrom<u64> + std::str::FromStr,
{
    type Value = T;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("an integer or a string holding one")
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<T, E> {
        T::try_from(v).map_err(|_| E::invalid_value(Unexpected::Signed(v), &self))
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<T, E> {
        T::try_from(v).map_err(|_| E::invalid_value(Unexpected::Unsigned(v), &self))
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<T, E> {
        if v.fract() == 0.0 && v.abs() < 9.0e15 {
            #[allow(clippy::cast_possible_truncation)]
            return self.visit_i64(v as i64);
        }
        Err(E::invalid_value(Unexpected::Float(v), &self))
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<T, E> {
        v.parse()
            .map_err(|_| E::invalid_value(Unexpected::Str(v), &self))
    }

    fn visit_unit<E: de::Error>(self) -> Result<T, E> {
        self.visit_i64(0)
    }
}

/// `int64` fields: a JSON string on output, a string or a number on input.
pub mod i64s {
    use super::*;

    pub fn serialize<S: Serializer>(v: &i64, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(v)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<i64, D::Error> {
        d.deserialize_any(IntVisitor(std::marker::PhantomData))
    }
}

/// 32-bit integers: numbers on output, numbers or strings on input.
pub mod int32 {
    use super::*;

    pub fn deserialize_u32<'de, D: Deserializer<'de>>(d: D) -> Result<u32, D::Error> {
        d.deserialize_any(IntVisitor(std::marker::PhantomData))
    }

    pub fn deserialize_i32<'de, D: Deserializer<'de>>(d: D) -> Result<i32, D::Error> {
        d.deserialize_any(IntVisitor(std::marker::PhantomData))
    }
}

/// A protobuf enum known by number and by its proto name.
pub trait ProtoEnum: Sized + Copy {
    fn name(value: i32) -> Option<&'static str>;
    fn from_name(name: &str) -> Option<i32>;
}

pub fn enum_ser<E: ProtoEnum, S: Serializer>(v: &i32, s: S) -> Result<S::Ok, S::Error> {
    match E::name(*v) {
        Some(name) => s.serialize_str(name),
        None => s.serialize_i32(*v),
    }
}

pub fn enum_de<'de, E: ProtoEnum, D: Deserializer<'de>>(d: D) -> Result<i32, D::Error> {
    struct V<E>(std::marker::PhantomData<E>);
    impl<E: ProtoEnum> Visitor<'_> for V<E> {
        type Value = i32;
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("an enum name or number")
        }
        fn visit_str<Er: de::Error>(self, v: &str) -> Result<i32, Er> {
            E::from_name(v).ok_or_else(|| Er::invalid_value(Unexpected::Str(v), &self))
        }
        fn visit_i64<Er: de::Error>(self, v: i64) -> Result<i32, Er> {
            i32::try_from(v).map_err(|_| Er::invalid_value(Unexpected::Signed(v), &self))
        }
        fn visit_u64<Er: de::Error>(self, v: u64) -> Result<i32, Er> {
            i32::try_from(v).map_err(|_| Er::invalid_value(Unexpected::Unsigned(v), &self))
        }
        fn visit_unit<Er: de::Error>(self) -> Result<i32, Er> {
            Ok(0)
        }
    }
    d.deserialize_any(V::<E>(std::marker::PhantomData))
}

/// Declares a protobuf enum with its wire names.
macro_rules! proto_enum {
    ($(#[$m:meta])* $name:ident { $($variant:ident = $value:expr => $wire:literal,)+ }) => {
        $(#[$m])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, ::prost::Enumeration)]
        #[repr(i32)]
        pub enum $name { $($variant = $value,)+ }

        impl $crate::json::ProtoEnum for $name {
            fn name(value: i32) -> Option<&'static str> {
                match value { $($value => Some($wire),)+ _ => None }
            }
            fn from_name(name: &str) -> Option<i32> {
                match name { $($wire => Some($value),)+ _ => None }
            }
        }
    };
}
pub(crate) use proto_enum;

/// RFC 3339 (UTC) rendering of a protobuf `Timestamp`.
pub fn format_rfc3339(seconds: i64, nanos: i32) -> String {
    let secs = u64::try_from(seconds).unwrap_or(0);
    let nanos = u32::try_from(nanos).unwrap_or(0);
    let t = std::time::UNIX_EPOCH + std::time::Duration::new(secs, nanos);
    if nanos == 0 {
        humantime::format_rfc3339_seconds(t).to_string()
    } else {
        humantime::format_rfc3339_nanos(t).to_string()
    }
}

/// Parses an RFC 3339 timestamp (any offset-free `Z` form humantime accepts).
pub fn parse_rfc3339(s: &str) -> Option<(i64, i32)> {
    let t = humantime::parse_rfc3339_weak(s).ok()?;
    let d = t.duration_since(std::time::UNIX_EPOCH).ok()?;
    Some((
        i64::try_from(d.as_secs()).ok()?,
        i32::try_from(d.subsec_nanos()).ok()?,
    ))
}
