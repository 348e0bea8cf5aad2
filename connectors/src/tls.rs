//! TLS client configurations (rustls with the ring provider): MQTT brokers and webhook
//! receivers.

use std::path::Path;
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tidewatch_api::ComponentError;

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
pub(crate) fn client_config(
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
