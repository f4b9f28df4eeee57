//! `tcptrace demo` end to end on this kernel: namespaces, server, downloads,
//! tracing, summary, cleanup. Needs root.
mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::Value;

const ROUNDS: usize = 5;

/// Runs `tcptrace demo --json ARGS`; returns its JSON lines, stderr and how long it took.
fn run_demo(args: &[&str]) -> (Vec<Value>, String, Duration) {
    let t0 = Instant::now();
    let out = Command::new(common::tcptrace_bin())
        .args(["demo", "--json"])
        .args(args)
        .output()
        .expect("run tcptrace demo");
    let took = t0.elapsed();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    eprintln!("{stderr}");
    assert!(
        out.status.success(),
        "tcptrace demo exited with {}; stderr:\n{stderr}",
        out.status
    );
    let lines = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    (lines, stderr, took)
}

fn demo_namespaces() -> Vec<String> {
    let out = Command::new("ip")
        .args(["netns", "list"])
        .output()
        .expect("ip netns list");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|n| n.starts_with(tcptrace::demo::NS_PREFIX))
        .map(str::to_string)
        .collect()
}

fn check_connection(c: &Value) {
    let ctx = || serde_json::to_string_pretty(c).unwrap();
    assert_eq!(
        c["client"].as_str().unwrap().split(':').next(),
        Some("192.168.131.132"),
        "{}",
        ctx()
    );
    assert_eq!(c["server"], "192.168.131.138:80", "{}", ctx());
    // A complete three-way handshake, on the wire and in the client's kernel
    // (the server socket's steps: see demo_connections_own_their_sockets).
    assert_eq!(c["open"], "active", "{}", ctx());
    assert!(
        c["isn_client"].is_u64() && c["isn_server"].is_u64(),
        "{}",
        ctx()
    );
    assert!(
        c["handshake_rtt_ns"].is_u64() && c["handshake_rtt_server_ns"].is_u64(),
        "{}",
        ctx()
    );
    let names: Vec<&str> = c["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap())
        .collect();
    for step in [
        "SYN",
        "SYN-ACK",
        "ACK (handshake)",
        "SYN_SENT → ESTABLISHED",
    ] {
        assert!(
            names.contains(&step),
            "no {step:?} step in {names:?}\n{}",
            ctx()
        );
    }
    assert_eq!(c["views"]["wire"], true, "{}", ctx());
    assert_eq!(c["views"]["kernel"], true, "{}", ctx());
    // A named close, ended by the client (it closes after the body, as wget does).
    let close = c["close"].as_str().unwrap();
    assert!(
        ["three-segment", "four-segment", "simultaneous"].contains(&close),
        "close {close}\n{}",
        ctx()
    );
    assert_eq!(c["end_reason"], "closed", "{}", ctx());
    assert!(c["bytes_server"].as_u64().unwrap() >= 65536, "{}", ctx());
    assert!(c["bytes_client"].as_u64().unwrap() > 0, "{}", ctx());
    for a in c["anomalies"].as_array().unwrap() {
        assert!(
            !a["kind"].as_str().unwrap().ends_with("_unfinished"),
            "{}",
            ctx()
        );
    }
}

#[test]
fn demo_json_five_rounds() {
    if !common::need_root("demo_json_five_rounds") {
        return;
    }
    let (lines, stderr, took) = run_demo(&["--rounds", &ROUNDS.to_string()]);
    eprintln!("tcptrace demo --json --rounds {ROUNDS} took {took:?}");
    // The demo's promise (#6) is under 10 s on a real machine. Inside the
    // test VMs every instruction is emulated (TCG) and the verifier alone
    // takes seconds, so there the time says nothing about tcptrace.
    if std::env::var_os("TCPTRACE_IN_VM").is_none() {
        assert!(took < Duration::from_secs(10), "the demo took {took:?}");
    }
    let conns = common::of_type(&lines, "connection");
    assert_eq!(
        conns.len(),
        ROUNDS,
        "connections: {conns:#?}\nstderr:\n{stderr}"
    );
    for c in &conns {
        check_connection(c);
    }
    let mut ports: Vec<&str> = conns
        .iter()
        .map(|c| c["client"].as_str().unwrap())
        .collect();
    ports.sort_unstable();
    ports.dedup();
    assert_eq!(
        ports.len(),
        ROUNDS,
        "one connection per download: {ports:?}"
    );
    // Every event comes from the demo's own addresses.
    for e in common::of_type(&lines, "segment") {
        for k in ["saddr", "daddr"] {
            assert!(
                e[k] == "192.168.131.132" || e[k] == "192.168.131.138",
                "foreign segment {e}"
            );
        }
    }
    let s = common::of_type(&lines, "demo_summary");
    assert_eq!(s.len(), 1, "one demo_summary");
    let s = s[0];
    assert_eq!(
        lines.last().unwrap()["type"],
        "demo_summary",
        "the summary comes last"
    );
    assert_eq!(s["rounds"], ROUNDS);
    assert_eq!(s["downloads_ok"], ROUNDS, "{s}");
    assert_eq!(s["connections"], ROUNDS, "{s}");
    assert_eq!(s["complete"], ROUNDS, "{s}");
    let rtt = &s["handshake_rtt_ns"];
    let (min, med, max) = (
        rtt["min"].as_u64().unwrap(),
        rtt["median"].as_u64().unwrap(),
        rtt["max"].as_u64().unwrap(),
    );
    assert!(0 < min && min <= med && med <= max, "{s}");
    assert_eq!(
        s["close"]
            .as_object()
            .unwrap()
            .values()
            .filter_map(Value::as_u64)
            .sum::<u64>(),
        ROUNDS as u64,
        "{s}"
    );
    // Nothing left behind.
    let left = demo_namespaces();
    assert!(
        left.iter().all(|n| n != s["client_netns"].as_str().unwrap()
            && n != s["server_netns"].as_str().unwrap()),
        "left: {left:?}"
    );
}

#[test]
fn demo_builtin_client_text() {
    if !common::need_root("demo_builtin_client_text") {
        return;
    }
    let child = Command::new(common::tcptrace_bin())
        .args(["demo", "--rounds", "2", "--client", "builtin"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run tcptrace demo");
    let tag = format!("-{}-", child.id());
    let out = child.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}\n{text}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("192.168.131.138:80  active open"), "{text}");
    assert!(
        text.contains(
            "demo: 2/2 downloads of /file_64KB (65536 B) with built-in client OK; 2 connections"
        ),
        "{text}"
    );
    assert!(
        text.contains("three-segment close") || text.contains("four-segment close"),
        "{text}"
    );
    let left: Vec<String> = demo_namespaces()
        .into_iter()
        .filter(|n| n.contains(&tag))
        .collect();
    assert!(left.is_empty(), "left: {left:?}");
}

/// Ctrl-C while it runs: it stops, and removes its namespaces.
#[test]
fn demo_interrupted_cleans_up() {
    if !common::need_root("demo_interrupted_cleans_up") {
        return;
    }
    let mut child = Command::new(common::tcptrace_bin())
        .args(["demo", "--json", "--rounds", "100"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("start tcptrace demo");
    let deadline = Instant::now() + Duration::from_secs(10);
    let tag = format!("-{}-", child.id());
    let mine = |n: &String| n.contains(&tag);
    while !demo_namespaces().iter().any(mine) {
        assert!(
            Instant::now() < deadline,
            "the demo did not create its namespaces"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    // SAFETY: signalling our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let status = child.wait().unwrap();
    assert!(
        status.code().is_some(),
        "killed by a signal instead of stopping: {status}"
    );
    let left: Vec<String> = demo_namespaces().into_iter().filter(mine).collect();
    assert!(left.is_empty(), "namespaces left after Ctrl-C: {left:?}");
}

/// Each connection holds exactly its own two sockets, although the kernel
/// recycles a closed socket's address for the next connection's server child
/// (LISTEN → SYN_RECV) while the previous record still lingers.
#[test]
fn demo_connections_own_their_sockets() {
    if !common::need_root("demo_connections_own_their_sockets") {
        return;
    }
    let (lines, _, _) = run_demo(&["--rounds", &ROUNDS.to_string()]);
    for c in common::of_type(&lines, "connection") {
        let sides: Vec<&str> = c["states"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["side"].as_str().unwrap())
            .collect();
        assert_eq!(
            sides,
            ["client", "server"],
            "sockets of {}: {:#}",
            c["client"],
            c["states"]
        );
    }
}
