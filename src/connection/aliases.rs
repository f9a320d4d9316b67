//! Topic aliases the server sends to a v5 client (section 3.3.2.3.4): the client announces
//! how many it accepts; topics are given aliases as they are first sent, and when all are in
//! use the least recently used one is reassigned.

use std::collections::HashMap;

use bytestring::ByteString;

pub struct OutboundAliases {
    max: u16,
    clock: u64,
    /// Topic -> (alias, last use).
    by_topic: HashMap<ByteString, (u16, u64)>,
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
        OutboundAliases { max, clock: 0, by_topic: HashMap::new() }
    }

    pub fn apply(&mut self, topic: &ByteString) -> AliasUse {
        if self.max == 0 {
            return AliasUse::None;
        }
        self.clock += 1;
        if let Some((alias, used)) = self.by_topic.get_mut(topic) {
            *used = self.clock;
            return AliasUse::Reuse(*alias);
        }
        let alias = if self.by_topic.len() < usize::from(self.max) {
            self.by_topic.len() as u16 + 1
        } else {
            // Full: the least recently used topic gives up its alias.
            let Some((old, (alias, _))) =
                self.by_topic.iter().min_by_key(|(_, (_, used))| *used).map(|(t, v)| (t.clone(), *v))
            else {
                return AliasUse::None;
            };
            self.by_topic.remove(&old);
            alias
        };
        self.by_topic.insert(topic.clone(), (alias, self.clock));
        AliasUse::Define(alias)
    }
}

#[cfg(test)]
mod tests {
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
}
