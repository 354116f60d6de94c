//! A deterministic simulator of a whole cluster around the real [`HeadCore`](crate::HeadCore)
//! (and the real scheduler inside it), in the style of FoundationDB's simulation and
//! TigerBeetle's VOPR: one
//! `u64` seed decides everything, a run takes no wall-clock time, and a failing seed replays
//! the same run step for step.
//!
//! What it models:
//!
//! - **Workers** join with random resources (`CPU`, `adder`, `gpu`, `svc`), a random subset of
//!   a fixed set of functions and the one service type (now and then from another build, so with
//!   another signature hash), heartbeat, run what they are sent for a random time and report
//!   it (values derived from the function and its arguments, application errors for some
//!   inputs, some only on a first attempt), tell the head when a task blocks (its CPU returns),
//!   finish cancelled tasks early (or not: some never look), host service instances and serve
//!   their calls; some instances watch results as the cache does (`WatchResults` from the
//!   constructor, then the head's `write` calls). Worker slot 0 offers everything, so every
//!   task that can run some day does.
//! - **Drivers** submit tasks with value and ref arguments (results of functions and of service
//!   calls), tags, random retry policies, cancel some, give up on tasks reported infeasible,
//!   fetch values announced as `Stored`, release refs (some before the task ended), set their
//!   job's settings (now and then a stale revision), and start, call, look up and stop services.
//!   Some (chosen from the seed) create placement groups of 1 to 3 bundles with a random
//!   strategy (now and then one no node can hold, or one without bundles), ask when they are
//!   ready, submit some tasks into a bundle or into any bundle (now and then one the head must
//!   refuse: a bundle the group lacks, a request larger than its bundle, a group already
//!   removed), ask again whether an infeasible group fits now, and remove their groups, or
//!   leave some to their job's end: such a driver's program ends (its session closes) once it
//!   has what it wanted. Tasks and `ready` requests that wait too long in a group are given up
//!   on (another group may hold the room they need).
//! - **The network**: each connection delivers in order per direction (a QUIC stream), with
//!   random delays that interleave connections arbitrarily. Large frames arrive slowly and the
//!   head hears their first bytes ([`HeadCore::heard`](crate::HeadCore::heard)).
//! - **Faults** (with [`Config::faults`]): a worker process dies (its connection closes:
//!   `close_session`) and starts again later as a new node; a worker freezes for less or more
//!   than the heartbeat timeout (the head writes it off in `handle_timeout` and closes it; when
//!   it thaws, what it sends on the closed connection is dropped, or fed to the core as a late
//!   frame that must change nothing, and it joins again as a new session); a driver dies and
//!   another run of the program takes over what was left to submit.
//! - **Time** is virtual: `Instant::now()` once, then `base + offset`. The head's timer is
//!   honoured: whenever the next event would come after
//!   [`HeadCore::poll_timeout`](crate::HeadCore::poll_timeout),
//!   [`HeadCore::handle_timeout`](crate::HeadCore::handle_timeout) runs first, at the deadline.
//!
//! What it checks, at each step (a peer's checks as the message arrives, the cluster's as the
//! head sends it, a sweep of the core's own consistency after every step or spaced out for
//! large runs) and once the cluster is idle: every task of a live driver gets exactly one
//! outcome and it is the right one (the right value, or a failure something in the run
//! explains: a failing input, a cancel, a lost worker once retries ran out, a failed
//! dependency with its cause, a function no open node offers); no worker is ever given more
//! than its resources, a function it does not offer with the caller's signature, or a call for
//! an instance it does not serve; a task runs on one live node at a time with growing attempt
//! numbers within its `max_retries`, with its job's settings of a revision no older than at its
//! submission; the head names one live instance per service name and never an older one again;
//! a watched result is written to its watchers (the value a task returned, only what their rules
//! ask for) before its owner is told; a frame from a closed session changes nothing; and when the
//! cluster is idle every node's free resources equal its capacity and the head holds no task.
//!
//! Placement groups are checked from outside the scheduler: where the head holds each bundle is
//! read after every input (what `GroupReady` would answer), and since bundles are reserved all
//! at once and stay until their node is lost, the simulator knows where every bundle is (see
//! `groups`). A placed group's bundles are on connected nodes, as its strategy promises
//! (STRICT_PACK on one node, STRICT_SPREAD on distinct ones), within each node's capacity; a
//! bundle never moves while its node stays (only the lost node's bundles are placed again); a
//! pending group is reported infeasible exactly when no placement on the connected nodes, as
//! if idle, exists (an exhaustive search, its kept bundles staying where they are); a task in a
//! bundle runs on that bundle's node (in any bundle: on a node holding one), and the tasks in a
//! bundle never request more than it reserves; no node has more free than its capacity less
//! what groups reserve there; a group goes with its job; refusals, removals and the
//! cancellations they cause are what the driver predicts; and once idle, every group left holds
//! exactly its bundles and none that the free room could place is still pending.
//!
//! Replaying a seed: a [`Failure`] prints its seed, step and the command that runs it again,
//! `cargo xtask simulate --seed S ...`, or from a test `sim::run(&Config { seed: S, .. })` with
//! the configuration it printed.
//!
//! **Head crashes** (with [`Config::head_crashes`], one fault among the others): the head keeps
//! a journal (`journal_id: Some(1)`); the simulator keeps every `Action::Keep` and a durable
//! prefix that grows by group commits at random moments, holds every frame and close decided
//! after a not yet durable entry until it is durable (as the runtime does), and tells each
//! session how far its messages are durable (`Durable { through }`). A crash drops the core,
//! every frame in flight either way and every connection, and keeps only the durable prefix;
//! after a random downtime the head is rebuilt with `HeadCore::recover`. Peers notice the lost
//! connection, dial again until the head answers and send `Resume` as the real client does
//! (frames numbered, state-changing ones kept until durable and sent again after the
//! `resumed_through` of the welcome, the runs a worker knows, the tasks a driver waits for,
//! unanswered lookups and stops asked again), or join afresh if they have no session to take
//! up. On top of the invariants above: no outcome a driver was told is contradicted, nothing
//! the head said was durable is lost, and a task runs again only if its worker's session ended
//! or its run failed with an application error.

mod driver;
mod groups;
mod model;
mod net;
mod resume;
mod rng;
mod worker;
mod world;

#[cfg(test)]
mod tests;

pub use rng::Rng;

use std::fmt;
use std::time::Duration;

/// One simulated run: a seed and the shape of the cluster.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Config {
    /// Decides every choice of the run: one seed, one run.
    pub seed: u64,
    /// Worker slots: a crashed worker starts again later in its slot, as a new node.
    pub workers: usize,
    /// Driver programs running at once: a crashed one is followed by another run of it.
    pub drivers: usize,
    /// Function tasks the drivers submit in all (service requests come on top).
    pub tasks: u64,
    /// Crash and freeze workers, crash drivers.
    pub faults: bool,
    /// Drivers start, call, look up and stop services.
    pub services: bool,
    /// Some drivers create placement groups, run tasks in their bundles and remove them.
    pub groups: bool,
    /// Some service constructors fail.
    pub constructor_failures: bool,
    /// Drivers pass results of service calls as arguments to functions (the API allows it).
    pub refs_to_call_results: bool,
    /// Check that no other instance of a service name is constructed and serving on an open
    /// node when the head names one (not only that the head's registry names one).
    pub strict_service_names: bool,
    /// How often workers send a heartbeat ([`crate::CoreOptions::heartbeat`]), virtual time.
    pub heartbeat: Duration,
    /// How long the head waits for a silent worker before writing it off
    /// ([`crate::CoreOptions::heartbeat_timeout`]), virtual time.
    pub heartbeat_timeout: Duration,
    /// The mean time between two faults.
    pub fault_interval: Duration,
    /// Tasks each driver keeps in flight at most.
    pub window: usize,
    /// Of frames arriving on connections the head closed, how many (per mille) are still fed to
    /// the core, as when a frame was decoded just before the close.
    pub late_frames_per_mille: u32,
    /// Sweep the core's consistency after every step (else spaced out by the head's size).
    pub check_every_step: bool,
    /// The head keeps a journal, crashes now and then (one of the faults, so only with
    /// `faults`) and starts again from what of it was durable; peers take up their sessions.
    pub head_crashes: bool,
    /// Keep the last events whose description contains this text (and the head's crashes and
    /// restarts), to print with a failure. It changes nothing in the run.
    pub trace: Option<String>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            seed: 0,
            workers: 6,
            drivers: 3,
            tasks: 150,
            faults: true,
            services: true,
            groups: true,
            constructor_failures: true,
            refs_to_call_results: true,
            strict_service_names: true,
            heartbeat: Duration::from_millis(100),
            heartbeat_timeout: Duration::from_millis(400),
            fault_interval: Duration::from_millis(150),
            window: 12,
            late_frames_per_mille: 500,
            check_every_step: true,
            head_crashes: false,
            trace: None,
        }
    }
}

impl Config {
    /// A configuration for a large run: tasks kept in flight in proportion to the workers, the
    /// core's consistency swept in proportion to its size instead of after every step.
    pub fn at_scale(seed: u64, workers: usize, drivers: usize, tasks: u64) -> Config {
        let drivers = drivers.max(1);
        Config {
            seed,
            workers,
            drivers,
            tasks,
            window: (workers * 4 / drivers).max(64),
            check_every_step: false,
            ..Config::default()
        }
    }

    /// The steps after which a run that has not drained is a failure.
    fn max_steps(&self) -> u64 {
        2_000_000 + 200 * self.tasks + 20_000 * self.workers as u64
    }

    /// The virtual time after which a run that has not drained is a failure.
    fn max_virtual_time(&self) -> Duration {
        Duration::from_secs(3_600) + self.heartbeat_timeout * 100
    }

    /// How to run this configuration again: the `cargo xtask simulate` command, with a flag
    /// for each setting that differs from [`Config::at_scale`].
    pub fn replay(&self) -> String {
        let base = Config::at_scale(self.seed, self.workers, self.drivers, self.tasks);
        let mut command = format!(
            "cargo xtask simulate --seed {} --workers {} --drivers {} --tasks {}",
            self.seed, self.workers, self.drivers, self.tasks
        );
        let mut flag = |differs: bool, text: String| {
            if differs {
                command.push(' ');
                command.push_str(&text);
            }
        };
        flag(!self.faults, "--no-faults".into());
        flag(!self.services, "--no-services".into());
        flag(!self.constructor_failures, "--no-constructor-failures".into());
        flag(!self.refs_to_call_results, "--no-call-refs".into());
        flag(!self.strict_service_names, "--no-strict-service-names".into());
        flag(self.heartbeat != base.heartbeat, format!("--heartbeat-ms {}", self.heartbeat.as_millis()));
        flag(
            self.heartbeat_timeout != base.heartbeat_timeout,
            format!("--heartbeat-timeout-ms {}", self.heartbeat_timeout.as_millis()),
        );
        flag(
            self.fault_interval != base.fault_interval,
            format!("--fault-interval-ms {}", self.fault_interval.as_millis()),
        );
        flag(self.window != base.window, format!("--window {}", self.window));
        flag(
            self.late_frames_per_mille != base.late_frames_per_mille,
            format!("--late-frames-per-mille {}", self.late_frames_per_mille),
        );
        flag(self.check_every_step, "--check-every-step".into());
        flag(self.head_crashes, "--head-crashes".into());
        // Whole milliseconds are what the flags can say.
        let whole_ms = |d: Duration| d.as_micros().is_multiple_of(1000);
        // Nor has `cargo xtask simulate` a flag for runs without placement groups.
        let expressible = whole_ms(self.heartbeat)
            && whole_ms(self.heartbeat_timeout)
            && whole_ms(self.fault_interval)
            && self.groups;
        if expressible { command } else { format!("sim::run(&{self:?})") }
    }
}

/// Faults injected and their effects.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Faults {
    /// Worker processes that died (their connections closed).
    pub worker_crashes: u64,
    /// Workers that froze for a while (some past the heartbeat timeout).
    pub freezes: u64,
    /// Workers the head wrote off (it closed their connection).
    pub written_off: u64,
    /// Worker sessions the head closed because the worker joined again from its host.
    pub replaced: u64,
    /// Driver processes that died (another run of the program took over).
    pub driver_crashes: u64,
    /// Times the head crashed and started again from its journal.
    pub head_crashes: u64,
}

/// What a run did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Report {
    /// The run's seed, [`Config::seed`].
    pub seed: u64,
    /// Inputs to the head and peer actions, one event each.
    pub steps: u64,
    /// Placement decisions the head sent out (`Execute` and `StartInstance`).
    pub dispatches: u64,
    /// The most tasks the scheduler held queued at once.
    pub largest_queue: usize,
    /// Virtual time from the first event to the idle cluster.
    pub elapsed: Duration,
    /// Function tasks submitted.
    pub tasks: u64,
    /// Outcomes drivers received.
    pub outcomes: u64,
    /// Actions the head emitted.
    pub frames: u64,
    /// The faults injected, and what the head did about them.
    pub faults: Faults,
    /// Frames from closed sessions fed to the core (each changed nothing).
    pub late_frames: u64,
    /// Frames the head addressed to sessions it had closed (dropped, as the runtime does).
    pub sends_after_close: u64,
    /// Times the journal was compacted to a snapshot (with head crashes).
    pub compactions: u64,
    /// What the placement groups of the run did.
    pub groups: GroupCounts,
    /// A digest of every action the head emitted, in order: one seed, one digest.
    pub digest: u64,
}

/// What placement groups did in a run, as the simulator saw it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct GroupCounts {
    /// Groups drivers created (refused ones not counted).
    pub created: u64,
    /// Times a group was seen with every bundle reserved after it had not been (placed, or
    /// placed again after a lost node took some of its bundles).
    pub placed: u64,
    /// Bundles whose node was lost while they were reserved there.
    pub bundles_lost: u64,
    /// `GroupReady` answers that named the group's nodes.
    pub ready: u64,
    /// `GroupReady` answers that the connected nodes cannot hold the group.
    pub infeasible: u64,
    /// Dispatches of tasks into a bundle.
    pub tasks: u64,
    /// Groups seen gone (removed by their driver, or with its job).
    pub removed: u64,
}

/// A broken invariant: where, and how to see it again.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Failure {
    /// The run's seed.
    pub seed: u64,
    /// The step at which the invariant broke (counted as [`Report::steps`] are).
    pub step: u64,
    /// Virtual time of the step.
    pub at: Duration,
    /// What is wrong, in words.
    pub message: String,
    /// The command that replays the run.
    pub replay: String,
    /// The last events that mention [`Config::trace`], oldest first.
    pub trace: Vec<String>,
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "simulation seed {} failed at step {} ({:?} virtual): {}\n  replay: {}",
            self.seed, self.step, self.at, self.message, self.replay
        )?;
        for line in &self.trace {
            write!(f, "\n    {line}")?;
        }
        Ok(())
    }
}

impl std::error::Error for Failure {}

/// Runs one simulation to the idle cluster, checking every invariant on the way.
pub fn run(config: &Config) -> Result<Report, Failure> {
    world::World::new(config).run()
}
