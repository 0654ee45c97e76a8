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

/// The dm device the kernel creates for a [`VerityRoot`] (minor 0 in `dm-mod.create=`).
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

/// The command line of an image whose root is checked by dm-verity: [`image_cmdline`] with
/// `dm-mod.create="fuse-root,,0,ro,<table>"` before it, so the kernel itself (CONFIG_DM_INIT)
/// creates [`VERITY_DEVICE`] after probing the disks and before the init runs, and
/// `fuse.root=` names that device. The root hash is in this line, so whatever covers the
/// line (the UKI's digest, a signature of the UKI) covers every byte of the root.
///
/// `dm-mod.waitfor=` names both partitions: the kernel creates the device at `late_initcall`,
/// and an NVMe disk (a cloud's root disk) is probed asynchronously, so without it the
/// partitions may not exist yet and the root is never created. The kernel polls until both
/// are there (at once for virtio-blk, which probes synchronously: a direct hello boot measured
/// no slower, 1.65-1.87 s against 1.83-2.05 s before). A disk without those partitions then
/// makes the kernel wait forever rather than fail; `fuse run` checks the disk's digest first.
pub fn image_cmdline_verity(arch: Arch, v: &VerityRoot) -> String {
    let base = image_cmdline(arch, VERITY_DEVICE);
    let (head, tail) = base.split_at(
        base.find(" fuse.root=")
            .expect("image_cmdline names the root"),
    );
    format!(
        "{head} dm-mod.waitfor=PARTUUID={},PARTUUID={} dm-mod.create=\"fuse-root,,0,ro,{}\"{tail}",
        v.data_partuuid,
        v.hash_partuuid,
        verity_table(v)
    )
}

/// The [`VerityRoot`] a command line names in its `dm-mod.create=`: `None` when it has none,
/// an error saying what is wrong when the table is not one fuse writes.
pub fn parse_verity(cmdline: &str) -> Option<Result<VerityRoot, String>> {
    let start = cmdline.find("dm-mod.create=\"")? + "dm-mod.create=\"".len();
    let Some(len) = cmdline[start..].find('"') else {
        return Some(Err("its dm-mod.create= has no closing quote".into()));
    };
    let value = &cmdline[start..start + len];
    let table = value.splitn(5, ',').nth(4).unwrap_or_default();
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
        assert_eq!(
            image_cmdline_verity(Arch::X86_64, &v),
            format!(
                "console=ttyS0 quiet loglevel=1 panic=-1 rdinit=/init \
                 dm-mod.waitfor=PARTUUID=0f3e1d2c-aaaa-8bbb-9ccc-000000000001,\
                 PARTUUID=0f3e1d2c-aaaa-8bbb-9ccc-000000000002 dm-mod.create=\"fuse-root,,0,ro,0 2400 verity 1 \
                 PARTUUID=0f3e1d2c-aaaa-8bbb-9ccc-000000000001 \
                 PARTUUID=0f3e1d2c-aaaa-8bbb-9ccc-000000000002 4096 4096 300 0 sha256 {} {} 1 \
                 panic_on_corruption\" fuse.root=/dev/dm-0 fuse.rootfstype=squashfs",
                "ab".repeat(32),
                "cd".repeat(32)
            )
        );
        let line = image_cmdline_verity(Arch::X86_64, &v);
        assert_eq!(parse_verity(&line), Some(Ok(v)));
        assert_eq!(parse_verity("console=ttyS0 fuse.root=/dev/vda"), None);
        assert!(parse_verity(&line.replace("4096 4096", "4096 512"))
            .unwrap()
            .is_err());
    }
}
