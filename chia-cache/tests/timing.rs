//! Timings, not tests: `cargo test -p chia-cache --test timing -- --ignored --nocapture`.
//! Each prints its figure; none asserts a speed (the machine decides those). Directories are
//! made in `CHIA_CACHE_TIMING_DIR` if set (to time another disk), else in the system's
//! temporary directory.
//!
//! On ext4, creating a file costs more the more inodes of its block group were deleted in the
//! last minutes (the allocator checks each one it passes), so a timing made right after
//! another one deleted many files is slower. With `CHIA_CACHE_TIMING_DIR=/` each timing's
//! directory is a new top-level one, which ext4 places in a fresh block group.

use std::sync::{Arc, Barrier};
use std::thread;
use std::time::{Duration, Instant};

use chia_cache::{CacheStore, Durability, StoreOptions};

fn timing_dir() -> tempfile::TempDir {
    match std::env::var_os("CHIA_CACHE_TIMING_DIR") {
        Some(parent) => tempfile::tempdir_in(parent).expect("tempdir in CHIA_CACHE_TIMING_DIR"),
        None => tempfile::tempdir().expect("tempdir"),
    }
}

/// Writes of 1 KiB from `threads` threads, each writing for about `seconds`; writes per second.
/// The directory is kept until the caller drops it, so that its deletion does not slow the
/// next timing down.
fn writes_per_second(durability: Durability, threads: usize, seconds: f64) -> (f64, tempfile::TempDir) {
    pipelined_writes_per_second(durability, threads, 1, seconds)
}

/// As [`writes_per_second`], each thread handing the store `pipelined` writes per call
/// (`write_many`).
fn pipelined_writes_per_second(
    durability: Durability,
    threads: usize,
    pipelined: usize,
    seconds: f64,
) -> (f64, tempfile::TempDir) {
    let dir = timing_dir();
    let store = Arc::new(
        CacheStore::open(dir.path(), 1 << 34, StoreOptions::default().with_durability(durability))
            .expect("open"),
    );
    let start = Arc::new(Barrier::new(threads + 1));
    let deadline = Duration::from_secs_f64(seconds);
    let workers: Vec<_> = (0..threads)
        .map(|thread_id| {
            let (store, start) = (Arc::clone(&store), Arc::clone(&start));
            thread::spawn(move || {
                let payload = vec![thread_id as u8; 1024];
                start.wait();
                let began = Instant::now();
                let mut written = 0u64;
                let options = chia_cache::WriteOptions::default();
                while began.elapsed() < deadline {
                    if pipelined == 1 {
                        let tag = format!("t{thread_id}-{written}");
                        assert!(store.write(&tag, &payload).expect("write"));
                    } else {
                        let tags: Vec<String> =
                            (0..pipelined).map(|i| format!("t{thread_id}-{}", written + i as u64)).collect();
                        let results = store
                            .write_many(tags.iter().map(|tag| (tag.as_str(), payload.as_slice(), &options)));
                        assert!(results.into_iter().all(|stored| stored.expect("write")));
                    }
                    written += pipelined as u64;
                }
                written
            })
        })
        .collect();
    start.wait();
    let began = Instant::now();
    let written: u64 = workers.into_iter().map(|worker| worker.join().expect("writer")).sum();
    let rate = written as f64 / began.elapsed().as_secs_f64();
    drop(store);
    (rate, dir)
}

#[test]
#[ignore = "a timing, not a test"]
fn full_durability_1k_writes_per_second() {
    let mut dirs = Vec::new();
    for threads in [1, 4, 16, 64] {
        let (rate, dir) = writes_per_second(Durability::Full, threads, 3.0);
        dirs.push(dir);
        println!("Durability::Full, 1 KiB, {threads:2} threads: {rate:8.0} writes/s");
    }
}

#[test]
#[ignore = "a timing, not a test"]
fn full_durability_1k_pipelined_writes_per_second() {
    let mut dirs = Vec::new();
    for (threads, pipelined) in [(1, 16), (1, 64), (1, 256), (4, 64)] {
        let (rate, dir) = pipelined_writes_per_second(Durability::Full, threads, pipelined, 3.0);
        dirs.push(dir);
        println!(
            "Durability::Full, 1 KiB, {threads} threads x write_many of {pipelined:3}: {rate:8.0} writes/s"
        );
    }
}

#[test]
#[ignore = "a timing, not a test"]
fn no_durability_1k_writes_per_second() {
    let mut dirs = Vec::new();
    for threads in [1, 4] {
        let (rate, dir) = writes_per_second(Durability::None, threads, 3.0);
        dirs.push(dir);
        println!("Durability::None, 1 KiB, {threads:2} threads: {rate:8.0} writes/s");
    }
}

#[test]
#[ignore = "a timing, not a test"]
fn full_durability_1k_writes_per_second_one_thread() {
    let mut dirs = Vec::new();
    for _ in 0..3 {
        let (rate, dir) = writes_per_second(Durability::Full, 1, 2.0);
        dirs.push(dir);
        println!("Durability::Full, 1 KiB,  1 thread: {rate:8.0} writes/s");
    }
}

/// A directory of `count` entries of 100 bytes, closed (so with its index snapshot).
fn directory_of(count: u64) -> tempfile::TempDir {
    let dir = timing_dir();
    fill(dir.path(), count);
    dir
}

/// Writes `count` entries of 100 bytes into a store in `dir`, and closes it.
fn fill(dir: &std::path::Path, count: u64) {
    let options = StoreOptions::default().with_durability(Durability::None).with_snapshot_every_writes(None);
    let store = CacheStore::open(dir, u64::MAX, options).expect("open");
    let payload = [7u8; 100];
    let threads = 2;
    thread::scope(|scope| {
        for thread_id in 0..threads {
            let store = &store;
            scope.spawn(move || {
                for i in (thread_id..count).step_by(threads as usize) {
                    assert!(store.write(&format!("entry-{i:07}"), &payload).expect("write"));
                }
            });
        }
    });
    store.close().expect("close");
}

/// The best of three opens of `dir`, from the snapshot or by a full scan.
fn open_time(dir: &std::path::Path, full_scan: bool, expected: usize) -> Duration {
    (0..3)
        .map(|_| {
            let options = StoreOptions::default().with_durability(Durability::None);
            let began = Instant::now();
            let store = if full_scan {
                CacheStore::open_full_scan(dir, u64::MAX, options)
            } else {
                CacheStore::open(dir, u64::MAX, options)
            }
            .expect("open");
            let took = began.elapsed();
            assert_eq!(store.len(), expected);
            let report = store.open_report();
            assert_eq!(report.from_snapshot as usize, if full_scan { 0 } else { expected });
            // Dropping saves the snapshot again (untimed): the same one.
            drop(store);
            took
        })
        .min()
        .expect("three opens")
}

#[test]
#[ignore = "a timing, not a test"]
fn warm_start_10k() {
    let dir = directory_of(10_000);
    println!("warm start, 10,000 entries, index snapshot: {:?}", open_time(dir.path(), false, 10_000));
    println!("warm start, 10,000 entries, full scan:      {:?}", open_time(dir.path(), true, 10_000));
}

/// The million-entry warm start of the targets (1,000,000 × 100 B in ≤ 1 s). Takes
/// minutes: writing the entries, and deleting them afterwards, cost far more than the opens.
/// With `CHIA_CACHE_TIMING_1M_DIR` set, the entries are written there once and kept, and
/// later runs only time the opens.
#[test]
#[ignore = "a timing: a million files"]
fn warm_start_1m() {
    const COUNT: u64 = 1_000_000;
    let began = Instant::now();
    let (_temporary, dir) = match std::env::var_os("CHIA_CACHE_TIMING_1M_DIR") {
        Some(kept) => {
            let kept = std::path::PathBuf::from(kept);
            if !kept.join(".chia-index.snapshot").exists() {
                fill(&kept, COUNT);
            }
            (None, kept)
        }
        None => {
            let dir = timing_dir();
            fill(dir.path(), COUNT);
            let path = dir.path().to_owned();
            (Some(dir), path)
        }
    };
    println!("1,000,000 entries ready in {:?}", began.elapsed());
    println!("warm start, 1,000,000 entries, index snapshot: {:?}", open_time(&dir, false, COUNT as usize));
}
