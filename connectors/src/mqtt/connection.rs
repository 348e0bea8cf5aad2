//! What the MQTT source and sink share: the broker URL, protocol, identity, TLS and
//! credentials ([`ConnectionSettings`]), and one driver over rumqttc's 3.1.1 and 5 clients that
//! classifies connection errors and reconnects with exponential backoff.
//!
//! The typed configs of the source and the sink hold the connection options as one nested
//! table, [`MqttConnection`] (`[sources.<id>.connection]`), and the TLS files as another,
//! [`TlsConfig`] (`[sources.<id>.tls]`); [`ConnectionSettings::validate`] checks them the same
//! way for both. The flat names of before are accepted for one release
//! ([`MQTT_MOVED_OPTIONS`]).

use std::fmt;
use std::time::{Duration, Instant};

use bytes::Bytes;
use rumqttc::v5;
use serde::Deserialize;
use tidewatch_api::{ComponentContext, ComponentError, ConfigError, MovedOption, Secret};

use crate::tls::TlsConfig;

pub(crate) use crate::backoff::Backoff;

/// The MQTT protocol version.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Protocol {
    /// MQTT 3.1.1.
    V4,
    /// MQTT 5.
    #[default]
    V5,
}

/// A parsed broker URL: `mqtt://host[:port]` (plain, port 1883) or `mqtts://host[:port]`
/// (TLS, port 8883); `tcp://` and `ssl://`/`tls://` are accepted as aliases.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BrokerUrl {
    /// Host name or IP address (without brackets for IPv6).
    pub host: String,
    /// TCP port.
    pub port: u16,
    /// True for `mqtts://`.
    pub tls: bool,
}

impl fmt::Display for BrokerUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let scheme = if self.tls { "mqtts" } else { "mqtt" };
        if self.host.contains(':') {
            write!(f, "{scheme}://[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{scheme}://{}:{}", self.host, self.port)
        }
    }
}

impl BrokerUrl {
    /// Parses `mqtt://host[:port]` or `mqtts://host[:port]`.
    pub fn parse(url: &str) -> Result<BrokerUrl, String> {
        let url = url.trim();
        let (scheme, rest) = url.split_once("://").ok_or_else(|| {
            format!("{url:?} is not a broker URL (mqtt://host:port or mqtts://host:port)")
        })?;
        let tls = match scheme.to_ascii_lowercase().as_str() {
            "mqtt" | "tcp" => false,
            "mqtts" | "ssl" | "tls" => true,
            other => {
                return Err(format!(
                    "unsupported scheme `{other}` (use mqtt:// for plain TCP or mqtts:// for TLS)"
                ));
            }
        };
        let rest = rest.strip_suffix('/').unwrap_or(rest);
        if rest.contains('/') || rest.contains('?') || rest.contains('@') {
            return Err(format!(
                "{url:?}: a broker URL has only a host and a port (credentials go in username and password)"
            ));
        }
        let default_port = if tls { 8883 } else { 1883 };
        let (host, port) = if let Some(bracketed) = rest.strip_prefix('[') {
            let (host, after) = bracketed
                .split_once(']')
                .ok_or_else(|| format!("{url:?}: unterminated [ in the host"))?;
            let port = match after.strip_prefix(':') {
                Some(port) => Some(port),
                None if after.is_empty() => None,
                None => return Err(format!("{url:?}: unexpected text after the host")),
            };
            (host.to_owned(), port)
        } else {
            match rest.rsplit_once(':') {
                Some((host, port)) => (host.to_owned(), Some(port)),
                None => (rest.to_owned(), None),
            }
        };
        if host.is_empty() {
            return Err(format!("{url:?} has no host"));
        }
        let port = match port {
            None => default_port,
            Some(port) => port
                .parse::<u16>()
                .ok()
                .filter(|port| *port > 0)
                .ok_or_else(|| format!("{url:?}: {port:?} is not a port number"))?,
        };
        Ok(BrokerUrl { host, port, tls })
    }
}

/// The QoS of an MQTT message or subscription, as a number 0, 1 or 2.
pub(crate) fn check_qos(field: &str, qos: u8) -> Result<(), ConfigError> {
    if qos > 2 {
        return Err(ConfigError::at_field(field, format!("{field} must be 0, 1 or 2, not {qos}")));
    }
    Ok(())
}

/// The session expiry of MQTT 5 persistent sessions when `session_expiry_secs` is not set.
pub const DEFAULT_SESSION_EXPIRY_SECS: u32 = 86_400;

/// The shortest keep-alive rumqttc accepts on an MQTT 5 connection, in seconds.
pub const MIN_KEEP_ALIVE_V5_SECS: u64 = 5;

/// The options of the connection to the broker, the `connection` table of the `mqtt` source
/// and sink (the URL stays at the component's top level, the TLS files are in its `tls`
/// table):
///
/// ```toml
/// [sources.telemetry.connection]
/// client_id = "edge-1"
/// username = "${MQTT_USER}"
/// password = "${MQTT_PASSWORD}"
/// ```
///
/// Every option has a default, here and nowhere else ([`MqttConnection::default`]).
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MqttConnection {
    /// `v4` (MQTT 3.1.1) or `v5` (MQTT 5); default `v5`.
    pub protocol: Protocol,
    /// Client identifier; default `tidewatch-<pipeline>-<component>-<worker>`. The sink, and a
    /// source with shared subscriptions and several workers, append `-<worker>` to a given id.
    pub client_id: Option<String>,
    /// User name (usually `${MQTT_USER}`); empty means none.
    pub username: Option<String>,
    /// Password (usually `${MQTT_PASSWORD}`); empty means none. Never shown (`Secret`).
    pub password: Option<Secret>,
    /// Keep-alive interval, s; default 30. At least 5 with MQTT 5; with MQTT 3.1.1, 0
    /// disables pings.
    pub keep_alive_secs: u64,
    /// Start a new session at each connection (true), or resume the session the broker keeps
    /// for the client id (false: messages published while tidewatch was away are delivered,
    /// and publishes in flight at a disconnect are sent again); default false.
    pub clean_start: bool,
    /// MQTT 5: how long the broker keeps the session after a disconnect, s; default 86400
    /// (one day) with `clean_start = false`, 0 otherwise.
    pub session_expiry_secs: Option<u32>,
    /// How long the first connection may take (retrying while the broker is unreachable), s;
    /// default 10.
    pub connect_timeout_secs: u64,
    /// Delay before the first reconnect attempt after a lost connection, ms; it doubles at
    /// each failed attempt; default 100.
    pub reconnect_initial_ms: u64,
    /// Longest delay between reconnect attempts, ms; default 10000.
    pub reconnect_max_ms: u64,
    /// Largest MQTT packet sent or accepted, bytes; default 16 MiB (so that a message beyond
    /// `normalize`'s `max_message_bytes` reaches its error output instead of being dropped
    /// by the broker).
    pub max_packet_size_bytes: usize,
    /// Most outgoing QoS 1/2 publishes awaiting their acknowledgement (the sink); publishing
    /// waits beyond it; default 100.
    pub max_inflight: u16,
}

impl Default for MqttConnection {
    fn default() -> MqttConnection {
        MqttConnection {
            protocol: Protocol::V5,
            client_id: None,
            username: None,
            password: None,
            keep_alive_secs: 30,
            clean_start: false,
            session_expiry_secs: None,
            connect_timeout_secs: 10,
            reconnect_initial_ms: 100,
            reconnect_max_ms: 10_000,
            max_packet_size_bytes: 16 << 20,
            max_inflight: 100,
        }
    }
}

/// The connection and TLS options that the `mqtt` source and sink took at their top level
/// before the `connection` and `tls` tables; still accepted there for one release.
pub const MQTT_MOVED_OPTIONS: &[MovedOption] = &[
    MovedOption { key: "protocol", table: "connection" },
    MovedOption { key: "client_id", table: "connection" },
    MovedOption { key: "username", table: "connection" },
    MovedOption { key: "password", table: "connection" },
    MovedOption { key: "keep_alive_secs", table: "connection" },
    MovedOption { key: "clean_start", table: "connection" },
    MovedOption { key: "session_expiry_secs", table: "connection" },
    MovedOption { key: "connect_timeout_secs", table: "connection" },
    MovedOption { key: "reconnect_initial_ms", table: "connection" },
    MovedOption { key: "reconnect_max_ms", table: "connection" },
    MovedOption { key: "max_packet_size_bytes", table: "connection" },
    MovedOption { key: "max_inflight", table: "connection" },
    MovedOption { key: "ca_file", table: "tls" },
    MovedOption { key: "client_cert_file", table: "tls" },
    MovedOption { key: "client_key_file", table: "tls" },
];

impl MqttConnection {
    /// The session expiry to ask for: on MQTT 5 the configured one or the default for
    /// `clean_start`; on 3.1.1 none (the broker decides).
    pub fn session_expiry(&self) -> Option<u32> {
        match self.protocol {
            Protocol::V5 => Some(self.session_expiry_secs.unwrap_or(if self.clean_start {
                0
            } else {
                DEFAULT_SESSION_EXPIRY_SECS
            })),
            Protocol::V4 => self.session_expiry_secs,
        }
    }

    /// The client id of an instance: the configured one (with `-<worker>` appended when
    /// `per_worker`), or `tidewatch-<pipeline>-<component>-<worker>`.
    pub(crate) fn client_id_for(&self, ctx: &ComponentContext, per_worker: bool) -> String {
        let worker = ctx.worker_index.to_string();
        match &self.client_id {
            Some(id) if per_worker => format!("{id}-{worker}"),
            Some(id) => id.clone(),
            None => client_id_of(&["tidewatch", &ctx.pipeline.name, &ctx.component_id, &worker]),
        }
    }

    /// Checks the options beyond their types; errors name the option as `connection.<name>`.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.keep_alive_secs > u64::from(u16::MAX) {
            return Err(ConfigError::at_field(
                "connection.keep_alive_secs",
                format!("keep_alive_secs must be at most {}", u16::MAX),
            ));
        }
        if self.protocol == Protocol::V5 && self.keep_alive_secs < MIN_KEEP_ALIVE_V5_SECS {
            return Err(ConfigError::at_field(
                "connection.keep_alive_secs",
                format!(
                    "keep_alive_secs must be at least {MIN_KEEP_ALIVE_V5_SECS} with protocol = \"v5\" (the MQTT client's bound)"
                ),
            )
            .with_hint("raise it, or set protocol = \"v4\" (where 0 turns keep-alive off)"));
        }
        if self.protocol == Protocol::V4 && self.session_expiry_secs.is_some() {
            return Err(ConfigError::at_field(
                "connection.session_expiry_secs",
                "session_expiry_secs is an MQTT 5 option",
            )
            .with_hint("set protocol = \"v5\", or remove session_expiry_secs (MQTT 3.1.1 brokers keep persistent sessions by their own settings)"));
        }
        let username = self.username.as_deref().filter(|name| !name.is_empty());
        if self.password.as_ref().is_some_and(|password| !password.is_empty()) && username.is_none()
        {
            return Err(ConfigError::at_field(
                "connection.password",
                "password is set without username",
            ));
        }
        if self.connect_timeout_secs == 0 {
            return Err(ConfigError::at_field(
                "connection.connect_timeout_secs",
                "connect_timeout_secs must be at least 1",
            ));
        }
        if self.reconnect_initial_ms == 0 {
            return Err(ConfigError::at_field(
                "connection.reconnect_initial_ms",
                "reconnect_initial_ms must be at least 1",
            ));
        }
        if self.reconnect_max_ms < self.reconnect_initial_ms {
            return Err(ConfigError::at_field(
                "connection.reconnect_max_ms",
                "reconnect_max_ms must not be below reconnect_initial_ms",
            ));
        }
        if !(64..=268_435_455).contains(&self.max_packet_size_bytes) {
            return Err(ConfigError::at_field(
                "connection.max_packet_size_bytes",
                "max_packet_size_bytes must be between 64 and 268435455 (the MQTT limit)",
            ));
        }
        if self.max_inflight == 0 {
            return Err(ConfigError::at_field(
                "connection.max_inflight",
                "max_inflight must be at least 1",
            ));
        }
        Ok(())
    }
}

/// Everything needed to connect to a broker, shared by the source, the sink and
/// `tidewatch simulate`: the URL, the client id, the [`MqttConnection`] options and the
/// [`TlsConfig`] with absolute paths.
#[derive(Clone, Debug, PartialEq)]
pub struct ConnectionSettings {
    /// Broker URL.
    pub url: String,
    /// The client identifier of this connection.
    pub client_id: String,
    /// Protocol, credentials, session, timeouts (its `client_id` is not used: see above).
    pub connection: MqttConnection,
    /// The TLS files, for `mqtts://` URLs.
    pub tls: TlsConfig,
    /// MQTT 5: most incoming QoS 1/2 messages the broker may have unacknowledged at once
    /// (the CONNECT's receive maximum); `None` = the protocol's 65535.
    pub receive_maximum: Option<u16>,
}

impl ConnectionSettings {
    /// Settings for `url` with every other option at its default ([`MqttConnection`]).
    pub fn new(url: impl Into<String>, client_id: impl Into<String>) -> ConnectionSettings {
        ConnectionSettings {
            url: url.into(),
            client_id: client_id.into(),
            connection: MqttConnection::default(),
            tls: TlsConfig::default(),
            receive_maximum: None,
        }
    }

    /// The settings of a component's instance: its `url`, `connection` and `tls` options
    /// (paths made absolute by `resolve`) and the instance's client id.
    pub fn configured(
        url: &str,
        client_id: String,
        connection: &MqttConnection,
        tls: &TlsConfig,
        resolve: impl Fn(&str) -> std::path::PathBuf,
    ) -> ConnectionSettings {
        ConnectionSettings {
            url: url.to_owned(),
            client_id,
            connection: connection.clone(),
            tls: tls.resolved(resolve),
            receive_maximum: None,
        }
    }

    /// The parsed URL.
    pub fn broker(&self) -> Result<BrokerUrl, String> {
        BrokerUrl::parse(&self.url)
    }

    /// Checks the options beyond their types; errors name the option (`url`,
    /// `connection.<name>`, `tls.<name>`).
    pub fn validate(&self) -> Result<(), ConfigError> {
        let broker = self.broker().map_err(|message| {
            ConfigError::at_field("url", message)
                .with_hint("for example url = \"mqtt://127.0.0.1:1883\" or \"mqtts://broker:8883\"")
        })?;
        if self.client_id.is_empty() || self.client_id.len() > 65_535 {
            return Err(ConfigError::at_field(
                "connection.client_id",
                "client_id must not be empty",
            ));
        }
        self.connection.validate()?;
        self.tls.validate(broker.tls, "use an mqtts:// url")
    }

    /// A rumqttc client and event loop for these settings.
    pub(crate) fn link(
        &self,
        manual_acks: bool,
        request_capacity: usize,
    ) -> Result<(LinkClient, LinkLoop), ComponentError> {
        let broker = self.broker().map_err(ComponentError::Config)?;
        let transport = if broker.tls {
            rumqttc::Transport::tls_with_config(rumqttc::TlsConfiguration::Rustls(
                self.tls.client_config()?,
            ))
        } else {
            rumqttc::Transport::tcp()
        };
        // Whole seconds, or zero (no pings), as rumqttc requires.
        let options = &self.connection;
        let keep_alive = Duration::from_secs(options.keep_alive_secs);
        // Empty means none, so that `${MQTT_USER:-}` works in pipeline files.
        let username = options.username.clone().filter(|name| !name.is_empty());
        let password = options
            .password
            .as_ref()
            .filter(|password| !password.is_empty())
            .map(|password| password.expose().to_owned());
        let capacity = request_capacity.max(1);
        match options.protocol {
            Protocol::V4 => {
                let mut mqtt =
                    rumqttc::MqttOptions::new(self.client_id.clone(), broker.host, broker.port);
                mqtt.set_transport(transport)
                    .set_keep_alive(keep_alive)
                    .set_clean_session(options.clean_start)
                    .set_manual_acks(manual_acks)
                    .set_inflight(options.max_inflight)
                    .set_max_packet_size(
                        options.max_packet_size_bytes,
                        options.max_packet_size_bytes,
                    );
                if let Some(username) = username {
                    mqtt.set_credentials(username, password.unwrap_or_default());
                }
                let (client, mut eventloop) = rumqttc::AsyncClient::new(mqtt, capacity);
                eventloop.set_network_options(network_options(options.connect_timeout_secs));
                Ok((LinkClient::V4(client), LinkLoop::V4(Box::new(eventloop))))
            }
            Protocol::V5 => {
                let mut mqtt =
                    v5::MqttOptions::new(self.client_id.clone(), broker.host, broker.port);
                mqtt.set_transport(transport)
                    .set_keep_alive(keep_alive)
                    .set_clean_start(options.clean_start)
                    .set_manual_acks(manual_acks)
                    .set_connection_timeout(options.connect_timeout_secs)
                    .set_network_options(network_options(options.connect_timeout_secs))
                    .set_outgoing_inflight_upper_limit(options.max_inflight)
                    .set_max_packet_size(Some(options.max_packet_size_bytes as u32))
                    .set_session_expiry_interval(options.session_expiry())
                    .set_receive_maximum(self.receive_maximum);
                if let Some(username) = username {
                    mqtt.set_credentials(username, password.unwrap_or_default());
                }
                let (client, eventloop) = v5::AsyncClient::new(mqtt, capacity);
                Ok((LinkClient::V5(client), LinkLoop::V5(Box::new(eventloop))))
            }
        }
    }
}

/// The socket options of every MQTT connection: the connect timeout, and no Nagle delay (a
/// lone command or acknowledgement would otherwise wait for the broker's delayed ACK, 40 ms on
/// Linux; the client writes whole batches of packets anyway).
fn network_options(connect_timeout_secs: u64) -> rumqttc::NetworkOptions {
    let mut network = rumqttc::NetworkOptions::new();
    network.set_connection_timeout(connect_timeout_secs);
    network.set_tcp_nodelay(true);
    network
}

/// A client id made of `parts`, with every character MQTT brokers may dislike replaced by `-`.
pub(crate) fn client_id_of(parts: &[&str]) -> String {
    let joined = parts.join("-");
    joined
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() || c == '-' || c == '_' { c } else { '-' })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// One interface over the 3.1.1 and 5 clients
// ---------------------------------------------------------------------------------------------

fn qos4(qos: u8) -> rumqttc::QoS {
    match qos {
        0 => rumqttc::QoS::AtMostOnce,
        1 => rumqttc::QoS::AtLeastOnce,
        _ => rumqttc::QoS::ExactlyOnce,
    }
}

fn qos5(qos: u8) -> v5::mqttbytes::QoS {
    match qos {
        0 => v5::mqttbytes::QoS::AtMostOnce,
        1 => v5::mqttbytes::QoS::AtLeastOnce,
        _ => v5::mqttbytes::QoS::ExactlyOnce,
    }
}

/// The request side of a connection (cheap to clone).
#[derive(Clone, Debug)]
pub(crate) enum LinkClient {
    V4(rumqttc::AsyncClient),
    V5(v5::AsyncClient),
}

impl LinkClient {
    /// Acknowledges an incoming QoS 1 (PUBACK) or QoS 2 (PUBREC) message.
    pub(crate) async fn ack(&self, qos: u8, pkid: u16) -> Result<(), String> {
        match self {
            LinkClient::V4(client) => {
                let mut publish = rumqttc::Publish::new("", qos4(qos), Vec::new());
                publish.pkid = pkid;
                client.ack(&publish).await.map_err(|error| error.to_string())
            }
            LinkClient::V5(client) => {
                let mut publish = v5::mqttbytes::v5::Publish::new("", qos5(qos), Vec::new(), None);
                publish.pkid = pkid;
                client.ack(&publish).await.map_err(|error| error.to_string())
            }
        }
    }

    /// Subscribes to every filter at `qos`.
    pub(crate) async fn subscribe(&self, filters: &[String], qos: u8) -> Result<(), String> {
        match self {
            LinkClient::V4(client) => client
                .subscribe_many(
                    filters
                        .iter()
                        .map(|path| rumqttc::SubscribeFilter::new(path.clone(), qos4(qos))),
                )
                .await
                .map_err(|error| error.to_string()),
            LinkClient::V5(client) => client
                .subscribe_many(
                    filters
                        .iter()
                        .map(|path| v5::mqttbytes::v5::Filter::new(path.clone(), qos5(qos))),
                )
                .await
                .map_err(|error| error.to_string()),
        }
    }

    /// Publishes one message (waits while the request queue is full).
    pub(crate) async fn publish(
        &self,
        topic: String,
        qos: u8,
        retain: bool,
        payload: Bytes,
    ) -> Result<(), String> {
        match self {
            LinkClient::V4(client) => client
                .publish_bytes(topic, qos4(qos), retain, payload)
                .await
                .map_err(|error| error.to_string()),
            LinkClient::V5(client) => client
                .publish_bytes(topic, qos5(qos), retain, payload)
                .await
                .map_err(|error| error.to_string()),
        }
    }

    /// Sends DISCONNECT after every request queued before it.
    pub(crate) async fn disconnect(&self) -> Result<(), String> {
        match self {
            LinkClient::V4(client) => client.disconnect().await.map_err(|error| error.to_string()),
            LinkClient::V5(client) => client.disconnect().await.map_err(|error| error.to_string()),
        }
    }
}

/// An incoming application message.
#[derive(Clone, Debug)]
pub(crate) struct Delivery {
    pub(crate) topic: Bytes,
    pub(crate) payload: Bytes,
    pub(crate) qos: u8,
    pub(crate) pkid: u16,
    pub(crate) dup: bool,
}

/// What the event loop reports, for both protocol versions.
#[derive(Debug)]
pub(crate) enum NetEvent {
    /// A connection was accepted.
    Connected { session_present: bool },
    /// An application message.
    Message(Delivery),
    /// The answer to a SUBSCRIBE: the refused filters' reasons (empty when all were granted).
    SubAck { refused: Vec<String> },
    /// A QoS 1 publish of ours was acknowledged (`no_subscribers`: MQTT 5 reason 0x10).
    PubAck { no_subscribers: bool },
    /// A QoS 2 publish of ours completed.
    PubComp,
    /// A publish of ours went out (`pkid` 0 for QoS 0).
    PublishSent { pkid: u16 },
    /// We completed the broker's QoS 2 delivery `pkid` (PUBCOMP sent).
    PubCompSent { pkid: u16 },
    /// Our DISCONNECT went out.
    DisconnectSent,
    /// Anything else (pings, acks of ours).
    Other,
}

/// A connection error, classified.
#[derive(Debug)]
pub(crate) struct NetError {
    /// What happened, for people.
    pub(crate) message: String,
    /// Retrying with the same settings cannot help (refused credentials, untrusted certificate).
    pub(crate) permanent: bool,
    /// The broker released a QoS 2 message rumqttc no longer knows (after a reconnect).
    pub(crate) unsolicited: Option<u16>,
    /// The request channel is closed: the client side is gone.
    pub(crate) closed: bool,
}

fn refused4(code: rumqttc::ConnectReturnCode) -> (String, bool) {
    use rumqttc::ConnectReturnCode as Code;
    let reason = match code {
        Code::BadUserNamePassword => "bad user name or password",
        Code::NotAuthorized => "not authorized (check username and password)",
        Code::BadClientId => "client id rejected",
        Code::RefusedProtocolVersion => "protocol version refused (try protocol = \"v4\")",
        Code::ServiceUnavailable => "service unavailable",
        Code::Success => "success",
    };
    let permanent = !matches!(code, Code::ServiceUnavailable);
    (format!("the broker refused the connection: {reason}"), permanent)
}

fn refused5(code: v5::mqttbytes::v5::ConnectReturnCode) -> (String, bool) {
    use v5::mqttbytes::v5::ConnectReturnCode as Code;
    let reason = match code {
        Code::BadUserNamePassword => "bad user name or password".to_owned(),
        Code::NotAuthorized => "not authorized (check username and password)".to_owned(),
        Code::ClientIdentifierNotValid | Code::BadClientId => "client id rejected".to_owned(),
        Code::UnsupportedProtocolVersion | Code::RefusedProtocolVersion => {
            "protocol version refused (try protocol = \"v4\")".to_owned()
        }
        other => format!("{other:?}"),
    };
    let permanent = !matches!(
        code,
        Code::ServerUnavailable
            | Code::ServiceUnavailable
            | Code::ServerBusy
            | Code::ConnectionRateExceeded
            | Code::QuotaExceeded
    );
    (format!("the broker refused the connection: {reason}"), permanent)
}

fn tls_message(error: &impl fmt::Display) -> String {
    let text = error.to_string();
    let hint = if text.contains("UnknownIssuer") || text.contains("invalid peer certificate") {
        " (the broker's certificate is not signed by a CA in ca_file)"
    } else if text.contains("NotValidForName") {
        " (the broker's certificate does not name the url's host)"
    } else {
        ""
    };
    format!("TLS handshake failed: {text}{hint}")
}

/// The driving side of a connection.
pub(crate) enum LinkLoop {
    V4(Box<rumqttc::EventLoop>),
    V5(Box<v5::EventLoop>),
}

impl fmt::Debug for LinkLoop {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LinkLoop::V4(_) => f.write_str("LinkLoop::V4"),
            LinkLoop::V5(_) => f.write_str("LinkLoop::V5"),
        }
    }
}

impl LinkLoop {
    /// The next event; on an error the connection is dropped, and the next call reconnects.
    pub(crate) async fn poll(&mut self) -> Result<NetEvent, NetError> {
        match self {
            LinkLoop::V4(eventloop) => eventloop.poll().await.map(event4).map_err(error4),
            LinkLoop::V5(eventloop) => eventloop.poll().await.map(event5).map_err(error5),
        }
    }

    /// Makes rumqttc know the broker's QoS 2 delivery `pkid` again after a reconnect (rumqttc
    /// forgets them and would treat the broker's PUBREL as a protocol error, rumqtt issue #664),
    /// so that it answers the PUBREL with PUBCOMP.
    pub(crate) fn remember_qos2(&mut self, pkid: u16) {
        match self {
            LinkLoop::V4(eventloop) => {
                let mut publish = rumqttc::Publish::new("", rumqttc::QoS::ExactlyOnce, Vec::new());
                publish.pkid = pkid;
                let before = eventloop.state.events.len();
                let _ = eventloop.state.handle_incoming_packet(rumqttc::Packet::Publish(publish));
                eventloop.state.events.truncate(before);
            }
            LinkLoop::V5(eventloop) => {
                let mut publish = v5::mqttbytes::v5::Publish::new(
                    "",
                    v5::mqttbytes::QoS::ExactlyOnce,
                    Vec::new(),
                    None,
                );
                publish.pkid = pkid;
                publish.topic = Bytes::from_static(b"-");
                let before = eventloop.state.events.len();
                let _ = eventloop
                    .state
                    .handle_incoming_packet(v5::mqttbytes::v5::Packet::Publish(publish));
                eventloop.state.events.truncate(before);
            }
        }
    }
}

fn event4(event: rumqttc::Event) -> NetEvent {
    use rumqttc::{Event, Outgoing, Packet};
    match event {
        Event::Incoming(Packet::ConnAck(connack)) => {
            NetEvent::Connected { session_present: connack.session_present }
        }
        Event::Incoming(Packet::Publish(publish)) => NetEvent::Message(Delivery {
            topic: Bytes::from(publish.topic.into_bytes()),
            payload: publish.payload,
            qos: publish.qos as u8,
            pkid: publish.pkid,
            dup: publish.dup,
        }),
        Event::Incoming(Packet::SubAck(suback)) => NetEvent::SubAck {
            refused: suback
                .return_codes
                .iter()
                .filter(|code| matches!(code, rumqttc::SubscribeReasonCode::Failure))
                .map(|_| "refused".to_owned())
                .collect(),
        },
        Event::Incoming(Packet::PubAck(_)) => NetEvent::PubAck { no_subscribers: false },
        Event::Incoming(Packet::PubComp(_)) => NetEvent::PubComp,
        Event::Outgoing(Outgoing::Publish(pkid)) => NetEvent::PublishSent { pkid },
        Event::Outgoing(Outgoing::PubComp(pkid)) => NetEvent::PubCompSent { pkid },
        Event::Outgoing(Outgoing::Disconnect) => NetEvent::DisconnectSent,
        _ => NetEvent::Other,
    }
}

fn event5(event: v5::Event) -> NetEvent {
    use rumqttc::Outgoing;
    use v5::Event;
    use v5::mqttbytes::v5::{Packet, PubAckReason, SubscribeReasonCode};
    match event {
        Event::Incoming(Packet::ConnAck(connack)) => {
            NetEvent::Connected { session_present: connack.session_present }
        }
        Event::Incoming(Packet::Publish(publish)) => NetEvent::Message(Delivery {
            topic: publish.topic,
            payload: publish.payload,
            qos: publish.qos as u8,
            pkid: publish.pkid,
            dup: publish.dup,
        }),
        Event::Incoming(Packet::SubAck(suback)) => NetEvent::SubAck {
            refused: suback
                .return_codes
                .iter()
                .filter(|code| !matches!(code, SubscribeReasonCode::Success(_)))
                .map(|code| format!("{code:?}"))
                .collect(),
        },
        Event::Incoming(Packet::PubAck(puback)) => NetEvent::PubAck {
            no_subscribers: puback.reason == PubAckReason::NoMatchingSubscribers,
        },
        Event::Incoming(Packet::PubComp(_)) => NetEvent::PubComp,
        Event::Outgoing(Outgoing::Publish(pkid)) => NetEvent::PublishSent { pkid },
        Event::Outgoing(Outgoing::PubComp(pkid)) => NetEvent::PubCompSent { pkid },
        Event::Outgoing(Outgoing::Disconnect) => NetEvent::DisconnectSent,
        _ => NetEvent::Other,
    }
}

fn error4(error: rumqttc::ConnectionError) -> NetError {
    use rumqttc::{ConnectionError, StateError};
    let mut unsolicited = None;
    let (message, permanent) = match &error {
        ConnectionError::ConnectionRefused(code) => refused4(*code),
        ConnectionError::Tls(tls) => (tls_message(tls), true),
        ConnectionError::MqttState(StateError::Unsolicited(pkid)) => {
            unsolicited = Some(*pkid);
            (error.to_string(), false)
        }
        ConnectionError::MqttState(StateError::Io(io)) => (format!("connection lost: {io}"), false),
        ConnectionError::Io(io) => (format!("cannot connect: {io}"), false),
        ConnectionError::NetworkTimeout => ("connection timed out".to_owned(), false),
        other => (other.to_string(), false),
    };
    let closed = matches!(error, ConnectionError::RequestsDone);
    NetError { message, permanent, unsolicited, closed }
}

fn error5(error: v5::ConnectionError) -> NetError {
    use v5::{ConnectionError, StateError};
    let mut unsolicited = None;
    let (message, permanent) = match &error {
        ConnectionError::ConnectionRefused(code) => refused5(*code),
        ConnectionError::MqttState(StateError::ConnFail { reason }) => refused5(*reason),
        ConnectionError::Tls(tls) => (tls_message(tls), true),
        ConnectionError::MqttState(StateError::Unsolicited(pkid)) => {
            unsolicited = Some(*pkid);
            (error.to_string(), false)
        }
        ConnectionError::MqttState(StateError::Io(io)) => (format!("connection lost: {io}"), false),
        ConnectionError::MqttState(StateError::ServerDisconnect { reason_code, reason_string }) => {
            (
                format!(
                    "the broker closed the connection: {reason_code:?}{}",
                    reason_string.as_deref().map(|text| format!(" ({text})")).unwrap_or_default()
                ),
                false,
            )
        }
        ConnectionError::Io(io) => (format!("cannot connect: {io}"), false),
        ConnectionError::Timeout(_) => ("connection timed out".to_owned(), false),
        other => (other.to_string(), false),
    };
    let closed = matches!(error, ConnectionError::RequestsDone);
    NetError { message, permanent, unsolicited, closed }
}

/// Waits for the first CONNACK: retries connection failures that may pass (the broker not up
/// yet) until `connect_timeout_secs`, and gives up at once on a permanent refusal.
pub(crate) async fn first_connection(
    eventloop: &mut LinkLoop,
    settings: &ConnectionSettings,
) -> Result<bool, String> {
    let options = &settings.connection;
    let deadline = Instant::now() + Duration::from_secs(options.connect_timeout_secs);
    let mut backoff =
        Backoff::new(options.reconnect_initial_ms, options.reconnect_max_ms).with_jitter();
    loop {
        match eventloop.poll().await {
            Ok(NetEvent::Connected { session_present }) => return Ok(session_present),
            Ok(_) => {}
            Err(error) if error.permanent || error.closed => return Err(error.message),
            Err(error) => {
                let now = Instant::now();
                if now >= deadline {
                    return Err(format!(
                        "{} (gave up after {} s)",
                        error.message, options.connect_timeout_secs
                    ));
                }
                let delay = backoff.next_delay().min(deadline - now);
                tokio::time::sleep(delay).await;
            }
        }
    }
}

/// A current-thread tokio runtime for one connection's thread.
pub(crate) fn runtime() -> Result<tokio::runtime::Runtime, ComponentError> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|error| ComponentError::io("cannot start the MQTT network runtime", error))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn broker_urls_parse() {
        assert_eq!(
            BrokerUrl::parse("mqtt://127.0.0.1:1883").expect("url"),
            BrokerUrl { host: "127.0.0.1".into(), port: 1883, tls: false }
        );
        assert_eq!(
            BrokerUrl::parse("mqtts://broker.example").expect("url"),
            BrokerUrl { host: "broker.example".into(), port: 8883, tls: true }
        );
        assert_eq!(
            BrokerUrl::parse("mqtt://[::1]:1884/").expect("url"),
            BrokerUrl { host: "::1".into(), port: 1884, tls: false }
        );
        assert_eq!(BrokerUrl::parse("tcp://h").expect("url").port, 1883);
        for bad in [
            "127.0.0.1:1883",
            "http://h",
            "mqtt://",
            "mqtt://h:0",
            "mqtt://h:x",
            "mqtt://u:p@h",
            "mqtt://h/t",
        ] {
            assert!(BrokerUrl::parse(bad).is_err(), "{bad}");
        }
        let url = BrokerUrl::parse("mqtts://[::1]").expect("url");
        assert_eq!(url.to_string(), "mqtts://[::1]:8883");
    }

    #[test]
    fn settings_are_checked() {
        let ok = ConnectionSettings::new("mqtt://127.0.0.1", "c");
        assert!(ok.validate().is_ok());
        let with = |change: fn(&mut ConnectionSettings)| {
            let mut settings = ok.clone();
            change(&mut settings);
            settings
        };
        let cases: Vec<(ConnectionSettings, &str)> = vec![
            (with(|s| s.url = "nope".into()), "url"),
            (with(|s| s.tls.ca_file = Some("ca.crt".into())), "tls.ca_file"),
            (
                with(|s| {
                    s.url = "mqtts://h".into();
                    s.tls.client_cert_file = Some("c.crt".into());
                }),
                "tls.client_key_file",
            ),
            (
                with(|s| {
                    s.connection.protocol = Protocol::V4;
                    s.connection.session_expiry_secs = Some(5);
                }),
                "connection.session_expiry_secs",
            ),
            (with(|s| s.connection.password = Some(Secret::from("p"))), "connection.password"),
            (with(|s| s.connection.reconnect_max_ms = 1), "connection.reconnect_max_ms"),
            (with(|s| s.connection.connect_timeout_secs = 0), "connection.connect_timeout_secs"),
            (with(|s| s.connection.max_inflight = 0), "connection.max_inflight"),
        ];
        for (settings, field) in cases {
            let error = settings.validate().expect_err(field);
            assert_eq!(error.field.as_deref(), Some(field));
        }
    }

    #[test]
    fn session_expiry_follows_clean_start_on_mqtt_5() {
        let mut connection = MqttConnection::default();
        assert_eq!(connection.session_expiry(), Some(DEFAULT_SESSION_EXPIRY_SECS));
        connection.clean_start = true;
        assert_eq!(connection.session_expiry(), Some(0));
        connection.session_expiry_secs = Some(60);
        assert_eq!(connection.session_expiry(), Some(60));
        connection.protocol = Protocol::V4;
        connection.session_expiry_secs = None;
        assert_eq!(connection.session_expiry(), None);
    }

    #[test]
    fn client_ids_are_sanitized() {
        assert_eq!(
            client_id_of(&["tidewatch", "edge mqtt", "in/1", "0"]),
            "tidewatch-edge-mqtt-in-1-0"
        );
    }
}
