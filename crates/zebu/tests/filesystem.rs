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
    // The clone is usable at once, attached while its copy runs in the background: mounted
    // (which replays the journal the freeze left) before the copy is done, it holds the
    // snapshot's files.
    let copy_uri = c
        .cli_ok(&[
            "volume",
            "clone",
            "copy",
            "--from",
            "fs/s1",
            "--replicas",
            "2",
            "--node",
            "node-2",
        ])
        .trim()
        .to_owned();
    let v = c.volume("copy");
    assert_eq!(v["state"], "attached", "{v}");
    assert_eq!(v["size_bytes"].as_u64().unwrap(), 128 << 20, "{v}");
    assert_eq!(v["clone"]["snapshot"], "s1", "{v}");
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

/// Whether this process may resize a mounted ext4 (CAP_SYS_RESOURCE, bit 24 of CapEff).
fn has_cap_sys_resource() -> bool {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|h| u64::from_str_radix(h.trim(), 16).ok())
        .is_some_and(|caps| caps >> 24 & 1 == 1)
}

/// A loop device over a volume's file in the agent's FUSE frontend, and its mount: undone
/// when dropped, whatever the test did.
struct FuseDisk {
    loopdev: String,
    mnt: String,
}

impl Drop for FuseDisk {
    fn drop(&mut self) {
        // Lazily: a process (fio) may still hold a file there when a test fails.
        let _ = Command::new("umount").arg("-l").arg(&self.mnt).status();
        let _ = Command::new("losetup").args(["-d", &self.loopdev]).status();
    }
}

/// The FUSE frontend and must-hold 7 of the snapshots issue: ext4 on a loop device over an
/// attached 3-replica volume's file in the agent's FUSE directory, written through the
/// filesystem by fio with verification, while the volume grows. No error; the file shows the
/// new size at once; `losetup -c` and `resize2fs` on the mounted ext4 then give the filesystem
/// the new size (df); the files written before keep their checksums; `e2fsck -fn` is clean.
/// (Where root lacks CAP_SYS_RESOURCE, as on these machines, the kernel refuses an online
/// resize of ext4 to anyone: `resize2fs` then runs on the unmounted filesystem, after fio.)
#[test]
fn ext4_on_the_fuse_frontend_grows_online_with_resize2fs() {
    for tool in [
        "mkfs.ext4",
        "resize2fs",
        "e2fsck",
        "losetup",
        "fio",
        "fusermount3",
    ] {
        require(tool);
    }
    let c = Cluster::separate_with(72, 3, &["--fuse-dir", "{data}/fuse"]);
    c.create_attached("fs", "256MiB", 3, "node-1");
    let file = c.dir.path().join("node-1/fuse/fs");
    let len = wait_until(
        "the volume's file in the FUSE frontend",
        Duration::from_secs(20),
        || std::fs::metadata(&file).ok().map(|m| m.len()),
    );
    assert_eq!(len, 256 << 20);
    let v = c.volume("fs");
    assert_eq!(
        v["block_file"].as_str().map(std::path::PathBuf::from),
        Some(std::fs::canonicalize(&file).unwrap()),
        "{v}"
    );
    let d = c.dir.path().display().to_string();
    let loopdev = sh(&format!(
        "losetup --direct-io=on -f --show {}",
        file.display()
    ))
    .trim()
    .to_owned();
    let disk = FuseDisk {
        loopdev: loopdev.clone(),
        mnt: format!("{d}/mnt"),
    };
    sh(&format!("mkfs.ext4 -q -F {loopdev}"));
    sh(&format!("mkdir -p {0} && mount {loopdev} {0}", disk.mnt));
    sh(&format!(
        "dd if=/dev/urandom of={0}/before bs=1M count=24 status=none && sync",
        disk.mnt
    ));
    let before = sh(&format!("sha256sum {}/before", disk.mnt));
    let fio = Command::new("fio")
        .current_dir(c.dir.path())
        .args([
            "--name=fs",
            &format!("--filename={}/fio.dat", disk.mnt),
            "--size=48m",
            "--rw=randwrite",
            "--bs=16k",
            "--ioengine=psync",
            "--direct=1",
            "--rate=6m",
            "--verify=crc32c",
            "--do_verify=1",
            "--verify_fatal=1",
        ])
        .stdout(Stdio::from(
            std::fs::File::create(c.dir.path().join("fio.out")).unwrap(),
        ))
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting fio");
    std::thread::sleep(Duration::from_secs(2));
    c.cli_ok(&["volume", "expand", "fs", "--size", "512MiB"]);
    assert_eq!(std::fs::metadata(&file).unwrap().len(), 512 << 20);
    sh(&format!("losetup -c {loopdev}"));
    let dev_size: u64 = sh(&format!("blockdev --getsize64 {loopdev}"))
        .trim()
        .parse()
        .unwrap();
    assert_eq!(dev_size, 512 << 20);
    if has_cap_sys_resource() {
        sh(&format!("resize2fs {loopdev} 2>&1"));
        fio_ok(&c, fio);
    } else {
        // ext4's online resize (EXT4_IOC_RESIZE_FS) needs CAP_SYS_RESOURCE, which this
        // machine's root lacks: the filesystem is grown unmounted, once fio is done. The
        // device grew under fio all the same.
        eprintln!("no CAP_SYS_RESOURCE here: resize2fs runs on the unmounted filesystem");
        fio_ok(&c, fio);
        sh(&format!("umount {}", disk.mnt));
        sh(&format!("e2fsck -fy {loopdev} 2>&1"));
        sh(&format!("resize2fs {loopdev} 2>&1"));
        sh(&format!("mount {loopdev} {}", disk.mnt));
    }
    let df_kib: u64 = sh(&format!("df -k --output=size {} | tail -1", disk.mnt))
        .trim()
        .parse()
        .unwrap();
    assert!(df_kib > 400 * 1024, "df shows {df_kib} KiB after resize2fs");
    assert_eq!(sh(&format!("sha256sum {}/before", disk.mnt)), before);
    // Written after the growth, past the old end of the device: the filesystem uses it.
    sh(&format!(
        "dd if=/dev/urandom of={0}/after bs=1M count=200 status=none && sync",
        disk.mnt
    ));
    sh(&format!("umount {}", disk.mnt));
    let fsck = run(Command::new("e2fsck").args(["-fn", &loopdev]));
    assert!(
        fsck.status.success(),
        "e2fsck: {}{}",
        String::from_utf8_lossy(&fsck.stdout),
        String::from_utf8_lossy(&fsck.stderr)
    );
    drop(disk);
}
