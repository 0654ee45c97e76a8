//! The command line: every command and flag of `fuse`, dispatched to the library; errors
//! printed as one line and mapped to exit codes in one place ([`exit`]).
//!
//! `args` holds the flag groups shared by commands, `images` the image commands (build, ls,
//! rm, inspect, verify, export, userdata, kernel), `instances` the VM commands (run, run -d,
//! ps, logs, kill, prune, the hidden supervisor and relay), `test` the `fuse test` command, `print` the progress lines.

mod args;
mod deploy;
mod exit;
mod images;
mod instances;
mod print;
mod registry;
mod test;

use anyhow::Result;
use args::{parse, TargetArgs};
use clap::{Args, Parser, Subcommand};
use std::path::PathBuf;

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
    Build(images::BuildArgs),
    /// Boot an app or an image under QEMU and exit with the app's exit code.
    Run(instances::RunArgs),
    /// List the images in the local store.
    Ls(JsonFlag),
    /// Remove images from the local store (not one a running instance uses, unless --force).
    Rm {
        /// Images to remove (name[:version] or digest).
        #[arg(required = true)]
        images: Vec<String>,
        /// Remove even an image that running instances were started from.
        #[arg(long, short)]
        force: bool,
    },
    /// Show what an image is made of: its disk (partitions, ESP, UKI sections), components,
    /// sizes, largest files, app spec.
    Inspect {
        /// Image (name[:version] or digest), a disk file, or a registry reference (pulled
        /// when not in the store).
        image: String,
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        registry: registry::RegistryFlags,
    },
    /// Write an SPDX 2.3 JSON bill of materials of an image: the image, kernel, init, runtime,
    /// the packages found in it (jars' Maven coordinates, npm, Python, a sysroot's Debian
    /// packages) and every file with its SHA-256; the same image gives the same bytes.
    Sbom {
        /// Image (name[:version] or digest), or a registry reference whose pushed SBOM (`fuse
        /// push --sbom`) is read back.
        image: String,
        /// Write it to FILE instead of printing it.
        #[arg(long, short, value_name = "FILE")]
        output: Option<PathBuf>,
        #[command(flatten)]
        registry: registry::RegistryFlags,
    },
    /// Check a disk against its manifest: GPT CRCs, partition GUIDs, the ESP, every UKI
    /// section and the root partition; each problem is reported with its location, exit 1.
    Verify {
        /// Image (name[:version] or digest), or a disk file.
        image: String,
        #[arg(long)]
        json: bool,
    },
    /// Write an image's disk in the format a hypervisor or cloud imports, or (nocloud) a seed
    /// disk with one deployment's configuration.
    #[command(
        long_about = "Write an image's disk in the format a hypervisor or cloud imports, or \
            (--format nocloud) a seed disk with one deployment's configuration.\n\n\
            raw, qcow2, vmdk and vhd convert the image's disk: the image itself, the same for \
            every deployment. nocloud writes something else: not the image, but the \
            configuration disk a cloud or hypervisor attaches beside it (a NoCloud seed: a \
            FAT volume labelled CIDATA holding `user-data`, as `fuse userdata` prints it, and \
            `meta-data`); the image's init reads it at boot. Only nocloud takes --env, -e, \
            --env-file and arguments after --."
    )]
    Export {
        /// Image (name[:version] or digest), or a disk file (not with nocloud).
        image: String,
        /// raw (GCE, dd), qcow2 (KVM, OpenStack), vmdk (VMware, AWS import), vhd (Azure): the
        /// image's disk; nocloud: a NoCloud seed disk with this deployment's user-data (not
        /// the image).
        #[arg(long, value_parser = parse::<images::ExportTarget>)]
        format: images::ExportTarget,
        /// The file to write.
        #[arg(long, short)]
        output: PathBuf,
        #[command(flatten)]
        selection: args::SelectionFlags,
    },
    /// Print the user-data of one deployment of an image (the environment, variables and
    /// arguments `fuse run` would pass), for a cloud's user-data field or a seed disk.
    #[command(
        long_about = "Print the user-data of one deployment of an image: the environment, \
            variables and arguments `fuse run` would pass, as one line of JSON \
            ({\"fuse\":1,\"environment\":…,\"env\":{…},\"args\":[…]}). Give it to a cloud as the \
            instance's user-data (EC2: --user-data file://FILE), or write a seed disk with \
            `fuse export --format nocloud`: the image's init reads it at boot when fuse passes \
            no configuration of its own. It holds the values of -e: write it with -o (0600), \
            and `-e KEY` takes KEY's value from your environment, not the command line."
    )]
    Userdata {
        /// Image (name[:version] or digest).
        image: String,
        #[command(flatten)]
        selection: args::SelectionFlags,
        /// Write it to FILE (mode 0600, replaced whole) instead of printing it.
        #[arg(long, short, value_name = "FILE")]
        output: Option<PathBuf>,
    },
    /// Manage the guest kernel.
    #[command(subcommand)]
    Kernel(KernelCommand),
    /// Deploy an image to AWS blue/green (`fuse deploy IMAGE --env ENV`), or list, roll back,
    /// read the console of and destroy deployments; `fuse deploy ami` makes the image's AMI.
    Deploy(deploy::DeployArgs),
    /// Boot an image once and check its exit code, output or HTTP answer (for CI): one line
    /// per check, JUnit/JSON reports, exit 0 when all pass.
    Test(test::TestArgs),
    /// List running instances (started with `fuse run --detach`); with --all, ended ones too.
    Ps {
        /// Also the instances that ended (kept, with their exit code and logs, until
        /// `fuse prune`).
        #[arg(long, short)]
        all: bool,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Show an instance's console output (the app's output).
    Logs {
        /// Instance id (or a unique prefix), from `fuse ps -a`: running or ended.
        id: String,
        /// Keep following the output until the instance ends.
        #[arg(long, short)]
        follow: bool,
    },
    /// Stop instances gracefully: the app gets SIGTERM, and the VM is killed after the
    /// instance's grace period; says how each ended, with the app's exit code.
    Kill {
        /// Instance ids (or unique prefixes), from `fuse ps`.
        #[arg(required = true)]
        ids: Vec<String>,
    },
    /// Remove ended instances (their state and logs): the given ones, or every ended one.
    Prune {
        /// Instance ids (or unique prefixes), from `fuse ps -a`; none: all ended instances.
        ids: Vec<String>,
    },
    /// Push an image to an OCI registry (its parts as layers; blobs there already are skipped);
    /// prints the manifest digest.
    Push(registry::PushArgs),
    /// Pull an image from an OCI registry into the store, as REGISTRY/REPOSITORY:TAG; every
    /// blob and the rebuilt disk are checked against their digests before anything is stored.
    Pull(registry::PullArgs),
    /// Log in to a registry: the credentials go where the Docker config keeps them.
    Login(registry::LoginArgs),
    /// Forget the credentials for a registry.
    Logout {
        /// The registry: HOST[:PORT].
        registry: String,
    },
    /// Internal: runs the VM of a detached instance, as its directory's request file says.
    #[command(name = "__supervise", hide = true)]
    Supervise { dir: PathBuf },
    /// Internal: QEMU runs it per guest connection of `fuse run --metadata-server`, the
    /// connection its stdin and stdout; relays it to HOST:PORT.
    #[command(name = "__relay", hide = true)]
    Relay { target: String },
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

/// Entry point: runs the command line, prints errors as one line, returns the exit code.
pub fn main() -> i32 {
    let cli = Cli::parse_from(args::normalize_args(std::env::args_os()));
    if only_prints(&cli.command) {
        // A reader that stops early (`fuse inspect IMAGE | head`) ends the command quietly,
        // as it ends `ls`, instead of a panic on EPIPE. Not for commands that own a VM, an
        // upload or a lock: they see the write error and clean up.
        // SAFETY: restores a signal's default disposition; no handler, no memory involved.
        unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    }
    match dispatch(cli) {
        Ok(code) => code,
        Err(err) => {
            eprintln!("fuse: error: {err:#}");
            exit::code_of(&err)
        }
    }
}

/// Commands whose only effect is what they print.
fn only_prints(command: &Command) -> bool {
    matches!(
        command,
        Command::Ls(_)
            | Command::Inspect { .. }
            | Command::Sbom { output: None, .. }
            | Command::Verify { .. }
            | Command::Ps { .. }
            | Command::Logs { .. }
    )
}

fn dispatch(cli: Cli) -> Result<i32> {
    match cli.command {
        Command::Build(args) => images::build(args),
        Command::Run(args) => instances::run(args),
        Command::Ls(flag) => images::list(flag.json),
        Command::Rm { images, force } => images::remove(&images, force),
        Command::Inspect {
            image,
            json,
            registry,
        } => images::inspect(&image, json, &registry),
        Command::Sbom {
            image,
            output,
            registry,
        } => images::sbom(&image, output.as_deref(), &registry),
        Command::Verify { image, json } => images::verify(&image, json),
        Command::Export {
            image,
            format,
            output,
            selection,
        } => images::export(&image, format, &output, &selection),
        Command::Userdata {
            image,
            selection,
            output,
        } => images::userdata(&image, &selection, output.as_deref()),
        Command::Kernel(KernelCommand::Build { target, json }) => {
            images::kernel_build(&target, json)
        }
        Command::Deploy(command) => deploy::command(command),
        Command::Test(args) => test::command(args),
        Command::Ps { all, json } => instances::ps(all, json),
        Command::Logs { id, follow } => instances::logs(&id, follow),
        Command::Kill { ids } => instances::kill(&ids),
        Command::Prune { ids } => instances::prune(&ids),
        Command::Push(args) => registry::push(args),
        Command::Pull(args) => registry::pull(args),
        Command::Login(args) => registry::login(args),
        Command::Logout { registry } => registry::logout(&registry),
        Command::Supervise { dir } => instances::supervise(&dir),
        Command::Relay { target } => Ok(instances::relay(&target)),
    }
}
