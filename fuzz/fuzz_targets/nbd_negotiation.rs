//! NBD: the option payloads a client sends while negotiating (INFO/GO, META_CONTEXT) and the
//! 28-byte request header of transmission.
#![no_main]
use libfuzzer_sys::fuzz_target;
use zebu_proto::nbd::{parse_info, parse_meta, Request, REQUEST_BYTES};

fuzz_target!(|data: &[u8]| {
    if let Some((name, _)) = parse_info(data) {
        assert!(name.len() <= zebu_proto::nbd::MAX_EXPORT_NAME_BYTES);
    }
    if let Some((name, queries)) = parse_meta(data) {
        assert!(name.len() <= zebu_proto::nbd::MAX_EXPORT_NAME_BYTES);
        assert!(queries.iter().map(|q| q.len() + 4).sum::<usize>() <= data.len());
    }
    if let Ok(b) = <[u8; REQUEST_BYTES]>::try_from(data.get(..REQUEST_BYTES).unwrap_or(&[])) {
        if let Some(r) = Request::decode(&b) {
            assert_eq!(Request::decode(&r.encode()), Some(r));
        }
    }
});
