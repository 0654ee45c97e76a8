//! The local image store: content-addressed blobs plus name:version references.
//!
//! Layout under `paths::data_dir()/images`:
//! - `blobs/sha256/<hex>`: disks, kernels, initramfs, root filesystems, manifests (shared by
//!   images)
//! - `refs/<name>/<version>`: the digest of the image's disk, which is the image's digest
//! - `index/<disk hex>`: the digest of that disk's manifest, so listing and inspecting images
//!   never parse a disk (the manifest is also inside the disk, as the UKI's `.fuse` section)
//! - `tmp/build-<pid>-<start time>-<random>`: scratch of a build or run, named after the
//!   process that made it, so what a SIGKILLed fuse left behind is swept by the next one
//!
//! The layout is an OCI image layout in spirit, so pushing to a registry maps blob for blob.

use crate::host::digest;
use crate::host::lock::FileLock;
use crate::host::process::ProcessId;
use crate::image::manifest::Manifest;
use crate::image::naming::{self, ImageName};
use anyhow::{bail, Context, Result};
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

/// The image store.
#[derive(Debug, Clone)]
pub(crate) struct Store {
    root: PathBuf,
}

/// An image found in the store.
#[derive(Debug, Clone)]
pub(crate) struct StoredImage {
    pub(crate) name: ImageName,
    pub(crate) digest: String,
    pub(crate) manifest: Manifest,
}

impl Store {
    /// The user's store.
    pub(crate) fn open_default() -> Result<Store> {
        Store::open(crate::host::paths::data_dir().join("images"))
    }

    pub(crate) fn open(root: PathBuf) -> Result<Store> {
        for dir in [
            root.join("blobs/sha256"),
            root.join("refs"),
            root.join("index"),
            root.join("tmp"),
        ] {
            std::fs::create_dir_all(&dir)
                .with_context(|| format!("Cannot create the image store at {}", dir.display()))?;
        }
        let store = Store { root };
        store.sweep_scratch();
        Ok(store)
    }

    /// A scratch directory on the store's filesystem, so finished files can be renamed in.
    /// Its name says which process owns it, for [`Store::open`] to sweep once that is gone.
    pub(crate) fn temp_dir(&self) -> Result<tempfile::TempDir> {
        let prefix = ProcessId::current().map_or_else(
            || SCRATCH_PREFIX.to_string(),
            |me| format!("{SCRATCH_PREFIX}{}-{}-", me.pid, me.start_time),
        );
        tempfile::Builder::new()
            .prefix(&prefix)
            .tempdir_in(self.root.join("tmp"))
            .context("Cannot create a temporary directory in the image store")
    }

    /// Removes the scratch directories whose owner no longer runs: a build or run that was
    /// SIGKILLed never drops its `TempDir`. Best effort: a directory that cannot be removed
    /// now is tried again next time. (A fuse in another pid namespace sharing this store would
    /// look gone too: share a store only within one.)
    fn sweep_scratch(&self) {
        let Ok(entries) = std::fs::read_dir(self.root.join("tmp")) else {
            return;
        };
        for entry in entries.flatten() {
            let name = entry.file_name();
            let Some(owner) = name.to_str().and_then(scratch_owner) else {
                continue;
            };
            if !owner.is_alive() {
                let _ = std::fs::remove_dir_all(entry.path());
            }
        }
    }

    /// Where a blob lives.
    pub(crate) fn blob_path(&self, digest: &str) -> PathBuf {
        self.root
            .join("blobs/sha256")
            .join(digest::hex_part(digest))
    }

    /// Moves a finished file into the store under its digest; returns the digest.
    pub(crate) fn put_file(&self, file: &Path) -> Result<String> {
        let d = digest::of_file(file)?;
        let target = self.blob_path(&d);
        if target.exists() {
            std::fs::remove_file(file).ok();
        } else {
            std::fs::rename(file, &target)
                .with_context(|| format!("Cannot move {} into the store", file.display()))?;
        }
        Ok(d)
    }

    pub(crate) fn put_bytes(&self, bytes: &[u8]) -> Result<String> {
        let d = digest::of_bytes(bytes);
        let target = self.blob_path(&d);
        if !target.exists() {
            crate::host::fs::write_atomic(&target, bytes)?;
        }
        Ok(d)
    }

    /// Stores a manifest, indexes the (stored) disk built from it, and points `name:version`
    /// at the disk; returns the image digest (the disk's).
    pub(crate) fn tag(&self, manifest: &Manifest, disk: &str) -> Result<String> {
        let _lock = self.lock()?;
        let m = self.put_bytes(&manifest.to_bytes())?;
        crate::host::fs::write_atomic(&self.index_path(disk), format!("{m}\n").as_bytes())?;
        let reference = self
            .root
            .join("refs")
            .join(&manifest.name)
            .join(&manifest.version);
        crate::host::fs::write_atomic(&reference, format!("{disk}\n").as_bytes())?;
        Ok(disk.to_string())
    }

    fn index_path(&self, disk: &str) -> PathBuf {
        self.root.join("index").join(digest::hex_part(disk))
    }

    fn lock(&self) -> Result<FileLock> {
        FileLock::exclusive(&self.root.join("store.lock"))
    }

    /// The manifest digest of an image digest (a disk's); `None` for a reference an older
    /// fuse wrote, which names the manifest itself.
    fn manifest_digest(&self, d: &str) -> Option<String> {
        std::fs::read_to_string(self.index_path(d))
            .ok()
            .map(|s| s.trim().to_string())
    }

    fn load(&self, name: ImageName, d: String) -> Result<StoredImage> {
        let m = self.manifest_digest(&d).unwrap_or_else(|| d.clone());
        let bytes = std::fs::read(self.blob_path(&m)).with_context(|| {
            format!(
                "Image {name} points at a missing manifest {d}: run `fuse rm {name}` and rebuild"
            )
        })?;
        let manifest = Manifest::from_bytes(&bytes)?;
        Ok(StoredImage {
            name,
            digest: d,
            manifest,
        })
    }

    /// Every image, sorted by name and version.
    pub(crate) fn list(&self) -> Result<Vec<StoredImage>> {
        let mut images = Vec::new();
        let refs = self.root.join("refs");
        let mut names: Vec<_> = std::fs::read_dir(&refs)?
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        for name in names {
            let mut versions: Vec<_> = std::fs::read_dir(refs.join(&name))?
                .filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|v| !v.starts_with('.'))
                .collect();
            versions.sort();
            for version in versions {
                let d = std::fs::read_to_string(refs.join(&name).join(&version))?
                    .trim()
                    .to_string();
                let image_name = ImageName {
                    name: name.clone(),
                    version,
                };
                images.push(self.load(image_name, d)?);
            }
        }
        Ok(images)
    }

    /// Finds an image by `name[:version]`, full digest or a digest prefix of 12+ hex digits.
    /// A bare name with several versions and none called `latest` is ambiguous.
    pub(crate) fn find(&self, reference: &str) -> Result<Option<StoredImage>> {
        let hex = digest::hex_part(reference);
        if hex.len() >= 12 && hex.chars().all(|c| c.is_ascii_hexdigit()) {
            let found: Vec<StoredImage> = self
                .list()?
                .into_iter()
                .filter(|i| digest::hex_part(&i.digest).starts_with(hex))
                .collect();
            if let Some(first) = found.into_iter().next() {
                return Ok(Some(first));
            }
        }
        let Ok(wanted) = naming::parse(reference) else {
            return Ok(None);
        };
        let matching: Vec<StoredImage> = self
            .list()?
            .into_iter()
            .filter(|i| i.name.name == wanted.name)
            .collect();
        if reference.contains(':') {
            return Ok(matching
                .into_iter()
                .find(|i| i.name.version == wanted.version));
        }
        if let Some(latest) = matching.iter().find(|i| i.name.version == "latest") {
            return Ok(Some(latest.clone()));
        }
        match matching.len() {
            0 => Ok(None),
            1 => Ok(matching.into_iter().next()),
            _ => bail!(
                "Image name '{reference}' has several versions ({}): name one as {reference}:VERSION",
                matching
                    .iter()
                    .map(|i| i.name.version.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        }
    }

    /// Removes a reference, then every blob no remaining image uses. Returns bytes freed.
    pub(crate) fn remove(&self, image: &StoredImage) -> Result<u64> {
        let _lock = self.lock()?;
        let reference = self
            .root
            .join("refs")
            .join(&image.name.name)
            .join(&image.name.version);
        std::fs::remove_file(&reference)
            .with_context(|| format!("Cannot remove {}", reference.display()))?;
        let dir = reference.parent().expect("refs/<name>");
        if std::fs::read_dir(dir)?.next().is_none() {
            std::fs::remove_dir(dir).ok();
        }
        self.collect_garbage()
    }

    fn collect_garbage(&self) -> Result<u64> {
        let mut live = BTreeSet::new();
        for image in self.list()? {
            live.insert(digest::hex_part(&image.digest).to_string());
            if let Some(m) = self.manifest_digest(&image.digest) {
                live.insert(digest::hex_part(&m).to_string());
            }
            for (_, d, _) in image.manifest.components() {
                live.insert(digest::hex_part(d).to_string());
            }
        }
        let mut freed = 0;
        for entry in std::fs::read_dir(self.root.join("index"))? {
            let entry = entry?;
            if !live.contains(&*entry.file_name().to_string_lossy()) {
                std::fs::remove_file(entry.path())?;
            }
        }
        for entry in std::fs::read_dir(self.root.join("blobs/sha256"))? {
            let entry = entry?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if !live.contains(&name) {
                freed += entry.metadata().map(|m| m.len()).unwrap_or(0);
                std::fs::remove_file(entry.path())?;
            }
        }
        Ok(freed)
    }
}

/// What scratch directory names start with.
const SCRATCH_PREFIX: &str = "build-";

/// The process that made the scratch directory `name` (`build-<pid>-<start time>-<random>`);
/// `None` for another name (an older fuse's scratch, whose owner is unknown: left alone).
fn scratch_owner(name: &str) -> Option<ProcessId> {
    let mut parts = name.strip_prefix(SCRATCH_PREFIX)?.splitn(3, '-');
    let pid = parts.next()?.parse().ok()?;
    let start_time = parts.next()?.parse().ok()?;
    parts.next()?;
    Some(ProcessId { pid, start_time })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image::manifest::tests::sample;

    /// A stand-in for the disk of `manifest` (its bytes are not read by the store).
    fn disk_of(store: &Store, manifest: &Manifest) -> String {
        store
            .put_bytes(format!("disk of {}", manifest.digest()).as_bytes())
            .unwrap()
    }

    fn store_with_blobs(manifest: &Manifest) -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path().join("images")).unwrap();
        for body in [b"k", b"i", b"r"] {
            store.put_bytes(body).unwrap();
        }
        let disk = disk_of(&store, manifest);
        store.tag(manifest, &disk).unwrap();
        (dir, store)
    }

    #[test]
    fn tag_find_and_remove() {
        let m = sample();
        let (_dir, store) = store_with_blobs(&m);
        let found = store.find("hello:1.0").unwrap().unwrap();
        assert_eq!(found.manifest, m);
        let disk = disk_of(&store, &m);
        assert_eq!(found.digest, disk, "the image digest is the disk's");
        assert!(
            store.find("hello").unwrap().is_some(),
            "single version resolves"
        );
        assert!(store.find(digest::short(&disk)).unwrap().is_some());
        assert!(store.find("nope").unwrap().is_none());

        let freed = store.remove(&found).unwrap();
        assert!(freed > 3, "blobs and manifest collected, freed {freed}");
        assert!(store.list().unwrap().is_empty());
        assert!(!store.blob_path(&m.kernel.digest).exists());
        assert!(!store.blob_path(&disk).exists());
        assert!(!store.blob_path(&m.digest()).exists(), "manifest collected");
        assert_eq!(
            std::fs::read_dir(store.root.join("index")).unwrap().count(),
            0
        );
    }

    #[test]
    fn shared_blobs_survive_removing_one_image() {
        let a = sample();
        let mut b = sample();
        b.version = "2.0".into();
        let (_dir, store) = store_with_blobs(&a);
        let disk_b = disk_of(&store, &b);
        store.tag(&b, &disk_b).unwrap();
        let err = store.find("hello").unwrap_err();
        assert!(format!("{err}").contains("several versions"), "{err}");
        store
            .remove(&store.find("hello:1.0").unwrap().unwrap())
            .unwrap();
        assert!(store.blob_path(&b.kernel.digest).exists());
        assert!(store.find("hello").unwrap().is_some());
    }

    #[test]
    fn scratch_of_a_gone_process_is_swept_at_the_next_open() {
        let (_dir, store) = store_with_blobs(&sample());
        let live = store.temp_dir().unwrap();
        let name = live.path().file_name().unwrap().to_str().unwrap();
        assert_eq!(scratch_owner(name), ProcessId::current(), "{name}");

        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id();
        let gone = ProcessId::of(pid).unwrap_or(ProcessId { pid, start_time: 1 });
        child.wait().unwrap();
        let tmp = store.root.join("tmp");
        let dead = tmp.join(format!("build-{}-{}-AbC123", gone.pid, gone.start_time));
        std::fs::create_dir_all(dead.join("sub")).unwrap();
        std::fs::write(dead.join("sub/rootfs.squashfs"), b"half").unwrap();
        let unknown = tmp.join("build-x1Y2z3");
        std::fs::create_dir(&unknown).unwrap();

        Store::open(store.root.clone()).unwrap();
        assert!(!dead.exists(), "a dead build's scratch is swept");
        assert!(live.path().is_dir(), "a live process's scratch is kept");
        assert!(unknown.is_dir(), "a scratch of unknown owner is kept");
    }
}
