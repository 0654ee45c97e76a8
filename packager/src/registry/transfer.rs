//! The blobs of a push or pull, moved on several threads at once, with one progress display
//! for all of them: a bar redrawn in place on a terminal, a line about once a second
//! otherwise.

use super::client::Client;
use crate::host::fs::human_size;
use anyhow::Result;
use std::io::Write;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Transfers at once: enough to fill a link that one TCP stream does not, few enough that a
/// registry does not take them for abuse.
pub(crate) const THREADS: usize = 4;

/// Transfers smaller than this in all get no progress lines.
const QUIET_BELOW: u64 = 1 << 20;

/// How progress is shown.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Display {
    /// One line on stderr (a terminal), redrawn in place.
    Bar,
    /// Lines through the progress callback, about one a second (or none, if it prints none).
    Lines,
}

/// Where progress lines go (`fuse: ...` on stderr, or nowhere with --json).
type Progress<'a> = &'a (dyn Fn(&str) + Sync);

/// How far the blobs of one push or pull have got.
pub(crate) struct Meter<'a> {
    /// `pushing` or `pulling`.
    verb: &'static str,
    sizes: Vec<AtomicU64>,
    done: Vec<AtomicU64>,
    started: Instant,
    display: Display,
    progress: Progress<'a>,
    /// Whether a bar is on the screen now (to clear before another line is printed).
    drawn: AtomicBool,
}

impl<'a> Meter<'a> {
    pub(crate) fn new(
        verb: &'static str,
        sizes: Vec<u64>,
        display: Display,
        progress: Progress<'a>,
    ) -> Meter<'a> {
        Meter {
            verb,
            done: sizes.iter().map(|_| AtomicU64::new(0)).collect(),
            sizes: sizes.into_iter().map(AtomicU64::new).collect(),
            started: Instant::now(),
            display,
            progress,
            drawn: AtomicBool::new(false),
        }
    }

    /// Transfer `i` has moved `bytes` of its blob (it may go back, when one starts again).
    pub(crate) fn set(&self, i: usize, bytes: u64) {
        let size = self.sizes[i].load(Ordering::Relaxed);
        self.done[i].store(bytes.min(size), Ordering::Relaxed);
    }

    /// Transfer `i` moved nothing after all (the registry mounted the blob).
    pub(crate) fn skip(&self, i: usize) {
        self.sizes[i].store(0, Ordering::Relaxed);
        self.done[i].store(0, Ordering::Relaxed);
    }

    fn total(&self) -> u64 {
        self.sizes.iter().map(|s| s.load(Ordering::Relaxed)).sum()
    }

    /// `pushing 3 blobs: 12.3 MB of 50.1 MB (10.2 MB/s)`.
    pub(crate) fn text(&self) -> String {
        let done: u64 = self.done.iter().map(|d| d.load(Ordering::Relaxed)).sum();
        let secs = self.started.elapsed().as_secs_f64().max(0.001);
        let n = self
            .sizes
            .iter()
            .filter(|s| s.load(Ordering::Relaxed) > 0)
            .count();
        format!(
            "{} {n} blob{}: {} of {} ({}/s)",
            self.verb,
            if n == 1 { "" } else { "s" },
            human_size(done),
            human_size(self.total()),
            human_size((done as f64 / secs) as u64)
        )
    }

    /// A line of its own, below the bar if one is drawn.
    pub(crate) fn say(&self, line: &str) {
        self.clear();
        (self.progress)(line);
    }

    fn clear(&self) {
        if self.drawn.swap(false, Ordering::Relaxed) {
            eprint!("\r\x1b[K");
        }
    }

    fn draw(&self) {
        let mut err = std::io::stderr().lock();
        // Cleared to the end of the line: the text may have got shorter.
        let _ = write!(err, "\rfuse: {}\x1b[K", self.text());
        let _ = err.flush();
        self.drawn.store(true, Ordering::Relaxed);
    }

    /// Runs `work` while the progress is shown; the final figures are a line of their own.
    pub(crate) fn run<T>(&self, work: impl FnOnce() -> T) -> T {
        if self.total() < QUIET_BELOW {
            return work();
        }
        let finished = AtomicBool::new(false);
        let result = std::thread::scope(|scope| {
            scope.spawn(|| {
                let every = match self.display {
                    Display::Bar => Duration::from_millis(200),
                    Display::Lines => Duration::from_secs(1),
                };
                let mut last = Instant::now();
                while !finished.load(Ordering::Relaxed) {
                    std::thread::sleep(Duration::from_millis(50));
                    if last.elapsed() < every || finished.load(Ordering::Relaxed) {
                        continue;
                    }
                    last = Instant::now();
                    match self.display {
                        Display::Bar => self.draw(),
                        Display::Lines => (self.progress)(&self.text()),
                    }
                }
            });
            let result = work();
            finished.store(true, Ordering::Relaxed);
            result
        });
        self.clear();
        if self.total() >= QUIET_BELOW {
            (self.progress)(&self.text());
        }
        result
    }
}

/// Runs `job(client, i)` for every `i` below `n` on up to [`THREADS`] threads, each with its
/// own clone of `client`: the results in the order of `i` (whatever order they finished in),
/// and the clones (for their counters). After an error no job starts; the error of the first
/// failed `i` is the answer.
pub(crate) fn parallel<T: Send>(
    client: &Client,
    n: usize,
    job: impl Fn(&mut Client, usize) -> Result<T> + Sync,
) -> (Result<Vec<T>>, Vec<Client>) {
    let next = AtomicUsize::new(0);
    let failed = AtomicBool::new(false);
    let results: Mutex<Vec<Option<Result<T>>>> = Mutex::new((0..n).map(|_| None).collect());
    let clients = std::thread::scope(|scope| {
        let workers: Vec<_> = (0..THREADS.min(n))
            .map(|_| {
                let mut client = client.clone();
                let (next, failed, results, job) = (&next, &failed, &results, &job);
                scope.spawn(move || {
                    while !failed.load(Ordering::Relaxed) {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        if i >= n {
                            break;
                        }
                        let result = job(&mut client, i);
                        if result.is_err() {
                            failed.store(true, Ordering::Relaxed);
                        }
                        results.lock().unwrap_or_else(|e| e.into_inner())[i] = Some(result);
                    }
                    client
                })
            })
            .collect();
        workers
            .into_iter()
            .map(|w| w.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
            .collect()
    });
    let results = results.into_inner().unwrap_or_else(|e| e.into_inner());
    let mut done = Vec::with_capacity(n);
    for result in results {
        match result {
            Some(Ok(t)) => done.push(t),
            Some(Err(e)) => return (Err(e), clients),
            // Not started, after another's error: that error comes first (lower `i` failed
            // first or is still in this list before this one).
            None => continue,
        }
    }
    (Ok(done), clients)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_meter_sums_its_transfers() {
        let meter = Meter::new(
            "pushing",
            vec![10_000_000, 2_300_000],
            Display::Lines,
            &|_| {},
        );
        meter.set(0, 4_000_000);
        meter.set(1, 9_000_000);
        let text = meter.text();
        assert!(
            text.starts_with("pushing 2 blobs: 6.3 MB of 12.3 MB ("),
            "{text}"
        );
        assert!(text.ends_with("/s)"), "{text}");
        // A transfer that starts again goes back.
        meter.set(0, 0);
        assert!(meter.text().starts_with("pushing 2 blobs: 2.3 MB of"));
        // A blob the registry mounted is none of the transfer.
        meter.skip(1);
        assert!(
            meter.text().starts_with("pushing 1 blob: 0 B of 10.0 MB"),
            "{}",
            meter.text()
        );
    }
}
