//! The data protocol's handshake: Hello, Challenge, Proof, Welcome. Each is tried as it came
//! and with its checksum made right, so mutations reach the fields behind it.
#![no_main]
use libfuzzer_sys::fuzz_target;
use zebu_fuzz::with_trailing_crc;
use zebu_proto::auth::{Challenge, Proof};
use zebu_proto::data::{Hello, Welcome};

fuzz_target!(|data: &[u8]| {
    for bytes in [data.to_vec(), with_trailing_crc(data)] {
        if let Ok(h) = Hello::decode(&bytes) {
            assert_eq!(Hello::decode(&h.encode()).as_ref(), Ok(&h));
        }
        if let Ok(w) = Welcome::decode(&bytes) {
            assert!(w.message.len() <= zebu_proto::data::MAX_MESSAGE_BYTES);
        }
        if let Ok(c) = Challenge::decode(&bytes) {
            assert_eq!(Challenge::decode(&c.encode()), Ok(c));
        }
        if let Ok(p) = Proof::decode(&bytes) {
            assert_eq!(Proof::decode(&p.encode()), Ok(p));
        }
    }
});
