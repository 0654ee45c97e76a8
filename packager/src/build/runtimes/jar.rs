//! Reading executable jars: the manifest's `Main-Class`, nested jars (fat jars such as Spring
//! Boot's `BOOT-INF/lib/*.jar`), and the JDK classes the bytecode refers to.
//!
//! Every entry name is checked before anything else is done with the archive: an entry that
//! would escape its directory when extracted (`../x`, `/etc/x`) makes the whole jar refused, even
//! though fuse itself extracts only nested jars under names of its own. Such an archive is either
//! broken or hostile, and the JVM or a later tool may extract it.
//!
//! What is read out of a jar is bounded (a zip bomb: a small jar that inflates to gigabytes).
//! The entries fuse reads (manifest, classes, nested jars and their classes) may together hold
//! at most [`MAX_RATIO`] times the jar's size (at least [`MIN_BUDGET`], at most
//! [`MAX_BUDGET`]); the sizes the archive declares are checked against that budget before an
//! entry is read, and each entry must then hold exactly the size it declared. Each entry of a
//! nested jar costs [`ENTRY_COST`] more (the zip reader's index of it), counted before the
//! nested jar is opened. Nested jars are streamed to scratch files, never held in memory; a
//! class file or manifest is read into memory only below [`MAX_IN_MEMORY`].
//!
//! Native libraries bundled in the jar or its nested jars (`lib*.so` entries: sqlite-jdbc,
//! netty, JNA...) count against the same budget: for each, the ELF header is read first, and
//! only those for the image's machine (64-bit) are streamed to scratch files, for
//! [`super::jarnative`] to place in the image.

use std::collections::BTreeSet;
use std::io::{self, Read, Seek, Write};
use std::path::{Path, PathBuf};

use fuse_rootfs::Arch;
use sha2::{Digest, Sha256};
use zip::result::ZipError;
use zip::ZipArchive;

/// Where the manifest lives in a jar.
const MANIFEST: &str = "META-INF/MANIFEST.MF";

/// Package prefixes (internal form) of the classes a JDK provides. A reference to any class
/// under them may need a module beyond `java.base`; everything else is the app's own or a
/// library's. Covers every package the JDK 17 modules export plus the internal ones apps reach
/// for (`sun/misc`, `com/sun/...`).
const JDK_PREFIXES: &[&str] = &[
    "java/",
    "javax/",
    "jdk/",
    "sun/",
    "com/sun/",
    "org/w3c/",
    "org/xml/",
    "org/ietf/",
    "netscape/",
];

/// The bytes read out of a jar may be this many times its size: classes deflate 2-4 times and
/// fat jars store their nested jars, so a real jar stays far below.
pub(crate) const MAX_RATIO: u64 = 32;
/// ... but a small jar may always have this much read.
pub(crate) const MIN_BUDGET: u64 = 64 << 20;
/// ... and no jar more than this.
pub(crate) const MAX_BUDGET: u64 = 4 << 30;
/// The largest class file or manifest read into memory (real ones are kilobytes).
pub(crate) const MAX_IN_MEMORY: u64 = 64 << 20;

/// How many bytes may be read out of a jar of `size` bytes.
pub(crate) fn budget_for(size: u64) -> u64 {
    size.saturating_mul(MAX_RATIO).clamp(MIN_BUDGET, MAX_BUDGET)
}

/// Errors reading a jar. Each is one line: what, where, how to fix.
#[derive(Debug, thiserror::Error)]
pub(crate) enum JarError {
    #[error("Cannot read {}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{} is not a valid jar (the archive is corrupt): rebuild it", path.display())]
    Corrupt {
        path: PathBuf,
        #[source]
        source: ZipError,
    },
    #[error("{} has an entry that escapes its directory ('{entry}'): refusing it, rebuild the jar from trusted sources", path.display())]
    UnsafeEntry { path: PathBuf, entry: String },
    #[error("{} looks like a zip bomb: reading its entry {entry} would pass {} MiB, {why}; rebuild the jar from trusted sources", path.display(), limit >> 20)]
    TooLarge {
        path: PathBuf,
        entry: String,
        limit: u64,
        why: &'static str,
    },
    #[error("{} is not a valid jar: its entry {entry} does not hold the {declared} bytes it declares; rebuild the jar", path.display())]
    SizeMismatch {
        path: PathBuf,
        entry: String,
        declared: u64,
    },
    #[error("Cannot extract {entry} of {} to a scratch file", path.display())]
    Scratch {
        path: PathBuf,
        entry: String,
        #[source]
        source: io::Error,
    },
    #[error("{} has no Main-Class in {MANIFEST}: build an executable jar (jar --main-class, or your build tool's manifest setting), or name the class with `[jvm] main_class` in fuse.toml", path.display())]
    NoMainClass { path: PathBuf },
    #[error("{} has no class {class} (no {entry}): check `[jvm] main_class` in fuse.toml", path.display())]
    NoSuchClass {
        path: PathBuf,
        class: String,
        entry: String,
    },
}

pub(crate) type Result<T> = std::result::Result<T, JarError>;

/// What fuse needs to know about an executable jar.
#[derive(Debug)]
pub(crate) struct JarInfo {
    pub(crate) main_class: String,
    /// Spring Boot (reflection-heavy: jdeps cannot see all it loads).
    pub(crate) spring_boot: bool,
    /// Nested jars, in entry order, extracted to scratch files (named by fuse, not the jar).
    pub(crate) nested: Vec<PathBuf>,
    /// Holds the nested jars' files while the info lives.
    pub(crate) scratch: Option<tempfile::TempDir>,
    /// The JDK classes (internal names, e.g. `java/net/http/HttpClient`) referred to by the
    /// bytecode of the jar and its nested jars: what the module set depends on.
    pub(crate) jdk_refs: BTreeSet<String>,
    /// The native libraries (`lib*.so` ELF entries) for the image's machine, in jar order (a
    /// nested jar's at its place), extracted to scratch files.
    pub(crate) natives: Vec<JarNative>,
}

/// A native library bundled in a jar, for the image's machine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct JarNative {
    /// Its entry, `org/sqlite/native/Linux/x86_64/libsqlitejdbc.so`, or within a nested jar
    /// `BOOT-INF/lib/x.jar!/org/...`.
    pub(crate) entry: String,
    /// The scratch copy (named by fuse, not the jar).
    pub(crate) file: PathBuf,
}

impl JarNative {
    /// The library's file name (what `System.loadLibrary` looks for: `lib<name>.so`).
    pub(crate) fn file_name(&self) -> &str {
        self.entry.rsplit('/').next().unwrap_or(&self.entry)
    }
}

impl JarInfo {
    /// A digest of everything jdeps' answer depends on (the JDK classes referred to), so a
    /// rebuilt jar whose code changed but which uses the same JDK classes reuses the answer.
    pub(crate) fn refs_digest(&self) -> String {
        let mut h = Sha256::new();
        for r in &self.jdk_refs {
            h.update(r.as_bytes());
            h.update(b"\n");
        }
        hex::encode(h.finalize())
    }
}

/// Whether `path` looks like a jar: zip magic and a `.jar` name or a manifest entry.
pub(crate) fn looks_like_jar(path: &Path, magic: &[u8]) -> bool {
    if !magic.starts_with(b"PK\x03\x04") {
        return false;
    }
    if path
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("jar"))
    {
        return true;
    }
    std::fs::File::open(path)
        .ok()
        .and_then(|f| ZipArchive::new(f).ok())
        .is_some_and(|mut z| z.by_name(MANIFEST).is_ok())
}

/// Reads the jar at `path`: checks every entry name, finds `Main-Class` (or checks that
/// `main_class`, when given, is in the jar), extracts nested jars, collects the JDK classes the
/// bytecode refers to, extracts the native libraries for `arch`. At most [`budget_for`] the
/// jar's size is read.
pub(crate) fn read(path: &Path, main_class: Option<&str>, arch: Arch) -> Result<JarInfo> {
    let io_error = |source| JarError::Io {
        path: path.to_path_buf(),
        source,
    };
    let file = std::fs::File::open(path).map_err(io_error)?;
    let size = file.metadata().map_err(io_error)?.len();
    read_with_budget(path, file, budget_for(size), main_class, arch)
}

/// [`read`] with the budget given (the unit tests use small ones).
fn read_with_budget(
    path: &Path,
    file: std::fs::File,
    budget: u64,
    main_class: Option<&str>,
    arch: Arch,
) -> Result<JarInfo> {
    let corrupt = |source| JarError::Corrupt {
        path: path.to_path_buf(),
        source,
    };
    let mut zip = ZipArchive::new(io::BufReader::new(file)).map_err(corrupt)?;
    check_names(path, &mut zip)?;
    let mut budget = Budget {
        limit: budget,
        left: budget,
    };
    // Every entry that will be read, declared sizes first: an honest bomb is refused before a
    // byte of it is inflated.
    budget.check_declared(path, &mut zip, true)?;
    let manifest = match zip.by_name(MANIFEST) {
        Ok(mut entry) => {
            let text = read_to_memory(path, &mut entry, &mut budget)?;
            String::from_utf8_lossy(&text).into_owned()
        }
        Err(ZipError::FileNotFound) => String::new(),
        Err(e) => return Err(corrupt(e)),
    };
    let attr = |name| manifest_attribute(&manifest, name);
    let main_class = match main_class {
        Some(class) => {
            let entry = format!("{}.class", class.replace('.', "/"));
            if zip.by_name(&entry).is_err() {
                return Err(JarError::NoSuchClass {
                    path: path.to_path_buf(),
                    class: class.to_string(),
                    entry,
                });
            }
            class.to_string()
        }
        None => attr("Main-Class")
            .filter(|m| !m.is_empty())
            .ok_or_else(|| JarError::NoMainClass {
                path: path.to_path_buf(),
            })?,
    };
    let mut info = JarInfo {
        main_class,
        spring_boot: attr("Spring-Boot-Version").is_some(),
        nested: Vec::new(),
        scratch: None,
        jdk_refs: BTreeSet::new(),
        natives: Vec::new(),
    };
    let mut scanning = Scanning {
        info: &mut info,
        budget: &mut budget,
        arch,
    };
    scan(path, &mut zip, &mut scanning, None)?;
    Ok(info)
}

/// What may still be read out of a jar.
struct Budget {
    limit: u64,
    left: u64,
}

impl Budget {
    /// Takes the declared sizes of the entries [`scan`] will read from the budget, refusing the
    /// jar at the entry where it runs out.
    fn check_declared<R: Read + Seek>(
        &mut self,
        path: &Path,
        zip: &mut ZipArchive<R>,
        outer: bool,
    ) -> Result<()> {
        let mut left = self.left;
        for i in 0..zip.len() {
            let entry = zip.by_index_raw(i).map_err(|source| JarError::Corrupt {
                path: path.to_path_buf(),
                source,
            })?;
            let name = entry.name();
            if entry.is_dir() || !(wanted(name, outer) || outer && name == MANIFEST) {
                continue;
            }
            let size = entry.size();
            let streamed = name.ends_with(".jar") || is_native_name(name);
            if !streamed && size > MAX_IN_MEMORY {
                return Err(too_large(path, name, MAX_IN_MEMORY, WHY_ONE));
            }
            left = left
                .checked_sub(size)
                .ok_or_else(|| too_large(path, name, self.limit, WHY_ALL))?;
        }
        // Only checked here: the bytes are taken as they are read.
        Ok(())
    }

    /// Takes `n` bytes just read from `entry`.
    fn take(&mut self, path: &Path, entry: &str, n: u64) -> Result<()> {
        self.take_as(path, entry, n, WHY_ALL)
    }

    fn take_as(&mut self, path: &Path, entry: &str, n: u64, why: &'static str) -> Result<()> {
        self.left = self
            .left
            .checked_sub(n)
            .ok_or_else(|| too_large(path, entry, self.limit, why))?;
        Ok(())
    }
}

/// What an entry of a nested jar costs the budget, for the memory the zip reader's index of it
/// takes (about 600 bytes: a million empty entries, a 6 MB jar, took 616 MB).
const ENTRY_COST: u64 = 1 << 10;

/// The number of entries the end record of the zip archive `file` declares (ZIP64 included):
/// known before the zip reader indexes them.
fn declared_entries(file: &mut std::fs::File) -> std::result::Result<u64, ZipError> {
    use std::io::SeekFrom;
    let invalid = || ZipError::InvalidArchive("no end of central directory record".into());
    let len = file.seek(SeekFrom::End(0))?;
    // The end record: 22 bytes and a comment of at most 64 KiB.
    let tail_len = len.min(22 + 0xFFFF);
    let tail_start = len - tail_len;
    file.seek(SeekFrom::Start(tail_start))?;
    let mut tail = vec![0u8; tail_len as usize];
    file.read_exact(&mut tail)?;
    // The last signature whose comment length ends the file, else the last signature.
    let ends = (0..tail.len().saturating_sub(21))
        .rev()
        .filter(|&i| tail[i..].starts_with(b"PK\x05\x06"));
    let exact = |&i: &usize| {
        i + 22 + usize::from(u16::from_le_bytes([tail[i + 20], tail[i + 21]])) == tail.len()
    };
    let end = ends
        .clone()
        .find(exact)
        .or_else(|| ends.clone().next())
        .ok_or_else(invalid)?;
    let entries = u16::from_le_bytes([tail[end + 10], tail[end + 11]]);
    if entries != 0xFFFF {
        return Ok(u64::from(entries));
    }
    // ZIP64: a locator just before the end record points at the ZIP64 end record.
    let locator = end.checked_sub(20).ok_or_else(invalid)?;
    if !tail[locator..].starts_with(b"PK\x06\x07") {
        return Ok(u64::from(entries));
    }
    let at = u64::from_le_bytes(
        tail[locator + 8..locator + 16]
            .try_into()
            .unwrap_or_default(),
    );
    let mut record = [0u8; 40];
    file.seek(SeekFrom::Start(at))?;
    file.read_exact(&mut record)?;
    if !record.starts_with(b"PK\x06\x06") {
        return Err(invalid());
    }
    Ok(u64::from_le_bytes(
        record[32..40].try_into().unwrap_or_default(),
    ))
}

/// Why a jar is over its budget (the reasons of [`JarError::TooLarge`]).
const WHY_ALL: &str =
    "the most fuse reads out of a jar of its size (32 times the size, 64 MiB to 4 GiB)";
const WHY_ENTRIES: &str =
    "the most fuse reads out of a jar of its size, counting 1 KiB for each entry of a nested jar";
const WHY_ONE: &str = "the most fuse reads of one class file or manifest";

fn too_large(path: &Path, entry: &str, limit: u64, why: &'static str) -> JarError {
    JarError::TooLarge {
        path: path.to_path_buf(),
        entry: entry.to_string(),
        limit,
        why,
    }
}

/// Whether [`scan`] reads the entry `name`: class files, native libraries, and nested jars of
/// the outer jar.
fn wanted(name: &str, outer: bool) -> bool {
    name.ends_with(".class") || is_native_name(name) || outer && name.ends_with(".jar")
}

/// Whether the entry `name` may be a JNI library the JVM can load by name: `System.loadLibrary`
/// (the fallback of libraries whose extraction failed) looks only for `lib<name>.so`.
pub(crate) fn is_native_name(name: &str) -> bool {
    let file = name.rsplit('/').next().unwrap_or(name);
    file.len() > "lib.so".len() && file.starts_with("lib") && file.ends_with(".so")
}

/// Whether `head`, the start of a file, is a 64-bit little-endian ELF for `arch` (both fuse's
/// machines are little-endian).
pub(crate) fn elf_for(head: &[u8], arch: Arch) -> bool {
    head.len() >= 20
        && head.starts_with(b"\x7fELF")
        && head[4] == 2
        && head[5] == 1
        && u16::from_le_bytes([head[18], head[19]]) == arch.elf_machine()
}

/// Copies the entry to `out` in chunks, taking each from the budget, and checks it held
/// exactly the size it declared (reading to the end also checks its CRC).
fn copy_entry<R: Read>(
    path: &Path,
    entry: &mut zip::read::ZipFile<'_, R>,
    out: &mut dyn Write,
    budget: &mut Budget,
) -> Result<()> {
    copy_rest(path, entry, 0, out, budget)
}

/// [`copy_entry`] of an entry whose first `done` bytes were read (and taken) already.
fn copy_rest<R: Read>(
    path: &Path,
    entry: &mut zip::read::ZipFile<'_, R>,
    done: u64,
    out: &mut dyn Write,
    budget: &mut Budget,
) -> Result<()> {
    let name = entry.name().to_string();
    let declared = entry.size();
    let mut actual: u64 = done;
    let mut buf = vec![0u8; 64 << 10];
    loop {
        let n = entry.read(&mut buf).map_err(|e| JarError::Corrupt {
            path: path.to_path_buf(),
            source: e.into(),
        })?;
        if n == 0 {
            break;
        }
        actual += n as u64;
        if actual > declared {
            return Err(JarError::SizeMismatch {
                path: path.to_path_buf(),
                entry: name,
                declared,
            });
        }
        budget.take(path, &name, n as u64)?;
        out.write_all(&buf[..n])
            .map_err(|source| JarError::Scratch {
                path: path.to_path_buf(),
                entry: name.clone(),
                source,
            })?;
    }
    if actual != declared {
        return Err(JarError::SizeMismatch {
            path: path.to_path_buf(),
            entry: name,
            declared,
        });
    }
    Ok(())
}

/// Reads a class file or the manifest into memory (its declared size was checked against
/// [`MAX_IN_MEMORY`]).
fn read_to_memory<R: Read>(
    path: &Path,
    entry: &mut zip::read::ZipFile<'_, R>,
    budget: &mut Budget,
) -> Result<Vec<u8>> {
    let mut bytes = Vec::with_capacity(entry.size().min(MAX_IN_MEMORY) as usize);
    copy_entry(path, entry, &mut bytes, budget)?;
    Ok(bytes)
}

/// Refuses archives with entry names that are absolute or climb out with `..`.
fn check_names<R: Read + Seek>(path: &Path, zip: &mut ZipArchive<R>) -> Result<()> {
    for i in 0..zip.len() {
        let entry = zip.by_index_raw(i).map_err(|source| JarError::Corrupt {
            path: path.to_path_buf(),
            source,
        })?;
        if !is_enclosed(entry.name()) || entry.enclosed_name().is_none() {
            return Err(JarError::UnsafeEntry {
                path: path.to_path_buf(),
                entry: entry.name().to_string(),
            });
        }
    }
    Ok(())
}

/// Whether an entry name stays inside the directory it is extracted to: relative, no `..`
/// component, no backslash (a separator on Windows), no NUL. Stricter than the zip crate's
/// `enclosed_name`, which accepts `/etc/passwd` as `etc/passwd`.
pub(crate) fn is_enclosed(name: &str) -> bool {
    !name.starts_with('/')
        && !name.contains(['\\', '\0'])
        && name.split('/').all(|part| part != "..")
}

/// What [`scan`] fills in and reads against.
struct Scanning<'a> {
    info: &'a mut JarInfo,
    budget: &'a mut Budget,
    /// The machine native libraries are extracted for.
    arch: Arch,
}

impl Scanning<'_> {
    /// The scratch directory, made on first use.
    fn scratch_dir(&mut self) -> io::Result<PathBuf> {
        match &self.info.scratch {
            Some(dir) => Ok(dir.path().to_path_buf()),
            None => {
                let dir = tempfile::tempdir()?;
                let path = dir.path().to_path_buf();
                self.info.scratch = Some(dir);
                Ok(path)
            }
        }
    }
}

/// Reads the class files (for JDK references), the native libraries for the image's machine
/// and, in the outer jar, the nested jars (to scratch files, whose entries are read in turn).
/// `within` is the nested jar's entry name when scanning one.
fn scan<R: Read + Seek>(
    path: &Path,
    zip: &mut ZipArchive<R>,
    s: &mut Scanning<'_>,
    within: Option<&str>,
) -> Result<()> {
    let outer = within.is_none();
    let corrupt = |source| JarError::Corrupt {
        path: path.to_path_buf(),
        source,
    };
    for i in 0..zip.len() {
        let mut entry = zip.by_index(i).map_err(corrupt)?;
        let name = entry.name().to_string();
        if entry.is_dir() {
            continue;
        }
        if outer && name.starts_with("BOOT-INF/") {
            s.info.spring_boot = true;
        }
        if !wanted(&name, outer) {
            continue;
        }
        if name.ends_with(".class") {
            let bytes = read_to_memory(path, &mut entry, s.budget)?;
            // A class file that does not parse is not ours to judge (the JVM will); jdeps reports
            // it if it matters.
            let _ = class_refs(&bytes, &mut s.info.jdk_refs);
            continue;
        }
        let scratch_error = |source| JarError::Scratch {
            path: path.to_path_buf(),
            entry: name.clone(),
            source,
        };
        if is_native_name(&name) {
            // The ELF header decides: libraries for other machines are not read further.
            let mut head = Vec::with_capacity(20);
            (&mut entry)
                .take(20)
                .read_to_end(&mut head)
                .map_err(|e| JarError::Corrupt {
                    path: path.to_path_buf(),
                    source: e.into(),
                })?;
            s.budget.take(path, &name, head.len() as u64)?;
            if !elf_for(&head, s.arch) {
                continue;
            }
            let dir = s.scratch_dir().map_err(scratch_error)?;
            let file_path = dir.join(format!("native-{:04}.so", s.info.natives.len()));
            let mut file = std::fs::File::create(&file_path).map_err(scratch_error)?;
            let mut out = io::BufWriter::new(&mut file);
            out.write_all(&head).map_err(scratch_error)?;
            copy_rest(path, &mut entry, head.len() as u64, &mut out, s.budget)?;
            out.flush().map_err(scratch_error)?;
            s.info.natives.push(JarNative {
                entry: match within {
                    Some(jar) => format!("{jar}!/{name}"),
                    None => name.clone(),
                },
                file: file_path,
            });
            continue;
        }
        let dir = s.scratch_dir().map_err(scratch_error)?;
        // Names of our own: the entry names were checked, but need not be valid file names.
        let file_path = dir.join(format!("nested-{:04}.jar", s.info.nested.len()));
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&file_path)
            .map_err(scratch_error)?;
        {
            let mut out = io::BufWriter::new(&mut file);
            copy_entry(path, &mut entry, &mut out, s.budget)?;
            out.flush().map_err(scratch_error)?;
        }
        drop(entry);
        // The zip reader indexes every entry of an archive when it opens it (hundreds of
        // bytes each): entries cost the budget too, counted from the end record first.
        let entries = declared_entries(&mut file).map_err(|source| JarError::Corrupt {
            path: path.join(&name),
            source,
        })?;
        s.budget
            .take_as(path, &name, entries.saturating_mul(ENTRY_COST), WHY_ENTRIES)?;
        file.rewind().map_err(scratch_error)?;
        let nested_path = path.join(&name);
        let mut inner =
            ZipArchive::new(io::BufReader::new(file)).map_err(|source| JarError::Corrupt {
                path: nested_path.clone(),
                source,
            })?;
        if inner.len() as u64 > entries {
            // The reader found more entries than the end record said: not what was counted.
            return Err(JarError::Corrupt {
                path: nested_path,
                source: ZipError::InvalidArchive(
                    "more entries than its end record declares".into(),
                ),
            });
        }
        check_names(&nested_path, &mut inner)?;
        s.budget.check_declared(&nested_path, &mut inner, false)?;
        scan(&nested_path, &mut inner, s, Some(&name))?;
        s.info.nested.push(file_path);
    }
    Ok(())
}

/// The value of a main-section attribute of a manifest (continuation lines joined).
pub(crate) fn manifest_attribute(manifest: &str, name: &str) -> Option<String> {
    // Continuation lines start with one space and continue the previous line's value.
    let mut lines: Vec<String> = Vec::new();
    for raw in manifest.split('\n') {
        let line = raw.strip_suffix('\r').unwrap_or(raw);
        if line.is_empty() {
            // The main section ends at the first blank line.
            if !lines.is_empty() {
                break;
            }
            continue;
        }
        match (line.strip_prefix(' '), lines.last_mut()) {
            (Some(more), Some(last)) => last.push_str(more),
            _ => lines.push(line.to_string()),
        }
    }
    lines.iter().find_map(|l| {
        let (key, value) = l.split_once(':')?;
        key.trim()
            .eq_ignore_ascii_case(name)
            .then(|| value.trim().to_string())
    })
}

/// Why a class file could not be read (internal: such files are skipped).
#[derive(Debug)]
pub(crate) struct BadClass;

/// Adds the JDK classes the class file `bytes` refers to (class constants and the class names
/// in descriptors and signatures, all of which are UTF-8 constants) to `out`.
pub(crate) fn class_refs(
    bytes: &[u8],
    out: &mut BTreeSet<String>,
) -> std::result::Result<(), BadClass> {
    let mut r = Reader { bytes, pos: 0 };
    if r.u32()? != 0xCAFE_BABE {
        return Err(BadClass);
    }
    r.skip(4)?; // minor, major
    let count = r.u16()?;
    let mut i = 1;
    while i < count {
        let tag = r.u8()?;
        match tag {
            1 => {
                let len = r.u16()? as usize;
                let s = r.take(len)?;
                utf8_refs(s, out);
            }
            3 | 4 | 9 | 10 | 11 | 12 | 17 | 18 => r.skip(4)?,
            5 | 6 => {
                r.skip(8)?;
                // Longs and doubles take two constant-pool slots.
                i += 1;
            }
            7 | 8 | 16 | 19 | 20 => r.skip(2)?,
            15 => r.skip(3)?,
            _ => return Err(BadClass),
        }
        i += 1;
    }
    Ok(())
}

/// The JDK class names inside one UTF-8 constant: a plain internal name (`java/lang/String`),
/// a descriptor (`(ILjava/lang/String;)V`) or a generic signature.
fn utf8_refs(s: &[u8], out: &mut BTreeSet<String>) {
    if !s.contains(&b'/') {
        return;
    }
    let Ok(s) = std::str::from_utf8(s) else {
        return;
    };
    for token in s.split(['(', ')', ';', '[', '<', '>', ':', '+', '-', '*']) {
        // Descriptor letters (I, J, L, T...) are upper case; JDK package names are lower case.
        let name = token.trim_start_matches(|c: char| c.is_ascii_uppercase());
        let name = name.split('.').next().unwrap_or(name);
        if JDK_PREFIXES.iter().any(|p| name.starts_with(p)) {
            out.insert(name.to_string());
        }
    }
}

struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> std::result::Result<&'a [u8], BadClass> {
        let end = self.pos.checked_add(n).ok_or(BadClass)?;
        let s = self.bytes.get(self.pos..end).ok_or(BadClass)?;
        self.pos = end;
        Ok(s)
    }
    fn skip(&mut self, n: usize) -> std::result::Result<(), BadClass> {
        self.take(n).map(|_| ())
    }
    fn u8(&mut self) -> std::result::Result<u8, BadClass> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> std::result::Result<u16, BadClass> {
        let b = self.take(2)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }
    fn u32(&mut self) -> std::result::Result<u32, BadClass> {
        let b = self.take(4)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use zip::write::SimpleFileOptions;

    /// Writes a jar (stored entries: the zip crate here has no deflate writer) with `entries`.
    pub(crate) fn write_jar(path: &Path, entries: &[(&str, &[u8])]) {
        let file = std::fs::File::create(path).unwrap();
        let mut zip = zip::ZipWriter::new(file);
        let opts = SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
        for (name, bytes) in entries {
            zip.start_file(*name, opts).unwrap();
            zip.write_all(bytes).unwrap();
        }
        zip.finish().unwrap();
    }

    /// The start of a 64-bit little-endian ELF for `machine`, padded with `tail`.
    pub(crate) fn elf_head(machine: u16, tail: &[u8]) -> Vec<u8> {
        let mut b = b"\x7fELF\x02\x01\x01".to_vec();
        b.resize(18, 0);
        b.extend(machine.to_le_bytes());
        b.extend(tail);
        b
    }

    #[test]
    fn native_libraries_for_the_machine_are_extracted_in_jar_order() {
        let host = Arch::host();
        let other = match host {
            Arch::X86_64 => Arch::Aarch64,
            Arch::Aarch64 => Arch::X86_64,
        };
        let dir = tempfile::tempdir().unwrap();
        let mine = elf_head(host.elf_machine(), b"mine");
        let dep_lib = elf_head(host.elf_machine(), b"dep");
        let dep = dir.path().join("dep.jar");
        write_jar(&dep, &[("META-INF/native/libdep.so", &dep_lib)]);
        let dep_bytes = std::fs::read(&dep).unwrap();
        let mut elf32 = mine.clone();
        elf32[4] = 1;
        let app = dir.path().join("app.jar");
        write_jar(
            &app,
            &[
                (MANIFEST, b"Manifest-Version: 1.0\nMain-Class: app.Main\n\n"),
                ("native/Linux/x/libx.so", &mine),
                (
                    "native/Linux/other/libx.so",
                    &elf_head(other.elf_machine(), b"o"),
                ),
                ("native/Linux/x86/libx.so", &elf32),
                ("native/libtext.so", b"not an ELF at all, just text"),
                ("native/x.so", &mine),
                ("BOOT-INF/lib/dep.jar", &dep_bytes),
            ],
        );
        let info = read(&app, None, host).unwrap();
        let entries: Vec<&str> = info.natives.iter().map(|n| n.entry.as_str()).collect();
        assert_eq!(
            entries,
            [
                "native/Linux/x/libx.so",
                "BOOT-INF/lib/dep.jar!/META-INF/native/libdep.so"
            ]
        );
        assert_eq!(std::fs::read(&info.natives[0].file).unwrap(), mine);
        assert_eq!(std::fs::read(&info.natives[1].file).unwrap(), dep_lib);
        assert_eq!(info.natives[1].file_name(), "libdep.so");
        // The other machine's build is what is read for it.
        let info = read(&app, None, other).unwrap();
        let entries: Vec<&str> = info.natives.iter().map(|n| n.entry.as_str()).collect();
        assert_eq!(entries, ["native/Linux/other/libx.so"]);
    }

    #[test]
    fn native_libraries_count_against_the_budget() {
        let dir = tempfile::tempdir().unwrap();
        let big = elf_head(Arch::host().elf_machine(), &vec![0u8; 2 << 20]);
        let app = dir.path().join("app.jar");
        write_jar(
            &app,
            &[
                (MANIFEST, b"Manifest-Version: 1.0\nMain-Class: app.Main\n\n"),
                ("native/libbig.so", &big),
            ],
        );
        let err = read_within(&app, 1 << 20).unwrap_err();
        assert!(
            matches!(&err, JarError::TooLarge { entry, .. } if entry == "native/libbig.so"),
            "{err}"
        );
        assert_eq!(read_within(&app, 4 << 20).unwrap().natives.len(), 1);
    }

    #[test]
    fn native_library_names_are_what_load_library_finds() {
        assert!(is_native_name(
            "org/sqlite/native/Linux/x86_64/libsqlitejdbc.so"
        ));
        assert!(is_native_name("libjnidispatch.so"));
        assert!(!is_native_name("native/lib.so"));
        assert!(!is_native_name("native/greet.so"));
        assert!(!is_native_name("native/libgreet.so.1"));
        assert!(!is_native_name("native/libgreet.dylib"));
    }

    /// A minimal class file whose constant pool holds `utf8` strings (plus a long, to check
    /// the two-slot rule).
    fn class_file(utf8: &[&str]) -> Vec<u8> {
        let mut b = vec![0xCA, 0xFE, 0xBA, 0xBE, 0, 0, 0, 61];
        let count = 1 + utf8.len() as u16 + 2 + 1;
        b.extend(count.to_be_bytes());
        b.extend([5, 0, 0, 0, 0, 0, 0, 0, 42]); // a long: two slots
        for s in utf8 {
            b.push(1);
            b.extend((s.len() as u16).to_be_bytes());
            b.extend(s.as_bytes());
        }
        b.extend([7, 0, 3]); // a class constant
        b.extend([0; 10]); // the rest of the class file, unread
        b
    }

    fn replace_all(bytes: &[u8], from: &[u8], to: &[u8]) -> Vec<u8> {
        assert_eq!(from.len(), to.len());
        let mut out = bytes.to_vec();
        let mut i = 0;
        while i + from.len() <= out.len() {
            if &out[i..i + from.len()] == from {
                out[i..i + from.len()].copy_from_slice(to);
            }
            i += 1;
        }
        out
    }

    #[test]
    fn manifest_attributes_with_continuations() {
        let m = "Manifest-Version: 1.0\r\nMain-Class: com.example.a.very.long.pack\r\n age.Main\r\nmulti-release: true\r\n\r\nName: x\r\nMain-Class: no\r\n";
        assert_eq!(
            manifest_attribute(m, "Main-Class").as_deref(),
            Some("com.example.a.very.long.package.Main")
        );
        assert_eq!(
            manifest_attribute(m, "Multi-Release").as_deref(),
            Some("true")
        );
        assert_eq!(manifest_attribute(m, "Start-Class"), None);
    }

    #[test]
    fn jdk_references_come_from_constants_and_descriptors() {
        let mut refs = BTreeSet::new();
        class_refs(
            &class_file(&[
                "com/example/Main",
                "java/net/http/HttpClient",
                "(ILjava/sql/Connection;[Lcom/example/X;)Ljava/util/List;",
                "Ljava/util/Map<Ljava/lang/String;+Ljavax/naming/Context;>;",
                "hello world",
            ]),
            &mut refs,
        )
        .unwrap();
        let refs: Vec<&str> = refs.iter().map(String::as_str).collect();
        assert_eq!(
            refs,
            [
                "java/lang/String",
                "java/net/http/HttpClient",
                "java/sql/Connection",
                "java/util/List",
                "java/util/Map",
                "javax/naming/Context"
            ]
        );
        assert!(class_refs(b"not a class", &mut BTreeSet::new()).is_err());
        let truncated = &class_file(&["java/lang/Object"])[..14];
        assert!(class_refs(truncated, &mut BTreeSet::new()).is_err());
    }

    #[test]
    fn reads_main_class_nested_jars_and_refs() {
        let dir = tempfile::tempdir().unwrap();
        let dep = dir.path().join("dep.jar");
        write_jar(
            &dep,
            &[("dep/Lib.class", &class_file(&["java/sql/Driver"]))],
        );
        let dep_bytes = std::fs::read(&dep).unwrap();
        let app = dir.path().join("app.jar");
        write_jar(
            &app,
            &[
                (MANIFEST, b"Manifest-Version: 1.0\nMain-Class: app.Main\n\n"),
                ("app/Main.class", &class_file(&["java/lang/System"])),
                ("lib/dep.jar", &dep_bytes),
            ],
        );
        let info = read(&app, None, Arch::host()).unwrap();
        assert_eq!(info.main_class, "app.Main");
        assert!(!info.spring_boot);
        assert_eq!(info.nested.len(), 1);
        assert_eq!(std::fs::read(&info.nested[0]).unwrap(), dep_bytes);
        assert!(info.jdk_refs.contains("java/sql/Driver"), "{info:?}");
        assert!(info.jdk_refs.contains("java/lang/System"));
        assert!(looks_like_jar(&app, b"PK\x03\x04"));

        // Same JDK references, different code: same digest; one more reference: another.
        let again = dir.path().join("again.jar");
        write_jar(
            &again,
            &[
                (MANIFEST, b"Main-Class: app.Other\n"),
                (
                    "app/Other.class",
                    &class_file(&["app/Other", "java/lang/System", "java/sql/Driver"]),
                ),
            ],
        );
        assert_eq!(
            read(&again, None, Arch::host()).unwrap().refs_digest(),
            info.refs_digest()
        );
        let more = dir.path().join("more.jar");
        write_jar(
            &more,
            &[
                (MANIFEST, b"Main-Class: app.Main\n"),
                ("app/Main.class", &class_file(&["java/net/http/HttpClient"])),
            ],
        );
        assert_ne!(
            read(&more, None, Arch::host()).unwrap().refs_digest(),
            info.refs_digest()
        );
    }

    #[test]
    fn refuses_missing_main_class_corrupt_and_escaping_entries() {
        let dir = tempfile::tempdir().unwrap();
        let no_main = dir.path().join("lib.jar");
        write_jar(&no_main, &[(MANIFEST, b"Manifest-Version: 1.0\n")]);
        assert!(matches!(
            read(&no_main, None, Arch::host()),
            Err(JarError::NoMainClass { .. })
        ));
        // A library jar runs when the class is named, and only a class it holds.
        let lib = dir.path().join("tools.jar");
        write_jar(
            &lib,
            &[
                (MANIFEST, b"Main-Class: org.tools.Console\n"),
                ("org/tools/Server.class", &class_file(&[])),
            ],
        );
        assert_eq!(
            read(&lib, Some("org.tools.Server"), Arch::host())
                .unwrap()
                .main_class,
            "org.tools.Server"
        );
        let err = read(&lib, Some("org.tools.Nope"), Arch::host()).unwrap_err();
        assert!(matches!(err, JarError::NoSuchClass { .. }), "{err:?}");
        assert!(err.to_string().contains("no org/tools/Nope.class"), "{err}");

        let corrupt = dir.path().join("corrupt.jar");
        std::fs::write(&corrupt, b"PK\x03\x04 and then nothing a zip reader wants").unwrap();
        assert!(matches!(
            read(&corrupt, None, Arch::host()),
            Err(JarError::Corrupt { .. })
        ));

        for bad in ["../evil.class", "a/../../evil", "/etc/passwd"] {
            // The zip writer cleans names: write a placeholder of the same length, then patch
            // the name in the local and central headers (the CRC covers the data only).
            let placeholder = bad.replace(['.', '/'], "X");
            let slip = dir.path().join("slip.jar");
            write_jar(
                &slip,
                &[(MANIFEST, b"Main-Class: a.B\n"), (&placeholder, b"x")],
            );
            let bytes = std::fs::read(&slip).unwrap();
            let patched = replace_all(&bytes, placeholder.as_bytes(), bad.as_bytes());
            assert_ne!(patched, bytes);
            std::fs::write(&slip, patched).unwrap();
            let err = read(&slip, None, Arch::host()).unwrap_err();
            assert!(matches!(err, JarError::UnsafeEntry { .. }), "{bad}: {err}");
            assert!(err.to_string().contains(bad), "{err}");
        }

        // Inside a nested jar too.
        let inner = dir.path().join("inner.jar");
        write_jar(&inner, &[("XXXXXXx.class", b"x")]);
        let bytes = replace_all(&std::fs::read(&inner).unwrap(), b"XXXXXX", b"../../");
        std::fs::write(&inner, bytes).unwrap();
        let outer = dir.path().join("outer.jar");
        write_jar(
            &outer,
            &[
                (MANIFEST, b"Main-Class: a.B\n"),
                ("lib/inner.jar", &std::fs::read(&inner).unwrap()),
            ],
        );
        let err = read(&outer, None, Arch::host()).unwrap_err();
        assert!(matches!(err, JarError::UnsafeEntry { .. }), "{err}");
        assert!(err.to_string().contains("lib/inner.jar"), "{err}");
    }

    /// Sets the uncompressed size the archive declares for its entries, in the local and the
    /// central headers, to `size`.
    fn declare_size(bytes: &mut [u8], size: u32) {
        for (signature, at) in [(b"PK\x03\x04", 22), (b"PK\x01\x02", 24)] {
            let mut i = 0;
            while i + 4 <= bytes.len() {
                if &bytes[i..i + 4] == signature {
                    bytes[i + at..i + at + 4].copy_from_slice(&size.to_le_bytes());
                }
                i += 1;
            }
        }
    }

    fn read_within(path: &Path, budget: u64) -> Result<JarInfo> {
        read_with_budget(
            path,
            std::fs::File::open(path).unwrap(),
            budget,
            None,
            Arch::host(),
        )
    }

    #[test]
    fn what_is_read_is_bounded_by_the_budget_and_the_declared_sizes() {
        let dir = tempfile::tempdir().unwrap();
        let manifest: &[u8] = b"Main-Class: a.B\n";
        let big_class = class_file(&["java/lang/String"; 40]);
        let dep = dir.path().join("dep.jar");
        write_jar(&dep, &[("dep/Big.class", &big_class)]);
        let dep_bytes = std::fs::read(&dep).unwrap();
        let app = dir.path().join("app.jar");
        write_jar(&app, &[(MANIFEST, manifest), ("lib/dep.jar", &dep_bytes)]);
        let needed = (manifest.len() + dep_bytes.len() + big_class.len()) as u64 + ENTRY_COST;
        assert_eq!(read_within(&app, needed).unwrap().nested.len(), 1);

        // One byte short: the outer jar fits, the nested jar's class does not; the error names
        // the entry, in the nested jar.
        let err = read_within(&app, needed - 1).unwrap_err();
        assert!(matches!(err, JarError::TooLarge { .. }), "{err:?}");
        let line = err.to_string();
        assert!(line.contains("app.jar/lib/dep.jar"), "{line}");
        assert!(line.contains("dep/Big.class"), "{line}");
        assert!(!line.contains('\n'), "{line}");
        // Short of the nested jar itself: refused at the outer jar's entry, from the sizes
        // declared; short of what indexing its one entry costs: refused at that entry too.
        let outer = (manifest.len() + dep_bytes.len()) as u64;
        let err = read_within(&app, outer - 1).unwrap_err();
        assert!(err.to_string().contains("its entry lib/dep.jar"), "{err}");
        assert!(err.to_string().contains("of its size ("), "{err}");
        let err = read_within(&app, outer + ENTRY_COST - 1).unwrap_err();
        assert!(err.to_string().contains("its entry lib/dep.jar"), "{err}");
        assert!(
            err.to_string().contains("each entry of a nested jar"),
            "{err}"
        );
        let mut file = std::fs::File::open(&dep).unwrap();
        assert_eq!(declared_entries(&mut file).unwrap(), 1);
        // More entries than the classic end record counts: the ZIP64 one says how many.
        let names: Vec<String> = (0..70_000).map(|i| format!("r/{i}")).collect();
        let many: Vec<(&str, &[u8])> = names.iter().map(|n| (n.as_str(), &b""[..])).collect();
        let zip64 = dir.path().join("zip64.jar");
        write_jar(&zip64, &many);
        let mut file = std::fs::File::open(&zip64).unwrap();
        assert_eq!(declared_entries(&mut file).unwrap(), 70_000);

        // An entry holding more than it declares is refused however large the budget.
        let mut lying = std::fs::read(&app).unwrap();
        declare_size(&mut lying, 10);
        let liar = dir.path().join("liar.jar");
        std::fs::write(&liar, lying).unwrap();
        let err = read_within(&liar, MAX_BUDGET).unwrap_err();
        assert!(matches!(err, JarError::SizeMismatch { .. }), "{err:?}");
        assert!(
            err.to_string().contains("does not hold the 10 bytes"),
            "{err}"
        );

        // A class file too large to read into memory, whatever the budget.
        let mut huge = std::fs::read(&dep).unwrap();
        declare_size(&mut huge, (MAX_IN_MEMORY + 1) as u32);
        std::fs::write(&dep, huge).unwrap();
        let err = read_within(&dep, MAX_BUDGET).unwrap_err();
        assert!(err.to_string().contains("one class file"), "{err}");

        assert_eq!(budget_for(1_000), MIN_BUDGET);
        assert_eq!(budget_for(10 << 20), 320 << 20);
        assert_eq!(budget_for(u64::MAX), MAX_BUDGET);
    }
}
