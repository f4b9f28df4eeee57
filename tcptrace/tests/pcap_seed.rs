//! The seed capture decodes exactly as tcpdump shows it.
//!
//! Facts below were read off `tcpdump -nr FILE -S -v` (absolute sequence
//! numbers); the last test re-derives every segment from tcpdump itself when
//! it is installed.

use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::process::Command;

use tcptrace::event::{Event, Family, Segment, TcpFlags};
use tcptrace::pcap::{read_file, CaptureStats};

fn seed_path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/seed-wget-file64KB.pcap")
}

fn seed() -> (Vec<Segment>, CaptureStats) {
    let cap = read_file(&seed_path()).expect("seed capture decodes");
    let segs = cap
        .events
        .into_iter()
        .map(|e| match e {
            Event::Segment(s) => s,
            other => panic!("unexpected event {other:?}"),
        })
        .collect();
    (segs, cap.stats)
}

const CLIENT: IpAddr = IpAddr::V4(Ipv4Addr::new(192, 168, 131, 132));
const SERVER: IpAddr = IpAddr::V4(Ipv4Addr::new(192, 168, 131, 138));

#[test]
fn counts() {
    let (segs, stats) = seed();
    assert_eq!(segs.len(), 46);
    assert_eq!(
        stats,
        CaptureStats {
            packets: 46,
            tcp_segments: 46,
            ..CaptureStats::default()
        }
    );
}

#[test]
fn first_syn() {
    let (segs, _) = seed();
    let s = &segs[0];
    // 10:09:11.163215 (UTC) = 1538302151.163215
    assert_eq!(s.ts_ns, 1_538_302_151_163_215_000);
    assert_eq!(s.family, Family::Ipv4);
    assert_eq!(
        (s.saddr, s.sport, s.daddr, s.dport),
        (CLIENT, 37584, SERVER, 80)
    );
    assert_eq!(s.flags, TcpFlags(TcpFlags::SYN));
    assert_eq!((s.seq, s.ack, s.win, s.len), (3124300130, 0, 29200, 0));
    assert_eq!(
        s.options.to_string(),
        "mss 1460,sackOK,TS val 1666537180 ecr 0,wscale 7"
    );
    assert_eq!((s.ifindex, s.iface.as_deref(), s.netns), (0, None, 0));

    let sa = &segs[1];
    assert_eq!(sa.flags.to_string(), "S.");
    assert_eq!((sa.seq, sa.ack, sa.win), (2508684482, 3124300131, 28960));
}

#[test]
fn client_ports_and_payloads() {
    let (segs, _) = seed();
    let syns: Vec<u16> = segs
        .iter()
        .filter(|s| s.flags.0 == TcpFlags::SYN)
        .map(|s| s.sport)
        .collect();
    assert_eq!(syns, vec![37584, 37586]);
    // The HTTP GET, then the first 7240-byte TSO chunk of the response.
    assert_eq!(
        (segs[3].seq, segs[3].len, segs[3].flags.to_string()),
        (3124300131, 151, "P.".into())
    );
    assert_eq!((segs[5].seq, segs[5].len), (2508684483, 7240));
    // Each connection's server sends the 64 KiB file plus headers.
    for port in [37584, 37586] {
        let sent: u32 = segs
            .iter()
            .filter(|s| s.sport == 80 && s.dport == port)
            .map(|s| s.len)
            .sum();
        assert_eq!(sent, 65_800, "port {port}");
    }
}

#[test]
fn fins() {
    let (segs, _) = seed();
    let fins: Vec<(u16, u32, u32, u32)> = segs
        .iter()
        .filter(|s| s.flags.fin())
        .map(|s| (s.sport, s.seq, s.ack, s.len))
        .collect();
    assert_eq!(
        fins,
        vec![
            (37584, 3124300282, 2508750283, 0),
            (80, 2508750283, 3124300283, 0),
            (37586, 2780780289, 825569350, 0),
            (80, 825569350, 2780780290, 0),
        ]
    );
    assert!(segs
        .iter()
        .all(|s| s.flags.to_string() != "F" && !s.flags.rst()));
}

/// One line of `tcpdump -nr FILE -S -tt`.
#[derive(Debug, PartialEq)]
struct Line {
    ts_us: String,
    src: String,
    dst: String,
    flags: String,
    /// Printed only when the segment has data, SYN, FIN or RST.
    seq: Option<u32>,
    ack: Option<u32>,
    len: u32,
}

fn parse_line(l: &str) -> Option<Line> {
    let mut words = l.split_whitespace();
    let ts_us = words.next()?.to_string();
    if words.next()? != "IP" {
        return None;
    }
    let src = words.next()?.to_string();
    words.next()?; // ">"
    let dst = words.next()?.trim_end_matches(':').to_string();
    let flags = l.split("Flags [").nth(1)?.split(']').next()?.to_string();
    let field = |name: &str| -> Option<&str> {
        l.split(", ")
            .find_map(|part| part.strip_prefix(name).map(str::trim))
    };
    let seq = field("seq ").map(|v| v.split(':').next().unwrap_or(v).parse().expect("seq"));
    let ack = field("ack ").map(|v| v.parse().expect("ack"));
    let len = field("length ")?
        .split(|c: char| !c.is_ascii_digit())
        .next()?
        .parse()
        .ok()?;
    Some(Line {
        ts_us,
        src,
        dst,
        flags,
        seq,
        ack,
        len,
    })
}

fn as_line(s: &Segment, tcpdump_has: &Line) -> Line {
    Line {
        ts_us: format!(
            "{}.{:06}",
            s.ts_ns / 1_000_000_000,
            s.ts_ns % 1_000_000_000 / 1000
        ),
        src: format!("{}.{}", s.saddr, s.sport),
        dst: format!("{}.{}", s.daddr, s.dport),
        flags: s.flags.to_string(),
        seq: tcpdump_has.seq.map(|_| s.seq),
        ack: tcpdump_has.ack.map(|_| s.ack),
        len: s.len,
    }
}

#[test]
fn matches_tcpdump_segment_by_segment() {
    let path = seed_path();
    let out = match Command::new("tcpdump")
        .args(["-nr", path.to_str().expect("utf-8 path"), "-S", "-tt"])
        .env("TZ", "UTC")
        .output()
    {
        Ok(o) if o.status.success() => o,
        Ok(o) => panic!("tcpdump failed: {}", String::from_utf8_lossy(&o.stderr)),
        Err(e) => {
            eprintln!("note: tcpdump not runnable ({e}); skipping the comparison");
            return;
        }
    };
    let text = String::from_utf8(out.stdout).expect("tcpdump prints UTF-8");
    let lines: Vec<Line> = text.lines().filter_map(parse_line).collect();
    let (segs, _) = seed();
    assert_eq!(lines.len(), segs.len(), "tcpdump printed:\n{text}");
    for (i, (want, seg)) in lines.iter().zip(&segs).enumerate() {
        assert_eq!(&as_line(seg, want), want, "segment {i}");
        // tcpdump omits them for bare ACKs; they must still be there for
        // everything it does show.
        if want.flags.contains('S') || want.flags.contains('F') || want.len > 0 {
            assert!(want.seq.is_some(), "segment {i}: tcpdump showed no seq");
        }
    }
}
