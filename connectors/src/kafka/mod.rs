//! Kafka: the `kafka` source and sink, on rdkafka (librdkafka built from source, TLS through
//! OpenSSL, SASL, zstd).
//!
//! - [`source`]: consumer groups; raw messages with key, headers, partition, offset and
//!   timestamp for `normalize`; offsets stored only for records safely downstream
//!   (at-least-once), consumer lag as the source's backlog, readiness once assigned.
//! - [`sink`]: keyed by device, idempotent producer, compression; failed deliveries go to a
//!   dead-letter file, counted; optionally behind the store-and-forward [`buffer`].
//! - [`buffer`]: a bounded on-disk queue of records (segment files) that survives restarts.
//! - [`publisher`]: the blocking publisher of `tidewatch simulate --kafka` and the tests.
//!
//! The options both share (brokers, TLS, SASL, extra librdkafka properties) are one
//! [`KafkaClientOptions`], flattened into both configs. Every option is documented in `docs/reference/sources-and-sinks.md`,
//! the delivery guarantees in `docs/operations.md`.

pub mod buffer;
pub mod publisher;
pub mod sink;
pub mod source;

use std::collections::BTreeMap;
use std::path::PathBuf;

use rdkafka::ClientConfig;
use serde::Deserialize;
use tidewatch_api::{ComponentContext, ConfigError, Secret};

pub use crate::tls::TlsConfig;

pub use publisher::KafkaPublisher;
pub use sink::{KafkaSink, KafkaSinkConfig, KafkaSinkFactory};
pub use source::{KafkaSource, KafkaSourceConfig, KafkaSourceFactory};

/// SASL mechanisms.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
pub enum SaslMechanism {
    /// User name and password in clear (use it with TLS).
    #[serde(rename = "PLAIN")]
    Plain,
    /// SCRAM with SHA-256.
    #[serde(rename = "SCRAM-SHA-256")]
    ScramSha256,
    /// SCRAM with SHA-512.
    #[serde(rename = "SCRAM-SHA-512")]
    ScramSha512,
}

impl SaslMechanism {
    fn name(self) -> &'static str {
        match self {
            SaslMechanism::Plain => "PLAIN",
            SaslMechanism::ScramSha256 => "SCRAM-SHA-256",
            SaslMechanism::ScramSha512 => "SCRAM-SHA-512",
        }
    }
}

/// SASL authentication (the nested `sasl` table).
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KafkaSasl {
    /// `PLAIN`, `SCRAM-SHA-256` or `SCRAM-SHA-512`.
    pub mechanism: SaslMechanism,
    /// User name (usually `${KAFKA_USER}`).
    pub username: String,
    /// Password (usually `${KAFKA_PASSWORD}`). Never shown (`Secret`).
    pub password: Secret,
}

fn default_brokers() -> String {
    "127.0.0.1:9092".to_owned()
}

/// How a Kafka client reaches the brokers: the options the source and the sink share, at the
/// top level of either's table (`brokers`, and the `tls`, `sasl` and `librdkafka` tables).
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
pub struct KafkaClientOptions {
    /// Bootstrap brokers, `host:port[,host:port...]`.
    #[serde(default = "default_brokers")]
    pub brokers: String,
    /// TLS towards the brokers (the shared nested `tls` table); present (even empty) means
    /// TLS.
    #[serde(default)]
    pub tls: Option<TlsConfig>,
    /// SASL authentication (the nested `sasl` table).
    #[serde(default)]
    pub sasl: Option<KafkaSasl>,
    /// Further librdkafka properties, by name (`"socket.keepalive.enable" = "true"`); the
    /// options above win over them.
    #[serde(default)]
    pub librdkafka: BTreeMap<String, String>,
}

/// Properties tidewatch sets itself: not accepted in `librdkafka`.
const OWNED_PROPERTIES: &[&str] = &[
    "bootstrap.servers",
    "group.id",
    "enable.auto.commit",
    "enable.auto.offset.store",
    "enable.idempotence",
    "security.protocol",
    "sasl.mechanism",
    "sasl.username",
    "sasl.password",
    "ssl.ca.location",
    "ssl.certificate.location",
    "ssl.key.location",
];

/// Checks a broker list (`host:port[,host:port...]`).
pub(crate) fn validate_brokers(brokers: &str) -> Result<(), ConfigError> {
    let hint = "for example brokers = \"127.0.0.1:9092\" or \"${TIDEWATCH_KAFKA_BROKERS}\"";
    if brokers.trim().is_empty() {
        return Err(ConfigError::at_field("brokers", "brokers must name at least one broker")
            .with_hint(hint));
    }
    for broker in brokers.split(',') {
        let broker = broker.trim();
        let port = broker.rsplit_once(':').map(|(_, port)| port);
        if broker.contains("://") || port.and_then(|port| port.parse::<u16>().ok()).is_none() {
            return Err(ConfigError::at_field("brokers", format!("{broker:?} is not host:port"))
                .with_hint(hint));
        }
    }
    Ok(())
}

impl KafkaClientOptions {
    /// `brokers`, no TLS, no SASL, no extra properties.
    pub fn new(brokers: impl Into<String>) -> KafkaClientOptions {
        KafkaClientOptions {
            brokers: brokers.into(),
            tls: None,
            sasl: None,
            librdkafka: BTreeMap::new(),
        }
    }

    /// Checks the options beyond their types.
    pub fn validate(&self) -> Result<(), ConfigError> {
        validate_brokers(&self.brokers)?;
        if let Some(tls) = &self.tls {
            tls.validate(true, "")?;
        }
        for name in self.librdkafka.keys() {
            if OWNED_PROPERTIES.contains(&name.as_str()) {
                return Err(ConfigError::at_field(
                    "librdkafka",
                    format!("{name:?} is set by tidewatch from its own options"),
                )
                .with_hint("use brokers, group_id, the tls and sasl tables"));
            }
        }
        Ok(())
    }

    /// A librdkafka configuration for the brokers with the security options and the extra
    /// properties; paths resolve against the pipeline file's folder.
    pub(crate) fn client_config(&self, ctx: &ComponentContext) -> ClientConfig {
        let mut config = ClientConfig::new();
        for (name, value) in &self.librdkafka {
            config.set(name, value);
        }
        config.set("bootstrap.servers", &self.brokers);
        let protocol = match (&self.tls, &self.sasl) {
            (None, None) => "plaintext",
            (Some(_), None) => "ssl",
            (None, Some(_)) => "sasl_plaintext",
            (Some(_), Some(_)) => "sasl_ssl",
        };
        config.set("security.protocol", protocol);
        if let Some(tls) = &self.tls {
            let path =
                |path: &PathBuf| ctx.resolve_path(&path.to_string_lossy()).display().to_string();
            if let Some(ca) = &tls.ca_file {
                config.set("ssl.ca.location", path(ca));
            }
            if let Some(cert) = &tls.client_cert_file {
                config.set("ssl.certificate.location", path(cert));
            }
            if let Some(key) = &tls.client_key_file {
                config.set("ssl.key.location", path(key));
            }
        }
        if let Some(sasl) = &self.sasl {
            config.set("sasl.mechanism", sasl.mechanism.name());
            config.set("sasl.username", &sasl.username);
            config.set("sasl.password", sasl.password.expose());
        }
        config
    }
}

/// A Kafka error as text with its code, for error records and logs.
pub(crate) fn error_text(error: &rdkafka::error::KafkaError) -> String {
    error.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn broker_lists_are_checked() {
        assert!(validate_brokers("127.0.0.1:9092").is_ok());
        assert!(validate_brokers("a:9092, b:9093").is_ok());
        for bad in ["", "localhost", "kafka://a:9092", "a:x"] {
            assert_eq!(validate_brokers(bad).expect_err(bad).field.as_deref(), Some("brokers"));
        }
    }

    #[test]
    fn security_options_become_properties() {
        let tls = TlsConfig { ca_file: Some("ca.pem".into()), ..TlsConfig::default() };
        let sasl = KafkaSasl {
            mechanism: SaslMechanism::ScramSha512,
            username: "u".into(),
            password: "p-secret".into(),
        };
        let extra = BTreeMap::from([("socket.keepalive.enable".into(), "true".into())]);
        let connection = KafkaClientOptions {
            brokers: "h:9092".into(),
            tls: Some(tls),
            sasl: Some(sasl),
            librdkafka: extra,
        };
        assert!(connection.validate().is_ok());
        let config = connection.client_config(&ComponentContext::for_test("k", "kafka"));
        assert_eq!(config.get("bootstrap.servers"), Some("h:9092"));
        assert_eq!(config.get("security.protocol"), Some("sasl_ssl"));
        assert_eq!(config.get("sasl.mechanism"), Some("SCRAM-SHA-512"));
        assert_eq!(config.get("ssl.ca.location"), Some("./ca.pem"));
        assert_eq!(config.get("socket.keepalive.enable"), Some("true"));
        // The password reaches librdkafka, and nothing that prints the options.
        assert_eq!(config.get("sasl.password"), Some("p-secret"));
        assert!(!format!("{connection:?}").contains("p-secret"));
        let mut owned = KafkaClientOptions::new("h:9092");
        owned.librdkafka.insert("group.id".into(), "x".into());
        assert_eq!(owned.validate().expect_err("owned").field.as_deref(), Some("librdkafka"));
        let mut half = KafkaClientOptions::new("h:9092");
        half.tls =
            Some(TlsConfig { client_cert_file: Some("c.pem".into()), ..TlsConfig::default() });
        assert_eq!(
            half.validate().expect_err("half").field.as_deref(),
            Some("tls.client_key_file")
        );
    }
}
