//! The children of a trie node, by level name, in as little memory as their number allows.
//!
//! Most nodes of a real trie have no child or one (a device's `dev/<id>/cmd`: the `<id>` node
//! has one child, `cmd` none), and a hash table even for one child costs ~700 bytes. So a
//! node keeps one pointer (8 bytes, null when it has no child) to the smallest form that
//! fits: one child inline, a short list scanned by name, or, past `FEW_MAX` children, a hash
//! map, so a node with 100,000 children is still one lookup: a client subscribing to
//! `a/<its id>` must not make every publish under `a/` scan the others. Short level names
//! are kept in place rather than in an allocation of their own (`Level`).
//!
//! Owns only the container; what a node is and when it may go is the trie's business.

use std::borrow::Borrow;
use std::collections::{hash_map, HashMap};
use std::hash::{Hash, Hasher};

/// Largest number of children kept in a list; one more turns it into a map. A scan of up to
/// this many short names is as fast as hashing the level once.
const FEW_MAX: usize = 8;
/// A map shrinks back to a list when removals leave this many children: below `FEW_MAX`, so a
/// node whose count moves around the limit does not switch form on every change.
const FEW_BACK: usize = FEW_MAX / 2;

pub(crate) struct Children<N>(Option<Box<Kids<N>>>);

/// Longest level name kept in place.
const SHORT: usize = 7;

/// The name a child is filed under. Most level names are short (`cmd`, `state`, a device
/// number): up to `SHORT` bytes are kept in place, which saves each of them an allocation,
/// and the type is still 16 bytes (the short form fits beside the long form's pointer,
/// whose null value tells them apart).
pub(super) enum Level {
    Short { len: u8, bytes: [u8; SHORT] },
    Long(Box<str>),
}

impl Level {
    fn new(name: &str) -> Level {
        let src = name.as_bytes();
        if src.len() > SHORT {
            return Level::Long(name.into());
        }
        let mut bytes = [0; SHORT];
        bytes[..src.len()].copy_from_slice(src);
        Level::Short { len: src.len() as u8, bytes }
    }

    fn as_bytes(&self) -> &[u8] {
        match self {
            Level::Short { len, bytes } => &bytes[..usize::from(*len)],
            Level::Long(s) => s.as_bytes(),
        }
    }

    fn as_str(&self) -> &str {
        match self {
            // The bytes are a whole `str` copied in `new`, so this always succeeds.
            Level::Short { .. } => std::str::from_utf8(self.as_bytes()).unwrap_or_default(),
            Level::Long(s) => s,
        }
    }

    fn is(&self, name: &str) -> bool {
        self.as_bytes() == name.as_bytes()
    }
}

/// Equal, hashed and borrowed as the `str` it holds, so a map of children is looked up by
/// `&str`.
impl PartialEq for Level {
    fn eq(&self, other: &Self) -> bool {
        self.as_bytes() == other.as_bytes()
    }
}

impl Eq for Level {}

impl Hash for Level {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.as_str().hash(state);
    }
}

impl Borrow<str> for Level {
    fn borrow(&self) -> &str {
        self.as_str()
    }
}

/// `pub(super)` for the subscription trie's size test only.
pub(super) enum Kids<N> {
    One(Level, N),
    Few(Vec<(Level, N)>),
    /// Boxed: inline, the map's 48 bytes would make every single child's allocation 64
    /// bytes instead of 48.
    #[allow(clippy::box_collection)]
    Many(Box<HashMap<Level, N>>),
}

impl<N> Default for Children<N> {
    fn default() -> Self {
        Children(None)
    }
}

impl<N> Children<N> {
    pub(crate) fn len(&self) -> usize {
        match self.0.as_deref() {
            None => 0,
            Some(Kids::One(..)) => 1,
            Some(Kids::Few(v)) => v.len(),
            Some(Kids::Many(m)) => m.len(),
        }
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.0.is_none()
    }

    pub(crate) fn get(&self, level: &str) -> Option<&N> {
        match self.0.as_deref()? {
            Kids::One(k, n) => k.is(level).then_some(n),
            Kids::Few(v) => v.iter().find(|(k, _)| k.is(level)).map(|(_, n)| n),
            Kids::Many(m) => m.get(level),
        }
    }

    pub(crate) fn get_mut(&mut self, level: &str) -> Option<&mut N> {
        match self.0.as_deref_mut()? {
            Kids::One(k, n) => k.is(level).then_some(n),
            Kids::Few(v) => v.iter_mut().find(|(k, _)| k.is(level)).map(|(_, n)| n),
            Kids::Many(m) => m.get_mut(level),
        }
    }

    /// The child named `level`, created (empty) if there is none.
    pub(crate) fn get_or_default(&mut self, level: &str) -> &mut N
    where
        N: Default,
    {
        let kids = self.0.get_or_insert_with(|| Box::new(Kids::One(Level::new(level), N::default())));
        if kids.find(level).is_none() {
            kids.make_room();
        }
        match &mut **kids {
            // Only when it is `level`: `make_room` turned a single child of another name into
            // a list.
            Kids::One(_, n) => n,
            Kids::Few(v) => {
                let i = match v.iter().position(|(k, _)| k.is(level)) {
                    Some(i) => i,
                    None => {
                        v.push((Level::new(level), N::default()));
                        v.len() - 1
                    }
                };
                &mut v[i].1
            }
            Kids::Many(m) => m.entry(Level::new(level)).or_default(),
        }
    }

    /// Removes and returns the child named `level`, moving to a smaller form when it can.
    pub(crate) fn remove(&mut self, level: &str) -> Option<N> {
        let kids = self.0.as_deref_mut()?;
        let removed = match kids {
            Kids::One(k, _) if k.is(level) => {
                return match self.0.take().map(|b| *b) {
                    Some(Kids::One(_, n)) => Some(n),
                    _ => None,
                };
            }
            Kids::One(..) => None,
            // Order does not matter: the list is scanned whole.
            Kids::Few(v) => v.iter().position(|(k, _)| k.is(level)).map(|i| v.swap_remove(i).1),
            Kids::Many(m) => m.remove(level),
        };
        if removed.is_some() {
            self.shrink();
        }
        removed
    }

    pub(crate) fn iter(&self) -> Iter<'_, N> {
        Iter(match self.0.as_deref() {
            None => IterKids::Few([].iter()),
            Some(Kids::One(k, n)) => IterKids::One(Some((k, n))),
            Some(Kids::Few(v)) => IterKids::Few(v.iter()),
            Some(Kids::Many(m)) => IterKids::Many(m.iter()),
        })
    }

    pub(crate) fn values(&self) -> impl Iterator<Item = &N> {
        self.iter().map(|(_, n)| n)
    }

    /// Moves every child into `out`, leaving none: for taking a subtree apart without
    /// recursion.
    pub(crate) fn drain_into(&mut self, out: &mut Vec<N>) {
        match self.0.take().map(|b| *b) {
            None => {}
            Some(Kids::One(_, n)) => out.push(n),
            Some(Kids::Few(v)) => out.extend(v.into_iter().map(|(_, n)| n)),
            Some(Kids::Many(m)) => out.extend((*m).into_values()),
        }
    }

    /// After a removal: one child left goes back inline, a map down to `FEW_BACK` children
    /// back to a list, none to nothing at all.
    fn shrink(&mut self) {
        let Some(kids) = self.0.as_deref_mut() else { return };
        let len = match kids {
            Kids::Few(v) if v.len() <= 1 => v.len(),
            Kids::Many(m) if m.len() <= FEW_BACK => m.len(),
            _ => return,
        };
        if len == 0 {
            self.0 = None;
            return;
        }
        *kids = match std::mem::replace(kids, Kids::Few(Vec::new())) {
            Kids::Few(v) => match v.into_iter().next() {
                Some((k, n)) => Kids::One(k, n),
                None => Kids::Few(Vec::new()),
            },
            Kids::Many(m) => Kids::Few((*m).into_iter().collect()),
            one => one,
        };
    }
}

impl<N> Kids<N> {
    fn find(&self, level: &str) -> Option<&N> {
        match self {
            Kids::One(k, n) => k.is(level).then_some(n),
            Kids::Few(v) => v.iter().find(|(k, _)| k.is(level)).map(|(_, n)| n),
            Kids::Many(m) => m.get(level),
        }
    }

    /// Before adding a child of a new name: a single child becomes a list, a full list a map.
    fn make_room(&mut self) {
        let full = match self {
            Kids::One(..) => true,
            Kids::Few(v) => v.len() >= FEW_MAX,
            Kids::Many(_) => false,
        };
        if !full {
            return;
        }
        let taken = std::mem::replace(self, Kids::Few(Vec::new()));
        *self = match taken {
            Kids::One(k, n) => {
                let mut v = Vec::with_capacity(2);
                v.push((k, n));
                Kids::Few(v)
            }
            Kids::Few(v) => {
                let mut m = HashMap::with_capacity(v.len() + 1);
                m.extend(v);
                Kids::Many(Box::new(m))
            }
            many => many,
        };
    }
}

/// The children of a node as (level name, child), in no particular order.
pub(crate) struct Iter<'a, N>(IterKids<'a, N>);

enum IterKids<'a, N> {
    One(Option<(&'a Level, &'a N)>),
    Few(std::slice::Iter<'a, (Level, N)>),
    Many(hash_map::Iter<'a, Level, N>),
}

impl<'a, N> Iterator for Iter<'a, N> {
    type Item = (&'a str, &'a N);

    fn next(&mut self) -> Option<Self::Item> {
        match &mut self.0 {
            IterKids::One(one) => one.take().map(|(k, n)| (k.as_str(), n)),
            IterKids::Few(it) => it.next().map(|(k, n)| (k.as_str(), n)),
            IterKids::Many(it) => it.next().map(|(k, n)| (k.as_str(), n)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(c: &Children<u32>) -> Vec<String> {
        let mut v: Vec<String> = c.iter().map(|(k, _)| k.to_string()).collect();
        v.sort();
        v
    }

    fn form(c: &Children<u32>) -> &'static str {
        match c.0.as_deref() {
            None => "none",
            Some(Kids::One(..)) => "one",
            Some(Kids::Few(_)) => "few",
            Some(Kids::Many(_)) => "many",
        }
    }

    #[test]
    fn level_names_short_in_place_long_on_the_heap() {
        assert_eq!(std::mem::size_of::<Level>(), 16);
        for name in ["", "a", "cmd", "1234567", "12345678", "sensors/x", "é", "ééé", "ééééé"] {
            let l = Level::new(name);
            assert_eq!(l.as_str(), name);
            assert!(l.is(name));
            assert_eq!(matches!(l, Level::Short { .. }), name.len() <= SHORT, "{name}");
        }
        assert!(!Level::new("abc").is("abd") && !Level::new("abc").is("ab"));
        // Found by `&str` in a map: the same hash and equality as the name itself.
        let m: HashMap<Level, u8> = [("cmd", 1), ("a-long-name", 2)].map(|(k, v)| (Level::new(k), v)).into();
        assert_eq!((m.get("cmd"), m.get("a-long-name"), m.get("cm")), (Some(&1), Some(&2), None));
    }

    #[test]
    fn one_child_is_held_inline_and_goes_away_with_its_removal() {
        let mut c = Children::<u32>::default();
        assert!(c.is_empty());
        *c.get_or_default("a") = 1;
        assert_eq!(form(&c), "one");
        assert_eq!(c.get("a"), Some(&1));
        assert_eq!(c.get("b"), None);
        *c.get_or_default("a") += 1;
        assert_eq!((c.len(), c.get("a")), (1, Some(&2)));
        assert_eq!(c.remove("b"), None);
        assert_eq!(c.remove("a"), Some(2));
        assert!(c.is_empty());
        assert_eq!(form(&c), "none");
    }

    #[test]
    fn grows_into_a_list_then_a_map_and_collapses_back() {
        let mut c = Children::<u32>::default();
        for i in 0..FEW_MAX as u32 {
            *c.get_or_default(&i.to_string()) = i;
        }
        assert_eq!((form(&c), c.len()), ("few", FEW_MAX));
        *c.get_or_default("x") = 99;
        assert_eq!((form(&c), c.len()), ("many", FEW_MAX + 1));
        for i in 0..FEW_MAX as u32 {
            assert_eq!(c.get(&i.to_string()), Some(&i));
        }
        assert_eq!(c.get_mut("x").map(|n| std::mem::replace(n, 7)), Some(99));
        // Down to FEW_BACK + 1: still a map; one fewer: a list again.
        for i in 0..(FEW_MAX - FEW_BACK) as u32 {
            assert_eq!(c.remove(&i.to_string()), Some(i));
        }
        assert_eq!((form(&c), c.len()), ("many", FEW_BACK + 1));
        assert_eq!(c.remove("x"), Some(7));
        assert_eq!((form(&c), c.len()), ("few", FEW_BACK));
        let left: Vec<String> = ((FEW_MAX - FEW_BACK)..FEW_MAX).map(|i| i.to_string()).collect();
        assert_eq!(names(&c), left);
        for k in &left[1..] {
            assert!(c.remove(k).is_some());
        }
        assert_eq!(form(&c), "one");
        assert_eq!(names(&c), [left[0].clone()]);
        assert!(c.remove(&left[0]).is_some());
        assert_eq!(form(&c), "none");
    }

    #[test]
    fn many_children_are_found_by_hashing() {
        let mut c = Children::<u32>::default();
        for i in 0..100_000u32 {
            *c.get_or_default(&i.to_string()) = i;
        }
        assert_eq!((form(&c), c.len()), ("many", 100_000));
        assert_eq!(c.get("31337"), Some(&31337));
        assert_eq!(c.values().count(), 100_000);
        let mut all = Vec::new();
        c.drain_into(&mut all);
        assert_eq!(all.len(), 100_000);
        assert!(c.is_empty());
    }
}
