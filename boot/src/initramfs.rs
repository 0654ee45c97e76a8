//! The initramfs: only the init, the console node it needs before devtmpfs is mounted, and the
//! mount points of the early filesystems. The app's root filesystem is a separate disk.

use std::sync::Arc;

use fuse_rootfs::cpio::{write_newc, CpioError};
use fuse_rootfs::tree::{Tree, TreeError};
use fuse_rootfs::Arch;

use crate::init::init_binary;

/// Where an initramfs lists kernel modules for the init to load before it mounts the root, one
/// path a line (`MODULE_LIST_PATH` in `boot/init/init.h`). fuse's kernels need none; a
/// distribution kernel (the boot benchmark's baseline) needs its virtio and squashfs modules.
pub const MODULE_LIST_PATH: &str = "/lib/modules/load";

/// Why an initramfs could not be built.
#[derive(Debug, thiserror::Error)]
pub enum InitramfsError {
    #[error("This fuse has no init for {arch}: it was built without {triple}-gcc; install that cross compiler (and its static libc) and rebuild fuse")]
    NoInit { arch: Arch, triple: &'static str },
    #[error(transparent)]
    Tree(#[from] TreeError),
    #[error(transparent)]
    Cpio(#[from] CpioError),
    #[error("Cannot compress the initramfs")]
    Compress(#[source] std::io::Error),
}

/// Result of initramfs operations.
pub type Result<T> = std::result::Result<T, InitramfsError>;

/// The files of the initramfs for `arch`.
pub fn initramfs_tree(arch: Arch) -> Result<Tree> {
    let init = init_binary(arch).ok_or(InitramfsError::NoInit {
        arch,
        triple: arch.gnu_triple(),
    })?;
    let mut tree = Tree::new();
    tree.add_dir("/dev", 0o755)?;
    // The kernel opens /dev/console for init's stdin/stdout/stderr before anything is mounted.
    tree.add_char_device("/dev/console", 5, 1, 0o600)?;
    for dir in ["/proc", "/sys", "/newroot"] {
        tree.add_dir(dir, 0o755)?;
    }
    tree.add_bytes("/init", Arc::<[u8]>::from(init), 0o755)?;
    Ok(tree)
}

/// zstd level of the initramfs. The highest: compressing happens once per fuse binary and
/// arch (the packager keeps the result), unpacking at every boot costs the same at any level.
const ZSTD_LEVEL: i32 = 19;

/// The initramfs for `arch` as a newc cpio archive, uncompressed. Deterministic.
pub fn initramfs_cpio(arch: Arch) -> Result<Vec<u8>> {
    let tree = initramfs_tree(arch)?;
    let mut out = Vec::new();
    write_newc(&tree, &mut out)?;
    Ok(out)
}

/// `cpio` as the kernel takes it in an image: one zstd frame (`CONFIG_RD_ZSTD`). The init is
/// almost all of it and shrinks to about 40 %. Deterministic: one thread, a fixed level, the
/// zstd library pinned by Cargo.lock.
pub fn compress(cpio: &[u8]) -> Result<Vec<u8>> {
    zstd::bulk::compress(cpio, ZSTD_LEVEL).map_err(InitramfsError::Compress)
}

/// Whether `packed` is exactly `cpio` compressed (a cached copy is checked before use).
pub fn is_compressed(packed: &[u8], cpio: &[u8]) -> bool {
    zstd::bulk::decompress(packed, cpio.len()).is_ok_and(|d| d == cpio)
}

/// The initramfs for `arch`, compressed ([`initramfs_cpio`], then [`compress`]). The packager
/// composes the two itself (it caches the compressed copy), so only the tests build it whole.
#[cfg(test)]
fn initramfs(arch: Arch) -> Result<Vec<u8>> {
    compress(&initramfs_cpio(arch)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// (name, mode, rdevmajor, rdevminor, data) of each newc entry, trailer excluded.
    fn parse_newc(mut b: &[u8]) -> Vec<(String, u32, u32, u32, Vec<u8>)> {
        let hex = |s: &[u8]| u32::from_str_radix(std::str::from_utf8(s).unwrap(), 16).unwrap();
        let pad4 = |n: usize| (4 - n % 4) % 4;
        let mut entries = Vec::new();
        loop {
            assert_eq!(&b[..6], b"070701", "newc magic");
            let field = |i: usize| hex(&b[6 + i * 8..14 + i * 8]);
            let (mode, size, rmaj, rmin, namesize) = (
                field(1),
                field(6) as usize,
                field(9),
                field(10),
                field(11) as usize,
            );
            let name = String::from_utf8(b[110..110 + namesize - 1].to_vec()).unwrap();
            let data_start = 110 + namesize + pad4(110 + namesize);
            let data = b[data_start..data_start + size].to_vec();
            b = &b[data_start + size + pad4(size)..];
            if name == "TRAILER!!!" {
                return entries;
            }
            entries.push((name, mode, rmaj, rmin, data));
        }
    }

    #[test]
    fn holds_the_init_console_and_mount_points() {
        let arch = Arch::host();
        let cpio = initramfs_cpio(arch).unwrap();
        let entries = parse_newc(&cpio);
        let find = |n: &str| {
            entries
                .iter()
                .find(|e| e.0.trim_start_matches('/') == n)
                .unwrap_or_else(|| panic!("{n} missing from {entries:?}"))
        };
        let init = find("init");
        assert_eq!(init.1, 0o100755);
        assert_eq!(init.4, init_binary(arch).unwrap());
        let console = find("dev/console");
        assert_eq!((console.1, console.2, console.3), (0o020600, 5, 1));
        for dir in ["dev", "proc", "sys", "newroot"] {
            assert_eq!(find(dir).1 & 0o170000, 0o040000, "{dir} is a directory");
        }
    }

    #[test]
    fn the_image_takes_it_as_one_zstd_frame_of_the_archive() {
        let arch = Arch::host();
        let (cpio, packed) = (initramfs_cpio(arch).unwrap(), initramfs(arch).unwrap());
        assert_eq!(&packed[..4], &[0x28, 0xb5, 0x2f, 0xfd], "zstd magic");
        assert!(
            packed.len() * 2 < cpio.len(),
            "{} of {}",
            packed.len(),
            cpio.len()
        );
        assert_eq!(zstd::bulk::decompress(&packed, cpio.len()).unwrap(), cpio);
    }

    #[test]
    fn is_deterministic() {
        assert_eq!(
            initramfs(Arch::host()).unwrap(),
            initramfs(Arch::host()).unwrap()
        );
    }

    #[test]
    fn missing_arch_is_a_clear_error() {
        for arch in Arch::ALL {
            if init_binary(arch).is_none() {
                let err = initramfs(arch).unwrap_err().to_string();
                assert!(err.contains(arch.gnu_triple()), "{err}");
            }
        }
    }
}
