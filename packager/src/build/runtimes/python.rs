//! Python apps: the interpreter with its shared-library closure, its standard library pruned of
//! what an app server never needs, the app, and the dependencies installed in a virtualenv.
//!
//! Input: a script (`app.py`), a directory with `__main__.py` (run as `python3 /app`), or a
//! directory with `pyproject.toml` whose `[project.scripts]` names `module:function`. The
//! interpreter is `--python`, else Debian's `/usr/bin/python3` (not the first `python3` on PATH,
//! which may be a pyenv shim or a virtualenv's link). Dependencies come from `--venv`: its
//! `lib/pythonX.Y/site-packages`, installed by the user as for any deployment.
//!
//! Image layout: the interpreter at `/usr/bin/pythonX.Y` (+ `python3` link), the standard library
//! at `/usr/lib/pythonX.Y`, both found by the interpreter's own landmark search from its
//! location (no PYTHONHOME needed), libraries where the host's loader has them. With a venv, the
//! image gets a real one at [`VENV_DIR`]: `pyvenv.cfg`, `bin/python3` linking to the interpreter,
//! and the site-packages; running its `bin/python3` makes Python set it up exactly as on the
//! host (`.pth` files included). The app is at `/app`. Compiled extensions of the venv and the
//! app (numpy's, with the libraries auditwheel bundled in `numpy.libs/`) come with their
//! libraries like the interpreter's own (see [`closure`]).
//!
//! No bytecode is shipped: `__pycache__` is dropped and `PYTHONDONTWRITEBYTECODE=1` (the root
//! filesystem is read-only anyway). Compiling at build time would need marshal output, which is
//! not reproducible byte for byte across runs, and the measured boot cost of compiling what a
//! small app imports is small (see `ci/bench-runtimes`).

use super::app::{app_spec, default_env, AppImage, RuntimeInput};
use super::appdir::{self, AppElf};
use super::closure;
use crate::build::layout;
use anyhow::{bail, Context, Result};
use fuse_rootfs::elf;
use fuse_rootfs::tree::Tree;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The interpreter when `--python` is not given.
pub(crate) const DEFAULT_PYTHON: &str = "/usr/bin/python3";
/// Where a virtualenv's packages go.
pub(crate) const VENV_DIR: &str = "/opt/venv";
/// The manifest note with the interpreter's version.
pub(crate) use crate::image::manifest::NOTE_PYTHON_VERSION as NOTE_VERSION;

/// Top-level parts of the standard library an app server never imports: the test suite, the
/// IDE, Tk and its demos, pip's bootstrap wheels, 2to3, `help()` topics, the static library
/// and Makefile for building extensions, the system-wide package directories (the app's
/// packages come from its venv), pip's "externally managed" marker.
const PRUNED_STDLIB: &[&str] = &[
    "test",
    "idlelib",
    "tkinter",
    "turtledemo",
    "turtle.py",
    "ensurepip",
    "lib2to3",
    "pydoc_data",
    "__phello__",
    "site-packages",
    "dist-packages",
    "EXTERNALLY-MANAGED",
    // Debian's link to the host's /etc/python3.X hook: host configuration, not the library.
    "sitecustomize.py",
];

/// What the host interpreter says about itself.
#[derive(Debug, Clone)]
struct Interpreter {
    /// The real binary (symlinks resolved).
    binary: PathBuf,
    /// `3.11.2`.
    version: String,
    /// `3.11`.
    short: String,
    /// Its standard library directory on the host.
    stdlib: PathBuf,
    /// Where its extension modules are on the host.
    dynload: PathBuf,
}

pub(crate) fn assemble(
    input: &RuntimeInput<'_>,
    progress: &mut dyn FnMut(&str),
) -> Result<AppImage> {
    let python = probe(input.python)?;
    let mut tree = layout::skeleton()?;
    // Compiled extensions of the app and its venv, whose libraries come after the
    // interpreter's (those the interpreter brings are not added twice).
    let mut elves = Vec::new();
    let (mut args, fixed, src) = add_app(&mut tree, input.input, &mut elves)?;
    let exe_name = format!("python{}", python.short);
    let image_exe = format!("/usr/bin/{exe_name}");
    add_interpreter(&mut tree, &python, &image_exe, input, progress)?;
    let exe = match input.venv {
        Some(venv) => add_venv(&mut tree, venv, &python, &mut elves)?,
        None => image_exe,
    };
    closure::add_app_libraries(&mut tree, &elves, &input.closure_options(), progress)?;
    // Python finds its home (and the venv's pyvenv.cfg) from argv[0]: a bare `python3` would
    // be looked up on PATH, which leads to /usr/bin and past the venv.
    args.insert(0, exe.clone());

    let mut env = default_env(input.name);
    // No bytecode on a read-only root: do not even try to write it.
    env.push(("PYTHONDONTWRITEBYTECODE".into(), "1".into()));
    // The console is the app's log: print lines as they come, not when a buffer fills.
    env.push(("PYTHONUNBUFFERED".into(), "1".into()));
    if src {
        // A src-layout project that is not installed in the venv imports from /app/src.
        env.push(("PYTHONPATH".into(), format!("{}/src", layout::APP_DIR)));
    }
    let spec = app_spec(input, exe, args, env);
    Ok(AppImage {
        tree,
        spec,
        notes: vec![
            (NOTE_VERSION.into(), python.version.clone()),
            // `fuse run app -- ARGS` gives ARGS to the app, after its launcher arguments.
            (
                crate::image::manifest::NOTE_FIXED_ARGS.into(),
                fixed.to_string(),
            ),
            // `fuse inspect` counts the standard library as the runtime's bytes.
            (
                crate::image::manifest::NOTE_RUNTIME_DIR.into(),
                format!("/usr/lib/python{}", python.short),
            ),
        ],
    })
}

/// Finds and asks the interpreter: `--python`, else [`DEFAULT_PYTHON`].
fn probe(given: Option<&Path>) -> Result<Interpreter> {
    let path = given.unwrap_or(Path::new(DEFAULT_PYTHON));
    if !path.is_file() {
        if given.is_some() {
            bail!(
                "Python interpreter {} given with --python does not exist: give the path of a python3 executable",
                path.display()
            );
        }
        bail!("Python not found at {DEFAULT_PYTHON}: install it (Debian: apt-get install python3) or give --python PATH");
    }
    let binary = path
        .canonicalize()
        .with_context(|| format!("Cannot read {}", path.display()))?;
    let script = "import sys, sysconfig\n\
                  print(sys.version.split()[0])\n\
                  print('%d.%d' % sys.version_info[:2])\n\
                  print(sysconfig.get_paths()['stdlib'])\n\
                  print(sysconfig.get_config_var('DESTSHARED') or '')\n";
    let out = Command::new(&binary)
        .args(["-I", "-S", "-c", script])
        .output()
        .with_context(|| {
            format!(
                "Cannot run {}: give a working python3 with --python",
                binary.display()
            )
        })?;
    let text = String::from_utf8_lossy(&out.stdout);
    let lines: Vec<&str> = text.lines().collect();
    if !out.status.success() || lines.len() < 4 {
        bail!(
            "{} did not describe itself ({}): give a working python3 with --python",
            binary.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let stdlib = PathBuf::from(lines[2]);
    let dynload = if lines[3].is_empty() {
        stdlib.join("lib-dynload")
    } else {
        PathBuf::from(lines[3])
    };
    Ok(Interpreter {
        binary,
        version: lines[0].to_string(),
        short: lines[1].to_string(),
        stdlib,
        dynload,
    })
}

/// Adds the app; returns the arguments after argv\[0\], how many of them are the launcher's,
/// and whether the app has a `src/` directory. Its ELF files go to `elves`.
fn add_app(
    tree: &mut Tree,
    input: &Path,
    elves: &mut Vec<AppElf>,
) -> Result<(Vec<String>, usize, bool)> {
    let meta = std::fs::metadata(input).with_context(|| {
        format!(
            "App {} not found: give a .py file or a directory with __main__.py or pyproject.toml",
            input.display()
        )
    })?;
    let app = layout::APP_DIR;
    if !meta.is_dir() {
        let name = input
            .file_name()
            .and_then(|n| n.to_str())
            .with_context(|| format!("File name of {} is not UTF-8: rename it", input.display()))?;
        tree.add_host_file(&format!("{app}/{name}"), input, 0o644)?;
        return Ok((vec![format!("{app}/{name}")], 1, false));
    }
    let launch = if input.join("__main__.py").is_file() {
        // `python3 /app` runs the directory's __main__.py with /app on sys.path.
        (vec![app.to_string()], 1)
    } else if input.join("pyproject.toml").is_file() {
        let (module, function) = project_script(&input.join("pyproject.toml"))?;
        let code = format!("import sys; from {module} import {function} as main; sys.exit(main())");
        (vec!["-c".into(), code], 2)
    } else {
        bail!(
            "Directory {} has neither __main__.py nor pyproject.toml: give the app's .py file, or add one of them",
            input.display()
        );
    };
    let copied = appdir::add_app_dir(tree, input, app, &mut |rel, is_dir| {
        keep_app_entry(input, rel, is_dir)
    })?;
    elves.extend(copied.elves);
    Ok((launch.0, launch.1, input.join("src").is_dir()))
}

/// Whether an entry of a Python app directory belongs in the image: not bytecode, not tool
/// caches, not a virtualenv (dependencies come from `--venv`; a venv's links point at the
/// host's interpreter).
fn keep_app_entry(root: &Path, rel: &str, is_dir: bool) -> bool {
    let name = rel.rsplit('/').next().unwrap_or(rel);
    if is_dir {
        let cache = matches!(
            name,
            "__pycache__" | ".mypy_cache" | ".pytest_cache" | ".ruff_cache" | ".tox" | ".nox"
        );
        return !cache && !root.join(rel).join("pyvenv.cfg").is_file();
    }
    !name.ends_with(".pyc")
}

/// The `module:function` of the project's `[project.scripts]`: the only entry, or the one
/// named like the project.
fn project_script(path: &Path) -> Result<(String, String)> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("Cannot read {}: make it readable", path.display()))?;
    let doc: toml::Table = toml::from_str(&text).map_err(|e| {
        let at = e
            .span()
            .map(|s| {
                let before = &text[..s.start.min(text.len())];
                let line = before.matches('\n').count() + 1;
                let column = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
                format!(":{line}:{column}")
            })
            .unwrap_or_default();
        anyhow::anyhow!(
            "{}{at} is not valid TOML ({}): fix the file",
            path.display(),
            e.message()
        )
    })?;
    let project = doc.get("project").and_then(toml::Value::as_table);
    let scripts = project
        .and_then(|p| p.get("scripts"))
        .and_then(toml::Value::as_table)
        .filter(|s| !s.is_empty())
        .with_context(|| {
            format!(
                "{} has no [project.scripts] entry point: add one (name = \"module:function\") or a __main__.py",
                path.display()
            )
        })?;
    let name = project
        .and_then(|p| p.get("name"))
        .and_then(toml::Value::as_str);
    let (key, value) = if scripts.len() == 1 {
        scripts.iter().next().expect("one entry")
    } else {
        let named = name.and_then(|n| scripts.get_key_value(n));
        named.with_context(|| {
            let keys: Vec<&str> = scripts.keys().map(String::as_str).collect();
            format!(
                "{} has several [project.scripts] ({}) and none is named like the project: keep one, or name one after the project",
                path.display(),
                keys.join(", ")
            )
        })?
    };
    let reference = value.as_str().unwrap_or_default();
    // `module:function`, maybe with extras (`[extra]`), which do not change what runs.
    let reference = reference.split('[').next().unwrap_or("").trim();
    let valid = |s: &str| {
        !s.is_empty()
            && s.split('.').all(|part| {
                part.chars()
                    .next()
                    .is_some_and(|c| c.is_alphabetic() || c == '_')
                    && part.chars().all(|c| c.is_alphanumeric() || c == '_')
            })
    };
    match reference.split_once(':') {
        Some((module, function)) if valid(module.trim()) && valid(function.trim()) => {
            Ok((module.trim().to_string(), function.trim().to_string()))
        }
        _ => bail!(
            "{}: the script '{key}' is '{}', not \"module:function\": fix [project.scripts]",
            path.display(),
            value.as_str().unwrap_or("(not a string)")
        ),
    }
}

/// Adds the interpreter at `image_exe` (+ `/usr/bin/python3`), the pruned standard library and
/// the extension modules with every library they need.
fn add_interpreter(
    tree: &mut Tree,
    python: &Interpreter,
    image_exe: &str,
    input: &RuntimeInput<'_>,
    progress: &mut dyn FnMut(&str),
) -> Result<()> {
    let options = input.closure_options();
    elf::add_with_closure(tree, &python.binary, image_exe, &options)?;
    let name = image_exe.rsplit('/').next().unwrap_or(image_exe);
    tree.add_symlink("/usr/bin/python3", name)?;

    let stdlib_image = format!("/usr/lib/python{}", python.short);
    let stdlib = python.stdlib.clone();
    let dynload = python.dynload.clone();
    appdir::add_app_dir(tree, &stdlib, &stdlib_image, &mut |rel, is_dir| {
        let top = rel.split('/').next().unwrap_or(rel);
        let name = rel.rsplit('/').next().unwrap_or(rel);
        // Extension modules are added below, each with its libraries.
        if PRUNED_STDLIB.contains(&top) || top.starts_with("config-") || top == "lib-dynload" {
            return false;
        }
        if is_dir {
            return name != "__pycache__";
        }
        !name.ends_with(".pyc")
    })
    .with_context(|| format!("Cannot copy the standard library {}", stdlib.display()))?;

    // Extension modules: inside the stdlib on Debian (`lib-dynload`), elsewhere on some builds.
    // The interpreter looks for them in `<stdlib>/lib-dynload`, wherever the host has them.
    let image_dynload = format!("{stdlib_image}/lib-dynload");
    tree.add_dir(&image_dynload, 0o755)?;
    let mut extensions: Vec<PathBuf> = std::fs::read_dir(&dynload)
        .and_then(|d| d.map(|e| e.map(|e| e.path())).collect())
        .with_context(|| format!("Cannot read {}", dynload.display()))?;
    extensions.sort();
    for ext in extensions {
        let name = ext
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default()
            .to_string();
        if !name.ends_with(".so") || pruned_extension(&name) {
            continue;
        }
        let image_path = format!("{image_dynload}/{name}");
        match elf::resolve_closure(&ext, &image_path, &options) {
            Ok(closure) => {
                tree.add_host_file(&image_path, &ext, 0o644)?;
                for lib in &closure.libraries {
                    tree.add_host_file(&lib.image_path, &lib.host_path, 0o644)?;
                }
            }
            // The interpreter runs without it, as on a host missing that library: say so and
            // leave the module out rather than refuse the app.
            Err(err) => {
                progress(&format!("leaving out the Python module {name}: {err}"));
            }
        }
    }
    Ok(())
}

/// Extension modules never needed by an app server: CPython's own test modules, the
/// interactive console's line editing, terminal UIs and audio devices.
fn pruned_extension(file_name: &str) -> bool {
    let module = file_name.split('.').next().unwrap_or(file_name);
    module.starts_with("_test")
        || module.starts_with("xxlimited")
        || matches!(
            module,
            "_ctypes_test"
                | "_xxtestfuzz"
                | "readline"
                | "_curses"
                | "_curses_panel"
                | "ossaudiodev"
        )
}

/// Adds the virtualenv at [`VENV_DIR`]; returns the interpreter path to run (the venv's). The
/// ELF files of its site-packages go to `elves`.
fn add_venv(
    tree: &mut Tree,
    venv: &Path,
    python: &Interpreter,
    elves: &mut Vec<AppElf>,
) -> Result<String> {
    let cfg = venv.join("pyvenv.cfg");
    if !cfg.is_file() {
        bail!(
            "{} is not a virtualenv (no pyvenv.cfg): create it with `python3 -m venv` and install the app's dependencies into it",
            venv.display()
        );
    }
    let rel = format!("lib/python{}/site-packages", python.short);
    let site = venv.join(&rel);
    if !site.is_dir() {
        bail!(
            "Virtualenv {} has no {rel}: it was made by another Python than {} ({}); recreate it with that interpreter or give --python",
            venv.display(),
            python.binary.display(),
            python.version
        );
    }
    let copied = appdir::add_app_dir(
        tree,
        &site,
        &format!("{VENV_DIR}/{rel}"),
        &mut |rel, is_dir| {
            let top = rel.split('/').next().unwrap_or(rel);
            let name = rel.rsplit('/').next().unwrap_or(rel);
            // No package manager in the image: pip cannot install anything on a read-only root.
            let pip = top == "pip" || (top.starts_with("pip-") && top.ends_with(".dist-info"));
            let bytecode = (is_dir && name == "__pycache__") || name.ends_with(".pyc");
            !(pip || bytecode)
        },
    )?;
    elves.extend(copied.elves);
    // Only what the interpreter reads at start: where its home is. The host's paths and
    // the venv's own prompt stay out.
    tree.add_bytes(
        &format!("{VENV_DIR}/pyvenv.cfg"),
        format!(
            "home = /usr/bin\ninclude-system-site-packages = false\nversion = {}\n",
            python.version
        )
        .into_bytes(),
        0o644,
    )?;
    let exe = format!("{VENV_DIR}/bin/python3");
    tree.add_symlink(&exe, &format!("/usr/bin/python{}", python.short))?;
    Ok(exe)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pyproject(text: &str) -> Result<(String, String)> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pyproject.toml");
        std::fs::write(&path, text).unwrap();
        project_script(&path)
    }

    #[test]
    fn project_scripts_give_module_and_function() {
        let one =
            pyproject("[project]\nname = \"svc\"\n[project.scripts]\nserve = \"svc.web:main\"\n");
        assert_eq!(one.unwrap(), ("svc.web".into(), "main".into()));
        let named = pyproject(
            "[project]\nname = \"svc\"\n[project.scripts]\nsvc = \"svc.cli:run\"\nother = \"x:y\"\n",
        );
        assert_eq!(named.unwrap(), ("svc.cli".into(), "run".into()));
        let err = format!("{:#}", pyproject("[project]\nname = \"x\"\n").unwrap_err());
        assert!(err.contains("no [project.scripts]"), "{err}");
        let err = format!(
            "{:#}",
            pyproject("[project.scripts]\na = \"not a ref\"\n").unwrap_err()
        );
        assert!(err.contains("not \"module:function\""), "{err}");
        let err = format!("{:#}", pyproject("[project\nname = 1\n").unwrap_err());
        assert!(
            err.contains("pyproject.toml:1:") && err.contains("not valid TOML"),
            "{err}"
        );
    }

    #[test]
    fn test_and_console_extensions_are_pruned() {
        for pruned in [
            "_testcapi.cpython-311-x86_64-linux-gnu.so",
            "_ctypes_test.cpython-311-x86_64-linux-gnu.so",
            "readline.cpython-311-x86_64-linux-gnu.so",
            "_curses_panel.cpython-311-x86_64-linux-gnu.so",
            "xxlimited_35.cpython-311-x86_64-linux-gnu.so",
        ] {
            assert!(pruned_extension(pruned), "{pruned}");
        }
        for kept in [
            "_ssl.cpython-311-x86_64-linux-gnu.so",
            "_ctypes.cpython-311-x86_64-linux-gnu.so",
            "_json.cpython-311-x86_64-linux-gnu.so",
        ] {
            assert!(!pruned_extension(kept), "{kept}");
        }
    }
}
