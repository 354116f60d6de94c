//! A write that the kernel refuses half-way (file size limit, standing in for a full disk)
//! fails cleanly: an error, no partial file, the index unchanged, reads still working.
//!
//! `RLIMIT_FSIZE` makes `write(2)` fail with `EFBIG` past the limit, for root too, so this
//! is a real kernel failure rather than an injected one. It applies to the whole process, so
//! the test runs this binary again as a child that lowers its own limit.

use std::io::{BufRead, BufReader};
use std::path::Path;

use chia_cache::{CacheError, CacheStore, StoreOptions};

use crate::common::{open, spawn_child, temp_files, verify_payload};

const CHILD_DIR_ENV: &str = "CHIA_CACHE_TEST_DISK_FULL_DIR";
const TEST_NAME: &str = "disk_full::a_write_past_the_file_size_limit_fails_cleanly";
const LIMIT: u64 = 1 << 20;
const DONE: &str = "disk-full child: all checks passed";

#[test]
fn a_write_past_the_file_size_limit_fails_cleanly() {
    if let Some(dir) = std::env::var_os(CHILD_DIR_ENV) {
        check_under_file_size_limit(Path::new(&dir));
        println!("{DONE}");
        return;
    }

    let dir = tempfile::tempdir().expect("tempdir");
    let mut child = spawn_child(TEST_NAME, (CHILD_DIR_ENV, dir.path()));
    let stdout = child.stdout.take().expect("child stdout");
    let lines: Vec<String> =
        BufReader::new(stdout).lines().map(|line| line.expect("child stdout line")).collect();
    let status = child.wait().expect("wait for child");
    assert!(status.success(), "child failed: {status}");
    assert!(lines.iter().any(|line| line.ends_with(DONE)), "child did not run its checks: {lines:?}");

    // The directory is consistent for the next open too.
    let store = open(dir.path(), 64 << 20);
    assert_eq!(temp_files(dir.path()), Vec::<String>::new());
    let mut keys = store.keys();
    keys.sort();
    assert_eq!(keys, ["after", "small"]);
    assert_eq!(verify_payload("small", &store.read("small").expect("small")), Ok(1));
}

fn check_under_file_size_limit(dir: &Path) {
    lower_file_size_limit(LIMIT);
    let store = CacheStore::open(dir, 64 << 20, StoreOptions::default()).expect("open");
    let small = crate::common::payload("small", 1, 100_000);
    assert!(store.write("small", &small).expect("small write"));

    for tag in ["huge", "small"] {
        let error =
            store.write(tag, &crate::common::payload(tag, 2, 2 << 20)).expect_err("write past the limit");
        match &error {
            CacheError::Write { source, .. } => {
                assert_eq!(source.raw_os_error(), Some(libc::EFBIG), "{error}")
            }
            other => panic!("expected a write error, got {other:?}"),
        }
        assert_eq!(temp_files(dir), Vec::<String>::new(), "a failed write left a temporary file");
        assert_eq!(store.keys(), ["small"]);
        assert_eq!(store.read("small"), Some(small.clone()), "the previous value is intact");
    }
    assert!(store.write("after", b"the store still works").expect("write after the failure"));
}

#[allow(unsafe_code)]
fn lower_file_size_limit(bytes: u64) {
    let limit = libc::rlimit { rlim_cur: bytes as libc::rlim_t, rlim_max: bytes as libc::rlim_t };
    // SAFETY: plain system calls with valid arguments. Ignoring SIGXFSZ turns "killed for
    // exceeding the limit" into the EFBIG error under test.
    unsafe {
        assert_eq!(libc::signal(libc::SIGXFSZ, libc::SIG_IGN), 0, "ignore SIGXFSZ");
        assert_eq!(libc::setrlimit(libc::RLIMIT_FSIZE, &limit), 0, "setrlimit(RLIMIT_FSIZE)");
    }
}
