//! Images in a cloud: `aws`, fuse's own small AWS client, and `ami`, an image made an AMI
//! once per digest and region (`fuse deploy ami`). Uses `image` (what is deployed) and
//! `host`; the commands that drive it are in `cli`.

pub(crate) mod ami;
pub(crate) mod aws;
pub(crate) mod deploy;
