//! A simulated driver: submits tasks (values and refs to its earlier tasks as arguments),
//! cancels some, fetches large values, releases what it is done with, and starts, calls, looks
//! up and stops services. It knows what every task must return (see [`super::model`]) and checks
//! each answer as it arrives: one outcome per task, the right value, and only failures that
//! something in the run explains.

use super::model::{
    self, Catalog, Constructor, Expected, ExpectedFailure, FUNCTIONS, GHOST, METHODS, NAMESPACES,
    SERVICE_NAMES, TAGS,
};
use super::net::Micros;
use super::resume::Tracker;
use super::rng::Rng;
use super::worker::{Effects, TaskFacts};
use crate::INLINE_RESULT_BYTES;
use chia_core::placement::{
    BundleRef, GroupId, GroupProblem, GroupSpec, GroupStrategy, Labels, Placement, Strategy,
};
use chia_core::protocol::{
    Arg, Done, Outcome, PROTOCOL_VERSION, PeerToHead, ResumeSession, ServiceInfo, ServiceStart, TaskSpec,
    UnansweredStart,
};
use chia_core::{Resources, ServiceId, SessionId, TaskError, TaskId};
use std::collections::{BTreeMap, BTreeSet, HashSet, VecDeque};

#[derive(Clone, Copy, Debug)]
pub(crate) enum DriverTimer {
    Tick,
}

/// What a driver may do, from the run's configuration.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Habits {
    pub(crate) window: usize,
    pub(crate) services: bool,
    pub(crate) constructor_failures: bool,
    pub(crate) refs_to_call_results: bool,
    /// Faults are injected: lost workers explain `WorkerLost`.
    pub(crate) faults: bool,
    /// How long an infeasible task may wait for a node before the driver gives up on it.
    pub(crate) patience: Micros,
    /// Some drivers create placement groups and run tasks in them.
    pub(crate) groups: bool,
}

/// A placement group a driver created.
struct DriverGroup {
    id: GroupId,
    bundles: Vec<Resources>,
    /// Created without bundles on purpose: the head refuses it and never holds it.
    invalid: bool,
    /// What the latest answer to `GroupReady` said.
    state: GroupState,
    /// When the `GroupReady` still unanswered was sent.
    asking: Option<Micros>,
    /// It sent `RemoveGroup`: its tasks may end removed or cancelled, later ones are refused.
    removing: bool,
    /// Left to its job's end rather than removed when the driver drains.
    leave: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum GroupState {
    /// No answer to `GroupReady` yet.
    Unanswered,
    /// Every bundle is reserved.
    Ready,
    /// The connected nodes cannot hold it.
    Infeasible,
}

/// A function task submitted into a bundle of one of the driver's groups.
#[derive(Clone, Copy, Debug)]
struct InGroup {
    /// Index into the driver's groups.
    group: u16,
    /// The bundle it names (`None`: any bundle of the group).
    bundle: Option<u32>,
    /// How the head must refuse it at submission, if it cannot run in that bundle.
    refused: Option<Refusal>,
}

/// Why the head refuses a task submitted into a group, as the driver predicts it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Refusal {
    /// The group was removed (or never created) before the task was submitted.
    Unknown,
    /// It names a bundle the group does not have.
    NoSuchBundle,
    /// It requests more than its bundle (or every bundle) reserves.
    TooSmall,
}

impl Refusal {
    fn is(self, problem: &GroupProblem) -> bool {
        matches!(
            (self, problem),
            (Refusal::Unknown, GroupProblem::Unknown)
                | (Refusal::NoSuchBundle, GroupProblem::NoSuchBundle { .. })
                | (Refusal::TooSmall, GroupProblem::TooSmall { .. })
        )
    }
}

enum Kind {
    Function {
        function: u8,
        request: u8,
        max_retries: i32,
        retry_exceptions: bool,
        expected: Expected,
        /// Index into [`TAGS`].
        tag: Option<u8>,
        /// The revision of the job's settings when it was submitted (0: none yet).
        job_revision: u64,
        /// Index into [`model::LABEL_ASKS`] of the labels it asks for.
        labels: Option<u8>,
        /// The bundle of a placement group it runs in.
        in_group: Option<InGroup>,
    },
    ServiceStart {
        namespace: u8,
        name: u8,
        request: u8,
        get_if_exists: bool,
        fails: bool,
    },
    ServiceCall {
        digest: u64,
        len: u32,
    },
    ServiceStop {
        service: ServiceId,
    },
    Lookup {
        namespace: u8,
        name: u8,
    },
    /// `CreateGroup` of the driver's group at this index: answered at once, and not waited
    /// for (after a head restart the answer may not come again if the group went meanwhile).
    GroupCreate {
        group: u16,
    },
    /// `GroupReady`; `after_removal`: sent once the group was removed (or refused), so it
    /// must be answered that the head does not know it.
    GroupReady {
        group: u16,
        after_removal: bool,
    },
    GroupRemove {
        group: u16,
    },
}

#[derive(Debug)]
enum State {
    Pending,
    /// Told `Stored`: the value waits on the head, and the driver asked for it.
    Fetching {
        len: u64,
    },
    Succeeded,
    Failed(Box<TaskError>),
}

struct DriverTask {
    kind: Kind,
    /// Sequence numbers of the driver's own tasks passed as refs.
    deps: Box<[u64]>,
    state: State,
    /// The driver still holds its `ObjectRef`.
    held: bool,
    /// Released before it ended: it may end unannounced.
    released_early: bool,
    cancelled: bool,
    outcomes: u8,
    /// The driver waits for its answer (a group's creation it does not: see [`Kind::GroupCreate`]).
    awaited: bool,
}

type Result<T = ()> = std::result::Result<T, String>;

pub(crate) struct SimDriver {
    pub(crate) index: usize,
    pub(crate) conn: usize,
    pub(crate) session: Option<SessionId>,
    /// Its connection is gone (the driver crashed); nothing it does counts any more.
    pub(crate) dead: bool,
    /// It sent its hello (it has started): a lost connection makes it dial again.
    pub(crate) started: bool,
    rng: Rng,
    habits: Habits,
    /// By sequence number - 1.
    tasks: Vec<DriverTask>,
    /// Sequence numbers of held refs, in no order (chosen at random).
    held: Vec<u64>,
    /// Tasks whose answer the driver still waits for.
    awaiting: usize,
    awaiting_functions: usize,
    infeasible: VecDeque<(Micros, u64)>,
    services: BTreeMap<ServiceId, String>,
    /// Services it asked to stop while draining.
    stopped: BTreeSet<ServiceId>,
    /// The newest revision of the job's settings it sent (0: none).
    job_revision: u64,
    /// Drained: every answer in, everything released, its services stopped.
    pub(crate) finished: bool,
    pub(crate) submitted: u64,
    pub(crate) outcomes: u64,
    /// Its side of taking up the session after a head restart.
    pub(crate) track: Tracker,
    /// Tasks told `Stored` whose announcement a resume asked for again.
    reannounced: BTreeSet<u64>,
    /// Stops and group removals sent again after a resume, by sequence number: how many more
    /// answers each may get.
    resent_stops: BTreeMap<u64, u32>,
    /// Each service start as sent (by seq), for the `Resume` while it is unanswered, as the
    /// client does.
    starts: BTreeMap<u64, ServiceStart>,
    /// Answers to stops sent again that came after the stop was answered already.
    pub(crate) repeated_answers: u64,
    /// Its own stream for its placement-group program, so the rest of its choices are drawn
    /// as they were before it had one.
    groups_rng: Rng,
    /// It creates placement groups (decided from the seed).
    uses_groups: bool,
    groups: Vec<DriverGroup>,
    /// While draining: how many answers it awaited, and since when (see `group_round`).
    progress: (usize, Micros),
    /// Finished with groups left to its job's end: the program ends (its session closes,
    /// and the groups go with its job) as soon as the head can be told.
    pub(crate) exit_pending: bool,
    /// Its program ended with groups left to its job's end: its session is closed.
    pub(crate) exited: bool,
    /// Function tasks it submitted into groups, by submission time: given up on (cancelled)
    /// if still unanswered after twice its patience (another group may hold the room theirs
    /// needs for as long as its job lasts).
    group_tasks: VecDeque<(Micros, u64)>,
}

fn root_cause(error: &TaskError) -> &TaskError {
    match error {
        TaskError::DependencyFailed { cause, .. } => cause,
        other => other,
    }
}

/// Whether `cause` is what a task that depended on one failing with `dependency_error` may
/// carry: the scheduler passes the root cause on, service calls the dependency's own error.
fn same_cause(dependency_error: &TaskError, cause: &TaskError) -> bool {
    root_cause(dependency_error) == cause || dependency_error == cause
}

impl SimDriver {
    pub(crate) fn new(index: usize, conn: usize, rng: Rng, mut groups_rng: Rng, habits: Habits) -> SimDriver {
        let uses_groups = habits.groups && groups_rng.chance(600);
        SimDriver {
            index,
            conn,
            session: None,
            dead: false,
            started: false,
            rng,
            habits,
            tasks: Vec::new(),
            held: Vec::new(),
            awaiting: 0,
            awaiting_functions: 0,
            infeasible: VecDeque::new(),
            services: BTreeMap::new(),
            stopped: BTreeSet::new(),
            job_revision: 0,
            finished: false,
            submitted: 0,
            outcomes: 0,
            track: Tracker::default(),
            reannounced: BTreeSet::new(),
            resent_stops: BTreeMap::new(),
            starts: BTreeMap::new(),
            repeated_answers: 0,
            groups_rng,
            uses_groups,
            groups: Vec::new(),
            progress: (0, 0),
            exit_pending: false,
            exited: false,
            group_tasks: VecDeque::new(),
        }
    }

    pub(crate) fn hello(&self) -> PeerToHead {
        PeerToHead::Hello {
            protocol_version: PROTOCOL_VERSION,
            name: format!("d{}", self.index),
            worker: None,
        }
    }

    fn task(&self, seq: u64) -> Option<&DriverTask> {
        self.tasks.get(usize::try_from(seq).ok()?.checked_sub(1)?)
    }

    fn task_mut(&mut self, seq: u64) -> Option<&mut DriverTask> {
        self.tasks.get_mut(usize::try_from(seq).ok()?.checked_sub(1)?)
    }

    /// What a worker must know of function task `seq` to check it was given the right thing.
    pub(crate) fn function_facts(&self, seq: u64, catalog: &Catalog) -> Option<TaskFacts> {
        match self.task(seq)?.kind {
            Kind::Function { function, request, .. } => Some(TaskFacts {
                function: usize::from(function),
                request: catalog.requests[usize::from(request)].clone(),
            }),
            _ => None,
        }
    }

    /// The revisions of its job's settings task `seq` may run with: the one when it was
    /// submitted, up to the newest the driver sent.
    pub(crate) fn job_revisions(&self, seq: u64) -> Option<(u64, u64)> {
        match self.task(seq)?.kind {
            Kind::Function { job_revision, .. } => Some((job_revision, self.job_revision)),
            _ => None,
        }
    }

    /// The labels function task `seq` asked its node to have, if any.
    pub(crate) fn asked_labels(&self, seq: u64) -> Option<&'static str> {
        match self.task(seq)?.kind {
            Kind::Function { labels: Some(labels), .. } => Some(model::LABEL_ASKS[usize::from(labels)]),
            _ => None,
        }
    }

    /// Function task `seq`'s function and tag, if it was tagged.
    pub(crate) fn tagged(&self, seq: u64) -> Option<(usize, &'static str)> {
        match self.task(seq)?.kind {
            Kind::Function { function, tag: Some(tag), .. } => {
                Some((usize::from(function), TAGS[usize::from(tag)]))
            }
            _ => None,
        }
    }

    /// `(tag, digest of the value)` of function task `seq` if watchers ask for its results.
    pub(crate) fn watched_result(&self, seq: u64) -> Option<(&'static str, u64)> {
        let (function, tag) = self.tagged(seq)?;
        let Kind::Function { expected, .. } = self.task(seq)?.kind else { return None };
        model::watched(function, tag).then_some((tag, expected.digest))
    }

    /// How many times function task `seq` may be dispatched in all, if bounded.
    pub(crate) fn max_attempts(&self, seq: u64) -> Option<u32> {
        match self.task(seq)?.kind {
            Kind::Function { max_retries, .. } => u32::try_from(max_retries).ok().map(|r| r + 1),
            _ => None,
        }
    }

    /// The request of the instance service start `seq` asked for.
    pub(crate) fn start_request<'c>(&self, seq: u64, catalog: &'c Catalog) -> Option<&'c Resources> {
        match self.task(seq)?.kind {
            Kind::ServiceStart { request, .. } => Some(&catalog.service_requests[usize::from(request)]),
            _ => None,
        }
    }

    /// The group and bundle function task `seq` runs in, if it was submitted into one the head
    /// accepts it for.
    pub(crate) fn task_bundle(&self, seq: u64) -> Option<(GroupId, Option<u32>)> {
        match self.task(seq)?.kind {
            Kind::Function { in_group: Some(InGroup { group, bundle, refused: None }), .. } => {
                Some((self.groups.get(usize::from(group))?.id, bundle))
            }
            _ => None,
        }
    }

    /// The group request `seq` asked `GroupReady` of.
    pub(crate) fn ready_of(&self, seq: u64) -> Option<GroupId> {
        match self.task(seq)?.kind {
            Kind::GroupReady { group, .. } => Some(self.groups.get(usize::from(group))?.id),
            _ => None,
        }
    }

    /// Whether `seq` is a service start, lookup (answered with a [`ServiceInfo`]) or stop.
    pub(crate) fn is_service_request(&self, seq: u64) -> bool {
        self.task(seq).is_some_and(|t| matches!(t.kind, Kind::ServiceStart { .. } | Kind::Lookup { .. }))
    }

    fn next_id(&mut self) -> Option<(u64, TaskId)> {
        let session = self.session?;
        let seq = self.tasks.len() as u64 + 1;
        Some((seq, TaskId::new(session, seq)))
    }

    fn add(&mut self, kind: Kind, deps: Vec<u64>) {
        let function = matches!(kind, Kind::Function { .. });
        self.tasks.push(DriverTask {
            kind,
            deps: deps.into_boxed_slice(),
            state: State::Pending,
            held: true,
            released_early: false,
            cancelled: false,
            outcomes: 0,
            awaited: true,
        });
        self.held.push(self.tasks.len() as u64);
        self.awaiting += 1;
        if function {
            self.awaiting_functions += 1;
            self.submitted += 1;
        }
    }

    /// A placement-group request: no object to hold, and waited for if `awaited`.
    fn add_request(&mut self, kind: Kind, awaited: bool) {
        self.tasks.push(DriverTask {
            kind,
            deps: Box::new([]),
            state: State::Pending,
            held: false,
            released_early: false,
            cancelled: false,
            outcomes: 0,
            awaited,
        });
        if awaited {
            self.awaiting += 1;
        }
    }

    /// The digest of held task `seq`'s value as it will be if it succeeds, when its value may be
    /// passed to a task.
    fn ref_digest(&self, seq: u64) -> Option<u64> {
        match self.task(seq)?.kind {
            Kind::Function { function, expected, .. } if usize::from(function) != GHOST => {
                Some(expected.digest)
            }
            Kind::ServiceCall { digest, .. } if self.habits.refs_to_call_results => Some(digest),
            _ => None,
        }
    }

    /// Arguments for a new task: values, and refs to held results of this driver.
    fn arguments(&mut self, max: u64) -> (Vec<Arg>, Vec<u64>, Vec<u64>) {
        let (mut args, mut deps, mut digests) = (Vec::new(), Vec::new(), Vec::new());
        let session = self.session.unwrap_or(SessionId(0));
        for _ in 0..self.rng.below(max + 1) {
            if !self.held.is_empty() && self.rng.chance(400) {
                let seq = self.held[self.rng.below(self.held.len() as u64) as usize];
                if let Some(digest) = self.ref_digest(seq) {
                    args.push(Arg::Ref(TaskId::new(session, seq)));
                    deps.push(seq);
                    digests.push(digest);
                    continue;
                }
            }
            let len = self.rng.below(12) as usize;
            let value = self.rng.bytes(len);
            digests.push(model::digest(&value));
            args.push(Arg::Value(value));
        }
        (args, deps, digests)
    }

    fn submit_function(&mut self, fx: &mut Effects<DriverTimer>, now: Micros, catalog: &Catalog) {
        let Some((_, task)) = self.next_id() else { return };
        let function = if self.rng.chance(5) { GHOST } else { self.rng.weighted(&catalog.function_weights) };
        let mut request = self.rng.weighted(&catalog.request_weights);
        let in_group = self.pick_bundle(&mut request, catalog);
        let retry_exceptions = self.rng.chance(300);
        // Unlimited retries of application errors would run a function that always fails
        // for ever; nobody who means to wait for the result asks for that.
        let unlimited = if retry_exceptions { 0 } else { 1 };
        let max_retries = [0, 1, 3, -1][self.rng.weighted(&[3, 3, 3, unlimited])];
        let (mut args, deps, mut digests) = self.arguments(3);
        let tag = self.rng.chance(300).then(|| self.rng.below(TAGS.len() as u64) as u8);
        if tag.is_some() {
            // Tagged results may be written to watchers, who are checked by (tag, value): a
            // nonce argument keeps two tasks from returning the same value.
            let nonce = format!("{task}").into_bytes();
            digests.push(model::digest(&nonce));
            args.push(Arg::Value(nonce));
        }
        let expected = if function == GHOST {
            Expected { digest: 0, len: 0, failure: ExpectedFailure::Always }
        } else {
            model::expect(function, &digests)
        };
        // Chosen from the task's id, not the random stream, so every seed's run is the one it
        // was before calls asked for labels (what it tests, it still tests).
        let mix = task.0.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 40;
        let labels = (mix % 10 == 0).then(|| ((mix / 10) % model::LABEL_ASKS.len() as u64) as u8);
        let strategy = match mix / 30 % 10 {
            0 => Strategy::Spread,
            1 => Strategy::Pack,
            _ => Strategy::Default,
        };
        let placement = Placement {
            labels: labels.map_or_else(Labels::new, |l| {
                Labels::parse(model::LABEL_ASKS[usize::from(l)]).unwrap_or_default()
            }),
            strategy,
            group: in_group.and_then(|ig| {
                let id = self.groups.get(usize::from(ig.group))?.id;
                Some(BundleRef { group: id, bundle: ig.bundle })
            }),
        };
        fx.sends.push(PeerToHead::Submit(TaskSpec {
            task,
            function: catalog.functions[function].clone(),
            args,
            request: catalog.requests[request].clone(),
            tag: tag.map(|t| TAGS[usize::from(t)].to_string()),
            // The integers a peer sends, `-1` included: the wire form.
            max_retries: chia_core::Retries::from(i64::from(max_retries)),
            bypass: None,
            retry_exceptions,
            job: None,
            timeout_ms: None,
            placement: placement.boxed(),
        }));
        let kind = Kind::Function {
            function: function as u8,
            request: request as u8,
            max_retries,
            retry_exceptions,
            expected,
            tag,
            job_revision: self.job_revision,
            labels,
            in_group,
        };
        if in_group.is_some_and(|ig| ig.refused.is_none()) {
            self.group_tasks.push_back((now, task.seq()));
        }
        self.add(kind, deps);
    }

    /// Now and then, a bundle of one of its groups for the task about to be submitted, with a
    /// request (`request`, an index) the bundle can hold; now and then on purpose one the head
    /// must refuse (a bundle the group lacks, a request larger than the bundle, a group removed).
    fn pick_bundle(&mut self, request: &mut usize, catalog: &Catalog) -> Option<InGroup> {
        if !self.uses_groups || self.groups.is_empty() {
            return None;
        }
        let rng = &mut self.groups_rng;
        if !rng.chance(400) {
            return None;
        }
        let g = rng.below(self.groups.len() as u64) as usize;
        let group = &self.groups[g];
        let usable = !group.invalid
            && match group.state {
                GroupState::Ready => !group.removing || rng.chance(100),
                GroupState::Infeasible => rng.chance(if group.removing { 100 } else { 300 }),
                GroupState::Unanswered => false,
            };
        if !usable {
            return None;
        }
        let count = group.bundles.len() as u32;
        let bundle = if rng.chance(30) {
            Some(count)
        } else if rng.chance(150) {
            None
        } else {
            Some(rng.below(u64::from(count)) as u32)
        };
        let holds = |r: &Resources| match bundle {
            Some(b) => group.bundles.get(b as usize).is_some_and(|held| held.covers(r)),
            None => group.bundles.iter().any(|held| held.covers(r)),
        };
        let too_small = rng.chance(40);
        let weights: Vec<u32> = catalog
            .requests
            .iter()
            .zip(&catalog.request_weights)
            .map(|(r, &w)| if holds(r) != too_small { w } else { 0 })
            .collect();
        if weights.iter().any(|&w| w > 0) {
            *request = rng.weighted(&weights);
        }
        let refused = if group.removing {
            Some(Refusal::Unknown)
        } else if bundle.is_some_and(|b| b >= count) {
            Some(Refusal::NoSuchBundle)
        } else if !holds(&catalog.requests[*request]) {
            Some(Refusal::TooSmall)
        } else {
            None
        };
        Some(InGroup { group: g as u16, bundle, refused })
    }

    /// Creates a placement group of 1 to 3 bundles with a random strategy (now and then one no
    /// node can hold, or one without bundles that the head refuses), and asks when it is ready.
    fn create_group(&mut self, fx: &mut Effects<DriverTimer>, now: Micros, catalog: &Catalog) {
        let Some((_, task)) = self.next_id() else { return };
        let rng = &mut self.groups_rng;
        let invalid = rng.chance(40);
        let mut bundles: Vec<Resources> = Vec::new();
        if !invalid {
            for _ in 0..rng.range(1, 3) {
                bundles.push(catalog.bundles[rng.weighted(&catalog.bundle_weights)].clone());
            }
            if rng.chance(100) {
                let at = rng.below(bundles.len() as u64) as usize;
                bundles[at] = catalog.too_large_bundle.clone();
            }
        }
        let strategy = [
            GroupStrategy::Pack,
            GroupStrategy::StrictPack,
            GroupStrategy::Spread,
            GroupStrategy::StrictSpread,
        ][rng.below(4) as usize];
        let leave = rng.chance(400);
        let ask = !invalid || rng.chance(500);
        let id = GroupId(task);
        fx.sends.push(PeerToHead::CreateGroup(GroupSpec {
            group: id,
            bundles: bundles.clone(),
            strategy,
            detached: false,
            job: None,
        }));
        let g = self.groups.len() as u16;
        self.groups.push(DriverGroup {
            id,
            bundles,
            invalid,
            state: GroupState::Unanswered,
            asking: None,
            removing: false,
            leave,
        });
        self.add_request(Kind::GroupCreate { group: g }, false);
        if ask {
            self.ask_ready(fx, now, g);
        }
    }

    fn ask_ready(&mut self, fx: &mut Effects<DriverTimer>, now: Micros, g: u16) {
        let Some((_, task)) = self.next_id() else { return };
        let Some(group) = self.groups.get_mut(usize::from(g)) else { return };
        group.asking = Some(now);
        let after_removal = group.removing || group.invalid;
        fx.sends.push(PeerToHead::GroupReady { task, group: group.id });
        self.add_request(Kind::GroupReady { group: g, after_removal }, true);
    }

    fn remove_group(&mut self, fx: &mut Effects<DriverTimer>, g: u16) {
        let Some((_, task)) = self.next_id() else { return };
        let Some(group) = self.groups.get_mut(usize::from(g)) else { return };
        group.removing = true;
        fx.sends.push(PeerToHead::RemoveGroup { task, group: group.id });
        self.add_request(Kind::GroupRemove { group: g }, true);
    }

    /// One round of its placement-group program: gives up on group tasks and `GroupReady`
    /// requests that waited too long; then, unless `draining`, creates a group now and then,
    /// removes some, and asks again whether an infeasible one fits now; when `draining`, removes
    /// every group it does not leave to its job's end.
    fn group_round(
        &mut self,
        fx: &mut Effects<DriverTimer>,
        now: Micros,
        session: SessionId,
        draining: bool,
        catalog: &Catalog,
    ) {
        let limit = 2 * self.habits.patience;
        while let Some(&(since, seq)) = self.group_tasks.front() {
            if now < since + limit {
                break;
            }
            self.group_tasks.pop_front();
            self.cancel(fx, session, seq);
        }
        if draining {
            // A group left to its job's end may hold the room its own tasks (or another
            // driver's) wait for: after a while without an answer, it is removed after all.
            if self.awaiting != self.progress.0 {
                self.progress = (self.awaiting, now);
            } else if now >= self.progress.1 + self.habits.patience {
                for group in &mut self.groups {
                    group.leave = false;
                }
            }
        }
        for g in 0..self.groups.len() {
            let group = &self.groups[g];
            if group.removing || group.invalid {
                continue;
            }
            if group.asking.is_some_and(|at| now >= at + limit) || (draining && !group.leave) {
                self.remove_group(fx, g as u16);
            }
        }
        if draining || !self.uses_groups {
            return;
        }
        let live = self.groups.iter().filter(|g| !g.removing && !g.invalid).count();
        if live < 2 && self.groups_rng.chance(60) {
            self.create_group(fx, now, catalog);
        }
        for g in 0..self.groups.len() {
            let group = &self.groups[g];
            if group.invalid || group.asking.is_some() {
                continue;
            }
            let rng = &mut self.groups_rng;
            match (group.state, group.removing) {
                (GroupState::Ready, false) if rng.chance(40) => self.remove_group(fx, g as u16),
                (GroupState::Infeasible, false) if rng.chance(250) => self.remove_group(fx, g as u16),
                (GroupState::Infeasible, false) if rng.chance(150) => self.ask_ready(fx, now, g as u16),
                // Asked once more after the removal: the head no longer knows it.
                (_, true) if rng.chance(5) => self.ask_ready(fx, now, g as u16),
                _ => {}
            }
        }
    }

    fn start_service(&mut self, fx: &mut Effects<DriverTimer>, catalog: &Catalog) {
        let Some((_, task)) = self.next_id() else { return };
        let namespace = self.rng.below(NAMESPACES.len() as u64) as u8;
        let name = self.rng.below(SERVICE_NAMES.len() as u64) as u8;
        let request = self.rng.below(catalog.service_requests.len() as u64) as u8;
        let get_if_exists = self.rng.chance(500);
        let fails = self.habits.constructor_failures && self.rng.chance(80);
        let watches = self.rng.chance(300);
        let (ns, n) = (NAMESPACES[usize::from(namespace)], SERVICE_NAMES[usize::from(name)]);
        let start = ServiceStart {
            task,
            service_type: catalog.service.clone(),
            name: n.to_string(),
            namespace: ns.to_string(),
            detached: false,
            get_if_exists,
            request: catalog.service_requests[usize::from(request)].clone(),
            args: Constructor { name: format!("{ns}/{n}"), fails, watches }
                .args()
                .into_iter()
                .map(Arg::Value)
                .collect(),
            max_restarts: [
                chia_core::Retries::Never,
                chia_core::Retries::UpTo(1),
                chia_core::Retries::Forever,
            ][self.rng.weighted(&[2, 2, 1])],
            placement: None,
        };
        self.starts.insert(task.seq(), start.clone());
        fx.sends.push(PeerToHead::StartService(start));
        self.add(Kind::ServiceStart { namespace, name, request, get_if_exists, fails }, Vec::new());
    }

    fn call_service(&mut self, fx: &mut Effects<DriverTimer>) {
        if self.services.is_empty() {
            return;
        }
        let pick = self.rng.below(self.services.len() as u64) as usize;
        let Some((&service, name)) = self.services.iter().nth(pick) else { return };
        let name = name.clone();
        let Some((_, task)) = self.next_id() else { return };
        let method = self.rng.below(METHODS.len() as u64) as usize;
        let (args, deps, digests) = self.arguments(2);
        let (digest, len) = model::expect_method(method, &digests);
        fx.sends.push(PeerToHead::CallService {
            task,
            service,
            name,
            method: METHODS[method].to_string(),
            args,
        });
        self.add(Kind::ServiceCall { digest, len }, deps);
    }

    fn stop_service(&mut self, fx: &mut Effects<DriverTimer>, service: ServiceId) {
        let Some((_, task)) = self.next_id() else { return };
        fx.sends.push(PeerToHead::StopService { task, service });
        self.add(Kind::ServiceStop { service }, Vec::new());
    }

    fn lookup(&mut self, fx: &mut Effects<DriverTimer>) {
        let Some((_, task)) = self.next_id() else { return };
        let namespace = self.rng.below(NAMESPACES.len() as u64) as u8;
        let name = self.rng.below(SERVICE_NAMES.len() as u64) as u8;
        fx.sends.push(PeerToHead::LookupService {
            task,
            name: SERVICE_NAMES[usize::from(name)].to_string(),
            namespace: NAMESPACES[usize::from(namespace)].to_string(),
        });
        self.add(Kind::Lookup { namespace, name }, Vec::new());
    }

    fn take_held(&mut self, at: usize) -> u64 {
        let seq = self.held.swap_remove(at);
        if let Some(task) = self.task_mut(seq) {
            task.held = false;
        }
        seq
    }

    /// Drops held refs: settled ones beyond what it keeps for arguments, and now and then a
    /// pending one whose result it no longer wants (it may then end unannounced).
    fn release(&mut self, fx: &mut Effects<DriverTimer>, session: SessionId, keep: usize, catalog: &Catalog) {
        let mut released = Vec::new();
        let mut tries = 0;
        while self.held.len() > keep && tries < 4 * self.held.len() {
            tries += 1;
            let at = self.rng.below(self.held.len() as u64) as usize;
            let settled = self
                .task(self.held[at])
                .is_some_and(|t| matches!(t.state, State::Succeeded | State::Failed(_)));
            if settled {
                released.push(self.take_held(at));
            }
        }
        if !self.held.is_empty() && self.rng.chance(5) {
            let at = self.rng.below(self.held.len() as u64) as usize;
            let seq = self.held[at];
            // Only tasks that will run some day: nobody is left to cancel an infeasible one.
            // Not one in a group either: it may be refused, or removed with its group.
            let runs = self.task(seq).is_some_and(|t| match t.kind {
                Kind::Function { function, request, in_group, .. } => {
                    matches!(t.state, State::Pending)
                        && usize::from(function) != GHOST
                        && catalog.feasible(usize::from(request))
                        && in_group.is_none()
                }
                _ => false,
            });
            if runs {
                self.take_held(at);
                if let Some(task) = self.task_mut(seq) {
                    task.released_early = true;
                }
                self.awaiting -= 1;
                self.awaiting_functions -= 1;
                released.push(seq);
            }
        }
        if !released.is_empty() {
            fx.sends.push(PeerToHead::Release {
                tasks: released.into_iter().map(|s| TaskId::new(session, s)).collect(),
            });
        }
    }

    fn cancel(&mut self, fx: &mut Effects<DriverTimer>, session: SessionId, seq: u64) {
        let force = self.rng.chance(300);
        let Some(task) = self.task_mut(seq) else { return };
        if task.held
            && !task.cancelled
            && matches!(task.state, State::Pending)
            && matches!(task.kind, Kind::Function { .. })
        {
            task.cancelled = true;
            fx.sends.push(PeerToHead::Cancel { task: TaskId::new(session, seq), force });
        }
    }

    fn set_job_settings(&mut self, fx: &mut Effects<DriverTimer>, session: SessionId, revision: u64) {
        let settings = model::job_settings(revision);
        fx.sends.push(PeerToHead::SetJobSettings(chia_core::protocol::JobSettings {
            job: session,
            revision,
            settings,
        }));
    }

    /// One round of the driver's program. `budget` is what is left of the run's tasks.
    pub(crate) fn tick(
        &mut self,
        fx: &mut Effects<DriverTimer>,
        now: Micros,
        budget: &mut u64,
        catalog: &Catalog,
    ) {
        if self.finished || self.dead {
            return;
        }
        let Some(session) = self.session else {
            fx.timers.push((1_000, DriverTimer::Tick));
            return;
        };
        // Tasks no node could run for a while are given up on, as a user's `get_timeout` would.
        while let Some(&(since, seq)) = self.infeasible.front() {
            if now < since + self.habits.patience {
                break;
            }
            self.infeasible.pop_front();
            self.cancel(fx, session, seq);
        }
        self.group_round(fx, now, session, *budget == 0, catalog);
        if *budget > 0 {
            let room = self.habits.window.saturating_sub(self.awaiting_functions);
            let most = (self.habits.window as u64 / 4).max(1);
            let burst = (self.rng.range(1, most) as usize).min(room) as u64;
            for _ in 0..burst.min(*budget) {
                self.submit_function(fx, now, catalog);
                *budget -= 1;
            }
            if !self.held.is_empty() && self.rng.chance(30) {
                let seq = self.held[self.rng.below(self.held.len() as u64) as usize];
                self.cancel(fx, session, seq);
            }
            if self.rng.chance(10) {
                self.job_revision += 1;
                self.set_job_settings(fx, session, self.job_revision);
            } else if self.job_revision > 1 && self.rng.chance(3) {
                // A stale revision, as from a settings change that lost a race: ignored.
                self.set_job_settings(fx, session, self.job_revision - 1);
            }
            if self.habits.services {
                if self.rng.chance(20) {
                    self.start_service(fx, catalog);
                }
                if self.rng.chance(40) {
                    self.call_service(fx);
                }
                if self.rng.chance(6) && !self.services.is_empty() {
                    let pick = self.rng.below(self.services.len() as u64) as usize;
                    if let Some(&service) = self.services.keys().nth(pick) {
                        self.stop_service(fx, service);
                    }
                }
                if self.rng.chance(8) {
                    self.lookup(fx);
                }
            }
            let keep = self.rng.range(4, 32) as usize;
            self.release(fx, session, keep, catalog);
        } else {
            // Draining: let go of what has ended, and stop every service it knows at once (one
            // that starts later too), without waiting for the answers it still expects: a
            // start may be waiting for the room its own services hold.
            self.release(fx, session, 0, catalog);
            let running: Vec<ServiceId> =
                self.services.keys().filter(|s| !self.stopped.contains(s)).copied().collect();
            for service in running {
                self.stopped.insert(service);
                self.stop_service(fx, service);
            }
            if self.awaiting == 0 && self.held.is_empty() {
                self.finished = true;
                return;
            }
        }
        fx.timers.push((self.rng.range(2_000, 40_000), DriverTimer::Tick));
    }

    /// It holds groups it left to its job's end (it never asked to remove them).
    pub(crate) fn holds_groups(&self) -> bool {
        self.groups.iter().any(|g| !g.invalid && !g.removing)
    }

    /// It still waits for answers (or has not joined yet).
    pub(crate) fn busy(&self) -> bool {
        !self.dead && !self.finished && (self.awaiting > 0 || self.session.is_none())
    }

    /// The head is gone: the `Resume` that takes up the session, or `None` if it has none to
    /// take up (it joins afresh).
    pub(crate) fn resume(&mut self) -> Option<PeerToHead> {
        let (session, journal_id) = (self.session?, self.track.journal_id?);
        self.track.lost();
        self.track.resuming = true;
        let mut waiting = Vec::new();
        self.reannounced.clear();
        for (i, task) in self.tasks.iter().enumerate() {
            let seq = i as u64 + 1;
            if task.released_early {
                continue;
            }
            match task.state {
                State::Pending => waiting.push(TaskId::new(session, seq)),
                State::Fetching { .. } => {
                    waiting.push(TaskId::new(session, seq));
                    self.reannounced.insert(seq);
                }
                _ => {}
            }
        }
        // One never numbered goes again with the unacknowledged frames; the head tells the
        // others apart by their numbers.
        let starts = self
            .starts
            .iter()
            .filter(|(seq, _)| self.task(**seq).is_some_and(|t| matches!(t.state, State::Pending)))
            .filter_map(|(_, start)| {
                let frame = self.track.start_frames.get(&start.task).copied().filter(|&frame| frame > 0)?;
                Some(UnansweredStart { frame, start: start.clone() })
            })
            .collect();
        Some(PeerToHead::Resume(ResumeSession {
            protocol_version: PROTOCOL_VERSION,
            session,
            journal_id,
            known: Vec::new(),
            waiting,
            starts,
        }))
    }

    /// After a resume: the requests the head answers from what it holds (lookups, stops) that
    /// are still unanswered, to send again (the answer may have died with the head).
    /// The requests to ask again after a resume (`resent`: those sent again already, with the
    /// frames the head had not kept).
    pub(crate) fn unanswered(&mut self, now: Micros, resent: &HashSet<TaskId>) -> Vec<PeerToHead> {
        let Some(session) = self.session else { return Vec::new() };
        let mut again = Vec::new();
        // A notice that a task cannot run now may have died with the head (it is not sent
        // again): every function task still waited for is given up on after the driver's
        // patience, as a user's `get_timeout` would, if it has not ended by then.
        for (i, task) in self.tasks.iter().enumerate() {
            if matches!((&task.kind, &task.state), (Kind::Function { .. }, State::Pending)) && task.held {
                self.infeasible.push_back((now, i as u64 + 1));
            }
        }
        for (i, task) in self.tasks.iter().enumerate() {
            if !matches!(task.state, State::Pending) {
                continue;
            }
            let task_id = TaskId::new(session, i as u64 + 1);
            if resent.contains(&task_id) {
                continue;
            }
            match task.kind {
                Kind::Lookup { namespace, name } => again.push(PeerToHead::LookupService {
                    task: task_id,
                    name: SERVICE_NAMES[usize::from(name)].to_string(),
                    namespace: NAMESPACES[usize::from(namespace)].to_string(),
                }),
                Kind::ServiceStop { service } => {
                    again.push(PeerToHead::StopService { task: task_id, service });
                    // The head may hold the first (it waits for the instance to end) and
                    // answers each request it holds.
                    *self.resent_stops.entry(i as u64 + 1).or_default() += 1;
                }
                // The head does not keep the `ready` requests waiting on a group.
                Kind::GroupReady { group, .. } => {
                    if let Some(g) = self.groups.get(usize::from(group)) {
                        again.push(PeerToHead::GroupReady { task: task_id, group: g.id });
                    }
                }
                Kind::GroupRemove { group } => {
                    if let Some(g) = self.groups.get(usize::from(group)) {
                        again.push(PeerToHead::RemoveGroup { task: task_id, group: g.id });
                        // Kept, the first may be answered again from the journal too.
                        *self.resent_stops.entry(i as u64 + 1).or_default() += 1;
                    }
                }
                _ => {}
            }
        }
        again
    }

    pub(crate) fn welcome(
        &mut self,
        session: SessionId,
        node: Option<chia_core::NodeId>,
        journal_id: Option<u64>,
    ) -> Result {
        if self.session.is_some() {
            return Err(format!("driver {} got a second welcome", self.index));
        }
        if node.is_some() {
            return Err(format!("driver {} joined without an offer but was given a node", self.index));
        }
        self.session = Some(session);
        self.track = Tracker { journal_id, ..Tracker::default() };
        Ok(())
    }

    pub(crate) fn infeasible(&mut self, now: Micros, task: TaskId) {
        let seq = task.seq();
        if self.task(seq).is_some_and(|t| matches!(t.state, State::Pending)) {
            self.infeasible.push_back((now, seq));
        }
    }

    /// Whether `task` takes the result of a service call as an argument.
    fn waits_for_call(&self, task: &DriverTask) -> bool {
        task.deps.iter().any(|&d| self.task(d).is_some_and(|t| matches!(t.kind, Kind::ServiceCall { .. })))
    }

    fn deps_failed(&self, task: &DriverTask) -> Option<u64> {
        task.deps.iter().copied().find(|&d| self.task(d).is_some_and(|t| matches!(t.state, State::Failed(_))))
    }

    /// An outcome arrived for `task`.
    pub(crate) fn done(&mut self, fx: &mut Effects<DriverTimer>, task_id: TaskId, done: Done) -> Result {
        let seq = task_id.seq();
        let me = self.index;
        let Some(task) = self.task(seq) else {
            return Err(format!("driver {me} was told {task_id} ended, which it never submitted"));
        };
        if let (State::Fetching { len }, Done::Stored { len: again }) = (&task.state, &done)
            && self.reannounced.contains(&seq)
        {
            let (len, again) = (*len, *again);
            self.reannounced.remove(&seq);
            // Announced again after a resume, as the resume asked: fetch it on this connection.
            if len != again {
                return Err(format!(
                    "driver {me}: {task_id} was announced as {len} stored bytes, and after the head's restart as {again}"
                ));
            }
            fx.sends.push(PeerToHead::Fetch { task: task_id });
            return Ok(());
        }
        if task.outcomes > 0
            && matches!(
                (&task.kind, &task.state, &done),
                (Kind::ServiceStop { .. } | Kind::GroupRemove { .. }, State::Succeeded, Done::Value(_))
            )
            && self.resent_stops.get(&seq).is_some_and(|more| *more > 0)
        {
            if let Some(more) = self.resent_stops.get_mut(&seq) {
                *more -= 1;
            }
            self.repeated_answers += 1;
            return Ok(());
        }
        if task.outcomes > 0 {
            return Err(format!(
                "driver {me} was told twice how {task_id} ended (now: {done:?}, before: {:?})",
                task.state
            ));
        }
        let faults = self.habits.faults;
        if let Kind::Function { in_group: Some(InGroup { refused: Some(refusal), group, .. }), .. } =
            task.kind
        {
            // The head fails a task whose argument failed already before it looks further.
            let right = match &done {
                Done::Failed(TaskError::PlacementGroup { problem, .. }) => refusal.is(problem),
                Done::Failed(TaskError::DependencyFailed { .. }) => true,
                _ => false,
            };
            if !right {
                let id = self.groups.get(usize::from(group)).map(|g| g.id);
                return Err(format!(
                    "driver {me}, {task_id}: submitted into {id:?} where the head must refuse it ({refusal:?}), it ended {done:?}"
                ));
            }
        }
        let in_group = match task.kind {
            Kind::Function { in_group: Some(ig), .. } => {
                self.groups.get(usize::from(ig.group)).map(|g| (g, ig))
            }
            _ => None,
        };
        let asked_ready = match task.kind {
            Kind::GroupReady { group, .. } => Some(group),
            _ => None,
        };
        // What a group answer changes of the group, once the answer is found right.
        let mut group_now: Option<(u16, GroupState)> = None;
        let verdict: Result<State> = match (&task.kind, done) {
            (Kind::Function { expected, .. }, Done::Value(value)) => {
                if value.len() > INLINE_RESULT_BYTES {
                    Err(format!(
                        "{} bytes came inline, above the {INLINE_RESULT_BYTES}-byte limit",
                        value.len()
                    ))
                } else {
                    self.check_value(task, *expected, &value).map(|()| State::Succeeded)
                }
            }
            (Kind::Function { expected, .. }, Done::Stored { len }) => {
                if len <= INLINE_RESULT_BYTES as u64 {
                    Err(format!("a {len}-byte value was stored instead of sent inline"))
                } else if len != u64::from(expected.len) || expected.failure == ExpectedFailure::Always {
                    Err(format!("a {len}-byte value was stored where {expected:?} was expected"))
                } else if task.released_early {
                    // Its ref is gone: nobody asks for the value.
                    Ok(State::Succeeded)
                } else {
                    fx.sends.push(PeerToHead::Fetch { task: task_id });
                    Ok(State::Fetching { len })
                }
            }
            (
                Kind::Function { function, max_retries, retry_exceptions, expected, .. },
                Done::Failed(error),
            ) => {
                let explained = match &error {
                    TaskError::Application { .. } => match expected.failure {
                        ExpectedFailure::Always => true,
                        ExpectedFailure::FirstAttempt => !(*retry_exceptions && *max_retries != 0),
                        ExpectedFailure::Never => false,
                    },
                    // Running in a group when it was removed: cancelled with it.
                    TaskError::Cancelled { .. } => {
                        task.cancelled || in_group.is_some_and(|(g, _)| g.removing)
                    }
                    TaskError::PlacementGroup { group, problem } => in_group.is_some_and(|(g, ig)| {
                        *group == g.id.to_string()
                            && match ig.refused {
                                Some(refusal) => refusal.is(problem),
                                // One waiting for a service call's result is not in the
                                // scheduler yet when its group goes: it is refused when the
                                // call ends, as if submitted after the removal.
                                None => {
                                    g.removing
                                        && (*problem == GroupProblem::Removed
                                            || (*problem == GroupProblem::Unknown
                                                && self.waits_for_call(task)))
                                }
                            }
                    }),
                    TaskError::WorkerLost { attempts, .. } => {
                        faults && u32::try_from(*max_retries).is_ok_and(|r| *attempts == r + 1)
                    }
                    TaskError::DependencyFailed { dependency, cause, .. } => {
                        dependency.session() == task_id.session()
                            && task.deps.contains(&dependency.seq())
                            && match self.task(dependency.seq()).map(|d| &d.state) {
                                Some(State::Failed(dep_error)) => same_cause(dep_error, cause),
                                // Told before the dependency's own failure, or it was released:
                                // checked once the run has drained.
                                Some(State::Pending) => true,
                                _ => false,
                            }
                    }
                    // Whether any node offered the function is the world's check, at the head.
                    TaskError::UnknownFunction { .. } | TaskError::SignatureMismatch { .. } => true,
                    _ => false,
                };
                let name = FUNCTIONS.get(usize::from(*function)).map_or("ghost", |f| f.name);
                if explained {
                    Ok(State::Failed(Box::new(error)))
                } else {
                    Err(format!(
                        "{name} (max_retries {max_retries}, retry_exceptions {retry_exceptions}, {}cancelled, expected {expected:?}) failed with {error:?}, which nothing in the run explains",
                        if task.cancelled { "" } else { "not " },
                    ))
                }
            }
            (Kind::ServiceStart { namespace, name, get_if_exists, fails, .. }, Done::Value(bytes)) => {
                match rmp_serde::from_slice::<ServiceInfo>(&bytes) {
                    Err(e) => Err(format!("the answer to a service start is not a ServiceInfo: {e}")),
                    Ok(info) => {
                        let (ns, n) =
                            (NAMESPACES[usize::from(*namespace)], SERVICE_NAMES[usize::from(*name)]);
                        if info.namespace != ns || info.name != n {
                            Err(format!("started {ns}/{n} but was answered with {info:?}"))
                        } else if *fails && !*get_if_exists {
                            Err(format!(
                                "{ns}/{n} was reported started although its constructor always fails: {info:?}"
                            ))
                        } else {
                            self.services.insert(info.id, info.name);
                            Ok(State::Succeeded)
                        }
                    }
                }
            }
            (Kind::ServiceStart { .. }, Done::Failed(error)) => match error {
                TaskError::InvalidCall { .. }
                | TaskError::ServiceUnavailable { .. }
                | TaskError::Application { .. }
                | TaskError::UnknownFunction { .. }
                | TaskError::SignatureMismatch { .. } => Ok(State::Failed(Box::new(error))),
                TaskError::WorkerLost { .. } if faults => Ok(State::Failed(Box::new(error))),
                other => Err(format!("a service start failed with {other:?}")),
            },
            (Kind::ServiceCall { digest, len, .. }, Done::Value(value)) => {
                if (model::digest(&value), value.len() as u32) != (*digest, *len) {
                    Err(format!(
                        "a service call returned {} bytes that are not what the method computes",
                        value.len()
                    ))
                } else if let Some(dep) = self.deps_failed(task) {
                    Err(format!("a service call returned a value although its argument task {dep} failed"))
                } else {
                    Ok(State::Succeeded)
                }
            }
            (Kind::ServiceCall { .. }, Done::Failed(error)) => match &error {
                TaskError::ServiceUnavailable { .. } | TaskError::DependencyFailed { .. } => {
                    Ok(State::Failed(Box::new(error)))
                }
                TaskError::WorkerLost { .. } if faults => Ok(State::Failed(Box::new(error))),
                other => Err(format!("a service call failed with {other:?}")),
            },
            (Kind::ServiceStop { .. }, Done::Value(_)) => Ok(State::Succeeded),
            (Kind::GroupCreate { group }, done) => {
                let invalid = self.groups.get(usize::from(*group)).is_some_and(|g| g.invalid);
                match done {
                    Done::Value(_) if !invalid => Ok(State::Succeeded),
                    Done::Failed(error @ TaskError::InvalidCall { .. }) if invalid => {
                        Ok(State::Failed(Box::new(error)))
                    }
                    other => Err(format!(
                        "the creation of a placement group {} was answered {other:?}",
                        if invalid { "without bundles" } else { "that the head accepts" }
                    )),
                }
            }
            (Kind::GroupReady { group, after_removal }, done) => {
                let g = self.groups.get(usize::from(*group));
                let (bundles, removing) = g.map_or((0, false), |g| (g.bundles.len(), g.removing));
                // After a head restart a request is asked again, maybe after the removal.
                let resumed = self.track.journal_id.is_some() && removing;
                match done {
                    Done::Value(bytes) => match rmp_serde::from_slice::<Vec<String>>(&bytes) {
                        Err(e) => Err(format!("the answer to GroupReady is not a list of node names: {e}")),
                        Ok(nodes) if nodes.len() != bundles => {
                            Err(format!("GroupReady named {} node(s) for {bundles} bundle(s)", nodes.len()))
                        }
                        Ok(_) if *after_removal => {
                            Err("GroupReady, asked after the group was removed, said it is placed".into())
                        }
                        Ok(_) => {
                            group_now = Some((*group, GroupState::Ready));
                            Ok(State::Succeeded)
                        }
                    },
                    Done::Failed(TaskError::PlacementGroup { group: named, problem })
                        if g.is_some_and(|g| named == g.id.to_string()) =>
                    {
                        let explained = match &problem {
                            GroupProblem::Infeasible { .. } => !*after_removal,
                            GroupProblem::Removed => removing,
                            GroupProblem::Unknown => *after_removal || resumed,
                            _ => false,
                        };
                        if matches!(problem, GroupProblem::Infeasible { .. }) {
                            group_now = Some((*group, GroupState::Infeasible));
                        }
                        let error = TaskError::PlacementGroup { group: named, problem };
                        if explained {
                            Ok(State::Failed(Box::new(error)))
                        } else {
                            Err(format!(
                                "GroupReady{} failed with {error:?}, which nothing in the run explains",
                                if *after_removal { " (asked after the removal)" } else { "" }
                            ))
                        }
                    }
                    other => Err(format!("GroupReady was answered {other:?}")),
                }
            }
            (Kind::GroupRemove { .. }, Done::Value(_)) => Ok(State::Succeeded),
            (Kind::Lookup { namespace, name }, Done::Value(bytes)) => {
                match rmp_serde::from_slice::<Option<ServiceInfo>>(&bytes) {
                    Err(e) => Err(format!("the answer to a lookup is not an Option<ServiceInfo>: {e}")),
                    Ok(found) => {
                        let (ns, n) =
                            (NAMESPACES[usize::from(*namespace)], SERVICE_NAMES[usize::from(*name)]);
                        match found {
                            Some(info) if info.namespace != ns || info.name != n => {
                                Err(format!("looked up {ns}/{n} but found {info:?}"))
                            }
                            Some(info) => {
                                self.services.insert(info.id, info.name);
                                Ok(State::Succeeded)
                            }
                            None => Ok(State::Succeeded),
                        }
                    }
                }
            }
            (_, done) => Err(format!("an unexpected answer {done:?}")),
        };
        let state = verdict.map_err(|why| format!("driver {me}, {task_id}: {why}"))?;
        if let Some(group) = asked_ready
            && let Some(g) = self.groups.get_mut(usize::from(group))
        {
            g.asking = None;
            if let Some((_, state)) = group_now {
                g.state = state;
            }
        }
        self.outcomes += 1;
        let Some(task) = self.task_mut(seq) else { return Ok(()) };
        task.outcomes += 1;
        let settled = !matches!(state, State::Fetching { .. });
        task.state = state;
        let counted = !task.released_early && task.awaited;
        let function = matches!(task.kind, Kind::Function { .. });
        if settled && counted {
            self.awaiting -= 1;
            if function {
                self.awaiting_functions -= 1;
            }
        }
        Ok(())
    }

    fn check_value(&self, task: &DriverTask, expected: Expected, value: &[u8]) -> Result {
        if expected.failure == ExpectedFailure::Always {
            return Err(format!(
                "got a value ({} bytes) where the function fails on every attempt",
                value.len()
            ));
        }
        if (model::digest(value), value.len() as u32) != (expected.digest, expected.len) {
            return Err(format!(
                "got {} bytes (digest {:016x}) where {} bytes (digest {:016x}) were expected",
                value.len(),
                model::digest(value),
                expected.len,
                expected.digest
            ));
        }
        if let Some(dep) = self.deps_failed(task) {
            return Err(format!("got a value although its argument task #{dep} failed"));
        }
        Ok(())
    }

    pub(crate) fn fetched(&mut self, task_id: TaskId, outcome: Option<Outcome>) -> Result {
        let seq = task_id.seq();
        let me = self.index;
        let Some(task) = self.task(seq) else {
            return Err(format!("driver {me} was sent {task_id}'s value, which it never submitted"));
        };
        let (State::Fetching { len }, Kind::Function { expected, .. }) = (&task.state, &task.kind) else {
            return Err(format!(
                "driver {me} was sent {task_id}'s value without asking (it is {:?})",
                task.state
            ));
        };
        let verdict = match outcome {
            Some(Outcome::Value(value)) if value.len() as u64 == *len => {
                self.check_value(task, *expected, &value)
            }
            Some(Outcome::Value(value)) => Err(format!("announced {len} bytes, fetched {}", value.len())),
            other => Err(format!("a value it still holds was fetched as {other:?}")),
        };
        verdict.map_err(|why| format!("driver {me}, fetching {task_id}: {why}"))?;
        if let Some(task) = self.task_mut(seq) {
            task.state = State::Succeeded;
            if !task.released_early {
                self.awaiting -= 1;
                self.awaiting_functions -= 1;
            }
        }
        Ok(())
    }

    /// Once the run has drained: every task it still wanted was answered once, and each
    /// `DependencyFailed` names a dependency that did fail, with its cause.
    pub(crate) fn final_check(&self) -> Result {
        let me = self.index;
        let session = self.session.unwrap_or(SessionId(0));
        for (i, task) in self.tasks.iter().enumerate() {
            let id = TaskId::new(session, i as u64 + 1);
            if !task.released_early
                && task.awaited
                && !matches!(task.state, State::Succeeded | State::Failed(_))
            {
                return Err(format!("driver {me}: {id} never got its outcome ({:?})", task.state));
            }
            if let State::Failed(error) = &task.state
                && let TaskError::DependencyFailed { dependency, cause, .. } = &**error
                && let Some(dep) = self.task(dependency.seq())
            {
                match &dep.state {
                    State::Failed(dep_error) if same_cause(dep_error, cause) => {}
                    State::Pending if dep.released_early => {}
                    other => {
                        return Err(format!(
                            "driver {me}: {id} failed because {dependency} failed with {cause:?}, but that ended {other:?}"
                        ));
                    }
                }
            }
        }
        Ok(())
    }

    /// Up to `max` tasks it still waits for, for a message about a run that does not drain.
    pub(crate) fn waiting_for(&self, max: usize) -> Vec<TaskId> {
        let session = self.session.unwrap_or(SessionId(0));
        self.tasks
            .iter()
            .enumerate()
            .filter(|(_, t)| {
                !t.released_early && t.awaited && !matches!(t.state, State::Succeeded | State::Failed(_))
            })
            .take(max)
            .map(|(i, _)| TaskId::new(session, i as u64 + 1))
            .collect()
    }
}
