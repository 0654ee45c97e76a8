//! The fixed skeleton every image root has, and where the app goes in it.
//!
//! The root is read-only: the directories the init mounts tmpfs/proc/sys/devtmpfs on must exist
//! in the image, and the few files that change per boot (resolv.conf, hosts) are symlinks into
//! `/run`, which the init fills in.

use anyhow::Result;
use fuse_boot::spec::AppSpec;
use fuse_rootfs::tree::Tree;

/// Where the init reads the app spec from (see `fuse_boot::spec`).
pub(crate) const SPEC_PATH: &str = fuse_boot::spec::SPEC_PATH;
/// Where the app's own files go.
pub(crate) const APP_DIR: &str = "/app";
/// Empty directories every image has for volumes (`fuse run --volume NAME:/data`): the root
/// is read-only, so a mount point cannot be made at boot. Listed in the manifest.
pub(crate) const VOLUME_MOUNT_POINTS: &[&str] = &["/data"];

/// Who the app runs as: the init drops to these ids (and every capability) before exec.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct AppUser {
    pub(crate) uid: u32,
    pub(crate) gid: u32,
}

impl AppUser {
    /// The default: 65532 "nonroot", the id Google's distroless images use, so files made for
    /// those images (volumes, mounted secrets) have the owner they expect, and far from the
    /// 1000s of a host's human users and the 65534 of `nobody`, whose files are everybody's.
    pub(crate) const NONROOT: AppUser = AppUser {
        uid: 65532,
        gid: 65532,
    };
    /// `user = "root"`: the opt-out.
    pub(crate) const ROOT: AppUser = AppUser { uid: 0, gid: 0 };

    /// The name `/etc/passwd` gives it.
    pub(crate) fn name(self) -> &'static str {
        match self.uid {
            0 => "root",
            65532 => "nonroot",
            _ => "app",
        }
    }

    /// Its home directory (in the image, read-only like the rest of it).
    pub(crate) fn home(self) -> String {
        match self.uid {
            0 => "/root".into(),
            _ => format!("/home/{}", self.name()),
        }
    }
}

/// Names `user` in the image's `/etc/passwd` and `/etc/group` (runtimes and libc look the
/// running uid up there: the JVM's user.home, Python's getpass, `id`), gives it its home, and
/// makes the spec run as it with that HOME (unless the configuration set another).
pub(crate) fn add_user(tree: &mut Tree, spec: &mut AppSpec, user: AppUser) -> Result<()> {
    let mut passwd = String::from("root:x:0:0:root:/root:/nonexistent\n");
    let mut group = String::from("root:x:0:\n");
    if user.uid != 0 {
        let (name, home) = (user.name(), user.home());
        passwd.push_str(&format!(
            "{name}:x:{}:{}:{name}:{home}:/nonexistent\n",
            user.uid, user.gid
        ));
        tree.add_dir(&home, 0o755)?;
    }
    if user.gid != 0 {
        group.push_str(&format!("{}:x:{}:\n", user.name(), user.gid));
    }
    tree.add_bytes("/etc/passwd", passwd.into_bytes(), 0o644)?;
    tree.add_bytes("/etc/group", group.into_bytes(), 0o644)?;
    spec.uid = user.uid;
    spec.gid = user.gid;
    if let Some(home) = spec
        .env
        .iter_mut()
        .find(|(k, v)| k == "HOME" && v == "/root")
    {
        home.1 = user.home();
    }
    Ok(())
}

/// The skeleton: mount points, /etc basics for glibc and runtimes, the app directory. The
/// users (`/etc/passwd`, `/etc/group`) come with [`add_user`], once the app's is known.
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

    #[test]
    fn add_user_names_the_app_user_and_runs_the_spec_as_it() {
        let passwd = |tree: &Tree| match tree.get("/etc/passwd") {
            Some(Node::File { source, .. }) => String::from_utf8(source.read().unwrap()).unwrap(),
            other => panic!("{other:?}"),
        };
        let mut tree = skeleton().unwrap();
        let mut spec = AppSpec::new("/app/x");
        spec.env.push(("HOME".into(), "/root".into()));
        add_user(&mut tree, &mut spec, AppUser::NONROOT).unwrap();
        assert!(passwd(&tree).contains("nonroot:x:65532:65532:nonroot:/home/nonroot:"));
        assert!(matches!(tree.get("/home/nonroot"), Some(Node::Dir { .. })));
        assert_eq!((spec.uid, spec.gid), (65532, 65532));
        assert_eq!(spec.env, vec![("HOME".into(), "/home/nonroot".into())]);

        let mut tree = skeleton().unwrap();
        let mut spec = AppSpec::new("/app/x");
        add_user(&mut tree, &mut spec, AppUser::ROOT).unwrap();
        assert_eq!(passwd(&tree), "root:x:0:0:root:/root:/nonexistent\n");
        assert_eq!((spec.uid, spec.gid), (0, 0));

        let mut tree = skeleton().unwrap();
        let mut spec = AppSpec::new("/app/x");
        add_user(&mut tree, &mut spec, AppUser { uid: 1000, gid: 50 }).unwrap();
        assert!(passwd(&tree).contains("app:x:1000:50:app:/home/app:"));
    }
}
