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
