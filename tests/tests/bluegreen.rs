//! `fuse deploy IMAGE --env ENV` (blue/green on one instance), `ls`, `logs`, `rollback` and
//! `destroy` against moto on 127.0.0.1 (signature checking on, see `common::moto`).
//!
//! The harness (common::plane) plays EC2's data plane: every instance moto reports running
//! booted under QEMU from its AMI's volume, reached through an HTTP proxy on 127.0.0.1.

mod common;

use common::moto::Moto;
use common::plane::{assert_serves, live, Stage, GREETING};
use common::{json, Sandbox};
use fuse_tests::assert_no_leaked_qemu;
use serde_json::Value;
use std::time::{Duration, Instant};

/// The calls of moto's recording with this EC2 `Action`.
fn actions(calls: &[Value], action: &str) -> Vec<Value> {
    calls
        .iter()
        .filter(|c| c["params"]["Action"] == action)
        .cloned()
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

#[test]
fn blue_green_deploys_switch_only_to_a_healthy_instance() {
    let sb = Sandbox::new();
    let moto = Moto::start(&sb);
    let stage = Stage::new(&sb, &moto, &[]);
    let [d1, d2, d3] = stage.digests.clone();
    let (plane, proxy_port) = (&stage.plane, stage.proxy_port);
    let deploy = || stage.deploy();
    let world = || stage.world();

    let launched = stage.play(|| {
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
