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
//! | after it | partition 3: the root's dm-verity hash tree (DPS "root verity" type, read-only) |
//! | after it | partition 4: the app squashfs, mounted on `/app` (fuse's own type, read-only) |
//! | after it | partition 5: the app's dm-verity hash tree (fuse's own type, read-only) |
//! | last MiB | free, then the backup entries and header in the last 33 sectors |
//!
//! `BOOTX64.EFI` is a unified kernel image: systemd's EFI stub with `.osrel`, `.cmdline`,
//! `.linux` (bzImage), `.initrd` (fuse's init) and `.fuse` (the image manifest). Every GUID
//! and the FAT serial are derived from the content (UUIDv8 from sha256), never random, and no
//! clock, user, path or umask reaches the bytes: the same inputs give the same disk.
//!
//! The root is read through dm-verity (see [`fuse_rootfs::verity`]): `.cmdline` holds the
//! table with the root hash ([`crate::cmdline::image_cmdline_verity`]), the kernel creates
//! the device, and a block that does not match the tree panics the kernel. The app has a
//! filesystem, tree and device of its own ([`Volume::App`]): a new version of the app changes
//! partitions 4 and 5 (and the ESP, whose command line names their hashes), never the root's
//! bytes, so a registry or a snapshot that has the root already is sent only the app.

pub mod esp;
pub mod gpt;
mod guid;
pub mod uki;
pub mod verify;

pub use guid::Guid;

pub use crate::cmdline::Volume;
use fuse_rootfs::verity;
use fuse_rootfs::Arch;
use sha2::{Digest as _, Sha256};
use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

const MIB: u64 = 1 << 20;

/// EFI System Partition.
pub const ESP_TYPE: Guid = Guid::from_u128(0xc12a7328_f81f_11d2_ba4b_00a0c93ec93b);

/// "Linux root" of the arch (Discoverable Partitions Specification).
pub fn root_type(arch: Arch) -> Guid {
    match arch {
        Arch::X86_64 => Guid::from_u128(0x4f68bce3_e8cd_4db1_96e7_fbcaf984b709),
        Arch::Aarch64 => Guid::from_u128(0xb921b045_1df0_41c3_af44_4c6f280d3fae),
    }
}

/// "Root verity" of the arch (Discoverable Partitions Specification).
pub fn verity_type(arch: Arch) -> Guid {
    match arch {
        Arch::X86_64 => Guid::from_u128(0x2c7357ed_ebd2_46d9_aec1_23d437ec2bf5),
        Arch::Aarch64 => Guid::from_u128(0xdf3300ce_d69f_4c92_978c_9bfb0f38d820),
    }
}

/// The app filesystem's partition: fuse's own type (the DPS has none for it), so no tool
/// mistakes it for a root or `/usr`.
pub const APP_TYPE: Guid = Guid::from_u128(0xf05e0a99_3c1b_4e7a_9d2f_5a1c0e6b7d01);

/// The app's dm-verity hash partition: fuse's own type.
pub const APP_VERITY_TYPE: Guid = Guid::from_u128(0xf05e0a99_3c1b_4e7a_9d2f_5a1c0e6b7d02);

/// The type of `volume`'s data partition on `arch`.
pub fn data_type(volume: Volume, arch: Arch) -> Guid {
    match volume {
        Volume::Root => root_type(arch),
        Volume::App => APP_TYPE,
    }
}

/// The type of `volume`'s hash partition on `arch`.
pub fn hash_type(volume: Volume, arch: Arch) -> Guid {
    match volume {
        Volume::Root => verity_type(arch),
        Volume::App => APP_VERITY_TYPE,
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

/// The verity partition's name, as the DPS tools name it.
fn verity_name(arch: Arch) -> String {
    format!("{}-verity", root_name(arch))
}

/// The names of `volume`'s data and hash partitions.
fn partition_names(volume: Volume, arch: Arch) -> (String, String) {
    match volume {
        Volume::Root => (root_name(arch).into(), verity_name(arch)),
        Volume::App => ("fuse-app".into(), "fuse-app-verity".into()),
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

/// The verity partition's unique GUID: from the root hash (as systemd derives it, though not
/// with its bits), so it too is known before the disk is written.
pub fn verity_partition_uuid(root_hash_hex: &str) -> Guid {
    Guid::derive("verity-partition", root_hash_hex.as_bytes())
}

/// `volume`'s data partition GUID, from its filesystem's digest (see [`root_partition_uuid`]).
pub fn data_partition_uuid(volume: Volume, digest: &str) -> Guid {
    match volume {
        Volume::Root => root_partition_uuid(digest),
        Volume::App => Guid::derive("app-partition", hex_digest(digest).as_bytes()),
    }
}

/// `volume`'s hash partition GUID, from its tree's root hash (see [`verity_partition_uuid`]).
pub fn hash_partition_uuid(volume: Volume, root_hash_hex: &str) -> Guid {
    match volume {
        Volume::Root => verity_partition_uuid(root_hash_hex),
        Volume::App => Guid::derive("app-verity-partition", root_hash_hex.as_bytes()),
    }
}

/// What the command line says about the verity root of a root filesystem with this digest
/// and tree (see [`crate::cmdline::image_cmdline_verity`]).
pub fn verity_root(rootfs_digest: &str, tree: &verity::HashTree) -> crate::cmdline::VerityRoot {
    volume_verity(Volume::Root, rootfs_digest, tree)
}

/// What the command line says about `volume`, a filesystem with this digest and tree.
pub fn volume_verity(
    volume: Volume,
    digest: &str,
    tree: &verity::HashTree,
) -> crate::cmdline::VerityRoot {
    crate::cmdline::VerityRoot {
        data_partuuid: data_partition_uuid(volume, digest).to_string(),
        hash_partuuid: hash_partition_uuid(volume, &tree.root_hash_hex()).to_string(),
        data_blocks: tree.data_blocks,
        root_hash: tree.root_hash_hex(),
        salt: tree.salt_hex(),
    }
}

/// The hash tree of the filesystem in `path` (the root's or the app's), whose digest is
/// `rootfs_digest` (the salt is derived from it).
pub fn rootfs_tree(path: &Path, rootfs_digest: &str) -> Result<verity::HashTree, DiskError> {
    let file = File::open(path).map_err(|source| DiskError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    verity::build(
        std::io::BufReader::with_capacity(MIB as usize, file),
        &verity::salt_for(rootfs_digest),
    )
    .map_err(|source| DiskError::Read {
        path: path.to_path_buf(),
        source,
    })
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
    #[error("The dm-verity tree given for {path} is not its filesystem's (root hash {actual}, given {expected}): build again")]
    VerityChanged {
        path: PathBuf,
        expected: String,
        actual: String,
    },
    #[error("The filesystem {path} changed while the disk was written (digest {actual}, expected {expected}): build again")]
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
    /// The kernel command line, with the verity tables of [`volume_verity`] of `root` and
    /// `app` ([`crate::cmdline::image_cmdline_verity`]).
    pub cmdline: &'a str,
    /// os-release for `.osrel` (what boot menus show).
    pub osrel: &'a str,
    /// The manifest, stored as `.fuse`; its digest seeds the disk's GUIDs.
    pub manifest: &'a [u8],
    /// The root filesystem.
    pub root: VolumeInput<'a>,
    /// The app's filesystem (`/app`).
    pub app: VolumeInput<'a>,
}

/// A filesystem of the disk with its dm-verity tree.
#[derive(Debug, Clone, Copy)]
pub struct VolumeInput<'a> {
    pub path: &'a Path,
    /// `sha256:<hex>` of the filesystem (checked while it is copied).
    pub digest: &'a str,
    /// Its dm-verity tree ([`rootfs_tree`]; checked while it is copied).
    pub tree: &'a verity::HashTree,
}

impl<'a> DiskInputs<'a> {
    fn volumes(&self) -> [(Volume, VolumeInput<'a>); 2] {
        [(Volume::Root, self.root), (Volume::App, self.app)]
    }
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
    let manifest_digest = sha256_hex(inputs.manifest);
    let uki = build_uki(inputs)?;
    let esp_size = esp::esp_size(&[uki.len() as u64]);
    let esp = esp::build(
        &[(efi_boot_path(inputs.arch), &uki)],
        esp_size,
        esp_serial(&manifest_digest),
    )?;
    let sector = gpt::SECTOR;
    let esp_start = MIB;
    let mut partitions = vec![gpt::Partition {
        type_guid: ESP_TYPE,
        unique_guid: esp_guid(&manifest_digest),
        first_lba: esp_start / sector,
        last_lba: (esp_start + esp_size) / sector - 1,
        attributes: 0,
        name: "esp".into(),
    }];
    // Each filesystem, then its hash tree, each on whole MiBs.
    let mut at = esp_start + esp_size;
    let mut placed = Vec::new();
    for (volume, v) in inputs.volumes() {
        let len = std::fs::metadata(v.path)
            .map_err(|source| DiskError::Read {
                path: v.path.to_path_buf(),
                source,
            })?
            .len();
        let data_size = len.max(1).div_ceil(MIB) * MIB;
        let hash_start = at + data_size;
        let hash_size = (v.tree.hash.len() as u64).max(1).div_ceil(MIB) * MIB;
        let (data_name, hash_name) = partition_names(volume, inputs.arch);
        partitions.push(gpt::Partition {
            type_guid: data_type(volume, inputs.arch),
            unique_guid: data_partition_uuid(volume, v.digest),
            first_lba: at / sector,
            last_lba: (at + data_size) / sector - 1,
            attributes: gpt::ATTR_READ_ONLY,
            name: data_name,
        });
        partitions.push(gpt::Partition {
            type_guid: hash_type(volume, inputs.arch),
            unique_guid: hash_partition_uuid(volume, &v.tree.root_hash_hex()),
            first_lba: hash_start / sector,
            last_lba: (hash_start + hash_size) / sector - 1,
            attributes: gpt::ATTR_READ_ONLY,
            name: hash_name,
        });
        placed.push((v, at, hash_start));
        at = hash_start + hash_size;
    }
    let disk_size = at + MIB;
    let table = gpt::Table {
        disk_guid: disk_guid(&manifest_digest),
        disk_sectors: disk_size / sector,
        partitions,
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
        for (v, data_start, hash_start) in placed {
            copy_volume(file, &v, data_start, hash_start, out)?;
        }
        file.sync_all().map_err(write_err)?;
    }
    tmp.persist(out).map_err(|e| write_err(e.error))?;
    Ok(table)
}

/// Copies a filesystem to `data_start` and its tree to `hash_start`, hashing on the way: the
/// GUID in the command line was derived from the digest the caller gave, and the root hash
/// from the tree, so the bytes must be those.
fn copy_volume(
    file: &mut File,
    v: &VolumeInput<'_>,
    data_start: u64,
    hash_start: u64,
    out: &Path,
) -> Result<(), DiskError> {
    let write_err = |source| DiskError::Write {
        path: out.to_path_buf(),
        source,
    };
    let read_err = |source| DiskError::Read {
        path: v.path.to_path_buf(),
        source,
    };
    let mut from = File::open(v.path).map_err(read_err)?;
    file.seek(SeekFrom::Start(data_start)).map_err(write_err)?;
    let mut copy = Copy {
        from: &mut from,
        to: &mut *file,
        hasher: Sha256::new(),
        write_error: None,
    };
    let leaves = verity::data_hashes(&mut copy, &v.tree.salt);
    if let Some(e) = copy.write_error.take() {
        return Err(write_err(e));
    }
    let leaves = leaves.map_err(read_err)?;
    let actual = format!("sha256:{}", hex::encode(copy.hasher.finalize()));
    if hex_digest(&actual) != hex_digest(v.digest) {
        return Err(DiskError::RootfsChanged {
            path: v.path.to_path_buf(),
            expected: v.digest.to_string(),
            actual,
        });
    }
    let tree = verity::tree_of(&leaves, &v.tree.salt);
    if tree != *v.tree {
        return Err(DiskError::VerityChanged {
            path: v.path.to_path_buf(),
            expected: v.tree.root_hash_hex(),
            actual: tree.root_hash_hex(),
        });
    }
    file.write_all_at(&tree.hash, hash_start).map_err(write_err)
}

/// A reader that writes what it reads to `to` and hashes it (the root filesystem's copy).
struct Copy<'a> {
    from: &'a mut File,
    to: &'a mut File,
    hasher: Sha256,
    write_error: Option<std::io::Error>,
}

impl Read for Copy<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.from.read(buf)?;
        self.hasher.update(&buf[..n]);
        if let Err(e) = self.to.write_all(&buf[..n]) {
            // Kept apart, so the error names the disk rather than the root filesystem.
            let kind = e.kind();
            self.write_error = Some(e);
            return Err(std::io::Error::new(kind, "write failed"));
        }
        Ok(n)
    }
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

    /// The root's verity hash partition.
    pub fn verity(&self) -> Option<&gpt::Partition> {
        self.hash_partition(Volume::Root)
    }

    /// The root's verity table in the UKI's `.cmdline`, if it has one.
    pub fn verity_root(&self) -> Option<Result<crate::cmdline::VerityRoot, String>> {
        self.volume_verity(Volume::Root)
    }

    /// `volume`'s verity table in the UKI's `.cmdline`, if it has one.
    pub fn volume_verity(
        &self,
        volume: Volume,
    ) -> Option<Result<crate::cmdline::VerityRoot, String>> {
        crate::cmdline::parse_volume(
            &String::from_utf8_lossy(self.section(uki::CMDLINE)?),
            volume,
        )
    }

    pub fn root(&self) -> Option<&gpt::Partition> {
        self.data_partition(Volume::Root)
    }

    /// `volume`'s filesystem partition, by type.
    pub fn data_partition(&self, volume: Volume) -> Option<&gpt::Partition> {
        self.table.partitions.iter().find(|p| {
            Arch::ALL
                .iter()
                .any(|a| data_type(volume, *a) == p.type_guid)
        })
    }

    /// `volume`'s hash partition, by type.
    pub fn hash_partition(&self, volume: Volume) -> Option<&gpt::Partition> {
        self.table.partitions.iter().find(|p| {
            Arch::ALL
                .iter()
                .any(|a| hash_type(volume, *a) == p.type_guid)
        })
    }

    /// The index of `p` in the table (0-based).
    pub fn index_of(&self, p: &gpt::Partition) -> usize {
        self.table
            .partitions
            .iter()
            .position(|q| q == p)
            .unwrap_or(0)
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
    use super::verify::{verify, Expected};
    use super::*;

    pub(super) struct Fixture {
        pub(super) dir: tempfile::TempDir,
        manifest: Vec<u8>,
        kernel: Vec<u8>,
        initrd: Vec<u8>,
        cmdline: String,
        rootfs_digest: String,
        tree: verity::HashTree,
        app_digest: String,
        app_tree: verity::HashTree,
    }

    pub(super) fn fixture() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let rootfs: Vec<u8> = (0..1_500_000u32).map(|i| (i % 253) as u8).collect();
        std::fs::write(dir.path().join("rootfs"), &rootfs).unwrap();
        let rootfs_digest = sha256_hex(&rootfs);
        let kernel = vec![0x4bu8; 300_000];
        std::fs::write(dir.path().join("kernel"), &kernel).unwrap();
        let tree = rootfs_tree(&dir.path().join("rootfs"), &rootfs_digest).unwrap();
        let app: Vec<u8> = (0..20_000u32).map(|i| (i % 251) as u8).collect();
        std::fs::write(dir.path().join("app"), &app).unwrap();
        let app_digest = sha256_hex(&app);
        let app_tree = rootfs_tree(&dir.path().join("app"), &app_digest).unwrap();
        Fixture {
            manifest: b"{\"name\":\"t\"}\n".to_vec(),
            kernel,
            initrd: vec![0x49u8; 70_000],
            cmdline: crate::cmdline::image_cmdline_verity(
                Arch::X86_64,
                &verity_root(&rootfs_digest, &tree),
                &volume_verity(Volume::App, &app_digest, &app_tree),
            ),
            rootfs_digest,
            tree,
            app_digest,
            app_tree,
            dir,
        }
    }

    /// The fixture's parts as disk inputs, with `stub` and the root at `rootfs`, the app at
    /// `app`.
    fn inputs<'a>(
        f: &'a Fixture,
        stub: &'a [u8],
        rootfs: &'a Path,
        app: &'a Path,
    ) -> DiskInputs<'a> {
        DiskInputs {
            arch: Arch::X86_64,
            stub,
            kernel: &f.kernel,
            initrd: &f.initrd,
            cmdline: &f.cmdline,
            osrel: "ID=fuse\n",
            manifest: &f.manifest,
            root: VolumeInput {
                path: rootfs,
                digest: &f.rootfs_digest,
                tree: &f.tree,
            },
            app: VolumeInput {
                path: app,
                digest: &f.app_digest,
                tree: &f.app_tree,
            },
        }
    }

    pub(super) fn build(f: &Fixture, out: &Path) -> gpt::Table {
        let stub = uki::tests::tiny_stub();
        let rootfs = f.dir.path().join("rootfs");
        let app = f.dir.path().join("app");
        build_disk(&inputs(f, &stub, &rootfs, &app), out).unwrap()
    }

    pub(super) fn expected(f: &Fixture) -> Expected {
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
            appfs: Some((f.app_digest.clone(), 20_000, Some(f.dir.path().join("app")))),
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
        // 1 MiB GPT + 3 MiB ESP (FAT16 minimum) + 2 MiB root + 1 MiB verity + 1 MiB app +
        // 1 MiB app verity + 1 MiB tail.
        assert_eq!(size, 10 * MIB, "{table:?}");
        assert_eq!(table.partitions.len(), 5);
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
        // The hash tree in its partition, named by the command line.
        let hashes = disk.verity().unwrap();
        assert_eq!(hashes.type_guid, verity_type(Arch::X86_64));
        assert_eq!(hashes.name, "root-x86-64-verity");
        assert_eq!(
            hashes.unique_guid,
            verity_partition_uuid(&f.tree.root_hash_hex())
        );
        let v = disk.verity_root().unwrap().unwrap();
        assert_eq!(v.root_hash, f.tree.root_hash_hex());
        assert_eq!(v.data_partuuid, root.unique_guid.to_string());
        assert_eq!(v.hash_partuuid, hashes.unique_guid.to_string());
        assert_eq!(v.data_blocks, 1_500_000u64.div_ceil(4096));
        assert!(!f.tree.hash.is_empty());
        assert_eq!(disk.section(uki::LINUX).unwrap(), &f.kernel[..]);
        assert_eq!(disk.section(uki::INITRD).unwrap(), &f.initrd[..]);
        assert_eq!(disk.section(uki::FUSE).unwrap(), &f.manifest[..]);
        assert_eq!(disk.section(uki::CMDLINE).unwrap(), f.cmdline.as_bytes());
        // The section's disk offset really points at its bytes.
        let raw = std::fs::read(&out).unwrap();
        let at = disk.section_disk_offset(uki::LINUX, 0).unwrap() as usize;
        assert_eq!(&raw[at..at + f.kernel.len()], &f.kernel[..]);
        let h = hashes.offset() as usize;
        assert_eq!(&raw[h..h + f.tree.hash.len()], &f.tree.hash[..]);
        let r = root.offset() as usize;
        assert_eq!(
            &raw[r..r + 1_500_000],
            &std::fs::read(f.dir.path().join("rootfs")).unwrap()[..]
        );
        // The app's filesystem and tree, after the root's, named by the command line.
        let app = disk.data_partition(Volume::App).unwrap();
        let app_hashes = disk.hash_partition(Volume::App).unwrap();
        assert!(app.offset() > hashes.offset());
        assert_eq!(
            app.unique_guid,
            data_partition_uuid(Volume::App, &f.app_digest)
        );
        let a = app.offset() as usize;
        assert_eq!(
            &raw[a..a + 20_000],
            &std::fs::read(f.dir.path().join("app")).unwrap()[..]
        );
        let ah = app_hashes.offset() as usize;
        assert_eq!(&raw[ah..ah + f.app_tree.hash.len()], &f.app_tree.hash[..]);
        let va = disk.volume_verity(Volume::App).unwrap().unwrap();
        assert_eq!(va.data_partuuid, app.unique_guid.to_string());
        assert_eq!(va.hash_partuuid, app_hashes.unique_guid.to_string());

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

    /// A tree that is not the root filesystem's (another salt, as from another digest) is
    /// refused: the root hash in the command line would not match the disk.
    #[test]
    fn test_a_tree_of_other_bytes_is_refused() {
        let mut f = fixture();
        f.tree = verity::build(&b"other"[..], &f.tree.salt).unwrap();
        let stub = uki::tests::tiny_stub();
        let out = f.dir.path().join("disk.raw");
        let rootfs = f.dir.path().join("rootfs");
        let app = f.dir.path().join("app");
        let err = build_disk(&inputs(&f, &stub, &rootfs, &app), &out).unwrap_err();
        assert!(matches!(err, DiskError::VerityChanged { .. }), "{err:?}");
        assert!(!out.exists(), "nothing half-written");
    }

    pub(super) fn flip(path: &Path, at: u64) {
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
}
