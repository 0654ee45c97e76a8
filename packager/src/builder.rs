//! `fuse build`: from an app to a stored image (kernel + init + root filesystem + manifest).

use crate::kernel::{self, KernelRequest};
use crate::layout;
use crate::manifest::{
    AppSection, Component, Contents, FileSize, KernelComponent, Manifest, RootfsComponent, SCHEMA,
};
use crate::naming;
use crate::payload;
use crate::runtimes::{self, RuntimeInput};
use crate::store::{Store, StoredImage};
use anyhow::{Context, Result};
use fuse_rootfs::Arch;
use std::path::PathBuf;

/// What to build.
#[derive(Debug, Clone)]
pub struct BuildRequest {
    pub input: PathBuf,
    /// `name[:version]` overriding the name derived from the input file.
    pub name: Option<String>,
    /// Target arch; `None` means the host's.
    pub arch: Option<Arch>,
    pub kernel_source: Option<PathBuf>,
}

/// The kernel command line of an image. `quiet loglevel=1` keeps the console to the app's output
/// (panics still print); `panic=-1` turns a panic into an immediate reboot, which ends the VM.
pub fn kernel_cmdline(arch: Arch) -> String {
    let console = match arch {
        Arch::X86_64 => "ttyS0",
        Arch::Aarch64 => "ttyAMA0",
    };
    format!(
        "console={console} quiet loglevel=1 panic=-1 rdinit=/init fuse.root=/dev/vda fuse.rootfstype=squashfs"
    )
}

/// Builds the image for `request` into `store`. `progress` gets human-readable lines.
pub fn build(
    store: &Store,
    request: &BuildRequest,
    progress: &mut dyn FnMut(&str),
) -> Result<StoredImage> {
    let input = &request.input;
    let kind = payload::detect(input)?;
    let name = match &request.name {
        Some(n) => naming::parse(n).context("Invalid --name")?,
        None => naming::from_input(input)?,
    };
    let arch = request.arch.unwrap_or_else(Arch::host);

    // The app first: its errors (missing library, wrong arch) are the likeliest and cheapest.
    let app = runtimes::assemble(
        kind,
        &RuntimeInput {
            input,
            name: &name,
            arch,
        },
        progress,
    )?;
    let mut tree = app.tree;
    let spec = app.spec;
    tree.add_bytes(layout::SPEC_PATH, spec.try_encode()?, 0o644)?;

    let kernel = kernel::ensure(
        &KernelRequest {
            arch,
            source: request.kernel_source.clone(),
        },
        progress,
    )?;
    let kernel_digest = store.put_copy(&kernel.path)?;
    let initramfs = fuse_boot::initramfs::initramfs(arch)
        .with_context(|| format!("Cannot assemble the init for {arch}"))?;
    let init_digest = store.put_bytes(&initramfs)?;

    let scratch = store.temp_dir()?;
    let rootfs_file = scratch.path().join("rootfs.squashfs");
    fuse_rootfs::squashfs::write_squashfs(&tree, &rootfs_file, &Default::default())
        .context("Cannot write the root filesystem")?;
    let rootfs_size = std::fs::metadata(&rootfs_file)?.len();
    let rootfs_digest = store.put_file(&rootfs_file)?;

    let manifest = Manifest {
        schema: SCHEMA,
        name: name.name.clone(),
        version: name.version.clone(),
        arch,
        kernel: KernelComponent {
            digest: kernel_digest,
            size: kernel.size,
            release: kernel.release.clone(),
        },
        init: Component {
            digest: init_digest,
            size: initramfs.len() as u64,
        },
        rootfs: RootfsComponent {
            digest: rootfs_digest,
            size: rootfs_size,
            format: "squashfs+zstd".into(),
        },
        cmdline: kernel_cmdline(arch),
        notes: app.notes.into_iter().collect(),
        app: AppSection {
            kind: kind.as_str().into(),
            exe: spec.exe.clone(),
            args: spec.args.clone(),
            env: spec.env.iter().map(|(k, v)| format!("{k}={v}")).collect(),
            cwd: spec.cwd.clone(),
            uid: spec.uid,
            gid: spec.gid,
            hostname: spec.hostname.clone(),
        },
        contents: Contents {
            files: tree.file_count() as u64,
            bytes: tree.total_file_bytes(),
            largest: tree
                .largest_files(10)
                .into_iter()
                .map(|(path, size)| FileSize { path, size })
                .collect(),
        },
    };
    let digest = store.tag(&manifest)?;
    Ok(StoredImage {
        name,
        digest,
        manifest,
    })
}
