//! A session's waiting messages by priority level: the highest level goes out first, first in
//! first out within a level. A topic always has the same level (it comes from the configured
//! `[[priority]]` filters), so the messages of one topic keep their order.
//!
//! Without priorities every message is level 0 and this is one `VecDeque`.

use std::collections::VecDeque;

use super::Delivery;

#[derive(Debug, Default)]
pub(super) struct Queue {
    /// One FIFO per level, index = level; grown to the highest level seen.
    levels: Vec<VecDeque<Delivery>>,
    len: usize,
}

impl Queue {
    pub(super) fn len(&self) -> usize {
        self.len
    }

    pub(super) fn push_back(&mut self, d: Delivery) {
        let level = usize::from(d.priority);
        if self.levels.len() <= level {
            self.levels.resize_with(level + 1, VecDeque::new);
        }
        self.levels[level].push_back(d);
        self.len += 1;
    }

    /// The level to send from next: the highest with anything in it.
    fn top(&self) -> Option<usize> {
        self.levels.iter().rposition(|q| !q.is_empty())
    }

    pub(super) fn front(&self) -> Option<&Delivery> {
        self.levels.get(self.top()?)?.front()
    }

    pub(super) fn pop_front(&mut self) -> Option<Delivery> {
        let top = self.top()?;
        let d = self.levels.get_mut(top)?.pop_front()?;
        self.len -= 1;
        Some(d)
    }

    pub(super) fn iter(&self) -> impl Iterator<Item = &Delivery> {
        self.levels.iter().rev().flatten()
    }

    /// Takes every message out, highest level first.
    pub(super) fn drain(&mut self) -> impl Iterator<Item = Delivery> + '_ {
        self.len = 0;
        self.levels.iter_mut().rev().flat_map(|q| q.drain(..))
    }

    /// Takes out the messages `take` accepts, keeping the others in order.
    pub(super) fn take_if(&mut self, take: impl Fn(&Delivery) -> bool) -> Vec<Delivery> {
        let mut out = Vec::new();
        for q in self.levels.iter_mut().rev() {
            let mut keep = VecDeque::with_capacity(q.len());
            for d in q.drain(..) {
                if take(&d) {
                    out.push(d);
                } else {
                    keep.push_back(d);
                }
            }
            *q = keep;
        }
        self.len -= out.len();
        out
    }
}
