//! Live-style tests: kernel state changes plus segments seen at two vantage
//! points (client namespace egress, server namespace ingress and back), as
//! the tracer produces them; then memory bounds and robustness.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use super::*;
use crate::event::{Comm, Dir, Family, Segment, StateChange, TcpFlags as F, TcpOptions};
use crate::timeline;

const NS_C: u32 = 4026531840;
const NS_S: u32 = 4026532500;
const IF_C: u32 = 5;
const IF_S: u32 = 7;
const SK_C: u64 = 0xffff_8880_0000_1000;
const SK_S: u64 = 0xffff_8880_0000_2000;
/// Wire delay between the two vantage points.
const HOP_NS: u64 = 20_000;
const CPORT: u16 = 40000;

fn cip() -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(10, 1, 0, 1))
}
fn sip() -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(10, 2, 0, 1))
}

fn us(v: u64) -> u64 {
    1_000_000_000 + v * 1000
}

/// One segment, seen leaving the sender's namespace and entering the peer's.
fn seg(t_us: u64, from_client: bool, flags: u8, seq: u32, ack: u32, len: u32) -> Vec<Event> {
    let (saddr, sport, daddr, dport) = if from_client {
        (cip(), CPORT, sip(), 80)
    } else {
        (sip(), 80, cip(), CPORT)
    };
    let (out_ns, out_if, in_ns, in_if) = if from_client {
        (NS_C, IF_C, NS_S, IF_S)
    } else {
        (NS_S, IF_S, NS_C, IF_C)
    };
    let mk = |ts_ns, netns, ifindex, dir| {
        Event::Segment(Segment {
            ts_ns,
            ifindex,
            iface: Some(format!("veth{ifindex}").into()),
            dir,
            family: Family::Ipv4,
            saddr,
            sport,
            daddr,
            dport,
            flags: F(flags),
            seq,
            ack,
            win: 502,
            len,
            options: TcpOptions::default(),
            netns,
        })
    };
    vec![
        mk(us(t_us), out_ns, out_if, Dir::Egress),
        mk(us(t_us) + HOP_NS, in_ns, in_if, Dir::Ingress),
    ]
}

fn state(t_us: u64, client: bool, old: TcpState, new: TcpState, prev_ns: u64) -> Event {
    let (skaddr, netns, pid, comm) = if client {
        (SK_C, NS_C, 100, "curl")
    } else {
        (SK_S, NS_S, 0, "swapper/1")
    };
    let (mut saddr, mut sport, mut daddr, mut dport) = if client {
        (cip(), CPORT, sip(), 80)
    } else {
        (sip(), 80, cip(), CPORT)
    };
    // What the tracepoint really reports before the tuple is complete.
    if client && old == TcpState::Close && new == TcpState::SynSent {
        sport = 0;
    }
    if !client && old == TcpState::Listen {
        saddr = IpAddr::V4(Ipv4Addr::UNSPECIFIED);
        daddr = IpAddr::V4(Ipv4Addr::UNSPECIFIED);
        dport = 0;
        sport = 80;
    }
    Event::State(StateChange {
        ts_ns: us(t_us),
        skaddr,
        pid,
        comm: comm.into(),
        family: Family::Ipv4,
        saddr,
        sport,
        daddr,
        dport,
        oldstate: old,
        newstate: new,
        prev_state_ns: prev_ns,
        netns,
        bytes_acked: None,
        bytes_received: None,
    })
}

/// curl in one namespace fetches 100 bytes from a server in another; the
/// client closes first (four-segment close). ISNs 1000 and 5000.
fn full_conversation() -> Vec<Event> {
    use TcpState::*;
    let (a, s) = (F::ACK, F::SYN);
    let mut ev = Vec::new();
    ev.push(state(0, true, Close, SynSent, 0));
    ev.extend(seg(10, true, s, 1000, 0, 0));
    ev.extend(seg(50, false, s | a, 5000, 1001, 0));
    ev.push(state(72, true, SynSent, Established, 72_000));
    ev.extend(seg(75, true, a, 1001, 5001, 0));
    ev.push(state(96, false, Listen, SynRecv, 0));
    ev.push(state(97, false, SynRecv, Established, 0));
    ev.extend(seg(200, true, F::PSH | a, 1001, 5001, 100));
    ev.extend(seg(300, false, a, 5001, 1101, 0));
    ev.push(state(995, true, Established, FinWait1, 0));
    ev.extend(seg(1000, true, F::FIN | a, 1101, 5001, 0));
    ev.push(state(1021, false, Established, CloseWait, 0));
    ev.extend(seg(1030, false, a, 5001, 1102, 0));
    ev.push(state(1051, true, FinWait1, FinWait2, 0));
    ev.push(state(1100, false, CloseWait, LastAck, 0));
    ev.extend(seg(1101, false, F::FIN | a, 5001, 1102, 0));
    ev.push(state(1122, true, FinWait2, Close, 0));
    ev.extend(seg(1123, true, a, 1102, 5002, 0));
    ev.push(state(1144, false, LastAck, Close, 0));
    ev
}

fn run(events: &[Event]) -> (Vec<Connection>, MatcherStats) {
    let mut m = Matcher::new(MatcherConfig::default());
    let mut out = Vec::new();
    for e in events {
        out.extend(m.push(e.clone()));
    }
    out.extend(m.finish());
    (out, m.stats())
}

fn spans(c: &Connection, side: Side) -> Vec<(TcpState, Option<u64>)> {
    c.states
        .iter()
        .find(|s| s.side == side)
        .map(|s| s.states.iter().map(|sp| (sp.state, sp.ns)).collect())
        .unwrap_or_default()
}

#[test]
fn live_two_vantage_points_merge_into_one_wire_step() {
    let (conns, stats) = run(&full_conversation());
    assert_eq!(conns.len(), 1, "{conns:#?}");
    let c = &conns[0];
    let text = timeline::to_string(c);
    assert_eq!(stats.unresolved_state_events, 0);
    assert_eq!(
        c.views,
        Views {
            wire: true,
            kernel: true,
            live: true
        }
    );
    assert_eq!(c.client.to_string(), "10.1.0.1:40000");
    assert_eq!(c.segments, 9, "each segment once, not twice:\n{text}");
    assert_eq!(c.retransmissions, 0);
    for st in c.steps_of(StepKind::Wire) {
        let where_: Vec<(u32, u32, Dir)> = st
            .observations
            .iter()
            .map(|o| (o.netns, o.ifindex, o.dir))
            .collect();
        let want = if st.from == Some(Side::Client) {
            [(NS_C, IF_C, Dir::Egress), (NS_S, IF_S, Dir::Ingress)]
        } else {
            [(NS_S, IF_S, Dir::Egress), (NS_C, IF_C, Dir::Ingress)]
        };
        assert_eq!(where_, want, "{}", st.name);
        assert_eq!(st.observations[1].ts_ns - st.observations[0].ts_ns, HOP_NS);
    }
    assert_eq!(c.open, Open::Active);
    assert_eq!(c.close, super::Close::FourSegment);
    assert_eq!(c.closed_by, Some(Side::Client));
    assert_eq!((c.bytes_client, c.bytes_server), (Some(100), Some(0)));
    // SYN out at 10 µs, SYN-ACK in at 70 µs, both on the client's veth.
    assert_eq!(c.handshake_rtt_ns, Some(60_000));
    // SYN-ACK out at 50 µs, ACK in at 95 µs on the server's veth.
    assert_eq!(c.handshake_rtt_server_ns, Some(45_000));
    assert!(c.anomalies.is_empty(), "{:?}\n{text}", c.anomalies);
    assert!(
        text.contains("egress netns 4026531840 if 5 (veth5)"),
        "{text}"
    );
}

/// The kernel hands a closed socket's memory to the next socket: the next
/// connect() and the next accepted child come back with the addresses of the
/// previous ones while the previous record still lingers for stragglers. The
/// child's first event (LISTEN → SYN_RECV) carries only the listener's
/// address, so the socket address alone must not attach it to the old record.
#[test]
fn recycled_socket_addresses_start_new_connections() {
    let mut ev = full_conversation();
    let second = full_conversation().into_iter().map(|e| match e {
        Event::State(mut sc) => {
            sc.ts_ns += 2_000_000;
            for p in [&mut sc.sport, &mut sc.dport] {
                if *p == CPORT {
                    *p = CPORT + 1;
                }
            }
            Event::State(sc)
        }
        Event::Segment(mut s) => {
            s.ts_ns += 2_000_000;
            for p in [&mut s.sport, &mut s.dport] {
                if *p == CPORT {
                    *p = CPORT + 1;
                }
            }
            Event::Segment(s)
        }
    });
    ev.extend(second);
    let (conns, stats) = run(&ev);
    assert_eq!(conns.len(), 2, "{conns:#?}");
    assert_eq!(stats.unresolved_state_events, 0);
    for (c, port) in conns.iter().zip([CPORT, CPORT + 1]) {
        let text = timeline::to_string(c);
        assert_eq!(c.client.port(), port);
        let sides: Vec<Side> = c.states.iter().map(|s| s.side).collect();
        assert_eq!(sides, [Side::Client, Side::Server], "{text}");
        assert_eq!(
            spans(c, Side::Server).first().map(|s| s.0),
            Some(TcpState::SynRecv),
            "{text}"
        );
        assert_eq!(c.close, Close::FourSegment, "{text}");
        assert!(c.anomalies.is_empty(), "{:?}\n{text}", c.anomalies);
    }
}

/// A connect() that fails before the kernel chooses a source port
/// (EADDRNOTAVAIL): CLOSE → SYN_SENT → CLOSE, both with sport 0. It is a
/// connection record of its own, told as it fails (`connect_failed`), and
/// the next connection at the same socket address does not inherit it.
#[test]
fn a_connect_failing_before_its_port_is_a_record_of_its_own() {
    use TcpState::*;
    let mut failed = state(5, true, SynSent, Close, 0);
    if let Event::State(sc) = &mut failed {
        sc.sport = 0;
    }
    let mut m = Matcher::new(MatcherConfig::default());
    assert!(m.push(state(0, true, Close, SynSent, 0)).is_empty());
    let told = m.push(failed);
    assert_eq!(told.len(), 1, "told at once: {told:#?}");
    let f = &told[0];
    let text = timeline::to_string(f);
    assert_eq!(f.client.port(), 0, "{text}");
    assert_eq!(f.server, SocketAddr::new(sip(), 80), "{text}");
    assert_eq!(f.close, super::model::Close::Unfinished, "{text}");
    let kinds: Vec<AnomalyKind> = f.anomalies.iter().map(|a| a.kind).collect();
    assert_eq!(kinds, [AnomalyKind::ConnectFailed], "{text}");
    assert!(text.contains("no free local port"), "{text}");
    assert!(
        text.contains("before the kernel picks its source port"),
        "{text}"
    );

    let mut ev = Vec::new();
    ev.extend(full_conversation().into_iter().map(|mut e| {
        if let Event::State(sc) = &mut e {
            sc.ts_ns += 1_000_000;
        }
        if let Event::Segment(s) = &mut e {
            s.ts_ns += 1_000_000;
        }
        e
    }));
    let mut conns = Vec::new();
    for e in ev {
        conns.extend(m.push(e));
    }
    conns.extend(m.finish());
    assert_eq!(conns.len(), 1, "{conns:#?}");
    assert_eq!(m.stats().unresolved_state_events, 0);
    let c = &conns[0];
    let text = timeline::to_string(c);
    assert_eq!(
        spans(c, Side::Client).first().map(|s| s.0),
        Some(SynSent),
        "{text}"
    );
    let client_changes = c
        .steps
        .iter()
        .filter(|s| s.kind == StepKind::Kernel && s.side == Some(Side::Client))
        .count();
    assert_eq!(client_changes, 5, "{text}");
    assert!(c.anomalies.is_empty(), "{:?}\n{text}", c.anomalies);
}

/// A failed connect's record is told at once: with the table full it
/// pushes no live connection out.
#[test]
fn a_failed_connect_evicts_nothing() {
    use TcpState::*;
    let mut m = Matcher::new(MatcherConfig {
        max_connections: 1,
        ..MatcherConfig::default()
    });
    // One live connection fills the table.
    for e in full_conversation().into_iter().take(4) {
        assert!(m.push(e).is_empty());
    }
    let mut open = state(200, true, Close, SynSent, 0);
    let mut failed = state(205, true, SynSent, Close, 0);
    for e in [&mut open, &mut failed] {
        if let Event::State(sc) = e {
            sc.skaddr = 0xffff_8880_0000_9000;
            sc.sport = 0;
        }
    }
    assert!(m.push(open).is_empty());
    let told = m.push(failed);
    assert_eq!(told.len(), 1, "{told:#?}");
    assert!(told[0].has_anomaly(AnomalyKind::ConnectFailed));
    let stats = m.stats();
    assert_eq!((stats.active, stats.evicted), (1, 0));
}

/// Bytes each way from the sockets' own counters at → CLOSE: exact past
/// 4 GiB, where FIN seq − ISN wraps, and with or without the wire. The
/// kernel counts sequence space: the client's SYN and each FIN are a byte.
#[test]
fn byte_counters_at_close_beat_sequence_numbers() {
    const SENT: u64 = (1 << 32) + 100;
    let with_counters = |e: Event| match e {
        Event::State(mut sc) if sc.newstate == TcpState::Close => {
            let client = sc.skaddr == SK_C;
            sc.bytes_acked = Some(if client { SENT + 2 } else { 1 });
            sc.bytes_received = Some(if client { 1 } else { SENT + 1 });
            Event::State(sc)
        }
        other => other,
    };
    let ev: Vec<Event> = full_conversation().into_iter().map(with_counters).collect();
    let (conns, _) = run(&ev);
    let c = &conns[0];
    assert_eq!((c.bytes_client, c.bytes_server), (Some(SENT), Some(0)));
    // The wire alone says 100: the sequence numbers wrapped.
    let (wire_only, _) = run(&full_conversation());
    assert_eq!(wire_only[0].bytes_client, Some(100));
    // Kernel only (--no-wire), one side traced: its counters say both ways.
    let server_only: Vec<Event> = ev
        .into_iter()
        .filter(|e| matches!(e, Event::State(sc) if sc.skaddr == SK_S))
        .collect();
    let (conns, _) = run(&server_only);
    assert_eq!(
        (conns[0].bytes_client, conns[0].bytes_server),
        (Some(SENT), Some(0))
    );
    // A reset after 3 GiB: no FIN to count from, the wire has the first
    // 100 bytes' end only; the counters are the count.
    const BIG: u64 = 3 << 30;
    let mut reset: Vec<Event> = full_conversation()
        .into_iter()
        .filter(|e| e.ts_ns() < us(900))
        .collect();
    for (client, acked, received) in [(true, BIG + 1, 0), (false, 0, BIG)] {
        let mut e = state(990, client, TcpState::Established, TcpState::Close, 0);
        if let Event::State(sc) = &mut e {
            (sc.bytes_acked, sc.bytes_received) = (Some(acked), Some(received));
        }
        reset.push(e);
    }
    let (conns, _) = run(&reset);
    assert_eq!(
        (conns[0].bytes_client, conns[0].bytes_server),
        (Some(BIG), Some(0)),
        "{}",
        timeline::to_string(&conns[0])
    );
}

#[test]
fn live_time_in_states_per_socket() {
    use TcpState::*;
    let c = &run(&full_conversation()).0[0];
    assert_eq!(c.states.len(), 2);
    assert_eq!(
        spans(c, Side::Client),
        [
            (SynSent, Some(72_000)), // prev_state_ns from the kernel
            (Established, Some(923_000)),
            (FinWait1, Some(56_000)),
            (FinWait2, Some(71_000)),
            (Close, None),
        ]
    );
    assert_eq!(
        spans(c, Side::Server),
        [
            (SynRecv, Some(1_000)),
            (Established, Some(924_000)),
            (CloseWait, Some(79_000)),
            (LastAck, Some(44_000)),
            (Close, None),
        ]
    );
    let client = c
        .states
        .iter()
        .find(|s| s.side == Side::Client)
        .expect("client socket");
    assert_eq!(
        (client.pid, client.comm, client.netns),
        (100, Comm::from("curl"), NS_C)
    );
    assert_eq!(client.skaddr, 0xffff_8880_0000_1000);
}

#[test]
fn live_time_wait_inferred_from_fin_wait2_to_close() {
    let c = &run(&full_conversation()).0[0];
    let tw = c.time_wait.as_ref().expect("TIME_WAIT");
    assert_eq!((tw.side, tw.source), (Side::Client, "kernel"));
    assert_eq!(tw.since_ts_ns, us(1122));
    assert_eq!(tw.expected_ns, 60_000_000_000);
    let i = c
        .steps
        .iter()
        .position(|s| s.kind == StepKind::Inferred)
        .expect("TIME_WAIT step");
    assert_eq!(c.steps[i - 1].name, "FIN_WAIT2 → CLOSE");
    assert_eq!(
        c.steps[i].rule.as_deref(),
        Some("TIME_WAIT (inferred: timewait socket, not traced)")
    );
}

#[test]
fn live_kernel_steps_name_their_cause() {
    let c = &run(&full_conversation()).0[0];
    let cause = |name: &str, side: Side| {
        let k = c
            .steps
            .iter()
            .find(|s| s.kind == StepKind::Kernel && s.name == name && s.side == Some(side))
            .unwrap_or_else(|| panic!("no kernel step {name}"));
        k.matched_step.map(|i| c.steps[i].name.clone())
    };
    assert_eq!(
        cause("SYN_SENT → ESTABLISHED", Side::Client).as_deref(),
        Some("SYN-ACK")
    );
    assert_eq!(
        cause("SYN_RECV → ESTABLISHED", Side::Server).as_deref(),
        Some("ACK (handshake)")
    );
    assert_eq!(
        cause("ESTABLISHED → CLOSE_WAIT", Side::Server).as_deref(),
        Some("FIN")
    );
    assert_eq!(
        cause("FIN_WAIT1 → FIN_WAIT2", Side::Client).as_deref(),
        Some("ACK of FIN")
    );
    assert_eq!(
        cause("LAST_ACK → CLOSE", Side::Server).as_deref(),
        Some("ACK of FIN")
    );
    let text = timeline::to_string(c);
    assert!(
        text.contains("kernel  client  SYN_SENT → ESTABLISHED (SYN_SENT 0.072 ms)"),
        "{text}"
    );
    assert!(text.contains("curl[100]"), "{text}");
}

#[test]
fn live_state_without_segment_and_segment_without_state() {
    let mut ev = full_conversation();
    // TC missed the client's FIN at both vantage points.
    ev.retain(|e| !matches!(e, Event::Segment(s) if s.flags.fin() && s.sport == CPORT));
    let c = &run(&ev).0[0];
    let a = c
        .anomalies
        .iter()
        .find(|a| a.kind == AnomalyKind::StateWithoutSegment && a.side == Some(Side::Client))
        .unwrap_or_else(|| panic!("{}", timeline::to_string(c)));
    assert_eq!(a.state.as_deref(), Some("ESTABLISHED → FIN_WAIT1"));
    assert_eq!(a.ts_ns, Some(us(995)));

    let mut ev = full_conversation();
    // The tracepoint lost the server's ESTABLISHED → CLOSE_WAIT.
    ev.retain(|e| !matches!(e, Event::State(s) if s.newstate == TcpState::CloseWait));
    let c = &run(&ev).0[0];
    let a = c
        .anomaly(AnomalyKind::SegmentWithoutState)
        .unwrap_or_else(|| panic!("{:#?}", c.anomalies));
    assert_eq!(a.side, Some(Side::Server));
    assert_eq!(a.step.map(|i| c.steps[i].name.as_ref()), Some("FIN"));
    assert!(
        !c.has_anomaly(AnomalyKind::StateWithoutSegment),
        "{:#?}",
        c.anomalies
    );

    let mut ev = full_conversation();
    // The kernel skipped the client's last two changes (one softirq: the
    // server's ACK, then its FIN): the ACK of its FIN moved it.
    ev.retain(|e| {
        !matches!(e, Event::State(s) if s.skaddr == SK_C && matches!(s.newstate, TcpState::FinWait2 | TcpState::Close))
    });
    let c = &run(&ev).0[0];
    let unexplained: Vec<(Option<Side>, &str)> = c
        .anomalies
        .iter()
        .filter(|a| a.kind == AnomalyKind::SegmentWithoutState)
        .map(|a| (a.side, a.step.map_or("", |i| c.steps[i].name.as_ref())))
        .collect();
    assert_eq!(
        unexplained,
        [
            (Some(Side::Client), "ACK of FIN"),
            (Some(Side::Client), "FIN")
        ],
        "{}",
        timeline::to_string(c)
    );
}

/// The client closes first and its socket, orphaned, is handed to a
/// timewait socket as soon as its FIN is ACKed (FIN_WAIT2 → CLOSE, as
/// Linux does when tcp_fin_timeout is not longer than TIME_WAIT); the
/// server closes 1.5 s later. Its FIN lands on the timewait socket, which
/// changes no traced state: nothing is missing.
#[test]
fn live_late_fin_lands_on_the_timewait_socket() {
    use TcpState::*;
    let (a, f) = (F::ACK, F::FIN);
    let mut ev: Vec<Event> = full_conversation()
        .into_iter()
        .take_while(|e| e.ts_ns() < us(995))
        .collect();
    ev.push(state(995, true, Established, FinWait1, 0));
    ev.extend(seg(1000, true, f | a, 1101, 5001, 0));
    ev.push(state(1021, false, Established, CloseWait, 0));
    ev.extend(seg(1030, false, a, 5001, 1102, 0));
    ev.push(state(1051, true, FinWait1, FinWait2, 0));
    ev.push(state(1052, true, FinWait2, Close, 0));
    ev.push(state(1_501_100, false, CloseWait, LastAck, 0));
    ev.extend(seg(1_501_101, false, f | a, 5001, 1102, 0));
    ev.extend(seg(1_501_123, true, a, 1102, 5002, 0));
    ev.push(state(1_501_144, false, LastAck, Close, 0));
    let (conns, _) = run(&ev);
    assert_eq!(conns.len(), 1, "{conns:#?}");
    let c = &conns[0];
    assert!(c.anomalies.is_empty(), "{}", timeline::to_string(c));
    assert_eq!(c.close, super::Close::FourSegment);
    assert_eq!(c.closed_by, Some(Side::Client));
    assert_eq!(c.time_wait.as_ref().map(|t| t.side), Some(Side::Client));

    // The same FIN before the client's socket is gone must move it.
    let early: Vec<Event> = ev
        .iter()
        .filter(|e| !matches!(e, Event::State(s) if s.newstate == Close && s.skaddr == SK_C))
        .cloned()
        .collect();
    let c = &run(&early).0[0];
    let a = c
        .anomaly(AnomalyKind::SegmentWithoutState)
        .unwrap_or_else(|| panic!("{:#?}", c.anomalies));
    assert_eq!(a.side, Some(Side::Client));
}

#[test]
fn live_kernel_only_and_wire_only_views_do_not_cross_check() {
    let kernel: Vec<Event> = full_conversation()
        .into_iter()
        .filter(|e| matches!(e, Event::State(_)))
        .collect();
    let c = &run(&kernel).0[0];
    assert!(c.anomalies.is_empty(), "{:#?}", c.anomalies);
    assert_eq!(c.close, super::Close::FourSegment);
    assert_eq!(c.closed_by, Some(Side::Client));
    assert_eq!(c.handshake_rtt_ns, Some(72_000), "SYN_SENT time as RTT");
    assert_eq!((c.bytes_client, c.bytes_server), (None, None));
    assert_eq!(c.time_wait.as_ref().map(|t| t.source), Some("kernel"));

    // Only the server's socket traced: a passive open from this host's view.
    let server_only: Vec<Event> = kernel
        .into_iter()
        .filter(|e| matches!(e, Event::State(s) if s.skaddr == SK_S))
        .collect();
    let c = &run(&server_only).0[0];
    assert_eq!(c.open, Open::Passive);
    assert_eq!(c.client.to_string(), "10.1.0.1:40000");
    assert_eq!(c.close, super::Close::FourSegment);
    assert_eq!(c.closed_by, Some(Side::Client));
}

/// State changes that never arrived (`state_gap`): lost to a full ring or
/// skipped by the kernel, which does not count all of its skips. A hole in
/// a socket's chain of changes, or a peer's transition proving that the
/// socket moved on from where it was last traced; with the wire or without.
#[test]
fn state_changes_that_never_arrived_are_state_gaps() {
    use TcpState::*;
    type Gap = (Side, &'static str, u64);
    type Missing = &'static [(bool, TcpState, TcpState)];
    // (what happened, the state changes that never arrived as (client?, old,
    // new), ms the server's LAST_ACK lasted in all, the gaps reported)
    let table: [(&str, Missing, Option<u64>, &[Gap]); 7] = [
        ("nothing missing", &[], None, &[]),
        (
            "the server took the client's FIN untraced",
            &[(false, Established, CloseWait)],
            None,
            &[(Side::Server, "ESTABLISHED … CLOSE_WAIT", 1100)],
        ),
        (
            "the ACK of the client's FIN moved it untraced",
            &[(true, FinWait1, FinWait2)],
            None,
            &[(Side::Client, "FIN_WAIT1 … FIN_WAIT2", 1122)],
        ),
        (
            // The bench's 100,000-connection close burst: both changes of
            // one softirq skipped.
            "the client's last two changes skipped",
            &[(true, FinWait1, FinWait2), (true, FinWait2, Close)],
            None,
            &[(Side::Client, "FIN_WAIT1 … ?", 1144)],
        ),
        (
            "the client's last change skipped",
            &[(true, FinWait2, Close)],
            None,
            &[(Side::Client, "FIN_WAIT2 … ?", 1144)],
        ),
        (
            "the server never traced past ESTABLISHED",
            &[
                (false, Established, CloseWait),
                (false, CloseWait, LastAck),
                (false, LastAck, Close),
            ],
            None,
            &[(Side::Server, "ESTABLISHED … ?", 1051)],
        ),
        (
            // LAST_ACK also ends when the server gives up retransmitting
            // its FIN: that proves nothing about the client.
            "the client's FIN_WAIT1 may be real: the server's LAST_ACK timed out",
            &[(true, FinWait1, FinWait2), (true, FinWait2, Close)],
            Some(1_500),
            &[],
        ),
    ];
    for (what, missing, last_ack_ms, want) in table {
        let kept: Vec<Event> = full_conversation()
            .into_iter()
            .filter(|e| {
                !matches!(e, Event::State(sc) if missing.contains(&(sc.skaddr == SK_C, sc.oldstate, sc.newstate)))
            })
            .map(|e| match (e, last_ack_ms) {
                (Event::State(mut sc), Some(ms)) if sc.oldstate == LastAck => {
                    sc.ts_ns = us(1100) + ms * 1_000_000;
                    Event::State(sc)
                }
                (e, _) => e,
            })
            .collect();
        let kernel_only: Vec<Event> = kept
            .iter()
            .filter(|e| matches!(e, Event::State(_)))
            .cloned()
            .collect();
        for (view, ev) in [("wire and kernel", kept), ("kernel only", kernel_only)] {
            let (conns, _) = run(&ev);
            assert_eq!(conns.len(), 1, "{what}, {view}: {conns:#?}");
            let c = &conns[0];
            let got: Vec<(Side, &str, u64)> = c
                .anomalies
                .iter()
                .filter(|a| a.kind == AnomalyKind::StateGap)
                .map(|a| {
                    let at = a.ts_ns.map_or(0, |t| (t - us(0)) / 1000);
                    (a.side.expect("side"), a.state.as_deref().unwrap_or(""), at)
                })
                .collect();
            assert_eq!(
                got,
                want.to_vec(),
                "{what}, {view}:\n{}",
                timeline::to_string(c)
            );
        }
    }

    // A client bound before connect() has its port from CLOSE → SYN_SENT
    // on; its later changes lost, the server's SYN_RECV → ESTABLISHED
    // proves it took the SYN-ACK.
    let bound: Vec<Event> = full_conversation()
        .into_iter()
        .filter_map(|e| match e {
            Event::State(sc) if sc.skaddr == SK_C && sc.oldstate != Close => None,
            Event::State(mut sc) if sc.skaddr == SK_C => {
                sc.sport = CPORT;
                Some(Event::State(sc))
            }
            Event::Segment(_) => None,
            e => Some(e),
        })
        .collect();
    let c = &run(&bound).0[0];
    let gap = c
        .anomaly(AnomalyKind::StateGap)
        .unwrap_or_else(|| panic!("{}", timeline::to_string(c)));
    assert_eq!(
        (gap.side, gap.state.as_deref(), gap.ts_ns),
        (Some(Side::Client), Some("SYN_SENT … ?"), Some(us(97)))
    );
    assert!(
        gap.detail.contains("acknowledged the server's SYN-ACK"),
        "{}",
        gap.detail
    );
}

/// A record evicted in the middle of its connection's close leaves its
/// sockets' states behind for the 4-tuple's next record: a hole across the
/// split is still a `state_gap`, and a socket the next record never sees
/// is judged by where it stood.
#[test]
fn state_gaps_across_an_eviction() {
    use TcpState::*;
    let kernel = |e: &Event| matches!(e, Event::State(_));
    let all: Vec<Event> = full_conversation().into_iter().filter(kernel).collect();
    // Another connection takes the only place in the table between the two
    // closes: the first record is evicted with the client in FIN_WAIT1 and
    // the server in CLOSE_WAIT.
    let other = |t_us: u64| {
        let mut e = state(t_us, true, Established, FinWait1, 0);
        if let Event::State(sc) = &mut e {
            sc.sport = CPORT + 1;
            sc.skaddr = 0xffff_8880_0000_9000;
        }
        e
    };
    // (what, the changes that never arrived, µs at which another connection
    // evicts this one's record, the gaps its last record has)
    type Missing = &'static [(bool, TcpState, TcpState)];
    type Gaps = &'static [(Side, &'static str)];
    let skipped: Missing = &[(true, FinWait1, FinWait2), (true, FinWait2, Close)];
    let table: [(&str, Missing, &[u64], Gaps); 4] = [
        ("nothing missing", &[], &[1040], &[]),
        (
            "the client's changes after FIN_WAIT1 skipped",
            skipped,
            &[1040],
            &[(Side::Client, "FIN_WAIT1 … ?")],
        ),
        (
            "the server's CLOSE_WAIT → LAST_ACK lost",
            &[(false, CloseWait, LastAck)],
            &[1040],
            &[(Side::Server, "CLOSE_WAIT … LAST_ACK")],
        ),
        (
            "the client's changes skipped, two evictions",
            skipped,
            &[1040, 1120],
            &[(Side::Client, "FIN_WAIT1 … ?")],
        ),
    ];
    for (what, missing, splits, want) in table {
        let mut m = Matcher::new(MatcherConfig {
            max_connections: 1,
            ..MatcherConfig::default()
        });
        let mut out = Vec::new();
        let records = splits.len() + 1;
        let mut splits = splits.iter().peekable();
        for e in &all {
            if let Event::State(sc) = e {
                if missing.contains(&(sc.skaddr == SK_C, sc.oldstate, sc.newstate)) {
                    continue;
                }
            }
            if let Some(&t) = splits.next_if(|&&t| us(t) < e.ts_ns()) {
                out.extend(m.push(other(t)));
            }
            out.extend(m.push(e.clone()));
        }
        out.extend(m.finish());
        let mine: Vec<&Connection> = out.iter().filter(|c| c.client.port() == CPORT).collect();
        let last = mine.last().expect("a record");
        assert_eq!(mine.len(), records, "{what}: split by the evictions");
        for early in &mine[..mine.len() - 1] {
            assert_eq!(early.end_reason, EndReason::Evicted, "{what}");
            assert!(!early.has_anomaly(AnomalyKind::StateGap), "{what}");
        }
        let got: Vec<(Side, &str)> = last
            .anomalies
            .iter()
            .filter(|a| a.kind == AnomalyKind::StateGap)
            .map(|a| (a.side.expect("side"), a.state.as_deref().unwrap_or("")))
            .collect();
        assert_eq!(got, want.to_vec(), "{what}:\n{}", timeline::to_string(last));
        for a in last
            .anomalies
            .iter()
            .filter(|a| a.kind == AnomalyKind::StateGap)
        {
            assert!(a.detail.contains("in an earlier record"), "{}", a.detail);
        }
    }
}

/// A connection only the kernel saw is let go `kernel_linger_ns` after its
/// last socket's CLOSE; one with segments waits the full `linger_ns` for a
/// last ACK from another vantage point.
#[test]
fn kernel_only_connections_linger_briefly() {
    let kernel: Vec<Event> = full_conversation()
        .into_iter()
        .filter(|e| matches!(e, Event::State(_)))
        .collect();
    let cfg = MatcherConfig::default();
    assert!(cfg.kernel_linger_ns < cfg.linger_ns);
    // Time passing after the last CLOSE, as the live loop's tick says it.
    let end = kernel.last().map_or(0, Event::ts_ns);
    for (events, linger) in [
        (kernel, cfg.kernel_linger_ns),
        (full_conversation(), cfg.linger_ns),
    ] {
        let mut m = Matcher::new(cfg.clone());
        for e in events {
            assert!(m.push(e).is_empty(), "nothing is emitted before the linger");
        }
        assert!(m.tick(end + linger / 2).is_empty(), "still lingering");
        assert_eq!(
            m.tick(end + linger).len(),
            1,
            "emitted once the linger passed"
        );
    }
}

#[test]
fn live_out_of_order_arrival_gives_the_same_record() {
    let ev = full_conversation();
    let (want, _) = run(&ev);
    // Neighbouring events swapped, as two ring buffers drained in turn do.
    let mut shuffled = ev.clone();
    for i in (0..shuffled.len() - 1).step_by(2) {
        shuffled.swap(i, i + 1);
    }
    let (got, stats) = run(&shuffled);
    assert_eq!(stats.unresolved_state_events, 0);
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].steps, want[0].steps);
    assert_eq!(got[0].states, want[0].states);
    assert_eq!(got[0].anomalies, want[0].anomalies);
}

/// One ring read late (a slow or busy host): all of a connection's
/// segments reach the matcher before any of its state changes, or the other
/// way round. What is older than the record's latest event is a straggler of
/// that connection, not the next use of the 4-tuple.
#[test]
fn live_ring_lagging_a_whole_connection_joins_its_record() {
    let ev = full_conversation();
    let (want, _) = run(&ev);
    let (segments, states): (Vec<Event>, Vec<Event>) =
        ev.into_iter().partition(|e| matches!(e, Event::Segment(_)));
    let late_states: Vec<Event> = segments.iter().chain(&states).cloned().collect();
    let late_segments: Vec<Event> = states.iter().chain(&segments).cloned().collect();
    for (late, events) in [("states", late_states), ("segments", late_segments)] {
        let (got, stats) = run(&events);
        assert_eq!(got.len(), 1, "{late} late: {got:#?}");
        assert_eq!(stats.port_reuse, 0, "{late} late");
        assert_eq!(stats.unresolved_state_events, 0, "{late} late");
        assert_eq!(got[0].steps, want[0].steps, "{late} late");
        assert_eq!(got[0].states, want[0].states, "{late} late");
        assert_eq!(got[0].anomalies, want[0].anomalies, "{late} late");
    }
}

/// A backlog (the run yielded the CPU, then catches up) is matched in
/// slices, time ticking between them, as the live loop does: time must not
/// pass an event still waiting for its slice, or the matcher ends that
/// event's connection without it (seen live: connections split in three,
/// their last state changes each a record of their own).
#[test]
fn backlog_matched_in_slices_with_ticks_between_gives_one_record() {
    let ev = full_conversation();
    let (want, _) = run(&ev);
    // The rings were read well past the whole conversation: past every
    // linger and the idle timeout.
    let cutoff = ev.iter().map(Event::ts_ns).max().unwrap() + 120_000_000_000;
    for slice in 1..ev.len() {
        let mut order = crate::reader::Reorder::default();
        for e in &ev {
            order.push(e.clone());
        }
        let mut m = Matcher::new(MatcherConfig::default());
        let mut got = Vec::new();
        while !order.is_empty() {
            for _ in 0..slice {
                let Some(e) = order.pop_older(cutoff) else {
                    break;
                };
                got.extend(m.push(e));
            }
            got.extend(m.tick(order.matched_until(cutoff)));
        }
        got.extend(m.finish());
        assert_eq!(got.len(), 1, "slices of {slice}: {got:#?}");
        assert_eq!(got[0].steps, want[0].steps, "slices of {slice}");
        assert_eq!(got[0].anomalies, want[0].anomalies, "slices of {slice}");
    }
}

#[test]
fn live_reset_names_the_kernel_state() {
    use TcpState::{Close as Closed, Established};
    let mut ev: Vec<Event> = full_conversation()
        .into_iter()
        .filter(|e| e.ts_ns() < us(900))
        .collect();
    ev.push(state(950, false, Established, Closed, 0));
    ev.extend(seg(951, false, F::RST | F::ACK, 5001, 1101, 0));
    ev.push(state(972, true, Established, Closed, 0));
    let c = &run(&ev).0[0];
    assert_eq!(c.close, Close::Reset);
    assert_eq!(c.closed_by, Some(Side::Server));
    let a = c.anomaly(AnomalyKind::Reset).expect("reset");
    assert_eq!(
        (a.side, a.state.as_deref()),
        (Some(Side::Server), Some("ESTABLISHED"))
    );
    assert!(c.time_wait.is_none());
    assert!(
        !c.has_anomaly(AnomalyKind::StateWithoutSegment),
        "{:#?}",
        c.anomalies
    );
}

#[test]
fn loopback_is_keyed_by_namespace_and_lo_egress_ingress_merge() {
    let lo = IpAddr::V4(Ipv4Addr::LOCALHOST);
    let mk = |netns: u32, dir: Dir, ts: u64, flags: u8, from_client: bool| {
        let (sport, dport) = if from_client {
            (40000, 80)
        } else {
            (80, 40000)
        };
        Event::Segment(Segment {
            ts_ns: ts,
            ifindex: 1,
            iface: Some("lo".into()),
            dir,
            family: Family::Ipv4,
            saddr: lo,
            sport,
            daddr: lo,
            dport,
            flags: F(flags),
            seq: if from_client { 1 } else { 9 },
            ack: 0,
            win: 100,
            len: 0,
            options: TcpOptions::default(),
            netns,
        })
    };
    let mut ev = Vec::new();
    for (netns, t0) in [(111, 1000), (222, 1500)] {
        ev.push(mk(netns, Dir::Egress, t0, F::SYN, true));
        ev.push(mk(netns, Dir::Ingress, t0 + 5, F::SYN, true));
    }
    let (conns, _) = run(&ev);
    assert_eq!(conns.len(), 2, "two containers, two connections");
    for (c, ns) in conns.iter().zip([111, 222]) {
        assert_eq!(c.netns, Some(ns));
        assert_eq!(c.segments, 1, "egress and ingress on lo are one segment");
        assert_eq!(c.steps[0].observations.len(), 2);
        assert!(!c.has_anomaly(AnomalyKind::SynRetransmit));
    }
}

#[test]
fn same_segment_twice_at_one_vantage_point_is_a_retransmission() {
    let mut ev = seg(10, true, F::SYN, 1000, 0, 0);
    ev.extend(seg(1_000_010, true, F::SYN, 1000, 0, 0));
    let c = &run(&ev).0[0];
    assert_eq!(c.segments, 2);
    assert_eq!(
        c.anomaly(AnomalyKind::SynRetransmit).map(|a| a.count),
        Some(1)
    );
    assert!(c.steps[1].retransmission);
}

#[test]
fn listener_events_never_create_connections() {
    use TcpState::*;
    let listen = |old, new| {
        Event::State(StateChange {
            ts_ns: 5,
            skaddr: 0xdead,
            pid: 1,
            comm: "nginx".into(),
            family: Family::Ipv6,
            saddr: IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED),
            sport: 80,
            daddr: IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED),
            dport: 0,
            oldstate: old,
            newstate: new,
            prev_state_ns: 0,
            netns: NS_S,
            bytes_acked: None,
            bytes_received: None,
        })
    };
    let (conns, stats) = run(&[listen(Close, Listen), listen(Listen, Close)]);
    assert!(conns.is_empty());
    assert_eq!(stats.listener_events, 2);
}

#[test]
fn idle_connections_expire_on_tick() {
    let mut m = Matcher::new(MatcherConfig::default());
    for e in seg(10, true, F::SYN, 1000, 0, 0) {
        assert!(m.push(e).is_empty());
    }
    assert!(m.tick(us(10) + 59_000_000_000).is_empty());
    let out = m.tick(us(10) + 61_000_000_000);
    assert_eq!(out.len(), 1);
    assert_eq!(out[0].end_reason, EndReason::IdleTimeout);
    assert_eq!(m.stats().idle_expired, 1);
    assert_eq!(m.stats().active, 0);
}

#[test]
fn bounded_memory_evicts_the_least_recently_active() {
    let cfg = MatcherConfig {
        max_connections: 1000,
        ..MatcherConfig::default()
    };
    let mut m = Matcher::new(cfg);
    let mut emitted = 0usize;
    for i in 0..100_000u32 {
        let ev = Event::Segment(Segment {
            ts_ns: u64::from(i) * 1000,
            ifindex: 0,
            iface: None,
            dir: Dir::Capture,
            family: Family::Ipv4,
            saddr: IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + (i >> 10))),
            sport: 1024 + (i & 1023) as u16,
            daddr: sip(),
            dport: 80,
            flags: F(F::SYN),
            seq: i,
            ack: 0,
            win: 1,
            len: 0,
            options: TcpOptions::default(),
            netns: 0,
        });
        let out = m.push(ev);
        for c in &out {
            assert_eq!(c.end_reason, EndReason::Evicted);
        }
        emitted += out.len();
        assert!(m.stats().active <= 1000);
    }
    let s = m.stats();
    assert_eq!(s.active, 1000);
    assert_eq!(s.evicted, 99_000);
    assert_eq!(emitted, 99_000);
    assert_eq!(s.connections, 100_000);
    assert_eq!(m.finish().len(), 1000);
}

#[test]
fn per_connection_event_cap_counts_data_it_does_not_keep() {
    let cfg = MatcherConfig {
        max_events_per_connection: 100,
        ..MatcherConfig::default()
    };
    let mut m = Matcher::new(cfg);
    let mut ev = seg(0, true, F::SYN, 1000, 0, 0);
    ev.extend(seg(10, false, F::SYN | F::ACK, 5000, 1001, 0));
    ev.extend(seg(20, true, F::ACK, 1001, 5001, 0));
    for k in 0..1000u32 {
        ev.extend(seg(
            100 + u64::from(k),
            false,
            F::ACK,
            5001 + k * 100,
            1001,
            100,
        ));
    }
    ev.extend(seg(5000, false, F::FIN | F::ACK, 5001 + 100_000, 1001, 0));
    ev.extend(seg(5010, true, F::FIN | F::ACK, 1001, 5001 + 100_001, 0));
    ev.extend(seg(5020, false, F::ACK, 5001 + 100_001, 1002, 0));
    let mut out = Vec::new();
    for e in &ev {
        out.extend(m.push(e.clone()));
    }
    out.extend(m.finish());
    let c = &out[0];
    assert_eq!(c.bytes_server, Some(100_000));
    assert_eq!(c.close, Close::ThreeSegment);
    assert!(c.has_anomaly(AnomalyKind::Truncated));
    assert!(m.stats().events_dropped > 0);
}

/// No event sequence may panic: random flags, numbers, states and tuples.
#[test]
fn random_event_soup_never_panics() {
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut rnd = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let cfg = MatcherConfig {
        max_connections: 8,
        max_events_per_connection: 16,
        linger_ns: 1000,
        ..MatcherConfig::default()
    };
    let mut m = Matcher::new(cfg);
    let ips = [
        cip(),
        sip(),
        IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V4(Ipv4Addr::UNSPECIFIED),
    ];
    for i in 0..30_000u64 {
        let r = rnd();
        let pick = |n: u64, k: u32| ips[((r >> k) % n) as usize];
        let ts = i * 100 + (r % 300);
        let ev = if r % 3 == 0 {
            Event::State(StateChange {
                ts_ns: ts,
                skaddr: 0x1000 + (r >> 8) % 6,
                pid: 0,
                comm: Comm::default(),
                family: Family::Ipv4,
                saddr: pick(4, 3),
                sport: [0, 80, CPORT][((r >> 5) % 3) as usize],
                daddr: pick(4, 9),
                dport: [0, 80, CPORT][((r >> 11) % 3) as usize],
                oldstate: TcpState::from_kernel(((r >> 13) % 14) as u8),
                newstate: TcpState::from_kernel(((r >> 17) % 14) as u8),
                prev_state_ns: (r >> 20) % 1000,
                netns: ((r >> 23) % 2) as u32,
                bytes_acked: None,
                bytes_received: None,
            })
        } else {
            let s = seg(
                0,
                r % 2 == 0,
                ((r >> 3) & 0x3f) as u8,
                (r >> 9) as u32 % 8,
                (r >> 20) as u32 % 8,
                ((r >> 30) % 3) as u32,
            );
            let mut e = s[((r >> 33) % 2) as usize].clone();
            if let Event::Segment(sg) = &mut e {
                sg.ts_ns = ts;
            }
            e
        };
        for c in m.push(ev) {
            let _ = timeline::to_string(&c);
            let _ = serde_json::to_string(&c).expect("serialises");
        }
        if i % 1000 == 0 {
            m.tick(ts);
        }
    }
    for c in m.finish() {
        let _ = timeline::to_string(&c);
    }
}

/// The hand-written connection line against the derived `Serialize`, over
/// kernel steps, two vantage points, data, TIME_WAIT, a retransmitted SYN
/// with anomalies, a comm that needs escaping and an evicted half-open.
#[test]
fn connection_json_matches_serde() {
    let mut events = full_conversation();
    for e in &mut events {
        if let Event::State(sc) = e {
            if sc.pid != 0 {
                sc.comm = "a\"b\\c\n".into();
            }
        }
    }
    let mut retx = seg(10, true, F::SYN, 1000, 0, 0);
    retx.extend(seg(1_000_010, true, F::SYN, 1000, 0, 0));
    for e in &mut retx {
        if let Event::Segment(s) = e {
            s.sport += 1;
        }
    }
    events.extend(retx);
    let conns = run(&events).0;
    assert_eq!(conns.len(), 2);
    let mut all = String::new();
    for c in &conns {
        let mut got = Vec::new();
        crate::render::connection(&mut got, crate::render::Mode::Json, c).expect("to a Vec");
        let want = serde_json::to_string(c).expect("serialises") + "\n";
        assert_eq!(String::from_utf8(got).expect("UTF-8"), want);
        all += &want;
    }
    for key in [
        "\"observations\"",
        "\"skaddr\"",
        "\"comm\":\"a\\\"b",
        "\"matched_step\"",
        "\"retransmission\":true",
        "\"bytes_client\"",
        "\"time_wait\":{",
        "\"handshake_rtt_ns\":null",
    ] {
        assert!(all.contains(key), "{key} not covered");
    }
}

/// A live conversation's timeline (kernel steps and their causes, time in
/// states, the inferred TIME_WAIT, segments seen at two points), as
/// recorded when the text was last meant to change.
#[test]
fn live_timeline_reads_as_recorded() {
    let (conns, _) = run(&full_conversation());
    let text: String = conns.iter().map(timeline::to_string).collect();
    assert_eq!(text, include_str!("../../tests/fixtures/live-timeline.txt"));
}
