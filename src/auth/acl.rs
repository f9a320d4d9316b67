//! Access control lists in mosquitto's `acl_file` grammar: who may publish to, receive from
//! and subscribe to which topics.
//!
//! Owns: parsing the file (refused whole on any bad line), and the checks over the loaded,
//! immutable rules. Knows nothing of sessions, sockets or configuration: callers hand in a
//! user name, a client id and a topic or filter, and get a yes or no. Shared-subscription
//! prefixes are the caller's to strip.
//!
//! Grammar, one rule per line (blank lines and lines starting with `#` are ignored):
//!
//! ```text
//! topic [read|write|readwrite|deny] FILTER     # anonymous clients, or the current user
//! user NAME                                    # following topic lines are NAME's
//! pattern [read|write|readwrite|deny] FILTER   # every client; %u = user name, %c = client id
//! ```
//!
//! Rights: an action is allowed when some applicable entry grants it and no applicable `deny`
//! entry matches; with no matching entry, it is refused.

use std::collections::HashMap;
use std::path::Path;

use super::AuthFileError;
use crate::protocol::topic::valid_topic_filter;

/// What an entry grants, as written after `topic` or `pattern`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Access {
    Read,
    Write,
    ReadWrite,
    Deny,
}

/// One level of an entry's filter, split once at load so checks never re-parse text.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Level {
    Literal(Box<str>),
    /// `+`
    One,
    /// `#`, always last.
    Rest,
    /// `%u` in a pattern: exactly the client's user name.
    User,
    /// `%c` in a pattern: exactly the client's id.
    Client,
}

#[derive(Debug, Clone)]
struct Entry {
    levels: Box<[Level]>,
    /// Whether some level substitutes the user name / client id; such an entry is skipped for
    /// a client whose value cannot stand as one level.
    uses_user: bool,
    uses_client: bool,
}

/// Entries of one section, bucketed by what they decide so a check walks only the relevant
/// ones. A `readwrite` entry sits in both `read` and `write`.
#[derive(Debug, Default)]
struct Rules {
    read: Vec<Entry>,
    write: Vec<Entry>,
    deny: Vec<Entry>,
}

impl Rules {
    fn add(&mut self, access: Access, entry: Entry) {
        match access {
            Access::Read => self.read.push(entry),
            Access::Write => self.write.push(entry),
            Access::ReadWrite => {
                self.read.push(entry.clone());
                self.write.push(entry);
            }
            Access::Deny => self.deny.push(entry),
        }
    }
}

/// A parsed ACL file. Immutable; share it behind an `Arc` and swap the whole on reload.
#[derive(Debug, Default)]
pub struct Acl {
    /// `topic` lines before the first `user` line: for clients without a user name only.
    anonymous: Rules,
    /// `topic` lines under `user NAME`. Sections repeating a name add to it.
    users: HashMap<Box<str>, Rules>,
    /// `pattern` lines, wherever they appear: for every client.
    patterns: Rules,
}

/// The client a check is about, with what patterns may substitute for it. A value that is
/// empty or holds `/`, `+` or `#` could stand for no level or for several, letting one client
/// reach into another's tree (CVE-2017-7650); patterns using it then do not apply.
struct Who<'a> {
    user: Option<&'a str>,
    client: Option<&'a str>,
}

impl<'a> Who<'a> {
    fn new(username: Option<&'a str>, client_id: &'a str) -> Self {
        Who { user: username.filter(|u| one_level(u)), client: Some(client_id).filter(|c| one_level(c)) }
    }

    fn may_use(&self, entry: &Entry) -> bool {
        (!entry.uses_user || self.user.is_some()) && (!entry.uses_client || self.client.is_some())
    }

    /// Whether entry level `level` matches the concrete topic level `text`.
    fn level_is(&self, level: &Level, text: &str) -> bool {
        match level {
            Level::Literal(l) => **l == *text,
            Level::One | Level::Rest => true,
            Level::User => self.user == Some(text),
            Level::Client => self.client == Some(text),
        }
    }
}

fn one_level(s: &str) -> bool {
    !s.is_empty() && !s.bytes().any(|b| matches!(b, b'/' | b'+' | b'#'))
}

/// Which list of a section a check consults for its grant.
#[derive(Clone, Copy)]
enum Want {
    Read,
    Write,
}

impl Acl {
    /// Parses ACL text. `origin` names the source in errors (a path, or a test's name).
    pub fn parse(text: &str, origin: &str) -> Result<Acl, AuthFileError> {
        let mut acl = Acl::default();
        // None until the first `user` line: `topic` lines then belong to anonymous clients.
        let mut user: Option<Box<str>> = None;
        for (index, raw) in text.lines().enumerate() {
            let fail = |message: String| AuthFileError::Line { origin: origin.to_owned(), line: index + 1, message };
            let line = raw.trim_matches(|c: char| c.is_ascii_whitespace());
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let (keyword, rest) = split_word(line);
            match keyword {
                "user" => {
                    if rest.is_empty() {
                        return Err(fail("`user` without a name".to_owned()));
                    }
                    acl.users.entry(rest.into()).or_default();
                    user = Some(rest.into());
                }
                "topic" | "pattern" => {
                    let pattern = keyword == "pattern";
                    let (access, filter) = parse_rule(rest).map_err(&fail)?;
                    let entry = parse_filter(filter, pattern).map_err(&fail)?;
                    let rules = if pattern {
                        &mut acl.patterns
                    } else {
                        match &user {
                            None => &mut acl.anonymous,
                            Some(name) => acl.users.entry(name.clone()).or_default(),
                        }
                    };
                    rules.add(access, entry);
                }
                other => return Err(fail(format!("unknown keyword `{other}` (expected topic, pattern or user)"))),
            }
        }
        Ok(acl)
    }

    /// Reads and parses the file at `path`. Blocking: call it off the async runtime.
    pub fn load(path: &Path) -> Result<Acl, AuthFileError> {
        let text =
            std::fs::read_to_string(path).map_err(|source| AuthFileError::Io { path: path.to_path_buf(), source })?;
        Acl::parse(&text, &path.display().to_string())
    }

    /// Whether the client may publish to topic name `topic`.
    pub fn may_publish(&self, username: Option<&str>, client_id: &str, topic: &str) -> bool {
        self.check(username, client_id, Want::Write, |who, entry| matches_topic(who, entry, topic))
    }

    /// Whether a message on topic name `topic` may be delivered to the client.
    pub fn may_receive(&self, username: Option<&str>, client_id: &str, topic: &str) -> bool {
        self.check(username, client_id, Want::Read, |who, entry| matches_topic(who, entry, topic))
    }

    /// Whether the client may subscribe to `filter`, a plain filter (callers strip
    /// `$share/group/` first). Allowed when one readable entry covers every topic the filter
    /// can match and no deny entry covers all of them; a filter only partly denied is allowed,
    /// since each delivery is checked again with [`Acl::may_receive`].
    pub fn may_subscribe(&self, username: Option<&str>, client_id: &str, filter: &str) -> bool {
        self.check(username, client_id, Want::Read, |who, entry| covers(who, entry, filter))
    }

    /// The common decision: some applicable entry of the wanted kind hits, and no applicable
    /// deny entry does. `hits` is either topic matching or filter coverage.
    fn check(&self, username: Option<&str>, client_id: &str, want: Want, hits: impl Fn(&Who, &Entry) -> bool) -> bool {
        let who = Who::new(username, client_id);
        let section = match username {
            None => Some(&self.anonymous),
            Some(name) => self.users.get(name),
        };
        let sections = || section.into_iter().chain(std::iter::once(&self.patterns));
        let hit = |entries: &[Entry]| entries.iter().any(|e| who.may_use(e) && hits(&who, e));
        let granted = sections().any(|rules| {
            hit(match want {
                Want::Read => &rules.read,
                Want::Write => &rules.write,
            })
        });
        granted && !sections().any(|rules| hit(&rules.deny))
    }
}

/// Splits off the first word; the rest has its leading blanks removed.
fn split_word(s: &str) -> (&str, &str) {
    match s.split_once([' ', '\t']) {
        Some((word, rest)) => (word, rest.trim_start_matches([' ', '\t'])),
        None => (s, ""),
    }
}

/// `[read|write|readwrite|deny] FILTER` into its parts.
fn parse_rule(rest: &str) -> Result<(Access, &str), String> {
    let (first, after) = split_word(rest);
    let access = match first {
        "read" => Some(Access::Read),
        "write" => Some(Access::Write),
        "readwrite" => Some(Access::ReadWrite),
        "deny" => Some(Access::Deny),
        _ => None,
    };
    match (access, after.is_empty()) {
        (_, true) if first.is_empty() => Err("missing topic filter".to_owned()),
        // `topic deny` with the filter forgotten must not become readwrite on topic "deny".
        (Some(_), true) => Err(format!("missing topic filter after `{first}`")),
        (Some(access), false) => Ok((access, after)),
        (None, true) => Ok((Access::ReadWrite, first)),
        // Two words without an access keyword is a misspelt keyword far more often than a
        // filter with a space in it; taking it as a filter would turn the typo into a right.
        (None, false) => Err(format!("unknown access `{first}` (expected read, write, readwrite or deny)")),
    }
}

/// Validates `filter` and splits it into levels. In a pattern, `%u` and `%c` must each be a
/// whole level: inside a level they would let a value splice into a neighbouring name.
fn parse_filter(filter: &str, pattern: bool) -> Result<Entry, String> {
    if !valid_topic_filter(filter) {
        return Err(format!("invalid topic filter `{filter}`"));
    }
    let mut uses_user = false;
    let mut uses_client = false;
    let mut levels = Vec::new();
    for level in filter.split('/') {
        levels.push(match level {
            "+" => Level::One,
            "#" => Level::Rest,
            "%u" if pattern => {
                uses_user = true;
                Level::User
            }
            "%c" if pattern => {
                uses_client = true;
                Level::Client
            }
            _ if pattern && (level.contains("%u") || level.contains("%c")) => {
                return Err(format!("`%u` and `%c` must fill a whole level, not part of `{level}`"));
            }
            _ => Level::Literal(level.into()),
        });
    }
    Ok(Entry { levels: levels.into(), uses_user, uses_client })
}

/// Whether the entry's first level is fixed text. Only such entries reach `$` topics: a
/// wildcard or a substituted name must not let, say, a user called `$SYS` read `$SYS/#`.
fn literal_start(entry: &Entry) -> bool {
    matches!(entry.levels.first(), Some(Level::Literal(_)))
}

/// Whether topic name `topic` matches the entry.
fn matches_topic(who: &Who, entry: &Entry, topic: &str) -> bool {
    if topic.starts_with('$') && !literal_start(entry) {
        return false;
    }
    let mut topic_levels = topic.split('/');
    for level in entry.levels.iter() {
        if *level == Level::Rest {
            return true;
        }
        match topic_levels.next() {
            Some(text) if who.level_is(level, text) => {}
            _ => return false,
        }
    }
    topic_levels.next().is_none()
}

/// Whether every topic that `filter` can match is matched by the entry.
fn covers(who: &Who, entry: &Entry, filter: &str) -> bool {
    if filter.starts_with('$') && !literal_start(entry) {
        return false;
    }
    let mut filter_levels = filter.split('/');
    for (depth, level) in entry.levels.iter().enumerate() {
        if *level == Level::Rest {
            return true;
        }
        match filter_levels.next() {
            None => return false,
            // `#` as the whole filter matches every topic of one level or more (never a `$`
            // one), which `+/#` matches too. Deeper, `#` also matches the parent itself, which
            // only a `#` entry level (handled above) can match.
            Some("#") => return depth == 0 && entry.levels[1..] == [Level::Rest] && *level == Level::One,
            Some("+") => {
                if *level != Level::One {
                    return false;
                }
            }
            Some(text) => {
                if !who.level_is(level, text) {
                    return false;
                }
            }
        }
    }
    filter_levels.next().is_none()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn acl(text: &str) -> Acl {
        Acl::parse(text, "test").unwrap()
    }

    fn line_of(text: &str) -> usize {
        match Acl::parse(text, "origin.acl") {
            Err(AuthFileError::Line { origin, line, .. }) => {
                assert_eq!(origin, "origin.acl");
                line
            }
            other => panic!("{text:?} gave {other:?}"),
        }
    }

    #[test]
    fn access_kinds() {
        let a =
            acl("user u\ntopic read r/#\ntopic write w/#\ntopic readwrite rw/#\ntopic both/#\ntopic deny rw/secret\n");
        let u = Some("u");
        assert!(a.may_receive(u, "c", "r/x"));
        assert!(!a.may_publish(u, "c", "r/x"));
        assert!(a.may_publish(u, "c", "w/x"));
        assert!(!a.may_receive(u, "c", "w/x"));
        for t in ["rw/x", "both/x", "rw", "both"] {
            assert!(a.may_publish(u, "c", t), "{t}");
            assert!(a.may_receive(u, "c", t), "{t}");
        }
        assert!(!a.may_publish(u, "c", "rw/secret"));
        assert!(!a.may_receive(u, "c", "rw/secret"));
        assert!(a.may_publish(u, "c", "rw/secret/more"));
        assert!(!a.may_publish(u, "c", "other"));
    }

    #[test]
    fn anonymous_and_user_sections() {
        let a = acl("topic anon/#\nuser alice\ntopic alice/#\nuser bob smith\ntopic bob/#\nuser alice\ntopic more/#\n");
        assert!(a.may_publish(None, "c", "anon/x"));
        assert!(!a.may_publish(None, "c", "alice/x"));
        assert!(!a.may_publish(Some("alice"), "c", "anon/x"));
        assert!(a.may_publish(Some("alice"), "c", "alice/x"));
        assert!(a.may_publish(Some("alice"), "c", "more/x"), "a repeated section adds to the first");
        assert!(!a.may_publish(Some("alice"), "c", "bob/x"));
        assert!(a.may_publish(Some("bob smith"), "c", "bob/x"));
        assert!(!a.may_publish(Some("bob"), "c", "bob/x"));
        assert!(!a.may_publish(Some("carol"), "c", "anon/x"), "an unlisted user gets nothing");
    }

    #[test]
    fn patterns_substitute() {
        let a = acl("pattern readwrite users/%u/#\npattern read clients/%c\nuser alice\npattern write both/%u/%c\n");
        assert!(a.may_publish(Some("alice"), "c1", "users/alice/x"));
        assert!(a.may_publish(Some("alice"), "c1", "users/alice"));
        assert!(!a.may_publish(Some("alice"), "c1", "users/bob/x"));
        assert!(a.may_publish(Some("bob"), "c1", "users/bob/x"), "a pattern applies to every user");
        assert!(!a.may_publish(None, "c1", "users//x"), "no %u pattern for anonymous clients");
        assert!(a.may_receive(None, "c1", "clients/c1"));
        assert!(!a.may_publish(None, "c1", "clients/c1"));
        assert!(!a.may_receive(None, "c1", "clients/c2"));
        assert!(a.may_publish(Some("bob"), "c9", "both/bob/c9"));
        assert!(!a.may_publish(Some("bob"), "c9", "both/bob/c8"));
        // In a topic line, %u is plain text.
        let a = acl("topic t/%u\n");
        assert!(a.may_publish(None, "c", "t/%u"));
    }

    #[test]
    fn hostile_names_do_not_reach_other_trees() {
        let a = acl("pattern readwrite users/%u/#\npattern readwrite clients/%c/#\n");
        for name in ["+", "#", "a/b", ""] {
            let u = Some(name);
            assert!(!a.may_publish(u, "c", "users/alice/x"), "{name:?}");
            assert!(!a.may_receive(u, "c", "users/alice/x"), "{name:?}");
            assert!(!a.may_publish(u, "c", "users/a/b/x"), "{name:?}");
            assert!(!a.may_receive(u, "c", "users/a/b/x"), "{name:?}");
            assert!(!a.may_subscribe(u, "c", "users/alice/#"), "{name:?}");
            assert!(!a.may_publish(Some("u"), name, "clients/alice/x"), "{name:?}");
            assert!(!a.may_receive(Some("u"), name, "clients/a/b/x"), "{name:?}");
            // Only the patterns using the bad value are skipped.
            assert!(a.may_publish(u, "c", "clients/c/x"), "{name:?}");
        }
        assert!(a.may_publish(Some("a"), "c", "users/a/x"));
    }

    #[test]
    fn deny_wins() {
        let a = acl("pattern readwrite users/%u/#\nuser alice\ntopic deny users/alice/secret/#\ntopic readwrite x/#\npattern deny x/%c\n");
        let u = Some("alice");
        assert!(a.may_publish(u, "c", "users/alice/x"));
        assert!(!a.may_publish(u, "c", "users/alice/secret/x"));
        assert!(!a.may_receive(u, "c", "users/alice/secret"));
        assert!(a.may_publish(u, "c", "x/other"));
        assert!(!a.may_publish(u, "c", "x/c"), "a pattern deny beats a user-section grant");
        assert!(a.may_publish(Some("bob"), "c", "users/bob/secret/x"), "alice's deny is alice's");
    }

    #[test]
    fn empty_file_denies_everything() {
        for text in ["", "\n\n", "# nothing\n  # indented comment\n", "user alice\n"] {
            let a = acl(text);
            for u in [None, Some("alice")] {
                assert!(!a.may_publish(u, "c", "a"), "{text:?}");
                assert!(!a.may_receive(u, "c", "a"), "{text:?}");
                assert!(!a.may_subscribe(u, "c", "#"), "{text:?}");
            }
        }
    }

    #[test]
    fn dollar_topics() {
        let a = acl("topic #\ntopic +/x\npattern read %u/#\n");
        assert!(a.may_receive(None, "c", "a/b"));
        assert!(!a.may_receive(None, "c", "$SYS/broker"));
        assert!(!a.may_receive(None, "c", "$SYS/x"));
        assert!(!a.may_subscribe(None, "c", "$SYS/#"));
        assert!(!a.may_receive(Some("$SYS"), "c", "$SYS/broker"), "a substituted name is not a literal `$`");
        let a = acl("topic read $SYS/#\n");
        assert!(a.may_receive(None, "c", "$SYS/broker/uptime"));
        assert!(!a.may_publish(None, "c", "$SYS/broker/uptime"));
        assert!(a.may_subscribe(None, "c", "$SYS/#"));
        assert!(!a.may_subscribe(None, "c", "#"));
    }

    #[test]
    fn subscribe_coverage() {
        let cases: &[(&str, &str, bool)] = &[
            ("a/+", "a/b", true),
            ("a/+", "a/+", true),
            ("a/+", "a/#", false),
            ("a/+", "a", false),
            ("a/+", "a/b/c", false),
            ("a/#", "a/#", true),
            ("a/#", "a/b/+", true),
            ("a/#", "a", true),
            ("a/#", "a/b/#", true),
            ("a/#", "b/#", false),
            ("a/#", "+/b", false),
            ("#", "#", true),
            ("#", "+/+/#", true),
            ("#", "$SYS/#", false),
            ("+/#", "#", true),
            ("+/+/#", "#", false),
            ("a/+/#", "a/#", false),
            ("a", "a", true),
            ("a", "a/#", false),
            ("a", "+", false),
            ("$SYS/#", "$SYS/+", true),
        ];
        for &(entry, filter, want) in cases {
            let a = acl(&format!("topic read {entry}\n"));
            assert_eq!(a.may_subscribe(None, "c", filter), want, "entry {entry} filter {filter}");
            let w = acl(&format!("topic write {entry}\n"));
            assert!(!w.may_subscribe(None, "c", filter), "write-only {entry} {filter}");
        }
        let a = acl("pattern read users/%u/#\n");
        assert!(a.may_subscribe(Some("al"), "c", "users/al/#"));
        assert!(!a.may_subscribe(Some("al"), "c", "users/+/#"));
        assert!(!a.may_subscribe(Some("al"), "c", "users/#"));
    }

    #[test]
    fn subscribe_with_deny() {
        let a = acl("topic read a/#\ntopic deny a/secret/#\n");
        assert!(a.may_subscribe(None, "c", "a/#"), "partial overlap with a deny is allowed");
        assert!(!a.may_receive(None, "c", "a/secret/x"));
        assert!(!a.may_subscribe(None, "c", "a/secret/#"));
        assert!(!a.may_subscribe(None, "c", "a/secret/+"));
        assert!(a.may_subscribe(None, "c", "a/public/+"));
    }

    #[test]
    fn parse_errors_name_their_line() {
        let cases: &[(&str, usize)] = &[
            ("topic a\nbogus a\n", 2),
            ("# c\n\ntopic a/#/b\n", 3),
            ("topic a+\n", 1),
            ("topic\n", 1),
            ("topic read\n", 1),
            ("topic deny  \n", 1),
            ("pattern\n", 1),
            ("user\n", 1),
            ("user   \n", 1),
            ("topic raed a/b\n", 1),
            ("pattern read x/a%u\n", 1),
            ("pattern read %c%u/x\n", 1),
            ("topic a\ntopic a\ntopic READ x\n", 3),
            ("topicread x\n", 1),
            ("topic read \n", 1),
        ];
        for &(text, line) in cases {
            assert_eq!(line_of(text), line, "{text:?}");
        }
        let err = Acl::parse("\n\ntopic read a/#/b\n", "f.acl").unwrap_err().to_string();
        assert!(err.starts_with("f.acl:3: "), "{err}");
    }

    #[test]
    fn spaces_and_line_endings() {
        let a = acl("  topic read  a b/c d  \r\n\tuser  jo  doe \r\ntopic\twrite\tx y\r\n");
        assert!(a.may_receive(None, "c", "a b/c d"));
        assert!(!a.may_receive(None, "c", "a"));
        assert!(a.may_publish(Some("jo  doe"), "c", "x y"));
        let crlf = acl("user u\r\ntopic readwrite t/#\r\n# note\r\n");
        assert!(crlf.may_publish(Some("u"), "c", "t/x"));
        assert!(crlf.may_publish(Some("u"), "c", "t"));
    }

    #[test]
    fn load_reads_a_file_or_reports_io() {
        let dir = std::env::temp_dir().join(format!("tern-acl-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("acl");
        std::fs::write(&path, "topic read a\nuser u\ntopic nope/#/x\n").unwrap();
        match Acl::load(&path) {
            Err(AuthFileError::Line { origin, line: 3, .. }) => assert_eq!(origin, path.display().to_string()),
            other => panic!("{other:?}"),
        }
        std::fs::write(&path, "topic read a\n").unwrap();
        assert!(Acl::load(&path).unwrap().may_receive(None, "c", "a"));
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(matches!(Acl::load(&path), Err(AuthFileError::Io { .. })));
    }
}
