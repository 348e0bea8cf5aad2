//! Where checkpoints are kept: a small key-value trait with a local folder and an in-memory
//! implementation here; the object store (`s3://`, through the lake's store) is plugged in
//! by the `tidewatch` crate.

use std::collections::BTreeMap;
use std::fmt;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError};

/// Why the checkpoint store failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A file-system operation failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// The backend (an object store) failed.
    #[error("{0}")]
    Backend(String),
}

fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> StoreError {
    let context = context.into();
    move |source| StoreError::Io { context, source }
}

/// A flat namespace of keys (`/`-separated) holding bytes: enough to keep checkpoints.
pub trait CheckpointStore: Send + Sync + fmt::Debug {
    /// Writes `bytes` at `key`, atomically: a reader sees the old content, or all the new.
    fn put(&self, key: &str, bytes: &[u8]) -> Result<(), StoreError>;
    /// The bytes at `key`; `None` if there are none.
    fn get(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError>;
    /// Every key that starts with `prefix`, sorted.
    fn list(&self, prefix: &str) -> Result<Vec<String>, StoreError>;
    /// Deletes every key that starts with `prefix`.
    fn delete_prefix(&self, prefix: &str) -> Result<(), StoreError>;
    /// Where the store is, for logs.
    fn describe(&self) -> String;
}

/// Checkpoints in a local folder (a PersistentVolume in Kubernetes).
#[derive(Debug)]
pub struct LocalStore {
    root: PathBuf,
}

impl LocalStore {
    /// A store in `root` (created if missing).
    pub fn open(root: impl Into<PathBuf>) -> Result<LocalStore, StoreError> {
        let root = root.into();
        std::fs::create_dir_all(&root)
            .map_err(io(format!("cannot create the checkpoint folder {}", root.display())))?;
        Ok(LocalStore { root })
    }

    fn path(&self, key: &str) -> PathBuf {
        key.split('/')
            .filter(|part| !part.is_empty() && *part != "..")
            .fold(self.root.clone(), |path, part| path.join(part))
    }
}

fn walk(root: &Path, dir: &Path, keys: &mut Vec<String>) -> Result<(), StoreError> {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(error) => return Err(io(format!("cannot list {}", dir.display()))(error)),
    };
    for entry in entries {
        let entry = entry.map_err(io(format!("cannot list {}", dir.display())))?;
        let path = entry.path();
        if path.is_dir() {
            walk(root, &path, keys)?;
        } else if let Ok(relative) = path.strip_prefix(root) {
            let key: Vec<String> = relative
                .components()
                .map(|part| part.as_os_str().to_string_lossy().into_owned())
                .collect();
            let key = key.join("/");
            if !key.ends_with(".tmp") {
                keys.push(key);
            }
        }
    }
    Ok(())
}

impl CheckpointStore for LocalStore {
    fn put(&self, key: &str, bytes: &[u8]) -> Result<(), StoreError> {
        let path = self.path(key);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)
                .map_err(io(format!("cannot create {}", parent.display())))?;
        }
        let temporary = path.with_extension("tmp");
        let mut file = std::fs::File::create(&temporary)
            .map_err(io(format!("cannot create {}", temporary.display())))?;
        file.write_all(bytes).map_err(io(format!("cannot write {}", temporary.display())))?;
        file.sync_all().map_err(io(format!("cannot sync {}", temporary.display())))?;
        std::fs::rename(&temporary, &path)
            .map_err(io(format!("cannot rename {} into place", temporary.display())))?;
        if let Some(parent) = path.parent()
            && let Ok(dir) = std::fs::File::open(parent)
        {
            // The rename is durable once the folder is synced (best effort).
            let _ = dir.sync_all();
        }
        Ok(())
    }

    fn get(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let path = self.path(key);
        match std::fs::read(&path) {
            Ok(bytes) => Ok(Some(bytes)),
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(error) => Err(io(format!("cannot read {}", path.display()))(error)),
        }
    }

    fn list(&self, prefix: &str) -> Result<Vec<String>, StoreError> {
        let mut keys = Vec::new();
        walk(&self.root, &self.root, &mut keys)?;
        keys.retain(|key| key.starts_with(prefix));
        keys.sort();
        Ok(keys)
    }

    fn delete_prefix(&self, prefix: &str) -> Result<(), StoreError> {
        for key in self.list(prefix)? {
            let path = self.path(&key);
            match std::fs::remove_file(&path) {
                Ok(()) => {}
                Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
                Err(error) => return Err(io(format!("cannot delete {}", path.display()))(error)),
            }
        }
        // Empty folders left behind (best effort).
        let folder = self.path(prefix.trim_end_matches('/'));
        if folder != self.root && folder.is_dir() {
            let _ = std::fs::remove_dir_all(&folder);
        }
        Ok(())
    }

    fn describe(&self) -> String {
        self.root.display().to_string()
    }
}

/// Checkpoints in memory (unit tests of the protocol).
#[derive(Debug, Default)]
pub struct MemoryStore {
    entries: Mutex<BTreeMap<String, Vec<u8>>>,
}

impl MemoryStore {
    /// An empty store.
    pub fn new() -> MemoryStore {
        MemoryStore::default()
    }

    fn entries(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Vec<u8>>> {
        self.entries.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl CheckpointStore for MemoryStore {
    fn put(&self, key: &str, bytes: &[u8]) -> Result<(), StoreError> {
        self.entries().insert(key.to_owned(), bytes.to_vec());
        Ok(())
    }

    fn get(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self.entries().get(key).cloned())
    }

    fn list(&self, prefix: &str) -> Result<Vec<String>, StoreError> {
        Ok(self.entries().keys().filter(|key| key.starts_with(prefix)).cloned().collect())
    }

    fn delete_prefix(&self, prefix: &str) -> Result<(), StoreError> {
        self.entries().retain(|key, _| !key.starts_with(prefix));
        Ok(())
    }

    fn describe(&self) -> String {
        "memory".to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round_trip(store: &dyn CheckpointStore) {
        store.put("0001/state/w/0", b"one").expect("put");
        store.put("0001/manifest.json", b"{}").expect("put");
        store.put("0002/state/w/0", b"two").expect("put");
        assert_eq!(store.get("0001/state/w/0").expect("get").as_deref(), Some(&b"one"[..]));
        assert_eq!(store.get("0003/manifest.json").expect("get"), None);
        assert_eq!(
            store.list("0001/").expect("list"),
            vec!["0001/manifest.json".to_owned(), "0001/state/w/0".to_owned()]
        );
        store.delete_prefix("0001/").expect("delete");
        assert_eq!(store.list("").expect("list"), vec!["0002/state/w/0".to_owned()]);
    }

    #[test]
    fn local_and_memory_stores_behave_alike() {
        let dir = tempfile::tempdir().expect("tempdir");
        round_trip(&LocalStore::open(dir.path().join("ck")).expect("open"));
        round_trip(&MemoryStore::new());
    }
}
