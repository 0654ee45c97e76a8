//! Environments: every environment of the configuration baked into the image, one selected at
//! boot, and values injected per run, none of which changes the image.
//!
//! # In the image
//!
//! - `/etc/fuse/spec` gets the top-level `args` and `[env]` (they hold in every environment);
//! - `/etc/fuse/env/<name>`: an overlay in the spec format (`fuse_boot::spec`): `FUSE_ENV`, the
//!   runtime's convention (`SPRING_PROFILES_ACTIVE`, `NODE_ENV`) unless the configuration sets
//!   it, the environment's variables and, if it has some, its arguments;
//! - `/etc/fuse/environment`: the name of the default environment;
//! - `/etc/fuse/files/<name>/<path>`: the environment's config files; `<path>` itself is a
//!   symlink to `/run/fuse/current/<path>`, and the init links `/run/fuse/current` to
//!   `/etc/fuse/files/<selected>`. The root stays read-only and unchanged.
//!
//! # At run
//!
//! The run overlay (QEMU fw_cfg `opt/fuse/run`) names the environment to select and carries
//! the injected variables (`-e`, `--env-file`). The init applies, in order: the spec, the
//! environment's overlay, the run overlay, so a value given at run wins.

use crate::config::{self, Config, ImageConfig};
use crate::dotenv;
use crate::manifest::Manifest;
use anyhow::{bail, Context, Result};
use fuse_boot::spec::{
    AppSpec, RunOverlay, CURRENT_ENV_LINK, DEFAULT_ENV_PATH, ENV_DIR, ENV_FILES_DIR,
    RUN_OVERLAY_FW_CFG_NAME,
};
use fuse_rootfs::tree::Tree;
use std::collections::BTreeSet;
use std::ffi::OsString;
use std::path::{Path, PathBuf};

/// The variable that names the selected environment in the guest.
pub const FUSE_ENV: &str = "FUSE_ENV";

/// Applies a configuration to an image being built: top-level args, env and files into the
/// spec and tree, every environment baked. Returns what the manifest records.
pub fn bake(
    tree: &mut Tree,
    spec: &mut AppSpec,
    config: Option<&Config>,
    kind: &str,
) -> Result<ImageConfig> {
    let Some(config) = config else {
        return Ok(ImageConfig::default());
    };
    if let Some(args) = &config.args {
        spec.args.truncate(1);
        spec.args.extend(args.iter().cloned());
    }
    for (key, value) in &config.env {
        env_set(&mut spec.env, key, value);
    }

    // Paths some environment has its own file for: these become links to the selected one.
    let switched: BTreeSet<&String> = config
        .environments
        .values()
        .flat_map(|e| e.files.keys())
        .collect();
    for (path, file) in &config.files {
        if !switched.contains(path) {
            add_file(tree, path, file)?;
        }
    }
    for path in &switched {
        tree.add_symlink(path, &format!("{CURRENT_ENV_LINK}{path}"))
            .with_context(|| {
                format!("Config file {path} clashes with a file of the app: pick another path")
            })?;
    }

    for (name, environment) in &config.environments {
        let mut env = vec![(FUSE_ENV.to_string(), name.clone())];
        if let Some((key, value)) = convention(kind, name) {
            let set_by_user = config.env.contains_key(key) || environment.env.contains_key(key);
            if !set_by_user {
                env.push((key.to_string(), value));
            }
        }
        env.extend(environment.env.iter().map(|(k, v)| (k.clone(), v.clone())));
        // Fields that do not apply to an environment (volumes...) stay empty.
        let overlay = RunOverlay {
            args: environment.args.clone(),
            env,
            ..RunOverlay::default()
        };
        let bytes = overlay
            .try_encode()
            .with_context(|| format!("Environment {name} in {}", config.path.display()))?;
        tree.add_bytes(&format!("{ENV_DIR}/{name}"), bytes, 0o644)?;
        let files_dir = format!("{ENV_FILES_DIR}/{name}");
        tree.add_dir(&files_dir, 0o755)?;
        for path in &switched {
            // The environment's own file, else the top-level one; else the link dangles and
            // the file does not exist in this environment.
            if let Some(file) = environment.files.get(*path).or(config.files.get(*path)) {
                add_file(tree, &format!("{files_dir}{path}"), file)?;
            }
        }
    }
    if let Some(default) = &config.default_environment {
        tree.add_bytes(DEFAULT_ENV_PATH, format!("{default}\n").into_bytes(), 0o644)?;
    }
    Ok(config.image_config())
}

fn add_file(tree: &mut Tree, image_path: &str, file: &config::ConfigFile) -> Result<()> {
    tree.add_host_file(image_path, &file.host, 0o644)
        .with_context(|| format!("{}: cannot add {image_path} to the image", file.origin))
}

fn env_set(env: &mut Vec<(String, String)>, key: &str, value: &str) {
    match env.iter_mut().find(|(k, _)| k == key) {
        Some(slot) => slot.1 = value.to_string(),
        None => env.push((key.to_string(), value.to_string())),
    }
}

/// The variable a runtime's frameworks read the environment from, and its value for `name`.
/// Node's libraries test for the exact words `production` and `development`.
pub fn convention(kind: &str, name: &str) -> Option<(&'static str, String)> {
    match kind {
        "jvm" => Some(("SPRING_PROFILES_ACTIVE", name.to_string())),
        "node" => Some((
            "NODE_ENV",
            match name {
                "prod" | "production" => "production",
                "dev" | "development" => "development",
                other => other,
            }
            .to_string(),
        )),
        _ => None,
    }
}

/// What a run selects and injects.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Selection {
    /// The environment; `None`: the image's default.
    pub environment: Option<String>,
    /// Variables injected for this run only, in order (a later one wins).
    pub env: Vec<(String, String)>,
}

/// The flags of `fuse run` and `fuse test` that select an environment and inject values.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct SelectionArgs {
    /// The environment to boot (default: the image's, see `fuse inspect`); Boxfuse's
    /// `-env=NAME` works too.
    #[arg(
        long = "env",
        short = 'E',
        visible_alias = "environment",
        value_name = "NAME"
    )]
    pub environment: Option<String>,
    /// Set a variable for this run only, never stored in the image (repeatable); `-e KEY`
    /// passes KEY's value from your environment.
    #[arg(short = 'e', value_name = "KEY=VALUE")]
    pub set: Vec<String>,
    /// Read variables for this run from a dotenv file (KEY=VALUE lines; repeatable; `-e` wins).
    #[arg(long = "env-file", value_name = "FILE")]
    pub env_files: Vec<PathBuf>,
}

impl SelectionArgs {
    /// The selection: env files in order, then `-e` in order.
    pub fn selection(&self) -> Result<Selection> {
        let mut env: Vec<(String, String)> = Vec::new();
        let mut put = |key: String, value: String| match env.iter_mut().find(|(k, _)| *k == key) {
            Some(slot) => slot.1 = value,
            None => env.push((key, value)),
        };
        for file in &self.env_files {
            for (key, value) in dotenv::load(file)? {
                put(key, value);
            }
        }
        for item in &self.set {
            let (key, value) = parse_set(item, |k| std::env::var(k).ok())?;
            put(key, value);
        }
        if let Some(name) = &self.environment {
            if name.contains('=') {
                bail!("--env selects an environment by name, not '{name}': inject a variable with -e {name}");
            }
        }
        Ok(Selection {
            environment: self.environment.clone(),
            env,
        })
    }
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
    if let Err(why) = config::check_env_name(key) {
        bail!("Invalid -e {item}: {why}");
    }
    if value.contains('\0') {
        bail!("Invalid -e {key}: the value contains a NUL byte");
    }
    Ok((key.to_string(), value))
}

/// The run overlay for `manifest`: the checked environment, the injected variables and the
/// argument replacement. An environment the image does not have is an error before boot.
pub fn run_overlay(
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

/// Writes the overlay for QEMU's fw_cfg into `dir` (a private scratch directory that goes with
/// the run) and returns the `(name, file)` entry; `None` when the overlay changes nothing. The
/// file is 0600: it may hold secrets.
pub fn write_overlay(dir: &Path, overlay: &RunOverlay) -> Result<Option<(String, PathBuf)>> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    if overlay.is_empty() {
        return Ok(None);
    }
    let bytes = overlay.try_encode().context("Invalid run-time value")?;
    let path = dir.join("run-overlay");
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)
        .and_then(|mut file| file.write_all(&bytes))
        .with_context(|| format!("Cannot write the run overlay {}", path.display()))?;
    Ok(Some((RUN_OVERLAY_FW_CFG_NAME.to_string(), path)))
}

/// Checks that the image has `environment` (when one is given).
pub fn check_environment(manifest: &Manifest, environment: Option<&str>) -> Result<()> {
    let Some(name) = environment else {
        return Ok(());
    };
    let image = manifest.reference();
    let baked = &manifest.config.environments;
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
pub fn effective_environment(manifest: &Manifest, selection: &Selection) -> Option<String> {
    selection
        .environment
        .clone()
        .or_else(|| manifest.config.default_environment.clone())
}

/// Boxfuse spells the environment flag `-env=prod` (one dash). Clap would read that as `-e`
/// with the value `nv=prod` and inject a variable `nv`, silently: rewrite it to `--env` before
/// parsing. Only before `--` (what follows belongs to the app).
pub fn normalize_args(args: impl IntoIterator<Item = OsString>) -> Vec<OsString> {
    let mut out = Vec::new();
    let mut passthrough = false;
    for arg in args {
        if passthrough || arg == "--" {
            passthrough = true;
            out.push(arg);
            continue;
        }
        match arg.to_str() {
            Some("-env") => out.push("--env".into()),
            Some(s) if s.starts_with("-env=") => out.push(format!("-{s}").into()),
            _ => out.push(arg),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use fuse_rootfs::tree::Node;

    fn config(files: &[(&str, &str)], text: &str) -> (tempfile::TempDir, Config) {
        let dir = tempfile::tempdir().unwrap();
        for (name, body) in files {
            std::fs::write(dir.path().join(name), body).unwrap();
        }
        std::fs::write(dir.path().join("fuse.toml"), text).unwrap();
        let c = Config::load(&dir.path().join("fuse.toml")).unwrap();
        (dir, c)
    }

    fn spec() -> AppSpec {
        let mut s = AppSpec::new("/app/web");
        s.args.push("--runtime-arg".into());
        s.env = vec![("PATH".into(), "/app".into())];
        s
    }

    fn file_bytes(tree: &Tree, path: &str) -> Vec<u8> {
        match tree.get(path) {
            Some(Node::File { source, .. }) => source.read().unwrap(),
            other => panic!("{path}: {other:?}"),
        }
    }

    const TEXT: &str = r#"
args = ["--serve"]
[env]
LOG = "info"
[files]
"/etc/web/common.conf" = "common.conf"
"/etc/web/app.conf" = "default.conf"
[environments.dev.env]
LOG = "debug"
[environments.prod]
env = { DB = "prod-db" }
args = ["--serve", "--fast"]
files = { "/etc/web/app.conf" = "prod.conf", "/etc/web/only-prod.conf" = "prod.conf" }
"#;

    #[test]
    fn bakes_every_environment() {
        let (_dir, c) = config(
            &[
                ("common.conf", "common"),
                ("default.conf", "default"),
                ("prod.conf", "prod"),
            ],
            TEXT,
        );
        let mut tree = Tree::new();
        let mut spec = spec();
        let image = bake(&mut tree, &mut spec, Some(&c), "jvm").unwrap();
        assert_eq!(image.environments, vec!["dev", "prod"]);
        assert_eq!(image.default_environment.as_deref(), Some("dev"));
        assert_eq!(spec.args, vec!["/app/web", "--serve"]);
        assert!(spec.env.contains(&("LOG".into(), "info".into())));

        let prod = RunOverlay::decode(&file_bytes(&tree, "/etc/fuse/env/prod")).unwrap();
        assert_eq!(prod.args, Some(vec!["--serve".into(), "--fast".into()]));
        assert_eq!(
            prod.env,
            vec![
                ("FUSE_ENV".into(), "prod".into()),
                ("SPRING_PROFILES_ACTIVE".into(), "prod".into()),
                ("DB".into(), "prod-db".into()),
            ]
        );
        let dev = RunOverlay::decode(&file_bytes(&tree, "/etc/fuse/env/dev")).unwrap();
        assert_eq!(dev.args, None, "dev keeps the image's args");
        assert!(dev.env.contains(&("LOG".into(), "debug".into())));
        assert_eq!(file_bytes(&tree, "/etc/fuse/environment"), b"dev\n");

        // Shared file: a plain file. Switched files: links, one copy per environment.
        assert_eq!(file_bytes(&tree, "/etc/web/common.conf"), b"common");
        assert!(matches!(
            tree.get("/etc/web/app.conf"),
            Some(Node::Symlink { target }) if target == "/run/fuse/current/etc/web/app.conf"
        ));
        assert_eq!(
            file_bytes(&tree, "/etc/fuse/files/prod/etc/web/app.conf"),
            b"prod"
        );
        assert_eq!(
            file_bytes(&tree, "/etc/fuse/files/dev/etc/web/app.conf"),
            b"default"
        );
        assert!(tree
            .get("/etc/fuse/files/dev/etc/web/only-prod.conf")
            .is_none());
        assert!(tree.get("/etc/fuse/files/dev").is_some());
    }

    #[test]
    fn conventions_yield_to_the_configuration() {
        let (_dir, c) = config(
            &[],
            "[env]\nNODE_ENV = \"staging\"\n[environments.prod]\n[environments.dev]\n",
        );
        let mut tree = Tree::new();
        bake(&mut tree, &mut spec(), Some(&c), "node").unwrap();
        let prod = RunOverlay::decode(&file_bytes(&tree, "/etc/fuse/env/prod")).unwrap();
        assert_eq!(prod.env, vec![("FUSE_ENV".into(), "prod".into())]);
        assert_eq!(convention("node", "prod").unwrap().1, "production");
        assert_eq!(convention("node", "qa").unwrap().1, "qa");
        assert_eq!(convention("native", "prod"), None);
    }

    #[test]
    fn no_configuration_changes_nothing() {
        let mut tree = Tree::new();
        let mut s = spec();
        let image = bake(&mut tree, &mut s, None, "native").unwrap();
        assert!(image.is_empty());
        assert_eq!(s, spec());
        assert_eq!(tree.len(), 1);
    }

    #[test]
    fn config_file_clashing_with_the_app_is_refused() {
        let (_dir, c) = config(
            &[("a.conf", "a")],
            "[environments.prod.files]\n\"/app/web\" = \"a.conf\"\n",
        );
        let mut tree = Tree::new();
        tree.add_bytes("/app/web", &b"elf"[..], 0o755).unwrap();
        let err = format!(
            "{:#}",
            bake(&mut tree, &mut spec(), Some(&c), "native").unwrap_err()
        );
        assert!(err.contains("/app/web clashes"), "{err}");
    }

    fn manifest(envs: &[&str]) -> Manifest {
        let mut m = crate::manifest::tests::sample();
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
    }

    #[test]
    fn selection_from_flags() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("run.env");
        std::fs::write(&file, "A=file\nB=file\n").unwrap();
        let args = SelectionArgs {
            environment: Some("prod".into()),
            set: vec!["B=flag".into(), "C=x=y".into()],
            env_files: vec![file],
        };
        let s = args.selection().unwrap();
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
        let bad = SelectionArgs {
            environment: Some("KEY=VALUE".into()),
            ..SelectionArgs::default()
        };
        assert!(bad
            .selection()
            .unwrap_err()
            .to_string()
            .contains("-e KEY=VALUE"));
        let missing = SelectionArgs {
            env_files: vec![Path::new("/nonexistent.env").into()],
            ..SelectionArgs::default()
        };
        assert!(missing
            .selection()
            .unwrap_err()
            .to_string()
            .contains("/nonexistent.env"));
    }

    #[test]
    fn boxfuse_spelling_is_rewritten_before_the_app_args() {
        let args = [
            "fuse",
            "run",
            "-env=prod",
            "app",
            "-e",
            "A=1",
            "--",
            "-env=x",
            "-env",
        ];
        let out = normalize_args(args.iter().map(OsString::from));
        let out: Vec<&str> = out.iter().map(|a| a.to_str().unwrap()).collect();
        assert_eq!(
            out,
            vec![
                "fuse",
                "run",
                "--env=prod",
                "app",
                "-e",
                "A=1",
                "--",
                "-env=x",
                "-env"
            ]
        );
        let out = normalize_args(["fuse", "run", "-env", "prod"].iter().map(OsString::from));
        assert_eq!(out[2], "--env");
    }
}
