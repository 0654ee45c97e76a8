//! `fuse sbom`: the SPDX 2.3 document of a stored image validates with the SPDX project's own
//! tool (`pyspdxtools`, PyPI spdx-tools, in a venv made once under the target directory), holds
//! the files with the host's checksums and the packages found in the image, and is the same
//! bytes on every run.

mod common;

use common::{json, npm_modules, pypi_venv, run_tool, sha256_hex, Sandbox, HELLO};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

/// The python of a venv with spdx-tools 0.8.3 (its scripts' shebangs name the scratch
/// directory the fixture was made in, so the tool runs as `python -m`).
fn spdx_python() -> PathBuf {
    pypi_venv("venv-spdx-tools-0.8.3", &["spdx-tools==0.8.3"]).join("bin/python3")
}

/// Validates `doc` with pyspdxtools: exit 0, no validation message at all (it exits 1 listing
/// them on an invalid document).
fn assert_valid(doc: &Path) {
    let out = Command::new(spdx_python())
        .args(["-m", "spdx_tools.spdx.clitools.pyspdxtools", "-i"])
        .arg(doc)
        .output()
        .expect("pyspdxtools runs");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "pyspdxtools refused it:\n{text}");
    assert!(!text.contains("invalid"), "{text}");
}

/// `fuse sbom IMAGE -o FILE`, the document's bytes and JSON.
fn sbom(sb: &Sandbox, image: &str, name: &str) -> (PathBuf, Vec<u8>, Value) {
    let file = sb.dir.join(name);
    sb.fuse()
        .args(["sbom", image, "-o"])
        .arg(&file)
        .timeout(Duration::from_secs(300))
        .run()
        .assert_success();
    let bytes = std::fs::read(&file).unwrap();
    let doc = serde_json::from_slice(&bytes).unwrap();
    (file, bytes, doc)
}

fn package<'a>(doc: &'a Value, name: &str) -> &'a Value {
    doc["packages"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == name)
        .unwrap_or_else(|| panic!("no package {name}: {:#}", doc["packages"]))
}

fn file<'a>(doc: &'a Value, path: &str) -> &'a Value {
    doc["files"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["fileName"] == format!(".{path}"))
        .unwrap_or_else(|| panic!("no file {path}"))
}

/// The file entry whose name ends with `suffix`.
fn file_ending<'a>(doc: &'a Value, suffix: &str) -> &'a Value {
    doc["files"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["fileName"].as_str().unwrap().ends_with(suffix))
        .unwrap_or_else(|| panic!("no file ending with {suffix}"))
}

fn checksum<'a>(entry: &'a Value, algorithm: &str) -> &'a str {
    entry["checksums"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["algorithm"] == algorithm)
        .and_then(|c| c["checksumValue"].as_str())
        .unwrap_or_else(|| panic!("no {algorithm} in {entry}"))
}

/// Whether `from` CONTAINS `to` (SPDX ids).
fn contains(doc: &Value, from: &str, to: &str) -> bool {
    doc["relationships"].as_array().unwrap().iter().any(|r| {
        r["spdxElementId"] == from
            && r["relationshipType"] == "CONTAINS"
            && r["relatedSpdxElement"] == to
    })
}

#[test]
fn static_hello_sbom_validates_has_its_files_and_is_deterministic() {
    let sb = Sandbox::new();
    let hello = sb.program(HELLO, "hello", &["-static"]);
    sb.fuse().arg("build").arg(&hello).run().assert_success();
    let inspect = json(
        sb.fuse()
            .args(["inspect", "--json", "hello"])
            .run()
            .assert_success(),
    );
    let (path, bytes, doc) = sbom(&sb, "hello", "hello.spdx.json");
    assert_valid(&path);

    assert_eq!(doc["spdxVersion"], "SPDX-2.3");
    let digest = inspect["digest"].as_str().unwrap();
    let hex = digest.trim_start_matches("sha256:");
    assert!(
        doc["documentNamespace"].as_str().unwrap().ends_with(hex),
        "{}",
        doc["documentNamespace"]
    );
    let image = package(&doc, "hello");
    assert_eq!(checksum(image, "SHA256"), hex);
    let kernel = package(&doc, "linux");
    assert_eq!(kernel["versionInfo"], inspect["kernel"]["release"]);
    assert_eq!(
        checksum(kernel, "SHA256"),
        inspect["kernel"]["digest"]
            .as_str()
            .unwrap()
            .trim_start_matches("sha256:")
    );
    // The app's file, with the host file's checksum, in the image package.
    let app = file(&doc, "/app/hello");
    assert_eq!(checksum(app, "SHA256"), sha256_hex(&hello));
    let sha1 = run_tool(Command::new("sha1sum").arg(&hello), "sha1sum (coreutils)");
    assert_eq!(
        checksum(app, "SHA1"),
        sha1.split_whitespace().next().unwrap()
    );
    assert!(contains(
        &doc,
        "SPDXRef-Package-image",
        app["SPDXID"].as_str().unwrap()
    ));
    assert_eq!(
        doc["files"].as_array().unwrap().len() as u64,
        inspect["contents"]["files"].as_u64().unwrap(),
        "every regular file, as inspect counts them"
    );

    // Same image, same bytes (by digest too).
    let (_, again, _) = sbom(&sb, digest, "again.spdx.json");
    assert_eq!(bytes, again, "two runs differ");
    // Printed to stdout without -o: the same bytes.
    let out = sb.fuse().args(["sbom", "hello"]).run();
    out.assert_success();
    assert_eq!(out.stdout, bytes);
}

#[test]
fn unknown_image_is_one_clear_error() {
    let sb = Sandbox::new();
    let out = sb.fuse().args(["sbom", "nope"]).run();
    common::assert_one_error(&out, &["nope", "fuse ls"]);
}

/// A venv with a PyPI distribution: the distribution is a package (Name, Version of its
/// METADATA, a purl), owning the files its RECORD lists; the Python runtime is one too.
#[test]
fn python_venv_distributions_are_packages_owning_their_files() {
    let sb = Sandbox::new();
    let venv = pypi_venv("venv-six-1.17.0", &["--only-binary=:all:", "six==1.17.0"]);
    let app = sb.dir.join("sixapp");
    sb.dir.write(
        app.join("__main__.py"),
        "import six\nprint(six.__version__)\n",
    );
    sb.fuse()
        .args(["build", "--venv"])
        .arg(&venv)
        .arg(&app)
        .timeout(Duration::from_secs(600))
        .run()
        .assert_success();
    let (path, _, doc) = sbom(&sb, "sixapp", "six.spdx.json");
    assert_valid(&path);
    let six = package(&doc, "six");
    assert_eq!(six["versionInfo"], "1.17.0");
    assert_eq!(
        six["externalRefs"][0]["referenceLocator"],
        "pkg:pypi/six@1.17.0"
    );
    let module = file_ending(&doc, "/site-packages/six.py");
    assert_eq!(
        checksum(module, "SHA256"),
        sha256_hex(
            &std::fs::read_dir(venv.join("lib"))
                .unwrap()
                .next()
                .unwrap()
                .unwrap()
                .path()
                .join("site-packages/six.py")
        )
    );
    assert!(contains(
        &doc,
        six["SPDXID"].as_str().unwrap(),
        module["SPDXID"].as_str().unwrap()
    ));
    let python = package(&doc, "python");
    assert!(
        python["versionInfo"].as_str().unwrap().starts_with("3."),
        "{python}"
    );
}

/// A Node app with packages from npm (one scoped): each `node_modules/*/package.json` is a
/// package with its name, version and purl, owning the files under its directory; node itself
/// is the runtime, owning /usr/bin/node.
#[test]
fn node_modules_are_packages_owning_their_files() {
    let sb = Sandbox::new();
    let modules = npm_modules(
        "npm-ms-2.1.3-types-ms-0.7.34",
        &["ms@2.1.3", "@types/ms@0.7.34"],
    );
    let app = sb.dir.join("msapp");
    common::copy_tree(&modules, &app);
    sb.dir.write(
        app.join("package.json"),
        r#"{ "name": "msapp", "version": "1.0.0", "main": "index.js" }"#,
    );
    sb.dir
        .write(app.join("index.js"), "console.log(require('ms')(60000));\n");
    sb.fuse()
        .arg("build")
        .arg(&app)
        .timeout(Duration::from_secs(600))
        .run()
        .assert_success();
    let (path, _, doc) = sbom(&sb, "msapp", "ms.spdx.json");
    assert_valid(&path);
    let ms = package(&doc, "ms");
    assert_eq!(ms["versionInfo"], "2.1.3");
    assert_eq!(
        ms["externalRefs"][0]["referenceLocator"],
        "pkg:npm/ms@2.1.3"
    );
    let types = package(&doc, "@types/ms");
    assert_eq!(
        types["externalRefs"][0]["referenceLocator"],
        "pkg:npm/%40types/ms@0.7.34"
    );
    let index = file_ending(&doc, "/node_modules/ms/index.js");
    assert_eq!(
        checksum(index, "SHA256"),
        sha256_hex(&modules.join("node_modules/ms/index.js"))
    );
    assert!(contains(
        &doc,
        ms["SPDXID"].as_str().unwrap(),
        index["SPDXID"].as_str().unwrap()
    ));
    let node = package(&doc, "node");
    assert!(contains(
        &doc,
        node["SPDXID"].as_str().unwrap(),
        file(&doc, "/usr/bin/node")["SPDXID"].as_str().unwrap()
    ));
}
