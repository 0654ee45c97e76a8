//! A minimal QMP (QEMU Machine Protocol) client: just enough to press the VM's ACPI power
//! button (`system_powerdown`), which is how a fuse VM is asked to stop gracefully.
//!
//! The runner gives every VM `-qmp unix:PATH,server=on,wait=off`. In the guest, the ACPI power
//! button event goes to the kernel's tiny power button driver
//! (`CONFIG_ACPI_TINY_POWER_BUTTON_SIGNAL=15`), which sends SIGTERM to PID 1; the init forwards
//! it to the app and powers off when the app has exited.

use std::io::{self, BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use crate::poll::retry_until;

/// How long one QMP exchange may take: QEMU answers at once, or it is stuck.
const IO_TIMEOUT: Duration = Duration::from_secs(2);

/// Errors talking to QEMU's QMP socket.
#[derive(Debug, thiserror::Error)]
pub enum QmpError {
    #[error("Cannot connect to QEMU's QMP socket {path}")]
    Connect {
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("QMP I/O error")]
    Io(#[from] io::Error),
    #[error("QMP protocol error: {0}")]
    Protocol(String),
}

/// A connected QMP session, in command mode.
#[derive(Debug)]
pub(crate) struct Qmp {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl Qmp {
    /// Connects to `path`, retrying until `patience` has passed (QEMU creates the socket
    /// shortly after it starts), and negotiates capabilities.
    pub(crate) fn connect(path: &Path, patience: Duration) -> Result<Qmp, QmpError> {
        let stream = retry_until(patience, Duration::from_millis(20), || {
            UnixStream::connect(path)
        })
        .map_err(|source| QmpError::Connect {
            path: path.display().to_string(),
            source,
        })?;
        stream.set_read_timeout(Some(IO_TIMEOUT))?;
        stream.set_write_timeout(Some(IO_TIMEOUT))?;
        let writer = stream.try_clone()?;
        let mut qmp = Qmp {
            reader: BufReader::new(stream),
            writer,
        };
        let greeting = qmp.read_message()?;
        if greeting.get("QMP").is_none() {
            return Err(QmpError::Protocol(format!(
                "unexpected greeting {greeting}"
            )));
        }
        qmp.execute("qmp_capabilities")?;
        Ok(qmp)
    }

    /// Runs a command without arguments; returns its `return` value.
    pub(crate) fn execute(&mut self, command: &str) -> Result<serde_json::Value, QmpError> {
        self.execute_with(command, serde_json::Value::Null)
    }

    /// Runs a command with `arguments` (an object, or null for none).
    pub(crate) fn execute_with(
        &mut self,
        command: &str,
        arguments: serde_json::Value,
    ) -> Result<serde_json::Value, QmpError> {
        let mut request = serde_json::json!({ "execute": command });
        if !arguments.is_null() {
            request["arguments"] = arguments;
        }
        self.writer.write_all(format!("{request}\n").as_bytes())?;
        loop {
            let message = self.read_message()?;
            if let Some(value) = message.get("return") {
                return Ok(value.clone());
            }
            if let Some(error) = message.get("error") {
                return Err(QmpError::Protocol(format!("{command}: {error}")));
            }
            // Anything else is an asynchronous event: skip it.
        }
    }

    /// Presses the ACPI power button.
    pub(crate) fn system_powerdown(&mut self) -> Result<(), QmpError> {
        self.execute("system_powerdown").map(|_| ())
    }

    fn read_message(&mut self) -> Result<serde_json::Value, QmpError> {
        let mut line = String::new();
        if self.reader.read_line(&mut line)? == 0 {
            return Err(QmpError::Protocol("QEMU closed the connection".into()));
        }
        serde_json::from_str(&line)
            .map_err(|e| QmpError::Protocol(format!("not JSON ({e}): {}", line.trim())))
    }
}

/// Runs a human monitor command (`info usernet`, ...) and returns its text output.
pub fn human_monitor(path: &Path, command: &str) -> Result<String, QmpError> {
    let mut qmp = Qmp::connect(path, Duration::ZERO)?;
    let out = qmp.execute_with(
        "human-monitor-command",
        serde_json::json!({ "command-line": command }),
    )?;
    Ok(out.as_str().unwrap_or_default().to_string())
}

/// Whether `info usernet` output shows a TCP connection the guest accepted on `guest_port`
/// (a host-forwarded connection is `SYN_SENT` until the guest answers).
pub fn usernet_established(info: &str, guest_port: u16) -> bool {
    info.lines().any(|line| {
        let words: Vec<&str> = line.split_whitespace().collect();
        // Protocol[State] FD SrcAddr SrcPort DstAddr DstPort RecvQ SendQ
        words.len() >= 6 && words[0] == "TCP[ESTABLISHED]" && words[5] == guest_port.to_string()
    })
}

/// Connects to the VM's QMP socket and presses the power button.
pub(crate) fn powerdown(path: &Path, patience: Duration) -> Result<(), QmpError> {
    Qmp::connect(path, patience)?.system_powerdown()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixListener;

    /// A fake QEMU: greets, then answers each command, recording what was asked.
    #[test]
    fn test_powerdown_exchange() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("qmp.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let server = std::thread::spawn(move || {
            let (stream, _) = listener.accept().unwrap();
            let mut writer = stream.try_clone().unwrap();
            let mut reader = BufReader::new(stream);
            writer
                .write_all(b"{\"QMP\": {\"version\": {}, \"capabilities\": []}}\n")
                .unwrap();
            let mut asked = Vec::new();
            let mut line = String::new();
            while reader.read_line(&mut line).unwrap() > 0 {
                let v: serde_json::Value = serde_json::from_str(&line).unwrap();
                asked.push(v["execute"].as_str().unwrap().to_string());
                // An event before the answer must be skipped by the client.
                writer
                    .write_all(b"{\"event\": \"POWERDOWN\", \"timestamp\": {}}\n{\"return\": {}}\n")
                    .unwrap();
                line.clear();
            }
            asked
        });
        powerdown(&path, Duration::from_secs(1)).unwrap();
        assert_eq!(
            server.join().unwrap(),
            vec!["qmp_capabilities", "system_powerdown"]
        );
    }

    #[test]
    fn test_usernet_established() {
        let info = "Hub -1 (n0):
  Protocol[State]    FD  Source Address  Port   Dest. Address  Port RecvQ SendQ
  TCP[SYN_SENT]      16       127.0.0.1 18081       10.0.2.15  8080     0     0
  TCP[HOST_FORWARD]  11       127.0.0.1 18081       10.0.2.15  8080     0     0
  TCP[ESTABLISHED]   21       127.0.0.1 18082       10.0.2.15  9090     0     0
";
        assert!(!usernet_established(info, 8080));
        assert!(usernet_established(info, 9090));
    }

    #[test]
    fn test_missing_socket_is_a_connect_error() {
        let dir = tempfile::tempdir().unwrap();
        let err = powerdown(&dir.path().join("none"), Duration::from_millis(50)).unwrap_err();
        assert!(matches!(err, QmpError::Connect { .. }), "{err}");
    }
}
