//! The flag groups shared by the commands, and their conversion into the library's request
//! types (`TryFrom`): library functions never see clap. `fuse run` and `fuse test` take the
//! same [`BuildFlags`] and [`VmFlags`], so every build and VM flag of one works for the other.

use crate::build::compression::RootfsCompression;
use crate::build::detect::Kind;
use crate::build::runtimes::Interpreters;
use crate::build::BuildRequest;
use crate::host::kernel::KernelRequest;
use crate::run::boot::BootMode;
use crate::run::health::HealthCheck;
use crate::run::overlay::Selection;
use crate::run::volumes::VolumeSpec;
use crate::run::{CloudSource, RunOptions};
use clap::Args;
use fuse_boot::vm::PortForward;
use fuse_boot::vm::{AccelChoice, Machine};
use fuse_rootfs::Arch;
use std::ffi::OsString;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

/// A clap value parser for any type with a `FromStr` whose error says what is wrong.
pub(super) fn parse<T: FromStr>(s: &str) -> Result<T, String>
where
    T::Err: std::fmt::Display,
{
    s.parse::<T>().map_err(|e| e.to_string())
}

/// The target machine.
#[derive(Debug, Clone, Default, Args)]
pub(super) struct TargetArgs {
    /// Target architecture: x86_64 or aarch64 (default: the host's).
    #[arg(long, value_parser = parse::<Arch>)]
    pub(crate) arch: Option<Arch>,
    /// Linux source tarball or tree (default: Debian's /usr/src/linux-source-6.12.tar.xz).
    #[arg(long, value_name = "PATH")]
    pub(crate) linux_src: Option<PathBuf>,
}

impl From<&TargetArgs> for KernelRequest {
    fn from(t: &TargetArgs) -> Self {
        KernelRequest {
            arch: t.arch.unwrap_or_else(Arch::host),
            source: t.linux_src.clone(),
        }
    }
}

/// How an app is built into an image (`fuse build`, and `fuse run`/`fuse test` given an app).
#[derive(Debug, Clone, Default, Args)]
pub(super) struct BuildFlags {
    /// Image name[:version] (default: from the file name, hello-1.0 gives hello:1.0).
    #[arg(long)]
    pub(crate) name: Option<String>,
    #[command(flatten)]
    pub(crate) target: TargetArgs,
    /// The app's kind, overriding detection: native, jvm, node or python.
    #[arg(long, value_parser = parse::<Kind>)]
    pub(crate) kind: Option<Kind>,
    /// The JDK to make a Java app's runtime from (default: $JAVA_HOME, then /usr/lib/jvm).
    #[arg(long, value_name = "PATH")]
    pub(crate) jdk: Option<PathBuf>,
    /// A host directory to look for the app's shared libraries in, after the ELF's RPATH and
    /// before the system's (like LD_LIBRARY_PATH; repeatable).
    #[arg(long = "library-path", value_name = "DIR")]
    pub(crate) library_paths: Vec<PathBuf>,
    /// The class a Java app starts (`java -cp app.jar CLASS`) instead of the jar's Main-Class
    /// (overrides `[jvm] main_class`).
    #[arg(long, value_name = "CLASS")]
    pub(crate) main_class: Option<String>,
    /// The node binary for a Node.js app (default: `node` on PATH).
    #[arg(long, value_name = "PATH")]
    pub(crate) node: Option<PathBuf>,
    /// The Python interpreter for a Python app (default: /usr/bin/python3).
    #[arg(long, value_name = "PATH")]
    pub(crate) python: Option<PathBuf>,
    /// Root filesystem compression: fast (zstd), balanced (zstd 19, 1 MiB blocks: nearly as
    /// small as xz, as fast to boot as zstd) or small (xz) (default: small for Node.js apps, fast
    /// for the others).
    #[arg(long, value_parser = parse::<RootfsCompression>)]
    pub(crate) compression: Option<RootfsCompression>,
    /// The virtualenv whose site-packages a Python app imports from.
    #[arg(long, value_name = "PATH")]
    pub(crate) venv: Option<PathBuf>,
    /// The target's root to take shared libraries from (default: the host's for its own arch,
    /// else a Debian 12 sysroot fuse makes in its cache).
    #[arg(long, value_name = "PATH")]
    pub(crate) sysroot: Option<PathBuf>,
    /// A Debian package (with its dependencies) to add to fuse's sysroot of a foreign arch, for
    /// libraries the app needs (repeatable; adds to `[sysroot] packages`).
    #[arg(long = "package", value_name = "NAME")]
    pub(crate) packages: Vec<String>,
    /// The app's configuration file (default: fuse.toml beside the app file, or inside an app
    /// directory); fuse-<env>.toml files beside it are merged too.
    #[arg(long = "config", value_name = "PATH")]
    pub(crate) config: Option<PathBuf>,
}

impl BuildFlags {
    /// The build of the app at `input` with these flags.
    pub(super) fn request(&self, input: PathBuf) -> BuildRequest {
        BuildRequest {
            input,
            name: self.name.clone(),
            arch: self.target.arch,
            kernel_source: self.target.linux_src.clone(),
            kind: self.kind,
            jdk: self.jdk.clone(),
            main_class: self.main_class.clone(),
            library_paths: self.library_paths.clone(),
            interpreters: Interpreters {
                node: self.node.clone(),
                python: self.python.clone(),
                venv: self.venv.clone(),
                sysroot: self.sysroot.clone(),
            },
            config: self.config.clone(),
            compression: self.compression,
            packages: self.packages.clone(),
        }
    }
}

/// What a deployment selects and injects: `fuse run`, `fuse test`, `fuse userdata` and
/// `fuse export --format nocloud` alike.
#[derive(Debug, Clone, Default, Args)]
pub(super) struct SelectionFlags {
    /// Arguments for the app, replacing the image's (after `--`).
    #[arg(last = true)]
    pub(crate) args: Vec<String>,
    /// The environment to boot (default: the image's, see `fuse inspect`); Boxfuse's
    /// `-env=NAME` works too.
    #[arg(
        long = "env",
        short = 'E',
        visible_alias = "environment",
        value_name = "NAME"
    )]
    pub(crate) environment: Option<String>,
    /// Set a variable, never stored in the image (repeatable; a later one wins); `-e KEY`
    /// passes KEY's value from your environment.
    #[arg(short = 'e', value_name = "KEY=VALUE")]
    pub(crate) set: Vec<String>,
    /// Read variables from a dotenv file (KEY=VALUE lines; repeatable; `-e` wins).
    #[arg(long = "env-file", value_name = "FILE")]
    pub(crate) env_files: Vec<PathBuf>,
}

impl SelectionFlags {
    /// Whether none of these flags was given.
    pub(super) fn is_empty(&self) -> bool {
        self.args.is_empty()
            && self.environment.is_none()
            && self.set.is_empty()
            && self.env_files.is_empty()
    }

    /// The selection, with every value checked as `fuse run` checks it (`-e`, the env files,
    /// sizes), before anything is built, booted or written.
    pub(super) fn selection(&self) -> anyhow::Result<Selection> {
        let selection =
            Selection::from_flags(self.environment.as_deref(), &self.set, &self.env_files)?;
        crate::run::overlay::check_sizes(&selection.env, &self.args)?;
        Ok(selection)
    }

    /// The first of these flags given, by name (for refusals).
    fn first_given(&self) -> Option<&'static str> {
        [
            (self.environment.is_some(), "--env"),
            (!self.set.is_empty(), "-e"),
            (!self.env_files.is_empty(), "--env-file"),
            (!self.args.is_empty(), "Arguments after --"),
        ]
        .into_iter()
        .find_map(|(given, name)| given.then_some(name))
    }
}

/// How an image is booted: `fuse run` and `fuse test` alike.
#[derive(Debug, Clone, Args)]
pub(super) struct VmFlags {
    #[command(flatten)]
    pub(crate) selection: SelectionFlags,
    /// Accelerator: auto (KVM where a probe shows it works, else TCG), kvm or tcg.
    #[arg(long, default_value = "auto", value_parser = parse::<AccelChoice>)]
    pub(crate) accel: AccelChoice,
    /// Guest memory in MiB (default: the image's `memory` from fuse.toml, else 256).
    #[arg(long)]
    pub(crate) memory: Option<u32>,
    /// Guest vCPUs (default: the image's `cpus` from fuse.toml, else 1).
    #[arg(long)]
    pub(crate) cpus: Option<u32>,
    /// Stop the VM after this many seconds (`fuse run`: exit code 124; `fuse test`: default
    /// the [test] timeout, else 120).
    #[arg(long, value_name = "SECONDS")]
    pub(crate) timeout: Option<u64>,
    /// Show kernel messages and the QEMU command line (`fuse test`: and stream the app's
    /// output to stderr).
    #[arg(long)]
    pub(crate) verbose: bool,
    /// Publish a guest port on the host's 127.0.0.1: HOST:GUEST, HOST:GUEST/udp, or PORT
    /// (repeatable).
    #[arg(long, short = 'p', value_name = "HOST:GUEST", value_parser = crate::run::ports::parse_publish)]
    pub(crate) publish: Vec<PortForward>,
    /// Wait until the app is healthy: http:/PATH[@GUEST_PORT] (a 2xx/3xx answer) or
    /// tcp[@GUEST_PORT] (default port: the first published one); prints `ready in N ms at URL`.
    #[arg(long, value_name = "CHECK", value_parser = parse::<HealthCheck>)]
    pub(crate) health: Option<HealthCheck>,
    /// How long the health check may take before the VM is stopped (default 60).
    #[arg(long, value_name = "SECONDS", requires = "health")]
    pub(crate) health_timeout: Option<u64>,
    /// Seconds the app gets to exit after SIGTERM (Ctrl-C, `fuse kill`) before the VM is
    /// killed (exit code 137); 0 kills at once.
    #[arg(long, value_name = "SECONDS", default_value_t = crate::run::DEFAULT_GRACE.as_secs())]
    pub(crate) grace: u64,
    /// Attach a persistent volume: NAME:/PATH[:SIZE] (created on first use, default 1G; the
    /// image has /data for it). Repeatable.
    #[arg(long, short = 'v', value_name = "NAME:/PATH[:SIZE]", value_parser = parse::<VolumeSpec>)]
    pub(crate) volume: Vec<VolumeSpec>,
    /// How to boot the image's disk: direct (QEMU loads the kernel and initramfs out of the
    /// disk; fastest) or uefi (OVMF firmware boots the disk, as a cloud does).
    #[arg(long, default_value = "direct", value_parser = parse::<BootMode>)]
    pub(crate) firmware: BootMode,
    /// The VM's hardware: virtio (fastest) or cloud (an EC2 Nitro instance's: NVMe root disk,
    /// an Intel e1000 NIC, aarch64 with ACPI; implies --firmware uefi), to check that the image
    /// boots on a cloud.
    #[arg(long, default_value = "virtio", value_parser = parse::<Machine>)]
    pub(crate) machine: Machine,
    /// Attach a NoCloud seed disk (from `fuse export --format nocloud`) read-only, as a cloud
    /// attaches its configuration disk: the app's configuration comes from its user-data, as
    /// on a cloud (fuse passes none of its own; --env, -e, --env-file, arguments and -v are
    /// refused).
    #[arg(long, value_name = "FILE")]
    pub(crate) seed: Option<PathBuf>,
    /// Play a cloud's instance metadata service: the guest's 169.254.169.254:80 leads to
    /// HOST:PORT on the host (nothing else is reachable from the guest); the app's
    /// configuration comes from that server's user-data, as on EC2 (fuse passes none of its
    /// own, as with --seed; with both, the seed disk is read first).
    #[arg(long, value_name = "HOST:PORT")]
    pub(crate) metadata_server: Option<String>,
}

impl VmFlags {
    /// The cloud channel of `--seed` / `--metadata-server`, checked (the seed readable, the
    /// server's address valid); refuses what would need fuse's own configuration with it.
    fn cloud_source(&self) -> anyhow::Result<CloudSource> {
        use anyhow::Context;
        let mode = match (&self.seed, &self.metadata_server) {
            (None, None) => return Ok(CloudSource::default()),
            (Some(_), Some(_)) => "--seed and --metadata-server",
            (Some(_), None) => "--seed",
            (None, Some(_)) => "--metadata-server",
        };
        if let Some(flag) = self.selection.first_given() {
            anyhow::bail!(
                "{flag} cannot be used with {mode}: the app's configuration then comes from the user-data, as on a cloud, so it goes in the user-data: make it with `fuse userdata` or `fuse export --format nocloud`"
            );
        }
        if !self.volume.is_empty() {
            anyhow::bail!(
                "-v cannot be used with {mode}: volumes reach the init through fuse's own configuration, which a run that plays the cloud's does not pass"
            );
        }
        let mut cloud = CloudSource::default();
        if let Some(seed) = &self.seed {
            let readable = std::fs::File::open(seed).and_then(|f| f.metadata());
            match readable {
                Ok(m) if m.is_file() => {}
                Ok(_) => anyhow::bail!("The seed disk {} is not a file", seed.display()),
                Err(e) => {
                    return Err(e)
                        .with_context(|| format!("Cannot read the seed disk {}", seed.display()))
                }
            }
            // Absolute: a detached run's supervisor reads it from elsewhere.
            cloud.seed = Some(std::fs::canonicalize(seed)?);
        }
        if let Some(target) = &self.metadata_server {
            crate::run::relay::check_target(target)?;
            cloud.metadata_server = Some(target.clone());
        }
        Ok(cloud)
    }
}

impl TryFrom<&VmFlags> for RunOptions {
    type Error = anyhow::Error;

    fn try_from(f: &VmFlags) -> anyhow::Result<RunOptions> {
        let mut health = f.health.clone();
        if let (Some(h), Some(secs)) = (health.as_mut(), f.health_timeout) {
            h.timeout = Duration::from_secs(secs);
        }
        let cloud = f.cloud_source()?;
        let selection = f.selection.selection()?;
        Ok(RunOptions {
            args: f.selection.args.clone(),
            selection,
            accel: f.accel,
            memory_mib: at_least_one("--memory", "memory", f.memory)?,
            cpus: at_least_one("--cpus", "cpus", f.cpus)?,
            timeout: f.timeout.map(Duration::from_secs),
            verbose: f.verbose,
            publish: f.publish.clone(),
            health,
            grace: Duration::from_secs(f.grace),
            volumes: f.volume.clone(),
            firmware: f.firmware,
            machine: f.machine,
            image_defaults: true,
            cloud,
        })
    }
}

/// Boxfuse spells the environment flag `-env=prod` (one dash). Clap would read that as `-e`
/// with the value `nv=prod` and inject a variable `nv`, silently: rewrite it to `--env` before
/// parsing. Only before `--` (what follows belongs to the app).
pub(super) fn normalize_args(args: impl IntoIterator<Item = OsString>) -> Vec<OsString> {
    let mut out = Vec::new();
    let mut passthrough = false;
    for arg in args {
        if passthrough || arg == "--" {
            passthrough = true;
            out.push(arg);
            continue;
        }
        match arg.to_str() {
            Some("-env") => out.push("--env".into()),
            Some(s) if s.starts_with("-env=") => out.push(format!("-{s}").into()),
            _ => out.push(arg),
        }
    }
    out
}

/// `--memory`/`--cpus` checked as fuse.toml checks `memory`/`cpus` (here rather than as a clap
/// value parser so the error is one line with exit code 1, as for every other refused input).
fn at_least_one(flag: &str, key: &str, value: Option<u32>) -> anyhow::Result<Option<u32>> {
    value
        .map(|n| crate::build::config::at_least_one(key, n))
        .transpose()
        .map_err(|e| anyhow::anyhow!("Invalid {flag}: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn boxfuse_spelling_is_rewritten_before_the_app_args() {
        let args = [
            "fuse",
            "run",
            "-env=prod",
            "app",
            "-e",
            "A=1",
            "--",
            "-env=x",
            "-env",
        ];
        let out = normalize_args(args.iter().map(OsString::from));
        let out: Vec<&str> = out.iter().map(|a| a.to_str().unwrap()).collect();
        assert_eq!(
            out,
            vec![
                "fuse",
                "run",
                "--env=prod",
                "app",
                "-e",
                "A=1",
                "--",
                "-env=x",
                "-env"
            ]
        );
        let out = normalize_args(["fuse", "run", "-env", "prod"].iter().map(OsString::from));
        assert_eq!(out[2], "--env");
    }
}
