//! Registry references, `host[:port]/repo[/more][:tag][@sha256:...]`, read with Docker's rules:
//! the first component names a registry host when it has a `.` or a `:` or is `localhost`.
//!
//! fuse has no default registry: `team/shop:1.0` names no host and is refused (and `shop:1.0`
//! is a local image name). `docker.io/shop` is Docker Hub's `library/shop`, reached at its API
//! host.

use crate::image::naming::ImageName;
use anyhow::{bail, Result};

/// Docker Hub as people write it, and the host its registry API answers on.
const DOCKER_HUB: &str = "docker.io";
const DOCKER_HUB_API: &str = "registry-1.docker.io";

/// A parsed registry reference.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Reference {
    /// The registry as written (`registry.example.com:5000`), Docker Hub's aliases as
    /// `docker.io`.
    pub(crate) registry: String,
    /// The repository in the registry (`team/shop`).
    pub(crate) repository: String,
    pub(crate) tag: Option<String>,
    /// `sha256:<hex>`: a manifest pinned by digest.
    pub(crate) digest: Option<String>,
}

impl std::fmt::Display for Reference {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.registry, self.repository)?;
        if let Some(tag) = &self.tag {
            write!(f, ":{tag}")?;
        }
        if let Some(digest) = &self.digest {
            write!(f, "@{digest}")?;
        }
        Ok(())
    }
}

/// Whether `text` starts with a registry host, so it is meant as a registry reference rather
/// than a local image name (as Docker tells `host/x` from `user/x`).
pub(crate) fn is_remote(text: &str) -> bool {
    text.split_once('/')
        .is_some_and(|(first, _)| names_host(first) && valid_host(first))
}

fn names_host(first: &str) -> bool {
    first.contains('.') || first.contains(':') || first == "localhost"
}

/// `host`, `host:port` or `[v6]:port`; host labels of letters, digits and `-`.
fn valid_host(host: &str) -> bool {
    let port_ok = |p: &str| p.len() <= 5 && p.parse::<u16>().is_ok_and(|n| n > 0);
    if let Some(rest) = host.strip_prefix('[') {
        let Some((v6, after)) = rest.split_once(']') else {
            return false;
        };
        return v6.parse::<std::net::Ipv6Addr>().is_ok()
            && (after.is_empty() || after.strip_prefix(':').is_some_and(port_ok));
    }
    let (name, port) = match host.split_once(':') {
        Some((n, p)) => (n, Some(p)),
        None => (host, None),
    };
    let label_ok = |l: &str| {
        !l.is_empty()
            && !l.starts_with('-')
            && !l.ends_with('-')
            && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
    };
    name.split('.').all(label_ok) && port.is_none_or(port_ok)
}

/// A path component: `[a-z0-9]+` joined by `.`, `_`, `__` or runs of `-`.
fn valid_component(c: &str) -> bool {
    if c.is_empty() || !c.starts_with(|ch: char| ch.is_ascii_lowercase() || ch.is_ascii_digit()) {
        return false;
    }
    let bytes = c.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        if b.is_ascii_lowercase() || b.is_ascii_digit() {
            i += 1;
            continue;
        }
        // A separator, then an alphanumeric must follow.
        let start = i;
        match b {
            b'.' => i += 1,
            b'_' => {
                i += 1;
                if bytes.get(i) == Some(&b'_') {
                    i += 1;
                }
            }
            b'-' => {
                while bytes.get(i) == Some(&b'-') {
                    i += 1;
                }
            }
            _ => return false,
        }
        if i == start
            || !bytes
                .get(i)
                .is_some_and(|n| n.is_ascii_lowercase() || n.is_ascii_digit())
        {
            return false;
        }
    }
    true
}

/// A tag: a word character, then up to 127 of word characters, `.` and `-`.
fn valid_tag(t: &str) -> bool {
    t.len() <= 128
        && t.starts_with(|c: char| c.is_ascii_alphanumeric() || c == '_')
        && t.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '.' || c == '-')
}

fn valid_digest(d: &str) -> bool {
    d.strip_prefix("sha256:").is_some_and(|hex| {
        hex.len() == 64
            && hex
                .chars()
                .all(|c| c.is_ascii_digit() || ('a'..='f').contains(&c))
    })
}

impl Reference {
    /// Parses `host[:port]/repo[/more][:tag][@sha256:<hex>]`; neither tag nor digest means
    /// `latest`.
    pub(crate) fn parse(text: &str) -> Result<Reference> {
        let bad = |why: &str| -> Result<Reference> {
            bail!("'{text}' is not a registry reference ({why}); write HOST[:PORT]/REPOSITORY[:TAG], e.g. registry.example.com:5000/team/app:1.0")
        };
        let Some((host, rest)) = text.split_once('/') else {
            return bad("no registry host");
        };
        if !names_host(host) {
            return bad(&format!(
                "'{host}' is no registry host: fuse has no default registry, name one such as docker.io/{text}"
            ));
        }
        if !valid_host(host) {
            return bad(&format!("invalid registry host '{host}'"));
        }
        let (rest, digest) = match rest.split_once('@') {
            Some((r, d)) => {
                if !valid_digest(d) {
                    return bad(&format!(
                        "invalid digest '{d}', expected sha256:<64 hex digits>"
                    ));
                }
                (r, Some(d.to_string()))
            }
            None => (rest, None),
        };
        let (path, tag) = match rest.rsplit_once(':') {
            Some((p, t)) => {
                if !valid_tag(t) {
                    return bad(&format!(
                        "invalid tag '{t}' (letters, digits, '_', '.', '-', at most 128)"
                    ));
                }
                (p, Some(t.to_string()))
            }
            None => (rest, None),
        };
        if let Some(c) = path.split('/').find(|c| !valid_component(c)) {
            return bad(&format!(
                "invalid repository component '{c}' (lowercase letters and digits, joined by '.', '_' or '-')"
            ));
        }
        let mut registry = host.to_string();
        let mut repository = path.to_string();
        if matches!(host, "docker.io" | "index.docker.io" | DOCKER_HUB_API) {
            registry = DOCKER_HUB.to_string();
            if !repository.contains('/') {
                repository = format!("library/{repository}");
            }
        }
        if registry.len() + 1 + repository.len() > 255 {
            return bad("longer than 255 characters");
        }
        let tag = if tag.is_none() && digest.is_none() {
            Some("latest".to_string())
        } else {
            tag
        };
        Ok(Reference {
            registry,
            repository,
            tag,
            digest,
        })
    }

    /// The host (and port) the registry API answers on.
    pub(crate) fn api_host(&self) -> &str {
        if self.registry == DOCKER_HUB {
            DOCKER_HUB_API
        } else {
            &self.registry
        }
    }

    /// The tag or digest a manifest is put or got by.
    pub(crate) fn manifest_reference(&self) -> &str {
        self.digest
            .as_deref()
            .or(self.tag.as_deref())
            .unwrap_or("latest")
    }

    /// The name a pulled image gets in the local store: `registry/repository` and the tag
    /// (a digest-only reference: `sha256-` and the digest's first 16 hex digits).
    pub(crate) fn local_name(&self) -> ImageName {
        let version = match (&self.tag, &self.digest) {
            (Some(tag), _) => tag.clone(),
            (None, Some(d)) => format!("sha256-{}", &crate::host::digest::hex_part(d)[..16]),
            (None, None) => "latest".to_string(),
        };
        ImageName {
            name: format!("{}/{}", self.registry, self.repository),
            version,
        }
    }
}

/// Whether plain HTTP may be used with `host` without `--insecure`: loopback only.
pub(crate) fn is_loopback(host: &str) -> bool {
    let name = if let Some(rest) = host.strip_prefix('[') {
        rest.split_once(']').map_or(rest, |(h, _)| h)
    } else {
        host.rsplit_once(':').map_or(host, |(h, _)| h)
    };
    name == "localhost"
        || name
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parsed(text: &str) -> (String, String, Option<String>, Option<String>) {
        let r = Reference::parse(text).unwrap();
        (r.registry, r.repository, r.tag, r.digest)
    }

    #[test]
    fn references_split_into_host_repository_tag_and_digest() {
        let d = format!("sha256:{}", "a".repeat(64));
        assert_eq!(
            parsed("registry.example.com:5000/team/shop:2.1"),
            (
                "registry.example.com:5000".into(),
                "team/shop".into(),
                Some("2.1".into()),
                None
            )
        );
        assert_eq!(
            parsed("127.0.0.1:5000/x/hello"),
            (
                "127.0.0.1:5000".into(),
                "x/hello".into(),
                Some("latest".into()),
                None
            )
        );
        assert_eq!(
            parsed(&format!("localhost/a/b/c@{d}")),
            ("localhost".into(), "a/b/c".into(), None, Some(d.clone()))
        );
        assert_eq!(
            parsed(&format!("[::1]:5000/a:v1@{d}")).2,
            Some("v1".to_string())
        );
        assert_eq!(parsed("ghcr.io/o/my_app__x-y.z:1").1, "o/my_app__x-y.z");
        let r = Reference::parse("docker.io/redis:7").unwrap();
        assert_eq!(r.repository, "library/redis");
        assert_eq!(r.api_host(), "registry-1.docker.io");
        assert_eq!(r.to_string(), "docker.io/library/redis:7");
        assert_eq!(
            Reference::parse("index.docker.io/u/x").unwrap().registry,
            "docker.io"
        );
    }

    #[test]
    fn local_names_and_hostless_references_are_refused() {
        for (text, why) in [
            ("hello:1.0", "no registry host"),
            ("team/shop:1", "no default registry"),
            ("reg.io/Team/shop", "invalid repository component 'Team'"),
            ("reg.io/a//b", "invalid repository component ''"),
            ("reg.io/a-/b", "invalid repository component 'a-'"),
            ("reg.io/a:b:c", "invalid repository component 'a:b'"),
            ("reg.io/a:.x", "invalid tag"),
            ("reg.io/a@sha256:abc", "invalid digest"),
            ("reg.io:0/a", "invalid registry host"),
            ("reg.io:99999/a", "invalid registry host"),
            ("-x.io/a", "invalid registry host"),
            ("[zz]:1/a", "invalid registry host"),
        ] {
            let err = Reference::parse(text).unwrap_err().to_string();
            assert!(err.contains(why), "{text}: {err}");
        }
        assert!(is_remote("127.0.0.1:5000/x/hello:1.0"));
        assert!(is_remote("localhost/x"));
        assert!(!is_remote("hello:1.0"));
        assert!(!is_remote("team/shop"));
        assert!(!is_remote("./app/hello"));
        assert!(!is_remote("../app"));
    }

    #[test]
    fn pulled_images_are_named_after_the_reference() {
        let r = Reference::parse("127.0.0.1:5000/x/hello:1.0").unwrap();
        assert_eq!(r.local_name().to_string(), "127.0.0.1:5000/x/hello:1.0");
        assert_eq!(r.manifest_reference(), "1.0");
        let d = format!("sha256:{}", "0123456789abcdef".repeat(4));
        let r = Reference::parse(&format!("reg.io/x@{d}")).unwrap();
        assert_eq!(r.local_name().version, "sha256-0123456789abcdef");
        assert_eq!(r.manifest_reference(), d);
    }

    #[test]
    fn only_loopback_may_speak_plain_http() {
        for host in ["localhost:5000", "127.0.0.1", "127.9.9.9:80", "[::1]:5000"] {
            assert!(is_loopback(host), "{host}");
        }
        for host in [
            "registry.example.com",
            "10.0.0.1:5000",
            "localhost.example.com",
        ] {
            assert!(!is_loopback(host), "{host}");
        }
    }
}
