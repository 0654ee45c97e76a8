//! Python apps: Debian's python3 from the host, real boots. What the guest printed, the exit
//! code, what the image holds, and the one-line refusals.

mod common;

use common::{json, pypi_venv, serve_once, Sandbox};
use fuse_tests::assert_no_leaked_qemu;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

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
    let built = sb.build_json(&script);
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

/// numpy's wheel is what auditwheel makes: compiled extensions needing the host's libstdc++
/// and libgcc_s, and OpenBLAS + libgfortran bundled in `numpy.libs/`, found through
/// `$ORIGIN/../../numpy.libs`. markupsafe's `_speedups` needs libpthread. All of it must be
/// in the image, the bundled libraries once, where the wheel has them.
#[test]
fn venv_with_numpy_computes_in_the_guest() {
    let sb = Sandbox::new();
    let venv = pypi_venv(
        "venv-numpy-2.2.6-markupsafe-3.0.2",
        &["--only-binary=:all:", "numpy==2.2.6", "markupsafe==3.0.2"],
    );
    let app = sb.dir.join("matrix");
    sb.dir.write(
        app.join("__main__.py"),
        "import numpy as np\n\
         import markupsafe._speedups as speedups\n\
         from markupsafe import escape\n\
         a = np.array([[1.0, 2.0], [3.0, 4.0]])\n\
         b = np.array([[5.0, 6.0], [7.0, 8.0]])\n\
         print('numpy', np.__version__, 'product', (a @ b).astype(int).tolist())\n\
         print('inverse', np.linalg.inv(a).round(3).tolist())\n\
         print('speedups', speedups._escape_inner('<x>'), escape('<b>'))\n",
    );
    sb.fuse()
        .args(["build", "--venv"])
        .arg(&venv)
        .arg(&app)
        .timeout(Duration::from_secs(600))
        .run()
        .assert_success();
    let out = sb.fuse().args(["run", "matrix"]).run();
    out.assert_success()
        .assert_stdout_contains("numpy 2.2.6 product [[19, 22], [43, 50]]")
        // LAPACK through the bundled OpenBLAS.
        .assert_stdout_contains("inverse [[-2.0, 1.0], [1.5, -0.5]]")
        .assert_stdout_contains("speedups &lt;x&gt; &lt;b&gt;");

    let listing = sb.rootfs_listing("matrix");
    let paths: Vec<&str> = listing
        .lines()
        .filter_map(|l| l.split_whitespace().last())
        .collect();
    let count = |needle: &str| paths.iter().filter(|p| p.contains(needle)).count();
    for bundled in ["libscipy_openblas", "libgfortran", "libquadmath"] {
        assert_eq!(count(bundled), 1, "{bundled} not exactly once:\n{listing}");
        assert!(
            paths
                .iter()
                .any(|p| p.contains("/site-packages/numpy.libs/") && p.contains(bundled)),
            "{bundled} not in numpy.libs:\n{listing}"
        );
    }
    for host in ["/libstdc++.so.6", "/libgcc_s.so.1", "/libpthread.so.0"] {
        assert_eq!(count(host), 1, "{host} not exactly once:\n{listing}");
    }
    assert_no_leaked_qemu();
}

/// A Flask app whose port and greeting come from `args` in fuse.toml, answering a real HTTP
/// request from the host through `-p`.
#[test]
fn flask_app_gets_its_args_from_fuse_toml_and_serves_http() {
    let sb = Sandbox::new();
    let venv = pypi_venv("venv-flask-3.1.1", &["--only-binary=:all:", "flask==3.1.1"]);
    let app = sb.dir.join("hello-flask");
    sb.dir.write(
        app.join("__main__.py"),
        "import argparse\n\
         import markupsafe._speedups\n\
         from flask import Flask\n\
         parser = argparse.ArgumentParser()\n\
         parser.add_argument('--port', type=int, required=True)\n\
         parser.add_argument('--greeting', required=True)\n\
         opts = parser.parse_args()\n\
         app = Flask(__name__)\n\
         @app.route('/')\n\
         def index():\n\
         \x20   return f'{opts.greeting} from flask on port {opts.port}\\n'\n\
         app.run(host='0.0.0.0', port=opts.port)\n",
    );
    sb.dir.write(
        app.join("fuse.toml"),
        "args = [\"--port\", \"8090\", \"--greeting\", \"hello from fuse.toml\"]\n",
    );
    sb.fuse()
        .args(["build", "--venv"])
        .arg(&venv)
        .arg(&app)
        .timeout(Duration::from_secs(600))
        .run()
        .assert_success();
    let (response, out) = serve_once(&sb, "hello-flask", 8090);
    assert!(response.starts_with("HTTP/1.1 200"), "{response}\n{out}");
    assert!(
        response.ends_with("hello from fuse.toml from flask on port 8090\n"),
        "{response}\n{out}"
    );
    assert!(!out.timed_out, "{out}");
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
