//! EC2's and an application load balancer's data plane for the deploy tests that boot what
//! they deploy (bluegreen, loadbalancer), against moto on 127.0.0.1.
//!
//! moto's instances do not run, so the test plays EC2's data plane: a harness thread polls
//! moto, and for each instance moto reports running it reads the instance's AMI back through
//! the EBS direct API (the snapshot of the AMI's digest, over the snapshots it was uploaded
//! incrementally onto: moto's RegisterImage drops the block device mapping), checks that it
//! is the image's disk byte for byte, and boots that image as an EC2 machine
//! (`fuse run --machine cloud`: UEFI, NVMe, e1000) with the instance's user-data (from moto's
//! DescribeInstanceAttribute) served by an IMDSv2 server on 127.0.0.1 (`--metadata-server`,
//! local-hostname `<instance id>.internal`, so the guest's hostname is its instance id) and
//! the app's port published on 127.0.0.1. `fuse run` boots an image of the store, not a disk
//! file: the VM boots the stored image whose disk was just found equal to the AMI's volume.
//! The VM's console goes to a file moto's GetConsoleOutput answers with (see the helper's
//! `serve`). An instance moto reports terminated has its VM stopped.
//!
//! fuse reaches instances by their public addresses, which moto makes up (real internet
//! addresses): every connection goes through an HTTP proxy the harness runs on 127.0.0.1
//! (fuse honours HTTP_PROXY), which maps each instance's address, and each Elastic IP, to its
//! VM's published port. It plays the load balancer too: a request to a load balancer's DNS
//! name (moto's) on its listener's port goes to one of the targets registered in the group
//! the listener forwards to, in turn (round-robin), as moto reported them at the harness's
//! last poll (every half second). Nothing here ever connects to an address moto returns.

use super::imds::Imds;
use super::moto::Moto;
use super::{die_with_parent, free_port, Sandbox};
use fuse_tests::{fuse_bin, run_marker, RUN_MARKER_ENV};
use serde_json::Value;
use std::collections::{BTreeMap, HashMap};
use std::io::{Read, Write};
use std::net::{Ipv4Addr, Shutdown, TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The app's port in the guest.
pub const APP_PORT: u16 = 8080;
/// AWS's EBS direct API block size.
pub const BLOCK: usize = 524_288;
/// The deploy-time value: in the user-data only.
pub const GREETING: &str = "greetings-from-deploy-time";

/// A web app: `GET /health` answers HEALTH, anything else `VERSION GREETING` (GREETING from
/// the environment: the deployment's user-data), and with WITH_HOST its hostname after (the
/// instance's id). Prints a line when it listens.
pub const WEB: &str = r#"
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>
int main(void) {
    const char *greeting = getenv("GREETING");
    int s = socket(AF_INET, SOCK_STREAM, 0), one = 1;
    setsockopt(s, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(8080)};
    if (bind(s, (struct sockaddr *)&a, sizeof a) < 0 || listen(s, 16) < 0) { perror("listen"); return 1; }
    printf("web %s listening on 8080\n", VERSION);
    fflush(stdout);
    for (;;) {
        int c = accept(s, 0, 0);
        if (c < 0) continue;
        char buf[2048] = {0}, r[512];
        (void)read(c, buf, sizeof buf - 1);
        if (strncmp(buf, "GET /health ", 12) == 0)
            snprintf(r, sizeof r, "HTTP/1.0 %d X\r\n\r\nhealth\n", HEALTH);
        else {
#ifdef WITH_HOST
            char host[128] = {0};
            gethostname(host, sizeof host - 1);
            snprintf(r, sizeof r, "HTTP/1.0 200 OK\r\n\r\n%s %s %s\n", VERSION, greeting ? greeting : "-", host);
#else
            snprintf(r, sizeof r, "HTTP/1.0 200 OK\r\n\r\n%s %s\n", VERSION, greeting ? greeting : "-");
#endif
        }
        (void)write(c, r, strlen(r));
        close(c);
    }
}
"#;

/// `web:VERSION` built with its health endpoint answering `health` and more compiler flags
/// (`-DWITH_HOST`): its digest and raw disk.
pub fn web_with(sb: &Sandbox, version: &str, health: u16, flags: &[&str]) -> (String, Vec<u8>) {
    let mut args = vec![
        "-static".to_string(),
        format!("-DVERSION=\"{version}\""),
        format!("-DHEALTH={health}"),
    ];
    args.extend(flags.iter().map(|f| f.to_string()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let exe = sb.program(WEB, &format!("web-{version}"), &args);
    let image = format!("web:{version}");
    (sb.build_named(&exe, &image), sb.export_raw(&image))
}

/// What the deploy tests that boot what they deploy share: three versions of the web app
/// (`web:v1` and `web:v2` healthy, `web:v3` answering 500 on `/health`), moto, and the data
/// plane (harness and proxy) fuse's commands go through.
pub struct Stage<'a> {
    pub sb: &'a Sandbox,
    pub moto: &'a Moto,
    /// The digests of v1, v2 and v3.
    pub digests: [String; 3],
    disks: BTreeMap<String, Vec<u8>>,
    pub plane: Plane,
    listener: TcpListener,
    /// The proxy's port on 127.0.0.1.
    pub proxy_port: u16,
}

impl<'a> Stage<'a> {
    /// Builds the three versions (the C app compiled with `flags`), none holding the
    /// deploy-time value, and binds the proxy's port.
    pub fn new(sb: &'a Sandbox, moto: &'a Moto, flags: &[&str]) -> Stage<'a> {
        sb.dir.write(
            "fuse.toml",
            "[ports]\nhttp = 8080\n[healthcheck]\nhttp = \"/health\"\nport = \"http\"\n",
        );
        let mut disks = BTreeMap::new();
        let digests = [("v1", 200), ("v2", 200), ("v3", 500)].map(|(version, health)| {
            let (digest, disk) = web_with(sb, version, health, flags);
            assert!(
                !contains(&disk, GREETING.as_bytes()),
                "the deploy-time value is in no image"
            );
            disks.insert(digest.clone(), disk);
            digest
        });
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        let proxy_port = listener.local_addr().unwrap().port();
        Stage {
            sb,
            moto,
            digests,
            disks,
            plane: Plane::default(),
            listener,
            proxy_port,
        }
    }

    /// A `fuse deploy` command: moto's keys, the proxy for the instances' addresses (never
    /// the addresses themselves), nothing of the host's AWS setup.
    pub fn deploy(&self) -> fuse_tests::FuseCmd {
        self.moto
            .fuse_with_keys(self.sb)
            .env(
                "HTTP_PROXY",
                format!("http://127.0.0.1:{}", self.proxy_port),
            )
            .env("NO_PROXY", "127.0.0.1,localhost")
            .timeout(Duration::from_secs(600))
    }

    /// Everything moto holds now (see the helper's `world`).
    pub fn world(&self) -> Value {
        self.moto
            .helper(&["world", &self.moto.key_id, &self.moto.secret])
    }

    /// Runs `f` while the harness and the proxy play the data plane; they stop when it returns
    /// or panics (a panic first prints what the harness saw, see [`StopOnDrop`]).
    pub fn play<R>(&self, f: impl FnOnce() -> R) -> R {
        let listener = self.listener.try_clone().unwrap();
        std::thread::scope(|scope| {
            let _stop = StopOnDrop {
                plane: &self.plane,
                consoles: self.sb.dir.join("consoles"),
            };
            scope.spawn(|| harness(self.sb, self.moto, &self.disks, &self.plane));
            scope.spawn(|| proxy(listener, &self.plane));
            f()
        })
    }
}

/// One instance's machine: `fuse run --machine cloud` in its own process group (stopped with
/// the group), and its metadata server.
pub struct Vm {
    child: Child,
    port: u16,
    _imds: Imds,
}

impl Drop for Vm {
    fn drop(&mut self) {
        let group = -(self.child.id() as libc::pid_t);
        // SAFETY: signals the process group of a child we spawned and have not reaped.
        unsafe { libc::kill(group, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        // SAFETY: as above; the group outlives the reaped leader only while members live.
        unsafe { libc::kill(group, libc::SIGKILL) };
        let _ = self.child.wait();
    }
}

/// An instance the harness booted.
#[derive(Debug, Clone)]
pub struct Booted {
    pub instance: String,
    /// Its public address when it was booted (before an Elastic IP replaced it).
    pub ip: String,
    pub digest: String,
    pub user_data: String,
}

/// What the harness and the proxy share with the test.
#[derive(Default)]
pub struct Plane {
    /// Public address (an instance's or an Elastic IP) → the VM's port on 127.0.0.1.
    pub routes: Mutex<HashMap<String, u16>>,
    /// A load balancer's `DNS name:listener port` → its serving targets' VMs' ports.
    pub balancers: Mutex<HashMap<String, Vec<u16>>>,
    /// Round-robin over a load balancer's targets.
    pub turn: Arc<AtomicUsize>,
    /// The addresses the proxy was asked for.
    pub proxied: Arc<Mutex<Vec<String>>>,
    pub booted: Mutex<Vec<Booted>>,
    /// What went wrong in the harness (the test fails on any).
    pub problems: Mutex<Vec<String>>,
    pub stop: AtomicBool,
}

/// Sets the stop flag when dropped: the harness threads end also when the test panics. A
/// panicking test first gets what the harness saw: its problems and each VM's console tail,
/// which otherwise go with the sandbox.
pub struct StopOnDrop<'a> {
    pub plane: &'a Plane,
    pub consoles: std::path::PathBuf,
}

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        self.plane.stop.store(true, Ordering::Relaxed);
        if !std::thread::panicking() {
            return;
        }
        eprintln!(
            "harness problems: {:?}",
            self.plane.problems.lock().unwrap()
        );
        let mut consoles: Vec<_> = std::fs::read_dir(&self.consoles)
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.path())
            .collect();
        consoles.sort();
        for path in consoles {
            let text = std::fs::read_to_string(&path).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            let tail = lines[lines.len().saturating_sub(30)..].join("\n");
            eprintln!("==> console of {} <==\n{tail}", path.display());
        }
    }
}

/// Plays EC2's data plane until stopped: boots what moto says runs, stops what it says ended,
/// keeps the proxy's routes.
pub fn harness(sb: &Sandbox, moto: &Moto, disks: &BTreeMap<String, Vec<u8>>, plane: &Plane) {
    let mut vms: HashMap<String, Vm> = HashMap::new();
    let mut seen: Vec<String> = Vec::new();
    while !plane.stop.load(Ordering::Relaxed) {
        let world = moto.helper(&["world", &moto.key_id, &moto.secret]);
        let instances = world["instances"].as_array().unwrap();
        for i in instances {
            let id = i["id"].as_str().unwrap().to_string();
            let running = i["state"] == "running";
            if !running {
                vms.remove(&id);
                continue;
            }
            if seen.contains(&id) {
                continue;
            }
            seen.push(id.clone());
            match boot(sb, moto, disks, i) {
                Ok((vm, booted)) => {
                    vms.insert(id, vm);
                    plane.booted.lock().unwrap().push(booted);
                }
                Err(problem) => plane.problems.lock().unwrap().push(problem),
            }
        }
        let mut routes = HashMap::new();
        for i in instances {
            if let (Some(ip), Some(vm)) = (i["ip"].as_str(), vms.get(i["id"].as_str().unwrap())) {
                routes.insert(ip.to_string(), vm.port);
            }
        }
        for a in world["addresses"].as_array().unwrap() {
            if let Some(vm) = a["instance"].as_str().and_then(|i| vms.get(i)) {
                routes.insert(a["ip"].as_str().unwrap().to_string(), vm.port);
            }
        }
        // The load balancer: its listeners' target groups' registered targets, by their VMs.
        let mut balancers = HashMap::new();
        for lb in world["balancers"].as_array().unwrap() {
            for l in lb["listeners"].as_array().unwrap() {
                let targets: Vec<u16> = world["target_groups"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .filter(|g| g["arn"] == l["target_group"])
                    .flat_map(|g| g["targets"].as_array().unwrap().clone())
                    .filter_map(|t| vms.get(t.as_str().unwrap()).map(|vm| vm.port))
                    .collect();
                balancers.insert(
                    format!("{}:{}", lb["dns"].as_str().unwrap(), l["port"]),
                    targets,
                );
            }
        }
        *plane.routes.lock().unwrap() = routes;
        *plane.balancers.lock().unwrap() = balancers;
        std::thread::sleep(Duration::from_millis(500));
    }
    drop(vms);
}

/// Checks that the instance's AMI holds the disk of the image its tags name, then boots that
/// image with the instance's user-data behind a metadata server.
pub fn boot(
    sb: &Sandbox,
    moto: &Moto,
    disks: &BTreeMap<String, Vec<u8>>,
    instance: &Value,
) -> Result<(Vm, Booted), String> {
    let id = instance["id"].as_str().unwrap();
    let digest = instance["tags"]["fuse:digest"]
        .as_str()
        .ok_or(format!("{id} has no fuse:digest tag"))?;
    let disk = disks
        .get(digest)
        .ok_or(format!("{id} runs {digest}, which the test did not build"))?;
    let volume = sb.dir.join(format!("volume-{id}"));
    let read = std::panic::catch_unwind(|| {
        moto.helper(&[
            "volume",
            &moto.key_id,
            &moto.secret,
            instance["image"].as_str().unwrap(),
            digest,
            volume.to_str().unwrap(),
        ])
    });
    if read.is_err() {
        return Err(format!("{id}: cannot read its AMI's volume back"));
    }
    let read_back = std::fs::read(&volume).unwrap();
    let mut expected = disk.clone();
    expected.resize(read_back.len().max(disk.len()).div_ceil(BLOCK) * BLOCK, 0);
    let mut got = read_back.clone();
    got.resize(expected.len(), 0);
    if got != expected {
        return Err(format!(
            "{id}: the AMI's volume read back is not the disk of {digest}"
        ));
    }
    let user_data = instance["user_data"].as_str().unwrap().to_string();
    let imds = Imds::start(user_data.clone().into_bytes(), &format!("{id}.internal"));
    let port = free_port();
    let console = std::fs::File::create(sb.dir.join("consoles").join(id)).unwrap();
    let mut cmd = Command::new(fuse_bin());
    cmd.args(["run", "--machine", "cloud", "--metadata-server"])
        .arg(format!("127.0.0.1:{}", imds.port))
        .arg("-p")
        .arg(format!("{port}:{APP_PORT}"))
        // EC2 runs an instance whatever its app answers: `fuse run` would stop the VM when the
        // image's own health check fails, so it gets one that only waits for the port.
        .args(["--health", "tcp@8080", "--health-timeout", "3600"])
        .arg(digest)
        .env("FUSE_HOME", sb.home())
        .env(RUN_MARKER_ENV, format!("{}-vm-{id}", run_marker()))
        .stdin(Stdio::null())
        .stdout(console.try_clone().unwrap())
        .stderr(console)
        .process_group(0);
    // fuse dies with the harness thread.
    die_with_parent(&mut cmd);
    let child = cmd.spawn().map_err(|e| format!("cannot run fuse: {e}"))?;
    Ok((
        Vm {
            child,
            port,
            _imds: imds,
        },
        Booted {
            instance: id.to_string(),
            ip: instance["ip"].as_str().unwrap_or_default().to_string(),
            digest: digest.to_string(),
            user_data,
        },
    ))
}

/// The HTTP proxy fuse is pointed at: CONNECT (as ureq speaks it) and absolute-form requests
/// to a known address are relayed to its VM's port on 127.0.0.1; anything else gets 502.
pub fn proxy(listener: TcpListener, plane: &Plane) {
    listener.set_nonblocking(true).unwrap();
    while !plane.stop.load(Ordering::Relaxed) {
        let Ok((conn, _)) = listener.accept() else {
            std::thread::sleep(Duration::from_millis(10));
            continue;
        };
        conn.set_nonblocking(false).unwrap();
        let _ = conn.set_read_timeout(Some(Duration::from_secs(10)));
        let routes = plane.routes.lock().unwrap().clone();
        let balancers = plane.balancers.lock().unwrap().clone();
        let (proxied, turn) = (plane.proxied.clone(), plane.turn.clone());
        // One thread per connection: a tunnel lasts as long as its client keeps it.
        std::thread::spawn(move || relay(conn, &routes, &balancers, &turn, &proxied));
    }
}

fn relay(
    mut conn: TcpStream,
    routes: &HashMap<String, u16>,
    balancers: &HashMap<String, Vec<u16>>,
    turn: &AtomicUsize,
    proxied: &Mutex<Vec<String>>,
) -> std::io::Result<()> {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if conn.read(&mut byte)? == 0 {
            return Ok(());
        }
        head.push(byte[0]);
    }
    let text = String::from_utf8_lossy(&head).to_string();
    let first = text.lines().next().unwrap_or_default().to_string();
    let mut parts = first.split_whitespace();
    let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let authority = if method == "CONNECT" {
        target.to_string()
    } else {
        target
            .strip_prefix("http://")
            .and_then(|t| t.split('/').next())
            .unwrap_or("")
            .to_string()
    };
    let (host, port) = authority.rsplit_once(':').unwrap_or((&authority, "80"));
    proxied.lock().unwrap().push(host.to_string());
    let vm = match balancers.get(&format!("{host}:{port}")) {
        Some(targets) if !targets.is_empty() => {
            Some(targets[turn.fetch_add(1, Ordering::Relaxed) % targets.len()])
        }
        Some(_) => None,
        None => routes
            .get(host)
            .filter(|_| port == APP_PORT.to_string())
            .copied(),
    };
    let Some(vm) = vm else {
        conn.write_all(b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\n\r\n")?;
        return Ok(());
    };
    // Only ever 127.0.0.1.
    let Ok(mut upstream) = TcpStream::connect((Ipv4Addr::LOCALHOST, vm)) else {
        conn.write_all(b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\n\r\n")?;
        return Ok(());
    };
    if method == "CONNECT" {
        conn.write_all(b"HTTP/1.1 200 Connection established\r\n\r\n")?;
    } else {
        upstream.write_all(&head)?;
    }
    let _ = conn.set_read_timeout(Some(Duration::from_secs(30)));
    let _ = upstream.set_read_timeout(Some(Duration::from_secs(30)));
    let (mut c2, mut u2) = (conn.try_clone()?, upstream.try_clone()?);
    let up = std::thread::spawn(move || {
        let _ = std::io::copy(&mut c2, &mut u2);
        let _ = u2.shutdown(Shutdown::Write);
    });
    let _ = std::io::copy(&mut upstream, &mut conn);
    let _ = conn.shutdown(Shutdown::Both);
    let _ = up.join();
    Ok(())
}

/// `GET /` of `ip`'s app through the proxy, as a client of the deployment would, answers
/// `want` (within a few of the harness's polls of moto: its routes follow moto's state).
#[track_caller]
pub fn assert_serves(proxy_port: u16, ip: &str, want: &str) {
    assert_serves_on(proxy_port, ip, APP_PORT, want)
}

/// `GET http://host:port/` through the proxy: the answer's body (empty when it failed).
pub fn get_through(proxy_port: u16, host: &str, port: u16) -> String {
    let Ok(mut s) = TcpStream::connect((Ipv4Addr::LOCALHOST, proxy_port)) else {
        return String::new();
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(20)));
    if write!(
        s,
        "GET http://{host}:{port}/ HTTP/1.0\r\nHost: {host}:{port}\r\n\r\n"
    )
    .is_err()
    {
        return String::new();
    }
    let mut answer = String::new();
    let _ = s.read_to_string(&mut answer);
    answer
        .split_once("\r\n\r\n")
        .map(|(_, body)| body.to_string())
        .unwrap_or_default()
}

/// The same as [`assert_serves`] on another port (a load balancer's listener).
#[track_caller]
pub fn assert_serves_on(proxy_port: u16, ip: &str, port: u16, want: &str) {
    let mut last = String::new();
    let answered =
        fuse_boot::poll::wait_until(Duration::from_secs(30), Duration::from_millis(300), || {
            let mut s = TcpStream::connect((Ipv4Addr::LOCALHOST, proxy_port)).ok()?;
            s.set_read_timeout(Some(Duration::from_secs(20))).ok()?;
            write!(
                s,
                "GET http://{ip}:{port}/ HTTP/1.0\r\nHost: {ip}:{port}\r\n\r\n"
            )
            .ok()?;
            let mut answer = String::new();
            let _ = s.read_to_string(&mut answer);
            last = answer.clone();
            answer.ends_with(&format!("\r\n\r\n{want}")).then_some(())
        });
    assert!(
        answered.is_some(),
        "{ip} did not answer {want:?} through the proxy; last: {last:?}"
    );
}

/// The live (not terminated) instances of the world, by id.
pub fn live(world: &Value) -> BTreeMap<String, Value> {
    world["instances"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|i| i["state"] != "terminated" && i["state"] != "shutting-down")
        .map(|i| (i["id"].as_str().unwrap().to_string(), i.clone()))
        .collect()
}

pub fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}
