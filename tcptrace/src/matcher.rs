//! Events → one explained record per connection.
//!
//! Pure and synchronous: the caller feeds [`Event`]s with [`Matcher::push`],
//! advances time with [`Matcher::tick`] (live) and drains with
//! [`Matcher::finish`]; each returns the [`Connection`]s that are complete.
//!
//! Routing is cheap and incremental; the explanation (handshake, close,
//! anomalies, kernel/wire matching) is computed once, on emit, over the
//! record's events sorted by time, because live events arrive slightly out
//! of order (one ring buffer per program, several CPUs).
//!
//! Keying: the normalised 4-tuple, plus the network namespace when both
//! addresses are loopback (both ends of a loopback connection live in one
//! namespace, and every container has its own 127.0.0.1). Kernel sockets are
//! also indexed by `skaddr`, because the tracepoint reports some transitions
//! before the tuple is filled in: CLOSE → SYN_SENT fires before
//! `inet_hash_connect()` picks the source port (sport 0), and a server's child
//! socket is announced LISTEN → SYN_RECV while it still carries the
//! listener's wildcard addresses. Such events wait (by `skaddr`) for the
//! socket's first complete event. Events of listening sockets themselves
//! (→ LISTEN, LISTEN → CLOSE) never create connections: they are dropped and
//! counted in [`MatcherStats::listener_events`].
//!
//! Memory is bounded: finished records are emitted after `linger_ns`, idle
//! ones after `idle_timeout_ns` (in `tick`), at most `max_connections` are
//! kept (the least recently active is evicted and emitted), and a single
//! connection keeps at most `max_events_per_connection` events before plain
//! data segments are only counted.

mod analyze;
mod model;
#[cfg(test)]
mod tests;
#[cfg(test)]
mod tests_live;

use std::cmp::Reverse;
use std::collections::hash_map::Entry;
use std::collections::{BinaryHeap, HashMap, VecDeque};
use std::hash::{BuildHasherDefault, Hash, Hasher};
use std::net::{IpAddr, SocketAddr};

use serde::Serialize;

use crate::event::{Event, Segment, StateChange, TcpState};

pub use model::{
    Anomaly, AnomalyKind, Close, Connection, EndReason, Observation, Open, Side, SocketStates,
    StateSpan, Step, StepKind, TimeWait, Views,
};

#[derive(Clone, Debug)]
pub struct MatcherConfig {
    /// How far apart a kernel state change and the segment that causes it
    /// (or two observations of one segment) may be. Default 1 s.
    pub match_window_ns: u64,
    /// Live: a connection with no event for this long is emitted as
    /// unfinished by `tick`. Default 60 s.
    pub idle_timeout_ns: u64,
    /// How long a finished connection waits for straggler events (the last
    /// ACK seen at the other vantage point, late kernel events) before it is
    /// emitted. Default 500 ms.
    pub linger_ns: u64,
    /// The same for a connection only the kernel saw (no segment), once its
    /// traced sockets are all CLOSE: the kernel reports nothing more for
    /// them (a socket address used again is a new socket), so it only waits
    /// out a ring read late. Short, because lingering records are what the
    /// matcher's memory and cache misses are made of under load (the
    /// storm's records fit in cache at 20 ms, not at 500). Default 20 ms.
    pub kernel_linger_ns: u64,
    /// Records kept at once; beyond, the least recently active is evicted
    /// (emitted as is) and counted. Default 65536.
    pub max_connections: usize,
    /// Events kept per connection; beyond, plain data segments are only
    /// counted (control segments and kernel events are kept up to twice
    /// this). Default 20000.
    pub max_events_per_connection: usize,
    /// Collapse runs of ordinary data/ACK segments into one `data` step.
    /// Default true: the timeline is about state, tcpdump shows the rest.
    pub summarize_data: bool,
}

impl Default for MatcherConfig {
    fn default() -> Self {
        MatcherConfig {
            match_window_ns: 1_000_000_000,
            idle_timeout_ns: 60_000_000_000,
            linger_ns: 500_000_000,
            kernel_linger_ns: 20_000_000,
            max_connections: 65536,
            max_events_per_connection: 20_000,
            summarize_data: true,
        }
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct MatcherStats {
    pub events: u64,
    pub segments: u64,
    pub state_changes: u64,
    /// Records created (one per connection incarnation).
    pub connections: u64,
    /// Records emitted so far.
    pub emitted: u64,
    /// Records currently held.
    pub active: usize,
    /// Sockets whose events wait for a complete 4-tuple.
    pub pending_sockets: usize,
    pub evicted: u64,
    pub idle_expired: u64,
    /// A new SYN (or opening transition) on a finished 4-tuple: port reuse.
    pub port_reuse: u64,
    /// State changes of listening sockets, dropped.
    pub listener_events: u64,
    /// State changes whose socket never showed a complete 4-tuple, dropped.
    pub unresolved_state_events: u64,
    /// Events beyond the per-connection caps (counted, not kept).
    pub events_dropped: u64,
}

/// The normalised 4-tuple: `a` ≤ `b`; `netns` only for loopback, else 0.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Key {
    pub a: SocketAddr,
    pub b: SocketAddr,
    pub netns: u32,
}

/// Every segment looks its 4-tuple up. SipHash pays per write: an IPv4 key
/// goes in as two words instead of the seven small pieces the derived impl
/// writes (variant, address and port of each end, namespace).
impl Hash for Key {
    fn hash<H: Hasher>(&self, h: &mut H) {
        match (self.a, self.b) {
            (SocketAddr::V4(a), SocketAddr::V4(b)) => {
                h.write_u64(u64::from(a.ip().to_bits()) << 32 | u64::from(b.ip().to_bits()));
                h.write_u64(
                    u64::from(a.port()) << 48 | u64::from(b.port()) << 32 | u64::from(self.netns),
                );
            }
            (a, b) => {
                a.hash(h);
                b.hash(h);
                self.netns.hash(h);
            }
        }
    }
}

impl Key {
    fn of(saddr: IpAddr, sport: u16, daddr: IpAddr, dport: u16, netns: u32) -> Key {
        let s = SocketAddr::new(saddr, sport);
        let d = SocketAddr::new(daddr, dport);
        let (a, b) = if s <= d { (s, d) } else { (d, s) };
        let netns = if saddr.is_loopback() && daddr.is_loopback() {
            netns
        } else {
            0
        };
        Key { a, b, netns }
    }

    /// 0 when `src` is `a`, 1 otherwise.
    fn dir(&self, src: SocketAddr) -> usize {
        usize::from(src != self.a)
    }
}

/// Plain data segments beyond the event cap, per direction (index as `Key::dir`).
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Dropped {
    pub segments: u64,
    pub bytes: u64,
    /// seq + len of the latest dropped segment.
    pub end: Option<u32>,
    pub first_ts: u64,
    pub last_ts: u64,
}

/// The few facts needed incrementally to know when a connection is over;
/// everything else waits for `analyze`.
#[derive(Clone, Debug, Default)]
struct Progress {
    /// First SYN (without ACK) per direction.
    syn_isn: [Option<u32>; 2],
    /// Direction of the first SYN: the client.
    client: Option<usize>,
    /// Server ISN from a SYN-ACK that acknowledges the client's SYN.
    synack_seq: Option<u32>,
    synack_from: [bool; 2],
    established: bool,
    /// Sequence number of each direction's FIN (seq + len).
    fin: [Option<u32>; 2],
    fin_acked: [bool; 2],
    /// An RST that ends the connection (not the client's answer to a stale
    /// SYN-ACK, which leaves the handshake going).
    rst_final: bool,
    /// Each traced socket's latest transition.
    sockets: Sockets,
    /// A segment of this connection was seen.
    wire: bool,
}

/// A socket's latest transition, as far as `Progress` needs it.
#[derive(Clone, Copy, Debug)]
struct SocketSeen {
    skaddr: u64,
    ts: u64,
    state: TcpState,
}

/// The traced sockets of one connection, in order of first appearance. A
/// connection has one or two (client, server child): a scan is cheaper than
/// a map per record, and holding two in the record spares an allocation per
/// connection and a pointer chase into a cold one on every state change.
#[derive(Clone, Debug, Default)]
struct Sockets {
    first: [Option<SocketSeen>; 2],
    more: Vec<SocketSeen>,
}

impl Sockets {
    fn iter(&self) -> impl Iterator<Item = &SocketSeen> {
        self.first.iter().flatten().chain(&self.more)
    }

    fn get_mut(&mut self, skaddr: u64) -> Option<&mut SocketSeen> {
        self.first
            .iter_mut()
            .flatten()
            .chain(&mut self.more)
            .find(|s| s.skaddr == skaddr)
    }

    fn push(&mut self, s: SocketSeen) {
        match self.first.iter_mut().find(|f| f.is_none()) {
            Some(free) => *free = Some(s),
            None => self.more.push(s),
        }
    }

    fn is_empty(&self) -> bool {
        self.first[0].is_none()
    }
}

fn seq_ge(a: u32, b: u32) -> bool {
    (a.wrapping_sub(b) as i32) >= 0
}

impl Progress {
    fn on_segment(&mut self, d: usize, s: &Segment) {
        self.wire = true;
        let f = s.flags;
        let p = 1 - d;
        if f.syn() && !f.ack() {
            self.syn_isn[d].get_or_insert(s.seq);
            self.client.get_or_insert(d);
            return;
        }
        if f.syn() {
            match self.client {
                Some(c) if c != d => {
                    if self.syn_isn[c].map(|x| x.wrapping_add(1)) == Some(s.ack) {
                        self.synack_seq = Some(s.seq);
                        self.synack_from[d] = true;
                    }
                }
                Some(_) => {
                    // The client answering the server's SYN: simultaneous open.
                    if self.syn_isn[p].map(|x| x.wrapping_add(1)) == Some(s.ack) {
                        self.synack_from[d] = true;
                    }
                }
                None => {
                    // Capture started after the SYN.
                    self.client = Some(p);
                    self.syn_isn[p] = Some(s.ack.wrapping_sub(1));
                    self.synack_seq = Some(s.seq);
                    self.synack_from[d] = true;
                }
            }
            if self.synack_from == [true, true] {
                self.established = true;
            }
            return;
        }
        if f.rst() {
            let final_rst = match self.client {
                _ if self.established => true,
                None => true,
                // Refused: RST,ACK acknowledging the client's SYN.
                Some(c) => {
                    d != c && f.ack() && self.syn_isn[c].map(|x| x.wrapping_add(1)) == Some(s.ack)
                }
            };
            self.rst_final |= final_rst;
            return;
        }
        if !self.established {
            match self.client {
                None => self.established = true,
                Some(c) => {
                    if d == c
                        && f.ack()
                        && self.synack_seq.map(|y| y.wrapping_add(1)) == Some(s.ack)
                    {
                        self.established = true;
                    }
                }
            }
        }
        if f.ack() {
            if let Some(fs) = self.fin[p] {
                if seq_ge(s.ack, fs.wrapping_add(1)) {
                    self.fin_acked[p] = true;
                }
            }
        }
        if f.fin() && self.fin[d].is_none() {
            self.fin[d] = Some(s.seq.wrapping_add(s.len));
        }
    }

    fn on_state(&mut self, sc: &StateChange) {
        if sc.newstate == TcpState::Established {
            self.established = true;
        }
        let seen = SocketSeen {
            skaddr: sc.skaddr,
            ts: sc.ts_ns,
            state: sc.newstate,
        };
        match self.sockets.get_mut(sc.skaddr) {
            Some(s) if sc.ts_ns >= s.ts => *s = seen,
            Some(_) => {}
            None => self.sockets.push(seen),
        }
    }

    fn finished(&self) -> bool {
        self.rst_final
            || (self.fin_acked[0] && self.fin_acked[1])
            || (!self.sockets.is_empty() && self.sockets.iter().all(|s| s.state == TcpState::Close))
    }

    fn socket_closed(&self, skaddr: u64) -> bool {
        self.sockets
            .iter()
            .any(|s| s.skaddr == skaddr && s.state == TcpState::Close)
    }

    /// A SYN with another ISN after the handshake (or the end) is the next
    /// incarnation of the 4-tuple, not a retransmission.
    fn new_incarnation(&self, d: usize, seq: u32) -> bool {
        (self.established || self.finished()) && self.syn_isn[d] != Some(seq)
    }
}

/// Maps keyed by record ids and kernel socket addresses, values no remote
/// peer chooses: std's SipHash, built to resist chosen keys, was a visible
/// share of a saturated live run.
pub(crate) type IdMap<V> = HashMap<u64, V, BuildHasherDefault<IdHasher>>;

/// One multiply (the golden-ratio constant, as Fx and Fibonacci hashing
/// use), then the well-mixed high bits rotated down: the table indexes by
/// the low bits, and socket addresses are aligned, their low bits zero.
#[derive(Default)]
pub(crate) struct IdHasher(u64);

impl Hasher for IdHasher {
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.write_u64(u64::from(b));
        }
    }

    fn write_u64(&mut self, v: u64) {
        self.0 = (self.0 ^ v).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    }

    fn finish(&self) -> u64 {
        self.0.rotate_left(26)
    }
}

struct Record {
    key: Key,
    events: Vec<Event>,
    first_ts: u64,
    last_ts: u64,
    progress: Progress,
    deadline: Option<u64>,
    dropped: [Dropped; 2],
    events_dropped: u64,
    /// Sockets of this 4-tuple still open when an earlier record of it was
    /// evicted or timed out, as last traced there.
    earlier: Vec<LeftOpen>,
}

/// A socket still open when its record ended early (evicted, idle): where
/// its chain of state changes stood, for the next record of its 4-tuple to
/// find holes across the split (`state_gap`).
#[derive(Clone, Copy, Debug)]
pub(crate) struct LeftOpen {
    pub skaddr: u64,
    pub local: SocketAddr,
    pub state: TcpState,
    pub ts: u64,
}

impl Record {
    /// Whether an event at `ts` comes after everything this record holds.
    /// Only then can it open the next connection on the 4-tuple: an older
    /// one comes from a ring read late (the rings of several namespaces are
    /// drained in turn) and belongs to this connection, whatever its states
    /// or segments already say.
    fn is_before(&self, ts: u64) -> bool {
        self.last_ts < ts
    }
}

/// State changes of one socket waiting for its complete 4-tuple. Nearly
/// always a single one (the CLOSE → SYN_SENT of a connect()), held inline:
/// every client connection parks one, and a Vec was an allocation each.
struct Pending {
    first: StateChange,
    more: Vec<StateChange>,
    last_ts: u64,
}

impl Pending {
    fn len(&self) -> usize {
        1 + self.more.len()
    }
}

pub struct Matcher {
    cfg: MatcherConfig,
    next_id: u64,
    /// Boxed: a record is a few hundred bytes and sits half a second (its
    /// linger) before emit; in the table itself, every insert, growth and
    /// emit moved it whole, through cold memory.
    conns: IdMap<Box<Record>>,
    /// SipHash (std's default) here: remote peers choose ports and
    /// addresses, so a cheap hash could be driven into collisions.
    by_key: HashMap<Key, u64>,
    by_sk: IdMap<u64>,
    /// (last event ts, id), least recently active first. Entries are never
    /// removed in place (an ordered set's remove + insert on every event was
    /// a visible share of the profile), nor pushed on every event: each
    /// record's entry is pushed when it is created and may lag behind its
    /// `last_ts`, never ahead. [`Matcher::least_recent`] moves a lagging entry
    /// up to its record's `last_ts` when it reaches the top, and drops the
    /// entry of a record that is gone (compaction drops the rest).
    by_last: BinaryHeap<Reverse<(u64, u64)>>,
    /// (deadline, id) of finished records lingering for stragglers, soonest
    /// first; an entry whose record was emitted otherwise is skipped when it
    /// expires. A deadline is the record's last event time plus one of two
    /// constants (`linger_ns`, or the shorter `kernel_linger_ns`), so they
    /// come nearly in order: a sorted deque takes most at the back, a late
    /// one a few places before, and a kernel-only one among the soonest,
    /// near the front (the deque shifts the shorter side); a heap paid a
    /// sift through cold levels on every pop.
    lingering: VecDeque<(u64, u64)>,
    pending: IdMap<Pending>,
    pending_order: VecDeque<u64>,
    /// Emitted records, their event lists emptied, for the next ones to
    /// take: a record and its list (grown twice for a short connection's
    /// ten events) were three or four allocations per connection.
    #[allow(clippy::vec_box)] // the boxes are what is reused
    spare: Vec<Box<Record>>,
    /// By 4-tuple, the sockets records that ended early left open, until
    /// the 4-tuple's next record takes them. Bounded by `max_connections`:
    /// past it, forgotten all at once (they only help find holes).
    left_open: HashMap<Key, Vec<LeftOpen>>,
    clock: u64,
    stats: MatcherStats,
}

/// Records kept for reuse.
const SPARE_RECORDS: usize = 16;
/// A record's event list is reused only up to this capacity: one of a long
/// connection would keep its memory past its end.
const SPARE_EVENTS: usize = 64;

fn is_complete(sc: &StateChange) -> bool {
    sc.sport != 0 && sc.dport != 0 && !sc.saddr.is_unspecified() && !sc.daddr.is_unspecified()
}

fn is_listener_event(sc: &StateChange) -> bool {
    sc.newstate == TcpState::Listen
        || (sc.oldstate == TcpState::Listen && sc.newstate == TcpState::Close)
}

/// A transition that begins a connection's life on a socket.
fn is_opening(sc: &StateChange) -> bool {
    use TcpState::*;
    matches!(sc.oldstate, Close | Listen | SynSent | SynRecv | NewSynRecv)
        && matches!(sc.newstate, SynSent | SynRecv | Established)
}

impl Matcher {
    pub fn new(cfg: MatcherConfig) -> Self {
        Matcher {
            cfg,
            next_id: 0,
            conns: IdMap::default(),
            by_key: HashMap::new(),
            left_open: HashMap::new(),
            by_sk: IdMap::default(),
            by_last: BinaryHeap::new(),
            lingering: VecDeque::new(),
            pending: IdMap::default(),
            pending_order: VecDeque::new(),
            spare: Vec::new(),
            clock: 0,
            stats: MatcherStats::default(),
        }
    }

    pub fn config(&self) -> &MatcherConfig {
        &self.cfg
    }

    pub fn stats(&self) -> MatcherStats {
        let mut s = self.stats;
        s.active = self.conns.len();
        s.pending_sockets = self.pending.len();
        s
    }

    /// Adds one event; returns the connections that are now complete
    /// (finished and past their linger time by event time, superseded by a
    /// new incarnation, or evicted to stay within `max_connections`).
    ///
    /// Takes the event by value: it is kept in the connection's record, and
    /// a copy per event would be an allocation (`comm`, `iface`) and a move
    /// of the whole event more.
    pub fn push(&mut self, ev: Event) -> Vec<Connection> {
        let mut out = Vec::new();
        self.stats.events += 1;
        self.clock = self.clock.max(ev.ts_ns());
        match ev {
            Event::Segment(s) => {
                self.stats.segments += 1;
                self.push_segment(s, &mut out);
            }
            Event::State(sc) => {
                self.stats.state_changes += 1;
                self.push_state(sc, &mut out);
            }
        }
        self.expire_lingering(self.clock, &mut out);
        sort_out(&mut out);
        out
    }

    /// Time passes (live, same clock as the events): emits lingering
    /// connections whose time is up and idle ones.
    pub fn tick(&mut self, now_ns: u64) -> Vec<Connection> {
        let mut out = Vec::new();
        self.clock = self.clock.max(now_ns);
        self.expire_lingering(now_ns, &mut out);
        let idle = self.cfg.idle_timeout_ns;
        while let Some((last, id)) = self.least_recent() {
            if last.saturating_add(idle) > now_ns {
                break;
            }
            let finished = self.conns.get(&id).is_some_and(|r| r.deadline.is_some());
            let reason = if finished {
                EndReason::Closed
            } else {
                self.stats.idle_expired += 1;
                EndReason::IdleTimeout
            };
            out.extend(self.emit(id, reason));
        }
        while let Some(&sk) = self.pending_order.front() {
            match self.pending.get(&sk) {
                Some(p) if p.last_ts.saturating_add(idle) > now_ns => break,
                Some(p) => {
                    self.stats.unresolved_state_events += p.len() as u64;
                    self.pending.remove(&sk);
                }
                None => {}
            }
            self.pending_order.pop_front();
        }
        sort_out(&mut out);
        out
    }

    /// End of input: everything still held, finished or not.
    pub fn finish(&mut self) -> Vec<Connection> {
        let mut ids: Vec<(u64, u64)> = self.conns.iter().map(|(id, r)| (r.first_ts, *id)).collect();
        ids.sort_unstable();
        let mut out = Vec::new();
        for (_, id) in ids {
            let finished = self.conns.get(&id).is_some_and(|r| r.deadline.is_some());
            let reason = if finished {
                EndReason::Closed
            } else {
                EndReason::EndOfInput
            };
            out.extend(self.emit(id, reason));
        }
        for p in self.pending.values() {
            self.stats.unresolved_state_events += p.len() as u64;
        }
        self.pending.clear();
        self.pending_order.clear();
        out
    }

    fn push_segment(&mut self, s: Segment, out: &mut Vec<Connection>) {
        let key = Key::of(s.saddr, s.sport, s.daddr, s.dport, s.netns);
        let d = key.dir(SocketAddr::new(s.saddr, s.sport));
        let id = match self.by_key.get(&key).copied() {
            Some(id) => {
                let reuse = s.flags.syn()
                    && !s.flags.ack()
                    && self.conns.get(&id).is_some_and(|r| {
                        r.progress.new_incarnation(d, s.seq) && r.is_before(s.ts_ns)
                    });
                if reuse {
                    let reason = self.reason_for_superseded(id);
                    self.reopen(id, key, s.ts_ns, reason, out)
                } else {
                    id
                }
            }
            None => self.create(key, s.ts_ns, out),
        };
        self.add(id, Event::Segment(s));
    }

    fn push_state(&mut self, sc: StateChange, out: &mut Vec<Connection>) {
        if let Some(&id) = self.by_sk.get(&sc.skaddr) {
            // The kernel recycles socket memory: the address of a closed
            // socket comes back as the next connect() (CLOSE → SYN_SENT) or as
            // the next accepted child (LISTEN → SYN_RECV) while the old record
            // still lingers for stragglers. A socket's own events always carry
            // its 4-tuple, so another 4-tuple is another connection.
            let reused_socket = self.conns.get(&id).is_none_or(|r| {
                (is_opening(&sc) && r.progress.socket_closed(sc.skaddr))
                    || (is_complete(&sc)
                        && Key::of(sc.saddr, sc.sport, sc.daddr, sc.dport, sc.netns) != r.key)
            });
            if !reused_socket {
                self.add(id, Event::State(sc));
                return;
            }
            self.by_sk.remove(&sc.skaddr);
        }
        if !is_complete(&sc) {
            if is_listener_event(&sc) {
                self.stats.listener_events += 1;
                return;
            }
            self.park(sc, out);
            return;
        }
        let key = Key::of(sc.saddr, sc.sport, sc.daddr, sc.dport, sc.netns);
        let id = match self.by_key.get(&key).copied() {
            Some(id) => {
                // A finished record's 4-tuple opening again is the next
                // connection on it.
                let reuse = is_opening(&sc)
                    && self
                        .conns
                        .get(&id)
                        .is_some_and(|r| r.deadline.is_some() && r.is_before(sc.ts_ns));
                if reuse {
                    self.reopen(id, key, sc.ts_ns, EndReason::Closed, out)
                } else {
                    id
                }
            }
            None => self.create(key, sc.ts_ns, out),
        };
        // `add` enters the socket in the record's progress, which is how
        // `emit` finds this entry again.
        self.by_sk.insert(sc.skaddr, id);
        if let Some(p) = self.pending.remove(&sc.skaddr) {
            for e in std::iter::once(p.first).chain(p.more) {
                self.add(id, Event::State(e));
            }
        }
        self.add(id, Event::State(sc));
    }

    fn park(&mut self, sc: StateChange, out: &mut Vec<Connection>) {
        // A socket that closes without both ports never gets them, and the
        // next socket at its address must not inherit its events. From
        // SYN_SENT that is a connect() that failed before the kernel chose
        // a source port (EADDRNOTAVAIL: no ephemeral port free for that
        // destination), a connection attempt of its own, told at once.
        if sc.newstate == TcpState::Close {
            let held = self.pending.remove(&sc.skaddr);
            if sc.oldstate == TcpState::SynSent && sc.dport != 0 && !sc.daddr.is_unspecified() {
                let first_ts = held.as_ref().map_or(sc.ts_ns, |p| p.first.ts_ns);
                let key = Key::of(sc.saddr, 0, sc.daddr, sc.dport, sc.netns);
                // Emitted at once: no live record is pushed out to make
                // room, and no 4-tuple entry can shadow a live one.
                let id = self.new_record(key, first_ts);
                for e in held
                    .into_iter()
                    .flat_map(|p| std::iter::once(p.first).chain(p.more))
                {
                    self.add(id, Event::State(e));
                }
                self.add(id, Event::State(sc));
                out.extend(self.emit(id, EndReason::Closed));
                return;
            }
            self.stats.unresolved_state_events += held.map_or(0, |p| p.len() as u64) + 1;
            return;
        }
        if let Some(p) = self.pending.get_mut(&sc.skaddr) {
            p.last_ts = p.last_ts.max(sc.ts_ns);
            if p.len() < 64 {
                p.more.push(sc);
            } else {
                self.stats.unresolved_state_events += 1;
            }
            return;
        }
        while self.pending.len() >= self.cfg.max_connections.max(1) {
            let Some(old) = self.pending_order.pop_front() else {
                break;
            };
            if let Some(p) = self.pending.remove(&old) {
                self.stats.unresolved_state_events += p.len() as u64;
            }
        }
        let skaddr = sc.skaddr;
        self.pending.insert(
            skaddr,
            Pending {
                last_ts: sc.ts_ns,
                first: sc,
                more: Vec::new(),
            },
        );
        self.pending_order.push_back(skaddr);
    }

    fn reason_for_superseded(&self, id: u64) -> EndReason {
        match self.conns.get(&id) {
            Some(r) if r.deadline.is_some() => EndReason::Closed,
            _ => EndReason::Superseded,
        }
    }

    fn create(&mut self, key: Key, ts: u64, out: &mut Vec<Connection>) -> u64 {
        // Before making room: the records evicted for it leave theirs.
        let earlier = self.left_open.remove(&key);
        while self.conns.len() >= self.cfg.max_connections.max(1) {
            let Some((_, victim)) = self.least_recent() else {
                break;
            };
            let finished = self
                .conns
                .get(&victim)
                .is_some_and(|r| r.deadline.is_some());
            let reason = if finished {
                EndReason::Closed
            } else {
                self.stats.evicted += 1;
                EndReason::Evicted
            };
            out.extend(self.emit(victim, reason));
        }
        let id = self.new_record(key, ts);
        self.by_key.insert(key, id);
        self.note_new_record(id, ts);
        if let (Some(left), Some(r)) = (earlier, self.conns.get_mut(&id)) {
            r.earlier = left;
        }
        id
    }

    /// A record outside the table's bookkeeping (no room made, no 4-tuple
    /// entry, no activity order): for one that is emitted at once.
    fn new_record(&mut self, key: Key, ts: u64) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        self.stats.connections += 1;
        let record = |events| Record {
            key,
            events,
            first_ts: ts,
            last_ts: ts,
            progress: Progress::default(),
            deadline: None,
            dropped: [Dropped::default(); 2],
            events_dropped: 0,
            earlier: Vec::new(),
        };
        let boxed = match self.spare.pop() {
            Some(mut r) => {
                *r = record(std::mem::take(&mut r.events));
                r
            }
            None => Box::new(record(Vec::new())),
        };
        self.conns.insert(id, boxed);
        id
    }

    /// The 4-tuple of record `id` is in use again: `id` ends for `reason`
    /// and a new record takes the 4-tuple.
    fn reopen(
        &mut self,
        id: u64,
        key: Key,
        ts: u64,
        reason: EndReason,
        out: &mut Vec<Connection>,
    ) -> u64 {
        self.stats.port_reuse += 1;
        out.extend(self.emit(id, reason));
        self.create(key, ts, out)
    }

    /// The least recently active record's (last event ts, id), dropping
    /// the entries of emitted records on the way.
    ///
    /// Every live record has one entry, at or before its `last_ts`; so a top
    /// entry that is up to date is the least (last_ts, id) of all records,
    /// and one that lags goes back in at its record's `last_ts` (once per
    /// record per call at most: a record's time only moves on events).
    fn least_recent(&mut self) -> Option<(u64, u64)> {
        while let Some(mut top) = self.by_last.peek_mut() {
            let Reverse((last, id)) = *top;
            match self.conns.get(&id) {
                Some(r) if r.last_ts == last => return Some((last, id)),
                Some(r) => *top = Reverse((r.last_ts, id)),
                None => {
                    std::collections::binary_heap::PeekMut::pop(top);
                }
            }
        }
        None
    }

    /// A new record's entry. Emitted records leave theirs behind: rebuilt
    /// from the records once those outnumber them, so memory stays
    /// proportional to the records held (amortised O(1) per record).
    fn note_new_record(&mut self, id: u64, last_ts: u64) {
        self.by_last.push(Reverse((last_ts, id)));
        if self.by_last.len() > 2 * self.conns.len() + 64 {
            self.by_last = self
                .conns
                .iter()
                .map(|(&id, r)| Reverse((r.last_ts, id)))
                .collect();
        }
    }

    fn add(&mut self, id: u64, ev: Event) {
        let cap = self.cfg.max_events_per_connection.max(16);
        let (linger, kernel_linger) = (self.cfg.linger_ns, self.cfg.kernel_linger_ns);
        let Some(r) = self.conns.get_mut(&id) else {
            return;
        };
        let ts = ev.ts_ns();
        r.first_ts = r.first_ts.min(ts);
        r.last_ts = r.last_ts.max(ts);
        match &ev {
            Event::Segment(s) => {
                let d = r.key.dir(SocketAddr::new(s.saddr, s.sport));
                r.progress.on_segment(d, s);
                if r.events.len() >= cap {
                    let control = s.flags.syn() || s.flags.fin() || s.flags.rst();
                    let closing = r.progress.fin.iter().any(Option::is_some);
                    if !control && !closing {
                        let dr = &mut r.dropped[d];
                        if dr.segments == 0 {
                            dr.first_ts = ts;
                        }
                        dr.segments += 1;
                        dr.bytes += u64::from(s.len);
                        dr.end = Some(s.seq.wrapping_add(s.len));
                        dr.last_ts = dr.last_ts.max(ts);
                        self.stats.events_dropped += 1;
                    } else if r.events.len() < 2 * cap {
                        r.events.push(ev);
                    } else {
                        r.events_dropped += 1;
                        self.stats.events_dropped += 1;
                    }
                } else {
                    r.events.push(ev);
                }
            }
            Event::State(sc) => {
                r.progress.on_state(sc);
                if r.events.len() < 2 * cap {
                    r.events.push(ev);
                } else {
                    r.events_dropped += 1;
                    self.stats.events_dropped += 1;
                }
            }
        }
        if r.deadline.is_none() && r.progress.finished() {
            let linger = if r.progress.wire {
                linger
            } else {
                kernel_linger
            };
            let deadline = r.last_ts.saturating_add(linger);
            r.deadline = Some(deadline);
            self.linger(deadline, id);
        }
    }

    fn linger(&mut self, deadline: u64, id: u64) {
        let entry = (deadline, id);
        if self.lingering.back().is_none_or(|&last| last < entry) {
            self.lingering.push_back(entry);
        } else {
            let at = self.lingering.partition_point(|&e| e < entry);
            self.lingering.insert(at, entry);
        }
    }

    fn expire_lingering(&mut self, now: u64, out: &mut Vec<Connection>) {
        while let Some(&(deadline, id)) = self.lingering.front() {
            if deadline > now {
                break;
            }
            self.lingering.pop_front();
            out.extend(self.emit(id, EndReason::Closed));
        }
    }

    fn emit(&mut self, id: u64, reason: EndReason) -> Option<Connection> {
        let mut r = self.conns.remove(&id)?;
        // The 4-tuple and the sockets may already belong to the next
        // connection; one lookup each, not a look then a remove.
        if let Entry::Occupied(e) = self.by_key.entry(r.key) {
            if *e.get() == id {
                e.remove();
            }
        }
        // Every socket mapped to this record has an event in it.
        for sk in r.progress.sockets.iter() {
            if let Entry::Occupied(e) = self.by_sk.entry(sk.skaddr) {
                if *e.get() == id {
                    e.remove();
                }
            }
        }
        self.stats.emitted += 1;
        let c = analyze::analyze(
            analyze::Input {
                key: r.key,
                events: &mut r.events,
                dropped: r.dropped,
                events_dropped: r.events_dropped,
                end_reason: reason,
                earlier: &r.earlier,
            },
            &self.cfg,
        );
        if matches!(reason, EndReason::Evicted | EndReason::IdleTimeout) {
            self.leave_open(&r);
        }
        if self.spare.len() < SPARE_RECORDS && r.events.capacity() <= SPARE_EVENTS {
            r.events.clear();
            self.spare.push(r);
        }
        Some(c)
    }

    /// Remembers the sockets record `r` (ending early) leaves open: the last
    /// change of each (its events are sorted by time), and those an earlier
    /// record left that this one never saw.
    fn leave_open(&mut self, r: &Record) {
        let mut left: Vec<LeftOpen> = Vec::new();
        for sc in r.events.iter().rev().filter_map(|e| match e {
            Event::State(sc) => Some(sc),
            Event::Segment(_) => None,
        }) {
            if left.iter().any(|l| l.skaddr == sc.skaddr) {
                continue;
            }
            left.push(LeftOpen {
                skaddr: sc.skaddr,
                local: SocketAddr::new(sc.saddr, sc.sport),
                state: sc.newstate,
                ts: sc.ts_ns,
            });
        }
        for e in &r.earlier {
            if !left.iter().any(|l| l.skaddr == e.skaddr) {
                left.push(*e);
            }
        }
        left.retain(|l| l.state != TcpState::Close);
        if left.is_empty() {
            return;
        }
        if self.left_open.len() >= self.cfg.max_connections.max(1) {
            self.left_open.clear();
        }
        self.left_open.insert(r.key, left);
    }
}

fn sort_out(out: &mut [Connection]) {
    out.sort_by_key(|c| c.first_ts_ns);
}
