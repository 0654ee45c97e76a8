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
    /// The packages asked for (with their dependencies) when fuse made it, which packages
    /// found for missing libraries can be added to ([`Sysroot::with_package`]); `None` for a
    /// user-given sysroot and for exact (dependency-less) ones.
    pub(crate) requested: Option<Vec<String>>,
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

    /// This fuse-made sysroot of `arch` with `package` (and its dependencies) added too;
    /// `None` when fuse did not make it (a user's `--sysroot` is never changed).
    pub(crate) fn with_package(
        &self,
        arch: Arch,
        package: &str,
        progress: &mut dyn FnMut(&str),
    ) -> Result<Option<Sysroot>> {
        let Some(requested) = &self.requested else {
            return Ok(None);
        };
        let mut wanted: Vec<&str> = requested.iter().map(String::as_str).collect();
        if !wanted.contains(&package) {
            wanted.push(package);
        }
        debian(arch, &wanted, progress).map(Some)
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
            requested: None,
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
    /// Library soname -> the package that ships it (`None`: none does), as [`provider`] found.
    #[serde(default)]
    providers: BTreeMap<String, Option<String>>,
    /// File (relative to the root) -> the package it was unpacked from (sysroots made before
    /// this was recorded lack the packages unpacked then).
    #[serde(default)]
    owners: BTreeMap<String, String>,
}

impl State {
    fn load(dir: &Path) -> State {
        std::fs::read(dir.join("sysroot.json"))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default()
    }

    fn save(&self, dir: &Path) -> Result<()> {
        crate::host::fs::write_atomic(&dir.join("sysroot.json"), &serde_json::to_vec_pretty(self)?)
    }
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
    let mut state = State::load(&dir);
    let root = dir.join("root");
    let sysroot = |state: &State, names: &BTreeSet<String>| Sysroot {
        path: root.clone(),
        label: format!("{DEBIAN_RELEASE}/{}", debian_arch(arch)),
        packages: names
            .iter()
            .filter_map(|n| state.unpacked.get(n).map(|v| (n.clone(), v.clone())))
            .collect(),
        requested: recursive.then(|| packages.iter().map(|p| p.to_string()).collect()),
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
            if !apt.knows(p) {
                bail!(
                    "Debian 12 has no {} package {p}: check the name given to --package or [sysroot] packages",
                    debian_arch(arch)
                );
            }
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
        // Which package each file came from: the manifest then names the packages an image's
        // libraries really came from, whatever else the shared root holds.
        for file in deb_files(&deb)? {
            let file = file.trim_start_matches("./").trim_start_matches('/');
            if !file.is_empty() && !file.ends_with('/') {
                state.owners.insert(file.to_string(), name.clone());
            }
        }
        state.unpacked.insert(name.clone(), version);
        std::fs::remove_file(&deb).ok();
    }
    state.save(&dir)?;
    Ok(sysroot(&state, &names))
}

/// Makes `sysroot.packages` name what an image took from fuse's shared sysroot: the packages
/// asked for and, for every file of `used` (host paths in the root), the package it came from
/// with its dependencies. So the manifest is the same whichever other images grew the root
/// first (one that added libssl3 earlier makes this image find libssl.so.3 without adding it).
pub(crate) fn record_used(
    arch: Arch,
    sysroot: &mut Sysroot,
    used: &[(&str, &Path)],
    progress: &mut dyn FnMut(&str),
) -> Result<()> {
    let Some(requested) = &sysroot.requested else {
        return Ok(());
    };
    let dir = debian_dir(arch);
    let _lock = FileLock::exclusive(&dir.join("lock"))?;
    let mut state = State::load(&dir);
    let mut apt = None;
    let mut owners = BTreeSet::new();
    for (name, path) in used {
        let Ok(rel) = path.strip_prefix(&sysroot.path) else {
            continue;
        };
        let owner = match state.owners.get(&rel.to_string_lossy().into_owned()) {
            Some(owner) => Some(owner.clone()),
            // Unpacked before fuse recorded owners: the package that ships the soname.
            None => {
                let soname = name.rsplit('/').next().unwrap_or(name);
                provider_in(arch, &dir, &mut state, &mut apt, soname, progress)?
            }
        };
        owners.extend(owner);
    }
    let mut names: BTreeSet<String> = BTreeSet::new();
    for p in requested.iter().chain(&owners) {
        if !state.requested.contains_key(p) {
            let apt = match &mut apt {
                Some(apt) => apt,
                None => apt.insert(Apt::new(arch, &dir)?),
            };
            let closure = apt.depends(p)?;
            state.requested.insert(p.clone(), closure);
        }
        names.extend(state.requested[p].iter().cloned());
    }
    if apt.is_some() {
        state.save(&dir)?;
    }
    sysroot.packages = names
        .into_iter()
        .filter_map(|n| state.unpacked.get(&n).map(|v| (n, v.clone())))
        .collect();
    Ok(())
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

/// The Debian package of `arch` that ships the shared library `soname` in a standard library
/// directory, `None` if no package does. First the package Debian's policy names after the
/// soname (`libssl.so.3` -> `libssl3`, `liblua5.1.so.0` -> `liblua5.1-0`), taken only if its
/// `.deb` really holds the file; else the archive's index of package contents (`Contents-arm64`:
/// 11 MB, fetched once with the 34 MB `Contents-all` apt brings along and drops, 143 MB read
/// per lookup, 2 to 4 s). The answer is kept in the sysroot's state, so a rebuild asks nothing.
pub(crate) fn provider(
    arch: Arch,
    soname: &str,
    progress: &mut dyn FnMut(&str),
) -> Result<Option<String>> {
    let dir = debian_dir(arch);
    let _lock = FileLock::exclusive(&dir.join("lock"))?;
    let mut state = State::load(&dir);
    let mut apt = None;
    let found = provider_in(arch, &dir, &mut state, &mut apt, soname, progress)?;
    if apt.is_some() {
        state.save(&dir)?;
    }
    Ok(found)
}

/// [`provider`] under the sysroot's lock: `state` caches the answer, `apt` is made on first
/// need (a cached answer needs none).
fn provider_in(
    arch: Arch,
    dir: &Path,
    state: &mut State,
    apt: &mut Option<Apt>,
    soname: &str,
    progress: &mut dyn FnMut(&str),
) -> Result<Option<String>> {
    if let Some(known) = state.providers.get(soname) {
        return Ok(known.clone());
    }
    let apt = match apt {
        Some(apt) => apt,
        None => {
            let made = Apt::new(arch, dir)?;
            made.update()?;
            apt.insert(made)
        }
    };
    let lib_dirs = fuse_rootfs::elf::standard_dirs(arch);
    let mut found = None;
    if let Some(candidate) = policy_package(soname) {
        if apt.knows(&candidate) {
            let probe = dir.join("probe");
            std::fs::remove_dir_all(&probe).ok();
            std::fs::create_dir_all(&probe)?;
            apt.download(&[&candidate], &probe)?;
            let deb = find_deb(&probe, &candidate, debian_arch(arch))?;
            let files = deb_files(&deb)?;
            std::fs::remove_dir_all(&probe).ok();
            if files.iter().any(|f| ships(f, soname, &lib_dirs)) {
                found = Some(candidate);
            }
        }
    }
    if found.is_none() {
        if !apt.has_contents() {
            progress(&format!(
                "Fetching Debian's index of {} package contents (about 45 MB, once; cached) to find {soname}",
                debian_arch(arch)
            ));
        }
        found = apt.contents_provider(soname, &lib_dirs)?;
    }
    state.providers.insert(soname.to_string(), found.clone());
    Ok(found)
}

/// The package Debian's policy (8.1) names after a library's soname: `libfoo.so.N` is in
/// `libfooN`, `libfoo2.so.N` (a name ending in a digit) in `libfoo2-N`. `None` for sonames
/// without a version after `.so`. Exceptions exist (`libcrypto.so.3` is in `libssl3`,
/// `libz.so.1` in `zlib1g`), which is why the caller checks the package's files.
fn policy_package(soname: &str) -> Option<String> {
    let (name, version) = soname.split_once(".so.")?;
    if name.is_empty() || version.is_empty() {
        return None;
    }
    let name = name.to_ascii_lowercase().replace('_', "-");
    let package = if name.ends_with(|c: char| c.is_ascii_digit()) {
        format!("{name}-{version}")
    } else {
        format!("{name}{version}")
    };
    package
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || "+-.".contains(c))
        .then_some(package)
}

/// Whether `path` (a package's file, `usr/lib/aarch64-linux-gnu/libssl.so.3`, with or without a
/// leading `./` or `/`) is `soname` in one of the standard library directories `lib_dirs`.
fn ships(path: &str, soname: &str, lib_dirs: &[String]) -> bool {
    let path = path.trim_start_matches("./").trim_start_matches('/');
    lib_dirs.iter().any(|dir| {
        path.strip_prefix(dir.trim_start_matches('/'))
            .and_then(|rest| rest.strip_prefix('/'))
            == Some(soname)
    })
}

/// The packages a line of a Contents index names for `soname` (`PATH  section/pkg,section/pkg2`).
fn contents_line_packages<'a>(line: &'a str, soname: &str, lib_dirs: &[String]) -> Vec<&'a str> {
    let Some((path, locations)) = line.trim_end().rsplit_once(char::is_whitespace) else {
        return Vec::new();
    };
    if !ships(path.trim_end(), soname, lib_dirs) {
        return Vec::new();
    }
    locations
        .split(',')
        .map(|l| l.rsplit('/').next().unwrap_or(l))
        .collect()
}

/// The paths of the files (and links) in a `.deb`, as `dpkg-deb -c` lists them (`./usr/...`).
fn deb_files(deb: &Path) -> Result<Vec<String>> {
    let out = Command::new("dpkg-deb")
        .arg("-c")
        .arg(deb)
        .output()
        .context("Cannot run dpkg-deb: apt-get install dpkg")?;
    if !out.status.success() {
        bail!(
            "Cannot list {}: dpkg-deb failed ({})",
            deb.display(),
            out.status
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(deb_listing_path)
        .map(str::to_string)
        .collect())
}

/// The path of one line of `dpkg-deb -c` (`-rw-r--r-- root/root 1234 2023-01-01 10:00 ./x`, a
/// link ending in ` -> target`).
fn deb_listing_path(line: &str) -> Option<&str> {
    let mut rest = line;
    for _ in 0..5 {
        rest = rest.trim_start().split_once(char::is_whitespace)?.1;
    }
    let path = rest.trim_start();
    Some(path.split(" -> ").next().unwrap_or(path))
}

/// The host's apt-get, pointed at the target arch with a private package state.
struct Apt {
    options: Vec<String>,
    lists: PathBuf,
    /// Where the Contents indexes are kept (`<sysroot dir>/apt/contents`).
    contents: PathBuf,
    /// Debian's name of the target arch.
    arch: &'static str,
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
            // Keep apt's parsed package cache (Docker images switch it off): without it every
            // apt-cache call parses the 19 MB of lists again, 2 to 4 s; with it 0.5 s, for
            // 37 MB of disk (the source-side twin would double that and save nothing).
            "Dir::Cache::pkgcache=pkgcache.bin".into(),
            "Dir::Cache::srcpkgcache=".into(),
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
        Ok(Apt {
            options,
            lists,
            contents: state.join("contents"),
            arch: a,
        })
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
                    // `_Packages`, or `_Packages.lz4` where apt keeps its lists compressed.
                    .any(|e| e.file_name().to_string_lossy().contains("_Packages"))
            })
            .unwrap_or(false);
        if has_lists {
            return Ok(());
        }
        self.refresh()
    }

    /// Fetches the package lists anew.
    fn refresh(&self) -> Result<()> {
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

    /// Whether the package lists have a real package called `name` (a purely virtual one, like
    /// `libz1`, has no version to download and shows nothing).
    fn knows(&self, name: &str) -> bool {
        let mut cmd = self.command("apt-cache");
        cmd.args(["show", "--no-all-versions", name]);
        self.run(cmd, "look up a package")
            .is_ok_and(|out| out.starts_with("Package:"))
    }

    /// The options that make `apt-get update` fetch the Contents index too (as apt-file does).
    fn contents_options() -> Vec<String> {
        let t = "Acquire::IndexTargets::deb::Contents-deb";
        [
            format!("{t}::MetaKey=$(COMPONENT)/Contents-$(ARCHITECTURE)"),
            format!("{t}::ShortDescription=Contents-$(ARCHITECTURE)"),
            format!("{t}::Description=$(RELEASE)/$(COMPONENT) $(ARCHITECTURE) Contents (deb)"),
            format!("{t}::PDiffs=false"),
            format!("{t}::KeepCompressed=true"),
        ]
        .into_iter()
        .flat_map(|o| ["-o".to_string(), o])
        .collect()
    }

    /// The Contents indexes already fetched, kept out of apt's lists directory (which apt
    /// prunes of the targets it is not configured for on its next download).
    fn contents_files(&self) -> Vec<PathBuf> {
        let mut files: Vec<PathBuf> = std::fs::read_dir(&self.contents)
            .map(|d| d.flatten().map(|e| e.path()).collect())
            .unwrap_or_default();
        files.sort();
        files
    }

    fn has_contents(&self) -> bool {
        !self.contents_files().is_empty()
    }

    /// Fetches the Contents indexes of the target arch (the `all` ones come too, and are
    /// dropped: architecture-independent packages ship no shared libraries).
    fn fetch_contents(&self) -> Result<()> {
        let mut cmd = self.command("apt-get");
        cmd.args(Apt::contents_options()).arg("update");
        self.run(cmd, "fetch Debian's index of package contents")?;
        std::fs::create_dir_all(&self.contents)?;
        let wanted = format!("_Contents-{}.", self.arch);
        for entry in std::fs::read_dir(&self.lists)?.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if !name.contains("_Contents-") {
                continue;
            }
            if name.contains(&wanted) {
                std::fs::rename(entry.path(), self.contents.join(&name)).with_context(|| {
                    format!("Cannot move {name} to {}", self.contents.display())
                })?;
            } else {
                std::fs::remove_file(entry.path()).ok();
            }
        }
        Ok(())
    }

    /// The package the Contents indexes name for `soname` in a standard library directory
    /// (the first by name if several do, so the answer does not depend on the index order).
    fn contents_provider(&self, soname: &str, lib_dirs: &[String]) -> Result<Option<String>> {
        if !self.has_contents() {
            self.fetch_contents()?;
        }
        let mut found = BTreeSet::new();
        for file in self.contents_files() {
            // apt-helper reads any of the compressions apt keeps its lists in.
            let mut child = Command::new("/usr/lib/apt/apt-helper")
                .arg("cat-file")
                .arg(&file)
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .spawn()
                .context("Cannot run apt-helper: apt-get install apt")?;
            let reader = std::io::BufReader::new(child.stdout.take().expect("piped"));
            for line in std::io::BufRead::split(reader, b'\n') {
                let line = line.with_context(|| format!("Cannot read {}", file.display()))?;
                // 1.6 million lines: skip those whose path cannot be the library before parsing.
                if !path_ends_with(&line, soname.as_bytes()) {
                    continue;
                }
                let line = String::from_utf8_lossy(&line);
                for package in contents_line_packages(&line, soname, lib_dirs) {
                    found.insert(package.to_string());
                }
            }
            let status = child.wait()?;
            if !status.success() {
                bail!(
                    "Cannot read {}: apt-helper failed ({status})",
                    file.display()
                );
            }
        }
        Ok(found.into_iter().next())
    }

    fn download(&self, names: &[&String], into: &Path) -> Result<()> {
        if names.is_empty() {
            return Ok(());
        }
        let attempt = || {
            let mut cmd = self.command("apt-get");
            cmd.arg("download").args(names).current_dir(into);
            self.run(cmd, "download the sysroot's packages")
        };
        if attempt().is_err() {
            // Lists kept from an earlier build can name versions the archive has since
            // replaced (security updates): fetch them anew and try once more.
            self.refresh()?;
            attempt()?;
        }
        Ok(())
    }
}

/// Whether the path at the start of a Contents line (up to the first blank) ends in `/name`.
fn path_ends_with(line: &[u8], name: &[u8]) -> bool {
    let end = line
        .iter()
        .position(|b| *b == b' ' || *b == b'\t')
        .unwrap_or(line.len());
    let path = &line[..end];
    path.len() > name.len() && path.ends_with(name) && path[path.len() - name.len() - 1] == b'/'
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
            requested: None,
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
    fn policy_names_the_package_after_the_soname() {
        for (soname, package) in [
            ("libssl.so.3", Some("libssl3")),
            ("libjemalloc.so.2", Some("libjemalloc2")),
            ("libhiredis.so.0.14", Some("libhiredis0.14")),
            // A name ending in a digit gets a hyphen before the version.
            ("liblua5.1.so.0", Some("liblua5.1-0")),
            ("libnghttp2.so.14", Some("libnghttp2-14")),
            // `_` is not allowed in package names; capitals are lowered.
            ("libgcc_s.so.1", Some("libgcc-s1")),
            ("libstdc++.so.6", Some("libstdc++6")),
            ("libX11.so.6", Some("libx11-6")),
            // No version: nothing to derive, the Contents index decides.
            ("libfoo.so", None),
        ] {
            assert_eq!(policy_package(soname).as_deref(), package, "{soname}");
        }
    }

    #[test]
    fn a_package_ships_a_library_only_in_a_standard_directory() {
        let dirs = fuse_rootfs::elf::standard_dirs(Arch::Aarch64);
        assert!(ships(
            "./usr/lib/aarch64-linux-gnu/libssl.so.3",
            "libssl.so.3",
            &dirs
        ));
        assert!(ships("lib/aarch64-linux-gnu/libz.so.1", "libz.so.1", &dirs));
        assert!(ships("/usr/lib/libfoo.so.1", "libfoo.so.1", &dirs));
        // Another arch's directory, a private directory, a longer name: not the library.
        assert!(!ships(
            "./usr/lib/x86_64-linux-gnu/libssl.so.3",
            "libssl.so.3",
            &dirs
        ));
        assert!(!ships(
            "./usr/lib/aarch64-linux-gnu/engines-3/libssl.so.3",
            "libssl.so.3",
            &dirs
        ));
        assert!(!ships(
            "./usr/lib/aarch64-linux-gnu/libssl.so.3.0",
            "libssl.so.3",
            &dirs
        ));
        assert!(!ships("./usr/share/doc/libssl.so.3", "libssl.so.3", &dirs));
    }

    #[test]
    fn contents_lines_name_the_packages_of_the_library() {
        let dirs = fuse_rootfs::elf::standard_dirs(Arch::Aarch64);
        let line = "usr/lib/aarch64-linux-gnu/libcrypto.so.3                    libs/libssl3";
        assert!(path_ends_with(line.as_bytes(), b"libcrypto.so.3"));
        assert_eq!(
            contents_line_packages(line, "libcrypto.so.3", &dirs),
            ["libssl3"]
        );
        let shared = "lib/aarch64-linux-gnu/libfoo.so.1 libs/libfoo1,non-free/libs/libfoo1-nonfree";
        assert_eq!(
            contents_line_packages(shared, "libfoo.so.1", &dirs),
            ["libfoo1", "libfoo1-nonfree"]
        );
        let other = "usr/lib/aarch64-linux-gnu/libcrypto.so.3.debug  debug/libssl3-dbgsym";
        assert!(!path_ends_with(other.as_bytes(), b"libcrypto.so.3"));
        assert!(contents_line_packages(other, "libcrypto.so.3", &dirs).is_empty());
        let doc = "usr/share/doc/x/libcrypto.so.3 doc/x";
        assert!(contents_line_packages(doc, "libcrypto.so.3", &dirs).is_empty());
    }

    #[test]
    fn dpkg_listing_lines_give_their_paths() {
        assert_eq!(
            deb_listing_path("-rw-r--r-- root/root   4709400 2024-02-01 10:00 ./usr/lib/aarch64-linux-gnu/libcrypto.so.3"),
            Some("./usr/lib/aarch64-linux-gnu/libcrypto.so.3")
        );
        assert_eq!(
            deb_listing_path("lrwxrwxrwx root/root         0 2024-02-01 10:00 ./usr/lib/aarch64-linux-gnu/libz.so.1 -> libz.so.1.2.13"),
            Some("./usr/lib/aarch64-linux-gnu/libz.so.1")
        );
        assert_eq!(deb_listing_path("garbage"), None);
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
