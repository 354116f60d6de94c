//! Many threads on overlapping tags: every read returns a complete value written for its tag,
//! and the index, the budget and the directory agree at the end.

use std::collections::BTreeSet;
use std::sync::{Arc, Barrier};
use std::thread;

use chia_cache::{CacheStore, entry_file_name};

use crate::common::{Rng, entry_files, open_fast, payload, temp_files, verify_payload};

const THREADS: u64 = 6;
const OPS_PER_THREAD: u64 = 400;
const TAGS: [&str; 6] = ["t0", "t1", "t2", "shared/a", "shared b", "t5"];

fn payload_len(rng: &mut Rng) -> usize {
    match rng.below(20) {
        0 => 600_000 + rng.below(400_000) as usize, // occasionally large
        1..=6 => 20_000 + rng.below(60_000) as usize,
        _ => 20 + rng.below(2_000) as usize,
    }
}

fn hammer(store: &CacheStore, thread_id: u64) -> u64 {
    let mut rng = Rng::new(thread_id + 1);
    let mut hits = 0;
    for op in 0..OPS_PER_THREAD {
        let tag = TAGS[rng.below(TAGS.len() as u64) as usize];
        match rng.below(20) {
            0..=8 => {
                let version = thread_id << 32 | op;
                let value = payload(tag, version, payload_len(&mut rng));
                store.write(tag, &value).expect("write");
            }
            9..=16 => {
                if let Some(value) = store.read(tag) {
                    if let Err(problem) = verify_payload(tag, &value) {
                        panic!("thread {thread_id} read {tag:?}: {problem}");
                    }
                    hits += 1;
                }
            }
            17 => {
                store.evict(tag);
            }
            18 => {
                store.has(tag);
                assert!(store.size_bytes() <= store.budget());
            }
            _ => {
                let keys = store.keys();
                let unique: BTreeSet<&String> = keys.iter().collect();
                assert_eq!(unique.len(), keys.len(), "duplicate keys {keys:?}");
            }
        }
    }
    hits
}

/// [`hammer`] from `THREADS` threads started together; each thread's hits.
fn hammer_from_every_thread(store: &Arc<CacheStore>) -> Vec<u64> {
    let start = Arc::new(Barrier::new(THREADS as usize));
    let workers: Vec<_> = (0..THREADS)
        .map(|thread_id| {
            let (store, start) = (Arc::clone(store), Arc::clone(&start));
            thread::spawn(move || {
                start.wait();
                hammer(&store, thread_id)
            })
        })
        .collect();
    workers.into_iter().map(|worker| worker.join().expect("worker thread")).collect()
}

#[test]
fn threads_hammering_overlapping_tags_only_ever_see_complete_values() {
    let dir = tempfile::tempdir().expect("tempdir");
    // Room for a few large values: writes keep evicting each other.
    let store = Arc::new(open_fast(dir.path(), 2 << 20));
    let hits: u64 = hammer_from_every_thread(&store).into_iter().sum();
    assert!(hits > 0, "no read ever hit");

    // The index, the accounting and the directory agree.
    assert!(store.size_bytes() <= store.budget());
    assert_eq!(temp_files(dir.path()), Vec::<String>::new());
    let keys = store.keys();
    let expected_files: BTreeSet<String> = keys.iter().map(|tag| entry_file_name(tag)).collect();
    let files: BTreeSet<String> = entry_files(dir.path())
        .iter()
        .map(|path| path.file_name().expect("name").to_string_lossy().into_owned())
        .collect();
    assert_eq!(files, expected_files);
    let on_disk: u64 =
        entry_files(dir.path()).iter().map(|path| path.metadata().expect("metadata").len()).sum();
    assert_eq!(store.size_bytes(), on_disk);
    for tag in &keys {
        let value = store.read(tag).expect("indexed entry reads");
        verify_payload(tag, &value).expect("complete value");
    }
    drop(store);

    // And a warm start finds the same entries.
    let store = open_fast(dir.path(), 2 << 20);
    let mut reopened = store.keys();
    reopened.sort();
    let mut expected = keys;
    expected.sort();
    assert_eq!(reopened, expected);
}

/// The same under `Durability::Full`, where writes and evictions go through the group commit
/// (several batches in flight), and then through a replay of its journal.
#[test]
fn threads_hammering_a_group_committed_store_only_ever_see_complete_values() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Arc::new(crate::common::open(dir.path(), 2 << 20));
    hammer_from_every_thread(&store);
    assert!(store.size_bytes() <= store.budget());
    let mut keys = store.keys();
    for tag in &keys {
        verify_payload(tag, &store.read(tag).expect("indexed entry reads")).expect("complete value");
    }
    // What a crash now would replay: the journal, over the files a clean close leaves.
    let journal_path = dir.path().join(".chia-journal-1.log");
    let journal = std::fs::read(&journal_path);
    drop(store);
    if let Ok(journal) = journal {
        std::fs::write(&journal_path, journal).expect("put the journal back");
    }
    let store = crate::common::open(dir.path(), 2 << 20);
    // A replay may bring back entries evicted to make room (as old as they were), and the
    // budget may then evict others again; whatever is there is complete.
    assert!(store.size_bytes() <= store.budget());
    let reopened = store.keys();
    assert!(!reopened.is_empty());
    for tag in &reopened {
        verify_payload(tag, &store.read(tag).expect("entry reads")).expect("complete value");
    }
    keys.retain(|tag| reopened.contains(tag));
    assert!(!keys.is_empty(), "none of the entries there at the close is there after the replay");
}
