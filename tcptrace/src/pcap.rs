//! Capture files (classic pcap and pcapng) → the same [`Event`] stream the
//! live tracer produces, so everything after decoding works without root.
//!
//! Only TCP segments become events. Everything else a capture holds is
//! counted in [`CaptureStats`] instead of being dropped silently, because a
//! user staring at "no connections found" needs to know whether the file held
//! UDP, truncated frames or fragments.
//!
//! A structurally broken file (bad magic, a record running past the end, a
//! pcapng block whose trailer disagrees with its header, …) is an error that
//! names the byte offset, and [`read_partial`] keeps the packets before it
//! (a capture cut short); a broken *packet* inside a sound file is only
//! counted, as tcpdump prints what it can and moves on.

use std::fmt;
use std::path::Path;

use anyhow::Context;
use serde::Serialize;

use crate::event::Event;

pub mod build;
mod decode;
mod format;

pub use decode::LinkType;

/// Larger than any real link MTU or TSO/GRO super-packet; a caplen above it
/// means the record header is garbage, and refusing it early keeps a corrupt
/// file from making us treat megabytes of noise as one packet.
pub const MAX_CAPLEN: u32 = 256 * 1024;

/// The decoded capture: TCP segments in file order, plus what was skipped.
#[derive(Debug, Clone)]
pub struct Capture {
    pub events: Vec<Event>,
    pub stats: CaptureStats,
}

#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize)]
pub struct CaptureStats {
    /// Packet records read (pcap records, pcapng EPB/SPB/PB blocks).
    pub packets: u64,
    /// Packets that became an [`Event::Segment`].
    pub tcp_segments: u64,
    /// Well-formed IP packets carrying something other than TCP, or link
    /// frames carrying something other than IP (ARP, LLDP, …).
    pub skipped_non_tcp: u64,
    /// Frames cut short by the snaplen before the end of the TCP header.
    pub skipped_truncated: u64,
    /// Packets we cannot decode faithfully: non-first IPv4 fragments, IPv6
    /// fragment/ESP headers, malformed IP/TCP headers, stacked VLAN tags
    /// beyond two, unknown IP versions.
    pub skipped_unsupported: u64,
}

/// Why a capture file could not be read, and where.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PcapError {
    /// Byte offset into the file of the field or record that was wrong.
    pub offset: u64,
    pub msg: String,
}

impl PcapError {
    pub(crate) fn new(offset: usize, msg: impl Into<String>) -> Self {
        PcapError {
            offset: offset as u64,
            msg: msg.into(),
        }
    }
}

impl fmt::Display for PcapError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "at byte offset {}: {}", self.offset, self.msg)
    }
}

impl std::error::Error for PcapError {}

/// Reads a whole capture file. Errors name the file (`{:#}` also shows the
/// offset and cause from the underlying [`PcapError`]).
pub fn read_file(path: &Path) -> anyhow::Result<Capture> {
    let file = CaptureFile::open(path)
        .with_context(|| format!("cannot read capture file {}", path.display()))?;
    read_bytes(file.bytes()).with_context(|| format!("bad capture file {}", path.display()))
}

/// Decodes a capture held in memory, every segment collected; the format is
/// told by its magic number. [`CaptureFile::read_each`] streams a file.
pub fn read_bytes(data: &[u8]) -> Result<Capture, PcapError> {
    match read_partial(data) {
        (c, None) => Ok(c),
        (_, Some(e)) => Err(e),
    }
}

/// Decodes what a capture holds up to where it breaks, and the error there:
/// a capture still being written, or killed mid-write, ends inside a
/// record, and tcpdump too shows the packets before it.
pub fn read_partial(data: &[u8]) -> (Capture, Option<PcapError>) {
    let mut events = Vec::new();
    let (stats, broken) = read_each(data, &mut |ev| {
        events.push(ev);
        true
    });
    (Capture { events, stats }, broken)
}

/// Decodes a capture, handing each TCP segment to `on` as it is read, so
/// that a capture larger than memory streams through; `on` returns false
/// to stop reading. Returns what was counted, and the error where the
/// file breaks, if it does (as [`read_partial`]).
pub fn read_each(
    data: &[u8],
    on: &mut dyn FnMut(Event) -> bool,
) -> (CaptureStats, Option<PcapError>) {
    read_into(data, on, None)
}

fn read_into(
    data: &[u8],
    on: &mut dyn FnMut(Event) -> bool,
    behind: Option<DropBehind>,
) -> (CaptureStats, Option<PcapError>) {
    let mut sink = Sink {
        on,
        stopped: false,
        stats: CaptureStats::default(),
        behind,
    };
    let broken = format::read(data, &mut sink).err();
    (sink.stats, broken)
}

/// A capture to read. A regular file is mapped read-only: the kernel reads
/// it in as it is decoded and may drop what was read, so memory does not
/// grow with the file (a file truncated while mapped would fault; captures
/// grow). A pipe is read whole.
pub struct CaptureFile {
    ptr: *mut libc::c_void,
    len: usize,
    read: Vec<u8>,
}

impl CaptureFile {
    pub fn open(path: &Path) -> std::io::Result<Self> {
        let mut file = std::fs::File::open(path)?;
        let meta = file.metadata()?;
        let len = usize::try_from(meta.len()).unwrap_or(usize::MAX);
        if !meta.is_file() || len == 0 {
            let mut read = Vec::new();
            std::io::Read::read_to_end(&mut file, &mut read)?;
            return Ok(CaptureFile {
                ptr: std::ptr::null_mut(),
                len: 0,
                read,
            });
        }
        // SAFETY: a fresh read-only private mapping of an open file; the
        // mapping outlives the descriptor by design.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ,
                libc::MAP_PRIVATE,
                std::os::fd::AsRawFd::as_raw_fd(&file),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: advice on the mapping just made; failure only loses the hint.
        unsafe { libc::madvise(ptr, len, libc::MADV_SEQUENTIAL) };
        Ok(CaptureFile {
            ptr,
            len,
            read: Vec::new(),
        })
    }

    pub fn bytes(&self) -> &[u8] {
        if self.len == 0 {
            return &self.read;
        }
        // SAFETY: `ptr` maps `len` readable bytes until drop.
        unsafe { std::slice::from_raw_parts(self.ptr as *const u8, self.len) }
    }

    /// [`read_each`] over the file, giving back the pages read as it goes:
    /// they stay in the page cache, not in this process.
    pub fn read_each(
        &self,
        on: &mut dyn FnMut(Event) -> bool,
    ) -> (CaptureStats, Option<PcapError>) {
        let behind = (self.len != 0).then_some(DropBehind {
            base: self.ptr as usize,
            released: 0,
        });
        read_into(self.bytes(), on, behind)
    }
}

/// Pages of a [`CaptureFile`] already decoded, given back in chunks.
struct DropBehind {
    base: usize,
    released: usize,
}

impl DropBehind {
    /// Chunks of 64 MiB, cut at 64 KiB (a multiple of every page size).
    const CHUNK: usize = 64 << 20;
    const ALIGN: usize = 64 << 10;

    fn reached(&mut self, at: *const u8) {
        let off = (at as usize).saturating_sub(self.base) & !(Self::ALIGN - 1);
        if off >= self.released + Self::CHUNK {
            // SAFETY: a page-aligned range of the file's private, read-only
            // mapping, already decoded; touched again, it is read in again.
            unsafe {
                libc::madvise(
                    (self.base + self.released) as *mut libc::c_void,
                    off - self.released,
                    libc::MADV_DONTNEED,
                )
            };
            self.released = off;
        }
    }
}

impl Drop for CaptureFile {
    fn drop(&mut self) {
        if self.len != 0 {
            // SAFETY: unmapping exactly what `open` mapped.
            unsafe { libc::munmap(self.ptr, self.len) };
        }
    }
}

/// Where the container readers deliver packets; keeps the counting in one
/// place so classic pcap and pcapng cannot disagree about it.
pub(crate) struct Sink<'a> {
    on: &'a mut dyn FnMut(Event) -> bool,
    /// `on` asked to stop: the readers end as if the file ended.
    pub(crate) stopped: bool,
    stats: CaptureStats,
    /// Set when the frames point into a [`CaptureFile`].
    behind: Option<DropBehind>,
}

impl Sink<'_> {
    /// `orig_len`: the packet's length on the wire, as its record says.
    pub(crate) fn packet(
        &mut self,
        link: LinkType,
        ts_ns: u64,
        ifindex: u32,
        frame: &[u8],
        orig_len: usize,
    ) {
        self.stats.packets += 1;
        if let Some(b) = &mut self.behind {
            b.reached(frame.as_ptr());
        }
        match decode::segment(link, frame, orig_len, ts_ns, ifindex) {
            Ok(seg) => {
                self.stats.tcp_segments += 1;
                if !(self.on)(Event::Segment(seg)) {
                    self.stopped = true;
                }
            }
            Err(decode::Skip::NonTcp) => self.stats.skipped_non_tcp += 1,
            Err(decode::Skip::Truncated) => self.stats.skipped_truncated += 1,
            Err(decode::Skip::Unsupported) => self.stats.skipped_unsupported += 1,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::net::IpAddr;

    use super::build::{self, SegmentSpec};
    use super::*;
    use crate::event::{Segment, TcpFlags};

    fn only_segment(c: &Capture) -> &Segment {
        assert_eq!(c.events.len(), 1, "stats {:?}", c.stats);
        match &c.events[0] {
            Event::Segment(s) => s,
            other => panic!("not a segment: {other:?}"),
        }
    }

    fn spec() -> SegmentSpec {
        SegmentSpec {
            ts_ns: 1_600_000_000_123_456_789,
            flags: TcpFlags::SYN,
            seq: 42,
            options: build::syn_options(1460, Some(7), true, Some((9, 0))),
            ..SegmentSpec::default()
        }
    }

    #[test]
    fn error_display_names_offset() {
        let e = PcapError::new(24, "truncated record header");
        assert_eq!(e.to_string(), "at byte offset 24: truncated record header");
    }

    #[test]
    fn nanosecond_pcap_keeps_every_nanosecond() {
        let s = spec();
        let file = build::pcap_file(&[(s.ts_ns, build::ethernet_frame(&s))], 1);
        let c = read_bytes(&file).expect("decodes");
        assert_eq!(only_segment(&c), &s.expected());
    }

    #[test]
    fn ethernet_padding_is_not_payload() {
        let s = SegmentSpec {
            flags: TcpFlags::ACK,
            ..SegmentSpec::default()
        };
        let mut frame = build::ethernet_frame(&s);
        assert_eq!(frame.len(), 54);
        frame.resize(60, 0);
        let c = read_bytes(&build::pcap_file(&[(0, frame)], 1)).expect("decodes");
        assert_eq!(only_segment(&c).len, 0);
    }

    /// Payload length of a segment cut by the snaplen: the IP header's, or
    /// for a TSO super-packet (`tcpdump -s 128` on the sender; IP length 0)
    /// the record's original length.
    #[test]
    fn snaplen_cut_keeps_the_length() {
        for (payload_len, snaplen) in [(1448, 96), (70_000, 128)] {
            let s = SegmentSpec {
                payload_len,
                flags: TcpFlags::ACK | TcpFlags::PSH,
                ..SegmentSpec::default()
            };
            let opts = build::PcapOpts {
                snaplen,
                ..build::PcapOpts::default()
            };
            let file = build::pcap_file_with(&[(0, build::ethernet_frame(&s))], 1, &opts);
            let c = read_bytes(&file).expect("decodes");
            assert_eq!(only_segment(&c).len, payload_len);
        }
    }

    #[test]
    fn cut_inside_tcp_options_is_truncated() {
        let s = spec();
        let opts = build::PcapOpts {
            snaplen: 14 + 20 + 30,
            ..build::PcapOpts::default()
        };
        let file = build::pcap_file_with(&[(0, build::ethernet_frame(&s))], 1, &opts);
        let c = read_bytes(&file).expect("decodes");
        assert!(c.events.is_empty());
        assert_eq!(c.stats.skipped_truncated, 1);
    }

    #[test]
    fn tso_super_packet_uses_captured_length() {
        let s = SegmentSpec {
            payload_len: 70_000,
            flags: TcpFlags::ACK,
            ..SegmentSpec::default()
        };
        let frame = build::ethernet_frame(&s);
        // The builder mirrors Linux: an IPv4 total length that cannot fit is 0.
        assert_eq!(&frame[16..18], &[0, 0]);
        let c = read_bytes(&build::pcap_file(&[(0, frame)], 1)).expect("decodes");
        assert_eq!(only_segment(&c).len, 70_000);
    }

    /// Past the first 64 MiB the pages already read are given back; what
    /// follows must still decode as from memory.
    #[test]
    fn a_mapped_file_streams_past_its_dropped_pages() {
        let frames: Vec<(u64, Vec<u8>)> = (0..50_000u32)
            .map(|i| {
                let s = SegmentSpec {
                    ts_ns: u64::from(i) * 1000,
                    seq: i.wrapping_mul(1448),
                    payload_len: 1448,
                    flags: TcpFlags::ACK | TcpFlags::PSH,
                    ..SegmentSpec::default()
                };
                (s.ts_ns, build::ethernet_frame(&s))
            })
            .collect();
        let file = build::pcap_file(&frames, 1);
        assert!(file.len() > DropBehind::CHUNK, "{} bytes", file.len());
        let path = std::env::temp_dir().join(format!("tcptrace-map-{}.pcap", std::process::id()));
        std::fs::write(&path, &file).expect("write the capture");
        let map = CaptureFile::open(&path).expect("map it");
        let mut streamed = Vec::new();
        let (stats, broken) = map.read_each(&mut |ev| {
            streamed.push(ev);
            true
        });
        drop(map);
        let _ = std::fs::remove_file(&path);
        assert!(broken.is_none());
        let whole = read_bytes(&file).expect("decodes");
        assert_eq!(stats, whole.stats);
        assert!(streamed == whole.events, "streamed segments differ");
    }

    #[test]
    fn ipv6_segment_round_trips() {
        let s = SegmentSpec {
            saddr: "2001:db8::1".parse::<IpAddr>().expect("literal"),
            daddr: "2001:db8::2".parse::<IpAddr>().expect("literal"),
            payload_len: 10,
            flags: TcpFlags::ACK | TcpFlags::PSH,
            ..SegmentSpec::default()
        };
        let c =
            read_bytes(&build::pcap_file(&[(5, build::ethernet_frame(&s))], 1)).expect("decodes");
        assert_eq!(only_segment(&c), &SegmentSpec { ts_ns: 5, ..s }.expected());
    }
}
