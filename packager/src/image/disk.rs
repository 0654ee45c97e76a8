//! The image as a bootable disk: what `fuse build` stores under the image's digest, what
//! `fuse run` boots (directly, from the kernel and initramfs inside it, or through UEFI
//! firmware), and what `fuse inspect`, `fuse verify` and `fuse export` read.
//!
//! The disk itself (GPT, ESP, unified kernel image) is `fuse_boot::disk`; this module connects
//! it to the manifest and the store.

use crate::host::digest;
use crate::image::manifest::Manifest;
use crate::image::store::{BlobCheck, Store, StoredImage};
use anyhow::{bail, Context, Result};
use fuse_boot::disk::verify::Expected;
use fuse_boot::disk::{self, BootFiles};
use fuse_rootfs::verity::HashTree;
use fuse_rootfs::Arch;
use std::path::{Path, PathBuf};

/// The `.osrel` of an image's UKI: what a boot menu or `bootctl` shows.
fn osrel(manifest: &Manifest) -> String {
    format!(
        "ID=fuse\nNAME=fuse\nIMAGE_ID={}\nIMAGE_VERSION={}\nPRETTY_NAME=\"fuse {}\"\n",
        manifest.name,
        manifest.version,
        manifest.reference()
    )
}

/// Where the EFI stub for `arch` is: `$FUSE_EFI_STUB`, else systemd's from `systemd-boot-efi`.
pub(crate) fn efi_stub_path(arch: Arch) -> PathBuf {
    std::env::var_os("FUSE_EFI_STUB")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| disk::stub_path(arch))
}

/// The EFI stub the UKI is made with: not one of the image's stored parts, so a disk is
/// rebuilt from its parts only with the same stub (a pushed image carries it).
pub(crate) fn efi_stub(arch: Arch) -> Result<Vec<u8>> {
    let path = efi_stub_path(arch);
    std::fs::read(&path).with_context(|| {
        format!(
            "No EFI stub at {}: install Debian's systemd-boot-efi (bash ci/setup), or set FUSE_EFI_STUB",
            path.display()
        )
    })
}

/// The two filesystems of a disk, each with its dm-verity tree.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Volumes<'a> {
    /// The root filesystem (everything but `/app`).
    pub(crate) root: &'a Path,
    pub(crate) root_tree: &'a HashTree,
    /// The app's filesystem (`/app`).
    pub(crate) app: &'a Path,
    pub(crate) app_tree: &'a HashTree,
}

/// Writes the disk of `manifest` to `out`: the UKI (`stub` + `kernel`, `initrd`, command
/// line, os-release, manifest) on the ESP, the root and app filesystems and their dm-verity
/// trees. The same inputs give the same bytes: `fuse build` writes a disk this way, and
/// `fuse pull` rebuilds one.
pub(crate) fn assemble(
    manifest: &Manifest,
    stub: &[u8],
    kernel: &[u8],
    initrd: &[u8],
    volumes: &Volumes<'_>,
    out: &Path,
) -> Result<()> {
    let manifest_bytes = manifest.to_bytes();
    let osrel = osrel(manifest);
    disk::build_disk(
        &disk::DiskInputs {
            arch: manifest.arch,
            stub,
            kernel,
            initrd,
            cmdline: &manifest.cmdline,
            osrel: &osrel,
            manifest: &manifest_bytes,
            root: disk::VolumeInput {
                path: volumes.root,
                digest: &manifest.rootfs.digest,
                tree: volumes.root_tree,
            },
            app: disk::VolumeInput {
                path: volumes.app,
                digest: &manifest.appfs.digest,
                tree: volumes.app_tree,
            },
        },
        out,
    )
    .context("Cannot write the image's disk")?;
    Ok(())
}

/// Rebuilds the disk of `manifest` from its parts' files (the dm-verity trees computed
/// again) into `out`; returns the disk's digest.
pub(crate) fn rebuild(
    manifest: &Manifest,
    stub: &[u8],
    kernel: &Path,
    initrd: &Path,
    rootfs: &Path,
    appfs: &Path,
    out: &Path,
) -> Result<String> {
    let read = |p: &Path| std::fs::read(p).with_context(|| format!("Cannot read {}", p.display()));
    let root_tree = disk::rootfs_tree(rootfs, &manifest.rootfs.digest)
        .context("Cannot compute the root filesystem's dm-verity tree")?;
    let app_tree = disk::rootfs_tree(appfs, &manifest.appfs.digest)
        .context("Cannot compute the app filesystem's dm-verity tree")?;
    assemble(
        manifest,
        stub,
        &read(kernel)?,
        &read(initrd)?,
        &Volumes {
            root: rootfs,
            root_tree: &root_tree,
            app: appfs,
            app_tree: &app_tree,
        },
        out,
    )?;
    digest::of_file(out).with_context(|| format!("Cannot read {}", out.display()))
}

/// The disk of a stored image, checked to exist.
pub(crate) fn disk_path(store: &Store, image: &StoredImage) -> Result<PathBuf> {
    let path = store.blob_path(&image.digest);
    let is_disk = std::fs::File::open(&path)
        .and_then(|f| {
            use std::os::unix::fs::FileExt;
            let mut sig = [0u8; 8];
            f.read_exact_at(&mut sig, 512)?;
            Ok(&sig == b"EFI PART")
        })
        .unwrap_or(false);
    if !is_disk {
        bail!(
            "Image {} has no disk in the store (built by an older fuse, or its blob is gone): rebuild it with `fuse build`",
            image.name
        );
    }
    Ok(path)
}

/// The disk of a stored image, checked to hold the bytes of its digest before it is booted or
/// exported (in full once, then while the blob is unchanged, see [`Store::check_blob`]).
pub(crate) fn verified_disk_path(store: &Store, image: &StoredImage) -> Result<PathBuf> {
    let path = disk_path(store, image)?;
    match store.check_blob(&image.digest)? {
        BlobCheck::Intact => Ok(path),
        BlobCheck::Missing => bail!(
            "Image {} has no disk in the store: rebuild it with `fuse build`",
            image.name
        ),
        BlobCheck::Corrupt { actual } => bail!(
            "Image {name} is corrupt in the store: its disk {} has changed (sha256 {}, not {}): rebuild the app with `fuse build` to replace it, or remove the image with `fuse rm {name}`",
            path.display(),
            digest::short(&actual),
            digest::short(&image.digest),
            name = image.name,
        ),
    }
}

/// Kernel, initramfs and command line for direct boot, out of the image's disk (cached by the
/// disk's digest, so this is a directory lookup after the first run). The cached files are
/// checked against the manifest's digests (hashed when their files changed since the last
/// check) and extracted again when wrong: a damaged cache entry must never boot.
pub(crate) fn boot_files(store: &Store, image: &StoredImage) -> Result<BootFiles> {
    let path = verified_disk_path(store, image)?;
    let dir = crate::host::paths::cache_dir()
        .join("boot")
        .join(digest::hex_part(&image.digest));
    let extract = || {
        disk::extract_boot(&path, &dir).with_context(|| {
            format!(
                "Cannot read the boot files out of the disk of {}",
                image.name
            )
        })
    };
    let files = extract()?;
    let m = &image.manifest;
    let Some(what) = boot_files_problem(&dir, &files, m) else {
        return Ok(files);
    };
    eprintln!(
        "fuse: the cached boot files of {} in {} are damaged ({what}): extracting them again",
        image.name,
        dir.display()
    );
    std::fs::remove_dir_all(&dir).with_context(|| format!("Cannot remove {}", dir.display()))?;
    let files = extract()?;
    if let Some(what) = boot_files_problem(&dir, &files, m) {
        bail!(
            "The boot files of {} do not match its manifest ({what}) though its disk is intact: run `fuse verify {}`",
            image.name,
            image.name
        );
    }
    Ok(files)
}

/// The record of the last check of a boot-file cache entry, in the entry.
const BOOT_CHECKED: &str = "checked";

/// What is wrong with the extracted boot `files` in `dir` for `manifest`, if anything.
fn boot_files_problem(dir: &Path, files: &BootFiles, manifest: &Manifest) -> Option<String> {
    if files.cmdline != manifest.cmdline {
        return Some("the command line differs".into());
    }
    let stamp = |p: &Path| -> Option<String> {
        use std::os::unix::fs::MetadataExt;
        let m = std::fs::metadata(p).ok()?;
        Some(format!(
            "{} {}.{} {}.{} {}",
            m.len(),
            m.mtime(),
            m.mtime_nsec(),
            m.ctime(),
            m.ctime_nsec(),
            m.ino()
        ))
    };
    let stamps = format!(
        "kernel {}\ninitrd {}\n",
        stamp(&files.kernel).unwrap_or_default(),
        stamp(&files.initrd).unwrap_or_default()
    );
    let record = dir.join(BOOT_CHECKED);
    if std::fs::read_to_string(&record).is_ok_and(|r| r == stamps) {
        return None;
    }
    for (name, file, expected) in [
        ("kernel", &files.kernel, &manifest.kernel.digest),
        ("initramfs", &files.initrd, &manifest.init.digest),
    ] {
        // A missing file is damage too: extracting again brings it back.
        let Ok(actual) = digest::of_file(file) else {
            return Some(format!("{name} is unreadable"));
        };
        if actual != *expected {
            return Some(format!(
                "{name} has sha256 {}, not {}",
                digest::short(&actual),
                digest::short(expected)
            ));
        }
    }
    // Best effort: without the record, the next run checks again.
    let _ = crate::host::fs::write_atomic(&record, stamps.as_bytes());
    None
}

/// What the disk of `manifest` must hold; blobs in `store` (when there) locate differences.
pub(crate) fn expected(
    store: Option<&Store>,
    manifest: &Manifest,
    disk_digest: Option<&str>,
) -> Expected {
    let component = |d: &str, size: u64| {
        let reference = store.map(|s| s.blob_path(d)).filter(|p| p.exists());
        Some((d.to_string(), size, reference))
    };
    Expected {
        kernel: component(&manifest.kernel.digest, manifest.kernel.size),
        initrd: component(&manifest.init.digest, manifest.init.size),
        rootfs: component(&manifest.rootfs.digest, manifest.rootfs.size),
        appfs: component(&manifest.appfs.digest, manifest.appfs.size),
        cmdline: Some(manifest.cmdline.clone()),
        manifest_digest: None,
        disk_digest: disk_digest.map(str::to_string),
    }
}

/// A disk named on the command line: a file, or an image in the store.
#[derive(Debug)]
pub(crate) struct Target {
    pub(crate) path: PathBuf,
    /// The image, when named from the store.
    pub(crate) image: Option<StoredImage>,
}

/// Resolves `DISK|IMAGE`: an existing file is a disk; anything else an image reference.
pub(crate) fn resolve(store: &Store, target: &str) -> Result<Target> {
    let path = Path::new(target);
    // A file with a GPT header is a disk; anything else (an app named like an image) is not.
    let is_gpt = std::fs::File::open(path)
        .and_then(|f| {
            use std::os::unix::fs::FileExt;
            let mut sig = [0u8; 8];
            f.read_exact_at(&mut sig, 512)?;
            Ok(&sig == b"EFI PART")
        })
        .unwrap_or(false);
    let found = if path.is_file() && is_gpt {
        None
    } else {
        store.find(target)?
    };
    // A file that is no image's name is read as a disk, damaged or not: its errors say why.
    if path.is_file() && found.is_none() {
        return Ok(Target {
            path: path.to_path_buf(),
            image: None,
        });
    }
    let image = found.with_context(|| {
        format!(
            "No disk file or image named '{target}': give a disk's path or an image from `fuse ls`"
        )
    })?;
    Ok(Target {
        path: disk_path(store, &image)?,
        image: Some(image),
    })
}

/// The manifest inside a disk's UKI.
pub(crate) fn manifest_of(disk: &disk::Disk) -> Result<Manifest> {
    let bytes = disk.section(disk::uki::FUSE).with_context(|| {
        format!(
            "{} has no .fuse section in its UKI: not a fuse disk",
            disk.path.display()
        )
    })?;
    Manifest::from_bytes(bytes)
}
