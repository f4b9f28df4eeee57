//! The decoded event stream every stage after `decode` works on, whether it
//! came from the kernel (live) or from a capture file (pcap).

use std::borrow::Cow;
use std::fmt;
use std::net::IpAddr;
use std::sync::Arc;

use serde::Serialize;

/// TCP states with the kernel's numbering (include/net/tcp_states.h), named
/// as in RFC 9293 / the kernel without the `TCP_` prefix.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum TcpState {
    Established,
    SynSent,
    SynRecv,
    FinWait1,
    FinWait2,
    TimeWait,
    Close,
    CloseWait,
    LastAck,
    Listen,
    Closing,
    NewSynRecv,
    BoundInactive,
    Unknown(u8),
}

impl TcpState {
    /// The states the kernel defines, in its numbering from 1.
    pub const KNOWN: [TcpState; 13] = {
        use TcpState::*;
        [
            Established,
            SynSent,
            SynRecv,
            FinWait1,
            FinWait2,
            TimeWait,
            Close,
            CloseWait,
            LastAck,
            Listen,
            Closing,
            NewSynRecv,
            BoundInactive,
        ]
    };

    pub fn from_kernel(v: u8) -> Self {
        let known = usize::from(v)
            .checked_sub(1)
            .and_then(|i| Self::KNOWN.get(i));
        known.copied().unwrap_or(TcpState::Unknown(v))
    }

    pub fn name(self) -> &'static str {
        use TcpState::*;
        match self {
            Established => "ESTABLISHED",
            SynSent => "SYN_SENT",
            SynRecv => "SYN_RECV",
            FinWait1 => "FIN_WAIT1",
            FinWait2 => "FIN_WAIT2",
            TimeWait => "TIME_WAIT",
            Close => "CLOSE",
            CloseWait => "CLOSE_WAIT",
            LastAck => "LAST_ACK",
            Listen => "LISTEN",
            Closing => "CLOSING",
            NewSynRecv => "NEW_SYN_RECV",
            BoundInactive => "BOUND_INACTIVE",
            Unknown(_) => "UNKNOWN",
        }
    }
}

impl fmt::Display for TcpState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl Serialize for TcpState {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.name())
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Family {
    Ipv4,
    Ipv6,
}

impl Family {
    pub fn of(addr: &IpAddr) -> Self {
        match addr {
            IpAddr::V4(_) => Family::Ipv4,
            IpAddr::V6(_) => Family::Ipv6,
        }
    }

    /// As serialised (`rename_all = "lowercase"`), for hand-written JSON.
    pub fn name(self) -> &'static str {
        match self {
            Family::Ipv4 => "ipv4",
            Family::Ipv6 => "ipv6",
        }
    }
}

/// Where a segment was seen: leaving (egress) or entering (ingress) the host
/// or namespace whose interface the program sat on. A capture file has no
/// direction: `Capture`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Dir {
    Ingress,
    Egress,
    Capture,
}

impl Dir {
    /// As serialised (`rename_all = "lowercase"`), for hand-written JSON.
    pub fn name(self) -> &'static str {
        match self {
            Dir::Ingress => "ingress",
            Dir::Egress => "egress",
            Dir::Capture => "capture",
        }
    }
}

/// The TCP flags byte, printed with tcpdump's letters.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct TcpFlags(pub u8);

impl TcpFlags {
    pub const FIN: u8 = 0x01;
    pub const SYN: u8 = 0x02;
    pub const RST: u8 = 0x04;
    pub const PSH: u8 = 0x08;
    pub const ACK: u8 = 0x10;
    pub const URG: u8 = 0x20;
    pub const ECE: u8 = 0x40;
    pub const CWR: u8 = 0x80;

    pub fn has(self, bit: u8) -> bool {
        self.0 & bit != 0
    }
    pub fn syn(self) -> bool {
        self.has(Self::SYN)
    }
    pub fn fin(self) -> bool {
        self.has(Self::FIN)
    }
    pub fn rst(self) -> bool {
        self.has(Self::RST)
    }
    pub fn ack(self) -> bool {
        self.has(Self::ACK)
    }

    /// tcpdump's letters in its order: F S R P . U E W (`S.` for SYN-ACK,
    /// `.` for a bare ACK), `none` without flags. Written into `buf` in one
    /// go: every event line prints them, a formatter call per letter showed.
    pub fn tcpdump(self, buf: &mut [u8; 8]) -> &str {
        const LETTERS: [(u8, u8); 8] = [
            (TcpFlags::FIN, b'F'),
            (TcpFlags::SYN, b'S'),
            (TcpFlags::RST, b'R'),
            (TcpFlags::PSH, b'P'),
            (TcpFlags::ACK, b'.'),
            (TcpFlags::URG, b'U'),
            (TcpFlags::ECE, b'E'),
            (TcpFlags::CWR, b'W'),
        ];
        if self.0 == 0 {
            return "none";
        }
        let mut len = 0;
        for (bit, c) in LETTERS {
            if self.has(bit) {
                buf[len] = c;
                len += 1;
            }
        }
        std::str::from_utf8(&buf[..len]).expect("ASCII letters")
    }
}

impl fmt::Display for TcpFlags {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.tcpdump(&mut [0; 8]))
    }
}

impl Serialize for TcpFlags {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// The TCP options users read in tcpdump; absent ones stay `None`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct TcpOptions {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mss: Option<u16>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub wscale: Option<u8>,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub sack_ok: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tsval: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tsecr: Option<u32>,
}

impl TcpOptions {
    /// Decodes the option bytes after the fixed 20-byte TCP header. Stops at
    /// EOL or at the first malformed option (as tcpdump marks `[bad opt]`),
    /// keeping what was decoded before it.
    pub fn parse(mut b: &[u8]) -> Self {
        let mut o = TcpOptions::default();
        while let Some(&kind) = b.first() {
            match kind {
                0 => break,
                1 => {
                    b = &b[1..];
                    continue;
                }
                _ => {}
            }
            let Some(&len) = b.get(1) else { break };
            let len = len as usize;
            if len < 2 || len > b.len() {
                break;
            }
            let body = &b[2..len];
            match (kind, body.len()) {
                (2, 2) => o.mss = Some(u16::from_be_bytes([body[0], body[1]])),
                (3, 1) => o.wscale = Some(body[0]),
                (4, 0) => o.sack_ok = true,
                (8, 8) => {
                    o.tsval = Some(u32::from_be_bytes([body[0], body[1], body[2], body[3]]));
                    o.tsecr = Some(u32::from_be_bytes([body[4], body[5], body[6], body[7]]));
                }
                _ => {}
            }
            b = &b[len..];
        }
        o
    }

    pub fn is_empty(&self) -> bool {
        *self == TcpOptions::default()
    }
}

impl fmt::Display for TcpOptions {
    /// As tcpdump prints them: `mss 1460,sackOK,TS val 1 ecr 0,wscale 7`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut first = true;
        let mut sep = |f: &mut fmt::Formatter<'_>| {
            if std::mem::take(&mut first) {
                Ok(())
            } else {
                f.write_str(",")
            }
        };
        if let Some(m) = self.mss {
            sep(f)?;
            write!(f, "mss {m}")?;
        }
        if self.sack_ok {
            sep(f)?;
            f.write_str("sackOK")?;
        }
        if let (Some(v), Some(e)) = (self.tsval, self.tsecr) {
            sep(f)?;
            write!(f, "TS val {v} ecr {e}")?;
        }
        if let Some(w) = self.wscale {
            sep(f)?;
            write!(f, "wscale {w}")?;
        }
        Ok(())
    }
}

/// A task's command name as the kernel keeps it (`TASK_COMM_LEN`: 16 bytes,
/// NUL-padded). Inline and `Copy`: every state change and every kernel step
/// carries one, and a `String` there was an allocation per event and per
/// step. Bytes that are not UTF-8 print as U+FFFD, as they always did.
#[derive(Clone, Copy, Default, PartialEq, Eq)]
pub struct Comm([u8; 16]);

impl Comm {
    /// The kernel's bytes up to the first NUL (at most 16).
    pub fn from_kernel(raw: &[u8]) -> Comm {
        let len = raw
            .iter()
            .position(|&c| c == 0)
            .unwrap_or(raw.len())
            .min(16);
        let mut b = [0; 16];
        b[..len].copy_from_slice(&raw[..len]);
        Comm(b)
    }

    pub fn as_str(&self) -> Cow<'_, str> {
        let b = self.as_bytes();
        // Valid UTF-8 (nearly every comm is ASCII) is borrowed without
        // going through the lossy decoder, a visible share of every line.
        match std::str::from_utf8(b) {
            Ok(s) => Cow::Borrowed(s),
            Err(_) => String::from_utf8_lossy(b),
        }
    }

    /// The bytes up to the first NUL.
    pub fn as_bytes(&self) -> &[u8] {
        let len = self.0.iter().position(|&c| c == 0).unwrap_or(16);
        &self.0[..len]
    }
}

impl From<&str> for Comm {
    fn from(s: &str) -> Comm {
        Comm::from_kernel(s.as_bytes())
    }
}

impl PartialEq<&str> for Comm {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}

impl fmt::Display for Comm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(&self.as_str())
    }
}

impl fmt::Debug for Comm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.as_str(), f)
    }
}

impl Serialize for Comm {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.as_str())
    }
}

/// One call of `sock:inet_sock_set_state` for a TCP socket.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct StateChange {
    pub ts_ns: u64,
    /// The kernel's `struct sock *`, identifies the socket for its lifetime.
    #[serde(serialize_with = "hex_addr")]
    pub skaddr: u64,
    pub pid: u32,
    pub comm: Comm,
    pub family: Family,
    pub saddr: IpAddr,
    pub sport: u16,
    pub daddr: IpAddr,
    pub dport: u16,
    pub oldstate: TcpState,
    pub newstate: TcpState,
    /// Time spent in `oldstate`; 0 when the socket was not seen entering it.
    pub prev_state_ns: u64,
    /// Network namespace inode.
    pub netns: u32,
    /// At → CLOSE, the socket's 64-bit counters: bytes it sent that the
    /// peer acknowledged, and bytes it received (`tcp_sock.bytes_acked`,
    /// `bytes_received`); absent on other transitions and from captures.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bytes_acked: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bytes_received: Option<u64>,
}

fn is_zero(v: &u32) -> bool {
    *v == 0
}

/// A kernel address as `0x…`, the way the kernel's tracepoints print it.
pub(crate) fn hex_addr<S: serde::Serializer>(v: &u64, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(&format_args!("{v:#x}"))
}

/// One TCP segment, from a TC classifier or a capture file.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Segment {
    pub ts_ns: u64,
    pub ifindex: u32,
    /// Interface name when known (live); absent for capture files.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub iface: Option<Arc<str>>,
    pub dir: Dir,
    pub family: Family,
    pub saddr: IpAddr,
    pub sport: u16,
    pub daddr: IpAddr,
    pub dport: u16,
    pub flags: TcpFlags,
    /// Absolute, as on the wire.
    pub seq: u32,
    pub ack: u32,
    /// Raw window field, not scaled.
    pub win: u16,
    /// Payload bytes.
    pub len: u32,
    pub options: TcpOptions,
    /// Network namespace inode of the interface (live); 0 (omitted) for capture files.
    #[serde(skip_serializing_if = "is_zero")]
    pub netns: u32,
}

/// Serialises as one JSON object tagged with its kind, `"type"` first:
/// `{"type":"state",…}` or `{"type":"segment",…}`.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum Event {
    State(StateChange),
    Segment(Segment),
}

impl Event {
    pub fn ts_ns(&self) -> u64 {
        match self {
            Event::State(s) => s.ts_ns,
            Event::Segment(s) => s.ts_ns,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_print_like_tcpdump() {
        let cases = [
            (TcpFlags::SYN, "S"),
            (TcpFlags::SYN | TcpFlags::ACK, "S."),
            (TcpFlags::ACK, "."),
            (TcpFlags::PSH | TcpFlags::ACK, "P."),
            (TcpFlags::FIN | TcpFlags::ACK, "F."),
            (TcpFlags::FIN | TcpFlags::PSH | TcpFlags::ACK, "FP."),
            (TcpFlags::RST, "R"),
            (TcpFlags::RST | TcpFlags::ACK, "R."),
            (TcpFlags::SYN | TcpFlags::ECE | TcpFlags::CWR, "SEW"),
        ];
        for (bits, want) in cases {
            assert_eq!(TcpFlags(bits).to_string(), want, "flags {bits:#x}");
        }
    }

    /// include/net/tcp_states.h numbers its states from 1.
    #[test]
    fn states_numbered_as_the_kernel() {
        use TcpState::*;
        let cases = [
            (0, Unknown(0)),
            (1, Established),
            (2, SynSent),
            (7, Close),
            (10, Listen),
            (13, BoundInactive),
            (14, Unknown(14)),
        ];
        for (v, want) in cases {
            assert_eq!(TcpState::from_kernel(v), want, "{v}");
        }
    }

    #[test]
    fn comm_prints_as_the_kernel_bytes_did() {
        assert_eq!(Comm::from_kernel(b"curl\0\0stale"), "curl");
        assert_eq!(Comm::from_kernel(b"0123456789abcdef"), "0123456789abcdef");
        assert_eq!(Comm::from_kernel(&[b'a', 0xff, 0]).to_string(), "a\u{fffd}");
        assert_eq!(format!("[{:<6}]", Comm::from("sh")), "[sh    ]");
    }

    #[test]
    fn options_of_a_linux_syn() {
        // mss 1460,sackOK,TS val 3 ecr 0,nop,wscale 7
        let b = [
            2, 4, 5, 180, 4, 2, 8, 10, 0, 0, 0, 3, 0, 0, 0, 0, 1, 3, 3, 7,
        ];
        let o = TcpOptions::parse(&b);
        assert_eq!(o.mss, Some(1460));
        assert!(o.sack_ok);
        assert_eq!((o.tsval, o.tsecr), (Some(3), Some(0)));
        assert_eq!(o.wscale, Some(7));
        assert_eq!(o.to_string(), "mss 1460,sackOK,TS val 3 ecr 0,wscale 7");
    }

    #[test]
    fn malformed_option_keeps_what_came_before() {
        let b = [2, 4, 5, 180, 8, 40, 0];
        let o = TcpOptions::parse(&b);
        assert_eq!(o.mss, Some(1460));
        assert_eq!(o.tsval, None);
        assert_eq!(TcpOptions::parse(&[3]).wscale, None);
        assert_eq!(TcpOptions::parse(&[3, 0]).wscale, None);
    }
}
