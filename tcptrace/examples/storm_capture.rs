//! Writes a capture of many short, overlapping connections, like a loopback
//! connection storm seen by tcpdump: the input of `cargo xtask bench
//! --userspace`, which measures what decoding, matching and printing cost per
//! event without root or a kernel tracer.
//!
//! `storm_capture OUT.pcap CONNECTIONS`
//!
//! Most connections fetch a small object and close (client first with a
//! three-segment close, or server first with a four-segment one); a few are
//! refused, retransmit their SYN, are reset mid-transfer or use IPv6, so the
//! matcher's rarer explanations are part of the cost too.
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use anyhow::{bail, Context as _, Result};
use tcptrace::event::TcpFlags as F;
use tcptrace::pcap::build::{self, Conn, PcapOpts};

/// 30,000 connections a second, as the loopback storm on two cores; with
/// 20 µs between segments about ten are in flight at once. The capture must
/// span many times the matcher's 500 ms linger, or most connections would be
/// emitted by the end-of-input drain instead of as they close.
const START_EVERY_NS: u64 = 33_000;
const SEGMENT_GAP_NS: u64 = 20_000;
/// tcpdump's old default: headers kept, payload cut, the file stays small.
const SNAPLEN: u32 = 96;

fn connection(i: u64, start_ns: u64) -> Conn {
    // Unique 4-tuples: 40,000 client ports per client address.
    let port = 20_000 + (i % 40_000) as u16;
    let host = (i / 40_000) as u8;
    let (client, server) = if i.is_multiple_of(97) {
        (
            IpAddr::V6(Ipv6Addr::new(
                0x2001,
                0xdb8,
                1,
                0,
                0,
                0,
                0,
                u16::from(host) + 1,
            )),
            IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 2, 0, 0, 0, 0, 1)),
        )
    } else {
        (
            IpAddr::V4(Ipv4Addr::new(10, 1, host, 1)),
            IpAddr::V4(Ipv4Addr::new(10, 2, 0, 1)),
        )
    };
    let mut c = Conn::between(SocketAddr::new(client, port), SocketAddr::new(server, 80)).isn(
        0x1000_0000u32.wrapping_mul(i as u32 | 1),
        0x7000_0000 ^ i as u32,
    );
    c.now_ns = start_ns;
    c.step_ns = SEGMENT_GAP_NS;
    if i % 50 == 7 {
        c.client(F::SYN, 0);
        c.server(F::RST | F::ACK, 0).seq = 0;
        return c;
    }
    if i % 37 == 5 {
        c.client(F::SYN, 0);
        c.resend();
        c.server(F::SYN | F::ACK, 0);
        c.client(F::ACK, 0);
    } else {
        c.handshake();
    }
    c.client(F::PSH | F::ACK, 80);
    c.server(F::ACK, 0);
    c.server(F::PSH | F::ACK, 700);
    c.client(F::ACK, 0);
    if i % 101 == 3 {
        c.client(F::RST | F::ACK, 0);
    } else if i.is_multiple_of(2) {
        c.client(F::FIN | F::ACK, 0);
        c.server(F::FIN | F::ACK, 0);
        c.client(F::ACK, 0);
    } else {
        c.server(F::FIN | F::ACK, 0);
        c.client(F::ACK, 0);
        c.client(F::FIN | F::ACK, 0);
        c.server(F::ACK, 0);
    }
    c
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [out, n] = args.as_slice() else {
        bail!("usage: storm_capture OUT.pcap CONNECTIONS");
    };
    let n: u64 = n.parse().context("CONNECTIONS")?;
    let t0 = 1_700_000_000_000_000_000;
    let mut frames: Vec<(u64, Vec<u8>)> = (0..n)
        .flat_map(|i| build::ethernet_frames(&connection(i, t0 + i * START_EVERY_NS).segments))
        .collect();
    frames.sort_by_key(|&(ts, _)| ts);
    let opts = PcapOpts {
        snaplen: SNAPLEN,
        ..PcapOpts::default()
    };
    std::fs::write(out, build::pcap_file_with(&frames, 1, &opts))
        .with_context(|| format!("cannot write {out}"))?;
    println!("{}", frames.len());
    Ok(())
}
