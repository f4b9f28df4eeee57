//! Broken files are refused with the byte offset of what is wrong.

use std::path::{Path, PathBuf};

use tcptrace::pcap::build::{self, PcapngWriter, SegmentSpec};
use tcptrace::pcap::{read_bytes, read_file, PcapError};

fn seed() -> Vec<u8> {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/seed-wget-file64KB.pcap");
    std::fs::read(p).expect("seed capture")
}

#[track_caller]
fn err(data: &[u8]) -> PcapError {
    match read_bytes(data) {
        Ok(c) => panic!("decoded {} events, expected an error", c.events.len()),
        Err(e) => e,
    }
}

#[track_caller]
fn assert_err(data: &[u8], offset: u64, needle: &str) {
    let e = err(data);
    assert_eq!(e.offset, offset, "{e}");
    assert!(e.msg.contains(needle), "{e:?} does not mention {needle:?}");
    assert!(
        e.to_string()
            .starts_with(&format!("at byte offset {offset}: ")),
        "{e}"
    );
}

fn le32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_le_bytes());
}

#[test]
fn classic_header_errors() {
    assert_err(b"", 0, "too short");
    assert_err(b"GET / HTTP/1.1\r\n", 0, "bad magic 474554");
    let s = seed();
    assert_err(&s[..10], 10, "truncated pcap file header (10 of 24");
    let mut v = s.clone();
    v[4] = 3;
    assert_err(&v, 4, "unsupported pcap version 3.4");
    let mut v = s.clone();
    le32(&mut v, 20, 147);
    assert_err(&v, 20, "unsupported link type 147");
}

#[test]
fn classic_record_errors() {
    let s = seed();
    // First record: header at 24, caplen 74, so the second starts at 114.
    assert_err(&s[..114 + 5], 114, "truncated record header (5 of 16");
    assert_err(
        &s[..114 + 16 + 10],
        114 + 8,
        "caplen 74 goes past the end of the file (10 bytes left)",
    );
    let mut v = s.clone();
    le32(&mut v, 32, 300_000);
    assert_err(&v, 32, "caplen 300000 is larger than 262144");
    // A valid prefix ending exactly on a record boundary is fine.
    let c = read_bytes(&s[..114]).expect("one whole record");
    assert_eq!(c.events.len(), 1);
    assert!(read_bytes(&s[..24]).expect("header only").events.is_empty());
}

/// SHB (28 bytes) + IDB (20) + EPB, little-endian.
fn small_pcapng() -> Vec<u8> {
    let s = SegmentSpec {
        flags: 0x02,
        ..SegmentSpec::default()
    };
    build::pcapng_file(&[(1, build::ethernet_frame(&s))], 1)
}

#[test]
fn pcapng_block_errors() {
    let ng = small_pcapng();
    assert_eq!(&ng[28..32], &1u32.to_le_bytes(), "IDB after a 28-byte SHB");
    let idb_len = u32::from_le_bytes(ng[32..36].try_into().expect("4 bytes")) as usize;
    let epb = 28 + idb_len;

    let mut v = ng.clone();
    v[8..12].copy_from_slice(&[1, 2, 3, 4]);
    assert_err(&v, 8, "bad byte-order magic");

    let mut v = ng.clone();
    le32(&mut v, epb + 4, 62);
    assert_err(
        &v,
        (epb + 4) as u64,
        "block length 62 is not a multiple of 4",
    );

    let mut v = ng.clone();
    le32(&mut v, epb + 4, 8);
    assert_err(&v, (epb + 4) as u64, "below the minimum");

    let mut v = ng.clone();
    le32(&mut v, epb + 4, 1 << 20);
    assert_err(&v, (epb + 4) as u64, "goes past the end of the file");

    let mut v = ng.clone();
    let last = v.len() - 4;
    le32(&mut v, last, 4);
    assert_err(&v, last as u64, "block trailer length 4 does not match");

    assert_err(
        &ng[..ng.len() - 7],
        epb as u64 + 4,
        "goes past the end of the file",
    );
    assert_err(&ng[..epb + 6], epb as u64, "truncated block (6 bytes left");

    let mut v = ng.clone();
    le32(&mut v, epb + 8, 3);
    assert_err(
        &v,
        epb as u64 + 8,
        "interface 3, but this section describes 1",
    );

    let mut v = ng.clone();
    le32(&mut v, epb + 8 + 12, 400);
    assert_err(
        &v,
        epb as u64 + 8 + 12,
        "caplen 400 goes past the end of its",
    );

    let mut v = ng.clone();
    le32(&mut v, epb + 8 + 12, 1 << 20);
    assert_err(&v, epb as u64 + 8 + 12, "larger than 262144");

    let mut v = ng.clone();
    v[12] = 2; // major version
    assert_err(&v, 12, "unsupported pcapng version 2.0");
}

#[test]
fn pcapng_interface_errors() {
    let f = build::ethernet_frame(&SegmentSpec::default());
    let mut w = PcapngWriter::new(false);
    w.interface(147, None);
    // Describing an unknown interface is harmless until a packet uses it.
    assert!(read_bytes(&w.finish()).is_ok());
    w.packet(0, 0, &f);
    let e = err(&w.finish());
    assert!(
        e.msg
            .contains("unsupported link type 147 (interface 0, described at offset 28)"),
        "{e}"
    );
    assert_eq!(e.offset, 28 + 20 + 8);

    let mut w = PcapngWriter::new(false);
    w.simple_packet(&f);
    let e = err(&w.finish());
    assert!(
        e.msg.contains("interface 0, but this section describes 0"),
        "{e}"
    );

    // if_tsresol of 10^-100 s cannot be converted.
    let mut w = PcapngWriter::new(false);
    w.interface(1, Some(9));
    let mut v = w.finish();
    let opt_value = 28 + 8 + 8 + 4;
    assert_eq!(v[opt_value], 9);
    v[opt_value] = 100;
    assert_err(
        &v,
        (opt_value - 4) as u64,
        "if_tsresol 0x64 is finer than supported",
    );

    // An option claiming more bytes than the block holds.
    let mut v = w.finish();
    v[opt_value - 2] = 200;
    assert_err(
        &v,
        (opt_value - 4) as u64,
        "option 9 of length 200 overruns its block",
    );
}

fn temp_file(name: &str, data: &[u8]) -> PathBuf {
    let p = std::env::temp_dir().join(format!("tcptrace-pcap-{}-{name}", std::process::id()));
    std::fs::write(&p, data).expect("write temp file");
    p
}

#[test]
fn read_file_errors_name_the_file() {
    let missing = Path::new("/nonexistent/dir/capture.pcap");
    let e = read_file(missing).expect_err("missing file");
    assert!(
        e.to_string().contains("/nonexistent/dir/capture.pcap"),
        "{e:#}"
    );

    let p = temp_file("corrupt.pcap", &seed()[..100]);
    let e = read_file(&p).expect_err("corrupt file");
    let full = format!("{e:#}");
    let _ = std::fs::remove_file(&p);
    assert!(e.to_string().contains(&*p.to_string_lossy()), "{full}");
    assert!(
        full.contains("at byte offset 32: record caplen 74 goes past the end"),
        "{full}"
    );
    assert!(e
        .downcast_ref::<PcapError>()
        .is_some_and(|pe| pe.offset == 32));
}

/// A capture cut short (tcpdump killed mid-write, or still writing) is not
/// thrown away: `tcptrace pcap` shows what the packets before the break
/// hold, then says where the file breaks and exits with status 1.
#[test]
fn a_capture_cut_short_shows_what_comes_before_the_break() {
    let s = seed();
    let dir = std::env::temp_dir().join(format!("tcptrace-cut-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let cut = dir.join("cut.pcap");
    // Seven bytes into the last record's header.
    let last = s.len() - 7;
    std::fs::write(&cut, &s[..last]).expect("write the cut capture");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_tcptrace"))
        .args(["pcap", "--json"])
        .arg(&cut)
        .output()
        .expect("run tcptrace pcap");
    let _ = std::fs::remove_dir_all(&dir);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    let connections = stdout
        .lines()
        .filter(|l| l.starts_with(r#"{"type":"connection""#))
        .count();
    assert_eq!(connections, 2, "{stdout}");
    assert!(
        stderr.contains("breaks at byte offset") && stderr.contains("cut short"),
        "{stderr}"
    );
    // The JSON ends with a summary that says so too.
    let summary: serde_json::Value =
        serde_json::from_str(stdout.lines().last().unwrap_or_default()).expect("JSON");
    assert_eq!(summary["type"], "summary", "{summary}");
    assert_eq!(summary["connections"], 2, "{summary}");
    assert_eq!(summary["packets"], 45, "{summary}");
    assert!(
        summary["broken"]
            .as_str()
            .is_some_and(|b| b.starts_with("at byte offset")),
        "{summary}"
    );

    // A pipe is read too (not mapped).
    let out = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!(
            "cat {} | {} pcap --json /dev/stdin",
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("tests/fixtures/seed-wget-file64KB.pcap")
                .display(),
            env!("CARGO_BIN_EXE_tcptrace")
        ))
        .output()
        .expect("run tcptrace pcap on a pipe");
    assert_eq!(out.status.code(), Some(0));
    let piped = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        piped
            .lines()
            .filter(|l| l.starts_with(r#"{"type":"connection""#))
            .count(),
        2,
        "{piped}"
    );

    // Nothing readable at all stays a plain error.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_tcptrace"))
        .args(["pcap", "/dev/null"])
        .output()
        .expect("run tcptrace pcap");
    assert_eq!(out.status.code(), Some(2));
    assert!(out.stdout.is_empty());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("bad capture file /dev/null"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
