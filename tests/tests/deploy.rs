//! `fuse deploy ami` against moto (`moto_server` from PyPI, in a venv made once per target
//! directory), started by each test on 127.0.0.1 with signature checking on: moto lets its
//! first three actions through unauthenticated, which create an IAM user, its policy and its
//! keys; every later request must be signed with those keys. Every connection goes to
//! 127.0.0.1: fuse's endpoints are set by AWS_ENDPOINT_URL, and nothing moto returns is
//! dialled.
//!
//! moto's gaps, handled here: it does not check block checksums (the snapshot is read back
//! with ListSnapshotBlocks + GetSnapshotBlock and compared with the disk, and the checksum
//! headers fuse sent are compared with the blocks through moto's request recorder), and its
//! RegisterImage keeps only the name and description (the parameters fuse sent are asserted
//! from the recorder).

mod common;

use common::moto::{Moto, REGION};
use common::{assert_one_error, json, Sandbox};
use serde_json::Value;
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;

/// AWS's EBS direct API block size (moto reports 512; AWS's is fixed at 512 KiB).
const BLOCK: usize = 524_288;

impl Moto {
    /// `fuse ami hello:1.0` with the IAM user's keys, asserted to succeed.
    fn ami(&self, sb: &Sandbox) -> fuse_tests::Output {
        self.ami_of(sb, "hello:1.0")
    }

    /// `fuse ami IMAGE --json` with the IAM user's keys, asserted to succeed: what it printed.
    fn ami_json(&self, sb: &Sandbox, image: &str) -> Value {
        json(
            self.fuse_with_keys(sb)
                .args(["ami", image, "--json"])
                .run()
                .assert_success(),
        )
    }

    /// `fuse ami IMAGE` with the IAM user's keys, asserted to succeed.
    fn ami_of(&self, sb: &Sandbox, image: &str) -> fuse_tests::Output {
        let out = self.fuse_with_keys(sb).args(["ami", image]).run();
        out.assert_success();
        out
    }
}

/// A static hello image in the sandbox's store and its raw disk.
fn hello_image(sb: &Sandbox) -> (String, Vec<u8>) {
    let app = sb.program(common::HELLO, "hello-1.0", &["-static"]);
    let built = sb.build_json(&app);
    (
        built["digest"].as_str().unwrap().to_string(),
        sb.export_raw("hello:1.0"),
    )
}

/// The second version of the hello app: another static program (other output), so only the
/// app (its filesystem, its dm-verity tree, the manifest in the UKI) differs from version 1.0.
const HELLO_2: &str = r#"
#include <stdio.h>
int main(void) { printf("hello again, from version 2\n"); return 0; }
"#;

/// `hello:VERSION` built from `src` into the sandbox's store: its digest and raw disk. The
/// program is `hello` in every version, so the root filesystem (which names it in the spec the
/// init reads) stays the same.
fn hello_version(sb: &Sandbox, src: &str, version: &str) -> (String, Vec<u8>) {
    let app = sb.program(src, "hello", &["-static"]);
    let image = format!("hello:{version}");
    (sb.build_named(&app, &image), sb.export_raw(&image))
}

/// `disk` zero-padded to whole blocks, `blocks` of them.
fn padded(disk: &[u8], blocks: usize) -> Vec<u8> {
    let mut v = disk.to_vec();
    v.resize(blocks * BLOCK, 0);
    v
}

/// The non-zero 512 KiB blocks of `disk` by index.
fn nonzero_blocks(disk: &[u8]) -> BTreeMap<usize, &[u8]> {
    disk.chunks(BLOCK)
        .enumerate()
        .filter(|(_, b)| b.iter().any(|&x| x != 0))
        .collect()
}

/// The snapshot read back (ListSnapshotBlocks + GetSnapshotBlock) holds exactly the disk's
/// non-zero blocks, each a whole 512 KiB block with the disk's bytes; no zero block.
#[track_caller]
fn assert_snapshot_is(moto: &Moto, snapshot: &str, nonzero: &BTreeMap<usize, &[u8]>) {
    let stored = moto.helper(&["blocks", &moto.key_id, &moto.secret, snapshot]);
    let stored = stored.as_object().unwrap();
    let mut indexes: Vec<usize> = stored.keys().map(|k| k.parse().unwrap()).collect();
    indexes.sort();
    assert_eq!(
        indexes,
        nonzero.keys().copied().collect::<Vec<_>>(),
        "blocks in the snapshot"
    );
    for (index, block) in nonzero {
        let got = &stored[&index.to_string()];
        let mut full = block.to_vec();
        full.resize(BLOCK, 0);
        assert_eq!(
            got["len"], BLOCK as u64,
            "block {index} is a whole 512 KiB block"
        );
        assert_eq!(
            got["sha256"],
            hex(&Sha256::digest(&full)),
            "block {index} differs from the disk"
        );
    }
}

fn b64_sha256(data: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(Sha256::digest(data))
}

/// The calls of the recording with this EC2 `Action`.
fn actions<'a>(calls: &'a [Value], action: &str) -> Vec<&'a Value> {
    calls
        .iter()
        .filter(|c| c["params"]["Action"] == action)
        .collect()
}

#[test]
fn an_image_becomes_an_ami_once_per_digest() {
    let sb = Sandbox::new();
    let moto = Moto::start(&sb);
    let (digest, disk) = hello_image(&sb);
    let blocks: Vec<&[u8]> = disk.chunks(BLOCK).collect();
    let nonzero = nonzero_blocks(&disk);
    assert!(
        nonzero.len() < blocks.len(),
        "a disk with no zero block tests less"
    );

    moto.helper(&["start-recording"]);
    let started = std::time::Instant::now();
    let out = moto
        .fuse_with_keys(&sb)
        .args(["ami", "hello:1.0", "--json"])
        .run();
    out.assert_success();
    let elapsed = started.elapsed();
    let first = json(&out);
    assert!(
        out.stderr_str().is_empty(),
        "--json prints no progress:\n{out}"
    );
    let ami = first["ami"].as_str().unwrap().to_string();
    let snapshot = first["snapshot"].as_str().unwrap().to_string();
    assert!(
        ami.starts_with("ami-") && snapshot.starts_with("snap-"),
        "{first}"
    );
    assert_eq!(first["reused"], false);
    assert_eq!(first["region"], REGION);
    assert_eq!(first["blocks_sent"], nonzero.len() as u64);
    assert_eq!(
        first["blocks_skipped"],
        (blocks.len() - nonzero.len()) as u64
    );
    assert_eq!(first["bytes_sent"], (nonzero.len() * BLOCK) as u64);
    eprintln!(
        "measured: hello image, disk {} bytes: {} of {} blocks sent ({} bytes) to moto in {:.2} s (fuse's own figure {:.2} s)",
        disk.len(),
        nonzero.len(),
        blocks.len(),
        nonzero.len() * BLOCK,
        elapsed.as_secs_f64(),
        first["seconds"].as_f64().unwrap()
    );

    assert_snapshot_is(&moto, &snapshot, &nonzero);

    // What fuse sent, as moto recorded it.
    let calls = moto.recording();
    let puts: Vec<&Value> = calls
        .iter()
        .filter(|c| c["method"] == "PUT" && c["path"].as_str().unwrap().contains("/blocks/"))
        .collect();
    assert_eq!(puts.len(), nonzero.len());
    for put in &puts {
        let index: usize = put["path"]
            .as_str()
            .unwrap()
            .rsplit('/')
            .next()
            .unwrap()
            .parse()
            .unwrap();
        let mut full = nonzero[&index].to_vec();
        full.resize(BLOCK, 0);
        assert_eq!(
            put["headers"]["x-amz-checksum"],
            b64_sha256(&full),
            "block {index}'s checksum"
        );
        assert_eq!(put["headers"]["x-amz-checksum-algorithm"], "SHA256");
        assert_eq!(put["body_sha256"], b64_sha256(&full));
        let auth = put["headers"]["authorization"].as_str().unwrap();
        assert!(
            auth.starts_with(&format!("AWS4-HMAC-SHA256 Credential={}/", moto.key_id)),
            "{auth}"
        );
        assert!(
            auth.contains(&format!("/{REGION}/ebs/aws4_request")),
            "{auth}"
        );
    }
    let start = calls
        .iter()
        .find(|c| c["path"] == "/snapshots" && c["method"] == "POST")
        .expect("StartSnapshot");
    assert_eq!(start["json"]["VolumeSize"], 1);
    let token = start["json"]["ClientToken"].as_str().unwrap();
    assert!(
        token.starts_with("fuse-") && digest.contains(&token[5..]),
        "{token}"
    );
    let tags = &start["json"]["Tags"];
    assert!(
        tags.as_array()
            .unwrap()
            .contains(&serde_json::json!({"Key": "fuse:digest", "Value": digest})),
        "{tags}"
    );
    let complete = calls
        .iter()
        .find(|c| {
            c["path"]
                .as_str()
                .unwrap()
                .starts_with("/snapshots/completion/")
        })
        .expect("CompleteSnapshot");
    assert_eq!(
        complete["headers"]["x-amz-changedblockscount"],
        nonzero.len().to_string()
    );
    let register = actions(&calls, "RegisterImage");
    assert_eq!(register.len(), 1);
    let params = &register[0]["params"];
    for (key, value) in [
        ("BootMode", "uefi"),
        ("EnaSupport", "true"),
        ("Architecture", "x86_64"),
        ("ImdsSupport", "v2.0"),
        ("VirtualizationType", "hvm"),
        ("RootDeviceName", "/dev/xvda"),
        ("BlockDeviceMapping.1.DeviceName", "/dev/xvda"),
        ("BlockDeviceMapping.1.Ebs.SnapshotId", snapshot.as_str()),
        ("BlockDeviceMapping.1.Ebs.VolumeType", "gp3"),
        ("BlockDeviceMapping.1.Ebs.DeleteOnTermination", "true"),
    ] {
        assert_eq!(params[key], value, "RegisterImage {key}: {params}");
    }
    let name = params["Name"].as_str().unwrap();
    assert!(
        name.starts_with("fuse-hello-1.0-") && digest.contains(&name[15..]),
        "{name}"
    );
    // The AMI carries the digest tag (moto keeps tags, not RegisterImage's parameters).
    let described = moto.helper(&["image", &moto.key_id, &moto.secret, &ami]);
    assert_eq!(described["Tags"]["fuse:digest"], digest.as_str());
    assert_eq!(described["Tags"]["fuse:image"], "hello:1.0");

    // Again: the AMI is found by its digest, nothing is uploaded or registered.
    moto.helper(&["reset-recording"]);
    let again = moto.ami_json(&sb, "hello:1.0");
    assert_eq!(again["ami"], ami.as_str());
    assert_eq!(again["reused"], true);
    assert_eq!(again["bytes_sent"], 0);
    assert_eq!(again["blocks_sent"], 0);
    let calls = moto.recording();
    assert!(
        calls
            .iter()
            .all(|c| c["params"]["Action"] == "DescribeImages"),
        "a reuse only looks: {calls:?}"
    );
    // Without --json: progress is absent (nothing to upload) and one result line says so.
    let plain = moto.ami(&sb);
    assert!(
        plain
            .stdout_str()
            .starts_with(&format!("{ami} {REGION} (reused")),
        "{plain}"
    );

    // The AMI gone but its snapshot kept (a run stopped between the two): the snapshot tagged
    // with the digest is registered again, nothing uploaded.
    moto.helper(&["deregister", &moto.key_id, &moto.secret, &ami]);
    moto.helper(&["reset-recording"]);
    let out = moto.ami(&sb);
    assert!(
        out.stderr_str().contains(&format!(
            "snapshot {snapshot} of hello:1.0 is uploaded already"
        )),
        "{out}"
    );
    let calls = moto.recording();
    assert!(
        !calls.iter().any(|c| c["method"] == "PUT"),
        "nothing uploaded again"
    );
    let register = actions(&calls, "RegisterImage");
    assert_eq!(register.len(), 1);
    assert_eq!(
        register[0]["params"]["BlockDeviceMapping.1.Ebs.SnapshotId"],
        snapshot.as_str()
    );
}

#[test]
fn an_upload_a_stopped_run_left_is_finished_not_restarted() {
    let sb = Sandbox::new();
    let moto = Moto::start(&sb);
    let (digest, disk) = hello_image(&sb);
    let nonzero = nonzero_blocks(&disk);
    let first = nonzero.keys().next().unwrap().to_string();
    let leftover = moto.helper(&["leftover", &moto.key_id, &moto.secret, &digest, &first]);
    let leftover = leftover["id"].as_str().unwrap();

    let out = moto.ami(&sb);
    assert!(
        out.stderr_str().contains(&format!(
            "snapshot {leftover} of hello:1.0 was left pending by an earlier run: uploading into it"
        )),
        "{out}"
    );
    assert!(
        out.stdout_str().contains(&format!(" {leftover} (")),
        "{out}"
    );
    // Every non-zero block sent again (the leftover's wrong bytes replaced), one snapshot.
    assert_snapshot_is(&moto, leftover, &nonzero);
    let snapshots = moto.helper(&["snapshots", &moto.key_id, &moto.secret, &digest]);
    assert_eq!(
        snapshots,
        serde_json::json!([{"id": leftover, "state": "completed"}]),
        "one snapshot per digest"
    );
}

#[test]
fn credentials_and_region_as_aws_users_keep_them() {
    let sb = Sandbox::new();
    let moto = Moto::start(&sb);
    hello_image(&sb);
    moto.helper(&["start-recording"]);

    // No region anywhere: one line, before anything is sent.
    let out = moto
        .fuse(&sb)
        .env("AWS_ACCESS_KEY_ID", &moto.key_id)
        .env("AWS_SECRET_ACCESS_KEY", &moto.secret)
        .args(["ami", "hello:1.0"])
        .run();
    assert_one_error(&out, &["No AWS region", "--region", "AWS_REGION"]);
    assert!(
        moto.recording().is_empty(),
        "nothing may be sent without a region"
    );

    // A wrong secret: AWS's (moto's) signature error, in one line, and no secret in it.
    let wrong = "wJalrXUtnFEMI/K7MDENG+bPxRfiCYWRONGKEY";
    let out = moto
        .fuse(&sb)
        .env("AWS_ACCESS_KEY_ID", &moto.key_id)
        .env("AWS_SECRET_ACCESS_KEY", wrong)
        .args(["ami", "hello:1.0", "--region", REGION])
        .run();
    let line = assert_one_error(
        &out,
        &["AWS EC2 DescribeImages failed: HTTP 401 AuthFailure"],
    );
    let all = format!("{}{}", out.stdout_str(), out.stderr_str());
    assert!(
        !all.contains(wrong) && !all.contains(&moto.secret),
        "{line}"
    );

    // The keys in a shared credentials file's profile, its region in the config file's
    // `[profile NAME]` section; `[NAME]` in the config file is not that profile.
    std::fs::write(
        sb.dir.join("aws-credentials"),
        format!(
            "[default]\naws_access_key_id = AKIAWRONG\naws_secret_access_key = wrong\n\n[deployer]\naws_access_key_id = {}\naws_secret_access_key = {}\n",
            moto.key_id, moto.secret
        ),
    )
    .unwrap();
    std::fs::write(
        sb.dir.join("aws-config"),
        format!("[deployer]\nregion = us-east-1\n\n[profile deployer]\nregion = {REGION}\n"),
    )
    .unwrap();
    let by_flag = json(
        moto.fuse(&sb)
            .args(["ami", "hello:1.0", "--json", "--profile", "deployer"])
            .run()
            .assert_success(),
    );
    assert_eq!(by_flag["region"], REGION);
    assert_eq!(by_flag["reused"], false);
    let by_env = json(
        moto.fuse(&sb)
            .env("AWS_PROFILE", "deployer")
            .args(["ami", "hello:1.0", "--json"])
            .run()
            .assert_success(),
    );
    assert_eq!(by_env["ami"], by_flag["ami"]);
    assert_eq!(by_env["reused"], true);
    // A profile that does not exist: one line naming it.
    let out = moto
        .fuse(&sb)
        .args(["ami", "hello:1.0", "--profile", "nope"])
        .run();
    assert_one_error(&out, &["AWS profile 'nope'"]);

    // A profile whose keys come from a credential_process (as SSO's `aws configure
    // export-credentials --format process` or aws-vault give them): the keys only on a pipe.
    let process = sb.dir.join("credentials-from-vault");
    std::fs::write(
        &process,
        format!(
            "#!/bin/sh\necho 'vault: unlocked' >&2\nprintf '{{\"Version\": 1, \"AccessKeyId\": \"%s\", \"SecretAccessKey\": \"%s\"}}' {} {}\n",
            moto.key_id, moto.secret
        ),
    )
    .unwrap();
    std::fs::set_permissions(&process, std::fs::Permissions::from_mode(0o700)).unwrap();
    std::fs::write(
        sb.dir.join("aws-config"),
        format!(
            "[profile vaulted]\nregion = {REGION}\ncredential_process = {} --profile x\n",
            process.display()
        ),
    )
    .unwrap();
    let out = moto
        .fuse(&sb)
        .args(["ami", "hello:1.0", "--json", "--profile", "vaulted"])
        .run();
    assert!(out.stderr_str().contains("vault: unlocked"), "{out}");
    let by_process = json(out.assert_success());
    assert_eq!(by_process["ami"], by_flag["ami"]);
    // A profile that assumes a role with a source profile whose user may do nothing else:
    // the AMI is found only through the role (STS on the same moto, signatures checked).
    let role = moto.helper(&["role", &moto.key_id, &moto.secret]);
    std::fs::write(
        sb.dir.join("aws-credentials"),
        format!(
            "[ci]\naws_access_key_id = {}\naws_secret_access_key = {}\n",
            role["id"].as_str().unwrap(),
            role["secret"].as_str().unwrap()
        ),
    )
    .unwrap();
    std::fs::write(
        sb.dir.join("aws-config"),
        format!(
            "[profile ci]\nregion = {REGION}\n[profile deploy]\nregion = {REGION}\nrole_arn = {}\nsource_profile = ci\nrole_session_name = fuse-test\n",
            role["role"].as_str().unwrap()
        ),
    )
    .unwrap();
    let out = moto
        .fuse(&sb)
        .args(["ami", "hello:1.0", "--profile", "ci"])
        .run();
    assert_one_error(&out, &["AWS EC2 DescribeImages failed"]);
    let by_role = json(
        moto.fuse(&sb)
            .args(["ami", "hello:1.0", "--json", "--profile", "deploy"])
            .run()
            .assert_success(),
    );
    assert_eq!(by_role["ami"], by_flag["ami"]);
    assert_eq!(by_role["reused"], true);

    // A failing one: one line, nothing sent.
    std::fs::write(
        sb.dir.join("aws-config"),
        format!("[profile vaulted]\nregion = {REGION}\ncredential_process = false\n"),
    )
    .unwrap();
    let out = moto
        .fuse(&sb)
        .args(["ami", "hello:1.0", "--profile", "vaulted"])
        .run();
    assert_one_error(
        &out,
        &[
            "The credential_process of profile vaulted",
            "exit status: 1",
        ],
    );
}

/// The blocks of `snapshot` read back (ListSnapshotBlocks + GetSnapshotBlock), by index.
fn snapshot_blocks(sb: &Sandbox, moto: &Moto, snapshot: &str) -> BTreeMap<usize, Vec<u8>> {
    let dir = sb.dir.join(format!("blocks-{snapshot}"));
    std::fs::create_dir_all(&dir).unwrap();
    moto.helper(&[
        "blocks",
        &moto.key_id,
        &moto.secret,
        snapshot,
        dir.to_str().unwrap(),
    ]);
    std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            let index = e.file_name().to_str().unwrap().parse().unwrap();
            (index, std::fs::read(e.path()).unwrap())
        })
        .collect()
}

/// The second disk padded with zeros to the larger one's 512 KiB blocks, and the blocks in
/// which the two differ.
fn changed_blocks(disk1: &[u8], disk2: &[u8]) -> (Vec<u8>, Vec<usize>) {
    let blocks = disk1.len().max(disk2.len()).div_ceil(BLOCK);
    let (old, new) = (padded(disk1, blocks), padded(disk2, blocks));
    let changed = (0..blocks)
        .filter(|&i| old[i * BLOCK..(i + 1) * BLOCK] != new[i * BLOCK..(i + 1) * BLOCK])
        .collect();
    (new, changed)
}

#[test]
fn a_new_version_is_uploaded_as_the_blocks_that_changed() {
    let sb = Sandbox::new();
    let moto = Moto::start(&sb);
    let (digest1, disk1) = hello_version(&sb, common::HELLO, "1.0");
    let first = moto.ami_json(&sb, "hello:1.0");
    assert_eq!(first["parent_snapshot"], Value::Null, "{first}");
    let reason = first["full_upload_reason"].as_str().unwrap();
    assert!(reason.contains("no earlier version of hello"), "{reason}");
    let snap1 = first["snapshot"].as_str().unwrap().to_string();

    let (digest2, disk2) = hello_version(&sb, HELLO_2, "2.0");
    let (_, changed) = changed_blocks(&disk1, &disk2);
    moto.helper(&["start-recording"]);
    let out = moto
        .fuse_with_keys(&sb)
        .args(["ami", "hello:2.0", "--json"])
        .run();
    out.assert_success();
    let second = json(&out);
    assert_eq!(second["parent_snapshot"], snap1.as_str(), "{second}");
    assert_eq!(second["parent_digest"], digest1.as_str());
    assert_eq!(second["full_upload_reason"], Value::Null);
    assert_eq!(second["disk_bytes"], disk2.len() as u64);
    assert_eq!(second["blocks_sent"], changed.len() as u64, "{second}");
    assert_eq!(second["bytes_sent"], (changed.len() * BLOCK) as u64);
    let full = nonzero_blocks(&disk2).len() * BLOCK;
    let sent = second["bytes_sent"].as_u64().unwrap() as usize;
    eprintln!(
        "measured: hello 1.0 -> 2.0 (another static C program), disk {} bytes: {sent} bytes sent incrementally ({} blocks), a full upload sends {full} ({:.3})",
        disk2.len(),
        changed.len(),
        sent as f64 / full as f64
    );
    assert!(
        sent < full,
        "an incremental upload sends less than a full one: {sent} of {full} bytes"
    );
    // Only the GPT, the ESP (the UKI holds the manifest) and the app's partitions changed:
    // the root and its dm-verity tree are the same bytes at the same place.
    for part in [2, 3] {
        let (start, end) = partition(&disk2, part);
        assert_eq!(
            partition(&disk1, part),
            (start, end),
            "partition {part} moved"
        );
        assert!(
            changed
                .iter()
                .all(|&b| (b + 1) * BLOCK <= start || b * BLOCK >= end),
            "a block of partition {part} ({start}..{end}) was sent: {changed:?}"
        );
    }

    // What was sent: StartSnapshot on the parent, tagged with it; the changed blocks only.
    let calls = moto.recording();
    let start = calls
        .iter()
        .find(|c| c["path"] == "/snapshots" && c["method"] == "POST")
        .expect("StartSnapshot");
    assert_eq!(start["json"]["ParentSnapshotId"], snap1.as_str());
    let tags = start["json"]["Tags"].as_array().unwrap();
    for (key, value) in [
        ("fuse:digest", digest2.as_str()),
        ("fuse:name", "hello"),
        ("fuse:parent", snap1.as_str()),
        ("fuse:parent-digest", digest1.as_str()),
    ] {
        assert!(
            tags.contains(&serde_json::json!({"Key": key, "Value": value})),
            "{key}: {tags:?}"
        );
    }
    let mut put: Vec<usize> = calls
        .iter()
        .filter(|c| c["method"] == "PUT")
        .map(|c| {
            c["path"]
                .as_str()
                .unwrap()
                .rsplit('/')
                .next()
                .unwrap()
                .parse()
                .unwrap()
        })
        .collect();
    put.sort();
    assert_eq!(put, changed, "the blocks that differ from 1.0's disk");

    // moto 5.2.5 ignores ParentSnapshotId (its StartSnapshot says it does not implement it): the
    // v2 snapshot read back holds only the blocks written into it. What AWS would make of it,
    // the parent's blocks with v2's laid over them, must be v2's disk byte for byte.
    let parent = snapshot_blocks(&sb, &moto, &snap1);
    let child = snapshot_blocks(&sb, &moto, second["snapshot"].as_str().unwrap());
    assert_eq!(
        child.keys().copied().collect::<Vec<_>>(),
        changed,
        "moto kept only the written blocks"
    );
    let volume = (disk2.len().div_ceil(1 << 30) << 30).max(1 << 30);
    let mut made = vec![0u8; volume];
    for (index, block) in parent.iter().chain(child.iter()) {
        assert_eq!(block.len(), BLOCK, "block {index} is whole");
        made[index * BLOCK..(index + 1) * BLOCK].copy_from_slice(block);
    }
    assert!(
        made[..disk2.len()] == disk2[..],
        "the parent with the new blocks over it is the new disk"
    );
    assert!(
        is_zero(&made[disk2.len()..]),
        "past the new disk's end the volume reads zeros"
    );

    // A third version goes onto the latest earlier snapshot (2.0's), and says so.
    hello_version(&sb, common::HELLO, "3.0");
    let snap2 = second["snapshot"].as_str().unwrap();
    let out = moto.ami_of(&sb, "hello:3.0");
    assert!(
        out.stderr_str().contains(&format!(
            "incrementally on {snap2} ({}): only the blocks that differ from its disk",
            &digest2[7..19]
        )),
        "{out}"
    );
    assert!(
        out.stderr_str()
            .contains("unchanged blocks skipped (incremental)"),
        "{out}"
    );
    assert!(
        out.stdout_str()
            .contains(&format!(", incremental on {snap2})")),
        "{out}"
    );
}

#[test]
fn a_stopped_incremental_upload_goes_on_against_the_same_parent() {
    let sb = Sandbox::new();
    let moto = Moto::start(&sb);
    let (digest1, disk1) = hello_version(&sb, common::HELLO, "1.0");
    let snap1 = moto.ami_json(&sb, "hello:1.0")["snapshot"]
        .as_str()
        .unwrap()
        .to_string();
    let (digest2, disk2) = hello_version(&sb, HELLO_2, "2.0");
    let (new, changed) = changed_blocks(&disk1, &disk2);
    // What a run stopped mid-upload left: the pending snapshot, tagged with its parent, one
    // changed block in it with wrong bytes.
    let leftover = moto.helper(&[
        "leftover",
        &moto.key_id,
        &moto.secret,
        &digest2,
        &changed[0].to_string(),
        &snap1,
        &digest1,
    ]);
    let leftover = leftover["id"].as_str().unwrap().to_string();
    let resumed = moto.ami_json(&sb, "hello:2.0");
    assert_eq!(resumed["snapshot"], leftover.as_str());
    assert_eq!(resumed["parent_snapshot"], snap1.as_str(), "{resumed}");
    assert_eq!(resumed["blocks_sent"], changed.len() as u64);
    let child = snapshot_blocks(&sb, &moto, &leftover);
    assert_eq!(child.keys().copied().collect::<Vec<_>>(), changed);
    for (index, block) in &child {
        assert!(
            block[..] == new[index * BLOCK..(index + 1) * BLOCK],
            "block {index} is 2.0's"
        );
    }

    // The same, with the parent's disk gone: one line saying what to do.
    let (digest3, _) = hello_version(&sb, common::HELLO, "3.0");
    let stuck = moto.helper(&[
        "leftover",
        &moto.key_id,
        &moto.secret,
        &digest3,
        "0",
        &snap1,
        &digest1,
    ]);
    let stuck = stuck["id"].as_str().unwrap();
    sb.fuse().args(["rm", "hello:1.0"]).run().assert_success();
    let out = moto.fuse_with_keys(&sb).args(["ami", "hello:3.0"]).run();
    assert_one_error(
        &out,
        &[
            &format!("Snapshot {stuck} left pending by an earlier run is incremental on {snap1}"),
            "is no longer in the local store",
            &format!("aws ec2 delete-snapshot --snapshot-id {stuck}"),
        ],
    );
}

#[test]
fn without_the_earlier_disk_here_the_upload_is_a_full_one() {
    let sb = Sandbox::new();
    let moto = Moto::start(&sb);
    hello_version(&sb, common::HELLO, "1.0");
    let snap1 = moto.ami_json(&sb, "hello:1.0")["snapshot"]
        .as_str()
        .unwrap()
        .to_string();
    let (_, disk2) = hello_version(&sb, HELLO_2, "2.0");
    // hello:1.0 removed: its disk goes with it.
    sb.fuse().args(["rm", "hello:1.0"]).run().assert_success();

    moto.helper(&["start-recording"]);
    let second = moto.ami_json(&sb, "hello:2.0");
    assert_eq!(second["parent_snapshot"], Value::Null, "{second}");
    assert_eq!(second["parent_digest"], Value::Null);
    let reason = second["full_upload_reason"].as_str().unwrap();
    assert!(
        reason.contains(&format!("latest earlier snapshot of hello, {snap1} ("))
            && reason.contains("is not in the local store"),
        "{reason}"
    );
    let nonzero = nonzero_blocks(&disk2);
    assert_eq!(second["blocks_sent"], nonzero.len() as u64);
    let snap2 = second["snapshot"].as_str().unwrap().to_string();
    assert_snapshot_is(&moto, &snap2, &nonzero);
    let start = moto
        .recording()
        .into_iter()
        .find(|c| c["path"] == "/snapshots" && c["method"] == "POST")
        .expect("StartSnapshot");
    assert_eq!(start["json"]["ParentSnapshotId"], Value::Null, "{start}");

    // The progress lines say it too, naming the latest earlier snapshot (2.0's, not 1.0's).
    hello_version(&sb, common::HELLO, "3.0");
    sb.fuse().args(["rm", "hello:2.0"]).run().assert_success();
    let out = moto.fuse_with_keys(&sb).args(["ami", "hello:3.0"]).run();
    out.assert_success();
    assert!(
        out.stderr_str().contains(&format!(
            "uploading hello:3.0 in full: the disk of the latest earlier snapshot of hello, {snap2} ("
        )),
        "{out}"
    );
    assert!(
        out.stderr_str().contains("in full: its non-zero blocks"),
        "{out}"
    );
}

/// Partition `number`'s byte range, from `disk`'s primary GPT.
fn partition(disk: &[u8], number: usize) -> (usize, usize) {
    let u64_at = |o: usize| u64::from_le_bytes(disk[o..o + 8].try_into().unwrap()) as usize;
    let u32_at = |o: usize| u32::from_le_bytes(disk[o..o + 4].try_into().unwrap()) as usize;
    assert_eq!(&disk[512..520], b"EFI PART");
    let entry = u64_at(512 + 72) * 512 + (number - 1) * u32_at(512 + 84);
    (u64_at(entry + 32) * 512, (u64_at(entry + 40) + 1) * 512)
}

fn is_zero(bytes: &[u8]) -> bool {
    bytes.iter().all(|&b| b == 0)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
