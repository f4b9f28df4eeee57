//! The `tcptrace` command line.
use std::future::Future;
use std::io::{BufWriter, Write};
use std::net::IpAddr;
use std::os::fd::AsFd as _;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _, Result};
use clap::{Args, Parser, Subcommand};
use tcptrace::bpf::{Skips, TraceConfig, Tracer};
use tcptrace::demo;
use tcptrace::event::Event;
use tcptrace::matcher::{AnomalyKind, Connection, Matcher, MatcherConfig};
use tcptrace::output::Output;
use tcptrace::priority::{self, Backlog, Guard, RingFill, Threads};
use tcptrace::reader::{self, monotonic_ns, Intake, Msg, ReaderStats, Reorder, Watermarks};
use tcptrace::render::{self, Clock, Mode};
use tcptrace::tally::Tally;
use tcptrace_common::{Filter, AF_INET, AF_INET6, MAX_PORTS};
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::mpsc;

/// Shows what the Linux kernel's TCP state machine does, step by step, next
/// to the segments that cause it.
///
/// Without a subcommand, traces live (needs root): every TCP state change
/// (tracepoint sock:inet_sock_set_state) and the handshake and teardown
/// segments on the wire (TC programs on the interfaces), matched into one
/// explained timeline per connection, printed when the connection ends.
#[derive(Parser)]
#[command(
    version,
    after_help = "Examples:\n  sudo tcptrace                       timelines of every connection on this host\n  sudo tcptrace --events -p 443       one line per state change and segment, port 443\n  sudo tcptrace --json --duration 5   JSON Lines for 5 seconds\n  tcptrace pcap capture.pcapng        the same timelines from a capture file, no root\n  sudo tcptrace demo                  two namespaces, an HTTP server, three downloads, explained"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Option<Cmd>,
    #[command(flatten)]
    out: OutputArgs,
    #[command(flatten)]
    live: LiveArgs,
}

#[derive(Subcommand)]
enum Cmd {
    /// Explain the connections in a capture file (pcap or pcapng); no root needed.
    Pcap {
        file: PathBuf,
        #[command(flatten)]
        out: OutputArgs,
    },
    /// Remove TC filters and qdiscs that a killed tcptrace left behind (only
    /// kernels before 6.6, which lack TCX links, can have any).
    Cleanup,
    /// The seed scenario, traced: two network namespaces joined by a veth
    /// pair (client 192.168.131.132, server 192.168.131.138), an HTTP server
    /// in one serving /file_64KB, N downloads from the other, each its own
    /// connection; then a summary. Removes everything it made on exit
    /// (Ctrl-C included). Needs root.
    Demo(DemoArgs),
}

#[derive(Args)]
struct DemoArgs {
    /// Downloads, one connection each.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=100))]
    rounds: u32,
    /// HTTP client [default: wget, else curl, else built-in].
    #[arg(long, value_enum)]
    client: Option<demo::Client>,
    #[command(flatten)]
    out: OutputArgs,
}

#[derive(Args, Clone, Copy)]
struct OutputArgs {
    /// JSON Lines: each event ({"type":"state"} / {"type":"segment"}) as it
    /// arrives and a {"type":"connection"} summary when a connection ends.
    #[arg(long, global = true, conflicts_with = "events")]
    json: bool,
    /// One readable line per event as it arrives, instead of timelines.
    #[arg(long, global = true)]
    events: bool,
    /// Leave the output in the page cache. By default, output to a regular
    /// file leaves the page cache once it is on disk (the newest 16 to 20
    /// MiB stay), so that a long trace does not push out the host's own
    /// cached files.
    #[arg(long, global = true)]
    keep_output_cached: bool,
}

#[derive(Args)]
struct LiveArgs {
    /// Only connections with this port on either side (repeatable, up to 8).
    #[arg(short, long = "port", value_name = "PORT")]
    ports: Vec<u16>,
    /// Only connections with this local address.
    #[arg(long, value_name = "ADDR")]
    laddr: Option<IpAddr>,
    /// Only connections with this remote address.
    #[arg(long, value_name = "ADDR")]
    raddr: Option<IpAddr>,
    /// IPv4 only.
    #[arg(short = '4', conflicts_with = "ipv6")]
    ipv4: bool,
    /// IPv6 only.
    #[arg(short = '6')]
    ipv6: bool,
    /// Watch segments on this interface (repeatable; default: every interface that is up).
    #[arg(long = "iface", value_name = "NAME")]
    ifaces: Vec<String>,
    /// Also watch the interfaces of this network namespace: a name from
    /// `ip netns list` or a path like /proc/PID/ns/net (repeatable).
    #[arg(long = "netns", value_name = "NAME|PATH")]
    netns: Vec<String>,
    /// Kernel state changes only; no TC programs on any interface.
    #[arg(long)]
    no_wire: bool,
    /// State changes from the tracepoint alone: attach no sock_ops program
    /// to the cgroup v2 root (that program delivers the changes the kernel
    /// skips the tracepoint for under load; see README, "Lost events").
    #[arg(long)]
    no_sock_ops: bool,
    /// Tests only: the tracepoint program passes over each socket's first
    /// change, as the kernel does when it skips the program under load, so
    /// that a test can watch the sock_ops program make up for it.
    #[arg(long, hide = true)]
    fault_skip_first_changes: bool,
    /// Tests only: learn who accepted a socket at the accept() syscalls'
    /// exit, as on a kernel that cannot attach fexit programs.
    #[arg(long, hide = true)]
    accept_at_syscall_exit: bool,
    /// Stop after this many seconds.
    #[arg(long, value_name = "SECS")]
    duration: Option<f64>,
    /// Stop after this many events (state changes and segments).
    #[arg(long, value_name = "N")]
    count: Option<u64>,
    /// Ring buffer size in bytes (rounded up to a power of two, at least 4096).
    /// Raise it if tcptrace reports lost events.
    #[arg(long, value_name = "BYTES", default_value_t = 4 << 20)]
    ring_size: u32,
    /// CPU priority of tcptrace's threads [default: yield on Linux 6.6 and
    /// later with CAP_SYS_NICE (root has it), normal otherwise]. `yield`:
    /// they run as SCHED_IDLE, taking only CPU time the traced host leaves
    /// idle (its tasks preempt them at once), and go back to normal priority
    /// while a ring buffer is half full, so that yielding does not cost
    /// events (before 6.6 the scheduler may take a second to honour that).
    /// `normal`: they compete for the CPU like any process.
    #[arg(long, value_enum)]
    priority: Option<Priority>,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Priority {
    Yield,
    Normal,
}

fn main() {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    let cli = Cli::parse();
    let res = match cli.cmd {
        Some(Cmd::Pcap { file, out }) => pcap(&file, mode(merge(cli.out, out))),
        Some(Cmd::Cleanup) => cleanup(),
        Some(Cmd::Demo(d)) => {
            let m = mode(merge(cli.out, d.out));
            demo(d, m)
        }
        None => live(cli.live, mode(cli.out)),
    };
    match res {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!("tcptrace: error: {e:#}");
            std::process::exit(2);
        }
    }
}

/// The output flags given before and after the subcommand.
fn merge(a: OutputArgs, b: OutputArgs) -> OutputArgs {
    OutputArgs {
        json: a.json || b.json,
        events: a.events || b.events,
        keep_output_cached: a.keep_output_cached || b.keep_output_cached,
    }
}

/// The output mode; also settles drop-behind, before anything is written.
fn mode(o: OutputArgs) -> Mode {
    if o.keep_output_cached {
        tcptrace::output::keep_cached();
    }
    if o.json {
        Mode::Json
    } else if o.events {
        Mode::Events
    } else {
        Mode::Timeline
    }
}

fn cleanup() -> Result<i32> {
    tcptrace::bpf::preflight()?;
    let n = tcptrace::bpf::cleanup()?;
    println!("removed {n} TC filter(s) left by tcptrace");
    Ok(0)
}

fn pcap(file: &std::path::Path, mode: Mode) -> Result<i32> {
    let map = tcptrace::pcap::CaptureFile::open(file)
        .with_context(|| format!("cannot read capture file {}", file.display()))?;
    let clock = Clock::epoch();
    let mut out = BufWriter::with_capacity(OUT_BUFFER, tcptrace::output::StdoutWriter);
    let mut m = Matcher::new(MatcherConfig::default());
    let mut tally = Tally::default();
    // Matched as the file is read: memory is the matcher's, not the file's.
    let mut failed: Option<std::io::Error> = None;
    let (stats, broken) = map.read_each(&mut |ev| {
        let write = || -> std::io::Result<()> {
            render::write_event(&mut out, mode, &ev, &clock)?;
            for c in m.push(ev) {
                tally.add(&c);
                render::connection(&mut out, mode, &c)?;
            }
            Ok(())
        };
        match write() {
            Ok(()) => true,
            Err(e) => {
                failed = Some(e);
                false
            }
        }
    });
    if let Some(e) = failed {
        return Err(e).context("cannot write the output");
    }
    if let (0, Some(e)) = (stats.packets, &broken) {
        return Err(e.clone()).with_context(|| format!("bad capture file {}", file.display()));
    }
    for c in m.finish() {
        tally.add(&c);
        render::connection(&mut out, mode, &c)?;
    }
    if mode == Mode::Json {
        // As a live run's, for scripts: what was read, and what the
        // connection records add up to.
        let mut summary = match serde_json::to_value(&stats) {
            Ok(serde_json::Value::Object(o)) => o,
            _ => serde_json::Map::new(),
        };
        summary.insert("type".into(), "summary".into());
        if let Some(e) = &broken {
            summary.insert("broken".into(), e.to_string().into());
        }
        tally.json_fields(&mut summary);
        writeln!(out, "{}", serde_json::Value::Object(summary))?;
    }
    out.flush()?;
    let s = &stats;
    eprint!(
        "tcptrace: {} packets, {} TCP segments ({} non-TCP, {} truncated, {} unsupported skipped); {}",
        s.packets,
        s.tcp_segments,
        s.skipped_non_tcp,
        s.skipped_truncated,
        s.skipped_unsupported,
        tally.text()
    );
    if let Some(e) = broken {
        eprintln!(
            "tcptrace: error: capture file {} breaks {e}; shown above is what the {} packets before that point hold (a capture cut short, or still being written)",
            file.display(),
            s.packets
        );
        return Ok(1);
    }
    Ok(0)
}

/// Large enough that a saturated run writes in big chunks, not a write(2)
/// per line or per ring batch.
const OUT_BUFFER: usize = 256 * 1024;

fn filter_from(a: &LiveArgs) -> Result<Filter> {
    let mut f = Filter::zeroed();
    if a.ports.len() > MAX_PORTS {
        bail!("at most {MAX_PORTS} --port filters");
    }
    for (i, p) in a.ports.iter().enumerate() {
        f.ports[i] = *p;
    }
    f.nports = a.ports.len() as u16;
    f.family = if a.ipv4 {
        AF_INET
    } else if a.ipv6 {
        AF_INET6
    } else {
        0
    };
    let put = |addr: &IpAddr, fam: &mut u16, out: &mut [u8; 16]| match addr {
        IpAddr::V4(v) => {
            *fam = AF_INET;
            out[..4].copy_from_slice(&v.octets());
        }
        IpAddr::V6(v) => {
            *fam = AF_INET6;
            *out = v.octets();
        }
    };
    if let Some(a) = &a.laddr {
        put(a, &mut f.laddr_family, &mut f.laddr);
    }
    if let Some(a) = &a.raddr {
        put(a, &mut f.raddr_family, &mut f.raddr);
    }
    if a.fault_skip_first_changes {
        f.fault = tcptrace_common::FAULT_SKIP_FIRST_CHANGES;
    }
    Ok(f)
}

fn live(a: LiveArgs, mode: Mode) -> Result<i32> {
    let ring_size = a
        .ring_size
        .max(4096)
        .checked_next_power_of_two()
        .context("--ring-size too large")?;
    let cfg = TraceConfig {
        filter: filter_from(&a)?,
        ring_size,
        wire: !a.no_wire,
        sock_ops: !a.no_sock_ops,
        accept_at_syscall_exit: a.accept_at_syscall_exit,
        ifaces: a.ifaces.clone(),
        netns: a.netns.clone(),
    };
    let yielding = match a.priority {
        Some(Priority::Yield) if !priority::can_claim() => bail!(
            "--priority yield needs CAP_SYS_NICE, to take the CPU back when tcptrace falls behind: run as root, add the capability, or use --priority normal"
        ),
        Some(p) => p == Priority::Yield,
        None => priority::yields_by_default(),
    };
    let threads = Threads::new(yielding);
    tcptrace::output::drop_with(threads.clone());
    let rt = runtime(&threads)?;
    let signals = Signals::new(&rt)?;
    let tracer = Tracer::start(&cfg)?;
    let run = Run {
        threads,
        mode,
        stop: Stop {
            after: a.duration.map(|d| Duration::from_secs_f64(d.max(0.0))),
            events: a.count,
            ..Stop::default()
        },
        keep: Box::new(|_| true),
        on_connection: &mut |_| {},
        always_match: false,
        tally_on_stderr: true,
        stopped: None,
    };
    trace(rt, signals, tracer, run)?;
    Ok(0)
}

/// The ring readers run on their own worker thread, apart from matching and
/// output (which run in `block_on` on the main thread): a burst of output
/// work must not keep the rings from being drained, or the kernel drops
/// events while tcptrace has CPU to spare.
fn runtime(threads: &Arc<Threads>) -> Result<tokio::runtime::Runtime> {
    let threads = threads.clone();
    Ok(tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("tcptrace-ring")
        .on_thread_start(move || threads.join())
        .enable_all()
        .build()?)
}

/// Ctrl-C and SIGTERM, caught from the moment this exists: they end the run
/// (and let the demo remove what it made) instead of killing the process.
struct Signals {
    int: tokio::signal::unix::Signal,
    term: tokio::signal::unix::Signal,
}

impl Signals {
    fn new(rt: &tokio::runtime::Runtime) -> Result<Signals> {
        priority::watch_stop_signals()?;
        let _g = rt.enter();
        Ok(Signals {
            int: signal(SignalKind::interrupt())?,
            term: signal(SignalKind::terminate())?,
        })
    }
}

/// What ends a live run, besides Ctrl-C, SIGTERM and the rings closing.
#[derive(Default)]
struct Stop {
    after: Option<Duration>,
    /// Events (state changes and segments, after `Run::keep`).
    events: Option<u64>,
    /// Connections the matcher emitted.
    connections: Option<u64>,
    /// Resolves when the run should end.
    when: Option<Pin<Box<dyn Future<Output = ()>>>>,
}

struct Run<'a> {
    /// The run's threads, yielding the CPU or not (see [`tcptrace::priority`]).
    threads: Arc<Threads>,
    mode: Mode,
    stop: Stop,
    /// Which events to use; the others are dropped before output and
    /// matching (on the readers' thread).
    keep: Box<dyn Fn(&Event) -> bool + Send + Sync>,
    /// Sees every connection the matcher emits, after it is printed.
    on_connection: &'a mut dyn FnMut(&Connection),
    /// Match connections in --events mode too (to count them).
    always_match: bool,
    /// End with what the connections add up to on stderr (the demo prints
    /// its own summary).
    tally_on_stderr: bool,
    /// Set as soon as the run stops, before the remaining events are drained
    /// and the programs detached.
    stopped: Option<&'a AtomicBool>,
}

/// Drives the live pipeline: ring readers → matcher → output, until `run.stop`.
/// Detaches everything (in the right namespaces) before it returns.
fn trace(
    rt: tokio::runtime::Runtime,
    mut signals: Signals,
    mut tracer: Tracer,
    run: Run,
) -> Result<()> {
    let rings = tracer.take_rings()?;
    let loggers = std::mem::take(&mut tracer.loggers);
    let threads = run.threads.clone();
    let res = rt.block_on(async {
        for l in loggers {
            tokio::spawn(reader::forward_logs(l));
        }
        run_live(&tracer, rings, &mut signals, run).await
    });
    // Also when the run failed (run_live ends yielding itself otherwise):
    // detaching must not wait for an idle CPU.
    threads.end();
    drop(signals);
    drop(rt);
    drop(tracer); // detaches everything, in the right namespaces
    res
}

async fn run_live(
    tracer: &Tracer,
    rings: Vec<aya::maps::RingBuf<aya::maps::MapData>>,
    signals: &mut Signals,
    run: Run<'_>,
) -> Result<()> {
    let Run {
        threads,
        mode,
        mut stop,
        keep,
        on_connection,
        always_match,
        tally_on_stderr,
        stopped,
    } = run;
    let matching = mode != Mode::Events || always_match;
    let clock = Clock::monotonic();
    let names = Arc::new(tracer.iface_names.clone());
    let stats = Arc::new(ReaderStats::default());
    let intake = Arc::new(Intake::new(keep, stop.events));
    // This thread matches and renders: it yields with the readers.
    threads.join();
    let fills = rings
        .iter()
        .map(|r| RingFill::new(r.as_fd()))
        .collect::<Result<Vec<_>>>()?;
    let backlog = Arc::new(Backlog::new(MAX_HELD));
    let guard = Guard::start(threads.clone(), fills, backlog.clone())?;
    // With MAX_HELD, bounds what waits between the readers and the matcher
    // to twice QUEUED_BATCHES × reader::MAX_BATCH events (about 60 MB at
    // worst, when the matcher falls behind); past that the readers wait,
    // the rings fill, and the kernel counts what it drops.
    let (tx, mut rx) = mpsc::channel::<Msg>(QUEUED_BATCHES);
    let mut marks = Watermarks::new(rings.len());
    let mut readers = Vec::with_capacity(rings.len());
    for (i, ring) in rings.into_iter().enumerate() {
        let r = reader::Reader {
            ring: i,
            names: names.clone(),
            mode,
            clock,
            stats: stats.clone(),
            intake: intake.clone(),
            tx: tx.clone(),
            repeats: tracer.sock_ops.then(reader::Repeats::default),
        };
        readers.push(tokio::spawn(reader::read_ring(ring, r)));
    }
    drop(tx);
    let deadline = stop.after.map(|d| tokio::time::Instant::now() + d);
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    let mut matcher = Matcher::new(MatcherConfig::default());
    let mut out = Output::stdout(threads.clone())?;
    // Events that reached this loop; the readers count those they took.
    let mut received: u64 = 0;
    let tally = std::cell::RefCell::new(Tally::default());
    let mut lost_reported = 0;
    let mut missed_reported = 0;
    let mut emit = |out: &mut Output, c: &Connection| -> std::io::Result<()> {
        tally.borrow_mut().add(c);
        render::connection(out, mode, c)?;
        on_connection(c);
        Ok(())
    };
    // Each namespace has its own ring, so a segment can arrive after the
    // state change it caused; the matcher gets events in time order, up to
    // where every ring has been read (`marks`).
    let mut order = Reorder::default();
    let mut flush = tokio::time::interval(FLUSH_EVERY);
    flush.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // Always on stderr, JSON mode included: scripts wait for it to know the
    // programs are attached.
    eprintln!(
        "tcptrace: tracing{}; Ctrl-C to stop",
        if tracer.uses_tcx {
            ""
        } else {
            " (TC via netlink)"
        }
    );
    'run: loop {
        backlog.set(order.len());
        tokio::select! {
            // Past MAX_HELD the readers' batches wait in the channel, and
            // once it is full, in the rings, whose overflow the kernel counts.
            msg = rx.recv(), if order.len() < MAX_HELD => {
                let batch = match msg {
                    None => break 'run,
                    Some(Msg::Drained { ring, at_ns }) => {
                        marks.drained(ring, at_ns);
                        continue 'run;
                    }
                    Some(Msg::Events(batch)) => batch,
                };
                received += batch.len() as u64;
                hold(&mut order, &intake, batch, matching);
                if stop.events.is_some_and(|n| received >= n) {
                    break 'run;
                }
            }
            _ = flush.tick(), if matching && !order.is_empty() => {
                // A full backlog is matched without waiting for the rings'
                // reports, which wait in the channel behind it.
                let cutoff = if order.len() >= MAX_HELD {
                    u64::MAX
                } else {
                    marks.cutoff(monotonic_ns())
                };
                let mut matched = 0;
                while let Some(ev) = order.pop_older(cutoff) {
                    for c in matcher.push(ev) {
                        emit(&mut out, &c)?;
                    }
                    matched += 1;
                    if matched == MATCH_SLICE {
                        break;
                    }
                }
                if matched == MATCH_SLICE {
                    // More are due: the next slice at once, not a tick later.
                    flush.reset_immediately();
                }
                out.flush()?;
            }
            _ = tick.tick() => {
                if matching {
                    let now = order.matched_until(marks.cutoff(monotonic_ns()));
                    for c in matcher.tick(now) {
                        emit(&mut out, &c)?;
                    }
                }
                out.flush()?;
                // A reader ends early only when it fails: its ring is no
                // longer read, so the run ends rather than go on without it.
                if intake.failed() || readers.iter().any(|h| h.is_finished()) {
                    break 'run;
                }
                let lost = tracer.lost();
                if lost > lost_reported {
                    eprintln!("tcptrace: lost {} events (ring buffer full; raise --ring-size); {lost} in total", lost - lost_reported);
                    lost_reported = lost;
                }
                let missed = tracer.skips(stats.duplicates.load(Ordering::Relaxed)).missed;
                if missed > missed_reported {
                    eprintln!("tcptrace: the kernel skipped {} state changes (another BPF tracing program was running on that CPU); {missed} in total", missed - missed_reported);
                    missed_reported = missed;
                }
            }
            _ = async { tokio::time::sleep_until(deadline.unwrap()).await }, if deadline.is_some() => break 'run,
            _ = async {
                match stop.when.as_mut() {
                    Some(f) => f.as_mut().await,
                    None => std::future::pending().await,
                }
            } => break 'run,
            _ = signals.int.recv() => break 'run,
            _ = signals.term.recv() => break 'run,
        }
        if let Some(n) = stop.connections {
            if tally.borrow().connections >= n {
                break 'run;
            }
        }
    }
    // The rest (draining, the summary, detaching) must not wait for an
    // idle CPU on a busy host.
    drop(guard);
    threads.end();
    if let Some(f) = stopped {
        f.store(true, Ordering::SeqCst);
    }
    // The readers take what their rings hold up to now, then end (a
    // reader can be a ring's worth behind under load); events after the
    // stop stay out. Bounded, in case one is stuck.
    intake.stop_at(monotonic_ns());
    let until = tokio::time::Instant::now() + STOP_READ_MAX;
    loop {
        match tokio::time::timeout_at(until, rx.recv()).await {
            Ok(Some(Msg::Events(batch))) => hold(&mut order, &intake, batch, matching),
            Ok(Some(Msg::Drained { .. })) => {}
            Ok(None) => break,
            Err(_) => {
                eprintln!(
                    "tcptrace: the rings were not read up to the stop within {} s; what they still held is left out",
                    STOP_READ_MAX.as_secs()
                );
                break;
            }
        }
    }
    // Then they stop taking events (they run on their own thread and would
    // keep the channel full under load); those they took, whose lines are
    // out, are all counted and all matched: a batch taken just before
    // still reaches the channel (the readers end, and the channel with
    // them, unless one is stuck), and only then is the channel closed.
    let (events, failed) = intake.close();
    if let Some(e) = failed {
        return Err(e).context("cannot write the event lines");
    }
    while let Ok(Some(msg)) = tokio::time::timeout(LAST_SEND_MAX, rx.recv()).await {
        if let Msg::Events(batch) = msg {
            hold(&mut order, &intake, batch, matching);
        }
    }
    rx.close();
    while let Ok(msg) = rx.try_recv() {
        if let Msg::Events(batch) = msg {
            hold(&mut order, &intake, batch, matching);
        }
    }
    if matching {
        while let Some(ev) = order.pop_older(u64::MAX) {
            for c in matcher.push(ev) {
                emit(&mut out, &c)?;
            }
        }
        for c in matcher.finish() {
            emit(&mut out, &c)?;
        }
    }
    // A reader still running after the stop's read is stuck and left
    // behind (said above); one that ended with an error failed the run.
    let mut failure = None;
    for (i, h) in readers.into_iter().enumerate() {
        if !h.is_finished() {
            continue;
        }
        let res = match h.await {
            Ok(res) => res,
            Err(e) => Err(anyhow::anyhow!("{e}")),
        };
        if let Err(e) = res {
            failure.get_or_insert(e.context(format!(
                "reading ring buffer {i} failed; its events from then on are missing"
            )));
        }
    }
    let (claims, claimed_ms) = threads.claimed();
    let ring_full = tracer.lost();
    let duplicates = stats.duplicates.load(Ordering::Relaxed);
    let Skips {
        missed,
        rescued,
        via_sock_ops,
    } = tracer.skips(duplicates);
    let lost = ring_full + missed;
    let undecodable = stats.undecodable.load(Ordering::Relaxed);
    let unmatched = matcher.stats().unresolved_state_events;
    let tally = tally.into_inner();
    if mode == Mode::Json {
        let mut summary = match serde_json::json!({"type": "summary", "events": events, "lost": lost, "ring_full": ring_full, "missed": missed, "rescued": rescued, "via_sock_ops": via_sock_ops, "duplicates": duplicates, "undecodable": undecodable, "unmatched_state_changes": unmatched, "priority_claims": claims, "priority_claimed_ms": claimed_ms, "accept_hook": tracer.accept_hook.name()})
        {
            serde_json::Value::Object(o) => o,
            _ => unreachable!("a JSON object literal"),
        };
        if matching {
            tally.json_fields(&mut summary);
        }
        writeln!(out, "{}", serde_json::Value::Object(summary))?;
    }
    out.finish()?;
    if claims > 0 {
        eprintln!("tcptrace: a ring buffer was half full {claims} times; tcptrace ran at normal priority for {claimed_ms} ms of the run to keep up");
    }
    eprintln!(
        "tcptrace: {events} events, {lost} lost{}{}{}",
        if lost > 0 {
            format!(" ({ring_full} ring buffer full, {missed} skipped by the kernel)")
        } else {
            String::new()
        },
        if undecodable > 0 {
            format!(", {undecodable} undecodable")
        } else {
            String::new()
        },
        if duplicates > 0 {
            format!(", {duplicates} delivered twice (dropped)")
        } else {
            String::new()
        }
    );
    if rescued > 0 {
        eprintln!("tcptrace: {rescued} state change{} the kernel skipped the tracepoint program for were covered by the sock_ops backup (not lost)", if rescued == 1 { "" } else { "s" });
    }
    if matching && tally_on_stderr {
        eprint!("tcptrace: {}", tally.text());
    }
    let gaps = tally.anomalies_of(AnomalyKind::StateGap);
    if gaps > 0 {
        eprintln!("tcptrace: {gaps} hole{} in sockets' state changes (state_gap in their connection records): state changes that did not reach tcptrace; the kernel does not count every state change it skips under load, so there can be holes with nothing counted as lost", if gaps == 1 { "" } else { "s" });
    }
    if unmatched > 0 {
        eprintln!("tcptrace: {unmatched} state changes are in no connection record: their socket never showed both ports (tcptrace saw it only in part); --events and --json show them");
    }
    match failure {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// A reader's batch into the matcher's queue (when matching), the emptied
/// batch back to the readers.
fn hold(order: &mut Reorder, intake: &Intake, mut batch: reader::Batch, matching: bool) {
    if matching {
        for ev in batch.drain(..) {
            order.push(ev);
        }
    }
    intake.recycle(batch);
}

const QUEUED_BATCHES: usize = 256;

/// How long the readers may take, once the run stops, to read their rings
/// up to the stop (a full 4 MiB ring is about 40,000 events, tens of ms).
const STOP_READ_MAX: Duration = Duration::from_secs(2);

/// How long, once the readers stop taking events, a batch one took just
/// before may take to reach the channel.
const LAST_SEND_MAX: Duration = Duration::from_millis(100);

/// The most events taken from the channel and not matched yet (about 30
/// MB): the matcher's loop takes no more batches until it is under that.
const MAX_HELD: usize = QUEUED_BATCHES * reader::MAX_BATCH;

/// How often events that every ring has been read past go to the matcher.
const FLUSH_EVERY: Duration = Duration::from_millis(20);

/// Events matched per turn of the main loop; the rest follow at once, the
/// readers' batches taken in between. A backlog (after the run yielded the
/// CPU for a while, up to MAX_HELD events) matched in
/// one go keeps the channel full for as long as that takes, a second or
/// more under load, and the readers wait while their rings fill: the
/// likely way two yielding bench rounds lost events to a full ring.
const MATCH_SLICE: usize = 4 * reader::MAX_BATCH;

/// `tcptrace demo`: see [`tcptrace::demo`].
fn demo(a: DemoArgs, mode: Mode) -> Result<i32> {
    // Say what is missing before creating anything.
    demo::preflight()?;
    let started = Instant::now();
    let client = a.client.unwrap_or_else(demo::Client::pick);
    // Catch Ctrl-C before the namespaces exist, so that it always ends in
    // their removal (Net's Drop) rather than the process dying with them.
    // The demo is its own workload: nothing to yield to.
    let threads = Threads::new(false);
    tcptrace::output::drop_with(threads.clone());
    let rt = runtime(&threads)?;
    let signals = Signals::new(&rt)?;
    let net = demo::Net::create()?;
    let server = demo::Server::start(&net)?;
    let tracer = Tracer::start(&net.trace_config())?;
    let say = |s: String| {
        if mode == Mode::Json {
            eprintln!("tcptrace: {s}")
        } else {
            println!("{s}")
        }
    };
    say(format!(
        "demo: client {} in namespace {}, server {}:{} in namespace {} ({} ↔ {}); {} × GET {} with {}\n",
        demo::CLIENT_ADDR,
        net.client_ns,
        demo::SERVER_ADDR,
        demo::PORT,
        net.server_ns,
        demo::CLIENT_IF,
        demo::SERVER_IF,
        a.rounds,
        demo::FILE_PATH,
        client.name()
    ));
    let stopping = Arc::new(AtomicBool::new(false));
    let (done_tx, done_rx) = tokio::sync::oneshot::channel::<()>();
    let downloads = demo::download(&net, client, a.rounds, stopping.clone(), move || {
        let _ = done_tx.send(());
    })?;
    let mut summary = demo::Summary::default();
    let run = Run {
        threads,
        mode,
        stop: Stop {
            connections: Some(u64::from(a.rounds)),
            // After the last download, the matcher needs its linger time
            // (500 ms) and a tick to emit the last connection.
            when: Some(Box::pin(async move {
                let _ = done_rx.await;
                tokio::time::sleep(Duration::from_secs(2)).await;
            })),
            ..Stop::default()
        },
        keep: Box::new(net.event_filter()),
        on_connection: &mut |c| summary.add(c),
        always_match: true,
        tally_on_stderr: false,
        stopped: Some(&stopping),
    };
    let res = trace(rt, signals, tracer, run);
    stopping.store(true, Ordering::SeqCst); // also when trace() failed early
    let d = downloads.join().unwrap_or_else(|_| demo::Downloads {
        ok: 0,
        errors: vec!["the download thread panicked".into()],
    });
    drop(server);
    let elapsed = started.elapsed();
    let json = summary.json(a.rounds, client, &d, &net, elapsed);
    drop(net); // removes the namespaces and the veth pair
    res?;
    if mode == Mode::Json {
        println!("{json}");
    } else {
        print!("{}", summary.text(a.rounds, client, &d, elapsed));
    }
    if d.ok < a.rounds || summary.complete < u64::from(a.rounds) {
        eprintln!(
            "tcptrace: demo incomplete: {}/{} downloads, {} complete connections traced",
            d.ok, a.rounds, summary.complete
        );
        return Ok(1);
    }
    Ok(0)
}
