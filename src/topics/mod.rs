//! Topic indexes: the subscription trie (filters -> subscribers, with `+`, `#`, the `$` rule
//! and `$share` groups) and the retained-message trie (topic -> message, matched by filters).
//!
//! Owns matching. Generic over what a subscriber is, so it knows nothing of sessions,
//! connections or the store; callers lock it as they see fit.
//!
//! Walks are loops, never recursion: a topic or filter may have as many levels as
//! `limits.max_topic_levels` allows (up to 65,535), deeper than a task's stack can recurse,
//! and that includes dropping a deep branch. A node's children are found by hashing their
//! level once there are more than a few (`children`), so a node with 100,000 children costs
//! a publish one lookup, not a scan.

mod children;
mod retained;
mod subscriptions;

use children::Children;

pub use retained::RetainedTrie;
pub use subscriptions::{Entry, Match, Subscriber, SubscriptionTrie};

/// Splits off the first level of a topic or filter: `a/b/c` -> (`a`, Some(`b/c`)),
/// `a` -> (`a`, None), `a/` -> (`a`, Some(``)).
pub(crate) fn split_level(s: &str) -> (&str, Option<&str>) {
    match s.split_once('/') {
        Some((head, tail)) => (head, Some(tail)),
        None => (s, None),
    }
}

/// Number of levels in a topic or filter (`a//b` has three).
pub fn level_count(s: &str) -> usize {
    s.bytes().filter(|&b| b == b'/').count() + 1
}

/// What the shared walks need of a trie node.
pub(crate) trait TrieNode: Sized {
    fn children(&self) -> &Children<Self>;
    fn children_mut(&mut self) -> &mut Children<Self>;
    /// Holds nothing of its own (subscriptions, a retained message), children aside.
    fn bare(&self) -> bool;
}

/// The node at the end of `path`, if there is one.
pub(crate) fn descend_mut<'a, N: TrieNode>(root: &'a mut N, path: &str) -> Option<&'a mut N> {
    let mut node = root;
    for level in path.split('/') {
        node = node.children_mut().get_mut(level)?;
    }
    Some(node)
}

/// Removes the node at the end of `path`, which must be bare and childless, with every
/// ancestor that held nothing but the branch to it. Two passes down instead of a recursive
/// one: find the deepest ancestor that stays, then cut below it.
pub(crate) fn prune<N: TrieNode>(root: &mut N, path: &str) {
    let mut cut = None;
    let mut node = &*root;
    for (depth, level) in path.split('/').enumerate() {
        if depth == 0 || !node.bare() || node.children().len() > 1 {
            cut = Some((depth, level));
        }
        match node.children().get(level) {
            Some(child) => node = child,
            None => return,
        }
    }
    let Some((depth, level)) = cut else { return };
    let mut node = root;
    for above in path.split('/').take(depth) {
        match node.children_mut().get_mut(above) {
            Some(child) => node = child,
            None => return,
        }
    }
    node.children_mut().remove(level);
}

/// Empties `node`'s subtree one node at a time, for `Drop`: the default drop glue would
/// recurse once per level. Each node taken out has its children moved to the work list
/// before it is dropped, so its own drop finds nothing below it.
pub(crate) fn dismantle<N: TrieNode>(node: &mut N) {
    if node.children().is_empty() {
        return;
    }
    let mut pending: Vec<N> = Vec::new();
    node.children_mut().drain_into(&mut pending);
    while let Some(mut n) = pending.pop() {
        n.children_mut().drain_into(&mut pending);
    }
}
