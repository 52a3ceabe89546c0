//! `replica.meta` as a disk could hold it: decoded as read, and with its checksum made right.
#![no_main]
use libfuzzer_sys::fuzz_target;
use zebu_fuzz::with_trailing_crc;
use zebu_replica::meta::ReplicaMeta;

fuzz_target!(|data: &[u8]| {
    for bytes in [data.to_vec(), with_trailing_crc(data)] {
        if let Ok(m) = ReplicaMeta::decode(&bytes) {
            assert_eq!(ReplicaMeta::decode(&m.encode()), Ok(m));
        }
    }
});
