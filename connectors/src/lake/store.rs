//! Where the lake lives: a local folder (`file://` or a plain path) or an S3 bucket and prefix
//! (`s3://bucket/prefix`, Ceph's radosgw or any S3 endpoint), and the one thing the lake asks
//! of it: publish a complete object under its final name, atomically.
//!
//! - `file://`: the bytes go to a hidden temporary file (`.<name>.tmp`, which readers such as
//!   pyarrow skip) beside the final name, are synced, and are renamed to the final name.
//! - `s3://`: a single PUT for small objects, a multipart upload completed at the end for
//!   larger ones; S3 shows neither before it is complete, and an upload that fails is aborted.
//!
//! S3 credentials come from the environment (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`,
//! `AWS_SESSION_TOKEN`, `AWS_ENDPOINT_URL`, `AWS_REGION` ...) or from a credentials file in
//! the AWS format; they are never logged (the [`S3Config`] and store `Debug` output leaves
//! them out).

use std::fmt;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use object_store::aws::{AmazonS3, AmazonS3Builder, AmazonS3ConfigKey};
use object_store::path::Path as ObjectPath;
use object_store::{ClientOptions, ObjectStore, ObjectStoreExt as _, PutPayload, RetryConfig};
use serde::Deserialize;
use thiserror::Error;
use tidewatch_api::resolve_path;

/// Objects larger than this go up as a multipart upload, in parts of this size.
const MULTIPART_PART_BYTES: usize = 8 * 1024 * 1024;

/// Why the lake's store cannot be opened or written.
#[derive(Debug, Error)]
pub enum StoreError {
    /// The URL is not `file://...`, `s3://bucket[/prefix]` or a path.
    #[error("invalid lake URL {url:?}: {reason}")]
    Url {
        /// The URL as given.
        url: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The credentials file cannot be read or lacks a key.
    #[error("S3 credentials file {path}: {reason}")]
    Credentials {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// A local file operation failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done, with the path.
        context: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The object store refused or failed.
    #[error("object store: {0}")]
    ObjectStore(#[from] object_store::Error),
    /// The object does not exist.
    #[error("{0} does not exist")]
    NotFound(String),
}

impl StoreError {
    fn io(context: impl Into<String>, source: std::io::Error) -> StoreError {
        StoreError::Io { context: context.into(), source }
    }
}

/// The S3 options of a lake URL, the nested `[sinks.<id>.s3]` table. Every option is
/// optional: what is not given comes from the environment (`AWS_ENDPOINT_URL`,
/// `AWS_REGION` ...), as the AWS tools read it.
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct S3Config {
    /// The endpoint, e.g. `http://127.0.0.1:7480` for a local Ceph radosgw; default
    /// `AWS_ENDPOINT_URL`, else AWS itself.
    #[serde(default)]
    pub endpoint: Option<String>,
    /// The region; default `AWS_REGION`, else `us-east-1`.
    #[serde(default)]
    pub region: Option<String>,
    /// Virtual-hosted-style addressing (`bucket.host/key`) instead of the default path style
    /// (`host/bucket/key`, what Ceph and MinIO expect).
    #[serde(default)]
    pub virtual_hosted_style: bool,
    /// Allow plain `http://` endpoints; default: true when the endpoint starts with `http://`.
    #[serde(default)]
    pub allow_http: Option<bool>,
    /// An AWS credentials file (INI: `aws_access_key_id`, `aws_secret_access_key`, optionally
    /// `aws_session_token`) to read instead of the environment; relative to the pipeline file.
    #[serde(default)]
    pub credentials_file: Option<PathBuf>,
    /// The profile (section) of `credentials_file`; default `default`.
    #[serde(default)]
    pub profile: Option<String>,
    /// Per-request timeout, ms.
    #[serde(default = "default_request_timeout_ms")]
    pub request_timeout_ms: u64,
}

fn default_request_timeout_ms() -> u64 {
    30_000
}

impl Default for S3Config {
    /// Everything from the environment; `request_timeout_ms` 30000.
    fn default() -> Self {
        S3Config {
            endpoint: None,
            region: None,
            virtual_hosted_style: false,
            allow_http: None,
            credentials_file: None,
            profile: None,
            request_timeout_ms: default_request_timeout_ms(),
        }
    }
}

impl fmt::Debug for S3Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("S3Config")
            .field("endpoint", &self.endpoint)
            .field("region", &self.region)
            .field("virtual_hosted_style", &self.virtual_hosted_style)
            .field("allow_http", &self.allow_http)
            .field("credentials_file", &self.credentials_file)
            .field("profile", &self.profile)
            .field("request_timeout_ms", &self.request_timeout_ms)
            .finish()
    }
}

/// A parsed lake URL.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LakeUrl {
    /// A local folder.
    Local(PathBuf),
    /// An S3 bucket and a key prefix (no leading or trailing `/`; may be empty).
    S3 {
        /// The bucket.
        bucket: String,
        /// The prefix every key starts with.
        prefix: String,
    },
}

impl LakeUrl {
    /// Parses `file://path`, `s3://bucket/prefix` or a plain path; relative local paths
    /// resolve against `base`.
    pub fn parse(url: &str, base: &Path) -> Result<LakeUrl, StoreError> {
        let url = url.trim();
        let bad = |reason: &str| StoreError::Url { url: url.to_owned(), reason: reason.to_owned() };
        if url.is_empty() {
            return Err(bad("it is empty"));
        }
        if let Some(rest) = url.strip_prefix("s3://") {
            let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
            if bucket.is_empty() {
                return Err(bad("no bucket after s3://"));
            }
            return Ok(LakeUrl::S3 {
                bucket: bucket.to_owned(),
                prefix: prefix.trim_matches('/').to_owned(),
            });
        }
        let path = url.strip_prefix("file://").unwrap_or(url);
        if path.contains("://") {
            return Err(bad("the scheme is neither file:// nor s3://"));
        }
        if path.is_empty() {
            return Err(bad("no path after file://"));
        }
        Ok(LakeUrl::Local(resolve_path(base, path)))
    }
}

/// A lake's store, opened.
#[derive(Clone)]
pub struct Store {
    inner: Inner,
    display: String,
}

#[derive(Clone)]
enum Inner {
    Local(PathBuf),
    S3 { store: Arc<AmazonS3>, prefix: String },
}

impl fmt::Debug for Store {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Store").field("url", &self.display).finish_non_exhaustive()
    }
}

/// Reads `aws_access_key_id`, `aws_secret_access_key` and `aws_session_token` of `profile`
/// from an AWS credentials file.
fn read_credentials_file(
    path: &Path,
    profile: &str,
) -> Result<(String, String, Option<String>), StoreError> {
    let text = std::fs::read_to_string(path).map_err(|error| StoreError::Credentials {
        path: path.to_path_buf(),
        reason: error.to_string(),
    })?;
    let mut section = String::new();
    let (mut key, mut secret, mut token) = (None, None, None);
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        if let Some(name) = line.strip_prefix('[').and_then(|rest| rest.strip_suffix(']')) {
            section = name.trim().trim_start_matches("profile ").to_owned();
            continue;
        }
        if section != profile {
            continue;
        }
        if let Some((name, value)) = line.split_once('=') {
            let value = Some(value.trim().to_owned());
            match name.trim() {
                "aws_access_key_id" => key = value,
                "aws_secret_access_key" => secret = value,
                "aws_session_token" => token = value,
                _ => {}
            }
        }
    }
    let missing = |what: &str| StoreError::Credentials {
        path: path.to_path_buf(),
        reason: format!("profile [{profile}] has no {what}"),
    };
    Ok((
        key.ok_or_else(|| missing("aws_access_key_id"))?,
        secret.ok_or_else(|| missing("aws_secret_access_key"))?,
        token,
    ))
}

impl Store {
    /// Opens the store of `url` (nothing is contacted yet). `base` resolves relative paths.
    pub fn open(url: &LakeUrl, s3: &S3Config, base: &Path) -> Result<Store, StoreError> {
        match url {
            LakeUrl::Local(root) => Ok(Store {
                inner: Inner::Local(root.clone()),
                display: format!("file://{}", root.display()),
            }),
            LakeUrl::S3 { bucket, prefix } => {
                // rustls (under reqwest) takes the process's default provider: ring, as for
                // MQTT and webhooks. Another component may have installed it already.
                let _ = rustls::crypto::ring::default_provider().install_default();
                let mut builder = AmazonS3Builder::from_env().with_bucket_name(bucket);
                if let Some(endpoint) = &s3.endpoint {
                    builder = builder.with_endpoint(endpoint);
                }
                if let Some(region) = &s3.region {
                    builder = builder.with_region(region);
                } else if builder.get_config_value(&AmazonS3ConfigKey::Region).is_none() {
                    builder = builder.with_region("us-east-1");
                }
                builder = builder.with_virtual_hosted_style_request(s3.virtual_hosted_style);
                let endpoint = builder.get_config_value(&AmazonS3ConfigKey::Endpoint);
                let allow_http = s3.allow_http.unwrap_or_else(|| {
                    endpoint.as_deref().is_some_and(|endpoint| endpoint.starts_with("http://"))
                });
                if let Some(file) = &s3.credentials_file {
                    let file = resolve_path(base, file);
                    let profile = s3.profile.as_deref().unwrap_or("default");
                    let (key, secret, token) = read_credentials_file(&file, profile)?;
                    builder = builder.with_access_key_id(key).with_secret_access_key(secret);
                    if let Some(token) = token {
                        builder = builder.with_token(token);
                    }
                }
                let timeout = Duration::from_millis(s3.request_timeout_ms.max(1));
                let client = ClientOptions::new()
                    .with_allow_http(allow_http)
                    .with_timeout(timeout)
                    .with_connect_timeout(Duration::from_secs(5));
                // Few quick retries inside object_store: the lake's uploader retries with its
                // own backoff and counts every failure.
                let retry = RetryConfig {
                    max_retries: 2,
                    retry_timeout: timeout,
                    ..RetryConfig::default()
                };
                let store = builder.with_client_options(client).with_retry(retry).build()?;
                let display = if prefix.is_empty() {
                    format!("s3://{bucket}")
                } else {
                    format!("s3://{bucket}/{prefix}")
                };
                Ok(Store {
                    inner: Inner::S3 { store: Arc::new(store), prefix: prefix.clone() },
                    display,
                })
            }
        }
    }

    /// The URL, for messages (never with credentials).
    pub fn display(&self) -> &str {
        &self.display
    }

    fn object_path(prefix: &str, key: &str) -> ObjectPath {
        if prefix.is_empty() {
            ObjectPath::from(key)
        } else {
            ObjectPath::from(format!("{prefix}/{key}"))
        }
    }

    /// Publishes `bytes` under `key` (relative to the lake's root, `/`-separated): visible
    /// under that name only once complete.
    pub async fn put_atomic(&self, key: &str, bytes: Bytes) -> Result<(), StoreError> {
        match &self.inner {
            Inner::Local(root) => {
                let target = key_path(root, key);
                tokio::task::spawn_blocking(move || write_then_rename(&target, &bytes))
                    .await
                    .map_err(|error| {
                        StoreError::io("writing a lake file", std::io::Error::other(error))
                    })?
            }
            Inner::S3 { store, prefix } => {
                let path = Store::object_path(prefix, key);
                if bytes.len() <= MULTIPART_PART_BYTES {
                    store.put(&path, PutPayload::from(bytes)).await?;
                    return Ok(());
                }
                let mut upload = store.put_multipart(&path).await?;
                let mut result = Ok(());
                for start in (0..bytes.len()).step_by(MULTIPART_PART_BYTES) {
                    let end = (start + MULTIPART_PART_BYTES).min(bytes.len());
                    if let Err(error) =
                        upload.put_part(PutPayload::from(bytes.slice(start..end))).await
                    {
                        result = Err(error);
                        break;
                    }
                }
                match result {
                    Ok(()) => match upload.complete().await {
                        Ok(_) => Ok(()),
                        Err(error) => {
                            let _ = upload.abort().await;
                            Err(error.into())
                        }
                    },
                    Err(error) => {
                        let _ = upload.abort().await;
                        Err(error.into())
                    }
                }
            }
        }
    }

    /// The bytes of `key`.
    pub async fn get(&self, key: &str) -> Result<Bytes, StoreError> {
        match &self.inner {
            Inner::Local(root) => {
                let path = key_path(root, key);
                match tokio::task::spawn_blocking(move || std::fs::read(&path)).await {
                    Ok(Ok(bytes)) => Ok(Bytes::from(bytes)),
                    Ok(Err(error)) if error.kind() == std::io::ErrorKind::NotFound => {
                        Err(StoreError::NotFound(key.to_owned()))
                    }
                    Ok(Err(error)) => Err(StoreError::io(format!("reading {key}"), error)),
                    Err(error) => Err(StoreError::io("reading", std::io::Error::other(error))),
                }
            }
            Inner::S3 { store, prefix } => {
                match store.get(&Store::object_path(prefix, key)).await {
                    Ok(result) => Ok(result.bytes().await?),
                    Err(object_store::Error::NotFound { .. }) => {
                        Err(StoreError::NotFound(key.to_owned()))
                    }
                    Err(error) => Err(error.into()),
                }
            }
        }
    }

    /// The keys under `under` (a `/`-separated key prefix, `""` for all), sorted; hidden
    /// temporary files of `file://` lakes are left out.
    pub async fn list(&self, under: &str) -> Result<Vec<String>, StoreError> {
        match &self.inner {
            Inner::Local(root) => {
                let root = root.clone();
                let under = under.trim_matches('/').to_owned();
                tokio::task::spawn_blocking(move || list_local(&root, &under))
                    .await
                    .map_err(|error| StoreError::io("listing", std::io::Error::other(error)))?
            }
            Inner::S3 { store, prefix } => {
                let under = under.trim_matches('/');
                let full = match (prefix.is_empty(), under.is_empty()) {
                    (true, _) => under.to_owned(),
                    (false, true) => prefix.clone(),
                    (false, false) => format!("{prefix}/{under}"),
                };
                let listed = collect_list(store.as_ref(), &full).await?;
                let strip = if prefix.is_empty() { 0 } else { prefix.len() + 1 };
                let mut keys: Vec<String> = listed
                    .into_iter()
                    .filter_map(|key| key.get(strip..).map(str::to_owned))
                    .collect();
                keys.sort();
                Ok(keys)
            }
        }
    }
}

impl Store {
    /// Deletes the object at `key`; a missing one is not an error.
    pub async fn delete(&self, key: &str) -> Result<(), StoreError> {
        match &self.inner {
            Inner::Local(root) => {
                let path = key_path(root, key);
                match tokio::task::spawn_blocking(move || std::fs::remove_file(&path)).await {
                    Ok(Ok(())) => Ok(()),
                    Ok(Err(error)) if error.kind() == std::io::ErrorKind::NotFound => Ok(()),
                    Ok(Err(error)) => Err(StoreError::io(format!("deleting {key}"), error)),
                    Err(error) => Err(StoreError::io("deleting", std::io::Error::other(error))),
                }
            }
            Inner::S3 { store, prefix } => {
                match store.delete(&Store::object_path(prefix, key)).await {
                    Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
                    Err(error) => Err(error.into()),
                }
            }
        }
    }
}

/// Every key under `prefix` (the object store lists as a stream; polled by hand).
async fn collect_list(
    store: &dyn ObjectStore,
    prefix: &str,
) -> Result<Vec<String>, object_store::Error> {
    let prefix = (!prefix.is_empty()).then(|| ObjectPath::from(prefix));
    let mut stream = store.list(prefix.as_ref());
    let mut keys = Vec::new();
    while let Some(item) = std::future::poll_fn(|cx| stream.as_mut().poll_next(cx)).await {
        keys.push(item?.location.to_string());
    }
    Ok(keys)
}

/// The local path of `key` (`/`-separated) under `root`.
pub(crate) fn key_path(root: &Path, key: &str) -> PathBuf {
    key.split('/')
        .filter(|part| !part.is_empty())
        .fold(root.to_path_buf(), |path, part| path.join(part))
}

/// The keys of the files under `root/under`, sorted; names starting with `.` are skipped.
pub(crate) fn list_local(root: &Path, under: &str) -> Result<Vec<String>, StoreError> {
    let start = key_path(root, under);
    let mut keys = Vec::new();
    let mut stack = vec![start];
    while let Some(dir) = stack.pop() {
        let entries = match std::fs::read_dir(&dir) {
            Ok(entries) => entries,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => continue,
            Err(error) => return Err(StoreError::io(format!("listing {}", dir.display()), error)),
        };
        for entry in entries {
            let entry = entry
                .map_err(|error| StoreError::io(format!("listing {}", dir.display()), error))?;
            let path = entry.path();
            let name = entry.file_name();
            if name.to_string_lossy().starts_with('.') {
                continue;
            }
            if path.is_dir() {
                stack.push(path);
            } else if let Ok(relative) = path.strip_prefix(root) {
                let key: Vec<String> = relative
                    .components()
                    .map(|part| part.as_os_str().to_string_lossy().into_owned())
                    .collect();
                keys.push(key.join("/"));
            }
        }
    }
    keys.sort();
    Ok(keys)
}

/// Writes `bytes` to a hidden temporary file beside `target`, syncs it and renames it to
/// `target`: `target` is complete or absent, whatever happens to the process.
pub(crate) fn write_then_rename(target: &Path, bytes: &[u8]) -> Result<(), StoreError> {
    let parent = target.parent().unwrap_or_else(|| Path::new("."));
    std::fs::create_dir_all(parent)
        .map_err(|error| StoreError::io(format!("creating {}", parent.display()), error))?;
    let name =
        target.file_name().map(|name| name.to_string_lossy().into_owned()).unwrap_or_default();
    let temporary = parent.join(format!(".{name}.tmp"));
    let write = || -> std::io::Result<()> {
        let mut file = std::fs::File::create(&temporary)?;
        file.write_all(bytes)?;
        file.sync_all()?;
        std::fs::rename(&temporary, target)
    };
    write().map_err(|error| {
        let _ = std::fs::remove_file(&temporary);
        StoreError::io(format!("writing {}", target.display()), error)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_parse() {
        let base = Path::new("/pipelines");
        assert_eq!(
            LakeUrl::parse("s3://tidewatch/lake/", base).expect("s3"),
            LakeUrl::S3 { bucket: "tidewatch".into(), prefix: "lake".into() }
        );
        assert_eq!(
            LakeUrl::parse("file://./lake", base).expect("file"),
            LakeUrl::Local(PathBuf::from("/pipelines/./lake"))
        );
        assert_eq!(
            LakeUrl::parse("/data/lake", base).expect("path"),
            LakeUrl::Local(PathBuf::from("/data/lake"))
        );
        assert!(LakeUrl::parse("gs://x", base).is_err());
        assert!(LakeUrl::parse("s3://", base).is_err());
    }

    #[test]
    fn credentials_files_read_the_profile() {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("credentials");
        std::fs::write(
            &path,
            "[default]\naws_access_key_id = A\naws_secret_access_key = B\n[lake]\naws_access_key_id=C\naws_secret_access_key=D\naws_session_token=E\n",
        )
        .expect("write");
        assert_eq!(
            read_credentials_file(&path, "default").expect("default"),
            ("A".into(), "B".into(), None)
        );
        assert_eq!(
            read_credentials_file(&path, "lake").expect("lake"),
            ("C".into(), "D".into(), Some("E".into()))
        );
        assert!(read_credentials_file(&path, "other").is_err());
    }

    #[test]
    fn debug_output_never_shows_credentials() {
        let config =
            S3Config { endpoint: Some("http://127.0.0.1:7480".into()), ..S3Config::default() };
        let store = Store::open(
            &LakeUrl::S3 { bucket: "b".into(), prefix: "p".into() },
            &config,
            Path::new("."),
        );
        let text = format!("{config:?} {store:?}");
        assert!(!text.contains("secret"), "{text}");
    }

    #[test]
    fn local_writes_are_atomic_and_listed() {
        let dir = tempfile::tempdir().expect("dir");
        let target = dir.path().join("date=2026-01-01/part-0.parquet");
        write_then_rename(&target, b"abc").expect("write");
        assert_eq!(std::fs::read(&target).expect("read"), b"abc");
        std::fs::write(dir.path().join("date=2026-01-01/.part-1.parquet.tmp"), b"x").expect("tmp");
        assert_eq!(list_local(dir.path(), "").expect("list"), ["date=2026-01-01/part-0.parquet"]);
    }
}
