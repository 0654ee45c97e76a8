//! The guest's serial console: the app's stdout/stderr, passed on as is.
//!
//! Nothing on the console decides anything: the exit status comes through a port only the
//! init holds (see `vm::session`), a kernel panic from QEMU's pvpanic device. The console is
//! only split into lines for error reports (its tail) and to name a panic's reason. Console
//! lines end in `\r\n` (the tty's ONLCR); the `\r` is dropped.

use std::collections::VecDeque;

/// How the kernel begins its panic message (at KERN_EMERG, so it shows even with `quiet`).
/// Only used to say why, once QEMU has said that the guest panicked.
const PANIC_PREFIX: &str = "Kernel panic - not syncing: ";
/// Longest line kept in memory before it is passed on as is: an app printing megabytes
/// without a newline must not grow the buffer without bound.
const MAX_LINE: usize = 64 * 1024;

/// Something the console said.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConsoleEvent {
    /// Output of the guest, to pass on as is (a complete line ends in `\n`).
    Output(Vec<u8>),
}

/// Incremental parser of the console byte stream.
#[derive(Debug)]
pub struct ConsoleParser {
    /// The current, not yet complete line.
    partial: Vec<u8>,
    /// How many bytes of `partial` were already passed on by [`ConsoleParser::flush_partial`].
    emitted: usize,
    /// The reason of the last "Kernel panic - not syncing" line: after a real panic, the
    /// kernel's (the app may print such lines too, but nothing runs after the kernel's).
    panic_reason: Option<String>,
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
            panic_reason: None,
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

    /// Passes on the current line so far, so prompts and progress output the app leaves
    /// unterminated show up live.
    pub fn flush_partial(&mut self) -> Vec<ConsoleEvent> {
        if self.firmware_until.is_some() {
            return Vec::new();
        }
        let pending = &self.partial[self.emitted..];
        // Keep back a `\r` that may precede `\n`.
        let mut keep = pending.len();
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

    /// The reason in the last `Kernel panic - not syncing: REASON` line. Says why only once
    /// QEMU said that the guest panicked: any program can print such a line.
    pub fn panic_reason(&self) -> Option<&str> {
        self.panic_reason.as_deref()
    }

    /// The last console lines (kernel messages included), oldest first; the current
    /// incomplete line last.
    pub fn tail(&self) -> Vec<String> {
        let mut lines: Vec<String> = self.tail.iter().cloned().collect();
        if !self.partial.is_empty() {
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
        if let Some(at) = text.find(PANIC_PREFIX) {
            self.panic_reason = Some(text[at + PANIC_PREFIX.len()..].trim().to_string());
        }
        self.remember(text);

        if let Some(last) = self.firmware_until {
            if find(&line, last).is_some() {
                self.firmware_until = None;
            }
            return;
        }
        let mut body = &line[..];
        let terminated = body.ends_with(b"\n");
        if terminated {
            body = &body[..body.len() - 1];
            while body.ends_with(b"\r") {
                body = &body[..body.len() - 1];
            }
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

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn output(events: &[ConsoleEvent]) -> Vec<u8> {
        let mut out = Vec::new();
        for ConsoleEvent::Output(b) in events {
            out.extend_from_slice(b);
        }
        out
    }

    #[test]
    fn test_lines_pass_through() {
        let mut p = ConsoleParser::new(20);
        let ev = p.feed(b"hello\r\nworld\r\n");
        assert_eq!(output(&ev), b"hello\nworld\n");
        assert_eq!(p.tail().last().unwrap(), "world");
    }

    /// What the init once printed as its exit line is app output like any other now.
    #[test]
    fn test_former_exit_marker_is_plain_output() {
        let mut p = ConsoleParser::new(20);
        let ev = p.feed(b"<<fuse:exit 0>>\r\nlater\r\nno newline<<fuse:exit 3>>");
        let mut all = output(&ev);
        all.extend(output(&p.flush_partial()));
        assert_eq!(all, b"<<fuse:exit 0>>\nlater\nno newline<<fuse:exit 3>>");
    }

    #[test]
    fn test_flush_partial_keeps_cr() {
        let mut p = ConsoleParser::new(20);
        p.feed(b"prompt> \r");
        assert_eq!(output(&p.flush_partial()), b"prompt> ");
        assert!(p.has_partial());
        assert_eq!(output(&p.feed(b"\n")), b"\n");
        p.feed(b"a <b> <<fuse:ex");
        assert_eq!(output(&p.flush_partial()), b"a <b> <<fuse:ex");
    }

    #[test]
    fn test_panic_reason_and_tail() {
        let mut p = ConsoleParser::new(2);
        let ev = p.feed(b"one\r\nKernel panic - not syncing: fake\r\ntwo\r\n");
        // Passed on like any line: only QEMU says whether the guest panicked.
        assert_eq!(output(&ev), b"one\nKernel panic - not syncing: fake\ntwo\n");
        assert_eq!(p.panic_reason(), Some("fake"));
        p.feed(b"[    1.2] Kernel panic - not syncing: Attempted to kill init!\r\nhalf");
        assert_eq!(p.panic_reason(), Some("Attempted to kill init!"));
        assert_eq!(
            p.tail(),
            vec![
                "[    1.2] Kernel panic - not syncing: Attempted to kill init!",
                "half"
            ]
        );
    }

    #[test]
    fn test_firmware_output_is_hidden_until_its_last_line() {
        let mut p = ConsoleParser::new(10).skip_firmware_output(EDK2_LAST_LINE);
        let mut events = p.feed(b"\x1b[2J\x1b[01;01HBdsDxe: loading Boot0001\r\n");
        events.extend(p.flush_partial());
        events.extend(p.feed(b"BdsDxe: starting Boot0001 \"UEFI Misc Device\"\r\nhello\r\n"));
        assert_eq!(output(&events), b"hello\n");
        assert!(p.tail()[0].contains("BdsDxe: loading"), "{:?}", p.tail());
    }

    #[test]
    fn test_long_line_is_passed_on() {
        let mut p = ConsoleParser::new(2);
        let ev = p.feed(&vec![b'x'; MAX_LINE + 10]);
        assert_eq!(output(&ev).len(), MAX_LINE);
    }
}
