//! The run overlay: what one run selects (a baked environment) and injects (`-e`,
//! `--env-file`), handed to the init through QEMU fw_cfg `opt/fuse/run` and never stored in
//! the image (see `crate::build::environments` for what is baked).

use crate::image::config::check_env_name;
use crate::image::manifest::Manifest;
use crate::run::dotenv;
use anyhow::{bail, Context, Result};
use fuse_boot::spec::{RunOverlay, RUN_OVERLAY_FW_CFG_NAME};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// What a run selects and injects.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Selection {
    /// The environment; `None`: the image's default.
    pub(crate) environment: Option<String>,
    /// Variables injected for this run only, in order (a later one wins).
    pub(crate) env: Vec<(String, String)>,
}

impl Selection {
    /// The selection of `--env environment`, `--env-file env_files` and `-e set`: env files
    /// in order, then `-e` in order (a later value wins).
    pub(crate) fn from_flags(
        environment: Option<&str>,
        set: &[String],
        env_files: &[PathBuf],
    ) -> Result<Selection> {
        let mut env: Vec<(String, String)> = Vec::new();
        let mut put = |key: String, value: String| match env.iter_mut().find(|(k, _)| *k == key) {
            Some(slot) => slot.1 = value,
            None => env.push((key, value)),
        };
        for file in env_files {
            for (key, value) in dotenv::load(file)? {
                put(key, value);
            }
        }
        for item in set {
            let (key, value) = parse_set(item, |k| std::env::var(k).ok())?;
            put(key, value);
        }
        if let Some(name) = environment {
            if name.contains('=') {
                bail!("--env selects an environment by name, not '{name}': inject a variable with -e {name}");
            }
        }
        Ok(Selection {
            environment: environment.map(str::to_string),
            env,
        })
    }
}

/// The most one argument or `KEY=VALUE` may be, with its NUL: Linux's MAX_ARG_STRLEN (32
/// pages); a longer one makes execve fail with E2BIG in the guest.
const MAX_ARG_STRLEN: usize = 32 * 4096;
/// The most the init reads of the overlay: SPEC_MAX_BYTES in boot/init/init.h.
const OVERLAY_MAX_BYTES: usize = 1024 * 1024;

/// Refuses, before anything is built or booted, injected variables and arguments the guest
/// could not take: one over MAX_ARG_STRLEN, or all of them over what the init reads.
pub(crate) fn check_sizes(env: &[(String, String)], args: &[String]) -> Result<()> {
    for (key, value) in env {
        let len = key.len() + 1 + value.len() + 1;
        if len > MAX_ARG_STRLEN {
            bail!(
                "The variable {key} is {len} bytes: a Linux program takes at most \
                 {MAX_ARG_STRLEN} per variable (MAX_ARG_STRLEN); pass it in a file (a volume) \
                 instead"
            );
        }
    }
    for (i, arg) in args.iter().enumerate() {
        if arg.len() + 1 > MAX_ARG_STRLEN {
            bail!(
                "Argument {} is {} bytes: a Linux program takes at most {MAX_ARG_STRLEN} per \
                 argument (MAX_ARG_STRLEN)",
                i + 1,
                arg.len() + 1
            );
        }
    }
    let overlay = RunOverlay {
        args: (!args.is_empty()).then(|| args.to_vec()),
        env: env.to_vec(),
        ..RunOverlay::default()
    };
    let total = overlay
        .try_encode()
        .context("Invalid run-time value")?
        .len();
    if total > OVERLAY_MAX_BYTES {
        let largest = env
            .iter()
            .max_by_key(|(k, v)| k.len() + v.len())
            .map(|(k, _)| format!(" (the largest variable: {k})"))
            .unwrap_or_default();
        bail!(
            "The injected variables and arguments take {total} bytes: the guest's init reads at \
             most {OVERLAY_MAX_BYTES}{largest}"
        );
    }
    Ok(())
}

/// `-e KEY=VALUE`, or `-e KEY` with the value from `lookup` (the caller's environment).
fn parse_set(item: &str, lookup: impl Fn(&str) -> Option<String>) -> Result<(String, String)> {
    let (key, value) = match item.split_once('=') {
        Some((key, value)) => (key, value.to_string()),
        None => {
            let value = lookup(item).with_context(|| {
                format!(
                    "-e {item}: {item} is not set in your environment: give -e {item}=VALUE (to select an environment, use --env {item})"
                )
            })?;
            (item, value)
        }
    };
    if let Err(why) = check_env_name(key) {
        bail!("Invalid -e {item}: {why}");
    }
    if value.contains('\0') {
        bail!("Invalid -e {key}: the value contains a NUL byte");
    }
    Ok((key.to_string(), value))
}

/// The run overlay for `manifest`: the checked environment, the injected variables and the
/// argument replacement. An environment the image does not have is an error before boot.
pub(crate) fn run_overlay(
    manifest: &Manifest,
    selection: &Selection,
    args: Option<Vec<String>>,
) -> Result<RunOverlay> {
    check_environment(manifest, selection.environment.as_deref())?;
    let overlay = RunOverlay {
        args,
        env: selection.env.clone(),
        environment: selection.environment.clone(),
        ..RunOverlay::default()
    };
    overlay.validate().context("Invalid run-time value")?;
    Ok(overlay)
}

/// Writes the overlay for QEMU's fw_cfg into `dir` (a 0700 directory that goes with the run:
/// the instance's, or the run's scratch) as a 0600 file, also when it changes nothing (then
/// only its version pair): its presence tells the init that this run's configuration came
/// from fuse, so it looks for no cloud's. It holds every injected value, so it lives only
/// until QEMU has read it (see [`OverlayFile::remove_once_read`]), and goes whatever happens
/// when dropped.
pub(crate) fn write_overlay(dir: &Path, overlay: &RunOverlay) -> Result<OverlayFile> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let bytes = overlay.try_encode().context("Invalid run-time value")?;
    let path = dir.join(OVERLAY_FILE);
    // Owned (removed on drop) from the moment it exists: a failed write leaves nothing.
    let file = OverlayFile { path };
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&file.path)
        .and_then(|mut f| f.write_all(&bytes))
        .with_context(|| format!("Cannot write the run overlay {}", file.path.display()))?;
    Ok(file)
}

/// The overlay's file name in its directory.
pub(crate) const OVERLAY_FILE: &str = "run-overlay";

/// How long QEMU may take to start (and so read its fw_cfg files) before the overlay is left
/// to the end of the run.
const READ_PATIENCE: Duration = Duration::from_secs(120);

/// The run overlay on disk, removed when dropped (every exit path of a run, panics included).
/// A SIGKILLed fuse cannot drop it: its directory is swept by the next fuse command (the
/// store's scratch by [`crate::image::store::Store::open`], an instance's by `fuse ps`).
#[derive(Debug)]
pub(crate) struct OverlayFile {
    path: PathBuf,
}

impl OverlayFile {
    /// The `-fw_cfg` entry: name and file.
    pub(crate) fn fw_cfg(&self) -> (String, PathBuf) {
        (RUN_OVERLAY_FW_CFG_NAME.to_string(), self.path.clone())
    }

    /// Removes the file as soon as the QEMU listening on `qmp_socket` has read it: QEMU reads
    /// `-fw_cfg` files whole while it starts, before its main loop runs, and a QMP command is
    /// answered only from the main loop, so the first answer means the bytes are in QEMU's
    /// memory. Watches from a thread; the returned guard stops watching when dropped.
    pub(crate) fn remove_once_read(&self, qmp_socket: PathBuf) -> RemoveOnceRead {
        let ended = Arc::new(AtomicBool::new(false));
        let path = self.path.clone();
        let flag = ended.clone();
        let thread = std::thread::spawn(move || {
            let read =
                fuse_boot::poll::wait_until(READ_PATIENCE, Duration::from_millis(25), || {
                    if flag.load(Ordering::Relaxed) {
                        return Some(false);
                    }
                    fuse_boot::qmp::human_monitor(&qmp_socket, "info status")
                        .ok()
                        .map(|_| true)
                });
            if read == Some(true) {
                let _ = std::fs::remove_file(&path);
            }
        });
        RemoveOnceRead {
            ended,
            thread: Some(thread),
        }
    }
}

impl Drop for OverlayFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Watches for QEMU to have read the overlay; dropping it (when the run ends) stops watching.
#[derive(Debug)]
pub(crate) struct RemoveOnceRead {
    ended: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for RemoveOnceRead {
    fn drop(&mut self) {
        self.ended.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Checks that the image has `environment` (when one is given), and that a run without one
/// has a default to boot with (an image with several environments may have none).
pub(crate) fn check_environment(manifest: &Manifest, environment: Option<&str>) -> Result<()> {
    let image = manifest.reference();
    let baked = &manifest.config.environments;
    let Some(name) = environment else {
        if !baked.is_empty() && manifest.config.default_environment.is_none() {
            bail!(
                "Image {image} has environments {} and no default: pick one with --env NAME",
                baked.join(", ")
            );
        }
        return Ok(());
    };
    if baked.is_empty() {
        bail!("Image {image} has no environments, so --env {name} cannot select one: define [environments.{name}] in fuse.toml and rebuild");
    }
    if !baked.iter().any(|e| e == name) {
        bail!(
            "Environment '{name}' is not defined in image {image} (defined: {}): pick one of them, or add [environments.{name}] to fuse.toml and rebuild",
            baked.join(", ")
        );
    }
    Ok(())
}

/// The environment a run of `manifest` boots with `selection`, for messages and reports.
pub(crate) fn effective_environment(manifest: &Manifest, selection: &Selection) -> Option<String> {
    selection
        .environment
        .clone()
        .or_else(|| manifest.config.default_environment.clone())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn manifest(envs: &[&str]) -> Manifest {
        let mut m = crate::image::manifest::tests::sample();
        m.config.environments = envs.iter().map(|s| s.to_string()).collect();
        m
    }

    #[test]
    fn overlay_checks_the_environment_against_the_image() {
        let m = manifest(&["dev", "prod"]);
        let selection = Selection {
            environment: Some("prod".into()),
            env: vec![("TOKEN".into(), "t".into())],
        };
        let overlay = run_overlay(&m, &selection, None).unwrap();
        assert_eq!(overlay.environment.as_deref(), Some("prod"));
        let decoded = RunOverlay::decode(&overlay.encode()).unwrap();
        assert_eq!(decoded, overlay);

        let staging = Selection {
            environment: Some("staging".into()),
            ..Selection::default()
        };
        let err = run_overlay(&m, &staging, None).unwrap_err().to_string();
        assert!(
            err.contains("'staging' is not defined") && err.contains("dev, prod"),
            "{err}"
        );
        let err = run_overlay(&manifest(&[]), &staging, None)
            .unwrap_err()
            .to_string();
        assert!(err.contains("has no environments"), "{err}");
        assert!(run_overlay(&manifest(&[]), &Selection::default(), None).is_ok());

        // Several environments and no default: a run must name one.
        let err = run_overlay(&m, &Selection::default(), None)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("has environments dev, prod and no default: pick one with --env NAME"),
            "{err}"
        );
        let mut with_default = m.clone();
        with_default.config.default_environment = Some("dev".into());
        assert!(run_overlay(&with_default, &Selection::default(), None).is_ok());
    }

    #[test]
    fn an_empty_overlay_is_written_too() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let file = write_overlay(dir.path(), &RunOverlay::default()).unwrap();
        let (name, path) = file.fw_cfg();
        assert_eq!(name, RUN_OVERLAY_FW_CFG_NAME);
        assert_eq!(std::fs::read(&path).unwrap(), b"fuse-spec\x001\x00");
        assert_eq!(path.metadata().unwrap().permissions().mode() & 0o777, 0o600);
        drop(file);
        assert!(!path.exists(), "removed when dropped");
    }

    #[test]
    fn selection_from_flags() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("run.env");
        std::fs::write(&file, "A=file\nB=file\n").unwrap();
        let set = ["B=flag".to_string(), "C=x=y".to_string()];
        let s = Selection::from_flags(Some("prod"), &set, &[file]).unwrap();
        assert_eq!(
            s.env,
            vec![
                ("A".into(), "file".into()),
                ("B".into(), "flag".into()),
                ("C".into(), "x=y".into())
            ]
        );
        let lookup = |k: &str| (k == "HOME_TOKEN").then(|| "from-host".to_string());
        assert_eq!(
            parse_set("HOME_TOKEN", lookup).unwrap(),
            ("HOME_TOKEN".into(), "from-host".into())
        );
        let err = parse_set("prod", lookup).unwrap_err().to_string();
        assert!(err.contains("use --env prod"), "{err}");
        let err = parse_set("FUSE_ENV=x", lookup).unwrap_err().to_string();
        assert!(err.contains("select it with --env"), "{err}");
        assert!(Selection::from_flags(Some("KEY=VALUE"), &[], &[])
            .unwrap_err()
            .to_string()
            .contains("-e KEY=VALUE"));
        assert!(
            Selection::from_flags(None, &[], &[Path::new("/nonexistent.env").into()])
                .unwrap_err()
                .to_string()
                .contains("/nonexistent.env")
        );
    }
}
