//! What every runtime takes ([`RuntimeInput`]) and makes ([`AppImage`]), and the spec and
//! environment every app starts with.

use crate::image::naming::ImageName;
use fuse_boot::spec::AppSpec;
use fuse_rootfs::tree::Tree;
use fuse_rootfs::Arch;
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
