//! The two container formats: classic pcap (libpcap's savefile) and pcapng.
//! References: draft-ietf-opsawg-pcap and draft-ietf-opsawg-pcapng.

use super::decode::LinkType;
use super::{PcapError, Sink, MAX_CAPLEN};

type R<T> = Result<T, PcapError>;

const NS_PER_SEC: u128 = 1_000_000_000;

pub(crate) fn read(data: &[u8], sink: &mut Sink) -> R<()> {
    let Some(magic) = data.get(..4) else {
        return Err(PcapError::new(
            0,
            format!(
                "file too short to be a capture ({} bytes, no magic number)",
                data.len()
            ),
        ));
    };
    match magic {
        [0x0a, 0x0d, 0x0d, 0x0a] => read_pcapng(data, sink),
        [0xd4, 0xc3, 0xb2, 0xa1] => read_classic(data, sink, Endian::Little, 1000),
        [0xa1, 0xb2, 0xc3, 0xd4] => read_classic(data, sink, Endian::Big, 1000),
        [0x4d, 0x3c, 0xb2, 0xa1] => read_classic(data, sink, Endian::Little, 1),
        [0xa1, 0xb2, 0x3c, 0x4d] => read_classic(data, sink, Endian::Big, 1),
        [0x34, 0xcd, 0xb2, 0xa1] | [0xa1, 0xb2, 0xcd, 0x34] => Err(PcapError::new(
            0,
            "Kuznetzov-modified pcap (magic a1b2cd34) is not supported; \
             convert it with `editcap -F pcap`",
        )),
        _ => Err(PcapError::new(
            0,
            format!(
                "bad magic {:02x}{:02x}{:02x}{:02x}: not a pcap or pcapng file",
                magic[0], magic[1], magic[2], magic[3]
            ),
        )),
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Endian {
    Little,
    Big,
}

impl Endian {
    fn u16(self, b: &[u8], at: usize) -> Option<u16> {
        let a: [u8; 2] = b.get(at..at.checked_add(2)?)?.try_into().ok()?;
        Some(match self {
            Endian::Little => u16::from_le_bytes(a),
            Endian::Big => u16::from_be_bytes(a),
        })
    }

    fn u32(self, b: &[u8], at: usize) -> Option<u32> {
        let a: [u8; 4] = b.get(at..at.checked_add(4)?)?.try_into().ok()?;
        Some(match self {
            Endian::Little => u32::from_le_bytes(a),
            Endian::Big => u32::from_be_bytes(a),
        })
    }

    fn i64(self, b: &[u8], at: usize) -> Option<i64> {
        let a: [u8; 8] = b.get(at..at.checked_add(8)?)?.try_into().ok()?;
        Some(match self {
            Endian::Little => i64::from_le_bytes(a),
            Endian::Big => i64::from_be_bytes(a),
        })
    }
}

/// `frac_to_ns` is 1000 for microsecond files, 1 for nanosecond ones.
fn read_classic(data: &[u8], sink: &mut Sink, e: Endian, frac_to_ns: u64) -> R<()> {
    const HDR: usize = 24;
    const REC: usize = 16;
    if data.len() < HDR {
        return Err(PcapError::new(
            data.len(),
            format!("truncated pcap file header ({} of {HDR} bytes)", data.len()),
        ));
    }
    let field = |at: usize| e.u32(data, at).unwrap_or(0);
    let major = e.u16(data, 4).unwrap_or(0);
    if major != 2 {
        let minor = e.u16(data, 6).unwrap_or(0);
        return Err(PcapError::new(
            4,
            format!("unsupported pcap version {major}.{minor} (expected 2.x)"),
        ));
    }
    // The upper bits of this field carry FCS-length flags, not the type.
    let code = field(20) & 0xffff;
    let link = LinkType::from_linktype(code)
        .ok_or_else(|| PcapError::new(20, format!("unsupported link type {code}")))?;

    let mut pos = HDR;
    while pos < data.len() && !sink.stopped {
        let left = data.len() - pos;
        if left < REC {
            return Err(PcapError::new(
                pos,
                format!("truncated record header ({left} of {REC} bytes)"),
            ));
        }
        let sec = u64::from(field(pos));
        let frac = u64::from(field(pos + 4));
        let caplen = field(pos + 8);
        if caplen > MAX_CAPLEN {
            return Err(PcapError::new(
                pos + 8,
                format!(
                    "record caplen {caplen} is larger than {MAX_CAPLEN}; \
                     the record header is corrupt"
                ),
            ));
        }
        let caplen = caplen as usize;
        let body = pos + REC;
        let Some(frame) = data.get(body..body + caplen) else {
            return Err(PcapError::new(
                pos + 8,
                format!(
                    "record caplen {caplen} goes past the end of the file \
                     ({} bytes left)",
                    left - REC
                ),
            ));
        };
        // sec < 2^32 and frac < 2^32, so this cannot overflow u64.
        let ts_ns = sec * 1_000_000_000 + frac * frac_to_ns;
        let orig_len = field(pos + 12) as usize;
        sink.packet(link, ts_ns, 0, frame, orig_len);
        pos = body + caplen;
    }
    Ok(())
}

const SHB: u32 = 0x0a0d_0d0a;
const IDB: u32 = 1;
const PB_OBSOLETE: u32 = 2;
const SPB: u32 = 3;
const EPB: u32 = 6;

struct Interface {
    /// `Err(code)` keeps an unknown link type around so the error can be
    /// raised only if a packet actually uses this interface.
    link: Result<LinkType, u16>,
    declared_at: usize,
    snaplen: u32,
    /// Timestamp ticks per second (if_tsresol).
    units: u128,
    /// if_tsoffset: seconds to add to every timestamp.
    offset_s: i64,
}

struct Section {
    e: Endian,
    ifaces: Vec<Interface>,
    /// SPBs have no timestamp; giving them the previous packet's keeps the
    /// event stream ordered instead of jumping back to 1970.
    last_ts_ns: u64,
}

impl Section {
    fn iface(&self, id: u32, at: usize) -> R<(&Interface, LinkType)> {
        let Some(ifc) = self.ifaces.get(id as usize) else {
            return Err(PcapError::new(
                at,
                format!(
                    "packet refers to interface {id}, but this section describes {}",
                    self.ifaces.len()
                ),
            ));
        };
        match ifc.link {
            Ok(link) => Ok((ifc, link)),
            Err(code) => Err(PcapError::new(
                at,
                format!(
                    "unsupported link type {code} (interface {id}, described at offset {})",
                    ifc.declared_at
                ),
            )),
        }
    }
}

/// Ticks per second for an if_tsresol byte: MSB clear → 10^-n, set → 2^-n.
/// `None` for resolutions finer than we can convert exactly.
pub(crate) fn tsresol_units(v: u8) -> Option<u128> {
    let n = u32::from(v & 0x7f);
    if v & 0x80 == 0 {
        (n <= 30).then(|| 10u128.pow(n))
    } else {
        (n <= 100).then(|| 1u128 << n)
    }
}

fn ticks_to_ns(ticks: u64, units: u128, offset_s: i64) -> u64 {
    let t = u128::from(ticks);
    let ns = t / units * NS_PER_SEC + t % units * NS_PER_SEC / units;
    let ns = i128::try_from(ns).unwrap_or(i128::MAX) + i128::from(offset_s) * NS_PER_SEC as i128;
    u64::try_from(ns.max(0)).unwrap_or(u64::MAX)
}

fn read_pcapng(data: &[u8], sink: &mut Sink) -> R<()> {
    let mut pos = 0usize;
    let mut section: Option<Section> = None;
    while pos < data.len() && !sink.stopped {
        let left = data.len() - pos;
        if left < 12 {
            return Err(PcapError::new(
                pos,
                format!("truncated block ({left} bytes left, a block takes at least 12)"),
            ));
        }
        let is_shb = data[pos..pos + 4] == SHB.to_be_bytes();
        // A section header's byte-order magic decides how it and every block
        // after it (until the next section) are read.
        let e = if is_shb {
            match data[pos + 8..pos + 12] {
                [0x1a, 0x2b, 0x3c, 0x4d] => Endian::Big,
                [0x4d, 0x3c, 0x2b, 0x1a] => Endian::Little,
                _ => {
                    return Err(PcapError::new(
                        pos + 8,
                        "bad byte-order magic in section header",
                    ))
                }
            }
        } else {
            match &section {
                Some(s) => s.e,
                None => {
                    return Err(PcapError::new(
                        pos,
                        "pcapng block before any section header",
                    ))
                }
            }
        };
        let btype = e.u32(data, pos).unwrap_or(0);
        let blen = e.u32(data, pos + 4).unwrap_or(0);
        if blen % 4 != 0 {
            return Err(PcapError::new(
                pos + 4,
                format!("block length {blen} is not a multiple of 4"),
            ));
        }
        if blen < 12 {
            return Err(PcapError::new(
                pos + 4,
                format!("block length {blen} is below the minimum of 12"),
            ));
        }
        let blen = blen as usize;
        if blen > left {
            return Err(PcapError::new(
                pos + 4,
                format!("block length {blen} goes past the end of the file ({left} bytes left)"),
            ));
        }
        let trailer = e.u32(data, pos + blen - 4).unwrap_or(0);
        if trailer as usize != blen {
            return Err(PcapError::new(
                pos + blen - 4,
                format!(
                    "block trailer length {trailer} does not match block length {blen} \
                     (block type {btype:#x} at offset {pos})"
                ),
            ));
        }
        let body = &data[pos + 8..pos + blen - 4];
        let body_at = pos + 8;
        let short = |need: usize, what: &str| {
            PcapError::new(
                pos + 4,
                format!(
                    "{what} block of {blen} bytes is too short (body {} bytes, needs {need})",
                    body.len()
                ),
            )
        };
        match btype {
            SHB => {
                if body.len() < 16 {
                    return Err(short(16, "section header"));
                }
                let major = e.u16(body, 4).unwrap_or(0);
                if major != 1 {
                    let minor = e.u16(body, 6).unwrap_or(0);
                    return Err(PcapError::new(
                        body_at + 4,
                        format!("unsupported pcapng version {major}.{minor} (expected 1.x)"),
                    ));
                }
                section = Some(Section {
                    e,
                    ifaces: Vec::new(),
                    last_ts_ns: 0,
                });
            }
            IDB => {
                if body.len() < 8 {
                    return Err(short(8, "interface description"));
                }
                let code = e.u16(body, 0).unwrap_or(0);
                let snaplen = e.u32(body, 4).unwrap_or(0);
                let mut ifc = Interface {
                    link: LinkType::from_linktype(u32::from(code)).ok_or(code),
                    declared_at: pos,
                    snaplen,
                    units: 1_000_000,
                    offset_s: 0,
                };
                for opt in Options::new(body, 8, body_at, e) {
                    let (code, val, at) = opt?;
                    match (code, val.len()) {
                        (9, 1) => {
                            ifc.units = tsresol_units(val[0]).ok_or_else(|| {
                                PcapError::new(
                                    at,
                                    format!("if_tsresol {:#04x} is finer than supported", val[0]),
                                )
                            })?;
                        }
                        (14, 8) => ifc.offset_s = e.i64(val, 0).unwrap_or(0),
                        _ => {}
                    }
                }
                if let Some(s) = section.as_mut() {
                    s.ifaces.push(ifc);
                }
            }
            EPB | PB_OBSOLETE => {
                let Some(s) = section.as_mut() else {
                    return Err(PcapError::new(
                        pos,
                        "packet block before any section header",
                    ));
                };
                if body.len() < 20 {
                    return Err(short(20, "packet"));
                }
                let id = if btype == EPB {
                    e.u32(body, 0).unwrap_or(0)
                } else {
                    u32::from(e.u16(body, 0).unwrap_or(0))
                };
                let hi = u64::from(e.u32(body, 4).unwrap_or(0));
                let lo = u64::from(e.u32(body, 8).unwrap_or(0));
                let caplen = e.u32(body, 12).unwrap_or(0);
                if caplen > MAX_CAPLEN {
                    return Err(PcapError::new(
                        body_at + 12,
                        format!(
                            "packet caplen {caplen} is larger than {MAX_CAPLEN}; \
                             the block is corrupt"
                        ),
                    ));
                }
                let Some(frame) = body.get(20..20 + caplen as usize) else {
                    return Err(PcapError::new(
                        body_at + 12,
                        format!(
                            "packet caplen {caplen} goes past the end of its {blen}-byte block"
                        ),
                    ));
                };
                let (ifc, link) = s.iface(id, body_at)?;
                let ts_ns = ticks_to_ns(hi << 32 | lo, ifc.units, ifc.offset_s);
                s.last_ts_ns = ts_ns;
                let orig_len = e.u32(body, 16).unwrap_or(0) as usize;
                sink.packet(link, ts_ns, id, frame, orig_len);
            }
            SPB => {
                let Some(s) = section.as_ref() else {
                    return Err(PcapError::new(
                        pos,
                        "packet block before any section header",
                    ));
                };
                if body.len() < 4 {
                    return Err(short(4, "simple packet"));
                }
                let (ifc, link) = s.iface(0, pos)?;
                let orig = e.u32(body, 0).unwrap_or(0) as usize;
                // The block is padded to 4 bytes, so the frame length is the
                // original length capped by what the block and snaplen hold.
                let mut caplen = orig.min(body.len() - 4);
                if ifc.snaplen != 0 {
                    caplen = caplen.min(ifc.snaplen as usize);
                }
                sink.packet(link, s.last_ts_ns, 0, &body[4..4 + caplen], orig);
            }
            // Statistics, name resolution, decryption secrets, custom
            // blocks, …: nothing we need, and the length check above
            // already proved they are well-framed.
            _ => {}
        }
        pos += blen;
    }
    Ok(())
}

/// pcapng options (code, length, value padded to 4) from `start` in `body`.
struct Options<'a> {
    body: &'a [u8],
    pos: usize,
    body_at: usize,
    e: Endian,
    done: bool,
}

impl<'a> Options<'a> {
    fn new(body: &'a [u8], start: usize, body_at: usize, e: Endian) -> Self {
        Options {
            body,
            pos: start,
            body_at,
            e,
            done: false,
        }
    }
}

impl<'a> Iterator for Options<'a> {
    /// (code, value, file offset of the option)
    type Item = R<(u16, &'a [u8], usize)>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.done {
            return None;
        }
        let at = self.body_at + self.pos;
        // Some writers omit opt_endofopt; running out of room ends the list.
        let (Some(code), Some(len)) = (
            self.e.u16(self.body, self.pos),
            self.e.u16(self.body, self.pos + 2),
        ) else {
            self.done = true;
            return None;
        };
        if code == 0 {
            self.done = true;
            return None;
        }
        let start = self.pos + 4;
        let len = usize::from(len);
        let Some(val) = self.body.get(start..start + len) else {
            self.done = true;
            return Some(Err(PcapError::new(
                at,
                format!("option {code} of length {len} overruns its block"),
            )));
        };
        self.pos = start + len.div_ceil(4) * 4;
        Some(Ok((code, val, at)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tsresol_both_bases() {
        assert_eq!(tsresol_units(6), Some(1_000_000));
        assert_eq!(tsresol_units(9), Some(1_000_000_000));
        assert_eq!(tsresol_units(0x80 | 10), Some(1024));
        assert_eq!(tsresol_units(0x7f), None);
    }

    #[test]
    fn tick_conversion() {
        assert_eq!(ticks_to_ns(1_500_000, 1_000_000, 0), 1_500_000_000);
        assert_eq!(ticks_to_ns(1536, 1024, 0), 1_500_000_000);
        assert_eq!(ticks_to_ns(1, 1_000_000_000_000, 0), 0);
        assert_eq!(ticks_to_ns(1_000_000, 1_000_000, 10), 11_000_000_000);
        assert_eq!(ticks_to_ns(0, 1_000_000, -10), 0);
        assert_eq!(ticks_to_ns(u64::MAX, 1, 0), u64::MAX);
    }
}
