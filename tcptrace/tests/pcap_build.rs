//! Captures made with `pcap::build` read back identically, on every link
//! type, container and byte order the reader supports.

use std::net::IpAddr;

use tcptrace::event::{Event, Segment, TcpFlags as F};
use tcptrace::pcap::build::{self, Conn, PcapOpts, PcapngWriter, SegmentSpec};
use tcptrace::pcap::{read_bytes, Capture, CaptureStats};

fn segments(c: &Capture) -> Vec<Segment> {
    c.events
        .iter()
        .map(|e| match e {
            Event::Segment(s) => s.clone(),
            other => panic!("pcap produced a non-segment event {other:?}"),
        })
        .collect()
}

fn v6(s: &str) -> IpAddr {
    s.parse().expect("IPv6 literal")
}

/// A short connection with data, options and a FIN from each side.
fn conversation() -> Conn {
    let mut c = Conn::new("192.0.2.1:51000", "198.51.100.7:443");
    c.syn_options = build::syn_options(1460, Some(7), true, Some((111, 0)));
    c.handshake();
    c.client(F::PSH | F::ACK, 517).options = build::ts_option(112, 222);
    c.server(F::ACK, 1448);
    c.server(F::PSH | F::ACK, 300);
    c.client(F::ACK, 0);
    c.client(F::FIN | F::ACK, 0);
    c.server(F::FIN | F::ACK, 0);
    c.client(F::ACK, 0);
    c
}

fn v6_conversation() -> Conn {
    let mut c = Conn::new("[2001:db8::1]:51000", "[2001:db8::2]:22");
    c.handshake();
    c.client(F::PSH | F::ACK, 40);
    c.client(F::RST, 0);
    c
}

#[test]
fn conn_tracks_sequence_numbers() {
    let c = conversation();
    let s = &c.segments;
    assert_eq!((s[0].seq, s[0].ack, s[0].flags), (1000, 0, F::SYN));
    assert_eq!((s[1].seq, s[1].ack), (5000, 1001));
    assert_eq!((s[2].seq, s[2].ack), (1001, 5001));
    assert_eq!((s[3].seq, s[3].payload_len), (1001, 517));
    assert_eq!((s[4].seq, s[4].ack), (5001, 1518));
    // Client FIN, server FIN acking it, final ACK acking the server's FIN.
    assert_eq!((s[7].seq, s[7].ack), (1518, 6749));
    assert_eq!((s[8].seq, s[8].ack), (6749, 1519));
    assert_eq!((s[9].seq, s[9].ack), (1519, 6750));
    assert!(s.windows(2).all(|w| w[0].ts_ns < w[1].ts_ns));
}

#[test]
fn every_link_type_round_trips() {
    for conn in [conversation(), v6_conversation()] {
        for link in [0u32, 1, 12, 14, 101, 113, 276] {
            let file = build::pcap_file(&build::frames(link, &conn.segments), link);
            let cap = read_bytes(&file).unwrap_or_else(|e| panic!("link {link}: {e}"));
            assert_eq!(segments(&cap), conn.expected(), "link type {link}");
            assert_eq!(cap.stats.tcp_segments, conn.segments.len() as u64);
            assert_eq!(cap.stats.packets, conn.segments.len() as u64);
        }
    }
    let v4 = conversation();
    let file = build::pcap_file(&build::frames(228, &v4.segments), 228);
    assert_eq!(
        segments(&read_bytes(&file).expect("LINKTYPE_IPV4")),
        v4.expected()
    );
    let v6c = v6_conversation();
    let file = build::pcap_file(&build::frames(229, &v6c.segments), 229);
    assert_eq!(
        segments(&read_bytes(&file).expect("LINKTYPE_IPV6")),
        v6c.expected()
    );
}

#[test]
fn classic_pcap_variants_round_trip() {
    let conn = conversation();
    let frames = build::ethernet_frames(&conn.segments);
    for big_endian in [false, true] {
        for nanos in [false, true] {
            let o = PcapOpts {
                nanos,
                big_endian,
                ..PcapOpts::default()
            };
            let cap = read_bytes(&build::pcap_file_with(&frames, 1, &o)).expect("decodes");
            let mut want = conn.expected();
            if !nanos {
                for s in &mut want {
                    s.ts_ns -= s.ts_ns % 1000;
                }
            }
            assert_eq!(
                segments(&cap),
                want,
                "big_endian {big_endian} nanos {nanos}"
            );
        }
    }
}

#[test]
fn vlan_tags_are_peeled() {
    for conn in [conversation(), v6_conversation()] {
        for vids in [&[10u16][..], &[100, 20]] {
            let frames: Vec<_> = conn
                .segments
                .iter()
                .map(|s| (s.ts_ns, build::vlan_frame(s, vids)))
                .collect();
            let cap = read_bytes(&build::pcap_file(&frames, 1)).expect("decodes");
            assert_eq!(segments(&cap), conn.expected(), "vlans {vids:?}");
        }
    }
}

#[test]
fn ipv6_extension_headers_are_walked() {
    let spec = SegmentSpec {
        saddr: v6("2001:db8::1"),
        daddr: v6("2001:db8::2"),
        flags: F::PSH | F::ACK,
        seq: 77,
        ack: 88,
        payload_len: 33,
        options: build::ts_option(1, 2),
        ..SegmentSpec::default()
    };
    for ext in [&[0u8][..], &[60], &[43], &[51], &[0, 43, 51, 60]] {
        let mut f = build::ethernet_frame(&spec)[..14].to_vec();
        f.extend(build::ipv6_packet_with_ext(&spec, ext));
        let cap = read_bytes(&build::pcap_file(&[(0, f)], 1)).expect("decodes");
        assert_eq!(segments(&cap), vec![spec.expected()], "ext {ext:?}");
    }
    // A fragment header (even a first fragment) is never parsed as TCP.
    let mut f = build::ethernet_frame(&spec)[..14].to_vec();
    f.extend(build::ipv6_packet_with_ext(&spec, &[0, 44]));
    let cap = read_bytes(&build::pcap_file(&[(0, f)], 1)).expect("decodes");
    assert!(cap.events.is_empty());
    assert_eq!(cap.stats.skipped_unsupported, 1);
}

#[test]
fn pcapng_round_trips() {
    let conn = conversation();
    let frames = build::ethernet_frames(&conn.segments);
    let cap = read_bytes(&build::pcapng_file(&frames, 1)).expect("decodes");
    assert_eq!(segments(&cap), conn.expected());
}

#[test]
fn pcapng_sections_interfaces_and_resolutions() {
    let v4 = conversation();
    let v6c = v6_conversation();
    let a = &v4.segments[0];
    let b = &v6c.segments[0];
    let ts = 1_700_000_000_123_456_789u64;

    let mut w = PcapngWriter::new(true);
    w.raw_block(0x0bad, b"custom block the reader must skip");
    w.interface(1, None); // 0: Ethernet, microseconds by default
    w.interface(113, Some(0x80 | 30)); // 1: SLL, 2^-30 s
    w.interface(276, Some(3)); // 2: SLL2, milliseconds
    w.packet(0, ts, &build::ethernet_frame(a));
    w.packet(1, ts, &build::sll_frame(b));
    w.raw_block(5, &[0; 12]); // interface statistics
    w.packet(2, ts, &build::sll2_frame(a));
    w.simple_packet(&build::ethernet_frame(b));
    w.section(false);
    w.interface(101, Some(9));
    w.packet(0, ts, &build::ip_packet(b));
    w.interface(0, None);
    w.packet(1, ts, &build::null_frame(a));

    let cap = read_bytes(&w.finish()).expect("decodes");
    let got = segments(&cap);
    let want = |s: &SegmentSpec, ts_ns: u64, ifindex: u32| Segment {
        ts_ns,
        ifindex,
        ..s.expected()
    };
    // 2^-30 s ticks: truncating ns → ticks → ns loses under 1 ns per tick.
    let pow2 = (u128::from(ts) * (1 << 30) / 1_000_000_000) as u64;
    let pow2_ns = (u128::from(pow2) * 1_000_000_000 / (1 << 30)) as u64;
    assert_eq!(
        got,
        vec![
            want(a, ts - ts % 1000, 0),
            want(b, pow2_ns, 1),
            want(a, ts - ts % 1_000_000, 2),
            // SPB: no timestamp of its own, so the previous packet's.
            want(b, ts - ts % 1_000_000, 0),
            want(b, ts, 0),
            want(a, ts - ts % 1000, 1),
        ]
    );
    assert_eq!(
        cap.stats,
        CaptureStats {
            packets: 6,
            tcp_segments: 6,
            ..CaptureStats::default()
        }
    );
}

#[test]
fn non_tcp_and_odd_frames_are_counted_not_dropped_silently() {
    let s = SegmentSpec {
        flags: F::ACK,
        ..SegmentSpec::default()
    };
    let tcp = build::ethernet_frame(&s);
    let mut udp = tcp.clone();
    udp[14 + 9] = 17;
    let mut arp = tcp.clone();
    arp[12..14].copy_from_slice(&[0x08, 0x06]);
    let mut frag = tcp.clone();
    frag[14 + 7] = 0x10; // fragment offset 16 * 8
    let short = tcp[..14 + 20 + 10].to_vec();
    let mut bad_doff = tcp.clone();
    bad_doff[14 + 20 + 12] = 0x40; // data offset 16 < 20
    let frames: Vec<(u64, Vec<u8>)> = [tcp, udp, arp, frag, short, bad_doff]
        .into_iter()
        .map(|f| (0, f))
        .collect();
    let cap = read_bytes(&build::pcap_file(&frames, 1)).expect("decodes");
    assert_eq!(
        cap.stats,
        CaptureStats {
            packets: 6,
            tcp_segments: 1,
            skipped_non_tcp: 2,
            skipped_truncated: 1,
            skipped_unsupported: 2,
        }
    );
}

/// The scenarios the matcher's tests build, as a smoke test of the builder.
#[test]
fn scenario_shapes() {
    // Refused: SYN, RST/ACK with seq 0 as Linux sends it.
    let mut c = Conn::new("10.0.0.1:40000", "10.0.0.2:81");
    c.client(F::SYN, 0);
    c.server(F::RST | F::ACK, 0).seq = 0;
    let got = segments(&read_bytes(&c.pcap()).expect("decodes"));
    assert_eq!((got[1].seq, got[1].ack), (0, 1001));

    // Retransmitted SYN: same seq, later timestamp.
    let mut c = Conn::new("10.0.0.1:40000", "10.0.0.2:80");
    c.client(F::SYN, 0);
    c.wait(1_000_000_000);
    c.resend();
    let got = segments(&read_bytes(&c.pcap()).expect("decodes"));
    assert_eq!(got[0].seq, got[1].seq);
    assert_eq!(got[1].ts_ns - got[0].ts_ns, 1_001_000_000);

    // Simultaneous close: each FIN acks only the data before the other's FIN.
    let mut c = Conn::new("10.0.0.1:40000", "10.0.0.2:80");
    c.handshake();
    let client_fin_seq = c.client_next;
    c.client(F::FIN | F::ACK, 0);
    c.server(F::FIN | F::ACK, 0).ack = client_fin_seq;
    c.client(F::ACK, 0);
    c.server(F::ACK, 0);
    let got = segments(&read_bytes(&c.pcap()).expect("decodes"));
    assert_eq!(got[4].ack, got[3].seq);
    assert_eq!(got[5].ack, got[4].seq + 1);
    assert_eq!(got[6].ack, got[3].seq + 1);
}

/// Runs `tcpdump -nr FILE -v -S` on `data`; `None` when tcpdump is missing.
fn tcpdump(data: &[u8], name: &str) -> Option<String> {
    let path = std::env::temp_dir().join(format!("tcptrace-pcap-{}-{name}", std::process::id()));
    std::fs::write(&path, data).expect("write temp capture");
    let out = std::process::Command::new("tcpdump")
        .args(["-nr", path.to_str().expect("utf-8 path"), "-v", "-S"])
        .output();
    let _ = std::fs::remove_file(&path);
    match out {
        Ok(o) => {
            assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
            Some(String::from_utf8_lossy(&o.stdout).into_owned())
        }
        Err(e) => {
            eprintln!("note: tcpdump not runnable ({e}); skipping");
            None
        }
    }
}

/// tcpdump is an independent reader: what the builder writes must look to it
/// like the segments we meant, checksums included. (libpcap cannot read a
/// pcapng whose interfaces differ in link type, hence one file per type.)
#[test]
fn tcpdump_agrees_with_the_builder() {
    let v4 = conversation();
    let v6c = v6_conversation();
    let all: Vec<SegmentSpec> = v4.segments.iter().chain(&v6c.segments).cloned().collect();
    let n = all.len();
    let mut files: Vec<(String, Vec<u8>)> = Vec::new();
    for (i, link) in [0u32, 1, 101, 113, 276].into_iter().enumerate() {
        let frames = build::frames(link, &all);
        files.push((format!("link{link}.pcap"), build::pcap_file(&frames, link)));
        let mut w = PcapngWriter::new(i % 2 == 0);
        w.interface(link, Some([6, 9, 0x80 | 24][i % 3]));
        for (ts, f) in &frames {
            w.packet(0, *ts, f);
        }
        files.push((format!("link{link}.pcapng"), w.finish()));
    }
    let vlan: Vec<_> = all
        .iter()
        .map(|s| (s.ts_ns, build::vlan_frame(s, &[100, 200])))
        .collect();
    files.push(("vlan.pcap".into(), build::pcap_file(&vlan, 1)));
    let ext: Vec<_> = v6c
        .segments
        .iter()
        .map(|s| {
            let mut f = build::ethernet_frame(s)[..14].to_vec();
            f.extend(build::ipv6_packet_with_ext(s, &[0, 43, 60]));
            (s.ts_ns, f)
        })
        .collect();
    files.push(("v6ext.pcap".into(), build::pcap_file(&ext, 1)));

    for (name, data) in files {
        let Some(text) = tcpdump(&data, &name) else {
            return;
        };
        let want = if name == "v6ext.pcap" {
            v6c.segments.len()
        } else {
            n
        };
        assert_eq!(text.matches("Flags [").count(), want, "{name}:\n{text}");
        assert_eq!(text.matches("(correct)").count(), want, "{name}:\n{text}");
        for bad in ["incorrect", "bad", "truncated", "[|"] {
            assert!(!text.contains(bad), "{name}: tcpdump says {bad:?}:\n{text}");
        }
        if name != "v6ext.pcap" {
            assert!(text.contains("seq 1001:1518, ack 5001"), "{name}:\n{text}");
            assert!(
                text.contains("options [mss 1460,sackOK,TS val 111 ecr 0,nop,wscale 7]"),
                "{name}:\n{text}"
            );
        }
    }
}
