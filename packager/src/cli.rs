//! The command line: every command and flag of `fuse`, and how each maps onto the library.

use crate::builder::{self, BuildRequest};
use crate::digest;
use crate::fsutil::human_size;
use crate::kernel::{self, KernelRequest};
use crate::run::{self, RunRequest};
use crate::store::{Store, StoredImage};
use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand, ValueEnum};
use fuse_boot::accel::AccelChoice;
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
    /// Show what an image is made of: components, sizes, largest files, app spec.
    Inspect {
        /// Image (name[:version] or digest).
        image: String,
        #[arg(long)]
        json: bool,
    },
    /// Manage the guest kernel.
    #[command(subcommand)]
    Kernel(KernelCommand),
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

#[derive(Debug, Args)]
struct BuildArgs {
    /// The app: an ELF executable.
    app: PathBuf,
    /// Image name[:version] (default: from the file name, hello-1.0 gives hello:1.0).
    #[arg(long)]
    name: Option<String>,
    #[command(flatten)]
    target: TargetArgs,
    /// Machine-readable output.
    #[arg(long)]
    json: bool,
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
    /// Accelerator.
    #[arg(long, value_enum, default_value = "auto")]
    accel: AccelArg,
    /// Guest memory in MiB.
    #[arg(long, default_value_t = 256)]
    memory: u32,
    /// Guest vCPUs.
    #[arg(long, default_value_t = 1)]
    cpus: u32,
    /// Stop the VM after this many seconds (exit code 124).
    #[arg(long, value_name = "SECONDS")]
    timeout: Option<u64>,
    /// Show kernel messages and the QEMU command line.
    #[arg(long, short)]
    verbose: bool,
}

fn parse_arch(s: &str) -> Result<Arch, String> {
    s.parse::<Arch>().map_err(|e| e.to_string())
}

/// Entry point: runs the command line, prints errors as one line, returns the exit code.
pub fn main() -> i32 {
    let cli = Cli::parse();
    match dispatch(cli) {
        Ok(code) => code,
        Err(err) => {
            eprintln!("fuse: error: {err:#}");
            exit_code_of(&err)
        }
    }
}

/// Exit codes a shell user expects: 124 for a timeout (like timeout(1)), 130 for Ctrl-C.
fn exit_code_of(err: &anyhow::Error) -> i32 {
    use fuse_boot::qemu::RunError;
    match err.chain().find_map(|e| e.downcast_ref::<RunError>()) {
        Some(RunError::Timeout { .. }) => 124,
        Some(RunError::Interrupted { .. }) => 130,
        _ => 1,
    }
}

fn progress_line(line: &str) {
    eprintln!("fuse: {line}");
}

fn dispatch(cli: Cli) -> Result<i32> {
    match cli.command {
        Command::Build(args) => build(args),
        Command::Run(args) => run_command(args),
        Command::Ls(flag) => list(flag.json),
        Command::Rm { images } => remove(&images),
        Command::Inspect { image, json } => inspect(&image, json),
        Command::Kernel(KernelCommand::Build { target, json }) => kernel_build(target, json),
    }
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
        },
        &mut |l| progress_line(l),
    )?;
    let size = image.manifest.total_size();
    if args.json {
        println!(
            "{}",
            json!({
                "image": image.name.to_string(),
                "digest": image.digest,
                "size": size,
                "arch": image.manifest.arch.as_str(),
            })
        );
    } else {
        println!("{} {} {}", image.name, image.digest, human_size(size));
    }
    Ok(0)
}

fn run_command(args: RunArgs) -> Result<i32> {
    let store = Store::open_default()?;
    let request = RunRequest {
        target: args.target,
        args: args.args,
        name: args.name,
        arch: args.target_args.arch,
        kernel_source: args.target_args.linux_src,
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
    let code = run::run(&store, &request, &mut |l| progress_line(l))?;
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

fn inspect(reference: &str, json_output: bool) -> Result<i32> {
    let store = Store::open_default()?;
    let image = find(&store, reference)?;
    let m = &image.manifest;
    if json_output {
        let mut value = serde_json::to_value(m)?;
        value["image"] = json!(image.name.to_string());
        value["digest"] = json!(image.digest);
        value["size"] = json!(m.total_size());
        println!("{}", serde_json::to_string_pretty(&value)?);
        return Ok(0);
    }
    println!("Image:    {}", image.name);
    println!("Digest:   {}", image.digest);
    println!("Arch:     {}", m.arch);
    println!("Size:     {}", human_size(m.total_size()));
    println!("Cmdline:  {}", m.cmdline);
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
    println!("App ({}):", m.app.kind);
    println!("  exe:  {}", m.app.exe);
    println!("  args: {:?}", m.app.args);
    println!("  cwd:  {}", m.app.cwd);
    println!("  env:  {}", m.app.env.join(" "));
    println!("Largest files:");
    for f in &m.contents.largest {
        println!("  {:>10}  {}", human_size(f.size), f.path);
    }
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
