//! The in-memory LRU index: tag → entry metadata, in recency order. Pure bookkeeping, no I/O.
//!
//! A slab of slots linked from least to most recently used, and a map from tag to slot: every
//! operation is constant time, and each tag is allocated once (shared by the map and its
//! slot), which matters for a million entries.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

/// What the index knows of an entry besides its tag.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct IndexEntry {
    /// Bytes the entry's file occupies (header + tag + payload).
    pub size: u64,
    /// When the entry expires, in milliseconds since the Unix epoch; 0 for never.
    pub expires_at: u64,
    /// The modification time the store gave the file (or found on it), in nanoseconds since
    /// the Unix epoch: the snapshot records it, and a warm start trusts a file that still has
    /// it.
    pub mtime_ns: i64,
    /// The 16 hex digits of the file name, as a number (see `naming::name_digest`).
    pub digest: u64,
    /// Identifies this version of the entry: a later write of the same tag gets a new one, so
    /// a reader that found a damaged file drops the entry only if it was not replaced since.
    pub generation: u64,
}

impl IndexEntry {
    /// Whether the entry has expired at `now_ms` (milliseconds since the Unix epoch).
    pub(crate) fn expired_at(&self, now_ms: u64) -> bool {
        self.expires_at != 0 && now_ms >= self.expires_at
    }
}

/// The entry metadata a caller supplies; the index adds the generation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct EntryMeta {
    pub size: u64,
    pub expires_at: u64,
    pub mtime_ns: i64,
    pub digest: u64,
}

/// The index's size, readable without its lock ([`crate::CacheStore::stats`]).
#[derive(Debug, Default)]
pub(crate) struct Gauges {
    pub entries: AtomicU64,
    pub bytes: AtomicU64,
}

const NIL: u32 = u32::MAX;

#[derive(Debug)]
struct Slot {
    tag: Arc<str>,
    entry: IndexEntry,
    prev: u32,
    next: u32,
}

#[derive(Debug)]
pub(crate) struct LruIndex {
    map: HashMap<Arc<str>, u32>,
    slots: Vec<Slot>,
    free: Vec<u32>,
    /// Least recently used.
    head: u32,
    /// Most recently used.
    tail: u32,
    total_bytes: u64,
    next_generation: u64,
    gauges: Arc<Gauges>,
    /// Put in freed slots, so that freeing allocates nothing.
    empty_tag: Arc<str>,
}

impl Default for LruIndex {
    fn default() -> Self {
        LruIndex::new(Arc::default())
    }
}

impl LruIndex {
    /// An empty index that keeps `gauges` up to date.
    pub(crate) fn new(gauges: Arc<Gauges>) -> Self {
        gauges.entries.store(0, Ordering::Relaxed);
        gauges.bytes.store(0, Ordering::Relaxed);
        LruIndex {
            map: HashMap::new(),
            slots: Vec::new(),
            free: Vec::new(),
            head: NIL,
            tail: NIL,
            total_bytes: 0,
            next_generation: 0,
            gauges,
            empty_tag: Arc::from(""),
        }
    }

    /// Room for `additional` more entries without rehashing.
    pub(crate) fn reserve(&mut self, additional: usize) {
        self.map.reserve(additional);
        self.slots.reserve(additional.saturating_sub(self.free.len()));
    }

    /// Brings the gauges up to date (after [`LruIndex::insert_new`]s, which leave them).
    pub(crate) fn publish(&self) {
        self.gauges.entries.store(self.map.len() as u64, Ordering::Relaxed);
        self.gauges.bytes.store(self.total_bytes, Ordering::Relaxed);
    }

    fn unlink(&mut self, slot: u32) {
        let (prev, next) = {
            let slot = &self.slots[slot as usize];
            (slot.prev, slot.next)
        };
        match prev {
            NIL => self.head = next,
            prev => self.slots[prev as usize].next = next,
        }
        match next {
            NIL => self.tail = prev,
            next => self.slots[next as usize].prev = prev,
        }
    }

    fn link_last(&mut self, slot: u32) {
        let old_tail = self.tail;
        {
            let entry = &mut self.slots[slot as usize];
            entry.prev = old_tail;
            entry.next = NIL;
        }
        match old_tail {
            NIL => self.head = slot,
            old_tail => self.slots[old_tail as usize].next = slot,
        }
        self.tail = slot;
    }

    pub(crate) fn get(&self, tag: &str) -> Option<IndexEntry> {
        self.map.get(tag).map(|&slot| self.slots[slot as usize].entry)
    }

    /// Adds or replaces `tag` as the most recently used entry; returns its generation.
    pub(crate) fn insert(&mut self, tag: &str, meta: EntryMeta) -> u64 {
        self.remove(tag);
        let generation = self.insert_new(tag, meta);
        self.publish();
        generation
    }

    /// [`LruIndex::insert`] of a tag known not to be in the index (a warm start's), without
    /// looking for it first and without updating the gauges (call [`LruIndex::publish`]).
    pub(crate) fn insert_new(&mut self, tag: &str, meta: EntryMeta) -> u64 {
        debug_assert!(!self.map.contains_key(tag), "{tag:?} is already indexed");
        self.next_generation += 1;
        let entry = IndexEntry {
            size: meta.size,
            expires_at: meta.expires_at,
            mtime_ns: meta.mtime_ns,
            digest: meta.digest,
            generation: self.next_generation,
        };
        let tag: Arc<str> = Arc::from(tag);
        let slot = match self.free.pop() {
            Some(slot) => {
                self.slots[slot as usize] = Slot { tag: Arc::clone(&tag), entry, prev: NIL, next: NIL };
                slot
            }
            None => {
                self.slots.push(Slot { tag: Arc::clone(&tag), entry, prev: NIL, next: NIL });
                (self.slots.len() - 1) as u32
            }
        };
        self.link_last(slot);
        self.map.insert(tag, slot);
        self.total_bytes += meta.size;
        entry.generation
    }

    /// Marks `tag` most recently used, recording `mtime_ns` as its file's new modification
    /// time.
    pub(crate) fn touch(&mut self, tag: &str, mtime_ns: i64) -> Option<IndexEntry> {
        let slot = *self.map.get(tag)?;
        self.unlink(slot);
        self.link_last(slot);
        let entry = &mut self.slots[slot as usize].entry;
        entry.mtime_ns = mtime_ns;
        Some(*entry)
    }

    pub(crate) fn remove(&mut self, tag: &str) -> Option<IndexEntry> {
        let slot = self.map.remove(tag)?;
        Some(self.free_slot(slot))
    }

    fn free_slot(&mut self, slot: u32) -> IndexEntry {
        self.unlink(slot);
        let freed = &mut self.slots[slot as usize];
        freed.tag = Arc::clone(&self.empty_tag);
        let entry = freed.entry;
        self.free.push(slot);
        self.total_bytes -= entry.size;
        self.publish();
        entry
    }

    /// Removes least recently used entries until `incoming` more bytes fit in `budget`;
    /// returns the removed tags, oldest first.
    pub(crate) fn evict_to_fit(&mut self, incoming: u64, budget: u64) -> Vec<String> {
        let mut evicted = Vec::new();
        while self.total_bytes.saturating_add(incoming) > budget && self.head != NIL {
            let slot = self.head;
            let tag = Arc::clone(&self.slots[slot as usize].tag);
            self.map.remove(&*tag);
            self.free_slot(slot);
            evicted.push(tag.to_string());
        }
        evicted
    }

    /// Entries from least to most recently used.
    pub(crate) fn iter(&self) -> impl Iterator<Item = (&Arc<str>, &IndexEntry)> {
        let mut next = self.head;
        std::iter::from_fn(move || {
            let slot = self.slots.get(next as usize)?;
            next = slot.next;
            Some((&slot.tag, &slot.entry))
        })
    }

    /// Tags from least to most recently used.
    pub(crate) fn keys(&self) -> Vec<String> {
        self.iter().map(|(tag, _)| tag.to_string()).collect()
    }

    pub(crate) fn contains(&self, tag: &str) -> bool {
        self.map.contains_key(tag)
    }

    pub(crate) fn total_bytes(&self) -> u64 {
        self.total_bytes
    }

    pub(crate) fn len(&self) -> usize {
        self.map.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(size: u64) -> EntryMeta {
        EntryMeta { size, expires_at: 0, mtime_ns: 0, digest: 0 }
    }

    #[test]
    fn touch_moves_to_the_back_and_eviction_takes_from_the_front() {
        let mut index = LruIndex::default();
        for tag in ["a", "b", "c"] {
            index.insert(tag, meta(10));
        }
        index.touch("a", 5);
        assert_eq!(index.keys(), ["b", "c", "a"]);
        assert_eq!(index.get("a").map(|entry| entry.mtime_ns), Some(5));
        assert_eq!(index.evict_to_fit(15, 30), ["b", "c"]);
        assert_eq!(index.keys(), ["a"]);
        assert_eq!(index.total_bytes(), 10);
    }

    #[test]
    fn reinsert_replaces_size_and_generation() {
        let gauges = Arc::new(Gauges::default());
        let mut index = LruIndex::new(Arc::clone(&gauges));
        let first = index.insert("a", meta(10));
        let second = index.insert("a", meta(4));
        assert_ne!(first, second);
        assert_eq!(index.total_bytes(), 4);
        assert_eq!(index.len(), 1);
        assert_eq!(gauges.bytes.load(Ordering::Relaxed), 4);
        assert_eq!(index.remove("a").map(|entry| entry.size), Some(4));
        assert_eq!(index.total_bytes(), 0);
        assert_eq!(gauges.entries.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn freed_slots_are_reused_and_the_order_survives_removals_anywhere() {
        let mut index = LruIndex::default();
        for tag in ["a", "b", "c", "d", "e"] {
            index.insert(tag, meta(1));
        }
        index.remove("c");
        index.remove("a");
        index.remove("e");
        index.insert("f", meta(1));
        index.insert("g", meta(1));
        index.touch("b", 0);
        assert_eq!(index.keys(), ["d", "f", "g", "b"]);
        assert_eq!(index.slots.len(), 5, "freed slots were reused");
        assert_eq!(index.len(), 4);
        assert_eq!(index.total_bytes(), 4);
    }
}
