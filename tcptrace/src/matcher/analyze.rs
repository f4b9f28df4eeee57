//! One record's events → the explained [`Connection`].
//!
//! Runs once per connection, on emit, over the events sorted by time:
//! 1. merge the observations of one segment at several vantage points into
//!    one wire step (same header, different (netns, ifindex, dir));
//! 2. walk the wire steps with the RFC 9293 rules: name each handshake and
//!    close step, check its numbers, spot retransmissions and resets;
//! 3. explain each kernel transition with the wire step that causes it and
//!    report the ones that have none (and the reverse) when both views exist;
//! 4. infer TIME_WAIT, which the tracepoint cannot show.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::net::SocketAddr;

use crate::event::{Dir, Event, Family, Segment, StateChange, TcpState};
use crate::text::text;

use super::model::*;
use super::{seq_ge, Dropped, Key, LeftOpen, MatcherConfig};

pub(super) struct Input<'a> {
    pub key: Key,
    /// Sorted in place; the matcher reuses the list.
    pub events: &'a mut Vec<Event>,
    pub dropped: [Dropped; 2],
    pub events_dropped: u64,
    pub end_reason: EndReason,
    /// Sockets an earlier record of this 4-tuple left open.
    pub earlier: &'a [LeftOpen],
}

/// Linux's TCP_TIMEWAIT_LEN.
const TIMEWAIT_LEN_NS: u64 = 60_000_000_000;
/// How far back to look for another observation of the same segment.
const MERGE_LOOKBACK: usize = 64;

fn idx(s: Side) -> usize {
    match s {
        Side::Client => 0,
        _ => 1,
    }
}

/// The role of a wire step in the connection's life.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Class {
    Syn,
    SynAck,
    BadSynAck,
    HandshakeAck,
    BadAck,
    Fin,
    AckOfFin,
    Rst,
    /// An RST that does not end the connection (answer to an old duplicate).
    RstIgnored,
    Data,
}

struct Wire<'a> {
    seg: &'a Segment,
    from: Side,
    ts: u64,
    obs: Seen,
    retrans: bool,
    class: Class,
    /// Also acknowledges the peer's FIN (FIN+ACK, data acking a FIN).
    acks_fin: bool,
    name: Cow<'static, str>,
    rule: Option<Cow<'static, str>>,
    explain: Cow<'static, str>,
}

impl Wire<'_> {
    fn identity_eq(&self, s: &Segment, from: Side) -> bool {
        let a = self.seg;
        self.from == from
            && a.seq == s.seq
            && a.ack == s.ack
            && a.flags == s.flags
            && a.len == s.len
            && a.win == s.win
            && a.options.tsval == s.options.tsval
            && a.options.tsecr == s.options.tsecr
    }

    fn within(&self, ts: u64, window: u64) -> bool {
        self.obs.iter().any(|o| o.ts_ns.abs_diff(ts) <= window)
    }
}

/// Where one segment was seen, in order: the one place of a capture file, or
/// the vantage points of live tracing. The first is held inline: a Vec per
/// segment was an allocation for every packet of a capture.
struct Seen {
    first: Observation,
    more: Vec<Observation>,
}

impl Seen {
    fn iter(&self) -> impl Iterator<Item = &Observation> {
        std::iter::once(&self.first).chain(&self.more)
    }

    fn push(&mut self, o: Observation) {
        self.more.push(o);
    }

    /// All of them, for a step (`more` is left empty).
    fn take(&mut self) -> Vec<Observation> {
        let mut all = Vec::with_capacity(1 + self.more.len());
        all.push(self.first.clone());
        all.append(&mut self.more);
        all
    }
}

struct Sock<'a> {
    skaddr: u64,
    side: Side,
    local: Option<SocketAddr>,
    remote: Option<SocketAddr>,
    changes: Vec<&'a StateChange>,
}

pub(super) fn analyze(input: Input<'_>, cfg: &MatcherConfig) -> Connection {
    let Input {
        key,
        events,
        dropped,
        events_dropped,
        end_reason,
        earlier,
    } = input;
    events.sort_by_key(Event::ts_ns);
    let window = cfg.match_window_ns;
    let first_ts = events.first().map_or(0, Event::ts_ns);
    let mut last_ts = events.last().map_or(0, Event::ts_ns);
    for d in &dropped {
        if d.segments > 0 {
            last_ts = last_ts.max(d.last_ts);
        }
    }

    // Sized up front, as are each socket's changes and spans below: growing
    // these lists step by step was a fifth of what analysing a connection
    // cost (callgrind, storm connections).
    let mut segs: Vec<&Segment> = Vec::with_capacity(events.len());
    let mut changes: Vec<&StateChange> = Vec::with_capacity(events.len());
    for e in events.iter() {
        match e {
            Event::Segment(s) => segs.push(s),
            Event::State(s) => changes.push(s),
        }
    }

    // Sockets, in order of first appearance: a client and a server socket.
    let mut socks: Vec<Sock> = Vec::with_capacity(2);
    for sc in &changes {
        let i = match socks.iter().position(|s| s.skaddr == sc.skaddr) {
            Some(i) => i,
            None => {
                socks.push(Sock {
                    skaddr: sc.skaddr,
                    side: Side::Client,
                    local: None,
                    remote: None,
                    changes: Vec::with_capacity(changes.len()),
                });
                socks.len() - 1
            }
        };
        let s = &mut socks[i];
        if s.local.is_none() && super::is_complete(sc) {
            s.local = Some(SocketAddr::new(sc.saddr, sc.sport));
            s.remote = Some(SocketAddr::new(sc.daddr, sc.dport));
        }
        s.changes.push(sc);
    }
    // A connect() that failed before it had a source port never showed a
    // complete 4-tuple; its record is keyed with local port 0.
    for s in socks.iter_mut().filter(|s| s.local.is_none()) {
        if let Some(sc) = s.changes.iter().rev().find(|c| c.dport != 0) {
            s.local = Some(SocketAddr::new(sc.saddr, sc.sport));
            s.remote = Some(SocketAddr::new(sc.daddr, sc.dport));
        }
    }

    let (client, server) = pick_client(&key, &segs, &socks);
    for s in &mut socks {
        s.side = if s.local == Some(client) || s.remote == Some(server) {
            Side::Client
        } else {
            Side::Server
        };
    }
    let from_side = |s: &Segment| {
        if SocketAddr::new(s.saddr, s.sport) == client {
            Side::Client
        } else {
            Side::Server
        }
    };

    let live = segs.iter().any(|s| s.dir != Dir::Capture);
    let views = Views {
        wire: !segs.is_empty(),
        kernel: !changes.is_empty(),
        live,
    };

    // 1. One wire step per segment; other vantage points become observations.
    let mut wires: Vec<Wire> = Vec::with_capacity(segs.len());
    for s in &segs {
        let from = from_side(s);
        let obs = Observation {
            netns: s.netns,
            ifindex: s.ifindex,
            iface: s.iface.clone(),
            dir: s.dir,
            ts_ns: s.ts_ns,
        };
        let same_vantage =
            |o: &Observation| o.netns == s.netns && o.ifindex == s.ifindex && o.dir == s.dir;
        let mut merged = false;
        let mut seen_here = false;
        let lo = wires.len().saturating_sub(MERGE_LOOKBACK);
        for w in wires[lo..].iter_mut().rev() {
            if w.ts.saturating_add(window) < s.ts_ns {
                break;
            }
            if !w.identity_eq(s, from) {
                continue;
            }
            if w.obs.iter().any(same_vantage) {
                seen_here = true;
                continue;
            }
            w.obs.push(obs.clone());
            merged = true;
            break;
        }
        if !merged {
            wires.push(Wire {
                seg: s,
                from,
                ts: s.ts_ns,
                obs: Seen {
                    first: obs,
                    more: Vec::new(),
                },
                // The same segment again at the same place: sent twice.
                retrans: seen_here,
                class: Class::Data,
                acks_fin: false,
                name: Cow::Borrowed(""),
                rule: None,
                explain: Cow::Borrowed(""),
            });
        }
    }

    // ISNs. The client's is the SYN that a SYN-ACK acknowledges, so that a
    // stale SYN-ACK does not redefine it; the server's is in that SYN-ACK.
    let client_syns: Vec<u32> = wires
        .iter()
        .filter(|w| w.from == Side::Client && w.seg.flags.syn() && !w.seg.flags.ack())
        .map(|w| w.seg.seq)
        .collect();
    let server_synacks: Vec<&Segment> = wires
        .iter()
        .filter(|w| w.from == Side::Server && w.seg.flags.syn() && w.seg.flags.ack())
        .map(|w| w.seg)
        .collect();
    let server_syn = wires
        .iter()
        .find(|w| w.from == Side::Server && w.seg.flags.syn() && !w.seg.flags.ack())
        .map(|w| w.seg.seq);
    let isn_c: Option<u32> = client_syns
        .iter()
        .rev()
        .find(|&&c| server_synacks.iter().any(|s| s.ack == c.wrapping_add(1)))
        .or(client_syns.first())
        .copied()
        .or_else(|| server_synacks.first().map(|s| s.ack.wrapping_sub(1)));
    let isn_s: Option<u32> = server_synacks
        .iter()
        .find(|s| Some(s.ack) == isn_c.map(|x| x.wrapping_add(1)))
        .map(|s| s.seq)
        .or(server_syn)
        .or_else(|| {
            if client_syns.is_empty() {
                server_synacks.first().map(|s| s.seq)
            } else {
                None
            }
        });
    let isn = [isn_c, isn_s];
    let simultaneous_open_wire = server_syn.is_some() && !client_syns.is_empty();
    let rel = |side: Side, v: u32| -> u32 {
        match isn[idx(side)] {
            Some(i) => v.wrapping_sub(i),
            None => v,
        }
    };

    // 2. Walk the wire.
    let mut anomalies: Vec<Anomaly> = Vec::new();
    let any_syn = !client_syns.is_empty() || !server_synacks.is_empty();
    let mut handshake_done = !any_syn && !wires.is_empty();
    let mut synack_ok = [false; 2];
    let mut syn_times: Vec<u64> = Vec::new();
    let mut synack_seen: Vec<u32> = Vec::new();
    let mut synack_retx = 0u32;
    // Stale SYN-ACKs by their ack number, each with its `bad_ack` anomaly
    // until a client RST answers it: a RST answers each at most once, so a
    // capture repeating both cannot grow the details without bound.
    let mut stale_synack: BTreeMap<u32, Vec<usize>> = BTreeMap::new();
    let mut max_end: [Option<u32>; 2] = [None, None];
    let mut fin: [Option<u32>; 2] = [None, None];
    let mut fin_step: [Option<usize>; 2] = [None, None];
    let mut fin_acked_by: [Option<usize>; 2] = [None, None];
    let mut first_closer: Option<Side> = None;
    let mut close_kind: Option<Close> = None;
    let mut terminal_rst: Option<usize> = None;
    let mut refused = false;
    let mut handshake_ack_step: Option<usize> = None;
    let mut synack_step: Option<usize> = None;
    let mut reset_anomaly: Option<usize> = None;

    // Indexing: the loop body records step indices (anomalies, FIN steps).
    #[allow(clippy::needless_range_loop)]
    for i in 0..wires.len() {
        let (seg, from, ts) = (wires[i].seg, wires[i].from, wires[i].ts);
        let f = seg.flags;
        let s = idx(from);
        let p = 1 - s;
        let who = from.name();
        let peer = from.peer().name();
        let mut class = Class::Data;
        let mut name: Cow<'static, str> = Cow::Borrowed("");
        let mut rule: Option<Cow<'static, str>> = None;
        let mut explain: Cow<'static, str> = Cow::Borrowed("");
        let mut retrans = wires[i].retrans;
        let mut acks_fin = false;

        if f.rst() {
            let acks_client_syn = f.ack() && isn_c.map(|x| x.wrapping_add(1)) == Some(seg.ack);
            let close_done = fin_acked_by[0].is_some() && fin_acked_by[1].is_some();
            if !handshake_done
                && from == Side::Server
                && acks_client_syn
                && !synack_ok[1]
                && terminal_rst.is_none()
            {
                class = Class::Rst;
                refused = true;
                terminal_rst = Some(i);
                name = "RST (refused)".into();
                rule = Some("RST ack=x+1".into());
                explain = format!(
                    "nothing accepts connections on {server}: the SYN is answered by RST — connection refused (ECONNREFUSED)"
                ).into();
                let mut a = Anomaly::new(
                    AnomalyKind::Refused,
                    format!("SYN to {server} answered by RST ack=x+1: no listener (or a firewall's tcp-reset)"),
                );
                a.side = Some(Side::Server);
                a.ts_ns = Some(ts);
                a.step = Some(i);
                anomalies.push(a);
            } else if !handshake_done && from == Side::Client && stale_synack.contains_key(&seg.seq)
            {
                class = Class::RstIgnored;
                name = "RST (rejects old duplicate)".into();
                rule = Some("RST seq=SEG.ACK".into());
                explain = format!(
                    "the client rejects the unacceptable SYN-ACK with RST seq={}: the old duplicate is defeated and the handshake goes on (RFC 9293 §3.5, figure 8)",
                    seg.seq
                ).into();
                for k in stale_synack
                    .get_mut(&seg.seq)
                    .map(std::mem::take)
                    .unwrap_or_default()
                {
                    anomalies[k].detail.push_str("; answered by RST");
                }
            } else if terminal_rst.is_some() {
                class = Class::Rst;
                name = "RST (again)".into();
                explain = format!("{who} resets again: the connection is already gone").into();
                if let Some(a) = reset_anomaly.and_then(|k| anomalies.get_mut(k)) {
                    a.count += 1;
                }
            } else {
                class = Class::Rst;
                let state = state_at(&socks, from, ts)
                    .map(|s| s.name().to_string())
                    .unwrap_or_else(|| {
                        wire_state(from, handshake_done, &fin, &fin_acked_by, first_closer)
                            .to_string()
                    });
                if close_done {
                    name = "RST (after close)".into();
                    explain = format!(
                        "{who} sends RST after the close completed ({who} in {state}): a segment hit a socket that is gone"
                    ).into();
                } else {
                    terminal_rst = Some(i);
                    name = "RST".into();
                    explain = format!(
                        "{who} resets the connection in {state}: no FIN exchange, data in flight is lost; {peer} goes straight to CLOSED"
                    ).into();
                }
                let mut a =
                    Anomaly::new(AnomalyKind::Reset, format!("RST from the {who} in {state}"));
                a.side = Some(from);
                a.state = Some(state);
                a.ts_ns = Some(ts);
                a.step = Some(i);
                reset_anomaly = Some(anomalies.len());
                anomalies.push(a);
            }
        } else if f.syn() && !f.ack() {
            class = Class::Syn;
            if from == Side::Client {
                if Some(seg.seq) == isn_c || client_syns.first() == Some(&seg.seq) {
                    if syn_times.is_empty() {
                        name = "SYN".into();
                        rule = Some("SYN seq=x".into());
                        explain = text![
                            "x = ",
                            seg.seq,
                            ": the client opens (active open) with its initial sequence number and enters SYN_SENT",
                        ]
                        .into();
                    } else {
                        retrans = true;
                        let gap = ts.saturating_sub(*syn_times.last().unwrap_or(&ts));
                        name = "SYN (retransmission)".into();
                        rule = Some("SYN seq=x".into());
                        explain = format!(
                            "no SYN-ACK after {}: the client sends its SYN again (retransmission #{}, the timeout doubles each time)",
                            crate::timeline::human_duration(gap),
                            syn_times.len()
                        ).into();
                    }
                    syn_times.push(ts);
                } else {
                    name = "SYN (other ISN)".into();
                    explain = format!(
                        "a client SYN with ISN {} ≠ x: a new attempt or an old duplicate on the same 4-tuple",
                        seg.seq
                    ).into();
                    let mut a = Anomaly::new(
                        AnomalyKind::HandshakeSeqMismatch,
                        format!(
                            "client SYN seq={} while the handshake uses x={}",
                            seg.seq,
                            isn_c.unwrap_or(0)
                        ),
                    );
                    a.side = Some(Side::Client);
                    a.ts_ns = Some(ts);
                    a.step = Some(i);
                    anomalies.push(a);
                }
            } else {
                name = "SYN (simultaneous open)".into();
                rule = Some("SYN seq=y".into());
                explain = format!(
                    "the server sends its own SYN (y = {}) instead of answering: both ends opened actively — simultaneous open, each goes SYN_SENT → SYN_RECV",
                    seg.seq
                ).into();
                if synack_seen.contains(&seg.seq) {
                    retrans = true;
                }
            }
            if from == Side::Server {
                synack_seen.push(seg.seq);
            }
        } else if f.syn() {
            let expected = isn[p].map(|x| x.wrapping_add(1));
            if expected == Some(seg.ack) {
                class = Class::SynAck;
                synack_ok[s] = true;
                let (synack_rule, other) = if from == Side::Server {
                    ("SYN-ACK seq=y ack=x+1", "x")
                } else {
                    ("SYN-ACK seq=x ack=y+1", "y")
                };
                rule = Some(synack_rule.into());
                if from == Side::Server && synack_seen.contains(&seg.seq) && synack_step.is_some() {
                    retrans = true;
                    synack_retx += 1;
                    name = "SYN-ACK (retransmission)".into();
                    explain = "the server sends its SYN-ACK again: its ACK did not arrive in time (or the client's SYN was retransmitted)".into();
                } else if simultaneous_open_wire {
                    name = "SYN-ACK".into();
                    explain = format!(
                        "the {who} acknowledges the {peer}'s SYN ({other}+1) repeating its own SYN: simultaneous open, SYN_RECV → ESTABLISHED when the peer's SYN-ACK arrives"
                    ).into();
                } else {
                    name = "SYN-ACK".into();
                    explain = text![
                        "y = ",
                        seg.seq,
                        ": the server accepts, acknowledging x+1 and choosing its own initial sequence number",
                    ]
                    .into();
                }
                if from == Side::Server {
                    synack_seen.push(seg.seq);
                    synack_step.get_or_insert(i);
                }
                if synack_ok == [true, true] {
                    handshake_done = true;
                }
            } else {
                class = Class::BadSynAck;
                name = "SYN-ACK (bad ack)".into();
                rule = Some("SYN-ACK ack=x+1 (violated)".into());
                explain = format!(
                    "acknowledges {} but the client's SYN was x = {} (expected {}): a stale SYN-ACK from an old incarnation (old duplicate); the client must answer with RST seq={}",
                    seg.ack,
                    isn_c.unwrap_or(0),
                    isn_c.unwrap_or(0).wrapping_add(1),
                    seg.ack
                ).into();
                stale_synack
                    .entry(seg.ack)
                    .or_default()
                    .push(anomalies.len());
                let mut a = Anomaly::new(
                    AnomalyKind::BadAck,
                    format!(
                        "SYN-ACK ack={} does not acknowledge the client's SYN (x+1={})",
                        seg.ack,
                        isn_c.unwrap_or(0).wrapping_add(1)
                    ),
                );
                a.side = Some(from);
                a.ts_ns = Some(ts);
                a.step = Some(i);
                anomalies.push(a);
            }
        } else {
            // No SYN, no RST: handshake ACK, FIN, ACK of a FIN, or data.
            let mut named = false;
            if !handshake_done && from == Side::Client && f.ack() && synack_ok[1] {
                let y1 = isn_s.map(|y| y.wrapping_add(1));
                if y1 == Some(seg.ack) {
                    handshake_done = true;
                    handshake_ack_step = Some(i);
                    class = Class::HandshakeAck;
                    name = "ACK (handshake)".into();
                    rule = Some("ACK ack=y+1".into());
                    explain = "handshake complete: both sides ESTABLISHED".into();
                    if isn_c.map(|x| x.wrapping_add(1)) != Some(seg.seq) {
                        let mut a = Anomaly::new(
                            AnomalyKind::HandshakeSeqMismatch,
                            format!(
                                "third segment seq={} but x+1={}",
                                seg.seq,
                                isn_c.unwrap_or(0).wrapping_add(1)
                            ),
                        );
                        a.side = Some(Side::Client);
                        a.ts_ns = Some(ts);
                        a.step = Some(i);
                        anomalies.push(a);
                    }
                } else {
                    class = Class::BadAck;
                    name = "ACK (bad ack)".into();
                    rule = Some("ACK ack=y+1 (violated)".into());
                    explain = format!(
                        "acknowledges {} but the server's SYN-ACK was y = {}: not acceptable, the server answers with RST",
                        seg.ack,
                        isn_s.unwrap_or(0)
                    ).into();
                    let mut a = Anomaly::new(
                        AnomalyKind::BadAck,
                        format!(
                            "ACK ack={} does not acknowledge the server's SYN (y+1={})",
                            seg.ack,
                            isn_s.unwrap_or(0).wrapping_add(1)
                        ),
                    );
                    a.side = Some(Side::Client);
                    a.ts_ns = Some(ts);
                    a.step = Some(i);
                    anomalies.push(a);
                }
                named = true;
            } else if !handshake_done && from == Side::Server && !f.fin() && synack_ok[1] {
                // The server talks after its SYN-ACK, so the third ACK was
                // not captured here; the connection is open anyway.
                handshake_done = true;
            }
            // RFC 9293's names: u is the first closer's FIN, w the other's.
            let is_u = |side: Side| Some(side) == first_closer;
            let letter = |side: Side| if is_u(side) { "u" } else { "w" };
            // Does it acknowledge the peer's FIN for the first time?
            if f.ack() && fin_acked_by[p].is_none() {
                if let Some(pf) = fin[p] {
                    if seq_ge(seg.ack, pf.wrapping_add(1)) {
                        fin_acked_by[p] = Some(i);
                        acks_fin = true;
                    }
                }
            }
            if f.fin() {
                let fs = seg.seq.wrapping_add(seg.len);
                class = Class::Fin;
                match fin[s] {
                    Some(prev) if prev == fs => {
                        retrans = true;
                        name = "FIN (retransmission)".into();
                        rule = Some(if is_u(from) { "FIN seq=u" } else { "FIN seq=w" }.into());
                        explain =
                            format!("the {who} sends its FIN again: no ACK for it yet").into();
                    }
                    Some(_) => {
                        name = "FIN (other seq)".into();
                        explain =
                            format!("another FIN from the {who} with a different sequence number")
                                .into();
                    }
                    None => {
                        fin[s] = Some(fs);
                        fin_step[s] = Some(i);
                        let v = rel(from, fs);
                        if fin[p].is_none() {
                            first_closer = Some(from);
                            name = "FIN".into();
                            rule = Some("FIN seq=u".into());
                            explain = text![
                                "u = ",
                                v,
                                ": the ",
                                who,
                                " closes its sending direction first (active close) and enters FIN_WAIT1",
                            ]
                            .into();
                        } else if acks_fin {
                            close_kind.get_or_insert(Close::ThreeSegment);
                            name = "FIN+ACK".into();
                            rule = Some("FIN seq=w, ACK ack=u+1".into());
                            explain = text![
                                "w = ",
                                v,
                                ", u+1 = ",
                                rel(from.peer(), seg.ack),
                                ": the ",
                                who,
                                "'s FIN rides on its ACK of the ",
                                peer,
                                "'s FIN — three-segment close; ",
                                who,
                                " LAST_ACK, ",
                                peer,
                                " FIN_WAIT2",
                            ]
                            .into();
                        } else if fin_acked_by[p].is_some() {
                            close_kind.get_or_insert(Close::FourSegment);
                            name = "FIN".into();
                            rule = Some("FIN seq=w".into());
                            explain = text![
                                "w = ",
                                v,
                                ": the ",
                                who,
                                " closes too, CLOSE_WAIT → LAST_ACK — four-segment close",
                            ]
                            .into();
                        } else {
                            close_kind.get_or_insert(Close::Simultaneous);
                            name = "FIN (simultaneous close)".into();
                            rule = Some("FIN seq=w".into());
                            explain = format!(
                                "w = {v}: the {who}'s FIN crosses the {peer}'s (it does not acknowledge u+1) — simultaneous close, both sides FIN_WAIT1 → CLOSING"
                            ).into();
                        }
                    }
                }
                named = true;
            } else if acks_fin {
                let l = letter(from.peer());
                class = Class::AckOfFin;
                name = "ACK of FIN".into();
                rule = Some(
                    if is_u(from.peer()) {
                        "ACK ack=u+1"
                    } else {
                        "ACK ack=w+1"
                    }
                    .into(),
                );
                let n = rel(from.peer(), seg.ack);
                explain = if fin[s].is_some() && close_kind == Some(Close::Simultaneous) {
                    text![
                        l,
                        "+1 = ",
                        n,
                        ": the ",
                        who,
                        " acknowledges the ",
                        peer,
                        "'s FIN; the ",
                        peer,
                        " leaves CLOSING for TIME_WAIT"
                    ]
                } else if fin[s].is_some() {
                    text![
                        l,
                        "+1 = ",
                        n,
                        ": close complete; the ",
                        who,
                        " enters TIME_WAIT, the ",
                        peer,
                        " CLOSED"
                    ]
                } else if seg.len > 0 {
                    text![
                        l,
                        "+1 = ",
                        n,
                        ", with data: half-close — the ",
                        who,
                        " (CLOSE_WAIT) keeps sending, the ",
                        peer,
                        " (FIN_WAIT2) keeps receiving"
                    ]
                } else {
                    text![
                        l,
                        "+1 = ",
                        n,
                        ": the ",
                        peer,
                        " moves to FIN_WAIT2, the ",
                        who,
                        " to CLOSE_WAIT (half-closed: the ",
                        who,
                        " may still send)"
                    ]
                }
                .into();
                named = true;
            }
            if !named && seg.len > 0 {
                if let Some(m) = max_end[s] {
                    if !seq_ge(seg.seq, m) {
                        retrans = true;
                    }
                }
            }
            if !named {
                class = Class::Data;
                name = if seg.len > 0 { "data" } else { "ACK" }.into();
                // A pure ACK sent again is a duplicate ACK (its sender saw a
                // loss or reordering), not a retransmission.
                if seg.len == 0 {
                    retrans = false;
                }
            }
        }

        if !f.syn() && !f.rst() {
            let end = seg.seq.wrapping_add(seg.len);
            if max_end[s].is_none_or(|m| seq_ge(end, m)) {
                max_end[s] = Some(end);
            }
        }
        let w = &mut wires[i];
        w.class = class;
        w.name = name;
        w.rule = rule;
        w.explain = explain;
        w.retrans = retrans;
        w.acks_fin = acks_fin;
    }

    // Close: the wire decides when it saw the FINs or the RST; the kernel
    // fills in when only sockets were traced.
    let mut close = Close::Unfinished;
    let mut closed_by: Option<Side> = None;
    if let Some(k) = close_kind {
        close = k;
        closed_by = if k == Close::Simultaneous {
            Some(Side::Both)
        } else {
            first_closer
        };
    }
    let close_complete_wire = fin_acked_by[0].is_some() && fin_acked_by[1].is_some();
    if let Some(r) = terminal_rst {
        if !close_complete_wire {
            close = Close::Reset;
            closed_by = Some(wires[r].from);
        }
    }
    if close == Close::Unfinished && closed_by.is_none() {
        closed_by = first_closer;
    }
    let kclose = kernel_close(&socks);
    if close == Close::Unfinished {
        if let Some((k, by)) = kclose {
            close = k;
            closed_by = by.or(closed_by);
        }
    } else if kclose.is_some_and(|(k, _)| k == Close::Simultaneous) && close != Close::Reset {
        close = Close::Simultaneous;
        closed_by = Some(Side::Both);
    }

    let kernel_established = changes.iter().any(|c| c.newstate == TcpState::Established);
    let established = (handshake_done && !wires.is_empty()) || kernel_established;
    let kernel_complete = socks.iter().any(|s| {
        s.changes.iter().any(|c| {
            matches!(
                (c.oldstate, c.newstate),
                (TcpState::LastAck, TcpState::Close)
                    | (TcpState::FinWait2, TcpState::Close)
                    | (TcpState::Closing, TcpState::Close)
            )
        })
    });

    // Anomalies that summarise the walk.
    if syn_times.len() > 1 {
        let gaps: Vec<String> = syn_times
            .windows(2)
            .map(|w| crate::timeline::human_duration(w[1].saturating_sub(w[0])))
            .collect();
        let mut a = Anomaly::new(
            AnomalyKind::SynRetransmit,
            format!(
                "SYN sent {} times (gaps {}): SYN-ACK late or lost, or nothing answering",
                syn_times.len(),
                gaps.join(", ")
            ),
        );
        a.count = (syn_times.len() - 1) as u32;
        a.side = Some(Side::Client);
        anomalies.push(a);
    }
    if synack_retx > 0 {
        let mut a = Anomaly::new(
            AnomalyKind::SynackRetransmit,
            format!(
                "SYN-ACK sent {} times: the client's ACK late or lost",
                synack_retx + 1
            ),
        );
        a.count = synack_retx;
        a.side = Some(Side::Server);
        anomalies.push(a);
    }
    let kernel_opened = changes
        .iter()
        .any(|c| matches!(c.newstate, TcpState::SynSent | TcpState::SynRecv));
    let connect_failed = changes.iter().find(|c| is_portless_connect_failure(c));
    if let Some(c) = connect_failed {
        let mut a = Anomaly::new(
            AnomalyKind::ConnectFailed,
            text![
                "connect() to ",
                server,
                " failed before the kernel chose a source port: no free local port for this destination (EADDRNOTAVAIL; see net.ipv4.ip_local_port_range and connections in TIME_WAIT)",
            ],
        );
        a.side = Some(Side::Client);
        a.ts_ns = Some(c.ts_ns);
        anomalies.push(a);
    } else if (any_syn || kernel_opened) && !established && !refused {
        let detail = if syn_times.is_empty() && !any_syn {
            "a socket began the handshake but never reached ESTABLISHED".to_string()
        } else if synack_ok[1] {
            "SYN-ACK sent but the client's ACK (ack=y+1) never seen".to_string()
        } else {
            "SYN never answered by an acceptable SYN-ACK".to_string()
        };
        anomalies.push(Anomaly::new(AnomalyKind::HandshakeUnfinished, detail));
    }
    if established && close != Close::Reset {
        let detail = if close == Close::Unfinished {
            match (fin[0].is_some(), fin[1].is_some(), closed_by) {
                (false, false, None) => Some(format!(
                    "no FIN from either side: still open when the record ended ({})",
                    end_reason_text(end_reason)
                )),
                (true, false, _) => Some(
                    "half-closed: the client sent FIN, the server never did (server in CLOSE_WAIT)"
                        .to_string(),
                ),
                (false, true, _) => Some(
                    "half-closed: the server sent FIN, the client never did (client in CLOSE_WAIT)"
                        .to_string(),
                ),
                _ if !kernel_complete => Some(format!(
                    "the kernel began closing but the close never completed ({})",
                    end_reason_text(end_reason)
                )),
                _ => None,
            }
        } else if !close_complete_wire && !kernel_complete && views.wire {
            Some("both FINs sent but the last one was never acknowledged".to_string())
        } else {
            None
        };
        if let Some(d) = detail {
            anomalies.push(Anomaly::new(AnomalyKind::CloseUnfinished, d));
        }
    }
    let dropped_total: u64 = dropped.iter().map(|d| d.segments).sum::<u64>() + events_dropped;
    if dropped_total > 0 {
        let mut a = Anomaly::new(
            AnomalyKind::Truncated,
            format!("{dropped_total} events over the per-connection cap were counted but not kept"),
        );
        a.count = u32::try_from(dropped_total).unwrap_or(u32::MAX);
        anomalies.push(a);
    }

    // 3. Kernel steps, each with the wire step that explains it.
    let ctx = MatchCtx {
        wires: &wires,
        isn,
        fin,
        window,
    };
    let both_views = views.wire && views.kernel && views.live;
    struct KStep<'a> {
        sc: &'a StateChange,
        side: Side,
        in_state: Option<u64>,
        cause: Option<usize>,
    }
    let mut ksteps: Vec<KStep> = Vec::with_capacity(changes.len());
    // Per wire step, the (side, role) pairs a kernel step was matched to.
    let mut explained = vec![0u16; wires.len()];
    let role = |side: Side, pred: Pred| 1u16 << (idx(side) * 6 + pred as usize);
    for sock in &socks {
        let mut prev_ts: Option<u64> = None;
        for sc in &sock.changes {
            let in_state = if sc.prev_state_ns > 0 {
                Some(sc.prev_state_ns)
            } else {
                prev_ts.map(|t| sc.ts_ns.saturating_sub(t))
            };
            prev_ts = Some(sc.ts_ns);
            let (rules, required) = transition_rules(sc.oldstate, sc.newstate);
            let mut cause = None;
            let mut best = u64::MAX;
            for (wi, w) in wires.iter().enumerate() {
                let hit = rules
                    .iter()
                    .find(|&&(who, pred)| ctx.matches(w, sock.side, who, pred, sc.ts_ns));
                if let Some(&(_, pred)) = hit {
                    explained[wi] |= role(sock.side, pred);
                    let d = w
                        .obs
                        .iter()
                        .map(|o| o.ts_ns.abs_diff(sc.ts_ns))
                        .min()
                        .unwrap_or(u64::MAX);
                    if d < best {
                        best = d;
                        cause = Some(wi);
                    }
                }
            }
            if both_views && required && cause.is_none() {
                let what = rules
                    .first()
                    .map(|&(who, pred)| pred_text(who, pred, sock.side))
                    .unwrap_or_default();
                let mut a = Anomaly::new(
                    AnomalyKind::StateWithoutSegment,
                    format!(
                        "{} socket {:#x} went {} → {} but no {} was seen on the wire within {}",
                        sock.side.name(),
                        sc.skaddr,
                        sc.oldstate,
                        sc.newstate,
                        what,
                        crate::timeline::human_duration(window)
                    ),
                );
                a.side = Some(sock.side);
                a.state = Some(format!("{} → {}", sc.oldstate, sc.newstate));
                a.ts_ns = Some(sc.ts_ns);
                anomalies.push(a);
            }
            ksteps.push(KStep {
                sc,
                side: sock.side,
                in_state,
                cause,
            });
        }
    }
    if both_views {
        let traced = |side: Side| socks.iter().any(|s| s.side == side);
        // A socket already CLOSE when a segment arrives cannot be moved by
        // it: after FIN_WAIT2 → CLOSE the kernel hands the connection to a
        // timewait socket, which takes the peer's late FIN untraced.
        let gone_before = |side: Side, ts: u64| {
            socks.iter().any(|s| {
                s.side == side
                    && (s.changes.iter()).any(|c| c.newstate == TcpState::Close && c.ts_ns < ts)
            })
        };
        for (wi, w) in wires.iter().enumerate() {
            // (sides whose socket this segment must move, the role it plays)
            let (sides, pred): (&[Side], Pred) = match w.class {
                Class::Syn if !w.retrans && w.from == Side::Client => (&[Side::Client], Pred::Syn),
                Class::SynAck if !w.retrans && w.from == Side::Server => {
                    (&[Side::Client], Pred::SynAck)
                }
                Class::HandshakeAck => (&[Side::Server], Pred::AckOfSyn),
                Class::Fin if !w.retrans && fin_step[idx(w.from)] == Some(wi) => {
                    (&[Side::Client, Side::Server], Pred::Fin)
                }
                Class::Rst if terminal_rst == Some(wi) => {
                    (&[Side::Client, Side::Server], Pred::Rst)
                }
                // The FIN's sender leaves FIN_WAIT1, CLOSING or LAST_ACK.
                // (A FIN+ACK's move is left to state_gap.)
                Class::AckOfFin => match w.from {
                    Side::Client => (&[Side::Server], Pred::AckOfFin),
                    Side::Server => (&[Side::Client], Pred::AckOfFin),
                    Side::Both => (&[], Pred::AckOfFin),
                },
                _ => (&[], Pred::Rst),
            };
            for &side in sides {
                if traced(side) && explained[wi] & role(side, pred) == 0 && !gone_before(side, w.ts)
                {
                    // An RST is explained by either end's transition.
                    if w.class == Class::Rst
                        && explained[wi] & (role(Side::Client, pred) | role(Side::Server, pred))
                            != 0
                    {
                        continue;
                    }
                    let mut a = Anomaly::new(
                        AnomalyKind::SegmentWithoutState,
                        format!(
                            "{} from the {} (flags {}) should move the {} socket, but no such state change was traced within {}",
                            w.name,
                            w.from.name(),
                            w.seg.flags,
                            side.name(),
                            crate::timeline::human_duration(window)
                        ),
                    );
                    a.side = Some(side);
                    a.ts_ns = Some(w.ts);
                    a.step = Some(wi);
                    anomalies.push(a);
                }
            }
        }
    }

    // State changes that never arrived. Events over the per-connection cap
    // are already reported (`truncated`), and may be state changes.
    if events_dropped == 0 {
        let mut peer_reset = [false; 2];
        for w in wires.iter().filter(|w| w.seg.flags.rst()) {
            peer_reset[idx(w.from)] = true;
        }
        let earlier: Vec<Earlier> = earlier
            .iter()
            .map(|l| Earlier {
                left: *l,
                side: if l.local == client {
                    Side::Client
                } else {
                    Side::Server
                },
            })
            .collect();
        state_gaps(&socks, &earlier, peer_reset, &mut anomalies);
    }

    // 4. TIME_WAIT.
    let mut time_wait: Option<TimeWait> = None;
    let tw_kernel: Vec<(Side, u64)> = ksteps
        .iter()
        .filter(|k| {
            matches!(
                (k.sc.oldstate, k.sc.newstate),
                (TcpState::FinWait2, TcpState::Close) | (TcpState::Closing, TcpState::Close)
            )
        })
        .map(|k| (k.side, k.sc.ts_ns))
        .collect();
    let traced_tw = changes.iter().any(|c| c.newstate == TcpState::TimeWait);
    if !traced_tw {
        if let Some(&(side0, ts0)) = tw_kernel.first() {
            let side = if tw_kernel.iter().any(|&(s, _)| s != side0) {
                Side::Both
            } else {
                side0
            };
            time_wait = Some(TimeWait {
                side,
                since_ts_ns: ts0,
                rel_ns: ts0.saturating_sub(first_ts),
                source: "kernel",
                expected_ns: TIMEWAIT_LEN_NS,
                detail: text![
                    "the kernel reported → CLOSE for the ",
                    side.name(),
                    " socket; a timewait socket (not traced) now holds ",
                    client,
                    " ↔ ",
                    server,
                    " for 60 s",
                ],
            });
        } else if close_complete_wire && close != Close::Reset {
            let last_fin_side = if fin_step[0] > fin_step[1] { 0 } else { 1 };
            // Crossed FINs: each side enters TIME_WAIT when its own FIN is
            // acknowledged; the later of the two ends the close.
            let last_ack = if close == Close::Simultaneous {
                fin_acked_by[0].max(fin_acked_by[1])
            } else {
                fin_acked_by[last_fin_side]
            };
            if let Some(ai) = last_ack {
                let side = if close == Close::Simultaneous {
                    Side::Both
                } else {
                    wires[ai].from
                };
                let ts = wires[ai].ts;
                time_wait = Some(TimeWait {
                    side,
                    since_ts_ns: ts,
                    rel_ns: ts.saturating_sub(first_ts),
                    source: "wire",
                    expected_ns: TIMEWAIT_LEN_NS,
                    detail: text![
                        "the ",
                        side.name(),
                        " sent the last ACK of the close; its timewait socket holds ",
                        client,
                        " ↔ ",
                        server,
                        " for 60 s",
                    ],
                });
            }
        }
    }

    // Handshake RTTs. A round trip is a segment leaving a place and its
    // answer arriving there: live, the directions say which observations
    // are one (SYN-ACK in and ACK out is the client's own turnaround, not a
    // round trip). A capture does not say where it was taken; the longer
    // gap tells: near the client SYN → SYN-ACK is the round trip and
    // SYN-ACK → ACK the client's turnaround, near the server the other way
    // round. The far side's RTT is then SYN → ACK, which exceeds it only by
    // the far side's own turnaround. Without the three segments the place
    // is unknown, and so are the RTTs.
    let mut rtt_client = None;
    let mut rtt_server = None;
    if let Some(sa) = synack_step {
        let syn = wires[..sa]
            .iter()
            .rev()
            .find(|w| w.from == Side::Client && w.class == Class::Syn);
        let handshake = handshake_ack_step.map(|ha| {
            let sa_last = wires[..ha]
                .iter()
                .rev()
                .find(|w| w.from == Side::Server && w.class == Class::SynAck)
                .unwrap_or(&wires[sa]);
            (sa_last, &wires[ha])
        });
        if live {
            rtt_client = syn.and_then(|syn| rtt(syn, &wires[sa]));
            rtt_server = handshake.and_then(|(sa_last, ack)| rtt(sa_last, ack));
        } else {
            let there = syn.and_then(|syn| wires[sa].ts.checked_sub(syn.ts));
            let back = handshake.and_then(|(sa_last, ack)| ack.ts.checked_sub(sa_last.ts));
            let whole = syn
                .zip(handshake)
                .and_then(|(syn, (_, ack))| ack.ts.checked_sub(syn.ts));
            (rtt_client, rtt_server) = match (there, back) {
                (Some(c), Some(s)) if c >= s => (Some(c), whole),
                (Some(_), Some(s)) => (whole, Some(s)),
                _ => (None, None),
            };
        }
    }
    if rtt_client.is_none() {
        rtt_client = ksteps
            .iter()
            .find(|k| {
                k.side == Side::Client
                    && k.sc.oldstate == TcpState::SynSent
                    && k.sc.newstate == TcpState::Established
            })
            .and_then(|k| k.in_state);
    }

    // Bytes each way from sequence numbers.
    let bytes = |side: Side| -> Option<u64> {
        let s = idx(side);
        let kd = key.dir(if side == Side::Client { client } else { server });
        let dr = &dropped[kd];
        if let (Some(i), Some(f)) = (isn[s], fin[s]) {
            return Some(u64::from(f.wrapping_sub(i).wrapping_sub(1)));
        }
        if let Some(i) = isn[s] {
            let mut best: Option<u32> = None;
            let ends = wires
                .iter()
                .filter(|w| {
                    w.from == side
                        && !w.seg.flags.syn()
                        && (w.seg.flags.ack() || !w.seg.flags.rst())
                })
                .map(|w| w.seg.seq.wrapping_add(w.seg.len))
                .chain(dr.end);
            for e in ends {
                let r = e.wrapping_sub(i);
                if r < 1 << 31 && best.is_none_or(|b| r > b) {
                    best = Some(r);
                }
            }
            return Some(u64::from(best.unwrap_or(1).saturating_sub(1)));
        }
        let sent: Vec<&Wire> = wires.iter().filter(|w| w.from == side).collect();
        if sent.is_empty() && dr.segments == 0 {
            return None;
        }
        Some(
            sent.iter()
                .filter(|w| !w.retrans)
                .map(|w| u64::from(w.seg.len))
                .sum::<u64>()
                + dr.bytes,
        )
    };
    let from_wire = |side: Side| if views.wire { bytes(side) } else { None };
    // A socket's own counters at → CLOSE, where traced, are 64-bit and
    // there after a reset too. A count from FIN seq − ISN is exact but for
    // whole multiples of 4 GiB, which the counters supply; any other count
    // from the wire (no FIN, no ISN) gives way to them. What a side sent is
    // what it had acknowledged, or (one byte off in some closes, see
    // `payload_counters`) what its peer received.
    let counted = |side: Side| {
        socks
            .iter()
            .filter(|s| s.side == side)
            .find_map(payload_counters)
    };
    // What `side` sent: its own acknowledged count, else what its peer received.
    let sent = |side: Side| {
        counted(side)
            .map(|(acked, _)| acked)
            .or(counted(side.peer()).map(|(_, received)| received))
    };
    let lift = |side: Side| {
        let exact_mod_4g = isn[idx(side)].is_some() && fin[idx(side)].is_some();
        match (from_wire(side), sent(side)) {
            (Some(w), Some(c)) if exact_mod_4g => {
                Some(w + (c.saturating_sub(w) + (1 << 31)) / (1 << 32) * (1 << 32))
            }
            (w, c) => c.or(w),
        }
    };
    let (bytes_client, bytes_server) = (lift(Side::Client), lift(Side::Server));

    // Open, from the client's point of view (rule in `Open`'s doc).
    let kernel_sim = changes
        .iter()
        .any(|c| c.oldstate == TcpState::SynSent && c.newstate == TcpState::SynRecv);
    let open = if simultaneous_open_wire || kernel_sim {
        Open::Simultaneous
    } else if !socks.is_empty() && socks.iter().all(|s| s.side == Side::Server) {
        Open::Passive
    } else if any_syn || changes.iter().any(|c| c.newstate == TcpState::SynSent) {
        Open::Active
    } else {
        Open::Unknown
    };

    // Assemble the steps in time order: wire, then kernel, then inferred at
    // equal times (the segment is the cause, the state change the effect).
    enum Item {
        Wire(usize),
        Kernel(usize),
        TimeWait,
    }
    let mut items: Vec<(u64, u8, usize, Item)> = Vec::with_capacity(wires.len() + ksteps.len() + 1);
    for (i, w) in wires.iter().enumerate() {
        items.push((w.ts, 0, i, Item::Wire(i)));
    }
    for (i, k) in ksteps.iter().enumerate() {
        items.push((k.sc.ts_ns, 1, i, Item::Kernel(i)));
    }
    if let Some(tw) = &time_wait {
        items.push((tw.since_ts_ns, 2, 0, Item::TimeWait));
    }
    items.sort_by_key(|&(ts, o, i, _)| (ts, o, i));

    // Every item but the data segments a run absorbs becomes a step; a
    // typical connection's few steps then never reallocate (a Step is large).
    let mut steps: Vec<Step> = Vec::with_capacity(items.len().min(32));
    let mut wire_to_step: Vec<usize> = vec![0; wires.len()];
    let mut data_run: Option<usize> = None;
    let mut cause_fixups: Vec<(usize, usize)> = Vec::new();
    for (_, _, _, item) in &items {
        match *item {
            Item::Wire(i) => {
                let w = &wires[i];
                if w.class == Class::Data && cfg.summarize_data {
                    let si = match data_run {
                        Some(si) => si,
                        None => {
                            let mut st = Step::new(w.ts, StepKind::Data, "data");
                            st.segments = Some(0);
                            st.bytes_client = Some(0);
                            st.bytes_server = Some(0);
                            st.retransmissions = Some(0);
                            steps.push(st);
                            data_run = Some(steps.len() - 1);
                            steps.len() - 1
                        }
                    };
                    let st = &mut steps[si];
                    st.end_ts_ns = Some(w.ts);
                    *st.segments.get_or_insert(0) += 1;
                    let b = if w.from == Side::Client {
                        &mut st.bytes_client
                    } else {
                        &mut st.bytes_server
                    };
                    *b.get_or_insert(0) += u64::from(w.seg.len);
                    if w.retrans {
                        *st.retransmissions.get_or_insert(0) += 1;
                    }
                    wire_to_step[i] = si;
                    continue;
                }
                data_run = None;
                wire_to_step[i] = steps.len();
                steps.push(wire_step(&mut wires[i], &isn, live, cfg.summarize_data));
            }
            Item::Kernel(k) => {
                data_run = None;
                let ks = &ksteps[k];
                let sc = ks.sc;
                let mut st = Step::new(
                    sc.ts_ns,
                    StepKind::Kernel,
                    transition_name(sc.oldstate, sc.newstate),
                );
                st.explain = if is_portless_connect_failure(sc) {
                    "connect() failed: no free local port for this destination (EADDRNOTAVAIL); no SYN was sent".into()
                } else if connect_failed.is_some() && sc.newstate == TcpState::SynSent {
                    "connect(): the socket enters SYN_SENT before the kernel picks its source port"
                        .into()
                } else {
                    kernel_explain(sc.oldstate, sc.newstate, ks.side).into()
                };
                st.side = Some(ks.side);
                st.skaddr = Some(sc.skaddr);
                st.oldstate = Some(sc.oldstate);
                st.newstate = Some(sc.newstate);
                st.in_state_ns = ks.in_state;
                st.pid = Some(sc.pid);
                st.comm = Some(sc.comm);
                st.netns = Some(sc.netns);
                if let Some(c) = ks.cause {
                    cause_fixups.push((steps.len(), c));
                }
                steps.push(st);
            }
            Item::TimeWait => {
                data_run = None;
                if let Some(tw) = &time_wait {
                    let mut st =
                        Step::new(tw.since_ts_ns, StepKind::Inferred, "TIME_WAIT (inferred)");
                    st.rule = Some("TIME_WAIT (inferred: timewait socket, not traced)".into());
                    st.explain = match tw.side {
                        Side::Both => "the client and the server each keep the 4-tuple for 2·MSL (60 s on Linux) so that late segments of this incarnation die out and a retransmitted FIN can still be ACKed",
                        Side::Client => "the client keeps the 4-tuple for 2·MSL (60 s on Linux) so that late segments of this incarnation die out and a retransmitted FIN can still be ACKed",
                        Side::Server => "the server keeps the 4-tuple for 2·MSL (60 s on Linux) so that late segments of this incarnation die out and a retransmitted FIN can still be ACKed",
                    }
                    .into();
                    st.side = Some(tw.side);
                    steps.push(st);
                }
            }
        }
    }
    for (si, wi) in cause_fixups {
        steps[si].matched_step = Some(wire_to_step[wi]);
    }
    // Data summary wording, once the runs are complete.
    for st in steps.iter_mut().filter(|s| s.kind == StepKind::Data) {
        let n = st.segments.unwrap_or(0);
        let bc = st.bytes_client.unwrap_or(0);
        let bs = st.bytes_server.unwrap_or(0);
        let rx = st.retransmissions.unwrap_or(0);
        let dur = st.end_ts_ns.unwrap_or(st.ts_ns).saturating_sub(st.ts_ns);
        let mut explain = text![
            n,
            if n == 1 {
                " segment in "
            } else {
                " segments in "
            },
            crate::timeline::human_duration(dur),
            ": ",
            bc,
            " B from the client, ",
            bs,
            " B from the server",
        ];
        if rx > 0 {
            explain += &text![", ", rx, " retransmitted"];
        }
        st.explain = explain.into();
    }
    if dropped.iter().any(|d| d.segments > 0) {
        let mut st = Step::new(
            dropped
                .iter()
                .filter(|d| d.segments > 0)
                .map(|d| d.first_ts)
                .min()
                .unwrap_or(last_ts),
            StepKind::Data,
            "data (not kept)",
        );
        let (dc, ds) = (dropped[key.dir(client)], dropped[key.dir(server)]);
        st.segments = Some(dc.segments + ds.segments);
        st.bytes_client = Some(dc.bytes);
        st.bytes_server = Some(ds.bytes);
        st.end_ts_ns = Some(dc.last_ts.max(ds.last_ts));
        st.explain = "data segments over the per-connection cap: counted, not kept".into();
        let pos = steps.partition_point(|s| s.ts_ns <= st.ts_ns);
        steps.insert(pos, st);
        // Indices after `pos` moved by one.
        for s in steps.iter_mut() {
            if let Some(c) = s.matched_step.as_mut() {
                if *c >= pos {
                    *c += 1;
                }
            }
        }
        for w in wire_to_step.iter_mut() {
            if *w >= pos {
                *w += 1;
            }
        }
    }
    for st in &mut steps {
        st.rel_ns = st.ts_ns.saturating_sub(first_ts);
    }
    for a in &mut anomalies {
        if let Some(wi) = a.step {
            a.step = wire_to_step.get(wi).copied();
        }
    }

    // Per-socket time in each state.
    let states: Vec<SocketStates> = socks
        .iter()
        .map(|s| {
            let who = s
                .changes
                .iter()
                .find(|c| c.pid != 0)
                .unwrap_or(&s.changes[0]);
            let mut spans: Vec<StateSpan> = Vec::with_capacity(s.changes.len() + 1);
            let mut prev_ts: Option<u64> = None;
            for (n, c) in s.changes.iter().enumerate() {
                let ns = if c.prev_state_ns > 0 {
                    Some(c.prev_state_ns)
                } else {
                    prev_ts.map(|t| c.ts_ns.saturating_sub(t))
                };
                prev_ts = Some(c.ts_ns);
                // The CLOSE a new socket starts in and the listener's LISTEN
                // a child is cloned from are not this connection's time.
                let birth = n == 0 && matches!(c.oldstate, TcpState::Close | TcpState::Listen);
                if !birth {
                    spans.push(StateSpan {
                        state: c.oldstate,
                        ns,
                    });
                }
            }
            if let Some(c) = s.changes.last() {
                spans.push(StateSpan {
                    state: c.newstate,
                    ns: None,
                });
            }
            SocketStates {
                skaddr: s.skaddr,
                side: s.side,
                pid: who.pid,
                comm: who.comm,
                netns: who.netns,
                states: spans,
            }
        })
        .collect();

    let retransmissions = wires.iter().filter(|w| w.retrans).count() as u64;
    Connection {
        record_type: "connection",
        client,
        server,
        family: Family::of(&client.ip()),
        netns: (key.netns != 0).then_some(key.netns),
        isn_client: isn_c,
        isn_server: isn_s,
        handshake_rtt_ns: rtt_client,
        handshake_rtt_server_ns: rtt_server,
        bytes_client,
        bytes_server,
        open,
        close,
        closed_by,
        first_ts_ns: first_ts,
        last_ts_ns: last_ts,
        duration_ns: last_ts.saturating_sub(first_ts),
        end_reason,
        segments: wires.len() as u64 + dropped.iter().map(|d| d.segments).sum::<u64>(),
        retransmissions,
        views,
        steps,
        anomalies,
        states,
        time_wait,
    }
}

fn end_reason_text(r: EndReason) -> &'static str {
    match r {
        EndReason::Closed => "closed",
        EndReason::Superseded => "a new connection reused the 4-tuple",
        EndReason::IdleTimeout => "idle timeout",
        EndReason::Evicted => "evicted: too many connections",
        EndReason::EndOfInput => "end of input",
    }
}

/// The client is whoever sent the first SYN; without one, the kernel's
/// SYN_SENT socket, the receiver of a SYN-ACK, or finally the ephemeral
/// (higher) port.
fn pick_client(key: &Key, segs: &[&Segment], socks: &[Sock]) -> (SocketAddr, SocketAddr) {
    let other = |c: SocketAddr| if c == key.a { key.b } else { key.a };
    if let Some(s) = segs.iter().find(|s| s.flags.syn() && !s.flags.ack()) {
        let c = SocketAddr::new(s.saddr, s.sport);
        return (c, other(c));
    }
    for s in socks {
        if s.changes
            .iter()
            .any(|c| c.oldstate == TcpState::SynSent || c.newstate == TcpState::SynSent)
        {
            if let Some(l) = s.local {
                return (l, other(l));
            }
        }
    }
    for s in socks {
        if s.changes.iter().any(|c| {
            matches!(c.oldstate, TcpState::SynRecv | TcpState::Listen)
                || c.newstate == TcpState::SynRecv
        }) {
            if let Some(r) = s.remote {
                return (r, other(r));
            }
        }
    }
    if let Some(s) = segs.iter().find(|s| s.flags.syn() && s.flags.ack()) {
        let c = SocketAddr::new(s.daddr, s.dport);
        return (c, other(c));
    }
    if key.a.port() >= key.b.port() {
        (key.a, key.b)
    } else {
        (key.b, key.a)
    }
}

/// The traced state of `side`'s socket just before `ts` (the state it
/// left if the change at `ts` is its death: an abort goes to CLOSE first).
fn state_at(socks: &[Sock], side: Side, ts: u64) -> Option<TcpState> {
    let mut st = None;
    for s in socks.iter().filter(|s| s.side == side) {
        for c in s.changes.iter().filter(|c| c.ts_ns <= ts) {
            st = Some(if c.newstate == TcpState::Close {
                c.oldstate
            } else {
                c.newstate
            });
        }
    }
    st
}

/// The state RFC 9293 puts `side` in, from the segments seen so far.
fn wire_state(
    side: Side,
    handshake_done: bool,
    fin: &[Option<u32>; 2],
    acked_by: &[Option<usize>; 2],
    first_closer: Option<Side>,
) -> &'static str {
    let s = idx(side);
    let p = 1 - s;
    if !handshake_done {
        return if side == Side::Client {
            "SYN_SENT"
        } else {
            "SYN_RECV"
        };
    }
    match (fin[s].is_some(), fin[p].is_some()) {
        (false, false) => "ESTABLISHED",
        (false, true) => "CLOSE_WAIT",
        (true, false) if acked_by[s].is_some() => "FIN_WAIT2",
        (true, false) => "FIN_WAIT1",
        (true, true) if first_closer == Some(side) => {
            if acked_by[s].is_some() {
                "TIME_WAIT"
            } else {
                "CLOSING"
            }
        }
        (true, true) => "LAST_ACK",
    }
}

/// Close from the kernel's view alone (no FIN or RST on the wire).
fn kernel_close(socks: &[Sock]) -> Option<(Close, Option<Side>)> {
    use TcpState::{CloseWait, Closing, Established, FinWait1, FinWait2, LastAck, SynRecv};
    let all = || {
        socks
            .iter()
            .flat_map(|s| s.changes.iter().map(move |c| (s.side, *c)))
    };
    if all().any(|(_, c)| c.newstate == Closing) {
        return Some((Close::Simultaneous, Some(Side::Both)));
    }
    if all().any(|(_, c)| {
        c.newstate == TcpState::Close
            && matches!(c.oldstate, Established | CloseWait | SynRecv | FinWait1)
    }) {
        return Some((Close::Reset, None));
    }
    let fw1 = all().find(|(_, c)| c.newstate == FinWait1);
    let cw = all().find(|(_, c)| c.newstate == CloseWait);
    let closer = fw1.map(|(s, _)| s).or_else(|| cw.map(|(s, _)| s.peer()))?;
    let complete = all().any(|(_, c)| {
        matches!(
            (c.oldstate, c.newstate),
            (FinWait2, TcpState::Close) | (LastAck, TcpState::Close)
        )
    });
    if !complete {
        return Some((Close::Unfinished, Some(closer)));
    }
    // With both sockets traced (one clock), the order tells: the peer's FIN
    // left (→ LAST_ACK) before the closer saw the ACK (FIN_WAIT1 →
    // FIN_WAIT2) only when the FIN carried that ACK.
    let to_fw2 = all().find(|(s, c)| *s == closer && c.newstate == FinWait2);
    let to_la = all().find(|(s, c)| *s == closer.peer() && c.newstate == LastAck);
    let kind = match (to_fw2, to_la) {
        (Some((_, a)), Some((_, b))) if b.ts_ns <= a.ts_ns => Close::ThreeSegment,
        _ => Close::FourSegment,
    };
    Some((kind, Some(closer)))
}

/// Payload bytes a socket had acknowledged and received, from its counters
/// at → CLOSE. The kernel counts sequence space: an active opener's SYN
/// (acknowledged once it leaves SYN_SENT; a passive child's SYN-ACK was
/// acknowledged before the child existed) and each FIN are a byte. The
/// socket's path says whether its own FIN was acknowledged: FIN_WAIT2
/// reached, or CLOSING / LAST_ACK left for CLOSE (but for a reset there).
/// Whether the peer's FIN arrived it says less well: CLOSE_WAIT or CLOSING
/// reached, or FIN_WAIT2 left for CLOSE, which is also where a socket
/// closed by its process goes once its own FIN is acknowledged, before the
/// peer's FIN: then the received count is one byte short. The sender's
/// count is taken first for that reason, and the wire's, where watched.
fn payload_counters(sock: &Sock) -> Option<(u64, u64)> {
    use TcpState::*;
    let close = sock
        .changes
        .iter()
        .rev()
        .find(|c| c.bytes_acked.is_some())?;
    let (acked, received) = close.bytes_acked.zip(close.bytes_received)?;
    let reached = |st: TcpState| sock.changes.iter().any(|c| c.newstate == st);
    // Both ends of a simultaneous open sent a SYN; a socket first seen
    // later is taken for the opener it usually is, the client.
    let opened = reached(SynSent) || (sock.side == Side::Client && !reached(SynRecv));
    let syn_acked = opened && close.oldstate != SynSent;
    let fin_acked = reached(FinWait2) || matches!(close.oldstate, Closing | LastAck);
    let fin_received = reached(CloseWait) || reached(Closing) || close.oldstate == FinWait2;
    Some((
        acked.saturating_sub(u64::from(syn_acked) + u64::from(fin_acked)),
        received.saturating_sub(u64::from(fin_received)),
    ))
}

/// A traced socket state that only a segment from the peer ends, the peer's
/// transition that proves this socket acknowledged that segment, and what
/// the segment was. A socket acknowledges a SYN-ACK or a FIN only on taking
/// it, which moves it out of that state (the ACK may leave before the move
/// is traced: FIN_WAIT2 sends it, then hands over to a timewait socket).
///
/// A SYN_SENT socket is judged only when it had its port before connect()
/// (bound first): otherwise its CLOSE → SYN_SENT joins a record only with a
/// later change.
const PEER_PROVES_MOVED: [(TcpState, TcpState, TcpState, &str); 4] = {
    use TcpState::*;
    [
        (SynSent, SynRecv, Established, "SYN-ACK"),
        (Established, FinWait1, FinWait2, "FIN"),
        (FinWait1, LastAck, Close, "FIN"),
        (FinWait2, LastAck, Close, "FIN"),
    ]
};

/// Linux's TCP_RTO_MIN: by default no retransmission timer fires sooner.
const MIN_RTO_NS: u64 = 200_000_000;

/// A socket an earlier record of this 4-tuple left open, and its side here.
struct Earlier {
    left: LeftOpen,
    side: Side,
}

/// Holes in what the kernel told of a socket (`state_gap`): state changes
/// lost to a full ring, or skipped by the kernel (which counts only part of
/// its skips). A socket's traced changes chain, each leaving the state the
/// last one entered (across records too: `earlier` has where the sockets an
/// earlier record left open stood); and a peer's transition can prove a
/// socket moved on from where it was last traced. `peer_reset[side]`: the
/// wire showed that side send an RST, which also ends the other's LAST_ACK.
fn state_gaps(
    socks: &[Sock],
    earlier: &[Earlier],
    peer_reset: [bool; 2],
    anomalies: &mut Vec<Anomaly>,
) {
    // (skaddr, side, where it stood before this record's changes, changes)
    let mut all: Vec<(u64, Side, Option<&LeftOpen>, &[&StateChange])> = socks
        .iter()
        .map(|s| {
            let before = earlier.iter().find(|e| e.left.skaddr == s.skaddr);
            (s.skaddr, s.side, before.map(|e| &e.left), &s.changes[..])
        })
        .collect();
    for e in earlier {
        if !socks.iter().any(|s| s.skaddr == e.left.skaddr) {
            all.push((e.left.skaddr, e.side, Some(&e.left), &[]));
        }
    }
    for &(skaddr, side, before, changes) in &all {
        let name = side.name();
        // (old, new) of the change before, where it came from, then each.
        let mut prev: Option<(TcpState, TcpState, bool)> = before.map(|b| (b.state, b.state, true));
        for sc in changes {
            if let Some((old, new, in_earlier)) = prev {
                // After → CLOSE the address is the next socket's. A child's
                // first change leaves LISTEN and a connect()'s leaves CLOSE:
                // also the next socket's, on purpose, though a freed address
                // always follows a → CLOSE (a lost one is not reported there).
                let next_socket = new == TcpState::Close
                    || sc.oldstate == TcpState::Listen
                    || (sc.oldstate, sc.newstate) == (TcpState::Close, TcpState::SynSent);
                if !next_socket && sc.oldstate != new {
                    let before = if in_earlier {
                        format!("was last traced entering {new} (in an earlier record of this connection)")
                    } else {
                        format!("went {old} → {new}")
                    };
                    let mut a = Anomaly::new(
                        AnomalyKind::StateGap,
                        format!(
                            "{name} socket {skaddr:#x} {before}, then {} → {}: how it left {new} did not reach tcptrace (lost, or skipped by the kernel)",
                            sc.oldstate, sc.newstate
                        ),
                    );
                    a.side = Some(side);
                    a.state = Some(format!("{new} … {}", sc.oldstate));
                    a.ts_ns = Some(sc.ts_ns);
                    anomalies.push(a);
                }
            }
            prev = Some((sc.oldstate, sc.newstate, false));
        }
        let Some((last_state, last_ts, in_earlier)) = changes
            .last()
            .map(|c| (c.newstate, c.ts_ns, false))
            .or(before.map(|b| (b.state, b.ts, true)))
        else {
            continue;
        };
        let peer = side.peer();
        let proof = all
            .iter()
            .filter(|p| p.1 == peer)
            .flat_map(|&(_, _, before, changes)| {
                changes.iter().enumerate().map(move |(i, &c)| {
                    // The kernel's own measure when there is one: it holds
                    // even when the change into LAST_ACK was lost.
                    let since = match i {
                        0 => before.map(|b| b.ts),
                        _ => Some(changes[i - 1].ts_ns),
                    };
                    let in_state = if c.prev_state_ns > 0 {
                        Some(c.prev_state_ns)
                    } else {
                        since.map(|t| c.ts_ns.saturating_sub(t))
                    };
                    (c, in_state)
                })
            })
            .filter(|&(c, _)| c.ts_ns > last_ts)
            .find_map(|(c, in_state)| {
                // LAST_ACK also ends by giving up on retransmitting the FIN
                // (not within the minimum RTO), and on an RST.
                let acked = c.oldstate != TcpState::LastAck
                    || (in_state.is_some_and(|ns| ns < MIN_RTO_NS)
                        && !peer_reset[idx(peer)]
                        && !peer_reset[idx(side)]);
                PEER_PROVES_MOVED
                    .iter()
                    .find(|r| (r.0, r.1, r.2) == (last_state, c.oldstate, c.newstate))
                    .filter(|_| acked)
                    .map(|r| (c, r.3))
            });
        if let Some((c, what)) = proof {
            let seen = if in_earlier {
                " (in an earlier record of this connection)"
            } else {
                ""
            };
            let mut a = Anomaly::new(
                AnomalyKind::StateGap,
                format!(
                    "{name} socket {skaddr:#x} was last traced entering {last_state}{seen}, but the {peer}'s {} → {} means the {name} acknowledged the {peer}'s {what}, and taking it moved the {name} out of {last_state}: its later state changes did not reach tcptrace (lost, or skipped by the kernel)",
                    c.oldstate,
                    c.newstate,
                    peer = peer.name(),
                ),
            );
            a.side = Some(side);
            a.state = Some(format!("{last_state} … ?"));
            a.ts_ns = Some(c.ts_ns);
            anomalies.push(a);
        }
    }
}

/// SYN_SENT → CLOSE before the kernel chose a source port: the port search
/// of connect() found none free for the destination.
fn is_portless_connect_failure(c: &StateChange) -> bool {
    c.oldstate == TcpState::SynSent && c.newstate == TcpState::Close && c.sport == 0
}

/// The loopback device's index, the same in every network namespace.
const LOOPBACK_IFINDEX: u32 = 1;

/// From `a` leaving a place to `b` arriving at the same place, live: the
/// round trip there; the shortest where several places saw both. On
/// loopback (ifindex 1 in every namespace) only egress is watched, and a
/// segment arrives as it leaves.
fn rtt(a: &Wire, b: &Wire) -> Option<u64> {
    let mut best: Option<u64> = None;
    for oa in a.obs.iter().filter(|o| o.dir == Dir::Egress) {
        for ob in b.obs.iter() {
            let arrives = ob.dir == Dir::Ingress || ob.ifindex == LOOPBACK_IFINDEX;
            if !arrives || oa.netns != ob.netns || oa.ifindex != ob.ifindex || ob.ts_ns < oa.ts_ns {
                continue;
            }
            let v = ob.ts_ns - oa.ts_ns;
            best = Some(best.map_or(v, |b| b.min(v)));
        }
    }
    best
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Who {
    Sent,
    Received,
    Either,
}

/// Six roles: `explained` keeps one bit per side and role.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Pred {
    Syn,
    SynAck,
    /// Acknowledges the socket's SYN (third ACK, or SYN-ACK when simultaneous).
    AckOfSyn,
    Fin,
    /// Acknowledges the socket's FIN.
    AckOfFin,
    Rst,
}

/// Which segment moves a socket from `old` to `new` (RFC 9293 §3.3.2 and
/// Linux specifics), and whether one must exist: SYN_SENT → CLOSE can be a
/// timeout, and orphaned FIN_WAIT2 sockets go to a timewait socket when the
/// ACK of their FIN arrives.
fn transition_rules(old: TcpState, new: TcpState) -> (&'static [(Who, Pred)], bool) {
    use TcpState::*;
    use Who::*;
    match (old, new) {
        (Close, SynSent) => (&[(Sent, Pred::Syn)], true),
        (SynSent, Established) => (&[(Received, Pred::SynAck)], true),
        (SynSent, SynRecv) => (&[(Received, Pred::Syn)], true),
        (SynRecv, Established) | (Listen, SynRecv) | (NewSynRecv, SynRecv) => {
            (&[(Received, Pred::AckOfSyn)], true)
        }
        (Established, FinWait1) | (CloseWait, LastAck) | (SynRecv, FinWait1) => {
            (&[(Sent, Pred::Fin)], true)
        }
        (FinWait1, FinWait2) | (Closing, Close) => (&[(Received, Pred::AckOfFin)], true),
        (LastAck, Close) => (&[(Received, Pred::AckOfFin), (Either, Pred::Rst)], true),
        (Established, CloseWait) | (FinWait1, Closing) => (&[(Received, Pred::Fin)], true),
        (FinWait2, Close) => (
            &[
                (Received, Pred::Fin),
                (Received, Pred::AckOfFin),
                (Either, Pred::Rst),
            ],
            true,
        ),
        (SynSent, Close) => (&[(Either, Pred::Rst)], false),
        (Established | CloseWait | SynRecv | FinWait1, Close) => (&[(Either, Pred::Rst)], true),
        _ => (&[], false),
    }
}

fn pred_text(who: Who, pred: Pred, side: Side) -> String {
    let p = match pred {
        Pred::Syn => "SYN",
        Pred::SynAck => "SYN-ACK",
        Pred::AckOfSyn => "ACK of its SYN",
        Pred::Fin => "FIN",
        Pred::AckOfFin => "ACK of its FIN",
        Pred::Rst => "RST",
    };
    match who {
        Who::Sent => text![p, " from the ", side.name()],
        Who::Received => text![p, " from the ", side.peer().name()],
        Who::Either => p.to_string(),
    }
}

struct MatchCtx<'a, 'b> {
    wires: &'b [Wire<'a>],
    isn: [Option<u32>; 2],
    fin: [Option<u32>; 2],
    window: u64,
}

impl MatchCtx<'_, '_> {
    fn matches(&self, w: &Wire, side: Side, who: Who, pred: Pred, ts: u64) -> bool {
        let _ = self.wires;
        let from_ok = match who {
            Who::Sent => w.from == side,
            Who::Received => w.from == side.peer(),
            Who::Either => true,
        };
        if !from_ok || !w.within(ts, self.window) {
            return false;
        }
        let f = w.seg.flags;
        let s = idx(side);
        match pred {
            Pred::Syn => f.syn() && !f.ack(),
            Pred::SynAck => f.syn() && f.ack() && w.class == Class::SynAck,
            // The third ACK (or, when it was lost, the first data carrying
            // it; the SYN-ACK in a simultaneous open) — not any later
            // segment that merely still acknowledges y+1.
            Pred::AckOfSyn => {
                matches!(w.class, Class::HandshakeAck | Class::SynAck | Class::Data)
                    && f.ack()
                    && self.isn[s].map(|i| i.wrapping_add(1)) == Some(w.seg.ack)
            }
            Pred::Fin => f.fin(),
            Pred::AckOfFin => {
                f.ack()
                    && !f.rst()
                    && self.fin[s].is_some_and(|x| seq_ge(w.seg.ack, x.wrapping_add(1)))
            }
            Pred::Rst => f.rst(),
        }
    }
}

/// The step of one wire segment; takes the texts and observations out of
/// `w`, which is not shown again.
fn wire_step(w: &mut Wire, isn: &[Option<u32>; 2], live: bool, summarize: bool) -> Step {
    let seg = w.seg;
    let mut st = Step::new(w.ts, StepKind::Wire, std::mem::take(&mut w.name));
    st.rule = w.rule.take();
    st.explain = std::mem::take(&mut w.explain);
    if !summarize && w.class == Class::Data && w.retrans {
        st.explain = "retransmission".into();
    }
    st.from = Some(w.from);
    st.flags = Some(seg.flags);
    st.seq = Some(seg.seq);
    st.rel_seq = isn[idx(w.from)].map(|i| seg.seq.wrapping_sub(i));
    if seg.flags.ack() {
        st.ack = Some(seg.ack);
        st.rel_ack = isn[idx(w.from.peer())].map(|i| seg.ack.wrapping_sub(i));
    }
    st.len = Some(seg.len);
    st.win = Some(seg.win);
    if !seg.options.is_empty() {
        st.options = Some(seg.options);
    }
    st.retransmission = w.retrans;
    if live {
        st.observations = w.obs.take();
    }
    st
}

/// A kernel step's name, `OLD → NEW`. Every connection has several, so the
/// names of the known pairs are formatted once per process and borrowed.
fn transition_name(old: TcpState, new: TcpState) -> Cow<'static, str> {
    static NAMES: std::sync::OnceLock<Vec<String>> = std::sync::OnceLock::new();
    let pos = |s: TcpState| TcpState::KNOWN.iter().position(|&k| k == s);
    let (Some(o), Some(n)) = (pos(old), pos(new)) else {
        return format!("{old} → {new}").into();
    };
    let names = NAMES.get_or_init(|| {
        TcpState::KNOWN
            .iter()
            .flat_map(|o| TcpState::KNOWN.iter().map(move |n| format!("{o} → {n}")))
            .collect()
    });
    Cow::Borrowed(&names[o * TcpState::KNOWN.len() + n])
}

/// What a transition means, in one line.
fn kernel_explain(old: TcpState, new: TcpState, side: Side) -> &'static str {
    use TcpState::*;
    let _ = side;
    match (old, new) {
        (Close, SynSent) => "connect(): the SYN is about to leave",
        (SynSent, Established) => "SYN-ACK received and ACKed: connect() returns",
        (SynSent, SynRecv) => "a SYN arrived while ours was out: simultaneous open",
        (Listen, SynRecv) | (NewSynRecv, SynRecv) => {
            "the handshake's ACK arrived: the listener creates the child socket"
        }
        (SynRecv, Established) => "the child socket is established and queued for accept()",
        (Established, FinWait1) => "close()/shutdown(SHUT_WR): our FIN is sent",
        (FinWait1, FinWait2) => "our FIN is acknowledged; waiting for the peer's FIN",
        (FinWait1, Closing) => "the peer's FIN crossed ours: simultaneous close",
        (Established, CloseWait) => "the peer's FIN arrived: read() returns 0, we may still send",
        (CloseWait, LastAck) => "close(): our FIN is sent, waiting for its ACK",
        (LastAck, Close) => "our FIN is acknowledged: the socket is gone",
        (FinWait2, Close) => "handed over to a timewait socket (TIME_WAIT is not traced)",
        (Closing, Close) => "our FIN is acknowledged: handed over to a timewait socket",
        (SynSent, Close) => "connect() failed: refused (RST) or timed out",
        (Established | CloseWait | FinWait1 | SynRecv, Close) => {
            "aborted: RST sent or received, the socket is gone"
        }
        _ => "",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transition_names_read_as_formatted() {
        let states = TcpState::KNOWN
            .iter()
            .copied()
            .chain([TcpState::Unknown(99)]);
        for old in states.clone() {
            for new in states.clone() {
                assert_eq!(transition_name(old, new), format!("{old} → {new}"));
            }
        }
    }
}
