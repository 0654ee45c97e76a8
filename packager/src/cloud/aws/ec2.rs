//! The few EC2 Query API calls fuse makes (`Action=…&Version=2016-11-15`, form-encoded POST,
//! XML answers read with roxmltree).

use super::http::{has_code, Client};
use super::profile::Service;
use super::query::{child_text, p};
use anyhow::{bail, Context, Result};
use std::collections::BTreeMap;

const VERSION: &str = "2016-11-15";

fn call(client: &Client, action: &'static str, params: &[(String, String)]) -> Result<String> {
    super::query::call(client, (Service::Ec2, VERSION, "EC2"), action, params)
}

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

/// Removes the tag `key` from `resource`, only while it has `value` (EC2 checks the value:
/// a tag another run rewrote stays).
pub(crate) fn delete_tag(client: &Client, resource: &str, key: &str, value: &str) -> Result<()> {
    let params = [
        p("ResourceId.1", resource),
        p("Tag.1.Key", key),
        p("Tag.1.Value", value),
    ];
    call(client, "DeleteTags", &params).map(drop)
}

/// An instance as DescribeInstances lists it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub(crate) struct Instance {
    pub(crate) id: String,
    pub(crate) image: String,
    /// pending, running, shutting-down, terminated, stopping, stopped.
    pub(crate) state: String,
    /// Why it left `running` (stateReason's message), when EC2 says.
    pub(crate) state_reason: Option<String>,
    pub(crate) public_ip: Option<String>,
    /// t3.micro, …
    pub(crate) instance_type: String,
    /// As EC2 writes it (ISO 8601 in UTC: sorts as text).
    pub(crate) launch_time: String,
    pub(crate) tags: BTreeMap<String, String>,
}

/// An Elastic IP address as DescribeAddresses lists it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub(crate) struct Address {
    pub(crate) allocation: String,
    pub(crate) public_ip: String,
    pub(crate) instance: Option<String>,
    pub(crate) association: Option<String>,
    pub(crate) tags: BTreeMap<String, String>,
}

/// A security group as DescribeSecurityGroups lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SecurityGroup {
    pub(crate) id: String,
    pub(crate) name: String,
    pub(crate) tags: BTreeMap<String, String>,
}

/// What RunInstances is given.
#[derive(Debug, Clone)]
pub(crate) struct Launch {
    pub(crate) image: String,
    pub(crate) instance_type: String,
    pub(crate) user_data: String,
    pub(crate) security_group: String,
    pub(crate) tags: Vec<(String, String)>,
    /// Makes a retried RunInstances launch one instance, not two.
    pub(crate) client_token: String,
}

/// `Filter.N.Name` / `Filter.N.Value.M` for the calls that take no owner (instances,
/// addresses, security groups).
fn filter_params(with: &[(&str, &[&str])]) -> Vec<(String, String)> {
    let mut params = Vec::new();
    for (i, (name, values)) in with.iter().enumerate() {
        params.push(p(format!("Filter.{}.Name", i + 1), *name));
        for (j, value) in values.iter().enumerate() {
            params.push(p(format!("Filter.{}.Value.{}", i + 1, j + 1), *value));
        }
    }
    params
}

/// The `tagSet` of an item.
fn tags_of(node: roxmltree::Node) -> BTreeMap<String, String> {
    node.children()
        .filter(|c| c.has_tag_name("tagSet"))
        .flat_map(|s| s.children().filter(|c| c.has_tag_name("item")))
        .filter_map(|t| Some((child_text(t, "key")?, child_text(t, "value")?)))
        .collect()
}

/// The instances with every `(filter name, values)` (any of the values).
pub(crate) fn describe_instances(
    client: &Client,
    with: &[(&str, &[&str])],
) -> Result<Vec<Instance>> {
    let xml = call(client, "DescribeInstances", &filter_params(with))?;
    parse_instances(&xml)
}

pub(crate) fn parse_instances(xml: &str) -> Result<Vec<Instance>> {
    let doc = parse(xml, "DescribeInstances")?;
    Ok(items(&doc, "reservationSet")
        .into_iter()
        .flat_map(|r| {
            r.children()
                .filter(|c| c.has_tag_name("instancesSet"))
                .flat_map(|s| s.children().filter(|c| c.has_tag_name("item")))
        })
        .filter_map(|item| {
            Some(Instance {
                id: child_text(item, "instanceId")?,
                image: child_text(item, "imageId").unwrap_or_default(),
                state: item
                    .children()
                    .find(|c| c.has_tag_name("instanceState"))
                    .and_then(|s| child_text(s, "name"))
                    .unwrap_or_default(),
                state_reason: item
                    .children()
                    .find(|c| c.has_tag_name("stateReason"))
                    .and_then(|s| child_text(s, "message"))
                    .filter(|m| !m.is_empty()),
                public_ip: child_text(item, "ipAddress"),
                instance_type: child_text(item, "instanceType").unwrap_or_default(),
                launch_time: child_text(item, "launchTime").unwrap_or_default(),
                tags: tags_of(item),
            })
        })
        .collect())
}

/// The parameters of RunInstances: one instance, IMDSv2 only, tagged at launch.
pub(crate) fn launch_params(l: &Launch) -> Vec<(String, String)> {
    use base64::Engine;
    let mut params = vec![
        p("ImageId", &l.image),
        p("InstanceType", &l.instance_type),
        p("MinCount", "1"),
        p("MaxCount", "1"),
        p("ClientToken", &l.client_token),
        p(
            "UserData",
            base64::engine::general_purpose::STANDARD.encode(&l.user_data),
        ),
        p("SecurityGroupId.1", &l.security_group),
        p("MetadataOptions.HttpTokens", "required"),
        p("MetadataOptions.HttpEndpoint", "enabled"),
        p("TagSpecification.1.ResourceType", "instance"),
    ];
    for (i, (k, v)) in l.tags.iter().enumerate() {
        params.push(p(format!("TagSpecification.1.Tag.{}.Key", i + 1), k));
        params.push(p(format!("TagSpecification.1.Tag.{}.Value", i + 1), v));
    }
    params
}

/// Launches one instance; its id.
pub(crate) fn run_instance(client: &Client, l: &Launch) -> Result<String> {
    let xml = call(client, "RunInstances", &launch_params(l))?;
    let doc = parse(&xml, "RunInstances")?;
    items(&doc, "instancesSet")
        .into_iter()
        .find_map(|i| child_text(i, "instanceId"))
        .context("EC2 RunInstances answered without an instanceId")
}

pub(crate) fn terminate_instances(client: &Client, ids: &[&str]) -> Result<()> {
    if ids.is_empty() {
        return Ok(());
    }
    let params: Vec<_> = ids
        .iter()
        .enumerate()
        .map(|(i, id)| p(format!("InstanceId.{}", i + 1), *id))
        .collect();
    call(client, "TerminateInstances", &params).map(drop)
}

/// The instance's console output, decoded (empty when EC2 has none yet).
pub(crate) fn console_output(client: &Client, instance: &str) -> Result<String> {
    use base64::Engine;
    let xml = call(
        client,
        "GetConsoleOutput",
        &[p("InstanceId", instance), p("Latest", "true")],
    )?;
    let doc = parse(&xml, "GetConsoleOutput")?;
    let encoded = child_text(doc.root_element(), "output").unwrap_or_default();
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(encoded.trim())
        .context("EC2 GetConsoleOutput answered with bad base64")?;
    Ok(String::from_utf8_lossy(&bytes).into_owned())
}

/// The instance's user-data, decoded.
pub(crate) fn user_data(client: &Client, instance: &str) -> Result<String> {
    use base64::Engine;
    let xml = call(
        client,
        "DescribeInstanceAttribute",
        &[p("InstanceId", instance), p("Attribute", "userData")],
    )?;
    let doc = parse(&xml, "DescribeInstanceAttribute")?;
    let encoded = doc
        .root_element()
        .children()
        .find(|c| c.has_tag_name("userData"))
        .and_then(|u| child_text(u, "value"))
        .unwrap_or_default();
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(encoded.trim())
        .context("EC2 DescribeInstanceAttribute answered with bad base64")?;
    String::from_utf8(bytes).context("The instance's user-data is not UTF-8")
}

pub(crate) fn describe_security_groups(
    client: &Client,
    with: &[(&str, &[&str])],
) -> Result<Vec<SecurityGroup>> {
    let xml = call(client, "DescribeSecurityGroups", &filter_params(with))?;
    let doc = parse(&xml, "DescribeSecurityGroups")?;
    Ok(items(&doc, "securityGroupInfo")
        .into_iter()
        .filter_map(|item| {
            Some(SecurityGroup {
                id: child_text(item, "groupId")?,
                name: child_text(item, "groupName").unwrap_or_default(),
                tags: tags_of(item),
            })
        })
        .collect())
}

/// Creates a security group (in the default VPC); its id. `description` has no spaces (see
/// [`super::super::ami`]'s description: moto re-encodes them).
pub(crate) fn create_security_group(
    client: &Client,
    name: &str,
    description: &str,
) -> Result<String> {
    let xml = call(
        client,
        "CreateSecurityGroup",
        &[p("GroupName", name), p("GroupDescription", description)],
    )?;
    let doc = parse(&xml, "CreateSecurityGroup")?;
    child_text(doc.root_element(), "groupId")
        .context("EC2 CreateSecurityGroup answered without a groupId")
}

/// Opens each TCP port of `ports` to everyone (one call each: a port open already is
/// refused as a duplicate, and skipped).
pub(crate) fn open_ports(client: &Client, group: &str, ports: &[u16]) -> Result<()> {
    world_rules(
        client,
        group,
        ports,
        "AuthorizeSecurityGroupIngress",
        "InvalidPermission.Duplicate",
    )
}

/// Closes TCP `ports` of `group` to the internet (the rules [`open_ports`] adds); a rule not
/// there is skipped.
pub(crate) fn close_ports_to_world(client: &Client, group: &str, ports: &[u16]) -> Result<()> {
    world_rules(
        client,
        group,
        ports,
        "RevokeSecurityGroupIngress",
        "InvalidPermission.NotFound",
    )
}

/// `action` on the rule letting everyone (0.0.0.0/0) reach each TCP port of `ports`, one call
/// per port; EC2 refusing one with `nothing_to_do` (the rule is already as asked) is skipped.
fn world_rules(
    client: &Client,
    group: &str,
    ports: &[u16],
    action: &'static str,
    nothing_to_do: &str,
) -> Result<()> {
    for port in ports {
        let params = [
            p("GroupId", group),
            p("IpPermissions.1.IpProtocol", "tcp"),
            p("IpPermissions.1.FromPort", port.to_string()),
            p("IpPermissions.1.ToPort", port.to_string()),
            p("IpPermissions.1.IpRanges.1.CidrIp", "0.0.0.0/0"),
        ];
        match call(client, action, &params) {
            Err(e) if has_code(&e, nothing_to_do) => {}
            other => other.map(drop)?,
        }
    }
    Ok(())
}

/// Opens TCP `port` to the members of the security group `source` (a load balancer's); a
/// rule there already is skipped.
pub(crate) fn open_port_to_group(
    client: &Client,
    group: &str,
    port: u16,
    source: &str,
) -> Result<()> {
    let params = [
        p("GroupId", group),
        p("IpPermissions.1.IpProtocol", "tcp"),
        p("IpPermissions.1.FromPort", port.to_string()),
        p("IpPermissions.1.ToPort", port.to_string()),
        p("IpPermissions.1.Groups.1.GroupId", source),
    ];
    match call(client, "AuthorizeSecurityGroupIngress", &params) {
        Err(e) if has_code(&e, "InvalidPermission.Duplicate") => Ok(()),
        other => other.map(drop),
    }
}

/// The default VPC and one of its default subnets per availability zone (an application load
/// balancer needs two zones at least).
pub(crate) fn default_subnets(client: &Client) -> Result<(String, Vec<String>)> {
    let xml = call(
        client,
        "DescribeVpcs",
        &filter_params(&[("isDefault", &["true"])]),
    )?;
    let doc = parse(&xml, "DescribeVpcs")?;
    let vpc = items(&doc, "vpcSet")
        .into_iter()
        .find_map(|v| child_text(v, "vpcId"))
        .context("This region has no default VPC: an application load balancer goes in the default VPC's subnets (create one with `aws ec2 create-default-vpc`)")?;
    let xml = call(
        client,
        "DescribeSubnets",
        &filter_params(&[("vpc-id", &[vpc.as_str()]), ("default-for-az", &["true"])]),
    )?;
    let doc = parse(&xml, "DescribeSubnets")?;
    let mut by_zone: BTreeMap<String, String> = BTreeMap::new();
    for s in items(&doc, "subnetSet") {
        if let (Some(id), Some(zone)) =
            (child_text(s, "subnetId"), child_text(s, "availabilityZone"))
        {
            by_zone.entry(zone).or_insert(id);
        }
    }
    if by_zone.len() < 2 {
        bail!("The default VPC {vpc} has default subnets in {} availability zone(s): an application load balancer needs two", by_zone.len());
    }
    Ok((vpc, by_zone.into_values().collect()))
}

pub(crate) fn delete_security_group(client: &Client, group: &str) -> Result<()> {
    call(client, "DeleteSecurityGroup", &[p("GroupId", group)]).map(drop)
}

pub(crate) fn describe_addresses(
    client: &Client,
    with: &[(&str, &[&str])],
) -> Result<Vec<Address>> {
    let xml = call(client, "DescribeAddresses", &filter_params(with))?;
    let doc = parse(&xml, "DescribeAddresses")?;
    Ok(items(&doc, "addressesSet")
        .into_iter()
        .filter_map(|item| {
            Some(Address {
                allocation: child_text(item, "allocationId")?,
                public_ip: child_text(item, "publicIp").unwrap_or_default(),
                instance: child_text(item, "instanceId").filter(|i| !i.is_empty()),
                association: child_text(item, "associationId").filter(|i| !i.is_empty()),
                tags: tags_of(item),
            })
        })
        .collect())
}

/// The parameters of AllocateAddress: the VPC scope, tagged in the same call.
fn allocate_params(tags: &[(&str, &str)]) -> Vec<(String, String)> {
    let mut params = vec![
        p("Domain", "vpc"),
        p("TagSpecification.1.ResourceType", "elastic-ip"),
    ];
    for (i, (k, v)) in tags.iter().enumerate() {
        params.push(p(format!("TagSpecification.1.Tag.{}.Key", i + 1), *k));
        params.push(p(format!("TagSpecification.1.Tag.{}.Value", i + 1), *v));
    }
    params
}

/// Allocates an Elastic IP address in the VPC scope, with its `tags` from the start (a run
/// stopped right after cannot leave an untagged address that nothing finds again):
/// (allocation id, address).
pub(crate) fn allocate_address(client: &Client, tags: &[(&str, &str)]) -> Result<(String, String)> {
    let xml = call(client, "AllocateAddress", &allocate_params(tags))?;
    let doc = parse(&xml, "AllocateAddress")?;
    let root = doc.root_element();
    match (
        child_text(root, "allocationId"),
        child_text(root, "publicIp"),
    ) {
        (Some(id), Some(ip)) => Ok((id, ip)),
        _ => bail!("EC2 AllocateAddress answered without an allocationId and publicIp"),
    }
}

/// Points the address at `instance`, taking it from the instance it pointed at.
pub(crate) fn associate_address(client: &Client, allocation: &str, instance: &str) -> Result<()> {
    call(
        client,
        "AssociateAddress",
        &[
            p("AllocationId", allocation),
            p("InstanceId", instance),
            p("AllowReassociation", "true"),
        ],
    )
    .map(drop)
}

pub(crate) fn disassociate_address(client: &Client, association: &str) -> Result<()> {
    call(
        client,
        "DisassociateAddress",
        &[p("AssociationId", association)],
    )
    .map(drop)
}

pub(crate) fn release_address(client: &Client, allocation: &str) -> Result<()> {
    call(client, "ReleaseAddress", &[p("AllocationId", allocation)]).map(drop)
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
        let params = filters(&[("tag:fuse:digest", "sha256:ab")]);
        assert_eq!(
            super::super::query::form(VERSION, "DescribeImages", &params),
            "Action=DescribeImages&Version=2016-11-15&Owner.1=self&Filter.1.Name=tag%3Afuse%3Adigest&Filter.1.Value.1=sha256%3Aab"
        );
    }

    #[test]
    fn reads_describe_instances() {
        let xml = r#"<DescribeInstancesResponse xmlns="http://ec2.amazonaws.com/doc/2016-11-15/">
  <reservationSet><item><reservationId>r-1</reservationId><instancesSet><item>
    <instanceId>i-1</instanceId><imageId>ami-1</imageId>
    <instanceState><code>16</code><name>running</name></instanceState>
    <ipAddress>203.0.113.5</ipAddress><instanceType>t3.small</instanceType><launchTime>2026-12-03T10:00:00.000Z</launchTime>
    <tagSet><item><key>fuse:app</key><value>web</value></item></tagSet>
  </item></instancesSet></item></reservationSet>
</DescribeInstancesResponse>"#;
        assert_eq!(
            parse_instances(xml).unwrap(),
            vec![Instance {
                id: "i-1".into(),
                image: "ami-1".into(),
                state: "running".into(),
                state_reason: None,
                public_ip: Some("203.0.113.5".into()),
                instance_type: "t3.small".into(),
                launch_time: "2026-12-03T10:00:00.000Z".into(),
                tags: BTreeMap::from([("fuse:app".to_string(), "web".to_string())]),
            }]
        );
    }

    #[test]
    fn addresses_are_tagged_when_allocated() {
        let params = allocate_params(&[("fuse:app", "web"), ("fuse:env", "prod")]);
        let get = |k: &str| {
            params
                .iter()
                .find(|(key, _)| key == k)
                .map(|(_, v)| v.as_str())
        };
        assert_eq!(get("TagSpecification.1.ResourceType"), Some("elastic-ip"));
        assert_eq!(get("TagSpecification.1.Tag.2.Key"), Some("fuse:env"));
        assert_eq!(get("TagSpecification.1.Tag.2.Value"), Some("prod"));
    }

    #[test]
    fn launch_is_imdsv2_only_and_tagged() {
        let params = launch_params(&Launch {
            image: "ami-1".into(),
            instance_type: "t3.micro".into(),
            user_data: "{\"fuse\":1}\n".into(),
            security_group: "sg-1".into(),
            tags: vec![("fuse:app".into(), "web".into())],
            client_token: "t".into(),
        });
        let get = |k: &str| {
            params
                .iter()
                .find(|(key, _)| key == k)
                .map(|(_, v)| v.as_str())
        };
        assert_eq!(get("MetadataOptions.HttpTokens"), Some("required"));
        assert_eq!(get("UserData"), Some("eyJmdXNlIjoxfQo="));
        assert_eq!(get("TagSpecification.1.Tag.1.Key"), Some("fuse:app"));
    }
}
