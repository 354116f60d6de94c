//! `CacheStore` behaviour through its public API. One test binary with a module per theme;
//! the crash and disk-full tests re-run this binary as a child process.

mod basic;
mod common;
mod concurrency;
mod crash;
mod disk_full;
mod expiry;
#[cfg(unix)]
mod group_commit;
mod integrity;
mod maintenance;
#[cfg(unix)]
mod modes;
mod snapshot;
mod warm_start;
