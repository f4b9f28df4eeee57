//! Stage 2: drain the ring buffers as the kernel fills them. Each ring is
//! an `AsyncFd`: the task sleeps until the kernel signals data (epoll), takes
//! everything there is, then naps for [`NAP`] before it waits again.
//!
//! The nap is what keeps tracing cheap under load. The kernel signals a ring
//! when a record is submitted while the reader has caught up, and each signal
//! is an irq_work self-interrupt on the CPU running the traced code (in a VM,
//! an APIC write that exits to the hypervisor) plus a wakeup of this thread.
//! A reader that drains and immediately waits again has caught up after every
//! few records, so at 300,000 events/s that cost was paid tens of thousands
//! of times a second (a fifth of the host's CPU in `cargo xtask bench`).
//! Napping lets records pile up: one signal and one wakeup per nap.
use std::io::Write as _;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use anyhow::Result;
use aya::maps::{MapData, RingBuf};
use tokio::io::unix::AsyncFd;
use tokio::sync::mpsc;

use crate::decode::{self, IfaceNames};
use crate::event::{Event, StateChange, TcpState};
use crate::matcher::IdMap;
use crate::render::{self, Clock, Mode};

/// The events a reader took from its ring in one go, in ring order, on
/// their way to the matcher. Their lines are already written.
pub type Batch = Vec<Event>;

/// The output lines of a batch's events, back to back.
#[derive(Default)]
struct Lines {
    bytes: Vec<u8>,
    ends: Vec<usize>,
}

impl Lines {
    fn clear(&mut self) {
        self.bytes.clear();
        self.ends.clear();
    }

    /// The lines of the first `n` events (all of them if there are fewer),
    /// back to back; empty in modes that print no line per event.
    fn first(&self, n: usize) -> &[u8] {
        let end = match n.checked_sub(1) {
            None => 0,
            Some(last) => self.ends.get(last).copied().unwrap_or(self.bytes.len()),
        };
        &self.bytes[..end]
    }
}

/// Records the reader could not decode (a version mismatch or a bug): counted
/// and reported, never dropped silently.
#[derive(Default)]
pub struct ReaderStats {
    pub undecodable: AtomicU64,
    /// State changes delivered twice and dropped (see [`Repeats`]).
    pub duplicates: AtomicU64,
}

/// Recognises a state change delivered twice. The sock_ops program emits a
/// change and leaves a note on its CPU for the tracepoint's program, which
/// runs next in the same tcp_set_state(); when the task moved to another CPU
/// in between (the kernel preempts kernel code), that program finds no note
/// and emits the change again: 2 in 1.7 million at scale. A repeat carries
/// its own proof: the same socket, ports and (old, new), and as its time in
/// the old state the time since the first, which set the socket's entry
/// time; or 0 at →CLOSE, where the first removed the socket's entry. A
/// socket leaves a state before it can enter it again, so a real change
/// looks like that only at a freed address reused, within the window, by a
/// socket of the same ports making the same change: its earlier
/// changes would have to have gone unseen too.
#[derive(Default)]
pub struct Repeats {
    /// Each socket's last change, for changes of the last
    /// [`REPEAT_WINDOW_NS`] or so (a repeat comes within the time a
    /// preempted task waits for a CPU).
    last: IdMap<Last>,
    swept_at: u64,
}

#[derive(Clone, Copy)]
struct Last {
    ts_ns: u64,
    old: TcpState,
    new: TcpState,
    ports: (u16, u16),
}

const REPEAT_WINDOW_NS: u64 = 1_000_000_000;

impl Repeats {
    /// Whether `sc` repeats its socket's last change; remembers it if not.
    pub fn is_repeat(&mut self, sc: &StateChange) -> bool {
        let this = Last {
            ts_ns: sc.ts_ns,
            old: sc.oldstate,
            new: sc.newstate,
            ports: (sc.sport, sc.dport),
        };
        if let Some(last) = self.last.get_mut(&sc.skaddr) {
            let since = sc.ts_ns.wrapping_sub(last.ts_ns);
            if last.old == sc.oldstate
                && last.new == sc.newstate
                && last.ports == this.ports
                && since < REPEAT_WINDOW_NS
                && (sc.prev_state_ns == since
                    || (sc.newstate == TcpState::Close && sc.prev_state_ns == 0))
            {
                return true;
            }
            *last = this;
        } else {
            self.last.insert(sc.skaddr, this);
        }
        // Forget what no repeat can refer to any more: the table holds the
        // sockets that changed state in the last window or two, not every
        // socket ever seen.
        if sc.ts_ns.saturating_sub(self.swept_at) > REPEAT_WINDOW_NS {
            self.last
                .retain(|_, l| sc.ts_ns.saturating_sub(l.ts_ns) < REPEAT_WINDOW_NS);
            self.swept_at = sc.ts_ns;
        }
        false
    }
}

/// Where the readers' events enter the run: which are kept, how many may
/// be taken (`--count`), and the count of those taken, whose lines are
/// written. The readers write the event lines themselves (the thread that
/// matches and writes connections is the one that falls behind at
/// saturation, and write(2) into the page cache is a good part of the
/// cost), each batch's lines in one write(2) of whole lines, before the
/// batch goes to the matcher: an event's line always comes before its
/// connection's. Once [`Intake::close`]d, nothing more is taken or written,
/// so the summary is the last line and counts every event line above it.
pub struct Intake {
    keep: Box<dyn Fn(&Event) -> bool + Send + Sync>,
    limit: Option<u64>,
    state: Mutex<Taken>,
    /// Emptied batches, back from the matcher for the readers to fill
    /// again. A batch is allocated on the ring thread and emptied on the
    /// main thread; freed there, each (~100 KiB) made glibc consolidate
    /// the main thread's heap, and growing it batch after batch moved
    /// every event again.
    spare: Mutex<Vec<Batch>>,
    /// Set with `Taken::error`, for a look without the lock (which a
    /// reader holds through its write(2)).
    failed: AtomicBool,
    /// When the run stopped (CLOCK_MONOTONIC ns); u64::MAX while it runs.
    stop_ns: AtomicU64,
}

#[derive(Default)]
struct Taken {
    events: u64,
    closed: bool,
    /// The first write error (stdout closed, disk full); ends the run.
    error: Option<std::io::Error>,
}

impl Intake {
    pub fn new(keep: Box<dyn Fn(&Event) -> bool + Send + Sync>, limit: Option<u64>) -> Intake {
        Intake {
            keep,
            limit,
            state: Mutex::default(),
            spare: Mutex::default(),
            failed: AtomicBool::new(false),
            stop_ns: AtomicU64::new(u64::MAX),
        }
    }

    fn taken(&self) -> std::sync::MutexGuard<'_, Taken> {
        // A reader that panicked while holding the lock left counts that
        // are still right: nothing is done under it that can panic midway.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Takes the first events of a batch, as many as the limit lets in,
    /// and writes their lines; returns how many. 0 once closed.
    fn take(&self, lines: &Lines, n: usize) -> usize {
        let mut t = self.taken();
        if t.closed {
            return 0;
        }
        let room = self.limit.map_or(u64::MAX, |l| l.saturating_sub(t.events));
        let n = n.min(usize::try_from(room).unwrap_or(usize::MAX));
        if let Err(e) = crate::output::StdoutWriter.write_all(lines.first(n)) {
            t.error = Some(e);
            t.closed = true;
            self.failed.store(true, Ordering::Relaxed);
            return 0;
        }
        t.events += n as u64;
        if self.limit.is_some_and(|l| t.events >= l) {
            t.closed = true;
        }
        n
    }

    /// An empty batch with room for [`MAX_BATCH`] events.
    fn batch(&self) -> Batch {
        let spare = self.spare.lock().ok().and_then(|mut s| s.pop());
        spare.unwrap_or_else(|| Vec::with_capacity(MAX_BATCH))
    }

    /// Gives a batch the matcher has taken the events from back to the
    /// readers.
    pub fn recycle(&self, mut batch: Batch) {
        batch.clear();
        if let Ok(mut s) = self.spare.lock() {
            if s.len() < SPARE_BATCHES {
                s.push(batch);
            }
        }
    }

    /// The run stopped at `ns`: the readers take what their rings hold up
    /// to then, events newer than that stay out, and each reader ends once
    /// it has read past `ns` or found its ring empty. Under load a reader
    /// can be a ring's worth behind; what happened before Ctrl-C (or the
    /// end of `--duration`) is part of the run.
    pub fn stop_at(&self, ns: u64) {
        self.stop_ns.store(ns, Ordering::Relaxed);
    }

    fn stopping_at(&self) -> Option<u64> {
        Some(self.stop_ns.load(Ordering::Relaxed)).filter(|&t| t != u64::MAX)
    }

    /// Stops taking events; returns how many were taken, and the write
    /// error that stopped the readers, if one did.
    pub fn close(&self) -> (u64, Option<std::io::Error>) {
        let mut t = self.taken();
        t.closed = true;
        (t.events, t.error.take())
    }

    /// Whether writing an event line failed, which ends the run.
    pub fn failed(&self) -> bool {
        self.failed.load(Ordering::Relaxed)
    }
}

/// What a reader sends the matcher, in ring order.
pub enum Msg {
    /// Events taken from a ring; their lines are written.
    Events(Batch),
    /// Ring `ring` was found empty by a read that began at `at_ns`
    /// (CLOCK_MONOTONIC, the events' clock): whatever it delivers later
    /// was stamped after that, but for the few records stamped and not yet
    /// committed when it read (see [`Watermarks`]).
    Drained { ring: usize, at_ns: u64 },
}

/// One ring's reader: what it needs besides the ring.
pub struct Reader {
    pub ring: usize,
    pub names: Arc<IfaceNames>,
    pub mode: Mode,
    pub clock: Clock,
    pub stats: Arc<ReaderStats>,
    pub intake: Arc<Intake>,
    pub tx: mpsc::Sender<Msg>,
    /// Only with the sock_ops backup, without which no change comes twice.
    pub repeats: Option<Repeats>,
}

pub async fn read_ring(ring: RingBuf<MapData>, mut r: Reader) -> Result<()> {
    // SAFETY: the AsyncFd owns the ring, so its fd outlives the registration.
    let mut fd = unsafe { AsyncFd::register_with_interest(ring, tokio::io::Interest::READABLE)? };
    // Reused batch after batch: a fresh buffer of a few hundred KiB is
    // fresh pages, each a page fault.
    let mut lines = Lines::default();
    loop {
        // Waits for data, but not forever: an idle ring still says it is
        // empty, or the matcher would hold the other rings' events for it.
        let more = match tokio::time::timeout(IDLE_REPORT, fd.readable_mut()).await {
            Ok(guard) => {
                let mut guard = guard?;
                let more = r.drain(guard.get_inner_mut(), &mut lines).await?;
                guard.clear_ready();
                more
            }
            Err(_) => r.drain(fd.get_mut(), &mut lines).await?,
        };
        if !more {
            return Ok(()); // the run is ending
        }
        tokio::time::sleep(NAP).await;
    }
}

impl Reader {
    /// Takes everything the ring holds, in batches, then says it is empty;
    /// false once the run is ending.
    async fn drain(&mut self, ring: &mut RingBuf<MapData>, lines: &mut Lines) -> Result<bool> {
        loop {
            let at_ns = monotonic_ns();
            let mut batch = self.intake.batch();
            lines.clear();
            let mut read = 0;
            while read < MAX_BATCH {
                let Some(item) = ring.next() else { break };
                read += 1;
                match decode::decode(&item, &self.names) {
                    // Before `keep`: the count goes into the kernel side's
                    // accounting, which covers every socket.
                    Ok(Event::State(sc))
                        if self.repeats.as_mut().is_some_and(|r| r.is_repeat(&sc)) =>
                    {
                        self.stats.duplicates.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(ev) if !(self.intake.keep)(&ev) => {}
                    Ok(ev) => {
                        if self.mode != Mode::Timeline {
                            render::write_event(&mut lines.bytes, self.mode, &ev, &self.clock)?;
                            lines.ends.push(lines.bytes.len());
                        }
                        batch.push(ev);
                    }
                    Err(e) => {
                        if self.stats.undecodable.fetch_add(1, Ordering::Relaxed) == 0 {
                            log::warn!("undecodable ring buffer record: {e}");
                        }
                    }
                }
            }
            let drained = read < MAX_BATCH;
            // After the stop: up to it, and no further once past it (a
            // ring delivers in time order but for neighbouring CPUs' races).
            let stop = self.intake.stopping_at();
            let mut past_stop = false;
            if let Some(t) = stop {
                if let Some(i) = batch.iter().position(|e| e.ts_ns() > t) {
                    batch.truncate(i);
                    past_stop = true;
                }
            }
            if batch.is_empty() {
                self.intake.recycle(batch); // all filtered out (or undecodable)
            } else {
                let n = self.intake.take(lines, batch.len());
                if n == 0 {
                    return Ok(false); // closed: the run is ending
                }
                batch.truncate(n);
                if self.tx.send(Msg::Events(batch)).await.is_err() {
                    return Ok(false); // the consumer is gone: we are shutting down
                }
            }
            if past_stop || (drained && stop.is_some()) {
                return Ok(false); // read up to the stop: this reader is done
            }
            if drained {
                let msg = Msg::Drained {
                    ring: self.ring,
                    at_ns,
                };
                return Ok(self.tx.send(msg).await.is_ok());
            }
        }
    }
}

/// How far each ring has been read, and so up to when the matcher may take
/// events. A ring is drained on its own schedule (and each watched
/// namespace has its own), so a segment can reach tcptrace after the state
/// change it caused, or after later events of other rings. Taking events
/// only up to the slowest ring's last empty read keeps them in time order
/// however late a reader runs (a busy host, an emulated CPU), where a fixed
/// hold-back split connections whose segments came late: the kernel's part
/// was matched and emitted before its segments arrived.
pub struct Watermarks {
    at: Vec<u64>,
}

impl Watermarks {
    pub fn new(rings: usize) -> Watermarks {
        Watermarks { at: vec![0; rings] }
    }

    pub fn drained(&mut self, ring: usize, at_ns: u64) {
        if let Some(a) = self.at.get_mut(ring) {
            *a = (*a).max(at_ns);
        }
    }

    /// Events stamped at or before this may go to the matcher: the slowest
    /// ring's last empty read, less [`COMMIT_MARGIN_NS`]; but never more
    /// than [`MAX_HOLD_NS`] ago (a reader that stops reporting, blocked or
    /// starved, holds the others back no longer than that).
    pub fn cutoff(&self, now_ns: u64) -> u64 {
        let slowest = self.at.iter().copied().min().unwrap_or(now_ns);
        (slowest.saturating_sub(COMMIT_MARGIN_NS)).max(now_ns.saturating_sub(MAX_HOLD_NS))
    }
}

/// A record is stamped (bpf_ktime_get_ns) a little before it is committed
/// to the ring; one stamped before a read began may still be in flight
/// when the read finds the ring empty. Microseconds in practice; generous.
pub const COMMIT_MARGIN_NS: u64 = 5_000_000;

/// The longest events wait for a ring that does not report.
pub const MAX_HOLD_NS: u64 = 1_000_000_000;

/// How often an idle ring reports that it is empty: the longest the events
/// of other rings wait for it, and the longest a finished connection waits
/// for the matcher's clock (which follows the reports) once traffic stops.
/// A lone ring reports too, for that clock: 40 wakeups a second when idle.
pub const IDLE_REPORT: std::time::Duration = std::time::Duration::from_millis(25);

/// CLOCK_MONOTONIC in ns: the clock of bpf_ktime_get_ns.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid clock id and out pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// How long the reader lets records pile up after draining a ring. Short
/// beside the time a default ring takes to fill at saturation (4 MiB at
/// ~600,000 events/s of about 100 bytes: ~70 ms).
pub const NAP: std::time::Duration = std::time::Duration::from_millis(2);

/// Emptied batches kept for reuse; more are freed. A few suffice: the
/// matcher empties a batch as soon as it receives it.
const SPARE_BATCHES: usize = 8;

/// Events per batch: a full ring is taken in several, so that the queue to
/// the matcher is bounded in events, not only in batches.
pub const MAX_BATCH: usize = 1024;

/// Events in time order, held until every ring has been read past them
/// (see [`Watermarks`]).
///
/// A ring delivers in reservation order, which is time order but for
/// neighbours whose CPUs raced between taking the time and reserving: an
/// event older than the newest held goes in a few places back, found from
/// the end. One from much further back (another ring's batch) marks the
/// held events unsorted instead, and they are sorted once, when next taken
/// (a stable sort finds the sorted runs: about one pass; ties keep their
/// arrival order). Sorting everything on every take was a visible share
/// of the main thread.
#[derive(Default)]
pub struct Reorder {
    held: std::collections::VecDeque<Event>,
    unsorted: bool,
}

impl Reorder {
    /// How far back from the end an out-of-order event is looked for.
    const NEAR: usize = 16;

    pub fn push(&mut self, ev: Event) {
        if self.unsorted {
            self.held.push_back(ev);
            return;
        }
        let ts = ev.ts_ns();
        let n = self.held.len();
        let newer = (self.held.iter().rev().take(Self::NEAR))
            .take_while(|e| e.ts_ns() > ts)
            .count();
        if newer == Self::NEAR && newer < n {
            self.unsorted = true;
            self.held.push_back(ev);
        } else {
            self.held.insert(n - newer, ev);
        }
    }

    pub fn is_empty(&self) -> bool {
        self.held.is_empty()
    }

    fn sort(&mut self) {
        if self.unsorted {
            self.held.make_contiguous().sort_by_key(Event::ts_ns);
            self.unsorted = false;
        }
    }

    /// The time the matcher may take as passed ([`Matcher::tick`]): the
    /// rings' `cutoff`, but never as far as an event still held here. A
    /// backlog is matched in slices, so events older than the cutoff can
    /// still wait here when time is ticked; told the cutoff, the matcher
    /// ended their connections before them, and each of those events
    /// became a connection of its own.
    ///
    /// [`Matcher::tick`]: crate::matcher::Matcher::tick
    pub fn matched_until(&mut self, cutoff: u64) -> u64 {
        self.sort();
        match self.held.front() {
            Some(e) => cutoff.min(e.ts_ns().saturating_sub(1)),
            None => cutoff,
        }
    }

    pub fn len(&self) -> usize {
        self.held.len()
    }

    /// The oldest event, if it is at or before `ts_ns`.
    pub fn pop_older(&mut self, ts_ns: u64) -> Option<Event> {
        self.sort();
        if self.held.front()?.ts_ns() <= ts_ns {
            self.held.pop_front()
        } else {
            None
        }
    }
}

/// Forwards the eBPF programs' aya-log records to the `log` crate (RUST_LOG).
pub async fn forward_logs(logger: crate::bpf::Logger) -> Result<()> {
    // SAFETY: the AsyncFd owns the logger, so its fd outlives the registration.
    let mut fd = unsafe { AsyncFd::register_with_interest(logger, tokio::io::Interest::READABLE)? };
    loop {
        let mut guard = fd.readable_mut().await?;
        guard.get_inner_mut().flush();
        guard.clear_ready();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{Comm, Family, StateChange, TcpState};
    use std::net::{IpAddr, Ipv4Addr};

    fn ev(ts_ns: u64, pid: u32) -> Event {
        let lo = IpAddr::V4(Ipv4Addr::LOCALHOST);
        Event::State(StateChange {
            ts_ns,
            skaddr: 1,
            pid,
            comm: Comm::from("t"),
            family: Family::Ipv4,
            saddr: lo,
            sport: 1,
            daddr: lo,
            dport: 2,
            oldstate: TcpState::Close,
            newstate: TcpState::SynSent,
            prev_state_ns: 0,
            netns: 1,
            bytes_acked: None,
            bytes_received: None,
        })
    }

    fn pid(e: &Event) -> u32 {
        match e {
            Event::State(s) => s.pid,
            Event::Segment(_) => unreachable!(),
        }
    }

    /// A socket's state change as (skaddr, ts, old, new, time in old).
    type Change = (u64, u64, TcpState, TcpState, u64);

    fn change(c: Change) -> StateChange {
        let Event::State(mut sc) = ev(c.1, 1) else {
            unreachable!()
        };
        (sc.skaddr, sc.oldstate, sc.newstate, sc.prev_state_ns) = (c.0, c.2, c.3, c.4);
        sc
    }

    /// (changes in ring order) → which of them `Repeats` drops.
    #[test]
    fn repeats_drops_a_change_delivered_twice_and_nothing_else() {
        use TcpState::*;
        const MS: u64 = 1_000_000;
        let cases: Vec<(&str, Vec<Change>, Vec<bool>)> = vec![
            (
                "a connection's changes, none repeated",
                vec![
                    (1, 10, Close, SynSent, 0),
                    (1, 20, SynSent, Established, 10),
                    (1, 90, Established, FinWait1, 70),
                    (1, 95, FinWait1, FinWait2, 5),
                    (1, 99, FinWait2, Close, 4),
                ],
                vec![false; 5],
            ),
            (
                "tracepoint after sock_ops on another CPU: time in old state is the time since",
                vec![
                    (1, 10, SynSent, Established, 10),
                    (2, 12, Close, SynSent, 0),
                    (1, 13, SynSent, Established, 3),
                ],
                vec![false, false, true],
            ),
            (
                "a repeated close: sock_ops removed the socket's entry, so 0 in old state",
                vec![(1, 10, FinWait2, Close, 4), (1, 11, FinWait2, Close, 0)],
                vec![false, true],
            ),
            (
                "the same change with another time in old state is a real one",
                vec![
                    (1, 10, SynSent, Established, 10),
                    (1, 40, SynSent, Established, 7),
                ],
                vec![false, false],
            ),
            (
                "a freed address reused, its first change from CLOSE",
                vec![(1, 10, Close, SynSent, 0), (1, 50, Close, SynSent, 0)],
                vec![false, false],
            ),
            (
                "other sockets' changes between do not hide a repeat",
                vec![
                    (1, 10, Established, FinWait1, 9),
                    (2, 11, Established, FinWait1, 9),
                    (3, 12, Established, FinWait1, 9),
                    (1, 5 * MS, Established, FinWait1, 5 * MS - 10),
                ],
                vec![false, false, false, true],
            ),
            (
                "not past the window",
                vec![
                    (1, 10, FinWait2, Close, 4),
                    (1, 10 + 2_000 * MS, FinWait2, Close, 0),
                ],
                vec![false, false],
            ),
        ];
        for (name, changes, want) in cases {
            let mut r = Repeats::default();
            let got: Vec<bool> = changes
                .into_iter()
                .map(|c| r.is_repeat(&change(c)))
                .collect();
            assert_eq!(got, want, "{name}");
        }
    }

    #[test]
    fn repeats_keeps_a_reused_address_with_other_ports() {
        let mut r = Repeats::default();
        let first = change((1, 10, TcpState::SynRecv, TcpState::Close, 0));
        assert!(!r.is_repeat(&first));
        // Another child at the freed address, lost the same race at once.
        let other = StateChange {
            ts_ns: 12,
            sport: first.sport + 1,
            ..first.clone()
        };
        assert!(!r.is_repeat(&other));
        assert!(r.is_repeat(&StateChange { ts_ns: 13, ..other }));
    }

    #[test]
    fn repeats_forgets_sockets_past_the_window() {
        let mut r = Repeats::default();
        for s in 0..1_000 {
            r.is_repeat(&change((s, s, TcpState::Close, TcpState::SynSent, 0)));
        }
        let later = 3 * REPEAT_WINDOW_NS;
        r.is_repeat(&change((
            u64::MAX,
            later,
            TcpState::Close,
            TcpState::SynSent,
            0,
        )));
        assert_eq!(r.last.len(), 1);
    }

    /// (arrival order as (ts, tag)) → tags in the order they come out.
    #[test]
    fn reorder_puts_events_in_time_order_ties_in_arrival_order() {
        let near = Reorder::NEAR as u64;
        let cases: Vec<(&str, Vec<(u64, u32)>)> = vec![
            ("in order", vec![(1, 1), (2, 2), (3, 3)]),
            ("neighbours raced", vec![(1, 1), (3, 3), (2, 2), (4, 4)]),
            (
                "ties keep arrival order",
                vec![(5, 1), (5, 2), (4, 0), (5, 3)],
            ),
            ("older than all, few held", vec![(7, 2), (8, 3), (6, 1)]),
            // A second ring's batch, older than more than NEAR held events.
            (
                "another ring's batch",
                (0..2 * near)
                    .map(|t| (100 + t, (100 + t) as u32))
                    .chain((0..near).map(|t| (10 + t, (10 + t) as u32)))
                    .collect(),
            ),
        ];
        for (name, arrivals) in cases {
            let mut r = Reorder::default();
            for &(ts, tag) in &arrivals {
                r.push(ev(ts, tag));
            }
            let mut want = arrivals.clone();
            want.sort_by_key(|&(ts, _)| ts); // stable: ties keep arrival order
            let got: Vec<u32> = std::iter::from_fn(|| r.pop_older(u64::MAX))
                .map(|e| pid(&e))
                .collect();
            let want: Vec<u32> = want.into_iter().map(|(_, tag)| tag).collect();
            assert_eq!(got, want, "{name}");
            assert!(r.is_empty(), "{name}");
        }
    }

    /// (held, by arrival; cutoff) → the time the matcher may be told.
    #[test]
    fn matched_until_stops_short_of_the_oldest_held_event() {
        let near = Reorder::NEAR as u64;
        let another_ring: Vec<u64> = (0..2 * near).map(|t| 100 + t).chain([7]).collect();
        let cases: Vec<(&str, Vec<u64>, u64, u64)> = vec![
            ("nothing held", vec![], 500, 500),
            ("held older than the cutoff", vec![100, 200], 500, 99),
            ("held newer than the cutoff", vec![100, 200], 50, 50),
            ("an older batch arrived last", another_ring, 500, 6),
        ];
        for (name, held, cutoff, want) in cases {
            let mut r = Reorder::default();
            for ts in held {
                r.push(ev(ts, 0));
            }
            assert_eq!(r.matched_until(cutoff), want, "{name}");
        }
    }

    #[test]
    fn reorder_holds_what_is_newer_than_the_cutoff() {
        let mut r = Reorder::default();
        for ts in [10, 30, 20, 40] {
            r.push(ev(ts, ts as u32));
        }
        let got: Vec<u64> = std::iter::from_fn(|| r.pop_older(25))
            .map(|e| e.ts_ns())
            .collect();
        assert_eq!(got, [10, 20]);
        r.push(ev(26, 26)); // older than what is held: still first
        assert_eq!(r.pop_older(u64::MAX).map(|e| e.ts_ns()), Some(26));
        assert_eq!(r.pop_older(30).map(|e| e.ts_ns()), Some(30));
        assert_eq!(r.pop_older(30).map(|e| e.ts_ns()), None);
        assert!(!r.is_empty());
    }

    /// A ring's report: (ring, ms).
    type Report = (usize, u64);

    /// (reports, now ms) → cutoff ms, over two rings.
    #[test]
    fn watermarks_follow_the_slowest_ring() {
        let ms = 1_000_000;
        let margin = COMMIT_MARGIN_NS / ms;
        let hold = MAX_HOLD_NS / ms;
        let cases: Vec<(&str, Vec<Report>, u64, u64)> = vec![
            (
                "nothing reported yet: at most the longest hold",
                vec![],
                5000,
                5000 - hold,
            ),
            ("one ring reported", vec![(0, 4990)], 5000, 5000 - hold),
            (
                "both: the slower one",
                vec![(0, 4990), (1, 4950)],
                5000,
                4950 - margin,
            ),
            (
                "a report never goes back",
                vec![(1, 4980), (0, 4990), (1, 4900)],
                5000,
                4980 - margin,
            ),
            (
                "a ring silent too long is overtaken",
                vec![(0, 4990), (1, 3000)],
                5000,
                5000 - hold,
            ),
            (
                "an unknown ring is ignored",
                vec![(0, 4990), (1, 4990), (7, 1)],
                5000,
                4990 - margin,
            ),
        ];
        for (name, reports, now, want) in cases {
            let mut w = Watermarks::new(2);
            for (ring, at) in reports {
                w.drained(ring, at * ms);
            }
            assert_eq!(w.cutoff(now * ms), want * ms, "{name}");
        }
    }

    #[test]
    fn lines_first_spans_whole_lines() {
        let mut l = Lines::default();
        for line in ["a\n", "bb\n", "ccc\n"] {
            l.bytes.extend_from_slice(line.as_bytes());
            l.ends.push(l.bytes.len());
        }
        let cases = [
            (0, ""),
            (1, "a\n"),
            (2, "a\nbb\n"),
            (3, "a\nbb\nccc\n"),
            (usize::MAX, "a\nbb\nccc\n"),
        ];
        for (n, want) in cases {
            assert_eq!(l.first(n), want.as_bytes(), "first {n}");
        }
        assert_eq!(
            Lines::default().first(usize::MAX),
            b"",
            "no lines (timeline mode)"
        );
    }
}
