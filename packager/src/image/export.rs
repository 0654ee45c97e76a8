//! `fuse export`: the disk in the format a hypervisor or cloud imports.

use anyhow::{bail, Context, Result};
use std::path::Path;

/// Formats `fuse export` and `fuse build --format` write, and qemu-img's names for them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ExportFormat {
    /// The raw disk itself (GCE's disk.raw, dd to a device).
    Raw,
    /// QEMU/KVM, OpenStack.
    Qcow2,
    /// VMware, VirtualBox (streamOptimized, as vSphere and AWS import take it).
    Vmdk,
    /// Azure, Hyper-V (fixed size, as Azure requires).
    Vhd,
}

impl ExportFormat {
    pub(crate) const ALL: [ExportFormat; 4] = [
        ExportFormat::Raw,
        ExportFormat::Qcow2,
        ExportFormat::Vmdk,
        ExportFormat::Vhd,
    ];

    pub(crate) fn as_str(self) -> &'static str {
        match self {
            ExportFormat::Raw => "raw",
            ExportFormat::Qcow2 => "qcow2",
            ExportFormat::Vmdk => "vmdk",
            ExportFormat::Vhd => "vhd",
        }
    }

    /// qemu-img's `-O` format and `-o` options.
    fn qemu_img(self) -> (&'static str, Option<&'static str>) {
        match self {
            ExportFormat::Raw => ("raw", None),
            ExportFormat::Qcow2 => ("qcow2", None),
            ExportFormat::Vmdk => ("vmdk", Some("subformat=streamOptimized")),
            ExportFormat::Vhd => ("vpc", Some("subformat=fixed,force_size=on")),
        }
    }
}

/// Converts a disk to `format` at `out` (written beside it under a temporary name, renamed
/// when complete).
pub(crate) fn export(disk_path: &Path, format: ExportFormat, out: &Path) -> Result<()> {
    let dir = out
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let tmp = tempfile::Builder::new()
        .prefix(".fuse-export-")
        .tempfile_in(dir)
        .with_context(|| format!("Cannot write in {}", dir.display()))?;
    if format == ExportFormat::Raw {
        std::fs::copy(disk_path, tmp.path())
            .with_context(|| format!("Cannot copy the disk to {}", out.display()))?;
    } else {
        let (fmt, options) = format.qemu_img();
        let mut cmd = std::process::Command::new("qemu-img");
        cmd.args(["convert", "-q", "-f", "raw", "-O", fmt]);
        if let Some(o) = options {
            cmd.args(["-o", o]);
        }
        cmd.arg(disk_path).arg(tmp.path());
        let output = cmd.output().map_err(|e| {
            anyhow::anyhow!(
                "Cannot run qemu-img ({e}): install Debian's qemu-utils (bash ci/setup)"
            )
        })?;
        if !output.status.success() {
            bail!(
                "qemu-img convert to {} failed: {}",
                format.as_str(),
                String::from_utf8_lossy(&output.stderr).trim()
            );
        }
    }
    tmp.persist(out)
        .with_context(|| format!("Cannot write {}", out.display()))?;
    Ok(())
}

impl std::str::FromStr for ExportFormat {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        ExportFormat::ALL
            .into_iter()
            .find(|f| f.as_str() == s)
            .ok_or_else(|| format!("unknown format '{s}': use raw, qcow2, vmdk or vhd"))
    }
}
