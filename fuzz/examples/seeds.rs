//! Writes the seed corpora (valid encodings of every format the targets read) into
//! `fuzz/corpus/<target>/seed-*` (`scripts/fuzz --seeds`); the corpora the
//! runs grow are kept beside the seeds.

use std::path::Path;

use zebu_proto::auth::{Challenge, Proof, NONCE_BYTES, PROOF_BYTES};
use zebu_proto::data::{
    encode_extents, encode_map, Hello, MapExtent, ReplicaInfo, Welcome, WelcomeStatus,
    PROTOCOL_VERSION,
};
use zebu_replica::meta::{LayerMeta, ReplicaMeta};

fn put(target: &str, name: &str, bytes: &[u8]) {
    let dir = Path::new("corpus").join(target);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join(format!("seed-{name}")), bytes).unwrap();
}

fn main() {
    // NBD option payloads and a request header.
    let mut info = Vec::new();
    info.extend_from_slice(&3u32.to_be_bytes());
    info.extend_from_slice(b"vol");
    info.extend_from_slice(&2u16.to_be_bytes());
    info.extend_from_slice(&1u16.to_be_bytes());
    info.extend_from_slice(&3u16.to_be_bytes());
    put("nbd_negotiation", "info", &info);
    let mut meta = Vec::new();
    meta.extend_from_slice(&3u32.to_be_bytes());
    meta.extend_from_slice(b"vol");
    meta.extend_from_slice(&1u32.to_be_bytes());
    meta.extend_from_slice(&15u32.to_be_bytes());
    meta.extend_from_slice(b"base:allocation");
    put("nbd_negotiation", "meta", &meta);
    let req = zebu_proto::nbd::Request {
        flags: 1,
        kind: zebu_proto::nbd::CMD_WRITE,
        handle: 7,
        offset: 4096,
        length: 512,
    };
    put("nbd_negotiation", "request", &req.encode());

    // The handshake.
    let hello = Hello {
        version: PROTOCOL_VERSION,
        volume: "vol-1".into(),
        replica: "vol-1-r-0000abcd".into(),
        epoch: 3,
        flags: 0,
        nonce: vec![7; NONCE_BYTES],
    };
    put("data_handshake", "hello", &hello.encode());
    let w = Welcome {
        version: PROTOCOL_VERSION,
        status: WelcomeStatus::Ok,
        size_bytes: 1 << 30,
        block_size: 4096,
        generation: 9,
        message: String::new(),
    };
    put("data_handshake", "welcome", &w.encode());
    put(
        "data_handshake",
        "refused",
        &Welcome::refused(WelcomeStatus::Fenced, "a newer engine").encode(),
    );
    let c = Challenge {
        nonce: [1; NONCE_BYTES],
        proof: [2; PROOF_BYTES],
    };
    put("data_handshake", "challenge", &c.encode());
    put(
        "data_handshake",
        "proof",
        &Proof {
            proof: [3; PROOF_BYTES],
        }
        .encode(),
    );

    // Frames after the handshake.
    let info = ReplicaInfo {
        size_bytes: 1 << 30,
        block_size: 4096,
        generation: 4,
        allocated_bytes: 1 << 20,
    };
    put("data_frames", "info", &info.encode());
    let map = encode_map(&[
        MapExtent {
            length: 4096,
            flags: 0,
        },
        MapExtent {
            length: 1 << 20,
            flags: zebu_proto::data::EXTENT_HOLE,
        },
    ]);
    put("data_frames", "map", &map);
    put("data_frames", "extents", &encode_extents(&[0, 3, 9]));

    // replica.meta.
    let m = ReplicaMeta {
        volume: "vol-1".into(),
        replica: "vol-1-r-0000abcd".into(),
        size_bytes: 1 << 30,
        block_size: 4096,
        generation: 5,
        epoch: 2,
        layers: vec![
            LayerMeta {
                id: 1,
                created_unix: 1_700_000_000,
                name: "snap".into(),
            },
            LayerMeta {
                id: 2,
                created_unix: 1_700_000_100,
                name: String::new(),
            },
        ],
    };
    put("replica_meta", "meta", &m.encode());

    // Replica files: an index and a write-intent log as written by a real replica.
    let dir = tempfile::tempdir().unwrap();
    let rdir = dir.path().join("fz-r-00000000");
    let files = zebu_replica::file::direct();
    let r = zebu_replica::Replica::create_in(&files, &rdir, "fz", "fz-r-00000000", 256 << 10, 4096)
        .unwrap();
    r.write(0, &[0x5a; 8192], false).unwrap();
    r.flush().unwrap();
    drop(r);
    for e in std::fs::read_dir(&rdir).unwrap() {
        let p = e.unwrap().path();
        let n = p.file_name().unwrap().to_string_lossy().into_owned();
        let which = if n.ends_with(".idx") {
            0u8
        } else if n == "wil" {
            1u8
        } else {
            continue;
        };
        let mut b = vec![which];
        b.extend_from_slice(&std::fs::read(&p).unwrap());
        put("replica_files", &n, &b);
    }

    // Manager records, in their envelope and bare, and a store file.
    let vol = br#"{"name":"vol-1","size_bytes":1073741824,"replica_count":3,"block_size":4096,"desired_node":"node-1","deleting":false,"created":true,"epoch":4}"#;
    let mut rec = vec![0u8];
    rec.extend_from_slice(&zebu_store::encode_record("volumes", "k", vol));
    put("manager_records", "enveloped", &rec);
    let mut bare = vec![1u8];
    bare.extend_from_slice(vol);
    put("manager_records", "json", &bare);
    let sdir = tempfile::tempdir().unwrap();
    let spath = sdir.path().join("meta.redb");
    {
        use zebu_store::MetaStoreExt;
        let s = zebu_store::RedbStore::open(&spath).unwrap();
        s.put(
            "volumes",
            "vol-1",
            &serde_json::from_slice::<serde_json::Value>(vol).unwrap(),
        )
        .unwrap();
    }
    let mut store = vec![2u8];
    store.extend_from_slice(&std::fs::read(&spath).unwrap());
    put("manager_records", "store", &store);

    // REST bodies and URL names.
    put(
        "rest_bodies",
        "create",
        br#"{"name":"db","size_bytes":1073741824,"replica_count":3}"#,
    );
    put("rest_bodies", "attach", br#"{"node":"node-2"}"#);
    put("rest_bodies", "salvage", br#"{"replica":"db-r-0000abcd"}"#);
    put(
        "rest_bodies",
        "setting",
        b"replica-replenishment-wait-interval=300",
    );
    put("rest_bodies", "name", b"nope/../victim");
    put(
        "rest_bodies",
        "heartbeat",
        br#"{"cluster_id":null,"node":"node-1","address":"127.0.0.2","data_port":10700,"nbd_port":10809,"disk_path":"/d","disk_total_bytes":1,"disk_free_bytes":1,"max_file_bytes":17592186040320,"replicas":[{"name":"db-r-0000abcd","volume":"db","generation":3,"size_bytes":4096,"error":null}],"engines":[]}"#,
    );
    put(
        "rest_bodies",
        "retire",
        br#"{"node":"node-1","epoch":2,"retired":[{"name":"db-r-0000abcd","reason":"gone"}],"survivors":["db-r-0000ef01"],"generation":5}"#,
    );
    println!("seed corpora written under fuzz/corpus/");
}
