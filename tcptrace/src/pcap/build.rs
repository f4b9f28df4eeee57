//! Builds capture files for tests: TCP segments → frames → pcap/pcapng bytes
//! that [`super::read_bytes`] (and tcpdump) can read.
//!
//! Two levels:
//! - [`SegmentSpec`] + [`ethernet_frame`]/[`frame`] + [`pcap_file`]/[`pcapng_file`]
//!   for full control over every field;
//! - [`Conn`], which tracks sequence numbers for a client/server pair so a
//!   scenario reads like the tcpdump output it stands for.
//!
//! ```
//! use tcptrace::event::TcpFlags as F;
//! use tcptrace::pcap::{build::Conn, read_bytes};
//!
//! // A refused connection: SYN answered by RST/ACK.
//! let mut c = Conn::new("10.0.0.1:40000", "10.0.0.2:81");
//! c.client(F::SYN, 0);
//! c.server(F::RST | F::ACK, 0).seq = 0;
//! let cap = read_bytes(&c.pcap()).unwrap();
//! assert_eq!(cap.stats.tcp_segments, 2);
//! ```
//!
//! These are test helpers: they panic on impossible requests (more than 40
//! option bytes, an address literal that does not parse, an unsupported link
//! type), which is what a test wants.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use crate::event::{Dir, Family, Segment, TcpFlags, TcpOptions};

use super::format::tsresol_units;

/// Everything that ends up in one TCP segment on the wire.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SegmentSpec {
    pub ts_ns: u64,
    pub saddr: IpAddr,
    pub sport: u16,
    pub daddr: IpAddr,
    pub dport: u16,
    /// `TcpFlags::*` bits.
    pub flags: u8,
    pub seq: u32,
    pub ack: u32,
    pub win: u16,
    /// Payload bytes appended after the header (filled with `x`).
    pub payload_len: u32,
    /// Raw option bytes; padded with EOL to a multiple of 4 when built.
    pub options: Vec<u8>,
}

impl Default for SegmentSpec {
    /// 10.0.0.1:40000 → 10.0.0.2:80, no flags, window 64240.
    fn default() -> Self {
        SegmentSpec {
            ts_ns: 0,
            saddr: IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1)),
            sport: 40000,
            daddr: IpAddr::V4(Ipv4Addr::new(10, 0, 0, 2)),
            dport: 80,
            flags: 0,
            seq: 0,
            ack: 0,
            win: 64240,
            payload_len: 0,
            options: Vec::new(),
        }
    }
}

impl SegmentSpec {
    /// A segment from `src` to `dst` with the given flags, other fields as
    /// in [`Default`]; adjust the rest with struct-update syntax.
    pub fn new(src: SocketAddr, dst: SocketAddr, flags: u8) -> Self {
        SegmentSpec {
            saddr: src.ip(),
            sport: src.port(),
            daddr: dst.ip(),
            dport: dst.port(),
            flags,
            ..SegmentSpec::default()
        }
    }

    /// The segment [`super::read_bytes`] yields for this spec read from a
    /// classic pcap (pcapng: set `ifindex` to the interface id).
    pub fn expected(&self) -> Segment {
        Segment {
            ts_ns: self.ts_ns,
            ifindex: 0,
            iface: None,
            dir: Dir::Capture,
            family: Family::of(&self.saddr),
            saddr: self.saddr,
            sport: self.sport,
            daddr: self.daddr,
            dport: self.dport,
            flags: TcpFlags(self.flags),
            seq: self.seq,
            ack: self.ack,
            win: self.win,
            len: self.payload_len,
            options: TcpOptions::parse(&self.options),
            netns: 0,
        }
    }
}

/// Parses `"1.2.3.4:80"` or `"[::1]:80"`.
///
/// # Panics
/// On a malformed literal (test helper).
pub fn addr(s: &str) -> SocketAddr {
    s.parse()
        .unwrap_or_else(|e| panic!("bad socket address literal {s:?}: {e}"))
}

/// SYN options in the order Linux writes them (tcp_options_write): `mss`,
/// then `sackOK,TS` or `nop,nop,TS` or `nop,nop,sackOK`, then `nop,wscale`.
pub fn syn_options(mss: u16, wscale: Option<u8>, sack_ok: bool, ts: Option<(u32, u32)>) -> Vec<u8> {
    let mut o = vec![2, 4];
    o.extend(mss.to_be_bytes());
    match (ts, sack_ok) {
        (Some((val, ecr)), sack) => {
            o.extend(if sack { [4, 2] } else { [1, 1] });
            o.extend([8, 10]);
            o.extend(val.to_be_bytes());
            o.extend(ecr.to_be_bytes());
        }
        (None, true) => o.extend([1, 1, 4, 2]),
        (None, false) => {}
    }
    if let Some(ws) = wscale {
        o.extend([1, 3, 3, ws]);
    }
    o
}

/// `nop,nop,TS val ecr`, as Linux puts on every non-SYN segment once
/// timestamps are negotiated.
pub fn ts_option(val: u32, ecr: u32) -> Vec<u8> {
    let mut o = vec![1, 1, 8, 10];
    o.extend(val.to_be_bytes());
    o.extend(ecr.to_be_bytes());
    o
}

fn checksum_add(mut sum: u32, b: &[u8]) -> u32 {
    let mut chunks = b.chunks_exact(2);
    for c in &mut chunks {
        sum += u32::from(u16::from_be_bytes([c[0], c[1]]));
    }
    if let [last] = chunks.remainder() {
        sum += u32::from(*last) << 8;
    }
    sum
}

fn checksum_fold(mut sum: u32) -> u16 {
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// TCP header + options + payload, checksum filled in for the pseudo-header
/// of `s`'s addresses (so tcpdump -v reports "correct").
///
/// # Panics
/// If the options do not fit in the 40 bytes TCP allows.
pub fn tcp_segment(s: &SegmentSpec) -> Vec<u8> {
    let mut opts = s.options.clone();
    opts.resize(opts.len().div_ceil(4) * 4, 0);
    assert!(
        opts.len() <= 40,
        "{} option bytes do not fit in a TCP header",
        opts.len()
    );
    let doff = 20 + opts.len();
    let mut t = Vec::with_capacity(doff + s.payload_len as usize);
    t.extend(s.sport.to_be_bytes());
    t.extend(s.dport.to_be_bytes());
    t.extend(s.seq.to_be_bytes());
    t.extend(s.ack.to_be_bytes());
    t.push(((doff / 4) as u8) << 4);
    t.push(s.flags);
    t.extend(s.win.to_be_bytes());
    t.extend([0, 0, 0, 0]); // checksum, urgent pointer
    t.extend(opts);
    t.resize(doff + s.payload_len as usize, b'x');

    let mut sum = match (s.saddr, s.daddr) {
        (IpAddr::V4(a), IpAddr::V4(b)) => checksum_add(checksum_add(0, &a.octets()), &b.octets()),
        (a, b) => checksum_add(checksum_add(0, &v6(a).octets()), &v6(b).octets()),
    };
    sum = checksum_add(sum, &[0, 6]);
    sum = checksum_add(sum, &(t.len() as u32).to_be_bytes());
    sum = checksum_add(sum, &t);
    let c = checksum_fold(sum);
    t[16..18].copy_from_slice(&c.to_be_bytes());
    t
}

fn v6(a: IpAddr) -> std::net::Ipv6Addr {
    match a {
        IpAddr::V6(a) => a,
        IpAddr::V4(a) => a.to_ipv6_mapped(),
    }
}

/// The IP packet (IPv4 if both addresses are IPv4, else IPv6) carrying `s`.
/// A length that does not fit the 16-bit field is written as 0, as Linux
/// does for TSO super-packets seen by tcpdump on the sender.
pub fn ip_packet(s: &SegmentSpec) -> Vec<u8> {
    ipv6_packet_with_ext(s, &[])
}

/// Like [`ip_packet`], but an IPv6 packet gets the listed extension headers
/// (by next-header number: 0 hop-by-hop, 43 routing, 44 fragment, 51 AH,
/// 60 destination options; anything else becomes an 8-byte header of that
/// type) between the fixed header and TCP. IPv4 packets ignore `ext`.
pub fn ipv6_packet_with_ext(s: &SegmentSpec, ext: &[u8]) -> Vec<u8> {
    let tcp = tcp_segment(s);
    if let (IpAddr::V4(src), IpAddr::V4(dst)) = (s.saddr, s.daddr) {
        let total = u16::try_from(20 + tcp.len()).unwrap_or(0);
        let mut p = vec![0x45, 0];
        p.extend(total.to_be_bytes());
        p.extend([0, 0, 0x40, 0]); // id 0, DF
        p.extend([64, 6, 0, 0]);
        p.extend(src.octets());
        p.extend(dst.octets());
        let c = checksum_fold(checksum_add(0, &p));
        p[10..12].copy_from_slice(&c.to_be_bytes());
        p.extend(tcp);
        return p;
    }
    let mut exts = Vec::new();
    for (i, &kind) in ext.iter().enumerate() {
        let next = ext.get(i + 1).copied().unwrap_or(6);
        match kind {
            // AH: 4-octet units minus 2; 16 bytes keeps IPv6's 8-byte alignment.
            51 => {
                exts.extend([next, 2, 0, 0]);
                exts.extend([0; 12]);
            }
            // Fragment header: offset 0, M=1 (a first fragment).
            44 => exts.extend([next, 0, 0, 1, 0, 0, 0, 1]),
            // Routing type 0 with segments left 0, or options padded with PadN.
            43 => exts.extend([next, 0, 0, 0, 0, 0, 0, 0]),
            _ => exts.extend([next, 0, 1, 4, 0, 0, 0, 0]),
        }
    }
    let plen = u16::try_from(exts.len() + tcp.len()).unwrap_or(0);
    let first = ext.first().copied().unwrap_or(6);
    let mut p = vec![0x60, 0, 0, 0];
    p.extend(plen.to_be_bytes());
    p.extend([first, 64]);
    p.extend(v6(s.saddr).octets());
    p.extend(v6(s.daddr).octets());
    p.extend(exts);
    p.extend(tcp);
    p
}

fn ethertype(s: &SegmentSpec) -> [u8; 2] {
    match (s.saddr, s.daddr) {
        (IpAddr::V4(_), IpAddr::V4(_)) => [0x08, 0x00],
        _ => [0x86, 0xdd],
    }
}

const MAC_SRC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];
const MAC_DST: [u8; 6] = [0x02, 0, 0, 0, 0, 0x02];

/// Ethernet II frame (no FCS, no padding) carrying `s`.
pub fn ethernet_frame(s: &SegmentSpec) -> Vec<u8> {
    vlan_frame(s, &[])
}

/// Ethernet frame with VLAN tags, outermost first. With two tags the outer
/// one is 802.1ad (0x88a8), as on a QinQ trunk; otherwise 802.1Q (0x8100).
pub fn vlan_frame(s: &SegmentSpec, vids: &[u16]) -> Vec<u8> {
    let mut f = Vec::new();
    f.extend(MAC_DST);
    f.extend(MAC_SRC);
    for (i, vid) in vids.iter().enumerate() {
        let tpid: u16 = if i == 0 && vids.len() > 1 {
            0x88a8
        } else {
            0x8100
        };
        f.extend(tpid.to_be_bytes());
        f.extend((vid & 0x0fff).to_be_bytes());
    }
    f.extend(ethertype(s));
    f.extend(ip_packet(s));
    f
}

/// Linux cooked v1 (LINKTYPE_LINUX_SLL, 113), as "sent by us".
pub fn sll_frame(s: &SegmentSpec) -> Vec<u8> {
    let mut f = vec![0, 4, 0, 1, 0, 6]; // outgoing, ARPHRD_ETHER, 6-byte address
    f.extend(MAC_SRC);
    f.extend([0, 0]);
    f.extend(ethertype(s));
    f.extend(ip_packet(s));
    f
}

/// Linux cooked v2 (LINKTYPE_LINUX_SLL2, 276) on ifindex 2, "to us".
pub fn sll2_frame(s: &SegmentSpec) -> Vec<u8> {
    let mut f = ethertype(s).to_vec();
    f.extend([0, 0]);
    f.extend(2u32.to_be_bytes());
    f.extend([0, 1, 0, 6]); // ARPHRD_ETHER, host, 6-byte address
    f.extend(MAC_SRC);
    f.extend([0, 0]);
    f.extend(ip_packet(s));
    f
}

/// BSD loopback (LINKTYPE_NULL, 0) as macOS writes it: little-endian
/// AF_INET (2) or AF_INET6 (30).
pub fn null_frame(s: &SegmentSpec) -> Vec<u8> {
    let af: u32 = if ethertype(s) == [0x08, 0x00] { 2 } else { 30 };
    let mut f = af.to_le_bytes().to_vec();
    f.extend(ip_packet(s));
    f
}

/// The frame for `s` on any link type the reader supports.
///
/// # Panics
/// On a link type the reader does not support.
pub fn frame(linktype: u32, s: &SegmentSpec) -> Vec<u8> {
    match linktype {
        0 => null_frame(s),
        1 => ethernet_frame(s),
        12 | 14 | 101 | 228 | 229 => ip_packet(s),
        113 => sll_frame(s),
        276 => sll2_frame(s),
        other => panic!("build::frame: unsupported link type {other}"),
    }
}

/// Options for [`pcap_file_with`].
#[derive(Clone, Debug)]
pub struct PcapOpts {
    /// Nanosecond magic (a1b23c4d); microsecond timestamps otherwise.
    pub nanos: bool,
    pub big_endian: bool,
    /// Frames longer than this are cut, keeping their original length.
    pub snaplen: u32,
}

impl Default for PcapOpts {
    /// Nanosecond, little-endian, snaplen 262144: round-trips `ts_ns` exactly.
    fn default() -> Self {
        PcapOpts {
            nanos: true,
            big_endian: false,
            snaplen: 262_144,
        }
    }
}

/// Classic pcap with nanosecond timestamps, so `ts_ns` round-trips exactly.
pub fn pcap_file(frames: &[(u64, Vec<u8>)], linktype: u32) -> Vec<u8> {
    pcap_file_with(frames, linktype, &PcapOpts::default())
}

pub fn pcap_file_with(frames: &[(u64, Vec<u8>)], linktype: u32, o: &PcapOpts) -> Vec<u8> {
    let u32b = |v: u32| {
        if o.big_endian {
            v.to_be_bytes()
        } else {
            v.to_le_bytes()
        }
    };
    let magic: u32 = if o.nanos { 0xa1b2_3c4d } else { 0xa1b2_c3d4 };
    let mut out = u32b(magic).to_vec();
    let (major, minor) = (2u16, 4u16);
    for v in [major, minor] {
        out.extend(if o.big_endian {
            v.to_be_bytes()
        } else {
            v.to_le_bytes()
        });
    }
    out.extend(u32b(0)); // thiszone
    out.extend(u32b(0)); // sigfigs
    out.extend(u32b(o.snaplen));
    out.extend(u32b(linktype));
    for (ts, f) in frames {
        let sec = (ts / 1_000_000_000) as u32;
        let ns = (ts % 1_000_000_000) as u32;
        let frac = if o.nanos { ns } else { ns / 1000 };
        let cap = f.len().min(o.snaplen as usize);
        out.extend(u32b(sec));
        out.extend(u32b(frac));
        out.extend(u32b(cap as u32));
        out.extend(u32b(f.len() as u32));
        out.extend(&f[..cap]);
    }
    out
}

/// Ethernet frames for `specs`, stamped with their `ts_ns`.
pub fn ethernet_frames(specs: &[SegmentSpec]) -> Vec<(u64, Vec<u8>)> {
    frames(1, specs)
}

/// Frames on `linktype` for `specs`, stamped with their `ts_ns`.
pub fn frames(linktype: u32, specs: &[SegmentSpec]) -> Vec<(u64, Vec<u8>)> {
    specs
        .iter()
        .map(|s| (s.ts_ns, frame(linktype, s)))
        .collect()
}

/// The shortest path from specs to a readable file: Ethernet, classic pcap.
pub fn pcap_from_segments(specs: &[SegmentSpec]) -> Vec<u8> {
    pcap_file(&ethernet_frames(specs), 1)
}

/// One section, one interface (id 0) with nanosecond resolution, one EPB
/// per frame.
pub fn pcapng_file(frames: &[(u64, Vec<u8>)], linktype: u32) -> Vec<u8> {
    let mut w = PcapngWriter::new(false);
    w.interface(linktype, Some(9));
    for (ts, f) in frames {
        w.packet(0, *ts, f);
    }
    w.finish()
}

/// pcapng writer for tests that need several sections, interfaces,
/// resolutions or block kinds.
///
/// ```
/// use tcptrace::pcap::build::{ethernet_frame, PcapngWriter, SegmentSpec};
/// let f = ethernet_frame(&SegmentSpec::default());
/// let mut w = PcapngWriter::new(true); // big-endian section
/// w.interface(1, None); // id 0, microseconds
/// w.interface(1, Some(0x80 | 20)); // id 1, 2^-20 s
/// w.packet(1, 1_500_000_000, &f);
/// w.section(false); // new section: interface ids start again at 0
/// w.interface(1, Some(9));
/// w.simple_packet(&f);
/// let cap = tcptrace::pcap::read_bytes(&w.finish()).unwrap();
/// assert_eq!(cap.stats.tcp_segments, 2);
/// ```
#[derive(Clone, Debug)]
pub struct PcapngWriter {
    out: Vec<u8>,
    big_endian: bool,
    /// Ticks per second of each interface of the current section.
    units: Vec<u128>,
}

impl PcapngWriter {
    /// Starts the file with a section header in the given byte order.
    pub fn new(big_endian: bool) -> Self {
        let mut w = PcapngWriter {
            out: Vec::new(),
            big_endian,
            units: Vec::new(),
        };
        w.section(big_endian);
        w
    }

    fn u16b(&self, v: u16) -> [u8; 2] {
        if self.big_endian {
            v.to_be_bytes()
        } else {
            v.to_le_bytes()
        }
    }

    fn u32b(&self, v: u32) -> [u8; 4] {
        if self.big_endian {
            v.to_be_bytes()
        } else {
            v.to_le_bytes()
        }
    }

    /// Appends a block with any type and body (padded to 4 bytes); useful
    /// for unknown/custom blocks the reader must skip.
    pub fn raw_block(&mut self, block_type: u32, body: &[u8]) -> &mut Self {
        let padded = body.len().div_ceil(4) * 4;
        let len = (12 + padded) as u32;
        let mut b = self.u32b(block_type).to_vec();
        b.extend(self.u32b(len));
        b.extend(body);
        b.resize(8 + padded, 0);
        b.extend(self.u32b(len));
        self.out.extend(b);
        self
    }

    /// Starts a new section (SHB); later interface ids restart at 0.
    pub fn section(&mut self, big_endian: bool) -> &mut Self {
        self.big_endian = big_endian;
        self.units.clear();
        let mut body = self.u32b(0x1a2b_3c4d).to_vec();
        body.extend(self.u16b(1));
        body.extend(self.u16b(0));
        body.extend([0xff; 8]); // section length unknown
        self.raw_block(0x0a0d_0d0a, &body)
    }

    /// Describes the next interface (ids count from 0 per section).
    /// `tsresol` is the raw if_tsresol byte; `None` leaves the default (µs).
    ///
    /// # Panics
    /// If `tsresol` is finer than the reader supports.
    pub fn interface(&mut self, linktype: u32, tsresol: Option<u8>) -> &mut Self {
        let units = tsresol.map_or(1_000_000, |r| {
            tsresol_units(r).unwrap_or_else(|| panic!("if_tsresol {r:#x} unsupported"))
        });
        self.units.push(units);
        let mut body = self.u16b(linktype as u16).to_vec();
        body.extend([0, 0]);
        body.extend(self.u32b(0)); // snaplen: no limit
        if let Some(r) = tsresol {
            body.extend(self.u16b(9));
            body.extend(self.u16b(1));
            body.extend([r, 0, 0, 0]);
            body.extend([0, 0, 0, 0]); // opt_endofopt
        }
        self.raw_block(1, &body)
    }

    /// Enhanced Packet Block on interface `iface`.
    ///
    /// # Panics
    /// If `iface` has not been described in this section.
    pub fn packet(&mut self, iface: u32, ts_ns: u64, frame: &[u8]) -> &mut Self {
        let units = *self
            .units
            .get(iface as usize)
            .unwrap_or_else(|| panic!("interface {iface} not described in this section"));
        let ticks = (u128::from(ts_ns) * units / 1_000_000_000) as u64;
        let mut body = self.u32b(iface).to_vec();
        body.extend(self.u32b((ticks >> 32) as u32));
        body.extend(self.u32b(ticks as u32));
        body.extend(self.u32b(frame.len() as u32));
        body.extend(self.u32b(frame.len() as u32));
        body.extend(frame);
        self.raw_block(6, &body)
    }

    /// Simple Packet Block (implicitly interface 0, no timestamp).
    pub fn simple_packet(&mut self, frame: &[u8]) -> &mut Self {
        let mut body = self.u32b(frame.len() as u32).to_vec();
        body.extend(frame);
        self.raw_block(3, &body)
    }

    pub fn finish(&self) -> Vec<u8> {
        self.out.clone()
    }
}

/// One TCP connection seen from the wire, sequence numbers tracked for you.
///
/// Each `client`/`server` call appends one segment at the current clock,
/// then advances the clock by `step_ns`. `seq` is the sender's next
/// sequence number; `ack` (only with the ACK flag) is everything the peer
/// has sent so far. SYN and FIN consume one sequence number. The returned
/// `&mut SegmentSpec` lets a test bend any field (e.g. a RST with seq 0, or
/// a FIN that crosses the peer's FIN and so does not ack it).
#[derive(Clone, Debug)]
pub struct Conn {
    pub client: SocketAddr,
    pub server: SocketAddr,
    /// Next sequence number of the client and of the server.
    pub client_next: u32,
    pub server_next: u32,
    pub now_ns: u64,
    pub step_ns: u64,
    /// Options put on SYNs (Linux defaults: mss 1460, sackOK, wscale 7).
    pub syn_options: Vec<u8>,
    pub segments: Vec<SegmentSpec>,
}

/// Which end sends a segment.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    Client,
    Server,
}

impl Conn {
    /// Client ISN 1000, server ISN 5000, clock 1.7e18 ns (2023), 1 ms steps.
    ///
    /// # Panics
    /// If an address literal does not parse (`"10.0.0.1:40000"`,
    /// `"[2001:db8::1]:40000"`).
    pub fn new(client: &str, server: &str) -> Self {
        Self::between(addr(client), addr(server))
    }

    pub fn between(client: SocketAddr, server: SocketAddr) -> Self {
        Conn {
            client,
            server,
            client_next: 1000,
            server_next: 5000,
            now_ns: 1_700_000_000_000_000_000,
            step_ns: 1_000_000,
            syn_options: syn_options(1460, Some(7), true, None),
            segments: Vec::new(),
        }
    }

    /// Sets both initial sequence numbers.
    pub fn isn(mut self, client: u32, server: u32) -> Self {
        self.client_next = client;
        self.server_next = server;
        self
    }

    pub fn client(&mut self, flags: u8, payload_len: u32) -> &mut SegmentSpec {
        self.send(Side::Client, flags, payload_len)
    }

    pub fn server(&mut self, flags: u8, payload_len: u32) -> &mut SegmentSpec {
        self.send(Side::Server, flags, payload_len)
    }

    pub fn send(&mut self, side: Side, flags: u8, payload_len: u32) -> &mut SegmentSpec {
        let (src, dst, seq, peer_next) = match side {
            Side::Client => (self.client, self.server, self.client_next, self.server_next),
            Side::Server => (self.server, self.client, self.server_next, self.client_next),
        };
        let f = TcpFlags(flags);
        let consumed = payload_len
            .wrapping_add(u32::from(f.syn()))
            .wrapping_add(u32::from(f.fin()));
        match side {
            Side::Client => self.client_next = seq.wrapping_add(consumed),
            Side::Server => self.server_next = seq.wrapping_add(consumed),
        }
        let spec = SegmentSpec {
            ts_ns: self.now_ns,
            flags,
            seq,
            ack: if f.ack() { peer_next } else { 0 },
            win: if f.syn() { 64240 } else { 502 },
            payload_len,
            options: if f.syn() {
                self.syn_options.clone()
            } else {
                Vec::new()
            },
            ..SegmentSpec::new(src, dst, flags)
        };
        self.now_ns += self.step_ns;
        self.segments.push(spec);
        let last = self.segments.len() - 1;
        &mut self.segments[last]
    }

    /// SYN, SYN-ACK, ACK.
    pub fn handshake(&mut self) -> &mut Self {
        self.client(TcpFlags::SYN, 0);
        self.server(TcpFlags::SYN | TcpFlags::ACK, 0);
        self.client(TcpFlags::ACK, 0);
        self
    }

    /// Sends the last segment again, unchanged but for the time (a
    /// retransmission).
    ///
    /// # Panics
    /// If nothing was sent yet.
    pub fn resend(&mut self) -> &mut SegmentSpec {
        let mut again = self
            .segments
            .last()
            .cloned()
            .expect("Conn::resend before any segment");
        again.ts_ns = self.now_ns;
        self.now_ns += self.step_ns;
        self.segments.push(again);
        let last = self.segments.len() - 1;
        &mut self.segments[last]
    }

    /// Lets time pass without traffic.
    pub fn wait(&mut self, ns: u64) -> &mut Self {
        self.now_ns += ns;
        self
    }

    /// Ethernet, classic pcap (nanosecond timestamps).
    pub fn pcap(&self) -> Vec<u8> {
        pcap_from_segments(&self.segments)
    }

    /// The segments [`super::read_bytes`] will return, in order.
    pub fn expected(&self) -> Vec<Segment> {
        self.segments.iter().map(SegmentSpec::expected).collect()
    }
}
