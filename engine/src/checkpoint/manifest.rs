//! Checkpoints in a store: every instance's state and staged output under the epoch's folder,
//! then the manifest, written last (atomically) so a checkpoint without one does not exist.
//!
//! ```text
//! 00000000000000000012/state/<component>/<worker>
//! 00000000000000000012/staged/<component>/<worker>/<n>
//! 00000000000000000012/manifest.json
//! ```

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use tidewatch_api::EventTime;
use tidewatch_api::records::stable_hash;

use super::protocol::Cut;
use super::store::{CheckpointStore, StoreError};

const FORMAT: u32 = 1;
const MANIFEST: &str = "manifest.json";

/// A stored piece of a checkpoint: its key, length and hash (checked when read back).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Blob {
    /// The key in the store.
    pub key: String,
    /// Its length, bytes.
    pub bytes: u64,
    /// FNV-1a of its content.
    pub hash: u64,
}

/// Staged sink output in a checkpoint: where it is published, and where it is kept.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StagedBlob {
    /// The key the sink publishes it under.
    pub publish: String,
    /// Where the checkpoint keeps it.
    pub blob: Blob,
}

/// One instance's entry in a manifest.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstanceEntry {
    /// The component id.
    pub component: String,
    /// The worker it ran on.
    pub worker: usize,
    /// The engine's watermark state of the instance.
    pub watermark: Option<EventTime>,
    /// The component's snapshot.
    pub state: Option<Blob>,
    /// Output to publish once this checkpoint is complete.
    #[serde(default)]
    pub staged: Vec<StagedBlob>,
}

/// The manifest of one checkpoint.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// The manifest format.
    pub format: u32,
    /// The pipeline's name.
    pub pipeline: String,
    /// The epoch.
    pub epoch: u64,
    /// When it was written, ms since the Unix epoch.
    pub created_ms: i64,
    /// The workers (of all processes) that took it.
    pub workers: usize,
    /// True for the final checkpoint of a graceful stop.
    pub stop: bool,
    /// Every instance.
    pub instances: Vec<InstanceEntry>,
}

/// A checkpoint read back: the manifest and every state it names.
#[derive(Debug)]
pub struct Loaded {
    /// The manifest.
    pub manifest: Manifest,
    /// The state of each instance, by its position in `manifest.instances`.
    pub states: Vec<Option<Vec<u8>>>,
}

impl Loaded {
    /// The instances of `component` with their states.
    pub fn component<'a>(
        &'a self,
        component: &'a str,
    ) -> impl Iterator<Item = (&'a InstanceEntry, Option<&'a [u8]>)> + 'a {
        self.manifest
            .instances
            .iter()
            .zip(&self.states)
            .filter(move |(entry, _)| entry.component == component)
            .map(|(entry, state)| (entry, state.as_deref()))
    }
}

/// Why a checkpoint could not be used.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    /// The store failed.
    #[error("checkpoint store: {0}")]
    Store(#[from] StoreError),
    /// The manifest is not one (truncated, another format).
    #[error("manifest {key} is unreadable: {reason}")]
    Manifest {
        /// Its key.
        key: String,
        /// Why.
        reason: String,
    },
    /// A piece the manifest names is missing or damaged.
    #[error("{key}: {reason}")]
    Blob {
        /// Its key.
        key: String,
        /// Why.
        reason: String,
    },
}

/// The folder of `epoch` (zero-padded, so keys sort by epoch).
pub fn epoch_prefix(epoch: u64) -> String {
    format!("{epoch:020}/")
}

fn put_blob(store: &dyn CheckpointStore, key: String, bytes: &[u8]) -> Result<Blob, StoreError> {
    store.put(&key, bytes)?;
    Ok(Blob { key, bytes: bytes.len() as u64, hash: stable_hash(bytes) })
}

/// Writes `cut` (states, staged output, then the manifest); returns the manifest and the
/// bytes written.
pub fn write(
    store: &dyn CheckpointStore,
    cut: &Cut,
    pipeline: &str,
    workers: usize,
    component_ids: &[String],
) -> Result<(Manifest, u64), StoreError> {
    let prefix = epoch_prefix(cut.epoch);
    let mut written = 0_u64;
    let mut instances = Vec::with_capacity(cut.reports.len());
    for (instance, report) in &cut.reports {
        let component = component_ids.get(instance.component).cloned().unwrap_or_default();
        let state = match &report.state {
            Some(bytes) => {
                written += bytes.len() as u64;
                Some(put_blob(
                    store,
                    format!("{prefix}state/{component}/{}", instance.worker),
                    bytes,
                )?)
            }
            None => None,
        };
        let mut staged = Vec::with_capacity(report.staged.len());
        for (n, piece) in report.staged.iter().enumerate() {
            written += piece.bytes.len() as u64;
            let blob = put_blob(
                store,
                format!("{prefix}staged/{component}/{}/{n}", instance.worker),
                &piece.bytes,
            )?;
            staged.push(StagedBlob { publish: piece.key.clone(), blob });
        }
        instances.push(InstanceEntry {
            component,
            worker: instance.worker,
            watermark: report.watermark,
            state,
            staged,
        });
    }
    let manifest = Manifest {
        format: FORMAT,
        pipeline: pipeline.to_owned(),
        epoch: cut.epoch,
        created_ms: tidewatch_api::records::now_ms(),
        workers,
        stop: cut.stop,
        instances,
    };
    let bytes = serde_json::to_vec_pretty(&manifest)
        .map_err(|error| StoreError::Backend(format!("cannot encode the manifest: {error}")))?;
    written += bytes.len() as u64;
    store.put(&format!("{prefix}{MANIFEST}"), &bytes)?;
    Ok((manifest, written))
}

/// Reads a blob and checks its length and hash.
pub fn read_blob(store: &dyn CheckpointStore, blob: &Blob) -> Result<Vec<u8>, CheckpointError> {
    let bytes = store.get(&blob.key)?.ok_or_else(|| CheckpointError::Blob {
        key: blob.key.clone(),
        reason: "missing".to_owned(),
    })?;
    if bytes.len() as u64 != blob.bytes || stable_hash(&bytes) != blob.hash {
        return Err(CheckpointError::Blob {
            key: blob.key.clone(),
            reason: format!(
                "damaged ({} bytes, {} expected, or another content)",
                bytes.len(),
                blob.bytes
            ),
        });
    }
    Ok(bytes)
}

fn load(store: &dyn CheckpointStore, key: &str) -> Result<Loaded, CheckpointError> {
    let bytes = store.get(key)?.ok_or_else(|| CheckpointError::Manifest {
        key: key.to_owned(),
        reason: "missing".to_owned(),
    })?;
    let manifest: Manifest = serde_json::from_slice(&bytes).map_err(|error| {
        CheckpointError::Manifest { key: key.to_owned(), reason: error.to_string() }
    })?;
    if manifest.format != FORMAT {
        return Err(CheckpointError::Manifest {
            key: key.to_owned(),
            reason: format!("format {} (this tidewatch reads {FORMAT})", manifest.format),
        });
    }
    let mut states = Vec::with_capacity(manifest.instances.len());
    for entry in &manifest.instances {
        states.push(match &entry.state {
            Some(blob) => Some(read_blob(store, blob)?),
            None => None,
        });
        for staged in &entry.staged {
            // Checked now: a checkpoint whose output cannot be published is not complete.
            read_blob(store, &staged.blob)?;
        }
    }
    Ok(Loaded { manifest, states })
}

/// The epochs that have a manifest, newest first.
fn manifests(store: &dyn CheckpointStore) -> Result<Vec<(u64, String)>, StoreError> {
    let mut found: Vec<(u64, String)> = store
        .list("")?
        .into_iter()
        .filter_map(|key| {
            let (epoch, rest) = key.split_once('/')?;
            (rest == MANIFEST)
                .then(|| epoch.parse::<u64>().ok().map(|epoch| (epoch, key.clone())))?
        })
        .collect();
    found.sort_by_key(|found| std::cmp::Reverse(found.0));
    Ok(found)
}

/// The latest complete checkpoint, skipping (with a log line) damaged ones; `None` when there
/// is none. Also returns the greatest epoch seen in the store, complete or not.
pub fn latest(store: &dyn CheckpointStore) -> Result<(Option<Loaded>, u64), StoreError> {
    let found = manifests(store)?;
    let greatest = greatest_epoch(store)?;
    for (epoch, key) in found {
        match load(store, &key) {
            Ok(loaded) => return Ok((Some(loaded), greatest)),
            Err(error) => tracing::warn!(
                epoch,
                %error,
                "skipping checkpoint {epoch}: it is incomplete or damaged; trying the one before"
            ),
        }
    }
    Ok((None, greatest))
}

fn greatest_epoch(store: &dyn CheckpointStore) -> Result<u64, StoreError> {
    Ok(store
        .list("")?
        .iter()
        .filter_map(|key| key.split_once('/').and_then(|(epoch, _)| epoch.parse::<u64>().ok()))
        .max()
        .unwrap_or(0))
}

/// Deletes every checkpoint but the newest `keep` complete ones up to `current`, and every
/// incomplete one older than `current`.
pub fn collect_garbage(
    store: &dyn CheckpointStore,
    current: u64,
    keep: usize,
) -> Result<usize, StoreError> {
    let complete: Vec<u64> = manifests(store)?
        .into_iter()
        .map(|(epoch, _)| epoch)
        .filter(|epoch| *epoch <= current)
        .collect();
    let kept: Vec<u64> = complete.iter().copied().take(keep.max(1)).collect();
    let mut epochs: Vec<u64> = store
        .list("")?
        .iter()
        .filter_map(|key| key.split_once('/').and_then(|(epoch, _)| epoch.parse::<u64>().ok()))
        .collect();
    epochs.dedup();
    let mut deleted = 0;
    for epoch in epochs {
        if epoch < current && !kept.contains(&epoch) {
            store.delete_prefix(&epoch_prefix(epoch))?;
            deleted += 1;
        }
    }
    Ok(deleted)
}

/// Deletes the folders of epochs after `epoch` (the remains of a run that crashed while
/// writing them), so their numbers can be used again.
pub fn discard_after(store: &dyn CheckpointStore, epoch: u64) -> Result<(), StoreError> {
    let mut later: Vec<u64> = store
        .list("")?
        .iter()
        .filter_map(|key| key.split_once('/').and_then(|(epoch, _)| epoch.parse::<u64>().ok()))
        .filter(|found| *found > epoch)
        .collect();
    later.dedup();
    for found in later {
        tracing::info!(epoch = found, "discarding an incomplete checkpoint");
        store.delete_prefix(&epoch_prefix(found))?;
    }
    Ok(())
}

/// The instances of a manifest by component id.
pub fn by_component(manifest: &Manifest) -> BTreeMap<&str, Vec<&InstanceEntry>> {
    let mut map: BTreeMap<&str, Vec<&InstanceEntry>> = BTreeMap::new();
    for entry in &manifest.instances {
        map.entry(entry.component.as_str()).or_default().push(entry);
    }
    map
}

#[cfg(test)]
mod tests {
    use tidewatch_api::Staged;

    use super::super::protocol::{Instance, Report};
    use super::super::store::MemoryStore;
    use super::*;

    fn cut(epoch: u64) -> Cut {
        let mut reports = BTreeMap::new();
        reports.insert(
            Instance { component: 0, worker: 0 },
            Report {
                watermark: Some(1_000),
                state: Some(format!("state {epoch}").into_bytes()),
                staged: vec![Staged { key: format!("part-{epoch}"), bytes: b"rows".to_vec() }],
                failed: false,
            },
        );
        reports.insert(Instance { component: 1, worker: 0 }, Report::default());
        Cut { epoch, stop: false, reports }
    }

    fn ids() -> Vec<String> {
        vec!["source".to_owned(), "sink".to_owned()]
    }

    #[test]
    fn a_written_checkpoint_reads_back() {
        let store = MemoryStore::new();
        write(&store, &cut(3), "p", 1, &ids()).expect("write");
        let (loaded, greatest) = latest(&store).expect("latest");
        let loaded = loaded.expect("a checkpoint");
        assert_eq!((loaded.manifest.epoch, greatest), (3, 3));
        let (entry, state) = loaded.component("source").next().expect("source");
        assert_eq!(state, Some(&b"state 3"[..]));
        assert_eq!(entry.watermark, Some(1_000));
        assert_eq!(entry.staged[0].publish, "part-3");
        assert_eq!(loaded.component("sink").next().map(|(_, state)| state), Some(None));
    }

    #[test]
    fn a_truncated_manifest_or_a_missing_state_falls_back_to_the_previous_checkpoint() {
        let store = MemoryStore::new();
        for epoch in 1..=3 {
            write(&store, &cut(epoch), "p", 1, &ids()).expect("write");
        }
        let manifest = store.get(&format!("{}manifest.json", epoch_prefix(3))).expect("get");
        let manifest = manifest.expect("manifest");
        store
            .put(&format!("{}manifest.json", epoch_prefix(3)), &manifest[..manifest.len() / 2])
            .expect("truncate");
        store.delete_prefix(&format!("{}state/", epoch_prefix(2))).expect("delete state");
        let (loaded, greatest) = latest(&store).expect("latest");
        assert_eq!(loaded.map(|loaded| loaded.manifest.epoch), Some(1));
        assert_eq!(greatest, 3);
        discard_after(&store, 1).expect("discard");
        assert!(store.list(&epoch_prefix(3)).expect("list").is_empty());
    }

    #[test]
    fn garbage_collection_keeps_the_newest() {
        let store = MemoryStore::new();
        for epoch in 1..=5 {
            write(&store, &cut(epoch), "p", 1, &ids()).expect("write");
        }
        store.put(&format!("{}state/source/0", epoch_prefix(2)), b"x").expect("put");
        assert_eq!(collect_garbage(&store, 5, 2).expect("gc"), 3);
        let left: Vec<u64> = manifests(&store).expect("list").iter().map(|(e, _)| *e).collect();
        assert_eq!(left, vec![5, 4]);
    }
}
