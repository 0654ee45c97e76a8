//! Copying an app's own directory into the image, for the script runtimes (Node.js, Python).
//!
//! The walk is sorted (the same directory always gives the same tree), version-control data is
//! never copied, and symlinks are kept only when they stay inside the app: a link to
//! `/home/me/secrets` or `../../shared` would either dangle in the image or silently pull host
//! files in, so it is refused. Kept links are rewritten relative to their own directory, so an
//! absolute link into the app (`/home/me/app/lib`) still resolves once the app is at `/app`.

use anyhow::{bail, Context, Result};
use fuse_rootfs::tree::{self, Tree};
use std::os::unix::fs::PermissionsExt;
use std::path::{Component, Path, PathBuf};

/// Directory names never copied from an app: version control, which no app reads at run time.
const VCS_DIRS: &[&str] = &[".git", ".hg", ".svn"];

/// Whether an entry of the app directory is copied. Gets the path relative to the app root
/// (`node_modules/x`, `/`-separated) and whether it is a directory.
pub(crate) type Filter<'a> = dyn FnMut(&str, bool) -> bool + 'a;

/// What was copied.
#[derive(Debug, Default, Clone)]
pub(crate) struct CopyStats {
    pub(crate) files: u64,
    pub(crate) bytes: u64,
    /// Every regular file copied that is an ELF (by its magic, whatever its name), in walk
    /// order: compiled extensions and addons, whose libraries must come along.
    pub(crate) elves: Vec<AppElf>,
}

/// An ELF file of the app: where it is on the host and where it went in the image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct AppElf {
    pub(crate) host: PathBuf,
    pub(crate) image: String,
}

/// Copies the app directory `host_root` to `image_root` (`/app`), skipping VCS directories and
/// whatever `keep` refuses.
pub(crate) fn add_app_dir(
    tree: &mut Tree,
    host_root: &Path,
    image_root: &str,
    keep: &mut Filter<'_>,
) -> Result<CopyStats> {
    // Symlink checks compare real paths: the root must be real too.
    let root = host_root
        .canonicalize()
        .with_context(|| format!("Cannot read the app directory {}", host_root.display()))?;
    let mut stats = CopyStats::default();
    tree.add_dir(image_root, tree::DEFAULT_DIR_MODE)?;
    copy_dir(tree, &root, &root, image_root, keep, &mut stats)?;
    Ok(stats)
}

fn copy_dir(
    tree: &mut Tree,
    root: &Path,
    dir: &Path,
    image_dir: &str,
    keep: &mut Filter<'_>,
    stats: &mut CopyStats,
) -> Result<()> {
    let mut entries = std::fs::read_dir(dir)
        .and_then(|d| d.collect::<std::io::Result<Vec<_>>>())
        .with_context(|| format!("Cannot read {}", dir.display()))?;
    entries.sort_by_key(|e| e.file_name());
    for entry in entries {
        let host = entry.path();
        let name = entry
            .file_name()
            .into_string()
            .map_err(|_| anyhow::anyhow!("File name {} is not UTF-8: rename it", host.display()))?;
        let rel = relative(root, &host);
        let file_type = entry
            .file_type()
            .with_context(|| format!("Cannot read {}", host.display()))?;
        if file_type.is_dir() && VCS_DIRS.contains(&name.as_str()) {
            continue;
        }
        if !keep(&rel, file_type.is_dir()) {
            continue;
        }
        let image = tree::join(image_dir, &name);
        if file_type.is_symlink() {
            let target = inside_target(root, &host)?;
            tree.add_symlink(&image, &target)?;
        } else if file_type.is_dir() {
            tree.add_dir(&image, tree::DEFAULT_DIR_MODE)?;
            copy_dir(tree, root, &host, &image, keep, stats)?;
        } else if file_type.is_file() {
            let meta = entry
                .metadata()
                .with_context(|| format!("Cannot read {}", host.display()))?;
            // Only "executable or not" survives: the host's umask and group bits do not leak.
            let mode = if meta.permissions().mode() & 0o100 != 0 {
                0o755
            } else {
                0o644
            };
            if is_elf(&host) {
                stats.elves.push(AppElf {
                    host: host.clone(),
                    image: image.clone(),
                });
            }
            tree.add_host_file(&image, &host, mode)?;
            stats.files += 1;
            stats.bytes += meta.len();
        } else {
            bail!(
                "{} is not a regular file, directory or symlink: remove it from the app directory",
                host.display()
            );
        }
    }
    Ok(())
}

/// Whether `path` starts with the ELF magic. Unreadable files are not ELF here: copying them
/// reports the error.
pub(crate) fn is_elf(path: &Path) -> bool {
    use std::io::Read;
    let mut magic = [0u8; 4];
    std::fs::File::open(path)
        .and_then(|mut f| f.read_exact(&mut magic))
        .is_ok_and(|()| magic == *b"\x7fELF")
}

/// `path` relative to `root`, `/`-separated.
fn relative(root: &Path, path: &Path) -> String {
    path.strip_prefix(root)
        .unwrap_or(path)
        .to_string_lossy()
        .into_owned()
}

/// The target to store for the symlink `link` (under `root`): relative to the link's
/// directory, or an error when it points outside `root`.
fn inside_target(root: &Path, link: &Path) -> Result<String> {
    let raw =
        std::fs::read_link(link).with_context(|| format!("Cannot read {}", link.display()))?;
    let parent = link.parent().unwrap_or(root);
    // A live link is judged by where it really ends up (through any chain of links); a
    // dangling one by its text.
    let resolved = match link.canonicalize() {
        Ok(real) => real,
        Err(_) => normalize(&parent.join(&raw)),
    };
    let Ok(inside) = resolved.strip_prefix(root) else {
        bail!(
            "Symlink {} points outside the app directory (to {}): copy the file into the app or remove the link",
            link.display(),
            raw.display()
        );
    };
    // The shortest relative path from the link's directory: up to the common ancestor, down.
    let from: Vec<Component> = parent
        .strip_prefix(root)
        .unwrap_or(Path::new(""))
        .components()
        .collect();
    let to: Vec<Component> = inside.components().collect();
    let common = from.iter().zip(&to).take_while(|(a, b)| a == b).count();
    let mut target = PathBuf::new();
    for _ in common..from.len() {
        target.push("..");
    }
    for c in &to[common..] {
        target.push(c);
    }
    let target = target.to_string_lossy().into_owned();
    Ok(if target.is_empty() {
        ".".into()
    } else {
        target
    })
}

/// Lexically resolves `.` and `..` (for dangling links, which cannot be canonicalised).
fn normalize(path: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for c in path.components() {
        match c {
            Component::ParentDir => {
                out.pop();
            }
            Component::CurDir => {}
            other => out.push(other),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use fuse_rootfs::tree::Node;
    use std::os::unix::fs::symlink;

    #[test]
    fn copies_sorted_skips_vcs_and_keeps_inside_links_relative() {
        let dir = tempfile::tempdir().unwrap();
        let app = dir.path().join("app");
        std::fs::create_dir_all(app.join(".git/objects")).unwrap();
        std::fs::create_dir_all(app.join("lib/sub")).unwrap();
        std::fs::write(app.join(".git/HEAD"), "ref").unwrap();
        std::fs::write(app.join("lib/sub/a.js"), "a").unwrap();
        std::fs::write(app.join("main.js"), "m").unwrap();
        symlink("sub/a.js", app.join("lib/rel")).unwrap();
        symlink(app.join("main.js"), app.join("lib/sub/abs")).unwrap();
        symlink("missing", app.join("dangling")).unwrap();
        let mut tree = Tree::new();
        let stats = add_app_dir(&mut tree, &app, "/app", &mut |_, _| true).unwrap();
        assert_eq!(stats.files, 2);
        assert!(!tree.contains("/app/.git"));
        assert!(
            matches!(tree.get("/app/lib/rel"), Some(Node::Symlink { target }) if target == "sub/a.js")
        );
        assert!(
            matches!(tree.get("/app/lib/sub/abs"), Some(Node::Symlink { target }) if target == "../../main.js")
        );
        assert!(
            matches!(tree.get("/app/dangling"), Some(Node::Symlink { target }) if target == "missing")
        );
    }

    #[test]
    fn elves_are_found_by_magic_not_by_name() {
        let dir = tempfile::tempdir().unwrap();
        let app = dir.path();
        std::fs::create_dir_all(app.join("pkg")).unwrap();
        std::fs::write(app.join("pkg/addon.bin"), b"\x7fELF\x02\x01\x01rest").unwrap();
        std::fs::write(app.join("pkg/fake.so"), "not an ELF").unwrap();
        std::fs::write(app.join("pkg/tiny.node"), b"\x7fE").unwrap();
        symlink("addon.bin", app.join("pkg/link.so")).unwrap();
        let mut tree = Tree::new();
        let copied = add_app_dir(&mut tree, app, "/app", &mut |_, _| true).unwrap();
        assert_eq!(
            copied.elves,
            vec![AppElf {
                host: app.canonicalize().unwrap().join("pkg/addon.bin"),
                image: "/app/pkg/addon.bin".into(),
            }]
        );
    }

    #[test]
    fn links_out_of_the_app_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let app = dir.path().join("app");
        std::fs::create_dir_all(&app).unwrap();
        std::fs::write(dir.path().join("secret"), "s").unwrap();
        symlink("../secret", app.join("leak")).unwrap();
        let err = add_app_dir(&mut Tree::new(), &app, "/app", &mut |_, _| true).unwrap_err();
        let msg = format!("{err:#}");
        assert!(msg.contains("points outside the app directory"), "{msg}");
        assert!(msg.contains("leak"), "{msg}");
    }

    #[test]
    fn filter_sees_relative_paths() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("node_modules/dev")).unwrap();
        std::fs::write(dir.path().join("node_modules/dev/x.js"), "x").unwrap();
        let mut tree = Tree::new();
        add_app_dir(&mut tree, dir.path(), "/app", &mut |rel, _| {
            rel != "node_modules/dev"
        })
        .unwrap();
        assert!(tree.contains("/app/node_modules"));
        assert!(!tree.contains("/app/node_modules/dev"));
    }
}
