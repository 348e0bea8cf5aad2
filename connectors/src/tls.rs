//! TLS client configurations (rustls with the ring provider): MQTT brokers and webhook
//! receivers.
//!
//! Every component that connects over TLS takes the same options as a nested table,
//! `[sources.<id>.tls]` or `[sinks.<id>.tls]`, deserialized into one [`TlsConfig`].

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use serde::Deserialize;
use tidewatch_api::{ComponentError, ConfigError, MovedOption};

/// The TLS options of a component, its `tls` table:
///
/// ```toml
/// [sinks.hook.tls]
/// ca_file = "certs/ca.crt"
/// client_cert_file = "certs/client.crt"
/// client_key_file = "certs/client.key"
/// ```
///
/// Relative paths are relative to the pipeline file's folder.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM file of the CA certificates that sign the server's certificate; default: the
    /// system's roots.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// PEM file of a client certificate (chain) for mutual TLS, with `client_key_file`.
    #[serde(default)]
    pub client_cert_file: Option<PathBuf>,
    /// PEM file of the client certificate's private key, with `client_cert_file`.
    #[serde(default)]
    pub client_key_file: Option<PathBuf>,
}

/// The TLS options that components took at their top level before the `tls` table; still
/// accepted there for one release, with a warning.
pub const TLS_MOVED_OPTIONS: &[MovedOption] = &[
    MovedOption { key: "ca_file", table: "tls" },
    MovedOption { key: "client_cert_file", table: "tls" },
    MovedOption { key: "client_key_file", table: "tls" },
];

impl TlsConfig {
    /// True when any option is set.
    pub fn is_set(&self) -> bool {
        self.ca_file.is_some() || self.client_cert_file.is_some() || self.client_key_file.is_some()
    }

    /// Checks the options beyond their types; `over_tls` tells whether the component's URL
    /// asks for TLS (`hint` says how). Errors name the option as `tls.<option>`.
    pub fn validate(&self, over_tls: bool, hint: &str) -> Result<(), ConfigError> {
        if !over_tls {
            for (field, value) in [
                ("tls.ca_file", &self.ca_file),
                ("tls.client_cert_file", &self.client_cert_file),
                ("tls.client_key_file", &self.client_key_file),
            ] {
                if value.is_some() {
                    return Err(ConfigError::at_field(
                        field,
                        format!("{field} needs a TLS connection"),
                    )
                    .with_hint(hint));
                }
            }
        }
        if self.client_cert_file.is_some() != self.client_key_file.is_some() {
            let field = if self.client_cert_file.is_some() {
                "tls.client_key_file"
            } else {
                "tls.client_cert_file"
            };
            return Err(ConfigError::at_field(
                field,
                "tls.client_cert_file and tls.client_key_file go together",
            ));
        }
        Ok(())
    }

    /// The options with every path made absolute by `resolve` (relative paths are relative to
    /// the pipeline file: `|path| ctx.resolve_path(path)`).
    pub fn resolved(&self, resolve: impl Fn(&str) -> PathBuf) -> TlsConfig {
        let resolve =
            |path: &Option<PathBuf>| path.as_deref().map(|path| resolve(&path.to_string_lossy()));
        TlsConfig {
            ca_file: resolve(&self.ca_file),
            client_cert_file: resolve(&self.client_cert_file),
            client_key_file: resolve(&self.client_key_file),
        }
    }

    /// The rustls client configuration: the CA certificates of `ca_file` (or the system's
    /// roots) and the optional client certificate, with the ring crypto provider.
    pub fn client_config(&self) -> Result<Arc<rustls::ClientConfig>, ComponentError> {
        client_config(
            self.ca_file.as_deref(),
            self.client_cert_file.as_deref().zip(self.client_key_file.as_deref()),
        )
    }
}

/// Reads every PEM certificate of `path` (`what` names the option in errors).
fn certificates(path: &Path, what: &str) -> Result<Vec<CertificateDer<'static>>, ComponentError> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|error| {
            ComponentError::Config(format!("cannot read {what} {}: {error}", path.display()))
        })?;
    if certs.is_empty() {
        return Err(ComponentError::Config(format!(
            "{what} {} holds no PEM certificate",
            path.display()
        )));
    }
    Ok(certs)
}

/// A rustls client configuration: the CA certificates of `ca_file` (or the system's roots)
/// and an optional client certificate chain and key (`(cert_file, key_file)`).
fn client_config(
    ca_file: Option<&Path>,
    client_cert: Option<(&Path, &Path)>,
) -> Result<Arc<rustls::ClientConfig>, ComponentError> {
    let mut roots = rustls::RootCertStore::empty();
    match ca_file {
        Some(path) => {
            for cert in certificates(path, "ca_file")? {
                roots.add(cert).map_err(|error| {
                    ComponentError::Config(format!(
                        "ca_file {} holds an invalid certificate: {error}",
                        path.display()
                    ))
                })?;
            }
        }
        None => {
            let native = rustls_native_certs::load_native_certs();
            roots.add_parsable_certificates(native.certs);
            if roots.is_empty() {
                return Err(ComponentError::Config(
                    "no CA certificates: the system has none; set ca_file".to_owned(),
                ));
            }
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|error| ComponentError::Internal(format!("TLS versions: {error}")))?
        .with_root_certificates(roots);
    let config = match client_cert {
        Some((cert_path, key_path)) => {
            let chain = certificates(cert_path, "client_cert_file")?;
            let key = PrivateKeyDer::from_pem_file(key_path).map_err(|error| {
                ComponentError::Config(format!(
                    "cannot read client_key_file {}: {error}",
                    key_path.display()
                ))
            })?;
            builder.with_client_auth_cert(chain, key).map_err(|error| {
                ComponentError::Config(format!("client certificate and key: {error}"))
            })?
        }
        None => builder.with_no_client_auth(),
    };
    Ok(Arc::new(config))
}
