//! Group commit under `Durability::Full`: a SIGKILL in the middle of many pipelined writes
//! loses none that were acknowledged, and the journal puts back what a power loss would undo.

use std::collections::HashMap;
use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::sync::mpsc;
use std::thread;

use chia_cache::{CacheStore, Durability, StoreOptions};

use crate::common::{entry_files, names, payload, spawn_child, verify_payload};

const CHILD_DIR_ENV: &str = "CHIA_CACHE_TEST_GROUP_COMMIT_DIR";
const TEST_NAME: &str = "group_commit::sigkill_during_pipelined_writes_keeps_every_acknowledged_write";
const THREADS: u64 = 8;
const WRITES_PER_THREAD: u64 = 2_500;
/// Each thread cycles over this many tags of its own: most of its writes overwrite.
const TAGS_PER_THREAD: u64 = 600;
/// Acknowledgements the parent waits for before the kill: about the middle of 20,000.
const KILL_AFTER_ACKS: usize = 8_000;

fn tag(thread: u64, i: u64) -> String {
    format!("w{thread}-{}", i % TAGS_PER_THREAD)
}

fn payload_len(i: u64) -> usize {
    [1024, 100, 3000, 1024, 64 << 10][(i % 5) as usize]
}

#[test]
fn sigkill_during_pipelined_writes_keeps_every_acknowledged_write() {
    if let Some(dir) = std::env::var_os(CHILD_DIR_ENV) {
        write_until_killed(Path::new(&dir));
        return;
    }

    let dir = tempfile::tempdir().expect("tempdir");
    let mut child = spawn_child(TEST_NAME, (CHILD_DIR_ENV, dir.path()));
    let stdout = BufReader::new(child.stdout.take().expect("child stdout"));
    // Tag → the highest version acknowledged (a write is announced only after it returned).
    let mut acknowledged: HashMap<String, u64> = HashMap::new();
    let mut acks = 0;
    let mut killed = false;
    for line in stdout.lines() {
        let line = line.expect("child stdout line");
        let Some(ack) = line.strip_prefix("ack ") else { continue };
        let (tag, version) = ack.split_once(' ').expect("ack <tag> <version>");
        let version: u64 = version.parse().expect("version");
        let known = acknowledged.entry(tag.to_owned()).or_default();
        *known = (*known).max(version);
        acks += 1;
        if acks == KILL_AFTER_ACKS && !killed {
            child.kill().expect("SIGKILL the writer");
            killed = true;
        }
        // Lines already in the pipe when the child died are acknowledgements too.
    }
    let status = child.wait().expect("wait for child");
    assert!(killed, "the child ended after {acks} acknowledgements, before the kill: {status}");
    assert_eq!(status.signal(), Some(libc::SIGKILL), "the child must die by SIGKILL, got {status}");
    assert!(acks < (THREADS * WRITES_PER_THREAD) as usize, "killed after every write was done");
    let journals: Vec<String> = names(dir.path()).into_iter().filter(|name| name.ends_with(".log")).collect();
    assert!(!journals.is_empty(), "the killed store left its journal");
    eprintln!("{acks} acknowledged writes ({} tags) before the kill", acknowledged.len());

    let store = CacheStore::open(dir.path(), 1 << 30, StoreOptions::default()).expect("open after crash");
    for (tag, version) in &acknowledged {
        let value = store.read(tag).unwrap_or_else(|| panic!("acknowledged {tag} v{version} is missing"));
        let found = verify_payload(tag, &value).unwrap_or_else(|problem| panic!("{tag}: {problem}"));
        assert!(found >= *version, "{tag}: v{found} after v{version} was acknowledged");
    }
    // None corrupt: every entry the directory holds reads back complete.
    let report = store.verify(true);
    assert!(report.bad.is_empty(), "{:?}", report.bad);
    assert_eq!(report.checked as usize, store.len());
    for tag in store.keys() {
        let value = store.read(&tag).unwrap_or_else(|| panic!("indexed {tag} does not read"));
        verify_payload(&tag, &value).unwrap_or_else(|problem| panic!("{tag}: {problem}"));
    }
    assert_eq!(entry_files(dir.path()).len(), store.len());
    assert!(names(dir.path()).iter().all(|name| !name.starts_with(".chia-tmp-")), "leftovers stay");
}

/// Writes per `write_many` call of the threads that pipeline.
const PIPELINED: u64 = 25;

/// The child: `THREADS` threads writing at once, each announcing a write once it returned.
/// Half of them write one value per call, the other half `PIPELINED` per `write_many` call.
fn write_until_killed(dir: &Path) {
    let store = CacheStore::open(dir, 1 << 30, StoreOptions::default().with_durability(Durability::Full))
        .expect("child opens the store");
    let (acks, acked) = mpsc::channel::<(String, u64)>();
    thread::scope(|scope| {
        for thread_id in 0..THREADS {
            let (store, acks) = (&store, acks.clone());
            scope.spawn(move || {
                let options = chia_cache::WriteOptions::default();
                let step = if thread_id % 2 == 0 { 1 } else { PIPELINED };
                for start in (0..WRITES_PER_THREAD).step_by(step as usize) {
                    let writes: Vec<(String, u64, Vec<u8>)> = (start..(start + step).min(WRITES_PER_THREAD))
                        .map(|i| {
                            let tag = tag(thread_id, i);
                            let value = payload(&tag, i, payload_len(i));
                            (tag, i, value)
                        })
                        .collect();
                    let results = store.write_many(
                        writes.iter().map(|(tag, _, value)| (tag.as_str(), value.as_slice(), &options)),
                    );
                    for ((tag, i, _), result) in writes.into_iter().zip(results) {
                        assert!(result.expect("child write"));
                        if acks.send((tag, i)).is_err() {
                            return;
                        }
                    }
                }
            });
        }
        drop(acks);
        let mut stdout = std::io::stdout().lock();
        // Start on a fresh line: the test harness has printed "test <name> ... " without one.
        let _ = writeln!(stdout);
        for (tag, version) in acked {
            if writeln!(stdout, "ack {tag} {version}").and_then(|()| stdout.flush()).is_err() {
                return;
            }
        }
    });
}

/// A copy of the journal is what a power loss could leave: synced records, while renames,
/// unlinks and unsynced file data are lost. Replaying it must redo the writes and the
/// eviction.
#[test]
fn the_journal_redoes_writes_and_evictions_a_power_loss_undid() {
    let dir = tempfile::tempdir().expect("tempdir");
    let journal_name = ".chia-journal-1.log";
    let (journal, evicted_file) = {
        let store = CacheStore::open(dir.path(), 1 << 20, StoreOptions::default()).expect("open");
        for tag in ["lost", "torn", "evicted"] {
            assert!(store.write(tag, &payload(tag, 1, 3000)).expect("write"));
        }
        let evicted_file = fs::read(store.entry_path("evicted")).expect("read entry");
        assert!(store.evict("evicted"));
        // Syncs the eviction's record along with its own.
        assert!(store.write("later", &payload("later", 1, 10)).expect("write"));
        (fs::read(dir.path().join(journal_name)).expect("read the journal"), evicted_file)
    };
    assert!(!dir.path().join(journal_name).exists(), "a clean close deletes the journal");

    // The power loss: the journal survives, the rest of the directory is older.
    fs::write(dir.path().join(journal_name), &journal).expect("restore the journal");
    let path = |tag: &str| dir.path().join(chia_cache::entry_file_name(tag));
    let lost_mtime = fs::metadata(path("lost")).and_then(|metadata| metadata.modified()).expect("mtime");
    fs::remove_file(path("lost")).expect("lose a rename");
    let mut torn = fs::read(path("torn")).expect("read");
    torn.truncate(1500);
    fs::write(path("torn"), &torn).expect("tear a file");
    fs::write(path("evicted"), &evicted_file).expect("lose an unlink");

    let store = CacheStore::open(dir.path(), 1 << 20, StoreOptions::default()).expect("reopen");
    // The rewritten entry keeps its place in the LRU order: the time it was written at.
    let replayed_mtime = fs::metadata(path("lost")).and_then(|metadata| metadata.modified()).expect("mtime");
    assert_eq!(replayed_mtime, lost_mtime);
    let mut keys = store.keys();
    keys.sort();
    assert_eq!(keys, ["later", "lost", "torn"]);
    for tag in ["lost", "torn"] {
        assert_eq!(verify_payload(tag, &store.read(tag).expect(tag)), Ok(1), "{tag}");
    }
    assert!(!path("evicted").exists());
    assert!(!names(dir.path()).iter().any(|name| name.ends_with(".log") && name != journal_name));
}

/// Under `Full` as under the other modes, and with many threads, the journal is retired at
/// every checkpoint: it never grows much past the configured size, and a clean close leaves
/// none.
#[test]
fn checkpoints_keep_the_journal_small() {
    let dir = tempfile::tempdir().expect("tempdir");
    let options = StoreOptions::default().with_journal_checkpoint_bytes(64 << 10);
    let store = CacheStore::open(dir.path(), 1 << 30, options).expect("open");
    thread::scope(|scope| {
        for thread_id in 0..4u64 {
            let store = &store;
            scope.spawn(move || {
                for i in 0..100u64 {
                    let tag = format!("t{thread_id}-{i}");
                    assert!(store.write(&tag, &payload(&tag, i, 2000)).expect("write"));
                }
            });
        }
    });
    let journals: Vec<String> = names(dir.path()).into_iter().filter(|name| name.ends_with(".log")).collect();
    assert!(journals.len() <= 2, "{journals:?}");
    let last: u64 = journals
        .iter()
        .filter_map(|name| name.strip_prefix(".chia-journal-")?.strip_suffix(".log")?.parse().ok())
        .max()
        .expect("a journal");
    assert!(last > 2, "800 KB of writes went through several journals, not {last}");
    assert_eq!(store.len(), 400);
    store.close().expect("close");
    assert!(!names(dir.path()).iter().any(|name| name.ends_with(".log")));
    let store = CacheStore::open(dir.path(), 1 << 30, StoreOptions::default()).expect("reopen");
    assert_eq!(store.len(), 400);
}
