//! The data protocol's frames after the handshake: request and reply headers, and the INFO,
//! MAP and extent-list payloads.
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
});
