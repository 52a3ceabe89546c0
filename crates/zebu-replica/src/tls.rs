//! TLS on the data protocol, server side (rustls).
//!
//! An engine that wants TLS starts the connection with a TLS ClientHello instead of the Hello's
//! magic; the server tells them apart by the first byte (a TLS handshake record is `0x16`). The
//! TLS handshake runs on the agent's runtime ([`tokio_rustls`]); the data protocol's handshake
//! then runs inside it, with both proofs bound to the session (`zebu_proto::auth`), so the
//! server's certificate is a throwaway, self-signed one made when the server starts: it proves
//! nothing and needs handing out to no one.
//!
//! After the handshake a connection is served by a thread of its own, like a plain one, reading
//! with blocking calls while I/O threads send replies. A TLS session is one state machine for
//! both directions, so [`Duplex`] shares it between a reader and a writer under a lock that is
//! never held across a socket call: the reader takes bytes from the socket first and only then
//! locks the session to decrypt them; the writer encrypts under the lock and sends under a second
//! one (`out`, always taken first), which keeps records in the order they were made.

use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::sync::{Arc, Mutex, MutexGuard};

use rustls::ServerConnection;

/// The first byte of a TLS record that carries a handshake message (RFC 8446, 5.1).
pub const TLS_HANDSHAKE_RECORD: u8 = 0x16;

/// The cryptography both ends use: ring's, with AES-128-GCM first (on these machines a third
/// cheaper than AES-256-GCM, rustls' first choice, and as safe for this use).
pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    use rustls::crypto::ring::cipher_suite::*;
    Arc::new(rustls::crypto::CryptoProvider {
        cipher_suites: vec![
            TLS13_AES_128_GCM_SHA256,
            TLS13_AES_256_GCM_SHA384,
            TLS13_CHACHA20_POLY1305_SHA256,
        ],
        ..rustls::crypto::ring::default_provider()
    })
}

/// The server's TLS configuration: TLS 1.3, a self-signed certificate of its own, no client
/// certificates (engines prove themselves by the challenge–response inside the session).
pub fn server_config() -> Result<Arc<rustls::ServerConfig>, String> {
    let key = rcgen::generate_simple_self_signed(vec!["zebu-data".to_owned()])
        .map_err(|e| format!("making the data server's TLS certificate: {e}"))?;
    let cert = key.cert.der().clone();
    let private = rustls::pki_types::PrivateKeyDer::Pkcs8(key.key_pair.serialize_der().into());
    let mut config = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| format!("setting up TLS: {e}"))?
        .with_no_client_auth()
        .with_single_cert(vec![cert], private)
        .map_err(|e| format!("setting up TLS: {e}"))?;
    // Sessions are never resumed: every connection proves itself from the start.
    config.send_tls13_tickets = 0;
    config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    Ok(Arc::new(config))
}

struct Out {
    socket: TcpStream,
    /// Records made but not sent yet (reused between writes).
    scratch: Vec<u8>,
}

struct Shared {
    session: Mutex<ServerConnection>,
    out: Mutex<Out>,
}

impl Shared {
    fn session(&self) -> MutexGuard<'_, ServerConnection> {
        self.session.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Send every record the session has made. `out` is taken before the session, as by every
    /// sender, so records reach the socket in the order they were made.
    fn send_pending(&self, out: &mut Out) -> io::Result<()> {
        {
            let mut s = self.session();
            while s.wants_write() {
                s.write_tls(&mut out.scratch)?;
            }
        }
        let r = out.socket.write_all(&out.scratch);
        out.scratch.clear();
        r
    }
}

/// A TLS session over a blocking socket, readable by one thread while others write.
pub struct Duplex;

impl Duplex {
    /// Split a session whose handshake is done (with any bytes it has already taken from the
    /// socket) into its reading and writing sides.
    pub fn split(
        socket: TcpStream,
        session: ServerConnection,
    ) -> io::Result<(TlsReader, TlsWriter)> {
        let out = socket.try_clone()?;
        let shared = Arc::new(Shared {
            session: Mutex::new(session),
            out: Mutex::new(Out {
                socket: out,
                scratch: Vec::new(),
            }),
        });
        Ok((
            TlsReader {
                socket,
                shared: shared.clone(),
                cipher: vec![0; 256 * 1024],
                start: 0,
                end: 0,
            },
            TlsWriter { shared },
        ))
    }
}

impl TlsReader {
    /// The socket under the session.
    pub fn socket(&self) -> &TcpStream {
        &self.socket
    }
}

/// The reading side: blocking reads of plaintext.
pub struct TlsReader {
    socket: TcpStream,
    shared: Arc<Shared>,
    /// Bytes from the socket not given to the session yet: `cipher[start..end]`.
    cipher: Vec<u8>,
    start: usize,
    end: usize,
}

impl Read for TlsReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        loop {
            let mut reply_needed = false;
            let mut fed = false;
            {
                let mut s = self.shared.session();
                match s.reader().read(buf) {
                    // 0: the peer closed the session cleanly.
                    Ok(n) => return Ok(n),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) => return Err(e),
                }
                if self.start < self.end {
                    let mut rest = &self.cipher[self.start..self.end];
                    let taken = s.read_tls(&mut rest)?;
                    self.start += taken;
                    fed = true;
                    if let Err(e) = s.process_new_packets() {
                        // Tell the peer why (the alert rustls queued), then give up.
                        drop(s);
                        let mut out = self.shared.out.lock().unwrap_or_else(|p| p.into_inner());
                        let _ = self.shared.send_pending(&mut out);
                        return Err(io::Error::new(io::ErrorKind::InvalidData, e));
                    }
                    // The session may have to answer (a key update, an alert).
                    reply_needed = s.wants_write();
                }
            }
            if reply_needed {
                let mut out = self.shared.out.lock().unwrap_or_else(|p| p.into_inner());
                self.shared.send_pending(&mut out)?;
                continue;
            }
            if fed {
                // What it decrypted is read at the top of the loop.
                continue;
            }
            // Nothing left to decrypt: wait for the peer, without holding the session.
            let n = self.socket.read(&mut self.cipher)?;
            self.start = 0;
            self.end = n;

            if self.end == 0 {
                // The socket's end: the session reports a clean close or a truncation.
                let mut s = self.shared.session();
                s.read_tls(&mut &[][..])?;
                return match s.reader().read(buf) {
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        Err(io::ErrorKind::UnexpectedEof.into())
                    }
                    other => other,
                };
            }
        }
    }
}

/// The writing side: plaintext in, records out on the socket.
pub struct TlsWriter {
    shared: Arc<Shared>,
}

impl TlsWriter {
    /// Close the socket both ways (what a failed send does, so the reader ends too).
    pub fn shutdown(&self) {
        let out = self.shared.out.lock().unwrap_or_else(|p| p.into_inner());
        let _ = out.socket.shutdown(std::net::Shutdown::Both);
    }
}

impl Write for TlsWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let mut out = self.shared.out.lock().unwrap_or_else(|p| p.into_inner());
        let n = self.shared.session().writer().write(buf)?;
        self.shared.send_pending(&mut out)?;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        // Every write sends its records before it returns.
        Ok(())
    }
}
