//! containerd's filter syntax, as `List` receives it.
//!
//! ```text
//! filter    := selector ("," selector)*          all must match
//! selector  := fieldpath [operator value]        no operator: the field is present
//! fieldpath := field ("." field)*
//! field     := quoted | [A-Za-z_][A-Za-z0-9_]*
//! operator  := "==" | "!=" | "~="                ~= is a regular expression
//! value     := quoted | [^\s,]+
//! quoted    := Go string literal ("...") or /regexp/
//! ```
//! A request's filters are alternatives: a snapshot is listed if any matches,
//! and every snapshot is listed when there are none. containerd's garbage
//! collector lists with no filter; its remote-snapshot check lists with
//! `labels."containerd.io/snapshot.ref"==<chain id>,parent=="<parent>"`.

use regex::Regex;

#[derive(Debug)]
enum Op {
    Present,
    Equal(String),
    NotEqual(String),
    Matches(Regex),
}

#[derive(Debug)]
struct Selector {
    path: Vec<String>,
    op: Op,
}

/// One parsed filter: a conjunction of selectors.
#[derive(Debug)]
pub struct Filter(Vec<Selector>);

/// Several filters, any of which may match.
#[derive(Debug)]
pub struct Filters(Vec<Filter>);

/// What a filter looks at: a field's value by path, if the field exists.
pub trait Fields {
    fn field(&self, path: &[String]) -> Option<String>;
}

impl Filters {
    pub fn parse(filters: &[String]) -> Result<Filters, String> {
        // As containerd: an empty filter matches everything, so a list
        // holding one does too.
        if filters.iter().any(|f| f.trim().is_empty()) {
            return Ok(Filters(Vec::new()));
        }
        filters.iter().map(|f| Filter::parse(f)).collect::<Result<_, _>>().map(Filters)
    }

    pub fn matches(&self, item: &impl Fields) -> bool {
        self.0.is_empty() || self.0.iter().any(|f| f.matches(item))
    }
}

impl Filter {
    pub fn parse(input: &str) -> Result<Filter, String> {
        let mut p = Parser { s: input.as_bytes(), i: 0, input };
        let mut selectors = vec![p.selector()?];
        loop {
            p.skip_ws();
            if p.i == p.s.len() {
                return Ok(Filter(selectors));
            }
            p.expect(b',')?;
            selectors.push(p.selector()?);
        }
    }

    pub fn matches(&self, item: &impl Fields) -> bool {
        self.0.iter().all(|s| {
            let value = item.field(&s.path);
            match &s.op {
                Op::Present => value.is_some(),
                Op::Equal(v) => value.as_deref() == Some(v.as_str()),
                // As containerd: an absent field is the empty string here.
                Op::NotEqual(v) => value.as_deref().unwrap_or("") != v,
                Op::Matches(re) => re.is_match(value.as_deref().unwrap_or("")),
            }
        })
    }
}

struct Parser<'a> {
    s: &'a [u8],
    i: usize,
    input: &'a str,
}

impl Parser<'_> {
    fn err(&self, what: &str) -> String {
        format!("filter {:?}: {what} at offset {}", self.input, self.i)
    }
    fn skip_ws(&mut self) {
        while self.i < self.s.len() && self.s[self.i].is_ascii_whitespace() {
            self.i += 1;
        }
    }
    fn peek(&self) -> Option<u8> {
        self.s.get(self.i).copied()
    }
    fn expect(&mut self, c: u8) -> Result<(), String> {
        if self.peek() == Some(c) {
            self.i += 1;
            Ok(())
        } else {
            Err(self.err(&format!("expected {:?}", c as char)))
        }
    }

    fn selector(&mut self) -> Result<Selector, String> {
        self.skip_ws();
        let mut path = vec![self.field()?];
        while self.peek() == Some(b'.') {
            self.i += 1;
            path.push(self.field()?);
        }
        self.skip_ws();
        let op = match (self.peek(), self.s.get(self.i + 1)) {
            (Some(b'='), Some(b'=')) => 0,
            (Some(b'!'), Some(b'=')) => 1,
            (Some(b'~'), Some(b'=')) => 2,
            (None | Some(b','), _) => return Ok(Selector { path, op: Op::Present }),
            _ => return Err(self.err("expected an operator (==, != or ~=)")),
        };
        self.i += 2;
        self.skip_ws();
        let value = self.value()?;
        let op = match op {
            0 => Op::Equal(value),
            1 => Op::NotEqual(value),
            _ => Op::Matches(Regex::new(&value).map_err(|e| self.err(&format!("bad regular expression: {e}")))?),
        };
        Ok(Selector { path, op })
    }

    fn field(&mut self) -> Result<String, String> {
        match self.peek() {
            Some(b'"') | Some(b'/') => self.quoted(),
            Some(c) if c.is_ascii_alphabetic() || c == b'_' => {
                let start = self.i;
                while self.peek().is_some_and(|c| c.is_ascii_alphanumeric() || c == b'_') {
                    self.i += 1;
                }
                Ok(self.input[start..self.i].to_string())
            }
            _ => Err(self.err("expected a field name")),
        }
    }

    fn value(&mut self) -> Result<String, String> {
        match self.peek() {
            Some(b'"') | Some(b'/') => self.quoted(),
            _ => {
                let start = self.i;
                while self.peek().is_some_and(|c| !c.is_ascii_whitespace() && c != b',') {
                    self.i += 1;
                }
                if start == self.i {
                    return Err(self.err("expected a value"));
                }
                Ok(self.input[start..self.i].to_string())
            }
        }
    }

    /// A Go string literal, or `/.../` whose only escape is `\/`.
    fn quoted(&mut self) -> Result<String, String> {
        let delim = self.s[self.i];
        self.i += 1;
        let mut out = Vec::new();
        loop {
            let Some(c) = self.peek() else { return Err(self.err("unterminated quoted string")) };
            self.i += 1;
            if c == delim {
                return String::from_utf8(out).map_err(|_| self.err("quoted string is not UTF-8"));
            }
            if c != b'\\' {
                out.push(c);
                continue;
            }
            let Some(e) = self.peek() else { return Err(self.err("unterminated escape")) };
            self.i += 1;
            if delim == b'/' {
                if e != b'/' {
                    out.push(b'\\');
                }
                out.push(e);
                continue;
            }
            match e {
                b'"' | b'\\' | b'\'' => out.push(e),
                b'n' => out.push(b'\n'),
                b't' => out.push(b'\t'),
                b'r' => out.push(b'\r'),
                b'a' => out.push(7),
                b'b' => out.push(8),
                b'f' => out.push(12),
                b'v' => out.push(11),
                b'x' | b'u' | b'U' => {
                    let n = match e {
                        b'x' => 2,
                        b'u' => 4,
                        _ => 8,
                    };
                    let hex = self.input.get(self.i..self.i + n).ok_or_else(|| self.err("short escape"))?;
                    let v = u32::from_str_radix(hex, 16).map_err(|_| self.err("bad hex escape"))?;
                    self.i += n;
                    if e == b'x' {
                        out.push(v as u8);
                    } else {
                        let ch = char::from_u32(v).ok_or_else(|| self.err("bad unicode escape"))?;
                        out.extend_from_slice(ch.to_string().as_bytes());
                    }
                }
                _ => return Err(self.err(&format!("unknown escape \\{}", e as char))),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    struct Item(HashMap<&'static str, &'static str>);
    impl Fields for Item {
        fn field(&self, path: &[String]) -> Option<String> {
            self.0.get(path.join(".").as_str()).map(|s| s.to_string())
        }
    }

    fn item() -> Item {
        Item(HashMap::from([
            ("name", "sha256:abc"),
            ("parent", "default/3/sha256:def"),
            ("kind", "committed"),
            ("labels.containerd.io/snapshot.ref", "sha256:abc"),
        ]))
    }

    fn check(filters: &[&str]) -> bool {
        let f: Vec<String> = filters.iter().map(|s| s.to_string()).collect();
        Filters::parse(&f).unwrap().matches(&item())
    }

    #[test]
    fn containerd_remote_snapshot_check() {
        // As containerd 1.6's metadata snapshotter writes it (target unquoted).
        assert!(check(&[r#"labels."containerd.io/snapshot.ref"==sha256:abc,parent=="default/3/sha256:def""#]));
        assert!(!check(&[r#"labels."containerd.io/snapshot.ref"==sha256:abc,parent=="default/4/sha256:def""#]));
        assert!(!check(&[r#"labels."containerd.io/snapshot.ref"==sha256:xyz"#]));
    }

    #[test]
    fn operators_presence_and_alternatives() {
        assert!(check(&[]));
        assert!(check(&["kind==committed"]));
        assert!(check(&["kind!=active"]));
        assert!(check(&["labels.missing!=x"]));
        assert!(check(&[r#"labels."containerd.io/snapshot.ref""#]));
        assert!(!check(&["labels.missing"]));
        assert!(check(&["name~=^sha256:a"]));
        assert!(check(&[r"name~=/^sha256:[a-c]+$/"]));
        assert!(!check(&["name~=^x", "kind==active"]));
        assert!(check(&["name~=^x", "kind==committed"]));
        assert!(check(&["", "kind==active"]));
        assert!(check(&["labels.missing~=^$"]));
        assert!(check(&[r#" kind == "committed" , name=="sha256:\x61bc" "#]));
    }

    #[test]
    fn errors_say_where() {
        for bad in ["", "kind=", "kind==", "kind==\"x", "1abc==x", "kind==a b", "name~=(", "kind==a,"] {
            let r = Filter::parse(bad);
            assert!(r.is_err(), "{bad:?} parsed: {r:?}");
            assert!(r.unwrap_err().starts_with("filter "), "{bad:?}");
        }
    }
}
