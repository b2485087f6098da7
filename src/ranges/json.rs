//! The few JSON values a state record holds, parsed strictly: objects,
//! arrays, non-negative integers and plain strings. Records are written by
//! us, but anyone who can write the state directory can put anything there,
//! so the parser bounds its depth and never panics.

use std::fmt;

/// A parsed value. Only what records use; anything else is an error.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Value {
    Object(Vec<(String, Value)>),
    Array(Vec<Value>),
    Number(u64),
    String(String),
}

/// Where and why parsing failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ParseError {
    pub offset: usize,
    pub expected: &'static str,
}

impl fmt::Display for ParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "not valid JSON at byte {}: expected {}",
            self.offset, self.expected
        )
    }
}

const MAX_DEPTH: usize = 8;

pub(crate) fn parse(text: &[u8]) -> Result<Value, ParseError> {
    let mut p = Parser { text, pos: 0 };
    let v = p.value(0)?;
    p.skip_ws();
    if p.pos != text.len() {
        return Err(p.error("the end of the text"));
    }
    Ok(v)
}

struct Parser<'a> {
    text: &'a [u8],
    pos: usize,
}

impl Parser<'_> {
    fn error(&self, expected: &'static str) -> ParseError {
        ParseError {
            offset: self.pos,
            expected,
        }
    }

    fn peek(&self) -> Option<u8> {
        self.text.get(self.pos).copied()
    }

    fn skip_ws(&mut self) {
        while matches!(self.peek(), Some(b' ' | b'\t' | b'\n' | b'\r')) {
            self.pos += 1;
        }
    }

    fn eat(&mut self, b: u8, expected: &'static str) -> Result<(), ParseError> {
        self.skip_ws();
        if self.peek() == Some(b) {
            self.pos += 1;
            Ok(())
        } else {
            Err(self.error(expected))
        }
    }

    fn value(&mut self, depth: usize) -> Result<Value, ParseError> {
        if depth > MAX_DEPTH {
            return Err(self.error("less nesting"));
        }
        self.skip_ws();
        match self.peek() {
            Some(b'{') => self.object(depth),
            Some(b'[') => self.array(depth),
            Some(b'"') => self.string().map(Value::String),
            Some(b'0'..=b'9') => self.number(),
            _ => Err(self.error("an object, array, string or non-negative integer")),
        }
    }

    fn object(&mut self, depth: usize) -> Result<Value, ParseError> {
        self.pos += 1;
        let mut members: Vec<(String, Value)> = Vec::new();
        self.skip_ws();
        if self.peek() == Some(b'}') {
            self.pos += 1;
            return Ok(Value::Object(members));
        }
        loop {
            self.skip_ws();
            if self.peek() != Some(b'"') {
                return Err(self.error("a member name"));
            }
            let at = self.pos;
            let name = self.string()?;
            if members.iter().any(|(n, _)| *n == name) {
                return Err(ParseError {
                    offset: at,
                    expected: "no duplicate member names",
                });
            }
            self.eat(b':', "':'")?;
            let v = self.value(depth + 1)?;
            members.push((name, v));
            self.skip_ws();
            match self.peek() {
                Some(b',') => self.pos += 1,
                Some(b'}') => {
                    self.pos += 1;
                    return Ok(Value::Object(members));
                }
                _ => return Err(self.error("',' or '}'")),
            }
        }
    }

    fn array(&mut self, depth: usize) -> Result<Value, ParseError> {
        self.pos += 1;
        let mut items = Vec::new();
        self.skip_ws();
        if self.peek() == Some(b']') {
            self.pos += 1;
            return Ok(Value::Array(items));
        }
        loop {
            items.push(self.value(depth + 1)?);
            self.skip_ws();
            match self.peek() {
                Some(b',') => self.pos += 1,
                Some(b']') => {
                    self.pos += 1;
                    return Ok(Value::Array(items));
                }
                _ => return Err(self.error("',' or ']'")),
            }
        }
    }

    /// A string without escapes (record member names need none).
    fn string(&mut self) -> Result<String, ParseError> {
        self.pos += 1;
        let start = self.pos;
        loop {
            match self.peek() {
                Some(b'"') => break,
                Some(b'\\') => return Err(self.error("a string without escapes")),
                Some(c) if c < 0x20 => return Err(self.error("no control character in a string")),
                Some(_) => self.pos += 1,
                None => return Err(self.error("the end of the string")),
            }
        }
        let s = std::str::from_utf8(&self.text[start..self.pos])
            .map_err(|_| ParseError {
                offset: start,
                expected: "UTF-8",
            })?
            .to_owned();
        self.pos += 1;
        Ok(s)
    }

    fn number(&mut self) -> Result<Value, ParseError> {
        let start = self.pos;
        let mut n: u64 = 0;
        while let Some(c @ b'0'..=b'9') = self.peek() {
            n = n
                .checked_mul(10)
                .and_then(|n| n.checked_add(u64::from(c - b'0')))
                .ok_or(ParseError {
                    offset: start,
                    expected: "a number below 2^64",
                })?;
            self.pos += 1;
        }
        if self.pos - start > 1 && self.text[start] == b'0' {
            return Err(ParseError {
                offset: start,
                expected: "no leading zero",
            });
        }
        if matches!(self.peek(), Some(b'.' | b'e' | b'E')) {
            return Err(self.error("an integer"));
        }
        Ok(Value::Number(n))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_records_and_refuses_the_rest() {
        let v = parse(br#" {"a":[{"b":1,"c":"x"}], "d": 0 }"#).unwrap();
        assert_eq!(
            v,
            Value::Object(vec![
                (
                    "a".into(),
                    Value::Array(vec![Value::Object(vec![
                        ("b".into(), Value::Number(1)),
                        ("c".into(), Value::String("x".into()))
                    ])])
                ),
                ("d".into(), Value::Number(0)),
            ])
        );
        for bad in [
            &b""[..],
            b"{",
            b"{\"a\":1,}",
            b"{\"a\":1,\"a\":2}",
            b"[1 2]",
            b"-1",
            b"1.5",
            b"01",
            b"99999999999999999999999",
            b"\"\\n\"",
            b"{} x",
            b"[[[[[[[[[[[[1]]]]]]]]]]]]",
            b"\"\xff\"",
            b"true",
        ] {
            assert!(parse(bad).is_err(), "{:?}", String::from_utf8_lossy(bad));
        }
    }

    #[test]
    fn never_panics_on_arbitrary_input() {
        // JSON-ish bytes in random order and lengths, from a fixed seed.
        let alphabet = b"{}[]\":,0123456789 \\\nabcxyz-.e\xff";
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        for _ in 0..20_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let len = (x % 40) as usize;
            let text: Vec<u8> = (0..len)
                .map(|i| alphabet[((x >> (i % 48)) as usize + i) % alphabet.len()])
                .collect();
            let _ = parse(&text);
        }
        // Deep nesting is refused, not recursed into without bound.
        let deep = "[".repeat(100_000);
        assert!(parse(deep.as_bytes()).is_err());
    }
}
