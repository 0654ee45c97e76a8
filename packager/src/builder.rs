//! `fuse build`: from an app to a stored image (kernel + init + root filesystem + manifest).

use crate::config::Config;
use crate::environments;
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
use fuse_rootfs::block_cache::BlockCache;
use fuse_rootfs::Arch;
use std::path::PathBuf;

/// What to build.
#[derive(Debug, Clone, Default)]
pub struct BuildRequest {
    pub input: PathBuf,
    /// `name[:version]` overriding the name derived from the input file.
    pub name: Option<String>,
    /// Target arch; `None` means the host's.
    pub arch: Option<Arch>,
    pub kernel_source: Option<PathBuf>,
    /// The payload kind (`--kind`), overriding detection.
    pub kind: Option<payload::Kind>,
    /// The JDK for Java apps (`--jdk`); `None` searches the host.
    pub jdk: Option<PathBuf>,
    /// `--node`, `--python`, `--venv` for script apps.
    pub interpreters: runtimes::Interpreters,
    /// The configuration file (`--config`); `None`: `fuse.toml` beside (or in) the input.
    pub config: Option<PathBuf>,
    /// `--compression`; `None`: the configuration's `compression`, else the app kind's default
    /// ([`RootfsCompression::default_for`]).
    pub compression: Option<RootfsCompression>,
}

/// How the root filesystem is compressed: image size traded against build and boot time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum RootfsCompression {
    /// zstd, 128 KiB blocks: the fastest build and boot.
    Fast,
    /// xz, 1 MiB blocks, with the x86 branch filter on x86_64: the smallest image.
    Small,
}

impl RootfsCompression {
    /// The compression an app of `kind` gets unless asked otherwise: xz where zstd misses the
    /// size target (Node.js: 38.1 MB against 30), zstd, which boots faster, everywhere else.
    /// The README's "Root filesystem compression" has the measurements.
    pub fn default_for(kind: payload::Kind) -> Self {
        match kind {
            payload::Kind::Node => RootfsCompression::Small,
            _ => RootfsCompression::Fast,
        }
    }

    /// The squashfs writer's options for `arch`, caching compressed blocks in `block_cache`.
    fn squashfs_options(
        self,
        arch: Arch,
        block_cache: BlockCache,
    ) -> fuse_rootfs::squashfs::SquashfsOptions {
        use fuse_rootfs::squashfs::{BranchFilter, Compression, SquashfsOptions};
        match self {
            RootfsCompression::Fast => SquashfsOptions {
                level: Some(ROOTFS_ZSTD_LEVEL),
                block_cache: Some(block_cache),
                ..Default::default()
            },
            RootfsCompression::Small => SquashfsOptions {
                compression: Compression::Xz,
                level: Some(ROOTFS_XZ_PRESET),
                block_size: 1024 * 1024,
                branch_filter: (arch == Arch::X86_64).then_some(BranchFilter::X86),
                block_cache: Some(block_cache),
            },
        }
    }

    /// The manifest's name for the root filesystem's format.
    fn format(self) -> &'static str {
        match self {
            RootfsCompression::Fast => "squashfs+zstd",
            RootfsCompression::Small => "squashfs+xz",
        }
    }
}

/// The xz preset of `--compression small`.
pub const ROOTFS_XZ_PRESET: u32 = 6;

/// The compressed-block cache is pruned to this size (least recently used first) after a build
/// that added to it.
const BLOCK_CACHE_MAX_BYTES: u64 = 1 << 30;

/// The zstd level of `--compression fast`. A build with a cold block cache compresses the whole
/// tree (a Java app: 47 MB, the jlink runtime included), so the level is that build's time.
/// Measured on that tree (backhand, 1 thread): level 15 (mksquashfs' default) 10.2 s, level 6
/// 0.97 s, level 3 0.25 s; the image grows by 0.9 MB from 15 to 6 and by another 1 MB from 6
/// to 3. Level 6 is where the size curve flattens; decompression at boot is as fast for all.
pub const ROOTFS_ZSTD_LEVEL: u32 = 6;

/// Uncompressed bytes of the tree by part (see `Contents::parts`).
fn content_parts(
    tree: &fuse_rootfs::tree::Tree,
    runtime_dir: Option<&str>,
) -> std::collections::BTreeMap<String, u64> {
    let under = |path: &str, dir: &str| {
        path.strip_prefix(dir)
            .is_some_and(|rest| rest.starts_with('/'))
    };
    let mut parts = std::collections::BTreeMap::new();
    for (path, size) in tree.largest_files(usize::MAX) {
        let part = if under(&path, layout::APP_DIR) {
            "app"
        } else if runtime_dir.is_some_and(|dir| under(&path, dir)) {
            "runtime"
        } else {
            "system"
        };
        *parts.entry(part.to_string()).or_insert(0) += size;
    }
    parts
}

/// Builds the image for `request` into `store`. `progress` gets human-readable lines.
pub fn build(
    store: &Store,
    request: &BuildRequest,
    progress: &mut dyn FnMut(&str),
) -> Result<StoredImage> {
    let input = &request.input;
    let config = Config::discover(input, request.config.as_deref())?;
    // --kind wins over the configuration's `kind`, which wins over detection.
    let configured_kind = match config.as_ref().and_then(|c| c.kind.as_ref()) {
        Some((kind, origin)) => Some(
            kind.parse::<payload::Kind>()
                .map_err(|e| anyhow::anyhow!("{origin}: {e}"))?,
        ),
        None => None,
    };
    let kind = match request.kind.or(configured_kind) {
        Some(kind) => {
            // Still refuse a missing input or a directory with detection's clear messages.
            std::fs::metadata(input).with_context(|| {
                format!(
                    "App {} not found: give the path of the app to package",
                    input.display()
                )
            })?;
            kind
        }
        None => payload::detect(input)?,
    };
    let name = match &request.name {
        Some(n) => naming::parse(n).context("Invalid --name")?,
        None => {
            let derived = naming::from_input(input)?;
            config
                .as_ref()
                .and_then(|c| c.image_name(&derived))
                .unwrap_or(derived)
        }
    };
    let arch = request.arch.unwrap_or_else(Arch::host);

    // The app first: its errors (missing library, wrong arch) are the likeliest and cheapest.
    let app = runtimes::assemble(
        kind,
        &RuntimeInput {
            input,
            name: &name,
            arch,
            jdk: request.jdk.as_deref(),
            node: request.interpreters.node.as_deref(),
            python: request.interpreters.python.as_deref(),
            venv: request.interpreters.venv.as_deref(),
            sysroot: request.interpreters.sysroot.as_deref(),
            config: config.as_ref(),
        },
        progress,
    )?;
    let mut tree = app.tree;
    let mut spec = app.spec;
    let image_config = environments::bake(&mut tree, &mut spec, config.as_ref(), kind.as_str())?;
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
    let compression = request
        .compression
        .or(config.as_ref().and_then(|c| c.compression))
        .unwrap_or_else(|| RootfsCompression::default_for(kind));
    if compression == RootfsCompression::Small {
        progress("compressing the root filesystem (xz; unchanged blocks come from the cache)...");
    }
    let block_cache = BlockCache {
        dir: crate::paths::cache_dir().join("blocks"),
        max_bytes: BLOCK_CACHE_MAX_BYTES,
    };
    let squashfs = compression.squashfs_options(arch, block_cache);
    fuse_rootfs::squashfs::write_squashfs(&tree, &rootfs_file, &squashfs)
        .context("Cannot write the root filesystem")?;
    let rootfs_size = std::fs::metadata(&rootfs_file)?.len();
    let rootfs_digest = store.put_file(&rootfs_file)?;

    let runtime_dir = app
        .notes
        .iter()
        .find(|(k, _)| k == runtimes::jvm::NOTE_RUNTIME_DIR)
        .map(|(_, v)| v.as_str());
    let parts = content_parts(&tree, runtime_dir);
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
            digest: rootfs_digest.clone(),
            size: rootfs_size,
            format: compression.format().into(),
        },
        cmdline: fuse_boot::cmdline::image_cmdline(
            arch,
            &crate::disk_image::root_spec(&rootfs_digest),
        ),
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
            parts,
        },
        mount_points: layout::VOLUME_MOUNT_POINTS
            .iter()
            .map(|p| p.to_string())
            .collect(),
        config: image_config,
    };
    // The image is its disk: the digest is the disk's, the manifest rides inside it.
    let (disk, _) = crate::disk_image::build(store, &manifest)?;
    let digest = store.tag(&manifest, &disk)?;
    Ok(StoredImage {
        name,
        digest,
        manifest,
    })
}
