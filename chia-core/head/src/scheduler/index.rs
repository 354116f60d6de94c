//! Typed slots, like HyperQueue's `define_id_type!`: nodes, tasks, shapes and functions all live
//! in vectors and refer to each other by position, and with bare `usize` positions nothing stops
//! a node's slot from indexing the tasks. Each kind gets its own newtype and each container takes
//! only its kind, so such a mix-up does not compile. The newtypes wrap a `usize` and every
//! conversion is inlined away: the hot path does exactly what it did with bare positions.

use serde::{Deserialize, Serialize};
use std::marker::PhantomData;

/// A position in a [`Slab`] or [`IndexVec`] of one kind of entry.
pub(super) trait Idx: Copy {
    fn new(index: usize) -> Self;
    fn index(self) -> usize;
}

/// Defines a slot newtype implementing [`Idx`]. Ordered and hashable, as tasks are sorted and
/// heaped by slot and interned keys hold slots.
macro_rules! define_id_type {
    ($(#[$meta:meta])* $name:ident) => {
        $(#[$meta])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize)]
        pub(super) struct $name(usize);

        impl Idx for $name {
            #[inline]
            fn new(index: usize) -> Self {
                $name(index)
            }

            #[inline]
            fn index(self) -> usize {
                self.0
            }
        }
    };
}

define_id_type!(
    /// A connected node's slot in the scheduler's nodes.
    NodeSlot
);
define_id_type!(
    /// A task's slot in the scheduler's tasks; reused once the task is removed, so references
    /// that may outlive it carry its `seq` as well.
    TaskSlot
);
impl TaskSlot {
    /// No task, for dense tables of slots where an `Option` would double each entry. No slab
    /// hands it out: it would have to hold `usize::MAX` entries first.
    pub(super) const NONE: TaskSlot = TaskSlot(usize::MAX);
}
define_id_type!(
    /// A shape's slot in the scheduler's shapes; reused once the shape is removed.
    ShapeSlot
);
define_id_type!(
    /// An interned function; functions are never removed, so it stays valid.
    FunctionSlot
);
define_id_type!(
    /// A placement group's slot in the scheduler's groups; reused once the group is removed.
    GroupSlot
);

/// A vector that only grows, indexed by `I`.
#[derive(Serialize, Deserialize)]
pub(super) struct IndexVec<I, T> {
    items: Vec<T>,
    _index: PhantomData<I>,
}

impl<I: Idx, T> Default for IndexVec<I, T> {
    fn default() -> Self {
        IndexVec { items: Vec::new(), _index: PhantomData }
    }
}

impl<I: Idx, T> IndexVec<I, T> {
    pub(super) fn push(&mut self, item: T) -> I {
        let idx = I::new(self.items.len());
        self.items.push(item);
        idx
    }

    #[inline]
    pub(super) fn get(&self, idx: I) -> Option<&T> {
        self.items.get(idx.index())
    }
}

/// Only slots this vector handed out are used with it, and it never shrinks, so indexing
/// cannot go out of bounds.
impl<I: Idx, T> std::ops::Index<I> for IndexVec<I, T> {
    type Output = T;

    #[inline]
    fn index(&self, idx: I) -> &T {
        &self.items[idx.index()]
    }
}

impl<I: Idx, T> std::ops::IndexMut<I> for IndexVec<I, T> {
    #[inline]
    fn index_mut(&mut self, idx: I) -> &mut T {
        &mut self.items[idx.index()]
    }
}

/// A vector whose indices stay valid while other entries come and go; freed indices are reused,
/// most recently freed first. The free list runs through the vacant entries themselves, so
/// removing never allocates.
///
/// Entries live in segments of [`SEGMENT`] that never move: growing adds a segment instead of
/// copying everything into a buffer twice the size, so a burst of a million tasks never stalls
/// an event on a copy of tens of megabytes, and each allocation stays small.
#[derive(Serialize, Deserialize)]
pub(super) struct Slab<I, T> {
    segments: Vec<Vec<Entry<T>>>,
    /// The most recently freed index, [`NONE`] if none.
    free: usize,
    len: usize,
    _index: PhantomData<I>,
}

/// Entries per segment.
const SEGMENT: usize = 1024;

#[derive(Serialize, Deserialize)]
enum Entry<T> {
    Occupied(T),
    /// The next free index, [`NONE`] if none.
    Vacant(usize),
}

/// Ends the free list. Internal to the slab (never handed out as a slot), and unlike an
/// `Option` it keeps [`Entry::Vacant`] one word.
const NONE: usize = usize::MAX;

impl<I: Idx, T> Default for Slab<I, T> {
    fn default() -> Self {
        Slab { segments: Vec::new(), free: NONE, len: 0, _index: PhantomData }
    }
}

/// `#[inline]` on the lookups and updates, as on [`super::pool::Pool`]: the scheduler calls them per
/// event, and inlining them there should not depend on which codegen unit this module lands in.
impl<I: Idx, T> Slab<I, T> {
    #[inline]
    fn entry(&self, idx: usize) -> Option<&Entry<T>> {
        self.segments.get(idx / SEGMENT)?.get(idx % SEGMENT)
    }

    #[inline]
    fn entry_mut(&mut self, idx: usize) -> Option<&mut Entry<T>> {
        self.segments.get_mut(idx / SEGMENT)?.get_mut(idx % SEGMENT)
    }

    #[inline]
    pub(super) fn insert(&mut self, item: T) -> I {
        self.len += 1;
        let idx = self.free;
        if let Some(entry) = self.segments.get_mut(idx / SEGMENT).and_then(|s| s.get_mut(idx % SEGMENT)) {
            if let Entry::Vacant(next) = *entry {
                self.free = next;
            }
            *entry = Entry::Occupied(item);
            return I::new(idx);
        }
        let segments = self.segments.len();
        let idx = match self.segments.last_mut() {
            Some(last) if last.len() < SEGMENT => {
                last.push(Entry::Occupied(item));
                (segments - 1) * SEGMENT + last.len() - 1
            }
            _ => {
                // The first segment grows as needed, so small slabs stay small.
                let mut segment = Vec::with_capacity(if segments == 0 { 0 } else { SEGMENT });
                segment.push(Entry::Occupied(item));
                self.segments.push(segment);
                segments * SEGMENT
            }
        };
        I::new(idx)
    }

    #[inline]
    pub(super) fn remove(&mut self, idx: I) -> Option<T> {
        let idx = idx.index();
        let free = self.free;
        let entry = self.entry_mut(idx)?;
        if let Entry::Vacant(_) = entry {
            return None;
        }
        let Entry::Occupied(item) = std::mem::replace(entry, Entry::Vacant(free)) else { return None };
        self.free = idx;
        self.len -= 1;
        Some(item)
    }

    #[inline]
    pub(super) fn get(&self, idx: I) -> Option<&T> {
        match self.entry(idx.index())? {
            Entry::Occupied(item) => Some(item),
            Entry::Vacant(_) => None,
        }
    }

    #[inline]
    pub(super) fn get_mut(&mut self, idx: I) -> Option<&mut T> {
        match self.entry_mut(idx.index())? {
            Entry::Occupied(item) => Some(item),
            Entry::Vacant(_) => None,
        }
    }

    pub(super) fn len(&self) -> usize {
        self.len
    }

    pub(super) fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Entries in slot order, which depends only on the order of inserts and removes: a loop
    /// over it decides the same way in every run.
    pub(super) fn iter(&self) -> impl Iterator<Item = (I, &T)> {
        self.segments.iter().flatten().enumerate().filter_map(|(idx, entry)| match entry {
            Entry::Occupied(item) => Some((I::new(idx), item)),
            Entry::Vacant(_) => None,
        })
    }

    /// As [`Slab::iter`].
    pub(super) fn iter_mut(&mut self) -> impl Iterator<Item = (I, &mut T)> {
        self.segments.iter_mut().flatten().enumerate().filter_map(|(idx, entry)| match entry {
            Entry::Occupied(item) => Some((I::new(idx), item)),
            Entry::Vacant(_) => None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    define_id_type!(TestSlot);

    #[test]
    fn slab_reuses_indices_across_segments() {
        let slot = TestSlot::new;
        let mut slab: Slab<TestSlot, usize> = Slab::default();
        let n = 3 * SEGMENT + 5;
        for i in 0..n {
            assert_eq!(slab.insert(i), slot(i));
        }
        assert_eq!(slab.len(), n);
        assert_eq!(slab.get(slot(SEGMENT)), Some(&SEGMENT));
        assert_eq!(slab.remove(slot(SEGMENT)), Some(SEGMENT));
        assert_eq!(slab.remove(slot(SEGMENT)), None);
        assert_eq!(slab.remove(slot(7)), Some(7));
        assert_eq!(slab.get(slot(7)), None);
        assert_eq!(slab.get(slot(n)), None);
        assert_eq!(slab.remove(slot(n + 1)), None);
        // Most recently freed first, then new indices at the end.
        assert_eq!(slab.insert(100), slot(7));
        assert_eq!(slab.insert(101), slot(SEGMENT));
        assert_eq!(slab.insert(102), slot(n));
        *slab.get_mut(slot(n)).unwrap() += 1;
        assert_eq!(slab.get(slot(n)), Some(&103));
        let items: Vec<(TestSlot, usize)> = slab.iter().map(|(i, &v)| (i, v)).collect();
        assert_eq!(items.len(), n + 1);
        assert_eq!(items[7], (slot(7), 100));
        assert!(items.iter().enumerate().all(|(pos, &(i, _))| i == slot(pos)));
        for (_, v) in slab.iter_mut() {
            *v = 0;
        }
        assert!(slab.iter().all(|(_, &v)| v == 0));
    }

    #[test]
    fn index_vec_hands_out_consecutive_slots() {
        let mut items: IndexVec<TestSlot, &str> = IndexVec::default();
        assert_eq!(items.push("a"), TestSlot::new(0));
        let b = items.push("b");
        assert_eq!(b, TestSlot::new(1));
        items[b] = "c";
        assert_eq!((items[b], items.get(TestSlot::new(2))), ("c", None));
    }
}
