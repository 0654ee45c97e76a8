//! Native libraries bundled in a jar (sqlite-jdbc's `libsqlitejdbc.so`, netty's epoll
//! transport, zstd-jni, JNA's `libjnidispatch.so`...). Such a library extracts its `.so` to
//! `java.io.tmpdir` at run time and `System.load`s it; the guest's `/tmp` is `noexec`, so that
//! fails, and the libraries then fall back to `System.loadLibrary`, which searches
//! `java.library.path`. fuse places them there at build time: in the JNI directory of the
//! image's multiarch triplet (`/usr/lib/x86_64-linux-gnu/jni`, on Debian's JVMs' default
//! `java.library.path`; for a JVM whose default lacks it, the directory is added with
//! `-Djava.library.path`), each with the closure of its shared libraries, like any ELF of an app.
//!
//! Jars ship one copy per platform. Kept: 64-bit ELF for the image's machine (read from the
//! header by [`super::jar`]), for glibc: a copy whose path names musl, Alpine or Android, or
//! that needs musl's or bionic's `libc.so` (glibc's is `libc.so.6`), is left out. Two different
//! libraries under one file name: the first in jar order (a nested jar's entries at its place)
//! wins, as the class loader finds the outer jar's resources first; the others are named in the
//! notice.

use super::closure::foreign;
use super::jar::JarNative;
use anyhow::{Context, Result};
use fuse_rootfs::elf::{self, ClosureOptions, ElfInfo};
use fuse_rootfs::tree::Tree;
use fuse_rootfs::Arch;
use std::path::Path;

/// The JNI directory of `arch`, where Debian puts JNI libraries and its JVMs look for them.
pub(crate) fn jni_dir(arch: Arch) -> String {
    format!("/usr/lib/{}/jni", arch.gnu_triple())
}

/// Upstream OpenJDK's default `java.library.path` on Linux, kept after the JNI directory when
/// fuse has to set the property.
const UPSTREAM_LIBRARY_PATH: &str = "/usr/java/packages/lib:/usr/lib64:/lib64:/lib:/usr/lib";

/// The `-Djava.library.path` option the JVM needs to find [`jni_dir`], or `None` when its
/// default has it already (Debian's OpenJDK builds name it in `libjvm.so`).
pub(crate) fn library_path_option(libjvm: &Path, arch: Arch) -> Result<Option<String>> {
    let jni = jni_dir(arch);
    let bytes = std::fs::read(libjvm)
        .with_context(|| format!("Cannot read the Java runtime's {}", libjvm.display()))?;
    let needle = format!("{jni}:");
    if bytes.windows(needle.len()).any(|w| w == needle.as_bytes()) {
        return Ok(None);
    }
    Ok(Some(format!(
        "-Djava.library.path={jni}:{UPSTREAM_LIBRARY_PATH}"
    )))
}

/// Why a native library of the jar is left out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Skip {
    /// For another C library (`musl`, `Android`).
    Libc(&'static str),
    /// For another machine or class, or musl by its loader (as [`foreign`] says).
    Foreign(String),
    /// Not a readable ELF file.
    Unreadable,
    /// Another library with the same file name came first (its entry).
    Shadowed(String),
}

impl std::fmt::Display for Skip {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Skip::Libc(libc) => f.write_str(libc),
            Skip::Foreign(why) => f.write_str(why),
            Skip::Unreadable => f.write_str("not a readable ELF file"),
            Skip::Shadowed(first) => write!(f, "{first} comes first"),
        }
    }
}

/// The C library the entry's directories name, when not glibc (sqlite-jdbc's `Linux-Musl/`
/// and `Linux-Android/`, `linux-x86_64-musl/`, `alpine/`).
fn libc_by_path(entry: &str) -> Option<&'static str> {
    let dirs = entry.rsplit_once('/').map_or("", |(dirs, _)| dirs);
    let dirs = dirs.to_ascii_lowercase();
    if dirs.contains("android") {
        Some("Android")
    } else if dirs.contains("musl") || dirs.contains("alpine") {
        Some("musl")
    } else {
        None
    }
}

/// The C library the ELF needs, when not glibc: musl's and bionic's are both `libc.so`.
fn libc_by_elf(info: &ElfInfo) -> Option<&'static str> {
    if info
        .needed
        .iter()
        .any(|n| n == "liblog.so" || n == "libandroid.so")
    {
        Some("Android")
    } else if info.needed.iter().any(|n| n == "libc.so") {
        Some("musl or Android: needs libc.so, not glibc's libc.so.6")
    } else {
        None
    }
}

/// The libraries to place, in jar order, and those left out with why.
#[derive(Debug, Default)]
pub(crate) struct Selection<'a> {
    pub(crate) chosen: Vec<&'a JarNative>,
    pub(crate) skipped: Vec<(&'a JarNative, Skip)>,
}

/// Picks the libraries of `natives` (all ELF for the image's machine, in jar order) the image's
/// loader can load, one per file name.
pub(crate) fn select<'a>(natives: &'a [JarNative], options: &ClosureOptions) -> Selection<'a> {
    let mut sel = Selection::default();
    for native in natives {
        let why = match elf::inspect(&native.file) {
            Err(_) => Some(Skip::Unreadable),
            Ok(info) => libc_by_path(&native.entry)
                .or_else(|| libc_by_elf(&info))
                .map(Skip::Libc)
                .or_else(|| foreign(&info, options).map(|f| Skip::Foreign(f.to_string()))),
        };
        if let Some(why) = why {
            sel.skipped.push((native, why));
            continue;
        }
        if let Some(first) = sel
            .chosen
            .iter()
            .find(|c| c.file_name() == native.file_name())
        {
            // The same library in two jars (a shaded copy): nothing to choose between.
            let same = std::fs::read(&first.file).ok() == std::fs::read(&native.file).ok();
            if !same {
                sel.skipped
                    .push((native, Skip::Shadowed(first.entry.clone())));
            }
            continue;
        }
        sel.chosen.push(native);
    }
    sel
}

/// Places the chosen native libraries of the jar `jar_name` in [`jni_dir`] with their
/// libraries (those of the Java runtime at `runtime`, already in the image, are not copied
/// again), and prints what was placed and left out. Returns the placed file names, sorted.
pub(crate) fn add_jar_natives(
    tree: &mut Tree,
    natives: &[JarNative],
    jar_name: &str,
    runtime: &Path,
    options: &ClosureOptions,
    progress: &mut dyn FnMut(&str),
) -> Result<Vec<String>> {
    let sel = select(natives, options);
    let dir = jni_dir(options.arch);
    // A JNI library may need the runtime's libjvm.so or libjava.so: found there, loaded already.
    let runtime = std::fs::canonicalize(runtime)
        .with_context(|| format!("Cannot open the Java runtime at {}", runtime.display()))?;
    let mut options = options.clone();
    options
        .extra_library_paths
        .extend([runtime.join("lib/server"), runtime.join("lib")]);
    let mut placed = Vec::new();
    for native in &sel.chosen {
        let image = format!("{dir}/{}", native.file_name());
        let context = || {
            format!(
                "Cannot package the native library {} bundled in {jar_name}",
                native.entry
            )
        };
        // In memory: the scratch copy is gone when the tree is written (a few MB at most).
        let bytes = std::fs::read(&native.file).with_context(context)?;
        tree.add_bytes(&image, bytes, 0o644).with_context(context)?;
        let closure = elf::resolve_closure(&native.file, &image, &options).with_context(context)?;
        let interpreter = closure.interpreter.iter().map(|i| (i, 0o755));
        let libraries = closure.libraries.iter().map(|l| (l, 0o644));
        for (lib, mode) in interpreter.chain(libraries) {
            if lib.host_path.starts_with(&runtime) || tree.get(&lib.image_path).is_some() {
                continue;
            }
            tree.add_host_file(&lib.image_path, &lib.host_path, mode)
                .with_context(context)?;
        }
        placed.push((native.file_name().to_string(), native.entry.clone()));
    }
    placed.sort();
    if let Some(notice) = notice(&placed, &sel.skipped, &dir) {
        progress(&notice);
    }
    Ok(placed.into_iter().map(|(name, _)| name).collect())
}

/// One line: what was placed where, and what was left out.
fn notice(
    placed: &[(String, String)],
    skipped: &[(&JarNative, Skip)],
    dir: &str,
) -> Option<String> {
    if placed.is_empty() && skipped.is_empty() {
        return None;
    }
    let mut line = if placed.is_empty() {
        "no native library bundled in the jar is for this image".to_string()
    } else {
        let list: Vec<String> = placed
            .iter()
            .map(|(name, entry)| format!("{name} (from {entry})"))
            .collect();
        format!(
            "placed {} native librar{} bundled in the jar in {dir} (on java.library.path, where it loads from when extracting to /tmp fails): {}",
            placed.len(),
            if placed.len() == 1 { "y" } else { "ies" },
            list.join(", ")
        )
    };
    if !skipped.is_empty() {
        let shown: Vec<String> = skipped
            .iter()
            .take(3)
            .map(|(n, why)| format!("{} ({why})", n.entry))
            .collect();
        let more = match skipped.len() {
            n if n > 3 => format!(", and {} more", n - 3),
            _ => String::new(),
        };
        line.push_str(&format!("; left out: {}{more}", shown.join(", ")));
    }
    Some(line)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;
    use std::process::Command;

    /// Compiles the shared object `name` from `src` in `dir`.
    fn so(dir: &Path, name: &str, src: &str, extra: &[&str]) -> PathBuf {
        let c = dir.join(format!("{name}.c"));
        std::fs::write(&c, src).unwrap();
        let out = Command::new("cc")
            .args(["-shared", "-fPIC", "-o"])
            .arg(dir.join(name))
            .arg(&c)
            .args(extra)
            .current_dir(dir)
            .output()
            .expect("cc must be installed");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        dir.join(name)
    }

    fn native(entry: &str, file: &Path) -> JarNative {
        JarNative {
            entry: entry.into(),
            file: file.to_path_buf(),
        }
    }

    #[test]
    fn glibc_builds_for_the_machine_are_chosen_first_in_jar_order() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let a = so(d, "a.so", "int greet(void) { return 1; }", &[]);
        let a_again = d.join("a-again.so");
        std::fs::copy(&a, &a_again).unwrap();
        let b = so(d, "b.so", "int greet(void) { return 2; }", &[]);
        let z = so(d, "z.so", "int zz(void) { return 3; }", &[]);
        // musl's and bionic's C library is `libc.so`.
        so(
            d,
            "libc.so",
            "int c;",
            &["-nostdlib", "-Wl,-soname,libc.so"],
        );
        let bionic = so(
            d,
            "bionic.so",
            "int greet(void) { return 4; }",
            &["-nostdlib", "-Wl,--no-as-needed", "-L.", "-l:libc.so"],
        );
        let mut other_bytes = std::fs::read(&a).unwrap();
        let other = match Arch::host() {
            Arch::X86_64 => Arch::Aarch64,
            Arch::Aarch64 => Arch::X86_64,
        };
        other_bytes[18..20].copy_from_slice(&other.elf_machine().to_le_bytes());
        let other_file = d.join("other.so");
        std::fs::write(&other_file, other_bytes).unwrap();
        let natives = vec![
            native("org/x/native/Linux-Musl/x86_64/libgreet.so", &b),
            native("org/x/native/Linux-Android/aarch64/libgreet.so", &b),
            native("lib/alpine/libgreet.so", &b),
            native("org/x/native/Linux/generic/libgreet.so", &bionic),
            native("org/x/native/Linux/x86_64/libgreet.so", &a),
            native("org/x/native/Linux/other/libz.so", &other_file),
            native("BOOT-INF/lib/shaded.jar!/native/libgreet.so", &a_again),
            native("BOOT-INF/lib/old.jar!/native/libgreet.so", &b),
            native("META-INF/native/libz.so", &z),
        ];
        let sel = select(&natives, &ClosureOptions::default());
        let chosen: Vec<&str> = sel.chosen.iter().map(|n| n.entry.as_str()).collect();
        assert_eq!(
            chosen,
            [
                "org/x/native/Linux/x86_64/libgreet.so",
                "META-INF/native/libz.so"
            ]
        );
        let skipped: Vec<(&str, String)> = sel
            .skipped
            .iter()
            .map(|(n, why)| (n.entry.as_str(), why.to_string()))
            .collect();
        assert_eq!(skipped.len(), 6, "{skipped:?}");
        assert_eq!(skipped[0].1, "musl");
        assert_eq!(skipped[1].1, "Android");
        assert_eq!(skipped[2].1, "musl");
        assert!(skipped[3].1.starts_with("musl or Android"), "{skipped:?}");
        assert_eq!(skipped[4].1, other.to_string());
        // The identical shaded copy is no choice; the different one is named.
        assert_eq!(
            skipped[5],
            (
                "BOOT-INF/lib/old.jar!/native/libgreet.so",
                "org/x/native/Linux/x86_64/libgreet.so comes first".to_string()
            )
        );
    }

    #[test]
    fn placed_with_their_libraries_and_a_missing_one_is_a_one_line_error() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let runtime = d.join("runtime");
        std::fs::create_dir_all(runtime.join("lib/server")).unwrap();
        let ok = so(
            d,
            "ok.so",
            "int greet(void) { return 1; }",
            &["-Wl,--no-as-needed", "-lcrypt"],
        );
        let mut tree = Tree::new();
        let mut notices = Vec::new();
        let placed = add_jar_natives(
            &mut tree,
            &[native("native/Linux/x86_64/libok.so", &ok)],
            "app.jar",
            &runtime,
            &ClosureOptions::default(),
            &mut |n| notices.push(n.to_string()),
        )
        .unwrap();
        assert_eq!(placed, ["libok.so"]);
        let paths: Vec<&str> = tree.iter().map(|(p, _)| p).collect();
        let jni = jni_dir(Arch::host());
        assert!(
            paths.contains(&format!("{jni}/libok.so").as_str()),
            "{paths:?}"
        );
        assert!(
            paths.iter().any(|p| p.ends_with("/libcrypt.so.1")),
            "{paths:?}"
        );
        assert_eq!(notices.len(), 1, "{notices:?}");

        so(
            d,
            "libgone.so",
            "int gone(void) { return 0; }",
            &["-Wl,-soname,libgone.so"],
        );
        let needs = so(
            d,
            "needs.so",
            "int n(void) { return 0; }",
            &["-Wl,--no-as-needed", "-L.", "-lgone"],
        );
        std::fs::remove_file(d.join("libgone.so")).unwrap();
        let err = add_jar_natives(
            &mut Tree::new(),
            &[native("lib/x.jar!/native/libneeds.so", &needs)],
            "app.jar",
            &runtime,
            &ClosureOptions::default(),
            &mut |_| {},
        )
        .unwrap_err();
        let msg = format!("{err:#}");
        assert!(!msg.contains('\n'), "{msg}");
        for needle in [
            "lib/x.jar!/native/libneeds.so",
            "app.jar",
            "libgone.so",
            "--library-path",
        ] {
            assert!(msg.contains(needle), "{needle} missing: {msg}");
        }
    }

    #[test]
    fn the_notice_is_one_line_naming_what_was_placed_and_left_out() {
        let placed = vec![("libgreet.so".to_string(), "n/Linux/libgreet.so".to_string())];
        let musl = native("n/Linux-Musl/libgreet.so", Path::new("/x"));
        let skipped: Vec<(&JarNative, Skip)> =
            (0..5).map(|_| (&musl, Skip::Libc("musl"))).collect();
        let line = notice(&placed, &skipped, "/usr/lib/x86_64-linux-gnu/jni").unwrap();
        assert!(!line.contains('\n'), "{line}");
        assert!(
            line.starts_with(
                "placed 1 native library bundled in the jar in /usr/lib/x86_64-linux-gnu/jni"
            ),
            "{line}"
        );
        assert!(
            line.contains("libgreet.so (from n/Linux/libgreet.so)"),
            "{line}"
        );
        assert!(
            line.contains("left out: n/Linux-Musl/libgreet.so (musl)"),
            "{line}"
        );
        assert!(line.ends_with(", and 2 more"), "{line}");
        assert_eq!(notice(&[], &[], "/d"), None);
    }

    #[test]
    fn library_path_is_set_only_for_a_jvm_whose_default_lacks_the_jni_directory() {
        let dir = tempfile::tempdir().unwrap();
        let debian = dir.path().join("debian-libjvm.so");
        std::fs::write(
            &debian,
            b"\0%s%s/usr/java/packages/lib:/usr/lib/x86_64-linux-gnu/jni:/lib/x86_64-linux-gnu:/usr/lib\0",
        )
        .unwrap();
        let upstream = dir.path().join("upstream-libjvm.so");
        std::fs::write(
            &upstream,
            b"\0%s%s/usr/java/packages/lib:/usr/lib64:/lib64:/lib:/usr/lib\0",
        )
        .unwrap();
        assert_eq!(library_path_option(&debian, Arch::X86_64).unwrap(), None);
        assert_eq!(
            library_path_option(&debian, Arch::Aarch64).unwrap().as_deref(),
            Some("-Djava.library.path=/usr/lib/aarch64-linux-gnu/jni:/usr/java/packages/lib:/usr/lib64:/lib64:/lib:/usr/lib")
        );
        assert_eq!(
            library_path_option(&upstream, Arch::X86_64).unwrap().as_deref(),
            Some("-Djava.library.path=/usr/lib/x86_64-linux-gnu/jni:/usr/java/packages/lib:/usr/lib64:/lib64:/lib:/usr/lib")
        );
    }
}
