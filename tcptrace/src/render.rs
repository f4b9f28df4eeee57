//! Stage 5: what people and scripts read. One line per event (text or JSON
//! Lines), connection summaries and timelines (see [`crate::timeline`]).
use std::borrow::Cow;
use std::cell::RefCell;
use std::fmt;
use std::io::{self, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use crate::event::{Comm, Dir, Event, Family, Segment, StateChange, TcpOptions};
use crate::matcher::{Anomaly, Connection, Observation, SocketStates, Step, TimeWait, Views};
use crate::text::{decimal, left_aligned, padded, with_text, Piece};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Explained timeline per connection when it ends.
    Timeline,
    /// One line per event as it arrives.
    Events,
    /// JSON Lines: every event, then connection summaries.
    Json,
}

/// Converts event timestamps to wall-clock time for the text output.
#[derive(Clone, Copy)]
pub struct Clock {
    /// Add to an event's ts_ns to get ns since the epoch.
    pub offset_ns: i128,
}

impl Clock {
    /// Live events carry CLOCK_MONOTONIC (bpf_ktime_get_ns).
    pub fn monotonic() -> Self {
        let now = |id| {
            let mut ts = libc::timespec {
                tv_sec: 0,
                tv_nsec: 0,
            };
            // SAFETY: valid clock id and out pointer.
            unsafe { libc::clock_gettime(id, &mut ts) };
            ts.tv_sec as i128 * 1_000_000_000 + ts.tv_nsec as i128
        };
        Clock {
            offset_ns: now(libc::CLOCK_REALTIME) - now(libc::CLOCK_MONOTONIC),
        }
    }

    /// Capture files already carry epoch timestamps.
    pub fn epoch() -> Self {
        Clock { offset_ns: 0 }
    }

    /// `HH:MM:SS.uuuuuu` (UTC), as tcpdump prints with -tt converted.
    pub fn hms(&self, ts_ns: u64) -> Hms {
        let t = (ts_ns as i128 + self.offset_ns).max(0) as u128;
        // In u64 for any time before 2554: u128's divisions are library
        // calls, and this is once per event line.
        let (day_secs, ns) = match u64::try_from(t) {
            Ok(t) => ((t / 1_000_000_000) % 86_400, t % 1_000_000_000),
            Err(_) => (
                ((t / 1_000_000_000) % 86_400) as u64,
                (t % 1_000_000_000) as u64,
            ),
        };
        Hms {
            day_secs,
            us: ns / 1000,
        }
    }
}

/// A wall-clock time of day.
pub struct Hms {
    day_secs: u64,
    us: u64,
}

impl Piece for Hms {
    /// `HH:MM:SS.uuuuuu`.
    fn append(&self, t: &mut String) {
        let s = self.day_secs;
        padded(t, s / 3600, 2, '0');
        t.push(':');
        padded(t, (s / 60) % 60, 2, '0');
        t.push(':');
        padded(t, s % 60, 2, '0');
        t.push('.');
        padded(t, self.us, 6, '0');
    }
}

/// Nanoseconds as milliseconds with three decimals, as `{:.3}` prints
/// `ns as f64 / 1e6`. In integers: the double is within half an ulp of
/// ns / 10^6, and a rounding boundary that ns does not sit on exactly lies
/// at least 10^-6 ms away, more than that half ulp below 2^53 ns; on a
/// boundary (or above) the double decides, as before.
fn millis3(t: &mut String, ns: u64) {
    if ns % 1000 == 500 || ns >= 1 << 53 {
        use std::fmt::Write as _;
        let _ = write!(t, "{:.3}", ns as f64 / 1e6);
        return;
    }
    let us = (ns + 500) / 1000;
    (us / 1000).append(t);
    t.push('.');
    padded(t, us % 1000, 3, '0');
}

/// One line assembled in a reused String and written with one
/// `write_all` ([`with_text`]): `fmt` goes through the formatter for every
/// piece and padding, and `{:.3}` through float formatting, which made an
/// event line cost more than a JSON one.
fn write_state_line<W: Write + ?Sized>(
    out: &mut W,
    s: &StateChange,
    clock: &Clock,
) -> io::Result<()> {
    with_text(out, |t| {
        clock.hms(s.ts_ns).append(t);
        t.push(' ');
        padded(t, u64::from(s.pid), 7, ' ');
        t.push(' ');
        left_aligned(t, &s.comm.as_str(), 15);
        t.push(' ');
        // SocketAddr prints `a:p` and `[a]:p`, as the user expects an endpoint.
        SocketAddr::new(s.saddr, s.sport).append(t);
        t.push_str(" → ");
        SocketAddr::new(s.daddr, s.dport).append(t);
        t.push_str("  ");
        t.push_str(s.oldstate.name());
        t.push_str(" → ");
        t.push_str(s.newstate.name());
        if s.prev_state_ns > 0 {
            t.push_str("  (");
            millis3(t, s.prev_state_ns);
            t.push_str(" ms in ");
            t.push_str(s.oldstate.name());
            t.push(')');
        }
        t.push('\n');
    })
}

/// tcpdump's one-line form, absolute sequence numbers (`-S`); assembled as
/// the state line is.
fn write_segment_line<W: Write + ?Sized>(
    out: &mut W,
    s: &Segment,
    clock: &Clock,
) -> io::Result<()> {
    with_text(out, |t| {
        clock.hms(s.ts_ns).append(t);
        t.push(' ');
        t.push_str(s.iface.as_deref().unwrap_or("-"));
        t.push(' ');
        left_aligned(t, dir_word(s), 7);
        t.push_str(if s.saddr.is_ipv4() { " IP " } else { " IP6 " });
        s.saddr.append(t);
        t.push('.');
        u64::from(s.sport).append(t);
        t.push_str(" > ");
        s.daddr.append(t);
        t.push('.');
        u64::from(s.dport).append(t);
        t.push_str(": Flags [");
        t.push_str(s.flags.tcpdump(&mut [0; 8]));
        t.push_str("], seq ");
        s.seq.append(t);
        if s.len > 0 {
            t.push(':');
            s.seq.wrapping_add(s.len).append(t);
        }
        if s.flags.ack() {
            t.push_str(", ack ");
            s.ack.append(t);
        }
        t.push_str(", win ");
        u64::from(s.win).append(t);
        if !s.options.is_empty() {
            use std::fmt::Write as _;
            let _ = write!(t, ", options [{}]", s.options);
        }
        t.push_str(", length ");
        s.len.append(t);
        t.push('\n');
    })
}

fn dir_word(s: &Segment) -> &'static str {
    match s.dir {
        Dir::Ingress => "ingress",
        Dir::Egress => "egress",
        Dir::Capture => "",
    }
}

// The JSON output is written by hand, not through serde: it is most of a
// live trace's output, and serde_json escapes every key and goes through
// `fmt` for every number. The field order and spelling are the derived
// `Serialize` impls' (the public contract), which the tests hold these
// writers to byte for byte.
//
// A line is assembled in a reused buffer and handed to the writer with one
// `write_all`: a connection line is a few hundred keys and values, and a
// call into a generic writer for each, most with a `memcpy` of a few bytes,
// was most of what the output cost. In the buffer, fixed keys are copied
// as constants, and numbers are formatted in place (in room reserved at the
// end, then cut back to their length).

thread_local! {
    /// The line being assembled; see [`with_line`].
    static LINE: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

thread_local! {
    /// Which fixed texts need no escaping; see [`Json::text`].
    static PLAIN: RefCell<PlainTexts> = RefCell::new(PlainTexts::default());
}

/// A direct-mapped memo of `'static` texts known to need no JSON escaping,
/// keyed by address and length (a `'static` str never changes). A miss
/// scans and remembers; two texts sharing a slot only cost rescans.
struct PlainTexts {
    slots: [(usize, usize); 256],
}

impl Default for PlainTexts {
    fn default() -> Self {
        PlainTexts {
            slots: [(0, 0); 256],
        }
    }
}

impl PlainTexts {
    fn plain(&mut self, t: &'static str) -> bool {
        let id = (t.as_ptr() as usize, t.len());
        // Texts sit at least a few bytes apart: the low bits vary.
        let slot = &mut self.slots[(id.0 ^ id.0 >> 8) & 0xff];
        if *slot == id {
            return true;
        }
        let plain = !needs_escape(t);
        if plain {
            *slot = id;
        }
        plain
    }
}

/// Whether a JSON string needs escaping (serde_json's rule: controls, `"`
/// and `\`). Without an early exit the check vectorises.
fn needs_escape(s: &str) -> bool {
    s.bytes()
        .fold(false, |e, c| e | (c < 0x20) | (c == b'"') | (c == b'\\'))
}

/// `"a.b.c.d`, an opening quote and the address, at the start of `d`;
/// returns its length (what follows, `"` or `:port"`, is the caller's).
#[inline(always)]
fn open_quoted_ipv4(ip: Ipv4Addr, d: &mut [u8; 17]) -> usize {
    d[0] = b'"';
    let a: &mut [u8; 16] = (&mut d[1..]).try_into().expect("16 bytes");
    1 + crate::text::ipv4(ip, a)
}

/// A line assembled by `build`, then written out in one go.
fn with_line<W: Write + ?Sized>(out: &mut W, build: impl FnOnce(&mut Json<'_>)) -> io::Result<()> {
    LINE.with_borrow_mut(|buf| {
        let mut j = Json::new(buf);
        build(&mut j);
        let len = j.pos;
        let res = out.write_all(&buf[..len]);
        // A rare huge connection (thousands of steps) gives its memory back.
        if buf.len() > LINE_KEEP {
            *buf = Vec::new();
        }
        res
    })
}

/// What the line buffer keeps between lines: far more than any ordinary
/// connection line (a few KiB).
const LINE_KEEP: usize = 1 << 20;

/// `,"key":` as one byte string (what [`Json`] takes as a key);
/// `key!({"key"})` is `{"key":`, an object's opening and first key.
macro_rules! key {
    ($k:literal) => {
        concat!(",\"", $k, "\":").as_bytes()
    };
    ({ $k:literal }) => {
        concat!("{\"", $k, "\":").as_bytes()
    };
}

/// One JSON line: `{"type":"state",…}` or `{"type":"segment",…}`.
pub fn write_event_json<W: Write + ?Sized>(out: &mut W, ev: &Event) -> io::Result<()> {
    with_line(out, |j| match ev {
        Event::State(s) => j.state(s),
        Event::Segment(s) => j.segment(s),
    })
}

/// The connection line, byte for byte what the derived `Serialize` writes
/// (`connection_json_matches_serde` and the tests below check it).
fn write_connection_json<W: Write + ?Sized>(out: &mut W, c: &Connection) -> io::Result<()> {
    with_line(out, |j| j.connection(c))
}

/// The JSON line being assembled in `buf[..pos]`. Keys are fixed ASCII
/// (see [`key!`]); the helpers are inlined so that each key is copied as a
/// constant.
///
/// `buf` is only ever grown (zeroed once, kept between lines) and written
/// at `pos`: a `Vec` appended to checks its capacity and moves its length
/// at every piece, and room for a number had to be zeroed and cut back
/// each time, together an eighth of what a state line cost (callgrind).
struct Json<'a> {
    buf: &'a mut Vec<u8>,
    /// `buf`'s start and length, kept here (updated by `grow`): read
    /// through `buf` they were reloaded at every piece.
    at: *mut u8,
    len: usize,
    pos: usize,
}

impl<'a> Json<'a> {
    fn new(buf: &'a mut Vec<u8>) -> Json<'a> {
        Json {
            at: buf.as_mut_ptr(),
            len: buf.len(),
            buf,
            pos: 0,
        }
    }

    /// `n` bytes at `pos`, growing the buffer when the line outgrows it.
    #[inline(always)]
    fn room(&mut self, n: usize) -> &mut [u8] {
        if self.pos + n > self.len {
            self.grow(self.pos + n);
        }
        // SAFETY: `at..at + len` is `buf`'s initialised contents (see
        // `grow`), which this borrows mutably, and `pos + n <= len`.
        unsafe { std::slice::from_raw_parts_mut(self.at.add(self.pos), n) }
    }

    #[cold]
    #[inline(never)]
    fn grow(&mut self, end: usize) {
        let len = end.max(2 * self.buf.len()).max(4096);
        self.buf.resize(len, 0);
        self.at = self.buf.as_mut_ptr();
        self.len = len;
    }

    #[inline(always)]
    fn raw(&mut self, b: &[u8]) {
        self.room(b.len()).copy_from_slice(b);
        self.pos += b.len();
    }

    /// `key`, then what `fill` writes in place in at most `N` bytes after
    /// it (returning how many it used), with one check for room: most
    /// pieces of a line are a key and its value, and a check (with its
    /// length update) per piece was a quarter of the instructions spent
    /// writing a line (callgrind). Formatting in a stack array and copying
    /// it out costs a `memcpy` call, or (as a fixed-size copy) a stall: the
    /// wide load waits for the byte stores.
    #[inline(always)]
    fn keyed<const N: usize>(&mut self, key: &[u8], fill: impl FnOnce(&mut [u8; N]) -> usize) {
        let k = key.len();
        let room = self.room(k + N);
        room[..k].copy_from_slice(key);
        let used = fill((&mut room[k..]).try_into().expect("N bytes"));
        self.pos += k + used;
    }

    /// `key` and `"text"`, with one check for room.
    #[inline(always)]
    fn quoted(&mut self, key: &[u8], text: &[u8]) {
        let (k, t) = (key.len(), text.len());
        let room = self.room(k + t + 2);
        room[..k].copy_from_slice(key);
        room[k] = b'"';
        room[k + 1..k + 1 + t].copy_from_slice(text);
        room[k + 1 + t] = b'"';
        self.pos += k + t + 2;
    }

    #[inline(always)]
    fn int(&mut self, key: &[u8], v: impl Into<u64>) {
        let v = v.into();
        self.keyed::<20>(key, |d| decimal(v, d));
    }

    /// Left out when absent (the per-step fields).
    #[inline(always)]
    fn some(&mut self, key: &[u8], v: Option<impl Into<u64>>) {
        if let Some(v) = v {
            self.int(key, v);
        }
    }

    /// `null` when absent (the top-level fields, always present).
    #[inline(always)]
    fn nullable(&mut self, key: &[u8], v: Option<impl Into<u64>>) {
        match v {
            Some(v) => self.int(key, v),
            None => self.null(key),
        }
    }

    #[inline(always)]
    fn null(&mut self, key: &[u8]) {
        self.keyed::<4>(key, |d| {
            *d = *b"null";
            4
        });
    }

    #[inline(always)]
    fn str(&mut self, key: &[u8], v: &str) {
        if needs_escape(v) {
            self.raw(key);
            self.json_str(v);
        } else {
            self.quoted(key, v.as_bytes());
        }
    }

    /// `,"comm":"…"`. An ASCII name (nearly every one) skips the UTF-8
    /// check and its lossy decoding, a visible share of every line.
    #[inline(always)]
    fn comm(&mut self, comm: &Comm) {
        let b = comm.as_bytes();
        if b.is_ascii() {
            // SAFETY: ASCII is valid UTF-8.
            self.str(key!("comm"), unsafe { std::str::from_utf8_unchecked(b) });
        } else {
            self.str(key!("comm"), &comm.as_str());
        }
    }

    /// A step's text: fixed ones (borrowed, `'static`) as [`Json::fixed`],
    /// composed ones (owned) scanned each time.
    #[inline(always)]
    #[allow(clippy::ptr_arg)] // the variant is what matters: borrowed is 'static
    fn text(&mut self, key: &[u8], v: &Cow<'static, str>) {
        match v {
            Cow::Borrowed(t) => self.fixed(key, t),
            Cow::Owned(t) => self.str(key, t),
        }
    }

    /// A fixed text, scanned for characters to escape once per thread and
    /// remembered by address: every connection repeats the same names and
    /// explanations.
    #[inline(always)]
    fn fixed(&mut self, key: &[u8], t: &'static str) {
        if PLAIN.with(|p| p.borrow_mut().plain(t)) {
            self.name(key, t);
        } else {
            self.str(key, t);
        }
    }

    /// A fixed name that needs no escaping: an enum variant, a TCP state,
    /// tcpdump's flag letters.
    #[inline(always)]
    fn name(&mut self, key: &[u8], v: &str) {
        self.quoted(key, v.as_bytes());
    }

    /// A kernel address as `"0x…"`, as `{:#x}` prints it (lowercase, no
    /// leading zeros, `0x0` for 0), without a formatter.
    #[inline(always)]
    fn hex(&mut self, key: &[u8], v: u64) {
        /// Each byte's two digits: a byte is one 2-byte copy.
        const PAIRS: [[u8; 2]; 256] = {
            let digits = b"0123456789abcdef";
            let mut t = [[0; 2]; 256];
            let mut i = 0;
            while i < 256 {
                t[i] = [digits[i >> 4], digits[i & 0xf]];
                i += 1;
            }
            t
        };
        self.keyed::<20>(key, |d| {
            let n = (v.checked_ilog2().unwrap_or(0) / 4 + 1) as usize;
            let mut all = [0u8; 16];
            for (pair, byte) in all.chunks_exact_mut(2).zip(v.to_be_bytes()) {
                pair.copy_from_slice(&PAIRS[usize::from(byte)]);
            }
            d[..3].copy_from_slice(b"\"0x");
            // A kernel address has all 16: one fixed-size copy.
            if n == 16 {
                d[3..19].copy_from_slice(&all);
            } else {
                d[3..3 + n].copy_from_slice(&all[16 - n..]);
            }
            d[3 + n] = b'"';
            n + 4
        });
    }

    /// An address as its `Display` prints it. IPv4 is written octet by
    /// octet (std's `Display` goes through a formatter per octet, a visible
    /// share of every event line); IPv6's compression rules stay std's.
    fn ip(&mut self, key: &[u8], ip: IpAddr) {
        match ip {
            IpAddr::V4(v4) => self.keyed::<18>(key, |d| {
                let n = open_quoted_ipv4(v4, (&mut d[..17]).try_into().expect("17 bytes"));
                d[n] = b'"';
                n + 1
            }),
            IpAddr::V6(v6) => self.display(key, v6),
        }
    }

    /// `SocketAddr`'s `Display`: `a.b.c.d:port`; IPv6 (`[a]:port`, with a
    /// scope id when there is one) through std.
    fn socket_addr(&mut self, key: &[u8], addr: SocketAddr) {
        match addr {
            SocketAddr::V4(v4) => self.keyed::<40>(key, |d| {
                let n = open_quoted_ipv4(*v4.ip(), (&mut d[..17]).try_into().expect("17 bytes"));
                d[n] = b':';
                let digits: &mut [u8; 20] = (&mut d[n + 1..n + 21]).try_into().expect("20 bytes");
                let p = decimal(v4.port().into(), digits);
                d[n + 1 + p] = b'"';
                n + p + 2
            }),
            SocketAddr::V6(_) => self.display(key, addr),
        }
    }

    /// `key` and `"v"` as `Display` prints it (an address: nothing to
    /// escape), through `fmt` into a scratch buffer: the line's buffer past
    /// `pos` is not to be appended to.
    fn display(&mut self, key: &[u8], v: impl fmt::Display) {
        use io::Write as _;
        let mut scratch = Vec::with_capacity(64);
        write!(scratch, "{v}").expect("writing to a Vec");
        self.quoted(key, &scratch);
    }

    /// A JSON string; serde_json's escaping only when a byte needs it.
    fn json_str(&mut self, s: &str) {
        // Most strings (step names, rules, explanations) need none.
        if needs_escape(s) {
            let escaped = serde_json::to_vec(s).expect("writing to a Vec");
            self.raw(&escaped);
        } else {
            self.quoted(b"", s.as_bytes());
        }
    }

    /// Opens a list (`key` is `,"key":`); `item` writes each element.
    #[inline(always)]
    fn list<T>(&mut self, key: &[u8], items: &[T], mut item: impl FnMut(&mut Self, &T)) {
        self.raw(key);
        self.raw(b"[");
        for (i, it) in items.iter().enumerate() {
            if i > 0 {
                self.raw(b",");
            }
            item(self, it);
        }
        self.raw(b"]");
    }

    fn state(&mut self, s: &StateChange) {
        self.raw(br#"{"type":"state""#);
        self.int(key!("ts_ns"), s.ts_ns);
        self.hex(key!("skaddr"), s.skaddr);
        self.int(key!("pid"), s.pid);
        self.comm(&s.comm);
        self.endpoints(s.family, s.saddr, s.sport, s.daddr, s.dport);
        self.name(key!("oldstate"), s.oldstate.name());
        self.name(key!("newstate"), s.newstate.name());
        self.int(key!("prev_state_ns"), s.prev_state_ns);
        self.int(key!("netns"), s.netns);
        self.some(key!("bytes_acked"), s.bytes_acked);
        self.some(key!("bytes_received"), s.bytes_received);
        self.raw(b"}\n");
    }

    fn segment(&mut self, s: &Segment) {
        self.raw(br#"{"type":"segment""#);
        self.int(key!("ts_ns"), s.ts_ns);
        self.int(key!("ifindex"), s.ifindex);
        if let Some(iface) = &s.iface {
            self.str(key!("iface"), iface);
        }
        self.name(key!("dir"), s.dir.name());
        self.endpoints(s.family, s.saddr, s.sport, s.daddr, s.dport);
        self.name(key!("flags"), s.flags.tcpdump(&mut [0; 8]));
        self.int(key!("seq"), s.seq);
        self.int(key!("ack"), s.ack);
        self.int(key!("win"), s.win);
        self.int(key!("len"), s.len);
        self.options(&s.options);
        if s.netns != 0 {
            self.int(key!("netns"), s.netns);
        }
        self.raw(b"}\n");
    }

    /// `"family":…,"saddr":…,"sport":…,"daddr":…,"dport":…`, shared by both kinds.
    fn endpoints(&mut self, family: Family, saddr: IpAddr, sport: u16, daddr: IpAddr, dport: u16) {
        self.name(key!("family"), family.name());
        self.ip(key!("saddr"), saddr);
        self.int(key!("sport"), sport);
        self.ip(key!("daddr"), daddr);
        self.int(key!("dport"), dport);
    }

    /// `,"options":{…}`, the options that are there.
    fn options(&mut self, o: &TcpOptions) {
        self.raw(key!("options"));
        let start = self.pos;
        if let Some(v) = o.mss {
            self.int(key!("mss"), v);
        }
        if let Some(v) = o.wscale {
            self.int(key!("wscale"), v);
        }
        if o.sack_ok {
            self.raw(br#","sack_ok":true"#);
        }
        if let Some(v) = o.tsval {
            self.int(key!("tsval"), v);
        }
        if let Some(v) = o.tsecr {
            self.int(key!("tsecr"), v);
        }
        // Each option came with a comma; the first one's opens the object.
        if self.pos > start {
            // SAFETY: `start < pos <= len`, inside the buffer (see `room`).
            unsafe { *self.at.add(start) = b'{' };
        } else {
            self.raw(b"{");
        }
        self.raw(b"}");
    }

    fn connection(&mut self, c: &Connection) {
        self.raw(b"{\"type\":");
        self.json_str(c.record_type);
        self.socket_addr(key!("client"), c.client);
        self.socket_addr(key!("server"), c.server);
        self.name(key!("family"), c.family.name());
        self.some(key!("netns"), c.netns);
        self.nullable(key!("isn_client"), c.isn_client);
        self.nullable(key!("isn_server"), c.isn_server);
        self.nullable(key!("handshake_rtt_ns"), c.handshake_rtt_ns);
        self.nullable(key!("handshake_rtt_server_ns"), c.handshake_rtt_server_ns);
        self.nullable(key!("bytes_client"), c.bytes_client);
        self.nullable(key!("bytes_server"), c.bytes_server);
        self.name(key!("open"), c.open.name());
        self.name(key!("close"), c.close.name());
        match c.closed_by {
            Some(side) => self.name(key!("closed_by"), side.name()),
            None => self.null(key!("closed_by")),
        }
        self.int(key!("first_ts_ns"), c.first_ts_ns);
        self.int(key!("last_ts_ns"), c.last_ts_ns);
        self.int(key!("duration_ns"), c.duration_ns);
        self.name(key!("end_reason"), c.end_reason.name());
        self.int(key!("segments"), c.segments);
        self.int(key!("retransmissions"), c.retransmissions);
        self.views(c.views);
        self.list(key!("steps"), &c.steps, Self::step);
        self.list(key!("anomalies"), &c.anomalies, Self::anomaly);
        self.list(key!("states"), &c.states, Self::socket_states);
        match &c.time_wait {
            Some(tw) => self.time_wait(tw),
            None => self.null(key!("time_wait")),
        }
        self.raw(b"}\n");
    }

    fn views(&mut self, v: Views) {
        let b = |v| if v { "true" } else { "false" };
        self.raw(key!("views"));
        self.raw(b"{\"wire\":");
        self.raw(b(v.wire).as_bytes());
        self.raw(key!("kernel"));
        self.raw(b(v.kernel).as_bytes());
        self.raw(key!("live"));
        self.raw(b(v.live).as_bytes());
        self.raw(b"}");
    }

    fn step(&mut self, st: &Step) {
        self.int(key!({ "ts_ns" }), st.ts_ns);
        self.int(key!("rel_ns"), st.rel_ns);
        self.name(key!("kind"), st.kind.name());
        self.text(key!("name"), &st.name);
        if let Some(rule) = &st.rule {
            self.text(key!("rule"), rule);
        }
        self.text(key!("explain"), &st.explain);
        if let Some(from) = st.from {
            self.name(key!("from"), from.name());
        }
        if let Some(flags) = st.flags {
            self.name(key!("flags"), flags.tcpdump(&mut [0; 8]));
        }
        self.some(key!("seq"), st.seq);
        self.some(key!("ack"), st.ack);
        self.some(key!("rel_seq"), st.rel_seq);
        self.some(key!("rel_ack"), st.rel_ack);
        self.some(key!("len"), st.len);
        self.some(key!("win"), st.win);
        if let Some(o) = &st.options {
            self.options(o);
        }
        if st.retransmission {
            self.raw(br#","retransmission":true"#);
        }
        if !st.observations.is_empty() {
            self.list(key!("observations"), &st.observations, Self::observation);
        }
        if let Some(side) = st.side {
            self.name(key!("side"), side.name());
        }
        if let Some(sk) = st.skaddr {
            self.hex(key!("skaddr"), sk);
        }
        if let Some(s) = st.oldstate {
            self.name(key!("oldstate"), s.name());
        }
        if let Some(s) = st.newstate {
            self.name(key!("newstate"), s.name());
        }
        self.some(key!("in_state_ns"), st.in_state_ns);
        self.some(key!("pid"), st.pid);
        if let Some(comm) = &st.comm {
            self.comm(comm);
        }
        self.some(key!("netns"), st.netns);
        self.some(key!("matched_step"), st.matched_step.map(|i| i as u64));
        self.some(key!("end_ts_ns"), st.end_ts_ns);
        self.some(key!("segments"), st.segments);
        self.some(key!("bytes_client"), st.bytes_client);
        self.some(key!("bytes_server"), st.bytes_server);
        self.some(key!("retransmissions"), st.retransmissions);
        self.raw(b"}");
    }

    fn observation(&mut self, o: &Observation) {
        self.int(key!({ "netns" }), o.netns);
        self.int(key!("ifindex"), o.ifindex);
        if let Some(iface) = &o.iface {
            self.str(key!("iface"), iface);
        }
        self.name(key!("dir"), o.dir.name());
        self.int(key!("ts_ns"), o.ts_ns);
        self.raw(b"}");
    }

    fn anomaly(&mut self, a: &Anomaly) {
        self.name(key!({ "kind" }), a.kind.name());
        self.int(key!("count"), a.count);
        if let Some(side) = a.side {
            self.name(key!("side"), side.name());
        }
        if let Some(state) = &a.state {
            self.str(key!("state"), state);
        }
        self.some(key!("ts_ns"), a.ts_ns);
        self.some(key!("step"), a.step.map(|i| i as u64));
        self.str(key!("detail"), &a.detail);
        self.raw(b"}");
    }

    fn socket_states(&mut self, s: &SocketStates) {
        self.hex(key!({ "skaddr" }), s.skaddr);
        self.name(key!("side"), s.side.name());
        self.int(key!("pid"), s.pid);
        self.comm(&s.comm);
        self.int(key!("netns"), s.netns);
        self.list(key!("states"), &s.states, |j, span| {
            j.name(key!({ "state" }), span.state.name());
            j.nullable(key!("ns"), span.ns);
            j.raw(b"}");
        });
        self.raw(b"}");
    }

    fn time_wait(&mut self, tw: &TimeWait) {
        self.raw(key!("time_wait"));
        self.name(key!({ "side" }), tw.side.name());
        self.int(key!("since_ts_ns"), tw.since_ts_ns);
        self.int(key!("rel_ns"), tw.rel_ns);
        self.fixed(key!("source"), tw.source);
        self.int(key!("expected_ns"), tw.expected_ns);
        self.str(key!("detail"), &tw.detail);
        self.raw(b"}");
    }
}

/// One readable line: the transition, or the segment as tcpdump prints it.
pub fn write_event_line<W: Write + ?Sized>(
    out: &mut W,
    ev: &Event,
    clock: &Clock,
) -> io::Result<()> {
    match ev {
        Event::State(s) => write_state_line(out, s, clock),
        Event::Segment(s) => write_segment_line(out, s, clock),
    }
}

/// Writes one event as it arrives, in the chosen mode (nothing for
/// timelines, which show events inside their connection).
pub fn write_event<W: Write + ?Sized>(
    out: &mut W,
    mode: Mode,
    ev: &Event,
    clock: &Clock,
) -> io::Result<()> {
    match mode {
        Mode::Json => write_event_json(out, ev),
        Mode::Events => write_event_line(out, ev, clock),
        Mode::Timeline => Ok(()),
    }
}

/// Writes a finished connection in the chosen mode.
pub fn connection<W: Write + ?Sized>(out: &mut W, mode: Mode, c: &Connection) -> io::Result<()> {
    match mode {
        Mode::Json => write_connection_json(out, c),
        Mode::Timeline => {
            crate::timeline::render(c, out)?;
            writeln!(out)
        }
        Mode::Events => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use std::borrow::Cow;
    use std::net::SocketAddrV6;

    use super::*;
    use crate::event::{TcpFlags, TcpState};
    use crate::matcher::{AnomalyKind, Close, EndReason, Open, Side, StateSpan, StepKind};

    /// Live events of both kinds, with every optional field present.
    fn events() -> [Event; 2] {
        let state = StateChange {
            ts_ns: 1_700_000_000_123_456_789,
            skaddr: 0xffff_8880_1234_5678,
            pid: 4242,
            comm: "curl".into(),
            family: Family::Ipv6,
            saddr: "2001:db8::1".parse().expect("literal"),
            sport: 40000,
            daddr: "2001:db8::2".parse().expect("literal"),
            dport: 80,
            oldstate: TcpState::Established,
            newstate: TcpState::FinWait1,
            prev_state_ns: 1_234_567,
            netns: 4026531840,
            bytes_acked: None,
            bytes_received: None,
        };
        let segment = Segment {
            ts_ns: 5_000_001_000,
            ifindex: 7,
            iface: Some("veth0".into()),
            dir: Dir::Egress,
            family: Family::Ipv4,
            saddr: "10.0.0.1".parse().expect("literal"),
            sport: 40000,
            daddr: "192.168.255.2".parse().expect("literal"),
            dport: 80,
            flags: TcpFlags(TcpFlags::FIN | TcpFlags::PSH | TcpFlags::ACK),
            seq: 100,
            ack: 200,
            win: 502,
            len: 10,
            options: TcpOptions {
                tsval: Some(1),
                tsecr: Some(2),
                ..TcpOptions::default()
            },
            netns: 4026532000,
        };
        [Event::State(state), Event::Segment(segment)]
    }

    fn written(f: impl Fn(&mut dyn Write, &Event) -> io::Result<()>) -> String {
        let mut v = Vec::new();
        for ev in &events() {
            f(&mut v, ev).expect("writing to a Vec");
        }
        String::from_utf8(v).expect("UTF-8")
    }

    #[test]
    fn json_lines_are_tagged_type_first() {
        assert_eq!(
            written(|out, ev| write_event_json(out, ev)),
            concat!(
                r#"{"type":"state","ts_ns":1700000000123456789,"skaddr":"0xffff888012345678","pid":4242,"comm":"curl","family":"ipv6","saddr":"2001:db8::1","sport":40000,"daddr":"2001:db8::2","dport":80,"oldstate":"ESTABLISHED","newstate":"FIN_WAIT1","prev_state_ns":1234567,"netns":4026531840}"#,
                "\n",
                r#"{"type":"segment","ts_ns":5000001000,"ifindex":7,"iface":"veth0","dir":"egress","family":"ipv4","saddr":"10.0.0.1","sport":40000,"daddr":"192.168.255.2","dport":80,"flags":"FP.","seq":100,"ack":200,"win":502,"len":10,"options":{"tsval":1,"tsecr":2},"netns":4026532000}"#,
                "\n"
            )
        );
    }

    /// The hand-written lines against the derived `Serialize` impls, over
    /// the variants the fixed-line test above does not show: a comm that
    /// needs escaping, no iface, capture direction, netns 0, every option.
    #[test]
    fn json_lines_match_serde() {
        let [Event::State(state), Event::Segment(segment)] = events() else {
            unreachable!()
        };
        let mut cases = vec![Event::State(state.clone()), Event::Segment(segment.clone())];
        // Each kind of name: to escape, multibyte, empty, a DEL, not UTF-8
        // (the kernel's bytes, replaced as serde's lossy path does), 16 bytes.
        let comms = ["a\"b\\c\n\u{1}", "é→", "", "a\u{7f}"].map(Comm::from);
        let raw = [&b"ab\xffc"[..], b"0123456789abcdefXYZ"].map(Comm::from_kernel);
        for comm in comms.into_iter().chain(raw) {
            cases.push(Event::State(StateChange {
                comm,
                saddr: "127.0.0.1".parse().expect("literal"),
                daddr: "0.0.0.0".parse().expect("literal"),
                oldstate: TcpState::Unknown(77),
                prev_state_ns: 0,
                ..state.clone()
            }));
        }
        // A → CLOSE with the socket's byte counters.
        cases.push(Event::State(StateChange {
            newstate: TcpState::Close,
            bytes_acked: Some(u64::MAX),
            bytes_received: Some(0),
            ..state.clone()
        }));
        for (iface, dir, netns) in [(None, Dir::Capture, 0), (Some("we\"ird"), Dir::Ingress, 1)] {
            cases.push(Event::Segment(Segment {
                iface: iface.map(Into::into),
                dir,
                netns,
                family: Family::Ipv6,
                saddr: "::ffff:10.0.0.1".parse().expect("literal"),
                daddr: "fe80::1".parse().expect("literal"),
                flags: TcpFlags(0),
                options: TcpOptions::default(),
                ..segment.clone()
            }));
        }
        cases.push(Event::Segment(Segment {
            options: TcpOptions {
                mss: Some(1460),
                wscale: Some(7),
                sack_ok: true,
                tsval: Some(u32::MAX),
                tsecr: Some(0),
            },
            ..segment
        }));
        for ev in &cases {
            let mut ours = Vec::new();
            write_event_json(&mut ours, ev).expect("writing to a Vec");
            let mut want = serde_json::to_vec(ev).expect("serialising");
            want.push(b'\n');
            assert_eq!(String::from_utf8(ours), String::from_utf8(want));
        }
    }

    #[test]
    fn event_lines_read_like_tcpstates_and_tcpdump() {
        let clock = Clock {
            offset_ns: 3_600_000_000_000,
        };
        assert_eq!(
            written(|out, ev| write_event_line(out, ev, &clock)),
            "23:13:20.123456    4242 curl            [2001:db8::1]:40000 → [2001:db8::2]:80  ESTABLISHED → FIN_WAIT1  (1.235 ms in ESTABLISHED)\n\
             01:00:05.000001 veth0 egress  IP 10.0.0.1.40000 > 192.168.255.2.80: Flags [FP.], seq 100:110, ack 200, win 502, options [TS val 1 ecr 2], length 10\n"
        );
    }

    /// The readable lines as `fmt` wrote them before they were assembled by
    /// hand: the reference the hand-written ones are held to.
    fn fmt_event_line(ev: &Event, clock: &Clock) -> String {
        let hms = |ts: u64| {
            let t = (ts as i128 + clock.offset_ns).max(0) as u128;
            let (s, us) = (t / 1_000_000_000, (t % 1_000_000_000) / 1000);
            format!(
                "{:02}:{:02}:{:02}.{:06}",
                (s / 3600) % 24,
                (s / 60) % 60,
                s % 60,
                us
            )
        };
        match ev {
            Event::State(s) => {
                let mut l = format!(
                    "{} {:>7} {:<15} {} → {}  {} → {}",
                    hms(s.ts_ns),
                    s.pid,
                    s.comm,
                    SocketAddr::new(s.saddr, s.sport),
                    SocketAddr::new(s.daddr, s.dport),
                    s.oldstate,
                    s.newstate,
                );
                if s.prev_state_ns > 0 {
                    l += &format!(
                        "  ({:.3} ms in {})",
                        s.prev_state_ns as f64 / 1e6,
                        s.oldstate
                    );
                }
                l + "\n"
            }
            Event::Segment(s) => {
                let ip = if s.saddr.is_ipv4() { "IP" } else { "IP6" };
                let mut l = format!(
                    "{} {} {:<7} {ip} {}.{} > {}.{}: Flags [{}], seq {}",
                    hms(s.ts_ns),
                    s.iface.as_deref().unwrap_or("-"),
                    dir_word(s),
                    s.saddr,
                    s.sport,
                    s.daddr,
                    s.dport,
                    s.flags,
                    s.seq
                );
                if s.len > 0 {
                    l += &format!(":{}", s.seq.wrapping_add(s.len));
                }
                if s.flags.ack() {
                    l += &format!(", ack {}", s.ack);
                }
                l += &format!(", win {}", s.win);
                if !s.options.is_empty() {
                    l += &format!(", options [{}]", s.options);
                }
                l + &format!(", length {}\n", s.len)
            }
        }
    }

    /// The hand-assembled readable lines read exactly as `fmt` wrote them:
    /// times around midnight and the epoch, pids and comms of every width
    /// (multi-byte and invalid UTF-8 included), milliseconds on and next to
    /// rounding boundaries (small and just under 2^53), IPv6, each flag and
    /// option combination.
    #[test]
    fn event_lines_match_fmt() {
        let [Event::State(state), Event::Segment(segment)] = events() else {
            unreachable!()
        };
        let clocks = [
            Clock::epoch(),
            Clock {
                offset_ns: 3_600_000_000_000,
            },
            Clock {
                offset_ns: -5_000_001_000,
            },
            Clock {
                offset_ns: 86_399_999_999_999,
            },
        ];
        let mut cases = Vec::new();
        let comms: [&[u8]; 6] = [
            b"",
            b"curl",
            b"fifteen-chars-x",
            b"sixteen-chars-xy",
            "h\u{e9}llo w\u{f6}rld".as_bytes(),
            b"bad\xff\xfeutf8",
        ];
        let ms: Vec<u64> = [
            0,
            1,
            499,
            500,
            501,
            999,
            1000,
            1499,
            1500,
            1501,
            2500,
            4500,
            999_499,
            999_500,
            999_999_500,
            1_234_567,
            (1 << 53) - 1,
            1 << 53,
            u64::MAX,
        ]
        .into_iter()
        // On every kind of rounding boundary (ns ending in 500) and next
        // to it, and the same just under 2^53, where the double's error is
        // largest.
        .chain((0..500).flat_map(|i| {
            let b = i * 7_919_000 + 500;
            [b - 1, b, b + 1]
        }))
        .chain((1..=200).flat_map(|k| {
            let b = (1u64 << 53) - k * 1000;
            [b - 501, b - 500, b - 499, b - 1]
        }))
        .collect();
        for (i, &ns) in ms.iter().enumerate() {
            let mut s = state.clone();
            s.prev_state_ns = ns;
            s.pid = [0, 7, 1_234_567, 12_345_678, u32::MAX][i % 5];
            s.comm = Comm::from_kernel(comms[i % comms.len()]);
            s.ts_ns = [0, 1, 86_399_999_999_999, ns, u64::MAX][i % 5];
            if i % 2 == 0 {
                (s.saddr, s.daddr) = (
                    "0.0.0.0".parse().expect("literal"),
                    "255.9.10.100".parse().expect("literal"),
                );
            }
            cases.push(Event::State(s));
        }
        for (i, len) in [0u32, 1, 1448, u32::MAX].into_iter().enumerate() {
            for flags in [
                0u8,
                TcpFlags::SYN,
                TcpFlags::SYN | TcpFlags::ACK,
                TcpFlags::ACK,
                TcpFlags::RST,
                0xff,
            ] {
                let mut s = segment.clone();
                s.len = len;
                s.seq = u32::MAX - i as u32;
                s.flags = TcpFlags(flags);
                s.iface = if i % 2 == 0 { None } else { s.iface };
                s.dir = [Dir::Ingress, Dir::Egress, Dir::Capture][(i + flags as usize) % 3];
                if i == 3 {
                    (s.saddr, s.daddr) = (
                        "::1".parse().expect("literal"),
                        "fe80::1:2".parse().expect("literal"),
                    );
                }
                if flags == TcpFlags::SYN {
                    s.options = TcpOptions {
                        mss: Some(1460),
                        wscale: Some(7),
                        sack_ok: true,
                        ..s.options
                    };
                }
                cases.push(Event::Segment(s));
            }
        }
        for clock in &clocks {
            for ev in &cases {
                let mut ours = Vec::new();
                write_event_line(&mut ours, ev, clock).expect("writing to a Vec");
                assert_eq!(
                    String::from_utf8(ours).expect("UTF-8"),
                    fmt_event_line(ev, clock)
                );
            }
        }
    }

    /// The hand-written event lines over the values whose formatting is
    /// hand-written: numbers at digit boundaries, IPv4 octets of every
    /// width, kernel addresses from 0 to all ones.
    #[test]
    fn event_json_numbers_and_addresses_match_serde() {
        let [Event::State(state), Event::Segment(segment)] = events() else {
            unreachable!()
        };
        let mut cases = Vec::new();
        for (i, sk) in [
            0,
            1,
            0xf,
            0x10,
            0xabc,
            u64::MAX,
            1 << 63,
            0x0123_4567_89ab_cdef,
        ]
        .into_iter()
        .enumerate()
        {
            let ip = |a: u8, b: u8| IpAddr::from([a, b, 0, 255]);
            cases.push(Event::State(StateChange {
                skaddr: sk,
                ts_ns: [0, 9, 10, 99, 100, 999, u64::MAX, 10u64.pow(19)][i],
                pid: [0, 1, 10, 4_294_967_295, 100, 1000, 12_345, 99_999][i],
                saddr: ip(i as u8 * 36, 255 - i as u8),
                daddr: ip(10 + i as u8, 100 + i as u8),
                prev_state_ns: 10u64.pow(i as u32 * 2) - 1,
                netns: u32::MAX - i as u32,
                bytes_acked: None,
                bytes_received: None,
                oldstate: TcpState::from_kernel(i as u8 * 2),
                newstate: TcpState::from_kernel(i as u8 * 2 + 1),
                ..state.clone()
            }));
        }
        for (sport, dport) in [(0, 65535), (9, 10), (99, 100), (999, 1000)] {
            cases.push(Event::Segment(Segment {
                sport,
                dport,
                seq: u32::MAX,
                ack: 0,
                win: u16::MAX,
                len: 1,
                ifindex: u32::MAX,
                flags: TcpFlags(sport as u8),
                ..segment.clone()
            }));
        }
        for ev in &cases {
            let mut ours = Vec::new();
            write_event_json(&mut ours, ev).expect("writing to a Vec");
            let mut want = serde_json::to_vec(ev).expect("serialising");
            want.push(b'\n');
            assert_eq!(String::from_utf8(ours), String::from_utf8(want));
        }
    }

    /// Fixed texts are remembered as plain only when they are, whatever
    /// else shares their slot.
    #[test]
    fn plain_texts_remember_only_what_needs_no_escaping() {
        const TEXTS: [&str; 6] = [
            "SYN",
            "a \"quoted\" word",
            "tab\there",
            "",
            "→ ok",
            "back\\slash",
        ];
        let mut p = PlainTexts::default();
        for _ in 0..3 {
            for t in TEXTS {
                assert_eq!(p.plain(t), !needs_escape(t), "{t:?}");
            }
        }
        assert!(p.plain("SYN") && p.plain("→ ok") && p.plain(""));
        assert!(!p.plain("a \"quoted\" word") && !p.plain("tab\there") && !p.plain("back\\slash"));
        // Every slot taken by one text, then each slot's text replaced by
        // one that needs escaping: none of those may pass as plain.
        let many: Vec<&'static str> = (0..2048)
            .map(|i| &*Box::leak(format!("t{i}").into_boxed_str()))
            .collect();
        for t in &many {
            assert!(p.plain(t));
        }
        let quoted: Vec<&'static str> = (0..2048)
            .map(|i| &*Box::leak(format!("\"{i}").into_boxed_str()))
            .collect();
        for t in &quoted {
            assert!(!p.plain(t), "{t}");
        }
    }

    /// Every octet value in every position (and every digit-count mix),
    /// as `Display` prints the address.
    #[test]
    fn ipv4_prints_as_display() {
        let edge = [0u8, 1, 9, 10, 42, 99, 100, 199, 254, 255];
        let mut addrs: Vec<Ipv4Addr> = (0..=255u8)
            .flat_map(|o| {
                (0..4).map(move |pos| {
                    let mut b = [7u8; 4];
                    b[pos] = o;
                    Ipv4Addr::from(b)
                })
            })
            .collect();
        for a in edge {
            for b in edge {
                for c in edge {
                    for d in edge {
                        addrs.push(Ipv4Addr::new(a, b, c, d));
                    }
                }
            }
        }
        let mut buf = Vec::new();
        for ip in addrs {
            let mut j = Json::new(&mut buf);
            j.ip(key!("a"), IpAddr::V4(ip));
            let len = j.pos;
            assert_eq!(
                std::str::from_utf8(&buf[..len]),
                Ok(format!(r#","a":"{ip}""#).as_str())
            );
            for port in [0, 1, 9, 10, 99, 100, 9999, 10000, 65535] {
                let addr = SocketAddr::from((ip, port));
                let mut j = Json::new(&mut buf);
                j.socket_addr(key!("a"), addr);
                let len = j.pos;
                assert_eq!(
                    std::str::from_utf8(&buf[..len]),
                    Ok(format!(r#","a":"{addr}""#).as_str())
                );
            }
        }
    }

    /// The `name()`s the JSON writers use for enums, against the derived
    /// `Serialize` (its `rename_all`), every variant.
    #[test]
    fn enum_names_match_serde() {
        fn check<T: serde::Serialize>(v: T, name: &str) {
            assert_eq!(
                serde_json::to_string(&v).expect("serialising"),
                format!("\"{name}\"")
            );
        }
        for v in [Family::Ipv4, Family::Ipv6] {
            check(v, v.name());
        }
        for v in [Dir::Ingress, Dir::Egress, Dir::Capture] {
            check(v, v.name());
        }
        for v in [Side::Client, Side::Server, Side::Both] {
            check(v, v.name());
        }
        for v in [
            Open::Active,
            Open::Passive,
            Open::Simultaneous,
            Open::Unknown,
        ] {
            check(v, v.name());
        }
        for v in [
            Close::FourSegment,
            Close::ThreeSegment,
            Close::Simultaneous,
            Close::Reset,
            Close::Unfinished,
        ] {
            check(v, v.name());
        }
        for v in [
            EndReason::Closed,
            EndReason::Superseded,
            EndReason::IdleTimeout,
            EndReason::Evicted,
            EndReason::EndOfInput,
        ] {
            check(v, v.name());
        }
        for v in [
            StepKind::Wire,
            StepKind::Kernel,
            StepKind::Data,
            StepKind::Inferred,
        ] {
            check(v, v.name());
        }
        for v in AnomalyKind::ALL {
            check(v, v.name());
        }
        for v in 0..=u8::MAX {
            check(TcpState::from_kernel(v), TcpState::from_kernel(v).name());
            check(TcpFlags(v), TcpFlags(v).tcpdump(&mut [0; 8]));
        }
    }

    /// A connection record with every part the matcher can fill in, and
    /// the optional ones both present and absent.
    fn full_connection() -> Connection {
        let v6 = |s: &str, port| SocketAddr::new(s.parse().expect("literal"), port);
        let mut wire = Step::new(1_000, StepKind::Wire, "SYN");
        wire.rule = Some(Cow::Borrowed("SYN seq=x"));
        wire.explain = Cow::Owned("x = 1: \"quoted\", back\\slash\ttab, é → ✓".into());
        wire.from = Some(Side::Client);
        wire.flags = Some(TcpFlags(TcpFlags::SYN | TcpFlags::ECE | TcpFlags::CWR));
        wire.seq = Some(u32::MAX);
        wire.ack = Some(0);
        wire.rel_seq = Some(0);
        wire.rel_ack = Some(1);
        wire.len = Some(0);
        wire.win = Some(u16::MAX);
        wire.options = Some(TcpOptions {
            mss: Some(1460),
            wscale: Some(0),
            sack_ok: true,
            tsval: Some(u32::MAX),
            tsecr: Some(0),
        });
        wire.retransmission = true;
        wire.observations = vec![
            Observation {
                netns: 4026531840,
                ifindex: 1,
                iface: Some("lo".into()),
                dir: Dir::Egress,
                ts_ns: 1_000,
            },
            Observation {
                netns: 0,
                ifindex: 7,
                iface: None,
                dir: Dir::Ingress,
                ts_ns: 1_001,
            },
        ];
        let mut bare = Step::new(2_000, StepKind::Wire, "ACK");
        bare.rel_ns = 1_000;
        bare.flags = Some(TcpFlags(0));
        bare.options = Some(TcpOptions::default());
        bare.observations = vec![Observation {
            netns: 1,
            ifindex: 2,
            iface: Some("we\"ird\n".into()),
            dir: Dir::Capture,
            ts_ns: 0,
        }];
        let mut kernel = Step::new(3_000, StepKind::Kernel, "SYN_SENT → ESTABLISHED");
        kernel.rel_ns = 2_000;
        kernel.side = Some(Side::Server);
        kernel.skaddr = Some(0);
        kernel.oldstate = Some(TcpState::SynSent);
        kernel.newstate = Some(TcpState::Unknown(99));
        kernel.in_state_ns = Some(0);
        kernel.pid = Some(u32::MAX);
        kernel.comm = Some("a\"b\\c\n\u{1}".into());
        kernel.netns = Some(4026531840);
        kernel.matched_step = Some(0);
        let mut data = Step::new(4_000, StepKind::Data, Cow::Owned("data".into()));
        data.end_ts_ns = Some(u64::MAX);
        data.segments = Some(10);
        data.bytes_client = Some(0);
        data.bytes_server = Some(1 << 40);
        data.retransmissions = Some(3);
        let mut inferred = Step::new(5_000, StepKind::Inferred, "TIME_WAIT (inferred)");
        inferred.side = Some(Side::Both);
        let mut full = Anomaly::new(AnomalyKind::Reset, "reset by the \"server\"");
        full.count = 2;
        full.side = Some(Side::Server);
        full.state = Some("SYN_RECV".into());
        full.ts_ns = Some(3_000);
        full.step = Some(4);
        Connection {
            record_type: "connection",
            client: v6("2001:db8::1", 40000),
            server: SocketAddr::V6(SocketAddrV6::new(
                "fe80::1".parse().expect("literal"),
                80,
                7,
                3,
            )),
            family: Family::Ipv6,
            netns: Some(4026531840),
            isn_client: Some(0),
            isn_server: Some(u32::MAX),
            handshake_rtt_ns: Some(20_000),
            handshake_rtt_server_ns: Some(1),
            bytes_client: Some(0),
            bytes_server: Some(700),
            open: Open::Simultaneous,
            close: Close::FourSegment,
            closed_by: Some(Side::Both),
            first_ts_ns: 1_000,
            last_ts_ns: 5_000,
            duration_ns: 4_000,
            end_reason: EndReason::EndOfInput,
            segments: 3,
            retransmissions: 1,
            views: Views {
                wire: true,
                kernel: true,
                live: true,
            },
            steps: vec![wire, bare, kernel, data, inferred],
            anomalies: vec![
                full,
                Anomaly::new(AnomalyKind::HandshakeUnfinished, ""),
                Anomaly::new(AnomalyKind::Truncated, "tab\there"),
            ],
            states: vec![
                SocketStates {
                    skaddr: 0xffff_8880_1234_5678,
                    side: Side::Client,
                    pid: 1,
                    comm: "curl".into(),
                    netns: 2,
                    states: vec![
                        StateSpan {
                            state: TcpState::SynSent,
                            ns: Some(8_800),
                        },
                        StateSpan {
                            state: TcpState::Close,
                            ns: None,
                        },
                    ],
                },
                SocketStates {
                    skaddr: 0x10,
                    side: Side::Both,
                    pid: 0,
                    comm: "é\"".into(),
                    netns: 0,
                    states: Vec::new(),
                },
            ],
            time_wait: Some(TimeWait {
                side: Side::Client,
                since_ts_ns: 5_000,
                rel_ns: 4_000,
                source: "wire \"quoted\"",
                expected_ns: 60_000_000_000,
                detail: "holds [2001:db8::1]:40000 ↔ [fe80::1%3]:80".into(),
            }),
        }
    }

    /// The hand-written connection line against the derived `Serialize`:
    /// every optional part present (IPv6 with a scope id, escaping in every
    /// kind of string), then absent or empty, then IPv4 and other variants.
    #[test]
    fn connection_json_matches_serde_in_every_part() {
        let full = full_connection();
        let bare = Connection {
            client: SocketAddr::from(([0, 0, 0, 0], 0)),
            server: SocketAddr::from(([255, 255, 255, 255], 65535)),
            family: Family::Ipv4,
            netns: None,
            isn_client: None,
            isn_server: None,
            handshake_rtt_ns: None,
            handshake_rtt_server_ns: None,
            bytes_client: None,
            bytes_server: None,
            open: Open::Unknown,
            close: Close::Unfinished,
            closed_by: None,
            end_reason: EndReason::IdleTimeout,
            views: Views::default(),
            steps: Vec::new(),
            anomalies: Vec::new(),
            states: Vec::new(),
            time_wait: None,
            ..full.clone()
        };
        let mut cases = vec![full.clone(), bare.clone()];
        for (i, (open, close)) in [
            (Open::Active, Close::ThreeSegment),
            (Open::Passive, Close::Simultaneous),
            (Open::Active, Close::Reset),
        ]
        .into_iter()
        .enumerate()
        {
            cases.push(Connection {
                client: SocketAddr::from(([10, 1, 22, 133], 20000 + i as u16)),
                server: SocketAddr::from(([127, 0, 0, 1], 80)),
                open,
                close,
                closed_by: Some([Side::Client, Side::Server, Side::Both][i]),
                end_reason: [EndReason::Closed, EndReason::Superseded, EndReason::Evicted][i],
                views: Views {
                    wire: i == 0,
                    kernel: i == 1,
                    live: i != 1,
                },
                steps: full.steps[i..i + 2].to_vec(),
                anomalies: full.anomalies[i..].to_vec(),
                states: full.states[i.min(1)..].to_vec(),
                ..bare.clone()
            });
        }
        // A line that outgrows the line buffer many times over, past what it
        // keeps between lines, followed by ordinary ones.
        cases.insert(
            0,
            Connection {
                steps: full.steps.iter().cycle().take(5000).cloned().collect(),
                ..full.clone()
            },
        );
        for c in &cases {
            let mut ours = Vec::new();
            connection(&mut ours, Mode::Json, c).expect("writing to a Vec");
            let want = serde_json::to_string(c).expect("serialising") + "\n";
            assert_eq!(String::from_utf8(ours).expect("UTF-8"), want);
        }
    }
}
