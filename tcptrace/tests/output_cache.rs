//! Output to a regular file leaves the page cache once it is on disk
//! (drop-behind), all of it stays with `--keep-output-cached`, and neither
//! changes a byte of it; what a file held before tcptrace appended to it is
//! not tcptrace's to drop. Real files, real page cache: the pages a file has
//! in memory are counted with mincore(2).
use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use tcptrace::event::TcpFlags as F;
use tcptrace::pcap::build::{self, Conn};

/// Connections in the capture: about 4.8 KB of JSON each, some 57 MiB in
/// all, several times the 16 MiB tcptrace leaves cached.
const CONNS: u64 = 12_000;
const MIB: u64 = 1 << 20;

fn capture(dir: &Path) -> PathBuf {
    let mut frames = Vec::new();
    for i in 0..CONNS {
        let (host, port) = (i / 40_000, 20_000 + (i % 40_000) as u16);
        let mut c = Conn::new(&format!("10.1.{host}.1:{port}"), "10.2.0.1:80");
        c.now_ns = 1_700_000_000_000_000_000 + i * 1_000_000;
        c.step_ns = 20_000;
        c.handshake();
        c.client(F::PSH | F::ACK, 80);
        c.server(F::PSH | F::ACK, 700);
        c.client(F::FIN | F::ACK, 0);
        c.server(F::FIN | F::ACK, 0);
        c.client(F::ACK, 0);
        frames.extend(build::ethernet_frames(&c.segments));
    }
    let path = dir.join("many.pcap");
    std::fs::write(&path, build::pcap_file(&frames, 1)).expect("write the capture");
    path
}

/// `tcptrace pcap --json CAPTURE [extra]` with stdout going to `out`.
///
/// tcptrace drops only pages the disk has: it never waits for the disk,
/// and a capture's output comes faster than a disk takes it. So that what
/// is dropped does not depend on the disk's speed, tcptrace is stopped
/// every few milliseconds while its output so far is written out
/// (fdatasync), as if the disk kept up.
fn run_into(out: File, cap: &Path, extra: &[&str]) {
    let sync = out.try_clone().expect("dup the output");
    let mut child = Command::new(env!("CARGO_BIN_EXE_tcptrace"))
        .args(["pcap", "--json"])
        .arg(cap)
        .args(extra)
        .stdout(out)
        .stderr(Stdio::null())
        .spawn()
        .expect("run tcptrace");
    let pid = child.id() as libc::pid_t;
    let st = loop {
        if let Some(st) = child.try_wait().expect("wait for tcptrace") {
            break st;
        }
        // SAFETY: kill with our own child's pid, not yet reaped.
        unsafe { libc::kill(pid, libc::SIGSTOP) };
        sync.sync_data().expect("fdatasync the output");
        // SAFETY: as above.
        unsafe { libc::kill(pid, libc::SIGCONT) };
        std::thread::sleep(std::time::Duration::from_millis(3));
    };
    assert!(st.success(), "tcptrace pcap: {st}");
}

/// Bytes of `path` in the page cache between `from` and the end.
fn cached(path: &Path, from: u64) -> u64 {
    let f = File::open(path).expect("open the output");
    let len = f.metadata().expect("stat").len();
    // SAFETY: sysconf takes a plain number.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as u64;
    let pages = len.div_ceil(page) as usize;
    let mut vec = vec![0u8; pages];
    // SAFETY: a shared read-only mapping of `len` bytes of an open file,
    // unmapped below; mincore writes one byte per page into `vec`, which
    // has one per page.
    unsafe {
        let p = libc::mmap(
            std::ptr::null_mut(),
            len as usize,
            libc::PROT_READ,
            libc::MAP_SHARED,
            f.as_raw_fd(),
            0,
        );
        assert_ne!(p, libc::MAP_FAILED, "mmap the output");
        let rc = libc::mincore(p, len as usize, vec.as_mut_ptr());
        libc::munmap(p, len as usize);
        assert_eq!(rc, 0, "mincore");
    }
    let first = (from / page) as usize;
    vec[first..].iter().filter(|&&b| b & 1 != 0).count() as u64 * page
}

/// A file system that keeps a file's pages as its only copy (tmpfs) has
/// nothing to drop; the test wants one with a disk behind it.
fn on_disk(dir: &Path) -> bool {
    let c = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes()).expect("path");
    // SAFETY: statfs with a NUL-terminated path and a valid out pointer.
    let mut s: libc::statfs = unsafe { std::mem::zeroed() };
    let rc = unsafe { libc::statfs(c.as_ptr(), &mut s) };
    assert_eq!(rc, 0, "statfs {}", dir.display());
    // ramfs: 0x858458f6 (libc does not name it).
    !matches!(s.f_type, libc::TMPFS_MAGIC | 0x8584_58f6)
}

/// The test's directory, removed however the test ends: its files are
/// a few hundred MiB.
struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[test]
fn output_to_a_file_leaves_the_page_cache_once_on_disk() {
    let tmp = TempDir(
        Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("output-cache-{}", std::process::id())),
    );
    let dir = &tmp.0;
    std::fs::create_dir_all(dir).expect("temp dir");
    if !on_disk(dir) {
        eprintln!(
            "skipped: {} is on tmpfs, where a file's pages are its only copy",
            dir.display()
        );
        return;
    }
    let cap = capture(dir);

    let (dropped, kept) = (dir.join("dropped.json"), dir.join("kept.json"));
    run_into(File::create(&dropped).expect("create"), &cap, &[]);
    run_into(
        File::create(&kept).expect("create"),
        &cap,
        &["--keep-output-cached"],
    );
    // Counted before the files are read back, which caches them again.
    let (c_dropped, c_kept) = (cached(&dropped, 0), cached(&kept, 0));
    let out = std::fs::read(&dropped).expect("read the output");
    assert!(
        out == std::fs::read(&kept).expect("read the output"),
        "drop-behind changed the output"
    );
    let len = out.len() as u64;
    assert!(
        len > 48 * MIB,
        "only {len} bytes of output: too few to tell"
    );
    let text = std::str::from_utf8(&out).expect("UTF-8 output");
    let records = text
        .lines()
        .filter(|l| l.starts_with(r#"{"type":"connection""#))
        .count() as u64;
    let last: serde_json::Value = text
        .lines()
        .last()
        .and_then(|l| serde_json::from_str(l).ok())
        .unwrap_or_default();
    assert!(
        records == CONNS && last["type"] == "summary",
        "{records} connection records of {CONNS}, last line {last}: the output is cut short"
    );

    // The newest 16 to 20 MiB stay, and pages the disk did not have yet at
    // the last wakeup (written since the last fdatasync).
    assert!(
        c_dropped <= 32 * MIB,
        "{} of {} MiB still cached with drop-behind",
        c_dropped / MIB,
        len / MIB
    );
    assert!(
        c_kept >= len * 9 / 10,
        "--keep-output-cached: only {} of {} MiB cached",
        c_kept / MIB,
        len / MIB
    );

    // Appended (`>>`) to a file: the bytes before are the user's, left
    // cached and intact.
    let appended = dir.join("appended.json");
    let before = vec![b'#'; (24 * MIB) as usize];
    std::fs::write(&appended, &before).expect("write");
    run_into(
        OpenOptions::new()
            .append(true)
            .open(&appended)
            .expect("open to append"),
        &cap,
        &[],
    );
    let (c_all, c_tail) = (cached(&appended, 0), cached(&appended, before.len() as u64));
    assert!(
        c_all - c_tail == before.len() as u64,
        "tcptrace dropped the pages of what the file held before it"
    );
    assert!(
        c_tail <= 32 * MIB,
        "{} MiB of the appended output stayed cached",
        c_tail / MIB
    );
    let all = std::fs::read(&appended).expect("read");
    assert!(
        all.len() == before.len() + out.len()
            && all[..before.len()] == before[..]
            && all[before.len()..] == out[..],
        "appending changed what was there or what was written"
    );
}
