//! The kernel command line of an image, built in one place: the packager bakes it into the
//! UKI's `.cmdline` (and the manifest), the runner passes it on with only run-time extras added
//! (see `vm::machine`). It is part of the image's digest: changing a byte changes every image.

use fuse_rootfs::Arch;

/// The kernel's name for the serial console of the machine fuse gives `arch`: the 8250 UART
/// of `q35` (`ttyS0`), the PL011 of `virt` (`ttyAMA0`). The runner reads the app's output
/// from it.
pub fn console_device(arch: Arch) -> &'static str {
    match arch {
        Arch::X86_64 => "ttyS0",
        Arch::Aarch64 => "ttyAMA0",
    }
}

/// The root of an image as a dm-verity device: the data (root filesystem) and hash
/// partitions and what the kernel's `verity` target needs to check every block read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerityRoot {
    /// PARTUUID of the root filesystem's partition.
    pub data_partuuid: String,
    /// PARTUUID of the hash tree's partition.
    pub hash_partuuid: String,
    /// 4096-byte blocks of the root filesystem the tree covers.
    pub data_blocks: u64,
    pub root_hash: String,
    pub salt: String,
}

/// A filesystem of an image read through dm-verity: the root (the runtime, libraries and
/// everything outside `/app`) and the app (`/app`, a filesystem of its own so that a new
/// version of the app changes only its partition, see `fuse_boot::disk`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Volume {
    Root,
    App,
}

impl Volume {
    pub const ALL: [Volume; 2] = [Volume::Root, Volume::App];

    /// The dm device's name in `dm-mod.create=`.
    pub fn dm_name(self) -> &'static str {
        match self {
            Volume::Root => "fuse-root",
            Volume::App => "fuse-app",
        }
    }

    /// The device the kernel creates (its minor is fixed in `dm-mod.create=`).
    pub fn device(self) -> &'static str {
        match self {
            Volume::Root => "/dev/dm-0",
            Volume::App => "/dev/dm-1",
        }
    }

    fn minor(self) -> u32 {
        match self {
            Volume::Root => 0,
            Volume::App => 1,
        }
    }

    /// What messages call it.
    pub fn label(self) -> &'static str {
        match self {
            Volume::Root => "root",
            Volume::App => "app",
        }
    }
}

/// The dm device the kernel creates for the root's [`VerityRoot`].
pub const VERITY_DEVICE: &str = "/dev/dm-0";

/// The `verity` dm table of `v` (drivers/md/dm-verity-target.c): format 1, 4096-byte data
/// and hash blocks, the tree from block 0 of the hash partition, sha256, and
/// `panic_on_corruption`: a block that fails verification panics the kernel ("dm-verity
/// device corrupted"), rather than handing the app EIO or SIGBUS.
pub fn verity_table(v: &VerityRoot) -> String {
    format!(
        "0 {sectors} verity 1 PARTUUID={data} PARTUUID={hash} 4096 4096 {blocks} 0 sha256 {root} {salt} 1 panic_on_corruption",
        sectors = v.data_blocks * 8,
        data = v.data_partuuid,
        hash = v.hash_partuuid,
        blocks = v.data_blocks,
        root = v.root_hash,
        salt = v.salt,
    )
}

/// The command line of an image whose root and app filesystems are checked by dm-verity:
/// [`image_cmdline`] with `dm-mod.create="fuse-root,,0,ro,<table>;fuse-app,,1,ro,<table>"`
/// before it, so the kernel itself (CONFIG_DM_INIT) creates `/dev/dm-0` and `/dev/dm-1` after
/// probing the disks and before the init runs; `fuse.root=` names the first and `fuse.app=`
/// the second, which the init mounts on `/app`. The root hashes are in this line, so whatever
/// covers the line (the UKI's digest, a signature of the UKI) covers every byte of both.
///
/// `dm-mod.waitfor=` names the four partitions: the kernel creates the devices at
/// `late_initcall`, and an NVMe disk (a cloud's root disk) is probed asynchronously, so
/// without it the partitions may not exist yet and the root is never created. The kernel
/// polls until they are there (at once for virtio-blk, which probes synchronously: a direct
/// hello boot measured no slower, 1.65-1.87 s against 1.83-2.05 s before). A disk without
/// those partitions then makes the kernel wait forever rather than fail; `fuse run` checks
/// the disk's digest first.
pub fn image_cmdline_verity(arch: Arch, root: &VerityRoot, app: &VerityRoot) -> String {
    let base = image_cmdline(arch, Volume::Root.device());
    let (head, tail) = base.split_at(
        base.find(" fuse.root=")
            .expect("image_cmdline names the root"),
    );
    let volumes = [(Volume::Root, root), (Volume::App, app)];
    let waitfor: Vec<String> = volumes
        .iter()
        .flat_map(|(_, v)| [&v.data_partuuid, &v.hash_partuuid])
        .map(|u| format!("PARTUUID={u}"))
        .collect();
    let create: Vec<String> = volumes
        .iter()
        .map(|(vol, v)| format!("{},,{},ro,{}", vol.dm_name(), vol.minor(), verity_table(v)))
        .collect();
    format!(
        "{head} dm-mod.waitfor={} dm-mod.create=\"{}\"{tail} fuse.app={}",
        waitfor.join(","),
        create.join(";"),
        Volume::App.device()
    )
}

/// The root's [`VerityRoot`] a command line names in its `dm-mod.create=`: `None` when it has
/// none, an error saying what is wrong when the table is not one fuse writes.
pub fn parse_verity(cmdline: &str) -> Option<Result<VerityRoot, String>> {
    parse_volume(cmdline, Volume::Root)
}

/// The [`VerityRoot`] of `volume` in a command line's `dm-mod.create=`: `None` when the line
/// has no such device, an error saying what is wrong when its table is not one fuse writes.
pub fn parse_volume(cmdline: &str, volume: Volume) -> Option<Result<VerityRoot, String>> {
    let start = cmdline.find("dm-mod.create=\"")? + "dm-mod.create=\"".len();
    let Some(len) = cmdline[start..].find('"') else {
        return Some(Err("its dm-mod.create= has no closing quote".into()));
    };
    let device = cmdline[start..start + len]
        .split(';')
        .find(|d| d.split(',').next() == Some(volume.dm_name()))?;
    let table = device.splitn(5, ',').nth(4).unwrap_or_default();
    let w: Vec<&str> = table.split_whitespace().collect();
    let fixed = [
        (2, "verity"),
        (3, "1"),
        (6, "4096"),
        (7, "4096"),
        (9, "0"),
        (10, "sha256"),
    ];
    if w.len() < 13 || fixed.iter().any(|&(i, want)| w[i] != want) {
        return Some(Err(format!(
            "its dm-mod.create= table is not a fuse verity table: {table:?}"
        )));
    }
    let partuuid = |s: &str| s.strip_prefix("PARTUUID=").map(str::to_string);
    let parsed = (|| {
        let data_blocks: u64 = w[8].parse().ok()?;
        (w[1].parse::<u64>().ok()? == data_blocks * 8).then_some(())?;
        Some(VerityRoot {
            data_partuuid: partuuid(w[4])?,
            hash_partuuid: partuuid(w[5])?,
            data_blocks,
            root_hash: w[11].to_string(),
            salt: w[12].to_string(),
        })
    })();
    Some(
        parsed.ok_or_else(|| {
            format!("its dm-mod.create= table is not a fuse verity table: {table:?}")
        }),
    )
}

/// The kernel command line of an image for `arch` whose root is `root` (`/dev/dm-0` for an
/// image's verity root, see [`image_cmdline_verity`], or `/dev/vda` for a bare squashfs
/// disk). The parameters, in order:
///
/// - `console=<dev>`: kernel messages, the init's and the app's output go to the serial
///   console, which the runner reads ([`console_device`]).
/// - `quiet`: no boot messages on the console, only the app's output (panics still print).
/// - `loglevel=1`: only emergency kernel messages on the console (`--verbose` appends
///   `loglevel=7` at run time).
/// - `panic=-1`: a panic reboots at once, and QEMU (`-no-reboot`) then exits instead of
///   hanging.
/// - `rdinit=/init`: the initramfs' fuse init is PID 1.
/// - `fuse.root=<root>`: where the init finds the root filesystem.
/// - `fuse.rootfstype=squashfs`: what the init mounts it as.
pub fn image_cmdline(arch: Arch, root: &str) -> String {
    let console = console_device(arch);
    format!(
        "console={console} quiet loglevel=1 panic=-1 rdinit=/init fuse.root={root} fuse.rootfstype=squashfs"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The bytes of every image depend on this line: it must not change by accident.
    #[test]
    fn test_image_cmdline_is_stable() {
        assert_eq!(
            image_cmdline(
                Arch::X86_64,
                "PARTUUID=0f3e1d2c-aaaa-8bbb-9ccc-000000000001"
            ),
            "console=ttyS0 quiet loglevel=1 panic=-1 rdinit=/init \
             fuse.root=PARTUUID=0f3e1d2c-aaaa-8bbb-9ccc-000000000001 fuse.rootfstype=squashfs"
        );
        assert_eq!(
            image_cmdline(Arch::Aarch64, "/dev/vda"),
            "console=ttyAMA0 quiet loglevel=1 panic=-1 rdinit=/init fuse.root=/dev/vda \
             fuse.rootfstype=squashfs"
        );
        let v = VerityRoot {
            data_partuuid: "0f3e1d2c-aaaa-8bbb-9ccc-000000000001".into(),
            hash_partuuid: "0f3e1d2c-aaaa-8bbb-9ccc-000000000002".into(),
            data_blocks: 300,
            root_hash: "ab".repeat(32),
            salt: "cd".repeat(32),
        };
        let app = VerityRoot {
            data_partuuid: "0f3e1d2c-aaaa-8bbb-9ccc-000000000003".into(),
            hash_partuuid: "0f3e1d2c-aaaa-8bbb-9ccc-000000000004".into(),
            data_blocks: 2,
            root_hash: "ef".repeat(32),
            salt: "01".repeat(32),
        };
        assert_eq!(
            image_cmdline_verity(Arch::X86_64, &v, &app),
            format!(
                "console=ttyS0 quiet loglevel=1 panic=-1 rdinit=/init \
                 dm-mod.waitfor=PARTUUID=0f3e1d2c-aaaa-8bbb-9ccc-000000000001,\
                 PARTUUID=0f3e1d2c-aaaa-8bbb-9ccc-000000000002,\
                 PARTUUID=0f3e1d2c-aaaa-8bbb-9ccc-000000000003,\
                 PARTUUID=0f3e1d2c-aaaa-8bbb-9ccc-000000000004 \
                 dm-mod.create=\"fuse-root,,0,ro,0 2400 verity 1 \
                 PARTUUID=0f3e1d2c-aaaa-8bbb-9ccc-000000000001 \
                 PARTUUID=0f3e1d2c-aaaa-8bbb-9ccc-000000000002 4096 4096 300 0 sha256 {} {} 1 \
                 panic_on_corruption;fuse-app,,1,ro,0 16 verity 1 \
                 PARTUUID=0f3e1d2c-aaaa-8bbb-9ccc-000000000003 \
                 PARTUUID=0f3e1d2c-aaaa-8bbb-9ccc-000000000004 4096 4096 2 0 sha256 {} {} 1 \
                 panic_on_corruption\" fuse.root=/dev/dm-0 fuse.rootfstype=squashfs \
                 fuse.app=/dev/dm-1",
                "ab".repeat(32),
                "cd".repeat(32),
                "ef".repeat(32),
                "01".repeat(32)
            )
        );
        let line = image_cmdline_verity(Arch::X86_64, &v, &app);
        assert_eq!(parse_verity(&line), Some(Ok(v)));
        assert_eq!(parse_volume(&line, Volume::App), Some(Ok(app)));
        assert_eq!(parse_verity("console=ttyS0 fuse.root=/dev/vda"), None);
        assert!(parse_verity(&line.replace("4096 4096", "4096 512"))
            .unwrap()
            .is_err());
    }
}
