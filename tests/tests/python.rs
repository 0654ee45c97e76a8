//! Python apps: Debian's python3 from the host, real boots. What the guest printed, the exit
//! code, what the image holds, and the one-line refusals.

mod common;

use common::{json, Sandbox};
use fuse_tests::assert_no_leaked_qemu;
use std::path::PathBuf;
use std::process::Command;

/// The ceiling of a Python hello image in bytes (measured: 15.3 MB).
const PYTHON_HELLO_BUDGET: u64 = 20_000_000;

/// A virtualenv made by the host's python3 with one package written into it by hand (nothing
/// comes from the network).
fn venv_with_greeter(sb: &Sandbox) -> PathBuf {
    let venv = sb.dir.join("venv");
    let out = Command::new("/usr/bin/python3")
        .args(["-m", "venv", "--without-pip"])
        .arg(&venv)
        .output()
        .expect("python3 -m venv (python3-venv) is needed");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let version = Command::new("/usr/bin/python3")
        .args(["-c", "import sys; print('%d.%d' % sys.version_info[:2])"])
        .output()
        .unwrap();
    let short = String::from_utf8_lossy(&version.stdout).trim().to_string();
    let site = venv.join(format!("lib/python{short}/site-packages"));
    sb.dir.write(
        site.join("greeter/__init__.py"),
        "def greet(who):\n    return f'greetings, {who}, from the venv'\n",
    );
    venv
}

#[test]
fn script_prints_and_its_exit_code_propagates() {
    let sb = Sandbox::new();
    let script = sb.dir.write(
        "pyhello-1.2.py",
        "import os, sys\n\
         print(f'hello from python {sys.version.split()[0]} in {os.getcwd()} args={sys.argv[1:]}')\n\
         sys.exit(5)\n",
    );
    let built = json(
        sb.fuse()
            .args(["build", "--json"])
            .arg(&script)
            .run()
            .assert_success(),
    );
    assert_eq!(built["image"], "pyhello:1.2");
    let size = built["size"].as_u64().unwrap();
    assert!(
        size <= PYTHON_HELLO_BUDGET,
        "Python hello image is {size} bytes"
    );

    let out = sb.fuse().args(["run", "pyhello:1.2", "--", "x"]).run();
    out.assert_code(5)
        .assert_stdout_contains("hello from python 3.")
        .assert_stdout_contains("in /app args=['x']");

    let inspect = json(
        sb.fuse()
            .args(["inspect", "--json", "pyhello:1.2"])
            .run()
            .assert_success(),
    );
    assert_eq!(inspect["app"]["kind"], "python");
    assert!(inspect["notes"]["python.version"]
        .as_str()
        .is_some_and(|v| v.starts_with("3.")));
    let env: Vec<&str> = inspect["app"]["env"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|v| v.as_str())
        .collect();
    assert!(env.contains(&"PYTHONDONTWRITEBYTECODE=1"), "{env:?}");
    assert!(env.contains(&"PYTHONUNBUFFERED=1"), "{env:?}");

    let listing = sb.rootfs_listing("pyhello:1.2");
    for wanted in [
        "/usr/bin/python3",
        "/usr/lib/python3.",
        "/os.py",
        "/json/__init__.py",
    ] {
        assert!(listing.contains(wanted), "{wanted} missing:\n{listing}");
    }
    for unwanted in [
        "idlelib",
        "tkinter",
        "ensurepip",
        "lib2to3",
        "__pycache__",
        ".pyc",
        "_testcapi",
    ] {
        assert!(!listing.contains(unwanted), "{unwanted} in:\n{listing}");
    }
    assert_no_leaked_qemu();
}

#[test]
fn package_app_imports_from_its_venv() {
    let sb = Sandbox::new();
    let venv = venv_with_greeter(&sb);
    let app = sb.dir.join("greet");
    sb.dir.write(
        app.join("__main__.py"),
        "import greeter, json, sys\nprint(greeter.greet('guest'), json.dumps(sys.prefix))\n",
    );
    sb.dir
        .write(app.join("__pycache__/stale.cpython-311.pyc"), "junk");
    let out = sb
        .fuse()
        .arg("run")
        .arg("--venv")
        .arg(&venv)
        .arg(&app)
        .run();
    out.assert_success()
        .assert_stdout_contains("greetings, guest, from the venv \"/opt/venv\"");
    let listing = sb.rootfs_listing("greet");
    assert!(listing.contains("/opt/venv/lib/python3."), "{listing}");
    assert!(listing.contains("greeter/__init__.py"), "{listing}");
    assert!(!listing.contains("stale"), "{listing}");
    assert_no_leaked_qemu();
}

#[test]
fn pyproject_entry_point_runs() {
    let sb = Sandbox::new();
    let app = sb.dir.join("svc");
    sb.dir.write(
        app.join("pyproject.toml"),
        "[project]\nname = \"svc\"\nversion = \"0.1\"\n[project.scripts]\nsvc = \"svc.cli:main\"\n",
    );
    sb.dir.write(app.join("src/svc/__init__.py"), "");
    sb.dir.write(
        app.join("src/svc/cli.py"),
        "import sys\ndef main():\n    print('svc main ran', sys.argv[1:])\n    return 6\n",
    );
    let out = sb.fuse().arg("run").arg(&app).args(["--", "serve"]).run();
    out.assert_code(6)
        .assert_stdout_contains("svc main ran ['serve']");
    assert_no_leaked_qemu();
}

#[test]
fn bad_python_apps_are_refused_with_one_clear_line() {
    let sb = Sandbox::new();
    let script = sb.dir.write("ok.py", "print(1)\n");
    sb.assert_refused(
        [
            "build".as_ref(),
            "--python".as_ref(),
            "/nonexistent/python3".as_ref(),
            script.as_os_str(),
        ],
        &["/nonexistent/python3", "--python"],
    );

    let no_scripts = sb.dir.join("noscripts");
    sb.dir.write(
        no_scripts.join("pyproject.toml"),
        "[project]\nname = \"x\"\n",
    );
    sb.assert_refused(
        ["build".as_ref(), no_scripts.as_os_str()],
        &["pyproject.toml", "[project.scripts]"],
    );

    let invalid = sb.dir.join("invalid");
    sb.dir
        .write(invalid.join("pyproject.toml"), "[project]\nname = \n");
    sb.assert_refused(
        ["build".as_ref(), invalid.as_os_str()],
        &["pyproject.toml:2:", "not valid TOML"],
    );

    let not_venv = sb.dir.join("notvenv");
    std::fs::create_dir_all(&not_venv).unwrap();
    sb.assert_refused(
        [
            "build".as_ref(),
            "--venv".as_ref(),
            not_venv.as_os_str(),
            script.as_os_str(),
        ],
        &["notvenv", "not a virtualenv", "python3 -m venv"],
    );

    let escaping = sb.dir.join("escaping");
    sb.dir.write(escaping.join("__main__.py"), "print(1)\n");
    sb.dir.write("outside.py", "x = 1\n");
    std::os::unix::fs::symlink("../outside.py", escaping.join("helper.py")).unwrap();
    sb.assert_refused(
        ["build".as_ref(), escaping.as_os_str()],
        &["helper.py", "outside the app directory"],
    );

    let empty = sb.dir.join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    sb.assert_refused(
        [
            "build".as_ref(),
            "--kind".as_ref(),
            "python".as_ref(),
            empty.as_os_str(),
        ],
        &["__main__.py", "pyproject.toml"],
    );
}

/// Item 8 of issue 12: servers derive `Last-Modified` and `ETag` from file times, so a page's
/// time must change with its content (even at the same size), from one epoch
/// (`SOURCE_DATE_EPOCH`) so that the same input still gives the same image.
#[test]
fn file_times_follow_content_and_source_date_epoch() {
    let sb = Sandbox::new();
    let app = sb.dir.join("site-1.0");
    sb.dir.write(
        "site-1.0/__main__.py",
        "import os\n\
         for p in ['/app/index.html', '/app']:\n    print(f'mtime {p} {int(os.stat(p).st_mtime)}')\n",
    );
    let epoch: i64 = 1_700_000_000;
    let build_and_stat = |page: &str| -> (String, i64, i64) {
        sb.dir.write("site-1.0/index.html", page);
        let built = json(
            sb.fuse()
                .env("SOURCE_DATE_EPOCH", epoch.to_string())
                .args(["build", "--json"])
                .arg(&app)
                .run()
                .assert_success(),
        );
        let out = sb.fuse().args(["run", "site:1.0"]).run();
        out.assert_success();
        let stdout = out.stdout_str();
        let time = |path: &str| -> i64 {
            let prefix = format!("mtime {path} ");
            stdout
                .lines()
                .find_map(|l| l.strip_prefix(&prefix))
                .unwrap_or_else(|| panic!("no {path} time in:\n{out}"))
                .trim()
                .parse()
                .unwrap()
        };
        let digest = built["digest"].as_str().unwrap().to_string();
        (digest, time("/app/index.html"), time("/app"))
    };
    let (d1, page1, dir1) = build_and_stat("<h1>release 1</h1>\n");
    assert_eq!(dir1, epoch, "a directory carries the epoch");
    assert!(
        page1 <= epoch && page1 > epoch - 86_400,
        "a file's time is within a day before the epoch: {page1}"
    );
    // Another page of the same size (nginx's ETag is mtime-size): another time, another image.
    let (d2, page2, _) = build_and_stat("<h1>release 2</h1>\n");
    assert_ne!(
        page2, page1,
        "same size, other content: the time must change"
    );
    assert_ne!(d2, d1);
    // The first page again: the first image again, bit for bit.
    let (d3, page3, _) = build_and_stat("<h1>release 1</h1>\n");
    assert_eq!((d3.as_str(), page3), (d1.as_str(), page1));

    let inspect = json(
        sb.fuse()
            .args(["inspect", "--json", "site:1.0"])
            .run()
            .assert_success(),
    );
    assert_eq!(
        inspect["notes"]["files.epoch"],
        format!("{epoch} (SOURCE_DATE_EPOCH)")
    );

    // A malformed epoch is refused before anything is built.
    let out = sb
        .fuse()
        .env("SOURCE_DATE_EPOCH", "last tuesday")
        .args(["build", "--name", "bad:1"])
        .arg(&app)
        .run();
    common::assert_one_error(&out, &["SOURCE_DATE_EPOCH=", "seconds since 1970"]);
    sb.fuse().args(["inspect", "bad:1"]).run().assert_failure();
    assert_no_leaked_qemu();
}
