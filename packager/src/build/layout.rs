//! The fixed skeleton every image root has, and where the app goes in it.
//!
//! The root is read-only: the directories the init mounts tmpfs/proc/sys/devtmpfs on must exist
//! in the image, and the few files that change per boot (resolv.conf, hosts) are symlinks into
//! `/run`, which the init fills in.

use anyhow::Result;
use fuse_boot::spec::AppSpec;
use fuse_rootfs::tree::Tree;
use std::collections::BTreeMap;

/// Where the init reads the app spec from (see `fuse_boot::spec`).
pub(crate) const SPEC_PATH: &str = fuse_boot::spec::SPEC_PATH;
/// Where the app's own files go: a filesystem of its own in the image.
pub(crate) const APP_DIR: &str = crate::image::manifest::APP_DIR;
/// Where the init reads the app's configuration (spec, environments, their files).
pub(crate) const CONFIG_DIR: &str = "/etc/fuse";
/// Where that configuration is kept: in the app's filesystem (`CONFIG_DIR` is a symlink to
/// it), because it changes with the app (the spec names the jar, `hello-1.1.jar`), and the
/// root must not, so that a new version of the app leaves the root's bytes as they were.
pub(crate) const APP_CONFIG_DIR: &str = "/app/.fuse";
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

    /// The name `/etc/passwd` gives it when `[users]` does not name its uid.
    fn default_name(self) -> &'static str {
        match self.uid {
            0 => "root",
            65532 => "nonroot",
            _ => "app",
        }
    }
}

/// The users and groups fuse.toml adds (`[users]`, `[groups]`) beside root and the app's:
/// names the app looks up, such as nginx's `user www-data;`. Keyed by name, so sorted.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Accounts {
    /// name → (uid, primary gid).
    pub(crate) users: BTreeMap<String, (u32, u32)>,
    /// name → gid.
    pub(crate) groups: BTreeMap<String, u32>,
}

/// Which table entry an [`AccountsError`] is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Table {
    Users,
    Groups,
}

/// Two accounts with one name or one id: `entry` (a name in `table`) is the one to change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct AccountsError {
    pub(crate) table: Table,
    pub(crate) entry: String,
    pub(crate) message: String,
}

/// One `/etc/passwd` line's fields.
#[derive(Debug, Clone, PartialEq, Eq)]
struct PasswdEntry {
    name: String,
    uid: u32,
    gid: u32,
    home: String,
}

/// The image's `/etc/passwd` and `/etc/group`, and the app's home directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Etc {
    pub(crate) passwd: String,
    pub(crate) group: String,
    /// `None` for root (whose home, /root, is in the skeleton).
    pub(crate) app_home: Option<String>,
}

/// Root first, then every other user by uid: the app's (named by the `[users]` entry with its
/// uid, else "nonroot" or "app"), and the `[users]` ones (home `/nonexistent`: only the app
/// has one). Groups likewise: root, then by gid every primary gid of those users and every
/// `[groups]` entry; a gid `[groups]` does not name takes the name of its first user (by
/// uid), as `useradd` makes a user's own group. A name or an id given twice is an error
/// naming the `[users]`/`[groups]` entry at fault.
pub(crate) fn etc(app: AppUser, accounts: &Accounts) -> Result<Etc, AccountsError> {
    // nonroot is fuse's, as root is: [users] and [groups] cannot rename it or take its ids.
    // Another app user is named by the [users] entry with its uid, if there is one.
    let fixed_app = app == AppUser::NONROOT;
    let table_user = |uid: u32| {
        accounts
            .users
            .iter()
            .find(|(_, &(u, _))| u == uid && !fixed_app)
    };
    let mut users: Vec<(PasswdEntry, Option<&str>)> = Vec::new();
    for (name, &(uid, gid)) in &accounts.users {
        let entry = if uid == app.uid && !fixed_app {
            // This entry names the app: its gid must be the app's.
            if gid != app.gid {
                return Err(AccountsError {
                    table: Table::Users,
                    entry: name.clone(),
                    message: format!(
                        "user {name} has the app's uid {uid} but gid {gid}, not the app's {}: give it \"{uid}:{}\"",
                        app.gid, app.gid
                    ),
                });
            }
            PasswdEntry {
                name: name.clone(),
                uid,
                gid,
                home: format!("/home/{name}"),
            }
        } else {
            PasswdEntry {
                name: name.clone(),
                uid,
                gid,
                home: "/nonexistent".into(),
            }
        };
        users.push((entry, Some(name)));
    }
    if app.uid != 0 && table_user(app.uid).is_none() {
        let name = app.default_name();
        users.push((
            PasswdEntry {
                name: name.into(),
                uid: app.uid,
                gid: app.gid,
                home: format!("/home/{name}"),
            },
            None,
        ));
    }
    users.sort_by(|a, b| (a.0.uid, &a.0.name).cmp(&(b.0.uid, &b.0.name)));
    let root = PasswdEntry {
        name: "root".into(),
        uid: 0,
        gid: 0,
        home: "/root".into(),
    };
    let conflict = |table, entry: &str, message: String| AccountsError {
        table,
        entry: entry.to_string(),
        message,
    };
    // Names and uids once each (root and the app's are not table entries: the other one is).
    let mut seen: Vec<&PasswdEntry> = vec![&root];
    for (user, table_name) in &users {
        if let Some(other) = seen
            .iter()
            .find(|o| o.name == user.name || o.uid == user.uid)
        {
            let (what, value) = if other.name == user.name {
                ("name", user.name.clone())
            } else {
                ("uid", user.uid.to_string())
            };
            return Err(match table_name {
                Some(entry) => conflict(
                    Table::Users,
                    entry,
                    format!(
                        "user {entry}: {what} {value} is already {}'s: choose another",
                        other.name
                    ),
                ),
                // The app's own entry, sorted after the table's one it collides with.
                None => conflict(
                    Table::Users,
                    &other.name,
                    format!(
                        "user {}: {what} {value} is the app's user's ({}, uid {}): choose another",
                        other.name, user.name, user.uid
                    ),
                ),
            });
        }
        seen.push(user);
    }

    // Groups: gid → name, from [groups], then from the users whose primary gid it is.
    let mut groups: BTreeMap<u32, (String, bool)> = BTreeMap::new();
    groups.insert(0, ("root".into(), false));
    if fixed_app {
        groups.insert(app.gid, (app.default_name().into(), false));
    }
    for (name, &gid) in &accounts.groups {
        if let Some((other, _)) = groups.get(&gid) {
            return Err(conflict(
                Table::Groups,
                name,
                format!("group {name}: gid {gid} is already {other}'s: choose another"),
            ));
        }
        groups.insert(gid, (name.clone(), true));
    }
    for (user, _) in &users {
        groups
            .entry(user.gid)
            .or_insert_with(|| (user.name.clone(), false));
    }
    // uid 0 with another gid (`user = "0:50"`): the app's group still has a name.
    groups
        .entry(app.gid)
        .or_insert_with(|| ("app".into(), false));
    let mut names: BTreeMap<&str, u32> = BTreeMap::new();
    for (gid, (name, from_table)) in &groups {
        if let Some(other) = names.insert(name, *gid) {
            return Err(if *from_table {
                conflict(
                    Table::Groups,
                    name,
                    format!("group {name}: the name is already gid {other}'s (user {name}'s own group): give the group gid {other} or another name"),
                )
            } else {
                conflict(
                    Table::Users,
                    name,
                    format!("user {name}: its group (gid {gid}) would be named {name}, already gid {other}'s: name gid {gid} in [groups] or give the user gid {other}"),
                )
            });
        }
    }

    let line = |u: &PasswdEntry| {
        format!(
            "{0}:x:{1}:{2}:{0}:{3}:/nonexistent\n",
            u.name, u.uid, u.gid, u.home
        )
    };
    let mut passwd = line(&root);
    for (user, _) in &users {
        passwd.push_str(&line(user));
    }
    let mut group = String::new();
    for (gid, (name, _)) in &groups {
        group.push_str(&format!("{name}:x:{gid}:\n"));
    }
    let app_home = users
        .iter()
        .find(|(u, _)| u.uid == app.uid && app.uid != 0)
        .map(|(u, _)| u.home.clone());
    Ok(Etc {
        passwd,
        group,
        app_home,
    })
}

/// Writes `/etc/passwd` and `/etc/group` (runtimes and libc look the running uid up there: the
/// JVM's user.home, Python's getpass, `id`; servers their worker user: nginx's `user`), gives
/// the app its home, and makes the spec run as it with that HOME (unless the configuration set
/// another).
pub(crate) fn add_user(
    tree: &mut Tree,
    spec: &mut AppSpec,
    user: AppUser,
    accounts: &Accounts,
) -> Result<()> {
    let etc = etc(user, accounts).map_err(|e| anyhow::anyhow!(e.message))?;
    if let Some(home) = &etc.app_home {
        tree.add_dir(home, 0o755)?;
    }
    tree.add_bytes("/etc/passwd", etc.passwd.into_bytes(), 0o644)?;
    tree.add_bytes("/etc/group", etc.group.into_bytes(), 0o644)?;
    spec.uid = user.uid;
    spec.gid = user.gid;
    if let Some(home) = spec
        .env
        .iter_mut()
        .find(|(k, v)| k == "HOME" && v == "/root")
    {
        home.1 = etc.app_home.unwrap_or_else(|| "/root".into());
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
        add_user(&mut tree, &mut spec, AppUser::NONROOT, &Accounts::default()).unwrap();
        assert!(passwd(&tree).contains("nonroot:x:65532:65532:nonroot:/home/nonroot:"));
        assert!(matches!(tree.get("/home/nonroot"), Some(Node::Dir { .. })));
        assert_eq!((spec.uid, spec.gid), (65532, 65532));
        assert_eq!(spec.env, vec![("HOME".into(), "/home/nonroot".into())]);

        let mut tree = skeleton().unwrap();
        let mut spec = AppSpec::new("/app/x");
        add_user(&mut tree, &mut spec, AppUser::ROOT, &Accounts::default()).unwrap();
        assert_eq!(passwd(&tree), "root:x:0:0:root:/root:/nonexistent\n");
        assert_eq!((spec.uid, spec.gid), (0, 0));

        let mut tree = skeleton().unwrap();
        let mut spec = AppSpec::new("/app/x");
        add_user(
            &mut tree,
            &mut spec,
            AppUser { uid: 1000, gid: 50 },
            &Accounts::default(),
        )
        .unwrap();
        assert!(passwd(&tree).contains("app:x:1000:50:app:/home/app:"));
    }

    fn accounts(users: &[(&str, u32, u32)], groups: &[(&str, u32)]) -> Accounts {
        Accounts {
            users: users
                .iter()
                .map(|&(n, u, g)| (n.to_string(), (u, g)))
                .collect(),
            groups: groups.iter().map(|&(n, g)| (n.to_string(), g)).collect(),
        }
    }

    #[test]
    fn table_users_and_groups_are_added_sorted_by_id() {
        // nginx: the master runs as root, its workers as www-data.
        let files = super::etc(
            AppUser::ROOT,
            &accounts(&[("www-data", 33, 33), ("backup", 34, 34)], &[("adm", 4)]),
        )
        .unwrap();
        assert_eq!(
            files.passwd,
            "root:x:0:0:root:/root:/nonexistent\n\
             www-data:x:33:33:www-data:/nonexistent:/nonexistent\n\
             backup:x:34:34:backup:/nonexistent:/nonexistent\n"
        );
        assert_eq!(
            files.group,
            "root:x:0:\nadm:x:4:\nwww-data:x:33:\nbackup:x:34:\n"
        );
        assert_eq!(files.app_home, None);

        // Beside the default app user; a [groups] entry names a user's gid.
        let files = super::etc(
            AppUser::NONROOT,
            &accounts(&[("web", 1000, 100)], &[("users", 100)]),
        )
        .unwrap();
        assert_eq!(
            files.passwd,
            "root:x:0:0:root:/root:/nonexistent\n\
             web:x:1000:100:web:/nonexistent:/nonexistent\n\
             nonroot:x:65532:65532:nonroot:/home/nonroot:/nonexistent\n"
        );
        assert_eq!(files.group, "root:x:0:\nusers:x:100:\nnonroot:x:65532:\n");
        assert_eq!(files.app_home.as_deref(), Some("/home/nonroot"));
    }

    #[test]
    fn root_with_another_gid_has_a_named_group() {
        let files = super::etc(AppUser { uid: 0, gid: 50 }, &Accounts::default()).unwrap();
        assert_eq!(files.passwd, "root:x:0:0:root:/root:/nonexistent\n");
        assert_eq!(files.group, "root:x:0:\napp:x:50:\n");
        let files = super::etc(
            AppUser { uid: 0, gid: 50 },
            &accounts(&[], &[("staff", 50)]),
        )
        .unwrap();
        assert_eq!(files.group, "root:x:0:\nstaff:x:50:\n");
    }

    #[test]
    fn a_table_user_with_the_apps_uid_names_the_app() {
        let app = AppUser { uid: 33, gid: 33 };
        let files = super::etc(app, &accounts(&[("www-data", 33, 33)], &[])).unwrap();
        assert_eq!(
            files.passwd,
            "root:x:0:0:root:/root:/nonexistent\n\
             www-data:x:33:33:www-data:/home/www-data:/nonexistent\n"
        );
        assert_eq!(files.group, "root:x:0:\nwww-data:x:33:\n");
        assert_eq!(files.app_home.as_deref(), Some("/home/www-data"));

        let mut tree = skeleton().unwrap();
        let mut spec = AppSpec::new("/app/x");
        spec.env.push(("HOME".into(), "/root".into()));
        add_user(
            &mut tree,
            &mut spec,
            app,
            &accounts(&[("www-data", 33, 33)], &[]),
        )
        .unwrap();
        assert_eq!((spec.uid, spec.gid), (33, 33));
        assert_eq!(spec.env, vec![("HOME".into(), "/home/www-data".into())]);
        assert!(matches!(tree.get("/home/www-data"), Some(Node::Dir { .. })));

        let err = super::etc(app, &accounts(&[("www-data", 33, 34)], &[])).unwrap_err();
        assert_eq!((err.table, err.entry.as_str()), (Table::Users, "www-data"));
        assert!(
            err.message.contains("gid 34, not the app's 33"),
            "{}",
            err.message
        );
    }

    #[test]
    fn names_and_ids_are_given_once() {
        let err = |app, users: &[(&str, u32, u32)], groups: &[(&str, u32)]| {
            let e = etc(app, &accounts(users, groups)).unwrap_err();
            (e.table, e.entry, e.message)
        };
        // Two users with one uid.
        let (table, entry, message) = err(AppUser::ROOT, &[("a", 33, 33), ("b", 33, 33)], &[]);
        assert_eq!((table, entry.as_str()), (Table::Users, "b"));
        assert!(message.contains("uid 33 is already a's"), "{message}");
        // The default app user's uid and name.
        let (_, entry, message) = err(AppUser::NONROOT, &[("x", 65532, 65532)], &[]);
        assert_eq!(entry, "x");
        assert!(
            message.contains("uid 65532 is already nonroot's"),
            "{message}"
        );
        let (_, entry, message) = err(AppUser::NONROOT, &[("a", 65532, 65532)], &[]);
        assert_eq!(entry, "a");
        assert!(
            message.contains("is the app's user's (nonroot, uid 65532)"),
            "{message}"
        );
        let (table, entry, message) = err(AppUser::NONROOT, &[], &[("other", 65532)]);
        assert_eq!((table, entry.as_str()), (Table::Groups, "other"));
        assert!(
            message.contains("gid 65532 is already nonroot's"),
            "{message}"
        );
        // Another app user's uid: the entry names it, and must have its gid.
        let (_, entry, message) = err(
            AppUser {
                uid: 1000,
                gid: 1000,
            },
            &[("x", 1000, 1)],
            &[],
        );
        assert_eq!(entry, "x");
        assert!(
            message.contains("the app's uid 1000 but gid 1"),
            "{message}"
        );
        let (_, entry, message) = err(
            AppUser {
                uid: 1000,
                gid: 1000,
            },
            &[("app", 2000, 2000)],
            &[],
        );
        assert_eq!(entry, "app");
        assert!(message.contains("name app is already app's"), "{message}");
        let (_, entry, message) = err(AppUser::NONROOT, &[("nonroot", 7, 7)], &[]);
        assert_eq!(entry, "nonroot");
        assert!(
            message.contains("is the app's user's (nonroot, uid 65532)"),
            "{message}"
        );
        // Two groups with one gid; a group named like another's.
        let (table, entry, message) = err(AppUser::ROOT, &[], &[("a", 5), ("b", 5)]);
        assert_eq!((table, entry.as_str()), (Table::Groups, "b"));
        assert!(message.contains("gid 5 is already a's"), "{message}");
        let (table, entry, message) =
            err(AppUser::ROOT, &[("www-data", 33, 33)], &[("www-data", 34)]);
        assert_eq!((table, entry.as_str()), (Table::Groups, "www-data"));
        assert!(message.contains("give the group gid 33"), "{message}");
        let (table, entry, message) =
            err(AppUser::ROOT, &[("www-data", 35, 35)], &[("www-data", 34)]);
        assert_eq!((table, entry.as_str()), (Table::Users, "www-data"));
        assert!(message.contains("name gid 35 in [groups]"), "{message}");
        // The root group cannot be renamed.
        let (table, _, message) = err(AppUser::ROOT, &[], &[("wheel", 0)]);
        assert_eq!(table, Table::Groups);
        assert!(message.contains("gid 0 is already root's"), "{message}");
    }
}
