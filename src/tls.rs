//! TLS credentials for the NBD export and the replication link (issue 13,
//! docs/tls.md): the certificate directory, its validation, the rustls
//! configurations built from it, reload, and what status shows about a
//! certificate (subject, expiry).
//!
//! The directory follows the GnuTLS layout that qemu-nbd, nbdkit and libnbd
//! share, so users reuse the directories they made for those:
//!
//! | file | used for |
//! |---|---|
//! | `ca-cert.pem` | the CA that signs peers' and clients' certificates |
//! | `server-cert.pem`, `server-key.pem` | what this node presents when it accepts (NBD clients, the replication peer that dials in) |
//! | `client-cert.pem`, `client-key.pem` | what this node presents when it dials its replication peer |
//! | `ca-crl.pem` (optional) | revoked certificates |
//!
//! One TLS stack: rustls 0.23 with the `ring` provider. rustls has no TLS-PSK
//! (external pre-shared keys), so `tls-psk-file` clients are not served;
//! docs/tls.md says why this stack was chosen anyway.
//!
//! Reload: [`TlsContext`] keeps the configurations behind a lock and hands
//! out an `Arc` per handshake; [`TlsContext::reload`] builds new ones from
//! the files and swaps them in only if all of them load, so established
//! connections keep the configuration they were made with and a bad file
//! leaves the old credentials in use.
//!
//! This module is a leaf: it imports nothing from the crate.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer, ServerName};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};

pub use tokio_rustls::{TlsAcceptor, TlsConnector};

/// The CA certificate file in a TLS directory.
pub const CA_CERT: &str = "ca-cert.pem";
/// The certificate this node presents when it accepts a connection.
pub const SERVER_CERT: &str = "server-cert.pem";
/// The key of [`SERVER_CERT`].
pub const SERVER_KEY: &str = "server-key.pem";
/// The certificate this node presents when it dials its peer.
pub const CLIENT_CERT: &str = "client-cert.pem";
/// The key of [`CLIENT_CERT`].
pub const CLIENT_KEY: &str = "client-key.pem";
/// Optional certificate revocation list.
pub const CA_CRL: &str = "ca-crl.pem";
/// A certificate expiring within this is warned about in logs and status.
pub const EXPIRY_WARNING: Duration = Duration::from_secs(30 * 24 * 3600);

/// `[tls] nbd`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum NbdTlsMode {
    /// STARTTLS is answered `NBD_REP_ERR_UNSUP` (the NBD spec's NOTLS mode).
    #[default]
    Off,
    /// STARTTLS is offered; plain clients are served too.
    On,
    /// Every option but STARTTLS and ABORT is answered
    /// `NBD_REP_ERR_TLS_REQD` until TLS is up (the spec's FORCEDTLS mode).
    Require,
}

impl NbdTlsMode {
    pub fn as_str(self) -> &'static str {
        match self {
            NbdTlsMode::Off => "off",
            NbdTlsMode::On => "on",
            NbdTlsMode::Require => "require",
        }
    }
}

/// `[tls] replication`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ReplTlsMode {
    /// The link is plain TCP (authenticated by the HMAC handshake only).
    #[default]
    Off,
    /// Mutual TLS: each side's certificate must be signed by the CA and name
    /// the node it belongs to.
    Require,
}

impl ReplTlsMode {
    pub fn as_str(self) -> &'static str {
        match self {
            ReplTlsMode::Off => "off",
            ReplTlsMode::Require => "require",
        }
    }
}

/// What the `[tls]` section asks of one node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsSettings {
    /// The certificate directory (`[tls] dir`, or the node's `tls_dir`).
    pub dir: PathBuf,
    pub nbd: NbdTlsMode,
    pub replication: ReplTlsMode,
    /// NBD clients must present a certificate signed by the CA.
    pub nbd_verify_client: bool,
}

impl TlsSettings {
    /// Whether anything uses TLS.
    pub fn enabled(&self) -> bool {
        self.nbd != NbdTlsMode::Off || self.replication != ReplTlsMode::Off
    }

    /// The files these settings need, in the order they are checked.
    pub fn required_files(&self) -> Vec<&'static str> {
        let mut files = Vec::new();
        if self.enabled() {
            files.extend([CA_CERT, SERVER_CERT, SERVER_KEY]);
        }
        if self.replication == ReplTlsMode::Require {
            files.extend([CLIENT_CERT, CLIENT_KEY]);
        }
        files
    }
}

/// A credential file that is missing or cannot be used. The message names
/// the file.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}: {message}", file.display())]
pub struct TlsError {
    pub file: PathBuf,
    pub message: String,
}

impl TlsError {
    fn new(file: &Path, message: impl Into<String>) -> TlsError {
        TlsError { file: file.to_path_buf(), message: message.into() }
    }
}

/// What status shows about one certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertInfo {
    /// The file it was read from (empty for a peer's certificate).
    pub file: PathBuf,
    /// The subject's distinguished name (RFC 4514), e.g. `CN=alpha`.
    pub subject: String,
    /// notAfter, seconds since the Unix epoch.
    pub not_after: u64,
}

impl CertInfo {
    /// Reads subject and expiry from a DER certificate.
    pub fn from_der(der: &[u8]) -> Result<CertInfo, String> {
        use x509_cert::der::Decode;
        let cert = x509_cert::Certificate::from_der(der).map_err(|e| format!("not an X.509 certificate: {e}"))?;
        let tbs = &cert.tbs_certificate;
        Ok(CertInfo {
            file: PathBuf::new(),
            subject: tbs.subject.to_string(),
            not_after: tbs.validity.not_after.to_unix_duration().as_secs(),
        })
    }

    /// Seconds until it expires (negative: expired).
    pub fn expires_in(&self, now: SystemTime) -> i64 {
        let now = now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
        self.not_after as i64 - now as i64
    }

    /// A warning if it expires within [`EXPIRY_WARNING`] of `now`.
    pub fn expiry_warning(&self, now: SystemTime) -> Option<String> {
        let left = self.expires_in(now);
        let what = if self.file.as_os_str().is_empty() {
            format!("certificate {}", self.subject)
        } else {
            format!("{} ({})", self.file.display(), self.subject)
        };
        if left <= 0 {
            Some(format!("{what} expired {} days ago", (-left) / 86400))
        } else if left < EXPIRY_WARNING.as_secs() as i64 {
            Some(format!("{what} expires in {} days", left / 86400))
        } else {
            None
        }
    }
}

/// The credentials of one directory, parsed.
struct Files {
    roots: Arc<RootCertStore>,
    crls: Vec<CertificateRevocationListDer<'static>>,
    server: (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>),
    client: Option<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)>,
    certs: Vec<CertInfo>,
}

fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    if !path.exists() {
        return Err(TlsError::new(path, "missing"));
    }
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| TlsError::new(path, format!("cannot read PEM certificates: {e}")))?;
    if certs.is_empty() {
        return Err(TlsError::new(path, "holds no PEM certificate (-----BEGIN CERTIFICATE-----)"));
    }
    Ok(certs)
}

fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    if !path.exists() {
        return Err(TlsError::new(path, "missing"));
    }
    PrivateKeyDer::from_pem_file(path).map_err(|e| TlsError::new(path, format!("cannot read a PEM private key: {e}")))
}

fn cert_info(path: &Path, der: &CertificateDer<'_>) -> Result<CertInfo, TlsError> {
    let mut info = CertInfo::from_der(der).map_err(|e| TlsError::new(path, e))?;
    info.file = path.to_path_buf();
    Ok(info)
}

/// The ring provider: it builds faster than aws-lc-rs and needs no cmake;
/// rustls 0.23.48 deprecates it only for lacking post-quantum key exchange,
/// which the GnuTLS clients (libnbd, qemu) do not offer by default either.
#[allow(deprecated)]
fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

impl Files {
    fn load(settings: &TlsSettings) -> Result<Files, TlsError> {
        let dir = &settings.dir;
        if !dir.is_dir() {
            return Err(TlsError::new(dir, "not a directory"));
        }
        let ca_path = dir.join(CA_CERT);
        let ca = read_certs(&ca_path)?;
        let mut roots = RootCertStore::empty();
        let mut certs = Vec::new();
        for c in &ca {
            roots.add(c.clone()).map_err(|e| TlsError::new(&ca_path, format!("not a usable CA certificate: {e}")))?;
            certs.push(cert_info(&ca_path, c)?);
        }
        let crl_path = dir.join(CA_CRL);
        let crls = if crl_path.exists() {
            CertificateRevocationListDer::pem_file_iter(&crl_path)
                .and_then(|it| it.collect::<Result<Vec<_>, _>>())
                .map_err(|e| TlsError::new(&crl_path, format!("cannot read the PEM revocation list: {e}")))?
        } else {
            Vec::new()
        };
        let pair = |cert: &str, key: &str| -> Result<_, TlsError> {
            let cert_path = dir.join(cert);
            let chain = read_certs(&cert_path)?;
            let key_path = dir.join(key);
            let key = read_key(&key_path)?;
            let info = cert_info(&cert_path, &chain[0])?;
            Ok((chain, key, info))
        };
        let (chain, key, info) = pair(SERVER_CERT, SERVER_KEY)?;
        certs.push(info);
        let server = (chain, key);
        let client = if settings.replication == ReplTlsMode::Require {
            let (chain, key, info) = pair(CLIENT_CERT, CLIENT_KEY)?;
            certs.push(info);
            Some((chain, key))
        } else {
            None
        };
        Ok(Files { roots: Arc::new(roots), crls, server, client, certs })
    }

    /// An acceptor's configuration; `verify_client`: the other end must
    /// present a certificate signed by the CA.
    fn server_config(&self, verify_client: bool) -> Result<Arc<ServerConfig>, TlsError> {
        let p = provider();
        let verifier = if verify_client {
            WebPkiClientVerifier::builder_with_provider(Arc::clone(&self.roots), Arc::clone(&p))
                .with_crls(self.crls.iter().cloned())
                .build()
                .map_err(|e| TlsError::new(&self.crl_or_ca(), format!("cannot verify clients with it: {e}")))?
        } else {
            WebPkiClientVerifier::no_client_auth()
        };
        let file = self.server_cert_file();
        let cfg = ServerConfig::builder_with_provider(p)
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError::new(&file, e.to_string()))?
            .with_client_cert_verifier(verifier)
            .with_single_cert(self.server.0.clone(), self.server.1.clone_key())
            .map_err(|e| TlsError::new(&file, format!("certificate and key do not go together: {e}")))?;
        Ok(Arc::new(cfg))
    }

    fn client_config(&self) -> Result<Option<Arc<ClientConfig>>, TlsError> {
        let Some((chain, key)) = &self.client else { return Ok(None) };
        let p = provider();
        let verifier =
            rustls::client::WebPkiServerVerifier::builder_with_provider(Arc::clone(&self.roots), Arc::clone(&p))
                .with_crls(self.crls.iter().cloned())
                .build()
                .map_err(|e| TlsError::new(&self.crl_or_ca(), format!("cannot verify servers with it: {e}")))?;
        let file = self.client_cert_file();
        let cfg = ClientConfig::builder_with_provider(p)
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError::new(&file, e.to_string()))?
            .with_webpki_verifier(verifier)
            .with_client_auth_cert(chain.clone(), key.clone_key())
            .map_err(|e| TlsError::new(&file, format!("certificate and key do not go together: {e}")))?;
        Ok(Some(Arc::new(cfg)))
    }

    fn file_of(&self, name: &str) -> PathBuf {
        self.certs
            .iter()
            .find(|c| c.file.file_name().is_some_and(|f| f == name))
            .map_or_else(|| PathBuf::from(name), |c| c.file.clone())
    }

    fn server_cert_file(&self) -> PathBuf {
        self.file_of(SERVER_CERT)
    }

    fn client_cert_file(&self) -> PathBuf {
        self.file_of(CLIENT_CERT)
    }

    fn crl_or_ca(&self) -> PathBuf {
        let ca = self.file_of(CA_CERT);
        if self.crls.is_empty() { ca } else { ca.with_file_name(CA_CRL) }
    }
}

/// The configurations built from one load of the directory.
struct Loaded {
    nbd: Option<Arc<ServerConfig>>,
    repl_server: Option<Arc<ServerConfig>>,
    repl_client: Option<Arc<ClientConfig>>,
    certs: Vec<CertInfo>,
}

impl Loaded {
    fn build(settings: &TlsSettings) -> Result<Loaded, TlsError> {
        let files = Files::load(settings)?;
        // Without nbd_verify_client a client certificate is not asked for
        // (as nbdkit without --tls-verify-peer).
        let nbd = match settings.nbd {
            NbdTlsMode::Off => None,
            _ => Some(files.server_config(settings.nbd_verify_client)?),
        };
        let (repl_server, repl_client) = match settings.replication {
            ReplTlsMode::Off => (None, None),
            ReplTlsMode::Require => (Some(files.server_config(true)?), files.client_config()?),
        };
        Ok(Loaded { nbd, repl_server, repl_client, certs: files.certs })
    }
}

/// A node's TLS credentials, reloadable. Cheap to share (`Arc`).
pub struct TlsContext {
    settings: TlsSettings,
    current: RwLock<Arc<Loaded>>,
}

impl fmt::Debug for TlsContext {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsContext").field("settings", &self.settings).finish_non_exhaustive()
    }
}

/// What a reload did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReloadReport {
    /// The certificates now in use.
    pub certs: Vec<CertInfo>,
}

impl TlsContext {
    /// Loads and checks every file `settings` needs. The error names the
    /// first file that is missing or unusable.
    pub fn load(settings: TlsSettings) -> Result<TlsContext, TlsError> {
        let loaded = Loaded::build(&settings)?;
        Ok(TlsContext { settings, current: RwLock::new(Arc::new(loaded)) })
    }

    pub fn settings(&self) -> &TlsSettings {
        &self.settings
    }

    fn current(&self) -> Arc<Loaded> {
        Arc::clone(&self.current.read().unwrap_or_else(|e| e.into_inner()))
    }

    /// Reads the files again; on success new handshakes use the new
    /// credentials (established connections keep theirs), on failure the
    /// old ones stay in use and the error names the file.
    pub fn reload(&self) -> Result<ReloadReport, TlsError> {
        let loaded = Arc::new(Loaded::build(&self.settings)?);
        let certs = loaded.certs.clone();
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = loaded;
        Ok(ReloadReport { certs })
    }

    /// The acceptor for an NBD client's STARTTLS (`None` with `nbd = "off"`).
    pub fn nbd_acceptor(&self) -> Option<TlsAcceptor> {
        self.current().nbd.clone().map(TlsAcceptor::from)
    }

    /// The acceptor for a replication peer that dials in.
    pub fn repl_acceptor(&self) -> Option<TlsAcceptor> {
        self.current().repl_server.clone().map(TlsAcceptor::from)
    }

    /// The connector for dialling the replication peer.
    pub fn repl_connector(&self) -> Option<TlsConnector> {
        self.current().repl_client.clone().map(TlsConnector::from)
    }

    /// The certificates in use (CA, server, client), with their files.
    pub fn certificates(&self) -> Vec<CertInfo> {
        self.current().certs.clone()
    }

    /// A warning for each certificate in use that expires within
    /// [`EXPIRY_WARNING`] (or has expired).
    pub fn expiry_warnings(&self, now: SystemTime) -> Vec<String> {
        self.current().certs.iter().filter_map(|c| c.expiry_warning(now)).collect()
    }
}

/// Checks that `cert` (a peer's end-entity certificate, already verified
/// against the CA) names `name` in its subjectAltName: the replication
/// acceptor's check that the peer that dialled in is the configured peer
/// node. (The dialler's check is rustls's own server-name check.)
pub fn check_peer_name(cert: &CertificateDer<'_>, name: &str) -> Result<(), String> {
    let server_name = ServerName::try_from(name).map_err(|e| format!("node name {name:?} is not a DNS name: {e}"))?;
    let ee = webpki::EndEntityCert::try_from(cert).map_err(|e| format!("bad certificate: {e}"))?;
    ee.verify_is_valid_for_subject_name(&server_name).map_err(|_| {
        let subject = CertInfo::from_der(cert).map_or_else(|_| "?".to_string(), |c| c.subject);
        format!("the certificate ({subject}) does not name node {name:?}")
    })
}

/// Whether `name` can be checked against a certificate (a DNS name).
pub fn valid_peer_name(name: &str) -> bool {
    ServerName::try_from(name).is_ok_and(|n| matches!(n, ServerName::DnsName(_)))
}

/// The server name a dialler expects the peer's certificate to carry.
pub fn server_name(name: &str) -> Result<ServerName<'static>, String> {
    ServerName::try_from(name.to_string()).map_err(|e| format!("node name {name:?} is not a DNS name: {e}"))
}

/// What is known of a connection's TLS session, for status.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SessionInfo {
    /// `TLSv1_3`, `TLSv1_2`.
    pub version: String,
    pub cipher: String,
    /// The peer's end-entity certificate, if it presented one.
    pub peer_cert: Option<CertInfo>,
}

impl SessionInfo {
    /// Reads the session of an established connection.
    pub fn of<D: rustls::SideData>(conn: &rustls::ConnectionCommon<D>) -> SessionInfo {
        SessionInfo {
            version: conn.protocol_version().map(|v| format!("{v:?}")).unwrap_or_default(),
            cipher: conn.negotiated_cipher_suite().map(|c| format!("{:?}", c.suite())).unwrap_or_default(),
            peer_cert: conn.peer_certificates().and_then(|c| c.first()).and_then(|c| CertInfo::from_der(c).ok()),
        }
    }
}

/// A short, bounded name for why a TLS handshake failed (for log summaries
/// and tests): `unknown-ca`, `expired`, `wrong-name`, `no-certificate`,
/// `revoked`, `bad-certificate`, `alert`, `not-tls`, `io`.
pub fn failure_kind(e: &std::io::Error) -> &'static str {
    let Some(inner) = e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) else {
        return "io";
    };
    use rustls::{CertificateError as C, Error as E};
    match inner {
        E::InvalidCertificate(c) => match c {
            C::UnknownIssuer => "unknown-ca",
            C::Expired | C::ExpiredContext { .. } => "expired",
            C::NotValidForName | C::NotValidForNameContext { .. } => "wrong-name",
            C::Revoked => "revoked",
            _ => "bad-certificate",
        },
        E::NoCertificatesPresented => "no-certificate",
        E::AlertReceived(_) => "alert",
        E::InvalidMessage(_) | E::InappropriateMessage { .. } | E::InappropriateHandshakeMessage { .. } => "not-tls",
        _ => "tls",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn required_files_follow_the_modes() {
        let mut s = TlsSettings {
            dir: "/x".into(),
            nbd: NbdTlsMode::Off,
            replication: ReplTlsMode::Off,
            nbd_verify_client: false,
        };
        assert!(s.required_files().is_empty());
        s.nbd = NbdTlsMode::On;
        assert_eq!(s.required_files(), [CA_CERT, SERVER_CERT, SERVER_KEY]);
        s.replication = ReplTlsMode::Require;
        assert_eq!(s.required_files(), [CA_CERT, SERVER_CERT, SERVER_KEY, CLIENT_CERT, CLIENT_KEY]);
    }

    #[test]
    fn missing_and_garbage_files_are_named() {
        let dir = tempfile::tempdir().expect("tempdir");
        let s = TlsSettings {
            dir: dir.path().to_path_buf(),
            nbd: NbdTlsMode::Require,
            replication: ReplTlsMode::Off,
            nbd_verify_client: false,
        };
        let e = TlsContext::load(s.clone()).expect_err("empty dir");
        assert_eq!(e.file, dir.path().join(CA_CERT));
        assert!(e.to_string().ends_with("ca-cert.pem: missing"), "{e}");
        std::fs::write(dir.path().join(CA_CERT), "not a certificate\n").expect("write");
        let e = TlsContext::load(s.clone()).expect_err("garbage CA");
        assert_eq!(e.file, dir.path().join(CA_CERT));
        assert!(e.message.contains("no PEM certificate"), "{e}");
        let e = TlsContext::load(TlsSettings { dir: dir.path().join("nope"), ..s }).expect_err("no dir");
        assert!(e.message.contains("not a directory"), "{e}");
    }

    #[test]
    fn peer_names_must_be_dns_names() {
        assert!(valid_peer_name("alpha"));
        assert!(valid_peer_name("node-1.example"));
        assert!(!valid_peer_name("node_1 x"));
        assert!(!valid_peer_name("127.0.0.1"), "an IP address is not a node name");
    }

    #[test]
    fn expiry_warnings() {
        let now = UNIX_EPOCH + Duration::from_secs(1_000_000_000);
        let mut c = CertInfo { file: "/p/server-cert.pem".into(), subject: "CN=a".into(), not_after: 1_000_000_000 };
        c.not_after += 31 * 86400;
        assert_eq!(c.expiry_warning(now), None);
        c.not_after -= 2 * 86400;
        assert_eq!(c.expiry_warning(now).as_deref(), Some("/p/server-cert.pem (CN=a) expires in 29 days"));
        c.not_after = 1_000_000_000 - 3 * 86400;
        assert_eq!(c.expiry_warning(now).as_deref(), Some("/p/server-cert.pem (CN=a) expired 3 days ago"));
    }
}
