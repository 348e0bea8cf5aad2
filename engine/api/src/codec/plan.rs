//! The field plan: which fields of a message are needed, as top-level names, JSON pointers
//! (`/sensors/0/vib`) or message metadata (`@key`), worked out once per component.
//!
//! JSON objects are read by a serde visitor that matches keys against the needed names and
//! skips every other value; a pointer descends only into the objects and arrays on its path.
//! Nothing is allocated per message. Producers write an object's keys in the same order
//! message after message, so each top-level key is first compared with the needed name found
//! at its position in the last object ([`KeyOrder`]): one comparison per key instead of a
//! search.

use std::collections::HashMap;
use std::fmt;

use serde::Deserializer as _;
use serde::de::{self, DeserializeSeed, IgnoredAny, MapAccess, SeqAccess, Visitor};

use super::Value;
use crate::factory::ConfigError;

/// A field of the message's metadata rather than of its payload, named `@...` in options.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MetaField {
    /// `@topic`: the MQTT topic, Kafka topic or file name.
    Topic,
    /// `@key`: the message key (Kafka), as text.
    Key,
    /// `@partition`: the partition the message came from (Kafka).
    Partition,
    /// `@offset`: the message's position in its source (offset, line number, sequence).
    Offset,
    /// `@timestamp`: the timestamp the transport gave the message (Kafka), ms since the epoch.
    Timestamp,
    /// `@arrival`: when the source received the message, ms since the epoch.
    Arrival,
    /// `@header.NAME`: a message header (Kafka), as text.
    Header(Box<str>),
}

impl MetaField {
    /// The metadata field `spec` names (`@key`, `@header.trace-id` ...), or an explanation.
    fn parse(spec: &str) -> Result<MetaField, String> {
        Ok(match spec {
            "@topic" => MetaField::Topic,
            "@key" => MetaField::Key,
            "@partition" => MetaField::Partition,
            "@offset" => MetaField::Offset,
            "@timestamp" => MetaField::Timestamp,
            "@arrival" => MetaField::Arrival,
            _ => match spec.strip_prefix("@header.") {
                Some(name) if !name.is_empty() => MetaField::Header(name.into()),
                _ => {
                    return Err(format!(
                        "{spec:?} is not a metadata field: use @topic, @key, @partition, \
                         @offset, @timestamp, @arrival or @header.NAME"
                    ));
                }
            },
        })
    }
}

/// Splits a field spec into its path: a top-level key, or a JSON pointer's decoded tokens.
fn field_path(option: &str, spec: &str) -> Result<Vec<Box<str>>, ConfigError> {
    let Some(pointer) = spec.strip_prefix('/') else {
        return Ok(vec![spec.into()]);
    };
    pointer
        .split('/')
        .map(|token| {
            let mut decoded = String::with_capacity(token.len());
            let mut chars = token.chars();
            while let Some(c) = chars.next() {
                if c != '~' {
                    decoded.push(c);
                    continue;
                }
                match chars.next() {
                    Some('0') => decoded.push('~'),
                    Some('1') => decoded.push('/'),
                    _ => {
                        return Err(ConfigError::at_field(
                            option,
                            format!("JSON pointer {spec:?} has a `~` not followed by 0 or 1"),
                        )
                        .with_hint("write `~0` for `~` and `~1` for `/` inside a key"));
                    }
                }
            }
            Ok(decoded.into_boxed_str())
        })
        .collect()
}

/// The array index a pointer token stands for, if it is one (`0`, or digits without a
/// leading zero).
fn array_index(token: &str) -> Option<usize> {
    if token.is_empty() || (token.len() > 1 && token.starts_with('0')) {
        return None;
    }
    if !token.bytes().all(|byte| byte.is_ascii_digit()) {
        return None;
    }
    token.parse().ok()
}

/// Above this many distinct top-level keys, keys are looked up in a hash map instead of a
/// linear scan.
const LINEAR_LOOKUP_LIMIT: usize = 16;

#[derive(Debug)]
struct Field {
    /// Payload path; empty for a metadata field.
    path: Vec<Box<str>>,
    /// As written in the options: `temp`, `/sensors/0/vib` or `@key`.
    name: Box<str>,
}

#[derive(Debug)]
struct Child {
    key: Box<str>,
    index: Option<usize>,
    node: usize,
}

/// A place in the message: a field ends here, or pointers go deeper, or both.
#[derive(Debug, Default)]
pub(crate) struct Node {
    field: Option<usize>,
    children: Vec<Child>,
}

/// The needed fields of a message and how to reach them.
///
/// Fields are added once ([`FieldPlan::add`]), each getting an index; decoding calls back with
/// `(index, value)` for every needed field the message has.
#[derive(Debug, Default)]
pub struct FieldPlan {
    names: Vec<Box<str>>,
    roots: Vec<usize>,
    nodes: Vec<Node>,
    index: Option<HashMap<Box<str>, usize>>,
    fields: Vec<Field>,
    meta: Vec<(MetaField, usize)>,
}

impl FieldPlan {
    /// An empty plan.
    pub fn new() -> FieldPlan {
        FieldPlan::default()
    }

    /// Adds the field `spec` (given by option `option`, for errors) and returns its index; a
    /// spec already in the plan returns the index it has.
    pub fn add(&mut self, option: &str, spec: &str) -> Result<usize, ConfigError> {
        if spec.starts_with('@') {
            let meta = MetaField::parse(spec).map_err(|problem| {
                ConfigError::at_field(option, problem)
                    .with_hint("fields of the payload are plain names or JSON pointers (/a/0/b)")
            })?;
            if let Some((_, field)) = self.meta.iter().find(|(known, _)| *known == meta) {
                return Ok(*field);
            }
            let field = self.fields.len();
            self.fields.push(Field { path: Vec::new(), name: spec.into() });
            self.meta.push((meta, field));
            return Ok(field);
        }
        let path = field_path(option, spec)?;
        if let Some(field) = self.fields.iter().position(|field| field.path == path) {
            return Ok(field);
        }
        let field = self.fields.len();
        self.fields.push(Field { path: path.clone(), name: spec.into() });
        let mut tokens = path.into_iter();
        let first = tokens.next().unwrap_or_default();
        let mut node = match self.names.iter().position(|known| *known == first) {
            Some(key) => self.roots.get(key).copied().unwrap_or_default(),
            None => {
                self.names.push(first);
                self.nodes.push(Node::default());
                self.roots.push(self.nodes.len() - 1);
                self.nodes.len() - 1
            }
        };
        for token in tokens {
            let existing = self.nodes.get(node).and_then(|parent| {
                parent.children.iter().find(|child| child.key == token).map(|child| child.node)
            });
            node = match existing {
                Some(child) => child,
                None => {
                    self.nodes.push(Node::default());
                    let child = self.nodes.len() - 1;
                    if let Some(parent) = self.nodes.get_mut(node) {
                        let index = array_index(&token);
                        parent.children.push(Child { key: token, index, node: child });
                    }
                    child
                }
            };
        }
        if let Some(end) = self.nodes.get_mut(node) {
            end.field = Some(field);
        }
        if self.names.len() > LINEAR_LOOKUP_LIMIT {
            self.index = Some(
                self.names.iter().enumerate().map(|(key, name)| (name.clone(), key)).collect(),
            );
        }
        Ok(field)
    }

    /// The number of distinct fields.
    pub fn len(&self) -> usize {
        self.fields.len()
    }

    /// True when no field was added.
    pub fn is_empty(&self) -> bool {
        self.fields.is_empty()
    }

    /// The field as written in the options.
    pub fn name(&self, field: usize) -> &str {
        self.fields.get(field).map_or("?", |field| &field.name)
    }

    /// The top-level key (or CSV column) a payload field reads; `None` for metadata fields.
    pub fn column(&self, field: usize) -> Option<&str> {
        self.fields.get(field).and_then(|field| field.path.first()).map(|key| &**key)
    }

    /// A payload field that reaches deeper than a top-level key, if any.
    pub fn nested_field(&self) -> Option<&str> {
        self.fields.iter().find(|field| field.path.len() > 1).map(|field| &*field.name)
    }

    /// The metadata fields and their indexes.
    pub fn meta_fields(&self) -> &[(MetaField, usize)] {
        &self.meta
    }

    /// The top-level key index of `key`.
    #[inline]
    fn lookup(&self, key: &str) -> Option<usize> {
        match &self.index {
            Some(index) => index.get(key).copied(),
            None => {
                let key = key.as_bytes();
                let first = key.first().copied();
                self.names.iter().position(|name| {
                    let name = name.as_bytes();
                    name.len() == key.len() && name.first().copied() == first && name == key
                })
            }
        }
    }

    /// The field a top-level key (or CSV column name) reads, if it is a whole field.
    pub fn top_level_field(&self, key: &str) -> Option<usize> {
        self.lookup(key).and_then(|key| self.root(key)).and_then(|node| node.field)
    }

    #[inline]
    fn root(&self, key: usize) -> Option<&Node> {
        self.roots.get(key).and_then(|node| self.nodes.get(*node))
    }

    /// Reads one JSON object, calling `each(field, value)` for every needed field it has.
    /// `order` holds the key order of the objects read before (a hint, right or wrong).
    pub fn read_json<F>(
        &self,
        payload: &[u8],
        order: &mut KeyOrder,
        each: &mut F,
    ) -> Result<(), serde_json::Error>
    where
        F: FnMut(usize, Value<'_>),
    {
        let mut deserializer = serde_json::Deserializer::from_slice(payload);
        (&mut deserializer).deserialize_map(ObjectVisitor { plan: self, order, each })?;
        deserializer.end()
    }

    /// [`FieldPlan::lookup`], trying the key index `hint` first.
    #[inline]
    fn lookup_hinted(&self, key: &str, hint: Option<usize>) -> Option<usize> {
        if let Some(hint) = hint
            && self.names.get(hint).is_some_and(|name| name.as_bytes() == key.as_bytes())
        {
            return Some(hint);
        }
        self.lookup(key)
    }
}

/// The needed top-level keys of the last JSON object read, by position in the object: the
/// key at a position is first compared with the one found there last time.
#[derive(Debug, Default)]
pub struct KeyOrder(Vec<Option<usize>>);

impl KeyOrder {
    fn hint(&self, position: usize) -> Option<usize> {
        self.0.get(position).copied().flatten()
    }

    fn note(&mut self, position: usize, key: Option<usize>) {
        match self.0.get_mut(position) {
            Some(slot) => *slot = key,
            // Bounded: an object of more keys than this is remembered only so far.
            None if position < MAX_KEY_ORDER => self.0.push(key),
            None => {}
        }
    }
}

/// How many positions a [`KeyOrder`] remembers.
const MAX_KEY_ORDER: usize = 256;

/// Visits the top-level object.
struct ObjectVisitor<'p, F> {
    plan: &'p FieldPlan,
    order: &'p mut KeyOrder,
    each: &'p mut F,
}

impl<'de, F: FnMut(usize, Value<'_>)> Visitor<'de> for ObjectVisitor<'_, F> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let plan = self.plan;
        let mut position = 0;
        while let Some(key) =
            map.next_key_seed(KeySeed { plan, hint: self.order.hint(position) })?
        {
            self.order.note(position, key);
            position += 1;
            match key.and_then(|key| plan.root(key)) {
                Some(node) => {
                    map.next_value_seed(ValueSeed { plan, node, each: &mut *self.each })?
                }
                None => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        Ok(())
    }
}

/// Reads a top-level key and tells which needed key it is, if any (`hint` first).
struct KeySeed<'p> {
    plan: &'p FieldPlan,
    hint: Option<usize>,
}

impl<'de> DeserializeSeed<'de> for KeySeed<'_> {
    type Value = Option<usize>;

    fn deserialize<D: de::Deserializer<'de>>(
        self,
        deserializer: D,
    ) -> Result<Self::Value, D::Error> {
        deserializer.deserialize_str(self)
    }
}

impl<'de> Visitor<'de> for KeySeed<'_> {
    type Value = Option<usize>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a field name")
    }

    fn visit_str<E: de::Error>(self, key: &str) -> Result<Self::Value, E> {
        Ok(self.plan.lookup_hinted(key, self.hint))
    }
}

/// Reads a key of a nested object and tells which child of `node` it names, if any.
struct ChildKeySeed<'p>(&'p FieldPlan, &'p Node);

impl<'de, 'p> DeserializeSeed<'de> for ChildKeySeed<'p> {
    type Value = Option<&'p Node>;

    fn deserialize<D: de::Deserializer<'de>>(
        self,
        deserializer: D,
    ) -> Result<Self::Value, D::Error> {
        deserializer.deserialize_str(self)
    }
}

impl<'de, 'p> Visitor<'de> for ChildKeySeed<'p> {
    type Value = Option<&'p Node>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a field name")
    }

    fn visit_str<E: de::Error>(self, key: &str) -> Result<Self::Value, E> {
        let ChildKeySeed(plan, node) = self;
        Ok(node
            .children
            .iter()
            .find(|child| &*child.key == key)
            .and_then(|child| plan.nodes.get(child.node)))
    }
}

/// Reads the value at a node: a needed field's value, and the nested values that pointers
/// reach through it.
struct ValueSeed<'p, F> {
    plan: &'p FieldPlan,
    node: &'p Node,
    each: &'p mut F,
}

impl<F: FnMut(usize, Value<'_>)> ValueSeed<'_, F> {
    fn apply(self, value: Value<'_>) {
        if let Some(field) = self.node.field {
            (self.each)(field, value);
        }
    }
}

impl<'de, F: FnMut(usize, Value<'_>)> DeserializeSeed<'de> for ValueSeed<'_, F> {
    type Value = ();

    fn deserialize<D: de::Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de, F: FnMut(usize, Value<'_>)> Visitor<'de> for ValueSeed<'_, F> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_bool<E: de::Error>(self, value: bool) -> Result<(), E> {
        self.apply(Value::Bool(value));
        Ok(())
    }

    fn visit_i64<E: de::Error>(self, value: i64) -> Result<(), E> {
        self.apply(Value::I64(value));
        Ok(())
    }

    fn visit_u64<E: de::Error>(self, value: u64) -> Result<(), E> {
        self.apply(Value::U64(value));
        Ok(())
    }

    fn visit_f64<E: de::Error>(self, value: f64) -> Result<(), E> {
        self.apply(Value::F64(value));
        Ok(())
    }

    fn visit_str<E: de::Error>(self, value: &str) -> Result<(), E> {
        self.apply(Value::Str(value));
        Ok(())
    }

    fn visit_unit<E: de::Error>(self) -> Result<(), E> {
        self.apply(Value::Null);
        Ok(())
    }

    fn visit_none<E: de::Error>(self) -> Result<(), E> {
        self.apply(Value::Null);
        Ok(())
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        if self.node.children.is_empty() {
            while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
        } else {
            while let Some(child) = map.next_key_seed(ChildKeySeed(self.plan, self.node))? {
                match child {
                    Some(node) => map.next_value_seed(ValueSeed {
                        plan: self.plan,
                        node,
                        each: &mut *self.each,
                    })?,
                    None => {
                        map.next_value::<IgnoredAny>()?;
                    }
                }
            }
        }
        self.apply(Value::Composite);
        Ok(())
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        if self.node.children.iter().all(|child| child.index.is_none()) {
            while seq.next_element::<IgnoredAny>()?.is_some() {}
        } else {
            let mut position = 0;
            loop {
                let child = self
                    .node
                    .children
                    .iter()
                    .find(|child| child.index == Some(position))
                    .and_then(|child| self.plan.nodes.get(child.node));
                let more = match child {
                    Some(node) => seq
                        .next_element_seed(ValueSeed {
                            plan: self.plan,
                            node,
                            each: &mut *self.each,
                        })?
                        .is_some(),
                    None => seq.next_element::<IgnoredAny>()?.is_some(),
                };
                if !more {
                    break;
                }
                position += 1;
            }
        }
        self.apply(Value::Composite);
        Ok(())
    }
}
