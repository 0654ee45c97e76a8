//! Native apps: an ELF executable plus its shared-library closure, nothing else.

use super::app::{add_closure, app_spec, default_env, resolve_closure, AppImage, RuntimeInput};
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
    // A static program needs no libraries, hence no sysroot.
    let mut sysroot = if info.is_static {
        None
    } else {
        let packages: Vec<&str> = input.packages.iter().map(String::as_str).collect();
        crate::host::sysroot::for_build(input.arch, input.sysroot, &packages, progress)?
    };
    if let Some(sysroot) = &sysroot {
        options.sysroot = sysroot.path.clone();
    }
    let closure = resolve_closure(
        input.arch,
        input.input,
        &exe,
        &mut options,
        &mut sysroot,
        progress,
    )?;
    add_closure(&mut tree, input.input, &exe, &closure)?;
    let notes = sysroot.map(|s| s.notes()).unwrap_or_default();
    let spec = app_spec(input, exe.clone(), vec![exe], default_env(input.name));
    Ok(AppImage { tree, spec, notes })
}
