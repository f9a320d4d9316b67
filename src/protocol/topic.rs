//! Topic names and topic filters (section 4.7) and shared subscriptions (4.8.2).
//!
//! Owns: what counts as a valid name or filter, how a `$share` filter splits, and the
//! reference matcher the subscription index is tested against. Works on `&str`: the UTF-8
//! rules for the bytes are the decoder's business.

/// A topic name a PUBLISH (or will) may carry: non-empty, no wildcard characters
/// ([MQTT-4.7.3-1], [MQTT-3.3.2-2]).
pub fn valid_topic_name(s: &str) -> bool {
    !s.is_empty() && !s.bytes().any(|b| b == b'+' || b == b'#')
}

/// A topic filter: non-empty; `#` only as the whole last level ([MQTT-4.7.1-1]); `+` only as
/// a whole level ([MQTT-4.7.1-2]).
pub fn valid_topic_filter(s: &str) -> bool {
    if s.is_empty() {
        return false;
    }
    let mut levels = s.split('/').peekable();
    while let Some(level) = levels.next() {
        let last = levels.peek().is_none();
        let ok = match level {
            "#" => last,
            "+" => true,
            _ => !level.bytes().any(|b| b == b'+' || b == b'#'),
        };
        if !ok {
            return false;
        }
    }
    true
}

/// Whether `filter` is meant as a shared subscription (starts with `$share/`), well formed
/// or not.
pub fn is_shared(filter: &str) -> bool {
    filter.starts_with("$share/")
}

/// Splits `$share/{group}/{filter}` into `(group, filter)`. `None` for filters that are not
/// shared and for malformed shared ones (empty group, group with `+` or `#`, missing or
/// invalid filter, [MQTT-4.8.2-1], [MQTT-4.8.2-2]); use [`is_shared`] to tell them apart.
pub fn parse_shared(filter: &str) -> Option<(&str, &str)> {
    let rest = filter.strip_prefix("$share/")?;
    let (group, f) = rest.split_once('/')?;
    let group_ok = !group.is_empty() && !group.bytes().any(|b| b == b'+' || b == b'#');
    (group_ok && valid_topic_filter(f)).then_some((group, f))
}

/// Reference matcher: whether topic name `topic` matches `filter`. `+` matches one level,
/// `#` the rest including the parent level (`a/#` matches `a`), and topics starting with `$`
/// are never matched by a filter starting with a wildcard ([MQTT-4.7.2-1]). Assumes valid
/// arguments; for shared subscriptions pass the filter part. The tries are tested against it,
/// and `[[priority]]` filters (a handful, checked per published message) use it.
pub fn matches(filter: &str, topic: &str) -> bool {
    if topic.starts_with('$') && (filter.starts_with('+') || filter.starts_with('#')) {
        return false;
    }
    let mut f = filter.split('/');
    let mut t = topic.split('/');
    loop {
        match (f.next(), t.next()) {
            (Some("#"), _) => return true,
            (Some("+"), Some(_)) => {}
            (Some(fl), Some(tl)) if fl == tl => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        for ok in ["a", "/", "a/b", "//", "$SYS/x", " ", "a b/c"] {
            assert!(valid_topic_name(ok), "{ok}");
        }
        for bad in ["", "+", "#", "a/+", "a#", "sport/#"] {
            assert!(!valid_topic_name(bad), "{bad}");
        }
        assert!(valid_topic_name(&"/".repeat(65_535)));
    }

    #[test]
    fn filters() {
        for ok in ["a", "#", "+", "/", "a/#", "+/+", "/+", "+/", "a/+/b/#", "$SYS/#", "//#"] {
            assert!(valid_topic_filter(ok), "{ok}");
        }
        for bad in ["", "a/#/b", "a+", "a#", "#/a", "+a/b", "a/b#", "##", "++"] {
            assert!(!valid_topic_filter(bad), "{bad}");
        }
    }

    #[test]
    fn shared() {
        assert_eq!(parse_shared("$share/g/f"), Some(("g", "f")));
        assert_eq!(parse_shared("$share/g/a/+/#"), Some(("g", "a/+/#")));
        assert_eq!(parse_shared("$share/g//"), Some(("g", "/")));
        assert_eq!(parse_shared("a/b"), None);
        assert!(!is_shared("a/b"));
        assert!(!is_shared("$share"));
        for bad in ["$share/", "$share//f", "$share/g", "$share/g/", "$share/g+/f", "$share/#/f", "$share/g/a/#/b"] {
            assert!(is_shared(bad), "{bad}");
            assert_eq!(parse_shared(bad), None, "{bad}");
        }
    }

    #[test]
    fn matching() {
        let yes = [
            ("a", "a"),
            ("a/+", "a/b"),
            ("a/+", "a/"),
            ("+/b", "/b"),
            ("a/#", "a"),
            ("a/#", "a/b/c"),
            ("#", "a/b"),
            ("#", "/"),
            ("+/+", "/"),
            ("+", "a"),
            ("$SYS/#", "$SYS/x"),
            ("$SYS/+", "$SYS/x"),
            ("a/+/c", "a/b/c"),
        ];
        for (f, t) in yes {
            assert!(matches(f, t), "{f} {t}");
        }
        let no = [
            ("a", "b"),
            ("a", "a/b"),
            ("a/b", "a"),
            ("a/+", "a"),
            ("a/+", "a/b/c"),
            ("+", "/a"),
            ("#", "$SYS/x"),
            ("+/x", "$SYS/x"),
            ("#", "$"),
            ("a/#", "b"),
            ("a/+/c", "a/b/d"),
        ];
        for (f, t) in no {
            assert!(!matches(f, t), "{f} {t}");
        }
    }
}
