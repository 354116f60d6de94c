//! Group commit under [`crate::Durability::Full`]: the write queue, its leader, and the
//! journal checkpoints (see the [`crate::CacheStore`] documentation for the protocol).

use std::collections::HashMap;
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

/// Writers wait parked, not on a condition variable: a leader wakes exactly the writers of its
/// batch and the first writer of the next one (to lead it), instead of every waiting thread
/// at every batch.
pub(crate) struct GroupCommit {
    state: Mutex<State>,
    checkpoint_bytes: u64,
}

struct State {
    /// Ops waiting for a leader, each with its writer's thread.
    queue: Vec<(u64, Op, Thread)>,
    /// The sequence number of the last op queued.
    last_queued: u64,
    /// Every op numbered up to this one is done.
    done_through: u64,
    /// Whether a leader is running a batch (it holds the journal meanwhile).
    leading: bool,
    /// Outcomes of ops that did not simply succeed: failed writes, and removals.
    outcomes: HashMap<u64, Outcome>,
    /// The journal appended to; `None` while a leader holds it, or after a failure left it
    /// unusable (the next batch starts a new generation).
    journal: Option<JournalFile>,
    next_generation: u64,
    /// Journals no longer appended to whose entries are not yet known durable.
    retired: Vec<PathBuf>,
    /// Entry files installed since the last checkpoint, where syncing needs the list.
    touched: Vec<PathBuf>,
    /// Whether a checkpoint is syncing.
    checkpointing: bool,
}

/// What a leader hands back after its batch.
struct BatchEnd {
    outcomes: Vec<(u64, Outcome)>,
    journal: Option<JournalFile>,
    retired: Vec<PathBuf>,
    touched: Vec<PathBuf>,
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
                leading: false,
                outcomes: HashMap::new(),
                journal: Some(journal),
                next_generation: generation + 1,
                retired: Vec::new(),
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

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Queues `op` and returns once its batch is done, leading batches while none is running
    /// and `op` waits.
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
            if state.leading {
                drop(state);
                // A token left by an unpark since the check makes this return at once.
                thread::park();
                state = self.lock();
                continue;
            }
            drop(state);
            self.lead_one_batch(store);
            state = self.lock();
        }
    }

    /// Takes the next batch from the queue, runs it, and wakes its writers and the next
    /// leader. A batch is either writes or explicit removals, never both: a removal's journal
    /// records are known only once it has run, so writes queued after it must wait for them to
    /// be in the journal (or a replay would apply the removal after the write).
    fn lead_one_batch(&self, store: &CacheStore) {
        let mut state = self.lock();
        if state.leading || state.queue.is_empty() {
            return;
        }
        state.leading = true;
        let removals = matches!(state.queue.first(), Some((_, Op::Remove(_), _)));
        let split = state
            .queue
            .iter()
            .position(|(_, op, _)| matches!(op, Op::Remove(_)) != removals)
            .unwrap_or(state.queue.len());
        let queued: Vec<(u64, Op, Thread)> = state.queue.drain(..split).collect();
        let last = queued.last().map_or(state.done_through, |(seq, _, _)| *seq);
        let journal = state.journal.take();
        let generation = state.next_generation;
        drop(state);
        let me = thread::current().id();
        let mut waiters = Vec::with_capacity(queued.len());
        let mut batch = Vec::with_capacity(queued.len());
        for (seq, op, thread) in queued {
            if thread.id() != me {
                waiters.push(thread);
            }
            batch.push((seq, op));
        }

        let mut guard = LeaderGuard {
            commit: self,
            seqs: batch.iter().map(|(seq, _)| *seq).collect(),
            last,
            journal: journal.as_ref().map(|journal| journal.path().to_owned()),
            waiters,
            armed: true,
        };
        let end = self.run_batch(store, batch, journal, generation);
        guard.armed = false;

        let mut state = self.lock();
        if end.journal.as_ref().is_some_and(|journal| journal.generation() >= generation) {
            state.next_generation = generation + 1;
        }
        state.outcomes.extend(end.outcomes);
        state.retired.extend(end.retired);
        state.touched.extend(end.touched);
        state.journal = end.journal;
        state.done_through = last;
        let checkpoint = self.rotate_if_full(store, &mut state);
        state.leading = false;
        let next_leader =
            state.queue.first().map(|(_, _, thread)| thread.clone()).filter(|next| next.id() != me);
        drop(state);
        for waiter in mem::take(&mut guard.waiters).into_iter().chain(next_leader) {
            waiter.unpark();
        }
        if checkpoint {
            self.checkpoint(store);
        }
    }

    /// Writes and syncs the batch's journal records, then installs its ops in order.
    fn run_batch(
        &self,
        store: &CacheStore,
        batch: Vec<(u64, Op)>,
        mut journal: Option<JournalFile>,
        generation: u64,
    ) -> BatchEnd {
        let mut end =
            BatchEnd { outcomes: Vec::new(), journal: None, retired: Vec::new(), touched: Vec::new() };
        let first_put = batch.iter().find_map(|(_, op)| match op {
            Op::Put(put) => Some(put.tag.as_str()),
            Op::Remove(_) => None,
        });
        let mut failure: Option<io::Error> = None;
        if let Some(first_tag) = first_put {
            let synced = (|| {
                if journal.is_none() {
                    journal = Some(JournalFile::create(store.dir(), generation)?);
                }
                let journal = journal.as_mut().expect("just created");
                store.run_hook(IoStage::SyncJournal, first_tag)?;
                let frames: Vec<[u8; journal::FRAME_LEN]> = batch
                    .iter()
                    .filter_map(|(_, op)| match op {
                        Op::Put(put) => Some(journal::frame(Kind::Put, &put.entry)),
                        Op::Remove(_) => None,
                    })
                    .collect();
                let mut slices = Vec::with_capacity(2 * frames.len());
                let puts = batch.iter().filter_map(|(_, op)| match op {
                    Op::Put(put) => Some(put),
                    Op::Remove(_) => None,
                });
                for (frame, put) in frames.iter().zip(puts) {
                    slices.push(IoSlice::new(frame));
                    slices.push(IoSlice::new(&put.entry));
                }
                journal.append(&slices)?;
                journal.sync()
            })();
            if let Err(error) = synced {
                tracing::warn!(dir = %store.dir().display(), %error, "cache: journal write failed; failing its batch");
                // The journal may end in a torn record: later records go to a new one.
                if let Some(broken) = journal.take() {
                    end.retired.push(broken.path().to_owned());
                }
                failure = Some(error);
            }
        }

        // Install in queue order, under one hold of the index lock.
        let mut after: Vec<Vec<u8>> = Vec::new();
        let mut detached = Vec::new();
        // Writes whose rename failed, by position, and the last write of each tag installed.
        let mut voided: Vec<(usize, String)> = Vec::new();
        let mut installed: HashMap<String, usize> = HashMap::new();
        {
            let mut index = store.lock_index();
            for (position, (seq, op)) in batch.into_iter().enumerate() {
                match op {
                    Op::Put(put) => {
                        if let Some(error) = &failure {
                            store.remove_quietly(&put.temp_path);
                            end.outcomes.push((seq, Outcome::Put(Err(copy_error(error)))));
                            continue;
                        }
                        let renamed = store
                            .run_hook(IoStage::Commit, &put.tag)
                            .and_then(|()| fs::rename(&put.temp_path, &put.final_path));
                        if let Err(error) = renamed {
                            store.remove_quietly(&put.temp_path);
                            voided.push((position, put.tag));
                            end.outcomes.push((seq, Outcome::Put(Err(error))));
                            continue;
                        }
                        // Entries evicted to make room are not journaled: a replay that brings
                        // one back (its put still in the journal) restores a value the cache
                        // held, and the open evicts again if the budget is exceeded. A record
                        // written after this batch's puts could remove a tag put again later in
                        // the batch.
                        let (_evicted, files) = store.index_installed(&mut index, &put.tag, put.meta);
                        detached.extend(files);
                        installed.insert(put.tag, position);
                        if journal::SYNC_NEEDS_FILE_LIST {
                            end.touched.push(put.final_path);
                        }
                    }
                    Op::Remove(select) => {
                        let removed = select(&index);
                        detached.extend(store.remove_locked(&mut index, &removed));
                        after.extend(removed.iter().map(|tag| journal::tag_record(Kind::Remove, tag)));
                        end.outcomes.push((seq, Outcome::Removed(removed)));
                    }
                }
            }
        }
        store.delete_detached(detached);
        // A put whose rename failed is in the journal: a replay must not install it, unless a
        // later write of the same tag in this batch was installed (its put comes after).
        for (position, tag) in voided {
            if installed.get(&tag).is_none_or(|&last| last < position) {
                after.push(journal::tag_record(Kind::Keep, &tag));
            }
        }

        // Removals and voided puts, in the journal before anyone hears of them and before the
        // next batch's records (a kill cannot lose them; a power loss can, which only brings
        // back entries the cache held, or keeps a file as it is). Synced with the next batch.
        if !after.is_empty() {
            let appended = (|| {
                if journal.is_none() {
                    journal = Some(JournalFile::create(store.dir(), generation)?);
                }
                let slices: Vec<IoSlice<'_>> = after.iter().map(|record| IoSlice::new(record)).collect();
                journal.as_mut().expect("just created").append(&slices)
            })();
            if let Err(error) = appended {
                tracing::warn!(dir = %store.dir().display(), %error, "cache: cannot journal evictions; a crash may bring them back");
                if let Some(broken) = journal.take() {
                    end.retired.push(broken.path().to_owned());
                }
            }
        }
        end.journal = journal;
        end
    }

    /// Under the state lock, after a batch: starts a new journal if this one is full and no
    /// checkpoint is running. Returns whether the caller must now run the checkpoint.
    fn rotate_if_full(&self, store: &CacheStore, state: &mut State) -> bool {
        let full = state.journal.as_ref().is_some_and(|journal| journal.len() >= self.checkpoint_bytes);
        if state.checkpointing || (!full && state.retired.is_empty()) {
            return false;
        }
        if full {
            match JournalFile::create(store.dir(), state.next_generation) {
                Ok(fresh) => {
                    state.next_generation += 1;
                    let old = state.journal.replace(fresh).expect("full journal");
                    state.retired.push(old.path().to_owned());
                }
                Err(error) => {
                    tracing::warn!(dir = %store.dir().display(), %error, "cache: cannot start a new journal; the current one grows on");
                    return false;
                }
            }
        }
        state.checkpointing = true;
        true
    }

    /// Makes every installed entry durable, then deletes the retired journals.
    fn checkpoint(&self, store: &CacheStore) {
        let (retired, touched) = {
            let mut state = self.lock();
            (mem::take(&mut state.retired), mem::take(&mut state.touched))
        };
        let outcome = journal::sync_entries(store.dir(), &touched).and_then(|()| {
            for path in &retired {
                fs::remove_file(path)?;
            }
            Ok(())
        });
        let mut state = self.lock();
        if let Err(error) = outcome {
            tracing::warn!(dir = %store.dir().display(), %error, "cache: journal checkpoint failed; keeping the journals");
            state.retired.extend(retired.into_iter().filter(|path| path.exists()));
            state.touched.extend(touched);
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

/// Should a leader panic (a bug), fails its batch and frees the leadership, so that the other
/// writers get an error instead of waiting forever.
struct LeaderGuard<'a> {
    commit: &'a GroupCommit,
    seqs: Vec<u64>,
    last: u64,
    journal: Option<PathBuf>,
    /// The batch's other writers.
    waiters: Vec<Thread>,
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
        // The journal it held is gone with it: a new one is started, this one kept for
        // the next checkpoint or close.
        state.retired.extend(self.journal.take());
        state.done_through = state.done_through.max(self.last);
        state.leading = false;
        let next_leader = state.queue.first().map(|(_, _, thread)| thread.clone());
        drop(state);
        for waiter in mem::take(&mut self.waiters).into_iter().chain(next_leader) {
            waiter.unpark();
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
