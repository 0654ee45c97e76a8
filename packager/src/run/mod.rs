//! Booting a stored image. [`launch`] is the one launch path: `fuse run` (foreground),
//! the supervisor of `fuse run -d`, and `fuse test` all boot through it, with the same
//! [`RunOptions`] and defaults; they differ only in the [`Hooks`] they pass and where the
//! console output goes.
//!
//! `overlay` carries what one run selects and injects (`userdata` the same as a cloud's
//! user-data, `relay` plays a cloud's metadata service), `boot` chooses direct or UEFI boot,
//! `ports`, `health` and `volumes` are the run's network, readiness and data, `instances`
//! keeps the state of detached runs, `check` evaluates what `fuse test` expects.

pub(crate) mod boot;
pub(crate) mod check;
pub(crate) mod dotenv;
pub(crate) mod health;
pub(crate) mod instances;
pub(crate) mod overlay;
pub(crate) mod ports;
pub(crate) mod relay;
pub(crate) mod userdata;
pub(crate) mod volumes;

use crate::image::config::HealthProbe;
use crate::image::manifest::{Manifest, NOTE_FIXED_ARGS};
use crate::image::store::{Store, StoredImage};
use anyhow::{Context, Result};
use boot::BootMode;
use fuse_boot::vm::{AccelChoice, Machine};
use fuse_boot::vm::{PortForward, Proto, RunControl, Spawned, StopRequest, VmConfig, VmOutcome};
use health::{HealthCheck, HealthKind};
use overlay::Selection;
use serde::{Deserialize, Serialize};
use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use volumes::VolumeSpec;

/// Guest memory when neither `--memory` nor the image's configuration gives it.
pub(crate) const DEFAULT_MEMORY_MIB: u32 = 256;
/// How long the app gets after SIGTERM when nothing says otherwise.
pub(crate) const DEFAULT_GRACE: Duration = Duration::from_secs(10);

/// How to boot an image: what `fuse run`, `fuse run -d` and `fuse test` share. The supervisor
/// of a detached run reads it from a 0600 file in its instance directory (it holds the run's
/// injected values), never from its command line.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct RunOptions {
    /// Arguments replacing the image's baked arguments (after the launcher's); empty keeps
    /// them.
    pub(crate) args: Vec<String>,
    /// The environment to boot and the values injected for this run (`--env`, `-e`).
    pub(crate) selection: Selection,
    #[serde(with = "serde_accel")]
    pub(crate) accel: AccelChoice,
    /// `None`: the image's (fuse.toml `memory`), else [`DEFAULT_MEMORY_MIB`].
    pub(crate) memory_mib: Option<u32>,
    /// `None`: the image's (fuse.toml `cpus`), else 1.
    pub(crate) cpus: Option<u32>,
    pub(crate) timeout: Option<Duration>,
    /// Kernel messages and the QEMU command line.
    pub(crate) verbose: bool,
    /// Host ports forwarded to the guest (`-p`), on 127.0.0.1.
    #[serde(with = "crate::host::serde_text::many")]
    pub(crate) publish: Vec<PortForward>,
    /// What the run waits for before it reports the app ready (`--health`).
    pub(crate) health: Option<HealthCheck>,
    /// How long the app gets after SIGTERM (Ctrl-C, `fuse kill`) before the VM is killed.
    pub(crate) grace: Duration,
    /// Host-backed disks mounted in the guest (`--volume`).
    pub(crate) volumes: Vec<VolumeSpec>,
    /// Direct boot (kernel and initramfs out of the disk) or through UEFI firmware.
    pub(crate) firmware: BootMode,
    /// The VM's hardware (`--machine`); [`Machine::Cloud`] boots through UEFI whatever
    /// `firmware` says.
    #[serde(with = "crate::host::serde_text::one", default)]
    pub(crate) machine: Machine,
    /// Publish the image's named ports and wait on its health check when the options give
    /// none (`fuse run`); `fuse test` publishes only its own check's port.
    pub(crate) image_defaults: bool,
    /// The cloud's configuration, played locally: no run overlay, so the init reads it here.
    #[serde(default)]
    pub(crate) cloud: CloudSource,
}

/// Where a run plays a cloud's configuration channel from (`--seed`, `--metadata-server`).
/// Either one means the run passes no fw_cfg overlay, so the init falls through to it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct CloudSource {
    /// A NoCloud seed disk (absolute path), attached read-only after the data disks.
    pub(crate) seed: Option<PathBuf>,
    /// `HOST:PORT` on the host that the guest's 169.254.169.254:80 leads to.
    pub(crate) metadata_server: Option<String>,
}

impl CloudSource {
    pub(crate) fn is_set(&self) -> bool {
        self.seed.is_some() || self.metadata_server.is_some()
    }
}

impl Default for RunOptions {
    fn default() -> Self {
        RunOptions {
            args: Vec::new(),
            selection: Selection::default(),
            accel: AccelChoice::Auto,
            memory_mib: None,
            cpus: None,
            timeout: None,
            verbose: false,
            publish: Vec::new(),
            health: None,
            grace: DEFAULT_GRACE,
            volumes: Vec::new(),
            firmware: BootMode::Direct,
            machine: Machine::Virtio,
            image_defaults: true,
            cloud: CloudSource::default(),
        }
    }
}

impl RunOptions {
    /// How the disk boots: the cloud machine only through UEFI firmware (aarch64's ACPI tables
    /// come from it, and a cloud has no other way).
    pub(crate) fn boot_mode(&self) -> BootMode {
        match self.machine {
            Machine::Cloud => BootMode::Uefi,
            Machine::Virtio => self.firmware,
        }
    }

    /// The checks of `-p` and `--health` that need no image, made before anything is built;
    /// returns the health check's host port.
    pub(crate) fn check_ports(&self) -> Result<Option<u16>> {
        ports::check_host_ports(&self.publish)?;
        self.health
            .as_ref()
            .map(|h| h.host_port(&self.publish))
            .transpose()
    }

    /// These options completed with what the image's configuration asks for when the command
    /// line says nothing: its named ports published on the same host ports (127.0.0.1), and
    /// its health check waited on.
    pub(crate) fn with_image_defaults(&self, manifest: &Manifest) -> RunOptions {
        let mut options = self.clone();
        if !options.image_defaults {
            return options;
        }
        if options.publish.is_empty() {
            let mut guest_ports: Vec<u16> = manifest.config.ports.values().copied().collect();
            guest_ports.sort_unstable();
            guest_ports.dedup();
            options.publish = guest_ports
                .into_iter()
                .map(|port| PortForward {
                    host: port,
                    guest: port,
                    proto: Proto::Tcp,
                })
                .collect();
        }
        if options.health.is_none() {
            options.health = manifest.config.healthcheck.as_ref().map(|h| {
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
        options
    }
}

/// Called when the health check passes: time since QEMU's spawn, and the app's URL.
pub(crate) type OnReady = Arc<dyn Fn(Duration, &str) + Send + Sync>;

/// What a caller hooks into a run.
#[derive(Default)]
pub(crate) struct Hooks<'a> {
    /// Called once QEMU is spawned.
    pub(crate) on_spawn: Option<&'a mut dyn FnMut(&Spawned)>,
    /// Called (from the probe's thread) when the health check passes.
    pub(crate) on_ready: Option<OnReady>,
    /// Where QEMU's QMP socket goes (default: a private temporary directory).
    pub(crate) qmp_socket: Option<PathBuf>,
    /// A 0700 directory of this run for the overlay with the injected values (the instance's
    /// directory of a detached run); default: the run's scratch in the store.
    pub(crate) private_dir: Option<PathBuf>,
    /// Lets the caller stop the VM from another thread (`fuse test` after its HTTP check).
    pub(crate) stop: Option<Arc<StopRequest>>,
}

impl std::fmt::Debug for Hooks<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hooks")
            .field("on_spawn", &self.on_spawn.is_some())
            .field("on_ready", &self.on_ready.is_some())
            .field("qmp_socket", &self.qmp_socket)
            .field("private_dir", &self.private_dir)
            .field("stop", &self.stop)
            .finish()
    }
}

/// The argv\[1..\] of a run with `args`: a runtime's launcher arguments (`java <options> -jar
/// /app/x.jar`, counted by the `args.fixed` note) stay, the run's arguments follow them.
fn run_args(manifest: &Manifest, args: &[String]) -> Vec<String> {
    let fixed = manifest
        .notes
        .get(NOTE_FIXED_ARGS)
        .and_then(|n| n.parse::<usize>().ok())
        .unwrap_or(0);
    let baked = manifest.app.args.iter().skip(1).take(fixed).cloned();
    baked.chain(args.iter().cloned()).collect()
}

/// Boots `image` with `options` and waits for it to end: the app's console output goes to
/// `out`, fuse's notices to `notice`. Returns how the VM ended; a VM that did not report an
/// exit code is an error whose chain holds the runner's `RunError`.
pub(crate) fn launch(
    store: &Store,
    image: &StoredImage,
    options: &RunOptions,
    hooks: Hooks<'_>,
    out: &mut dyn Write,
    notice: &mut dyn FnMut(&str),
) -> Result<VmOutcome> {
    let manifest = &image.manifest;
    let options = &options.with_image_defaults(manifest);
    let health_port = options.check_ports()?;
    let scratch = store.temp_dir()?;
    let guest_forwards = match &options.cloud.metadata_server {
        Some(target) => vec![relay::metadata_forward(target)?],
        None => Vec::new(),
    };
    let volumes = volumes::prepare(&options.volumes, manifest, &image.name.to_string(), notice)?;
    // Always an overlay (maybe only its version pair): without one the init would look for a
    // cloud's configuration, and through passt on a cloud host reach the host's own metadata
    // service. Only a run that plays the cloud's channel (the options refuse every value that
    // would need an overlay then) goes without.
    let overlay_file = if options.cloud.is_set() {
        let selection = &options.selection;
        if selection.environment.is_some()
            || !selection.env.is_empty()
            || !options.args.is_empty()
            || !options.volumes.is_empty()
        {
            anyhow::bail!("A run with --seed or --metadata-server takes its configuration from the user-data only: no --env, -e, --env-file, arguments or -v");
        }
        None
    } else {
        let args = (!options.args.is_empty()).then(|| run_args(manifest, &options.args));
        let overlay = overlay::run_overlay(manifest, &options.selection, args)?;
        let overlay = volumes::add_to_overlay(overlay, &volumes);
        let overlay_dir = hooks.private_dir.as_deref().unwrap_or(scratch.path());
        Some(overlay::write_overlay(overlay_dir, &overlay)?)
    };
    let fw_cfg: Vec<_> = overlay_file.iter().map(|f| f.fw_cfg()).collect();
    // Both boot modes boot the image's disk: its bytes are the image's digest.
    let (root_disk, boot_files, firmware) =
        boot::vm_boot(store, image, options.boot_mode(), scratch.path())?;
    let config = VmConfig {
        arch: manifest.arch,
        kernel: boot_files.kernel,
        initrd: boot_files.initrd,
        cmdline: boot_files.cmdline,
        root_disk,
        firmware,
        memory_mib: options
            .memory_mib
            .or(manifest.config.memory)
            .unwrap_or(DEFAULT_MEMORY_MIB),
        cpus: options.cpus.or(manifest.config.cpus).unwrap_or(1),
        accel: options.accel,
        fw_cfg,
        network: true,
        port_forwards: options.publish.clone(),
        timeout: options.timeout,
        verbose: options.verbose,
        qmp_socket: hooks.qmp_socket.clone(),
        stop_grace: options.grace,
        data_disks: volumes.iter().map(|v| v.file.clone()).collect(),
        config_disk: options.cloud.seed.clone(),
        guest_forwards,
        machine: options.machine,
    };
    // The health probe runs in its own thread from QEMU's spawn on; a failed check stops
    // the VM through `stop`.
    let stop = hooks.stop.clone().unwrap_or_default();
    let health = options.health.clone().zip(health_port);
    let Hooks {
        mut on_spawn,
        on_ready,
        ..
    } = hooks;
    let mut probe: Option<health::Probe> = None;
    let mut overlay_watch = None;
    let mut spawned = |s: &Spawned| {
        overlay_watch = overlay_file
            .as_ref()
            .map(|f| f.remove_once_read(s.qmp_socket.clone()));
        if let Some((check, port)) = &health {
            let url = check.url(*port);
            let on_ready = on_ready.clone();
            let report = move |after: Duration| {
                eprintln!("ready in {} ms at {url}", after.as_millis());
                if let Some(f) = &on_ready {
                    f(after, &url);
                }
            };
            probe = Some(health::spawn(
                check.clone(),
                *port,
                health::GuestSide {
                    network: s.network.clone(),
                    port: check.ports(&options.publish).ok().map(|(_, g)| g),
                    qmp_socket: s.qmp_socket.clone(),
                },
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
    let result = fuse_boot::vm::run_controlled(&config, out, notice, control);
    // QEMU is gone: stop watching, and the overlay goes now if it has not yet.
    drop(overlay_watch);
    drop(overlay_file);
    let ready = probe.take().and_then(|p| p.finish());
    let outcome =
        result.with_context(|| format!("Image {} did not run to completion", image.name))?;
    if health.is_some() && ready.is_none() {
        anyhow::bail!(
            "The app exited with code {} before its health check passed",
            outcome.exit_code
        );
    }
    Ok(outcome)
}

/// `AccelChoice` as `auto`, `kvm` or `tcg` (it has no `Display` to go through).
mod serde_accel {
    use fuse_boot::vm::AccelChoice;
    use serde::{Deserialize, Deserializer, Serializer};

    pub(super) fn serialize<S: Serializer>(a: &AccelChoice, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(match a {
            AccelChoice::Auto => "auto",
            AccelChoice::Kvm => "kvm",
            AccelChoice::Tcg => "tcg",
        })
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<AccelChoice, D::Error> {
        String::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_survive_the_supervisor_file() {
        let options = RunOptions {
            args: vec!["a b".into()],
            selection: Selection {
                environment: Some("prod".into()),
                env: vec![("TOKEN".into(), "s3cret".into())],
            },
            accel: AccelChoice::Tcg,
            memory_mib: Some(300),
            timeout: Some(Duration::from_millis(2500)),
            publish: vec!["8080:80".parse().unwrap(), "5353:53/udp".parse().unwrap()],
            health: Some("http:/healthz@80".parse().unwrap()),
            volumes: vec!["db:/data:64M".parse().unwrap()],
            firmware: BootMode::Uefi,
            machine: Machine::Cloud,
            cloud: CloudSource {
                seed: Some("/tmp/seed.img".into()),
                metadata_server: Some("127.0.0.1:8080".into()),
            },
            ..RunOptions::default()
        };
        let text = serde_json::to_string(&options).unwrap();
        let back: RunOptions = serde_json::from_str(&text).unwrap();
        assert_eq!(back, options);
    }
}
