//! The subscription trie: one node per topic level, `+` and `#` stored as ordinary level
//! names, so a PUBLISH visits only the branches its levels can match instead of scanning
//! every filter. Subscribing and unsubscribing cost the filter's levels, not the number of
//! clients on the same filter.
//!
//! Sized for fleets of devices, each subscribed to its own topic: a node is 24 bytes
//! (children behind one pointer, see `children`), and the one subscription such a node holds
//! is kept inline in it, without the client name or a list around it.

use std::collections::HashMap;
use std::fmt;
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicUsize, Ordering};

use bytestring::ByteString;

use super::{descend_mut, dismantle, prune, split_level, Children, TrieNode};
use crate::protocol::SubscriptionOptions;

/// What the trie needs of whatever it delivers to: the client it stands for, which is what a
/// subscription is looked up by (one per client and filter). Asked of the target rather than
/// stored with each subscription, which would cost every one of them 32 bytes.
pub trait Subscriber: Clone {
    fn client(&self) -> &ByteString;
}

/// One subscription of one client, as given to `subscribe` and returned by `matches`.
#[derive(Debug, Clone)]
pub struct Entry<T> {
    /// The target's client (`Subscriber::client`).
    pub client: ByteString,
    pub target: T,
    pub options: SubscriptionOptions,
    pub subscription_id: Option<u32>,
    /// The full `$share/group/filter` of a shared subscription; None for a plain one.
    pub share: Option<ByteString>,
}

/// What a node keeps of one subscription: its client comes from the target, and a shared
/// subscription's full filter from its group. 16 bytes with a pointer-sized target.
#[derive(Clone)]
struct Stored<T> {
    target: T,
    options: SubscriptionOptions,
    /// Identifiers are never 0 (the decoder refuses one), which leaves `Option` a niche
    /// instead of a 4-byte tag.
    subscription_id: Option<NonZeroU32>,
}

// Inline: both run for every subscriber a publish reaches.
impl<T: Subscriber> Stored<T> {
    #[inline]
    fn client(&self) -> &ByteString {
        self.target.client()
    }

    #[inline]
    fn lend<'a>(&'a self, share: Option<&'a ByteString>) -> Match<'a, T> {
        Match { target: &self.target, options: self.options, subscription_id: self.subscription_id, share }
    }
}

/// One subscription matching a topic, borrowed from the trie (`visit_matches`).
pub struct Match<'a, T> {
    pub target: &'a T,
    pub options: SubscriptionOptions,
    pub subscription_id: Option<NonZeroU32>,
    /// The full `$share/group/filter` of a shared subscription; None for a plain one.
    pub share: Option<&'a ByteString>,
}

impl<T: Subscriber> Match<'_, T> {
    /// An owned copy.
    pub fn entry(&self) -> Entry<T> {
        Entry {
            client: self.target.client().clone(),
            target: self.target.clone(),
            options: self.options,
            subscription_id: self.subscription_id.map(NonZeroU32::get),
            share: self.share.cloned(),
        }
    }
}

impl<T> From<Entry<T>> for Stored<T> {
    fn from(e: Entry<T>) -> Self {
        Stored { target: e.target, options: e.options, subscription_id: e.subscription_id.and_then(NonZeroU32::new) }
    }
}

struct SharedGroup<T> {
    name: Box<str>,
    /// `$share/<name>/<filter>`, which every delivery of the group carries.
    share: ByteString,
    members: Members<T>,
    /// Round-robin cursor; atomic so matching can advance it under a read lock.
    next: AtomicUsize,
}

/// From this many subscriptions on one node (or in one shared group) on, a client's entry is
/// found through a map: when 100,000 clients subscribe to one filter, each subscribe and
/// unsubscribe would otherwise scan them all under the index's write lock. Below it a scan
/// is cheaper than a map, and most nodes hold one or two.
const INDEX_FROM: usize = 16;

/// The subscriptions of one node, or the members of one shared group: a list to deliver to
/// (shared groups pick from it by position) that can also be looked up by client.
struct Members<T> {
    list: Vec<Stored<T>>,
    /// Client -> position in `list`; kept only while `list` holds `INDEX_FROM` or more.
    index: HashMap<ByteString, usize>,
}

impl<T> Default for Members<T> {
    fn default() -> Self {
        Members { list: Vec::new(), index: HashMap::new() }
    }
}

impl<T: Subscriber> Members<T> {
    fn indexed(&self) -> bool {
        self.list.len() >= INDEX_FROM
    }

    fn position(&self, client: &str) -> Option<usize> {
        if self.indexed() {
            self.index.get(client).copied()
        } else {
            self.list.iter().position(|e| e.client() == client)
        }
    }

    /// Adds or replaces the client's entry; true when it replaced one.
    fn put(&mut self, entry: Stored<T>) -> bool {
        if let Some(slot) = self.position(entry.client()).and_then(|i| self.list.get_mut(i)) {
            *slot = entry;
            return true;
        }
        if self.indexed() {
            self.index.insert(entry.client().clone(), self.list.len());
        }
        self.list.push(entry);
        if self.list.len() == INDEX_FROM {
            self.index = self.list.iter().enumerate().map(|(i, e)| (e.client().clone(), i)).collect();
        }
        false
    }

    /// Removes the client's entry; true when there was one. The last entry takes its place,
    /// so the order of the list is not kept (nothing depends on it).
    fn remove(&mut self, client: &str) -> bool {
        let Some(i) = self.position(client) else { return false };
        let was_indexed = self.indexed();
        self.list.swap_remove(i);
        if was_indexed {
            if !self.indexed() {
                self.index = HashMap::new();
            } else {
                self.index.remove(client);
                if let Some(moved) = self.list.get(i) {
                    self.index.insert(moved.client().clone(), i);
                }
            }
        }
        true
    }
}

/// The subscriptions held by one node.
enum Subscribers<T> {
    None,
    /// One plain subscription and no shared group, inline: the usual case (a device's own
    /// command topic), which needs no list.
    One(Stored<T>),
    /// Anything more; boxed so that nodes without it stay small.
    Many(Box<Crowd<T>>),
}

struct Crowd<T> {
    plain: Members<T>,
    shared: Vec<SharedGroup<T>>,
}

impl<T: Subscriber> Subscribers<T> {
    /// The node's subscriptions as a crowd, turning a single one into a list of one.
    fn crowd(&mut self) -> &mut Crowd<T> {
        if !matches!(self, Subscribers::Many(_)) {
            let mut plain = Members::default();
            if let Subscribers::One(s) = std::mem::replace(self, Subscribers::None) {
                plain.list.push(s);
            }
            *self = Subscribers::Many(Box::new(Crowd { plain, shared: Vec::new() }));
        }
        match self {
            Subscribers::Many(c) => c,
            Subscribers::None | Subscribers::One(_) => unreachable!("made a crowd just above"),
        }
    }

    /// Back to the smallest form after a removal: a crowd down to one plain subscription and
    /// no group holds it inline again, an empty one nothing.
    fn settle(&mut self) {
        let Subscribers::Many(c) = self else { return };
        c.shared.retain(|g| !g.members.list.is_empty());
        if !c.shared.is_empty() || c.plain.list.len() > 1 {
            return;
        }
        *self = match c.plain.list.pop() {
            Some(s) => Subscribers::One(s),
            None => Subscribers::None,
        };
    }
}

struct Node<T> {
    children: Children<Node<T>>,
    subscribers: Subscribers<T>,
}

impl<T> Default for Node<T> {
    fn default() -> Self {
        Node { children: Children::default(), subscribers: Subscribers::None }
    }
}

impl<T> Node<T> {
    fn is_empty(&self) -> bool {
        self.children.is_empty() && self.bare()
    }
}

impl<T> TrieNode for Node<T> {
    fn children(&self) -> &Children<Self> {
        &self.children
    }

    fn children_mut(&mut self) -> &mut Children<Self> {
        &mut self.children
    }

    fn bare(&self) -> bool {
        matches!(self.subscribers, Subscribers::None)
    }
}

impl<T> Drop for Node<T> {
    fn drop(&mut self) {
        dismantle(self);
    }
}

/// Filters to subscribers. `T` is whatever the caller delivers to (a session handle).
pub struct SubscriptionTrie<T> {
    root: Node<T>,
    count: usize,
}

impl<T> Default for SubscriptionTrie<T> {
    fn default() -> Self {
        SubscriptionTrie { root: Node::default(), count: 0 }
    }
}

/// A summary: printing every node would recurse once per level.
impl<T> fmt::Debug for SubscriptionTrie<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SubscriptionTrie").field("subscriptions", &self.count).finish_non_exhaustive()
    }
}

impl<T: Subscriber> SubscriptionTrie<T> {
    pub fn new() -> Self {
        Self::default()
    }

    /// Number of subscriptions held.
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.count
    }

    /// Adds or replaces the client's subscription to `filter` (in `group` when shared).
    /// Returns true when it replaced an existing one. `entry.client` must be its target's
    /// client, and `entry.share` (when shared) `$share/<group>/<filter>`: the trie keeps
    /// neither, it finds them again from the target and the group.
    pub fn subscribe(&mut self, filter: &str, group: Option<&str>, entry: Entry<T>) -> bool {
        debug_assert_eq!(&entry.client, entry.target.client());
        let mut node = &mut self.root;
        let mut rest = Some(filter);
        while let Some(s) = rest {
            let (head, tail) = split_level(s);
            node = node.children.get_or_default(head);
            rest = tail;
        }
        let replaced = match group {
            None => match &mut node.subscribers {
                slot @ Subscribers::None => {
                    *slot = Subscribers::One(entry.into());
                    false
                }
                Subscribers::One(one) if one.client() == &entry.client => {
                    *one = entry.into();
                    true
                }
                subscribers => subscribers.crowd().plain.put(entry.into()),
            },
            Some(g) => {
                let crowd = node.subscribers.crowd();
                let idx = match crowd.shared.iter().position(|sg| &*sg.name == g) {
                    Some(i) => i,
                    None => {
                        // Copied: the caller's string may be a slice of a client's read
                        // buffer, which the group would keep alive.
                        let share = match entry.share.as_deref() {
                            Some(s) => ByteString::from(s),
                            None => format!("$share/{g}/{filter}").into(),
                        };
                        crowd.shared.push(SharedGroup {
                            name: g.into(),
                            share,
                            members: Members::default(),
                            next: AtomicUsize::new(0),
                        });
                        crowd.shared.len() - 1
                    }
                };
                crowd.shared[idx].members.put(entry.into())
            }
        };
        if !replaced {
            self.count += 1;
        }
        replaced
    }

    /// Removes the client's subscription; returns whether it existed.
    pub fn unsubscribe(&mut self, filter: &str, group: Option<&str>, client: &str) -> bool {
        let Some(node) = descend_mut(&mut self.root, filter) else {
            return false;
        };
        let removed = match (&mut node.subscribers, group) {
            (Subscribers::None, _) => false,
            (subscribers @ Subscribers::One(_), None) => {
                let mine = matches!(subscribers, Subscribers::One(one) if one.client() == client);
                if mine {
                    *subscribers = Subscribers::None;
                }
                mine
            }
            (Subscribers::One(_), Some(_)) => false,
            (Subscribers::Many(crowd), None) => crowd.plain.remove(client),
            (Subscribers::Many(crowd), Some(g)) => match crowd.shared.iter_mut().find(|sg| &*sg.name == g) {
                Some(sg) => sg.members.remove(client),
                None => false,
            },
        };
        node.subscribers.settle();
        if node.is_empty() {
            prune(&mut self.root, filter);
        }
        if removed {
            self.count -= 1;
        }
        removed
    }

    /// Every subscription matching `topic`: all non-shared ones, and one member of each shared
    /// group (round-robin). A client may appear several times; merging is the caller's choice.
    /// Owned copies, for tests; the broker borrows with `visit_matches`.
    #[cfg(test)]
    pub fn matches(&self, topic: &str, out: &mut Vec<Entry<T>>) {
        self.visit_matches(topic, |m| out.push(m.entry()));
    }

    /// `matches` without copies: each matching subscription is lent to `f`, which takes only
    /// what it needs (the publish path keeps a target and its options, not client names).
    pub fn visit_matches<'a>(&'a self, topic: &str, mut f: impl FnMut(Match<'a, T>)) {
        // [MQTT-4.7.2-1] a leading wildcard never matches a topic starting with '$'.
        let dollar = topic.starts_with('$');
        // Depth first with the pending branches on the heap; `+` is pushed last so it is
        // walked before the literal level, as the recursive walk did.
        // Each level leaves at most one branch waiting, so this holds one frame per level.
        let mut stack: Vec<(&Node<T>, Option<&str>, bool)> = vec![(&self.root, Some(topic), !dollar)];
        while let Some((node, rest, wildcards)) = stack.pop() {
            if wildcards {
                // `a/#` also matches `a` itself [MQTT-4.7.1-2].
                if let Some(hash) = node.children.get("#") {
                    visit_node(hash, &mut f);
                }
            }
            let Some(s) = rest else {
                visit_node(node, &mut f);
                continue;
            };
            let (head, tail) = split_level(s);
            if let Some(child) = node.children.get(head) {
                stack.push((child, tail, true));
            }
            if wildcards {
                if let Some(plus) = node.children.get("+") {
                    stack.push((plus, tail, true));
                }
            }
        }
    }

    /// One member of the shared group `group` on `filter` (round-robin, as `matches` picks
    /// one): a cluster hands this node a group's message to deliver to one of its members.
    pub fn pick_shared(&self, filter: &str, group: &str) -> Option<Match<'_, T>> {
        let mut node = &self.root;
        let mut rest = Some(filter);
        while let Some(s) = rest {
            let (head, tail) = split_level(s);
            node = node.children.get(head)?;
            rest = tail;
        }
        let Subscribers::Many(crowd) = &node.subscribers else { return None };
        let g = crowd.shared.iter().find(|g| &*g.name == group)?;
        let members = &g.members.list;
        if members.is_empty() {
            return None;
        }
        let i = g.next.fetch_add(1, Ordering::Relaxed) % members.len();
        members.get(i).map(|m| m.lend(Some(&g.share)))
    }

    /// Every member of the shared group `group` on `filter`, so a message left
    /// unacknowledged by a departing member can be handed to another.
    pub fn shared_members(&self, filter: &str, group: &str) -> Vec<Entry<T>> {
        let mut node = &self.root;
        let mut rest = Some(filter);
        while let Some(s) = rest {
            let (head, tail) = split_level(s);
            match node.children.get(head) {
                Some(n) => node = n,
                None => return Vec::new(),
            }
            rest = tail;
        }
        let Subscribers::Many(crowd) = &node.subscribers else { return Vec::new() };
        match crowd.shared.iter().find(|g| &*g.name == group) {
            Some(g) => g.members.list.iter().map(|m| m.lend(Some(&g.share)).entry()).collect(),
            None => Vec::new(),
        }
    }
}

fn visit_node<'a, T: Subscriber>(node: &'a Node<T>, f: &mut impl FnMut(Match<'a, T>)) {
    let crowd = match &node.subscribers {
        Subscribers::None => return,
        Subscribers::One(one) => {
            f(one.lend(None));
            return;
        }
        Subscribers::Many(crowd) => crowd,
    };
    crowd.plain.list.iter().for_each(|s| f(s.lend(None)));
    for g in &crowd.shared {
        let members = &g.members.list;
        if members.is_empty() {
            continue;
        }
        let i = g.next.fetch_add(1, Ordering::Relaxed) % members.len();
        if let Some(m) = members.get(i) {
            f(m.lend(Some(&g.share)));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::QoS;

    /// A test subscriber is just its client's name.
    impl Subscriber for ByteString {
        fn client(&self) -> &ByteString {
            self
        }
    }

    /// A subscriber the size of the broker's (a pointer).
    impl Subscriber for std::sync::Arc<ByteString> {
        fn client(&self) -> &ByteString {
            self
        }
    }

    /// What a device's subscription costs depends on these: a node sits in its parent's
    /// list or map, and the one subscription of a device's topic sits in its node.
    #[test]
    fn nodes_stay_small() {
        type Target = std::sync::Arc<ByteString>;
        assert!(std::mem::size_of::<Node<Target>>() <= 24);
        // A single child is allocated with its name: 48 bytes, a jemalloc size class.
        assert!(std::mem::size_of::<super::super::children::Kids<Node<Target>>>() <= 48);
    }

    fn entry(client: &str, qos: QoS) -> Entry<ByteString> {
        Entry {
            client: client.into(),
            target: client.into(),
            options: SubscriptionOptions { qos, ..Default::default() },
            subscription_id: None,
            share: None,
        }
    }

    fn matched(t: &SubscriptionTrie<ByteString>, topic: &str) -> Vec<String> {
        let mut out = Vec::new();
        t.matches(topic, &mut out);
        let mut v: Vec<String> = out.into_iter().map(|e| e.client.to_string()).collect();
        v.sort();
        v
    }

    #[test]
    fn wildcards_and_dollar_rule() {
        let mut t = SubscriptionTrie::new();
        for (c, f) in
            [("a", "a/b"), ("b", "a/+"), ("c", "#"), ("d", "a/#"), ("e", "+/+"), ("f", "$SYS/#"), ("g", "+/b")]
        {
            t.subscribe(f, None, entry(c, QoS::AtMostOnce));
        }
        assert_eq!(matched(&t, "a/b"), ["a", "b", "c", "d", "e", "g"]);
        assert_eq!(matched(&t, "a"), ["c", "d"]);
        assert_eq!(matched(&t, "a/b/c"), ["c", "d"]);
        assert_eq!(matched(&t, "$SYS/x"), ["f"]);
        assert_eq!(matched(&t, "$SYS"), ["f"]);
        assert_eq!(matched(&t, "/b"), ["c", "e", "g"]);
    }

    #[test]
    fn replace_and_remove_prune() {
        let mut t = SubscriptionTrie::new();
        assert!(!t.subscribe("x/y", None, entry("a", QoS::AtMostOnce)));
        assert!(t.subscribe("x/y", None, entry("a", QoS::ExactlyOnce)));
        assert_eq!(t.len(), 1);
        let mut out = Vec::new();
        t.matches("x/y", &mut out);
        assert_eq!(out[0].options.qos, QoS::ExactlyOnce);
        assert!(t.unsubscribe("x/y", None, "a"));
        assert!(!t.unsubscribe("x/y", None, "a"));
        assert!(t.root.is_empty());
    }

    fn form(t: &mut SubscriptionTrie<ByteString>, filter: &str) -> &'static str {
        match descend_mut(&mut t.root, filter).map(|n| &n.subscribers) {
            None => "no node",
            Some(Subscribers::None) => "none",
            Some(Subscribers::One(_)) => "one",
            Some(Subscribers::Many(_)) => "many",
        }
    }

    #[test]
    fn one_subscription_is_inline_and_settles_back_after_growing() {
        let mut t = SubscriptionTrie::new();
        t.subscribe("dev/1/cmd", None, entry("a", QoS::AtLeastOnce));
        assert_eq!(form(&mut t, "dev/1/cmd"), "one");
        let with_id = Entry { subscription_id: Some(268_435_455), ..entry("a", QoS::AtMostOnce) };
        assert!(t.subscribe("dev/1/cmd", None, with_id), "replaced in place");
        assert_eq!(form(&mut t, "dev/1/cmd"), "one");
        let mut out = Vec::new();
        t.matches("dev/1/cmd", &mut out);
        assert_eq!(out.iter().map(|e| e.subscription_id).collect::<Vec<_>>(), [Some(268_435_455)]);
        t.subscribe("dev/1/cmd", None, entry("b", QoS::AtMostOnce));
        assert_eq!(form(&mut t, "dev/1/cmd"), "many");
        assert_eq!(matched(&t, "dev/1/cmd"), ["a", "b"]);
        assert!(t.unsubscribe("dev/1/cmd", None, "a"));
        assert_eq!(form(&mut t, "dev/1/cmd"), "one");
        assert_eq!(matched(&t, "dev/1/cmd"), ["b"]);
        // A shared group needs the crowd, even next to a single plain subscription.
        t.subscribe("dev/1/cmd", Some("g"), entry("c", QoS::AtMostOnce));
        assert_eq!(form(&mut t, "dev/1/cmd"), "many");
        let mut out = Vec::new();
        t.matches("dev/1/cmd", &mut out);
        let shares: Vec<_> = out.iter().map(|e| (e.client.to_string(), e.share.clone())).collect();
        assert!(shares.contains(&("b".into(), None)));
        assert!(shares.contains(&("c".into(), Some("$share/g/dev/1/cmd".into()))));
        assert!(!t.unsubscribe("dev/1/cmd", Some("g"), "b"));
        assert!(!t.unsubscribe("dev/1/cmd", Some("h"), "c"));
        assert!(t.unsubscribe("dev/1/cmd", Some("g"), "c"));
        assert_eq!(form(&mut t, "dev/1/cmd"), "one");
        assert!(!t.unsubscribe("dev/1/cmd", None, "a"));
        assert!(t.unsubscribe("dev/1/cmd", None, "b"));
        assert_eq!(form(&mut t, "dev/1/cmd"), "no node");
        assert!(t.root.is_empty());
        assert_eq!(t.len(), 0);
    }

    #[test]
    fn wildcards_next_to_many_device_topics() {
        let mut t = SubscriptionTrie::new();
        for i in 0..20 {
            t.subscribe(&format!("dev/{i}/cmd"), None, entry(&format!("d{i}"), QoS::AtLeastOnce));
        }
        t.subscribe("dev/+/cmd", None, entry("ops", QoS::AtMostOnce));
        t.subscribe("dev/#", None, entry("log", QoS::AtMostOnce));
        t.subscribe("#", None, entry("all", QoS::AtMostOnce));
        assert_eq!(matched(&t, "dev/7/cmd"), ["all", "d7", "log", "ops"]);
        assert_eq!(matched(&t, "dev/77/cmd"), ["all", "log", "ops"]);
        assert_eq!(matched(&t, "dev"), ["all", "log"]);
        assert_eq!(matched(&t, "$dev/7/cmd"), Vec::<String>::new());
        for i in 0..20 {
            assert!(t.unsubscribe(&format!("dev/{i}/cmd"), None, &format!("d{i}")));
        }
        assert_eq!(matched(&t, "dev/7/cmd"), ["all", "log", "ops"]);
        assert_eq!(t.root.children.get("dev").map(|n| n.children.len()), Some(2)); // `+` and `#`
        for (f, c) in [("dev/+/cmd", "ops"), ("dev/#", "log"), ("#", "all")] {
            assert!(t.unsubscribe(f, None, c));
        }
        assert!(t.root.is_empty());
    }

    #[test]
    fn one_member_of_a_group_is_picked_in_turn() {
        let mut t = SubscriptionTrie::new();
        assert!(t.pick_shared("s/#", "g").is_none());
        t.subscribe("s/#", None, entry("plain", QoS::AtMostOnce));
        assert!(t.pick_shared("s/#", "g").is_none());
        t.subscribe("s/#", Some("g"), entry("a", QoS::AtMostOnce));
        t.subscribe("s/#", Some("g"), entry("b", QoS::AtMostOnce));
        t.subscribe("s/#", Some("h"), entry("c", QoS::AtMostOnce));
        let picks: Vec<String> =
            (0..4).filter_map(|_| t.pick_shared("s/#", "g")).map(|m| m.entry().client.to_string()).collect();
        assert_eq!(picks.iter().filter(|c| *c == "a").count(), 2, "{picks:?}");
        assert_eq!(picks.iter().filter(|c| *c == "b").count(), 2, "{picks:?}");
        let e = t.pick_shared("s/#", "h").expect("member of h").entry();
        assert_eq!((&*e.client, e.share.as_deref()), ("c", Some("$share/h/s/#")));
        assert!(t.pick_shared("s/+", "g").is_none());
    }

    #[test]
    fn shared_group_round_robin() {
        let mut t = SubscriptionTrie::new();
        t.subscribe("s/+", Some("g"), entry("a", QoS::AtMostOnce));
        t.subscribe("s/+", Some("g"), entry("b", QoS::AtMostOnce));
        t.subscribe("s/+", None, entry("c", QoS::AtMostOnce));
        let mut seen = Vec::new();
        for _ in 0..4 {
            let m = matched(&t, "s/1");
            assert_eq!(m.len(), 2);
            assert!(m.contains(&"c".to_string()));
            seen.extend(m.into_iter().filter(|c| c != "c"));
        }
        seen.sort();
        assert_eq!(seen, ["a", "a", "b", "b"]);
    }

    #[test]
    fn a_node_with_50000_children_matches_by_level() {
        let mut t = SubscriptionTrie::new();
        for id in 0..50_000 {
            t.subscribe(&format!("sensors/{id}/temp"), None, entry(&format!("c{id}"), QoS::AtMostOnce));
        }
        t.subscribe("sensors/+/temp", None, entry("all", QoS::AtMostOnce));
        assert_eq!(matched(&t, "sensors/31337/temp"), ["all", "c31337"]);
        assert_eq!(matched(&t, "sensors/0/temp"), ["all", "c0"]);
        assert_eq!(matched(&t, "sensors/50000/temp"), ["all"]);
        assert!(matched(&t, "sensors/31337/humidity").is_empty());
        assert!(t.unsubscribe("sensors/31337/temp", None, "c31337"));
        assert_eq!(matched(&t, "sensors/31337/temp"), ["all"]);
        assert_eq!(t.len(), 50_000);
    }

    /// Runs `f` on a thread with a small stack: a walk that recursed once per level would
    /// overflow it long before 10,000 levels.
    fn on_small_stack(f: impl FnOnce() + Send + 'static) {
        std::thread::Builder::new().stack_size(256 * 1024).spawn(f).unwrap().join().unwrap();
    }

    #[test]
    fn ten_thousand_levels_without_recursion() {
        on_small_stack(|| {
            let topic = vec!["a"; 10_000].join("/");
            let mut pluses = vec!["+"; 9_999];
            pluses.push("#");
            let wild = pluses.join("/");
            let mut t = SubscriptionTrie::new();
            t.subscribe(&topic, None, entry("exact", QoS::AtMostOnce));
            t.subscribe(&wild, None, entry("wild", QoS::AtMostOnce));
            t.subscribe("#", None, entry("all", QoS::AtMostOnce));
            t.subscribe(&topic, Some("g"), entry("shared", QoS::AtMostOnce));
            assert_eq!(matched(&t, &topic), ["all", "exact", "shared", "wild"]);
            let shorter = vec!["a"; 9_998].join("/");
            assert_eq!(matched(&t, &shorter), ["all"]);
            assert_eq!(t.shared_members(&topic, "g").len(), 1);
            assert!(t.unsubscribe(&topic, None, "exact"));
            assert!(t.unsubscribe(&topic, Some("g"), "shared"));
            assert!(t.unsubscribe(&wild, None, "wild"));
            assert!(!t.unsubscribe(&wild, None, "wild"));
            assert!(t.unsubscribe("#", None, "all"));
            assert!(t.root.is_empty());
            // Dropping a trie that still holds a deep branch must not recurse either.
            t.subscribe(&topic, None, entry("exact", QoS::AtMostOnce));
            drop(t);
        });
    }

    #[test]
    fn many_clients_on_one_filter_are_found_by_client() {
        let mut t = SubscriptionTrie::new();
        let name = |c: i32| format!("c{c}");
        for c in 0..1_000 {
            assert!(!t.subscribe("all/#", None, entry(&name(c), QoS::AtMostOnce)));
            assert!(!t.subscribe("all/#", Some("g"), entry(&name(c), QoS::AtMostOnce)));
        }
        assert_eq!(t.len(), 2_000);
        // Removals move the last entry into the gap: every position must stay right.
        for c in (0..1_000).filter(|c| c % 2 == 1) {
            assert!(t.unsubscribe("all/#", None, &name(c)), "c{c}");
            assert!(!t.unsubscribe("all/#", None, &name(c)), "c{c} twice");
        }
        for c in (0..1_000).filter(|c| c % 2 == 0) {
            assert!(t.subscribe("all/#", None, entry(&name(c), QoS::AtLeastOnce)), "c{c} still there");
        }
        // Down across the size where the map is dropped, and back to nothing.
        for c in (0..1_000).filter(|c| c % 2 == 0 && c % 100 != 0) {
            assert!(t.unsubscribe("all/#", None, &name(c)), "c{c}");
        }
        let mut out = Vec::new();
        t.matches("all/x", &mut out);
        assert_eq!(out.len(), 11); // ten plain, one member of the group
        assert_eq!(t.shared_members("all/#", "g").len(), 1_000);
        for c in 0..1_000 {
            assert!(t.unsubscribe("all/#", Some("g"), &name(c)));
        }
        for c in (0..1_000).step_by(100) {
            assert!(t.unsubscribe("all/#", None, &name(c)));
        }
        assert_eq!(t.len(), 0);
        assert!(t.root.is_empty());
    }
}
