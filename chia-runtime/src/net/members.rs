//! Member certificates of their own, and the revocation list the head checks in the handshake.
//!
//! Every head has one shared member certificate (`chia-member`, in the `cluster.yaml` it writes
//! at start). With the CA key kept in its state directory, `chia-head issue-member` signs a
//! certificate for one identity (CN and SAN = its name, client auth only, valid for as many
//! days as asked) and writes a cluster file holding it; each one issued is noted in
//! `members.yaml`. `chia-head revoke NAME` puts every certificate issued to NAME so far into
//! `revoked.yaml`, which the running head reads again whenever the file changes.
//!
//! **Revocation is by serial, named by identity.** The list holds the serials of the
//! certificates issued to a name when it was revoked, so a certificate issued to the same name
//! afterwards (a leaked key replaced: revoke, then issue again) is accepted, while every
//! earlier copy stays refused. Revoking by name alone could not tell the two apart; revoking
//! by serial alone would make users find serials. Revoking the shared `chia-member` also
//! issues a new shared certificate (the head's own node joins with it, so without a new one a
//! restarted head could not start) and writes it into `cluster.yaml`.

use crate::net::tls::{
    CA_KEY_FILE, CREDENTIALS_FILE, ClusterCredentials, DEFAULT_MEMBER_NAME, HEAD_SERVER_NAME,
    HeadCredentials, MemberCheck, TlsError, write_private,
};
use rcgen::{CertificateParams, DnType, ExtendedKeyUsagePurpose, Issuer, KeyPair, SerialNumber};
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use time::OffsetDateTime;

/// The certificates issued from a state directory, by `issue-member` (and the shared ones
/// revoke retired).
pub const MEMBERS_FILE: &str = "members.yaml";
/// The revoked certificates, read by the running head.
pub const REVOKED_FILE: &str = "revoked.yaml";
/// Held while `members.yaml`, `revoked.yaml` or the credentials are read and rewritten, so two
/// commands run at once do not lose each other's entry.
const LOCK_FILE: &str = "credentials.lock";
/// The cluster file the head writes at start.
const CLUSTER_FILE: &str = "cluster.yaml";
/// The longest validity `issue-member` grants: ten years.
pub const MAX_VALID_DAYS: u32 = 3650;

/// Why issuing, revoking or listing member certificates failed; each message says what to
/// pass or fix, for `chia-head issue-member` and `chia-head revoke` to print as it is.
#[derive(Debug, thiserror::Error)]
pub enum MemberError {
    /// The name cannot be a member's identity (see [`validate_member_name`]).
    #[error("{name:?} is not a valid member name: {why}")]
    BadName {
        /// The name as given.
        name: String,
        /// The rule it breaks.
        why: &'static str,
    },
    /// A validity of 0 days or of more than [`MAX_VALID_DAYS`] was asked for.
    #[error("--valid-days {days}: a member certificate is valid for 1 to {MAX_VALID_DAYS} days")]
    BadValidity {
        /// The validity asked for, in days.
        days: u32,
    },
    /// The state directory has no head credentials: it is not (yet) a head's.
    #[error(
        "{} holds no head credentials ({CREDENTIALS_FILE}): pass the --state-dir the head runs with \
         (or start chia-head on it once)",
        dir.display()
    )]
    NoHead {
        /// The state directory given.
        dir: PathBuf,
    },
    /// The head of this state directory did not keep its CA key, so nothing can be signed.
    #[error(
        "{} holds no CA key ({CA_KEY_FILE}): it was made by a chia-head that did not keep its CA key, \
         so no certificate can be issued or rotated from it. Start the head on a fresh state \
         directory to issue member certificates (every member then needs the new cluster.yaml); \
         the head still runs on this one, with the shared member certificate",
        dir.display()
    )]
    NoCaKey {
        /// The state directory given.
        dir: PathBuf,
    },
    /// The CA key file holds a key other than the one the cluster's CA certificate names.
    #[error("{}: the CA key does not belong to the CA certificate in {CREDENTIALS_FILE}", path.display())]
    CaKeyMismatch {
        /// The CA key file.
        path: PathBuf,
    },
    /// No `--address` was given and there is no `cluster.yaml` to take the head's from.
    #[error(
        "no address for the cluster file: {} does not exist yet (the head writes it when it starts); \
         pass --address HOST:PORT",
        path.display()
    )]
    NoAddress {
        /// The `cluster.yaml` looked for.
        path: PathBuf,
    },
    /// `revoke` was given a name no certificate was issued to.
    #[error("no member certificate named {name:?} was issued from {}{suggestion}", dir.display())]
    UnknownMember {
        /// The name as given.
        name: String,
        /// The state directory whose `members.yaml` was searched.
        dir: PathBuf,
        /// Appended to the message: the closest issued name (" — did you mean …?"), or else
        /// the list of names issued.
        suggestion: String,
    },
    /// A file of the state directory could not be read, written or locked.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// What the operating system reported.
        #[source]
        source: std::io::Error,
    },
    /// A certificate or key could not be parsed, or no random serial could be drawn.
    #[error("{what}: {message}")]
    Certificate {
        /// Which certificate or key, as the message names it (a file, or a description).
        what: String,
        /// The parser's (or the random source's) error.
        message: String,
    },
    /// The head's credentials, or a YAML file of the state directory, could not be read or
    /// written.
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// rcgen could not make the key pair or sign the certificate.
    #[error("certificate generation failed: {0}")]
    Generate(#[from] rcgen::Error),
}

/// One certificate issued from the state directory.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct IssuedMember {
    /// The identity it was issued to: its CN and DNS SAN, and the name `revoke` takes.
    pub name: String,
    /// The certificate's serial number, lowercase hex.
    pub serial: String,
    /// RFC 3339.
    pub issued_at: String,
    /// RFC 3339.
    pub not_after: String,
}

/// One revoked certificate.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct RevokedMember {
    /// The identity the certificate was issued to (the name `revoke` was given).
    pub name: String,
    /// The certificate's serial number, lowercase hex.
    pub serial: String,
    /// RFC 3339.
    pub revoked_at: String,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct MembersFile {
    #[serde(default)]
    members: Vec<IssuedMember>,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct RevokedFile {
    #[serde(default)]
    revoked: Vec<RevokedMember>,
}

/// What a member certificate says about its holder.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MemberCertificate {
    /// The subject's common name.
    pub name: String,
    /// Lowercase hex.
    pub serial: String,
    /// The end of its validity (UTC, whole seconds). The shared certificate has rcgen's
    /// default, the year 4096: it does not expire.
    pub not_after: OffsetDateTime,
}

impl MemberCertificate {
    /// Reads a DER certificate.
    pub fn from_der(der: &[u8]) -> Result<MemberCertificate, String> {
        let (_, cert) = x509_parser::parse_x509_certificate(der).map_err(|e| e.to_string())?;
        let name = cert
            .subject()
            .iter_common_name()
            .next()
            .and_then(|cn| cn.as_str().ok())
            .unwrap_or("(no common name)")
            .to_string();
        let serial = cert.raw_serial().iter().map(|b| format!("{b:02x}")).collect();
        Ok(MemberCertificate { name, serial, not_after: cert.validity().not_after.to_datetime() })
    }

    /// Reads the first certificate of a PEM text.
    pub fn from_pem(pem: &str) -> Result<MemberCertificate, String> {
        let der = CertificateDer::from_pem_slice(pem.as_bytes()).map_err(|e| e.to_string())?;
        MemberCertificate::from_der(&der)
    }
}

/// Checks `name` can be a member's identity: it becomes a certificate's CN and DNS SAN and
/// appears in logs and file names, so it is kept to what all of those take without quoting.
pub fn validate_member_name(name: &str) -> Result<(), MemberError> {
    let bad = |why| Err(MemberError::BadName { name: name.to_string(), why });
    if name.is_empty() || name.len() > 64 {
        return bad("it must be 1 to 64 characters long");
    }
    if !name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.')) {
        return bad("only ASCII letters, digits, '-', '_' and '.' are allowed");
    }
    let ends = [name.as_bytes()[0], name.as_bytes()[name.len() - 1]];
    if !ends.iter().all(u8::is_ascii_alphanumeric) {
        return bad("it must start and end with a letter or a digit");
    }
    if name == HEAD_SERVER_NAME {
        return bad("it is the head's own certificate name");
    }
    if name == DEFAULT_MEMBER_NAME {
        return bad(
            "it is the shared member certificate's name (`chia-head revoke chia-member` replaces that one)",
        );
    }
    Ok(())
}

/// Issues a member certificate for `name`, valid for `valid_days` from now, signed by the CA
/// kept in `state_dir`, and notes it in `members.yaml`. The cluster file returned dials
/// `address`, or else the address in the head's `cluster.yaml`.
pub fn issue_member(
    state_dir: &Path,
    name: &str,
    valid_days: u32,
    address: Option<&str>,
) -> Result<(ClusterCredentials, IssuedMember), MemberError> {
    validate_member_name(name)?;
    if valid_days == 0 || valid_days > MAX_VALID_DAYS {
        return Err(MemberError::BadValidity { days: valid_days });
    }
    let address = match address {
        Some(address) => address.to_string(),
        None => {
            let path = state_dir.join(CLUSTER_FILE);
            if !path.exists() {
                return Err(MemberError::NoAddress { path });
            }
            ClusterCredentials::load(&path)?.address
        }
    };
    let _lock = StateLock::take(state_dir)?;
    let head = load_head(state_dir)?;
    let ca_key = load_ca_key(state_dir, &head)?;
    let now = OffsetDateTime::now_utc();
    let not_after = now + time::Duration::days(i64::from(valid_days));
    let (member_cert, member_key) = sign_member(&head, &ca_key, name, Some(not_after))?;
    let issued = MemberCertificate::from_pem(&member_cert).map_err(|message| MemberError::Certificate {
        what: format!("the certificate issued to {name}"),
        message,
    })?;
    let record = IssuedMember {
        name: name.to_string(),
        serial: issued.serial,
        issued_at: rfc3339(now),
        not_after: rfc3339(issued.not_after),
    };
    let mut members = read_members(state_dir)?;
    members.members.push(record.clone());
    write_yaml(&state_dir.join(MEMBERS_FILE), &members)?;
    let credentials = ClusterCredentials {
        address,
        ca_cert: head.ca_cert.clone(),
        member_cert,
        member_key,
        loaded_from: None,
    };
    Ok((credentials, record))
}

/// What [`revoke_member`] did.
#[derive(Debug)]
pub struct Revocation {
    /// The certificates revoked now.
    pub revoked: Vec<RevokedMember>,
    /// How many of the name's certificates were revoked already.
    pub already: usize,
    /// The shared member certificate was replaced (in the head's credentials and, if there,
    /// in `cluster.yaml`).
    pub rotated: bool,
}

/// Revokes every certificate issued to `name` so far: the running head refuses them from its
/// next handshake on. Revoking the shared `chia-member` also replaces it with a new one, which
/// needs the CA key.
pub fn revoke_member(state_dir: &Path, name: &str) -> Result<Revocation, MemberError> {
    let _lock = StateLock::take(state_dir)?;
    let head = load_head(state_dir)?;
    let mut members = read_members(state_dir)?;
    let mut rotated = false;
    if name == DEFAULT_MEMBER_NAME {
        // Checked before anything changes: a shared certificate revoked and not replaced would
        // keep the head's own node out at the next start.
        let ca_key = load_ca_key(state_dir, &head)?;
        let current =
            MemberCertificate::from_pem(&head.member_cert).map_err(|message| MemberError::Certificate {
                what: format!("the shared member certificate in {CREDENTIALS_FILE}"),
                message,
            })?;
        // Noted first, so that if this stops half-way a second revoke still finds it.
        if !members.members.iter().any(|m| m.serial == current.serial) {
            members.members.push(IssuedMember {
                name: DEFAULT_MEMBER_NAME.to_string(),
                serial: current.serial,
                issued_at: "unknown (made with the state directory)".to_string(),
                not_after: rfc3339(current.not_after),
            });
            write_yaml(&state_dir.join(MEMBERS_FILE), &members)?;
        }
        let (member_cert, member_key) = sign_member(&head, &ca_key, DEFAULT_MEMBER_NAME, None)?;
        let rotated_head = HeadCredentials { member_cert, member_key, ..head.clone() };
        rotated_head.save(state_dir)?;
        let cluster_file = state_dir.join(CLUSTER_FILE);
        if cluster_file.exists() {
            let address = ClusterCredentials::load(&cluster_file)?.address;
            rotated_head.cluster(&address).save(&cluster_file)?;
        }
        rotated = true;
    }
    let issued: Vec<&IssuedMember> = members.members.iter().filter(|m| m.name == name).collect();
    if issued.is_empty() {
        let mut known: Vec<&str> = members.members.iter().map(|m| m.name.as_str()).collect();
        known.push(DEFAULT_MEMBER_NAME);
        known.sort_unstable();
        known.dedup();
        let suggestion = match chia_core::names::closest_name(name, known.iter().copied(), 2) {
            Some(close) => format!(" — did you mean {close:?}?"),
            None => format!(" (issued: {})", known.join(", ")),
        };
        return Err(MemberError::UnknownMember {
            name: name.to_string(),
            dir: state_dir.to_path_buf(),
            suggestion,
        });
    }
    let path = state_dir.join(REVOKED_FILE);
    let mut list: RevokedFile = read_yaml(&path)?;
    let now = rfc3339(OffsetDateTime::now_utc());
    let mut revoked = Vec::new();
    let mut already = 0;
    for member in issued {
        if list.revoked.iter().any(|r| r.serial == member.serial) {
            already += 1;
            continue;
        }
        let entry =
            RevokedMember { name: name.to_string(), serial: member.serial.clone(), revoked_at: now.clone() };
        list.revoked.push(entry.clone());
        revoked.push(entry);
    }
    if !revoked.is_empty() {
        write_yaml(&path, &list)?;
    }
    Ok(Revocation { revoked, already, rotated })
}

/// The certificates issued from `state_dir` (`members.yaml`).
pub fn issued_members(state_dir: &Path) -> Result<Vec<IssuedMember>, MemberError> {
    Ok(read_members(state_dir)?.members)
}

/// The head's view of `revoked.yaml`: checked in every handshake. One `stat` per handshake
/// tells whether the file changed since it was last read (a rewrite is a rename, so a new
/// inode); only then is it read again. A list that exists but cannot be read refuses every
/// member (anyone may be on it) until it can.
#[derive(Debug)]
pub struct RevocationList {
    path: PathBuf,
    loaded: Mutex<Loaded>,
}

#[derive(Debug, Default)]
struct Loaded {
    /// What the file looked like when read; `None`: there was no file.
    stamp: Option<Stamp>,
    /// serial → name.
    serials: HashMap<String, String>,
    /// Why the file could not be read, if it could not.
    broken: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Stamp {
    inode: u64,
    len: u64,
    modified: Option<std::time::SystemTime>,
}

impl RevocationList {
    /// The list of `state_dir`, read now: a head whose list cannot be read does not start.
    pub fn open(state_dir: &Path) -> Result<Arc<RevocationList>, TlsError> {
        let list =
            RevocationList { path: state_dir.join(REVOKED_FILE), loaded: Mutex::new(Loaded::default()) };
        {
            let mut loaded = list.lock();
            list.refresh(&mut loaded);
            if let Some(problem) = &loaded.broken {
                return Err(TlsError::File { path: list.path.clone(), message: problem.clone() });
            }
        }
        Ok(Arc::new(list))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Loaded> {
        self.loaded.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Reads the file again if it changed.
    fn refresh(&self, loaded: &mut Loaded) {
        let stamp = match std::fs::metadata(&self.path) {
            Ok(meta) => Some(Stamp { inode: inode(&meta), len: meta.len(), modified: meta.modified().ok() }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => {
                loaded.broken = Some(e.to_string());
                loaded.stamp = None;
                return;
            }
        };
        if stamp == loaded.stamp && loaded.broken.is_none() {
            return;
        }
        let read: Result<RevokedFile, TlsError> = match stamp {
            None => Ok(RevokedFile::default()),
            Some(_) => read_yaml(&self.path).map_err(|e| match e {
                MemberError::Tls(e) => e,
                other => TlsError::File { path: self.path.clone(), message: other.to_string() },
            }),
        };
        match read {
            Ok(file) => {
                loaded.serials = file.revoked.into_iter().map(|r| (r.serial, r.name)).collect();
                loaded.broken = None;
                loaded.stamp = stamp;
                tracing::info!(
                    "revocation list {}: {} certificate(s) revoked",
                    self.path.display(),
                    loaded.serials.len()
                );
            }
            Err(e) => {
                if loaded.broken.is_none() {
                    tracing::error!(
                        "cannot read the revocation list: {e}; refusing every member until it can be read"
                    );
                }
                loaded.broken = Some(e.to_string());
                loaded.stamp = stamp;
            }
        }
    }
}

impl MemberCheck for RevocationList {
    fn admit(&self, end_entity: &CertificateDer<'_>) -> Result<(), rustls::Error> {
        let mut loaded = self.lock();
        self.refresh(&mut loaded);
        if let Some(problem) = &loaded.broken {
            tracing::warn!(
                "refused a member: the revocation list {} cannot be read ({problem})",
                self.path.display()
            );
            return Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::ApplicationVerificationFailure,
            ));
        }
        if loaded.serials.is_empty() {
            return Ok(());
        }
        let cert = MemberCertificate::from_der(end_entity).map_err(|message| {
            tracing::warn!("refused a member whose certificate cannot be read: {message}");
            rustls::Error::InvalidCertificate(rustls::CertificateError::BadEncoding)
        })?;
        if loaded.serials.contains_key(&cert.serial) {
            tracing::warn!(
                "refused member {:?} (certificate serial {}): it is revoked in {}",
                cert.name,
                cert.serial,
                self.path.display()
            );
            return Err(rustls::Error::InvalidCertificate(rustls::CertificateError::Revoked));
        }
        Ok(())
    }
}

#[cfg(unix)]
fn inode(meta: &std::fs::Metadata) -> u64 {
    std::os::unix::fs::MetadataExt::ino(meta)
}

#[cfg(not(unix))]
fn inode(_meta: &std::fs::Metadata) -> u64 {
    0
}

/// Signs a member certificate for `name` with the cluster CA; `not_after: None` keeps rcgen's
/// default (the shared certificate's, as the head first made it).
fn sign_member(
    head: &HeadCredentials,
    ca_key: &KeyPair,
    name: &str,
    not_after: Option<OffsetDateTime>,
) -> Result<(String, String), MemberError> {
    let issuer = Issuer::from_ca_cert_pem(&head.ca_cert, ca_key)?;
    let mut params = CertificateParams::new(vec![name.to_string()])?;
    params.distinguished_name.push(DnType::CommonName, name);
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    params.serial_number = Some(random_serial()?);
    if let Some(not_after) = not_after {
        // A minute back: the head checks the start against its own clock, which is the clock
        // that issued it, but X.509 times are whole seconds.
        params.not_before = OffsetDateTime::now_utc() - time::Duration::minutes(1);
        params.not_after = not_after;
    }
    let key = KeyPair::generate()?;
    let cert = params.signed_by(&key, &issuer)?;
    Ok((cert.pem(), key.serialize_pem()))
}

/// 128 random bits, positive and without a leading zero byte (DER keeps it as written), so
/// serials never repeat: the revocation list tells certificates apart by them.
fn random_serial() -> Result<SerialNumber, MemberError> {
    use ring::rand::SecureRandom;
    let mut bytes = [0u8; 16];
    ring::rand::SystemRandom::new().fill(&mut bytes).map_err(|_| MemberError::Certificate {
        what: "a serial number".into(),
        message: "the system's random source failed".into(),
    })?;
    bytes[0] = (bytes[0] & 0x7f) | 0x40;
    Ok(SerialNumber::from(bytes.to_vec()))
}

fn load_head(state_dir: &Path) -> Result<HeadCredentials, MemberError> {
    if !state_dir.join(CREDENTIALS_FILE).exists() {
        return Err(MemberError::NoHead { dir: state_dir.to_path_buf() });
    }
    Ok(HeadCredentials::load(state_dir)?)
}

/// The CA key kept in `state_dir`, checked against the CA certificate of `head`.
fn load_ca_key(state_dir: &Path, head: &HeadCredentials) -> Result<KeyPair, MemberError> {
    let path = state_dir.join(CA_KEY_FILE);
    let pem = match std::fs::read_to_string(&path) {
        Ok(pem) => pem,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(MemberError::NoCaKey { dir: state_dir.to_path_buf() });
        }
        Err(source) => return Err(MemberError::Io { path, source }),
    };
    let key = KeyPair::from_pem(&pem)
        .map_err(|e| MemberError::Certificate { what: path.display().to_string(), message: e.to_string() })?;
    let ca_der =
        CertificateDer::from_pem_slice(head.ca_cert.as_bytes()).map_err(|e| MemberError::Certificate {
            what: format!("the CA certificate in {CREDENTIALS_FILE}"),
            message: e.to_string(),
        })?;
    let (_, ca) = x509_parser::parse_x509_certificate(&ca_der).map_err(|e| MemberError::Certificate {
        what: format!("the CA certificate in {CREDENTIALS_FILE}"),
        message: e.to_string(),
    })?;
    if ca.public_key().raw != rcgen::PublicKeyData::subject_public_key_info(&key).as_slice() {
        return Err(MemberError::CaKeyMismatch { path });
    }
    Ok(key)
}

fn read_members(state_dir: &Path) -> Result<MembersFile, MemberError> {
    read_yaml(&state_dir.join(MEMBERS_FILE))
}

/// A YAML file of `state_dir`; a missing one is empty.
fn read_yaml<T: serde::de::DeserializeOwned + Default>(path: &Path) -> Result<T, MemberError> {
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(T::default()),
        Err(source) => return Err(MemberError::Io { path: path.to_path_buf(), source }),
    };
    serde_saphyr::from_str::<Option<T>>(&text).map(Option::unwrap_or_default).map_err(|e| {
        let name = path.display().to_string();
        let message =
            e.render_with_options(serde_saphyr::render_options! { source_name: Some(name.as_str()) });
        MemberError::Tls(TlsError::File { path: path.to_path_buf(), message })
    })
}

fn write_yaml<T: Serialize>(path: &Path, value: &T) -> Result<(), MemberError> {
    let text = serde_saphyr::to_string(value)
        .map_err(|e| TlsError::File { path: path.to_path_buf(), message: e.to_string() })?;
    write_private(path, &text).map_err(|source| MemberError::Io { path: path.to_path_buf(), source })
}

/// To the second: certificates hold whole seconds.
fn rfc3339(at: OffsetDateTime) -> String {
    let at = at.replace_nanosecond(0).unwrap_or(at);
    at.format(&time::format_description::well_known::Rfc3339).unwrap_or_else(|_| at.to_string())
}

/// An exclusive `flock` on the state directory's lock file, released when dropped (or when the
/// process dies, so a crashed command never leaves it held).
struct StateLock {
    _file: std::fs::File,
}

impl StateLock {
    fn take(state_dir: &Path) -> Result<StateLock, MemberError> {
        let path = state_dir.join(LOCK_FILE);
        let mut options = std::fs::OpenOptions::new();
        options.create(true).truncate(false).write(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
        let file = options.open(&path).map_err(|source| MemberError::Io { path: path.clone(), source })?;
        // std's lock is `flock` on Linux: a command of an older build, which called `flock`
        // itself, takes the same lock.
        file.lock().map_err(|source| MemberError::Io { path, source })?;
        Ok(StateLock { _file: file })
    }
}
