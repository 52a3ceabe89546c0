//! A replica directory whose layer index or write-intent log holds arbitrary bytes: opening it
//! and reading every block either works or fails with an error; it never panics.
#![no_main]
use libfuzzer_sys::fuzz_target;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

const SIZE: u64 = 256 << 10;

/// A small valid replica, made once: its directory and the names of its files.
fn template() -> &'static (tempfile::TempDir, PathBuf) {
    static T: OnceLock<(tempfile::TempDir, PathBuf)> = OnceLock::new();
    T.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let rdir = dir.path().join("fz-r-00000000");
        let files = zebu_replica::file::direct();
        let r = zebu_replica::Replica::create_in(&files, &rdir, "fz", "fz-r-00000000", SIZE, 4096)
            .unwrap();
        r.write(0, &[0x5a; 8192], false).unwrap();
        r.flush().unwrap();
        drop(r);
        (dir, rdir)
    })
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&which, bytes)) = data.split_first() else {
        return;
    };
    let (_, rdir) = template();
    let work = tempfile::tempdir().unwrap();
    let dir = work.path().join("fz-r-00000000");
    copy_dir(rdir, &dir);
    // Replace one file: an index (.idx) or the write-intent log, by the first byte.
    let target = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            let n = p.file_name().unwrap().to_string_lossy().into_owned();
            if which & 1 == 0 {
                n.ends_with(".idx")
            } else {
                n == "wil"
            }
        })
        .next();
    let Some(target) = target else { return };
    std::fs::write(&target, bytes).unwrap();
    let files = zebu_replica::file::direct();
    if let Ok(r) = zebu_replica::Replica::open_in(&files, &dir) {
        let mut buf = vec![0u8; 4096];
        let mut at = 0;
        while at < SIZE {
            let _ = r.read(at, &mut buf);
            at += 4096;
        }
    }
});
