//! A writer killed with SIGKILL in the middle of its writes leaves only complete entries.
//!
//! The test runs this binary again as a child (selected by an environment variable) that
//! writes entries in a loop and announces each one on stdout before starting it. The parent
//! kills the child once it announces entry `KILL_AT`, so entries before it are finished and
//! entry `KILL_AT` (a few megabytes, fsynced) is most likely half-written.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::process::ExitStatusExt;
use std::path::Path;

use chia_cache::{CacheStore, Durability, StoreOptions};

use crate::common::{spawn_child, temp_files, verify_payload};

const CHILD_DIR_ENV: &str = "CHIA_CACHE_TEST_CRASH_WRITER_DIR";
/// This test's name as the test binary knows it (module path within `tests/store`).
const TEST_NAME: &str = "crash::sigkill_mid_write_leaves_only_complete_entries";
/// Entry 31 is one of the 3 MiB ones.
const KILL_AT: u64 = 31;
/// The child stops here if the parent somehow never kills it.
const CHILD_LIMIT: u64 = 200;

fn tag(i: u64) -> String {
    format!("entry-{i}")
}

fn payload_len(i: u64) -> usize {
    [16 << 10, 128 << 10, 1 << 20, 3 << 20][(i % 4) as usize]
}

#[test]
fn sigkill_mid_write_leaves_only_complete_entries() {
    if let Some(dir) = std::env::var_os(CHILD_DIR_ENV) {
        write_until_killed(Path::new(&dir));
        return;
    }

    let dir = tempfile::tempdir().expect("tempdir");
    let mut child = spawn_child(TEST_NAME, (CHILD_DIR_ENV, dir.path()));
    let stdout = child.stdout.take().expect("child stdout");
    let kill_line = format!("writing {KILL_AT}");
    let mut announced = false;
    for line in BufReader::new(stdout).lines() {
        if line.expect("child stdout line") == kill_line {
            announced = true;
            child.kill().expect("SIGKILL the writer");
            break;
        }
    }
    let status = child.wait().expect("wait for child");
    assert!(announced, "child ended before announcing entry {KILL_AT}: {status}");
    assert_eq!(status.signal(), Some(libc::SIGKILL), "the child must die by SIGKILL, got {status}");
    eprintln!("temporary files left by the killed writer: {:?}", temp_files(dir.path()));

    let store = CacheStore::open(dir.path(), 1 << 30, StoreOptions::default()).expect("open after crash");
    assert_eq!(temp_files(dir.path()), Vec::<String>::new(), "open must remove leftovers");
    for i in 0..KILL_AT {
        let value = store.read(&tag(i)).unwrap_or_else(|| panic!("finished entry {i} is missing"));
        assert_eq!(verify_payload(&tag(i), &value), Ok(i), "entry {i}");
    }
    let keys = store.keys();
    assert!(keys.len() as u64 == KILL_AT || keys.len() as u64 == KILL_AT + 1, "{keys:?}");
    for key in &keys {
        let value = store.read(key).unwrap_or_else(|| panic!("indexed entry {key} does not read"));
        verify_payload(key, &value).unwrap_or_else(|problem| panic!("entry {key}: {problem}"));
    }
}

/// The child: write entries forever (up to a limit), announcing each before writing it.
fn write_until_killed(dir: &Path) {
    let options = StoreOptions::default().with_durability(Durability::Data);
    let store = CacheStore::open(dir, 1 << 30, options).expect("child opens the store");
    let mut stdout = std::io::stdout().lock();
    // Start on a fresh line: the test harness has printed "test <name> ... " without one.
    if writeln!(stdout).is_err() {
        return;
    }
    for i in 0..CHILD_LIMIT {
        // Prepared before the announcement, so that the kill lands inside `write`.
        let tag = tag(i);
        let value = crate::common::payload(&tag, i, payload_len(i));
        if writeln!(stdout, "writing {i}").and_then(|()| stdout.flush()).is_err() {
            return; // The parent is gone.
        }
        store.write(&tag, &value).expect("child write");
    }
}
