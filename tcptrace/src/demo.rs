//! `tcptrace demo`: the seed scenario in one command.
//!
//! Two network namespaces joined by a veth pair (client 192.168.131.132,
//! server 192.168.131.138, /24), a small HTTP/1.1 server in the server
//! namespace serving `/file_64KB`, and N downloads from the client namespace
//! (wget or curl when installed, else a built-in client), each its own
//! connection. The CLI traces both namespaces with the live pipeline and
//! prints the explained timelines and a [`Summary`].
//!
//! Traffic never leaves the two namespaces: neither has a route anywhere
//! else. Everything the demo creates is removed when [`Net`] is dropped
//! (errors, panics and Ctrl-C included; the CLI catches the signals), and a
//! run that was killed outright is cleaned up by the next one
//! ([`Net::create`] removes namespaces whose process is gone).
use std::fs::File;
use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context as _, Result};
use serde_json::json;

use crate::bpf::TraceConfig;
use crate::event::Event;
use crate::matcher::{Close, Connection};
use crate::netns::Netns;
use crate::tally::Tally;

pub const CLIENT_ADDR: Ipv4Addr = Ipv4Addr::new(192, 168, 131, 132);
pub const SERVER_ADDR: Ipv4Addr = Ipv4Addr::new(192, 168, 131, 138);
pub const PREFIX_LEN: u8 = 24;
pub const PORT: u16 = 80;
pub const FILE_PATH: &str = "/file_64KB";
pub const FILE_SIZE: usize = 65536;
/// Interface names inside the namespaces (the veth pair's two ends).
pub const CLIENT_IF: &str = "veth-client";
pub const SERVER_IF: &str = "veth-server";
/// Namespace names: `tcptrace-demo-PID-client` and `tcptrace-demo-PID-server`.
pub const NS_PREFIX: &str = "tcptrace-demo-";
/// What one download may take before it counts as failed.
const DOWNLOAD_TIMEOUT: Duration = Duration::from_secs(3);
const NETNS_DIR: &str = "/var/run/netns";

/// Says what is missing before anything is created: what tracing needs
/// ([`crate::bpf::preflight`]), CAP_SYS_ADMIN for the namespaces, and `ip`.
pub fn preflight() -> Result<()> {
    crate::bpf::preflight()?;
    const CAP_SYS_ADMIN: u32 = 21;
    let caps = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("CapEff:"))
                .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        })
        .unwrap_or(0);
    if caps & (1 << CAP_SYS_ADMIN) == 0 {
        bail!("the demo creates network namespaces, which needs root (CAP_SYS_ADMIN): run it with sudo");
    }
    which("ip").context(
        "the demo needs iproute2's `ip` command to create its network namespaces and veth pair: install iproute2",
    )?;
    Ok(())
}

/// The two namespaces and the veth pair; removed on drop.
pub struct Net {
    pub client_ns: String,
    pub server_ns: String,
    /// Namespace inodes, as live events carry them.
    pub client_inode: u32,
    pub server_inode: u32,
    created: Vec<String>,
    veth: bool,
}

impl Net {
    /// Creates both namespaces, the veth pair between them, and their
    /// addresses. Needs root and iproute2's `ip`.
    pub fn create() -> Result<Net> {
        preflight()?;
        remove_stale();
        let pid = std::process::id();
        let mut net = Net {
            client_ns: format!("{NS_PREFIX}{pid}-client"),
            server_ns: format!("{NS_PREFIX}{pid}-server"),
            client_inode: 0,
            server_inode: 0,
            created: Vec::new(),
            veth: false,
        };
        for ns in [net.client_ns.clone(), net.server_ns.clone()] {
            ip(&["netns", "add", &ns]).context(
                "cannot create a network namespace (does this kernel have CONFIG_NET_NS, and is /var/run/netns writable?)",
            )?;
            net.created.push(ns);
        }
        let (c, s) = (net.client_ns.clone(), net.server_ns.clone());
        ip(&[
            "link", "add", CLIENT_IF, "netns", &c, "type", "veth", "peer", "name", SERVER_IF,
            "netns", &s,
        ])
        .context("cannot create the veth pair (does this kernel have veth, CONFIG_VETH?)")?;
        net.veth = true;
        for (ns, ifname, addr) in [(&c, CLIENT_IF, CLIENT_ADDR), (&s, SERVER_IF, SERVER_ADDR)] {
            ip(&[
                "-n",
                ns,
                "addr",
                "add",
                &format!("{addr}/{PREFIX_LEN}"),
                "dev",
                ifname,
            ])?;
            ip(&["-n", ns, "link", "set", ifname, "up"])?;
            ip(&["-n", ns, "link", "set", "lo", "up"])?;
        }
        net.client_inode = Netns::open(&c)?.inode;
        net.server_inode = Netns::open(&s)?.inode;
        Ok(net)
    }

    /// Both namespaces' veth ends, port 80 only. Naming the interfaces keeps
    /// the TC programs off the host's own interfaces (an empty list would
    /// attach to every interface that is up, in this namespace too).
    pub fn trace_config(&self) -> TraceConfig {
        let mut filter = tcptrace_common::Filter::zeroed();
        filter.ports[0] = PORT;
        filter.nports = 1;
        TraceConfig {
            filter,
            ring_size: 4 << 20,
            wire: true,
            sock_ops: true,
            accept_at_syscall_exit: false,
            ifaces: vec![CLIENT_IF.to_string(), SERVER_IF.to_string()],
            netns: vec![self.client_ns.clone(), self.server_ns.clone()],
        }
    }

    /// Keeps the events of the demo's namespaces (a filter the ring readers'
    /// thread can hold). The state tracepoint sees every namespace, so port
    /// 80 traffic of the host would otherwise show up.
    pub fn event_filter(&self) -> impl Fn(&Event) -> bool + Send + Sync + 'static {
        let (client, server) = (self.client_inode, self.server_inode);
        move |ev| {
            let ns = match ev {
                Event::State(s) => s.netns,
                Event::Segment(s) => s.netns,
            };
            ns == client || ns == server
        }
    }

    fn remove(&mut self) {
        if std::mem::take(&mut self.veth) {
            // Deleting one end deletes the pair, now rather than whenever the
            // namespace is finally freed.
            let _ = ip(&["-n", &self.client_ns, "link", "del", CLIENT_IF]);
        }
        for ns in self.created.drain(..).rev() {
            if let Err(e) = ip(&["netns", "del", &ns]) {
                eprintln!("tcptrace: could not remove network namespace {ns}: {e:#}; remove it with `ip netns del {ns}`");
            }
        }
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        self.remove();
    }
}

/// Removes namespaces left by demo runs whose process no longer exists
/// (killed with SIGKILL, or a power cut).
fn remove_stale() {
    let Ok(dir) = std::fs::read_dir(NETNS_DIR) else {
        return;
    };
    for entry in dir.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(pid) = name
            .strip_prefix(NS_PREFIX)
            .and_then(|r| r.split('-').next())
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if Path::new(&format!("/proc/{pid}")).exists() {
            continue;
        }
        let _ = ip(&["-n", &name, "link", "del", CLIENT_IF]);
        let _ = ip(&["-n", &name, "link", "del", SERVER_IF]);
        match ip(&["netns", "del", &name]) {
            Ok(()) => {
                eprintln!("tcptrace: removed network namespace {name} left by an earlier demo")
            }
            Err(e) => eprintln!("tcptrace: could not remove stale namespace {name}: {e:#}"),
        }
    }
}

fn ip(args: &[&str]) -> Result<()> {
    let out = Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("cannot run `ip {}`", args.join(" ")))?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr).trim().to_string();
        let why = if err.is_empty() {
            out.status.to_string()
        } else {
            err
        };
        bail!("`ip {}` failed: {why}", args.join(" "));
    }
    Ok(())
}

fn which(prog: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .unwrap_or_else(|| {
            ["/usr/sbin", "/usr/bin", "/sbin", "/bin"]
                .iter()
                .map(PathBuf::from)
                .collect()
        })
        .into_iter()
        .map(|d| d.join(prog))
        .find(|p| {
            use std::os::unix::fs::PermissionsExt;
            p.metadata()
                .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
}

fn enter(ns: &File) -> std::io::Result<()> {
    // SAFETY: a valid namespace fd; CLONE_NEWNET changes this thread only.
    if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

fn open_ns(name: &str) -> Result<File> {
    let path = Path::new(NETNS_DIR).join(name);
    File::open(&path).with_context(|| format!("cannot open network namespace {}", path.display()))
}

/// The HTTP server: a thread inside the server namespace, one more thread
/// per connection. Stops (and joins) on drop.
pub struct Server {
    listener: Arc<TcpListener>,
    stopping: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Server {
    pub fn start(net: &Net) -> Result<Server> {
        let ns = open_ns(&net.server_ns)?;
        let stopping = Arc::new(AtomicBool::new(false));
        let (tx, rx) = mpsc::channel();
        let stop = stopping.clone();
        let thread = std::thread::Builder::new()
            .name("demo-httpd".into())
            .spawn(move || {
                let listener =
                    match enter(&ns).and_then(|()| TcpListener::bind((SERVER_ADDR, PORT))) {
                        Ok(l) => Arc::new(l),
                        Err(e) => {
                            let _ = tx.send(Err(e));
                            return;
                        }
                    };
                let _ = tx.send(Ok(listener.clone()));
                serve(&listener, &stop);
            })?;
        let listener = rx
            .recv()
            .map_err(|_| anyhow!("the HTTP server thread died"))?
            .with_context(|| {
                format!(
                    "cannot listen on {SERVER_ADDR}:{PORT} in namespace {}",
                    net.server_ns
                )
            })?;
        Ok(Server {
            listener,
            stopping,
            thread: Some(thread),
        })
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stopping.store(true, Ordering::SeqCst);
        // Wakes the blocked accept() (it fails with EINVAL).
        // SAFETY: the fd is the listener's, kept open by our Arc.
        unsafe { libc::shutdown(self.listener.as_raw_fd(), libc::SHUT_RDWR) };
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn serve(listener: &TcpListener, stopping: &AtomicBool) {
    let mut workers: Vec<JoinHandle<()>> = Vec::new();
    loop {
        match listener.accept() {
            Ok((s, _)) => {
                // Threads spawned here inherit this thread's namespace.
                let w = std::thread::Builder::new()
                    .name("demo-httpd".into())
                    .spawn(move || {
                        if let Err(e) = handle(s) {
                            log::debug!("demo HTTP server: {e}");
                        }
                    });
                workers.extend(w.ok());
                workers.retain(|w| !w.is_finished());
            }
            Err(_) if stopping.load(Ordering::SeqCst) => break,
            Err(e) => {
                log::warn!("demo HTTP server: accept: {e}");
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }
    for w in workers {
        let _ = w.join();
    }
}

/// One HTTP/1.1 exchange: read the request, answer with `Connection: close`,
/// then wait for the client to close first (as wget does in the seed
/// capture: its FIN, then ours riding on the ACK), and close.
fn handle(mut s: TcpStream) -> std::io::Result<()> {
    s.set_read_timeout(Some(DOWNLOAD_TIMEOUT))?;
    let mut req = Vec::new();
    let mut buf = [0u8; 2048];
    while !req.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = s.read(&mut buf)?;
        if n == 0 {
            return Ok(());
        }
        req.extend_from_slice(&buf[..n]);
        if req.len() > 16 << 10 {
            break;
        }
    }
    let line =
        String::from_utf8_lossy(req.split(|b| *b == b'\r').next().unwrap_or_default()).into_owned();
    let mut parts = line.split_whitespace();
    let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let path = target.split('?').next().unwrap_or("");
    let mut resp = Vec::with_capacity(FILE_SIZE + 256);
    if method == "GET" && path == FILE_PATH {
        write!(
            resp,
            "HTTP/1.1 200 OK\r\nServer: tcptrace-demo\r\nContent-Type: application/octet-stream\r\nContent-Length: {FILE_SIZE}\r\nConnection: close\r\n\r\n"
        )?;
        resp.extend((0..FILE_SIZE).map(|i| b"tcptrace demo\n"[i % 14]));
    } else {
        let body = format!("only GET {FILE_PATH} is served here\n");
        write!(
            resp,
            "HTTP/1.1 404 Not Found\r\nServer: tcptrace-demo\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )?;
    }
    s.write_all(&resp)?;
    while matches!(s.read(&mut buf), Ok(n) if n > 0) {}
    Ok(())
}

/// The HTTP client that downloads the file.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Client {
    Wget,
    Curl,
    /// A few lines of Rust in this binary.
    Builtin,
}

impl Client {
    /// wget (as in the seed capture), else curl, else the built-in one.
    pub fn pick() -> Client {
        // `--version` tells the real tools from busybox's cut-down applets
        // (minimal systems, our test VMs), which lack the options used here.
        let usable = |prog: &str| {
            which(prog).is_some()
                && Command::new(prog)
                    .arg("--version")
                    .stdout(std::process::Stdio::null())
                    .stderr(std::process::Stdio::null())
                    .status()
                    .is_ok_and(|s| s.success())
        };
        if usable("wget") {
            Client::Wget
        } else if usable("curl") {
            Client::Curl
        } else {
            Client::Builtin
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Client::Wget => "wget",
            Client::Curl => "curl",
            Client::Builtin => "built-in client",
        }
    }

    fn command(self, url: &str) -> Option<Command> {
        let mut c = match self {
            Client::Wget => {
                let mut c = Command::new("wget");
                c.args([
                    "--no-config",
                    "-q",
                    "-O",
                    "/dev/null",
                    "--no-proxy",
                    "--tries=1",
                ]);
                c.arg(format!("--timeout={}", DOWNLOAD_TIMEOUT.as_secs()))
                    .arg(url);
                c
            }
            Client::Curl => {
                let mut c = Command::new("curl");
                // -q first: no ~/.curlrc.
                c.args([
                    "-q",
                    "-sS",
                    "-o",
                    "/dev/null",
                    "--noproxy",
                    "*",
                    "--max-time",
                ]);
                c.arg(DOWNLOAD_TIMEOUT.as_secs().to_string()).arg(url);
                c
            }
            Client::Builtin => return None,
        };
        for v in [
            "http_proxy",
            "HTTP_PROXY",
            "https_proxy",
            "HTTPS_PROXY",
            "all_proxy",
            "ALL_PROXY",
        ] {
            c.env_remove(v);
        }
        c.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        Some(c)
    }
}

/// What the downloads did.
#[derive(Clone, Debug, Default)]
pub struct Downloads {
    pub ok: u32,
    pub errors: Vec<String>,
}

/// Starts `rounds` downloads, one after the other, from a thread inside the
/// client namespace (so the client it runs is in there too). `done` is
/// called when they are over; `stop` ends them early (a running client is
/// killed).
pub fn download(
    net: &Net,
    client: Client,
    rounds: u32,
    stop: Arc<AtomicBool>,
    done: impl FnOnce() + Send + 'static,
) -> Result<JoinHandle<Downloads>> {
    let ns = open_ns(&net.client_ns)?;
    let url = format!("http://{SERVER_ADDR}{FILE_PATH}");
    let t = std::thread::Builder::new()
        .name("demo-client".into())
        .spawn(move || {
            let mut d = Downloads::default();
            if let Err(e) = enter(&ns) {
                d.errors
                    .push(format!("cannot enter the client namespace: {e}"));
                done();
                return d;
            }
            for round in 1..=rounds {
                if stop.load(Ordering::SeqCst) {
                    break;
                }
                let r = match client.command(&url) {
                    Some(cmd) => run_client(cmd, client, &stop),
                    None => builtin_get(),
                };
                match r {
                    Ok(()) => d.ok += 1,
                    Err(e) => d.errors.push(format!("download {round}: {e:#}")),
                }
            }
            done();
            d
        })?;
    Ok(t)
}

fn run_client(mut cmd: Command, client: Client, stop: &AtomicBool) -> Result<()> {
    let mut child = cmd
        .spawn()
        .with_context(|| format!("cannot start {}", client.name()))?;
    let deadline = Instant::now() + DOWNLOAD_TIMEOUT + Duration::from_secs(1);
    loop {
        if let Some(st) = child.try_wait()? {
            if st.success() {
                return Ok(());
            }
            let mut err = String::new();
            if let Some(mut e) = child.stderr.take() {
                let _ = e.read_to_string(&mut err);
            }
            bail!(
                "{} exited with {st}{}",
                client.name(),
                if err.trim().is_empty() {
                    String::new()
                } else {
                    format!(": {}", err.trim())
                }
            );
        }
        if stop.load(Ordering::SeqCst) || Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!(
                "{} {}",
                client.name(),
                if stop.load(Ordering::SeqCst) {
                    "stopped"
                } else {
                    "timed out"
                }
            );
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// HTTP/1.1 GET with `Connection: close`; reads the headers and exactly
/// Content-Length bytes, then closes first (as wget and curl do).
fn builtin_get() -> Result<()> {
    let mut s =
        TcpStream::connect_timeout(&SocketAddr::from((SERVER_ADDR, PORT)), DOWNLOAD_TIMEOUT)?;
    s.set_read_timeout(Some(DOWNLOAD_TIMEOUT))?;
    write!(
        s,
        "GET {FILE_PATH} HTTP/1.1\r\nHost: {SERVER_ADDR}\r\nUser-Agent: tcptrace-demo\r\nAccept: */*\r\nConnection: close\r\n\r\n"
    )?;
    let mut data = Vec::new();
    let mut buf = [0u8; 16 << 10];
    let head_end = loop {
        if let Some(p) = data.windows(4).position(|w| w == b"\r\n\r\n") {
            break p + 4;
        }
        let n = s.read(&mut buf)?;
        if n == 0 {
            bail!("the server closed before the end of the headers");
        }
        data.extend_from_slice(&buf[..n]);
    };
    let head = String::from_utf8_lossy(&data[..head_end]).into_owned();
    if !head.starts_with("HTTP/1.1 200") {
        bail!(
            "unexpected answer: {}",
            head.lines().next().unwrap_or_default()
        );
    }
    let len: usize = head
        .lines()
        .find_map(|l| {
            l.split_once(':')
                .filter(|(k, _)| k.eq_ignore_ascii_case("content-length"))
        })
        .and_then(|(_, v)| v.trim().parse().ok())
        .context("no Content-Length in the answer")?;
    let mut got = data.len() - head_end;
    while got < len {
        let n = s.read(&mut buf)?;
        if n == 0 {
            bail!("the server closed after {got} of {len} bytes");
        }
        got += n;
    }
    Ok(())
}

/// The closing summary over the connections the matcher emitted.
#[derive(Clone, Debug, Default)]
pub struct Summary {
    pub tally: Tally,
    /// Connections with a complete handshake, a named close and the whole file.
    pub complete: u64,
}

impl Summary {
    pub fn add(&mut self, c: &Connection) {
        self.tally.add(c);
        let handshake =
            c.isn_client.is_some() && c.isn_server.is_some() && c.handshake_rtt_ns.is_some();
        if handshake
            && c.close != Close::Unfinished
            && c.bytes_server.unwrap_or(0) >= FILE_SIZE as u64
        {
            self.complete += 1;
        }
    }

    pub fn text(&self, rounds: u32, client: Client, d: &Downloads, elapsed: Duration) -> String {
        let n = self.tally.connections;
        let mut s = format!(
            "demo: {}/{rounds} downloads of {FILE_PATH} ({FILE_SIZE} B) with {} OK; {n} connection{} traced in {:.1} s\n",
            d.ok,
            client.name(),
            if n == 1 { "" } else { "s" },
            elapsed.as_secs_f64()
        );
        s.push_str(&self.tally.lines());
        for e in &d.errors {
            s.push_str(&format!("  error: {e}\n"));
        }
        s
    }

    pub fn json(
        &self,
        rounds: u32,
        client: Client,
        d: &Downloads,
        net: &Net,
        elapsed: Duration,
    ) -> serde_json::Value {
        let mut o = serde_json::Map::new();
        o.insert("type".into(), json!("demo_summary"));
        o.insert("rounds".into(), json!(rounds));
        o.insert("client".into(), json!(client.name()));
        o.insert("downloads_ok".into(), json!(d.ok));
        o.insert("download_errors".into(), json!(d.errors));
        self.tally.json_fields(&mut o);
        o.insert("complete".into(), json!(self.complete));
        o.insert("client_addr".into(), json!(IpAddr::V4(CLIENT_ADDR)));
        o.insert("server_addr".into(), json!(IpAddr::V4(SERVER_ADDR)));
        o.insert("client_netns".into(), json!(net.client_ns));
        o.insert("server_netns".into(), json!(net.server_ns));
        o.insert("elapsed_ms".into(), json!(elapsed.as_millis() as u64));
        serde_json::Value::Object(o)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stale_names_parse() {
        let name = format!("{NS_PREFIX}1234-client");
        let pid = name
            .strip_prefix(NS_PREFIX)
            .and_then(|r| r.split('-').next())
            .and_then(|p| p.parse::<u32>().ok());
        assert_eq!(pid, Some(1234));
    }
}
