//! What the connection records of a run add up to, for the closing summary
//! of a live run, of `tcptrace pcap` and of the demo: how connections
//! closed, what went wrong, bytes each way, handshake RTTs.
use std::collections::BTreeMap;

use serde_json::{json, Map, Value};

use crate::matcher::{AnomalyKind, Close, Connection, Side};

/// Counts by kind are arrays indexed by the kinds' declaration order: a
/// connection's record costs a few additions, not map lookups.
#[derive(Clone, Debug, Default)]
pub struct Tally {
    pub connections: u64,
    closes: [u64; Close::ALL.len()],
    closed_by: [u64; Side::ALL.len()],
    anomalies: [u64; AnomalyKind::ALL.len()],
    pub bytes_client: u64,
    pub bytes_server: u64,
    rtts: Rtts,
}

/// The kinds counted, by name, in name order (as JSON objects list them).
fn by_name<K: Copy>(
    all: &[K],
    counts: &[u64],
    name: impl Fn(K) -> &'static str,
) -> BTreeMap<&'static str, u64> {
    all.iter()
        .zip(counts)
        .filter(|(_, &n)| n > 0)
        .map(|(&k, &n)| (name(k), n))
        .collect()
}

/// Handshake RTTs (SYN → SYN-ACK at the client), in ns.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Quantiles {
    pub min: u64,
    pub median: u64,
    pub p99: u64,
    pub max: u64,
}

impl Tally {
    pub fn add(&mut self, c: &Connection) {
        self.connections += 1;
        if let Some(r) = c.handshake_rtt_ns {
            self.rtts.add(r);
        }
        // `get_mut`: a kind missing from its `ALL` list goes uncounted here
        // rather than panic (the test below checks the lists).
        if let Some(n) = self.closes.get_mut(c.close as usize) {
            *n += 1;
        }
        if let Some(n) = c.closed_by.and_then(|s| self.closed_by.get_mut(s as usize)) {
            *n += 1;
        }
        for a in &c.anomalies {
            if let Some(n) = self.anomalies.get_mut(a.kind as usize) {
                *n += u64::from(a.count);
            }
        }
        self.bytes_client += c.bytes_client.unwrap_or(0);
        self.bytes_server += c.bytes_server.unwrap_or(0);
    }

    /// Anomalies of one kind, over all connections.
    pub fn anomalies_of(&self, kind: AnomalyKind) -> u64 {
        self.anomalies.get(kind as usize).copied().unwrap_or(0)
    }

    pub fn rtt(&self) -> Option<Quantiles> {
        self.rtts.quantiles()
    }

    fn closes(&self) -> BTreeMap<&'static str, u64> {
        by_name(&Close::ALL, &self.closes, Close::name)
    }

    fn closed_by(&self) -> BTreeMap<&'static str, u64> {
        by_name(&Side::ALL, &self.closed_by, Side::name)
    }

    fn anomalies(&self) -> BTreeMap<&'static str, u64> {
        by_name(&AnomalyKind::ALL, &self.anomalies, AnomalyKind::name)
    }

    /// For people: "N connections", then [`Tally::lines`].
    pub fn text(&self) -> String {
        let n = self.connections;
        format!(
            "{n} connection{}\n{}",
            if n == 1 { "" } else { "s" },
            self.lines()
        )
    }

    /// Indented lines for people: RTTs, closes, bytes, anomalies.
    pub fn lines(&self) -> String {
        let mut s = String::new();
        match self.rtt() {
            Some(q) => s.push_str(&format!(
                "  handshake RTT (SYN → SYN-ACK at the client): min {}, median {}, p99 {}, max {}{}\n",
                dur(q.min),
                dur(q.median),
                dur(q.p99),
                dur(q.max),
                if self.rtts.n > SAMPLE as u64 {
                    format!(" (median and p99 of a sample of {SAMPLE} of the {} measured)", self.rtts.n)
                } else {
                    String::new()
                }
            )),
            None => s.push_str("  handshake RTT: none measured\n"),
        }
        let list = |m: &BTreeMap<&str, u64>| {
            m.iter()
                .map(|(k, v)| format!("{v} {k}"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let (closes, closed_by, anomalies) = (self.closes(), self.closed_by(), self.anomalies());
        let by = if closed_by.is_empty() {
            String::new()
        } else {
            format!(" (closed by: {})", list(&closed_by))
        };
        let closes = if closes.is_empty() {
            "none".to_string()
        } else {
            list(&closes)
        };
        s.push_str(&format!("  closes: {closes}{by}\n"));
        s.push_str(&format!(
            "  bytes: {} B from the client, {} B from the server\n",
            self.bytes_client, self.bytes_server
        ));
        let anomalies = if anomalies.is_empty() {
            "none".to_string()
        } else {
            list(&anomalies)
        };
        s.push_str(&format!("  anomalies: {anomalies}\n"));
        s
    }

    /// The same as JSON fields: `connections`, `handshake_rtt_ns` (`min`,
    /// `median`, `p99`, `max`, or null), `close`, `closed_by`,
    /// `anomalies` (counts by name), `bytes_client`, `bytes_server`.
    pub fn json_fields(&self, o: &mut Map<String, Value>) {
        o.insert("connections".into(), json!(self.connections));
        o.insert(
            "handshake_rtt_ns".into(),
            self.rtt().map_or(
                Value::Null,
                |q| json!({"min": q.min, "median": q.median, "p99": q.p99, "max": q.max}),
            ),
        );
        o.insert("close".into(), json!(self.closes()));
        o.insert("closed_by".into(), json!(self.closed_by()));
        o.insert("anomalies".into(), json!(self.anomalies()));
        o.insert("bytes_client".into(), json!(self.bytes_client));
        o.insert("bytes_server".into(), json!(self.bytes_server));
    }
}

/// RTTs kept for their quantiles: all of them up to `SAMPLE`, then a
/// uniform sample of that many (reservoir sampling), so a run of millions
/// of connections keeps a few hundred KiB; min and max are always exact.
#[derive(Clone, Debug, Default)]
struct Rtts {
    n: u64,
    min: u64,
    max: u64,
    sample: Vec<u64>,
    rng: u64,
}

const SAMPLE: usize = 65_536;

impl Rtts {
    fn add(&mut self, v: u64) {
        self.n += 1;
        (self.min, self.max) = if self.n == 1 {
            (v, v)
        } else {
            (self.min.min(v), self.max.max(v))
        };
        if self.sample.len() < SAMPLE {
            self.sample.push(v);
            return;
        }
        // xorshift64: the sample needs no cryptographic randomness.
        if self.rng == 0 {
            self.rng = 0x9e37_79b9_7f4a_7c15;
        }
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        let j = self.rng % self.n;
        if let Some(slot) = usize::try_from(j).ok().and_then(|j| self.sample.get_mut(j)) {
            *slot = v;
        }
    }

    fn quantiles(&self) -> Option<Quantiles> {
        let mut v = self.sample.clone();
        v.sort_unstable();
        let n = v.len();
        let median = match n {
            0 => return None,
            _ if n % 2 == 1 => v[n / 2],
            // Sorted, so no overflow: a capture's RTT can be near u64::MAX.
            _ => v[n / 2 - 1] + (v[n / 2] - v[n / 2 - 1]) / 2,
        };
        // The smallest value with at least 99 % of the sample at or below it.
        let p99 = v[(n * 99).div_ceil(100) - 1];
        Some(Quantiles {
            min: self.min,
            median,
            p99,
            max: self.max,
        })
    }
}

pub fn dur(ns: u64) -> String {
    if ns < 1_000_000 {
        format!("{} µs", ns / 1000)
    } else {
        format!("{:.3} ms", ns as f64 / 1e6)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The arrays are indexed by `kind as usize`: the lists must be in
    /// declaration order.
    #[test]
    fn kind_lists_are_in_declaration_order() {
        for (i, k) in AnomalyKind::ALL.iter().enumerate() {
            assert_eq!(*k as usize, i, "{k:?}");
        }
        for (i, k) in Close::ALL.iter().enumerate() {
            assert_eq!(*k as usize, i, "{k:?}");
        }
        for (i, k) in Side::ALL.iter().enumerate() {
            assert_eq!(*k as usize, i, "{k:?}");
        }
    }

    fn rtts(values: impl IntoIterator<Item = u64>) -> Option<Quantiles> {
        let mut r = Rtts::default();
        for v in values {
            r.add(v);
        }
        r.quantiles()
    }

    #[test]
    fn quantiles_of_small_and_large_runs() {
        assert_eq!(rtts([]), None);
        let q = |min, median, p99, max| {
            Some(Quantiles {
                min,
                median,
                p99,
                max,
            })
        };
        assert_eq!(rtts([5]), q(5, 5, 5, 5));
        assert_eq!(rtts([4, 1, 3]), q(1, 3, 4, 4));
        assert_eq!(rtts([4, 1, 3, 2]), q(1, 2, 4, 4));
        assert_eq!(rtts(1..=100), q(1, 50, 99, 100));
        // Past the sample: memory stays bounded, min and max stay exact,
        // the median of a uniform sample stays near the true one.
        let mut r = Rtts::default();
        for v in 0..1_000_000u64 {
            r.add(v % 1000 + 1);
        }
        assert_eq!(r.sample.len(), SAMPLE);
        let got = r.quantiles().expect("some");
        assert_eq!((got.min, got.max), (1, 1000));
        assert!((450..=550).contains(&got.median), "{got:?}");
        assert!((970..=1000).contains(&got.p99), "{got:?}");
    }
}
