//! The explained timeline of one connection, for people.
//!
//! ```text
//! 192.168.131.132:37584 → 192.168.131.138:80  active open, three-segment close, 151 B → / ← 65800 B, handshake RTT 140 µs
//!   client ISN x = 3124300130, server ISN y = 2508684482; closed by client; 1.667 ms; end: closed
//!      0.000 ms  client > server  Flags [S], seq 3124300130, win 29200, options [mss 1460,sackOK,TS val 1666537180 ecr 0,wscale 7], length 0
//!                                 SYN seq=x — the client opens (active open): …
//! ```
//! Wire lines use tcpdump's syntax, with relative sequence numbers after the
//! SYN as tcpdump prints them; each is followed by the rule it satisfies and
//! what it means. Kernel lines show the transition and the time spent in the
//! state it leaves.

use std::fmt::Write as _;
use std::io::{self, Write};

use crate::matcher::{Close, Connection, Side, Step, StepKind};
use crate::text::{decimal, left_aligned, padded, with_text, Piece};

const INDENT: &str = "                                ";

/// Time relative to the first event: milliseconds with µs precision
/// (`12.345 ms`), right-aligned in `width` columns.
fn rel_ms(t: &mut String, ns: u64, width: usize) {
    let mut d = [0; 20];
    let n = decimal(ns / 1_000_000, &mut d);
    // "." + three digits + " ms"
    for _ in (n + 7)..width {
        t.push(' ');
    }
    t.push_str(std::str::from_utf8(&d[..n]).unwrap_or_default());
    t.push('.');
    padded(t, (ns / 1000) % 1000, 3, '0');
    t.push_str(" ms");
}

/// A duration in the unit that reads best.
pub fn human_duration(ns: u64) -> String {
    if ns < 1_000_000 {
        format!("{} µs", ns / 1000)
    } else if ns < 1_000_000_000 {
        format!("{}.{:03} ms", ns / 1_000_000, (ns / 1000) % 1000)
    } else {
        format!("{}.{:03} s", ns / 1_000_000_000, (ns / 1_000_000) % 1000)
    }
}

fn opt_bytes(t: &mut String, v: Option<u64>) {
    match v {
        Some(b) => b.append(t),
        None => t.push('?'),
    }
}

/// The first line: who, how it opened and closed, how much, how fast.
pub fn header(conn: &Connection) -> String {
    let mut h = String::with_capacity(128);
    write_header(&mut h, conn);
    h
}

fn write_header(h: &mut String, conn: &Connection) {
    conn.client.append(h);
    h.push_str(" → ");
    conn.server.append(h);
    h.push_str("  ");
    h.push_str(conn.open.name());
    h.push_str(" open, ");
    match conn.close {
        Close::Reset => h.push_str("reset"),
        Close::Unfinished => h.push_str("close unfinished"),
        k => {
            h.push_str(k.name());
            h.push_str(" close");
        }
    }
    h.push_str(", ");
    opt_bytes(h, conn.bytes_client);
    h.push_str(" B → / ← ");
    opt_bytes(h, conn.bytes_server);
    h.push_str(" B");
    if let Some(r) = conn.handshake_rtt_ns {
        h.push_str(", handshake RTT ");
        h.push_str(&human_duration(r));
    }
}

/// The wire part in tcpdump's syntax: `Flags [S.], seq …, ack …, win …`.
/// Sequence numbers are absolute on SYN segments and relative after, as
/// tcpdump prints them (when the ISNs are known).
fn tcpdump_text(s: &mut String, st: &Step) {
    let flags = st.flags.unwrap_or_default();
    let syn = flags.syn();
    let len = st.len.unwrap_or(0);
    s.push_str("Flags [");
    s.push_str(flags.tcpdump(&mut [0; 8]));
    s.push(']');
    let seq = if syn { st.seq } else { st.rel_seq.or(st.seq) };
    if let Some(seq) = seq {
        if len > 0 {
            s.push_str(", seq ");
            seq.append(s);
            s.push(':');
            seq.wrapping_add(len).append(s);
        } else if syn || flags.fin() || flags.rst() {
            s.push_str(", seq ");
            seq.append(s);
        }
    }
    if st.ack.is_some() {
        let ack = if syn { st.ack } else { st.rel_ack.or(st.ack) };
        if let Some(a) = ack {
            s.push_str(", ack ");
            a.append(s);
        }
    }
    if let Some(w) = st.win {
        s.push_str(", win ");
        u64::from(w).append(s);
    }
    if let Some(o) = &st.options {
        let _ = write!(s, ", options [{o}]");
    }
    s.push_str(", length ");
    len.append(s);
}

fn explanation(st: &Step) -> String {
    match (&st.rule, st.explain.is_empty()) {
        (Some(r), false) => format!("{r} — {}", st.explain),
        (Some(r), true) => r.to_string(),
        (None, false) => st.explain.to_string(),
        (None, true) => String::new(),
    }
}

fn side_col(s: Option<Side>) -> &'static str {
    s.map_or("?", Side::name)
}

/// Writes the whole timeline of `conn`, with one `write_all`: the lines
/// are assembled in one String ([`with_text`]), without a `format!`
/// allocation per piece.
pub fn render<W: Write + ?Sized>(conn: &Connection, out: &mut W) -> io::Result<()> {
    with_text(out, |t| write_timeline(t, conn))
}

fn write_timeline(t: &mut String, conn: &Connection) {
    write_header(t, conn);
    t.push('\n');
    let isn = |t: &mut String, v: Option<u32>| match v {
        Some(x) => x.append(t),
        None => t.push('?'),
    };
    t.push_str("  client ISN x = ");
    isn(t, conn.isn_client);
    t.push_str(", server ISN y = ");
    isn(t, conn.isn_server);
    if let Some(by) = conn.closed_by {
        t.push_str("; closed by ");
        t.push_str(by.name());
    }
    if let Some(r) = conn.handshake_rtt_server_ns {
        t.push_str("; server-side RTT ");
        t.push_str(&human_duration(r));
    }
    t.push_str("; ");
    t.push_str(&human_duration(conn.duration_ns));
    t.push_str("; end: ");
    t.push_str(
        &serde_json::to_value(conn.end_reason)
            .ok()
            .and_then(|v| v.as_str().map(str::to_string))
            .unwrap_or_default(),
    );
    if let Some(ns) = conn.netns {
        t.push_str("; netns ");
        ns.append(t);
    }
    t.push('\n');

    for st in &conn.steps {
        match st.kind {
            StepKind::Wire => {
                let from = side_col(st.from);
                let to = st.from.map_or("?", |s| s.peer().name());
                rel_ms(t, st.rel_ns, 12);
                t.push_str("  ");
                t.push_str(from);
                t.push_str(" > ");
                t.push_str(to);
                t.push_str("  ");
                tcpdump_text(t, st);
                t.push('\n');
                let mut e = explanation(st);
                if st.rule.is_none() && st.name != "data" && st.name != "ACK" {
                    e = if e.is_empty() {
                        st.name.to_string()
                    } else {
                        format!("{}: {e}", st.name)
                    };
                }
                if st.retransmission && st.rule.is_some() && !st.name.contains("retransmission") {
                    e.push_str(" (retransmission)");
                }
                if !e.is_empty() {
                    t.push_str(INDENT);
                    t.push_str(&e);
                    t.push('\n');
                }
                if st.observations.len() > 1 || st.observations.iter().any(|o| o.ts_ns != st.ts_ns)
                {
                    let seen: Vec<String> = st
                        .observations
                        .iter()
                        .map(|o| {
                            let mut at = String::new();
                            rel_ms(&mut at, o.ts_ns.saturating_sub(conn.first_ts_ns), 0);
                            format!(
                                "{:?} netns {} if {}{} at {at}",
                                o.dir,
                                o.netns,
                                o.ifindex,
                                o.iface
                                    .as_deref()
                                    .map(|n| format!(" ({n})"))
                                    .unwrap_or_default(),
                            )
                            .to_lowercase()
                        })
                        .collect();
                    t.push_str(INDENT);
                    t.push_str("seen: ");
                    t.push_str(&seen.join("; "));
                    t.push('\n');
                }
            }
            StepKind::Kernel => {
                rel_ms(t, st.rel_ns, 12);
                t.push_str("  kernel  ");
                left_aligned(t, side_col(st.side), 6);
                t.push_str("  ");
                t.push_str(&st.name);
                if let (Some(old), Some(ns)) = (st.oldstate, st.in_state_ns) {
                    t.push_str(" (");
                    t.push_str(old.name());
                    t.push(' ');
                    rel_ms(t, ns, 0);
                    t.push(')');
                }
                if let Some(sk) = st.skaddr {
                    let _ = write!(t, "  sk {sk:#x}");
                }
                if let (Some(pid), Some(comm)) = (st.pid, &st.comm) {
                    if pid != 0 {
                        t.push(' ');
                        t.push_str(&comm.as_str());
                        t.push('[');
                        pid.append(t);
                        t.push(']');
                    }
                }
                t.push('\n');
                let cause = st.matched_step.and_then(|i| conn.steps.get(i));
                if st.explain.is_empty() && cause.is_none() {
                    continue;
                }
                t.push_str(INDENT);
                t.push_str(&st.explain);
                if let Some(c) = cause {
                    if !st.explain.is_empty() {
                        t.push_str(" (");
                    }
                    t.push_str("with ");
                    t.push_str(&c.name);
                    t.push_str(" at ");
                    rel_ms(t, c.rel_ns, 0);
                    if !st.explain.is_empty() {
                        t.push(')');
                    }
                }
                t.push('\n');
            }
            StepKind::Data => {
                rel_ms(t, st.rel_ns, 12);
                t.push_str("  data            ");
                t.push_str(&st.explain);
                t.push('\n');
            }
            StepKind::Inferred => {
                rel_ms(t, st.rel_ns, 12);
                t.push_str("  ");
                left_aligned(t, side_col(st.side), 6);
                t.push_str("          ");
                t.push_str(st.rule.as_deref().unwrap_or(&st.name));
                t.push('\n');
                if !st.explain.is_empty() {
                    t.push_str(INDENT);
                    t.push_str(&st.explain);
                    t.push('\n');
                }
            }
        }
    }

    if !conn.states.is_empty() {
        t.push_str("  time in states:\n");
        for s in &conn.states {
            t.push_str("    ");
            left_aligned(t, s.side.name(), 6);
            let _ = write!(t, " sk {:#x} ", s.skaddr);
            if s.pid != 0 {
                t.push_str(&s.comm.as_str());
                t.push('[');
                s.pid.append(t);
                t.push(']');
            } else {
                t.push_str("owner unknown");
            }
            t.push_str(" netns ");
            s.netns.append(t);
            t.push_str(": ");
            for (i, sp) in s.states.iter().enumerate() {
                if i > 0 {
                    t.push_str(" → ");
                }
                t.push_str(sp.state.name());
                if let Some(ns) = sp.ns {
                    t.push(' ');
                    t.push_str(&human_duration(ns));
                }
            }
            t.push('\n');
        }
    }
    if conn.anomalies.is_empty() {
        t.push_str("  anomalies: none\n");
    } else {
        t.push_str("  anomalies:\n");
        for a in &conn.anomalies {
            t.push_str("    ! ");
            t.push_str(a.kind.name());
            if a.count > 1 {
                t.push_str(" ×");
                a.count.append(t);
            }
            if let Some(s) = a.side {
                t.push_str(" (");
                t.push_str(s.name());
                t.push(')');
            }
            t.push_str(": ");
            t.push_str(&a.detail);
            t.push('\n');
        }
    }
}

/// The timeline as a string (tests, logs).
pub fn to_string(conn: &Connection) -> String {
    let mut v = Vec::new();
    // Writing to a Vec cannot fail.
    let _ = render(conn, &mut v);
    String::from_utf8_lossy(&v).into_owned()
}
