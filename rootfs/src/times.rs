//! The modification times an image's files carry.
//!
//! Every time derives from one epoch (`SOURCE_DATE_EPOCH` or what the packager chose), so the
//! same inputs give the same bytes. A regular file's time also depends on its content: it is
//! the epoch minus a content-derived offset of less than a day. So when one page of a site
//! changes, its time changes with it even when the epoch does not (a rebuild from the same
//! commit), and servers that derive validators from the time (nginx's `ETag` is mtime-size,
//! `Last-Modified`) stop answering 304 for the old page. No time is later than the epoch, as
//! the reproducible-builds specification asks. Directories, symlinks and devices carry the
//! epoch itself.

use crate::tree::FileSource;
use std::io::{self, Read};

/// The window of the content-derived offset: a day, so images built more than a day apart
/// from advancing epochs (commit times) always have later times than the earlier image's.
pub const CONTENT_WINDOW_SECS: u32 = 86_400;

/// The times of an image's files.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FileTimes {
    /// Seconds since 1970 (squashfs keeps 32 bits: until 2106). 0 gives every file time 0.
    pub epoch: u32,
}

impl FileTimes {
    /// The time of a directory, symlink or device, and of the filesystem itself.
    pub fn epoch(&self) -> u32 {
        self.epoch
    }

    /// The time of a regular file with `source`'s content (read once, streamed).
    pub fn file(&self, source: &FileSource) -> io::Result<u32> {
        if self.epoch == 0 {
            return Ok(0);
        }
        let mut hasher = xxhash_rust::xxh64::Xxh64::new(0);
        match source {
            FileSource::Bytes(bytes) => hasher.update(bytes),
            FileSource::Host(path) => {
                let mut file = std::fs::File::open(path)?;
                let mut buf = vec![0u8; 256 * 1024];
                loop {
                    match file.read(&mut buf)? {
                        0 => break,
                        n => hasher.update(&buf[..n]),
                    }
                }
            }
        }
        Ok(self.for_digest(hasher.digest()))
    }

    fn for_digest(&self, digest: u64) -> u32 {
        let offset = (digest % u64::from(CONTENT_WINDOW_SECS)) as u32;
        self.epoch.saturating_sub(offset)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn time(times: FileTimes, content: &[u8]) -> u32 {
        times.file(&FileSource::Bytes(content.into())).unwrap()
    }

    #[test]
    fn a_file_time_follows_its_content_and_never_passes_the_epoch() {
        let times = FileTimes {
            epoch: 1_700_000_000,
        };
        let v1 = time(times, b"<h1>release 1</h1>");
        let v2 = time(times, b"<h1>release 2</h1>");
        assert_ne!(v1, v2, "same size, other content: another time");
        assert_eq!(
            v1,
            time(times, b"<h1>release 1</h1>"),
            "same content, same time"
        );
        for t in [v1, v2] {
            assert!(
                t <= times.epoch && t > times.epoch - CONTENT_WINDOW_SECS,
                "{t}"
            );
        }
    }

    #[test]
    fn a_host_file_and_the_same_bytes_get_the_same_time() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("page.html");
        let content: Vec<u8> = (0..600_000u32).map(|i| (i % 251) as u8).collect();
        std::fs::write(&path, &content).unwrap();
        let times = FileTimes { epoch: 1_000_000 };
        assert_eq!(
            times.file(&FileSource::Host(path)).unwrap(),
            time(times, &content)
        );
    }

    #[test]
    fn epoch_zero_keeps_every_time_zero() {
        assert_eq!(time(FileTimes::default(), b"x"), 0);
        // An epoch under the window saturates rather than wrapping into the future.
        assert!(time(FileTimes { epoch: 5 }, b"x") <= 5);
    }
}
