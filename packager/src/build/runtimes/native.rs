//! Native apps: an ELF executable plus its shared-library closure, nothing else.

use super::app::{app_spec, default_env, AppImage, RuntimeInput};
use crate::build::layout;
use anyhow::Result;
use fuse_rootfs::elf;

pub(crate) fn assemble(
    input: &RuntimeInput<'_>,
    progress: &mut dyn FnMut(&str),
) -> Result<AppImage> {
    let file_name = input
        .input
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| input.name.name.clone());
    let exe = format!("{}/{file_name}", layout::APP_DIR);
    let mut tree = layout::skeleton()?;
    // The arch check comes before any sysroot download: an x86_64 program in an arm64 image
    // is a one-line error, not a package fetch followed by one.
    let info = elf::inspect(input.input)?;
    if info.arch != Some(input.arch) || !info.is_64 {
        return Err(elf::ElfError::WrongArch {
            path: input.input.to_path_buf(),
            found: info.arch_name(),
            expected: input.arch,
        }
        .into());
    }
    let mut options = input.closure_options();
    let mut notes = Vec::new();
    // A static program needs no libraries, hence no sysroot.
    if !info.is_static {
        if let Some(sysroot) =
            crate::host::sysroot::for_build(input.arch, input.sysroot, &[], progress)?
        {
            options.sysroot = sysroot.path.clone();
            notes = sysroot.notes();
        }
    }
    elf::add_with_closure(&mut tree, input.input, &exe, &options)?;
    let spec = app_spec(input, exe.clone(), vec![exe], default_env(input.name));
    Ok(AppImage { tree, spec, notes })
}
