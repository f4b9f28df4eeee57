//! Stage 5's last step: output to stdout. [`StdoutWriter`] is what every mode
//! writes through; [`Output`] writes the live run's connection records and
//! summary on a thread of its own.
//!
//! Writing output is a good part of what tracing costs: every byte goes
//! into the page cache, and on a VM whose host takes back idle guest memory
//! a new page-cache page is a hypervisor fault (1.6-2.5 ns per byte measured
//! on the bench VM, against 0.06 for a page already cached and 0.2 for one
//! freed a moment before). The main thread, which matches, is the one that
//! falls behind at saturation; with the write(2)s here it only renders.
//! Lines reach the writer whole, in order: a chunk is handed over only
//! between two writes, and every record is one write.
use std::io::{self, Write};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::{Arc, OnceLock};
use std::thread::JoinHandle;

use crate::priority::Threads;

/// Bytes collected before they are handed to the writer.
const CHUNK: usize = 256 * 1024;
/// Chunks in flight to the writer; past that, writes wait (as a full
/// `BufWriter` would).
const QUEUED: usize = 64;
/// Emptied chunks kept for reuse (a fresh one is fresh pages, each a page
/// fault).
const SPARE: usize = 4;

pub struct Output {
    buf: Vec<u8>,
    tx: Option<SyncSender<Vec<u8>>>,
    spare: Receiver<Vec<u8>>,
    writer: Option<JoinHandle<io::Result<()>>>,
}

impl Output {
    /// Starts the writer thread, writing to stdout.
    pub fn stdout(threads: Arc<Threads>) -> io::Result<Output> {
        let (tx, rx) = sync_channel::<Vec<u8>>(QUEUED);
        let (spare_tx, spare) = sync_channel::<Vec<u8>>(SPARE);
        let writer = std::thread::Builder::new()
            .name("tcptrace-out".into())
            .spawn(move || -> io::Result<()> {
                threads.join();
                let mut out = StdoutWriter;
                for mut chunk in rx {
                    out.write_all(&chunk)?;
                    chunk.clear();
                    let _ = spare_tx.try_send(chunk);
                }
                out.flush()
            })?;
        Ok(Output {
            buf: Vec::with_capacity(CHUNK),
            tx: Some(tx),
            spare,
            writer: Some(writer),
        })
    }

    /// Hands what is collected to the writer.
    fn hand_over(&mut self) -> io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let next = (self.spare.try_recv()).unwrap_or_else(|_| Vec::with_capacity(CHUNK));
        let chunk = std::mem::replace(&mut self.buf, next);
        let sent = self.tx.as_ref().map(|tx| tx.send(chunk));
        match sent {
            Some(Ok(())) => Ok(()),
            // The writer stopped: its error says why.
            _ => Err(self
                .close()
                .err()
                .unwrap_or_else(|| io::Error::other("output closed"))),
        }
    }

    /// Ends the writer and waits for it; its error, if it had one.
    fn close(&mut self) -> io::Result<()> {
        drop(self.tx.take());
        match self.writer.take().map(JoinHandle::join) {
            None | Some(Ok(Ok(()))) => Ok(()),
            Some(Ok(Err(e))) => Err(e),
            Some(Err(_)) => Err(io::Error::other("the output thread panicked")),
        }
    }

    /// Writes out everything and waits until it is written.
    pub fn finish(mut self) -> io::Result<()> {
        self.hand_over()?;
        self.close()
    }
}

impl Write for Output {
    fn write(&mut self, b: &[u8]) -> io::Result<usize> {
        // Handed over before, not after: a chunk never ends inside a write.
        if self.buf.len() >= CHUNK {
            self.hand_over()?;
        }
        self.buf.extend_from_slice(b);
        Ok(b.len())
    }

    /// Hands over what is collected; does not wait for the write(2).
    fn flush(&mut self) -> io::Result<()> {
        self.hand_over()
    }
}

impl Drop for Output {
    /// Without `finish` (an error elsewhere ended the run), what is
    /// collected is still written.
    fn drop(&mut self) {
        if self.writer.is_some() {
            let _ = self.hand_over();
            let _ = self.close();
        }
    }
}

/// stdout, with drop-behind when it is a regular file: once the disk has
/// tcptrace's output, its pages leave the page cache (as with `dd
/// oflag=nocache`), so that a long trace does not push the host's own
/// cached files out, a few GB an hour at a busy host's rate. The newest
/// [`DROP_LAG`] to [`DROP_LAG`] + [`DROP_EVERY`] stay cached for whoever
/// follows the file (`tail -f`). It also makes writing cheaper where fresh
/// memory is dear: the next write(2)s take the pages just freed, not new
/// ones (on the bench VM, a long trace into a new file took half the
/// system CPU per event). `--keep-output-cached` turns it off.
///
/// The writers only count bytes and wake the `tcptrace-drop` thread, which
/// starts the writeback and drops pages: starting writeback can wait on
/// the file system (ext4's journal), and a ring's reader that waited on
/// the disk would lose events. That thread joins the live run's
/// [`Threads`] (see [`drop_with`]): it yields the CPU with the readers and
/// claims it back with them, so that a reader never waits at normal
/// priority on a journal handle the dropper holds at a lower one. It
/// never takes the file's position lock, which every write(2) takes (no
/// lseek: the file's size says where the output ends).
///
/// Each `write_all` is one write under stdout's lock, so lines written
/// by different threads never interleave.
pub struct StdoutWriter;

/// Bytes written between two wakeups of the dropper.
const DROP_EVERY: u64 = 4 << 20;
/// The newest bytes of the file left in the page cache: the dirty ones
/// and those whose writeback the last wakeup started (a page is dropped
/// two wakeups after its writeback started, by when the disk has it), and
/// what a reader following the file reads next.
const DROP_LAG: u64 = 16 << 20;

/// Leaves what tcptrace writes in the page cache (`--keep-output-cached`).
/// Call before the first write.
pub fn keep_cached() {
    KEEP.store(true, Ordering::Relaxed);
}

/// The live run's threads, which the dropper joins. Call before the first
/// write; without it (`tcptrace pcap`) the dropper runs at normal priority.
pub fn drop_with(threads: Arc<Threads>) {
    let _ = THREADS.set(threads);
}

static KEEP: AtomicBool = AtomicBool::new(false);
static THREADS: OnceLock<Arc<Threads>> = OnceLock::new();

struct DropBehind {
    /// Bytes tcptrace has written.
    written: AtomicU64,
    /// Wakes the dropper; holds at most one wakeup, never blocks a writer.
    wake: SyncSender<()>,
}

/// Some when stdout is a regular file and drop-behind is on; the first
/// call starts the dropper.
fn drop_behind() -> Option<&'static DropBehind> {
    static STATE: OnceLock<Option<DropBehind>> = OnceLock::new();
    STATE
        .get_or_init(|| {
            if KEEP.load(Ordering::Relaxed) {
                return None;
            }
            let start = output_start()?;
            let (wake, woken) = sync_channel(1);
            std::thread::Builder::new()
                .name("tcptrace-drop".into())
                .spawn(move || dropper(start, woken))
                .ok()?;
            Some(DropBehind {
                written: AtomicU64::new(0),
                wake,
            })
        })
        .as_ref()
}

/// Where tcptrace's output begins in stdout's file, None when stdout is
/// not a regular file: what the file held before (`>>`) is not
/// tcptrace's to drop.
fn output_start() -> Option<u64> {
    let fd = io::stdout().as_raw_fd();
    let st = fstat(fd)?;
    if st.st_mode & libc::S_IFMT != libc::S_IFREG {
        return None;
    }
    // SAFETY: fcntl and lseek take plain numbers; lseek(SEEK_CUR, 0) does
    // not move the position.
    let (flags, pos) = unsafe {
        (
            libc::fcntl(fd, libc::F_GETFL),
            libc::lseek(fd, 0, libc::SEEK_CUR),
        )
    };
    // With O_APPEND the position moves to the end only at a write.
    let start = if flags & libc::O_APPEND != 0 {
        st.st_size
    } else {
        pos
    };
    u64::try_from(start).ok()
}

fn fstat(fd: i32) -> Option<libc::stat> {
    // SAFETY: a plain-old-data struct, filled by fstat on success.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: a valid out pointer; a bad descriptor only fails the call.
    (unsafe { libc::fstat(fd, &mut st) } == 0).then_some(st)
}

/// The `tcptrace-drop` thread: at each wakeup, starts the writeback of all
/// but the newest half of the lag and drops what is older than the lag.
/// The hints' errors are ignored: a file system that cannot drop pages
/// keeps them, as it would without this. Ends with the process.
fn dropper(mut start: u64, woken: Receiver<()>) {
    if let Some(t) = THREADS.get() {
        t.join();
    }
    let fd = io::stdout().as_raw_fd();
    while woken.recv().is_ok() {
        let Some(end) = fstat(fd).and_then(|st| u64::try_from(st.st_size).ok()) else {
            continue;
        };
        // Truncated under tcptrace (logrotate's copytruncate): what is
        // there now is all tcptrace's.
        if end < start {
            start = 0;
        }
        // Writeback first: two wakeups later, when a page is older than
        // the lag, the disk has it.
        if let Some((off, len)) = span(start, end, DROP_LAG / 2) {
            // SAFETY: plain numbers.
            unsafe { libc::sync_file_range(fd, off, len, libc::SYNC_FILE_RANGE_WRITE) };
        }
        if let Some((off, len)) = span(start, end, DROP_LAG) {
            // SAFETY: plain numbers.
            unsafe { libc::posix_fadvise(fd, off, len, libc::POSIX_FADV_DONTNEED) };
        }
    }
}

/// (offset, length) from `start` to `lag` before `end`, if not empty: a
/// length of 0 would mean "to the end of the file" to both hints.
fn span(start: u64, end: u64, lag: u64) -> Option<(i64, i64)> {
    let to = end.saturating_sub(lag);
    (to > start).then(|| (start as i64, (to - start) as i64))
}

impl DropBehind {
    fn wrote(&self, n: usize) {
        let before = self.written.fetch_add(n as u64, Ordering::Relaxed);
        if (before + n as u64) / DROP_EVERY != before / DROP_EVERY {
            let _ = self.wake.try_send(());
        }
    }
}

impl Write for StdoutWriter {
    fn write(&mut self, b: &[u8]) -> io::Result<usize> {
        // Looked at before the first write: where tcptrace's output starts.
        let d = drop_behind();
        let n = io::stdout().lock().write(b)?;
        if let Some(d) = d {
            d.wrote(n);
        }
        Ok(n)
    }

    fn write_all(&mut self, b: &[u8]) -> io::Result<()> {
        let d = drop_behind();
        io::stdout().lock().write_all(b)?;
        if let Some(d) = d {
            d.wrote(b.len());
        }
        Ok(())
    }

    fn flush(&mut self) -> io::Result<()> {
        io::stdout().flush()
    }
}
