//! Serde through a type's text form (`Display` to write, `FromStr` to read), for the foreign
//! types fuse records: `#[serde(with = "crate::host::serde_text::one")]`, or `many` for a
//! `Vec`.

use serde::{Deserialize, Deserializer, Serializer};
use std::fmt::Display;
use std::str::FromStr;

/// One value as its text.
pub(crate) mod one {
    use super::*;

    pub(crate) fn serialize<T: Display, S: Serializer>(value: &T, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(value)
    }

    pub(crate) fn deserialize<'de, T, D>(d: D) -> Result<T, D::Error>
    where
        T: FromStr,
        T::Err: Display,
        D: Deserializer<'de>,
    {
        String::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

/// A list of values as a list of texts.
pub(crate) mod many {
    use super::*;

    pub(crate) fn serialize<T: Display, S: Serializer>(
        values: &[T],
        s: S,
    ) -> Result<S::Ok, S::Error> {
        s.collect_seq(values.iter().map(|v| v.to_string()))
    }

    pub(crate) fn deserialize<'de, T, D>(d: D) -> Result<Vec<T>, D::Error>
    where
        T: FromStr,
        T::Err: Display,
        D: Deserializer<'de>,
    {
        Vec::<String>::deserialize(d)?
            .iter()
            .map(|v| v.parse().map_err(serde::de::Error::custom))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use fuse_rootfs::Arch;
    use serde::{Deserialize, Serialize};

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct Record {
        #[serde(with = "super::one")]
        arch: Arch,
        #[serde(with = "super::many")]
        arches: Vec<Arch>,
    }

    #[test]
    fn round_trips_through_text() {
        let r = Record {
            arch: Arch::Aarch64,
            arches: vec![Arch::X86_64, Arch::Aarch64],
        };
        let text = serde_json::to_string(&r).unwrap();
        assert_eq!(text, r#"{"arch":"aarch64","arches":["x86_64","aarch64"]}"#);
        assert_eq!(serde_json::from_str::<Record>(&text).unwrap(), r);
        assert!(serde_json::from_str::<Record>(r#"{"arch":"mips","arches":[]}"#).is_err());
    }
}
