//! The few EC2 Query API calls fuse makes (`Action=…&Version=2016-11-15`, form-encoded POST,
//! XML answers read with roxmltree).

use super::http::{Call, Client};
use super::profile::Service;
use anyhow::{bail, Context, Result};
use std::collections::BTreeMap;

const VERSION: &str = "2016-11-15";

/// An AMI as DescribeImages lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Image {
    pub(crate) id: String,
    pub(crate) name: String,
    pub(crate) state: String,
    /// The snapshot of its first EBS block device, when EC2 reports one.
    pub(crate) snapshot: Option<String>,
}

/// A snapshot as DescribeSnapshots lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Snapshot {
    pub(crate) id: String,
    pub(crate) state: String,
    pub(crate) progress: String,
    /// When it was started, as EC2 writes it (ISO 8601 in UTC: sorts as text).
    pub(crate) start_time: String,
    /// The size of its volume in GiB (0 when EC2 left it out).
    pub(crate) volume_gib: u64,
    pub(crate) tags: BTreeMap<String, String>,
}

/// What RegisterImage is given.
#[derive(Debug, Clone)]
pub(crate) struct Registration {
    pub(crate) name: String,
    pub(crate) description: String,
    /// `x86_64` or `arm64`.
    pub(crate) architecture: &'static str,
    pub(crate) snapshot: String,
    pub(crate) root_device: &'static str,
}

/// A form-encoded Query API body: the pairs in order, encoded as SigV4 does.
fn form(action: &str, params: &[(String, String)]) -> String {
    let mut pairs = vec![
        ("Action".to_string(), action.to_string()),
        ("Version".to_string(), VERSION.to_string()),
    ];
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

fn call(client: &Client, action: &'static str, params: &[(String, String)]) -> Result<String> {
    let body = form(action, params);
    let reply = client.send(&Call {
        service: Service::Ec2,
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
    String::from_utf8(reply.body).with_context(|| format!("EC2 {action} answered with non-UTF-8"))
}

fn p(k: impl Into<String>, v: impl Into<String>) -> (String, String) {
    (k.into(), v.into())
}

/// `Owner.1=self` (DescribeImages and DescribeSnapshots both take it) and the filters
/// `Filter.N.Name`/`Filter.N.Value.1`.
fn filters(filters: &[(&str, &str)]) -> Vec<(String, String)> {
    let mut params = vec![p("Owner.1", "self")];
    for (i, (name, value)) in filters.iter().enumerate() {
        params.push(p(format!("Filter.{}.Name", i + 1), *name));
        params.push(p(format!("Filter.{}.Value.1", i + 1), *value));
    }
    params
}

/// The text of `node`'s child element `name`.
fn child_text(node: roxmltree::Node, name: &str) -> Option<String> {
    node.children()
        .find(|c| c.has_tag_name(name))
        .and_then(|c| c.text())
        .map(str::to_string)
}

/// The `item` children of the element `set` directly under the document's root.
fn items<'a>(doc: &'a roxmltree::Document<'a>, set: &str) -> Vec<roxmltree::Node<'a, 'a>> {
    doc.root_element()
        .children()
        .filter(|c| c.has_tag_name(set))
        .flat_map(|s| s.children().filter(|c| c.has_tag_name("item")))
        .collect()
}

fn parse<'a>(xml: &'a str, action: &str) -> Result<roxmltree::Document<'a>> {
    roxmltree::Document::parse(xml).with_context(|| format!("EC2 {action} answered with bad XML"))
}

/// The images owned by this account with every `(filter name, value)`.
pub(crate) fn describe_images(client: &Client, with: &[(&str, &str)]) -> Result<Vec<Image>> {
    let xml = call(client, "DescribeImages", &filters(with))?;
    parse_images(&xml)
}

pub(crate) fn parse_images(xml: &str) -> Result<Vec<Image>> {
    let doc = parse(xml, "DescribeImages")?;
    Ok(items(&doc, "imagesSet")
        .into_iter()
        .filter_map(|item| {
            let snapshot = item
                .children()
                .find(|c| c.has_tag_name("blockDeviceMapping"))
                .and_then(|m| m.descendants().find(|d| d.has_tag_name("snapshotId")))
                .and_then(|s| s.text())
                .map(str::to_string);
            Some(Image {
                id: child_text(item, "imageId")?,
                name: child_text(item, "name").unwrap_or_default(),
                state: child_text(item, "imageState").unwrap_or_default(),
                snapshot,
            })
        })
        .collect())
}

/// The snapshots owned by this account with every `(filter name, value)`.
pub(crate) fn describe_snapshots(client: &Client, with: &[(&str, &str)]) -> Result<Vec<Snapshot>> {
    let xml = call(client, "DescribeSnapshots", &filters(with))?;
    parse_snapshots(&xml)
}

pub(crate) fn parse_snapshots(xml: &str) -> Result<Vec<Snapshot>> {
    let doc = parse(xml, "DescribeSnapshots")?;
    Ok(items(&doc, "snapshotSet")
        .into_iter()
        .filter_map(|item| {
            let tags = item
                .children()
                .filter(|c| c.has_tag_name("tagSet"))
                .flat_map(|s| s.children().filter(|c| c.has_tag_name("item")))
                .filter_map(|t| Some((child_text(t, "key")?, child_text(t, "value")?)))
                .collect();
            Some(Snapshot {
                id: child_text(item, "snapshotId")?,
                state: child_text(item, "status").unwrap_or_default(),
                progress: child_text(item, "progress").unwrap_or_default(),
                start_time: child_text(item, "startTime").unwrap_or_default(),
                volume_gib: child_text(item, "volumeSize")
                    .and_then(|v| v.trim().parse().ok())
                    .unwrap_or(0),
                tags,
            })
        })
        .collect())
}

/// The parameters of RegisterImage for an image that boots as fuse's disk does: UEFI, ENA,
/// NVMe-ready (HVM), IMDSv2 required, the snapshot as its root (gp3, deleted with the instance).
pub(crate) fn registration_params(r: &Registration) -> Vec<(String, String)> {
    vec![
        p("Name", &r.name),
        p("Description", &r.description),
        p("Architecture", r.architecture),
        p("VirtualizationType", "hvm"),
        p("BootMode", "uefi"),
        p("EnaSupport", "true"),
        p("ImdsSupport", "v2.0"),
        p("RootDeviceName", r.root_device),
        p("BlockDeviceMapping.1.DeviceName", r.root_device),
        p("BlockDeviceMapping.1.Ebs.SnapshotId", &r.snapshot),
        p("BlockDeviceMapping.1.Ebs.VolumeType", "gp3"),
        p("BlockDeviceMapping.1.Ebs.DeleteOnTermination", "true"),
    ]
}

/// Registers the AMI; its id.
pub(crate) fn register_image(client: &Client, r: &Registration) -> Result<String> {
    let xml = call(client, "RegisterImage", &registration_params(r))?;
    let doc = parse(&xml, "RegisterImage")?;
    match child_text(doc.root_element(), "imageId") {
        Some(id) => Ok(id),
        None => bail!("EC2 RegisterImage answered without an imageId"),
    }
}

/// Tags `resources` with every `(key, value)`.
pub(crate) fn create_tags(
    client: &Client,
    resources: &[&str],
    tags: &[(&str, &str)],
) -> Result<()> {
    let mut params = Vec::new();
    for (i, r) in resources.iter().enumerate() {
        params.push(p(format!("ResourceId.{}", i + 1), *r));
    }
    for (i, (k, v)) in tags.iter().enumerate() {
        params.push(p(format!("Tag.{}.Key", i + 1), *k));
        params.push(p(format!("Tag.{}.Value", i + 1), *v));
    }
    call(client, "CreateTags", &params).map(drop)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_describe_images() {
        let xml = r#"<?xml version="1.0" encoding="UTF-8"?>
<DescribeImagesResponse xmlns="http://ec2.amazonaws.com/doc/2016-11-15/">
  <requestId>r</requestId>
  <imagesSet>
    <item>
      <imageId>ami-0abc</imageId>
      <imageState>available</imageState>
      <name>fuse-hello-1.0-0123456789ab</name>
      <blockDeviceMapping>
        <item><deviceName>/dev/xvda</deviceName>
          <ebs><snapshotId>snap-0def</snapshotId><volumeSize>1</volumeSize></ebs></item>
      </blockDeviceMapping>
      <tagSet><item><key>fuse:digest</key><value>sha256:x</value></item></tagSet>
    </item>
    <item><imageId>ami-2</imageId><name>n</name><blockDeviceMapping/></item>
  </imagesSet>
</DescribeImagesResponse>"#;
        let images = parse_images(xml).unwrap();
        assert_eq!(images.len(), 2);
        assert_eq!(
            images[0],
            Image {
                id: "ami-0abc".into(),
                name: "fuse-hello-1.0-0123456789ab".into(),
                state: "available".into(),
                snapshot: Some("snap-0def".into()),
            }
        );
        assert_eq!(images[1].snapshot, None);
        let empty = r#"<DescribeImagesResponse xmlns="http://ec2.amazonaws.com/doc/2016-11-15/"><imagesSet/></DescribeImagesResponse>"#;
        assert!(parse_images(empty).unwrap().is_empty());
    }

    #[test]
    fn reads_describe_snapshots() {
        let xml = r#"<DescribeSnapshotsResponse xmlns="http://ec2.amazonaws.com/doc/2016-11-15/">
  <snapshotSet><item><snapshotId>snap-1</snapshotId><status>pending</status><progress>40%</progress>
  <startTime>2026-12-03T08:15:32.000Z</startTime><volumeSize>2</volumeSize>
  <tagSet><item><key>k</key><value>v</value></item></tagSet></item></snapshotSet>
</DescribeSnapshotsResponse>"#;
        assert_eq!(
            parse_snapshots(xml).unwrap(),
            vec![Snapshot {
                id: "snap-1".into(),
                state: "pending".into(),
                progress: "40%".into(),
                start_time: "2026-12-03T08:15:32.000Z".into(),
                volume_gib: 2,
                tags: BTreeMap::from([("k".to_string(), "v".to_string())]),
            }]
        );
    }

    #[test]
    fn query_bodies() {
        assert_eq!(
            form("DescribeImages", &filters(&[("tag:fuse:digest", "sha256:ab")])),
            "Action=DescribeImages&Version=2016-11-15&Owner.1=self&Filter.1.Name=tag%3Afuse%3Adigest&Filter.1.Value.1=sha256%3Aab"
        );
    }
}
