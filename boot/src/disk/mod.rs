//! The bootable disk: a raw GPT disk a cloud boots through UEFI, and the same bytes `fuse run`
//! boots directly.
//!
//! Layout (512-byte sectors, partitions on 1 MiB boundaries):
//!
//! | bytes | what |
//! | --- | --- |
//! | 0 – 17 KiB | protective MBR, primary GPT header, 128 entries |
//! | 1 MiB | partition 1: EFI System Partition, FAT16, `EFI/BOOT/BOOTX64.EFI` (`BOOTAA64.EFI`) |
//! | after it | partition 2: the root squashfs (DPS "Linux root" type of the arch, read-only) |
//! | last MiB | free, then the backup entries and header in the last 33 sectors |
//!
//! `BOOTX64.EFI` is a unified kernel image: systemd's EFI stub with `.osrel`, `.cmdline`,
//! `.linux` (bzImage), `.initrd` (fuse's init) and `.fuse` (the image manifest). Every GUID
//! and the FAT serial are derived from the content (UUIDv8 from sha256), never random, and no
//! clock, user, path or umask reaches the bytes: the same inputs give the same disk.

pub mod esp;
pub mod gpt;
pub mod uki;

use fuse_rootfs::Arch;
use sha2::{Digest as _, Sha256};
use std::fmt;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

const MIB: u64 = 1 << 20;

/// A GUID, held in RFC 4122 (string) byte order.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Guid(pub [u8; 16]);

impl Guid {
    pub const fn from_u128(v: u128) -> Guid {
        Guid(v.to_be_bytes())
    }

    /// A UUIDv8 (RFC 9562, custom) from sha256 of a label and some data: stable for the same
    /// content, different for different labels.
    pub fn derive(label: &str, data: &[u8]) -> Guid {
        let mut h = Sha256::new();
        h.update(b"fuse:");
        h.update(label.as_bytes());
        h.update([0]);
        h.update(data);
        let d = h.finalize();
        let mut b = [0u8; 16];
        b.copy_from_slice(&d[..16]);
        b[6] = (b[6] & 0x0f) | 0x80;
        b[8] = (b[8] & 0x3f) | 0x80;
        Guid(b)
    }

    /// GPT's on-disk order: the first three fields little-endian.
    pub fn to_gpt_bytes(self) -> [u8; 16] {
        let b = self.0;
        [
            b[3], b[2], b[1], b[0], b[5], b[4], b[7], b[6], b[8], b[9], b[10], b[11], b[12], b[13],
            b[14], b[15],
        ]
    }

    pub fn from_gpt_bytes(b: [u8; 16]) -> Guid {
        // The swap is its own inverse.
        Guid(Guid(b).to_gpt_bytes())
    }
}

impl From<[u8; 16]> for Guid {
    fn from(b: [u8; 16]) -> Guid {
        Guid(b)
    }
}

impl fmt::Display for Guid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let h = hex::encode(self.0);
        write!(
            f,
            "{}-{}-{}-{}-{}",
            &h[0..8],
            &h[8..12],
            &h[12..16],
            &h[16..20],
            &h[20..32]
        )
    }
}

impl fmt::Debug for Guid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// EFI System Partition.
pub const ESP_TYPE: Guid = Guid::from_u128(0xc12a7328_f81f_11d2_ba4b_00a0c93ec93b);

/// "Linux root" of the arch (Discoverable Partitions Specification).
pub fn root_type(arch: Arch) -> Guid {
    match arch {
        Arch::X86_64 => Guid::from_u128(0x4f68bce3_e8cd_4db1_96e7_fbcaf984b709),
        Arch::Aarch64 => Guid::from_u128(0xb921b045_1df0_41c3_af44_4c6f280d3fae),
    }
}

/// The removable-media boot path UEFI firmware looks for on the arch.
pub fn efi_boot_path(arch: Arch) -> &'static str {
    match arch {
        Arch::X86_64 => "EFI/BOOT/BOOTX64.EFI",
        Arch::Aarch64 => "EFI/BOOT/BOOTAA64.EFI",
    }
}

/// systemd's EFI stub for the arch (Debian's `systemd-boot-efi`).
pub fn stub_path(arch: Arch) -> PathBuf {
    let name = match arch {
        Arch::X86_64 => "linuxx64.efi.stub",
        Arch::Aarch64 => "linuxaa64.efi.stub",
    };
    Path::new("/usr/lib/systemd/boot/efi").join(name)
}

/// The partition name of the root, as the DPS tools name it.
fn root_name(arch: Arch) -> &'static str {
    match arch {
        Arch::X86_64 => "root-x86-64",
        Arch::Aarch64 => "root-arm64",
    }
}

fn hex_digest(digest: &str) -> &str {
    digest.strip_prefix("sha256:").unwrap_or(digest)
}

/// The root partition's unique GUID: from the root filesystem's digest, so the kernel command
/// line (`fuse.root=PARTUUID=…`) is known before the disk is written.
pub fn root_partition_uuid(rootfs_digest: &str) -> Guid {
    Guid::derive("root-partition", hex_digest(rootfs_digest).as_bytes())
}

fn disk_guid(manifest_digest: &str) -> Guid {
    Guid::derive("disk", hex_digest(manifest_digest).as_bytes())
}

fn esp_guid(manifest_digest: &str) -> Guid {
    Guid::derive("esp-partition", hex_digest(manifest_digest).as_bytes())
}

fn esp_serial(manifest_digest: &str) -> u32 {
    let g = Guid::derive("esp-serial", hex_digest(manifest_digest).as_bytes()).0;
    u32::from_le_bytes([g[0], g[1], g[2], g[3]])
}

fn sha256_hex(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    #[error("Cannot read {path}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("Cannot write the disk {path}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("The root filesystem {path} changed while the disk was written (digest {actual}, expected {expected}): build again")]
    RootfsChanged {
        path: PathBuf,
        expected: String,
        actual: String,
    },
    /// The partition table is damaged: the problem is the message (a leaf, not a cause).
    #[error("{path}: {problem}")]
    Gpt {
        path: PathBuf,
        problem: gpt::GptError,
    },
    #[error("{path} is not a fuse disk: {what}")]
    NotFuseDisk { path: PathBuf, what: String },
    #[error("Cannot assemble the unified kernel image")]
    Uki(#[from] uki::UkiError),
    #[error(transparent)]
    Esp(#[from] esp::EspError),
}

/// What a disk is made of.
#[derive(Debug, Clone, Copy)]
pub struct DiskInputs<'a> {
    pub arch: Arch,
    /// The EFI stub (see [`stub_path`]).
    pub stub: &'a [u8],
    /// The kernel (bzImage / Image with EFI stub support).
    pub kernel: &'a [u8],
    /// The init initramfs.
    pub initrd: &'a [u8],
    /// The kernel command line, naming the root as `fuse.root=PARTUUID=<root_partition_uuid>`.
    pub cmdline: &'a str,
    /// os-release for `.osrel` (what boot menus show).
    pub osrel: &'a str,
    /// The manifest, stored as `.fuse`; its digest seeds the disk's GUIDs.
    pub manifest: &'a [u8],
    pub rootfs: &'a Path,
    /// `sha256:<hex>` of the root filesystem (checked while it is copied).
    pub rootfs_digest: &'a str,
}

/// The unified kernel image of `inputs`.
pub fn build_uki(inputs: &DiskInputs<'_>) -> Result<Vec<u8>, DiskError> {
    Ok(uki::append_sections(
        inputs.stub,
        &[
            (uki::OSREL, inputs.osrel.as_bytes()),
            (uki::CMDLINE, inputs.cmdline.as_bytes()),
            (uki::LINUX, inputs.kernel),
            (uki::INITRD, inputs.initrd),
            (uki::FUSE, inputs.manifest),
        ],
    )?)
}

/// Writes the disk of `inputs` to `out` (through a temporary file beside it, renamed when
/// complete); returns its partition table. Holes are left sparse.
pub fn build_disk(inputs: &DiskInputs<'_>, out: &Path) -> Result<gpt::Table, DiskError> {
    let write_err = |source| DiskError::Write {
        path: out.to_path_buf(),
        source,
    };
    let read_err = |source| DiskError::Read {
        path: inputs.rootfs.to_path_buf(),
        source,
    };
    let manifest_digest = sha256_hex(inputs.manifest);
    let uki = build_uki(inputs)?;
    let esp_size = esp::esp_size(&[uki.len() as u64]);
    let esp = esp::build(
        &[(efi_boot_path(inputs.arch), &uki)],
        esp_size,
        esp_serial(&manifest_digest),
    )?;
    let mut rootfs = File::open(inputs.rootfs).map_err(read_err)?;
    let rootfs_len = rootfs.metadata().map_err(read_err)?.len();

    let esp_start = MIB;
    let root_start = esp_start + esp_size;
    let root_size = rootfs_len.max(1).div_ceil(MIB) * MIB;
    let disk_size = root_start + root_size + MIB;
    let sector = gpt::SECTOR;
    let table = gpt::Table {
        disk_guid: disk_guid(&manifest_digest),
        disk_sectors: disk_size / sector,
        partitions: vec![
            gpt::Partition {
                type_guid: ESP_TYPE,
                unique_guid: esp_guid(&manifest_digest),
                first_lba: esp_start / sector,
                last_lba: (esp_start + esp_size) / sector - 1,
                attributes: 0,
                name: "esp".into(),
            },
            gpt::Partition {
                type_guid: root_type(inputs.arch),
                unique_guid: root_partition_uuid(inputs.rootfs_digest),
                first_lba: root_start / sector,
                last_lba: (root_start + root_size) / sector - 1,
                attributes: gpt::ATTR_READ_ONLY,
                name: root_name(inputs.arch).into(),
            },
        ],
    };

    let dir = out.parent().unwrap_or(Path::new("."));
    let mut tmp = tempfile::Builder::new()
        .prefix(".disk-")
        .tempfile_in(dir)
        .map_err(write_err)?;
    {
        let file = tmp.as_file_mut();
        file.set_len(disk_size).map_err(write_err)?;
        for (offset, bytes) in table.regions() {
            file.write_all_at(&bytes, offset).map_err(write_err)?;
        }
        file.write_all_at(&esp, esp_start).map_err(write_err)?;
        // The root filesystem, hashed on the way: the GUID in the command line was derived
        // from the digest the caller gave, so the bytes must be those.
        file.seek(SeekFrom::Start(root_start)).map_err(write_err)?;
        let mut hasher = Sha256::new();
        let mut buf = vec![0u8; MIB as usize];
        loop {
            let n = rootfs.read(&mut buf).map_err(read_err)?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
            file.write_all(&buf[..n]).map_err(write_err)?;
        }
        let actual = format!("sha256:{}", hex::encode(hasher.finalize()));
        if hex_digest(&actual) != hex_digest(inputs.rootfs_digest) {
            return Err(DiskError::RootfsChanged {
                path: inputs.rootfs.to_path_buf(),
                expected: inputs.rootfs_digest.to_string(),
                actual,
            });
        }
        file.sync_all().map_err(write_err)?;
    }
    tmp.persist(out).map_err(|e| write_err(e.error))?;
    Ok(table)
}

/// A disk read back: its table, its ESP and the UKI's sections.
#[derive(Debug, Clone)]
pub struct Disk {
    pub path: PathBuf,
    pub size: u64,
    pub table: gpt::Table,
    /// FAT type and volume serial of the ESP.
    pub esp_fat: String,
    pub esp_serial: u32,
    /// Files of the ESP: path and size.
    pub esp_files: Vec<(String, u64)>,
    /// The UKI's path in the ESP.
    pub uki_path: String,
    pub uki: Vec<u8>,
    /// Where the UKI's first byte is on the disk (it is written contiguously).
    pub uki_disk_offset: Option<u64>,
    pub sections: Vec<uki::Section>,
}

impl Disk {
    /// A section's bytes.
    pub fn section(&self, name: &str) -> Option<&[u8]> {
        self.sections
            .iter()
            .find(|s| s.name == name)
            .map(|s| s.data(&self.uki))
    }

    /// The ESP and root partitions, by type.
    pub fn esp(&self) -> Option<&gpt::Partition> {
        self.table
            .partitions
            .iter()
            .find(|p| p.type_guid == ESP_TYPE)
    }

    pub fn root(&self) -> Option<&gpt::Partition> {
        self.table
            .partitions
            .iter()
            .find(|p| Arch::ALL.iter().any(|a| root_type(*a) == p.type_guid))
    }

    /// The arch the root partition's type says.
    pub fn arch(&self) -> Option<Arch> {
        let root = self.root()?;
        Arch::ALL
            .into_iter()
            .find(|a| root_type(*a) == root.type_guid)
    }

    /// The disk offset of byte `at` of a section, when the UKI's position is known.
    pub fn section_disk_offset(&self, name: &str, at: u64) -> Option<u64> {
        let s = self.sections.iter().find(|s| s.name == name)?;
        Some(self.uki_disk_offset? + u64::from(s.raw_offset) + at)
    }
}

fn read_at(file: &File, path: &Path, offset: u64, len: usize) -> Result<Vec<u8>, DiskError> {
    let mut buf = vec![0u8; len];
    file.read_exact_at(&mut buf, offset)
        .map_err(|source| DiskError::Read {
            path: path.to_path_buf(),
            source,
        })?;
    Ok(buf)
}

/// Reads a disk: the GPT (both copies checked), the ESP's files, the UKI's sections.
pub fn read_disk(path: &Path) -> Result<Disk, DiskError> {
    let read_err = |source| DiskError::Read {
        path: path.to_path_buf(),
        source,
    };
    let file = File::open(path).map_err(read_err)?;
    let size = file.metadata().map_err(read_err)?.len();
    let table = gpt::read(size, &mut |off, len| {
        let mut buf = vec![0u8; len];
        file.read_exact_at(&mut buf, off)?;
        Ok(buf)
    })
    .map_err(read_err)?
    .map_err(|problem| DiskError::Gpt {
        path: path.to_path_buf(),
        problem,
    })?;
    read_layout(path, &file, size, table)
}

/// Reads a disk as [`read_disk`] does, but from whichever GPT copy is intact: what `verify`
/// needs to find the manifest of a disk whose primary (or backup) table is damaged.
pub fn read_disk_any(path: &Path) -> Result<Disk, DiskError> {
    let read_err = |source| DiskError::Read {
        path: path.to_path_buf(),
        source,
    };
    let file = File::open(path).map_err(read_err)?;
    let size = file.metadata().map_err(read_err)?.len();
    let mut reader = |off: u64, len: usize| {
        let mut buf = vec![0u8; len];
        file.read_exact_at(&mut buf, off)?;
        Ok(buf)
    };
    let table = match gpt::read_one(size, true, &mut reader).map_err(read_err)? {
        Ok(t) => t,
        Err(first) => gpt::read_one(size, false, &mut reader)
            .map_err(read_err)?
            .map_err(|_| DiskError::Gpt {
                path: path.to_path_buf(),
                problem: first,
            })?,
    };
    read_layout(path, &file, size, table)
}

fn read_layout(path: &Path, file: &File, size: u64, table: gpt::Table) -> Result<Disk, DiskError> {
    let not_fuse = |what: String| DiskError::NotFuseDisk {
        path: path.to_path_buf(),
        what,
    };
    let esp_part = table
        .partitions
        .iter()
        .find(|p| p.type_guid == ESP_TYPE)
        .ok_or_else(|| not_fuse("it has no EFI System Partition".into()))?;
    if esp_part.offset() + esp_part.size() > size {
        return Err(not_fuse(format!(
            "the ESP ends at byte {}, past the end of the disk ({size})",
            esp_part.offset() + esp_part.size()
        )));
    }
    let esp_bytes = read_at(file, path, esp_part.offset(), esp_part.size() as usize)?;
    let (esp_fat, esp_serial) = esp::describe(&esp_bytes)?;
    let files = esp::files(&esp_bytes)?;
    let boot = files
        .iter()
        .find(|(p, _)| {
            Arch::ALL.iter().any(|a| {
                p.trim_start_matches('/')
                    .eq_ignore_ascii_case(efi_boot_path(*a))
            })
        })
        .ok_or_else(|| not_fuse("its ESP has no EFI/BOOT/BOOT*.EFI".into()))?;
    let uki = boot.1.clone();
    let sections = uki::sections(&uki)?;
    // fuse writes the UKI in one run of clusters: find its first sector in the ESP.
    let head = &uki[..uki.len().min(512)];
    let uki_disk_offset = (!head.is_empty())
        .then(|| {
            esp_bytes
                .chunks(512)
                .position(|c| c.starts_with(head))
                .map(|i| esp_part.offset() + i as u64 * 512)
        })
        .flatten();
    Ok(Disk {
        path: path.to_path_buf(),
        size,
        esp_fat,
        esp_serial,
        esp_files: files
            .iter()
            .map(|(p, b)| (p.clone(), b.len() as u64))
            .collect(),
        uki_path: boot.0.clone(),
        uki,
        uki_disk_offset,
        sections,
        table,
    })
}

/// What a disk should hold, from its manifest (and the store's blobs, when there).
#[derive(Debug, Clone, Default)]
pub struct Expected {
    /// (`sha256:` digest, size, a file with the same bytes to locate a difference).
    pub kernel: Option<(String, u64, Option<PathBuf>)>,
    pub initrd: Option<(String, u64, Option<PathBuf>)>,
    pub rootfs: Option<(String, u64, Option<PathBuf>)>,
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
    let mut problems = Vec::new();
    let gpt_problem = |e: gpt::GptError, problems: &mut Vec<Problem>| {
        let (part, offset) = match &e {
            gpt::GptError::NoProtectiveMbr => ("protective MBR".to_string(), 0),
            gpt::GptError::NoSignature { which, offset }
            | gpt::GptError::HeaderCrc { which, offset, .. } => {
                (format!("GPT {which} header"), *offset)
            }
            gpt::GptError::EntriesCrc { which, offset, .. } => {
                (format!("GPT {which} entry array"), *offset)
            }
            gpt::GptError::Inconsistent { which, offset, .. } => {
                (format!("GPT {which} header"), *offset)
            }
            gpt::GptError::TooSmall { .. } => ("disk".to_string(), 0),
        };
        problems.push(Problem {
            part,
            disk_offset: offset,
            part_offset: None,
            what: e.to_string(),
        });
    };
    let mut reader = |off: u64, len: usize| {
        let mut buf = vec![0u8; len];
        file.read_exact_at(&mut buf, off)?;
        Ok(buf)
    };
    if let Err(e) = gpt::check_mbr(&read_at(&file, path, 0, 512.min(size as usize))?) {
        gpt_problem(e, &mut problems);
    }
    let primary = gpt::read_one(size, true, &mut reader).map_err(read_err)?;
    let backup = gpt::read_one(size, false, &mut reader).map_err(read_err)?;
    let table = match (primary, backup) {
        (Ok(p), Ok(b)) => {
            if p != b {
                problems.push(Problem {
                    part: "GPT backup header".into(),
                    disk_offset: size - 512,
                    part_offset: None,
                    what: "the backup table describes other partitions than the primary".into(),
                });
            }
            p
        }
        (Ok(p), Err(e)) => {
            gpt_problem(e, &mut problems);
            p
        }
        (Err(e), Ok(b)) => {
            gpt_problem(e, &mut problems);
            b
        }
        (Err(e1), Err(e2)) => {
            gpt_problem(e1, &mut problems);
            gpt_problem(e2, &mut problems);
            return Ok(problems);
        }
    };
    // The table rewritten from the intact copy must match both copies byte for byte: this
    // locates a damaged byte exactly, where a CRC only says which structure is damaged.
    let mut located = Vec::new();
    for (offset, want) in table.regions() {
        let have = read_at(&file, path, offset, want.len())?;
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
        problems.retain(|p| !located.iter().any(|l| l.part == p.part));
        problems.extend(located);
    }
    // The sectors between the MBR/GPT and the partitions, between partitions and after the
    // last one must be zero (nothing hides there).
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
            check_zero(
                &file,
                path,
                at,
                start,
                "unpartitioned space",
                at,
                &mut problems,
            )?;
        }
        at = at.max(end);
    }

    let disk = match read_layout(path, &file, size, table) {
        Ok(d) => d,
        Err(e) => {
            problems.push(Problem {
                part: "EFI System Partition".into(),
                disk_offset: MIB,
                part_offset: None,
                what: crate::error::with_causes(&e),
            });
            return Ok(problems);
        }
    };
    let esp_part = disk.esp().cloned().expect("read_layout found it");
    let manifest = disk.section(uki::FUSE).unwrap_or_default().to_vec();
    let manifest_digest = sha256_hex(&manifest);
    let uki_offset = disk.uki_disk_offset.unwrap_or(esp_part.offset());
    if let Some(want) = &expected.manifest_digest {
        if hex_digest(want) != hex_digest(&manifest_digest) {
            problems.push(Problem {
                part: "UKI section .fuse (manifest)".into(),
                disk_offset: disk.section_disk_offset(uki::FUSE, 0).unwrap_or(uki_offset),
                part_offset: None,
                what: format!("digest {manifest_digest}, the image's manifest is {want}"),
            });
        }
    }

    // The ESP: rebuilt from the UKI it holds, it must come out byte for byte the same, so
    // damage to the FAT structures is located to the byte.
    let esp_bytes = read_at(&file, path, esp_part.offset(), esp_part.size() as usize)?;
    let rebuilt = esp::build(
        &[(
            efi_boot_path(disk.arch().unwrap_or(Arch::X86_64)),
            &disk.uki,
        )],
        esp_part.size(),
        disk.esp_serial,
    )?;
    if let Some(at) = esp_bytes.iter().zip(&rebuilt).position(|(a, b)| a != b) {
        problems.push(Problem {
            part: "EFI System Partition (FAT structures)".into(),
            disk_offset: esp_part.offset() + at as u64,
            part_offset: Some(at as u64),
            what: "the FAT volume is not what fuse writes for its files".into(),
        });
    }
    if disk.esp_files.len() != 1 {
        problems.push(Problem {
            part: "EFI System Partition".into(),
            disk_offset: esp_part.offset(),
            part_offset: None,
            what: format!(
                "files {:?}, fuse writes only the UKI",
                disk.esp_files.iter().map(|f| &f.0).collect::<Vec<_>>()
            ),
        });
    }

    // The UKI's sections.
    for (name, want) in [
        (uki::LINUX, &expected.kernel),
        (uki::INITRD, &expected.initrd),
    ] {
        let Some((digest, size, reference)) = want else {
            continue;
        };
        let start = disk.section_disk_offset(name, 0).unwrap_or(uki_offset);
        let Some(data) = disk.section(name) else {
            problems.push(Problem {
                part: "UKI".into(),
                disk_offset: uki_offset,
                part_offset: None,
                what: format!("no {name} section"),
            });
            continue;
        };
        let actual = sha256_hex(data);
        if hex_digest(&actual) != hex_digest(digest) || data.len() as u64 != *size {
            let at = reference.as_deref().and_then(|r| first_difference(data, r));
            problems.push(Problem {
                part: format!("UKI section {name}"),
                disk_offset: start + at.unwrap_or(0),
                part_offset: at,
                what: format!(
                    "digest {actual} ({} bytes), the manifest says {digest} ({size} bytes)",
                    data.len()
                ),
            });
        }
    }
    let cmdline = disk
        .section(uki::CMDLINE)
        .map(|c| String::from_utf8_lossy(c).into_owned());
    if let Some(want) = &expected.cmdline {
        if cmdline.as_deref() != Some(want.as_str()) {
            problems.push(Problem {
                part: "UKI section .cmdline".into(),
                disk_offset: disk
                    .section_disk_offset(uki::CMDLINE, 0)
                    .unwrap_or(uki_offset),
                part_offset: None,
                what: format!("{cmdline:?}, the manifest says {want:?}"),
            });
        }
    }

    // GUIDs derived from the content.
    let entry_offset = |i: usize| 2 * 512 + i as u64 * 128;
    if disk.table.disk_guid != disk_guid(&manifest_digest) {
        problems.push(Problem {
            part: "GPT disk GUID".into(),
            disk_offset: 512 + 56,
            part_offset: None,
            what: format!(
                "{}, derived from the manifest it is {}",
                disk.table.disk_guid,
                disk_guid(&manifest_digest)
            ),
        });
    }
    if esp_part.unique_guid != esp_guid(&manifest_digest)
        || disk.esp_serial != esp_serial(&manifest_digest)
    {
        problems.push(Problem {
            part: "EFI System Partition".into(),
            disk_offset: entry_offset(0) + 16,
            part_offset: None,
            what: "its GUID or FAT serial is not the one derived from the manifest".into(),
        });
    }
    let Some(root) = disk.root().cloned() else {
        problems.push(Problem {
            part: "GPT".into(),
            disk_offset: entry_offset(0),
            part_offset: None,
            what: "no Linux root partition".into(),
        });
        return Ok(problems);
    };
    let root_index = disk
        .table
        .partitions
        .iter()
        .position(|p| *p == root)
        .unwrap_or(1);
    if let Some((digest, rootfs_size, reference)) = &expected.rootfs {
        let uuid = root_partition_uuid(digest);
        if root.unique_guid != uuid {
            problems.push(Problem {
                part: "root partition GUID".into(),
                disk_offset: entry_offset(root_index) + 16,
                part_offset: None,
                what: format!(
                    "{}, derived from the root filesystem it is {uuid}",
                    root.unique_guid
                ),
            });
        }
        if let Some(c) = &cmdline {
            if !c.contains(&format!("fuse.root=PARTUUID={uuid}")) {
                problems.push(Problem {
                    part: "UKI section .cmdline".into(),
                    disk_offset: disk
                        .section_disk_offset(uki::CMDLINE, 0)
                        .unwrap_or(uki_offset),
                    part_offset: None,
                    what: format!("it does not name the root as fuse.root=PARTUUID={uuid}"),
                });
            }
        }
        if *rootfs_size > root.size() {
            problems.push(Problem {
                part: "root partition".into(),
                disk_offset: root.offset(),
                part_offset: None,
                what: format!(
                    "{} bytes, smaller than the root filesystem ({rootfs_size})",
                    root.size()
                ),
            });
        } else {
            let data = read_at(&file, path, root.offset(), *rootfs_size as usize)?;
            let actual = sha256_hex(&data);
            if hex_digest(&actual) != hex_digest(digest) {
                let at = reference
                    .as_deref()
                    .and_then(|r| first_difference(&data, r));
                problems.push(Problem {
                    part: format!("root partition (partition {})", root_index + 1),
                    disk_offset: root.offset() + at.unwrap_or(0),
                    part_offset: at,
                    what: format!("digest {actual}, the manifest's root filesystem is {digest}"),
                });
            }
            check_zero(
                &file,
                path,
                root.offset() + rootfs_size,
                root.offset() + root.size(),
                &format!("root partition (partition {}) padding", root_index + 1),
                root.offset(),
                &mut problems,
            )?;
        }
    }

    if problems.is_empty() {
        if let Some(want) = &expected.disk_digest {
            let actual = file_digest(path)?;
            if hex_digest(&actual) != hex_digest(want) {
                problems.push(Problem {
                    part: "UKI (EFI stub or PE headers)".into(),
                    disk_offset: uki_offset,
                    part_offset: None,
                    what: format!("the disk's digest is {actual}, the image's is {want}; every part with a digest of its own is intact, so the damage is in the stub, which has none"),
                });
            }
        }
    }
    Ok(problems)
}

fn check_zero(
    file: &File,
    path: &Path,
    start: u64,
    end: u64,
    part: &str,
    part_start: u64,
    problems: &mut Vec<Problem>,
) -> Result<(), DiskError> {
    let mut at = start;
    while at < end {
        let len = (end - at).min(MIB) as usize;
        let chunk = read_at(file, path, at, len)?;
        if let Some(p) = chunk.iter().position(|&b| b != 0) {
            let disk_offset = at + p as u64;
            problems.push(Problem {
                part: part.to_string(),
                disk_offset,
                part_offset: Some(disk_offset - part_start),
                what: "a non-zero byte where fuse writes zeros".into(),
            });
            return Ok(());
        }
        at += len as u64;
    }
    Ok(())
}

/// `sha256:<hex>` of a file.
pub fn file_digest(path: &Path) -> Result<String, DiskError> {
    let mut file = File::open(path).map_err(|source| DiskError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; MIB as usize];
    loop {
        let n = file.read(&mut buf).map_err(|source| DiskError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(format!("sha256:{}", hex::encode(h.finalize())))
}

/// What direct boot needs from a disk: kernel, initramfs and command line, out of the UKI.
#[derive(Debug, Clone)]
pub struct BootFiles {
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    pub cmdline: String,
}

/// Extracts the UKI's `.linux`, `.initrd` and `.cmdline` into `dir` (made through a temporary
/// directory beside it and renamed, so a concurrent run sees all or nothing); reuses `dir`
/// when it is complete. `dir` should be keyed by the disk's digest.
pub fn extract_boot(disk_path: &Path, dir: &Path) -> Result<BootFiles, DiskError> {
    let files = BootFiles {
        kernel: dir.join("kernel"),
        initrd: dir.join("initrd"),
        cmdline: String::new(),
    };
    let cmdline_path = dir.join("cmdline");
    if let Ok(cmdline) = std::fs::read_to_string(&cmdline_path) {
        if files.kernel.exists() && files.initrd.exists() {
            return Ok(BootFiles { cmdline, ..files });
        }
    }
    let disk = read_disk(disk_path)?;
    let get = |name: &str| {
        disk.section(name).ok_or_else(|| DiskError::NotFuseDisk {
            path: disk_path.to_path_buf(),
            what: format!("its UKI has no {name} section"),
        })
    };
    let (kernel, initrd, cmdline) = (get(uki::LINUX)?, get(uki::INITRD)?, get(uki::CMDLINE)?);
    let parent = dir.parent().unwrap_or(Path::new("."));
    let write_err = |source| DiskError::Write {
        path: dir.to_path_buf(),
        source,
    };
    std::fs::create_dir_all(parent).map_err(write_err)?;
    let tmp = tempfile::Builder::new()
        .prefix(".extract-")
        .tempdir_in(parent)
        .map_err(write_err)?;
    std::fs::write(tmp.path().join("kernel"), kernel).map_err(write_err)?;
    std::fs::write(tmp.path().join("initrd"), initrd).map_err(write_err)?;
    std::fs::write(tmp.path().join("cmdline"), cmdline).map_err(write_err)?;
    let staged = tmp.keep();
    if let Err(e) = std::fs::rename(&staged, dir) {
        // Another run extracted the same disk first: use its files.
        std::fs::remove_dir_all(&staged).ok();
        if !cmdline_path.exists() {
            return Err(write_err(e));
        }
    }
    Ok(BootFiles {
        cmdline: String::from_utf8_lossy(cmdline).into_owned(),
        ..files
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Fixture {
        dir: tempfile::TempDir,
        manifest: Vec<u8>,
        kernel: Vec<u8>,
        initrd: Vec<u8>,
        cmdline: String,
        rootfs_digest: String,
    }

    fn fixture() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let rootfs: Vec<u8> = (0..1_500_000u32).map(|i| (i % 253) as u8).collect();
        std::fs::write(dir.path().join("rootfs"), &rootfs).unwrap();
        let rootfs_digest = sha256_hex(&rootfs);
        let kernel = vec![0x4bu8; 300_000];
        std::fs::write(dir.path().join("kernel"), &kernel).unwrap();
        Fixture {
            manifest: b"{\"name\":\"t\"}\n".to_vec(),
            kernel,
            initrd: vec![0x49u8; 70_000],
            cmdline: format!(
                "console=ttyS0 fuse.root=PARTUUID={}",
                root_partition_uuid(&rootfs_digest)
            ),
            rootfs_digest,
            dir,
        }
    }

    fn build(f: &Fixture, out: &Path) -> gpt::Table {
        let stub = uki::tests::tiny_stub();
        build_disk(
            &DiskInputs {
                arch: Arch::X86_64,
                stub: &stub,
                kernel: &f.kernel,
                initrd: &f.initrd,
                cmdline: &f.cmdline,
                osrel: "ID=fuse\n",
                manifest: &f.manifest,
                rootfs: &f.dir.path().join("rootfs"),
                rootfs_digest: &f.rootfs_digest,
            },
            out,
        )
        .unwrap()
    }

    fn expected(f: &Fixture) -> Expected {
        Expected {
            kernel: Some((
                sha256_hex(&f.kernel),
                f.kernel.len() as u64,
                Some(f.dir.path().join("kernel")),
            )),
            initrd: Some((sha256_hex(&f.initrd), f.initrd.len() as u64, None)),
            rootfs: Some((
                f.rootfs_digest.clone(),
                1_500_000,
                Some(f.dir.path().join("rootfs")),
            )),
            cmdline: Some(f.cmdline.clone()),
            manifest_digest: Some(sha256_hex(&f.manifest)),
            disk_digest: None,
        }
    }

    #[test]
    fn test_guids_are_v8_and_stable() {
        let g = Guid::derive("x", b"y");
        assert_eq!(g, Guid::derive("x", b"y"));
        assert_ne!(g, Guid::derive("z", b"y"));
        let s = g.to_string();
        assert_eq!(s.len(), 36);
        assert_eq!(&s[14..15], "8", "version 8: {s}");
        assert!("89ab".contains(&s[19..20]), "RFC variant: {s}");
        assert_eq!(ESP_TYPE.to_string(), "c12a7328-f81f-11d2-ba4b-00a0c93ec93b");
        assert_eq!(Guid::from_gpt_bytes(g.to_gpt_bytes()), g);
    }

    #[test]
    fn test_build_read_and_verify_a_disk() {
        let f = fixture();
        let out = f.dir.path().join("disk.raw");
        let table = build(&f, &out);
        let size = std::fs::metadata(&out).unwrap().len();
        assert_eq!(size % MIB, 0);
        // 1 MiB GPT + 3 MiB ESP (FAT16 minimum) + 2 MiB root + 1 MiB tail.
        assert_eq!(size, 7 * MIB, "{table:?}");
        let disk = read_disk(&out).unwrap();
        assert_eq!(disk.table, table);
        assert_eq!(disk.esp_fat, "FAT16");
        assert_eq!(disk.esp_files.len(), 1);
        assert_eq!(disk.esp_files[0].0, "/EFI/BOOT/BOOTX64.EFI");
        for p in &disk.table.partitions {
            assert_eq!(p.offset() % MIB, 0, "{p:?}");
        }
        let root = disk.root().unwrap();
        assert_eq!(root.unique_guid, root_partition_uuid(&f.rootfs_digest));
        assert_eq!(root.attributes, gpt::ATTR_READ_ONLY);
        assert_eq!(disk.section(uki::LINUX).unwrap(), &f.kernel[..]);
        assert_eq!(disk.section(uki::INITRD).unwrap(), &f.initrd[..]);
        assert_eq!(disk.section(uki::FUSE).unwrap(), &f.manifest[..]);
        assert_eq!(disk.section(uki::CMDLINE).unwrap(), f.cmdline.as_bytes());
        // The section's disk offset really points at its bytes.
        let raw = std::fs::read(&out).unwrap();
        let at = disk.section_disk_offset(uki::LINUX, 0).unwrap() as usize;
        assert_eq!(&raw[at..at + f.kernel.len()], &f.kernel[..]);
        let r = root.offset() as usize;
        assert_eq!(
            &raw[r..r + 1_500_000],
            &std::fs::read(f.dir.path().join("rootfs")).unwrap()[..]
        );

        let mut want = expected(&f);
        want.disk_digest = Some(file_digest(&out).unwrap());
        assert_eq!(verify(&out, &want).unwrap(), vec![]);

        let boot = extract_boot(&out, &f.dir.path().join("cache/abc")).unwrap();
        assert_eq!(std::fs::read(&boot.kernel).unwrap(), f.kernel);
        assert_eq!(boot.cmdline, f.cmdline);
        // Second time: from the cache.
        let again = extract_boot(&out, &f.dir.path().join("cache/abc")).unwrap();
        assert_eq!(again.cmdline, f.cmdline);
    }

    #[test]
    fn test_same_inputs_same_bytes() {
        let f = fixture();
        let a = f.dir.path().join("a.raw");
        let b = f.dir.path().join("b.raw");
        build(&f, &a);
        build(&f, &b);
        assert_eq!(file_digest(&a).unwrap(), file_digest(&b).unwrap());
    }

    fn flip(path: &Path, at: u64) {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .unwrap();
        let mut b = [0u8];
        file.read_exact_at(&mut b, at).unwrap();
        b[0] ^= 0x20;
        file.write_all_at(&b, at).unwrap();
    }

    #[test]
    fn test_verify_locates_flipped_bytes() {
        let f = fixture();
        let clean = f.dir.path().join("clean.raw");
        build(&f, &clean);
        let disk = read_disk(&clean).unwrap();
        let root = disk.root().unwrap().clone();
        let linux = disk.section_disk_offset(uki::LINUX, 1234).unwrap();
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
}
