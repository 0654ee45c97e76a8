//! The init (PID 1) binaries, built from `boot/init/*.c` by `build.rs` and embedded in fuse.

use fuse_rootfs::Arch;
use sha2::{Digest, Sha256};

static X86_64: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/fuse-init-x86_64"));
static AARCH64: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/fuse-init-aarch64"));

/// The static init executable for `arch`, or `None` when fuse was built without a C compiler
/// for that architecture (`build.rs` then embeds an empty file).
pub fn init_binary(arch: Arch) -> Option<&'static [u8]> {
    let bytes = match arch {
        Arch::X86_64 => X86_64,
        Arch::Aarch64 => AARCH64,
    };
    (!bytes.is_empty()).then_some(bytes)
}

/// `sha256:<hex>` of the init for `arch`, for manifests and reproducibility checks.
pub fn init_digest(arch: Arch) -> Option<String> {
    init_binary(arch).map(|b| format!("sha256:{}", hex::encode(Sha256::digest(b))))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// ELF header fields at fixed offsets (64-bit little endian).
    fn elf_machine(bytes: &[u8]) -> u16 {
        u16::from_le_bytes([bytes[18], bytes[19]])
    }

    #[test]
    fn host_init_is_a_static_elf_of_the_right_arch() {
        let arch = Arch::host();
        let bin = init_binary(arch).expect("the host's init is always built");
        assert_eq!(&bin[..4], b"\x7fELF");
        assert_eq!(bin[4], 2, "64-bit");
        assert_eq!(elf_machine(bin), arch.elf_machine());
        // ET_EXEC: static, not PIE; a dynamic init could not run from the initramfs.
        assert_eq!(u16::from_le_bytes([bin[16], bin[17]]), 2);
        // No PT_INTERP program header: nothing to load it with.
        let phoff = u64::from_le_bytes(bin[32..40].try_into().unwrap()) as usize;
        let phentsize = u16::from_le_bytes([bin[54], bin[55]]) as usize;
        let phnum = u16::from_le_bytes([bin[56], bin[57]]) as usize;
        for i in 0..phnum {
            let ph = &bin[phoff + i * phentsize..];
            let p_type = u32::from_le_bytes(ph[..4].try_into().unwrap());
            assert_ne!(p_type, 3, "PT_INTERP in the init");
        }
    }

    /// ci/setup installs gcc-aarch64-linux-gnu and libc6-dev-arm64-cross: with them, fuse
    /// embeds an arm64 init (installed after fuse was built: `cargo clean -p fuse-boot`).
    #[test]
    fn aarch64_init_is_embedded_when_the_cross_compiler_is_installed() {
        let cross_gcc = std::env::var_os("PATH").is_some_and(|path| {
            std::env::split_paths(&path).any(|d| d.join("aarch64-linux-gnu-gcc").is_file())
        });
        if cross_gcc || Arch::host() == Arch::Aarch64 {
            let bin = init_binary(Arch::Aarch64).expect("no aarch64 init embedded");
            assert_eq!(elf_machine(bin), Arch::Aarch64.elf_machine());
        }
    }

    #[test]
    fn every_embedded_init_matches_its_arch() {
        for arch in Arch::ALL {
            if let Some(bin) = init_binary(arch) {
                assert_eq!(elf_machine(bin), arch.elf_machine(), "{arch}");
                assert!(init_digest(arch).unwrap().starts_with("sha256:"));
            } else {
                assert!(init_digest(arch).is_none());
            }
        }
    }
}
