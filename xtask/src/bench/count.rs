//! Counting what a tracer delivered, from its output file.
use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::Path;

use anyhow::Result;

use super::json;

#[derive(Default)]
pub struct Output {
    /// State-change events delivered.
    pub states: u64,
    /// Segment events delivered.
    pub segments: u64,
    /// From tcptrace's summary line / tcpstates' "lost N events" lines.
    pub lost: Option<u64>,
    /// tcptrace's own event count (summary line).
    pub summary_events: Option<u64>,
    pub undecodable: Option<u64>,
    /// tcptrace connection records, by end_reason.
    pub records: BTreeMap<String, u64>,
    /// "OLD->NEW" state transitions, when asked for.
    pub transitions: BTreeMap<String, u64>,
}

impl Output {
    pub fn delivered(&self) -> u64 {
        self.states + self.segments
    }
}

/// tcptrace --json output (JSON Lines).
pub fn tcptrace(path: &Path, transitions: bool) -> Result<Output> {
    let mut o = Output::default();
    let mut r = BufReader::with_capacity(1 << 20, File::open(path)?);
    let mut line = String::new();
    while {
        line.clear();
        r.read_line(&mut line)? > 0
    } {
        if line.starts_with("{\"type\":\"state\"") {
            o.states += 1;
            if transitions {
                let k = format!(
                    "{}->{}",
                    json::field_str(&line, "oldstate").unwrap_or("?"),
                    json::field_str(&line, "newstate").unwrap_or("?")
                );
                *o.transitions.entry(k).or_default() += 1;
            }
        } else if line.starts_with("{\"type\":\"segment\"") {
            o.segments += 1;
        } else if line.starts_with("{\"type\":\"connection\"") {
            let why = json::field_str(&line, "end_reason")
                .unwrap_or("?")
                .to_string();
            *o.records.entry(why).or_default() += 1;
        } else if json::field_str(&line, "type") == Some("summary") {
            // "lost" also counts the state changes the kernel skipped
            // (recursion_misses), which the bench reads from the programs
            // itself; "ring_full" is the rest.
            o.lost = json::field_u64(&line, "ring_full").or(json::field_u64(&line, "lost"));
            o.summary_events = json::field_u64(&line, "events");
            o.undecodable = json::field_u64(&line, "undecodable");
        }
    }
    Ok(o)
}

/// libbpf-tools tcpstates output: a header, then
/// `SKADDR PID COMM LADDR LPORT RADDR RPORT OLD -> NEW MS`; only lines with
/// `port` on either side count (tcpstates' -L/-D filters are AND-ed, so it
/// cannot be told "either side"). Lost events come on stderr.
pub fn tcpstates(path: &Path, err: &Path, port: u16, transitions: bool) -> Result<Output> {
    let mut o = Output::default();
    let p = port.to_string();
    let r = BufReader::with_capacity(1 << 20, File::open(path)?);
    for line in r.lines() {
        let line = line?;
        let t: Vec<&str> = line.split_whitespace().collect();
        let Some(arrow) = t.iter().position(|x| *x == "->") else {
            continue;
        };
        if arrow < 4 || arrow + 1 >= t.len() || (t[arrow - 2] != p && t[arrow - 4] != p) {
            continue;
        }
        o.states += 1;
        if transitions {
            *o.transitions
                .entry(format!("{}->{}", t[arrow - 1], t[arrow + 1]))
                .or_default() += 1;
        }
    }
    // "lost %llu events on CPU #%d"
    let mut lost = 0;
    for l in std::fs::read_to_string(err).unwrap_or_default().lines() {
        if let Some(rest) = l.trim().strip_prefix("lost ") {
            lost += rest
                .split_whitespace()
                .next()
                .and_then(|n| n.parse::<u64>().ok())
                .unwrap_or(0);
        }
    }
    o.lost = Some(lost);
    Ok(o)
}
