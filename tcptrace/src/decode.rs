//! Stage 3: kernel records (`tcptrace-common`, byte for byte as the eBPF side
//! wrote them) → [`Event`]s.
use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::Arc;

use tcptrace_common::{SegmentEvent, StateEvent, AF_INET, DIR_EGRESS, EVENT_SEGMENT, EVENT_STATE};

use crate::event::{
    Comm, Dir, Event, Family, Segment, StateChange, TcpFlags, TcpOptions, TcpState,
};

/// Interface names by (netns inode, ifindex), known from attach time. Shared,
/// not copied, into every segment: a `String` per segment was an allocation.
pub type IfaceNames = HashMap<(u32, u32), Arc<str>>;

#[derive(Debug, PartialEq, Eq)]
pub enum DecodeError {
    Empty,
    UnknownKind(u8),
    Short { kind: u8, len: usize },
}

impl std::fmt::Display for DecodeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DecodeError::Empty => write!(f, "empty record"),
            DecodeError::UnknownKind(k) => write!(f, "unknown record kind {k}"),
            DecodeError::Short { kind, len } => {
                write!(f, "record of kind {kind} is {len} bytes, too short")
            }
        }
    }
}

fn read<T: Copy>(buf: &[u8], kind: u8) -> Result<T, DecodeError> {
    if buf.len() < std::mem::size_of::<T>() {
        return Err(DecodeError::Short {
            kind,
            len: buf.len(),
        });
    }
    // SAFETY: length checked; T is a plain #[repr(C)] record, any bits valid.
    Ok(unsafe { std::ptr::read_unaligned(buf.as_ptr() as *const T) })
}

fn addr(family: u16, b: &[u8; 16]) -> IpAddr {
    if family == AF_INET {
        IpAddr::V4(Ipv4Addr::new(b[0], b[1], b[2], b[3]))
    } else {
        IpAddr::V6(Ipv6Addr::from(*b))
    }
}

fn family(f: u16) -> Family {
    if f == AF_INET {
        Family::Ipv4
    } else {
        Family::Ipv6
    }
}

pub fn decode(buf: &[u8], names: &IfaceNames) -> Result<Event, DecodeError> {
    match buf.first() {
        None => Err(DecodeError::Empty),
        Some(&EVENT_STATE) => {
            let r: StateEvent = read(buf, EVENT_STATE)?;
            // Without a known owner the kernel side reports whichever task
            // the softirq interrupted (the peer's process, on loopback):
            // not this socket's owner, so none is given (pid 0). That is a
            // socket first seen after tcptrace started, in softirq: opened
            // before it, or a child of a listener that was.
            let (pid, comm) = if r.owner_known != 0 {
                (r.pid, Comm::from_kernel(&r.comm))
            } else {
                (0, Comm::from(""))
            };
            Ok(Event::State(StateChange {
                ts_ns: r.ts_ns,
                skaddr: r.skaddr,
                pid,
                comm,
                family: family(r.family),
                saddr: addr(r.family, &r.saddr),
                sport: r.sport,
                daddr: addr(r.family, &r.daddr),
                dport: r.dport,
                oldstate: TcpState::from_kernel(r.oldstate),
                newstate: TcpState::from_kernel(r.newstate),
                prev_state_ns: r.prev_state_ns,
                netns: r.netns,
                bytes_acked: (r.counters != 0).then_some(r.bytes_acked),
                bytes_received: (r.counters != 0).then_some(r.bytes_received),
            }))
        }
        Some(&EVENT_SEGMENT) => {
            let r: SegmentEvent = read(buf, EVENT_SEGMENT)?;
            let opt_len = (r.opt_len as usize).min(r.options.len());
            Ok(Event::Segment(Segment {
                ts_ns: r.ts_ns,
                ifindex: r.ifindex,
                iface: names.get(&(r.netns, r.ifindex)).cloned(),
                dir: if r.dir == DIR_EGRESS {
                    Dir::Egress
                } else {
                    Dir::Ingress
                },
                family: family(r.family),
                saddr: addr(r.family, &r.saddr),
                sport: r.sport,
                daddr: addr(r.family, &r.daddr),
                dport: r.dport,
                flags: TcpFlags(r.flags),
                seq: r.seq,
                ack: r.ack,
                win: r.win,
                len: r.len,
                options: TcpOptions::parse(&r.options[..opt_len]),
                netns: r.netns,
            }))
        }
        Some(&k) => Err(DecodeError::UnknownKind(k)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tcptrace_common::AF_INET6;

    fn bytes<T>(v: &T) -> Vec<u8> {
        // SAFETY: viewing a plain record as bytes.
        unsafe {
            std::slice::from_raw_parts(v as *const T as *const u8, std::mem::size_of::<T>())
                .to_vec()
        }
    }

    #[test]
    fn state_record_round_trip() {
        let mut saddr = [0u8; 16];
        saddr[..4].copy_from_slice(&[127, 0, 0, 1]);
        let mut comm = [0u8; 16];
        comm[..4].copy_from_slice(b"curl");
        let r = StateEvent {
            kind: EVENT_STATE,
            oldstate: 2,
            newstate: 1,
            owner_known: 1,
            family: AF_INET,
            sport: 40000,
            dport: 80,
            counters: 0,
            _pad0: 0,
            pid: 42,
            ts_ns: 7,
            skaddr: 0xffff_8880_1234_5678,
            prev_state_ns: 140_000,
            netns: 4026531840,
            _pad1: 0,
            saddr,
            daddr: saddr,
            comm,
            bytes_acked: 7,
            bytes_received: 9,
        };
        let Event::State(s) = decode(&bytes(&r), &IfaceNames::new()).unwrap() else {
            panic!("not a state")
        };
        assert_eq!(
            (s.oldstate, s.newstate),
            (TcpState::SynSent, TcpState::Established)
        );
        assert_eq!(s.comm, "curl");
        assert_eq!(s.saddr.to_string(), "127.0.0.1");
        assert_eq!(
            (s.sport, s.dport, s.pid, s.netns),
            (40000, 80, 42, 4026531840)
        );
        let json = serde_json::to_value(&s).unwrap();
        assert_eq!(json["skaddr"], "0xffff888012345678");
        assert_eq!(json["oldstate"], "SYN_SENT");
        assert_eq!(json["family"], "ipv4");
        // Counters only where the kernel side filled them in.
        assert_eq!((s.bytes_acked, s.bytes_received), (None, None));
        assert!(json.get("bytes_acked").is_none());
        let closed = StateEvent {
            oldstate: 9,
            newstate: 7,
            counters: 1,
            bytes_acked: 5_000_000_000,
            bytes_received: 1,
            ..r
        };
        let Event::State(c) = decode(&bytes(&closed), &IfaceNames::new()).unwrap() else {
            panic!("not a state")
        };
        assert_eq!(
            (c.bytes_acked, c.bytes_received),
            (Some(5_000_000_000), Some(1))
        );
        // No owner seen: the task the kernel side reported is not given.
        let unknown = StateEvent {
            owner_known: 0,
            ..r
        };
        let Event::State(s) = decode(&bytes(&unknown), &IfaceNames::new()).unwrap() else {
            panic!("not a state")
        };
        assert_eq!((s.pid, s.comm.to_string()), (0, String::new()));
    }

    #[test]
    fn segment_record_with_options() {
        let mut options = [0u8; 40];
        options[..4].copy_from_slice(&[2, 4, 0xff, 0xd7]);
        let r = SegmentEvent {
            kind: EVENT_SEGMENT,
            dir: DIR_EGRESS,
            flags: 0x12,
            opt_len: 4,
            family: AF_INET6,
            sport: 80,
            dport: 50000,
            win: 65483,
            ifindex: 1,
            ts_ns: 9,
            seq: 1,
            ack: 2,
            len: 0,
            netns: 5,
            saddr: Ipv6Addr::LOCALHOST.octets(),
            daddr: Ipv6Addr::LOCALHOST.octets(),
            options,
        };
        let names = IfaceNames::from([((5, 1), "lo".into())]);
        let Event::Segment(s) = decode(&bytes(&r), &names).unwrap() else {
            panic!("not a segment")
        };
        assert_eq!(s.flags.to_string(), "S.");
        assert_eq!(s.options.mss, Some(65495));
        assert_eq!(s.iface.as_deref(), Some("lo"));
        assert_eq!(s.saddr.to_string(), "::1");
    }

    #[test]
    fn bad_records_are_errors() {
        let names = IfaceNames::new();
        assert_eq!(decode(&[], &names), Err(DecodeError::Empty));
        assert_eq!(decode(&[9, 0, 0], &names), Err(DecodeError::UnknownKind(9)));
        assert!(matches!(
            decode(&[EVENT_STATE, 0], &names),
            Err(DecodeError::Short { .. })
        ));
    }
}
