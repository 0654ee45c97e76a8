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
//! - `verified/<hex>`: when the blob was last checked to hold the bytes of its digest (its
//!   size, mtime, ctime and inode then): a blob is hashed in full once, then trusted until
//!   something writes to it
//! - `leases/<pid>-<start time>`: the blobs a build in flight has put, which garbage
//!   collection keeps until the build tags its image (or its process is gone)
//! - `repositories/<name>`: the registry repository the image name was last pushed to, where
//!   `fuse push NAME:VERSION` without a reference pushes it next
//! - `configured-repositories/<name>`: the `repository` of the fuse.toml the image name was
//!   last built from, where such a push goes when there is no `repositories/<name>`
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
            root.join("verified"),
            root.join("leases"),
            root.join("repositories"),
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

    /// Moves a finished file into the store under its digest; returns the digest. A blob
    /// already there is kept only if it is known intact (see [`Store::check_blob`]); one never
    /// checked or written to since is replaced by this file, which has the right bytes: a
    /// rebuild repairs a corrupt store.
    pub(crate) fn put_file(&self, file: &Path) -> Result<String> {
        let d = digest::of_file(file)?;
        let target = self.blob_path(&d);
        let _lock = self.lock()?;
        self.lease(&d)?;
        if self.recorded_intact(&d) {
            std::fs::remove_file(file).ok();
        } else {
            std::fs::rename(file, &target)
                .with_context(|| format!("Cannot move {} into the store", file.display()))?;
            self.record_intact(&d);
        }
        Ok(d)
    }

    /// Stores `bytes` under their digest (repairing a blob not known intact, as
    /// [`Store::put_file`]); returns the digest.
    pub(crate) fn put_bytes(&self, bytes: &[u8]) -> Result<String> {
        let _lock = self.lock()?;
        self.put_bytes_locked(bytes)
    }

    fn put_bytes_locked(&self, bytes: &[u8]) -> Result<String> {
        let d = digest::of_bytes(bytes);
        self.lease(&d)?;
        if !self.recorded_intact(&d) {
            crate::host::fs::write_atomic(&self.blob_path(&d), bytes)?;
            self.record_intact(&d);
        }
        Ok(d)
    }

    /// Stores a manifest, indexes the (stored) disk built from it, and points `name:version`
    /// at the disk; returns the image digest (the disk's). The build's lease ends here: its
    /// blobs are the image's now.
    pub(crate) fn tag(&self, manifest: &Manifest, disk: &str) -> Result<String> {
        let name = ImageName {
            name: manifest.name.clone(),
            version: manifest.version.clone(),
        };
        self.tag_as(manifest, disk, &name)
    }

    /// As [`Store::tag`], under `name` rather than the manifest's own name (a pulled image
    /// is named after its registry reference, `registry/repository:tag`).
    pub(crate) fn tag_as(
        &self,
        manifest: &Manifest,
        disk: &str,
        name: &ImageName,
    ) -> Result<String> {
        let _lock = self.lock()?;
        let m = self.put_bytes_locked(&manifest.to_bytes())?;
        crate::host::fs::write_atomic(&self.index_path(disk), format!("{m}\n").as_bytes())?;
        let reference = self.ref_path(name);
        crate::host::fs::write_atomic(&reference, format!("{disk}\n").as_bytes())?;
        if let Some(lease) = self.lease_path() {
            let _ = std::fs::remove_file(lease);
        }
        Ok(disk.to_string())
    }

    /// `refs/<name>/<version>`; a registry name's `/` is written `%2F` (a local name has
    /// neither `/` nor `%`), so every name is one directory.
    fn ref_path(&self, name: &ImageName) -> PathBuf {
        self.root
            .join("refs")
            .join(name.name.replace('/', "%2F"))
            .join(&name.version)
    }

    /// The registry repository (`registry/repository`) images called `name` were last
    /// pushed to.
    pub(crate) fn pushed_repository(&self, name: &str) -> Option<String> {
        std::fs::read_to_string(self.repository_path(name))
            .ok()
            .map(|r| r.trim().to_string())
            .filter(|r| !r.is_empty())
    }

    /// Every repository images were pushed to (`registry/repository`), sorted.
    pub(crate) fn pushed_repositories(&self) -> Result<Vec<String>> {
        let dir = self.root.join("repositories");
        let mut found = BTreeSet::new();
        for entry in
            std::fs::read_dir(&dir).with_context(|| format!("Cannot read {}", dir.display()))?
        {
            let text = std::fs::read_to_string(entry?.path()).unwrap_or_default();
            let repository = text.trim();
            if !repository.is_empty() {
                found.insert(repository.to_string());
            }
        }
        Ok(found.into_iter().collect())
    }

    /// Records where images called `name` were pushed.
    pub(crate) fn set_pushed_repository(&self, name: &str, repository: &str) -> Result<()> {
        crate::host::fs::write_atomic(
            &self.repository_path(name),
            format!("{repository}\n").as_bytes(),
        )
    }

    /// Where the `repository` of the fuse.toml images called `name` were last built from
    /// says to push them, if it says.
    pub(crate) fn configured_repository(&self, name: &str) -> Option<String> {
        std::fs::read_to_string(self.configured_repository_path(name))
            .ok()
            .map(|r| r.trim().to_string())
            .filter(|r| !r.is_empty())
    }

    /// Records (or, with `None`, forgets) the configured repository of images called `name`.
    pub(crate) fn set_configured_repository(
        &self,
        name: &str,
        repository: Option<&str>,
    ) -> Result<()> {
        let path = self.configured_repository_path(name);
        match repository {
            Some(r) => crate::host::fs::write_atomic(&path, format!("{r}\n").as_bytes()),
            None => match std::fs::remove_file(&path) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    Err(e).with_context(|| format!("Cannot remove {}", path.display()))
                }
                _ => Ok(()),
            },
        }
    }

    /// The last `fuse test` result of the image `digest` (what the promotion gate of
    /// `fuse deploy` reads).
    pub(crate) fn test_result(&self, digest: &str) -> Result<Option<TestResult>> {
        let path = self.test_result_path(digest);
        match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map(Some)
                .with_context(|| format!("{} is not a test result: remove it", path.display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e).with_context(|| format!("Cannot read {}", path.display())),
        }
    }

    /// Records `result` as the last `fuse test` result of the image `digest`.
    pub(crate) fn record_test_result(&self, digest: &str, result: &TestResult) -> Result<()> {
        crate::host::fs::write_atomic(
            &self.test_result_path(digest),
            format!("{}\n", serde_json::to_string(result)?).as_bytes(),
        )
    }

    fn test_result_path(&self, digest: &str) -> PathBuf {
        self.root
            .join("test-results")
            .join(crate::host::digest::hex_part(digest))
    }

    fn configured_repository_path(&self, name: &str) -> PathBuf {
        self.root
            .join("configured-repositories")
            .join(name.replace('/', "%2F"))
    }

    fn repository_path(&self, name: &str) -> PathBuf {
        self.root
            .join("repositories")
            .join(name.replace('/', "%2F"))
    }

    /// The image stored under exactly `name` (local or pulled).
    pub(crate) fn find_name(&self, name: &ImageName) -> Result<Option<StoredImage>> {
        let path = self.ref_path(name);
        match std::fs::read_to_string(&path) {
            Ok(d) => Ok(Some(self.load(name.clone(), d.trim().to_string())?)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e).with_context(|| format!("Cannot read {}", path.display())),
        }
    }

    /// This process's lease file.
    fn lease_path(&self) -> Option<PathBuf> {
        let me = ProcessId::current()?;
        Some(
            self.root
                .join("leases")
                .join(format!("{}-{}", me.pid, me.start_time)),
        )
    }

    /// Adds blob `d` to this process's lease, so garbage collection keeps it until the image
    /// is tagged. Called with the store lock held, as garbage collection runs.
    fn lease(&self, d: &str) -> Result<()> {
        use std::io::Write;
        let Some(path) = self.lease_path() else {
            bail!("Cannot read /proc/self/stat to lease blobs in the image store");
        };
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .and_then(|mut f| f.write_all(format!("{d}\n").as_bytes()))
            .with_context(|| format!("Cannot write {}", path.display()))
    }

    /// The blobs leased by builds still running; leases of gone processes are removed.
    fn leased(&self) -> Result<BTreeSet<String>> {
        let mut leased = BTreeSet::new();
        for entry in std::fs::read_dir(self.root.join("leases"))? {
            let entry = entry?;
            let owner = entry.file_name().to_str().and_then(|name| {
                let (pid, start_time) = name.split_once('-')?;
                Some(ProcessId {
                    pid: pid.parse().ok()?,
                    start_time: start_time.parse().ok()?,
                })
            });
            if !owner.is_some_and(|o| o.is_alive()) {
                let _ = std::fs::remove_file(entry.path());
                continue;
            }
            let text = std::fs::read_to_string(entry.path()).unwrap_or_default();
            leased.extend(text.lines().map(|l| digest::hex_part(l.trim()).to_string()));
        }
        Ok(leased)
    }

    /// Whether blob `d` holds the bytes of its digest. Hashed in full the first time and
    /// whenever its file changed (size, mtime, ctime or inode: any write, truncation, touch or
    /// replacement changes one); otherwise the record of the last check answers.
    pub(crate) fn check_blob(&self, d: &str) -> Result<BlobCheck> {
        let path = self.blob_path(d);
        if !path.exists() {
            return Ok(BlobCheck::Missing);
        }
        if self.recorded_intact(d) {
            return Ok(BlobCheck::Intact);
        }
        let actual =
            digest::of_file(&path).with_context(|| format!("Cannot read {}", path.display()))?;
        if digest::hex_part(&actual) != digest::hex_part(d) {
            return Ok(BlobCheck::Corrupt { actual });
        }
        self.record_intact(d);
        Ok(BlobCheck::Intact)
    }

    fn verified_path(&self, d: &str) -> PathBuf {
        self.root.join("verified").join(digest::hex_part(d))
    }

    /// Whether the record of blob `d`'s last check matches its file as it is now.
    fn recorded_intact(&self, d: &str) -> bool {
        let now = file_stamp(&self.blob_path(d));
        let recorded = std::fs::read_to_string(self.verified_path(d)).ok();
        now.is_some() && recorded.as_deref().map(str::trim) == now.as_deref()
    }

    /// Records blob `d` as checked, as its file is now. Best effort: without a record the
    /// next use checks it again.
    fn record_intact(&self, d: &str) {
        if let Some(stamp) = file_stamp(&self.blob_path(d)) {
            let _ = crate::host::fs::write_atomic(&self.verified_path(d), stamp.as_bytes());
        }
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
                    name: name.replace("%2F", "/"),
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
        if reference.contains('/') {
            // A pulled image's name, `registry/repository[:tag]`.
            let (name, version) = match reference.rsplit_once(':') {
                Some((n, v)) if !v.contains('/') => (n, v),
                _ => (reference, "latest"),
            };
            return self.find_name(&ImageName {
                name: name.to_string(),
                version: version.to_string(),
            });
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
        let reference = self.ref_path(&image.name);
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
        // What builds in flight have put is theirs until they tag it.
        live.extend(self.leased()?);
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
        for entry in std::fs::read_dir(self.root.join("verified"))? {
            let entry = entry?;
            let name = entry.file_name().to_string_lossy().into_owned();
            // Dot files are records being written right now.
            if !name.starts_with('.') && !live.contains(&name) {
                let _ = std::fs::remove_file(entry.path());
            }
        }
        Ok(freed)
    }
}

/// What [`Store::check_blob`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum BlobCheck {
    Intact,
    Missing,
    /// The blob's bytes have this digest instead.
    Corrupt {
        actual: String,
    },
}

/// What identifies a file's current bytes without reading them: size, mtime, ctime (which no
/// one can set back), inode and device.
fn file_stamp(path: &Path) -> Option<String> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(path).ok()?;
    Some(format!(
        "size {} mtime {}.{:09} ctime {}.{:09} inode {} dev {}",
        m.len(),
        m.mtime(),
        m.mtime_nsec(),
        m.ctime(),
        m.ctime_nsec(),
        m.ino(),
        m.dev()
    ))
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

/// The last `fuse test` of one digest, kept in the store (`test-results/<hex>`).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub(crate) struct TestResult {
    pub(crate) passed: bool,
    /// When it ran (RFC 3339, UTC).
    pub(crate) at: String,
    /// The checks that passed, of how many.
    pub(crate) checks: usize,
    pub(crate) failures: usize,
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
        let disk = digest::of_bytes(format!("disk of {}", m.digest()).as_bytes());
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
    fn a_pulled_image_is_stored_under_its_registry_name() {
        let m = sample();
        let (_dir, store) = store_with_blobs(&m);
        let disk = disk_of(&store, &m);
        let pulled = ImageName {
            name: "127.0.0.1:5000/team/hello".into(),
            version: "1.0".into(),
        };
        store.tag_as(&m, &disk, &pulled).unwrap();
        assert!(store
            .root
            .join("refs/127.0.0.1:5000%2Fteam%2Fhello/1.0")
            .is_file());
        let names: Vec<String> = store
            .list()
            .unwrap()
            .iter()
            .map(|i| i.name.to_string())
            .collect();
        assert_eq!(names, ["127.0.0.1:5000/team/hello:1.0", "hello:1.0"]);
        let found = store
            .find("127.0.0.1:5000/team/hello:1.0")
            .unwrap()
            .unwrap();
        assert_eq!(found.name, pulled);
        assert_eq!(found.manifest, m, "the manifest keeps its own name");
        assert!(store
            .find("127.0.0.1:5000/team/hello:2.0")
            .unwrap()
            .is_none());
        assert!(store.find_name(&pulled).unwrap().is_some());
        store.remove(&found).unwrap();
        assert!(store.find_name(&pulled).unwrap().is_none());
        assert!(
            store.find("hello:1.0").unwrap().is_some(),
            "the local one stays"
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

    /// Writes `bytes` over the start of `path` in place, as a failing disk or a stray write
    /// would.
    fn damage(path: &Path, bytes: &[u8]) {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
        f.write_all_at(bytes, 0).unwrap();
    }

    #[test]
    fn a_blob_is_checked_once_and_a_corrupt_one_is_replaced_by_a_put() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path().join("images")).unwrap();
        let d = store.put_bytes(b"kernel bytes").unwrap();
        assert_eq!(store.check_blob(&d).unwrap(), BlobCheck::Intact);
        assert!(store.verified_path(&d).is_file(), "checked once, recorded");

        damage(&store.blob_path(&d), b"K");
        match store.check_blob(&d).unwrap() {
            BlobCheck::Corrupt { actual } => assert_eq!(actual, digest::of_bytes(b"Kernel bytes")),
            other => panic!("{other:?}"),
        }
        // A rebuild puts the same bytes again: the damaged blob goes.
        store.put_bytes(b"kernel bytes").unwrap();
        assert_eq!(std::fs::read(store.blob_path(&d)).unwrap(), b"kernel bytes");
        assert_eq!(store.check_blob(&d).unwrap(), BlobCheck::Intact);

        let scratch = store.temp_dir().unwrap();
        let file = scratch.path().join("rootfs");
        std::fs::write(&file, b"rootfs bytes").unwrap();
        let r = store.put_file(&file).unwrap();
        damage(&store.blob_path(&r), b"R");
        std::fs::write(&file, b"rootfs bytes").unwrap();
        assert_eq!(store.put_file(&file).unwrap(), r);
        assert_eq!(std::fs::read(store.blob_path(&r)).unwrap(), b"rootfs bytes");
        assert!(!file.exists(), "moved in");

        // An intact blob is kept (not rewritten) and the new file dropped.
        let before = file_stamp(&store.blob_path(&r));
        std::fs::write(&file, b"rootfs bytes").unwrap();
        store.put_file(&file).unwrap();
        assert_eq!(file_stamp(&store.blob_path(&r)), before);
        assert!(!file.exists());
        std::fs::remove_file(store.blob_path(&r)).unwrap();
        assert_eq!(store.check_blob(&r).unwrap(), BlobCheck::Missing);
    }

    #[test]
    fn garbage_collection_keeps_what_a_build_in_flight_put() {
        let (_dir, store) = store_with_blobs(&sample());
        // This process plays a build that has put its blobs and not yet tagged its image.
        let building = store.put_bytes(b"half a build").unwrap();
        let other = store.find("hello:1.0").unwrap().unwrap();
        store.remove(&other).unwrap();
        assert!(
            store.blob_path(&building).exists(),
            "a leased blob was collected"
        );

        // Tagging ends the lease: the image holds its blobs from then on.
        let mut m = sample();
        m.version = "2.0".into();
        m.kernel.digest = building.clone();
        let disk = disk_of(&store, &m);
        store.tag(&m, &disk).unwrap();
        assert!(std::fs::read_dir(store.root.join("leases"))
            .unwrap()
            .next()
            .is_none());
        let leftover = store.put_bytes(b"orphan").unwrap();
        std::fs::remove_dir_all(store.root.join("leases")).unwrap();
        std::fs::create_dir(store.root.join("leases")).unwrap();
        store
            .remove(&store.find("hello:2.0").unwrap().unwrap())
            .unwrap();
        assert!(!store.blob_path(&building).exists());
        assert!(
            !store.blob_path(&leftover).exists(),
            "unleased, unused: collected"
        );
        assert!(
            !store.verified_path(&building).exists(),
            "its record goes with it"
        );

        // A lease of a process that is gone protects nothing.
        let kept = store.put_bytes(b"kept").unwrap();
        let dead = store.root.join("leases").join("1-1");
        std::fs::write(&dead, format!("{kept}\n")).unwrap();
        std::fs::remove_file(store.lease_path().unwrap()).unwrap();
        store.collect_garbage().unwrap();
        assert!(!store.blob_path(&kept).exists());
        assert!(!dead.exists(), "a dead build's lease is removed");
    }
}
