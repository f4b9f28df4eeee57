//! The explained connection record: what `Matcher` emits, what `--json`
//! prints (one object per line) and what `timeline::render` draws.
//!
//! Field names are a public contract: scripts read them. Absent facts are
//! `null` on the top-level record (so every key is always there), while the
//! per-step fields that only make sense for one kind of step are left out.

use std::borrow::Cow;
use std::net::SocketAddr;
use std::sync::Arc;

use serde::Serialize;

use crate::event::{hex_addr, Comm, Dir, Family, TcpFlags, TcpOptions, TcpState};

/// One end of the connection. The client is the side that sent the first
/// SYN (for a simultaneous open: the earlier SYN). `Both` only appears where
/// both ends did the same thing (simultaneous close: `closed_by`, `time_wait`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Side {
    Client,
    Server,
    Both,
}

impl Side {
    /// Every side, in declaration order: `side as usize` indexes it.
    pub const ALL: [Side; 3] = [Side::Client, Side::Server, Side::Both];

    pub fn peer(self) -> Side {
        match self {
            Side::Client => Side::Server,
            Side::Server => Side::Client,
            Side::Both => Side::Both,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Side::Client => "client",
            Side::Server => "server",
            Side::Both => "both",
        }
    }
}

/// How the connection was opened, described from the client's point of view.
///
/// Rule: `simultaneous` when both ends sent a SYN without ACK (wire) or a
/// traced socket went SYN_SENT → SYN_RECV (kernel). Otherwise `passive` when
/// kernel events were traced and every traced socket is on the server side
/// (this host only did the passive open: accept()); otherwise `active` when a
/// SYN or a SYN_SENT socket was seen. `unknown` when the record starts
/// mid-stream (no SYN, no opening transition).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Open {
    Active,
    Passive,
    Simultaneous,
    Unknown,
}

impl Open {
    pub fn name(self) -> &'static str {
        match self {
            Open::Active => "active",
            Open::Passive => "passive",
            Open::Simultaneous => "simultaneous",
            Open::Unknown => "unknown",
        }
    }
}

/// How the connection ended.
/// - `four-segment`: FIN, ACK, FIN, ACK (the peer ACKed the first FIN on its
///   own, e.g. a half-close where it kept sending before closing).
/// - `three-segment`: the peer's FIN rode on its ACK of the first FIN.
/// - `simultaneous`: both FINs crossed (each FIN does not acknowledge the
///   other; the kernel goes through CLOSING).
/// - `reset`: an accepted RST ended it (including a refused SYN).
/// - `unfinished`: no complete close was seen (still open at exit, idle,
///   evicted, never established).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Close {
    FourSegment,
    ThreeSegment,
    Simultaneous,
    Reset,
    Unfinished,
}

impl Close {
    /// Every kind, in declaration order: `close as usize` indexes it.
    pub const ALL: [Close; 5] = [
        Close::FourSegment,
        Close::ThreeSegment,
        Close::Simultaneous,
        Close::Reset,
        Close::Unfinished,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Close::FourSegment => "four-segment",
            Close::ThreeSegment => "three-segment",
            Close::Simultaneous => "simultaneous",
            Close::Reset => "reset",
            Close::Unfinished => "unfinished",
        }
    }
}

/// Why the matcher let go of the record.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum EndReason {
    /// Close (or reset) complete and the linger time for stragglers passed.
    Closed,
    /// A new SYN on the same 4-tuple started the next incarnation.
    Superseded,
    /// No event for `idle_timeout_ns` (live).
    IdleTimeout,
    /// `max_connections` reached; this was the least recently active record.
    Evicted,
    /// `Matcher::finish`: end of the capture file or tracer exit.
    EndOfInput,
}

impl EndReason {
    /// As in JSON.
    pub fn name(self) -> &'static str {
        match self {
            EndReason::Closed => "closed",
            EndReason::Superseded => "superseded",
            EndReason::IdleTimeout => "idle_timeout",
            EndReason::Evicted => "evicted",
            EndReason::EndOfInput => "end_of_input",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum StepKind {
    /// A segment on the wire (possibly seen at several vantage points).
    Wire,
    /// A kernel state change (`sock:inet_sock_set_state`).
    Kernel,
    /// A run of ordinary data/ACK segments, summarised
    /// (`MatcherConfig::summarize_data`).
    Data,
    /// Something the tracepoint cannot show, deduced (TIME_WAIT).
    Inferred,
}

impl StepKind {
    /// As in JSON.
    pub fn name(self) -> &'static str {
        match self {
            StepKind::Wire => "wire",
            StepKind::Kernel => "kernel",
            StepKind::Data => "data",
            StepKind::Inferred => "inferred",
        }
    }
}

/// Where and when one wire segment was seen (live tracing; a capture file
/// has a single implicit vantage point and no observations list).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Observation {
    pub netns: u32,
    pub ifindex: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub iface: Option<Arc<str>>,
    pub dir: Dir,
    pub ts_ns: u64,
}

/// One line of the explained timeline.
///
/// Common: `ts_ns`, `rel_ns` (from the record's first event), `kind`, `name`,
/// `rule` (the textbook rule the step satisfies, e.g. `SYN-ACK seq=y ack=x+1`),
/// `explain` (a sentence).
/// Wire: `from`, `flags` (tcpdump letters), `seq`, `ack` (only with the ACK
/// flag), `rel_seq`/`rel_ack` (relative to the sender's/receiver's ISN, as
/// tcpdump prints after the SYN), `len`, `win` (raw), `options`,
/// `retransmission`, `observations` (live).
/// Kernel: `side`, `skaddr`, `oldstate`, `newstate`, `in_state_ns` (time
/// spent in `oldstate`), `pid`, `comm`, `netns`, `matched_step` (index in `steps`
/// of the wire step that explains the change).
/// Data: `end_ts_ns`, `segments`, `bytes_client`, `bytes_server`,
/// `retransmissions`. Inferred: `side`.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Step {
    pub ts_ns: u64,
    pub rel_ns: u64,
    pub kind: StepKind,
    // Most names, rules and explanations are fixed text: borrowed, not
    // allocated per step.
    pub name: Cow<'static, str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rule: Option<Cow<'static, str>>,
    pub explain: Cow<'static, str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub from: Option<Side>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub flags: Option<TcpFlags>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub seq: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ack: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rel_seq: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rel_ack: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub len: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub win: Option<u16>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub options: Option<TcpOptions>,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub retransmission: bool,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub observations: Vec<Observation>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub side: Option<Side>,
    #[serde(skip_serializing_if = "Option::is_none", serialize_with = "hex_skaddr")]
    pub skaddr: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub oldstate: Option<TcpState>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub newstate: Option<TcpState>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub in_state_ns: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pid: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub comm: Option<Comm>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub netns: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub matched_step: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub end_ts_ns: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub segments: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bytes_client: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bytes_server: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub retransmissions: Option<u64>,
}

/// Only reached for `Some`: the field is skipped when absent.
fn hex_skaddr<S: serde::Serializer>(v: &Option<u64>, s: S) -> Result<S::Ok, S::Error> {
    match v {
        Some(v) => hex_addr(v, s),
        None => s.serialize_none(),
    }
}

impl Step {
    pub(crate) fn new(ts_ns: u64, kind: StepKind, name: impl Into<Cow<'static, str>>) -> Self {
        Step {
            ts_ns,
            rel_ns: 0,
            kind,
            name: name.into(),
            rule: None,
            explain: Cow::Borrowed(""),
            from: None,
            flags: None,
            seq: None,
            ack: None,
            rel_seq: None,
            rel_ack: None,
            len: None,
            win: None,
            options: None,
            retransmission: false,
            observations: Vec::new(),
            side: None,
            skaddr: None,
            oldstate: None,
            newstate: None,
            in_state_ns: None,
            pid: None,
            comm: None,
            netns: None,
            matched_step: None,
            end_ts_ns: None,
            segments: None,
            bytes_client: None,
            bytes_server: None,
            retransmissions: None,
        }
    }
}

/// The anomaly kinds, serialised in snake_case:
/// - `syn_retransmit`: the client's SYN was sent again (`count` = extra SYNs).
/// - `synack_retransmit`: the server's SYN-ACK was sent again.
/// - `refused`: the SYN was answered by RST (nothing listening).
/// - `reset`: an RST ended (or hit) the connection; `side` sent it, `state`
///   is the sender's state when known (kernel, else deduced from the wire).
/// - `bad_ack`: a handshake segment acknowledges the wrong number, e.g. a
///   stale SYN-ACK (old duplicate) that the client answers with RST.
/// - `handshake_seq_mismatch`: a handshake segment carries the wrong sequence
///   number (a second SYN with another ISN, a third ACK with seq ≠ x+1).
/// - `state_without_segment`: a kernel state change with no wire segment that
///   causes it within `match_window_ns` (only when both views exist).
/// - `segment_without_state`: a wire segment that must move a traced socket
///   with no matching state change within `match_window_ns` (same condition).
/// - `handshake_unfinished`: a SYN was seen but the handshake never completed
///   (and was not refused).
/// - `close_unfinished`: established but no complete close (still open at
///   exit, half-closed, last FIN never acknowledged).
/// - `truncated`: the per-connection event cap was reached; some plain
///   data segments were only counted, not kept.
/// - `connect_failed`: connect() failed before the kernel chose a source
///   port (SYN_SENT → CLOSE with port 0: no local port free for that
///   destination, EADDRNOTAVAIL, as a rule); the record's client port is 0.
/// - `state_gap`: a socket's traced state changes have a hole: one leaves a
///   state the last one did not enter, or the peer's transition proves the
///   socket moved on from the state it was last traced in. The changes in
///   between never arrived: lost to a full ring, or skipped by the kernel
///   (which does not count all of its skips).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum AnomalyKind {
    SynRetransmit,
    SynackRetransmit,
    Refused,
    Reset,
    BadAck,
    HandshakeSeqMismatch,
    StateWithoutSegment,
    SegmentWithoutState,
    HandshakeUnfinished,
    CloseUnfinished,
    Truncated,
    /// connect() failed before the kernel chose a source port.
    ConnectFailed,
    /// State changes of a traced socket that never arrived.
    StateGap,
}

impl AnomalyKind {
    /// Every kind, in declaration order: `kind as usize` indexes it (the
    /// closing summary counts by it; a kind left out goes uncounted there).
    pub const ALL: [AnomalyKind; 13] = [
        AnomalyKind::SynRetransmit,
        AnomalyKind::SynackRetransmit,
        AnomalyKind::Refused,
        AnomalyKind::Reset,
        AnomalyKind::BadAck,
        AnomalyKind::HandshakeSeqMismatch,
        AnomalyKind::StateWithoutSegment,
        AnomalyKind::SegmentWithoutState,
        AnomalyKind::HandshakeUnfinished,
        AnomalyKind::CloseUnfinished,
        AnomalyKind::Truncated,
        AnomalyKind::ConnectFailed,
        AnomalyKind::StateGap,
    ];

    pub fn name(self) -> &'static str {
        match self {
            AnomalyKind::SynRetransmit => "syn_retransmit",
            AnomalyKind::SynackRetransmit => "synack_retransmit",
            AnomalyKind::Refused => "refused",
            AnomalyKind::Reset => "reset",
            AnomalyKind::BadAck => "bad_ack",
            AnomalyKind::HandshakeSeqMismatch => "handshake_seq_mismatch",
            AnomalyKind::StateWithoutSegment => "state_without_segment",
            AnomalyKind::SegmentWithoutState => "segment_without_state",
            AnomalyKind::HandshakeUnfinished => "handshake_unfinished",
            AnomalyKind::CloseUnfinished => "close_unfinished",
            AnomalyKind::Truncated => "truncated",
            AnomalyKind::ConnectFailed => "connect_failed",
            AnomalyKind::StateGap => "state_gap",
        }
    }
}

/// `{"kind":"syn_retransmit","count":2,"side":"client","detail":"…"}`;
/// `count` is always present (1 for one-off anomalies), `side`, `state`,
/// `ts_ns` and `step` (index into `steps`) only when meaningful.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Anomaly {
    pub kind: AnomalyKind,
    pub count: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub side: Option<Side>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub state: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ts_ns: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub step: Option<usize>,
    pub detail: String,
}

impl Anomaly {
    pub(crate) fn new(kind: AnomalyKind, detail: impl Into<String>) -> Self {
        Anomaly {
            kind,
            count: 1,
            side: None,
            state: None,
            ts_ns: None,
            step: None,
            detail: detail.into(),
        }
    }
}

/// Time spent in one kernel state; `ns` is null for the state the socket was
/// last seen in (no exit observed).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct StateSpan {
    pub state: TcpState,
    pub ns: Option<u64>,
}

/// One kernel socket of the connection (client socket, server child socket).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct SocketStates {
    #[serde(serialize_with = "hex_addr")]
    pub skaddr: u64,
    pub side: Side,
    pub pid: u32,
    pub comm: Comm,
    pub netns: u32,
    pub states: Vec<StateSpan>,
}

/// TIME_WAIT, which `inet_sock_set_state` never shows: the full socket goes
/// to CLOSE and a timewait mini-socket (not traced) holds the 4-tuple.
/// `source` is `kernel` (FIN_WAIT2 → CLOSE or CLOSING → CLOSE seen) or
/// `wire` (the side that sent the last ACK of the close).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct TimeWait {
    pub side: Side,
    pub since_ts_ns: u64,
    pub rel_ns: u64,
    pub source: &'static str,
    /// Linux's TCP_TIMEWAIT_LEN (60 s), not measured.
    pub expected_ns: u64,
    pub detail: String,
}

/// Which views fed the record.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Views {
    /// Segments (TC or capture).
    pub wire: bool,
    /// State changes (tracepoint).
    pub kernel: bool,
    /// Segments came from live tracing (with vantage points), not a file.
    pub live: bool,
}

/// The explained record of one connection (one incarnation of a 4-tuple).
/// Serialises as the JSON summary object, `"type":"connection"` first.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Connection {
    #[serde(rename = "type")]
    pub record_type: &'static str,
    pub client: SocketAddr,
    pub server: SocketAddr,
    pub family: Family,
    /// Only for loopback connections, which are keyed by namespace too.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub netns: Option<u32>,
    pub isn_client: Option<u32>,
    pub isn_server: Option<u32>,
    /// SYN → SYN-ACK as seen at the client (or the only vantage point).
    pub handshake_rtt_ns: Option<u64>,
    /// SYN-ACK → ACK as seen at the server (or the only vantage point).
    pub handshake_rtt_server_ns: Option<u64>,
    pub bytes_client: Option<u64>,
    pub bytes_server: Option<u64>,
    pub open: Open,
    pub close: Close,
    pub closed_by: Option<Side>,
    pub first_ts_ns: u64,
    pub last_ts_ns: u64,
    pub duration_ns: u64,
    pub end_reason: EndReason,
    /// Distinct wire segments (one per wire step, observations merged).
    pub segments: u64,
    pub retransmissions: u64,
    pub views: Views,
    pub steps: Vec<Step>,
    pub anomalies: Vec<Anomaly>,
    pub states: Vec<SocketStates>,
    pub time_wait: Option<TimeWait>,
}

impl Connection {
    pub fn anomaly(&self, kind: AnomalyKind) -> Option<&Anomaly> {
        self.anomalies.iter().find(|a| a.kind == kind)
    }

    pub fn has_anomaly(&self, kind: AnomalyKind) -> bool {
        self.anomaly(kind).is_some()
    }

    /// Steps of one kind, in order (handy for scripts and tests).
    pub fn steps_of(&self, kind: StepKind) -> impl Iterator<Item = &Step> {
        self.steps.iter().filter(move |s| s.kind == kind)
    }
}
