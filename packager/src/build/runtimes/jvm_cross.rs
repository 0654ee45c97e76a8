//! Java runtimes for another architecture (an arm64 image built on an x86_64 host).
//!
//! jlink links the jmods of any architecture, but only with the exact version of the JDK it
//! runs from: the *target* JDK (arm64: its jmods, its `release`, its native libraries) and a
//! *tools* JDK of the same version for the host (its jlink and jdeps) are two JDKs. Without
//! `--jdk`, the target JDK is Debian's `openjdk-17-jdk-headless` for the target arch, unpacked
//! in fuse's sysroot (see `crate::sysroot`); the tools JDK is the host's own JDK when its
//! version matches, else Debian's host-arch package of exactly the target's version, unpacked
//! in the cache (`<cache>/sysroots/<host>-debian12`). `--jdk PATH` names the target JDK
//! instead (for example one in a `--sysroot`); a host JDK of its version must then exist.

use super::jvm::{find_jdk, jdk_candidates, Jdk};
use crate::sysroot::{self, Sysroot};
use anyhow::{bail, Context, Result};
use fuse_rootfs::Arch;
use std::path::{Path, PathBuf};

/// The Debian JDK a foreign-arch Java image gets by default.
pub const DEBIAN_JDK: &str = "openjdk-17-jdk-headless";
/// Its runtime half: `lib/modules`, `libjvm.so` (jlink needs the JDK complete).
pub const DEBIAN_JRE: &str = "openjdk-17-jre-headless";

/// The target JDK for `arch` with its tools set to a host JDK of the same version, and the
/// sysroot its libraries resolve in.
pub fn target_jdk(
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
