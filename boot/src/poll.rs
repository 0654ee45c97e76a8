//! Waiting with a deadline: probe something every `interval` until it gives an answer or
//! `timeout` has passed. The one polling loop of fuse; callers say what to probe, not how to
//! sleep.
//!
//! Both helpers probe at least once (also with a zero timeout), then sleep `interval` (never
//! past the deadline) between probes, and probe one last time at the deadline, so a condition
//! that becomes true just in time is seen.

use std::time::{Duration, Instant};

/// Calls `probe` until it returns `Some`, or `timeout` has passed (then `None`).
///
/// A probe that can also fail for good ends the wait early by returning
/// `Some(Err(..))`: `T` is then a `Result`.
pub fn wait_until<T>(
    timeout: Duration,
    interval: Duration,
    mut probe: impl FnMut() -> Option<T>,
) -> Option<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(answer) = probe() {
            return Some(answer);
        }
        let now = Instant::now();
        if now >= deadline {
            return None;
        }
        std::thread::sleep(interval.min(deadline - now));
    }
}

/// Calls `probe` until it succeeds, or `timeout` has passed: then the last error, which says
/// why the wait failed.
pub fn retry_until<T, E>(
    timeout: Duration,
    interval: Duration,
    mut probe: impl FnMut() -> Result<T, E>,
) -> Result<T, E> {
    let mut last = None;
    let success = wait_until(timeout, interval, || match probe() {
        Ok(value) => Some(value),
        Err(e) => {
            last = Some(e);
            None
        }
    });
    match (success, last) {
        (Some(value), _) => Ok(value),
        (None, Some(e)) => Err(e),
        (None, None) => unreachable!("wait_until probes at least once"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TICK: Duration = Duration::from_millis(5);

    #[test]
    fn test_answer_ends_the_wait() {
        let mut calls = 0;
        let answer = wait_until(Duration::from_secs(5), TICK, || {
            calls += 1;
            (calls == 3).then_some("ready")
        });
        assert_eq!(answer, Some("ready"));
        assert_eq!(calls, 3);
    }

    #[test]
    fn test_timeout_gives_none_after_probing_at_the_deadline() {
        let started = Instant::now();
        let timeout = Duration::from_millis(60);
        let mut last_probe = started;
        let answer: Option<()> = wait_until(timeout, Duration::from_millis(25), || {
            last_probe = Instant::now();
            None
        });
        assert_eq!(answer, None);
        assert!(started.elapsed() >= timeout);
        // The last probe was at the deadline, not one interval before it.
        assert!(last_probe.duration_since(started) >= timeout);
        assert!(started.elapsed() < Duration::from_secs(2));
    }

    #[test]
    fn test_zero_timeout_probes_once() {
        let mut calls = 0;
        let answer: Option<()> = wait_until(Duration::ZERO, TICK, || {
            calls += 1;
            None
        });
        assert_eq!((answer, calls), (None, 1));
        assert_eq!(retry_until(Duration::ZERO, TICK, || Ok::<_, ()>(7)), Ok(7));
    }

    #[test]
    fn test_an_error_answer_ends_the_wait_early() {
        let started = Instant::now();
        let answer: Option<Result<(), &str>> =
            wait_until(Duration::from_secs(30), TICK, || Some(Err("gave up")));
        assert_eq!(answer, Some(Err("gave up")));
        assert!(started.elapsed() < Duration::from_secs(1));
    }

    #[test]
    fn test_retry_until_gives_the_last_error() {
        let mut calls = 0;
        let result: Result<(), String> = retry_until(Duration::from_millis(30), TICK, || {
            calls += 1;
            Err(format!("attempt {calls}"))
        });
        assert_eq!(result, Err(format!("attempt {calls}")));
        assert!(calls >= 2);
        let mut calls = 0;
        let result = retry_until(Duration::from_secs(5), TICK, || {
            calls += 1;
            if calls < 4 {
                Err(calls)
            } else {
                Ok("up")
            }
        });
        assert_eq!(result, Ok("up"));
    }
}
