//! The registry commands: `fuse push`, `pull`, `login`, `logout`, and the pull that `fuse run`,
//! `test` and `inspect` make when given a registry reference not in the store (as `docker run`
//! does).

use super::print::progress_line;
use crate::image::store::Store;
use crate::registry::client::Connection;
use crate::registry::containerdisk::DiskFormat;
use crate::registry::credentials::Credentials;
use crate::registry::reference::{is_remote, Reference};
use crate::registry::referrers::{Artifact, Subject};
use crate::registry::transfer::Display;
use crate::registry::PushFormat;
use anyhow::{bail, Context, Result};
use clap::Args;
use fuse_rootfs::Arch;
use serde_json::json;
use std::io::{IsTerminal, Read};
use std::path::{Path, PathBuf};

/// How to reach a registry.
#[derive(Debug, Clone, Default, Args)]
pub(super) struct RegistryFlags {
    /// Allow plain HTTP, and any TLS certificate, for a registry not on localhost.
    #[arg(long)]
    insecure: bool,
    /// A PEM CA certificate to trust for the registry, besides the system's.
    #[arg(long, value_name = "FILE")]
    ca_cert: Option<PathBuf>,
}

impl From<&RegistryFlags> for Connection {
    fn from(f: &RegistryFlags) -> Self {
        Connection {
            insecure: f.insecure,
            ca_cert: f.ca_cert.clone(),
        }
    }
}

#[derive(Debug, Args)]
pub(super) struct PushArgs {
    /// The image (name[:version] or digest).
    image: String,
    /// Where to: HOST[:PORT]/REPOSITORY[:TAG] (TAG defaults to latest). Without it: the
    /// repository this image name was last pushed to, else the `repository` of the
    /// fuse.toml it was built from, tagged with the image's version.
    reference: Option<String>,
    /// Push a KubeVirt containerDisk (a container image holding the disk as /disk/disk.qcow2
    /// or /disk/disk.img) instead of fuse's image artifact.
    #[arg(long)]
    containerdisk: bool,
    /// With --containerdisk: the disk's format, qcow2 (default) or raw.
    #[arg(long, value_name = "FORMAT", value_parser = super::args::parse::<DiskFormat>)]
    disk_format: Option<DiskFormat>,
    /// Also attach the image's SPDX SBOM (`fuse sbom`) to the pushed manifest, as an OCI 1.1
    /// artifact (`application/spdx+json`), listed by the referrers API or, where the registry
    /// has none, under the tag `sha256-<hex of the manifest digest>`.
    #[arg(long)]
    sbom: bool,
    #[command(flatten)]
    registry: RegistryFlags,
    /// Machine-readable output: digest, bytes sent, blobs sent and skipped.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Args)]
pub(super) struct PullArgs {
    /// HOST[:PORT]/REPOSITORY[:TAG|@sha256:DIGEST].
    reference: String,
    /// From an image index (several architectures under one tag), the image for this
    /// architecture: x86_64 or aarch64 (default: the host's).
    #[arg(long, value_parser = super::args::parse::<Arch>)]
    arch: Option<Arch>,
    #[command(flatten)]
    registry: RegistryFlags,
    /// Machine-readable output: digests, bytes received, blobs received and reused.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Args)]
pub(super) struct LoginArgs {
    /// The registry: HOST[:PORT].
    registry: String,
    /// User name.
    #[arg(long, short)]
    username: Option<String>,
    /// Read the password (or token) from standard input; it is never taken as an argument.
    #[arg(long)]
    password_stdin: bool,
    #[command(flatten)]
    flags: RegistryFlags,
}

/// Progress on stderr, or nothing (for --json).
fn progress(quiet: bool) -> impl Fn(&str) + Sync {
    move |line: &str| {
        if !quiet {
            progress_line(line)
        }
    }
}

/// A progress bar on a terminal; lines elsewhere, or for --json (where they are not printed).
fn display(json: bool) -> Display {
    if !json && std::io::stderr().is_terminal() {
        Display::Bar
    } else {
        Display::Lines
    }
}

pub(super) fn push(args: PushArgs) -> Result<i32> {
    let given = args
        .reference
        .as_deref()
        .map(Reference::parse)
        .transpose()?;
    check_ca_cert(&args.registry)?;
    let format = match (args.containerdisk, args.disk_format) {
        (false, None) => PushFormat::Image,
        (false, Some(_)) => {
            bail!("--disk-format is the format of a containerDisk: add --containerdisk")
        }
        (true, format) => PushFormat::ContainerDisk(format.unwrap_or(DiskFormat::Qcow2)),
    };
    let store = Store::open_default()?;
    let image = store.find(&args.image)?.with_context(|| {
        format!(
            "No image named '{}' in the store: see `fuse ls`",
            args.image
        )
    })?;
    let reference = match given {
        Some(r) => r,
        None => {
            // The last push wins over the fuse.toml: a push elsewhere is deliberate.
            let repository = store
                .pushed_repository(&image.name.name)
                .or_else(|| store.configured_repository(&image.name.name))
                .with_context(|| {
                    format!(
                        "Image {} was never pushed and its fuse.toml sets no `repository`: say where, `fuse push {} HOST[:PORT]/REPOSITORY[:TAG]` (remembered for its next push)",
                        image.name, image.name
                    )
                })?;
            Reference::parse(&format!("{repository}:{}", image.name.version))?
        }
    };
    // Made before the push: an image whose SBOM cannot be made is not pushed half-way.
    let sbom = match args.sbom {
        true => {
            let bytes =
                crate::image::sbom::generate(&store, &image, &crate::image::sbom::this_tool())?;
            let dir = store.temp_dir()?;
            let path = dir.path().join("sbom.spdx.json");
            std::fs::write(&path, bytes)
                .with_context(|| format!("Cannot write {}", path.display()))?;
            Some((dir, path))
        }
        false => None,
    };
    let connection = Connection::from(&args.registry);
    let report = crate::registry::push(
        &store,
        &image,
        &reference,
        format,
        &connection,
        &progress(args.json),
        display(args.json),
    )?;
    let sbom_digest = match &sbom {
        Some((_, path)) => Some(crate::registry::referrers::attach(
            &reference,
            &connection,
            &Subject::manifest(&report.manifest_digest, report.manifest_size),
            &Artifact {
                artifact_type: crate::registry::referrers::SPDX_JSON,
                path,
                title: "sbom.spdx.json",
                created: &image.manifest.created(),
            },
        )?),
        None => None,
    };
    store.set_pushed_repository(
        &image.name.name,
        &format!("{}/{}", reference.registry, reference.repository),
    )?;
    if args.json {
        println!(
            "{}",
            json!({
                "reference": report.reference,
                "digest": report.manifest_digest,
                "index_digest": report.index_digest,
                "platforms": report.platforms,
                "image_digest": report.image_digest,
                "bytes_sent": report.bytes_sent,
                "blobs_sent": report.blobs_sent,
                "blobs_skipped": report.blobs_skipped,
                "blobs_mounted": report.blobs_mounted,
                "uploads_restarted": report.uploads_restarted,
                "uploads_resumed": report.uploads_resumed,
                "sbom_digest": sbom_digest,
            })
        );
    } else {
        progress_line(&format!(
            "pushed {} as {} ({} blobs sent, {} already there, {} mounted from other repositories, {})",
            image.name,
            report.reference,
            report.blobs_sent,
            report.blobs_skipped,
            report.blobs_mounted,
            crate::host::fs::human_size(report.bytes_sent)
        ));
        if report.uploads_resumed + report.uploads_restarted > 0 {
            progress_line(&format!(
                "after failures: {} blob uploads resumed where the registry had got to, {} started again",
                report.uploads_resumed, report.uploads_restarted
            ));
        }
        if let Some(d) = &sbom_digest {
            progress_line(&format!(
                "attached its SBOM to {}: {d}",
                report.manifest_digest
            ));
        }
        if let Some(index) = &report.index_digest {
            progress_line(&format!(
                "{} is an image index of {}: {index}",
                report.reference,
                report.platforms.join(", ")
            ));
        }
        println!("{}", report.manifest_digest);
    }
    Ok(0)
}

pub(super) fn pull(args: PullArgs) -> Result<i32> {
    let reference = Reference::parse(&args.reference)?;
    check_ca_cert(&args.registry)?;
    let store = Store::open_default()?;
    let report = crate::registry::pull(
        &store,
        &reference,
        args.arch,
        &Connection::from(&args.registry),
        &progress(args.json),
        display(args.json),
    )?;
    if args.json {
        println!(
            "{}",
            json!({
                "image": report.image,
                "digest": report.image_digest,
                "manifest_digest": report.manifest_digest,
                "index_digest": report.index_digest,
                "bytes_received": report.bytes_received,
                "blobs_received": report.blobs_received,
                "blobs_reused": report.blobs_reused,
            })
        );
    } else {
        println!("{} {}", report.image, report.image_digest);
    }
    Ok(0)
}

pub(super) fn login(args: LoginArgs) -> Result<i32> {
    let registry = crate::registry::registry_name(&args.registry)?;
    check_ca_cert(&args.flags)?;
    let Some(username) = args.username.filter(|u| !u.is_empty()) else {
        bail!("Give the user name with --username USER (and the password on stdin with --password-stdin)");
    };
    if !args.password_stdin {
        bail!("Give the password on standard input with --password-stdin (fuse never takes a password as an argument), e.g. `printenv REGISTRY_PASSWORD | fuse login {registry} -u {username} --password-stdin`");
    }
    let mut password = String::new();
    std::io::stdin()
        .read_to_string(&mut password)
        .context("Cannot read the password from standard input")?;
    let password = password
        .strip_suffix('\n')
        .map(|p| p.strip_suffix('\r').unwrap_or(p))
        .unwrap_or(&password)
        .to_string();
    if password.is_empty() {
        bail!("The password on standard input is empty");
    }
    let saved = crate::registry::login(
        &registry,
        Credentials { username, password },
        &Connection::from(&args.flags),
    )?;
    println!("Login to {registry} succeeded (credentials saved in {saved})");
    Ok(0)
}

pub(super) fn logout(registry: &str) -> Result<i32> {
    let registry = crate::registry::registry_name(registry)?;
    if crate::registry::logout(&registry)? {
        println!("Logged out of {registry}");
    } else {
        println!("Not logged in to {registry}");
    }
    Ok(0)
}

fn check_ca_cert(flags: &RegistryFlags) -> Result<()> {
    if let Some(path) = &flags.ca_cert {
        if !path.is_file() {
            bail!("--ca-cert {}: no such file", path.display());
        }
    }
    Ok(())
}

/// `target` as the store knows it: a registry reference not in the store is pulled first
/// (and named `registry/repository:tag` there); a path or a local name is left as it is.
/// With `arch`, a stored image of another architecture is pulled again (for that one).
pub(super) fn ensure_local(
    store: &Store,
    target: &str,
    flags: &RegistryFlags,
    arch: Option<Arch>,
) -> Result<String> {
    if Path::new(target).exists() || !is_remote(target) {
        return Ok(target.to_string());
    }
    let reference = Reference::parse(target)?;
    let local = reference.local_name();
    let why = match store.find_name(&local)? {
        Some(stored) if arch.is_none_or(|a| a == stored.manifest.arch) => {
            return Ok(local.to_string())
        }
        Some(stored) => format!(
            "is stored for {}, not {}",
            stored.manifest.arch.as_str(),
            arch.map_or("", |a| a.as_str())
        ),
        None => "is not in the store".to_string(),
    };
    check_ca_cert(flags)?;
    progress_line(&format!("{target} {why}: pulling it"));
    let report = crate::registry::pull(
        store,
        &reference,
        arch,
        &Connection::from(flags),
        &progress(false),
        display(false),
    )?;
    progress_line(&format!("pulled {} {}", report.image, report.image_digest));
    Ok(local.to_string())
}
