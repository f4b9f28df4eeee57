//! `tcpstorm`: a loopback TCP load generator for `cargo xtask bench`.
//!
//! Two modes, both against a server in this same process, bound to
//! 127.0.0.1 on a port the kernel picks:
//!
//! * storm (default): `--threads` client threads each connect, send 4 bytes,
//!   read the 4-byte reply and close, over and over, for `--duration` seconds
//!   (or until `--max-conns` connections in total). By default the server
//!   closes first (after its reply), then the client (on end of file); see
//!   `--close-first`. Every connection is finished on both sides before the
//!   result is printed.
//! * `--idle N`: opens N concurrent idle connections (client and server
//!   socket both in one process; the clients' source addresses are spread
//!   over 127.1.0.x so ephemeral ports do not run out), holds them, then
//!   closes them all. Past what RLIMIT_NOFILE allows one process, the
//!   connections are split over shard processes sharing the listener.
//!
//! Output is JSON Lines on stdout: `{"type":"ready","port":P}` once the
//! listener is up; then, with `--wait`, it reads one line on stdin before
//! each phase (so a tracer can attach to that port first). Storm ends with
//! `{"type":"result","connections":N,"conn_per_s":R,...}`; idle prints
//! `{"type":"opened",...}` and `{"type":"closed",...}`. Everything is
//! bounded: at most 600 s and 10 million connections per storm.
use std::io::{BufRead, Read, Write};
use std::net::{Ipv4Addr, SocketAddrV4, TcpListener, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _, Result};
use clap::Parser;

const MAX_DURATION_S: f64 = 600.0;
const MAX_CONNS: u64 = 10_000_000;
const MAX_IDLE: usize = 1_000_000;

#[derive(Parser)]
#[command(about = "Loopback TCP connection storm (127.0.0.1 only) for cargo xtask bench")]
struct Args {
    /// Client threads (the server gets as many worker threads).
    #[arg(long, default_value_t = 2)]
    threads: usize,
    /// Seconds to storm (at most 600).
    #[arg(long, default_value_t = 5.0)]
    duration: f64,
    /// Stop after this many connections in total (at most 10 million).
    #[arg(long, default_value_t = MAX_CONNS)]
    max_conns: u64,
    /// Storm: which side closes first. The side that does keeps the TIME_WAIT
    /// socket; when that is the client, its ports run short and connect(2)
    /// speed swings with the TIME_WAIT table's fill (2-3x on loopback), so
    /// the server closes first by default.
    #[arg(long, value_enum, default_value_t = First::Server)]
    close_first: First,
    /// Instead of a storm, open this many concurrent idle connections.
    #[arg(long, value_name = "N")]
    idle: Option<usize>,
    /// Idle mode: open (and later close) at most this many connections per
    /// second, in total (0: as fast as possible).
    #[arg(long, default_value_t = 0.0, value_name = "PER_S")]
    rate: f64,
    /// Print the ready line and wait for a line on stdin before each phase.
    #[arg(long)]
    wait: bool,
    /// Internal: one idle-mode shard process.
    #[arg(long, hide = true)]
    shard: Option<String>,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum First {
    Server,
    Client,
}

fn main() {
    if let Err(e) = run(Args::parse()) {
        eprintln!("tcpstorm: error: {e:#}");
        std::process::exit(1);
    }
}

fn run(a: Args) -> Result<()> {
    if let Some(spec) = &a.shard {
        return shard(spec);
    }
    if !(a.duration > 0.0 && a.duration <= MAX_DURATION_S) {
        bail!("--duration must be in (0, {MAX_DURATION_S}]");
    }
    if a.threads == 0 || a.threads > 256 {
        bail!("--threads must be in 1..=256");
    }
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).context("bind 127.0.0.1:0")?;
    let port = listener.local_addr()?.port();
    // std listens with a small backlog; the idle mode needs a deep one.
    // SAFETY: listen(2) on a socket we own.
    unsafe { libc::listen(listener.as_raw_fd(), 65535) };
    say(&format!("{{\"type\":\"ready\",\"port\":{port}}}"));
    match a.idle {
        Some(n) => idle(listener, port, n.min(MAX_IDLE), a.rate.max(0.0), a.wait),
        None => {
            if a.wait {
                wait_line()?;
            }
            storm(listener, port, &a)
        }
    }
}

fn say(line: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

fn wait_line() -> Result<()> {
    let mut s = String::new();
    std::io::stdin().lock().read_line(&mut s).context("stdin")?;
    Ok(())
}

fn storm(listener: TcpListener, port: u16, a: &Args) -> Result<()> {
    listener.set_nonblocking(true)?;
    let listener = Arc::new(listener);
    let stop_clients = Arc::new(AtomicBool::new(false));
    let stop_server = Arc::new(AtomicBool::new(false));
    let started = Arc::new(AtomicU64::new(0));
    let done = Arc::new(AtomicU64::new(0));
    let served = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let max = a.max_conns.min(MAX_CONNS);
    let server_first = a.close_first == First::Server;

    let mut servers = Vec::new();
    for _ in 0..a.threads {
        let (l, stop, served, errors) = (
            listener.clone(),
            stop_server.clone(),
            served.clone(),
            errors.clone(),
        );
        servers.push(std::thread::spawn(move || {
            serve(&l, server_first, &stop, &served, &errors)
        }));
    }
    let t0 = Instant::now();
    let deadline = t0 + Duration::from_secs_f64(a.duration);
    let mut clients = Vec::new();
    for _ in 0..a.threads {
        let (stop, started, done, errors) = (
            stop_clients.clone(),
            started.clone(),
            done.clone(),
            errors.clone(),
        );
        clients.push(std::thread::spawn(move || {
            let dst = SocketAddrV4::new(Ipv4Addr::LOCALHOST, port);
            while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                if started.fetch_add(1, Ordering::Relaxed) >= max {
                    break;
                }
                match client_once(dst, server_first) {
                    Ok(()) => done.fetch_add(1, Ordering::Relaxed),
                    Err(_) => errors.fetch_add(1, Ordering::Relaxed),
                };
            }
            stop.store(true, Ordering::Relaxed);
        }));
    }
    for c in clients {
        let _ = c.join();
    }
    let elapsed = t0.elapsed().as_secs_f64();
    let n = done.load(Ordering::Relaxed);
    // Every server side must be closed too before we report (and exit).
    let settle = Instant::now() + Duration::from_secs(10);
    while served.load(Ordering::Relaxed) < n && Instant::now() < settle {
        std::thread::sleep(Duration::from_millis(5));
    }
    stop_server.store(true, Ordering::Relaxed);
    for s in servers {
        let _ = s.join();
    }
    let served = served.load(Ordering::Relaxed);
    say(&format!(
        "{{\"type\":\"result\",\"port\":{port},\"threads\":{},\"connections\":{n},\"served\":{served},\"errors\":{},\"duration_s\":{elapsed:.4},\"conn_per_s\":{:.1}}}",
        a.threads,
        errors.load(Ordering::Relaxed),
        n as f64 / elapsed
    ));
    Ok(())
}

fn client_once(dst: SocketAddrV4, server_first: bool) -> std::io::Result<()> {
    let mut s = TcpStream::connect(dst)?;
    s.write_all(b"ping")?;
    let mut buf = [0u8; 4];
    s.read_exact(&mut buf)?;
    if server_first {
        let mut rest = [0u8; 16];
        if s.read(&mut rest)? != 0 {
            return Err(std::io::Error::other("data after the reply"));
        }
    }
    Ok(()) // dropped: closes
}

/// One server worker: accepts (the listener is non-blocking, polled so the
/// worker notices `stop`), answers, waits for the client's FIN, closes.
fn serve(
    l: &TcpListener,
    server_first: bool,
    stop: &AtomicBool,
    served: &AtomicU64,
    errors: &AtomicU64,
) {
    loop {
        match l.accept() {
            Ok((mut s, _)) => {
                // accept(2) does not pass O_NONBLOCK on to the new socket.
                let mut buf = [0u8; 4];
                let ok = s.read_exact(&mut buf).is_ok()
                    && s.write_all(b"pong").is_ok()
                    && (server_first || {
                        let mut rest = [0u8; 16];
                        matches!(s.read(&mut rest), Ok(0))
                    });
                if !ok {
                    errors.fetch_add(1, Ordering::Relaxed);
                }
                drop(s);
                served.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if stop.load(Ordering::Relaxed) {
                    return;
                }
                let mut pfd = libc::pollfd {
                    fd: l.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                };
                // SAFETY: one valid pollfd.
                unsafe { libc::poll(&mut pfd, 1, 20) };
            }
            Err(_) => {
                errors.fetch_add(1, Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(1));
            }
        }
    }
}

/// Idle connections per source address: a quarter of the ephemeral port
/// range, so connect(2)'s search for a free port stays short (it gets
/// quadratic when a source address's ports are nearly all taken).
fn ports_per_source() -> usize {
    let s = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").unwrap_or_default();
    let v: Vec<usize> = s
        .split_whitespace()
        .filter_map(|x| x.parse().ok())
        .collect();
    match v.as_slice() {
        [lo, hi] if hi > lo => ((hi - lo + 1) / 4).clamp(1, 8192),
        _ => 4096,
    }
}

/// Raises the soft RLIMIT_NOFILE as far as the hard limit allows (raising
/// the hard limit needs CAP_SYS_RESOURCE, which containers often drop) and
/// returns it.
fn raise_nofile() -> u64 {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: valid pointers.
    unsafe {
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut r);
        let want = libc::rlimit {
            rlim_cur: r.rlim_max.max(1_100_000),
            rlim_max: r.rlim_max.max(1_100_000),
        };
        if libc::setrlimit(libc::RLIMIT_NOFILE, &want) != 0 {
            let soft = libc::rlimit {
                rlim_cur: r.rlim_max,
                rlim_max: r.rlim_max,
            };
            libc::setrlimit(libc::RLIMIT_NOFILE, &soft);
        }
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut r);
    }
    r.rlim_cur
}

/// A client socket bound to `src` (port chosen at connect time, per 4-tuple)
/// and connected to `dst`.
fn connect_from(src: Ipv4Addr, dst: SocketAddrV4) -> std::io::Result<TcpStream> {
    // SAFETY: plain socket calls on an fd we own; the fd is handed to
    // TcpStream (which closes it) or closed on error.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let s = TcpStream::from_raw_fd(fd);
        let one: libc::c_int = 1;
        libc::setsockopt(
            fd,
            libc::IPPROTO_IP,
            libc::IP_BIND_ADDRESS_NO_PORT,
            &one as *const _ as *const libc::c_void,
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        );
        let sin = |a: Ipv4Addr, p: u16| libc::sockaddr_in {
            sin_family: libc::AF_INET as libc::sa_family_t,
            sin_port: p.to_be(),
            sin_addr: libc::in_addr {
                s_addr: u32::from(a).to_be(),
            },
            sin_zero: [0; 8],
        };
        let len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
        let local = sin(src, 0);
        if libc::bind(fd, &local as *const _ as *const libc::sockaddr, len) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        let remote = sin(*dst.ip(), dst.port());
        if libc::connect(fd, &remote as *const _ as *const libc::sockaddr, len) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(s)
    }
}

/// The source address of the `g`-th idle connection: 127.1.0.1, 127.1.0.2,
/// … (all loopback; not 127.0.0.1, whose ports the storm's TIME_WAIT
/// sockets may hold), `per_src` connections each.
fn source_for(g: usize, per_src: usize) -> Ipv4Addr {
    let k = g / per_src + 1;
    Ipv4Addr::new(127, 1, (k >> 8) as u8, k as u8)
}

/// Opens connections `first..first + n` and accepts `n` (from the listener
/// this process may share with sibling shards).
/// Spaces operations out to `rate` per second (0: as fast as possible).
struct Pacer {
    t0: Instant,
    rate: f64,
}

impl Pacer {
    fn new(rate: f64) -> Pacer {
        Pacer {
            t0: Instant::now(),
            rate,
        }
    }

    /// Before the `i`-th operation.
    fn wait(&self, i: usize) {
        if self.rate > 0.0 {
            let due = self.t0 + Duration::from_secs_f64(i as f64 / self.rate);
            let now = Instant::now();
            if due > now {
                std::thread::sleep(due - now);
            }
        }
    }
}

fn open_idle(
    l: &TcpListener,
    dst: SocketAddrV4,
    first: usize,
    n: usize,
    per_src: usize,
    rate: f64,
) -> Result<(Vec<TcpStream>, Vec<TcpStream>)> {
    let mut clients: Vec<TcpStream> = Vec::with_capacity(n);
    let mut servers: Vec<TcpStream> = Vec::with_capacity(n);
    let accept_some = |servers: &mut Vec<TcpStream>| -> Result<()> {
        while servers.len() < n {
            match l.accept() {
                Ok((s, _)) => servers.push(s),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) => return Err(e).context("accept"),
            }
        }
        Ok(())
    };
    let pace = Pacer::new(rate);
    for i in first..first + n {
        pace.wait(i - first);
        let src = source_for(i, per_src);
        let s = connect_from(src, dst).with_context(|| format!("connect #{i} from {src}"))?;
        clients.push(s);
        if i % 128 == 127 {
            accept_some(&mut servers)?;
        }
    }
    let give_up = Instant::now() + Duration::from_secs(60);
    while servers.len() < n {
        accept_some(&mut servers)?;
        if Instant::now() > give_up {
            bail!("only {} of {n} connections accepted", servers.len());
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    Ok((clients, servers))
}

/// The clients close first; once every server side has seen its client's
/// FIN (so each connection closes the same way, whatever the load), the
/// servers close. Both paced at `rate` per second.
fn close_idle(clients: Vec<TcpStream>, servers: Vec<TcpStream>, rate: f64) {
    let pace = Pacer::new(rate);
    for (i, c) in clients.into_iter().enumerate() {
        pace.wait(i);
        drop(c);
    }
    let give_up = Instant::now() + Duration::from_secs(60);
    let mut waiting: Vec<usize> = (0..servers.len()).collect();
    for s in &servers {
        let _ = s.set_nonblocking(true);
    }
    while !waiting.is_empty() && Instant::now() < give_up {
        waiting.retain(|&i| {
            let mut b = [0u8; 16];
            match (&servers[i]).read(&mut b) {
                Ok(0) => false, // the FIN is in
                Ok(_) => true,  // (no data is sent; keep reading)
                Err(e) => e.kind() == std::io::ErrorKind::WouldBlock,
            }
        });
        if !waiting.is_empty() {
            std::thread::sleep(Duration::from_millis(2));
        }
    }
    let pace = Pacer::new(rate);
    for (i, s) in servers.into_iter().enumerate() {
        pace.wait(i);
        drop(s);
    }
}

/// Idle mode. One process holds both ends of each connection, so one process
/// can hold (RLIMIT_NOFILE - slack) / 2 of them; beyond that the work is
/// split over shard processes (this binary with `--shard`) that share the
/// listener, each opening and accepting its own share.
fn idle(listener: TcpListener, port: u16, n: usize, rate: f64, wait: bool) -> Result<()> {
    let limit = raise_nofile();
    listener.set_nonblocking(true)?;
    let dst = SocketAddrV4::new(Ipv4Addr::LOCALHOST, port);
    let per_src = ports_per_source();
    let per_proc = (limit.saturating_sub(256) / 2).clamp(1, 400_000) as usize;
    let nshards = n.div_ceil(per_proc).max(1);
    let mut shards = Vec::new();
    if nshards > 1 {
        // The shards inherit the listener.
        // SAFETY: fcntl on our own fd.
        unsafe { libc::fcntl(listener.as_raw_fd(), libc::F_SETFD, 0) };
        let exe = std::env::current_exe()?;
        let per = n.div_ceil(nshards);
        for j in 0..nshards {
            let first = j * per;
            let count = per.min(n - first);
            let child = std::process::Command::new(&exe)
                .args([
                    "--shard",
                    &format!(
                        "{},{first},{count},{per_src},{port},{}",
                        listener.as_raw_fd(),
                        (rate / nshards as f64).round() as u64
                    ),
                ])
                .stdin(std::process::Stdio::piped())
                .stdout(std::process::Stdio::piped())
                .spawn()
                .context("spawn shard")?;
            shards.push(child);
        }
    }
    if wait {
        wait_line()?;
    }
    let t0 = Instant::now();
    let mut local = None;
    if shards.is_empty() {
        local = Some(open_idle(&listener, dst, 0, n, per_src, rate)?);
    } else {
        for c in &mut shards {
            shard_say(c, "open")?;
        }
        for c in &mut shards {
            shard_expect(c, "opened")?;
        }
    }
    let open_s = t0.elapsed().as_secs_f64();
    say(&format!(
        "{{\"type\":\"opened\",\"port\":{port},\"conns\":{n},\"processes\":{},\"open_s\":{open_s:.3}}}",
        nshards
    ));
    if wait {
        wait_line()?;
    }
    let t1 = Instant::now();
    if let Some((c, s)) = local {
        close_idle(c, s, rate);
    }
    for c in &mut shards {
        shard_say(c, "close")?;
    }
    for c in &mut shards {
        shard_expect(c, "closed")?;
        c.wait()?;
    }
    let close_s = t1.elapsed().as_secs_f64();
    say(&format!(
        "{{\"type\":\"closed\",\"port\":{port},\"conns\":{n},\"close_s\":{close_s:.3}}}"
    ));
    Ok(())
}

fn shard_say(c: &mut std::process::Child, what: &str) -> Result<()> {
    let w = c.stdin.as_mut().context("shard stdin")?;
    writeln!(w, "{what}")?;
    w.flush()?;
    Ok(())
}

fn shard_expect(c: &mut std::process::Child, what: &str) -> Result<()> {
    let r = c.stdout.as_mut().context("shard stdout")?;
    // Byte by byte: the line is short and we must not read past it.
    let mut line = Vec::new();
    let mut b = [0u8; 1];
    while r.read(&mut b)? == 1 && b[0] != b'\n' {
        line.push(b[0]);
    }
    let line = String::from_utf8_lossy(&line);
    if line.trim() != what {
        bail!("shard said {line:?}, expected {what:?} (see its stderr)");
    }
    Ok(())
}

/// A shard process: `--shard FD,FIRST,COUNT,PER_SRC,PORT,RATE`.
fn shard(spec: &str) -> Result<()> {
    let v: Vec<usize> = spec
        .split(',')
        .map(|x| x.parse())
        .collect::<Result<_, _>>()
        .context("--shard")?;
    let [fd, first, count, per_src, port, rate] = v[..] else {
        bail!("--shard FD,FIRST,COUNT,PER_SRC,PORT,RATE")
    };
    raise_nofile();
    // SAFETY: the parent passed us this listening socket's fd.
    let listener = unsafe { TcpListener::from_raw_fd(fd as i32) };
    let dst = SocketAddrV4::new(Ipv4Addr::LOCALHOST, port as u16);
    wait_line()?;
    let (c, s) = open_idle(&listener, dst, first, count, per_src, rate as f64)?;
    say("opened");
    wait_line()?;
    close_idle(c, s, rate as f64);
    say("closed");
    Ok(())
}
