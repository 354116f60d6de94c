//! A warm start from the index snapshot builds exactly the index a full scan of the same
//! directory builds (entries, sizes, expiries, LRU order), however the directory changed
//! behind the store's back since the snapshot.

use std::fs::{self, File};
use std::path::Path;
use std::time::Duration;

use chia_cache::{CacheStore, EntryInfo, StoreOptions, WriteOptions, entry_file_name};

use crate::common::{open_fast, payload, set_mtime};

const BUDGET: u64 = 1 << 30;

/// What must be equal: every entry with its size and expiry, in LRU order, and the totals.
fn state(store: &CacheStore) -> (Vec<EntryInfo>, u64, u64) {
    let stats = store.stats();
    (store.entries(), stats.entries, stats.bytes)
}

/// Copies the files of `from` (not the lock and not the snapshot) into a new directory, with
/// their modification times.
fn copy_for_a_full_scan(from: &Path) -> tempfile::TempDir {
    let to = tempfile::tempdir().expect("tempdir");
    for entry in fs::read_dir(from).expect("list") {
        let entry = entry.expect("entry");
        let name = entry.file_name();
        let name_text = name.to_string_lossy();
        if name_text == ".chia-cache.lock" || name_text == ".chia-index.snapshot" || !entry.path().is_file() {
            continue;
        }
        let target = to.path().join(&name);
        fs::copy(entry.path(), &target).expect("copy");
        let modified = entry.metadata().expect("metadata").modified().expect("mtime");
        File::options()
            .write(true)
            .open(&target)
            .and_then(|file| file.set_modified(modified))
            .expect("mtime");
    }
    to
}

/// Opens `dir` from its snapshot and a copy of it by a full scan; asserts they agree, and
/// returns the first.
fn assert_snapshot_equals_full_scan(dir: &Path) -> CacheStore {
    let copy = copy_for_a_full_scan(dir);
    let from_snapshot =
        CacheStore::open(dir, BUDGET, StoreOptions::default()).expect("open from the snapshot");
    let full_scan = CacheStore::open_full_scan(copy.path(), BUDGET, StoreOptions::default())
        .expect("open by a full scan");
    assert_eq!(full_scan.open_report().from_snapshot, 0);
    let (expected, actual) = (state(&full_scan), state(&from_snapshot));
    assert_eq!(actual.0.len(), expected.0.len());
    for (found, wanted) in actual.0.iter().zip(&expected.0) {
        assert_eq!(found, wanted);
    }
    assert_eq!(actual, expected);
    from_snapshot
}

fn write_entries(store: &CacheStore, prefix: &str, count: u64) {
    for i in 0..count {
        let tag = format!("{prefix}{i}");
        let value = payload(&tag, 1, 100 + (i as usize * 37) % 3000);
        if i % 9 == 0 {
            let options = WriteOptions::default().with_ttl(Duration::from_secs(86_400 + i));
            store.write_with(&tag, &value, &options).expect("write with a ttl");
        } else {
            store.write(&tag, &value).expect("write");
        }
    }
}

#[test]
fn a_snapshot_warm_start_equals_a_full_scan_after_changes_behind_the_stores_back() {
    let dir = tempfile::tempdir().expect("tempdir");
    {
        let store = open_fast(dir.path(), BUDGET);
        write_entries(&store, "e", 200);
        for i in (0..200).step_by(7) {
            assert!(store.read(&format!("e{i}")).is_some());
        }
        // Dropping saves the snapshot.
    }
    assert!(dir.path().join(".chia-index.snapshot").exists());
    // Untouched: everything comes from the snapshot.
    {
        let store = assert_snapshot_equals_full_scan(dir.path());
        assert_eq!((store.open_report().from_snapshot, store.open_report().headers_read), (200, 0));
    }

    // Behind the store's back: entries added (written by another store), removed, damaged,
    // rewritten and reordered; leftovers and foreign files.
    let other = tempfile::tempdir().expect("tempdir");
    {
        let store = open_fast(other.path(), BUDGET);
        write_entries(&store, "added", 11);
        store.write("e40", &payload("e40", 2, 7777)).expect("write a new e40");
    }
    for name in fs::read_dir(other.path()).expect("list").map(|entry| entry.expect("entry").file_name()) {
        if name.to_string_lossy().ends_with(".chia") {
            fs::copy(other.path().join(&name), dir.path().join(&name)).expect("copy in");
        }
    }
    let path = |tag: &str| dir.path().join(entry_file_name(tag));
    fs::remove_file(path("e3")).expect("remove");
    fs::remove_file(path("e50")).expect("remove");
    let truncated = fs::metadata(path("e10")).expect("metadata").len() / 2;
    File::options().write(true).open(path("e10")).and_then(|file| file.set_len(truncated)).expect("truncate");
    let mut bytes = fs::read(path("e11")).expect("read");
    bytes[16] ^= 0x40; // the payload length: a damaged header, same file size
    fs::write(path("e11"), &bytes).expect("damage");
    set_mtime(&path("e20"), 5);
    set_mtime(&path("e21"), 5); // ties with e20: the name decides
    fs::copy(path("e31"), path("e30")).expect("another tag's file in e30's place");
    fs::write(dir.path().join(".chia-tmp-99-1.tmp"), b"half a write").expect("temp file");
    fs::write(dir.path().join("notes.txt"), b"not an entry").expect("foreign file");

    let store = assert_snapshot_equals_full_scan(dir.path());
    let report = store.open_report().clone();
    // 11 added, plus e10, e11, e20, e21, e30 and e40: headers read; 2 gone.
    assert_eq!((report.headers_read, report.from_snapshot), (17, 200 - 2 - 6));
    assert_eq!((report.removed_damaged_files, report.removed_temp_files), (2, 1));
    let keys = store.keys();
    assert_eq!(&keys[..2], ["e20", "e21"], "the reordered entries are the oldest");
    for tag in ["e3", "e50", "e10", "e11", "e30"] {
        assert!(!store.has(tag), "{tag}");
    }
    assert_eq!(crate::common::verify_payload("e40", &store.read("e40").expect("e40")), Ok(2));
    drop(store);

    // The snapshot saved at that close agrees with the directory again; only the stray file
    // at e30's name, which no entry accounts for, is read again.
    let store = assert_snapshot_equals_full_scan(dir.path());
    assert_eq!(store.open_report().headers_read, 1);
}

#[test]
fn an_old_snapshot_still_gives_the_full_scans_index() {
    let dir = tempfile::tempdir().expect("tempdir");
    let snapshot = dir.path().join(".chia-index.snapshot");
    let old_snapshot = {
        let store = open_fast(dir.path(), 40 * 1000);
        write_entries(&store, "first", 30);
        store.save_index().expect("save the index");
        let old = fs::read(&snapshot).expect("snapshot");
        // After the snapshot: overwrites, reads, evictions (the budget is small) and new tags.
        write_entries(&store, "second", 30);
        write_entries(&store, "first", 5);
        store.read("second3");
        assert!(store.evict("second4"));
        old
    };
    fs::write(&snapshot, old_snapshot).expect("put the old snapshot back");
    let store = assert_snapshot_equals_full_scan(dir.path());
    assert!(store.open_report().headers_read > 0);
}

#[test]
fn a_damaged_or_missing_snapshot_means_a_full_scan() {
    let dir = tempfile::tempdir().expect("tempdir");
    drop({
        let store = open_fast(dir.path(), BUDGET);
        write_entries(&store, "e", 20);
        store
    });
    let snapshot = dir.path().join(".chia-index.snapshot");
    let mut bytes = fs::read(&snapshot).expect("snapshot");
    let middle = bytes.len() / 2;
    bytes[middle] ^= 1;
    fs::write(&snapshot, &bytes).expect("damage the snapshot");
    {
        let store = assert_snapshot_equals_full_scan(dir.path());
        assert_eq!((store.open_report().from_snapshot, store.open_report().headers_read), (0, 20));
    }
    fs::remove_file(&snapshot).expect("remove");
    let store = assert_snapshot_equals_full_scan(dir.path());
    assert_eq!(store.open_report().headers_read, 20);
}

#[test]
fn snapshots_are_saved_every_n_writes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let snapshot = dir.path().join(".chia-index.snapshot");
    let options = StoreOptions::default().with_snapshot_every_writes(Some(10));
    let store = CacheStore::open(dir.path(), BUDGET, options).expect("open");
    write_entries(&store, "e", 9);
    assert!(!snapshot.exists());
    write_entries(&store, "f", 1);
    assert!(snapshot.exists(), "the tenth write saves the snapshot");
    let saved = fs::read(&snapshot).expect("snapshot");
    write_entries(&store, "g", 9);
    assert_eq!(fs::read(&snapshot).expect("snapshot"), saved, "not before the next ten");
    write_entries(&store, "h", 1);
    assert_ne!(fs::read(&snapshot).expect("snapshot"), saved);
}
