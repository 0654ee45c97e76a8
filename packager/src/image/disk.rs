//! The image as a bootable disk: what `fuse build` stores under the image's digest, what
//! `fuse run` boots (directly, from the kernel and initramfs inside it, or through UEFI
//! firmware), and what `fuse inspect`, `fuse verify` and `fuse export` read.
//!
//! The disk itself (GPT, ESP, unified kernel image) is `fuse_boot::disk`; this module connects
//! it to the manifest and the store.

use crate::host::digest;
use crate::image::manifest::Manifest;
use crate::image::store::{Store, StoredImage};
use anyhow::{bail, Context, Result};
use fuse_boot::disk::verify::Expected;
use fuse_boot::disk::{self, BootFiles};
use std::path::{Path, PathBuf};

/// The disk of a stored image, checked to exist.
pub(crate) fn disk_path(store: &Store, image: &StoredImage) -> Result<PathBuf> {
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
pub(crate) fn boot_files(store: &Store, image: &StoredImage) -> Result<BootFiles> {
    let path = disk_path(store, image)?;
    let dir = crate::host::paths::cache_dir()
        .join("boot")
        .join(digest::hex_part(&image.digest));
    disk::extract_boot(&path, &dir).with_context(|| {
        format!(
            "Cannot read the boot files out of the disk of {}",
            image.name
        )
    })
}

/// What the disk of `manifest` must hold; blobs in `store` (when there) locate differences.
pub(crate) fn expected(
    store: Option<&Store>,
    manifest: &Manifest,
    disk_digest: Option<&str>,
) -> Expected {
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
pub(crate) struct Target {
    pub(crate) path: PathBuf,
    /// The image, when named from the store.
    pub(crate) image: Option<StoredImage>,
}

/// Resolves `DISK|IMAGE`: an existing file is a disk; anything else an image reference.
pub(crate) fn resolve(store: &Store, target: &str) -> Result<Target> {
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
pub(crate) fn manifest_of(disk: &disk::Disk) -> Result<Manifest> {
    let bytes = disk.section(disk::uki::FUSE).with_context(|| {
        format!(
            "{} has no .fuse section in its UKI: not a fuse disk",
            disk.path.display()
        )
    })?;
    Manifest::from_bytes(bytes)
}
