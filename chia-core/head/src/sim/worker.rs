//! A simulated worker: joins with an offer, heartbeats, runs what the head sends for a random
//! time and reports it, hosts service instances. It checks what it is given against what it
//! offered: never more than its resources at once, never a function it does not link with the
//! caller's signature, never a call for an instance it does not host.

use super::model::{self, Build, Catalog, Constructor, FUNCTIONS, METHODS, Offer, WATCH_METHOD};
use super::net::Micros;
use super::resume::Tracker;
use super::rng::Rng;
use chia_core::protocol::{ArgValue, Outcome, PROTOCOL_VERSION, PeerToHead, ResumeSession, WorkerOffer};
use chia_core::{NodeId, Resources, ServiceId, SessionId, TaskError, TaskId};
use std::collections::HashMap;

/// Timers a worker sets; each names the task or instance it is for, so one that fires after
/// its task ended (cancelled early, or the worker lost its connection) finds nothing to do.
#[derive(Clone, Debug)]
pub(crate) enum WorkerTimer {
    Heartbeat,
    TaskDone {
        task: TaskId,
        attempt: u32,
    },
    /// The task waits on other tasks (a nested get): it tells the head its CPU is free.
    Block {
        task: TaskId,
        attempt: u32,
    },
    Constructed {
        task: TaskId,
        service: ServiceId,
    },
    CallDone {
        task: TaskId,
    },
    /// The process starts again after a crash or a lost connection.
    Restart,
}

/// What a handler asks the world to do.
pub(crate) struct Effects<T> {
    pub(crate) sends: Vec<PeerToHead>,
    /// `(delay, timer)`.
    pub(crate) timers: Vec<(Micros, T)>,
}

impl<T> Default for Effects<T> {
    fn default() -> Self {
        Effects { sends: Vec::new(), timers: Vec::new() }
    }
}

/// The worker's connection, as the worker sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Link {
    /// Not running (crashed, or waiting to join again).
    Down,
    /// Said hello on `conn`, no welcome yet.
    Joining {
        conn: usize,
    },
    Joined {
        conn: usize,
        session: SessionId,
        node: NodeId,
        name: String,
    },
}

struct Running {
    attempt: u32,
    function: usize,
    request: Resources,
    cpu_given_back: bool,
    outcome: Outcome,
}

struct Instance {
    creation: TaskId,
    request: Resources,
    constructor: Constructor,
    constructed: bool,
    stopping: bool,
    calls: u32,
}

/// An instance the head asks a worker to construct, and what the starter asked it to hold.
pub(crate) struct Placement<'a> {
    pub(crate) task: TaskId,
    pub(crate) service: ServiceId,
    pub(crate) type_name: &'a str,
    pub(crate) args: Vec<ArgValue>,
    pub(crate) request: &'a Resources,
}

/// What the world knows of a task it hands to the worker (from the driver that submitted it).
pub(crate) struct TaskFacts {
    pub(crate) function: usize,
    pub(crate) request: Resources,
}

pub(crate) struct SimWorker {
    pub(crate) slot: usize,
    /// Counts the process's starts; timers of an earlier life are ignored.
    pub(crate) life: u32,
    pub(crate) offer: Offer,
    pub(crate) link: Link,
    free: Resources,
    running: HashMap<TaskId, Running>,
    instances: HashMap<ServiceId, Instance>,
    calls: HashMap<TaskId, (ServiceId, Vec<u8>)>,
    heartbeat: Micros,
    rng: Rng,
    pub(crate) tasks_run: u64,
    /// Its side of taking up the session after a head restart.
    pub(crate) track: Tracker,
}

type Result<T = ()> = std::result::Result<T, String>;

impl SimWorker {
    pub(crate) fn new(slot: usize, offer: Offer, rng: Rng) -> SimWorker {
        SimWorker {
            slot,
            life: 0,
            free: offer.capacity.clone(),
            offer,
            link: Link::Down,
            running: HashMap::new(),
            instances: HashMap::new(),
            calls: HashMap::new(),
            heartbeat: 0,
            rng,
            tasks_run: 0,
            track: Tracker::default(),
        }
    }

    pub(crate) fn conn(&self) -> Option<usize> {
        match self.link {
            Link::Down => None,
            Link::Joining { conn } | Link::Joined { conn, .. } => Some(conn),
        }
    }

    pub(crate) fn session(&self) -> Option<SessionId> {
        match self.link {
            Link::Joined { session, .. } => Some(session),
            _ => None,
        }
    }

    pub(crate) fn node(&self) -> Option<(NodeId, &str)> {
        match &self.link {
            Link::Joined { node, name, .. } => Some((*node, name.as_str())),
            _ => None,
        }
    }

    /// Nothing runs here: no task, instance or call.
    pub(crate) fn is_idle(&self) -> bool {
        self.running.is_empty() && self.instances.is_empty() && self.calls.is_empty()
    }

    fn describe(&self) -> String {
        match &self.link {
            Link::Joined { node, name, .. } => format!("worker {} ({name}, {node})", self.slot),
            _ => format!("worker {}", self.slot),
        }
    }

    /// The process (re)starts on connection `conn`: everything it ran before is gone.
    pub(crate) fn start(&mut self, conn: usize, catalog: &Catalog) -> PeerToHead {
        self.reset();
        self.life += 1;
        self.link = Link::Joining { conn };
        PeerToHead::Hello {
            protocol_version: PROTOCOL_VERSION,
            name: format!("w{}", self.slot),
            worker: Some(WorkerOffer {
                resources: self.offer.capacity.clone(),
                functions: self.offer.function_keys(catalog),
                services: self.offer.service_keys(catalog),
                head_node: false,
                labels: self.offer.labels.clone(),
            }),
        }
    }

    /// The process died or lost its connection: what it ran is gone with it.
    pub(crate) fn reset(&mut self) {
        self.link = Link::Down;
        self.running.clear();
        self.instances.clear();
        self.calls.clear();
        self.free = self.offer.capacity.clone();
        self.track = Tracker::default();
        // Timers of this life must not act on the next one.
        self.life += 1;
    }

    pub(crate) fn welcome(
        &mut self,
        fx: &mut Effects<WorkerTimer>,
        session: SessionId,
        node: Option<NodeId>,
        name: String,
        heartbeat_ms: u64,
        journal_id: Option<u64>,
    ) -> Result {
        let Link::Joining { conn } = self.link else {
            return Err(format!("{} got a second welcome", self.describe()));
        };
        let Some(node) = node else {
            return Err(format!("{} joined with an offer but was welcomed without a node", self.describe()));
        };
        if heartbeat_ms == 0 {
            return Err(format!("{} was welcomed as a node without a heartbeat period", self.describe()));
        }
        self.link = Link::Joined { conn, session, node, name };
        self.track = Tracker { journal_id, ..Tracker::default() };
        self.heartbeat = heartbeat_ms * 1000;
        fx.timers.push((self.heartbeat, WorkerTimer::Heartbeat));
        Ok(())
    }

    /// The head is gone: take up the session on `conn`, if the head keeps a journal. The
    /// `Resume` to send, or `None` if it must join afresh.
    pub(crate) fn resume(&mut self, conn: usize) -> Option<PeerToHead> {
        let journal_id = self.track.journal_id?;
        let Link::Joined { conn: at, session, .. } = &mut self.link else { return None };
        *at = conn;
        let session = *session;
        self.track.lost();
        self.track.resuming = true;
        Some(PeerToHead::Resume(ResumeSession {
            protocol_version: PROTOCOL_VERSION,
            session,
            journal_id,
            known: self.track.known(),
            waiting: Vec::new(),
            starts: Vec::new(),
        }))
    }

    pub(crate) fn execute(
        &mut self,
        fx: &mut Effects<WorkerTimer>,
        task: TaskId,
        attempt: u32,
        function: &str,
        args: Vec<ArgValue>,
        facts: &TaskFacts,
    ) -> Result {
        let f = facts.function;
        let who = self.describe();
        let Some(def) = FUNCTIONS.get(f) else {
            return Err(format!("{who} was sent {task} of a function no worker links ({function})"));
        };
        if function != def.name {
            return Err(format!(
                "{who} was sent {task} as {function:?}, but it was submitted as {:?}",
                def.name
            ));
        }
        match self.offer.functions[f] {
            Some(Build::Same) => {}
            Some(Build::Other) => {
                return Err(format!(
                    "{who} was sent {task} of {function}, which it links with another signature than the caller's"
                ));
            }
            None => return Err(format!("{who} was sent {task} of {function}, which it does not offer")),
        }
        if let Some(running) = self.running.get(&task) {
            return Err(format!(
                "{who} was sent attempt {attempt} of {task} while it still runs attempt {}",
                running.attempt
            ));
        }
        if !self.free.covers(&facts.request) {
            return Err(format!(
                "{who} was sent {task} needing {} while only {} of its {} is free",
                facts.request, self.free, self.offer.capacity
            ));
        }
        self.free.take(&facts.request);
        let args: Vec<Vec<u8>> = args.into_iter().map(|a| a.0).collect();
        #[allow(unused_mut, reason = "changed only by a test's sabotage")]
        let mut outcome = model::run_function(f, &args, attempt);
        #[cfg(test)]
        if crate::planted::sabotaged(crate::planted::Sabotage::WrongValue)
            && self.tasks_run == 3
            && let Outcome::Value(value) = &mut outcome
            && let Some(byte) = value.first_mut()
        {
            *byte ^= 1;
        }
        let took = self.rng.range(def.run_us.0, def.run_us.1);
        fx.timers.push((took, WorkerTimer::TaskDone { task, attempt }));
        if facts.request.get("CPU") > chia_core::ResourceAmount::ZERO && self.rng.chance(50) {
            fx.timers.push((took / 2, WorkerTimer::Block { task, attempt }));
        }
        self.running.insert(
            task,
            Running { attempt, function: f, request: facts.request.clone(), cpu_given_back: false, outcome },
        );
        self.tasks_run += 1;
        fx.sends.push(PeerToHead::Started { task, attempt });
        Ok(())
    }

    /// The task ends now with `outcome` (or the one it computed): its resources are free
    /// before the head hears of it.
    fn finish(&mut self, fx: &mut Effects<WorkerTimer>, task: TaskId, outcome: Option<Outcome>) {
        let Some(run) = self.running.remove(&task) else { return };
        let mut held = run.request;
        if run.cpu_given_back {
            let _ = held.set("CPU", chia_core::ResourceAmount::ZERO);
        }
        self.free.give_back(&held, &self.offer.capacity);
        let outcome = outcome.unwrap_or(run.outcome);
        fx.sends.push(PeerToHead::Finished { task, attempt: run.attempt, outcome });
    }

    pub(crate) fn cancel(&mut self, fx: &mut Effects<WorkerTimer>, task: TaskId, force: bool) {
        let Some(run) = self.running.get(&task) else { return };
        // Some tasks never look at their cancellation and finish as usual; the head reports
        // them cancelled all the same.
        if force || self.rng.chance(700) {
            let function = FUNCTIONS[run.function].name.to_string();
            self.finish(fx, task, Some(Outcome::Failed(TaskError::Cancelled { function })));
        }
    }

    pub(crate) fn start_instance(
        &mut self,
        fx: &mut Effects<WorkerTimer>,
        catalog: &Catalog,
        placement: Placement<'_>,
    ) -> Result {
        let Placement { task, service, type_name, args, request } = placement;
        let who = self.describe();
        if type_name != catalog.service.name {
            return Err(format!("{who} was asked to construct {service} of unknown type {type_name:?}"));
        }
        match self.offer.service {
            Some(Build::Same) => {}
            Some(Build::Other) => {
                return Err(format!(
                    "{who} was asked to host {service}, a service type it links with another signature"
                ));
            }
            None => {
                return Err(format!("{who} was asked to host {service}, a service type it does not offer"));
            }
        }
        if self.instances.contains_key(&service) {
            return Err(format!("{who} was asked to construct {service}, which it already hosts"));
        }
        if !self.free.covers(request) {
            return Err(format!(
                "{who} was asked to host {service} needing {request} while only {} of its {} is free",
                self.free, self.offer.capacity
            ));
        }
        let args: Vec<Vec<u8>> = args.into_iter().map(|a| a.0).collect();
        let Some(constructor) = Constructor::read(&args) else {
            return Err(format!("{who} was asked to construct {service} with arguments no driver sent"));
        };
        self.free.take(request);
        self.instances.insert(
            service,
            Instance {
                creation: task,
                request: request.clone(),
                constructor,
                constructed: false,
                stopping: false,
                calls: 0,
            },
        );
        fx.timers.push((self.rng.range(1_000, 20_000), WorkerTimer::Constructed { task, service }));
        Ok(())
    }

    fn drop_instance(&mut self, fx: &mut Effects<WorkerTimer>, service: ServiceId, say: bool) {
        if let Some(instance) = self.instances.remove(&service) {
            self.free.give_back(&instance.request, &self.offer.capacity);
            if say {
                fx.sends.push(PeerToHead::InstanceStopped { service });
            }
        }
    }

    pub(crate) fn call_instance(
        &mut self,
        fx: &mut Effects<WorkerTimer>,
        task: TaskId,
        service: ServiceId,
        method: &str,
        args: Vec<ArgValue>,
    ) -> Result {
        let who = self.describe();
        let Some(instance) = self.instances.get_mut(&service) else {
            return Err(format!("{who} was sent call {task} for {service}, which it does not host"));
        };
        if !instance.constructed || instance.stopping {
            let state = if instance.stopping { "being stopped" } else { "still being constructed" };
            return Err(format!("{who} was sent call {task} for {service}, which is {state}"));
        }
        if self.calls.contains_key(&task) {
            return Err(format!("{who} was sent call {task} twice"));
        }
        let args: Vec<Vec<u8>> = args.into_iter().map(|a| a.0).collect();
        let value = if method == WATCH_METHOD {
            if !instance.constructor.watches {
                return Err(format!(
                    "{who} was sent a result to write ({task}) for {service}, which watches nothing"
                ));
            }
            let readable = match args.as_slice() {
                [tag, value] => {
                    rmp_serde::from_slice::<String>(tag).is_ok()
                        && rmp_serde::from_slice::<serde_bytes::ByteBuf>(value).is_ok()
                }
                _ => false,
            };
            if !readable {
                return Err(format!("{who} was sent a result to write ({task}) that is not (tag, value)"));
            }
            rmp_serde::to_vec_named(&()).unwrap_or_default()
        } else {
            let Some(m) = METHODS.iter().position(|&known| known == method) else {
                return Err(format!("{who} was sent call {task} of unknown method {method:?}"));
            };
            model::run_method(m, &args)
        };
        instance.calls += 1;
        self.calls.insert(task, (service, value));
        fx.timers.push((self.rng.range(200, 10_000), WorkerTimer::CallDone { task }));
        Ok(())
    }

    pub(crate) fn stop_instance(&mut self, fx: &mut Effects<WorkerTimer>, service: ServiceId) {
        let Some(instance) = self.instances.get_mut(&service) else {
            // Asked again for one it dropped already (or whose constructor failed): harmless.
            return;
        };
        if instance.constructed && instance.calls == 0 {
            self.drop_instance(fx, service, true);
        } else {
            instance.stopping = true;
        }
    }

    pub(crate) fn timer(&mut self, fx: &mut Effects<WorkerTimer>, timer: WorkerTimer) {
        match timer {
            WorkerTimer::Heartbeat => {
                if let Link::Joined { .. } = self.link {
                    fx.sends.push(PeerToHead::Heartbeat);
                    fx.timers.push((self.heartbeat, WorkerTimer::Heartbeat));
                }
            }
            WorkerTimer::TaskDone { task, attempt } => {
                if self.running.get(&task).is_some_and(|r| r.attempt == attempt) {
                    self.finish(fx, task, None);
                }
            }
            WorkerTimer::Block { task, attempt } => {
                if let Some(run) =
                    self.running.get_mut(&task).filter(|r| r.attempt == attempt && !r.cpu_given_back)
                {
                    run.cpu_given_back = true;
                    let cpu = Resources::new().with("CPU", run.request.get("CPU")).unwrap_or_default();
                    self.free.give_back(&cpu, &self.offer.capacity);
                    fx.sends.push(PeerToHead::Blocked { task });
                }
            }
            WorkerTimer::Constructed { task, service } => {
                let Some(instance) = self.instances.get_mut(&service).filter(|i| i.creation == task) else {
                    return;
                };
                if instance.constructor.fails {
                    let error = TaskError::Application {
                        function: "Counter.new".into(),
                        message: format!("{} refuses to start", instance.constructor.name),
                    };
                    self.drop_instance(fx, service, false);
                    fx.sends.push(PeerToHead::Finished { task, attempt: 0, outcome: Outcome::Failed(error) });
                    return;
                }
                instance.constructed = true;
                let stop_now = instance.stopping;
                if instance.constructor.watches {
                    // As the cache's constructor does: before it counts as started.
                    let rules = model::watch_rules();
                    fx.sends.push(PeerToHead::WatchResults { task, method: WATCH_METHOD.into(), rules });
                }
                fx.sends.push(PeerToHead::Finished { task, attempt: 0, outcome: Outcome::Value(Vec::new()) });
                if stop_now {
                    self.drop_instance(fx, service, true);
                }
            }
            WorkerTimer::CallDone { task } => {
                let Some((service, value)) = self.calls.remove(&task) else { return };
                fx.sends.push(PeerToHead::Finished { task, attempt: 0, outcome: Outcome::Value(value) });
                let Some(instance) = self.instances.get_mut(&service) else { return };
                instance.calls -= 1;
                if instance.stopping && instance.calls == 0 {
                    self.drop_instance(fx, service, true);
                }
            }
            WorkerTimer::Restart => {}
        }
    }

    /// Constructed instances it hosts and has not been asked to stop, as `(id, namespace/name)`.
    pub(crate) fn serving(&self) -> impl Iterator<Item = (ServiceId, &str)> {
        self.instances
            .iter()
            .filter(|(_, i)| i.constructed && !i.stopping)
            .map(|(id, i)| (*id, i.constructor.name.as_str()))
    }

    /// Whether it hosts `service`, constructed and not being stopped.
    pub(crate) fn serves(&self, service: ServiceId) -> bool {
        self.instances.get(&service).is_some_and(|i| i.constructed && !i.stopping)
    }

    /// What it runs, for failure messages.
    pub(crate) fn summary(&self) -> String {
        let mut tasks: Vec<String> = self.running.iter().map(|(t, r)| format!("{t}#{}", r.attempt)).collect();
        tasks.sort();
        let mut instances: Vec<String> = self.instances.keys().map(|s| s.to_string()).collect();
        instances.sort();
        format!(
            "{}: {:?}, free {} of {}, running [{}], instances [{}], calls {}",
            self.describe(),
            self.link,
            self.free,
            self.offer.capacity,
            tasks.join(" "),
            instances.join(" "),
            self.calls.len()
        )
    }
}
