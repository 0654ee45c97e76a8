//! The Security Token Service's AssumeRole (Query protocol): a profile's `role_arn` assumed
//! with its `source_profile`'s credentials, as the AWS CLI does, before any other call.

use super::http::Client;
use super::profile::{AssumeRole, Service};
use super::query::{child_text, p};
use super::sigv4::Credentials;
use anyhow::{Context, Result};

const VERSION: &str = "2011-06-15";

/// A client signing with `role`'s temporary credentials, got with `client`'s (the source
/// profile's).
pub(crate) fn assume_role(client: &Client, role: &AssumeRole) -> Result<Client> {
    let xml = super::query::call(
        client,
        (Service::Sts, VERSION, "STS"),
        "AssumeRole",
        &params(role),
    )
    .with_context(|| {
        format!(
            "Cannot assume {} (profile {}, with the credentials of profile {})",
            role.role_arn, role.profile, role.source_profile
        )
    })?;
    let mut session = client.session().clone();
    session.credentials = parse_credentials(&xml, role)?;
    Ok(client.with_session(session))
}

fn params(role: &AssumeRole) -> Vec<(String, String)> {
    let mut params = vec![
        p("RoleArn", &role.role_arn),
        p("RoleSessionName", &role.session_name),
    ];
    if let Some(id) = &role.external_id {
        params.push(p("ExternalId", id));
    }
    if let Some(seconds) = role.duration_seconds {
        params.push(p("DurationSeconds", seconds.to_string()));
    }
    params
}

/// The temporary credentials in an AssumeRole answer.
fn parse_credentials(xml: &str, role: &AssumeRole) -> Result<Credentials> {
    let doc = roxmltree::Document::parse(xml).context("STS AssumeRole answered with bad XML")?;
    let node = doc
        .descendants()
        .find(|n| n.has_tag_name("Credentials"))
        .context("STS AssumeRole answered without Credentials")?;
    let field = |name: &str| {
        child_text(node, name)
            .filter(|v| !v.is_empty())
            .with_context(|| format!("STS AssumeRole answered without {name}"))
    };
    Ok(Credentials {
        access_key_id: field("AccessKeyId")?,
        secret_access_key: field("SecretAccessKey")?,
        session_token: Some(field("SessionToken")?),
        source: format!(
            "role {} assumed with profile {} (profile {})",
            role.role_arn, role.source_profile, role.profile
        ),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn role() -> AssumeRole {
        AssumeRole {
            role_arn: "arn:aws:iam::123456789012:role/deployer".into(),
            session_name: "fuse-1".into(),
            external_id: Some("ext".into()),
            duration_seconds: Some(900),
            profile: "prod".into(),
            source_profile: "base".into(),
        }
    }

    #[test]
    fn answer_is_read() {
        // AWS's documented answer, shortened.
        let xml = r#"<AssumeRoleResponse xmlns="https://sts.amazonaws.com/doc/2011-06-15/">
  <AssumeRoleResult>
    <AssumedRoleUser><Arn>arn:aws:sts::123456789012:assumed-role/deployer/fuse-1</Arn></AssumedRoleUser>
    <Credentials>
      <AccessKeyId>ASIAEXAMPLE</AccessKeyId>
      <SecretAccessKey>wJalrXUtnFEMI</SecretAccessKey>
      <SessionToken>AQoDYXdzEPT</SessionToken>
      <Expiration>2026-12-04T19:00:00Z</Expiration>
    </Credentials>
  </AssumeRoleResult>
</AssumeRoleResponse>"#;
        let c = parse_credentials(xml, &role()).unwrap();
        assert_eq!(c.access_key_id, "ASIAEXAMPLE");
        assert_eq!(c.secret_access_key, "wJalrXUtnFEMI");
        assert_eq!(c.session_token.as_deref(), Some("AQoDYXdzEPT"));
        assert!(c
            .source
            .contains("role arn:aws:iam::123456789012:role/deployer"));
        let e = parse_credentials("<AssumeRoleResponse/>", &role()).unwrap_err();
        assert_eq!(e.to_string(), "STS AssumeRole answered without Credentials");
    }

    #[test]
    fn parameters() {
        let got = params(&role());
        let keys: Vec<&str> = got.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(
            keys,
            [
                "RoleArn",
                "RoleSessionName",
                "ExternalId",
                "DurationSeconds"
            ]
        );
        assert_eq!(got[3].1, "900");
    }
}
