//! The model registry, in the same store as the lake:
//!
//! ```text
//! <prefix>/<name>/<version>/model.onnx
//! <prefix>/<name>/<version>/model.json
//! <prefix>/<name>/ACTIVE            the active version (one line)
//! ```
//!
//! A version is pushed `model.onnx` first and `model.json` last, so a version whose
//! `model.json` exists is complete; promoting rewrites `ACTIVE` (one atomic object). A
//! follower ([`ModelRegistry::sync_active`]) copies the active version into a local folder,
//! `model.onnx` then `model.json`, each written then renamed: the `autoencoder` watching
//! that folder (`watch = true`) swaps when `model.json` changes.

use std::path::Path;

use bytes::Bytes;
use serde::Deserialize;

use super::store::{LakeUrl, S3Config, Store, StoreError, write_then_rename};

/// The pointer object's name under a model's folder.
pub const ACTIVE: &str = "ACTIVE";

/// Why a registry operation failed.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A local model folder lacks a file or has an invalid `model.json`.
    #[error("{0}")]
    Model(String),
    /// The version does not exist in the registry.
    #[error("model {name} has no version {version} in the registry")]
    UnknownVersion {
        /// The model.
        name: String,
        /// The version asked for.
        version: String,
    },
    /// A name or version that cannot be a path segment.
    #[error("invalid {what} {value:?}: use letters, digits, '.', '-' and '_'")]
    InvalidName {
        /// `name` or `version`.
        what: &'static str,
        /// The value given.
        value: String,
    },
}

/// One version of a model in the registry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ModelVersion {
    /// The version.
    pub version: String,
    /// True for the version `ACTIVE` points at.
    pub active: bool,
}

#[derive(Deserialize)]
struct VersionOnly {
    version: String,
}

fn check_segment(what: &'static str, value: &str) -> Result<(), RegistryError> {
    let valid = !value.is_empty()
        && value != "."
        && value != ".."
        && value.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_'));
    if valid { Ok(()) } else { Err(RegistryError::InvalidName { what, value: value.to_owned() }) }
}

/// A registry at a URL (`s3://bucket/prefix` or a folder).
#[derive(Debug)]
pub struct ModelRegistry {
    store: Store,
    runtime: tokio::runtime::Runtime,
}

impl ModelRegistry {
    /// Opens the registry at `url` (S3 options and credentials as for the lake; relative
    /// folders resolve against the current folder).
    pub fn open(url: &str, s3: &S3Config) -> Result<ModelRegistry, RegistryError> {
        let base = std::env::current_dir().unwrap_or_else(|_| Path::new(".").to_path_buf());
        ModelRegistry::open_in(url, s3, &base)
    }

    /// Opens the registry at `url`, relative folders (and credential files) resolving
    /// against `base` (a pipeline file's folder).
    pub fn open_in(url: &str, s3: &S3Config, base: &Path) -> Result<ModelRegistry, RegistryError> {
        let url = LakeUrl::parse(url, base)?;
        let store = Store::open(&url, s3, base)?;
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(
            |error| StoreError::Io { context: "starting a runtime".into(), source: error },
        )?;
        Ok(ModelRegistry { store, runtime })
    }

    /// Uploads the model folder `dir` (`model.onnx`, `model.json`) as `name`, under the
    /// version its `model.json` names; returns that version. It does not promote it.
    pub fn push(&self, name: &str, dir: &Path) -> Result<String, RegistryError> {
        check_segment("name", name)?;
        let read = |file: &str| {
            std::fs::read(dir.join(file)).map_err(|error| {
                RegistryError::Model(format!("cannot read {}: {error}", dir.join(file).display()))
            })
        };
        let json = read("model.json")?;
        let onnx = read("model.onnx")?;
        let version = serde_json::from_slice::<VersionOnly>(&json)
            .map_err(|error| RegistryError::Model(format!("model.json has no version: {error}")))?
            .version;
        check_segment("version", &version)?;
        self.runtime.block_on(async {
            self.store
                .put_atomic(&format!("{name}/{version}/model.onnx"), Bytes::from(onnx))
                .await?;
            self.store.put_atomic(&format!("{name}/{version}/model.json"), Bytes::from(json)).await
        })?;
        Ok(version)
    }

    /// The active version of `name`, if one was promoted.
    pub fn active(&self, name: &str) -> Result<Option<String>, RegistryError> {
        check_segment("name", name)?;
        match self.runtime.block_on(self.store.get(&format!("{name}/{ACTIVE}"))) {
            Ok(bytes) => Ok(Some(String::from_utf8_lossy(&bytes).trim().to_owned())),
            Err(StoreError::NotFound(_)) => Ok(None),
            Err(error) => Err(error.into()),
        }
    }

    /// The complete versions of `name` (those with a `model.json`), sorted.
    pub fn versions(&self, name: &str) -> Result<Vec<ModelVersion>, RegistryError> {
        check_segment("name", name)?;
        let keys = self.runtime.block_on(self.store.list(name))?;
        let active = self.active(name)?;
        let prefix = format!("{name}/");
        Ok(keys
            .iter()
            .filter_map(|key| key.strip_prefix(&prefix)?.strip_suffix("/model.json"))
            .filter(|version| !version.contains('/'))
            .map(|version| ModelVersion {
                version: version.to_owned(),
                active: active.as_deref() == Some(version),
            })
            .collect())
    }

    /// The models in the registry (folders holding at least one version).
    pub fn models(&self) -> Result<Vec<String>, RegistryError> {
        let keys = self.runtime.block_on(self.store.list(""))?;
        let mut names: Vec<String> = keys
            .iter()
            .filter(|key| key.ends_with("/model.json"))
            .filter_map(|key| key.split('/').next().map(str::to_owned))
            .collect();
        names.dedup();
        Ok(names)
    }

    /// Points `ACTIVE` of `name` at `version`, which must be complete in the registry.
    pub fn promote(&self, name: &str, version: &str) -> Result<(), RegistryError> {
        check_segment("name", name)?;
        check_segment("version", version)?;
        if !self.versions(name)?.iter().any(|candidate| candidate.version == version) {
            return Err(RegistryError::UnknownVersion {
                name: name.to_owned(),
                version: version.to_owned(),
            });
        }
        self.runtime.block_on(
            self.store.put_atomic(&format!("{name}/{ACTIVE}"), Bytes::from(format!("{version}\n"))),
        )?;
        Ok(())
    }

    /// Copies the active version of `name` into `dir` unless `dir` already holds it
    /// (`model.onnx`, then `model.json`, each written then renamed). Returns the version
    /// copied, `None` when nothing changed or nothing is active.
    pub fn sync_active(&self, name: &str, dir: &Path) -> Result<Option<String>, RegistryError> {
        let Some(version) = self.active(name)? else { return Ok(None) };
        let local = std::fs::read(dir.join("model.json"))
            .ok()
            .and_then(|json| serde_json::from_slice::<VersionOnly>(&json).ok())
            .map(|spec| spec.version);
        if local.as_deref() == Some(version.as_str()) {
            return Ok(None);
        }
        let (onnx, json) = self.runtime.block_on(async {
            let onnx = self.store.get(&format!("{name}/{version}/model.onnx")).await?;
            let json = self.store.get(&format!("{name}/{version}/model.json")).await?;
            Ok::<_, StoreError>((onnx, json))
        })?;
        write_then_rename(&dir.join("model.onnx"), &onnx)?;
        write_then_rename(&dir.join("model.json"), &json)?;
        Ok(Some(version))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn model(dir: &Path, version: &str) {
        std::fs::create_dir_all(dir).expect("dir");
        std::fs::write(dir.join("model.onnx"), format!("onnx {version}")).expect("onnx");
        std::fs::write(dir.join("model.json"), format!("{{\"version\": \"{version}\"}}"))
            .expect("json");
    }

    #[test]
    fn push_list_promote_and_sync_on_a_folder() {
        let dir = tempfile::tempdir().expect("dir");
        let url = format!("file://{}", dir.path().join("registry").display());
        let registry = ModelRegistry::open(&url, &S3Config::default()).expect("open");
        model(&dir.path().join("v1"), "1");
        model(&dir.path().join("v2"), "2");
        assert_eq!(registry.push("pump", &dir.path().join("v1")).expect("push"), "1");
        assert_eq!(registry.push("pump", &dir.path().join("v2")).expect("push"), "2");
        assert_eq!(registry.active("pump").expect("active"), None);
        assert!(matches!(registry.promote("pump", "3"), Err(RegistryError::UnknownVersion { .. })));
        registry.promote("pump", "1").expect("promote");
        let versions = registry.versions("pump").expect("versions");
        assert_eq!(
            versions,
            [
                ModelVersion { version: "1".into(), active: true },
                ModelVersion { version: "2".into(), active: false }
            ]
        );
        assert_eq!(registry.models().expect("models"), ["pump"]);
        let edge = dir.path().join("edge");
        assert_eq!(registry.sync_active("pump", &edge).expect("sync"), Some("1".into()));
        assert_eq!(registry.sync_active("pump", &edge).expect("sync"), None);
        registry.promote("pump", "2").expect("promote");
        assert_eq!(registry.sync_active("pump", &edge).expect("sync"), Some("2".into()));
        assert_eq!(std::fs::read_to_string(edge.join("model.onnx")).expect("onnx"), "onnx 2");
        assert!(registry.push("../x", &dir.path().join("v1")).is_err());
    }
}
