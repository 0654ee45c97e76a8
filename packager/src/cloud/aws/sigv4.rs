//! AWS Signature Version 4 (header form), as AWS documents it: canonical request, string to
//! sign, signing key by HMAC-SHA256 chain. Written here rather than taken from the AWS SDK (a
//! few dozen lines against its hundreds of crates); checked against AWS's published test suite.

use sha2::{Digest, Sha256};

/// Keys that sign requests: the secret never leaves this struct but as an HMAC key, and its
/// `Debug` shows only the access key id.
#[derive(Clone)]
pub(crate) struct Credentials {
    pub(crate) access_key_id: String,
    pub(crate) secret_access_key: String,
    pub(crate) session_token: Option<String>,
    /// Where they came from, for messages: `the environment`, `profile dev of ~/.aws/credentials`.
    pub(crate) source: String,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("access_key_id", &self.access_key_id)
            .field("secret_access_key", &"<redacted>")
            .field(
                "session_token",
                &self.session_token.as_ref().map(|_| "<redacted>"),
            )
            .field("source", &self.source)
            .finish()
    }
}

/// One request to sign. `headers` must hold `host` and `x-amz-date` (and the session token's
/// `x-amz-security-token`); `path` is the path as sent on the wire.
#[derive(Debug)]
pub(crate) struct Request<'a> {
    pub(crate) method: &'a str,
    pub(crate) path: &'a str,
    pub(crate) query: &'a [(String, String)],
    pub(crate) headers: &'a [(String, String)],
    /// Hex SHA-256 of the body.
    pub(crate) payload_sha256: &'a str,
}

/// RFC 3986 percent-encoding as SigV4 wants it: unreserved characters kept, every other byte
/// `%XY` (upper case); `/` kept when `keep_slash` (paths).
pub(crate) fn uri_encode(s: &str, keep_slash: bool) -> String {
    let mut out = String::with_capacity(s.len());
    for &b in s.as_bytes() {
        let keep = b.is_ascii_alphanumeric()
            || matches!(b, b'-' | b'_' | b'.' | b'~')
            || (keep_slash && b == b'/');
        if keep {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The query string as sent and as signed: encoded pairs sorted by key then value.
pub(crate) fn canonical_query(query: &[(String, String)]) -> String {
    let mut pairs: Vec<(String, String)> = query
        .iter()
        .map(|(k, v)| (uri_encode(k, false), uri_encode(v, false)))
        .collect();
    pairs.sort();
    let pairs: Vec<String> = pairs.into_iter().map(|(k, v)| format!("{k}={v}")).collect();
    pairs.join("&")
}

/// `(canonical headers, signed headers)`: names lower-cased and sorted, values trimmed with
/// inner runs of spaces collapsed, repeated names joined with commas.
fn canonical_headers(headers: &[(String, String)]) -> (String, String) {
    let mut map: std::collections::BTreeMap<String, Vec<String>> = Default::default();
    for (name, value) in headers {
        let value = value.split_whitespace().collect::<Vec<_>>().join(" ");
        map.entry(name.to_ascii_lowercase())
            .or_default()
            .push(value);
    }
    let canonical: String = map
        .iter()
        .map(|(n, vs)| format!("{n}:{}\n", vs.join(",")))
        .collect();
    let signed = map.keys().cloned().collect::<Vec<_>>().join(";");
    (canonical, signed)
}

/// The canonical request (non-S3 services: the path's segments encoded once more).
pub(crate) fn canonical_request(req: &Request) -> String {
    let (headers, signed) = canonical_headers(req.headers);
    format!(
        "{}\n{}\n{}\n{headers}\n{signed}\n{}",
        req.method,
        uri_encode(req.path, true),
        canonical_query(req.query),
        req.payload_sha256
    )
}

fn hmac(key: &[u8], data: &[u8]) -> [u8; 32] {
    const BLOCK: usize = 64;
    let mut k = [0u8; BLOCK];
    if key.len() > BLOCK {
        k[..32].copy_from_slice(&Sha256::digest(key));
    } else {
        k[..key.len()].copy_from_slice(key);
    }
    let mut inner = Sha256::new();
    inner.update(k.map(|b| b ^ 0x36));
    inner.update(data);
    let mut outer = Sha256::new();
    outer.update(k.map(|b| b ^ 0x5c));
    outer.update(inner.finalize());
    outer.finalize().into()
}

/// The `Authorization` header of `req` for `service` in `region`, signed at `amz_date`
/// (`YYYYMMDDTHHMMSSZ`, the request's `x-amz-date`).
pub(crate) fn authorization(
    creds: &Credentials,
    region: &str,
    service: &str,
    amz_date: &str,
    req: &Request,
) -> String {
    let date = &amz_date[..8];
    let scope = format!("{date}/{region}/{service}/aws4_request");
    let creq = canonical_request(req);
    let to_sign = format!(
        "AWS4-HMAC-SHA256\n{amz_date}\n{scope}\n{}",
        hex::encode(Sha256::digest(creq.as_bytes()))
    );
    let mut key = hmac(
        format!("AWS4{}", creds.secret_access_key).as_bytes(),
        date.as_bytes(),
    );
    for part in [region, service, "aws4_request"] {
        key = hmac(&key, part.as_bytes());
    }
    let signature = hex::encode(hmac(&key, to_sign.as_bytes()));
    let (_, signed) = canonical_headers(req.headers);
    format!(
        "AWS4-HMAC-SHA256 Credential={}/{scope}, SignedHeaders={signed}, Signature={signature}",
        creds.access_key_id
    )
}

/// `YYYYMMDDTHHMMSSZ` for a time in seconds since the epoch (UTC): RFC 3339's basic form.
pub(crate) fn amz_date(unix_seconds: u64) -> String {
    crate::image::manifest::rfc3339(unix_seconds as i64).replace(['-', ':'], "")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// AWS's Signature Version 4 test suite (docs.aws.amazon.com/general/latest/gr/
    /// signature-v4-test-suite.html): its example keys, date, region and service.
    fn suite_credentials() -> Credentials {
        Credentials {
            access_key_id: "AKIDEXAMPLE".into(),
            secret_access_key: "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY".into(),
            session_token: None,
            source: "test".into(),
        }
    }
    const DATE: &str = "20150830T123600Z";
    const EMPTY_SHA256: &str = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

    fn sign(method: &str, path: &str, query: &[(&str, &str)], extra: &[(&str, &str)]) -> String {
        let query: Vec<(String, String)> = query
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let mut headers = vec![
            ("Host".to_string(), "example.amazonaws.com".to_string()),
            ("X-Amz-Date".to_string(), DATE.to_string()),
        ];
        headers.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        let req = Request {
            method,
            path,
            query: &query,
            headers: &headers,
            payload_sha256: EMPTY_SHA256,
        };
        authorization(&suite_credentials(), "us-east-1", "service", DATE, &req)
    }

    fn expect(signed_headers: &str, signature: &str) -> String {
        format!(
            "AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20150830/us-east-1/service/aws4_request, \
             SignedHeaders={signed_headers}, Signature={signature}"
        )
    }

    #[test]
    fn aws_test_suite_vectors() {
        let plain = "host;x-amz-date";
        assert_eq!(
            sign("GET", "/", &[], &[]),
            expect(
                plain,
                "5fa00fa31553b73ebf1942676e86291e8372ff2a2260956d9b8aae1d763fbf31"
            ),
            "get-vanilla"
        );
        assert_eq!(
            sign("POST", "/", &[], &[]),
            expect(
                plain,
                "5da7c1a2acd57cee7505fc6676e4e544621c30862966e37dddb68e92efbe5d6b"
            ),
            "post-vanilla"
        );
        assert_eq!(
            sign(
                "GET",
                "/",
                &[("Param2", "value2"), ("Param1", "value1")],
                &[]
            ),
            expect(
                plain,
                "b97d918cfa904a5beff61c982a1b6f458b799221646efd99d3219ec94cdf2500"
            ),
            "get-vanilla-query-order-key-case"
        );
        assert_eq!(
            sign(
                "GET",
                "/-._~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz",
                &[],
                &[]
            ),
            expect(
                plain,
                "07ef7494c76fa4850883e2b006601f940f8a34d404d0cfa977f52a65bbf5f24f"
            ),
            "get-unreserved"
        );
        assert_eq!(
            sign("POST", "/", &[], &[("My-Header1", "VALUE1")]),
            expect(
                "host;my-header1;x-amz-date",
                "cdbc9802e29d2942e5e10b5bccfdd67c5f22c7c4e8ae67b53629efa58b974b7d"
            ),
            "post-header-value-case"
        );
        assert_eq!(
            sign(
                "GET",
                "/",
                &[],
                &[("My-Header1", " value1"), ("My-Header2", "\"a   b   c\"")]
            ),
            expect(
                "host;my-header1;my-header2;x-amz-date",
                "acc3ed3afb60bb290fc8d2dd0098b9911fcaa05412b367055dee359757a9c736"
            ),
            "get-header-value-trim"
        );
    }

    #[test]
    fn canonical_request_of_the_suite() {
        let headers = vec![
            ("Host".to_string(), "example.amazonaws.com".to_string()),
            ("X-Amz-Date".to_string(), DATE.to_string()),
        ];
        let query = vec![
            ("Param2".to_string(), "value2".to_string()),
            ("Param1".to_string(), "value1".to_string()),
        ];
        let req = Request {
            method: "GET",
            path: "/",
            query: &query,
            headers: &headers,
            payload_sha256: EMPTY_SHA256,
        };
        assert_eq!(
            canonical_request(&req),
            format!(
                "GET\n/\nParam1=value1&Param2=value2\nhost:example.amazonaws.com\n\
                 x-amz-date:{DATE}\n\nhost;x-amz-date\n{EMPTY_SHA256}"
            )
        );
    }

    #[test]
    fn encoding_and_dates() {
        assert_eq!(uri_encode("a b/c:d~", false), "a%20b%2Fc%3Ad~");
        assert_eq!(uri_encode("/snapshots/snap-1", true), "/snapshots/snap-1");
        assert_eq!(uri_encode("ሴ", false), "%E1%88%B4");
        assert_eq!(amz_date(1_440_938_160), DATE);
        assert_eq!(amz_date(951_782_400), "20000229T000000Z");
    }

    #[test]
    fn debug_never_shows_the_secret() {
        let shown = format!("{:?}", suite_credentials());
        assert!(
            shown.contains("AKIDEXAMPLE") && !shown.contains("EXAMPLEKEY"),
            "{shown}"
        );
    }
}
