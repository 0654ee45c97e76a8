//! `fuse deploy`: an image to AWS. Its first subcommand, `fuse deploy ami`, makes (or finds)
//! the image's AMI in a region.

use super::print::progress_line;
use crate::cloud::ami;
use crate::cloud::aws::http::Client;
use crate::cloud::aws::profile::{self, AwsOptions};
use crate::image::disk;
use crate::image::store::Store;
use anyhow::{Context, Result};
use clap::{Args, Subcommand};

#[derive(Debug, Subcommand)]
pub(super) enum DeployCommand {
    /// Make the image an AMI in a region, once per digest.
    ///
    /// An AMI tagged with the image's digest (fuse:digest) is reused; otherwise the image's
    /// disk is uploaded with the EBS direct APIs (its non-zero 512 KiB blocks only) and
    /// registered: UEFI, ENA, IMDSv2 required, the image's architecture. A new version of an
    /// app whose earlier version's snapshot is in the region (fuse:name) and whose disk is in
    /// the local store is uploaded incrementally: only the blocks that differ from it.
    Ami {
        /// Image (name[:version] or digest).
        image: String,
        #[command(flatten)]
        aws: AwsFlags,
        /// Machine-readable output (no progress lines).
        #[arg(long)]
        json: bool,
    },
}

/// Where and as whom: as the AWS CLI takes them (environment and ~/.aws files otherwise).
#[derive(Debug, Clone, Default, Args)]
pub(super) struct AwsFlags {
    /// AWS region (default: AWS_REGION, AWS_DEFAULT_REGION, the profile's region).
    #[arg(long)]
    region: Option<String>,
    /// A profile of ~/.aws/credentials and ~/.aws/config (default: AWS_PROFILE, else default).
    #[arg(long)]
    profile: Option<String>,
}

impl From<&AwsFlags> for AwsOptions {
    fn from(f: &AwsFlags) -> Self {
        AwsOptions {
            region: f.region.clone(),
            profile: f.profile.clone(),
        }
    }
}

pub(super) fn command(command: DeployCommand) -> Result<i32> {
    match command {
        DeployCommand::Ami { image, aws, json } => deploy_ami(&image, &aws, json),
    }
}

fn deploy_ami(reference: &str, flags: &AwsFlags, json: bool) -> Result<i32> {
    let store = Store::open_default()?;
    let image = store
        .find(reference)?
        .with_context(|| format!("No image '{reference}' in the store: see `fuse ls`"))?;
    let disk = disk::verified_disk_path(&store, &image)?;
    // Credentials and region first: a missing one fails before anything is sent.
    let session = profile::session(&AwsOptions::from(flags))?;
    let client = Client::new(session)?;
    let mut progress = |line: &str| {
        if !json {
            progress_line(line);
        }
    };
    let outcome = ami::ensure_ami(&client, &store, &image, &disk, &mut progress)?;
    if json {
        println!("{}", serde_json::to_string(&outcome)?);
    } else if outcome.reused {
        println!(
            "{} {} (reused: {} is tagged {}; nothing uploaded)",
            outcome.ami,
            outcome.region,
            outcome.name,
            ami::DIGEST_TAG
        );
    } else {
        let on = outcome
            .parent_snapshot
            .as_deref()
            .map(|p| format!(", incremental on {p}"))
            .unwrap_or_default();
        println!(
            "{} {} {} ({} of {} blocks sent, {:.1} MiB, in {:.1} s{on})",
            outcome.ami,
            outcome.region,
            outcome.snapshot.as_deref().unwrap_or("-"),
            outcome.blocks_sent,
            outcome.blocks_sent + outcome.blocks_skipped,
            outcome.bytes_sent as f64 / 1048576.0,
            outcome.seconds
        );
    }
    Ok(0)
}
