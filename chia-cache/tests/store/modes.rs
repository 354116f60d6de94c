//! Only the owner can read the cache: the directory is 0700 and its files 0600, whatever the
//! umask lets through (tests run with the usual 022, which would give 0755 and 0644).

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use crate::common::open;

fn mode(path: &Path) -> u32 {
    fs::metadata(path).unwrap_or_else(|error| panic!("{}: {error}", path.display())).permissions().mode()
        & 0o777
}

/// All twelve bits: the special ones (setuid, setgid, sticky) too.
fn full_mode(path: &Path) -> u32 {
    fs::metadata(path).unwrap_or_else(|error| panic!("{}: {error}", path.display())).permissions().mode()
        & 0o7777
}

#[test]
fn a_setgid_bit_inherited_from_a_parent_is_cleared() {
    let root = tempfile::tempdir().expect("tempdir");
    let shared = root.path().join("shared");
    fs::create_dir(&shared).expect("create");
    fs::set_permissions(&shared, fs::Permissions::from_mode(0o2775)).expect("chmod g+s");
    // What this test is about: a directory made in a setgid directory inherits the bit.
    let probe = shared.join("probe");
    fs::create_dir(&probe).expect("create");
    assert_eq!(full_mode(&probe) & 0o2000, 0o2000, "this file system does not pass setgid on");

    let dir = shared.join("nested").join("cache");
    let _store = open(&dir, 1 << 20);
    assert_eq!(full_mode(&dir), 0o700, "the cache directory");
    assert_eq!(full_mode(&shared.join("nested")), 0o700, "a parent the store created");
    assert_eq!(full_mode(&shared), 0o2775, "a parent that was there already is not the store's");
}

#[test]
fn an_existing_setgid_cache_directory_is_made_exactly_0700() {
    let root = tempfile::tempdir().expect("tempdir");
    let dir = root.path().join("cache");
    fs::create_dir(&dir).expect("create");
    fs::set_permissions(&dir, fs::Permissions::from_mode(0o2700)).expect("chmod g+s");
    let _store = open(&dir, 1 << 20);
    assert_eq!(full_mode(&dir), 0o700);
}

#[test]
fn a_new_cache_directory_is_0700_and_its_entries_0600() {
    let root = tempfile::tempdir().expect("tempdir");
    let dir = root.path().join("nested").join("cache");
    let store = open(&dir, 1 << 20);
    assert_eq!(mode(&dir), 0o700, "the cache directory");
    assert_eq!(mode(&root.path().join("nested")), 0o700, "a parent the store created");

    assert!(store.write("iter0", b"result").expect("write"));
    assert!(store.write("iter1", &vec![7u8; 100_000]).expect("write"));
    let mut files = 0;
    for entry in fs::read_dir(&dir).expect("list the cache") {
        let path = entry.expect("entry").path();
        assert_eq!(mode(&path), 0o600, "{}", path.display());
        files += 1;
    }
    // Two entries, the lock file and the journal.
    assert_eq!(files, 4);
    assert_eq!(mode(&store.entry_path("iter0")), 0o600);
}

#[test]
fn an_existing_directory_open_to_others_is_tightened_to_0700() {
    let root = tempfile::tempdir().expect("tempdir");
    let dir = root.path().join("cache");
    fs::create_dir(&dir).expect("create");
    fs::set_permissions(&dir, fs::Permissions::from_mode(0o755)).expect("chmod");
    assert_eq!(mode(&dir), 0o755);
    let store = open(&dir, 1 << 20);
    assert_eq!(mode(&dir), 0o700);
    // The store works as before in it.
    assert!(store.write("a", b"x").expect("write"));
    assert_eq!(store.read("a").as_deref(), Some(&b"x"[..]));
}

#[test]
fn an_overwritten_entry_stays_0600() {
    let root = tempfile::tempdir().expect("tempdir");
    let store = open(root.path(), 1 << 20);
    assert!(store.write("a", b"first").expect("write"));
    assert!(store.write("a", b"second, longer").expect("overwrite"));
    assert_eq!(mode(&store.entry_path("a")), 0o600);
}
