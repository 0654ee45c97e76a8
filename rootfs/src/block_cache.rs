//! A content-addressed cache of compressed squashfs data blocks.
//!
//! An image is rebuilt after every change, but most of its bytes (the runtime: a node binary,
//! a jlink image, an interpreter) are the same blocks as last time. squashfs compresses each
//! data block on its own, so a block's compressed bytes depend only on its contents and the
//! compressor's settings: this cache keys them by those and skips the compressor on a hit.
//! It is what makes xz (minutes of CPU per gigabyte) affordable on warm builds.
//!
//! The output is bit-identical with or without the cache: the key covers everything the
//! compressed bytes depend on (contents, compressor and options, block size, and the versions
//! of the code that compresses), and every entry carries a SHA-256 of its bytes that is checked
//! on read, so a truncated or damaged entry is recompressed, never copied into an image.

use std::fs;
use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::SystemTime;

use backhand::compression::{CompressionAction, Compressor, DefaultCompressor};
use backhand::{BackhandError, FilesystemCompressor, SuperBlock};
use sha2::{Digest, Sha256};

use crate::tree::FileSource;

/// Blocks smaller than this (metadata blocks, short fragment blocks, short last pieces of
/// files) are cheap to compress and would only fill the cache with small files.
const MIN_CACHED_BLOCK: usize = 64 * 1024;

/// Where the cache lives and how large it may grow.
#[derive(Clone, Debug)]
pub struct BlockCache {
    pub dir: PathBuf,
    /// After a write that added entries, the least recently used are removed down to this.
    pub max_bytes: u64,
}

/// Everything besides a block's bytes that its compressed form depends on. Bump the tag when
/// the way blocks are compressed changes.
const KEY_TAG: &str = concat!(
    "fuse squashfs block v1; fuse-rootfs ",
    env!("CARGO_PKG_VERSION"),
    "; backhand 0.25"
);

/// A compressor that looks blocks up in (and adds them to) the cache before and after
/// compressing them with backhand's own compressor.
pub(crate) struct CachingCompressor {
    cache: BlockCache,
    /// Whether this write added an entry: only then can the cache have outgrown its limit.
    added: AtomicBool,
}

impl CachingCompressor {
    /// A compressor for one image write. backhand wants a `&'static` compressor; the few bytes
    /// of this one are leaked, once per image written.
    pub(crate) fn leaked(cache: &BlockCache) -> &'static CachingCompressor {
        Box::leak(Box::new(CachingCompressor {
            cache: cache.clone(),
            added: AtomicBool::new(false),
        }))
    }

    /// Prunes the cache to its limit if this write added to it (a warm build skips the walk).
    /// A cache that cannot be pruned only costs disk space, so errors are ignored.
    pub(crate) fn prune_if_grown(&self) {
        if self.added.load(Ordering::Relaxed) {
            let _ = prune(&self.cache.dir, self.cache.max_bytes);
        }
    }

    /// Stores a new entry, remembering that the cache grew.
    fn add(&self, path: &Path, compressed: &[u8]) {
        write_entry(path, compressed);
        self.added.store(true, Ordering::Relaxed);
    }

    /// Compresses into the cache, on every core, the full-size data blocks of `files` that it
    /// lacks, so that backhand's single-threaded pass over the tree then only hits. The blocks
    /// are those backhand will ask for: each file of at least one block, cut at multiples of
    /// `block_size` (the last piece too; squashfs-tools' tail-end packing is off), all-zero
    /// blocks (holes) and pieces the cache does not keep excepted. Smaller files go to
    /// fragment blocks, compressed in that pass. Unreadable files are skipped here; the pass
    /// reports them.
    pub(crate) fn prefill(&self, files: &[&FileSource], fc: FilesystemCompressor, block_size: u32) {
        let bs = u64::from(block_size);
        let mut jobs = Vec::new();
        for (i, file) in files.iter().enumerate() {
            let len = file.len().unwrap_or(0);
            if len >= bs {
                let pieces = (0..len.div_ceil(bs)).map(|b| (i, b * bs, bs.min(len - b * bs)));
                jobs.extend(pieces.filter(|&(_, _, n)| n >= MIN_CACHED_BLOCK as u64));
            }
        }
        let next = AtomicUsize::new(0);
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
        std::thread::scope(|scope| {
            for _ in 0..threads.min(jobs.len()) {
                scope.spawn(|| {
                    let mut buf = Vec::new();
                    while let Some(&(file, offset, len)) =
                        jobs.get(next.fetch_add(1, Ordering::Relaxed))
                    {
                        buf.resize(len as usize, 0);
                        if read_at(files[file], offset, &mut buf).is_err()
                            || buf.iter().all(|b| *b == 0)
                        {
                            continue;
                        }
                        let path = self.entry_path(&buf, &fc, block_size);
                        if !path.exists() {
                            if let Ok(compressed) = DefaultCompressor.compress(&buf, fc, block_size)
                            {
                                self.add(&path, &compressed);
                            }
                        }
                    }
                });
            }
        });
    }

    fn entry_path(&self, bytes: &[u8], fc: &FilesystemCompressor, block_size: u32) -> PathBuf {
        let mut h = Sha256::new();
        h.update(KEY_TAG.as_bytes());
        h.update(format!("{fc:?} block {block_size}").as_bytes());
        h.update(bytes);
        let key = hex::encode(h.finalize());
        self.cache.dir.join(&key[..2]).join(&key[2..])
    }
}

/// Fills `buf` with the bytes of `file` at `offset`.
fn read_at(file: &FileSource, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
    match file {
        FileSource::Host(path) => fs::File::open(path)?.read_exact_at(buf, offset),
        FileSource::Bytes(bytes) => {
            let start = usize::try_from(offset).unwrap_or(usize::MAX);
            let piece = bytes
                .get(start..start.saturating_add(buf.len()))
                .ok_or(std::io::ErrorKind::UnexpectedEof)?;
            buf.copy_from_slice(piece);
            Ok(())
        }
    }
}

/// The compressed bytes stored at `path`, if the entry is whole (its SHA-256 trailer matches).
fn read_entry(path: &Path) -> Option<Vec<u8>> {
    // Opened for appending (never done) so that the same handle can touch the mtime.
    let mut file = fs::File::options()
        .read(true)
        .append(true)
        .open(path)
        .ok()?;
    let mut data = Vec::new();
    file.read_to_end(&mut data).ok()?;
    let split = data.len().checked_sub(32)?;
    if Sha256::digest(&data[..split]).as_slice() != &data[split..] {
        return None;
    }
    data.truncate(split);
    // A hit counts as a use: pruning removes the least recently used entries first.
    let _ = file.set_modified(SystemTime::now());
    Some(data)
}

/// Stores `compressed` at `path` (atomically: a reader sees a whole entry or none). Failures
/// are ignored: the cache only ever saves time.
fn write_entry(path: &Path, compressed: &[u8]) {
    let Some(dir) = path.parent() else { return };
    let write = || -> std::io::Result<()> {
        fs::create_dir_all(dir)?;
        let mut tmp = tempfile::Builder::new()
            .prefix(".block-")
            .tempfile_in(dir)?;
        tmp.write_all(compressed)?;
        tmp.write_all(&Sha256::digest(compressed))?;
        tmp.persist(path).map_err(|e| e.error)?;
        Ok(())
    };
    let _ = write();
}

impl CompressionAction for CachingCompressor {
    type Error = BackhandError;
    type Compressor = Compressor;
    type FilesystemCompressor = FilesystemCompressor;
    type SuperBlock = SuperBlock;

    fn decompress(
        &self,
        bytes: &[u8],
        out: &mut Vec<u8>,
        compressor: Compressor,
    ) -> Result<(), BackhandError> {
        DefaultCompressor.decompress(bytes, out, compressor)
    }

    fn compress(
        &self,
        bytes: &[u8],
        fc: FilesystemCompressor,
        block_size: u32,
    ) -> Result<Vec<u8>, BackhandError> {
        if bytes.len() < MIN_CACHED_BLOCK {
            return DefaultCompressor.compress(bytes, fc, block_size);
        }
        let path = self.entry_path(bytes, &fc, block_size);
        if let Some(hit) = read_entry(&path) {
            return Ok(hit);
        }
        let compressed = DefaultCompressor.compress(bytes, fc, block_size)?;
        self.add(&path, &compressed);
        Ok(compressed)
    }

    fn compression_options(
        &self,
        superblock: &mut SuperBlock,
        kind: &backhand::kind::Kind,
        fs_compressor: FilesystemCompressor,
    ) -> Result<Option<Vec<u8>>, BackhandError> {
        DefaultCompressor.compression_options(superblock, kind, fs_compressor)
    }
}

/// Removes the least recently used entries of the cache at `dir` until it holds at most
/// `max_bytes`. Returns the bytes removed. A missing cache is an empty one.
pub fn prune(dir: &Path, max_bytes: u64) -> std::io::Result<u64> {
    let mut entries = Vec::new();
    let mut total = 0u64;
    let shards = match fs::read_dir(dir) {
        Ok(shards) => shards,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(e),
    };
    for shard in shards {
        let shard = shard?.path();
        if !shard.is_dir() {
            continue;
        }
        for entry in fs::read_dir(&shard)? {
            let entry = entry?;
            let meta = entry.metadata()?;
            if meta.is_file() {
                total += meta.len();
                let used = meta.modified().unwrap_or(SystemTime::UNIX_EPOCH);
                entries.push((used, entry.path(), meta.len()));
            }
        }
    }
    // Oldest first; the path breaks ties so the order does not depend on the directory's.
    entries.sort();
    let mut removed = 0;
    for (_, path, len) in entries {
        if total - removed <= max_bytes {
            break;
        }
        if fs::remove_file(&path).is_ok() {
            removed += len;
        }
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn compressible(len: usize, seed: u8) -> Vec<u8> {
        (0..len).map(|i| (i % 251) as u8 ^ seed).collect()
    }

    fn cache_at(dir: &Path) -> &'static CachingCompressor {
        CachingCompressor::leaked(&BlockCache {
            dir: dir.to_path_buf(),
            max_bytes: u64::MAX,
        })
    }

    fn entry_count(dir: &Path) -> usize {
        fs::read_dir(dir)
            .unwrap()
            .map(|d| d.unwrap().path())
            .filter(|p| p.is_dir())
            .map(|p| fs::read_dir(p).unwrap().count())
            .sum()
    }

    #[test]
    fn hit_returns_what_the_compressor_made_and_damaged_entries_are_recompressed() {
        let dir = tempfile::tempdir().unwrap();
        let cache = cache_at(dir.path());
        let fc = FilesystemCompressor::new(Compressor::Xz, None).unwrap();
        let block = compressible(128 * 1024, 7);
        let fresh = DefaultCompressor.compress(&block, fc, 128 * 1024).unwrap();

        assert_eq!(cache.compress(&block, fc, 128 * 1024).unwrap(), fresh);
        let path = cache.entry_path(&block, &fc, 128 * 1024);
        assert_eq!(read_entry(&path).unwrap(), fresh);
        assert_eq!(cache.compress(&block, fc, 128 * 1024).unwrap(), fresh);

        // Another block size is another key (the dictionary follows the block size).
        assert_ne!(cache.entry_path(&block, &fc, 256 * 1024), path);

        // A truncated entry is not trusted; the block is compressed again and the entry mended.
        let stored = fs::read(&path).unwrap();
        fs::write(&path, &stored[..stored.len() - 1]).unwrap();
        assert!(read_entry(&path).is_none());
        assert_eq!(cache.compress(&block, fc, 128 * 1024).unwrap(), fresh);
        assert_eq!(fs::read(&path).unwrap(), stored);

        // Small blocks bypass the cache.
        let small = compressible(1024, 1);
        cache.compress(&small, fc, 128 * 1024).unwrap();
        assert!(!cache.entry_path(&small, &fc, 128 * 1024).exists());
    }

    #[test]
    fn prefill_caches_the_blocks_backhand_will_ask_for() {
        let dir = tempfile::tempdir().unwrap();
        let cache = cache_at(dir.path());
        let fc = FilesystemCompressor::new(Compressor::Xz, None).unwrap();
        let bs = 128 * 1024;
        // A full block, a block of zeros (a hole: never compressed), a last piece the cache
        // keeps (96 KiB) and, in a second file, one it does not (16 KiB, under 64 KiB).
        let (first, last) = (compressible(bs, 3), compressible(bs * 3 / 4, 4));
        let short = compressible(bs / 8, 6);
        let host = dir.path().join("host-file");
        fs::write(&host, [first.clone(), vec![0; bs], last.clone()].concat()).unwrap();
        let with_short_tail =
            FileSource::Bytes([compressible(bs, 7), short.clone()].concat().into());
        let small = FileSource::Bytes(compressible(bs - 1, 5).into());
        let sources = [FileSource::Host(host), with_short_tail, small];
        let files: Vec<&FileSource> = sources.iter().collect();
        cache.prefill(&files, fc, bs as u32);

        let cached = |b: &[u8]| read_entry(&cache.entry_path(b, &fc, bs as u32));
        let fresh = DefaultCompressor.compress(&first, fc, bs as u32).unwrap();
        assert_eq!(cached(&first).unwrap(), fresh);
        assert!(cached(&last).is_some());
        assert!(cached(&compressible(bs, 7)).is_some());
        assert!(cached(&short).is_none());
        // Only those three: no hole, no short tail, nothing of the file smaller than a block.
        assert_eq!(entry_count(dir.path()), 3);
    }

    #[test]
    fn prune_removes_the_least_recently_used_first() {
        let dir = tempfile::tempdir().unwrap();
        let cache = cache_at(dir.path());
        let fc = FilesystemCompressor::new(Compressor::Xz, None).unwrap();
        let blocks: Vec<_> = (0..3).map(|i| compressible(64 * 1024, i)).collect();
        let paths: Vec<_> = blocks
            .iter()
            .map(|b| {
                cache.compress(b, fc, 64 * 1024).unwrap();
                cache.entry_path(b, &fc, 64 * 1024)
            })
            .collect();
        let age = |p: &Path, secs: u64| {
            let t = SystemTime::now() - std::time::Duration::from_secs(secs);
            fs::File::options()
                .append(true)
                .open(p)
                .unwrap()
                .set_modified(t)
                .unwrap();
        };
        age(&paths[0], 300);
        age(&paths[1], 100);
        age(&paths[2], 200);
        // Using the oldest makes it the newest.
        assert!(read_entry(&paths[0]).is_some());
        let sizes: Vec<u64> = paths
            .iter()
            .map(|p| fs::metadata(p).unwrap().len())
            .collect();
        let removed = prune(dir.path(), sizes[0] + sizes[1]).unwrap();
        assert_eq!(entry_count(dir.path()), 2);
        assert_eq!(removed, sizes[2]);
        assert!(paths[0].exists() && paths[1].exists() && !paths[2].exists());
        assert_eq!(prune(dir.path(), u64::MAX).unwrap(), 0);
        assert_eq!(prune(&dir.path().join("missing"), 0).unwrap(), 0);
    }
}
