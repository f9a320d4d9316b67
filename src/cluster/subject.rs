//! MQTT topics and filters as NATS subjects, and back.
//!
//! A NATS subject is dot-separated tokens of printable ASCII without spaces, `*` or `>`
//! (wildcards), so an MQTT topic cannot be used as it is: its levels may hold dots, spaces,
//! `*`, `>`, any UTF-8, or be empty. Each level becomes one token in which `A-Z a-z 0-9 -`
//! pass through and every other byte is `_` and two upper-case hex digits; an empty level
//! is a lone `_`. The encoding is one-to-one (a `_` is always either alone or followed by
//! exactly two hex digits), so `decode(encode(t)) == t`, and a NATS wildcard stands for
//! exactly one MQTT level: `+` becomes `*`; a trailing `#` becomes both `<parent>` and
//! `<parent>.>` (MQTT's `a/#` matches `a` too, NATS's `a.>` does not).
//!
//! MQTT's rule that `#` and `+` at the first level do not match topics starting with `$` is
//! not NATS's: a node receiving through a wildcard matches the topic itself before
//! delivering (the broker's fan-out does).
//!
//! Owns only the text form; knows nothing of NATS connections.

use std::fmt::Write;

/// The token of an empty level.
const EMPTY: &str = "_";

fn passes(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'-'
}

/// Appends the token of one topic level.
fn push_level(out: &mut String, level: &str) {
    if level.is_empty() {
        out.push_str(EMPTY);
        return;
    }
    for &b in level.as_bytes() {
        if passes(b) {
            out.push(char::from(b));
        } else {
            // Writing to a String cannot fail.
            let _ = write!(out, "_{b:02X}");
        }
    }
}

/// `<prefix>.<tokens of topic>`.
pub fn encode(prefix: &str, topic: &str) -> String {
    let mut out = String::with_capacity(prefix.len() + 1 + topic.len() + topic.len() / 4);
    out.push_str(prefix);
    for level in topic.split('/') {
        out.push('.');
        push_level(&mut out, level);
    }
    out
}

/// The topic of a subject made by `encode(prefix, ..)`; None when it is not one.
pub fn decode(prefix: &str, subject: &str) -> Option<String> {
    let rest = subject.strip_prefix(prefix)?.strip_prefix('.')?;
    let mut topic = Vec::with_capacity(rest.len());
    for (i, token) in rest.split('.').enumerate() {
        if i > 0 {
            topic.push(b'/');
        }
        if token == EMPTY {
            continue;
        }
        if token.is_empty() {
            return None;
        }
        let mut bytes = token.bytes();
        while let Some(b) = bytes.next() {
            if passes(b) {
                topic.push(b);
            } else if b == b'_' {
                let hi = hex(bytes.next()?)?;
                let lo = hex(bytes.next()?)?;
                let byte = hi << 4 | lo;
                if passes(byte) {
                    return None; // never written so: a subject not of ours
                }
                topic.push(byte);
            } else {
                return None;
            }
        }
    }
    String::from_utf8(topic).ok()
}

fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// The NATS subjects (one or two) that together receive every topic an MQTT filter (not a
/// shared one) matches, under `prefix`.
pub fn filter_subjects(prefix: &str, filter: &str) -> Vec<String> {
    let mut out = String::with_capacity(prefix.len() + 1 + filter.len() + filter.len() / 4);
    out.push_str(prefix);
    let mut levels = filter.split('/').peekable();
    while let Some(level) = levels.next() {
        if level == "#" && levels.peek().is_none() {
            // `a/#` is `a` and everything below; a lone `#` is everything (`prefix.>`).
            let below = format!("{out}.>");
            return if out.len() == prefix.len() { vec![below] } else { vec![out, below] };
        }
        out.push('.');
        if level == "+" {
            out.push('*');
        } else {
            push_level(&mut out, level);
        }
    }
    vec![out]
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A small deterministic generator (xorshift): property-style cases without a crate.
    struct Gen(u64);
    impl Gen {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
        fn pick<'a>(&mut self, from: &[&'a str]) -> &'a str {
            from[(self.next() % from.len() as u64) as usize]
        }
    }

    const PIECES: &[&str] =
        &["a", "B", "0", "-", "_", ".", " ", "$", "*", ">", "é", "日本", "\u{1F600}", "_2E", "x_y", "", "%", "+a"];

    fn random_topic(g: &mut Gen) -> String {
        let levels = 1 + g.next() % 6;
        let mut t = String::new();
        for i in 0..levels {
            if i > 0 {
                t.push('/');
            }
            for _ in 0..g.next() % 4 {
                t.push_str(g.pick(PIECES));
            }
        }
        t
    }

    fn valid_subject(s: &str) -> bool {
        s.split('.').all(|t| !t.is_empty() && t.bytes().all(|b| b.is_ascii_graphic() && b != b'*' && b != b'>'))
    }

    #[test]
    fn topics_round_trip_and_make_valid_subjects() {
        let mut g = Gen(0x9E37_79B9_7F4A_7C15);
        for _ in 0..5_000 {
            let t = random_topic(&mut g);
            let s = encode("tern.m", &t);
            assert!(valid_subject(&s), "{t:?} -> {s:?}");
            assert_eq!(decode("tern.m", &s).as_deref(), Some(&*t), "{s:?}");
        }
        for t in ["a/b.c", "a b", "/", "//", "a//b", "$SYS/x", "*/>", "_", "__", "_41", "x/"] {
            let s = encode("p", t);
            assert!(valid_subject(&s), "{t:?} -> {s:?}");
            assert_eq!(decode("p", &s).as_deref(), Some(t));
        }
        assert_eq!(encode("p", "a/b.c/"), "p.a.b_2Ec._");
        assert_eq!(encode("p", "$x/_"), "p._24x._5F");
    }

    #[test]
    fn distinct_topics_give_distinct_subjects() {
        let mut g = Gen(42);
        let mut seen = std::collections::HashMap::new();
        for _ in 0..5_000 {
            let t = random_topic(&mut g);
            let s = encode("p", &t);
            if let Some(other) = seen.insert(s.clone(), t.clone()) {
                assert_eq!(other, t, "two topics share {s}");
            }
        }
    }

    #[test]
    fn the_longest_topic_round_trips() {
        let t: String = "a.é/".repeat(65_535 / 5 - 1) + "zzz";
        assert!(t.len() <= 65_535);
        let s = encode("tern.r", &t);
        assert!(valid_subject(&s));
        assert_eq!(decode("tern.r", &s), Some(t));
    }

    #[test]
    fn foreign_subjects_do_not_decode() {
        for s in ["other.a", "p", "p.", "p.a..b", "p._2", "p._zz", "p._41", "p.a*b"] {
            assert_eq!(decode("p", s), None, "{s}");
        }
    }

    /// NATS matching of a subject against a subscription subject.
    fn nats_matches(pattern: &str, subject: &str) -> bool {
        let mut p = pattern.split('.');
        let mut s = subject.split('.');
        loop {
            match (p.next(), s.next()) {
                (Some(">"), Some(_)) => return true,
                (Some("*"), Some(_)) => {}
                (Some(a), Some(b)) if a == b => {}
                (None, None) => return true,
                _ => return false,
            }
        }
    }

    #[test]
    fn filters_receive_exactly_what_they_match_but_for_dollar_topics() {
        let filters = ["#", "a/#", "+", "+/b", "a/+/c", "a/+", "+/+", "a/b.c/#", "/#", "+/", "$SYS/#", "a b/+"];
        let mut g = Gen(7);
        let mut topics: Vec<String> = (0..3_000).map(|_| random_topic(&mut g)).collect();
        topics.extend(["a", "a/b", "a/b/c", "a/x/c", "a/b.c", "a/b.c/d", "/", "$SYS/x", "a b/c"].map(String::from));
        for f in filters {
            let subjects = filter_subjects("p", f);
            for t in &topics {
                let subject = encode("p", t);
                let nats = subjects.iter().any(|p| nats_matches(p, &subject));
                let mqtt = crate::protocol::topic::matches(f, t);
                if t.starts_with('$') && !f.starts_with('$') {
                    // NATS wildcards also match `$` topics: the receiving node drops them.
                    assert!(!mqtt || nats, "{f} {t}");
                } else {
                    assert_eq!(nats, mqtt, "filter {f:?} ({subjects:?}) topic {t:?}");
                }
            }
        }
        assert_eq!(filter_subjects("p", "a/#"), ["p.a", "p.a.>"]);
        assert_eq!(filter_subjects("p", "#"), ["p.>"]);
        assert_eq!(filter_subjects("p", "+/x y"), ["p.*.x_20y"]);
    }
}
