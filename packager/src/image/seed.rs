//! `fuse export --format nocloud`: a NoCloud seed disk, the configuration disk a cloud (or a
//! hypervisor) attaches beside the image's disk. Not the image: it holds one deployment's
//! user-data (`run::userdata`) and the instance's meta-data, and the init reads it when no run
//! overlay came through fw_cfg.
//!
//! A FAT12 volume labelled `CIDATA` (cloud-init's NoCloud convention) with the files
//! `user-data` and `meta-data`, written byte for byte the same for the same contents: fixed
//! timestamps (the FAT epoch), a volume serial derived from the contents, files in a fixed
//! order. Written with the `fatfs` crate, as the ESP is (`fuse_boot::disk::esp`). That crate
//! writes long file names only with its `alloc` feature, which would also give every name of
//! the ESP a long-name entry and so change every image's bytes; so the volume is written with
//! short names and the one long-name entry of each file (its name fits one) is put in front of
//! its short entry here, as VFAT specifies.

use crate::host::digest;
use anyhow::{bail, ensure, Context, Result};
use fatfs::{FatType, FileSystem, FormatVolumeOptions, FsOptions};
use fuse_boot::disk::esp::FIXED_TIME;
use std::io::{Cursor, Write};

/// The volume label NoCloud looks for (cloud-init accepts `cidata` and `CIDATA`).
pub(crate) const LABEL: &[u8; 11] = b"CIDATA     ";
/// The name of the user-data file.
pub(crate) const USER_DATA: &str = "user-data";
/// The name of the meta-data file.
pub(crate) const META_DATA: &str = "meta-data";

const MIB: u64 = 1 << 20;
/// The seed's size: user-data is at most 64 KiB (`fuse_boot::spec::USER_DATA_MAX`, the
/// init's cap), so 1 MiB of 512-byte clusters (2,048, under FAT12's 4,084) always holds it.
const SIZE: u64 = MIB;
const CLUSTER: u32 = 512;
const DIR_ENTRY: usize = 32;

/// The meta-data for an image of digest `image_digest`: its instance id.
pub(crate) fn meta_data(image_digest: &str) -> String {
    format!("instance-id: fuse-{}\n", digest::short(image_digest))
}

/// The seed disk holding `user_data` and `meta_data`: 1 MiB, FAT12.
pub(crate) fn build(user_data: &[u8], meta_data: &[u8]) -> Result<Vec<u8>> {
    let files: [(&str, &[u8]); 2] = [(USER_DATA, user_data), (META_DATA, meta_data)];
    let data: usize = files.iter().map(|(_, b)| b.len()).sum();
    ensure!(
        data <= fuse_boot::spec::USER_DATA_MAX + 4096,
        "The seed's files are {} KiB: more than a seed holds",
        data / 1024
    );
    // The serial identifies the volume: the same contents, the same serial.
    let hash = digest::of_bytes(&[user_data, b"\0", meta_data].concat());
    let serial = u32::from_str_radix(&digest::hex_part(&hash)[..8], 16)?;
    let mut volume = Cursor::new(vec![0u8; SIZE as usize]);
    let options = FormatVolumeOptions::new()
        .fat_type(FatType::Fat12)
        .bytes_per_cluster(CLUSTER)
        .volume_id(serial)
        .volume_label(*LABEL);
    fatfs::format_volume(&mut volume, options).context("Cannot format the seed disk")?;
    {
        let fs = FileSystem::new(&mut volume, FsOptions::new().time_provider(&FIXED_TIME))
            .context("Cannot open the seed disk")?;
        for (name, bytes) in files {
            let mut file = fs.root_dir().create_file(name)?;
            file.write_all(bytes)?;
            file.flush()?;
        }
        fs.unmount().context("Cannot write the seed disk")?;
    }
    let mut volume = volume.into_inner();
    add_long_names(&mut volume, &files.map(|(name, _)| name))?;
    Ok(volume)
}

/// Puts a long-name entry in front of each file's short entry in the root directory (FAT12/16:
/// a fixed region after the FATs), `names` in the order the files were created.
fn add_long_names(volume: &mut [u8], names: &[&str]) -> Result<()> {
    let u16_at = |at: usize| u16::from_le_bytes([volume[at], volume[at + 1]]) as usize;
    let bytes_per_sector = u16_at(11);
    let reserved = u16_at(14);
    let fats = volume[16] as usize;
    let root_entries = u16_at(17);
    let fat_sectors = u16_at(22);
    let start = (reserved + fats * fat_sectors) * bytes_per_sector;
    let region = start..start + root_entries * DIR_ENTRY;
    let old: Vec<[u8; DIR_ENTRY]> = volume[region.clone()]
        .chunks(DIR_ENTRY)
        .take_while(|e| e[0] != 0)
        .map(|e| e.try_into().expect("32-byte chunks"))
        .collect();
    let mut names = names.iter();
    let mut new: Vec<[u8; DIR_ENTRY]> = Vec::new();
    for entry in old {
        let attrs = entry[11];
        // The volume label keeps its place; every other entry is one of our files.
        if attrs & 0x08 == 0 {
            let name = names
                .next()
                .context("The seed disk has an unexpected file")?;
            new.push(long_name_entry(
                name,
                entry[..11].try_into().expect("11 bytes"),
            )?);
        }
        new.push(entry);
    }
    ensure!(names.next().is_none(), "The seed disk lacks a file");
    ensure!(
        new.len() <= root_entries,
        "The seed disk's root directory is full"
    );
    let dir = &mut volume[region];
    dir.fill(0);
    for (slot, entry) in dir.chunks_mut(DIR_ENTRY).zip(&new) {
        slot.copy_from_slice(entry);
    }
    Ok(())
}

/// The one VFAT long-name entry of `name` (at most 13 UTF-16 units) for the short name
/// `short`: sequence 1 marked last, attributes 0x0F, the short name's checksum, the name
/// NUL-terminated and padded with 0xFFFF.
fn long_name_entry(name: &str, short: &[u8; 11]) -> Result<[u8; DIR_ENTRY]> {
    let units: Vec<u16> = name.encode_utf16().collect();
    if units.len() > 13 {
        bail!("{name} is too long for one long-name entry");
    }
    let mut chars = [0xFFFFu16; 13];
    chars[..units.len()].copy_from_slice(&units);
    if units.len() < 13 {
        chars[units.len()] = 0;
    }
    let checksum = short
        .iter()
        .fold(0u8, |sum, &b| sum.rotate_right(1).wrapping_add(b));
    let mut entry = [0u8; DIR_ENTRY];
    entry[0] = 0x41;
    entry[11] = 0x0F;
    entry[13] = checksum;
    let offsets = (1..11)
        .step_by(2)
        .chain((14..26).step_by(2))
        .chain((28..32).step_by(2));
    for (at, unit) in offsets.zip(chars) {
        entry[at..at + 2].copy_from_slice(&unit.to_le_bytes());
    }
    Ok(entry)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_contents_same_bytes_and_fat12_labelled_cidata() {
        let user = b"{\"fuse\":1}\n";
        let meta = meta_data("sha256:0123456789abcdef");
        assert_eq!(meta, "instance-id: fuse-0123456789ab\n");
        let a = build(user, meta.as_bytes()).unwrap();
        let b = build(user, meta.as_bytes()).unwrap();
        assert!(a == b, "two seeds of the same contents differ");
        assert_eq!(a.len() as u64, MIB);
        let c = build(b"{\"fuse\":1,\"environment\":\"prod\"}\n", meta.as_bytes()).unwrap();
        assert!(a != c);
        // Label in the boot sector (FAT12/16 extended BPB at 43) and the file system type.
        assert_eq!(&a[43..54], LABEL);
        assert_eq!(&a[54..62], b"FAT12   ");
        let mut disk = Cursor::new(a);
        let fs = FileSystem::new(&mut disk, FsOptions::new()).unwrap();
        assert_eq!(fs.fat_type(), FatType::Fat12);
        assert_eq!(fs.volume_label_as_bytes(), b"CIDATA");
        assert_eq!(
            fs.read_volume_label_from_root_dir_as_bytes().unwrap(),
            Some(*LABEL)
        );
    }

    #[test]
    fn long_name_entry_layout() {
        // "user-data" as VFAT writes it: one entry, name then NUL then 0xFFFF padding.
        let entry = long_name_entry("user-data", b"USER-D~1   ").unwrap();
        assert_eq!(entry[0], 0x41);
        assert_eq!(entry[11], 0x0F);
        let units: Vec<u16> = (1..11)
            .step_by(2)
            .chain((14..26).step_by(2))
            .chain((28..32).step_by(2))
            .map(|at| u16::from_le_bytes([entry[at], entry[at + 1]]))
            .collect();
        let mut want: Vec<u16> = "user-data".encode_utf16().collect();
        want.extend([0, 0xFFFF, 0xFFFF, 0xFFFF]);
        assert_eq!(units, want);
        assert!(long_name_entry("a-name-of-14-ch", b"A-NAME~1   ").is_err());
    }

    #[test]
    fn the_largest_user_data_fits_and_more_is_refused() {
        let user = vec![b'x'; fuse_boot::spec::USER_DATA_MAX];
        let vol = build(&user, b"instance-id: x\n").unwrap();
        assert_eq!(vol.len() as u64, MIB);
        let mut disk = Cursor::new(vol);
        let fs = FileSystem::new(&mut disk, FsOptions::new()).unwrap();
        // fatfs (without its `alloc` feature) sees the short names only.
        let entry = fs
            .root_dir()
            .iter()
            .map(|e| e.unwrap())
            .find(|e| e.short_file_name_as_bytes().starts_with(b"USER-D"))
            .unwrap();
        let mut back = Vec::new();
        std::io::Read::read_to_end(&mut entry.to_file(), &mut back).unwrap();
        assert_eq!(back, user);
        assert!(build(&vec![b'x'; 1 << 20], b"").is_err());
    }

    #[test]
    fn fsck_vfat_finds_it_clean_with_both_names() {
        if std::process::Command::new("fsck.vfat")
            .arg("--help")
            .output()
            .is_err()
        {
            eprintln!("fsck.vfat (dosfstools) is not installed (ci/setup installs it): skipped");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("seed.img");
        std::fs::write(
            &path,
            build(b"{\"fuse\":1}\n", b"instance-id: i\n").unwrap(),
        )
        .unwrap();
        let out = std::process::Command::new("fsck.vfat")
            .args(["-n", "-l", "-v"])
            .arg(&path)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned()
            + &String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "fsck.vfat failed:\n{text}");
        for name in ["/user-data", "/meta-data"] {
            assert!(text.contains(name), "{name} not listed:\n{text}");
        }
    }
}
