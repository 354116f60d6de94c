//! `CacheStore` behaviour through its public API. One test binary with a module per theme;
//! the crash and disk-full tests re-run this binary as a child process.

mod basic;
mod common;
mod concurrency;
mod crash;
mod disk_full;
#[cfg(unix)]
mod group_commit;
mod integrity;
#[cfg(unix)]
mod modes;
mod warm_start;
