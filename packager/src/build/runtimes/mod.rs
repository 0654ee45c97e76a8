//! Runtimes: how each kind of app becomes a root-filesystem tree and an app spec.
//!
//! Each runtime module turns its input into an [`AppImage`]: the tree of files (skeleton from
//! `layout` + the app + what it needs to run) and the spec the init starts it with. The builder
//! does the rest (kernel, init, filesystem image, manifest) the same way for every kind.

pub mod appdir;
pub mod jar;
pub mod jvm;
pub mod jvm_cross;
pub mod native;
pub mod node;
pub mod python;

use crate::naming::ImageName;
use crate::payload::Kind;
use anyhow::Result;
use fuse_boot::spec::AppSpec;
use fuse_rootfs::tree::Tree;
use fuse_rootfs::Arch;
use std::path::Path;

/// What a runtime produces for the builder.
#[derive(Debug)]
pub struct AppImage {
    pub tree: Tree,
    pub spec: AppSpec,
    /// Runtime-specific facts recorded in the manifest (e.g. the JDK version and modules).
    pub notes: Vec<(String, String)>,
}

/// Everything a runtime gets to decide from.
#[derive(Debug, Clone)]
pub struct RuntimeInput<'a> {
    pub input: &'a Path,
    pub name: &'a ImageName,
    pub arch: Arch,
    /// The JDK to make a Java runtime from (`--jdk`); `None` searches the host.
    pub jdk: Option<&'a Path>,
    /// The node binary for Node.js apps (`--node`); `None` takes `node` from PATH.
    pub node: Option<&'a Path>,
    /// The interpreter for Python apps (`--python`); `None` takes Debian's /usr/bin/python3.
    pub python: Option<&'a Path>,
    /// The virtualenv whose site-packages a Python app imports from (`--venv`).
    pub venv: Option<&'a Path>,
    /// The target's root to take shared libraries from (`--sysroot`); `None`: the host's `/`
    /// for the host's arch, else fuse's Debian sysroot (see `crate::sysroot`).
    pub sysroot: Option<&'a Path>,
    /// The app's `fuse.toml`, if it has one: runtime options are in `config.runtime_table(
    /// "jvm")` / `config.runtime_options("jvm")` (`[jvm] options = [...]`), same for node and
    /// python. Args, env and files of the configuration are applied by the builder after.
    pub config: Option<&'a crate::config::Config>,
}

/// The interpreters of the script runtimes, as given on the command line.
#[derive(Debug, Clone, Default)]
pub struct Interpreters {
    /// `--node PATH`: the node binary for Node.js apps.
    pub node: Option<std::path::PathBuf>,
    /// `--python PATH`: the interpreter for Python apps.
    pub python: Option<std::path::PathBuf>,
    /// `--venv PATH`: the virtualenv holding a Python app's dependencies.
    pub venv: Option<std::path::PathBuf>,
    /// `--sysroot PATH`: the target's root the shared libraries come from.
    pub sysroot: Option<std::path::PathBuf>,
}

/// Dispatches to the runtime of `kind`.
pub fn assemble(
    kind: Kind,
    input: &RuntimeInput<'_>,
    progress: &mut dyn FnMut(&str),
) -> Result<AppImage> {
    let _ = &progress;
    match kind {
        Kind::Native => native::assemble(input, progress),
        Kind::Jvm => jvm::assemble(input, progress),
        Kind::Node => node::assemble(input, progress),
        Kind::Python => python::assemble(input, progress),
    }
}

/// The spec every runtime starts its app with: run from `/app` as root, named after the image.
pub fn app_spec(
    input: &RuntimeInput<'_>,
    exe: String,
    args: Vec<String>,
    env: Vec<(String, String)>,
) -> AppSpec {
    AppSpec {
        exe,
        args,
        env,
        cwd: crate::layout::APP_DIR.into(),
        uid: 0,
        gid: 0,
        hostname: input.name.name.clone(),
    }
}

/// The environment every app starts with: a PATH that covers the image and a HOME.
pub fn default_env(name: &ImageName) -> Vec<(String, String)> {
    vec![
        ("PATH".into(), "/app:/usr/local/bin:/usr/bin:/bin".into()),
        ("HOME".into(), "/root".into()),
        ("HOSTNAME".into(), name.name.clone()),
        ("LANG".into(), "C.UTF-8".into()),
    ]
}
