//! The command line: every command and flag of `fuse`, and how each maps onto the library.

use crate::builder::{self, BuildRequest};
use crate::digest;
use crate::fsutil::human_size;
use crate::kernel::{self, KernelRequest};
use crate::payload::Kind;
use crate::run::{self, RunRequest};
use crate::store::{Store, StoredImage};
use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand, ValueEnum};
use fuse_boot::vm::AccelChoice;
use fuse_rootfs::Arch;
use serde_json::json;
use std::path::PathBuf;
use std::time::Duration;

#[derive(Debug, Parser)]
#[command(
    name = "fuse",
    version,
    about = "Turn an app into a minimal, immutable, bootable VM image, and boot it",
    long_about = "Turn an app into a minimal, immutable, bootable VM image, and boot it.\n\n\
        Example: fuse run ./hello   (build the image, boot it under QEMU, exit with the app's code)"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Build an image from an app and store it.
    Build(BuildArgs),
    /// Boot an app or an image under QEMU and exit with the app's exit code.
    Run(RunArgs),
    /// List the images in the local store.
    Ls(JsonFlag),
    /// Remove images from the local store.
    Rm {
        /// Images to remove (name[:version] or digest).
        #[arg(required = true)]
        images: Vec<String>,
    },
    /// Show what an image is made of: its disk (partitions, ESP, UKI sections), components,
    /// sizes, largest files, app spec.
    Inspect {
        /// Image (name[:version] or digest), or a disk file.
        image: String,
        #[arg(long)]
        json: bool,
    },
    /// Check a disk against its manifest: GPT CRCs, partition GUIDs, the ESP, every UKI
    /// section and the root partition; each problem is reported with its location, exit 1.
    Verify {
        /// Image (name[:version] or digest), or a disk file.
        image: String,
        #[arg(long)]
        json: bool,
    },
    /// Write an image's disk in the format a hypervisor or cloud imports.
    Export {
        /// Image (name[:version] or digest), or a disk file.
        image: String,
        /// raw (GCE, dd), qcow2 (KVM, OpenStack), vmdk (VMware, AWS import), vhd (Azure).
        #[arg(long, value_enum)]
        format: crate::disk_image::ExportFormat,
        /// The file to write.
        #[arg(long, short)]
        output: PathBuf,
    },
    /// Manage the guest kernel.
    #[command(subcommand)]
    Kernel(KernelCommand),
    /// Boot an image once and check its exit code, output or HTTP answer (for CI): one line
    /// per check, JUnit/JSON reports, exit 0 when all pass.
    Test(crate::testing::TestArgs),
    /// List running instances (started with `fuse run --detach`).
    Ps(JsonFlag),
    /// Show an instance's console output (the app's output).
    Logs {
        /// Instance id (or a unique prefix), from `fuse ps`.
        id: String,
        /// Keep following the output until the instance ends.
        #[arg(long, short)]
        follow: bool,
    },
    /// Stop instances gracefully: the app gets SIGTERM, and the VM is killed after the
    /// instance's grace period.
    Kill {
        /// Instance ids (or unique prefixes), from `fuse ps`.
        #[arg(required = true)]
        ids: Vec<String>,
    },
    /// Internal: runs the VM of a detached instance.
    #[command(name = "__supervise", hide = true)]
    Supervise {
        dir: PathBuf,
        #[arg(long)]
        image: String,
        /// The `run` command line.
        #[arg(last = true, required = true)]
        run: Vec<std::ffi::OsString>,
    },
}

#[derive(Debug, Subcommand)]
enum KernelCommand {
    /// Build (or find in the cache) the minimal kernel from kernel-config/.
    Build {
        #[command(flatten)]
        target: TargetArgs,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Args)]
struct JsonFlag {
    /// Machine-readable output.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Args)]
struct TargetArgs {
    /// Target architecture (default: the host's).
    #[arg(long, value_parser = parse_arch)]
    arch: Option<Arch>,
    /// Linux source tarball or tree (default: Debian's /usr/src/linux-source-6.12.tar.xz).
    #[arg(long, value_name = "PATH")]
    linux_src: Option<PathBuf>,
}

/// How the app is read (build and run).
#[derive(Debug, Args)]
struct PayloadArgs {
    /// The app's kind, overriding detection (native, jvm...).
    #[arg(long, value_parser = parse_kind)]
    kind: Option<Kind>,
    /// The JDK to make a Java app's runtime from (default: $JAVA_HOME, then /usr/lib/jvm).
    #[arg(long, value_name = "PATH")]
    jdk: Option<PathBuf>,
    /// The node binary for a Node.js app (default: `node` on PATH).
    #[arg(long, value_name = "PATH")]
    node: Option<PathBuf>,
    /// The Python interpreter for a Python app (default: /usr/bin/python3).
    #[arg(long, value_name = "PATH")]
    python: Option<PathBuf>,
    /// Root filesystem compression (default: small for Node.js apps, fast for the others).
    #[arg(long, value_enum)]
    compression: Option<crate::builder::RootfsCompression>,
    /// The virtualenv whose site-packages a Python app imports from.
    #[arg(long, value_name = "PATH")]
    venv: Option<PathBuf>,
    /// The target's root to take shared libraries from (default: the host's for its own arch,
    /// else a Debian 12 sysroot fuse makes in its cache).
    #[arg(long, value_name = "PATH")]
    sysroot: Option<PathBuf>,
}

impl PayloadArgs {
    fn interpreters(&self) -> crate::runtimes::Interpreters {
        crate::runtimes::Interpreters {
            node: self.node.clone(),
            python: self.python.clone(),
            venv: self.venv.clone(),
            sysroot: self.sysroot.clone(),
        }
    }
}

#[derive(Debug, Args)]
struct BuildArgs {
    /// The app: an ELF executable.
    app: PathBuf,
    /// Image name[:version] (default: from the file name, hello-1.0 gives hello:1.0).
    #[arg(long)]
    name: Option<String>,
    #[command(flatten)]
    target: TargetArgs,
    #[command(flatten)]
    payload: PayloadArgs,
    #[command(flatten)]
    config: crate::config::ConfigArgs,
    /// Machine-readable output.
    #[arg(long)]
    json: bool,
    /// Also write the disk to --output in this format (as `fuse export`).
    #[arg(long, value_enum, requires = "output")]
    format: Option<crate::disk_image::ExportFormat>,
    /// Where --format writes the disk.
    #[arg(long, short, requires = "format")]
    output: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum AccelArg {
    /// KVM where a probe shows it works, else TCG.
    Auto,
    Kvm,
    Tcg,
}

#[derive(Debug, Args)]
struct RunArgs {
    /// An app (built first) or an image name[:version] or digest.
    target: String,
    /// Arguments for the app, replacing the image's (after `--`).
    #[arg(last = true)]
    args: Vec<String>,
    /// Image name[:version] when building.
    #[arg(long)]
    name: Option<String>,
    #[command(flatten)]
    target_args: TargetArgs,
    #[command(flatten)]
    payload: PayloadArgs,
    #[command(flatten)]
    config: crate::config::ConfigArgs,
    /// Accelerator.
    #[arg(long, value_enum, default_value = "auto")]
    accel: AccelArg,
    /// Guest memory in MiB (default: the image's `memory` from fuse.toml, else 256).
    #[arg(long)]
    memory: Option<u32>,
    /// Guest vCPUs (default: the image's `cpus` from fuse.toml, else 1).
    #[arg(long)]
    cpus: Option<u32>,
    /// Stop the VM after this many seconds (exit code 124).
    #[arg(long, value_name = "SECONDS")]
    timeout: Option<u64>,
    /// Show kernel messages and the QEMU command line.
    #[arg(long)]
    verbose: bool,
    #[command(flatten)]
    selection: crate::environments::SelectionArgs,
    /// Publish a guest port on the host's 127.0.0.1: HOST:GUEST, HOST:GUEST/udp, or PORT
    /// (repeatable).
    #[arg(long, short = 'p', value_name = "HOST:GUEST", value_parser = crate::ports::parse_publish)]
    publish: Vec<fuse_boot::vm::PortForward>,
    /// Wait until the app is healthy: http:/PATH[@GUEST_PORT] (a 2xx/3xx answer) or
    /// tcp[@GUEST_PORT] (default port: the first published one); prints `ready in N ms at URL`.
    #[arg(long, value_name = "CHECK")]
    health: Option<crate::health::HealthCheck>,
    /// How long the health check may take before the VM is stopped (default 60).
    #[arg(long, value_name = "SECONDS", requires = "health")]
    health_timeout: Option<u64>,
    /// Seconds the app gets to exit after SIGTERM (Ctrl-C, `fuse kill`) before the VM is
    /// killed (exit code 137); 0 kills at once.
    #[arg(long, value_name = "SECONDS", default_value_t = 10)]
    grace: u64,
    /// Run in the background: print the instance id and return (see `fuse ps`, `logs`, `kill`).
    #[arg(long, short)]
    detach: bool,
    /// Attach a persistent volume: NAME:/PATH[:SIZE] (created on first use, default 1G; the
    /// image has /data for it). Repeatable.
    #[arg(long, short = 'v', value_name = "NAME:/PATH[:SIZE]")]
    volume: Vec<crate::volumes::VolumeSpec>,
    /// How to boot the image's disk: direct (QEMU loads the kernel and initramfs out of the
    /// disk; fastest) or uefi (OVMF firmware boots the disk, as a cloud does).
    #[arg(long, value_enum, default_value = "direct")]
    firmware: crate::disk_image::BootMode,
}

fn parse_kind(s: &str) -> Result<Kind, String> {
    s.parse::<Kind>()
}

fn parse_arch(s: &str) -> Result<Arch, String> {
    s.parse::<Arch>().map_err(|e| e.to_string())
}

/// Entry point: runs the command line, prints errors as one line, returns the exit code.
pub fn main() -> i32 {
    let cli = Cli::parse_from(crate::environments::normalize_args(std::env::args_os()));
    match dispatch(cli) {
        Ok(code) => code,
        Err(err) => {
            eprintln!("fuse: error: {err:#}");
            exit_code_of(&err)
        }
    }
}

/// Exit codes a shell user expects: 124 for a timeout (like timeout(1)); when a stop signal
/// killed the VM, 128 + the signal for a forced stop (130 for a second Ctrl-C) and 137 (as if
/// SIGKILLed) when the app outlived the grace period. An app that stopped in time reports its
/// own code, without an error.
fn exit_code_of(err: &anyhow::Error) -> i32 {
    use fuse_boot::vm::RunError;
    match err.chain().find_map(|e| e.downcast_ref::<RunError>()) {
        Some(RunError::Timeout { .. }) => 124,
        Some(RunError::Interrupted { signal }) => 128 + signal,
        Some(RunError::StopTimeout { .. }) => 128 + libc::SIGKILL,
        _ => 1,
    }
}

fn progress_line(line: &str) {
    eprintln!("fuse: {line}");
}

fn dispatch(cli: Cli) -> Result<i32> {
    match cli.command {
        Command::Build(args) => build(args),
        Command::Run(args) => run_command(args, None),
        Command::Ls(flag) => list(flag.json),
        Command::Rm { images } => remove(&images),
        Command::Inspect { image, json } => inspect(&image, json),
        Command::Verify { image, json } => verify(&image, json),
        Command::Export {
            image,
            format,
            output,
        } => export(&image, format, &output),
        Command::Kernel(KernelCommand::Build { target, json }) => kernel_build(target, json),
        Command::Test(args) => crate::testing::command(args, &mut |l| progress_line(l)),
        Command::Ps(flag) => crate::instance_cli::ps(flag.json),
        Command::Logs { id, follow } => crate::instance_cli::logs(&id, follow),
        Command::Kill { ids } => crate::instance_cli::kill(&ids),
        Command::Supervise { dir, image, run } => supervise(&dir, &image, run),
    }
}

/// `fuse __supervise DIR --image DIGEST -- run ARGS...`: parses the `run` command line as
/// `fuse run` would and runs it as the instance in DIR.
fn supervise(dir: &std::path::Path, digest: &str, run: Vec<std::ffi::OsString>) -> Result<i32> {
    let argv = std::iter::once(std::ffi::OsString::from("fuse")).chain(run);
    let cli = Cli::try_parse_from(crate::environments::normalize_args(argv))
        .context("Invalid run command line for the supervisor")?;
    let Command::Run(mut args) = cli.command else {
        anyhow::bail!("The supervisor runs `run` command lines only");
    };
    // The image was resolved (built) by `fuse run --detach` already.
    args.target = digest.to_string();
    args.detach = false;
    run_command(args, Some((dir, digest)))
}

fn build(args: BuildArgs) -> Result<i32> {
    let store = Store::open_default()?;
    let image = builder::build(
        &store,
        &BuildRequest {
            input: args.app,
            name: args.name,
            arch: args.target.arch,
            kernel_source: args.target.linux_src,
            kind: args.payload.kind,
            interpreters: args.payload.interpreters(),
            jdk: args.payload.jdk,
            config: args.config.path,
            compression: args.payload.compression,
        },
        &mut |l| progress_line(l),
    )?;
    let size = image.manifest.total_size();
    let disk = crate::disk_image::disk_path(&store, &image)?;
    let disk_size = std::fs::metadata(&disk)?.len();
    if let (Some(format), Some(output)) = (args.format, &args.output) {
        crate::disk_image::export(&disk, format, output)?;
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

fn run_command(args: RunArgs, supervised: Option<(&std::path::Path, &str)>) -> Result<i32> {
    let store = Store::open_default()?;
    let detach = args.detach;
    let mut health = args.health;
    if let (Some(h), Some(secs)) = (health.as_mut(), args.health_timeout) {
        h.timeout = Duration::from_secs(secs);
    }
    let request = RunRequest {
        publish: args.publish,
        health,
        grace: Duration::from_secs(args.grace),
        volumes: args.volume,
        firmware: args.firmware,
        target: args.target,
        args: args.args,
        name: args.name,
        arch: args.target_args.arch,
        kernel_source: args.target_args.linux_src,
        kind: args.payload.kind,
        interpreters: args.payload.interpreters(),
        jdk: args.payload.jdk,
        compression: args.payload.compression,
        config: args.config.path,
        selection: args.selection.selection()?,
        accel: match args.accel {
            AccelArg::Auto => AccelChoice::Auto,
            AccelArg::Kvm => AccelChoice::Kvm,
            AccelArg::Tcg => AccelChoice::Tcg,
        },
        memory_mib: args.memory,
        cpus: args.cpus,
        timeout: args.timeout.map(Duration::from_secs),
        verbose: args.verbose,
    };
    let code = match supervised {
        Some((dir, digest)) => crate::instances::supervise(&store, &request, dir, digest)?,
        None if detach => return crate::instance_cli::detach(&store, &request),
        None => run::run(&store, &request, &mut |l| progress_line(l))?,
    };
    Ok(i32::from(code))
}

fn list(json_output: bool) -> Result<i32> {
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
        .with_context(|| format!("No image '{reference}' in the store: see `fuse ls`"))
}

fn remove(images: &[String]) -> Result<i32> {
    let store = Store::open_default()?;
    for reference in images {
        let image = find(&store, reference)?;
        let freed = store.remove(&image)?;
        println!("removed {} ({} freed)", image.name, human_size(freed));
    }
    Ok(0)
}

/// The image (or disk file) `reference` names: its name, digest, manifest and disk.
fn open_target(
    store: &Store,
    reference: &str,
) -> Result<(
    String,
    String,
    crate::manifest::Manifest,
    fuse_boot::disk::Disk,
)> {
    let target = crate::disk_image::resolve(store, reference)?;
    let disk = fuse_boot::disk::read_disk(&target.path)?;
    Ok(match target.image {
        Some(image) => (image.name.to_string(), image.digest, image.manifest, disk),
        None => {
            let m = crate::disk_image::manifest_of(&disk)?;
            let d = fuse_boot::disk::file_digest(&target.path)?;
            (m.reference(), d, m, disk)
        }
    })
}

fn inspect(reference: &str, json_output: bool) -> Result<i32> {
    let store = Store::open_default()?;
    let (name, image_digest, manifest, disk) = open_target(&store, reference)?;
    let m = &manifest;
    if json_output {
        let mut value = serde_json::to_value(m)?;
        value["image"] = json!(name);
        value["digest"] = json!(image_digest);
        value["size"] = json!(m.total_size());
        value["disk"] = crate::disk_image::layout_json(&disk);
        println!("{}", serde_json::to_string_pretty(&value)?);
        return Ok(0);
    }
    println!("Image:    {name}");
    println!("Digest:   {image_digest}");
    println!("Arch:     {}", m.arch);
    println!("Size:     {}", human_size(m.total_size()));
    println!("Cmdline:  {}", m.cmdline);
    crate::disk_image::print_layout(&disk);
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

fn verify(reference: &str, json_output: bool) -> Result<i32> {
    let store = Store::open_default()?;
    let target = crate::disk_image::resolve(&store, reference)?;
    // The manifest: the store's for an image (checked against the disk's .fuse), else the
    // disk's own.
    let (manifest, manifest_digest, disk_digest) = match &target.image {
        Some(image) => (
            image.manifest.clone(),
            Some(image.manifest.digest()),
            Some(image.digest.clone()),
        ),
        None => {
            let disk = fuse_boot::disk::read_disk_any(&target.path)
                .map_err(|e| anyhow::anyhow!("{e}: cannot read its manifest to verify against"))?;
            (crate::disk_image::manifest_of(&disk)?, None, None)
        }
    };
    let mut expected = crate::disk_image::expected(Some(&store), &manifest, disk_digest.as_deref());
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
            "{}: ok (GPT, ESP, UKI sections .linux .initrd .cmdline .fuse, root partition)",
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

fn export(
    reference: &str,
    format: crate::disk_image::ExportFormat,
    output: &std::path::Path,
) -> Result<i32> {
    let store = Store::open_default()?;
    let target = crate::disk_image::resolve(&store, reference)?;
    crate::disk_image::export(&target.path, format, output)?;
    println!("{} {}", output.display(), format.as_str());
    Ok(0)
}

fn kernel_build(target: TargetArgs, json_output: bool) -> Result<i32> {
    let request = KernelRequest {
        arch: target.arch.unwrap_or_else(Arch::host),
        source: target.linux_src,
    };
    let kernel = kernel::ensure(&request, &mut |l| progress_line(l))?;
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
