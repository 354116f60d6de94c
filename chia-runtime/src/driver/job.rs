//! Which job a context's calls belong to, and so which bypass plan they follow. A driver's
//! context is its own job (its [`Bypass`](crate::bypass::Bypass) installs the plan here); a
//! task's context belongs to the job of the task, with the plan the head sent along; a
//! worker's own connection, and the services it hosts, belong to no driver's job.
//!
//! Nothing here is global to a worker process: a plan reaches a task only through the link its
//! own context holds, built from the settings the head sent with that very task.

use chia_bypass::BypassPlan;
use chia_core::protocol::{JobSettings, PeerToHead};
use chia_core::{SessionId, TaskId};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use crate::driver::client::Client;

/// Which job a context's calls belong to, and so which bypass plan they follow.
#[derive(Clone)]
pub(crate) enum JobLink {
    /// The context's own session is the job (a driver): the plan its `Bypass` installs.
    Own(Arc<OwnJob>),
    /// A task's context: the job the task belongs to, with its plan as the head sent it.
    Task { job: SessionId, plan: Option<Arc<BypassPlan>>, function: Arc<str> },
    /// A worker's own connection and the service instances it hosts: they serve every job at
    /// once, so they follow no job's plan and can install none (one would reach every task
    /// and service of the worker, whoever's it is). Their calls are the worker session's.
    Node,
}

/// A driver's own job: the plan its calls follow and how many times it was published.
#[derive(Default)]
pub(crate) struct OwnJob {
    plan: RwLock<Option<Arc<BypassPlan>>>,
    revision: AtomicU64,
    announced: AtomicBool,
}

impl OwnJob {
    /// How many settings were published so far (0: never).
    pub(crate) fn revision(&self) -> u64 {
        self.revision.load(Ordering::Relaxed)
    }

    /// The revision number of the next settings published.
    pub(crate) fn next_revision(&self) -> u64 {
        self.revision.fetch_add(1, Ordering::Relaxed) + 1
    }

    /// The plan the driver's calls follow from now on; `None` skips bypass entirely.
    pub(crate) fn install(&self, plan: Option<Arc<BypassPlan>>) {
        *self.plan.write().unwrap_or_else(|p| p.into_inner()) = plan;
    }

    /// Before the job's first submission: tells the head the job exists, with empty settings
    /// (no plan), so that the head sends the job's id with every one of its tasks. Without
    /// settings a task arrives naming no job, and a worker could not tell which job the task's
    /// nested calls — and its children's — belong to (the task's id names only the session
    /// that submitted it, a worker's for a nested call). Sent once, as revision 0: the head
    /// keeps settings only for a newer revision, so this one never replaces a published plan
    /// (revisions 1 and up), even another context's on the same session.
    pub(crate) fn announce(&self, client: &Client) -> Result<(), chia_core::protocol::ProtocolError> {
        if self.announced.swap(true, Ordering::Relaxed) || self.revision() > 0 {
            return Ok(());
        }
        let settings = JobSettings { job: client.session(), revision: 0, settings: Vec::new() };
        client.send(&PeerToHead::SetJobSettings(settings))
    }
}

impl JobLink {
    pub(crate) fn own() -> JobLink {
        JobLink::Own(Arc::default())
    }

    /// The plan calls follow; `None` (no YAML, or nothing bypassed) skips bypass entirely.
    pub(crate) fn plan(&self) -> Option<Arc<BypassPlan>> {
        match self {
            JobLink::Own(own) => own.plan.read().unwrap_or_else(|p| p.into_inner()).clone(),
            JobLink::Task { plan, .. } => plan.clone(),
            JobLink::Node => None,
        }
    }

    /// The job a submission names: a nested call belongs to its parent's job.
    pub(crate) fn nested_in(&self) -> Option<SessionId> {
        match self {
            JobLink::Own(_) | JobLink::Node => None,
            JobLink::Task { job, .. } => Some(*job),
        }
    }
}

/// Decodes the job settings the head sent with a task, keeping the latest revision of each job
/// so a worker decodes (and compiles the patterns of) a plan once, not once per task.
#[derive(Default)]
pub(crate) struct PlanCache {
    plans: HashMap<SessionId, (u64, Option<Arc<BypassPlan>>)>,
}

/// More jobs than this seen by one worker: start over (a job's plan is decoded again on its
/// next task), so a long-lived worker does not keep every job it ever served.
const PLAN_CACHE_JOBS: usize = 256;

impl PlanCache {
    /// The job link of `task`, running `function`, from the settings the head sent with it.
    pub(crate) fn link(
        &mut self,
        task: TaskId,
        function: &str,
        settings: Option<JobSettings>,
    ) -> Result<JobLink, String> {
        let function: Arc<str> = function.into();
        let Some(JobSettings { job, revision, settings }) = settings else {
            // The head names no job only for a job that never announced itself (a driver of an
            // older build): the session that submitted the task is then the best guess, right
            // for every call a driver makes itself. No plan either way.
            return Ok(JobLink::Task { job: task.session(), plan: None, function });
        };
        if let Some((cached, plan)) = self.plans.get(&job)
            && *cached == revision
        {
            return Ok(JobLink::Task { job, plan: plan.clone(), function });
        }
        // Empty settings: the job announced itself and has no plan (see `OwnJob::announce`).
        let plan = match settings.is_empty() {
            true => None,
            false => {
                let plan: BypassPlan = rmp_serde::from_slice(&settings).map_err(|e| {
                    format!("the bypass plan of job {job} could not be decoded (driver and worker built from different code?): {e}")
                })?;
                (!plan.is_empty()).then(|| Arc::new(plan))
            }
        };
        if self.plans.len() >= PLAN_CACHE_JOBS {
            self.plans.clear();
        }
        self.plans.insert(job, (revision, plan.clone()));
        Ok(JobLink::Task { job, plan, function })
    }
}
