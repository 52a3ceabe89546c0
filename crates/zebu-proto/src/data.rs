//! The engine ↔ replica data protocol, version 2.
//!
//! A connection starts with a handshake ([`Hello`] from the engine, [`Welcome`] from the replica
//! server) and then carries framed requests and replies. Every request has an id chosen by the
//! client; replies carry the same id and may come back in any order, so many requests are in
//! flight on one connection. Payloads carry a CRC32C. All integers are little-endian and
//! fixed-width. `docs/protocol.md` documents the bytes; this module is the one implementation.

use thiserror::Error;

/// Protocol version spoken by this build (2 added SHARE_SESSION and JOIN_SESSION; 5 added
/// WIL_REBUILD and the rebuild fields of a WIL_READ reply; 6: `NoSpace` means refused with
/// nothing changed, never an ENOSPC after a partial write; 7: the Hello carries a nonce, not the
/// secret, and both ends prove they know the secret by challenge–response, [`crate::auth`]).
pub const PROTOCOL_VERSION: u16 = 7;
/// First bytes of a [`Hello`].
pub const HELLO_MAGIC: [u8; 8] = *b"ZEBUDATA";
/// First bytes of a [`Welcome`].
pub const WELCOME_MAGIC: [u8; 8] = *b"ZEBUWELC";
/// First bytes of every request header.
pub const REQUEST_MAGIC: [u8; 4] = *b"ZBRQ";
/// First bytes of every reply header.
pub const REPLY_MAGIC: [u8; 4] = *b"ZBRP";
/// Size of a request header in bytes.
pub const REQUEST_HEADER_BYTES: usize = 32;
/// Size of a reply header in bytes.
pub const REPLY_HEADER_BYTES: usize = 24;
/// Largest payload either side accepts (a READ or WRITE of at most this many bytes).
pub const MAX_PAYLOAD_BYTES: u32 = 32 << 20;
/// Largest payload of SNAPSHOT, SNAPSHOT_REMOVE and REVERT (a name and labels).
pub const MAX_NAME_PAYLOAD_BYTES: u32 = 64 << 10;
/// The most one READ_SNAPSHOT reads.
pub const MAX_SNAPSHOT_READ_BYTES: u32 = 4 << 20;
/// Longest volume or replica name in a handshake.
pub const MAX_NAME_BYTES: usize = 255;
/// Longest nonce in a handshake (a Hello of this version carries exactly
/// [`crate::auth::NONCE_BYTES`]).
pub const MAX_SECRET_BYTES: usize = 256;
/// Longest error message in a [`Welcome`].
pub const MAX_MESSAGE_BYTES: usize = 4096;

/// Request flag: the write must be on stable storage before the reply (force unit access).
pub const FLAG_FUA: u8 = 1;
/// READ flag (crash resync): a block whose data fails its checksum is taken as it is in the
/// data file and its checksum rewritten (a write torn by a crash: old or new content, both
/// valid), instead of failing the read. Used only on extents the write-intent log marked.
pub const FLAG_ADOPT_TORN: u8 = 2;
/// WIL_SETTLE flag: the listed extents become [`WIL_CHANGED`] (written while a member was
/// away), not [`WIL_CLEAN`].
pub const FLAG_WIL_CHANGED: u8 = 4;
/// WIL_SETTLE flag: applies to every extent that is not clean (the payload is ignored).
pub const FLAG_WIL_ALL: u8 = 8;
/// WIL_SETTLE flag: the replica rejoins by rebuild; `offset` is its generation before the
/// rebuild raised it. Its log covers nothing until it is in sync again; states are untouched.
pub const FLAG_WIL_REJOIN: u8 = 16;

/// Bytes of volume covered by one extent of the write-intent log.
pub const WIL_EXTENT_BYTES: u64 = 4 << 20;
/// Extent state: identical on every member (as far as this replica knows).
pub const WIL_CLEAN: u8 = 0;
/// Extent state: flushed, but written while a member of the volume was away.
pub const WIL_CHANGED: u8 = 1;
/// Extent state: writes may be in flight (a crash may have left the members different).
pub const WIL_DIRTY: u8 = 2;

/// Errors found while decoding bytes from a peer. Every one of them means the peer is broken
/// or hostile; the connection is closed.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum FrameError {
    #[error("bad magic {found:02x?}: the peer does not speak the Zebu data protocol")]
    BadMagic { found: Vec<u8> },
    #[error("unknown op code {0}")]
    UnknownOp(u8),
    #[error("{what} of {len} bytes is over the limit of {max}")]
    TooLong {
        what: &'static str,
        len: usize,
        max: usize,
    },
    #[error("handshake checksum mismatch")]
    BadChecksum,
    #[error("{0} is not valid UTF-8")]
    NotUtf8(&'static str),
    #[error("handshake is truncated")]
    Truncated,
    #[error("reserved field is not zero")]
    Reserved,
    #[error("{0} has bytes after its end")]
    Trailing(&'static str),
}

/// Operations of the data protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Op {
    /// Read `length` bytes at `offset`; the reply payload is the data.
    Read = 1,
    /// Write the payload at `offset`. [`FLAG_FUA`] makes it durable before the reply.
    Write = 2,
    /// Make every write replied to so far durable.
    Flush = 3,
    /// Discard `length` bytes at `offset`; they read back as zeroes.
    Trim = 4,
    /// Write `length` zero bytes at `offset` (the replica may store them as a hole).
    WriteZeroes = 5,
    /// Liveness probe; no payload.
    Ping = 6,
    /// Replica facts: see [`ReplicaInfo`].
    Info = 7,
    /// Durably set the replica's generation to the value in `offset` (must not go down).
    SetGeneration = 8,
    /// Allocation map of `length` bytes at `offset`: see [`MapExtent`].
    Map = 9,
    /// Name this connection's session so other connections can join it: the reply payload is
    /// the session's token (8 bytes, little-endian; the same token every time it is asked).
    ShareSession = 10,
    /// Make this connection part of the session whose token is in `offset` (from
    /// [`Op::ShareSession`] on another connection to the same replica). Connections of one
    /// session are fenced together: a generation raised on one moves them all along. Send it
    /// before any other request on the connection.
    JoinSession = 11,
    /// Write-intent log: durably mark the extents listed in the payload (little-endian u64
    /// extent numbers) [`WIL_DIRTY`] before the reply.
    WilMark = 12,
    /// Write-intent log: settle the listed extents (payload as for [`Op::WilMark`]) to
    /// [`WIL_CLEAN`], or to [`WIL_CHANGED`] with [`FLAG_WIL_CHANGED`]; with [`FLAG_WIL_ALL`],
    /// every extent that is not clean. Settling to clean records `offset` as the generation
    /// from which this replica's log covers every change (see `docs/healing.md`).
    WilSettle = 13,
    /// Write-intent log: `length` extents from extent `offset`. Reply: the generation the log
    /// covers from (u64), whether the page cache is intact since the last mark (u64, 1 or 0),
    /// the generation of a rebuild in progress (u64, `u64::MAX` for none), then one state byte
    /// per extent.
    WilRead = 14,
    /// Write-intent log: record how far a rebuild into this replica got: `offset` is the set's
    /// generation when the copy began, the payload (8 bytes, u64) the offset below which every
    /// byte was copied. The replica syncs its data before it records it. See
    /// `docs/healing.md`, "Resuming an interrupted rebuild".
    WilRebuild = 15,
    /// Take a snapshot: the head becomes the snapshot named in the payload
    /// ([`crate::snapshot::SnapshotRequest`]) and a new, empty head takes the writes. The head
    /// is synced first. Runs alone on the replica (no other operation of any session meanwhile);
    /// refused once the session is stale.
    Snapshot = 16,
    /// Delete the snapshot named in the payload (UTF-8): it is recorded removed, and merged into
    /// its child in the background.
    SnapshotRemove = 17,
    /// The layer tree: reply [`crate::snapshot::LayersReply`].
    Layers = 18,
    /// Make the head's content exactly the snapshot's named in the payload (UTF-8): a new, empty
    /// head over it; the old head's data is dropped. For a detached volume.
    Revert = 19,
    /// Read `read length` bytes at `offset` of the content of the snapshot named in the
    /// payload ([`crate::snapshot::encode_read_snapshot`]); reply: the bytes.
    ReadSnapshot = 20,
    /// What the layers of a snapshot hold above another one, for a rebuild that copies the
    /// tree: the payload ([`crate::snapshot::encode_snapshot_delta`]) names the snapshot, the
    /// base (a snapshot below it on its path, or none: down to the root) and the range's length
    /// (at `offset`). Reply as for [`Op::Map`], each extent flagged [`EXTENT_HOLE`] (no layer
    /// between the base and the snapshot holds it: the base's content decides), [`EXTENT_ZERO`]
    /// (one of them holds it as zeroes) or 0 (one of them holds data: read it through
    /// [`Op::ReadSnapshot`]). An empty name is the live head's (a base named): under the
    /// caller's range lock, what a rebuild copies of the head over the last snapshot.
    SnapshotDelta = 21,
    /// For a rebuild target only: a new, empty head over the snapshot named in the payload
    /// (UTF-8; empty: every layer is dropped, the replica is empty), the old head's data
    /// dropped. `offset` is the generation of the set the caller serves: refused unless this
    /// replica's generation is below it (a replica in sync is never rewound). Its own
    /// write-intent log then has every extent dirty and covers nothing, so only a whole copy
    /// makes it a member again; its generation does not change.
    Rewind = 22,
    /// Grow the replica to `offset` bytes (a multiple of its block size): the new range reads
    /// as zeroes, nothing below the old size changes. Its own size again succeeds and changes
    /// nothing; a smaller one is refused ([`Status::Invalid`]). Runs alone on the replica, like
    /// [`Op::Snapshot`]; refused once the session is stale. No payload.
    Resize = 23,
}

impl Op {
    /// Ops whose request carries `length` bytes of payload after the header.
    pub fn carries_payload(self) -> bool {
        matches!(
            self,
            Op::Write
                | Op::WilMark
                | Op::WilSettle
                | Op::WilRebuild
                | Op::Snapshot
                | Op::SnapshotRemove
                | Op::Revert
                | Op::ReadSnapshot
                | Op::SnapshotDelta
                | Op::Rewind
        )
    }

    /// Ops whose `length` is a byte count of data (a payload or a reply) bounded by
    /// [`MAX_PAYLOAD_BYTES`].
    pub fn length_is_bytes(self) -> bool {
        self.carries_payload() || matches!(self, Op::Read | Op::WilRead)
    }

    pub fn from_u8(v: u8) -> Result<Op, FrameError> {
        Ok(match v {
            1 => Op::Read,
            2 => Op::Write,
            3 => Op::Flush,
            4 => Op::Trim,
            5 => Op::WriteZeroes,
            6 => Op::Ping,
            7 => Op::Info,
            8 => Op::SetGeneration,
            9 => Op::Map,
            10 => Op::ShareSession,
            11 => Op::JoinSession,
            12 => Op::WilMark,
            13 => Op::WilSettle,
            14 => Op::WilRead,
            15 => Op::WilRebuild,
            16 => Op::Snapshot,
            17 => Op::SnapshotRemove,
            18 => Op::Layers,
            19 => Op::Revert,
            20 => Op::ReadSnapshot,
            21 => Op::SnapshotDelta,
            22 => Op::Rewind,
            23 => Op::Resize,
            other => return Err(FrameError::UnknownOp(other)),
        })
    }
}

/// Reply status codes. `Ok` is zero; every other value comes with a UTF-8 message as payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum Status {
    Ok = 0,
    /// The replica's disk failed (EIO, failed fsync...). The replica is no longer trustworthy.
    IoError = 1,
    /// Data on disk did not match its checksum.
    Checksum = 2,
    /// The request is invalid (range past the end, bad alignment, generation going down...).
    Invalid = 3,
    /// The payload did not match its checksum in transit.
    PayloadChecksum = 4,
    /// The op is not supported by this replica.
    Unsupported = 5,
    /// The disk is full.
    NoSpace = 6,
    /// The replica had an earlier fatal error and refuses further I/O.
    Poisoned = 7,
    /// The replica's generation moved past this connection's: another engine took the volume
    /// over. The sender is fenced off and must stop serving the volume.
    Stale = 8,
}

impl Status {
    pub fn from_u32(v: u32) -> Status {
        match v {
            0 => Status::Ok,
            1 => Status::IoError,
            2 => Status::Checksum,
            3 => Status::Invalid,
            4 => Status::PayloadChecksum,
            5 => Status::Unsupported,
            6 => Status::NoSpace,
            7 => Status::Poisoned,
            8 => Status::Stale,
            // An unknown status from a newer peer is still a failure.
            _ => Status::IoError,
        }
    }
}

/// Handshake status codes in a [`Welcome`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum WelcomeStatus {
    Ok = 0,
    BadVersion = 1,
    AuthFailed = 2,
    UnknownReplica = 3,
    VolumeMismatch = 4,
    Malformed = 5,
    /// The replica has accepted a higher epoch: a newer engine owns the volume.
    Fenced = 6,
    /// The replica could not record the epoch (a disk error): it refuses I/O until rebuilt.
    Unavailable = 7,
}

impl WelcomeStatus {
    pub fn from_u32(v: u32) -> WelcomeStatus {
        match v {
            0 => WelcomeStatus::Ok,
            1 => WelcomeStatus::BadVersion,
            2 => WelcomeStatus::AuthFailed,
            3 => WelcomeStatus::UnknownReplica,
            4 => WelcomeStatus::VolumeMismatch,
            6 => WelcomeStatus::Fenced,
            7 => WelcomeStatus::Unavailable,
            _ => WelcomeStatus::Malformed,
        }
    }
}

fn put_u16(out: &mut Vec<u8>, v: u16) {
    out.extend_from_slice(&v.to_le_bytes());
}
fn put_u32(out: &mut Vec<u8>, v: u32) {
    out.extend_from_slice(&v.to_le_bytes());
}
fn put_u64(out: &mut Vec<u8>, v: u64) {
    out.extend_from_slice(&v.to_le_bytes());
}
fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}
fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("slice of 4 bytes"))
}
fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("slice of 8 bytes"))
}

/// The engine's opening message: who it is and which replica it wants.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hello {
    pub version: u16,
    pub volume: String,
    pub replica: String,
    /// The engine's epoch (the fence, issued by the manager per attachment). A replica that has
    /// accepted a higher one refuses the connection (`Fenced`); a higher one than it has is
    /// recorded durably before the Welcome, and fences every session of a lower epoch.
    pub epoch: u64,
    /// `HELLO_*` bits; unknown bits are refused.
    pub flags: u16,
    /// The engine's fresh random nonce for the challenge–response ([`crate::auth`]).
    pub nonce: Vec<u8>,
}

/// A reader session: it reads frozen snapshots only (INFO, PING, LAYERS, READ_SNAPSHOT, and
/// SNAPSHOT_DELTA of a named snapshot) and every other op is refused. It takes part in no
/// fence: the epoch is ignored (neither recorded nor checked), since a frozen layer never
/// changes whoever writes the head. A clone's engine reads its source this way, whether the
/// source is attached elsewhere or detached.
pub const HELLO_READER: u16 = 1;

/// Fixed part of a [`Hello`] before the variable-length fields.
pub const HELLO_FIXED_BYTES: usize = 28;

impl Hello {
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(64 + self.volume.len() + self.replica.len());
        out.extend_from_slice(&HELLO_MAGIC);
        put_u16(&mut out, self.version);
        put_u16(&mut out, self.flags);
        put_u64(&mut out, self.epoch);
        put_u16(&mut out, self.volume.len() as u16);
        put_u16(&mut out, self.replica.len() as u16);
        put_u16(&mut out, self.nonce.len() as u16);
        put_u16(&mut out, 0);
        out.extend_from_slice(self.volume.as_bytes());
        out.extend_from_slice(self.replica.as_bytes());
        out.extend_from_slice(&self.nonce);
        let crc = crate::crc32c(&out);
        put_u32(&mut out, crc);
        out
    }

    /// Length of the variable part plus the trailing CRC, from the fixed part.
    /// The version is not checked here: a peer of another version still gets a clear refusal.
    pub fn rest_len(fixed: &[u8; HELLO_FIXED_BYTES]) -> Result<usize, FrameError> {
        if fixed[0..8] != HELLO_MAGIC {
            return Err(FrameError::BadMagic {
                found: fixed[0..8].to_vec(),
            });
        }
        let v = u16_at(fixed, 20) as usize;
        let r = u16_at(fixed, 22) as usize;
        let s = u16_at(fixed, 24) as usize;
        if v > MAX_NAME_BYTES {
            return Err(FrameError::TooLong {
                what: "volume name",
                len: v,
                max: MAX_NAME_BYTES,
            });
        }
        if r > MAX_NAME_BYTES {
            return Err(FrameError::TooLong {
                what: "replica name",
                len: r,
                max: MAX_NAME_BYTES,
            });
        }
        if s > MAX_SECRET_BYTES {
            return Err(FrameError::TooLong {
                what: "nonce",
                len: s,
                max: MAX_SECRET_BYTES,
            });
        }
        Ok(v + r + s + 4)
    }

    /// Decode a whole hello (fixed part followed by the `rest_len` bytes).
    pub fn decode(bytes: &[u8]) -> Result<Hello, FrameError> {
        if bytes.len() < HELLO_FIXED_BYTES + 4 {
            return Err(FrameError::Truncated);
        }
        let fixed: &[u8; HELLO_FIXED_BYTES] = bytes[..HELLO_FIXED_BYTES]
            .try_into()
            .expect("length checked above");
        let rest = Hello::rest_len(fixed)?;
        if bytes.len() != HELLO_FIXED_BYTES + rest {
            return Err(FrameError::Truncated);
        }
        let body = &bytes[..bytes.len() - 4];
        if crate::crc32c(body) != u32_at(bytes, bytes.len() - 4) {
            return Err(FrameError::BadChecksum);
        }
        if u16_at(bytes, 10) & !HELLO_READER != 0 || u16_at(bytes, 26) != 0 {
            return Err(FrameError::Reserved);
        }
        let v = u16_at(bytes, 20) as usize;
        let r = u16_at(bytes, 22) as usize;
        let s = u16_at(bytes, 24) as usize;
        let mut at = HELLO_FIXED_BYTES;
        let mut take = |n: usize, what: &'static str| -> Result<String, FrameError> {
            let s =
                std::str::from_utf8(&bytes[at..at + n]).map_err(|_| FrameError::NotUtf8(what))?;
            at += n;
            Ok(s.to_owned())
        };
        let volume = take(v, "volume name")?;
        let replica = take(r, "replica name")?;
        let nonce = bytes[at..at + s].to_vec();
        Ok(Hello {
            version: u16_at(bytes, 8),
            volume,
            replica,
            epoch: u64_at(bytes, 12),
            flags: u16_at(bytes, 10),
            nonce,
        })
    }
}

/// The replica server's answer to a [`Hello`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Welcome {
    pub version: u16,
    pub status: WelcomeStatus,
    pub size_bytes: u64,
    pub block_size: u32,
    pub generation: u64,
    /// Why the handshake was refused (empty on success).
    pub message: String,
}

/// Fixed part of a [`Welcome`] before the message.
pub const WELCOME_FIXED_BYTES: usize = 42;

impl Welcome {
    pub fn refused(status: WelcomeStatus, message: impl Into<String>) -> Welcome {
        let mut message = message.into();
        if message.len() > MAX_MESSAGE_BYTES {
            let mut cut = MAX_MESSAGE_BYTES;
            while !message.is_char_boundary(cut) {
                cut -= 1;
            }
            message.truncate(cut);
        }
        Welcome {
            version: PROTOCOL_VERSION,
            status,
            size_bytes: 0,
            block_size: 0,
            generation: 0,
            message,
        }
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(WELCOME_FIXED_BYTES + self.message.len() + 4);
        out.extend_from_slice(&WELCOME_MAGIC);
        put_u16(&mut out, self.version);
        put_u16(&mut out, 0);
        put_u32(&mut out, self.status as u32);
        put_u64(&mut out, self.size_bytes);
        put_u32(&mut out, self.block_size);
        put_u32(&mut out, 0);
        put_u64(&mut out, self.generation);
        put_u16(&mut out, self.message.len() as u16);
        out.extend_from_slice(self.message.as_bytes());
        let crc = crate::crc32c(&out);
        put_u32(&mut out, crc);
        out
    }

    /// Length of the message plus the trailing CRC, from the fixed part.
    pub fn rest_len(fixed: &[u8; WELCOME_FIXED_BYTES]) -> Result<usize, FrameError> {
        if fixed[0..8] != WELCOME_MAGIC {
            return Err(FrameError::BadMagic {
                found: fixed[0..8].to_vec(),
            });
        }
        let m = u16_at(fixed, 40) as usize;
        if m > MAX_MESSAGE_BYTES {
            return Err(FrameError::TooLong {
                what: "welcome message",
                len: m,
                max: MAX_MESSAGE_BYTES,
            });
        }
        Ok(m + 4)
    }

    pub fn decode(bytes: &[u8]) -> Result<Welcome, FrameError> {
        if bytes.len() < WELCOME_FIXED_BYTES + 4 {
            return Err(FrameError::Truncated);
        }
        let fixed: &[u8; WELCOME_FIXED_BYTES] = bytes[..WELCOME_FIXED_BYTES]
            .try_into()
            .expect("length checked above");
        let rest = Welcome::rest_len(fixed)?;
        if bytes.len() != WELCOME_FIXED_BYTES + rest {
            return Err(FrameError::Truncated);
        }
        if crate::crc32c(&bytes[..bytes.len() - 4]) != u32_at(bytes, bytes.len() - 4) {
            return Err(FrameError::BadChecksum);
        }
        let message = std::str::from_utf8(&bytes[WELCOME_FIXED_BYTES..bytes.len() - 4])
            .map_err(|_| FrameError::NotUtf8("welcome message"))?
            .to_owned();
        Ok(Welcome {
            version: u16_at(bytes, 8),
            status: WelcomeStatus::from_u32(u32_at(bytes, 12)),
            size_bytes: u64_at(bytes, 16),
            block_size: u32_at(bytes, 24),
            generation: u64_at(bytes, 32),
            message,
        })
    }
}

/// A request header; the payload of a WRITE, WIL_MARK or WIL_SETTLE (`length` bytes) follows it
/// on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestHeader {
    pub op: Op,
    pub flags: u8,
    pub id: u64,
    pub offset: u64,
    pub length: u32,
    /// CRC32C of the payload (WRITE, WIL_MARK, WIL_SETTLE), zero otherwise.
    pub payload_crc: u32,
}

impl RequestHeader {
    pub fn encode(&self) -> [u8; REQUEST_HEADER_BYTES] {
        let mut b = [0u8; REQUEST_HEADER_BYTES];
        b[0..4].copy_from_slice(&REQUEST_MAGIC);
        b[4] = self.op as u8;
        b[5] = self.flags;
        b[8..16].copy_from_slice(&self.id.to_le_bytes());
        b[16..24].copy_from_slice(&self.offset.to_le_bytes());
        b[24..28].copy_from_slice(&self.length.to_le_bytes());
        b[28..32].copy_from_slice(&self.payload_crc.to_le_bytes());
        b
    }

    pub fn decode(b: &[u8; REQUEST_HEADER_BYTES]) -> Result<RequestHeader, FrameError> {
        if b[0..4] != REQUEST_MAGIC {
            return Err(FrameError::BadMagic {
                found: b[0..4].to_vec(),
            });
        }
        if u16_at(b, 6) != 0 {
            return Err(FrameError::Reserved);
        }
        let h = RequestHeader {
            op: Op::from_u8(b[4])?,
            flags: b[5],
            id: u64_at(b, 8),
            offset: u64_at(b, 16),
            length: u32_at(b, 24),
            payload_crc: u32_at(b, 28),
        };
        if h.length > MAX_PAYLOAD_BYTES && h.op.length_is_bytes() {
            return Err(FrameError::TooLong {
                what: "request",
                len: h.length as usize,
                max: MAX_PAYLOAD_BYTES as usize,
            });
        }
        if h.length > MAX_NAME_PAYLOAD_BYTES
            && matches!(
                h.op,
                Op::Snapshot
                    | Op::SnapshotRemove
                    | Op::Revert
                    | Op::ReadSnapshot
                    | Op::SnapshotDelta
                    | Op::Rewind
            )
        {
            return Err(FrameError::TooLong {
                what: "snapshot request",
                len: h.length as usize,
                max: MAX_NAME_PAYLOAD_BYTES as usize,
            });
        }
        Ok(h)
    }

    /// Bytes of payload that follow this header on the wire.
    pub fn payload_len(&self) -> usize {
        if self.op.carries_payload() {
            self.length as usize
        } else {
            0
        }
    }
}

/// A reply header; `length` bytes of payload follow it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReplyHeader {
    pub status: u32,
    pub id: u64,
    pub length: u32,
    pub payload_crc: u32,
}

impl ReplyHeader {
    pub fn encode(&self) -> [u8; REPLY_HEADER_BYTES] {
        let mut b = [0u8; REPLY_HEADER_BYTES];
        b[0..4].copy_from_slice(&REPLY_MAGIC);
        b[4..8].copy_from_slice(&self.status.to_le_bytes());
        b[8..16].copy_from_slice(&self.id.to_le_bytes());
        b[16..20].copy_from_slice(&self.length.to_le_bytes());
        b[20..24].copy_from_slice(&self.payload_crc.to_le_bytes());
        b
    }

    pub fn decode(b: &[u8; REPLY_HEADER_BYTES]) -> Result<ReplyHeader, FrameError> {
        if b[0..4] != REPLY_MAGIC {
            return Err(FrameError::BadMagic {
                found: b[0..4].to_vec(),
            });
        }
        let h = ReplyHeader {
            status: u32_at(b, 4),
            id: u64_at(b, 8),
            length: u32_at(b, 16),
            payload_crc: u32_at(b, 20),
        };
        if h.length > MAX_PAYLOAD_BYTES {
            return Err(FrameError::TooLong {
                what: "reply",
                len: h.length as usize,
                max: MAX_PAYLOAD_BYTES as usize,
            });
        }
        Ok(h)
    }
}

/// Payload of an INFO reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReplicaInfo {
    pub size_bytes: u64,
    pub block_size: u32,
    pub generation: u64,
    /// Bytes of the volume this replica holds data for (not holes).
    pub allocated_bytes: u64,
}

/// Size of an encoded [`ReplicaInfo`].
pub const REPLICA_INFO_BYTES: usize = 32;

impl ReplicaInfo {
    pub fn encode(&self) -> [u8; REPLICA_INFO_BYTES] {
        let mut b = [0u8; REPLICA_INFO_BYTES];
        b[0..8].copy_from_slice(&self.size_bytes.to_le_bytes());
        b[8..12].copy_from_slice(&self.block_size.to_le_bytes());
        b[16..24].copy_from_slice(&self.generation.to_le_bytes());
        b[24..32].copy_from_slice(&self.allocated_bytes.to_le_bytes());
        b
    }

    pub fn decode(b: &[u8]) -> Result<ReplicaInfo, FrameError> {
        if b.len() != REPLICA_INFO_BYTES {
            return Err(FrameError::Truncated);
        }
        Ok(ReplicaInfo {
            size_bytes: u64_at(b, 0),
            block_size: u32_at(b, 8),
            generation: u64_at(b, 16),
            allocated_bytes: u64_at(b, 24),
        })
    }
}

/// Extent flag: the range holds no data (reads as zeroes, costs no space).
pub const EXTENT_HOLE: u32 = 1;
/// Extent flag: the range reads as zeroes.
pub const EXTENT_ZERO: u32 = 2;

/// One extent of a MAP reply: `length` bytes with `flags` (`EXTENT_*`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MapExtent {
    pub length: u32,
    pub flags: u32,
}

/// Longest list of extents in one MAP reply.
pub const MAX_MAP_EXTENTS: usize = 1 << 16;

/// Encode a MAP reply payload: count (u32), reserved (u32), then (length u32, flags u32) each.
pub fn encode_map(extents: &[MapExtent]) -> Vec<u8> {
    let mut out = Vec::with_capacity(8 + extents.len() * 8);
    put_u32(&mut out, extents.len() as u32);
    put_u32(&mut out, 0);
    for e in extents {
        put_u32(&mut out, e.length);
        put_u32(&mut out, e.flags);
    }
    out
}

pub fn decode_map(b: &[u8]) -> Result<Vec<MapExtent>, FrameError> {
    if b.len() < 8 {
        return Err(FrameError::Truncated);
    }
    let count = u32_at(b, 0) as usize;
    if count > MAX_MAP_EXTENTS {
        return Err(FrameError::TooLong {
            what: "extent list",
            len: count,
            max: MAX_MAP_EXTENTS,
        });
    }
    if b.len() != 8 + count * 8 {
        return Err(FrameError::Truncated);
    }
    Ok((0..count)
        .map(|i| MapExtent {
            length: u32_at(b, 8 + i * 8),
            flags: u32_at(b, 12 + i * 8),
        })
        .collect())
}

/// Encode a list of write-intent-log extents (a WIL_MARK or WIL_SETTLE payload).
pub fn encode_extents(extents: &[u64]) -> Vec<u8> {
    extents.iter().flat_map(|e| e.to_le_bytes()).collect()
}

/// Decode a WIL_MARK or WIL_SETTLE payload.
pub fn decode_extents(b: &[u8]) -> Result<Vec<u64>, FrameError> {
    if !b.len().is_multiple_of(8) {
        return Err(FrameError::Truncated);
    }
    Ok(b.chunks_exact(8)
        .map(|c| u64::from_le_bytes(c.try_into().expect("8 bytes")))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn hello_round_trip_and_tamper() {
        let h = Hello {
            version: PROTOCOL_VERSION,
            volume: "vol-1".into(),
            replica: "vol-1-r-abc".into(),
            epoch: 7,
            flags: 0,
            nonce: vec![9; 32],
        };
        let bytes = h.encode();
        assert_eq!(Hello::decode(&bytes).unwrap(), h);
        let reader = Hello {
            flags: HELLO_READER,
            ..h.clone()
        };
        assert_eq!(Hello::decode(&reader.encode()).unwrap(), reader);
        let unknown = Hello {
            flags: 2,
            ..h.clone()
        };
        assert_eq!(Hello::decode(&unknown.encode()), Err(FrameError::Reserved));
        let mut bad = bytes.clone();
        bad[HELLO_FIXED_BYTES] ^= 1;
        assert_eq!(Hello::decode(&bad), Err(FrameError::BadChecksum));
        let mut bad = bytes;
        bad[0] = b'X';
        assert!(matches!(
            Hello::decode(&bad),
            Err(FrameError::BadMagic { .. })
        ));
    }

    #[test]
    fn welcome_round_trip() {
        let w = Welcome {
            version: 1,
            status: WelcomeStatus::Ok,
            size_bytes: 1 << 30,
            block_size: 4096,
            generation: 3,
            message: String::new(),
        };
        assert_eq!(Welcome::decode(&w.encode()).unwrap(), w);
        let r = Welcome::refused(WelcomeStatus::AuthFailed, "wrong secret");
        assert_eq!(Welcome::decode(&r.encode()).unwrap(), r);
    }

    #[test]
    fn request_rejects_oversized_and_unknown_ops() {
        let h = RequestHeader {
            op: Op::Write,
            flags: FLAG_FUA,
            id: 9,
            offset: 4096,
            length: 8192,
            payload_crc: 5,
        };
        assert_eq!(RequestHeader::decode(&h.encode()).unwrap(), h);
        let mut big = h;
        big.length = MAX_PAYLOAD_BYTES + 1;
        assert!(matches!(
            RequestHeader::decode(&big.encode()),
            Err(FrameError::TooLong { .. })
        ));
        let mut b = h.encode();
        b[4] = 99;
        assert_eq!(RequestHeader::decode(&b), Err(FrameError::UnknownOp(99)));
    }

    proptest! {
        #[test]
        fn decoders_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = Hello::decode(&bytes);
            let _ = Welcome::decode(&bytes);
            let _ = decode_map(&bytes);
            let _ = ReplicaInfo::decode(&bytes);
            if bytes.len() >= REQUEST_HEADER_BYTES {
                let _ = RequestHeader::decode(bytes[..REQUEST_HEADER_BYTES].try_into().unwrap());
            }
            if bytes.len() >= REPLY_HEADER_BYTES {
                let _ = ReplyHeader::decode(bytes[..REPLY_HEADER_BYTES].try_into().unwrap());
            }
        }

        #[test]
        fn map_round_trip(ext in proptest::collection::vec((any::<u32>(), 0u32..4), 0..50)) {
            let ext: Vec<MapExtent> = ext.into_iter().map(|(length, flags)| MapExtent { length, flags }).collect();
            prop_assert_eq!(decode_map(&encode_map(&ext)).unwrap(), ext);
        }
    }
}
