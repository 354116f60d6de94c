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
                while began.elapsed() < deadline {
                    let tag = format!("t{thread_id}-{written}");
                    assert!(store.write(&tag, &payload).expect("write"));
                    written += 1;
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
