//! The stream catalogue: which data streams exist, where each one writes, its time zone and
//! its authentication rule. One YAML file (a ConfigMap in Kubernetes) read by both binaries and
//! validated here, so the gateway never accepts a hit the sink cannot place.
//!
//! Secrets are never in the file: auth rules name an environment variable or a file that holds
//! each secret, and only the gateway resolves them (the sink does not need them).

use std::collections::HashMap;

/// A map keyed by stream id, for the look-ups every request makes. foldhash rather than the
/// standard SipHash: the keys come from the catalogue (nothing a sender controls is inserted, so
/// flooding one bucket is not a concern) and a lookup costs a fraction (docs/benchmarks.md,
/// "Issue #14, round 7").
pub type UuidMap<V> = HashMap<Uuid, V, foldhash::fast::RandomState>;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;
use uuid::Uuid;

use crate::zone::Zone;

/// A BigQuery table `project.dataset.table`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TableRef {
    pub project: String,
    pub dataset: String,
    pub table: String,
}

impl fmt::Display for TableRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{}", self.project, self.dataset, self.table)
    }
}

impl std::str::FromStr for TableRef {
    type Err = String;

    /// Parses `project.dataset.table`. Project ids may carry a domain (`example.com:proj`), so
    /// the table and dataset are taken from the right.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut parts = s.rsplitn(3, '.');
        let (Some(table), Some(dataset), Some(project)) =
            (parts.next(), parts.next(), parts.next())
        else {
            return Err(format!("`{s}` is not of the form project.dataset.table"));
        };
        let project_ok = !project.is_empty()
            && project.len() <= 128
            && project
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-.:".contains(&b));
        if !project_ok {
            return Err(format!(
                "project `{project}` may hold only lowercase letters, digits, `-`, `.` and `:`"
            ));
        }
        let dataset_ok = !dataset.is_empty()
            && dataset.len() <= 1024
            && dataset
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_');
        if !dataset_ok {
            return Err(format!(
                "dataset `{dataset}` may hold only letters, digits and `_` (1 to 1024)"
            ));
        }
        let table_ok = !table.is_empty()
            && table.len() <= 1024
            && table
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
        if !table_ok {
            return Err(format!(
                "table `{table}` may hold only letters, digits, `_` and `-` (1 to 1024)"
            ));
        }
        Ok(TableRef {
            project: project.to_owned(),
            dataset: dataset.to_owned(),
            table: table.to_owned(),
        })
    }
}

/// Where one secret is read from. Exactly one of the two.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SecretRef {
    /// Name of an environment variable holding the secret.
    #[serde(default)]
    pub env: Option<String>,
    /// Path of a file holding the secret (a mounted Kubernetes Secret); surrounding white space
    /// is trimmed.
    #[serde(default)]
    pub file: Option<PathBuf>,
}

impl fmt::Display for SecretRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (&self.env, &self.file) {
            (Some(env), _) => write!(f, "env {env}"),
            (None, Some(file)) => write!(f, "file {}", file.display()),
            (None, None) => f.write_str("nothing"),
        }
    }
}

/// How a signature is written in its header.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SignatureEncoding {
    #[default]
    Hex,
    Base64,
}

/// A stream's authentication rule, as written in the catalogue. Several secrets may be active
/// at once so that a sender can rotate without downtime.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AuthSpec {
    /// `Authorization: Bearer <token>` must equal one of the secrets.
    Bearer { secrets: Vec<SecretRef> },
    /// A header carries HMAC-SHA256 of the raw body (or of `"{timestamp}.{body}"` when a
    /// timestamp header is configured) under one of the secrets.
    HmacSha256(HmacSpec),
    /// The Standard Webhooks specification (Svix and the SaaS products that follow it):
    /// `webhook-signature: v1,<base64>` (several entries allowed) of HMAC-SHA256 over
    /// `"{webhook-id}.{webhook-timestamp}.{body}"`, keyed by the base64 part of a
    /// `whsec_<base64>` secret. Svix's `svix-*` header names are accepted as well.
    StandardWebhooks {
        tolerance: Duration,
        secrets: Vec<SecretRef>,
    },
    /// Stripe: `Stripe-Signature: t=<ts>,v1=<hex>[,v1=<hex>…]` of HMAC-SHA256 over
    /// `"{t}.{body}"`, keyed by the endpoint's signing secret (`whsec_…`, used as it is).
    Stripe {
        tolerance: Duration,
        secrets: Vec<SecretRef>,
    },
    /// GitHub: `X-Hub-Signature-256: sha256=<hex>` of HMAC-SHA256 over the body.
    GitHub { secrets: Vec<SecretRef> },
    /// Shopify: `X-Shopify-Hmac-Sha256: <base64>` of HMAC-SHA256 over the body, keyed by the
    /// app's client secret.
    Shopify { secrets: Vec<SecretRef> },
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HmacSpec {
    /// Header that carries the signature.
    pub header: String,
    pub encoding: SignatureEncoding,
    /// Text before the signature in the header, such as `sha256=`.
    pub prefix: String,
    /// Header that carries the signing time (Unix seconds); when set, the signed message is
    /// `"{timestamp}.{body}"` and old timestamps are refused.
    pub timestamp_header: Option<String>,
    /// How far the signing time may be from the gateway's clock.
    pub tolerance: Duration,
    pub secrets: Vec<SecretRef>,
}

impl AuthSpec {
    pub fn secrets(&self) -> &[SecretRef] {
        match self {
            AuthSpec::Bearer { secrets }
            | AuthSpec::StandardWebhooks { secrets, .. }
            | AuthSpec::Stripe { secrets, .. }
            | AuthSpec::GitHub { secrets }
            | AuthSpec::Shopify { secrets } => secrets,
            AuthSpec::HmacSha256(h) => &h.secrets,
        }
    }

    /// The `type` as written in the catalogue.
    pub fn kind(&self) -> &'static str {
        match self {
            AuthSpec::Bearer { .. } => "bearer",
            AuthSpec::HmacSha256(_) => "hmac-sha256",
            AuthSpec::StandardWebhooks { .. } => "standard-webhooks",
            AuthSpec::Stripe { .. } => "stripe",
            AuthSpec::GitHub { .. } => "github",
            AuthSpec::Shopify { .. } => "shopify",
        }
    }

    /// The header in which the scheme's sender puts its delivery id, which is the same on a
    /// redelivery of the same event: the stream's idempotency header unless the catalogue
    /// names another. Stripe has none (its event id is in the body).
    pub fn delivery_id_header(&self) -> Option<&'static str> {
        match self {
            AuthSpec::StandardWebhooks { .. } => Some("webhook-id"),
            AuthSpec::GitHub { .. } => Some("X-GitHub-Delivery"),
            AuthSpec::Shopify { .. } => Some("X-Shopify-Webhook-Id"),
            AuthSpec::Bearer { .. } | AuthSpec::HmacSha256(_) | AuthSpec::Stripe { .. } => None,
        }
    }
}

/// One data stream.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Stream {
    pub id: Uuid,
    /// A human label; not used by the pipeline.
    pub name: Option<String>,
    pub table: TableRef,
    pub zone: Zone,
    pub auth: Option<AuthSpec>,
    /// Requests per second this stream may send to each gateway replica; `None` is unlimited.
    pub rate_limit: Option<RateLimit>,
    /// The header holding the sender's idempotency key (its delivery id), when the catalogue
    /// names one for this stream; see [`Stream::idempotency_header`].
    pub idempotency_header: Option<String>,
}

impl Stream {
    /// The header whose value keys this stream's hits: the catalogue's `idempotency_header`,
    /// else the auth scheme's delivery id header; `None` means the gateway's global one
    /// (`HOOKPIPE_IDEMPOTENCY_HEADER`).
    pub fn idempotency_header(&self) -> Option<&str> {
        self.idempotency_header
            .as_deref()
            .or_else(|| self.auth.as_ref().and_then(AuthSpec::delivery_id_header))
    }
}

/// A stream's rate limit: a token bucket refilled at `per_second` that holds `burst` tokens,
/// per gateway replica (N replicas take up to N times as much in all).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct RateLimit {
    pub per_second: u32,
    pub burst: u32,
}

/// All streams, by id.
#[derive(Clone, Debug, Default)]
pub struct Catalogue {
    streams: UuidMap<Arc<Stream>>,
    /// Order of the file, for listings.
    order: Vec<Uuid>,
}

#[derive(Debug, thiserror::Error)]
pub enum CatalogueError {
    #[error("cannot read stream catalogue {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("stream catalogue is not valid YAML of the expected shape: {0}")]
    Syntax(String),
    #[error("stream catalogue is invalid:\n  {}", .0.join("\n  "))]
    Invalid(Vec<String>),
}

// The file's shape. Everything is read as text first so that a bad value is reported with the
// stream it belongs to, not as a bare serde error.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCatalogue {
    #[serde(default)]
    streams: Vec<RawStream>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawStream {
    id: String,
    #[serde(default)]
    name: Option<String>,
    table: String,
    timezone: String,
    #[serde(default)]
    auth: Option<RawAuth>,
    #[serde(default)]
    rate_limit: Option<RawRateLimit>,
    #[serde(default)]
    idempotency_header: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRateLimit {
    per_second: u32,
    #[serde(default)]
    burst: Option<u32>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, tag = "type", rename_all = "kebab-case")]
enum RawAuth {
    Bearer {
        secrets: Vec<SecretRef>,
    },
    HmacSha256 {
        #[serde(default)]
        header: Option<String>,
        #[serde(default)]
        encoding: SignatureEncoding,
        #[serde(default)]
        prefix: Option<String>,
        #[serde(default)]
        timestamp_header: Option<String>,
        #[serde(default)]
        tolerance_seconds: Option<u64>,
        secrets: Vec<SecretRef>,
    },
    StandardWebhooks {
        #[serde(default)]
        tolerance_seconds: Option<u64>,
        secrets: Vec<SecretRef>,
    },
    Stripe {
        #[serde(default)]
        tolerance_seconds: Option<u64>,
        secrets: Vec<SecretRef>,
    },
    Github {
        secrets: Vec<SecretRef>,
    },
    Shopify {
        secrets: Vec<SecretRef>,
    },
}

/// Default header for HMAC signatures.
pub const DEFAULT_SIGNATURE_HEADER: &str = "X-Signature";
/// Default replay window for signed timestamps.
pub const DEFAULT_TOLERANCE: Duration = Duration::from_secs(300);

impl Catalogue {
    /// Reads and validates a catalogue file.
    pub fn load(path: &Path) -> Result<Self, CatalogueError> {
        let text = std::fs::read_to_string(path).map_err(|source| CatalogueError::Io {
            path: path.to_owned(),
            source,
        })?;
        Self::from_yaml(&text)
    }

    /// Parses and validates catalogue text, reporting every problem at once, each naming the
    /// stream and the field.
    pub fn from_yaml(text: &str) -> Result<Self, CatalogueError> {
        let raw: RawCatalogue = if text.trim().is_empty() {
            RawCatalogue { streams: vec![] }
        } else {
            serde_yaml_ng::from_str(text).map_err(|e| CatalogueError::Syntax(e.to_string()))?
        };
        let mut problems = Vec::new();
        let mut catalogue = Catalogue::default();
        let mut first_index: HashMap<Uuid, usize> = HashMap::new();
        for (index, raw) in raw.streams.into_iter().enumerate() {
            let label = format!("stream {} (streams[{index}])", raw.id);
            let mut problem =
                |field: &str, msg: String| problems.push(format!("{label}: {field}: {msg}"));
            let id = match Uuid::try_parse(raw.id.trim()) {
                Ok(id) if id.is_nil() => {
                    problem("id", "the nil UUID is not a stream id".into());
                    None
                }
                Ok(id) => match first_index.get(&id) {
                    Some(first) => {
                        problem("id", format!("already used by streams[{first}]"));
                        None
                    }
                    None => {
                        first_index.insert(id, index);
                        Some(id)
                    }
                },
                Err(_) => {
                    problem("id", format!("`{}` is not a UUID", raw.id));
                    None
                }
            };
            let table = raw
                .table
                .parse::<TableRef>()
                .map_err(|e| problem("table", e))
                .ok();
            let zone = raw
                .timezone
                .parse::<Zone>()
                .map_err(|e| problem("timezone", e.to_string()))
                .ok();
            let auth = match raw.auth.map(validate_auth) {
                Some(Err((field, msg))) => {
                    problem(&format!("auth.{field}"), msg);
                    None
                }
                Some(Ok(auth)) => Some(Some(auth)),
                None => Some(None),
            };
            let rate_limit = match raw.rate_limit {
                None => Some(None),
                Some(RawRateLimit { per_second: 0, .. }) => {
                    problem("rate_limit.per_second", "must be at least 1".into());
                    None
                }
                Some(RawRateLimit { burst: Some(0), .. }) => {
                    problem("rate_limit.burst", "must be at least 1".into());
                    None
                }
                Some(RawRateLimit { per_second, burst }) => Some(Some(RateLimit {
                    per_second,
                    burst: burst.unwrap_or(per_second),
                })),
            };
            let idempotency_header = match raw.idempotency_header {
                Some(h) if !is_header_name(&h) => {
                    problem(
                        "idempotency_header",
                        format!("`{h}` is not a valid HTTP header name"),
                    );
                    None
                }
                h => Some(h),
            };
            if let (
                Some(id),
                Some(table),
                Some(zone),
                Some(auth),
                Some(rate_limit),
                Some(idempotency_header),
            ) = (id, table, zone, auth, rate_limit, idempotency_header)
            {
                catalogue.order.push(id);
                catalogue.streams.insert(
                    id,
                    Arc::new(Stream {
                        id,
                        name: raw.name,
                        table,
                        zone,
                        auth,
                        rate_limit,
                        idempotency_header,
                    }),
                );
            }
        }
        if problems.is_empty() {
            Ok(catalogue)
        } else {
            Err(CatalogueError::Invalid(problems))
        }
    }

    pub fn get(&self, id: &Uuid) -> Option<&Arc<Stream>> {
        self.streams.get(id)
    }

    /// Streams in file order.
    pub fn streams(&self) -> impl Iterator<Item = &Arc<Stream>> {
        self.order.iter().filter_map(|id| self.streams.get(id))
    }

    pub fn len(&self) -> usize {
        self.order.len()
    }

    pub fn is_empty(&self) -> bool {
        self.order.is_empty()
    }
}

fn validate_auth(raw: RawAuth) -> Result<AuthSpec, (&'static str, String)> {
    let check_secrets = |secrets: &[SecretRef]| -> Result<(), (&'static str, String)> {
        if secrets.is_empty() {
            return Err(("secrets", "at least one secret is required".into()));
        }
        for (i, s) in secrets.iter().enumerate() {
            match (&s.env, &s.file) {
                (Some(env), None) if !env.is_empty() => {}
                (None, Some(file)) if !file.as_os_str().is_empty() => {}
                _ => {
                    return Err((
                        "secrets",
                        format!("secrets[{i}] must name exactly one of `env` or `file`"),
                    ));
                }
            }
        }
        Ok(())
    };
    let tolerance = |seconds: Option<u64>| match seconds {
        Some(0) => Err(("tolerance_seconds", "must be at least 1".to_owned())),
        Some(s) => Ok(Duration::from_secs(s)),
        None => Ok(DEFAULT_TOLERANCE),
    };
    match raw {
        RawAuth::StandardWebhooks {
            tolerance_seconds,
            secrets,
        } => {
            check_secrets(&secrets)?;
            Ok(AuthSpec::StandardWebhooks {
                tolerance: tolerance(tolerance_seconds)?,
                secrets,
            })
        }
        RawAuth::Stripe {
            tolerance_seconds,
            secrets,
        } => {
            check_secrets(&secrets)?;
            Ok(AuthSpec::Stripe {
                tolerance: tolerance(tolerance_seconds)?,
                secrets,
            })
        }
        RawAuth::Github { secrets } => {
            check_secrets(&secrets)?;
            Ok(AuthSpec::GitHub { secrets })
        }
        RawAuth::Shopify { secrets } => {
            check_secrets(&secrets)?;
            Ok(AuthSpec::Shopify { secrets })
        }
        RawAuth::Bearer { secrets } => {
            check_secrets(&secrets)?;
            Ok(AuthSpec::Bearer { secrets })
        }
        RawAuth::HmacSha256 {
            header,
            encoding,
            prefix,
            timestamp_header,
            tolerance_seconds,
            secrets,
        } => {
            check_secrets(&secrets)?;
            let header = header.unwrap_or_else(|| DEFAULT_SIGNATURE_HEADER.to_owned());
            if !is_header_name(&header) {
                return Err((
                    "header",
                    format!("`{header}` is not a valid HTTP header name"),
                ));
            }
            if let Some(ts) = &timestamp_header
                && !is_header_name(ts)
            {
                return Err((
                    "timestamp_header",
                    format!("`{ts}` is not a valid HTTP header name"),
                ));
            }
            let tolerance = match tolerance_seconds {
                Some(0) => return Err(("tolerance_seconds", "must be at least 1".into())),
                Some(_) if timestamp_header.is_none() => {
                    return Err((
                        "tolerance_seconds",
                        "only applies with `timestamp_header`".into(),
                    ));
                }
                Some(s) => Duration::from_secs(s),
                None => DEFAULT_TOLERANCE,
            };
            Ok(AuthSpec::HmacSha256(HmacSpec {
                header,
                encoding,
                prefix: prefix.unwrap_or_default(),
                timestamp_header,
                tolerance,
                secrets,
            }))
        }
    }
}

/// An HTTP header name (RFC 9110 token).
fn is_header_name(h: &str) -> bool {
    !h.is_empty()
        && h.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

/// A value derived from the catalogue (the catalogue itself in the sink, the catalogue with
/// resolved secrets in the gateway), swapped whole on reload so a request sees one consistent
/// version.
#[derive(Debug, Default)]
pub struct Shared<T> {
    current: arc_swap::ArcSwap<T>,
}

impl<T> Shared<T> {
    pub fn new(value: T) -> Self {
        Self {
            current: arc_swap::ArcSwap::from_pointee(value),
        }
    }

    /// The version now in force. Cheap and lock-free (every request calls it): one atomic
    /// load and one `Arc` clone; a reload never makes a request wait.
    pub fn current(&self) -> Arc<T> {
        self.current.load_full()
    }

    pub fn replace(&self, value: T) {
        self.current.store(Arc::new(value));
    }
}

/// What a reload attempt did, for logs and the `catalogue_reloads_total{outcome}` metric.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReloadOutcome {
    Applied,
    Rejected,
}

impl ReloadOutcome {
    pub fn as_str(self) -> &'static str {
        match self {
            ReloadOutcome::Applied => "applied",
            ReloadOutcome::Rejected => "rejected",
        }
    }
}

/// Watches the catalogue file and applies a changed, valid version. The file is polled by
/// content rather than watched with inotify: a Kubernetes ConfigMap update swaps a symlink in
/// the mounted directory, which content polling sees reliably. An invalid new version is
/// refused and the old one stays in force. `build` turns a valid catalogue into what the caller
/// keeps, and may refuse it for its own reasons (the gateway refuses one whose secrets it cannot
/// read).
///
/// The file is read once when this is called (not when the future is first polled), so a
/// change made right after the caller loaded the catalogue is not mistaken for the version in
/// force.
pub fn watch_catalogue<T: Send + Sync + 'static>(
    path: PathBuf,
    interval: Duration,
    shared: Arc<Shared<T>>,
    cancel: tokio_util::sync::CancellationToken,
    build: impl Fn(Catalogue) -> Result<T, String> + Send + 'static,
    on_reload: impl Fn(ReloadOutcome) + Send + 'static,
) -> impl std::future::Future<Output = ()> + Send {
    watch_catalogue_and(path, interval, shared, cancel, build, |_| false, on_reload)
}

/// [`watch_catalogue`], and also builds the unchanged catalogue again whenever `stale` says
/// what was built from it is out of date (the gateway: a secret file it read has changed).
pub fn watch_catalogue_and<T: Send + Sync + 'static>(
    path: PathBuf,
    interval: Duration,
    shared: Arc<Shared<T>>,
    cancel: tokio_util::sync::CancellationToken,
    build: impl Fn(Catalogue) -> Result<T, String> + Send + 'static,
    stale: impl Fn(&T) -> bool + Send + 'static,
    on_reload: impl Fn(ReloadOutcome) + Send + 'static,
) -> impl std::future::Future<Output = ()> + Send {
    let applied = std::fs::read(&path).ok();
    watch_from(
        path, interval, shared, cancel, build, stale, on_reload, applied,
    )
}

#[allow(clippy::too_many_arguments)]
async fn watch_from<T>(
    path: PathBuf,
    interval: Duration,
    shared: Arc<Shared<T>>,
    cancel: tokio_util::sync::CancellationToken,
    build: impl Fn(Catalogue) -> Result<T, String> + Send + 'static,
    stale: impl Fn(&T) -> bool + Send + 'static,
    on_reload: impl Fn(ReloadOutcome) + Send + 'static,
    mut applied: Option<Vec<u8>>,
) {
    // A refused version is tried again every tick: it may only lack a secret file that the
    // kubelet has not synced yet (Secret and ConfigMap volumes update independently). It is
    // logged and counted once.
    let mut refused: Option<Vec<u8>> = None;
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = ticker.tick() => {}
        }
        let text = match tokio::fs::read(&path).await {
            Ok(text) => text,
            Err(error) => {
                // A ConfigMap swap can briefly hide the file; keep the version in force.
                tracing::debug!(path = %path.display(), %error, "catalogue not readable, keeping the current one");
                continue;
            }
        };
        let unchanged = applied.as_deref() == Some(text.as_slice());
        // A stale build (say, a secret file that is now empty) is tried again every tick too.
        if unchanged && !stale(&shared.current()) {
            continue;
        }
        let parsed = std::str::from_utf8(&text)
            .map_err(|e| format!("not UTF-8: {e}"))
            .and_then(|t| Catalogue::from_yaml(t).map_err(|e| e.to_string()))
            .and_then(&build);
        match parsed {
            Ok(value) => {
                if unchanged {
                    tracing::info!(path = %path.display(), "a secret file changed; stream catalogue built again");
                } else {
                    tracing::info!(path = %path.display(), "stream catalogue reloaded");
                }
                shared.replace(value);
                on_reload(ReloadOutcome::Applied);
                applied = Some(text);
                refused = None;
            }
            Err(error) if refused.as_deref() == Some(text.as_slice()) => {
                tracing::debug!(path = %path.display(), %error, "new stream catalogue still refused");
            }
            Err(error) => {
                tracing::error!(path = %path.display(), %error, "new stream catalogue refused, keeping the current one");
                on_reload(ReloadOutcome::Rejected);
                refused = Some(text);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
streams:
  - id: 522ed95e-9f07-45f6-a0b7-28bf2d0315e5
    name: CRM orders
    table: local-project.offline_data.crm_orders
    timezone: "+03:00"
  - id: 0b7c7c8e-3f7e-4c59-9a53-5d7f0f1f2b10
    table: local-project.offline_data.leads_us
    timezone: America/New_York
    auth:
      type: hmac-sha256
      header: X-Hub-Signature-256
      prefix: "sha256="
      timestamp_header: X-Timestamp
      tolerance_seconds: 60
      secrets:
        - env: LEADS_SECRET
        - file: /etc/hookpipe/leads-old
"#;

    fn problems(yaml: &str) -> Vec<String> {
        match Catalogue::from_yaml(yaml) {
            Err(CatalogueError::Invalid(p)) => p,
            other => panic!("expected validation problems, got {other:?}"),
        }
    }

    fn one_stream(fields: &str) -> String {
        format!("streams:\n  - id: 522ed95e-9f07-45f6-a0b7-28bf2d0315e5\n{fields}")
    }

    #[test]
    fn a_good_catalogue_parses() {
        let c = Catalogue::from_yaml(GOOD).unwrap();
        assert_eq!(c.len(), 2);
        let id: Uuid = "522ed95e-9f07-45f6-a0b7-28bf2d0315e5".parse().unwrap();
        let s = c.get(&id).unwrap();
        assert_eq!(s.table.to_string(), "local-project.offline_data.crm_orders");
        assert_eq!(s.zone.to_string(), "+03:00");
        assert_eq!(s.name.as_deref(), Some("CRM orders"));
        assert!(s.auth.is_none());
        let leads = c.streams().nth(1).unwrap();
        let Some(AuthSpec::HmacSha256(h)) = &leads.auth else {
            panic!("expected hmac auth")
        };
        assert_eq!(h.header, "X-Hub-Signature-256");
        assert_eq!(h.tolerance, Duration::from_secs(60));
        assert_eq!(h.secrets.len(), 2);
        assert_eq!(h.encoding, SignatureEncoding::Hex);
    }

    #[test]
    fn a_rate_limit_parses_with_burst_defaulting_to_the_rate() {
        let base = "    table: p.d.t\n    timezone: UTC\n";
        let c = Catalogue::from_yaml(&one_stream(&format!(
            "{base}    rate_limit:\n      per_second: 50\n      burst: 200\n"
        )))
        .unwrap();
        let s = c.streams().next().unwrap();
        assert_eq!(
            s.rate_limit,
            Some(RateLimit {
                per_second: 50,
                burst: 200
            })
        );
        let c = Catalogue::from_yaml(&one_stream(&format!(
            "{base}    rate_limit:\n      per_second: 7\n"
        )))
        .unwrap();
        assert_eq!(c.streams().next().unwrap().rate_limit.unwrap().burst, 7);
        assert!(
            Catalogue::from_yaml(&one_stream(base))
                .unwrap()
                .streams()
                .next()
                .unwrap()
                .rate_limit
                .is_none()
        );
        let p = problems(&one_stream(&format!(
            "{base}    rate_limit:\n      per_second: 0\n"
        )));
        assert!(
            p[0].ends_with("rate_limit.per_second: must be at least 1"),
            "{p:?}"
        );
        let p = problems(&one_stream(&format!(
            "{base}    rate_limit:\n      per_second: 5\n      burst: 0\n"
        )));
        assert!(
            p[0].ends_with("rate_limit.burst: must be at least 1"),
            "{p:?}"
        );
    }

    #[test]
    fn an_empty_file_is_an_empty_catalogue() {
        assert!(Catalogue::from_yaml("").unwrap().is_empty());
        assert!(Catalogue::from_yaml("streams: []").unwrap().is_empty());
    }

    #[test]
    fn rule_id_must_be_a_uuid() {
        let p = problems("streams:\n  - id: orders\n    table: p.d.t\n    timezone: UTC\n");
        assert_eq!(
            p,
            ["stream orders (streams[0]): id: `orders` is not a UUID"]
        );
    }

    #[test]
    fn rule_id_must_not_be_nil() {
        let p = problems(
            "streams:\n  - id: 00000000-0000-0000-0000-000000000000\n    table: p.d.t\n    timezone: UTC\n",
        );
        assert!(p[0].contains("id: the nil UUID"), "{p:?}");
    }

    #[test]
    fn rule_ids_are_unique() {
        let entry =
            "  - id: 522ed95e-9f07-45f6-a0b7-28bf2d0315e5\n    table: p.d.t\n    timezone: UTC\n";
        let p = problems(&format!("streams:\n{entry}{entry}"));
        assert_eq!(
            p,
            [
                "stream 522ed95e-9f07-45f6-a0b7-28bf2d0315e5 (streams[1]): id: already used by streams[0]"
            ]
        );
    }

    #[test]
    fn rule_table_has_three_parts() {
        let p = problems(&one_stream(
            "    table: offline_data.crm_orders\n    timezone: UTC\n",
        ));
        assert_eq!(
            p,
            [
                "stream 522ed95e-9f07-45f6-a0b7-28bf2d0315e5 (streams[0]): table: `offline_data.crm_orders` is not of the form project.dataset.table"
            ]
        );
    }

    #[test]
    fn rule_table_names_use_allowed_characters() {
        let p = problems(&one_stream(
            "    table: p.bad-dataset.t\n    timezone: UTC\n",
        ));
        assert!(p[0].contains("table: dataset `bad-dataset`"), "{p:?}");
        let p = problems(&one_stream("    table: Proj.d.t\n    timezone: UTC\n"));
        assert!(p[0].contains("table: project `Proj`"), "{p:?}");
        let p = problems(&one_stream(
            "    table: p.d.t$20200101\n    timezone: UTC\n",
        ));
        assert!(p[0].contains("table: table `t$20200101`"), "{p:?}");
        // A domain-scoped project id is fine.
        let ok = one_stream("    table: example.com:proj.d.t\n    timezone: UTC\n");
        let c = Catalogue::from_yaml(&ok).unwrap();
        assert_eq!(
            c.streams().next().unwrap().table.project,
            "example.com:proj"
        );
    }

    #[test]
    fn rule_timezone_must_be_known() {
        let p = problems(&one_stream(
            "    table: p.d.t\n    timezone: Mars/Olympus\n",
        ));
        assert!(
            p[0].contains("(streams[0]): timezone: `Mars/Olympus` is not a time zone"),
            "{p:?}"
        );
        let p = problems(&one_stream("    table: p.d.t\n    timezone: \"+25:00\"\n"));
        assert!(
            p[0].contains("timezone: offset `+25:00` is outside"),
            "{p:?}"
        );
    }

    #[test]
    fn rule_required_fields_are_present() {
        let err = Catalogue::from_yaml(&one_stream("    table: p.d.t\n")).unwrap_err();
        assert!(
            err.to_string().contains("missing field `timezone`"),
            "{err}"
        );
    }

    #[test]
    fn rule_unknown_fields_are_refused() {
        let err =
            Catalogue::from_yaml(&one_stream("    tabel: p.d.t\n    timezone: UTC\n")).unwrap_err();
        assert!(err.to_string().contains("unknown field `tabel`"), "{err}");
        let err = Catalogue::from_yaml("stream: []").unwrap_err();
        assert!(err.to_string().contains("unknown field `stream`"), "{err}");
    }

    #[test]
    fn rule_auth_type_is_known() {
        let err = Catalogue::from_yaml(&one_stream(
            "    table: p.d.t\n    timezone: UTC\n    auth:\n      type: basic\n      secrets: [{env: X}]\n",
        ))
        .unwrap_err();
        assert!(err.to_string().contains("unknown variant `basic`"), "{err}");
    }

    #[test]
    fn rule_auth_needs_a_secret() {
        let p = problems(&one_stream(
            "    table: p.d.t\n    timezone: UTC\n    auth:\n      type: bearer\n      secrets: []\n",
        ));
        assert!(
            p[0].contains("auth.secrets: at least one secret is required"),
            "{p:?}"
        );
    }

    #[test]
    fn rule_each_secret_names_one_source() {
        let p = problems(&one_stream(
            "    table: p.d.t\n    timezone: UTC\n    auth:\n      type: bearer\n      secrets: [{env: A, file: /b}]\n",
        ));
        assert!(
            p[0].contains("auth.secrets: secrets[0] must name exactly one"),
            "{p:?}"
        );
    }

    #[test]
    fn rule_secrets_are_never_inline() {
        let err = Catalogue::from_yaml(&one_stream(
            "    table: p.d.t\n    timezone: UTC\n    auth:\n      type: bearer\n      secrets: [{value: s3cr3t}]\n",
        ))
        .unwrap_err();
        assert!(err.to_string().contains("unknown field `value`"), "{err}");
    }

    #[test]
    fn rule_signature_header_is_a_header_name() {
        let p = problems(&one_stream(
            "    table: p.d.t\n    timezone: UTC\n    auth:\n      type: hmac-sha256\n      header: \"X Sig\"\n      secrets: [{env: A}]\n",
        ));
        assert!(
            p[0].contains("auth.header: `X Sig` is not a valid HTTP header name"),
            "{p:?}"
        );
    }

    #[test]
    fn rule_tolerance_needs_a_timestamp_header() {
        let p = problems(&one_stream(
            "    table: p.d.t\n    timezone: UTC\n    auth:\n      type: hmac-sha256\n      tolerance_seconds: 30\n      secrets: [{env: A}]\n",
        ));
        assert!(
            p[0].contains("auth.tolerance_seconds: only applies"),
            "{p:?}"
        );
    }

    #[test]
    fn provider_schemes_parse_with_their_delivery_id_headers() {
        let stream = |auth: &str, extra: &str| {
            let c = Catalogue::from_yaml(&one_stream(&format!(
                "    table: p.d.t\n    timezone: UTC\n{extra}    auth: {auth}\n"
            )))
            .unwrap();
            c.streams().next().unwrap().clone()
        };
        let sw = stream(
            "{type: standard-webhooks, tolerance_seconds: 60, secrets: [{env: A}]}",
            "",
        );
        assert_eq!(
            sw.auth,
            Some(AuthSpec::StandardWebhooks {
                tolerance: Duration::from_secs(60),
                secrets: vec![SecretRef {
                    env: Some("A".into()),
                    file: None
                }],
            })
        );
        assert_eq!(sw.idempotency_header(), Some("webhook-id"));
        let stripe = stream("{type: stripe, secrets: [{env: A}]}", "");
        assert_eq!(stripe.idempotency_header(), None, "the global header");
        assert!(
            matches!(stripe.auth, Some(AuthSpec::Stripe { tolerance, .. }) if tolerance == DEFAULT_TOLERANCE)
        );
        let github = stream("{type: github, secrets: [{file: /s}]}", "");
        assert_eq!(github.idempotency_header(), Some("X-GitHub-Delivery"));
        let shopify = stream(
            "{type: shopify, secrets: [{env: A}]}",
            "    idempotency_header: X-Order-Change\n",
        );
        assert_eq!(
            shopify.idempotency_header(),
            Some("X-Order-Change"),
            "the catalogue's own wins"
        );
    }

    #[test]
    fn rule_provider_fields_are_checked() {
        let p = problems(&one_stream(
            "    table: p.d.t\n    timezone: UTC\n    idempotency_header: \"Order Key\"\n",
        ));
        assert!(
            p[0].contains("idempotency_header: `Order Key` is not a valid HTTP header name"),
            "{p:?}"
        );
        let p = problems(&one_stream(
            "    table: p.d.t\n    timezone: UTC\n    auth: {type: stripe, tolerance_seconds: 0, secrets: [{env: A}]}\n",
        ));
        assert!(
            p[0].contains("auth.tolerance_seconds: must be at least 1"),
            "{p:?}"
        );
        let p = problems(&one_stream(
            "    table: p.d.t\n    timezone: UTC\n    auth: {type: github, secrets: []}\n",
        ));
        assert!(p[0].contains("auth.secrets: at least one secret"), "{p:?}");
        let err = Catalogue::from_yaml(&one_stream(
            "    table: p.d.t\n    timezone: UTC\n    auth: {type: github, header: X-Sig, secrets: [{env: A}]}\n",
        ))
        .unwrap_err();
        assert!(err.to_string().contains("unknown field `header`"), "{err}");
    }

    #[test]
    fn every_problem_is_reported_at_once() {
        let p = problems(
            "streams:\n  - id: x\n    table: t\n    timezone: Nowhere\n  - id: 522ed95e-9f07-45f6-a0b7-28bf2d0315e5\n    table: p.d.t\n    timezone: UTC\n",
        );
        assert_eq!(p.len(), 3, "{p:?}");
    }

    #[test]
    fn shared_catalogue_swaps_whole() {
        let shared = Shared::new(Catalogue::default());
        let before = shared.current();
        shared.replace(Catalogue::from_yaml(GOOD).unwrap());
        assert!(before.is_empty());
        assert_eq!(shared.current().len(), 2);
    }
}

#[cfg(test)]
mod watch_tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

    /// A catalogue whose secret file arrives after it (the kubelet syncs Secret and ConfigMap
    /// volumes independently) is applied once the secret is there, without another change.
    #[tokio::test]
    async fn a_refused_catalogue_is_retried_until_it_builds() {
        let dir = std::env::temp_dir().join(format!("hookpipe-watch-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("streams.yaml");
        std::fs::write(&path, "streams: []\n").unwrap();
        let shared = Arc::new(Shared::new(0usize));
        let secret_there = Arc::new(AtomicBool::new(false));
        let (applied, rejected) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let cancel = tokio_util::sync::CancellationToken::new();
        let task = tokio::spawn({
            let (shared, secret_there, applied, rejected, cancel) = (
                shared.clone(),
                secret_there.clone(),
                applied.clone(),
                rejected.clone(),
                cancel.clone(),
            );
            watch_catalogue(
                path.clone(),
                Duration::from_millis(20),
                shared,
                cancel,
                move |c| {
                    if secret_there.load(Ordering::SeqCst) {
                        Ok(c.len())
                    } else {
                        Err("secret file missing".into())
                    }
                },
                move |outcome| {
                    let counter = match outcome {
                        ReloadOutcome::Applied => &applied,
                        ReloadOutcome::Rejected => &rejected,
                    };
                    counter.fetch_add(1, Ordering::SeqCst);
                },
            )
        });
        std::fs::write(
            &path,
            "streams:\n  - id: 522ed95e-9f07-45f6-a0b7-28bf2d0315e5\n    table: p.d.t\n    timezone: UTC\n",
        )
        .unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while rejected.load(Ordering::SeqCst) == 0 {
            assert!(std::time::Instant::now() < deadline, "never refused");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        secret_there.store(true, Ordering::SeqCst);
        while *shared.current() != 1 {
            assert!(std::time::Instant::now() < deadline, "never applied");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(
            rejected.load(Ordering::SeqCst),
            1,
            "refused once, not every tick"
        );
        assert_eq!(applied.load(Ordering::SeqCst), 1);
        cancel.cancel();
        task.await.unwrap();
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// How the kubelet updates a mounted ConfigMap: the file is a symlink through `..data`,
    /// which is swapped atomically to a new timestamped directory. The watcher follows it.
    #[cfg(unix)]
    #[tokio::test]
    async fn a_configmap_style_symlink_swap_is_picked_up() {
        use std::os::unix::fs::symlink;
        let dir = std::env::temp_dir().join(format!("hookpipe-cm-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("..2026_11_27_01")).unwrap();
        std::fs::write(dir.join("..2026_11_27_01/streams.yaml"), "streams: []\n").unwrap();
        symlink("..2026_11_27_01", dir.join("..data")).unwrap();
        symlink("..data/streams.yaml", dir.join("streams.yaml")).unwrap();
        let shared = Arc::new(Shared::new(0usize));
        let cancel = tokio_util::sync::CancellationToken::new();
        let task = tokio::spawn(watch_catalogue(
            dir.join("streams.yaml"),
            Duration::from_millis(20),
            shared.clone(),
            cancel.clone(),
            |c| Ok(c.len()),
            |_| {},
        ));
        // The update: a new directory, a temporary link to it, renamed over `..data`.
        std::fs::create_dir_all(dir.join("..2026_11_27_02")).unwrap();
        std::fs::write(
            dir.join("..2026_11_27_02/streams.yaml"),
            "streams:\n  - id: 522ed95e-9f07-45f6-a0b7-28bf2d0315e5\n    table: p.d.t\n    timezone: UTC\n",
        )
        .unwrap();
        symlink("..2026_11_27_02", dir.join("..data_tmp")).unwrap();
        std::fs::rename(dir.join("..data_tmp"), dir.join("..data")).unwrap();
        std::fs::remove_dir_all(dir.join("..2026_11_27_01")).unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while *shared.current() != 1 {
            assert!(
                std::time::Instant::now() < deadline,
                "the swap was not picked up"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        cancel.cancel();
        task.await.unwrap();
        let _ = std::fs::remove_dir_all(&dir);
    }
}
