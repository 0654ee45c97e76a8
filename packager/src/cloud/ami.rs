//! Image → AMI, once per digest and region: an AMI tagged `fuse:digest=<digest>` is reused;
//! otherwise the image's raw disk becomes an EBS snapshot through the EBS direct APIs (only
//! its non-zero 512 KiB blocks sent, in parallel, each with its SHA-256) and the snapshot is
//! registered as a UEFI, ENA, IMDSv2-only AMI of the image's architecture. Every step finds
//! what an interrupted earlier run left (a tagged snapshot, an AMI of the same name) and goes
//! on from there, so a re-run converges.

use super::aws::ebs::{self, BLOCK_SIZE};
use super::aws::ec2::{self, Registration};
use super::aws::http::Client;
use crate::host::digest;
use crate::image::store::StoredImage;
use anyhow::{bail, Context, Result};
use fuse_rootfs::Arch;
use sha2::{Digest, Sha256};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The tag that names an image's digest on its snapshot and AMI.
pub(crate) const DIGEST_TAG: &str = "fuse:digest";
/// The tag that names the image (`name:version`), for people.
pub(crate) const IMAGE_TAG: &str = "fuse:image";
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
    pub(crate) blocks_skipped: u64,
    pub(crate) seconds: f64,
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

/// The AMI of `image` (whose raw disk is `disk`) in the client's region: found, or made.
pub(crate) fn ensure_ami(
    client: &Client,
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
    // stopped: the first is registered as it is, the second filled (every non-zero block sent
    // again: a block is written whole or not at all) and completed.
    let tagged = ec2::describe_snapshots(client, &[(&tag_filter, &image.digest)])?;
    let completed = tagged.iter().find(|s| s.state == "completed");
    let pending = tagged.iter().find(|s| s.state == "pending");
    let snapshot = match (completed, pending) {
        (Some(done), _) => {
            progress(&format!(
                "snapshot {} of {} is uploaded already: registering it",
                done.id, image.name
            ));
            done.id.clone()
        }
        (None, Some(unfinished)) => {
            progress(&format!(
                "snapshot {} of {} was left pending by an earlier run: uploading into it",
                unfinished.id, image.name
            ));
            fill(client, image, disk, &unfinished.id, &mut outcome, progress)?;
            unfinished.id.clone()
        }
        (None, None) => start_and_fill(client, image, disk, &tags, &mut outcome, progress)?,
    };

    let registration = Registration {
        name: name.clone(),
        description: description(image),
        architecture: ec2_arch(image.manifest.arch),
        snapshot: snapshot.clone(),
        root_device: ROOT_DEVICE,
    };
    let ami = ec2::register_image(client, &registration)?;
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

/// Starts a snapshot of `disk` and uploads it; its id.
fn start_and_fill(
    client: &Client,
    image: &StoredImage,
    disk: &Path,
    tags: &[(&str, &str)],
    outcome: &mut AmiOutcome,
    progress: &mut dyn FnMut(&str),
) -> Result<String> {
    let size = std::fs::metadata(disk)
        .with_context(|| format!("Cannot read the size of {}", disk.display()))?
        .len();
    let gib = size.div_ceil(1 << 30).max(1);
    // Per digest (the same disk, the same size): a retried StartSnapshot gets the same
    // snapshot back while AWS remembers the token.
    let hex = digest::hex_part(&image.digest);
    let token = format!("fuse-{}", &hex[..hex.len().min(48)]);
    let description = description(image);
    let started = ebs::start_snapshot(client, gib, &description, tags, &token)?;
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
    fill(client, image, disk, &started.id, outcome, progress)?;
    Ok(started.id)
}

/// Uploads the non-zero blocks of `disk` into the pending `snapshot`, completes it and waits
/// until EC2 reports it completed.
fn fill(
    client: &Client,
    image: &StoredImage,
    disk: &Path,
    snapshot: &str,
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
    let blocks = size.div_ceil(BLOCK_SIZE as u64);
    progress(&format!(
        "uploading {} ({} MiB, {blocks} blocks of 512 KiB) into snapshot {snapshot} in {}",
        image.name,
        size.div_ceil(1 << 20),
        client.session().region
    ));

    let next = AtomicU64::new(0);
    let sent = AtomicU64::new(0);
    let skipped = AtomicU64::new(0);
    let failed = AtomicBool::new(false);
    let first_error: Mutex<Option<anyhow::Error>> = Mutex::new(None);
    let begun = Instant::now();
    let worker = || {
        let mut buf = vec![0u8; BLOCK_SIZE];
        while !failed.load(Ordering::Relaxed) {
            let index = next.fetch_add(1, Ordering::Relaxed);
            if index >= blocks {
                return;
            }
            let result = (|| -> Result<()> {
                let offset = index * BLOCK_SIZE as u64;
                let len = (size - offset).min(BLOCK_SIZE as u64) as usize;
                buf[len..].fill(0);
                file.read_exact_at(&mut buf[..len], offset)
                    .with_context(|| format!("Cannot read {}", disk.display()))?;
                if is_zero(&buf) {
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
            "{}/{blocks} blocks: {sent} sent ({:.1} MiB, {:.1} MiB/s), {skipped} zero blocks skipped",
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
