//! A catalog kept as keyed messages: a Kafka compacted topic (key = device id) or retained MQTT
//! messages (key = topic). Each message holds the whole row of its key, or nothing (a Kafka
//! tombstone, an empty MQTT payload): [`KeyedCatalog`] turns each into the difference against
//! what the key held before, as the file source turns a new version of its file into one.

use std::collections::{BTreeMap, BTreeSet};

use std::sync::Arc;

use tidewatch_api::catalog::{CatalogRow, CatalogUpdate, parse_json_row};
use tidewatch_api::{Batch, Outputs};

/// Why a keyed message did not give a row. The key then holds no row (what it held before is
/// retracted), as a line that is not a row counts as absent in a catalog file: the catalog
/// depends on the latest message of each key only, as a compacted topic keeps it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyedError {
    /// The payload is not one JSON row.
    #[error("key `{key}`: {reason}")]
    NotARow {
        /// The message's key (Kafka key, MQTT topic).
        key: String,
        /// What is wrong with the payload.
        reason: String,
    },
    /// A Kafka record whose value names another device than its key.
    #[error("key `{key}`: the row is of device `{device}`; the key must be the device id")]
    NotTheKey {
        /// The record's key.
        key: String,
        /// The device the value names.
        device: String,
    },
    /// Another key holds a row of the same device (two MQTT topics): the row of the first key
    /// in byte order is used, whichever came first, so every worker keeps the same one.
    #[error("key `{key}`: device `{device}` is also held by `{used}`; the row of `{used}` is used")]
    Duplicate {
        /// The key of the message.
        key: String,
        /// The device both keys hold.
        device: String,
        /// The key whose row is used (the first in byte order).
        used: String,
    },
}

/// What one message changed: the updates to send, and why its payload was refused, if it was.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Applied {
    /// Retractions and insertions, in that order per device.
    pub updates: Vec<CatalogUpdate>,
    /// The message's problem (it was reported and its key holds no row), or a duplicate device.
    pub error: Option<KeyedError>,
}

/// The rows of a catalog kept as keyed messages, and the difference each message makes.
///
/// ```
/// use tidewatch_connectors::catalog::keyed::KeyedCatalog;
///
/// let mut catalog = KeyedCatalog::new(true);
/// let inserted = catalog.apply("p1", Some(br#"{"device":"p1","site":"north"}"#));
/// assert_eq!(inserted.updates.len(), 1);
/// let moved = catalog.apply("p1", Some(br#"{"device":"p1","site":"south"}"#));
/// let diffs: Vec<(i64, &str)> =
///     moved.updates.iter().map(|u| (u.diff, &*u.row.site)).collect();
/// assert_eq!(diffs, [(-1, "north"), (1, "south")]);
/// let deleted = catalog.apply("p1", None);
/// assert_eq!(deleted.updates[0].diff, -1);
/// assert!(catalog.is_empty());
/// ```
#[derive(Debug, Clone, Default)]
pub struct KeyedCatalog {
    /// The key is the device id (Kafka): a row of another device is refused.
    key_is_device: bool,
    /// The rows by key.
    rows: BTreeMap<String, Arc<CatalogRow>>,
    /// The keys holding a row of each device; the first one's row is the device's.
    holders: BTreeMap<String, BTreeSet<String>>,
}

impl KeyedCatalog {
    /// An empty catalog; `key_is_device` refuses rows whose device is not their key.
    pub fn new(key_is_device: bool) -> KeyedCatalog {
        KeyedCatalog { key_is_device, ..KeyedCatalog::default() }
    }

    /// The device's row: that of the first key (in byte order) holding one.
    pub fn row(&self, device: &str) -> Option<&Arc<CatalogRow>> {
        let key = self.holders.get(device)?.first()?;
        self.rows.get(key)
    }

    /// The number of devices with a row.
    pub fn len(&self) -> usize {
        self.holders.len()
    }

    /// True when no device has a row.
    pub fn is_empty(&self) -> bool {
        self.holders.is_empty()
    }

    /// Applies the latest message of `key`: `Some(payload)` holds one JSON row, `None` (a
    /// tombstone, an emptied retained message) removes the key's row. Returns the updates that
    /// turn the catalog before the message into the catalog after it (nothing when the row did
    /// not change).
    pub fn apply(&mut self, key: &str, payload: Option<&[u8]>) -> Applied {
        let mut error = None;
        let new = match payload.map(parse_json_row) {
            None => None,
            Some(Err(problem)) => {
                error =
                    Some(KeyedError::NotARow { key: key.to_owned(), reason: problem.to_string() });
                None
            }
            Some(Ok(row)) if self.key_is_device && row.device != key => {
                error = Some(KeyedError::NotTheKey { key: key.to_owned(), device: row.device });
                None
            }
            Some(Ok(row)) => Some(row),
        };
        let mut devices: Vec<String> =
            self.rows.get(key).map(|old| old.device.clone()).into_iter().collect();
        if let Some(row) = &new
            && !devices.contains(&row.device)
        {
            devices.push(row.device.clone());
        }
        let before: Vec<Option<Arc<CatalogRow>>> =
            devices.iter().map(|device| self.row(device).cloned()).collect();
        if let Some(old) = self.rows.remove(key)
            && let Some(keys) = self.holders.get_mut(&old.device)
        {
            keys.remove(key);
            if keys.is_empty() {
                self.holders.remove(&old.device);
            }
        }
        if let Some(row) = new {
            let keys = self.holders.entry(row.device.clone()).or_default();
            keys.insert(key.to_owned());
            if keys.len() > 1 {
                let used = keys.first().cloned().unwrap_or_default();
                error = Some(KeyedError::Duplicate {
                    key: key.to_owned(),
                    device: row.device.clone(),
                    used,
                });
            }
            self.rows.insert(key.to_owned(), Arc::new(row));
        }
        let mut updates = Vec::new();
        for (device, old) in devices.iter().zip(before) {
            let new = self.row(device);
            if old.as_ref() == new {
                continue;
            }
            if let Some(old) = old {
                updates.push(CatalogUpdate { diff: -1, row: old });
            }
            if let Some(new) = new {
                updates.push(CatalogUpdate { diff: 1, row: Arc::clone(new) });
            }
        }
        Applied { updates, error }
    }
}

/// Sends `updates` as one batch, when there are any, as every catalog source does.
pub(crate) fn emit_updates(out: &mut Outputs, updates: Vec<CatalogUpdate>) {
    if !updates.is_empty() {
        out.emit(Batch::Catalog(updates));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn changes(applied: &Applied) -> Vec<(i64, String, String)> {
        applied
            .updates
            .iter()
            .map(|update| (update.diff, update.row.device.clone(), update.row.site.to_string()))
            .collect()
    }

    fn row(device: &str, site: &str) -> Vec<u8> {
        format!(r#"{{"device":"{device}","site":"{site}"}}"#).into_bytes()
    }

    fn change(diff: i64, device: &str, site: &str) -> (i64, String, String) {
        (diff, device.to_owned(), site.to_owned())
    }

    #[test]
    fn new_changed_unchanged_and_deleted_rows() {
        let mut catalog = KeyedCatalog::new(true);
        let applied = catalog.apply("p1", Some(&row("p1", "north")));
        assert_eq!(changes(&applied), [change(1, "p1", "north")]);
        assert_eq!(applied.error, None);
        // The same row again (a redelivery, a compaction's copy): nothing.
        assert!(catalog.apply("p1", Some(&row("p1", "north"))).updates.is_empty());
        assert_eq!(
            changes(&catalog.apply("p1", Some(&row("p1", "south")))),
            [change(-1, "p1", "north"), change(1, "p1", "south")]
        );
        assert_eq!(changes(&catalog.apply("p1", None)), [change(-1, "p1", "south")]);
        assert!(catalog.is_empty());
        // A tombstone for a key without a row: nothing.
        assert!(catalog.apply("p1", None).updates.is_empty());
    }

    #[test]
    fn a_bad_message_is_reported_and_its_key_holds_no_row() {
        let mut catalog = KeyedCatalog::new(true);
        catalog.apply("p1", Some(&row("p1", "north")));
        let applied = catalog.apply("p1", Some(b"{\"device\":"));
        assert!(matches!(applied.error, Some(KeyedError::NotARow { .. })), "{applied:?}");
        assert_eq!(changes(&applied), [change(-1, "p1", "north")]);
        let applied = catalog.apply("p2", Some(&row("p3", "east")));
        assert_eq!(
            applied.error,
            Some(KeyedError::NotTheKey { key: "p2".into(), device: "p3".into() })
        );
        assert!(applied.updates.is_empty());
        assert!(catalog.apply("p4", Some(b"")).error.is_some());
        assert!(catalog.is_empty());
    }

    #[test]
    fn two_topics_of_one_device_keep_the_first_keys_row_whatever_the_order() {
        for first_b in [false, true] {
            let mut catalog = KeyedCatalog::new(false);
            let mut sent = Vec::new();
            let order: [(&str, &str); 2] = if first_b {
                [("catalog/b", "south"), ("catalog/a", "north")]
            } else {
                [("catalog/a", "north"), ("catalog/b", "south")]
            };
            for (key, site) in order {
                let applied = catalog.apply(key, Some(&row("p1", site)));
                sent.extend(changes(&applied));
                if key == order[1].0 {
                    assert!(
                        matches!(&applied.error, Some(KeyedError::Duplicate { used, .. }) if used == "catalog/a"),
                        "{applied:?}"
                    );
                }
            }
            assert_eq!(catalog.row("p1").map(|row| &*row.site), Some("north"));
            // Clearing the used topic hands the device to the other one.
            sent.extend(changes(&catalog.apply("catalog/a", None)));
            assert_eq!(catalog.row("p1").map(|row| &*row.site), Some("south"));
            // What was sent adds up to the catalog: every insert retracted before the next.
            let mut live: BTreeMap<String, i64> = BTreeMap::new();
            for (diff, device, site) in &sent {
                let count = live.entry(format!("{device}@{site}")).or_default();
                *count += diff;
                assert!((0..=1).contains(count), "{sent:?}");
            }
            live.retain(|_, count| *count != 0);
            assert_eq!(live.keys().collect::<Vec<_>>(), ["p1@south"], "{sent:?}");
        }
    }

    #[test]
    fn a_topic_whose_row_moves_to_another_device_retracts_the_old_one() {
        let mut catalog = KeyedCatalog::new(false);
        catalog.apply("catalog/x", Some(&row("p1", "north")));
        assert_eq!(
            changes(&catalog.apply("catalog/x", Some(&row("p2", "north")))),
            [change(-1, "p1", "north"), change(1, "p2", "north")]
        );
        assert_eq!(catalog.len(), 1);
    }

    #[test]
    fn updates_leave_as_one_catalog_batch_and_nothing_leaves_for_none() {
        let mut catalog = KeyedCatalog::new(true);
        let applied = catalog.apply("p1", Some(&row("p1", "north")));
        let mut out = Outputs::new("devices");
        emit_updates(&mut out, applied.updates.clone());
        emit_updates(&mut out, Vec::new());
        let batches = out.take_main();
        assert_eq!(batches, [Batch::Catalog(applied.updates)]);
    }
}
