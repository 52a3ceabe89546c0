//! The data protocol's mutual authentication (version 7): challenge–response over the cluster
//! secret, which never crosses the wire.
//!
//! 1. The engine sends its [`crate::data::Hello`] with a fresh random nonce (`Nc`, 32 bytes) in
//!    place of a secret.
//! 2. The replica server answers with a [`Challenge`]: its own fresh nonce `Ns` and
//!    `server_proof = HMAC-SHA256(secret, "zebu-server" ‖ hello ‖ Ns)`, where `hello` is the
//!    Hello's bytes exactly as sent (so every field, the epoch included, is bound).
//! 3. The engine checks the server's proof (a peer that does not know the secret is refused
//!    before anything is sent on), then answers with a [`Proof`]:
//!    `client_proof = HMAC-SHA256(secret, "zebu-client" ‖ hello ‖ Ns ‖ server_proof)`.
//! 4. The server checks it, and only then looks at the Hello's request (and records a new
//!    epoch): a recorded handshake replayed meets a new `Ns` and is refused.
//!
//! Refusals before the proof (a wrong version, no secret set) come as a Welcome.
//!
//! Over TLS (the first byte the engine sends is a TLS handshake record instead of the Hello's
//! magic), both proofs also cover the TLS session's channel binding: [`BINDING_BYTES`] bytes
//! exported from it with [`EXPORTER_LABEL`] (RFC 5705/8446 exporters, as RFC 9266's
//! `tls-exporter`), appended after `Ns`. Certificates are not checked: someone in the middle
//! would hold two TLS sessions with two different bindings, and without the secret could not
//! make a proof for either, so the handshake fails before anything but the Hello was sent.

use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::data::FrameError;

pub const NONCE_BYTES: usize = 32;
pub const PROOF_BYTES: usize = 32;
/// First bytes of a [`Challenge`].
pub const CHALLENGE_MAGIC: [u8; 8] = *b"ZEBUCHAL";
/// First bytes of a [`Proof`].
pub const PROOF_MAGIC: [u8; 8] = *b"ZEBUPROF";
/// A challenge on the wire: magic, nonce, proof, CRC32C of what precedes it.
pub const CHALLENGE_FRAME_BYTES: usize = 8 + NONCE_BYTES + PROOF_BYTES + 4;
/// A proof on the wire: magic, proof, CRC32C.
pub const PROOF_FRAME_BYTES: usize = 8 + PROOF_BYTES + 4;
/// The TLS exporter label of the channel binding, and its length.
pub const EXPORTER_LABEL: &[u8] = b"EXPORTER-zebu-data-channel-binding";
pub const BINDING_BYTES: usize = 32;

fn mac(secret: &str, label: &[u8], parts: &[&[u8]]) -> [u8; PROOF_BYTES] {
    let mut m = <Hmac<Sha256> as Mac>::new_from_slice(secret.as_bytes())
        .expect("invariant: HMAC takes a key of any length");
    m.update(label);
    for p in parts {
        m.update(p);
    }
    m.finalize().into_bytes().into()
}

/// What the server sends to prove it knows the secret. `binding` is the TLS channel binding
/// (empty on plain TCP).
pub fn server_proof(
    secret: &str,
    hello: &[u8],
    server_nonce: &[u8; NONCE_BYTES],
    binding: &[u8],
) -> [u8; PROOF_BYTES] {
    mac(secret, b"zebu-server", &[hello, server_nonce, binding])
}

/// What the engine sends to prove it knows the secret. `binding` as in [`server_proof`].
pub fn client_proof(
    secret: &str,
    hello: &[u8],
    server_nonce: &[u8; NONCE_BYTES],
    server_proof: &[u8; PROOF_BYTES],
    binding: &[u8],
) -> [u8; PROOF_BYTES] {
    mac(
        secret,
        b"zebu-client",
        &[hello, server_nonce, binding, server_proof],
    )
}

/// Compare two proofs in constant time.
pub fn proofs_equal(a: &[u8; PROOF_BYTES], b: &[u8; PROOF_BYTES]) -> bool {
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Challenge {
    pub nonce: [u8; NONCE_BYTES],
    pub proof: [u8; PROOF_BYTES],
}

impl Challenge {
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(CHALLENGE_FRAME_BYTES);
        out.extend_from_slice(&CHALLENGE_MAGIC);
        out.extend_from_slice(&self.nonce);
        out.extend_from_slice(&self.proof);
        let crc = crate::crc32c(&out);
        out.extend_from_slice(&crc.to_le_bytes());
        out
    }

    pub fn decode(b: &[u8]) -> Result<Challenge, FrameError> {
        let body = checked(b, CHALLENGE_FRAME_BYTES, &CHALLENGE_MAGIC)?;
        Ok(Challenge {
            nonce: body[..NONCE_BYTES].try_into().expect("length checked"),
            proof: body[NONCE_BYTES..].try_into().expect("length checked"),
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Proof {
    pub proof: [u8; PROOF_BYTES],
}

impl Proof {
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(PROOF_FRAME_BYTES);
        out.extend_from_slice(&PROOF_MAGIC);
        out.extend_from_slice(&self.proof);
        let crc = crate::crc32c(&out);
        out.extend_from_slice(&crc.to_le_bytes());
        out
    }

    pub fn decode(b: &[u8]) -> Result<Proof, FrameError> {
        let body = checked(b, PROOF_FRAME_BYTES, &PROOF_MAGIC)?;
        Ok(Proof {
            proof: body.try_into().expect("length checked"),
        })
    }
}

/// The body of a fixed-size frame after its magic and before its CRC, checked.
fn checked<'a>(b: &'a [u8], len: usize, magic: &[u8; 8]) -> Result<&'a [u8], FrameError> {
    if b.len() != len {
        return Err(FrameError::Truncated);
    }
    if b[..8] != magic[..] {
        return Err(FrameError::BadMagic {
            found: b[..8].to_vec(),
        });
    }
    let crc = u32::from_le_bytes(b[len - 4..].try_into().expect("4 bytes"));
    if crate::crc32c(&b[..len - 4]) != crc {
        return Err(FrameError::BadChecksum);
    }
    Ok(&b[8..len - 4])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proofs_bind_the_secret_the_hello_and_both_nonces() {
        let hello = b"hello bytes";
        let ns = [7u8; NONCE_BYTES];
        let sp = server_proof("s", hello, &ns, &[]);
        assert_ne!(sp, server_proof("t", hello, &ns, &[]));
        assert_ne!(sp, server_proof("s", b"hello byteS", &ns, &[]));
        assert_ne!(sp, server_proof("s", hello, &[8u8; NONCE_BYTES], &[]));
        // Another TLS session (another binding) gets another proof.
        assert_ne!(sp, server_proof("s", hello, &ns, &[1u8; BINDING_BYTES]));
        assert_ne!(
            server_proof("s", hello, &ns, &[1u8; BINDING_BYTES]),
            server_proof("s", hello, &ns, &[2u8; BINDING_BYTES])
        );
        assert_ne!(
            client_proof("s", hello, &ns, &sp, &[1u8; BINDING_BYTES]),
            client_proof("s", hello, &ns, &sp, &[2u8; BINDING_BYTES])
        );
        let cp = client_proof("s", hello, &ns, &sp, &[]);
        assert_ne!(cp, sp, "the two directions differ");
        assert_ne!(cp, client_proof("s", hello, &[8u8; NONCE_BYTES], &sp, &[]));
        assert!(proofs_equal(&cp, &client_proof("s", hello, &ns, &sp, &[])));
    }

    #[test]
    fn frames_round_trip_and_refuse_damage() {
        let c = Challenge {
            nonce: [1; NONCE_BYTES],
            proof: [2; PROOF_BYTES],
        };
        let b = c.encode();
        assert_eq!(b.len(), CHALLENGE_FRAME_BYTES);
        assert_eq!(Challenge::decode(&b).unwrap(), c);
        let mut bad = b.clone();
        bad[20] ^= 1;
        assert_eq!(Challenge::decode(&bad), Err(FrameError::BadChecksum));
        let p = Proof {
            proof: [3; PROOF_BYTES],
        };
        let b = p.encode();
        assert_eq!(Proof::decode(&b).unwrap(), p);
        assert!(Proof::decode(&b[..10]).is_err());
    }
}
