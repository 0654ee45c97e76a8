//! A KubeVirt containerDisk: an ordinary OCI container image (its config names the image's
//! architecture and linux) whose one layer holds the image's disk as `/disk/disk.img` (raw)
//! or `/disk/disk.qcow2`, owned by uid and gid 107 (KubeVirt's qemu user), mode 0440, in a
//! directory `/disk/` of mode 0555, as KubeVirt's documentation asks.
//!
//! The layer is an uncompressed tar written here (ustar, entries in a fixed order, the
//! image's epoch as mtime, numeric ids only, no user names): its digest depends on the disk
//! alone, never on a compressor's version or settings, and it is its own `diff_id`. qcow2
//! leaves out the disk's unused clusters, which is most of the saving gzip would bring.

use super::index::oci_arch;
use super::oci::{self, Descriptor, OciManifest, MANIFEST};
use crate::image::manifest::Manifest;
use anyhow::{bail, Context, Result};
use sha2::{Digest as _, Sha256};
use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::path::Path;

pub(crate) const CONFIG: &str = "application/vnd.oci.image.config.v1+json";
pub(crate) const LAYER: &str = "application/vnd.oci.image.layer.v1.tar";

/// KubeVirt's qemu user and group.
const QEMU_ID: u64 = 107;

/// The disk format inside a containerDisk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum DiskFormat {
    Qcow2,
    Raw,
}

impl DiskFormat {
    /// The file's name under `/disk/`.
    pub(crate) fn file_name(self) -> &'static str {
        match self {
            DiskFormat::Qcow2 => "disk.qcow2",
            DiskFormat::Raw => "disk.img",
        }
    }
}

impl std::str::FromStr for DiskFormat {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "qcow2" => Ok(DiskFormat::Qcow2),
            "raw" => Ok(DiskFormat::Raw),
            _ => bail!("Unknown disk format '{s}': use qcow2 or raw"),
        }
    }
}

/// A ustar header block for `name`.
fn header(name: &str, mode: u32, size: u64, mtime: i64, directory: bool) -> Result<[u8; 512]> {
    if name.len() > 100 {
        bail!("tar entry name {name} is longer than 100 bytes");
    }
    // 11 octal digits: ustar's limit, 8 GiB.
    if size >= 1 << 33 {
        bail!(
            "the disk is {size} bytes: a containerDisk layer holds at most 8 GiB (use --disk-format qcow2)"
        );
    }
    let mut h = [0u8; 512];
    let field = |h: &mut [u8; 512], at: usize, len: usize, text: &str| {
        h[at..at + text.len()].copy_from_slice(text.as_bytes());
        debug_assert!(text.len() <= len);
    };
    field(&mut h, 0, 100, name);
    field(&mut h, 100, 8, &format!("{mode:07o}"));
    field(&mut h, 108, 8, &format!("{QEMU_ID:07o}"));
    field(&mut h, 116, 8, &format!("{QEMU_ID:07o}"));
    field(&mut h, 124, 12, &format!("{size:011o}"));
    field(&mut h, 136, 12, &format!("{:011o}", mtime.max(0)));
    h[156] = if directory { b'5' } else { b'0' };
    field(&mut h, 257, 6, "ustar");
    field(&mut h, 263, 2, "00");
    // The checksum is computed with its own field as spaces.
    h[148..156].fill(b' ');
    let sum: u32 = h.iter().map(|b| u32::from(*b)).sum();
    field(&mut h, 148, 8, &format!("{sum:06o}\0 "));
    Ok(h)
}

/// Writes the layer's tar to `out` from `disk` (its file named `file_name`); returns its
/// digest and size.
pub(crate) fn write_layer(
    disk: &Path,
    file_name: &str,
    mtime: i64,
    out: &Path,
) -> Result<(String, u64)> {
    let size = std::fs::metadata(disk)
        .with_context(|| format!("Cannot read {}", disk.display()))?
        .len();
    let file =
        std::fs::File::create(out).with_context(|| format!("Cannot write {}", out.display()))?;
    let mut w = HashingWriter {
        inner: std::io::BufWriter::new(file),
        hasher: Sha256::new(),
        written: 0,
    };
    w.write_all(&header("disk/", 0o555, 0, mtime, true)?)?;
    w.write_all(&header(
        &format!("disk/{file_name}"),
        0o440,
        size,
        mtime,
        false,
    )?)?;
    let mut input =
        std::fs::File::open(disk).with_context(|| format!("Cannot read {}", disk.display()))?;
    let copied = std::io::copy(&mut (&mut input).take(size), &mut w)
        .with_context(|| format!("Cannot write {}", out.display()))?;
    if copied != size {
        bail!("{} changed while it was read", disk.display());
    }
    let pad = (512 - size % 512) % 512;
    w.write_all(&vec![0u8; pad as usize + 1024])?;
    w.inner
        .flush()
        .with_context(|| format!("Cannot write {}", out.display()))?;
    Ok((
        format!("sha256:{}", hex::encode(w.hasher.finalize())),
        w.written,
    ))
}

struct HashingWriter<W> {
    inner: W,
    hasher: Sha256,
    written: u64,
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.written += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// The container image config: architecture and os of the image, its one layer's diff_id.
pub(crate) fn config(manifest: &Manifest, layer_digest: &str) -> Vec<u8> {
    // serde_json's maps are sorted: the bytes depend on the values alone.
    let value = serde_json::json!({
        "architecture": oci_arch(manifest.arch),
        "os": "linux",
        "created": manifest.created(),
        "config": {},
        "rootfs": {"type": "layers", "diff_ids": [layer_digest]},
    });
    serde_json::to_vec(&value).expect("a config serialises")
}

/// The containerDisk's manifest: an ordinary image (no artifact type), fuse's annotations.
pub(crate) fn manifest_for(
    manifest: &Manifest,
    image_digest: &str,
    config_bytes: &[u8],
    layer: (&str, u64),
) -> OciManifest {
    OciManifest {
        schema_version: 2,
        media_type: MANIFEST.to_string(),
        artifact_type: None,
        config: Descriptor {
            media_type: CONFIG.to_string(),
            digest: crate::host::digest::of_bytes(config_bytes),
            size: config_bytes.len() as u64,
            annotations: BTreeMap::new(),
        },
        layers: vec![Descriptor {
            media_type: LAYER.to_string(),
            digest: layer.0.to_string(),
            size: layer.1,
            annotations: BTreeMap::new(),
        }],
        annotations: oci::image_annotations(manifest, image_digest),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    #[test]
    fn the_tar_is_deterministic_and_tar_reads_it() {
        let dir = tempfile::tempdir().unwrap();
        let disk = dir.path().join("d");
        std::fs::write(&disk, vec![7u8; 1000]).unwrap();
        let a = write_layer(&disk, "disk.img", 1_733_150_000, &dir.path().join("a.tar")).unwrap();
        let b = write_layer(&disk, "disk.img", 1_733_150_000, &dir.path().join("b.tar")).unwrap();
        assert_eq!(a, b);
        assert_eq!(a.1, 512 + 512 + 1024 + 1024);
        assert_eq!(
            std::fs::read(dir.path().join("a.tar")).unwrap(),
            std::fs::read(dir.path().join("b.tar")).unwrap()
        );
        assert_eq!(
            a.0,
            crate::host::digest::of_file(&dir.path().join("a.tar")).unwrap()
        );
        let other =
            write_layer(&disk, "disk.img", 1_733_150_001, &dir.path().join("c.tar")).unwrap();
        assert_ne!(a.0, other.0, "the epoch is in the tar");

        // GNU tar, which nobody here wrote, lists the two entries with KubeVirt's owner and modes.
        let out = Command::new("tar")
            .args(["--numeric-owner", "--utc", "-tvf"])
            .arg(dir.path().join("a.tar"))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let listing = String::from_utf8(out.stdout).unwrap();
        let lines: Vec<Vec<&str>> = listing
            .lines()
            .map(|l| l.split_whitespace().collect())
            .collect();
        assert_eq!(lines.len(), 2, "{listing}");
        assert_eq!(lines[0][0], "dr-xr-xr-x", "{listing}");
        assert_eq!(lines[0][1], "107/107", "{listing}");
        assert_eq!(lines[0][5], "disk/", "{listing}");
        assert_eq!(lines[1][0], "-r--r-----", "{listing}");
        assert_eq!(lines[1][1], "107/107", "{listing}");
        assert_eq!(lines[1][2], "1000", "{listing}");
        assert_eq!(lines[1][3..5], ["2024-12-02", "14:33"], "{listing}");
        assert_eq!(lines[1][5], "disk/disk.img", "{listing}");
    }

    #[test]
    fn the_config_names_the_platform_and_the_layer() {
        let m = crate::image::manifest::tests::sample();
        let config = String::from_utf8(config(&m, "sha256:ab")).unwrap();
        assert!(config.contains(r#""architecture":"amd64""#), "{config}");
        assert!(config.contains(r#""os":"linux""#), "{config}");
        assert!(
            config.contains(r#""rootfs":{"diff_ids":["sha256:ab"],"type":"layers"}"#),
            "{config}"
        );
        assert!("vmdk".parse::<DiskFormat>().is_err());
    }
}
