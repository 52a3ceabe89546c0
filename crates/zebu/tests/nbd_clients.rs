//! Real NBD clients (qemu-io, qemu-img, nbdinfo, nbdsh) against a 3-replica volume.

mod common;
use common::*;

#[test]
fn qemu_and_libnbd_clients_read_back_what_they_wrote() {
    require("qemu-io");
    require("nbdinfo");
    let c = Cluster::separate(11, 3);
    let uri = c.create_attached("vol-a", "256MiB", 3, "node-1");

    // Sizes, as seen by two client implementations.
    let info = sh(&format!("qemu-img info --output=json {uri}"));
    let v: serde_json::Value = serde_json::from_str(&info).unwrap();
    assert_eq!(v["virtual-size"], 256u64 << 20, "{info}");
    let size = sh(&format!("nbdinfo --size {uri}"));
    assert_eq!(size.trim(), (256u64 << 20).to_string());

    // Distinct patterns at many offsets, aligned and not, then read back verified.
    let spots: Vec<(u64, u64, u8)> = (0..40u64)
        .map(|i| {
            let off = (i * 6_421_337) % ((256 << 20) - (1 << 20));
            let len = 512 + (i * 7919) % (300 * 1024);
            (off, len, (i as u8).wrapping_mul(13).wrapping_add(1))
        })
        .collect();
    // Non-overlapping: shift each spot into its own 6 MiB slot.
    let spots: Vec<(u64, u64, u8)> = spots
        .into_iter()
        .enumerate()
        .map(|(i, (o, l, p))| (i as u64 * (6 << 20) + o % (5 << 20), l, p))
        .collect();
    let writes: Vec<String> = spots
        .iter()
        .map(|(o, l, p)| format!("write -P {p} {o} {l}"))
        .collect();
    qemu_io(&uri, &writes);
    let reads: Vec<String> = spots
        .iter()
        .map(|(o, l, p)| format!("read -P {p} {o} {l}"))
        .collect();
    let out = qemu_io(&uri, &reads);
    assert_eq!(out.matches("read ").count(), spots.len(), "{out}");

    // The same export over the attached node's unix socket, for clients on that node.
    let unix = c.volume("vol-a")["nbd_unix_uri"]
        .as_str()
        .expect("an attached volume has a unix-socket URI")
        .to_owned();
    assert!(unix.starts_with("nbd+unix:///vol-a?socket="), "{unix}");
    let out = qemu_io(&unix, &reads);
    assert_eq!(out.matches("read ").count(), spots.len(), "{out}");
    let size = sh(&format!("nbdinfo --size '{unix}'"));
    assert_eq!(size.trim(), (256u64 << 20).to_string());

    // A pattern check that must fail proves the checks above can fail.
    let (o, l, p) = spots[0];
    let wrong = run(std::process::Command::new("qemu-io").args([
        "-f",
        "raw",
        "-c",
        &format!("read -P {} {o} {l}", p ^ 0xff),
        &uri,
    ]));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&wrong.stdout),
        String::from_utf8_lossy(&wrong.stderr)
    );
    assert!(
        text.contains("Pattern verification failed"),
        "a wrong pattern went unnoticed: {text}"
    );

    // Never-written ranges are holes in the allocation map; written ones are data.
    let map = sh(&format!("nbdinfo --map {uri}"));
    let last_slot = 40u64 * (6 << 20);
    let hole_line = map
        .lines()
        .find(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            f.len() >= 4
                && f[0].parse::<u64>().ok().is_some_and(|s| s <= last_slot)
                && l.contains("hole")
        })
        .unwrap_or_else(|| panic!("no hole in the map:\n{map}"));
    assert!(hole_line.contains("zero"), "{hole_line}");
    let first = map.lines().next().unwrap();
    assert!(
        first.contains("data"),
        "offset 0 was written, the map says:\n{map}"
    );
    assert!(
        map.lines().last().unwrap().contains("hole"),
        "the tail was never written:\n{map}"
    );

    // Trim and write-zeroes read back as zeroes.
    qemu_io(
        &uri,
        &[
            "write -P 0x55 0 1M".into(),
            "discard 0 512k".into(),
            "write -z 512k 512k".into(),
        ],
    );
    qemu_io(&uri, &["read -P 0 0 1M".into()]);

    // LIST shows the export; an unknown export is refused while this one keeps serving.
    let list = sh(&format!("nbdinfo --list nbd://{}:10809", c.node_ip(0)));
    assert!(list.contains("vol-a"), "{list}");
    let bad = run(std::process::Command::new("nbdinfo")
        .arg(format!("nbd://{}:10809/no-such-volume", c.node_ip(0))));
    assert!(!bad.status.success(), "an unknown export must be refused");
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(
        err.contains("no-such-volume") || err.contains("unknown"),
        "{err}"
    );
    qemu_io(&uri, &["read -P 0 0 1M".into()]);

    // FUA writes and flushes through nbdsh (libnbd).
    let script = "h.pwrite(b'z' * 4096, 8192, nbd.CMD_FLAG_FUA); h.flush(); assert h.pread(4096, 8192) == b'z' * 4096; print('ok')";
    let o = sh(&format!(
        "PATH=/usr/bin:$PATH nbdsh -u {uri} -c \"{script}\""
    ));
    assert_eq!(o.trim(), "ok");
}

#[test]
fn detach_cuts_off_clients_that_are_still_connected() {
    require("nbdsh");
    require("qemu-io");
    let c = Cluster::separate(17, 2);
    let uri = c.create_attached("cut", "16MiB", 2, "node-1");
    // One client stays connected across the detach; its later writes must not land.
    let script = format!(
        r#"
import subprocess, os
h.pwrite(b'a' * 4096, 0)
h.flush()
subprocess.run(['{zebu}', 'volume', 'detach', 'cut'], check=True, capture_output=True)
try:
    h.pwrite(b'b' * 4096, 0)
    h.flush()
    print('still-writable')
except nbd.Error as e:
    print('cut-off')
"#,
        zebu = ZEBU
    );
    let o = run(std::process::Command::new("nbdsh")
        .args(["-u", &uri, "-c", &script])
        .env(
            "PATH",
            format!("/usr/bin:{}", std::env::var("PATH").unwrap_or_default()),
        )
        .env("ZEBU_API", &c.api)
        .env("ZEBU_TOKEN", &c.token));
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        out.contains("cut-off"),
        "a detached volume still took writes: {out}{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert_eq!(c.volume("cut")["state"], "detached");
    // Attach again: the data is the last acknowledged write, not the refused one.
    let uri = c
        .cli_ok(&["volume", "attach", "cut", "--node", "node-2"])
        .trim()
        .to_owned();
    qemu_io(&uri, &["read -P 0x61 0 4096".into()]);
}
