//! Scale scenario: many concurrent idle connections (`tcpstorm --idle N`)
//! opened, held and closed while `tcptrace --json` (wire on lo) runs. Does
//! its memory stay bounded, what does a tracked connection cost, are the
//! kernel maps capped, is anything lost without being reported?
use std::time::Duration;

use anyhow::{Context as _, Result};

use super::json::{self, J};
use super::proc::{Kind, Storm, Tracer};
use super::{count, Ctx, PerConn, Scenario};

/// tcptrace's `MatcherConfig::default().max_connections`.
const MATCHER_CAP: u64 = 65_536;

struct Phase {
    rss_kb: Option<u64>,
    catch_up_s: f64,
    maps: Vec<super::proc::BpfMap>,
}

struct ScaleRun {
    conns: u64,
    processes: u64,
    open_s: f64,
    close_s: f64,
    rss_base_kb: u64,
    opened: Phase,
    closed: Phase,
    usage: super::proc::Usage,
    missed: u64,
    out: count::Output,
}

fn phase(t: &Tracer, with_maps: bool) -> Phase {
    let catch_up_s = t.wait_quiet(Duration::from_millis(800), Duration::from_secs(180));
    Phase {
        rss_kb: t.rss_kb(),
        catch_up_s,
        maps: if with_maps { t.bpf_maps() } else { Vec::new() },
    }
}

fn one(ctx: &Ctx, n: usize, rate: f64, maps: bool) -> Result<ScaleRun> {
    let mut storm = Storm::start(
        &ctx.bins.tcpstorm,
        &[
            "--idle".into(),
            n.to_string(),
            "--rate".into(),
            rate.to_string(),
        ],
    )?;
    let (out, err) = ctx.out_paths(&format!("scale-{n}"));
    let mut args: Vec<String> = vec![
        "--json".into(),
        "-p".into(),
        storm.port.to_string(),
        "--iface".into(),
        "lo".into(),
    ];
    args.extend(ctx.extra.iter().cloned());
    let t = Tracer::start(
        Kind::Tcptrace,
        &ctx.bins.tcptrace,
        &args,
        out.clone(),
        err.clone(),
    )?;
    std::thread::sleep(Duration::from_millis(300));
    let rss_base_kb = t.rss_kb().unwrap_or(0);
    storm.go()?;
    let opened_line = storm.expect("opened")?;
    let opened = phase(&t, maps);
    storm.go()?;
    let closed_line = storm.expect("closed")?;
    storm.finish()?;
    let closed = phase(&t, maps);
    let missed = t.prog_misses();
    let usage = t.stop()?;
    let out_c = count::tcptrace(&out, false)?;
    // tcptrace's own count is net of what its sock_ops backup delivered.
    let missed = out_c.missed.unwrap_or(missed);
    ctx.discard(&[&out, &err]);
    Ok(ScaleRun {
        conns: json::field_u64(&opened_line, "conns").context("opened line")?,
        processes: json::field_u64(&opened_line, "processes").unwrap_or(1),
        open_s: json::field_f64(&opened_line, "open_s").unwrap_or(0.0),
        close_s: json::field_f64(&closed_line, "close_s").unwrap_or(0.0),
        rss_base_kb,
        opened,
        closed,
        usage,
        missed,
        out: out_c,
    })
}

fn maps_json(m: &[super::proc::BpfMap]) -> J {
    J::A(m.iter().map(|m| m.json()).collect())
}

fn maps_line(m: &[super::proc::BpfMap]) -> String {
    m.iter()
        .filter(|m| m.entries.is_some())
        .map(|m| format!("{} {}/{}", m.name, m.entries.unwrap_or(0), m.max_entries))
        .collect::<Vec<_>>()
        .join(", ")
}

/// TcpExt counter from /proc/net/netstat.
fn tcp_ext(name: &str) -> u64 {
    let s = std::fs::read_to_string("/proc/net/netstat").unwrap_or_default();
    let lines: Vec<&str> = s.lines().filter(|l| l.starts_with("TcpExt:")).collect();
    if let [names, values, ..] = lines[..] {
        if let Some(i) = names.split_whitespace().position(|x| x == name) {
            return values
                .split_whitespace()
                .nth(i)
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
        }
    }
    0
}

/// Each connection leaves a TIME_WAIT socket; once tcp_max_tw_buckets is
/// reached the kernel closes differently (RST instead of the last ACK, FIN_WAIT2
/// cut short), so the per-connection event count would drift away from the
/// calibration. Wait (at most 65 s, TIME_WAIT lasts 60) until there is room.
fn wait_time_wait_room(n: usize) {
    let t0 = std::time::Instant::now();
    loop {
        let (tw, max) = super::time_wait();
        if tw + n as u64 + 1000 <= max || t0.elapsed() > Duration::from_secs(65) {
            if t0.elapsed() > Duration::from_secs(1) {
                eprintln!(
                    "bench: waited {:.0} s for TIME_WAIT sockets to expire ({tw} left, max {max})",
                    t0.elapsed().as_secs_f64()
                );
            }
            return;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

pub fn run(ctx: &Ctx, n: usize, rate: f64) -> Result<Scenario> {
    // Calibration: events per idle connection (open, hold, close).
    const CAL: u64 = 200;
    wait_time_wait_room(CAL as usize);
    let cal = one(ctx, CAL as usize, rate, false)?;
    let pc = PerConn::from_counts(CAL, cal.out.states + cal.missed, cal.out.segments);
    eprintln!(
        "bench: scale calibration: {CAL} idle connections -> {} + {} per connection (+{} / +{} per run), {:?} lost",
        pc.states, pc.segments, pc.state_extra, pc.segment_extra, cal.out.lost
    );
    eprintln!("bench: scale: {n} concurrent idle connections under tcptrace (wire on lo), {rate} opened (and closed) per second…");
    wait_time_wait_room(n);
    let overflow0 = tcp_ext("TCPTimeWaitOverflow");
    let r = one(ctx, n, rate, true)?;
    let tw_overflow = tcp_ext("TCPTimeWaitOverflow").saturating_sub(overflow0);
    let expected = pc.expected_states(r.conns) + pc.expected_segments(r.conns);
    let delivered = r.out.delivered();
    let lost = r.out.lost.unwrap_or(0);
    let missed = r.missed;
    let rescued = r.out.rescued.unwrap_or(0);
    let duplicates = r.out.duplicates.unwrap_or(0);
    let unaccounted = expected as i64 - delivered as i64 - lost as i64 - missed as i64;
    let kb = |x: Option<u64>| x.unwrap_or(0);
    let peak = r
        .usage
        .maxrss_kb
        .context("the tracer exited before its RSS could be read")?;
    let per_conn_open =
        (kb(r.opened.rss_kb).saturating_sub(r.rss_base_kb)) as f64 * 1024.0 / r.conns as f64;
    let per_conn_peak = peak.saturating_sub(r.rss_base_kb) as f64 * 1024.0 / r.conns as f64;
    let evicted = r.out.records.get("evicted").copied().unwrap_or(0);
    // Evictions mean the matcher was full: it held MATCHER_CAP connections.
    let tracked = if evicted > 0 {
        r.conns.min(MATCHER_CAP)
    } else {
        r.conns
    }
    .max(1);
    let per_tracked =
        (kb(r.opened.rss_kb).saturating_sub(r.rss_base_kb)) as f64 * 1024.0 / tracked as f64;
    let records: Vec<String> = r
        .out
        .records
        .iter()
        .map(|(k, v)| format!("{k} {v}"))
        .collect();
    let hash_full = r
        .opened
        .maps
        .iter()
        .any(|m| m.entries.is_some_and(|e| e >= m.max_entries));

    let mut md = format!(
        "\n## Scale: {} concurrent idle connections on loopback ({} process(es), paced at {rate}/s: opened in {:.1} s, closed in {:.1} s), tcptrace --json, wire on lo\n\n\
         | | value |\n|---|---:|\n\
         | tracer RSS attached, idle | {:.1} MiB |\n\
         | tracer RSS with all connections open | {:.1} MiB |\n\
         | tracer RSS after close | {:.1} MiB |\n\
         | tracer peak RSS (VmHWM) | {:.1} MiB |\n\
         | RSS per open connection (open − idle) | {:.0} B |\n\
         | RSS per tracked connection (open − idle) / min(conns, matcher cap {MATCHER_CAP} if it evicted) | {:.0} B |\n\
         | peak RSS per connection (peak − idle) | {:.0} B |\n\
         | events expected ({} + {} per connection) | {expected} |\n\
         | events delivered | {delivered} |\n\
         | events lost (reported) | {lost} |\n\
         | events skipped by the kernel and lost (tcptrace's `missed`: the state tracepoint's recursion_misses less what its sock_ops backup delivered) | {missed} |\n\
         | state changes the kernel skipped the tracepoint for, delivered by sock_ops (tcptrace's `rescued`) | {rescued} |\n\
         | state changes delivered twice, dropped by tcptrace (`duplicates`) | {duplicates} |\n\
         | unaccounted | {unaccounted} |\n\
         | where state changes are missing: breaks inside a socket's chain / sockets whose last change seen is not CLOSE | {} / {} |\n\
         | holes tcptrace itself reports (`state_gap` anomalies in its connection records) | {} |\n\
         | tracer CPU (user+sys) | {:.2} s |\n\
         | catch-up after open / close | {:.2} s / {:.2} s |\n\
         | connection records by end reason | {} |\n\
         | kernel hash maps with all open (entries/max) | {} |\n\
         | kernel hash maps after close | {} |\n",
        r.conns,
        r.processes,
        r.open_s,
        r.close_s,
        r.rss_base_kb as f64 / 1024.0,
        kb(r.opened.rss_kb) as f64 / 1024.0,
        kb(r.closed.rss_kb) as f64 / 1024.0,
        peak as f64 / 1024.0,
        per_conn_open,
        per_tracked,
        per_conn_peak,
        pc.states,
        pc.segments,
        r.out.chains.breaks,
        r.out.chains.unfinished_line(),
        r.out.state_gaps.map_or("–".into(), |n| n.to_string()),
        r.usage.cpu_s,
        r.opened.catch_up_s,
        r.closed.catch_up_s,
        if records.is_empty() { "none".into() } else { records.join(", ") },
        maps_line(&r.opened.maps),
        maps_line(&r.closed.maps),
    );
    if tw_overflow > 0 {
        md.push_str(&format!(
            "\nThe kernel's TIME_WAIT table overflowed {tw_overflow} times (more connections than tcp_max_tw_buckets): those connections close differently, so \"expected\" is approximate.\n"
        ));
    }
    if hash_full {
        md.push_str("\nA kernel map was full with all connections open: LRU maps evict their oldest entries (bounded by design).\n");
    }
    let targets = vec![
        (
            format!("scale ({} conns): events lost = 0 or reported", r.conns),
            unaccounted == 0,
            format!(
                "{delivered} delivered + {lost} lost to a full ring + {missed} skipped by the kernel (both reported) of {expected} expected; {unaccounted} unaccounted"
            ),
        ),
        (
            format!("scale ({} conns): no event lost", r.conns),
            lost == 0 && missed == 0 && unaccounted == 0,
            format!("{lost} reported lost, {missed} skipped by the kernel"),
        ),
        (
            format!("scale ({} conns): kernel maps bounded", r.conns),
            r.opened.maps.iter().all(|m| m.entries.unwrap_or(0) <= m.max_entries),
            format!("with all connections open: {}", maps_line(&r.opened.maps)),
        ),
        (
            format!("scale ({} conns): matcher bounded (≤ {MATCHER_CAP} connections held)", r.conns),
            tracked <= MATCHER_CAP && (r.conns <= MATCHER_CAP || evicted > 0),
            format!(
                "{evicted} records evicted (the cap at work), ≤ {tracked} held; peak RSS {:.1} MiB, {:.0} B per tracked connection",
                peak as f64 / 1024.0,
                per_tracked
            ),
        ),
    ];
    let j = J::obj()
        .with("connections", r.conns)
        .with("processes", r.processes)
        .with("open_s", r.open_s)
        .with("close_s", r.close_s)
        .with("rss_idle_kb", r.rss_base_kb)
        .with("rss_open_kb", r.opened.rss_kb)
        .with("rss_closed_kb", r.closed.rss_kb)
        .with("maxrss_kb", peak)
        .with("bytes_per_open_conn", per_conn_open)
        .with("bytes_per_tracked_conn", per_tracked)
        .with("peak_bytes_per_conn", per_conn_peak)
        .with("events_expected", expected)
        .with("events_delivered", delivered)
        .with("states", r.out.states)
        .with("segments", r.out.segments)
        .with("events_lost_reported", lost)
        .with("events_skipped_by_kernel", missed)
        .with("rescued_by_sock_ops", rescued)
        .with("duplicates_dropped", duplicates)
        .with("events_unaccounted", unaccounted)
        .with("state_chain_breaks", r.out.chains.breaks)
        .with("sockets_unfinished", r.out.chains.unfinished_line())
        .with("state_gap_anomalies", r.out.state_gaps)
        .with("states_per_conn", pc.states)
        .with("segments_per_conn", pc.segments)
        .with("cpu_user_s", r.usage.user_s)
        .with("cpu_sys_s", r.usage.sys_s)
        .with("catch_up_open_s", r.opened.catch_up_s)
        .with("catch_up_close_s", r.closed.catch_up_s)
        .with(
            "records",
            J::O(
                r.out
                    .records
                    .iter()
                    .map(|(k, v)| (k.clone(), J::U(*v)))
                    .collect(),
            ),
        )
        .with("time_wait_overflows", tw_overflow)
        .with("maps_open", maps_json(&r.opened.maps))
        .with("maps_closed", maps_json(&r.closed.maps));
    Ok((j, md, targets))
}
