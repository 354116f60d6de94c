//! Tests that need to reach inside the I/O paths: injected write failures (disk full at
//! different stages) and pauses that hold a read or write in the middle of its file I/O while
//! other operations run. The public behaviour is tested in `tests/`.

use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, PoisonError};
use std::thread;

use super::naming::{self, FileKind};
use super::{CacheStore, Durability, IoStage, StoreOptions};
use crate::CacheError;

pub(crate) type Hook = Arc<dyn Fn(IoStage, &str) -> io::Result<()> + Send + Sync>;

impl CacheStore {
    fn set_test_hook(&self, hook: impl Fn(IoStage, &str) -> io::Result<()> + Send + Sync + 'static) {
        *self.test_hook.lock().unwrap_or_else(PoisonError::into_inner) = Some(Arc::new(hook));
    }

    fn clear_test_hook(&self) {
        *self.test_hook.lock().unwrap_or_else(PoisonError::into_inner) = None;
    }

    pub(super) fn run_hook(&self, stage: IoStage, tag: &str) -> io::Result<()> {
        let hook = self.test_hook.lock().unwrap_or_else(PoisonError::into_inner).clone();
        hook.map_or(Ok(()), |hook| hook(stage, tag))
    }
}

fn disk_full() -> io::Error {
    io::Error::from_raw_os_error(libc::ENOSPC)
}

fn temp_files(store: &CacheStore) -> Vec<String> {
    std::fs::read_dir(store.dir())
        .expect("list cache dir")
        .map(|entry| entry.expect("dir entry").file_name())
        .filter(|name| naming::classify(name) == FileKind::Temp)
        .map(|name| name.to_string_lossy().into_owned())
        .collect()
}

fn entry_files(store: &CacheStore) -> usize {
    std::fs::read_dir(store.dir())
        .expect("list cache dir")
        .filter(|entry| naming::classify(&entry.as_ref().expect("dir entry").file_name()) == FileKind::Entry)
        .count()
}

/// A store with entries "a" and "b" (100-byte payloads, 32 + 1 + 100 bytes each) in a budget
/// that has room for exactly two of them.
fn store_with_two_entries(dir: &tempfile::TempDir) -> CacheStore {
    store_with_two_entries_in(dir, Durability::Full)
}

fn store_with_two_entries_in(dir: &tempfile::TempDir, durability: Durability) -> CacheStore {
    let options = StoreOptions::default().with_durability(durability);
    let store = CacheStore::open(dir.path(), 2 * 133, options).expect("open");
    assert!(store.write("a", &[b'a'; 100]).expect("write a"));
    assert!(store.write("b", &[b'b'; 100]).expect("write b"));
    store
}

/// After a failed write of `tag`, the store must be exactly as before.
fn assert_unchanged_after_failed_write(store: &CacheStore, result: Result<bool, CacheError>) {
    assert!(matches!(result, Err(CacheError::Write { .. })), "{result:?}");
    assert_eq!(temp_files(store), Vec::<String>::new(), "a failed write left a temporary file");
    assert_eq!(store.keys(), ["a", "b"]);
    assert_eq!(store.size_bytes(), 2 * 133);
    assert_eq!(entry_files(store), 2);
    assert_eq!(store.read("a").as_deref(), Some(&[b'a'; 100][..]));
    assert_eq!(store.read("b").as_deref(), Some(&[b'b'; 100][..]));
}

#[test]
fn cache_store_is_send_and_sync() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<CacheStore>();
}

#[test]
fn disk_full_in_the_middle_of_the_payload_leaves_nothing_behind() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = store_with_two_entries(&dir);
    store.set_test_hook(
        |stage, _| if stage == IoStage::PayloadHalfWritten { Err(disk_full()) } else { Ok(()) },
    );

    // A new tag (which would evict "a") and an overwrite of "a" both fail cleanly.
    let new_tag = store.write("c", &[b'c'; 100]);
    assert_unchanged_after_failed_write(&store, new_tag);
    let overwrite = store.write("a", &[b'x'; 100]);
    assert_unchanged_after_failed_write(&store, overwrite);

    // Once the disk has room again, writes work.
    store.clear_test_hook();
    assert!(store.write("c", &[b'c'; 100]).expect("write c"));
    // The checks above read "a" then "b", so "a" was the least recently used.
    assert_eq!(store.keys(), ["b", "c"]);
}

#[test]
fn a_failed_fsync_leaves_nothing_behind() {
    // Under `Data` the temporary file's own sync fails; under `Full`, the journal's.
    for (durability, stage) in
        [(Durability::Data, IoStage::SyncTemp), (Durability::Full, IoStage::SyncJournal)]
    {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = store_with_two_entries_in(&dir, durability);
        store.set_test_hook(move |at, _| if at == stage { Err(io::Error::other("EIO")) } else { Ok(()) });
        let result = store.write("c", &[b'c'; 100]);
        assert_unchanged_after_failed_write(&store, result);
        // The overwrite of an existing entry too.
        let result = store.write("a", &[b'x'; 100]);
        assert_unchanged_after_failed_write(&store, result);
        store.clear_test_hook();
        assert!(store.write("c", &[b'c'; 100]).expect("write once the disk works"), "{durability:?}");
        assert_eq!(store.keys(), ["b", "c"], "{durability:?}");
        drop(store);
        // Nothing of the failed writes comes back at the next open.
        let store = CacheStore::open(dir.path(), 2 * 133, StoreOptions::default()).expect("reopen");
        let mut keys = store.keys();
        keys.sort();
        assert_eq!(keys, ["b", "c"], "{durability:?}");
        assert_eq!(store.read("b").as_deref(), Some(&[b'b'; 100][..]));
    }
}

#[test]
fn a_failed_rename_evicts_nothing_and_leaves_nothing_behind() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = store_with_two_entries(&dir);
    store.set_test_hook(|stage, _| if stage == IoStage::Commit { Err(disk_full()) } else { Ok(()) });
    let result = store.write("c", &[b'c'; 100]);
    assert_unchanged_after_failed_write(&store, result);
}

/// A hook that parks the first call at `stage` until released, announcing that it parked.
struct Pause {
    parked: mpsc::Receiver<()>,
    release: mpsc::Sender<()>,
}

fn pause_at(store: &CacheStore, stage: IoStage, tag: &'static str) -> Pause {
    let (parked_tx, parked_rx) = mpsc::channel();
    let (release_tx, release_rx) = mpsc::channel::<()>();
    let release_rx = Mutex::new(release_rx);
    let armed = AtomicBool::new(true);
    store.set_test_hook(move |at, at_tag| {
        if at == stage && at_tag == tag && armed.swap(false, Ordering::SeqCst) {
            parked_tx.send(()).expect("test is waiting");
            release_rx.lock().unwrap_or_else(PoisonError::into_inner).recv().expect("test releases");
        }
        Ok(())
    });
    Pause { parked: parked_rx, release: release_tx }
}

#[test]
fn a_write_in_progress_does_not_block_other_operations() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Arc::new(CacheStore::open(dir.path(), 1 << 20, StoreOptions::default()).expect("open"));
    assert!(store.write("small", b"before").expect("write"));
    let pause = pause_at(&store, IoStage::PayloadHalfWritten, "big");

    let writer = thread::spawn({
        let store = Arc::clone(&store);
        move || store.write("big", &vec![7u8; 512 << 10])
    });
    pause.parked.recv().expect("writer parked mid-payload");

    // The big write is stuck half-way through its file; everything else goes on.
    assert!(!store.has("big"));
    assert_eq!(store.read("small").as_deref(), Some(&b"before"[..]));
    assert!(store.write("small", b"after").expect("write while big is in flight"));
    assert!(store.write("other", b"x").expect("write while big is in flight"));
    assert!(store.evict("other"));
    assert_eq!(store.keys(), ["small"]);

    pause.release.send(()).expect("writer waits");
    assert!(writer.join().expect("writer thread").expect("big write"));
    assert_eq!(store.keys(), ["small", "big"]);
    assert_eq!(store.read("big").map(|value| value.len()), Some(512 << 10));
}

#[test]
fn a_read_in_progress_returns_the_value_it_opened_despite_overwrite_and_evict() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Arc::new(CacheStore::open(dir.path(), 1 << 20, StoreOptions::default()).expect("open"));
    let old_value = vec![1u8; 200 << 10];
    assert!(store.write("t", &old_value).expect("write"));
    let pause = pause_at(&store, IoStage::ReadOpened, "t");

    let reader = thread::spawn({
        let store = Arc::clone(&store);
        move || store.read("t")
    });
    pause.parked.recv().expect("reader parked with the file open");

    // Neither waits for the reader; the reader's handle keeps the old file alive.
    assert!(store.write("t", &[2u8; 100]).expect("overwrite"));
    assert_eq!(store.read("t").as_deref(), Some(&[2u8; 100][..]));
    assert!(store.evict("t"));

    pause.release.send(()).expect("reader waits");
    assert_eq!(reader.join().expect("reader thread"), Some(old_value));
    assert!(!store.has("t"));
    assert_eq!(temp_files(&store), Vec::<String>::new());
}

#[test]
fn a_damaged_read_does_not_drop_a_value_written_meanwhile() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Arc::new(CacheStore::open(dir.path(), 1 << 20, StoreOptions::default()).expect("open"));
    assert!(store.write("t", &[1u8; 1000]).expect("write"));
    let pause = pause_at(&store, IoStage::ReadOpened, "t");

    let reader = thread::spawn({
        let store = Arc::clone(&store);
        move || store.read("t")
    });
    pause.parked.recv().expect("reader parked with the file open");

    // Damage the file the reader has open, then replace it with a new value.
    std::fs::OpenOptions::new()
        .write(true)
        .open(store.entry_path("t"))
        .and_then(|file| file.set_len(500))
        .expect("truncate the open file");
    assert!(store.write("t", &[2u8; 1000]).expect("overwrite"));

    pause.release.send(()).expect("reader waits");
    assert_eq!(reader.join().expect("reader thread"), None, "the damaged old file is a miss");
    assert_eq!(store.read("t").as_deref(), Some(&[2u8; 1000][..]), "the new value survives");
}

#[test]
fn a_panicking_batch_leader_fails_its_batch_and_frees_the_queue() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Arc::new(CacheStore::open(dir.path(), 1 << 20, StoreOptions::default()).expect("open"));
    let armed = AtomicBool::new(true);
    store.set_test_hook(move |stage, tag| {
        if stage == IoStage::SyncJournal && tag == "boom" && armed.swap(false, Ordering::SeqCst) {
            panic!("injected");
        }
        Ok(())
    });
    let leader = thread::spawn({
        let store = Arc::clone(&store);
        move || store.write("boom", b"x")
    });
    assert!(leader.join().is_err(), "the leader's panic reaches its caller");
    // The queue is free again, and the next write starts a new journal.
    assert!(store.write("after", b"y").expect("write after the panic"));
    assert_eq!(store.keys(), ["after"]);
    drop(store);
    let store = CacheStore::open(dir.path(), 1 << 20, StoreOptions::default()).expect("reopen");
    assert_eq!(store.keys(), ["after"]);
    assert_eq!(temp_files(&store), Vec::<String>::new());
}

/// Waits (yielding) until `count` ops are queued behind a parked batch leader.
fn wait_until_queued(store: &CacheStore, count: usize) {
    let commit = store.commit.as_ref().expect("a Full store");
    while commit.queued() < count {
        thread::yield_now();
    }
}

/// What a power loss right now could leave: the journals as they are, replayed at the next
/// open over the entry files as a clean close leaves them.
fn reopen_replaying_the_journal(store: Arc<CacheStore>, budget: u64) -> CacheStore {
    reopen_replaying_the_journal_of(store, budget, Some(1))
}

/// The same with the journal of `generation`, or every journal there is.
fn reopen_replaying_the_journal_of(
    store: Arc<CacheStore>,
    budget: u64,
    generation: Option<u64>,
) -> CacheStore {
    let dir = store.dir().to_owned();
    let journals: Vec<(std::path::PathBuf, Vec<u8>)> = std::fs::read_dir(&dir)
        .expect("list")
        .map(|entry| entry.expect("entry").path())
        .filter(|path| match naming::classify(path.file_name().expect("name")) {
            FileKind::Journal(found) => generation.is_none_or(|wanted| wanted == found),
            _ => false,
        })
        .map(|path| {
            let bytes = std::fs::read(&path).expect("read a journal");
            (path, bytes)
        })
        .collect();
    assert!(generation.is_none() || !journals.is_empty(), "no journal {generation:?}");
    drop(Arc::into_inner(store).expect("the only handle"));
    for (path, bytes) in journals {
        std::fs::write(path, bytes).expect("put the journal back");
    }
    CacheStore::open(&dir, budget, StoreOptions::default()).expect("reopen")
}

#[test]
fn a_tag_evicted_and_written_again_in_one_batch_survives_a_replay() {
    let dir = tempfile::tempdir().expect("tempdir");
    // Room for "t", "b" (133 bytes each) and "first" (137).
    let store = Arc::new(CacheStore::open(dir.path(), 2 * 133 + 137, StoreOptions::default()).expect("open"));
    assert!(store.write("t", &[1u8; 100]).expect("write t"));
    assert!(store.write("b", &[2u8; 100]).expect("write b"));
    let pause = pause_at(&store, IoStage::SyncJournal, "first");
    let spawn_write = |tag: &'static str, byte: u8| {
        let store = Arc::clone(&store);
        thread::spawn(move || store.write(tag, &[byte; 100]).expect("write"))
    };
    let first = spawn_write("first", 3);
    pause.parked.recv().expect("the first batch's leader parked");
    // One batch of two writes: "a" evicts the old "t", then "t" is written again.
    let a = spawn_write("a", 4);
    wait_until_queued(&store, 1);
    let t = spawn_write("t", 5);
    wait_until_queued(&store, 2);
    pause.release.send(()).expect("leader waits");
    for writer in [first, a, t] {
        assert!(writer.join().expect("writer"));
    }
    assert_eq!(store.keys(), ["first", "a", "t"]);

    let store = reopen_replaying_the_journal(store, 1 << 20);
    assert_eq!(store.read("t").as_deref(), Some(&[5u8; 100][..]), "the acknowledged t");
}

#[test]
fn a_removal_then_a_write_of_the_same_tag_keep_their_order_in_the_journal() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Arc::new(CacheStore::open(dir.path(), 1 << 20, StoreOptions::default()).expect("open"));
    assert!(store.write("t", &[1u8; 100]).expect("write t"));
    let pause = pause_at(&store, IoStage::SyncJournal, "first");
    let first = thread::spawn({
        let store = Arc::clone(&store);
        move || store.write("first", b"x").expect("write")
    });
    pause.parked.recv().expect("the first batch's leader parked");
    let evict = thread::spawn({
        let store = Arc::clone(&store);
        move || store.evict("t")
    });
    wait_until_queued(&store, 1);
    let rewrite = thread::spawn({
        let store = Arc::clone(&store);
        move || store.write("t", &[2u8; 100]).expect("write")
    });
    wait_until_queued(&store, 2);
    pause.release.send(()).expect("leader waits");
    assert!(first.join().expect("writer"));
    assert!(evict.join().expect("evict"), "the old t was there to evict");
    assert!(rewrite.join().expect("writer"));
    assert_eq!(store.read("t").as_deref(), Some(&[2u8; 100][..]));

    let store = reopen_replaying_the_journal(store, 1 << 20);
    assert_eq!(store.read("t").as_deref(), Some(&[2u8; 100][..]), "the write after the removal");
}

#[test]
fn a_failed_journal_sync_fails_the_batches_that_appended_after_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Arc::new(CacheStore::open(dir.path(), 1 << 20, StoreOptions::default()).expect("open"));
    assert!(store.write("before", b"kept").expect("write"));
    // The batch of "bad" has appended; its sync waits, then fails.
    let (parked_tx, parked_rx) = mpsc::channel();
    let (release_tx, release_rx) = mpsc::channel::<()>();
    let release_rx = Mutex::new(release_rx);
    store.set_test_hook(move |stage, tag| {
        if stage == IoStage::JournalAppended && tag == "bad" {
            parked_tx.send(()).expect("test is waiting");
            release_rx.lock().unwrap_or_else(PoisonError::into_inner).recv().expect("test releases");
            return Err(io::Error::other("EIO"));
        }
        Ok(())
    });
    let bad = thread::spawn({
        let store = Arc::clone(&store);
        move || store.write("bad", b"x")
    });
    parked_rx.recv().expect("the bad batch is syncing");
    // The next batch appends to the same journal, and its own sync succeeds meanwhile.
    let good = thread::spawn({
        let store = Arc::clone(&store);
        move || store.write("good", b"y")
    });
    let commit = store.commit.as_ref().expect("a Full store");
    while commit.in_flight() < 2 {
        thread::yield_now();
    }
    release_tx.send(()).expect("the bad batch waits");
    assert!(matches!(bad.join().expect("writer"), Err(CacheError::Write { .. })));
    let good = good.join().expect("writer");
    assert!(matches!(good, Err(CacheError::Write { .. })), "appended after a failed sync: {good:?}");
    assert_eq!(store.keys(), ["before"]);
    assert_eq!(temp_files(&store), Vec::<String>::new());

    // Later writes go to a new journal and work.
    store.clear_test_hook();
    assert!(store.write("after", b"z").expect("write"));
    let store = reopen_replaying_the_journal_of(store, 1 << 20, None);
    let mut keys = store.keys();
    keys.sort();
    assert_eq!(keys, ["after", "before"]);
}
