//! AWS's Query protocol, which EC2 and ELBv2 both speak: `Action=…&Version=…` and the call's
//! parameters form-encoded in a POST, XML back.

use super::http::{Call, Client};
use super::profile::Service;
use anyhow::{Context, Result};

/// One parameter.
pub(super) fn p(k: impl Into<String>, v: impl Into<String>) -> (String, String) {
    (k.into(), v.into())
}

/// A form-encoded Query API body: the pairs in order, encoded as SigV4 does.
pub(super) fn form(version: &str, action: &str, params: &[(String, String)]) -> String {
    let mut pairs = vec![p("Action", action), p("Version", version)];
    pairs.extend(params.iter().cloned());
    pairs
        .iter()
        .map(|(k, v)| {
            format!(
                "{}={}",
                super::sigv4::uri_encode(k, false),
                super::sigv4::uri_encode(v, false)
            )
        })
        .collect::<Vec<_>>()
        .join("&")
}

/// Sends `action` of API `version` to `service`; the answer's XML text. `name` is how errors
/// call the service (EC2, ELBv2).
pub(super) fn call(
    client: &Client,
    (service, version, name): (Service, &str, &str),
    action: &'static str,
    params: &[(String, String)],
) -> Result<String> {
    let body = form(version, action, params);
    let reply = client.send(&Call {
        service,
        operation: action,
        method: "POST",
        path: "/".into(),
        query: Vec::new(),
        headers: vec![(
            "content-type".into(),
            "application/x-www-form-urlencoded; charset=utf-8".into(),
        )],
        body: body.as_bytes(),
        body_sha256: None,
    })?;
    String::from_utf8(reply.body)
        .with_context(|| format!("{name} {action} answered with non-UTF-8"))
}

/// The text of `node`'s child element `name`.
pub(super) fn child_text(node: roxmltree::Node, name: &str) -> Option<String> {
    node.children()
        .find(|c| c.has_tag_name(name))
        .and_then(|c| c.text())
        .map(str::to_string)
}
