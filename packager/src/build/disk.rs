//! The image's disk, assembled from its parts: the UKI (EFI stub + kernel, initramfs, command
//! line, os-release, manifest) on the ESP, the root and app filesystems in partitions of their
//! own, each followed by its dm-verity hash tree in another. The layout itself (GPT, FAT, PE
//! sections) is `fuse_boot::disk`.

use crate::image::disk::Volumes;
use crate::image::manifest::Manifest;
use anyhow::{Context, Result};
use fuse_boot::disk::{self, Volume};
use fuse_rootfs::verity::HashTree;
use fuse_rootfs::Arch;
use std::path::Path;

/// A filesystem of the image and its digest.
pub(crate) type Filesystem<'a> = (&'a Path, &'a str);

/// The dm-verity trees of the root and app filesystems and the kernel command line that
/// mounts both through dm-verity: computed before the manifest, which holds the line.
pub(crate) fn verity(
    arch: Arch,
    root: Filesystem<'_>,
    app: Filesystem<'_>,
) -> Result<(HashTree, HashTree, String)> {
    let root_tree = disk::rootfs_tree(root.0, root.1)
        .context("Cannot compute the root filesystem's dm-verity tree")?;
    let app_tree = disk::rootfs_tree(app.0, app.1)
        .context("Cannot compute the app filesystem's dm-verity tree")?;
    let cmdline = fuse_boot::cmdline::image_cmdline_verity(
        arch,
        &disk::volume_verity(Volume::Root, root.1, &root_tree),
        &disk::volume_verity(Volume::App, app.1, &app_tree),
    );
    Ok((root_tree, app_tree, cmdline))
}

/// The parts of an image, in hand: the disk is assembled from these bytes, never from
/// copies read back out of the store.
#[derive(Debug)]
pub(crate) struct Parts<'a> {
    pub(crate) kernel: &'a [u8],
    pub(crate) initrd: &'a [u8],
    /// The filesystems (files: they can be hundreds of MB) and their trees ([`verity`]).
    pub(crate) volumes: Volumes<'a>,
}

/// Writes the disk of `manifest`, made of `parts`, to `out`.
pub(crate) fn write(manifest: &Manifest, parts: &Parts<'_>, out: &Path) -> Result<()> {
    let stub = crate::image::disk::efi_stub(manifest.arch)?;
    crate::image::disk::assemble(
        manifest,
        &stub,
        parts.kernel,
        parts.initrd,
        &parts.volumes,
        out,
    )
}
