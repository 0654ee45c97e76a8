//! File-system helpers: nothing half-written is ever left at a final path.

use anyhow::{Context, Result};
use std::io::Write;
use std::path::Path;

/// Writes `bytes` to `path` through a temp file in the same directory and an atomic rename,
/// creating the directory if needed.
pub(crate) fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = parent_dir(path);
    std::fs::create_dir_all(dir).with_context(|| format!("Cannot create {}", dir.display()))?;
    write_through_temp(path, bytes, None)
}

/// Writes `bytes` to `path`, mode 0600 (it may hold secrets), through a temp file in the same
/// directory and an atomic rename: `path` is the whole new file or untouched, never partial.
/// The directory must exist (it is the user's choice of output).
pub(crate) fn write_private(path: &Path, bytes: &[u8]) -> Result<()> {
    write_through_temp(path, bytes, Some(0o600))
}

/// The directory a relative file name without one lives in: `.`.
fn parent_dir(path: &Path) -> &Path {
    path.parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
}

/// A temp file beside `path` (created with `mode`, else the default), synced, renamed over it.
fn write_through_temp(path: &Path, bytes: &[u8], mode: Option<u32>) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let dir = parent_dir(path);
    let mut builder = tempfile::Builder::new();
    builder.prefix(".fuse-");
    if let Some(mode) = mode {
        builder.permissions(std::fs::Permissions::from_mode(mode));
    }
    let mut tmp = builder
        .tempfile_in(dir)
        .with_context(|| format!("Cannot write in {}", dir.display()))?;
    tmp.write_all(bytes)
        .and_then(|()| tmp.as_file().sync_all())
        .with_context(|| format!("Cannot write {}", path.display()))?;
    tmp.persist(path)
        .with_context(|| format!("Cannot write {}", path.display()))?;
    Ok(())
}

/// A human size: 1.2 MB, 340 KB, 12 B (decimal units, as image sizes are quoted).
pub(crate) fn human_size(bytes: u64) -> String {
    const UNITS: [&str; 4] = ["KB", "MB", "GB", "TB"];
    if bytes < 1000 {
        return format!("{bytes} B");
    }
    let mut value = bytes as f64 / 1000.0;
    let mut unit = 0;
    while value >= 1000.0 && unit < UNITS.len() - 1 {
        value /= 1000.0;
        unit += 1;
    }
    format!("{value:.1} {}", UNITS[unit])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn private_write_is_0600_and_replaces() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("user-data");
        std::fs::write(&path, "old").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        write_private(&path, b"new").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"new");
        let mode = path.metadata().unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
        assert!(write_private(&dir.path().join("missing/x"), b"x").is_err());
    }

    #[test]
    fn atomic_write_replaces_content() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a/b.txt");
        write_atomic(&path, b"one").unwrap();
        write_atomic(&path, b"two").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"two");
        assert_eq!(
            std::fs::read_dir(path.parent().unwrap()).unwrap().count(),
            1
        );
    }

    #[test]
    fn sizes_read_like_people_write_them() {
        assert_eq!(human_size(12), "12 B");
        assert_eq!(human_size(3_400_000), "3.4 MB");
        assert_eq!(human_size(48_000_000_000), "48.0 GB");
    }
}
