//! Parsing of the guest's serial console.
//!
//! The console carries the app's stdout/stderr and, at the very end, one line
//! `<<fuse:exit N>>` written by the init. The marker may follow output the app left
//! unterminated, so it is searched anywhere in a line, and the text before it is still
//! app output. Console lines end in `\r\n` (the tty's ONLCR); the `\r` is dropped.

use std::collections::VecDeque;

/// What the init writes, followed by the exit code and `>>`.
const EXIT_MARKER: &[u8] = b"<<fuse:exit ";
/// What the kernel prints when it panics (at KERN_EMERG, so it shows even with `quiet`).
const PANIC_MARKER: &str = "Kernel panic";
/// Longest line kept in memory before it is passed on as is: an app printing megabytes
/// without a newline must not grow the buffer without bound.
const MAX_LINE: usize = 64 * 1024;

/// Something the console said.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConsoleEvent {
    /// Output of the guest, to pass on as is (a complete line ends in `\n`).
    Output(Vec<u8>),
    /// The init reported the app's exit code.
    Exit(u8),
}

/// Incremental parser of the console byte stream.
#[derive(Debug)]
pub struct ConsoleParser {
    /// The current, not yet complete line.
    partial: Vec<u8>,
    /// How many bytes of `partial` were already passed on by [`ConsoleParser::flush_partial`].
    emitted: usize,
    /// The exit code, once the marker was seen.
    exit: Option<u8>,
    /// The first "Kernel panic" line, once seen.
    panic_line: Option<String>,
    /// The last lines, kernel messages included, for error reports.
    tail: VecDeque<String>,
    tail_len: usize,
    /// While set, lines are the firmware's (a UEFI boot), kept for error reports but not passed
    /// on, until a line holding this text (the firmware's last) has passed.
    firmware_until: Option<&'static [u8]>,
}

/// The last line OVMF and AAVMF (EDK2's boot manager) print before starting the boot loader.
pub const EDK2_LAST_LINE: &[u8] = b"BdsDxe: starting ";

impl ConsoleParser {
    /// A parser that keeps the last `tail_len` lines for error reports.
    pub fn new(tail_len: usize) -> Self {
        ConsoleParser {
            partial: Vec::new(),
            emitted: 0,
            exit: None,
            panic_line: None,
            tail: VecDeque::with_capacity(tail_len),
            tail_len,
            firmware_until: None,
        }
    }

    /// Hides the firmware's output (screen clears, boot manager lines) up to and including the
    /// line holding `last`: the console then carries only the app's output, as with direct boot.
    pub fn skip_firmware_output(mut self, last: &'static [u8]) -> Self {
        self.firmware_until = Some(last);
        self
    }

    /// Feeds console bytes; returns what they complete.
    pub fn feed(&mut self, bytes: &[u8]) -> Vec<ConsoleEvent> {
        let mut events = Vec::new();
        for &b in bytes {
            self.partial.push(b);
            if b == b'\n' || self.partial.len() - self.emitted >= MAX_LINE {
                self.end_line(&mut events);
            }
        }
        events
    }

    /// Passes on the part of the current line that cannot be the start of the exit marker,
    /// so prompts and progress output the app leaves unterminated show up live.
    pub fn flush_partial(&mut self) -> Vec<ConsoleEvent> {
        if self.exit.is_some() || self.firmware_until.is_some() {
            return Vec::new();
        }
        let pending = &self.partial[self.emitted..];
        // Keep back what could still become the marker, and a `\r` that may precede `\n`.
        let mut keep = possible_marker_start(pending);
        while keep > 0 && pending[keep - 1] == b'\r' {
            keep -= 1;
        }
        if keep == 0 {
            return Vec::new();
        }
        let out = pending[..keep].to_vec();
        self.emitted += keep;
        vec![ConsoleEvent::Output(out)]
    }

    /// Whether part of the current line is held back.
    pub fn has_partial(&self) -> bool {
        self.partial.len() > self.emitted
    }

    /// The exit code reported by the init, if it was.
    pub fn exit_code(&self) -> Option<u8> {
        self.exit
    }

    /// Whether the kernel panicked.
    pub fn panicked(&self) -> bool {
        self.panic_line.is_some()
    }

    /// The kernel's panic message (`Kernel panic - not syncing: ...`), if it panicked.
    pub fn panic_line(&self) -> Option<&str> {
        self.panic_line.as_deref()
    }

    /// The last console lines (kernel messages included), oldest first; the current
    /// incomplete line last. After a kernel panic, the lines up to the panic message: what
    /// led to it says more than the register dump after it.
    pub fn tail(&self) -> Vec<String> {
        let mut lines: Vec<String> = self.tail.iter().cloned().collect();
        if !self.partial.is_empty() && self.panic_line.is_none() {
            lines.push(clean(&self.partial));
            if lines.len() > self.tail_len {
                lines.remove(0);
            }
        }
        lines
    }

    fn end_line(&mut self, events: &mut Vec<ConsoleEvent>) {
        let line = std::mem::take(&mut self.partial);
        let emitted = std::mem::replace(&mut self.emitted, 0);
        let text = clean(&line);
        if self.panic_line.is_none() {
            if text.contains(PANIC_MARKER) {
                self.panic_line = Some(text.trim().to_string());
            }
            self.remember(text);
        }

        if self.exit.is_some() {
            // After the marker only the kernel speaks (e.g. "reboot: Power down").
            return;
        }
        if let Some(last) = self.firmware_until {
            // The exit marker always counts, even if the firmware's last line never came.
            if find_exit_marker(&line).is_none() {
                if find(&line, last).is_some() {
                    self.firmware_until = None;
                }
                return;
            }
            self.firmware_until = None;
        }
        let mut body = &line[..];
        let terminated = body.ends_with(b"\n");
        if terminated {
            body = &body[..body.len() - 1];
            while body.ends_with(b"\r") {
                body = &body[..body.len() - 1];
            }
        }
        if let Some((at, code)) = find_exit_marker(body) {
            if at > emitted {
                events.push(ConsoleEvent::Output(body[emitted..at].to_vec()));
            }
            self.exit = Some(code);
            events.push(ConsoleEvent::Exit(code));
            return;
        }
        let mut out = body.get(emitted..).unwrap_or_default().to_vec();
        if terminated {
            out.push(b'\n');
        }
        if !out.is_empty() {
            events.push(ConsoleEvent::Output(out));
        }
    }

    fn remember(&mut self, line: String) {
        if self.tail_len == 0 {
            return;
        }
        if self.tail.len() == self.tail_len {
            self.tail.pop_front();
        }
        self.tail.push_back(line);
    }
}

/// A console line as text for reports: lossy UTF-8, without line ending.
fn clean(line: &[u8]) -> String {
    let s = String::from_utf8_lossy(line);
    s.trim_end_matches(['\r', '\n']).to_string()
}

/// Where a complete exit marker is in `line`, and its code.
fn find_exit_marker(line: &[u8]) -> Option<(usize, u8)> {
    let mut from = 0;
    while let Some(pos) = find(&line[from..], EXIT_MARKER) {
        let at = from + pos;
        let rest = &line[at + EXIT_MARKER.len()..];
        let digits = rest.iter().take_while(|b| b.is_ascii_digit()).count();
        if (1..=3).contains(&digits) && rest[digits..].starts_with(b">>") {
            let n: u32 = std::str::from_utf8(&rest[..digits]).ok()?.parse().ok()?;
            if let Ok(code) = u8::try_from(n) {
                return Some((at, code));
            }
        }
        from = at + 1;
    }
    None
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// Length of the prefix of `pending` that cannot be part of an exit marker: everything up
/// to the first `<` from which the rest could still grow into `<<fuse:exit N>>`.
fn possible_marker_start(pending: &[u8]) -> usize {
    for start in 0..pending.len() {
        if pending[start] != b'<' {
            continue;
        }
        let rest = &pending[start..];
        let head = rest.len().min(EXIT_MARKER.len());
        if rest[..head] != EXIT_MARKER[..head] {
            continue;
        }
        // The fixed part matched so far; the tail must look like `digits` then `>` or `>>`.
        let tail = &rest[head..];
        let digits = tail.iter().take_while(|b| b.is_ascii_digit()).count();
        let after = &tail[digits..];
        if digits <= 3 && (after.is_empty() || after == b">") {
            return start;
        }
    }
    pending.len()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn output(events: &[ConsoleEvent]) -> Vec<u8> {
        let mut out = Vec::new();
        for e in events {
            if let ConsoleEvent::Output(b) = e {
                out.extend_from_slice(b);
            }
        }
        out
    }

    #[test]
    fn test_lines_and_exit() {
        let mut p = ConsoleParser::new(20);
        let ev = p.feed(b"hello\r\nworld\r\n<<fuse:exit 3>>\r\nreboot: Power down\r\n");
        assert_eq!(output(&ev), b"hello\nworld\n");
        assert!(ev.contains(&ConsoleEvent::Exit(3)));
        assert_eq!(p.exit_code(), Some(3));
        assert_eq!(p.tail().last().unwrap(), "reboot: Power down");
    }

    #[test]
    fn test_marker_after_unterminated_output() {
        let mut p = ConsoleParser::new(20);
        let ev = p.feed(b"no newline<<fuse:exit 0>>\r\n");
        assert_eq!(
            ev,
            vec![
                ConsoleEvent::Output(b"no newline".to_vec()),
                ConsoleEvent::Exit(0)
            ]
        );
    }

    #[test]
    fn test_marker_split_across_reads() {
        let mut p = ConsoleParser::new(20);
        let mut ev = p.feed(b"abc<<fuse:ex");
        ev.extend(p.flush_partial());
        assert_eq!(output(&ev), b"abc");
        ev = p.feed(b"it 25");
        ev.extend(p.flush_partial());
        assert!(ev.is_empty());
        ev = p.feed(b"5>>\r\n");
        assert_eq!(ev, vec![ConsoleEvent::Exit(255)]);
    }

    #[test]
    fn test_flush_partial_keeps_cr_and_non_markers_pass() {
        let mut p = ConsoleParser::new(20);
        p.feed(b"prompt> \r");
        assert_eq!(output(&p.flush_partial()), b"prompt> ");
        assert!(p.has_partial());
        assert_eq!(output(&p.feed(b"\n")), b"\n");
        // `<` that cannot become the marker is not held back.
        p.feed(b"a <b> <<fusex");
        assert_eq!(output(&p.flush_partial()), b"a <b> <<fusex");
    }

    #[test]
    fn test_invalid_markers_are_output() {
        let mut p = ConsoleParser::new(20);
        let ev = p.feed(b"<<fuse:exit 256>>\n<<fuse:exit x>>\n");
        assert_eq!(output(&ev), b"<<fuse:exit 256>>\n<<fuse:exit x>>\n");
        assert_eq!(p.exit_code(), None);
    }

    #[test]
    fn test_output_after_marker_is_dropped() {
        let mut p = ConsoleParser::new(20);
        let ev = p.feed(b"<<fuse:exit 1>>\r\nlate\r\n");
        assert_eq!(ev, vec![ConsoleEvent::Exit(1)]);
        assert!(p.flush_partial().is_empty());
    }

    #[test]
    fn test_panic_and_tail() {
        let mut p = ConsoleParser::new(2);
        p.feed(b"one\r\ntwo\r\nKernel panic - not syncing: VFS\r\nCall Trace:\r\nhalf");
        assert!(p.panicked());
        assert_eq!(p.panic_line(), Some("Kernel panic - not syncing: VFS"));
        assert_eq!(p.tail(), vec!["two", "Kernel panic - not syncing: VFS"]);
        let mut p = ConsoleParser::new(2);
        p.feed(b"one\r\ntwo\r\nhalf");
        assert_eq!(p.tail(), vec!["two", "half"]);
    }

    #[test]
    fn test_firmware_output_is_hidden_until_its_last_line() {
        let mut p = ConsoleParser::new(10).skip_firmware_output(EDK2_LAST_LINE);
        let mut events = p.feed(b"\x1b[2J\x1b[01;01HBdsDxe: loading Boot0001\r\n");
        events.extend(p.flush_partial());
        events.extend(p.feed(b"BdsDxe: starting Boot0001 \"UEFI Misc Device\"\r\nhello\r\n"));
        events.extend(p.feed(b"<<fuse:exit 3>>\r\n"));
        assert_eq!(output(&events), b"hello\n");
        assert_eq!(p.exit_code(), Some(3));
        assert!(p.tail()[0].contains("BdsDxe: loading"), "{:?}", p.tail());
        // Without the firmware's last line, the exit marker still counts.
        let mut p = ConsoleParser::new(10).skip_firmware_output(EDK2_LAST_LINE);
        p.feed(b"something else\r\n<<fuse:exit 0>>\r\n");
        assert_eq!(p.exit_code(), Some(0));
    }

    #[test]
    fn test_long_line_is_passed_on() {
        let mut p = ConsoleParser::new(2);
        let ev = p.feed(&vec![b'x'; MAX_LINE + 10]);
        assert_eq!(output(&ev).len(), MAX_LINE);
    }
}
