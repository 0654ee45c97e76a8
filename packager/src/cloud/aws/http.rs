//! Signed calls to an AWS service over ureq (blocking, rustls with ring, the host's root
//! certificates), retried with backoff on 5xx, throttling and dropped connections. Every
//! failure is one line: the service, operation, HTTP status and AWS's code and message.

use super::profile::{Service, Session};
use super::sigv4;
use anyhow::Result;
use sha2::{Digest, Sha256};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// AWS's answer to a failed call, or the connection's failure after the retries.
#[derive(Debug, thiserror::Error)]
pub(crate) enum AwsError {
    #[error("AWS {service} {operation} failed: HTTP {status} {code}: {message}")]
    Status {
        service: &'static str,
        operation: &'static str,
        status: u16,
        code: String,
        message: String,
    },
    #[error("AWS {service} {operation} failed: cannot reach {endpoint}: {reason}")]
    Transport {
        service: &'static str,
        operation: &'static str,
        endpoint: String,
        reason: String,
        /// A dropped or refused connection, a timeout: may pass on a retry (a certificate
        /// error or a bad URL will not).
        transient: bool,
    },
}

/// Whether `err` is (or was caused by) AWS answering with error `code`, e.g.
/// `InvalidGroup.Duplicate`: read from the typed error, so no message text can pass for it.
pub(crate) fn has_code(err: &anyhow::Error, code: &str) -> bool {
    err.chain().any(|cause| {
        matches!(cause.downcast_ref::<AwsError>(),
            Some(AwsError::Status { code: c, .. }) if c == code)
    })
}

/// One call: the operation's name is for messages.
#[derive(Debug)]
pub(crate) struct Call<'a> {
    pub(crate) service: Service,
    pub(crate) operation: &'static str,
    pub(crate) method: &'static str,
    /// The path under the endpoint, as sent (already encoded).
    pub(crate) path: String,
    pub(crate) query: Vec<(String, String)>,
    pub(crate) headers: Vec<(String, String)>,
    pub(crate) body: &'a [u8],
    /// The body's SHA-256 when the caller has it already (EBS blocks).
    pub(crate) body_sha256: Option<[u8; 32]>,
}

/// A successful answer.
#[derive(Debug)]
pub(crate) struct Reply {
    pub(crate) body: Vec<u8>,
}

/// How many times a call is tried, and the first wait between tries (doubled each time).
const ATTEMPTS: u32 = 6;
const FIRST_BACKOFF: Duration = Duration::from_millis(250);
/// An answer larger than this is not AWS's (the largest fuse reads is a DescribeImages page).
const MAX_REPLY: u64 = 16 << 20;

/// Signs and sends calls for one session; shared by the upload's threads.
#[derive(Debug, Clone)]
pub(crate) struct Client {
    agent: ureq::Agent,
    session: Arc<Session>,
}

impl Client {
    pub(crate) fn new(session: Session) -> Result<Client> {
        let roots = rustls_native_certs::load_native_certs();
        let certs: Vec<ureq::tls::Certificate<'static>> = roots
            .certs
            .iter()
            .map(|c| ureq::tls::Certificate::from_der(c.as_ref()).to_owned())
            .collect();
        let https = Service::ALL
            .iter()
            .any(|s| session.endpoint(*s).starts_with("https://"));
        if certs.is_empty() && https {
            anyhow::bail!(
                "No root certificates found on this host to check AWS's with: install ca-certificates"
            );
        }
        let tls = ureq::tls::TlsConfig::builder()
            .provider(ureq::tls::TlsProvider::Rustls)
            .unversioned_rustls_crypto_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .root_certs(ureq::tls::RootCerts::new_with_certs(&certs))
            .build();
        let agent = ureq::Agent::config_builder()
            .tls_config(tls)
            .http_status_as_error(false)
            .max_redirects(0)
            .timeout_connect(Some(Duration::from_secs(10)))
            .timeout_per_call(Some(Duration::from_secs(120)))
            .user_agent(concat!("fuse/", env!("CARGO_PKG_VERSION")))
            .build()
            .new_agent();
        Ok(Client {
            agent,
            session: Arc::new(session),
        })
    }

    /// The same connections (agent, root certificates) signing for `session`.
    pub(crate) fn with_session(&self, session: Session) -> Client {
        Client {
            agent: self.agent.clone(),
            session: Arc::new(session),
        }
    }

    pub(crate) fn session(&self) -> &Session {
        &self.session
    }

    /// Sends `call`, retrying what may pass on a retry; a non-2xx answer is an [`AwsError`].
    pub(crate) fn send(&self, call: &Call) -> Result<Reply> {
        let mut wait = FIRST_BACKOFF;
        let mut attempt = 1;
        loop {
            match self.send_once(call) {
                Ok(reply) => return Ok(reply),
                Err(err) if attempt < ATTEMPTS && retriable(&err) => {
                    std::thread::sleep(jitter(wait));
                    wait = (wait * 2).min(Duration::from_secs(8));
                    attempt += 1;
                }
                Err(err) => return Err(err.into()),
            }
        }
    }

    fn send_once(&self, call: &Call) -> std::result::Result<Reply, AwsError> {
        let endpoint = self.session.endpoint(call.service);
        let (scheme, rest) = endpoint.split_once("://").unwrap_or(("https", endpoint));
        let (authority, base) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, ""),
        };
        let path = format!("{base}{}", call.path);
        let host = default_port_stripped(scheme, authority);
        let amz_date = sigv4::amz_date(
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
        );
        let payload = hex::encode(
            call.body_sha256
                .unwrap_or_else(|| Sha256::digest(call.body).into()),
        );
        let mut headers = call.headers.clone();
        headers.push(("host".into(), host.to_string()));
        headers.push(("x-amz-date".into(), amz_date.clone()));
        let creds = &self.session.credentials;
        if let Some(token) = &creds.session_token {
            headers.push(("x-amz-security-token".into(), token.clone()));
        }
        let request = sigv4::Request {
            method: call.method,
            path: &path,
            query: &call.query,
            headers: &headers,
            payload_sha256: &payload,
        };
        let authorization = sigv4::authorization(
            creds,
            &self.session.region,
            call.service.id(),
            &amz_date,
            &request,
        );
        let query = sigv4::canonical_query(&call.query);
        let url = if query.is_empty() {
            format!("{scheme}://{authority}{path}")
        } else {
            format!("{scheme}://{authority}{path}?{query}")
        };
        let transport = |err: &ureq::Error| AwsError::Transport {
            service: call.service.display(),
            operation: call.operation,
            endpoint: endpoint.to_string(),
            reason: describe(err),
            transient: transient(err),
        };
        let mut builder = match call.method {
            "GET" => ureq::http::Request::get(&url),
            "PUT" => ureq::http::Request::put(&url),
            _ => ureq::http::Request::post(&url),
        };
        for (name, value) in headers
            .iter()
            .chain([&("authorization".to_string(), authorization)])
        {
            builder = builder.header(name.as_str(), value.as_str());
        }
        let request = builder
            .body(call.body)
            .map_err(|e| transport(&ureq::Error::Http(e)))?;
        let mut response = self.agent.run(request).map_err(|e| transport(&e))?;
        let status = response.status().as_u16();
        let header = |name: &str| {
            response
                .headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string)
        };
        let error_type = header("x-amzn-errortype");
        let body = response
            .body_mut()
            .with_config()
            .limit(MAX_REPLY)
            .read_to_vec()
            .map_err(|e| transport(&e))?;
        if (200..300).contains(&status) {
            return Ok(Reply { body });
        }
        let (code, message) = error_of(&body, error_type.as_deref());
        Err(AwsError::Status {
            service: call.service.display(),
            operation: call.operation,
            status,
            code,
            message,
        })
    }
}

/// The authority as `Host` carries it: without the scheme's default port.
fn default_port_stripped<'a>(scheme: &str, authority: &'a str) -> &'a str {
    let default = if scheme == "http" { ":80" } else { ":443" };
    authority.strip_suffix(default).unwrap_or(authority)
}

fn describe(err: &ureq::Error) -> String {
    match err {
        ureq::Error::Io(e) => e.to_string(),
        other => other.to_string(),
    }
}

/// Whether a failure to talk to AWS may pass on a retry.
fn transient(err: &ureq::Error) -> bool {
    match err {
        // rustls reports a bad certificate as an I/O error wrapping its own.
        ureq::Error::Io(e) => !e.get_ref().is_some_and(|inner| inner.is::<rustls::Error>()),
        ureq::Error::Timeout(_) | ureq::Error::ConnectionFailed | ureq::Error::Protocol(_) => true,
        _ => false,
    }
}

fn retriable(err: &AwsError) -> bool {
    match err {
        AwsError::Transport { transient, .. } => *transient,
        AwsError::Status { status, code, .. } => {
            *status >= 500
                || *status == 429
                || matches!(
                    code.as_str(),
                    "Throttling"
                        | "ThrottlingException"
                        | "RequestLimitExceeded"
                        | "RequestThrottled"
                        | "RequestThrottledException"
                        | "TooManyRequestsException"
                        | "SlowDown"
                        | "InternalError"
                        | "ServiceUnavailable"
                )
        }
    }
}

/// A wait between half and all of `wait`, so parallel uploaders do not retry in step.
fn jitter(wait: Duration) -> Duration {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let fraction = 0.5 + f64::from(nanos % 1000) / 2000.0;
    wait.mul_f64(fraction)
}

/// AWS's error code and message from an error answer: EC2's XML (`<Errors><Error><Code>`),
/// the STS/IAM-style `<ErrorResponse>`, or the REST-JSON services' `{"message"}` with the code
/// in `x-amzn-ErrorType` or `__type`. Anything else: its first line, bounded.
pub(crate) fn error_of(body: &[u8], error_type: Option<&str>) -> (String, String) {
    let text = String::from_utf8_lossy(body);
    let clean = |s: &str| -> String {
        let one_line = s.split_whitespace().collect::<Vec<_>>().join(" ");
        one_line.chars().take(400).collect()
    };
    let type_code = |t: &str| -> String {
        // `ValidationException:http://internal.amazon.com/...` or `aws.protocol#Code`.
        let t = t.split(':').next().unwrap_or(t);
        t.rsplit('#').next().unwrap_or(t).to_string()
    };
    if let Ok(doc) = roxmltree::Document::parse(text.trim()) {
        let find = |name: &str| {
            doc.descendants()
                .find(|n| n.has_tag_name(name))
                .and_then(|n| n.text())
                .map(clean)
        };
        if let Some(code) = find("Code") {
            return (code, find("Message").unwrap_or_default());
        }
    }
    if let Ok(serde_json::Value::Object(map)) = serde_json::from_slice(body) {
        let get = |k: &str| map.get(k).and_then(|v| v.as_str()).map(clean);
        let message = get("message")
            .or_else(|| get("Message"))
            .unwrap_or_default();
        let code = error_type
            .map(type_code)
            .or_else(|| get("__type").map(|t| type_code(&t)))
            .or_else(|| get("Reason"))
            .unwrap_or_else(|| "Error".into());
        return (code, message);
    }
    let code = error_type.map(type_code).unwrap_or_else(|| "Error".into());
    let message = clean(text.lines().next().unwrap_or(""));
    (
        code,
        if message.is_empty() {
            "(no message)".into()
        } else {
            message
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{BufRead, BufReader, Read, Write};

    #[test]
    fn test_has_code_reads_the_typed_error_only() {
        let status = |code: &str| AwsError::Status {
            service: "EC2",
            operation: "CreateSecurityGroup",
            status: 400,
            code: code.into(),
            message: "The security group 'fuse-a-b' already exists".into(),
        };
        let err = anyhow::Error::new(status("InvalidGroup.Duplicate")).context("creating it");
        assert!(has_code(&err, "InvalidGroup.Duplicate"));
        assert!(!has_code(&err, "InvalidAMIName.Duplicate"));
        // The code in a message (another error's, or text a server echoed) is not the code.
        let transport = anyhow::Error::new(AwsError::Transport {
            service: "EC2",
            operation: "CreateSecurityGroup",
            endpoint: "https://ec2.example".into(),
            reason: "InvalidGroup.Duplicate".into(),
            transient: false,
        });
        assert!(!has_code(&transport, "InvalidGroup.Duplicate"));
        let message = anyhow::Error::new(status("Other")).context("InvalidGroup.Duplicate");
        assert!(!has_code(&message, "InvalidGroup.Duplicate"));
    }

    /// A server on 127.0.0.1 that answers each connection with the next of `answers` (`None`:
    /// drops the connection after reading the request); the requests' heads it saw.
    fn serve(answers: Vec<Option<String>>) -> (String, std::thread::JoinHandle<Vec<String>>) {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let handle = std::thread::spawn(move || {
            let mut heads = Vec::new();
            for answer in answers {
                let (stream, _) = listener.accept().unwrap();
                let mut reader = BufReader::new(stream);
                let mut head = String::new();
                let mut length = 0;
                loop {
                    let mut line = String::new();
                    reader.read_line(&mut line).unwrap();
                    if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                        length = v.trim().parse().unwrap();
                    }
                    if line == "\r\n" {
                        break;
                    }
                    head.push_str(&line);
                }
                let mut body = vec![0; length];
                reader.read_exact(&mut body).unwrap();
                heads.push(head);
                if let Some(answer) = answer {
                    let mut stream = reader.into_inner();
                    write!(
                        stream,
                        "{answer}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                    )
                    .unwrap();
                }
            }
            heads
        });
        (url, handle)
    }

    fn client(url: &str) -> Client {
        Client::new(Session {
            credentials: sigv4::Credentials {
                access_key_id: "AKIDEXAMPLE".into(),
                secret_access_key: "never-shown".into(),
                session_token: Some("token".into()),
                source: "test".into(),
            },
            region: "eu-west-1".into(),
            ec2_endpoint: url.into(),
            ebs_endpoint: url.into(),
            elbv2_endpoint: url.into(),
            sts_endpoint: url.into(),
        })
        .unwrap()
    }

    fn call() -> Call<'static> {
        Call {
            service: Service::Ebs,
            operation: "CompleteSnapshot",
            method: "POST",
            path: "/snapshots/completion/snap-1".into(),
            query: Vec::new(),
            headers: vec![("x-amz-changedblockscount".into(), "3".into())],
            body: b"",
            body_sha256: None,
        }
    }

    #[test]
    fn retries_dropped_connections_and_5xx_then_succeeds() {
        let (url, server) = serve(vec![
            None,
            Some("HTTP/1.1 503 Service Unavailable".into()),
            Some("HTTP/1.1 202 Accepted".into()),
        ]);
        let started = std::time::Instant::now();
        client(&url).send(&call()).unwrap();
        let heads = server.join().unwrap();
        assert_eq!(heads.len(), 3);
        // Backed off between tries: at least half of 250 ms, then half of 500 ms.
        assert!(started.elapsed() >= Duration::from_millis(375));
        for head in &heads {
            let lower = head.to_ascii_lowercase();
            assert!(
                lower.starts_with("post /snapshots/completion/snap-1 http/1.1"),
                "{head}"
            );
            assert!(lower.contains("x-amz-security-token: token"), "{head}");
            assert!(
                lower.contains("authorization: aws4-hmac-sha256 credential=akidexample/")
                    && lower.contains("/eu-west-1/ebs/aws4_request")
                    && lower.contains("signedheaders=host;x-amz-changedblockscount;x-amz-date;x-amz-security-token"),
                "{head}"
            );
            assert!(!head.contains("never-shown"));
        }
    }

    #[test]
    fn a_client_error_is_not_retried_and_is_one_line() {
        let (url, server) = serve(vec![Some(
            "HTTP/1.1 400 Bad Request\r\nx-amzn-ErrorType: ValidationException:http://x/".into(),
        )]);
        let err = client(&url).send(&call()).unwrap_err();
        assert_eq!(server.join().unwrap().len(), 1);
        assert_eq!(
            format!("{err:#}"),
            "AWS EBS CompleteSnapshot failed: HTTP 400 ValidationException: (no message)"
        );
    }

    #[test]
    fn ec2_xml_errors() {
        let body = br#"<?xml version="1.0" encoding="UTF-8"?>
<Response><Errors><Error><Code>InvalidAMIName.Duplicate</Code><Message>AMI name fuse-x is already in use by AMI ami-1</Message></Error></Errors><RequestID>59dbff89</RequestID></Response>"#;
        assert_eq!(
            error_of(body, None),
            (
                "InvalidAMIName.Duplicate".into(),
                "AMI name fuse-x is already in use by AMI ami-1".into()
            )
        );
        let body = br#"<?xml version="1.0" encoding="utf-8"?>
<ErrorResponse><Errors><Error><Code>SignatureDoesNotMatch</Code><Message>The request signature we calculated does not match
 the signature you provided.</Message><Type>Sender</Type></Error></Errors></ErrorResponse>"#;
        let (code, message) = error_of(body, None);
        assert_eq!(code, "SignatureDoesNotMatch");
        assert_eq!(
            message,
            "The request signature we calculated does not match the signature you provided."
        );
    }

    #[test]
    fn json_and_other_errors() {
        let body = br#"{"message":"The snapshot is not pending","Reason":"SNAPSHOT_NOT_FOUND"}"#;
        assert_eq!(
            error_of(
                body,
                Some("ValidationException:http://internal.amazon.com/coral/x/")
            ),
            (
                "ValidationException".into(),
                "The snapshot is not pending".into()
            )
        );
        assert_eq!(
            error_of(
                br#"{"__type":"com.amazon#ThrottlingException","Message":"slow down"}"#,
                None
            ),
            ("ThrottlingException".into(), "slow down".into())
        );
        assert_eq!(
            error_of(b"<html>\n<body>Bad Gateway</body>", None).0,
            "Error"
        );
        assert_eq!(error_of(b"", None), ("Error".into(), "(no message)".into()));
    }

    #[test]
    fn what_is_retried() {
        let status = |status: u16, code: &str| AwsError::Status {
            service: "EBS",
            operation: "PutSnapshotBlock",
            status,
            code: code.into(),
            message: String::new(),
        };
        assert!(retriable(&status(503, "ServiceUnavailable")));
        assert!(retriable(&status(400, "RequestLimitExceeded")));
        assert!(retriable(&status(429, "x")));
        assert!(!retriable(&status(403, "SignatureDoesNotMatch")));
        assert!(!retriable(&status(400, "ValidationException")));
        let line = status(403, "SignatureDoesNotMatch").to_string();
        assert_eq!(
            line,
            "AWS EBS PutSnapshotBlock failed: HTTP 403 SignatureDoesNotMatch: "
        );
        assert_eq!(
            default_port_stripped("https", "ec2.x.amazonaws.com:443"),
            "ec2.x.amazonaws.com"
        );
        assert_eq!(
            default_port_stripped("http", "127.0.0.1:5000"),
            "127.0.0.1:5000"
        );
    }
}
