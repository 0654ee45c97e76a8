//! The few Elastic Load Balancing (v2) Query API calls fuse makes for an application load
//! balancer (`Action=…&Version=2015-12-01`, form-encoded POST, XML answers read with
//! roxmltree): the balancer, its one listener, a target group per release, their targets and
//! tags.

use super::http::{has_code, Client};
use super::profile::Service;
use super::query::{child_text, p};
use anyhow::{Context, Result};
use std::collections::BTreeMap;

const VERSION: &str = "2015-12-01";

/// A load balancer as DescribeLoadBalancers lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct LoadBalancer {
    pub(crate) arn: String,
    pub(crate) name: String,
    pub(crate) dns_name: String,
    pub(crate) vpc: String,
}

/// A target group as DescribeTargetGroups lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct TargetGroup {
    pub(crate) arn: String,
    pub(crate) name: String,
}

/// A listener as DescribeListeners lists it: its port and the target group it forwards to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Listener {
    pub(crate) arn: String,
    pub(crate) port: u16,
    pub(crate) target_group: Option<String>,
}

/// One target's health as DescribeTargetHealth reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct TargetHealth {
    pub(crate) id: String,
    /// initial, healthy, unhealthy, unused, draining, unavailable.
    pub(crate) state: String,
    pub(crate) reason: Option<String>,
}

/// What CreateTargetGroup is given: HTTP to the instances' `port`, checked with `GET path`
/// answering `matcher` (`200-399`).
#[derive(Debug, Clone)]
pub(crate) struct NewTargetGroup {
    pub(crate) name: String,
    pub(crate) vpc: String,
    pub(crate) port: u16,
    pub(crate) health_path: String,
    pub(crate) matcher: String,
    pub(crate) tags: Vec<(String, String)>,
}

fn call(client: &Client, action: &'static str, params: &[(String, String)]) -> Result<String> {
    super::query::call(client, (Service::Elbv2, VERSION, "ELBv2"), action, params)
}

fn parse_doc<'a>(xml: &'a str, action: &str) -> Result<roxmltree::Document<'a>> {
    roxmltree::Document::parse(xml).with_context(|| format!("ELBv2 {action} answered with bad XML"))
}

/// The `member` children of the first element named `list` anywhere in the document.
fn members<'a>(doc: &'a roxmltree::Document<'a>, list: &str) -> Vec<roxmltree::Node<'a, 'a>> {
    doc.descendants()
        .find(|n| n.has_tag_name(list))
        .map(|l| l.children().filter(|c| c.has_tag_name("member")).collect())
        .unwrap_or_default()
}

/// `Prefix.member.N` for each value.
fn list(prefix: &str, values: &[&str]) -> Vec<(String, String)> {
    values
        .iter()
        .enumerate()
        .map(|(i, v)| p(format!("{prefix}.member.{}", i + 1), *v))
        .collect()
}

/// `Tags.member.N.Key` / `.Value`.
fn tag_params(tags: &[(&str, &str)]) -> Vec<(String, String)> {
    let mut params = Vec::new();
    for (i, (k, v)) in tags.iter().enumerate() {
        params.push(p(format!("Tags.member.{}.Key", i + 1), *k));
        params.push(p(format!("Tags.member.{}.Value", i + 1), *v));
    }
    params
}

fn parse_load_balancers(xml: &str, action: &str) -> Result<Vec<LoadBalancer>> {
    let doc = parse_doc(xml, action)?;
    Ok(members(&doc, "LoadBalancers")
        .into_iter()
        .filter_map(|m| {
            Some(LoadBalancer {
                arn: child_text(m, "LoadBalancerArn")?,
                name: child_text(m, "LoadBalancerName").unwrap_or_default(),
                dns_name: child_text(m, "DNSName").unwrap_or_default(),
                vpc: child_text(m, "VpcId").unwrap_or_default(),
            })
        })
        .collect())
}

/// Every page of a Describe call: `parse` of each answer, following `NextMarker`.
fn all_pages<T>(
    client: &Client,
    action: &'static str,
    parse: impl Fn(&str) -> Result<Vec<T>>,
) -> Result<Vec<T>> {
    let mut found = Vec::new();
    let mut marker: Option<String> = None;
    loop {
        let mut params = vec![p("PageSize", "400")];
        if let Some(m) = &marker {
            params.push(p("Marker", m));
        }
        let xml = call(client, action, &params)?;
        found.extend(parse(&xml)?);
        let doc = parse_doc(&xml, action)?;
        marker = doc
            .descendants()
            .find(|n| n.has_tag_name("NextMarker"))
            .and_then(|n| n.text())
            .filter(|m| !m.is_empty())
            .map(str::to_string);
        if marker.is_none() {
            return Ok(found);
        }
    }
}

/// Every load balancer of the region (fuse's are found by their tags after).
pub(crate) fn describe_load_balancers(client: &Client) -> Result<Vec<LoadBalancer>> {
    all_pages(client, "DescribeLoadBalancers", |xml| {
        parse_load_balancers(xml, "DescribeLoadBalancers")
    })
}

/// The load balancer named `name`, if there is one.
pub(crate) fn load_balancer_named(client: &Client, name: &str) -> Result<Option<LoadBalancer>> {
    match call(client, "DescribeLoadBalancers", &list("Names", &[name])) {
        Ok(xml) => Ok(parse_load_balancers(&xml, "DescribeLoadBalancers")?
            .into_iter()
            .next()),
        Err(e) if has_code(&e, "LoadBalancerNotFound") => Ok(None),
        Err(e) => Err(e),
    }
}

/// Creates an internet-facing application load balancer in `subnets` with `security_group`,
/// tagged at creation; it.
pub(crate) fn create_load_balancer(
    client: &Client,
    name: &str,
    subnets: &[&str],
    security_group: &str,
    tags: &[(&str, &str)],
) -> Result<LoadBalancer> {
    let mut params = vec![
        p("Name", name),
        p("Type", "application"),
        p("Scheme", "internet-facing"),
        p("IpAddressType", "ipv4"),
    ];
    params.extend(list("Subnets", subnets));
    params.extend(list("SecurityGroups", &[security_group]));
    params.extend(tag_params(tags));
    let xml = call(client, "CreateLoadBalancer", &params)?;
    parse_load_balancers(&xml, "CreateLoadBalancer")?
        .into_iter()
        .next()
        .context("ELBv2 CreateLoadBalancer answered without a load balancer")
}

pub(crate) fn delete_load_balancer(client: &Client, arn: &str) -> Result<()> {
    call(client, "DeleteLoadBalancer", &[p("LoadBalancerArn", arn)]).map(drop)
}

/// The tags of each of `arns` (at most 20 a call, as AWS takes).
pub(crate) fn describe_tags(
    client: &Client,
    arns: &[&str],
) -> Result<BTreeMap<String, BTreeMap<String, String>>> {
    let mut all = BTreeMap::new();
    for chunk in arns.chunks(20) {
        let xml = call(client, "DescribeTags", &list("ResourceArns", chunk))?;
        let doc = parse_doc(&xml, "DescribeTags")?;
        for d in members(&doc, "TagDescriptions") {
            let Some(arn) = child_text(d, "ResourceArn") else {
                continue;
            };
            let tags = d
                .children()
                .filter(|c| c.has_tag_name("Tags"))
                .flat_map(|t| t.children().filter(|c| c.has_tag_name("member")))
                .filter_map(|t| Some((child_text(t, "Key")?, child_text(t, "Value")?)))
                .collect();
            all.insert(arn, tags);
        }
    }
    Ok(all)
}

/// Sets each `(key, value)` on `arn` (a key it has is overwritten).
pub(crate) fn add_tags(client: &Client, arn: &str, tags: &[(&str, &str)]) -> Result<()> {
    let mut params = list("ResourceArns", &[arn]);
    params.extend(tag_params(tags));
    call(client, "AddTags", &params).map(drop)
}

fn parse_target_groups(xml: &str, action: &str) -> Result<Vec<TargetGroup>> {
    let doc = parse_doc(xml, action)?;
    Ok(members(&doc, "TargetGroups")
        .into_iter()
        .filter_map(|m| {
            Some(TargetGroup {
                arn: child_text(m, "TargetGroupArn")?,
                name: child_text(m, "TargetGroupName").unwrap_or_default(),
            })
        })
        .collect())
}

/// Every target group of the region.
pub(crate) fn describe_target_groups(client: &Client) -> Result<Vec<TargetGroup>> {
    all_pages(client, "DescribeTargetGroups", |xml| {
        parse_target_groups(xml, "DescribeTargetGroups")
    })
}

pub(crate) fn create_target_group_params(t: &NewTargetGroup) -> Vec<(String, String)> {
    let mut params = vec![
        p("Name", &t.name),
        p("Protocol", "HTTP"),
        p("Port", t.port.to_string()),
        p("VpcId", &t.vpc),
        p("TargetType", "instance"),
        p("HealthCheckEnabled", "true"),
        p("HealthCheckProtocol", "HTTP"),
        p("HealthCheckPort", "traffic-port"),
        p("HealthCheckPath", &t.health_path),
        p("HealthCheckIntervalSeconds", "10"),
        p("HealthCheckTimeoutSeconds", "5"),
        p("HealthyThresholdCount", "2"),
        p("UnhealthyThresholdCount", "2"),
        p("Matcher.HttpCode", &t.matcher),
    ];
    let tags: Vec<(&str, &str)> = t
        .tags
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    params.extend(tag_params(&tags));
    params
}

/// Creates a target group, tagged at creation; its ARN.
pub(crate) fn create_target_group(client: &Client, t: &NewTargetGroup) -> Result<String> {
    let xml = call(client, "CreateTargetGroup", &create_target_group_params(t))?;
    parse_target_groups(&xml, "CreateTargetGroup")?
        .into_iter()
        .next()
        .map(|g| g.arn)
        .context("ELBv2 CreateTargetGroup answered without a target group")
}

/// How long a deregistered target keeps its connections (`deregistration_delay`).
pub(crate) fn set_deregistration_delay(client: &Client, arn: &str, seconds: u64) -> Result<()> {
    let params = [
        p("TargetGroupArn", arn),
        p(
            "Attributes.member.1.Key",
            "deregistration_delay.timeout_seconds",
        ),
        p("Attributes.member.1.Value", seconds.to_string()),
    ];
    call(client, "ModifyTargetGroupAttributes", &params).map(drop)
}

pub(crate) fn delete_target_group(client: &Client, arn: &str) -> Result<()> {
    call(client, "DeleteTargetGroup", &[p("TargetGroupArn", arn)]).map(drop)
}

fn target_params(arn: &str, instances: &[&str]) -> Vec<(String, String)> {
    let mut params = vec![p("TargetGroupArn", arn)];
    for (i, id) in instances.iter().enumerate() {
        params.push(p(format!("Targets.member.{}.Id", i + 1), *id));
    }
    params
}

pub(crate) fn register_targets(client: &Client, arn: &str, instances: &[&str]) -> Result<()> {
    if instances.is_empty() {
        return Ok(());
    }
    call(client, "RegisterTargets", &target_params(arn, instances)).map(drop)
}

pub(crate) fn deregister_targets(client: &Client, arn: &str, instances: &[&str]) -> Result<()> {
    if instances.is_empty() {
        return Ok(());
    }
    call(client, "DeregisterTargets", &target_params(arn, instances)).map(drop)
}

/// The health of every target registered in the group (and of those draining out of it).
pub(crate) fn describe_target_health(client: &Client, arn: &str) -> Result<Vec<TargetHealth>> {
    let xml = call(client, "DescribeTargetHealth", &[p("TargetGroupArn", arn)])?;
    parse_target_health(&xml)
}

pub(crate) fn parse_target_health(xml: &str) -> Result<Vec<TargetHealth>> {
    let doc = parse_doc(xml, "DescribeTargetHealth")?;
    Ok(members(&doc, "TargetHealthDescriptions")
        .into_iter()
        .filter_map(|m| {
            let target = m.children().find(|c| c.has_tag_name("Target"))?;
            let health = m.children().find(|c| c.has_tag_name("TargetHealth"));
            Some(TargetHealth {
                id: child_text(target, "Id")?,
                state: health
                    .and_then(|h| child_text(h, "State"))
                    .unwrap_or_default(),
                reason: health.and_then(|h| child_text(h, "Reason")),
            })
        })
        .collect())
}

pub(crate) fn parse_listeners(xml: &str) -> Result<Vec<Listener>> {
    let doc = parse_doc(xml, "DescribeListeners")?;
    Ok(members(&doc, "Listeners")
        .into_iter()
        .filter_map(|m| {
            let target_group = m
                .children()
                .filter(|c| c.has_tag_name("DefaultActions"))
                .flat_map(|a| a.children().filter(|c| c.has_tag_name("member")))
                .find_map(|a| child_text(a, "TargetGroupArn"));
            Some(Listener {
                arn: child_text(m, "ListenerArn")?,
                port: child_text(m, "Port")
                    .and_then(|p| p.parse().ok())
                    .unwrap_or(0),
                target_group,
            })
        })
        .collect())
}

pub(crate) fn describe_listeners(client: &Client, load_balancer: &str) -> Result<Vec<Listener>> {
    let xml = call(
        client,
        "DescribeListeners",
        &[p("LoadBalancerArn", load_balancer)],
    )?;
    parse_listeners(&xml)
}

fn forward(target_group: &str) -> [(String, String); 2] {
    [
        p("DefaultActions.member.1.Type", "forward"),
        p("DefaultActions.member.1.TargetGroupArn", target_group),
    ]
}

/// An HTTP listener on `port` forwarding to `target_group`; its ARN.
pub(crate) fn create_listener(
    client: &Client,
    load_balancer: &str,
    port: u16,
    target_group: &str,
) -> Result<String> {
    let mut params = vec![
        p("LoadBalancerArn", load_balancer),
        p("Protocol", "HTTP"),
        p("Port", port.to_string()),
    ];
    params.extend(forward(target_group));
    let xml = call(client, "CreateListener", &params)?;
    parse_listeners(&xml)?
        .into_iter()
        .next()
        .map(|l| l.arn)
        .context("ELBv2 CreateListener answered without a listener")
}

/// Points the listener at `target_group`: from the next request on, it gets the traffic.
pub(crate) fn forward_to(client: &Client, listener: &str, target_group: &str) -> Result<()> {
    let mut params = vec![p("ListenerArn", listener)];
    params.extend(forward(target_group));
    call(client, "ModifyListener", &params).map(drop)
}

pub(crate) fn delete_listener(client: &Client, listener: &str) -> Result<()> {
    call(client, "DeleteListener", &[p("ListenerArn", listener)]).map(drop)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_target_health_and_listeners() {
        let xml = r#"<DescribeTargetHealthResponse xmlns="http://elasticloadbalancing.amazonaws.com/doc/2015-12-01/">
  <DescribeTargetHealthResult><TargetHealthDescriptions>
    <member><Target><Id>i-1</Id><Port>8080</Port></Target><HealthCheckPort>8080</HealthCheckPort>
      <TargetHealth><State>healthy</State></TargetHealth></member>
    <member><Target><Id>i-2</Id><Port>8080</Port></Target>
      <TargetHealth><State>initial</State><Reason>Elb.RegistrationInProgress</Reason></TargetHealth></member>
  </TargetHealthDescriptions></DescribeTargetHealthResult>
</DescribeTargetHealthResponse>"#;
        let got = parse_target_health(xml).unwrap();
        assert_eq!(got.len(), 2);
        assert_eq!(got[0].state, "healthy");
        assert_eq!(got[1].reason.as_deref(), Some("Elb.RegistrationInProgress"));
        let xml = r#"<DescribeListenersResponse><DescribeListenersResult><Listeners><member>
  <ListenerArn>arn:l</ListenerArn><Port>80</Port><Protocol>HTTP</Protocol>
  <DefaultActions><member><Type>forward</Type><TargetGroupArn>arn:tg</TargetGroupArn></member></DefaultActions>
</member></Listeners></DescribeListenersResult></DescribeListenersResponse>"#;
        assert_eq!(
            parse_listeners(xml).unwrap(),
            vec![Listener {
                arn: "arn:l".into(),
                port: 80,
                target_group: Some("arn:tg".into()),
            }]
        );
    }

    #[test]
    fn target_group_parameters() {
        let params = create_target_group_params(&NewTargetGroup {
            name: "fuse-web-prod-1".into(),
            vpc: "vpc-1".into(),
            port: 8080,
            health_path: "/health".into(),
            matcher: "200-399".into(),
            tags: vec![("fuse:app".into(), "web".into())],
        });
        let get = |k: &str| {
            params
                .iter()
                .find(|(key, _)| key == k)
                .map(|(_, v)| v.as_str())
        };
        assert_eq!(get("Port"), Some("8080"));
        assert_eq!(get("HealthCheckPath"), Some("/health"));
        assert_eq!(get("Tags.member.1.Key"), Some("fuse:app"));
    }
}
