//! An IMDSv2 server on the host's loopback for the tests that boot an image as an EC2 machine
//! (`fuse run --metadata-server`): `PUT /latest/api/token` (with a TTL header) gives a session
//! token; every other request without that token is refused with 401, as EC2 does with IMDSv2
//! required. Serves `/latest/user-data` and `/latest/meta-data/local-hostname`, and records
//! every request it answered.

use std::io::{BufRead, BufReader, Write};
use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

/// One request as the metadata server saw it.
#[derive(Debug, Clone, PartialEq)]
pub struct Seen {
    pub method: String,
    pub path: String,
    /// It carried the session token the server handed out.
    pub with_token: bool,
    /// The token TTL header of a token request.
    pub ttl: Option<String>,
}

/// The server; stopped (its thread joined) when dropped.
pub struct Imds {
    pub port: u16,
    seen: Arc<Mutex<Vec<Seen>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Imds {
    pub fn start(user_data: Vec<u8>, hostname: &str) -> Imds {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        listener.set_nonblocking(true).unwrap();
        let port = listener.local_addr().unwrap().port();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        // Per server, as a test may run several at once.
        let token = format!("AQAEA{port}token");
        let (seen2, stop2, hostname) = (seen.clone(), stop.clone(), hostname.to_string());
        let thread = std::thread::spawn(move || {
            while !stop2.load(Ordering::Relaxed) {
                let Ok((conn, _)) = listener.accept() else {
                    std::thread::sleep(Duration::from_millis(10));
                    continue;
                };
                conn.set_nonblocking(false).unwrap();
                let _ = conn.set_read_timeout(Some(Duration::from_secs(10)));
                let seen = Imds::answer(conn, &token, &user_data, &hostname);
                seen2.lock().unwrap().extend(seen);
            }
        });
        Imds {
            port,
            seen,
            stop,
            thread: Some(thread),
        }
    }

    fn answer(conn: TcpStream, token: &str, user_data: &[u8], hostname: &str) -> Option<Seen> {
        let mut reader = BufReader::new(conn.try_clone().ok()?);
        let mut request_line = String::new();
        reader.read_line(&mut request_line).ok()?;
        let mut parts = request_line.split_whitespace();
        let (method, path) = (parts.next()?.to_string(), parts.next()?.to_string());
        let (mut given_token, mut ttl) = (None, None);
        loop {
            let mut line = String::new();
            if reader.read_line(&mut line).ok()? == 0 || line == "\r\n" {
                break;
            }
            let (name, value) = line.trim_end().split_once(':')?;
            match name.to_ascii_lowercase().as_str() {
                "x-aws-ec2-metadata-token" => given_token = Some(value.trim().to_string()),
                "x-aws-ec2-metadata-token-ttl-seconds" => ttl = Some(value.trim().to_string()),
                _ => {}
            }
        }
        let with_token = given_token.as_deref() == Some(token);
        let (status, body): (&str, &[u8]) = match (method.as_str(), path.as_str()) {
            ("PUT", "/latest/api/token") if ttl.is_some() => ("200 OK", token.as_bytes()),
            ("PUT", "/latest/api/token") => ("400 Bad Request", b""),
            _ if !with_token => ("401 Unauthorized", b""),
            ("GET", "/latest/user-data") => ("200 OK", user_data),
            ("GET", "/latest/meta-data/local-hostname") => ("200 OK", hostname.as_bytes()),
            _ => ("404 Not Found", b""),
        };
        let mut conn = conn;
        let head = format!(
            "HTTP/1.1 {status}\r\nContent-Length: {}\r\nContent-Type: text/plain\r\nConnection: close\r\n\r\n",
            body.len()
        );
        // Recorded also when the client went away before the answer.
        let _ = conn.write_all(head.as_bytes());
        let _ = conn.write_all(body);
        Some(Seen {
            method,
            path,
            with_token,
            ttl,
        })
    }

    /// The requests answered so far, in order (each recorded once its answer was written).
    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }

    /// Forgets the requests recorded so far.
    pub fn clear_seen(&self) {
        self.seen.lock().unwrap().clear();
    }
}

impl Drop for Imds {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
