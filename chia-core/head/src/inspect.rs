//! Read-only queries on the head core beyond what its driver needs: for tests, and for the
//! simulator's invariants and failure messages. Nothing here changes the core.

use crate::core::{HeadCore, TaskKind, TaskRecord};
use crate::scheduler::TaskStatus;
use crate::services::HEAD_SESSION;
use chia_core::TaskId;
use chia_core::protocol::Outcome;

impl HeadCore {
    /// Task records held: [`HeadCore::stats`]' `tasks`, without summing the result bytes.
    pub fn task_count(&self) -> usize {
        self.tasks.len()
    }

    /// Open sessions (drivers and workers).
    pub fn session_count(&self) -> usize {
        self.sessions.len()
    }

    /// Joined nodes.
    pub fn node_count(&self) -> usize {
        self.nodes.len()
    }

    /// Every task the head holds a record of, in id order.
    pub fn held_tasks(&self) -> Vec<TaskId> {
        let mut tasks: Vec<TaskId> = self.tasks.keys().copied().collect();
        tasks.sort_unstable();
        tasks
    }

    /// What the head knows of `task`, in one line; `None` if it holds no record of it.
    pub fn describe_task(&self, task: TaskId) -> Option<String> {
        let record = self.tasks.get(&task)?;
        let kind = match &record.kind {
            TaskKind::Function => "function".to_string(),
            TaskKind::ServiceStart(service) => format!("start of {service}"),
            TaskKind::ServiceCall { service, method, missing, .. } => {
                format!("call {method} of {service} ({missing} argument(s) missing)")
            }
        };
        let outcome = match &record.outcome {
            None => "no outcome".to_string(),
            Some(Outcome::Value(value)) => format!("a {}-byte value", value.len()),
            Some(Outcome::Failed(error)) => format!("failed: {error}"),
        };
        Some(format!(
            "{task} {} ({kind}) of {}{}, {}, attempt {}, {outcome}, {} dependent(s){}",
            record.function,
            record.owner,
            if record.owner_holds { ", held" } else { ", released" },
            record.running_on.map_or("not running".to_string(), |node| format!("running on {node}")),
            record.attempt,
            record.dependents,
            if self.services.announce_waits(task) { ", announcement waits for watchers" } else { "" },
        ))
    }

    /// Checks that the task records agree with the scheduler and the sessions: a task runs
    /// only on a joined node, a function task's record and its scheduler entry say the same
    /// (running on the same node, waiting, or ended), and a ref is held only by an open
    /// session; and that the counts kept for `chia status` agree with the records. The error
    /// names the disagreement of the lowest task id.
    pub fn check_consistency(&self) -> Result<(), String> {
        self.scheduler.check_counts()?;
        self.scheduler.check_groups()?;
        self.check_observed_counts()?;
        if let Some(stuck) = self.status().stuck.first() {
            return Err(format!(
                "the watchdog found {} queued task(s) of {} that {} has room for, not placed for {} ms",
                stuck.queued, stuck.function, stuck.fits_on, stuck.oldest_ms_ago
            ));
        }
        if self.nodes.len() != self.scheduler.node_count() {
            return Err(format!(
                "the core has {} nodes, its scheduler {}",
                self.nodes.len(),
                self.scheduler.node_count()
            ));
        }
        let mut first: Option<(TaskId, String)> = None;
        for (&task, record) in &self.tasks {
            if first.as_ref().is_some_and(|(t, _)| *t < task) {
                continue;
            }
            if let Some(why) = self.inconsistency(task, record) {
                first = Some((task, why));
            }
        }
        match first {
            None => Ok(()),
            Some((task, why)) => {
                Err(format!("{why}: {}", self.describe_task(task).unwrap_or_else(|| task.to_string())))
            }
        }
    }

    fn inconsistency(&self, task: TaskId, record: &TaskRecord) -> Option<String> {
        if let Some(node) = record.running_on
            && !self.nodes.contains_key(&node)
        {
            return Some(format!("{task} runs on {node}, which left"));
        }
        if record.owner_holds && record.owner != HEAD_SESSION && !self.sessions.contains_key(&record.owner) {
            return Some(format!("{task} is held by {}, which left", record.owner));
        }
        if !matches!(record.kind, TaskKind::Function) {
            return None;
        }
        let status = self.scheduler.task_status(task);
        let agree = match (record.outcome.is_some(), record.running_on, status) {
            (false, Some(node), Some(TaskStatus::Running { node: leased })) => node == leased,
            (false, None, Some(TaskStatus::Waiting | TaskStatus::Queued)) => true,
            // Waiting for results of service calls, which the scheduler does not know, or
            // ended (a call failed, it was cancelled) before the scheduler heard of it.
            (false, None, None) => !record.scheduled && self.services.deferred.contains_key(&task),
            (true, None, None) => !record.scheduled,
            (true, None, Some(TaskStatus::Finished | TaskStatus::Failed)) => true,
            _ => false,
        };
        (!agree).then(|| format!("the record of {task} and the scheduler ({status:?}) disagree"))
    }
}
