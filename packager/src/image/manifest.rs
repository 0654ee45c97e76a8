//! The image manifest: what an image is made of, each part by digest. The image's digest is the
//! digest of the manifest's canonical bytes, so it changes exactly when any part changes.

use crate::config::ImageConfig;
use crate::digest;
use anyhow::{bail, Context, Result};
use fuse_rootfs::Arch;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Bump on incompatible changes; readers reject versions they do not know.
pub const SCHEMA: u32 = 1;

/// One stored part of an image (a blob in the store).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Component {
    pub digest: String,
    pub size: u64,
}

/// The app as the init starts it (mirrors `fuse_boot::spec::AppSpec`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AppSection {
    /// What kind of payload it was built from (`native`, ...).
    pub kind: String,
    pub exe: String,
    pub args: Vec<String>,
    pub env: Vec<String>,
    pub cwd: String,
    pub uid: u32,
    pub gid: u32,
    pub hostname: String,
}

/// A file of the root filesystem, for "where do the megabytes go".
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileSize {
    pub path: String,
    pub size: u64,
}

/// A summary of the root filesystem's contents.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Contents {
    pub files: u64,
    pub bytes: u64,
    pub largest: Vec<FileSize>,
    /// Uncompressed bytes by part: `app` (under /app), `runtime` (a runtime's directory, such
    /// as the JVM's /opt/java), `system` (everything else: libraries, /etc).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub parts: BTreeMap<String, u64>,
}

/// The manifest of an image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    pub schema: u32,
    pub name: String,
    pub version: String,
    #[serde(with = "arch_name")]
    pub arch: Arch,
    pub kernel: KernelComponent,
    /// The initramfs holding fuse's init.
    pub init: Component,
    pub rootfs: RootfsComponent,
    /// The kernel command line the image boots with.
    pub cmdline: String,
    pub app: AppSection,
    /// Runtime facts (JDK version, module set, node version...), sorted by key.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub notes: BTreeMap<String, String>,
    pub contents: Contents,
    /// Empty directories of the root where volumes can be mounted (`--volume NAME:/PATH`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub mount_points: Vec<String>,
    /// What the image keeps of its `fuse.toml`: environments, ports, health check, resources.
    #[serde(default, skip_serializing_if = "ImageConfig::is_empty")]
    pub config: ImageConfig,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KernelComponent {
    pub digest: String,
    pub size: u64,
    pub release: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RootfsComponent {
    pub digest: String,
    pub size: u64,
    /// Filesystem and compression, e.g. `squashfs+zstd`.
    pub format: String,
}

impl Manifest {
    /// The canonical bytes: pretty JSON with fields in declaration order, newline-terminated.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut bytes = serde_json::to_vec_pretty(self).expect("manifest serialises");
        bytes.push(b'\n');
        bytes
    }

    pub fn from_bytes(bytes: &[u8]) -> Result<Manifest> {
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
    pub fn digest(&self) -> String {
        digest::of_bytes(&self.to_bytes())
    }

    /// `name:version`.
    pub fn reference(&self) -> String {
        format!("{}:{}", self.name, self.version)
    }

    /// Every blob the image is made of, with its size.
    pub fn components(&self) -> [(&'static str, &str, u64); 3] {
        [
            ("kernel", &self.kernel.digest, self.kernel.size),
            ("init", &self.init.digest, self.init.size),
            ("rootfs", &self.rootfs.digest, self.rootfs.size),
        ]
    }

    /// Total size of the image: its parts plus the manifest.
    pub fn total_size(&self) -> u64 {
        self.components().iter().map(|c| c.2).sum::<u64>() + self.to_bytes().len() as u64
    }
}

pub(crate) mod arch_name {
    use fuse_rootfs::Arch;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(arch: &Arch, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(arch.as_str())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Arch, D::Error> {
        let name = String::deserialize(d)?;
        name.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub fn sample() -> Manifest {
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
            cmdline: "console=ttyS0".into(),
            app: AppSection {
                kind: "native".into(),
                exe: "/app/hello".into(),
                args: vec!["/app/hello".into()],
                env: vec!["PATH=/bin".into()],
                cwd: "/app".into(),
                uid: 0,
                gid: 0,
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
