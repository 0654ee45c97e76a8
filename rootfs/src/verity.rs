//! The dm-verity hash tree of a root filesystem, laid out as the kernel's `verity` target reads
//! it (format version 1, sha256, 4096-byte data and hash blocks, no superblock), so the same
//! bytes `veritysetup format --no-superblock` writes.
//!
//! Each data block is hashed as `sha256(salt || block)` (version 1 prepends the salt); the
//! digests are packed 128 to a hash block (zero-padded), and those blocks hashed the same way
//! into the next level, until one block is left: its hash is the root hash. On the hash device
//! the top level comes first and the leaves last (`hash_level_block` in
//! drivers/md/dm-verity-target.c). A single data block has no tree: its hash is the root hash.
//!
//! The salt is the root filesystem's own sha256: derived from the content (no randomness, so
//! the disk stays reproducible) and different for every image, which is what a salt is for.

use sha2::{Digest as _, Sha256};
use std::io::{self, Read};

/// Data and hash block size.
pub const BLOCK_SIZE: usize = 4096;
/// sha256.
pub const DIGEST_SIZE: usize = 32;
/// Digests per hash block (the kernel's `1 << hash_per_block_bits`).
pub const HASHES_PER_BLOCK: usize = BLOCK_SIZE / DIGEST_SIZE;
/// The on-disk format version (salt prepended).
pub const VERSION: u32 = 1;
/// The hash algorithm's name in a dm table.
pub const ALGORITHM: &str = "sha256";

/// A hash tree: what the hash partition holds and what the dm table names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HashTree {
    pub data_blocks: u64,
    pub salt: Vec<u8>,
    pub root_hash: [u8; DIGEST_SIZE],
    /// The hash device's bytes, from its block 0 (the top level) to the leaves.
    pub hash: Vec<u8>,
}

impl HashTree {
    pub fn root_hash_hex(&self) -> String {
        hex::encode(self.root_hash)
    }

    pub fn salt_hex(&self) -> String {
        hex::encode(&self.salt)
    }
}

/// Where each level starts on the hash device, in blocks, and how many blocks it has;
/// index 0 is the leaves (the kernel's `hash_level_block[i]`).
pub fn levels(data_blocks: u64) -> Vec<(u64, u64)> {
    let bits = HASHES_PER_BLOCK.trailing_zeros();
    let mut count = 0u32;
    while data_blocks > 0 && bits * count < 64 && (data_blocks - 1) >> (bits * count) != 0 {
        count += 1;
    }
    let mut out = vec![(0, 0); count as usize];
    let mut position = 0;
    for i in (0..count as usize).rev() {
        let shift = (i as u32 + 1) * bits;
        let blocks = (data_blocks + (1u64 << shift) - 1) >> shift;
        out[i] = (position, blocks);
        position += blocks;
    }
    out
}

/// The salt fuse uses for a root filesystem whose sha256 is `digest` (`sha256:<hex>` or hex).
pub fn salt_for(digest: &str) -> Vec<u8> {
    hex::decode(digest.strip_prefix("sha256:").unwrap_or(digest))
        .unwrap_or_else(|_| Sha256::digest(digest.as_bytes()).to_vec())
}

fn hash_block(salt: &[u8], block: &[u8]) -> [u8; DIGEST_SIZE] {
    let mut h = Sha256::new();
    h.update(salt);
    h.update(block);
    h.finalize().into()
}

/// The salted hash of every data block of `data` (the last block zero-padded).
pub fn data_hashes(mut data: impl Read, salt: &[u8]) -> io::Result<Vec<[u8; DIGEST_SIZE]>> {
    let mut hashes = Vec::new();
    let mut block = vec![0u8; BLOCK_SIZE];
    loop {
        let mut filled = 0;
        while filled < BLOCK_SIZE {
            match data.read(&mut block[filled..]) {
                Ok(0) => break,
                Ok(n) => filled += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        if filled == 0 {
            break;
        }
        block[filled..].fill(0);
        hashes.push(hash_block(salt, &block));
        if filled < BLOCK_SIZE {
            break;
        }
    }
    Ok(hashes)
}

/// Packs digests into zero-padded hash blocks.
fn pack(hashes: &[[u8; DIGEST_SIZE]]) -> Vec<u8> {
    let mut out = vec![0u8; hashes.len().div_ceil(HASHES_PER_BLOCK) * BLOCK_SIZE];
    for (chunk, hashes) in out
        .chunks_mut(BLOCK_SIZE)
        .zip(hashes.chunks(HASHES_PER_BLOCK))
    {
        for (i, h) in hashes.iter().enumerate() {
            chunk[i * DIGEST_SIZE..(i + 1) * DIGEST_SIZE].copy_from_slice(h);
        }
    }
    out
}

/// The tree over data blocks whose hashes are `leaves`.
pub fn tree_of(leaves: &[[u8; DIGEST_SIZE]], salt: &[u8]) -> HashTree {
    let data_blocks = leaves.len().max(1) as u64;
    let mut hashes = if leaves.is_empty() {
        vec![hash_block(salt, &[0u8; BLOCK_SIZE])]
    } else {
        leaves.to_vec()
    };
    let mut levels = Vec::new();
    while hashes.len() > 1 {
        let level = pack(&hashes);
        hashes = level
            .chunks(BLOCK_SIZE)
            .map(|b| hash_block(salt, b))
            .collect();
        levels.push(level);
    }
    HashTree {
        data_blocks,
        salt: salt.to_vec(),
        root_hash: hashes[0],
        hash: levels.into_iter().rev().flatten().collect(),
    }
}

/// The hash tree of `data` (an empty input counts as one zero block).
pub fn build(data: impl Read, salt: &[u8]) -> io::Result<HashTree> {
    Ok(tree_of(&data_hashes(data, salt)?, salt))
}

/// A place where a stored tree and its data disagree, found as the kernel would: from the
/// root hash down.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mismatch {
    /// The top hash block (or the single data block) does not hash to the root hash.
    RootHash,
    /// Hash block `block` of the hash device (level `level`, 0 = leaves) does not match its
    /// digest in the level above.
    HashBlock { level: usize, block: u64 },
    /// Data block `block` does not match its digest in the leaves.
    DataBlock { block: u64 },
    /// The tree verifies, but its bytes (padding) are not what fuse writes, at this byte of
    /// the hash device.
    Padding { offset: u64 },
}

/// Checks `stored` (the hash device's bytes, at least the tree's length) against `leaves`
/// (the data's block hashes, [`data_hashes`]) and `root_hash`, top-down as dm-verity does.
/// Blocks under a bad hash block are not judged (their digests are not to be trusted); at
/// most `limit` mismatches are returned.
pub fn check(
    leaves: &[[u8; DIGEST_SIZE]],
    salt: &[u8],
    stored: &[u8],
    root_hash: &[u8; DIGEST_SIZE],
    limit: usize,
) -> Vec<Mismatch> {
    let data_blocks = leaves.len() as u64;
    let layout = levels(data_blocks);
    let mut bad = Vec::new();
    let Some(&(top_start, _)) = layout.last() else {
        if leaves.first() != Some(root_hash) {
            bad.push(Mismatch::RootHash);
        }
        return bad;
    };
    let tree_len = layout.iter().map(|l| l.1).sum::<u64>() as usize * BLOCK_SIZE;
    if stored.len() < tree_len {
        return vec![Mismatch::HashBlock {
            level: layout.len() - 1,
            block: (stored.len() / BLOCK_SIZE) as u64,
        }];
    }
    let block_at = |b: u64| &stored[b as usize * BLOCK_SIZE..(b as usize + 1) * BLOCK_SIZE];
    let entry = |parent: &[u8], i: u64| -> [u8; DIGEST_SIZE] {
        let i = (i % HASHES_PER_BLOCK as u64) as usize * DIGEST_SIZE;
        parent[i..i + DIGEST_SIZE].try_into().expect("32 bytes")
    };
    // Hash blocks (by device block number) known good: the top one against the root hash.
    let mut trusted = vec![false; tree_len / BLOCK_SIZE];
    if hash_block(salt, block_at(top_start)) == *root_hash {
        trusted[top_start as usize] = true;
    } else {
        bad.push(Mismatch::RootHash);
    }
    for level in (0..layout.len()).rev() {
        let (start, count) = layout[level];
        for i in 0..count {
            let parent_of = |child: u64| -> Option<u64> {
                let (pstart, _) = *layout.get(level + 1)?;
                Some(pstart + child / HASHES_PER_BLOCK as u64)
            };
            if level + 1 < layout.len() {
                let parent = parent_of(i).expect("not the top");
                if !trusted[parent as usize] {
                    continue;
                }
                if hash_block(salt, block_at(start + i)) == entry(block_at(parent), i) {
                    trusted[(start + i) as usize] = true;
                } else {
                    bad.push(Mismatch::HashBlock {
                        level,
                        block: start + i,
                    });
                }
            }
        }
    }
    let (leaf_start, _) = layout[0];
    for (n, leaf) in leaves.iter().enumerate() {
        let parent = leaf_start + n as u64 / HASHES_PER_BLOCK as u64;
        if trusted[parent as usize] && entry(block_at(parent), n as u64) != *leaf {
            bad.push(Mismatch::DataBlock { block: n as u64 });
        }
    }
    if bad.is_empty() {
        let rebuilt = tree_of(leaves, salt).hash;
        if let Some(at) = rebuilt.iter().zip(stored).position(|(a, b)| a != b) {
            bad.push(Mismatch::Padding { offset: at as u64 });
        }
    }
    bad.truncate(limit);
    bad
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(blocks: usize, seed: u8) -> Vec<u8> {
        (0..blocks * BLOCK_SIZE)
            .map(|i| (i as u32).wrapping_mul(2_654_435_761).to_le_bytes()[3] ^ seed)
            .collect()
    }

    fn salt() -> Vec<u8> {
        salt_for("sha256:00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff")
    }

    /// `veritysetup format --no-superblock` of `data` with our salt: (root hash, hash bytes).
    fn veritysetup(data: &[u8], salt: &[u8]) -> Option<(String, Vec<u8>)> {
        let dir = tempfile::tempdir().unwrap();
        let (d, h) = (dir.path().join("data"), dir.path().join("hash"));
        std::fs::write(&d, data).unwrap();
        std::fs::write(&h, b"").unwrap();
        let out = match std::process::Command::new("veritysetup")
            .args(["format", "--no-superblock", "--format=1", "--hash=sha256"])
            .args(["--data-block-size=4096", "--hash-block-size=4096"])
            .arg(format!("--salt={}", hex::encode(salt)))
            .arg(&d)
            .arg(&h)
            .output()
        {
            Ok(out) => out,
            Err(e) if e.kind() == io::ErrorKind::NotFound && std::env::var_os("CI").is_none() => {
                eprintln!("veritysetup missing (cryptsetup-bin, bash ci/setup): skipped");
                return None;
            }
            Err(e) => panic!("veritysetup: {e}"),
        };
        assert!(out.status.success(), "{out:?}");
        let text = String::from_utf8_lossy(&out.stdout);
        let root = text
            .lines()
            .find_map(|l| l.strip_prefix("Root hash:"))
            .unwrap_or_else(|| panic!("no root hash in {text}"))
            .trim()
            .to_string();
        Some((root, std::fs::read(&h).unwrap()))
    }

    #[test]
    fn test_levels_are_the_kernels() {
        assert_eq!(levels(1), vec![]);
        assert_eq!(levels(2), vec![(0, 1)]);
        assert_eq!(levels(128), vec![(0, 1)]);
        assert_eq!(levels(129), vec![(1, 2), (0, 1)]);
        assert_eq!(levels(128 * 128), vec![(1, 128), (0, 1)]);
        assert_eq!(levels(128 * 128 + 1), vec![(3, 129), (1, 2), (0, 1)]);
    }

    #[test]
    fn test_tree_is_veritysetups() {
        let salt = salt();
        for blocks in [1, 2, 127, 128, 129, 128 * 128 + 1] {
            let data = data(blocks, blocks as u8);
            let tree = build(&data[..], &salt).unwrap();
            assert_eq!(tree.data_blocks, blocks as u64);
            let want_len: u64 = levels(blocks as u64).iter().map(|l| l.1).sum();
            assert_eq!(tree.hash.len() as u64, want_len * BLOCK_SIZE as u64);
            let Some((root, hash)) = veritysetup(&data, &salt) else {
                return;
            };
            assert_eq!(tree.root_hash_hex(), root, "{blocks} blocks");
            assert_eq!(tree.hash.len(), hash.len(), "{blocks} blocks");
            assert!(tree.hash == hash, "{blocks} blocks: hash bytes differ");
        }
    }

    #[test]
    fn test_partial_last_block_is_zero_padded() {
        let salt = salt();
        let mut data = data(3, 9);
        data.truncate(2 * BLOCK_SIZE + 100);
        let mut padded = data.clone();
        padded.resize(3 * BLOCK_SIZE, 0);
        assert_eq!(
            build(&data[..], &salt).unwrap(),
            build(&padded[..], &salt).unwrap()
        );
    }

    #[test]
    fn test_check_locates_damage_top_down() {
        let salt = salt();
        let data = data(300, 3);
        let tree = build(&data[..], &salt).unwrap();
        let leaves = data_hashes(&data[..], &salt).unwrap();
        assert_eq!(
            check(&leaves, &salt, &tree.hash, &tree.root_hash, 10),
            vec![]
        );

        let mut bad_data = data.clone();
        bad_data[200 * BLOCK_SIZE + 17] ^= 1;
        let bad_leaves = data_hashes(&bad_data[..], &salt).unwrap();
        assert_eq!(
            check(&bad_leaves, &salt, &tree.hash, &tree.root_hash, 10),
            vec![Mismatch::DataBlock { block: 200 }]
        );

        // levels(300): leaves at blocks 1..=3, top at 0. A leaf block flipped: that block.
        let mut bad_hash = tree.hash.clone();
        bad_hash[2 * BLOCK_SIZE + 5] ^= 1;
        assert_eq!(
            check(&leaves, &salt, &bad_hash, &tree.root_hash, 10),
            vec![Mismatch::HashBlock { level: 0, block: 2 }]
        );
        let mut bad_top = tree.hash.clone();
        bad_top[3] ^= 1;
        assert_eq!(
            check(&leaves, &salt, &bad_top, &tree.root_hash, 10),
            vec![Mismatch::RootHash]
        );
        let mut bad_pad = tree.hash.clone();
        bad_pad[BLOCK_SIZE - 1] ^= 1;
        assert_eq!(
            check(&leaves, &salt, &bad_pad, &tree.root_hash, 10)[0],
            Mismatch::RootHash,
            "the top block's padding is hashed too"
        );
        let mut wrong_root = tree.root_hash;
        wrong_root[0] ^= 1;
        assert_eq!(
            check(&leaves, &salt, &tree.hash, &wrong_root, 10),
            vec![Mismatch::RootHash]
        );

        let one = build(&data[..BLOCK_SIZE], &salt).unwrap();
        assert!(one.hash.is_empty());
        let one_leaves = data_hashes(&data[..BLOCK_SIZE], &salt).unwrap();
        assert_eq!(check(&one_leaves, &salt, &[], &one.root_hash, 10), vec![]);
        assert_eq!(
            check(&leaves[1..2], &salt, &[], &one.root_hash, 10),
            vec![Mismatch::RootHash]
        );
    }
}
