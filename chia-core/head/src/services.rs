//! The head's side of services: the registry of running instances by name, starting them
//! through the scheduler (an instance is a task that holds its resources until stopped),
//! routing method calls to the node that hosts them, and stopping them.

use crate::core::{HeadCore, TaskKind, TaskRecord, arg_values};
use crate::outbox::{Action, OwnNodeCall};
use crate::persist::PersistedService;
use crate::scheduler::Event;
use chia_core::protocol::{
    Arg, ArgValue, Done, HeadToPeer, HeadToPeerRef, Outcome, ServiceInfo, ServiceStart,
};
use chia_core::{FunctionKey, NodeId, Retries, ServiceId, SessionId, TagPatterns, TaskError, TaskId};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;

/// The scheduler places instances of a service type as tasks of this function key, which
/// nodes offer for every service type they link.
pub(crate) fn instance_function(service_type: &FunctionKey) -> FunctionKey {
    FunctionKey::new(
        format!("{}{}", crate::scheduler::SERVICE_FUNCTION_PREFIX, service_type.name),
        service_type.sig_hash.clone(),
    )
}

#[derive(Serialize, Deserialize)]
pub(crate) struct ServiceRecord {
    info: ServiceInfo,
    owner: SessionId,
    /// The task that placed the instance; it holds the instance's resources while it lives.
    creation: TaskId,
    host: Option<NodeId>,
    ready: bool,
    /// Requests (`get_if_exists` starts) answered once the instance is ready.
    waiters: Vec<(SessionId, TaskId)>,
    /// Stop requests answered once the host has dropped the instance.
    stoppers: Vec<(SessionId, TaskId)>,
    stopping: bool,
    /// How to start it again after a head restart (detached services with value arguments).
    persist: Option<PersistedService>,
    /// How to re-create it when its node is lost (`max_restarts`), and how often still.
    restart: Option<Restart>,
    /// Being re-created after its node was lost: calls wait in `parked` until it is ready.
    restarting: bool,
    parked: Vec<TaskId>,
    /// Why the new instance cannot be placed now (no eligible node): calls fail with it
    /// instead of waiting without end.
    unplaceable: Option<String>,
    /// Its node reported how the current constructor ended.
    constructor_reported: bool,
    /// The current instance was built: its node holds it until told to drop it.
    built: bool,
    /// The request that started the service was answered (with the running instance): an
    /// end of the service says nothing more to it.
    creator_answered: bool,
}

#[derive(Serialize, Deserialize)]
pub(crate) struct Restart {
    spec: PersistedService,
    /// Restarts left.
    left: Retries,
}

/// Results a service asked for (see [`chia_core::protocol::PeerToHead::WatchResults`]).
#[derive(Serialize, Deserialize)]
struct Watch {
    method: String,
    /// Which functions' results, each for every call (`None`) or for the tags a pattern
    /// matches: the cache's own rules.
    rules: HashMap<String, Option<TagPatterns>>,
}

impl Watch {
    fn wants(&self, function: &str, tag: &str) -> bool {
        match self.rules.get(function) {
            Some(None) => true,
            Some(Some(patterns)) => patterns.matches(tag),
            None => false,
        }
    }
}

/// The owner of the head's own requests (results passed to watching services).
pub(crate) const HEAD_SESSION: SessionId = SessionId(0);

#[derive(Default, Serialize, Deserialize)]
pub(crate) struct Services {
    records: HashMap<ServiceId, ServiceRecord>,
    watches: HashMap<ServiceId, Watch>,
    /// Results whose announcement waits for this many writes to watching services.
    pending_writes: HashMap<TaskId, usize>,
    /// Each such write, and the result it is for.
    writes: HashMap<TaskId, TaskId>,
    next_internal_task: u64,
    names: HashMap<(String, String), ServiceId>,
    /// Calls waiting for an argument task, by that task.
    pub(crate) waiting_calls: HashMap<TaskId, Vec<TaskId>>,
    /// Services kept by a previous run, started once the head's own node joins. Not in a
    /// snapshot: they come from the services file, as in a replay (`JournalEntry::Restored`).
    #[serde(skip)]
    pub(crate) to_restore: Vec<PersistedService>,
    /// Function tasks that take results of service calls (which the scheduler does not know),
    /// with the submission the scheduler hears once those calls have succeeded, and how many
    /// it still waits for.
    pub(crate) deferred: HashMap<TaskId, (Event, usize)>,
    next: u64,
}

impl Services {
    /// Services registered now (being placed, running, restarting or stopping).
    pub(crate) fn running_count(&self) -> usize {
        self.records.len()
    }

    /// Whether `task`'s announcement waits for writes to watching services.
    pub(crate) fn announce_waits(&self, task: TaskId) -> bool {
        self.pending_writes.contains_key(&task)
    }
}

impl HeadCore {
    /// The names of the services `session` started that are not detached (what ends with it).
    pub(crate) fn service_views_of(&self, session: SessionId) -> Vec<String> {
        let mut names: Vec<String> = self
            .services
            .records
            .values()
            .filter(|r| r.owner == session && !r.info.detached)
            .map(|r| r.info.name.clone())
            .collect();
        names.sort();
        names
    }

    /// Every registered service, by namespace and name.
    pub(crate) fn service_views(&self) -> Vec<chia_core::inspect::ServiceView> {
        let node_name =
            |node: NodeId| self.nodes.get(&node).and_then(|s| self.session_name(*s)).map(str::to_string);
        let mut views: Vec<chia_core::inspect::ServiceView> = self
            .services
            .records
            .values()
            .map(|record| chia_core::inspect::ServiceView {
                id: record.info.id,
                name: record.info.name.clone(),
                namespace: record.info.namespace.clone(),
                type_name: record.info.type_name.clone(),
                node: record.host.and_then(node_name),
                detached: record.info.detached,
                state: if record.stopping {
                    "stopping"
                } else if record.restarting {
                    "restarting"
                } else if record.ready {
                    "running"
                } else {
                    "starting"
                }
                .to_string(),
                owner: self.session_name(record.owner).map(str::to_string),
            })
            .collect();
        views.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
        views
    }

    /// A write to a watching service ended: the result it was for may be announced now.
    pub(crate) fn written_for_watcher(&mut self, write: TaskId) {
        let Some(result) = self.services.writes.remove(&write) else { return };
        let Some(pending) = self.services.pending_writes.get_mut(&result) else { return };
        *pending -= 1;
        if *pending == 0 {
            self.services.pending_writes.remove(&result);
            self.announce(result);
            self.maybe_free(result);
        }
    }

    /// Answers a request (start, lookup, stop) with a value, or an error.
    pub(crate) fn reply<T: serde::Serialize>(
        &mut self,
        session: SessionId,
        task: TaskId,
        answer: Result<&T, TaskError>,
    ) {
        let done = match answer.and_then(|value| {
            rmp_serde::to_vec_named(value).map_err(|e| TaskError::BadResult {
                function: "service request".into(),
                message: e.to_string(),
            })
        }) {
            Ok(value) => Done::Value(value),
            Err(error) => Done::Failed(error),
        };
        self.outbox.send(session, &HeadToPeer::Done { task, done });
    }

    pub(crate) fn start_service(&mut self, session: SessionId, start: ServiceStart) {
        let task = start.task;
        if task.session() != session || self.tasks.contains_key(&task) {
            tracing::warn!("{session} sent a service start with a task id it may not use ({task}); ignored");
            return;
        }
        let key = (start.namespace.clone(), start.name.clone());
        if let Some((existing, record)) =
            self.services.names.get(&key).and_then(|id| self.services.records.get(id).map(|r| (*id, r)))
        {
            let same_type = record.info.type_name == start.service_type.name
                && record.info.sig_hash == start.service_type.sig_hash;
            let refusal = if !start.get_if_exists {
                Some(format!(
                    "a service named {:?} already runs in namespace {:?}",
                    start.name, start.namespace
                ))
            } else if !same_type {
                Some(format!(
                    "the service {:?} in namespace {:?} is a {} (signature {}), not a {} (signature {})",
                    start.name,
                    start.namespace,
                    record.info.type_name,
                    record.info.sig_hash,
                    start.service_type.name,
                    start.service_type.sig_hash
                ))
            } else {
                None
            };
            match refusal {
                Some(message) => {
                    let error = TaskError::InvalidCall {
                        function: format!("{}.new", start.service_type.name),
                        message,
                    };
                    self.reply::<()>(session, task, Err(error));
                }
                None if record.ready => {
                    let info = record.info.clone();
                    self.reply(session, task, Ok(&info));
                }
                None => {
                    if let Some(record) = self.services.records.get_mut(&existing) {
                        record.waiters.push((session, task));
                    }
                }
            }
            return;
        }
        self.services.next += 1;
        let id = ServiceId(self.services.next);
        let persist = self.persisted.as_ref().and_then(|_| PersistedService::of(&start));
        let restart = match (start.max_restarts, PersistedService::from_values(&start)) {
            (left, _) if !left.allows_another(1) => None,
            (left, Some(spec)) => Some(Restart { spec, left }),
            (_, None) => {
                tracing::warn!(
                    "service {:?} cannot be restarted (max_restarts): its constructor takes ObjectRef arguments",
                    start.name
                );
                None
            }
        };
        let info = ServiceInfo {
            id,
            name: start.name,
            namespace: start.namespace,
            type_name: start.service_type.name.clone(),
            sig_hash: start.service_type.sig_hash.clone(),
            node: String::new(),
            detached: start.detached,
        };
        tracing::info!("starting service {:?} ({}) as {id}", info.name, info.type_name);
        self.services.names.insert(key, id);
        self.services.records.insert(
            id,
            ServiceRecord {
                info,
                owner: session,
                creation: task,
                host: None,
                ready: false,
                waiters: Vec::new(),
                stoppers: Vec::new(),
                stopping: false,
                persist,
                restart,
                restarting: false,
                parked: Vec::new(),
                unplaceable: None,
                constructor_reported: false,
                built: false,
                creator_answered: false,
            },
        );
        let held = Held { request: start.request, placement: start.placement };
        self.place_instance(task, session, id, &start.service_type, held, start.args);
    }

    /// Asks the scheduler to place an instance of `service_type` for `service`, as the task
    /// `task` of `owner`, holding `held` while it lives.
    fn place_instance(
        &mut self,
        task: TaskId,
        owner: SessionId,
        service: ServiceId,
        service_type: &FunctionKey,
        held: Held,
        args: Vec<Arg>,
    ) {
        let Held { request, placement } = held;
        let deps = ref_args(&args);
        self.hold_deps(&deps);
        let constructor = format!("{}.new", service_type.name);
        let record = TaskRecord {
            scheduled: true,
            ..TaskRecord::new(
                self.now,
                owner,
                constructor,
                args,
                deps.clone(),
                TaskKind::ServiceStart(service),
            )
        };
        self.add_record(task, record);
        // The task is never retried: an instance's state dies with its node (`max_restarts`
        // starts a new one from its constructor instead).
        self.feed(Event::TaskSubmitted {
            task,
            function: instance_function(service_type),
            request,
            deps,
            max_retries: chia_core::Retries::Never,
            retry_exceptions: false,
            placement,
        });
    }

    /// The scheduler placed an instance: ask its node to construct it.
    pub(crate) fn dispatch_instance(
        &mut self,
        task: TaskId,
        service: ServiceId,
        node: NodeId,
        session: SessionId,
    ) {
        let node_name = self.session_name(session).unwrap_or_default().to_string();
        let Some(record) = self.services.records.get_mut(&service) else {
            // Stopped before it was placed: give the resources straight back.
            self.finish_instance_task(task);
            return;
        };
        record.host = Some(node);
        record.info.node = node_name;
        record.unplaceable = None;
        let type_name = record.info.type_name.clone();
        let Some(task_record) = self.tasks.get_mut(&task) else { return };
        task_record.running_on = Some(node);
        let args = std::mem::take(&mut task_record.args);
        let values = arg_values(&self.tasks, task, &args);
        let message = HeadToPeerRef::StartInstance { task, service, type_name: &type_name, args: values };
        let sent = self.outbox.send_checked(session, &message);
        self.release_deps(task);
        if let Err(e) = sent {
            let error = TaskError::InvalidCall {
                function: format!("{type_name}.new"),
                message: format!("its arguments cannot be sent: {e}"),
            };
            self.instance_failed(service, error);
        }
    }

    /// The host reported the constructor's outcome.
    pub(crate) fn instance_started(&mut self, task: TaskId, service: ServiceId, outcome: Outcome) {
        let current = self.services.records.get(&service).is_some_and(|record| record.creation == task);
        if let (true, Outcome::Failed(error)) = (current, &outcome) {
            if let Some(record) = self.services.records.get_mut(&service) {
                // The constructor has answered: nothing is left on the node to wait for.
                record.constructor_reported = true;
            }
            return self.instance_failed(service, error.clone());
        }
        let Some(record) = self.services.records.get_mut(&service).filter(|_| current) else {
            // Stopped while it was being constructed: the stop may have reached the host before
            // the instance existed, so say it again (harmless if construction failed).
            let host =
                self.tasks.get(&task).and_then(|r| r.running_on).and_then(|node| self.nodes.get(&node));
            if let Some(&session) = host {
                self.outbox.send(session, &HeadToPeer::StopInstance { service });
            }
            self.finish_instance_task(task);
            return;
        };
        record.built = true;
        if record.stopping {
            // Stopped while it was being built: now that it exists, its host drops it, and the
            // service ends when the host says it has.
            let host = record.host.and_then(|node| self.nodes.get(&node).copied());
            if let Some(session) = host {
                self.outbox.send(session, &HeadToPeer::StopInstance { service });
            }
            return;
        }
        record.ready = true;
        record.restarting = false;
        let parked = std::mem::take(&mut record.parked);
        let keep = record.persist.clone();
        let info = record.info.clone();
        let mut answer = std::mem::take(&mut record.waiters);
        // A restart's own request is the head's: nobody waits for its answer.
        record.creator_answered = true;
        if task.session() != HEAD_SESSION {
            answer.push((record.owner, task));
        }
        tracing::info!("service {:?} ({}) runs on {}", info.name, info.type_name, info.node);
        if let (Some(store), Some(spec)) = (self.persisted.as_mut(), keep) {
            let key = (spec.namespace.clone(), spec.name.clone());
            if store.get(&key) != Some(&spec) {
                store.insert(key, spec);
                self.save_services();
            }
        }
        for (session, request) in answer {
            self.reply(session, request, Ok(&info));
        }
        for call in parked {
            self.forward_call(call);
        }
    }

    /// A service's constructor asks for the results its rules match.
    pub(crate) fn watch_results(
        &mut self,
        session: SessionId,
        task: TaskId,
        method: String,
        rules: Vec<chia_core::protocol::WatchRule>,
    ) {
        let service = match self.tasks.get(&task).map(|r| &r.kind) {
            Some(TaskKind::ServiceStart(service)) if self.runs_on_session(task, session) => *service,
            _ => {
                tracing::warn!(
                    "{session} asked to watch results for {task}, which is not a service it constructs"
                );
                return;
            }
        };
        let mut watched = HashMap::new();
        for rule in rules {
            let matcher = match rule.tags {
                None => None,
                Some(patterns) => match TagPatterns::new(patterns) {
                    Ok(patterns) => Some(patterns),
                    Err(e) => {
                        tracing::error!("{service}: tag patterns for {} are invalid: {e}", rule.function);
                        continue;
                    }
                },
            };
            watched.insert(rule.function, matcher);
        }
        self.services.watches.insert(service, Watch { method, rules: watched });
    }

    /// A task succeeded: pass its value to the services watching such results. The value is
    /// sent from here, where it landed, so it never travels to a driver and back; the result
    /// is announced to its owner once the writes are done.
    pub(crate) fn deliver_to_watchers(
        &mut self,
        result: TaskId,
        function: &str,
        tag: Option<&str>,
        value: &[u8],
    ) {
        let Some(tag) = tag else { return };
        if self.services.watches.is_empty() {
            return;
        }
        let matching: Vec<(ServiceId, String)> = self
            .services
            .watches
            .iter()
            .filter(|(_, watch)| watch.wants(function, tag))
            .map(|(service, watch)| (*service, watch.method.clone()))
            .collect();
        let mut matching = matching;
        matching.sort_unstable();
        for (service, method) in matching {
            let (Ok(tag_arg), Ok(value_arg)) =
                (rmp_serde::to_vec_named(tag), rmp_serde::to_vec_named(serde_bytes::Bytes::new(value)))
            else {
                continue;
            };
            self.services.next_internal_task += 1;
            let task = TaskId::new(HEAD_SESSION, self.services.next_internal_task);
            let name = self.services.records.get(&service).map(|r| r.info.name.clone()).unwrap_or_default();
            let function = format!("{name}.{method} of {tag:?}");
            let args = vec![Arg::Value(tag_arg), Arg::Value(value_arg)];
            let kind = TaskKind::ServiceCall { service, name, method, missing: 0 };
            let record = TaskRecord::new(self.now, HEAD_SESSION, function, args, Vec::new(), kind);
            // Nobody holds the answer: the record goes as soon as the write ends.
            self.add_record(task, TaskRecord { owner_holds: false, ..record });
            *self.services.pending_writes.entry(result).or_default() += 1;
            self.services.writes.insert(task, result);
            self.forward_call(task);
        }
    }

    /// The instance could not be placed or constructed, or its node was lost.
    pub(crate) fn instance_failed(&mut self, service: ServiceId, error: TaskError) {
        self.services.watches.remove(&service);
        let restart = self.services.records.get(&service).is_some_and(|record| {
            !self.shutting_down
                && !record.stopping
                && matches!(error, TaskError::WorkerLost { .. })
                // `UpTo(0)` (the last restart used) allows no more, as `Never` does: a snapshot
                // keeps both as 0.
                && record.restart.as_ref().is_some_and(|restart| restart.left.allows_another(1))
        });
        if restart {
            return self.restart_instance(service, error);
        }
        let Some(record) = self.services.records.remove(&service) else { return };
        for call in record.parked {
            self.fail_call(call, |_| TaskError::ServiceUnavailable {
                service: record.info.name.clone(),
                message: format!("it could not be restarted: {error}"),
            });
        }
        let key = (record.info.namespace.clone(), record.info.name.clone());
        if self.services.names.get(&key) == Some(&service) {
            self.services.names.remove(&key);
        }
        if self.shutting_down || self.head_died {
            // It ends with the head, not for good: a restarted head starts it again.
            tracing::debug!("service {:?} ({}) ended with the head", record.info.name, record.info.type_name);
        } else {
            // Stopped or lost: a restarted head must not bring it back.
            if let (Some(store), Some(_)) = (self.persisted.as_mut(), &record.persist) {
                let key = (record.info.namespace.clone(), record.info.name.clone());
                if store.remove(&key).is_some() {
                    self.save_services();
                }
            }
            if record.stopping {
                tracing::info!("service {:?} ({}) stopped", record.info.name, record.info.type_name);
            } else {
                tracing::warn!("service {:?} ({}) ended: {error}", record.info.name, record.info.type_name);
            }
        }
        let mut answer = record.waiters;
        // A restart's own request is the head's: nobody waits for its answer.
        if !record.creator_answered && record.creation.session() != HEAD_SESSION {
            answer.push((record.owner, record.creation));
        }
        for (session, request) in answer {
            self.reply::<()>(session, request, Err(error.clone()));
        }
        // Whoever asked for the stop gets what they wanted: the service is gone.
        for (session, request) in record.stoppers {
            self.reply(session, request, Ok(&()));
        }
        let constructing =
            record.host.is_some() && !record.ready && !record.stopping && !record.constructor_reported;
        if constructing && !matches!(error, TaskError::WorkerLost { .. }) {
            // Its node is still constructing it: the constructor's report (see
            // `instance_started`) drops the instance and ends the task then, so what it holds
            // is released on the node before the head counts its resources as free.
            tracing::debug!("{} will be dropped once constructed", record.info.name);
            return;
        }
        self.end_creation_task(record.creation, record.host.is_some(), error);
    }

    /// The scheduler failed an instance's placement task (its node was lost, or it can never
    /// run).
    pub(crate) fn instance_task_failed(&mut self, task: TaskId, service: ServiceId, error: TaskError) {
        if self.services.records.get(&service).is_some_and(|record| record.creation == task) {
            return self.instance_failed(service, error);
        }
        // The service is gone already (stopped while being constructed): only the task is left.
        self.end_creation_task(task, false, error);
    }

    /// No node can hold a new instance now; callers waiting for a restart learn why.
    pub(crate) fn instance_unplaceable(&mut self, service: ServiceId, reason: &str) {
        let Some(record) = self.services.records.get_mut(&service).filter(|r| r.restarting) else { return };
        record.unplaceable = Some(reason.to_string());
        let (name, parked) = (record.info.name.clone(), std::mem::take(&mut record.parked));
        for call in parked {
            self.fail_call(call, |_| TaskError::ServiceUnavailable {
                service: name.clone(),
                message: format!("it is being restarted, but no node can hold it now: {reason}"),
            });
        }
    }

    /// Ends the task that placed an instance that is gone.
    fn end_creation_task(&mut self, creation: TaskId, placed: bool, error: TaskError) {
        if placed {
            self.finish_instance_task(creation);
        } else if let Some(task) = self.tasks.get_mut(&creation) {
            // Never placed (the scheduler failed it): only the record is left to free.
            task.owner_holds = false;
            task.outcome = Some(Outcome::Failed(error));
            self.maybe_free(creation);
        }
    }

    /// Its node was lost and it may restart: place a new instance under the same id and name,
    /// from its constructor; calls wait for it.
    fn restart_instance(&mut self, service: ServiceId, error: TaskError) {
        self.services.next_internal_task += 1;
        let task = TaskId::new(HEAD_SESSION, self.services.next_internal_task);
        let Some(record) = self.services.records.get_mut(&service) else { return };
        let Some(restart) = record.restart.as_mut() else { return };
        restart.left = restart.left.one_used();
        let (spec, left) = (restart.spec.clone(), restart.left);
        let old_creation = std::mem::replace(&mut record.creation, task);
        if !record.ready && old_creation.session() != HEAD_SESSION {
            // Lost while its first instance was being built: the start request is answered
            // when the new one is ready.
            record.waiters.push((record.owner, old_creation));
        }
        let placed = record.host.take().is_some();
        record.ready = false;
        record.restarting = true;
        record.constructor_reported = false;
        record.built = false;
        record.info.node = String::new();
        let left = match left {
            Retries::Forever => "no limit".to_string(),
            Retries::Never => "0 more".to_string(),
            Retries::UpTo(more) => format!("{more} more"),
        };
        tracing::warn!(
            "service {:?} ({}) lost its node ({error}); starting it again elsewhere ({left} restart(s) allowed)",
            record.info.name,
            record.info.type_name
        );
        self.end_creation_task(old_creation, placed, error);
        let args = spec.args.into_iter().map(Arg::Value).collect();
        let held = Held { request: spec.request, placement: spec.placement };
        self.place_instance(task, HEAD_SESSION, service, &spec.service_type, held, args);
    }

    /// Starts again the detached services a previous head on the same state directory ran
    /// (as its last [`crate::Action::SaveServices`] listed them).
    ///
    /// Until the head's own node joins they wait (those pinned to the head need it; placing
    /// them before would only report them unplaceable).
    pub fn restore_services(&mut self, now: std::time::Instant, services: Vec<PersistedService>) {
        self.set_now(now);
        if self.head_node.is_none() {
            self.services.to_restore.extend(services);
            return;
        }
        if self.options().journal_id.is_some() {
            self.outbox.push(crate::Action::Keep(crate::journal::JournalEntry::Restored {
                services: services.clone(),
            }));
        }
        if let Some(store) = self.persisted.as_mut() {
            for service in &services {
                store.insert((service.namespace.clone(), service.name.clone()), service.clone());
            }
        }
        for service in services {
            tracing::info!(
                "starting {:?} ({}) again, as before the restart",
                service.name,
                service.service_type.name
            );
            self.services.next_internal_task += 1;
            let task = TaskId::new(HEAD_SESSION, self.services.next_internal_task);
            self.start_service(HEAD_SESSION, service.start(task));
        }
    }

    /// Ends the task that held an instance's resources.
    fn finish_instance_task(&mut self, task: TaskId) {
        let Some(record) = self.tasks.get_mut(&task) else { return };
        let running_on = record.running_on.take();
        record.owner_holds = false;
        record.outcome.get_or_insert(Outcome::Value(Vec::new()));
        if let Some(node) = running_on {
            self.feed(Event::TaskFinished { task, node, error: None });
        }
        self.maybe_free(task);
    }

    pub(crate) fn lookup_service(&mut self, session: SessionId, task: TaskId, name: &str, namespace: &str) {
        let found = self
            .services
            .names
            .get(&(namespace.to_string(), name.to_string()))
            .and_then(|id| self.services.records.get(id))
            .filter(|record| record.ready)
            .map(|record| record.info.clone());
        self.reply(session, task, Ok(&found));
    }

    /// Stops a service; answered once it is gone (its host dropped the instance).
    pub(crate) fn stop_service_request(&mut self, session: SessionId, task: TaskId, service: ServiceId) {
        match self.services.records.get_mut(&service) {
            Some(record) => {
                // A request sent again after a head restart is answered once.
                if !record.stoppers.contains(&(session, task)) {
                    record.stoppers.push((session, task));
                }
                self.stop_service(service, "stopped");
            }
            None => self.reply(session, task, Ok(&())),
        }
    }

    /// Stops a service. A running instance is asked to stop and the service ends when its
    /// host confirms (its name stays taken until then, so a new instance cannot collide with
    /// what the old one still holds), as does one being built, once built; one not placed yet
    /// ends at once.
    pub(crate) fn stop_service(&mut self, service: ServiceId, why: &str) {
        let Some(record) = self.services.records.get_mut(&service) else { return };
        let host_session =
            record.host.filter(|_| record.ready).and_then(|node| self.nodes.get(&node).copied());
        tracing::info!("service {:?} ({}) {why}", record.info.name, record.info.type_name);
        let error =
            TaskError::ServiceUnavailable { service: record.info.name.clone(), message: why.to_string() };
        match host_session {
            Some(session) => {
                // New calls are refused from now on; the ones already sent finish first.
                record.ready = false;
                if !record.stopping {
                    record.stopping = true;
                    self.outbox.send(session, &HeadToPeer::StopInstance { service });
                }
            }
            None if record.stopping => {}
            // Placed and being built: it ends once its host has built it and dropped it, so its
            // name stays taken until then (see `instance_started`).
            None if record.host.is_some_and(|node| self.nodes.contains_key(&node)) => record.stopping = true,
            None => self.instance_failed(service, error),
        }
    }

    /// The host dropped a stopped instance.
    pub(crate) fn instance_stopped(&mut self, session: SessionId, service: ServiceId) {
        let Some(record) = self.services.records.get(&service) else { return };
        if record.host.and_then(|node| self.nodes.get(&node)) != Some(&session) {
            tracing::warn!("{session} reported stopping {service}, which it does not host; ignored");
            return;
        }
        let error =
            TaskError::ServiceUnavailable { service: record.info.name.clone(), message: "stopped".into() };
        self.instance_failed(service, error);
    }

    pub(crate) fn call_service(
        &mut self,
        session: SessionId,
        task: TaskId,
        service: ServiceId,
        name: &str,
        method: String,
        args: Vec<Arg>,
    ) {
        if task.session() != session || self.tasks.contains_key(&task) {
            tracing::warn!("{session} sent a service call with a task id it may not use ({task}); ignored");
            return;
        }
        let function = match self.services.records.get(&service) {
            Some(record) => format!("{}.{method}", record.info.type_name),
            None => format!("{name}.{method}"),
        };
        let deps = ref_args(&args);
        self.hold_deps(&deps);
        let kind = TaskKind::ServiceCall { service, name: name.to_string(), method, missing: 0 };
        self.add_record(task, TaskRecord::new(self.now, session, function, args, deps.clone(), kind));
        let mut missing = 0;
        for dep in deps {
            let state =
                self.tasks.get(&dep).map(|r| r.outcome.as_ref().map(|o| matches!(o, Outcome::Value(_))));
            match state {
                None => {
                    return self.fail_call(task, |function| TaskError::UnknownDependency {
                        function,
                        dependency: dep,
                    });
                }
                Some(Some(true)) => {}
                Some(Some(false)) => return self.fail_call_on_dependency(task, dep),
                Some(None) => {
                    missing += 1;
                    self.services.waiting_calls.entry(dep).or_default().push(task);
                }
            }
        }
        if let Some(TaskRecord { kind: TaskKind::ServiceCall { missing: count, .. }, .. }) =
            self.tasks.get_mut(&task)
        {
            *count = missing;
        }
        if missing == 0 {
            self.forward_call(task);
        }
    }

    /// Sends a call whose arguments are all ready to the instance's node.
    fn forward_call(&mut self, task: TaskId) {
        let Some(TaskRecord { kind: TaskKind::ServiceCall { service, name, .. }, .. }) =
            self.tasks.get(&task)
        else {
            return;
        };
        let (service, name) = (*service, name.clone());
        if let Some(record) = self.services.records.get_mut(&service)
            && record.restarting
        {
            if let Some(reason) = record.unplaceable.clone() {
                return self.fail_call(task, |_| TaskError::ServiceUnavailable {
                    service: name,
                    message: format!("it is being restarted, but no node can hold it now: {reason}"),
                });
            }
            // Its node was lost and a new instance is on its way: the call waits for it.
            record.parked.push(task);
            return;
        }
        let host = self.services.records.get(&service).filter(|r| r.ready).and_then(|r| r.host);
        let Some((node, session)) = host.and_then(|node| self.nodes.get(&node).map(|s| (node, *s))) else {
            return self.fail_call(task, |_| TaskError::ServiceUnavailable {
                service: name,
                message: "it is not running (stopped, never started, or its node was lost)".into(),
            });
        };
        let Some(record) = self.tasks.get_mut(&task) else { return };
        record.running_on = Some(node);
        let args = std::mem::take(&mut record.args);
        let TaskKind::ServiceCall { method, .. } = &record.kind else { return };
        let method = method.clone();
        let values = arg_values(&self.tasks, task, &args);
        if self.options.own_node_in_process && Some(node) == self.head_node {
            let args = values.iter().map(|value| ArgValue(value.0.to_vec())).collect();
            let call = OwnNodeCall { task, service, method, args };
            self.outbox.push(Action::CallOwnNode { session, call });
            self.release_deps(task);
            return;
        }
        let message = HeadToPeerRef::CallInstance { task, service, method: &method, args: values };
        let sent = self.outbox.send_checked(session, &message);
        self.release_deps(task);
        if let Err(e) = sent {
            if let Some(record) = self.tasks.get_mut(&task) {
                record.running_on = None;
            }
            let message = format!("its arguments cannot be sent: {e}");
            self.fail_call(task, |function| TaskError::InvalidCall { function, message });
        }
    }

    pub(crate) fn fail_call(&mut self, task: TaskId, error: impl FnOnce(String) -> TaskError) {
        let Some(record) = self.tasks.get_mut(&task) else { return };
        // It runs nowhere once failed (its host may still answer; that answer is ignored).
        record.running_on = None;
        let function = record.function.clone();
        self.release_deps(task);
        self.settle(task, Outcome::Failed(error(function)));
    }

    pub(crate) fn fail_call_on_dependency(&mut self, task: TaskId, dep: TaskId) {
        let cause = match self.tasks.get(&dep).and_then(|r| r.outcome.as_ref()) {
            Some(Outcome::Failed(error)) => error.clone(),
            _ => TaskError::UnknownDependency { function: String::new(), dependency: dep },
        };
        self.fail_call(task, |function| TaskError::DependencyFailed {
            function,
            dependency: dep,
            cause: Box::new(cause),
        });
    }

    /// `task` ended: calls waiting for it may go now (or fail with it).
    pub(crate) fn dependency_settled(&mut self, task: TaskId) {
        let Some(calls) = self.services.waiting_calls.remove(&task) else { return };
        let succeeded =
            matches!(self.tasks.get(&task).and_then(|r| r.outcome.as_ref()), Some(Outcome::Value(_)));
        for call in calls {
            let Some(record) = self.tasks.get_mut(&call) else {
                // Dropped meanwhile (its owner left).
                self.services.deferred.remove(&call);
                continue;
            };
            if record.outcome.is_some() {
                continue;
            }
            if !succeeded {
                self.services.deferred.remove(&call);
                self.fail_call_on_dependency(call, task);
                continue;
            }
            match &mut record.kind {
                TaskKind::ServiceCall { missing, .. } => {
                    *missing = missing.saturating_sub(1);
                    if *missing == 0 {
                        self.forward_call(call);
                    }
                }
                TaskKind::Function => {
                    let Some((_, missing)) = self.services.deferred.get_mut(&call) else { continue };
                    *missing = missing.saturating_sub(1);
                    if *missing == 0
                        && let Some((submitted, _)) = self.services.deferred.remove(&call)
                    {
                        self.submit_to_scheduler(submitted);
                    }
                }
                TaskKind::ServiceStart(_) => {}
            }
        }
    }

    /// Hands a function task to the scheduler, or, while results of service calls it takes
    /// are still to come, keeps it until they have succeeded (and fails it if one fails).
    pub(crate) fn submit_when_calls_end(&mut self, task: TaskId, submitted: Event) {
        let Event::TaskSubmitted { deps, .. } = &submitted else { return };
        let mut missing = 0;
        for &dep in deps {
            // Calls and instance starts, and function tasks that wait for some themselves: the
            // scheduler does not know them (yet).
            let Some(record) = self.tasks.get(&dep).filter(|r| !r.scheduled) else { continue };
            match &record.outcome {
                Some(Outcome::Value(_)) => {}
                Some(Outcome::Failed(_)) => return self.fail_call_on_dependency(task, dep),
                None => {
                    missing += 1;
                    self.services.waiting_calls.entry(dep).or_default().push(task);
                }
            }
        }
        if missing == 0 {
            self.submit_to_scheduler(submitted);
        } else {
            self.services.deferred.insert(task, (submitted, missing));
        }
    }

    /// The scheduler hears of a function task; its dependencies on service calls (which it
    /// does not know, and which have succeeded by now) are left out.
    fn submit_to_scheduler(&mut self, mut submitted: Event) {
        if let Event::TaskSubmitted { task, deps, .. } = &mut submitted {
            deps.retain(|dep| self.tasks.get(dep).is_none_or(|r| r.scheduled));
            if let Some(record) = self.tasks.get_mut(task) {
                record.scheduled = true;
            }
        }
        self.feed(submitted);
    }

    /// A node is gone: the calls it was running fail (its instances fail through the
    /// scheduler, which fails their placing tasks).
    pub(crate) fn fail_calls_on(&mut self, node: NodeId, node_name: &str) {
        let lost: Vec<TaskId> = self
            .tasks
            .iter()
            .filter(|(_, r)| r.running_on == Some(node) && matches!(r.kind, TaskKind::ServiceCall { .. }))
            .map(|(task, _)| *task)
            .collect();
        let mut lost = lost;
        lost.sort_unstable();
        for task in lost {
            if let Some(record) = self.tasks.get_mut(&task) {
                record.running_on = None;
            }
            let node = node_name.to_string();
            // Calls are not retried: an instance's state lived on that node.
            self.fail_call(task, |function| TaskError::WorkerLost {
                function,
                lost_on: vec![node.clone()],
                node,
                attempts: 1,
            });
        }
    }

    /// Services that belong to a session's job end with it; detached ones stay.
    pub(crate) fn stop_services_of(&mut self, session: SessionId) {
        let owned: Vec<ServiceId> = self
            .services
            .records
            .iter()
            .filter(|(_, r)| r.owner == session && !r.info.detached)
            .map(|(id, _)| *id)
            .collect();
        let mut owned = owned;
        owned.sort_unstable();
        for service in owned {
            self.stop_service(service, "ended with the job that started it");
        }
    }
}

impl HeadCore {
    /// Whether `service` has a constructed instance (its node holds it, ready or stopping).
    pub(crate) fn instance_is_built(&self, service: ServiceId) -> bool {
        self.services.records.get(&service).is_some_and(|record| record.built)
    }

    /// A built instance that is being stopped: its host is asked again (the request may have
    /// died with the previous head; a second one is harmless).
    pub(crate) fn repeat_stop(&mut self, session: SessionId, service: ServiceId) {
        if self.services.records.get(&service).is_some_and(|record| record.built && record.stopping) {
            self.outbox.send(session, &HeadToPeer::StopInstance { service });
        }
    }

    /// Whether the head holds anything of `session`'s start `task`: its record, or its place
    /// among the waiters for an instance being built.
    pub(crate) fn knows_start(&self, session: SessionId, task: TaskId) -> bool {
        self.tasks.contains_key(&task)
            || self.services.records.values().any(|r| r.waiters.contains(&(session, task)))
    }

    /// A start request `task` of `session` whose answer may have been lost (the head
    /// restarted): answered again if the instance it created is ready (otherwise it is
    /// answered when it is).
    pub(crate) fn answer_start_again(&mut self, session: SessionId, task: TaskId, service: ServiceId) {
        let ready = self.services.records.get(&service).filter(|r| r.ready && r.creation == task);
        if let Some(info) = ready.map(|record| record.info.clone()) {
            self.reply(session, task, Ok(&info));
        }
    }

    /// Tells the driver the detached services to keep now.
    fn save_services(&mut self) {
        if let Some(store) = &self.persisted {
            self.outbox.push(crate::Action::SaveServices(store.values().cloned().collect()));
        }
    }
}

/// The tasks an argument list refers to.
/// What an instance holds while it lives, and where.
struct Held {
    request: chia_core::Resources,
    placement: Option<Box<chia_core::placement::Placement>>,
}

pub(crate) fn ref_args(args: &[Arg]) -> Vec<TaskId> {
    args.iter()
        .filter_map(|a| match a {
            Arg::Ref(dep) => Some(*dep),
            Arg::Value(_) => None,
        })
        .collect()
}
