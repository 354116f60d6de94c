//! The in-memory LRU index: tag → entry size, in recency order. Pure bookkeeping, no I/O.

use std::collections::{BTreeMap, HashMap};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct IndexEntry {
    /// Bytes the entry's file occupies (header + tag + payload).
    pub size: u64,
    /// Identifies this version of the entry: a later write of the same tag gets a new one, so
    /// a reader that found a damaged file drops the entry only if it was not replaced since.
    pub generation: u64,
    /// Position in recency order (larger = more recently used).
    recency: u64,
}

#[derive(Debug, Default)]
pub(crate) struct LruIndex {
    entries: HashMap<String, IndexEntry>,
    by_recency: BTreeMap<u64, String>,
    total_bytes: u64,
    clock: u64,
}

impl LruIndex {
    fn tick(&mut self) -> u64 {
        self.clock += 1;
        self.clock
    }

    pub(crate) fn get(&self, tag: &str) -> Option<IndexEntry> {
        self.entries.get(tag).copied()
    }

    /// Adds or replaces `tag` as the most recently used entry; returns its generation.
    pub(crate) fn insert(&mut self, tag: &str, size: u64) -> u64 {
        self.remove(tag);
        let recency = self.tick();
        let generation = self.tick();
        self.entries.insert(tag.to_owned(), IndexEntry { size, generation, recency });
        self.by_recency.insert(recency, tag.to_owned());
        self.total_bytes += size;
        generation
    }

    /// Marks `tag` most recently used.
    pub(crate) fn touch(&mut self, tag: &str) -> Option<IndexEntry> {
        let recency = self.tick();
        let entry = self.entries.get_mut(tag)?;
        let old_recency = std::mem::replace(&mut entry.recency, recency);
        let entry = *entry;
        if let Some(key) = self.by_recency.remove(&old_recency) {
            self.by_recency.insert(recency, key);
        }
        Some(entry)
    }

    pub(crate) fn remove(&mut self, tag: &str) -> Option<IndexEntry> {
        let entry = self.entries.remove(tag)?;
        self.by_recency.remove(&entry.recency);
        self.total_bytes -= entry.size;
        Some(entry)
    }

    /// Removes least recently used entries until `incoming` more bytes fit in `budget`;
    /// returns the removed tags, oldest first.
    pub(crate) fn evict_to_fit(&mut self, incoming: u64, budget: u64) -> Vec<String> {
        let mut evicted = Vec::new();
        while self.total_bytes.saturating_add(incoming) > budget {
            let Some((_, tag)) = self.by_recency.pop_first() else { break };
            if let Some(entry) = self.entries.remove(&tag) {
                self.total_bytes -= entry.size;
            }
            evicted.push(tag);
        }
        evicted
    }

    /// Removes every entry; returns their tags.
    pub(crate) fn clear(&mut self) -> Vec<String> {
        self.entries.clear();
        self.total_bytes = 0;
        std::mem::take(&mut self.by_recency).into_values().collect()
    }

    /// Tags from least to most recently used.
    pub(crate) fn keys(&self) -> Vec<String> {
        self.by_recency.values().cloned().collect()
    }

    pub(crate) fn contains(&self, tag: &str) -> bool {
        self.entries.contains_key(tag)
    }

    pub(crate) fn total_bytes(&self) -> u64 {
        self.total_bytes
    }

    pub(crate) fn len(&self) -> usize {
        self.entries.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn touch_moves_to_the_back_and_eviction_takes_from_the_front() {
        let mut index = LruIndex::default();
        for tag in ["a", "b", "c"] {
            index.insert(tag, 10);
        }
        index.touch("a");
        assert_eq!(index.keys(), ["b", "c", "a"]);
        assert_eq!(index.evict_to_fit(15, 30), ["b", "c"]);
        assert_eq!(index.keys(), ["a"]);
        assert_eq!(index.total_bytes(), 10);
    }

    #[test]
    fn reinsert_replaces_size_and_generation() {
        let mut index = LruIndex::default();
        let first = index.insert("a", 10);
        let second = index.insert("a", 4);
        assert_ne!(first, second);
        assert_eq!(index.total_bytes(), 4);
        assert_eq!(index.len(), 1);
        assert_eq!(index.clear(), ["a"]);
        assert_eq!(index.total_bytes(), 0);
    }
}
