//! Invalidation by pattern and re-checking every entry.

use std::fs::{self, File};

use chia_cache::{CacheStore, Durability, StoreOptions, TagPatterns};

use crate::common::{payload, verify_payload};

fn store_in(dir: &tempfile::TempDir, durability: Durability) -> CacheStore {
    CacheStore::open(dir.path(), 1 << 22, StoreOptions::default().with_durability(durability)).expect("open")
}

#[test]
fn evict_matching_removes_whole_tag_matches_and_survives_a_restart() {
    for durability in [Durability::Full, Durability::Data, Durability::None] {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let store = store_in(&dir, durability);
            for tag in ["iter1_a", "iter10_b", "iter1_c", "xiter1_d", "iter2_a", "final"] {
                assert!(store.write(tag, &payload(tag, 1, 200)).expect("write"));
            }
            store.read("iter1_a");
            let patterns = TagPatterns::new(["iter1_.*", "final"]).expect("patterns");
            assert_eq!(store.evict_matching(&patterns), ["iter1_c", "final", "iter1_a"], "{durability:?}");
            assert_eq!(store.keys(), ["iter10_b", "xiter1_d", "iter2_a"]);
            for tag in ["iter1_a", "iter1_c", "final"] {
                assert!(!store.entry_path(tag).exists(), "{tag}");
            }
            assert_eq!(store.stats().evicted_explicitly, 3);
            assert_eq!(store.evict_matching(&patterns), Vec::<String>::new());
        }
        let store = store_in(&dir, durability);
        let mut keys = store.keys();
        keys.sort();
        assert_eq!(keys, ["iter10_b", "iter2_a", "xiter1_d"], "{durability:?}");
    }
}

#[test]
fn verify_reports_bad_entries_and_removes_them_unless_dry_run() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = store_in(&dir, Durability::Full);
    for tag in ["good1", "flipped", "truncated", "missing", "good2"] {
        assert!(store.write(tag, &payload(tag, 1, 4000)).expect("write"));
    }
    let mut bytes = fs::read(store.entry_path("flipped")).expect("read");
    bytes[2000] ^= 1;
    fs::write(store.entry_path("flipped"), bytes).expect("damage");
    File::options()
        .write(true)
        .open(store.entry_path("truncated"))
        .and_then(|file| file.set_len(100))
        .expect("truncate");
    fs::remove_file(store.entry_path("missing")).expect("remove");
    let keys_before = store.keys();

    let report = store.verify(true);
    assert_eq!((report.checked, report.ok, report.removed, report.unreadable), (5, 2, 0, 0));
    let bad: Vec<&str> = report.bad.iter().map(|bad| bad.tag.as_str()).collect();
    assert_eq!(bad, ["flipped", "truncated", "missing"]);
    for entry in &report.bad {
        assert_eq!(entry.path, store.entry_path(&entry.tag));
        assert!(!entry.reason.is_empty());
    }
    assert!(report.bad[0].reason.contains("checksum"), "{}", report.bad[0].reason);
    assert!(report.bad[2].reason.contains("missing"), "{}", report.bad[2].reason);
    assert_eq!(store.keys(), keys_before, "a dry run changes nothing, not even recency");
    assert!(store.entry_path("flipped").exists());

    let report = store.verify(false);
    assert_eq!((report.checked, report.ok, report.bad.len(), report.removed), (5, 2, 3, 3));
    assert_eq!(store.keys(), ["good1", "good2"]);
    assert!(!store.entry_path("flipped").exists() && !store.entry_path("truncated").exists());
    assert_eq!(store.stats().dropped_damaged, 3);
    assert_eq!(store.verify(true).bad, []);
    for tag in ["good1", "good2"] {
        assert_eq!(verify_payload(tag, &store.read(tag).expect(tag)), Ok(1));
    }
}
