//! The EBS direct APIs (REST JSON) that write a snapshot: StartSnapshot, PutSnapshotBlock,
//! CompleteSnapshot.

use super::http::{Call, Client};
use super::profile::Service;
use anyhow::{Context, Result};
use base64::Engine;

/// AWS's block size for the EBS direct APIs: fixed at 512 KiB.
pub(crate) const BLOCK_SIZE: usize = 524_288;

/// A started snapshot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Started {
    pub(crate) id: String,
    pub(crate) status: String,
}

/// StartSnapshot of `volume_gib` GiB with `tags`, incremental on `parent` if given (what is
/// not written reads as the parent's blocks); `client_token` makes a retry return the same
/// snapshot (for 24 hours, on AWS).
pub(crate) fn start_snapshot(
    client: &Client,
    volume_gib: u64,
    parent: Option<&str>,
    description: &str,
    tags: &[(&str, &str)],
    client_token: &str,
) -> Result<Started> {
    let tags: Vec<_> = tags
        .iter()
        .map(|(k, v)| serde_json::json!({"Key": k, "Value": v}))
        .collect();
    let mut body = serde_json::json!({
        "VolumeSize": volume_gib,
        "Description": description,
        "Tags": tags,
        "ClientToken": client_token,
        // Minutes the snapshot may stay pending between calls before AWS fails it.
        "Timeout": 60,
    });
    if let Some(parent) = parent {
        body["ParentSnapshotId"] = parent.into();
    }
    let body = body.to_string();
    let reply = client.send(&Call {
        service: Service::Ebs,
        operation: "StartSnapshot",
        method: "POST",
        path: "/snapshots".into(),
        query: Vec::new(),
        headers: vec![("content-type".into(), "application/json".into())],
        body: body.as_bytes(),
        body_sha256: None,
    })?;
    let v: serde_json::Value =
        serde_json::from_slice(&reply.body).context("EBS StartSnapshot answered with bad JSON")?;
    let id = v["SnapshotId"]
        .as_str()
        .context("EBS StartSnapshot answered without a SnapshotId")?;
    Ok(Started {
        id: id.to_string(),
        status: v["Status"].as_str().unwrap_or("pending").to_string(),
    })
}

/// PutSnapshotBlock: `data` (exactly [`BLOCK_SIZE`] bytes) at `index`, with its SHA-256, which
/// AWS checks.
pub(crate) fn put_snapshot_block(
    client: &Client,
    snapshot: &str,
    index: u64,
    data: &[u8],
    sha256: [u8; 32],
) -> Result<()> {
    let checksum = base64::engine::general_purpose::STANDARD.encode(sha256);
    client.send(&Call {
        service: Service::Ebs,
        operation: "PutSnapshotBlock",
        method: "PUT",
        path: format!("/snapshots/{snapshot}/blocks/{index}"),
        query: Vec::new(),
        headers: vec![
            ("content-type".into(), "application/octet-stream".into()),
            ("x-amz-data-length".into(), data.len().to_string()),
            ("x-amz-checksum".into(), checksum),
            ("x-amz-checksum-algorithm".into(), "SHA256".into()),
        ],
        body: data,
        body_sha256: Some(sha256),
    })?;
    Ok(())
}

/// CompleteSnapshot after `changed_blocks` blocks were written; AWS's status (`pending` until
/// it has sealed the snapshot, then `completed`).
pub(crate) fn complete_snapshot(
    client: &Client,
    snapshot: &str,
    changed_blocks: u64,
) -> Result<String> {
    let reply = client.send(&Call {
        service: Service::Ebs,
        operation: "CompleteSnapshot",
        method: "POST",
        path: format!("/snapshots/completion/{snapshot}"),
        query: Vec::new(),
        headers: vec![(
            "x-amz-changedblockscount".into(),
            changed_blocks.to_string(),
        )],
        body: b"",
        body_sha256: None,
    })?;
    let v: serde_json::Value = serde_json::from_slice(&reply.body).unwrap_or_default();
    Ok(v["Status"].as_str().unwrap_or("pending").to_string())
}
