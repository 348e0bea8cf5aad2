//! The `mqtt` sink: publishes every record as one JSON object (the JSON-lines encoding of the
//! `stdout` and `file` sinks) to a topic made from a template with `{device}`; or, with a
//! `payload` template, one message per anomaly event made from the event's fields (a command
//! to the device, for a feedback loop).
//!
//! Each worker's instance has its own connection (client id `...-<worker>`). Publishing blocks
//! while `max_inflight` QoS 1/2 messages await their ack, which slows the pipeline to what
//! the broker takes. `flush` (at the end of the pipeline) waits, up to `flush_timeout_secs`,
//! until every message was acknowledged. The session is persistent (unless
//! `connection.clean_start`), so publishes in flight when the connection drops are sent again
//! after the reconnect.

use std::time::Duration;

use serde::Deserialize;
use tidewatch_api::json::write_json_lines;
use tidewatch_api::template::{
    EVENT_FIELDS, Escape, JSON_TEMPLATE_HINT, Template, check_renders_json, sample_event,
    write_event_field,
};
use tidewatch_api::{
    AnomalyEvent, Batch, ComponentContext, ComponentError, ConfigError, DeviceId, Kind,
    MovedOption, Sink, SinkFactory, ValidateContext,
};

use super::connection::{ConnectionSettings, MQTT_MOVED_OPTIONS, MqttConnection, check_qos};
use super::publisher::MqttPublisher;
use crate::sinks::record_devices;
use crate::tls::TlsConfig;

fn default_qos() -> u8 {
    1
}
fn default_flush_timeout_secs() -> u64 {
    10
}

/// What `{device}` becomes for records without a device (raw messages, errors).
pub const NO_DEVICE: &str = "_";

/// The fields of the topic template.
const TOPIC_FIELDS: &[&str] = &["device"];

/// Options of the `mqtt` sink.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MqttSinkConfig {
    /// Broker URL: `mqtt://host:port` or `mqtts://host:port`.
    pub url: String,
    /// Topic of each record; `{device}` is replaced with the record's device (`_` for records
    /// without one), for example `devices/{device}/commands`.
    pub topic: String,
    /// The message of each anomaly event, a template over [`EVENT_FIELDS`] whose values are
    /// escaped for JSON strings, for example `{"command": "{state}", "score": {score}}`; none:
    /// the record's JSON object. With a payload the sink accepts only anomaly events.
    #[serde(default)]
    pub payload: Option<String>,
    /// QoS of the publishes: 0, 1 or 2.
    #[serde(default = "default_qos")]
    pub qos: u8,
    /// Publish with the retain flag (the broker keeps the last message of each topic for new
    /// subscribers).
    #[serde(default)]
    pub retain: bool,
    /// The connection options: protocol, client id (`-<worker>` is appended), credentials,
    /// session, timeouts, reconnect backoff, `max_inflight`.
    #[serde(default)]
    pub connection: MqttConnection,
    /// The TLS files of an `mqtts://` connection.
    #[serde(default)]
    pub tls: TlsConfig,
    /// How long a flush (at the end of the pipeline) waits for the acknowledgements, s.
    #[serde(default = "default_flush_timeout_secs")]
    pub flush_timeout_secs: u64,
}

impl MqttSinkConfig {
    /// A config publishing to `topic` on `url`, every other option at its default.
    pub fn new(url: impl Into<String>, topic: impl Into<String>) -> MqttSinkConfig {
        MqttSinkConfig {
            url: url.into(),
            topic: topic.into(),
            payload: None,
            qos: default_qos(),
            retain: false,
            connection: MqttConnection::default(),
            tls: TlsConfig::default(),
            flush_timeout_secs: default_flush_timeout_secs(),
        }
    }

    /// The connection settings of one instance.
    pub fn settings(
        &self,
        client_id: String,
        resolve: impl Fn(&str) -> std::path::PathBuf,
    ) -> ConnectionSettings {
        ConnectionSettings::configured(&self.url, client_id, &self.connection, &self.tls, resolve)
    }

    /// Checks the options beyond their types.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let client_id = self.connection.client_id.clone().unwrap_or_else(|| "tidewatch".to_owned());
        self.settings(client_id, |path: &str| std::path::PathBuf::from(path)).validate()?;
        check_qos("qos", self.qos)?;
        let templates = self.templates()?;
        if templates.payload.is_some() {
            // A JSON command must render JSON: try it on a sample event.
            let rendered = templates.payload(&sample_event());
            if rendered.trim_start().starts_with(['{', '['])
                && let Err(reason) = check_renders_json(rendered.as_bytes())
            {
                return Err(ConfigError::at_field("payload", reason).with_hint(JSON_TEMPLATE_HINT));
            }
        }
        if self.flush_timeout_secs == 0 {
            return Err(ConfigError::at_field(
                "flush_timeout_secs",
                "flush_timeout_secs must be at least 1",
            ));
        }
        Ok(())
    }

    /// The parsed `topic` and `payload` templates.
    pub fn templates(&self) -> Result<Templates, ConfigError> {
        if self.topic.is_empty() {
            return Err(ConfigError::at_field("topic", "topic must not be empty"));
        }
        if self.topic.contains(['+', '#', '\0']) {
            return Err(ConfigError::at_field(
                "topic",
                "a topic to publish to cannot contain + or #",
            )
            .with_hint(
                "use {device} for the per-device part, e.g. \"devices/{device}/commands\"",
            ));
        }
        let topic = Template::parse(&self.topic, TOPIC_FIELDS)
            .map_err(|error| ConfigError::at_field("topic", error.to_string()))?;
        let payload = match &self.payload {
            Some(text) => Some(
                Template::parse(text, EVENT_FIELDS)
                    .map_err(|error| ConfigError::at_field("payload", error.to_string()))?,
            ),
            None => None,
        };
        Ok(Templates { topic, payload })
    }
}

/// The parsed templates of an `mqtt` sink.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Templates {
    /// The topic, over `{device}`.
    pub topic: Template,
    /// The message of an anomaly event, over [`EVENT_FIELDS`]; none: the record as JSON.
    pub payload: Option<Template>,
}

impl Templates {
    /// The topic of a record of `device` (`None`: a record without device).
    pub fn topic(&self, device: Option<DeviceId>) -> String {
        let name = device.map(|device| topic_level(&device.name()));
        let mut topic = String::new();
        self.topic.render(&mut topic, Escape::None, |_, out| {
            out.push_str(name.as_deref().unwrap_or(NO_DEVICE));
        });
        topic
    }

    /// The message of `event` made from the payload template (empty without one).
    pub fn payload(&self, event: &AnomalyEvent) -> String {
        let mut out = String::new();
        if let Some(template) = &self.payload {
            template.render(&mut out, Escape::Json, |index, out| {
                write_event_field(event, index, out);
            });
        }
        out
    }
}

/// Makes `mqtt` sinks.
#[derive(Clone, Copy, Debug, Default)]
pub struct MqttSinkFactory;

impl SinkFactory for MqttSinkFactory {
    type Config = MqttSinkConfig;

    fn moved_options(&self) -> &'static [MovedOption] {
        MQTT_MOVED_OPTIONS
    }

    fn accepts(&self, config: &MqttSinkConfig) -> Vec<Kind> {
        match config.payload {
            Some(_) => vec![Kind::Events],
            None => Kind::ALL.to_vec(),
        }
    }

    fn validate(&self, config: &MqttSinkConfig, _ctx: &ValidateContext) -> Result<(), ConfigError> {
        config.validate()
    }

    fn build(
        &self,
        config: &MqttSinkConfig,
        ctx: &ComponentContext,
    ) -> Result<Box<dyn Sink>, ComponentError> {
        Ok(Box::new(MqttSink::new(config, ctx)?))
    }
}

/// A device name fit for a topic level: `/`, `+`, `#` and NUL become `_`.
fn topic_level(name: &str) -> String {
    name.chars().map(|c| if matches!(c, '/' | '+' | '#' | '\0') { '_' } else { c }).collect()
}

/// A running `mqtt` sink instance.
#[derive(Debug)]
pub struct MqttSink {
    config: MqttSinkConfig,
    templates: Templates,
    settings: ConnectionSettings,
    publisher: Option<MqttPublisher>,
    buf: Vec<u8>,
}

impl MqttSink {
    /// The sink of one worker; it connects at [`Sink::open`]. Fails on invalid templates.
    pub fn new(
        config: &MqttSinkConfig,
        ctx: &ComponentContext,
    ) -> Result<MqttSink, ComponentError> {
        let templates =
            config.templates().map_err(|error| ComponentError::Config(error.message))?;
        let client_id = config.connection.client_id_for(ctx, true);
        let settings = config.settings(client_id, |path| ctx.resolve_path(path));
        Ok(MqttSink {
            config: config.clone(),
            templates,
            settings,
            publisher: None,
            buf: Vec::new(),
        })
    }

    /// Publishes one message per event, made from the payload template.
    fn write_events(&mut self, events: &[AnomalyEvent]) -> Result<(), ComponentError> {
        let (qos, retain) = (self.config.qos, self.config.retain);
        let messages: Vec<(String, String)> = events
            .iter()
            .map(|event| (self.templates.topic(Some(event.device)), self.templates.payload(event)))
            .collect();
        let publisher = self.publisher()?;
        for (topic, payload) in messages {
            publisher.publish(topic, qos, retain, payload.into_bytes())?;
        }
        Ok(())
    }

    fn publisher(&mut self) -> Result<&MqttPublisher, ComponentError> {
        if self.publisher.is_none() {
            self.publisher = Some(MqttPublisher::connect(&self.settings)?);
        }
        self.publisher
            .as_ref()
            .ok_or_else(|| ComponentError::Internal("publisher not connected".into()))
    }
}

impl Sink for MqttSink {
    fn open(&mut self, _ctx: &ComponentContext) -> Result<(), ComponentError> {
        self.publisher().map(|_| ())
    }

    fn write_batch(&mut self, batch: Batch) -> Result<(), ComponentError> {
        if self.templates.payload.is_some() {
            return match &batch {
                Batch::Events(events) => self.write_events(events),
                other => Err(ComponentError::Internal(format!(
                    "an mqtt sink with a payload template got {} (it accepts only anomaly events)",
                    other.kind().name()
                ))),
            };
        }
        let mut buf = std::mem::take(&mut self.buf);
        buf.clear();
        let encoded = write_json_lines(&batch, &mut buf)
            .map_err(|error| ComponentError::io("cannot encode records as JSON", error));
        let result = encoded.and_then(|()| {
            let devices = record_devices(&batch);
            let qos = self.config.qos;
            let retain = self.config.retain;
            let topics: Vec<String> =
                devices.into_iter().map(|device| self.templates.topic(device)).collect();
            let publisher = self.publisher()?;
            let lines = buf.split(|byte| *byte == b'\n').filter(|line| !line.is_empty());
            for (line, topic) in lines.zip(topics) {
                publisher.publish(topic, qos, retain, line.to_vec())?;
            }
            Ok(())
        });
        self.buf = buf;
        result
    }

    fn flush(&mut self) -> Result<(), ComponentError> {
        match &self.publisher {
            Some(publisher) => publisher.flush(Duration::from_secs(self.config.flush_timeout_secs)),
            None => Ok(()),
        }
    }

    fn close(&mut self) -> Result<(), ComponentError> {
        match self.publisher.take() {
            Some(mut publisher) => {
                publisher.close(Duration::from_secs(self.config.flush_timeout_secs))
            }
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::AtomicBool;

    use tidewatch_api::{
        AnomalyState, ConfigValue, ErrorRecord, PipelineInfo, ReadingBatch, Schema,
    };

    use super::*;

    fn config(text: &str) -> MqttSinkConfig {
        ConfigValue::parse(text).expect("toml").deserialize().expect("config")
    }

    #[test]
    fn options_are_checked() {
        let factory = MqttSinkFactory;
        let ctx = ValidateContext::default();
        let base = "url = \"mqtt://127.0.0.1:1883\"\n";
        assert!(
            factory
                .validate(&config(&format!("{base}topic = \"devices/{{device}}/commands\"")), &ctx)
                .is_ok()
        );
        for (extra, field) in [
            ("topic = \"a/+\"", "topic"),
            ("topic = \"a/{site}\"", "topic"),
            ("topic = \"a\"\npayload = \"{severity}\"", "payload"),
            ("topic = \"a\"\npayload = '{\"command\": \"{State}\"}'", "payload"),
            ("topic = \"\"", "topic"),
            ("topic = \"a\"\nqos = 5", "qos"),
            ("topic = \"a\"\nflush_timeout_secs = 0", "flush_timeout_secs"),
            ("topic = \"a\"\nconnection.max_inflight = 0", "connection.max_inflight"),
            ("topic = \"a\"\ntls.ca_file = \"ca.crt\"", "tls.ca_file"),
        ] {
            let error =
                factory.validate(&config(&format!("{base}{extra}")), &ctx).expect_err(extra);
            assert_eq!(error.field.as_deref(), Some(field), "{extra}");
        }
        assert!(
            ConfigValue::parse("url = \"mqtt://h\"\ntopic = \"a\"\ntopics = [\"b\"]")
                .expect("toml")
                .deserialize::<MqttSinkConfig>()
                .is_err()
        );
    }

    #[test]
    fn payload_is_a_template_over_the_event_fields_and_takes_only_events() {
        let factory = MqttSinkFactory;
        let ctx = ValidateContext::default();
        let plain = config("url = \"mqtt://h\"\ntopic = \"d/{device}/c\"");
        assert_eq!(factory.accepts(&plain), Kind::ALL);
        assert_eq!(plain.templates().expect("valid").payload, None);
        let with_payload = config(
            "url = \"mqtt://h\"\ntopic = \"d/{device}/c\"\n\
             payload = '{\"command\": \"{state}\", \"score\": {score}}'",
        );
        assert!(factory.validate(&with_payload, &ctx).is_ok());
        assert_eq!(factory.accepts(&with_payload), [Kind::Events]);
        let constant = config("url = \"mqtt://h\"\ntopic = \"a\"\npayload = \"reboot\"");
        assert!(factory.validate(&constant, &ctx).is_ok());
        let text = config("url = \"mqtt://h\"\ntopic = \"a\"\npayload = \"{state} {device}\"");
        assert!(factory.validate(&text, &ctx).is_ok(), "not JSON, not checked as JSON");

        let unknown = config("url = \"mqtt://h\"\ntopic = \"a\"\npayload = \"{severity}\"");
        let error = factory.validate(&unknown, &ctx).expect_err("unknown field");
        assert_eq!(error.field.as_deref(), Some("payload"));
        for field in EVENT_FIELDS {
            assert!(error.message.contains(&format!("{{{field}}}")), "{}", error.message);
        }
        let unquoted =
            config("url = \"mqtt://h\"\ntopic = \"a\"\npayload = '{\"device\": {device}}'");
        let not_json = factory.validate(&unquoted, &ctx).expect_err("renders no JSON");
        assert_eq!(not_json.field.as_deref(), Some("payload"));
        assert!(not_json.message.contains("sample-device"), "{}", not_json.message);
    }

    fn event(device: &str, state: AnomalyState) -> AnomalyEvent {
        AnomalyEvent {
            device: DeviceId::intern(device),
            state,
            time_ms: 1_700_000_060_000,
            started_ms: 1_700_000_000_000,
            score: 2.5,
            peak_score: 4.0,
            threshold: Some(0.5),
            detector: Arc::from("model"),
            version: Arc::from("1"),
            label: 0,
            columns: Arc::new(Schema::new(["flow", "pressure"])),
            values: vec![0.25, 3.0],
            labels: Default::default(),
        }
    }

    #[test]
    fn an_event_renders_into_its_topic_and_payload() {
        let mut config = MqttSinkConfig::new("mqtt://h", "plant/{device}/commands");
        config.payload = Some(
            "{\"command\": \"anomaly_{state}\", \"device\": \"{device}\", \"score\": {score}, \
             \"top_feature\": \"{top_feature}\", \"started\": \"{started}\", \"nested\": {\"n\": 1}}"
                .to_owned(),
        );
        let templates = config.templates().expect("valid");
        let open = event("line \"1\"/pump+7", AnomalyState::Open);
        assert_eq!(templates.topic(Some(open.device)), "plant/line \"1\"_pump_7/commands");
        assert_eq!(templates.topic(None), "plant/_/commands");
        let payload: serde_json::Value =
            serde_json::from_str(&templates.payload(&open)).expect("the payload is JSON");
        assert_eq!(
            payload,
            serde_json::json!({
                "command": "anomaly_open",
                "device": "line \"1\"/pump+7",
                "score": 2.5,
                "top_feature": "pressure",
                "started": "2023-11-14T22:13:20.000Z",
                "nested": {"n": 1},
            })
        );
        let close = event("p", AnomalyState::Close);
        assert!(templates.payload(&close).starts_with("{\"command\": \"anomaly_close\""));
    }

    #[test]
    fn a_payload_sink_rejects_other_records() {
        let mut config = MqttSinkConfig::new("mqtt://127.0.0.1:1", "a/{device}");
        config.payload = Some("{state}".to_owned());
        let ctx = ComponentContext::new(
            "commands",
            "mqtt",
            0,
            1,
            Arc::new(PipelineInfo::default()),
            Arc::new(AtomicBool::new(false)),
        );
        let mut sink = MqttSink::new(&config, &ctx).expect("valid");
        let errors = vec![ErrorRecord::new(Arc::from("n"), "parse", "bad", None, None)];
        let error = sink.write_batch(Batch::Errors(errors)).expect_err("errors are not events");
        assert!(error.to_string().contains("accepts only anomaly events"), "{error}");
        config.payload = Some("{nope}".to_owned());
        assert!(MqttSink::new(&config, &ctx).is_err());
    }

    #[test]
    fn every_record_has_its_device() {
        let schema = Arc::new(Schema::new(["a"]));
        let mut readings = ReadingBatch::new(schema);
        readings.push(DeviceId::intern("p/1"), 1, &[1.0], 0);
        readings.push(DeviceId::intern("p2"), 2, &[2.0], 0);
        let names: Vec<Option<String>> = record_devices(&Batch::Readings(readings))
            .into_iter()
            .map(|device| device.map(|device| topic_level(&device.name())))
            .collect();
        assert_eq!(names, [Some("p_1".to_owned()), Some("p2".to_owned())]);
        let errors = vec![ErrorRecord::new(Arc::from("n"), "parse", "bad", None, None)];
        assert_eq!(record_devices(&Batch::Errors(errors)), [None]);
    }
}
