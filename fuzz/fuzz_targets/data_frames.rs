//! The data protocol's frames after the handshake: request and reply headers, and the INFO,
//! MAP, extent-list, SNAPSHOT, LAYERS and READ_SNAPSHOT payloads (a decoded one encodes back to the same bytes).
#![no_main]
use libfuzzer_sys::fuzz_target;
use zebu_proto::data::{
    decode_extents, decode_map, ReplicaInfo, ReplyHeader, RequestHeader, REPLY_HEADER_BYTES,
    REQUEST_HEADER_BYTES,
};

fuzz_target!(|data: &[u8]| {
    if let Some(b) = data.get(..REQUEST_HEADER_BYTES) {
        let _ = RequestHeader::decode(b.try_into().unwrap());
    }
    if let Some(b) = data.get(..REPLY_HEADER_BYTES) {
        let _ = ReplyHeader::decode(b.try_into().unwrap());
    }
    let _ = ReplicaInfo::decode(data);
    if let Ok(map) = decode_map(data) {
        assert!(map.len() <= data.len());
    }
    let _ = decode_extents(data);
    if let Ok(r) = zebu_proto::snapshot::SnapshotRequest::decode(data) {
        assert_eq!(r.encode(), data);
    }
    if let Ok(r) = zebu_proto::snapshot::LayersReply::decode(data) {
        assert_eq!(r.encode(), data);
    }
    if let Ok((len, name)) = zebu_proto::snapshot::decode_read_snapshot(data) {
        assert_eq!(zebu_proto::snapshot::encode_read_snapshot(&name, len), data);
    }
    if let Ok((len, name, base)) = zebu_proto::snapshot::decode_snapshot_delta(data) {
        assert_eq!(
            zebu_proto::snapshot::encode_snapshot_delta(&name, base.as_deref(), len),
            data
        );
    }
});
