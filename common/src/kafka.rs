//! Kafka connection settings shared by both binaries: bootstrap servers, TLS, SASL and a
//! pass-through for any other librdkafka property, turned into one `ClientConfig`.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

use rdkafka::ClientConfig;

use crate::secret::Secret;

/// A librdkafka `key=value` property from the command line or environment.
#[derive(Clone, PartialEq, Eq)]
pub struct Property {
    pub key: String,
    pub value: String,
}

impl FromStr for Property {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.split_once('=') {
            Some((k, v)) if !k.trim().is_empty() => Ok(Property {
                key: k.trim().to_owned(),
                value: v.to_owned(),
            }),
            _ => Err(format!("`{s}` is not of the form key=value")),
        }
    }
}

/// Property values can hold secrets (`sasl.password`, `ssl.key.password`, ...): never print
/// one whose key looks secret.
impl fmt::Debug for Property {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if is_secret_key(&self.key) {
            write!(f, "{}=[redacted]", self.key)
        } else {
            write!(f, "{}={}", self.key, self.value)
        }
    }
}

fn is_secret_key(key: &str) -> bool {
    let key = key.to_ascii_lowercase();
    ["password", "secret", "token", "key.pem", "jaas"]
        .iter()
        .any(|s| key.contains(s))
}

/// How to reach the Kafka cluster.
#[derive(clap::Args, Clone, Debug)]
pub struct KafkaArgs {
    /// Kafka bootstrap servers, comma-separated host:port.
    #[arg(
        long = "kafka-brokers",
        env = "HOOKPIPE_KAFKA_BROKERS",
        default_value = "127.0.0.1:9092"
    )]
    pub brokers: String,

    /// The main topic that carries envelopes from the gateway to the sink.
    #[arg(long = "topic", env = "HOOKPIPE_TOPIC", default_value = "webhooks")]
    pub topic: String,

    /// librdkafka `security.protocol`: plaintext, ssl, sasl_plaintext or sasl_ssl.
    #[arg(long = "kafka-security-protocol", env = "HOOKPIPE_KAFKA_SECURITY_PROTOCOL", default_value = "plaintext", value_parser = ["plaintext", "ssl", "sasl_plaintext", "sasl_ssl"])]
    pub security_protocol: String,

    /// SASL mechanism: PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512.
    #[arg(long = "kafka-sasl-mechanism", env = "HOOKPIPE_KAFKA_SASL_MECHANISM", value_parser = ["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"])]
    pub sasl_mechanism: Option<String>,

    /// SASL user name.
    #[arg(long = "kafka-sasl-username", env = "HOOKPIPE_KAFKA_SASL_USERNAME")]
    pub sasl_username: Option<String>,

    /// SASL password. Prefer the environment (from a Kubernetes Secret) over the command line.
    #[arg(
        long = "kafka-sasl-password",
        env = "HOOKPIPE_KAFKA_SASL_PASSWORD",
        hide_env_values = true
    )]
    pub sasl_password: Option<Secret>,

    /// CA certificate file (PEM) to verify the brokers' TLS certificates; the system store is
    /// used when unset.
    #[arg(long = "kafka-ssl-ca", env = "HOOKPIPE_KAFKA_SSL_CA_LOCATION")]
    pub ssl_ca_location: Option<PathBuf>,

    /// Any other librdkafka property as key=value; repeat the flag, or separate with commas in
    /// the environment variable. Applied last, so it overrides the settings above.
    #[arg(
        long = "kafka-property",
        env = "HOOKPIPE_KAFKA_PROPERTIES",
        value_delimiter = ','
    )]
    pub properties: Vec<Property>,
}

impl KafkaArgs {
    /// Cross-field rules, checked at start-up so a misconfiguration fails fast with a message
    /// naming the setting.
    pub fn validate(&self) -> Result<(), String> {
        if self.brokers.trim().is_empty() {
            return Err("--kafka-brokers / HOOKPIPE_KAFKA_BROKERS is empty".into());
        }
        if self.topic.trim().is_empty() {
            return Err("--topic / HOOKPIPE_TOPIC is empty".into());
        }
        let sasl = self.security_protocol.starts_with("sasl");
        if sasl && self.sasl_mechanism.is_none() {
            return Err(format!(
                "security protocol {} needs --kafka-sasl-mechanism / HOOKPIPE_KAFKA_SASL_MECHANISM",
                self.security_protocol
            ));
        }
        if sasl && (self.sasl_username.is_none() || self.sasl_password.is_none()) {
            return Err(
                "SASL needs HOOKPIPE_KAFKA_SASL_USERNAME and HOOKPIPE_KAFKA_SASL_PASSWORD".into(),
            );
        }
        if !sasl && self.sasl_mechanism.is_some() {
            return Err(format!(
                "--kafka-sasl-mechanism is set but the security protocol is {}; use sasl_ssl or sasl_plaintext",
                self.security_protocol
            ));
        }
        Ok(())
    }

    /// The base client configuration; the producer and consumer add their own settings and
    /// then `apply_overrides` puts the user's pass-through properties on top.
    pub fn client_config(&self) -> ClientConfig {
        let mut config = ClientConfig::new();
        config
            .set("bootstrap.servers", &self.brokers)
            .set("security.protocol", &self.security_protocol)
            // Warnings too: librdkafka tells a TLS or SASL mismatch in warning lines, which the
            // services' contexts turn into one line per cause (ClientHealth).
            .set_log_level(rdkafka::config::RDKafkaLogLevel::Warning);
        if let Some(mechanism) = &self.sasl_mechanism {
            config.set("sasl.mechanism", mechanism);
        }
        if let Some(user) = &self.sasl_username {
            config.set("sasl.username", user);
        }
        if let Some(password) = &self.sasl_password {
            config.set("sasl.password", password.expose());
        }
        if let Some(ca) = &self.ssl_ca_location {
            config.set("ssl.ca.location", ca.to_string_lossy());
        }
        config
    }

    /// Puts the pass-through properties on top of `config`.
    pub fn apply_overrides(&self, config: &mut ClientConfig) {
        for p in &self.properties {
            config.set(&p.key, &p.value);
        }
    }
}

/// Checks that the broker answers and `topic` exists with partitions. Blocking.
pub fn check_topic<C: rdkafka::client::ClientContext>(
    client: &rdkafka::client::Client<C>,
    topic: &str,
    timeout: std::time::Duration,
) -> Result<(), String> {
    let metadata = client
        .fetch_metadata(Some(topic), timeout)
        .map_err(|e| format!("broker metadata: {e}"))?;
    match metadata.topics().first() {
        Some(t) if t.error().is_none() && !t.partitions().is_empty() => Ok(()),
        Some(t) => Err(format!("topic {topic} not available: {:?}", t.error())),
        None => Err(format!("topic {topic} not in metadata")),
    }
}

/// A broker-connection problem that a setting causes, as an operator should read it: which
/// setting to check, never a secret's value.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Diagnosis {
    /// A short stable name (`tls_certificate`, `sasl_authentication`, ...).
    pub cause: &'static str,
    pub message: &'static str,
}

/// Recognises what librdkafka reports (error callbacks and log lines) when the security
/// settings do not match the brokers'.
pub fn diagnose(text: &str) -> Option<Diagnosis> {
    let t = text.to_ascii_lowercase();
    let d = |cause, message| Some(Diagnosis { cause, message });
    if t.contains("certificate verify failed") || t.contains("unable to get local issuer") {
        return d(
            "tls_certificate",
            "the brokers' TLS certificate is not signed by the CA in HOOKPIPE_KAFKA_SSL_CA_LOCATION (or the system store when unset)",
        );
    }
    if t.contains("wrong version number")
        || t.contains("connecting to a plaintext")
        || t.contains("connecting to a ssl listener")
        || t.contains("incorrect security.protocol")
        || t.contains("packet length")
    {
        return d(
            "security_protocol",
            "the brokers' listener does not speak HOOKPIPE_KAFKA_SECURITY_PROTOCOL (TLS against a plaintext port, or plaintext against a TLS port)",
        );
    }
    if t.contains("unsupported sasl mechanism")
        || t.contains("mechanism") && (t.contains("not supported") || t.contains("not enabled"))
    {
        return d(
            "sasl_mechanism",
            "the brokers do not offer HOOKPIPE_KAFKA_SASL_MECHANISM",
        );
    }
    if t.contains("sasl authentication") || t.contains("authentication failed") {
        return d(
            "sasl_authentication",
            "SASL authentication failed: check HOOKPIPE_KAFKA_SASL_USERNAME, HOOKPIPE_KAFKA_SASL_PASSWORD and HOOKPIPE_KAFKA_SASL_MECHANISM",
        );
    }
    if t.contains("ssl handshake failed") {
        return d(
            "tls_handshake",
            "the TLS handshake with the brokers failed: check HOOKPIPE_KAFKA_SECURITY_PROTOCOL and HOOKPIPE_KAFKA_SSL_CA_LOCATION",
        );
    }
    None
}

/// For a plaintext client whose brokers do not answer: asks the first bootstrap broker for its
/// API versions in plaintext. A Kafka listener always answers that; one that closes the
/// connection or answers with a TLS alert is a TLS listener, which librdkafka itself only
/// reports as "broker down". Blocking (a few seconds at most); call off the runtime.
pub fn probe_listener(config: &ClientConfig) -> Option<Diagnosis> {
    use std::io::{Read, Write};
    let protocol = config.get("security.protocol").unwrap_or("plaintext");
    if !protocol.eq_ignore_ascii_case("plaintext")
        && !protocol.eq_ignore_ascii_case("sasl_plaintext")
    {
        return None;
    }
    let first = config.get("bootstrap.servers")?.split(',').next()?.trim();
    let addr = std::net::ToSocketAddrs::to_socket_addrs(first)
        .ok()?
        .next()?;
    let timeout = std::time::Duration::from_secs(2);
    let mut stream = std::net::TcpStream::connect_timeout(&addr, timeout).ok()?;
    stream.set_read_timeout(Some(timeout)).ok()?;
    stream.set_write_timeout(Some(timeout)).ok()?;
    // ApiVersions v0: length, api key 18, version 0, correlation id 1, null client id.
    let request: [u8; 14] = [0, 0, 0, 10, 0, 18, 0, 0, 0, 0, 0, 1, 0xff, 0xff];
    stream.write_all(&request).ok()?;
    let mut head = [0u8; 8];
    let tls = match stream.read(&mut head) {
        // Closed without a word, or a TLS alert record (content type 21, version 3.x).
        Ok(0) => true,
        Ok(n) => n >= 2 && head[0] == 0x15 && head[1] == 0x03,
        Err(e) => e.kind() == std::io::ErrorKind::ConnectionReset,
    };
    tls.then_some(Diagnosis {
        cause: "security_protocol",
        message: "the brokers' listener does not speak HOOKPIPE_KAFKA_SECURITY_PROTOCOL (TLS against a plaintext port, or plaintext against a TLS port)",
    })
}

/// The latest configuration problem a Kafka client reported, shared by its context (which
/// records it) and the readiness check (which shows it). Each cause is logged once at error
/// level when it starts, not once per retry.
#[derive(Clone, Debug, Default)]
pub struct ClientHealth(
    std::sync::Arc<std::sync::Mutex<Option<(Diagnosis, std::time::Instant)>>>,
    /// When each other kind of report (by facility or error kind) was last logged.
    std::sync::Arc<std::sync::Mutex<std::collections::HashMap<String, std::time::Instant>>>,
);

/// Least time between two log lines of one kind that is not a configuration problem (a broker
/// that is down is reported by librdkafka on every reconnect).
const REPEAT_INTERVAL: std::time::Duration = std::time::Duration::from_secs(60);

/// How long a reported problem counts after its last report.
const DIAGNOSIS_TTL: std::time::Duration = std::time::Duration::from_secs(30);

impl ClientHealth {
    /// Looks at something librdkafka reported; true when it was a configuration problem.
    pub fn report(&self, text: &str) -> bool {
        match diagnose(text) {
            Some(diagnosis) => {
                self.set(diagnosis, text);
                true
            }
            None => false,
        }
    }

    fn set(&self, diagnosis: Diagnosis, detail: &str) {
        let Ok(mut current) = self.0.lock() else {
            return;
        };
        let new = current
            .as_ref()
            .is_none_or(|(d, at)| d.cause != diagnosis.cause || at.elapsed() > DIAGNOSIS_TTL);
        if new {
            // librdkafka's own text may name the broker and the error, never a secret.
            tracing::error!(
                cause = diagnosis.cause,
                detail,
                "Kafka: {}",
                diagnosis.message
            );
        }
        *current = Some((diagnosis, std::time::Instant::now()));
    }

    /// The problem reported within the last 30 s, if any.
    pub fn current(&self) -> Option<Diagnosis> {
        let current = self.0.lock().ok()?;
        current
            .as_ref()
            .filter(|(_, at)| at.elapsed() < DIAGNOSIS_TTL)
            .map(|(d, _)| *d)
    }

    /// The brokers answer: whatever was reported is over.
    pub fn clear(&self) {
        if let Ok(mut current) = self.0.lock() {
            *current = None;
        }
    }

    /// Whether a report of this kind is due for logging (at most one per minute).
    fn due(&self, kind: &str) -> bool {
        let Ok(mut last) = self.1.lock() else {
            return true;
        };
        let now = std::time::Instant::now();
        match last.get(kind) {
            Some(at) if now.duration_since(*at) < REPEAT_INTERVAL => false,
            _ => {
                last.insert(kind.to_owned(), now);
                true
            }
        }
    }

    /// Records a problem found another way (a probe), logged like a reported one.
    pub fn record(&self, diagnosis: Diagnosis) {
        self.set(diagnosis, "found by probing the first bootstrap broker");
    }

    /// For a client context's `error` callback.
    pub fn on_error(&self, error: &rdkafka::error::KafkaError, reason: &str) {
        if !self.report(reason) && !self.report(&error.to_string()) {
            let kind = format!("{:?}", error.rdkafka_error_code());
            if self.due(&kind) {
                tracing::warn!(%error, reason, "Kafka client error (repeats are not logged for a minute)");
            }
        }
    }

    /// For a client context's `log` callback: configuration problems once per cause, the rest
    /// at their own level (librdkafka repeats its lines on every retry).
    pub fn on_log(&self, level: rdkafka::config::RDKafkaLogLevel, fac: &str, line: &str) {
        use rdkafka::config::RDKafkaLogLevel as L;
        if self.report(line) || !self.due(fac) {
            return;
        }
        match level {
            L::Emerg | L::Alert | L::Critical | L::Error => {
                tracing::error!(target: "rdkafka", fac, "{line}")
            }
            L::Warning => tracing::warn!(target: "rdkafka", fac, "{line}"),
            L::Notice | L::Info => tracing::info!(target: "rdkafka", fac, "{line}"),
            L::Debug => tracing::debug!(target: "rdkafka", fac, "{line}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        kafka: KafkaArgs,
    }

    #[test]
    fn librdkafka_reports_are_told_apart_by_the_setting_to_check() {
        let cause = |t: &str| diagnose(t).map(|d| d.cause);
        assert_eq!(
            cause(
                "ssl://127.0.0.1:1/bootstrap: SSL handshake failed: error:0A000086:SSL routines::certificate verify failed: broker certificate could not be verified, verify that ssl.ca.location is correctly configured or root CA certificates are installed (add broker's CA certificate to the Windows Root certificate store) (after 3ms in state SSL_HANDSHAKE)"
            ),
            Some("tls_certificate")
        );
        assert_eq!(
            cause(
                "sasl_ssl://127.0.0.1:1/bootstrap: SASL authentication error: Authentication failed during authentication due to invalid credentials with SASL mechanism SCRAM-SHA-512 (after 5ms in state AUTH_REQ)"
            ),
            Some("sasl_authentication")
        );
        assert_eq!(
            cause(
                "127.0.0.1:1/bootstrap: Disconnected while requesting ApiVersion: might be caused by incorrect security.protocol configuration (connecting to a SSL listener?) or broker version is < 0.10 (see api.version.request) (after 1ms in state APIVERSION_QUERY)"
            ),
            Some("security_protocol")
        );
        assert_eq!(
            cause(
                "ssl://127.0.0.1:1/bootstrap: SSL handshake failed: error:0A00010B:SSL routines::wrong version number: connecting to a PLAINTEXT broker listener? (after 0ms in state SSL_HANDSHAKE)"
            ),
            Some("security_protocol")
        );
        assert_eq!(
            cause(
                "SASL handshake failed (start (-4)): SASL mechanism SCRAM-SHA-256 not supported by broker"
            ),
            Some("sasl_mechanism")
        );
        assert_eq!(
            cause("127.0.0.1:1/bootstrap: Connect to ipv4#127.0.0.1:1 failed: Connection refused"),
            None
        );
    }

    #[test]
    fn a_cause_is_reported_once_and_cleared_when_the_brokers_answer() {
        let health = ClientHealth::default();
        assert!(health.current().is_none());
        assert!(health.report("SASL authentication error: Authentication failed"));
        assert!(health.report("SASL authentication error: Authentication failed"));
        assert_eq!(health.current().unwrap().cause, "sasl_authentication");
        assert!(!health.current().unwrap().message.contains("hunter2"));
        health.clear();
        assert!(health.current().is_none());
    }

    #[test]
    fn secrets_are_redacted_in_debug() {
        let cli = Cli::parse_from([
            "x",
            "--kafka-security-protocol=sasl_ssl",
            "--kafka-sasl-mechanism=SCRAM-SHA-512",
            "--kafka-sasl-username=svc",
            "--kafka-sasl-password=pw-123",
            "--kafka-property=ssl.key.password=kp-456",
            "--kafka-property=linger.ms=5",
        ]);
        let debug = format!("{:?}", cli.kafka);
        assert!(
            !debug.contains("pw-123") && !debug.contains("kp-456"),
            "{debug}"
        );
        assert!(debug.contains("linger.ms=5"), "{debug}");
        cli.kafka.validate().unwrap();
        let mut config = cli.kafka.client_config();
        cli.kafka.apply_overrides(&mut config);
        assert_eq!(config.get("sasl.password"), Some("pw-123"));
        assert_eq!(config.get("ssl.key.password"), Some("kp-456"));
        assert_eq!(config.get("sasl.mechanism"), Some("SCRAM-SHA-512"));
    }

    #[test]
    fn sasl_without_credentials_is_refused() {
        let cli = Cli::parse_from([
            "x",
            "--kafka-security-protocol=sasl_ssl",
            "--kafka-sasl-mechanism=PLAIN",
        ]);
        assert!(
            cli.kafka
                .validate()
                .unwrap_err()
                .contains("HOOKPIPE_KAFKA_SASL_USERNAME")
        );
        let cli = Cli::parse_from(["x", "--kafka-sasl-mechanism=PLAIN"]);
        assert!(
            cli.kafka
                .validate()
                .unwrap_err()
                .contains("security protocol is plaintext")
        );
    }

    #[test]
    fn bad_property_is_refused() {
        assert!("novalue".parse::<Property>().is_err());
        assert_eq!("a.b=c=d".parse::<Property>().unwrap().value, "c=d");
    }
}
