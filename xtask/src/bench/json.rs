//! Just enough JSON for the bench report (xtask has no serde).
use std::fmt::{self, Display, Write as _};

pub enum J {
    Null,
    Bool(bool),
    U(u64),
    F(f64),
    S(String),
    A(Vec<J>),
    O(Vec<(String, J)>),
}

impl J {
    pub fn obj() -> J {
        J::O(Vec::new())
    }

    /// Adds a field (objects only) and returns self, for chaining.
    pub fn with(mut self, k: &str, v: impl Into<J>) -> J {
        if let J::O(f) = &mut self {
            f.push((k.to_string(), v.into()));
        }
        self
    }

    pub fn set(&mut self, k: &str, v: impl Into<J>) {
        if let J::O(f) = self {
            f.push((k.to_string(), v.into()));
        }
    }
}

impl From<u64> for J {
    fn from(v: u64) -> J {
        J::U(v)
    }
}
impl From<usize> for J {
    fn from(v: usize) -> J {
        J::U(v as u64)
    }
}
impl From<i64> for J {
    fn from(v: i64) -> J {
        if v >= 0 {
            J::U(v as u64)
        } else {
            J::F(v as f64)
        }
    }
}
impl From<f64> for J {
    fn from(v: f64) -> J {
        J::F(v)
    }
}
impl From<bool> for J {
    fn from(v: bool) -> J {
        J::Bool(v)
    }
}
impl From<&str> for J {
    fn from(v: &str) -> J {
        J::S(v.to_string())
    }
}
impl From<String> for J {
    fn from(v: String) -> J {
        J::S(v)
    }
}
impl<T: Into<J>> From<Option<T>> for J {
    fn from(v: Option<T>) -> J {
        v.map_or(J::Null, Into::into)
    }
}
impl<T: Into<J>> From<Vec<T>> for J {
    fn from(v: Vec<T>) -> J {
        J::A(v.into_iter().map(Into::into).collect())
    }
}

fn quote(f: &mut fmt::Formatter<'_>, s: &str) -> fmt::Result {
    f.write_char('"')?;
    for c in s.chars() {
        match c {
            '"' => f.write_str("\\\"")?,
            '\\' => f.write_str("\\\\")?,
            '\n' => f.write_str("\\n")?,
            c if (c as u32) < 0x20 => write!(f, "\\u{:04x}", c as u32)?,
            c => f.write_char(c)?,
        }
    }
    f.write_char('"')
}

impl Display for J {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            J::Null => f.write_str("null"),
            J::Bool(b) => write!(f, "{b}"),
            J::U(u) => write!(f, "{u}"),
            J::F(x) if x.is_finite() => write!(f, "{}", (x * 1e6).round() / 1e6),
            J::F(_) => f.write_str("null"),
            J::S(s) => quote(f, s),
            J::A(a) => {
                f.write_char('[')?;
                for (i, v) in a.iter().enumerate() {
                    if i > 0 {
                        f.write_char(',')?;
                    }
                    write!(f, "{v}")?;
                }
                f.write_char(']')
            }
            J::O(o) => {
                f.write_char('{')?;
                for (i, (k, v)) in o.iter().enumerate() {
                    if i > 0 {
                        f.write_char(',')?;
                    }
                    quote(f, k)?;
                    write!(f, ":{v}")?;
                }
                f.write_char('}')
            }
        }
    }
}

/// The number after `"key":` in a flat JSON line (no nesting needed here).
pub fn field_u64(line: &str, key: &str) -> Option<u64> {
    let pat = format!("\"{key}\":");
    let i = line.find(&pat)? + pat.len();
    let rest = line[i..].trim_start();
    let end = rest
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(rest.len());
    rest[..end].parse().ok()
}

pub fn field_f64(line: &str, key: &str) -> Option<f64> {
    let pat = format!("\"{key}\":");
    let i = line.find(&pat)? + pat.len();
    let rest = line[i..].trim_start();
    let end = rest
        .find(|c: char| !(c.is_ascii_digit() || "+-.eE".contains(c)))
        .unwrap_or(rest.len());
    rest[..end].parse().ok()
}

/// The string after `"key":"` (no escapes in the values we read).
pub fn field_str<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    let pat = format!("\"{key}\":\"");
    let i = line.find(&pat)? + pat.len();
    let end = line[i..].find('"')?;
    Some(&line[i..i + end])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_and_output() {
        let l = r#"{"events":12,"lost":0,"type":"summary","x":1.5,"s":"ab"}"#;
        assert_eq!(field_u64(l, "events"), Some(12));
        assert_eq!(field_u64(l, "lost"), Some(0));
        assert_eq!(field_f64(l, "x"), Some(1.5));
        assert_eq!(field_str(l, "type"), Some("summary"));
        assert_eq!(field_u64(l, "nope"), None);
        let j = J::obj()
            .with("a", 1u64)
            .with("b", "q\"")
            .with("c", vec![0.5f64])
            .with("d", None::<u64>);
        assert_eq!(j.to_string(), r#"{"a":1,"b":"q\"","c":[0.5],"d":null}"#);
    }
}
