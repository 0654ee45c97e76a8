//! Builds the init (`boot/init/*.c`) into a static, stripped executable for every architecture
//! fuse boots, and leaves it in `OUT_DIR/fuse-init-<arch>` for `src/init.rs` to embed.
//!
//! The init links musl (Debian's `musl-dev` for the arch) where it is installed: about 110 KB
//! against glibc's 870 KB, in every image. Without it the init links glibc statically, and the
//! build says so.
//!
//! The init of the build machine's architecture is required: failing to build it fails the
//! build. Other architectures need a cross compiler (`aarch64-linux-gnu-gcc` and a static libc
//! for it); without one an empty file is written and `init_binary` reports the arch as
//! unavailable.

use std::env;
use std::fs;
use std::path::{Path, PathBuf};

/// The architectures to build an init for: fuse's name and the Rust/GNU target triple that
/// selects the C compiler (`cc` maps `aarch64-unknown-linux-gnu` to `aarch64-linux-gnu-gcc`).
const ARCHES: &[(&str, &str)] = &[
    ("x86_64", "x86_64-unknown-linux-gnu"),
    ("aarch64", "aarch64-unknown-linux-gnu"),
];

/// Flags for every compile: small, static, dead code dropped, warnings are errors.
const CFLAGS: &[&str] = &[
    "-std=gnu11",
    "-Os",
    "-static",
    "-s",
    "-ffunction-sections",
    "-fdata-sections",
    "-Wl,--gc-sections",
    "-Wl,--build-id=none",
    "-fno-asynchronous-unwind-tables",
    "-fno-ident",
    "-Wall",
    "-Wextra",
    "-Wformat=2",
    "-Wshadow",
    "-Werror",
];

fn main() {
    let manifest_dir =
        PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR"));
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").expect("OUT_DIR"));
    let host = env::var("HOST").expect("HOST");
    let init_dir = manifest_dir.join("init");

    let mut sources = Vec::new();
    for entry in fs::read_dir(&init_dir).expect("read boot/init") {
        let path = entry.expect("read boot/init").path();
        match path.extension().and_then(|e| e.to_str()) {
            Some("c") => sources.push(path.clone()),
            Some("h") => {}
            _ => continue,
        }
        println!("cargo:rerun-if-changed={}", path.display());
    }
    // Same order everywhere: the binary must not depend on directory order.
    sources.sort();
    println!("cargo:rerun-if-changed={}", init_dir.display());

    for (arch, triple) in ARCHES {
        let out = out_dir.join(format!("fuse-init-{arch}"));
        let native = host.split('-').next() == Some(*arch);
        for var in ["CC".to_string(), format!("CC_{}", triple.replace('-', "_"))] {
            println!("cargo:rerun-if-env-changed={var}");
        }
        let libc = musl(arch, native, &out_dir);
        if libc.is_empty() {
            println!(
                "cargo:warning=musl for {arch} not installed (apt-get install musl-dev{}): its init links glibc, 0.75 MB larger",
                if native { "" } else { ":arm64" }
            );
        }
        match build(triple, &host, native, &sources, &libc, &out) {
            Ok(()) => {}
            Err(why) if native => panic!("Cannot build the init for {arch}: {why}"),
            Err(why) => {
                // Optional: embed nothing, init_binary(arch) is None.
                println!("cargo:warning=No init for {arch} (image builds for it will fail): {why}");
                fs::write(&out, b"").expect("write empty init");
            }
        }
    }
}

/// Compile and link all sources into one static executable at `out`.
fn build(
    triple: &str,
    host: &str,
    native: bool,
    sources: &[PathBuf],
    libc: &[String],
    out: &Path,
) -> Result<(), String> {
    // A cross compiler that is not installed is the common case: say so without asking `cc`,
    // which warns loudly about it.
    let cross_gcc = format!("{}-gcc", triple.replacen("-unknown", "", 1));
    let env_cc = env::var_os(format!("CC_{}", triple.replace('-', "_")));
    if !native && env_cc.is_none() && !on_path(&cross_gcc) {
        return Err(format!(
            "{cross_gcc} not found (install it to build images for this arch)"
        ));
    }

    let compiler = cc::Build::new()
        .target(triple)
        .host(host)
        .opt_level_str("s")
        .debug(false)
        .pic(false)
        .cargo_metadata(false)
        .try_get_compiler()
        .map_err(|e| format!("no C compiler for {triple}: {e}"))?;

    // Is the compiler there at all? A missing cross compiler is the common, quiet case.
    let probe = compiler.to_command().arg("--version").output();
    match probe {
        Ok(o) if o.status.success() => {}
        _ => {
            return Err(format!(
                "C compiler {} not found (install it to build images for this arch)",
                compiler.path().display()
            ))
        }
    }

    let mut cmd = compiler.to_command();
    cmd.args(libc).args(CFLAGS).args(sources).arg("-o").arg(out);
    let output = cmd
        .output()
        .map_err(|e| format!("cannot run {}: {e}", compiler.path().display()))?;
    if !output.status.success() {
        return Err(format!(
            "{:?} failed:\n{}{}",
            cmd,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        ));
    }
    Ok(())
}

/// The compiler arguments that link the init for `arch` against musl instead of glibc, or
/// none when musl for `arch` is not installed. Debian's musl specs file replaces the C
/// library's headers, start files and libraries; musl has no kernel headers, so the
/// toolchain's (the same kernel's UAPI) are linked into a directory of their own: adding their
/// whole include directory would bring glibc's headers back.
fn musl(arch: &str, native: bool, out_dir: &Path) -> Vec<String> {
    let musl_lib = format!("/usr/lib/{arch}-linux-musl");
    // Missing, cargo reruns this script at every build until it is installed.
    println!("cargo:rerun-if-changed={musl_lib}/musl-gcc.specs");
    let specs = Path::new(&musl_lib).join("musl-gcc.specs");
    if !specs.is_file() {
        return Vec::new();
    }
    let gnu = format!("{arch}-linux-gnu");
    let (linux, asm) = if native {
        ("/usr/include".to_string(), format!("/usr/include/{gnu}"))
    } else {
        let cross = format!("/usr/{gnu}/include");
        (cross.clone(), cross)
    };
    let uapi = out_dir.join(format!("uapi-{arch}"));
    let _ = fs::remove_dir_all(&uapi);
    fs::create_dir_all(&uapi).expect("create the UAPI header directory");
    for (name, dir) in [("linux", &linux), ("asm-generic", &linux), ("asm", &asm)] {
        std::os::unix::fs::symlink(Path::new(dir).join(name), uapi.join(name))
            .expect("link the kernel headers");
    }
    vec![
        "-specs".into(),
        specs.display().to_string(),
        "-isystem".into(),
        uapi.display().to_string(),
    ]
}

fn on_path(program: &str) -> bool {
    env::var_os("PATH")
        .map(|paths| env::split_paths(&paths).any(|dir| dir.join(program).is_file()))
        .unwrap_or(false)
}
