//! Runtimes: how each kind of app becomes a root-filesystem tree and an app spec.
//!
//! Each runtime module turns its input into an [`AppImage`]: the tree of files (skeleton from
//! `layout` + the app + what it needs to run) and the spec the init starts it with. The builder
//! does the rest (kernel, init, filesystem image, manifest) the same way for every kind. `app`
//! is what they share: their input, their output, the spec and environment every app starts
//! with.

pub(crate) mod app;
pub(crate) mod appdir;
pub(crate) mod closure;
pub(crate) mod jar;
pub(crate) mod jarnative;
pub(crate) mod jdk;
pub(crate) mod jvm;
pub(crate) mod native;
pub(crate) mod node;
pub(crate) mod python;

pub(crate) use app::{AppImage, Interpreters, RuntimeInput};

use crate::build::detect::Kind;
use anyhow::Result;

/// Dispatches to the runtime of `kind`.
pub(crate) fn assemble(
    kind: Kind,
    input: &RuntimeInput<'_>,
    progress: &mut dyn FnMut(&str),
) -> Result<AppImage> {
    match kind {
        Kind::Native => native::assemble(input, progress),
        Kind::Jvm => jvm::assemble(input, progress),
        Kind::Node => node::assemble(input, progress),
        Kind::Python => python::assemble(input, progress),
    }
}
