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
//! A migration channel carries the stream one way and the return path the other, read by
//! another thread ([`crate::return_path`]) while the migration thread writes. rustls' state
//! machine is one object, so [`TlsChannel`] shares it between both directions:
//!
//! - `conn` (the rustls connection) is only ever held to encrypt or decrypt, never across a
//!   socket read or write;
//! - `tx` is held by whoever writes ciphertext to the socket, from taking it out of `conn` to
//!   the end of the socket write, so records go out in the order they were sealed;
//! - `rx` is held by the one reader across its socket read (the reader's own buffer).
//!
//! Lock order: `rx` → `tx` → `conn` (see docs/architecture.md). None of them is taken with a
//! VMM lock held.
//!
//! Writes are batched: the migration thread hands over up to megabytes at once (its
//! `BufferedOutput`), which are sealed into full 16 KiB records and written with one
//! `writev` per batch of records.

use std::fmt;
use std::fs::File;
use std::io::{self, IoSlice, Read, Write};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, Connection, DigitallySignedStruct, RootCertStore, ServerConfig};
use vmm_sync::lock;

/// How long a TLS handshake may take before the peer is given up on (a peer that connects and
/// says nothing must not hold the destination's accept loop forever).
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// How often a handshake in progress looks at its cancel.
pub const CANCEL_POLL: Duration = Duration::from_millis(100);

/// Plaintext handed to rustls before the sealed records are written out: large batches,
/// few system calls.
const SEND_BATCH: usize = 1 << 20;

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
            .map(|config| ServerTls { config })
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

/// The VM's `tls-creds-x509` objects and the migration's `tls-creds` / `tls-hostname`
/// parameters (QEMU's `migrate-set-parameters`), under one leaf lock.
#[derive(Debug, Default)]
pub struct MigrationTls {
    inner: Mutex<TlsState>,
}

#[derive(Debug, Default)]
struct TlsState {
    creds: String,
    hostname: String,
    objects: std::collections::BTreeMap<String, Arc<TlsCredsX509>>,
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
    /// `object-del` of the credentials the migration is set to use.
    #[error("object '{0}' is in use by the migration parameter tls-creds")]
    InUse(String),
}

impl MigrationTls {
    /// Adds a credentials object (`--object`, `-object`, QMP `object-add`).
    pub fn add_object(&self, creds: TlsCredsX509) -> Result<(), TlsObjectError> {
        let mut s = lock(&self.inner);
        if s.objects.contains_key(creds.id()) {
            return Err(TlsObjectError::Duplicate(creds.id().to_owned()));
        }
        s.objects.insert(creds.id().to_owned(), Arc::new(creds));
        Ok(())
    }

    /// Removes one (QMP `object-del`).
    pub fn remove_object(&self, id: &str) -> Result<(), TlsObjectError> {
        let mut s = lock(&self.inner);
        if !s.objects.contains_key(id) {
            return Err(TlsObjectError::NotFound(id.to_owned()));
        }
        if s.creds == id {
            return Err(TlsObjectError::InUse(id.to_owned()));
        }
        s.objects.remove(id);
        Ok(())
    }

    /// The object with this id.
    pub fn object(&self, id: &str) -> Option<Arc<TlsCredsX509>> {
        lock(&self.inner).objects.get(id).cloned()
    }

    /// `tls-creds` ("" = no TLS).
    pub fn creds(&self) -> String {
        lock(&self.inner).creds.clone()
    }

    /// `tls-hostname` ("" = the host of the migration URI).
    pub fn hostname(&self) -> String {
        lock(&self.inner).hostname.clone()
    }

    /// Sets `tls-creds`; checked when a channel opens, as in QEMU.
    pub fn set_creds(&self, id: &str) {
        lock(&self.inner).creds = id.to_owned();
    }

    /// Sets `tls-hostname`.
    pub fn set_hostname(&self, name: &str) {
        lock(&self.inner).hostname = name.to_owned();
    }

    fn named(&self) -> Result<Option<Arc<TlsCredsX509>>, TlsError> {
        let s = lock(&self.inner);
        if s.creds.is_empty() {
            return Ok(None);
        }
        s.objects
            .get(&s.creds)
            .cloned()
            .map(Some)
            .ok_or_else(|| TlsError::NoCreds(s.creds.clone()))
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

    /// The destination's TLS, or `None` without `tls-creds`.
    pub fn server(&self) -> Result<Option<ServerTls>, TlsError> {
        match self.named()? {
            None => Ok(None),
            Some(creds) => creds.server().map(Some),
        }
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
        let conn = rustls::ClientConnection::new(self.config.clone(), self.name.clone())
            .map_err(|e| TlsError::Handshake(io::Error::other(e)))?;
        TlsChannel::handshake(sock, conn.into(), cancelled)
    }
}

/// The server (destination) side of TLS sessions.
#[derive(Clone)]
pub struct ServerTls {
    config: Arc<ServerConfig>,
}

impl fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ServerTls")
    }
}

impl ServerTls {
    /// Runs the handshake on an accepted socket (verifying the client's certificate when the
    /// credentials say so) and returns the channel.
    pub fn accept(&self, sock: OwnedFd) -> Result<Arc<TlsChannel>, TlsError> {
        let conn = rustls::ServerConnection::new(self.config.clone())
            .map_err(|e| TlsError::Handshake(io::Error::other(e)))?;
        TlsChannel::handshake(sock, conn.into(), &|| false)
    }
}

/// What the reader keeps between calls: ciphertext read from the socket and not yet given
/// to rustls.
struct Rx {
    buf: Box<[u8]>,
    pos: usize,
    len: usize,
    eof: bool,
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
    conn: Mutex<Connection>,
    tx: Mutex<Vec<u8>>,
    rx: Mutex<Rx>,
    failure: Mutex<Failure>,
    failed: Condvar,
}

impl fmt::Debug for TlsChannel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsChannel")
            .field("fd", &self.sock.as_raw_fd())
            .finish()
    }
}

fn tls_io_error(e: rustls::Error) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e)
}

fn set_timeouts(sock: &File, t: Option<Duration>) -> Result<(), TlsError> {
    let s = socket2::SockRef::from(sock);
    s.set_read_timeout(t).map_err(TlsError::Timeout)?;
    s.set_write_timeout(t).map_err(TlsError::Timeout)
}

impl TlsChannel {
    fn handshake(
        sock: OwnedFd,
        mut conn: Connection,
        cancelled: &dyn Fn() -> bool,
    ) -> Result<Arc<Self>, TlsError> {
        let sock = File::from(sock);
        // Socket I/O in short slices, to look at the cancel and the deadline between them (a
        // timed-out read or write has consumed nothing: the handshake goes on where it was).
        set_timeouts(&sock, Some(CANCEL_POLL))?;
        let deadline = std::time::Instant::now() + HANDSHAKE_TIMEOUT;
        while conn.is_handshaking() {
            let r = match conn.complete_io(&mut &sock) {
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) && std::time::Instant::now() < deadline =>
                {
                    if cancelled() {
                        return Err(TlsError::Cancelled);
                    }
                    continue;
                }
                r => r,
            };
            if let Err(e) = r {
                // Tell the peer why (an alert rustls queued), best effort.
                let _ = conn.write_tls(&mut &sock);
                let e = match e.kind() {
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => io::Error::new(
                        io::ErrorKind::TimedOut,
                        format!("no answer within {} s", HANDSHAKE_TIMEOUT.as_secs()),
                    ),
                    io::ErrorKind::UnexpectedEof => io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "the peer closed the connection (a plaintext peer, or one that refused \
                         this side's certificate)",
                    ),
                    _ => e,
                };
                return Err(TlsError::Handshake(e));
            }
        }
        // Whatever the handshake left to send (the client's Finished goes with complete_io).
        while conn.wants_write() {
            conn.write_tls(&mut &sock).map_err(TlsError::Handshake)?;
        }
        set_timeouts(&sock, None)?;
        conn.set_buffer_limit(Some(2 * SEND_BATCH));
        Ok(Arc::new(Self {
            sock,
            conn: Mutex::new(conn),
            tx: Mutex::new(Vec::with_capacity(SEND_BATCH + (SEND_BATCH >> 4))),
            rx: Mutex::new(Rx {
                buf: vec![0u8; 256 << 10].into_boxed_slice(),
                pos: 0,
                len: 0,
                eof: false,
            }),
            failure: Mutex::new(Failure::default()),
            failed: Condvar::new(),
        }))
    }

    /// The socket's descriptor (to shut it down, poll it).
    pub fn raw_fd(&self) -> RawFd {
        self.sock.as_raw_fd()
    }

    /// Bounds how long a socket read may wait (`None`: for ever); a read that times out is
    /// an error and consumes nothing.
    pub fn set_read_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        socket2::SockRef::from(&self.sock).set_read_timeout(t)
    }

    /// Seals `bufs` and writes the records; returns how much plaintext was taken (all of it
    /// unless the socket fails). The slices (4 KiB pages, mostly) are handed to rustls in
    /// groups of up to [`SEND_BATCH`] bytes, which it seals into full 16 KiB records across
    /// slice boundaries; each group's records leave in one socket write. (Slice by slice, a
    /// page would be a record of its own and a system call of its own: 4 times the records,
    /// 256 times the writes.)
    fn write_plain(&self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        let mut tx = lock(&self.tx);
        let (mut i, mut off, mut total) = (0usize, 0usize, 0usize);
        let mut group: Vec<IoSlice<'_>> = Vec::new();
        while i < bufs.len() {
            group.clear();
            let (mut gi, mut goff, mut glen) = (i, off, 0usize);
            while gi < bufs.len() && glen < SEND_BATCH {
                let rest = &bufs[gi][goff..];
                let take = rest.len().min(SEND_BATCH - glen);
                if take > 0 {
                    group.push(IoSlice::new(&rest[..take]));
                }
                glen += take;
                if take == rest.len() {
                    gi += 1;
                    goff = 0;
                } else {
                    goff += take;
                }
            }
            if glen == 0 {
                break;
            }
            let n = {
                let mut conn = lock(&self.conn);
                let n = conn.writer().write_vectored(&group)?;
                if n == 0 {
                    return Err(io::Error::new(
                        io::ErrorKind::WriteZero,
                        "the TLS session took no data",
                    ));
                }
                tx.clear();
                while conn.wants_write() {
                    conn.write_tls(&mut *tx)?;
                }
                n
            };
            self.send_sealed(&tx)?;
            total += n;
            // Step past what rustls took.
            let mut left = n;
            while left > 0 {
                let avail = bufs[i].len() - off;
                if left < avail {
                    off += left;
                    left = 0;
                } else {
                    left -= avail;
                    i += 1;
                    off = 0;
                }
            }
            while i < bufs.len() && bufs[i].len() == off {
                i += 1;
                off = 0;
            }
        }
        Ok(total)
    }

    /// Writes sealed records (the caller holds `tx`); a failed write says why the peer went
    /// away if the session knows.
    fn send_sealed(&self, records: &[u8]) -> io::Result<()> {
        if let Err(e) = (&self.sock).write_all(records) {
            return Err(self.explain(e));
        }
        Ok(())
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

    fn drain_nonblocking(&self, rx: &mut Rx) {
        loop {
            // SAFETY: `rx.buf` is valid for writes of its length; the descriptor belongs to
            // `self.sock`, alive for the call. MSG_DONTWAIT never blocks.
            let n = unsafe {
                libc::recv(
                    self.sock.as_raw_fd(),
                    rx.buf.as_mut_ptr().cast(),
                    rx.buf.len(),
                    libc::MSG_DONTWAIT,
                )
            };
            if n <= 0 {
                return;
            }
            let mut conn = lock(&self.conn);
            let mut data = &rx.buf[..n as usize];
            while !data.is_empty() {
                if conn.read_tls(&mut data).is_err() {
                    return;
                }
                match conn.process_new_packets() {
                    Err(e) => {
                        self.fail(e.to_string());
                        return;
                    }
                    Ok(_) => {
                        // Plaintext nobody will read now: drop it so rustls keeps going.
                        let mut sink = [0u8; 4096];
                        while matches!(conn.reader().read(&mut sink), Ok(n) if n > 0) {}
                    }
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

    /// Writes out whatever rustls has queued (alerts, key updates, close_notify).
    fn flush_queued(&self) -> io::Result<()> {
        let mut tx = lock(&self.tx);
        {
            let mut conn = lock(&self.conn);
            tx.clear();
            while conn.wants_write() {
                conn.write_tls(&mut *tx)?;
            }
        }
        if tx.is_empty() {
            return Ok(());
        }
        let records = std::mem::take(&mut *tx);
        let r = self.send_sealed(&records);
        *tx = records;
        r
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

    fn read_inner(&self, out: &mut [u8]) -> io::Result<usize> {
        if out.is_empty() {
            return Ok(0);
        }
        let mut rx = lock(&self.rx);
        loop {
            let mut fed = false;
            let (got, queued) = {
                let mut conn = lock(&self.conn);
                // Records already received may wait for room in rustls' plaintext buffer:
                // decrypt them before reading the socket again.
                conn.process_new_packets().map_err(tls_io_error)?;
                let got = match conn.reader().read(out) {
                    Ok(n) => Some(n),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => None,
                    Err(e) => return Err(e),
                };
                if got.is_none() {
                    if rx.pos < rx.len {
                        let (pos, len) = (rx.pos, rx.len);
                        let mut data = &rx.buf[pos..len];
                        let n = conn.read_tls(&mut data)?;
                        rx.pos += n;
                        fed = true;
                    } else if rx.eof {
                        // Tell rustls the transport ended; a peer gone without close_notify
                        // is an error from its reader.
                        conn.read_tls(&mut &[][..])?;
                        conn.process_new_packets().map_err(tls_io_error)?;
                        return match conn.reader().read(out) {
                            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Err(io::Error::new(
                                io::ErrorKind::UnexpectedEof,
                                "the peer closed the TLS channel",
                            )),
                            r => r,
                        };
                    }
                }
                (got, conn.wants_write())
            };
            if queued {
                // Answers the peer's messages asked for (alerts, key updates).
                self.flush_queued()?;
            }
            if let Some(n) = got {
                return Ok(n);
            }
            if fed {
                // Decrypt what was just handed over (at the top of the loop).
                continue;
            }
            // Nothing buffered: wait for the socket, holding no lock but our own.
            let n = loop {
                match (&self.sock).read(&mut rx.buf) {
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    r => break r?,
                }
            };
            rx.pos = 0;
            rx.len = n;
            rx.eof = n == 0;
        }
    }

    /// Sends close_notify: the peer's reader sees the end of the stream. This side may still
    /// read (TLS 1.3 half-close).
    pub fn close_write(&self) -> io::Result<()> {
        lock(&self.conn).send_close_notify();
        self.flush_queued()
    }
}

impl Drop for TlsChannel {
    /// The last holder is done: tell the peer the stream ended cleanly (close_notify), if the
    /// socket takes it at once (a channel shut down or stalled is just closed).
    fn drop(&mut self) {
        let conn = self.conn.get_mut().unwrap_or_else(|e| e.into_inner());
        conn.send_close_notify();
        let mut records = Vec::new();
        while conn.wants_write() {
            if conn.write_tls(&mut records).is_err() {
                return;
            }
        }
        // SAFETY: `records` is valid for reads of its length; the descriptor belongs to
        // `self.sock`, still open. MSG_DONTWAIT never blocks; MSG_NOSIGNAL avoids SIGPIPE.
        unsafe {
            libc::send(
                self.sock.as_raw_fd(),
                records.as_ptr().cast(),
                records.len(),
                libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
            )
        };
    }
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
            let mut p =
                CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>())
                    .unwrap();
            p.distinguished_name
                .push(DnType::CommonName, names.first().copied().unwrap_or("x"));
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

        /// Writes a source's directory (CA + client cert).
        pub fn client_dir(&self, dir: &Path, expired: bool) {
            std::fs::create_dir_all(dir).unwrap();
            let (c, k) = self.leaf(&["source"], expired);
            std::fs::write(dir.join("ca-cert.pem"), self.cert.pem()).unwrap();
            std::fs::write(dir.join("client-cert.pem"), c).unwrap();
            std::fs::write(dir.join("client-key.pem"), k).unwrap();
        }
    }
}
