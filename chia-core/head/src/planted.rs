//! Bugs the simulator's own tests plant in the core, to show that its invariants catch them.
//! Only in test builds; each variant is wired into the core at one point, as
//! `#[cfg(test)] if crate::planted::planted() == Some(PlantedBug::..) { .. }`.

use std::cell::Cell;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum PlantedBug {
    /// `announce` says nothing to the owner of a task that ran more than once (`attempt > 1`):
    /// a result lost after a retry.
    ForgetDoneOnRetry,
    /// The scheduler never starts a task of the function of this name, though it fits: a task
    /// left behind in its queue (what the watchdog is for).
    NeverPlace(&'static str),
}

thread_local! {
    /// Per thread, so tests running in parallel do not see each other's bugs.
    static PLANTED: Cell<Option<PlantedBug>> = const { Cell::new(None) };
}

/// Plants `bug` (or none) in every core this thread drives, until changed.
pub(crate) fn plant(bug: Option<PlantedBug>) {
    PLANTED.with(|planted| planted.set(bug));
}

/// The bug planted on this thread, if any.
pub(crate) fn planted() -> Option<PlantedBug> {
    PLANTED.with(Cell::get)
}

/// Breaks the simulated cluster around the core, to show the simulator's checks fail when
/// something is wrong (independently of the hooks in the core).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Sabotage {
    /// A worker returns a value one byte off, once.
    WrongValue,
    /// The head drops the record of a task its owner still waits for, once, as if a bug had.
    HeadForgetsATask,
}

thread_local! {
    static SABOTAGE: Cell<Option<Sabotage>> = const { Cell::new(None) };
}

pub(crate) fn sabotage(what: Option<Sabotage>) {
    SABOTAGE.with(|s| s.set(what));
}

pub(crate) fn sabotaged(what: Sabotage) -> bool {
    SABOTAGE.with(|s| s.get() == Some(what))
}

impl crate::HeadCore {
    /// Drops `task`'s record behind the scheduler's back.
    pub(crate) fn forget_record(&mut self, task: chia_core::TaskId) -> bool {
        self.tasks.remove(&task).is_some()
    }
}
