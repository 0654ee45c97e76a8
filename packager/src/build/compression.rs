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
    /// zstd at its highest practical level, 1 MiB blocks: boots as fast as `Fast`, within ~15%
    /// of `Small`'s size; the first (cold) build compresses slowly.
    Balanced,
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
            RootfsCompression::Balanced => SquashfsOptions {
                level: Some(ROOTFS_ZSTD_BALANCED_LEVEL),
                block_size: 1024 * 1024,
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
            RootfsCompression::Fast | RootfsCompression::Balanced => "squashfs+zstd",
            RootfsCompression::Small => "squashfs+xz",
        }
    }
}

/// The zstd level of `--compression balanced`. Measured on the Node hello's root (92 MB, 1 MiB
/// blocks, mksquashfs): level 12 32.3 MB, 15 32.1, 17 30.3, 19 28.8, 22 28.8 (xz 24.9, zstd 6
/// with 128 KiB blocks 35.0); 19 is where the curve ends. Decompression is as fast at any level.
pub(crate) const ROOTFS_ZSTD_BALANCED_LEVEL: u32 = 19;

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

    /// `fast`, `balanced` or `small`, as the flag and fuse.toml spell them.
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "fast" => Ok(RootfsCompression::Fast),
            "balanced" => Ok(RootfsCompression::Balanced),
            "small" => Ok(RootfsCompression::Small),
            _ => Err(format!(
                "unknown compression '{s}': use fast, balanced or small"
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fuse_rootfs::squashfs::Compression;

    fn options(c: RootfsCompression, arch: Arch) -> fuse_rootfs::squashfs::SquashfsOptions {
        c.squashfs_options(
            arch,
            BlockCache {
                dir: "/nonexistent".into(),
                max_bytes: 0,
            },
        )
    }

    #[test]
    fn each_name_selects_its_compressor_level_and_block_size() {
        let parse = |s: &str| s.parse::<RootfsCompression>().unwrap();
        let fast = options(parse("fast"), Arch::X86_64);
        assert_eq!((fast.level, fast.block_size), (Some(6), 128 * 1024));
        assert!(matches!(fast.compression, Compression::Zstd));
        let balanced = options(parse("balanced"), Arch::X86_64);
        assert_eq!(
            (balanced.level, balanced.block_size),
            (Some(19), 1024 * 1024)
        );
        assert!(matches!(balanced.compression, Compression::Zstd));
        assert!(balanced.branch_filter.is_none());
        assert_eq!(parse("balanced").format(), "squashfs+zstd");
        let small = options(parse("small"), Arch::X86_64);
        assert!(matches!(small.compression, Compression::Xz));
        assert!(small.branch_filter.is_some());
        assert!(options(parse("small"), Arch::Aarch64)
            .branch_filter
            .is_none());
        assert_eq!(parse("small").format(), "squashfs+xz");
    }

    #[test]
    fn an_unknown_name_lists_the_three() {
        let err = "tiny".parse::<RootfsCompression>().unwrap_err();
        assert_eq!(
            err,
            "unknown compression 'tiny': use fast, balanced or small"
        );
    }
}
