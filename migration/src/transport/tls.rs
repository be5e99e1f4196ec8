//! TLS for migration channels (and the QMP monitor): QEMU's `tls-creds-x509` objects and a
//! two-way TLS 1.3 stream over a connected socket (rustls with the `ring` provider).
//!
//! # Credentials
//!
//! [`TlsCredsX509`] is QEMU's `tls-creds-x509` object: a directory holding `ca-cert.pem` and,
//! for `endpoint=server` (the destination), `server-cert.pem` and `server-key.pem`; for
//! `endpoint=client` (the source), optionally `client-cert.pem` and `client-key.pem`. The files
//! are read and checked when the object is created, as QEMU does. `verify-peer=on` (the
//! default) makes a server demand a client certificate signed by the CA, and a client check
//! the server's certificate against the CA and the host name; `off` skips those checks.
//!
//! # The stream
//!
//! rustls (its unbuffered API) runs the handshake; then hopvm takes the traffic keys over
//! (rustls' "kernel connection", the API meant for kernel TLS offload, which keeps deriving
//! the next keys at a KeyUpdate) and seals and opens the TLS 1.3 records itself
//! ([`record`], ring's AEADs) in its own buffers: the writer copies the pages once, straight
//! into full 16 KiB records, and seals them there; the reader opens each record where the
//! socket read put it and copies the plaintext out once. (Through rustls' buffered API each
//! side made two more copies of every byte.) The wire is standard TLS 1.3, checked against
//! rustls' own record layer in the tests.
//!
//! A migration channel carries the stream one way and the return path the other, read by
//! another thread ([`crate::return_path`]) while the migration thread writes. [`TlsChannel`]
//! keeps the two directions apart:
//!
//! - `tx` (the sending keys and the buffer records are sealed in) is held by whoever writes,
//!   from sealing to the end of the socket write, so records go out in the order they were
//!   sealed;
//! - `rx` (the receiving keys and the buffer the socket reads fill) is held by the one reader
//!   across its socket read;
//! - `kernel` (what is left of rustls) is held only to derive the next keys.
//!
//! Lock order: `rx` → `tx` → `kernel` → `failure` (see docs/architecture.md); the reader only
//! ever *tries* `tx` (to send an alert), and a writer only tries `rx`. None of them is taken
//! with a VMM lock held. A peer's KeyUpdate that asks for one back is answered by the writer
//! before its next record (or at a flush).
//!
//! Writes are batched: the migration thread hands over up to megabytes at once (its
//! `BufferedOutput`), which are sealed into full 16 KiB records and written with one
//! `write` per megabyte of records.

use std::fmt;
use std::fs::File;
use std::io::{self, IoSlice, Read, Write};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::{ClientConnectionData, UnbufferedClientConnection};
use rustls::crypto::CryptoProvider;
use rustls::kernel::KernelConnection;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::{ServerConnectionData, UnbufferedServerConnection, WebPkiClientVerifier};
use rustls::unbuffered::{ConnectionState, EncodeError, InsufficientSizeError, UnbufferedStatus};
use rustls::{
    AlertDescription, ClientConfig, DigitallySignedStruct, ExtractedSecrets, RootCertStore,
    ServerConfig, SupportedCipherSuite,
};
use vmm_sync::lock;

pub mod authz;
pub mod dn;
mod record;

use authz::{AuthzError, AuthzObject};

use record::{
    alert_content, key_update_content, Alert, Keys, PostHandshake, RecordError, ALERT,
    APPLICATION_DATA, HANDSHAKE, HEADER_LEN, MAX_PLAIN, MAX_RECORD, OVERHEAD,
};

/// How long a TLS handshake may take before the peer is given up on (a peer that connects and
/// says nothing must not hold the destination's accept loop forever).
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// How often a handshake in progress looks at its cancel.
pub const CANCEL_POLL: Duration = Duration::from_millis(100);

/// Plaintext sealed into records before they are written out: large batches, few system
/// calls.
const SEND_BATCH: usize = 1 << 20;

/// The receive buffer: socket reads of up to this much, records opened in place in it.
const RECV_BUF: usize = 1 << 20;

/// Reads of at least this much get the socket's bytes straight into the reader's buffer.
const DIRECT_READ: usize = 128 << 10;

/// The most handshake data kept while a message is incomplete.
const MAX_HANDSHAKE_BUF: usize = 1 << 20;

/// Errors of TLS credentials and TLS channels.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// An `-object tls-creds-x509,…` that cannot be parsed.
    #[error("tls-creds-x509: {0}")]
    BadOption(String),
    /// A credentials file cannot be read (QEMU's wording).
    #[error("Unable to access credentials {path}: {source}")]
    File {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// A credentials file does not hold what it should.
    #[error("Unable to load credentials {path}: {reason}")]
    Pem {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The credentials cannot make a TLS configuration (a key that does not match the
    /// certificate, a CA that is not a certificate authority…).
    #[error("Unable to use the TLS credentials in {dir}: {source}")]
    Config {
        /// The credentials directory.
        dir: PathBuf,
        /// Why.
        #[source]
        source: rustls::Error,
    },
    /// The client certificate verifier cannot be built from the CA.
    #[error("Unable to use the CA certificate in {dir}: {reason}")]
    Verifier {
        /// The credentials directory.
        dir: PathBuf,
        /// Why.
        reason: String,
    },
    /// The object has the other endpoint (QEMU's wording).
    #[error("Expecting TLS credentials with a {0} endpoint")]
    WrongEndpoint(Endpoint),
    /// `tls-creds` names no object (QEMU's wording).
    #[error("No TLS credentials with id '{0}'")]
    NoCreds(String),
    /// No host name to check the destination's certificate against.
    #[error("No hostname available for TLS")]
    NoHostname,
    /// The host name is not a valid DNS name or IP address.
    #[error("invalid TLS hostname {0:?}")]
    BadHostname(String),
    /// The handshake failed: the peer's certificate, a plaintext peer, a timeout…
    #[error("TLS handshake failed: {0}")]
    Handshake(#[source] io::Error),
    /// The handshake was interrupted (`migrate_cancel`).
    #[error("connection cancelled")]
    Cancelled,
    /// The socket's timeouts could not be set.
    #[error("cannot set the socket timeout: {0}")]
    Timeout(#[source] io::Error),
    /// An authorization object (`-object authz-…`, `object-add`) that cannot be created.
    #[error("{0}")]
    Authz(#[source] AuthzError),
    /// An object of a type hopvm does not have.
    #[error("invalid object type: {0} (hopvm has tls-creds-x509, authz-simple, authz-list and authz-list-file)")]
    ObjectType(String),
    /// `tls-authz` names no object (QEMU's wording).
    #[error("Cannot find QAuthZ object ID {0}")]
    NoAuthz(String),
    /// `tls-authz` names an object that is not an authorization object (QEMU's wording).
    #[error("Object '{0}' is not a QAuthZ subclass")]
    NotAuthz(String),
    /// The client presented no certificate to check (QEMU's wording).
    #[error("No certificate peers")]
    NoPeerCertificate,
    /// The client certificate's subject cannot be read (QEMU's wording).
    #[error("Cannot get client distinguished name: {0}")]
    PeerName(#[source] dn::DnError),
    /// The authorization object denies the client (QEMU's wording).
    #[error("TLS x509 authz check for {0} is denied")]
    AuthzDenied(String),
    /// The authorization object could not decide (an `authz-list-file` that cannot be read).
    #[error("TLS x509 authz check for {identity} failed: {source}")]
    AuthzFailed {
        /// The client's distinguished name.
        identity: String,
        /// Why.
        #[source]
        source: AuthzError,
    },
}

/// Which side of a TLS session a credentials object is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    /// The side that accepts: the migration destination, a monitor.
    Server,
    /// The side that connects: the migration source.
    Client,
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Endpoint::Server => "server",
            Endpoint::Client => "client",
        })
    }
}

/// The crypto provider: ring, TLS 1.3 suites only, AES-128-GCM first (the cheapest with
/// AES-NI). rustls marks ring's provider deprecated because it lacks post-quantum key
/// exchange; aws-lc-rs has it but needs cmake and builds for minutes on this project's
/// 2-core machines, so ring it is (X25519 key exchange).
#[allow(deprecated)]
fn provider() -> Arc<CryptoProvider> {
    use rustls::crypto::ring::{cipher_suite, default_provider};
    Arc::new(CryptoProvider {
        cipher_suites: vec![
            cipher_suite::TLS13_AES_128_GCM_SHA256,
            cipher_suite::TLS13_AES_256_GCM_SHA384,
            cipher_suite::TLS13_CHACHA20_POLY1305_SHA256,
        ],
        ..default_provider()
    })
}

/// QEMU's `tls-creds-x509` object, loaded.
#[derive(Clone)]
pub struct TlsCredsX509 {
    id: String,
    dir: PathBuf,
    endpoint: Endpoint,
    verify_peer: bool,
    server: Option<Arc<ServerConfig>>,
    client: Option<Arc<ClientConfig>>,
}

impl fmt::Debug for TlsCredsX509 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsCredsX509")
            .field("id", &self.id)
            .field("dir", &self.dir)
            .field("endpoint", &self.endpoint)
            .field("verify_peer", &self.verify_peer)
            .finish()
    }
}

fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let data = std::fs::read(path).map_err(|source| TlsError::File {
        path: path.to_owned(),
        source,
    })?;
    let certs = CertificateDer::pem_slice_iter(&data)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Pem {
            path: path.to_owned(),
            reason: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(TlsError::Pem {
            path: path.to_owned(),
            reason: String::from("no PEM certificate in it"),
        });
    }
    Ok(certs)
}

fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let data = std::fs::read(path).map_err(|source| TlsError::File {
        path: path.to_owned(),
        source,
    })?;
    PrivateKeyDer::from_pem_slice(&data).map_err(|e| TlsError::Pem {
        path: path.to_owned(),
        reason: e.to_string(),
    })
}

/// Parses QEMU's on/off booleans.
fn on_off(key: &str, v: &str) -> Result<bool, TlsError> {
    match v {
        "on" | "yes" | "true" | "y" => Ok(true),
        "off" | "no" | "false" | "n" => Ok(false),
        _ => Err(TlsError::BadOption(format!(
            "Parameter '{key}' expects 'on' or 'off'"
        ))),
    }
}

impl TlsCredsX509 {
    /// Parses `tls-creds-x509,id=ID,dir=DIR,endpoint=server|client[,verify-peer=on|off]`
    /// (the value of `--object` / `-object`) and loads the credentials.
    pub fn parse_object(spec: &str) -> Result<Self, TlsError> {
        let mut parts = spec.split(',');
        let ty = parts.next().unwrap_or("");
        let ty = ty.strip_prefix("qom-type=").unwrap_or(ty);
        if ty != "tls-creds-x509" {
            return Err(TlsError::BadOption(format!(
                "unsupported object type '{ty}' (hopvm knows tls-creds-x509)"
            )));
        }
        let mut props = Vec::new();
        for p in parts {
            let (k, v) = p
                .split_once('=')
                .ok_or_else(|| TlsError::BadOption(format!("'{p}' is not KEY=VALUE")))?;
            props.push((k, v));
        }
        Self::from_props(props)
    }

    /// Builds the object from its properties (`id`, `dir`, `endpoint`, `verify-peer`), as
    /// given on a command line or by QMP `object-add`.
    pub fn from_props<'a>(
        props: impl IntoIterator<Item = (&'a str, &'a str)>,
    ) -> Result<Self, TlsError> {
        let (mut id, mut dir, mut endpoint, mut verify_peer) = (None, None, None, true);
        for (k, v) in props {
            match k {
                "id" => id = Some(v.to_owned()),
                "dir" => dir = Some(PathBuf::from(v)),
                "endpoint" => {
                    endpoint = Some(match v {
                        "server" => Endpoint::Server,
                        "client" => Endpoint::Client,
                        _ => {
                            return Err(TlsError::BadOption(format!(
                                "Parameter 'endpoint' does not accept value '{v}'"
                            )))
                        }
                    })
                }
                "verify-peer" => verify_peer = on_off(k, v)?,
                "priority" | "sanity-check" => {}
                _ => {
                    return Err(TlsError::BadOption(format!(
                        "Property '{k}' not found (hopvm knows id, dir, endpoint, verify-peer)"
                    )))
                }
            }
        }
        let id =
            id.ok_or_else(|| TlsError::BadOption(String::from("Parameter 'id' is missing")))?;
        let dir =
            dir.ok_or_else(|| TlsError::BadOption(String::from("Parameter 'dir' is missing")))?;
        Self::load(&id, &dir, endpoint.unwrap_or(Endpoint::Client), verify_peer)
    }

    /// Loads the credentials in `dir` for `endpoint` (QEMU's default endpoint is client).
    pub fn load(
        id: &str,
        dir: &Path,
        endpoint: Endpoint,
        verify_peer: bool,
    ) -> Result<Self, TlsError> {
        let ca = read_certs(&dir.join("ca-cert.pem"))?;
        let mut roots = RootCertStore::empty();
        for c in ca {
            roots.add(c).map_err(|source| TlsError::Config {
                dir: dir.to_owned(),
                source,
            })?;
        }
        let roots = Arc::new(roots);
        let config_err = |source| TlsError::Config {
            dir: dir.to_owned(),
            source,
        };
        let (mut server, mut client) = (None, None);
        match endpoint {
            Endpoint::Server => {
                let chain = read_certs(&dir.join("server-cert.pem"))?;
                let key = read_key(&dir.join("server-key.pem"))?;
                let builder = ServerConfig::builder_with_provider(provider())
                    .with_protocol_versions(&[&rustls::version::TLS13])
                    .map_err(config_err)?;
                let builder = if verify_peer {
                    let verifier =
                        WebPkiClientVerifier::builder_with_provider(roots.clone(), provider())
                            .build()
                            .map_err(|e| TlsError::Verifier {
                                dir: dir.to_owned(),
                                reason: e.to_string(),
                            })?;
                    builder.with_client_cert_verifier(verifier)
                } else {
                    builder.with_no_client_auth()
                };
                let mut config = builder.with_single_cert(chain, key).map_err(config_err)?;
                // One session per channel: no tickets to send, no cache to keep.
                config.send_tls13_tickets = 0;
                // This side's preference (AES-128-GCM first: the least work per byte) over
                // the client's (gnutls, QEMU's, puts AES-256 first).
                config.ignore_client_order = true;
                // The keys go to hopvm's record layer after the handshake.
                config.enable_secret_extraction = true;
                server = Some(Arc::new(config));
            }
            Endpoint::Client => {
                let builder = ClientConfig::builder_with_provider(provider())
                    .with_protocol_versions(&[&rustls::version::TLS13])
                    .map_err(config_err)?
                    .with_root_certificates(roots);
                let cert = dir.join("client-cert.pem");
                let mut config = if cert.exists() {
                    let chain = read_certs(&cert)?;
                    let key = read_key(&dir.join("client-key.pem"))?;
                    builder
                        .with_client_auth_cert(chain, key)
                        .map_err(config_err)?
                } else {
                    builder.with_no_client_auth()
                };
                config.resumption = rustls::client::Resumption::disabled();
                config.enable_secret_extraction = true;
                if !verify_peer {
                    config
                        .dangerous()
                        .set_certificate_verifier(Arc::new(NoServerVerification(provider())));
                }
                client = Some(Arc::new(config));
            }
        }
        Ok(Self {
            id: id.to_owned(),
            dir: dir.to_owned(),
            endpoint,
            verify_peer,
            server,
            client,
        })
    }

    /// The object's id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Its credentials directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Its endpoint.
    pub fn endpoint(&self) -> Endpoint {
        self.endpoint
    }

    /// Whether it verifies the peer.
    pub fn verify_peer(&self) -> bool {
        self.verify_peer
    }

    /// The server side of a session (the destination's channels, a TLS monitor), or QEMU's
    /// error for a client object.
    pub fn server(&self) -> Result<ServerTls, TlsError> {
        self.server
            .clone()
            .map(|config| ServerTls {
                config,
                authz: None,
            })
            .ok_or(TlsError::WrongEndpoint(Endpoint::Server))
    }

    /// The client side of a session to `hostname` (the source's channels), or QEMU's error
    /// for a server object. The destination's certificate must name `hostname` when
    /// `verify-peer` is on.
    pub fn client(&self, hostname: Option<&str>) -> Result<ClientTls, TlsError> {
        let config = self
            .client
            .clone()
            .ok_or(TlsError::WrongEndpoint(Endpoint::Client))?;
        let host = match hostname {
            Some(h) if !h.is_empty() => h,
            _ => return Err(TlsError::NoHostname),
        };
        let host = host.trim_start_matches('[').trim_end_matches(']');
        let name = ServerName::try_from(host.to_owned())
            .map_err(|_| TlsError::BadHostname(host.to_owned()))?;
        Ok(ClientTls { config, name })
    }
}

/// An object of the table: TLS credentials or an authorization object (one namespace of ids,
/// as QEMU's `/objects`).
#[derive(Debug, Clone)]
pub enum TlsObject {
    /// `tls-creds-x509`.
    Creds(Arc<TlsCredsX509>),
    /// `authz-simple`, `authz-list`, `authz-list-file`.
    Authz(Arc<AuthzObject>),
}

impl From<TlsCredsX509> for TlsObject {
    fn from(c: TlsCredsX509) -> Self {
        Self::Creds(Arc::new(c))
    }
}

impl From<AuthzObject> for TlsObject {
    fn from(a: AuthzObject) -> Self {
        Self::Authz(Arc::new(a))
    }
}

impl TlsObject {
    /// The object's id.
    pub fn id(&self) -> &str {
        match self {
            Self::Creds(c) => c.id(),
            Self::Authz(a) => a.id(),
        }
    }

    /// Creates an object from a command line's `key=value` items (`qom-type` and `id` among
    /// them; the caller has split the `-object` value, QEMU's `,,` escapes undone).
    pub fn from_keyval<'a>(
        items: impl IntoIterator<Item = (&'a str, &'a str)> + Clone,
    ) -> Result<Self, TlsError> {
        let ty = items
            .clone()
            .into_iter()
            .find(|(k, _)| *k == "qom-type")
            .map(|(_, v)| v)
            .unwrap_or("");
        if ty == "tls-creds-x509" {
            return TlsCredsX509::from_props(items.into_iter().filter(|(k, _)| *k != "qom-type"))
                .map(Self::from);
        }
        if !authz::is_authz_type(ty) {
            return Err(TlsError::ObjectType(ty.to_owned()));
        }
        AuthzObject::from_keyval(items)
            .map(Self::from)
            .map_err(TlsError::Authz)
    }

    /// Creates an authorization object from QMP `object-add`'s arguments or a JSON `-object`
    /// (`tls-creds-x509` from JSON is QMP's own business: its properties are typed there).
    pub fn authz_from_json(
        args: &serde_json::Map<String, serde_json::Value>,
    ) -> Result<Self, TlsError> {
        AuthzObject::from_json(args)
            .map(Self::from)
            .map_err(TlsError::Authz)
    }
}

/// The VM's `tls-creds-x509` and authorization objects and the migration's `tls-creds` /
/// `tls-hostname` / `tls-authz` parameters (QEMU's `migrate-set-parameters`), under one leaf
/// lock. The table is shared with the [`ServerTls`] it makes, which look `tls-authz` up in
/// it at each check, as QEMU does.
#[derive(Debug, Default)]
pub struct MigrationTls {
    inner: Arc<Mutex<TlsState>>,
}

#[derive(Debug, Default)]
struct TlsState {
    creds: String,
    hostname: String,
    authz: String,
    objects: std::collections::BTreeMap<String, TlsObject>,
}

/// Errors of the object table.
#[derive(Debug, thiserror::Error)]
pub enum TlsObjectError {
    /// `object-add` with an id in use (QEMU's wording).
    #[error("attempt to add duplicate property '{0}' to object (type 'container')")]
    Duplicate(String),
    /// `object-del` of an unknown id (QEMU's wording).
    #[error("object '{0}' not found")]
    NotFound(String),
    /// `object-del` of the object a migration parameter names.
    #[error("object '{0}' is in use by the migration parameter {1}")]
    InUse(String, &'static str),
}

/// `tls-authz` on a server session: the object's id, looked up in the table at each check.
#[derive(Clone)]
struct AuthzRef {
    id: String,
    table: Arc<Mutex<TlsState>>,
}

impl AuthzRef {
    /// Checks the client's end-entity certificate (QEMU's
    /// `qcrypto_tls_session_check_certificate`, its authz part).
    fn check(&self, peer: Option<&CertificateDer<'_>>) -> Result<(), TlsError> {
        let object = lock(&self.table).objects.get(&self.id).cloned();
        let authz = match object {
            None => return Err(TlsError::NoAuthz(self.id.clone())),
            Some(TlsObject::Creds(_)) => return Err(TlsError::NotAuthz(self.id.clone())),
            Some(TlsObject::Authz(a)) => a,
        };
        let cert = peer.ok_or(TlsError::NoPeerCertificate)?;
        let identity = dn::distinguished_name(cert).map_err(TlsError::PeerName)?;
        // Outside the table's lock: an authz-list-file reads its file.
        match authz.is_allowed(&identity) {
            Ok(true) => Ok(()),
            Ok(false) => Err(TlsError::AuthzDenied(identity)),
            Err(source) => Err(TlsError::AuthzFailed { identity, source }),
        }
    }
}

impl MigrationTls {
    /// Adds a credentials or authorization object (`--object`, `-object`, QMP `object-add`).
    pub fn add_object(&self, object: impl Into<TlsObject>) -> Result<(), TlsObjectError> {
        let object = object.into();
        let mut s = lock(&self.inner);
        if s.objects.contains_key(object.id()) {
            return Err(TlsObjectError::Duplicate(object.id().to_owned()));
        }
        s.objects.insert(object.id().to_owned(), object);
        Ok(())
    }

    /// Removes one (QMP `object-del`); not one that `tls-creds` or `tls-authz` names.
    pub fn remove_object(&self, id: &str) -> Result<(), TlsObjectError> {
        let mut s = lock(&self.inner);
        if !s.objects.contains_key(id) {
            return Err(TlsObjectError::NotFound(id.to_owned()));
        }
        if s.creds == id {
            return Err(TlsObjectError::InUse(id.to_owned(), "tls-creds"));
        }
        if s.authz == id {
            return Err(TlsObjectError::InUse(id.to_owned(), "tls-authz"));
        }
        s.objects.remove(id);
        Ok(())
    }

    /// The credentials object with this id.
    pub fn object(&self, id: &str) -> Option<Arc<TlsCredsX509>> {
        match lock(&self.inner).objects.get(id) {
            Some(TlsObject::Creds(c)) => Some(c.clone()),
            _ => None,
        }
    }

    /// The authorization object with this id.
    pub fn authz_object(&self, id: &str) -> Option<Arc<AuthzObject>> {
        match lock(&self.inner).objects.get(id) {
            Some(TlsObject::Authz(a)) => Some(a.clone()),
            _ => None,
        }
    }

    /// `tls-creds` ("" = no TLS).
    pub fn creds(&self) -> String {
        lock(&self.inner).creds.clone()
    }

    /// `tls-hostname` ("" = the host of the migration URI).
    pub fn hostname(&self) -> String {
        lock(&self.inner).hostname.clone()
    }

    /// `tls-authz` ("" = any client the CA signed).
    pub fn authz(&self) -> String {
        lock(&self.inner).authz.clone()
    }

    /// Sets `tls-creds`; checked when a channel opens, as in QEMU.
    pub fn set_creds(&self, id: &str) {
        lock(&self.inner).creds = id.to_owned();
    }

    /// Sets `tls-hostname`.
    pub fn set_hostname(&self, name: &str) {
        lock(&self.inner).hostname = name.to_owned();
    }

    /// Sets `tls-authz`; looked up when a source's certificate is checked, as in QEMU.
    pub fn set_authz(&self, id: &str) {
        lock(&self.inner).authz = id.to_owned();
    }

    fn named(&self) -> Result<Option<Arc<TlsCredsX509>>, TlsError> {
        let s = lock(&self.inner);
        if s.creds.is_empty() {
            return Ok(None);
        }
        match s.objects.get(&s.creds) {
            Some(TlsObject::Creds(c)) => Ok(Some(c.clone())),
            _ => Err(TlsError::NoCreds(s.creds.clone())),
        }
    }

    /// The source's TLS for a channel to `uri_host`, or `None` without `tls-creds`.
    /// `tls-hostname` overrides the URI's host for the certificate check.
    pub fn client(&self, uri_host: Option<&str>) -> Result<Option<ClientTls>, TlsError> {
        let Some(creds) = self.named()? else {
            return Ok(None);
        };
        let hostname = self.hostname();
        let host = if hostname.is_empty() {
            uri_host
        } else {
            Some(hostname.as_str())
        };
        creds.client(host).map(Some)
    }

    /// The destination's TLS, or `None` without `tls-creds`; with `tls-authz`, each client's
    /// certificate is checked against that object after the handshake.
    pub fn server(&self) -> Result<Option<ServerTls>, TlsError> {
        match self.named()? {
            None => Ok(None),
            Some(creds) => {
                let authz = self.authz();
                self.with_authz(&creds, Some(authz.as_str())).map(Some)
            }
        }
    }

    /// A server session of credentials `creds_id` whose clients `authz_id` (when given)
    /// must allow: the TLS QMP monitor's `tls-creds` / `tls-authz`.
    pub fn server_for(
        &self,
        creds_id: &str,
        authz_id: Option<&str>,
    ) -> Result<ServerTls, TlsError> {
        let creds = self
            .object(creds_id)
            .ok_or_else(|| TlsError::NoCreds(creds_id.to_owned()))?;
        self.with_authz(&creds, authz_id)
    }

    fn with_authz(
        &self,
        creds: &TlsCredsX509,
        authz_id: Option<&str>,
    ) -> Result<ServerTls, TlsError> {
        let mut server = creds.server()?;
        let Some(id) = authz_id.filter(|id| !id.is_empty()) else {
            return Ok(server);
        };
        if !creds.verify_peer() {
            // As QEMU: without verify-peer no client certificate is asked for or checked,
            // so there is no identity to authorize.
            eprintln!(
                "hopvm: warning: tls-authz '{id}' is not checked: TLS credentials '{}' have \
                 verify-peer=off (no client certificate, as in QEMU)",
                creds.id()
            );
            return Ok(server);
        }
        server.authz = Some(AuthzRef {
            id: id.to_owned(),
            table: self.inner.clone(),
        });
        Ok(server)
    }
}

/// `verify-peer=off` on a client: the server's certificate is not checked (the session is
/// still encrypted; its signature over the handshake is still verified).
#[derive(Debug)]
struct NoServerVerification(Arc<CryptoProvider>);

impl ServerCertVerifier for NoServerVerification {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// The client (source) side of TLS sessions: the configuration and the destination's name.
#[derive(Clone)]
pub struct ClientTls {
    config: Arc<ClientConfig>,
    name: ServerName<'static>,
}

impl fmt::Debug for ClientTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientTls")
            .field("name", &self.name)
            .finish()
    }
}

impl ClientTls {
    /// Runs the handshake on a connected socket and returns the channel.
    pub fn connect(&self, sock: OwnedFd) -> Result<Arc<TlsChannel>, TlsError> {
        self.connect_cancellable(sock, &|| false)
    }

    /// [`connect`](Self::connect) that gives up with [`TlsError::Cancelled`] within
    /// [`CANCEL_POLL`] of `cancelled` turning true (`migrate_cancel` while the destination
    /// does not answer).
    pub fn connect_cancellable(
        &self,
        sock: OwnedFd,
        cancelled: &dyn Fn() -> bool,
    ) -> Result<Arc<TlsChannel>, TlsError> {
        let conn = UnbufferedClientConnection::new(self.config.clone(), self.name.clone())
            .map_err(|e| TlsError::Handshake(io::Error::other(e)))?;
        TlsChannel::handshake(sock, conn, cancelled).map(|(channel, _)| channel)
    }
}

/// The server (destination) side of TLS sessions.
#[derive(Clone)]
pub struct ServerTls {
    config: Arc<ServerConfig>,
    /// `tls-authz`: the object that must allow each client's certificate.
    authz: Option<AuthzRef>,
}

impl fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServerTls")
            .field("authz", &self.authz.as_ref().map(|a| &a.id))
            .finish()
    }
}

impl ServerTls {
    /// Runs the handshake on an accepted socket (verifying the client's certificate when the
    /// credentials say so) and returns the channel. With `tls-authz`, the certificate's
    /// distinguished name must then be allowed by that object: a client it refuses gets a
    /// fatal `access_denied` alert (`internal_error` when the object cannot decide) and
    /// the connection is closed.
    pub fn accept(&self, sock: OwnedFd) -> Result<Arc<TlsChannel>, TlsError> {
        let conn = UnbufferedServerConnection::new(self.config.clone())
            .map_err(|e| TlsError::Handshake(io::Error::other(e)))?;
        let (channel, peer) = TlsChannel::handshake(sock, conn, &|| false)?;
        if let Some(authz) = &self.authz {
            if let Err(e) = authz.check(peer.as_ref()) {
                let alert = match e {
                    TlsError::AuthzDenied(_) => AlertDescription::AccessDenied,
                    _ => AlertDescription::InternalError,
                };
                channel.refuse(alert);
                return Err(e);
            }
        }
        Ok(channel)
    }
}

/// A rustls connection driven through its unbuffered API for the handshake, then turned into
/// its "kernel connection" (which only derives new keys) for hopvm's record layer.
trait Handshake {
    type Data;
    fn process<'c, 'i>(
        &'c mut self,
        incoming: &'i mut [u8],
    ) -> UnbufferedStatus<'c, 'i, Self::Data>;
    fn handshaking(&self) -> bool;
    /// The peer's end-entity certificate, once the handshake verified it.
    fn peer_certificate(&self) -> Option<CertificateDer<'static>>;
    fn into_kernel(self) -> Result<(ExtractedSecrets, Kernel), rustls::Error>;
}

impl Handshake for UnbufferedClientConnection {
    type Data = ClientConnectionData;
    fn process<'c, 'i>(
        &'c mut self,
        incoming: &'i mut [u8],
    ) -> UnbufferedStatus<'c, 'i, ClientConnectionData> {
        self.process_tls_records(incoming)
    }
    fn handshaking(&self) -> bool {
        self.is_handshaking()
    }
    fn peer_certificate(&self) -> Option<CertificateDer<'static>> {
        self.peer_certificates()?.first().cloned()
    }
    fn into_kernel(self) -> Result<(ExtractedSecrets, Kernel), rustls::Error> {
        let (secrets, k) = self.dangerous_into_kernel_connection()?;
        Ok((secrets, Kernel::Client(k)))
    }
}

impl Handshake for UnbufferedServerConnection {
    type Data = ServerConnectionData;
    fn process<'c, 'i>(
        &'c mut self,
        incoming: &'i mut [u8],
    ) -> UnbufferedStatus<'c, 'i, ServerConnectionData> {
        self.process_tls_records(incoming)
    }
    fn handshaking(&self) -> bool {
        self.is_handshaking()
    }
    fn peer_certificate(&self) -> Option<CertificateDer<'static>> {
        self.peer_certificates()?.first().cloned()
    }
    fn into_kernel(self) -> Result<(ExtractedSecrets, Kernel), rustls::Error> {
        let (secrets, k) = self.dangerous_into_kernel_connection()?;
        Ok((secrets, Kernel::Server(k)))
    }
}

/// What is left of rustls after the handshake: it derives the next traffic keys.
enum Kernel {
    Client(KernelConnection<ClientConnectionData>),
    Server(KernelConnection<ServerConnectionData>),
}

impl Kernel {
    /// The next keys for sending (`tx`) or receiving.
    fn next_keys(&mut self, tx: bool) -> Result<Keys, RecordError> {
        let r = match (self, tx) {
            (Kernel::Client(k), true) => k.update_tx_secret(),
            (Kernel::Client(k), false) => k.update_rx_secret(),
            (Kernel::Server(k), true) => k.update_tx_secret(),
            (Kernel::Server(k), false) => k.update_rx_secret(),
        };
        let (seq, secrets) = r.map_err(RecordError::KeyUpdate)?;
        Keys::new(seq, secrets)
    }

    fn suite(&self) -> SupportedCipherSuite {
        match self {
            Kernel::Client(k) => k.negotiated_cipher_suite(),
            Kernel::Server(k) => k.negotiated_cipher_suite(),
        }
    }
}

/// What one pass of the handshake loop does next.
enum Step {
    Continue,
    Read,
    Traffic,
    Failed(rustls::Error),
    Closed,
}

/// The sending side: the keys, the buffer records are sealed in, and the records left before
/// the keys must change.
struct Tx {
    keys: Keys,
    buf: Vec<u8>,
    /// Sequence number at which the keys are changed (a KeyUpdate; new keys start again at
    /// 0): below the cipher suite's confidentiality limit.
    update_at: u64,
    /// close_notify or a fatal alert went out: nothing more may be sent.
    closed: bool,
}

/// The receiving side: the keys and the buffer the socket reads fill, where records are opened
/// in place.
struct Rx {
    keys: Keys,
    buf: Box<[u8]>,
    /// Ciphertext not yet opened: `buf[start..end]`.
    start: usize,
    end: usize,
    /// Plaintext of the last record opened, not yet read: `buf[plain_start..plain_end]`.
    plain_start: usize,
    plain_end: usize,
    /// Application data rustls opened during the handshake (a source that writes at once).
    early: Vec<u8>,
    early_pos: usize,
    /// A post-handshake message arriving across records.
    hs: Vec<u8>,
    /// The socket's end of file.
    eof: bool,
    /// The peer's close_notify arrived: its stream ended.
    closed: bool,
    /// The session failed on this side's reading: every later read says why.
    error: Option<String>,
}

impl Rx {
    /// Copies out plaintext already opened.
    fn take_plain(&mut self, out: &mut [u8]) -> usize {
        let mut n = 0;
        if self.early_pos < self.early.len() {
            let k = (self.early.len() - self.early_pos).min(out.len());
            out[..k].copy_from_slice(&self.early[self.early_pos..self.early_pos + k]);
            self.early_pos += k;
            n = k;
        }
        let k = (self.plain_end - self.plain_start).min(out.len() - n);
        out[n..n + k].copy_from_slice(&self.buf[self.plain_start..self.plain_start + k]);
        self.plain_start += k;
        n + k
    }
}

/// The session's failure, once there is one: kept so a writer that hits a dead socket can
/// say why the peer hung up (its alert, read by the return-path thread).
#[derive(Default)]
struct Failure {
    reason: Option<String>,
    /// The reader met an error or the end of the stream.
    reader_done: bool,
}

/// A TLS 1.3 session over a connected socket, shared by a writer and a reader thread (see
/// the module documentation for its locks).
pub struct TlsChannel {
    sock: File,
    suite: rustls::CipherSuite,
    kernel: Mutex<Kernel>,
    tx: Mutex<Tx>,
    rx: Mutex<Rx>,
    /// The peer asked for a KeyUpdate (set by the reader): this side sends its own before its
    /// next data.
    key_update_owed: AtomicBool,
    failure: Mutex<Failure>,
    failed: Condvar,
}

impl fmt::Debug for TlsChannel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsChannel")
            .field("fd", &self.sock.as_raw_fd())
            .field("suite", &self.suite)
            .finish()
    }
}

/// Why a receive failed: the socket, or a record.
enum RecvError {
    Io(io::Error),
    Record(RecordError),
}

impl From<RecordError> for RecvError {
    fn from(e: RecordError) -> Self {
        Self::Record(e)
    }
}

fn record_io_error(e: RecordError) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e)
}

fn set_timeouts(sock: &File, t: Option<Duration>) -> Result<(), TlsError> {
    let s = socket2::SockRef::from(sock);
    s.set_read_timeout(t).map_err(TlsError::Timeout)?;
    s.set_write_timeout(t).map_err(TlsError::Timeout)
}

/// Copies `len` bytes of `bufs` from `cur` (slice, offset) on to `out`.
fn gather(bufs: &[IoSlice<'_>], cur: &mut (usize, usize), mut len: usize, out: &mut Vec<u8>) {
    while len > 0 {
        let rest = &bufs[cur.0][cur.1..];
        let take = rest.len().min(len);
        out.extend_from_slice(&rest[..take]);
        len -= take;
        if take == rest.len() {
            *cur = (cur.0 + 1, 0);
        } else {
            cur.1 += take;
        }
    }
}

/// Sends `data` without blocking (best effort: alerts, close_notify on drop).
fn send_nonblocking(sock: &File, data: &[u8]) {
    // SAFETY: `data` is valid for reads of its length; the descriptor belongs to `sock`, open
    // for the call. MSG_DONTWAIT never blocks; MSG_NOSIGNAL avoids SIGPIPE.
    unsafe {
        libc::send(
            sock.as_raw_fd(),
            data.as_ptr().cast(),
            data.len(),
            libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
        )
    };
}

/// Reads more of the handshake into `buf[*len..]` (growing it up to [`MAX_HANDSHAKE_BUF`]),
/// looking at the deadline and the cancel between short waits.
fn handshake_read(
    sock: &File,
    buf: &mut Vec<u8>,
    len: &mut usize,
    deadline: Instant,
    cancelled: &dyn Fn() -> bool,
) -> Result<(), TlsError> {
    if *len == buf.len() {
        if buf.len() >= MAX_HANDSHAKE_BUF {
            return Err(TlsError::Handshake(io::Error::new(
                io::ErrorKind::InvalidData,
                "the peer's handshake messages are too large",
            )));
        }
        buf.resize(buf.len() * 2, 0);
    }
    loop {
        match (&*sock).read(&mut buf[*len..]) {
            Ok(0) => {
                return Err(TlsError::Handshake(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the peer closed the connection (a plaintext peer, or one that refused \
                     this side's certificate)",
                )))
            }
            Ok(n) => {
                *len += n;
                return Ok(());
            }
            Err(e) => handshake_wait(e, deadline, cancelled)?,
        }
    }
}

/// Writes handshake records, looking at the deadline and the cancel between short waits (a
/// timed-out write has written nothing).
fn handshake_write(
    sock: &File,
    mut data: &[u8],
    deadline: Instant,
    cancelled: &dyn Fn() -> bool,
) -> Result<(), TlsError> {
    while !data.is_empty() {
        match (&*sock).write(data) {
            Ok(0) => {
                return Err(TlsError::Handshake(io::Error::new(
                    io::ErrorKind::WriteZero,
                    "the socket took nothing",
                )))
            }
            Ok(n) => data = &data[n..],
            Err(e) => handshake_wait(e, deadline, cancelled)?,
        }
    }
    Ok(())
}

/// A socket error during the handshake: go on after a short timeout (unless cancelled or past
/// the deadline) or an interruption; anything else ends the handshake.
fn handshake_wait(
    e: io::Error,
    deadline: Instant,
    cancelled: &dyn Fn() -> bool,
) -> Result<(), TlsError> {
    match e.kind() {
        io::ErrorKind::Interrupted => Ok(()),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => {
            if cancelled() {
                Err(TlsError::Cancelled)
            } else if Instant::now() >= deadline {
                Err(TlsError::Handshake(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("no answer within {} s", HANDSHAKE_TIMEOUT.as_secs()),
                )))
            } else {
                Ok(())
            }
        }
        _ => Err(TlsError::Handshake(e)),
    }
}

/// Appends the record rustls has ready to `out`.
fn encode<D>(s: &mut rustls::unbuffered::EncodeTlsData<'_, D>, out: &mut Vec<u8>) {
    let at = out.len();
    let mut room = 4096;
    loop {
        out.resize(at + room, 0);
        match s.encode(&mut out[at..]) {
            Ok(n) => {
                out.truncate(at + n);
                return;
            }
            Err(EncodeError::InsufficientSize(InsufficientSizeError { required_size })) => {
                room = required_size;
            }
            Err(_) => {
                out.truncate(at);
                return;
            }
        }
    }
}

impl TlsChannel {
    /// Runs the handshake; returns the channel and the peer's end-entity certificate.
    fn handshake<C: Handshake>(
        sock: OwnedFd,
        mut conn: C,
        cancelled: &dyn Fn() -> bool,
    ) -> Result<(Arc<Self>, Option<CertificateDer<'static>>), TlsError> {
        let sock = File::from(sock);
        // Socket I/O in short slices, to look at the cancel and the deadline between them.
        set_timeouts(&sock, Some(CANCEL_POLL))?;
        let deadline = Instant::now() + HANDSHAKE_TIMEOUT;
        let mut inbuf = vec![0u8; 16 << 10];
        let mut inlen = 0usize;
        let mut out = Vec::new();
        let mut early = Vec::new();
        let mut peer_closed = false;
        loop {
            let status = conn.process(&mut inbuf[..inlen]);
            let mut discard = status.discard;
            let step = match status.state {
                Err(e) => Step::Failed(e),
                Ok(ConnectionState::EncodeTlsData(mut s)) => {
                    encode(&mut s, &mut out);
                    Step::Continue
                }
                Ok(ConnectionState::TransmitTlsData(s)) => {
                    handshake_write(&sock, &out, deadline, cancelled)?;
                    out.clear();
                    s.done();
                    Step::Continue
                }
                Ok(ConnectionState::BlockedHandshake) => Step::Read,
                Ok(ConnectionState::WriteTraffic(_)) => Step::Traffic,
                Ok(ConnectionState::ReadTraffic(mut r)) => {
                    let mut step = Step::Continue;
                    while let Some(rec) = r.next_record() {
                        match rec {
                            Ok(rec) => {
                                discard += rec.discard;
                                early.extend_from_slice(rec.payload);
                            }
                            Err(e) => {
                                step = Step::Failed(e);
                                break;
                            }
                        }
                    }
                    step
                }
                Ok(ConnectionState::PeerClosed | ConnectionState::Closed) => Step::Closed,
                Ok(_) => Step::Failed(rustls::Error::General(String::from(
                    "early data, which hopvm does not accept",
                ))),
            };
            inbuf.copy_within(discard..inlen, 0);
            inlen -= discard;
            match step {
                Step::Continue => {}
                // A server may send data before the client's Finished; the handshake is
                // over when rustls says so.
                Step::Traffic if !conn.handshaking() => break,
                Step::Traffic | Step::Read => {
                    handshake_read(&sock, &mut inbuf, &mut inlen, deadline, cancelled)?
                }
                Step::Failed(e) => {
                    // Tell the peer why (the alert rustls queued), best effort.
                    out.clear();
                    if let Ok(ConnectionState::EncodeTlsData(mut s)) =
                        conn.process(&mut inbuf[..inlen]).state
                    {
                        encode(&mut s, &mut out);
                    }
                    send_nonblocking(&sock, &out);
                    return Err(TlsError::Handshake(io::Error::new(
                        io::ErrorKind::InvalidData,
                        e,
                    )));
                }
                // A source that sent its stream and close_notify right after its Finished.
                Step::Closed if !conn.handshaking() => {
                    peer_closed = true;
                    break;
                }
                Step::Closed => {
                    return Err(TlsError::Handshake(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "the peer closed the TLS session during the handshake",
                    )))
                }
            }
        }
        if !out.is_empty() {
            handshake_write(&sock, &out, deadline, cancelled)?;
        }
        let peer = conn.peer_certificate();
        let (secrets, kernel) = conn
            .into_kernel()
            .map_err(|e| TlsError::Handshake(io::Error::other(e)))?;
        let key_err = |e: RecordError| TlsError::Handshake(io::Error::other(e));
        let tx_keys = Keys::new(secrets.tx.0, secrets.tx.1).map_err(key_err)?;
        let rx_keys = Keys::new(secrets.rx.0, secrets.rx.1).map_err(key_err)?;
        let suite = kernel.suite();
        set_timeouts(&sock, None)?;
        // What came after the handshake in the last read is the first records.
        let mut buf = vec![0u8; RECV_BUF.max(inlen + MAX_RECORD)].into_boxed_slice();
        buf[..inlen].copy_from_slice(&inbuf[..inlen]);
        let channel = Arc::new(Self {
            sock,
            suite: suite.suite(),
            kernel: Mutex::new(kernel),
            tx: Mutex::new(Tx {
                keys: tx_keys,
                buf: Vec::with_capacity(SEND_BATCH + (SEND_BATCH / MAX_PLAIN + 2) * OVERHEAD),
                update_at: key_update_at(suite),
                closed: false,
            }),
            rx: Mutex::new(Rx {
                keys: rx_keys,
                buf,
                start: 0,
                end: inlen,
                plain_start: 0,
                plain_end: 0,
                early,
                early_pos: 0,
                hs: Vec::new(),
                eof: false,
                closed: peer_closed,
                error: None,
            }),
            key_update_owed: AtomicBool::new(false),
            failure: Mutex::new(Failure::default()),
            failed: Condvar::new(),
        });
        Ok((channel, peer))
    }

    /// Refuses the peer after the handshake (`tls-authz`): a fatal alert, then the end of
    /// this side's stream (the alert is not followed by a reset while the peer reads it).
    fn refuse(&self, desc: AlertDescription) {
        self.send_alert(desc);
        let _ = socket2::SockRef::from(&self.sock).shutdown(std::net::Shutdown::Write);
    }

    /// The socket's descriptor (to shut it down, poll it).
    pub fn raw_fd(&self) -> RawFd {
        self.sock.as_raw_fd()
    }

    /// The negotiated cipher suite.
    pub fn cipher_suite(&self) -> rustls::CipherSuite {
        self.suite
    }

    /// Changes this side's sending keys every `records` records (tests: the peer must follow
    /// the KeyUpdates); the default is just below the cipher suite's confidentiality limit.
    #[doc(hidden)]
    pub fn set_key_update_interval(&self, records: u64) {
        lock(&self.tx).update_at = records;
    }

    /// Bounds how long a socket read may wait (`None`: for ever); a read that times out is
    /// an error and consumes nothing.
    pub fn set_read_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        socket2::SockRef::from(&self.sock).set_read_timeout(t)
    }

    /// Seals `bufs` and writes the records; returns how much plaintext was taken (all of it
    /// unless the socket fails). The slices (4 KiB pages, mostly) are copied straight into
    /// full 16 KiB records in [`Tx::buf`] and sealed there, across slice boundaries, up to
    /// [`SEND_BATCH`] bytes of plaintext per socket write. (Slice by slice, a page would be a
    /// record of its own and a system call of its own.)
    fn write_plain(&self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        let mut tx = lock(&self.tx);
        if tx.closed {
            return Err(self.closed_error());
        }
        let total: usize = bufs.iter().map(|b| b.len()).sum();
        let mut cur = (0usize, 0usize);
        let mut done = 0;
        while done < total {
            let batch = (total - done).min(SEND_BATCH);
            let Tx {
                keys,
                buf,
                update_at,
                ..
            } = &mut *tx;
            buf.clear();
            let mut left = batch;
            while left > 0 {
                if keys.seq() >= *update_at || self.key_update_owed.load(Ordering::Relaxed) {
                    self.update_tx_keys(keys, buf).map_err(record_io_error)?;
                }
                let len = left.min(MAX_PLAIN);
                keys.seal(buf, APPLICATION_DATA, len, |out| {
                    gather(bufs, &mut cur, len, out)
                })
                .map_err(record_io_error)?;
                left -= len;
            }
            self.send_sealed(&tx.buf)?;
            done += batch;
        }
        Ok(total)
    }

    /// Appends a KeyUpdate (sealed with the current keys) to `buf` and moves to the next keys.
    fn update_tx_keys(&self, keys: &mut Keys, buf: &mut Vec<u8>) -> Result<(), RecordError> {
        self.key_update_owed.store(false, Ordering::Relaxed);
        let msg = key_update_content(false);
        keys.seal(buf, HANDSHAKE, msg.len(), |out| out.extend_from_slice(&msg))?;
        *keys = lock(&self.kernel).next_keys(true)?;
        Ok(())
    }

    /// The error of a write after the sending side closed.
    fn closed_error(&self) -> io::Error {
        let why = lock(&self.failure)
            .reason
            .clone()
            .unwrap_or_else(|| String::from("the TLS channel is closed for writing"));
        io::Error::new(io::ErrorKind::BrokenPipe, why)
    }

    /// Writes sealed records (the caller holds `tx`); a failed write says why the peer went
    /// away if the session knows.
    fn send_sealed(&self, records: &[u8]) -> io::Result<()> {
        if let Err(e) = (&self.sock).write_all(records) {
            return Err(self.explain(e));
        }
        Ok(())
    }

    /// Seals one record of `typ` with `content` and sends it (the sending side not closed).
    fn send_record(&self, tx: &mut Tx, typ: u8, content: &[u8]) -> io::Result<()> {
        tx.buf.clear();
        tx.keys
            .seal(&mut tx.buf, typ, content.len(), |out| {
                out.extend_from_slice(content)
            })
            .map_err(record_io_error)?;
        self.send_sealed(&tx.buf)
    }

    /// Sends a fatal alert if the sending side is free, and closes it (best effort: the
    /// session is over anyway).
    fn send_alert(&self, desc: AlertDescription) {
        let Ok(mut tx) = self.tx.try_lock() else {
            return;
        };
        if tx.closed {
            return;
        }
        tx.closed = true;
        let Tx { keys, buf, .. } = &mut *tx;
        buf.clear();
        let content = alert_content(desc);
        if keys
            .seal(buf, ALERT, content.len(), |out| {
                out.extend_from_slice(&content)
            })
            .is_ok()
        {
            send_nonblocking(&self.sock, buf);
        }
    }

    /// A socket error, with the peer's TLS alert if it sent one (e.g. it refused this side's
    /// certificate).
    fn explain(&self, e: io::Error) -> io::Error {
        if !matches!(
            e.kind(),
            io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset
        ) {
            return e;
        }
        // Read what the peer sent last. If a reader thread is at it, wait (bounded) for it to
        // meet the error or the end; else read what is queued without blocking.
        if let Ok(mut rx) = self.rx.try_lock() {
            self.drain_nonblocking(&mut rx);
        } else {
            let f = lock(&self.failure);
            let _ = self
                .failed
                .wait_timeout_while(f, Duration::from_secs(1), |f| !f.reader_done);
        }
        match &lock(&self.failure).reason {
            Some(reason) => io::Error::new(e.kind(), format!("{e} ({reason})")),
            None => e,
        }
    }

    /// Opens what the peer sent and nobody will read now, looking for its alert.
    fn drain_nonblocking(&self, rx: &mut Rx) {
        loop {
            match self.open_next(rx) {
                Ok(true) => {
                    rx.plain_start = rx.plain_end;
                    if rx.closed {
                        return;
                    }
                }
                Ok(false) => match self.fill(rx, true, false) {
                    Ok(n) if n > 0 => {}
                    _ => return,
                },
                Err(e) => {
                    let e = self.record_failed(rx, e);
                    self.fail(e.to_string());
                    return;
                }
            }
        }
    }

    fn fail(&self, reason: String) {
        let mut f = lock(&self.failure);
        if f.reason.is_none() {
            f.reason = Some(reason);
        }
    }

    fn reader_done(&self) {
        lock(&self.failure).reader_done = true;
        self.failed.notify_all();
    }

    /// Sends a KeyUpdate the peer asked for, if the writer has not yet.
    fn flush_queued(&self) -> io::Result<()> {
        if !self.key_update_owed.load(Ordering::Relaxed) {
            return Ok(());
        }
        let mut tx = lock(&self.tx);
        if tx.closed || !self.key_update_owed.load(Ordering::Relaxed) {
            return Ok(());
        }
        let Tx { keys, buf, .. } = &mut *tx;
        buf.clear();
        self.update_tx_keys(keys, buf).map_err(record_io_error)?;
        self.send_sealed(&tx.buf)
    }

    /// Reads decrypted data; `Ok(0)` at the peer's close_notify.
    fn read_plain(&self, out: &mut [u8]) -> io::Result<usize> {
        let r = self.read_inner(out);
        match &r {
            Ok(0) => self.reader_done(),
            Err(e) => {
                if e.kind() == io::ErrorKind::InvalidData {
                    self.fail(e.to_string());
                }
                self.reader_done();
            }
            Ok(_) => {}
        }
        r
    }

    /// Fills `out` with what the records already received hold, reading the socket only
    /// when none is complete and nothing was copied yet. A large `out` (the destination's
    /// 1 MiB `BufReader` refills) gets the socket's bytes straight in, opened there in place.
    fn read_inner(&self, out: &mut [u8]) -> io::Result<usize> {
        if out.is_empty() {
            return Ok(0);
        }
        let mut rx = lock(&self.rx);
        if let Some(why) = &rx.error {
            return Err(io::Error::new(io::ErrorKind::InvalidData, why.clone()));
        }
        let mut n = 0;
        loop {
            n += rx.take_plain(&mut out[n..]);
            if n == out.len() || rx.closed {
                return Ok(n);
            }
            match self.open_next(&mut rx) {
                Ok(true) => continue,
                Ok(false) => {}
                Err(e) => return Err(self.record_failed(&mut rx, e)),
            }
            // No complete record is left; block on the socket only with nothing copied yet.
            let wait = n == 0;
            if rx.eof {
                if n > 0 {
                    return Ok(n);
                }
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the peer closed the TLS channel without close_notify",
                ));
            }
            if out.len() - n >= DIRECT_READ {
                if rx.start < rx.end {
                    // Complete the record begun in the buffer first (only its missing bytes).
                    if self.fill(&mut rx, !wait, true)? == 0 && !wait {
                        return Ok(n);
                    }
                    continue;
                }
                match self.read_direct(&mut rx, &mut out[n..], !wait) {
                    Ok(None) => return Ok(n),
                    Ok(Some(k)) => n += k,
                    Err(RecvError::Io(e)) => return Err(e),
                    Err(RecvError::Record(e)) => return Err(self.record_failed(&mut rx, e)),
                }
                continue;
            }
            if !wait {
                return Ok(n);
            }
            // Nothing buffered: wait for the socket, holding no lock but our own.
            self.fill(&mut rx, false, false)?;
        }
    }

    /// Receives into `dst` (the buffer is empty) and opens the complete records there, each
    /// record's content moved down against the previous one as it is decrypted: returns the
    /// plaintext now at the start of `dst`; the partial record at the end goes to the buffer.
    /// `None`: nothing to read without blocking (`nonblocking`); `Some(0)` and `rx.eof` at
    /// the end of the socket.
    fn read_direct(
        &self,
        rx: &mut Rx,
        dst: &mut [u8],
        nonblocking: bool,
    ) -> Result<Option<usize>, RecvError> {
        let len = self.recv(dst, nonblocking).map_err(RecvError::Io)?;
        let Some(len) = len else {
            return Ok(None);
        };
        if len == 0 {
            rx.eof = true;
            return Ok(Some(0));
        }
        let (mut src, mut plain) = (0usize, 0usize);
        while let Some(rec) = record::record_len(&dst[src..len])? {
            if src + rec > len {
                break;
            }
            let (typ, n) = rx.keys.open_to(dst, src, rec, plain)?;
            src += rec;
            if typ == APPLICATION_DATA {
                if !rx.hs.is_empty() {
                    return Err(RecordError::Interleaved.into());
                }
                plain += n;
            } else {
                let Rx {
                    keys, hs, closed, ..
                } = &mut *rx;
                self.control(typ, &dst[plain..plain + n], keys, hs, closed)?;
                if *closed {
                    return Ok(Some(plain));
                }
            }
        }
        let rest = len - src;
        rx.buf[..rest].copy_from_slice(&dst[src..len]);
        rx.start = 0;
        rx.end = rest;
        rx.plain_start = 0;
        rx.plain_end = 0;
        Ok(Some(plain))
    }

    /// A record the reader cannot accept: the peer is told (alert) and every later read fails
    /// the same way.
    fn record_failed(&self, rx: &mut Rx, e: RecordError) -> io::Error {
        if let Some(desc) = e.alert() {
            self.send_alert(desc);
        }
        let why = e.to_string();
        rx.error = Some(why.clone());
        io::Error::new(io::ErrorKind::InvalidData, why)
    }

    /// One socket read into `dst`: `Some(0)` at its end, `None` when nothing is there and
    /// `nonblocking`.
    fn recv(&self, dst: &mut [u8], nonblocking: bool) -> io::Result<Option<usize>> {
        let flags = if nonblocking { libc::MSG_DONTWAIT } else { 0 };
        loop {
            // SAFETY: `dst` is valid for writes of its length; the descriptor belongs to
            // `self.sock`, open for the call.
            let n = unsafe {
                libc::recv(
                    self.sock.as_raw_fd(),
                    dst.as_mut_ptr().cast(),
                    dst.len(),
                    flags,
                )
            };
            if n >= 0 {
                return Ok(Some(n as usize));
            }
            let e = io::Error::last_os_error();
            match e.kind() {
                io::ErrorKind::Interrupted => continue,
                io::ErrorKind::WouldBlock if nonblocking => return Ok(None),
                _ => return Err(e),
            }
        }
    }

    /// Reads the socket after the ciphertext kept (moved to the front); returns how much came,
    /// 0 at its end or when nothing is there and `nonblocking`. `one_record`: no more than the
    /// record begun needs (its header first).
    fn fill(&self, rx: &mut Rx, nonblocking: bool, one_record: bool) -> io::Result<usize> {
        if rx.start > 0 {
            rx.buf.copy_within(rx.start..rx.end, 0);
            rx.end -= rx.start;
            rx.start = 0;
            rx.plain_start = 0;
            rx.plain_end = 0;
        }
        let want = if one_record {
            match record::record_len(&rx.buf[..rx.end]) {
                Ok(Some(len)) => len.saturating_sub(rx.end).max(1),
                _ => HEADER_LEN.saturating_sub(rx.end).max(1),
            }
        } else {
            rx.buf.len() - rx.end
        };
        let end = rx.end;
        match self.recv(&mut rx.buf[end..end + want], nonblocking)? {
            None => Ok(0),
            Some(n) => {
                rx.end += n;
                rx.eof |= n == 0;
                Ok(n)
            }
        }
    }

    /// Opens the next complete record received, if there is one: its data becomes the
    /// plaintext to read; alerts and post-handshake messages are acted on.
    fn open_next(&self, rx: &mut Rx) -> Result<bool, RecordError> {
        let start = rx.start;
        let avail = &rx.buf[start..rx.end];
        let Some(len) = record::record_len(avail)? else {
            return Ok(false);
        };
        if avail.len() < len {
            return Ok(false);
        }
        let (typ, n) = rx.keys.open(&mut rx.buf[start..start + len])?;
        rx.start += len;
        let content = start + HEADER_LEN..start + HEADER_LEN + n;
        if typ == APPLICATION_DATA {
            if !rx.hs.is_empty() {
                return Err(RecordError::Interleaved);
            }
            rx.plain_start = content.start;
            rx.plain_end = content.end;
        } else {
            let Rx {
                keys,
                hs,
                closed,
                buf,
                ..
            } = &mut *rx;
            self.control(typ, &buf[content], keys, hs, closed)?;
        }
        Ok(true)
    }

    /// Acts on a record that is not application data: an alert (close_notify ends the
    /// stream, anything else the session) or post-handshake messages (KeyUpdate changes the
    /// receiving keys, and asks the writer for one of its own if requested).
    fn control(
        &self,
        typ: u8,
        content: &[u8],
        keys: &mut Keys,
        hs: &mut Vec<u8>,
        closed: &mut bool,
    ) -> Result<(), RecordError> {
        match typ {
            ALERT => match record::parse_alert(content)? {
                Alert::CloseNotify => *closed = true,
                Alert::Ignored => {}
            },
            HANDSHAKE => {
                hs.extend_from_slice(content);
                while let Some(msg) = record::next_post_handshake(hs, true)? {
                    match msg {
                        PostHandshake::KeyUpdate { update_requested } => {
                            *keys = lock(&self.kernel).next_keys(false)?;
                            if update_requested {
                                self.key_update_owed.store(true, Ordering::Relaxed);
                            }
                        }
                        PostHandshake::NewSessionTicket => {}
                    }
                }
            }
            t => return Err(RecordError::InnerType(t)),
        }
        Ok(())
    }

    /// Sends close_notify: the peer's reader sees the end of the stream. This side may still
    /// read (TLS 1.3 half-close).
    pub fn close_write(&self) -> io::Result<()> {
        let mut tx = lock(&self.tx);
        if tx.closed {
            return Ok(());
        }
        tx.closed = true;
        self.send_record(
            &mut tx,
            ALERT,
            &alert_content(AlertDescription::CloseNotify),
        )
    }
}

impl Drop for TlsChannel {
    /// The last holder is done: tell the peer the stream ended cleanly (close_notify), if the
    /// socket takes it at once (a channel shut down or stalled is just closed).
    fn drop(&mut self) {
        let tx = self.tx.get_mut().unwrap_or_else(|e| e.into_inner());
        if tx.closed {
            return;
        }
        tx.closed = true;
        tx.buf.clear();
        let content = alert_content(AlertDescription::CloseNotify);
        if tx
            .keys
            .seal(&mut tx.buf, ALERT, content.len(), |out| {
                out.extend_from_slice(&content)
            })
            .is_ok()
        {
            send_nonblocking(&self.sock, &tx.buf);
        }
    }
}

/// The sequence number at which the sending keys change: just below the suite's
/// confidentiality limit (2^24 records for AES-GCM, as rustls does).
fn key_update_at(suite: SupportedCipherSuite) -> u64 {
    let limit = suite
        .tls13()
        .map_or(u64::MAX, |s| s.common.confidentiality_limit);
    limit.saturating_sub(limit / 16).max(1)
}

/// The writing half of a [`TlsChannel`].
#[derive(Debug, Clone)]
pub struct TlsWriter(pub Arc<TlsChannel>);

impl Write for TlsWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.write_plain(&[IoSlice::new(buf)])
    }

    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        self.0.write_plain(bufs)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.0.flush_queued()
    }
}

/// The reading half of a [`TlsChannel`].
#[derive(Debug, Clone)]
pub struct TlsReader(pub Arc<TlsChannel>);

impl Read for TlsReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.0.read_plain(buf)
    }
}

#[cfg(any(test, feature = "test-certs"))]
pub mod test_certs {
    //! Certificates made in the tests (rcgen), written as QEMU's credential directories.

    use std::path::Path;

    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, KeyUsagePurpose};

    /// A CA that signs server and client certificates.
    pub struct Ca {
        cert: rcgen::Certificate,
        key: KeyPair,
    }

    impl Ca {
        /// A new self-signed CA.
        pub fn new(name: &str) -> Self {
            let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
            p.distinguished_name.push(DnType::CommonName, name);
            p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
            let key = KeyPair::generate().unwrap();
            let cert = p.self_signed(&key).unwrap();
            Self { cert, key }
        }

        /// A leaf certificate for `names`; `expired` makes one whose validity ended.
        pub fn leaf(&self, names: &[&str], expired: bool) -> (String, String) {
            let cn = names.first().copied().unwrap_or("x");
            self.leaf_dn(names, &[("CN", cn)], expired)
        }

        /// A leaf certificate for `names` whose subject is `dn`, attributes in that order
        /// (`C`, `ST`, `L`, `O`, `OU`, `CN`; one of each).
        pub fn leaf_dn(
            &self,
            names: &[&str],
            dn: &[(&str, &str)],
            expired: bool,
        ) -> (String, String) {
            let mut p =
                CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>())
                    .unwrap();
            p.distinguished_name = rcgen::DistinguishedName::new();
            for (ty, value) in dn {
                let ty = match *ty {
                    "C" => DnType::CountryName,
                    "ST" => DnType::StateOrProvinceName,
                    "L" => DnType::LocalityName,
                    "O" => DnType::OrganizationName,
                    "OU" => DnType::OrganizationalUnitName,
                    "CN" => DnType::CommonName,
                    other => panic!("no attribute {other} in test certificates"),
                };
                // X.520: a country is a PrintableString, the rest UTF-8 (as openssl makes them).
                let value = if ty == DnType::CountryName {
                    rcgen::DnValue::PrintableString((*value).try_into().unwrap())
                } else {
                    rcgen::DnValue::Utf8String((*value).into())
                };
                p.distinguished_name.push(ty, value);
            }
            if expired {
                p.not_before = rcgen::date_time_ymd(2000, 1, 1);
                p.not_after = rcgen::date_time_ymd(2001, 1, 1);
            }
            let key = KeyPair::generate().unwrap();
            let cert = p.signed_by(&key, &self.cert, &self.key).unwrap();
            (cert.pem(), key.serialize_pem())
        }

        /// Writes a destination's directory (CA + server cert for `names`).
        pub fn server_dir(&self, dir: &Path, names: &[&str], expired: bool) {
            std::fs::create_dir_all(dir).unwrap();
            let (c, k) = self.leaf(names, expired);
            std::fs::write(dir.join("ca-cert.pem"), self.cert.pem()).unwrap();
            std::fs::write(dir.join("server-cert.pem"), c).unwrap();
            std::fs::write(dir.join("server-key.pem"), k).unwrap();
        }

        /// Writes a source's directory (CA + client cert, subject `CN=source`).
        pub fn client_dir(&self, dir: &Path, expired: bool) {
            self.client_dir_dn(dir, &[("CN", "source")], expired);
        }

        /// Writes a source's directory whose client certificate's subject is `dn` (see
        /// [`leaf_dn`](Self::leaf_dn)).
        pub fn client_dir_dn(&self, dir: &Path, dn: &[(&str, &str)], expired: bool) {
            std::fs::create_dir_all(dir).unwrap();
            let (c, k) = self.leaf_dn(&["source"], dn, expired);
            std::fs::write(dir.join("ca-cert.pem"), self.cert.pem()).unwrap();
            std::fs::write(dir.join("client-cert.pem"), c).unwrap();
            std::fs::write(dir.join("client-key.pem"), k).unwrap();
        }
    }
}

#[cfg(test)]
mod tests {
    //! hopvm's record layer against rustls' own (which a QEMU/gnutls peer equally follows:
    //! standard TLS 1.3), and against altered and cut streams.

    use super::test_certs::Ca;
    use super::*;
    use std::os::unix::net::UnixStream;
    use std::path::PathBuf;
    use std::thread;

    struct Certs {
        dir: PathBuf,
    }

    impl Certs {
        fn new(name: &str) -> Self {
            let dir = std::env::temp_dir()
                .join(format!("hopvm-tls-record-{name}-{}", std::process::id()));
            let ca = Ca::new("ca");
            ca.server_dir(&dir.join("dst"), &["localhost"], false);
            ca.client_dir(&dir.join("src"), false);
            Self { dir }
        }

        fn server(&self) -> TlsCredsX509 {
            TlsCredsX509::load("s", &self.dir.join("dst"), Endpoint::Server, true).unwrap()
        }

        fn client(&self) -> TlsCredsX509 {
            TlsCredsX509::load("c", &self.dir.join("src"), Endpoint::Client, true).unwrap()
        }

        /// hopvm's client channel to `localhost` over `sock`, its handshake done.
        fn connect(&self, sock: impl Into<OwnedFd>) -> Arc<TlsChannel> {
            self.client()
                .client(Some("localhost"))
                .unwrap()
                .connect(sock.into())
                .unwrap()
        }

        /// A rustls client with rustls' own defaults (AES-256-GCM offered first).
        #[allow(deprecated)]
        fn rustls_client(&self) -> Arc<ClientConfig> {
            let src = self.dir.join("src");
            let mut roots = RootCertStore::empty();
            for c in read_certs(&src.join("ca-cert.pem")).unwrap() {
                roots.add(c).unwrap();
            }
            let config = ClientConfig::builder_with_provider(Arc::new(
                rustls::crypto::ring::default_provider(),
            ))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_client_auth_cert(
                read_certs(&src.join("client-cert.pem")).unwrap(),
                read_key(&src.join("client-key.pem")).unwrap(),
            )
            .unwrap();
            Arc::new(config)
        }
    }

    impl Drop for Certs {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }

    fn pattern(len: usize, seed: u8) -> Vec<u8> {
        (0..len)
            .map(|i| (i as u8).wrapping_mul(31) ^ (i >> 9) as u8 ^ seed)
            .collect()
    }

    /// The source's stream read by rustls' record layer, following hopvm's KeyUpdates; the
    /// answer, written by rustls with KeyUpdates of its own that ask for one back, read by
    /// hopvm's; close_notify both ways.
    #[test]
    fn hopvm_client_against_rustls_server() {
        let certs = Certs::new("client");
        let config = certs.server().server.clone().unwrap();
        let (a, b) = UnixStream::pair().unwrap();
        let peer = thread::spawn(move || {
            let conn = rustls::ServerConnection::new(config).unwrap();
            let mut s = rustls::StreamOwned::new(conn, b);
            let mut got = Vec::new();
            // Ends cleanly at hopvm's close_notify (rustls' read fails without it).
            s.read_to_end(&mut got).unwrap();
            for part in [&b"first "[..], b"second ", b"third"] {
                s.write_all(part).unwrap();
                s.conn.refresh_traffic_keys().unwrap();
            }
            s.conn.send_close_notify();
            s.flush().unwrap();
            got
        });
        let ch = certs.connect(a);
        assert_eq!(
            ch.cipher_suite(),
            rustls::CipherSuite::TLS13_AES_128_GCM_SHA256
        );
        // A KeyUpdate every 5 records: 1 MiB is 65 records and 13 key changes.
        ch.set_key_update_interval(5);
        let data = pattern((1 << 20) + 123, 1);
        let pages: Vec<IoSlice<'_>> = data.chunks(4096).map(IoSlice::new).collect();
        assert_eq!(
            TlsWriter(ch.clone()).write_vectored(&pages).unwrap(),
            data.len()
        );
        TlsWriter(ch.clone()).write_all(b"tail").unwrap();
        // The keys did change (66 records went out, under keys that began at 0).
        assert!(lock(&ch.tx).keys.seq() <= 5);
        ch.close_write().unwrap();
        let mut answer = Vec::new();
        TlsReader(ch.clone()).read_to_end(&mut answer).unwrap();
        assert_eq!(answer, b"first second third");
        // After close_notify, the end of the stream again.
        assert_eq!(TlsReader(ch.clone()).read(&mut [0u8; 8]).unwrap(), 0);
        let mut expect = data;
        expect.extend_from_slice(b"tail");
        assert!(peer.join().unwrap() == expect, "rustls read other bytes");
    }

    /// A rustls client (AES-256-GCM first, as gnutls) gets AES-128-GCM, the destination's
    /// choice; its KeyUpdate asks for one back, which hopvm's writer sends before its answer.
    #[test]
    fn rustls_client_against_hopvm_server() {
        let certs = Certs::new("server");
        let config = certs.rustls_client();
        let (a, b) = UnixStream::pair().unwrap();
        let peer = thread::spawn(move || {
            let name = ServerName::try_from("localhost").unwrap();
            let conn = rustls::ClientConnection::new(config, name).unwrap();
            let mut s = rustls::StreamOwned::new(conn, b);
            s.write_all(&pattern(100_000, 2)).unwrap();
            s.conn.refresh_traffic_keys().unwrap();
            s.write_all(b"after the update").unwrap();
            s.flush().unwrap();
            let mut answer = [0u8; 6];
            s.read_exact(&mut answer).unwrap();
            s.conn.send_close_notify();
            s.flush().unwrap();
            answer
        });
        let ch = certs.server().server().unwrap().accept(a.into()).unwrap();
        assert_eq!(
            ch.cipher_suite(),
            rustls::CipherSuite::TLS13_AES_128_GCM_SHA256
        );
        let mut got = vec![0u8; 100_000 + 16];
        TlsReader(ch.clone()).read_exact(&mut got).unwrap();
        let mut expect = pattern(100_000, 2);
        expect.extend_from_slice(b"after the update");
        assert!(got == expect);
        assert!(ch.key_update_owed.load(Ordering::Relaxed));
        TlsWriter(ch.clone()).write_all(b"answer").unwrap();
        assert!(!ch.key_update_owed.load(Ordering::Relaxed));
        assert_eq!(&peer.join().unwrap(), b"answer");
        assert_eq!(TlsReader(ch.clone()).read(&mut [0u8; 8]).unwrap(), 0);
    }

    /// hopvm on both ends through a relay that `alter`s what goes from source to destination
    /// (bytes at and after `at`); the destination's read result and the source's.
    fn through_relay(
        name: &str,
        at: usize,
        alter: fn(&mut [u8]) -> bool,
    ) -> (Result<Vec<u8>, io::Error>, io::Result<usize>) {
        let certs = Certs::new(name);
        let (src, relay_src) = UnixStream::pair().unwrap();
        let (relay_dst, dst) = UnixStream::pair().unwrap();
        // Destination to source, as is.
        let (mut from_dst, mut to_src) = (
            relay_dst.try_clone().unwrap(),
            relay_src.try_clone().unwrap(),
        );
        thread::spawn(move || io::copy(&mut from_dst, &mut to_src));
        // Source to destination, altered from byte `at`; `alter` says whether to go on.
        thread::spawn(move || {
            let (mut from, mut to) = (relay_src, relay_dst);
            let mut buf = vec![0u8; 64 << 10];
            let mut pos = 0usize;
            loop {
                let n = match from.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => n,
                };
                let mut go_on = true;
                if pos + n > at {
                    let k = at.saturating_sub(pos);
                    go_on = alter(&mut buf[k..n]);
                    if !go_on {
                        let _ = to.write_all(&buf[..k]);
                        break;
                    }
                }
                if to.write_all(&buf[..n]).is_err() || !go_on {
                    break;
                }
                pos += n;
            }
            let _ = to.shutdown(std::net::Shutdown::Write);
        });
        let server = certs.server().server().unwrap();
        let reader = thread::spawn(move || {
            let ch = server.accept(dst.into()).unwrap();
            let mut got = Vec::new();
            let r = TlsReader(ch.clone()).read_to_end(&mut got).map(|_| got);
            drop(ch);
            r
        });
        let ch = certs.connect(src);
        // The source's write may fail once the destination gave up: what counts is what the
        // destination read.
        let _ = TlsWriter(ch.clone()).write_all(&pattern(256 << 10, 3));
        let got = reader.join().unwrap();
        // What the source's reader (the return path) sees.
        let back = TlsReader(ch.clone()).read(&mut [0u8; 16]);
        (got, back)
    }

    /// A client whose first data leaves with its Finished (rustls sends what was written during
    /// the handshake at once), its close_notify right behind: the destination's handshake
    /// reads them with the Finished, and its reader still returns all of it, then the clean
    /// end.
    #[test]
    fn data_and_close_notify_right_behind_the_handshake() {
        let certs = Certs::new("early");
        let config = certs.rustls_client();
        let (a, b) = UnixStream::pair().unwrap();
        let data = pattern(50_000, 6);
        let sent = data.clone();
        let peer = thread::spawn(move || {
            let name = ServerName::try_from("localhost").unwrap();
            let mut conn = rustls::ClientConnection::new(config, name).unwrap();
            // Small records first: complete in the read that brings the Finished, rustls
            // opens them in the handshake; then full ones, the first cut by that read.
            for part in [&sent[..100], &sent[100..300], &sent[300..]] {
                conn.writer().write_all(part).unwrap();
            }
            let mut sock = b;
            while conn.is_handshaking() {
                conn.complete_io(&mut sock).unwrap();
            }
            conn.send_close_notify();
            while conn.wants_write() {
                conn.write_tls(&mut sock).unwrap();
            }
            // Keep the socket open until the destination has read everything.
            let _ = sock.read(&mut [0u8; 1]);
        });
        let ch = certs.server().server().unwrap().accept(a.into()).unwrap();
        let mut got = Vec::new();
        TlsReader(ch.clone()).read_to_end(&mut got).unwrap();
        assert!(got == data);
        drop(ch);
        peer.join().unwrap();
    }

    /// `tls-authz` on the destination: after the handshake the source's certificate
    /// (`CN=source`) must be allowed by the object the parameter names, looked up at each
    /// connection; a refused source reads the destination's alert.
    #[test]
    fn tls_authz_allows_refuses_and_names_the_identity() {
        use authz::AuthzObject;
        let certs = Certs::new("authz");
        let table = MigrationTls::default();
        table.add_object(certs.server()).unwrap();
        let simple = |id: &str, who: &str| {
            AuthzObject::from_keyval([("qom-type", "authz-simple"), ("id", id), ("identity", who)])
                .unwrap()
        };
        table.add_object(simple("ok", "CN=source")).unwrap();
        table.add_object(simple("no", "CN=other")).unwrap();
        table.set_creds("s");
        // One connection: the destination's result, and what the source then reads.
        let connect = |certs: &Certs| {
            let server = table.server().unwrap().unwrap();
            let (a, b) = UnixStream::pair().unwrap();
            let client = certs.client().client(Some("localhost")).unwrap();
            let src = thread::spawn(move || {
                let ch = client.connect(a.into()).unwrap();
                let _ = TlsWriter(ch.clone()).write_all(b"stream");
                let mut buf = [0u8; 2];
                TlsReader(ch).read_exact(&mut buf).map(|()| buf)
            });
            let dst = server.accept(b.into()).map(|ch| {
                let mut got = [0u8; 6];
                TlsReader(ch.clone()).read_exact(&mut got).unwrap();
                TlsWriter(ch).write_all(b"ok").unwrap();
                got
            });
            (dst, src.join().unwrap())
        };
        table.set_authz("ok");
        let (dst, src) = connect(&certs);
        assert_eq!(&dst.unwrap(), b"stream");
        assert_eq!(&src.unwrap(), b"ok");
        let cases = [
            (
                "no",
                "TLS x509 authz check for CN=source is denied",
                "AccessDenied",
            ),
            ("nope", "Cannot find QAuthZ object ID nope", "InternalError"),
            ("s", "Object 's' is not a QAuthZ subclass", "InternalError"),
        ];
        for (id, dst_error, alert) in cases {
            table.set_authz(id);
            let (dst, src) = connect(&certs);
            assert_eq!(dst.unwrap_err().to_string(), dst_error);
            let src = src.unwrap_err().to_string();
            assert!(
                src.contains(&format!("received fatal alert: {alert}")),
                "{src}"
            );
        }
        // The object in use cannot go; another can.
        table.set_authz("no");
        assert!(table
            .remove_object("no")
            .unwrap_err()
            .to_string()
            .contains("tls-authz"));
        table.set_authz("");
        table.remove_object("no").unwrap();
        // verify-peer=off: no client certificate, nothing to authorize (QEMU skips the check).
        let lax = MigrationTls::default();
        lax.add_object(
            TlsCredsX509::load("s", &certs.dir.join("dst"), Endpoint::Server, false).unwrap(),
        )
        .unwrap();
        lax.add_object(simple("no", "CN=other")).unwrap();
        lax.set_creds("s");
        lax.set_authz("no");
        assert!(lax.server().unwrap().unwrap().authz.is_none());
    }

    #[test]
    fn keys_change_below_the_confidentiality_limit() {
        use rustls::crypto::ring::cipher_suite as cs;
        // AES-GCM: 2^24 records (rustls' limit); hopvm changes keys 2^20 records before.
        assert_eq!(
            key_update_at(cs::TLS13_AES_128_GCM_SHA256),
            (1 << 24) - (1 << 20)
        );
        assert_eq!(
            key_update_at(cs::TLS13_AES_256_GCM_SHA384),
            (1 << 24) - (1 << 20)
        );
        assert!(key_update_at(cs::TLS13_CHACHA20_POLY1305_SHA256) > 1 << 60);
    }

    /// hopvm on both ends, read as the destination does (a 1 MiB `BufReader`, whose refills
    /// take the direct path, in page-sized and odd reads), with KeyUpdates every 7 records.
    #[test]
    fn hopvm_to_hopvm_through_large_and_small_reads() {
        let certs = Certs::new("h2h");
        let (a, b) = UnixStream::pair().unwrap();
        let server = certs.server().server().unwrap();
        let total = (5 << 20) + 4321;
        let reader = thread::spawn(move || {
            let ch = server.accept(b.into()).unwrap();
            let mut r = io::BufReader::with_capacity(1 << 20, TlsReader(ch.clone()));
            let mut got = Vec::with_capacity(total);
            let mut piece = vec![0u8; 4096];
            let mut sizes = [4096usize, 4096, 1, 777, 4096, 70_000].iter().cycle();
            while got.len() < total {
                let k = (*sizes.next().unwrap()).min(total - got.len());
                piece.resize(k, 0);
                r.read_exact(&mut piece).unwrap();
                got.extend_from_slice(&piece);
            }
            // Then the clean end.
            assert_eq!(r.read(&mut piece).unwrap(), 0);
            TlsWriter(ch.clone()).write_all(b"verdict").unwrap();
            got
        });
        let ch = certs.connect(a);
        ch.set_key_update_interval(7);
        let data = pattern(total, 4);
        for part in data.chunks(300_000) {
            let pages: Vec<IoSlice<'_>> = part.chunks(4096).map(IoSlice::new).collect();
            assert_eq!(
                TlsWriter(ch.clone()).write_vectored(&pages).unwrap(),
                part.len()
            );
        }
        ch.close_write().unwrap();
        let mut verdict = [0u8; 7];
        TlsReader(ch.clone()).read_exact(&mut verdict).unwrap();
        assert_eq!(&verdict, b"verdict");
        assert!(reader.join().unwrap() == data, "other bytes arrived");
    }

    /// Against gnutls (QEMU's TLS library): `gnutls-serv --echo` sends session tickets after
    /// the handshake and picks its own cipher suite; hopvm's KeyUpdates (every 3 records)
    /// must be followed and the echo come back intact. Needs `gnutls-serv` (Debian's
    /// gnutls-bin): `cargo test -p migration --lib gnutls -- --ignored`.
    #[test]
    #[ignore = "needs gnutls-serv (gnutls-bin) installed"]
    fn gnutls_echo_server() {
        use std::process::{Command, Stdio};
        let certs = Certs::new("gnutls");
        let dst = certs.dir.join("dst");
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let mut serv = Command::new("gnutls-serv")
            .args(["--echo", "--verify-client-cert", "-p", &port.to_string()])
            .arg(format!(
                "--x509cafile={}",
                dst.join("ca-cert.pem").display()
            ))
            .arg(format!(
                "--x509certfile={}",
                dst.join("server-cert.pem").display()
            ))
            .arg(format!(
                "--x509keyfile={}",
                dst.join("server-key.pem").display()
            ))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("gnutls-serv");
        let deadline = Instant::now() + Duration::from_secs(10);
        let sock = loop {
            match std::net::TcpStream::connect(("127.0.0.1", port)) {
                Ok(s) => break s,
                Err(_) if Instant::now() < deadline => thread::yield_now(),
                Err(e) => panic!("gnutls-serv does not listen: {e}"),
            }
        };
        let ch = certs.connect(sock);
        eprintln!("gnutls chose {:?}", ch.cipher_suite());
        ch.set_key_update_interval(3);
        // gnutls-serv echoes lines.
        let data: Vec<u8> = (0..5000)
            .flat_map(|i| format!("line {i:05} of the hopvm record layer test\n").into_bytes())
            .collect();
        let reader = {
            let ch = ch.clone();
            let len = data.len();
            thread::spawn(move || {
                let mut back = vec![0u8; len];
                TlsReader(ch).read_exact(&mut back).map(|()| back)
            })
        };
        for part in data.chunks(50_000) {
            TlsWriter(ch.clone()).write_all(part).unwrap();
        }
        let back = reader.join().unwrap();
        let _ = serv.kill();
        let _ = serv.wait();
        assert!(back.unwrap() == data, "gnutls echoed other bytes");
    }

    #[test]
    fn an_altered_record_fails_the_stream_with_an_alert() {
        let (got, back) = through_relay("altered", 100_000, |b| {
            b[0] ^= 1;
            true
        });
        let e = got.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidData);
        assert!(e.to_string().contains("bad_record_mac"), "{e}");
        // The destination told the source why.
        let e = back.unwrap_err();
        assert!(e.to_string().contains("BadRecordMac"), "{e}");
    }

    #[test]
    fn a_cut_stream_is_not_a_clean_end() {
        let (got, _) = through_relay("cut", 100_000, |_| false);
        let e = got.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof);
        assert!(e.to_string().contains("without close_notify"), "{e}");
    }

    #[test]
    fn plaintext_after_the_handshake_is_refused() {
        // A TLS 1.2-style plaintext record (a handshake) injected after the handshake.
        let (got, _) = through_relay("plain", 100_000, |b| {
            if b.len() >= 5 {
                b[..5].copy_from_slice(&[22, 3, 3, 0, 4]);
            }
            true
        });
        let e = got.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidData);
    }
}
