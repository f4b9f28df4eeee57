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

use std::io::{self, Write};

use crate::matcher::{Close, Connection, Side, Step, StepKind};

const INDENT: &str = "                                ";

/// Time relative to the first event: milliseconds with µs precision.
fn rel_ms(ns: u64) -> String {
    format!("{}.{:03} ms", ns / 1_000_000, (ns / 1000) % 1000)
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

fn opt_bytes(v: Option<u64>) -> String {
    v.map_or_else(|| "?".to_string(), |b| b.to_string())
}

/// The first line: who, how it opened and closed, how much, how fast.
pub fn header(conn: &Connection) -> String {
    let close = match conn.close {
        Close::Reset => "reset".to_string(),
        Close::Unfinished => "close unfinished".to_string(),
        k => format!("{} close", k.name()),
    };
    let mut h = format!(
        "{} → {}  {} open, {}, {} B → / ← {} B",
        conn.client,
        conn.server,
        conn.open.name(),
        close,
        opt_bytes(conn.bytes_client),
        opt_bytes(conn.bytes_server)
    );
    if let Some(r) = conn.handshake_rtt_ns {
        h.push_str(&format!(", handshake RTT {}", human_duration(r)));
    }
    h
}

/// The wire part in tcpdump's syntax: `Flags [S.], seq …, ack …, win …`.
/// Sequence numbers are absolute on SYN segments and relative after, as
/// tcpdump prints them (when the ISNs are known).
fn tcpdump_text(st: &Step) -> String {
    let flags = st.flags.unwrap_or_default();
    let syn = flags.syn();
    let len = st.len.unwrap_or(0);
    let mut s = format!("Flags [{flags}]");
    let seq = if syn { st.seq } else { st.rel_seq.or(st.seq) };
    if let Some(seq) = seq {
        if len > 0 {
            s.push_str(&format!(", seq {seq}:{}", seq.wrapping_add(len)));
        } else if syn || flags.fin() || flags.rst() {
            s.push_str(&format!(", seq {seq}"));
        }
    }
    if st.ack.is_some() {
        let ack = if syn { st.ack } else { st.rel_ack.or(st.ack) };
        if let Some(a) = ack {
            s.push_str(&format!(", ack {a}"));
        }
    }
    if let Some(w) = st.win {
        s.push_str(&format!(", win {w}"));
    }
    if let Some(o) = &st.options {
        s.push_str(&format!(", options [{o}]"));
    }
    s.push_str(&format!(", length {len}"));
    s
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

/// Writes the whole timeline of `conn`.
pub fn render<W: Write + ?Sized>(conn: &Connection, out: &mut W) -> io::Result<()> {
    writeln!(out, "{}", header(conn))?;
    let isn = |v: Option<u32>| v.map_or_else(|| "?".to_string(), |x| x.to_string());
    let mut second = format!(
        "  client ISN x = {}, server ISN y = {}",
        isn(conn.isn_client),
        isn(conn.isn_server)
    );
    if let Some(by) = conn.closed_by {
        second.push_str(&format!("; closed by {}", by.name()));
    }
    if let Some(r) = conn.handshake_rtt_server_ns {
        second.push_str(&format!("; server-side RTT {}", human_duration(r)));
    }
    second.push_str(&format!(
        "; {}; end: {}",
        human_duration(conn.duration_ns),
        serde_json::to_value(conn.end_reason)
            .ok()
            .and_then(|v| v.as_str().map(str::to_string))
            .unwrap_or_default()
    ));
    if let Some(ns) = conn.netns {
        second.push_str(&format!("; netns {ns}"));
    }
    writeln!(out, "{second}")?;

    for st in &conn.steps {
        let t = format!("{:>12}", rel_ms(st.rel_ns));
        match st.kind {
            StepKind::Wire => {
                let from = side_col(st.from);
                let to = st.from.map_or("?", |s| s.peer().name());
                writeln!(out, "{t}  {from} > {to}  {}", tcpdump_text(st))?;
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
                    writeln!(out, "{INDENT}{e}")?;
                }
                if st.observations.len() > 1 || st.observations.iter().any(|o| o.ts_ns != st.ts_ns)
                {
                    let seen: Vec<String> = st
                        .observations
                        .iter()
                        .map(|o| {
                            format!(
                                "{:?} netns {} if {}{} at {}",
                                o.dir,
                                o.netns,
                                o.ifindex,
                                o.iface
                                    .as_deref()
                                    .map(|n| format!(" ({n})"))
                                    .unwrap_or_default(),
                                rel_ms(o.ts_ns.saturating_sub(conn.first_ts_ns))
                            )
                            .to_lowercase()
                        })
                        .collect();
                    writeln!(out, "{INDENT}seen: {}", seen.join("; "))?;
                }
            }
            StepKind::Kernel => {
                let mut line = format!("{t}  kernel  {:<6}  {}", side_col(st.side), st.name);
                if let (Some(old), Some(ns)) = (st.oldstate, st.in_state_ns) {
                    line.push_str(&format!(" ({old} {})", rel_ms(ns)));
                }
                if let Some(sk) = st.skaddr {
                    line.push_str(&format!("  sk {sk:#x}"));
                }
                if let (Some(pid), Some(comm)) = (st.pid, &st.comm) {
                    if pid != 0 {
                        line.push_str(&format!(" {comm}[{pid}]"));
                    }
                }
                writeln!(out, "{line}")?;
                let mut e = st.explain.to_string();
                if let Some(c) = st.matched_step.and_then(|i| conn.steps.get(i)) {
                    let cause = format!("with {} at {}", c.name, rel_ms(c.rel_ns));
                    e = if e.is_empty() {
                        cause
                    } else {
                        format!("{e} ({cause})")
                    };
                }
                if !e.is_empty() {
                    writeln!(out, "{INDENT}{e}")?;
                }
            }
            StepKind::Data => {
                writeln!(out, "{t}  data            {}", st.explain)?;
            }
            StepKind::Inferred => {
                writeln!(
                    out,
                    "{t}  {:<6}          {}",
                    side_col(st.side),
                    st.rule.as_deref().unwrap_or(&st.name)
                )?;
                if !st.explain.is_empty() {
                    writeln!(out, "{INDENT}{}", st.explain)?;
                }
            }
        }
    }

    if !conn.states.is_empty() {
        writeln!(out, "  time in states:")?;
        for s in &conn.states {
            let spans: Vec<String> = s
                .states
                .iter()
                .map(|sp| match sp.ns {
                    Some(ns) => format!("{} {}", sp.state, human_duration(ns)),
                    None => sp.state.to_string(),
                })
                .collect();
            let owner = if s.pid != 0 {
                format!("{}[{}]", s.comm, s.pid)
            } else {
                "owner unknown".to_string()
            };
            writeln!(
                out,
                "    {:<6} sk {:#x} {owner} netns {}: {}",
                s.side.name(),
                s.skaddr,
                s.netns,
                spans.join(" → ")
            )?;
        }
    }
    if conn.anomalies.is_empty() {
        writeln!(out, "  anomalies: none")?;
    } else {
        writeln!(out, "  anomalies:")?;
        for a in &conn.anomalies {
            let mut line = format!("    ! {}", a.kind.name());
            if a.count > 1 {
                line.push_str(&format!(" ×{}", a.count));
            }
            if let Some(s) = a.side {
                line.push_str(&format!(" ({})", s.name()));
            }
            line.push_str(&format!(": {}", a.detail));
            writeln!(out, "{line}")?;
        }
    }
    Ok(())
}

/// The timeline as a string (tests, logs).
pub fn to_string(conn: &Connection) -> String {
    let mut v = Vec::new();
    // Writing to a Vec cannot fail.
    let _ = render(conn, &mut v);
    String::from_utf8_lossy(&v).into_owned()
}
