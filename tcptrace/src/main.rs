//! The `tcptrace` command line.
use std::io::Write;
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context as _, Result};
use clap::{Args, Parser, Subcommand};
use tcptrace::bpf::{TraceConfig, Tracer};
use tcptrace::event::Event;
use tcptrace::matcher::{Matcher, MatcherConfig};
use tcptrace::reader::{self, ReaderStats};
use tcptrace::render::{self, Clock, Mode};
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
}

fn main() {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    let cli = Cli::parse();
    let res = match cli.cmd {
        Some(Cmd::Pcap { file, out }) => pcap(&file, merge(cli.out, out)),
        Some(Cmd::Cleanup) => cleanup(),
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

fn merge(a: OutputArgs, b: OutputArgs) -> Mode {
    mode(OutputArgs {
        json: a.json || b.json,
        events: a.events || b.events,
    })
}

fn mode(o: OutputArgs) -> Mode {
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
    let cap = tcptrace::pcap::read_file(file)?;
    let clock = Clock::epoch();
    let mut out = std::io::stdout().lock();
    let mut m = Matcher::new(MatcherConfig::default());
    for ev in &cap.events {
        emit_event(&mut out, mode, ev, &clock)?;
        for c in m.push(ev) {
            render::connection(&mut out, mode, &c)?;
        }
    }
    for c in m.finish() {
        render::connection(&mut out, mode, &c)?;
    }
    out.flush()?;
    let s = &cap.stats;
    eprintln!(
        "tcptrace: {} packets, {} TCP segments ({} non-TCP, {} truncated, {} unsupported skipped)",
        s.packets, s.tcp_segments, s.skipped_non_tcp, s.skipped_truncated, s.skipped_unsupported
    );
    Ok(0)
}

fn emit_event(out: &mut dyn Write, mode: Mode, ev: &Event, clock: &Clock) -> std::io::Result<()> {
    match mode {
        Mode::Json => writeln!(out, "{}", render::event_json(ev)),
        Mode::Events => writeln!(out, "{}", render::event_line(ev, clock)),
        Mode::Timeline => Ok(()),
    }
}

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
        ifaces: a.ifaces.clone(),
        netns: a.netns.clone(),
    };
    let mut tracer = Tracer::start(&cfg)?;
    let rings = tracer.take_rings()?;
    let loggers = std::mem::take(&mut tracer.loggers);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let res = rt.block_on(async {
        for l in loggers {
            tokio::spawn(reader::forward_logs(l));
        }
        run_live(&tracer, rings, &a, mode).await
    });
    drop(rt);
    drop(tracer); // detaches everything, in the right namespaces
    res
}

async fn run_live(
    tracer: &Tracer,
    rings: Vec<aya::maps::RingBuf<aya::maps::MapData>>,
    a: &LiveArgs,
    mode: Mode,
) -> Result<i32> {
    let clock = Clock::monotonic();
    let names = Arc::new(tracer.iface_names.clone());
    let stats = Arc::new(ReaderStats::default());
    let (tx, mut rx) = mpsc::channel::<Vec<Event>>(1024);
    for ring in rings {
        tokio::spawn(reader::read_ring(
            ring,
            names.clone(),
            stats.clone(),
            tx.clone(),
        ));
    }
    drop(tx);
    let mut sigterm = signal(SignalKind::terminate())?;
    let mut sigint = signal(SignalKind::interrupt())?;
    let deadline = a
        .duration
        .map(|d| tokio::time::Instant::now() + Duration::from_secs_f64(d.max(0.0)));
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    let mut matcher = Matcher::new(MatcherConfig::default());
    let mut out = std::io::BufWriter::new(std::io::stdout());
    let mut events: u64 = 0;
    let mut lost_reported = 0;
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
        tokio::select! {
            batch = rx.recv() => {
                let Some(batch) = batch else { break 'run };
                for ev in &batch {
                    events += 1;
                    emit_event(&mut out, mode, ev, &clock)?;
                    if mode != Mode::Events {
                        for c in matcher.push(ev) {
                            render::connection(&mut out, mode, &c)?;
                        }
                    }
                    if a.count.is_some_and(|n| events >= n) {
                        break 'run;
                    }
                }
                out.flush()?;
            }
            _ = tick.tick() => {
                let now = monotonic_ns();
                for c in matcher.tick(now) {
                    render::connection(&mut out, mode, &c)?;
                }
                out.flush()?;
                let lost = tracer.lost();
                if lost > lost_reported {
                    eprintln!("tcptrace: lost {} events (ring buffer full; raise --ring-size); {lost} in total", lost - lost_reported);
                    lost_reported = lost;
                }
            }
            _ = async { tokio::time::sleep_until(deadline.unwrap()).await }, if deadline.is_some() => break 'run,
            _ = sigint.recv() => break 'run,
            _ = sigterm.recv() => break 'run,
        }
    }
    // Events already in the channel still count toward the summary.
    while let Ok(batch) = rx.try_recv() {
        if a.count.is_some_and(|n| events >= n) {
            break;
        }
        for ev in &batch {
            events += 1;
            emit_event(&mut out, mode, ev, &clock)?;
            if mode != Mode::Events {
                for c in matcher.push(ev) {
                    render::connection(&mut out, mode, &c)?;
                }
            }
        }
    }
    if mode != Mode::Events {
        for c in matcher.finish() {
            render::connection(&mut out, mode, &c)?;
        }
    }
    let lost = tracer.lost();
    let undecodable = stats.undecodable.load(Ordering::Relaxed);
    if mode == Mode::Json {
        writeln!(
            out,
            "{}",
            serde_json::json!({"type": "summary", "events": events, "lost": lost, "undecodable": undecodable})
        )?;
    }
    out.flush()?;
    eprintln!(
        "tcptrace: {events} events, {lost} lost{}",
        if undecodable > 0 {
            format!(", {undecodable} undecodable")
        } else {
            String::new()
        }
    );
    Ok(0)
}

fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid clock id and out pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}
