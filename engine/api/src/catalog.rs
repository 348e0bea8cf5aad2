//! The device catalog: one row of metadata per device, its file formats, and the updates that
//! carry its changes through a pipeline.
//!
//! The `catalog` source reads a file of [`CatalogRow`]s ([`parse_catalog`]), and each time the
//! file changes it sends only the difference ([`diff_catalogs`]) as [`CatalogUpdate`]s, a
//! batch of their own ([`Batch::Catalog`](crate::Batch::Catalog)) whose rows the source
//! shares with the components that read them. `enrich` and `fleet` take them into a
//! differential collection: a changed row is its old version retracted (`diff = -1`) and its
//! new one inserted (`diff = 1`), a removed row is retracted. A catalog kept as keyed
//! messages (a Kafka compacted topic, retained MQTT messages) has one JSON row per message
//! ([`parse_json_row`]). Sinks write an update as one JSON object ([`CatalogUpdate::to_json`]).
//!
//! ```
//! use tidewatch_api::catalog::{CatalogFormat, diff_catalogs, parse_catalog};
//!
//! let before = parse_catalog(b"device,site,asset,owner\np1,north,pump,ops\np2,north,fan,ops\n",
//!     CatalogFormat::Csv).expect("parses");
//! let after = parse_catalog(b"device,site,asset,owner\np1,south,pump,ops\n",
//!     CatalogFormat::Csv).expect("parses");
//! let updates = diff_catalogs(&before.rows, &after.rows);
//! let changes: Vec<(&str, &str, i64)> =
//!     updates.iter().map(|u| (u.row.device.as_str(), &*u.row.site, u.diff)).collect();
//! assert_eq!(changes, [("p1", "north", -1), ("p1", "south", 1), ("p2", "north", -1)]);
//! ```

use std::cmp::Ordering;
use std::collections::BTreeMap;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::codec::csv::{Delimiter, header_names, split_record};

/// A per-device threshold override: a finite number, ordered by value (so rows can be
/// compared and kept in ordered collections).
#[derive(Clone, Copy, Debug, Serialize, Deserialize)]
#[serde(transparent)]
pub struct ThresholdOverride(pub f32);

impl PartialEq for ThresholdOverride {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}
impl Eq for ThresholdOverride {}
impl PartialOrd for ThresholdOverride {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for ThresholdOverride {
    fn cmp(&self, other: &Self) -> Ordering {
        self.0.total_cmp(&other.0)
    }
}
impl std::hash::Hash for ThresholdOverride {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.0.to_bits().hash(state);
    }
}

/// One device's entry in the catalog. Its texts but the device are shared strings: the rows
/// of one file that have the same site, asset type, owner or label hold one copy of it.
#[derive(Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CatalogRow {
    /// The device id, as readings carry it.
    pub device: String,
    /// The site the device is at (empty when not given).
    #[serde(default)]
    pub site: Arc<str>,
    /// The asset type (pump, fan ...; empty when not given).
    #[serde(default)]
    pub asset: Arc<str>,
    /// Who answers for the device (empty when not given).
    #[serde(default)]
    pub owner: Arc<str>,
    /// Free labels, by name.
    #[serde(default)]
    pub labels: FreeLabels,
    /// A per-device threshold override, when given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub threshold: Option<ThresholdOverride>,
    /// From which event time on the row applies, ms since the epoch; without it, `enrich`
    /// applies the row from the greatest event time it has seen when the row reaches it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub valid_from: Option<crate::EventTime>,
}

/// A row's free labels: names and values, sorted by name, each name once (an insert replaces
/// the value). A sorted list rather than a map: a row has few labels, and a catalog of
/// 100,000 rows each with a map's node (over 500 bytes) would weigh tens of megabytes more.
/// Written as a JSON object.
#[derive(Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct FreeLabels(Vec<(Arc<str>, Arc<str>)>);

impl FreeLabels {
    /// The value of label `name`.
    pub fn get(&self, name: &str) -> Option<&str> {
        let at = self.0.binary_search_by(|(key, _)| key.as_ref().cmp(name)).ok()?;
        Some(&self.0[at].1)
    }

    /// Sets label `name` to `value`; the value it had, if any.
    pub fn insert(
        &mut self,
        name: impl Into<Arc<str>>,
        value: impl Into<Arc<str>>,
    ) -> Option<Arc<str>> {
        let (name, value) = (name.into(), value.into());
        match self.0.binary_search_by(|(key, _)| key.cmp(&name)) {
            Ok(at) => Some(std::mem::replace(&mut self.0[at].1, value)),
            Err(at) => {
                self.0.insert(at, (name, value));
                None
            }
        }
    }

    /// The labels, by name.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.0.iter().map(|(name, value)| (name.as_ref(), value.as_ref()))
    }

    /// How many labels there are.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// True when there is none.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl<N: Into<Arc<str>>, V: Into<Arc<str>>> FromIterator<(N, V)> for FreeLabels {
    /// Of a name given twice, the last value stays (as a map's `collect`).
    fn from_iter<I: IntoIterator<Item = (N, V)>>(pairs: I) -> FreeLabels {
        let mut labels = FreeLabels::default();
        for (name, value) in pairs {
            labels.insert(name, value);
        }
        labels
    }
}

impl<N: Into<Arc<str>>, V: Into<Arc<str>>, const L: usize> From<[(N, V); L]> for FreeLabels {
    fn from(pairs: [(N, V); L]) -> FreeLabels {
        pairs.into_iter().collect()
    }
}

impl Serialize for FreeLabels {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_map(self.iter())
    }
}

impl<'de> Deserialize<'de> for FreeLabels {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<FreeLabels, D::Error> {
        Ok(BTreeMap::<String, String>::deserialize(deserializer)?.into_iter().collect())
    }
}

impl CatalogRow {
    /// The row as labels: `site`, `asset`, `owner` (when not empty) and the free labels (which
    /// never override those three).
    pub fn labels(&self) -> crate::Labels {
        crate::Labels::from_pairs(self.label_pairs())
    }

    /// The row's labels as pairs, as [`CatalogRow::labels`] takes them: `site`, `asset` and
    /// `owner` when not empty, then the free labels.
    pub fn label_pairs(&self) -> impl Iterator<Item = (&str, &str)> {
        let free = self.labels.iter();
        ["site", "asset", "owner"]
            .into_iter()
            .zip([self.site.as_ref(), self.asset.as_ref(), self.owner.as_ref()])
            .filter(|(_, value)| !value.is_empty())
            .chain(free)
    }
}

/// One change of the catalog: a row inserted (`diff = 1`) or retracted (`diff = -1`). The
/// row is shared: the source that keeps the catalog and every component its updates reach
/// hold the same copy.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CatalogUpdate {
    /// `1` inserts the row, `-1` retracts it.
    pub diff: i64,
    /// The row.
    pub row: Arc<CatalogRow>,
}

/// Why a catalog update or file could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CatalogError {
    /// A payload is not a catalog update.
    #[error("not a catalog update: {0}")]
    Update(String),
    /// A line of a catalog file is not a row.
    #[error("line {line}: {reason}")]
    Row {
        /// The line number, from 1.
        line: usize,
        /// What is wrong.
        reason: String,
    },
    /// The file as a whole cannot be read (no header, no `device` column).
    #[error("{0}")]
    File(String),
    /// A message (a Kafka record's value, an MQTT payload) is not one JSON row.
    #[error("not a catalog row: {0}")]
    NotARow(String),
}

impl CatalogUpdate {
    /// An update of `row`: `diff = 1` inserts it, `-1` retracts it.
    pub fn new(diff: i64, row: impl Into<Arc<CatalogRow>>) -> CatalogUpdate {
        CatalogUpdate { diff, row: row.into() }
    }

    /// The update as one JSON object, as sinks write it.
    pub fn to_json(&self) -> Vec<u8> {
        // A struct of strings, maps and finite numbers always serializes.
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// Reads an update written by [`CatalogUpdate::to_json`].
    pub fn from_json(payload: &[u8]) -> Result<CatalogUpdate, CatalogError> {
        let update: CatalogUpdate = serde_json::from_slice(payload)
            .map_err(|error| CatalogError::Update(error.to_string()))?;
        if update.diff != 1 && update.diff != -1 {
            return Err(CatalogError::Update(format!("diff is {}, not 1 or -1", update.diff)));
        }
        Ok(update)
    }
}

/// The formats of a catalog file.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CatalogFormat {
    /// A header line naming the columns, then one row a line. `device` is required; `site`,
    /// `asset`, `owner`, `threshold` and `valid_from` are known; every other column is a free
    /// label (empty cells are left out).
    Csv,
    /// One JSON object a line: `device` (required), `site`, `asset`, `owner`, `threshold`
    /// (a number), `valid_from` (a timestamp), `labels` (an object of strings); any other key
    /// whose value is a string, number or boolean is a free label.
    Jsonl,
}

/// A parsed catalog file: its rows by device, and the lines that were skipped.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ParsedCatalog {
    /// The rows, sorted by device, one each.
    pub rows: Vec<Arc<CatalogRow>>,
    /// The lines that are not rows, and devices given twice (the first row stays), by line.
    pub errors: Vec<CatalogError>,
}

impl ParsedCatalog {
    /// The row of `device`.
    pub fn row(&self, device: &str) -> Option<&CatalogRow> {
        let at = self.rows.binary_search_by(|row| row.device.as_str().cmp(device)).ok()?;
        Some(&self.rows[at])
    }
}

/// Parses a catalog file. Blank lines are skipped; a bad line is reported in
/// [`ParsedCatalog::errors`] and left out; only a file without a usable header fails.
pub fn parse_catalog(text: &[u8], format: CatalogFormat) -> Result<ParsedCatalog, CatalogError> {
    let mut parsed = ParsedCatalog::default();
    let mut lines = text.split(|byte| *byte == b'\n').enumerate().map(|(i, line)| (i + 1, line));
    let header = match format {
        CatalogFormat::Csv => {
            let Some((_, line)) = lines.find(|(_, line)| !is_blank(line)) else {
                return Ok(parsed);
            };
            let names = header_names(line, Delimiter::COMMA)
                .map_err(|reason| CatalogError::File(format!("header: {reason}")))?;
            if !names.iter().any(|name| name.as_ref() == "device") {
                return Err(CatalogError::File("the header has no `device` column".to_owned()));
            }
            Some(names)
        }
        CatalogFormat::Jsonl => None,
    };
    let mut rows: Vec<(usize, CatalogRow)> = Vec::new();
    let mut pool = TextPool::default();
    for (number, line) in lines {
        if is_blank(line) {
            continue;
        }
        let row = match &header {
            Some(names) => csv_row(line, names, &mut pool),
            None => json_row(line, &mut pool),
        };
        match row {
            Ok(row) => rows.push((number, row)),
            Err(reason) => parsed.errors.push(CatalogError::Row { line: number, reason }),
        }
    }
    // By device (a file often is already); of a device listed twice, the first row stays.
    if !rows.is_sorted_by(|a, b| a.1.device < b.1.device) {
        rows.sort_by(|a, b| a.1.device.cmp(&b.1.device));
    }
    parsed.rows.reserve(rows.len());
    for (number, row) in rows {
        if parsed.rows.last().is_some_and(|last| last.device == row.device) {
            let reason = format!("device `{}` is listed twice; the first row stays", row.device);
            parsed.errors.push(CatalogError::Row { line: number, reason });
        } else {
            parsed.rows.push(Arc::new(row));
        }
    }
    parsed.errors.sort_by_key(|error| match error {
        CatalogError::Row { line, .. } => *line,
        _ => 0,
    });
    Ok(parsed)
}

/// Texts kept once each, handed out as shared strings: a catalog's sites, asset types, owners
/// and labels repeat from row to row (one pool per parsed file; `enrich` keeps one for the
/// label sets it builds).
#[derive(Clone, Debug, Default)]
pub struct TextPool(std::collections::HashSet<Arc<str>>);

impl TextPool {
    /// The one copy of `text`, made the first time it is asked for.
    pub fn get(&mut self, text: &str) -> Arc<str> {
        if let Some(shared) = self.0.get(text) {
            return Arc::clone(shared);
        }
        let shared: Arc<str> = Arc::from(text);
        self.0.insert(Arc::clone(&shared));
        shared
    }
}

fn is_blank(line: &[u8]) -> bool {
    line.iter().all(u8::is_ascii_whitespace)
}

fn threshold_of(text: &str) -> Result<ThresholdOverride, String> {
    match text.trim().parse::<f32>() {
        Ok(value) if value.is_finite() => Ok(ThresholdOverride(value)),
        _ => Err(format!("threshold `{text}` is not a finite number")),
    }
}

fn valid_from_of(text: &str) -> Result<crate::EventTime, String> {
    crate::time::parse_timestamp(text.trim(), crate::time::TimestampFormat::Auto).map_err(|_| {
        format!("valid_from `{text}` is not a timestamp (ms or s since the epoch, or RFC 3339)")
    })
}

fn csv_row(line: &[u8], names: &[Arc<str>], pool: &mut TextPool) -> Result<CatalogRow, String> {
    let mut row = CatalogRow::default();
    let mut problem = None;
    split_record(line, Delimiter::COMMA, |column, text| {
        let Some(name) = names.get(column) else {
            problem = Some(format!("more cells than the header's {} columns", names.len()));
            return false;
        };
        let text = String::from_utf8_lossy(&text);
        let value = text.trim();
        match name.as_ref() {
            "device" => row.device = value.to_owned(),
            "site" => row.site = pool.get(value),
            "asset" => row.asset = pool.get(value),
            "owner" => row.owner = pool.get(value),
            "threshold" if value.is_empty() => {}
            "threshold" => match threshold_of(value) {
                Ok(threshold) => row.threshold = Some(threshold),
                Err(reason) => problem = Some(reason),
            },
            "valid_from" if value.is_empty() => {}
            "valid_from" => match valid_from_of(value) {
                Ok(time) => row.valid_from = Some(time),
                Err(reason) => problem = Some(reason),
            },
            _ if value.is_empty() || name.is_empty() => {}
            _ => {
                row.labels.insert(Arc::clone(name), pool.get(value));
            }
        }
        problem.is_none()
    })?;
    if let Some(problem) = problem {
        return Err(problem);
    }
    if row.device.is_empty() {
        return Err("the device is empty".to_owned());
    }
    Ok(row)
}

/// Parses one catalog row written as a JSON object, the format of a line of a JSON-lines
/// catalog ([`CatalogFormat::Jsonl`]): the value of a record of a Kafka catalog topic, the
/// payload of a retained MQTT catalog message.
///
/// ```
/// use tidewatch_api::catalog::parse_json_row;
///
/// let row = parse_json_row(br#"{"device":"p1","site":"north","line":2}"#).expect("a row");
/// assert_eq!((row.device.as_str(), &*row.site), ("p1", "north"));
/// assert_eq!(row.labels.get("line"), Some("2"));
/// assert!(parse_json_row(br#"{"site":"north"}"#).is_err());
/// ```
pub fn parse_json_row(payload: &[u8]) -> Result<CatalogRow, CatalogError> {
    json_row(payload, &mut TextPool::default()).map_err(CatalogError::NotARow)
}

fn json_row(line: &[u8], pool: &mut TextPool) -> Result<CatalogRow, String> {
    let value: serde_json::Value =
        serde_json::from_slice(line).map_err(|error| format!("not JSON: {error}"))?;
    let serde_json::Value::Object(object) = value else {
        return Err("not a JSON object".to_owned());
    };
    let mut row = CatalogRow::default();
    for (key, value) in object {
        let text = match &value {
            serde_json::Value::String(text) => Some(text.clone()),
            serde_json::Value::Number(number) => Some(number.to_string()),
            serde_json::Value::Bool(flag) => Some(flag.to_string()),
            _ => None,
        };
        match (key.as_str(), text) {
            ("labels", None) => {
                let serde_json::Value::Object(labels) = value else {
                    return Err("`labels` is not an object".to_owned());
                };
                for (name, label) in labels {
                    let serde_json::Value::String(label) = label else {
                        return Err(format!("label `{name}` is not a string"));
                    };
                    row.labels.insert(pool.get(&name), pool.get(&label));
                }
            }
            ("threshold", None) if value.is_null() => {}
            ("threshold", Some(text)) if value.is_number() => {
                row.threshold = Some(threshold_of(&text)?)
            }
            ("valid_from", None) if value.is_null() => {}
            ("valid_from", Some(text)) if value.is_number() || value.is_string() => {
                row.valid_from = Some(valid_from_of(&text)?)
            }
            ("device", Some(text)) if value.is_string() => row.device = text,
            ("site", Some(text)) if value.is_string() => row.site = pool.get(&text),
            ("asset", Some(text)) if value.is_string() => row.asset = pool.get(&text),
            ("owner", Some(text)) if value.is_string() => row.owner = pool.get(&text),
            ("device" | "site" | "asset" | "owner" | "threshold" | "valid_from" | "labels", _) => {
                return Err(format!("`{key}` has the wrong type"));
            }
            (_, Some(text)) => {
                row.labels.insert(pool.get(&key), pool.get(&text));
            }
            (_, None) => return Err(format!("label `{key}` is not a string, number or boolean")),
        }
    }
    if row.device.is_empty() {
        return Err("no `device`, or an empty one".to_owned());
    }
    Ok(row)
}

/// The updates that turn catalog `before` into `after` (both sorted by device, one row each,
/// as [`ParsedCatalog::rows`]), by device: a row that changed is retracted then inserted
/// again, one that left is retracted, a new one inserted; unchanged rows give nothing.
pub fn diff_catalogs(before: &[Arc<CatalogRow>], after: &[Arc<CatalogRow>]) -> Vec<CatalogUpdate> {
    let mut updates = Vec::new();
    // Both in device order at once: one pass, no lookups.
    let (mut old, mut new) = (before.iter().peekable(), after.iter().peekable());
    loop {
        let order = match (old.peek(), new.peek()) {
            (None, None) => break,
            (Some(_), None) => Ordering::Less,
            (None, Some(_)) => Ordering::Greater,
            (Some(a), Some(b)) => a.device.cmp(&b.device),
        };
        let (gone, came) = match order {
            Ordering::Less => (old.next(), None),
            Ordering::Greater => (None, new.next()),
            Ordering::Equal => match (old.next(), new.next()) {
                (Some(a), Some(b)) if a != b => (Some(a), Some(b)),
                _ => (None, None),
            },
        };
        if let Some(row) = gone {
            updates.push(CatalogUpdate { diff: -1, row: Arc::clone(row) });
        }
        if let Some(row) = came {
            updates.push(CatalogUpdate { diff: 1, row: Arc::clone(row) });
        }
    }
    updates
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csv_columns_beyond_the_known_ones_are_labels_and_bad_lines_are_reported() {
        let text = b"device,site,asset,owner,threshold,floor\n\
            p1,north,pump,ops,0.5,2\n\
            p2,north,fan,ops,,\n\
            p3,south,pump,ops,high,1\n\
            ,south,pump,ops,,\n\
            p1,east,pump,ops,,\n";
        let parsed = parse_catalog(text, CatalogFormat::Csv).expect("header");
        assert_eq!(parsed.rows.len(), 2);
        let p1 = parsed.row("p1").expect("p1");
        assert_eq!(&*p1.site, "north");
        assert_eq!(p1.threshold, Some(ThresholdOverride(0.5)));
        assert_eq!(p1.labels.get("floor"), Some("2"));
        assert!(parsed.row("p2").is_some_and(|row| row.labels.is_empty()));
        let lines: Vec<usize> = parsed
            .errors
            .iter()
            .map(|error| match error {
                CatalogError::Row { line, .. } => *line,
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(lines, [4, 5, 6]);
        let labels = p1.labels();
        assert_eq!(labels.get("site"), Some("north"));
        assert_eq!(labels.get("floor"), Some("2"));
    }

    #[test]
    fn valid_from_is_read_as_a_timestamp_in_both_formats() {
        let csv =
            b"device,site,valid_from\np1,north,1700000000000\np2,north,2023-11-14T22:13:20Z\n\
                    p3,north,\np4,north,soon\n";
        let parsed = parse_catalog(csv, CatalogFormat::Csv).expect("parses");
        let from = |device: &str| parsed.row(device).and_then(|row| row.valid_from);
        assert_eq!(from("p1"), Some(1_700_000_000_000));
        assert_eq!(from("p2"), Some(1_700_000_000_000));
        assert_eq!(from("p3"), None, "empty: from where the stream stands");
        assert!(parsed.row("p4").is_none());
        assert_eq!(parsed.errors.len(), 1, "{:?}", parsed.errors);
        assert!(parsed.errors[0].to_string().contains("valid_from `soon`"), "{:?}", parsed.errors);
        let json = b"{\"device\":\"p1\",\"valid_from\":1700000000}\n{\"device\":\"p2\",\"valid_from\":[1]}\n";
        let parsed = parse_catalog(json, CatalogFormat::Jsonl).expect("parses");
        assert_eq!(
            parsed.row("p1").and_then(|row| row.valid_from),
            Some(1_700_000_000_000),
            "seconds"
        );
        assert_eq!(parsed.errors.len(), 1, "{:?}", parsed.errors);
    }

    #[test]
    fn a_csv_file_without_a_device_column_fails() {
        let error =
            parse_catalog(b"id,site\np1,north\n", CatalogFormat::Csv).expect_err("no device");
        assert!(matches!(error, CatalogError::File(_)), "{error:?}");
        assert!(parse_catalog(b"", CatalogFormat::Csv).expect("empty").rows.is_empty());
    }

    #[test]
    fn json_lines_take_labels_from_the_object_and_from_other_keys() {
        let text =
            br#"{"device":"p1","site":"north","labels":{"zone":"a"},"floor":2,"threshold":1.5}
{"device":"p2","site":3}
not json
{"device":"p3","extra":[1]}
"#;
        let parsed = parse_catalog(text, CatalogFormat::Jsonl).expect("parses");
        assert_eq!(parsed.rows.len(), 1);
        let p1 = parsed.row("p1").expect("p1");
        assert_eq!(p1.labels.get("zone"), Some("a"));
        assert_eq!(p1.labels.get("floor"), Some("2"));
        assert_eq!(p1.threshold, Some(ThresholdOverride(1.5)));
        assert_eq!(parsed.errors.len(), 3);
    }

    #[test]
    fn updates_round_trip_and_a_bad_diff_is_refused() {
        let row =
            CatalogRow { device: "p1".to_owned(), site: "north".into(), ..CatalogRow::default() };
        let update = CatalogUpdate::new(-1, row);
        assert_eq!(CatalogUpdate::from_json(&update.to_json()), Ok(update));
        let bad = br#"{"diff":2,"row":{"device":"p1"}}"#;
        assert!(CatalogUpdate::from_json(bad).is_err());
        assert!(CatalogUpdate::from_json(b"{}").is_err());
        // Escapes and labels survive the trip; the labels are the fixed fields, then the
        // free ones.
        let escaped = CatalogUpdate::new(
            1,
            CatalogRow {
                device: "p\"1\u{e9}".to_owned(),
                site: "north".into(),
                labels: [("a\\b".to_owned(), "1".to_owned()), ("z".to_owned(), "2".to_owned())]
                    .into(),
                threshold: Some(ThresholdOverride(0.5)),
                valid_from: Some(7),
                ..CatalogRow::default()
            },
        );
        assert_eq!(CatalogUpdate::from_json(&escaped.to_json()).as_ref(), Ok(&escaped));
        let pairs: Vec<(&str, &str)> = escaped.row.label_pairs().collect();
        assert_eq!(pairs, [("site", "north"), ("a\\b", "1"), ("z", "2")]);
        let labels = escaped.row.labels();
        assert_eq!(
            labels.iter().collect::<Vec<_>>(),
            [("a\\b", "1"), ("site", "north"), ("z", "2")]
        );
        assert!(
            CatalogUpdate::from_json(br#"{"diff":1,"row":{"device":"p","labels":{"a":1}}}"#)
                .is_err()
        );
    }

    #[test]
    fn a_diff_retracts_what_went_and_changed_and_inserts_what_came_in_device_order() {
        let row = |device: &str, site: &str| CatalogRow {
            device: device.to_owned(),
            site: site.into(),
            ..CatalogRow::default()
        };
        let map = |rows: &[CatalogRow]| -> Vec<Arc<CatalogRow>> {
            rows.iter().map(|row| Arc::new(row.clone())).collect()
        };
        let before = map(&[row("a", "n"), row("b", "n"), row("c", "n"), row("e", "n")]);
        let after = map(&[row("b", "s"), row("c", "n"), row("d", "n"), row("e", "n")]);
        let updates: Vec<(i64, String, String)> = diff_catalogs(&before, &after)
            .into_iter()
            .map(|update| (update.diff, update.row.device.clone(), update.row.site.to_string()))
            .collect();
        let expected = [(-1, "a", "n"), (-1, "b", "n"), (1, "b", "s"), (1, "d", "n")];
        let expected: Vec<(i64, String, String)> = expected
            .iter()
            .map(|(diff, device, site)| (*diff, (*device).to_owned(), (*site).to_owned()))
            .collect();
        assert_eq!(updates, expected);
        assert!(diff_catalogs(&after, &after).is_empty());
        assert_eq!(diff_catalogs(&[], &after).len(), after.len());
        assert_eq!(diff_catalogs(&before, &[]).len(), before.len());
    }
}
