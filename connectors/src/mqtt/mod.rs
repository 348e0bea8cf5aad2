//! MQTT: the `mqtt` source and sink, on rumqttc (MQTT 3.1.1 and 5, TLS with rustls).
//!
//! - [`source`]: subscribes to topic filters (wildcards, shared subscriptions) and emits raw
//!   messages; QoS 1/2 messages are acknowledged only once their records are safely
//!   downstream (at-least-once), through the [`tidewatch_api::AckToken`] of each batch.
//! - [`sink`]: publishes every record as JSON to a topic template with `{device}`.
//! - [`connection`]: the options both share (URL, protocol, identity, TLS, credentials,
//!   reconnect backoff) and one driver over rumqttc's two protocol versions.
//! - [`publisher`]: the blocking publisher behind the sink and `tidewatch simulate`.
//!
//! The options are documented in `docs/reference/sources-and-sinks.md`, the delivery
//! guarantee in `docs/operations.md`.

pub mod connection;
pub mod publisher;
pub mod sink;
pub mod source;

pub use connection::{BrokerUrl, ConnectionSettings, MqttConnection, Protocol};
pub use publisher::{MqttPublisher, PublisherStats};
pub use sink::{MqttSink, MqttSinkConfig, MqttSinkFactory};
pub use source::{MqttSource, MqttSourceConfig, MqttSourceFactory};
