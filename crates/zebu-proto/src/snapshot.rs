//! Payloads of the snapshot operations of the data protocol (`docs/protocol.md`, "Snapshots").
//! Little-endian; strings are a u16 length and UTF-8 bytes.

use crate::data::FrameError;

/// Layer flags, as `replica.meta` stores them.
pub const LAYER_HEAD: u16 = 1;
pub const LAYER_SYSTEM: u16 = 2;
pub const LAYER_REMOVED: u16 = 4;

/// The payload of SNAPSHOT.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SnapshotRequest {
    pub name: String,
    pub system: bool,
    pub created_unix: u64,
    pub labels: Vec<(String, String)>,
}

/// One layer in a LAYERS reply.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct LayerRecord {
    pub id: u64,
    pub parent: u64,
    pub created_unix: u64,
    pub size_bytes: u64,
    pub flags: u16,
    pub name: String,
    pub labels: Vec<(String, String)>,
}

/// The merge a replica is running, in a LAYERS reply.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct MergeRecord {
    pub snapshot: String,
    pub into: u64,
    pub bytes_done: u64,
    pub bytes_total: u64,
}

/// A LAYERS reply: every layer, oldest first, and the merge running now.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct LayersReply {
    pub layers: Vec<LayerRecord>,
    pub merge: Option<MergeRecord>,
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    let s = &s.as_bytes()[..s.len().min(u16::MAX as usize)];
    out.extend_from_slice(&(s.len() as u16).to_le_bytes());
    out.extend_from_slice(s);
}

fn put_labels(out: &mut Vec<u8>, labels: &[(String, String)]) {
    out.extend_from_slice(&(labels.len().min(u16::MAX as usize) as u16).to_le_bytes());
    for (k, v) in labels.iter().take(u16::MAX as usize) {
        put_str(out, k);
        put_str(out, v);
    }
}

struct Reader<'a> {
    b: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], FrameError> {
        let end = self.at.checked_add(n).ok_or(FrameError::Truncated)?;
        let s = self.b.get(self.at..end).ok_or(FrameError::Truncated)?;
        self.at = end;
        Ok(s)
    }
    fn u8(&mut self) -> Result<u8, FrameError> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, FrameError> {
        Ok(u16::from_le_bytes(
            self.take(2)?.try_into().expect("2 bytes"),
        ))
    }
    fn u32(&mut self) -> Result<u32, FrameError> {
        Ok(u32::from_le_bytes(
            self.take(4)?.try_into().expect("4 bytes"),
        ))
    }
    fn u64(&mut self) -> Result<u64, FrameError> {
        Ok(u64::from_le_bytes(
            self.take(8)?.try_into().expect("8 bytes"),
        ))
    }
    fn str(&mut self, what: &'static str) -> Result<String, FrameError> {
        let n = self.u16()? as usize;
        let s = self.take(n)?;
        std::str::from_utf8(s)
            .map(str::to_owned)
            .map_err(|_| FrameError::NotUtf8(what))
    }
    fn labels(&mut self) -> Result<Vec<(String, String)>, FrameError> {
        let n = self.u16()? as usize;
        // Each label takes at least 4 bytes: a count past what is left is refused up front.
        if n * 4 > self.b.len() - self.at {
            return Err(FrameError::Truncated);
        }
        (0..n)
            .map(|_| Ok((self.str("label key")?, self.str("label value")?)))
            .collect()
    }
    fn end(&self) -> Result<(), FrameError> {
        if self.at == self.b.len() {
            Ok(())
        } else {
            Err(FrameError::Trailing("snapshot payload"))
        }
    }
}

impl SnapshotRequest {
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(32 + self.name.len());
        out.extend_from_slice(&self.created_unix.to_le_bytes());
        out.push(u8::from(self.system));
        put_str(&mut out, &self.name);
        put_labels(&mut out, &self.labels);
        out
    }

    pub fn decode(b: &[u8]) -> Result<SnapshotRequest, FrameError> {
        let mut r = Reader { b, at: 0 };
        let created_unix = r.u64()?;
        let system = match r.u8()? {
            0 => false,
            1 => true,
            _ => return Err(FrameError::Reserved),
        };
        let name = r.str("snapshot name")?;
        let labels = r.labels()?;
        r.end()?;
        Ok(SnapshotRequest {
            name,
            system,
            created_unix,
            labels,
        })
    }
}

/// A READ_SNAPSHOT payload: the bytes to read (u32 LE), then the snapshot's name (UTF-8).
pub fn encode_read_snapshot(name: &str, length: u32) -> Vec<u8> {
    let mut out = Vec::with_capacity(4 + name.len());
    out.extend_from_slice(&length.to_le_bytes());
    out.extend_from_slice(name.as_bytes());
    out
}

/// A READ_SNAPSHOT payload's read length and name; the length at most
/// [`crate::data::MAX_SNAPSHOT_READ_BYTES`], the name not empty.
pub fn decode_read_snapshot(b: &[u8]) -> Result<(u32, String), FrameError> {
    if b.len() < 5 {
        return Err(FrameError::Truncated);
    }
    let length = u32::from_le_bytes(b[..4].try_into().expect("4 bytes"));
    if length > crate::data::MAX_SNAPSHOT_READ_BYTES {
        return Err(FrameError::TooLong {
            what: "snapshot read",
            len: length as usize,
            max: crate::data::MAX_SNAPSHOT_READ_BYTES as usize,
        });
    }
    let name = std::str::from_utf8(&b[4..]).map_err(|_| FrameError::NotUtf8("snapshot name"))?;
    Ok((length, name.to_owned()))
}

/// A SNAPSHOT_DELTA payload: the range's length (u32 LE), the base's name length (u16 LE, 0:
/// none), the base's name, then the snapshot's name (UTF-8, the rest).
pub fn encode_snapshot_delta(name: &str, base: Option<&str>, length: u32) -> Vec<u8> {
    let base = base.unwrap_or("");
    let mut out = Vec::with_capacity(6 + base.len() + name.len());
    out.extend_from_slice(&length.to_le_bytes());
    out.extend_from_slice(&(base.len() as u16).to_le_bytes());
    out.extend_from_slice(base.as_bytes());
    out.extend_from_slice(name.as_bytes());
    out
}

/// A SNAPSHOT_DELTA payload's (range length, snapshot name, base name); an empty name is the
/// live head's (its base then named).
pub fn decode_snapshot_delta(b: &[u8]) -> Result<(u32, String, Option<String>), FrameError> {
    if b.len() < 6 {
        return Err(FrameError::Truncated);
    }
    let length = u32::from_le_bytes(b[..4].try_into().expect("4 bytes"));
    let base_len = u16::from_le_bytes(b[4..6].try_into().expect("2 bytes")) as usize;
    if b.len() < 6 + base_len || (base_len == 0 && b.len() == 6) {
        return Err(FrameError::Truncated);
    }
    let base = std::str::from_utf8(&b[6..6 + base_len])
        .map_err(|_| FrameError::NotUtf8("base snapshot name"))?;
    let name = std::str::from_utf8(&b[6 + base_len..])
        .map_err(|_| FrameError::NotUtf8("snapshot name"))?;
    Ok((
        length,
        name.to_owned(),
        (!base.is_empty()).then(|| base.to_owned()),
    ))
}

impl LayersReply {
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(&(self.layers.len() as u32).to_le_bytes());
        for l in &self.layers {
            out.extend_from_slice(&l.id.to_le_bytes());
            out.extend_from_slice(&l.parent.to_le_bytes());
            out.extend_from_slice(&l.created_unix.to_le_bytes());
            out.extend_from_slice(&l.size_bytes.to_le_bytes());
            out.extend_from_slice(&l.flags.to_le_bytes());
            put_str(&mut out, &l.name);
            put_labels(&mut out, &l.labels);
        }
        match &self.merge {
            None => out.push(0),
            Some(m) => {
                out.push(1);
                put_str(&mut out, &m.snapshot);
                out.extend_from_slice(&m.into.to_le_bytes());
                out.extend_from_slice(&m.bytes_done.to_le_bytes());
                out.extend_from_slice(&m.bytes_total.to_le_bytes());
            }
        }
        out
    }

    pub fn decode(b: &[u8]) -> Result<LayersReply, FrameError> {
        let mut r = Reader { b, at: 0 };
        let n = r.u32()? as usize;
        // A layer record takes at least 38 bytes.
        if n.saturating_mul(38) > b.len() {
            return Err(FrameError::Truncated);
        }
        let mut layers = Vec::with_capacity(n);
        for _ in 0..n {
            layers.push(LayerRecord {
                id: r.u64()?,
                parent: r.u64()?,
                created_unix: r.u64()?,
                size_bytes: r.u64()?,
                flags: r.u16()?,
                name: r.str("layer name")?,
                labels: r.labels()?,
            });
        }
        let merge = match r.u8()? {
            0 => None,
            1 => Some(MergeRecord {
                snapshot: r.str("merge snapshot name")?,
                into: r.u64()?,
                bytes_done: r.u64()?,
                bytes_total: r.u64()?,
            }),
            _ => return Err(FrameError::Reserved),
        };
        r.end()?;
        Ok(LayersReply { layers, merge })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_truncation_is_refused() {
        let req = SnapshotRequest {
            name: "daily-1".into(),
            system: true,
            created_unix: 1_700_000_000,
            labels: vec![("app".into(), "db".into()), ("k".into(), String::new())],
        };
        let b = req.encode();
        assert_eq!(SnapshotRequest::decode(&b).unwrap(), req);
        for n in 0..b.len() {
            assert!(SnapshotRequest::decode(&b[..n]).is_err(), "cut at {n}");
        }
        let mut long = b.clone();
        long.push(0);
        assert!(SnapshotRequest::decode(&long).is_err());
        let reply = LayersReply {
            layers: vec![
                LayerRecord {
                    id: 1,
                    parent: 0,
                    created_unix: 5,
                    size_bytes: 4096,
                    flags: LAYER_REMOVED,
                    name: "a".into(),
                    labels: vec![("x".into(), "y".into())],
                },
                LayerRecord {
                    id: 2,
                    parent: 1,
                    flags: LAYER_HEAD,
                    ..Default::default()
                },
            ],
            merge: Some(MergeRecord {
                snapshot: "a".into(),
                into: 2,
                bytes_done: 1,
                bytes_total: 2,
            }),
        };
        let b = reply.encode();
        assert_eq!(LayersReply::decode(&b).unwrap(), reply);
        for n in 0..b.len() {
            assert!(LayersReply::decode(&b[..n]).is_err(), "cut at {n}");
        }
        let empty = LayersReply::default();
        assert_eq!(LayersReply::decode(&empty.encode()).unwrap(), empty);
        // A count far past the bytes is refused without allocating for it.
        let mut huge = vec![0xff, 0xff, 0xff, 0x7f];
        huge.push(0);
        assert!(LayersReply::decode(&huge).is_err());
    }

    #[test]
    fn read_snapshot_payloads_round_trip_and_bad_ones_are_refused() {
        let b = encode_read_snapshot("nightly", 4096);
        assert_eq!(
            decode_read_snapshot(&b).unwrap(),
            (4096, "nightly".to_owned())
        );
        assert!(decode_read_snapshot(&b[..4]).is_err(), "no name");
        let too_long = encode_read_snapshot("x", crate::data::MAX_SNAPSHOT_READ_BYTES + 1);
        assert!(decode_read_snapshot(&too_long).is_err());
        let mut bad = encode_read_snapshot("x", 1);
        bad[4] = 0xff;
        assert!(decode_read_snapshot(&bad).is_err(), "not UTF-8");
    }

    #[test]
    fn snapshot_delta_payloads_round_trip_and_bad_ones_are_refused() {
        let b = encode_snapshot_delta("s2", Some("s1"), 1 << 20);
        assert_eq!(
            decode_snapshot_delta(&b).unwrap(),
            (1 << 20, "s2".to_owned(), Some("s1".to_owned()))
        );
        let b = encode_snapshot_delta("s1", None, 4096);
        assert_eq!(
            decode_snapshot_delta(&b).unwrap(),
            (4096, "s1".to_owned(), None)
        );
        assert!(decode_snapshot_delta(&b[..6]).is_err(), "no name, no base");
        let head = encode_snapshot_delta("", Some("s1"), 4096);
        assert_eq!(
            decode_snapshot_delta(&head).unwrap(),
            (4096, String::new(), Some("s1".to_owned()))
        );
        let mut long_base = encode_snapshot_delta("s", Some("b"), 1);
        long_base[4] = 9;
        assert!(
            decode_snapshot_delta(&long_base).is_err(),
            "base past the end"
        );
        let mut bad = encode_snapshot_delta("s", Some("b"), 1);
        bad[6] = 0xff;
        assert!(decode_snapshot_delta(&bad).is_err(), "not UTF-8");
    }
}
