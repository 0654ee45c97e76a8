//! The fixed skeleton every image root has, and where the app goes in it.
//!
//! The root is read-only: the directories the init mounts tmpfs/proc/sys/devtmpfs on must exist
//! in the image, and the few files that change per boot (resolv.conf, hosts) are symlinks into
//! `/run`, which the init fills in.

use anyhow::Result;
use fuse_rootfs::tree::Tree;

/// Where the init reads the app spec from (see `fuse_boot::spec`).
pub(crate) const SPEC_PATH: &str = fuse_boot::spec::SPEC_PATH;
/// Where the app's own files go.
pub(crate) const APP_DIR: &str = "/app";
/// Empty directories every image has for volumes (`fuse run --volume NAME:/data`): the root
/// is read-only, so a mount point cannot be made at boot. Listed in the manifest.
pub(crate) const VOLUME_MOUNT_POINTS: &[&str] = &["/data"];

/// The skeleton: mount points, /etc basics for glibc and runtimes, the app directory.
pub(crate) fn skeleton() -> Result<Tree> {
    let mut tree = Tree::new();
    for dir in [
        "/dev",
        "/proc",
        "/sys",
        "/run",
        "/root",
        "/etc/fuse",
        APP_DIR,
    ] {
        tree.add_dir(dir, 0o755)?;
    }
    for dir in VOLUME_MOUNT_POINTS {
        tree.add_dir(dir, 0o755)?;
    }
    tree.add_dir("/tmp", 0o1777)?;
    tree.add_symlink("/etc/resolv.conf", "../run/resolv.conf")?;
    tree.add_symlink("/etc/hosts", "../run/hosts")?;
    tree.add_bytes(
        "/etc/passwd",
        &b"root:x:0:0:root:/root:/nonexistent\n"[..],
        0o644,
    )?;
    tree.add_bytes("/etc/group", &b"root:x:0:\n"[..], 0o644)?;
    tree.add_bytes(
        "/etc/nsswitch.conf",
        &b"passwd: files\ngroup: files\nhosts: files dns\n"[..],
        0o644,
    )?;
    tree.add_bytes(
        "/etc/os-release",
        &b"NAME=fuse\nID=fuse\nPRETTY_NAME=\"fuse minimal VM\"\n"[..],
        0o644,
    )?;
    Ok(tree)
}

#[cfg(test)]
mod tests {
    use super::*;
    use fuse_rootfs::tree::Node;

    #[test]
    fn skeleton_has_mount_points_and_run_symlinks() {
        let tree = skeleton().unwrap();
        for dir in ["/dev", "/proc", "/sys", "/run", "/tmp"] {
            assert!(matches!(tree.get(dir), Some(Node::Dir { .. })), "{dir}");
        }
        assert!(matches!(tree.get("/tmp"), Some(Node::Dir { mode: 0o1777 })));
        assert!(matches!(
            tree.get("/etc/resolv.conf"),
            Some(Node::Symlink { target }) if target == "../run/resolv.conf"
        ));
    }
}
