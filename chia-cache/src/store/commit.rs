//! Group commit under [`crate::Durability::Full`]: the write queue, its leaders, and the
//! journal checkpoints (see the [`crate::CacheStore`] documentation for the protocol).
//!
//! A batch goes through three stages: its leader appends its records to the journal (one
//! batch at a time: the append token), syncs them (several batches at once: a device serves
//! concurrent syncs in parallel), then installs them (one batch at a time, in the order they
//! were taken). A removal batch runs alone: its records are known only once it has chosen its
//! entries, and they must be in the journal before any later batch's.

use std::collections::{HashMap, VecDeque};
use std::fs;
use std::io::{self, IoSlice};
use std::mem;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::thread::{self, Thread};

use super::index::EntryMeta;
use super::journal::{self, JournalFile, Kind};
use super::{CacheStore, IoStage, Selector};

/// A write whose temporary file is complete, waiting for its batch.
pub(crate) struct PutOp {
    pub tag: String,
    pub temp_path: PathBuf,
    pub final_path: PathBuf,
    /// The entry's complete file, as the journal records it.
    pub entry: Vec<u8>,
    pub meta: EntryMeta,
}

/// What the queue carries.
pub(crate) enum Op {
    Put(PutOp),
    /// An explicit removal: the entries the selector picks when the batch runs.
    Remove(Selector),
}

/// What became of an op.
pub(crate) enum Outcome {
    Put(io::Result<()>),
    Removed(Vec<String>),
}

impl Outcome {
    pub(crate) fn into_put(self) -> io::Result<()> {
        match self {
            Outcome::Put(result) => result,
            Outcome::Removed(_) => Ok(()),
        }
    }

    pub(crate) fn into_removed(self) -> Vec<String> {
        match self {
            Outcome::Removed(tags) => tags,
            Outcome::Put(_) => Vec::new(),
        }
    }
}

/// Batches between their append and the end of their install, at most.
const MAX_IN_FLIGHT: usize = 4;

/// Writers wait parked, not on a condition variable: a leader wakes exactly the writers of its
/// batch, the leader next in line to install, and the first queued writer (to lead the next
/// batch), instead of every waiting thread at every batch.
pub(crate) struct GroupCommit {
    state: Mutex<State>,
    checkpoint_bytes: u64,
}

struct State {
    /// Ops waiting for a leader, each with its writer's thread.
    queue: Vec<(u64, Op, Thread)>,
    /// The sequence number of the last op queued.
    last_queued: u64,
    /// Every op numbered up to this one is done (batches finish in the order they were taken).
    done_through: u64,
    /// Outcomes of ops that did not simply succeed: failed writes, and removals.
    outcomes: HashMap<u64, Outcome>,
    /// Whether a leader holds the journal to append to it.
    appending: bool,
    /// Batches taken and not installed yet, oldest first.
    in_flight: VecDeque<InFlight>,
    /// The number of the next batch (from 1), and of the last one installed.
    next_batch: u64,
    installed: u64,
    /// The journal appended to; `None` while a leader appends, or after a failure left it
    /// unusable (the next batch starts a new generation).
    journal: Option<JournalFile>,
    next_generation: u64,
    /// Journals no longer appended to whose entries are not yet known durable.
    retired: Vec<PathBuf>,
    /// Journals a sync failed on: records appended to them after the failure may follow a
    /// hole, which ends a replay, so batches that appended to them fail, whatever their own
    /// sync said.
    poisoned: Vec<u64>,
    /// Once the batches up to this one are installed, the retired journals can go.
    checkpoint_after: Option<u64>,
    /// Entry files installed since the last checkpoint, where syncing needs the list.
    touched: Vec<PathBuf>,
    /// Whether a checkpoint is syncing.
    checkpointing: bool,
}

struct InFlight {
    id: u64,
    last_seq: u64,
    leader: Thread,
    removal: bool,
    /// Its leader panicked: skipped when its turn to install comes.
    abandoned: bool,
}

impl GroupCommit {
    /// The queue of a store just opened in `dir`, with a new, empty journal.
    pub(crate) fn start(dir: &Path, checkpoint_bytes: u64) -> io::Result<GroupCommit> {
        let mut generation = 1;
        let journal = loop {
            match JournalFile::create(dir, generation) {
                Ok(journal) => break journal,
                Err(error) if error.kind() == io::ErrorKind::AlreadyExists && generation < 1000 => {
                    generation += 1
                }
                Err(error) => return Err(error),
            }
        };
        Ok(GroupCommit {
            state: Mutex::new(State {
                queue: Vec::new(),
                last_queued: 0,
                done_through: 0,
                outcomes: HashMap::new(),
                appending: false,
                in_flight: VecDeque::new(),
                next_batch: 1,
                installed: 0,
                journal: Some(journal),
                next_generation: generation + 1,
                retired: Vec::new(),
                poisoned: Vec::new(),
                checkpoint_after: None,
                touched: Vec::new(),
                checkpointing: false,
            }),
            checkpoint_bytes,
        })
    }

    /// How many ops wait for a leader.
    #[cfg(test)]
    pub(crate) fn queued(&self) -> usize {
        self.lock().queue.len()
    }

    /// How many batches are between their append and the end of their install.
    #[cfg(test)]
    pub(crate) fn in_flight(&self) -> usize {
        self.lock().in_flight.len()
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Queues `op` and returns once its batch is done, leading batches meanwhile when it can.
    pub(crate) fn submit(&self, store: &CacheStore, op: Op) -> Outcome {
        self.submit_many(store, vec![op]).pop().unwrap_or(Outcome::Put(Ok(())))
    }

    /// Queues `ops` one after the other and returns their outcomes, in order, once all are
    /// done: they share batches (and syncs) with each other and with other writers'.
    pub(crate) fn submit_many(&self, store: &CacheStore, ops: Vec<Op>) -> Vec<Outcome> {
        let mut state = self.lock();
        let first = state.last_queued + 1;
        for op in ops {
            state.last_queued += 1;
            let seq = state.last_queued;
            state.queue.push((seq, op, thread::current()));
        }
        let last = state.last_queued;
        loop {
            if state.done_through >= last {
                return (first..=last)
                    .map(|seq| state.outcomes.remove(&seq).unwrap_or(Outcome::Put(Ok(()))))
                    .collect();
            }
            if can_lead(&state) {
                drop(state);
                self.lead_one_batch(store);
            } else {
                drop(state);
                // A token left by an unpark since the check makes this return at once.
                thread::park();
            }
            state = self.lock();
        }
    }

    /// Takes the next batch from the queue and sees it through: append, sync, install.
    fn lead_one_batch(&self, store: &CacheStore) {
        let mut state = self.lock();
        if !can_lead(&state) {
            return;
        }
        let removal = matches!(state.queue.first(), Some((_, Op::Remove(_), _)));
        let split = state
            .queue
            .iter()
            .position(|(_, op, _)| matches!(op, Op::Remove(_)) != removal)
            .unwrap_or(state.queue.len());
        let queued: Vec<(u64, Op, Thread)> = state.queue.drain(..split).collect();
        let id = state.next_batch;
        state.next_batch += 1;
        let last_seq = queued.last().map_or(state.last_queued, |(seq, _, _)| *seq);
        let me = thread::current();
        state.in_flight.push_back(InFlight { id, last_seq, leader: me.clone(), removal, abandoned: false });
        state.appending = true;
        let mut journal = state.journal.take();
        let generation = state.next_generation;
        drop(state);

        let mut waiters = Vec::with_capacity(queued.len());
        let mut batch = Vec::with_capacity(queued.len());
        for (seq, op, thread) in queued {
            if thread.id() != me.id() {
                waiters.push(thread);
            }
            batch.push((seq, op));
        }
        let mut guard = LeaderGuard {
            commit: self,
            id,
            seqs: batch.iter().map(|(seq, _)| *seq).collect(),
            waiters,
            appending: true,
            journal: journal.as_ref().map(|journal| journal.path().to_owned()),
            armed: true,
        };

        let mut outcomes = Vec::new();
        let mut touched = Vec::new();
        if removal {
            // Alone in flight: its turn to install is now, and it appends after choosing.
            let records = self.install_removals(store, batch, &mut outcomes);
            let (journal, retired) = append_or_retire(store, journal, generation, &records);
            self.put_journal_back(journal, retired, generation, &mut guard);
        } else {
            let mut failure = None;
            let mut retired = None;
            let first_tag = batch.iter().find_map(|(_, op)| match op {
                Op::Put(put) => Some(put.tag.clone()),
                Op::Remove(_) => None,
            });
            // A full journal gives way to a new one before this batch appends.
            if journal.as_ref().is_some_and(|journal| journal.len() >= self.checkpoint_bytes) {
                match JournalFile::create(store.dir(), generation) {
                    Ok(fresh) => retired = journal.replace(fresh).map(|old| old.path().to_owned()),
                    Err(error) => {
                        tracing::warn!(dir = %store.dir().display(), %error, "cache: cannot start a new journal; the current one grows on");
                    }
                }
            }
            let records: Vec<[u8; journal::FRAME_LEN]> = batch
                .iter()
                .filter_map(|(_, op)| match op {
                    Op::Put(put) => Some(journal::frame(Kind::Put, &put.entry, put.meta.mtime_ns)),
                    Op::Remove(_) => None,
                })
                .collect();
            let mut slices = Vec::with_capacity(2 * records.len());
            let puts = batch.iter().filter_map(|(_, op)| match op {
                Op::Put(put) => Some(put),
                Op::Remove(_) => None,
            });
            for (frame, put) in records.iter().zip(puts) {
                slices.push(IoSlice::new(frame));
                slices.push(IoSlice::new(&put.entry));
            }
            let appended = (|| {
                if journal.is_none() {
                    journal = Some(JournalFile::create(store.dir(), generation)?);
                }
                let journal = journal.as_mut().expect("just created");
                store.run_hook(IoStage::SyncJournal, first_tag.as_deref().unwrap_or_default())?;
                let handle = journal.sync_handle()?;
                journal.append(&slices)?;
                Ok(handle)
            })();
            drop(slices);
            let sync_handle = match appended {
                Ok(handle) => Some(handle),
                Err(error) => {
                    failure = Some(error);
                    None
                }
            };
            let broken = if failure.is_some() { journal.take() } else { None };
            let retired = retired.into_iter().chain(broken.map(|broken| broken.path().to_owned())).collect();
            let appended_to = journal.as_ref().map(JournalFile::generation);
            self.put_journal_back(journal, retired, generation, &mut guard);

            // Sync while the next batch appends.
            if let Some(handle) = sync_handle
                && let Err(error) = store
                    .run_hook(IoStage::JournalAppended, first_tag.as_deref().unwrap_or_default())
                    .and_then(|()| handle.sync_data())
            {
                let mut state = self.lock();
                state.poisoned.extend(appended_to);
                if state.journal.as_ref().map(JournalFile::generation) == appended_to
                    && let Some(broken) = state.journal.take()
                {
                    state.retired.push(broken.path().to_owned());
                }
                state.checkpoint_after = Some(state.next_batch - 1);
                drop(state);
                failure = Some(error);
            }
            self.wait_for_turn(id);
            if failure.is_none()
                && let Some(generation) = appended_to
                && self.lock().poisoned.contains(&generation)
            {
                failure = Some(io::Error::other("a sync of the cache journal failed before this batch's"));
            }
            if let Some(error) = &failure {
                tracing::warn!(dir = %store.dir().display(), %error, "cache: journal write failed; failing its batch");
            }
            self.install_puts(store, batch, failure.as_ref(), &mut outcomes, &mut touched);
        }
        guard.armed = false;
        self.finish(id, outcomes, touched, mem::take(&mut guard.waiters), store);
    }

    /// Hands the journal back after an append, with the journals to retire, and frees the
    /// append token for the next batch's leader.
    fn put_journal_back(
        &self,
        journal: Option<JournalFile>,
        retired: Vec<PathBuf>,
        generation: u64,
        guard: &mut LeaderGuard<'_>,
    ) {
        let mut state = self.lock();
        if journal.as_ref().is_some_and(|journal| journal.generation() >= generation) {
            state.next_generation = generation + 1;
        }
        let mut journal = journal;
        let mut retired = retired;
        if let Some(poisoned) = journal.take_if(|journal| state.poisoned.contains(&journal.generation())) {
            retired.push(poisoned.path().to_owned());
        }
        if !retired.is_empty() {
            state.retired.extend(retired);
            // Every batch taken so far may have appended to them.
            state.checkpoint_after = Some(state.next_batch - 1);
        }
        state.journal = journal;
        state.appending = false;
        guard.appending = false;
        let next_leader = state.queue.first().map(|(_, _, thread)| thread.clone());
        drop(state);
        if let Some(next_leader) = next_leader {
            next_leader.unpark();
        }
    }

    /// Parks until every batch taken before `id` is installed.
    fn wait_for_turn(&self, id: u64) {
        let mut state = self.lock();
        while state.installed + 1 < id {
            drop(state);
            thread::park();
            state = self.lock();
        }
    }

    /// Installs a batch of writes in queue order, under one hold of the index lock.
    fn install_puts(
        &self,
        store: &CacheStore,
        batch: Vec<(u64, Op)>,
        failure: Option<&io::Error>,
        outcomes: &mut Vec<(u64, Outcome)>,
        touched: &mut Vec<PathBuf>,
    ) {
        let mut detached = Vec::new();
        {
            let mut index = store.lock_index();
            for (seq, op) in batch {
                let Op::Put(put) = op else { continue };
                if let Some(error) = failure {
                    store.remove_quietly(&put.temp_path);
                    outcomes.push((seq, Outcome::Put(Err(copy_error(error)))));
                    continue;
                }
                let renamed = store
                    .run_hook(IoStage::Commit, &put.tag)
                    .and_then(|()| fs::rename(&put.temp_path, &put.final_path));
                if let Err(error) = renamed {
                    // Its put is in the journal: after a crash, a replay may still install it
                    // (its value complete and right), as it may for a batch whose sync failed.
                    store.remove_quietly(&put.temp_path);
                    outcomes.push((seq, Outcome::Put(Err(error))));
                    continue;
                }
                // Entries evicted to make room are not journaled: a replay that brings one
                // back (its put still in the journal) restores a value the cache held, and the
                // open evicts again if the budget is exceeded.
                let (_evicted, files) = store.index_installed(&mut index, &put.tag, put.meta);
                detached.extend(files);
                if journal::SYNC_NEEDS_FILE_LIST {
                    touched.push(put.final_path);
                }
            }
        }
        store.delete_detached(detached);
    }

    /// Runs a batch of removals; returns their journal records.
    fn install_removals(
        &self,
        store: &CacheStore,
        batch: Vec<(u64, Op)>,
        outcomes: &mut Vec<(u64, Outcome)>,
    ) -> Vec<Vec<u8>> {
        let mut records = Vec::new();
        let mut detached = Vec::new();
        {
            let mut index = store.lock_index();
            for (seq, op) in batch {
                let Op::Remove(select) = op else { continue };
                let removed = select(&index);
                detached.extend(store.remove_locked(&mut index, &removed));
                records.extend(removed.iter().map(|tag| journal::tag_record(Kind::Remove, tag)));
                outcomes.push((seq, Outcome::Removed(removed)));
            }
        }
        store.delete_detached(detached);
        records
    }

    /// After a batch's install: records its outcomes, hands the turn on, wakes its writers,
    /// and runs a checkpoint if one is due.
    fn finish(
        &self,
        id: u64,
        outcomes: Vec<(u64, Outcome)>,
        touched: Vec<PathBuf>,
        waiters: Vec<Thread>,
        store: &CacheStore,
    ) {
        let mut state = self.lock();
        state.outcomes.extend(outcomes);
        state.touched.extend(touched);
        let finished = state.in_flight.pop_front();
        debug_assert_eq!(finished.as_ref().map(|batch| batch.id), Some(id), "batches install in order");
        if let Some(finished) = finished {
            state.installed = finished.id;
            state.done_through = state.done_through.max(finished.last_seq);
        }
        let (next_turn, next_leader, checkpoint) = hand_on(&mut state);
        drop(state);
        for thread in waiters.into_iter().chain(next_turn).chain(next_leader) {
            thread.unpark();
        }
        if let Some((retired, touched)) = checkpoint {
            self.checkpoint(store, retired, touched);
        }
    }

    /// Makes every installed entry durable, then deletes the retired journals.
    fn checkpoint(&self, store: &CacheStore, retired: Vec<PathBuf>, touched: Vec<PathBuf>) {
        let outcome = journal::sync_entries(store.dir(), &touched).and_then(|()| {
            for path in &retired {
                match fs::remove_file(path) {
                    Ok(()) => {}
                    Err(error) if error.kind() == io::ErrorKind::NotFound => {}
                    Err(error) => return Err(error),
                }
            }
            Ok(())
        });
        let mut state = self.lock();
        if let Err(error) = outcome {
            tracing::warn!(dir = %store.dir().display(), %error, "cache: journal checkpoint failed; keeping the journals");
            state.retired.extend(retired.into_iter().filter(|path| path.exists()));
            state.touched.extend(touched);
            state.checkpoint_after = Some(state.installed);
        }
        state.checkpointing = false;
    }

    /// At close (no op in flight): makes every entry durable and deletes all journals.
    pub(crate) fn retire_all(&self, dir: &Path) -> io::Result<()> {
        let mut state = self.lock();
        let journal = state.journal.take();
        let wrote_records = !state.retired.is_empty()
            || journal.as_ref().is_some_and(|journal| journal.len() > journal::HEADER_LEN as u64);
        let mut journals = mem::take(&mut state.retired);
        journals.extend(journal.as_ref().map(|journal| journal.path().to_owned()));
        if wrote_records {
            journal::sync_entries(dir, &state.touched)?;
        }
        for path in &journals {
            match fs::remove_file(path) {
                Ok(()) => {}
                Err(error) if error.kind() == io::ErrorKind::NotFound => {}
                Err(error) => return Err(error),
            }
        }
        if wrote_records {
            journal::sync_dir(dir)?;
        }
        state.touched.clear();
        Ok(())
    }
}

/// Whether a writer may lead the next batch now: nobody is appending, there is room in flight,
/// and removals run alone.
fn can_lead(state: &State) -> bool {
    if state.appending || state.in_flight.len() >= MAX_IN_FLIGHT {
        return false;
    }
    match state.queue.first() {
        None => false,
        Some((_, Op::Remove(_), _)) => state.in_flight.is_empty(),
        Some((_, Op::Put(_), _)) => !state.in_flight.iter().any(|batch| batch.removal),
    }
}

/// After a batch left the front of the line: skips abandoned batches, and says who installs
/// next, who may lead the next batch, and what a due checkpoint must retire.
#[allow(clippy::type_complexity)]
fn hand_on(state: &mut State) -> (Option<Thread>, Option<Thread>, Option<(Vec<PathBuf>, Vec<PathBuf>)>) {
    while state.in_flight.front().is_some_and(|batch| batch.abandoned) {
        let abandoned = state.in_flight.pop_front().expect("front");
        state.installed = abandoned.id;
        state.done_through = state.done_through.max(abandoned.last_seq);
    }
    let next_turn = state.in_flight.front().map(|batch| batch.leader.clone());
    let next_leader = state.queue.first().map(|(_, _, thread)| thread.clone());
    let due = state.checkpoint_after.is_some_and(|after| state.installed >= after);
    let checkpoint = (due && !state.checkpointing).then(|| {
        state.checkpointing = true;
        state.checkpoint_after = None;
        (mem::take(&mut state.retired), mem::take(&mut state.touched))
    });
    (next_turn, next_leader, checkpoint)
}

/// Appends `records` (removals, known once they ran) to the journal, without a sync; a
/// journal that fails is retired. Returns the journal to hand back and the retired ones.
fn append_or_retire(
    store: &CacheStore,
    mut journal: Option<JournalFile>,
    generation: u64,
    records: &[Vec<u8>],
) -> (Option<JournalFile>, Vec<PathBuf>) {
    if records.is_empty() {
        return (journal, Vec::new());
    }
    let appended = (|| {
        if journal.is_none() {
            journal = Some(JournalFile::create(store.dir(), generation)?);
        }
        let slices: Vec<IoSlice<'_>> = records.iter().map(|record| IoSlice::new(record)).collect();
        journal.as_mut().expect("just created").append(&slices)
    })();
    match appended {
        Ok(()) => (journal, Vec::new()),
        Err(error) => {
            tracing::warn!(dir = %store.dir().display(), %error, "cache: cannot journal removals; a crash may bring them back");
            (None, journal.map(|broken| broken.path().to_owned()).into_iter().collect())
        }
    }
}

/// Should a leader panic (a bug), fails its batch and keeps the line moving, so that the other
/// writers get an error instead of waiting forever.
struct LeaderGuard<'a> {
    commit: &'a GroupCommit,
    id: u64,
    seqs: Vec<u64>,
    /// The batch's other writers.
    waiters: Vec<Thread>,
    /// Whether it still holds the append token (and the journal).
    appending: bool,
    journal: Option<PathBuf>,
    armed: bool,
}

impl Drop for LeaderGuard<'_> {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let mut state = self.commit.lock();
        for &seq in &self.seqs {
            let error = io::Error::other("the batch's leader panicked");
            state.outcomes.insert(seq, Outcome::Put(Err(error)));
        }
        if self.appending {
            // The journal it held is gone with it: a new one is started, this one kept for
            // the next checkpoint or close.
            state.appending = false;
            state.retired.extend(self.journal.take());
            state.checkpoint_after = Some(state.next_batch - 1);
        }
        if let Some(batch) = state.in_flight.iter_mut().find(|batch| batch.id == self.id) {
            batch.abandoned = true;
        }
        let (next_turn, next_leader, _) = if state.installed + 1 == self.id {
            hand_on(&mut state)
        } else {
            (None, state.queue.first().map(|(_, _, thread)| thread.clone()), None)
        };
        drop(state);
        for thread in mem::take(&mut self.waiters).into_iter().chain(next_turn).chain(next_leader) {
            thread.unpark();
        }
    }
}

/// The same error again, for each write of a failed batch.
fn copy_error(error: &io::Error) -> io::Error {
    match error.raw_os_error() {
        Some(code) => io::Error::from_raw_os_error(code),
        None => io::Error::new(error.kind(), error.to_string()),
    }
}
