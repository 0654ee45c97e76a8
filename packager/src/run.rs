//! `fuse run`: boot an image (building it first when given an app) and report the app's exit.

use crate::builder::{self, BuildRequest};
use crate::store::{Store, StoredImage};
use anyhow::{Context, Result};
use fuse_boot::accel::AccelChoice;
use fuse_boot::qemu::VmConfig;
use fuse_boot::spec::RunOverlay;
use fuse_rootfs::Arch;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// How to run.
#[derive(Debug, Clone)]
pub struct RunRequest {
    /// An app (built first) or an image reference in the store.
    pub target: String,
    /// Arguments replacing the image's baked arguments (after argv[0]); empty keeps them.
    pub args: Vec<String>,
    pub name: Option<String>,
    pub arch: Option<Arch>,
    pub kernel_source: Option<PathBuf>,
    pub accel: AccelChoice,
    pub memory_mib: u32,
    pub cpus: u32,
    pub timeout: Option<Duration>,
    pub verbose: bool,
}

/// The image `target` names: a path to an app is built (cheap when nothing changed), anything
/// else is looked up in the store.
pub fn resolve_image(
    store: &Store,
    target: &str,
    name: Option<String>,
    arch: Option<Arch>,
    kernel_source: Option<PathBuf>,
    progress: &mut dyn FnMut(&str),
) -> Result<StoredImage> {
    let path = Path::new(target);
    if path.exists() {
        return builder::build(
            store,
            &BuildRequest {
                input: path.to_path_buf(),
                name,
                arch,
                kernel_source,
            },
            progress,
        );
    }
    store.find(target)?.with_context(|| {
        format!("No app file or image named '{target}': give the path of an app, or an image from `fuse ls`")
    })
}

/// Boots the image; returns the app's exit code. App output streams to stdout.
pub fn run(store: &Store, request: &RunRequest, notice: &mut dyn FnMut(&str)) -> Result<u8> {
    let image = resolve_image(
        store,
        &request.target,
        request.name.clone(),
        request.arch,
        request.kernel_source.clone(),
        notice,
    )?;
    let manifest = &image.manifest;
    let scratch = store.temp_dir()?;
    let mut fw_cfg = Vec::new();
    if !request.args.is_empty() {
        let overlay = RunOverlay {
            args: Some(request.args.clone()),
            env: Vec::new(),
        };
        let path = scratch.path().join("run-overlay");
        std::fs::write(&path, overlay.encode())?;
        fw_cfg.push(("opt/fuse/run".to_string(), path));
    }
    let config = VmConfig {
        arch: manifest.arch,
        kernel: store.blob_path(&manifest.kernel.digest),
        initrd: store.blob_path(&manifest.init.digest),
        cmdline: manifest.cmdline.clone(),
        root_disk: store.blob_path(&manifest.rootfs.digest),
        memory_mib: request.memory_mib,
        cpus: request.cpus,
        accel: request.accel,
        fw_cfg,
        network: true,
        port_forwards: Vec::new(),
        timeout: request.timeout,
        verbose: request.verbose,
    };
    let mut stdout = std::io::stdout();
    let outcome = fuse_boot::qemu::run_with(&config, &mut stdout, notice)
        .with_context(|| format!("Image {} did not run to completion", image.name))?;
    Ok(outcome.exit_code)
}
