//! `fuse deploy IMAGE --env ENV --instances N`: the environment behind an application load
//! balancer, against moto on 127.0.0.1 (signature checking on, see `common::moto`).
//!
//! The harness (common::plane) plays EC2's data plane (every instance moto reports running is
//! booted under QEMU from its AMI's volume) and the load balancer's: a request through its
//! proxy to the balancer's DNS name on port 80 reaches, in turn, the VMs of the targets
//! registered in the group the listener forwards to, as moto reports them. The app answers
//! with its hostname, which the metadata server makes the instance's id. moto reports every
//! registered target healthy without probing it: what makes v3 fail is fuse's own probe of
//! each instance's health check.

mod common;

use common::json;
use common::moto::Moto;
use common::plane::{get_through, live, Stage, GREETING};
use common::Sandbox;
use fuse_tests::assert_no_leaked_qemu;
use serde_json::Value;
use std::collections::BTreeSet;
use std::time::{Duration, Instant};

/// The listener's port.
const LB_PORT: u16 = 80;

/// The load balancers tagged for web/prod.
fn balancers(world: &Value) -> Vec<Value> {
    tagged(world, "balancers")
}

/// The things of `kind` in the world tagged for web/prod.
fn tagged(world: &Value, kind: &str) -> Vec<Value> {
    world[kind]
        .as_array()
        .unwrap()
        .iter()
        .filter(|x| x["tags"]["fuse:app"] == "web" && x["tags"]["fuse:env"] == "prod")
        .cloned()
        .collect()
}

/// Whether web's instance security group (not the load balancer's) lets the internet in.
fn open_to_world(world: &Value) -> bool {
    let group = world["groups"]
        .as_array()
        .unwrap()
        .iter()
        .find(|g| g["tags"]["fuse:app"] == "web" && g["tags"]["fuse:role"].is_null())
        .unwrap_or_else(|| panic!("web's instance group: {world}"));
    group["rules"].as_array().unwrap().iter().any(|r| {
        r["cidrs"]
            .as_array()
            .is_some_and(|c| c.iter().any(|c| c == "0.0.0.0/0"))
    })
}

/// The target group the (one) listener of web/prod's load balancer forwards to.
fn serving_group(world: &Value) -> Value {
    let lb = &balancers(world)[0];
    let listeners = lb["listeners"].as_array().unwrap();
    assert_eq!(listeners.len(), 1, "one listener: {lb}");
    assert_eq!(listeners[0]["port"], LB_PORT);
    world["target_groups"]
        .as_array()
        .unwrap()
        .iter()
        .find(|g| g["arn"] == listeners[0]["target_group"])
        .cloned()
        .unwrap_or_else(|| panic!("the listener's target group: {world}"))
}

fn ids(values: &Value) -> BTreeSet<String> {
    values
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_string())
        .collect()
}

/// Requests to the load balancer's name through the proxy until every one of `instances` has
/// answered `VERSION GREETING <its id>` (other answers are retried: the proxy's routes follow
/// moto's state at the harness's last poll).
#[track_caller]
fn assert_spread(proxy_port: u16, dns: &str, version: &str, instances: &BTreeSet<String>) {
    let mut seen = BTreeSet::new();
    let mut answers = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while seen != *instances && Instant::now() < deadline {
        let body = get_through(proxy_port, dns, LB_PORT);
        let host = body
            .strip_prefix(&format!("{version} {GREETING} "))
            .map(|h| h.trim().to_string());
        match host {
            Some(h) if instances.contains(&h) => {
                seen.insert(h);
            }
            // The harness's routes follow moto's state at its last poll.
            _ => std::thread::sleep(Duration::from_millis(300)),
        }
        answers.push(body);
    }
    assert_eq!(
        &seen, instances,
        "requests to {dns} reach every instance of {version}: {answers:?}"
    );
}

#[test]
fn load_balanced_deploys_switch_target_groups_only_when_healthy() {
    let sb = Sandbox::new();
    let moto = Moto::start(&sb);
    let stage = Stage::new(&sb, &moto, &["-DWITH_HOST"]);
    let [d1, d2, d3] = stage.digests.clone();
    let (plane, proxy_port) = (&stage.plane, stage.proxy_port);
    let deploy = || stage.deploy();
    let world = || stage.world();

    // Bad input: refused before anything is made.
    let out = deploy()
        .args(["web:v1", "--env", "prod", "--instances", "0"])
        .run();
    out.assert_code(2);
    assert!(out.stderr_str().contains("--instances"), "{out}");
    // An environment served by an Elastic IP does not go behind a load balancer in place.
    let eip = moto.helper(&["address", &moto.key_id, &moto.secret, "web", "staging"]);
    let out = deploy()
        .args(["web:v1", "--env", "staging", "--instances", "2"])
        .run();
    out.assert_code(1);
    let err = out.stderr_str();
    assert!(
        err.contains("web/staging is served by one instance at the Elastic IP")
            && err.contains(eip["ip"].as_str().unwrap())
            && err.contains("fuse deploy destroy web --env staging"),
        "{out}"
    );
    assert_eq!(err.trim().lines().count(), 1, "one line: {out}");
    let w = world();
    assert!(w["balancers"].as_array().unwrap().is_empty(), "{w}");
    assert!(live(&w).is_empty(), "{w}");
    assert!(
        w["instances"].as_array().unwrap().is_empty(),
        "nothing launched"
    );

    let launched = stage.play(|| {
        // 1. The first deployment: two instances behind a new load balancer.
        let started = Instant::now();
        let out = deploy()
            .args(["web:v1", "--env", "prod", "--instances", "2", "-e"])
            .arg(format!("GREETING={GREETING}"))
            .arg("--json")
            .run();
        out.assert_success();
        eprintln!(
            "first deploy (2 instances): {:.1} s",
            started.elapsed().as_secs_f64()
        );
        let first = json(&out);
        assert_eq!(first["healthy"], true, "{out}");
        let v1: BTreeSet<String> = ids(&first["instances"]);
        assert_eq!(v1.len(), 2, "{out}");
        let dns = first["load_balancer"].as_str().unwrap().to_string();
        let w = world();
        let lbs = balancers(&w);
        assert_eq!(lbs.len(), 1, "{w}");
        assert_eq!(lbs[0]["dns"], dns.as_str());
        assert_eq!(lbs[0]["name"], "fuse-web-prod");
        assert_eq!(lbs[0]["tags"]["fuse:digest"], d1.as_str());
        assert_eq!(lbs[0]["tags"]["fuse:instances"], "2");
        let group = serving_group(&w);
        assert_eq!(ids(&group["targets"]), v1, "{w}");
        assert_eq!(group["tags"]["fuse:digest"], d1.as_str());
        assert_eq!(group["port"], 8080);
        assert_eq!(group["health_path"], "/health");
        assert_eq!(
            group["attributes"]["deregistration_delay.timeout_seconds"], "30",
            "{group}"
        );
        assert_eq!(live(&w).keys().cloned().collect::<BTreeSet<_>>(), v1);
        // The load balancer's group is open on 80; the instances' lets it reach 8080.
        let groups = w["groups"].as_array().unwrap();
        let lb_group = groups
            .iter()
            .find(|g| g["tags"]["fuse:role"] == "load-balancer")
            .unwrap_or_else(|| panic!("{w}"));
        assert_eq!(lbs[0]["security_groups"][0], lb_group["id"]);
        assert!(lb_group["rules"]
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r["port"] == 80 && r["cidrs"][0] == "0.0.0.0/0"));
        let instance_group = groups
            .iter()
            .find(|g| g["tags"]["fuse:app"] == "web" && g["tags"]["fuse:role"].is_null())
            .unwrap_or_else(|| panic!("{w}"));
        assert!(
            instance_group["rules"]
                .as_array()
                .unwrap()
                .iter()
                .any(|r| r["port"] == 8080 && r["groups"][0] == lb_group["id"]),
            "{instance_group}"
        );
        // ... and only it: the instances' port is not open to the internet.
        assert!(!open_to_world(&w), "{instance_group}");
        // Requests to the load balancer's name reach both instances.
        assert_spread(proxy_port, &dns, "v1", &v1);

        // 2. v2, its first deploy killed once it launched an instance: the re-run removes what
        // it left (its target group and instances) and converges.
        let killed = deploy()
            .args(["web:v2", "--env", "prod", "-e"])
            .arg(format!("GREETING={GREETING}"))
            .spawn();
        let leftover = fuse_boot::poll::wait_until(
            Duration::from_secs(180),
            Duration::from_millis(300),
            || {
                let w = world();
                let extra: BTreeSet<String> =
                    live(&w).into_keys().filter(|id| !v1.contains(id)).collect();
                (!extra.is_empty()).then_some(extra)
            },
        )
        .expect("the interrupted deploy launched an instance");
        killed.signal(libc::SIGKILL);
        assert_eq!(killed.wait().code(), None);
        let w = world();
        assert_eq!(ids(&serving_group(&w)["targets"]), v1, "v1 keeps serving");

        // Without --instances the environment keeps its count.
        let v1_group = serving_group(&w)["arn"].as_str().unwrap().to_string();
        moto.helper(&["start-recording"]);
        let started = Instant::now();
        let out = deploy()
            .args(["web:v2", "--env", "prod", "--json", "-e"])
            .arg(format!("GREETING={GREETING}"))
            .run();
        out.assert_success();
        eprintln!(
            "second deploy (2 instances, v1 drained): {:.1} s",
            started.elapsed().as_secs_f64()
        );
        let second = json(&out);
        let v2: BTreeSet<String> = ids(&second["instances"]);
        assert_eq!(v2.len(), 2, "{out}");
        assert!(v2.is_disjoint(&v1) && v2.is_disjoint(&leftover));
        let terminated = ids(&second["terminated"]);
        assert!(
            terminated.is_superset(&v1) && terminated.is_superset(&leftover),
            "v1 and the leftover terminated: {out}"
        );
        let w = world();
        let group = serving_group(&w);
        assert_eq!(group["tags"]["fuse:digest"], d2.as_str());
        assert_eq!(ids(&group["targets"]), v2);
        assert_eq!(
            tagged(&w, "target_groups").len(),
            1,
            "v1's group and the leftover's deleted: {w}"
        );
        assert_eq!(live(&w).keys().cloned().collect::<BTreeSet<_>>(), v2, "{w}");
        let lb = &balancers(&w)[0];
        assert_eq!(lb["dns"], dns.as_str(), "the same load balancer");
        assert_eq!(lb["tags"]["fuse:digest"], d2.as_str());
        assert_eq!(lb["tags"]["fuse:previous-digest"], d1.as_str());
        assert_spread(proxy_port, &dns, "v2", &v2);
        // The order, from moto's recording: v2's targets registered, then the listener
        // switched, then v1's targets deregistered, terminated and their group deleted.
        let calls = moto.recording();
        let v2_group = group["arn"].as_str().unwrap();
        let at = |action: &str, key: &str, value: &str| -> usize {
            calls
                .iter()
                .position(|c| c["params"]["Action"] == action && c["params"][key] == value)
                .unwrap_or_else(|| panic!("no {action} with {key}={value}"))
        };
        let registered = at("RegisterTargets", "TargetGroupArn", v2_group);
        let switched = at(
            "ModifyListener",
            "DefaultActions.member.1.TargetGroupArn",
            v2_group,
        );
        let deregistered = at("DeregisterTargets", "TargetGroupArn", &v1_group);
        let deleted = at("DeleteTargetGroup", "TargetGroupArn", &v1_group);
        let v1_terminated = calls
            .iter()
            .position(|c| {
                c["params"]["Action"] == "TerminateInstances"
                    && v1
                        .iter()
                        .all(|id| c["params"].to_string().contains(id.as_str()))
            })
            .expect("v1's instances terminated");
        assert!(
            registered < switched
                && switched < deregistered
                && deregistered < v1_terminated
                && v1_terminated < deleted,
            "register {registered}, switch {switched}, deregister {deregistered}, terminate {v1_terminated}, delete {deleted}"
        );

        // 3. v3, interrupted (Ctrl-C) while it waits for its instances' health: they are
        // terminated, its group deleted, the listener untouched and the lock released.
        let interrupted = deploy()
            .args(["web:v3", "--env", "prod", "--instances", "2"])
            .spawn();
        fuse_boot::poll::wait_until(Duration::from_secs(180), Duration::from_millis(300), || {
            let w = world();
            let launched = live(&w)
                .values()
                .filter(|i| i["tags"]["fuse:digest"] == d3.as_str() && i["state"] == "running")
                .count();
            (launched == 2).then_some(())
        })
        .expect("the interrupted deploy launched two instances");
        interrupted.signal(libc::SIGINT);
        let out = interrupted.wait();
        out.assert_code(1);
        assert!(
            out.stderr_str().contains("Interrupted: ")
                && out.stderr_str().contains(&format!(
                    "{dns} still forwards to the previous release; the lock of web/prod is released"
                )),
            "{out}"
        );
        let w = world();
        assert_eq!(ids(&serving_group(&w)["targets"]), v2);
        assert_eq!(tagged(&w, "target_groups").len(), 1, "{w}");
        assert_eq!(live(&w).keys().cloned().collect::<BTreeSet<_>>(), v2, "{w}");
        // Opened for v3's checks, closed again on the way out: v2 is still served.
        assert!(!open_to_world(&w), "{w}");

        // An unhealthy v3: its instances terminated and its group deleted, the listener
        // untouched, exit 1 with the reason and a failing instance's console.
        let out = deploy()
            .args(["web:v3", "--env", "prod", "--instances", "2"])
            .args(["--health-timeout", "90"])
            .run();
        out.assert_code(1);
        let err = out.stderr_str();
        assert!(!err.contains("taking over the lock"), "released: {out}");
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
            err.contains(&format!("{dns} still forwards to the previous release")),
            "{out}"
        );
        let w = world();
        let group = serving_group(&w);
        assert_eq!(
            group["tags"]["fuse:digest"],
            d2.as_str(),
            "the listener stays on v2"
        );
        // Opened for v3's health checks, closed again: the load balancer still serves v2.
        assert!(!open_to_world(&w), "{w}");
        assert_eq!(ids(&group["targets"]), v2);
        assert_eq!(
            tagged(&w, "target_groups").len(),
            1,
            "v3's group deleted: {w}"
        );
        assert_eq!(
            live(&w).keys().cloned().collect::<BTreeSet<_>>(),
            v2,
            "v3's instances terminated: {w}"
        );
        assert_eq!(balancers(&w)[0]["tags"]["fuse:digest"], d2.as_str());
        assert_spread(proxy_port, &dns, "v2", &v2);
        let calls = moto.recording();
        let switches = calls
            .iter()
            .filter(|c| c["params"]["Action"] == "ModifyListener")
            .count();
        assert_eq!(
            switches, 1,
            "v2's switch only: v3 never touched the listener"
        );

        // ls: the load balancer's name, the digest, both instances serving.
        let listed = json(deploy().args(["ls", "--json"]).run().assert_success());
        let env = listed
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["env"] == "prod")
            .cloned()
            .unwrap_or_else(|| panic!("{listed}"));
        assert_eq!(env["load_balancer"], dns.as_str());
        assert_eq!(env["digest"], d2.as_str());
        assert_eq!(env["previous_digest"], d1.as_str());
        let listed_instances = env["instances"].as_array().unwrap();
        assert_eq!(
            listed_instances
                .iter()
                .map(|i| i["id"].as_str().unwrap().to_string())
                .collect::<BTreeSet<_>>(),
            v2
        );
        assert!(listed_instances.iter().all(|i| i["serving"] == true));
        let out = deploy().arg("ls").run();
        out.assert_success();
        for id in &v2 {
            let row = out
                .stdout_str()
                .lines()
                .find(|l| l.contains(id.as_str()))
                .map(str::to_string)
                .unwrap_or_else(|| panic!("{out}"));
            assert!(row.starts_with("web") && row.contains(&dns), "{out}");
        }

        // logs: each serving instance's console.
        let out = deploy().args(["logs", "web", "--env", "prod"]).run();
        out.assert_success();
        let text = out.stdout_str();
        for id in &v2 {
            assert!(text.contains(&format!("==> {id} <==")), "{out}");
        }
        assert_eq!(text.matches("web v2 listening on 8080").count(), 2, "{out}");

        // 4. Rollback: v1 again, two instances behind the same load balancer, v2's user-data.
        let out = deploy()
            .args(["rollback", "web", "--env", "prod", "--json"])
            .run();
        out.assert_success();
        let back = json(&out);
        assert_eq!(back["digest"], d1.as_str());
        let v1b = ids(&back["instances"]);
        assert_eq!(v1b.len(), 2, "the same count: {out}");
        let w = world();
        assert_eq!(ids(&serving_group(&w)["targets"]), v1b);
        assert_eq!(
            balancers(&w)[0]["tags"]["fuse:previous-digest"],
            d2.as_str()
        );
        assert_eq!(live(&w).keys().cloned().collect::<BTreeSet<_>>(), v1b);
        assert_spread(proxy_port, &dns, "v1", &v1b);

        // 5. Destroy: nothing tagged is left.
        for env in ["prod", "staging"] {
            let out = deploy().args(["destroy", "web", "--env", env]).run();
            out.assert_success();
        }
        let w = world();
        assert!(w["balancers"].as_array().unwrap().is_empty(), "{w}");
        assert!(w["target_groups"].as_array().unwrap().is_empty(), "{w}");
        assert!(live(&w).is_empty(), "{w}");
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
        [v1, v2, v1b].into_iter().flatten().collect::<Vec<_>>()
    });

    let problems = plane.problems.lock().unwrap().clone();
    assert!(problems.is_empty(), "the harness: {problems:?}");
    let booted = plane.booted.lock().unwrap().clone();
    for id in &launched {
        let b = booted
            .iter()
            .find(|b| b.instance == *id)
            .unwrap_or_else(|| panic!("{id} was booted: {booted:?}"));
        assert!(b.user_data.contains(GREETING), "{b:?}");
    }
    assert_no_leaked_qemu();
}
