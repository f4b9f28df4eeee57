//! Shared by the real-kernel tests: run tcptrace, make namespaces and
//! connections. These tests need root; without it they say so and pass
//! nothing (CI and `cargo xtask test` run as root).
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use serde_json::Value;

pub fn tcptrace_bin() -> String {
    std::env::var("TCPTRACE_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_tcptrace").to_string())
}

pub fn is_root() -> bool {
    // SAFETY: no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// Returns false (and says why) when this test cannot run here.
pub fn need_root(test: &str) -> bool {
    if !is_root() {
        eprintln!("{test}: skipped, needs root (run `cargo xtask test` as root)");
        return false;
    }
    true
}

/// A free TCP port on loopback (the kernel's pick), for a port filter.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub struct Trace {
    child: Child,
    stderr_lines: std::sync::mpsc::Receiver<String>,
    stdout: Option<std::thread::JoinHandle<String>>,
    pub stderr: Vec<String>,
}

impl Trace {
    /// Starts `tcptrace ARGS` and waits until it is attached.
    pub fn start(args: &[&str]) -> Trace {
        let mut child = Command::new(tcptrace_bin())
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start tcptrace");
        let mut out = child.stdout.take().unwrap();
        let stdout = std::thread::spawn(move || {
            let mut s = String::new();
            let _ = out.read_to_string(&mut s);
            s
        });
        let err = child.stderr.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(err).lines().map_while(Result::ok) {
                eprintln!("[tcptrace] {line}");
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut t = Trace {
            child,
            stderr_lines: rx,
            stdout: Some(stdout),
            stderr: Vec::new(),
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            match t
                .stderr_lines
                .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            {
                Ok(line) => {
                    let ready = line.contains("tracing");
                    t.stderr.push(line);
                    if ready {
                        break;
                    }
                }
                Err(_) => {
                    let _ = t.child.kill();
                    panic!("tcptrace did not start: {:?}", t.stderr);
                }
            }
        }
        t
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// SIGINT, then everything it printed as JSON values.
    pub fn stop(mut self) -> Vec<Value> {
        // Let the last events reach the ring and the reader.
        std::thread::sleep(Duration::from_millis(300));
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGINT) };
        let status = self.child.wait().unwrap();
        self.output(status)
    }

    /// Waits (up to `limit`) for tcptrace to stop by itself (`--count`,
    /// `--duration`), then everything it printed as JSON values.
    pub fn wait_exit(mut self, limit: Duration) -> Vec<Value> {
        let deadline = Instant::now() + limit;
        let status = loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                break st;
            }
            assert!(
                Instant::now() < deadline,
                "tcptrace did not stop by itself within {limit:?}; stderr: {:?}",
                self.stderr
            );
            std::thread::sleep(Duration::from_millis(20));
        };
        self.output(status)
    }

    fn output(&mut self, status: std::process::ExitStatus) -> Vec<Value> {
        while let Ok(l) = self.stderr_lines.recv_timeout(Duration::from_millis(200)) {
            self.stderr.push(l);
        }
        let out = self.stdout.take().unwrap().join().unwrap();
        assert!(
            status.success(),
            "tcptrace exited with {status}; stderr: {:?}",
            self.stderr
        );
        out.lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
            .collect()
    }
}

impl Drop for Trace {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

static NS_SEQ: AtomicU32 = AtomicU32::new(0);

pub fn ip(args: &[&str]) {
    let st = Command::new("ip")
        .args(args)
        .status()
        .expect("run ip (iproute2)");
    assert!(st.success(), "ip {args:?} failed");
}

/// Two namespaces joined by a veth pair: `a` (.1) and `b` (.2), IPv4
/// 10.77.N.0/24 and IPv6 fd77::N:0/112. Removed on drop.
pub struct NetPair {
    pub a: String,
    pub b: String,
    pub a_if: String,
    pub b_if: String,
    pub a_v4: String,
    pub b_v4: String,
    pub a_v6: String,
    pub b_v6: String,
}

impl NetPair {
    pub fn new() -> NetPair {
        let n = NS_SEQ.fetch_add(1, Ordering::SeqCst);
        let tag = format!("{}{}", std::process::id() % 10000, n);
        let p = NetPair {
            a: format!("tta{tag}"),
            b: format!("ttb{tag}"),
            a_if: format!("va{tag}"),
            b_if: format!("vb{tag}"),
            a_v4: format!("10.77.{}.1", n % 250),
            b_v4: format!("10.77.{}.2", n % 250),
            a_v6: format!("fd77::{}:1", n % 250),
            b_v6: format!("fd77::{}:2", n % 250),
        };
        ip(&["netns", "add", &p.a]);
        ip(&["netns", "add", &p.b]);
        ip(&[
            "link", "add", &p.a_if, "netns", &p.a, "type", "veth", "peer", "name", &p.b_if,
            "netns", &p.b,
        ]);
        for (ns, ifname, v4, v6) in [
            (&p.a, &p.a_if, &p.a_v4, &p.a_v6),
            (&p.b, &p.b_if, &p.b_v4, &p.b_v6),
        ] {
            ip(&["-n", ns, "addr", "add", &format!("{v4}/24"), "dev", ifname]);
            ip(&[
                "-n",
                ns,
                "addr",
                "add",
                &format!("{v6}/112"),
                "dev",
                ifname,
                "nodad",
            ]);
            ip(&["-n", ns, "link", "set", ifname, "up"]);
            ip(&["-n", ns, "link", "set", "lo", "up"]);
        }
        // Fresh namespaces answer the first neighbour solicitation late (the
        // peer has not joined its solicited-node group yet): the first SYN
        // would wait a second for address resolution. Tests want the
        // handshake on time, so the neighbours are written in.
        let mac = |n: u32, side: u8| {
            format!(
                "02:77:{:02x}:{:02x}:{:02x}:{side:02x}",
                n >> 16 & 0xff,
                n >> 8 & 0xff,
                n & 0xff
            )
        };
        let (a_mac, b_mac) = (mac(n, 1), mac(n, 2));
        ip(&["-n", &p.a, "link", "set", &p.a_if, "address", &a_mac]);
        ip(&["-n", &p.b, "link", "set", &p.b_if, "address", &b_mac]);
        for (ns, ifname, peer_v4, peer_v6, peer_mac) in [
            (&p.a, &p.a_if, &p.b_v4, &p.b_v6, &b_mac),
            (&p.b, &p.b_if, &p.a_v4, &p.a_v6, &a_mac),
        ] {
            for addr in [peer_v4, peer_v6] {
                ip(&[
                    "-n",
                    ns,
                    "neigh",
                    "replace",
                    addr,
                    "lladdr",
                    peer_mac,
                    "dev",
                    ifname,
                    "nud",
                    "permanent",
                ]);
            }
        }
        p
    }

    pub fn netns_inode(name: &str) -> u64 {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(format!("/var/run/netns/{name}"))
            .unwrap()
            .ino()
    }
}

impl Drop for NetPair {
    fn drop(&mut self) {
        for ns in [&self.a, &self.b] {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

/// Runs `f` on a thread inside network namespace `ns` (or here for None).
pub fn in_netns<T: Send + 'static>(ns: Option<&str>, f: impl FnOnce() -> T + Send + 'static) -> T {
    let path = ns.map(|n| format!("/var/run/netns/{n}"));
    std::thread::spawn(move || {
        if let Some(p) = path {
            let file = std::fs::File::open(&p).unwrap();
            // SAFETY: valid fd; affects this thread only.
            let r =
                unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&file), libc::CLONE_NEWNET) };
            assert_eq!(r, 0, "setns {p}");
        }
        f()
    })
    .join()
    .unwrap()
}

pub fn thread_comm() -> String {
    std::fs::read_to_string("/proc/thread-self/comm")
        .unwrap()
        .trim()
        .to_string()
}

/// What one client/server exchange looked like from the test's side.
pub struct Exchange {
    pub client_port: u16,
    pub client_comm: String,
}

/// Listener on `server`, a client that connects from `client_ns`, writes,
/// closes first (active close); the server reads to EOF and closes
/// (passive close). Returns once both sides are closed.
pub fn active_close_exchange(
    server_ns: Option<&str>,
    client_ns: Option<&str>,
    server: SocketAddr,
) -> Exchange {
    let listener = in_netns(server_ns, move || TcpListener::bind(server).expect("bind"));
    let srv = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).unwrap();
        std::thread::sleep(Duration::from_millis(50));
        drop(s); // CLOSE_WAIT → LAST_ACK
        drop(listener);
        buf.len()
    });
    let (client_port, client_comm) = in_netns(client_ns, move || {
        use std::io::Write;
        let comm = thread_comm();
        let mut c = TcpStream::connect(server).expect("connect");
        let port = c.local_addr().unwrap().port();
        c.write_all(b"hello").unwrap();
        c.shutdown(std::net::Shutdown::Write).unwrap(); // ESTABLISHED → FIN_WAIT1
        let mut rest = Vec::new();
        let _ = c.read_to_end(&mut rest); // until the server's FIN
        drop(c);
        (port, comm)
    });
    assert_eq!(srv.join().unwrap(), 5);
    std::thread::sleep(Duration::from_millis(100));
    Exchange {
        client_port,
        client_comm,
    }
}

/// The JSON objects of one type.
pub fn of_type<'a>(v: &'a [Value], t: &str) -> Vec<&'a Value> {
    v.iter().filter(|e| e["type"] == t).collect()
}

/// The state transitions of one socket, in order, as "OLD→NEW".
pub fn transitions(states: &[&Value], skaddr: &str) -> Vec<String> {
    let mut v: Vec<&&Value> = states.iter().filter(|e| e["skaddr"] == skaddr).collect();
    v.sort_by_key(|e| e["ts_ns"].as_u64());
    v.iter()
        .map(|e| {
            format!(
                "{}→{}",
                e["oldstate"].as_str().unwrap(),
                e["newstate"].as_str().unwrap()
            )
        })
        .collect()
}

/// `n` connections to a listener on 127.0.0.1:`port`, each accepted and
/// closed at once (client first), `pause` between two.
pub fn open_and_close(port: u16, n: u64, pause: Duration) {
    let server: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let listener = TcpListener::bind(server).unwrap();
    for _ in 0..n {
        let c = TcpStream::connect(server).unwrap();
        let (s, _) = listener.accept().unwrap();
        drop(c);
        drop(s);
        std::thread::sleep(pause);
    }
}
