//! Interned resources for the scheduler's hot path.
//!
//! A placement decision compares a request with a node's free amounts. Doing that on
//! [`Resources`] (a string-keyed map) would hash or compare names on every decision, and giving
//! amounts back would allocate a `String` per name. Here every name is interned once to a small
//! index, a request becomes a short slice sorted by that index, and a node's amounts a sorted
//! array of slots, so checking, taking and returning are a few integer comparisons.
//!
//! [`TaskIndex`], which finds a task's slot from its id without hashing, lives here too.

use super::index::TaskSlot;
use chia_core::resources::CPU;
use chia_core::{ResourceAmount, Resources, SessionId, TaskId};
use serde::{Deserialize, Serialize};
use std::collections::{HashMap, VecDeque};

/// An interned resource name.
pub(super) type ResIdx = u32;

/// An interned request: `(name, fixed-point amount)` pairs sorted by name, amounts non-zero.
pub(super) type Need = Box<[(ResIdx, u64)]>;

/// Every resource name seen so far. `CPU` is always index [`Names::CPU`].
#[derive(Serialize, Deserialize)]
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

    /// Whether `idx` names a resource a placement group's bundle offers.
    pub(super) fn is_group(&self, idx: ResIdx) -> bool {
        self.names.get(idx as usize).is_some_and(|name| name.starts_with(chia_core::placement::GROUP_PREFIX))
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

#[derive(Clone, Copy, Debug, Serialize, Deserialize)]
pub(super) struct Slot {
    res: ResIdx,
    capacity: u64,
    free: u64,
}

/// What one node has, and how much of it is free right now.
#[derive(Clone, Serialize, Deserialize)]
pub(super) struct Pool {
    slots: Box<[Slot]>,
}

/// `#[inline]` on the hot methods: they are called from the scheduler's module, and without it
/// whether they are inlined there depends on how rustc happens to split the crate into codegen
/// units.
impl Pool {
    pub(super) fn new(capacity: &[(ResIdx, u64)]) -> Pool {
        Pool {
            slots: capacity
                .iter()
                .map(|&(res, amount)| Slot { res, capacity: amount, free: amount })
                .collect(),
        }
    }

    /// Whether every `(res, amount)` of `need` has a slot for which `ok(slot, amount)`. Both
    /// lists are sorted by name, so one pass over each finds the slots.
    #[inline]
    fn all(&self, need: &[(ResIdx, u64)], ok: impl Fn(&Slot, u64) -> bool) -> bool {
        let mut slots = self.slots.iter();
        need.iter().all(|&(res, amount)| {
            slots.by_ref().find(|s| s.res >= res).is_some_and(|s| s.res == res && ok(s, amount))
        })
    }

    /// Applies `apply` to the slot of each `(res, amount)` of `need` the pool has.
    #[inline]
    fn each(&mut self, need: &[(ResIdx, u64)], mut apply: impl FnMut(&mut Slot, ResIdx, u64)) {
        let mut i = 0;
        for &(res, amount) in need {
            while self.slots.get(i).is_some_and(|s| s.res < res) {
                i += 1;
            }
            match self.slots.get_mut(i) {
                Some(slot) if slot.res == res => apply(slot, res, amount),
                Some(_) => {}
                None => return,
            }
        }
    }

    /// True when `need` would fit if nothing else ran here.
    #[inline]
    pub(super) fn could_hold(&self, need: &[(ResIdx, u64)]) -> bool {
        self.all(need, |s, amount| s.capacity >= amount)
    }

    /// True when `need` fits in what is free now.
    #[inline]
    pub(super) fn fits(&self, need: &[(ResIdx, u64)]) -> bool {
        self.all(need, |s, amount| s.free >= amount)
    }

    /// Removes `need` from the free amounts; the caller has checked [`Pool::fits`].
    #[inline]
    pub(super) fn take(&mut self, need: &[(ResIdx, u64)]) {
        self.each(need, |slot, _, amount| slot.free = slot.free.saturating_sub(amount));
    }

    /// Returns `need` except the resource `except` (already returned), never above capacity,
    /// so a bug elsewhere can not make a node look bigger than it is.
    #[inline]
    pub(super) fn give_back(&mut self, need: &[(ResIdx, u64)], except: Option<ResIdx>) {
        self.each(need, |slot, res, amount| {
            if Some(res) != except {
                slot.free = slot.free.saturating_add(amount).min(slot.capacity);
            }
        });
    }

    /// The free amounts, by interned name.
    pub(super) fn free(&self) -> impl Iterator<Item = (ResIdx, u64)> + '_ {
        self.slots.iter().map(|s| (s.res, s.free))
    }

    /// This pool as if nothing ran here (for what could ever fit).
    pub(super) fn idle(&self) -> Pool {
        Pool { slots: self.slots.iter().map(|s| Slot { free: s.capacity, ..*s }).collect() }
    }

    /// Adds `amounts` (sorted by name) to the capacity and the free amounts, with new slots
    /// for names the pool lacks (a placement group's bundle reserved here). Rare: rebuilds.
    pub(super) fn add(&mut self, amounts: &[(ResIdx, u64)]) {
        let mut slots = self.slots.to_vec();
        for &(res, amount) in amounts {
            match slots.binary_search_by_key(&res, |s| s.res) {
                Ok(i) => {
                    slots[i].capacity = slots[i].capacity.saturating_add(amount);
                    slots[i].free = slots[i].free.saturating_add(amount);
                }
                Err(i) => slots.insert(i, Slot { res, capacity: amount, free: amount }),
            }
        }
        self.slots = slots.into();
    }

    /// Takes `amounts` back off the capacity (and the free amounts, as far as they go),
    /// dropping slots left with no capacity: a bundle reserved here is given up.
    pub(super) fn remove(&mut self, amounts: &[(ResIdx, u64)]) {
        let mut slots = self.slots.to_vec();
        for &(res, amount) in amounts {
            if let Ok(i) = slots.binary_search_by_key(&res, |s| s.res) {
                slots[i].capacity = slots[i].capacity.saturating_sub(amount);
                slots[i].free = slots[i].free.saturating_sub(amount).min(slots[i].capacity);
            }
        }
        slots.retain(|s| s.capacity > 0);
        self.slots = slots.into();
    }
}

/// The sum of several interned requests.
pub(super) fn sum_needs<'a>(needs: impl IntoIterator<Item = &'a Need>) -> Need {
    let mut sum: std::collections::BTreeMap<ResIdx, u64> = std::collections::BTreeMap::new();
    for need in needs {
        for &(res, amount) in need.iter() {
            let entry = sum.entry(res).or_default();
            *entry = entry.saturating_add(amount);
        }
    }
    sum.into_iter().collect()
}

/// Task id → slot. A session numbers its tasks with a counter, so each session keeps a window
/// over consecutive sequence numbers: a lookup is an index into it, without hashing, and tasks
/// submitted one after another sit next to each other in memory (a hash map of a million tasks
/// misses the cache on every lookup). Ids far from their session's window (out of order, or left
/// behind while the session moved on) go to a hash map instead, so memory stays proportional to
/// the tasks known whatever ids a peer sends.
#[derive(Serialize, Deserialize)]
pub(super) struct TaskIndex {
    windows: Vec<Window>,
    by_session: HashMap<u64, usize>,
    /// The window used last, tried before `by_session`: events mostly come in runs of one session.
    last: usize,
    sparse: HashMap<TaskId, TaskSlot>,
    /// When `windows` grows to this many, empty ones are dropped.
    sweep_at: usize,
}

/// The slots of one session's tasks with sequence numbers `base..base + slots.len()`.
#[derive(Serialize, Deserialize)]
struct Window {
    session: u64,
    base: u64,
    /// [`TaskSlot::NONE`] where no task is; never starts or ends with it.
    slots: VecDeque<TaskSlot>,
    live: usize,
}

impl Window {
    /// A window with `live` tasks spans at most this many sequence numbers.
    fn max_span(live: usize) -> u64 {
        2 * live as u64 + 64
    }

    fn get(&self, seq: u64) -> Option<&TaskSlot> {
        let offset = usize::try_from(seq.checked_sub(self.base)?).ok()?;
        self.slots.get(offset).filter(|&&slot| slot != TaskSlot::NONE)
    }

    /// Records `seq` → `slot` (`seq` is not in the window), unless that would stretch the window
    /// too far; tasks it evicts from its front to make room go to `sparse`. Returns whether it
    /// took `seq`.
    fn insert(&mut self, seq: u64, slot: TaskSlot, sparse: &mut HashMap<TaskId, TaskSlot>) -> bool {
        if self.live == 0 {
            self.slots.clear();
            self.base = seq;
        }
        let end = self.base + self.slots.len() as u64;
        if seq < self.base {
            if end - seq > Window::max_span(self.live + 1) {
                return false;
            }
            for _ in seq + 1..self.base {
                self.slots.push_front(TaskSlot::NONE);
            }
            self.slots.push_front(slot);
            self.base = seq;
        } else if seq < end {
            let Some(entry) = self.slots.get_mut((seq - self.base) as usize) else { return false };
            debug_assert_eq!(*entry, TaskSlot::NONE);
            *entry = slot;
        } else {
            if seq - end > Window::max_span(self.live) {
                return false; // Far ahead: an outlier, not the session moving on.
            }
            // Moving on: tasks left behind at the front make way, so a long-running task does
            // not stretch the window over everything submitted after it.
            while self.live > 0 && seq + 1 - self.base > Window::max_span(self.live + 1) {
                if let Some(old) = self.slots.pop_front()
                    && old != TaskSlot::NONE
                {
                    sparse.insert(TaskId::new(SessionId(self.session), self.base), old);
                    self.live -= 1;
                }
                self.base += 1;
                self.trim();
            }
            if self.live == 0 {
                self.base = seq;
            }
            let end = self.base + self.slots.len() as u64;
            for _ in end..seq {
                self.slots.push_back(TaskSlot::NONE);
            }
            self.slots.push_back(slot);
        }
        self.live += 1;
        true
    }

    fn remove(&mut self, seq: u64) -> Option<TaskSlot> {
        let offset = usize::try_from(seq.checked_sub(self.base)?).ok()?;
        let entry = self.slots.get_mut(offset)?;
        if *entry == TaskSlot::NONE {
            return None;
        }
        let slot = std::mem::replace(entry, TaskSlot::NONE);
        self.live -= 1;
        self.trim();
        if self.live == 0 && self.slots.capacity() > 4096 {
            self.slots = VecDeque::new(); // A burst ended: give its memory back.
        }
        Some(slot)
    }

    /// Drops vacant entries at both ends.
    fn trim(&mut self) {
        while self.slots.front() == Some(&TaskSlot::NONE) {
            self.slots.pop_front();
            self.base += 1;
        }
        while self.slots.back() == Some(&TaskSlot::NONE) {
            self.slots.pop_back();
        }
    }
}

impl Default for TaskIndex {
    fn default() -> Self {
        TaskIndex {
            windows: Vec::new(),
            by_session: HashMap::new(),
            last: 0,
            sparse: HashMap::new(),
            sweep_at: 16,
        }
    }
}

impl TaskIndex {
    #[cfg(test)]
    pub(super) fn len(&self) -> usize {
        self.windows.iter().map(|w| w.live).sum::<usize>() + self.sparse.len()
    }

    fn window(&self, session: u64) -> Option<usize> {
        match self.windows.get(self.last) {
            Some(w) if w.session == session => Some(self.last),
            _ => self.by_session.get(&session).copied(),
        }
    }

    /// A reference, as `Option<&TaskSlot>` fits in one register where `Option<TaskSlot>` needs
    /// two: this is called once or more per event.
    pub(super) fn get(&self, id: &TaskId) -> Option<&TaskSlot> {
        if let Some(w) = self.window(id.session().0)
            && let Some(slot) = self.windows[w].get(id.seq())
        {
            return Some(slot);
        }
        if self.sparse.is_empty() { None } else { self.sparse.get(id) }
    }

    pub(super) fn contains_key(&self, id: &TaskId) -> bool {
        self.get(id).is_some()
    }

    /// Records `id` → `slot`; `id` must not be known yet.
    pub(super) fn insert(&mut self, id: TaskId, slot: TaskSlot) {
        let session = id.session().0;
        let w = match self.window(session) {
            Some(w) => w,
            None => self.add_window(session),
        };
        self.last = w;
        if !self.windows[w].insert(id.seq(), slot, &mut self.sparse) {
            self.sparse.insert(id, slot);
        }
    }

    pub(super) fn remove(&mut self, id: &TaskId) -> Option<TaskSlot> {
        if let Some(w) = self.window(id.session().0) {
            self.last = w;
            if let Some(slot) = self.windows[w].remove(id.seq()) {
                return Some(slot);
            }
        }
        if self.sparse.is_empty() { None } else { self.sparse.remove(id) }
    }

    fn add_window(&mut self, session: u64) -> usize {
        if self.windows.len() >= self.sweep_at {
            // Sessions come and go: forget the windows of those with no task left.
            self.windows.retain(|w| w.live > 0);
            self.by_session =
                self.windows.iter().enumerate().map(|(w, window)| (window.session, w)).collect();
            self.sweep_at = 16.max(2 * self.windows.len());
        }
        let w = self.windows.len();
        self.windows.push(Window { session, base: 0, slots: VecDeque::new(), live: 0 });
        self.by_session.insert(session, w);
        w
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scheduler::index::Idx;

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
        // A resource the pool lacks is skipped, not taken for the next one.
        let odd = names.need(&Resources::parse("zz=1,adder=3,gpu=1,CPU=1").unwrap());
        assert!(!pool.fits(&odd) && !pool.could_hold(&odd));
        pool.take(&odd);
        assert_eq!(names.resources(pool.free()), Resources::parse("adder=5,CPU=1").unwrap());
        pool.give_back(&odd, None);
        assert_eq!(names.resources(pool.free()), Resources::parse("adder=8,CPU=2").unwrap());
    }

    /// The index agrees with a plain map whatever order ids come and go in, and keeps its
    /// windows short.
    #[test]
    fn task_index_matches_a_map() {
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let mut rand = move |n: u64| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state % n
        };
        let mut index = TaskIndex::default();
        let mut model: HashMap<TaskId, TaskSlot> = HashMap::new();
        let mut next = [0u64; 4];
        for step in 0..200_000usize {
            let session = rand(4);
            let id = match rand(20) {
                // Mostly each session's next id, sometimes one out of order or far away.
                0..=7 => {
                    next[session as usize] += 1;
                    TaskId::new(SessionId(session), next[session as usize])
                }
                8 => TaskId::new(SessionId(session), next[session as usize].saturating_sub(rand(200))),
                9 => TaskId::new(SessionId(session), rand(1 << 40)),
                _ => {
                    // Remove an id: a recent one mostly, which leaves stragglers, sometimes any.
                    let back = [20, 20, 20, 100, next[session as usize] + 1][rand(5) as usize];
                    let seq = next[session as usize].saturating_sub(rand(back));
                    let id = TaskId::new(SessionId(session), seq);
                    assert_eq!(index.remove(&id), model.remove(&id));
                    continue;
                }
            };
            assert_eq!(index.get(&id), model.get(&id));
            let mut inserted = false;
            if let std::collections::hash_map::Entry::Vacant(entry) = model.entry(id) {
                index.insert(id, TaskSlot::new(step));
                entry.insert(TaskSlot::new(step));
                inserted = true;
            }
            let w = &index.windows[index.last];
            if inserted && id.seq() == next[session as usize] && w.get(id.seq()).is_some() {
                // The window moved on: whatever stayed behind, it stays short.
                assert!(w.slots.len() as u64 <= Window::max_span(w.live));
            }
            if step % 1000 == 0 {
                assert_eq!(index.len(), model.len());
                for (id, slot) in &model {
                    assert_eq!(index.get(id), Some(slot));
                }
                for w in &index.windows {
                    assert_eq!(w.slots.iter().filter(|&&s| s != TaskSlot::NONE).count(), w.live);
                }
            }
        }
        let ids: Vec<TaskId> = model.keys().copied().collect();
        for id in ids {
            assert_eq!(index.remove(&id), model.remove(&id));
            assert_eq!(index.remove(&id), None);
        }
        assert_eq!(index.len(), 0);
    }

    #[test]
    fn task_index_keeps_consecutive_ids_in_windows() {
        let mut index = TaskIndex::default();
        let id = |seq| TaskId::new(SessionId(7), seq);
        let slot = |seq| TaskSlot::new(seq as usize);
        // A long-running task at the front does not hold the window back.
        index.insert(id(0), slot(0));
        for seq in 1..10_000 {
            index.insert(id(seq), slot(seq));
            assert_eq!(index.remove(&id(seq)), Some(slot(seq)));
        }
        assert!(index.windows[0].slots.len() <= 2);
        assert_eq!(index.get(&id(0)), Some(&slot(0)));
        assert_eq!(index.remove(&id(0)), Some(slot(0)));
        assert_eq!(index.len(), 0);
        for seq in 0..1000 {
            index.insert(id(seq), slot(seq));
        }
        assert!(index.sparse.is_empty());
        assert_eq!(index.windows[0].slots.len(), 1000);
    }
}
