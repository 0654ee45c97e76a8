//! Image → AMI, once per digest and region: an AMI tagged `fuse:digest=<digest>` is reused;
//! otherwise the image's raw disk becomes an EBS snapshot through the EBS direct APIs (only
//! its non-zero 512 KiB blocks sent, in parallel, each with its SHA-256) and the snapshot is
//! registered as a UEFI, ENA, IMDSv2-only AMI of the image's architecture. Every step finds
//! what an interrupted earlier run left (a tagged snapshot, an AMI of the same name) and goes
//! on from there, so a re-run converges.
//!
//! A new version of an app deployed before is uploaded incrementally: its snapshot starts
//! from the latest earlier snapshot of the same name (`fuse:name`) whose disk is still in the
//! local store (`ParentSnapshotId`), and only the blocks where the two disks differ are sent
//! (a block that became zero is written as zeros). Since the app has partitions of its own,
//! that is the ESP and the app's, not the root's.

use super::aws::ebs::{self, BLOCK_SIZE};
use super::aws::ec2::{self, Registration};
use super::aws::http::{has_code, Client};
use crate::host::digest;
use crate::image::store::{BlobCheck, Store, StoredImage};
use anyhow::{bail, Context, Result};
use fuse_rootfs::Arch;
use sha2::{Digest, Sha256};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The tag that names an image's digest on its snapshot and AMI.
pub(crate) const DIGEST_TAG: &str = "fuse:digest";
/// The tag that names the image (`name:version`), for people.
pub(crate) const IMAGE_TAG: &str = "fuse:image";
/// The tag that names the image without its version: the versions an incremental upload
/// may start from.
pub(crate) const NAME_TAG: &str = "fuse:name";
/// On an incremental snapshot: its parent and the parent's digest, so a run that resumes the
/// upload compares against the same disk.
const PARENT_TAG: &str = "fuse:parent";
const PARENT_DIGEST_TAG: &str = "fuse:parent-digest";
/// The root device: fuse's init finds its root by PARTUUID, so the name is EC2's default.
const ROOT_DEVICE: &str = "/dev/xvda";
/// Blocks in flight at once.
const UPLOADERS: usize = 8;
/// How long AWS may take to seal a snapshot after CompleteSnapshot.
const SEAL_TIMEOUT: Duration = Duration::from_secs(3600);

/// What `fuse deploy ami` did.
#[derive(Debug, Clone, serde::Serialize)]
pub(crate) struct AmiOutcome {
    pub(crate) ami: String,
    pub(crate) snapshot: Option<String>,
    pub(crate) region: String,
    pub(crate) name: String,
    /// The AMI existed already: nothing was uploaded or registered.
    pub(crate) reused: bool,
    pub(crate) bytes_sent: u64,
    pub(crate) blocks_sent: u64,
    /// Blocks not sent: zero (full upload) or the same as the parent's (incremental).
    pub(crate) blocks_skipped: u64,
    /// The size of the image's disk.
    pub(crate) disk_bytes: u64,
    /// The snapshot this one was uploaded incrementally onto, and its image's digest.
    pub(crate) parent_snapshot: Option<String>,
    pub(crate) parent_digest: Option<String>,
    /// Why the upload was a full one (no earlier version, its disk gone, …); `None` when it was
    /// incremental or nothing was uploaded.
    pub(crate) full_upload_reason: Option<String>,
    pub(crate) seconds: f64,
}

/// An earlier snapshot of the same app to upload incrementally onto, and its disk here.
#[derive(Debug, Clone)]
pub(crate) struct Parent {
    pub(crate) snapshot: String,
    pub(crate) digest: String,
    pub(crate) disk: PathBuf,
}

/// The AMI's name: image name, version and digest, in the characters EC2 allows.
pub(crate) fn ami_name(image: &StoredImage) -> String {
    let raw = format!("fuse-{}-{}", image.name, digest::short(&image.digest));
    let name: String = raw
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "()[]./-'@_ ".contains(c) {
                c
            } else {
                '-'
            }
        })
        .collect();
    name.chars().take(128).collect()
}

/// The snapshot's and AMI's description, `fuse/NAME:VERSION@sha256:…`. No spaces: moto (the
/// tests' EC2) checks a Query API signature against a body it re-encodes with `+` for spaces.
/// At most 255 characters, as EC2 and EBS take.
fn description(image: &StoredImage) -> String {
    let text = format!("fuse/{}@{}", image.name, image.digest);
    text.chars().take(255).collect()
}

/// EC2's name for `arch`.
fn ec2_arch(arch: Arch) -> &'static str {
    match arch {
        Arch::X86_64 => "x86_64",
        Arch::Aarch64 => "arm64",
    }
}

/// The AMI of `image` (whose raw disk is `disk`) in the client's region: found, or made
/// (incrementally on an earlier version's snapshot whose disk is in `store`, when there is one).
pub(crate) fn ensure_ami(
    client: &Client,
    store: &Store,
    image: &StoredImage,
    disk: &Path,
    progress: &mut dyn FnMut(&str),
) -> Result<AmiOutcome> {
    let started = Instant::now();
    let region = client.session().region.clone();
    let image_ref = image.name.to_string();
    let tags = [
        (DIGEST_TAG, image.digest.as_str()),
        (IMAGE_TAG, image_ref.as_str()),
        (NAME_TAG, image.name.name.as_str()),
    ];
    let name = ami_name(image);
    let mut outcome = AmiOutcome {
        ami: String::new(),
        snapshot: None,
        region: region.clone(),
        name: name.clone(),
        reused: false,
        bytes_sent: 0,
        blocks_sent: 0,
        blocks_skipped: 0,
        disk_bytes: std::fs::metadata(disk)
            .with_context(|| format!("Cannot read the size of {}", disk.display()))?
            .len(),
        parent_snapshot: None,
        parent_digest: None,
        full_upload_reason: None,
        seconds: 0.0,
    };
    let tag_filter = format!("tag:{DIGEST_TAG}");
    let usable = |i: &ec2::Image| !matches!(i.state.as_str(), "failed" | "deregistered" | "error");
    let existing = ec2::describe_images(client, &[(&tag_filter, &image.digest)])?;
    if let Some(found) = existing.into_iter().find(usable) {
        outcome.ami = found.id;
        outcome.snapshot = found.snapshot;
        outcome.reused = true;
        outcome.seconds = started.elapsed().as_secs_f64();
        return Ok(outcome);
    }
    // Registered by a run that stopped before tagging it.
    if let Some(found) = ec2::describe_images(client, &[("name", &name)])?
        .into_iter()
        .find(usable)
    {
        progress(&format!(
            "{} is registered but untagged: tagging it",
            found.id
        ));
        ec2::create_tags(client, &[&found.id], &tags)?;
        outcome.ami = found.id;
        outcome.snapshot = found.snapshot;
        outcome.reused = true;
        outcome.seconds = started.elapsed().as_secs_f64();
        return Ok(outcome);
    }

    // A snapshot an earlier run uploaded (completed) or was uploading (pending) when it
    // stopped: the first is registered as it is, the second filled (every block that must be
    // written sent again: a block is written whole or not at all) and completed.
    let tagged = ec2::describe_snapshots(client, &[(&tag_filter, &image.digest)])?;
    let completed = tagged.iter().find(|s| s.state == "completed");
    let pending = tagged.iter().find(|s| s.state == "pending");
    let snapshot = match (completed, pending) {
        (Some(done), _) => {
            progress(&format!(
                "snapshot {} of {} is uploaded already: registering it",
                done.id, image.name
            ));
            outcome.parent_snapshot = done.tags.get(PARENT_TAG).cloned();
            outcome.parent_digest = done.tags.get(PARENT_DIGEST_TAG).cloned();
            done.id.clone()
        }
        (None, Some(unfinished)) => {
            progress(&format!(
                "snapshot {} of {} was left pending by an earlier run: uploading into it",
                unfinished.id, image.name
            ));
            let parent = pending_parent(store, unfinished)?;
            if parent.is_none() {
                outcome.full_upload_reason = Some(format!(
                    "an earlier run started {} as a full upload",
                    unfinished.id
                ));
            }
            fill(
                client,
                image,
                disk,
                &unfinished.id,
                parent.as_ref(),
                &mut outcome,
                progress,
            )?;
            unfinished.id.clone()
        }
        (None, None) => {
            let gib = outcome.disk_bytes.div_ceil(1 << 30).max(1);
            let parent = match find_parent(client, store, image, gib)? {
                Ok(parent) => Some(parent),
                Err(reason) => {
                    progress(&format!("uploading {} in full: {reason}", image.name));
                    outcome.full_upload_reason = Some(reason);
                    None
                }
            };
            start_and_fill(
                client,
                image,
                disk,
                &tags,
                parent.as_ref(),
                &mut outcome,
                progress,
            )?
        }
    };

    let registration = Registration {
        name: name.clone(),
        description: description(image),
        architecture: ec2_arch(image.manifest.arch),
        snapshot: snapshot.clone(),
        root_device: ROOT_DEVICE,
    };
    let (ami, snapshot) = match ec2::register_image(client, &registration) {
        // A run started at the same moment registered it first (its snapshot, made with the
        // same client token, is this one where EC2 honours the token).
        Err(e) if has_code(&e, "InvalidAMIName.Duplicate") => {
            let found = ec2::describe_images(client, &[("name", &name)])?
                .into_iter()
                .find(usable)
                .with_context(|| format!("AMI {name} exists, but EC2 does not list it"))?;
            progress(&format!(
                "{} was registered by another run at the same time: using it",
                found.id
            ));
            outcome.reused = true;
            (found.id, found.snapshot.unwrap_or(snapshot))
        }
        other => (other?, snapshot),
    };
    ec2::create_tags(client, &[&ami], &tags)?;
    outcome.ami = ami;
    outcome.snapshot = Some(snapshot);
    outcome.seconds = started.elapsed().as_secs_f64();
    Ok(outcome)
}

/// Whether a block holds only zeros (a fresh EBS volume reads zeros where nothing was written).
pub(crate) fn is_zero(block: &[u8]) -> bool {
    block
        .chunks(64)
        .all(|c| c.iter().fold(0u8, |a, b| a | b) == 0)
}

/// The snapshot to upload `image` incrementally onto: the latest completed snapshot of an
/// earlier version of the same name whose disk is in `store`, its volume no larger than
/// `gib`; otherwise why the upload is a full one.
fn find_parent(
    client: &Client,
    store: &Store,
    image: &StoredImage,
    gib: u64,
) -> Result<std::result::Result<Parent, String>> {
    let name = &image.name.name;
    let name_filter = format!("tag:{NAME_TAG}");
    let mut earlier: Vec<ec2::Snapshot> = ec2::describe_snapshots(client, &[(&name_filter, name)])?
        .into_iter()
        .filter(|s| {
            s.state == "completed"
                && s.tags.get(NAME_TAG) == Some(name)
                && s.tags.get(DIGEST_TAG).is_some_and(|d| *d != image.digest)
        })
        .collect();
    if earlier.is_empty() {
        return Ok(Err(format!(
            "no earlier version of {name} has a snapshot in {} (tagged {NAME_TAG}={name})",
            client.session().region
        )));
    }
    earlier.sort_by(|a, b| b.start_time.cmp(&a.start_time));
    let Some((snapshot, d)) = earlier.iter().find_map(|s| {
        let d = &s.tags[DIGEST_TAG];
        matches!(store.check_blob(d), Ok(BlobCheck::Intact)).then_some((s, d))
    }) else {
        let latest = &earlier[0];
        return Ok(Err(format!(
            "the disk of the latest earlier snapshot of {name}, {} ({}), is not in the local store (nor that of any earlier one): incremental uploads compare against it",
            latest.id,
            digest::short(&latest.tags[DIGEST_TAG])
        )));
    };
    // A volume cannot be smaller than the snapshot it comes from.
    if snapshot.volume_gib > gib {
        return Ok(Err(format!(
            "the disk needs {gib} GiB, less than the {} GiB volume of the earlier snapshot {}",
            snapshot.volume_gib, snapshot.id
        )));
    }
    Ok(Ok(Parent {
        snapshot: snapshot.id.clone(),
        digest: d.clone(),
        disk: store.blob_path(d),
    }))
}

/// The parent a pending snapshot was started on (its tags say), with the parent's disk here;
/// `None` for a full snapshot. Without that disk the upload cannot be finished correctly.
fn pending_parent(store: &Store, pending: &ec2::Snapshot) -> Result<Option<Parent>> {
    let Some(parent) = pending.tags.get(PARENT_TAG) else {
        return Ok(None);
    };
    let d = pending
        .tags
        .get(PARENT_DIGEST_TAG)
        .map(String::as_str)
        .unwrap_or_default();
    if d.is_empty() || !matches!(store.check_blob(d), Ok(BlobCheck::Intact)) {
        bail!(
            "Snapshot {} left pending by an earlier run is incremental on {parent}, whose disk ({}) is no longer in the local store: delete it (`aws ec2 delete-snapshot --snapshot-id {}`) and run the command again",
            pending.id,
            if d.is_empty() { "untagged" } else { digest::short(d) },
            pending.id
        );
    }
    Ok(Some(Parent {
        snapshot: parent.clone(),
        digest: d.to_string(),
        disk: store.blob_path(d),
    }))
}

/// The ClientToken of a snapshot of the image `hex` (its digest's hex): per digest and parent,
/// so a retried StartSnapshot gets the same snapshot back while AWS remembers the token, and
/// a full upload after an incremental one that could not go on is a new snapshot. At most 64
/// characters.
fn client_token(hex: &str, parent: Option<&str>) -> String {
    match parent {
        None => format!("fuse-{}", &hex[..hex.len().min(48)]),
        Some(p) => {
            let p = p.strip_prefix("snap-").unwrap_or(p);
            let p = &p[..p.len().min(18)];
            format!("fuse-{}-{p}", &hex[..hex.len().min(40)])
        }
    }
}

/// Starts a snapshot of `disk` (incremental on `parent` if given) and uploads it; its id.
fn start_and_fill(
    client: &Client,
    image: &StoredImage,
    disk: &Path,
    tags: &[(&str, &str)],
    parent: Option<&Parent>,
    outcome: &mut AmiOutcome,
    progress: &mut dyn FnMut(&str),
) -> Result<String> {
    let gib = outcome.disk_bytes.div_ceil(1 << 30).max(1);
    let token = client_token(
        digest::hex_part(&image.digest),
        parent.map(|p| p.snapshot.as_str()),
    );
    let mut tags = tags.to_vec();
    if let Some(p) = parent {
        tags.push((PARENT_TAG, &p.snapshot));
        tags.push((PARENT_DIGEST_TAG, &p.digest));
    }
    let description = description(image);
    let started = ebs::start_snapshot(
        client,
        gib,
        parent.map(|p| p.snapshot.as_str()),
        &description,
        &tags,
        &token,
    )?;
    // The token returned an earlier run's snapshot that AWS failed (left pending past its
    // timeout): it cannot take blocks.
    if started.status == "error" {
        bail!(
            "AWS failed snapshot {} that an earlier run of this command started: delete it (`aws ec2 delete-snapshot --snapshot-id {}`) and run the command again",
            started.id,
            started.id
        );
    }
    // The token returned the snapshot of a run that completed it but stopped before
    // registering it (and EC2 did not list it yet).
    if started.status == "completed" {
        return Ok(started.id);
    }
    fill(client, image, disk, &started.id, parent, outcome, progress)?;
    Ok(started.id)
}

/// Whether block `new` must be written: without a parent, when it is not all zeros (a fresh
/// snapshot reads zeros where nothing was written); on a parent whose block there is
/// `parent`, when the two differ (also when `new` became zeros: not writing it would leave
/// the parent's bytes).
pub(crate) fn must_write(new: &[u8], parent: Option<&[u8]>) -> bool {
    match parent {
        None => !is_zero(new),
        Some(old) => new != old,
    }
}

/// Reads block `index` of `file` (`size` bytes long) into `buf`, zeros past the end.
fn read_block(file: &std::fs::File, size: u64, index: u64, buf: &mut [u8]) -> std::io::Result<()> {
    let offset = index * BLOCK_SIZE as u64;
    let len = size.saturating_sub(offset).min(BLOCK_SIZE as u64) as usize;
    buf[len..].fill(0);
    file.read_exact_at(&mut buf[..len], offset)
}

/// Uploads the blocks of `disk` into the pending `snapshot` (the non-zero ones, or those that
/// differ from `parent`'s disk), completes it and waits until EC2 reports it completed.
fn fill(
    client: &Client,
    image: &StoredImage,
    disk: &Path,
    snapshot: &str,
    parent: Option<&Parent>,
    outcome: &mut AmiOutcome,
    progress: &mut dyn FnMut(&str),
) -> Result<()> {
    let file = std::fs::File::open(disk).with_context(|| {
        format!(
            "Cannot open the disk of {} at {}",
            image.name,
            disk.display()
        )
    })?;
    let size = file
        .metadata()
        .with_context(|| format!("Cannot read the size of {}", disk.display()))?
        .len();
    let parent_file = match parent {
        Some(p) => {
            let f = std::fs::File::open(&p.disk).with_context(|| {
                format!(
                    "Cannot open the disk of {} ({}) at {}",
                    p.snapshot,
                    digest::short(&p.digest),
                    p.disk.display()
                )
            })?;
            let len = f
                .metadata()
                .with_context(|| format!("Cannot read the size of {}", p.disk.display()))?
                .len();
            Some((f, len))
        }
        None => None,
    };
    // On a parent, also the blocks past this disk's end where the parent's disk had bytes:
    // they must read as zeros, as in a full upload.
    let parent_size = parent_file.as_ref().map_or(0, |(_, len)| *len);
    let blocks = size.max(parent_size).div_ceil(BLOCK_SIZE as u64);
    let how = match parent {
        Some(p) => format!(
            "incrementally on {} ({}): only the blocks that differ from its disk",
            p.snapshot,
            digest::short(&p.digest)
        ),
        None => "in full: its non-zero blocks".to_string(),
    };
    progress(&format!(
        "uploading {} ({} MiB, {blocks} blocks of 512 KiB) into snapshot {snapshot} in {} {how}",
        image.name,
        size.div_ceil(1 << 20),
        client.session().region
    ));
    let skipped_what = if parent.is_some() {
        "unchanged blocks skipped (incremental)"
    } else {
        "zero blocks skipped"
    };

    let next = AtomicU64::new(0);
    let sent = AtomicU64::new(0);
    let skipped = AtomicU64::new(0);
    let failed = AtomicBool::new(false);
    let first_error: Mutex<Option<anyhow::Error>> = Mutex::new(None);
    let begun = Instant::now();
    let worker = || {
        let mut buf = vec![0u8; BLOCK_SIZE];
        let mut old = vec![0u8; if parent.is_some() { BLOCK_SIZE } else { 0 }];
        while !failed.load(Ordering::Relaxed) {
            let index = next.fetch_add(1, Ordering::Relaxed);
            if index >= blocks {
                return;
            }
            let result = (|| -> Result<()> {
                read_block(&file, size, index, &mut buf)
                    .with_context(|| format!("Cannot read {}", disk.display()))?;
                let old = match (&parent_file, parent) {
                    (Some((f, len)), Some(p)) => {
                        read_block(f, *len, index, &mut old)
                            .with_context(|| format!("Cannot read {}", p.disk.display()))?;
                        Some(&old[..])
                    }
                    _ => None,
                };
                if !must_write(&buf, old) {
                    skipped.fetch_add(1, Ordering::Relaxed);
                    return Ok(());
                }
                let sha: [u8; 32] = Sha256::digest(&buf).into();
                ebs::put_snapshot_block(client, snapshot, index, &buf, sha)
                    .with_context(|| format!("Cannot upload block {index} of {}", image.name))?;
                sent.fetch_add(1, Ordering::Relaxed);
                Ok(())
            })();
            if let Err(e) = result {
                failed.store(true, Ordering::Relaxed);
                first_error
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .get_or_insert(e);
                return;
            }
        }
    };
    let report = |sent: u64, skipped: u64| {
        let secs = begun.elapsed().as_secs_f64().max(0.001);
        let bytes = sent * BLOCK_SIZE as u64;
        format!(
            "{}/{blocks} blocks: {sent} sent ({:.1} MiB, {:.1} MiB/s), {skipped} {skipped_what}",
            sent + skipped,
            bytes as f64 / 1048576.0,
            bytes as f64 / 1048576.0 / secs
        )
    };
    std::thread::scope(|scope| {
        let handles: Vec<_> = (0..UPLOADERS).map(|_| scope.spawn(worker)).collect();
        let mut last = Instant::now();
        while handles.iter().any(|h| !h.is_finished()) {
            std::thread::sleep(Duration::from_millis(50));
            if last.elapsed() >= Duration::from_secs(2) {
                last = Instant::now();
                progress(&report(
                    sent.load(Ordering::Relaxed),
                    skipped.load(Ordering::Relaxed),
                ));
            }
        }
    });
    if let Some(err) = first_error.into_inner().unwrap_or_else(|p| p.into_inner()) {
        return Err(err.context(format!(
            "The upload into snapshot {snapshot} stopped; run the command again to go on"
        )));
    }
    let (sent, skipped) = (sent.into_inner(), skipped.into_inner());
    progress(&report(sent, skipped));
    outcome.blocks_sent = sent;
    outcome.blocks_skipped = skipped;
    outcome.bytes_sent = sent * BLOCK_SIZE as u64;
    outcome.parent_snapshot = parent.map(|p| p.snapshot.clone());
    outcome.parent_digest = parent.map(|p| p.digest.clone());
    ebs::complete_snapshot(client, snapshot, sent)?;
    wait_sealed(client, snapshot, progress)
}

/// Waits until EC2 reports `snapshot` completed.
fn wait_sealed(client: &Client, snapshot: &str, progress: &mut dyn FnMut(&str)) -> Result<()> {
    let begun = Instant::now();
    let mut last_said = Instant::now();
    loop {
        let found = ec2::describe_snapshots(client, &[("snapshot-id", snapshot)])?;
        match found
            .first()
            .map(|s| (s.state.as_str(), s.progress.as_str()))
        {
            Some(("completed", _)) => return Ok(()),
            Some(("error", _)) => bail!(
                "AWS could not complete snapshot {snapshot} (state error): delete it (`aws ec2 delete-snapshot --snapshot-id {snapshot}`) and run the command again"
            ),
            Some((state, done)) if last_said.elapsed() >= Duration::from_secs(10) => {
                last_said = Instant::now();
                progress(&format!("snapshot {snapshot}: {state} {done}"));
            }
            _ => {}
        }
        if begun.elapsed() > SEAL_TIMEOUT {
            bail!("Snapshot {snapshot} is not completed after {} minutes: run the command again later to go on", SEAL_TIMEOUT.as_secs() / 60);
        }
        std::thread::sleep(Duration::from_secs(2));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_blocks() {
        let mut block = vec![0u8; BLOCK_SIZE];
        assert!(is_zero(&block));
        block[BLOCK_SIZE - 1] = 1;
        assert!(!is_zero(&block));
        block[BLOCK_SIZE - 1] = 0;
        block[0] = 0x80;
        assert!(!is_zero(&block));
        assert!(is_zero(&[]));
        assert!(!is_zero(&[0, 0, 0, 7]));
    }

    #[test]
    fn blocks_written_on_a_parent() {
        let zero = vec![0u8; BLOCK_SIZE];
        let mut data = vec![0u8; BLOCK_SIZE];
        data[7] = 1;
        let mut other = data.clone();
        other[BLOCK_SIZE - 1] = 2;
        // Full upload: the non-zero blocks.
        assert!(must_write(&data, None));
        assert!(!must_write(&zero, None));
        // Incremental: the blocks that changed, zeros included.
        assert!(!must_write(&data, Some(&data)));
        assert!(must_write(&other, Some(&data)));
        assert!(must_write(&zero, Some(&data)), "a block that became zeros");
        assert!(must_write(&data, Some(&zero)));
        assert!(!must_write(&zero, Some(&zero)));
    }

    #[test]
    fn blocks_past_a_file_end_read_as_zeros() {
        use std::io::Write;
        let mut f = tempfile::tempfile().unwrap();
        f.write_all(&vec![5u8; BLOCK_SIZE + 10]).unwrap();
        let size = (BLOCK_SIZE + 10) as u64;
        let mut buf = vec![9u8; BLOCK_SIZE];
        read_block(&f, size, 1, &mut buf).unwrap();
        assert!(buf[..10].iter().all(|&b| b == 5) && is_zero(&buf[10..]));
        read_block(&f, size, 3, &mut buf).unwrap();
        assert!(
            is_zero(&buf),
            "a block past the end (a shorter disk than the parent's)"
        );
    }

    #[test]
    fn client_tokens() {
        let hex = "ab".repeat(32);
        assert_eq!(client_token(&hex, None), format!("fuse-{}", &hex[..48]));
        let t = client_token(&hex, Some("snap-0123456789abcdef0"));
        assert_eq!(t, format!("fuse-{}-0123456789abcdef0", &hex[..40]));
        assert!(t.len() <= 64);
        assert!(client_token(&hex, Some(&format!("snap-{}", "f".repeat(40)))).len() <= 64);
    }

    #[test]
    fn names_ec2_accepts() {
        let mut manifest = crate::image::manifest::tests::sample();
        manifest.arch = Arch::Aarch64;
        let image = StoredImage {
            name: crate::image::naming::ImageName {
                name: "hello".into(),
                version: "1.0+build".into(),
            },
            digest: format!("sha256:{}", "ab".repeat(32)),
            manifest,
        };
        assert_eq!(ami_name(&image), "fuse-hello-1.0-build-abababababab");
        assert_eq!(ec2_arch(image.manifest.arch), "arm64");
    }
}
