//! `fuse deploy IMAGE --env ENV` (blue/green on one instance), `ls`, `logs`, `rollback` and
//! `destroy` against moto on 127.0.0.1 (signature checking on, see `common::moto`).
//!
//! moto's instances do not run, so the test plays EC2's data plane: a harness thread polls
//! moto, and for each instance moto reports running it reads the instance's AMI back through
//! the EBS direct API (the snapshot of the AMI's digest, over the snapshots it was uploaded
//! incrementally onto: moto's RegisterImage drops the block device mapping), checks that it
//! is the image's disk byte for byte, and boots that image as an EC2 machine
//! (`fuse run --machine cloud`: UEFI, NVMe, e1000) with the instance's user-data (from moto's
//! DescribeInstanceAttribute) served by an IMDSv2 server on 127.0.0.1 (`--metadata-server`)
//! and the app's port published on 127.0.0.1. `fuse run` boots an image of the store, not a
//! disk file: the VM boots the stored image whose disk was just found equal to the AMI's
//! volume. The VM's console goes to a file moto's GetConsoleOutput answers with (see the
//! helper's `serve`). An instance moto reports terminated has its VM stopped.
//!
//! fuse reaches instances by their public addresses, which moto makes up (real internet
//! addresses): every connection goes through an HTTP proxy the harness runs on 127.0.0.1
//! (fuse honours HTTP_PROXY), which maps each instance's address, and each Elastic IP, to its
//! VM's published port. Nothing here ever connects to an address moto returns.

mod common;

use common::imds::Imds;
use common::moto::Moto;
use common::{die_with_parent, free_port, json, Sandbox};
use fuse_tests::{assert_no_leaked_qemu, fuse_bin, run_marker, RUN_MARKER_ENV};
use serde_json::Value;
use std::collections::{BTreeMap, HashMap};
use std::io::{Read, Write};
use std::net::{Ipv4Addr, Shutdown, TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The app's port in the guest.
const APP_PORT: u16 = 8080;
/// AWS's EBS direct API block size.
const BLOCK: usize = 524_288;
/// The deploy-time value: in the user-data only.
const GREETING: &str = "greetings-from-deploy-time";

/// A web app: `GET /health` answers HEALTH, anything else `VERSION GREETING` (GREETING from
/// the environment: the deployment's user-data). Prints a line when it listens.
const WEB: &str = r#"
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
        else
            snprintf(r, sizeof r, "HTTP/1.0 200 OK\r\n\r\n%s %s\n", VERSION, greeting ? greeting : "-");
        (void)write(c, r, strlen(r));
        close(c);
    }
}
"#;

/// `web:VERSION` built with its health endpoint answering `health`: its digest and raw disk.
fn web(sb: &Sandbox, version: &str, health: u16) -> (String, Vec<u8>) {
    let exe = sb.program(
        WEB,
        &format!("web-{version}"),
        &[
            "-static",
            &format!("-DVERSION=\"{version}\""),
            &format!("-DHEALTH={health}"),
        ],
    );
    let image = format!("web:{version}");
    (sb.build_named(&exe, &image), sb.export_raw(&image))
}

/// One instance's machine: `fuse run --machine cloud` in its own process group (stopped with
/// the group), and its metadata server.
struct Vm {
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
struct Booted {
    instance: String,
    /// Its public address when it was booted (before an Elastic IP replaced it).
    ip: String,
    digest: String,
    user_data: String,
}

/// What the harness and the proxy share with the test.
#[derive(Default)]
struct Plane {
    /// Public address (an instance's or an Elastic IP) → the VM's port on 127.0.0.1.
    routes: Mutex<HashMap<String, u16>>,
    /// The addresses the proxy was asked for.
    proxied: Arc<Mutex<Vec<String>>>,
    booted: Mutex<Vec<Booted>>,
    /// What went wrong in the harness (the test fails on any).
    problems: Mutex<Vec<String>>,
    stop: AtomicBool,
}

/// Sets the stop flag when dropped: the harness threads end also when the test panics.
struct StopOnDrop<'a>(&'a AtomicBool);

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// Plays EC2's data plane until stopped: boots what moto says runs, stops what it says ended,
/// keeps the proxy's routes.
fn harness(sb: &Sandbox, moto: &Moto, disks: &BTreeMap<String, Vec<u8>>, plane: &Plane) {
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
        *plane.routes.lock().unwrap() = routes;
        std::thread::sleep(Duration::from_millis(500));
    }
    drop(vms);
}

/// Checks that the instance's AMI holds the disk of the image its tags name, then boots that
/// image with the instance's user-data behind a metadata server.
fn boot(
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
fn proxy(listener: TcpListener, plane: &Plane) {
    listener.set_nonblocking(true).unwrap();
    while !plane.stop.load(Ordering::Relaxed) {
        let Ok((conn, _)) = listener.accept() else {
            std::thread::sleep(Duration::from_millis(10));
            continue;
        };
        conn.set_nonblocking(false).unwrap();
        let _ = conn.set_read_timeout(Some(Duration::from_secs(10)));
        let routes = plane.routes.lock().unwrap().clone();
        let proxied = plane.proxied.clone();
        // One thread per connection: a tunnel lasts as long as its client keeps it.
        std::thread::spawn(move || relay(conn, &routes, &proxied));
    }
}

fn relay(
    mut conn: TcpStream,
    routes: &HashMap<String, u16>,
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
    let vm = routes.get(host).filter(|_| port == APP_PORT.to_string());
    let Some(&vm) = vm else {
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
fn assert_serves(proxy_port: u16, ip: &str, want: &str) {
    let mut last = String::new();
    let answered =
        fuse_boot::poll::wait_until(Duration::from_secs(30), Duration::from_millis(300), || {
            let mut s = TcpStream::connect((Ipv4Addr::LOCALHOST, proxy_port)).ok()?;
            s.set_read_timeout(Some(Duration::from_secs(20))).ok()?;
            write!(
                s,
                "GET http://{ip}:{APP_PORT}/ HTTP/1.0\r\nHost: {ip}:{APP_PORT}\r\n\r\n"
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

/// The calls of moto's recording with this EC2 `Action`.
fn actions(calls: &[Value], action: &str) -> Vec<Value> {
    calls
        .iter()
        .filter(|c| c["params"]["Action"] == action)
        .cloned()
        .collect()
}

/// The live (not terminated) instances of the world, by id.
fn live(world: &Value) -> BTreeMap<String, Value> {
    world["instances"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|i| i["state"] != "terminated" && i["state"] != "shutting-down")
        .map(|i| (i["id"].as_str().unwrap().to_string(), i.clone()))
        .collect()
}

/// The Elastic IPs tagged for web/prod.
fn web_addresses(world: &Value) -> Vec<Value> {
    world["addresses"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|a| a["tags"]["fuse:app"] == "web" && a["tags"]["fuse:env"] == "prod")
        .cloned()
        .collect()
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

#[test]
fn blue_green_deploys_switch_only_to_a_healthy_instance() {
    let sb = Sandbox::new();
    let moto = Moto::start(&sb);
    sb.dir.write(
        "fuse.toml",
        "[ports]\nhttp = 8080\n[healthcheck]\nhttp = \"/health\"\nport = \"http\"\n",
    );
    let (d1, disk1) = web(&sb, "v1", 200);
    let (d2, disk2) = web(&sb, "v2", 200);
    let (d3, disk3) = web(&sb, "v3", 500);
    for disk in [&disk1, &disk2, &disk3] {
        assert!(
            !contains(disk, GREETING.as_bytes()),
            "the deploy-time value is in no image"
        );
    }
    let disks = BTreeMap::from([
        (d1.clone(), disk1),
        (d2.clone(), disk2),
        (d3.clone(), disk3),
    ]);
    let plane = Plane::default();
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
    let proxy_port = listener.local_addr().unwrap().port();
    // Every deploy command: moto's keys, the proxy for the instances' addresses (never the
    // addresses themselves), nothing of the host's AWS setup.
    let deploy = || {
        moto.fuse_with_keys(&sb)
            .env("HTTP_PROXY", format!("http://127.0.0.1:{proxy_port}"))
            .env("NO_PROXY", "127.0.0.1,localhost")
            .timeout(Duration::from_secs(600))
    };
    let world = || moto.helper(&["world", &moto.key_id, &moto.secret]);

    let launched = std::thread::scope(|scope| {
        let _stop = StopOnDrop(&plane.stop);
        scope.spawn(|| harness(&sb, &moto, &disks, &plane));
        scope.spawn(|| proxy(listener, &plane));
        moto.helper(&["start-recording"]);

        // 1. The first deployment: healthy, the new address leads to it.
        let started = Instant::now();
        let out = deploy()
            .args(["web:v1", "-env=prod", "-e"])
            .arg(format!("GREETING={GREETING}"))
            .args(["--health-timeout", "300", "--json"])
            .run();
        out.assert_success();
        eprintln!("first deploy: {:.1} s", started.elapsed().as_secs_f64());
        let first = json(&out);
        assert_eq!(first["healthy"], true, "{out}");
        assert_eq!(first["digest"], d1.as_str());
        let v1 = first["instance"].as_str().unwrap().to_string();
        let address = first["address"].as_str().unwrap().to_string();
        let w = world();
        let eips = web_addresses(&w);
        assert_eq!(eips.len(), 1, "one address for web/prod: {w}");
        assert_eq!(eips[0]["ip"], address.as_str());
        assert_eq!(eips[0]["instance"], v1.as_str());
        assert_eq!(eips[0]["tags"]["fuse:digest"], d1.as_str());
        let instance = &live(&w)[&v1];
        assert_eq!(instance["tags"]["fuse:app"], "web");
        assert_eq!(instance["tags"]["fuse:env"], "prod");
        assert_eq!(instance["tags"]["fuse:digest"], d1.as_str());
        let group = w["groups"]
            .as_array()
            .unwrap()
            .iter()
            .find(|g| g["tags"]["fuse:app"] == "web")
            .cloned()
            .unwrap_or_else(|| panic!("a security group tagged for web: {w}"));
        assert_eq!(group["tags"]["fuse:env"], "prod");
        // The health check went through the proxy to the instance's own address (moto gives
        // the instance the Elastic IP's once it is associated).
        let v1_ip = plane.booted.lock().unwrap()[0].ip.clone();
        assert!(
            plane.proxied.lock().unwrap().contains(&v1_ip),
            "the health check asked the proxy for {v1_ip}"
        );
        // The deploy-time value reached the app through the user-data (IMDSv2), by the address.
        assert_serves(proxy_port, &address, &format!("v1 {GREETING}\n"));
        // What moto drops: the launch parameters, from its recorder.
        let calls = moto.recording();
        let run = actions(&calls, "RunInstances");
        assert_eq!(run.len(), 1, "one launch");
        let params = &run[0]["params"];
        assert_eq!(params["MetadataOptions.HttpTokens"], "required");
        assert_eq!(params["InstanceType"], "t3.micro");
        assert_eq!(params["ImageId"], first["ami"]);
        let user_data = {
            use base64::Engine;
            let b = base64::engine::general_purpose::STANDARD
                .decode(params["UserData"].as_str().unwrap())
                .unwrap();
            String::from_utf8(b).unwrap()
        };
        let doc: Value = serde_json::from_str(&user_data).unwrap();
        assert_eq!(doc["env"]["GREETING"], GREETING, "{user_data}");
        let rule = &actions(&calls, "AuthorizeSecurityGroupIngress")[0]["params"];
        assert_eq!(rule["IpPermissions.1.FromPort"], "8080");
        assert!(
            !calls
                .iter()
                .filter(|c| c["params"]["Action"] != "RunInstances")
                .any(|c| c.to_string().contains(GREETING)),
            "the value goes in RunInstances' user-data only"
        );
        assert!(!out.stderr_str().contains(GREETING) && !out.stdout_str().contains(GREETING));

        // 2. A second version, its first deploy killed while it waits for the new instance's
        // health: nothing local to clean, and the re-run converges (below: the instance the
        // killed run launched is terminated with v1 once the re-run's is healthy).
        let killed = deploy()
            .args(["web:v2", "--env", "prod", "-e"])
            .arg(format!("GREETING={GREETING}"))
            .spawn();
        let leftover = fuse_boot::poll::wait_until(
            Duration::from_secs(120),
            Duration::from_millis(300),
            || live(&world()).into_keys().find(|id| *id != v1),
        )
        .expect("the interrupted deploy launched an instance");
        killed.signal(libc::SIGKILL);
        let out = killed.wait();
        assert_eq!(out.code(), None, "killed mid-deploy: {out}");
        assert_eq!(
            web_addresses(&world())[0]["instance"],
            v1.as_str(),
            "v1 keeps the address"
        );

        // The healthy second version: the address moves to it, v1 and the leftover are
        // terminated.
        let out = deploy()
            .args(["web:v2", "--env", "prod", "-e"])
            .arg(format!("GREETING={GREETING}"))
            .run();
        out.assert_success();
        // The killed run's lock: its process is gone, so it is taken over at once.
        assert!(
            out.stderr_str()
                .contains("warning: taking over the lock of web/prod held by")
                && out.stderr_str().contains("(its process is gone)"),
            "{out}"
        );
        let text = out.stdout_str();
        let w = world();
        let eip = &web_addresses(&w)[0];
        let v2 = eip["instance"].as_str().unwrap().to_string();
        assert_ne!(v2, v1);
        assert!(
            text.contains(&v2) && text.contains(&format!("replacing {v1}, {leftover}")),
            "{out}"
        );
        assert_eq!(eip["ip"], address.as_str(), "the same address");
        assert_eq!(eip["tags"]["fuse:digest"], d2.as_str());
        assert_eq!(eip["tags"]["fuse:previous-digest"], d1.as_str());
        let alive = live(&w);
        assert_eq!(
            alive.keys().collect::<Vec<_>>(),
            vec![&v2],
            "v1 terminated: {w}"
        );
        assert_serves(proxy_port, &address, &format!("v2 {GREETING}\n"));

        // 3. An unhealthy third version: terminated, v2 keeps the address, exit 1 with the
        // reason and the new instance's console.
        let out = deploy()
            .args(["web:v3", "--env", "prod", "--health-timeout", "60"])
            .run();
        out.assert_code(1);
        let err = out.stderr_str();
        assert!(
            err.contains("was not healthy within the health timeout"),
            "{out}"
        );
        assert!(err.contains("answered 500"), "{out}");
        assert!(
            err.contains("web v3 listening on 8080"),
            "the console tail: {out}"
        );
        assert!(
            err.contains(&format!("{address} still leads to the previous instance")),
            "{out}"
        );
        let w = world();
        let eip = &web_addresses(&w)[0];
        assert_eq!(eip["instance"], v2.as_str(), "v2 keeps the address");
        assert_eq!(eip["tags"]["fuse:digest"], d2.as_str());
        assert_eq!(
            live(&w).keys().collect::<Vec<_>>(),
            vec![&v2],
            "v3 terminated"
        );
        assert_serves(proxy_port, &address, &format!("v2 {GREETING}\n"));

        // ls: the environment, its address and what serves it.
        let listed = json(deploy().args(["ls", "--json"]).run().assert_success());
        let envs = listed.as_array().unwrap();
        assert_eq!(envs.len(), 1, "{listed}");
        assert_eq!(envs[0]["app"], "web");
        assert_eq!(envs[0]["env"], "prod");
        assert_eq!(envs[0]["address"], address.as_str());
        assert_eq!(envs[0]["digest"], d2.as_str());
        assert_eq!(envs[0]["previous_digest"], d1.as_str());
        let listed_instances = envs[0]["instances"].as_array().unwrap();
        assert_eq!(listed_instances.len(), 1);
        assert_eq!(listed_instances[0]["id"], v2.as_str());
        assert_eq!(listed_instances[0]["state"], "running");
        assert_eq!(listed_instances[0]["serving"], true);
        let out = deploy().arg("ls").run();
        out.assert_success();
        let row = out
            .stdout_str()
            .lines()
            .find(|l| l.contains(&v2))
            .map(str::to_string)
            .unwrap_or_else(|| panic!("{out}"));
        assert!(row.starts_with("web") && row.contains("prod") && row.contains(&address));

        // 4. Rollback: the previous digest (v1) redeployed blue/green, with v2's user-data.
        let out = deploy()
            .args(["rollback", "web", "--env", "prod", "--json"])
            .run();
        out.assert_success();
        let back = json(&out);
        assert_eq!(back["digest"], d1.as_str());
        let w = world();
        let eip = &web_addresses(&w)[0];
        let v1b = back["instance"].as_str().unwrap().to_string();
        assert_eq!(eip["instance"], v1b.as_str());
        assert_eq!(eip["tags"]["fuse:digest"], d1.as_str());
        assert_eq!(eip["tags"]["fuse:previous-digest"], d2.as_str());
        assert_eq!(
            live(&w).keys().collect::<Vec<_>>(),
            vec![&v1b],
            "v2 terminated"
        );
        assert_serves(proxy_port, &address, &format!("v1 {GREETING}\n"));
        // The AMI of v1 was reused: no second RegisterImage for it.
        let calls = moto.recording();
        assert_eq!(
            actions(&calls, "RegisterImage").len(),
            3,
            "v1's, v2's and v3's AMIs: the rollback reused v1's"
        );

        // logs: the serving instance's console.
        let out = deploy().args(["logs", "web", "--env", "prod"]).run();
        out.assert_success();
        assert!(
            out.stdout_str().contains("web v1 listening on 8080"),
            "{out}"
        );

        // 5. Destroy: nothing tagged is left.
        let out = deploy().args(["destroy", "web", "--env", "prod"]).run();
        out.assert_success();
        let w = world();
        assert!(live(&w).is_empty(), "no instance left: {w}");
        assert!(w["addresses"].as_array().unwrap().is_empty(), "{w}");
        assert!(
            !w["groups"]
                .as_array()
                .unwrap()
                .iter()
                .any(|g| g["tags"]["fuse:app"] == "web"),
            "{w}"
        );
        let listed = json(deploy().args(["ls", "--json"]).run().assert_success());
        assert_eq!(listed, serde_json::json!([]));
        vec![v1, v2, v1b]
    });

    let problems = plane.problems.lock().unwrap().clone();
    assert!(problems.is_empty(), "the harness: {problems:?}");
    let booted: Vec<(String, String)> = plane
        .booted
        .lock()
        .unwrap()
        .iter()
        .map(|b| (b.digest.clone(), b.user_data.clone()))
        .collect();
    let instances: Vec<String> = plane
        .booted
        .lock()
        .unwrap()
        .iter()
        .map(|b| b.instance.clone())
        .collect();
    for id in &launched {
        assert!(instances.contains(id), "{id} was booted: {instances:?}");
    }
    assert_eq!(
        booted.iter().map(|(d, _)| d.as_str()).collect::<Vec<_>>(),
        vec![
            d1.as_str(),
            d2.as_str(),
            d2.as_str(),
            d3.as_str(),
            d1.as_str()
        ],
        "the instances booted (each its AMI read back and found equal to its image's disk)"
    );
    for i in [0, 1, 2, 4] {
        assert!(booted[i].1.contains(GREETING), "{booted:?}");
    }
    assert_no_leaked_qemu();
}
