//! The original's storage semantics: write/read/has, evict/flush, LRU order by bytes,
//! oversized items, overwrite accounting.

use chia_cache::{CacheError, CacheStore, MAX_TAG_LEN, StoreOptions, StoreStats, entry_file_name};

use crate::common::{entry_files, entry_size, open, payload, temp_files, verify_payload};

#[test]
fn write_then_read_and_has() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(dir.path(), 1 << 20);
    assert!(!store.has("iter0"));
    assert_eq!(store.read("iter0"), None);

    let value = payload("iter0", 1, 5000);
    assert!(store.write("iter0", &value).expect("write"));
    assert!(store.has("iter0"));
    assert_eq!(store.read("iter0"), Some(value));
    assert_eq!(store.len(), 1);
    assert!(!store.is_empty());
    assert_eq!(store.budget(), 1 << 20);
}

#[test]
fn empty_payloads_and_unusual_tags_round_trip() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(dir.path(), 1 << 20);
    for tag in ["", "with/slash and space", "ünïcødé ✓", &"long".repeat(100), "../escape"] {
        assert!(store.write(tag, b"").expect("write empty"), "{tag:?}");
        assert_eq!(store.read(tag).as_deref(), Some(&b""[..]), "{tag:?}");
    }
    // Every entry is a file directly in the cache directory.
    assert_eq!(entry_files(dir.path()).len(), 5);
    assert!(dir.path().join(entry_file_name("../escape")).exists());
}

#[test]
fn accounted_size_is_the_file_length() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(dir.path(), 1 << 20);
    store.write("a", &[0u8; 1000]).expect("write a");
    store.write("bb", &[0u8; 10]).expect("write bb");
    assert_eq!(store.size_bytes(), entry_size("a", 1000) + entry_size("bb", 10));
    let on_disk: u64 =
        entry_files(dir.path()).iter().map(|path| path.metadata().expect("metadata").len()).sum();
    assert_eq!(store.size_bytes(), on_disk);
}

#[test]
fn evict_removes_one_entry_and_its_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(dir.path(), 1 << 20);
    store.write("a", b"1").expect("write a");
    store.write("b", b"2").expect("write b");
    assert!(store.evict("a"));
    assert!(!store.evict("a"), "evicting twice removes nothing");
    assert!(!store.evict("never"));
    assert_eq!(store.keys(), ["b"]);
    assert_eq!(store.read("a"), None);
    assert!(!store.entry_path("a").exists());
    assert_eq!(store.size_bytes(), entry_size("b", 1));
    assert_eq!(temp_files(dir.path()), Vec::<String>::new());
}

#[test]
fn flush_removes_everything() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(dir.path(), 1 << 20);
    for tag in ["a", "b", "c"] {
        store.write(tag, tag.as_bytes()).expect("write");
    }
    store.flush();
    assert!(store.is_empty());
    assert_eq!(store.size_bytes(), 0);
    assert_eq!(store.keys(), Vec::<String>::new());
    assert_eq!(entry_files(dir.path()), Vec::<std::path::PathBuf>::new());
    assert_eq!(temp_files(dir.path()), Vec::<String>::new());
    // The store is usable afterwards.
    assert!(store.write("a", b"again").expect("write after flush"));
    assert_eq!(store.read("a").as_deref(), Some(&b"again"[..]));
}

#[test]
fn writes_evict_least_recently_used_by_bytes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let item = entry_size("a", 100);
    let store = open(dir.path(), 3 * item);
    for tag in ["a", "b", "c"] {
        store.write(tag, &[0u8; 100]).expect("write");
    }
    assert_eq!(store.keys(), ["a", "b", "c"]);

    // A read marks MRU; `has` does not.
    assert!(store.read("a").is_some());
    assert!(store.has("b"));
    assert_eq!(store.keys(), ["b", "c", "a"]);

    store.write("d", &[0u8; 100]).expect("write d");
    assert_eq!(store.keys(), ["c", "a", "d"]);
    assert!(!store.has("b"));
    assert!(!store.entry_path("b").exists());

    // An entry twice the size evicts two.
    store.write("e", &[0u8; 233]).expect("write e");
    assert_eq!(store.keys(), ["d", "e"]);
    assert_eq!(store.size_bytes(), item + entry_size("e", 233));
    assert!(store.size_bytes() <= store.budget());
    assert_eq!(entry_files(dir.path()).len(), 2);
}

/// `(entries, bytes, evicted_for_room, evicted_explicitly)`.
fn sizes_and_evictions(stats: StoreStats) -> (u64, u64, u64, u64) {
    (stats.entries, stats.bytes, stats.evicted_for_room, stats.evicted_explicitly)
}

#[test]
fn stats_count_evictions_made_for_room_apart_from_those_asked_for() {
    let dir = tempfile::tempdir().expect("tempdir");
    let item = entry_size("a", 100);
    let store = open(dir.path(), 2 * item);
    for tag in ["a", "b", "c", "d"] {
        store.write(tag, &[0u8; 100]).expect("write");
    }
    assert_eq!(sizes_and_evictions(store.stats()), (2, 2 * item, 2, 0));
    assert!(store.evict("d"));
    assert!(!store.evict("d"));
    store.flush();
    assert_eq!(sizes_and_evictions(store.stats()), (0, 0, 2, 2));
    drop(store);

    // Entries over a smaller budget at a warm start are evicted for room too.
    let store = open(dir.path(), 3 * item);
    for tag in ["a", "b", "c"] {
        store.write(tag, &[0u8; 100]).expect("write");
    }
    drop(store);
    let store = open(dir.path(), item);
    assert_eq!(sizes_and_evictions(store.stats()), (1, item, 2, 0));
}

#[test]
fn stats_count_hits_misses_writes_and_damage() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(dir.path(), 1 << 20);
    assert_eq!(store.stats(), StoreStats::default());
    store.write("a", b"1").expect("write");
    store.write("b", b"2").expect("write");
    store.write("a", b"3").expect("overwrite");
    // Too large for the budget: not a write.
    assert!(!store.write("huge", &vec![0u8; 2 << 20]).expect("oversized"));
    assert!(store.read("a").is_some());
    assert!(store.read("a").is_some());
    assert!(store.read("never").is_none());
    assert!(store.has("b"), "has is not a read");
    std::fs::write(store.entry_path("b"), b"garbage").expect("damage b");
    assert!(store.read("b").is_none());
    let stats = store.stats();
    assert_eq!((stats.hits, stats.misses, stats.writes, stats.dropped_damaged), (2, 2, 3, 1));
    assert_eq!((stats.entries, stats.bytes), (1, entry_size("a", 1)));
}

#[test]
fn an_item_larger_than_the_budget_is_not_stored() {
    let dir = tempfile::tempdir().expect("tempdir");
    let budget = entry_size("big", 100);
    let store = open(dir.path(), budget);
    store.write("small", b"s").expect("write small");

    assert!(!store.write("big", &[0u8; 101]).expect("oversized write"));
    assert!(!store.has("big"));
    assert_eq!(store.keys(), ["small"], "nothing was evicted for it");
    assert_eq!(temp_files(dir.path()), Vec::<String>::new());

    // Exactly the budget fits (and evicts the rest).
    assert!(store.write("big", &[0u8; 100]).expect("write at budget"));
    assert_eq!(store.keys(), ["big"]);
    assert_eq!(store.size_bytes(), budget);
}

#[test]
fn an_oversized_overwrite_keeps_the_previous_value_as_the_original_did() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(dir.path(), 1000);
    store.write("t", b"old").expect("write");
    assert!(!store.write("t", &[0u8; 1000]).expect("oversized overwrite"));
    assert_eq!(store.read("t").as_deref(), Some(&b"old"[..]));
}

#[test]
fn a_zero_budget_stores_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(dir.path(), 0);
    assert!(!store.write("t", b"").expect("write"));
    assert!(store.is_empty());
}

#[test]
fn overwriting_replaces_without_double_counting() {
    let dir = tempfile::tempdir().expect("tempdir");
    let item = entry_size("a", 100);
    let store = open(dir.path(), 2 * item);
    store.write("a", &payload("a", 1, 100)).expect("write a");
    store.write("b", &payload("b", 1, 100)).expect("write b");

    // Overwriting "a" must not count its old size against the room: nothing is evicted.
    store.write("a", &payload("a", 2, 100)).expect("overwrite a");
    assert_eq!(store.keys(), ["b", "a"]);
    assert_eq!(store.size_bytes(), 2 * item);
    assert_eq!(verify_payload("a", &store.read("a").expect("a")), Ok(2));

    // A smaller value shrinks the total.
    store.write("a", &payload("a", 3, 40)).expect("shrink a");
    assert_eq!(store.size_bytes(), item + entry_size("a", 40));
    assert_eq!(entry_files(dir.path()).len(), 2);
}

#[test]
fn keys_are_in_lru_order_oldest_first() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(dir.path(), 1 << 20);
    for tag in ["x", "y", "z"] {
        store.write(tag, b"v").expect("write");
    }
    store.read("x");
    store.write("y", b"w").expect("overwrite");
    assert_eq!(store.keys(), ["z", "x", "y"]);
}

#[test]
fn a_tag_longer_than_the_limit_is_an_error() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(dir.path(), 1 << 30);
    let tag = "t".repeat(MAX_TAG_LEN + 1);
    let error = store.write(&tag, b"v").expect_err("tag too long");
    assert!(matches!(error, CacheError::TagTooLong { .. }), "{error:?}");
    assert!(store.write(&"t".repeat(MAX_TAG_LEN), b"v").expect("longest tag"));
}

#[test]
fn one_store_per_directory() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(dir.path(), 1 << 20);
    let error = CacheStore::open(dir.path(), 1 << 20, StoreOptions::default()).expect_err("second open");
    assert!(matches!(error, CacheError::DirectoryLocked { .. }), "{error:?}");
    assert!(error.to_string().contains(&dir.path().display().to_string()), "{error}");
    drop(store);
    open(dir.path(), 1 << 20);
}

#[test]
fn open_creates_missing_directories() {
    let dir = tempfile::tempdir().expect("tempdir");
    let nested = dir.path().join("a/b/cache");
    let store = open(&nested, 1 << 20);
    assert!(store.write("t", b"v").expect("write"));
    assert_eq!(store.dir(), nested);
}

#[test]
fn open_fails_when_the_directory_is_a_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("not_a_dir");
    std::fs::write(&file, b"x").expect("write file");
    let error = CacheStore::open(&file, 1 << 20, StoreOptions::default()).expect_err("open on a file");
    assert!(matches!(error, CacheError::OpenDirectory { .. }), "{error:?}");
    assert!(error.to_string().contains("not_a_dir"), "{error}");
}

#[test]
fn write_many_returns_each_writes_result_in_order() {
    for durability in
        [chia_cache::Durability::Full, chia_cache::Durability::Data, chia_cache::Durability::None]
    {
        let dir = tempfile::tempdir().expect("tempdir");
        let options = StoreOptions::default().with_durability(durability);
        let store = CacheStore::open(dir.path(), 1000, options).expect("open");
        let plain = chia_cache::WriteOptions::default();
        let long_tag = "t".repeat(MAX_TAG_LEN + 1);
        let (first, too_large, second) = (payload("a", 1, 100), vec![0u8; 1000], payload("a", 2, 100));
        let results = store.write_many([
            ("a", first.as_slice(), &plain),
            ("big", too_large.as_slice(), &plain),
            (long_tag.as_str(), b"v".as_slice(), &plain),
            ("b", b"b".as_slice(), &plain),
            ("a", second.as_slice(), &plain),
        ]);
        assert_eq!(results.len(), 5);
        assert!(matches!(results[0], Ok(true)), "{durability:?}: {:?}", results[0]);
        assert!(matches!(results[1], Ok(false)), "{:?}", results[1]);
        assert!(matches!(results[2], Err(CacheError::TagTooLong { .. })), "{:?}", results[2]);
        assert!(matches!(results[3], Ok(true)), "{:?}", results[3]);
        assert!(matches!(results[4], Ok(true)), "{:?}", results[4]);
        assert_eq!(store.keys(), ["b", "a"], "{durability:?}");
        assert_eq!(verify_payload("a", &store.read("a").expect("a")), Ok(2), "the last write wins");
        assert_eq!(store.stats().writes, 3);
        assert_eq!(temp_files(dir.path()), Vec::<String>::new());
    }
}
