//! What keeps `fuse deploy` from doing harm, against moto on 127.0.0.1 (signature checking
//! on, see `common::moto`): one deploy at a time per app and environment (a `fuse:lock` tag on
//! its security group), and the promotion gate of a protected environment (a passing
//! `fuse test` result for exactly the digest deployed).
//!
//! No instance needs to run here: an image without a port is healthy once moto says its
//! instance runs, and an image with a port is checked through an HTTP proxy on 127.0.0.1 that
//! nothing listens on (so it never becomes healthy). Nothing connects to an address moto
//! returns; `fuse test` boots its image under QEMU as every `fuse test` does.

mod common;

use common::moto::Moto;
use common::{free_port, json, Sandbox};
use fuse_tests::assert_no_leaked_qemu;
use serde_json::Value;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// A program that prints a line and exits 0.
const HELLO: &str = r#"
#include <stdio.h>
int main(void) { puts("hello from " VERSION); return 0; }
"#;

/// `NAME` built from HELLO with `fuse_toml` as its configuration: its digest.
fn build(sb: &Sandbox, name: &str, fuse_toml: &str) -> String {
    sb.dir.write("fuse.toml", fuse_toml);
    let version = name.replace(':', "-");
    let exe = sb.program(
        HELLO,
        &version,
        &["-static", &format!("-DVERSION=\"{version}\"")],
    );
    sb.build_named(&exe, name)
}

fn world(moto: &Moto) -> Value {
    moto.helper(&["world", &moto.key_id, &moto.secret])
}

/// The live instances of app `app`.
fn live(w: &Value, app: &str) -> Vec<Value> {
    w["instances"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|i| i["state"] != "terminated" && i["state"] != "shutting-down")
        .filter(|i| i["tags"]["fuse:app"] == app)
        .cloned()
        .collect()
}

/// The security group of `app`.
fn group(w: &Value, app: &str) -> Value {
    w["groups"]
        .as_array()
        .unwrap()
        .iter()
        .find(|g| g["tags"]["fuse:app"] == app)
        .cloned()
        .unwrap_or_else(|| panic!("no security group for {app}: {w}"))
}

/// This host's name, as fuse puts it in a lock.
fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .unwrap()
        .trim()
        .to_string()
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

#[test]
fn a_second_deploy_of_an_environment_is_refused_while_one_runs() {
    let sb = Sandbox::new();
    let moto = Moto::start(&sb);
    // `slow` listens on a port: checked through the proxy, which refuses (never healthy).
    build(&sb, "app:slow", "[ports]\nhttp = 8080\n");
    build(&sb, "app:idle", "");
    let nothing = free_port();
    let deploy = || {
        moto.fuse_with_keys(&sb)
            .env("HTTP_PROXY", format!("http://127.0.0.1:{nothing}"))
            .env("NO_PROXY", "127.0.0.1,localhost")
            .env("USER", "ann")
    };

    // 1. A deploy that waits for its instance's health.
    let first = deploy()
        .args(["app:slow", "--env", "prod", "--health-timeout", "25"])
        .spawn();
    let launched =
        fuse_boot::poll::wait_until(Duration::from_secs(120), Duration::from_millis(300), || {
            live(&world(&moto), "app").first().cloned()
        })
        .expect("the first deploy launched an instance");
    let w = world(&moto);
    let lock = group(&w, "app")["tags"]["fuse:lock"]
        .as_str()
        .unwrap_or_else(|| panic!("the first deploy holds the lock: {w}"))
        .to_string();
    assert!(lock.starts_with("ann@"), "{lock}");

    // 2. A second one (and a rollback, and a destroy) meanwhile: refused, naming the holder,
    // before it changes anything (no AMI made for app:idle).
    moto.helper(&["start-recording"]);
    for args in [
        &["app:idle", "--env", "prod"][..],
        &["rollback", "app", "--env", "prod"],
        &["destroy", "app", "--env", "prod"],
    ] {
        let started = Instant::now();
        let out = deploy().args(args).run();
        assert!(
            out.code().is_some_and(|c| c != 0),
            "{args:?} refused: {out}"
        );
        let err = out.stderr_str();
        if args[0] != "rollback" {
            // (A rollback stops earlier: app/prod has served nothing yet.)
            // One line: who, which process, since when, what to do.
            let line = err
                .lines()
                .find(|l| l.contains("app/prod is being deployed by ann@"))
                .unwrap_or_else(|| panic!("{out}"));
            assert!(
                line.contains(&format!("(pid {}) since ", first.pid()))
                    && line.contains("--break-lock"),
                "{out}"
            );
        }
        eprintln!(
            "{args:?} refused in {:.1} s",
            started.elapsed().as_secs_f64()
        );
    }
    assert_eq!(
        changes(&moto),
        Vec::<Value>::new(),
        "the refused runs changed nothing"
    );
    assert_eq!(
        live(&world(&moto), "app").len(),
        1,
        "nothing launched while locked"
    );
    assert_eq!(
        group(&world(&moto), "app")["tags"]["fuse:lock"],
        lock.as_str(),
        "the holder keeps the lock"
    );

    // 3. The first ends (unhealthy): the lock is gone, deploys work again.
    let out = first.wait();
    out.assert_code(1);
    let w = world(&moto);
    assert!(
        group(&w, "app")["tags"].get("fuse:lock").is_none(),
        "released: {w}"
    );
    assert!(!live(&w, "app").iter().any(|i| i["id"] == launched["id"]));
    // Ctrl-C while it waits for health: the new instance terminated, the lock released.
    let interrupted = deploy()
        .args(["app:slow", "--env", "prod", "--health-timeout", "120"])
        .spawn();
    let second =
        fuse_boot::poll::wait_until(Duration::from_secs(120), Duration::from_millis(300), || {
            let w = world(&moto);
            let locked = group(&w, "app")["tags"].get("fuse:lock").is_some();
            live(&w, "app").first().filter(|_| locked).cloned()
        })
        .expect("the deploy launched an instance");
    interrupted.signal(libc::SIGINT);
    let out = interrupted.wait();
    assert!(out.code().is_some_and(|c| c != 0), "{out}");
    assert!(
        out.stderr_str().contains(&format!(
            "Interrupted: {} terminated, nothing was serving before; the lock of app/prod is released",
            second["id"].as_str().unwrap()
        )),
        "{out}"
    );
    let w = world(&moto);
    assert!(group(&w, "app")["tags"].get("fuse:lock").is_none(), "{w}");
    assert!(live(&w, "app").is_empty(), "{w}");
    let out = deploy().args(["app:idle", "--env", "prod"]).run();
    out.assert_success();

    // 4. Another host's fresh lock refuses, --break-lock takes it over.
    let group_id = group(&world(&moto), "app")["id"]
        .as_str()
        .unwrap()
        .to_string();
    let tag = |value: String| {
        moto.helper(&[
            "tag",
            &moto.key_id,
            &moto.secret,
            &group_id,
            "fuse:lock",
            &value,
        ]);
    };
    tag(format!("bob@ci.invalid;4242;1;{}", now() - 60));
    let out = deploy().args(["app:idle", "--env", "prod"]).run();
    assert!(out.code().is_some_and(|c| c != 0), "{out}");
    assert!(
        out.stderr_str()
            .contains("app/prod is being deployed by bob@ci.invalid (pid 4242) since "),
        "{out}"
    );
    let out = deploy()
        .args(["app:idle", "--env", "prod", "--break-lock"])
        .run();
    out.assert_success();
    assert!(
        out.stderr_str().contains(
            "warning: --break-lock: taking over the lock of app/prod held by bob@ci.invalid"
        ),
        "{out}"
    );

    // 5. A stale lock (an hour old, of a run that crashed elsewhere) is taken over.
    tag(format!("bob@ci.invalid;4242;1;{}", now() - 3600));
    let out = deploy().args(["app:idle", "--env", "prod"]).run();
    out.assert_success();
    assert!(
        out.stderr_str().contains(
            "warning: taking over the lock of app/prod held by bob@ci.invalid (pid 4242)"
        ) && out.stderr_str().contains("older than 30 min"),
        "{out}"
    );
    let w = world(&moto);
    assert!(group(&w, "app")["tags"].get("fuse:lock").is_none(), "{w}");
    assert_eq!(live(&w, "app").len(), 1, "{w}");

    // 6. Two deploys started at the same moment: exactly one goes on, the other is refused
    // naming it (by the early check, or by the lock's read-back after the settle interval).
    moto.helper(&["start-recording"]);
    let runs = [
        deploy().args(["app:idle", "--env", "prod"]).spawn(),
        deploy().args(["app:idle", "--env", "prod"]).spawn(),
    ];
    let pids: Vec<u32> = runs.iter().map(|r| r.pid()).collect();
    let outs: Vec<_> = runs.into_iter().map(|r| r.wait()).collect();
    let winners: Vec<usize> = (0..2).filter(|&i| outs[i].code() == Some(0)).collect();
    assert_eq!(
        winners.len(),
        1,
        "exactly one proceeds:\n{}\n{}",
        outs[0],
        outs[1]
    );
    let (won, lost) = (winners[0], 1 - winners[0]);
    assert!(outs[lost].code().is_some_and(|c| c != 0), "{}", outs[lost]);
    let err = outs[lost].stderr_str();
    assert!(
        err.contains(&format!(
            "app/prod is being deployed by ann@{} (pid {}) since ",
            hostname(),
            pids[won]
        )),
        "who and when: {}",
        outs[lost]
    );
    eprintln!(
        "the concurrent deploy refused: {}",
        err.lines().find(|l| l.contains("being deployed")).unwrap()
    );
    let calls = moto.recording();
    let launches = calls
        .iter()
        .filter(|c| c["params"]["Action"] == "RunInstances")
        .count();
    assert_eq!(launches, 1, "one launch");
    let w = world(&moto);
    assert!(group(&w, "app")["tags"].get("fuse:lock").is_none(), "{w}");
    assert_eq!(live(&w, "app").len(), 1, "{w}");

    deploy()
        .args(["destroy", "app", "--env", "prod"])
        .run()
        .assert_success();
    assert!(live(&world(&moto), "app").is_empty());
}

/// Two first deploys of a new image to a new environment at the same moment: both make the
/// AMI and the security group, the one whose CreateSecurityGroup (or RegisterImage) is refused
/// as a duplicate goes on with what the other made, to the lock, which lets exactly one
/// through. Which run is first varies; so that the duplicate path is taken every time, the
/// group is there already, untagged, as a run that stopped before tagging it leaves it (the
/// first run to reach it is refused and tags it; the other is refused too, or finds it by its
/// tags when it comes a moment later).
/// (moto does not refuse a second AMI of the same name, as EC2 does: that path is not played.)
#[test]
fn two_first_deploys_at_once_meet_at_the_lock() {
    let sb = Sandbox::new();
    let moto = Moto::start(&sb);
    build(&sb, "twin:1", "[ports]\nhttp = 8080\n");
    let left = moto.helper(&["group", &moto.key_id, &moto.secret, "fuse-twin-prod"]);
    let left = left["id"].as_str().unwrap().to_string();
    // The port is checked through a proxy on 127.0.0.1 that refuses: the run the lock lets
    // through launches, finds its instance unhealthy and ends with 1.
    let nothing = free_port();
    let deploy = || {
        moto.fuse_with_keys(&sb)
            .args(["twin:1", "--env", "prod", "--health-timeout", "5"])
            .env("HTTP_PROXY", format!("http://127.0.0.1:{nothing}"))
            .env("NO_PROXY", "127.0.0.1,localhost")
            .env("USER", "ann")
    };
    moto.helper(&["start-recording"]);
    let runs = [deploy().spawn(), deploy().spawn()];
    let pids: Vec<u32> = runs.iter().map(|r| r.pid()).collect();
    let outs: Vec<_> = runs.into_iter().map(|r| r.wait()).collect();
    let refused = |i: usize| {
        outs[i].stderr_str().contains(&format!(
            "twin/prod is being deployed by ann@{} (pid {}) since ",
            hostname(),
            pids[1 - i]
        ))
    };
    let through: Vec<usize> = (0..2).filter(|&i| !refused(i)).collect();
    assert_eq!(
        through.len(),
        1,
        "exactly one refused by the lock, naming the other:\n{}\n{}",
        outs[0],
        outs[1]
    );
    let (won, lost) = (through[0], 1 - through[0]);
    assert!(outs[lost].code().is_some_and(|c| c != 0), "{}", outs[lost]);
    outs[won].assert_code(1);
    assert!(
        outs[won]
            .stderr_str()
            .contains("fuse: deployment of twin:1 to twin/prod failed: ")
            && !outs[won].stderr_str().contains("Duplicate"),
        "the one let through launched and found its instance unhealthy: {}",
        outs[won]
    );
    let calls = moto.recording();
    let count = |action: &str| actions(&calls, action).len();
    eprintln!(
        "CreateSecurityGroup x{}, RegisterImage x{}, RunInstances x{}",
        count("CreateSecurityGroup"),
        count("RegisterImage"),
        count("RunInstances")
    );
    assert!(
        (1..=2).contains(&count("CreateSecurityGroup")),
        "one or both tried to make the group (refused: it was there)"
    );
    assert_eq!(count("RunInstances"), 1, "one launch");
    let w = world(&moto);
    let named: Vec<&Value> = w["groups"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|g| g["name"] == "fuse-twin-prod")
        .collect();
    assert_eq!(named.len(), 1, "one security group: {w}");
    assert_eq!(named[0]["id"], left.as_str(), "the one left untagged: {w}");
    assert_eq!(named[0]["tags"]["fuse:app"], "twin", "{w}");
    assert!(named[0]["tags"].get("fuse:lock").is_none(), "released: {w}");
    // Its port opened, though the run that made it had stopped before that.
    let rules = named[0]["rules"].as_array().unwrap();
    assert!(
        rules
            .iter()
            .any(|r| r["port"] == 8080 && r["cidrs"][0] == "0.0.0.0/0"),
        "{w}"
    );
    assert!(
        live(&w, "twin").is_empty(),
        "the unhealthy one terminated: {w}"
    );
    assert_no_leaked_qemu();
}

#[test]
fn a_protected_environment_takes_only_a_tested_digest() {
    let sb = Sandbox::new();
    let moto = Moto::start(&sb);
    let protected = "[deploy]\nprotected = [\"prod\"]\n";
    let d1 = build(&sb, "gated:v1", protected);
    let d2 = build(&sb, "gated:v2", protected);
    let deploy = || moto.fuse_with_keys(&sb).timeout(Duration::from_secs(300));
    moto.helper(&["start-recording"]);

    // 1. No test result: refused before any call to AWS.
    let out = deploy().args(["gated:v1", "--env", "prod"]).run();
    assert!(out.code().is_some_and(|c| c != 0), "{out}");
    let err = out.stderr_str();
    assert!(
        err.contains("prod is protected")
            && err.contains("has no `fuse test` result")
            && err.contains("run `fuse test gated:v1` first, or deploy with --force"),
        "{out}"
    );
    assert_eq!(err.trim().lines().count(), 1, "one line: {out}");
    assert_eq!(moto.recording(), Vec::<Value>::new(), "no AWS call");

    // 2. A failing test does not count.
    let started = Instant::now();
    sb.fuse()
        .args(["test", "gated:v1", "--expect-exit", "3"])
        .run()
        .assert_code(1);
    eprintln!(
        "failing fuse test: {:.1} s",
        started.elapsed().as_secs_f64()
    );
    let out = deploy().args(["gated:v1", "--env", "prod"]).run();
    assert!(out.code().is_some_and(|c| c != 0), "{out}");
    assert!(
        out.stderr_str().contains("its last `fuse test` failed"),
        "{out}"
    );
    assert_eq!(moto.recording(), Vec::<Value>::new(), "no AWS call");

    // 3. A passing one opens the gate for that digest.
    sb.fuse().args(["test", "gated:v1"]).run().assert_success();
    let out = deploy().args(["gated:v1", "--env", "prod", "--json"]).run();
    out.assert_success();
    let v1 = json(&out);
    assert_eq!(v1["digest"], d1.as_str());
    assert!(out.stderr_str().contains("passed `fuse test`"), "{out}");

    // 4. Another digest of the same app is not covered by v1's result; an unprotected
    // environment takes it.
    let out = deploy().args(["gated:v2", "--env", "prod"]).run();
    assert!(out.code().is_some_and(|c| c != 0), "{out}");
    assert!(
        out.stderr_str().contains("run `fuse test gated:v2` first"),
        "{out}"
    );
    deploy()
        .args(["gated:v2", "--env", "staging"])
        .run()
        .assert_success();

    // 5. --force: deployed, loudly, and the instance says so.
    let out = deploy()
        .args(["gated:v2", "--env", "prod", "--force", "--json"])
        .run();
    out.assert_success();
    assert!(
        out.stderr_str()
            .contains("WARNING: --force: deploying gated:v2"),
        "{out}"
    );
    let v2 = json(&out);
    assert_eq!(v2["digest"], d2.as_str());
    let w = world(&moto);
    let instances = live(&w, "gated");
    let forced = instances
        .iter()
        .find(|i| i["id"] == v2["instance"])
        .unwrap_or_else(|| panic!("{w}"));
    assert_eq!(forced["tags"]["fuse:forced"], "true");
    assert_eq!(forced["tags"]["fuse:env"], "prod");
    assert!(instances
        .iter()
        .filter(|i| i["id"] != v2["instance"])
        .all(|i| i["tags"].get("fuse:forced").is_none()));

    for env in ["prod", "staging"] {
        deploy()
            .args(["destroy", "gated", "--env", env])
            .run()
            .assert_success();
    }
    assert!(live(&world(&moto), "gated").is_empty());
    assert_no_leaked_qemu();
}

/// The recorded calls with this EC2 `Action`.
fn actions(calls: &[Value], action: &str) -> Vec<Value> {
    calls
        .iter()
        .filter(|c| c["params"]["Action"] == action)
        .cloned()
        .collect()
}

#[test]
fn the_elastic_ip_is_tagged_in_the_call_that_allocates_it() {
    let sb = Sandbox::new();
    let moto = Moto::start(&sb);
    build(&sb, "tagged:v1", "");
    let deploy = || moto.fuse_with_keys(&sb).timeout(Duration::from_secs(300));
    moto.helper(&["start-recording"]);
    let out = deploy()
        .args(["tagged:v1", "--env", "prod", "--json"])
        .run();
    out.assert_success();
    let first = json(&out);
    let w = world(&moto);
    let addresses = w["addresses"].as_array().unwrap();
    assert_eq!(addresses.len(), 1, "{w}");
    let address = &addresses[0];
    assert_eq!(address["ip"], first["address"]);
    assert_eq!(address["tags"]["fuse:app"], "tagged", "{w}");
    assert_eq!(address["tags"]["fuse:env"], "prod", "{w}");
    let allocation = address["allocation"].as_str().unwrap();
    let calls = moto.recording();
    let allocated = actions(&calls, "AllocateAddress");
    assert_eq!(allocated.len(), 1, "{calls:?}");
    let params = &allocated[0]["params"];
    assert_eq!(params["TagSpecification.1.ResourceType"], "elastic-ip");
    let tags: Vec<(String, String)> = (1..=2)
        .map(|i| {
            let key = |k: &str| params[format!("TagSpecification.1.Tag.{i}.{k}")].to_string();
            (key("Key"), key("Value"))
        })
        .collect();
    assert_eq!(
        tags,
        vec![
            ("\"fuse:app\"".into(), "\"tagged\"".into()),
            ("\"fuse:env\"".into(), "\"prod\"".into())
        ],
        "{params}"
    );
    // No CreateTags names the address's app and env afterwards: nothing a crash could skip.
    let retagged: Vec<Value> = actions(&calls, "CreateTags")
        .into_iter()
        .filter(|c| c["params"]["ResourceId.1"] == allocation)
        .filter(|c| c["params"].to_string().contains("fuse:app"))
        .collect();
    assert_eq!(retagged, Vec::<Value>::new());
    deploy()
        .args(["destroy", "tagged", "--env", "prod"])
        .run()
        .assert_success();
    assert!(world(&moto)["addresses"].as_array().unwrap().is_empty());
}

#[test]
fn a_rollback_keeps_the_instance_type_the_environment_runs() {
    let sb = Sandbox::new();
    let moto = Moto::start(&sb);
    let d1 = build(&sb, "roll:v1", "");
    let d2 = build(&sb, "roll:v2", "");
    let deploy = || moto.fuse_with_keys(&sb).timeout(Duration::from_secs(300));
    // The instance serving roll/prod, from moto.
    let serving = || {
        let w = world(&moto);
        let address = w["addresses"].as_array().unwrap()[0].clone();
        live(&w, "roll")
            .into_iter()
            .find(|i| i["id"] == address["instance"])
            .unwrap_or_else(|| panic!("{w}"))
    };
    for image in ["roll:v1", "roll:v2"] {
        deploy()
            .args([image, "--env", "prod", "--instance-type", "t3.small"])
            .run()
            .assert_success();
    }
    assert_eq!(serving()["type"], "t3.small");

    // Back to v1 on the type v2 runs, not the arch's default (t3.micro).
    let out = deploy()
        .args(["rollback", "roll", "--env", "prod", "--json"])
        .run();
    out.assert_success();
    let back = json(&out);
    assert_eq!(back["digest"], d1.as_str());
    let instance = serving();
    assert_eq!(instance["id"], back["instance"]);
    assert_eq!(instance["type"], "t3.small", "{instance}");

    // --instance-type still chooses.
    let out = deploy()
        .args(["rollback", "roll", "--env", "prod", "--json"])
        .args(["--instance-type", "t3.medium"])
        .run();
    out.assert_success();
    let back = json(&out);
    assert_eq!(back["digest"], d2.as_str());
    let instance = serving();
    assert_eq!(instance["id"], back["instance"]);
    assert_eq!(instance["type"], "t3.medium", "{instance}");

    deploy()
        .args(["destroy", "roll", "--env", "prod"])
        .run()
        .assert_success();
    assert!(live(&world(&moto), "roll").is_empty());
}

/// The recorded calls that change something (all but Describe*).
fn changes(moto: &Moto) -> Vec<Value> {
    moto.recording()
        .into_iter()
        .filter(|c| {
            !c["params"]["Action"]
                .as_str()
                .is_some_and(|a| a.starts_with("Describe"))
        })
        .collect()
}

#[test]
fn a_deregistration_delay_for_one_instance_is_refused_before_anything_is_made() {
    let sb = Sandbox::new();
    let moto = Moto::start(&sb);
    build(&sb, "single:v1", "");
    let deploy = || moto.fuse_with_keys(&sb).timeout(Duration::from_secs(300));
    let refused = |env: &str, says: &str| {
        moto.helper(&["start-recording"]);
        let out = deploy()
            .args(["single:v1", "--env", env, "--deregistration-delay", "10"])
            .run();
        out.assert_code(1);
        let err = out.stderr_str();
        assert!(
            err.contains("--deregistration-delay is for an environment behind a load balancer")
                && err.contains(says),
            "{out}"
        );
        assert_eq!(err.trim().lines().count(), 1, "one line: {out}");
        assert_eq!(changes(&moto), Vec::<Value>::new(), "nothing made: {out}");
    };
    // A new environment: nothing at all is made (no AMI, no security group).
    refused("prod", "add --instances N to put single/prod behind one");
    let w = world(&moto);
    assert!(w["instances"].as_array().unwrap().is_empty(), "{w}");
    assert!(!w["groups"].to_string().contains("single"), "{w}");

    // An environment one instance serves: refused, the instance keeps serving.
    let out = deploy()
        .args(["single:v1", "--env", "staging", "--json"])
        .run();
    out.assert_success();
    let first = json(&out);
    refused("staging", first["address"].as_str().unwrap());
    let w = world(&moto);
    let alive = live(&w, "single");
    assert_eq!(alive.len(), 1, "{w}");
    assert_eq!(alive[0]["id"], first["instance"]);
    deploy()
        .args(["destroy", "single", "--env", "staging"])
        .run()
        .assert_success();
}

#[test]
fn an_instance_that_leaves_running_fails_the_deploy_at_once_and_the_old_one_serves() {
    let sb = Sandbox::new();
    let moto = Moto::start(&sb);
    build(&sb, "fate:idle", "");
    // Listens on a port: checked through a proxy that refuses, so it is never healthy and
    // fuse is waiting for its health when the instance stops.
    build(&sb, "fate:slow", "[ports]\nhttp = 8080\n");
    let nothing = free_port();
    let deploy = || {
        moto.fuse_with_keys(&sb)
            .env("HTTP_PROXY", format!("http://127.0.0.1:{nothing}"))
            .env("NO_PROXY", "127.0.0.1,localhost")
            .timeout(Duration::from_secs(300))
    };
    let out = deploy()
        .args(["fate:idle", "--env", "prod", "--json"])
        .run();
    out.assert_success();
    let first = json(&out);
    let (old, address) = (first["instance"].clone(), first["address"].clone());

    for (action, state) in [("stop", "stopped"), ("terminate", "terminated")] {
        // The timeout is far off: only the instance's state can end this deploy early.
        let run = deploy()
            .args(["fate:slow", "--env", "prod", "--health-timeout", "250"])
            .spawn();
        let new = fuse_boot::poll::wait_until(
            Duration::from_secs(120),
            Duration::from_millis(300),
            || {
                live(&world(&moto), "fate")
                    .into_iter()
                    .find(|i| i["id"] != old && i["state"] == "running")
            },
        )
        .expect("the deploy launched an instance");
        let new = new["id"].as_str().unwrap().to_string();
        moto.helper(&[action, &moto.key_id, &moto.secret, &new]);
        let out = run.wait();
        out.assert_code(1);
        let err = out.stderr_str();
        assert!(
            err.contains(&format!("failed: {new} is {state}"))
                && err.contains(", not running;")
                && !err.contains("within the health timeout"),
            "{out}"
        );
        assert!(
            err.contains(&format!(
                "{} still leads to the previous instance",
                address.as_str().unwrap()
            )),
            "{out}"
        );
        let w = world(&moto);
        let eip = &w["addresses"].as_array().unwrap()[0];
        assert_eq!(
            eip["instance"], old,
            "the old instance keeps the address: {w}"
        );
        let alive: Vec<Value> = live(&w, "fate").iter().map(|i| i["id"].clone()).collect();
        assert_eq!(alive, vec![old.clone()], "{new} terminated: {w}");
    }
    deploy()
        .args(["destroy", "fate", "--env", "prod"])
        .run()
        .assert_success();
}
