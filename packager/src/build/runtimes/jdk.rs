//! Finding the JDKs a Java runtime is made from: the host's (for its own arch), and for
//! another architecture (an arm64 image built on an x86_64 host) a target JDK plus a tools JDK.
//!
//! jlink links the jmods of any architecture, but only with the exact version of the JDK it
//! runs from: the *target* JDK (arm64: its jmods, its `release`, its native libraries) and a
//! *tools* JDK of the same version for the host (its jlink and jdeps) are two JDKs. Without
//! `--jdk`, the target JDK is Debian's `openjdk-17-jdk-headless` for the target arch, unpacked
//! in fuse's sysroot (see `crate::host::sysroot`); the tools JDK is the host's own JDK when its
//! version matches, else Debian's host-arch package of exactly the target's version, unpacked
//! in the cache (`<cache>/sysroots/<host>-debian12`). `--jdk PATH` names the target JDK
//! instead (for example one in a `--sysroot`); a host JDK of its version must then exist.

use crate::host::sysroot::{self, Sysroot};
use anyhow::{bail, Context, Result};
use fuse_rootfs::Arch;
use sha2::{Digest, Sha256};
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

/// A JDK on the host.
#[derive(Debug, Clone)]
pub(crate) struct Jdk {
    pub(crate) home: PathBuf,
    /// `JAVA_RUNTIME_VERSION` (or `JAVA_VERSION`) from its `release` file.
    pub(crate) version: String,
    /// The feature release (17), for `jdeps --multi-release`.
    pub(crate) feature: u32,
    /// The modules it has (`MODULES` of its release file).
    pub(crate) modules: BTreeSet<String>,
    /// Its jmods directory; `None` for a JDK that links from its own runtime (JEP 493).
    pub(crate) jmods: Option<PathBuf>,
    /// Identifies the JDK's bits: the `release` file and the name, size and mtime of every
    /// jmod (what jlink reads).
    pub(crate) digest: String,
    /// The home of the JDK whose jlink and jdeps run (a host JDK of the same version), when
    /// this one is for another arch (see [`target_jdk`]); `None`: this JDK's own.
    pub(crate) tools: Option<PathBuf>,
}

/// Where JDKs are looked for when `--jdk` is not given: `$JAVA_HOME`, the JDK of the `jlink`
/// on `PATH` (Debian's alternatives: what the user's `java` is), Debian's `default-java`, then
/// every `/usr/lib/jvm/*` (last name first).
pub(crate) fn jdk_candidates() -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Some(home) = std::env::var_os("JAVA_HOME").filter(|h| !h.is_empty()) {
        out.push(PathBuf::from(home));
    }
    let on_path = std::env::var_os("PATH").and_then(|path| {
        std::env::split_paths(&path)
            .map(|dir| dir.join("jlink"))
            .find(|jlink| jlink.is_file())
    });
    if let Some(home) = on_path
        .and_then(|jlink| std::fs::canonicalize(jlink).ok())
        .and_then(|jlink| Some(jlink.parent()?.parent()?.to_path_buf()))
    {
        out.push(home);
    }
    out.push(PathBuf::from("/usr/lib/jvm/default-java"));
    if let Ok(entries) = std::fs::read_dir("/usr/lib/jvm") {
        let mut dirs: Vec<PathBuf> = entries.filter_map(|e| Some(e.ok()?.path())).collect();
        dirs.sort();
        dirs.reverse();
        out.extend(dirs);
    }
    out
}

/// The JDK to use: `explicit` (from `--jdk`) or the first of `candidates` with jlink.
pub(crate) fn find_jdk(explicit: Option<&Path>, candidates: &[PathBuf]) -> Result<Jdk> {
    if let Some(home) = explicit {
        if !home.join("bin/jlink").is_file() || !home.join("bin/jdeps").is_file() {
            bail!(
                "No JDK at {} (no bin/jlink or bin/jdeps): give --jdk the home of a full JDK, not a JRE",
                home.display()
            );
        }
        return open_jdk(home);
    }
    match candidates
        .iter()
        .find(|c| c.join("bin/jlink").is_file() && c.join("bin/jdeps").is_file())
    {
        Some(home) => open_jdk(home),
        None => bail!(
            "No JDK found to build a Java runtime with (jlink and jdeps are needed): apt-get install openjdk-17-jdk-headless, or pass --jdk PATH"
        ),
    }
}

fn open_jdk(home: &Path) -> Result<Jdk> {
    let home = std::fs::canonicalize(home)
        .with_context(|| format!("Cannot open the JDK at {}", home.display()))?;
    let release = std::fs::read_to_string(home.join("release")).with_context(|| {
        format!(
            "JDK at {} has no release file: give --jdk the home of a full JDK",
            home.display()
        )
    })?;
    let field = |key: &str| {
        release.lines().find_map(|l| {
            let v = l.strip_prefix(key)?.strip_prefix('=')?;
            Some(v.trim_matches('"').to_string())
        })
    };
    let version = field("JAVA_RUNTIME_VERSION")
        .or_else(|| field("JAVA_VERSION"))
        .unwrap_or_else(|| "unknown".into());
    let feature = field("JAVA_VERSION")
        .and_then(|v| v.split(['.', '+', '-']).next()?.parse().ok())
        .unwrap_or(17);
    // jlink reads the jmods, or (JDK 24+ without them, JEP 493) the runtime's own modules.
    let jmods = home.join("jmods");
    let linked_from = if jmods.is_dir() {
        std::fs::read_dir(&jmods)
            .with_context(|| format!("Cannot read {}", jmods.display()))?
            .filter_map(|e| Some(e.ok()?.path()))
            .collect()
    } else {
        vec![home.join("lib/modules")]
    };
    let mut listing: Vec<String> = Vec::new();
    for path in linked_from {
        let meta = std::fs::metadata(&path).with_context(|| {
            format!(
                "JDK at {} has neither jmods/ nor lib/modules: apt-get install openjdk-17-jdk-headless, or pass --jdk a full JDK",
                home.display()
            )
        })?;
        let mtime = meta
            .modified()
            .ok()
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        listing.push(format!("{} {} {mtime}", path.display(), meta.len()));
    }
    listing.sort();
    let modules = field("MODULES")
        .map(|m| m.split_whitespace().map(str::to_string).collect())
        .unwrap_or_default();
    let mut h = Sha256::new();
    h.update(release.as_bytes());
    h.update(listing.join("\n").as_bytes());
    Ok(Jdk {
        jmods: jmods.is_dir().then_some(jmods),
        home,
        version,
        modules,
        feature,
        digest: hex::encode(h.finalize()),
        tools: None,
    })
}

impl Jdk {
    pub(crate) fn tool(&self, name: &str) -> PathBuf {
        self.tools
            .as_ref()
            .unwrap_or(&self.home)
            .join("bin")
            .join(name)
    }

    /// Whether the JDK has module `name`.
    pub(crate) fn has_module(&self, name: &str) -> bool {
        self.modules.contains(name)
    }

    /// The arch the JDK's native code is for (`OS_ARCH` of its release file).
    pub(crate) fn check_arch(&self, arch: Arch) -> Result<()> {
        let release = std::fs::read_to_string(self.home.join("release")).unwrap_or_default();
        let os_arch = release
            .lines()
            .find_map(|l| l.strip_prefix("OS_ARCH=").map(|v| v.trim_matches('"')))
            .unwrap_or("");
        let matches = match arch {
            Arch::X86_64 => matches!(os_arch, "x86_64" | "amd64"),
            Arch::Aarch64 => matches!(os_arch, "aarch64" | "arm64"),
        };
        if !os_arch.is_empty() && !matches {
            bail!(
                "JDK at {} is for {os_arch}, the image is for {arch}: pass --jdk a JDK for {arch}",
                self.home.display()
            );
        }
        Ok(())
    }
}

/// The Debian JDK a foreign-arch Java image gets by default.
pub(crate) const DEBIAN_JDK: &str = "openjdk-17-jdk-headless";
/// Its runtime half: `lib/modules`, `libjvm.so` (jlink needs the JDK complete).
pub(crate) const DEBIAN_JRE: &str = "openjdk-17-jre-headless";

/// The target JDK for `arch` with its tools set to a host JDK of the same version, and the
/// sysroot its libraries resolve in.
pub(crate) fn target_jdk(
    arch: Arch,
    explicit_jdk: Option<&Path>,
    explicit_sysroot: Option<&Path>,
    progress: &mut dyn FnMut(&str),
) -> Result<(Jdk, Option<Sysroot>)> {
    let (home, sysroot) = match (explicit_jdk, explicit_sysroot) {
        (Some(home), _) => (
            home.to_path_buf(),
            sysroot::for_build(arch, explicit_sysroot, &[], progress)?,
        ),
        (None, Some(root)) => {
            let sysroot = sysroot::for_build(arch, Some(root), &[], progress)?;
            (debian_jdk_home(root, arch), sysroot)
        }
        (None, None) => {
            // The base libraries with their dependencies, the JDK packages alone: their own
            // dependency tree (fonts, printing, sound, certificates via Java) is not needed for
            // a headless jlink runtime, whose ELF closure is resolved library by library.
            let base = sysroot::for_build(arch, None, &["zlib1g"], progress)?;
            let mut sysroot =
                sysroot::debian_exact(arch, &[DEBIAN_JDK, DEBIAN_JRE, "zlib1g"], progress)?;
            sysroot
                .packages
                .extend(base.into_iter().flat_map(|b| b.packages));
            (debian_jdk_home(&sysroot.path, arch), Some(sysroot))
        }
    };
    let mut jdk = find_jdk(Some(&home), &[])?;
    let debian_version = sysroot
        .as_ref()
        .and_then(|s| s.packages.get(DEBIAN_JDK))
        .cloned();
    jdk.tools = Some(tools_jdk(&jdk, debian_version.as_deref(), progress)?);
    Ok((jdk, sysroot))
}

/// Debian's JDK home for `arch` inside `root`.
fn debian_jdk_home(root: &Path, arch: Arch) -> PathBuf {
    root.join(format!(
        "usr/lib/jvm/java-17-openjdk-{}",
        sysroot::debian_arch(arch)
    ))
}

/// A host JDK home whose version is `target`'s: the host's own, else Debian's package of the
/// same Debian version for the host's arch.
fn tools_jdk(
    target: &Jdk,
    debian_version: Option<&str>,
    progress: &mut dyn FnMut(&str),
) -> Result<PathBuf> {
    if let Ok(host) = find_jdk(None, &jdk_candidates()) {
        if host.version == target.version {
            return Ok(host.home);
        }
    }
    let Some(debian_version) = debian_version else {
        bail!(
            "No host JDK of version {} to run jlink with for the JDK at {}: install one, or leave out --jdk to use Debian's",
            target.version,
            target.home.display()
        );
    };
    let host = Arch::host();
    let pin = |p: &str| format!("{p}={debian_version}");
    let (jdk, jre) = (pin(DEBIAN_JDK), pin(DEBIAN_JRE));
    let root = sysroot::debian_exact(host, &[&jdk, &jre], progress)
        .context("Cannot fetch a host JDK of the target JDK's version to run jlink with")?;
    let home = debian_jdk_home(&root.path, host);
    let tools = find_jdk(Some(&home), &[])?;
    if tools.version != target.version {
        bail!(
            "The host JDK at {} is {}, the target JDK is {}: jlink needs both the same",
            home.display(),
            tools.version,
            target.version
        );
    }
    Ok(home)
}
