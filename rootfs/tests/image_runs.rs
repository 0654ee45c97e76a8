//! End to end: a program's closure, written as an image and extracted, runs under the real
//! dynamic loader in a chroot. The chroot has no `ld.so.cache`, so this proves the placement
//! rules (interpreter path, standard directories, `$ORIGIN`) rather than the host's setup.

use std::fs;
use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};

use fuse_rootfs::cpio::write_newc;
use fuse_rootfs::elf::{add_with_closure, ClosureOptions};
use fuse_rootfs::squashfs::{write_squashfs, SquashfsOptions};
use fuse_rootfs::tree::Tree;

fn cc(args: &[&str], cwd: &Path) {
    let out = Command::new("cc")
        .args(args)
        .current_dir(cwd)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A program using libm and a library of its own found through `$ORIGIN/../lib`.
fn build_program(dir: &Path) -> std::path::PathBuf {
    fs::create_dir_all(dir.join("lib")).unwrap();
    fs::create_dir_all(dir.join("bin")).unwrap();
    fs::write(dir.join("foo.c"), "int foo(void) { return 42; }\n").unwrap();
    fs::write(
        dir.join("hello.c"),
        "#include <math.h>\n#include <stdio.h>\nint foo(void);\n\
         int main(int c, char **v) { printf(\"hello %d %.1f\\n\", foo(), sqrt(c * 16.0)); return 0; }\n",
    )
    .unwrap();
    cc(
        &[
            "-shared",
            "-fPIC",
            "-Wl,-soname,libfoo.so",
            "-o",
            "lib/libfoo.so",
            "foo.c",
        ],
        dir,
    );
    cc(
        &[
            "-o",
            "bin/hello",
            "hello.c",
            "-Llib",
            "-lfoo",
            "-lm",
            "-Wl,-rpath,$ORIGIN/../lib",
        ],
        dir,
    );
    dir.join("bin/hello")
}

/// Runs `/app/hello` chrooted in `root`; `None` if chroot is not permitted here.
fn run_in_chroot(root: &Path) -> Option<String> {
    let out = Command::new("chroot")
        .arg(root)
        .arg("/app/hello")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() && stderr.contains("Operation not permitted") {
        eprintln!("skipping: chroot not permitted");
        return None;
    }
    assert!(out.status.success(), "chroot run failed: {stderr}");
    Some(String::from_utf8(out.stdout).unwrap())
}

fn image_tree(dir: &Path) -> Tree {
    let bin = build_program(dir);
    let mut tree = Tree::new();
    let closure =
        add_with_closure(&mut tree, &bin, "/app/hello", &ClosureOptions::default()).unwrap();
    assert!(tree.contains("/lib/libfoo.so"), "{closure:?}");
    tree
}

#[test]
fn cpio_image_runs_in_chroot() {
    let dir = tempfile::tempdir().unwrap();
    let tree = image_tree(dir.path());
    let mut archive = Vec::new();
    write_newc(&tree, &mut archive).unwrap();
    let root = dir.path().join("root");
    fs::create_dir(&root).unwrap();
    let mut child = Command::new("cpio")
        .args(["-id", "--quiet"])
        .current_dir(&root)
        .stdin(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(&archive).unwrap();
    assert!(child.wait().unwrap().success());
    if let Some(out) = run_in_chroot(&root) {
        assert_eq!(out, "hello 42 4.0\n");
    }
}

#[test]
fn squashfs_image_runs_in_chroot() {
    let dir = tempfile::tempdir().unwrap();
    let tree = image_tree(dir.path());
    let img = dir.path().join("root.img");
    write_squashfs(&tree, &img, &SquashfsOptions::default()).unwrap();
    let root = dir.path().join("root");
    let st = Command::new("unsquashfs")
        .args(["-n", "-q", "-d"])
        .arg(&root)
        .arg(&img)
        .stdout(Stdio::null())
        .status()
        .unwrap();
    assert!(st.success());
    if let Some(out) = run_in_chroot(&root) {
        assert_eq!(out, "hello 42 4.0\n");
    }
}
