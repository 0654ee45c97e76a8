//! Volumes: data that lives outside the image (`fuse run --volume NAME:/PATH[:SIZE]`).
//!
//! A volume is a host file `<data dir>/volumes/NAME.ext4`: a sparse raw disk with an ext4
//! filesystem, made on first use with the host's `mkfs.ext4` (e2fsprogs). It is attached as an
//! extra virtio disk (`/dev/vdb`, `/dev/vdc`, ... in `--volume` order) and the init mounts it
//! read-write at PATH, told which disk goes where by the run overlay's `volume` entries. The
//! root is read-only, so PATH must be a mount point baked into the image: the manifest lists
//! them (`/data` in every image, see `layout::VOLUME_MOUNT_POINTS`). The same volume given to
//! another image keeps its data: that is the point. QEMU locks the file, so two running VMs
//! cannot share one volume.

use crate::host::paths;
use crate::image::manifest::Manifest;
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::str::FromStr;

/// Size of a new volume unless given.
pub(crate) const DEFAULT_SIZE: u64 = 1 << 30;
/// Smallest volume mkfs.ext4 handles comfortably.
const MIN_SIZE: u64 = 8 << 20;

/// One `--volume NAME:/PATH[:SIZE]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct VolumeSpec {
    pub(crate) name: String,
    /// Absolute mount point in the guest.
    pub(crate) mount: String,
    /// Size when the volume is created (ignored when it exists).
    pub(crate) size: Option<u64>,
}

impl FromStr for VolumeSpec {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let mut parts = s.splitn(3, ':');
        let name = parts.next().unwrap_or("");
        let mount = parts.next().ok_or_else(|| {
            format!("invalid volume '{s}': use NAME:/PATH[:SIZE], e.g. db:/data:2G")
        })?;
        let size = parts.next().map(parse_size).transpose()?;
        let name_ok = !name.is_empty()
            && name.len() <= 64
            && name.starts_with(|c: char| c.is_ascii_alphanumeric())
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
        if !name_ok {
            return Err(format!(
                "invalid volume name '{name}': use 1 to 64 letters, digits, '-', '_' or '.', starting with a letter or digit"
            ));
        }
        if !mount.starts_with('/') || mount == "/" || mount.contains(['\0', ':']) {
            return Err(format!(
                "invalid volume mount point '{mount}': use an absolute path other than /, e.g. /data"
            ));
        }
        let mount = mount.trim_end_matches('/').to_string();
        Ok(VolumeSpec {
            name: name.into(),
            mount,
            size,
        })
    }
}

/// `1G`, `512M`, `2GiB`, `1048576` (bytes): binary units.
pub(crate) fn parse_size(s: &str) -> Result<u64, String> {
    let invalid = || format!("invalid volume size '{s}': use a size like 512M or 2G");
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (digits, unit) = t.split_at(split);
    let n: u64 = digits.parse().map_err(|_| invalid())?;
    let shift = match unit.to_ascii_uppercase().as_str() {
        "" | "B" => 0,
        "K" | "KB" | "KIB" => 10,
        "M" | "MB" | "MIB" => 20,
        "G" | "GB" | "GIB" => 30,
        "T" | "TB" | "TIB" => 40,
        _ => return Err(invalid()),
    };
    let size = n.checked_mul(1 << shift).ok_or_else(invalid)?;
    if size < MIN_SIZE {
        return Err(format!("volume size '{s}' is too small: use at least 8M"));
    }
    Ok(size)
}

/// A volume ready to attach.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct PreparedVolume {
    pub(crate) name: String,
    /// The host file.
    pub(crate) file: PathBuf,
    /// The guest's device (`/dev/vdb`, ...).
    pub(crate) device: String,
    pub(crate) mount: String,
}

/// `overlay` plus the `volume` entries telling the init which disk to mount where.
pub(crate) fn add_to_overlay(
    mut overlay: fuse_boot::spec::RunOverlay,
    volumes: &[PreparedVolume],
) -> fuse_boot::spec::RunOverlay {
    overlay
        .volumes
        .extend(volumes.iter().map(|v| (v.device.clone(), v.mount.clone())));
    overlay
}

/// Where volumes live on the host.
pub(crate) fn volumes_dir() -> PathBuf {
    paths::data_dir().join("volumes")
}

/// Checks `specs` against the image and creates missing volumes. `progress` gets a line per
/// created volume.
pub(crate) fn prepare(
    specs: &[VolumeSpec],
    manifest: &Manifest,
    image: &str,
    progress: &mut dyn FnMut(&str),
) -> Result<Vec<PreparedVolume>> {
    if specs.len() > 20 {
        bail!("Too many volumes ({}): at most 20", specs.len());
    }
    let mut prepared = Vec::new();
    for (i, spec) in specs.iter().enumerate() {
        if specs[..i].iter().any(|s| s.name == spec.name) {
            bail!(
                "Volume '{}' is given twice: a volume can be mounted once",
                spec.name
            );
        }
        if specs[..i].iter().any(|s| s.mount == spec.mount) {
            bail!(
                "Two volumes are mounted at {}: give each its own mount point",
                spec.mount
            );
        }
        check_mount_point(manifest, image, &spec.mount)?;
        let file = volumes_dir().join(format!("{}.ext4", spec.name));
        if !file.exists() {
            let owner = (manifest.app.uid, manifest.app.gid);
            create(&file, &spec.name, spec.size.unwrap_or(DEFAULT_SIZE), owner)?;
            progress(&format!(
                "created volume {} ({})",
                spec.name,
                crate::host::fs::human_size(spec.size.unwrap_or(DEFAULT_SIZE))
            ));
        }
        prepared.push(PreparedVolume {
            name: spec.name.clone(),
            file,
            // vda is the root; data disks follow in order.
            device: format!("/dev/vd{}", (b'b' + i as u8) as char),
            mount: spec.mount.clone(),
        });
    }
    Ok(prepared)
}

/// The root is read-only: the mount point must be one the image was built with.
pub(crate) fn check_mount_point(manifest: &Manifest, image: &str, mount: &str) -> Result<()> {
    if manifest.mount_points.iter().any(|m| m == mount) {
        return Ok(());
    }
    if manifest.mount_points.is_empty() {
        bail!(
            "Image {image} has no volume mount points (built by an older fuse): rebuild it, then mount volumes at /data"
        );
    }
    bail!(
        "{mount} is not a volume mount point of image {image} (its root is read-only): use one of {}",
        manifest.mount_points.join(", ")
    )
}

/// `mkfs.ext4` on PATH or in the sbin directories (not on a normal user's PATH).
fn find_mkfs() -> Result<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin"].map(PathBuf::from))
        .map(|dir| dir.join("mkfs.ext4"))
        .find(|p| p.is_file())
        .context("mkfs.ext4 not found: install e2fsprogs to use volumes (Debian/Ubuntu: apt-get install e2fsprogs)")
}

/// Makes a sparse file of `size` with an ext4 filesystem labelled `name` whose top directory
/// belongs to `owner` (the image's app user), atomically: a half-made volume never appears
/// under its name. (The init also gives a root-owned volume to the app's user when it mounts
/// it, for volumes made before apps ran unprivileged.)
fn create(file: &Path, name: &str, size: u64, (uid, gid): (u32, u32)) -> Result<()> {
    let mkfs = find_mkfs()?;
    let dir = file.parent().context("volume path has no parent")?;
    std::fs::create_dir_all(dir)
        .with_context(|| format!("Cannot create the volume directory {}", dir.display()))?;
    let tmp = tempfile::Builder::new()
        .prefix(&format!(".{name}-"))
        .tempfile_in(dir)
        .with_context(|| format!("Cannot create volume {name} in {}", dir.display()))?;
    tmp.as_file()
        .set_len(size)
        .with_context(|| format!("Cannot size volume {name} to {size} bytes"))?;
    // -F: it is a file, not a device.
    let out = Command::new(&mkfs)
        .args([
            "-F",
            "-q",
            "-E",
            &format!("root_owner={uid}:{gid}"),
            "-L",
            name,
        ])
        .arg(tmp.path())
        .output()
        .with_context(|| format!("Cannot run {}", mkfs.display()))?;
    if !out.status.success() {
        bail!(
            "mkfs.ext4 failed for volume {name}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    tmp.persist(file)
        .with_context(|| format!("Cannot create volume {}", file.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_volume_flags() {
        let v: VolumeSpec = "db:/data".parse().unwrap();
        assert_eq!(
            (v.name.as_str(), v.mount.as_str(), v.size),
            ("db", "/data", None)
        );
        let v: VolumeSpec = "cache.1:/var/cache/:2G".parse().unwrap();
        assert_eq!(v.mount, "/var/cache");
        assert_eq!(v.size, Some(2 << 30));
        for bad in [
            "db",
            ":/data",
            "db:data",
            "db:/",
            "-x:/data",
            "db:/data:lots",
            "db:/d:1K",
        ] {
            assert!(bad.parse::<VolumeSpec>().is_err(), "{bad}");
        }
        assert_eq!(parse_size("512M").unwrap(), 512 << 20);
        assert_eq!(parse_size("1GiB").unwrap(), 1 << 30);
    }

    #[test]
    fn mount_point_must_be_in_the_image() {
        let m = crate::image::manifest::tests::sample();
        check_mount_point(&m, "hello:1.0", "/data").unwrap();
        let err = check_mount_point(&m, "hello:1.0", "/srv").unwrap_err();
        assert!(err.to_string().contains("use one of /data"), "{err}");
        let mut old = m.clone();
        old.mount_points.clear();
        let err = check_mount_point(&old, "hello:1.0", "/data").unwrap_err();
        assert!(err.to_string().contains("rebuild it"), "{err}");
    }
}
