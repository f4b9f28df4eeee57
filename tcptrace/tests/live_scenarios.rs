//! Real sockets, real kernel, real packets: each way a TCP connection opens
//! and ends, made on purpose between two network namespaces, and the
//! connection summary tcptrace gives for it (kernel states and wire segments
//! matched). The same scenarios are built as pcaps in the matcher's tables;
//! here the kernel makes them.
mod common;

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::time::Duration;

use common::*;
use serde_json::Value;

const PORT: u16 = 8080;

/// A client namespace, a server namespace, and tcptrace watching both
/// (states and wire) for port 8080. Fields drop in order: tcptrace stops
/// before its namespaces go, also when a test fails half-way.
struct Lab {
    trace: Trace,
    net: NetPair,
    server: SocketAddr,
}

impl Lab {
    fn start(v6: bool) -> Lab {
        let net = NetPair::new();
        let trace = Trace::start(&[
            "--json",
            "--netns",
            &net.a,
            "--netns",
            &net.b,
            "--port",
            &PORT.to_string(),
        ]);
        let server = if v6 {
            format!("[{}]:{PORT}", net.b_v6)
        } else {
            format!("{}:{PORT}", net.b_v4)
        }
        .parse()
        .unwrap();
        Lab { trace, net, server }
    }

    fn listen(&self) -> TcpListener {
        let server = self.server;
        in_netns(Some(&self.net.b), move || {
            TcpListener::bind(server).unwrap()
        })
    }

    fn connect(&self) -> std::io::Result<TcpStream> {
        let server = self.server;
        in_netns(Some(&self.net.a), move || TcpStream::connect(server))
    }

    /// A listener and one connection to it, accepted: (listener, client, server).
    fn established(&self) -> (TcpListener, TcpStream, TcpStream) {
        let listener = self.listen();
        let client = self.connect().unwrap();
        let (server, _) = listener.accept().unwrap();
        (listener, client, server)
    }

    /// Stops tracing; the connection summaries, in the order they ended.
    fn connections(self) -> Vec<Value> {
        let events = self.trace.stop();
        let conns: Vec<Value> = of_type(&events, "connection")
            .into_iter()
            .cloned()
            .collect();
        for c in &conns {
            eprintln!("connection: {}", summary(c));
        }
        conns
    }
}

fn summary(c: &Value) -> String {
    format!(
        "{} → {} open {} close {} closed_by {} steps {:?} anomalies {:?}",
        c["client"],
        c["server"],
        c["open"],
        c["close"],
        c["closed_by"],
        wire_steps(c),
        anomalies(c)
    )
}

/// The names of the wire steps, in order ("SYN", "SYN-ACK", …).
fn wire_steps(c: &Value) -> Vec<String> {
    c["steps"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s["kind"] == "wire" || s["kind"] == "inferred")
        .map(|s| s["name"].as_str().unwrap().to_string())
        .collect()
}

fn anomalies(c: &Value) -> Vec<String> {
    c["anomalies"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["kind"].as_str().unwrap().to_string())
        .collect()
}

/// The kernel states one side's socket went through, as "STATE" in order.
fn states(c: &Value, side: &str) -> Vec<String> {
    c["states"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s["side"] == side)
        .flat_map(|s| s["states"].as_array().unwrap().iter())
        .map(|s| s["state"].as_str().unwrap().to_string())
        .collect()
}

/// The one connection that used this client port.
fn the(conns: &[Value], client_port: u16) -> &Value {
    let mine: Vec<&Value> = conns
        .iter()
        .filter(|c| {
            c["client"]
                .as_str()
                .and_then(|a| a.parse::<SocketAddr>().ok())
                .is_some_and(|a| a.port() == client_port)
        })
        .collect();
    assert_eq!(
        mine.len(),
        1,
        "connections from port {client_port}: {conns:#?}"
    );
    mine[0]
}

fn setsockopt_int(s: &impl AsRawFd, level: i32, name: i32, val: i32) {
    // SAFETY: a valid socket and an int option of the right size.
    let r = unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            level,
            name,
            (&val as *const i32).cast(),
            std::mem::size_of::<i32>() as libc::socklen_t,
        )
    };
    assert_eq!(r, 0, "setsockopt {level}/{name}");
}

/// Sends the ACK the kernel is holding back (delayed ACK) now, so that the
/// close that follows is four segments, not three.
fn ack_now(s: &TcpStream) {
    setsockopt_int(s, libc::IPPROTO_TCP, libc::TCP_QUICKACK, 1);
}

/// The numbers every complete connection must satisfy, whatever its close.
fn check_handshake(c: &Value) {
    let steps = c["steps"].as_array().unwrap();
    let wire: Vec<&Value> = steps.iter().filter(|s| s["kind"] == "wire").collect();
    let (syn, synack, ack) = (wire[0], wire[1], wire[2]);
    assert_eq!(
        [&syn["name"], &synack["name"], &ack["name"]],
        ["SYN", "SYN-ACK", "ACK (handshake)"],
        "{}",
        summary(c)
    );
    let x = c["isn_client"].as_u64().unwrap();
    let y = c["isn_server"].as_u64().unwrap();
    assert_eq!(syn["seq"].as_u64(), Some(x));
    assert_eq!(synack["seq"].as_u64(), Some(y));
    assert_eq!(synack["ack"].as_u64(), Some((x + 1) % (1 << 32)));
    assert_eq!(ack["ack"].as_u64(), Some((y + 1) % (1 << 32)));
    assert_eq!(
        (ack["rel_seq"].as_u64(), ack["rel_ack"].as_u64()),
        (Some(1), Some(1))
    );
    // Seen leaving the client and entering the server: two vantage points.
    assert_eq!(syn["observations"].as_array().unwrap().len(), 2, "{syn:#}");
    let rtt = c["handshake_rtt_ns"].as_u64().unwrap();
    assert!(rtt > 0 && rtt < 1_000_000_000, "handshake RTT {rtt} ns");
    assert_eq!(c["open"], "active");
    assert_eq!(c["views"]["kernel"], true);
    assert_eq!(c["views"]["wire"], true);
}

/// What a connection that completed its handshake must show at its end.
struct Ends {
    close: &'static str,
    closed_by: &'static str,
    /// Wire steps after the handshake.
    steps: &'static [&'static str],
    bytes: (u64, u64),
    client: &'static [&'static str],
    server: &'static [&'static str],
    /// The side in TIME_WAIT, if any.
    time_wait: Option<&'static str>,
    anomalies: &'static [&'static str],
}

const CLIENT_CLOSES_FIRST: &[&str] =
    &["SYN_SENT", "ESTABLISHED", "FIN_WAIT1", "FIN_WAIT2", "CLOSE"];
const SERVER_CLOSES_SECOND: &[&str] =
    &["SYN_RECV", "ESTABLISHED", "CLOSE_WAIT", "LAST_ACK", "CLOSE"];
const FOUR_SEGMENTS: &[&str] = &[
    "FIN",
    "ACK of FIN",
    "FIN",
    "ACK of FIN",
    "TIME_WAIT (inferred)",
];

fn check_ends(c: &Value, want: &Ends) {
    check_handshake(c);
    let ctx = summary(c);
    assert_eq!(c["close"], want.close, "{ctx}");
    assert_eq!(c["closed_by"], want.closed_by, "{ctx}");
    assert_eq!(wire_steps(c)[3..], *want.steps, "{ctx}");
    assert_eq!(
        (c["bytes_client"].as_u64(), c["bytes_server"].as_u64()),
        (Some(want.bytes.0), Some(want.bytes.1)),
        "{ctx}"
    );
    assert_eq!(states(c, "client"), want.client, "{ctx}");
    assert_eq!(states(c, "server"), want.server, "{ctx}");
    match want.time_wait {
        Some(side) => assert_eq!(c["time_wait"]["side"], side, "{:#}", c["time_wait"]),
        None => assert!(c["time_wait"].is_null(), "{:#}", c["time_wait"]),
    }
    assert_eq!(anomalies(c), want.anomalies, "{:#}", c["anomalies"]);
}

/// The client sends 5 bytes and closes first; the server acknowledges the
/// FIN on its own, then closes: FIN, ACK, FIN, ACK, and the client waits in
/// TIME_WAIT.
fn client_closes_first(v6: bool) {
    let lab = Lab::start(v6);
    let (listener, mut client, mut server) = lab.established();
    let port = client.local_addr().unwrap().port();
    client.write_all(b"hello").unwrap();
    client.shutdown(Shutdown::Write).unwrap();
    let mut got = Vec::new();
    server.read_to_end(&mut got).unwrap();
    assert_eq!(got, b"hello");
    ack_now(&server);
    std::thread::sleep(Duration::from_millis(20));
    drop(server);
    client.read_to_end(&mut Vec::new()).unwrap();
    drop(client);
    drop(listener);
    let conns = lab.connections();
    check_ends(
        the(&conns, port),
        &Ends {
            close: "four-segment",
            closed_by: "client",
            steps: FOUR_SEGMENTS,
            bytes: (5, 0),
            client: CLIENT_CLOSES_FIRST,
            server: SERVER_CLOSES_SECOND,
            time_wait: Some("client"),
            anomalies: &[],
        },
    );
}

#[test]
fn client_closes_first_ipv4() {
    if need_root("client_closes_first_ipv4") {
        client_closes_first(false);
    }
}

#[test]
fn client_closes_first_ipv6() {
    if need_root("client_closes_first_ipv6") {
        client_closes_first(true);
    }
}

/// The server answers and closes at once (an HTTP/1.0 server): its FIN;
/// the client reads to the end and closes right away, so its FIN carries
/// the ACK of the server's FIN: the three-segment close of the seed capture,
/// with the roles of the two sides swapped.
#[test]
fn server_closes_first_three_segments() {
    if !need_root("server_closes_first_three_segments") {
        return;
    }
    let lab = Lab::start(false);
    let (listener, mut client, mut server) = lab.established();
    let port = client.local_addr().unwrap().port();
    client.write_all(b"GET /").unwrap();
    let mut req = [0u8; 5];
    server.read_exact(&mut req).unwrap();
    server.write_all(&[b'x'; 1000]).unwrap();
    drop(server);
    let mut body = Vec::new();
    client.read_to_end(&mut body).unwrap();
    assert_eq!(body.len(), 1000);
    // The kernel holds the ACK of the server's FIN back (delayed ACK, at
    // least 40 ms); closing now puts it on our FIN.
    drop(client);
    drop(listener);
    let conns = lab.connections();
    check_ends(
        the(&conns, port),
        &Ends {
            close: "three-segment",
            closed_by: "server",
            steps: &["FIN", "FIN+ACK", "ACK of FIN", "TIME_WAIT (inferred)"],
            bytes: (5, 1000),
            client: &["SYN_SENT", "ESTABLISHED", "CLOSE_WAIT", "LAST_ACK", "CLOSE"],
            server: &["SYN_RECV", "ESTABLISHED", "FIN_WAIT1", "FIN_WAIT2", "CLOSE"],
            time_wait: Some("server"),
            anomalies: &[],
        },
    );
}

/// SO_LINGER with a zero timeout: close() aborts, the client sends RST
/// from ESTABLISHED, and the server's socket goes straight to CLOSE.
#[test]
fn linger_zero_resets() {
    if !need_root("linger_zero_resets") {
        return;
    }
    let lab = Lab::start(false);
    let (listener, mut client, mut server) = lab.established();
    let port = client.local_addr().unwrap().port();
    client.write_all(b"hello").unwrap();
    server.read_exact(&mut [0u8; 5]).unwrap();
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: a valid socket and a struct linger.
    let r = unsafe {
        libc::setsockopt(
            client.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&linger as *const libc::linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        )
    };
    assert_eq!(r, 0);
    drop(client);
    let err = server.read(&mut [0u8; 1]).unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionReset);
    drop(server);
    drop(listener);
    let conns = lab.connections();
    let c = the(&conns, port);
    check_ends(
        c,
        &Ends {
            close: "reset",
            closed_by: "client",
            steps: &["RST"],
            bytes: (5, 0),
            client: &["SYN_SENT", "ESTABLISHED", "CLOSE"],
            server: &["SYN_RECV", "ESTABLISHED", "CLOSE"],
            time_wait: None,
            anomalies: &["reset"],
        },
    );
    let rst = &c["anomalies"][0];
    assert_eq!(rst["side"], "client", "{rst:#}");
}

/// Nobody listens on the port: the server's kernel answers the SYN with
/// RST,ACK and connect() fails with ECONNREFUSED.
#[test]
fn closed_port_refuses() {
    if !need_root("closed_port_refuses") {
        return;
    }
    let lab = Lab::start(false);
    let err = lab.connect().unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionRefused);
    let conns = lab.connections();
    assert_eq!(conns.len(), 1, "{conns:#?}");
    let c = &conns[0];
    assert_eq!(c["close"], "reset", "{}", summary(c));
    assert_eq!(c["closed_by"], "server");
    assert_eq!(wire_steps(c), ["SYN", "RST (refused)"]);
    assert_eq!(anomalies(c), ["refused"]);
    assert_eq!(states(c, "client"), ["SYN_SENT", "CLOSE"]);
    assert_eq!(states(c, "server"), Vec::<String>::new());
    let steps = c["steps"].as_array().unwrap();
    let rst = steps.iter().find(|s| s["name"] == "RST (refused)").unwrap();
    let isn = c["isn_client"].as_u64().unwrap();
    assert_eq!(rst["ack"].as_u64(), Some((isn + 1) % (1 << 32)), "{rst:#}");
}

/// shutdown(SHUT_WR): the client is done sending but keeps reading; the
/// server acknowledges the FIN, sends 1500 more bytes, then closes.
#[test]
fn half_close_keeps_the_other_direction_open() {
    if !need_root("half_close_keeps_the_other_direction_open") {
        return;
    }
    let lab = Lab::start(false);
    let (listener, mut client, mut server) = lab.established();
    let port = client.local_addr().unwrap().port();
    client.write_all(&[b'q'; 50]).unwrap();
    client.shutdown(Shutdown::Write).unwrap();
    let mut req = Vec::new();
    server.read_to_end(&mut req).unwrap();
    assert_eq!(req.len(), 50);
    ack_now(&server);
    std::thread::sleep(Duration::from_millis(20));
    // Half-closed: the client's socket sits in FIN_WAIT2 and still reads.
    server.write_all(&[b'r'; 1000]).unwrap();
    std::thread::sleep(Duration::from_millis(20));
    server.write_all(&[b'r'; 500]).unwrap();
    let mut body = Vec::new();
    let mut buf = [0u8; 2048];
    while body.len() < 1500 {
        let n = client.read(&mut buf).unwrap();
        assert!(n > 0, "EOF after {} bytes", body.len());
        body.extend_from_slice(&buf[..n]);
    }
    drop(server);
    client.read_to_end(&mut body).unwrap();
    assert_eq!(body.len(), 1500);
    drop(client);
    drop(listener);
    let conns = lab.connections();
    let c = the(&conns, port);
    check_ends(
        c,
        &Ends {
            close: "four-segment",
            closed_by: "client",
            steps: FOUR_SEGMENTS,
            bytes: (50, 1500),
            client: CLIENT_CLOSES_FIRST,
            server: SERVER_CLOSES_SECOND,
            time_wait: Some("client"),
            anomalies: &[],
        },
    );
    // The server's FIN comes 1500 bytes after the client's was acknowledged.
    let steps = c["steps"].as_array().unwrap();
    let fins: Vec<&Value> = steps
        .iter()
        .filter(|s| s["kind"] == "wire" && s["name"] == "FIN")
        .collect();
    assert_eq!(fins[1]["from"], "server");
    assert_eq!(fins[1]["rel_seq"].as_u64(), Some(1501), "{:#}", fins[1]);
    // FIN_WAIT2 lasted while the server kept sending.
    let fin_wait2 = c["states"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["side"] == "client")
        .and_then(|s| {
            s["states"]
                .as_array()
                .unwrap()
                .iter()
                .find(|st| st["state"] == "FIN_WAIT2")
        })
        .and_then(|st| st["ns"].as_u64())
        .unwrap();
    assert!(fin_wait2 >= 20_000_000, "FIN_WAIT2 for {fin_wait2} ns");
}

/// The server's accept queue is full (backlog 1, two connections not yet
/// accepted), so its kernel drops the next SYN; the client's kernel sends
/// it again after its initial RTO (1 s), by which time there is room.
#[test]
fn dropped_syn_is_retransmitted() {
    if !need_root("dropped_syn_is_retransmitted") {
        return;
    }
    let lab = Lab::start(false);
    let listener = lab.listen();
    // SAFETY: a valid listening socket; listen() again only sets the backlog.
    assert_eq!(unsafe { libc::listen(listener.as_raw_fd(), 1) }, 0);
    let queued = [lab.connect().unwrap(), lab.connect().unwrap()];
    // Let both reach the accept queue.
    std::thread::sleep(Duration::from_millis(100));
    let accept_later = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(500));
        let accepted: Vec<TcpStream> = (0..3).map(|_| listener.accept().unwrap().0).collect();
        (accepted, listener)
    });
    let late = lab.connect().unwrap();
    let port = late.local_addr().unwrap().port();
    let (accepted, listener) = accept_later.join().unwrap();
    drop((queued, late, accepted, listener));
    let conns = lab.connections();
    let c = the(&conns, port);
    assert_eq!(anomalies(c)[0], "syn_retransmit", "{}", summary(c));
    assert_eq!(c["anomalies"][0]["count"], 1);
    let steps = wire_steps(c);
    assert_eq!(
        steps[..4],
        ["SYN", "SYN (retransmission)", "SYN-ACK", "ACK (handshake)"]
    );
    assert_eq!(c["retransmissions"], 1);
    let syns: Vec<&Value> = c["steps"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s["flags"] == "S")
        .collect();
    assert_eq!(syns[0]["seq"], syns[1]["seq"], "same ISN");
    let gap = syns[1]["ts_ns"].as_u64().unwrap() - syns[0]["ts_ns"].as_u64().unwrap();
    assert!(
        (900_000_000..3_000_000_000).contains(&gap),
        "SYN retransmitted after {gap} ns"
    );
    // The first SYN reached the server's namespace but nothing answered it.
    assert_eq!(syns[0]["observations"].as_array().unwrap().len(), 2);
}
