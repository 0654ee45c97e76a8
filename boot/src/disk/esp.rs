//! The EFI System Partition: a FAT16 volume, just large enough, written byte for byte the same
//! for the same files (fixed timestamps, a serial derived from the content, files created in
//! the order given).
//!
//! FAT16 rather than FAT32: FAT32 needs at least 65525 clusters (33 MiB with 512-byte
//! clusters) where the ESP holds one ~3 MB file; EDK2's FAT driver (OVMF, and the EDK2-based
//! firmware of the big clouds) reads FAT12/16/32 alike, and the disk boots through OVMF in the
//! tests. Written with the `fatfs` crate: a FAT writer is a lot of on-disk detail, `fatfs` is
//! pure Rust, takes the clock as a parameter, and `fsck.vfat` finds its volumes clean.

use fatfs::{Date, DateTime, FatType, FileSystem, FormatVolumeOptions, FsOptions, Time};
use std::io::{Cursor, Read, Write};

const MIB: u64 = 1 << 20;
/// FAT16's cluster count range (Microsoft's FAT specification).
const FAT16_MIN_CLUSTERS: u64 = 4085;
const FAT16_MAX_CLUSTERS: u64 = 65524;

#[derive(Debug, thiserror::Error)]
pub enum EspError {
    #[error("Cannot write the EFI System Partition")]
    Write(#[source] std::io::Error),
    #[error("Cannot read the EFI System Partition as FAT")]
    Read(#[source] std::io::Error),
}

/// Every timestamp of the volume: the FAT epoch, 1980-01-01 00:00 (what a zero date field
/// means), so no build's clock or time zone reaches the disk. fuse's other FAT volume, the
/// NoCloud seed (`fuse export --format nocloud`), is written with it too.
#[derive(Debug)]
pub struct FixedTime;

const EPOCH: Date = Date {
    year: 1980,
    month: 1,
    day: 1,
};

impl fatfs::TimeProvider for FixedTime {
    fn get_current_date(&self) -> Date {
        EPOCH
    }

    fn get_current_date_time(&self) -> DateTime {
        DateTime {
            date: EPOCH,
            time: Time {
                hour: 0,
                min: 0,
                sec: 0,
                millis: 0,
            },
        }
    }
}

/// The [`FixedTime`] to hand `fatfs::FsOptions::time_provider`.
pub static FIXED_TIME: FixedTime = FixedTime;

/// Bytes per cluster: the smallest that keeps FAT16 under its cluster limit.
fn cluster_size(data_bytes: u64) -> u32 {
    let mut cluster = 512u64;
    while data_bytes / cluster > FAT16_MAX_CLUSTERS - 16 {
        cluster *= 2;
    }
    cluster as u32
}

/// The size of an ESP for files of these sizes: whole MiB, enough room for the files, the
/// directories and the FATs, and at least FAT16's minimum cluster count.
pub fn esp_size(file_sizes: &[u64]) -> u64 {
    let data: u64 = file_sizes.iter().sum();
    let cluster = u64::from(cluster_size(data));
    let clusters: u64 = file_sizes.iter().map(|s| s.div_ceil(cluster)).sum::<u64>() + 8;
    // Reserved sector, root directory (512 entries), two FATs of 2 bytes per cluster.
    let overhead = 512 + 16 * 1024 + 2 * 2 * (clusters + 2);
    let needed = (clusters * cluster + overhead).max(FAT16_MIN_CLUSTERS * cluster + overhead);
    needed.div_ceil(MIB) * MIB
}

/// A FAT volume of `size` bytes holding `files` (path with `/`, bytes), written in order.
pub fn build(files: &[(&str, &[u8])], size: u64, serial: u32) -> Result<Vec<u8>, EspError> {
    let data: u64 = files.iter().map(|(_, b)| b.len() as u64).sum();
    let mut volume = Cursor::new(vec![0u8; size as usize]);
    let options = FormatVolumeOptions::new()
        .fat_type(FatType::Fat16)
        .bytes_per_cluster(cluster_size(data))
        .volume_id(serial)
        .volume_label(*b"ESP        ");
    fatfs::format_volume(&mut volume, options).map_err(EspError::Write)?;
    {
        let fs = FileSystem::new(&mut volume, FsOptions::new().time_provider(&FIXED_TIME))
            .map_err(EspError::Write)?;
        for (path, bytes) in files {
            let mut dir = fs.root_dir();
            let mut parts: Vec<&str> = path.split('/').filter(|p| !p.is_empty()).collect();
            let name = parts.pop().unwrap_or_default();
            for part in parts {
                dir = match dir.open_dir(part) {
                    Ok(d) => d,
                    Err(_) => dir.create_dir(part).map_err(EspError::Write)?,
                };
            }
            let mut file = dir.create_file(name).map_err(EspError::Write)?;
            file.truncate().map_err(EspError::Write)?;
            file.write_all(bytes).map_err(EspError::Write)?;
            file.flush().map_err(EspError::Write)?;
        }
        fs.unmount().map_err(EspError::Write)?;
    }
    Ok(volume.into_inner())
}

/// Every file of a FAT volume, (path, bytes), in directory order.
pub fn files(volume: &[u8]) -> Result<Vec<(String, Vec<u8>)>, EspError> {
    let mut copy = Cursor::new(volume.to_vec());
    let fs = FileSystem::new(&mut copy, FsOptions::new().time_provider(&FIXED_TIME))
        .map_err(EspError::Read)?;
    let mut out = Vec::new();
    let mut stack = vec![(String::new(), fs.root_dir())];
    while let Some((prefix, dir)) = stack.pop() {
        for entry in dir.iter() {
            let entry = entry.map_err(EspError::Read)?;
            let name = String::from_utf8_lossy(entry.short_file_name_as_bytes()).into_owned();
            if name == "." || name == ".." {
                continue;
            }
            let path = format!("{prefix}/{name}");
            if entry.is_dir() {
                stack.push((path, entry.to_dir()));
            } else {
                let mut bytes = Vec::new();
                entry
                    .to_file()
                    .read_to_end(&mut bytes)
                    .map_err(EspError::Read)?;
                out.push((path, bytes));
            }
        }
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(out)
}

/// The FAT type and volume serial of a volume.
pub fn describe(volume: &[u8]) -> Result<(String, u32), EspError> {
    let mut copy = Cursor::new(volume.to_vec());
    let fs = FileSystem::new(&mut copy, FsOptions::new()).map_err(EspError::Read)?;
    let kind = match fs.fat_type() {
        FatType::Fat12 => "FAT12",
        FatType::Fat16 => "FAT16",
        FatType::Fat32 => "FAT32",
    };
    Ok((kind.to_string(), fs.volume_id()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Vec<u8> {
        (0..3_000_000u32).map(|i| (i * 7 % 251) as u8).collect()
    }

    #[test]
    fn test_files_round_trip_and_volume_is_fat16() {
        let uki = sample();
        let size = esp_size(&[uki.len() as u64]);
        assert_eq!(size % MIB, 0);
        assert!(size <= 5 * MIB, "just large enough: {size}");
        let vol = build(&[("EFI/BOOT/BOOTX64.EFI", &uki)], size, 0x1234_5678).unwrap();
        assert_eq!(vol.len() as u64, size);
        let files = files(&vol).unwrap();
        assert_eq!(files.len(), 1);
        assert_eq!(files[0].0, "/EFI/BOOT/BOOTX64.EFI");
        assert_eq!(files[0].1, uki);
        assert_eq!(describe(&vol).unwrap(), ("FAT16".to_string(), 0x1234_5678));
    }

    #[test]
    fn test_same_files_same_bytes_other_serial_other_bytes() {
        let uki = sample();
        let size = esp_size(&[uki.len() as u64]);
        let a = build(&[("EFI/BOOT/BOOTX64.EFI", &uki)], size, 7).unwrap();
        let b = build(&[("EFI/BOOT/BOOTX64.EFI", &uki)], size, 7).unwrap();
        assert!(a == b, "FAT images differ between two builds");
        let c = build(&[("EFI/BOOT/BOOTX64.EFI", &uki)], size, 8).unwrap();
        assert!(a != c);
        // No timestamp but the FAT epoch: directory entries' date fields are 1980-01-01 (0x21).
        let (_, serial) = describe(&a).unwrap();
        assert_eq!(serial, 7);
    }

    #[test]
    fn test_small_and_large_contents_fit() {
        for len in [0usize, 1, 40 << 20] {
            let data = vec![1u8; len];
            let size = esp_size(&[len as u64]);
            let vol = build(&[("EFI/BOOT/BOOTX64.EFI", &data)], size, 1).unwrap();
            assert_eq!(files(&vol).unwrap()[0].1.len(), len);
            assert_eq!(describe(&vol).unwrap().0, "FAT16");
        }
    }

    #[test]
    fn test_fsck_vfat_finds_the_volume_clean() {
        let Ok(out) = std::process::Command::new("fsck.vfat")
            .arg("--help")
            .output()
        else {
            eprintln!("fsck.vfat (dosfstools) is not installed (ci/setup installs it): skipped");
            return;
        };
        drop(out);
        let uki = sample();
        let vol = build(
            &[("EFI/BOOT/BOOTX64.EFI", &uki)],
            esp_size(&[uki.len() as u64]),
            42,
        )
        .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("esp.img");
        std::fs::write(&path, &vol).unwrap();
        let out = std::process::Command::new("fsck.vfat")
            .arg("-n")
            .arg(&path)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned()
            + &String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "fsck.vfat -n failed:\n{text}");
        assert!(!text.to_lowercase().contains("dirty"), "{text}");
    }
}
