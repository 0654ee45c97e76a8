//! Unified kernel images: systemd's EFI stub with the kernel, initramfs, command line, os-release
//! and the fuse manifest appended as PE sections, the way `ukify` lays them out: each new
//! section after the stub's last one, its virtual address aligned to the section alignment
//! (at least a page), its file offset to the file alignment, the section headers written into
//! the room the stub leaves after its section table, then `SizeOfImage`, `SizeOfInitializedData`
//! and the PE checksum updated.
//!
//! Own code rather than the `object` crate's writer: `object` writes whole new PE files from
//! scratch, while appending to an existing image only touches six header fields; the tests
//! parse the result back with `object`, an independent reader.

/// What the stub needs to boot, and fuse's own section.
pub const OSREL: &str = ".osrel";
pub const CMDLINE: &str = ".cmdline";
pub const LINUX: &str = ".linux";
pub const INITRD: &str = ".initrd";
/// The image manifest (JSON), so a disk describes itself.
pub const FUSE: &str = ".fuse";

/// Section flags of the appended sections: initialised, read-only data.
const SCN_INITIALIZED_READ: u32 = 0x0000_0040 | 0x4000_0000;
const SECTION_HEADER: usize = 40;
const PAGE: u32 = 4096;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum UkiError {
    #[error("Not a PE image: {0}")]
    NotPe(String),
    #[error("The EFI stub has room for {room} more section headers, {needed} are needed: use systemd's linux*.efi.stub")]
    NoHeaderRoom { room: usize, needed: usize },
    #[error("The EFI stub is signed (it has a certificate table): use the unsigned stub, the UKI is signed as a whole")]
    Signed,
    #[error("Section name '{0}' is longer than the 8 bytes PE allows")]
    NameTooLong(String),
    #[error("The UKI is too large for a PE image ({0} bytes)")]
    TooLarge(u64),
}

/// A section of a PE image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Section {
    pub name: String,
    pub virtual_address: u32,
    pub virtual_size: u32,
    pub raw_offset: u32,
    pub raw_size: u32,
}

impl Section {
    /// The section's bytes in the file: the virtual size (what the stub reads), capped by what
    /// the file holds.
    pub fn data<'a>(&self, image: &'a [u8]) -> &'a [u8] {
        let start = self.raw_offset as usize;
        let len = self.virtual_size.min(self.raw_size) as usize;
        image.get(start..start + len).unwrap_or(&[])
    }
}

/// The header fields the appender needs.
#[derive(Debug)]
struct Headers {
    /// Offset of the COFF header (after "PE\0\0").
    coff: usize,
    /// Offset of the optional header.
    opt: usize,
    section_table: usize,
    sections: Vec<Section>,
    section_alignment: u32,
    file_alignment: u32,
    size_of_headers: u32,
}

fn u16_at(b: &[u8], at: usize) -> Result<u16, UkiError> {
    b.get(at..at + 2)
        .map(|s| u16::from_le_bytes([s[0], s[1]]))
        .ok_or_else(|| UkiError::NotPe(format!("truncated at byte {at}")))
}

fn u32_at(b: &[u8], at: usize) -> Result<u32, UkiError> {
    b.get(at..at + 4)
        .map(|s| u32::from_le_bytes(s.try_into().expect("4 bytes")))
        .ok_or_else(|| UkiError::NotPe(format!("truncated at byte {at}")))
}

fn put_u32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_le_bytes());
}

fn align_up(v: u64, a: u64) -> u64 {
    v.div_ceil(a) * a
}

fn headers(image: &[u8]) -> Result<Headers, UkiError> {
    if image.get(0..2) != Some(b"MZ") {
        return Err(UkiError::NotPe("no MZ signature at byte 0".into()));
    }
    let pe = u32_at(image, 0x3c)? as usize;
    if image.get(pe..pe + 4) != Some(b"PE\0\0") {
        return Err(UkiError::NotPe(format!("no PE signature at byte {pe}")));
    }
    let coff = pe + 4;
    let count = u16_at(image, coff + 2)? as usize;
    let opt_size = u16_at(image, coff + 16)? as usize;
    let opt = coff + 20;
    let magic = u16_at(image, opt)?;
    if magic != 0x20b && magic != 0x10b {
        return Err(UkiError::NotPe(format!(
            "optional header magic {magic:#x} at byte {opt}"
        )));
    }
    let section_table = opt + opt_size;
    let mut sections = Vec::with_capacity(count);
    for i in 0..count {
        let h = section_table + i * SECTION_HEADER;
        let raw = image
            .get(h..h + 8)
            .ok_or_else(|| UkiError::NotPe(format!("section table truncated at byte {h}")))?;
        let name = String::from_utf8_lossy(raw)
            .trim_end_matches('\0')
            .to_string();
        sections.push(Section {
            name,
            virtual_size: u32_at(image, h + 8)?,
            virtual_address: u32_at(image, h + 12)?,
            raw_size: u32_at(image, h + 16)?,
            raw_offset: u32_at(image, h + 20)?,
        });
    }
    Ok(Headers {
        coff,
        opt,
        section_table,
        sections,
        section_alignment: u32_at(image, opt + 32)?.max(1),
        file_alignment: u32_at(image, opt + 36)?.max(1),
        size_of_headers: u32_at(image, opt + 60)?,
    })
}

/// The sections of a PE image.
pub fn sections(image: &[u8]) -> Result<Vec<Section>, UkiError> {
    Ok(headers(image)?.sections)
}

/// The PE checksum (as `imagehlp!CheckSumMappedFile`): the 16-bit one's-complement style sum
/// of the file with the checksum field taken as zero, plus the file length.
pub fn pe_checksum(image: &[u8], checksum_offset: usize) -> u32 {
    let mut sum: u64 = 0;
    for (i, chunk) in image.chunks(2).enumerate() {
        let at = i * 2;
        if at == checksum_offset || at == checksum_offset + 2 {
            continue;
        }
        let word = u16::from_le_bytes([chunk[0], *chunk.get(1).unwrap_or(&0)]);
        sum += u64::from(word);
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum = (sum & 0xffff) + (sum >> 16);
    (sum as u32).wrapping_add(image.len() as u32)
}

/// Where the checksum field is.
pub fn checksum_offset(image: &[u8]) -> Result<usize, UkiError> {
    Ok(headers(image)?.opt + 64)
}

/// `stub` with `sections` (name, bytes) appended, in order.
pub fn append_sections(stub: &[u8], new: &[(&str, &[u8])]) -> Result<Vec<u8>, UkiError> {
    let h = headers(stub)?;
    for (name, _) in new {
        if name.len() > 8 {
            return Err(UkiError::NameTooLong(name.to_string()));
        }
    }
    // Data directory 4 (the certificate table) of PE32+ / PE32.
    let magic = u16_at(stub, h.opt)?;
    let security = h.opt
        + if magic == 0x20b {
            112 + 4 * 8
        } else {
            96 + 4 * 8
        };
    if u32_at(stub, security + 4).unwrap_or(0) != 0 {
        return Err(UkiError::Signed);
    }
    // Room for the new headers: up to SizeOfHeaders and the first section's data, all zero.
    let table_end = h.section_table + h.sections.len() * SECTION_HEADER;
    let limit = h
        .sections
        .iter()
        .filter(|s| s.raw_size > 0)
        .map(|s| s.raw_offset as usize)
        .chain([h.size_of_headers as usize])
        .min()
        .unwrap_or(h.size_of_headers as usize);
    // Free means zero, or the NOP words (`1f 20 03 d5`) arm64 gnu-efi stubs pad their header
    // page with (systemd's linuxaa64.efi.stub: never executed, .text starts at 0x1000).
    let is_free = |w: &[u8]| w.iter().all(|&b| b == 0) || w == [0x1f, 0x20, 0x03, 0xd5];
    let zero_until = stub[table_end..limit.min(stub.len())]
        .chunks(4)
        .position(|w| !is_free(w))
        .map_or(limit, |p| table_end + 4 * p);
    let room = zero_until.saturating_sub(table_end) / SECTION_HEADER;
    if room < new.len() {
        return Err(UkiError::NoHeaderRoom {
            room,
            needed: new.len(),
        });
    }

    let file_align = u64::from(h.file_alignment);
    let va_align = u64::from(h.section_alignment.max(PAGE));
    let image_end = h
        .sections
        .iter()
        .map(|s| u64::from(s.virtual_address) + u64::from(s.virtual_size.max(s.raw_size)))
        .chain([u64::from(u32_at(stub, h.opt + 56)?)])
        .max()
        .unwrap_or(0);
    let mut va = align_up(image_end, va_align);
    // After everything the stub's file holds (its symbol table too), so nothing moves.
    let mut out = stub.to_vec();
    out.resize(align_up(stub.len() as u64, file_align) as usize, 0);
    let mut initialized = u64::from(u32_at(stub, h.opt + 8)?);
    for (i, (name, data)) in new.iter().enumerate() {
        let raw_offset = out.len() as u64;
        let raw_size = align_up(data.len() as u64, file_align);
        let too_large = |v: u64| -> Result<u32, UkiError> {
            u32::try_from(v).map_err(|_| UkiError::TooLarge(v))
        };
        let hdr = table_end + i * SECTION_HEADER;
        let mut name_bytes = [0u8; 8];
        name_bytes[..name.len()].copy_from_slice(name.as_bytes());
        out[hdr..hdr + 8].copy_from_slice(&name_bytes);
        put_u32(&mut out, hdr + 8, too_large(data.len() as u64)?);
        put_u32(&mut out, hdr + 12, too_large(va)?);
        put_u32(&mut out, hdr + 16, too_large(raw_size)?);
        put_u32(&mut out, hdr + 20, too_large(raw_offset)?);
        // Relocations, line numbers: none.
        out[hdr + 24..hdr + 36].fill(0);
        put_u32(&mut out, hdr + 36, SCN_INITIALIZED_READ);
        out.extend_from_slice(data);
        out.resize((raw_offset + raw_size) as usize, 0);
        initialized += raw_size;
        va = align_up(va + data.len() as u64, va_align);
    }
    let count = h.sections.len() + new.len();
    out[h.coff + 2..h.coff + 4].copy_from_slice(&(count as u16).to_le_bytes());
    let last_end = va; // already aligned
    let size_of_image = align_up(last_end, u64::from(h.section_alignment));
    put_u32(
        &mut out,
        h.opt + 56,
        u32::try_from(size_of_image).map_err(|_| UkiError::TooLarge(size_of_image))?,
    );
    put_u32(
        &mut out,
        h.opt + 8,
        u32::try_from(initialized).map_err(|_| UkiError::TooLarge(initialized))?,
    );
    let sum = pe_checksum(&out, h.opt + 64);
    put_u32(&mut out, h.opt + 64, sum);
    Ok(out)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use object::read::pe::PeFile64;
    use object::{Object, ObjectSection};

    /// A minimal PE32+ EFI application: headers in 0x400 bytes, one `.text` section.
    pub fn tiny_stub() -> Vec<u8> {
        let mut b = vec![0u8; 0x600];
        b[0..2].copy_from_slice(b"MZ");
        put_u32(&mut b, 0x3c, 0x80);
        b[0x80..0x84].copy_from_slice(b"PE\0\0");
        let coff = 0x84;
        b[coff..coff + 2].copy_from_slice(&0x8664u16.to_le_bytes());
        b[coff + 2..coff + 4].copy_from_slice(&1u16.to_le_bytes());
        b[coff + 16..coff + 18].copy_from_slice(&240u16.to_le_bytes());
        b[coff + 18..coff + 20].copy_from_slice(&0x0206u16.to_le_bytes());
        let opt = coff + 20;
        b[opt..opt + 2].copy_from_slice(&0x20bu16.to_le_bytes());
        put_u32(&mut b, opt + 4, 0x200); // SizeOfCode
        put_u32(&mut b, opt + 16, 0x1000); // entry
        put_u32(&mut b, opt + 32, 0x1000); // SectionAlignment
        put_u32(&mut b, opt + 36, 0x200); // FileAlignment
        put_u32(&mut b, opt + 56, 0x2000); // SizeOfImage
        put_u32(&mut b, opt + 60, 0x400); // SizeOfHeaders
        b[opt + 68..opt + 70].copy_from_slice(&10u16.to_le_bytes()); // EFI application
        put_u32(&mut b, opt + 108, 16); // NumberOfRvaAndSizes
        let s = opt + 240;
        b[s..s + 5].copy_from_slice(b".text");
        put_u32(&mut b, s + 8, 0x10);
        put_u32(&mut b, s + 12, 0x1000);
        put_u32(&mut b, s + 16, 0x200);
        put_u32(&mut b, s + 20, 0x400);
        put_u32(&mut b, s + 36, 0x6000_0020);
        b[0x400..0x410].copy_from_slice(&[0xc3; 16]);
        b
    }

    #[test]
    fn test_appended_sections_parse_back_with_object() {
        let stub = tiny_stub();
        let linux = vec![0xabu8; 5000];
        let uki = append_sections(
            &stub,
            &[
                (OSREL, b"ID=fuse\n"),
                (CMDLINE, b"console=ttyS0"),
                (LINUX, &linux),
            ],
        )
        .unwrap();
        let pe = PeFile64::parse(&*uki).expect("object parses the UKI");
        let names: Vec<String> = pe
            .sections()
            .map(|s| s.name().unwrap().to_string())
            .collect();
        assert_eq!(names, [".text", ".osrel", ".cmdline", ".linux"]);
        let linux_section = pe.section_by_name(".linux").unwrap();
        assert_eq!(linux_section.data().unwrap()[..5000], linux[..]);
        assert_eq!(
            &pe.section_by_name(".cmdline").unwrap().data().unwrap()[..13],
            b"console=ttyS0"
        );
        // Virtual addresses: page-aligned, increasing, not overlapping, inside SizeOfImage.
        let ours = sections(&uki).unwrap();
        let mut end = 0x2000;
        for s in &ours[1..] {
            assert_eq!(s.virtual_address % 4096, 0);
            assert!(s.virtual_address >= end, "{s:?}");
            assert_eq!(s.raw_offset % 0x200, 0);
            end = s.virtual_address + s.virtual_size;
        }
        let opt = 0x84 + 20;
        assert!(u32_at(&uki, opt + 56).unwrap() >= end);
        assert_eq!(ours[3].data(&uki), &linux[..]);
        assert_eq!(ours[2].virtual_size, 13, "exact size, what the stub reads");
        // The checksum field holds the checksum of the result.
        assert_eq!(u32_at(&uki, opt + 64).unwrap(), pe_checksum(&uki, opt + 64));
        // The stub's own bytes are untouched apart from the header.
        assert_eq!(uki[0x400..0x600], stub[0x400..0x600]);
    }

    #[test]
    fn test_append_is_deterministic_and_refuses_what_it_cannot_do() {
        let stub = tiny_stub();
        let a = append_sections(&stub, &[(FUSE, b"{}")]).unwrap();
        assert_eq!(a, append_sections(&stub, &[(FUSE, b"{}")]).unwrap());
        assert_eq!(
            append_sections(&stub, &[(".toolongname", b"")]),
            Err(UkiError::NameTooLong(".toolongname".into()))
        );
        let many: Vec<(&str, &[u8])> = (0..20).map(|_| (".x", &b""[..])).collect();
        assert!(matches!(
            append_sections(&stub, &many),
            Err(UkiError::NoHeaderRoom { needed: 20, .. })
        ));
        assert!(matches!(
            append_sections(b"not a pe", &[]),
            Err(UkiError::NotPe(_))
        ));
    }

    #[test]
    fn test_checksum_matches_the_linkers_on_systemds_stub() {
        // The stub's linker computed its CheckSum; ours must agree on the unmodified file.
        let Ok(stub) = std::fs::read(super::super::stub_path(fuse_rootfs::Arch::X86_64)) else {
            eprintln!("systemd-boot-efi is not installed (ci/setup installs it): skipped");
            return;
        };
        let at = checksum_offset(&stub).unwrap();
        let stored = u32_at(&stub, at).unwrap();
        assert_ne!(stored, 0);
        assert_eq!(pe_checksum(&stub, at), stored);
        let uki = append_sections(
            &stub,
            &[
                (OSREL, b"ID=fuse\n"),
                (CMDLINE, b"x"),
                (LINUX, b"k"),
                (INITRD, b"i"),
                (FUSE, b"{}"),
            ],
        )
        .unwrap();
        let pe = PeFile64::parse(&*uki).unwrap();
        assert_eq!(pe.sections().count(), 8 + 5);
        // The arm64 stub (NOP-padded header area) takes the same sections.
        if let Ok(stub) = std::fs::read(super::super::stub_path(fuse_rootfs::Arch::Aarch64)) {
            let uki = append_sections(&stub, &[(LINUX, b"k"), (FUSE, b"{}")]).unwrap();
            let pe = PeFile64::parse(&*uki).unwrap();
            let names: Vec<_> = pe
                .sections()
                .map(|s| s.name().unwrap().to_string())
                .collect();
            assert_eq!(names, [".text", ".data", ".linux", ".fuse"]);
            assert_eq!(uki[0x1000..stub.len()], stub[0x1000..], "code untouched");
        }
        assert_eq!(
            pe.section_by_name(".fuse").unwrap().data().unwrap()[..2],
            *b"{}"
        );
    }
}
