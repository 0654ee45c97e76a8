//! The shared libraries of the ELF files an app brings in its own tree: a venv's compiled
//! extensions (numpy's `_multiarray_umath….so`, markupsafe's `_speedups….so`), Node addons
//! (`*.node`), programs shipped in `node_modules`. Each is resolved like the main binary, placed
//! where it is in the image, so `$ORIGIN` in its RPATH/RUNPATH finds what the app ships beside
//! it (auditwheel's `numpy.libs/`, already copied, never twice) and the rest (`libstdc++.so.6`,
//! `libgfortran`…) comes from the host (or sysroot) into the image's library directories.
//!
//! Not every ELF in an app is for the image: packages ship prebuilt binaries for every platform
//! (`prebuilds/linux-arm64/…`, musl builds beside glibc ones) and pick one at run time. Those
//! are kept as they are (they are the package's files) and not resolved, with one notice; a
//! missing library of an ELF that is for the image is an error.

use super::appdir::AppElf;
use anyhow::{Context, Result};
use fuse_rootfs::elf::{self, ClosureOptions, ElfInfo};
use fuse_rootfs::tree::Tree;

/// Why an app's ELF file is left unresolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Foreign {
    /// Built for another machine or class (`aarch64`, `x86_64 (32-bit)`).
    Arch(String),
    /// Built against musl, whose loader and libc the image does not have.
    Musl,
}

impl std::fmt::Display for Foreign {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Foreign::Arch(arch) => f.write_str(arch),
            Foreign::Musl => f.write_str("musl"),
        }
    }
}

/// Whether `info` is an ELF the image's loader would not load.
pub(crate) fn foreign(info: &ElfInfo, options: &ClosureOptions) -> Option<Foreign> {
    if info.arch != Some(options.arch) || !info.is_64 {
        return Some(Foreign::Arch(info.arch_name()));
    }
    let musl_interp = info
        .interpreter
        .as_deref()
        .is_some_and(|i| i.contains("ld-musl-"));
    if musl_interp || info.needed.iter().any(|n| n.starts_with("libc.musl-")) {
        return Some(Foreign::Musl);
    }
    None
}

/// Adds the interpreter and libraries every ELF of `elves` needs, except what the tree has at
/// that path already (the app's own bundled libraries, or a library the runtime brought).
/// A library found nowhere is an error naming the ELF as the image has it.
pub(crate) fn add_app_libraries(
    tree: &mut Tree,
    elves: &[AppElf],
    options: &ClosureOptions,
    progress: &mut dyn FnMut(&str),
) -> Result<()> {
    let mut skipped: Vec<(String, String)> = Vec::new();
    for app_elf in elves {
        let info = match elf::inspect(&app_elf.host) {
            Ok(info) => info,
            // Not something a loader would map either (truncated, a test fixture): as the
            // package shipped it.
            Err(err) => {
                skipped.push((app_elf.image.clone(), format!("unreadable: {err}")));
                continue;
            }
        };
        if let Some(why) = foreign(&info, options) {
            skipped.push((app_elf.image.clone(), why.to_string()));
            continue;
        }
        if info.is_static {
            continue;
        }
        let closure = elf::resolve_closure(&app_elf.host, &app_elf.image, options)
            .with_context(|| format!("Cannot package the app's {}", app_elf.image))?;
        let interpreter = closure.interpreter.iter().map(|i| (i, 0o755));
        let libraries = closure.libraries.iter().map(|l| (l, 0o644));
        for (lib, mode) in interpreter.chain(libraries) {
            if tree.get(&lib.image_path).is_some() {
                continue;
            }
            tree.add_host_file(&lib.image_path, &lib.host_path, mode)
                .with_context(|| format!("Cannot package the app's {}", app_elf.image))?;
        }
    }
    if !skipped.is_empty() {
        let shown: Vec<String> = skipped
            .iter()
            .take(3)
            .map(|(path, why)| format!("{path} ({why})"))
            .collect();
        let more = match skipped.len() {
            n if n > 3 => format!(", and {} more", n - 3),
            _ => String::new(),
        };
        progress(&format!(
            "kept {} ELF file(s) of the app that are not for this image ({}) without their libraries: {}{more}",
            skipped.len(),
            options.arch,
            shown.join(", ")
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use fuse_rootfs::Arch;
    use std::path::{Path, PathBuf};
    use std::process::Command;

    fn cc(dir: &Path, args: &[&str]) {
        let out = Command::new("cc")
            .args(args)
            .current_dir(dir)
            .output()
            .expect("cc must be installed");
        assert!(
            out.status.success(),
            "cc {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// An "extension module" `pkg/_ext.so` linked against the bundled `pkg.libs/libbundled.so`
    /// through `$ORIGIN/../pkg.libs`, as auditwheel lays out a wheel, and against the host's
    /// libstdc++.
    fn wheel_like(dir: &Path) -> (PathBuf, PathBuf) {
        std::fs::create_dir_all(dir.join("pkg")).unwrap();
        std::fs::create_dir_all(dir.join("pkg.libs")).unwrap();
        std::fs::write(dir.join("b.c"), "int bundled(void) { return 7; }\n").unwrap();
        std::fs::write(
            dir.join("e.cc"),
            "#include <string>\nextern \"C\" int bundled(void);\n\
             extern \"C\" int ext(void) { return bundled() + std::string(\"x\").size(); }\n",
        )
        .unwrap();
        cc(
            dir,
            &[
                "-shared",
                "-fPIC",
                "-Wl,-soname,libbundled.so",
                "-o",
                "pkg.libs/libbundled.so",
                "b.c",
            ],
        );
        let out = Command::new("c++")
            .args([
                "-shared",
                "-fPIC",
                "-o",
                "pkg/_ext.so",
                "e.cc",
                "-Lpkg.libs",
                "-lbundled",
                "-Wl,--no-as-needed,-rpath,$ORIGIN/../pkg.libs,--disable-new-dtags",
            ])
            .current_dir(dir)
            .output()
            .expect("c++ must be installed");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        (dir.join("pkg/_ext.so"), dir.join("pkg.libs/libbundled.so"))
    }

    fn options() -> ClosureOptions {
        ClosureOptions::default()
    }

    #[test]
    fn bundled_libraries_stay_and_host_ones_come_along() {
        let dir = tempfile::tempdir().unwrap();
        let (ext, bundled) = wheel_like(dir.path());
        let site = "/opt/venv/lib/python3/site-packages";
        let mut tree = Tree::new();
        // As the app copy left them: the bundled library executable, so re-adding it with
        // the library mode would conflict.
        tree.add_host_file(&format!("{site}/pkg/_ext.so"), &ext, 0o755)
            .unwrap();
        tree.add_host_file(&format!("{site}/pkg.libs/libbundled.so"), &bundled, 0o755)
            .unwrap();
        let elves = vec![
            AppElf {
                host: ext.clone(),
                image: format!("{site}/pkg/_ext.so"),
            },
            AppElf {
                host: bundled.clone(),
                image: format!("{site}/pkg.libs/libbundled.so"),
            },
        ];
        let mut notices = Vec::new();
        add_app_libraries(&mut tree, &elves, &options(), &mut |n| {
            notices.push(n.to_string())
        })
        .unwrap();
        assert!(notices.is_empty(), "{notices:?}");
        let paths: Vec<&str> = tree.iter().map(|(p, _)| p).collect();
        let libstdcxx: Vec<&&str> = paths
            .iter()
            .filter(|p| p.ends_with("/libstdc++.so.6"))
            .collect();
        assert_eq!(libstdcxx.len(), 1, "{paths:?}");
        let std_dirs = elf::standard_dirs(Arch::host());
        let dir_of = |p: &str| p.rsplit_once('/').unwrap().0.to_string();
        assert!(std_dirs.contains(&dir_of(libstdcxx[0])), "{paths:?}");
        assert!(paths.iter().any(|p| p.ends_with("/libc.so.6")), "{paths:?}");
        // libbundled.so once, where the wheel has it.
        let bundled_copies = paths
            .iter()
            .filter(|p| p.ends_with("libbundled.so"))
            .count();
        assert_eq!(bundled_copies, 1, "{paths:?}");
    }

    #[test]
    fn a_missing_library_names_the_elf_in_the_image_and_library_path() {
        let dir = tempfile::tempdir().unwrap();
        let (ext, bundled) = wheel_like(dir.path());
        std::fs::remove_file(&bundled).unwrap();
        let elves = vec![AppElf {
            host: ext,
            image: "/app/pkg/_ext.so".into(),
        }];
        let err = add_app_libraries(&mut Tree::new(), &elves, &options(), &mut |_| {}).unwrap_err();
        let msg = format!("{err:#}");
        assert!(!msg.contains('\n'), "{msg}");
        for needle in ["/app/pkg/_ext.so", "libbundled.so", "--library-path"] {
            assert!(msg.contains(needle), "{needle} missing: {msg}");
        }
    }

    #[test]
    fn elves_for_another_arch_or_musl_are_kept_unresolved_with_one_notice() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("p.c"), "int main(void) { return 0; }\n").unwrap();
        cc(dir.path(), &["-o", "p", "p.c"]);
        let mut bytes = std::fs::read(dir.path().join("p")).unwrap();
        let other = match Arch::host() {
            Arch::X86_64 => Arch::Aarch64,
            Arch::Aarch64 => Arch::X86_64,
        };
        bytes[18..20].copy_from_slice(&other.elf_machine().to_le_bytes());
        std::fs::write(dir.path().join("other"), bytes).unwrap();
        // A musl build's only distinguishing mark is what it needs: a fake needing a
        // library no glibc system has would otherwise be a missing library.
        let musl = fake_musl(dir.path());
        let elves = vec![
            AppElf {
                host: dir.path().join("other"),
                image: "/app/prebuilds/linux-other/x.node".into(),
            },
            AppElf {
                host: musl,
                image: "/app/prebuilds/linux-x/x.musl.node".into(),
            },
        ];
        let mut tree = Tree::new();
        let mut notices = Vec::new();
        add_app_libraries(&mut tree, &elves, &options(), &mut |n| {
            notices.push(n.to_string())
        })
        .unwrap();
        assert_eq!(tree.file_count(), 0);
        assert_eq!(notices.len(), 1, "{notices:?}");
        let notice = &notices[0];
        assert!(notice.contains("kept 2 ELF file(s)"), "{notice}");
        assert!(notice.contains("linux-other/x.node"), "{notice}");
        assert!(notice.contains("x.musl.node (musl)"), "{notice}");
    }

    /// A shared object that needs `libc.musl-<arch>.so.1`, as musl's toolchain links them.
    fn fake_musl(dir: &Path) -> PathBuf {
        let name = format!("libc.musl-{}.so.1", Arch::host());
        std::fs::write(dir.join("m.c"), "int m(void) { return 0; }\n").unwrap();
        cc(
            dir,
            &[
                "-shared",
                "-fPIC",
                &format!("-Wl,-soname,{name}"),
                "-o",
                &name,
                "m.c",
            ],
        );
        cc(
            dir,
            &[
                "-shared",
                "-fPIC",
                "-o",
                "x.musl.node",
                "m.c",
                "-Wl,--no-as-needed",
                "-L.",
                &format!("-l:{name}"),
            ],
        );
        std::fs::remove_file(dir.join(&name)).unwrap();
        dir.join("x.musl.node")
    }
}
