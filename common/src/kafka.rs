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
            .set("security.protocol", &self.security_protocol);
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
