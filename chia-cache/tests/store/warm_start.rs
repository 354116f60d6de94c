//! Opening a directory that already holds entries.

use std::fs::{self, File};

use chia_cache::{entry_file_name, parse_budget};

use crate::common::{entry_size, names, open, payload, set_mtime, temp_files, verify_payload};

#[test]
fn a_reopened_store_serves_its_entries() {
    let dir = tempfile::tempdir().expect("tempdir");
    {
        let store = open(dir.path(), 1 << 20);
        store.write("iter0", &payload("iter0", 1, 3000)).expect("write");
        store.write("iter1", &payload("iter1", 1, 100)).expect("write");
    }
    let store = open(dir.path(), 1 << 20);
    assert_eq!(store.len(), 2);
    assert_eq!(store.size_bytes(), entry_size("iter0", 3000) + entry_size("iter1", 100));
    assert_eq!(verify_payload("iter0", &store.read("iter0").expect("iter0")), Ok(1));
    assert_eq!(verify_payload("iter1", &store.read("iter1").expect("iter1")), Ok(1));
}

#[test]
fn recency_is_restored_from_modification_times_with_names_breaking_ties() {
    let dir = tempfile::tempdir().expect("tempdir");
    {
        let store = open(dir.path(), 1 << 20);
        for tag in ["a", "b", "c", "d"] {
            store.write(tag, tag.as_bytes()).expect("write");
        }
    }
    let path = |tag: &str| dir.path().join(entry_file_name(tag));
    set_mtime(&path("c"), 10);
    set_mtime(&path("a"), 30);
    // "d" and "b" tie; "b_…" sorts before "d_…".
    set_mtime(&path("d"), 20);
    set_mtime(&path("b"), 20);

    let store = open(dir.path(), 1 << 20);
    assert_eq!(store.keys(), ["c", "b", "d", "a"]);
}

#[test]
fn reads_are_remembered_across_restarts() {
    let dir = tempfile::tempdir().expect("tempdir");
    {
        let store = open(dir.path(), 1 << 20);
        store.write("old", b"1").expect("write");
        store.write("new", b"2").expect("write");
    }
    // Written long ago, in this order.
    set_mtime(&dir.path().join(entry_file_name("old")), 1);
    set_mtime(&dir.path().join(entry_file_name("new")), 2);
    {
        let store = open(dir.path(), 1 << 20);
        assert_eq!(store.keys(), ["old", "new"]);
        assert!(store.read("old").is_some());
    }
    let store = open(dir.path(), 1 << 20);
    assert_eq!(store.keys(), ["new", "old"]);
}

#[test]
fn a_smaller_budget_evicts_least_recently_used_at_open() {
    let dir = tempfile::tempdir().expect("tempdir");
    {
        let store = open(dir.path(), 1 << 20);
        for tag in ["a", "b", "c", "d"] {
            store.write(tag, &[0u8; 100]).expect("write");
        }
    }
    for (seconds, tag) in ["a", "b", "c", "d"].into_iter().enumerate() {
        set_mtime(&dir.path().join(entry_file_name(tag)), seconds as u64);
    }
    let store = open(dir.path(), 2 * entry_size("a", 100) + 50);
    assert_eq!(store.keys(), ["c", "d"]);
    assert!(store.size_bytes() <= store.budget());
    assert!(!dir.path().join(entry_file_name("a")).exists());
    assert!(!dir.path().join(entry_file_name("b")).exists());
}

#[test]
fn leftover_temporary_files_are_removed() {
    let dir = tempfile::tempdir().expect("tempdir");
    fs::write(dir.path().join(".chia-tmp-4242-7.tmp"), b"half a write").expect("write temp");
    fs::write(dir.path().join(".chia-tmp-4242-8.tmp"), b"").expect("write temp");
    let store = open(dir.path(), 1 << 20);
    assert_eq!(temp_files(dir.path()), Vec::<String>::new());
    assert!(store.is_empty());
}

#[test]
fn foreign_files_and_directories_are_skipped_and_kept() {
    let dir = tempfile::tempdir().expect("tempdir");
    {
        let store = open(dir.path(), 1 << 20);
        store.write("mine", b"value").expect("write");
    }
    fs::write(dir.path().join("iter0_94f05f04b20f5aa4.pkl"), b"\x80\x04pickle").expect("write pkl");
    fs::write(dir.path().join("notes.chia"), b"some other program's file").expect("write foreign");
    fs::create_dir(dir.path().join("subdir.chia")).expect("mkdir");
    // A valid entry under a name that is not its tag's: not addressable, so not served.
    fs::copy(dir.path().join(entry_file_name("mine")), dir.path().join(entry_file_name("copy")))
        .expect("copy");

    let store = open(dir.path(), 1 << 20);
    assert_eq!(store.keys(), ["mine"]);
    assert_eq!(store.read("mine").as_deref(), Some(&b"value"[..]));
    for name in ["iter0_94f05f04b20f5aa4.pkl", "notes.chia", "subdir.chia", &entry_file_name("copy")] {
        assert!(names(dir.path()).iter().any(|found| found == name), "{name} was removed");
    }
}

#[test]
fn damaged_entries_are_removed_at_open() {
    let dir = tempfile::tempdir().expect("tempdir");
    {
        let store = open(dir.path(), 1 << 20);
        for tag in ["truncated", "bad_header", "empty", "good"] {
            store.write(tag, &payload(tag, 1, 1000)).expect("write");
        }
    }
    let path = |tag: &str| dir.path().join(entry_file_name(tag));
    File::options().write(true).open(path("truncated")).and_then(|file| file.set_len(500)).expect("truncate");
    let mut bytes = fs::read(path("bad_header")).expect("read");
    bytes[16] ^= 0x40; // payload length
    fs::write(path("bad_header"), bytes).expect("write");
    File::options().write(true).open(path("empty")).and_then(|file| file.set_len(0)).expect("empty");

    let store = open(dir.path(), 1 << 20);
    assert_eq!(store.keys(), ["good"]);
    for tag in ["truncated", "bad_header", "empty"] {
        assert!(!path(tag).exists(), "{tag} is still on disk");
    }
}

#[test]
fn entries_of_a_newer_format_are_left_alone() {
    let dir = tempfile::tempdir().expect("tempdir");
    {
        let store = open(dir.path(), 1 << 20);
        store.write("future", b"v").expect("write");
    }
    let path = dir.path().join(entry_file_name("future"));
    let mut bytes = fs::read(&path).expect("read");
    bytes[8] = 3; // format version
    fs::write(&path, &bytes).expect("write");
    let store = open(dir.path(), 1 << 20);
    assert!(store.is_empty());
    assert_eq!(fs::read(&path).expect("still there"), bytes);
}

/// An entry whose header claims an 8 GiB payload, stored as a sparse file: the warm start
/// indexes it from its header alone (reading the payload would take seconds and gigabytes).
#[test]
fn warm_start_reads_headers_only() {
    let dir = tempfile::tempdir().expect("tempdir");
    let tag = "huge";
    let payload_len: u64 = 8 << 30;
    let mut header = Vec::new();
    header.extend_from_slice(b"CHIACHE\0");
    header.extend_from_slice(&1u16.to_le_bytes());
    header.extend_from_slice(&0u16.to_le_bytes());
    header.extend_from_slice(&(tag.len() as u32).to_le_bytes());
    header.extend_from_slice(&payload_len.to_le_bytes());
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(&header);
    hasher.update(tag.as_bytes());
    header.extend_from_slice(&hasher.finalize().to_le_bytes());
    header.extend_from_slice(&0u32.to_le_bytes()); // entry checksum: not checked at open
    header.extend_from_slice(tag.as_bytes());
    let path = dir.path().join(entry_file_name(tag));
    fs::write(&path, &header).expect("write header");
    File::options()
        .write(true)
        .open(&path)
        .and_then(|file| file.set_len(32 + 4 + payload_len))
        .expect("sparse");

    let store = open(dir.path(), parse_budget(16.0, "GiB").expect("budget"));
    assert!(store.has(tag));
    assert_eq!(store.size_bytes(), 32 + 4 + payload_len);
    assert!(store.evict(tag));
    assert!(!path.exists());
}
