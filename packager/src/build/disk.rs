//! The image's disk, assembled from its parts: the UKI (EFI stub + kernel, initramfs, command
//! line, os-release, manifest) on the ESP, the root filesystem in its own partition and its
//! dm-verity hash tree in another. The layout itself (GPT, FAT, PE sections) is
//! `fuse_boot::disk`.

use crate::image::manifest::Manifest;
use anyhow::{Context, Result};
use fuse_boot::disk;
use fuse_rootfs::verity::HashTree;
use fuse_rootfs::Arch;
use std::path::Path;

/// The dm-verity tree of the root filesystem `rootfs` (whose digest is `digest`) and the
/// kernel command line that mounts it through dm-verity: computed before the manifest, which
/// holds the line.
pub(crate) fn verity(arch: Arch, rootfs: &Path, digest: &str) -> Result<(HashTree, String)> {
    let tree = disk::rootfs_tree(rootfs, digest)
        .context("Cannot compute the root filesystem's dm-verity tree")?;
    let cmdline = fuse_boot::cmdline::image_cmdline_verity(arch, &disk::verity_root(digest, &tree));
    Ok((tree, cmdline))
}

/// The parts of an image, in hand: the disk is assembled from these bytes, never from
/// copies read back out of the store.
#[derive(Debug)]
pub(crate) struct Parts<'a> {
    pub(crate) kernel: &'a [u8],
    pub(crate) initrd: &'a [u8],
    /// The root filesystem image (a file: it can be hundreds of MB).
    pub(crate) rootfs: &'a Path,
    /// The root filesystem's dm-verity tree ([`verity`]).
    pub(crate) verity: &'a HashTree,
}

/// Writes the disk of `manifest`, made of `parts`, to `out`.
pub(crate) fn write(manifest: &Manifest, parts: &Parts<'_>, out: &Path) -> Result<()> {
    let stub = crate::image::disk::efi_stub(manifest.arch)?;
    crate::image::disk::assemble(
        manifest,
        &stub,
        parts.kernel,
        parts.initrd,
        parts.rootfs,
        parts.verity,
        out,
    )
}
