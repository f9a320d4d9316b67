//! Retained messages by topic, in a trie so a wildcard subscribe walks only the branches its
//! filter can reach.

use std::collections::HashMap;

use super::split_level;

#[derive(Debug)]
struct Node<T> {
    children: HashMap<Box<str>, Node<T>>,
    value: Option<T>,
}

impl<T> Default for Node<T> {
    fn default() -> Self {
        Node { children: HashMap::new(), value: None }
    }
}

#[derive(Debug)]
pub struct RetainedTrie<T> {
    root: Node<T>,
    count: usize,
}

impl<T> Default for RetainedTrie<T> {
    fn default() -> Self {
        RetainedTrie { root: Node::default(), count: 0 }
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
            node = node.children.entry(head.into()).or_default();
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
        let old = remove_in(&mut self.root, Some(topic));
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
        walk(&self.root, Some(filter), true, out);
    }
}

/// `root` is true at the first level, where wildcards must skip `$` topics [MQTT-4.7.2-1].
fn walk<T: Clone>(node: &Node<T>, rest: Option<&str>, root: bool, out: &mut Vec<T>) {
    let Some(s) = rest else {
        out.extend(node.value.iter().cloned());
        return;
    };
    let (head, tail) = split_level(s);
    match head {
        "#" => {
            // `a/#` matches `a` too.
            if !root {
                out.extend(node.value.iter().cloned());
            }
            let mut stack: Vec<&Node<T>> =
                node.children.iter().filter(|(k, _)| !(root && k.starts_with('$'))).map(|(_, n)| n).collect();
            while let Some(n) = stack.pop() {
                out.extend(n.value.iter().cloned());
                stack.extend(n.children.values());
            }
        }
        "+" => {
            for (k, child) in &node.children {
                if root && k.starts_with('$') {
                    continue;
                }
                walk(child, tail, false, out);
            }
        }
        _ => {
            if let Some(child) = node.children.get(head) {
                walk(child, tail, false, out);
            }
        }
    }
}

fn remove_in<T>(node: &mut Node<T>, rest: Option<&str>) -> Option<T> {
    match rest {
        None => node.value.take(),
        Some(s) => {
            let (head, tail) = split_level(s);
            let child = node.children.get_mut(head)?;
            let old = remove_in(child, tail);
            if child.value.is_none() && child.children.is_empty() {
                node.children.remove(head);
            }
            old
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
}
