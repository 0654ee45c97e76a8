//! How the root filesystem is compressed (`--compression`, fuse.toml `compression`): image
//! size traded against build and boot time.

use crate::build::detect::Kind;
use fuse_rootfs::block_cache::BlockCache;
use fuse_rootfs::Arch;

/// How the root filesystem is compressed: image size traded against build and boot time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RootfsCompression {
    /// zstd, 128 KiB blocks: the fastest build and boot.
    Fast,
    /// xz, 1 MiB blocks, with the x86 branch filter on x86_64: the smallest image.
    Small,
}

impl RootfsCompression {
    /// The compression an app of `kind` gets unless asked otherwise: xz where zstd misses the
    /// size target (Node.js: 38.1 MB against 30), zstd, which boots faster, everywhere else.
    /// The README's "Root filesystem compression" has the measurements.
    pub(crate) fn default_for(kind: Kind) -> Self {
        match kind {
            Kind::Node => RootfsCompression::Small,
            _ => RootfsCompression::Fast,
        }
    }

    /// The squashfs writer's options for `arch`, caching compressed blocks in `block_cache`.
    pub(crate) fn squashfs_options(
        self,
        arch: Arch,
        block_cache: BlockCache,
    ) -> fuse_rootfs::squashfs::SquashfsOptions {
        use fuse_rootfs::squashfs::{BranchFilter, Compression, SquashfsOptions};
        match self {
            RootfsCompression::Fast => SquashfsOptions {
                level: Some(ROOTFS_ZSTD_LEVEL),
                block_cache: Some(block_cache),
                ..Default::default()
            },
            RootfsCompression::Small => SquashfsOptions {
                compression: Compression::Xz,
                level: Some(ROOTFS_XZ_PRESET),
                block_size: 1024 * 1024,
                branch_filter: (arch == Arch::X86_64).then_some(BranchFilter::X86),
                block_cache: Some(block_cache),
                ..Default::default()
            },
        }
    }

    /// The manifest's name for the root filesystem's format.
    pub(crate) fn format(self) -> &'static str {
        match self {
            RootfsCompression::Fast => "squashfs+zstd",
            RootfsCompression::Small => "squashfs+xz",
        }
    }
}

/// The xz preset of `--compression small`.
pub(crate) const ROOTFS_XZ_PRESET: u32 = 6;

/// The compressed-block cache is pruned to this size (least recently used first) after a build
/// that added to it.
pub(crate) const BLOCK_CACHE_MAX_BYTES: u64 = 1 << 30;

/// The zstd level of `--compression fast`. A build with a cold block cache compresses the whole
/// tree (a Java app: 47 MB, the jlink runtime included), so the level is that build's time.
/// Measured on that tree (backhand, 1 thread): level 15 (mksquashfs' default) 10.2 s, level 6
/// 0.97 s, level 3 0.25 s; the image grows by 0.9 MB from 15 to 6 and by another 1 MB from 6
/// to 3. Level 6 is where the size curve flattens; decompression at boot is as fast for all.
pub(crate) const ROOTFS_ZSTD_LEVEL: u32 = 6;

impl std::str::FromStr for RootfsCompression {
    type Err = String;

    /// `fast` or `small`, as the flag and fuse.toml spell them.
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "fast" => Ok(RootfsCompression::Fast),
            "small" => Ok(RootfsCompression::Small),
            _ => Err(format!("unknown compression '{s}': use fast or small")),
        }
    }
}
