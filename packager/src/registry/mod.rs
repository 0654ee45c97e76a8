//! Images in OCI registries: `fuse push` and `fuse pull` over a small client of the
//! distribution API (`client`), references (`reference`), the Docker config's credentials
//! (`credentials`), `WWW-Authenticate` challenges (`challenge`) and the format an image
//! travels in (`oci`: its parts as layers, the disk rebuilt from them on pull), or as a
//! KubeVirt containerDisk (`containerdisk`); several architectures under one tag make an
//! image index (`index`); artifacts such as an SBOM are attached to a pushed manifest
//! (`referrers`). Blobs move on several threads at once (`transfer`).
//!
//! Data flows `cli → registry → image`: this room reads and writes the store, nothing else.

mod challenge;
pub(crate) mod client;
pub(crate) mod containerdisk;
pub(crate) mod credentials;
mod index;
mod oci;
pub(crate) mod reference;
pub(crate) mod referrers;
pub(crate) mod transfer;

use crate::host::digest;
use crate::image::disk;
use crate::image::export::{self, ExportFormat};
use crate::image::manifest::Manifest;
use crate::image::store::{BlobCheck, Store, StoredImage};
use anyhow::{bail, Context, Result};
use client::{Access, Client, Connection};
use containerdisk::DiskFormat;
use fuse_rootfs::Arch;
use index::{Index, Platform};
use oci::{Descriptor, Layers, OciManifest};
use reference::Reference;
use sha2::{Digest as _, Sha256};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use transfer::{Display, Meter};

/// Progress lines (`fuse: ...` on stderr, or nothing with --json).
pub(crate) type Progress<'a> = &'a (dyn Fn(&str) + Sync);

/// What `fuse push` did.
#[derive(Debug, Clone)]
pub(crate) struct PushReport {
    pub(crate) reference: String,
    /// The OCI manifest's digest: `REFERENCE@DIGEST` pulls exactly this.
    pub(crate) manifest_digest: String,
    /// The OCI manifest's size (the subject of what is attached to it).
    pub(crate) manifest_size: u64,
    /// The image index's, when the tag now lists several architectures.
    pub(crate) index_digest: Option<String>,
    /// The platforms the tag now has (`linux/amd64`...).
    pub(crate) platforms: Vec<String>,
    pub(crate) image_digest: String,
    pub(crate) bytes_sent: u64,
    pub(crate) blobs_sent: usize,
    pub(crate) blobs_skipped: usize,
    /// Blobs the registry mounted from another of its repositories (no bytes sent).
    pub(crate) blobs_mounted: usize,
    /// Blob uploads started again in a new session after a failure.
    pub(crate) uploads_restarted: u32,
    /// Blob uploads that went on from where the registry said they stopped, after a failure.
    pub(crate) uploads_resumed: u32,
}

/// What `fuse pull` did.
#[derive(Debug, Clone)]
pub(crate) struct PullReport {
    /// The name the image is stored under (`registry/repository:tag`).
    pub(crate) image: String,
    pub(crate) manifest_digest: String,
    /// The image index's the manifest was picked from, if any.
    pub(crate) index_digest: Option<String>,
    pub(crate) image_digest: String,
    pub(crate) bytes_received: u64,
    pub(crate) blobs_received: usize,
    /// Blobs the local store had already.
    pub(crate) blobs_reused: usize,
}

/// The credentials the Docker config holds for `registry`, if any.
fn credentials_for(registry: &str) -> Result<Option<credentials::Credentials>> {
    // No HOME and no DOCKER_CONFIG: anonymous, as the registry may well allow.
    match credentials::config_path() {
        Ok(path) => credentials::lookup(&path, registry),
        Err(_) => Ok(None),
    }
}

/// A client of `reference`'s repository with the Docker config's credentials for its registry.
fn connect(reference: &Reference, access: Access, connection: &Connection) -> Result<Client> {
    Client::connect(
        reference,
        access,
        connection,
        credentials_for(&reference.registry)?,
    )
}

/// What an image is pushed as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum PushFormat {
    /// fuse's artifact: the parts, the disk rebuilt from them on pull.
    Image,
    /// A KubeVirt containerDisk: a container image holding the disk in this format.
    ContainerDisk(DiskFormat),
}

/// A blob to push: its title (for progress), descriptor and file.
type Blob = (&'static str, Descriptor, PathBuf);

/// Pushes `image` to `reference` (a tag): every blob not in the repository yet, then the
/// manifest. A tag holding the same kind of thing for another architecture becomes an image
/// index of both (see [`index`]). The blobs go [`transfer::THREADS`] at a time.
pub(crate) fn push(
    store: &Store,
    image: &StoredImage,
    reference: &Reference,
    format: PushFormat,
    connection: &Connection,
    progress: Progress<'_>,
    display: Display,
) -> Result<PushReport> {
    let Some(tag) = reference.tag.clone().filter(|_| reference.digest.is_none()) else {
        bail!("Push to a tag, not a digest: {reference} (the digest is the registry's answer)");
    };
    let scratch = store.temp_dir()?;
    let (manifest, blobs) = match format {
        // The stored disk is not sent: the parts are, proven by rebuilding the disk from them.
        PushFormat::Image => image_blobs(store, image, scratch.path())?,
        PushFormat::ContainerDisk(f) => {
            let disk_path = disk::verified_disk_path(store, image)?;
            containerdisk_blobs(image, &disk_path, f, scratch.path(), progress)?
        }
    };
    let manifest_bytes = manifest.to_bytes();
    let manifest_digest = digest::of_bytes(&manifest_bytes);

    let sources = mount_sources(store, reference)?;
    let mut client = Client::connect_with_sources(
        reference,
        Access::Push,
        connection,
        credentials_for(&reference.registry)?,
        sources.clone(),
    )?;
    let mut report = PushReport {
        reference: reference.to_string(),
        manifest_digest: manifest_digest.clone(),
        manifest_size: manifest_bytes.len() as u64,
        index_digest: None,
        platforms: Vec::new(),
        image_digest: image.digest.clone(),
        bytes_sent: 0,
        blobs_sent: 0,
        blobs_skipped: 0,
        blobs_mounted: 0,
        uploads_restarted: 0,
        uploads_resumed: 0,
    };
    let mut uploads = Vec::new();
    for (_, blob, path) in &blobs {
        if client.has_blob(&blob.digest)? {
            report.blobs_skipped += 1;
            continue;
        }
        let mut mount_from = None;
        for source in &sources {
            if client.source_has_blob(source, &blob.digest)? {
                mount_from = Some(source.as_str());
                break;
            }
        }
        uploads.push((blob, path, mount_from));
    }
    let meter = Meter::new(
        "pushing",
        uploads.iter().map(|(b, _, _)| b.size).collect(),
        display,
        progress,
    );
    let (mounted, clients) = meter.run(|| {
        transfer::parallel(&client, uploads.len(), |client, i| {
            let (blob, path, mount_from) = uploads[i];
            let tick = |done: u64| meter.set(i, done);
            let mounted = client.upload_blob(&blob.digest, path, Some(&tick), mount_from)?;
            match mounted {
                true => meter.skip(i),
                false => meter.set(i, blob.size),
            }
            Ok(mounted)
        })
    });
    report.uploads_restarted = clients.iter().map(|c| c.uploads_restarted).sum();
    report.uploads_resumed = clients.iter().map(|c| c.uploads_resumed).sum();
    for ((blob, _, _), mounted) in uploads.iter().zip(mounted?) {
        if mounted {
            report.blobs_mounted += 1;
        } else {
            report.bytes_sent += blob.size;
            report.blobs_sent += 1;
        }
    }

    // What the tag holds for other architectures stays beside this one, in an index.
    let ours = index::Entry {
        media_type: oci::MANIFEST.to_string(),
        digest: manifest_digest.clone(),
        size: manifest_bytes.len() as u64,
        artifact_type: manifest.artifact_type.clone(),
        platform: Some(Platform::linux(image.manifest.arch)),
        annotations: Default::default(),
    };
    let merged = Index::merged(tag_entries(&mut client, &tag)?, ours);
    report.platforms = merged
        .manifests
        .iter()
        .filter_map(|e| e.platform.as_ref().map(|p| p.to_string()))
        .collect();
    let (put_as, media_type, bytes, digest) = if merged.manifests.len() == 1 {
        (tag.clone(), oci::MANIFEST, manifest_bytes, manifest_digest)
    } else {
        client.put_manifest(&manifest_digest, oci::MANIFEST, &manifest_bytes)?;
        report.bytes_sent += manifest_bytes.len() as u64;
        let bytes = merged.to_bytes();
        let digest = digest::of_bytes(&bytes);
        report.index_digest = Some(digest.clone());
        (tag.clone(), oci::INDEX, bytes, digest)
    };
    let answered = client.put_manifest(&put_as, media_type, &bytes)?;
    report.bytes_sent += bytes.len() as u64;
    if let Some(answered) = answered.filter(|a| *a != digest) {
        bail!(
            "Registry {}: put manifest {}:{tag}: it answered digest {answered}, not the manifest's {digest}",
            client.registry(),
            reference.repository
        );
    }
    Ok(report)
}

/// The manifest and blobs of fuse's artifact: the parts, checked first to rebuild the disk.
fn image_blobs(
    store: &Store,
    image: &StoredImage,
    scratch: &Path,
) -> Result<(OciManifest, Vec<Blob>)> {
    let m = &image.manifest;
    let name = &image.name;
    for (part, d, _) in m.components() {
        match store.check_blob(d)? {
            BlobCheck::Intact => {}
            BlobCheck::Missing => bail!(
                "Image {name} has no {part} ({}) in the store: rebuild it with `fuse build`",
                digest::short(d)
            ),
            BlobCheck::Corrupt { .. } => bail!(
                "Image {name} is corrupt in the store: its {part} {} has changed: rebuild it with `fuse build`",
                digest::short(d)
            ),
        }
    }

    // The stub is not stored with the image: the host's must be the one the disk was made
    // with, which rebuilding the disk from the parts proves (or the push is refused).
    let stub = disk::efi_stub(m.arch)?;
    let stub_path = scratch.join("efi-stub");
    std::fs::write(&stub_path, &stub)
        .with_context(|| format!("Cannot write {}", stub_path.display()))?;
    let rebuilt = disk::rebuild(
        m,
        &stub,
        &store.blob_path(&m.kernel.digest),
        &store.blob_path(&m.init.digest),
        &store.blob_path(&m.rootfs.digest),
        &store.blob_path(&m.appfs.digest),
        &scratch.join("disk.raw"),
    )?;
    if rebuilt != image.digest {
        bail!(
            "Image {name} cannot be pushed as its parts: with this host's EFI stub ({}) they make a disk of sha256 {}, not the image's {}: the stub changed since the image was built; rebuild it with `fuse build`",
            disk::efi_stub_path(m.arch).display(),
            digest::short(&rebuilt),
            digest::short(&image.digest)
        );
    }
    std::fs::remove_file(scratch.join("disk.raw")).ok();

    let config = m.to_bytes();
    let config_path = scratch.join("config.json");
    std::fs::write(&config_path, &config)
        .with_context(|| format!("Cannot write {}", config_path.display()))?;
    let layers = Layers {
        kernel: oci::layer(oci::KERNEL, &m.kernel.digest, m.kernel.size, "kernel"),
        initrd: oci::layer(oci::INITRD, &m.init.digest, m.init.size, "initrd"),
        efi_stub: oci::layer(
            oci::EFI_STUB,
            &digest::of_bytes(&stub),
            stub.len() as u64,
            "efi-stub",
        ),
        rootfs: oci::layer(oci::ROOTFS, &m.rootfs.digest, m.rootfs.size, "rootfs"),
        appfs: oci::layer(oci::APPFS, &m.appfs.digest, m.appfs.size, "appfs"),
    };
    let manifest = oci::manifest_for(m, &image.digest, &config, &layers);
    let blobs = vec![
        ("config", manifest.config.clone(), config_path),
        (
            "kernel",
            layers.kernel.clone(),
            store.blob_path(&m.kernel.digest),
        ),
        (
            "initrd",
            layers.initrd.clone(),
            store.blob_path(&m.init.digest),
        ),
        ("efi-stub", layers.efi_stub.clone(), stub_path),
        (
            "rootfs",
            layers.rootfs.clone(),
            store.blob_path(&m.rootfs.digest),
        ),
        (
            "appfs",
            layers.appfs.clone(),
            store.blob_path(&m.appfs.digest),
        ),
    ];
    Ok((manifest, blobs))
}

/// The manifest and blobs of a containerDisk: the disk (converted to qcow2 by qemu-img, or
/// raw as it is) in a one-layer container image.
fn containerdisk_blobs(
    image: &StoredImage,
    disk_path: &Path,
    format: DiskFormat,
    scratch: &Path,
    progress: Progress<'_>,
) -> Result<(OciManifest, Vec<Blob>)> {
    let m = &image.manifest;
    let disk_file = match format {
        DiskFormat::Raw => disk_path.to_path_buf(),
        DiskFormat::Qcow2 => {
            let out = scratch.join("disk.qcow2");
            progress(&format!("converting the disk of {} to qcow2", image.name));
            export::export(disk_path, ExportFormat::Qcow2, &out)?;
            out
        }
    };
    let layer_path = scratch.join("layer.tar");
    let (layer_digest, layer_size) =
        containerdisk::write_layer(&disk_file, format.file_name(), m.epoch(), &layer_path)?;
    let config = containerdisk::config(m, &layer_digest);
    let config_path = scratch.join("config.json");
    std::fs::write(&config_path, &config)
        .with_context(|| format!("Cannot write {}", config_path.display()))?;
    let manifest =
        containerdisk::manifest_for(m, &image.digest, &config, (&layer_digest, layer_size));
    let blobs = vec![
        ("config", manifest.config.clone(), config_path),
        ("disk layer", manifest.layers[0].clone(), layer_path),
    ];
    Ok((manifest, blobs))
}

/// What `tag` holds now, as index entries with their platforms: nothing (no such tag), the
/// entries of an index, or one manifest of fuse's or a container image with the platform
/// its config names. Anything else is none of fuse's business: the push replaces it.
fn tag_entries(client: &mut Client, tag: &str) -> Result<Vec<index::Entry>> {
    let Some((media_type, bytes)) = client.find_manifest(tag, &oci::ACCEPTED)? else {
        return Ok(Vec::new());
    };
    if media_type == oci::INDEX {
        return Ok(Index::parse(&bytes, tag)
            .map(|i| i.manifests)
            .unwrap_or_default());
    }
    if media_type != oci::MANIFEST {
        return Ok(Vec::new());
    }
    let Ok(manifest) = serde_json::from_slice::<OciManifest>(&bytes) else {
        return Ok(Vec::new());
    };
    let config = &manifest.config;
    if config.size > 4 << 20
        || (config.media_type != oci::CONFIG && config.media_type != containerdisk::CONFIG)
    {
        return Ok(Vec::new());
    }
    let mut response = client.get_blob(&config.digest)?;
    let config_bytes = response
        .body_mut()
        .with_config()
        .limit(4 << 20)
        .read_to_vec()
        .with_context(|| {
            format!(
                "Registry {}: download the config of {tag}",
                client.registry()
            )
        })?;
    if digest::of_bytes(&config_bytes) != config.digest {
        bail!(
            "Registry {}: the config of {tag} (sha256:{}) is corrupt",
            client.registry(),
            digest::short(&config.digest)
        );
    }
    let platform = if config.media_type == oci::CONFIG {
        Manifest::from_bytes(&config_bytes)
            .ok()
            .map(|m| Platform::linux(m.arch))
    } else {
        serde_json::from_slice::<Platform>(&config_bytes).ok()
    };
    Ok(vec![index::Entry {
        media_type,
        digest: digest::of_bytes(&bytes),
        size: bytes.len() as u64,
        artifact_type: manifest.artifact_type,
        platform,
        annotations: Default::default(),
    }])
}

/// Repositories of `target`'s registry that may hold the image's blobs already (where images
/// were pushed or pulled from), for the registry to mount them from rather than have them sent
/// again; at most 5, so a missing blob costs a bounded number of checks.
fn mount_sources(store: &Store, target: &Reference) -> Result<Vec<String>> {
    let prefix = format!("{}/", target.registry);
    let pulled = store.list()?.into_iter().map(|i| i.name.name);
    let mut sources: Vec<String> = store
        .pushed_repositories()?
        .into_iter()
        .chain(pulled)
        .filter_map(|r| r.strip_prefix(&prefix).map(str::to_string))
        .filter(|r| *r != target.repository)
        .collect();
    sources.sort();
    sources.dedup();
    sources.truncate(5);
    Ok(sources)
}

/// Pulls `reference` into the store under its name (`registry/repository:tag`): the parts
/// the store lacks, each checked against its digest as it streams, then the disk rebuilt and
/// checked against the image digest. Nothing is stored unless all of it matches.
/// An image index picks `arch` (the host's by default); a single manifest of another
/// architecture than an `arch` asked for is refused. The parts come [`transfer::THREADS`]
/// at a time.
pub(crate) fn pull(
    store: &Store,
    reference: &Reference,
    arch: Option<Arch>,
    connection: &Connection,
    progress: Progress<'_>,
    display: Display,
) -> Result<PullReport> {
    let what = reference.to_string();
    let mut client = connect(reference, Access::Pull, connection)?;
    let (mut media_type, mut bytes) =
        client.get_manifest(reference.manifest_reference(), &oci::ACCEPTED)?;
    let mut manifest_digest = digest::of_bytes(&bytes);
    if let Some(pinned) = &reference.digest {
        if *pinned != manifest_digest {
            bail!(
                "Registry {}: the manifest of {what} has sha256 {}, not the digest asked for: nothing was stored",
                reference.registry,
                digest::short(&manifest_digest)
            );
        }
    }
    let mut index_digest = None;
    let mut expected_arch = arch;
    if media_type == oci::INDEX {
        let wanted = arch.unwrap_or_else(Arch::host);
        let picked;
        (media_type, bytes, picked) = picked_manifest(&mut client, &bytes, wanted, &what)?;
        index_digest = Some(std::mem::replace(&mut manifest_digest, picked));
        expected_arch = Some(wanted);
    }
    let oci_manifest = OciManifest::parse(&media_type, &bytes, &what)?;
    let image_digest = oci_manifest.image_digest(&what)?.to_string();

    let scratch = store.temp_dir()?;
    let mut report = PullReport {
        image: reference.local_name().to_string(),
        manifest_digest,
        index_digest,
        image_digest: image_digest.clone(),
        bytes_received: bytes.len() as u64,
        blobs_received: 0,
        blobs_reused: 0,
    };
    let config_path = scratch.path().join("config.json");
    if oci_manifest.config.size > 4 << 20 {
        bail!(
            "{what}: its config is {} bytes, more than a fuse manifest",
            oci_manifest.config.size
        );
    }
    download(
        &mut client,
        &what,
        "config",
        &oci_manifest.config,
        &config_path,
        &|_| {},
        progress,
    )?;
    report.bytes_received += oci_manifest.config.size;
    report.blobs_received += 1;
    let config = std::fs::read(&config_path)?;
    let manifest = Manifest::from_bytes(&config)
        .with_context(|| format!("{what}: its config is not a fuse image manifest"))?;
    if let Some(wanted) = expected_arch.filter(|a| *a != manifest.arch) {
        bail!(
            "{what} is an image for {}, not {}: nothing was stored",
            manifest.arch.as_str(),
            wanted.as_str()
        );
    }
    let layers = oci_manifest.layers(&manifest, &what)?;

    // Parts the store has intact are used from it; the others are fetched into scratch.
    let mut fetched: Vec<PathBuf> = Vec::new();
    let mut paths: Vec<PathBuf> = Vec::new();
    let mut downloads = Vec::new();
    for (title, layer, stored) in [
        ("kernel", &layers.kernel, true),
        ("initrd", &layers.initrd, true),
        ("efi-stub", &layers.efi_stub, false),
        ("rootfs", &layers.rootfs, true),
        ("appfs", &layers.appfs, true),
    ] {
        if stored && store.check_blob(&layer.digest)? == BlobCheck::Intact {
            report.blobs_reused += 1;
            paths.push(store.blob_path(&layer.digest));
            continue;
        }
        let path = scratch.path().join(title);
        downloads.push((title, layer, path.clone()));
        report.bytes_received += layer.size;
        report.blobs_received += 1;
        if stored {
            fetched.push(path.clone());
        }
        paths.push(path);
    }
    let meter = Meter::new(
        "pulling",
        downloads.iter().map(|(_, l, _)| l.size).collect(),
        display,
        progress,
    );
    meter
        .run(|| {
            transfer::parallel(&client, downloads.len(), |client, i| {
                let (title, layer, path) = &downloads[i];
                let tick = |n: u64| meter.set(i, n);
                download(client, &what, title, layer, path, &tick, &|l| meter.say(l))
            })
        })
        .0?;
    let stub = std::fs::read(&paths[2])?;
    let disk_file = scratch.path().join("disk.raw");
    let rebuilt = disk::rebuild(
        &manifest, &stub, &paths[0], &paths[1], &paths[3], &paths[4], &disk_file,
    )?;
    if rebuilt != image_digest {
        bail!(
            "{what}: its parts rebuild a disk of sha256 {}, not the image digest {} its manifest names: nothing was stored",
            digest::short(&rebuilt),
            digest::short(&image_digest)
        );
    }
    for path in fetched {
        store.put_file(&path)?;
    }
    let disk = store.put_file(&disk_file)?;
    store.tag_as(&manifest, &disk, &reference.local_name())?;
    Ok(report)
}

/// The manifest for `arch` of the image index `index` (of `what`): its media type, bytes and
/// digest, which is checked to be the one the index names.
fn picked_manifest(
    client: &mut Client,
    index: &[u8],
    arch: Arch,
    what: &str,
) -> Result<(String, Vec<u8>, String)> {
    let entry = Index::parse(index, what)?.pick(arch, what)?.clone();
    let (media_type, bytes) = client.get_manifest(&entry.digest, &oci::ACCEPTED)?;
    if digest::of_bytes(&bytes) != entry.digest {
        bail!(
            "Registry {}: the {} manifest of {what} does not have the digest its index names ({})",
            client.registry(),
            arch.as_str(),
            digest::short(&entry.digest)
        );
    }
    Ok((media_type, bytes, entry.digest))
}

/// Streams blob `blob` into `path` (through a temp file renamed at the end), hashing as it
/// goes: a blob whose bytes are not its digest is refused, naming it. A connection that drops
/// mid-blob is tried again (the client's tries for the request itself come first). `tick`
/// hears how many bytes have come.
fn download(
    client: &mut Client,
    what: &str,
    title: &str,
    blob: &Descriptor,
    path: &Path,
    tick: &dyn Fn(u64),
    progress: Progress<'_>,
) -> Result<()> {
    let label = format!("pulling {title} {}", digest::short(&blob.digest));
    let mut tries = 0;
    loop {
        tries += 1;
        let response = client.get_blob(&blob.digest)?;
        let dir = path.parent().unwrap_or(Path::new("."));
        let mut tmp = tempfile::NamedTempFile::new_in(dir)
            .with_context(|| format!("Cannot write in {}", dir.display()))?;
        let mut hasher = Sha256::new();
        let mut received = 0u64;
        let short = format!("sha256:{}", digest::short(&blob.digest));
        let mut reader = response.into_body().into_reader();
        let mut buf = vec![0u8; 1 << 16];
        let dropped = loop {
            let n = match reader.read(&mut buf) {
                Ok(0) => break None,
                Ok(n) => n,
                Err(e) => break Some(e),
            };
            received += n as u64;
            if received > blob.size {
                bail!(
                    "Registry {}: blob {short} ({title}) of {what} is corrupt: more than its {} bytes: nothing was stored",
                    client.registry(),
                    blob.size
                );
            }
            hasher.update(&buf[..n]);
            tmp.write_all(&buf[..n])
                .with_context(|| format!("Cannot write {}", path.display()))?;
            tick(received);
        };
        if let Some(e) = dropped {
            if tries < 3 {
                progress(&format!(
                    "{label}: the connection dropped ({e}), trying again"
                ));
                continue;
            }
            bail!(
                "Registry {}: download blob {short} ({title}): the connection dropped ({e}) after {tries} tries",
                client.registry()
            );
        }
        let actual = format!("sha256:{}", hex::encode(hasher.finalize()));
        if received != blob.size || actual != blob.digest {
            bail!(
                "Registry {}: blob {short} ({title}) of {what} is corrupt: its {received} bytes have sha256 {}, not the {} bytes of its digest: nothing was stored",
                client.registry(),
                digest::short(&actual),
                blob.size
            );
        }
        tmp.persist(path)
            .with_context(|| format!("Cannot write {}", path.display()))?;
        return Ok(());
    }
}

/// Checks `credentials` against `registry` (`host[:port]`), then saves them where the Docker
/// config keeps them; returns where that is.
pub(crate) fn login(
    registry: &str,
    credentials: credentials::Credentials,
    connection: &Connection,
) -> Result<String> {
    let target = Reference {
        registry: registry.to_string(),
        repository: String::new(),
        tag: None,
        digest: None,
    };
    Client::connect(&target, Access::Pull, connection, Some(credentials.clone()))
        .with_context(|| format!("Login to {registry} failed"))?;
    credentials::store(&credentials::config_path()?, registry, &credentials)
}

/// Forgets the credentials for `registry`; whether there were any.
pub(crate) fn logout(registry: &str) -> Result<bool> {
    credentials::erase(&credentials::config_path()?, registry)
}

/// A registry as `fuse login` takes it (`host[:port]`, with or without `https://`), as the
/// Docker config names it (`docker.io` for Docker Hub).
pub(crate) fn registry_name(text: &str) -> Result<String> {
    let host = text
        .strip_prefix("https://")
        .or_else(|| text.strip_prefix("http://"))
        .unwrap_or(text)
        .trim_end_matches('/');
    let host = host.split('/').next().unwrap_or(host);
    let parsed = Reference::parse(&format!("{host}/x")).map_err(|_| {
        anyhow::anyhow!(
            "'{text}' is not a registry host: write HOST[:PORT], e.g. registry.example.com:5000"
        )
    })?;
    Ok(parsed.registry)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn login_takes_a_registry_as_docker_login_does() {
        assert_eq!(
            registry_name("reg.example.com:5000").unwrap(),
            "reg.example.com:5000"
        );
        assert_eq!(
            registry_name("https://reg.example.com/").unwrap(),
            "reg.example.com"
        );
        assert_eq!(registry_name("index.docker.io").unwrap(), "docker.io");
        assert_eq!(registry_name("localhost:5000").unwrap(), "localhost:5000");
        for bad in ["team", "-x.io", "reg.io:0"] {
            let err = registry_name(bad).unwrap_err().to_string();
            assert!(err.contains("is not a registry host"), "{bad}: {err}");
        }
    }
}
