//! What kind of app an input is, decided from the input itself.

use anyhow::{bail, Context, Result};
use std::io::Read;
use std::path::Path;

/// The payload kinds fuse can package.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    /// A Linux ELF executable (static or dynamic), packaged with its shared-library closure.
    Native,
    /// An executable jar (`Main-Class`), packaged with a jlink runtime made for it.
    Jvm,
    /// A Node.js app: a `.js` file, or a directory with `package.json` and its `node_modules`.
    Node,
    /// A Python app: a `.py` file, or a directory with `__main__.py` or `pyproject.toml`.
    Python,
}

impl Kind {
    /// Every kind, for `--kind` and messages.
    pub(crate) const ALL: &'static [Kind] = &[Kind::Native, Kind::Jvm, Kind::Node, Kind::Python];

    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Kind::Native => "native",
            Kind::Node => "node",
            Kind::Python => "python",
            Kind::Jvm => "jvm",
        }
    }
}

impl std::str::FromStr for Kind {
    type Err = String;

    /// The `--kind` names: what [`Kind::as_str`] gives.
    fn from_str(s: &str) -> std::result::Result<Kind, String> {
        Kind::ALL
            .iter()
            .copied()
            .find(|k| k.as_str() == s)
            .ok_or_else(|| {
                let names: Vec<&str> = Kind::ALL.iter().map(|k| k.as_str()).collect();
                format!("unknown kind '{s}': use one of {}", names.join(", "))
            })
    }
}

/// Detects the payload kind of `input`, or says clearly why it cannot be packaged.
pub(crate) fn detect(input: &Path) -> Result<Kind> {
    let meta = std::fs::metadata(input).with_context(|| {
        format!(
            "App {} not found: give the path of the program to package",
            input.display()
        )
    })?;
    if meta.is_dir() {
        if let Some(kind) = detect_dir(input) {
            return Ok(kind);
        }
        bail!(
            "{} is a directory without an entry point (package.json, __main__.py or pyproject.toml): give the program to run instead",
            input.display()
        );
    }
    if let Some(kind) = detect_script(input) {
        return Ok(kind);
    }
    let mut magic = [0u8; 4];
    let n = std::fs::File::open(input)
        .and_then(|mut f| f.read(&mut magic))
        .with_context(|| format!("Cannot read {}", input.display()))?;
    if n == 4 && magic == *b"\x7fELF" {
        return Ok(Kind::Native);
    }
    if crate::build::runtimes::jar::looks_like_jar(input, &magic[..n]) {
        return Ok(Kind::Jvm);
    }
    bail!(
        "{} is not an app fuse can package: expected an ELF executable, an executable jar, a .js or .py script, or an app directory",
        input.display()
    )
}

/// A directory app, by the file that says how to start it.
fn detect_dir(dir: &Path) -> Option<Kind> {
    if dir.join("package.json").is_file() {
        Some(Kind::Node)
    } else if dir.join("__main__.py").is_file() || dir.join("pyproject.toml").is_file() {
        Some(Kind::Python)
    } else {
        None
    }
}

/// A script, by its extension (what `node` and `python3` themselves go by).
fn detect_script(file: &Path) -> Option<Kind> {
    match file.extension()?.to_str()? {
        "js" | "mjs" | "cjs" => Some(Kind::Node),
        "py" => Some(Kind::Python),
        _ => None,
    }
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

    #[test]
    fn scripts_and_app_directories_are_recognised() {
        let dir = tempfile::tempdir().unwrap();
        let write = |name: &str| {
            let path = dir.path().join(name);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(&path, "").unwrap();
            path
        };
        assert_eq!(detect(&write("server.js")).unwrap(), Kind::Node);
        assert_eq!(detect(&write("esm.mjs")).unwrap(), Kind::Node);
        assert_eq!(detect(&write("app.py")).unwrap(), Kind::Python);
        write("web/package.json");
        assert_eq!(detect(&dir.path().join("web")).unwrap(), Kind::Node);
        write("tool/__main__.py");
        assert_eq!(detect(&dir.path().join("tool")).unwrap(), Kind::Python);
        write("proj/pyproject.toml");
        assert_eq!(detect(&dir.path().join("proj")).unwrap(), Kind::Python);
    }
}
