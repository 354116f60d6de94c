//! Interned resources for the scheduler's hot path.
//!
//! A placement decision compares a request with a node's free amounts. Doing that on
//! [`Resources`] (a string-keyed map) would hash or compare names on every decision, and giving
//! amounts back would allocate a `String` per name. Here every name is interned once to a small
//! index, a request becomes a short slice sorted by that index, and a node's amounts a sorted
//! array of slots, so checking, taking and returning are a few integer comparisons.

use chia_core::resources::CPU;
use chia_core::{ResourceAmount, Resources};
use std::collections::HashMap;

/// An interned resource name.
pub(super) type ResIdx = u32;

/// An interned request: `(name, fixed-point amount)` pairs sorted by name, amounts non-zero.
pub(super) type Need = Box<[(ResIdx, u64)]>;

/// Every resource name seen so far. `CPU` is always index [`Names::CPU`].
pub(super) struct Names {
    names: Vec<String>,
    index: HashMap<String, ResIdx>,
}

impl Names {
    /// The index of the built-in `CPU` resource.
    pub(super) const CPU: ResIdx = 0;

    pub(super) fn new() -> Names {
        let mut names = Names { names: Vec::new(), index: HashMap::new() };
        names.intern(CPU);
        names
    }

    pub(super) fn intern(&mut self, name: &str) -> ResIdx {
        if let Some(&idx) = self.index.get(name) {
            return idx;
        }
        let idx = ResIdx::try_from(self.names.len()).unwrap_or(ResIdx::MAX);
        self.names.push(name.to_string());
        self.index.insert(name.to_string(), idx);
        idx
    }

    /// The interned form of `resources`.
    pub(super) fn need(&mut self, resources: &Resources) -> Need {
        let mut need: Vec<(ResIdx, u64)> =
            resources.iter().map(|(name, amount)| (self.intern(name), amount.as_fixed())).collect();
        need.sort_unstable();
        need.into()
    }

    /// Turns interned amounts back into a [`Resources`] (for accessors and messages, not the hot path).
    pub(super) fn resources(&self, amounts: impl Iterator<Item = (ResIdx, u64)>) -> Resources {
        let mut out = Resources::new();
        for (idx, amount) in amounts {
            if let Some(name) = self.names.get(idx as usize) {
                // Every interned name came out of a `Resources`, so it is already canonical.
                let _ = out.set(name, ResourceAmount::from_fixed(amount));
            }
        }
        out
    }
}

#[derive(Clone, Copy, Debug)]
struct Slot {
    res: ResIdx,
    capacity: u64,
    free: u64,
}

/// What one node has, and how much of it is free right now.
pub(super) struct Pool {
    slots: Box<[Slot]>,
}

impl Pool {
    pub(super) fn new(capacity: &[(ResIdx, u64)]) -> Pool {
        Pool {
            slots: capacity
                .iter()
                .map(|&(res, amount)| Slot { res, capacity: amount, free: amount })
                .collect(),
        }
    }

    fn slot(&self, res: ResIdx) -> Option<&Slot> {
        self.slots.binary_search_by_key(&res, |s| s.res).ok().map(|i| &self.slots[i])
    }

    fn slot_mut(&mut self, res: ResIdx) -> Option<&mut Slot> {
        self.slots.binary_search_by_key(&res, |s| s.res).ok().map(|i| &mut self.slots[i])
    }

    /// True when `need` would fit if nothing else ran here.
    pub(super) fn could_hold(&self, need: &[(ResIdx, u64)]) -> bool {
        need.iter().all(|&(res, amount)| self.slot(res).is_some_and(|s| s.capacity >= amount))
    }

    /// True when `need` fits in what is free now.
    pub(super) fn fits(&self, need: &[(ResIdx, u64)]) -> bool {
        need.iter().all(|&(res, amount)| self.slot(res).is_some_and(|s| s.free >= amount))
    }

    /// Removes `need` from the free amounts; the caller has checked [`Pool::fits`].
    pub(super) fn take(&mut self, need: &[(ResIdx, u64)]) {
        for &(res, amount) in need {
            if let Some(slot) = self.slot_mut(res) {
                slot.free = slot.free.saturating_sub(amount);
            }
        }
    }

    /// Returns `need` except the resource `except` (already returned), never above capacity,
    /// so a bug elsewhere can not make a node look bigger than it is.
    pub(super) fn give_back(&mut self, need: &[(ResIdx, u64)], except: Option<ResIdx>) {
        for &(res, amount) in need {
            if Some(res) != except
                && let Some(slot) = self.slot_mut(res)
            {
                slot.free = slot.free.saturating_add(amount).min(slot.capacity);
            }
        }
    }

    /// The free amounts, by interned name.
    pub(super) fn free(&self) -> impl Iterator<Item = (ResIdx, u64)> + '_ {
        self.slots.iter().map(|s| (s.res, s.free))
    }
}

/// A vector whose indices stay valid while other entries come and go; freed indices are reused.
pub(super) struct Slab<T> {
    items: Vec<Option<T>>,
    vacant: Vec<usize>,
    len: usize,
}

impl<T> Default for Slab<T> {
    fn default() -> Self {
        Slab { items: Vec::new(), vacant: Vec::new(), len: 0 }
    }
}

impl<T> Slab<T> {
    pub(super) fn insert(&mut self, item: T) -> usize {
        self.len += 1;
        match self.vacant.pop() {
            Some(idx) => {
                self.items[idx] = Some(item);
                idx
            }
            None => {
                self.items.push(Some(item));
                self.items.len() - 1
            }
        }
    }

    pub(super) fn remove(&mut self, idx: usize) -> Option<T> {
        let item = self.items.get_mut(idx)?.take()?;
        self.vacant.push(idx);
        self.len -= 1;
        Some(item)
    }

    pub(super) fn get(&self, idx: usize) -> Option<&T> {
        self.items.get(idx)?.as_ref()
    }

    pub(super) fn get_mut(&mut self, idx: usize) -> Option<&mut T> {
        self.items.get_mut(idx)?.as_mut()
    }

    pub(super) fn len(&self) -> usize {
        self.len
    }

    pub(super) fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub(super) fn iter(&self) -> impl Iterator<Item = (usize, &T)> {
        self.items.iter().enumerate().filter_map(|(idx, item)| Some((idx, item.as_ref()?)))
    }

    pub(super) fn iter_mut(&mut self) -> impl Iterator<Item = (usize, &mut T)> {
        self.items.iter_mut().enumerate().filter_map(|(idx, item)| Some((idx, item.as_mut()?)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pool_fits_takes_and_caps_returns() {
        let mut names = Names::new();
        let capacity = names.need(&Resources::parse("adder=8,CPU=2").unwrap());
        let request = names.need(&Resources::parse("adder=2,cpu=1").unwrap());
        let mut pool = Pool::new(&capacity);
        assert!(pool.could_hold(&request) && pool.fits(&request));
        pool.take(&request);
        pool.take(&request);
        assert!(!pool.fits(&request));
        pool.give_back(&request, Some(Names::CPU));
        pool.give_back(&request, None);
        pool.give_back(&request, None);
        assert_eq!(names.resources(pool.free()), Resources::parse("adder=8,CPU=2").unwrap());
        let gpu = names.need(&Resources::parse("gpu=1").unwrap());
        assert!(!pool.could_hold(&gpu));
    }
}
