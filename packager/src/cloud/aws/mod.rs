//! A small AWS client of fuse's own: credentials, region and endpoints as the AWS CLI finds
//! them ([`profile`]), SigV4 ([`sigv4`]), signed calls with retries ([`http`]), and the EC2
//! ([`ec2`]), ELBv2 ([`elbv2`]) and EBS direct ([`ebs`]) calls that turn an image into an AMI. Not the AWS SDK: it
//! would bring an async runtime and a few hundred crates for the handful of calls fuse makes.

pub(crate) mod ebs;
pub(crate) mod ec2;
pub(crate) mod elbv2;
pub(crate) mod http;
pub(crate) mod profile;
mod query;
pub(crate) mod sigv4;
