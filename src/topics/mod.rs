//! Topic indexes: the subscription trie (filters -> subscribers, with `+`, `#`, the `$` rule
//! and `$share` groups) and the retained-message trie (topic -> message, matched by filters).
//!
//! Owns matching. Generic over what a subscriber is, so it knows nothing of sessions,
//! connections or the store; callers lock it as they see fit.

mod retained;
mod subscriptions;

pub use retained::RetainedTrie;
pub use subscriptions::{Entry, SubscriptionTrie};

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
