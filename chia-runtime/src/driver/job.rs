//! Which job a context's calls belong to, and so which bypass plan they follow. A driver's
//! context is its own job (its [`Bypass`](crate::bypass::Bypass) installs the plan here); a
//! task's context belongs to the job of the task, with the plan the head sent along.

use chia_bypass::BypassPlan;
use chia_core::SessionId;
use chia_core::protocol::JobSettings;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

/// Which job a context's calls belong to, and so which bypass plan they follow.
#[derive(Clone)]
pub(crate) enum JobLink {
    /// The context's own session is the job (a driver): the plan its `Bypass` installs.
    Own(Arc<OwnJob>),
    /// A task's context: the job the task belongs to, with its plan as the head sent it.
    Task { job: SessionId, plan: Option<Arc<BypassPlan>> },
}

/// A driver's own job: the plan its calls follow and how many times it was published.
#[derive(Default)]
pub(crate) struct OwnJob {
    plan: RwLock<Option<Arc<BypassPlan>>>,
    revision: AtomicU64,
}

impl OwnJob {
    /// How many plans were published so far (0: never).
    pub(crate) fn revision(&self) -> u64 {
        self.revision.load(Ordering::Relaxed)
    }

    /// The revision number of the next plan published.
    pub(crate) fn next_revision(&self) -> u64 {
        self.revision.fetch_add(1, Ordering::Relaxed) + 1
    }

    /// The plan the driver's calls follow from now on; `None` skips bypass entirely.
    pub(crate) fn install(&self, plan: Option<Arc<BypassPlan>>) {
        *self.plan.write().unwrap_or_else(|p| p.into_inner()) = plan;
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
        }
    }

    /// The job a submission names: a nested call belongs to its parent's job.
    pub(crate) fn nested_in(&self) -> Option<SessionId> {
        match self {
            JobLink::Own(_) => None,
            JobLink::Task { job, .. } => Some(*job),
        }
    }
}

/// Decodes the job settings the head sent with a task, keeping the latest revision of each job
/// so a worker decodes (and compiles the patterns of) a plan once, not once per task.
#[derive(Default)]
pub(crate) struct PlanCache {
    plans: HashMap<SessionId, (u64, Arc<BypassPlan>)>,
}

/// More jobs than this seen by one worker: start over (a job's plan is decoded again on its
/// next task), so a long-lived worker does not keep every job it ever served.
const PLAN_CACHE_JOBS: usize = 256;

impl PlanCache {
    pub(crate) fn link(&mut self, settings: Option<JobSettings>) -> Result<Option<JobLink>, String> {
        let Some(JobSettings { job, revision, settings }) = settings else { return Ok(None) };
        if let Some((cached, plan)) = self.plans.get(&job)
            && *cached == revision
        {
            return Ok(Some(JobLink::Task { job, plan: (!plan.is_empty()).then(|| plan.clone()) }));
        }
        let plan: BypassPlan = rmp_serde::from_slice(&settings)
            .map_err(|e| format!("the job's bypass plan could not be decoded (driver and worker built from different code?): {e}"))?;
        let plan = Arc::new(plan);
        if self.plans.len() >= PLAN_CACHE_JOBS {
            self.plans.clear();
        }
        self.plans.insert(job, (revision, plan.clone()));
        Ok(Some(JobLink::Task { job, plan: (!plan.is_empty()).then_some(plan) }))
    }
}
