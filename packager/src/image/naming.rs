//! Image names the Boxfuse way: `hello-1.0` (or `hello-1.0.jar`) becomes `hello:1.0`.

use anyhow::{bail, Result};
use std::path::Path;

/// An image's name and version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ImageName {
    pub(crate) name: String,
    pub(crate) version: String,
}

impl std::fmt::Display for ImageName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.name, self.version)
    }
}

/// Extensions that are not part of an image name.
const PAYLOAD_EXTENSIONS: [&str; 6] = ["jar", "war", "js", "py", "bin", "elf"];

/// The name derived from an input path: the file name without a payload extension, split at the
/// last `-` that is followed by a digit; no version gives `latest`.
pub(crate) fn from_input(path: &Path) -> Result<ImageName> {
    let file_name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let stem = match file_name.rsplit_once('.') {
        Some((stem, ext)) if PAYLOAD_EXTENSIONS.contains(&ext) => stem.to_string(),
        _ => file_name.clone(),
    };
    let (name, version) = match stem
        .match_indices('-')
        .rev()
        .find(|(i, _)| stem[i + 1..].starts_with(|c: char| c.is_ascii_digit()))
    {
        Some((i, _)) => (stem[..i].to_string(), stem[i + 1..].to_string()),
        None => (stem, "latest".to_string()),
    };
    let name = sanitise(&name);
    validate(&name, &version).map_err(|e| {
        anyhow::anyhow!(
            "Cannot derive an image name from '{file_name}': {e}; pass --name NAME:VERSION"
        )
    })?;
    Ok(ImageName { name, version })
}

/// Parses `name[:version]` as given to `--name` or on the command line.
pub(crate) fn parse(reference: &str) -> Result<ImageName> {
    let (name, version) = reference.split_once(':').unwrap_or((reference, "latest"));
    validate(name, version)?;
    Ok(ImageName {
        name: name.to_string(),
        version: version.to_string(),
    })
}

fn sanitise(name: &str) -> String {
    name.to_ascii_lowercase()
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '.' {
                c
            } else {
                '-'
            }
        })
        .collect()
}

fn validate(name: &str, version: &str) -> Result<()> {
    let name_ok = !name.is_empty()
        && name.len() <= 64
        && name.starts_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit())
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.');
    if !name_ok {
        bail!("invalid image name '{name}' (lowercase letters, digits, '-' and '.', at most 64)");
    }
    // `.` and `..` would name the ref's own directory or its parent in the store.
    let version_ok = !version.is_empty()
        && version.len() <= 64
        && version != "."
        && version != ".."
        && version
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.' || c == '_');
    if !version_ok {
        bail!(
            "invalid image version '{version}' (letters, digits, '-', '_' and '.', not '.' or \
             '..', at most 64)"
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn derived(path: &str) -> String {
        from_input(Path::new(path)).unwrap().to_string()
    }

    #[test]
    fn names_follow_the_input_file() {
        assert_eq!(derived("/x/hello-1.0"), "hello:1.0");
        assert_eq!(derived("hello-1.0.jar"), "hello:1.0");
        assert_eq!(
            derived("my-app-2.3.1-SNAPSHOT.jar"),
            "my-app:2.3.1-SNAPSHOT"
        );
        assert_eq!(derived("hello"), "hello:latest");
        assert_eq!(derived("Hello_World"), "hello-world:latest");
    }

    #[test]
    fn references_parse_and_bad_ones_are_refused() {
        assert_eq!(parse("api:2").unwrap().to_string(), "api:2");
        assert_eq!(parse("api").unwrap().version, "latest");
        assert!(parse("Api:1").is_err());
        assert!(parse("api:1/2").is_err());
        for bad in ["api:.", "api:..", ".:1", "..:1", "../x:1", "a/b:1", "api:"] {
            assert!(parse(bad).is_err(), "{bad}");
        }
        assert!(parse("api:1.0..2").is_ok());
        assert!(from_input(Path::new("-1.0")).is_err());
    }
}
