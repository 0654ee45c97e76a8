//! The image commands: `fuse build`, `ls`, `rm`, `inspect`, `verify`, `export`,
//! `kernel build`, and how `fuse run`/`fuse test` turn their target into a stored image.

use super::args::parse;
use super::args::{BuildFlags, SelectionFlags, TargetArgs};
use super::print::progress_line;
use crate::host::digest;
use crate::host::fs::human_size;
use crate::host::kernel::{self, KernelRequest};
use crate::image::disk;
use crate::image::export::{self, ExportFormat};
use crate::image::manifest::Manifest;
use crate::image::seed;
use crate::image::store::{Store, StoredImage};
use crate::run::instances::Instance;
use anyhow::{bail, Context, Result};
use clap::Args;
use fuse_boot::disk as boot_disk;
use fuse_rootfs::Arch;
use serde_json::json;
use std::path::Path;
use std::path::PathBuf;

#[derive(Debug, Args)]
pub(super) struct BuildArgs {
    /// The app: an ELF executable, an executable jar, a Node.js (.js) or Python (.py) script,
    /// or an app directory (with package.json, __main__.py or pyproject.toml).
    pub(super) app: PathBuf,
    #[command(flatten)]
    build: BuildFlags,
    /// Machine-readable output.
    #[arg(long)]
    json: bool,
    /// Also write the disk to --output in this format (as `fuse export`).
    #[arg(long, requires = "output", value_parser = parse::<crate::image::export::ExportFormat>)]
    format: Option<crate::image::export::ExportFormat>,
    /// Where --format writes the disk.
    #[arg(long, short, requires = "format")]
    output: Option<PathBuf>,
}

/// The image `target` names: a path to an app is built with `build`'s flags (cheap when
/// nothing changed), a registry reference not in the store is pulled first (for `build`'s
/// architecture, if given), anything else is looked up in the store.
pub(super) fn resolve(
    store: &Store,
    target: &str,
    build: &BuildFlags,
    registry: &super::registry::RegistryFlags,
) -> Result<StoredImage> {
    let target = &super::registry::ensure_local(store, target, registry, build.target.arch)?;
    let path = Path::new(target);
    if path.exists() {
        return crate::build::build(store, &build.request(path.to_path_buf()), &mut |l| {
            progress_line(l)
        });
    }
    store.find(target)?.with_context(|| {
        format!("No app file or image named '{target}': give the path of an app, or an image from `fuse ls`")
    })
}

pub(super) fn build(args: BuildArgs) -> Result<i32> {
    let store = Store::open_default()?;
    let image = crate::build::build(&store, &args.build.request(args.app.clone()), &mut |l| {
        progress_line(l)
    })?;
    let size = image.manifest.total_size();
    let disk = disk::verified_disk_path(&store, &image)?;
    let disk_size = std::fs::metadata(&disk)?.len();
    if let (Some(format), Some(output)) = (args.format, &args.output) {
        export::export(&disk, format, output)?;
    }
    if args.json {
        println!(
            "{}",
            json!({
                "image": image.name.to_string(),
                "digest": image.digest,
                "size": size,
                "disk_size": disk_size,
                "arch": image.manifest.arch.as_str(),
            })
        );
    } else {
        println!("{} {} {}", image.name, image.digest, human_size(disk_size));
    }
    Ok(0)
}

pub(super) fn list(json_output: bool) -> Result<i32> {
    let images = Store::open_default()?.list()?;
    if json_output {
        let rows: Vec<_> = images
            .iter()
            .map(|i| {
                json!({
                    "image": i.name.to_string(),
                    "digest": i.digest,
                    "arch": i.manifest.arch.as_str(),
                    "size": i.manifest.total_size(),
                })
            })
            .collect();
        println!("{}", serde_json::Value::Array(rows));
        return Ok(0);
    }
    println!(
        "{:<32} {:<14} {:<8} {:>10}",
        "IMAGE", "DIGEST", "ARCH", "SIZE"
    );
    for i in images {
        println!(
            "{:<32} {:<14} {:<8} {:>10}",
            i.name.to_string(),
            digest::short(&i.digest),
            i.manifest.arch.as_str(),
            human_size(i.manifest.total_size())
        );
    }
    Ok(0)
}

fn find(store: &Store, reference: &str) -> Result<StoredImage> {
    store
        .find(reference)?
        .ok_or_else(|| not_in_store(reference))
}

fn not_in_store(reference: &str) -> anyhow::Error {
    anyhow::anyhow!("No image '{reference}' in the store: see `fuse ls`")
}

/// `fuse sbom IMAGE [-o FILE]`: made from the stored image, or (for a registry reference not
/// in the store) the one pushed with it, as it was pushed.
pub(super) fn sbom(
    reference: &str,
    output: Option<&Path>,
    registry: &super::registry::RegistryFlags,
) -> Result<i32> {
    let store = Store::open_default()?;
    let bytes = match store.find(reference)? {
        Some(image) => {
            crate::image::sbom::generate(&store, &image, &crate::image::sbom::this_tool())?
        }
        None if crate::registry::reference::is_remote(reference) => {
            crate::registry::referrers::fetch(
                &crate::registry::reference::Reference::parse(reference)?,
                Arch::host(),
                &registry.into(),
                crate::registry::referrers::SPDX_JSON,
            )?
        }
        None => return Err(not_in_store(reference)),
    };
    match output {
        Some(path) => {
            std::fs::write(path, &bytes).with_context(|| format!("Writing {}", path.display()))?
        }
        None => std::io::Write::write_all(&mut std::io::stdout().lock(), &bytes)?,
    }
    Ok(0)
}

/// `fuse rm [--force] IMAGE...`.
pub(super) fn remove(images: &[String], force: bool) -> Result<i32> {
    let store = Store::open_default()?;
    let running = if force {
        Vec::new()
    } else {
        crate::run::instances::list(false)?
    };
    for reference in images {
        let image = find(&store, reference)?;
        if !force {
            check_unused(&store, &image, &running)?;
        }
        let freed = store.remove(&image)?;
        println!("removed {} ({} freed)", image.name, human_size(freed));
    }
    Ok(0)
}

/// Refuses to remove an image that a running VM boots: a detached instance started from it
/// (named by id), or any other QEMU whose command line names its disk (a `fuse run` in the
/// foreground, `fuse test`).
fn check_unused(store: &Store, image: &StoredImage, running: &[Instance]) -> Result<()> {
    let ids: Vec<&str> = running
        .iter()
        .filter(|i| i.state.digest == image.digest)
        .map(|i| i.state.id.as_str())
        .collect();
    if !ids.is_empty() {
        let noun = if ids.len() == 1 {
            "instance"
        } else {
            "instances"
        };
        let ids = ids.join(" ");
        bail!(
            "Image {} is used by running {noun} {ids}: stop it with `fuse kill {ids}`, or remove the image anyway with `fuse rm --force`",
            image.name
        );
    }
    let qemus = crate::host::process::qemus_naming(&store.blob_path(&image.digest));
    if let Some(pid) = qemus.first() {
        bail!(
            "Image {} is used by a running VM (QEMU pid {pid}, a `fuse run` or `fuse test`): stop it, or remove the image anyway with `fuse rm --force`",
            image.name
        );
    }
    Ok(())
}

/// The image (or disk file) `reference` names: its name, digest, manifest and disk.
fn open_target(
    store: &Store,
    reference: &str,
) -> Result<(String, String, Manifest, fuse_boot::disk::Disk)> {
    let target = disk::resolve(store, reference)?;
    let disk = fuse_boot::disk::read_disk(&target.path)?;
    Ok(match target.image {
        Some(image) => (image.name.to_string(), image.digest, image.manifest, disk),
        None => {
            let m = disk::manifest_of(&disk)?;
            let d = fuse_boot::disk::file_digest(&target.path)?;
            (m.reference(), d, m, disk)
        }
    })
}

pub(super) fn inspect(
    reference: &str,
    json_output: bool,
    registry: &super::registry::RegistryFlags,
) -> Result<i32> {
    let store = Store::open_default()?;
    let reference = &super::registry::ensure_local(&store, reference, registry, None)?;
    let (name, image_digest, manifest, disk) = open_target(&store, reference)?;
    let m = &manifest;
    if json_output {
        let mut value = serde_json::to_value(m)?;
        value["image"] = json!(name);
        value["digest"] = json!(image_digest);
        value["size"] = json!(m.total_size());
        value["disk"] = layout_json(&disk);
        println!("{}", serde_json::to_string_pretty(&value)?);
        return Ok(0);
    }
    println!("Image:    {name}");
    println!("Digest:   {image_digest}");
    println!("Arch:     {}", m.arch);
    println!("Size:     {}", human_size(m.total_size()));
    println!("Cmdline:  {}", m.cmdline);
    print_layout(&disk);
    println!("Components:");
    println!(
        "  {:<8} {:>10}  {}  (Linux {})",
        "kernel",
        human_size(m.kernel.size),
        digest::short(&m.kernel.digest),
        m.kernel.release
    );
    println!(
        "  {:<8} {:>10}  {}",
        "init",
        human_size(m.init.size),
        digest::short(&m.init.digest)
    );
    println!(
        "  {:<8} {:>10}  {}  ({}, {} files, {} uncompressed)",
        "rootfs",
        human_size(m.rootfs.size),
        digest::short(&m.rootfs.digest),
        m.rootfs.format,
        m.contents.files,
        human_size(m.contents.bytes)
    );
    println!(
        "  {:<8} {:>10}  {}  (/app)",
        "appfs",
        human_size(m.appfs.size),
        digest::short(&m.appfs.digest),
    );
    if !m.contents.parts.is_empty() {
        let parts: Vec<String> = m
            .contents
            .parts
            .iter()
            .map(|(part, bytes)| format!("{part} {}", human_size(*bytes)))
            .collect();
        println!("  {:<8} {}", "", parts.join(", "));
    }
    println!("App ({}):", m.app.kind);
    println!("  exe:  {}", m.app.exe);
    println!("  args: {:?}", m.app.args);
    println!("  cwd:  {}", m.app.cwd);
    println!("  env:  {}", m.app.env.join(" "));
    if let Some(caps) = &m.app.capabilities {
        let caps = if caps.is_empty() {
            "none".to_string()
        } else {
            caps.join(", ")
        };
        println!("  capabilities (root): {caps}");
    }
    if !m.config.environments.is_empty() {
        println!(
            "Environments: {} (default {})",
            m.config.environments.join(", "),
            m.config.default_environment.as_deref().unwrap_or("none")
        );
    }
    if !m.notes.is_empty() {
        println!("Runtime:");
        for (key, value) in &m.notes {
            println!("  {key}: {value}");
        }
    }
    println!("Largest files:");
    for f in &m.contents.largest {
        println!("  {:>10}  {}", human_size(f.size), f.path);
    }
    Ok(0)
}

pub(super) fn verify(reference: &str, json_output: bool) -> Result<i32> {
    let store = Store::open_default()?;
    let target = disk::resolve(&store, reference)?;
    // The manifest: the store's for an image (checked against the disk's .fuse), else the
    // disk's own.
    let (manifest, manifest_digest, disk_digest) = match &target.image {
        Some(image) => (
            image.manifest.clone(),
            Some(image.manifest.digest()),
            Some(image.digest.clone()),
        ),
        None => {
            let disk = fuse_boot::disk::read_disk_any(&target.path).with_context(|| {
                format!(
                    "Cannot read the manifest of {} to verify against",
                    target.path.display()
                )
            })?;
            (disk::manifest_of(&disk)?, None, None)
        }
    };
    let mut expected = disk::expected(Some(&store), &manifest, disk_digest.as_deref());
    expected.manifest_digest = manifest_digest;
    let problems = fuse_boot::disk::verify::verify(&target.path, &expected)?;
    if json_output {
        let rows: Vec<_> = problems
            .iter()
            .map(|p| {
                json!({
                    "part": p.part,
                    "disk_offset": p.disk_offset,
                    "part_offset": p.part_offset,
                    "problem": p.what,
                })
            })
            .collect();
        println!(
            "{}",
            json!({"disk": target.path, "ok": problems.is_empty(), "problems": rows})
        );
    } else if problems.is_empty() {
        println!(
            "{}: ok (GPT, ESP, UKI sections .linux .initrd .cmdline .fuse, root and app partitions, their dm-verity trees)",
            target.path.display()
        );
    }
    if problems.is_empty() {
        return Ok(0);
    }
    for p in &problems {
        eprintln!("fuse: corrupt: {p}");
    }
    anyhow::bail!(
        "{} is damaged ({} problem{}): rebuild or re-download it",
        target.path.display(),
        problems.len(),
        if problems.len() == 1 { "" } else { "s" }
    )
}

/// What `fuse export --format` writes: the image's disk in a format, or a NoCloud seed disk
/// (`crate::image::seed`), which is not the image but one deployment's configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum ExportTarget {
    Disk(ExportFormat),
    NoCloud,
}

impl std::str::FromStr for ExportTarget {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        if s == "nocloud" {
            return Ok(ExportTarget::NoCloud);
        }
        s.parse::<ExportFormat>()
            .map(ExportTarget::Disk)
            .map_err(|_| format!("unknown format '{s}': use raw, qcow2, vmdk, vhd or nocloud"))
    }
}

pub(super) fn export(
    reference: &str,
    target: ExportTarget,
    output: &std::path::Path,
    selection: &SelectionFlags,
) -> Result<i32> {
    let format = match target {
        ExportTarget::NoCloud => return export_seed(reference, output, selection),
        ExportTarget::Disk(format) => format,
    };
    if !selection.is_empty() {
        bail!(
            "--env, -e, --env-file and arguments configure a deployment: they go in a seed disk (--format nocloud), not in the image's disk ({} writes the image, the same for every deployment)",
            format.as_str()
        );
    }
    let store = Store::open_default()?;
    let target = disk::resolve(&store, reference)?;
    if let Some(image) = &target.image {
        disk::verified_disk_path(&store, image)?;
    }
    export::export(&target.path, format, output)?;
    println!("{} {}", output.display(), format.as_str());
    Ok(0)
}

/// The stored image a deployment's configuration is made for (not a disk file: its
/// environments and digest are in the store's manifest).
fn deployed_image(store: &Store, reference: &str) -> Result<StoredImage> {
    store.find(reference)?.with_context(|| {
        format!("No image '{reference}' in the store: give an image from `fuse ls` (name[:version] or digest)")
    })
}

/// `fuse export --format nocloud`: the seed disk of one deployment.
fn export_seed(reference: &str, output: &Path, flags: &SelectionFlags) -> Result<i32> {
    let selection = flags.selection()?;
    let store = Store::open_default()?;
    let image = deployed_image(&store, reference)?;
    let user_data = crate::run::userdata::user_data(&image.manifest, &selection, &flags.args)?;
    let meta_data = seed::meta_data(&image.digest);
    let disk = seed::build(user_data.as_bytes(), meta_data.as_bytes())?;
    crate::host::fs::write_private(output, &disk)?;
    println!("{} nocloud", output.display());
    Ok(0)
}

/// `fuse userdata`: prints (or writes, 0600) one deployment's user-data.
pub(super) fn userdata(
    reference: &str,
    flags: &SelectionFlags,
    output: Option<&Path>,
) -> Result<i32> {
    let selection = flags.selection()?;
    let store = Store::open_default()?;
    let image = deployed_image(&store, reference)?;
    let text = crate::run::userdata::user_data(&image.manifest, &selection, &flags.args)?;
    match output {
        Some(path) => crate::host::fs::write_private(path, text.as_bytes())?,
        None => print!("{text}"),
    }
    Ok(0)
}

pub(super) fn kernel_build(target: &TargetArgs, json_output: bool) -> Result<i32> {
    let kernel = kernel::ensure(&KernelRequest::from(target), &mut |l| progress_line(l))?;
    if json_output {
        println!("{}", serde_json::to_string(&kernel)?);
    } else {
        println!(
            "{} {} {} {}",
            kernel.arch,
            kernel.release,
            kernel.digest,
            kernel.path.display()
        );
    }
    Ok(0)
}

fn type_name(guid: boot_disk::Guid) -> &'static str {
    if guid == boot_disk::ESP_TYPE {
        return "EFI System";
    }
    if guid == boot_disk::APP_TYPE {
        return "fuse app";
    }
    if guid == boot_disk::APP_VERITY_TYPE {
        return "fuse app verity";
    }
    match Arch::ALL
        .into_iter()
        .find(|a| boot_disk::root_type(*a) == guid)
    {
        Some(Arch::X86_64) => "Linux root (x86-64)",
        Some(Arch::Aarch64) => "Linux root (ARM64)",
        None => match Arch::ALL
            .into_iter()
            .find(|a| boot_disk::verity_type(*a) == guid)
        {
            Some(Arch::X86_64) => "root verity (x86-64)",
            Some(Arch::Aarch64) => "root verity (ARM64)",
            None => "unknown",
        },
    }
}

/// The layout of a disk as JSON: partitions, ESP files, UKI sections.
fn layout_json(d: &boot_disk::Disk) -> serde_json::Value {
    use serde_json::json;
    let partitions: Vec<_> = d
        .table
        .partitions
        .iter()
        .enumerate()
        .map(|(i, p)| {
            json!({
                "number": i + 1,
                "name": p.name,
                "type": p.type_guid.to_string(),
                "type_name": type_name(p.type_guid),
                "guid": p.unique_guid.to_string(),
                "offset": p.offset(),
                "size": p.size(),
                "attributes": format!("{:#018x}", p.attributes),
            })
        })
        .collect();
    let sections: Vec<_> = d
        .sections
        .iter()
        .map(|s| {
            json!({
                "name": s.name,
                "offset": s.raw_offset,
                "size": s.virtual_size,
                "virtual_address": format!("{:#x}", s.virtual_address),
                "disk_offset": d.uki_disk_offset.map(|o| o + u64::from(s.raw_offset)),
            })
        })
        .collect();
    json!({
        "size": d.size,
        "guid": d.table.disk_guid.to_string(),
        "partitions": partitions,
        "esp": {
            "fat": d.esp_fat,
            "serial": format!("{:08X}", d.esp_serial),
            "files": d.esp_files.iter().map(|(p, s)| json!({"path": p, "size": s})).collect::<Vec<_>>(),
        },
        "verity": match d.verity_root() {
            Some(Ok(v)) => json!({
                "root_hash": v.root_hash,
                "salt": v.salt,
                "data_blocks": v.data_blocks,
                "hash_partition": v.hash_partuuid,
                "hash_size": d.verity().map(|p| p.size()),
            }),
            _ => serde_json::Value::Null,
        },
        "app_verity": match d.volume_verity(boot_disk::Volume::App) {
            Some(Ok(v)) => json!({
                "root_hash": v.root_hash,
                "salt": v.salt,
                "data_blocks": v.data_blocks,
                "hash_partition": v.hash_partuuid,
                "hash_size": d.hash_partition(boot_disk::Volume::App).map(|p| p.size()),
            }),
            _ => serde_json::Value::Null,
        },
        "uki": {
            "path": d.uki_path,
            "size": d.uki.len(),
            "disk_offset": d.uki_disk_offset,
            "sections": sections,
        },
    })
}

/// The layout of a disk for people.
fn print_layout(d: &boot_disk::Disk) {
    println!(
        "Disk:     {} GPT, GUID {}",
        human_size(d.size),
        d.table.disk_guid
    );
    println!(
        "  {:<3} {:>12} {:>10}  {:<20} {:<36}  name",
        "#", "offset", "size", "type", "partition GUID"
    );
    for (i, p) in d.table.partitions.iter().enumerate() {
        println!(
            "  {:<3} {:>12} {:>10}  {:<20} {}  {}",
            i + 1,
            p.offset(),
            human_size(p.size()),
            type_name(p.type_guid),
            p.unique_guid,
            p.name
        );
    }
    match d.verity_root() {
        Some(Ok(v)) => println!(
            "Verity:   root hash {} (sha256, {} data blocks of 4 KiB, salt {})",
            v.root_hash, v.data_blocks, v.salt
        ),
        Some(Err(what)) => println!("Verity:   the command line's table is wrong: {what}"),
        None => println!("Verity:   none (the root is not verified at boot)"),
    }
    match d.volume_verity(boot_disk::Volume::App) {
        Some(Ok(v)) => println!(
            "          app root hash {} ({} data blocks, salt {})",
            v.root_hash, v.data_blocks, v.salt
        ),
        Some(Err(what)) => println!("          the command line's /app table is wrong: {what}"),
        None => println!("          no /app table (the app is not verified at boot)"),
    }
    println!("ESP:      {}, serial {:08X}", d.esp_fat, d.esp_serial);
    for (path, size) in &d.esp_files {
        println!("  {:>10}  {path}", human_size(*size));
    }
    println!(
        "UKI:      {} ({})",
        d.uki_path,
        human_size(d.uki.len() as u64)
    );
    for s in d.sections.iter() {
        println!(
            "  {:<9} {:>10}  file offset {:#x}{}",
            s.name,
            human_size(u64::from(s.virtual_size)),
            s.raw_offset,
            d.uki_disk_offset
                .map(|o| format!(", disk byte {}", o + u64::from(s.raw_offset)))
                .unwrap_or_default()
        );
    }
}
