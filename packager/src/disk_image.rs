//! The image as a bootable disk: what `fuse build` stores under the image's digest, what
//! `fuse run` boots (directly, from the kernel and initramfs inside it, or through UEFI
//! firmware), and what `fuse inspect`, `fuse verify` and `fuse export` read.
//!
//! The disk itself (GPT, ESP, unified kernel image) is `fuse_boot::disk`; this module connects
//! it to the manifest and the store.

use crate::digest;
use crate::manifest::Manifest;
use crate::store::{Store, StoredImage};
use anyhow::{bail, Context, Result};
use fuse_boot::disk::verify::Expected;
use fuse_boot::disk::{self, BootFiles};
use fuse_boot::vm::Firmware;
use fuse_rootfs::Arch;
use std::path::{Path, PathBuf};

/// The `fuse.root=` value naming the root partition of a disk whose root filesystem has this
/// digest.
pub fn root_spec(rootfs_digest: &str) -> String {
    format!("PARTUUID={}", disk::root_partition_uuid(rootfs_digest))
}

/// The `.osrel` of an image's UKI: what a boot menu or `bootctl` shows.
fn osrel(manifest: &Manifest) -> String {
    format!(
        "ID=fuse\nNAME=fuse\nIMAGE_ID={}\nIMAGE_VERSION={}\nPRETTY_NAME=\"fuse {}\"\n",
        manifest.name,
        manifest.version,
        manifest.reference()
    )
}

/// The EFI stub for `arch`: `$FUSE_EFI_STUB`, else systemd's from `systemd-boot-efi`.
fn stub(arch: Arch) -> Result<Vec<u8>> {
    let path = std::env::var_os("FUSE_EFI_STUB")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| disk::stub_path(arch));
    std::fs::read(&path).with_context(|| {
        format!(
            "No EFI stub at {}: install Debian's systemd-boot-efi (bash ci/setup), or set FUSE_EFI_STUB",
            path.display()
        )
    })
}

/// Builds the disk of `manifest` from its blobs in `store`; stores it and returns its digest
/// and size.
pub fn build(store: &Store, manifest: &Manifest) -> Result<(String, u64)> {
    let read = |d: &str| {
        std::fs::read(store.blob_path(d))
            .with_context(|| format!("Cannot read blob {d} from the image store"))
    };
    let kernel = read(&manifest.kernel.digest)?;
    let initrd = read(&manifest.init.digest)?;
    let stub = stub(manifest.arch)?;
    let manifest_bytes = manifest.to_bytes();
    let osrel = osrel(manifest);
    let scratch = store.temp_dir()?;
    let out = scratch.path().join("disk.raw");
    disk::build_disk(
        &disk::DiskInputs {
            arch: manifest.arch,
            stub: &stub,
            kernel: &kernel,
            initrd: &initrd,
            cmdline: &manifest.cmdline,
            osrel: &osrel,
            manifest: &manifest_bytes,
            rootfs: &store.blob_path(&manifest.rootfs.digest),
            rootfs_digest: &manifest.rootfs.digest,
        },
        &out,
    )
    .context("Cannot write the image's disk")?;
    let size = std::fs::metadata(&out)?.len();
    let d = store.put_file(&out)?;
    Ok((d, size))
}

/// The disk of a stored image, checked to exist.
pub fn disk_path(store: &Store, image: &StoredImage) -> Result<PathBuf> {
    let path = store.blob_path(&image.digest);
    let is_disk = std::fs::File::open(&path)
        .and_then(|f| {
            use std::os::unix::fs::FileExt;
            let mut sig = [0u8; 8];
            f.read_exact_at(&mut sig, 512)?;
            Ok(&sig == b"EFI PART")
        })
        .unwrap_or(false);
    if !is_disk {
        bail!(
            "Image {} has no disk in the store (built by an older fuse, or its blob is gone): rebuild it with `fuse build`",
            image.name
        );
    }
    Ok(path)
}

/// Kernel, initramfs and command line for direct boot, out of the image's disk (cached by the
/// disk's digest, so this is a directory lookup after the first run).
pub fn boot_files(store: &Store, image: &StoredImage) -> Result<BootFiles> {
    let path = disk_path(store, image)?;
    let dir = crate::paths::cache_dir()
        .join("boot")
        .join(digest::hex_part(&image.digest));
    disk::extract_boot(&path, &dir).with_context(|| {
        format!(
            "Cannot read the boot files out of the disk of {}",
            image.name
        )
    })
}

/// UEFI firmware for `arch`, with a copy of the variable store in `scratch` for this run.
pub fn uefi_firmware(arch: Arch, scratch: &Path) -> Result<Firmware> {
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

/// What the disk of `manifest` must hold; blobs in `store` (when there) locate differences.
pub fn expected(store: Option<&Store>, manifest: &Manifest, disk_digest: Option<&str>) -> Expected {
    let component = |d: &str, size: u64| {
        let reference = store.map(|s| s.blob_path(d)).filter(|p| p.exists());
        Some((d.to_string(), size, reference))
    };
    Expected {
        kernel: component(&manifest.kernel.digest, manifest.kernel.size),
        initrd: component(&manifest.init.digest, manifest.init.size),
        rootfs: component(&manifest.rootfs.digest, manifest.rootfs.size),
        cmdline: Some(manifest.cmdline.clone()),
        manifest_digest: None,
        disk_digest: disk_digest.map(str::to_string),
    }
}

/// A disk named on the command line: a file, or an image in the store.
#[derive(Debug)]
pub struct Target {
    pub path: PathBuf,
    /// The image, when named from the store.
    pub image: Option<StoredImage>,
}

/// Resolves `DISK|IMAGE`: an existing file is a disk; anything else an image reference.
pub fn resolve(store: &Store, target: &str) -> Result<Target> {
    let path = Path::new(target);
    // A file with a GPT header is a disk; anything else (an app named like an image) is not.
    let is_gpt = std::fs::File::open(path)
        .and_then(|f| {
            use std::os::unix::fs::FileExt;
            let mut sig = [0u8; 8];
            f.read_exact_at(&mut sig, 512)?;
            Ok(&sig == b"EFI PART")
        })
        .unwrap_or(false);
    let found = if path.is_file() && is_gpt {
        None
    } else {
        store.find(target)?
    };
    // A file that is no image's name is read as a disk, damaged or not: its errors say why.
    if path.is_file() && found.is_none() {
        return Ok(Target {
            path: path.to_path_buf(),
            image: None,
        });
    }
    let image = found.with_context(|| {
        format!(
            "No disk file or image named '{target}': give a disk's path or an image from `fuse ls`"
        )
    })?;
    Ok(Target {
        path: disk_path(store, &image)?,
        image: Some(image),
    })
}

/// The manifest inside a disk's UKI.
pub fn manifest_of(disk: &disk::Disk) -> Result<Manifest> {
    let bytes = disk.section(disk::uki::FUSE).with_context(|| {
        format!(
            "{} has no .fuse section in its UKI: not a fuse disk",
            disk.path.display()
        )
    })?;
    Manifest::from_bytes(bytes)
}

/// Formats `fuse export` and `fuse build --format` write, and qemu-img's names for them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ExportFormat {
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
    pub fn as_str(self) -> &'static str {
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
pub fn export(disk_path: &Path, format: ExportFormat, out: &Path) -> Result<()> {
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

/// How `fuse run` boots the disk (`--firmware`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum BootMode {
    /// QEMU loads the kernel and initramfs read out of the disk's UKI: the fastest path.
    #[default]
    Direct,
    /// UEFI firmware (OVMF) boots the disk's ESP, exactly as a cloud does.
    Uefi,
}

/// The root disk, boot files and firmware of a run of `image` in `mode`; `scratch` holds the
/// run's copy of the firmware variables.
pub fn vm_boot(
    store: &Store,
    image: &StoredImage,
    mode: BootMode,
    scratch: &Path,
) -> Result<(PathBuf, BootFiles, Firmware)> {
    let disk = disk_path(store, image)?;
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

fn type_name(guid: disk::Guid) -> &'static str {
    if guid == disk::ESP_TYPE {
        return "EFI System";
    }
    match Arch::ALL.into_iter().find(|a| disk::root_type(*a) == guid) {
        Some(Arch::X86_64) => "Linux root (x86-64)",
        Some(Arch::Aarch64) => "Linux root (ARM64)",
        None => "unknown",
    }
}

/// The layout of a disk as JSON: partitions, ESP files, UKI sections.
pub fn layout_json(d: &disk::Disk) -> serde_json::Value {
    use serde_json::json;
    let partitions: Vec<_> = d
        .table
        .partitions
        .iter()
        .enumerate()
        .map(|(i, p)| {
            json!({
                "number": i + 1,
                "name": p.name,
                "type": p.type_guid.to_string(),
                "type_name": type_name(p.type_guid),
                "guid": p.unique_guid.to_string(),
                "offset": p.offset(),
                "size": p.size(),
                "attributes": format!("{:#018x}", p.attributes),
            })
        })
        .collect();
    let sections: Vec<_> = d
        .sections
        .iter()
        .map(|s| {
            json!({
                "name": s.name,
                "offset": s.raw_offset,
                "size": s.virtual_size,
                "virtual_address": format!("{:#x}", s.virtual_address),
                "disk_offset": d.uki_disk_offset.map(|o| o + u64::from(s.raw_offset)),
            })
        })
        .collect();
    json!({
        "size": d.size,
        "guid": d.table.disk_guid.to_string(),
        "partitions": partitions,
        "esp": {
            "fat": d.esp_fat,
            "serial": format!("{:08X}", d.esp_serial),
            "files": d.esp_files.iter().map(|(p, s)| json!({"path": p, "size": s})).collect::<Vec<_>>(),
        },
        "uki": {
            "path": d.uki_path,
            "size": d.uki.len(),
            "disk_offset": d.uki_disk_offset,
            "sections": sections,
        },
    })
}

/// The layout of a disk for people.
pub fn print_layout(d: &disk::Disk) {
    use crate::fsutil::human_size;
    println!(
        "Disk:     {} GPT, GUID {}",
        human_size(d.size),
        d.table.disk_guid
    );
    println!(
        "  {:<3} {:>12} {:>10}  {:<20} {:<36}  name",
        "#", "offset", "size", "type", "partition GUID"
    );
    for (i, p) in d.table.partitions.iter().enumerate() {
        println!(
            "  {:<3} {:>12} {:>10}  {:<20} {}  {}",
            i + 1,
            p.offset(),
            human_size(p.size()),
            type_name(p.type_guid),
            p.unique_guid,
            p.name
        );
    }
    println!("ESP:      {}, serial {:08X}", d.esp_fat, d.esp_serial);
    for (path, size) in &d.esp_files {
        println!("  {:>10}  {path}", human_size(*size));
    }
    println!(
        "UKI:      {} ({})",
        d.uki_path,
        human_size(d.uki.len() as u64)
    );
    for s in d.sections.iter() {
        println!(
            "  {:<9} {:>10}  file offset {:#x}{}",
            s.name,
            human_size(u64::from(s.virtual_size)),
            s.raw_offset,
            d.uki_disk_offset
                .map(|o| format!(", disk byte {}", o + u64::from(s.raw_offset)))
                .unwrap_or_default()
        );
    }
}
