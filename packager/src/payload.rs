//! What kind of app an input is, decided from the input itself.

use anyhow::{bail, Context, Result};
use std::io::Read;
use std::path::Path;

/// The payload kinds fuse can package.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A Linux ELF executable (static or dynamic), packaged with its shared-library closure.
    Native,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Native => "native",
        }
    }
}

/// Detects the payload kind of `input`, or says clearly why it cannot be packaged.
pub fn detect(input: &Path) -> Result<Kind> {
    let meta = std::fs::metadata(input).with_context(|| {
        format!(
            "App {} not found: give the path of the program to package",
            input.display()
        )
    })?;
    if meta.is_dir() {
        bail!(
            "{} is a directory without an entry point: give the program to run (an ELF executable) instead",
            input.display()
        );
    }
    let mut magic = [0u8; 4];
    let n = std::fs::File::open(input)
        .and_then(|mut f| f.read(&mut magic))
        .with_context(|| format!("Cannot read {}", input.display()))?;
    if n == 4 && magic == *b"\x7fELF" {
        return Ok(Kind::Native);
    }
    bail!(
        "{} is not an app fuse can package: expected an ELF executable",
        input.display()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inputs_are_classified_or_refused_clearly() {
        let dir = tempfile::tempdir().unwrap();
        let text = dir.path().join("notes.txt");
        std::fs::write(&text, "hello").unwrap();
        let err = detect(&text).unwrap_err().to_string();
        assert!(err.contains("not an app fuse can package"), "{err}");
        let err = detect(dir.path()).unwrap_err().to_string();
        assert!(err.contains("directory without an entry point"), "{err}");
        let err = detect(&dir.path().join("missing")).unwrap_err().to_string();
        assert!(err.contains("not found"), "{err}");
        assert_eq!(detect(Path::new("/bin/true")).unwrap(), Kind::Native);
    }
}
