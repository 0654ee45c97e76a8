//! How an image travels: an OCI 1.1 image manifest whose `artifactType` and config media type
//! are fuse's own (a container runtime must not mistake it for a container image), the config
//! blob being the image's manifest as fuse stores it, and one layer per part the disk is
//! assembled from: kernel, initramfs, EFI stub, root filesystem, app filesystem. The root holds
//! the runtime and the app's filesystem only `/app`, so a new version of the app sends the
//! app's layer (and the small config and manifest) alone. The disk itself is not sent:
//! it is rebuilt bit for bit from these on pull and checked against the image digest, which
//! an annotation carries. Parts shared by images (the kernel, init, stub, a runtime's root) are
//! sent once per registry.
//!
//! Nothing in the manifest comes from the clock or the machine: `created` is the image's file
//! epoch, so the same image pushed twice has the same manifest digest.

use crate::image::manifest::Manifest;
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

pub(crate) const MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub(crate) const INDEX: &str = "application/vnd.oci.image.index.v1+json";
const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
/// What `fuse pull` accepts (the others only to say what they are).
pub(crate) const ACCEPTED: [&str; 4] = [MANIFEST, INDEX, DOCKER_MANIFEST, DOCKER_LIST];

pub(crate) const ARTIFACT_TYPE: &str = "application/vnd.fuse.image.v1+json";
pub(crate) const CONFIG: &str = "application/vnd.fuse.image.config.v1+json";
pub(crate) const KERNEL: &str = "application/vnd.fuse.image.kernel.v1";
pub(crate) const INITRD: &str = "application/vnd.fuse.image.initrd.v1";
pub(crate) const EFI_STUB: &str = "application/vnd.fuse.image.efi-stub.v1";
pub(crate) const ROOTFS: &str = "application/vnd.fuse.image.rootfs.v1";
pub(crate) const APPFS: &str = "application/vnd.fuse.image.appfs.v1";

/// The disk's sha256, which is the image digest.
pub(crate) const ANNOTATION_DIGEST: &str = "vnd.fuse.image.digest";
const CREATED: &str = "org.opencontainers.image.created";
const TITLE: &str = "org.opencontainers.image.title";
const VERSION: &str = "org.opencontainers.image.version";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct Descriptor {
    pub(crate) media_type: String,
    pub(crate) digest: String,
    pub(crate) size: u64,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub(crate) annotations: BTreeMap<String, String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct OciManifest {
    pub(crate) schema_version: u32,
    #[serde(default)]
    pub(crate) media_type: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) artifact_type: Option<String>,
    pub(crate) config: Descriptor,
    #[serde(default)]
    pub(crate) layers: Vec<Descriptor>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub(crate) annotations: BTreeMap<String, String>,
}

/// The parts of an image as layers, in their order in the manifest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Layers {
    pub(crate) kernel: Descriptor,
    pub(crate) initrd: Descriptor,
    pub(crate) efi_stub: Descriptor,
    pub(crate) rootfs: Descriptor,
    pub(crate) appfs: Descriptor,
}

impl Layers {
    pub(crate) fn all(&self) -> [&Descriptor; 5] {
        [
            &self.kernel,
            &self.initrd,
            &self.efi_stub,
            &self.rootfs,
            &self.appfs,
        ]
    }
}

/// A layer: its media type, digest and size, titled with the part's name.
pub(crate) fn layer(media_type: &str, digest: &str, size: u64, title: &str) -> Descriptor {
    Descriptor {
        media_type: media_type.to_string(),
        digest: digest.to_string(),
        size,
        annotations: BTreeMap::from([(TITLE.to_string(), title.to_string())]),
    }
}

/// The annotations every manifest fuse pushes carries: the epoch, the image's name, version
/// and digest.
pub(crate) fn image_annotations(
    manifest: &Manifest,
    image_digest: &str,
) -> BTreeMap<String, String> {
    BTreeMap::from([
        (CREATED.to_string(), manifest.created()),
        (TITLE.to_string(), manifest.name.clone()),
        (VERSION.to_string(), manifest.version.clone()),
        (ANNOTATION_DIGEST.to_string(), image_digest.to_string()),
    ])
}

/// The OCI manifest of an image: `config` is its fuse manifest's bytes' descriptor.
pub(crate) fn manifest_for(
    manifest: &Manifest,
    image_digest: &str,
    config_bytes: &[u8],
    layers: &Layers,
) -> OciManifest {
    OciManifest {
        schema_version: 2,
        media_type: MANIFEST.to_string(),
        artifact_type: Some(ARTIFACT_TYPE.to_string()),
        config: Descriptor {
            media_type: CONFIG.to_string(),
            digest: crate::host::digest::of_bytes(config_bytes),
            size: config_bytes.len() as u64,
            annotations: BTreeMap::new(),
        },
        layers: layers.all().into_iter().cloned().collect(),
        annotations: image_annotations(manifest, image_digest),
    }
}

impl OciManifest {
    /// The bytes pushed: compact JSON, fields in declaration order, maps sorted.
    pub(crate) fn to_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("an OCI manifest serialises")
    }

    /// Reads a manifest got as `media_type`, refusing anything that is not a fuse image.
    pub(crate) fn parse(media_type: &str, bytes: &[u8], what: &str) -> Result<OciManifest> {
        match media_type {
            INDEX | DOCKER_LIST => bail!("{what} is an image index, not an image manifest"),
            DOCKER_MANIFEST => {
                bail!("{what} is a container image (Docker manifest), not a fuse image")
            }
            _ => {}
        }
        let m: OciManifest = serde_json::from_slice(bytes)
            .with_context(|| format!("{what}: its manifest is not a valid OCI image manifest"))?;
        if m.schema_version != 2 {
            bail!(
                "{what}: manifest schemaVersion {} is not 2",
                m.schema_version
            );
        }
        let artifact = m.artifact_type.as_deref().unwrap_or(&m.config.media_type);
        if artifact != ARTIFACT_TYPE && m.config.media_type != CONFIG {
            bail!(
                "{what} is not a fuse image (its artifact type is {artifact}): fuse pulls what `fuse push` pushed"
            );
        }
        if m.config.media_type != CONFIG {
            bail!(
                "{what}: config media type {} is not {CONFIG}",
                m.config.media_type
            );
        }
        Ok(m)
    }

    /// The image digest (the disk's) the manifest promises.
    pub(crate) fn image_digest(&self, what: &str) -> Result<&str> {
        self.annotations
            .get(ANNOTATION_DIGEST)
            .map(String::as_str)
            .filter(|d| valid_digest(d))
            .with_context(|| format!("{what}: its manifest has no {ANNOTATION_DIGEST} annotation"))
    }

    /// The five parts, by media type, checked against the fuse `manifest` (the config).
    pub(crate) fn layers(&self, manifest: &Manifest, what: &str) -> Result<Layers> {
        let find = |media_type: &str| -> Result<Descriptor> {
            let mut found = self.layers.iter().filter(|l| l.media_type == media_type);
            let layer = found
                .next()
                .with_context(|| format!("{what}: its manifest has no {media_type} layer"))?;
            if found.next().is_some() {
                bail!("{what}: its manifest has several {media_type} layers");
            }
            if !valid_digest(&layer.digest) {
                bail!(
                    "{what}: layer {media_type} has digest '{}', not sha256:<hex>",
                    layer.digest
                );
            }
            Ok(layer.clone())
        };
        let layers = Layers {
            kernel: find(KERNEL)?,
            initrd: find(INITRD)?,
            efi_stub: find(EFI_STUB)?,
            rootfs: find(ROOTFS)?,
            appfs: find(APPFS)?,
        };
        if self.layers.len() != layers.all().len() {
            bail!(
                "{what}: its manifest has {} layers, not the {} of a fuse image",
                self.layers.len(),
                layers.all().len()
            );
        }
        for (layer, digest, size) in [
            (
                &layers.kernel,
                &manifest.kernel.digest,
                manifest.kernel.size,
            ),
            (&layers.initrd, &manifest.init.digest, manifest.init.size),
            (
                &layers.rootfs,
                &manifest.rootfs.digest,
                manifest.rootfs.size,
            ),
            (&layers.appfs, &manifest.appfs.digest, manifest.appfs.size),
        ] {
            if layer.digest != *digest || layer.size != size {
                bail!(
                    "{what}: layer {} ({}) is not the part its image manifest names ({digest})",
                    layer.media_type,
                    layer.digest
                );
            }
        }
        Ok(layers)
    }
}

fn valid_digest(d: &str) -> bool {
    d.strip_prefix("sha256:").is_some_and(|h| {
        h.len() == 64
            && h.chars()
                .all(|c| c.is_ascii_digit() || ('a'..='f').contains(&c))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::host::digest;
    use crate::image::manifest::tests::sample;

    fn sample_layers(m: &Manifest) -> Layers {
        Layers {
            kernel: layer(KERNEL, &m.kernel.digest, m.kernel.size, "kernel"),
            initrd: layer(INITRD, &m.init.digest, m.init.size, "initrd"),
            efi_stub: layer(EFI_STUB, &digest::of_bytes(b"stub"), 4, "efi-stub"),
            rootfs: layer(ROOTFS, &m.rootfs.digest, m.rootfs.size, "rootfs"),
            appfs: layer(APPFS, &m.appfs.digest, m.appfs.size, "appfs"),
        }
    }

    #[test]
    fn the_manifest_is_deterministic_and_reads_back() {
        let mut m = sample();
        m.notes.insert(
            "files.epoch".into(),
            "1733150000 (SOURCE_DATE_EPOCH)".into(),
        );
        let disk = digest::of_bytes(b"disk");
        let config = m.to_bytes();
        let a = manifest_for(&m, &disk, &config, &sample_layers(&m)).to_bytes();
        let b = manifest_for(&m, &disk, &config, &sample_layers(&m)).to_bytes();
        assert_eq!(a, b);
        let text = String::from_utf8(a.clone()).unwrap();
        assert!(text.starts_with(r#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","artifactType":"application/vnd.fuse.image.v1+json","config":{"mediaType":"application/vnd.fuse.image.config.v1+json""#), "{text}");
        assert!(
            text.contains(r#""org.opencontainers.image.created":"2024-12-02T14:33:20Z""#),
            "{text}"
        );
        let back = OciManifest::parse(MANIFEST, &a, "x").unwrap();
        assert_eq!(back.image_digest("x").unwrap(), disk);
        assert_eq!(back.layers(&m, "x").unwrap(), sample_layers(&m));

        let mut other = sample();
        other.kernel.digest = digest::of_bytes(b"another kernel");
        let err = back.layers(&other, "x").unwrap_err().to_string();
        assert!(
            err.contains("is not the part its image manifest names"),
            "{err}"
        );
    }

    #[test]
    fn dates_are_rfc3339() {
        assert_eq!(crate::image::manifest::rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(
            crate::image::manifest::rfc3339(946_684_800),
            "2000-01-01T00:00:00Z"
        );
        assert_eq!(
            crate::image::manifest::rfc3339(951_782_400),
            "2000-02-29T00:00:00Z"
        );
        assert_eq!(
            crate::image::manifest::rfc3339(1_733_150_000),
            "2024-12-02T14:33:20Z"
        );
    }

    #[test]
    fn other_artifacts_are_refused_with_what_they_are() {
        let err = OciManifest::parse(INDEX, b"{}", "r")
            .unwrap_err()
            .to_string();
        assert!(err.contains("image index"), "{err}");
        let container = br#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:00","size":1},"layers":[]}"#;
        let err = OciManifest::parse(MANIFEST, container, "r")
            .unwrap_err()
            .to_string();
        assert!(err.contains("not a fuse image"), "{err}");
    }
}
