//! The manager's records as its store could hold them (the checksummed envelope and the JSON in
//! it), and a whole store file of arbitrary bytes: refused or read, never a panic.
#![no_main]
use libfuzzer_sys::fuzz_target;
use zebu_manager::state::{NodeRecord, ReplicaRecord, SettingRecord, VolumeRecord};

fuzz_target!(|data: &[u8]| {
    let Some((&which, bytes)) = data.split_first() else {
        return;
    };
    match which % 3 {
        0 => {
            // A record in its envelope: checked, then decoded as each kind.
            for kind in ["volumes", "replicas", "nodes", "settings"] {
                if let Ok(json) = zebu_store::decode_record(kind, "k", bytes) {
                    let _ = serde_json::from_slice::<VolumeRecord>(json);
                    let _ = serde_json::from_slice::<ReplicaRecord>(json);
                    let _ = serde_json::from_slice::<NodeRecord>(json);
                    let _ = serde_json::from_slice::<SettingRecord>(json);
                }
            }
        }
        1 => {
            // The JSON alone, as if its envelope were right.
            let enc = zebu_store::encode_record("volumes", "k", bytes);
            let json = zebu_store::decode_record("volumes", "k", &enc).unwrap();
            assert_eq!(json, bytes);
            let _ = serde_json::from_slice::<VolumeRecord>(json);
            let _ = serde_json::from_slice::<ReplicaRecord>(json);
        }
        _ => {
            // A whole store file.
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("meta.redb");
            std::fs::write(&path, bytes).unwrap();
            if let Ok(s) = zebu_store::RedbStore::open_existing(&path) {
                use zebu_store::MetaStoreExt;
                let _ = s.list::<VolumeRecord>("volumes");
                let _ = s.list::<ReplicaRecord>("replicas");
            }
        }
    }
});
