//! No input makes the reader panic: every truncation and many corruptions
//! of the seed capture and of a pcapng exercising all link types.

use std::net::IpAddr;
use std::path::Path;

use tcptrace::event::TcpFlags as F;
use tcptrace::pcap::build::{self, PcapngWriter, SegmentSpec};
use tcptrace::pcap::read_bytes;

fn seed() -> Vec<u8> {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/seed-wget-file64KB.pcap");
    std::fs::read(p).expect("seed capture")
}

/// Reads `data`; on success the counters must add up.
fn check(data: &[u8]) {
    if let Ok(c) = read_bytes(data) {
        let s = &c.stats;
        assert_eq!(c.events.len() as u64, s.tcp_segments);
        assert_eq!(
            s.packets,
            s.tcp_segments + s.skipped_non_tcp + s.skipped_truncated + s.skipped_unsupported
        );
    }
}

/// Tiny deterministic PRNG (xorshift64*), so failures reproduce.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// Offsets of every classic-pcap record header, where a flipped byte hurts most.
fn record_headers(data: &[u8]) -> Vec<usize> {
    let mut at = 24;
    let mut out = Vec::new();
    while at + 16 <= data.len() {
        out.push(at);
        let caplen = u32::from_le_bytes(data[at + 8..at + 12].try_into().expect("4 bytes"));
        at += 16 + caplen as usize;
    }
    out
}

fn mutate_positions(data: &mut [u8], positions: impl Iterator<Item = usize>) {
    for i in positions {
        let orig = data[i];
        for v in [orig ^ 0xff, orig ^ 0x01, orig ^ 0x80, 0x00, 0xff, 0x7f] {
            data[i] = v;
            check(data);
        }
        data[i] = orig;
    }
}

#[test]
fn seed_every_truncation() {
    let s = seed();
    for len in 0..=s.len() {
        check(&s[..len]);
    }
}

#[test]
fn seed_byte_flips() {
    let mut s = seed();
    let mut positions: Vec<usize> = (0..2048).collect();
    for h in record_headers(&s) {
        // The record header and the link/IP/TCP headers after it.
        positions.extend(h..(h + 16 + 100).min(s.len()));
    }
    positions.extend((2048..s.len()).step_by(97));
    positions.sort_unstable();
    positions.dedup();
    mutate_positions(&mut s, positions.into_iter());
}

#[test]
fn seed_random_corruption() {
    let s = seed();
    let mut rng = Rng(0x5eed_cafe_f00d_1234);
    let headers = record_headers(&s);
    let mut v = s.clone();
    for _ in 0..3000 {
        v.copy_from_slice(&s);
        for _ in 0..1 + rng.below(8) {
            // Aim half the hits at record headers.
            let i = if rng.below(2) == 0 {
                headers[rng.below(headers.len())] + rng.below(16 + 80)
            } else {
                rng.below(v.len())
            };
            if let Some(b) = v.get_mut(i) {
                *b = rng.next() as u8;
            }
        }
        let cut = if rng.below(4) == 0 {
            rng.below(v.len() + 1)
        } else {
            v.len()
        };
        check(&v[..cut]);
    }
}

/// A pcapng of both byte orders, every link type, VLANs and IPv6
/// extension headers: a dense target where most bytes are headers.
fn rich_pcapng() -> Vec<u8> {
    let v4 = SegmentSpec {
        flags: F::SYN,
        options: build::syn_options(1460, Some(7), true, Some((1, 0))),
        payload_len: 3,
        ..SegmentSpec::default()
    };
    let v6 = SegmentSpec {
        saddr: "2001:db8::1".parse::<IpAddr>().expect("literal"),
        daddr: "2001:db8::2".parse::<IpAddr>().expect("literal"),
        flags: F::ACK,
        payload_len: 5,
        options: build::ts_option(1, 2),
        ..SegmentSpec::default()
    };
    let mut w = PcapngWriter::new(false);
    let links = [0u32, 1, 101, 113, 228, 229, 276];
    for (i, &link) in links.iter().enumerate() {
        w.interface(link, Some(if i % 2 == 0 { 6 } else { 0x80 | 20 }));
    }
    for (i, &link) in links.iter().enumerate() {
        let spec = if link == 228 || (link != 229 && i % 2 == 0) {
            &v4
        } else {
            &v6
        };
        w.packet(i as u32, 1_000 * i as u64, &build::frame(link, spec));
    }
    w.section(true);
    w.interface(1, None);
    w.packet(0, 5, &build::vlan_frame(&v4, &[1, 2]));
    let mut f = build::ethernet_frame(&v6)[..14].to_vec();
    f.extend(build::ipv6_packet_with_ext(&v6, &[0, 43, 51, 60]));
    w.packet(0, 6, &f);
    w.simple_packet(&build::vlan_frame(&v6, &[7]));
    w.raw_block(0x0bad, &[1, 2, 3]);
    w.finish()
}

#[test]
fn pcapng_truncations_and_every_byte() {
    let mut ng = rich_pcapng();
    let c = read_bytes(&ng).expect("the unmutated file decodes");
    assert_eq!(c.stats.tcp_segments, 10, "{:?}", c.stats);
    for len in 0..=ng.len() {
        check(&ng[..len]);
    }
    let n = ng.len();
    mutate_positions(&mut ng, 0..n);
}

#[test]
fn pcapng_random_corruption() {
    let ng = rich_pcapng();
    let mut rng = Rng(0xdead_beef_0bad_f00d);
    let mut v = ng.clone();
    for _ in 0..20_000 {
        v.copy_from_slice(&ng);
        for _ in 0..1 + rng.below(6) {
            let i = rng.below(v.len());
            v[i] = rng.next() as u8;
        }
        check(&v);
    }
}

#[test]
fn garbage_after_each_magic() {
    let mut rng = Rng(42);
    let magics: [[u8; 4]; 5] = [
        [0xd4, 0xc3, 0xb2, 0xa1],
        [0xa1, 0xb2, 0xc3, 0xd4],
        [0x4d, 0x3c, 0xb2, 0xa1],
        [0xa1, 0xb2, 0x3c, 0x4d],
        [0x0a, 0x0d, 0x0d, 0x0a],
    ];
    for _ in 0..20_000 {
        let m = magics[rng.below(magics.len())];
        let len = rng.below(200);
        let mut v = m.to_vec();
        v.extend((0..len).map(|_| rng.next() as u8));
        if m[0] == 0x0a && v.len() >= 12 && rng.below(2) == 0 {
            // Give the random pcapng a valid byte-order magic so it gets further.
            v[8..12].copy_from_slice(&[0x4d, 0x3c, 0x2b, 0x1a]);
        }
        check(&v);
    }
}
