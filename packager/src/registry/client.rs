//! A small client of the OCI distribution API (v2), blocking, over `ureq`: blobs (HEAD, GET,
//! uploads in chunks that resume where the registry says they stopped), manifests (GET,
//! PUT), the `WWW-Authenticate` flow (Basic, and Bearer tokens for
//! `repository:NAME:pull[,push]`), retries with backoff on 5xx and dropped connections.
//! Every error is one line naming the registry, the operation and the status.

use super::challenge::{self, Challenge};
use super::credentials::Credentials;
use super::reference::{is_loopback, Reference};
use anyhow::{bail, Context, Result};
use base64::Engine as _;
use std::io::{Read, Seek};
use std::path::{Path, PathBuf};
use std::time::Duration;
use ureq::http::{self, Method, Response};

/// Tries of one request before its error is reported (4 waits: 0.5, 1, 2, 4 s).
const TRIES: u32 = 5;
const FIRST_BACKOFF: Duration = Duration::from_millis(500);

/// What one request of an upload carries: a dropped connection costs at most this much again.
pub(crate) const CHUNK: u64 = 8 << 20;

/// The wait after failure `n` (from 1) of a request, before the next try.
fn backoff(n: u32) -> Duration {
    FIRST_BACKOFF * 2u32.pow(n.clamp(1, 8) - 1)
}

/// How to reach a registry: TLS (system trust store, plus `ca_cert`), plain HTTP only for
/// loopback or with `insecure` (which also accepts any certificate).
#[derive(Debug, Clone, Default)]
pub(crate) struct Connection {
    pub(crate) insecure: bool,
    pub(crate) ca_cert: Option<PathBuf>,
}

/// A registry's answer that fuse cannot go on from, or a registry it cannot reach.
#[derive(Debug, thiserror::Error)]
pub(crate) enum RegistryError {
    #[error("Registry {registry}: {operation}: HTTP {status}{detail}")]
    Status {
        registry: String,
        operation: String,
        status: u16,
        /// The registry's own message (its `errors[0]`), and what to do.
        detail: String,
    },
    #[error("Registry {registry}: {operation}: {reason}")]
    Transport {
        registry: String,
        operation: String,
        reason: String,
        /// TLS was spoken and failed (a certificate not trusted...): not a plain-HTTP server.
        tls: bool,
    },
}

/// What a client needs of a repository.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Access {
    Pull,
    Push,
}

impl Access {
    fn actions(self) -> &'static str {
        match self {
            Access::Pull => "pull",
            Access::Push => "pull,push",
        }
    }
}

/// What a request sends.
#[derive(Clone, Copy)]
pub(crate) enum Payload<'a> {
    None,
    Bytes(&'a [u8]),
    /// `len` bytes of a file from `offset`, streamed; `progress` hears how far into the file
    /// the request has read, as it reads.
    Range(&'a Path, u64, u64, Option<&'a (dyn Fn(u64) + Sync)>),
}

impl std::fmt::Debug for Payload<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Payload::None => f.write_str("None"),
            Payload::Bytes(b) => write!(f, "Bytes({})", b.len()),
            Payload::Range(p, offset, len, _) => {
                write!(f, "Range({}, {offset}, {len})", p.display())
            }
        }
    }
}

/// A client of one repository of one registry. A clone shares the connection pool and the
/// authorization, for transfers on several threads.
#[derive(Clone)]
pub(crate) struct Client {
    agent: ureq::Agent,
    /// `https://host[:port]` or `http://...`.
    base: String,
    /// The registry as the user named it, for messages.
    registry: String,
    repository: String,
    access: Access,
    /// Other repositories of the registry that blobs may be mounted from: a token also asks
    /// to pull from them.
    mount_sources: Vec<String>,
    credentials: Option<Credentials>,
    /// The `Authorization` header the last challenge was answered with.
    authorization: Option<String>,
    /// Tries of a request ([`TRIES`], 1 while probing for HTTPS).
    tries: u32,
    /// Blob uploads started again in a new session after a failure (the registry had lost
    /// the session).
    pub(crate) uploads_restarted: u32,
    /// Blob uploads that went on in their session, from where the registry said it was,
    /// after a failure.
    pub(crate) uploads_resumed: u32,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("base", &self.base)
            .field("repository", &self.repository)
            .field("access", &self.access)
            .finish_non_exhaustive()
    }
}

fn agent(connection: &Connection, verify: bool, loopback: bool) -> Result<ureq::Agent> {
    use ureq::tls::{Certificate, RootCerts, TlsConfig, TlsProvider};
    // ring, as the process's provider: ureq is built without one of its own.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let mut roots: Vec<Certificate<'static>> = Vec::new();
    let native = rustls_native_certs::load_native_certs();
    for cert in native.certs {
        roots.push(Certificate::from_der(cert.as_ref()).to_owned());
    }
    if let Some(path) = &connection.ca_cert {
        let pem = std::fs::read(path)
            .with_context(|| format!("Cannot read the CA certificate {}", path.display()))?;
        let before = roots.len();
        for item in ureq::tls::parse_pem(&pem) {
            if let Ok(ureq::tls::PemItem::Certificate(cert)) = item {
                roots.push(cert);
            }
        }
        if roots.len() == before {
            anyhow::bail!(
                "{} holds no PEM certificate (-----BEGIN CERTIFICATE-----): give the registry's CA certificate to --ca-cert",
                path.display()
            );
        }
    }
    let tls = TlsConfig::builder()
        .provider(TlsProvider::Rustls)
        .root_certs(RootCerts::new_with_certs(&roots))
        .disable_verification(!verify)
        .build();
    let config = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .tls_config(tls)
        // HTTPS_PROXY / NO_PROXY as curl and docker read them; never for a loopback registry.
        .proxy(if loopback {
            None
        } else {
            ureq::Proxy::try_from_env()
        })
        .user_agent(concat!("fuse/", env!("CARGO_PKG_VERSION")))
        .timeout_connect(Some(Duration::from_secs(15)))
        .timeout_recv_response(Some(Duration::from_secs(120)))
        // Stalled transfers fail (and are retried) instead of hanging.
        .timeout_per_read(Some(Duration::from_secs(120)))
        .max_redirects(5)
        .build();
    Ok(config.new_agent())
}

impl Client {
    /// Connects to the registry of `reference` for `access`: HTTPS, or plain HTTP for a
    /// loopback registry or with `insecure`, when HTTPS cannot be spoken; answers the
    /// registry's challenge (if any) before the first real request.
    pub(crate) fn connect(
        reference: &Reference,
        access: Access,
        connection: &Connection,
        credentials: Option<Credentials>,
    ) -> Result<Client> {
        Client::connect_with_sources(reference, access, connection, credentials, Vec::new())
    }

    /// As [`Client::connect`], with the repositories blobs may be mounted from
    /// ([`Client::upload_blob`]).
    pub(crate) fn connect_with_sources(
        reference: &Reference,
        access: Access,
        connection: &Connection,
        credentials: Option<Credentials>,
        mount_sources: Vec<String>,
    ) -> Result<Client> {
        let host = reference.api_host().to_string();
        let plain_allowed = connection.insecure || is_loopback(&host);
        let mut client = Client {
            agent: agent(connection, !connection.insecure, is_loopback(&host))?,
            base: format!("https://{host}"),
            registry: reference.registry.clone(),
            repository: reference.repository.clone(),
            mount_sources,
            access,
            credentials,
            authorization: None,
            // Where plain HTTP may follow, one try tells whether HTTPS is spoken.
            tries: if plain_allowed { 1 } else { TRIES },
            uploads_restarted: 0,
            uploads_resumed: 0,
        };
        let probed = client.ping();
        client.tries = TRIES;
        match probed {
            Ok(()) => Ok(client),
            Err(https) if plain_allowed && is_transport(&https) => {
                client.base = format!("http://{host}");
                // HTTPS got no TLS answer at all: what plain HTTP got says more.
                drop(https);
                client.ping().map(|()| client)
            }
            Err(e) => Err(e),
        }
    }

    /// `GET /v2/`: the registry speaks the API; a challenge is answered now.
    fn ping(&mut self) -> Result<()> {
        let url = format!("{}/v2/", self.base);
        let mut response = self.send("connect", Method::GET, &url, &[], Payload::None)?;
        self.expect(&mut response, "connect", &[200])
    }

    /// The registry, for messages.
    pub(crate) fn registry(&self) -> &str {
        &self.registry
    }

    fn error(&self, operation: &str, status: u16, detail: String) -> anyhow::Error {
        RegistryError::Status {
            registry: self.registry.clone(),
            operation: operation.to_string(),
            status,
            detail,
        }
        .into()
    }

    /// Fails unless `response` has one of `ok`, with the registry's own message (the first of
    /// the distribution spec's `errors`).
    fn expect(
        &self,
        response: &mut Response<ureq::Body>,
        operation: &str,
        ok: &[u16],
    ) -> Result<()> {
        let status = response.status().as_u16();
        if ok.contains(&status) {
            return Ok(());
        }
        let said = response
            .body_mut()
            .with_config()
            .limit(64 << 10)
            .read_to_vec()
            .ok()
            .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
            .and_then(|v| {
                let e = v.get("errors")?.get(0)?;
                let code = e.get("code").and_then(|c| c.as_str()).unwrap_or("");
                let message = e.get("message").and_then(|m| m.as_str()).unwrap_or("");
                Some(format!(" ({code}: {message})"))
            })
            .unwrap_or_default();
        let detail = self.detail(status);
        // The registry's words go after the reason, before fuse's hint.
        let detail = match detail.split_once(':') {
            Some((reason, hint)) => format!("{reason}{said}:{hint}"),
            None => format!("{detail}{said}"),
        };
        Err(self.error(operation, status, detail))
    }

    /// What to say after a status.
    fn detail(&self, status: u16) -> String {
        let reason = http::StatusCode::from_u16(status)
            .ok()
            .and_then(|s| s.canonical_reason())
            .unwrap_or("");
        let hint =
            match status {
                401 if self.credentials.is_some() => format!(
                ": the registry refused the credentials of {}: log in again with `fuse login {}`",
                self.credentials.as_ref().map_or("", |c| c.username.as_str()),
                self.registry
            ),
                401 => format!(
                    ": log in with `fuse login {}` (the Docker config's credentials are used)",
                    self.registry
                ),
                403 => format!(
                    ": the credentials for {} may not {} {}",
                    self.registry,
                    self.access.actions(),
                    self.repository
                ),
                _ => String::new(),
            };
        format!(" {reason}{hint}")
    }

    /// Sends a request, answering an authentication challenge once and retrying 5xx answers
    /// and dropped connections with backoff ([`TRIES`] in all).
    pub(crate) fn send(
        &mut self,
        operation: &str,
        method: Method,
        url: &str,
        headers: &[(&str, &str)],
        payload: Payload<'_>,
    ) -> Result<Response<ureq::Body>> {
        let mut challenged = false;
        let mut try_number = 1;
        loop {
            let result = self.send_once(&method, url, headers, payload);
            let retry = match &result {
                Ok(r) if r.status().as_u16() == 401 && !challenged => {
                    challenged = true;
                    let header = r
                        .headers()
                        .get_all(http::header::WWW_AUTHENTICATE)
                        .iter()
                        .filter_map(|v| v.to_str().ok())
                        .collect::<Vec<_>>()
                        .join(", ");
                    if self.authenticate(operation, &challenge::parse(&header))? {
                        continue;
                    }
                    false
                }
                Ok(r) => r.status().is_server_error() || r.status().as_u16() == 429,
                Err(e) => retryable(e),
            };
            if !retry || try_number >= self.tries {
                return result.map_err(|e| {
                    RegistryError::Transport {
                        registry: self.registry.clone(),
                        operation: operation.to_string(),
                        reason: transport_reason(&e, try_number),
                        tls: tls_spoken(&e),
                    }
                    .into()
                });
            }
            std::thread::sleep(backoff(try_number));
            try_number += 1;
        }
    }

    fn send_once(
        &self,
        method: &Method,
        url: &str,
        headers: &[(&str, &str)],
        payload: Payload<'_>,
    ) -> std::result::Result<Response<ureq::Body>, ureq::Error> {
        let mut builder = http::Request::builder().method(method.clone()).uri(url);
        for (k, v) in headers {
            builder = builder.header(*k, *v);
        }
        // Credentials go to the registry only, never to a host a Location points elsewhere.
        if let Some(auth) = &self.authorization {
            if url.starts_with(&format!("{}/", self.base)) {
                builder = builder.header(http::header::AUTHORIZATION, auth);
            }
        }
        match payload {
            Payload::None => self.agent.run(builder.body(())?),
            Payload::Bytes(bytes) => self.agent.run(builder.body(bytes)?),
            Payload::Range(path, offset, len, progress) => {
                let mut file = std::fs::File::open(path)?;
                file.seek(std::io::SeekFrom::Start(offset))?;
                let mut reader = Counted {
                    inner: file.take(len),
                    at: offset,
                    progress,
                };
                let request = builder
                    .header(http::header::CONTENT_LENGTH, len)
                    .body(ureq::SendBody::from_reader(&mut reader))?;
                self.agent.run(request)
            }
        }
    }

    /// Answers a challenge; whether the request is worth sending again.
    fn authenticate(&mut self, operation: &str, challenges: &[Challenge]) -> Result<bool> {
        let no_credentials = || {
            self.error(
                operation,
                401,
                format!(
                    " Unauthorized: no credentials for {}: log in with `fuse login {}`",
                    self.registry, self.registry
                ),
            )
        };
        if let Some(bearer) = challenges.iter().find(|c| c.scheme == "bearer") {
            let token = self.token(operation, bearer)?;
            self.authorization = Some(format!("Bearer {token}"));
            return Ok(true);
        }
        if challenges.iter().any(|c| c.scheme == "basic") {
            let Some(c) = &self.credentials else {
                return Err(no_credentials());
            };
            if self.authorization.is_some() {
                // The credentials were sent and refused.
                return Ok(false);
            }
            self.authorization = Some(basic(c));
            return Ok(true);
        }
        Ok(false)
    }

    /// A bearer token from the challenge's realm for this repository (credentials, when
    /// there are any, as Basic auth; anonymous otherwise).
    fn token(&mut self, operation: &str, bearer: &Challenge) -> Result<String> {
        let realm = bearer.params.get("realm").with_context(|| {
            format!(
                "Registry {}: {operation}: its Bearer challenge names no realm",
                self.registry
            )
        })?;
        let realm_host = realm
            .split_once("://")
            .map(|(_, r)| r.split('/').next().unwrap_or(r))
            .unwrap_or("");
        if !realm.starts_with("https://")
            && !(realm.starts_with("http://")
                && (is_loopback(realm_host) || self.base.starts_with("http://")))
        {
            anyhow::bail!(
                "Registry {}: {operation}: its token service {realm} is not HTTPS: refusing to send credentials there",
                self.registry
            );
        }
        let mut query = Vec::new();
        if let Some(service) = bearer.params.get("service") {
            query.push(format!("service={}", encode_query(service)));
        }
        // No repository (a login's check): a token for the registry itself.
        if !self.repository.is_empty() {
            let scope = format!("repository:{}:{}", self.repository, self.access.actions());
            query.push(format!("scope={}", encode_query(&scope)));
        }
        for source in &self.mount_sources {
            let scope = format!("repository:{source}:pull");
            query.push(format!("scope={}", encode_query(&scope)));
        }
        let separator = if realm.contains('?') { '&' } else { '?' };
        let url = if query.is_empty() {
            realm.clone()
        } else {
            format!("{realm}{separator}{}", query.join("&"))
        };
        let mut request = http::Request::builder().method(Method::GET).uri(&url);
        if let Some(c) = &self.credentials {
            request = request.header(http::header::AUTHORIZATION, basic(c));
        }
        let mut response =
            self.agent
                .run(request.body(())?)
                .map_err(|e| RegistryError::Transport {
                    registry: self.registry.clone(),
                    operation: format!("{operation} (token from {realm})"),
                    reason: transport_reason(&e, 1),
                    tls: tls_spoken(&e),
                })?;
        let status = response.status().as_u16();
        if status != 200 {
            let what = if self.credentials.is_some() {
                format!(
                    " token refused: log in again with `fuse login {}`",
                    self.registry
                )
            } else {
                format!(
                    " no token without credentials: log in with `fuse login {}`",
                    self.registry
                )
            };
            return Err(self.error(&format!("{operation} (token from {realm})"), status, what));
        }
        let body: serde_json::Value = serde_json::from_slice(
            &response
                .body_mut()
                .with_config()
                .limit(1 << 20)
                .read_to_vec()
                .map_err(|e| anyhow::anyhow!("{e}"))?,
        )
        .with_context(|| {
            format!(
                "Registry {}: token service {realm} answered no JSON",
                self.registry
            )
        })?;
        body.get("token")
            .or_else(|| body.get("access_token"))
            .and_then(|t| t.as_str())
            .filter(|t| !t.is_empty())
            .map(str::to_string)
            .with_context(|| {
                format!(
                    "Registry {}: token service {realm} answered no token",
                    self.registry
                )
            })
    }

    /// `repository:tag` or `repository@sha256:...`, for messages.
    fn named(&self, reference: &str) -> String {
        let separator = if reference.starts_with("sha256:") {
            '@'
        } else {
            ':'
        };
        format!("{}{separator}{reference}", self.repository)
    }

    fn url(&self, rest: &str) -> String {
        format!("{}/v2/{}/{rest}", self.base, self.repository)
    }

    /// Whether the repository has blob `digest`.
    pub(crate) fn has_blob(&mut self, digest: &str) -> Result<bool> {
        let op = format!("check blob {}", short(digest));
        let response = self.send(
            &op,
            Method::HEAD,
            &self.url(&format!("blobs/{digest}")),
            &[],
            Payload::None,
        )?;
        match response.status().as_u16() {
            200 => Ok(true),
            404 => Ok(false),
            status => Err(self.error(&op, status, self.detail(status))),
        }
    }

    /// Whether repository `source` of the registry has blob `digest`.
    pub(crate) fn source_has_blob(&mut self, source: &str, digest: &str) -> Result<bool> {
        let op = format!("check blob {} in {source}", short(digest));
        let url = format!("{}/v2/{source}/blobs/{digest}", self.base);
        let response = self.send(&op, Method::HEAD, &url, &[], Payload::None)?;
        // Not there, or not ours to read: either way, no mount from it.
        Ok(response.status().as_u16() == 200)
    }

    /// Uploads blob `digest` from `path` and returns whether the registry mounted it instead.
    ///
    /// A POST opens an upload session (with `mount_from`, first asking the registry to mount
    /// the blob from that repository: nothing is sent when it does; a registry that declines
    /// answers with a session, which is used). The blob then goes in [`CHUNK`]s: a PATCH
    /// each, with `Content-Range`, and the last one in the PUT `?digest=` that completes it
    /// (a blob of one chunk is a POST and a PUT, as a monolithic upload).
    ///
    /// A request of the session that fails (a dropped connection, 5xx) is not sent again
    /// blindly: after the backoff, a GET of the session asks the registry how much it holds
    /// (`Range: 0-N`) and the upload goes on from N+1 ([`Client::uploads_resumed`]). A
    /// session the registry no longer knows (404: distribution drops one whose data does not
    /// match its state, as after a chunk cut off half-way) is started again
    /// ([`Client::uploads_restarted`]), unless the blob is there: the answer to the PUT that
    /// completed it was what got lost. [`TRIES`] failures without the upload getting further
    /// are an error.
    pub(crate) fn upload_blob(
        &mut self,
        digest: &str,
        path: &Path,
        progress: Option<&(dyn Fn(u64) + Sync)>,
        mount_from: Option<&str>,
    ) -> Result<bool> {
        let op = format!("upload blob {}", short(digest));
        let size = std::fs::metadata(path)
            .with_context(|| format!("Cannot read {}", path.display()))?
            .len();
        // The session's URL (its last Location) and how much of the blob it holds.
        let mut session: Option<(String, u64)> = None;
        // Failures since the upload last got further than ever: a long upload over a flaky
        // link goes on as long as it progresses.
        let mut failures = 0;
        let mut furthest = 0;
        loop {
            let (url, offset) = match session.take() {
                Some(s) => s,
                None => match self.start_upload(&op, digest, mount_from)? {
                    Some(url) => (url, 0),
                    None => return Ok(true),
                },
            };
            let last = size - offset <= CHUNK;
            let end = if last { size } else { offset + CHUNK };
            let range = format!("{offset}-{}", end.saturating_sub(1));
            let mut headers = vec![("Content-Type", "application/octet-stream")];
            if end > offset {
                headers.push(("Content-Range", range.as_str()));
            }
            let (method, target) = if last {
                let separator = if url.contains('?') { '&' } else { '?' };
                let target = format!("{url}{separator}digest={}", encode_query(digest));
                (Method::PUT, target)
            } else {
                (Method::PATCH, url.clone())
            };
            // One try: what the registry holds after a failure is asked, not guessed.
            let tries = std::mem::replace(&mut self.tries, 1);
            let sent = self.send(
                &op,
                method,
                &target,
                &headers,
                Payload::Range(path, offset, end - offset, progress),
            );
            self.tries = tries;
            let failure = match sent {
                Ok(r) if last && matches!(r.status().as_u16(), 201 | 204) => return Ok(false),
                Ok(r) if !last && r.status().as_u16() == 202 => {
                    let next = self.location(&r, &op)?;
                    let held = held_bytes(r.headers()).unwrap_or(end);
                    if held > size {
                        bail!(
                            "Registry {}: {op}: it says it holds {held} bytes of a blob of {size}",
                            self.registry
                        );
                    }
                    if held > furthest {
                        furthest = held;
                        failures = 0;
                    }
                    session = Some((next, held));
                    continue;
                }
                Ok(mut r) => {
                    let status = r.status().as_u16();
                    let error = self.expect(&mut r, &op, &[]).unwrap_err();
                    // 416: the registry holds another amount than this chunk started at.
                    if !(r.status().is_server_error() || matches!(status, 416 | 429)) {
                        return Err(error);
                    }
                    error
                }
                Err(e) if is_transport(&e) => e,
                Err(e) => return Err(e),
            };
            failures += 1;
            if failures >= self.tries {
                return Err(after_tries(failure, failures));
            }
            std::thread::sleep(backoff(failures));
            match self.upload_status(&op, &url)? {
                Some((next, held)) if held <= size => {
                    self.uploads_resumed += 1;
                    session = Some((next, held));
                }
                _ if self.has_blob(digest)? => return Ok(false),
                _ => self.uploads_restarted += 1,
            }
        }
    }

    /// POSTs for an upload session (or a mount, when `mount_from` has the blob): the
    /// session's URL, or `None` when the registry mounted the blob.
    fn start_upload(
        &mut self,
        op: &str,
        digest: &str,
        mount_from: Option<&str>,
    ) -> Result<Option<String>> {
        let url = match mount_from {
            Some(source) => self.url(&format!(
                "blobs/uploads/?mount={}&from={}",
                encode_query(digest),
                encode_query(source)
            )),
            None => self.url("blobs/uploads/"),
        };
        let mut response = self.send(op, Method::POST, &url, &[], Payload::Bytes(&[]))?;
        if mount_from.is_some() && response.status().as_u16() == 201 {
            return Ok(None);
        }
        self.expect(&mut response, op, &[202])?;
        self.location(&response, op).map(Some)
    }

    /// Where an upload session is: its URL now and how much of the blob it holds, or `None`
    /// when the registry no longer knows it.
    fn upload_status(&mut self, op: &str, url: &str) -> Result<Option<(String, u64)>> {
        let mut response = self.send(op, Method::GET, url, &[], Payload::None)?;
        match response.status().as_u16() {
            204 => {
                let next = self
                    .location(&response, op)
                    .unwrap_or_else(|_| url.to_string());
                Ok(Some((next, held_bytes(response.headers()).unwrap_or(0))))
            }
            400 | 404 | 416 => Ok(None),
            _ => Err(self.expect(&mut response, op, &[204]).unwrap_err()),
        }
    }

    /// The Location of an upload answer, as a URL.
    fn location(&self, response: &Response<ureq::Body>, op: &str) -> Result<String> {
        let location = response
            .headers()
            .get(http::header::LOCATION)
            .and_then(|l| l.to_str().ok())
            .with_context(|| {
                format!(
                    "Registry {}: {op}: its answer has no Location",
                    self.registry
                )
            })?;
        Ok(self.resolve_location(location))
    }

    /// A Location header as a URL: absolute, or relative to the registry.
    fn resolve_location(&self, location: &str) -> String {
        if location.starts_with("http://") || location.starts_with("https://") {
            location.to_string()
        } else if location.starts_with('/') {
            format!("{}{location}", self.base)
        } else {
            format!(
                "{}/v2/{}/blobs/uploads/{location}",
                self.base, self.repository
            )
        }
    }

    /// Streams blob `digest`: the response, for the caller to read and check.
    pub(crate) fn get_blob(&mut self, digest: &str) -> Result<Response<ureq::Body>> {
        let op = format!("download blob {}", short(digest));
        let mut response = self.send(
            &op,
            Method::GET,
            &self.url(&format!("blobs/{digest}")),
            &[],
            Payload::None,
        )?;
        self.expect(&mut response, &op, &[200])?;
        Ok(response)
    }

    /// The referrers API's index of the artifacts whose subject is `digest`; `None` when the
    /// registry does not have the API (distribution 2.8 answers 404).
    pub(crate) fn referrers(&mut self, digest: &str) -> Result<Option<Vec<u8>>> {
        let op = format!("list referrers of {}", short(digest));
        let mut response = self.send(
            &op,
            Method::GET,
            &self.url(&format!("referrers/{digest}")),
            &[("Accept", super::oci::INDEX)],
            Payload::None,
        )?;
        let is_index = response
            .headers()
            .get(http::header::CONTENT_TYPE)
            .and_then(|t| t.to_str().ok())
            .is_some_and(|t| t.starts_with(super::oci::INDEX));
        if response.status().as_u16() != 200 || !is_index {
            return Ok(None);
        }
        let body = response
            .body_mut()
            .with_config()
            .limit(4 << 20)
            .read_to_vec()
            .with_context(|| format!("Registry {}: {op}", self.registry))?;
        Ok(Some(body))
    }

    /// Puts a manifest under `reference` (a tag); returns the digest the registry gave it.
    pub(crate) fn put_manifest(
        &mut self,
        reference: &str,
        media_type: &str,
        bytes: &[u8],
    ) -> Result<Option<String>> {
        let op = format!("put manifest {}", self.named(reference));
        let mut response = self.send(
            &op,
            Method::PUT,
            &self.url(&format!("manifests/{reference}")),
            &[("Content-Type", media_type)],
            Payload::Bytes(bytes),
        )?;
        self.expect(&mut response, &op, &[201, 200])?;
        Ok(response
            .headers()
            .get("Docker-Content-Digest")
            .and_then(|d| d.to_str().ok())
            .map(str::to_string))
    }

    /// Gets the manifest `reference` (a tag or digest), accepting `media_types`; returns its
    /// media type and bytes (at most 4 MiB, the distribution spec's limit).
    pub(crate) fn get_manifest(
        &mut self,
        reference: &str,
        media_types: &[&str],
    ) -> Result<(String, Vec<u8>)> {
        self.fetch_manifest(reference, media_types, true)
            .map(|m| m.expect("a missing manifest is an error"))
    }

    /// As [`Client::get_manifest`], `None` when the registry has no such manifest.
    pub(crate) fn find_manifest(
        &mut self,
        reference: &str,
        media_types: &[&str],
    ) -> Result<Option<(String, Vec<u8>)>> {
        self.fetch_manifest(reference, media_types, false)
    }

    fn fetch_manifest(
        &mut self,
        reference: &str,
        media_types: &[&str],
        required: bool,
    ) -> Result<Option<(String, Vec<u8>)>> {
        let op = format!("get manifest {}", self.named(reference));
        let accept = media_types.join(", ");
        let mut response = self.send(
            &op,
            Method::GET,
            &self.url(&format!("manifests/{reference}")),
            &[("Accept", &accept)],
            Payload::None,
        )?;
        if response.status().as_u16() == 404 && !required {
            return Ok(None);
        }
        if response.status().as_u16() == 404 {
            return Err(self.error(
                &op,
                404,
                format!(
                    " Not Found: no {} in {}",
                    self.named(reference),
                    self.registry
                ),
            ));
        }
        self.expect(&mut response, &op, &[200])?;
        let media_type = response
            .headers()
            .get(http::header::CONTENT_TYPE)
            .and_then(|t| t.to_str().ok())
            .unwrap_or("")
            .split(';')
            .next()
            .unwrap_or("")
            .trim()
            .to_string();
        let bytes = response
            .body_mut()
            .with_config()
            .limit(4 << 20)
            .read_to_vec()
            .map_err(|e| RegistryError::Transport {
                registry: self.registry.clone(),
                operation: op.clone(),
                reason: e.to_string(),
                tls: false,
            })?;
        Ok(Some((media_type, bytes)))
    }
}

/// A request body that tells how far into its file it has read.
struct Counted<'a, R> {
    inner: R,
    at: u64,
    progress: Option<&'a (dyn Fn(u64) + Sync)>,
}

impl<R: Read> Read for Counted<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.at += n as u64;
        if let Some(progress) = self.progress {
            progress(self.at);
        }
        Ok(n)
    }
}

/// How much of a blob an upload session holds, from its `Range: 0-N` (`bytes=0-N` for some
/// registries): N+1. distribution answers `0-0` for an empty session too, read as 0.
fn held_bytes(headers: &http::HeaderMap) -> Option<u64> {
    let range = headers.get(http::header::RANGE)?.to_str().ok()?;
    let range = range.trim().trim_start_matches("bytes=");
    let (start, end) = range.split_once('-')?;
    let end: u64 = end.trim().parse().ok()?;
    match (start.trim(), end) {
        ("0", 0) => Some(0),
        ("0", end) => Some(end + 1),
        _ => None,
    }
}

/// The error of the last of `tries` failed tries of an upload, saying so.
fn after_tries(error: anyhow::Error, tries: u32) -> anyhow::Error {
    match error.downcast::<RegistryError>() {
        Ok(RegistryError::Transport {
            registry,
            operation,
            reason,
            tls,
        }) => RegistryError::Transport {
            registry,
            operation,
            reason: format!("{reason}, after {tries} tries"),
            tls,
        }
        .into(),
        Ok(RegistryError::Status {
            registry,
            operation,
            status,
            detail,
        }) => RegistryError::Status {
            registry,
            operation,
            status,
            detail: format!("{detail}, after {tries} tries"),
        }
        .into(),
        Err(e) => e,
    }
}

fn basic(c: &Credentials) -> String {
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{}:{}", c.username, c.password))
    )
}

fn short(digest: &str) -> String {
    format!("sha256:{}", crate::host::digest::short(digest))
}

/// Percent-encodes a query value.
fn encode_query(value: &str) -> String {
    let mut out = String::new();
    for b in value.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Whether a failed request may succeed when sent again: the connection, not the request.
fn retryable(e: &ureq::Error) -> bool {
    matches!(
        e,
        ureq::Error::Io(_)
            | ureq::Error::ConnectionFailed
            | ureq::Error::Timeout(_)
            | ureq::Error::Protocol(_)
            | ureq::Error::BodyStalled
    )
}

/// Whether an error says the registry does not speak HTTPS: no answer, and no TLS failure
/// (a certificate not trusted must be reported, not answered by trying plain HTTP).
fn is_transport(e: &anyhow::Error) -> bool {
    matches!(
        e.downcast_ref::<RegistryError>(),
        Some(RegistryError::Transport { tls: false, .. })
    )
}

/// The TLS error under a request's error, if it is one.
fn rustls_error(e: &ureq::Error) -> Option<&rustls::Error> {
    match e {
        ureq::Error::Rustls(r) => Some(r),
        ureq::Error::Io(io) => io.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()),
        _ => None,
    }
}

fn is_tls(e: &ureq::Error) -> bool {
    matches!(e, ureq::Error::Tls(_)) || rustls_error(e).is_some()
}

/// Whether the server spoke TLS (and it failed: a certificate not trusted, an alert), as
/// opposed to answering in plain HTTP, which reads as a corrupt TLS message.
fn tls_spoken(e: &ureq::Error) -> bool {
    matches!(e, ureq::Error::Tls(_))
        || rustls_error(e).is_some_and(|r| !matches!(r, rustls::Error::InvalidMessage(_)))
}

fn transport_reason(e: &ureq::Error, tries: u32) -> String {
    let what = match e {
        _ if is_tls(e) => format!(
            "TLS failed ({e}): for a registry with a private CA give --ca-cert FILE (or --insecure)"
        ),
        ureq::Error::ConnectionFailed | ureq::Error::Io(_) => {
            format!("cannot connect, or the connection dropped ({e})")
        }
        _ => e.to_string(),
    };
    if tries > 1 {
        format!("{what}, after {tries} tries")
    } else {
        what
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_values_are_percent_encoded() {
        assert_eq!(
            encode_query("repository:x/hello:pull,push"),
            "repository%3Ax%2Fhello%3Apull%2Cpush"
        );
        assert_eq!(encode_query("sha256:ab"), "sha256%3Aab");
    }

    #[test]
    fn an_upload_session_holds_what_its_range_says() {
        let held = |range: &str| {
            let mut headers = http::HeaderMap::new();
            headers.insert(http::header::RANGE, range.parse().unwrap());
            held_bytes(&headers)
        };
        assert_eq!(held("0-8388607"), Some(8 << 20));
        assert_eq!(held("bytes=0-99"), Some(100));
        assert_eq!(held("0-0"), Some(0));
        assert_eq!(held("5-9"), None);
        assert_eq!(held("junk"), None);
        assert_eq!(held_bytes(&http::HeaderMap::new()), None);
    }

    #[test]
    fn backoff_doubles_from_half_a_second() {
        let waits: Vec<_> = (1..=4).map(|n| backoff(n).as_millis()).collect();
        assert_eq!(waits, [500, 1000, 2000, 4000]);
    }
}
