//! One captured frame → one TCP [`Segment`], or the reason it is not one.
//!
//! Every length read from a header is checked against the bytes actually
//! present before use: captures are untrusted input.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use crate::event::{Dir, Family, Segment, TcpFlags, TcpOptions};

/// The link layers we can peel off to reach IP.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LinkType {
    /// BSD loopback: 4-byte address family in the *writer's* byte order.
    Null,
    /// OpenBSD loopback: like `Null` but always big-endian.
    Loop,
    Ethernet,
    /// Linux cooked capture v1 (`tcpdump -i any` before libpcap 1.10).
    LinuxSll,
    /// Linux cooked capture v2.
    LinuxSll2,
    /// Bare IPv4 or IPv6, version told by the first nibble.
    Raw,
    Ipv4,
    Ipv6,
}

impl LinkType {
    /// Maps a LINKTYPE_* value (the number stored in files). 12 and 14 are
    /// the platform DLT_RAW values some writers store instead of 101.
    pub fn from_linktype(code: u32) -> Option<Self> {
        Some(match code {
            0 => LinkType::Null,
            1 => LinkType::Ethernet,
            12 | 14 | 101 => LinkType::Raw,
            108 => LinkType::Loop,
            113 => LinkType::LinuxSll,
            228 => LinkType::Ipv4,
            229 => LinkType::Ipv6,
            276 => LinkType::LinuxSll2,
            _ => return None,
        })
    }
}

/// Why a frame produced no segment; each maps to one `CaptureStats` counter.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Skip {
    NonTcp,
    Truncated,
    Unsupported,
}

type R<T> = Result<T, Skip>;

const ETH_IPV4: u16 = 0x0800;
const ETH_IPV6: u16 = 0x86dd;
const ETH_VLAN: [u16; 3] = [0x8100, 0x88a8, 0x9100];
/// One 802.1Q tag plus one 802.1ad outer tag is what real networks use;
/// deeper stacks are rare enough that refusing them beats guessing.
const MAX_VLAN_TAGS: usize = 2;

const IPPROTO_TCP: u8 = 6;

fn be16(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_be_bytes(b.get(at..at + 2)?.try_into().ok()?))
}

fn be32(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_be_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

/// `orig_len`: the frame's length on the wire, of which `frame` is what the
/// snaplen kept.
pub(crate) fn segment(
    link: LinkType,
    frame: &[u8],
    orig_len: usize,
    ts_ns: u64,
    ifindex: u32,
) -> R<Segment> {
    let mut ip = match link {
        LinkType::Ethernet => {
            let et = be16(frame, 12).ok_or(Skip::Truncated)?;
            by_ethertype(et, frame.get(14..).ok_or(Skip::Truncated)?)?
        }
        LinkType::LinuxSll => {
            let et = be16(frame, 14).ok_or(Skip::Truncated)?;
            by_ethertype(et, frame.get(16..).ok_or(Skip::Truncated)?)?
        }
        LinkType::LinuxSll2 => {
            let et = be16(frame, 0).ok_or(Skip::Truncated)?;
            by_ethertype(et, frame.get(20..).ok_or(Skip::Truncated)?)?
        }
        LinkType::Null | LinkType::Loop => {
            let raw: [u8; 4] = frame
                .get(..4)
                .and_then(|b| b.try_into().ok())
                .ok_or(Skip::Truncated)?;
            let family = if link == LinkType::Loop {
                u32::from_be_bytes(raw)
            } else {
                // Written in the capturing host's byte order, which the file
                // does not record; AF_* values are small, so the reading
                // that yields a small number is the right one.
                let le = u32::from_le_bytes(raw);
                if le <= 0xffff {
                    le
                } else {
                    u32::from_be_bytes(raw)
                }
            };
            let rest = &frame[4..];
            match family {
                2 => ipv4(rest)?,
                // AF_INET6 on Linux, NetBSD/OpenBSD, FreeBSD, macOS.
                10 | 24 | 28 | 30 => ipv6(rest)?,
                _ => return Err(Skip::NonTcp),
            }
        }
        LinkType::Raw => match frame.first().map(|b| b >> 4) {
            None => return Err(Skip::Truncated),
            Some(4) => ipv4(frame)?,
            Some(6) => ipv6(frame)?,
            Some(_) => return Err(Skip::Unsupported),
        },
        LinkType::Ipv4 => ipv4(frame)?,
        LinkType::Ipv6 => ipv6(frame)?,
    };
    if ip.sized_by_frame {
        // What the snaplen cut off is part of the segment too.
        ip.tcp_len += orig_len.saturating_sub(frame.len());
    }
    tcp(ip, ts_ns, ifindex)
}

fn by_ethertype(mut et: u16, mut rest: &[u8]) -> R<Ip<'_>> {
    let mut tags = 0;
    while ETH_VLAN.contains(&et) {
        if tags == MAX_VLAN_TAGS {
            return Err(Skip::Unsupported);
        }
        et = be16(rest, 2).ok_or(Skip::Truncated)?;
        rest = &rest[4..];
        tags += 1;
    }
    match et {
        ETH_IPV4 => ipv4(rest),
        ETH_IPV6 => ipv6(rest),
        _ => Err(Skip::NonTcp),
    }
}

/// The IP layer's view of a TCP segment.
struct Ip<'a> {
    saddr: IpAddr,
    daddr: IpAddr,
    /// Captured bytes of the TCP segment (header onwards), never beyond what
    /// the IP header claims, so link-layer padding is not mistaken for data.
    tcp: &'a [u8],
    /// TCP header + payload length according to the IP header.
    tcp_len: usize,
    /// The IP header gave no length (0: a TSO/GSO super-packet or an IPv6
    /// jumbogram), so `tcp_len` is what the captured frame holds.
    sized_by_frame: bool,
}

fn ipv4(b: &[u8]) -> R<Ip<'_>> {
    if b.len() < 20 {
        return Err(Skip::Truncated);
    }
    if b[0] >> 4 != 4 {
        return Err(Skip::Unsupported);
    }
    let ihl = usize::from(b[0] & 0x0f) * 4;
    if ihl < 20 {
        return Err(Skip::Unsupported);
    }
    if b.len() < ihl {
        return Err(Skip::Truncated);
    }
    // A non-first fragment has no TCP header; its bytes would be misread
    // as one. A first fragment does start with the real header, so it is
    // decoded (its length then covers that fragment only).
    let frag_offset = u16::from_be_bytes([b[6], b[7]]) & 0x1fff;
    if frag_offset != 0 {
        return Err(Skip::Unsupported);
    }
    match b[9] {
        IPPROTO_TCP => {}
        // ESP may well hide TCP; we cannot tell, so do not call it non-TCP.
        50 => return Err(Skip::Unsupported),
        _ => return Err(Skip::NonTcp),
    }
    let total = usize::from(u16::from_be_bytes([b[2], b[3]]));
    let tcp_len = if total == 0 {
        // TSO/GSO super-packets captured on the sending host carry total
        // length 0 because the real one does not fit in 16 bits.
        b.len() - ihl
    } else {
        total.checked_sub(ihl).ok_or(Skip::Unsupported)?
    };
    let end = b.len().min(ihl + tcp_len);
    Ok(Ip {
        saddr: IpAddr::V4(Ipv4Addr::new(b[12], b[13], b[14], b[15])),
        daddr: IpAddr::V4(Ipv4Addr::new(b[16], b[17], b[18], b[19])),
        tcp: &b[ihl..end],
        tcp_len,
        sized_by_frame: total == 0,
    })
}

fn ipv6(b: &[u8]) -> R<Ip<'_>> {
    if b.len() < 40 {
        return Err(Skip::Truncated);
    }
    if b[0] >> 4 != 6 {
        return Err(Skip::Unsupported);
    }
    let addr = |at: usize| -> IpAddr {
        let mut a = [0u8; 16];
        a.copy_from_slice(&b[at..at + 16]);
        IpAddr::V6(Ipv6Addr::from(a))
    };
    let payload_len = usize::from(u16::from_be_bytes([b[4], b[5]]));
    let mut next = b[6];
    let mut rest = &b[40..];
    let mut ext_len = 0usize;
    // Each extension header is at least 8 bytes long, so this loop is
    // bounded by the frame size.
    while next != IPPROTO_TCP {
        let hdr_len = match next {
            // Hop-by-hop, routing, destination options: length in 8-octet
            // units not counting the first 8.
            0 | 43 | 60 => 8 * (usize::from(*rest.get(1).ok_or(Skip::Truncated)?) + 1),
            // AH counts 4-octet units not counting the first 8.
            51 => 4 * (usize::from(*rest.get(1).ok_or(Skip::Truncated)?) + 2),
            // Fragment, ESP, mobility, HIP, shim6, experimental: the TCP
            // header is absent, encrypted or behind something we do not parse.
            44 | 50 | 135 | 139 | 140 | 253 | 254 => return Err(Skip::Unsupported),
            _ => return Err(Skip::NonTcp),
        };
        if rest.len() < hdr_len {
            return Err(Skip::Truncated);
        }
        next = rest[0];
        rest = &rest[hdr_len..];
        ext_len += hdr_len;
    }
    let tcp_len = if payload_len == 0 {
        // Jumbogram or GSO super-packet: the real length is not in the header.
        rest.len()
    } else {
        payload_len.checked_sub(ext_len).ok_or(Skip::Unsupported)?
    };
    let end = rest.len().min(tcp_len);
    Ok(Ip {
        saddr: addr(8),
        daddr: addr(24),
        tcp: &rest[..end],
        tcp_len,
        sized_by_frame: payload_len == 0,
    })
}

fn tcp(ip: Ip<'_>, ts_ns: u64, ifindex: u32) -> R<Segment> {
    // A length the IP header itself says is too short is corruption, not a
    // short capture; check it before blaming the snaplen.
    if ip.tcp_len < 20 {
        return Err(Skip::Unsupported);
    }
    let t = ip.tcp;
    if t.len() < 20 {
        return Err(Skip::Truncated);
    }
    let doff = usize::from(t[12] >> 4) * 4;
    if doff < 20 || doff > ip.tcp_len {
        return Err(Skip::Unsupported);
    }
    let options = t.get(20..doff).ok_or(Skip::Truncated)?;
    let (Some(seq), Some(ack)) = (be32(t, 4), be32(t, 8)) else {
        return Err(Skip::Truncated);
    };
    Ok(Segment {
        ts_ns,
        ifindex,
        iface: None,
        dir: Dir::Capture,
        family: Family::of(&ip.saddr),
        saddr: ip.saddr,
        sport: u16::from_be_bytes([t[0], t[1]]),
        daddr: ip.daddr,
        dport: u16::from_be_bytes([t[2], t[3]]),
        flags: TcpFlags(t[13]),
        seq,
        ack,
        win: u16::from_be_bytes([t[14], t[15]]),
        len: u32::try_from(ip.tcp_len - doff).unwrap_or(u32::MAX),
        options: TcpOptions::parse(options),
        netns: 0,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// IPv4 header (20 bytes) + TCP header (20 bytes), 10.0.0.1:1 → 10.0.0.2:2.
    fn v4_tcp(total_len: u16, frag: u16, proto: u8) -> Vec<u8> {
        let mut p = vec![0x45, 0];
        p.extend(total_len.to_be_bytes());
        p.extend([0, 0]);
        p.extend(frag.to_be_bytes());
        p.extend([64, proto, 0, 0, 10, 0, 0, 1, 10, 0, 0, 2]);
        p.extend([0, 1, 0, 2, 0, 0, 0, 7, 0, 0, 0, 9, 0x50, 0x10, 0x01, 0x00]);
        p.extend([0, 0, 0, 0]);
        p
    }

    #[test]
    fn ipv4_length_rules() {
        let s = segment(LinkType::Raw, &v4_tcp(40, 0, 6), 0, 0, 0).expect("tcp");
        assert_eq!((s.seq, s.ack, s.len, s.win), (7, 9, 0, 256));
        // Non-first fragment.
        let e = segment(LinkType::Raw, &v4_tcp(40, 0x0001, 6), 0, 0, 0);
        assert_eq!(e, Err(Skip::Unsupported));
        // First fragment with MF set is decoded.
        assert!(segment(LinkType::Raw, &v4_tcp(40, 0x2000, 6), 0, 0, 0).is_ok());
        assert_eq!(
            segment(LinkType::Raw, &v4_tcp(40, 0, 17), 0, 0, 0),
            Err(Skip::NonTcp)
        );
        // Total length shorter than the headers it must contain.
        assert_eq!(
            segment(LinkType::Raw, &v4_tcp(30, 0, 6), 0, 0, 0),
            Err(Skip::Unsupported)
        );
        assert_eq!(
            segment(LinkType::Raw, &v4_tcp(19, 0, 6), 0, 0, 0),
            Err(Skip::Unsupported)
        );
        // Total length 0: fall back to what was captured.
        let mut p = v4_tcp(0, 0, 6);
        p.extend([0; 100]);
        assert_eq!(segment(LinkType::Ipv4, &p, 0, 0, 0).map(|s| s.len), Ok(100));
    }

    #[test]
    fn short_frames_are_truncated_never_panics() {
        let p = v4_tcp(40, 0, 6);
        for cut in 0..p.len() {
            assert_eq!(
                segment(LinkType::Raw, &p[..cut], 0, 0, 0),
                Err(Skip::Truncated),
                "cut {cut}"
            );
        }
        for link in [
            LinkType::Null,
            LinkType::Loop,
            LinkType::Ethernet,
            LinkType::LinuxSll,
            LinkType::LinuxSll2,
            LinkType::Ipv4,
            LinkType::Ipv6,
        ] {
            for cut in 0..4 {
                assert!(segment(link, &[0u8; 4][..cut], 0, 0, 0).is_err());
            }
        }
    }

    #[test]
    fn null_family_in_either_byte_order() {
        let mut le = 2u32.to_le_bytes().to_vec();
        le.extend(v4_tcp(40, 0, 6));
        assert!(segment(LinkType::Null, &le, 0, 0, 0).is_ok());
        let mut be = 2u32.to_be_bytes().to_vec();
        be.extend(v4_tcp(40, 0, 6));
        assert!(segment(LinkType::Null, &be, 0, 0, 0).is_ok());
        assert!(segment(LinkType::Loop, &be, 0, 0, 0).is_ok());
    }

    #[test]
    fn three_vlan_tags_are_unsupported() {
        let mut f = vec![0u8; 12];
        for _ in 0..3 {
            f.extend([0x81, 0x00, 0x00, 0x05]);
        }
        f.extend([0x08, 0x00]);
        f.extend(v4_tcp(40, 0, 6));
        assert_eq!(
            segment(LinkType::Ethernet, &f, 0, 0, 0),
            Err(Skip::Unsupported)
        );
    }
}
