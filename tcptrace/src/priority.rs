//! How a live run shares the CPU with the workload it traces.
//!
//! By default (`--priority yield`) tcptrace's threads run as `SCHED_IDLE`:
//! they take only CPU time that nothing else wants, and any task of the
//! traced host that wakes up preempts them at once, where at normal priority
//! the scheduler may let a tracer thread finish its slice first. Under the
//! bench's connection storm that is worth 6-10 % more connections per
//! second (paired rounds, same tracer CPU per event): the storm leaves idle
//! gaps (a CPU waiting for the other's softirq or wakeup) that the tracer
//! fills instead of delaying the storm. The price is context switches: a
//! yielding thread is preempted far more often (three to four times as many
//! switches), which costs some CPU on a VM.
//!
//! Yielding must not cost events. A host with no idle CPU would starve the
//! readers and the kernel would drop records once a ring is full, so a
//! guard thread at normal priority reads how full each ring is (the
//! kernel's producer and consumer positions, mapped read-only); when one is
//! [`CLAIM_AT`] full every thread of the run goes back to normal priority,
//! and it yields again once the rings have stayed below [`KEPT_UP`] for
//! [`CAUGHT_UP_FOR`]. `--priority normal` never yields. The events that
//! the readers took and the matcher has not matched yet count the same way
//! ([`Backlog`]): a starved matcher stops taking the readers' batches once
//! that backlog is full, and the rings fill behind it.
//!
//! Yielding is the default only where claiming works at once: on Linux 6.6
//! and later (the EEVDF scheduler), a thread moved from SCHED_IDLE to
//! SCHED_OTHER competes at its new weight straight away. Before 6.6 (CFS) it
//! keeps the virtual runtime it accrued at idle weight, 340 times faster
//! than at normal weight, and can wait a second or more for the CPU after a
//! claim: in the 6.1 test VM a starved, claiming run still lost events where
//! a normal-priority one would not. There the default is `normal`, and
//! also without CAP_SYS_NICE (tracing with CAP_BPF, CAP_PERFMON and
//! CAP_NET_ADMIN alone), which leaving SCHED_IDLE needs.
use std::os::fd::{AsRawFd, BorrowedFd};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::{Context as _, Result};

/// A ring this full (fraction) is falling behind. A yielding reader leaves
/// records waiting while the workload runs (under the bench's storm, a
/// quarter of the default ring at times: claiming there made the run flip
/// every second or two); half leaves the other half, about 100 ms of that
/// storm with wire capture, for the claimed threads to be scheduled.
pub const CLAIM_AT: f64 = 0.5;
/// Rings below this (fraction) have kept up.
pub const KEPT_UP: f64 = 0.05;
/// How long the rings must stay below [`KEPT_UP`] before the run yields
/// again: a workload that saturates the host for seconds should not make
/// the run flip back and forth every few milliseconds.
pub const CAUGHT_UP_FOR: Duration = Duration::from_secs(1);
/// How often the guard looks: a default ring (4 MiB) fills in about 70 ms
/// at the highest event rates measured.
const EVERY: Duration = Duration::from_millis(10);

/// Whether this kernel's scheduler lets a claim take effect at once (see the
/// module's comment): Linux 6.6 or later.
pub fn claims_at_once() -> bool {
    // SAFETY: uname fills the struct it is given.
    let mut u: libc::utsname = unsafe { std::mem::zeroed() };
    if unsafe { libc::uname(&mut u) } != 0 {
        return false;
    }
    // SAFETY: uname NUL-terminates release.
    let release = unsafe { std::ffi::CStr::from_ptr(u.release.as_ptr()) };
    kernel_at_least(&release.to_string_lossy(), (6, 6))
}

/// Whether a run yields unless told otherwise: where a claim works at once
/// and the run may make it.
pub fn yields_by_default() -> bool {
    claims_at_once() && can_claim()
}

/// Whether the run may leave SCHED_IDLE again, which a claim needs: with
/// CAP_SYS_NICE (root has it); without it the kernel refuses unless
/// RLIMIT_NICE allows nice 0, which by default it does not.
pub fn can_claim() -> bool {
    const CAP_SYS_NICE: u32 = 23;
    crate::bpf::effective_caps() & (1 << CAP_SYS_NICE) != 0
}

/// `release` (as `uname -r` prints it, "6.18.0-1-amd64") is `want` or later.
fn kernel_at_least(release: &str, want: (u32, u32)) -> bool {
    let mut parts = release.split(|c: char| !c.is_ascii_digit());
    let num = |p: Option<&str>| p.and_then(|p| p.parse::<u32>().ok());
    match (num(parts.next()), num(parts.next())) {
        (Some(major), Some(minor)) => (major, minor) >= want,
        _ => false,
    }
}

/// What the guard does next, from how full the fullest ring is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Stay as we are.
    Stay,
    /// Back to normal priority: a ring is filling up.
    Claim,
    /// Yield again: the rings have stayed nearly empty long enough.
    Yield,
}

/// The guard's decision, apart from the system calls (table-tested).
#[derive(Debug, Default)]
pub struct Policy {
    claimed: bool,
    /// Since when (ns) the readers have kept up while claimed.
    kept_up_since: Option<u64>,
}

impl Policy {
    /// `fill`: the fullest ring's fill (0 to 1) at `now_ns`.
    pub fn observe(&mut self, now_ns: u64, fill: f64) -> Verdict {
        if !self.claimed {
            if fill >= CLAIM_AT {
                self.claimed = true;
                self.kept_up_since = None;
                return Verdict::Claim;
            }
            return Verdict::Stay;
        }
        if fill >= KEPT_UP {
            self.kept_up_since = None;
            return Verdict::Stay;
        }
        let since = *self.kept_up_since.get_or_insert(now_ns);
        if now_ns - since >= CAUGHT_UP_FOR.as_nanos() as u64 {
            self.claimed = false;
            self.kept_up_since = None;
            return Verdict::Yield;
        }
        Verdict::Stay
    }
}

/// The run's threads and their scheduling policy.
pub struct Threads {
    yielding: bool,
    tids: Mutex<Vec<libc::pid_t>>,
    /// Currently at normal priority although yielding was asked for.
    claimed: AtomicBool,
    /// When (CLOCK_MONOTONIC ns) the current claim began.
    claimed_at: AtomicU64,
    /// Nanoseconds spent claimed, and claims, for the summary.
    claimed_ns: AtomicU64,
    claims: AtomicU64,
}

impl Threads {
    /// `yielding`: run as `SCHED_IDLE` (see the module's comment).
    pub fn new(yielding: bool) -> Arc<Threads> {
        Arc::new(Threads {
            yielding,
            tids: Mutex::new(Vec::new()),
            claimed: AtomicBool::new(false),
            claimed_at: AtomicU64::new(0),
            claimed_ns: AtomicU64::new(0),
            claims: AtomicU64::new(0),
        })
    }

    fn tids(&self) -> std::sync::MutexGuard<'_, Vec<libc::pid_t>> {
        self.tids.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Makes the calling thread one of the run's: it yields with the rest.
    pub fn join(&self) {
        // SAFETY: gettid has no preconditions.
        let tid = unsafe { libc::gettid() };
        let mut tids = self.tids();
        tids.push(tid);
        if self.yielding && !self.claimed.load(Ordering::Relaxed) {
            set_policy(tid, libc::SCHED_IDLE);
        }
    }

    /// Every thread of the run to `policy`. A thread that has ended is
    /// skipped (its tid fails with ESRCH, or names a stranger's thread only
    /// if the tid was reused, which takes the kernel's pid space wrapping
    /// around during the run: the guard stops before the threads end).
    fn set_all(&self, policy: libc::c_int) {
        for &tid in self.tids().iter() {
            set_policy(tid, policy);
        }
    }

    /// Every thread back to normal priority (the guard's claim).
    fn claim(&self, now_ns: u64) {
        self.claimed_at.store(now_ns, Ordering::Relaxed);
        self.claimed.store(true, Ordering::Relaxed);
        self.claims.fetch_add(1, Ordering::Relaxed);
        self.set_all(libc::SCHED_OTHER);
    }

    /// Ends a claim, if there is one, counting its time; every thread to
    /// `policy`.
    fn unclaim(&self, now_ns: u64, policy: libc::c_int) {
        if self.claimed.swap(false, Ordering::Relaxed) {
            let since = self.claimed_at.load(Ordering::Relaxed);
            self.claimed_ns.fetch_add(now_ns - since, Ordering::Relaxed);
        }
        self.set_all(policy);
    }

    /// The run is ending: every thread back to normal priority, so that
    /// draining, the summary and detaching do not wait for an idle CPU.
    /// Call after the guard is dropped.
    pub fn end(&self) {
        if self.yielding {
            self.unclaim(crate::reader::monotonic_ns(), libc::SCHED_OTHER);
        }
    }

    /// Claims spent at normal priority so far and for how long (ms).
    pub fn claimed(&self) -> (u64, u64) {
        (
            self.claims.load(Ordering::Relaxed),
            self.claimed_ns.load(Ordering::Relaxed) / 1_000_000,
        )
    }
}

/// Best effort: without CAP_SYS_NICE a thread may not leave SCHED_IDLE, but
/// a live run has it (it is root), and priority never decides correctness.
fn set_policy(tid: libc::pid_t, policy: libc::c_int) {
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: a valid sched_param; a stale tid only makes the call fail.
    let rc = unsafe { libc::sched_setscheduler(tid, policy, &param) };
    if rc != 0 {
        log::debug!(
            "sched_setscheduler({tid}, {policy}): {}",
            std::io::Error::last_os_error()
        );
    }
}

/// How full a ring buffer is, from its positions: the consumer page and the
/// producer page that follows it, mapped read-only (the kernel allows any
/// read-only mapping of a ring; the reader's own, aya's, stays as it is).
pub struct RingFill {
    pages: *mut libc::c_void,
    page: usize,
    size: u64,
}

// SAFETY: the mapping is only read, with atomic loads; it lives until drop.
unsafe impl Send for RingFill {}

impl RingFill {
    pub fn new(ring: BorrowedFd<'_>) -> Result<RingFill> {
        let fd = ring.as_raw_fd();
        let size = crate::bpf::fdinfo_field(fd, "max_entries")
            .context("no max_entries in the ring buffer's fdinfo")?;
        // SAFETY: sysconf has no preconditions.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as usize;
        // SAFETY: a fresh read-only shared mapping of the map's first two
        // pages; the kernel checks the fd and the range.
        let pages = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                2 * page,
                libc::PROT_READ,
                libc::MAP_SHARED,
                fd,
                0,
            )
        };
        if pages == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error())
                .context("mapping the ring buffer's positions");
        }
        Ok(RingFill { pages, page, size })
    }

    /// Bytes written by the kernel and not yet consumed, as a fraction of
    /// the ring.
    pub fn fill(&self) -> f64 {
        // SAFETY: both positions are 8-byte aligned words in the mapping,
        // written by the kernel and by the reader; read atomically.
        let (consumer, producer) = unsafe {
            let at = |off: usize| {
                (*(self.pages.cast::<u8>().add(off) as *const AtomicU64)).load(Ordering::Acquire)
            };
            (at(0), at(self.page))
        };
        producer.saturating_sub(consumer) as f64 / self.size as f64
    }
}

/// The events waiting for the matcher, out of the most it holds: a second
/// queue in front of the rings, watched like them.
pub struct Backlog {
    held: AtomicUsize,
    max: usize,
}

impl Backlog {
    pub fn new(max: usize) -> Backlog {
        Backlog {
            held: AtomicUsize::new(0),
            max: max.max(1),
        }
    }

    /// Set by the matcher's loop at every turn (one relaxed store).
    pub fn set(&self, held: usize) {
        self.held.store(held, Ordering::Relaxed);
    }

    /// As a fraction of the most it holds.
    pub fn fill(&self) -> f64 {
        self.held.load(Ordering::Relaxed) as f64 / self.max as f64
    }
}

impl Drop for RingFill {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `new`, unmapped once.
        unsafe { libc::munmap(self.pages, 2 * self.page) };
    }
}

/// Set by SIGINT and SIGTERM once [`watch_stop_signals`] ran.
static STOP_SIGNALLED: AtomicBool = AtomicBool::new(false);

/// Lets the guard see Ctrl-C and SIGTERM for itself. The run acts on them on
/// its yielding threads, which beside a busy CPU may not run for seconds
/// (20 s and more was seen, a busy loop on the same CPU); the guard, at
/// normal priority, puts them back to it at once.
pub fn watch_stop_signals() -> std::io::Result<()> {
    static ONCE: std::sync::OnceLock<()> = std::sync::OnceLock::new();
    if ONCE.get().is_some() {
        return Ok(());
    }
    for sig in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: the action only stores to an atomic, which is
        // async-signal-safe; tokio's own action for the signal still runs.
        unsafe {
            signal_hook_registry::register(sig, || STOP_SIGNALLED.store(true, Ordering::Relaxed))
        }?;
    }
    let _ = ONCE.set(());
    Ok(())
}

/// The guard thread (see the module's comment); stops when dropped.
pub struct Guard {
    stop: Arc<AtomicBool>,
    handle: Option<JoinHandle<()>>,
}

impl Guard {
    /// Watches `rings` and the matcher's `backlog` for `threads`. None when
    /// the run does not yield.
    pub fn start(
        threads: Arc<Threads>,
        rings: Vec<RingFill>,
        backlog: Arc<Backlog>,
    ) -> Result<Option<Guard>> {
        if !threads.yielding {
            return Ok(None);
        }
        let stop = Arc::new(AtomicBool::new(false));
        let stopping = stop.clone();
        let handle = std::thread::Builder::new()
            .name("tcptrace-guard".into())
            .spawn(move || {
                // Not inherited from a yielding thread: the guard must run
                // when the others cannot.
                // SAFETY: gettid has no preconditions.
                set_policy(unsafe { libc::gettid() }, libc::SCHED_OTHER);
                let mut policy = Policy::default();
                while !stopping.load(Ordering::Relaxed) {
                    std::thread::sleep(EVERY);
                    if STOP_SIGNALLED.load(Ordering::Relaxed) {
                        // Ending: the threads that act on it must run now,
                        // whatever the rings say (not counted as a claim).
                        threads.set_all(libc::SCHED_OTHER);
                        break;
                    }
                    let now = crate::reader::monotonic_ns();
                    let fill = rings
                        .iter()
                        .map(RingFill::fill)
                        .fold(backlog.fill(), f64::max);
                    match policy.observe(now, fill) {
                        Verdict::Stay => {}
                        Verdict::Claim => threads.claim(now),
                        Verdict::Yield => threads.unclaim(now, libc::SCHED_IDLE),
                    }
                }
                // A claim still running is counted by `Threads::end`.
            })?;
        Ok(Some(Guard {
            stop,
            handle: Some(handle),
        }))
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: u64 = 1_000_000;

    /// (ms since start, fullest ring's fill, verdict)
    fn run(steps: &[(u64, f64, Verdict)]) {
        let mut p = Policy::default();
        for (i, &(at, fill, want)) in steps.iter().enumerate() {
            assert_eq!(
                p.observe(at * MS, fill),
                want,
                "step {i}: at {at} ms, fill {fill}"
            );
        }
    }

    #[test]
    fn kernel_versions() {
        for (release, at_least) in [
            ("6.18.0-1-cloud-amd64", true),
            ("6.6.0", true),
            ("6.10", true),
            ("7.0.1", true),
            ("6.5.13-arch1", false),
            ("6.1.0-56-cloud-amd64", false),
            ("5.15.0-91-generic", false),
            ("", false),
            ("garbage", false),
        ] {
            assert_eq!(kernel_at_least(release, (6, 6)), at_least, "{release}");
        }
    }

    #[test]
    fn yields_while_the_rings_have_room() {
        use Verdict::*;
        run(&[
            (0, 0.0, Stay),
            (10, 0.3, Stay),
            (20, 0.49, Stay),
            (30, 0.05, Stay),
        ]);
    }

    #[test]
    fn claims_once_a_ring_is_half_full_and_yields_after_a_second_nearly_empty() {
        use Verdict::*;
        run(&[
            (0, 0.5, Claim),
            (10, 0.9, Stay),  // still filling: stays claimed, says nothing
            (20, 0.01, Stay), // kept up from here...
            (500, 0.04, Stay),
            (1019, 0.0, Stay),
            (1020, 0.0, Yield), // ...for a second
            (1030, 0.2, Stay),
            (1040, 0.6, Claim),
        ]);
    }

    #[test]
    fn filling_again_while_claimed_restarts_the_second() {
        use Verdict::*;
        run(&[
            (0, 0.7, Claim),
            (10, 0.0, Stay),
            (900, 0.1, Stay), // not nearly empty: the second starts over
            (910, 0.0, Stay),
            (1500, 0.0, Stay),
            (1910, 0.0, Yield),
        ]);
    }
}
