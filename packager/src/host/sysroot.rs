//! Sysroots: where the shared libraries (and runtimes) of an image for another architecture
//! come from, so an x86_64 host builds arm64 images without an arm64 machine.
//!
//! `--sysroot PATH` names one (an unpacked arm64 Debian, `/usr/aarch64-linux-gnu` from
//! `libc6-arm64-cross` for plain C programs, a Buildroot staging dir...). Without it, an image
//! for a foreign arch gets a Debian 12 sysroot that fuse makes itself in
//! `<cache>/sysroots/<arch>-debian12/root`: the packages are fetched with the host's own
//! `apt-get` (the host's sources, but a private package state for the target arch, so the
//! host's dpkg configuration is not touched: no `dpkg --add-architecture`, no root needed) and
//! unpacked with `dpkg-deb -x`. Their names and versions go to the manifest's notes.

use crate::host::lock::FileLock;
use anyhow::{bail, Context, Result};
use fuse_rootfs::Arch;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// The distribution release of fuse-made sysroots.
pub(crate) const DEBIAN_RELEASE: &str = "debian12";
/// What every dynamically linked program needs: the C library and the loader, the GCC
/// runtime, the C++ library.
pub(crate) const BASE_PACKAGES: &[&str] = &["libc6", "libgcc-s1", "libstdc++6"];
/// Manifest note: where the libraries came from.
pub(crate) const NOTE_SYSROOT: &str = "sysroot";
/// Manifest note: the Debian packages of a fuse-made sysroot, `name=version` comma-separated.
pub(crate) const NOTE_PACKAGES: &str = "sysroot.packages";

/// A sysroot to resolve an image's libraries in.
#[derive(Debug, Clone)]
pub(crate) struct Sysroot {
    pub(crate) path: PathBuf,
    /// What the manifest records: the user's path, or `debian12/arm64` for a fuse-made one (not
    /// its cache path, so the same input gives the same digest on every host).
    pub(crate) label: String,
    /// Packages unpacked into it (`name` -> `version`), empty for a user-given sysroot.
    pub(crate) packages: BTreeMap<String, String>,
}

impl Sysroot {
    /// The manifest notes that say where the libraries came from.
    pub(crate) fn notes(&self) -> Vec<(String, String)> {
        let mut notes = vec![(NOTE_SYSROOT.to_string(), self.label.clone())];
        if !self.packages.is_empty() {
            let list: Vec<String> = self
                .packages
                .iter()
                .map(|(name, version)| format!("{name}={version}"))
                .collect();
            notes.push((NOTE_PACKAGES.to_string(), list.join(",")));
        }
        notes
    }
}

/// Debian's name of an architecture.
pub fn debian_arch(arch: Arch) -> &'static str {
    match arch {
        Arch::X86_64 => "amd64",
        Arch::Aarch64 => "arm64",
    }
}

/// The sysroot of a build: `explicit` (`--sysroot`) if given; none (the host's own `/`) for
/// the host's arch; else the fuse-made Debian sysroot of `arch` holding at least `packages`
/// (plus [`BASE_PACKAGES`]) and everything they depend on.
pub(crate) fn for_build(
    arch: Arch,
    explicit: Option<&Path>,
    packages: &[&str],
    progress: &mut dyn FnMut(&str),
) -> Result<Option<Sysroot>> {
    if let Some(path) = explicit {
        if !path.is_dir() {
            bail!(
                "Sysroot {} is not a directory: give the root of an unpacked {arch} system (--sysroot)",
                path.display()
            );
        }
        return Ok(Some(Sysroot {
            path: path.to_path_buf(),
            label: path.display().to_string(),
            packages: BTreeMap::new(),
        }));
    }
    if arch == Arch::host() {
        return Ok(None);
    }
    let mut wanted: Vec<&str> = BASE_PACKAGES.to_vec();
    wanted.extend_from_slice(packages);
    debian(arch, &wanted, progress).map(Some)
}

/// What a fuse-made sysroot holds (`sysroot.json` beside `root/`).
#[derive(Debug, Default, Serialize, Deserialize)]
struct State {
    /// Packages asked for -> the packages of their dependency closure.
    requested: BTreeMap<String, Vec<String>>,
    /// Every unpacked package -> version.
    unpacked: BTreeMap<String, String>,
}

/// The directory of the fuse-made Debian sysroot of `arch` (the root is its `root/`).
pub(crate) fn debian_dir(arch: Arch) -> PathBuf {
    crate::host::paths::cache_dir()
        .join("sysroots")
        .join(format!("{arch}-{DEBIAN_RELEASE}"))
}

/// The fuse-made Debian sysroot of `arch` with `packages` and their dependencies unpacked.
pub(crate) fn debian(
    arch: Arch,
    packages: &[&str],
    progress: &mut dyn FnMut(&str),
) -> Result<Sysroot> {
    debian_with(arch, packages, true, progress)
}

/// [`debian`] with exactly `packages` added (no dependencies: for packages that bring files,
/// not libraries, like a JDK whose ELF closure is resolved later, library by library).
pub(crate) fn debian_exact(
    arch: Arch,
    packages: &[&str],
    progress: &mut dyn FnMut(&str),
) -> Result<Sysroot> {
    debian_with(arch, packages, false, progress)
}

fn debian_with(
    arch: Arch,
    packages: &[&str],
    recursive: bool,
    progress: &mut dyn FnMut(&str),
) -> Result<Sysroot> {
    let dir = debian_dir(arch);
    // Requests remember their closure under a key that says which kind they were.
    let key = |p: &str| {
        if recursive {
            p.to_string()
        } else {
            format!("{p} (exact)")
        }
    };
    let _lock = FileLock::exclusive(&dir.join("lock"))?;
    let state_path = dir.join("sysroot.json");
    let mut state: State = std::fs::read(&state_path)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default();
    let root = dir.join("root");
    let sysroot = |state: &State, names: &BTreeSet<String>| Sysroot {
        path: root.clone(),
        label: format!("{DEBIAN_RELEASE}/{}", debian_arch(arch)),
        packages: names
            .iter()
            .filter_map(|n| state.unpacked.get(n).map(|v| (n.clone(), v.clone())))
            .collect(),
    };
    let closure_of = |state: &State| -> Option<BTreeSet<String>> {
        let mut all = BTreeSet::new();
        for p in packages {
            all.extend(state.requested.get(&key(p))?.iter().cloned());
        }
        Some(all)
    };
    if let Some(names) = closure_of(&state) {
        if root.is_dir() && names.iter().all(|n| state.unpacked.contains_key(n)) {
            return Ok(sysroot(&state, &names));
        }
    }

    let apt = Apt::new(arch, &dir)?;
    apt.update()?;
    for p in packages {
        if let std::collections::btree_map::Entry::Vacant(entry) = state.requested.entry(key(p)) {
            entry.insert(if recursive {
                apt.depends(p)?
            } else {
                vec![p.to_string()]
            });
        }
    }
    let names = closure_of(&state).expect("every package was just resolved");
    let missing: Vec<&String> = names
        .iter()
        .filter(|n| !state.unpacked.contains_key(*n))
        .collect();
    let debs = dir.join("debs");
    std::fs::create_dir_all(&debs)?;
    std::fs::create_dir_all(&root)?;
    if !missing.is_empty() {
        progress(&format!(
            "Adding {} Debian {} package(s) to the sysroot in {} (once; cached)",
            missing.len(),
            debian_arch(arch),
            root.display()
        ));
    }
    apt.download(&missing, &debs)?;
    for name in missing {
        let deb = find_deb(&debs, name, debian_arch(arch))?;
        let version = deb_field(&deb, "Version")?;
        let status = Command::new("dpkg-deb")
            .arg("-x")
            .arg(&deb)
            .arg(&root)
            .status()
            .context("Cannot run dpkg-deb: apt-get install dpkg")?;
        if !status.success() {
            bail!(
                "Cannot unpack {}: dpkg-deb failed ({status})",
                deb.display()
            );
        }
        state.unpacked.insert(name.clone(), version);
        std::fs::remove_file(&deb).ok();
    }
    crate::host::fs::write_atomic(&state_path, &serde_json::to_vec_pretty(&state)?)?;
    Ok(sysroot(&state, &names))
}

/// Downloads the `.deb` files of `packages` (no dependencies) for `arch` into `into`, through
/// the same private apt state as the sysroot (the boot benchmark fetches Debian's arm64 kernel
/// this way). Returns their paths, in the order asked.
pub fn download_debs(arch: Arch, packages: &[&str], into: &Path) -> Result<Vec<PathBuf>> {
    let dir = debian_dir(arch);
    let _lock = FileLock::exclusive(&dir.join("lock"))?;
    let apt = Apt::new(arch, &dir)?;
    apt.update()?;
    std::fs::create_dir_all(into)?;
    let names: Vec<String> = packages.iter().map(|p| p.to_string()).collect();
    apt.download(&names.iter().collect::<Vec<_>>(), into)?;
    packages
        .iter()
        .map(|p| find_deb(into, p, debian_arch(arch)))
        .collect()
}

/// The host's apt-get, pointed at the target arch with a private package state.
struct Apt {
    options: Vec<String>,
    lists: PathBuf,
}

impl Apt {
    fn new(arch: Arch, dir: &Path) -> Result<Apt> {
        let state = dir.join("apt");
        let lists = state.join("lists");
        for d in [lists.join("partial"), state.join("cache/archives/partial")] {
            std::fs::create_dir_all(&d)
                .with_context(|| format!("Cannot create {}", d.display()))?;
        }
        let status_file = state.join("status");
        if !status_file.exists() {
            // An empty dpkg status: nothing counts as installed for the target arch.
            std::fs::write(&status_file, b"")?;
        }
        let a = debian_arch(arch);
        let options = [
            format!("APT::Architecture={a}"),
            format!("APT::Architectures={a}"),
            format!("Dir::State::Lists={}", lists.display()),
            format!("Dir::State::status={}", status_file.display()),
            format!("Dir::Cache={}", state.join("cache").display()),
            // The state is private to this sysroot: no need for (or access to) apt's locks.
            "Debug::NoLocking=1".into(),
            // Only the package indexes: no translations, no AppStream metadata.
            "Acquire::Languages=none".into(),
            "Acquire::IndexTargets::deb::DEP-11::DefaultEnabled=false".into(),
            "Acquire::IndexTargets::deb::DEP-11-icons::DefaultEnabled=false".into(),
            "Acquire::IndexTargets::deb::DEP-11-icons-hidpi::DefaultEnabled=false".into(),
        ]
        .into_iter()
        .flat_map(|o| ["-o".to_string(), o])
        .collect();
        Ok(Apt { options, lists })
    }

    fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new(program);
        cmd.arg("-q").args(&self.options).env("LC_ALL", "C");
        cmd
    }

    fn run(&self, mut cmd: Command, what: &str) -> Result<String> {
        let output = cmd
            .stdin(Stdio::null())
            .output()
            .with_context(|| format!("Cannot run apt to {what}: fuse makes foreign-arch sysroots with Debian's apt (or pass --sysroot PATH)"))?;
        if !output.status.success() {
            let stderr = String::from_utf8_lossy(&output.stderr);
            let why = stderr
                .lines()
                .filter(|l| l.starts_with("E:"))
                .collect::<Vec<_>>()
                .join(" ");
            bail!(
                "Cannot {what}: {}",
                if why.is_empty() {
                    stderr.trim()
                } else {
                    why.trim()
                }
            );
        }
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    }

    /// Fetches the target arch's package indexes when there are none yet.
    fn update(&self) -> Result<()> {
        let has_lists = std::fs::read_dir(&self.lists)
            .map(|d| {
                d.flatten()
                    .any(|e| e.file_name().to_string_lossy().ends_with("_Packages"))
            })
            .unwrap_or(false);
        if has_lists {
            return Ok(());
        }
        let mut cmd = self.command("apt-get");
        cmd.arg("update");
        self.run(cmd, "fetch the package lists")?;
        Ok(())
    }

    /// `package` and every package it needs at run time (Depends and Pre-Depends, recursively).
    fn depends(&self, package: &str) -> Result<Vec<String>> {
        let mut cmd = self.command("apt-cache");
        cmd.args([
            "depends",
            "--recurse",
            "--no-recommends",
            "--no-suggests",
            "--no-conflicts",
            "--no-breaks",
            "--no-replaces",
            "--no-enhances",
            package,
        ]);
        let out = self.run(cmd, &format!("resolve the dependencies of {package}"))?;
        // Top-level lines are package names; `<virtual>` ones are provided by a real one.
        let mut names: Vec<String> = out
            .lines()
            .filter(|l| !l.starts_with(' ') && !l.starts_with('<') && !l.is_empty())
            .map(|l| l.trim().split(':').next().unwrap_or_default().to_string())
            .collect();
        names.sort();
        names.dedup();
        Ok(names)
    }

    fn download(&self, names: &[&String], into: &Path) -> Result<()> {
        if names.is_empty() {
            return Ok(());
        }
        let mut cmd = self.command("apt-get");
        cmd.arg("download").args(names).current_dir(into);
        self.run(cmd, "download the sysroot's packages")?;
        Ok(())
    }
}

/// The downloaded `.deb` of `name` in `dir` (`name_version_arch.deb`).
fn find_deb(dir: &Path, name: &str, arch: &str) -> Result<PathBuf> {
    // `name=version` asks apt for one version; the file is still `name_<version>_<arch>.deb`.
    let name = name.split('=').next().unwrap_or(name);
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        let file = path.file_name().unwrap_or_default().to_string_lossy();
        if file.starts_with(&format!("{name}_"))
            && (file.ends_with(&format!("_{arch}.deb")) || file.ends_with("_all.deb"))
        {
            return Ok(path);
        }
    }
    bail!(
        "apt-get downloaded no package {name} into {}",
        dir.display()
    )
}

/// A control field (`Version`, `Depends`...) of a `.deb`.
pub fn deb_field(deb: &Path, field: &str) -> Result<String> {
    let out = Command::new("dpkg-deb")
        .arg("-f")
        .arg(deb)
        .arg(field)
        .output()
        .context("Cannot run dpkg-deb: apt-get install dpkg")?;
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notes_name_the_sysroot_and_its_packages() {
        let sysroot = Sysroot {
            path: PathBuf::from("/cache/s"),
            label: "/s".into(),
            packages: [("libc6", "2.36-9"), ("libgcc-s1", "12.2.0-14")]
                .into_iter()
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .collect(),
        };
        assert_eq!(
            sysroot.notes(),
            vec![
                ("sysroot".to_string(), "/s".to_string()),
                (
                    "sysroot.packages".to_string(),
                    "libc6=2.36-9,libgcc-s1=12.2.0-14".to_string()
                )
            ]
        );
    }

    #[test]
    fn host_arch_needs_no_sysroot_and_a_bad_one_is_refused() {
        let mut progress = |_: &str| {};
        assert!(for_build(Arch::host(), None, &[], &mut progress)
            .unwrap()
            .is_none());
        let err = for_build(
            Arch::Aarch64,
            Some(Path::new("/nonexistent")),
            &[],
            &mut progress,
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.starts_with("Sysroot /nonexistent is not a directory"),
            "{err}"
        );
    }
}
