//! What every command prints besides its result.

/// Progress and notices: one `fuse: ` line each on stderr.
pub(super) fn progress_line(line: &str) {
    eprintln!("fuse: {line}");
}
