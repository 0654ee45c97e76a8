//! Artifacts attached to a pushed manifest (an SBOM): OCI 1.1 artifact manifests whose
//! `subject` is that manifest. A registry with the referrers API lists them itself; for one
//! without (distribution 2.8), the distribution spec's tag schema fallback: an image index
//! tagged `sha256-<hex of the subject digest>` listing them, read, extended and put back.

use super::client::{Access, Client, Connection};
use super::index::{Entry, Index};
use super::oci::{self, Descriptor};
use super::reference::Reference;
use crate::host::digest;
use anyhow::{bail, Context, Result};
use fuse_rootfs::Arch;
use serde::Serialize;
use std::collections::BTreeMap;
use std::path::Path;

/// The artifact type (and layer media type) of an SPDX JSON document.
pub(crate) const SPDX_JSON: &str = "application/spdx+json";
/// The OCI 1.1 empty config of an artifact: `{}`.
const EMPTY: &str = "application/vnd.oci.empty.v1+json";
const TITLE: &str = "org.opencontainers.image.title";
const CREATED: &str = "org.opencontainers.image.created";
/// Artifacts are small: refuse to read more than this of one.
const MAX_ARTIFACT: u64 = 256 << 20;

/// The manifest an artifact is attached to.
#[derive(Debug, Clone)]
pub(crate) struct Subject {
    pub(crate) media_type: String,
    pub(crate) digest: String,
    pub(crate) size: u64,
}

impl Subject {
    /// An OCI image manifest (what `fuse push` puts).
    pub(crate) fn manifest(digest: &str, size: u64) -> Subject {
        Subject {
            media_type: oci::MANIFEST.to_string(),
            digest: digest.to_string(),
            size,
        }
    }
}

/// An OCI 1.1 artifact manifest.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ArtifactManifest<'a> {
    schema_version: u32,
    media_type: &'a str,
    artifact_type: &'a str,
    config: Descriptor,
    layers: Vec<Descriptor>,
    subject: Descriptor,
    annotations: BTreeMap<String, String>,
}

/// The fallback tag of `subject_digest`: `sha256-<hex>`.
pub(crate) fn fallback_tag(subject_digest: &str) -> String {
    subject_digest.replacen(':', "-", 1)
}

/// A file to attach: `artifact_type` (also its layer's media type), `title` its name there,
/// `created` (RFC 3339) its manifest's annotation, so the same file on the same subject is
/// the same manifest.
pub(crate) struct Artifact<'a> {
    pub(crate) artifact_type: &'a str,
    pub(crate) path: &'a Path,
    pub(crate) title: &'a str,
    pub(crate) created: &'a str,
}

/// Attaches `artifact` to `subject` in `reference`'s repository; returns the artifact
/// manifest's digest.
pub(crate) fn attach(
    reference: &Reference,
    connection: &Connection,
    subject: &Subject,
    artifact: &Artifact<'_>,
) -> Result<String> {
    let mut client = super::connect(reference, Access::Push, connection)?;
    attach_with(&mut client, subject, artifact)
}

/// [`attach`] over a client with push access.
fn attach_with(client: &mut Client, subject: &Subject, artifact: &Artifact<'_>) -> Result<String> {
    let &Artifact {
        artifact_type,
        path,
        title,
        created,
    } = artifact;
    let layer_digest =
        digest::of_file(path).with_context(|| format!("Reading {}", path.display()))?;
    let layer_size = std::fs::metadata(path)?.len();
    let scratch = tempfile::tempdir().context("Cannot make a temporary directory")?;
    let empty_path = scratch.path().join("empty.json");
    std::fs::write(&empty_path, b"{}")?;
    let empty = digest::of_bytes(b"{}");
    for (d, p) in [(&layer_digest, path), (&empty, empty_path.as_path())] {
        if !client.has_blob(d)? {
            client.upload_blob(d, p, None, None)?;
        }
    }
    let manifest = ArtifactManifest {
        schema_version: 2,
        media_type: oci::MANIFEST,
        artifact_type,
        config: Descriptor {
            media_type: EMPTY.to_string(),
            digest: empty,
            size: 2,
            annotations: BTreeMap::new(),
        },
        layers: vec![Descriptor {
            media_type: artifact_type.to_string(),
            digest: layer_digest,
            size: layer_size,
            annotations: BTreeMap::from([(TITLE.to_string(), title.to_string())]),
        }],
        subject: Descriptor {
            media_type: subject.media_type.clone(),
            digest: subject.digest.clone(),
            size: subject.size,
            annotations: BTreeMap::new(),
        },
        annotations: BTreeMap::from([(CREATED.to_string(), created.to_string())]),
    };
    let bytes = serde_json::to_vec(&manifest).expect("an artifact manifest serialises");
    let manifest_digest = digest::of_bytes(&bytes);
    client.put_manifest(&manifest_digest, oci::MANIFEST, &bytes)?;
    if client.referrers(&subject.digest)?.is_some() {
        // The registry indexes `subject` itself.
        return Ok(manifest_digest);
    }
    let tag = fallback_tag(&subject.digest);
    let mut entries = match client.find_manifest(&tag, &[oci::INDEX])? {
        Some((_, existing)) => Index::parse(&existing, &tag)
            .map(|i| i.manifests)
            .unwrap_or_default(),
        None => Vec::new(),
    };
    entries.retain(|e| e.digest != manifest_digest);
    entries.push(Entry {
        media_type: oci::MANIFEST.to_string(),
        digest: manifest_digest.clone(),
        size: bytes.len() as u64,
        artifact_type: Some(artifact_type.to_string()),
        platform: None,
        annotations: manifest.annotations.clone(),
    });
    let index = Index {
        schema_version: 2,
        media_type: oci::INDEX.to_string(),
        artifact_type: None,
        manifests: entries,
    };
    client.put_manifest(&tag, oci::INDEX, &index.to_bytes())?;
    Ok(manifest_digest)
}

/// The manifest `reference` names (for an index: its manifest for `arch`), with the fuse image
/// digest it carries (none for what fuse did not push as its artifact).
fn resolve(
    client: &mut Client,
    reference: &Reference,
    arch: Arch,
) -> Result<(Subject, Option<String>)> {
    let what = reference.to_string();
    let (media_type, bytes) =
        client.get_manifest(reference.manifest_reference(), &oci::ACCEPTED)?;
    let (media_type, bytes, manifest_digest) = match media_type == oci::INDEX {
        true => super::picked_manifest(client, &bytes, arch, &what)?,
        false => {
            let d = digest::of_bytes(&bytes);
            (media_type, bytes, d)
        }
    };
    let image = oci::OciManifest::parse(&media_type, &bytes, &what)
        .ok()
        .and_then(|m| m.image_digest(&what).ok().map(str::to_string));
    let subject = Subject {
        media_type,
        digest: manifest_digest,
        size: bytes.len() as u64,
    };
    Ok((subject, image))
}

/// Attaches `artifact` to the manifest of `image_digest` that `reference` names (for an
/// index: its manifest for `arch`); refused when the reference now names another image.
pub(crate) fn attach_to_image(
    reference: &Reference,
    arch: Arch,
    connection: &Connection,
    image_digest: &str,
    artifact: &Artifact<'_>,
) -> Result<String> {
    // One client for both: push access includes pull.
    let mut client = super::connect(reference, Access::Push, connection)?;
    let (subject, image) = resolve(&mut client, reference, arch)?;
    if image.as_deref() != Some(image_digest) {
        bail!(
            "{reference} no longer names the image tested ({}): nothing was attached; pull it again and test that",
            digest::short(image_digest)
        );
    }
    attach_with(&mut client, &subject, artifact)
}

/// The file of the newest artifact of `artifact_type` attached to the manifest `reference`
/// names (for an index: its manifest for `arch`), checked against its digest.
pub(crate) fn fetch(
    reference: &Reference,
    arch: Arch,
    connection: &Connection,
    artifact_type: &str,
) -> Result<Vec<u8>> {
    let what = reference.to_string();
    let mut client = super::connect(reference, Access::Pull, connection)?;
    let subject = resolve(&mut client, reference, arch)?.0.digest;
    let listed = match client.referrers(&subject)? {
        Some(index) => index,
        None => match client.find_manifest(&fallback_tag(&subject), &[oci::INDEX])? {
            Some((_, index)) => index,
            None => {
                bail!("{what} has no {artifact_type} attached: push it with `fuse push --sbom`")
            }
        },
    };
    let entries = Index::parse(&listed, &what)?.manifests;
    // The newest: by creation annotation, then the last listed.
    let Some(entry) = entries
        .iter()
        .filter(|e| e.artifact_type.as_deref() == Some(artifact_type))
        .max_by(|a, b| a.annotations.get(CREATED).cmp(&b.annotations.get(CREATED)))
    else {
        bail!("{what} has no {artifact_type} attached: push it with `fuse push --sbom`");
    };
    let (_, manifest_bytes) = client.get_manifest(&entry.digest, &[oci::MANIFEST])?;
    if digest::of_bytes(&manifest_bytes) != entry.digest {
        bail!(
            "Registry {}: the artifact manifest {} of {what} is corrupt",
            reference.registry,
            entry.digest
        );
    }
    let manifest: serde_json::Value = serde_json::from_slice(&manifest_bytes)
        .with_context(|| format!("{what}: its {artifact_type} manifest is not JSON"))?;
    let layer = &manifest["layers"][0];
    let (Some(layer_digest), Some(size)) = (layer["digest"].as_str(), layer["size"].as_u64())
    else {
        bail!("{what}: its {artifact_type} manifest has no layer");
    };
    if size > MAX_ARTIFACT {
        bail!("{what}: its {artifact_type} is {size} bytes, more than fuse reads");
    }
    let mut response = client.get_blob(layer_digest)?;
    let data = response
        .body_mut()
        .with_config()
        .limit(MAX_ARTIFACT)
        .read_to_vec()
        .with_context(|| format!("Registry {}: download {layer_digest}", reference.registry))?;
    if digest::of_bytes(&data) != layer_digest {
        bail!(
            "Registry {}: the {artifact_type} of {what} ({layer_digest}) is corrupt",
            reference.registry
        );
    }
    Ok(data)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fallback_tag_is_the_digest_with_a_dash() {
        assert_eq!(fallback_tag("sha256:abc"), "sha256-abc");
    }
}
