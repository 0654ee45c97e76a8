//! The shared-library closure of a program: everything the dynamic loader will map when the
//! program starts, found with the loader's own rules, and where each file goes in the image.
//!
//! # Search order (as glibc's ld.so)
//! For each `DT_NEEDED` name of an object, breadth first:
//! 1. a name with a `/` is a path (absolute ones are looked up inside the sysroot);
//! 2. if the object has no `DT_RUNPATH`: the `DT_RPATH` of the object, then of the object that
//!    loaded it, and so on up to the program;
//! 3. [`ClosureOptions::extra_library_paths`] (the place of `LD_LIBRARY_PATH`);
//! 4. the object's own `DT_RUNPATH` (which applies to its own needs only);
//! 5. the directories of `/etc/ld.so.conf` (with `include` globs) inside the sysroot;
//! 6. the standard directories `/lib/<triple>`, `/usr/lib/<triple>`, `/lib64`, `/usr/lib64`,
//!    `/lib`, `/usr/lib`.
//!
//! Candidates of the wrong machine or class are skipped and the search goes on, as ld.so does.
//! A name that matches the `DT_SONAME` (or file name) of an object already loaded, including
//! the interpreter, is not searched again.
//!
//! # Placement in the image
//! The image has no `ld.so.cache`, so every library must land where the loader in the guest
//! looks without one:
//! - the interpreter (`PT_INTERP`) at exactly its `PT_INTERP` path, which the kernel opens;
//! - a library found through an `$ORIGIN` search entry at that entry with `$ORIGIN` replaced by
//!   the object's directory *in the image* (lexically normalised, as the kernel resolves `..`
//!   in real directories): `$ORIGIN/../lib` of a program placed at `/app/hello` puts the library
//!   in `/lib`. The unchanged RPATH/RUNPATH then finds it in the guest;
//! - a library found through an absolute RPATH/RUNPATH entry or a standard directory at the
//!   same path (the unchanged RPATH, or the loader's default search, finds it);
//! - a library found through `extra_library_paths` or an `ld.so.conf` directory that is not a
//!   standard directory (say `/usr/local/lib`) in the image's *default library directory*: the
//!   first standard directory that holds `libc.so.6` in the sysroot (`/usr/lib` if none does),
//!   which the guest's loader searches without a cache.
//!
//! Symlinks are resolved on the host (inside the sysroot), so the image gets a regular file at
//! the soname path. `glibc-hwcaps` subdirectories are not searched: the baseline library in the
//! directory itself is always taken, which runs on any CPU of the architecture.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::fs;
use std::io::{self, Read};
use std::path::{Component, Path, PathBuf};

use goblin::elf::header::{EI_CLASS, EI_DATA, ELFCLASS64, ELFDATA2LSB, ELFMAG, SELFMAG};

use crate::arch::Arch;
use crate::tree::{Tree, TreeError};

/// Errors finding the shared-library closure of a program.
#[derive(Debug, thiserror::Error)]
pub enum ElfError {
    /// A file could not be read.
    #[error("Cannot read {}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// A directory given where a program was expected.
    #[error("{} is a directory, not a program: give the path of the executable", path.display())]
    IsDirectory { path: PathBuf },
    /// The input is not an ELF file at all.
    #[error("{} is not an ELF file: fuse packages compiled programs (for a script, package its interpreter)", path.display())]
    NotElf { path: PathBuf },
    /// An ELF file that goblin cannot make sense of.
    #[error("Cannot parse the ELF file {}: {reason}", path.display())]
    Parse { path: PathBuf, reason: String },
    /// An ELF file for another architecture than the image's.
    #[error("{} is an ELF for {found}, but the image is for {expected}: build it for {expected} or choose --arch to match", path.display())]
    WrongArch {
        path: PathBuf,
        found: String,
        expected: Arch,
    },
    /// A needed library was found nowhere.
    #[error("Missing library {name} needed by {}: install it or add its directory to --library-path (searched {})", needed_by.display(), list_dirs(searched))]
    MissingLibrary {
        name: String,
        needed_by: PathBuf,
        searched: Vec<PathBuf>,
    },
    /// A dynamic string token fuse cannot expand for the guest.
    #[error("{} uses {token} in its library search path '{entry}', which fuse cannot expand: relink it with $ORIGIN or an absolute path", path.display())]
    UnsupportedToken {
        path: PathBuf,
        token: &'static str,
        entry: String,
    },
    /// A DT_NEEDED entry with a relative path, which depends on the working directory.
    #[error("{} needs {name}, a path relative to the working directory: relink it against a soname or an absolute path", needed_by.display())]
    RelativeNeeded { name: String, needed_by: PathBuf },
    /// A symlink chain that does not end.
    #[error("Too many levels of symbolic links at {}: fix the link", path.display())]
    SymlinkLoop { path: PathBuf },
    /// The closure could not be added to the tree.
    #[error(transparent)]
    Tree(#[from] TreeError),
}

fn list_dirs(dirs: &[PathBuf]) -> String {
    if dirs.is_empty() {
        return "no directories".to_string();
    }
    dirs.iter()
        .map(|d| d.display().to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

/// Result of ELF operations.
pub type Result<T> = std::result::Result<T, ElfError>;

/// What matters about an ELF file for packaging it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ElfInfo {
    /// `e_machine`.
    pub machine: u16,
    /// The architecture, if fuse supports it.
    pub arch: Option<Arch>,
    /// ELFCLASS64.
    pub is_64: bool,
    /// Little-endian data.
    pub little_endian: bool,
    /// No interpreter and no needed libraries (static and static-PIE programs).
    pub is_static: bool,
    /// `PT_INTERP`.
    pub interpreter: Option<String>,
    /// `DT_NEEDED`, in order.
    pub needed: Vec<String>,
    /// `DT_RPATH` entries, split at `:`.
    pub rpath: Vec<String>,
    /// `DT_RUNPATH` entries, split at `:`.
    pub runpath: Vec<String>,
    /// `DT_SONAME`.
    pub soname: Option<String>,
}

impl ElfInfo {
    /// A name for the architecture, for messages.
    pub fn arch_name(&self) -> String {
        describe_machine(self.machine, self.is_64)
    }
}

fn describe_machine(machine: u16, is_64: bool) -> String {
    let bits = if is_64 { 64 } else { 32 };
    match Arch::from_elf_machine(machine) {
        Some(a) if is_64 => a.to_string(),
        Some(a) => format!("{a} ({bits}-bit)"),
        None => format!(
            "{} ({bits}-bit, e_machine {machine})",
            goblin::elf::header::machine_to_str(machine)
        ),
    }
}

/// Reads and parses an ELF file.
pub fn inspect(path: impl AsRef<Path>) -> Result<ElfInfo> {
    let path = path.as_ref();
    let io_err = |source| ElfError::Io {
        path: path.to_path_buf(),
        source,
    };
    if fs::metadata(path).map_err(io_err)?.is_dir() {
        return Err(ElfError::IsDirectory {
            path: path.to_path_buf(),
        });
    }
    let bytes = fs::read(path).map_err(io_err)?;
    if bytes.len() < SELFMAG || &bytes[..SELFMAG] != ELFMAG {
        return Err(ElfError::NotElf {
            path: path.to_path_buf(),
        });
    }
    let elf = goblin::elf::Elf::parse(&bytes).map_err(|e| ElfError::Parse {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })?;
    let split = |v: &[&str]| -> Vec<String> {
        v.iter()
            .flat_map(|s| s.split(':'))
            .filter(|s| !s.is_empty())
            .map(str::to_string)
            .collect()
    };
    let needed: Vec<String> = elf.libraries.iter().map(|s| s.to_string()).collect();
    let interpreter = elf.interpreter.map(str::to_string);
    Ok(ElfInfo {
        machine: elf.header.e_machine,
        arch: Arch::from_elf_machine(elf.header.e_machine),
        is_64: elf.is_64,
        little_endian: elf.little_endian,
        is_static: interpreter.is_none() && needed.is_empty(),
        interpreter,
        needed,
        rpath: split(&elf.rpaths),
        runpath: split(&elf.runpaths),
        soname: elf.soname.map(str::to_string),
    })
}

/// Reads just the identification and `e_machine` of a file: `None` if it is not an ELF.
fn peek_machine(path: &Path) -> io::Result<Option<(u16, bool)>> {
    let mut head = [0u8; 20];
    let mut f = fs::File::open(path)?;
    let mut n = 0;
    while n < head.len() {
        match f.read(&mut head[n..])? {
            0 => return Ok(None),
            k => n += k,
        }
    }
    if &head[..SELFMAG] != ELFMAG {
        return Ok(None);
    }
    let machine = if head[EI_DATA] == ELFDATA2LSB {
        u16::from_le_bytes([head[18], head[19]])
    } else {
        u16::from_be_bytes([head[18], head[19]])
    };
    Ok(Some((machine, head[EI_CLASS] == ELFCLASS64)))
}

/// How to find libraries.
#[derive(Clone, Debug)]
pub struct ClosureOptions {
    /// The architecture of the image; every object must be for it.
    pub arch: Arch,
    /// The root the library lookups happen in (`/` for the host's own libraries).
    pub sysroot: PathBuf,
    /// Host directories searched after RPATH and before RUNPATH, like `LD_LIBRARY_PATH`.
    pub extra_library_paths: Vec<PathBuf>,
}

impl Default for ClosureOptions {
    fn default() -> Self {
        ClosureOptions {
            arch: Arch::host(),
            sysroot: PathBuf::from("/"),
            extra_library_paths: Vec::new(),
        }
    }
}

/// One file of the closure.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Library {
    /// The name it was needed by (soname, e.g. `libm.so.6`), or the `PT_INTERP` path.
    pub name: String,
    /// The real file on the host (symlinks resolved) to copy.
    pub host_path: PathBuf,
    /// Where it goes in the image.
    pub image_path: String,
}

/// The interpreter and libraries a program needs at run time.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Closure {
    /// The dynamic loader, placed at its `PT_INTERP` path; `None` for static programs.
    pub interpreter: Option<Library>,
    /// Every library, sorted by image path, each once.
    pub libraries: Vec<Library>,
}

/// How a library was found: decides where it lands in the image.
enum Placement {
    /// At this image directory.
    Dir(String),
    /// In the image's default library directory.
    Default,
}

/// An object loaded during the walk.
struct Loaded {
    info: ElfInfo,
    /// Host directory `$ORIGIN` expands to (where the object was found, unresolved).
    host_dir: PathBuf,
    /// Image directory `$ORIGIN` expands to in the guest.
    image_dir: String,
    /// Index of the object that loaded this one (for the inherited RPATH).
    loader: Option<usize>,
    /// The host path used in messages.
    display: PathBuf,
}

struct Resolver<'a> {
    opts: &'a ClosureOptions,
    conf_dirs: Vec<String>,
    std_dirs: Vec<String>,
    default_dir: String,
}

/// Finds the interpreter and every shared library `binary` needs, and where each goes in the
/// image when the binary itself is placed at `binary_image_path`.
pub fn resolve_closure(
    binary: &Path,
    binary_image_path: &str,
    opts: &ClosureOptions,
) -> Result<Closure> {
    let info = inspect(binary)?;
    check_arch(binary, &info, opts.arch)?;
    if info.is_static {
        return Ok(Closure::default());
    }
    let std_dirs = standard_dirs(opts.arch);
    let default_dir = std_dirs
        .iter()
        .find(|d| in_sysroot(&opts.sysroot, &format!("{d}/libc.so.6")).is_file())
        .cloned()
        .unwrap_or_else(|| "/usr/lib".to_string());
    let resolver = Resolver {
        opts,
        conf_dirs: read_ld_so_conf(&opts.sysroot),
        std_dirs,
        default_dir,
    };
    resolver.run(binary, binary_image_path, info)
}

impl Resolver<'_> {
    fn run(&self, binary: &Path, binary_image_path: &str, info: ElfInfo) -> Result<Closure> {
        // The kernel runs the program from its real path, so $ORIGIN is its real directory.
        let real_binary = fs::canonicalize(binary).map_err(|source| ElfError::Io {
            path: binary.to_path_buf(),
            source,
        })?;
        let mut objects = vec![Loaded {
            host_dir: parent(&real_binary),
            image_dir: image_parent(binary_image_path),
            loader: None,
            display: binary.to_path_buf(),
            info,
        }];
        // Names (sonames and file names) already satisfied, and their image paths.
        let mut known: HashMap<String, String> = HashMap::new();
        let mut libraries: BTreeMap<String, Library> = BTreeMap::new();

        let mut interpreter = None;
        if let Some(interp) = objects[0].info.interpreter.clone() {
            let host = in_sysroot(&self.opts.sysroot, &interp);
            let real = real_path(&self.opts.sysroot, &host)?;
            let iinfo = inspect(&real)?;
            check_arch(&host, &iinfo, self.opts.arch)?;
            let base = interp.rsplit('/').next().unwrap_or(&interp).to_string();
            known.insert(base, interp.clone());
            if let Some(s) = &iinfo.soname {
                known.insert(s.clone(), interp.clone());
            }
            interpreter = Some(Library {
                name: interp.clone(),
                host_path: real,
                image_path: interp,
            });
        }

        let mut queue = VecDeque::from([0usize]);
        while let Some(idx) = queue.pop_front() {
            for name in objects[idx].info.needed.clone() {
                if known.contains_key(&name) {
                    continue;
                }
                let (found, image_dir) = self.find(&objects, idx, &name)?;
                let real = real_path(&self.opts.sysroot, &found)?;
                let info = inspect(&real)?;
                let file_name = name.rsplit('/').next().unwrap_or(&name);
                let image_path = crate::tree::join(&image_dir, file_name);
                known.insert(name.clone(), image_path.clone());
                if let Some(s) = &info.soname {
                    known.entry(s.clone()).or_insert_with(|| image_path.clone());
                }
                libraries.insert(
                    image_path.clone(),
                    Library {
                        name: name.clone(),
                        host_path: real,
                        image_path,
                    },
                );
                objects.push(Loaded {
                    host_dir: parent(&found),
                    image_dir,
                    loader: Some(idx),
                    display: found,
                    info,
                });
                queue.push_back(objects.len() - 1);
            }
        }
        Ok(Closure {
            interpreter,
            libraries: libraries.into_values().collect(),
        })
    }

    /// Finds `name` needed by `objects[idx]`: the host path of the match and its image dir.
    fn find(&self, objects: &[Loaded], idx: usize, name: &str) -> Result<(PathBuf, String)> {
        let obj = &objects[idx];
        if name.contains('/') {
            if !name.starts_with('/') {
                return Err(ElfError::RelativeNeeded {
                    name: name.to_string(),
                    needed_by: obj.display.clone(),
                });
            }
            let host = in_sysroot(&self.opts.sysroot, name);
            if self.acceptable(&host)? {
                return Ok((host, image_parent(name)));
            }
            return Err(ElfError::MissingLibrary {
                name: name.to_string(),
                needed_by: obj.display.clone(),
                searched: vec![host],
            });
        }

        let mut candidates: Vec<(PathBuf, Placement)> = Vec::new();
        if obj.info.runpath.is_empty() {
            let mut cur = Some(idx);
            while let Some(i) = cur {
                let o = &objects[i];
                if o.info.runpath.is_empty() {
                    for entry in &o.info.rpath {
                        candidates.push(self.expand(o, entry)?);
                    }
                }
                cur = o.loader;
            }
        }
        for dir in &self.opts.extra_library_paths {
            candidates.push((dir.clone(), Placement::Default));
        }
        for entry in &obj.info.runpath {
            candidates.push(self.expand(obj, entry)?);
        }
        for dir in &self.conf_dirs {
            let placement = if self.std_dirs.contains(dir) {
                Placement::Dir(dir.clone())
            } else {
                Placement::Default
            };
            candidates.push((in_sysroot(&self.opts.sysroot, dir), placement));
        }
        for dir in &self.std_dirs {
            candidates.push((
                in_sysroot(&self.opts.sysroot, dir),
                Placement::Dir(dir.clone()),
            ));
        }

        let mut searched: Vec<PathBuf> = Vec::new();
        for (dir, placement) in candidates {
            if searched.contains(&dir) {
                continue;
            }
            let host = dir.join(name);
            searched.push(dir);
            if self.acceptable(&host)? {
                let image_dir = match placement {
                    Placement::Dir(d) => d,
                    Placement::Default => self.default_dir.clone(),
                };
                return Ok((host, image_dir));
            }
        }
        Err(ElfError::MissingLibrary {
            name: name.to_string(),
            needed_by: obj.display.clone(),
            searched,
        })
    }

    /// The host directory and image placement of one RPATH/RUNPATH entry of `obj`.
    fn expand(&self, obj: &Loaded, entry: &str) -> Result<(PathBuf, Placement)> {
        for token in ["$LIB", "${LIB}", "$PLATFORM", "${PLATFORM}"] {
            if entry.contains(token) {
                return Err(ElfError::UnsupportedToken {
                    path: obj.display.clone(),
                    token: if token.contains("LIB") {
                        "$LIB"
                    } else {
                        "$PLATFORM"
                    },
                    entry: entry.to_string(),
                });
            }
        }
        let rest = entry
            .strip_prefix("${ORIGIN}")
            .or_else(|| entry.strip_prefix("$ORIGIN"));
        if let Some(rest) = rest {
            let rest = rest.trim_start_matches('/');
            let host = if rest.is_empty() {
                obj.host_dir.clone()
            } else {
                obj.host_dir.join(rest)
            };
            let image = normalize_image(&format!("{}/{rest}", obj.image_dir));
            return Ok((host, Placement::Dir(image)));
        }
        if entry.contains("$ORIGIN") || entry.contains("${ORIGIN}") {
            // $ORIGIN in the middle of an entry: expand it in place.
            let host = entry
                .replace("${ORIGIN}", &obj.host_dir.to_string_lossy())
                .replace("$ORIGIN", &obj.host_dir.to_string_lossy());
            let image = entry
                .replace("${ORIGIN}", &obj.image_dir)
                .replace("$ORIGIN", &obj.image_dir);
            return Ok((PathBuf::from(host), Placement::Dir(normalize_image(&image))));
        }
        if entry.starts_with('/') {
            return Ok((
                in_sysroot(&self.opts.sysroot, entry),
                Placement::Dir(normalize_image(entry)),
            ));
        }
        // A relative entry depends on the working directory of the guest; ld.so takes it
        // relative to the cwd, which is `/` when init starts the app.
        let image = normalize_image(&format!("/{entry}"));
        Ok((
            in_sysroot(&self.opts.sysroot, &image),
            Placement::Dir(image),
        ))
    }

    /// Whether `path` is a library ld.so would take: an ELF of the right machine and class.
    /// Wrong-architecture candidates are skipped, as ld.so does.
    fn acceptable(&self, path: &Path) -> Result<bool> {
        let real = match real_path(&self.opts.sysroot, path) {
            Ok(p) => p,
            Err(ElfError::Io { .. }) => return Ok(false),
            Err(e) => return Err(e),
        };
        if !real.is_file() {
            return Ok(false);
        }
        match peek_machine(&real) {
            // Every supported architecture is 64-bit, and check_arch holds programs to that.
            Ok(Some((machine, is_64))) => Ok(machine == self.opts.arch.elf_machine() && is_64),
            Ok(None) | Err(_) => Ok(false),
        }
    }
}

fn check_arch(path: &Path, info: &ElfInfo, arch: Arch) -> Result<()> {
    if info.arch == Some(arch) && info.is_64 {
        return Ok(());
    }
    Err(ElfError::WrongArch {
        path: path.to_path_buf(),
        found: info.arch_name(),
        expected: arch,
    })
}

/// The standard library directories of `arch`, in search order.
pub fn standard_dirs(arch: Arch) -> Vec<String> {
    let t = arch.gnu_triple();
    vec![
        format!("/lib/{t}"),
        format!("/usr/lib/{t}"),
        "/lib64".to_string(),
        "/usr/lib64".to_string(),
        "/lib".to_string(),
        "/usr/lib".to_string(),
    ]
}

/// The host path of the image-style absolute `path` inside `sysroot`.
fn in_sysroot(sysroot: &Path, path: &str) -> PathBuf {
    sysroot.join(path.trim_start_matches('/'))
}

fn parent(p: &Path) -> PathBuf {
    p.parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| "/".into())
}

fn image_parent(p: &str) -> String {
    match p.rfind('/') {
        Some(0) | None => "/".to_string(),
        Some(i) => p[..i].to_string(),
    }
}

/// Resolves `.`, `..` and repeated slashes of an image path lexically; `..` stops at `/`.
fn normalize_image(p: &str) -> String {
    let mut parts: Vec<&str> = Vec::new();
    for c in p.split('/') {
        match c {
            "" | "." => {}
            ".." => {
                parts.pop();
            }
            c => parts.push(c),
        }
    }
    format!("/{}", parts.join("/"))
}

/// Resolves every symlink of `path`, treating absolute link targets as relative to `sysroot`
/// (a sysroot's `/lib64/ld-linux-x86-64.so.2 -> /lib/...` must not escape to the host's).
fn real_path(sysroot: &Path, path: &Path) -> Result<PathBuf> {
    let sysroot = fs::canonicalize(sysroot).map_err(|source| ElfError::Io {
        path: sysroot.to_path_buf(),
        source,
    })?;
    let io_err = |source| ElfError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut pending: VecDeque<std::ffi::OsString> = VecDeque::new();
    let start = if path.is_absolute() {
        path.to_path_buf()
    } else {
        std::env::current_dir().map_err(io_err)?.join(path)
    };
    for c in start.components() {
        if let Component::Normal(s) = c {
            pending.push_back(s.to_os_string());
        } else if let Component::ParentDir = c {
            pending.push_back("..".into());
        }
    }
    // Inside the sysroot when the path started there; otherwise a plain host path.
    let (root, mut cur) = match start.strip_prefix(&sysroot) {
        Ok(rel) if sysroot != Path::new("/") => {
            pending.clear();
            for c in rel.components() {
                match c {
                    Component::Normal(s) => pending.push_back(s.to_os_string()),
                    Component::ParentDir => pending.push_back("..".into()),
                    _ => {}
                }
            }
            (sysroot.clone(), sysroot.clone())
        }
        _ => (PathBuf::from("/"), PathBuf::from("/")),
    };
    let mut links = 0;
    while let Some(c) = pending.pop_front() {
        if c == ".." {
            if cur != root {
                cur.pop();
            }
            continue;
        }
        let next = cur.join(&c);
        let meta = fs::symlink_metadata(&next).map_err(|source| ElfError::Io {
            path: next.clone(),
            source,
        })?;
        if !meta.file_type().is_symlink() {
            cur = next;
            continue;
        }
        links += 1;
        if links > 40 {
            return Err(ElfError::SymlinkLoop {
                path: path.to_path_buf(),
            });
        }
        let target = fs::read_link(&next).map_err(io_err)?;
        let mut comps: Vec<std::ffi::OsString> = Vec::new();
        if target.is_absolute() {
            cur = root.clone();
        }
        for t in target.components() {
            match t {
                Component::Normal(s) => comps.push(s.to_os_string()),
                Component::ParentDir => comps.push("..".into()),
                _ => {}
            }
        }
        for s in comps.into_iter().rev() {
            pending.push_front(s);
        }
    }
    Ok(cur)
}

/// The library directories of `/etc/ld.so.conf` inside `sysroot`, following `include`s.
fn read_ld_so_conf(sysroot: &Path) -> Vec<String> {
    let mut dirs = Vec::new();
    let mut seen = HashSet::new();
    read_conf_file(sysroot, "/etc/ld.so.conf", &mut dirs, &mut seen, 0);
    dirs
}

fn read_conf_file(
    sysroot: &Path,
    file: &str,
    dirs: &mut Vec<String>,
    seen: &mut HashSet<String>,
    depth: u32,
) {
    if depth > 8 || !seen.insert(file.to_string()) {
        return;
    }
    let Ok(text) = fs::read_to_string(in_sysroot(sysroot, file)) else {
        return;
    };
    let conf_dir = image_parent(file);
    for line in text.lines() {
        let line = line.split('#').next().unwrap_or("").trim();
        if line.is_empty() || line.starts_with("hwcap ") {
            continue;
        }
        if let Some(rest) = line.strip_prefix("include") {
            if !rest.starts_with(char::is_whitespace) {
                continue;
            }
            for pattern in rest.split_whitespace() {
                let pattern = if pattern.starts_with('/') {
                    pattern.to_string()
                } else {
                    format!("{conf_dir}/{pattern}")
                };
                for inc in glob_files(sysroot, &pattern) {
                    read_conf_file(sysroot, &inc, dirs, seen, depth + 1);
                }
            }
            continue;
        }
        for dir in line.split([' ', '\t', ':', ',']).filter(|d| !d.is_empty()) {
            // `dir=TYPE` is an old libc5 syntax.
            let dir = dir.split('=').next().unwrap_or(dir);
            if dir.starts_with('/') {
                let dir = normalize_image(dir);
                if !dirs.contains(&dir) {
                    dirs.push(dir);
                }
            }
        }
    }
}

/// The files matching `pattern` (wildcards in the last component only), sorted.
fn glob_files(sysroot: &Path, pattern: &str) -> Vec<String> {
    let dir = image_parent(pattern);
    let name_pat = pattern.rsplit('/').next().unwrap_or("");
    let Ok(entries) = fs::read_dir(in_sysroot(sysroot, &dir)) else {
        return Vec::new();
    };
    let mut out: Vec<String> = entries
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| wildcard_match(name_pat.as_bytes(), n.as_bytes()))
        .map(|n| crate::tree::join(&dir, &n))
        .collect();
    out.sort();
    out
}

/// Shell-style matching of `*` and `?` (what ld.so.conf includes use).
fn wildcard_match(pat: &[u8], s: &[u8]) -> bool {
    match (pat.first(), s.first()) {
        (None, None) => true,
        (Some(b'*'), _) => {
            wildcard_match(&pat[1..], s) || (!s.is_empty() && wildcard_match(pat, &s[1..]))
        }
        (Some(b'?'), Some(_)) => wildcard_match(&pat[1..], &s[1..]),
        (Some(a), Some(b)) if a == b => wildcard_match(&pat[1..], &s[1..]),
        _ => false,
    }
}

/// Adds `binary` (mode 0755) at `binary_image_path`, its interpreter (0755) and its libraries
/// (0644) to `tree`, and returns the closure.
pub fn add_with_closure(
    tree: &mut Tree,
    binary: &Path,
    binary_image_path: &str,
    opts: &ClosureOptions,
) -> Result<Closure> {
    let closure = resolve_closure(binary, binary_image_path, opts)?;
    tree.add_host_file(binary_image_path, binary, 0o755)?;
    if let Some(interp) = &closure.interpreter {
        tree.add_host_file(&interp.image_path, &interp.host_path, 0o755)?;
    }
    for lib in &closure.libraries {
        tree.add_host_file(&lib.image_path, &lib.host_path, 0o644)?;
    }
    Ok(closure)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    fn cc(args: &[&str], cwd: &Path) {
        let out = Command::new("cc")
            .args(args)
            .current_dir(cwd)
            .output()
            .expect("cc must be installed");
        assert!(
            out.status.success(),
            "cc {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    fn write(dir: &Path, name: &str, text: &str) {
        fs::write(dir.join(name), text).unwrap();
    }

    fn host_opts() -> ClosureOptions {
        ClosureOptions::default()
    }

    fn names(c: &Closure) -> Vec<&str> {
        c.libraries.iter().map(|l| l.name.as_str()).collect()
    }

    #[test]
    fn dynamic_program_with_libm_and_pthread() {
        let dir = tempfile::tempdir().unwrap();
        write(
            dir.path(),
            "m.c",
            "#include <math.h>\n#include <pthread.h>\n#include <stdio.h>\n\
             static void *f(void *a) { return a; }\n\
             int main(int c, char **v) { pthread_t t; pthread_create(&t, 0, f, 0); \
             pthread_join(t, 0); printf(\"%f\\n\", cos((double)c)); return 0; }\n",
        );
        cc(
            &["-o", "m", "m.c", "-Wl,--no-as-needed", "-lm", "-lpthread"],
            dir.path(),
        );
        let bin = dir.path().join("m");
        let info = inspect(&bin).unwrap();
        assert!(!info.is_static);
        assert!(info.needed.iter().any(|n| n == "libm.so.6"), "{info:?}");

        let c = resolve_closure(&bin, "/app/m", &host_opts()).unwrap();
        let interp = c
            .interpreter
            .as_ref()
            .expect("dynamic program has PT_INTERP");
        assert_eq!(Some(interp.image_path.clone()), info.interpreter);
        assert!(fs::symlink_metadata(&interp.host_path).unwrap().is_file());
        let n = names(&c);
        assert!(n.contains(&"libc.so.6"), "{n:?}");
        assert!(n.contains(&"libm.so.6"), "{n:?}");
        // The interpreter is not duplicated as libc's DT_NEEDED.
        let interp_base = interp.image_path.rsplit('/').next().unwrap();
        assert!(!n.contains(&interp_base), "{n:?}");
        let std = standard_dirs(Arch::host());
        for lib in &c.libraries {
            assert!(
                std.contains(&image_parent(&lib.image_path)),
                "{lib:?} should be in a standard directory"
            );
            assert!(lib.image_path.ends_with(&format!("/{}", lib.name)));
            assert!(fs::symlink_metadata(&lib.host_path).unwrap().is_file());
            assert_eq!(
                peek_machine(&lib.host_path).unwrap(),
                Some((Arch::host().elf_machine(), true))
            );
        }
        let mut sorted = c.libraries.clone();
        sorted.sort_by(|a, b| a.image_path.cmp(&b.image_path));
        sorted.dedup();
        assert_eq!(sorted, c.libraries);

        let mut tree = Tree::new();
        add_with_closure(&mut tree, &bin, "/app/m", &host_opts()).unwrap();
        assert!(matches!(
            tree.get("/app/m"),
            Some(crate::tree::Node::File { mode: 0o755, .. })
        ));
        assert!(tree.get(&interp.image_path).is_some());
        assert_eq!(tree.file_count(), 2 + c.libraries.len());
    }

    /// Builds `libfoo.so` into `<dir>/lib` and `hello` into `<dir>/bin` linked against it
    /// through `$ORIGIN/../lib`.
    fn origin_project(dir: &Path, new_dtags: bool) -> PathBuf {
        fs::create_dir_all(dir.join("lib")).unwrap();
        fs::create_dir_all(dir.join("bin")).unwrap();
        write(dir, "foo.c", "int foo(void) { return 42; }\n");
        write(
            dir,
            "hello.c",
            "int foo(void);\nint main(void) { return foo() == 42 ? 0 : 1; }\n",
        );
        cc(
            &[
                "-shared",
                "-fPIC",
                "-Wl,-soname,libfoo.so.1",
                "-o",
                "lib/libfoo.so.1",
                "foo.c",
            ],
            dir,
        );
        std::os::unix::fs::symlink("libfoo.so.1", dir.join("lib/libfoo.so")).unwrap();
        let dtags = if new_dtags {
            "-Wl,--enable-new-dtags"
        } else {
            "-Wl,--disable-new-dtags"
        };
        cc(
            &[
                "-o",
                "bin/hello",
                "hello.c",
                "-Llib",
                "-lfoo",
                "-Wl,-rpath,$ORIGIN/../lib",
                dtags,
            ],
            dir,
        );
        dir.join("bin/hello")
    }

    fn check_origin(new_dtags: bool) {
        let dir = tempfile::tempdir().unwrap();
        let bin = origin_project(dir.path(), new_dtags);
        let info = inspect(&bin).unwrap();
        let (used, unused) = if new_dtags {
            (&info.runpath, &info.rpath)
        } else {
            (&info.rpath, &info.runpath)
        };
        assert_eq!(used, &vec!["$ORIGIN/../lib".to_string()]);
        assert!(unused.is_empty());

        let c = resolve_closure(&bin, "/app/hello", &host_opts()).unwrap();
        let foo = c
            .libraries
            .iter()
            .find(|l| l.name == "libfoo.so.1")
            .expect("libfoo resolved");
        assert_eq!(foo.image_path, "/lib/libfoo.so.1");
        assert_eq!(
            foo.host_path,
            fs::canonicalize(dir.path().join("lib/libfoo.so.1")).unwrap()
        );
        assert!(names(&c).contains(&"libc.so.6"));

        // Deeper image placement keeps the same relative layout.
        let c = resolve_closure(&bin, "/opt/x/bin/hello", &host_opts()).unwrap();
        assert!(c
            .libraries
            .iter()
            .any(|l| l.image_path == "/opt/x/lib/libfoo.so.1"));

        fs::remove_file(dir.path().join("lib/libfoo.so.1")).unwrap();
        let err = resolve_closure(&bin, "/app/hello", &host_opts()).unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, ElfError::MissingLibrary { .. }), "{msg}");
        assert!(msg.contains("libfoo.so.1"), "{msg}");
        assert!(msg.contains(&bin.display().to_string()), "{msg}");
        assert!(msg.contains("--library-path"), "{msg}");
    }

    #[test]
    fn origin_rpath_library_is_found_and_placed() {
        check_origin(false);
    }

    #[test]
    fn origin_runpath_library_is_found_and_placed() {
        check_origin(true);
    }

    #[test]
    fn extra_library_path_lands_in_default_dir() {
        let dir = tempfile::tempdir().unwrap();
        let bin = origin_project(dir.path(), true);
        let moved = dir.path().join("elsewhere");
        fs::rename(dir.path().join("lib"), &moved).unwrap();
        assert!(resolve_closure(&bin, "/app/hello", &host_opts()).is_err());
        let opts = ClosureOptions {
            extra_library_paths: vec![moved.clone()],
            ..host_opts()
        };
        let c = resolve_closure(&bin, "/app/hello", &opts).unwrap();
        let foo = c
            .libraries
            .iter()
            .find(|l| l.name == "libfoo.so.1")
            .unwrap();
        let libc = c.libraries.iter().find(|l| l.name == "libc.so.6").unwrap();
        assert_eq!(
            image_parent(&foo.image_path),
            image_parent(&libc.image_path)
        );
    }

    #[test]
    fn static_program_has_empty_closure() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "s.c", "int main(void) { return 0; }\n");
        cc(&["-static", "-o", "s", "s.c"], dir.path());
        let bin = dir.path().join("s");
        assert!(inspect(&bin).unwrap().is_static);
        let c = resolve_closure(&bin, "/app/s", &host_opts()).unwrap();
        assert_eq!(c, Closure::default());
    }

    #[test]
    fn static_pie_program_is_static() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "s.c", "int main(void) { return 0; }\n");
        cc(&["-static-pie", "-o", "s", "s.c"], dir.path());
        let bin = dir.path().join("s");
        let info = inspect(&bin).unwrap();
        assert!(info.is_static, "{info:?}");
        assert!(resolve_closure(&bin, "/app/s", &host_opts())
            .unwrap()
            .libraries
            .is_empty());
    }

    #[test]
    fn non_elf_and_directory_are_rejected() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "script.sh", "#!/bin/sh\necho hi\n");
        let script = dir.path().join("script.sh");
        let err = resolve_closure(&script, "/app/s", &host_opts()).unwrap_err();
        assert!(matches!(err, ElfError::NotElf { .. }), "{err}");
        assert!(err.to_string().contains("script.sh"), "{err}");

        let err = resolve_closure(dir.path(), "/app/s", &host_opts()).unwrap_err();
        assert!(matches!(err, ElfError::IsDirectory { .. }), "{err}");
    }

    /// Compiles a program and patches its `e_machine` to aarch64.
    fn fake_aarch64(dir: &Path, name: &str) -> PathBuf {
        write(dir, "p.c", "int main(void) { return 0; }\n");
        cc(&["-o", name, "p.c"], dir);
        let path = dir.join(name);
        let mut bytes = fs::read(&path).unwrap();
        bytes[18..20].copy_from_slice(&goblin::elf::header::EM_AARCH64.to_le_bytes());
        fs::write(&path, bytes).unwrap();
        path
    }

    #[test]
    fn wrong_architecture_is_rejected() {
        let dir = tempfile::tempdir().unwrap();
        let bin = fake_aarch64(dir.path(), "p");
        let opts = ClosureOptions {
            arch: Arch::X86_64,
            ..host_opts()
        };
        let err = resolve_closure(&bin, "/app/p", &opts).unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, ElfError::WrongArch { .. }), "{msg}");
        assert!(msg.contains("aarch64") && msg.contains("x86_64"), "{msg}");
    }

    #[test]
    fn wrong_architecture_candidate_is_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let bin = origin_project(dir.path(), false);
        // A decoy of the wrong machine earlier in the search path.
        let decoy_dir = dir.path().join("decoy");
        fs::create_dir(&decoy_dir).unwrap();
        let decoy = fake_aarch64(dir.path(), "decoy/libfoo.so.1");
        assert_eq!(
            peek_machine(&decoy).unwrap().unwrap().0,
            goblin::elf::header::EM_AARCH64
        );
        let opts = ClosureOptions {
            extra_library_paths: vec![decoy_dir],
            ..host_opts()
        };
        // Move the real one out of $ORIGIN's reach, into a later extra path.
        let real_dir = dir.path().join("real");
        fs::rename(dir.path().join("lib"), &real_dir).unwrap();
        let mut opts2 = opts.clone();
        opts2.extra_library_paths.push(real_dir.clone());
        let c = resolve_closure(&bin, "/app/hello", &opts2).unwrap();
        let foo = c
            .libraries
            .iter()
            .find(|l| l.name == "libfoo.so.1")
            .unwrap();
        assert_eq!(
            foo.host_path,
            fs::canonicalize(real_dir.join("libfoo.so.1")).unwrap()
        );
        // With only the decoy, the library is missing.
        let err = resolve_closure(&bin, "/app/hello", &opts).unwrap_err();
        assert!(matches!(err, ElfError::MissingLibrary { .. }), "{err}");
    }

    #[test]
    fn sysroot_lookups_and_ld_so_conf() {
        // A fake sysroot holding libfoo in a directory named only by ld.so.conf.d, and an
        // absolute symlink that must resolve inside the sysroot.
        let proj = tempfile::tempdir().unwrap();
        let bin = origin_project(proj.path(), false);
        let root = tempfile::tempdir().unwrap();
        let r = root.path();
        fs::create_dir_all(r.join("etc/ld.so.conf.d")).unwrap();
        fs::create_dir_all(r.join("opt/foo/lib")).unwrap();
        fs::create_dir_all(r.join("real")).unwrap();
        write(
            r,
            "etc/ld.so.conf",
            "# comment\ninclude /etc/ld.so.conf.d/*.conf\n",
        );
        write(r, "etc/ld.so.conf.d/foo.conf", "/opt/foo/lib\n");
        write(r, "etc/ld.so.conf.d/skip.txt", "/nowhere\n");
        fs::copy(
            proj.path().join("lib/libfoo.so.1"),
            r.join("real/libfoo.so.1"),
        )
        .unwrap();
        std::os::unix::fs::symlink("/real/libfoo.so.1", r.join("opt/foo/lib/libfoo.so.1")).unwrap();
        fs::remove_dir_all(proj.path().join("lib")).unwrap();
        assert_eq!(read_ld_so_conf(r), vec!["/opt/foo/lib".to_string()]);

        let resolver = Resolver {
            opts: &ClosureOptions {
                sysroot: r.to_path_buf(),
                ..host_opts()
            },
            conf_dirs: read_ld_so_conf(r),
            std_dirs: standard_dirs(Arch::host()),
            default_dir: "/usr/lib".into(),
        };
        let info = inspect(&bin).unwrap();
        let objects = vec![Loaded {
            host_dir: parent(&bin),
            image_dir: "/app".into(),
            loader: None,
            display: bin.clone(),
            info,
        }];
        let (found, image_dir) = resolver.find(&objects, 0, "libfoo.so.1").unwrap();
        assert_eq!(found, r.join("opt/foo/lib/libfoo.so.1"));
        // Not a standard directory: lands where the guest's loader looks without a cache.
        assert_eq!(image_dir, "/usr/lib");
        let real = real_path(r, &found).unwrap();
        assert_eq!(real, fs::canonicalize(r.join("real/libfoo.so.1")).unwrap());
        // libc is not in this sysroot.
        let err = resolver.find(&objects, 0, "libc.so.6").unwrap_err();
        assert!(err.to_string().contains("/opt/foo/lib"), "{err}");
    }

    #[test]
    fn unsupported_tokens_are_rejected() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "p.c", "int main(void) { return 0; }\n");
        cc(&["-o", "p", "p.c", "-Wl,-rpath,/x/$LIB"], dir.path());
        let err = resolve_closure(&dir.path().join("p"), "/app/p", &host_opts()).unwrap_err();
        assert!(
            matches!(err, ElfError::UnsupportedToken { token: "$LIB", .. }),
            "{err}"
        );
    }

    #[test]
    fn helpers() {
        assert_eq!(normalize_image("/app/../lib"), "/lib");
        assert_eq!(normalize_image("/app/../../lib/./x"), "/lib/x");
        assert!(wildcard_match(b"*.conf", b"libc.conf"));
        assert!(!wildcard_match(b"*.conf", b"libc.conf.bak"));
        assert!(wildcard_match(b"a?c", b"abc"));
    }
}
