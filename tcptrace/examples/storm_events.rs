//! What matching and rendering cost per kernel state change, without root:
//! the state changes of a loopback connection storm (as `cargo xtask bench`
//! drives it, server closing first) made up in memory and run through the
//! matcher and the chosen output mode into memory. Decoding and write(2)
//! are left out on purpose: this is tcptrace's own userspace work.
//!
//! `storm_events [CONNECTIONS] [json|timeline|events] [wire]` prints one JSON
//! line: events, connections, output bytes and CPU ns per event. With `wire`
//! each connection also has the control segments the egress classifier on
//! `lo` streams for it (SYN, SYN-ACK, the handshake's ACK, both FINs and the
//! last ACK), as with wire capture on.
use std::io::Write;
use std::net::{IpAddr, Ipv4Addr};

use anyhow::{bail, Context as _, Result};
use std::sync::Arc;

use tcptrace::event::{
    Dir, Event, Family, Segment, StateChange, TcpFlags as F, TcpOptions, TcpState as S,
};
use tcptrace::matcher::{Matcher, MatcherConfig};
use tcptrace::render::{self, Clock, Mode};

/// As the storm on two cores: a connection every 33 µs, each about 65 µs
/// from connect() to the last CLOSE, so a few overlap.
const START_EVERY_NS: u64 = 33_000;
/// The kernel reuses a closed socket's memory soon; so do these addresses.
const SOCKET_SLOTS: u64 = 4096;

/// (client side?, old, new, ns after connect()) of one storm connection, as
/// a live trace shows them.
const STEPS: [(bool, S, S, u64); 10] = [
    (true, S::Close, S::SynSent, 0),
    (true, S::SynSent, S::Established, 8_800),
    (false, S::Listen, S::SynRecv, 10_300),
    (false, S::SynRecv, S::Established, 21_800),
    (false, S::Established, S::FinWait1, 33_000),
    (true, S::Established, S::CloseWait, 34_300),
    (true, S::CloseWait, S::LastAck, 39_300),
    (false, S::FinWait1, S::FinWait2, 61_500),
    (false, S::FinWait2, S::Close, 63_100),
    (true, S::LastAck, S::Close, 65_300),
];

/// (client sends?, flags, ns after connect()) of the control segments of one
/// storm connection on `lo` egress: the server closes first, the client's
/// FIN carries the ACK of the server's.
const SEGMENTS: [(bool, u8, u64); 6] = [
    (true, F::SYN, 4_000),
    (false, F::SYN | F::ACK, 7_500),
    (true, F::ACK, 9_500),
    (false, F::FIN | F::ACK, 33_500),
    (true, F::FIN | F::ACK, 39_800),
    (false, F::ACK, 60_900),
];

fn segment(
    i: u64,
    start: u64,
    cport: u16,
    lo: IpAddr,
    iface: &Arc<str>,
    seg: (bool, u8, u64),
) -> Event {
    let (client, flags, at) = seg;
    // Initial sequence numbers; each side sends 8 bytes before the FINs.
    let (ciss, siss) = (
        (i as u32).wrapping_mul(2_654_435_761),
        (i as u32).wrapping_mul(40_503),
    );
    let (cnxt, snxt) = (ciss.wrapping_add(1), siss.wrapping_add(1));
    let (seq, ack) = match (client, flags) {
        (true, F::SYN) => (ciss, 0),
        (false, _) if flags & F::SYN != 0 => (siss, cnxt),
        (true, F::ACK) => (cnxt, snxt),
        (false, _) if flags & F::FIN != 0 => (snxt + 8, cnxt + 8),
        (true, _) => (cnxt + 8, snxt + 9),
        (false, _) => (snxt + 9, cnxt + 9),
    };
    let syn = flags & F::SYN != 0;
    let options = TcpOptions {
        mss: syn.then_some(65_495),
        wscale: syn.then_some(7),
        sack_ok: syn,
        tsval: Some((start / 1_000_000) as u32),
        tsecr: Some(if flags == F::SYN {
            0
        } else {
            (start / 1_000_000) as u32
        }),
    };
    let (sport, dport) = if client { (cport, 80) } else { (80, cport) };
    Event::Segment(Segment {
        ts_ns: start + at,
        ifindex: 1,
        iface: Some(iface.clone()),
        dir: Dir::Egress,
        family: Family::Ipv4,
        saddr: lo,
        sport,
        daddr: lo,
        dport,
        flags: F(flags),
        seq,
        ack,
        win: if syn { 65_483 } else { 512 },
        len: 0,
        options,
        netns: 4026531833,
    })
}

fn events(conns: u64, wire: bool) -> Vec<Event> {
    let iface: Arc<str> = Arc::from("lo");
    let lo = IpAddr::V4(Ipv4Addr::LOCALHOST);
    let mut v = Vec::with_capacity(conns as usize * (STEPS.len() + SEGMENTS.len()));
    for i in 0..conns {
        let start = 1_000_000_000 + i * START_EVERY_NS;
        let cport = 20_000 + (i % 40_000) as u16;
        let slot = i % SOCKET_SLOTS;
        let (client_sk, server_sk) = (
            0xffff_8880_0000_0000 + slot * 0x1000,
            0xffff_8880_1000_0000 + slot * 0x1000,
        );
        if wire {
            for &seg in &SEGMENTS {
                v.push(segment(i, start, cport, lo, &iface, seg));
            }
        }
        let mut last = [start, start];
        for &(client, old, new, at) in &STEPS {
            let ts = start + at;
            let side = usize::from(client);
            let prev = if old == S::Close || old == S::Listen {
                0
            } else {
                ts - last[side]
            };
            last[side] = ts;
            let (sport, dport) = match (client, old) {
                (true, S::Close) => (0, 80),
                (true, _) => (cport, 80),
                (false, _) => (80, cport),
            };
            v.push(Event::State(StateChange {
                ts_ns: ts,
                skaddr: if client { client_sk } else { server_sk },
                pid: 4242,
                comm: "tcpstorm".into(),
                family: Family::Ipv4,
                saddr: lo,
                sport,
                daddr: lo,
                dport,
                oldstate: old,
                newstate: new,
                prev_state_ns: prev,
                netns: 4026531833,
                // Each side sends 8 bytes and a FIN, the client a SYN
                // before them: the kernel counts sequence space.
                bytes_acked: (new == S::Close).then_some(if client { 10 } else { 9 }),
                bytes_received: (new == S::Close).then_some(9),
            }));
        }
    }
    // Time order, as the ring delivers them.
    v.sort_by_key(Event::ts_ns);
    v
}

fn cpu_ns() -> u64 {
    // SAFETY: getrusage with a valid out pointer.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
    let tv = |t: libc::timeval| t.tv_sec as u64 * 1_000_000_000 + t.tv_usec as u64 * 1000;
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

fn main() -> Result<()> {
    let mut args = std::env::args().skip(1);
    let conns: u64 = match args.next() {
        Some(n) => n.parse().context("CONNECTIONS must be a number")?,
        None => 100_000,
    };
    let mode = match args.next().as_deref() {
        None | Some("json") => Mode::Json,
        Some("timeline") => Mode::Timeline,
        Some("events") => Mode::Events,
        Some(other) => bail!("unknown mode {other:?}: json, timeline or events"),
    };
    let wire = match args.next().as_deref() {
        None => false,
        Some("wire") => true,
        Some(other) => bail!("unknown argument {other:?}: wire or nothing"),
    };
    let evs = events(conns, wire);
    let n = evs.len() as u64;
    let start = cpu_ns();
    let (bytes, connections) = run(evs, mode)?;
    let cpu = cpu_ns() - start;
    let mut stdout = std::io::stdout().lock();
    writeln!(
        stdout,
        "{{\"events\":{n},\"connections\":{connections},\"bytes\":{bytes},\"bytes_per_event\":{:.0},\"cpu_ns_per_event\":{:.0}}}",
        bytes as f64 / n as f64,
        cpu as f64 / n as f64
    )?;
    Ok(())
}

/// The timed part: matching and rendering, as the live loop does them.
/// Returns (output bytes, connection records). Not inlined, so that
/// `valgrind --tool=callgrind --collect-atstart=no
/// --toggle-collect=storm_events::run` counts it alone.
#[inline(never)]
fn run(evs: Vec<Event>, mode: Mode) -> Result<(u64, u64)> {
    let clock = Clock::epoch();
    let mut out: Vec<u8> = Vec::with_capacity(1 << 20);
    let (mut bytes, mut connections) = (0u64, 0u64);
    let mut drain = |out: &mut Vec<u8>| {
        bytes += out.len() as u64;
        out.clear();
    };
    let mut m = Matcher::new(MatcherConfig::default());
    for ev in evs {
        render::write_event(&mut out, mode, &ev, &clock)?;
        let ts = ev.ts_ns();
        for c in m.push(ev) {
            connections += 1;
            render::connection(&mut out, mode, &c)?;
        }
        // The live loop's tick: connections end when their linger expires.
        if ts % 50_000_000 < START_EVERY_NS {
            for c in m.tick(ts) {
                connections += 1;
                render::connection(&mut out, mode, &c)?;
            }
        }
        if out.len() >= 1 << 20 {
            drain(&mut out);
        }
    }
    for c in m.finish() {
        connections += 1;
        render::connection(&mut out, mode, &c)?;
    }
    drain(&mut out);
    Ok((bytes, connections))
}
