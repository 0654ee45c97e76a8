//! fuse user-data: what one deployment selects and injects (the run overlay's values), as the
//! user-data a cloud hands the instance (a NoCloud seed disk's `user-data`, EC2's IMDS
//! `user-data`). The init reads it when no run overlay came through fw_cfg. `fuse userdata`
//! prints it; `fuse export --format nocloud` writes it into a seed disk (`image::seed`).
//!
//! One JSON object, UTF-8, written compact on one line with its keys in this order:
//! `{"fuse":1,"environment":"prod","env":{"K":"V"},"args":["a","b"]}`: `fuse` the format
//! version (required), `environment` a baked environment, `env` the injected variables (they
//! override the environment's), `args` the app's arguments (replacing the image's, after the
//! runtime launcher's own, as `fuse run IMAGE -- ARGS` does). Absent keys are left out.

use crate::image::manifest::Manifest;
use crate::run::overlay::{check_environment, Selection};
use anyhow::{Context, Result};
use fuse_boot::spec::USER_DATA_MAX;
use serde::ser::{SerializeMap, Serializer};
use serde::Serialize;

/// The format version (`"fuse"`).
pub(crate) const USER_DATA_VERSION: u32 = 1;

/// The user-data document, in its key order.
#[derive(Debug, Serialize)]
struct UserData<'a> {
    fuse: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    environment: Option<&'a str>,
    #[serde(skip_serializing_if = "Env::is_empty")]
    env: Env<'a>,
    #[serde(skip_serializing_if = "Option::is_none")]
    args: Option<&'a [String]>,
}

/// The injected variables as a JSON object, in the order given.
#[derive(Debug)]
struct Env<'a>(&'a [(String, String)]);

impl Env<'_> {
    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl Serialize for Env<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        let mut map = s.serialize_map(Some(self.0.len()))?;
        for (key, value) in self.0 {
            map.serialize_entry(key, value)?;
        }
        map.end()
    }
}

/// The user-data for a deployment of the image of `manifest` with `selection` (its variables
/// already deduplicated, a later one winning in the first one's place, as
/// [`Selection::from_flags`] makes them) and `args` (none: the key is left out, the image's
/// arguments stay). An environment the image does not have is refused, as by `fuse run`.
pub(crate) fn user_data(
    manifest: &Manifest,
    selection: &Selection,
    args: &[String],
) -> Result<String> {
    check_environment(manifest, selection.environment.as_deref())?;
    let doc = UserData {
        fuse: USER_DATA_VERSION,
        environment: selection.environment.as_deref(),
        env: Env(&selection.env),
        args: (!args.is_empty()).then_some(args),
    };
    let mut text = serde_json::to_string(&doc).context("Cannot write the user-data")?;
    text.push('\n');
    if text.len() > USER_DATA_MAX {
        anyhow::bail!(
            "The user-data would be {} KiB: the image's init reads at most {} KiB (EC2 takes 16 KB); inject large values as files on a volume instead",
            text.len().div_ceil(1024),
            USER_DATA_MAX / 1024
        );
    }
    Ok(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_data_over_what_the_init_reads_is_refused() {
        let m = manifest(&[]);
        let big = |n: usize| Selection {
            environment: None,
            env: vec![("K".into(), "x".repeat(n))],
        };
        assert!(user_data(&m, &big(60 * 1024), &[]).is_ok());
        let err = user_data(&m, &big(USER_DATA_MAX), &[]).unwrap_err();
        assert!(
            err.to_string()
                .contains("the image's init reads at most 64 KiB"),
            "{err}"
        );
    }

    fn manifest(envs: &[&str]) -> Manifest {
        let mut m = crate::image::manifest::tests::sample();
        m.config.environments = envs.iter().map(|s| s.to_string()).collect();
        m.config.default_environment = envs.first().map(|s| s.to_string());
        m
    }

    #[test]
    fn keys_in_order_and_absent_ones_left_out() {
        let m = manifest(&["dev", "prod"]);
        assert_eq!(
            user_data(&m, &Selection::default(), &[]).unwrap(),
            "{\"fuse\":1}\n"
        );
        let selection = Selection {
            environment: Some("prod".into()),
            env: vec![
                ("Z".into(), "last\nline \"quoted\" é".into()),
                ("A".into(), "1".into()),
            ],
        };
        let args = ["--port".to_string(), "8080".into()];
        let text = user_data(&m, &selection, &args).unwrap();
        assert_eq!(
            text,
            "{\"fuse\":1,\"environment\":\"prod\",\"env\":{\"Z\":\"last\\nline \\\"quoted\\\" é\",\"A\":\"1\"},\"args\":[\"--port\",\"8080\"]}\n"
        );
        // One line, and JSON a parser reads back to the same values.
        assert_eq!(text.lines().count(), 1);
        let back: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(back["env"]["Z"], "last\nline \"quoted\" é");
        let only_args = user_data(&m, &Selection::default(), &args).unwrap();
        assert_eq!(only_args, "{\"fuse\":1,\"args\":[\"--port\",\"8080\"]}\n");
    }

    #[test]
    fn an_unknown_environment_is_refused() {
        let selection = Selection {
            environment: Some("staging".into()),
            ..Selection::default()
        };
        let err = user_data(&manifest(&["dev", "prod"]), &selection, &[])
            .unwrap_err()
            .to_string();
        assert!(err.contains("'staging' is not defined"), "{err}");
    }
}
