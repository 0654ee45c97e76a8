//! A small AWS client of fuse's own: credentials, region and endpoints as the AWS CLI finds
//! them ([`profile`]), SigV4 ([`sigv4`]), signed calls with retries ([`http`]), and the EC2
//! ([`ec2`]), ELBv2 ([`elbv2`]) and EBS direct ([`ebs`]) calls that turn an image into an AMI,
//! and STS's AssumeRole for a profile's role ([`sts`]). Not the AWS SDK: it
//! would bring an async runtime and a few hundred crates for the handful of calls fuse makes.

pub(crate) mod ebs;
pub(crate) mod ec2;
pub(crate) mod elbv2;
pub(crate) mod http;
pub(crate) mod profile;
mod query;
pub(crate) mod sigv4;
mod sts;

/// The client for `opts`' session as the AWS CLI would find it, its profile's role assumed (a
/// call to STS) when it names one: what every AWS command of fuse starts from.
pub(crate) fn client(opts: &profile::AwsOptions) -> anyhow::Result<http::Client> {
    let (session, role) = profile::session(opts)?;
    let client = http::Client::new(session)?;
    match role {
        Some(role) => sts::assume_role(&client, &role),
        None => Ok(client),
    }
}
