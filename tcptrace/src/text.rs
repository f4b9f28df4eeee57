//! Text assembled without `fmt`: the JSON writer's numbers, and the
//! explanations the matcher writes for every connection. `format!` goes
//! through a formatter for every piece; for the wire steps' explanations
//! ("y = 2739126410: the server accepts, …") that was an eighth of what
//! `tcptrace pcap --json` cost, two fifths of the analysis.
use std::cell::RefCell;
use std::io::{self, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};

/// `v` in decimal, left-aligned in `d`; returns the number of digits.
pub fn decimal(mut v: u64, d: &mut [u8; 20]) -> usize {
    /// "00", "01", …, "99": two digits per division.
    const PAIRS: [u8; 200] = {
        let mut t = [0; 200];
        let mut i = 0;
        while i < 100 {
            t[2 * i] = b'0' + (i / 10) as u8;
            t[2 * i + 1] = b'0' + (i % 10) as u8;
            i += 1;
        }
        t
    };
    let n = digits(v);
    let mut i = n;
    while v >= 100 {
        let r = (v % 100) as usize * 2;
        v /= 100;
        i -= 2;
        d[i..i + 2].copy_from_slice(&PAIRS[r..r + 2]);
    }
    if v >= 10 {
        let r = v as usize * 2;
        d[..2].copy_from_slice(&PAIRS[r..r + 2]);
    } else {
        d[0] = b'0' + v as u8;
    }
    n
}

/// How many decimal digits `v` has (1 for 0): a guess from its bit length,
/// corrected by one compare (`ilog10` takes a chain of them).
#[inline(always)]
fn digits(v: u64) -> usize {
    /// Powers of ten, 10^0 to 10^19.
    const POW10: [u64; 20] = {
        let mut t = [1u64; 20];
        let mut i = 1;
        while i < 20 {
            t[i] = t[i - 1] * 10;
            i += 1;
        }
        t
    };
    // 1233/4096 is just under log10(2), so bits * 1233 >> 12 is never
    // more than v's digit count and at most one less: one compare with the
    // next power of ten settles it.
    let v = v | 1;
    let bits = 64 - v.leading_zeros() as usize;
    let guess = (bits * 1233) >> 12;
    guess + usize::from(v >= POW10[guess])
}

/// `ip` as `Display` prints it, left-aligned in `d`; returns its length.
pub fn ipv4(ip: Ipv4Addr, d: &mut [u8; 16]) -> usize {
    /// Each octet's digits followed by a dot, and how many digits: an
    /// octet is one 4-byte copy, without a division or a branch.
    const OCTETS: [([u8; 4], u8); 256] = {
        let mut t = [([0; 4], 0); 256];
        let mut i = 0;
        while i < 256 {
            let (h, te, o) = ((i / 100) as u8, (i / 10 % 10) as u8, (i % 10) as u8);
            t[i] = if i >= 100 {
                ([b'0' + h, b'0' + te, b'0' + o, b'.'], 3)
            } else if i >= 10 {
                ([b'0' + te, b'0' + o, b'.', 0], 2)
            } else {
                ([b'0' + o, b'.', 0, 0], 1)
            };
            i += 1;
        }
        t
    };
    // 16 bytes: the last octet's copy writes a dot past the end.
    let mut len = 0;
    for octet in ip.octets() {
        let (digits, n) = OCTETS[usize::from(octet)];
        d[len..len + 4].copy_from_slice(&digits);
        len += usize::from(n) + 1;
    }
    len - 1
}

/// `v` in decimal, right-aligned in `width` columns filled with `fill`
/// (as `{:>width$}` with ' ', `{:0width$}` with '0').
pub fn padded(t: &mut String, v: u64, width: usize, fill: char) {
    let mut d = [0; 20];
    let n = decimal(v, &mut d);
    for _ in n..width {
        t.push(fill);
    }
    t.push_str(std::str::from_utf8(&d[..n]).unwrap_or_default());
}

/// `s` left-aligned in `width` characters (as `{:<width$}`: characters,
/// not bytes).
pub fn left_aligned(t: &mut String, s: &str, width: usize) {
    t.push_str(s);
    for _ in s.chars().count()..width {
        t.push(' ');
    }
}

thread_local! {
    /// The text being assembled; see [`with_text`].
    static TEXT: RefCell<String> = const { RefCell::new(String::new()) };
}

/// Assembles a text in this thread's reused buffer (no allocation per line)
/// and hands it to `out` with one `write_all`, so that it reaches the
/// writer whole.
pub fn with_text<W: Write + ?Sized>(
    out: &mut W,
    build: impl FnOnce(&mut String),
) -> io::Result<()> {
    TEXT.with_borrow_mut(|t| {
        t.clear();
        build(t);
        let res = out.write_all(t.as_bytes());
        // A rare huge timeline gives its memory back.
        if t.capacity() > 1 << 20 {
            *t = String::new();
        }
        res
    })
}

/// `format!` for texts made of string pieces and unsigned numbers (see
/// [`Piece`]), in one `String` sized up front:
/// `text!["y = ", seq, ": the server accepts"]`.
macro_rules! text {
    ($($piece:expr),+ $(,)?) => {{
        let mut t = String::with_capacity(160);
        $( $crate::text::Piece::append(&$piece, &mut t); )+
        t
    }};
}
pub(crate) use text;

/// What [`text!`] appends: as `Display` prints it.
pub trait Piece {
    fn append(&self, t: &mut String);
}

impl Piece for &str {
    fn append(&self, t: &mut String) {
        t.push_str(self);
    }
}

impl Piece for String {
    fn append(&self, t: &mut String) {
        t.push_str(self);
    }
}

impl Piece for u64 {
    fn append(&self, t: &mut String) {
        let mut d = [0; 20];
        let n = decimal(*self, &mut d);
        t.push_str(std::str::from_utf8(&d[..n]).unwrap_or_default());
    }
}

impl Piece for u32 {
    fn append(&self, t: &mut String) {
        u64::from(*self).append(t);
    }
}

impl Piece for usize {
    fn append(&self, t: &mut String) {
        (*self as u64).append(t);
    }
}

/// As `Display` prints it; IPv4 without the formatter.
impl Piece for IpAddr {
    fn append(&self, t: &mut String) {
        match self {
            IpAddr::V4(a) => {
                let mut d = [0; 16];
                let n = ipv4(*a, &mut d);
                t.push_str(std::str::from_utf8(&d[..n]).unwrap_or_default());
            }
            IpAddr::V6(_) => {
                use std::fmt::Write as _;
                let _ = write!(t, "{self}");
            }
        }
    }
}

/// As `Display` prints it. IPv4 is written piece by piece: nearly every
/// connection's TIME_WAIT detail names both ends, and `Display` goes
/// through the formatter for each octet and the port.
impl Piece for SocketAddr {
    fn append(&self, t: &mut String) {
        let SocketAddr::V4(a) = self else {
            use std::fmt::Write as _;
            let _ = write!(t, "{self}");
            return;
        };
        IpAddr::V4(*a.ip()).append(t);
        t.push(':');
        u64::from(a.port()).append(t);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decimal_prints_as_display() {
        let mut values = vec![0, u64::MAX, u64::MAX - 1];
        for p in 0..20 {
            let t = 10u64.pow(p);
            values.extend([t - 1, t, t + 1]);
            values.extend(t.checked_mul(5).map(|f| f + 3));
        }
        for b in 0..64 {
            values.extend([1u64 << b, (1u64 << b) - 1]);
        }
        for v in values {
            let mut d = [0; 20];
            let n = decimal(v, &mut d);
            assert_eq!(std::str::from_utf8(&d[..n]), Ok(v.to_string().as_str()));
        }
    }

    #[test]
    fn text_reads_as_format() {
        let (seq, n, who) = (2_739_126_410u32, 3usize, "server");
        let addr: SocketAddr = "[2001:db8::1]:443".parse().unwrap();
        assert_eq!(
            text![
                "y = ",
                seq,
                ": the ",
                who,
                " sent ",
                n,
                " to ",
                addr,
                "",
                u64::MAX
            ],
            format!("y = {seq}: the {who} sent {n} to {addr}{}", u64::MAX)
        );
        assert_eq!(text![String::from("only")], "only");
    }

    #[test]
    fn socket_addresses_read_as_display() {
        for a in [
            "0.0.0.0:0",
            "127.0.0.1:80",
            "10.20.255.9:54321",
            "255.255.255.255:65535",
            "[2001:db8::1]:443",
            "[::ffff:1.2.3.4]:8080",
        ] {
            let a: SocketAddr = a.parse().expect("literal");
            assert_eq!(text![a], a.to_string());
        }
    }
}
