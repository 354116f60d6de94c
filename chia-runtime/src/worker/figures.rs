//! What a worker measures of itself for its heartbeats ([`WorkerFigures`]): the process's
//! memory and CPU time, what runs on it, and the figures of the service instances it hosts.
//!
//! Counting is a relaxed atomic add per attempt and per call; measuring (a read of
//! `/proc/self/statm` and two `getrusage` calls) happens only when a heartbeat carries
//! figures, every few seconds. No walk of `/proc`: a task's own processes are not in the
//! memory figure, and their CPU time only once they have ended and been waited for.

use crate::driver::client::Client;
use chia_core::protocol::WorkerFigures;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

/// The worker's running counts, shared by its serving loop and its heartbeat source.
#[derive(Debug, Default)]
pub(crate) struct Tally {
    running: AtomicU64,
    attempts: AtomicU64,
    bypassed: AtomicU64,
}

impl Tally {
    /// A task attempt arrived; `bypassed`: it runs a bypass provider instead of the function.
    pub(crate) fn attempt(&self, bypassed: bool) {
        self.attempts.fetch_add(1, Ordering::Relaxed);
        if bypassed {
            self.bypassed.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// A task or service call runs until the guard is dropped.
    pub(crate) fn running(self: &Arc<Tally>) -> RunningGuard {
        self.running.fetch_add(1, Ordering::Relaxed);
        RunningGuard(self.clone())
    }
}

/// Counts one task or call as running while it lives.
#[derive(Debug)]
pub(crate) struct RunningGuard(Arc<Tally>);

impl Drop for RunningGuard {
    fn drop(&mut self) {
        self.0.running.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Makes `client`'s heartbeats carry this worker's figures.
pub(crate) fn report_with_heartbeats(client: &Client, tally: Arc<Tally>) {
    // The registry, not the client: a client holding a closure that holds it would never drop.
    let services = client.service_figures().clone();
    client.set_figures_source(Box::new(move || WorkerFigures {
        memory_bytes: resident_bytes(),
        cpu_ms: cpu_ms(),
        running: tally.running.load(Ordering::Relaxed),
        attempts: tally.attempts.load(Ordering::Relaxed),
        bypassed: tally.bypassed.load(Ordering::Relaxed),
        services: services.collect(),
    }));
}

/// The resident set of this process, in bytes (0 where `/proc` does not say).
fn resident_bytes() -> u64 {
    let Ok(statm) = std::fs::read_to_string("/proc/self/statm") else { return 0 };
    // "size resident shared text lib data dt", in pages.
    let pages: u64 = statm.split_whitespace().nth(1).and_then(|field| field.parse().ok()).unwrap_or(0);
    pages.saturating_mul(page_size())
}

/// The size of a memory page, in bytes (0 if the system does not say).
#[allow(unsafe_code)]
fn page_size() -> u64 {
    // SAFETY: sysconf takes an integer and only returns a value; it has no preconditions.
    let size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    u64::try_from(size).unwrap_or(0)
}

/// CPU time (user and system) of this process and of its children that ended and were
/// waited for, in milliseconds.
fn cpu_ms() -> u64 {
    let used = |who| {
        let Some(usage) = rusage(who) else { return 0 };
        let ms = |time: libc::timeval| {
            u64::try_from(time.tv_sec).unwrap_or(0) * 1000 + u64::try_from(time.tv_usec).unwrap_or(0) / 1000
        };
        ms(usage.ru_utime) + ms(usage.ru_stime)
    };
    used(libc::RUSAGE_SELF) + used(libc::RUSAGE_CHILDREN)
}

/// getrusage(2) for `who` (`RUSAGE_SELF` or `RUSAGE_CHILDREN`); `None` if it fails.
#[allow(unsafe_code)]
fn rusage(who: libc::c_int) -> Option<libc::rusage> {
    // SAFETY: rusage is plain integers and timevals, for which all zeroes is a valid value;
    // getrusage fills the live, writable `usage` it is given and keeps no pointer to it.
    unsafe {
        let mut usage: libc::rusage = std::mem::zeroed();
        if libc::getrusage(who, &mut usage) != 0 {
            return None;
        }
        Some(usage)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_process_measures_itself() {
        // This test process holds at least its own binary's pages, and has run code.
        assert!(resident_bytes() > 1 << 20, "{} bytes resident", resident_bytes());
        // CPU time moves while this thread works (bounded: the machine may be busy).
        let before = cpu_ms();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        while cpu_ms() < before + 20 && std::time::Instant::now() < deadline {
            std::hint::black_box((0..10_000u64).sum::<u64>());
        }
        assert!(cpu_ms() >= before + 20, "CPU time stayed at {} ms after 20 s of work", cpu_ms());
    }

    #[test]
    fn running_counts_what_holds_a_guard() {
        let tally = Arc::new(Tally::default());
        let first = tally.running();
        let second = tally.running();
        tally.attempt(false);
        tally.attempt(true);
        drop(first);
        assert_eq!(tally.running.load(Ordering::Relaxed), 1);
        drop(second);
        assert_eq!(tally.running.load(Ordering::Relaxed), 0);
        assert_eq!((tally.attempts.load(Ordering::Relaxed), tally.bypassed.load(Ordering::Relaxed)), (2, 1));
    }
}
