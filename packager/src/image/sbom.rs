//! An SPDX 2.3 JSON software bill of materials of a stored image: the image, its kernel and
//! fuse's init (by their digests), the runtime the notes name, the packages found inside the
//! root filesystem (Maven coordinates of jars, npm packages, Python distributions) or recorded
//! in the notes (Debian packages of a sysroot), and every regular file with its SHA-256 and
//! SHA-1. The same image gives the same bytes: `created` is the image's file epoch and the
//! namespace derives from its digest.
//!
//! The root filesystem is read by unpacking the stored squashfs with `unsquashfs`
//! (squashfs-tools) into a temporary directory of the store: fuse_rootfs only writes squashfs.

use crate::host::{digest, sysroot};
use crate::image::manifest::{Manifest, NOTE_NODE_VERSION, NOTE_PYTHON_VERSION, NOTE_RUNTIME_DIR};
use crate::image::store::{Store, StoredImage};
use anyhow::{bail, Context, Result};
use serde_json::{json, Value};
use sha1::Sha1;
use sha2::{Digest as _, Sha256};
use std::collections::BTreeMap;
use std::fs::File;
use std::io::Read;
use std::path::Path;
use std::process::{Command, Stdio};

/// One regular file of the root filesystem.
struct FileEntry {
    /// Absolute in the image: `/app/hello`.
    path: String,
    sha256: String,
    sha1: String,
}

/// A package found in or recorded for the image.
struct Package {
    id: String,
    name: String,
    version: Option<String>,
    purl: Option<String>,
    /// `APPLICATION`, `LIBRARY`, `OPERATING-SYSTEM`...
    purpose: &'static str,
    /// A `sha256:<hex>` checksum (image, kernel, init).
    sha256: Option<String>,
    /// What it owns: files under this directory (`/opt/java/`)...
    prefix: Option<String>,
    /// ...or exactly these files.
    files: Vec<String>,
    /// The file it was found in (a jar) that contains it.
    inside: Option<String>,
}

impl Package {
    fn new(id: String, name: &str, version: Option<&str>, purpose: &'static str) -> Package {
        Package {
            id,
            name: name.to_string(),
            version: version.map(str::to_string),
            purl: None,
            purpose,
            sha256: None,
            prefix: None,
            files: Vec::new(),
            inside: None,
        }
    }

    /// A library, the `n`th package found, known by its package URL (`purl`).
    fn library(kind: &str, n: usize, name: &str, version: &str, purl: String) -> Package {
        let mut p = Package::new(
            format!("SPDXRef-Package-{kind}-{n}"),
            name,
            Some(version),
            "LIBRARY",
        );
        p.purl = Some(purl);
        p
    }
}

/// The creator fuse names in its SBOMs: this fuse (`fuse-0.1.0`).
pub(crate) fn this_tool() -> String {
    format!("fuse-{}", env!("CARGO_PKG_VERSION"))
}

/// The SBOM of `image` as SPDX 2.3 JSON bytes (newline-terminated); `tool` names the creator
/// (`fuse-0.1.0`).
pub(crate) fn generate(store: &Store, image: &StoredImage, tool: &str) -> Result<Vec<u8>> {
    let m = &image.manifest;
    let (blob, app_blob) = (
        store.blob_path(&m.rootfs.digest),
        store.blob_path(&m.appfs.digest),
    );
    if !blob.is_file() || !app_blob.is_file() {
        bail!(
            "The root or app filesystem of {} is missing from the store: pull or rebuild the image",
            m.reference()
        );
    }
    let temp = store.temp_dir()?;
    let root = temp.path().join("root");
    unpack(&blob, &root)?;
    // The app's filesystem goes where the VM mounts it, on the root's empty /app.
    let app = temp.path().join("app");
    unpack(&app_blob, &app)?;
    let mount_point = root.join(crate::image::manifest::APP_DIR.trim_start_matches('/'));
    std::fs::remove_dir(&mount_point)
        .and_then(|()| std::fs::rename(&app, &mount_point))
        .with_context(|| format!("Cannot place the app's files at {}", mount_point.display()))?;
    let mut paths = Vec::new();
    walk(&root, &root, &mut paths)?;
    paths.sort();
    let mut files = Vec::with_capacity(paths.len());
    for rel in &paths {
        let (sha256, sha1) = hash_file(&root.join(rel))
            .with_context(|| format!("Reading /{rel} of the root filesystem"))?;
        files.push(FileEntry {
            path: format!("/{rel}"),
            sha256,
            sha1,
        });
    }
    let packages = find_packages(m, &root, &files)?;
    Ok(document(m, &image.digest, tool, &files, &packages))
}

fn unpack(blob: &Path, dir: &Path) -> Result<()> {
    // -no-xattrs: the files' bytes are what matter; unprivileged extraction cannot set some.
    let output = Command::new("unsquashfs")
        .args(["-quiet", "-no-progress", "-no-xattrs", "-d"])
        .arg(dir)
        .arg(blob)
        .stdin(Stdio::null())
        .output()
        .context("Running unsquashfs: install squashfs-tools (apt-get install squashfs-tools)")?;
    if !output.status.success() {
        bail!(
            "unsquashfs could not read the root filesystem: {}",
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(())
}

/// The regular files under `dir`, relative to `root`.
fn walk(root: &Path, dir: &Path, out: &mut Vec<String>) -> Result<()> {
    for entry in std::fs::read_dir(dir).with_context(|| format!("Reading {}", dir.display()))? {
        let entry = entry?;
        let kind = entry.file_type()?;
        let path = entry.path();
        if kind.is_dir() {
            walk(root, &path, out)?;
        } else if kind.is_file() {
            let rel = path.strip_prefix(root).expect("under root");
            out.push(rel.to_string_lossy().into_owned());
        }
    }
    Ok(())
}

fn hash_file(path: &Path) -> std::io::Result<(String, String)> {
    let mut file = File::open(path)?;
    let (mut a, mut b) = (Sha256::new(), Sha1::new());
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        a.update(&buf[..n]);
        b.update(&buf[..n]);
    }
    Ok((hex::encode(a.finalize()), hex::encode(b.finalize())))
}

fn find_packages(m: &Manifest, root: &Path, files: &[FileEntry]) -> Result<Vec<Package>> {
    let mut packages = Vec::new();
    let mut kernel = Package::new(
        "SPDXRef-Package-kernel".into(),
        "linux",
        Some(&m.kernel.release),
        "OPERATING-SYSTEM",
    );
    kernel.sha256 = Some(m.kernel.digest.clone());
    packages.push(kernel);
    let mut init = Package::new("SPDXRef-Package-init".into(), "fuse-init", None, "FIRMWARE");
    init.sha256 = Some(m.init.digest.clone());
    packages.push(init);

    let runtime_dir = m.notes.get(NOTE_RUNTIME_DIR).map(|d| format!("{d}/"));
    let runtimes = [
        ("jdk.version", "openjdk", None),
        (NOTE_NODE_VERSION, "node", Some("/usr/bin/node")),
        (NOTE_PYTHON_VERSION, "python", None),
    ];
    for (note, name, file) in runtimes {
        if let Some(version) = m.notes.get(note) {
            let mut p = Package::new(
                format!("SPDXRef-Package-runtime-{name}"),
                name,
                Some(version),
                "FRAMEWORK",
            );
            p.prefix = runtime_dir.clone();
            if let Some(file) = file {
                p.files.push(file.to_string());
            }
            packages.push(p);
        }
    }

    for file in files {
        let path = &file.path;
        if path.ends_with(".jar") {
            for (group, artifact, version) in maven_coordinates(&root.join(&path[1..]))
                .with_context(|| format!("Reading the jar {path}"))?
            {
                let mut p = Package::library(
                    "maven",
                    packages.len(),
                    &format!("{group}:{artifact}"),
                    &version,
                    format!("pkg:maven/{group}/{artifact}@{version}"),
                );
                p.inside = Some(path.clone());
                packages.push(p);
            }
        } else if let Some(dir) = path.strip_suffix("/package.json") {
            // node_modules/NAME/package.json or node_modules/@SCOPE/NAME/package.json.
            let parent = dir.rsplit_once('/').map(|(p, _)| p).unwrap_or("");
            let in_modules = parent.ends_with("/node_modules")
                || parent.rsplit_once('/').is_some_and(|(pp, scope)| {
                    scope.starts_with('@') && pp.ends_with("/node_modules")
                });
            if !in_modules {
                continue;
            }
            let Ok(json) = serde_json::from_slice::<Value>(&std::fs::read(root.join(&path[1..]))?)
            else {
                continue;
            };
            let (Some(name), Some(version)) = (json["name"].as_str(), json["version"].as_str())
            else {
                continue;
            };
            let mut p = Package::library(
                "npm",
                packages.len(),
                name,
                version,
                format!("pkg:npm/{}@{version}", name.replacen('@', "%40", 1)),
            );
            p.prefix = Some(format!("{dir}/"));
            packages.push(p);
        } else if let Some(dist) = path.strip_suffix("/METADATA") {
            if !dist.ends_with(".dist-info") {
                continue;
            }
            let text = std::fs::read_to_string(root.join(&path[1..])).unwrap_or_default();
            let field = |key: &str| {
                text.lines()
                    .take_while(|l| !l.is_empty())
                    .find_map(|l| l.strip_prefix(key).map(|v| v.trim().to_string()))
            };
            let (Some(name), Some(version)) = (field("Name:"), field("Version:")) else {
                continue;
            };
            let mut p = Package::library(
                "pypi",
                packages.len(),
                &name,
                &version,
                format!(
                    "pkg:pypi/{}@{version}",
                    name.to_lowercase().replace(['_', '.'], "-")
                ),
            );
            // RECORD lists the distribution's files, relative to the directory above dist-info.
            let site = dist.rsplit_once('/').map(|(p, _)| p).unwrap_or("");
            let record = std::fs::read_to_string(root.join(&dist[1..]).join("RECORD"));
            for line in record.unwrap_or_default().lines() {
                if let Some(rel) = line.split(',').next().filter(|r| !r.is_empty()) {
                    p.files.push(normalize(&format!("{site}/{rel}")));
                }
            }
            packages.push(p);
        }
    }

    if let Some(list) = m.notes.get(sysroot::NOTE_PACKAGES) {
        for entry in list.split(',') {
            let Some((name, version)) = entry.split_once('=') else {
                continue;
            };
            packages.push(Package::library(
                "deb",
                packages.len(),
                name,
                version,
                format!(
                    "pkg:deb/debian/{name}@{version}?arch={}",
                    sysroot::debian_arch(m.arch)
                ),
            ));
        }
    }
    Ok(packages)
}

/// `a/b/../c` → `a/c` (RECORD paths of scripts go up from site-packages).
fn normalize(path: &str) -> String {
    let mut parts: Vec<&str> = Vec::new();
    for part in path.split('/') {
        match part {
            ".." => {
                parts.pop();
            }
            "." => {}
            p => parts.push(p),
        }
    }
    parts.join("/")
}

/// The `(groupId, artifactId, version)` of each `META-INF/maven/*/*/pom.properties` of a jar.
fn maven_coordinates(jar: &Path) -> Result<Vec<(String, String, String)>> {
    let Ok(mut zip) = zip::ZipArchive::new(File::open(jar)?) else {
        return Ok(Vec::new());
    };
    let mut names: Vec<String> = zip
        .file_names()
        .filter(|n| n.starts_with("META-INF/maven/") && n.ends_with("/pom.properties"))
        .map(str::to_string)
        .collect();
    names.sort();
    let mut found = Vec::new();
    for name in names {
        let mut text = String::new();
        zip.by_name(&name)?.read_to_string(&mut text)?;
        let get = |key: &str| {
            text.lines().find_map(|l| {
                let (k, v) = l.split_once('=')?;
                (k.trim() == key).then(|| v.trim().to_string())
            })
        };
        if let (Some(g), Some(a), Some(v)) = (get("groupId"), get("artifactId"), get("version")) {
            found.push((g, a, v));
        }
    }
    Ok(found)
}

/// SPDX's package verification code: SHA-1 of the sorted SHA-1s of its files.
fn verification_code(sha1s: &mut [&str]) -> String {
    sha1s.sort_unstable();
    hex::encode(Sha1::digest(sha1s.concat().as_bytes()))
}

fn document(
    m: &Manifest,
    image_digest: &str,
    tool: &str,
    files: &[FileEntry],
    packages: &[Package],
) -> Vec<u8> {
    let hex = digest::hex_part(image_digest);
    let file_id = |i: usize| format!("SPDXRef-File-{i}");
    let index: BTreeMap<&str, usize> = files
        .iter()
        .enumerate()
        .map(|(i, f)| (f.path.as_str(), i))
        .collect();
    // Each file's owner: the package listing it, else the one with the longest prefix of it.
    let mut owner: Vec<Option<usize>> = vec![None; files.len()];
    let mut prefix_len = vec![0usize; files.len()];
    for (p, package) in packages.iter().enumerate() {
        for path in &package.files {
            if let Some(&i) = index.get(path.as_str()) {
                owner[i] = Some(p);
                prefix_len[i] = usize::MAX;
            }
        }
        if let Some(prefix) = &package.prefix {
            for (i, file) in files.iter().enumerate() {
                if file.path.starts_with(prefix.as_str()) && prefix.len() > prefix_len[i] {
                    owner[i] = Some(p);
                    prefix_len[i] = prefix.len();
                }
            }
        }
    }

    let image_id = "SPDXRef-Package-image";
    let mut relationships = vec![json!({
        "spdxElementId": "SPDXRef-DOCUMENT",
        "relationshipType": "DESCRIBES",
        "relatedSpdxElement": image_id,
    })];
    let contains = |from: &str, to: &str| json!({"spdxElementId": from, "relationshipType": "CONTAINS", "relatedSpdxElement": to});
    let mut owned: Vec<Vec<&str>> = vec![Vec::new(); packages.len()];
    for (i, file) in files.iter().enumerate() {
        match owner[i] {
            Some(p) => {
                relationships.push(contains(&packages[p].id, &file_id(i)));
                owned[p].push(&file.sha1);
            }
            None => relationships.push(contains(image_id, &file_id(i))),
        }
    }
    for package in packages {
        let from = match package.inside.as_deref().and_then(|f| index.get(f)) {
            Some(&i) => file_id(i),
            None => image_id.to_string(),
        };
        relationships.push(contains(&from, &package.id));
    }

    let mut all: Vec<&str> = files.iter().map(|f| f.sha1.as_str()).collect();
    let mut spdx_packages = vec![json!({
        "SPDXID": image_id,
        "name": m.name,
        "versionInfo": m.version,
        "downloadLocation": "NOASSERTION",
        "filesAnalyzed": true,
        "packageVerificationCode": {"packageVerificationCodeValue": verification_code(&mut all)},
        "checksums": [{"algorithm": "SHA256", "checksumValue": hex}],
        "primaryPackagePurpose": "CONTAINER",
        "comment": format!("fuse VM image {image_digest} ({})", m.arch.as_str()),
    })];
    for (p, package) in packages.iter().enumerate() {
        let mut v = json!({
            "SPDXID": package.id,
            "name": package.name,
            "downloadLocation": "NOASSERTION",
            "filesAnalyzed": !owned[p].is_empty(),
            "primaryPackagePurpose": package.purpose,
        });
        if let Some(version) = &package.version {
            v["versionInfo"] = json!(version);
        }
        if !owned[p].is_empty() {
            v["packageVerificationCode"] =
                json!({"packageVerificationCodeValue": verification_code(&mut owned[p])});
        }
        if let Some(sha) = &package.sha256 {
            v["checksums"] =
                json!([{"algorithm": "SHA256", "checksumValue": digest::hex_part(sha)}]);
        }
        if let Some(purl) = &package.purl {
            v["externalRefs"] = json!([{
                "referenceCategory": "PACKAGE-MANAGER",
                "referenceType": "purl",
                "referenceLocator": purl,
            }]);
        }
        spdx_packages.push(v);
    }
    let spdx_files: Vec<Value> = files
        .iter()
        .enumerate()
        .map(|(i, f)| {
            json!({
                "SPDXID": file_id(i),
                "fileName": format!(".{}", f.path),
                "checksums": [
                    {"algorithm": "SHA1", "checksumValue": f.sha1},
                    {"algorithm": "SHA256", "checksumValue": f.sha256},
                ],
            })
        })
        .collect();
    let doc = json!({
        "spdxVersion": "SPDX-2.3",
        "dataLicense": "CC0-1.0",
        "SPDXID": "SPDXRef-DOCUMENT",
        "name": m.reference(),
        "documentNamespace": format!("https://spdx.org/spdxdocs/fuse-{}-{hex}", m.name),
        "creationInfo": {"created": m.created(), "creators": [format!("Tool: {tool}")]},
        "packages": spdx_packages,
        "files": spdx_files,
        "relationships": relationships,
    });
    let mut bytes = serde_json::to_vec_pretty(&doc).expect("SBOM serialises");
    bytes.push(b'\n');
    bytes
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn record_paths_are_normalized() {
        assert_eq!(
            normalize("/venv/lib/python3.11/site-packages/../../../bin/x"),
            "/venv/bin/x"
        );
        assert_eq!(normalize("/a/./b"), "/a/b");
    }

    #[test]
    fn jars_give_the_maven_coordinates_of_their_pom_properties() {
        use std::io::Write as _;
        use zip::write::SimpleFileOptions;
        let dir = tempfile::tempdir().unwrap();
        let jar = dir.path().join("app.jar");
        let mut zip = zip::ZipWriter::new(File::create(&jar).unwrap());
        let opts = SimpleFileOptions::default();
        for (name, body) in [
            ("META-INF/MANIFEST.MF", "Main-Class: A\n"),
            (
                "META-INF/maven/org.example/lib/pom.properties",
                "#generated\nversion=1.2.3\ngroupId=org.example\nartifactId=lib\n",
            ),
            (
                "META-INF/maven/com.acme/app/pom.properties",
                "groupId=com.acme\nartifactId=app\nversion=2.0\n",
            ),
            ("META-INF/maven/broken/x/pom.properties", "groupId=broken\n"),
        ] {
            zip.start_file(name, opts).unwrap();
            zip.write_all(body.as_bytes()).unwrap();
        }
        zip.finish().unwrap();
        assert_eq!(
            maven_coordinates(&jar).unwrap(),
            vec![
                ("com.acme".into(), "app".into(), "2.0".into()),
                ("org.example".into(), "lib".into(), "1.2.3".into()),
            ]
        );
        // Not a zip: no coordinates, no error.
        std::fs::write(&jar, b"not a jar").unwrap();
        assert!(maven_coordinates(&jar).unwrap().is_empty());
    }

    #[test]
    fn verification_code_is_order_free() {
        let (a, b) = ("aa".to_string(), "bb".to_string());
        assert_eq!(
            verification_code(&mut [&a, &b]),
            verification_code(&mut [&b, &a])
        );
    }
}
