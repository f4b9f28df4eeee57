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
    /// `--priority yield`: how long tcptrace went back to normal priority.
    pub priority_claimed_ms: Option<u64>,
    /// tcptrace's `state_gap` anomalies (summary line): the holes it found
    /// in sockets' state changes, whether or not anything counted them.
    pub state_gaps: Option<u64>,
    /// tcptrace's `missed`: the state tracepoint's kernel skips that its
    /// sock_ops backup did not deliver (those it did are `rescued`).
    pub missed: Option<u64>,
    pub rescued: Option<u64>,
    /// State changes delivered twice (sock_ops and the tracepoint), which
    /// tcptrace dropped and counted.
    pub duplicates: Option<u64>,
    /// tcptrace connection records, by end_reason.
    pub records: BTreeMap<String, u64>,
    /// "OLD->NEW" state transitions, when asked for.
    pub transitions: BTreeMap<String, u64>,
    /// Each socket's state changes, followed in order (see [`Chains`]).
    pub chains: Chains,
}

/// Where the missing state changes are. A socket's state changes form a
/// chain (each starts where the last ended, CLOSE ends it), so a change
/// that never arrived shows as a break in the middle of a chain or as a
/// chain cut short at the end of the run.
#[derive(Default)]
pub struct Chains {
    /// State changes whose old state is not the socket's last new state.
    pub breaks: u64,
    /// Sockets whose last state change seen did not end in CLOSE, by the
    /// state they were left in.
    pub unfinished: BTreeMap<String, u64>,
    /// Each socket's state so far (gone at CLOSE).
    open: std::collections::HashMap<String, String>,
}

impl Chains {
    fn add(&mut self, skaddr: &str, old: &str, new: &str) {
        let last = if new == "CLOSE" {
            self.open.remove(skaddr)
        } else {
            self.open.insert(skaddr.to_string(), new.to_string())
        };
        // A socket's first change starts from CLOSE, or from LISTEN (a
        // passively opened child, named by its listener's state).
        let from = last
            .as_deref()
            .unwrap_or(if old == "LISTEN" { "LISTEN" } else { "CLOSE" });
        if from != old {
            self.breaks += 1;
        }
    }

    fn finish(&mut self) {
        for state in std::mem::take(&mut self.open).into_values() {
            *self.unfinished.entry(state).or_default() += 1;
        }
    }

    /// `"3 FIN_WAIT1"`, or `"none"`.
    pub fn unfinished_line(&self) -> String {
        let v: Vec<String> = self
            .unfinished
            .iter()
            .map(|(k, n)| format!("{n} {k}"))
            .collect();
        if v.is_empty() {
            "none".into()
        } else {
            v.join(", ")
        }
    }
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
            if let (Some(sk), Some(old), Some(new)) = (
                json::field_str(&line, "skaddr"),
                json::field_str(&line, "oldstate"),
                json::field_str(&line, "newstate"),
            ) {
                o.chains.add(sk, old, new);
            }
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
            o.priority_claimed_ms = json::field_u64(&line, "priority_claimed_ms");
            // Absent from the anomaly counts when there were none.
            o.state_gaps = Some(json::field_u64(&line, "state_gap").unwrap_or(0));
            o.missed = json::field_u64(&line, "missed");
            o.rescued = json::field_u64(&line, "rescued");
            o.duplicates = json::field_u64(&line, "duplicates");
        }
    }
    o.chains.finish();
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

#[cfg(test)]
mod tests {
    use super::*;

    /// (skaddr, old state, new state), in arrival order.
    type Change = (&'static str, &'static str, &'static str);

    /// (name, changes) → (breaks, unfinished).
    #[test]
    fn chains_find_breaks_and_cut_short_sockets() {
        let cases: Vec<(&str, Vec<Change>, u64, &str)> = vec![
            (
                "client and child, whole",
                vec![
                    ("1", "CLOSE", "SYN_SENT"),
                    ("2", "LISTEN", "SYN_RECV"),
                    ("1", "SYN_SENT", "ESTABLISHED"),
                    ("2", "SYN_RECV", "ESTABLISHED"),
                    ("1", "ESTABLISHED", "CLOSE"),
                    ("2", "ESTABLISHED", "CLOSE"),
                ],
                0,
                "none",
            ),
            (
                "one missing in the middle",
                vec![
                    ("1", "CLOSE", "SYN_SENT"),
                    ("1", "ESTABLISHED", "FIN_WAIT1"),
                    ("1", "FIN_WAIT1", "CLOSE"),
                ],
                1,
                "none",
            ),
            (
                "a first change that is not a start",
                vec![
                    ("1", "ESTABLISHED", "FIN_WAIT1"),
                    ("1", "FIN_WAIT1", "CLOSE"),
                ],
                1,
                "none",
            ),
            (
                "the tail missing",
                vec![
                    ("1", "CLOSE", "SYN_SENT"),
                    ("1", "SYN_SENT", "ESTABLISHED"),
                    ("1", "ESTABLISHED", "FIN_WAIT1"),
                    ("3", "CLOSE", "LISTEN"),
                ],
                0,
                "1 FIN_WAIT1, 1 LISTEN",
            ),
            (
                "an address reused after CLOSE",
                vec![
                    ("1", "CLOSE", "SYN_SENT"),
                    ("1", "SYN_SENT", "CLOSE"),
                    ("1", "LISTEN", "SYN_RECV"),
                    ("1", "SYN_RECV", "CLOSE"),
                ],
                0,
                "none",
            ),
        ];
        for (name, evs, breaks, unfinished) in cases {
            let mut c = Chains::default();
            for (sk, old, new) in evs {
                c.add(sk, old, new);
            }
            c.finish();
            assert_eq!(c.breaks, breaks, "{name}");
            assert_eq!(c.unfinished_line(), unfinished, "{name}");
        }
    }
}
