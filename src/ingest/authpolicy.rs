//! Dovecot's auth-policy reports (`--auth-policy tcp://ADDR:PORT`): Dovecot
//! itself tells us of each authentication, over HTTP, with no log line to
//! parse or forge.
//!
//! Dovecot's auth-policy client (2.2.27 and later, 2.3, 2.4) POSTs a JSON
//! object to `auth_policy_server_url` with `?command=allow` before and
//! after authentication (`auth_policy_check_before_auth`,
//! `auth_policy_check_after_auth`) and `?command=report` after it
//! (`auth_policy_report_after_auth`), with the header of
//! `auth_policy_server_api_header` and `Content-Type: application/json`.
//! The object holds the string fields of `auth_policy_request_attributes`
//! (by default `login`, `pwhash`, `remote`, `device_id`, `protocol`,
//! `session_id`), then, in a report, `success` and `policy_reject`, and
//! `tls` (booleans). Dovecot reads `status` from the answer to an allow
//! command (0 continue, below 0 refuse, above 0 delay that many seconds)
//! and ignores the body of a report's; any status outside 200-209 it logs
//! as `Policy server HTTP error` and carries on as
//! `auth_policy_reject_on_fail` says (by default: the login goes on).
//!
//! Consumes: HTTP requests on a connection accepted by
//! [`crate::net::serve_stream`] within [`LIMITS`] and served by
//! [`crate::net::http::serve`], kept alive as Dovecot's client keeps them.
//! Produces: for a report of a successful IMAP or POP3 login (`success`
//! true, `policy_reject` false, `protocol` `imap` or `pop3`), a
//! [`Reported`] login into the pipeline, which grants `remote` through the
//! address rules, table and sinks a logged login goes through, logged as
//! `reported by auth-policy PEER`; `{"status":0,"msg":""}` at once for
//! every request with the secret (an allow command whatever its body
//! says, so that a mistaken `auth_policy_check_*_auth = yes` never delays
//! or refuses a login); an HTTP error (401 no or wrong secret, 405 not a
//! POST, 400 another command, bad JSON or a field missing, 413 a body over
//! [`MAX_BODY`]) with a rate-limited warning, granting nothing.
//! Trusts: the peer allow-list (`?allow=`, else `--allow-from`), checked
//! before a byte is read; the shared secret ([`Secret`], compared in
//! constant time), which only Dovecot's configuration and our secret file
//! hold; and then Dovecot's word: `remote` is the address its login
//! process saw (or that a proxy in its `login_trusted_networks` passed
//! on), `protocol` the service its login process (or another auth client,
//! such as Postfix's SASL, which says `smtp`) named. Nothing else in the
//! body: `login` is the name the client typed, logged escaped.

use std::net::IpAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use hyper::body::{Body, Bytes};
use hyper::header::{AUTHORIZATION, HeaderValue, WWW_AUTHENTICATE};
use hyper::{Method, Request, StatusCode};
use serde::{Deserialize, Serialize};

use crate::logging::{RateLimit, escape};
use crate::net::http::{self, Answer, BodyError};
use crate::net::{Connection, Io, Limits};
use crate::recognise::matcher::Service;
use crate::recognise::pipeline::{Pipeline, Reported};
use crate::stats::Stats;

/// The input's name in the log and in grants.
pub const INPUT: &str = "auth-policy";

/// Longest request body read (Dovecot's are a few hundred bytes).
pub const MAX_BODY: usize = 16 * 1024;

/// Longest secret file read.
const MAX_SECRET_FILE: u64 = 4096;

/// The bounds of an auth-policy listener: Dovecot's client opens up to 100
/// connections to one server, keeps each idle for 10 s, and gives a request
/// 2 s (`auth_policy_server_timeout_msecs`). No lifetime: closing an idle
/// connection could race a report Dovecot is sending on it.
pub const LIMITS: Limits = Limits {
    total: 512,
    per_peer: 128,
    request: Duration::from_secs(10),
    idle: Duration::from_secs(60),
    lifetime: None,
};

static REQUEST_WARNINGS: RateLimit = RateLimit::new(Duration::from_secs(60), 10);

/// The HTTP Basic credentials every request must carry: `USER:PASSWORD`
/// from `--auth-policy-secret`. Never printed.
pub struct Secret {
    credentials: Vec<u8>,
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(..)")
    }
}

impl Secret {
    /// Reads the secret file, refusing one that group or others may read or
    /// write, or that a user other than root or us owns.
    pub fn read(path: &Path) -> Result<Secret, String> {
        use std::io::Read as _;
        use std::os::unix::fs::MetadataExt as _;
        let shown = path.display();
        let what = format!("--auth-policy-secret {shown}");
        // SAFETY: geteuid has no preconditions.
        let euid = unsafe { libc::geteuid() };
        let file = std::fs::File::open(path).map_err(|e| match e.kind() {
            std::io::ErrorKind::PermissionDenied => format!(
                "{what}: cannot open it: {e}; the daemon reads it as uid {euid}: give it the file (chown; under the packaged unit, chown smtp-after-popd: {shown}), mode 0600"
            ),
            _ => format!(
                "{what}: cannot open it: {e}; create it with one line USER:PASSWORD and mode 0600 (see the README)"
            ),
        })?;
        let meta = file
            .metadata()
            .map_err(|e| format!("{what}: cannot read its mode: {e}"))?;
        if !meta.is_file() {
            return Err(format!("{what}: not a regular file"));
        }
        let mode = meta.mode() & 0o7777;
        if mode & 0o066 != 0 {
            let who = match (mode & 0o060 != 0, mode & 0o006 != 0) {
                (true, true) => "its group and every other user",
                (true, false) => "its group",
                _ => "every other user",
            };
            let can = match (mode & 0o044 != 0, mode & 0o022 != 0) {
                (true, true) => "read and change",
                (true, false) => "read",
                _ => "change",
            };
            return Err(format!(
                "{what}: mode {} lets {who} {can} it, and whoever knows the secret can grant relay access: run chmod 600 {shown}",
                crate::net::mode_text(mode)
            ));
        }
        if meta.uid() != 0 && meta.uid() != euid {
            return Err(format!(
                "{what}: owned by uid {}, who may read and change it: run chown root {shown} (or give it to the user the daemon starts as)",
                meta.uid()
            ));
        }
        let mut text = String::new();
        file.take(MAX_SECRET_FILE + 1)
            .read_to_string(&mut text)
            .map_err(|e| {
                format!("{what}: cannot read it: {e} (expected one line USER:PASSWORD)")
            })?;
        if text.len() as u64 > MAX_SECRET_FILE {
            return Err(format!(
                "{what}: longer than {MAX_SECRET_FILE} bytes: expected one line USER:PASSWORD"
            ));
        }
        Secret::parse(&text).map_err(|e| format!("{what}, line 1: {e}"))
    }

    /// The secret from the file's text: one line `USER:PASSWORD` (with or
    /// without its newline).
    pub fn parse(text: &str) -> Result<Secret, String> {
        let line = text
            .strip_suffix('\n')
            .map(|l| l.strip_suffix('\r').unwrap_or(l))
            .unwrap_or(text);
        if line.contains(['\n', '\r', '\0']) {
            return Err("expected one line USER:PASSWORD, found more".into());
        }
        let Some((user, password)) = line.split_once(':') else {
            return Err(
                "expected USER:PASSWORD (the HTTP Basic credentials Dovecot sends), found no ':'"
                    .into(),
            );
        };
        if user.is_empty() || password.is_empty() {
            return Err("expected USER:PASSWORD with neither empty".into());
        }
        Ok(Secret {
            credentials: line.as_bytes().to_vec(),
        })
    }

    /// Whether an `Authorization` header carries these credentials
    /// (`Basic` and their base64), compared in constant time.
    pub fn admits(&self, header: Option<&HeaderValue>) -> Result<(), &'static str> {
        let Some(value) = header else {
            return Err(
                "no Authorization header: give Dovecot auth_policy_server_api_header = Authorization: Basic BASE64, the base64 of the secret file's USER:PASSWORD",
            );
        };
        let value = value.as_bytes();
        let token = match value.iter().position(|&b| b == b' ') {
            Some(n) if value[..n].eq_ignore_ascii_case(b"basic") => value[n..].trim_ascii(),
            _ => return Err("the Authorization header is not HTTP Basic"),
        };
        let Ok(mut presented) = base64::engine::general_purpose::STANDARD.decode(token) else {
            return Err("the Authorization header's credentials are not valid base64");
        };
        // `echo USER:PASSWORD | base64` adds a newline; the file's is
        // stripped too.
        if presented.last() == Some(&b'\n') {
            presented.pop();
        }
        if constant_time_eq(&presented, &self.credentials) {
            Ok(())
        } else {
            Err(
                "wrong credentials in the Authorization header: they must be the base64 of the secret file's USER:PASSWORD",
            )
        }
    }
}

/// Whether `a` and `b` are equal, in a time that depends on their lengths
/// only, not on where they differ.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    let mut diff = u8::from(a.len() != b.len());
    for i in 0..a.len().max(b.len()) {
        let x = a.get(i).copied().unwrap_or(0);
        let y = b.get(i).copied().unwrap_or(0);
        diff |= std::hint::black_box(x ^ y);
    }
    std::hint::black_box(diff) == 0
}

/// One report, as Dovecot sends it (fields beyond these are ignored).
#[derive(Debug, Deserialize)]
struct Report {
    /// The client's address (`%{rip}`).
    remote: String,
    /// The service (`%s`): `imap`, `pop3`, `smtp`, `submission`, `sieve`...
    protocol: String,
    /// Whether the authentication succeeded.
    success: bool,
    /// Whether a policy check refused it.
    policy_reject: bool,
    /// The user name the client gave (`%{requested_username}`).
    #[serde(default)]
    login: String,
}

/// What Dovecot reads from our answer.
#[derive(Serialize)]
struct PolicyAnswer {
    status: i32,
    msg: &'static str,
}

/// A request refused: its status and why, for the log and the answer.
type Refusal = (StatusCode, String);

/// The auth-policy service: the secret, and the pipeline reports go to.
pub struct AuthPolicy {
    /// The credentials requests must carry.
    pub secret: Secret,
    /// Where reported logins go.
    pub pipeline: Arc<Pipeline>,
}

impl AuthPolicy {
    /// Serves one connection.
    pub async fn session(self: Arc<Self>, conn: Connection, io: Box<dyn Io>) {
        http::serve(conn, io, true, move |conn: Arc<Connection>, req| {
            let me = self.clone();
            async move { me.answer(conn.listener(), conn.peer(), req).await }
        })
        .await;
    }

    /// The answer to one request from `peer` on `listener`.
    pub async fn answer<B>(&self, listener: &str, peer: &str, req: Request<B>) -> Answer
    where
        B: Body<Data = Bytes>,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let stats = &self.pipeline.stats;
        match self.take(peer, req).await {
            Ok(()) => http::answer(StatusCode::OK, "application/json", allow()),
            Err((status, why)) => {
                Stats::bump(&stats.auth_policy_refused);
                crate::log_warning_limited!(
                    REQUEST_WARNINGS,
                    "{listener}: request from {peer} refused ({}): {why}; nothing granted",
                    status.as_u16()
                );
                let mut a = http::text(status, format!("{why}\n"));
                if status == StatusCode::UNAUTHORIZED {
                    a.headers_mut().insert(
                        WWW_AUTHENTICATE,
                        HeaderValue::from_static("Basic realm=\"smtp-after-popd\""),
                    );
                }
                a
            }
        }
    }

    /// Checks a request and acts on it.
    async fn take<B>(&self, peer: &str, req: Request<B>) -> Result<(), Refusal>
    where
        B: Body<Data = Bytes>,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let stats = &self.pipeline.stats;
        let unauthorized = |why: &str| (StatusCode::UNAUTHORIZED, why.to_string());
        self.secret
            .admits(req.headers().get(AUTHORIZATION))
            .map_err(unauthorized)?;
        if req.method() != Method::POST {
            return Err((
                StatusCode::METHOD_NOT_ALLOWED,
                format!(
                    "expected POST (Dovecot's auth-policy client), got {}",
                    req.method()
                ),
            ));
        }
        let command = command(req.uri().query()).map(str::to_string);
        let body = match http::read_body(req.into_body(), MAX_BODY).await {
            Ok(b) => b,
            Err(BodyError::TooLarge) => {
                return Err((
                    StatusCode::PAYLOAD_TOO_LARGE,
                    format!("body over {MAX_BODY} bytes"),
                ));
            }
            Err(BodyError::Broken) => {
                return Err((StatusCode::BAD_REQUEST, "body cut short".to_string()));
            }
        };
        match command.as_deref() {
            Some("allow") => {
                Stats::bump(&stats.auth_policy_checks);
                Ok(())
            }
            Some("report") => {
                let report: Report = serde_json::from_slice(&body).map_err(|e| {
                    (
                        StatusCode::BAD_REQUEST,
                        format!("not a report Dovecot sends: {e} (auth_policy_request_attributes must keep remote=%{{rip}} and protocol=%s)"),
                    )
                })?;
                self.report(peer, &report);
                Ok(())
            }
            other => Err((
                StatusCode::BAD_REQUEST,
                format!(
                    "expected ?command=allow or ?command=report, got {}",
                    other.map_or_else(
                        || "no command".to_string(),
                        |c| format!("\"{}\"", escape(c))
                    )
                ),
            )),
        }
    }

    /// Grants what a report says Dovecot granted: a successful IMAP or POP3
    /// login.
    fn report(&self, peer: &str, r: &Report) {
        let stats = &self.pipeline.stats;
        let service = match r.protocol.as_str() {
            "imap" => Some(Service::Imap),
            "pop3" => Some(Service::Pop3),
            _ => None,
        };
        let (Some(service), true, false) = (service, r.success, r.policy_reject) else {
            Stats::bump(&stats.auth_policy_ignored);
            crate::log_debug!(
                "{INPUT} {peer}: {} {} login of user \"{}\" from {}: nothing granted{}",
                if r.success && !r.policy_reject {
                    "successful"
                } else {
                    "failed"
                },
                escape(&r.protocol),
                escape(&r.login),
                escape(&r.remote),
                if service.is_none() {
                    " (only imap and pop3 logins grant)"
                } else {
                    ""
                }
            );
            return;
        };
        let Ok(ip) = r.remote.parse::<IpAddr>() else {
            Stats::bump(&stats.bad_address);
            crate::log_warning_limited!(
                REQUEST_WARNINGS,
                "{INPUT} {peer}: {service} login of user \"{}\" reported with remote \"{}\", which is not an IP address: nothing granted",
                escape(&r.login),
                escape(&r.remote)
            );
            return;
        };
        Stats::bump(&stats.auth_policy_reports);
        self.pipeline.reported(&Reported {
            ip,
            server: "dovecot",
            service,
            user: &r.login,
            input: INPUT,
            peer,
        });
    }
}

/// The answer Dovecot reads as "allow" (and ignores for a report).
fn allow() -> Vec<u8> {
    serde_json::to_vec(&PolicyAnswer { status: 0, msg: "" }).unwrap_or_default()
}

/// The `command=` of a query (`command=report`, or `a=b&command=allow`).
fn command(query: Option<&str>) -> Option<&str> {
    query?
        .split('&')
        .filter_map(|pair| pair.strip_prefix("command="))
        .next_back()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::grants::addr::{AddressPolicy, Cidr};
    use crate::grants::table::GrantTable;
    use crate::recognise::matcher::Matchers;
    use crate::recognise::pipeline::Settings;
    use http_body_util::{BodyExt, Full};
    use std::sync::atomic::Ordering;

    /// The issue's secret, `dovecot:s3cret`, as Dovecot's header carries it.
    const HEADER: &str = "Basic ZG92ZWNvdDpzM2NyZXQ=";
    const REPORT: &str = r#"{"device_id":"","login":"bob","protocol":"pop3","pwhash":"00d7","remote":"192.0.2.41","session_id":"eNtdP5dhdK9/AAAB","success":true,"policy_reject":false,"tls":false}"#;

    fn service(never: &[&str], max_grants: usize) -> AuthPolicy {
        let never: Vec<Cidr> = never.iter().map(|c| c.parse().unwrap()).collect();
        let settings = Settings {
            matchers: Matchers::builtin(),
            policy: AddressPolicy::new(never),
            window: Duration::from_secs(120),
            require_attestation: false,
            trust_attestation_from: Vec::new(),
            trusted_proxy: Vec::new(),
            hold_while_connected: false,
            hold_max: Duration::from_secs(3600),
        };
        let pipeline = Pipeline::new(
            settings,
            Arc::new(GrantTable::with_limit(max_grants)),
            Arc::new(Stats::default()),
        );
        AuthPolicy {
            secret: Secret::parse("dovecot:s3cret\n").unwrap(),
            pipeline: Arc::new(pipeline),
        }
    }

    fn post(uri: &str, auth: Option<&str>, body: &str) -> Request<Full<Bytes>> {
        let mut b = Request::builder()
            .method(Method::POST)
            .uri(uri)
            .header("Content-Type", "application/json");
        if let Some(a) = auth {
            b = b.header(AUTHORIZATION, a);
        }
        b.body(Full::new(Bytes::from(body.to_string()))).unwrap()
    }

    /// The status and body of the answer to `req`.
    async fn ask(s: &AuthPolicy, req: Request<Full<Bytes>>) -> (u16, String) {
        let a = s
            .answer("auth-policy test", "tcp:192.0.2.1:4000", req)
            .await;
        let status = a.status().as_u16();
        let body = a.into_body().collect().await.unwrap().to_bytes();
        (status, String::from_utf8_lossy(&body).into_owned())
    }

    fn granted(s: &AuthPolicy, ip: &str) -> bool {
        s.pipeline.table.get(ip.parse().unwrap()).is_some()
    }

    fn count(c: &std::sync::atomic::AtomicU64) -> u64 {
        c.load(Ordering::Relaxed)
    }

    #[tokio::test]
    async fn a_successful_pop3_or_imap_report_grants_its_remote_address() {
        let s = service(&[], 100);
        let (status, body) = ask(&s, post("/?command=report", Some(HEADER), REPORT)).await;
        assert_eq!((status, body.as_str()), (200, r#"{"status":0,"msg":""}"#));
        assert!(granted(&s, "192.0.2.41"));
        let g = s.pipeline.table.get("192.0.2.41".parse().unwrap()).unwrap();
        assert_eq!(&*g.reporter, "auth-policy tcp:192.0.2.1:4000");
        assert_eq!(g.service, Service::Pop3);
        let imap = REPORT
            .replace("pop3", "imap")
            .replace("192.0.2.41", "2001:db8::41");
        assert_eq!(
            ask(&s, post("/?command=report", Some(HEADER), &imap))
                .await
                .0,
            200
        );
        assert!(granted(&s, "2001:db8::41"));
        assert_eq!(count(&s.pipeline.stats.auth_policy_reports), 2);
        assert_eq!(count(&s.pipeline.stats.granted), 2);
    }

    #[tokio::test]
    async fn failed_rejected_and_other_protocols_grant_nothing_but_are_answered() {
        let s = service(&[], 100);
        let variants = [
            REPORT.replace(r#""success":true"#, r#""success":false"#),
            REPORT.replace(r#""policy_reject":false"#, r#""policy_reject":true"#),
            REPORT.replace("pop3", "smtp"),
            REPORT.replace("pop3", "submission"),
            REPORT.replace("pop3", "sieve"),
            REPORT.replace("pop3", "IMAP"),
            REPORT.replace("pop3", "imaps"),
        ];
        for v in &variants {
            let (status, body) = ask(&s, post("/?command=report", Some(HEADER), v)).await;
            assert_eq!(
                (status, body.as_str()),
                (200, r#"{"status":0,"msg":""}"#),
                "{v}"
            );
        }
        assert!(s.pipeline.table.is_empty());
        assert_eq!(
            count(&s.pipeline.stats.auth_policy_ignored),
            variants.len() as u64
        );
        // A report with no client address (a local connection) is counted.
        let none = REPORT.replace("192.0.2.41", "");
        assert_eq!(
            ask(&s, post("/?command=report", Some(HEADER), &none))
                .await
                .0,
            200
        );
        assert_eq!(count(&s.pipeline.stats.bad_address), 1);
        assert!(s.pipeline.table.is_empty());
    }

    #[tokio::test]
    async fn requests_without_the_secret_or_malformed_are_refused_and_grant_nothing() {
        let s = service(&[], 100);
        let wrong = format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode("dovecot:s3creT")
        );
        let cases: Vec<(Request<Full<Bytes>>, u16)> = vec![
            (post("/?command=report", None, REPORT), 401),
            (post("/?command=report", Some(&wrong), REPORT), 401),
            (
                post(
                    "/?command=report",
                    Some("Bearer ZG92ZWNvdDpzM2NyZXQ="),
                    REPORT,
                ),
                401,
            ),
            (post("/?command=report", Some("Basic %%%"), REPORT), 401),
            (post("/?command=report", Some(HEADER), "{not json"), 400),
            (post("/?command=report", Some(HEADER), "[1,2]"), 400),
            (
                post(
                    "/?command=report",
                    Some(HEADER),
                    &REPORT.replace("remote", "rip"),
                ),
                400,
            ),
            (
                post(
                    "/?command=report",
                    Some(HEADER),
                    &REPORT.replace("true", "\"true\""),
                ),
                400,
            ),
            // A second remote, as a broken escape of the user name would
            // give: serde refuses the duplicate field.
            (
                post(
                    "/?command=report",
                    Some(HEADER),
                    &REPORT.replace(r#""pwhash""#, r#""remote":"203.0.113.9","pwhash""#),
                ),
                400,
            ),
            (post("/?command=grant", Some(HEADER), REPORT), 400),
            (post("/", Some(HEADER), REPORT), 400),
            (
                post(
                    "/?command=report",
                    Some(HEADER),
                    &format!("{}{}", REPORT, " ".repeat(MAX_BODY)),
                ),
                413,
            ),
        ];
        let n = cases.len() as u64;
        for (req, want) in cases {
            let uri = req.uri().clone();
            assert_eq!(ask(&s, req).await.0, want, "{uri}");
        }
        let get = Request::builder()
            .method(Method::GET)
            .uri("/?command=report")
            .header(AUTHORIZATION, HEADER)
            .body(Full::new(Bytes::new()))
            .unwrap();
        assert_eq!(ask(&s, get).await.0, 405);
        assert!(s.pipeline.table.is_empty());
        assert_eq!(count(&s.pipeline.stats.auth_policy_refused), n + 1);
        // A 401 says how to authenticate.
        let a = s
            .answer("t", "p", post("/?command=report", None, REPORT))
            .await;
        assert_eq!(
            a.headers().get(WWW_AUTHENTICATE).unwrap(),
            "Basic realm=\"smtp-after-popd\""
        );
    }

    #[tokio::test]
    async fn checks_are_allowed_whatever_their_body() {
        let s = service(&[], 100);
        for body in [
            "",
            "garbage",
            r#"{"login":"bob","remote":"192.0.2.9","protocol":"imap"}"#,
        ] {
            let (status, answer) = ask(&s, post("/?command=allow", Some(HEADER), body)).await;
            assert_eq!((status, answer.as_str()), (200, r#"{"status":0,"msg":""}"#));
        }
        // Dovecot appends &command= to a URL that ends with '&'.
        let (status, _) = ask(&s, post("/policy?site=a&command=allow", Some(HEADER), "")).await;
        assert_eq!(status, 200);
        assert_eq!(count(&s.pipeline.stats.auth_policy_checks), 4);
        assert!(s.pipeline.table.is_empty());
    }

    #[tokio::test]
    async fn reports_go_through_the_address_rules() {
        let s = service(&["192.0.2.0/24"], 1);
        ask(&s, post("/?command=report", Some(HEADER), REPORT)).await;
        assert!(s.pipeline.table.is_empty());
        assert_eq!(count(&s.pipeline.stats.refused), 1);
        // IPv4 in IPv6 clothing is the same address.
        let mapped = REPORT.replace("192.0.2.41", "::ffff:192.0.2.41");
        ask(&s, post("/?command=report", Some(HEADER), &mapped)).await;
        assert_eq!(count(&s.pipeline.stats.refused), 2);
        // The table's limit holds too.
        for ip in ["198.51.100.1", "198.51.100.2"] {
            let r = REPORT.replace("192.0.2.41", ip);
            ask(&s, post("/?command=report", Some(HEADER), &r)).await;
        }
        assert_eq!(s.pipeline.table.len(), 1);
        assert_eq!(count(&s.pipeline.stats.refused_full), 1);
    }

    #[tokio::test]
    async fn the_same_login_logged_and_reported_is_one_grant() {
        let s = service(&[], 100);
        let line = "<22>Nov 24 15:36:30 vm dovecot: pop3-login: Login: user=<bob>, method=PLAIN, rip=192.0.2.41, lip=192.0.2.1, mpid=24472, session=<eNtdP5dhdK9/AAAB>";
        s.pipeline.handle(
            line.as_bytes(),
            &crate::ingest::receiver::Peer::Unix("/run/s.sock".into()),
        );
        ask(&s, post("/?command=report", Some(HEADER), REPORT)).await;
        assert_eq!(s.pipeline.table.len(), 1);
        assert_eq!(count(&s.pipeline.stats.granted), 1);
        assert_eq!(count(&s.pipeline.stats.renewed), 1);
    }

    #[test]
    fn the_secret_is_one_line_user_colon_password() {
        for ok in [
            "dovecot:s3cret",
            "dovecot:s3cret\n",
            "d:pass:with:colons\r\n",
        ] {
            assert!(Secret::parse(ok).is_ok(), "{ok:?}");
        }
        for bad in [
            "",
            "\n",
            "nocolon\n",
            ":pw",
            "user:",
            "a:b\nc:d\n",
            "a:b\n\n",
        ] {
            assert!(Secret::parse(bad).is_err(), "{bad:?}");
        }
        let s = Secret::parse("dovecot:s3cret\n").unwrap();
        assert_eq!(format!("{s:?}"), "Secret(..)");
        let h = |v: &str| HeaderValue::from_str(v).unwrap();
        assert!(s.admits(Some(&h(HEADER))).is_ok());
        assert!(s.admits(Some(&h("basic   ZG92ZWNvdDpzM2NyZXQ="))).is_ok());
        // `echo dovecot:s3cret | base64`, with its newline.
        assert!(s.admits(Some(&h("Basic ZG92ZWNvdDpzM2NyZXQK"))).is_ok());
        for bad in [
            "Basic",
            "Basic ",
            "BasicZG92ZWNvdDpzM2NyZXQ=",
            "Basic ZG92ZWNvdDpzM2NyZXQ",
        ] {
            assert!(s.admits(Some(&h(bad))).is_err(), "{bad}");
        }
        assert!(s.admits(None).is_err());
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"abcd"));
        assert!(!constant_time_eq(b"", b"a"));
        assert!(constant_time_eq(b"", b""));
    }

    #[test]
    fn a_secret_file_others_may_read_or_change_is_refused_with_the_chmod_to_run() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("secret");
        std::fs::write(&path, "dovecot:s3cret\n").unwrap();
        for (mode, says) in [
            (0o640, "mode 0640 lets its group read it"),
            (0o604, "mode 0604 lets every other user read it"),
            (0o620, "mode 0620 lets its group change it"),
            (
                0o666,
                "mode 0666 lets its group and every other user read and change it",
            ),
        ] {
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
            let e = Secret::read(&path).unwrap_err();
            assert!(e.contains(says), "{e}");
            assert!(e.contains(&format!("chmod 600 {}", path.display())), "{e}");
        }
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert!(Secret::read(&path).is_ok());
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o400)).unwrap();
        assert!(Secret::read(&path).is_ok());
        std::fs::write(dir.path().join("bad"), "no colon here\n").unwrap();
        std::fs::set_permissions(
            dir.path().join("bad"),
            std::fs::Permissions::from_mode(0o600),
        )
        .unwrap();
        let e = Secret::read(&dir.path().join("bad")).unwrap_err();
        assert!(e.contains("line 1: expected USER:PASSWORD"), "{e}");
        assert!(
            !e.contains("no colon here"),
            "the file's text is never shown: {e}"
        );
        let e = Secret::read(&dir.path().join("missing")).unwrap_err();
        assert!(e.contains("cannot open it"), "{e}");
    }

    #[test]
    fn the_command_is_the_last_command_parameter() {
        assert_eq!(command(Some("command=report")), Some("report"));
        assert_eq!(command(Some("a=b&command=allow")), Some("allow"));
        assert_eq!(command(Some("a=b")), None);
        assert_eq!(command(None), None);
    }
}
