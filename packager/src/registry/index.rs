//! Several architectures under one tag: an OCI image index listing one manifest per
//! platform. `fuse push` of an image to a tag that holds the same kind of thing (a fuse
//! image, or a containerDisk) for another architecture merges the two into an index (the same
//! architecture replaces its entry); `fuse pull` of an index picks one architecture.
//!
//! Entries are sorted by platform, so the same manifests give the same index bytes whatever
//! order they were pushed in.

use anyhow::{bail, Context, Result};
use fuse_rootfs::Arch;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub(crate) struct Platform {
    pub(crate) architecture: String,
    pub(crate) os: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) variant: Option<String>,
}

impl Platform {
    pub(crate) fn linux(arch: Arch) -> Platform {
        Platform {
            architecture: oci_arch(arch).to_string(),
            os: "linux".to_string(),
            variant: None,
        }
    }

    fn same_machine(&self, other: &Platform) -> bool {
        self.architecture == other.architecture && self.os == other.os
    }
}

impl std::fmt::Display for Platform {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.os, self.architecture)?;
        if let Some(v) = &self.variant {
            write!(f, "/{v}")?;
        }
        Ok(())
    }
}

/// An index's entry: a manifest, its artifact type (fuse's, or none for a container image)
/// and platform.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct Entry {
    pub(crate) media_type: String,
    pub(crate) digest: String,
    pub(crate) size: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) artifact_type: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) platform: Option<Platform>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub(crate) annotations: BTreeMap<String, String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct Index {
    pub(crate) schema_version: u32,
    #[serde(default)]
    pub(crate) media_type: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) artifact_type: Option<String>,
    pub(crate) manifests: Vec<Entry>,
}

/// The OCI (Go) name of an architecture.
pub(crate) fn oci_arch(arch: Arch) -> &'static str {
    match arch {
        Arch::X86_64 => "amd64",
        Arch::Aarch64 => "arm64",
    }
}

/// fuse's name for an OCI architecture, when it builds for it.
fn fuse_arch(oci: &str) -> Option<Arch> {
    Arch::ALL.into_iter().find(|a| oci_arch(*a) == oci)
}

impl Index {
    pub(crate) fn parse(bytes: &[u8], what: &str) -> Result<Index> {
        let index: Index = serde_json::from_slice(bytes)
            .with_context(|| format!("{what}: its image index is not valid JSON of one"))?;
        if index.schema_version != 2 {
            bail!(
                "{what}: image index schemaVersion {} is not 2",
                index.schema_version
            );
        }
        Ok(index)
    }

    /// The bytes pushed: compact JSON, fields in declaration order.
    pub(crate) fn to_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("an image index serialises")
    }

    /// `ours` merged into what a tag held (`existing`'s entries): the entries of the same
    /// artifact type for other platforms are kept, one for ours' platform is replaced, the
    /// rest (another kind of artifact) dropped; sorted by platform.
    pub(crate) fn merged(existing: Vec<Entry>, ours: Entry) -> Index {
        let platform = ours.platform.clone();
        let mut manifests: Vec<Entry> = existing
            .into_iter()
            .filter(|e| e.artifact_type == ours.artifact_type)
            .filter(|e| match (&e.platform, &platform) {
                (Some(theirs), Some(mine)) => !theirs.same_machine(mine),
                _ => false,
            })
            .collect();
        let artifact_type = ours.artifact_type.clone();
        manifests.push(ours);
        manifests.sort_by(|a, b| a.platform.cmp(&b.platform).then(a.digest.cmp(&b.digest)));
        Index {
            schema_version: 2,
            media_type: super::oci::INDEX.to_string(),
            artifact_type,
            manifests,
        }
    }

    /// The entry for linux on `arch`; an error naming the platforms there are when it has none.
    pub(crate) fn pick(&self, arch: Arch, what: &str) -> Result<&Entry> {
        let wanted = Platform::linux(arch);
        if let Some(e) = self
            .manifests
            .iter()
            .find(|e| e.platform.as_ref().is_some_and(|p| p.same_machine(&wanted)))
        {
            return Ok(e);
        }
        let there: Vec<String> = self
            .manifests
            .iter()
            .filter_map(|e| e.platform.as_ref())
            .map(
                |p| match fuse_arch(&p.architecture).filter(|_| p.os == "linux") {
                    Some(a) => format!("{p} (--arch {})", a.as_str()),
                    None => p.to_string(),
                },
            )
            .collect();
        bail!(
            "{what} has no image for {} ({wanted}): it has {}",
            arch.as_str(),
            if there.is_empty() {
                "no platforms named".to_string()
            } else {
                there.join(", ")
            }
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(arch: Arch, digest: char, artifact: Option<&str>) -> Entry {
        Entry {
            media_type: super::super::oci::MANIFEST.to_string(),
            digest: format!("sha256:{}", digest.to_string().repeat(64)),
            size: 100,
            artifact_type: artifact.map(str::to_string),
            platform: Some(Platform::linux(arch)),
            annotations: BTreeMap::new(),
        }
    }

    const FUSE: Option<&str> = Some(super::super::oci::ARTIFACT_TYPE);

    #[test]
    fn two_arches_make_one_index_whatever_the_order() {
        let amd = entry(Arch::X86_64, 'a', FUSE);
        let arm = entry(Arch::Aarch64, 'b', FUSE);
        let one = Index::merged(vec![amd.clone()], arm.clone());
        let other = Index::merged(vec![arm.clone()], amd.clone());
        assert_eq!(one.to_bytes(), other.to_bytes());
        assert_eq!(one.manifests, vec![amd.clone(), arm.clone()]);
        let text = String::from_utf8(one.to_bytes()).unwrap();
        assert!(text.starts_with(r#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json","artifactType":"application/vnd.fuse.image.v1+json","manifests":[{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"sha256:aaaa"#), "{text}");
        assert!(
            text.contains(r#""platform":{"architecture":"arm64","os":"linux"}"#),
            "{text}"
        );
        assert_eq!(Index::parse(&one.to_bytes(), "x").unwrap(), one);
    }

    #[test]
    fn the_same_arch_replaces_and_other_kinds_are_dropped() {
        let amd = entry(Arch::X86_64, 'a', FUSE);
        let arm = entry(Arch::Aarch64, 'b', FUSE);
        let index = Index::merged(vec![amd.clone()], arm.clone());
        let arm2 = entry(Arch::Aarch64, 'c', FUSE);
        let again = Index::merged(index.manifests, arm2.clone());
        assert_eq!(again.manifests, vec![amd.clone(), arm2]);
        // A containerDisk for arm64 does not merge with fuse images: it stands alone.
        let disk = entry(Arch::Aarch64, 'd', None);
        let alone = Index::merged(again.manifests, disk.clone());
        assert_eq!(alone.manifests, vec![disk]);
        assert_eq!(alone.artifact_type, None);
    }

    #[test]
    fn pick_finds_the_arch_or_names_those_there_are() {
        let index = Index::merged(
            vec![entry(Arch::X86_64, 'a', FUSE)],
            entry(Arch::Aarch64, 'b', FUSE),
        );
        assert!(index
            .pick(Arch::Aarch64, "r")
            .unwrap()
            .digest
            .starts_with("sha256:b"));
        let only = Index::merged(vec![], entry(Arch::X86_64, 'a', FUSE));
        let err = only.pick(Arch::Aarch64, "r").unwrap_err().to_string();
        assert_eq!(
            err,
            "r has no image for aarch64 (linux/arm64): it has linux/amd64 (--arch x86_64)"
        );
    }
}
