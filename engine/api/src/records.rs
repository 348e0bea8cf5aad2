//! The records that flow between components, always in batches.
//!
//! These kinds of data flow through a pipeline (plus error records on side outputs):
//!
//! | kind | type | produced by |
//! |---|---|---|
//! | raw messages | [`RawBatch`] | sources |
//! | readings | [`ReadingBatch`] | `normalize` |
//! | windows | [`Window`] | `window` |
//! | scores | [`Score`] | detectors (`stats`, `autoencoder`) |
//! | anomaly events | [`AnomalyEvent`] | `threshold` |
//! | catalog updates | [`CatalogUpdate`] | the `catalog` source |
//! | errors | [`ErrorRecord`] | the `<id>.errors` side output of every component |
//!
//! Batches are columnar where it pays: a [`RawBatch`] keeps every payload in one buffer and a
//! [`ReadingBatch`] keeps every feature value in one `Vec<f32>`, so moving a record costs no
//! allocation of its own.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, OnceLock, RwLock};

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::catalog::CatalogUpdate;

/// Event time: milliseconds since the Unix epoch.
pub type EventTime = i64;

/// Label value of a reading or window that carries no anomaly label, or is labelled normal.
pub const LABEL_NORMAL: u8 = 0;
/// Label value of a reading or window labelled anomalous (by a simulator or a labelled file).
pub const LABEL_ANOMALY: u8 = 1;

// ---------------------------------------------------------------------------------------------
// Device ids
// ---------------------------------------------------------------------------------------------

/// An interned device id: a small integer that stands for a device name within this process.
///
/// Interning keeps readings free of per-record string allocations. The id is only meaningful
/// inside one process; across processes (serde) a `DeviceId` travels as its name and is
/// interned again on arrival. [`DeviceId::route`] is a stable hash of the name, so every
/// process and worker agrees on which worker owns a device.
/// The id carries its route, so routing a reading takes no lock.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct DeviceId {
    index: u32,
    route: u32,
}

impl std::hash::Hash for DeviceId {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        state.write_u32(self.index);
    }
}

#[derive(Default)]
struct Interner {
    ids: HashMap<Arc<str>, DeviceId>,
    names: Vec<Arc<str>>,
}

fn interner() -> &'static RwLock<Interner> {
    static INTERNER: OnceLock<RwLock<Interner>> = OnceLock::new();
    INTERNER.get_or_init(|| RwLock::new(Interner::default()))
}

/// FNV-1a, 64 bit: a stable hash of a device name (the same in every process and version).
pub fn stable_hash(bytes: &[u8]) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in bytes {
        hash ^= u64::from(*byte);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    hash
}

impl DeviceId {
    /// Interns `name` and returns its id (the same id for the same name, in this process).
    pub fn intern(name: &str) -> DeviceId {
        {
            let guard = interner().read().unwrap_or_else(|poisoned| poisoned.into_inner());
            if let Some(id) = guard.ids.get(name) {
                return *id;
            }
        }
        let mut guard = interner().write().unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(id) = guard.ids.get(name) {
            return *id;
        }
        let hash = stable_hash(name.as_bytes());
        let id = DeviceId {
            index: u32::try_from(guard.names.len()).unwrap_or(u32::MAX),
            route: (hash ^ (hash >> 32)) as u32,
        };
        let name: Arc<str> = Arc::from(name);
        guard.ids.insert(Arc::clone(&name), id);
        guard.names.push(name);
        id
    }

    /// The id of `name` when it was interned before, without interning it.
    pub fn lookup(name: &str) -> Option<DeviceId> {
        let guard = interner().read().unwrap_or_else(|poisoned| poisoned.into_inner());
        guard.ids.get(name).copied()
    }

    /// The device's name.
    pub fn name(self) -> Arc<str> {
        let guard = interner().read().unwrap_or_else(|poisoned| poisoned.into_inner());
        guard
            .names
            .get(self.index as usize)
            .map(Arc::clone)
            .unwrap_or_else(|| Arc::from("<unknown>"))
    }

    /// A stable hash of the device's name (FNV-1a folded to 32 bits), used to pick the worker
    /// that owns the device.
    pub fn route(self) -> u64 {
        u64::from(self.route)
    }

    /// The index of the worker (out of `workers`) that owns this device's state.
    pub fn worker(self, workers: usize) -> usize {
        if workers <= 1 { 0 } else { (self.route() % workers as u64) as usize }
    }

    /// The raw interned index (process-local).
    pub fn index(self) -> u32 {
        self.index
    }
}

impl fmt::Debug for DeviceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "DeviceId({})", self.name())
    }
}

impl fmt::Display for DeviceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.name())
    }
}

impl Serialize for DeviceId {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.name())
    }
}

impl<'de> Deserialize<'de> for DeviceId {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let name = std::borrow::Cow::<'de, str>::deserialize(deserializer)?;
        Ok(DeviceId::intern(&name))
    }
}

// ---------------------------------------------------------------------------------------------
// Schema
// ---------------------------------------------------------------------------------------------

/// The ordered names of a record's feature (or value) columns.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Schema {
    names: Vec<Arc<str>>,
}

impl Schema {
    /// A schema with these column names, in this order.
    pub fn new<I, S>(names: I) -> Schema
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        Schema { names: names.into_iter().map(|name| Arc::from(name.as_ref())).collect() }
    }

    /// The column names in order.
    pub fn names(&self) -> &[Arc<str>] {
        &self.names
    }

    /// The number of columns.
    pub fn len(&self) -> usize {
        self.names.len()
    }

    /// True when the schema has no columns.
    pub fn is_empty(&self) -> bool {
        self.names.is_empty()
    }

    /// The position of `name`, if present.
    pub fn index_of(&self, name: &str) -> Option<usize> {
        self.names.iter().position(|candidate| &**candidate == name)
    }
}

// ---------------------------------------------------------------------------------------------
// Labels
// ---------------------------------------------------------------------------------------------

/// Name/value pairs attached to a score or an anomaly event (`enrich` adds the device catalog's
/// fields: `site`, `asset`, `owner` and the free labels), sorted by name, each name once.
///
/// Cheap to clone (one shared slice); written as a JSON object, and left out of a record's
/// JSON when empty.
///
/// ```
/// use tidewatch_api::Labels;
///
/// let labels = Labels::from_pairs([("site", "north"), ("asset", "pump"), ("site", "south")]);
/// assert_eq!(labels.get("site"), Some("north"));
/// assert_eq!(labels.iter().map(|(name, _)| name).collect::<Vec<_>>(), ["asset", "site"]);
/// ```
#[derive(Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Labels(Arc<[(Arc<str>, Arc<str>)]>);

impl Labels {
    /// Labels from pairs; of a name given twice the first value stays.
    pub fn from_pairs<N, V>(pairs: impl IntoIterator<Item = (N, V)>) -> Labels
    where
        N: Into<Arc<str>>,
        V: Into<Arc<str>>,
    {
        let mut list: Vec<(Arc<str>, Arc<str>)> =
            pairs.into_iter().map(|(name, value)| (name.into(), value.into())).collect();
        Labels::order(&mut list);
        Labels(list.into())
    }

    /// Puts pairs in the order labels keep them: sorted by name, of a name given twice the
    /// first value only. Pairs so ordered compare with [`Labels::iter`] of the labels
    /// [`Labels::from_pairs`] makes of them.
    pub fn order<N: AsRef<str>, V>(pairs: &mut Vec<(N, V)>) {
        // A stable sort keeps the first of equal names first; dedup keeps it.
        pairs.sort_by(|a, b| a.0.as_ref().cmp(b.0.as_ref()));
        pairs.dedup_by(|later, first| later.0.as_ref() == first.0.as_ref());
    }

    /// The value of label `name`.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.0
            .binary_search_by(|(key, _)| key.as_ref().cmp(name))
            .ok()
            .map(|index| self.0[index].1.as_ref())
    }

    /// The labels, sorted by name.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> + '_ {
        self.0.iter().map(|(name, value)| (name.as_ref(), value.as_ref()))
    }

    /// True when there is no label.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Number of labels.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// These labels with `other`'s added; a name in both keeps `other`'s value.
    pub fn merged(&self, other: &Labels) -> Labels {
        if self.is_empty() {
            return other.clone();
        }
        if other.is_empty() {
            return self.clone();
        }
        Labels::from_pairs(
            other.0.iter().chain(self.0.iter()).map(|(n, v)| (Arc::clone(n), Arc::clone(v))),
        )
    }
}

impl Serialize for Labels {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_map(self.iter())
    }
}

impl<'de> Deserialize<'de> for Labels {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Labels, D::Error> {
        let map = std::collections::BTreeMap::<String, String>::deserialize(deserializer)?;
        Ok(Labels::from_pairs(map))
    }
}

// ---------------------------------------------------------------------------------------------
// Raw messages

// ---------------------------------------------------------------------------------------------

type Span = (u32, u32);

/// Metadata of one raw message inside a [`RawBatch`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RawMeta {
    topic: Span,
    payload: Span,
    key: Option<Span>,
    /// The range of this message's headers in the batch's header list.
    headers: Span,
    partition: Option<u32>,
    timestamp_ms: Option<EventTime>,
    /// Processing time at which the source received the message, ms since the epoch.
    pub arrival_ms: EventTime,
    /// The message's position in its source (line number, offset, sequence number).
    pub position: u64,
}

/// What a transport knows of a message beyond its topic and payload (Kafka's key, headers,
/// partition and timestamp); every part is optional.
#[derive(Clone, Copy, Debug, Default)]
pub struct MessageExtras<'a> {
    /// The message key.
    pub key: Option<&'a [u8]>,
    /// The partition it came from.
    pub partition: Option<u32>,
    /// The timestamp the transport gave it, ms since the epoch.
    pub timestamp_ms: Option<EventTime>,
    /// Its headers, in order, as (name, value).
    pub headers: &'a [(&'a str, &'a [u8])],
}

/// One raw message borrowed from a [`RawBatch`]: bytes plus what the transport knows.
#[derive(Clone, Copy, Debug)]
pub struct RawMessage<'a> {
    /// The topic (MQTT, Kafka) or file name the message came from; may be empty.
    pub topic: &'a str,
    /// The payload bytes.
    pub payload: &'a [u8],
    /// The message key (Kafka), if any.
    pub key: Option<&'a [u8]>,
    /// The partition it came from (Kafka), if any.
    pub partition: Option<u32>,
    /// The timestamp its transport gave it (Kafka), ms since the epoch.
    pub timestamp_ms: Option<EventTime>,
    /// Processing time at which the source received the message, ms since the epoch.
    pub arrival_ms: EventTime,
    /// The message's position in its source (offset, line number, sequence number).
    pub position: u64,
    buf: &'a [u8],
    headers: &'a [(Span, Span)],
}

impl<'a> RawMessage<'a> {
    /// The message's headers, in order, as (name, value).
    pub fn headers(&self) -> impl Iterator<Item = (&'a str, &'a [u8])> + 'a {
        let buf = self.buf;
        self.headers.iter().map(move |(name, value)| {
            let name = buf.get(name.0 as usize..name.1 as usize).unwrap_or_default();
            let value = buf.get(value.0 as usize..value.1 as usize).unwrap_or_default();
            (std::str::from_utf8(name).unwrap_or_default(), value)
        })
    }

    /// The value of the first header called `name`.
    pub fn header(&self, name: &str) -> Option<&'a [u8]> {
        self.headers().find(|(known, _)| *known == name).map(|(_, value)| value)
    }
}

/// Acknowledges a batch's messages to their source once every consumer is done with it.
///
/// A source that must not acknowledge before its data is safely downstream (MQTT QoS 1/2,
/// Kafka offsets) attaches a token to each batch it emits ([`RawBatch::set_ack`]). The token
/// is shared by every copy of the batch (timely copies a batch for each consumer); when the
/// last copy is dropped, after the consuming operators processed it, the callback runs once.
/// A checkpointing engine can hold the tokens until its checkpoint completes instead, without
/// any change to the source.
#[derive(Clone)]
pub struct AckToken(Arc<AckInner>);

struct AckInner(std::sync::Mutex<Option<Box<dyn FnOnce() + Send>>>);

impl Drop for AckInner {
    fn drop(&mut self) {
        let callback = self
            .0
            .get_mut()
            .map(Option::take)
            .unwrap_or_else(|poisoned| poisoned.into_inner().take());
        if let Some(callback) = callback {
            callback();
        }
    }
}

impl AckToken {
    /// A token that runs `callback` once, when its last copy is dropped.
    pub fn new(callback: impl FnOnce() + Send + 'static) -> AckToken {
        AckToken(Arc::new(AckInner(std::sync::Mutex::new(Some(Box::new(callback))))))
    }
}

impl fmt::Debug for AckToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "AckToken({} holders)", Arc::strong_count(&self.0))
    }
}

impl PartialEq for AckToken {
    /// Tokens do not take part in comparing batches.
    fn eq(&self, _other: &AckToken) -> bool {
        true
    }
}

/// A batch of raw messages: every key, header and payload lives in one shared buffer, the
/// topics in one text buffer (a run of messages on one topic stores it once).
///
/// A source says nothing of what the payloads mean; the codec
/// ([`codec`](crate::codec)) decodes them. A source whose stream starts with a line that
/// names the fields of the records after it (a CSV file's header) passes that line along
/// unparsed with [`RawBatch::set_header`].
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct RawBatch {
    header: Option<Arc<[u8]>>,
    topics: String,
    buf: Vec<u8>,
    metas: Vec<RawMeta>,
    headers: Vec<(Span, Span)>,
    /// Acknowledges the messages upstream when the batch is done with (never serialized).
    #[serde(skip)]
    ack: Option<AckToken>,
}

fn span_of(start: usize, buf_len: usize) -> Span {
    (start as u32, buf_len as u32)
}

impl RawBatch {
    /// An empty batch.
    pub fn new() -> RawBatch {
        RawBatch::default()
    }

    /// An empty batch with room for `messages` messages of about `bytes` bytes in all.
    pub fn with_capacity(messages: usize, bytes: usize) -> RawBatch {
        RawBatch {
            buf: Vec::with_capacity(bytes),
            metas: Vec::with_capacity(messages),
            ..RawBatch::default()
        }
    }

    /// Sets the header line of the stream these messages come from (a CSV file's first line),
    /// as the source read it.
    pub fn set_header(&mut self, header: Arc<[u8]>) {
        self.header = Some(header);
    }

    /// The header line of the stream, if the source passed one along.
    pub fn header(&self) -> Option<&Arc<[u8]>> {
        self.header.as_ref()
    }

    fn append(&mut self, bytes: &[u8]) -> Span {
        let start = self.buf.len();
        self.buf.extend_from_slice(bytes);
        span_of(start, self.buf.len())
    }

    /// The span of `topic` in the topic buffer: the previous message's when it is the same.
    fn append_topic(&mut self, topic: &str) -> Span {
        if let Some(last) = self.metas.last()
            && self.topics.get(last.topic.0 as usize..last.topic.1 as usize) == Some(topic)
        {
            return last.topic;
        }
        let start = self.topics.len();
        self.topics.push_str(topic);
        span_of(start, self.topics.len())
    }

    /// Appends a message.
    pub fn push(&mut self, topic: &str, payload: &[u8], arrival_ms: EventTime, position: u64) {
        self.push_with_extras(topic, payload, arrival_ms, position, &MessageExtras::default());
    }

    /// Appends a message with what its transport knows beyond topic and payload.
    pub fn push_with_extras(
        &mut self,
        topic: &str,
        payload: &[u8],
        arrival_ms: EventTime,
        position: u64,
        extras: &MessageExtras<'_>,
    ) {
        let topic = self.append_topic(topic);
        let payload = self.append(payload);
        let key = extras.key.map(|key| self.append(key));
        let first_header = self.headers.len();
        for (name, value) in extras.headers {
            let name = self.append(name.as_bytes());
            let value = self.append(value);
            self.headers.push((name, value));
        }
        self.metas.push(RawMeta {
            topic,
            payload,
            key,
            headers: span_of(first_header, self.headers.len()),
            partition: extras.partition,
            timestamp_ms: extras.timestamp_ms,
            arrival_ms,
            position,
        });
    }

    /// Appends a message whose payload is written by `write` straight into the batch buffer
    /// (no intermediate allocation).
    pub fn push_with<F>(&mut self, topic: &str, arrival_ms: EventTime, position: u64, write: F)
    where
        F: FnOnce(&mut Vec<u8>),
    {
        let topic = self.append_topic(topic);
        let payload_start = self.buf.len();
        write(&mut self.buf);
        let payload = span_of(payload_start, self.buf.len());
        let headers = span_of(self.headers.len(), self.headers.len());
        self.metas.push(RawMeta {
            topic,
            payload,
            key: None,
            headers,
            partition: None,
            timestamp_ms: None,
            arrival_ms,
            position,
        });
    }

    /// Number of messages.
    pub fn len(&self) -> usize {
        self.metas.len()
    }

    /// Attaches the token that acknowledges these messages when the batch is done with.
    pub fn set_ack(&mut self, token: AckToken) {
        self.ack = Some(token);
    }

    /// The batch's acknowledgement token, if its source attached one.
    pub fn ack_token(&self) -> Option<&AckToken> {
        self.ack.as_ref()
    }

    /// True when the batch holds no message.
    pub fn is_empty(&self) -> bool {
        self.metas.is_empty()
    }

    /// Total payload, topic, key and header bytes.
    pub fn byte_len(&self) -> usize {
        self.topics.len() + self.buf.len()
    }

    /// The `index`-th message.
    pub fn get(&self, index: usize) -> Option<RawMessage<'_>> {
        self.metas.get(index).map(|meta| self.message(meta))
    }

    #[inline]
    fn message<'a>(&'a self, meta: &RawMeta) -> RawMessage<'a> {
        let bytes = |span: Span| self.buf.get(span.0 as usize..span.1 as usize).unwrap_or_default();
        RawMessage {
            topic: self
                .topics
                .get(meta.topic.0 as usize..meta.topic.1 as usize)
                .unwrap_or_default(),
            payload: bytes(meta.payload),
            key: meta.key.map(bytes),
            partition: meta.partition,
            timestamp_ms: meta.timestamp_ms,
            arrival_ms: meta.arrival_ms,
            position: meta.position,
            buf: &self.buf,
            headers: self
                .headers
                .get(meta.headers.0 as usize..meta.headers.1 as usize)
                .unwrap_or_default(),
        }
    }

    /// Iterates over the messages.
    #[inline]
    pub fn iter(&self) -> impl Iterator<Item = RawMessage<'_>> + '_ {
        self.metas.iter().map(move |meta| self.message(meta))
    }

    /// Removes every message, keeping the allocations (and the header line).
    pub fn clear(&mut self) {
        self.topics.clear();
        self.buf.clear();
        self.metas.clear();
        self.headers.clear();
    }
}

// ---------------------------------------------------------------------------------------------
// Readings
// ---------------------------------------------------------------------------------------------

/// One reading borrowed from a [`ReadingBatch`].
#[derive(Clone, Copy, Debug)]
pub struct Reading<'a> {
    /// The device that produced it.
    pub device: DeviceId,
    /// Event time, ms since the epoch.
    pub time_ms: EventTime,
    /// Feature values in schema order.
    pub values: &'a [f32],
    /// [`LABEL_NORMAL`] or [`LABEL_ANOMALY`].
    pub label: u8,
}

/// A batch of readings, stored by column: `values` holds `len() * schema.len()` floats,
/// reading after reading.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ReadingBatch {
    /// The feature names, shared by every reading of the batch.
    pub schema: Arc<Schema>,
    /// Device of each reading.
    pub devices: Vec<DeviceId>,
    /// Event time of each reading, ms since the epoch.
    pub times: Vec<EventTime>,
    /// Feature values, `schema.len()` per reading.
    pub values: Vec<f32>,
    /// Label of each reading.
    pub labels: Vec<u8>,
}

impl ReadingBatch {
    /// An empty batch for readings of `schema`.
    pub fn new(schema: Arc<Schema>) -> ReadingBatch {
        ReadingBatch { schema, ..ReadingBatch::default() }
    }

    /// An empty batch with room for `readings` readings.
    pub fn with_capacity(schema: Arc<Schema>, readings: usize) -> ReadingBatch {
        let width = schema.len();
        ReadingBatch {
            schema,
            devices: Vec::with_capacity(readings),
            times: Vec::with_capacity(readings),
            values: Vec::with_capacity(readings * width),
            labels: Vec::with_capacity(readings),
        }
    }

    /// Number of features per reading.
    pub fn width(&self) -> usize {
        self.schema.len()
    }

    /// Number of readings.
    pub fn len(&self) -> usize {
        self.times.len()
    }

    /// True when the batch holds no reading.
    pub fn is_empty(&self) -> bool {
        self.times.is_empty()
    }

    /// Appends a reading; `values` must have `width()` elements (extra are ignored, missing
    /// ones are NaN).
    pub fn push(&mut self, device: DeviceId, time_ms: EventTime, values: &[f32], label: u8) {
        let width = self.width();
        self.devices.push(device);
        self.times.push(time_ms);
        if values.len() >= width {
            self.values.extend_from_slice(&values[..width]);
        } else {
            self.values.extend_from_slice(values);
            self.values.extend(std::iter::repeat_n(f32::NAN, width - values.len()));
        }
        self.labels.push(label);
    }

    /// The `index`-th reading.
    pub fn get(&self, index: usize) -> Option<Reading<'_>> {
        let width = self.width();
        Some(Reading {
            device: *self.devices.get(index)?,
            time_ms: *self.times.get(index)?,
            values: self.values.get(index * width..(index + 1) * width)?,
            label: self.labels.get(index).copied().unwrap_or(LABEL_NORMAL),
        })
    }

    /// Iterates over the readings.
    pub fn iter(&self) -> impl Iterator<Item = Reading<'_>> + '_ {
        (0..self.len()).filter_map(move |index| self.get(index))
    }

    /// The greatest event time in the batch.
    pub fn max_time(&self) -> Option<EventTime> {
        self.times.iter().copied().max()
    }

    /// Removes every reading, keeping the allocations.
    pub fn clear(&mut self) {
        self.devices.clear();
        self.times.clear();
        self.values.clear();
        self.labels.clear();
    }
}

// ---------------------------------------------------------------------------------------------
// Windows and scores
// ---------------------------------------------------------------------------------------------

/// The readings of one device in one event-time window `[start_ms, end_ms)`: a steps x features
/// matrix stored step after step (row-major), with the time of each step.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Window {
    /// The device.
    pub device: DeviceId,
    /// Inclusive start, ms since the epoch.
    pub start_ms: EventTime,
    /// Exclusive end, ms since the epoch.
    pub end_ms: EventTime,
    /// Feature names (the matrix columns).
    pub schema: Arc<Schema>,
    /// Event time of each step, ascending.
    pub times: Vec<EventTime>,
    /// `times.len() * schema.len()` values, step after step.
    pub values: Vec<f32>,
    /// [`LABEL_ANOMALY`] when any reading of the window was labelled anomalous.
    pub label: u8,
}

impl Window {
    /// Number of steps (readings) in the window.
    pub fn steps(&self) -> usize {
        self.times.len()
    }

    /// The values of step `index`, in schema order.
    pub fn step(&self, index: usize) -> Option<&[f32]> {
        let width = self.schema.len();
        self.values.get(index * width..(index + 1) * width)
    }

    /// The values of feature `column` across all steps.
    pub fn feature(&self, column: usize) -> impl Iterator<Item = f32> + '_ {
        let width = self.schema.len().max(1);
        self.values.iter().skip(column).step_by(width).copied()
    }
}

/// A detector's verdict on one window.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Score {
    /// The device.
    pub device: DeviceId,
    /// Window start, ms since the epoch.
    pub start_ms: EventTime,
    /// Window end (exclusive), ms since the epoch.
    pub end_ms: EventTime,
    /// The detector: component id, or model name.
    pub detector: Arc<str>,
    /// Detector or model version.
    pub version: Arc<str>,
    /// The anomaly score (greater is more anomalous).
    pub score: f32,
    /// The threshold the score is compared to, if the detector has one.
    pub threshold: Option<f32>,
    /// True when the score passed the threshold.
    pub anomaly: bool,
    /// The window's label ([`LABEL_ANOMALY`] if any reading was labelled anomalous).
    pub label: u8,
    /// Names of the detail values.
    pub columns: Arc<Schema>,
    /// Detail values (per-feature statistics or errors), in `columns` order.
    pub values: Vec<f32>,
    /// Labels of the device (`enrich` adds the catalog's); empty by default.
    #[serde(default, skip_serializing_if = "Labels::is_empty")]
    pub labels: Labels,
}

/// Whether an anomaly event opens or closes an anomaly.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AnomalyState {
    /// The anomaly starts (the detection rule was met).
    Open,
    /// The anomaly ends (enough calm windows after it).
    Close,
}

impl AnomalyState {
    /// `open` or `close`.
    pub fn name(self) -> &'static str {
        match self {
            AnomalyState::Open => "open",
            AnomalyState::Close => "close",
        }
    }
}

/// An anomaly opening or closing on one device, as `threshold` emits it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AnomalyEvent {
    /// The device.
    pub device: DeviceId,
    /// Open or close.
    pub state: AnomalyState,
    /// Event time of the decision: the end of the window that opened or closed it, ms.
    pub time_ms: EventTime,
    /// When the anomaly opened, ms (equal to `time_ms` for an open event).
    pub started_ms: EventTime,
    /// The score of the deciding window.
    pub score: f32,
    /// The highest score while the anomaly was open.
    pub peak_score: f32,
    /// The threshold of the scores.
    pub threshold: Option<f32>,
    /// The detector (component or model name).
    pub detector: Arc<str>,
    /// The detector's version.
    pub version: Arc<str>,
    /// [`LABEL_ANOMALY`] when the deciding window was labelled anomalous.
    pub label: u8,
    /// Names of the detail values (copied from the deciding score).
    pub columns: Arc<Schema>,
    /// Detail values (per-feature errors: which sensor explains it).
    pub values: Vec<f32>,
    /// Labels of the device (`enrich` adds the catalog's); empty by default.
    #[serde(default, skip_serializing_if = "Labels::is_empty")]
    pub labels: Labels,
}

/// A record that a component could not process, with the reason; sent to `<id>.errors`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ErrorRecord {
    /// The id of the component that rejected the record.
    pub component: Arc<str>,
    /// A short, bounded classification (`parse`, `missing_field`, `io` ...), used as a metric label.
    pub error_type: Arc<str>,
    /// Human-readable reason.
    pub reason: String,
    /// Processing time at which the error happened, ms since the epoch.
    pub time_ms: EventTime,
    /// Topic or file of the offending message, when known.
    pub topic: Option<String>,
    /// The offending payload (lossy UTF-8, truncated to 4 KiB), when there is one.
    pub payload: Option<String>,
}

/// The longest payload excerpt kept in an [`ErrorRecord`].
pub const ERROR_PAYLOAD_LIMIT: usize = 4096;

impl ErrorRecord {
    /// A new error record; the payload is truncated to [`ERROR_PAYLOAD_LIMIT`] bytes.
    pub fn new(
        component: Arc<str>,
        error_type: &str,
        reason: impl Into<String>,
        topic: Option<&str>,
        payload: Option<&[u8]>,
    ) -> ErrorRecord {
        ErrorRecord {
            component,
            error_type: Arc::from(error_type),
            reason: reason.into(),
            time_ms: now_ms(),
            topic: topic.filter(|topic| !topic.is_empty()).map(str::to_owned),
            payload: payload.map(|bytes| {
                String::from_utf8_lossy(&bytes[..bytes.len().min(ERROR_PAYLOAD_LIMIT)]).into_owned()
            }),
        }
    }
}

/// Wall-clock time, ms since the epoch.
pub fn now_ms() -> EventTime {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|elapsed| elapsed.as_millis() as EventTime)
        .unwrap_or(0)
}

// ---------------------------------------------------------------------------------------------
// Batches and kinds
// ---------------------------------------------------------------------------------------------

/// The kind of records a port carries; the pipeline validator checks that every input accepts
/// the kind its producer emits.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    /// Raw messages from a source.
    Raw,
    /// Normalized readings.
    Readings,
    /// Per-device event-time windows.
    Windows,
    /// Detector scores.
    Scores,
    /// Anomaly open/close events.
    Events,
    /// Changes of the device catalog (a `catalog` source's output).
    Catalog,
    /// Error records (`<id>.errors`).
    Errors,
}

impl Kind {
    /// Every kind.
    pub const ALL: &'static [Kind] = &[
        Kind::Raw,
        Kind::Readings,
        Kind::Windows,
        Kind::Scores,
        Kind::Events,
        Kind::Catalog,
        Kind::Errors,
    ];

    /// The kind's name as written in docs and messages.
    pub fn name(self) -> &'static str {
        match self {
            Kind::Raw => "raw messages",
            Kind::Readings => "readings",
            Kind::Windows => "windows",
            Kind::Scores => "scores",
            Kind::Events => "anomaly events",
            Kind::Catalog => "catalog updates",
            Kind::Errors => "errors",
        }
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A batch of records of one kind: the unit that moves between components.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Batch {
    /// Raw messages.
    Raw(RawBatch),
    /// Readings.
    Readings(ReadingBatch),
    /// Windows.
    Windows(Vec<Window>),
    /// Scores.
    Scores(Vec<Score>),
    /// Anomaly open/close events.
    Events(Vec<AnomalyEvent>),
    /// Catalog updates.
    Catalog(Vec<CatalogUpdate>),
    /// Error records.
    Errors(Vec<ErrorRecord>),
}

impl Batch {
    /// The kind of records in the batch.
    pub fn kind(&self) -> Kind {
        match self {
            Batch::Raw(_) => Kind::Raw,
            Batch::Readings(_) => Kind::Readings,
            Batch::Windows(_) => Kind::Windows,
            Batch::Scores(_) => Kind::Scores,
            Batch::Events(_) => Kind::Events,
            Batch::Catalog(_) => Kind::Catalog,
            Batch::Errors(_) => Kind::Errors,
        }
    }

    /// Number of records.
    pub fn len(&self) -> usize {
        match self {
            Batch::Raw(batch) => batch.len(),
            Batch::Readings(batch) => batch.len(),
            Batch::Windows(windows) => windows.len(),
            Batch::Scores(scores) => scores.len(),
            Batch::Events(events) => events.len(),
            Batch::Catalog(updates) => updates.len(),
            Batch::Errors(errors) => errors.len(),
        }
    }

    /// True when the batch holds no record.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The greatest event time of the records, for kinds that carry event time.
    pub fn max_event_time(&self) -> Option<EventTime> {
        match self {
            Batch::Readings(batch) => batch.max_time(),
            Batch::Windows(windows) => windows.iter().map(|window| window.end_ms - 1).max(),
            Batch::Scores(scores) => scores.iter().map(|score| score.end_ms - 1).max(),
            Batch::Events(events) => events.iter().map(|event| event.time_ms - 1).max(),
            Batch::Raw(_) | Batch::Catalog(_) | Batch::Errors(_) => None,
        }
    }

    /// The routing hash of the batch's first record's device (0 for unkeyed kinds): after
    /// [`Batch::split_by_worker`], every record of a batch shares its owner, so this routes the
    /// whole batch.
    pub fn route_hash(&self) -> u64 {
        let device = match self {
            Batch::Readings(batch) => batch.devices.first().copied(),
            Batch::Windows(windows) => windows.first().map(|window| window.device),
            Batch::Scores(scores) => scores.first().map(|score| score.device),
            Batch::Events(events) => events.first().map(|event| event.device),
            Batch::Raw(_) | Batch::Catalog(_) | Batch::Errors(_) => None,
        };
        device.map(DeviceId::route).unwrap_or(0)
    }

    /// Splits a batch of a keyed kind (readings, windows, scores) into one batch per owning
    /// worker, as `(worker, batch)`; other kinds come back whole for worker 0.
    pub fn split_by_worker(self, workers: usize) -> Vec<(usize, Batch)> {
        if workers <= 1 {
            return vec![(0, self)];
        }
        match self {
            Batch::Readings(batch) => {
                let mut parts: Vec<ReadingBatch> = (0..workers)
                    .map(|_| {
                        ReadingBatch::with_capacity(
                            Arc::clone(&batch.schema),
                            batch.len() / workers + 1,
                        )
                    })
                    .collect();
                for reading in batch.iter() {
                    let part = &mut parts[reading.device.worker(workers)];
                    part.push(reading.device, reading.time_ms, reading.values, reading.label);
                }
                parts
                    .into_iter()
                    .enumerate()
                    .filter(|(_, part)| !part.is_empty())
                    .map(|(worker, part)| (worker, Batch::Readings(part)))
                    .collect()
            }
            Batch::Windows(windows) => split_vec(windows, workers, |window| window.device)
                .map(|(worker, part)| (worker, Batch::Windows(part)))
                .collect(),
            Batch::Scores(scores) => split_vec(scores, workers, |score| score.device)
                .map(|(worker, part)| (worker, Batch::Scores(part)))
                .collect(),
            Batch::Events(events) => split_vec(events, workers, |event| event.device)
                .map(|(worker, part)| (worker, Batch::Events(part)))
                .collect(),
            other => vec![(0, other)],
        }
    }
}

fn split_vec<T>(
    items: Vec<T>,
    workers: usize,
    device: impl Fn(&T) -> DeviceId,
) -> impl Iterator<Item = (usize, Vec<T>)> {
    let mut parts: Vec<Vec<T>> = (0..workers).map(|_| Vec::new()).collect();
    for item in items {
        let worker = device(&item).worker(workers);
        parts[worker].push(item);
    }
    parts.into_iter().enumerate().filter(|(_, part)| !part.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interning_is_stable_and_routes_by_name() {
        let a = DeviceId::intern("pump-1");
        let b = DeviceId::intern("pump-1");
        let c = DeviceId::intern("pump-2");
        assert_eq!(a, b);
        assert_ne!(a, c);
        assert_eq!(&*a.name(), "pump-1");
        let hash = stable_hash(b"pump-1");
        assert_eq!(a.route(), (hash ^ (hash >> 32)) & 0xffff_ffff);
        assert!(a.worker(4) < 4);
    }

    #[test]
    fn device_id_travels_as_its_name() {
        let id = DeviceId::intern("pump-serde");
        let json = serde_json::to_string(&id).expect("serialize");
        assert_eq!(json, "\"pump-serde\"");
        let back: DeviceId = serde_json::from_str(&json).expect("deserialize");
        assert_eq!(back, id);
    }

    #[test]
    fn ack_tokens_fire_once_when_the_last_copy_is_dropped() {
        let fired = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let mut batch = RawBatch::new();
        let counter = Arc::clone(&fired);
        batch.set_ack(AckToken::new(move || {
            counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }));
        let copy = batch.clone();
        drop(batch);
        assert_eq!(fired.load(std::sync::atomic::Ordering::SeqCst), 0);
        drop(copy);
        assert_eq!(fired.load(std::sync::atomic::Ordering::SeqCst), 1);
    }

    #[test]
    fn raw_batch_keeps_topics_and_payloads_apart() {
        let mut batch = RawBatch::new();
        batch.push("a/b", b"{}", 5, 1);
        batch.push_with("", 6, 2, |buf| buf.extend_from_slice(b"xyz"));
        let messages: Vec<_> = batch.iter().collect();
        assert_eq!(messages.len(), 2);
        assert_eq!(messages[0].topic, "a/b");
        assert_eq!(messages[0].payload, b"{}");
        assert_eq!(messages[1].topic, "");
        assert_eq!(messages[1].payload, b"xyz");
        assert_eq!(messages[1].position, 2);
    }

    #[test]
    fn reading_batch_pads_and_splits_by_worker() {
        let schema = Arc::new(Schema::new(["a", "b"]));
        let mut batch = ReadingBatch::new(schema);
        for device in 0..20 {
            batch.push(DeviceId::intern(&format!("d{device}")), device, &[1.0], LABEL_NORMAL);
        }
        assert!(batch.get(0).expect("reading").values[1].is_nan());
        let parts = Batch::Readings(batch).split_by_worker(3);
        let total: usize = parts.iter().map(|(_, part)| part.len()).sum();
        assert_eq!(total, 20);
        for (worker, part) in parts {
            if let Batch::Readings(part) = part {
                assert!(part.devices.iter().all(|device| device.worker(3) == worker));
            }
        }
    }
}
