//! Native apps: an ELF executable plus its shared-library closure, nothing else.

use super::{default_env, AppImage, RuntimeInput};
use crate::layout;
use anyhow::Result;
use fuse_boot::spec::AppSpec;
use fuse_rootfs::elf::{self, ClosureOptions};

pub fn assemble(input: &RuntimeInput<'_>) -> Result<AppImage> {
    let file_name = input
        .input
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| input.name.name.clone());
    let exe = format!("{}/{file_name}", layout::APP_DIR);
    let mut tree = layout::skeleton()?;
    let options = ClosureOptions {
        arch: input.arch,
        ..ClosureOptions::default()
    };
    elf::add_with_closure(&mut tree, input.input, &exe, &options)?;
    let spec = AppSpec {
        exe: exe.clone(),
        args: vec![exe],
        env: default_env(input.name),
        cwd: layout::APP_DIR.into(),
        uid: 0,
        gid: 0,
        hostname: input.name.name.clone(),
    };
    Ok(AppImage {
        tree,
        spec,
        notes: Vec::new(),
    })
}
