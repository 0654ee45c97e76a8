//! Node.js apps: the `node` binary with its shared-library closure, and the app with its
//! production `node_modules`, nothing else (no npm, no package caches, no dev dependencies).
//!
//! Input: a script (`server.js`, `.mjs`, `.cjs`), or a directory with `package.json` whose entry
//! is its `main`, else its `start` script when that is a plain `node <file>` (anything a shell
//! would have to run is refused: the image has no shell). The directory is taken as the user
//! installed it: `npm ci --omit=dev` is the way to get exactly the production dependencies.
//! Packages the lockfile marks as dev-only are left out even if installed (see
//! [`dev_only_packages`]).
//!
//! Image layout: `/usr/bin/node` (stripped), its libraries where the host's loader has them
//! (`/lib/...`, `/lib64/...`), the app at `/app` (a single script at `/app/<file>`). The spec runs
//! `node /app/<entry>` in `/app` with `NODE_ENV=production`. Native addons (`*.node`) and programs
//! in `node_modules` come with their libraries (see [`closure`]).

use super::app::{app_spec, default_env, resolve_closure, AppImage, RuntimeInput};
use super::appdir::{self, AppElf};
use super::closure;
use crate::build::layout;
use anyhow::{bail, Context, Result};
use fuse_rootfs::tree::Tree;
use serde_json::Value;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Where node goes in the image.
pub(crate) const NODE_PATH: &str = "/usr/bin/node";
/// The manifest note with `node --version`.
pub(crate) use crate::image::manifest::NOTE_NODE_VERSION as NOTE_VERSION;

pub(crate) fn assemble(
    input: &RuntimeInput<'_>,
    progress: &mut dyn FnMut(&str),
) -> Result<AppImage> {
    let mut tree = layout::skeleton()?;
    let (entry, elves) = add_app(&mut tree, input.input, progress)?;
    // Another arch (or --sysroot): node and its libraries come from the target's root; with no
    // --node, Debian's arm64 `nodejs` in fuse's sysroot (see `crate::host::sysroot`).
    let mut sysroot = if input.arch != fuse_rootfs::Arch::host() || input.sysroot.is_some() {
        let mut packages: Vec<&str> = if input.node.is_none() {
            vec!["nodejs"]
        } else {
            Vec::new()
        };
        packages.extend(input.packages.iter().map(String::as_str));
        crate::host::sysroot::for_build(input.arch, input.sysroot, &packages, progress)?
    } else {
        None
    };
    let node = match (input.node, &sysroot) {
        (None, Some(sysroot)) => find_node(Some(&sysroot.path.join("usr/bin/node")))?,
        _ => find_node(input.node)?,
    };
    let version = add_node(&mut tree, &node, input, &mut sysroot, progress)?;
    // Addons (`*.node`) and programs in node_modules, after node's own libraries, in the
    // sysroot as node's resolution left it.
    let mut options = input.closure_options();
    if let Some(sysroot) = &sysroot {
        options.sysroot = sysroot.path.clone();
    }
    closure::add_app_libraries(&mut tree, &elves, &options, progress)?;

    let entry = format!("{}/{entry}", layout::APP_DIR);
    let mut env = default_env(input.name);
    // Express and most frameworks switch off dev-time behaviour (verbose errors, template
    // recompilation) on this.
    env.push(("NODE_ENV".into(), "production".into()));
    let spec = app_spec(input, NODE_PATH.into(), vec!["node".into(), entry], env);
    let mut notes = vec![
        (NOTE_VERSION.into(), version),
        // `fuse run app -- ARGS` gives ARGS to the script, after `node /app/<entry>`.
        (crate::image::manifest::NOTE_FIXED_ARGS.into(), "1".into()),
    ];
    notes.extend(sysroot.iter().flat_map(|s| s.notes()));
    Ok(AppImage { tree, spec, notes })
}

/// Adds the app to `/app`; returns its entry file relative to `/app` and its ELF files.
fn add_app(
    tree: &mut Tree,
    input: &Path,
    progress: &mut dyn FnMut(&str),
) -> Result<(String, Vec<AppElf>)> {
    let meta = std::fs::metadata(input).with_context(|| {
        format!(
            "App {} not found: give a .js file or a directory with package.json",
            input.display()
        )
    })?;
    if !meta.is_dir() {
        let name = input
            .file_name()
            .and_then(|n| n.to_str())
            .with_context(|| format!("File name of {} is not UTF-8: rename it", input.display()))?;
        tree.add_host_file(&format!("{}/{name}", layout::APP_DIR), input, 0o644)?;
        return Ok((name.to_string(), Vec::new()));
    }

    if !input.join("package.json").exists() {
        bail!(
            "Directory {} has no package.json: give the app's .js file, or add a package.json whose \"main\" names it",
            input.display()
        );
    }
    let package = read_package_json(input)?;
    let entry = entry_point(input, &package)?;
    let skipped = dev_only_packages(input, &package)?;
    if !skipped.is_empty() {
        let names: Vec<&str> = skipped
            .iter()
            .map(|p| p.trim_start_matches("node_modules/"))
            .collect();
        progress(&format!(
            "leaving out {} dev-only package(s) installed in node_modules ({}): install with `npm ci --omit=dev` to match",
            skipped.len(),
            abbreviate(&names, 5)
        ));
    }
    check_dependencies_installed(input, &package)?;
    let copied = appdir::add_app_dir(tree, input, layout::APP_DIR, &mut |rel, is_dir| {
        keep_entry(rel, is_dir, &skipped)
    })?;
    Ok((entry, copied.elves))
}

/// Whether an entry of a Node app directory belongs in the image.
fn keep_entry(rel: &str, is_dir: bool, dev_only: &BTreeSet<String>) -> bool {
    let name = rel.rsplit('/').next().unwrap_or(rel);
    if is_dir && (name == ".npm" || name == ".cache") {
        // npm's download cache and the tool caches (babel, eslint, terser) that build tools
        // keep in node_modules/.cache: written by tools, never read by the app.
        return false;
    }
    if rel.ends_with("node_modules/.bin") {
        // Links to the packages' command-line tools, which start with `#!/usr/bin/env node`:
        // the image has no /usr/bin/env, so they cannot run there anyway.
        return false;
    }
    !dev_only.contains(rel)
}

fn read_package_json(dir: &Path) -> Result<Value> {
    let path = dir.join("package.json");
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("Cannot read {}: make it readable", path.display()))?;
    let value: Value = serde_json::from_str(&text).map_err(|e| {
        anyhow::anyhow!(
            "{}:{}:{} is not valid JSON ({}): fix the file",
            path.display(),
            e.line(),
            e.column(),
            strip_position(&e.to_string())
        )
    })?;
    if !value.is_object() {
        bail!("{} is not a JSON object: fix the file", path.display());
    }
    Ok(value)
}

/// serde_json's message without its own " at line L column C" (the location is given first).
fn strip_position(message: &str) -> &str {
    message.split(" at line ").next().unwrap_or(message)
}

/// The entry file, relative to the app directory: `main`, else a `start` script that is a plain
/// `node <file>`.
fn entry_point(dir: &Path, package: &Value) -> Result<String> {
    let manifest = dir.join("package.json");
    let (declared, source) = if let Some(main) = package.get("main").and_then(Value::as_str) {
        (main.to_string(), "\"main\"")
    } else if let Some(start) = package.pointer("/scripts/start").and_then(Value::as_str) {
        let file = plain_node_command(start).with_context(|| {
            format!(
                "{}: the start script '{start}' is not a plain `node <file>` (the image has no shell or npm): set \"main\" to the entry file",
                manifest.display()
            )
        })?;
        (file.to_string(), "start script")
    } else {
        bail!(
            "{} has no entry point: set \"main\" to the file to run (or a start script `node <file>`)",
            manifest.display()
        );
    };
    let relative = clean_relative(&declared).with_context(|| {
        format!(
            "{}: the {source} '{declared}' must be a path inside the app directory",
            manifest.display()
        )
    })?;
    // Node's own resolution of a package entry, as far as a file on disk goes.
    let candidates = [
        relative.clone(),
        format!("{relative}.js"),
        format!("{relative}.mjs"),
        format!("{relative}.cjs"),
        format!("{relative}/index.js"),
    ];
    candidates
        .into_iter()
        .find(|c| dir.join(c).is_file())
        .with_context(|| {
            format!(
                "Entry file '{declared}' (the {source} of {}) does not exist: create it or fix package.json",
                manifest.display()
            )
        })
}

/// The file of `node <file>`, when that is the whole command.
fn plain_node_command(command: &str) -> Option<&str> {
    let words: Vec<&str> = command.split_whitespace().collect();
    match words.as_slice() {
        ["node", file]
            if !file.starts_with('-')
                && !file.contains(|c: char| "&|;<>$`'\"()*?{}\\".contains(c)) =>
        {
            Some(file)
        }
        _ => None,
    }
}

/// `path` as a normalised relative path that stays inside its directory.
fn clean_relative(path: &str) -> Option<String> {
    if path.starts_with('/') {
        return None;
    }
    let mut parts: Vec<&str> = Vec::new();
    for part in path.split('/') {
        match part {
            "" | "." => {}
            ".." => {
                parts.pop()?;
            }
            p => parts.push(p),
        }
    }
    (!parts.is_empty()).then(|| parts.join("/"))
}

/// The installed packages (paths like `node_modules/a/node_modules/b`) that only dev
/// dependencies need.
///
/// With a lockfile (`package-lock.json`, else npm's hidden `node_modules/.package-lock.json`)
/// this is exact: npm marks every package reachable only through `devDependencies` with
/// `"dev": true`, which is what `npm ci --omit=dev` leaves out. Without one, only the direct
/// `devDependencies` that no other dependency list names are known to be dev-only; their own
/// dependencies cannot be told apart and stay. Leaving them out rather than just warning: code
/// that needs a dev-only package would fail the same way after `npm ci --omit=dev`, the
/// documented way to install for production, so the image matches a production install.
pub(crate) fn dev_only_packages(dir: &Path, package: &Value) -> Result<BTreeSet<String>> {
    for lock in ["package-lock.json", "node_modules/.package-lock.json"] {
        let path = dir.join(lock);
        if !path.is_file() {
            continue;
        }
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("Cannot read {}", path.display()))?;
        let value: Value = serde_json::from_str(&text).map_err(|e| {
            anyhow::anyhow!(
                "{}:{}:{} is not valid JSON ({}): fix it or delete it and run `npm install`",
                path.display(),
                e.line(),
                e.column(),
                strip_position(&e.to_string())
            )
        })?;
        // lockfileVersion 2 and 3 (npm 7+) have "packages"; npm 6's v1 files do not.
        if let Some(packages) = value.get("packages").and_then(Value::as_object) {
            return Ok(packages
                .iter()
                .filter(|(key, meta)| {
                    key.starts_with("node_modules/")
                        && meta.get("dev").and_then(Value::as_bool) == Some(true)
                        && dir.join(key).exists()
                })
                .map(|(key, _)| key.clone())
                .collect());
        }
    }
    let names = |field: &str| -> BTreeSet<String> {
        package
            .get(field)
            .and_then(Value::as_object)
            .map(|o| o.keys().cloned().collect())
            .unwrap_or_default()
    };
    let mut production = names("dependencies");
    production.extend(names("optionalDependencies"));
    production.extend(names("peerDependencies"));
    Ok(names("devDependencies")
        .into_iter()
        .filter(|n| !production.contains(n))
        .map(|n| format!("node_modules/{n}"))
        .filter(|p| dir.join(p).exists())
        .collect())
}

/// Refuses an app whose `dependencies` are not installed: it would only fail at `require`.
fn check_dependencies_installed(dir: &Path, package: &Value) -> Result<()> {
    let Some(deps) = package.get("dependencies").and_then(Value::as_object) else {
        return Ok(());
    };
    if let Some(missing) = deps
        .keys()
        .find(|n| !dir.join("node_modules").join(n).exists())
    {
        bail!(
            "Dependency '{missing}' of {} is not installed in node_modules: run `npm ci --omit=dev` in {}",
            dir.join("package.json").display(),
            dir.display()
        );
    }
    Ok(())
}

fn abbreviate(names: &[&str], max: usize) -> String {
    let mut shown = names
        .iter()
        .take(max)
        .copied()
        .collect::<Vec<_>>()
        .join(", ");
    if names.len() > max {
        shown.push_str(&format!(", and {} more", names.len() - max));
    }
    shown
}

/// The node binary: `--node`, else `node` (or Debian's `nodejs`) on PATH, symlinks resolved.
fn find_node(given: Option<&Path>) -> Result<PathBuf> {
    if let Some(path) = given {
        if !path.is_file() {
            bail!(
                "Node.js binary {} given with --node does not exist: give the path of a node executable",
                path.display()
            );
        }
        return path
            .canonicalize()
            .with_context(|| format!("Cannot read {}", path.display()));
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    for name in ["node", "nodejs"] {
        for dir in std::env::split_paths(&path) {
            let candidate = dir.join(name);
            if candidate.is_file() {
                return candidate
                    .canonicalize()
                    .with_context(|| format!("Cannot read {}", candidate.display()));
            }
        }
    }
    bail!("Node.js not found on PATH: install it (Debian: apt-get install nodejs) or give --node PATH")
}

/// Adds node (stripped) and its libraries; returns `node --version`.
fn add_node(
    tree: &mut Tree,
    node: &Path,
    input: &RuntimeInput<'_>,
    sysroot: &mut Option<crate::host::sysroot::Sysroot>,
    progress: &mut dyn FnMut(&str),
) -> Result<String> {
    let mut options = input.closure_options();
    if let Some(sysroot) = sysroot.as_ref() {
        options.sysroot = sysroot.path.clone();
        // Debian's node loads some of its built-in modules from these files at run time (its
        // `--shared-builtin-*-path`s); the rest of their packages (6.8 MB) is never read.
        for file in DEBIAN_SHARED_BUILTINS {
            let host = sysroot.path.join(file.trim_start_matches('/'));
            if host.is_file() {
                tree.add_host_file(file, &host, 0o644)?;
            }
        }
    }
    let closure = resolve_closure(input.arch, node, NODE_PATH, &mut options, sysroot, progress)?;
    let version = match sysroot.as_ref().and_then(|s| s.packages.get("nodejs")) {
        // A foreign node cannot run here: its Debian version says which it is.
        Some(package) if input.arch != fuse_rootfs::Arch::host() => debian_node_version(package),
        _ if input.arch != fuse_rootfs::Arch::host() => "unknown".to_string(),
        _ => node_version(node)?,
    };
    match strip(node, input.arch) {
        Ok(bytes) => tree.add_bytes(NODE_PATH, bytes, 0o755)?,
        Err(err) => {
            progress(&format!(
                "node is packaged unstripped ({err:#}): install binutils for a smaller image"
            ));
            tree.add_host_file(NODE_PATH, node, 0o755)?;
        }
    }
    if let Some(interp) = &closure.interpreter {
        tree.add_host_file(&interp.image_path, &interp.host_path, 0o755)?;
    }
    for lib in &closure.libraries {
        tree.add_host_file(&lib.image_path, &lib.host_path, 0o644)?;
    }
    Ok(version)
}

/// The built-in modules Debian's node (18, bookworm) reads from files, as its libnode names them.
const DEBIAN_SHARED_BUILTINS: [&str; 5] = [
    "/usr/share/nodejs/acorn/dist/acorn.js",
    "/usr/share/nodejs/acorn-walk/dist/walk.js",
    "/usr/share/nodejs/cjs-module-lexer/lexer.js",
    "/usr/share/nodejs/cjs-module-lexer/dist/lexer.js",
    "/usr/share/nodejs/undici/undici-fetch.js",
];

/// `v18.20.4` from Debian's package version `18.20.4+dfsg-1~deb12u3`.
fn debian_node_version(package: &str) -> String {
    let upstream = package.rsplit_once(':').map_or(package, |(_, v)| v);
    let upstream = upstream.split(['+', '-', '~']).next().unwrap_or(upstream);
    format!("v{upstream}")
}

/// `node --version` (`v20.11.1`).
fn node_version(node: &Path) -> Result<String> {
    let out = Command::new(node)
        .arg("--version")
        .output()
        .with_context(|| {
            format!(
                "Cannot run {} --version: give a working node with --node",
                node.display()
            )
        })?;
    let version = String::from_utf8_lossy(&out.stdout).trim().to_string();
    if !out.status.success() || !version.starts_with('v') {
        bail!(
            "{} --version failed ({}): give a working node with --node",
            node.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(version)
}

/// node without its symbol table and debug info. Release builds from nodesource and nodejs.org
/// ship both (~13 MB, 2.5 MB compressed) and the image never needs them: crash reports and
/// native addons use the dynamic symbol table, which stays. `strip` is deterministic, so the
/// same node gives the same bytes.
fn strip(node: &Path, arch: fuse_rootfs::Arch) -> Result<Vec<u8>> {
    let scratch = tempfile::tempdir().context("Cannot create a temporary directory")?;
    let out = scratch.path().join("node");
    // The host's strip only knows the host's arch: binutils-aarch64-linux-gnu has the other.
    let program = if arch == fuse_rootfs::Arch::host() {
        "strip".to_string()
    } else {
        format!("{}-strip", arch.gnu_triple())
    };
    let result = Command::new(&program)
        .arg("--strip-all")
        .arg("-o")
        .arg(&out)
        .arg(node)
        .output()
        .with_context(|| format!("Cannot run {program}"))?;
    if !result.status.success() {
        bail!(
            "strip failed: {}",
            String::from_utf8_lossy(&result.stderr).trim()
        );
    }
    std::fs::read(&out).with_context(|| format!("Cannot read {}", out.display()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn start_script_must_be_plain_node() {
        assert_eq!(plain_node_command("node server.js"), Some("server.js"));
        assert_eq!(
            plain_node_command("  node   lib/app.js "),
            Some("lib/app.js")
        );
        for bad in [
            "nodemon server.js",
            "node --inspect server.js",
            "node a.js && node b.js",
            "NODE_ENV=x node a.js",
            "node",
            "node $FILE",
        ] {
            assert_eq!(plain_node_command(bad), None, "{bad}");
        }
    }

    #[test]
    fn relative_entries_stay_inside() {
        assert_eq!(
            clean_relative("./lib/../server.js").as_deref(),
            Some("server.js")
        );
        assert_eq!(clean_relative("/etc/passwd"), None);
        assert_eq!(clean_relative("../x.js"), None);
        assert_eq!(clean_relative("."), None);
    }

    #[test]
    fn entry_follows_main_then_start_and_node_resolution() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("lib")).unwrap();
        std::fs::write(dir.path().join("lib/index.js"), "").unwrap();
        std::fs::write(dir.path().join("server.js"), "").unwrap();
        let entry = |v: Value| entry_point(dir.path(), &v);
        assert_eq!(entry(json!({"main": "lib"})).unwrap(), "lib/index.js");
        assert_eq!(entry(json!({"main": "server"})).unwrap(), "server.js");
        assert_eq!(
            entry(json!({"scripts": {"start": "node server.js"}})).unwrap(),
            "server.js"
        );
        let err = format!("{:#}", entry(json!({"name": "x"})).unwrap_err());
        assert!(err.contains("has no entry point"), "{err}");
        let err = format!("{:#}", entry(json!({"main": "gone.js"})).unwrap_err());
        assert!(
            err.contains("'gone.js'") && err.contains("does not exist"),
            "{err}"
        );
        let err = format!(
            "{:#}",
            entry(json!({"scripts": {"start": "nodemon server.js"}})).unwrap_err()
        );
        assert!(err.contains("not a plain `node <file>`"), "{err}");
    }

    #[test]
    fn invalid_package_json_gives_line_and_column() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("package.json"),
            "{\n  \"main\": \"a.js\",\n}\n",
        )
        .unwrap();
        let err = format!("{:#}", read_package_json(dir.path()).unwrap_err());
        assert!(err.contains("package.json:3:1 is not valid JSON"), "{err}");
    }

    #[test]
    fn dev_only_packages_from_the_lockfile_or_package_json() {
        let dir = tempfile::tempdir().unwrap();
        for p in [
            "node_modules/prod",
            "node_modules/devtool",
            "node_modules/devdep-of-dev",
        ] {
            std::fs::create_dir_all(dir.path().join(p)).unwrap();
        }
        let package = json!({
            "dependencies": {"prod": "1"},
            "devDependencies": {"devtool": "1"}
        });
        let without_lock = dev_only_packages(dir.path(), &package).unwrap();
        assert_eq!(
            without_lock.into_iter().collect::<Vec<_>>(),
            ["node_modules/devtool"]
        );
        let lock = json!({"lockfileVersion": 3, "packages": {
            "": {"name": "app"},
            "node_modules/prod": {"version": "1"},
            "node_modules/devtool": {"version": "1", "dev": true},
            "node_modules/devdep-of-dev": {"version": "1", "dev": true},
            "node_modules/not-installed": {"version": "1", "dev": true}
        }});
        std::fs::write(dir.path().join("package-lock.json"), lock.to_string()).unwrap();
        let with_lock = dev_only_packages(dir.path(), &package).unwrap();
        assert_eq!(
            with_lock.into_iter().collect::<Vec<_>>(),
            ["node_modules/devdep-of-dev", "node_modules/devtool"]
        );
    }
}
