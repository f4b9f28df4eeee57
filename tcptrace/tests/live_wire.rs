//! Real kernel, real packets: every SYN/FIN/RST that tcpdump sees on an
//! interface reaches tcptrace exactly once, with the same numbers and
//! options; the ACKs that complete a handshake and acknowledge a FIN come
//! along; nothing stays attached after exit, not even after `kill -9`.
mod common;

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::*;
use serde_json::{json, Value};
use tcptrace::event::{Event, Segment};

struct Tcpdump {
    child: Child,
    file: String,
}

impl Tcpdump {
    fn start(netns: Option<&str>, iface: &str, port: u16, tag: &str) -> Tcpdump {
        let file = format!("/tmp/tcptrace-test-{}-{tag}.pcap", std::process::id());
        let mut cmd = match netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns, "tcpdump"]);
                c
            }
            None => Command::new("tcpdump"),
        };
        let mut child = cmd
            .args([
                "-i",
                iface,
                "-U",
                "-n",
                "-w",
                &file,
                &format!("tcp port {port}"),
            ])
            .stderr(Stdio::piped())
            .spawn()
            .expect("tcpdump (Debian package tcpdump; `cargo xtask test` installs it)");
        // tcpdump says "listening on …" once its socket is open.
        use std::io::BufRead;
        let err = child.stderr.take().unwrap();
        let mut lines = std::io::BufReader::new(err).lines();
        for line in lines.by_ref() {
            if line.unwrap().contains("listening on") {
                break;
            }
        }
        std::thread::spawn(move || for _ in lines {});
        Tcpdump { child, file }
    }

    fn stop(mut self) -> Vec<Segment> {
        // Give tcpdump time to write the last packets under load.
        std::thread::sleep(Duration::from_millis(500));
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGINT) };
        self.child.wait().unwrap();
        let cap = tcptrace::pcap::read_file(std::path::Path::new(&self.file)).unwrap();
        let _ = std::fs::remove_file(&self.file);
        cap.events
            .into_iter()
            .filter_map(|e| match e {
                Event::Segment(s) => Some(s),
                Event::State(_) => None,
            })
            .collect()
    }
}

fn same(t: &Value, d: &Segment) -> bool {
    t["saddr"] == d.saddr.to_string()
        && t["sport"] == d.sport
        && t["daddr"] == d.daddr.to_string()
        && t["dport"] == d.dport
        && t["seq"] == d.seq
        && t["ack"] == d.ack
        && t["flags"] == d.flags.to_string()
}

/// One active-close exchange and one refused connection, seen by tcpdump
/// and tcptrace on the same interface.
fn compare(netns: Option<&str>, iface: &str, server: SocketAddr, client_ns: Option<&str>) {
    let port = server.port();
    let tag = format!("{iface}-{}", if server.is_ipv4() { 4 } else { 6 });
    let dump = Tcpdump::start(netns, iface, port, &tag);
    let mut args = vec!["--json", "--iface", iface];
    if let Some(ns) = netns {
        args.extend(["--netns", ns]);
    }
    let port_s = port.to_string();
    args.extend(["--port", &port_s]);
    let trace = Trace::start(&args);
    active_close_exchange(netns, client_ns, server);
    // Nobody listens any more: SYN answered by RST.
    let refused = in_netns(client_ns.map(str::to_string).as_deref(), move || {
        std::net::TcpStream::connect(server).is_err()
    });
    assert!(refused, "connection to a closed port succeeded");
    let events = trace.stop();
    let wire = dump.stop();
    let segs = of_type(&events, "segment");

    for (_, t) in control_once(&wire, &segs, 6) {
        assert_eq!(t["iface"], iface);
    }
    assert!(
        segs.iter().any(|t| t["flags"] == "S") && segs.iter().any(|t| t["flags"] == "R."),
        "{segs:#?}"
    );
    // The pure ACKs tcpdump saw right after a SYN-ACK or a FIN, with the
    // acknowledging number, must be there too.
    for (i, d) in wire.iter().enumerate() {
        if !(d.flags.syn() && d.flags.ack() || d.flags.fin()) {
            continue;
        }
        let want = d.seq.wrapping_add(d.len).wrapping_add(1);
        if let Some(a) = wire[i + 1..]
            .iter()
            .find(|a| a.saddr == d.daddr && a.sport == d.dport && a.ack == want)
        {
            assert!(
                segs.iter().any(|t| same(t, a)),
                "the ACK {a:?} of {d:?} is missing"
            );
        }
    }
    // Nothing else: bulk data never reaches userspace.
    assert!(
        segs.iter()
            .all(|t| t["len"] == 0 || t["flags"].as_str().unwrap().contains('F')),
        "{segs:#?}"
    );
}

#[test]
fn loopback_ipv4_matches_tcpdump() {
    if need_root("loopback_ipv4_matches_tcpdump") {
        compare(
            None,
            "lo",
            format!("127.0.0.1:{}", free_port()).parse().unwrap(),
            None,
        );
    }
}

#[test]
fn loopback_ipv6_matches_tcpdump() {
    if need_root("loopback_ipv6_matches_tcpdump") {
        compare(
            None,
            "lo",
            format!("[::1]:{}", free_port()).parse().unwrap(),
            None,
        );
    }
}

#[test]
fn veth_ipv4_matches_tcpdump() {
    if need_root("veth_ipv4_matches_tcpdump") {
        let net = NetPair::new();
        let server: SocketAddr = format!("{}:8080", net.b_v4).parse().unwrap();
        // Watch the client's side of the veth: both directions pass there once.
        compare_veth(&net, server);
    }
}

#[test]
fn veth_ipv6_matches_tcpdump() {
    if need_root("veth_ipv6_matches_tcpdump") {
        let net = NetPair::new();
        let server: SocketAddr = format!("[{}]:8080", net.b_v6).parse().unwrap();
        compare_veth(&net, server);
    }
}

/// The server lives in namespace b, the client in a; tcptrace and tcpdump
/// both watch the client's veth end inside namespace a.
fn compare_veth(net: &NetPair, server: SocketAddr) {
    let port = server.port();
    let tag = format!("veth-{}", if server.is_ipv4() { 4 } else { 6 });
    let dump = Tcpdump::start(Some(&net.a), &net.a_if, port, &tag);
    let trace = Trace::start(&[
        "--json", "--netns", &net.a, "--iface", &net.a_if, "--port", "8080",
    ]);
    active_close_exchange(Some(&net.b), Some(&net.a), server);
    let events = trace.stop();
    let wire = dump.stop();
    let segs = of_type(&events, "segment");
    let ns = NetPair::netns_inode(&net.a);
    for (d, t) in control_once(&wire, &segs, 4) {
        assert_eq!(t["netns"].as_u64(), Some(ns));
        let dir = if d.saddr == server.ip() {
            "ingress"
        } else {
            "egress"
        };
        assert_eq!(t["dir"], dir);
    }
}

/// Every SYN/FIN/RST tcpdump saw (at least `min`) appears exactly once in
/// tcptrace's segments with the same window, length and options; returns the
/// pairs for the caller's vantage-specific checks.
fn control_once<'a, 'b>(
    wire: &'a [Segment],
    segs: &[&'b Value],
    min: usize,
) -> Vec<(&'a Segment, &'b Value)> {
    let control: Vec<&Segment> = wire
        .iter()
        .filter(|s| s.flags.syn() || s.flags.fin() || s.flags.rst())
        .collect();
    assert!(control.len() >= min, "tcpdump saw too little: {control:#?}");
    control
        .into_iter()
        .map(|d| {
            let hits: Vec<&&Value> = segs.iter().filter(|t| same(t, d)).collect();
            assert_eq!(
                hits.len(),
                1,
                "segment {d:?} seen {} times by tcptrace: {segs:#?}",
                hits.len()
            );
            let t: &'b Value = hits[0];
            assert_eq!(t["win"], d.win, "window of {d:?}");
            assert_eq!(t["len"], d.len, "length of {d:?}");
            assert_eq!(
                t["options"],
                serde_json::to_value(d.options).unwrap(),
                "options of {d:?}"
            );
            (d, t)
        })
        .collect()
}

fn our_programs() -> Vec<String> {
    let out = Command::new("bpftool")
        .args(["-j", "prog", "show"])
        .output()
        .expect("bpftool");
    let progs: Value = serde_json::from_slice(&out.stdout).unwrap_or(json!([]));
    progs
        .as_array()
        .map(|a| {
            a.iter()
                .filter(|p| {
                    p["name"]
                        .as_str()
                        .is_some_and(|n| n.starts_with("tcptrace_"))
                })
                .map(|p| format!("{} {}", p["id"], p["name"]))
                .collect()
        })
        .unwrap_or_default()
}

fn our_tc_filters() -> String {
    let mut all = String::new();
    for dir in ["ingress", "egress"] {
        let out = Command::new("tc")
            .args(["filter", "show", "dev", "lo", dir])
            .output()
            .expect("tc");
        all.push_str(&String::from_utf8_lossy(&out.stdout));
    }
    all.lines()
        .filter(|l| l.contains("tcptrace_"))
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn nothing_left_after_exit_or_kill() {
    if !need_root("nothing_left_after_exit_or_kill") {
        return;
    }
    let before = our_programs();
    let t = Trace::start(&["--json", "--iface", "lo", "--port", "9"]);
    assert!(
        our_programs().len() > before.len(),
        "programs not visible while running"
    );
    t.stop();
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(our_programs(), before, "left after a normal exit");
    assert_eq!(our_tc_filters(), "", "TC filters left after a normal exit");

    let t = Trace::start(&["--json", "--iface", "lo", "--port", "9"]);
    // SAFETY: killing our own child.
    unsafe { libc::kill(t.pid(), libc::SIGKILL) };
    drop(t);
    std::thread::sleep(Duration::from_millis(500));
    if !our_tc_filters().is_empty() {
        // Netlink mode (kernels before 6.6): what `tcptrace cleanup` is for.
        let st = Command::new(tcptrace_bin())
            .arg("cleanup")
            .status()
            .unwrap();
        assert!(st.success());
        std::thread::sleep(Duration::from_millis(300));
    }
    assert_eq!(
        our_tc_filters(),
        "",
        "TC filters left after kill -9 and cleanup"
    );
    assert_eq!(our_programs(), before, "programs left after kill -9");
}

/// A tun device in namespace `ns`, its end of the wire held here: what is
/// written goes in as received, what the kernel sends comes out.
struct Tun {
    file: std::fs::File,
}

impl Tun {
    fn open(ns: &str, name: &str) -> Tun {
        let name = name.to_string();
        let file = in_netns(Some(ns), move || {
            if !std::path::Path::new("/dev/net/tun").exists() {
                // A bare initramfs has no udev to make the node.
                let _ = std::fs::create_dir_all("/dev/net");
                let dev = libc::makedev(10, 200);
                // SAFETY: a NUL-terminated path.
                unsafe { libc::mknod(c"/dev/net/tun".as_ptr(), libc::S_IFCHR | 0o600, dev) };
            }
            let file = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open("/dev/net/tun")
                .expect("/dev/net/tun (module tun)");
            // struct ifreq: the name, then the flags.
            let mut ifr = [0u8; 40];
            ifr[..name.len()].copy_from_slice(name.as_bytes());
            let flags = (libc::IFF_TUN | libc::IFF_NO_PI) as u16;
            ifr[16..18].copy_from_slice(&flags.to_ne_bytes());
            const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
            // SAFETY: the fd is open, ifr is a struct ifreq.
            let r = unsafe {
                libc::ioctl(
                    std::os::fd::AsRawFd::as_raw_fd(&file),
                    TUNSETIFF,
                    ifr.as_mut_ptr(),
                )
            };
            assert_eq!(r, 0, "TUNSETIFF: {}", std::io::Error::last_os_error());
            file
        });
        Tun { file }
    }

    fn send(&mut self, packet: &[u8]) {
        use std::io::Write;
        self.file.write_all(packet).expect("write to tun");
    }

    /// The next IPv4 TCP packet the kernel sends, within two seconds.
    fn recv_tcp(&mut self) -> Vec<u8> {
        use std::io::Read;
        let deadline = std::time::Instant::now() + Duration::from_secs(2);
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            assert!(!left.is_zero(), "no TCP packet came out of the tun device");
            let mut pfd = libc::pollfd {
                fd: std::os::fd::AsRawFd::as_raw_fd(&self.file),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd.
            if unsafe { libc::poll(&mut pfd, 1, left.as_millis() as i32) } <= 0 {
                continue;
            }
            let mut buf = vec![0u8; 2048];
            let n = self.file.read(&mut buf).expect("read from tun");
            buf.truncate(n);
            if n >= 40 && buf[0] >> 4 == 4 && buf[9] == 6 {
                return buf;
            }
        }
    }
}

/// Interfaces without an Ethernet header (tun, WireGuard) get the `_l3`
/// classifiers. A handshake written by hand into a tun device — SYN in, the
/// kernel's SYN-ACK out, the ACK that completes it in, then a RST — is seen
/// on both hooks with the numbers that were on the wire.
#[test]
fn tun_handshake_seen_without_ethernet_header() {
    if !need_root("tun_handshake_seen_without_ethernet_header") {
        return;
    }
    use tcptrace::event::TcpFlags;
    use tcptrace::pcap::build::{ip_packet, syn_options, SegmentSpec};
    let net = NetPair::new();
    let mut tun = Tun::open(&net.a, "tttun0");
    ip(&["-n", &net.a, "addr", "add", "10.78.0.1/24", "dev", "tttun0"]);
    ip(&["-n", &net.a, "link", "set", "tttun0", "up"]);
    let server: SocketAddr = "10.78.0.1:8080".parse().unwrap();
    let client: SocketAddr = "10.78.0.2:40000".parse().unwrap();
    let listener = in_netns(Some(&net.a), move || {
        std::net::TcpListener::bind(server).expect("listen in the namespace")
    });
    let trace = Trace::start(&[
        "--json", "--netns", &net.a, "--iface", "tttun0", "--port", "8080",
    ]);

    let syn = SegmentSpec {
        seq: 1000,
        options: syn_options(1400, Some(7), true, None),
        ..SegmentSpec::new(client, server, TcpFlags::SYN)
    };
    tun.send(&ip_packet(&syn));
    let synack = tun.recv_tcp();
    let l4 = (synack[0] & 0x0f) as usize * 4;
    assert_eq!(
        synack[l4 + 13] & (TcpFlags::SYN | TcpFlags::ACK),
        TcpFlags::SYN | TcpFlags::ACK,
        "the kernel answered {synack:?}"
    );
    let isn = u32::from_be_bytes(synack[l4 + 4..l4 + 8].try_into().unwrap());
    let ack = SegmentSpec {
        seq: 1001,
        ack: isn.wrapping_add(1),
        ..SegmentSpec::new(client, server, TcpFlags::ACK)
    };
    tun.send(&ip_packet(&ack));
    let rst = SegmentSpec {
        seq: 1001,
        ..SegmentSpec::new(client, server, TcpFlags::RST)
    };
    tun.send(&ip_packet(&rst));
    let events = trace.stop();
    drop(listener);

    let segs = of_type(&events, "segment");
    let seen: Vec<(String, String, u64, u64)> = segs
        .iter()
        .map(|s| {
            assert_eq!(s["iface"], "tttun0", "{s}");
            (
                s["dir"].as_str().unwrap().to_string(),
                s["flags"].as_str().unwrap().to_string(),
                s["seq"].as_u64().unwrap(),
                s["ack"].as_u64().unwrap(),
            )
        })
        .collect();
    let isn = isn as u64;
    assert_eq!(
        seen,
        [
            ("ingress".into(), "S".into(), 1000, 0),
            ("egress".into(), "S.".into(), isn, 1001),
            ("ingress".into(), ".".into(), 1001, isn + 1),
            ("ingress".into(), "R".into(), 1001, 0),
        ],
        "segments: {segs:#?}"
    );
    let syn_seen = &segs[0];
    assert_eq!(syn_seen["options"]["mss"], 1400, "{syn_seen}");
    assert_eq!(syn_seen["options"]["wscale"], 7, "{syn_seen}");
}
