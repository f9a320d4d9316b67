//! Topic aliases the server sends to a v5 client (section 3.3.2.3.4): the client announces
//! how many it accepts; topics are given aliases as they are first sent, and when all are in
//! use the least recently used one is reassigned.
//!
//! A client may accept 65,535 aliases and the broker answers for it on every message it
//! sends, so finding the least recently used alias must not scan them: the aliases form a
//! recency list threaded through their slots, and every step is O(1).

use std::collections::HashMap;

use bytestring::ByteString;

/// No slot: the end of the recency list.
const NIL: u32 = u32::MAX;

pub struct OutboundAliases {
    max: u16,
    /// Topic -> alias.
    by_topic: HashMap<ByteString, u16>,
    /// Slot `i` holds alias `i + 1`; slots are only ever added until `max` are in use, so
    /// aliases are handed out 1, 2, 3... before any is reassigned.
    slots: Vec<Slot>,
    /// Most recently used slot.
    newest: u32,
    /// Least recently used slot: the next to be reassigned once all are in use.
    oldest: u32,
}

/// One alias: its topic and its neighbours in recency order. Indices rather than pointers
/// keep this safe code, and u32 rather than usize halves the links for a large table.
struct Slot {
    topic: ByteString,
    /// The slot used just after this one (towards `newest`).
    newer: u32,
    /// The slot used just before this one (towards `oldest`).
    older: u32,
}

/// What to put in a PUBLISH.
#[derive(Debug, PartialEq, Eq)]
pub enum AliasUse {
    /// No alias (client accepts none).
    None,
    /// Send the topic and this alias, defining it.
    Define(u16),
    /// Send an empty topic and this alias.
    Reuse(u16),
}

impl OutboundAliases {
    pub fn new(max: u16) -> Self {
        OutboundAliases { max, by_topic: HashMap::new(), slots: Vec::new(), newest: NIL, oldest: NIL }
    }

    pub fn apply(&mut self, topic: &ByteString) -> AliasUse {
        if self.max == 0 {
            return AliasUse::None;
        }
        if let Some(&alias) = self.by_topic.get(topic) {
            self.touch(slot_of(alias));
            return AliasUse::Reuse(alias);
        }
        let slot = if self.slots.len() < usize::from(self.max) {
            let slot = self.slots.len() as u32;
            self.slots.push(Slot { topic: topic.clone(), newer: NIL, older: NIL });
            self.push_newest(slot);
            slot
        } else {
            // Full: the least recently used topic gives up its alias.
            let slot = self.oldest;
            let Some(s) = self.slots.get_mut(slot as usize) else {
                return AliasUse::None;
            };
            let old = std::mem::replace(&mut s.topic, topic.clone());
            self.by_topic.remove(&old);
            self.touch(slot);
            slot
        };
        // A slot index is below `max` (a u16), so the alias fits.
        let alias = (slot + 1) as u16;
        self.by_topic.insert(topic.clone(), alias);
        AliasUse::Define(alias)
    }

    /// Moves a slot already in the list to the newest end.
    fn touch(&mut self, slot: u32) {
        if slot == self.newest {
            return;
        }
        self.unlink(slot);
        self.push_newest(slot);
    }

    fn unlink(&mut self, slot: u32) {
        let Some(s) = self.slots.get(slot as usize) else { return };
        let (newer, older) = (s.newer, s.older);
        match self.slots.get_mut(newer as usize) {
            Some(n) => n.older = older,
            None => self.newest = older,
        }
        match self.slots.get_mut(older as usize) {
            Some(o) => o.newer = newer,
            None => self.oldest = newer,
        }
    }

    fn push_newest(&mut self, slot: u32) {
        let previous = self.newest;
        if let Some(s) = self.slots.get_mut(slot as usize) {
            s.newer = NIL;
            s.older = previous;
        }
        match self.slots.get_mut(previous as usize) {
            Some(p) => p.newer = slot,
            None => self.oldest = slot,
        }
        self.newest = slot;
    }
}

fn slot_of(alias: u16) -> u32 {
    u32::from(alias) - 1
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    #[test]
    fn defines_reuses_and_evicts_least_recent() {
        let mut a = OutboundAliases::new(2);
        assert_eq!(a.apply(&"x".into()), AliasUse::Define(1));
        assert_eq!(a.apply(&"y".into()), AliasUse::Define(2));
        assert_eq!(a.apply(&"x".into()), AliasUse::Reuse(1));
        // y is least recently used: z takes its alias.
        assert_eq!(a.apply(&"z".into()), AliasUse::Define(2));
        assert_eq!(a.apply(&"x".into()), AliasUse::Reuse(1));
        assert_eq!(a.apply(&"y".into()), AliasUse::Define(2));
        assert_eq!(OutboundAliases::new(0).apply(&"x".into()), AliasUse::None);
    }

    #[test]
    fn one_alias_is_reassigned_every_time() {
        let mut a = OutboundAliases::new(1);
        assert_eq!(a.apply(&"x".into()), AliasUse::Define(1));
        assert_eq!(a.apply(&"x".into()), AliasUse::Reuse(1));
        assert_eq!(a.apply(&"y".into()), AliasUse::Define(1));
        assert_eq!(a.apply(&"x".into()), AliasUse::Define(1));
    }

    /// The obvious LRU: last use ordered in a BTreeMap. Slower, but plainly right.
    struct Reference {
        max: u16,
        clock: u64,
        by_topic: HashMap<String, (u16, u64)>,
        by_use: BTreeMap<u64, String>,
    }

    impl Reference {
        fn apply(&mut self, topic: &str) -> AliasUse {
            self.clock += 1;
            if let Some((alias, used)) = self.by_topic.get_mut(topic) {
                self.by_use.remove(used);
                *used = self.clock;
                self.by_use.insert(self.clock, topic.to_string());
                return AliasUse::Reuse(*alias);
            }
            let alias = if self.by_topic.len() < usize::from(self.max) {
                self.by_topic.len() as u16 + 1
            } else {
                let (_, old) = self.by_use.pop_first().unwrap();
                self.by_topic.remove(&old).unwrap().0
            };
            self.by_topic.insert(topic.to_string(), (alias, self.clock));
            self.by_use.insert(self.clock, topic.to_string());
            AliasUse::Define(alias)
        }
    }

    #[test]
    fn full_table_of_65535_matches_the_reference() {
        let max = u16::MAX;
        let mut a = OutboundAliases::new(max);
        let mut r = Reference { max, clock: 0, by_topic: HashMap::new(), by_use: BTreeMap::new() };
        // xorshift: a fixed, varied mix of new topics and returns to older ones, some still
        // holding their alias and some evicted long ago.
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
        let mut next_new = 0u32;
        let (mut defines, mut reuses, mut redefines) = (0, 0, 0);
        let mut defined_once = std::collections::HashSet::new();
        let mut step = 0u32;
        while next_new < 200_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let id = if x % 3 == 0 || next_new == 0 {
                next_new += 1;
                next_new - 1
            } else {
                // Anything among the last 100,000 new topics.
                let back = ((x >> 8) % u64::from(next_new.min(100_000))) as u32;
                next_new - 1 - back
            };
            let topic = format!("t/{id}");
            let got = a.apply(&ByteString::from(topic.as_str()));
            // The reference is O(log n) a step, cheap enough to check every one.
            assert_eq!(got, r.apply(&topic), "step {step}, topic {topic}");
            match got {
                AliasUse::Reuse(_) => reuses += 1,
                AliasUse::Define(_) if !defined_once.insert(id) => redefines += 1,
                AliasUse::Define(_) => defines += 1,
                AliasUse::None => panic!("aliases are on"),
            }
            step += 1;
        }
        assert_eq!(defines, 200_000);
        assert_eq!(a.by_topic.len(), usize::from(max));
        // The mix really exercised both reuse and reassignment.
        assert!(reuses > 10_000 && redefines > 10_000, "reuses {reuses}, redefines {redefines}");
    }
}
