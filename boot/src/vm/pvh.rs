//! PVH direct boot on x86_64: QEMU starts an uncompressed `vmlinux` at its PVH entry point
//! (the ELF note `XEN_ELFNOTE_PHYS32_ENTRY`, `CONFIG_PVH=y`) in 32-bit protected mode, with
//! no real-mode setup code and no decompressor. The image holds a bzImage (the UKI's `.linux`,
//! which UEFI needs); its zstd payload is the very `vmlinux`, so the runner takes it out for
//! every boot (natively, tens of milliseconds), where the guest would decompress it under
//! emulation. Nothing is cached: the `vmlinux` comes from the kernel just checked against the
//! manifest, so it cannot be stale or damaged.

/// Largest `vmlinux` accepted: far above any kernel fuse builds (~14 MB).
const MAX_VMLINUX: u64 = 256 << 20;
/// `XEN_ELFNOTE_PHYS32_ENTRY` (include/xen/interface/elfnote.h).
const PHYS32_ENTRY: u32 = 18;
const ZSTD_MAGIC: [u8; 4] = [0x28, 0xb5, 0x2f, 0xfd];

fn u16_at(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_le_bytes(b.get(at..at + 2)?.try_into().ok()?))
}

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

fn u64_at(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_le_bytes(b.get(at..at + 8)?.try_into().ok()?))
}

/// The zstd payload of a bzImage (boot protocol ≥ 2.08: `payload_offset` and `payload_length`
/// in the setup header, counted from the protected-mode code after the setup sectors).
fn payload(bzimage: &[u8]) -> Option<&[u8]> {
    if bzimage.get(0x202..0x206)? != b"HdrS" || u16_at(bzimage, 0x206)? < 0x208 {
        return None;
    }
    let setup_sects = match *bzimage.get(0x1f1)? {
        0 => 4,
        n => n as usize,
    };
    let start = (setup_sects + 1) * 512 + u32_at(bzimage, 0x248)? as usize;
    let payload = bzimage.get(start..start + u32_at(bzimage, 0x24c)? as usize)?;
    payload.starts_with(&ZSTD_MAGIC).then_some(payload)
}

/// Whether `elf` is an x86_64 ELF with a PVH entry note.
fn has_pvh_entry(elf: &[u8]) -> bool {
    let check = || -> Option<bool> {
        // ELF64, little-endian, x86_64.
        if elf.get(..6)? != b"\x7fELF\x02\x01" || u16_at(elf, 0x12)? != 62 {
            return Some(false);
        }
        let (phoff, phentsize, phnum) = (
            u64_at(elf, 0x20)? as usize,
            u16_at(elf, 0x36)? as usize,
            u16_at(elf, 0x38)? as usize,
        );
        for i in 0..phnum {
            let ph = phoff + i * phentsize;
            if u32_at(elf, ph)? != 4 {
                continue; // not PT_NOTE
            }
            let (off, size) = (
                u64_at(elf, ph + 8)? as usize,
                u64_at(elf, ph + 0x20)? as usize,
            );
            let notes = elf.get(off..off + size)?;
            let mut at = 0;
            while at + 12 <= notes.len() {
                let (namesz, descsz, kind) = (
                    u32_at(notes, at)? as usize,
                    u32_at(notes, at + 4)? as usize,
                    u32_at(notes, at + 8)?,
                );
                let name = notes.get(at + 12..at + 12 + namesz)?;
                if name == b"Xen\0" && kind == PHYS32_ENTRY {
                    return Some(true);
                }
                at += 12 + namesz.next_multiple_of(4) + descsz.next_multiple_of(4);
            }
        }
        Some(false)
    };
    check().unwrap_or(false)
}

/// The `vmlinux` inside `bzimage`, when it is a zstd-compressed kernel with a PVH entry point;
/// `None` otherwise (the bzImage then boots as before).
pub(crate) fn vmlinux(bzimage: &[u8]) -> Option<Vec<u8>> {
    use std::io::Read;
    let payload = payload(bzimage)?;
    // The build appends the uncompressed size after the frame: read one frame only.
    let decoder = zstd::stream::read::Decoder::with_buffer(payload)
        .ok()?
        .single_frame();
    let mut elf = Vec::new();
    decoder.take(MAX_VMLINUX).read_to_end(&mut elf).ok()?;
    has_pvh_entry(&elf).then_some(elf)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An ELF64 x86_64 file with one PT_NOTE segment holding `notes`.
    fn elf_with_notes(notes: &[u8]) -> Vec<u8> {
        let mut elf = vec![0u8; 0x40 + 0x38];
        elf[..6].copy_from_slice(b"\x7fELF\x02\x01");
        elf[0x12..0x14].copy_from_slice(&62u16.to_le_bytes());
        elf[0x20..0x28].copy_from_slice(&0x40u64.to_le_bytes());
        elf[0x36..0x38].copy_from_slice(&0x38u16.to_le_bytes());
        elf[0x38..0x3a].copy_from_slice(&1u16.to_le_bytes());
        let off = elf.len() as u64;
        elf[0x40..0x44].copy_from_slice(&4u32.to_le_bytes());
        elf[0x48..0x50].copy_from_slice(&off.to_le_bytes());
        elf[0x60..0x68].copy_from_slice(&(notes.len() as u64).to_le_bytes());
        elf.extend_from_slice(notes);
        elf
    }

    fn note(name: &[u8], kind: u32, desc: &[u8]) -> Vec<u8> {
        let mut n = Vec::new();
        n.extend_from_slice(&(name.len() as u32).to_le_bytes());
        n.extend_from_slice(&(desc.len() as u32).to_le_bytes());
        n.extend_from_slice(&kind.to_le_bytes());
        n.extend_from_slice(name);
        n.resize(n.len().next_multiple_of(4), 0);
        n.extend_from_slice(desc);
        n.resize(n.len().next_multiple_of(4), 0);
        n
    }

    /// A bzImage-shaped file whose payload is `elf`, zstd-compressed, with the size trailer.
    fn bzimage(elf: &[u8]) -> Vec<u8> {
        let mut z = zstd::encode_all(elf, 3).unwrap();
        z.extend_from_slice(&(elf.len() as u32).to_le_bytes());
        let mut b = vec![0u8; 5 * 512 + 16];
        b[0x1f1] = 4;
        b[0x202..0x206].copy_from_slice(b"HdrS");
        b[0x206..0x208].copy_from_slice(&0x20fu16.to_le_bytes());
        b[0x248..0x24c].copy_from_slice(&16u32.to_le_bytes());
        b[0x24c..0x250].copy_from_slice(&(z.len() as u32).to_le_bytes());
        b.extend_from_slice(&z);
        b
    }

    #[test]
    fn test_the_vmlinux_of_a_pvh_kernel_is_taken_out() {
        let notes = [
            note(b"GNU\0", 3, b"id"),
            note(b"Xen\0", PHYS32_ENTRY, &[0; 4]),
        ]
        .concat();
        let elf = elf_with_notes(&notes);
        assert_eq!(vmlinux(&bzimage(&elf)), Some(elf));
    }

    #[test]
    fn test_without_a_pvh_note_the_bzimage_boots() {
        let elf = elf_with_notes(&note(b"Xen\0", 17, &[0; 4]));
        assert_eq!(vmlinux(&bzimage(&elf)), None);
        let mut not_zstd = bzimage(&elf);
        not_zstd[5 * 512 + 16] ^= 0xff;
        assert_eq!(vmlinux(&not_zstd), None);
        assert_eq!(vmlinux(b"MZ not a kernel"), None);
    }
}
