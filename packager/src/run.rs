//! `fuse run`: boot an image (building it first when given an app) and report the app's exit.

use crate::builder::{self, BuildRequest};
use crate::payload::Kind;
use crate::store::{Store, StoredImage};
use anyhow::{Context, Result};
use fuse_boot::vm::{AccelChoice, PortForward, RunControl, Spawned, StopRequest, VmConfig};
use fuse_rootfs::Arch;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

/// Guest memory when neither `--memory` nor the image's configuration gives it.
pub const DEFAULT_MEMORY_MIB: u32 = 256;

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
    /// `--kind` and `--jdk` when building (see `BuildRequest`).
    pub kind: Option<Kind>,
    pub jdk: Option<PathBuf>,
    /// `--compression` when building.
    pub compression: Option<crate::builder::RootfsCompression>,
    /// `--node`, `--python`, `--venv` when building.
    pub interpreters: crate::runtimes::Interpreters,
    pub accel: AccelChoice,
    /// `None`: the image's (fuse.toml `memory`), else [`DEFAULT_MEMORY_MIB`].
    pub memory_mib: Option<u32>,
    /// `None`: the image's (fuse.toml `cpus`), else 1.
    pub cpus: Option<u32>,
    pub timeout: Option<Duration>,
    pub verbose: bool,
    /// The configuration file when building (`--config`).
    pub config: Option<PathBuf>,
    /// The environment to boot and the values injected for this run (`--env`, `-e`).
    pub selection: crate::environments::Selection,
    /// Host ports forwarded to the guest (`-p`), on 127.0.0.1.
    pub publish: Vec<PortForward>,
    /// What `fuse run` waits for before it reports the app ready (`--health`).
    pub health: Option<crate::health::HealthCheck>,
    /// How long the app gets after SIGTERM (Ctrl-C, `fuse kill`) before the VM is killed.
    pub grace: Duration,
    /// Host-backed disks mounted in the guest (`--volume`).
    pub volumes: Vec<crate::volumes::VolumeSpec>,
    /// Direct boot (kernel and initramfs out of the disk) or through UEFI firmware.
    pub firmware: crate::disk_image::BootMode,
}

/// Called when the health check passes: time since QEMU's spawn, and the app's URL.
pub type OnReady = Arc<dyn Fn(Duration, &str) + Send + Sync>;

/// Hooks for the instance supervisor (`fuse run --detach`): instance state follows the VM.
#[derive(Default)]
pub struct RunHooks<'a> {
    /// Called once QEMU is spawned.
    pub on_spawn: Option<&'a mut dyn FnMut(&Spawned)>,
    /// Called (from the probe's thread) when the health check passes: time since QEMU's
    /// spawn, and the app's URL.
    pub on_ready: Option<OnReady>,
    /// Where QEMU's QMP socket goes (default: a private temporary directory).
    pub qmp_socket: Option<PathBuf>,
}

impl std::fmt::Debug for RunHooks<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RunHooks")
            .field("on_spawn", &self.on_spawn.is_some())
            .field("on_ready", &self.on_ready.is_some())
            .field("qmp_socket", &self.qmp_socket)
            .finish()
    }
}

/// The image a request runs, built first when it names an app (as [`run`] does).
pub fn resolve_request(
    store: &Store,
    request: &RunRequest,
    progress: &mut dyn FnMut(&str),
) -> Result<StoredImage> {
    resolve_image(store, &request.target, request.build_request(), progress)
}

impl RunRequest {
    /// The build flags of this run, for when its target is an app.
    pub fn build_request(&self) -> BuildRequest {
        BuildRequest {
            input: PathBuf::new(),
            name: self.name.clone(),
            arch: self.arch,
            kernel_source: self.kernel_source.clone(),
            kind: self.kind,
            jdk: self.jdk.clone(),
            interpreters: self.interpreters.clone(),
            config: self.config.clone(),
            compression: self.compression,
        }
    }
}

/// `request` completed with what the image's configuration asks for when the command line
/// says nothing: its named ports published on the same host ports (127.0.0.1), and its
/// health check waited on.
pub fn with_image_defaults(
    request: &RunRequest,
    manifest: &crate::manifest::Manifest,
) -> RunRequest {
    use crate::config::HealthProbe;
    use crate::health::{HealthCheck, HealthKind};
    let mut request = request.clone();
    if request.publish.is_empty() {
        let mut guest_ports: Vec<u16> = manifest.config.ports.values().copied().collect();
        guest_ports.sort_unstable();
        guest_ports.dedup();
        request.publish = guest_ports
            .into_iter()
            .map(|port| PortForward {
                host: port,
                guest: port,
                proto: fuse_boot::vm::Proto::Tcp,
            })
            .collect();
    }
    if request.health.is_none() {
        request.health = manifest.config.healthcheck.as_ref().map(|h| {
            let (kind, port) = match &h.probe {
                HealthProbe::Http { path, port, .. } => {
                    (HealthKind::Http { path: path.clone() }, *port)
                }
                HealthProbe::Tcp { port } => (HealthKind::Tcp, *port),
            };
            HealthCheck {
                kind,
                guest_port: Some(port),
                timeout: Duration::from_secs(h.timeout_secs),
            }
        });
    }
    request
}

/// The checks of `-p` and `--health` that need no image: made before anything is built.
pub fn check_ports(request: &RunRequest) -> Result<Option<u16>> {
    crate::ports::check_host_ports(&request.publish)?;
    request
        .health
        .as_ref()
        .map(|h| h.host_port(&request.publish))
        .transpose()
}

/// The image `target` names: a path to an app is built with `build`'s flags (cheap when
/// nothing changed; `build.input` is ignored), anything else is looked up in the store.
pub fn resolve_image(
    store: &Store,
    target: &str,
    build: BuildRequest,
    progress: &mut dyn FnMut(&str),
) -> Result<StoredImage> {
    let path = Path::new(target);
    if path.exists() {
        let request = BuildRequest {
            input: path.to_path_buf(),
            ..build
        };
        return builder::build(store, &request, progress);
    }
    store.find(target)?.with_context(|| {
        format!("No app file or image named '{target}': give the path of an app, or an image from `fuse ls`")
    })
}

/// The argv\[1..\] of a run with `args`: a runtime's launcher arguments (`java <options> -jar
/// /app/x.jar`, counted by the `args.fixed` note) stay, the run's arguments follow them.
fn run_args(manifest: &crate::manifest::Manifest, args: &[String]) -> Vec<String> {
    let fixed = manifest
        .notes
        .get(crate::runtimes::jvm::NOTE_FIXED_ARGS)
        .and_then(|n| n.parse::<usize>().ok())
        .unwrap_or(0);
    let baked = manifest.app.args.iter().skip(1).take(fixed).cloned();
    baked.chain(args.iter().cloned()).collect()
}

/// Boots the image; returns the app's exit code. App output streams to stdout.
pub fn run(store: &Store, request: &RunRequest, notice: &mut dyn FnMut(&str)) -> Result<u8> {
    run_hooked(store, request, notice, RunHooks::default())
}

/// [`run`], with the supervisor's hooks.
pub fn run_hooked(
    store: &Store,
    request: &RunRequest,
    notice: &mut dyn FnMut(&str),
    hooks: RunHooks<'_>,
) -> Result<u8> {
    // Flags are checked before anything is built; the image's own ports and health check
    // (from its fuse.toml) only once it is known.
    check_ports(request)?;
    let image = resolve_image(store, &request.target, request.build_request(), notice)?;
    let manifest = &image.manifest;
    let request = &with_image_defaults(request, manifest);
    let health_port = check_ports(request)?;
    let scratch = store.temp_dir()?;
    let mut fw_cfg = Vec::new();
    let args = (!request.args.is_empty()).then(|| run_args(manifest, &request.args));
    let overlay = crate::environments::run_overlay(manifest, &request.selection, args)?;
    let volumes =
        crate::volumes::prepare(&request.volumes, manifest, &image.name.to_string(), notice)?;
    let overlay = crate::volumes::add_to_overlay(overlay, &volumes);
    fw_cfg.extend(crate::environments::write_overlay(
        scratch.path(),
        &overlay,
    )?);
    // Both paths boot the image's disk: its bytes are the image's digest.
    let (root_disk, boot, firmware) =
        crate::disk_image::vm_boot(store, &image, request.firmware, scratch.path())?;
    let config = VmConfig {
        arch: manifest.arch,
        kernel: boot.kernel,
        initrd: boot.initrd,
        cmdline: boot.cmdline,
        root_disk,
        firmware,
        memory_mib: request
            .memory_mib
            .or(manifest.config.memory)
            .unwrap_or(DEFAULT_MEMORY_MIB),
        cpus: request.cpus.or(manifest.config.cpus).unwrap_or(1),
        accel: request.accel,
        fw_cfg,
        network: true,
        port_forwards: request.publish.clone(),
        timeout: request.timeout,
        verbose: request.verbose,
        qmp_socket: hooks.qmp_socket.clone(),
        stop_grace: request.grace,
        data_disks: volumes.iter().map(|v| v.file.clone()).collect(),
    };
    let mut stdout = std::io::stdout();
    // The health probe runs in its own thread from QEMU's spawn on; a failed check stops
    // the VM through `stop`.
    let stop = StopRequest::new();
    let health = request.health.clone().zip(health_port);
    let RunHooks {
        mut on_spawn,
        on_ready,
        ..
    } = hooks;
    let mut probe: Option<crate::health::Probe> = None;
    let mut spawned = |s: &Spawned| {
        if let Some((check, port)) = &health {
            let url = check.url(*port);
            let on_ready = on_ready.clone();
            let report = move |after: Duration| {
                eprintln!("ready in {} ms at {url}", after.as_millis());
                if let Some(f) = &on_ready {
                    f(after, &url);
                }
            };
            let guest = check.ports(&request.publish).ok().map(|(_, g)| g);
            probe = Some(crate::health::spawn(
                check.clone(),
                *port,
                guest.map(|g| (g, s.qmp_socket.clone())),
                s.started,
                stop.clone(),
                Box::new(report),
            ));
        }
        if let Some(f) = on_spawn.as_mut() {
            f(s);
        }
    };
    let control = RunControl {
        stop: Some(stop.clone()),
        on_spawn: Some(&mut spawned),
    };
    let result = fuse_boot::vm::run_controlled(&config, &mut stdout, notice, control);
    let ready = probe.take().and_then(|p| p.finish());
    let outcome =
        result.with_context(|| format!("Image {} did not run to completion", image.name))?;
    if health.is_some() && ready.is_none() {
        anyhow::bail!(
            "The app exited with code {} before its health check passed",
            outcome.exit_code
        );
    }
    Ok(outcome.exit_code)
}
