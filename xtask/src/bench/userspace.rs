//! Userspace scenario: what tcptrace's own pipeline (decode → matcher →
//! output) costs per event, with no kernel tracer and no root. A capture of
//! many short connections (`tcptrace/examples/storm_capture.rs`) goes through
//! `tcptrace pcap` in each output mode, its output written to a file as a
//! user would; CPU time (user+sys, so the write(2)s count) comes from
//! wait4(2), peak RSS from the process's own `VmHWM`.
//!
//! The figures include reading and decoding the capture, which live tracing
//! does not have; the capture is mapped and streamed through the matcher,
//! so peak RSS is the matcher's and a part of the file at a time.
//!
//! A capture has no kernel state changes, which are most of a live trace;
//! `tcptrace/examples/storm_events.rs` makes up those of a storm in memory
//! and times matching and rendering alone (no decoding, no write(2)): the
//! part of the live per-event cost that is tcptrace's own code.
use std::path::Path;
use std::process::Command;
use std::time::Instant;

use anyhow::{bail, Context as _, Result};

use super::json::J;
use super::proc::{run_to_end, Usage};
use super::{median, Ctx, Scenario};

/// The output modes, as `tcptrace pcap` takes them.
const MODES: [(&str, &[&str]); 3] = [
    ("json", &["--json"]),
    ("timeline", &[]),
    ("events", &["--events"]),
];

struct Run {
    usage: Usage,
    wall_s: f64,
    out_bytes: u64,
}

/// Writes the capture; returns how many segments (events) it holds.
fn write_capture(gen: &Path, file: &Path, conns: usize) -> Result<u64> {
    let out = Command::new(gen)
        .arg(file)
        .arg(conns.to_string())
        .output()
        .with_context(|| format!("cannot start {}", gen.display()))?;
    if !out.status.success() {
        bail!(
            "{} failed: {}",
            gen.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .context("storm_capture's segment count")
}

pub fn run(ctx: &Ctx, conns: usize, rounds: usize) -> Result<Scenario> {
    let capture = ctx.dir.join(format!("storm-{conns}.pcap"));
    let events = write_capture(&ctx.bins.storm_capture, &capture, conns)?;
    let file = capture.to_string_lossy().into_owned();
    eprintln!("bench: userspace: {conns} connections, {events} segments in {file}");
    let mut md = format!(
        "\n## Userspace: `tcptrace pcap` over {conns} short connections ({events} segments), {rounds} rounds (medians)\n\n\
         | output | CPU ns / event (user+sys) | user ns / event | sys ns / event | wall s | peak RSS MiB | output MiB |\n\
         |---|---:|---:|---:|---:|---:|---:|\n"
    );
    let mut j = J::obj().with("connections", conns).with("events", events);
    let mut targets = Vec::new();
    for (mode, flags) in MODES {
        let mut runs = Vec::new();
        for round in 0..rounds {
            let (out, err) = ctx.out_paths(&format!("userspace-{mode}-{round}"));
            let mut args = vec!["pcap"];
            args.extend_from_slice(flags);
            args.push(&file);
            let t0 = Instant::now();
            let usage = run_to_end(&ctx.bins.tcptrace, &args, &out, &err)?;
            let wall_s = t0.elapsed().as_secs_f64();
            if !usage.exit_ok {
                bail!(
                    "tcptrace pcap {mode} failed: {}",
                    std::fs::read_to_string(&err).unwrap_or_default().trim()
                );
            }
            let out_bytes = std::fs::metadata(&out).map_or(0, |m| m.len());
            ctx.discard(&[&out, &err]);
            runs.push(Run {
                usage,
                wall_s,
                out_bytes,
            });
        }
        let per_event = |f: &dyn Fn(&Run) -> f64| {
            median(runs.iter().map(|r| f(r) * 1e9 / events as f64).collect())
        };
        let cpu_ns = per_event(&|r| r.usage.cpu_s);
        let user_ns = per_event(&|r| r.usage.user_s);
        let sys_ns = per_event(&|r| r.usage.sys_s);
        let wall_s = median(runs.iter().map(|r| r.wall_s).collect());
        let rss_mib = median(
            runs.iter()
                .filter_map(|r| Some(r.usage.maxrss_kb? as f64 / 1024.0))
                .collect(),
        );
        let out_mib = runs.first().map_or(0.0, |r| r.out_bytes as f64 / 1048576.0);
        eprintln!("bench: userspace {mode}: {cpu_ns:.0} ns/event, {rss_mib:.1} MiB peak RSS");
        md.push_str(&format!(
            "| {mode} | {cpu_ns:.0} | {user_ns:.0} | {sys_ns:.0} | {wall_s:.2} | {rss_mib:.1} | {out_mib:.1} |\n"
        ));
        j.set(
            mode,
            J::obj()
                .with("cpu_ns_per_event", cpu_ns)
                .with("user_ns_per_event", user_ns)
                .with("sys_ns_per_event", sys_ns)
                .with("wall_s", wall_s)
                .with("peak_rss_mib", rss_mib)
                .with("output_mib", out_mib),
        );
        if mode == "json" {
            targets.push((
                "userspace (tcptrace pcap --json): well under 1 µs per event".to_string(),
                cpu_ns < 500.0,
                format!("{cpu_ns:.0} ns/event, capture decoding included (target read as < 500)"),
            ));
        }
    }
    ctx.discard(&[&capture]);
    states(ctx, conns, rounds, &mut j, &mut md, &mut targets)?;
    Ok((j, md, targets))
}

/// The storm's kernel state changes through the matcher and each output
/// mode, in memory (`storm_events`).
fn states(
    ctx: &Ctx,
    conns: usize,
    rounds: usize,
    j: &mut J,
    md: &mut String,
    targets: &mut Vec<(String, bool, String)>,
) -> Result<()> {
    md.push_str(&format!(
        "\n### Kernel state changes (and with wire on, control segments) of {conns} storm connections, matched and rendered in memory (`storm_events`), {rounds} rounds (medians)\n\n\
         | output | CPU ns / event | output bytes / event |\n|---|---:|---:|\n"
    ));
    let mut js = J::obj().with("connections", conns);
    // Each output mode, then JSON with the segments wire capture adds.
    let runs = MODES.iter().map(|&(mode, _)| (mode, mode, None)).chain([(
        "json_wire",
        "json, wire on",
        Some("wire"),
    )]);
    for (key, label, wire) in runs {
        let mode = if wire.is_some() { "json" } else { key };
        let mut ns = Vec::new();
        let mut bytes = 0.0;
        for _ in 0..rounds {
            let out = Command::new(&ctx.bins.storm_events)
                .args([conns.to_string().as_str(), mode])
                .args(wire)
                .output()
                .with_context(|| format!("cannot start {}", ctx.bins.storm_events.display()))?;
            if !out.status.success() {
                bail!(
                    "storm_events {mode} failed: {}",
                    String::from_utf8_lossy(&out.stderr).trim()
                );
            }
            let line = String::from_utf8_lossy(&out.stdout);
            let field = |key: &str| -> Result<f64> {
                let rest = line
                    .split(&format!("\"{key}\":"))
                    .nth(1)
                    .with_context(|| format!("no {key} in storm_events output {line:?}"))?;
                let num: String = rest
                    .chars()
                    .take_while(|c| c.is_ascii_digit() || *c == '.')
                    .collect();
                num.parse().with_context(|| format!("{key} in {line:?}"))
            };
            ns.push(field("cpu_ns_per_event")?);
            bytes = field("bytes_per_event")?;
        }
        let ns = median(ns);
        eprintln!("bench: userspace states {label}: {ns:.0} ns/event");
        md.push_str(&format!("| {label} | {ns:.0} | {bytes:.0} |\n"));
        js.set(
            key,
            J::obj()
                .with("cpu_ns_per_event", ns)
                .with("bytes_per_event", bytes),
        );
        if mode == "json" {
            let what = if wire.is_some() {
                "state changes and control segments"
            } else {
                "state changes"
            };
            targets.push((
                format!("userspace ({what} matched and rendered as JSON, in memory): well under 1 µs per event"),
                ns < 500.0,
                format!("{ns:.0} ns/event (target read as < 500)"),
            ));
        }
    }
    j.set("states", js);
    Ok(())
}
