//! TLS for the NBD frontend (the protocol's STARTTLS), with OpenSSL: pre-shared keys as
//! qemu and libnbd speak them (a GnuTLS `psktool` file of `identity:hexkey` lines), and X.509
//! from a directory laid out as qemu's and nbdkit's are (`server-cert.pem`, `server-key.pem`,
//! and `ca-cert.pem` to require and check client certificates). TLS 1.3 only: every NBD
//! client with TLS speaks it, and it has no weak cipher suites to rule out.
//!
//! rustls has no pre-shared keys, which is what NBD clients use most, hence OpenSSL.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use openssl::ssl::{SslAcceptor, SslFiletype, SslMethod, SslVerifyMode, SslVersion};

/// Where the NBD server's TLS credentials are, as given by an operator.
#[derive(Debug, Clone, Default)]
pub struct TlsFiles {
    /// A GnuTLS PSK file: one `identity:hexkey` per line.
    pub psk_file: Option<PathBuf>,
    /// A directory with `server-cert.pem` and `server-key.pem` (and `ca-cert.pem` to require
    /// client certificates signed by it).
    pub x509_dir: Option<PathBuf>,
}

impl TlsFiles {
    pub fn any(&self) -> bool {
        self.psk_file.is_some() || self.x509_dir.is_some()
    }
}

/// A TLS server configuration, ready to accept handshakes.
pub struct NbdTls {
    acceptor: SslAcceptor,
    /// What credentials it takes, for logs.
    pub describe: String,
    /// Every client that completes a handshake has proven who it is (a PSK, or a certificate
    /// the CA signed). False with X.509 and no `ca-cert.pem`: TLS then only hides the data.
    pub authenticates_clients: bool,
}

impl std::fmt::Debug for NbdTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "NbdTls({})", self.describe)
    }
}

/// Read a PSK file (`identity:hexkey` lines, `#` comments and blank lines ignored). Every error
/// names the file and the line.
pub fn read_psk_file(path: &Path) -> Result<HashMap<String, Vec<u8>>, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read the PSK file {}: {e}", path.display()))?;
    let mut keys = HashMap::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let at = || format!("{} line {}", path.display(), i + 1);
        let Some((id, hex)) = line.split_once(':') else {
            return Err(format!(
                "{}: expected IDENTITY:HEXKEY (make one with `psktool -u NAME -p FILE`)",
                at()
            ));
        };
        if id.is_empty() {
            return Err(format!("{}: the identity is empty", at()));
        }
        let key = decode_hex(hex).ok_or_else(|| format!("{}: the key is not hex digits", at()))?;
        if key.len() < 16 || key.len() > 256 {
            return Err(format!(
                "{}: the key has {} bytes; use 16 to 256 (psktool makes 32)",
                at(),
                key.len()
            ));
        }
        if keys.insert(id.to_owned(), key).is_some() {
            return Err(format!("{}: identity {id:?} is given twice", at()));
        }
    }
    if keys.is_empty() {
        return Err(format!(
            "the PSK file {} holds no key (make one with `psktool -u NAME -p FILE`)",
            path.display()
        ));
    }
    Ok(keys)
}

fn decode_hex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

impl NbdTls {
    /// Build the server configuration from the operator's files; errors name the file.
    pub fn load(files: &TlsFiles) -> Result<Arc<NbdTls>, String> {
        let ssl_err = |what: &str, e: openssl::error::ErrorStack| format!("{what}: {e}");
        let mut b = SslAcceptor::mozilla_modern_v5(SslMethod::tls_server())
            .map_err(|e| ssl_err("setting up TLS", e))?;
        b.set_min_proto_version(Some(SslVersion::TLS1_3))
            .map_err(|e| ssl_err("setting up TLS", e))?;
        // AES-GCM first and by the server's choice: every x86 and ARM server has AES in
        // hardware. A PSK's binder is SHA-256, so AES-256-GCM-SHA384 cannot be used with it,
        // and GnuTLS clients then prefer ChaCha20, which costs them 4× as much CPU.
        b.set_ciphersuites(
            "TLS_AES_128_GCM_SHA256:TLS_AES_256_GCM_SHA384:TLS_CHACHA20_POLY1305_SHA256",
        )
        .map_err(|e| ssl_err("setting up TLS", e))?;
        b.set_options(openssl::ssl::SslOptions::CIPHER_SERVER_PREFERENCE);
        let mut describe = Vec::new();
        let mut authenticates_clients = true;
        if let Some(dir) = &files.x509_dir {
            let cert = dir.join("server-cert.pem");
            let key = dir.join("server-key.pem");
            b.set_certificate_chain_file(&cert)
                .map_err(|e| ssl_err(&format!("reading {}", cert.display()), e))?;
            b.set_private_key_file(&key, SslFiletype::PEM)
                .map_err(|e| ssl_err(&format!("reading {}", key.display()), e))?;
            b.check_private_key().map_err(|e| {
                ssl_err(
                    &format!("{} does not match {}", key.display(), cert.display()),
                    e,
                )
            })?;
            let ca = dir.join("ca-cert.pem");
            let has_ca = ca
                .try_exists()
                .map_err(|e| format!("cannot look for {}: {e}", ca.display()))?;
            authenticates_clients = has_ca;
            if has_ca {
                b.set_ca_file(&ca)
                    .map_err(|e| ssl_err(&format!("reading {}", ca.display()), e))?;
                b.set_verify(SslVerifyMode::PEER | SslVerifyMode::FAIL_IF_NO_PEER_CERT);
                describe.push(format!(
                    "X.509 from {} with client certificates",
                    dir.display()
                ));
            } else {
                b.set_verify(SslVerifyMode::NONE);
                describe.push(format!(
                    "X.509 from {} without client certificates (no ca-cert.pem)",
                    dir.display()
                ));
            }
        }
        if let Some(path) = &files.psk_file {
            let keys = read_psk_file(path)?;
            describe.push(format!(
                "PSK from {} ({} identities)",
                path.display(),
                keys.len()
            ));
            b.set_psk_server_callback(move |_ssl, identity, out| {
                let key = identity
                    .and_then(|id| std::str::from_utf8(id).ok())
                    .and_then(|id| keys.get(id));
                match key {
                    Some(k) if k.len() <= out.len() => {
                        out[..k.len()].copy_from_slice(k);
                        Ok(k.len())
                    }
                    // Zero: no key, the handshake fails.
                    _ => Ok(0),
                }
            });
        }
        if describe.is_empty() {
            return Err("TLS needs a PSK file or an X.509 directory".into());
        }
        Ok(Arc::new(NbdTls {
            acceptor: b.build(),
            describe: describe.join(" and "),
            authenticates_clients,
        }))
    }

    /// A new server session for one connection.
    pub fn session(&self) -> Result<openssl::ssl::Ssl, String> {
        openssl::ssl::Ssl::new(self.acceptor.context()).map_err(|e| format!("TLS session: {e}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn psk_files_are_read_and_bad_ones_named() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("keys.psk");
        std::fs::write(
            &p,
            "# comment\n\nalice:00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff\n",
        )
        .unwrap();
        let k = read_psk_file(&p).unwrap();
        assert_eq!(k["alice"].len(), 32);
        for (text, want) in [
            ("alice\n", "IDENTITY:HEXKEY"),
            ("alice:xyz0\n", "not hex"),
            ("alice:0011\n", "2 bytes"),
            (":00112233445566778899aabbccddeeff\n", "identity is empty"),
            ("", "holds no key"),
            (
                "a:00112233445566778899aabbccddeeff\na:00112233445566778899aabbccddeeff\n",
                "twice",
            ),
        ] {
            std::fs::write(&p, text).unwrap();
            let e = read_psk_file(&p).unwrap_err();
            assert!(e.contains(want) && e.contains("keys.psk"), "{text:?}: {e}");
        }
        assert!(read_psk_file(&dir.path().join("nope")).is_err());
    }
}
