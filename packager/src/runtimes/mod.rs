//! Runtimes: how each kind of app becomes a root-filesystem tree and an app spec.
//!
//! Each runtime module turns its input into an [`AppImage`]: the tree of files (skeleton from
//! `layout` + the app + what it needs to run) and the spec the init starts it with. The builder
//! does the rest (kernel, init, filesystem image, manifest) the same way for every kind.

pub mod native;

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
}

/// Dispatches to the runtime of `kind`.
pub fn assemble(kind: Kind, input: &RuntimeInput<'_>, progress: &mut dyn FnMut(&str)) -> Result<AppImage> {
    let _ = &progress;
    match kind {
        Kind::Native => native::assemble(input),
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
