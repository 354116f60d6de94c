//! Entries written with a time to live: misses once it is over, removed when read and by a
//! sweep, the expiry kept in the file across restarts. The clock is a `ManualClock`: nothing
//! sleeps.

use std::fs;
use std::path::Path;
use std::time::{Duration, SystemTime};

use chia_cache::{CacheStore, Durability, ManualClock, StoreOptions, WriteOptions, entry_file_name};

use crate::common::{entry_size, payload, verify_payload};

const HOUR: Duration = Duration::from_secs(3600);

fn ttl(duration: Duration) -> WriteOptions {
    WriteOptions::default().with_ttl(duration)
}

fn open_with(dir: &Path, clock: &ManualClock, durability: Durability) -> CacheStore {
    let options = StoreOptions::default().with_clock(clock.clock()).with_durability(durability);
    CacheStore::open(dir, 1 << 20, options).expect("open")
}

fn start() -> ManualClock {
    ManualClock::new(SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000))
}

#[test]
fn an_expired_entry_is_a_miss_and_is_removed_when_read() {
    for durability in [Durability::Full, Durability::None] {
        let dir = tempfile::tempdir().expect("tempdir");
        let clock = start();
        let store = open_with(dir.path(), &clock, durability);
        assert!(store.write_with("daily", &payload("daily", 1, 500), &ttl(24 * HOUR)).expect("write"));
        assert!(store.write("forever", b"v").expect("write"));
        assert_eq!(store.expires_at("daily"), Some(clock.now() + 24 * HOUR));
        assert_eq!(store.expires_at("forever"), None);

        clock.advance(24 * HOUR - Duration::from_millis(1));
        assert!(store.has("daily"));
        assert_eq!(verify_payload("daily", &store.read("daily").expect("not yet expired")), Ok(1));

        clock.advance(Duration::from_millis(1));
        assert!(!store.has("daily"), "expired: has says no");
        assert!(store.keys().contains(&"daily".to_owned()), "has does not remove it");
        assert_eq!(store.read("daily"), None);
        assert_eq!(store.keys(), ["forever"], "the read removed it");
        assert!(!store.entry_path("daily").exists());
        let stats = store.stats();
        assert_eq!((stats.expired, stats.hits, stats.misses, stats.entries), (1, 1, 1, 1), "{durability:?}");
        assert_eq!(store.read("forever").as_deref(), Some(&b"v"[..]));
    }
}

#[test]
fn a_sweep_removes_what_has_expired_and_nothing_else() {
    let dir = tempfile::tempdir().expect("tempdir");
    let clock = start();
    let store = open_with(dir.path(), &clock, Durability::Full);
    for (tag, hours) in [("one", 1), ("two", 2), ("three", 3)] {
        assert!(store.write_with(tag, b"x", &ttl(hours * HOUR)).expect("write"));
    }
    assert!(store.write("never", b"x").expect("write"));
    assert_eq!(store.sweep_expired(), Vec::<String>::new());
    clock.advance(2 * HOUR);
    assert_eq!(store.sweep_expired(), ["one", "two"]);
    assert_eq!(store.keys(), ["three", "never"]);
    for tag in ["one", "two"] {
        assert!(!store.entry_path(tag).exists(), "{tag}");
    }
    assert_eq!(store.stats().expired, 2);
    assert_eq!(store.size_bytes(), entry_size("three", 1) + 8 + entry_size("never", 1));
}

#[test]
fn the_expiry_is_kept_in_the_file_across_restarts() {
    let dir = tempfile::tempdir().expect("tempdir");
    let clock = start();
    let expires = clock.now() + 2 * HOUR;
    {
        let store = open_with(dir.path(), &clock, Durability::Full);
        assert!(store.write_with("t", &payload("t", 7, 100), &ttl(2 * HOUR)).expect("write"));
        assert!(store.write("plain", b"v").expect("write"));
    }
    // Format version 2 for the entry with an expiry, 1 for the other.
    let bytes = fs::read(dir.path().join(entry_file_name("t"))).expect("read");
    assert_eq!(u16::from_le_bytes([bytes[8], bytes[9]]), 2);
    assert_eq!(bytes.len() as u64, entry_size("t", 100) + 8);
    let plain = fs::read(dir.path().join(entry_file_name("plain"))).expect("read");
    assert_eq!(u16::from_le_bytes([plain[8], plain[9]]), 1);

    // From the snapshot, and from the headers.
    for full_scan in [false, true] {
        let options = StoreOptions::default().with_clock(clock.clock());
        let store = if full_scan {
            CacheStore::open_full_scan(dir.path(), 1 << 20, options)
        } else {
            CacheStore::open(dir.path(), 1 << 20, options)
        }
        .expect("reopen");
        assert_eq!(store.expires_at("t"), Some(expires), "full scan: {full_scan}");
        assert_eq!(verify_payload("t", &store.read("t").expect("t")), Ok(7));
    }
    clock.advance(2 * HOUR);
    let store = open_with(dir.path(), &clock, Durability::Full);
    assert_eq!(store.read("t"), None);
    assert_eq!(store.read("plain").as_deref(), Some(&b"v"[..]));
}

#[test]
fn an_overwrite_without_a_ttl_never_expires() {
    let dir = tempfile::tempdir().expect("tempdir");
    let clock = start();
    let store = open_with(dir.path(), &clock, Durability::None);
    assert!(store.write_with("t", b"1", &ttl(HOUR)).expect("write"));
    assert!(store.write("t", b"2").expect("overwrite"));
    clock.advance(10 * HOUR);
    assert_eq!(store.read("t").as_deref(), Some(&b"2"[..]));
    assert_eq!(store.size_bytes(), entry_size("t", 1));
}
