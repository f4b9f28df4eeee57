//! Capture-based tests: the seed fixture (golden, numbers checked against
//! `tcpdump -nr tests/fixtures/seed-wget-file64KB.pcap -S`) and one table of
//! scenarios, each built as a pcap file with `crate::pcap::build` and read
//! back through `crate::pcap::read_bytes`, so the whole capture path is used.

use std::path::Path;

use super::*;
use crate::event::TcpFlags as F;
use crate::pcap::{self, build::Conn};
use crate::timeline;

fn run_cfg(events: &[Event], cfg: MatcherConfig) -> (Vec<Connection>, MatcherStats) {
    let mut m = Matcher::new(cfg);
    let mut out = Vec::new();
    for e in events {
        out.extend(m.push(e.clone()));
    }
    out.extend(m.finish());
    (out, m.stats())
}

fn run(events: &[Event]) -> Vec<Connection> {
    run_cfg(events, MatcherConfig::default()).0
}

fn run_pcap(bytes: &[u8]) -> Vec<Connection> {
    run(&pcap::read_bytes(bytes).expect("built capture reads").events)
}

fn seed() -> Vec<Connection> {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/seed-wget-file64KB.pcap");
    run(&pcap::read_file(&p).expect("seed fixture reads").events)
}

fn step<'a>(c: &'a Connection, name: &str) -> &'a Step {
    c.steps
        .iter()
        .find(|s| s.name == name)
        .unwrap_or_else(|| panic!("no step {name:?} in {:#?}", names(c)))
}

/// Names of the wire and inferred steps (data runs and kernel steps left out).
fn names(c: &Connection) -> Vec<&str> {
    c.steps
        .iter()
        .filter(|s| matches!(s.kind, StepKind::Wire | StepKind::Inferred))
        .map(|s| s.name.as_ref())
        .collect()
}

fn kinds(c: &Connection) -> Vec<AnomalyKind> {
    c.anomalies.iter().map(|a| a.kind).collect()
}

#[test]
fn seed_has_two_connections_with_three_segment_closes() {
    let conns = seed();
    assert_eq!(conns.len(), 2);
    let ports: Vec<u16> = conns.iter().map(|c| c.client.port()).collect();
    assert_eq!(ports, [37584, 37586]);
    for c in &conns {
        assert_eq!(c.server.to_string(), "192.168.131.138:80");
        assert_eq!(c.family, crate::event::Family::Ipv4);
        assert_eq!(c.open, Open::Active);
        assert_eq!(c.close, Close::ThreeSegment);
        assert_eq!(c.closed_by, Some(Side::Client));
        assert_eq!((c.bytes_client, c.bytes_server), (Some(151), Some(65800)));
        assert_eq!(c.end_reason, EndReason::Closed);
        assert!(c.anomalies.is_empty(), "{:?}", c.anomalies);
        assert_eq!(
            names(c),
            [
                "SYN",
                "SYN-ACK",
                "ACK (handshake)",
                "FIN",
                "FIN+ACK",
                "ACK of FIN",
                "TIME_WAIT (inferred)"
            ]
        );
        let tw = c.time_wait.as_ref().expect("TIME_WAIT inferred");
        assert_eq!((tw.side, tw.source), (Side::Client, "wire"));
    }
    assert_eq!(conns[0].segments, 26);
    assert_eq!(conns[1].segments, 20);
}

#[test]
fn seed_first_connection_numbers_match_tcpdump() {
    let c = &seed()[0];
    assert_eq!(c.client.to_string(), "192.168.131.132:37584");
    assert_eq!(
        (c.isn_client, c.isn_server),
        (Some(3124300130), Some(2508684482))
    );
    // 1538302151.163215 SYN → .163355 SYN-ACK, capture taken at the client.
    assert_eq!(c.handshake_rtt_ns, Some(140_000));
    // The server's is not measured where the capture was taken (.163355
    // SYN-ACK → .163390 ACK is the client's own turnaround); SYN → ACK,
    // .163215 → .163390, is the round trip plus that turnaround.
    assert_eq!(c.handshake_rtt_server_ns, Some(175_000));
    assert_eq!(c.first_ts_ns, 1_538_302_151_163_215_000);
    assert_eq!(c.duration_ns, 1_667_000);

    // (name, seq, ack, rel_seq, rel_ack, rule)
    type Row = (
        &'static str,
        u32,
        Option<u32>,
        u32,
        Option<u32>,
        &'static str,
    );
    let table: [Row; 6] = [
        ("SYN", 3124300130, None, 0, None, "SYN seq=x"),
        (
            "SYN-ACK",
            2508684482,
            Some(3124300131),
            0,
            Some(1),
            "SYN-ACK seq=y ack=x+1",
        ),
        (
            "ACK (handshake)",
            3124300131,
            Some(2508684483),
            1,
            Some(1),
            "ACK ack=y+1",
        ),
        (
            "FIN",
            3124300282,
            Some(2508750283),
            152,
            Some(65801),
            "FIN seq=u",
        ),
        (
            "FIN+ACK",
            2508750283,
            Some(3124300283),
            65801,
            Some(153),
            "FIN seq=w, ACK ack=u+1",
        ),
        (
            "ACK of FIN",
            3124300283,
            Some(2508750284),
            153,
            Some(65802),
            "ACK ack=w+1",
        ),
    ];
    for (name, seq, ack, rseq, rack, rule) in table {
        let s = step(c, name);
        assert_eq!(s.kind, StepKind::Wire, "{name}");
        assert_eq!(s.seq, Some(seq), "{name} seq");
        assert_eq!(s.ack, ack, "{name} ack");
        assert_eq!(s.rel_seq, Some(rseq), "{name} rel_seq");
        assert_eq!(s.rel_ack, rack, "{name} rel_ack");
        assert_eq!(s.rule.as_deref(), Some(rule), "{name} rule");
        assert!(!s.retransmission, "{name}");
    }
    assert_eq!(step(c, "SYN").from, Some(Side::Client));
    assert_eq!(step(c, "SYN-ACK").from, Some(Side::Server));
    assert_eq!(
        step(c, "SYN").flags.map(|f| f.to_string()).as_deref(),
        Some("S")
    );
    assert_eq!(step(c, "SYN-ACK").rel_ns, 140_000);
    let data = c.steps_of(StepKind::Data).next().expect("data run");
    assert_eq!(
        (data.segments, data.bytes_client, data.bytes_server),
        (Some(20), Some(151), Some(65800))
    );
}

/// A capture does not say where it was taken: near the server, SYN →
/// SYN-ACK is the server's own turnaround, not a round trip. The longer gap
/// tells the place, and the RTTs are taken accordingly.
#[test]
fn handshake_rtts_from_a_capture_taken_near_the_server() {
    let mut c = Conn::new("10.0.0.1:40030", "10.0.0.2:80");
    c.step_ns = 0;
    c.client(F::SYN, 0);
    c.wait(15_000); // the server answers 15 µs after the SYN arrived
    c.server(F::SYN | F::ACK, 0);
    c.wait(80_000_000); // 80 ms to the client and back
    c.client(F::ACK, 0);
    c.wait(1_000_000);
    four_segment_close(&mut c, true);
    let conn = &run_pcap(&c.pcap())[0];
    let ctx = timeline::to_string(conn);
    assert_eq!(conn.handshake_rtt_server_ns, Some(80_000_000), "{ctx}");
    assert_eq!(conn.handshake_rtt_ns, Some(80_015_000), "{ctx}");
}

#[test]
fn seed_second_connection_numbers_match_tcpdump() {
    let c = &seed()[1];
    assert_eq!(c.client.to_string(), "192.168.131.132:37586");
    assert_eq!(
        (c.isn_client, c.isn_server),
        (Some(2780780137), Some(825503549))
    );
    assert_eq!(c.handshake_rtt_ns, Some(171_000)); // .168172 → .168343
    assert_eq!(step(c, "FIN").rel_seq, Some(152));
    assert_eq!(step(c, "FIN+ACK").rel_ack, Some(153));
    assert_eq!(step(c, "ACK of FIN").rel_ack, Some(65802));
}

#[test]
fn seed_timeline_reads_like_tcpdump() {
    let c = &seed()[0];
    let text = timeline::to_string(c);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(
        lines[0],
        "192.168.131.132:37584 → 192.168.131.138:80  active open, three-segment close, 151 B → / ← 65800 B, handshake RTT 140 µs"
    );
    for want in [
        "0.000 ms  client > server  Flags [S], seq 3124300130, win 29200, options [mss 1460,sackOK,TS val 1666537180 ecr 0,wscale 7], length 0",
        "0.140 ms  server > client  Flags [S.], seq 2508684482, ack 3124300131, win 28960,",
        "0.175 ms  client > server  Flags [.], ack 1, win 229,",
        "SYN seq=x — x = 3124300130",
        "SYN-ACK seq=y ack=x+1 — y = 2508684482",
        "ACK ack=y+1 — handshake complete",
        "data            20 segments",
        "1.270 ms  client > server  Flags [F.], seq 152, ack 65801, win 1257,",
        "FIN seq=u — u = 152",
        "1.648 ms  server > client  Flags [F.], seq 65801, ack 153, win 235,",
        "FIN seq=w, ACK ack=u+1 — w = 65801, u+1 = 153",
        "1.667 ms  client > server  Flags [.], ack 65802, win 1257,",
        "ACK ack=w+1 — w+1 = 65802: close complete",
        "client          TIME_WAIT (inferred: timewait socket, not traced)",
        "anomalies: none",
    ] {
        assert!(text.contains(want), "missing {want:?} in\n{text}");
    }
}

#[test]
fn seed_json_summary_contract() {
    let c = &seed()[0];
    let v = serde_json::to_value(c).expect("serialises");
    assert_eq!(v["type"], "connection");
    assert_eq!(v["client"], "192.168.131.132:37584");
    assert_eq!(v["server"], "192.168.131.138:80");
    assert_eq!(v["family"], "ipv4");
    assert_eq!(v["isn_client"], 3124300130u64);
    assert_eq!(v["isn_server"], 2508684482u64);
    assert_eq!(v["handshake_rtt_ns"], 140000);
    assert_eq!(v["handshake_rtt_server_ns"], 175000);
    assert_eq!(v["bytes_client"], 151);
    assert_eq!(v["bytes_server"], 65800);
    assert_eq!(v["open"], "active");
    assert_eq!(v["close"], "three-segment");
    assert_eq!(v["closed_by"], "client");
    assert_eq!(v["end_reason"], "closed");
    assert!(v["anomalies"].as_array().is_some_and(Vec::is_empty));
    assert!(v["states"].as_array().is_some_and(Vec::is_empty));
    assert_eq!(v["time_wait"]["side"], "client");
    let s0 = &v["steps"][0];
    assert_eq!(s0["kind"], "wire");
    assert_eq!(s0["name"], "SYN");
    assert_eq!(s0["flags"], "S");
    assert_eq!(s0["from"], "client");
    assert_eq!(s0["options"]["mss"], 1460);
    assert!(
        s0.get("observations").is_none(),
        "capture: no vantage points"
    );
    let s1 = &v["steps"][1];
    assert_eq!(
        (s1["ack"].as_u64(), s1["rel_ack"].as_u64()),
        (Some(3124300131), Some(1))
    );
}

// ---- The scenario table -------------------------------------------------

const HS: [&str; 3] = ["SYN", "SYN-ACK", "ACK (handshake)"];

struct Expect {
    open: Open,
    close: Close,
    closed_by: Option<Side>,
    anomalies: &'static [AnomalyKind],
    bytes: (Option<u64>, Option<u64>),
    steps: Vec<&'static str>,
}

struct Scenario {
    name: &'static str,
    segments: Vec<pcap::build::SegmentSpec>,
    expect: Vec<Expect>,
}

fn with(steps: &[&[&'static str]]) -> Vec<&'static str> {
    steps.concat()
}

fn four_segment_close(c: &mut Conn, closer_is_client: bool) {
    let (a, b) = if closer_is_client {
        (pcap::build::Side::Client, pcap::build::Side::Server)
    } else {
        (pcap::build::Side::Server, pcap::build::Side::Client)
    };
    c.send(a, F::FIN | F::ACK, 0);
    c.send(b, F::ACK, 0);
    c.send(b, F::FIN | F::ACK, 0);
    c.send(a, F::ACK, 0);
}

fn scenarios() -> Vec<Scenario> {
    let mut v = Vec::new();

    let mut c = Conn::new("10.0.0.1:40000", "10.0.0.2:81");
    c.client(F::SYN, 0);
    c.server(F::RST | F::ACK, 0).seq = 0;
    v.push(Scenario {
        name: "refused: SYN answered by RST,ACK",
        segments: c.segments,
        expect: vec![Expect {
            open: Open::Active,
            close: Close::Reset,
            closed_by: Some(Side::Server),
            anomalies: &[AnomalyKind::Refused],
            bytes: (Some(0), Some(0)),
            steps: vec!["SYN", "RST (refused)"],
        }],
    });

    let mut c = Conn::new("10.0.0.1:40001", "10.0.0.2:80");
    c.handshake();
    c.client(F::PSH | F::ACK, 100);
    c.server(F::ACK, 0);
    c.server(F::RST | F::ACK, 0);
    v.push(Scenario {
        name: "reset mid-connection by the server",
        segments: c.segments,
        expect: vec![Expect {
            open: Open::Active,
            close: Close::Reset,
            closed_by: Some(Side::Server),
            anomalies: &[AnomalyKind::Reset],
            bytes: (Some(100), Some(0)),
            steps: with(&[&HS, &["RST"]]),
        }],
    });

    let mut c = Conn::new("10.0.0.1:40002", "10.0.0.2:80");
    c.handshake();
    c.client(F::FIN | F::ACK, 0);
    // The server's FIN leaves before the client's arrives: it acks only 1001.
    c.server(F::FIN | F::ACK, 0).ack = 1001;
    c.client(F::ACK, 0);
    c.server(F::ACK, 0);
    v.push(Scenario {
        name: "simultaneous close",
        segments: c.segments,
        expect: vec![Expect {
            open: Open::Active,
            close: Close::Simultaneous,
            closed_by: Some(Side::Both),
            anomalies: &[],
            bytes: (Some(0), Some(0)),
            steps: with(&[
                &HS,
                &[
                    "FIN",
                    "FIN (simultaneous close)",
                    "ACK of FIN",
                    "ACK of FIN",
                    "TIME_WAIT (inferred)",
                ],
            ]),
        }],
    });

    let mut c = Conn::new("10.0.0.1:40003", "10.0.0.2:80");
    c.client(F::SYN, 0);
    c.wait(1_000_000_000);
    c.resend();
    c.wait(2_000_000_000);
    c.resend();
    c.server(F::SYN | F::ACK, 0);
    c.client(F::ACK, 0);
    four_segment_close(&mut c, true);
    v.push(Scenario {
        name: "retransmitted SYN",
        segments: c.segments,
        expect: vec![Expect {
            open: Open::Active,
            close: Close::FourSegment,
            closed_by: Some(Side::Client),
            anomalies: &[AnomalyKind::SynRetransmit],
            bytes: (Some(0), Some(0)),
            steps: vec![
                "SYN",
                "SYN (retransmission)",
                "SYN (retransmission)",
                "SYN-ACK",
                "ACK (handshake)",
                "FIN",
                "ACK of FIN",
                "FIN",
                "ACK of FIN",
                "TIME_WAIT (inferred)",
            ],
        }],
    });

    let mut c = Conn::new("10.0.0.1:40004", "10.0.0.2:80");
    c.handshake();
    c.client(F::PSH | F::ACK, 50);
    c.server(F::ACK, 0);
    c.client(F::FIN | F::ACK, 0); // shutdown(SHUT_WR)
    c.server(F::PSH | F::ACK, 1000); // still sending, acks the FIN
    c.client(F::ACK, 0);
    c.server(F::PSH | F::ACK, 500);
    c.client(F::ACK, 0);
    c.server(F::FIN | F::ACK, 0);
    c.client(F::ACK, 0);
    v.push(Scenario {
        name: "half-close: client shuts down writing, server keeps sending",
        segments: c.segments,
        expect: vec![Expect {
            open: Open::Active,
            close: Close::FourSegment,
            closed_by: Some(Side::Client),
            anomalies: &[],
            bytes: (Some(50), Some(1500)),
            steps: with(&[
                &HS,
                &[
                    "FIN",
                    "ACK of FIN",
                    "FIN",
                    "ACK of FIN",
                    "TIME_WAIT (inferred)",
                ],
            ]),
        }],
    });

    let mut c = Conn::new("[2001:db8::1]:40005", "[2001:db8::2]:443");
    c.handshake();
    c.client(F::PSH | F::ACK, 300);
    c.server(F::PSH | F::ACK, 4000);
    c.client(F::ACK, 0);
    four_segment_close(&mut c, true);
    v.push(Scenario {
        name: "IPv6, four-segment close",
        segments: c.segments,
        expect: vec![Expect {
            open: Open::Active,
            close: Close::FourSegment,
            closed_by: Some(Side::Client),
            anomalies: &[],
            bytes: (Some(300), Some(4000)),
            steps: with(&[
                &HS,
                &[
                    "FIN",
                    "ACK of FIN",
                    "FIN",
                    "ACK of FIN",
                    "TIME_WAIT (inferred)",
                ],
            ]),
        }],
    });

    let mut c = Conn::new("10.0.0.1:40006", "10.0.0.2:80");
    c.handshake();
    c.server(F::PSH | F::ACK, 10);
    c.client(F::ACK, 0);
    four_segment_close(&mut c, false);
    v.push(Scenario {
        name: "four-segment close, server closes first",
        segments: c.segments,
        expect: vec![Expect {
            open: Open::Active,
            close: Close::FourSegment,
            closed_by: Some(Side::Server),
            anomalies: &[],
            bytes: (Some(0), Some(10)),
            steps: with(&[
                &HS,
                &[
                    "FIN",
                    "ACK of FIN",
                    "FIN",
                    "ACK of FIN",
                    "TIME_WAIT (inferred)",
                ],
            ]),
        }],
    });

    // RFC 9293 figure 8 at the client: an old duplicate's SYN-ACK arrives
    // (ack 91 for an old SYN 90), the client answers RST seq=91, then the
    // real SYN-ACK for its SYN 1000 arrives.
    let mut c = Conn::new("10.0.0.1:40007", "10.0.0.2:80");
    c.client(F::SYN, 0);
    {
        let s = c.server(F::SYN | F::ACK, 0);
        s.seq = 300;
        s.ack = 91;
    }
    c.server_next = 5000;
    c.client(F::RST, 0).seq = 91;
    c.server(F::SYN | F::ACK, 0);
    c.client(F::ACK, 0);
    four_segment_close(&mut c, true);
    v.push(Scenario {
        name: "stale SYN-ACK answered by RST",
        segments: c.segments,
        expect: vec![Expect {
            open: Open::Active,
            close: Close::FourSegment,
            closed_by: Some(Side::Client),
            anomalies: &[AnomalyKind::BadAck],
            bytes: (Some(0), Some(0)),
            steps: vec![
                "SYN",
                "SYN-ACK (bad ack)",
                "RST (rejects old duplicate)",
                "SYN-ACK",
                "ACK (handshake)",
                "FIN",
                "ACK of FIN",
                "FIN",
                "ACK of FIN",
                "TIME_WAIT (inferred)",
            ],
        }],
    });

    let three = || -> Vec<&'static str> {
        with(&[
            &HS,
            &["FIN", "FIN+ACK", "ACK of FIN", "TIME_WAIT (inferred)"],
        ])
    };
    let mut c = Conn::new("10.0.0.1:40008", "10.0.0.2:80");
    c.handshake();
    c.client(F::FIN | F::ACK, 0);
    c.server(F::FIN | F::ACK, 0);
    c.client(F::ACK, 0);
    // Same 4-tuple 100 ms later (inside the linger time), new ISNs.
    let mut c2 = Conn::new("10.0.0.1:40008", "10.0.0.2:80").isn(777_000, 999_000);
    c2.now_ns = c.now_ns + 100_000_000;
    c2.handshake();
    c2.client(F::PSH | F::ACK, 20);
    c2.server(F::ACK, 0);
    c2.client(F::FIN | F::ACK, 0);
    c2.server(F::FIN | F::ACK, 0);
    c2.client(F::ACK, 0);
    let mut segs = c.segments;
    segs.extend(c2.segments);
    v.push(Scenario {
        name: "port reuse: two connections on one 4-tuple",
        segments: segs,
        expect: vec![
            Expect {
                open: Open::Active,
                close: Close::ThreeSegment,
                closed_by: Some(Side::Client),
                anomalies: &[],
                bytes: (Some(0), Some(0)),
                steps: three(),
            },
            Expect {
                open: Open::Active,
                close: Close::ThreeSegment,
                closed_by: Some(Side::Client),
                anomalies: &[],
                bytes: (Some(20), Some(0)),
                steps: three(),
            },
        ],
    });

    let mut c = Conn::new("10.0.0.1:40009", "10.0.0.2:80");
    c.client(F::SYN, 0);
    c.server(F::SYN | F::ACK, 0);
    c.resend();
    c.client(F::ACK, 0);
    v.push(Scenario {
        name: "retransmitted SYN-ACK, never closed",
        segments: c.segments,
        expect: vec![Expect {
            open: Open::Active,
            close: Close::Unfinished,
            closed_by: None,
            anomalies: &[AnomalyKind::SynackRetransmit, AnomalyKind::CloseUnfinished],
            bytes: (Some(0), Some(0)),
            steps: vec![
                "SYN",
                "SYN-ACK",
                "SYN-ACK (retransmission)",
                "ACK (handshake)",
            ],
        }],
    });

    let mut c = Conn::new("10.0.0.1:40010", "10.0.0.2:80");
    c.client(F::SYN, 0);
    v.push(Scenario {
        name: "SYN never answered",
        segments: c.segments,
        expect: vec![Expect {
            open: Open::Active,
            close: Close::Unfinished,
            closed_by: None,
            anomalies: &[AnomalyKind::HandshakeUnfinished],
            bytes: (Some(0), None),
            steps: vec!["SYN"],
        }],
    });

    let mut c = Conn::new("10.0.0.1:40011", "10.0.0.2:80");
    c.client(F::PSH | F::ACK, 10);
    c.server(F::ACK, 0);
    v.push(Scenario {
        name: "capture starts mid-stream",
        segments: c.segments,
        expect: vec![Expect {
            open: Open::Unknown,
            close: Close::Unfinished,
            closed_by: None,
            anomalies: &[AnomalyKind::CloseUnfinished],
            bytes: (Some(10), Some(0)),
            steps: vec![],
        }],
    });
    v
}

#[test]
fn scenario_table() {
    for sc in scenarios() {
        let file = pcap::build::pcap_from_segments(&sc.segments);
        let conns = run_pcap(&file);
        assert_eq!(
            conns.len(),
            sc.expect.len(),
            "{}: connections\n{:#?}",
            sc.name,
            conns.iter().map(names).collect::<Vec<_>>()
        );
        for (i, (c, e)) in conns.iter().zip(&sc.expect).enumerate() {
            let ctx = format!("{} [conn {i}]\n{}", sc.name, timeline::to_string(c));
            assert_eq!(c.open, e.open, "open: {ctx}");
            assert_eq!(c.close, e.close, "close: {ctx}");
            assert_eq!(c.closed_by, e.closed_by, "closed_by: {ctx}");
            assert_eq!(kinds(c), e.anomalies, "anomalies: {ctx}");
            assert_eq!((c.bytes_client, c.bytes_server), e.bytes, "bytes: {ctx}");
            assert_eq!(names(c), e.steps, "steps: {ctx}");
            // Every record renders and serialises.
            assert!(serde_json::to_string(c).is_ok(), "{ctx}");
        }
    }
}

/// A lost data segment: the receiver's duplicate ACKs (the same pure ACK
/// three times) are not retransmissions; the resent segment is.
#[test]
fn duplicate_acks_are_not_retransmissions() {
    let mut c = Conn::new("10.0.0.1:40020", "10.0.0.2:80");
    c.handshake();
    c.client(F::PSH | F::ACK, 100);
    let lost = c.client(F::PSH | F::ACK, 100).clone();
    // Acknowledges the first segment only, three times.
    c.server(F::ACK, 0).ack -= 100;
    c.resend();
    c.resend();
    let mut again = lost;
    again.ts_ns = c.now_ns;
    c.segments.push(again);
    c.wait(1_000_000);
    c.server(F::ACK, 0);
    four_segment_close(&mut c, true);
    let c = &run_pcap(&c.pcap())[0];
    let ctx = timeline::to_string(c);
    assert_eq!(c.retransmissions, 1, "{ctx}");
    assert_eq!(step(c, "data").retransmissions, Some(1), "{ctx}");
    assert_eq!(c.bytes_client, Some(200), "{ctx}");
}

/// Stale SYN-ACKs and the client's RSTs repeated many times: each
/// `bad_ack` anomaly says once that it was answered (the details grew with
/// every RST × SYN-ACK pair, quadratic in the segments of one capture).
#[test]
fn repeated_stale_synacks_and_rsts_stay_linear() {
    let mut c = Conn::new("10.0.0.1:40021", "10.0.0.2:80");
    c.client(F::SYN, 0);
    for _ in 0..2000 {
        let s = c.server(F::SYN | F::ACK, 0);
        s.seq = 300;
        s.ack = 91;
        c.client(F::RST, 0).seq = 91;
    }
    let c = &run_pcap(&c.pcap())[0];
    let bad: Vec<_> = c
        .anomalies
        .iter()
        .filter(|a| a.kind == AnomalyKind::BadAck)
        .collect();
    assert_eq!(bad.len(), 2000);
    for a in bad {
        assert_eq!(
            a.detail.matches("answered by RST").count(),
            1,
            "{}",
            a.detail
        );
    }
}

fn scenario(name: &str) -> Vec<Connection> {
    let sc = scenarios()
        .into_iter()
        .find(|s| s.name.starts_with(name))
        .unwrap_or_else(|| panic!("no scenario {name}"));
    run_pcap(&pcap::build::pcap_from_segments(&sc.segments))
}

#[test]
fn scenario_details() {
    let c = &scenario("refused")[0];
    let a = c.anomaly(AnomalyKind::Refused).expect("refused");
    assert_eq!(a.side, Some(Side::Server));
    assert_eq!(
        step(c, "RST (refused)").rule.as_deref(),
        Some("RST ack=x+1")
    );

    let c = &scenario("reset mid")[0];
    let a = c.anomaly(AnomalyKind::Reset).expect("reset");
    assert_eq!(
        (a.side, a.state.as_deref()),
        (Some(Side::Server), Some("ESTABLISHED"))
    );
    assert!(c.time_wait.is_none(), "no TIME_WAIT after a reset");

    let c = &scenario("simultaneous close")[0];
    assert_eq!(c.time_wait.as_ref().map(|t| t.side), Some(Side::Both));

    let c = &scenario("retransmitted SYN")[0];
    let a = c
        .anomaly(AnomalyKind::SynRetransmit)
        .expect("syn_retransmit");
    assert_eq!(a.count, 2);
    assert!(a.detail.contains("gaps 1.001 s, 2.001 s"), "{}", a.detail);
    // Measured from the SYN that was answered.
    assert_eq!(c.handshake_rtt_ns, Some(1_000_000));
    assert_eq!(c.retransmissions, 2);

    let c = &scenario("half-close")[0];
    let ack = step(c, "ACK of FIN");
    assert_eq!(
        (ack.from, ack.len, ack.rel_ack),
        (Some(Side::Server), Some(1000), Some(52))
    );
    assert_eq!(ack.rule.as_deref(), Some("ACK ack=u+1"));

    let c = &scenario("IPv6")[0];
    assert_eq!(c.family, crate::event::Family::Ipv6);
    let v = serde_json::to_value(c).expect("json");
    assert_eq!(v["client"], "[2001:db8::1]:40005");
    assert_eq!(v["family"], "ipv6");

    let c = &scenario("four-segment")[0];
    assert_eq!(c.time_wait.as_ref().map(|t| t.side), Some(Side::Server));

    let c = &scenario("stale SYN-ACK")[0];
    assert_eq!((c.isn_client, c.isn_server), (Some(1000), Some(5000)));
    let a = c.anomaly(AnomalyKind::BadAck).expect("bad_ack");
    assert!(a.detail.contains("answered by RST"), "{}", a.detail);
    assert_eq!(
        a.step.map(|i| c.steps[i].name.as_ref()),
        Some("SYN-ACK (bad ack)")
    );

    let c = &scenario("retransmitted SYN-ACK")[0];
    assert_eq!(
        c.anomaly(AnomalyKind::SynackRetransmit).map(|a| a.count),
        Some(1)
    );
    assert_eq!(c.end_reason, EndReason::EndOfInput);
}

#[test]
fn port_reuse_is_counted_and_splits_records() {
    let sc = scenarios()
        .into_iter()
        .find(|s| s.name.starts_with("port reuse"))
        .expect("scenario");
    let events = pcap::read_bytes(&pcap::build::pcap_from_segments(&sc.segments))
        .expect("reads")
        .events;
    let (conns, stats) = run_cfg(&events, MatcherConfig::default());
    assert_eq!(conns.len(), 2);
    assert_eq!(stats.port_reuse, 1);
    assert_eq!(conns[0].isn_client, Some(1000));
    assert_eq!(conns[1].isn_client, Some(777_000));
    assert!(conns[0].last_ts_ns < conns[1].first_ts_ns);
}

#[test]
fn finished_connections_are_emitted_after_linger_by_event_time() {
    let mut c = Conn::new("10.0.0.1:40100", "10.0.0.2:80");
    c.handshake();
    four_segment_close(&mut c, true);
    let mut other = Conn::new("10.0.0.9:40101", "10.0.0.2:80");
    other.now_ns = c.now_ns + 600_000_000; // past the 500 ms linger
    other.client(F::SYN, 0);
    let mut segs = c.segments;
    segs.extend(other.segments);
    let events = pcap::read_bytes(&pcap::build::pcap_from_segments(&segs))
        .expect("reads")
        .events;
    let mut m = Matcher::new(MatcherConfig::default());
    let mut emitted_at = None;
    for (i, e) in events.iter().enumerate() {
        let out = m.push(e.clone());
        if !out.is_empty() {
            assert_eq!(out[0].close, Close::FourSegment);
            emitted_at = Some(i);
        }
    }
    assert_eq!(
        emitted_at,
        Some(events.len() - 1),
        "emitted when the clock passed the linger"
    );
    assert_eq!(m.stats().active, 1);
    let rest = m.finish();
    assert_eq!(rest.len(), 1);
    assert!(rest[0].has_anomaly(AnomalyKind::HandshakeUnfinished));
}

#[test]
fn every_scenario_renders_a_timeline() {
    for sc in scenarios() {
        for c in run_pcap(&pcap::build::pcap_from_segments(&sc.segments)) {
            let t = timeline::to_string(&c);
            assert!(
                t.starts_with(&format!("{} → {}", c.client, c.server)),
                "{t}"
            );
            assert!(t.contains("anomalies"), "{t}");
        }
    }
}

/// Records are reused once emitted (`Matcher::spare`): every scenario run
/// after the others through one matcher, each in a later second, reads as
/// it does through a fresh one.
#[test]
fn reused_records_read_as_fresh_ones() {
    let shifted: Vec<Vec<Event>> = scenarios()
        .iter()
        .enumerate()
        .map(|(i, sc)| {
            let file = pcap::build::pcap_from_segments(&sc.segments);
            let mut events = pcap::read_bytes(&file).expect("built capture reads").events;
            for e in &mut events {
                match e {
                    Event::State(s) => s.ts_ns += i as u64 * 1_000_000_000_000,
                    Event::Segment(s) => s.ts_ns += i as u64 * 1_000_000_000_000,
                }
            }
            events
        })
        .collect();
    let json = |c: &Connection| serde_json::to_string(c).expect("serialises");
    let mut shared = Matcher::new(MatcherConfig::default());
    for events in &shifted {
        let mut reused = Vec::new();
        for e in events {
            reused.extend(shared.push(e.clone()));
        }
        reused.extend(shared.finish());
        let fresh = run(events);
        assert_eq!(
            reused.iter().map(json).collect::<Vec<_>>(),
            fresh.iter().map(json).collect::<Vec<_>>()
        );
    }
    assert!(shifted.len() > 1, "scenarios to reuse records across");
}

/// The seed capture's timelines, as recorded when the text was last meant
/// to change: the timeline writer is held to them byte for byte.
#[test]
fn seed_timelines_read_as_recorded() {
    let text: String = seed().iter().map(timeline::to_string).collect();
    assert_eq!(text, include_str!("../../tests/fixtures/seed-timeline.txt"));
}
