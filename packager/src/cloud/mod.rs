//! Images in a cloud: `aws`, fuse's own small AWS client; `ami`, an image made an AMI
//! once per digest and region (`fuse deploy ami`); and `deploy`, blue/green deployments of
//! one instance per app and environment (`fuse deploy IMAGE --env ENV`, ls, rollback, destroy), or N behind an application load balancer (`balanced`, `--instances N`), one at a time per app and environment
//! (`lock`, a tag on the environment's security group). Uses `image` (what is deployed) and
//! `host`; the commands that drive it are in `cli`.

pub(crate) mod ami;
pub(crate) mod aws;
pub(crate) mod balanced;
pub(crate) mod deploy;
pub(crate) mod lock;
pub(crate) mod release;
