//! A kernel block device on a Zebu volume (nbdfuse + loop), ext4 on it, through a restart of
//! the whole all-in-one cluster.

mod common;
use common::*;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

struct Mounted {
    fuse_dir: String,
    mnt: String,
    loopdev: String,
    nbdfuse: Child,
}

fn attach_block(d: &str, uri: &str) -> Mounted {
    let fuse_dir = format!("{d}/fuse");
    let mnt = format!("{d}/mnt");
    sh(&format!("mkdir -p {fuse_dir} {mnt}"));
    let nbdfuse = Command::new("nbdfuse")
        .arg(format!("{fuse_dir}/dev"))
        .arg(uri)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("starting nbdfuse");
    wait_until("nbdfuse device file", Duration::from_secs(20), || {
        std::fs::metadata(format!("{fuse_dir}/dev"))
            .ok()
            .filter(|m| m.len() > 0)
            .map(|_| ())
    });
    let loopdev = sh(&format!("losetup -f --show {fuse_dir}/dev"))
        .trim()
        .to_owned();
    Mounted {
        fuse_dir,
        mnt,
        loopdev,
        nbdfuse,
    }
}

fn detach_block(mut m: Mounted) {
    sh(&format!("losetup -d {}", m.loopdev));
    sh(&format!(
        "fusermount3 -u {} || umount {}",
        m.fuse_dir, m.fuse_dir
    ));
    let _ = wait_until("nbdfuse exit", Duration::from_secs(20), || {
        m.nbdfuse.try_wait().ok().flatten()
    });
}

fn start_up(c: &mut Cluster) -> String {
    let d = c.dir.path().display().to_string();
    let child = Command::new(ZEBU)
        .args([
            "up",
            "--data-dir",
            &format!("{d}/data"),
            "--api",
            &format!("127.0.{}.1:9500", c.net),
        ])
        .args(["--first-ip", &format!("127.0.{}.2", c.net)])
        .stdout(Stdio::from(
            std::fs::File::create(format!("{d}/up.out")).unwrap(),
        ))
        .stderr(Stdio::from(
            std::fs::File::create(format!("{d}/up.log")).unwrap(),
        ))
        .spawn()
        .expect("starting zebu up");
    c.up = Some(child);
    let out = wait_until(
        "zebu up to print the demo URI",
        Duration::from_secs(90),
        || {
            let s = std::fs::read_to_string(format!("{d}/up.out")).ok()?;
            s.contains("is attached").then_some(s)
        },
    );
    c.token = std::fs::read_to_string(format!("{d}/data/admin.token"))
        .unwrap()
        .trim()
        .to_owned();
    let uri = out
        .split_whitespace()
        .find(|w| w.starts_with("nbd://"))
        .unwrap_or_else(|| panic!("no URI in: {out}"))
        .to_owned();
    uri
}

fn stop_up(c: &mut Cluster) {
    let mut child = c.up.take().unwrap();
    // SIGTERM: clean shutdown.
    sh(&format!("kill -TERM {}", child.id()));
    let status = wait_until("zebu up to exit", Duration::from_secs(30), || {
        child.try_wait().ok().flatten()
    });
    assert!(status.success(), "zebu up exited with {status}");
}

#[test]
fn ext4_on_a_volume_survives_umount_fsck_and_cluster_restart() {
    for t in ["nbdfuse", "losetup", "mkfs.ext4", "e2fsck", "fusermount3"] {
        require(t);
    }
    let dir = tempfile::Builder::new()
        .prefix("zebu-fs-")
        .tempdir()
        .unwrap();
    let mut c = Cluster {
        dir,
        net: 16,
        api: "http://127.0.16.1:9500".into(),
        manager: None,
        agents: vec![],
        up: None,
        token: String::new(),
        agent_args: vec![],
    };
    let d = c.dir.path().display().to_string();
    let uri = start_up(&mut c);
    let v = c.volume("demo");
    assert_eq!(v["replicas"].as_array().unwrap().len(), 3, "{v}");
    assert_eq!(v["robustness"], "healthy");

    let m = attach_block(&d, &uri);
    sh(&format!("mkfs.ext4 -F -q {}", m.loopdev));
    sh(&format!("mount {} {}", m.loopdev, m.mnt));
    // A tree of files of many sizes.
    sh(&format!(
        "cd {mnt} && mkdir -p a/b/c && for i in $(seq 1 40); do head -c $((i * 37 * 1024 + i)) /dev/urandom > a/f$i; done \
         && head -c 20M /dev/urandom > a/b/big && cp a/f1 a/b/c/copy && sync",
        mnt = m.mnt
    ));
    let sums = sh(&format!(
        "cd {} && find . -type f -print0 | sort -z | xargs -0 sha256sum",
        m.mnt
    ));
    sh(&format!("umount {}", m.mnt));
    sh(&format!("e2fsck -fn {}", m.loopdev));
    sh(&format!("mount {} {}", m.loopdev, m.mnt));
    let again = sh(&format!(
        "cd {} && find . -type f -print0 | sort -z | xargs -0 sha256sum",
        m.mnt
    ));
    assert_eq!(sums, again);
    sh(&format!("umount {}", m.mnt));
    detach_block(m);

    // Stop and start the whole cluster: the volume comes back with its data, not created twice.
    stop_up(&mut c);
    let uri2 = start_up(&mut c);
    assert_eq!(uri, uri2);
    let vols = c.cli_json(&["volume", "list"]).unwrap();
    assert_eq!(vols.as_array().unwrap().len(), 1, "{vols}");
    let m = attach_block(&d, &uri2);
    sh(&format!("e2fsck -fn {}", m.loopdev));
    sh(&format!("mount {} {}", m.loopdev, m.mnt));
    let after = sh(&format!(
        "cd {} && find . -type f -print0 | sort -z | xargs -0 sha256sum",
        m.mnt
    ));
    assert_eq!(sums, after, "files changed across a cluster restart");
    sh(&format!("umount {}", m.mnt));
    detach_block(m);
    stop_up(&mut c);
}

/// ext4 on a volume: files, a snapshot (the filesystem frozen for it), more changes, a clone
/// from the snapshot; the clone mounts with the files of the snapshot's moment, byte for byte,
/// and `e2fsck -fn` finds it clean.
#[test]
fn a_clone_of_an_ext4_snapshot_holds_the_files_of_its_moment() {
    for t in [
        "nbdfuse",
        "losetup",
        "mkfs.ext4",
        "e2fsck",
        "fusermount3",
        "fsfreeze",
    ] {
        require(t);
    }
    let c = Cluster::separate(67, 2);
    let d = c.dir.path().display().to_string();
    let uri = c.create_attached("fs", "128MiB", 2, "node-1");
    sh(&format!("mkdir -p {d}/a {d}/b"));
    let m = attach_block(&format!("{d}/a"), &uri);
    sh(&format!("mkfs.ext4 -F -q {}", m.loopdev));
    sh(&format!("mount {} {}", m.loopdev, m.mnt));
    for (f, mib) in [("one", 1), ("two", 3), ("three", 2)] {
        sh(&format!(
            "dd if=/dev/urandom of={}/{f} bs=1M count={mib} status=none",
            m.mnt
        ));
    }
    sh(&format!(
        "mkdir {0}/dir && echo hello > {0}/dir/note",
        m.mnt
    ));
    let sums = |dir: &str| sh(&format!("cd {dir} && sha256sum one two three dir/note"));
    let at_snapshot = sums(&m.mnt);
    // The snapshot of a frozen filesystem: everything it acknowledged is in it.
    sh(&format!("fsfreeze -f {}", m.mnt));
    let taken = c.cli(&["snapshot", "create", "fs", "s1"]);
    sh(&format!("fsfreeze -u {}", m.mnt));
    assert!(
        taken.status.success(),
        "{}",
        String::from_utf8_lossy(&taken.stderr)
    );
    // More changes after it.
    sh(&format!(
        "dd if=/dev/urandom of={0}/one bs=1M count=1 conv=notrunc status=none && rm {0}/two && echo later > {0}/four && sync",
        m.mnt
    ));
    let one_now = sh(&format!("cd {} && sha256sum one", m.mnt));
    assert_ne!(one_now.lines().next(), at_snapshot.lines().next());
    let out = c.cli_ok(&[
        "volume",
        "clone",
        "copy",
        "--from",
        "fs/s1",
        "--replicas",
        "2",
    ]);
    assert!(out.contains("verified"), "{out}");
    let v = c.volume("copy");
    assert_eq!(v["state"], "detached", "{v}");
    assert_eq!(v["size_bytes"].as_u64().unwrap(), 128 << 20, "{v}");
    // The clone, mounted (which replays the journal the freeze left), holds the snapshot's files.
    let copy_uri = c
        .cli_ok(&["volume", "attach", "copy", "--node", "node-2"])
        .trim()
        .to_owned();
    let m2 = attach_block(&format!("{d}/b"), &copy_uri);
    sh(&format!("mount {} {}", m2.loopdev, m2.mnt));
    assert_eq!(
        sums(&m2.mnt),
        at_snapshot,
        "the clone's files differ from the snapshot's"
    );
    assert!(
        !std::path::Path::new(&format!("{}/four", m2.mnt)).exists(),
        "a file made after the snapshot is in the clone"
    );
    sh(&format!("umount {}", m2.mnt));
    sh(&format!("e2fsck -fn {}", m2.loopdev));
    // The source went on unchanged by the clone.
    assert!(std::path::Path::new(&format!("{}/four", m.mnt)).exists());
    sh(&format!("umount {}", m.mnt));
    sh(&format!("e2fsck -fn {}", m.loopdev));
    detach_block(m2);
    detach_block(m);
}
