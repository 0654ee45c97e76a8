//! `fuse build`: from an app to a stored image (kernel + init + root filesystem + manifest,
//! assembled into the disk that is the image).
//!
//! `config` reads fuse.toml, `detect` decides the app's kind, `runtimes` turn the app into a
//! root-filesystem tree and an app spec, `environments` bakes every environment into it,
//! `compression` and `disk` write the root filesystem and the disk.

pub(crate) mod compression;
pub(crate) mod config;
pub(crate) mod detect;
pub(crate) mod disk;
pub(crate) mod environments;
pub(crate) mod layout;
pub(crate) mod runtimes;
pub(crate) mod times;

use crate::build::compression::{RootfsCompression, BLOCK_CACHE_MAX_BYTES};
use crate::build::config::Config;
use crate::host::kernel::{self, KernelRequest};
use crate::image::manifest::{
    AppSection, Component, Contents, FileSize, KernelComponent, Manifest, RootfsComponent, SCHEMA,
};
use crate::image::naming;

use crate::image::store::{Store, StoredImage};
use anyhow::{bail, Context, Result};
use fuse_rootfs::block_cache::BlockCache;
use fuse_rootfs::tree::Tree;
use fuse_rootfs::Arch;
use runtimes::RuntimeInput;
use std::path::PathBuf;

/// What to build.
#[derive(Debug, Clone, Default)]
pub(crate) struct BuildRequest {
    pub(crate) input: PathBuf,
    /// `name[:version]` overriding the name derived from the input file.
    pub(crate) name: Option<String>,
    /// Target arch; `None` means the host's.
    pub(crate) arch: Option<Arch>,
    pub(crate) kernel_source: Option<PathBuf>,
    /// The payload kind (`--kind`), overriding detection.
    pub(crate) kind: Option<detect::Kind>,
    /// The JDK for Java apps (`--jdk`); `None` searches the host.
    pub(crate) jdk: Option<PathBuf>,
    /// The class a Java app starts (`--main-class`), over `[jvm] main_class`.
    pub(crate) main_class: Option<String>,
    /// Host directories searched for the app's shared libraries (`--library-path`).
    pub(crate) library_paths: Vec<PathBuf>,
    /// `--node`, `--python`, `--venv` for script apps.
    pub(crate) interpreters: runtimes::Interpreters,
    /// The configuration file (`--config`); `None`: `fuse.toml` beside (or in) the input.
    pub(crate) config: Option<PathBuf>,
    /// `--compression`; `None`: the configuration's `compression`, else the app kind's default
    /// ([`RootfsCompression::default_for`]).
    pub(crate) compression: Option<RootfsCompression>,
    /// `--package`: Debian packages for fuse's sysroot of a foreign arch.
    pub(crate) packages: Vec<String>,
}

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

/// The Debian packages to add to fuse's sysroot: `[sysroot] packages`, then `--package`. Only
/// native and Node.js images of a foreign arch without `--sysroot` have such a sysroot: there
/// `--package` is refused (the configuration's list is not, as the same `fuse.toml` serves
/// every arch; the host's own libraries are used for the host's).
fn sysroot_packages(
    request: &BuildRequest,
    config: Option<&Config>,
    kind: detect::Kind,
    arch: Arch,
) -> Result<Vec<String>> {
    for name in &request.packages {
        config::check_package_name(name).context("--package")?;
    }
    let fuse_sysroot = arch != Arch::host() && request.interpreters.sysroot.is_none();
    let uses_packages = matches!(kind, detect::Kind::Native | detect::Kind::Node);
    if let Some(first) = request.packages.first() {
        if request.interpreters.sysroot.is_some() {
            bail!("--package {first} adds to fuse's own sysroot, not to --sysroot: install the package into that root instead");
        }
        if !fuse_sysroot {
            bail!("--package {first} adds to fuse's sysroot for another arch: for a {arch} image, install the package on this host (apt-get install {first})");
        }
        if !uses_packages {
            bail!("--package {first} adds libraries for native and Node.js apps; a {} app takes none from it", kind.as_str());
        }
    }
    let mut packages: Vec<String> = Vec::new();
    if fuse_sysroot && uses_packages {
        let configured = config
            .map(|c| c.sysroot_packages.as_slice())
            .unwrap_or_default();
        for name in configured.iter().chain(&request.packages) {
            if !packages.contains(name) {
                packages.push(name.clone());
            }
        }
    }
    Ok(packages)
}

/// Builds the image for `request` into `store`. `progress` gets human-readable lines.
pub(crate) fn build(
    store: &Store,
    request: &BuildRequest,
    progress: &mut dyn FnMut(&str),
) -> Result<StoredImage> {
    let input = &request.input;
    let config = Config::discover(input, request.config.as_deref())?;
    let epoch = times::resolve(
        input,
        std::env::var(times::SOURCE_DATE_EPOCH).ok().as_deref(),
    )?;
    // --kind wins over the configuration's `kind`, which wins over detection.
    let configured_kind = match config.as_ref().and_then(|c| c.kind.as_ref()) {
        Some((kind, origin)) => Some(
            kind.parse::<detect::Kind>()
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
        None => detect::detect(input)?,
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
    let packages = sysroot_packages(request, config.as_ref(), kind, arch)?;

    // The app first: its errors (missing library, wrong arch) are the likeliest and cheapest.
    let app = runtimes::assemble(
        kind,
        &RuntimeInput {
            input,
            name: &name,
            arch,
            jdk: request.jdk.as_deref(),
            main_class: request.main_class.as_deref(),
            library_paths: &request.library_paths,
            node: request.interpreters.node.as_deref(),
            python: request.interpreters.python.as_deref(),
            venv: request.interpreters.venv.as_deref(),
            sysroot: request.interpreters.sysroot.as_deref(),
            packages: &packages,
            config: config.as_ref(),
        },
        progress,
    )?;
    let mut tree = app.tree;
    let mut spec = app.spec;
    let fixed = app
        .notes
        .iter()
        .find(|(key, _)| key == crate::image::manifest::NOTE_FIXED_ARGS)
        .and_then(|(_, n)| n.parse().ok())
        .unwrap_or(0);
    let image_config =
        environments::bake(&mut tree, &mut spec, config.as_ref(), kind.as_str(), fixed)?;
    // The init keeps these in front of arguments that come from a cloud's user-data.
    spec.fixed_args = fixed;
    let user = config.as_ref().and_then(|c| c.user);
    let capabilities = config.as_ref().and_then(|c| c.capabilities.as_ref());
    if user.is_some_and(|u| u.uid == 0) {
        match capabilities {
            Some(caps) if caps.names.is_empty() => progress(
                "notice: the app runs as root with no capability (user = \"root\" and capabilities = [] in fuse.toml)",
            ),
            Some(caps) => progress(&format!(
                "notice: the app runs as root with capabilities {} only (user = \"root\" and capabilities in fuse.toml)",
                caps.names.join(", ")
            )),
            None => progress(
                "notice: the app runs as root with every capability (user = \"root\" in fuse.toml)",
            ),
        }
    }
    spec.caps = capabilities.map(|c| c.mask);
    let accounts = config
        .as_ref()
        .map(|c| c.accounts.clone())
        .unwrap_or_default();
    layout::add_user(
        &mut tree,
        &mut spec,
        user.unwrap_or(layout::AppUser::NONROOT),
        &accounts,
    )?;
    tree.add_bytes(layout::SPEC_PATH, spec.try_encode()?, 0o644)?;

    let kernel = kernel::ensure(
        &KernelRequest {
            arch,
            source: request.kernel_source.clone(),
        },
        progress,
    )?;
    let kernel_bytes = std::fs::read(&kernel.path)
        .with_context(|| format!("Cannot read the kernel {}", kernel.path.display()))?;
    let kernel_digest = store.put_bytes(&kernel_bytes)?;
    let initramfs = initramfs(arch)?;
    let init_digest = store.put_bytes(&initramfs)?;

    // What the manifest says of the contents is of the whole image, before the app's files
    // move to a filesystem of their own.
    let runtime_dir = app
        .notes
        .iter()
        .find(|(k, _)| k == crate::image::manifest::NOTE_RUNTIME_DIR)
        .map(|(_, v)| v.as_str());
    let contents = Contents {
        files: tree.file_count() as u64,
        bytes: tree.total_file_bytes(),
        largest: tree
            .largest_files(10)
            .into_iter()
            .map(|(path, size)| FileSize { path, size })
            .collect(),
        parts: content_parts(&tree, runtime_dir),
    };
    // /app is a filesystem (and partition) of its own: a new version of the app leaves the
    // root's bytes, the runtime's, as they were. The app's configuration goes with it.
    let app_tree = split_app(&mut tree)?;

    let scratch = store.temp_dir()?;
    let rootfs_file = scratch.path().join("rootfs.squashfs");
    let appfs_file = scratch.path().join("appfs.squashfs");
    let compression = request
        .compression
        .or(config.as_ref().and_then(|c| c.compression))
        .unwrap_or_else(|| RootfsCompression::default_for(kind));
    match compression {
        RootfsCompression::Small => progress(
            "compressing the root filesystem (xz; unchanged blocks come from the cache)...",
        ),
        RootfsCompression::Balanced => progress(
            "compressing the root filesystem (zstd 19; unchanged blocks come from the cache)...",
        ),
        RootfsCompression::Fast => {}
    }
    let block_cache = BlockCache {
        dir: crate::host::paths::cache_dir().join("blocks"),
        max_bytes: BLOCK_CACHE_MAX_BYTES,
    };
    let mut squashfs = compression.squashfs_options(arch, block_cache);
    squashfs.times = fuse_rootfs::times::FileTimes {
        epoch: epoch.seconds,
    };
    fuse_rootfs::squashfs::write_squashfs(&tree, &rootfs_file, &squashfs)
        .context("Cannot write the root filesystem")?;
    fuse_rootfs::squashfs::write_squashfs(&app_tree, &appfs_file, &squashfs)
        .context("Cannot write the app's filesystem")?;
    let rootfs_size = std::fs::metadata(&rootfs_file)?.len();
    let appfs_size = std::fs::metadata(&appfs_file)?.len();
    // Moved, not copied, into the store: the disk is assembled from the blobs' files.
    let rootfs_digest = store.put_file(&rootfs_file)?;
    let appfs_digest = store.put_file(&appfs_file)?;
    let (root_tree, app_tree, cmdline) = disk::verity(
        arch,
        (&store.blob_path(&rootfs_digest), &rootfs_digest),
        (&store.blob_path(&appfs_digest), &appfs_digest),
    )?;
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
        appfs: RootfsComponent {
            digest: appfs_digest.clone(),
            size: appfs_size,
            format: compression.format().into(),
        },
        cmdline,
        notes: app.notes.into_iter().chain([epoch.note()]).collect(),
        app: AppSection {
            kind: kind.as_str().into(),
            exe: spec.exe.clone(),
            args: spec.args.clone(),
            env: spec.env.iter().map(|(k, v)| format!("{k}={v}")).collect(),
            cwd: spec.cwd.clone(),
            uid: spec.uid,
            gid: spec.gid,
            capabilities: capabilities.map(|c| c.names.iter().map(|n| n.to_string()).collect()),
            hostname: spec.hostname.clone(),
        },
        contents,
        mount_points: layout::VOLUME_MOUNT_POINTS
            .iter()
            .map(|p| p.to_string())
            .collect(),
        config: image_config,
    };
    // The image is its disk: the digest is the disk's, the manifest rides inside it.
    let disk_file = scratch.path().join("disk.raw");
    let (root_path, app_path) = (
        store.blob_path(&rootfs_digest),
        store.blob_path(&appfs_digest),
    );
    let parts = disk::Parts {
        kernel: &kernel_bytes,
        initrd: &initramfs,
        volumes: crate::image::disk::Volumes {
            root: &root_path,
            root_tree: &root_tree,
            app: &app_path,
            app_tree: &app_tree,
        },
    };
    disk::write(&manifest, &parts, &disk_file)?;
    let disk = store.put_file(&disk_file)?;
    let digest = store.tag(&manifest, &disk)?;
    store.set_configured_repository(
        &name.name,
        config.as_ref().and_then(|c| c.repository.as_deref()),
    )?;
    Ok(StoredImage {
        name,
        digest,
        manifest,
    })
}

/// Moves `/app` out of `tree` into a tree of its own, with the app's configuration
/// (`/etc/fuse`) in it at `/app/.fuse` and a symlink to it left at `/etc/fuse`.
fn split_app(tree: &mut Tree) -> Result<Tree> {
    let config = tree
        .split_off(layout::CONFIG_DIR)
        .context("Cannot move the app's configuration")?;
    tree.remove_empty_dir(layout::CONFIG_DIR);
    tree.add_symlink(layout::CONFIG_DIR, layout::APP_CONFIG_DIR)?;
    let mut app = tree
        .split_off(layout::APP_DIR)
        .context("Cannot split the app's files from the root filesystem")?;
    let inside = &layout::APP_CONFIG_DIR[layout::APP_DIR.len()..];
    if app.contains(inside) {
        bail!(
            "The app has its own {}, where fuse keeps the app's configuration: rename or remove it",
            layout::APP_CONFIG_DIR
        );
    }
    app.graft(inside, config)?;
    Ok(app)
}

/// The image's initramfs for `arch`, zstd-compressed. Compressing at the highest level takes
/// longer than a warm build, so the result is kept in the cache under the archive's digest
/// (the same for every image of one fuse binary and arch), and checked before it is used.
fn initramfs(arch: Arch) -> Result<Vec<u8>> {
    use fuse_boot::initramfs as ir;
    let cpio =
        ir::initramfs_cpio(arch).with_context(|| format!("Cannot assemble the init for {arch}"))?;
    let key = crate::host::digest::of_bytes(&cpio);
    let path = crate::host::paths::cache_dir()
        .join("initramfs")
        .join(format!("{}.cpio.zst", crate::host::digest::hex_part(&key)));
    if let Ok(packed) = std::fs::read(&path) {
        if ir::is_compressed(&packed, &cpio) {
            return Ok(packed);
        }
    }
    let packed = ir::compress(&cpio)?;
    // A cache that cannot be written only costs the next build the compression again.
    let _ = crate::host::fs::write_atomic(&path, &packed);
    Ok(packed)
}
