//! JVM apps: an executable jar plus a Java runtime made for it by `jdeps` + `jlink` from the
//! host's JDK, holding only the modules the app needs.
//!
//! Image layout: the runtime at [`RUNTIME_DIR`] (`/opt/java`), the jar at `/app/<name>.jar`,
//! the runtime's native closure (libc, libz, libstdc++...) where the host's loader expects it.
//! The spec runs `java <JvmOptions> -jar /app/<name>.jar`.
//!
//! Two caches keep a warm build (only the jar changed) fast, both under
//! `paths::cache_dir()/jlink`: the module set, keyed by the JDK and the set of JDK classes the
//! bytecode refers to (jdeps is a JVM start plus a scan: seconds; reading the jar's constant
//! pools is milliseconds), and the jlink runtime, keyed by the JDK, the module set and the jlink
//! options.

use super::app::{app_spec, default_env, AppImage, RuntimeInput};
use super::jar::{self, JarInfo};
use super::jarnative;
use super::jdk::{find_jdk, jdk_candidates, target_jdk, Jdk};
use crate::build::layout;
use crate::host::lock::FileLock;
use crate::host::paths;
use crate::image::manifest;
use anyhow::{bail, Context, Result};
use fuse_rootfs::elf::{self, ClosureOptions};
use fuse_rootfs::tree::Tree;
use fuse_rootfs::Arch;
use sha2::{Digest, Sha256};
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Where the runtime goes in the image.
pub(crate) const RUNTIME_DIR: &str = "/opt/java";

/// Bumped when what fuse does to a jlink output changes, so old cache entries are not reused.
const CACHE_VERSION: &str = "fuse-jlink-6";

/// Libraries of `java.desktop` that only a display, a sound card or a splash screen loads: a
/// VM has none (no `DISPLAY`, so AWT is headless and loads `libawt_headless.so` instead), and
/// they would bring X11, ALSA and the splash screen's image decoders into the image (3.8 MB of
/// host libraries). `libfontmanager.so` stays: a headless app draws text with fonts it brings.
const DISPLAY_ONLY_LIBS: &[&str] = &[
    "lib/libawt_xawt.so",
    // JAWT: native code drawing into an AWT window, which needs libawt_xawt.
    "lib/libjawt.so",
    "lib/libjsound.so",
    "lib/libsplashscreen.so",
];

/// The modules used when jdeps cannot decide (it failed, or the app loads classes by
/// reflection beyond what static analysis sees, as Spring Boot does).
///
/// `java.se` is the whole Java SE API an app can portably be written against, `java.desktop`
/// included: `java.beans` lives there and frameworks introspect beans with it. Beyond it, the
/// JDK modules apps reach through reflection or `ServiceLoader`, where jdeps cannot see them:
/// `jdk.unsupported` (`sun.misc.Unsafe`: Netty, serializers), `jdk.crypto.ec` (the TLS
/// elliptic-curve provider), `jdk.zipfs` (`FileSystems.newFileSystem` on a jar),
/// `jdk.management` (the platform MXBeans actuators read), `jdk.httpserver`, `jdk.naming.dns`.
/// Left out on purpose: the compiler, jshell, jlink, debuggers and agents (tools, not a runtime
/// for an app) and `jdk.localedata` (10 MB of locales; `LANG` is C.UTF-8).
pub(crate) const SAFE_MODULES: &[&str] = &[
    "java.se",
    "jdk.unsupported",
    "jdk.crypto.ec",
    "jdk.zipfs",
    "jdk.management",
    "jdk.httpserver",
    "jdk.naming.dns",
];

/// JDK classes whose use means TLS: the elliptic-curve provider is then added, as modern
/// servers negotiate ECDHE and the provider is found through `ServiceLoader` (jdeps cannot
/// see it). It is small (a few hundred KB).
const TLS_CLASS_PREFIXES: &[&str] = &["javax/net/ssl/", "java/net/http/", "java/net/URL"];

/// How the JVM is started: options suited to a small, single-purpose VM. Kept in one place
/// (a config file will set them later); passed on the command line, never via
/// `JAVA_TOOL_OPTIONS`, so the app's environment is exactly the spec's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct JvmOptions {
    /// Maximum heap as a share of the guest's RAM. The JVM's default (25%) is for a machine
    /// shared with other processes; here the app is alone, 75% leaves room for metaspace,
    /// thread stacks, code cache and the page cache.
    pub(crate) max_ram_percentage: u32,
    /// The garbage collector flag. Serial: the VM has 1 vCPU by default and little RAM, where
    /// G1's concurrent threads and remembered sets cost more than they give; it is also what
    /// ergonomics picks below 2 CPUs / 1792 MB, made explicit so `--cpus 2` does not switch.
    /// Start is the same (hello under TCG: 4.47 s Serial, 4.48 s G1).
    pub(crate) gc: String,
    /// Class data sharing: `auto` uses the runtime's archive when it is there and valid.
    pub(crate) share: String,
    /// `-XX:TieredStopAtLevel=1` (C1 only). Off: it saves 0.16 s of the hello's start under
    /// TCG (4.31 s against 4.47 s of run CPU), but costs a long-running server its C2 peak.
    pub(crate) c1_only: bool,
    /// `-XX:ArchiveRelocationMode=0`: map the CDS archive at the address it was dumped for
    /// instead of relocating it. JDK 17.0.x updates relocate it on every start (mode 1, the
    /// default since JDK-8294323, for ASLR), which rewrites every pointer of its 10 MB: under
    /// TCG that was 1.56 s of a 6.2 s JVM start (`-Xlog:cds`: "Genesis" 1.88 s, 0.15 s
    /// mapped in place). The archive holds class metadata, no secrets; JDK 17 GA mapped it at
    /// its fixed address too. Set when the runtime has an archive.
    pub(crate) archive_in_place: bool,
    /// Anything else, appended last.
    pub(crate) extra: Vec<String>,
}

impl Default for JvmOptions {
    /// Measured under TCG (see `ci/bench-java` and [`JlinkOptions::default`]).
    fn default() -> Self {
        JvmOptions {
            max_ram_percentage: 75,
            gc: "-XX:+UseSerialGC".into(),
            share: "auto".into(),
            c1_only: false,
            archive_in_place: false,
            extra: Vec::new(),
        }
    }
}

impl JvmOptions {
    /// The options as `java` arguments.
    pub(crate) fn args(&self) -> Vec<String> {
        let mut args = vec![
            format!("-XX:MaxRAMPercentage={}", self.max_ram_percentage),
            self.gc.clone(),
            format!("-Xshare:{}", self.share),
            // Nobody attaches jstat inside the VM: no hsperfdata file in /tmp.
            "-XX:-UsePerfData".into(),
            // A 12-factor process that ran out of memory should die and be restarted, not limp.
            "-XX:+ExitOnOutOfMemoryError".into(),
        ];
        if self.c1_only {
            args.push("-XX:TieredStopAtLevel=1".into());
        }
        if self.archive_in_place {
            // A diagnostic flag in JDK 17.
            args.push("-XX:+UnlockDiagnosticVMOptions".into());
            args.push("-XX:ArchiveRelocationMode=0".into());
        }
        args.extend(self.extra.iter().cloned());
        args
    }
}

/// How jlink builds the runtime.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct JlinkOptions {
    /// `--compress=0|1|2`: 0 stores resources as they are (the squashfs compresses them),
    /// 1 shares strings, 2 zips them.
    pub(crate) compress: u8,
    /// A class-data-sharing archive of the JDK's default class list in
    /// `lib/server/classes.jsa`, dumped by fuse (see [`dump_cds`]), not by jlink's
    /// `--generate-cds-archive`, whose JDK 17 archive differs on every run.
    pub(crate) cds: bool,
}

impl Default for JlinkOptions {
    /// The defaults, by measurement (java.base runtime, hello jar, TCG, 1 vCPU; CPU seconds of
    /// `fuse run` incl. QEMU, median of 5; the native hello takes 1.44 s on the same machine):
    ///
    /// | variant               | image   | run CPU |
    /// |-----------------------|---------|---------|
    /// | `--compress=0`        | 19.3 MB | 4.47 s  |
    /// | `--compress=1`        | 18.9 MB | 4.46 s  |
    /// | `--compress=2`        | +3.1 MB | (zip-compressed resources do not compress again) |
    /// | `=0` + CDS archive    | 22.3 MB | 3.96 s  |
    ///
    /// * `--compress=0`: the squashfs compresses the resources anyway, and string sharing
    ///   (`=1`) costs jlink most of its CPU: java.base took 3.7 s of wall time with `=1`, 1.3 s
    ///   with `=0` (jlink on C1, median of 3), so a cold hello build takes 2.0 s (6.1-6.4 s with
    ///   `=1` in earlier runs of `ci/bench-java`) for 0.4 MB of image (18.5 -> 18.9 MB zstd,
    ///   14.5 -> 14.6 MB xz); first output unchanged (A/B 1.009, 7 pairs, `ci/bench-ab`);
    ///   `=2` (zip) only makes the zstd'd image bigger.
    /// * no CDS archive by default; `[jvm] cds = true` adds one of the default class list,
    ///   dumped by fuse to be as repeatable as JDK 17 allows (see [`dump_cds`]): identical
    ///   dumps on a quiet host, but two builds under different load produced two different
    ///   archives (each confirmed by two agreeing dumps), so it would break "same inputs, same
    ///   image" by default. +2.7 MB of image (21.1 MB), and with
    ///   [`JvmOptions::archive_in_place`] the JVM's "Initialize java.lang classes" and
    ///   "Initialize module system" phases take 0.5-0.7 and 0.9-1.0 s instead of 1.0-1.2 and
    ///   1.4-2.1 s under TCG (`-Xlog:startuptime`).
    fn default() -> Self {
        JlinkOptions {
            compress: 0,
            cds: false,
        }
    }
}

impl JlinkOptions {
    /// The jlink arguments (without modules and output).
    pub(crate) fn args(&self) -> Vec<String> {
        let mut args: Vec<String> = TOOL_JVM_FLAGS.iter().map(|f| format!("-J{f}")).collect();
        args.extend([
            "--strip-debug".to_string(),
            "--no-header-files".into(),
            "--no-man-pages".into(),
            format!("--compress={}", self.compress),
        ]);
        args
    }

    /// What goes into the runtime's cache key: the jlink arguments and what fuse adds.
    fn key(&self) -> String {
        let mut key = self.args().join(" ");
        if self.cds {
            key.push_str(&format!(" cds:{CDS_DUMP_FLAGS:?}"));
        }
        key
    }
}

/// How the JVMs of jlink and jdeps run (`-J` options). C1 only: they run for seconds, where C2
/// only costs compile time (jlink of java.base: 11.2 s of CPU with both compilers, 5.7 s with
/// C1). The serial GC, fixed rather than left to ergonomics: the GC changes jlink's output
/// (`lib/modules` differs between G1, the default on 2+ CPUs and 1792+ MB, and Serial, the
/// default below: 156,891 bytes with `--compress=1`, 121,165 with `=0`), so without it a
/// runtime, and the image, would differ between hosts of different sizes. With Serial it is
/// the same on 1 or 2 CPUs and any heap size.
const TOOL_JVM_FLAGS: &[&str] = &["-XX:+UseSerialGC", "-XX:TieredStopAtLevel=1"];

/// How the module set was decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ModuleSource {
    Jdeps,
    /// jdeps failed: the safe set.
    Fallback,
    /// jdeps' answer plus the safe set (a reflection-heavy framework).
    JdepsAndSafe,
}

impl ModuleSource {
    fn as_str(self) -> &'static str {
        match self {
            ModuleSource::Jdeps => "jdeps",
            ModuleSource::Fallback => "fallback",
            ModuleSource::JdepsAndSafe => "jdeps+safe",
        }
    }
}

/// Parses jdeps' `--print-module-deps` output: one line of comma-separated module names.
pub(crate) fn parse_module_deps(stdout: &str) -> Option<BTreeSet<String>> {
    let line = stdout.lines().rev().find(|l| !l.trim().is_empty())?;
    let modules: BTreeSet<String> = line.trim().split(',').map(str::to_string).collect();
    let valid = |m: &String| {
        !m.is_empty()
            && m.split('.').all(|part| {
                !part.is_empty() && part.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
            })
    };
    modules.iter().all(valid).then_some(modules)
}

/// The modules the app gets: jdeps' answer (or the safe set), plus what jdeps cannot see.
pub(crate) fn complete_modules(
    detected: Option<BTreeSet<String>>,
    info: &JarInfo,
) -> (BTreeSet<String>, ModuleSource) {
    let safe = || SAFE_MODULES.iter().map(|m| m.to_string());
    let (mut modules, source) = match detected {
        None => (safe().collect(), ModuleSource::Fallback),
        Some(mut found) if info.spring_boot => {
            found.extend(safe());
            (found, ModuleSource::JdepsAndSafe)
        }
        Some(found) => (found, ModuleSource::Jdeps),
    };
    modules.insert("java.base".into());
    if info
        .jdk_refs
        .iter()
        .any(|r| TLS_CLASS_PREFIXES.iter().any(|p| r.starts_with(p)))
    {
        modules.insert("jdk.crypto.ec".into());
    }
    (modules, source)
}

/// A cache key: sha256 over the parts, each length-prefixed so no two part lists collide.
pub(crate) fn cache_key(parts: &[&str]) -> String {
    let mut h = Sha256::new();
    for p in parts {
        h.update((p.len() as u64).to_le_bytes());
        h.update(p.as_bytes());
    }
    hex::encode(h.finalize())
}

/// The cache directory of jlink runtimes and module sets.
fn cache_root() -> PathBuf {
    paths::cache_dir().join("jlink")
}

/// Runs jdeps over the jar and its nested jars; `Err` is the reason it gave no answer.
fn run_jdeps(
    jdk: &Jdk,
    jar_path: &Path,
    info: &JarInfo,
) -> std::result::Result<BTreeSet<String>, String> {
    let mut cmd = Command::new(jdk.tool("jdeps"));
    cmd.args(TOOL_JVM_FLAGS.iter().map(|f| format!("-J{f}")));
    cmd.args([
        "--print-module-deps",
        "--ignore-missing-deps",
        "--multi-release",
    ])
    .arg(jdk.feature.to_string())
    .arg(jar_path)
    // The nested jars, extracted by jar::read.
    .args(&info.nested);
    let out = cmd
        .output()
        .map_err(|e| format!("cannot run {}: {e}", jdk.tool("jdeps").display()))?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        let reason = stderr
            .lines()
            .find(|l| !l.trim().is_empty())
            .unwrap_or("no message");
        return Err(format!("exit {}: {}", out.status, reason.trim()));
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    let modules = parse_module_deps(&stdout)
        .ok_or_else(|| format!("unexpected output: {}", stdout.trim()))?;
    match modules.iter().find(|m| !jdk.has_module(m)) {
        Some(m) => Err(format!("module {m} is not in the JDK")),
        None => Ok(modules),
    }
}

/// `{java.base}` when every JDK class the app's bytecode names is in a package of `java.base`:
/// jdeps could then answer nothing else (the names fuse reads, from every UTF-8 constant,
/// include all jdeps looks at: class constants and descriptors), and its JVM start and scan (1.7 s
/// of CPU for a hello jar) are saved. `None` when a name is elsewhere or the JDK has no
/// `jmods/java.base.jmod` to list the packages from: jdeps decides.
fn only_java_base(jdk: &Jdk, info: &JarInfo) -> Option<BTreeSet<String>> {
    let packages = java_base_packages(&jdk.jmods.as_ref()?.join("java.base.jmod"))?;
    let all_in_base = info.jdk_refs.iter().all(|class| {
        class
            .rsplit_once('/')
            .is_some_and(|(package, _)| packages.contains(package))
    });
    all_in_base.then(|| BTreeSet::from(["java.base".to_string()]))
}

/// The packages (`java/lang`) of the classes in a jmod: a 4-byte `JM` header, then a zip whose
/// classes are under `classes/`.
fn java_base_packages(jmod: &Path) -> Option<BTreeSet<String>> {
    let file = std::fs::File::open(jmod).ok()?;
    let zip = zip::ZipArchive::new(std::io::BufReader::new(file)).ok()?;
    let packages: BTreeSet<String> = zip
        .file_names()
        .filter_map(|name| {
            let class = name.strip_prefix("classes/")?.strip_suffix(".class")?;
            Some(class.rsplit_once('/')?.0.to_string())
        })
        .collect();
    (!packages.is_empty()).then_some(packages)
}

/// The module set of the app, from the cache or jdeps.
fn modules_for(
    jdk: &Jdk,
    jar_path: &Path,
    info: &JarInfo,
    progress: &mut dyn FnMut(&str),
) -> Result<(BTreeSet<String>, ModuleSource)> {
    let key = cache_key(&[
        CACHE_VERSION,
        "jdeps",
        &jdk.digest,
        &info.refs_digest(),
        &jdk.feature.to_string(),
    ]);
    let cached = cache_root().join(format!("modules-{key}"));
    let detected = match std::fs::read_to_string(&cached)
        .ok()
        .and_then(|s| parse_module_deps(&s))
        .or_else(|| only_java_base(jdk, info))
    {
        Some(modules) => Some(modules),
        None => match run_jdeps(jdk, jar_path, info) {
            Ok(modules) => {
                let line = modules.iter().cloned().collect::<Vec<_>>().join(",");
                // A cache that cannot be written only costs the next build a jdeps run.
                let _ = crate::host::fs::write_atomic(&cached, format!("{line}\n").as_bytes());
                Some(modules)
            }
            Err(reason) => {
                progress(&format!(
                    "warning: jdeps could not find the modules of {} ({reason}): using the safe set {}",
                    jar_path.display(),
                    SAFE_MODULES.join(",")
                ));
                None
            }
        },
    };
    let (modules, source) = complete_modules(detected, info);
    if source == ModuleSource::JdepsAndSafe {
        progress(&format!(
            "warning: {} is a Spring Boot jar (classes loaded by reflection, beyond jdeps): adding the safe set {}",
            jar_path.display(),
            SAFE_MODULES.join(",")
        ));
    }
    Ok((modules, source))
}

/// The jlink runtime for `modules`, from the cache or built now. Returns its directory.
fn ensure_runtime(
    jdk: &Jdk,
    modules: &BTreeSet<String>,
    options: &JlinkOptions,
    runnable: bool,
    progress: &mut dyn FnMut(&str),
) -> Result<PathBuf> {
    let module_list = modules.iter().cloned().collect::<Vec<_>>().join(",");
    let key = cache_key(&[
        CACHE_VERSION,
        "runtime",
        &jdk.digest,
        &module_list,
        &options.key(),
        // A runtime for another arch gets no CDS archive: its java cannot run here.
        if runnable { "runnable" } else { "foreign" },
    ]);
    let root = cache_root();
    let dir = root.join(&key);
    if dir.join("release").is_file() {
        return Ok(dir);
    }
    // One jlink per key at a time: parallel builds wait and then find the result.
    let _lock = FileLock::exclusive(&root.join(format!("{key}.lock")))?;
    if dir.join("release").is_file() {
        return Ok(dir);
    }
    progress(&format!(
        "jlink: building runtime ({} modules)...",
        modules.len()
    ));
    let staging = root.join(format!("{key}.tmp"));
    if staging.exists() {
        std::fs::remove_dir_all(&staging)
            .with_context(|| format!("Cannot clear {}", staging.display()))?;
    }
    let mut jlink = Command::new(jdk.tool("jlink"));
    if let Some(jmods) = &jdk.jmods {
        jlink.arg("--module-path").arg(jmods);
    }
    let out = jlink
        .arg("--add-modules")
        .arg(&module_list)
        .args(options.args())
        .arg("--output")
        .arg(&staging)
        .output()
        .with_context(|| format!("Cannot run {}", jdk.tool("jlink").display()))?;
    if !out.status.success() {
        let _ = std::fs::remove_dir_all(&staging);
        let stderr = String::from_utf8_lossy(&out.stderr);
        let stdout = String::from_utf8_lossy(&out.stdout);
        let reason = stderr
            .lines()
            .chain(stdout.lines())
            .find(|l| l.starts_with("Error"))
            .or_else(|| stderr.lines().find(|l| !l.trim().is_empty()))
            .unwrap_or("no message");
        bail!(
            "jlink failed for modules {module_list} ({}): {}",
            out.status,
            reason.trim()
        );
    }
    // Used only when the heap is above 32 GB (no compressed oops): never in our VMs.
    let _ = std::fs::remove_file(staging.join("lib/server/classes_nocoops.jsa"));
    for lib in DISPLAY_ONLY_LIBS {
        let _ = std::fs::remove_file(staging.join(lib));
    }
    strip_symbols(&staging.join("lib/server/libjvm.so"));
    if options.cds && runnable {
        if let Err(reason) = dump_cds(&staging) {
            progress(&format!(
                "warning: no class-data-sharing archive for the Java runtime ({reason}): the app starts slower"
            ));
        }
    }
    std::fs::rename(&staging, &dir)
        .with_context(|| format!("Cannot store the runtime in {}", dir.display()))?;
    Ok(dir)
}

/// How fuse dumps the CDS archive, beyond `-Xshare:dump -XX:SharedArchiveFile=FILE`. JDK 17
/// (before JDK-8253495, fixed in 19) writes a different archive on every run: symbols are
/// ordered by their address, so address-space randomisation, the environment, the heap size
/// and the order in which the JVM's threads allocate all change it (47,211 bytes differed
/// between two plain dumps). What makes it repeatable, measured: the serial GC (no archived
/// heap objects, whose identity hashes are random), `-Xint` (no compiler threads), a fixed
/// heap size and CPU count (both read from the host otherwise), no randomisation, an empty
/// environment, `/` as the working directory and all threads on one CPU (see
/// [`crate::host::process::run_repeatably`]); the class-loading log makes the one remaining
/// race (which thread loads `jdk.internal.misc.VM` first) come out the same way (35 of 35
/// dumps identical with it, 21 of 24 without). The archive does not depend on the runtime's
/// path. What is left to chance is checked: two dumps must agree. That is not enough for a
/// reproducible image: under another load another variant wins twice (hence opt-in).
const CDS_DUMP_FLAGS: &[&str] = &[
    "-XX:+UseSerialGC",
    "-Xint",
    "-Xmx128m",
    "-XX:ActiveProcessorCount=1",
];

/// The most dumps [`dump_cds`] makes before it gives up on an archive.
const CDS_MAX_DUMPS: usize = 5;

/// Dumps `lib/server/classes.jsa` (the JDK's default class list: what every Java program
/// loads first) into the runtime at `runtime`, which must run on this host. Two dumps run (in
/// parallel on two CPUs when there are two); the archive is kept once two dumps are identical
/// (at most [`CDS_MAX_DUMPS`]), and otherwise left out: an image must not depend on the luck of
/// one dump.
fn dump_cds(runtime: &Path) -> std::result::Result<(), String> {
    use crate::host::process::{allowed_cpus, run_repeatably};
    let java = runtime.join("bin/java");
    let server = runtime.join("lib/server");
    let cpus = allowed_cpus();
    let dump = |n: usize| -> std::result::Result<std::process::Child, String> {
        let file = server.join(format!("classes.jsa.{n}"));
        let log = server.join(format!("classes.jsa.{n}.log"));
        let mut cmd = Command::new(&java);
        cmd.env_clear()
            .current_dir("/")
            .arg("-Xshare:dump")
            .arg(format!("-XX:SharedArchiveFile={}", file.display()))
            .args(CDS_DUMP_FLAGS)
            .arg(format!("-Xlog:class+load=info:file={}:tid", log.display()))
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped());
        run_repeatably(&mut cmd, cpus.get(n % cpus.len().max(1)).copied());
        cmd.spawn()
            .map_err(|e| format!("cannot run {}: {e}", java.display()))
    };
    let finish = |n: usize, child: std::process::Child| -> std::result::Result<Vec<u8>, String> {
        let out = child
            .wait_with_output()
            .map_err(|e| format!("cannot wait for {}: {e}", java.display()))?;
        let file = server.join(format!("classes.jsa.{n}"));
        let _ = std::fs::remove_file(server.join(format!("classes.jsa.{n}.log")));
        let bytes = std::fs::read(&file);
        let _ = std::fs::remove_file(&file);
        if !out.status.success() {
            let stderr = String::from_utf8_lossy(&out.stderr);
            let reason = stderr.lines().find(|l| !l.trim().is_empty()).unwrap_or("");
            return Err(format!(
                "java -Xshare:dump exited {}: {}",
                out.status,
                reason.trim()
            ));
        }
        bytes.map_err(|e| format!("the dump wrote no archive: {e}"))
    };
    let (first, second) = if cpus.len() > 1 {
        let (a, b) = (dump(0)?, dump(1));
        let a = finish(0, a);
        (a, b.and_then(|b| finish(1, b)))
    } else {
        (
            dump(0).and_then(|a| finish(0, a)),
            dump(1).and_then(|b| finish(1, b)),
        )
    };
    let mut seen = vec![first?];
    let mut next = Some(second?);
    // Under load the race is lost more often: dump until one archive comes out twice.
    let archive = loop {
        let Some(archive) = next.take() else {
            return Err(format!(
                "JDK 17 wrote {} different archives in {} dumps",
                seen.len(),
                seen.len()
            ));
        };
        if seen.contains(&archive) {
            break archive;
        }
        seen.push(archive);
        if seen.len() < CDS_MAX_DUMPS {
            next = Some(dump(seen.len()).and_then(|c| finish(seen.len(), c))?);
        }
    };
    crate::host::fs::write_atomic(&server.join("classes.jsa"), &archive)
        .map_err(|e| format!("cannot write it: {e:#}"))
}

/// Drops the symbol table of `lib` (libjvm.so: 4 of its 24 MB, 1.2 MB of the compressed image;
/// the dynamic symbols stay, only `hs_err` crash reports lose function names). Best effort: a
/// host without objcopy (binutils) keeps the symbols.
fn strip_symbols(lib: &Path) {
    let tmp = lib.with_extension("so.stripped");
    // The host's objcopy only reads the host's arch; a foreign libjvm needs its cross binutils.
    let stripped = [
        "objcopy",
        "aarch64-linux-gnu-objcopy",
        "x86_64-linux-gnu-objcopy",
    ]
    .iter()
    .any(|objcopy| {
        Command::new(objcopy)
            .arg("--strip-unneeded")
            .arg(lib)
            .arg(&tmp)
            .output()
            .is_ok_and(|o| o.status.success())
    });
    if !stripped || std::fs::rename(&tmp, lib).is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
}

/// Adds the runtime at `runtime` to the tree at [`RUNTIME_DIR`], and the native closure of its
/// programs and libraries (libc, libz, libstdc++...) at the host loader's paths.
fn add_runtime(tree: &mut Tree, runtime: &Path, arch: Arch, sysroot: Option<&Path>) -> Result<()> {
    // Closure paths are symlink-resolved: compare with the runtime's real path.
    let runtime = &std::fs::canonicalize(runtime)
        .with_context(|| format!("Cannot open the Java runtime at {}", runtime.display()))?;
    tree.add_host_dir_recursive(RUNTIME_DIR, runtime)
        .with_context(|| format!("Cannot add the Java runtime from {}", runtime.display()))?;
    // Libraries of the runtime find each other through $ORIGIN RPATHs, except libjvm.so in
    // lib/server, which the launcher loads by path: searched explicitly, and left where the
    // runtime has them (skipped below) rather than copied to the system directory.
    let mut options = ClosureOptions {
        arch,
        extra_library_paths: vec![runtime.join("lib/server"), runtime.join("lib")],
        ..ClosureOptions::default()
    };
    if let Some(sysroot) = sysroot {
        options.sysroot = sysroot.to_path_buf();
    }
    let mut elves = Vec::new();
    collect_elves(runtime, &mut elves)?;
    for host in elves {
        let rel = host.strip_prefix(runtime).unwrap_or(&host);
        let image = format!("{RUNTIME_DIR}/{}", rel.display());
        let closure = elf::resolve_closure(&host, &image, &options)
            .with_context(|| format!("Cannot package the Java runtime's {}", rel.display()))?;
        if let Some(interp) = &closure.interpreter {
            tree.add_host_file(&interp.image_path, &interp.host_path, 0o755)?;
        }
        for lib in &closure.libraries {
            // The runtime's own libraries are there already; libjvm.so names the loader as
            // a library too, which is already in at its PT_INTERP path.
            let is_interp = closure
                .interpreter
                .as_ref()
                .is_some_and(|i| i.host_path == lib.host_path);
            if lib.host_path.starts_with(runtime) || is_interp {
                continue;
            }
            tree.add_host_file(&lib.image_path, &lib.host_path, 0o644)?;
        }
    }
    Ok(())
}

/// Every ELF file under `dir`, sorted.
fn collect_elves(dir: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .with_context(|| format!("Cannot read {}", dir.display()))?
        .collect::<std::io::Result<_>>()?;
    entries.sort_by_key(|e| e.file_name());
    for e in entries {
        let ft = e.file_type()?;
        let path = e.path();
        if ft.is_dir() {
            collect_elves(&path, out)?;
        } else if ft.is_file() && super::appdir::is_elf(&path) {
            out.push(path);
        }
    }
    Ok(())
}

/// The image's jar file name: the input's name with `.jar` (an input without the extension
/// that was detected as a jar gets it).
fn jar_file_name(input: &RuntimeInput<'_>) -> String {
    let name = input
        .input
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| input.name.name.clone());
    if name.to_ascii_lowercase().ends_with(".jar") {
        name
    } else {
        format!("{name}.jar")
    }
}

pub(crate) fn assemble(
    input: &RuntimeInput<'_>,
    progress: &mut dyn FnMut(&str),
) -> Result<AppImage> {
    // The jar first: a broken jar is the user's likeliest mistake and needs no JDK to report.
    // `[jvm] main_class`: a class other than the jar's Main-Class (or in a jar without one).
    let main_class = match (input.main_class, input.config) {
        (Some(class), _) => Some(class.to_string()),
        (None, Some(config)) => config.runtime_string("jvm", "main_class")?,
        (None, None) => None,
    };
    let info = jar::read(input.input, main_class.as_deref(), input.arch)?;
    // Another arch (or --sysroot): the target's JDK, linked by a host JDK of its version.
    let (jdk, sysroot) = if input.arch != Arch::host() || input.sysroot.is_some() {
        target_jdk(input.arch, input.jdk, input.sysroot, progress)?
    } else {
        (find_jdk(input.jdk, &jdk_candidates())?, None)
    };
    jdk.check_arch(input.arch)?;
    let (modules, source) = modules_for(&jdk, input.input, &info, progress)?;
    // `[jvm] cds = true`: opt-in, as the archive is not reproducible under every load.
    let cds = match input.config {
        Some(config) => config.runtime_bool("jvm", "cds")?.unwrap_or(false),
        None => false,
    };
    let jlink = JlinkOptions {
        cds,
        ..JlinkOptions::default()
    };
    if cds {
        progress(
            "note: [jvm] cds = true: JDK 17 does not dump its class-data-sharing archive reproducibly, so two builds of the same inputs can give different images",
        );
    }
    // The runtime's own java runs on this host only for the host's arch and a JDK of it.
    let runnable = input.arch == Arch::host() && jdk.tools.is_none();
    let runtime = ensure_runtime(&jdk, &modules, &jlink, runnable, progress)?;

    let mut tree = layout::skeleton()?;
    add_runtime(
        &mut tree,
        &runtime,
        input.arch,
        sysroot.as_ref().map(|s| s.path.as_path()),
    )?;
    let jar_name = jar_file_name(input);
    let jar_image = format!("{}/{}", layout::APP_DIR, jar_name);
    tree.add_host_file(&jar_image, input.input, 0o644)?;
    // The jar's native libraries, where `System.loadLibrary` finds them.
    let mut closure_options = ClosureOptions {
        arch: input.arch,
        ..ClosureOptions::default()
    };
    if let Some(sysroot) = &sysroot {
        closure_options.sysroot = sysroot.path.clone();
    }
    let natives = jarnative::add_jar_natives(
        &mut tree,
        &info.natives,
        &jar_name,
        &runtime,
        &closure_options,
        progress,
    )?;
    let library_path = match natives.is_empty() {
        true => None,
        false => jarnative::library_path_option(&runtime.join("lib/server/libjvm.so"), input.arch)?,
    };

    let java = format!("{RUNTIME_DIR}/bin/java");
    let mut args = vec!["java".to_string()];
    let jvm = JvmOptions {
        // The flag exists since JDK 14 (an unknown -XX flag stops the JVM).
        archive_in_place: runtime.join("lib/server/classes.jsa").is_file() && jdk.feature >= 14,
        ..JvmOptions::default()
    };
    args.extend(jvm.args());
    args.extend(library_path);
    // `[jvm] options` of fuse.toml come after the defaults: the JVM takes the last of a
    // repeated option, so they override.
    if let Some(config) = input.config {
        args.extend(config.runtime_options("jvm")?);
    }
    match &main_class {
        Some(class) => args.extend(["-cp".into(), jar_image, class.clone()]),
        None => args.extend(["-jar".into(), jar_image]),
    }
    let fixed = args.len() - 1;
    let mut env = default_env(input.name);
    for (key, value) in env.iter_mut() {
        if key == "PATH" {
            *value = format!("{RUNTIME_DIR}/bin:{value}");
        }
    }
    env.push(("JAVA_HOME".into(), RUNTIME_DIR.into()));
    let spec = app_spec(input, java, args, env);
    let notes = vec![
        ("jdk.version".to_string(), jdk.version.clone()),
        (
            "jdk.modules".to_string(),
            modules.iter().cloned().collect::<Vec<_>>().join(","),
        ),
        (
            "jdk.modules.source".to_string(),
            source.as_str().to_string(),
        ),
        ("jlink.options".to_string(), jlink.args().join(" ")),
        (
            "jvm.cds".to_string(),
            match runtime.join("lib/server/classes.jsa").is_file() {
                true => "default classlist, dumped by fuse".to_string(),
                false => "none".to_string(),
            },
        ),
        ("jar.main-class".to_string(), info.main_class.clone()),
        (
            manifest::NOTE_RUNTIME_DIR.to_string(),
            RUNTIME_DIR.to_string(),
        ),
        (manifest::NOTE_FIXED_ARGS.to_string(), fixed.to_string()),
    ];
    let mut notes = notes;
    if !natives.is_empty() {
        notes.push(("jar.natives".to_string(), natives.join(",")));
    }
    notes.extend(sysroot.iter().flat_map(|s| s.notes()));
    Ok(AppImage { tree, spec, notes })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(refs: &[&str], spring_boot: bool) -> JarInfo {
        JarInfo {
            main_class: "a.Main".into(),
            spring_boot,
            nested: Vec::new(),
            scratch: None,
            jdk_refs: refs.iter().map(|r| r.to_string()).collect(),
            natives: Vec::new(),
        }
    }

    fn set(names: &[&str]) -> BTreeSet<String> {
        names.iter().map(|n| n.to_string()).collect()
    }

    #[test]
    fn jdeps_output_is_parsed_or_refused() {
        assert_eq!(
            parse_module_deps("java.base,java.net.http\n"),
            Some(set(&["java.base", "java.net.http"]))
        );
        assert_eq!(
            parse_module_deps("Warning: split package\njava.base,jdk.httpserver\n"),
            Some(set(&["java.base", "jdk.httpserver"]))
        );
        assert_eq!(parse_module_deps(""), None);
        assert_eq!(parse_module_deps("Error: something broke"), None);
        assert_eq!(parse_module_deps("java.base,,java.sql"), None);
    }

    #[test]
    fn module_set_adds_base_tls_and_the_safe_set_when_needed() {
        let (m, s) = complete_modules(Some(set(&["java.sql"])), &info(&["java/sql/Driver"], false));
        assert_eq!(s, ModuleSource::Jdeps);
        assert_eq!(m, set(&["java.base", "java.sql"]));

        let (m, _) = complete_modules(
            Some(set(&["java.net.http"])),
            &info(&["java/net/http/HttpClient"], false),
        );
        assert!(m.contains("jdk.crypto.ec"), "{m:?}");

        let (m, s) = complete_modules(None, &info(&[], false));
        assert_eq!(s, ModuleSource::Fallback);
        assert!(
            m.contains("java.se") && m.contains("jdk.unsupported"),
            "{m:?}"
        );

        let (m, s) = complete_modules(Some(set(&["java.logging"])), &info(&[], true));
        assert_eq!(s, ModuleSource::JdepsAndSafe);
        assert!(m.contains("java.logging") && m.contains("java.se"), "{m:?}");
    }

    #[test]
    fn cache_keys_separate_their_parts() {
        assert_ne!(cache_key(&["ab", "c"]), cache_key(&["a", "bc"]));
        assert_eq!(cache_key(&["a", "b"]), cache_key(&["a", "b"]));
        assert_eq!(cache_key(&["a"]).len(), 64);
        // Every jlink option, and the CDS archive, is part of the runtime's key.
        let a = JlinkOptions::default().key();
        let b = JlinkOptions {
            cds: true,
            ..JlinkOptions::default()
        }
        .key();
        assert_ne!(cache_key(&["k", &a]), cache_key(&["k", &b]));
    }

    #[test]
    fn jvm_options_are_explicit_and_overridable() {
        let args = JvmOptions::default().args();
        assert!(
            args.contains(&"-XX:MaxRAMPercentage=75".to_string()),
            "{args:?}"
        );
        assert!(args.contains(&"-XX:+UseSerialGC".to_string()), "{args:?}");
        assert!(args.contains(&"-Xshare:auto".to_string()), "{args:?}");
        assert!(!args.iter().any(|a| a.contains("ArchiveRelocationMode")));
        let in_place = JvmOptions {
            archive_in_place: true,
            ..JvmOptions::default()
        }
        .args();
        assert!(
            in_place.contains(&"-XX:ArchiveRelocationMode=0".to_string()),
            "{in_place:?}"
        );
        let custom = JvmOptions {
            max_ram_percentage: 50,
            c1_only: true,
            extra: vec!["-Dx=y".into()],
            ..JvmOptions::default()
        }
        .args();
        assert!(custom.contains(&"-XX:MaxRAMPercentage=50".to_string()));
        assert!(custom.contains(&"-XX:TieredStopAtLevel=1".to_string()));
        assert_eq!(custom.last().unwrap(), "-Dx=y");
    }

    #[test]
    fn a_jar_naming_only_java_base_classes_needs_no_jdeps() {
        let host = Path::new("/usr/lib/jvm/java-17-openjdk-amd64");
        if !host.join("jmods/java.base.jmod").is_file() {
            return;
        }
        let jdk = find_jdk(Some(host), &[]).unwrap();
        let packages = java_base_packages(&host.join("jmods/java.base.jmod")).unwrap();
        assert!(packages.contains("java/lang") && packages.contains("jdk/internal/misc"));
        assert!(!packages.contains("java/sql"));
        let base = only_java_base(&jdk, &info(&["java/lang/String", "java/util/List"], false));
        assert_eq!(base, Some(set(&["java.base"])));
        // Another module's class, or a name in no JDK package: jdeps decides.
        assert_eq!(
            only_java_base(&jdk, &info(&["java/sql/Driver"], false)),
            None
        );
        assert_eq!(
            only_java_base(&jdk, &info(&["javax/servlet/Filter"], false)),
            None
        );
    }

    #[test]
    fn jdk_is_found_or_the_error_says_how_to_get_one() {
        let dir = tempfile::tempdir().unwrap();
        let err = find_jdk(None, &[dir.path().to_path_buf()]).unwrap_err();
        let msg = format!("{err:#}");
        assert!(
            msg.contains("apt-get install openjdk-17-jdk-headless"),
            "{msg}"
        );
        assert!(msg.contains("--jdk"), "{msg}");
        let err = find_jdk(Some(dir.path()), &[]).unwrap_err();
        assert!(format!("{err:#}").contains("no bin/jlink"), "{err:#}");

        let host = Path::new("/usr/lib/jvm/java-17-openjdk-amd64");
        if host.join("bin/jlink").is_file() {
            let jdk = find_jdk(None, &[dir.path().to_path_buf(), host.to_path_buf()]).unwrap();
            assert_eq!(jdk.feature, 17);
            assert!(jdk.version.starts_with("17"), "{}", jdk.version);
            assert!(jdk.has_module("java.net.http") && !jdk.has_module("no.such"));
            assert_eq!(jdk.digest, find_jdk(Some(host), &[]).unwrap().digest);
            jdk.check_arch(Arch::X86_64).unwrap();
            assert!(jdk.check_arch(Arch::Aarch64).is_err());
        }
    }
}
