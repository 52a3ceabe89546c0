//! Data-protocol client: one TCP connection from an engine to one replica, pipelined.
//!
//! Callers get a future per request; each request writes its own frame (see [`crate::sender`]:
//! straight from the caller's task when the socket is idle, queued in order otherwise) and a
//! reader task matches replies to requests by id. When the
//! connection breaks, every request in flight fails at once with `Disconnected`, and so does
//! every later one: a client is never reconnected (a replica that went away must be rebuilt).
//!
//! With `tls`, the connection is a TLS session (rustls, TLS 1.3) and the handshake's proofs are
//! bound to it (`zebu_proto::auth`); frames then go out through a [`crate::pipe`], since a TLS
//! stream cannot be written by many request tasks at once.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::pipe::{Pipe, Writer};
use crate::sender::Sender;
use bytes::Bytes;
use thiserror::Error;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::tcp::OwnedWriteHalf;
use tokio::net::TcpStream;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use zebu_proto::data::{
    Hello, Op, ReplyHeader, RequestHeader, Status, Welcome, WelcomeStatus, PROTOCOL_VERSION,
    REPLY_HEADER_BYTES, WELCOME_FIXED_BYTES,
};

#[derive(Debug, Error, Clone)]
pub enum ClientError {
    #[error("cannot connect to replica {replica} at {address}: {reason}")]
    Connect {
        replica: String,
        address: String,
        reason: String,
    },
    #[error("replica {replica} refused the handshake ({status:?}): {message}")]
    Refused {
        replica: String,
        status: WelcomeStatus,
        message: String,
    },
    #[error("connection to replica {replica} is closed: {reason}")]
    Disconnected { replica: String, reason: String },
    #[error("replica {replica} did not answer {op:?} within {timeout_ms} ms")]
    Timeout {
        replica: String,
        op: Op,
        timeout_ms: u64,
    },
    #[error("replica {replica} answered {op:?} with {status:?}: {message}")]
    Failed {
        replica: String,
        op: Op,
        status: Status,
        message: String,
    },
}

impl ClientError {
    /// True when the replica itself reported that the request was invalid (a caller bug or bad
    /// input), as opposed to the replica or its connection failing.
    pub fn is_invalid_request(&self) -> bool {
        matches!(
            self,
            ClientError::Failed {
                status: Status::Invalid,
                ..
            }
        )
    }
}

/// One request of the data protocol, as the engine issues it to any replica backend.
#[derive(Debug, Clone)]
pub struct Call {
    pub op: Op,
    /// `FLAG_*` bits.
    pub flags: u8,
    /// Byte offset in the volume (for SET_GENERATION: the new generation).
    pub offset: u64,
    /// Bytes of the range (a WRITE's payload length).
    pub length: u32,
    /// A WRITE's data.
    pub payload: Option<Bytes>,
    /// The payload's CRC32C, when already known: computed once per request, not per replica.
    pub payload_crc: Option<u32>,
}

impl Call {
    /// A request without flags or payload.
    pub fn new(op: Op, offset: u64, length: u32) -> Call {
        Call {
            op,
            flags: 0,
            offset,
            length,
            payload: None,
            payload_crc: None,
        }
    }

    /// Compute the payload's CRC32C now, so that copies of this call sent to several replicas
    /// share it.
    pub fn with_payload_crc(mut self) -> Call {
        if let (Some(p), None) = (&self.payload, self.payload_crc) {
            self.payload_crc = Some(crc32c::crc32c(p));
        }
        self
    }

    /// The error a replica's failure status turns into, for this call.
    pub fn failed(&self, replica: &str, status: Status, message: String) -> ClientError {
        ClientError::Failed {
            replica: replica.to_owned(),
            op: self.op,
            status,
            message,
        }
    }
}

/// How a request in flight ends, as the reader task reports it.
type Outcome = Result<Bytes, (Status, String)>;

/// What the caller side and the two connection tasks share.
struct Conn {
    replica: String,
    pending: Mutex<HashMap<u64, oneshot::Sender<Outcome>>>,
    closed: AtomicBool,
    close_reason: Mutex<String>,
}

impl Conn {
    fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    fn disconnected(&self) -> ClientError {
        ClientError::Disconnected {
            replica: self.replica.clone(),
            reason: self
                .close_reason
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone(),
        }
    }

    fn take(&self, id: u64) -> Option<oneshot::Sender<Outcome>> {
        self.pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&id)
    }

    /// The connection is gone: remember why, and fail every request in flight (dropping their
    /// senders makes each waiter report `disconnected`).
    fn fail_all(&self, reason: String) {
        {
            let mut r = self.close_reason.lock().unwrap_or_else(|p| p.into_inner());
            if r.is_empty() {
                *r = reason;
            }
        }
        self.closed.store(true, Ordering::Release);
        self.pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
    }
}

/// The sending side of a connection.
enum Link {
    Plain(Sender<OwnedWriteHalf>),
    /// The pipe's writer task ends with the client.
    Tls(Sender<Pipe>, #[allow(dead_code)] Writer),
}

impl Link {
    fn send(&self, parts: &[&[u8]], alone: bool) -> Result<(), String> {
        match self {
            Link::Plain(s) => s.send(parts, alone),
            Link::Tls(s, _) => s.send(parts, alone),
        }
    }
}

/// A connected socket, plain or inside a TLS session.
enum Stream {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

/// The TLS configuration of every engine: TLS 1.3, any certificate (see the module docs), no
/// resumption (every connection proves itself from the start).
pub fn tls_config() -> Arc<rustls::ClientConfig> {
    static CONFIG: std::sync::OnceLock<Arc<rustls::ClientConfig>> = std::sync::OnceLock::new();
    CONFIG
        .get_or_init(|| {
            let provider = zebu_replica::tls::provider();
            let verifier = Arc::new(BoundByProof(provider.clone()));
            let mut config = rustls::ClientConfig::builder_with_provider(provider)
                .with_protocol_versions(&[&rustls::version::TLS13])
                .expect("invariant: the ring provider supports TLS 1.3")
                .dangerous()
                .with_custom_certificate_verifier(verifier)
                .with_no_client_auth();
            config.resumption = rustls::client::Resumption::disabled();
            Arc::new(config)
        })
        .clone()
}

/// Accepts the server's certificate whatever it is (the server's is a throwaway, made when it
/// starts), but checks that the server holds its key: who the server is, the challenge–response
/// bound to the session proves.
#[derive(Debug)]
struct BoundByProof(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for BoundByProof {
    fn verify_server_cert(
        &self,
        _end_entity: &rustls::pki_types::CertificateDer<'_>,
        _intermediates: &[rustls::pki_types::CertificateDer<'_>],
        _server_name: &rustls::pki_types::ServerName<'_>,
        _ocsp_response: &[u8],
        _now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &rustls::pki_types::CertificateDer<'_>,
        _dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::PeerIncompatible(
            rustls::PeerIncompatible::Tls12NotOffered,
        ))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
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

/// The engine's side of the data protocol's handshake (see `zebu_proto::auth`), on a plain
/// socket or inside a TLS session whose channel binding is `binding`.
async fn exchange<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    hello_bytes: &[u8],
    secret: &str,
    binding: &[u8],
) -> Result<Welcome, String> {
    s.write_all(hello_bytes).await.map_err(|e| e.to_string())?;
    s.flush().await.map_err(|e| e.to_string())?;
    // A challenge (the server proves it knows the secret, then we do), or a refusal.
    let mut magic = [0u8; 8];
    s.read_exact(&mut magic)
        .await
        .map_err(|e| format!("reading the challenge: {e}"))?;
    // Only a server that proved it holds the secret may welcome us; a refusal may come
    // without a proof.
    let mut proven = false;
    if magic == zebu_proto::auth::CHALLENGE_MAGIC {
        use zebu_proto::auth::*;
        let mut b = [0u8; CHALLENGE_FRAME_BYTES];
        b[..8].copy_from_slice(&magic);
        s.read_exact(&mut b[8..])
            .await
            .map_err(|e| format!("reading the challenge: {e}"))?;
        let c = Challenge::decode(&b).map_err(|e| e.to_string())?;
        if !proofs_equal(
            &c.proof,
            &server_proof(secret, hello_bytes, &c.nonce, binding),
        ) {
            return Err(
                "the replica server could not prove it holds this cluster's secret (another cluster's node, or not a Zebu node): nothing was sent to it".into(),
            );
        }
        let p = Proof {
            proof: client_proof(secret, hello_bytes, &c.nonce, &c.proof, binding),
        };
        s.write_all(&p.encode()).await.map_err(|e| e.to_string())?;
        s.flush().await.map_err(|e| e.to_string())?;
        proven = true;
        s.read_exact(&mut magic)
            .await
            .map_err(|e| format!("reading welcome: {e}"))?;
    }
    let mut fixed = [0u8; WELCOME_FIXED_BYTES];
    fixed[..8].copy_from_slice(&magic);
    s.read_exact(&mut fixed[8..])
        .await
        .map_err(|e| format!("reading welcome: {e}"))?;
    let rest = Welcome::rest_len(&fixed).map_err(|e| e.to_string())?;
    let mut bytes = fixed.to_vec();
    bytes.resize(WELCOME_FIXED_BYTES + rest, 0);
    s.read_exact(&mut bytes[WELCOME_FIXED_BYTES..])
        .await
        .map_err(|e| format!("reading welcome: {e}"))?;
    let w = Welcome::decode(&bytes).map_err(|e| e.to_string())?;
    if w.status == WelcomeStatus::Ok && !proven {
        return Err(
            "the replica server welcomed us without proving it holds this cluster's secret (not a Zebu node of this cluster, or something in between): refused".into(),
        );
    }
    Ok(w)
}

/// Read replies and hand each to its waiter, until the connection fails; returns why.
async fn read_replies<R: AsyncRead + Unpin>(mut rd: R, conn: &Conn) -> String {
    loop {
        let mut hb = [0u8; REPLY_HEADER_BYTES];
        if let Err(e) = rd.read_exact(&mut hb).await {
            return format!("receive failed: {e}");
        }
        let h = match ReplyHeader::decode(&hb) {
            Ok(h) => h,
            Err(e) => return format!("bad reply: {e}"),
        };
        let payload = match crate::payload::read_payload(&mut rd, h.length as usize).await {
            Ok(p) => p,
            Err(e) => return format!("receive failed: {e}"),
        };
        if !payload.is_empty() && crc32c::crc32c(&payload) != h.payload_crc {
            return "reply payload failed its checksum in transit".to_string();
        }
        // No waiter: the request timed out and was abandoned.
        if let Some(waiter) = conn.take(h.id) {
            let status = Status::from_u32(h.status);
            let _ = waiter.send(if status == Status::Ok {
                Ok(payload)
            } else {
                Err((status, String::from_utf8_lossy(&payload).into_owned()))
            });
        }
    }
}

pub struct ReplicaClient {
    address: String,
    welcome: Welcome,
    sender: Link,
    conn: Arc<Conn>,
    next_id: AtomicU64,
    reader: JoinHandle<()>,
    /// The socket's registration with the poller of the thread it was started on, if any.
    watched: crate::busy_poll::WatchToken,
}

impl Drop for ReplicaClient {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

impl ReplicaClient {
    /// Connect and handshake with the engine's `epoch` (the fence); the replica's generation
    /// (the evidence) is in [`ReplicaClient::welcome`]. With `tls`, inside a TLS session.
    pub async fn connect(
        address: &str,
        volume: &str,
        replica: &str,
        epoch: u64,
        secret: &str,
        tls: bool,
        timeout: Duration,
    ) -> Result<ReplicaClient, ClientError> {
        Self::open(address, volume, replica, epoch, 0, secret, tls, timeout).await
    }

    /// A reader session ([`zebu_proto::data::HELLO_READER`]): it reads the replica's frozen
    /// snapshots and takes no part in its fence, so whichever engine owns the volume (or none)
    /// goes on untouched.
    pub async fn connect_reader(
        address: &str,
        volume: &str,
        replica: &str,
        secret: &str,
        tls: bool,
        timeout: Duration,
    ) -> Result<ReplicaClient, ClientError> {
        let reader = zebu_proto::data::HELLO_READER;
        Self::open(address, volume, replica, 0, reader, secret, tls, timeout).await
    }

    #[allow(clippy::too_many_arguments)]
    async fn open(
        address: &str,
        volume: &str,
        replica: &str,
        epoch: u64,
        flags: u16,
        secret: &str,
        tls: bool,
        timeout: Duration,
    ) -> Result<ReplicaClient, ClientError> {
        let connect_err = |reason: String| ClientError::Connect {
            replica: replica.to_owned(),
            address: address.to_owned(),
            reason,
        };
        let mut nonce = vec![0u8; zebu_proto::auth::NONCE_BYTES];
        rand::RngCore::fill_bytes(&mut rand::thread_rng(), &mut nonce);
        let hello = Hello {
            version: PROTOCOL_VERSION,
            volume: volume.to_owned(),
            replica: replica.to_owned(),
            epoch,
            flags,
            nonce,
        };
        let fut = async {
            let s = TcpStream::connect(address)
                .await
                .map_err(|e| e.to_string())?;
            s.set_nodelay(true).map_err(|e| e.to_string())?;
            let hello_bytes = hello.encode();
            if !tls {
                let mut s = s;
                let w = exchange(&mut s, &hello_bytes, secret, &[]).await?;
                return Ok::<_, String>((Stream::Plain(s), w));
            }
            let name = rustls::pki_types::ServerName::try_from("zebu-data")
                .expect("invariant: a valid DNS name");
            let mut t = tokio_rustls::TlsConnector::from(tls_config())
                .connect(name, s)
                .await
                .map_err(|e| format!("TLS handshake: {e}"))?;
            let mut binding = [0u8; zebu_proto::auth::BINDING_BYTES];
            t.get_ref()
                .1
                .export_keying_material(&mut binding, zebu_proto::auth::EXPORTER_LABEL, None)
                .map_err(|e| format!("TLS channel binding: {e}"))?;
            let w = exchange(&mut t, &hello_bytes, secret, &binding).await?;
            Ok((Stream::Tls(Box::new(t)), w))
        };
        let (stream, welcome) = tokio::time::timeout(timeout, async {
            fut.await.map_err(|e: String| connect_err(e))
        })
        .await
        .map_err(|_| connect_err(format!("no answer within {} ms", timeout.as_millis())))??;
        if welcome.status != WelcomeStatus::Ok {
            return Err(ClientError::Refused {
                replica: replica.to_owned(),
                status: welcome.status,
                message: welcome.message,
            });
        }
        Ok(Self::start(stream, replica, address, welcome))
    }

    fn start(stream: Stream, replica: &str, address: &str, welcome: Welcome) -> ReplicaClient {
        use std::os::fd::AsRawFd;
        // A lane, started on an NBD connection's thread, is polled there before it sleeps (the
        // reader below runs on that thread and keeps the registration).
        let fd = match &stream {
            Stream::Plain(s) => s.as_raw_fd(),
            Stream::Tls(t) => t.get_ref().0.as_raw_fd(),
        };
        let watch = crate::busy_poll::watch(fd);
        let watched = watch.token();
        let conn = Arc::new(Conn {
            replica: replica.to_owned(),
            pending: Mutex::new(HashMap::new()),
            closed: AtomicBool::new(false),
            close_reason: Mutex::new(String::new()),
        });
        // Buffered: one recv usually brings many replies (header and payload together).
        const READ_BUFFER: usize = 256 * 1024;
        let (sender, reader) = match stream {
            Stream::Plain(s) => {
                let (rd, wr) = s.into_split();
                let rd = tokio::io::BufReader::with_capacity(READ_BUFFER, rd);
                let conn = conn.clone();
                let reader = tokio::spawn(async move {
                    let _watch = watch;
                    let why = read_replies(rd, &conn).await;
                    conn.fail_all(why);
                });
                (Link::Plain(Sender::new(wr)), reader)
            }
            Stream::Tls(t) => {
                let (rd, wr) = tokio::io::split(*t);
                let rd = tokio::io::BufReader::with_capacity(READ_BUFFER, rd);
                let conn = conn.clone();
                let reader = tokio::spawn(async move {
                    let _watch = watch;
                    let why = read_replies(rd, &conn).await;
                    conn.fail_all(why);
                });
                let (pipe, writer) = crate::pipe::pipe(wr);
                (Link::Tls(Sender::new(pipe), writer), reader)
            }
        };
        ReplicaClient {
            address: address.to_owned(),
            welcome,
            sender,
            conn,
            next_id: AtomicU64::new(1),
            reader,
            watched,
        }
    }

    pub fn welcome(&self) -> &Welcome {
        &self.welcome
    }
    pub fn replica(&self) -> &str {
        &self.conn.replica
    }
    pub fn address(&self) -> &str {
        &self.address
    }
    pub fn is_closed(&self) -> bool {
        self.conn.is_closed()
    }

    /// Send one request and wait for its reply payload.
    pub async fn call(&self, call: Call, timeout: Duration) -> Result<Bytes, ClientError> {
        // Replies read by another thread's task: the calling thread must not poll meanwhile.
        let _blind = (!self.watched.is_here()).then(crate::busy_poll::blind);
        let conn = &self.conn;
        if conn.is_closed() {
            return Err(conn.disconnected());
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let header = RequestHeader {
            op: call.op,
            flags: call.flags,
            id,
            offset: call.offset,
            length: call.length,
            payload_crc: match (&call.payload, call.payload_crc) {
                (_, Some(crc)) => crc,
                (Some(p), None) => crc32c::crc32c(p),
                (None, None) => 0,
            },
        }
        .encode();
        let (otx, orx) = oneshot::channel();
        let alone = {
            let mut pending = conn.pending.lock().unwrap_or_else(|p| p.into_inner());
            pending.insert(id, otx);
            pending.len() == 1
        };
        // Checked again after registering: a connection that died between the two checks has
        // already drained the map, and this request would wait forever.
        if conn.is_closed() {
            conn.take(id);
            return Err(conn.disconnected());
        }
        let payload = call.payload.as_deref().unwrap_or(&[]);
        if let Err(why) = self.sender.send(&[&header, payload], alone) {
            conn.fail_all(why);
            return Err(conn.disconnected());
        }
        let result = tokio::time::timeout(timeout, async {
            orx.await.map_err(|_| conn.disconnected())
        })
        .await;
        match result {
            Ok(Ok(Ok(b))) => Ok(b),
            Ok(Ok(Err((status, message)))) => Err(call.failed(&conn.replica, status, message)),
            Ok(Err(e)) => Err(e),
            Err(_) => {
                conn.take(id);
                Err(ClientError::Timeout {
                    replica: conn.replica.clone(),
                    op: call.op,
                    timeout_ms: timeout.as_millis() as u64,
                })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A server that skips the challenge and welcomes the engine at once is refused.
    #[tokio::test]
    async fn a_welcome_without_a_proof_is_refused() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap().to_string();
        tokio::spawn(async move {
            let (mut s, _) = l.accept().await.unwrap();
            let mut buf = [0u8; 512];
            let _ = s.read(&mut buf).await;
            let w = Welcome {
                version: PROTOCOL_VERSION,
                status: WelcomeStatus::Ok,
                size_bytes: 1 << 20,
                block_size: 4096,
                generation: 1 << 40,
                message: String::new(),
            };
            let _ = s.write_all(&w.encode()).await;
            tokio::time::sleep(Duration::from_secs(5)).await;
        });
        let r = ReplicaClient::connect(
            &addr,
            "v",
            "v-r-00000000",
            1,
            "secret",
            false,
            Duration::from_secs(3),
        )
        .await;
        let Err(e) = r else {
            panic!("a server without the secret was accepted")
        };
        assert!(e.to_string().contains("without proving"), "{e}");
    }
}
