//! How a run boots the image's disk: directly (QEMU loads the kernel and initramfs read out of
//! the disk's UKI) or through UEFI firmware, as a cloud does.

use crate::image::disk::boot_files;
use crate::image::store::{Store, StoredImage};
use anyhow::{bail, Context, Result};
use fuse_boot::disk::BootFiles;
use fuse_boot::vm::Firmware;
use fuse_rootfs::Arch;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// How `fuse run` boots the disk (`--firmware`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum BootMode {
    /// QEMU loads the kernel and initramfs read out of the disk's UKI: the fastest path.
    #[default]
    Direct,
    /// UEFI firmware (OVMF) boots the disk's ESP, exactly as a cloud does.
    Uefi,
}

impl std::str::FromStr for BootMode {
    type Err = String;

    /// `direct` or `uefi` (`--firmware`).
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "direct" => Ok(BootMode::Direct),
            "uefi" => Ok(BootMode::Uefi),
            _ => Err(format!("unknown firmware '{s}': use direct or uefi")),
        }
    }
}

/// The root disk, boot files and firmware of a run of `image` in `mode`; `scratch` holds the
/// run's copy of the firmware variables.
pub(crate) fn vm_boot(
    store: &Store,
    image: &StoredImage,
    mode: BootMode,
    scratch: &Path,
) -> Result<(PathBuf, BootFiles, Firmware)> {
    let disk = crate::image::disk::verified_disk_path(store, image)?;
    match mode {
        BootMode::Direct => Ok((disk, boot_files(store, image)?, Firmware::Direct)),
        BootMode::Uefi => Ok((
            disk,
            // Not read: the firmware finds them in the ESP.
            BootFiles {
                kernel: PathBuf::new(),
                initrd: PathBuf::new(),
                cmdline: image.manifest.cmdline.clone(),
            },
            uefi_firmware(image.manifest.arch, scratch)?,
        )),
    }
}

/// UEFI firmware for `arch`, with a copy of the variable store in `scratch` for this run.
pub(crate) fn uefi_firmware(arch: Arch, scratch: &Path) -> Result<Firmware> {
    let (dir, code, vars, package) = match arch {
        Arch::X86_64 => ("/usr/share/OVMF", "OVMF_CODE.fd", "OVMF_VARS.fd", "ovmf"),
        Arch::Aarch64 => (
            "/usr/share/AAVMF",
            "AAVMF_CODE.fd",
            "AAVMF_VARS.fd",
            "qemu-efi-aarch64",
        ),
    };
    let dir = Path::new(dir);
    let code = dir.join(code);
    let vars_template = dir.join(vars);
    for f in [&code, &vars_template] {
        if !f.exists() {
            bail!(
                "No UEFI firmware at {}: install Debian's {package} (bash ci/setup)",
                f.display()
            );
        }
    }
    let vars = scratch.join("efivars.fd");
    std::fs::copy(&vars_template, &vars)
        .with_context(|| format!("Cannot copy {} for this run", vars_template.display()))?;
    Ok(Firmware::Uefi { code, vars })
}
