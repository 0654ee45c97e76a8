//! GUID partition tables: the protective MBR, the primary and backup headers and entry arrays,
//! written and read back with every CRC checked.
//!
//! Written here rather than with the `gpt` crate: fuse needs exact control of every byte (GUIDs
//! derived from content, fixed entry count, no clock), and a reader that says *where* a table is
//! damaged; GPT is two CRC32s over a 92-byte header and a 16 KiB array, smaller than the glue
//! the crate would need.

use super::guid::Guid;

/// Bytes per logical block: what QEMU's virtio-blk and every cloud's boot disk present.
pub const SECTOR: u64 = 512;
/// Entries in each table: the minimum UEFI allows (16 KiB), what every tool writes.
pub const ENTRY_COUNT: u32 = 128;
/// Bytes per entry.
pub const ENTRY_SIZE: u32 = 128;
/// Sectors of one entry array.
pub const ENTRY_SECTORS: u64 = (ENTRY_COUNT as u64 * ENTRY_SIZE as u64) / SECTOR;
/// Bytes of the header that its CRC covers (UEFI 2.x revision 1.0).
const HEADER_SIZE: u32 = 92;
const SIGNATURE: &[u8; 8] = b"EFI PART";
const REVISION: u32 = 0x0001_0000;

/// Partition attribute bit 60: read-only (Discoverable Partitions Specification).
pub const ATTR_READ_ONLY: u64 = 1 << 60;

/// One partition as fuse lays it out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Partition {
    pub type_guid: Guid,
    pub unique_guid: Guid,
    pub first_lba: u64,
    /// Inclusive, as GPT stores it.
    pub last_lba: u64,
    pub attributes: u64,
    pub name: String,
}

impl Partition {
    pub fn offset(&self) -> u64 {
        self.first_lba * SECTOR
    }

    pub fn size(&self) -> u64 {
        (self.last_lba + 1 - self.first_lba) * SECTOR
    }
}

/// A whole partition table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Table {
    pub disk_guid: Guid,
    /// Total size of the disk in sectors.
    pub disk_sectors: u64,
    pub partitions: Vec<Partition>,
}

/// What is wrong with a table on disk; every variant says where.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum GptError {
    #[error("No protective MBR at byte 0 (boot signature or type 0xEE missing): not a GPT disk")]
    NoProtectiveMbr,
    #[error("No GPT header signature in the {which} header at byte {offset}: not a GPT disk, or the header is damaged")]
    NoSignature { which: &'static str, offset: u64 },
    #[error("The {which} GPT header at byte {offset} has a bad CRC (stored {stored:#010x}, computed {computed:#010x}): the header is damaged")]
    HeaderCrc {
        which: &'static str,
        offset: u64,
        stored: u32,
        computed: u32,
    },
    #[error("The {which} GPT entry array at byte {offset} has a bad CRC (stored {stored:#010x}, computed {computed:#010x}): a partition entry is damaged")]
    EntriesCrc {
        which: &'static str,
        offset: u64,
        stored: u32,
        computed: u32,
    },
    #[error("The {which} GPT header at byte {offset} is inconsistent: {what}")]
    Inconsistent {
        which: &'static str,
        offset: u64,
        what: String,
    },
    #[error("The disk is too small for a GPT ({size} bytes)")]
    TooSmall { size: u64 },
    #[error("The disk is {size} bytes, not a whole number of 512-byte sectors: it is truncated or not a disk image")]
    PartialSector { size: u64 },
}

/// The LBA of the backup header.
fn backup_lba(disk_sectors: u64) -> u64 {
    disk_sectors - 1
}

/// The first LBA a partition may use: after the MBR, the header and the entries.
pub fn first_usable_lba() -> u64 {
    2 + ENTRY_SECTORS
}

/// The last LBA a partition may use: before the backup entries and header.
pub fn last_usable_lba(disk_sectors: u64) -> u64 {
    disk_sectors - 2 - ENTRY_SECTORS
}

impl Table {
    /// The entry array's bytes (both copies are identical).
    pub fn entries(&self) -> Vec<u8> {
        let mut out = vec![0u8; (ENTRY_COUNT * ENTRY_SIZE) as usize];
        for (i, p) in self.partitions.iter().enumerate() {
            let e = &mut out[i * ENTRY_SIZE as usize..(i + 1) * ENTRY_SIZE as usize];
            e[0..16].copy_from_slice(&p.type_guid.to_gpt_bytes());
            e[16..32].copy_from_slice(&p.unique_guid.to_gpt_bytes());
            e[32..40].copy_from_slice(&p.first_lba.to_le_bytes());
            e[40..48].copy_from_slice(&p.last_lba.to_le_bytes());
            e[48..56].copy_from_slice(&p.attributes.to_le_bytes());
            for (j, unit) in p.name.encode_utf16().take(36).enumerate() {
                e[56 + 2 * j..58 + 2 * j].copy_from_slice(&unit.to_le_bytes());
            }
        }
        out
    }

    /// One header sector: `primary` at LBA 1 pointing at the entries at LBA 2, or the backup
    /// at the last LBA pointing at the entries just before it.
    pub fn header(&self, primary: bool, entries_crc: u32) -> [u8; SECTOR as usize] {
        let backup = backup_lba(self.disk_sectors);
        let (my_lba, alternate, entries_lba) = if primary {
            (1, backup, 2)
        } else {
            (backup, 1, backup - ENTRY_SECTORS)
        };
        let mut h = [0u8; SECTOR as usize];
        h[0..8].copy_from_slice(SIGNATURE);
        h[8..12].copy_from_slice(&REVISION.to_le_bytes());
        h[12..16].copy_from_slice(&HEADER_SIZE.to_le_bytes());
        // 16..20: CRC, computed last over the header with this field zero.
        h[24..32].copy_from_slice(&my_lba.to_le_bytes());
        h[32..40].copy_from_slice(&alternate.to_le_bytes());
        h[40..48].copy_from_slice(&first_usable_lba().to_le_bytes());
        h[48..56].copy_from_slice(&last_usable_lba(self.disk_sectors).to_le_bytes());
        h[56..72].copy_from_slice(&self.disk_guid.to_gpt_bytes());
        h[72..80].copy_from_slice(&entries_lba.to_le_bytes());
        h[80..84].copy_from_slice(&ENTRY_COUNT.to_le_bytes());
        h[84..88].copy_from_slice(&ENTRY_SIZE.to_le_bytes());
        h[88..92].copy_from_slice(&entries_crc.to_le_bytes());
        let crc = crc32fast::hash(&h[..HEADER_SIZE as usize]);
        h[16..20].copy_from_slice(&crc.to_le_bytes());
        h
    }

    /// The protective MBR: one partition of type 0xEE covering the disk (capped at 2 TiB, as
    /// UEFI says), so MBR-only tools see the disk as in use.
    pub fn protective_mbr(&self) -> [u8; SECTOR as usize] {
        let mut m = [0u8; SECTOR as usize];
        let e = &mut m[446..462];
        e[0] = 0x00; // not bootable
        e[1..4].copy_from_slice(&[0x00, 0x02, 0x00]); // CHS of LBA 1
        e[4] = 0xEE;
        e[5..8].copy_from_slice(&[0xFF, 0xFF, 0xFF]);
        e[8..12].copy_from_slice(&1u32.to_le_bytes());
        let size = (self.disk_sectors - 1).min(u64::from(u32::MAX)) as u32;
        e[12..16].copy_from_slice(&size.to_le_bytes());
        m[510] = 0x55;
        m[511] = 0xAA;
        m
    }

    /// The regions to write: (byte offset, bytes): MBR and primary table at the start, backup
    /// entries and header at the end.
    pub fn regions(&self) -> Vec<(u64, Vec<u8>)> {
        let entries = self.entries();
        let crc = crc32fast::hash(&entries);
        let backup = backup_lba(self.disk_sectors);
        let mut start = Vec::with_capacity(((2 + ENTRY_SECTORS) * SECTOR) as usize);
        start.extend_from_slice(&self.protective_mbr());
        start.extend_from_slice(&self.header(true, crc));
        start.extend_from_slice(&entries);
        let mut end = entries;
        end.extend_from_slice(&self.header(false, crc));
        vec![(0, start), ((backup - ENTRY_SECTORS) * SECTOR, end)]
    }
}

fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

fn le64(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

/// Reads and checks one header; returns (entries LBA, disk GUID, alternate LBA).
fn parse_header(
    sector: &[u8],
    which: &'static str,
    lba: u64,
) -> Result<(u64, Guid, u64, u32), GptError> {
    let offset = lba * SECTOR;
    if &sector[0..8] != SIGNATURE {
        return Err(GptError::NoSignature { which, offset });
    }
    let size = le32(sector, 12);
    if size < HEADER_SIZE || size as u64 > SECTOR {
        return Err(GptError::Inconsistent {
            which,
            offset: offset + 12,
            what: format!("header size {size}"),
        });
    }
    let stored = le32(sector, 16);
    let mut copy = sector[..size as usize].to_vec();
    copy[16..20].fill(0);
    let computed = crc32fast::hash(&copy);
    if stored != computed {
        return Err(GptError::HeaderCrc {
            which,
            offset,
            stored,
            computed,
        });
    }
    if le64(sector, 24) != lba {
        return Err(GptError::Inconsistent {
            which,
            offset: offset + 24,
            what: format!("it says it is at LBA {}, it is at {lba}", le64(sector, 24)),
        });
    }
    if le32(sector, 80) != ENTRY_COUNT || le32(sector, 84) != ENTRY_SIZE {
        return Err(GptError::Inconsistent {
            which,
            offset: offset + 80,
            what: format!(
                "{} entries of {} bytes (fuse writes {ENTRY_COUNT} of {ENTRY_SIZE})",
                le32(sector, 80),
                le32(sector, 84)
            ),
        });
    }
    let guid = Guid::from_gpt_bytes(sector[56..72].try_into().expect("16 bytes"));
    Ok((le64(sector, 72), guid, le64(sector, 32), le32(sector, 88)))
}

fn parse_entries(entries: &[u8]) -> Vec<Partition> {
    entries
        .chunks(ENTRY_SIZE as usize)
        .filter(|e| e[0..16].iter().any(|&b| b != 0))
        .map(|e| {
            let units: Vec<u16> = e[56..128]
                .chunks(2)
                .map(|c| u16::from_le_bytes([c[0], c[1]]))
                .take_while(|&u| u != 0)
                .collect();
            Partition {
                type_guid: Guid::from_gpt_bytes(e[0..16].try_into().expect("16")),
                unique_guid: Guid::from_gpt_bytes(e[16..32].try_into().expect("16")),
                first_lba: le64(e, 32),
                last_lba: le64(e, 40),
                attributes: le64(e, 48),
                name: String::from_utf16_lossy(&units),
            }
        })
        .collect()
}

/// Reads one copy of the table (`primary` at LBA 1, or the backup in the last sector) through
/// `read_at(offset, len)`, checking its header and entry array CRCs.
pub fn read_one(
    disk_size: u64,
    primary: bool,
    read_at: &mut dyn FnMut(u64, usize) -> std::io::Result<Vec<u8>>,
) -> std::io::Result<Result<Table, GptError>> {
    if !disk_size.is_multiple_of(SECTOR) {
        return Ok(Err(GptError::PartialSector { size: disk_size }));
    }
    if disk_size < (2 * (2 + ENTRY_SECTORS) + 1) * SECTOR {
        return Ok(Err(GptError::TooSmall { size: disk_size }));
    }
    let disk_sectors = disk_size / SECTOR;
    let (which, lba, expected_alternate) = if primary {
        ("primary", 1, backup_lba(disk_sectors))
    } else {
        ("backup", backup_lba(disk_sectors), 1)
    };
    let header = read_at(lba * SECTOR, SECTOR as usize)?;
    let (entries_lba, disk_guid, alternate, stored) = match parse_header(&header, which, lba) {
        Ok(h) => h,
        Err(e) => return Ok(Err(e)),
    };
    if alternate != expected_alternate {
        return Ok(Err(GptError::Inconsistent {
            which,
            offset: lba * SECTOR + 32,
            what: format!("alternate header at LBA {alternate}, the disk's other header is at {expected_alternate} (was the disk resized?)"),
        }));
    }
    if entries_lba + ENTRY_SECTORS > disk_sectors {
        return Ok(Err(GptError::Inconsistent {
            which,
            offset: lba * SECTOR + 72,
            what: format!("entries at LBA {entries_lba}, past the end of the disk"),
        }));
    }
    let entries = read_at(entries_lba * SECTOR, (ENTRY_COUNT * ENTRY_SIZE) as usize)?;
    let computed = crc32fast::hash(&entries);
    if computed != stored {
        return Ok(Err(GptError::EntriesCrc {
            which,
            offset: entries_lba * SECTOR,
            stored,
            computed,
        }));
    }
    Ok(Ok(Table {
        disk_guid,
        disk_sectors,
        partitions: parse_entries(&entries),
    }))
}

/// Checks the protective MBR.
pub fn check_mbr(mbr: &[u8]) -> Result<(), GptError> {
    if mbr.len() < 512 || mbr[510..512] != [0x55, 0xAA] || mbr[446 + 4] != 0xEE {
        return Err(GptError::NoProtectiveMbr);
    }
    Ok(())
}

/// Reads a table through `read_at(offset, len)`, checking the protective MBR, both headers,
/// both entry arrays and that the two copies agree.
pub fn read(
    disk_size: u64,
    read_at: &mut dyn FnMut(u64, usize) -> std::io::Result<Vec<u8>>,
) -> std::io::Result<Result<Table, GptError>> {
    if !disk_size.is_multiple_of(SECTOR) {
        return Ok(Err(GptError::PartialSector { size: disk_size }));
    }
    if disk_size < SECTOR {
        return Ok(Err(GptError::TooSmall { size: disk_size }));
    }
    if let Err(e) = check_mbr(&read_at(0, SECTOR as usize)?) {
        return Ok(Err(e));
    }
    let primary = match read_one(disk_size, true, read_at)? {
        Ok(t) => t,
        Err(e) => return Ok(Err(e)),
    };
    let backup = match read_one(disk_size, false, read_at)? {
        Ok(t) => t,
        Err(e) => return Ok(Err(e)),
    };
    if primary != backup {
        return Ok(Err(GptError::Inconsistent {
            which: "backup",
            offset: backup_lba(primary.disk_sectors) * SECTOR,
            what: "it describes other partitions than the primary header".into(),
        }));
    }
    Ok(Ok(primary))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table() -> Table {
        Table {
            disk_guid: Guid::derive("test-disk", b"x"),
            disk_sectors: 8 * 2048,
            partitions: vec![
                Partition {
                    type_guid: super::super::ESP_TYPE,
                    unique_guid: Guid::derive("test-esp", b"x"),
                    first_lba: 2048,
                    last_lba: 4095,
                    attributes: 0,
                    name: "EFI System Partition".into(),
                },
                Partition {
                    type_guid: super::super::root_type(fuse_rootfs::Arch::X86_64),
                    unique_guid: Guid::derive("test-root", b"x"),
                    first_lba: 4096,
                    last_lba: 6143,
                    attributes: ATTR_READ_ONLY,
                    name: "root-x86-64".into(),
                },
            ],
        }
    }

    fn image(t: &Table) -> Vec<u8> {
        let mut disk = vec![0u8; (t.disk_sectors * SECTOR) as usize];
        for (off, bytes) in t.regions() {
            disk[off as usize..off as usize + bytes.len()].copy_from_slice(&bytes);
        }
        disk
    }

    fn parse(disk: &[u8]) -> Result<Table, GptError> {
        read(disk.len() as u64, &mut |off, len| {
            Ok(disk[off as usize..off as usize + len].to_vec())
        })
        .unwrap()
    }

    #[test]
    fn test_round_trip_and_layout() {
        let t = table();
        let disk = image(&t);
        assert_eq!(parse(&disk).unwrap(), t);
        // Primary header at LBA 1, backup header in the very last sector.
        assert_eq!(&disk[512..520], b"EFI PART");
        let last = disk.len() - 512;
        assert_eq!(&disk[last..last + 8], b"EFI PART");
        // The backup points back at LBA 1 and at its entries just before it.
        assert_eq!(le64(&disk[last..], 32), 1);
        assert_eq!(le64(&disk[last..], 72), t.disk_sectors - 1 - ENTRY_SECTORS);
        assert_eq!(le64(&disk[512..], 40), 34, "first usable LBA");
        assert_eq!(
            le64(&disk[512..], 48),
            t.disk_sectors - 34,
            "last usable LBA"
        );
        // Protective MBR.
        assert_eq!(disk[446 + 4], 0xEE);
        assert_eq!(le32(&disk, 446 + 12) as u64, t.disk_sectors - 1);
    }

    #[test]
    fn test_header_crc_is_the_standard_crc32() {
        // CRC32 (IEEE, as zlib) of the header with the CRC field zeroed.
        let t = table();
        let disk = image(&t);
        let mut h = disk[512..512 + 92].to_vec();
        let stored = le32(&h, 16);
        h[16..20].fill(0);
        assert_eq!(stored, crc32fast::hash(&h));
        assert_eq!(
            crc32fast::hash(b"123456789"),
            0xCBF4_3926,
            "CRC-32/ISO-HDLC check value"
        );
        let entries_crc = le32(&disk[512..], 88);
        assert_eq!(entries_crc, crc32fast::hash(&disk[1024..1024 + 16384]));
    }

    #[test]
    fn test_guids_are_stored_mixed_endian() {
        // The ESP type GUID as every tool writes it on disk.
        let bytes = super::super::ESP_TYPE.to_gpt_bytes();
        assert_eq!(
            bytes,
            [
                0x28, 0x73, 0x2a, 0xc1, 0x1f, 0xf8, 0xd2, 0x11, 0xba, 0x4b, 0x00, 0xa0, 0xc9, 0x3e,
                0xc9, 0x3b
            ]
        );
    }

    #[test]
    fn test_damage_is_located() {
        let t = table();
        let mut disk = image(&t);
        disk[512 + 60] ^= 1; // disk GUID in the primary header
        assert!(matches!(
            parse(&disk),
            Err(GptError::HeaderCrc {
                which: "primary",
                offset: 512,
                ..
            })
        ));
        let mut disk = image(&t);
        disk[1024 + 130] ^= 1; // second entry, primary array
        assert!(matches!(
            parse(&disk),
            Err(GptError::EntriesCrc {
                which: "primary",
                offset: 1024,
                ..
            })
        ));
        let mut disk = image(&t);
        let n = disk.len();
        disk[n - 512 + 40] ^= 1; // backup header
        assert!(matches!(
            parse(&disk),
            Err(GptError::HeaderCrc {
                which: "backup",
                ..
            })
        ));
        let mut disk = image(&t);
        disk[510] = 0;
        assert_eq!(parse(&disk), Err(GptError::NoProtectiveMbr));
    }

    #[test]
    fn test_a_partial_sector_is_named_not_called_too_small() {
        let mut disk = image(&table());
        disk.extend_from_slice(&[0; 100]);
        let err = parse(&disk).unwrap_err();
        assert_eq!(
            err,
            GptError::PartialSector {
                size: disk.len() as u64
            }
        );
        assert!(err
            .to_string()
            .contains("not a whole number of 512-byte sectors"));
        let reader =
            &mut |off: u64, len: usize| Ok(disk[off as usize..off as usize + len].to_vec());
        assert!(matches!(
            read_one(disk.len() as u64, false, reader).unwrap(),
            Err(GptError::PartialSector { .. })
        ));
    }
}
