//! Stage 5: what people and scripts read. One line per event (text or JSON
//! Lines), connection summaries and timelines (see [`crate::timeline`]).
use std::io::Write;
use std::net::IpAddr;

use serde::Serialize;

use crate::event::{Event, Segment, StateChange};
use crate::matcher::Connection;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Explained timeline per connection when it ends.
    Timeline,
    /// One line per event as it arrives.
    Events,
    /// JSON Lines: every event, then connection summaries.
    Json,
}

/// Converts event timestamps to wall-clock time for the text output.
#[derive(Clone, Copy)]
pub struct Clock {
    /// Add to an event's ts_ns to get ns since the epoch.
    pub offset_ns: i128,
}

impl Clock {
    /// Live events carry CLOCK_MONOTONIC (bpf_ktime_get_ns).
    pub fn monotonic() -> Self {
        let now = |id| {
            let mut ts = libc::timespec {
                tv_sec: 0,
                tv_nsec: 0,
            };
            // SAFETY: valid clock id and out pointer.
            unsafe { libc::clock_gettime(id, &mut ts) };
            ts.tv_sec as i128 * 1_000_000_000 + ts.tv_nsec as i128
        };
        Clock {
            offset_ns: now(libc::CLOCK_REALTIME) - now(libc::CLOCK_MONOTONIC),
        }
    }

    /// Capture files already carry epoch timestamps.
    pub fn epoch() -> Self {
        Clock { offset_ns: 0 }
    }

    /// `HH:MM:SS.uuuuuu` (UTC), as tcpdump prints with -tt converted.
    pub fn hms(&self, ts_ns: u64) -> String {
        let t = (ts_ns as i128 + self.offset_ns).max(0) as u128;
        let secs = t / 1_000_000_000;
        let us = (t % 1_000_000_000) / 1000;
        format!(
            "{:02}:{:02}:{:02}.{:06}",
            (secs / 3600) % 24,
            (secs / 60) % 60,
            secs % 60,
            us
        )
    }
}

pub fn endpoint(addr: &IpAddr, port: u16) -> String {
    match addr {
        IpAddr::V4(a) => format!("{a}:{port}"),
        IpAddr::V6(a) => format!("[{a}]:{port}"),
    }
}

pub fn state_line(s: &StateChange, clock: &Clock) -> String {
    let in_old = if s.prev_state_ns > 0 {
        format!(
            "  ({:.3} ms in {})",
            s.prev_state_ns as f64 / 1e6,
            s.oldstate
        )
    } else {
        String::new()
    };
    format!(
        "{} {:>7} {:<15} {} → {}  {} → {}{}",
        clock.hms(s.ts_ns),
        s.pid,
        s.comm,
        endpoint(&s.saddr, s.sport),
        endpoint(&s.daddr, s.dport),
        s.oldstate,
        s.newstate,
        in_old
    )
}

/// tcpdump's one-line form, absolute sequence numbers (`-S`).
pub fn segment_line(s: &Segment, clock: &Clock) -> String {
    let ip = if s.saddr.is_ipv4() { "IP" } else { "IP6" };
    let dot = |a: &IpAddr, p: u16| format!("{a}.{p}");
    let mut line = format!(
        "{} {} {:<7} {ip} {} > {}: Flags [{}], seq {}",
        clock.hms(s.ts_ns),
        s.iface.as_deref().unwrap_or("-"),
        dir_word(s),
        dot(&s.saddr, s.sport),
        dot(&s.daddr, s.dport),
        s.flags,
        s.seq
    );
    if s.len > 0 {
        line.push_str(&format!(":{}", s.seq.wrapping_add(s.len)));
    }
    if s.flags.ack() {
        line.push_str(&format!(", ack {}", s.ack));
    }
    line.push_str(&format!(", win {}", s.win));
    if !s.options.is_empty() {
        line.push_str(&format!(", options [{}]", s.options));
    }
    line.push_str(&format!(", length {}", s.len));
    line
}

fn dir_word(s: &Segment) -> &'static str {
    match s.dir {
        crate::event::Dir::Ingress => "ingress",
        crate::event::Dir::Egress => "egress",
        crate::event::Dir::Capture => "",
    }
}

#[derive(Serialize)]
struct Tagged<'a, T: Serialize> {
    #[serde(rename = "type")]
    kind: &'static str,
    #[serde(flatten)]
    inner: &'a T,
}

pub fn event_json(ev: &Event) -> String {
    let r = match ev {
        Event::State(s) => serde_json::to_string(&Tagged {
            kind: "state",
            inner: s,
        }),
        Event::Segment(s) => serde_json::to_string(&Tagged {
            kind: "segment",
            inner: s,
        }),
    };
    r.unwrap_or_else(|e| format!("{{\"type\":\"error\",\"error\":\"{e}\"}}"))
}

pub fn event_line(ev: &Event, clock: &Clock) -> String {
    match ev {
        Event::State(s) => state_line(s, clock),
        Event::Segment(s) => segment_line(s, clock),
    }
}

/// Writes a finished connection in the chosen mode.
pub fn connection(out: &mut dyn Write, mode: Mode, c: &Connection) -> std::io::Result<()> {
    match mode {
        Mode::Json => {
            let line = serde_json::to_string(c).map_err(std::io::Error::other)?;
            writeln!(out, "{line}")
        }
        Mode::Timeline => {
            crate::timeline::render(c, out)?;
            writeln!(out)
        }
        Mode::Events => Ok(()),
    }
}
