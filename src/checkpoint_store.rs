//! Checkpoints in the object store (feature `s3`): the engine keeps checkpoints behind its
//! [`CheckpointStore`] trait and knows local folders; this adapter puts them in the lake's
//! [`Store`] for `checkpoint_url = "s3://BUCKET/PREFIX"` (endpoint and credentials from the
//! environment, as for the lake).

use std::fmt;
use std::sync::Arc;

use bytes::Bytes;
use tidewatch_connectors::lake::{LakeUrl, S3Config, Store, StoreError as LakeError};
use tidewatch_engine::Pipeline;
use tidewatch_engine::checkpoint::{CheckpointStore, StoreError};

/// A [`CheckpointStore`] in an object store (or a `file://` folder through it).
pub struct ObjectCheckpointStore {
    store: Store,
    runtime: tokio::runtime::Runtime,
}

impl fmt::Debug for ObjectCheckpointStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ObjectCheckpointStore").field("store", &self.store.display()).finish()
    }
}

fn backend(error: LakeError) -> StoreError {
    StoreError::Backend(error.to_string())
}

impl ObjectCheckpointStore {
    /// Opens the store of `url` (nothing is contacted yet).
    pub fn open(url: &str, base: &std::path::Path) -> Result<ObjectCheckpointStore, StoreError> {
        let url = LakeUrl::parse(url, base).map_err(backend)?;
        let store = Store::open(&url, &S3Config::default(), base).map_err(backend)?;
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|error| StoreError::Backend(format!("cannot start a runtime: {error}")))?;
        Ok(ObjectCheckpointStore { store, runtime })
    }
}

impl CheckpointStore for ObjectCheckpointStore {
    fn put(&self, key: &str, bytes: &[u8]) -> Result<(), StoreError> {
        self.runtime
            .block_on(self.store.put_atomic(key, Bytes::copy_from_slice(bytes)))
            .map_err(backend)
    }

    fn get(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        match self.runtime.block_on(self.store.get(key)) {
            Ok(bytes) => Ok(Some(bytes.to_vec())),
            Err(LakeError::NotFound(_)) => Ok(None),
            Err(error) => Err(backend(error)),
        }
    }

    fn list(&self, prefix: &str) -> Result<Vec<String>, StoreError> {
        // Listed by folder (the part of the prefix up to its last `/`), then filtered.
        let folder = prefix.rsplit_once('/').map_or("", |(folder, _)| folder);
        let mut keys = self.runtime.block_on(self.store.list(folder)).map_err(backend)?;
        keys.retain(|key| key.starts_with(prefix));
        Ok(keys)
    }

    fn delete_prefix(&self, prefix: &str) -> Result<(), StoreError> {
        for key in self.list(prefix)? {
            self.runtime.block_on(self.store.delete(&key)).map_err(backend)?;
        }
        Ok(())
    }

    fn describe(&self) -> String {
        self.store.display().to_owned()
    }
}

/// The object store of a pipeline's `checkpoint_url` when it is `s3://`; `None` for local
/// folders (the engine opens those itself) or a pipeline without checkpoints.
pub fn for_pipeline(pipeline: &Pipeline) -> Result<Option<Arc<dyn CheckpointStore>>, StoreError> {
    let settings = &pipeline.settings;
    match &settings.checkpoint_url {
        Some(url) if settings.checkpoint_interval_secs > 0 && url.starts_with("s3://") => {
            Ok(Some(Arc::new(ObjectCheckpointStore::open(url, &pipeline.info.base_dir)?)))
        }
        _ => Ok(None),
    }
}
