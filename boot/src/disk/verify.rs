//! `fuse verify`: a disk checked byte for byte against what its manifest says it holds. Every
//! problem is collected with where it is (the part, the disk byte, the byte inside the part),
//! so one run reports all the damage.
//!
//! The checks, in order: the protective MBR and both GPT copies (CRCs, then byte for byte
//! against the table rewritten from the intact copy), the zero gaps between the structures,
//! the ESP (rebuilt from its UKI, it must come out identical), the UKI's sections against the
//! manifest, the GUIDs derived from the content, then for the root and the app's filesystem in
//! turn its partition and zero padding and its dm-verity tree (every hash block recomputed,
//! top-down from the root hash in `.cmdline`, as the kernel checks it at boot), and last the
//! whole disk's digest.

use std::fmt;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use fuse_rootfs::Arch;

use crate::error::with_causes;

use fuse_rootfs::verity::{self, Mismatch};

use super::{
    data_partition_uuid, disk_guid, efi_boot_path, esp, esp_guid, esp_serial, file_digest, gpt,
    hash_partition_uuid, hex_digest, read_at, read_layout, sha256_hex, uki, Disk, DiskError,
    Volume, MIB,
};

/// What a disk should hold, from its manifest (and the store's blobs, when there).
#[derive(Debug, Clone, Default)]
pub struct Expected {
    /// (`sha256:` digest, size, a file with the same bytes to locate a difference).
    pub kernel: Option<(String, u64, Option<PathBuf>)>,
    pub initrd: Option<(String, u64, Option<PathBuf>)>,
    pub rootfs: Option<(String, u64, Option<PathBuf>)>,
    /// The app's filesystem, likewise.
    pub appfs: Option<(String, u64, Option<PathBuf>)>,
    pub cmdline: Option<String>,
    /// The manifest's digest, when known from elsewhere than the disk (the store).
    pub manifest_digest: Option<String>,
    /// The whole disk's digest (the image reference's), when known.
    pub disk_digest: Option<String>,
}

/// One thing wrong with a disk, and where.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// Which part: `GPT primary header`, `root partition`, `UKI section .linux`, ...
    pub part: String,
    /// Byte offset on the disk where the damage is (or the part starts).
    pub disk_offset: u64,
    /// Byte offset inside the part, when located that precisely.
    pub part_offset: Option<u64>,
    pub what: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.part_offset {
            Some(at) => write!(
                f,
                "{}, byte {at} (disk byte {}): {}",
                self.part, self.disk_offset, self.what
            ),
            None => write!(
                f,
                "{} (disk byte {}): {}",
                self.part, self.disk_offset, self.what
            ),
        }
    }
}

/// Checks a disk against what it should hold: both GPT copies and their CRCs, the partition
/// GUIDs derived from the content, the ESP's FAT structures, every UKI section's digest, the
/// root partition's bytes and the zero padding. Returns every problem found, located.
pub fn verify(path: &Path, expected: &Expected) -> Result<Vec<Problem>, DiskError> {
    let read_err = |source| DiskError::Read {
        path: path.to_path_buf(),
        source,
    };
    let file = File::open(path).map_err(read_err)?;
    let size = file.metadata().map_err(read_err)?.len();
    let mut check = Checker {
        file,
        path,
        size,
        problems: Vec::new(),
    };
    let Some(table) = check.partition_table()? else {
        return Ok(check.problems);
    };
    check.table_bytes(&table)?;
    check.gaps(&table)?;
    let disk = match read_layout(path, &check.file, size, table) {
        Ok(disk) => disk,
        Err(e) => {
            let what = with_causes(&e);
            check.problem("EFI System Partition", MIB, None, what);
            return Ok(check.problems);
        }
    };
    let manifest_digest = sha256_hex(disk.section(uki::FUSE).unwrap_or_default());
    check.manifest(&disk, &manifest_digest, expected);
    check.esp(&disk)?;
    check.sections(&disk, expected);
    check.guids(&disk, &manifest_digest);
    for volume in Volume::ALL {
        check.data(&disk, volume, expected)?;
        check.verity(&disk, volume)?;
    }
    if check.problems.is_empty() {
        check.disk_digest(&disk, expected)?;
    }
    Ok(check.problems)
}

/// The disk being verified and the problems found so far.
struct Checker<'a> {
    file: File,
    path: &'a Path,
    size: u64,
    problems: Vec<Problem>,
}

/// Where the `i`th GPT partition entry is on the disk (the primary array at LBA 2).
fn entry_offset(i: usize) -> u64 {
    2 * 512 + i as u64 * 128
}

/// Where the UKI starts on the disk (else its ESP).
fn uki_offset(disk: &Disk) -> u64 {
    disk.uki_disk_offset
        .or(disk.esp().map(|p| p.offset()))
        .unwrap_or(MIB)
}

impl Checker<'_> {
    fn problem(
        &mut self,
        part: impl Into<String>,
        disk_offset: u64,
        part_offset: Option<u64>,
        what: impl Into<String>,
    ) {
        self.problems.push(Problem {
            part: part.into(),
            disk_offset,
            part_offset,
            what: what.into(),
        });
    }

    fn read_at(&self, offset: u64, len: usize) -> Result<Vec<u8>, DiskError> {
        read_at(&self.file, self.path, offset, len)
    }

    /// A damaged GPT structure, located by the structure.
    fn gpt_problem(&mut self, e: gpt::GptError) {
        let (part, offset) = match &e {
            gpt::GptError::NoProtectiveMbr => ("protective MBR".to_string(), 0),
            gpt::GptError::NoSignature { which, offset }
            | gpt::GptError::HeaderCrc { which, offset, .. }
            | gpt::GptError::Inconsistent { which, offset, .. } => {
                (format!("GPT {which} header"), *offset)
            }
            gpt::GptError::EntriesCrc { which, offset, .. } => {
                (format!("GPT {which} entry array"), *offset)
            }
            gpt::GptError::TooSmall { .. } | gpt::GptError::PartialSector { .. } => {
                ("disk".to_string(), 0)
            }
        };
        self.problem(part, offset, None, e.to_string());
    }

    /// The protective MBR and both GPT copies; the table of an intact copy, or `None` when
    /// neither is.
    fn partition_table(&mut self) -> Result<Option<gpt::Table>, DiskError> {
        let mbr = self.read_at(0, 512.min(self.size as usize))?;
        if let Err(e) = gpt::check_mbr(&mbr) {
            self.gpt_problem(e);
        }
        let read_err = |source| DiskError::Read {
            path: self.path.to_path_buf(),
            source,
        };
        let file = &self.file;
        let mut reader = |off: u64, len: usize| {
            let mut buf = vec![0u8; len];
            file.read_exact_at(&mut buf, off)?;
            Ok(buf)
        };
        let primary = gpt::read_one(self.size, true, &mut reader).map_err(read_err)?;
        let backup = gpt::read_one(self.size, false, &mut reader).map_err(read_err)?;
        Ok(match (primary, backup) {
            (Ok(p), Ok(b)) => {
                if p != b {
                    self.problem(
                        "GPT backup header",
                        self.size - 512,
                        None,
                        "the backup table describes other partitions than the primary",
                    );
                }
                Some(p)
            }
            (Ok(table), Err(e)) | (Err(e), Ok(table)) => {
                self.gpt_problem(e);
                Some(table)
            }
            (Err(e1), Err(e2)) => {
                self.gpt_problem(e1);
                self.gpt_problem(e2);
                None
            }
        })
    }

    /// The table rewritten from the intact copy must match both copies byte for byte: this
    /// locates a damaged byte exactly, where a CRC only says which structure is damaged.
    fn table_bytes(&mut self, table: &gpt::Table) -> Result<(), DiskError> {
        let mut located = Vec::new();
        for (offset, want) in table.regions() {
            let have = self.read_at(offset, want.len())?;
            let parts: &[(&str, usize, usize)] = if offset == 0 {
                &[
                    ("protective MBR", 0, 512),
                    ("GPT primary header", 512, 1024),
                    ("GPT primary entry array", 1024, want.len()),
                ]
            } else {
                &[
                    ("GPT backup entry array", 0, want.len() - 512),
                    ("GPT backup header", want.len() - 512, want.len()),
                ]
            };
            for &(part, start, end) in parts {
                if let Some(at) = (start..end).find(|&i| have[i] != want[i]) {
                    located.push(Problem {
                        part: part.to_string(),
                        disk_offset: offset + at as u64,
                        part_offset: Some((at - start) as u64),
                        what: format!(
                            "{:#04x}, the table (as its intact copy describes it) has {:#04x}",
                            have[at], want[at]
                        ),
                    });
                }
            }
        }
        if !located.is_empty() {
            // Exact locations replace the CRC reports of the same structures.
            self.problems
                .retain(|p| !located.iter().any(|l| l.part == p.part));
            self.problems.extend(located);
        }
        Ok(())
    }

    /// The sectors between the MBR/GPT and the partitions, between partitions and after the
    /// last one must be zero (nothing hides there).
    fn gaps(&mut self, table: &gpt::Table) -> Result<(), DiskError> {
        let size = self.size;
        let mut used: Vec<(u64, u64)> = vec![(0, 2 * 512 + 16384), (size - 512 - 16384, size)];
        used.extend(
            table
                .partitions
                .iter()
                .map(|p| (p.offset(), p.offset() + p.size())),
        );
        used.sort();
        let mut at = 0;
        for (start, end) in used {
            if start > at {
                self.zeros(at, start, "unpartitioned space", at)?;
            }
            at = at.max(end);
        }
        Ok(())
    }

    /// The manifest in the UKI's `.fuse` section is the image's.
    fn manifest(&mut self, disk: &Disk, manifest_digest: &str, expected: &Expected) {
        let Some(want) = &expected.manifest_digest else {
            return;
        };
        if hex_digest(want) != hex_digest(manifest_digest) {
            self.problem(
                "UKI section .fuse (manifest)",
                disk.section_disk_offset(uki::FUSE, 0)
                    .unwrap_or(uki_offset(disk)),
                None,
                format!("digest {manifest_digest}, the image's manifest is {want}"),
            );
        }
    }

    /// The ESP: rebuilt from the UKI it holds, it must come out byte for byte the same, so
    /// damage to the FAT structures is located to the byte.
    fn esp(&mut self, disk: &Disk) -> Result<(), DiskError> {
        let esp_part = disk.esp().expect("read_layout found it");
        let esp_bytes = self.read_at(esp_part.offset(), esp_part.size() as usize)?;
        let rebuilt = esp::build(
            &[(
                efi_boot_path(disk.arch().unwrap_or(Arch::X86_64)),
                &disk.uki,
            )],
            esp_part.size(),
            disk.esp_serial,
        )?;
        if let Some(at) = esp_bytes.iter().zip(&rebuilt).position(|(a, b)| a != b) {
            self.problem(
                "EFI System Partition (FAT structures)",
                esp_part.offset() + at as u64,
                Some(at as u64),
                "the FAT volume is not what fuse writes for its files",
            );
        }
        if disk.esp_files.len() != 1 {
            self.problem(
                "EFI System Partition",
                esp_part.offset(),
                None,
                format!(
                    "files {:?}, fuse writes only the UKI",
                    disk.esp_files.iter().map(|f| &f.0).collect::<Vec<_>>()
                ),
            );
        }
        Ok(())
    }

    /// The UKI's `.linux`, `.initrd` and `.cmdline` are the manifest's.
    fn sections(&mut self, disk: &Disk, expected: &Expected) {
        let uki_offset = uki_offset(disk);
        for (name, want) in [
            (uki::LINUX, &expected.kernel),
            (uki::INITRD, &expected.initrd),
        ] {
            let Some((digest, size, reference)) = want else {
                continue;
            };
            let Some(data) = disk.section(name) else {
                self.problem("UKI", uki_offset, None, format!("no {name} section"));
                continue;
            };
            let actual = sha256_hex(data);
            if hex_digest(&actual) != hex_digest(digest) || data.len() as u64 != *size {
                let start = disk.section_disk_offset(name, 0).unwrap_or(uki_offset);
                let at = reference.as_deref().and_then(|r| first_difference(data, r));
                self.problem(
                    format!("UKI section {name}"),
                    start + at.unwrap_or(0),
                    at,
                    format!(
                        "digest {actual} ({} bytes), the manifest says {digest} ({size} bytes)",
                        data.len()
                    ),
                );
            }
        }
        if let Some(want) = &expected.cmdline {
            let cmdline = cmdline(disk);
            if cmdline.as_deref() != Some(want.as_str()) {
                self.problem(
                    "UKI section .cmdline",
                    cmdline_offset(disk),
                    None,
                    format!("{cmdline:?}, the manifest says {want:?}"),
                );
            }
        }
    }

    /// The disk's GUID, the ESP's GUID and FAT serial are derived from the manifest.
    fn guids(&mut self, disk: &Disk, manifest_digest: &str) {
        let derived = disk_guid(manifest_digest);
        if disk.table.disk_guid != derived {
            self.problem(
                "GPT disk GUID",
                512 + 56,
                None,
                format!(
                    "{}, derived from the manifest it is {derived}",
                    disk.table.disk_guid
                ),
            );
        }
        let esp_part = disk.esp().expect("read_layout found it");
        if esp_part.unique_guid != esp_guid(manifest_digest)
            || disk.esp_serial != esp_serial(manifest_digest)
        {
            self.problem(
                "EFI System Partition",
                entry_offset(0) + 16,
                None,
                "its GUID or FAT serial is not the one derived from the manifest",
            );
        }
    }

    /// A filesystem's partition (the root's or the app's): its GUID (derived from the
    /// filesystem, and named by the command line), its bytes and the zero padding after them.
    fn data(&mut self, disk: &Disk, volume: Volume, expected: &Expected) -> Result<(), DiskError> {
        let label = volume.label();
        let Some(root) = disk.data_partition(volume) else {
            let what = match volume {
                Volume::Root => "no Linux root partition",
                Volume::App => "no app partition",
            };
            self.problem("GPT", entry_offset(0), None, what);
            return Ok(());
        };
        let want = match volume {
            Volume::Root => &expected.rootfs,
            Volume::App => &expected.appfs,
        };
        let Some((digest, rootfs_size, reference)) = want else {
            return Ok(());
        };
        let index = disk.index_of(root);
        let uuid = data_partition_uuid(volume, digest);
        if root.unique_guid != uuid {
            self.problem(
                format!("{label} partition GUID"),
                entry_offset(index) + 16,
                None,
                format!(
                    "{}, derived from the {label} filesystem it is {uuid}",
                    root.unique_guid
                ),
            );
        }
        if let Some(c) = cmdline(disk) {
            if !c.contains(&format!("PARTUUID={uuid}")) {
                self.problem(
                    "UKI section .cmdline",
                    cmdline_offset(disk),
                    None,
                    format!("it does not name the {label} partition PARTUUID={uuid}"),
                );
            }
        }
        if *rootfs_size > root.size() {
            self.problem(
                format!("{label} partition"),
                root.offset(),
                None,
                format!(
                    "{} bytes, smaller than the {label} filesystem ({rootfs_size})",
                    root.size()
                ),
            );
            return Ok(());
        }
        let data = self.read_at(root.offset(), *rootfs_size as usize)?;
        let actual = sha256_hex(&data);
        if hex_digest(&actual) != hex_digest(digest) {
            let at = reference
                .as_deref()
                .and_then(|r| first_difference(&data, r));
            self.problem(
                format!("{label} partition (partition {})", index + 1),
                root.offset() + at.unwrap_or(0),
                at,
                format!("digest {actual}, the manifest's {label} filesystem is {digest}"),
            );
        }
        self.zeros(
            root.offset() + rootfs_size,
            root.offset() + root.size(),
            &format!("{label} partition (partition {}) padding", index + 1),
            root.offset(),
        )
    }

    /// A dm-verity tree (the root's or the app's): the table in `.cmdline` names the data and
    /// hash partitions, and the data partition's blocks, the hash partition's blocks and the
    /// root hash agree, as the kernel checks them when it reads each block.
    fn verity(&mut self, disk: &Disk, volume: Volume) -> Result<(), DiskError> {
        let label = volume.label();
        let (v, hashes, root) = match (
            disk.volume_verity(volume),
            disk.hash_partition(volume),
            disk.data_partition(volume),
        ) {
            (None, None, _) | (_, _, None) => return Ok(()),
            (Some(Err(what)), _, _) => {
                self.problem("UKI section .cmdline", cmdline_offset(disk), None, what);
                return Ok(());
            }
            (None, Some(_), _) => {
                let what = format!("the disk has a {label} verity partition but the command line no dm-verity table for it: the {label} is not verified at boot");
                self.problem("UKI section .cmdline", cmdline_offset(disk), None, what);
                return Ok(());
            }
            (Some(Ok(_)), None, _) => {
                let what = format!(
                    "the command line names a {label} dm-verity hash partition the disk does not have"
                );
                self.problem("GPT", entry_offset(0), None, what);
                return Ok(());
            }
            (Some(Ok(v)), Some(h), Some(r)) => (v, h.clone(), r.clone()),
        };
        let index = |p: &gpt::Partition| disk.index_of(p);
        let prefix = match volume {
            Volume::Root => "",
            Volume::App => "app ",
        };
        let part = format!(
            "{prefix}verity hash partition (partition {})",
            index(&hashes) + 1
        );
        let root_part = format!("{label} partition (partition {})", index(&root) + 1);
        let derived = hash_partition_uuid(volume, &v.root_hash);
        if hashes.unique_guid != derived || v.hash_partuuid != derived.to_string() {
            self.problem(
                format!("{prefix}verity hash partition GUID"),
                entry_offset(index(&hashes)) + 16,
                None,
                format!(
                    "{} (the command line names {}), derived from the root hash it is {derived}",
                    hashes.unique_guid, v.hash_partuuid
                ),
            );
        }
        if v.data_partuuid != root.unique_guid.to_string() {
            self.problem(
                "UKI section .cmdline",
                cmdline_offset(disk),
                None,
                format!(
                    "its {label} dm-verity table names the data partition {}, the {label} partition is {}",
                    v.data_partuuid, root.unique_guid
                ),
            );
        }
        let (Ok(root_hash), Ok(salt)) = (hex::decode(&v.root_hash), hex::decode(&v.salt)) else {
            self.problem(
                "UKI section .cmdline",
                cmdline_offset(disk),
                None,
                "its dm-verity root hash or salt is not hex",
            );
            return Ok(());
        };
        let Ok(root_hash) = <[u8; verity::DIGEST_SIZE]>::try_from(root_hash) else {
            self.problem(
                "UKI section .cmdline",
                cmdline_offset(disk),
                None,
                "its dm-verity root hash is not a sha256",
            );
            return Ok(());
        };
        let block = verity::BLOCK_SIZE as u64;
        let data_len = v.data_blocks * block;
        let tree_blocks: u64 = verity::levels(v.data_blocks).iter().map(|l| l.1).sum();
        if data_len > root.size() || tree_blocks * block > hashes.size() {
            self.problem(
                &part,
                hashes.offset(),
                None,
                format!(
                    "the {label} dm-verity table covers {} data blocks: more than the {label} ({} bytes) or hash ({} bytes) partition holds",
                    v.data_blocks,
                    root.size(),
                    hashes.size()
                ),
            );
            return Ok(());
        }
        let data = PartReader {
            file: &self.file,
            at: root.offset(),
            end: root.offset() + data_len,
        };
        let leaves =
            verity::data_hashes(std::io::BufReader::with_capacity(MIB as usize, data), &salt)
                .map_err(|source| DiskError::Read {
                    path: self.path.to_path_buf(),
                    source,
                })?;
        let stored = self.read_at(hashes.offset(), (tree_blocks * block) as usize)?;
        // Where a bad hash block differs from the tree rebuilt from the data, to the byte.
        let rebuilt = verity::tree_of(&leaves, &salt).hash;
        let byte_in = |b: u64| {
            let range = (b * block) as usize..((b + 1) * block) as usize;
            let at = stored
                .get(range.clone())
                .unwrap_or_default()
                .iter()
                .zip(rebuilt.get(range).unwrap_or_default())
                .position(|(x, y)| x != y)
                .unwrap_or(0);
            b * block + at as u64
        };
        for m in verity::check(&leaves, &salt, &stored, &root_hash, 10) {
            match m {
                Mismatch::RootHash => self.problem(
                    &part,
                    hashes.offset() + byte_in(0),
                    Some(byte_in(0)),
                    format!(
                        "dm-verity: the tree's top block does not hash to the root hash {} of the UKI's .cmdline",
                        v.root_hash
                    ),
                ),
                Mismatch::HashBlock { level, block: b } => self.problem(
                    &part,
                    hashes.offset() + byte_in(b),
                    Some(byte_in(b)),
                    format!(
                        "dm-verity: hash block {b} (tree level {level}) does not match its digest in the level above"
                    ),
                ),
                Mismatch::DataBlock { block: b } => self.problem(
                    &root_part,
                    root.offset() + b * block,
                    Some(b * block),
                    format!(
                        "dm-verity: data block {b} fails verification (its sha256 is not the one in the hash tree): the kernel stops the VM when it reads it"
                    ),
                ),
                Mismatch::Padding { offset } => self.problem(
                    &part,
                    hashes.offset() + offset,
                    Some(offset),
                    "dm-verity: a byte of a hash block's padding is not what fuse writes",
                ),
            }
        }
        self.zeros(
            hashes.offset() + tree_blocks * block,
            hashes.offset() + hashes.size(),
            &format!("{part} padding"),
            hashes.offset(),
        )
    }

    /// With every part intact, a different disk digest can only be the EFI stub's damage.
    fn disk_digest(&mut self, disk: &Disk, expected: &Expected) -> Result<(), DiskError> {
        let Some(want) = &expected.disk_digest else {
            return Ok(());
        };
        let actual = file_digest(self.path)?;
        if hex_digest(&actual) != hex_digest(want) {
            self.problem(
                "UKI (EFI stub or PE headers)",
                uki_offset(disk),
                None,
                format!("the disk's digest is {actual}, the image's is {want}; every part with a digest of its own is intact, so the damage is in the stub, which has none"),
            );
        }
        Ok(())
    }

    /// The bytes `start..end` of the disk must be zero; the first that is not is reported in
    /// `part`, which starts at `part_start`.
    fn zeros(
        &mut self,
        start: u64,
        end: u64,
        part: &str,
        part_start: u64,
    ) -> Result<(), DiskError> {
        let mut at = start;
        while at < end {
            let len = (end - at).min(MIB) as usize;
            let chunk = self.read_at(at, len)?;
            if let Some(p) = chunk.iter().position(|&b| b != 0) {
                let disk_offset = at + p as u64;
                self.problem(
                    part,
                    disk_offset,
                    Some(disk_offset - part_start),
                    "a non-zero byte where fuse writes zeros",
                );
                return Ok(());
            }
            at += len as u64;
        }
        Ok(())
    }
}

/// Reads the disk's bytes `at..end` (a partition's) in order.
struct PartReader<'a> {
    file: &'a File,
    at: u64,
    end: u64,
}

impl std::io::Read for PartReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let len = buf.len().min((self.end - self.at) as usize);
        if len == 0 {
            return Ok(0);
        }
        let n = self.file.read_at(&mut buf[..len], self.at)?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        self.at += n as u64;
        Ok(n)
    }
}

/// The UKI's kernel command line, as text.
fn cmdline(disk: &Disk) -> Option<String> {
    disk.section(uki::CMDLINE)
        .map(|c| String::from_utf8_lossy(c).into_owned())
}

/// Where the `.cmdline` section is on the disk (else the UKI).
fn cmdline_offset(disk: &Disk) -> u64 {
    disk.section_disk_offset(uki::CMDLINE, 0)
        .unwrap_or(uki_offset(disk))
}

/// The first offset where `actual` and the file at `reference` differ.
fn first_difference(actual: &[u8], reference: &Path) -> Option<u64> {
    let expected = std::fs::read(reference).ok()?;
    actual
        .iter()
        .zip(expected.iter())
        .position(|(a, b)| a != b)
        .map(|p| p as u64)
        .or_else(|| {
            (actual.len() != expected.len()).then(|| actual.len().min(expected.len()) as u64)
        })
}

#[cfg(test)]
mod tests {
    use super::super::tests::{build, expected, fixture, flip};
    use super::*;
    use crate::disk::read_disk;

    #[test]
    fn test_verify_locates_flipped_bytes() {
        let f = fixture();
        let clean = f.dir.path().join("clean.raw");
        build(&f, &clean);
        let disk = read_disk(&clean).unwrap();
        let root = disk.root().unwrap().clone();
        let linux = disk.section_disk_offset(uki::LINUX, 1234).unwrap();
        let verity_at = disk.verity().unwrap().offset();
        let app = disk.data_partition(Volume::App).unwrap().offset();
        let app_hashes = disk.hash_partition(Volume::App).unwrap().offset();
        let cases: Vec<(u64, &str, Option<u64>)> = vec![
            (root.offset() + 777_777, "root partition", Some(777_777)),
            (linux, "UKI section .linux", Some(1234)),
            (512 + 60, "GPT primary header", Some(60)),
            (1024 + 200, "GPT primary entry array", Some(200)),
            (disk.size - 512 + 8, "GPT backup header", Some(8)),
            (
                disk.esp().unwrap().offset() + 600,
                "EFI System Partition",
                Some(600),
            ),
            (
                root.offset() + 1_600_000,
                "root partition (partition 2) padding",
                None,
            ),
            (MIB - 4096, "unpartitioned space", None),
            (
                verity_at + 4096 + 70,
                "verity hash partition",
                Some(4096 + 70),
            ),
            (
                verity_at + 3 * MIB / 4,
                "verity hash partition (partition 3) padding",
                None,
            ),
            (app + 12_345, "app partition (partition 4)", Some(12_345)),
            (app + 30_000, "app partition (partition 4) padding", None),
            (
                app_hashes + 5,
                "app verity hash partition (partition 5)",
                Some(5),
            ),
        ];
        for (at, part, part_offset) in cases {
            let path = f.dir.path().join("bad.raw");
            std::fs::copy(&clean, &path).unwrap();
            flip(&path, at);
            let problems = verify(&path, &expected(&f)).unwrap();
            let hit = problems.iter().find(|p| p.part.starts_with(part));
            let Some(hit) = hit else {
                panic!("flip at {at}: no problem in {part}: {problems:#?}");
            };
            if part_offset.is_some() || part.contains("padding") || part.contains("unpartitioned") {
                assert_eq!(hit.disk_offset, at, "{hit}");
            }
            if let Some(o) = part_offset {
                assert_eq!(hit.part_offset, Some(o), "{hit}");
            }
        }
    }

    /// A flipped root byte is named twice: by the root's digest and by the dm-verity check,
    /// which gives the data block the kernel would refuse; without the manifest's digest
    /// (a disk file alone) the verity check still finds it.
    #[test]
    fn test_verify_names_the_data_block_dm_verity_refuses() {
        let f = fixture();
        let path = f.dir.path().join("bad.raw");
        build(&f, &path);
        let root = read_disk(&path).unwrap().root().unwrap().offset();
        flip(&path, root + 5 * 4096 + 99);
        let problems = verify(&path, &Expected::default()).unwrap();
        assert_eq!(problems.len(), 1, "{problems:#?}");
        let p = &problems[0];
        assert_eq!(p.part, "root partition (partition 2)");
        assert_eq!(p.disk_offset, root + 5 * 4096);
        assert!(p.what.contains("dm-verity: data block 5 fails"), "{p}");
        let with_manifest = verify(&path, &expected(&f)).unwrap();
        assert!(
            with_manifest.iter().any(|p| p.what.contains("dm-verity")),
            "{with_manifest:#?}"
        );
    }
}
