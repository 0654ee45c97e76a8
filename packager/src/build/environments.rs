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

use crate::build::config::{self, Config};
use crate::image::config::ImageConfig;
use anyhow::{Context, Result};
use fuse_boot::spec::{
    AppSpec, RunOverlay, CURRENT_ENV_LINK, DEFAULT_ENV_PATH, ENV_DIR, ENV_FILES_DIR,
};
use fuse_rootfs::tree::Tree;
use std::collections::BTreeSet;

/// The variable that names the selected environment in the guest.
pub(crate) const FUSE_ENV: &str = "FUSE_ENV";

/// Applies a configuration to an image being built: top-level args, env and files into the
/// spec and tree, every environment baked. `fixed` counts the runtime launcher's own arguments
/// after argv\[0\] (`-jar /app/x.jar`, `/app/main.js`): the configured args are the app's, so
/// they follow those, as `fuse run IMAGE -- ARGS` does. Returns what the manifest records.
pub(crate) fn bake(
    tree: &mut Tree,
    spec: &mut AppSpec,
    config: Option<&Config>,
    kind: &str,
    fixed: usize,
) -> Result<ImageConfig> {
    let Some(config) = config else {
        return Ok(ImageConfig::default());
    };
    let launcher: Vec<String> = spec.args.iter().skip(1).take(fixed).cloned().collect();
    if let Some(args) = &config.args {
        spec.args.truncate(1 + fixed);
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
        // An overlay's args replace argv[1..]: the launcher's stay in front of the app's.
        let args = environment
            .args
            .as_ref()
            .map(|args| launcher.iter().chain(args).cloned().collect());
        let overlay = RunOverlay {
            args,
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
pub(crate) fn convention(kind: &str, name: &str) -> Option<(&'static str, String)> {
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

    /// [`TEXT`] with the files it names.
    fn text_config() -> (tempfile::TempDir, Config) {
        config(
            &[
                ("common.conf", "common"),
                ("default.conf", "default"),
                ("prod.conf", "prod"),
            ],
            TEXT,
        )
    }

    #[test]
    fn configured_args_follow_the_launchers_own() {
        let (_dir, c) = text_config();
        let mut tree = Tree::new();
        let mut spec = AppSpec::new("/opt/java/bin/java");
        spec.args.extend(["-jar".into(), "/app/web.jar".into()]);
        bake(&mut tree, &mut spec, Some(&c), "jvm", 2).unwrap();
        assert_eq!(
            spec.args,
            vec!["/opt/java/bin/java", "-jar", "/app/web.jar", "--serve"]
        );
        let prod = RunOverlay::decode(&file_bytes(&tree, "/etc/fuse/env/prod")).unwrap();
        assert_eq!(
            prod.args,
            Some(vec![
                "-jar".into(),
                "/app/web.jar".into(),
                "--serve".into(),
                "--fast".into()
            ])
        );
        let dev = RunOverlay::decode(&file_bytes(&tree, "/etc/fuse/env/dev")).unwrap();
        assert_eq!(
            dev.args, None,
            "dev keeps the image's args, launcher included"
        );
    }

    #[test]
    fn bakes_every_environment() {
        let (_dir, c) = text_config();
        let mut tree = Tree::new();
        let mut spec = spec();
        let image = bake(&mut tree, &mut spec, Some(&c), "jvm", 0).unwrap();
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
        bake(&mut tree, &mut spec(), Some(&c), "node", 0).unwrap();
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
        let image = bake(&mut tree, &mut s, None, "native", 0).unwrap();
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
            bake(&mut tree, &mut spec(), Some(&c), "native", 0).unwrap_err()
        );
        assert!(err.contains("/app/web clashes"), "{err}");
    }
}
