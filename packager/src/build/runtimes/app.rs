//! What every runtime takes ([`RuntimeInput`]) and makes ([`AppImage`]), and the spec and
//! environment every app starts with.

use crate::host::sysroot::{self, Sysroot};
use crate::image::naming::ImageName;
use anyhow::{bail, Result};
use fuse_boot::spec::AppSpec;
use fuse_rootfs::elf::{self, Closure, ClosureOptions, ElfError};
use fuse_rootfs::tree::Tree;
use fuse_rootfs::Arch;
use std::collections::BTreeSet;
use std::path::Path;

/// What a runtime produces for the builder.
#[derive(Debug)]
pub(crate) struct AppImage {
    pub(crate) tree: Tree,
    pub(crate) spec: AppSpec,
    /// Runtime-specific facts recorded in the manifest (e.g. the JDK version and modules).
    pub(crate) notes: Vec<(String, String)>,
}

/// Everything a runtime gets to decide from.
#[derive(Debug, Clone)]
pub(crate) struct RuntimeInput<'a> {
    pub(crate) input: &'a Path,
    pub(crate) name: &'a ImageName,
    pub(crate) arch: Arch,
    /// The JDK to make a Java runtime from (`--jdk`); `None` searches the host.
    pub(crate) jdk: Option<&'a Path>,
    /// The class a Java app starts (`--main-class`); `None`: `[jvm] main_class`, else the
    /// jar's Main-Class.
    pub(crate) main_class: Option<&'a str>,
    /// Host directories searched for shared libraries after RPATH (`--library-path`).
    pub(crate) library_paths: &'a [std::path::PathBuf],
    /// The node binary for Node.js apps (`--node`); `None` takes `node` from PATH.
    pub(crate) node: Option<&'a Path>,
    /// The interpreter for Python apps (`--python`); `None` takes Debian's /usr/bin/python3.
    pub(crate) python: Option<&'a Path>,
    /// The virtualenv whose site-packages a Python app imports from (`--venv`).
    pub(crate) venv: Option<&'a Path>,
    /// The target's root to take shared libraries from (`--sysroot`); `None`: the host's `/`
    /// for the host's arch, else fuse's Debian sysroot (see `crate::host::sysroot`).
    pub(crate) sysroot: Option<&'a Path>,
    /// Debian packages to add to fuse's sysroot of a foreign arch (`--package`, `[sysroot]
    /// packages`), with their dependencies.
    pub(crate) packages: &'a [String],
    /// The app's `fuse.toml`, if it has one: runtime options are in `config.runtime_table(
    /// "jvm")` / `config.runtime_options("jvm")` (`[jvm] options = [...]`), same for node and
    /// python. Args, env and files of the configuration are applied by the builder after.
    pub(crate) config: Option<&'a crate::build::config::Config>,
}

impl RuntimeInput<'_> {
    /// How the ELF closure of the app's programs is resolved: for its arch, with the user's
    /// library directories.
    pub(crate) fn closure_options(&self) -> fuse_rootfs::elf::ClosureOptions {
        fuse_rootfs::elf::ClosureOptions {
            arch: self.arch,
            extra_library_paths: self.library_paths.to_vec(),
            ..Default::default()
        }
    }
}

/// Resolves the shared-library closure of `program` (placed at `image_path`) in `sysroot`. In
/// fuse's own Debian sysroot a missing library is not the end: the package that ships it is
/// found ([`sysroot::provider`]), added with a notice, and the closure resolved again, so an
/// arm64 program needs no hand-made sysroot. `sysroot` and `options.sysroot` then name the
/// grown sysroot (its notes list the added packages). The host's own libraries (no sysroot) and
/// a user's `--sysroot` are never changed: a missing library there is an error.
pub(crate) fn resolve_closure(
    arch: Arch,
    program: &Path,
    image_path: &str,
    options: &mut ClosureOptions,
    sysroot: &mut Option<Sysroot>,
    progress: &mut dyn FnMut(&str),
) -> Result<Closure> {
    let mut added = BTreeSet::new();
    loop {
        let err = match elf::resolve_closure(program, image_path, options) {
            Ok(closure) => {
                if let Some(current) = sysroot.as_mut() {
                    let used: Vec<(&str, &Path)> = closure
                        .interpreter
                        .iter()
                        .chain(&closure.libraries)
                        .map(|l| (l.name.as_str(), l.host_path.as_path()))
                        .collect();
                    sysroot::record_used(arch, current, &used, progress)?;
                }
                return Ok(closure);
            }
            Err(err) => err,
        };
        let (
            ElfError::MissingLibrary {
                name, needed_by, ..
            },
            Some(current),
        ) = (&err, sysroot.as_ref())
        else {
            return Err(err.into());
        };
        // The needing ELF as the image will have it, not as fuse's cache path.
        let who = needed_by
            .strip_prefix(&current.path)
            .map(|p| format!("/{}", p.display()))
            .unwrap_or_else(|_| needed_by.display().to_string());
        let short = who.rsplit('/').next().unwrap_or(&who).to_string();
        let debian = sysroot::debian_arch(arch);
        if current.requested.is_none() {
            bail!(
                "Missing library {name} needed by {who}: the sysroot {} does not have it: add it there, or its directory with --library-path DIR",
                current.label
            );
        }
        let provider = if name.contains('/') {
            None
        } else {
            sysroot::provider(arch, name, progress)?
        };
        match provider {
            Some(package) if added.insert(package.clone()) => {
                progress(&format!(
                    "Adding Debian package {package} ({debian}) for {name}, needed by {short}"
                ));
                let grown = current
                    .with_package(arch, &package, progress)?
                    .expect("a sysroot with requested packages is fuse's");
                options.sysroot = grown.path.clone();
                *sysroot = Some(grown);
            }
            Some(package) => bail!(
                "Missing library {name} needed by {who}: Debian package {package} ({debian}) ships it, but not where the loader looks: give its directory with --library-path DIR"
            ),
            None => bail!(
                "Missing library {name} needed by {who}: no Debian 12 {debian} package ships it: add the package that has it with --package NAME, its directory with --library-path DIR, or use --sysroot PATH"
            ),
        }
    }
}

/// Adds `program` (0755) at `image_path`, its interpreter (0755) and libraries (0644).
pub(crate) fn add_closure(
    tree: &mut Tree,
    program: &Path,
    image_path: &str,
    closure: &Closure,
) -> Result<()> {
    tree.add_host_file(image_path, program, 0o755)?;
    if let Some(interp) = &closure.interpreter {
        tree.add_host_file(&interp.image_path, &interp.host_path, 0o755)?;
    }
    for lib in &closure.libraries {
        tree.add_host_file(&lib.image_path, &lib.host_path, 0o644)?;
    }
    Ok(())
}

/// The interpreters of the script runtimes, as given on the command line.
#[derive(Debug, Clone, Default)]
pub(crate) struct Interpreters {
    /// `--node PATH`: the node binary for Node.js apps.
    pub(crate) node: Option<std::path::PathBuf>,
    /// `--python PATH`: the interpreter for Python apps.
    pub(crate) python: Option<std::path::PathBuf>,
    /// `--venv PATH`: the virtualenv holding a Python app's dependencies.
    pub(crate) venv: Option<std::path::PathBuf>,
    /// `--sysroot PATH`: the target's root the shared libraries come from.
    pub(crate) sysroot: Option<std::path::PathBuf>,
}

/// The spec every runtime starts its app with: run from `/app` as root, named after the image.
pub(crate) fn app_spec(
    input: &RuntimeInput<'_>,
    exe: String,
    args: Vec<String>,
    env: Vec<(String, String)>,
) -> AppSpec {
    AppSpec {
        exe,
        args,
        env,
        cwd: crate::build::layout::APP_DIR.into(),
        uid: 0,
        gid: 0,
        caps: None,
        hostname: input.name.name.clone(),
        fixed_args: 0,
    }
}

/// The environment every app starts with: a PATH that covers the image and a HOME.
pub(crate) fn default_env(name: &ImageName) -> Vec<(String, String)> {
    vec![
        ("PATH".into(), "/app:/usr/local/bin:/usr/bin:/bin".into()),
        ("HOME".into(), "/root".into()),
        ("HOSTNAME".into(), name.name.clone()),
        ("LANG".into(), "C.UTF-8".into()),
    ]
}
