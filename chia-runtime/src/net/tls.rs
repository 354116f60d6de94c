//! Cluster credentials and the TLS configurations built from them.
//!
//! On first start the head creates a cluster CA, a server certificate for itself and one
//! member certificate (rcgen). Workers and drivers receive the CA and the member certificate
//! with its key in the *cluster file*; they verify the head against the CA and the head
//! verifies them against the same CA, in the TLS handshake, before a single frame is read.
//! There is no way to turn verification off. TLS 1.3 only, on the `ring` provider.

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// The name every peer expects in the head's certificate, whatever address it dials.
pub const HEAD_SERVER_NAME: &str = "chia-head";
/// ALPN protocol id; a peer speaking something else fails the handshake.
pub const ALPN: &[u8] = b"chia/1";

/// What a worker or driver needs to join a cluster (the contents of the cluster file).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ClusterCredentials {
    /// Where the head listens, `host:port`.
    pub address: String,
    pub ca_cert: String,
    pub member_cert: String,
    pub member_key: String,
}

/// What the head keeps in its state directory.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct HeadCredentials {
    pub ca_cert: String,
    pub head_cert: String,
    pub head_key: String,
    pub member_cert: String,
    pub member_key: String,
}

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("certificate generation failed: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("{what} is not valid PEM: {message}")]
    Pem { what: &'static str, message: String },
    #[error("TLS configuration failed: {0}")]
    Rustls(#[from] rustls::Error),
    #[error("client verifier: {0}")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
    #[error("QUIC crypto: {0}")]
    Quic(#[from] quinn::crypto::rustls::NoInitialCipherSuite),
    #[error("{path}: {message}")]
    File { path: PathBuf, message: String },
}

impl HeadCredentials {
    /// Creates a fresh CA, head certificate and member certificate.
    pub fn generate() -> Result<HeadCredentials, TlsError> {
        let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params.distinguished_name.push(DnType::CommonName, "chia cluster CA");
        ca_params.key_usages = vec![rcgen::KeyUsagePurpose::KeyCertSign, rcgen::KeyUsagePurpose::CrlSign];
        let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate()?)?;

        let issue = |name: &str, usage: ExtendedKeyUsagePurpose| -> Result<(String, String), TlsError> {
            let mut params = CertificateParams::new(vec![name.to_string()])?;
            params.distinguished_name.push(DnType::CommonName, name);
            params.extended_key_usages = vec![usage];
            let key = KeyPair::generate()?;
            let cert = params.signed_by(&key, &ca)?;
            Ok((cert.pem(), key.serialize_pem()))
        };
        let (head_cert, head_key) = issue(HEAD_SERVER_NAME, ExtendedKeyUsagePurpose::ServerAuth)?;
        let (member_cert, member_key) = issue("chia-member", ExtendedKeyUsagePurpose::ClientAuth)?;
        Ok(HeadCredentials { ca_cert: ca.pem(), head_cert, head_key, member_cert, member_key })
    }

    /// The cluster file contents for peers dialing `address`.
    pub fn cluster(&self, address: &str) -> ClusterCredentials {
        ClusterCredentials {
            address: address.to_string(),
            ca_cert: self.ca_cert.clone(),
            member_cert: self.member_cert.clone(),
            member_key: self.member_key.clone(),
        }
    }

    /// The head's QUIC server configuration: its certificate, and client certificates required.
    /// The head's endpoint settings. Its stateless-reset key is derived from the head's own
    /// private key, so a head restarted on the same state directory answers packets of its
    /// predecessor's connections with a reset the peers accept: they learn at once that the
    /// head restarted (and take up their sessions) instead of after the idle timeout.
    pub fn endpoint_config(&self) -> quinn::EndpointConfig {
        use sha2::Digest;
        let secret = sha2::Sha256::new()
            .chain_update(b"chia stateless reset\0")
            .chain_update(self.head_key.as_bytes())
            .finalize();
        let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &secret);
        quinn::EndpointConfig::new(Arc::new(key))
    }

    pub fn server_config(&self) -> Result<quinn::ServerConfig, TlsError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let roots = Arc::new(root_store(&self.ca_cert)?);
        let verifier =
            rustls::server::WebPkiClientVerifier::builder_with_provider(roots, provider.clone()).build()?;
        let mut tls = rustls::ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_client_cert_verifier(verifier)
            .with_single_cert(
                certs(&self.head_cert, "head certificate")?,
                key(&self.head_key, "head key")?,
            )?;
        tls.alpn_protocols = vec![ALPN.to_vec()];
        let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(tls)?;
        let mut config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
        config.transport_config(Arc::new(transport_config()));
        Ok(config)
    }

    /// Loads the head's credentials from `state_dir`, creating them on first start.
    pub fn load_or_create(state_dir: &Path) -> Result<HeadCredentials, TlsError> {
        let path = state_dir.join("head-credentials.yaml");
        let file_error = |message: String| TlsError::File { path: path.clone(), message };
        if path.exists() {
            let text = std::fs::read_to_string(&path).map_err(|e| file_error(e.to_string()))?;
            return serde_saphyr::from_str(&text).map_err(|e| file_error(e.to_string()));
        }
        create_private_dir(state_dir).map_err(|e| file_error(e.to_string()))?;
        let creds = HeadCredentials::generate()?;
        let text = serde_saphyr::to_string(&creds).map_err(|e| file_error(e.to_string()))?;
        write_private(&path, &text).map_err(|e| file_error(e.to_string()))?;
        Ok(creds)
    }
}

impl ClusterCredentials {
    /// A client configuration that verifies the head against the cluster CA and presents the
    /// member certificate.
    pub fn client_config(&self) -> Result<quinn::ClientConfig, TlsError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_root_certificates(root_store(&self.ca_cert)?)
            .with_client_auth_cert(
                certs(&self.member_cert, "member certificate")?,
                key(&self.member_key, "member key")?,
            )?;
        tls.alpn_protocols = vec![ALPN.to_vec()];
        let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls)?;
        let mut config = quinn::ClientConfig::new(Arc::new(crypto));
        config.transport_config(Arc::new(transport_config()));
        Ok(config)
    }

    /// Reads a cluster file.
    pub fn load(path: &Path) -> Result<ClusterCredentials, TlsError> {
        let file_error = |message: String| TlsError::File { path: path.to_path_buf(), message };
        let text = std::fs::read_to_string(path).map_err(|e| file_error(e.to_string()))?;
        serde_saphyr::from_str(&text).map_err(|e| file_error(format!("not a cluster file: {e}")))
    }

    /// Writes a cluster file readable only by its owner.
    pub fn save(&self, path: &Path) -> Result<(), TlsError> {
        let file_error = |message: String| TlsError::File { path: path.to_path_buf(), message };
        let text = serde_saphyr::to_string(self).map_err(|e| file_error(e.to_string()))?;
        write_private(path, &text).map_err(|e| file_error(e.to_string()))
    }
}

/// Creates `dir` (and its parents) readable only by its owner.
fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    let mut builder = std::fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
    builder.create(dir)
}

/// Writes `text` to `path` with mode 0600, atomically (temp file + rename), so a reader never
/// sees half a file.
fn write_private(path: &Path, text: &str) -> std::io::Result<()> {
    use std::io::Write;
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let mut tmp = tempfile::NamedTempFile::new_in(dir)?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        tmp.as_file().set_permissions(std::fs::Permissions::from_mode(0o600))?;
    }
    tmp.write_all(text.as_bytes())?;
    tmp.as_file().sync_all()?;
    tmp.persist(path).map_err(|e| e.error)?;
    Ok(())
}

fn transport_config() -> quinn::TransportConfig {
    let mut transport = quinn::TransportConfig::default();
    // Large windows let one stream carry a 100 MiB result at full speed.
    transport.stream_receive_window(quinn::VarInt::from_u32(64 << 20));
    transport.receive_window(quinn::VarInt::from_u32(128 << 20));
    transport.send_window(128 << 20);
    // The protocol uses exactly one bidirectional stream, opened by the peer: refusing more
    // keeps a peer from tying up a receive window per extra stream.
    transport.max_concurrent_bidi_streams(quinn::VarInt::from_u32(1));
    transport.max_concurrent_uni_streams(quinn::VarInt::from_u32(0));
    // A peer whose head died (SIGKILL sends nothing) notices within the idle timeout and starts
    // taking up its session with the restarted head; keep-alives keep idle drivers connected.
    transport.keep_alive_interval(Some(std::time::Duration::from_secs(2)));
    transport.max_idle_timeout(Some(quinn::VarInt::from_u32(10_000).into()));
    transport
}

fn root_store(ca_pem: &str) -> Result<rustls::RootCertStore, TlsError> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in certs(ca_pem, "CA certificate")? {
        roots.add(cert)?;
    }
    Ok(roots)
}

fn certs(pem: &str, what: &'static str) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Pem { what, message: e.to_string() })?;
    if certs.is_empty() {
        return Err(TlsError::Pem { what, message: "no certificate found".into() });
    }
    Ok(certs)
}

fn key(pem: &str, what: &'static str) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_slice(pem.as_bytes()).map_err(|e| TlsError::Pem { what, message: e.to_string() })
}
