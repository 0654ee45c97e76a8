//! The fuse packaging library: the `fuse` binary is a thin shim over [`main`].
//!
//! Data flows one way, `cli → build → image ← run`, with `host` used by all:
//! - `cli`: parses the command line, dispatches, prints, maps errors to exit codes;
//! - `build`: app → stored image (configuration, detection, runtimes, environments, the disk);
//! - `image`: what an image is and where it lives (manifest, store, names, disk, export);
//! - `run`: boots a stored image through one launch path (`fuse run`, `run -d`, `test`);
//! - `cloud`: a stored image in a cloud (`fuse deploy`: its own AWS client, image → AMI);
//! - `host`: fuse's state on the host (kernel cache, sysroots, paths, locks, digests).

mod build;
mod cli;
mod cloud;
mod host;
mod image;
mod registry;
mod run;

pub use cli::main;

/// What the benchmarks in `benches/` use: an image built and stored, and the host's Debian
/// packages (for the baseline kernels they compare with).
pub mod bench {
    pub use crate::host::paths::cache_dir;
    pub use crate::host::sysroot::{deb_field, debian_arch, download_debs};
    use std::path::{Path, PathBuf};

    /// An image as a benchmark boots it directly: its parts and disk, in a store of its own.
    #[derive(Debug, Clone)]
    pub struct BenchImage {
        /// `name:version`, total size and the parts' sizes, for the benchmark's report.
        pub summary: String,
        pub kernel: PathBuf,
        pub initrd: PathBuf,
        /// The disk: the command line names its root partition by PARTUUID.
        pub disk: PathBuf,
        pub cmdline: String,
    }

    /// UEFI firmware for `arch` (its variables copied into `scratch`), as `fuse run
    /// --firmware uefi` and the cloud machine boot with.
    pub fn uefi_firmware(
        arch: fuse_rootfs::Arch,
        scratch: &Path,
    ) -> anyhow::Result<fuse_boot::vm::Firmware> {
        crate::run::boot::uefi_firmware(arch, scratch)
    }

    /// Builds the app at `app` for `arch` into the store at `store_dir`.
    pub fn build_image(
        store_dir: &Path,
        app: &Path,
        arch: fuse_rootfs::Arch,
    ) -> anyhow::Result<BenchImage> {
        use crate::host::fs::human_size;
        let store = crate::image::store::Store::open(store_dir.to_path_buf())?;
        let request = crate::build::BuildRequest {
            input: app.to_path_buf(),
            arch: Some(arch),
            ..Default::default()
        };
        let image = crate::build::build(&store, &request, &mut |l| eprintln!("fuse: {l}"))?;
        let m = &image.manifest;
        Ok(BenchImage {
            summary: format!(
                "{}: {} (kernel {}, init {}, rootfs {}, appfs {})",
                image.name,
                human_size(m.total_size()),
                human_size(m.kernel.size),
                human_size(m.init.size),
                human_size(m.rootfs.size),
                human_size(m.appfs.size)
            ),
            kernel: store.blob_path(&m.kernel.digest),
            initrd: store.blob_path(&m.init.digest),
            disk: crate::image::disk::disk_path(&store, &image)?,
            cmdline: m.cmdline.clone(),
        })
    }
}
