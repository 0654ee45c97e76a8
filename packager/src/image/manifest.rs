//! The image manifest: what an image is made of, each part by digest. The image's digest is the
//! digest of the manifest's canonical bytes, so it changes exactly when any part changes.

use crate::host::digest;
use crate::image::config::ImageConfig;
use anyhow::{bail, Context, Result};
use fuse_rootfs::Arch;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Bump on incompatible changes; readers reject versions they do not know.
pub(crate) const SCHEMA: u32 = 2;
/// Where the app's filesystem ([`Manifest::appfs`]) is mounted: the root has it empty.
pub(crate) const APP_DIR: &str = "/app";

/// The manifest note giving the directory of the runtime (inspect counts its bytes apart).
pub(crate) const NOTE_RUNTIME_DIR: &str = "runtime.dir";
/// The manifest note giving how many arguments after argv\[0\] belong to the launcher
/// (`<options> -jar /app/x.jar`): run-time arguments go after them instead of replacing them.
pub(crate) const NOTE_FIXED_ARGS: &str = "args.fixed";
/// The note recording the epoch every file time derives from, and where it came from
/// (`build::times`).
pub(crate) const NOTE_EPOCH: &str = "files.epoch";
/// The epoch when the build had none: 2000-01-01T00:00:00Z.
pub(crate) const FIXED_EPOCH: u32 = 946_684_800;
/// The notes recording the Node.js and Python versions an image's runtime is.
pub(crate) const NOTE_NODE_VERSION: &str = "node.version";
pub(crate) const NOTE_PYTHON_VERSION: &str = "python.version";

/// One stored part of an image (a blob in the store).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Component {
    pub(crate) digest: String,
    pub(crate) size: u64,
}

/// The app as the init starts it (mirrors `fuse_boot::spec::AppSpec`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct AppSection {
    /// What kind of payload it was built from (`native`, ...).
    pub(crate) kind: String,
    pub(crate) exe: String,
    pub(crate) args: Vec<String>,
    pub(crate) env: Vec<String>,
    pub(crate) cwd: String,
    pub(crate) uid: u32,
    pub(crate) gid: u32,
    /// The capabilities a root app keeps (fuse.toml's `capabilities`), by name; absent: every
    /// one for root, none for any other user.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) capabilities: Option<Vec<String>>,
    pub(crate) hostname: String,
}

/// A file of the root filesystem, for "where do the megabytes go".
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct FileSize {
    pub(crate) path: String,
    pub(crate) size: u64,
}

/// A summary of the root filesystem's contents.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Contents {
    pub(crate) files: u64,
    pub(crate) bytes: u64,
    pub(crate) largest: Vec<FileSize>,
    /// Uncompressed bytes by part: `app` (under /app), `runtime` (a runtime's directory, such
    /// as the JVM's /opt/java), `system` (everything else: libraries, /etc).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub(crate) parts: BTreeMap<String, u64>,
}

/// The manifest of an image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Manifest {
    pub(crate) schema: u32,
    pub(crate) name: String,
    pub(crate) version: String,
    #[serde(with = "crate::host::serde_text::one")]
    pub(crate) arch: Arch,
    pub(crate) kernel: KernelComponent,
    /// The initramfs holding fuse's init.
    pub(crate) init: Component,
    /// The root filesystem: everything but `/app`.
    pub(crate) rootfs: RootfsComponent,
    /// The app's filesystem, mounted on `/app`: a partition of its own, so a new version of
    /// the app leaves the root's bytes (the runtime's) unchanged and a push sends only this.
    pub(crate) appfs: RootfsComponent,
    /// The kernel command line the image boots with.
    pub(crate) cmdline: String,
    pub(crate) app: AppSection,
    /// Runtime facts (JDK version, module set, node version...), sorted by key.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub(crate) notes: BTreeMap<String, String>,
    pub(crate) contents: Contents,
    /// Empty directories of the root where volumes can be mounted (`--volume NAME:/PATH`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub(crate) mount_points: Vec<String>,
    /// What the image keeps of its `fuse.toml`: environments, ports, health check, resources.
    #[serde(default, skip_serializing_if = "ImageConfig::is_empty")]
    pub(crate) config: ImageConfig,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct KernelComponent {
    pub(crate) digest: String,
    pub(crate) size: u64,
    pub(crate) release: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct RootfsComponent {
    pub(crate) digest: String,
    pub(crate) size: u64,
    /// Filesystem and compression, e.g. `squashfs+zstd`.
    pub(crate) format: String,
}

impl Manifest {
    /// The canonical bytes: pretty JSON with fields in declaration order, newline-terminated.
    pub(crate) fn to_bytes(&self) -> Vec<u8> {
        let mut bytes = serde_json::to_vec_pretty(self).expect("manifest serialises");
        bytes.push(b'\n');
        bytes
    }

    pub(crate) fn from_bytes(bytes: &[u8]) -> Result<Manifest> {
        let manifest: Manifest =
            serde_json::from_slice(bytes).context("Image manifest is not valid")?;
        if manifest.schema != SCHEMA {
            bail!(
                "Image manifest schema {} is not supported by this fuse (it reads {SCHEMA}): rebuild the image",
                manifest.schema
            );
        }
        Ok(manifest)
    }

    /// The image digest.
    pub(crate) fn digest(&self) -> String {
        digest::of_bytes(&self.to_bytes())
    }

    /// `name:version`.
    pub(crate) fn reference(&self) -> String {
        format!("{}:{}", self.name, self.version)
    }

    /// The image's epoch from its manifest note (`1733150000 (SOURCE_DATE_EPOCH)`);
    /// 2000-01-01 (fuse's fixed epoch) when the note is missing.
    pub(crate) fn epoch(&self) -> i64 {
        self.notes
            .get(NOTE_EPOCH)
            .and_then(|n| n.split_whitespace().next())
            .and_then(|s| s.parse::<i64>().ok())
            .unwrap_or(i64::from(FIXED_EPOCH))
    }

    /// The image's epoch as RFC 3339.
    pub(crate) fn created(&self) -> String {
        rfc3339(self.epoch())
    }

    /// Every blob the image is made of, with its size.
    pub(crate) fn components(&self) -> [(&'static str, &str, u64); 4] {
        [
            ("kernel", &self.kernel.digest, self.kernel.size),
            ("init", &self.init.digest, self.init.size),
            ("rootfs", &self.rootfs.digest, self.rootfs.size),
            ("appfs", &self.appfs.digest, self.appfs.size),
        ]
    }

    /// Total size of the image: its parts plus the manifest.
    pub(crate) fn total_size(&self) -> u64 {
        self.components().iter().map(|c| c.2).sum::<u64>() + self.to_bytes().len() as u64
    }
}

/// `seconds` since 1970 as `YYYY-MM-DDTHH:MM:SSZ` (Howard Hinnant's civil-from-days).
pub(crate) fn rfc3339(seconds: i64) -> String {
    let days = seconds.div_euclid(86_400);
    let rest = seconds.rem_euclid(86_400);
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rest / 3600,
        rest % 3600 / 60,
        rest % 60
    )
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn sample() -> Manifest {
        Manifest {
            schema: SCHEMA,
            name: "hello".into(),
            version: "1.0".into(),
            arch: Arch::X86_64,
            kernel: KernelComponent {
                digest: digest::of_bytes(b"k"),
                size: 1,
                release: "6.12.0".into(),
            },
            init: Component {
                digest: digest::of_bytes(b"i"),
                size: 2,
            },
            rootfs: RootfsComponent {
                digest: digest::of_bytes(b"r"),
                size: 3,
                format: "squashfs+zstd".into(),
            },
            appfs: RootfsComponent {
                digest: digest::of_bytes(b"a"),
                size: 4,
                format: "squashfs+zstd".into(),
            },
            cmdline: "console=ttyS0".into(),
            app: AppSection {
                kind: "native".into(),
                exe: "/app/hello".into(),
                args: vec!["/app/hello".into()],
                env: vec!["PATH=/bin".into()],
                cwd: "/app".into(),
                uid: 0,
                gid: 0,
                capabilities: None,
                hostname: "hello".into(),
            },
            notes: BTreeMap::new(),
            contents: Contents {
                files: 1,
                bytes: 3,
                largest: vec![FileSize {
                    path: "/app/hello".into(),
                    size: 3,
                }],
                parts: BTreeMap::new(),
            },
            mount_points: vec!["/data".into()],
            config: ImageConfig::default(),
        }
    }

    #[test]
    fn round_trips_and_digest_is_stable() {
        let m = sample();
        let bytes = m.to_bytes();
        let back = Manifest::from_bytes(&bytes).unwrap();
        assert_eq!(back, m);
        assert_eq!(back.to_bytes(), bytes);
        assert_eq!(back.digest(), m.digest());
        assert!(String::from_utf8(bytes)
            .unwrap()
            .contains("\"arch\": \"x86_64\""));
    }

    #[test]
    fn any_change_changes_the_digest() {
        let a = sample();
        let mut b = sample();
        b.app.env.push("X=1".into());
        assert_ne!(a.digest(), b.digest());
    }

    #[test]
    fn unknown_schema_is_rejected() {
        let mut m = sample();
        m.schema = 99;
        let err = Manifest::from_bytes(&m.to_bytes()).unwrap_err();
        assert!(format!("{err:#}").contains("schema 99"), "{err:#}");
    }
}
