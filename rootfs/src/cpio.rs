//! A deterministic writer of `newc` cpio archives, the format the kernel unpacks as an
//! initramfs.
//!
//! Entries are written in path order (parents before children), with inode numbers assigned
//! sequentially, uid/gid 0 and mtime 0, so the same tree always gives the same bytes.

use std::io::{self, Read, Write};

use crate::tree::{Node, Tree};

const S_IFDIR: u32 = 0o040000;
const S_IFREG: u32 = 0o100000;
const S_IFLNK: u32 = 0o120000;
const S_IFCHR: u32 = 0o020000;
const TRAILER: &str = "TRAILER!!!";

/// Errors writing a cpio archive.
#[derive(Debug, thiserror::Error)]
pub enum CpioError {
    /// The archive could not be written.
    #[error("Cannot write the cpio archive")]
    Write(#[source] io::Error),
    /// A file's contents could not be read.
    #[error("Cannot read {source_desc} for {path} in the initramfs")]
    Read {
        path: String,
        source_desc: String,
        #[source]
        source: io::Error,
    },
    /// A file changed size between being measured and being copied.
    #[error(
        "{source_desc} changed while the initramfs was written ({path}): rebuild when it is stable"
    )]
    Changed { path: String, source_desc: String },
    /// newc stores sizes in 32 bits.
    #[error("{path} is {size} bytes, more than the 4 GiB a cpio newc entry can hold")]
    TooLarge { path: String, size: u64 },
}

/// Result of cpio operations.
pub type Result<T> = std::result::Result<T, CpioError>;

/// Writes `tree` as a `newc` cpio archive to `out`.
pub fn write_newc(tree: &Tree, out: &mut impl Write) -> Result<()> {
    let mut w = Counting { inner: out, n: 0 };
    for (ino, (path, node)) in (1u32..).zip(tree.iter()) {
        // The kernel and cpio want names relative to the archive root; the root itself is ".".
        let name = if path == "/" { "." } else { &path[1..] };
        match node {
            Node::Dir { mode } => {
                write_header(&mut w, ino, S_IFDIR | mode, 2, 0, (0, 0), name)?;
            }
            Node::Symlink { target } => {
                let size = target.len() as u32;
                write_header(&mut w, ino, S_IFLNK | 0o777, 1, size, (0, 0), name)?;
                w.write_all(target.as_bytes()).map_err(CpioError::Write)?;
                pad4(&mut w)?;
            }
            Node::CharDevice { major, minor, mode } => {
                write_header(&mut w, ino, S_IFCHR | mode, 1, 0, (*major, *minor), name)?;
            }
            Node::File { source, mode } => {
                let read_err = |source_err| CpioError::Read {
                    path: path.to_string(),
                    source_desc: source.describe(),
                    source: source_err,
                };
                let size = source.len().map_err(read_err)?;
                let size32 = u32::try_from(size).map_err(|_| CpioError::TooLarge {
                    path: path.to_string(),
                    size,
                })?;
                write_header(&mut w, ino, S_IFREG | mode, 1, size32, (0, 0), name)?;
                let mut reader = source.open().map_err(read_err)?.take(size + 1);
                // Copy by hand so read and write errors are told apart; reading one byte past
                // the size notices a file that grew.
                let mut buf = vec![0u8; 64 * 1024];
                let mut copied = 0u64;
                loop {
                    let n = match reader.read(&mut buf) {
                        Ok(0) => break,
                        Ok(n) => n,
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                        Err(e) => return Err(read_err(e)),
                    };
                    copied += n as u64;
                    if copied > size {
                        break;
                    }
                    w.write_all(&buf[..n]).map_err(CpioError::Write)?;
                }
                if copied != size {
                    return Err(CpioError::Changed {
                        path: path.to_string(),
                        source_desc: source.describe(),
                    });
                }
                pad4(&mut w)?;
            }
        }
    }
    write_header(&mut w, 0, 0, 1, 0, (0, 0), TRAILER)?;
    w.flush().map_err(CpioError::Write)
}

/// Writes one newc header and its name, padded to 4 bytes.
fn write_header<W: Write>(
    w: &mut Counting<W>,
    ino: u32,
    mode: u32,
    nlink: u32,
    size: u32,
    rdev: (u32, u32),
    name: &str,
) -> Result<()> {
    let namesize = name.len() as u32 + 1;
    // magic, ino, mode, uid, gid, nlink, mtime, filesize, devmajor, devminor, rdevmajor,
    // rdevminor, namesize, check.
    let header = format!(
        "070701{ino:08x}{mode:08x}{:08x}{:08x}{nlink:08x}{:08x}{size:08x}{:08x}{:08x}{:08x}{:08x}{namesize:08x}{:08x}",
        0, 0, 0, 0, 0, rdev.0, rdev.1, 0
    );
    debug_assert_eq!(header.len(), 110);
    w.write_all(header.as_bytes()).map_err(CpioError::Write)?;
    w.write_all(name.as_bytes()).map_err(CpioError::Write)?;
    w.write_all(&[0]).map_err(CpioError::Write)?;
    pad4(w)
}

fn pad4<W: Write>(w: &mut Counting<W>) -> Result<()> {
    let pad = (4 - (w.n % 4) as usize) % 4;
    w.write_all(&[0u8; 3][..pad]).map_err(CpioError::Write)
}

/// A writer that counts bytes, for newc's 4-byte alignment.
struct Counting<'a, W: Write> {
    inner: &'a mut W,
    n: u64,
}

impl<W: Write> Write for Counting<'_, W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.n += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;
    use std::os::unix::fs::PermissionsExt;
    use std::process::{Command, Stdio};

    fn sample_tree(host_dir: &std::path::Path) -> Tree {
        let host = host_dir.join("payload");
        fs::write(&host, b"from the host\n").unwrap();
        let mut t = Tree::new();
        t.add_bytes("/init", &b"#!/bin/sh\necho hi\n"[..], 0o755)
            .unwrap();
        t.add_host_file("/etc/payload", &host, 0o640).unwrap();
        t.add_bytes("/empty", &b""[..], 0o600).unwrap();
        t.add_bytes("/odd/abc", &b"12345"[..], 0o644).unwrap();
        t.add_symlink("/bin/sh", "../init").unwrap();
        t.add_dir("/secret", 0o700).unwrap();
        t.add_char_device("/dev/console", 5, 1, 0o600).unwrap();
        t
    }

    fn parse_header(h: &[u8]) -> Vec<u32> {
        assert_eq!(&h[..6], b"070701");
        (0..13)
            .map(|i| {
                let s = std::str::from_utf8(&h[6 + i * 8..14 + i * 8]).unwrap();
                u32::from_str_radix(s, 16).unwrap()
            })
            .collect()
    }

    /// (name, mode, nlink, uid, gid, mtime, ino, data) of one archive entry.
    type Entry = (String, u32, u32, u32, u32, u32, u32, Vec<u8>);

    /// Walks the archive and returns its entries, checking the trailer ends it.
    fn parse(archive: &[u8]) -> Vec<Entry> {
        let mut out = Vec::new();
        let mut off = 0;
        loop {
            let f = parse_header(&archive[off..off + 110]);
            let namesize = f[11] as usize;
            let name = std::str::from_utf8(&archive[off + 110..off + 110 + namesize - 1])
                .unwrap()
                .to_string();
            off = (off + 110 + namesize).next_multiple_of(4);
            let size = f[6] as usize;
            let data = archive[off..off + size].to_vec();
            off = (off + size).next_multiple_of(4);
            if name == TRAILER {
                assert_eq!(off, archive.len(), "trailer must end the archive");
                return out;
            }
            out.push((name, f[1], f[4], f[2], f[3], f[5], f[0], data));
        }
    }

    #[test]
    fn layout_is_sorted_rooted_and_deterministic() {
        let dir = tempfile::tempdir().unwrap();
        let t = sample_tree(dir.path());
        let mut a = Vec::new();
        write_newc(&t, &mut a).unwrap();
        let mut b = Vec::new();
        write_newc(&t, &mut b).unwrap();
        assert_eq!(a, b);
        assert_eq!(a.len() % 4, 0);

        let entries = parse(&a);
        let names: Vec<&str> = entries.iter().map(|e| e.0.as_str()).collect();
        assert_eq!(
            names,
            [
                ".",
                "bin",
                "bin/sh",
                "dev",
                "dev/console",
                "empty",
                "etc",
                "etc/payload",
                "init",
                "odd",
                "odd/abc",
                "secret"
            ]
        );
        for (i, (name, mode, nlink, uid, gid, mtime, ino, _)) in entries.iter().enumerate() {
            assert_eq!(*ino, i as u32 + 1, "{name}");
            assert_eq!((*uid, *gid, *mtime), (0, 0, 0), "{name}");
            let want_nlink = if mode & 0o170000 == S_IFDIR { 2 } else { 1 };
            assert_eq!(*nlink, want_nlink, "{name}");
        }
        let console = &entries[4];
        assert_eq!(console.1, S_IFCHR | 0o600);
        let raw = &a[a.windows(11).position(|w| w == b"dev/console").unwrap() - 110..];
        let f = parse_header(raw);
        assert_eq!((f[9], f[10]), (5, 1));
        assert_eq!(entries[2].7, b"../init");
        assert_eq!(entries[7].7, b"from the host\n");
    }

    #[test]
    fn extracts_with_gnu_cpio() {
        let dir = tempfile::tempdir().unwrap();
        let mut t = sample_tree(dir.path());
        // cpio cannot create device nodes when not root; check those by parsing instead.
        let mut t2 = Tree::new();
        for (p, n) in t.iter() {
            match n {
                Node::CharDevice { .. } | Node::Dir { .. } => {}
                Node::File { source, mode } => {
                    t2.add_bytes(p, source.read().unwrap(), *mode).unwrap()
                }
                Node::Symlink { target } => t2.add_symlink(p, target).unwrap(),
            }
        }
        t2.add_dir("/secret", 0o700).unwrap();
        t = t2;
        let mut archive = Vec::new();
        write_newc(&t, &mut archive).unwrap();

        let out = dir.path().join("out");
        fs::create_dir(&out).unwrap();
        let mut child = Command::new("cpio")
            .args(["-idv", "--no-absolute-filenames", "--quiet"])
            .current_dir(&out)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("cpio must be installed");
        child.stdin.take().unwrap().write_all(&archive).unwrap();
        let res = child.wait_with_output().unwrap();
        assert!(
            res.status.success(),
            "{}",
            String::from_utf8_lossy(&res.stderr)
        );

        for (p, n) in t.iter() {
            let host = out.join(&p[1..]);
            let meta = fs::symlink_metadata(&host).unwrap_or_else(|e| panic!("{p}: {e}"));
            match n {
                Node::File { source, mode } => {
                    assert_eq!(fs::read(&host).unwrap(), source.read().unwrap(), "{p}");
                    assert_eq!(meta.permissions().mode() & 0o7777, *mode, "{p}");
                }
                Node::Symlink { target } => {
                    assert_eq!(fs::read_link(&host).unwrap().to_str().unwrap(), target);
                }
                Node::Dir { mode } if p != "/" => {
                    assert!(meta.is_dir());
                    assert_eq!(meta.permissions().mode() & 0o7777, *mode, "{p}");
                }
                _ => {}
            }
        }
        assert_eq!(
            fs::metadata(out.join("secret"))
                .unwrap()
                .permissions()
                .mode()
                & 0o777,
            0o700
        );
    }

    #[test]
    fn vanished_host_file_is_reported() {
        let dir = tempfile::tempdir().unwrap();
        let host = dir.path().join("gone");
        fs::write(&host, b"x").unwrap();
        let mut t = Tree::new();
        t.add_host_file("/gone", &host, 0o644).unwrap();
        fs::remove_file(&host).unwrap();
        let err = write_newc(&t, &mut Vec::new()).unwrap_err();
        assert!(matches!(err, CpioError::Read { .. }), "{err}");
        assert!(err.to_string().contains("/gone"), "{err}");
    }
}
