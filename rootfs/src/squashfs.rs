//! A deterministic squashfs 4.0 writer for the read-only root filesystem, on top of the
//! `backhand` crate.
//!
//! Everything that could vary between two builds of the same tree is pinned: times derived from
//! one epoch and the files' contents (see `times`), uid/gid 0 (a single-entry id table), entries in path order, no
//! xattrs, single-threaded compression. The image is padded to a multiple of 4 KiB, as block
//! devices want. The file is written next to `out` and renamed onto it, so a reader never sees
//! half an image.

use std::fs;
use std::io::{self, BufWriter, Cursor, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use backhand::compression::{CompressionOptions, Compressor, Xz, Zstd};
use backhand::kind::Kind;
use backhand::v4::compressor::XzFilter;
use backhand::{FilesystemCompressor, FilesystemReader, FilesystemWriter, NodeHeader};

use crate::block_cache::{BlockCache, CachingCompressor};
use crate::times::FileTimes;
use crate::tree::{FileSource, Node, Tree};

/// Errors writing a squashfs image.
#[derive(Debug, thiserror::Error)]
pub enum SquashfsError {
    /// The image file could not be created, written or renamed.
    #[error("Cannot write the root filesystem image {}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// backhand refused an entry or failed to write.
    #[error("Cannot build the root filesystem image {} ({context}): {message}", path.display())]
    Backhand {
        path: PathBuf,
        context: String,
        message: String,
    },
    /// An invalid option.
    #[error("Invalid squashfs block size {0}: use a power of two from 4096 to 1048576")]
    BlockSize(u32),
    /// A branch filter asked of a compressor that has none.
    #[error("Invalid squashfs options: a branch filter needs xz compression")]
    FilterWithoutXz,
    /// A host file in the tree is gone or unreadable.
    #[error("Cannot read {} for {path} in the root filesystem", host.display())]
    Read {
        path: String,
        host: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// Result of squashfs operations.
pub type Result<T> = std::result::Result<T, SquashfsError>;

/// The compressor of the data and metadata blocks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Compression {
    /// zstd: fast to decompress at boot, needs `CONFIG_SQUASHFS_ZSTD`.
    #[default]
    Zstd,
    /// xz: smaller, slower to decompress, needs `CONFIG_SQUASHFS_XZ`.
    Xz,
}

/// A branch/call/jump filter run before xz: it rewrites relative call targets to absolute ones
/// so that repeated calls to one function compress as repeats (3% off an x86-64 binary).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BranchFilter {
    /// x86 (32- and 64-bit) code; the kernel decodes it with `CONFIG_XZ_DEC_X86`.
    X86,
}

/// How to write the image.
#[derive(Clone, Debug)]
pub struct SquashfsOptions {
    pub compression: Compression,
    /// Compression level (zstd 1..=22, xz 0..=9); `None` for the compressor's default as
    /// mksquashfs uses it (zstd 15, xz 6).
    pub level: Option<u32>,
    /// Data block size: a power of two from 4 KiB to 1 MiB.
    pub block_size: u32,
    /// xz only: the branch filter applied to every block.
    pub branch_filter: Option<BranchFilter>,
    /// A cache of compressed data blocks across writes (see `block_cache`); `None` compresses
    /// every block.
    pub block_cache: Option<BlockCache>,
    /// The files' modification times.
    pub times: FileTimes,
}

impl Default for SquashfsOptions {
    fn default() -> Self {
        SquashfsOptions {
            compression: Compression::Zstd,
            level: None,
            block_size: 128 * 1024,
            branch_filter: None,
            block_cache: None,
            times: FileTimes::default(),
        }
    }
}

/// The kernel's encoding of a device number in squashfs inodes (`new_encode_dev`).
fn encode_dev(major: u32, minor: u32) -> u32 {
    (minor & 0xff) | (major << 8) | ((minor & !0xff) << 12)
}

/// backhand's error as ours: an I/O error (a full disk) keeps its io::Error as the source, so
/// its text ("No space left on device") reaches the user.
fn backhand_error(out: &Path, context: String, e: backhand::BackhandError) -> SquashfsError {
    match e {
        backhand::BackhandError::StdIo(source) => SquashfsError::Io {
            path: out.to_path_buf(),
            source,
        },
        other => SquashfsError::Backhand {
            path: out.to_path_buf(),
            context,
            message: other.to_string(),
        },
    }
}

/// An empty image whose root directory carries `mtime`, to start a writer from. backhand has
/// no setter for the root's time (a new writer's root has 0, 1970, which is what `stat /app`
/// showed once the app had a filesystem of its own), but it keeps the root of an image it
/// read: so an empty image is written, read back and given the time.
fn root_seed(
    mtime: u32,
) -> std::result::Result<FilesystemReader<'static>, backhand::BackhandError> {
    let mut empty = Cursor::new(Vec::new());
    FilesystemWriter::default().write(&mut empty)?;
    empty.set_position(0);
    let mut seed = FilesystemReader::from_reader(empty)?;
    for node in seed.root.nodes.iter_mut() {
        if node.fullpath == Path::new("/") {
            node.header.mtime = mtime;
        }
    }
    Ok(seed)
}

/// Writes `tree` as a squashfs image at `out`, atomically.
pub fn write_squashfs(tree: &Tree, out: &Path, opts: &SquashfsOptions) -> Result<()> {
    let bs = opts.block_size;
    if !(4096..=1024 * 1024).contains(&bs) || !bs.is_power_of_two() {
        return Err(SquashfsError::BlockSize(bs));
    }
    if opts.branch_filter.is_some() && opts.compression != Compression::Xz {
        return Err(SquashfsError::FilterWithoutXz);
    }
    let bh_err = |context: String| move |e| backhand_error(out, context, e);
    let io_err = |source| SquashfsError::Io {
        path: out.to_path_buf(),
        source,
    };

    let seed = root_seed(opts.times.epoch()).map_err(bh_err("root directory time".into()))?;
    let mut fs_writer =
        FilesystemWriter::from_fs_reader(&seed).map_err(bh_err("root directory time".into()))?;
    fs_writer.set_time(opts.times.epoch());
    fs_writer.set_block_size(bs);
    fs_writer.set_only_root_id();
    fs_writer.set_kib_padding(4);
    let compressor = match opts.compression {
        Compression::Zstd => FilesystemCompressor::new(
            Compressor::Zstd,
            Some(CompressionOptions::Zstd(Zstd {
                compression_level: opts.level.unwrap_or(15),
            })),
        ),
        Compression::Xz => {
            // The filter bits as squashfs-tools writes them (x86 = 1); the dictionary is one
            // block, what the kernel allocates per decompressor anyway.
            let options = opts.branch_filter.map(|BranchFilter::X86| {
                CompressionOptions::Xz(Xz {
                    dictionary_size: bs,
                    filters: XzFilter::new(1),
                    bit_opts: None,
                    fb: None,
                })
            });
            let mut c = FilesystemCompressor::new(Compressor::Xz, options)
                .map_err(bh_err("compressor".into()))?;
            if let Some(level) = opts.level {
                let mut extra = backhand::ExtraXz::default();
                extra
                    .level(level)
                    .map_err(bh_err(format!("xz level {level}")))?;
                c.extra(backhand::CompressionExtra::Xz(extra))
                    .map_err(bh_err("xz options".into()))?;
            }
            Ok(c)
        }
    }
    .map_err(bh_err("compressor".into()))?;
    fs_writer.set_compressor(compressor);
    let cache = opts.block_cache.as_ref().map(CachingCompressor::leaked);
    if let Some(cache) = cache {
        let files: Vec<&FileSource> = tree
            .iter()
            .filter_map(|(_, node)| match node {
                Node::File { source, .. } => Some(source),
                _ => None,
            })
            .collect();
        cache.prefill(&files, compressor, bs);
        fs_writer.set_kind(Kind::new_v4(cache));
    }

    for (path, node) in tree.iter() {
        let epoch = opts.times.epoch();
        let header = |mode: u32, mtime: u32| NodeHeader::new((mode & 0o7777) as u16, 0, 0, mtime);
        let ctx = || format!("adding {path}");
        if path == "/" {
            if let Node::Dir { mode } = node {
                fs_writer.set_root_mode((mode & 0o7777) as u16);
            }
            fs_writer.set_root_uid(0);
            fs_writer.set_root_gid(0);
            continue;
        }
        match node {
            Node::Dir { mode } => fs_writer
                .push_dir(path, header(*mode, epoch))
                .map_err(bh_err(ctx()))?,
            Node::Symlink { target } => fs_writer
                .push_symlink(target.as_str(), path, header(0o777, epoch))
                .map_err(bh_err(ctx()))?,
            Node::CharDevice { major, minor, mode } => fs_writer
                .push_char_device(encode_dev(*major, *minor), path, header(*mode, epoch))
                .map_err(bh_err(ctx()))?,
            Node::File { source, mode } => {
                // The time needs the content: read it now (streamed; backhand reads it again).
                let mtime = opts.times.file(source).map_err(|e| SquashfsError::Read {
                    path: path.to_string(),
                    host: match source {
                        FileSource::Host(host) => host.clone(),
                        FileSource::Bytes(_) => PathBuf::from("(generated)"),
                    },
                    source: e,
                })?;
                match source {
                    FileSource::Host(host) => {
                        // backhand opens the file only when writing; check now for a clear error.
                        fs::metadata(host).map_err(|source| SquashfsError::Read {
                            path: path.to_string(),
                            host: host.clone(),
                            source,
                        })?;
                        fs_writer
                            .push_file_from_path(host.clone(), path, header(*mode, mtime))
                            .map_err(bh_err(ctx()))?
                    }
                    FileSource::Bytes(bytes) => fs_writer
                        .push_file(Cursor::new(bytes.clone()), path, header(*mode, mtime))
                        .map_err(bh_err(ctx()))?,
                }
            }
        }
    }

    let dir = match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let tmp = tempfile::Builder::new()
        .prefix(".fuse-rootfs-")
        .suffix(".tmp")
        .tempfile_in(dir)
        .map_err(io_err)?;
    {
        let mut w = BufWriter::new(tmp.as_file());
        fs_writer.write(&mut w).map_err(bh_err("writing".into()))?;
        w.flush().map_err(io_err)?;
    }
    if let Some(cache) = cache {
        cache.prune_if_grown();
    }
    tmp.as_file()
        .set_permissions(fs::Permissions::from_mode(0o644))
        .map_err(io_err)?;
    tmp.as_file().sync_all().map_err(io_err)?;
    tmp.persist(out).map_err(|e| io_err(e.error))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    #[test]
    fn a_write_error_keeps_its_cause() {
        let out = Path::new("/store/rootfs.squashfs");
        let full = io::Error::from_raw_os_error(28); // ENOSPC
        let e = backhand_error(out, "writing".into(), backhand::BackhandError::StdIo(full));
        let source = std::error::Error::source(&e).expect("the io::Error is the source");
        assert!(
            source.to_string().contains("No space left on device"),
            "{source}"
        );
        let other = backhand_error(
            out,
            "adding /x".into(),
            backhand::BackhandError::DuplicatedFileName,
        );
        assert!(
            other
                .to_string()
                .ends_with("(adding /x): file duplicated in squashfs image"),
            "{other}"
        );
    }

    fn tree_from(host: &Path) -> Tree {
        let mut t = Tree::new();
        t.add_host_dir_recursive("/app", host).unwrap();
        t.add_bytes("/etc/hostname", &b"fuse\n"[..], 0o644).unwrap();
        t.add_dir("/secret", 0o700).unwrap();
        t.add_symlink("/bin", "app/bin").unwrap();
        t
    }

    fn populate(dir: &Path) {
        fs::create_dir_all(dir.join("bin")).unwrap();
        fs::write(dir.join("bin/run"), b"#!/bin/sh\nexit 0\n").unwrap();
        fs::set_permissions(dir.join("bin/run"), fs::Permissions::from_mode(0o700)).unwrap();
        // Larger than a block, compressible and not, plus an empty file and a duplicate.
        let big: Vec<u8> = (0..300_000u32).map(|i| (i * 7 % 251) as u8).collect();
        fs::write(dir.join("big"), &big).unwrap();
        let mut noise = Vec::new();
        let mut x = 12345u32;
        for _ in 0..50_000 {
            x = x.wrapping_mul(1_103_515_245).wrapping_add(12345);
            noise.push((x >> 16) as u8);
        }
        fs::write(dir.join("noise"), &noise).unwrap();
        fs::write(dir.join("empty"), b"").unwrap();
        fs::write(dir.join("copy-of-big"), &big).unwrap();
        std::os::unix::fs::symlink("bin/run", dir.join("run")).unwrap();
    }

    fn unsquashfs(args: &[&str]) -> String {
        let out = Command::new("unsquashfs")
            .args(args)
            .env("TZ", "UTC")
            .output()
            .expect("unsquashfs must be installed");
        assert!(
            out.status.success(),
            "unsquashfs {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    #[test]
    fn image_extracts_to_the_same_tree() {
        let dir = tempfile::tempdir().unwrap();
        let host = dir.path().join("src");
        populate(&host);
        let tree = tree_from(&host);
        let img = dir.path().join("root.img");
        write_squashfs(&tree, &img, &SquashfsOptions::default()).unwrap();
        assert_eq!(fs::metadata(&img).unwrap().len() % 4096, 0);
        let bytes = fs::read(&img).unwrap();
        assert_eq!(&bytes[..4], b"hsqs");
        // Superblock mkfs_time (offset 8) is 0, compression id (offset 20) is zstd (6).
        assert_eq!(&bytes[8..12], &[0, 0, 0, 0]);
        assert_eq!(u16::from_le_bytes([bytes[20], bytes[21]]), 6);

        let listing = unsquashfs(&["-ll", "-n", img.to_str().unwrap()]);
        let stats = unsquashfs(&["-s", img.to_str().unwrap()]);
        assert!(stats.contains("Number of xattr ids 0"), "{stats}");
        assert!(stats.contains("Number of ids 1"), "{stats}");
        for line in listing.lines().filter(|l| l.contains("squashfs-root")) {
            assert!(
                line.contains(" root/root ") || line.contains(" 0/0 "),
                "{line}"
            );
            assert!(line.contains("1970-01-01 00:00"), "{line}");
        }
        assert!(listing.contains("lrwxrwxrwx"), "{listing}");

        let out = dir.path().join("out");
        unsquashfs(&["-n", "-d", out.to_str().unwrap(), img.to_str().unwrap()]);
        let mut seen = 0;
        for (path, node) in tree.iter() {
            let p = out.join(path.trim_start_matches('/'));
            let meta = fs::symlink_metadata(&p).unwrap_or_else(|e| panic!("{path}: {e}"));
            match node {
                Node::Dir { mode } => {
                    assert!(meta.is_dir(), "{path}");
                    assert_eq!(meta.permissions().mode() & 0o7777, *mode, "{path}");
                }
                Node::File { source, mode } => {
                    assert_eq!(fs::read(&p).unwrap(), source.read().unwrap(), "{path}");
                    assert_eq!(meta.permissions().mode() & 0o7777, *mode, "{path}");
                }
                Node::Symlink { target } => {
                    assert_eq!(fs::read_link(&p).unwrap(), Path::new(target), "{path}");
                }
                Node::CharDevice { .. } => unreachable!(),
            }
            seen += 1;
        }
        assert_eq!(seen, tree.len());
        assert!(matches!(
            tree.get("/app/bin/run"),
            Some(Node::File { mode: 0o755, .. })
        ));
        // Nothing extra in the image.
        let count = walk_count(&out);
        assert_eq!(count, tree.len());
    }

    #[test]
    fn files_carry_their_content_derived_times_and_the_rest_the_epoch() {
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().unwrap();
        let host = dir.path().join("src");
        populate(&host);
        let tree = tree_from(&host);
        let img = dir.path().join("root.img");
        let times = FileTimes {
            epoch: 1_700_000_000,
        };
        let opts = SquashfsOptions {
            times,
            ..Default::default()
        };
        write_squashfs(&tree, &img, &opts).unwrap();
        let bytes = fs::read(&img).unwrap();
        assert_eq!(bytes[8..12], times.epoch.to_le_bytes(), "superblock time");
        // unsquashfs restores the times it reads: they are what the guest's stat() sees.
        let out = dir.path().join("out");
        unsquashfs(&["-n", "-d", out.to_str().unwrap(), img.to_str().unwrap()]);
        let root = fs::metadata(&out).unwrap();
        assert_eq!(root.mtime(), i64::from(times.epoch), "the root directory");
        let mut file_times = std::collections::BTreeSet::new();
        for (path, node) in tree.iter().filter(|(p, _)| *p != "/") {
            let meta = fs::symlink_metadata(out.join(path.trim_start_matches('/'))).unwrap();
            let expected = match node {
                Node::File { source, .. } => times.file(source).unwrap(),
                _ => times.epoch,
            };
            assert_eq!(meta.mtime(), i64::from(expected), "{path}");
            if let Node::File { .. } = node {
                file_times.insert(expected);
            }
        }
        assert!(file_times.len() > 1, "files of other contents, other times");
    }

    fn walk_count(p: &Path) -> usize {
        let mut n = 1;
        if fs::symlink_metadata(p).unwrap().is_dir() {
            for e in fs::read_dir(p).unwrap() {
                n += walk_count(&e.unwrap().path());
            }
        }
        n
    }

    #[test]
    fn output_is_deterministic_across_host_copies() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("a");
        let b = dir.path().join("b");
        populate(&a);
        std::thread::sleep(std::time::Duration::from_millis(1100));
        populate(&b);
        // Different mtimes and modes beyond the exec bit on the host copies.
        fs::set_permissions(b.join("big"), fs::Permissions::from_mode(0o600)).unwrap();
        for opts in [
            SquashfsOptions::default(),
            SquashfsOptions {
                compression: Compression::Xz,
                ..Default::default()
            },
        ] {
            let ia = dir.path().join("a.img");
            let ib = dir.path().join("b.img");
            write_squashfs(&tree_from(&a), &ia, &opts).unwrap();
            write_squashfs(&tree_from(&b), &ib, &opts).unwrap();
            let (ba, bb) = (fs::read(&ia).unwrap(), fs::read(&ib).unwrap());
            assert!(ba == bb, "{opts:?}: images differ");
            write_squashfs(&tree_from(&a), &ia, &opts).unwrap();
            assert!(fs::read(&ia).unwrap() == ba, "{opts:?}: rewrite differs");
        }
        // No temp files left behind.
        let leftovers: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().ends_with(".tmp"))
            .collect();
        assert!(leftovers.is_empty());
    }

    #[test]
    fn xz_with_branch_filter_and_block_cache_reads_back_and_matches_uncached_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let host = dir.path().join("src");
        populate(&host);
        // An x86-64 executable: the data the branch filter is for.
        let exe = std::env::current_exe().unwrap();
        let mut tree = tree_from(&host);
        tree.add_host_file("/app/exe", &exe, 0o755).unwrap();
        let opts = SquashfsOptions {
            compression: Compression::Xz,
            level: Some(1),
            block_size: 128 * 1024,
            branch_filter: Some(BranchFilter::X86),
            block_cache: None,
            times: FileTimes {
                epoch: 1_700_000_000,
            },
        };
        let plain = dir.path().join("plain.img");
        write_squashfs(&tree, &plain, &opts).unwrap();
        let cache = dir.path().join("cache");
        // A limit of 0 bytes: the cache is pruned empty after any write that added to it.
        let cached = |dir: &Path| SquashfsOptions {
            block_cache: Some(BlockCache {
                dir: dir.to_path_buf(),
                max_bytes: 0,
            }),
            ..opts.clone()
        };
        let unlimited = SquashfsOptions {
            block_cache: Some(BlockCache {
                dir: cache.clone(),
                max_bytes: u64::MAX,
            }),
            ..opts.clone()
        };
        let (cold, warm) = (dir.path().join("cold.img"), dir.path().join("warm.img"));
        write_squashfs(&tree, &cold, &unlimited).unwrap();
        let entries = fs::read_dir(&cache).unwrap().count();
        assert!(entries > 0, "nothing cached");
        // A warm write adds nothing, so it does not prune, even over the limit.
        write_squashfs(&tree, &warm, &cached(&cache)).unwrap();
        assert_eq!(fs::read_dir(&cache).unwrap().count(), entries);
        // A write that adds entries prunes to the limit.
        let pruned_cache = dir.path().join("pruned-cache");
        let pruned = dir.path().join("pruned.img");
        write_squashfs(&tree, &pruned, &cached(&pruned_cache)).unwrap();
        let left: usize = fs::read_dir(&pruned_cache)
            .unwrap()
            .map(|shard| fs::read_dir(shard.unwrap().path()).unwrap().count())
            .sum();
        assert_eq!(left, 0, "not pruned");
        let bytes = fs::read(&plain).unwrap();
        assert!(
            fs::read(&pruned).unwrap() == bytes,
            "pruned-cache write differs"
        );
        assert!(
            fs::read(&cold).unwrap() == bytes,
            "cold cached write differs"
        );
        assert!(
            fs::read(&warm).unwrap() == bytes,
            "warm cached write differs"
        );
        // Compression id 4 (xz), and unsquashfs (liblzma) gets the executable back.
        assert_eq!(u16::from_le_bytes([bytes[20], bytes[21]]), 4);
        let out = dir.path().join("out");
        unsquashfs(&["-n", "-d", out.to_str().unwrap(), plain.to_str().unwrap()]);
        assert!(fs::read(out.join("app/exe")).unwrap() == fs::read(&exe).unwrap());
        assert_eq!(
            fs::read(out.join("app/big")).unwrap(),
            fs::read(host.join("big")).unwrap()
        );
    }

    #[test]
    fn char_device_is_written() {
        let dir = tempfile::tempdir().unwrap();
        let mut t = Tree::new();
        t.add_char_device("/dev/console", 5, 1, 0o600).unwrap();
        let img = dir.path().join("dev.img");
        write_squashfs(&t, &img, &SquashfsOptions::default()).unwrap();
        let listing = unsquashfs(&["-ll", "-n", img.to_str().unwrap()]);
        let line = listing
            .lines()
            .find(|l| l.ends_with("/dev/console"))
            .unwrap_or_else(|| panic!("{listing}"));
        assert!(line.starts_with("crw-------"), "{line}");
        assert!(
            line.contains(" 5,  1 ") || line.contains(" 5, 1 "),
            "{line}"
        );
    }

    #[test]
    fn errors_are_clear() {
        let dir = tempfile::tempdir().unwrap();
        let bad = SquashfsOptions {
            block_size: 1000,
            ..Default::default()
        };
        let err = write_squashfs(&Tree::new(), &dir.path().join("x"), &bad).unwrap_err();
        assert!(matches!(err, SquashfsError::BlockSize(1000)), "{err}");
        let bad = SquashfsOptions {
            branch_filter: Some(BranchFilter::X86),
            ..Default::default()
        };
        let err = write_squashfs(&Tree::new(), &dir.path().join("x"), &bad).unwrap_err();
        assert!(matches!(err, SquashfsError::FilterWithoutXz), "{err}");
        assert!(!dir.path().join("x").exists());

        let host = dir.path().join("f");
        fs::write(&host, b"x").unwrap();
        let mut t = Tree::new();
        t.add_host_file("/f", &host, 0o644).unwrap();
        fs::remove_file(&host).unwrap();
        let out = dir.path().join("y.img");
        let err = write_squashfs(&t, &out, &SquashfsOptions::default()).unwrap_err();
        assert!(err.to_string().contains("/f"), "{err}");
        assert!(!out.exists());
    }
}
