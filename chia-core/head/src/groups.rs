//! The head core's side of placement groups: the requests peers send (create, ready, remove)
//! and the answers to `ready`, which wait until the scheduler places the group, finds it
//! infeasible, or removes it. Where bundles go is the scheduler's decision
//! (`scheduler::groups`); creations and removals are journaled like every input that changes
//! state, and the scheduler keeps its groups in a snapshot, so a restarted head has them. The
//! `ready` requests waiting are not kept: a peer asks again after a restart (they are
//! repeatable requests).

use crate::core::HeadCore;
use crate::scheduler::{Event, GroupStatus};
use chia_core::placement::{GroupId, GroupProblem, GroupSpec};
use chia_core::{SessionId, TaskError, TaskId};

/// The most `ready` requests one group keeps waiting; more are refused (a peer cannot make
/// the head hold unbounded memory by asking again and again).
const MAX_READY_WAITERS: usize = 4096;

impl HeadCore {
    pub(crate) fn create_group(&mut self, session: SessionId, spec: GroupSpec) {
        let task = spec.group.0;
        if task.session() != session || self.tasks.contains_key(&task) {
            tracing::warn!("{session} created a placement group with an id it may not use ({task}); ignored");
            return;
        }
        if self.scheduler.group_status(spec.group).is_some() {
            tracing::warn!(
                "{session} created the placement group {} twice; the second is ignored",
                spec.group
            );
            return;
        }
        if let Err(message) = spec.validate() {
            let error =
                TaskError::InvalidCall { function: format!("placement group {}", spec.group), message };
            return self.reply::<()>(session, task, Err(error));
        }
        let owner = spec.job.unwrap_or(session);
        tracing::info!(
            group = %spec.group,
            strategy = %spec.strategy,
            bundles = spec.bundles.len(),
            detached = spec.detached,
            "placement group created"
        );
        self.feed(Event::GroupCreated { spec, owner });
        self.reply(session, task, Ok(&()));
    }

    pub(crate) fn group_ready(&mut self, session: SessionId, task: TaskId, group: GroupId) {
        match self.scheduler.group_status(group) {
            None => self.reply::<()>(session, task, Err(group_error(group, GroupProblem::Unknown))),
            Some(GroupStatus::Placed { nodes }) => self.reply(session, task, Ok(&nodes)),
            Some(GroupStatus::Pending { infeasible: Some(reason) }) => {
                self.reply::<()>(session, task, Err(group_error(group, GroupProblem::Infeasible { reason })))
            }
            Some(GroupStatus::Pending { infeasible: None }) => {
                let waiters = self.group_waiters.entry(group).or_default();
                if waiters.len() >= MAX_READY_WAITERS {
                    let error = TaskError::InvalidCall {
                        function: format!("placement group {group}"),
                        message: format!("more than {MAX_READY_WAITERS} calls of ready() wait on it"),
                    };
                    return self.reply::<()>(session, task, Err(error));
                }
                waiters.push((session, task));
            }
        }
    }

    pub(crate) fn remove_group(&mut self, session: SessionId, task: TaskId, group: GroupId) {
        tracing::info!(group = %group, "placement group removed by {session}");
        self.feed(Event::GroupRemoved { group });
        self.reply(session, task, Ok(&()));
    }

    /// The scheduler placed the group: every `ready` waiting learns its nodes.
    pub(crate) fn group_placed(&mut self, group: GroupId, nodes: Vec<String>) {
        for (session, task) in self.group_waiters.remove(&group).unwrap_or_default() {
            self.reply(session, task, Ok(&nodes));
        }
    }

    /// The group cannot be placed now, or is gone: every `ready` waiting learns why.
    pub(crate) fn group_not_ready(&mut self, group: GroupId, problem: GroupProblem) {
        if let GroupProblem::Infeasible { reason } = &problem {
            tracing::warn!(group = %group, %reason, "the placement group cannot be placed on the connected nodes");
        }
        for (session, task) in self.group_waiters.remove(&group).unwrap_or_default() {
            self.reply::<()>(session, task, Err(group_error(group, problem.clone())));
        }
    }

    /// A session left: its `ready` requests wait for nobody.
    pub(crate) fn forget_group_waiters(&mut self, session: SessionId) {
        if self.group_waiters.is_empty() {
            return;
        }
        self.group_waiters.retain(|_, waiters| {
            waiters.retain(|&(waiter, _)| waiter != session);
            !waiters.is_empty()
        });
    }
}

fn group_error(group: GroupId, problem: GroupProblem) -> TaskError {
    TaskError::PlacementGroup { group: group.to_string(), problem }
}
