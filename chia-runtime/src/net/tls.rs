//! Cluster credentials and the TLS configurations built from them.
//!
//! On first start the head creates a cluster CA, a server certificate for itself and one
//! member certificate (rcgen). Workers and drivers receive the CA and the member certificate
//! with its key in the *cluster file*; they verify the head against the CA and the head
//! verifies them against the same CA, in the TLS handshake, before a single frame is read.
//! There is no way to turn verification off. TLS 1.3 only, on the `ring` provider.
//!
//! The CA's key is kept beside the head's credentials (`ca-key.pem`, 0600) so that member
//! certificates of their own can be issued and the shared one rotated
//! ([`crate::net::members`]); a [`MemberCheck`] lets the head refuse a certificate its CA
//! signed (a revoked one) in the handshake.

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// The name every peer expects in the head's certificate, whatever address it dials.
pub const HEAD_SERVER_NAME: &str = "chia-head";
/// ALPN protocol id; a peer speaking something else fails the handshake.
pub const ALPN: &[u8] = b"chia/1";
/// The name in the one member certificate every head creates (the one in the `cluster.yaml` it
/// writes at start), shared by every member that has no certificate of its own.
pub const DEFAULT_MEMBER_NAME: &str = "chia-member";
/// The head's credentials in its state directory.
pub const CREDENTIALS_FILE: &str = "head-credentials.yaml";
/// The cluster CA's private key in the head's state directory (0600).
pub const CA_KEY_FILE: &str = "ca-key.pem";

/// What a worker or driver needs to join a cluster (the contents of the cluster file).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ClusterCredentials {
    /// Where the head listens, `host:port`.
    pub address: String,
    /// The cluster CA's certificate (PEM): the head's certificate must be signed by it.
    pub ca_cert: String,
    /// The certificate this member presents to the head (PEM): the shared `chia-member` one,
    /// or one `chia-head issue-member` issued.
    pub member_cert: String,
    /// The private key of `member_cert` (PEM).
    pub member_key: String,
    /// The file these were read from, to name it when the head turns out to be another
    /// cluster's. Not part of the file.
    #[serde(skip)]
    pub loaded_from: Option<PathBuf>,
}

/// What the head keeps in its state directory.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct HeadCredentials {
    /// The cluster CA's certificate (PEM), which every member and the head verify each other
    /// against. Its key is not here but in [`CA_KEY_FILE`].
    pub ca_cert: String,
    /// The head's server certificate (PEM), issued to [`HEAD_SERVER_NAME`].
    pub head_cert: String,
    /// The private key of `head_cert` (PEM); the stateless-reset key is derived from it too.
    pub head_key: String,
    /// The shared member certificate (PEM, [`DEFAULT_MEMBER_NAME`]) handed out in the
    /// `cluster.yaml` the head writes; replaced when it is revoked.
    pub member_cert: String,
    /// The private key of `member_cert` (PEM).
    pub member_key: String,
}

/// Why credentials could not be made, read or written, or a TLS configuration built from them.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// rcgen could not make a key pair or sign a certificate.
    #[error("certificate generation failed: {0}")]
    Generate(#[from] rcgen::Error),
    /// A certificate or key in the credentials is not PEM, or holds no certificate.
    #[error("{what} is not valid PEM: {message}")]
    Pem {
        /// Which one ("head certificate", "member key", …).
        what: &'static str,
        /// The parser's error.
        message: String,
    },
    /// rustls refused the certificates or keys (for one, a key that does not match its
    /// certificate).
    #[error("TLS configuration failed: {0}")]
    Rustls(#[from] rustls::Error),
    /// The head's client-certificate verifier could not be built from the CA.
    #[error("client verifier: {0}")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
    /// The TLS configuration has no cipher suite QUIC can start with.
    #[error("QUIC crypto: {0}")]
    Quic(#[from] quinn::crypto::rustls::NoInitialCipherSuite),
    /// A credentials, cluster or state-directory file could not be read, parsed or written.
    #[error("{path}: {message}")]
    File {
        /// The file (or directory).
        path: PathBuf,
        /// What went wrong; a YAML error comes with a snippet headed by the file's name.
        message: String,
    },
}

/// Decides, once the CA has vouched for a client certificate, whether its holder may still
/// join (the head's revocation list). Called in every handshake, so it must be cheap.
pub trait MemberCheck: Send + Sync + std::fmt::Debug {
    /// `Err` refuses the handshake; the error picks the alert the peer receives.
    fn admit(&self, end_entity: &CertificateDer<'_>) -> Result<(), rustls::Error>;
}

impl HeadCredentials {
    /// Creates a fresh CA, head certificate and member certificate. The CA key is dropped:
    /// nothing can be issued from these later (the embedded cluster needs nothing more).
    pub fn generate() -> Result<HeadCredentials, TlsError> {
        Ok(HeadCredentials::generate_with_ca_key()?.0)
    }

    /// [`HeadCredentials::generate`], and the CA's private key (PEM), to keep for issuing.
    pub fn generate_with_ca_key() -> Result<(HeadCredentials, String), TlsError> {
        let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params.distinguished_name.push(DnType::CommonName, "chia cluster CA");
        ca_params.key_usages = vec![rcgen::KeyUsagePurpose::KeyCertSign, rcgen::KeyUsagePurpose::CrlSign];
        let ca_key = KeyPair::generate()?;
        let ca_key_pem = ca_key.serialize_pem();
        let ca = CertifiedIssuer::self_signed(ca_params, ca_key)?;

        let issue = |name: &str, usage: ExtendedKeyUsagePurpose| -> Result<(String, String), TlsError> {
            let mut params = CertificateParams::new(vec![name.to_string()])?;
            params.distinguished_name.push(DnType::CommonName, name);
            params.extended_key_usages = vec![usage];
            let key = KeyPair::generate()?;
            let cert = params.signed_by(&key, &ca)?;
            Ok((cert.pem(), key.serialize_pem()))
        };
        let (head_cert, head_key) = issue(HEAD_SERVER_NAME, ExtendedKeyUsagePurpose::ServerAuth)?;
        let (member_cert, member_key) = issue(DEFAULT_MEMBER_NAME, ExtendedKeyUsagePurpose::ClientAuth)?;
        Ok((HeadCredentials { ca_cert: ca.pem(), head_cert, head_key, member_cert, member_key }, ca_key_pem))
    }

    /// The cluster file contents for peers dialing `address`.
    pub fn cluster(&self, address: &str) -> ClusterCredentials {
        ClusterCredentials {
            address: address.to_string(),
            ca_cert: self.ca_cert.clone(),
            member_cert: self.member_cert.clone(),
            member_key: self.member_key.clone(),
            loaded_from: None,
        }
    }

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
        let mut config = quinn::EndpointConfig::new(Arc::new(key));
        // The connection ids must pass the restarted head's check too, or it drops the old
        // connections' packets as invalid instead of resetting them: their hash key comes
        // from the same private key, under a label of its own (ids are seen on the wire, and
        // their hash is no MAC: it must not give away the reset key).
        let cid_secret = sha2::Sha256::new()
            .chain_update(b"chia connection ids\0")
            .chain_update(self.head_key.as_bytes())
            .finalize();
        let cid_key = u64::from_le_bytes(cid_secret[..8].try_into().expect("a SHA-256 digest has 32 bytes"));
        config.cid_generator(move || Box::new(quinn_proto::HashedConnectionIdGenerator::from_key(cid_key)));
        config
    }

    /// The head's QUIC server configuration: its certificate, and a client certificate the
    /// cluster CA signed required of every peer. No revocation check: see
    /// [`HeadCredentials::server_config_checked`].
    pub fn server_config(&self) -> Result<quinn::ServerConfig, TlsError> {
        self.server_config_checked(None)
    }

    /// [`HeadCredentials::server_config`] where a client certificate the CA signed must also
    /// pass `check` (the revocation list), in the handshake.
    pub fn server_config_checked(
        &self,
        check: Option<Arc<dyn MemberCheck>>,
    ) -> Result<quinn::ServerConfig, TlsError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let roots = Arc::new(root_store(&self.ca_cert)?);
        let mut verifier =
            rustls::server::WebPkiClientVerifier::builder_with_provider(roots, provider.clone()).build()?;
        if let Some(check) = check {
            verifier = Arc::new(CheckedClientVerifier { inner: verifier, check });
        }
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
        // What connections not accepted yet may make the head hold: the head's accept loop
        // takes them at once (and asks for address validation under load), so these bound
        // only a burst.
        config.max_incoming(1024);
        config.incoming_buffer_size(64 << 10);
        config.incoming_buffer_size_total(8 << 20);
        Ok(config)
    }

    /// Loads the head's credentials from `state_dir`, creating them (and the CA key) on first
    /// start. A state directory that others may enter is tightened to 0700 first.
    pub fn load_or_create(state_dir: &Path) -> Result<HeadCredentials, TlsError> {
        let path = state_dir.join(CREDENTIALS_FILE);
        let file_error = |message: String| TlsError::File { path: path.clone(), message };
        if state_dir.exists() {
            tighten_private_dir(state_dir)
                .map_err(|e| TlsError::File { path: state_dir.to_path_buf(), message: e.to_string() })?;
        }
        if path.exists() {
            let credentials = HeadCredentials::load(state_dir)?;
            if !state_dir.join(CA_KEY_FILE).exists() {
                tracing::info!(
                    "{} holds no CA key ({CA_KEY_FILE}): it predates kept CA keys, so `chia-head \
                     issue-member` cannot issue from it; a fresh state directory can",
                    state_dir.display()
                );
            }
            return Ok(credentials);
        }
        create_private_dir(state_dir).map_err(|e| file_error(e.to_string()))?;
        let (creds, ca_key) = HeadCredentials::generate_with_ca_key()?;
        // The CA key first: credentials without it would read as a state directory made
        // before CA keys were kept.
        let key_path = state_dir.join(CA_KEY_FILE);
        write_private(&key_path, &ca_key)
            .map_err(|e| TlsError::File { path: key_path.clone(), message: e.to_string() })?;
        creds.save(state_dir)?;
        Ok(creds)
    }

    /// Reads the head's credentials from `state_dir` (which must hold them).
    pub fn load(state_dir: &Path) -> Result<HeadCredentials, TlsError> {
        let path = state_dir.join(CREDENTIALS_FILE);
        let text = std::fs::read_to_string(&path)
            .map_err(|e| TlsError::File { path: path.clone(), message: e.to_string() })?;
        parse_yaml(&text, &path)
    }

    /// Writes the head's credentials into `state_dir` (0600, atomically).
    pub fn save(&self, state_dir: &Path) -> Result<(), TlsError> {
        let path = state_dir.join(CREDENTIALS_FILE);
        let file_error = |message: String| TlsError::File { path: path.clone(), message };
        let text = serde_saphyr::to_string(self).map_err(|e| file_error(e.to_string()))?;
        write_private(&path, &text).map_err(|e| file_error(e.to_string()))
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
        let mut credentials: ClusterCredentials = serde_saphyr::from_str(&text)
            .map_err(|e| file_error(format!("not a cluster file: {}", render_yaml_error(&e, path))))?;
        credentials.loaded_from = Some(path.to_path_buf());
        Ok(credentials)
    }

    /// Writes a cluster file readable only by its owner.
    pub fn save(&self, path: &Path) -> Result<(), TlsError> {
        let file_error = |message: String| TlsError::File { path: path.to_path_buf(), message };
        let text = serde_saphyr::to_string(self).map_err(|e| file_error(e.to_string()))?;
        write_private(path, &text).map_err(|e| file_error(e.to_string()))
    }
}

/// Parses the YAML file `path` holds (`text`); its errors name the file.
fn parse_yaml<T: serde::de::DeserializeOwned>(text: &str, path: &Path) -> Result<T, TlsError> {
    serde_saphyr::from_str(text)
        .map_err(|e| TlsError::File { path: path.to_path_buf(), message: render_yaml_error(&e, path) })
}

/// The parser's message with its snippet headed by the file's name (the default says `<input>`).
fn render_yaml_error(error: &serde_saphyr::Error, path: &Path) -> String {
    let name = path.display().to_string();
    error.render_with_options(serde_saphyr::render_options! { source_name: Some(name.as_str()) })
}

/// Takes away what group and others may do in `dir`, which holds the head's keys, if they may
/// do anything (a directory made by hand or by a tool with a 022 umask is 0755); logged, as
/// the owner may wonder where their permissions went.
pub fn tighten_private_dir(dir: &Path) -> std::io::Result<()> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir)?.permissions().mode() & 0o7777;
        if mode & 0o077 != 0 {
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
            tracing::warn!(
                "the state directory {} was mode {mode:04o}, which lets others read it; set it to 0700",
                dir.display()
            );
        }
    }
    Ok(())
}

/// Creates `dir` (and its parents) readable only by its owner.
fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    let mut builder = std::fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
    builder.create(dir)
}

/// Writes `contents` (text or bytes) to `path` with mode 0600, atomically and durably (temp
/// file, fsync, rename, fsync of the directory), so a reader never sees half a file and a
/// crash leaves the old contents or the new ones.
pub fn write_private(path: &Path, contents: impl AsRef<[u8]>) -> std::io::Result<()> {
    use std::io::Write;
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let mut tmp = tempfile::NamedTempFile::new_in(dir)?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        tmp.as_file().set_permissions(std::fs::Permissions::from_mode(0o600))?;
    }
    tmp.write_all(contents.as_ref())?;
    tmp.as_file().sync_all()?;
    tmp.persist(path).map_err(|e| e.error)?;
    // The rename is durable only once the directory is.
    std::fs::File::open(dir)?.sync_all()
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
    // A head restarted on the same state directory answers the first keep-alive with a
    // stateless reset (see `endpoint_config`), so peers notice a restart within a second; a
    // head that stays down, or a peer that died silently, within the idle timeout.
    transport.keep_alive_interval(Some(std::time::Duration::from_secs(1)));
    transport.max_idle_timeout(Some(quinn::VarInt::from_u32(5_000).into()));
    transport
}

/// The client verifier the head runs with a [`MemberCheck`]: the CA's verdict first (so the
/// check only ever sees certificates this cluster issued), then the check.
#[derive(Debug)]
struct CheckedClientVerifier {
    inner: Arc<dyn ClientCertVerifier>,
    check: Arc<dyn MemberCheck>,
}

impl ClientCertVerifier for CheckedClientVerifier {
    fn offer_client_auth(&self) -> bool {
        self.inner.offer_client_auth()
    }

    fn client_auth_mandatory(&self) -> bool {
        self.inner.client_auth_mandatory()
    }

    fn root_hint_subjects(&self) -> &[rustls::DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let verified = self.inner.verify_client_cert(end_entity, intermediates, now)?;
        self.check.admit(end_entity)?;
        Ok(verified)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// Part of every error saying the head is another cluster's.
const NOT_THIS_CLUSTER: &str = "is not the cluster of";
/// Part of every error saying the head refused a member's certificate.
const CERTIFICATE_REFUSED: &str = "refused the member certificate of";

/// What a failed connection to the head means for a member holding `credentials`, when it
/// failed on a certificate: rustls only names the check that failed (`BadSignature`), not
/// what the user got wrong. `None` for every other failure.
pub fn explain_connection_error(
    error: &quinn::ConnectionError,
    credentials: &ClusterCredentials,
) -> Option<String> {
    use rustls::AlertDescription as Alert;
    let alert = |code: quinn::TransportErrorCode, alerts: &[Alert]| {
        alerts.iter().any(|alert| code == quinn::TransportErrorCode::crypto(u8::from(*alert)))
    };
    let address = &credentials.address;
    let file = match &credentials.loaded_from {
        Some(path) => path.display().to_string(),
        None => "these credentials".to_string(),
    };
    match error {
        // We refused the head's certificate: it is not signed by our CA (rustls says
        // BadSignature when the CA names match, as every chia CA's do, UnknownIssuer otherwise).
        quinn::ConnectionError::TransportError(local)
            if alert(local.code, &[Alert::DecryptError, Alert::UnknownCA]) =>
        {
            Some(format!(
                "the head at {address} {NOT_THIS_CLUSTER} {file} (its certificate is not signed by \
                 that file's CA: {})",
                local.reason
            ))
        }
        // The head refused our member certificate.
        quinn::ConnectionError::ConnectionClosed(close)
            if alert(close.error_code, &[Alert::CertificateRevoked]) =>
        {
            Some(format!("the head at {address} {CERTIFICATE_REFUSED} {file}: it is revoked"))
        }
        quinn::ConnectionError::ConnectionClosed(close)
            if alert(close.error_code, &[Alert::CertificateExpired]) =>
        {
            Some(format!(
                "the head at {address} {CERTIFICATE_REFUSED} {file}: it has expired (or is \
                 not valid yet: check the clocks)"
            ))
        }
        quinn::ConnectionError::ConnectionClosed(close)
            if alert(close.error_code, &[Alert::AccessDenied]) =>
        {
            Some(format!("the head at {address} {CERTIFICATE_REFUSED} {file} (its log says why)"))
        }
        quinn::ConnectionError::ConnectionClosed(close)
            if alert(
                close.error_code,
                &[Alert::DecryptError, Alert::UnknownCA, Alert::BadCertificate, Alert::CertificateUnknown],
            ) =>
        {
            Some(format!(
                "the head at {address} {CERTIFICATE_REFUSED} {file}: it is not signed by \
                 the head's CA (a member certificate of another cluster?)"
            ))
        }
        _ => None,
    }
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
