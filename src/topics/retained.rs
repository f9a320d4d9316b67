//! Retained messages by topic, in a trie so a wildcard subscribe walks only the branches its
//! filter can reach.

use std::fmt;

use super::{descend_mut, dismantle, prune, split_level, Children, TrieNode};

struct Node<T> {
    children: Children<Node<T>>,
    value: Option<T>,
}

impl<T> Default for Node<T> {
    fn default() -> Self {
        Node { children: Children::default(), value: None }
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
        self.value.is_none()
    }
}

impl<T> Drop for Node<T> {
    fn drop(&mut self) {
        dismantle(self);
    }
}

pub struct RetainedTrie<T> {
    root: Node<T>,
    count: usize,
}

impl<T> Default for RetainedTrie<T> {
    fn default() -> Self {
        RetainedTrie { root: Node::default(), count: 0 }
    }
}

/// A summary: printing every node would recurse once per level.
impl<T> fmt::Debug for RetainedTrie<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RetainedTrie").field("retained", &self.count).finish_non_exhaustive()
    }
}

impl<T: Clone> RetainedTrie<T> {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn len(&self) -> usize {
        self.count
    }

    /// Sets the retained message of `topic`, returning the one it replaced.
    pub fn insert(&mut self, topic: &str, value: T) -> Option<T> {
        let mut node = &mut self.root;
        let mut rest = Some(topic);
        while let Some(s) = rest {
            let (head, tail) = split_level(s);
            node = node.children.get_or_default(head);
            rest = tail;
        }
        let old = node.value.replace(value);
        if old.is_none() {
            self.count += 1;
        }
        old
    }

    /// Clears the retained message of `topic`.
    pub fn remove(&mut self, topic: &str) -> Option<T> {
        let node = descend_mut(&mut self.root, topic)?;
        let old = node.value.take();
        if node.children.is_empty() {
            prune(&mut self.root, topic);
        }
        if old.is_some() {
            self.count -= 1;
        }
        old
    }

    pub fn get(&self, topic: &str) -> Option<&T> {
        let mut node = &self.root;
        let mut rest = Some(topic);
        while let Some(s) = rest {
            let (head, tail) = split_level(s);
            node = node.children.get(head)?;
            rest = tail;
        }
        node.value.as_ref()
    }

    /// Every retained message whose topic matches `filter`.
    pub fn matches(&self, filter: &str, out: &mut Vec<T>) {
        // Branches still to walk, on the heap: filters may be deeper than a stack can recurse.
        // The flag is true at the first level, where wildcards must skip `$` topics
        // [MQTT-4.7.2-1].
        let mut stack: Vec<(&Node<T>, Option<&str>, bool)> = vec![(&self.root, Some(filter), true)];
        while let Some((node, rest, root)) = stack.pop() {
            let Some(s) = rest else {
                out.extend(node.value.iter().cloned());
                continue;
            };
            let (head, tail) = split_level(s);
            match head {
                "#" => {
                    // `a/#` matches `a` too.
                    if !root {
                        out.extend(node.value.iter().cloned());
                    }
                    let mut below: Vec<&Node<T>> =
                        node.children.iter().filter(|(k, _)| !(root && k.starts_with('$'))).map(|(_, n)| n).collect();
                    while let Some(n) = below.pop() {
                        out.extend(n.value.iter().cloned());
                        below.extend(n.children.values());
                    }
                }
                "+" => {
                    let levels = node.children.iter().filter(|(k, _)| !(root && k.starts_with('$')));
                    stack.extend(levels.map(|(_, child)| (child, tail, false)));
                }
                _ => {
                    if let Some(child) = node.children.get(head) {
                        stack.push((child, tail, false));
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn found(t: &RetainedTrie<&'static str>, filter: &str) -> Vec<&'static str> {
        let mut v = Vec::new();
        t.matches(filter, &mut v);
        v.sort();
        v
    }

    #[test]
    fn filters_match_retained_topics() {
        let mut t = RetainedTrie::new();
        for topic in ["a", "a/b", "a/c", "a/b/c", "$SYS/x", "/x"] {
            t.insert(topic, topic);
        }
        assert_eq!(found(&t, "#"), ["/x", "a", "a/b", "a/b/c", "a/c"]);
        assert_eq!(found(&t, "a/#"), ["a", "a/b", "a/b/c", "a/c"]);
        assert_eq!(found(&t, "a/+"), ["a/b", "a/c"]);
        assert_eq!(found(&t, "+/x"), ["/x"]);
        assert_eq!(found(&t, "$SYS/#"), ["$SYS/x"]);
        assert_eq!(found(&t, "+"), ["a"]);
        assert_eq!(t.len(), 6);
        assert_eq!(t.remove("a/b"), Some("a/b"));
        assert_eq!(found(&t, "a/#"), ["a", "a/b/c", "a/c"]);
        assert_eq!(t.len(), 5);
    }

    #[test]
    fn a_node_with_50000_children() {
        let mut t = RetainedTrie::new();
        let topics: Vec<&'static str> =
            (0..50_000).map(|id| &*Box::leak(format!("sensors/{id}/temp").into_boxed_str())).collect();
        for topic in &topics {
            t.insert(topic, *topic);
        }
        assert_eq!(found(&t, "sensors/31337/temp"), ["sensors/31337/temp"]);
        assert_eq!(found(&t, "sensors/+/temp").len(), 50_000);
        assert_eq!(found(&t, "sensors/#").len(), 50_000);
        assert!(found(&t, "sensors/+/humidity").is_empty());
        assert_eq!(t.get("sensors/7/temp"), Some(&"sensors/7/temp"));
        assert_eq!(t.remove("sensors/7/temp"), Some("sensors/7/temp"));
        assert!(found(&t, "sensors/7/temp").is_empty());
        assert_eq!(t.len(), 49_999);
    }

    #[test]
    fn ten_thousand_levels_without_recursion() {
        std::thread::Builder::new()
            .stack_size(256 * 1024)
            .spawn(|| {
                let topic: &'static str = Box::leak(vec!["a"; 10_000].join("/").into_boxed_str());
                let mut t = RetainedTrie::new();
                t.insert(topic, "deep");
                t.insert("a", "shallow");
                assert_eq!(found(&t, topic), ["deep"]);
                assert_eq!(found(&t, &vec!["+"; 10_000].join("/")), ["deep"]);
                assert_eq!(found(&t, "#"), ["deep", "shallow"]);
                assert_eq!(found(&t, "a/#"), ["deep", "shallow"]);
                let mut half = vec!["+"; 5_000];
                half.push("#");
                assert_eq!(found(&t, &half.join("/")), ["deep"]);
                assert_eq!(t.get(topic), Some(&"deep"));
                assert_eq!(t.remove(topic), Some("deep"));
                assert_eq!(found(&t, "#"), ["shallow"]);
                assert_eq!(t.root.children.get("a").map(|n| n.children.len()), Some(0));
                // Dropping a trie that still holds a deep branch must not recurse either.
                t.insert(topic, "deep");
                drop(t);
            })
            .unwrap()
            .join()
            .unwrap();
    }
}
