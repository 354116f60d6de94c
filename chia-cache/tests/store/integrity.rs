//! Damaged entries read as misses and disappear; they are never errors and never wrong data.

use std::fs::{self, File};

use crate::common::{entry_files, open, payload, verify_payload};

const HEADER_LEN: usize = 32;

fn store_with(dir: &tempfile::TempDir, tags: &[&str]) -> chia_cache::CacheStore {
    let store = open(dir.path(), 1 << 20);
    for tag in tags {
        store.write(tag, &payload(tag, 1, 4096)).expect("write");
    }
    store
}

#[test]
fn a_flipped_payload_byte_is_a_miss_and_the_entry_is_gone() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = store_with(&dir, &["victim", "bystander"]);
    let path = store.entry_path("victim");
    let mut bytes = fs::read(&path).expect("read entry");
    let at = HEADER_LEN + "victim".len() + 2000;
    bytes[at] ^= 0x01;
    fs::write(&path, bytes).expect("write damaged entry");

    // Before reading, the index cannot know.
    assert!(store.has("victim"));
    assert_eq!(store.read("victim"), None);
    assert!(!store.has("victim"));
    assert!(!path.exists());
    assert_eq!(store.keys(), ["bystander"]);
    assert_eq!(verify_payload("bystander", &store.read("bystander").expect("bystander")), Ok(1));
}

#[test]
fn a_flipped_payload_byte_survives_the_warm_start_and_fails_the_read() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = {
        let store = store_with(&dir, &["victim"]);
        store.entry_path("victim")
    };
    let mut bytes = fs::read(&path).expect("read entry");
    let last = bytes.len() - 1;
    bytes[last] ^= 0x80;
    fs::write(&path, bytes).expect("write damaged entry");

    let store = open(dir.path(), 1 << 20);
    assert!(store.has("victim"), "the warm start does not read payloads");
    assert_eq!(store.read("victim"), None);
    assert!(!store.has("victim"));
    assert!(!path.exists());
}

#[test]
fn a_truncated_file_is_a_miss_and_the_entry_is_gone() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = store_with(&dir, &["short", "header_only", "stub"]);
    for (tag, len) in [("short", 3000), ("header_only", HEADER_LEN as u64), ("stub", 5)] {
        File::options()
            .write(true)
            .open(store.entry_path(tag))
            .and_then(|file| file.set_len(len))
            .expect("truncate");
        assert_eq!(store.read(tag), None, "{tag}");
        assert!(!store.has(tag), "{tag}");
        assert!(!store.entry_path(tag).exists(), "{tag}");
    }
    assert!(store.is_empty());
    assert_eq!(store.size_bytes(), 0);
}

#[test]
fn a_file_extended_with_garbage_is_a_miss() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = store_with(&dir, &["t"]);
    let mut file = File::options().append(true).open(store.entry_path("t")).expect("open");
    std::io::Write::write_all(&mut file, b"trailing garbage").expect("append");
    assert_eq!(store.read("t"), None);
    assert!(!store.has("t"));
}

#[test]
fn another_tags_file_in_its_place_is_a_miss() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = store_with(&dir, &["a", "b"]);
    fs::copy(store.entry_path("b"), store.entry_path("a")).expect("copy b over a");
    assert_eq!(store.read("a"), None);
    assert!(!store.has("a"));
    assert_eq!(verify_payload("b", &store.read("b").expect("b")), Ok(1));
}

#[test]
fn a_file_deleted_behind_the_stores_back_is_a_miss_and_is_dropped() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = store_with(&dir, &["gone", "kept"]);
    let kept_size = store.size_bytes() / 2;
    fs::remove_file(store.entry_path("gone")).expect("remove");
    assert_eq!(store.read("gone"), None);
    assert!(!store.has("gone"));
    assert_eq!(store.size_bytes(), kept_size);
    assert_eq!(entry_files(dir.path()).len(), 1);
}

/// The file layout documented in `store/format.rs`, checked byte by byte.
#[test]
fn entry_files_have_the_documented_layout() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(dir.path(), 1 << 20);
    let (tag, value) = ("iter0/run", b"opaque value".as_slice());
    store.write(tag, value).expect("write");
    let bytes = fs::read(store.entry_path(tag)).expect("read entry");

    assert_eq!(bytes.len(), HEADER_LEN + tag.len() + value.len());
    assert_eq!(&bytes[0..8], b"CHIACHE\0");
    assert_eq!(u16::from_le_bytes([bytes[8], bytes[9]]), 1, "format version");
    assert_eq!(u16::from_le_bytes([bytes[10], bytes[11]]), 0, "flags");
    assert_eq!(u32::from_le_bytes(bytes[12..16].try_into().expect("4 bytes")), tag.len() as u32);
    assert_eq!(u64::from_le_bytes(bytes[16..24].try_into().expect("8 bytes")), value.len() as u64);
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(&bytes[0..24]);
    hasher.update(tag.as_bytes());
    assert_eq!(u32::from_le_bytes(bytes[24..28].try_into().expect("4 bytes")), hasher.clone().finalize());
    hasher.update(value);
    assert_eq!(u32::from_le_bytes(bytes[28..32].try_into().expect("4 bytes")), hasher.finalize());
    assert_eq!(&bytes[HEADER_LEN..HEADER_LEN + tag.len()], tag.as_bytes());
    assert_eq!(&bytes[HEADER_LEN + tag.len()..], value);
}
