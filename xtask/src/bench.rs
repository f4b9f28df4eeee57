//! `cargo xtask bench`: how much does tracing cost a connection-heavy
//! workload, and does it drop anything?
//!
//! Storm scenario: `tcpstorm` (xtask/src/bin/tcpstorm.rs) opens and closes
//! short connections on 127.0.0.1 as fast as it can (the server closes
//! first: a client-first storm leaves TIME_WAIT sockets on the client's
//! ports, and connect(2)'s speed then swings 2-3x with the TIME_WAIT table's
//! fill, which drowns the tracer's cost), alone and under each
//! tracer, interleaved (A B C D, then D C B A, …) so drift cancels out. Each
//! tracer writes its full output to a file, as a user would; afterwards we
//! count what it delivered against what the connection count says it should
//! have (per-connection counts measured by a calibration run), read what it
//! reported lost, and take its CPU time from wait4(2) and its peak RSS from
//! its /proc status (`VmHWM`; see `proc`). One more
//! wire-on run with the kernel's BPF statistics on gives the eBPF programs'
//! own cost (ns per run, paid by the storm), and a timed write of a scratch
//! file what writing output costs on this machine, which varies.
//!
//! Scale scenario: 100,000 concurrent idle connections opened, held and
//! closed while tcptrace runs: its memory per connection, and whether the
//! kernel maps and the matcher stay bounded.
//!
//! Userspace scenario (also alone, without root: `--userspace`): tcptrace's
//! own per-event cost over a capture file, see bench/userspace.rs.
//!
//! Results: a markdown table on stdout; JSON in target/bench/
//! (bench-<UTC time>.json and latest.json).
mod count;
mod json;
mod proc;
mod scale;
mod userspace;

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context as _, Result};

use json::J;
use proc::{Kind, Storm, Tracer};

#[derive(clap::Args)]
pub struct BenchArgs {
    /// A fast pass: 2 s storms and a 20,000-connection scale scenario
    /// (explicit --duration / --scale-conns still win).
    #[arg(long)]
    quick: bool,
    /// Rounds per configuration (results are medians over rounds).
    #[arg(long, default_value_t = 5)]
    rounds: usize,
    /// Seconds per storm run [default: 5, or 2 with --quick].
    #[arg(long, value_name = "SECS")]
    duration: Option<f64>,
    /// Storm client threads (the storm's server gets as many) [default: two
    /// per CPU]. One per CPU leaves the CPUs 2-17 % idle while a thread
    /// waits for the other CPU's softirq or wakeup, and how much moves with
    /// the host's wakeup latency: the bench measures at saturation.
    #[arg(long, value_name = "N")]
    threads: Option<usize>,
    /// Concurrent idle connections in the scale scenario [default: 100000,
    /// or 20000 with --quick].
    #[arg(long, value_name = "N")]
    scale_conns: Option<usize>,
    /// Connections opened (and closed) per second in the scale scenario, in
    /// total (0: as fast as the machine can).
    #[arg(long, default_value_t = 20_000.0, value_name = "PER_S")]
    scale_rate: f64,
    /// Skip the scale scenario.
    #[arg(long)]
    no_scale: bool,
    /// Skip the storm scenario.
    #[arg(long)]
    no_storm: bool,
    /// Only the userspace scenario (`tcptrace pcap` over a synthetic
    /// capture): no tracer, no root.
    #[arg(long, conflicts_with = "no_userspace")]
    userspace: bool,
    /// Skip the userspace scenario.
    #[arg(long)]
    no_userspace: bool,
    /// Connections in the userspace scenario's capture [default: 100000, or
    /// 20000 with --quick].
    #[arg(long, value_name = "N")]
    userspace_conns: Option<usize>,
    /// Do not compare with libbpf-tools' tcpstates even when installed.
    #[arg(long)]
    no_tcpstates: bool,
    /// Leave out the storm rounds with `--priority normal` (tcptrace's
    /// threads not yielding the CPU), measured beside the default.
    #[arg(long)]
    no_priority_normal: bool,
    /// Extra argument for every tcptrace run (repeatable), e.g.
    /// --tcptrace-arg=--ring-size=16777216.
    #[arg(long = "tcptrace-arg", value_name = "ARG", allow_hyphen_values = true)]
    tcptrace_args: Vec<String>,
    /// Keep the tracers' output files (target/bench/out/); they are large.
    #[arg(long)]
    keep_output: bool,
}

pub struct Bins {
    pub tcptrace: PathBuf,
    pub tcpstorm: PathBuf,
    pub tcpstates: Option<PathBuf>,
    /// Writes the userspace scenario's capture (tcptrace/examples).
    pub storm_capture: PathBuf,
    /// The userspace scenario's state changes, matched and rendered in
    /// memory (tcptrace/examples).
    pub storm_events: PathBuf,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Cfg {
    None,
    NoWire,
    Wire,
    /// The same two with `--priority normal`: what yielding the CPU buys.
    NoWireNormal,
    WireNormal,
    Tcpstates,
}

impl Cfg {
    fn key(self) -> &'static str {
        match self {
            Cfg::None => "none",
            Cfg::NoWire => "tcptrace_no_wire",
            Cfg::Wire => "tcptrace_wire",
            Cfg::NoWireNormal => "tcptrace_no_wire_priority_normal",
            Cfg::WireNormal => "tcptrace_wire_priority_normal",
            Cfg::Tcpstates => "tcpstates",
        }
    }

    fn label(self) -> &'static str {
        match self {
            Cfg::None => "no tracer",
            Cfg::NoWire => "tcptrace --json --no-wire",
            Cfg::Wire => "tcptrace --json (wire on lo)",
            Cfg::NoWireNormal => "tcptrace --json --no-wire --priority normal",
            Cfg::WireNormal => "tcptrace --json --priority normal (wire on lo)",
            Cfg::Tcpstates => "tcpstates (libbpf-tools)",
        }
    }

    fn kind(self) -> Option<Kind> {
        match self {
            Cfg::None => None,
            Cfg::NoWire | Cfg::Wire | Cfg::NoWireNormal | Cfg::WireNormal => Some(Kind::Tcptrace),
            Cfg::Tcpstates => Some(Kind::Tcpstates),
        }
    }

    fn bin(self, b: &Bins) -> PathBuf {
        match self {
            Cfg::Tcpstates => b.tcpstates.clone().unwrap_or_default(),
            _ => b.tcptrace.clone(),
        }
    }

    fn args(self, port: u16, extra: &[String]) -> Vec<String> {
        let mut v: Vec<String> = match self {
            Cfg::None => vec![],
            Cfg::NoWireNormal | Cfg::WireNormal => {
                let base = if self == Cfg::NoWireNormal {
                    Cfg::NoWire
                } else {
                    Cfg::Wire
                };
                let mut v = base.args(port, extra);
                v.extend(["--priority".into(), "normal".into()]);
                return v;
            }
            Cfg::NoWire => vec![
                "--json".into(),
                "--no-wire".into(),
                "-p".into(),
                port.to_string(),
            ],
            Cfg::Wire => vec![
                "--json".into(),
                "-p".into(),
                port.to_string(),
                "--iface".into(),
                "lo".into(),
            ],
            // Its -L/-D filters are AND-ed: trace all IPv4, count our port.
            Cfg::Tcpstates => vec!["-4".into()],
        };
        if matches!(self, Cfg::NoWire | Cfg::Wire) {
            v.extend(extra.iter().cloned());
        }
        v
    }
}

/// Events one storm connection yields, measured (see `calibrate`).
#[derive(Clone, Copy)]
pub struct PerConn {
    pub states: u64,
    pub segments: u64,
    /// Per run, not per connection: the listener's LISTEN->CLOSE.
    pub state_extra: i64,
    pub segment_extra: i64,
}

impl PerConn {
    /// From a calibration run's counts (state changes: delivered plus any
    /// the kernel skipped, see `Tracer::prog_misses`).
    fn from_counts(conns: u64, states: u64, segments: u64) -> PerConn {
        let states_pc = (states as f64 / conns as f64).round() as u64;
        let segs_pc = (segments as f64 / conns as f64).round() as u64;
        PerConn {
            states: states_pc,
            segments: segs_pc,
            state_extra: states as i64 - (states_pc * conns) as i64,
            segment_extra: segments as i64 - (segs_pc * conns) as i64,
        }
    }

    pub fn expected_states(&self, conns: u64) -> u64 {
        ((self.states * conns) as i64 + self.state_extra).max(0) as u64
    }

    pub fn expected_segments(&self, conns: u64) -> u64 {
        ((self.segments * conns) as i64 + self.segment_extra).max(0) as u64
    }

    fn expected(&self, cfg: Cfg, conns: u64) -> u64 {
        match cfg {
            Cfg::None => 0,
            Cfg::NoWire | Cfg::NoWireNormal | Cfg::Tcpstates => self.expected_states(conns),
            Cfg::Wire | Cfg::WireNormal => {
                self.expected_states(conns) + self.expected_segments(conns)
            }
        }
    }
}

struct Run {
    cfg: Cfg,
    round: usize,
    conns: u64,
    conn_per_s: f64,
    storm_errors: u64,
    tw_before: u64,
    expected: u64,
    out: Option<count::Output>,
    usage: Option<proc::Usage>,
    drain_s: Option<f64>,
    /// Kernel-skipped program runs (recursion_misses).
    missed: Option<u64>,
    /// Size of the tracer's output file.
    out_bytes: Option<u64>,
    /// Per program: (name, runs, run time ns); see `ebpf_cost`.
    prog_stats: Vec<(String, u64, u64, u64)>,
    /// Shares of the machine's CPU time while the storm ran: idle, softirq.
    machine: Option<(f64, f64)>,
}

impl Run {
    fn json(&self) -> J {
        let mut j = J::obj()
            .with("config", self.cfg.key())
            .with("round", self.round)
            .with("connections", self.conns)
            .with("conn_per_s", self.conn_per_s)
            .with("storm_errors", self.storm_errors)
            .with("time_wait_before", self.tw_before)
            .with("machine_idle", self.machine.map(|m| m.0))
            .with("machine_softirq", self.machine.map(|m| m.1));
        if let (Some(o), Some(u)) = (&self.out, &self.usage) {
            j.set("events_expected", self.expected);
            j.set("events_delivered", o.delivered());
            j.set("states", o.states);
            j.set("segments", o.segments);
            j.set("lost_reported", o.lost);
            j.set("skipped_by_kernel", self.missed);
            j.set("rescued_by_sock_ops", o.rescued);
            j.set("duplicates_dropped", o.duplicates);
            j.set("summary_events", o.summary_events);
            j.set("undecodable", o.undecodable);
            j.set("priority_claimed_ms", o.priority_claimed_ms);
            j.set("cpu_user_s", u.user_s);
            j.set("cpu_sys_s", u.sys_s);
            j.set("maxrss_kb", u.maxrss_kb);
            j.set("exit_ok", u.exit_ok);
            j.set("drain_s", self.drain_s);
            j.set("output_bytes", self.out_bytes);
        }
        j
    }

    /// Expected − delivered − reported lost − skipped by the kernel: 0 when
    /// every event is accounted for.
    fn unaccounted(&self) -> i64 {
        match &self.out {
            Some(o) => {
                self.expected as i64
                    - o.delivered() as i64
                    - o.lost.unwrap_or(0) as i64
                    - self.missed.unwrap_or(0) as i64
            }
            None => 0,
        }
    }
}

pub struct Ctx {
    pub bins: Bins,
    pub dir: PathBuf,
    pub keep: bool,
    pub extra: Vec<String>,
}

impl Ctx {
    fn out_paths(&self, tag: &str) -> (PathBuf, PathBuf) {
        (
            self.dir.join(format!("{tag}.out")),
            self.dir.join(format!("{tag}.err")),
        )
    }

    pub fn discard(&self, paths: &[&Path]) {
        if !self.keep {
            for p in paths {
                let _ = std::fs::remove_file(p);
            }
        }
    }
}

pub fn run(a: BenchArgs) -> Result<()> {
    if a.rounds == 0 {
        bail!("--rounds must be at least 1");
    }
    let duration = a.duration.unwrap_or(if a.quick { 2.0 } else { 5.0 });
    let threads = a.threads.unwrap_or(2 * num_cpus());
    if threads == 0 {
        bail!("--threads must be at least 1");
    }
    let scale_conns = a
        .scale_conns
        .unwrap_or(if a.quick { 20_000 } else { 100_000 });
    let userspace_conns = a
        .userspace_conns
        .unwrap_or(if a.quick { 20_000 } else { 100_000 });
    let tracing = !a.userspace;
    // SAFETY: geteuid has no preconditions.
    if tracing && unsafe { libc::geteuid() } != 0 {
        bail!("the bench loads eBPF programs: run it as root (or only --userspace)");
    }
    if tracing && !a.no_tcpstates && find_tcpstates().is_none() {
        // The tracer users would otherwise run, measured side by side.
        eprintln!("bench: installing libbpf-tools (tcpstates, the comparison tracer)");
        if let Err(e) = crate::bootstrap::apt_install(&["libbpf-tools"]) {
            eprintln!("bench: cannot install libbpf-tools ({e:#})");
        }
    }
    let bins = build()?;
    if bins.tcpstates.is_none() && !a.no_tcpstates {
        eprintln!("bench: tcpstates (Debian package libbpf-tools) not found; comparing without it");
    }
    let root = crate::workspace_root().join("target/bench");
    let dir = root.join("out");
    std::fs::create_dir_all(&dir)?;
    let ctx = Ctx {
        bins,
        dir,
        keep: a.keep_output,
        extra: a.tcptrace_args.clone(),
    };
    let stamp = utc_stamp();

    let mut report = J::obj()
        .with("timestamp", stamp.as_str())
        .with(
            "kernel",
            std::fs::read_to_string("/proc/sys/kernel/osrelease")
                .unwrap_or_default()
                .trim(),
        )
        .with("cpus", num_cpus())
        .with(
            "params",
            J::obj()
                .with("rounds", a.rounds)
                .with("duration_s", duration)
                .with("threads", threads)
                .with(
                    "scale_conns",
                    if a.no_scale { None } else { Some(scale_conns) },
                )
                .with("scale_rate", a.scale_rate)
                .with(
                    "userspace_conns",
                    if a.no_userspace {
                        None
                    } else {
                        Some(userspace_conns)
                    },
                )
                .with("tcptrace_args", a.tcptrace_args.clone()),
        );
    let mut md = String::new();
    let mut targets: Vec<(String, bool, String)> = Vec::new();

    if tracing && !a.no_scale {
        let (j, table, t) = scale::run(&ctx, scale_conns, a.scale_rate)?;
        report.set("scale", j);
        md.push_str(&table);
        targets.extend(t);
    }

    if tracing && !a.no_storm {
        let mut cfgs = vec![Cfg::None, Cfg::NoWire, Cfg::Wire];
        if !a.no_priority_normal {
            cfgs.extend([Cfg::NoWireNormal, Cfg::WireNormal]);
        }
        if ctx.bins.tcpstates.is_some() && !a.no_tcpstates {
            cfgs.push(Cfg::Tcpstates);
        }
        let (j, table, t) = storm_scenario(&ctx, &cfgs, a.rounds, duration, threads)?;
        report.set("storm", j);
        md.push_str(&table);
        targets.extend(t);
    }
    if !a.no_userspace {
        let (j, table, t) = userspace::run(&ctx, userspace_conns, a.rounds)?;
        report.set("userspace", j);
        md.push_str(&table);
        targets.extend(t);
    }
    md.push_str("\n### Targets\n\n");
    for (what, met, detail) in &targets {
        md.push_str(&format!(
            "- [{}] {what}: {detail}\n",
            if *met { "x" } else { " " }
        ));
    }
    let met = targets.iter().filter(|t| t.1).count();
    md.push_str(&format!("\n{met} of {} targets met.\n", targets.len()));
    report.set(
        "targets",
        J::A(
            targets
                .iter()
                .map(|(w, m, d)| {
                    J::obj()
                        .with("target", w.as_str())
                        .with("met", *m)
                        .with("detail", d.as_str())
                })
                .collect(),
        ),
    );

    let text = format!("{report}\n");
    let file = root.join(format!("bench-{stamp}.json"));
    std::fs::write(&file, &text)?;
    std::fs::write(root.join("latest.json"), &text)?;
    println!("{md}");
    println!("JSON: {} (and target/bench/latest.json)", file.display());
    Ok(())
}

fn build() -> Result<Bins> {
    let mut c = crate::cargo();
    c.args([
        "build",
        "--release",
        "-p",
        "tcptrace",
        "--bin",
        "tcptrace",
        "--example",
        "storm_capture",
        "--example",
        "storm_events",
    ]);
    crate::status(c)?;
    let mut c = crate::cargo();
    c.args(["build", "--release", "-p", "xtask", "--bin", "tcpstorm"]);
    crate::status(c)?;
    let rel = crate::target_dir().join("release");
    Ok(Bins {
        tcptrace: rel.join("tcptrace"),
        tcpstorm: rel.join("tcpstorm"),
        tcpstates: find_tcpstates(),
        storm_capture: rel.join("examples/storm_capture"),
        storm_events: rel.join("examples/storm_events"),
    })
}

/// libbpf-tools' tcpstates (or bcc's), where Debian puts it.
fn find_tcpstates() -> Option<PathBuf> {
    [
        "/usr/sbin/tcpstates",
        "/usr/bin/tcpstates",
        "/usr/sbin/tcpstates-bpfcc",
    ]
    .iter()
    .map(PathBuf::from)
    .find(|p| p.exists())
}

fn num_cpus() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}

/// One storm run under `cfg`.
fn run_one(
    ctx: &Ctx,
    cfg: Cfg,
    storm_args: &[String],
    round: usize,
    pc: Option<PerConn>,
    transitions: bool,
) -> Result<Run> {
    let tw_before = time_wait().0;
    let mut storm = Storm::start(&ctx.bins.tcpstorm, storm_args)?;
    let tag = format!("{}-{round}", cfg.key());
    let (out, err) = ctx.out_paths(&tag);
    let tracer = match cfg.kind() {
        Some(kind) => Some(Tracer::start(
            kind,
            &cfg.bin(&ctx.bins),
            &cfg.args(storm.port, &ctx.extra),
            out.clone(),
            err.clone(),
        )?),
        None => None,
    };
    let cpu_before = proc::MachineCpu::now();
    storm.go()?;
    let res = storm.expect("result")?;
    let machine = cpu_before.shares(&proc::MachineCpu::now());
    let port = storm.port;
    storm.finish()?;
    let conns = json::field_u64(&res, "connections").context("storm result")?;
    let mut run = Run {
        cfg,
        round,
        conns,
        conn_per_s: json::field_f64(&res, "conn_per_s").unwrap_or(0.0),
        storm_errors: json::field_u64(&res, "errors").unwrap_or(0),
        tw_before,
        expected: pc.map_or(0, |p| p.expected(cfg, conns)),
        out: None,
        usage: None,
        drain_s: None,
        missed: None,
        out_bytes: None,
        prog_stats: Vec::new(),
        machine,
    };
    if let Some(t) = tracer {
        run.prog_stats = t.prog_run_stats();
        // Let it catch up before stopping it, as a user would.
        run.drain_s = Some(t.wait_quiet(Duration::from_millis(600), Duration::from_secs(120)));
        run.missed = Some(t.prog_misses());
        run.usage = Some(t.stop()?);
        run.out = Some(match cfg.kind() {
            Some(Kind::Tcpstates) => count::tcpstates(&out, &err, port, transitions)?,
            _ => count::tcptrace(&out, transitions)?,
        });
        // tcptrace's own count is net of what its sock_ops backup delivered.
        if let Some(m) = run.out.as_ref().and_then(|o| o.missed) {
            run.missed = Some(m);
        }
        run.out_bytes = std::fs::metadata(&out).ok().map(|m| m.len());
        ctx.discard(&[&out, &err]);
    }
    Ok(run)
}

/// TIME_WAIT sockets now, and the most the kernel keeps (this netns).
pub fn time_wait() -> (u64, u64) {
    let ss = std::fs::read_to_string("/proc/net/sockstat").unwrap_or_default();
    let tw = ss
        .lines()
        .find(|l| l.starts_with("TCP:"))
        .and_then(|l| {
            let w: Vec<&str> = l.split_whitespace().collect();
            w.iter()
                .position(|x| *x == "tw")
                .and_then(|i| w.get(i + 1)?.parse().ok())
        })
        .unwrap_or(0);
    let max = std::fs::read_to_string("/proc/sys/net/ipv4/tcp_max_tw_buckets")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(u64::MAX);
    (tw, max)
}

/// CPU time and RSS of a tracer that starts, attaches and stops with no load:
/// subtracted from the storm runs to get the per-event cost.
fn idle_cost(ctx: &Ctx, cfg: Cfg) -> Result<proc::Usage> {
    let (out, err) = ctx.out_paths(&format!("{}-idle", cfg.key()));
    let t = Tracer::start(
        cfg.kind().context("no tracer")?,
        &cfg.bin(&ctx.bins),
        &cfg.args(9, &ctx.extra),
        out.clone(),
        err.clone(),
    )?;
    std::thread::sleep(Duration::from_millis(300));
    let u = t.stop()?;
    ctx.discard(&[&out, &err]);
    Ok(u)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.retain(|x| x.is_finite());
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

fn transitions_line(o: &count::Output) -> String {
    o.transitions
        .iter()
        .map(|(k, v)| format!("{k} ×{v}"))
        .collect::<Vec<_>>()
        .join(", ")
}

type Scenario = (J, String, Vec<(String, bool, String)>);

fn storm_scenario(
    ctx: &Ctx,
    cfgs: &[Cfg],
    rounds: usize,
    duration: f64,
    threads: usize,
) -> Result<Scenario> {
    // Calibration: a few hundred connections, one thread, under tcptrace
    // with wire on: how many state changes and segments one connection yields.
    const CAL: u64 = 300;
    let cal_args: Vec<String> = [
        "--threads",
        "1",
        "--duration",
        "60",
        "--max-conns",
        &CAL.to_string(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let cal = run_one(ctx, Cfg::Wire, &cal_args, 0, None, true)?;
    let co = cal.out.as_ref().context("calibration output")?;
    if cal.conns != CAL || co.lost != Some(0) {
        bail!(
            "calibration run: {} connections, {:?} lost",
            cal.conns,
            co.lost
        );
    }
    let pc = PerConn::from_counts(CAL, co.states + cal.missed.unwrap_or(0), co.segments);
    eprintln!(
        "bench: calibration: {CAL} connections -> {} state changes, {} segments = {} + {} per connection (+{} / +{} per run)",
        co.states, co.segments, pc.states, pc.segments, pc.state_extra, pc.segment_extra
    );
    eprintln!("bench: calibration transitions: {}", transitions_line(co));
    let mut cal_j = J::obj()
        .with("connections", CAL)
        .with("states", co.states)
        .with("segments", co.segments)
        .with("states_per_conn", pc.states)
        .with("segments_per_conn", pc.segments)
        .with("states_extra", pc.state_extra)
        .with("segments_extra", pc.segment_extra)
        .with(
            "transitions",
            J::O(
                co.transitions
                    .iter()
                    .map(|(k, v)| (k.clone(), J::U(*v)))
                    .collect(),
            ),
        );
    if cfgs.contains(&Cfg::Tcpstates) {
        let c2 = run_one(ctx, Cfg::Tcpstates, &cal_args, 0, Some(pc), true)?;
        let o2 = c2.out.as_ref().context("calibration output")?;
        eprintln!(
            "bench: calibration (tcpstates): {} state changes, transitions {}",
            o2.states,
            transitions_line(o2)
        );
        cal_j.set("tcpstates_states", o2.states);
        if o2.states != co.states {
            eprintln!(
                "bench: warning: tcpstates saw {} state changes, tcptrace {}",
                o2.states, co.states
            );
        }
    }

    let mut idle = Vec::new();
    for &c in cfgs.iter().filter(|c| c.kind().is_some()) {
        let u = idle_cost(ctx, c)?;
        eprintln!(
            "bench: {} idle: {:.3} s CPU, {} kB RSS",
            c.label(),
            u.cpu_s,
            u.maxrss_kb.map_or("?".into(), |k| k.to_string())
        );
        idle.push((c, u));
    }

    let storm_args: Vec<String> = vec![
        "--threads".into(),
        threads.to_string(),
        "--duration".into(),
        duration.to_string(),
    ];
    // The price of a fresh page-cache page, which every tracer's output
    // pays, before the rounds (memory has been idle) and right after them
    // (pages of the output files just deleted are reused); as much as the
    // wire run writes in one run (~370 MB/s), since on a VM the first few
    // hundred MiB can be far cheaper than the rest.
    let write_mib = ((duration * 350.0) as u64).clamp(256, 4096);
    let write_before = page_cache_write(&ctx.dir, write_mib)?;
    let mut runs: Vec<Run> = Vec::new();
    for round in 0..rounds {
        let order: Vec<Cfg> = if round % 2 == 0 {
            cfgs.to_vec()
        } else {
            cfgs.iter().rev().copied().collect()
        };
        for cfg in order {
            let r = run_one(ctx, cfg, &storm_args, round, Some(pc), false)?;
            match &r.out {
                Some(o) => eprintln!(
                    "bench: round {}/{rounds} {}: {:.0} conn/s, {} of {} events, {} lost, {} skipped by the kernel, settled after {:.2} s{}",
                    round + 1,
                    cfg.label(),
                    r.conn_per_s,
                    o.delivered(),
                    r.expected,
                    o.lost.map_or("?".into(), |l| l.to_string()),
                    r.missed.unwrap_or(0),
                    r.drain_s.unwrap_or(0.0),
                    match o.priority_claimed_ms {
                        Some(ms) if matches!(cfg, Cfg::NoWire | Cfg::Wire) => {
                            format!(", at normal priority for {ms} ms")
                        }
                        _ => String::new(),
                    }
                ),
                None => eprintln!("bench: round {}/{rounds} {}: {:.0} conn/s", round + 1, cfg.label(), r.conn_per_s),
            }
            runs.push(r);
        }
    }

    let (cost_j, cost_md, cost) = ebpf_cost(ctx, &storm_args, pc, rounds)?;
    let write_after = page_cache_write(&ctx.dir, write_mib)?;
    eprintln!(
        "bench: writing {write_mib} MiB into new page-cache pages: {:.0} MB/s before the rounds, {:.0} MB/s after",
        write_before.mb_s, write_after.mb_s
    );

    // Per configuration.
    let base_of = |round: usize| {
        runs.iter()
            .find(|r| r.cfg == Cfg::None && r.round == round)
            .map(|r| r.conn_per_s)
    };
    let mut md = format!(
        "\n## Storm: {threads} client threads, {duration} s per run, {rounds} rounds (medians; events summed over rounds)\n\n\
         Calibration: one connection = {} state changes + {} segments (tcptrace, wire on lo), plus {} state change(s) per run (the listener closing).\n\n\
         | configuration | conn/s | vs no tracer | events expected | delivered | lost (reported) | skipped by kernel and lost | unaccounted | tracer CPU ms / 1k events | of which sys | output bytes / event | tracer CPU % of a core | machine idle % | peak RSS MiB | output settles s |\n\
         |---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n",
        pc.states, pc.segments, pc.state_extra
    );
    let mut summary = J::obj();
    let mut targets = Vec::new();
    // Per configuration: the machine's idle % and the tracer's % of a core.
    let mut shares: Vec<(Cfg, f64, f64)> = Vec::new();
    // Per tcptrace configuration: (tracer CPU µs per connection, ratio).
    let mut spent: Vec<(Cfg, f64, f64)> = Vec::new();
    let mut cps_none = f64::NAN;
    for &cfg in cfgs {
        let rs: Vec<&Run> = runs.iter().filter(|r| r.cfg == cfg).collect();
        let cps = median(rs.iter().map(|r| r.conn_per_s).collect());
        // Idle time of both CPUs while the storm ran: with no tracer, the
        // room a yielding tracer can take without slowing the storm.
        let idle_pct = median(
            rs.iter()
                .filter_map(|r| Some(r.machine?.0 * 100.0))
                .collect(),
        );
        let ratios: Vec<f64> = rs
            .iter()
            .filter_map(|r| base_of(r.round).map(|b| r.conn_per_s / b))
            .collect();
        // The spread says how far one round's ratio can be trusted: on a
        // shared VM the no-tracer runs alone move by a fifth.
        let (lo, hi) = ratios
            .iter()
            .fold((f64::MAX, f64::MIN), |(lo, hi), &r| (lo.min(r), hi.max(r)));
        let ratio = median(ratios);
        let mut s = J::obj()
            .with("label", cfg.label())
            .with("conn_per_s", cps)
            .with("ratio_to_none", ratio)
            .with("ratio_min", lo)
            .with("ratio_max", hi);
        if cfg.kind().is_none() {
            md.push_str(&format!(
                "| {} | {cps:.0} | 1.00 | – | – | – | – | – | – | – | – | – | {idle_pct:.1} | – | – |\n",
                cfg.label()
            ));
            s.set("machine_idle_pct", idle_pct);
            summary.set(cfg.key(), s);
            shares.push((cfg, idle_pct, f64::NAN));
            cps_none = cps;
            continue;
        }
        let idle_u = idle.iter().find(|(c, _)| *c == cfg).map(|(_, u)| u);
        let idle_cpu = idle_u.map_or(0.0, |u| u.cpu_s);
        let idle_sys = idle_u.map_or(0.0, |u| u.sys_s);
        let expected: u64 = rs.iter().map(|r| r.expected).sum();
        let delivered: u64 = rs
            .iter()
            .filter_map(|r| r.out.as_ref())
            .map(|o| o.delivered())
            .sum();
        let lost: u64 = rs.iter().filter_map(|r| r.out.as_ref()?.lost).sum();
        let unaccounted: i64 = rs.iter().map(|r| r.unaccounted()).sum();
        let missed: u64 = rs.iter().filter_map(|r| r.missed).sum();
        let ms_per_k = median(
            rs.iter()
                .filter_map(|r| {
                    let d = r.out.as_ref()?.delivered() as f64;
                    Some((r.usage.as_ref()?.cpu_s - idle_cpu).max(0.0) / d * 1e6)
                })
                .collect(),
        );
        let per_event = |f: &dyn Fn(&Run) -> Option<f64>| {
            median(
                rs.iter()
                    .filter_map(|r| Some(f(r)? / r.out.as_ref()?.delivered().max(1) as f64))
                    .collect(),
            )
        };
        let sys_ms_per_k =
            per_event(&|r| Some((r.usage.as_ref()?.sys_s - idle_sys).max(0.0) * 1e6));
        let bytes_per_event = per_event(&|r| r.out_bytes.map(|b| b as f64));
        let core_pct = median(
            rs.iter()
                .filter_map(|r| Some(r.usage.as_ref()?.cpu_s / duration * 100.0))
                .collect(),
        );
        let rss_mib = median(
            rs.iter()
                .filter_map(|r| Some(r.usage.as_ref()?.maxrss_kb? as f64 / 1024.0))
                .collect(),
        );
        let drain = median(rs.iter().filter_map(|r| r.drain_s).collect());
        md.push_str(&format!(
            "| {} | {cps:.0} | {ratio:.3} ({lo:.2}–{hi:.2}) | {expected} | {delivered} | {lost} | {missed} | {unaccounted} | {ms_per_k:.3} | {sys_ms_per_k:.3} | {bytes_per_event:.0} | {core_pct:.0} | {idle_pct:.1} | {rss_mib:.1} | {drain:.2} |\n",
            cfg.label()
        ));
        s.set("events_expected", expected);
        s.set("events_delivered", delivered);
        s.set("events_lost_reported", lost);
        s.set("events_skipped_by_kernel", missed);
        s.set("events_unaccounted", unaccounted);
        s.set("cpu_ms_per_1k_events", ms_per_k);
        s.set("sys_cpu_ms_per_1k_events", sys_ms_per_k);
        s.set("output_bytes_per_event", bytes_per_event);
        s.set("cpu_pct_of_core", core_pct);
        s.set("machine_idle_pct", idle_pct);
        shares.push((cfg, idle_pct, core_pct));
        let us_per_conn = median(
            rs.iter()
                .filter_map(|r| {
                    let cpu = (r.usage.as_ref()?.cpu_s - idle_cpu).max(0.0);
                    Some(cpu / r.conns.max(1) as f64 * 1e6)
                })
                .collect(),
        );
        spent.push((cfg, us_per_conn, ratio));
        s.set("cpu_us_per_connection", us_per_conn);
        s.set("idle_cpu_s", idle_cpu);
        s.set("peak_rss_mib", rss_mib);
        s.set("catch_up_s", drain);
        let records: u64 = (rs.iter().filter_map(|r| r.out.as_ref()))
            .map(|o| o.records.values().sum::<u64>())
            .sum();
        s.set("connection_records", records);
        summary.set(cfg.key(), s);

        if cfg != Cfg::Tcpstates {
            // Matching, checked whole: every storm connection ends, so a
            // connection split in several records (or two merged) shows
            // as a count that differs.
            let conns: u64 = rs.iter().map(|r| r.conns).sum();
            targets.push((
                format!(
                    "storm, {}: one connection record per connection",
                    cfg.label()
                ),
                records == conns,
                format!("{records} records for {conns} connections"),
            ));
        }
        if matches!(cfg, Cfg::NoWire | Cfg::Wire) {
            let name = if cfg == Cfg::Wire {
                "wire on"
            } else {
                "--no-wire"
            };
            // State changes per connection are fixed; segments are not (a
            // retransmitted FIN or a tail-loss probe is one more), so more
            // segments than calibrated is not a loss, fewer state changes is.
            let states_short: i64 = rs
                .iter()
                .filter_map(|r| {
                    let o = r.out.as_ref()?;
                    let want = pc.expected_states(r.conns) as i64;
                    Some(want - o.states as i64 - r.missed.unwrap_or(0) as i64)
                })
                .sum();
            targets.push((
                format!("storm, {name}: no event lost"),
                lost == 0 && missed == 0 && unaccounted <= 0 && states_short <= 0,
                format!(
                    "{delivered} of {expected} delivered, {lost} reported lost, {missed} skipped by the kernel (reported by tcptrace as lost), {unaccounted} unaccounted{}",
                    if unaccounted < 0 {
                        format!(
                            " ({} more segments than calibrated: four-segment closes, whose ACK of a FIN goes alone, or retransmissions; state changes {})",
                            -unaccounted,
                            if states_short <= 0 { "all there" } else { "short" }
                        )
                    } else {
                        String::new()
                    }
                ),
            ));
            let want = conn_target(cfg);
            targets.push((
                format!("storm, {name}: conn/s ≥ {want:.2} of no tracer"),
                ratio >= want,
                format!("{ratio:.3}"),
            ));
            targets.push((
                format!("storm, {name}: userspace cost well under 1 µs per event"),
                ms_per_k < 0.5,
                format!(
                    "{:.3} µs/event (tracer user+sys CPU net of start-up; target read as < 0.5)",
                    ms_per_k
                ),
            ));
        }
    }
    // What a tracer can have for free: the idle time the storm leaves. A
    // tracer that needs more takes the rest from the storm, whatever its
    // priority.
    // The CPUs /proc/stat's first line sums, whose idle share this is.
    let cpus = proc::cpus_online() as f64;
    let share = |cfg: Cfg| shares.iter().find(|s| s.0 == cfg);
    let room = share(Cfg::None).map_or(f64::NAN, |s| s.1 * cpus);
    let needs: Vec<String> = [(Cfg::NoWire, "--no-wire"), (Cfg::Wire, "with wire")]
        .into_iter()
        .filter_map(|(c, name)| Some(format!("{name} {:.0} %", share(c)?.2)))
        .collect();
    if room.is_finite() && !needs.is_empty() {
        md.push_str(&format!(
            "\nRoom: with no tracer the storm leaves {room:.0} % of a core idle (both CPUs together); tcptrace takes, of a core, {}: what exceeds the room is taken from the storm, yielding or not.\n",
            needs.join(", ")
        ));
    }
    let (budget_md, budget_j) = budget(
        cpus,
        cps_none,
        share(Cfg::None).map_or(f64::NAN, |s| s.1),
        &cost,
        &spent,
    );
    let j = J::obj()
        .with("room_pct_of_core", room)
        .with("budget", budget_j)
        .with("calibration", cal_j)
        .with("summary", summary)
        .with(
            "idle_cpu_s",
            J::O(
                idle.iter()
                    .map(|(c, u)| (c.key().to_string(), J::F(u.cpu_s)))
                    .collect(),
            ),
        )
        .with("ebpf_cost", cost_j)
        .with(
            "page_cache_write_mb_s",
            J::obj()
                .with("mib", write_mib)
                .with("before_rounds", write_before.mb_s)
                .with("after_rounds", write_after.mb_s)
                .with(
                    "cpu_ns_per_byte_before_rounds",
                    write_before.cpu_ns_per_byte,
                )
                .with("cpu_ns_per_byte_after_rounds", write_after.cpu_ns_per_byte),
        )
        .with("runs", J::A(runs.iter().map(Run::json).collect()));
    md.push_str(
        "\n\"vs no tracer\" is the median of per-round ratios (each run against the no-tracer run of its round), the lowest and highest round in brackets. \
         \"skipped by kernel\": events lost because the kernel skipped a tracer's BPF program while one was running on that CPU \
         (tcpstates: recursion_misses in its programs' fdinfo, which it does not report; tcptrace: its summary's `missed`, those \
         skips less the ones its sock_ops program delivered, `rescued`). \
         \"lost (reported)\" is the ring-full count; \"unaccounted\" = expected − delivered − reported lost − skipped. Tracer CPU is user+sys from wait4(2), peak RSS the tracer's own VmHWM; \
         the eBPF programs' own cost is charged to the storm and shows up in conn/s. \
         \"output settles\": how long after the storm the output file kept growing (tcptrace's finished connection records linger 0.5 s for stragglers, 20 ms when only the kernel saw them; \
         tcpstates' stdio buffer only reaches the file at exit).\n",
    );
    md.push_str(&cost_md);
    md.push_str(&budget_md);
    md.push_str(&format!(
        "\nwrite(2) of {write_mib} MiB (about one wire run's output) into a new file next to the outputs: {:.0} MB/s ({:.2} ns of CPU per byte) \
         before the rounds, {:.0} MB/s ({:.2} ns per byte) right after them. Every tracer's output pays this per byte (at 780 bytes per event, \
         1 ns per byte is 0.78 µs per event); on a VM whose host takes back free guest memory (free page reporting), a page that was \
         idle costs a hypervisor fault on first touch, so the figure, and tracer sys time with it, moves between runs and with the amount written.\n",
        write_before.mb_s, write_before.cpu_ns_per_byte, write_after.mb_s, write_after.cpu_ns_per_byte
    ));
    Ok((j, md, targets))
}

/// Issue #7's conn/s target for a yielding tcptrace: the share of the
/// no-tracer rate the storm must keep.
fn conn_target(cfg: Cfg) -> f64 {
    if cfg == Cfg::Wire {
        0.85
    } else {
        0.90
    }
}

/// What the conn/s targets leave a tracer, per connection, against what
/// tcptrace spends. At saturation every CPU µs a tracer spends on a
/// connection (its eBPF programs in the storm's context, its own threads
/// outside it) is a µs the storm does not get: with S the machine time one
/// connection takes alone and C the tracer's, the ratio is S / (S + C), so
/// a target ratio t allows C ≤ S (1/t − 1).
fn budget(
    cpus: f64,
    cps_none: f64,
    idle_pct_none: f64,
    cost: &EbpfCost,
    spent: &[(Cfg, f64, f64)],
) -> (String, J) {
    // The machine time one connection takes with no tracer, less the idle
    // time it left.
    let s_us = cpus * (1.0 - idle_pct_none / 100.0) / cps_none * 1e6;
    let mut md = format!(
        "\n### Budget per connection\n\n\
         With no tracer one storm connection takes S = {s_us:.1} µs of the machine (all CPUs, less the idle time). \
         At saturation a tracer that spends C µs per connection leaves the storm S / (S + C) of its rate, \
         so a target ratio t allows C ≤ S (1/t − 1). eBPF is the programs' run time in the bpf_stats run (an upper bound for the programs themselves: the statistics add two clock reads to each run), \
         without the TC programs for --no-wire; userspace is the tracer's own CPU (user+sys, net of start-up) per connection, \
         which also holds the storm's softirqs that interrupt the tracer's threads where the kernel does not account IRQ time apart \
         (so the prediction errs low, not high).\n\n\
         \"taken from the storm\" is S (1/r − 1) at the measured ratio r: what the storm lost per connection, \
         the programs' hooks (the tracepoint's record, the cgroup and syscall-exit paths) and the caches the tracer shares included.\n\n\
         | configuration | target | allowed µs / conn | eBPF µs / conn | userspace µs / conn | spent µs / conn | predicted ratio | measured | taken from the storm µs / conn |\n\
         |---|---:|---:|---:|---:|---:|---:|---:|---:|\n"
    );
    let mut j = J::obj().with("storm_us_per_connection", s_us);
    for &(cfg, user_us, measured) in spent {
        let ebpf_ns = match cfg {
            Cfg::NoWire => cost.total_ns - cost.wire_ns,
            Cfg::Wire => cost.total_ns,
            _ => continue,
        };
        let target = conn_target(cfg);
        let (allowed, ebpf_us) = (s_us * (1.0 / target - 1.0), ebpf_ns / 1e3);
        let total = ebpf_us + user_us;
        let predicted = s_us / (s_us + total);
        let taken = s_us * (1.0 / measured - 1.0);
        md.push_str(&format!(
            "| {} | {target:.2} | {allowed:.1} | {ebpf_us:.1} | {user_us:.1} | {total:.1} | {predicted:.3} | {measured:.3} | {taken:.1} |\n",
            cfg.label()
        ));
        j.set(
            cfg.key(),
            J::obj()
                .with("target", target)
                .with("allowed_us_per_connection", allowed)
                .with("ebpf_us_per_connection", ebpf_us)
                .with("userspace_us_per_connection", user_us)
                .with("predicted_ratio", predicted)
                .with("measured_ratio", measured)
                .with("taken_from_storm_us_per_connection", taken),
        );
    }
    (md, j)
}

/// The eBPF programs' cost per connection, in ns: all of them, and the wire's
/// (TC) share.
struct EbpfCost {
    total_ns: f64,
    wire_ns: f64,
}

/// The eBPF programs' own cost, which the storm pays: one more wire-on run
/// with the kernel's BPF run-time statistics on. They add two clock reads per
/// program run, so the timed rounds leave them off.
fn ebpf_cost(
    ctx: &Ctx,
    storm_args: &[String],
    pc: PerConn,
    round: usize,
) -> Result<(J, String, EbpfCost)> {
    const KNOB: &str = "/proc/sys/kernel/bpf_stats_enabled";
    struct Restore(String);
    impl Drop for Restore {
        fn drop(&mut self) {
            let _ = std::fs::write(KNOB, &self.0);
        }
    }
    let before = std::fs::read_to_string(KNOB).with_context(|| format!("reading {KNOB}"))?;
    let _restore = Restore(before.trim().to_string());
    std::fs::write(KNOB, "1").with_context(|| format!("writing {KNOB}"))?;
    let r = run_one(ctx, Cfg::Wire, storm_args, round, Some(pc), false)?;
    let mut md = format!(
        "\n### eBPF programs (one more wire-on run, {:.0} conn/s, with kernel.bpf_stats_enabled)\n\n\
         | program | runs | runs / connection | ns / run | ns / connection |\n|---|---:|---:|---:|---:|\n",
        r.conn_per_s
    );
    let mut progs = Vec::new();
    let mut total = 0.0;
    let mut wire = 0.0;
    /// BPF_PROG_TYPE_SCHED_CLS: the wire's TC programs.
    const SCHED_CLS: u64 = 3;
    for (name, runs, ns, prog_type) in &r.prog_stats {
        let per_run = *ns as f64 / *runs as f64;
        let per_conn = *ns as f64 / r.conns.max(1) as f64;
        total += per_conn;
        if *prog_type == SCHED_CLS {
            wire += per_conn;
        }
        md.push_str(&format!(
            "| {name} | {runs} | {:.2} | {per_run:.0} | {per_conn:.0} |\n",
            *runs as f64 / r.conns.max(1) as f64
        ));
        progs.push(
            J::obj()
                .with("program", name.as_str())
                .with("runs", *runs)
                .with("ns_per_run", per_run)
                .with("ns_per_connection", per_conn),
        );
    }
    md.push_str(&format!("| all | | | | {total:.0} |\n"));
    eprintln!("bench: eBPF programs cost {total:.0} ns of the storm's CPU per connection");
    Ok((
        J::obj()
            .with("connections", r.conns)
            .with("ns_per_connection", total)
            .with("programs", J::A(progs)),
        md,
        EbpfCost {
            total_ns: total,
            wire_ns: wire,
        },
    ))
}

/// How fast write(2) fills new page-cache pages.
struct PageCacheWrite {
    mb_s: f64,
    /// This thread's CPU (user+sys) per byte written.
    cpu_ns_per_byte: f64,
}

/// Writes `mib` MiB into a new file in `dir`, 256 KiB at a time, and
/// deletes it.
fn page_cache_write(dir: &Path, mib: u64) -> Result<PageCacheWrite> {
    use std::io::Write;
    let path = dir.join("page-cache-calibration.tmp");
    let chunk = vec![b'x'; 256 << 10];
    let mut f =
        std::fs::File::create(&path).with_context(|| format!("creating {}", path.display()))?;
    let (t, cpu) = (std::time::Instant::now(), proc::thread_cpu_s());
    for _ in 0..mib * 4 {
        f.write_all(&chunk)?;
    }
    let (secs, cpu_s) = (t.elapsed().as_secs_f64(), proc::thread_cpu_s() - cpu);
    drop(f);
    std::fs::remove_file(&path)?;
    let bytes = (mib << 20) as f64;
    Ok(PageCacheWrite {
        mb_s: bytes / 1e6 / secs,
        cpu_ns_per_byte: cpu_s * 1e9 / bytes,
    })
}

/// `YYYYmmddTHHMMSSZ` (UTC) without a date crate.
fn utc_stamp() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let (days, rem) = ((secs / 86400) as i64, secs % 86400);
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}{m:02}{d:02}T{:02}{:02}{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn medians_and_expectations() {
        assert_eq!(median(vec![3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(vec![4.0, 1.0, 2.0, 3.0]), 2.5);
        let pc = PerConn::from_counts(300, 3001, 1800);
        assert_eq!(
            (pc.states, pc.state_extra, pc.segments, pc.segment_extra),
            (10, 1, 6, 0)
        );
        assert_eq!(pc.expected(Cfg::NoWire, 1000), 10_001);
        assert_eq!(pc.expected(Cfg::Wire, 1000), 16_001);
        assert_eq!(utc_stamp().len(), 16);
    }
}
