//! REST request bodies and the names and values that come in URLs: decoded and checked as the
//! manager does, never a panic.
#![no_main]
use libfuzzer_sys::fuzz_target;
use zebu_api::{AttachVolume, CreateVolume, Heartbeat, RetireMembers, SalvageVolume, SetSetting};

fuzz_target!(|data: &[u8]| {
    let _ = serde_json::from_slice::<CreateVolume>(data);
    let _ = serde_json::from_slice::<AttachVolume>(data);
    let _ = serde_json::from_slice::<SalvageVolume>(data);
    let _ = serde_json::from_slice::<SetSetting>(data);
    let _ = serde_json::from_slice::<RetireMembers>(data);
    if let Ok(hb) = serde_json::from_slice::<Heartbeat>(data) {
        let _ = zebu_manager::state::validate_node_name(&hb.node);
        for r in &hb.replicas {
            let _ = zebu_manager::state::validate_object_name("replica", &r.name);
        }
    }
    if let Ok(s) = std::str::from_utf8(data) {
        let _ = zebu_manager::state::validate_volume_name(s);
        let _ = zebu_manager::state::validate_node_name(s);
        let (name, value) = s.split_once('=').unwrap_or((s, ""));
        if let Ok(d) = zebu_manager::settings::def(name) {
            let _ = d.parse(value);
        }
        let seg = zebu_api::seg(s);
        assert!(!seg.contains('/') && !seg.contains('?') && !seg.contains('#'));
    }
});
