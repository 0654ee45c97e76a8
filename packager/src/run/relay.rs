//! `fuse run --metadata-server HOST:PORT`: the guest's 169.254.169.254:80 (a cloud's instance
//! metadata service) leads to a server on the host. passt cannot forward a guest address to
//! the host, QEMU's slirp can (`guestfwd`, see `fuse_boot::vm::GuestForward`): it spawns a
//! command per guest connection with the connection as its stdin and stdout. That command is
//! fuse itself, `fuse __relay HOST:PORT` ([`relay`]), which copies bytes both ways.

use anyhow::{bail, Context, Result};
use fuse_boot::vm::GuestForward;
use std::fs::File;
use std::io::{ErrorKind, Read, Write};
use std::mem::ManuallyDrop;
use std::net::{Ipv4Addr, Shutdown, SocketAddrV4, TcpStream, ToSocketAddrs};
use std::os::fd::FromRawFd;
use std::path::Path;
use std::time::Duration;

/// Where the guest looks for a cloud's metadata service (EC2's IMDS, and others').
pub(crate) const METADATA_ADDR: SocketAddrV4 =
    SocketAddrV4::new(Ipv4Addr::new(169, 254, 169, 254), 80);
/// How long the relay tries to reach the server.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// The hidden subcommand QEMU runs per connection.
pub(crate) const RELAY_COMMAND: &str = "__relay";

/// Checks `--metadata-server HOST:PORT` (a port, and a host that resolves) before anything is
/// built or booted.
pub(crate) fn check_target(target: &str) -> Result<()> {
    let usage =
        || format!("Invalid --metadata-server '{target}': give HOST:PORT, e.g. 127.0.0.1:8080");
    let (host, port) = target.rsplit_once(':').with_context(usage)?;
    if host.is_empty() || port.parse::<u16>().ok().filter(|&p| p != 0).is_none() {
        bail!(usage());
    }
    let found = target
        .to_socket_addrs()
        .map(|mut a| a.next().is_some())
        .unwrap_or(false);
    if !found {
        bail!("--metadata-server {target}: cannot resolve {host}");
    }
    Ok(())
}

/// The guest forward of 169.254.169.254:80 to `target` through `fuse __relay`.
pub(crate) fn metadata_forward(target: &str) -> Result<GuestForward> {
    check_target(target)?;
    let exe = std::env::current_exe().context("Cannot find fuse's own executable")?;
    // As root, QEMU drops to nobody after start-up (see `fuse_boot::vm`), and spawns the relay
    // as nobody: it must be able to reach and run this executable.
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 && !others_can_run(&exe) {
        bail!(
            "--metadata-server: QEMU runs as nobody (fuse runs as root) and cannot run {} to relay the guest's connections: install fuse where every user can run it (e.g. /usr/local/bin)",
            exe.display()
        );
    }
    Ok(GuestForward {
        addr: METADATA_ADDR,
        command: relay_command(&exe, target),
    })
}

/// The command line QEMU runs per connection: `EXE __relay TARGET`, each word quoted.
fn relay_command(exe: &Path, target: &str) -> String {
    [&*exe.to_string_lossy(), RELAY_COMMAND, target]
        .map(shell_quote)
        .join(" ")
}

/// Whether a user with no claim on `path` (nobody) can execute it: the file and every directory
/// above it have the "other" execute bit.
fn others_can_run(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    let mode = |p: &Path| p.metadata().map(|m| m.permissions().mode()).unwrap_or(0);
    mode(path) & 0o001 != 0
        && path
            .ancestors()
            .skip(1)
            .filter(|p| !p.as_os_str().is_empty())
            .all(|dir| mode(dir) & 0o001 != 0)
}

/// `word` single-quoted for a POSIX shell (and GLib's `g_shell_parse_argv`, which QEMU splits
/// the command with).
fn shell_quote(word: &str) -> String {
    format!("'{}'", word.replace('\'', r"'\''"))
}

/// `fuse __relay HOST:PORT`: connects to `target` and copies stdin to it and its answer to
/// stdout until both directions end, then returns. Each direction's end is passed on (the
/// socket's write half shut down at stdin's end; stdout shut down, or closed, at the server's),
/// so a guest's HTTP client sees the server close. Writes nothing to stderr: QEMU connects
/// stderr to the guest's connection too (the caller points it at /dev/null).
pub(crate) fn relay(target: &str) -> Result<()> {
    let socket = connect(target)?;
    let mut to_server = socket.try_clone().context("Cannot clone the socket")?;
    // Unbuffered standard streams: bytes go through as they come.
    // SAFETY: fds 0 and 1 are open for the process's lifetime; stdin is never closed
    // (ManuallyDrop), stdout only once, below, after its last use.
    let mut stdin = ManuallyDrop::new(unsafe { File::from_raw_fd(0) });
    let upstream = std::thread::spawn(move || {
        let copied = std::io::copy(&mut *stdin, &mut to_server);
        let _ = to_server.shutdown(Shutdown::Write);
        copied
    });
    // SAFETY: see above; fd 1 is owned by `stdout` from here on.
    let mut stdout = unsafe { File::from_raw_fd(1) };
    let mut from_server = socket;
    let down = copy_all(&mut from_server, &mut stdout);
    // A socket (QEMU's end of the guest's connection, also our stdin and stderr) is shut down
    // for writing so the guest sees the end; a pipe is closed (dropped).
    // SAFETY: fd 1 is open (owned by `stdout`, dropped right after).
    unsafe { libc::shutdown(1, libc::SHUT_WR) };
    drop(stdout);
    let up = upstream.join();
    down.context("Cannot copy the server's answer")?;
    match up {
        // A server that closed before reading everything ended that direction too.
        Ok(Err(e)) if !matches!(e.kind(), ErrorKind::BrokenPipe | ErrorKind::ConnectionReset) => {
            Err(e).context("Cannot copy to the server")
        }
        Ok(_) => Ok(()),
        Err(_) => bail!("The relay's upstream copy panicked"),
    }
}

/// Copies until `from` ends; a reset by the server counts as its end.
fn copy_all(from: &mut TcpStream, to: &mut File) -> std::io::Result<()> {
    let mut buf = [0u8; 16 * 1024];
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) => return Ok(()),
            Ok(n) => n,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) if e.kind() == ErrorKind::ConnectionReset => return Ok(()),
            Err(e) => return Err(e),
        };
        to.write_all(&buf[..n])?;
    }
}

fn connect(target: &str) -> Result<TcpStream> {
    let addrs = target
        .to_socket_addrs()
        .with_context(|| format!("Cannot resolve {target}"))?;
    let mut last = None;
    for addr in addrs {
        match TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT) {
            Ok(stream) => return Ok(stream),
            Err(e) => last = Some(e),
        }
    }
    match last {
        Some(e) => Err(e).with_context(|| format!("Cannot connect to {target}")),
        None => bail!("{target} resolves to no address"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_are_checked() {
        check_target("127.0.0.1:8080").unwrap();
        check_target("localhost:80").unwrap();
        for bad in [
            "127.0.0.1",
            ":80",
            "127.0.0.1:0",
            "127.0.0.1:x",
            "127.0.0.1:70000",
        ] {
            let err = check_target(bad).unwrap_err().to_string();
            assert!(err.contains("give HOST:PORT"), "{bad}: {err}");
        }
        let err = check_target("no-such-host.invalid:80")
            .unwrap_err()
            .to_string();
        assert!(err.contains("cannot resolve no-such-host.invalid"), "{err}");
    }

    #[test]
    fn the_command_is_fuse_quoted_for_a_shell() {
        assert_eq!(shell_quote("/a b/it's"), r"'/a b/it'\''s'");
        assert_eq!(
            relay_command(Path::new("/opt/my tools/fuse"), "127.0.0.1:8080"),
            "'/opt/my tools/fuse' '__relay' '127.0.0.1:8080'"
        );
    }

    #[test]
    fn others_can_run_needs_every_directory() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let inner = dir.path().join("bin");
        std::fs::create_dir(&inner).unwrap();
        let exe = inner.join("fuse");
        std::fs::write(&exe, "").unwrap();
        std::fs::set_permissions(&exe, std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        // tempdir's parents (/tmp) are world-searchable.
        assert!(others_can_run(&exe));
        std::fs::set_permissions(&inner, std::fs::Permissions::from_mode(0o700)).unwrap();
        assert!(!others_can_run(&exe));
        std::fs::set_permissions(&inner, std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::set_permissions(&exe, std::fs::Permissions::from_mode(0o750)).unwrap();
        assert!(!others_can_run(&exe));
    }
}
