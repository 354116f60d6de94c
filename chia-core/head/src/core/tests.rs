//! The head core driven directly, Pair-style: a test environment opens sessions, feeds
//! messages with a manual clock and records every frame the core decides to send.

use super::*;
use crate::journal::JournalEntry;
use crate::outbox::OwnNodeCall;
use chia_core::protocol::{
    Arg, ResumeSession, ServiceInfo, ServiceStart, TaskAttempt, UnansweredStart, WorkerOffer,
};
use chia_core::{FunctionKey, Resources, ServiceId};

const SIG: &str = "0123456789abcdef";

struct Env {
    core: HeadCore,
    now: Instant,
    /// Frames sent so far and not yet looked at, decoded, in order.
    sent: Vec<(SessionId, HeadToPeer)>,
    closed: Vec<SessionId>,
    saved: Vec<Vec<PersistedService>>,
    /// The journal entries kept so far.
    kept: Vec<JournalEntry>,
    /// Calls handed to the head's own node in process (no frame is sent for them).
    handed: Vec<OwnNodeCall>,
}

impl Env {
    fn new() -> Env {
        Env::with(CoreOptions::default())
    }

    fn with(options: CoreOptions) -> Env {
        let now = Instant::now();
        Env {
            core: HeadCore::new(now, options),
            now,
            sent: Vec::new(),
            closed: Vec::new(),
            saved: Vec::new(),
            kept: Vec::new(),
            handed: Vec::new(),
        }
    }

    fn collect(&mut self) {
        while let Some(action) = self.core.poll_action() {
            match action {
                Action::Send { to, frame } => {
                    let message =
                        chia_core::protocol::decode_body(&frame[4..]).expect("the core encodes frames");
                    self.sent.push((to, message));
                }
                Action::Close { session, .. } => self.closed.push(session),
                Action::SaveServices(services) => self.saved.push(services),
                Action::Keep(entry) => self.kept.push(entry),
                Action::CallOwnNode { call, .. } => self.handed.push(call),
            }
        }
    }

    fn open(&mut self, name: &str, worker: Option<WorkerOffer>) -> SessionId {
        self.open_from("test", name, worker)
    }

    fn open_from(&mut self, remote: &str, name: &str, worker: Option<WorkerOffer>) -> SessionId {
        let hello = PeerToHead::Hello { protocol_version: PROTOCOL_VERSION, name: name.into(), worker };
        let session = self.core.open_session(self.now, remote, hello).expect("a hello of this version");
        self.collect();
        let mut sent = self.to(session).into_iter();
        let welcome = sent.next();
        assert!(
            matches!(welcome, Some(HeadToPeer::Welcome { session: s, .. }) if s == session),
            "{welcome:?}"
        );
        // What it was sent at once (tasks that waited for a node) is for the test to look at.
        self.sent.extend(sent.map(|m| (session, m)));
        session
    }

    fn driver(&mut self) -> SessionId {
        self.open("driver", None)
    }

    fn worker(&mut self, name: &str, resources: &str, functions: &[&str]) -> SessionId {
        self.worker_from("test", name, resources, functions)
    }

    fn worker_from(&mut self, remote: &str, name: &str, resources: &str, functions: &[&str]) -> SessionId {
        let offer = WorkerOffer {
            resources: Resources::parse(resources).expect("valid resources"),
            functions: functions.iter().map(|f| FunctionKey::new(*f, SIG)).collect(),
            services: vec![FunctionKey::new("Counter", SIG)],
            head_node: false,
            labels: Default::default(),
        };
        self.open_from(remote, name, Some(offer))
    }

    fn node_name(&self, session: SessionId) -> Option<&str> {
        self.core.sessions.get(&session).map(|s| s.name.as_str())
    }

    fn send(&mut self, from: SessionId, message: PeerToHead) {
        self.core.handle(self.now, from, message);
        self.collect();
    }

    fn advance(&mut self, by: Duration) {
        self.now += by;
    }

    fn timeout(&mut self) {
        self.core.handle_timeout(self.now);
        self.collect();
    }

    /// The messages sent to `session` since the last look.
    fn to(&mut self, session: SessionId) -> Vec<HeadToPeer> {
        let (mine, rest) = std::mem::take(&mut self.sent).into_iter().partition(|(to, _)| *to == session);
        self.sent = rest;
        mine.into_iter().map(|(_, message)| message).collect()
    }

    fn submit(&mut self, driver: SessionId, seq: u64, function: &str, args: Vec<Arg>) -> TaskId {
        let task = TaskId::new(driver, seq);
        self.send(driver, PeerToHead::Submit(spec(task, function, args)));
        task
    }
}

fn spec(task: TaskId, function: &str, args: Vec<Arg>) -> TaskSpec {
    TaskSpec {
        task,
        function: FunctionKey::new(function, SIG),
        args,
        request: Resources::parse("CPU=1").expect("valid"),
        tag: None,
        max_retries: chia_core::Retries::UpTo(3),
        bypass: None,
        retry_exceptions: false,
        job: None,
        timeout_ms: None,
        placement: None,
    }
}

fn value(n: u8) -> Vec<u8> {
    vec![n; 3]
}

/// The `(task, attempt)` of every `Execute` among `messages`.
fn executes(messages: &[HeadToPeer]) -> Vec<(TaskId, u32)> {
    messages
        .iter()
        .filter_map(|m| match m {
            HeadToPeer::Execute { task, attempt, .. } => Some((*task, *attempt)),
            _ => None,
        })
        .collect()
}

fn dones(messages: &[HeadToPeer]) -> Vec<(TaskId, Done)> {
    messages
        .iter()
        .filter_map(|m| match m {
            HeadToPeer::Done { task, done } => Some((*task, done.clone())),
            _ => None,
        })
        .collect()
}

#[test]
fn a_task_runs_on_a_worker_and_its_owner_gets_the_value() {
    let mut env = Env::new();
    let worker = env.worker("w", "CPU=1", &["f"]);
    let driver = env.driver();
    let task = env.submit(driver, 1, "f", vec![Arg::Value(value(1))]);
    let sent = env.to(worker);
    assert_eq!(executes(&sent), [(task, 1)]);
    let HeadToPeer::Execute { args, .. } = &sent[0] else { unreachable!() };
    assert_eq!(args[0].0, value(1));
    env.send(worker, PeerToHead::Finished { task, attempt: 1, outcome: Outcome::Value(value(2)) });
    assert_eq!(dones(&env.to(driver)), [(task, Done::Value(value(2)))]);
    assert_eq!(env.core.stats().tasks, 1, "the owner still holds it");
    env.send(driver, PeerToHead::Release { tasks: vec![task] });
    assert_eq!(env.core.stats(), HeadStats { sessions: 2, nodes: 1, tasks: 0, result_bytes: 0 });
}

#[test]
fn a_chained_argument_is_substituted_and_a_large_result_waits_for_a_fetch() {
    let mut env = Env::new();
    let worker = env.worker("w", "CPU=1", &["f"]);
    let driver = env.driver();
    let first = env.submit(driver, 1, "f", vec![]);
    let second = env.submit(driver, 2, "f", vec![Arg::Ref(first)]);
    env.to(worker);
    let large = vec![7u8; INLINE_RESULT_BYTES + 1];
    env.send(
        worker,
        PeerToHead::Finished { task: first, attempt: 1, outcome: Outcome::Value(large.clone()) },
    );
    assert_eq!(dones(&env.to(driver)), [(first, Done::Stored { len: large.len() as u64 })]);
    let sent = env.to(worker);
    let [HeadToPeer::Execute { task, args, .. }] = &sent[..] else { panic!("{sent:?}") };
    assert_eq!((*task, &args[0].0), (second, &large));
    env.send(driver, PeerToHead::Fetch { task: first });
    let fetched = env.to(driver);
    assert!(
        matches!(&fetched[..], [HeadToPeer::Fetched { outcome: Some(Outcome::Value(v)), .. }] if *v == large)
    );
}

#[test]
fn a_report_of_an_earlier_attempt_is_ignored() {
    let mut env = Env::new();
    let worker = env.worker("w", "CPU=1", &["f"]);
    let driver = env.driver();
    let task = TaskId::new(driver, 1);
    env.send(driver, PeerToHead::Submit(TaskSpec { retry_exceptions: true, ..spec(task, "f", vec![]) }));
    assert_eq!(executes(&env.to(worker)), [(task, 1)]);
    let failure = TaskError::Application { function: "f".into(), message: "flaky".into() };
    env.send(worker, PeerToHead::Finished { task, attempt: 1, outcome: Outcome::Failed(failure) });
    assert_eq!(executes(&env.to(worker)), [(task, 2)], "retried on the only node");
    // A duplicate of the first attempt's report arrives late: it must not end the second.
    env.send(worker, PeerToHead::Finished { task, attempt: 1, outcome: Outcome::Value(value(1)) });
    assert!(dones(&env.to(driver)).is_empty());
    env.send(worker, PeerToHead::Finished { task, attempt: 2, outcome: Outcome::Value(value(2)) });
    assert_eq!(dones(&env.to(driver)), [(task, Done::Value(value(2)))]);
}

#[test]
fn a_congested_owner_is_told_its_results_are_stored_and_fetches_them() {
    let mut env = Env::new();
    let worker = env.worker("w", "CPU=1", &["f"]);
    let driver = env.driver();
    env.core.set_congested(driver, true);
    let task = env.submit(driver, 1, "f", vec![]);
    env.send(worker, PeerToHead::Finished { task, attempt: 1, outcome: Outcome::Value(value(5)) });
    assert_eq!(dones(&env.to(driver)), [(task, Done::Stored { len: value(5).len() as u64 })]);
    env.send(driver, PeerToHead::Fetch { task });
    let fetched = env.to(driver);
    assert!(
        matches!(&fetched[..], [HeadToPeer::Fetched { task: t, outcome: Some(Outcome::Value(v)) }] if *t == task && *v == value(5)),
        "{fetched:?}"
    );
    // Caught up: small results travel with their announcement again.
    env.core.set_congested(driver, false);
    let second = env.submit(driver, 2, "f", vec![]);
    env.send(worker, PeerToHead::Finished { task: second, attempt: 1, outcome: Outcome::Value(value(6)) });
    assert_eq!(dones(&env.to(driver)), [(second, Done::Value(value(6)))]);
}

#[test]
fn a_silent_worker_is_written_off_at_the_deadline_and_its_task_runs_elsewhere() {
    let timeout = Duration::from_secs(10);
    let mut env = Env::with(CoreOptions { heartbeat_timeout: timeout, ..CoreOptions::default() });
    let first = env.worker("a", "CPU=1", &["f"]);
    let driver = env.driver();
    let task = env.submit(driver, 1, "f", vec![]);
    assert_eq!(executes(&env.to(first)), [(task, 1)]);
    let second = env.worker("b", "CPU=1", &["f"]);
    assert_eq!(env.core.poll_timeout(), Some(env.now + timeout), "the first worker's deadline");
    env.advance(Duration::from_secs(6));
    env.send(second, PeerToHead::Heartbeat);
    env.advance(Duration::from_secs(4));
    env.timeout();
    assert_eq!(env.closed, [first]);
    assert_eq!(executes(&env.to(second)), [(task, 2)]);
    assert_eq!(env.core.poll_timeout(), Some(env.now + Duration::from_secs(6)), "now the second's");
    // What the written-off worker says afterwards does not count.
    env.send(first, PeerToHead::Finished { task, attempt: 1, outcome: Outcome::Value(value(1)) });
    assert!(dones(&env.to(driver)).is_empty());
}

#[test]
fn a_worker_joining_again_from_its_host_replaces_its_predecessor_at_once() {
    let mut env = Env::with(journaled());
    let old = env.worker_from("10.0.0.7:41000", "sim", "CPU=1", &["f"]);
    let driver = env.driver();
    let task = env.submit(driver, 1, "f", vec![]);
    assert_eq!(executes(&env.to(old)), [(task, 1)]);
    env.send(old, PeerToHead::Started { task, attempt: 1 });
    // The same name from another host is another worker: it gets a name of its own.
    let twin = env.worker_from("10.0.0.9:41000", "sim", "CPU=1", &["g"]);
    assert_eq!(env.node_name(twin), Some("sim-2"));
    assert!(env.closed.is_empty());
    // The worker restarted on its host: the old session goes now, not at its heartbeat
    // deadline; the new one takes the name and the task, whose lost run counts.
    let new = env.worker_from("10.0.0.7:41001", "sim", "CPU=1", &["f"]);
    assert_eq!(env.closed, [old]);
    assert_eq!(env.node_name(new), Some("sim"));
    assert_eq!(executes(&env.to(new)), [(task, 2)]);
    assert_eq!(env.core.scheduler.runs(task), Some(1));
    assert!(
        env.kept.iter().any(|e| matches!(e, JournalEntry::Closed { session, reason } if *session == old && reason.contains("replaced"))),
        "the replacement is kept"
    );
    // A replay comes to the same state without deciding it again.
    let restarted = env.restart();
    assert_eq!(restarted.node_name(new), Some("sim"));
    assert!(!restarted.core.sessions.contains_key(&old));
    assert_eq!(restarted.core.scheduler.runs(task), Some(1));
}

#[test]
fn a_service_on_a_replaced_worker_restarts_on_its_successor_rather_than_failing_as_unknown() {
    let mut env = Env::with(journaled());
    // Another node runs tasks but hosts no service: were the predecessor closed before its
    // successor joined, nothing connected would offer Counter and its restart would fail.
    let plain = WorkerOffer {
        resources: Resources::parse("CPU=1").expect("valid"),
        functions: vec![FunctionKey::new("f", SIG)],
        services: Vec::new(),
        head_node: false,
        labels: Default::default(),
    };
    env.open_from("10.0.0.9:41000", "plain", Some(plain));
    let old = env.worker_from("10.0.0.7:41000", "host", "CPU=1", &[]);
    let driver = env.driver();
    let start = TaskId::new(driver, 1);
    let restartable =
        ServiceStart { max_restarts: chia_core::Retries::UpTo(1), ..counter_start(start, false) };
    env.send(driver, PeerToHead::StartService(restartable));
    assert!(matches!(env.to(old)[..], [HeadToPeer::StartInstance { .. }]));
    env.send(old, PeerToHead::Finished { task: start, attempt: 0, outcome: Outcome::Value(Vec::new()) });
    assert_eq!(dones(&env.to(driver)).len(), 1, "the service is up");
    let new = env.worker_from("10.0.0.7:41001", "host", "CPU=1", &[]);
    assert_eq!(env.closed, [old]);
    assert_eq!(env.node_name(new), Some("host"));
    let sent = env.to(new);
    assert!(matches!(sent[..], [HeadToPeer::StartInstance { .. }]), "restarted on the successor: {sent:?}");
    assert!(dones(&env.to(driver)).is_empty(), "nothing failed");
    // A replay of the journal replaces the predecessor the same way.
    let restarted = env.restart();
    assert_eq!(restarted.node_name(new), Some("host"));
    assert!(!restarted.core.sessions.contains_key(&old));
}

#[test]
fn a_group_is_not_placed_on_a_successor_and_its_predecessor_as_if_two_machines() {
    use chia_core::placement::{GroupId, GroupStrategy};
    let mut env = Env::with(journaled());
    let busy = env.worker_from("10.0.0.1:41000", "w1", "CPU=1", &["f"]);
    let driver = env.driver();
    // w1 is busy: three distinct free nodes are not there yet, so the group waits.
    let running = env.submit(driver, 1, "f", vec![]);
    assert_eq!(executes(&env.to(busy)), [(running, 1)]);
    env.worker_from("10.0.0.3:41000", "w3", "CPU=1", &["f"]);
    let old = env.worker_from("10.0.0.7:41000", "host", "CPU=1", &[]);
    let group = TaskId::new(driver, 2);
    env.send(driver, group_spec(group, &["CPU=1", "CPU=1", "CPU=1"], GroupStrategy::StrictSpread));
    env.to(driver);
    let ready = TaskId::new(driver, 3);
    env.send(driver, PeerToHead::GroupReady { task: ready, group: GroupId(group) });
    assert!(dones(&env.to(driver)).is_empty(), "waiting for room");
    // The successor must not count as a fourth machine beside the predecessor it replaces.
    env.worker_from("10.0.0.7:41001", "host", "CPU=1", &[]);
    assert_eq!(env.closed, [old]);
    let answer = dones(&env.to(driver));
    assert!(answer.is_empty(), "still waiting for w1, not placed twice on one host: {answer:?}");
}

#[test]
fn a_replaced_workers_running_task_runs_again_before_tasks_queued_after_it() {
    let mut env = Env::with(journaled());
    let old = env.worker_from("10.0.0.7:41000", "host", "CPU=1", &["f"]);
    let driver = env.driver();
    let first = env.submit(driver, 1, "f", vec![]);
    assert_eq!(executes(&env.to(old)), [(first, 1)]);
    env.send(old, PeerToHead::Started { task: first, attempt: 1 });
    let second = env.submit(driver, 2, "f", vec![]);
    assert!(executes(&env.to(old)).is_empty(), "queued behind the first");
    let new = env.worker_from("10.0.0.7:41001", "host", "CPU=1", &["f"]);
    assert_eq!(executes(&env.to(new)), [(first, 2)], "the lost run comes first, in submission order");
    env.send(new, PeerToHead::Finished { task: first, attempt: 2, outcome: Outcome::Value(value(1)) });
    assert_eq!(executes(&env.to(new)), [(second, 1)], "then the one queued after it");
}

#[test]
fn a_worker_given_a_suffix_is_replaced_by_what_it_asked_for_not_by_its_suffix() {
    let mut env = Env::new();
    let first = env.worker_from("10.0.0.1:5000", "w", "CPU=1", &["f"]);
    let second = env.worker_from("10.0.0.2:5000", "w", "CPU=1", &["f"]);
    assert_eq!(env.node_name(second), Some("w-2"));
    // Asking for the suffix itself from another host is another worker again.
    let third = env.worker_from("10.0.0.3:5000", "w-2", "CPU=1", &["f"]);
    assert!(env.closed.is_empty());
    assert_ne!(env.node_name(third), Some("w-2"));
    // The second worker restarts on its host, asking for "w" as before: its predecessor goes.
    let again = env.worker_from("10.0.0.2:5001", "w", "CPU=1", &["f"]);
    assert_eq!(env.closed, [second]);
    assert!(env.node_name(first) == Some("w") && env.node_name(again).is_some_and(|n| n.starts_with("w-")));
}

#[test]
fn an_unacknowledged_dispatch_to_a_worker_that_is_replaced_costs_no_attempt() {
    let mut env = Env::new();
    let old = env.worker_from("[::1]:41000", "w", "CPU=1", &["f"]);
    let driver = env.driver();
    let mut spec = spec(TaskId::new(driver, 1), "f", vec![]);
    spec.max_retries = chia_core::Retries::UpTo(1);
    let task = spec.task;
    env.send(driver, PeerToHead::Submit(spec));
    assert_eq!(executes(&env.to(old)), [(task, 1)]);
    // The worker had died before the task reached it, and is back at once.
    let new = env.worker_from("[::1]:41002", "w", "CPU=1", &["f"]);
    assert_eq!(env.closed, [old]);
    assert_eq!(executes(&env.to(new)), [(task, 2)]);
    assert_eq!(env.core.scheduler.runs(task), Some(0));
    // Acknowledged and lost once more: the one retry it has is spent, not both.
    env.send(new, PeerToHead::Started { task, attempt: 2 });
    let third = env.worker_from("[::1]:41003", "w", "CPU=1", &["f"]);
    assert_eq!(executes(&env.to(third)), [(task, 3)]);
    env.send(third, PeerToHead::Started { task, attempt: 3 });
    env.core.close_session(env.now, third, "connection lost");
    env.collect();
    let failed = dones(&env.to(driver));
    let [(t, Done::Failed(TaskError::WorkerLost { attempts: 2, lost_on, .. }))] = &failed[..] else {
        panic!("{failed:?}")
    };
    assert_eq!((*t, lost_on.as_slice()), (task, ["w".to_string(), "w".to_string()].as_slice()));
}

#[test]
fn bytes_still_arriving_keep_a_worker_alive_and_the_head_node_never_expires() {
    let timeout = Duration::from_secs(10);
    let mut env = Env::with(CoreOptions { heartbeat_timeout: timeout, ..CoreOptions::default() });
    let offer = WorkerOffer {
        resources: Resources::parse("CPU=1").expect("valid"),
        functions: vec![],
        services: vec![],
        head_node: true,
        labels: Default::default(),
    };
    let head = env.open("anything", Some(offer));
    assert_eq!(env.core.session_name(head), Some(HEAD_NODE_NAME));
    let worker = env.worker("w", "CPU=1", &["f"]);
    env.advance(timeout);
    env.core.heard(env.now, worker);
    env.timeout();
    env.advance(timeout);
    env.core.heard(env.now, worker);
    env.timeout();
    assert!(env.closed.is_empty());
    assert_eq!(env.core.stats().nodes, 2);
}

#[test]
fn calls_to_the_own_nodes_instances_are_handed_over_in_process_and_answered_as_if_sent() {
    let options = CoreOptions { own_node_in_process: true, ..CoreOptions::default() };
    let mut env = Env::with(options);
    let offer = WorkerOffer {
        resources: Resources::parse("node:head=1").expect("valid"),
        functions: vec![],
        services: vec![FunctionKey::new("Counter", SIG)],
        head_node: true,
        labels: Default::default(),
    };
    let head = env.open("head", Some(offer));
    let worker = env.worker("w", "CPU=1", &[]);
    let driver = env.driver();
    let call_on = |env: &mut Env, seq: u64, pin: &str| {
        let start = TaskId::new(driver, seq);
        let pinned = ServiceStart {
            name: format!("counter-{seq}"),
            request: Resources::parse(pin).expect("valid"),
            ..counter_start(start, false)
        };
        env.send(driver, PeerToHead::StartService(pinned));
        let host = if pin.starts_with("node:head") { head } else { worker };
        let sent = env.to(host);
        let [HeadToPeer::StartInstance { service, .. }] = &sent[..] else { panic!("{sent:?}") };
        let service = *service;
        env.send(host, PeerToHead::Finished { task: start, attempt: 0, outcome: Outcome::Value(Vec::new()) });
        env.to(driver);
        let call = TaskId::new(driver, seq + 1);
        let (name, method) = (format!("counter-{seq}"), "add".to_string());
        let args = vec![Arg::Value(value(5))];
        env.send(driver, PeerToHead::CallService { task: call, service, name, method, args });
        (host, call)
    };
    // On the own node: handed over, no frame.
    let (host, call) = call_on(&mut env, 1, "node:head=0.001");
    assert_eq!(env.handed.len(), 1);
    assert_eq!((env.handed[0].task, env.handed[0].method.as_str()), (call, "add"));
    assert_eq!(env.handed[0].args, [chia_core::protocol::ArgValue(value(5))]);
    assert!(env.to(host).is_empty(), "no frame for it");
    let frame = env.handed[0].frame().expect("it encodes");
    let as_sent = chia_core::protocol::decode_body::<HeadToPeer>(&frame[4..]).expect("a frame");
    assert!(matches!(as_sent, HeadToPeer::CallInstance { task, .. } if task == call), "its fallback frame");
    env.send(host, PeerToHead::Finished { task: call, attempt: 0, outcome: Outcome::Value(value(5)) });
    assert_eq!(dones(&env.to(driver)), [(call, Done::Value(value(5)))]);
    // On another node: a frame, as always.
    let (host, call) = call_on(&mut env, 3, "CPU=0.1");
    assert_eq!(env.handed.len(), 1, "not handed over");
    assert!(matches!(env.to(host)[..], [HeadToPeer::CallInstance { task, .. }] if task == call));
}

#[test]
fn a_departed_drivers_running_task_is_cancelled_and_its_queued_ones_dropped() {
    let mut env = Env::new();
    let worker = env.worker("w", "CPU=1", &["f"]);
    let driver = env.driver();
    let running = env.submit(driver, 1, "f", vec![]);
    let queued = env.submit(driver, 2, "f", vec![]);
    assert_eq!(executes(&env.to(worker)), [(running, 1)]);
    env.core.close_session(env.now, driver, "gone");
    env.collect();
    assert_eq!(env.closed, [driver]);
    let sent = env.to(worker);
    assert!(matches!(sent[..], [HeadToPeer::Cancel { task, force: false }] if task == running), "{sent:?}");
    let cancelled = TaskError::Cancelled { function: "f".into() };
    env.send(worker, PeerToHead::Finished { task: running, attempt: 1, outcome: Outcome::Failed(cancelled) });
    assert!(executes(&env.to(worker)).is_empty(), "{queued} was dropped, not started");
    assert_eq!(env.core.stats().tasks, 0);
    assert_eq!(env.core.scheduler().node_free(NodeId(1)), Resources::parse("CPU=1,node:w=1").ok());
}

#[test]
fn peers_cannot_act_for_others() {
    let mut env = Env::new();
    let worker = env.worker("w", "CPU=1", &["f"]);
    let driver = env.driver();
    let other = env.driver();
    // A task id of another session, a report of a task the worker does not run, a release of
    // someone else's result: all ignored.
    env.send(other, PeerToHead::Submit(spec(TaskId::new(driver, 9), "f", vec![])));
    assert!(env.to(worker).is_empty());
    let task = env.submit(driver, 1, "f", vec![]);
    env.to(worker);
    env.send(other, PeerToHead::Finished { task, attempt: 1, outcome: Outcome::Value(value(1)) });
    env.send(worker, PeerToHead::Finished { task, attempt: 1, outcome: Outcome::Value(value(2)) });
    env.send(other, PeerToHead::Release { tasks: vec![task] });
    assert_eq!(dones(&env.to(driver)), [(task, Done::Value(value(2)))]);
    assert_eq!(env.core.stats().tasks, 1);
}

#[test]
fn a_hello_of_another_version_or_no_hello_is_rejected() {
    let mut env = Env::new();
    let old = PeerToHead::Hello { protocol_version: PROTOCOL_VERSION - 1, name: "old".into(), worker: None };
    let rejection = env.core.open_session(env.now, "test", old).unwrap_err();
    assert!(
        rejection.reason.contains(&format!("this head speaks version {PROTOCOL_VERSION}")),
        "{rejection}"
    );
    assert!(env.core.open_session(env.now, "test", PeerToHead::Heartbeat).is_err());
    env.collect();
    assert!(env.sent.is_empty());
    assert_eq!(env.core.stats().sessions, 0);
}

#[test]
fn arguments_too_large_for_a_frame_fail_the_task_instead_of_sending_it() {
    let mut env = Env::new();
    let worker = env.worker("w", "CPU=1", &["f"]);
    let driver = env.driver();
    let half = vec![0u8; chia_core::protocol::MAX_FRAME_BYTES / 2 + 1];
    let task = env.submit(driver, 1, "f", vec![Arg::Value(half.clone()), Arg::Value(half)]);
    assert!(executes(&env.to(worker)).is_empty());
    let done = dones(&env.to(driver));
    assert!(
        matches!(&done[..], [(t, Done::Failed(TaskError::InvalidCall { .. }))] if *t == task),
        "{done:?}"
    );
    assert_eq!(env.core.scheduler().node_free(NodeId(1)), Resources::parse("CPU=1,node:w=1").ok());
}

fn counter_start(task: TaskId, detached: bool) -> ServiceStart {
    ServiceStart {
        task,
        service_type: FunctionKey::new("Counter", SIG),
        name: "counter".into(),
        namespace: "default".into(),
        detached,
        get_if_exists: false,
        request: Resources::parse("CPU=0.1").expect("valid"),
        args: vec![Arg::Value(value(0))],
        max_restarts: chia_core::Retries::Never,
        placement: None,
    }
}

fn service_info(done: &Done) -> ServiceInfo {
    let Done::Value(bytes) = done else { panic!("{done:?}") };
    rmp_serde::from_slice(bytes).expect("a ServiceInfo")
}

#[test]
fn a_detached_service_is_kept_once_ready_and_its_calls_go_to_its_host() {
    let mut env = Env::with(CoreOptions { keep_services: true, ..CoreOptions::default() });
    let worker = env.worker("w", "CPU=1", &[]);
    let driver = env.driver();
    let start = TaskId::new(driver, 1);
    env.send(driver, PeerToHead::StartService(counter_start(start, true)));
    let sent = env.to(worker);
    let [HeadToPeer::StartInstance { task, service, type_name, .. }] = &sent[..] else { panic!("{sent:?}") };
    assert_eq!((*task, type_name.as_str()), (start, "Counter"));
    let service: ServiceId = *service;
    assert!(env.saved.is_empty(), "kept only once it runs");
    env.send(worker, PeerToHead::Finished { task: start, attempt: 0, outcome: Outcome::Value(Vec::new()) });
    let info = service_info(&dones(&env.to(driver))[0].1);
    assert_eq!((info.id, info.node.as_str()), (service, "w"));
    assert_eq!(env.saved.len(), 1);
    assert_eq!(env.saved[0][0].name, "counter");
    // A second start of the same name is refused; a lookup finds the first.
    let again = TaskId::new(driver, 2);
    env.send(driver, PeerToHead::StartService(counter_start(again, true)));
    assert!(matches!(dones(&env.to(driver))[..], [(_, Done::Failed(TaskError::InvalidCall { .. }))]));
    let call = TaskId::new(driver, 3);
    let method = "add".to_string();
    let args = vec![Arg::Value(value(5))];
    env.send(driver, PeerToHead::CallService { task: call, service, name: "counter".into(), method, args });
    let sent = env.to(worker);
    assert!(
        matches!(&sent[..], [HeadToPeer::CallInstance { task, method, .. }] if *task == call && method == "add")
    );
    env.send(worker, PeerToHead::Finished { task: call, attempt: 0, outcome: Outcome::Value(value(5)) });
    assert_eq!(dones(&env.to(driver)), [(call, Done::Value(value(5)))]);
    // Stopping: the host is asked, and the service ends (and is forgotten) when it confirms.
    let stop = TaskId::new(driver, 4);
    env.send(driver, PeerToHead::StopService { task: stop, service });
    assert!(matches!(env.to(worker)[..], [HeadToPeer::StopInstance { .. }]));
    env.send(worker, PeerToHead::InstanceStopped { service });
    assert_eq!(dones(&env.to(driver)).len(), 1);
    assert_eq!(env.saved.last().map(Vec::len), Some(0));
    assert_eq!(env.core.scheduler().node_free(NodeId(1)), Resources::parse("CPU=1,node:w=1").ok());
}

#[test]
fn a_call_to_a_service_on_a_lost_node_fails_and_the_name_is_free_again() {
    let mut env = Env::new();
    let worker = env.worker("w", "CPU=1", &[]);
    let driver = env.driver();
    let start = TaskId::new(driver, 1);
    env.send(driver, PeerToHead::StartService(counter_start(start, false)));
    let sent = env.to(worker);
    let [HeadToPeer::StartInstance { service, .. }] = &sent[..] else { panic!("{sent:?}") };
    let service = *service;
    env.send(worker, PeerToHead::Finished { task: start, attempt: 0, outcome: Outcome::Value(Vec::new()) });
    env.to(driver);
    let call = TaskId::new(driver, 2);
    let method = "add".to_string();
    env.send(
        driver,
        PeerToHead::CallService { task: call, service, name: "counter".into(), method, args: vec![] },
    );
    env.core.close_session(env.now, worker, "gone");
    env.collect();
    let done = dones(&env.to(driver));
    assert!(matches!(&done[..], [(t, Done::Failed(TaskError::WorkerLost { .. }))] if *t == call), "{done:?}");
    let lookup = TaskId::new(driver, 3);
    env.send(
        driver,
        PeerToHead::LookupService { task: lookup, name: "counter".into(), namespace: "default".into() },
    );
    let done = dones(&env.to(driver));
    let Done::Value(found) = &done[0].1 else { panic!("{done:?}") };
    assert_eq!(rmp_serde::from_slice::<Option<ServiceInfo>>(found).expect("an answer"), None);
}

fn journaled() -> CoreOptions {
    CoreOptions { journal_id: Some(77), resume_grace: Duration::from_secs(60), ..CoreOptions::default() }
}

impl Env {
    /// The head is killed now and started again from what it kept: a new environment around
    /// the recovered core, a little later.
    fn restart(&self) -> Env {
        let now = self.now + Duration::from_secs(2);
        let (core, _) = HeadCore::recover(now, journaled(), self.kept.clone()).expect("the journal replays");
        let mut env = Env { core, now, ..Env::with(journaled()) };
        env.kept = self.kept.clone();
        env.collect();
        env
    }

    fn resume(&mut self, session: SessionId, known: Vec<TaskAttempt>, waiting: Vec<TaskId>) -> u64 {
        self.resume_with_starts(session, known, waiting, vec![])
    }

    fn resume_with_starts(
        &mut self,
        session: SessionId,
        known: Vec<TaskAttempt>,
        waiting: Vec<TaskId>,
        starts: Vec<UnansweredStart>,
    ) -> u64 {
        let resume = ResumeSession {
            protocol_version: PROTOCOL_VERSION,
            session,
            journal_id: 77,
            known,
            waiting,
            starts,
        };
        let resumed = self.core.open_session(self.now, "test", PeerToHead::Resume(resume));
        assert_eq!(resumed, Ok(session));
        self.collect();
        let sent = self.to(session);
        let Some(HeadToPeer::Welcome { resumed_through, .. }) = sent.first() else { panic!("{sent:?}") };
        let through = *resumed_through;
        self.sent.extend(sent.into_iter().skip(1).map(|m| (session, m)));
        through
    }
}

#[test]
fn only_state_changes_are_kept_and_frames_are_counted() {
    let mut env = Env::with(journaled());
    let worker = env.worker("w", "CPU=1", &["f"]);
    let driver = env.driver();
    env.send(driver, PeerToHead::Ping { nonce: 1 });
    let task = env.submit(driver, 1, "f", vec![]);
    env.send(worker, PeerToHead::Heartbeat);
    env.send(worker, PeerToHead::Finished { task, attempt: 1, outcome: Outcome::Value(value(1)) });
    let kinds: Vec<String> = env
        .kept
        .iter()
        .map(|entry| match entry {
            JournalEntry::Opened { session, .. } => format!("opened {}", session.0),
            JournalEntry::Message { session, seq, .. } => format!("message {}#{seq}", session.0),
            other => format!("{other:?}"),
        })
        .collect();
    assert_eq!(kinds, ["opened 1", "opened 2", "message 2#2", "message 1#2"]);
}

#[test]
fn a_restarted_head_keeps_queued_and_running_tasks_and_answers_resumed_peers() {
    let mut env = Env::with(journaled());
    let worker = env.worker("w", "CPU=1", &["f"]);
    let driver = env.driver();
    let done = env.submit(driver, 1, "f", vec![]);
    let running = env.submit(driver, 2, "f", vec![]);
    let queued = env.submit(driver, 3, "f", vec![Arg::Ref(running)]);
    assert_eq!(executes(&env.to(worker)), [(done, 1)]);
    env.send(worker, PeerToHead::Finished { task: done, attempt: 1, outcome: Outcome::Value(value(1)) });
    assert_eq!(executes(&env.to(worker)), [(running, 1)]);

    let mut env = env.restart();
    assert_eq!(env.core.stats().tasks, 3);
    assert!(env.sent.is_empty(), "nobody is connected yet");
    // The worker still runs `running` and finished nothing meanwhile; the driver waits for all.
    let through = env.resume(worker, vec![TaskAttempt { task: running, attempt: 1 }], vec![]);
    assert_eq!(through, 1, "the head has its one frame, the report of `done`");
    assert!(executes(&env.to(worker)).is_empty(), "nothing lost in flight");
    env.resume(driver, vec![], vec![done, running, queued]);
    assert_eq!(dones(&env.to(driver)), [(done, Done::Value(value(1)))]);
    env.send(worker, PeerToHead::Finished { task: running, attempt: 1, outcome: Outcome::Value(value(2)) });
    assert_eq!(dones(&env.to(driver)), [(running, Done::Value(value(2)))]);
    let sent = env.to(worker);
    assert_eq!(executes(&sent), [(queued, 1)]);
    let HeadToPeer::Execute { args, .. } = &sent[0] else { unreachable!() };
    assert_eq!(args[0].0, value(2), "the recovered result is passed on");
}

#[test]
fn a_task_lost_on_its_way_to_a_worker_is_sent_again_when_it_resumes() {
    let mut env = Env::with(journaled());
    let worker = env.worker("w", "CPU=1", &["f"]);
    let driver = env.driver();
    let task = env.submit(driver, 1, "f", vec![Arg::Value(value(4))]);
    let mut env = env.restart();
    // The Execute died with the head: the worker does not know the task.
    env.resume(worker, vec![], vec![]);
    let sent = env.to(worker);
    assert_eq!(executes(&sent), [(task, 1)]);
    let HeadToPeer::Execute { args, .. } = &sent[0] else { unreachable!() };
    assert_eq!(args[0].0, value(4));
}

#[test]
fn a_peer_that_stays_away_past_the_grace_period_loses_its_session_and_its_tasks_run_elsewhere() {
    let mut env = Env::with(journaled());
    let lost = env.worker("a", "CPU=1", &["f"]);
    let driver = env.driver();
    let task = env.submit(driver, 1, "f", vec![]);
    let mut env = env.restart();
    env.resume(driver, vec![], vec![task]);
    let other = env.worker("b", "CPU=1", &["f"]);
    assert!(executes(&env.to(other)).is_empty(), "the task still runs on a, which may come back");
    assert_eq!(env.core.poll_timeout(), Some(env.now + Duration::from_secs(10)), "b's heartbeat deadline");
    env.advance(Duration::from_secs(9));
    env.send(other, PeerToHead::Heartbeat);
    env.timeout();
    assert!(env.closed.is_empty(), "a is not written off by heartbeat while it may come back");
    env.advance(Duration::from_secs(51));
    env.send(other, PeerToHead::Heartbeat);
    env.timeout();
    assert_eq!(env.closed, [lost]);
    assert_eq!(executes(&env.to(other)), [(task, 2)]);
    let late = ResumeSession {
        protocol_version: PROTOCOL_VERSION,
        session: lost,
        journal_id: 77,
        known: vec![],
        waiting: vec![],
        starts: vec![],
    };
    let refused = env.core.open_session(env.now, "test", PeerToHead::Resume(late)).unwrap_err();
    assert!(refused.reason.contains("grace period"), "{refused}");
}

#[test]
fn a_session_of_another_journal_or_a_live_one_cannot_be_taken_up() {
    let mut env = Env::with(journaled());
    let driver = env.driver();
    let mut env = env.restart();
    let other = ResumeSession {
        protocol_version: PROTOCOL_VERSION,
        session: driver,
        journal_id: 5,
        known: vec![],
        waiting: vec![],
        starts: vec![],
    };
    assert!(env.core.open_session(env.now, "test", PeerToHead::Resume(other.clone())).is_err());
    env.resume(driver, vec![], vec![]);
    let again = ResumeSession { journal_id: 77, ..other };
    assert!(env.core.open_session(env.now, "test", PeerToHead::Resume(again)).is_err(), "taken already");
}

#[test]
fn a_recovered_head_rebuilds_the_same_state_from_its_own_journal() {
    // Two restarts in a row: the second replays what the first kept too.
    let mut env = Env::with(journaled());
    let worker = env.worker("w", "CPU=2", &["f"]);
    let driver = env.driver();
    let first = env.submit(driver, 1, "f", vec![]);
    let mut env = env.restart();
    env.resume(worker, vec![TaskAttempt { task: first, attempt: 1 }], vec![]);
    env.resume(driver, vec![], vec![first]);
    let second = env.submit(driver, 2, "f", vec![]);
    assert_eq!(executes(&env.to(worker)), [(second, 1)]);
    let mut env = env.restart();
    assert_eq!(env.core.stats().tasks, 2);
    env.resume(
        worker,
        vec![TaskAttempt { task: first, attempt: 1 }, TaskAttempt { task: second, attempt: 1 }],
        vec![],
    );
    env.resume(driver, vec![], vec![first, second]);
    env.send(worker, PeerToHead::Finished { task: second, attempt: 1, outcome: Outcome::Value(value(2)) });
    env.send(worker, PeerToHead::Finished { task: first, attempt: 1, outcome: Outcome::Value(value(1)) });
    assert_eq!(dones(&env.to(driver)), [(second, Done::Value(value(2))), (first, Done::Value(value(1)))]);
}

#[test]
fn a_head_restarted_from_a_compacted_journal_acts_as_one_restarted_from_the_whole_journal() {
    let mut env = Env::with(journaled());
    let worker = env.worker("w", "CPU=1", &["f"]);
    let driver = env.driver();
    let done = env.submit(driver, 1, "f", vec![]);
    let running = env.submit(driver, 2, "f", vec![Arg::Ref(done)]);
    let queued = env.submit(driver, 3, "f", vec![]);
    env.send(worker, PeerToHead::Finished { task: done, attempt: 1, outcome: Outcome::Value(value(1)) });
    let start = TaskId::new(driver, 4);
    env.send(driver, PeerToHead::StartService(counter_start(start, false)));
    // Compacted here; what follows is kept after the snapshot.
    let mut compacted = env.kept.clone();
    let snapshot = env.core.snapshot().expect("the state encodes");
    let later = env.submit(driver, 5, "f", vec![Arg::Ref(running)]);
    compacted = [vec![snapshot], env.kept[compacted.len()..].to_vec()].concat();
    let whole = env.restart();
    let mut from_snapshot = env.restart();
    from_snapshot.kept = compacted.clone();
    let from_snapshot = from_snapshot.restart();
    assert_eq!(from_snapshot.kept[..compacted.len()], compacted[..], "it goes on from the compacted journal");
    // The same peers come back and say the same: both heads answer alike.
    let script = |mut env: Env| {
        let stats = env.core.stats().tasks;
        let runs = executes(
            &env.sent.iter().filter(|(to, _)| *to == worker).map(|(_, m)| m.clone()).collect::<Vec<_>>(),
        );
        env.resume(worker, vec![TaskAttempt { task: running, attempt: 1 }], vec![]);
        env.resume(driver, vec![], vec![done, running, queued, later]);
        for (task, attempt) in executes(&env.to(worker)) {
            let outcome = Outcome::Value(value(task.seq() as u8));
            env.send(worker, PeerToHead::Finished { task, attempt, outcome });
        }
        env.send(
            worker,
            PeerToHead::Finished { task: running, attempt: 1, outcome: Outcome::Value(value(2)) },
        );
        (stats, runs, std::mem::take(&mut env.sent))
    };
    let (whole, from_snapshot) = (script(whole), script(from_snapshot));
    assert_eq!(whole.0, 5, "done, running, queued, later, the start");
    assert!(
        whole
            .2
            .iter()
            .any(|(to, m)| *to == driver && matches!(m, HeadToPeer::Done { task, .. } if *task == done))
    );
    assert_eq!(format!("{whole:?}"), format!("{from_snapshot:?}"));
}

/// Seed 5235: with `max_restarts` 1, the budget left after the one restart (`UpTo(0)`) was
/// taken for one more restart, while a snapshot (which keeps it as the integer 0, read back as
/// `Never`) had none: a head restarted from a compacted journal wrote off the service the
/// previous run had restarted, and the instance its host built was never stopped.
#[test]
fn a_service_restarts_as_often_as_max_restarts_allows_and_a_snapshot_agrees() {
    let mut env = Env::with(journaled());
    let first = env.worker("w1", "CPU=1", &[]);
    let driver = env.driver();
    let start = TaskId::new(driver, 1);
    let once = ServiceStart { max_restarts: chia_core::Retries::UpTo(1), ..counter_start(start, false) };
    env.send(driver, PeerToHead::StartService(once));
    assert!(matches!(env.to(first)[..], [HeadToPeer::StartInstance { .. }]));
    env.send(first, PeerToHead::Finished { task: start, attempt: 0, outcome: Outcome::Value(Vec::new()) });
    assert_eq!(dones(&env.to(driver)).len(), 1, "the service is up");
    let second = env.worker("w2", "CPU=1", &[]);
    env.core.close_session(env.now, first, "gone");
    env.collect();
    let sent = env.to(second);
    let [HeadToPeer::StartInstance { task: restart, .. }] = sent[..] else {
        panic!("restarted once: {sent:?}")
    };
    env.send(second, PeerToHead::Finished { task: restart, attempt: 0, outcome: Outcome::Value(Vec::new()) });
    let third = env.worker("w3", "CPU=1", &[]);
    let mut from_snapshot = env.restart();
    from_snapshot.kept = vec![env.core.snapshot().expect("the state encodes")];
    let mut from_snapshot = from_snapshot.restart();
    for session in [second, third, driver] {
        from_snapshot.resume(session, vec![], vec![]);
        // Heard from since: its connection's end is a loss, not a resume to try again.
        from_snapshot.send(session, PeerToHead::Heartbeat);
    }
    from_snapshot.to(driver);
    // Its one restart is used: losing its node again ends it, on the live head as on one
    // restored from the snapshot.
    for env in [&mut env, &mut from_snapshot] {
        env.core.close_session(env.now, second, "gone");
        env.collect();
        let sent = env.to(third);
        assert!(sent.is_empty(), "not restarted a second time: {sent:?}");
        let lookup = TaskId::new(driver, 2);
        let name = "counter".to_string();
        env.send(driver, PeerToHead::LookupService { task: lookup, name, namespace: "default".into() });
        let done = dones(&env.to(driver));
        let [(_, Done::Value(found))] = &done[..] else { panic!("{done:?}") };
        assert_eq!(rmp_serde::from_slice::<Option<ServiceInfo>>(found).expect("an answer"), None);
    }
}

#[test]
fn after_a_restart_nothing_new_goes_to_a_worker_until_it_is_back() {
    let mut env = Env::with(journaled());
    let a = env.worker("a", "CPU=1", &["f"]);
    let b = env.worker("b", "CPU=1", &["f"]);
    let driver = env.driver();
    let first = env.submit(driver, 1, "f", vec![]);
    let (busy, idle) = if executes(&env.to(a)) == [(first, 1)] { (a, b) } else { (b, a) };
    let mut env = env.restart();
    env.resume(driver, vec![], vec![first]);
    let second = env.submit(driver, 2, "f", vec![]);
    env.resume(busy, vec![TaskAttempt { task: first, attempt: 1 }], vec![]);
    assert!(executes(&env.to(busy)).is_empty(), "it has no room");
    assert!(executes(&env.to(idle)).is_empty(), "it is not back yet");
    assert_eq!(env.core.scheduler.task_status(second), Some(crate::scheduler::TaskStatus::Queued));
    env.resume(idle, vec![], vec![]);
    assert_eq!(executes(&env.to(idle)), [(second, 1)], "back, it takes the queued task");
    // A replay of this run decides the same: the second task still runs on the idle worker.
    let mut env = env.restart();
    env.resume(idle, vec![TaskAttempt { task: second, attempt: 1 }], vec![]);
    assert!(env.to(idle).is_empty(), "{:?}", env.to(idle));
    let node = env.core.sessions[&idle].node.expect("a worker's node");
    assert_eq!(env.core.scheduler.task_status(second), Some(crate::scheduler::TaskStatus::Running { node }));
}

#[test]
fn a_service_running_on_a_resumed_worker_lives_on_and_a_lost_start_answer_comes_again() {
    let mut env = Env::with(journaled());
    let worker = env.worker("w", "CPU=1", &[]);
    let driver = env.driver();
    let start = TaskId::new(driver, 1);
    env.send(driver, PeerToHead::StartService(counter_start(start, false)));
    let sent = env.to(worker);
    let [HeadToPeer::StartInstance { service, .. }] = &sent[..] else { panic!("{sent:?}") };
    let service = *service;
    env.send(worker, PeerToHead::Finished { task: start, attempt: 0, outcome: Outcome::Value(Vec::new()) });
    let mut env = env.restart();
    // The worker's constructor report is durable, so it no longer lists the start; its
    // instance lives on. The driver never saw the answer and waits for it.
    env.resume(worker, vec![], vec![]);
    assert!(env.to(worker).is_empty(), "nothing is torn down or sent again");
    env.resume(driver, vec![], vec![start]);
    assert_eq!(service_info(&dones(&env.to(driver))[0].1).id, service);
    let call = TaskId::new(driver, 2);
    let method = "add".to_string();
    env.send(
        driver,
        PeerToHead::CallService { task: call, service, name: "counter".into(), method, args: vec![] },
    );
    assert!(matches!(env.to(worker)[..], [HeadToPeer::CallInstance { .. }]), "the service still serves");
}

#[test]
fn a_refused_start_whose_answer_died_with_the_head_is_answered_once_after_the_resume() {
    let mut env = Env::with(journaled());
    let worker = env.worker("w", "CPU=1", &[]);
    let (first, second) = (env.driver(), env.driver());
    let taken = TaskId::new(first, 1);
    env.send(first, PeerToHead::StartService(counter_start(taken, false)));
    env.send(worker, PeerToHead::Finished { task: taken, attempt: 0, outcome: Outcome::Value(Vec::new()) });
    // The name is taken: refused at once, leaving no record. The answer never arrives.
    let refused = TaskId::new(second, 1);
    env.send(second, PeerToHead::StartService(counter_start(refused, false)));
    assert!(matches!(&dones(&env.to(second))[..], [(_, Done::Failed(TaskError::InvalidCall { .. }))]));
    let mut env = env.restart();
    env.resume(worker, vec![], vec![]);
    // The first driver's answered start, sent along by mistake, is known and left alone.
    let unanswered = |frame, task| UnansweredStart { frame, start: counter_start(task, false) };
    env.resume_with_starts(first, vec![], vec![taken], vec![unanswered(1, taken)]);
    assert_eq!(dones(&env.to(first)).len(), 1, "its start is answered again from its record");
    // A start in a frame the head does not have comes again with the frames after the
    // welcome: it is not decided from the list.
    let unsent = TaskId::new(second, 2);
    let through = env.resume_with_starts(
        second,
        vec![],
        vec![refused, unsent],
        vec![unanswered(1, refused), unanswered(2, unsent)],
    );
    assert_eq!(through, 1);
    let answers = dones(&env.to(second));
    assert!(
        matches!(&answers[..], [(task, Done::Failed(TaskError::InvalidCall { .. }))] if *task == refused),
        "{answers:?}"
    );
    // Decided again on replay too: a second restart does not start anything new.
    let mut env = env.restart();
    env.resume(worker, vec![], vec![]);
    assert!(env.to(worker).is_empty(), "{:?}", env.to(worker));
}

#[test]
fn a_session_whose_connection_drops_right_after_resuming_may_resume_again() {
    let mut env = Env::with(journaled());
    let driver = env.driver();
    let mut env = env.restart();
    env.resume(driver, vec![], vec![]);
    // The welcome never reached the driver: its connection ends before it sends anything.
    env.core.close_session(env.now, driver, "connection lost");
    env.collect();
    assert!(env.closed.is_empty());
    env.resume(driver, vec![], vec![]);
    // Once it has spoken on the new connection, a lost connection ends the session as usual.
    env.send(driver, PeerToHead::Ping { nonce: 1 });
    env.core.close_session(env.now, driver, "connection lost");
    env.collect();
    assert_eq!(env.closed, [driver]);
}

#[test]
fn a_service_stopped_while_being_built_answers_its_start_and_its_stop_once_dropped() {
    let mut env = Env::new();
    let worker = env.worker("w", "CPU=1", &[]);
    let driver = env.driver();
    let start = TaskId::new(driver, 1);
    env.send(driver, PeerToHead::StartService(counter_start(start, false)));
    let sent = env.to(worker);
    let [HeadToPeer::StartInstance { service, .. }] = &sent[..] else { panic!("{sent:?}") };
    let service = *service;
    let stop = TaskId::new(driver, 2);
    env.send(driver, PeerToHead::StopService { task: stop, service });
    assert!(dones(&env.to(driver)).is_empty(), "the name stays taken until the instance is gone");
    env.send(worker, PeerToHead::Finished { task: start, attempt: 0, outcome: Outcome::Value(Vec::new()) });
    assert!(matches!(env.to(worker)[..], [HeadToPeer::StopInstance { .. }]), "built, so dropped now");
    env.send(worker, PeerToHead::InstanceStopped { service });
    let done = dones(&env.to(driver));
    assert!(
        matches!(&done[..], [(s, Done::Failed(TaskError::ServiceUnavailable { .. })), (t, Done::Value(_))]
        if *s == start && *t == stop),
        "{done:?}"
    );
    assert_eq!(env.core.scheduler().node_free(NodeId(1)), Resources::parse("CPU=1,node:w=1").ok());
}

/// The `(task, attempt, timeout_ms)` of every `Execute` among `messages`.
fn timed_executes(messages: &[HeadToPeer]) -> Vec<(TaskId, u32, Option<u64>)> {
    messages
        .iter()
        .filter_map(|m| match m {
            HeadToPeer::Execute { task, attempt, timeout_ms, .. } => Some((*task, *attempt, *timeout_ms)),
            _ => None,
        })
        .collect()
}

#[test]
fn a_calls_timeout_goes_with_every_run_and_survives_a_restart_from_a_snapshot() {
    let mut env = Env::with(journaled());
    let worker = env.worker("w", "CPU=1", &["f"]);
    let driver = env.driver();
    let task = TaskId::new(driver, 1);
    let untimed = TaskId::new(driver, 2);
    let timed = TaskSpec {
        retry_exceptions: true,
        max_retries: chia_core::Retries::UpTo(1),
        timeout_ms: Some(2500),
        ..spec(task, "f", vec![])
    };
    env.send(driver, PeerToHead::Submit(timed));
    env.send(driver, PeerToHead::Submit(spec(untimed, "f", vec![])));
    assert_eq!(timed_executes(&env.to(worker)), [(task, 1, Some(2500))]);
    let timed_out = |attempt| TaskError::TimedOut { function: "f".into(), timeout_ms: 2500, attempt };
    env.send(worker, PeerToHead::Finished { task, attempt: 1, outcome: Outcome::Failed(timed_out(1)) });
    assert_eq!(timed_executes(&env.to(worker)), [(task, 2, Some(2500))], "run again, with its timeout");
    // The head dies with the second run's Execute unsent as far as the worker knows, and comes
    // back from a snapshot alone: the record keeps the timeout.
    env.kept = vec![env.core.snapshot().expect("the state encodes")];
    let mut env = env.restart();
    env.resume(worker, vec![], vec![]);
    assert_eq!(timed_executes(&env.to(worker)), [(task, 2, Some(2500))]);
    env.resume(driver, vec![], vec![task, untimed]);
    env.send(worker, PeerToHead::Finished { task, attempt: 2, outcome: Outcome::Failed(timed_out(2)) });
    assert_eq!(dones(&env.to(driver)), [(task, Done::Failed(timed_out(2)))], "no attempts left");
    assert_eq!(timed_executes(&env.to(worker)), [(untimed, 1, None)]);
}

// ---------------------------------------------------------------- what the head tells of itself

fn ask(env: &mut Env, asker: SessionId, query: chia_core::inspect::Query) -> chia_core::inspect::Answer {
    let task = TaskId::new(asker, 1_000_000 + env.core.sessions[&asker].frames);
    env.send(asker, PeerToHead::Inspect { task, query });
    let answers: Vec<(TaskId, Done)> =
        dones(&env.to(asker)).into_iter().filter(|(t, _)| *t == task).collect();
    match answers.as_slice() {
        [(t, Done::Value(bytes))] if *t == task => rmp_serde::from_slice(bytes).expect("an answer"),
        other => panic!("no answer to the query: {other:?}"),
    }
}

#[test]
fn the_watchdog_reports_a_task_that_fits_and_is_left_queued_and_not_one_that_fits_nowhere() {
    use chia_core::inspect::{Answer, Query, Reason};
    let mut env = Env::with(CoreOptions { stuck_after: Duration::from_secs(60), ..CoreOptions::default() });
    let worker = env.worker("w", "CPU=2", &["held", "f"]);
    let driver = env.driver();
    crate::planted::plant(Some(crate::planted::PlantedBug::NeverPlace("held")));
    let held = env.submit(driver, 1, "held", vec![]);
    let nowhere = TaskId::new(driver, 2);
    let mut big = spec(nowhere, "f", vec![]);
    big.request = Resources::parse("CPU=8").expect("valid");
    env.send(driver, PeerToHead::Submit(big));
    crate::planted::plant(None);
    // Looks come while tasks are queued (the worker's heartbeats keep it joined); one that
    // fits is reported only once it has fitted, unplaced, for the whole threshold.
    let started = env.now;
    while env.now < started + Duration::from_secs(59) {
        let deadline = env.core.poll_timeout().expect("the watchdog looks while tasks are queued");
        assert!(deadline <= env.now + Duration::from_secs(15), "a look at least every quarter threshold");
        if deadline >= started + Duration::from_secs(59) {
            break;
        }
        env.now = deadline.max(env.now);
        env.send(worker, PeerToHead::Heartbeat);
        env.timeout();
        assert!(env.core.status().stuck.is_empty(), "not yet a minute");
        env.advance(Duration::from_millis(1));
    }
    env.advance(Duration::from_secs(15));
    env.send(worker, PeerToHead::Heartbeat);
    env.timeout();
    let stuck = env.core.status().stuck;
    assert_eq!(stuck.len(), 1, "{stuck:?}");
    assert_eq!((stuck[0].function.as_str(), stuck[0].fits_on.as_str(), stuck[0].queued), ("held", "w", 1));
    assert_eq!(env.core.metrics().stuck_found, 1);
    let Answer::Explain(why) = ask(&mut env, driver, Query::Explain(held)) else { panic!("an explanation") };
    assert_eq!(why.reasons, [Reason::FitsNow { node: "w".into() }]);
    let Answer::Explain(why) = ask(&mut env, driver, Query::Explain(nowhere)) else {
        panic!("an explanation")
    };
    assert!(
        matches!(&why.reasons[..], [Reason::NeverFits { node, short }] if node == "w" && short[0].resource == "CPU"),
        "{why:?}"
    );
    // Looked at again, it stays found, and is counted once.
    env.advance(Duration::from_secs(20));
    env.send(worker, PeerToHead::Heartbeat);
    env.timeout();
    assert_eq!(env.core.metrics().stuck_found, 1);
    assert_eq!(env.core.status().stuck.len(), 1);
}

#[test]
fn counts_listings_and_the_memory_of_ended_tasks_follow_the_tasks() {
    use chia_core::inspect::{Answer, Query, TaskFilter, TaskState};
    let mut env = Env::new();
    let worker = env.worker("w", "CPU=1", &["f"]);
    let driver = env.driver();
    let first = env.submit(driver, 1, "f", vec![Arg::Value(value(1))]);
    let second = env.submit(driver, 2, "f", vec![Arg::Ref(first)]);
    let third = env.submit(driver, 3, "f", vec![]);
    let status = env.core.status();
    assert_eq!((status.tasks.running, status.tasks.waiting, status.tasks.queued), (1, 1, 1));
    assert_eq!(status.totals.submitted, 3);
    env.send(worker, PeerToHead::Finished { task: first, attempt: 1, outcome: Outcome::Value(value(7)) });
    let status = env.core.status();
    assert_eq!(
        (status.tasks.running, status.tasks.waiting, status.tasks.queued, status.tasks.ended),
        (1, 0, 1, 1)
    );
    assert_eq!(status.result_bytes, 3);
    let listing = |env: &mut Env, filter: TaskFilter| match ask(env, driver, Query::Tasks(filter)) {
        Answer::Tasks(page) => page,
        other => panic!("{other:?}"),
    };
    let page = listing(&mut env, TaskFilter { limit: 10, ..TaskFilter::default() });
    let listed: Vec<(TaskId, TaskState)> = page.tasks.iter().map(|t| (t.task, t.state)).collect();
    // The room goes to the task queued first, before the one this finish made ready.
    assert_eq!(
        listed,
        [(third, TaskState::Running), (second, TaskState::Queued), (first, TaskState::Finished)]
    );
    assert_eq!(page.tasks[2].argument_bytes, 3);
    env.send(worker, PeerToHead::Finished { task: third, attempt: 1, outcome: Outcome::Value(value(9)) });
    env.send(worker, PeerToHead::Finished { task: second, attempt: 1, outcome: Outcome::Value(value(8)) });
    // Released and no longer needed: freed, and remembered as it ended.
    env.send(driver, PeerToHead::Release { tasks: vec![first] });
    assert!(!env.core.tasks.contains_key(&first));
    let page = listing(
        &mut env,
        TaskFilter { state: Some(TaskState::Finished), limit: 10, ..TaskFilter::default() },
    );
    let finished: Vec<TaskId> = page.tasks.iter().map(|t| t.task).collect();
    assert_eq!(finished, [third, second, first]);
    let Answer::Task(Some(shown)) = ask(&mut env, driver, Query::Task(first)) else { panic!("remembered") };
    assert_eq!((shown.attempts.len(), shown.attempts[0].outcome.as_deref()), (1, Some("finished")));
    assert_eq!(env.core.status().result_bytes, 6, "the second's and third's values are held now");
    // A bad tag pattern is refused with the reason.
    let answer = ask(
        &mut env,
        driver,
        Query::Tasks(TaskFilter { tag: Some("(".into()), limit: 1, ..TaskFilter::default() }),
    );
    assert!(matches!(answer, Answer::Refused { .. }), "{answer:?}");
    env.core.check_consistency().expect("counts agree with the records");
}

#[test]
fn a_workers_figures_are_kept_within_bounds_until_its_next_report() {
    use crate::observe::{MAX_FIGURE_TEXT, MAX_SERVICE_FIGURES};
    use chia_core::protocol::{ServiceFigure, WorkerFigures};
    let mut env = Env::new();
    let worker = env.worker("w", "CPU=1", &[]);
    let figure = |name: String| ServiceFigure {
        service: "svc".into(),
        name,
        help: "help".into(),
        counter: true,
        value: 1,
    };
    let mut services: Vec<ServiceFigure> =
        (0..MAX_SERVICE_FIGURES + 10).map(|i| figure(format!("f{i}"))).collect();
    services.insert(0, figure("x".repeat(MAX_FIGURE_TEXT + 1)));
    let figures =
        WorkerFigures { memory_bytes: 7, cpu_ms: 3, running: 1, attempts: 2, bypassed: 0, services };
    env.send(worker, PeerToHead::Figures(figures));
    let nodes = env.core.metrics().nodes;
    let kept = nodes.iter().find(|n| n.name == "w").and_then(|n| n.figures.clone()).expect("figures kept");
    assert_eq!((kept.memory_bytes, kept.cpu_ms, kept.running, kept.attempts), (7, 3, 1, 2));
    assert_eq!(kept.services.len(), MAX_SERVICE_FIGURES);
    assert_eq!(kept.services[0].name, "f0", "the figure with an overlong name is dropped");
    // A plain heartbeat keeps the last figures; the next report replaces them.
    env.send(worker, PeerToHead::Heartbeat);
    env.send(worker, PeerToHead::Figures(WorkerFigures { memory_bytes: 9, ..WorkerFigures::default() }));
    let nodes = env.core.metrics().nodes;
    let kept = nodes.iter().find(|n| n.name == "w").and_then(|n| n.figures.clone()).expect("figures kept");
    assert_eq!((kept.memory_bytes, kept.services.len()), (9, 0));
}

#[test]
fn a_head_restored_from_a_snapshot_lists_every_task_in_order() {
    use chia_core::inspect::{Answer, Query, TaskFilter};
    let mut env = Env::with(journaled());
    let _worker = env.worker("w", "CPU=1", &["f"]);
    let driver = env.driver();
    let before: Vec<TaskId> = (1..=3).map(|seq| env.submit(driver, seq, "f", vec![])).collect();
    env.kept = vec![env.core.snapshot().expect("the state encodes")];
    let after: Vec<TaskId> = (4..=5).map(|seq| env.submit(driver, seq, "f", vec![])).collect();
    let mut env = env.restart();
    env.resume(driver, vec![], before.iter().chain(&after).copied().collect());
    env.core.check_consistency().expect("orders are unique and counts agree");
    // One task a page: every page goes on from the last, and none is skipped.
    let mut listed = Vec::new();
    let mut after_position = None;
    loop {
        let filter = TaskFilter { limit: 1, after: after_position, ..TaskFilter::default() };
        let Answer::Tasks(page) = ask(&mut env, driver, Query::Tasks(filter)) else { panic!("a page") };
        listed.extend(page.tasks.iter().map(|t| t.task));
        match page.next {
            Some(next) => after_position = Some(next),
            None => break,
        }
    }
    let newest_first: Vec<TaskId> = before.iter().chain(&after).rev().copied().collect();
    assert_eq!(listed, newest_first);
}

#[test]
fn explain_says_when_no_node_offers_the_function_or_only_another_signature() {
    use chia_core::inspect::{Answer, Query, Reason};
    let mut env = Env::new();
    let worker = env.worker("w", "CPU=1", &["g"]);
    let driver = env.driver();
    let running = env.submit(driver, 1, "g", vec![]);
    let queued = env.submit(driver, 2, "g", vec![]);
    let explain = |env: &mut Env, task| match ask(env, driver, Query::Explain(task)) {
        Answer::Explain(why) => why.reasons,
        other => panic!("{other:?}"),
    };
    assert_eq!(explain(&mut env, running), [Reason::Running { node: "w".into(), attempt: 1 }]);
    assert!(
        matches!(&explain(&mut env, queued)[..], [Reason::Busy { node, .. }, Reason::Behind { .. }] | [Reason::Busy { node, .. }] if node == "w")
    );
    env.core.close_session(env.now, worker, "gone");
    env.collect();
    // Both wait again, for a node with `g` that is not there.
    assert_eq!(explain(&mut env, queued).first(), Some(&Reason::NoNodeOffers { function: "g".into() }));
    let other_build = WorkerOffer {
        resources: Resources::parse("CPU=1").expect("valid"),
        functions: vec![FunctionKey::new("g", "ffffffffffffffff")],
        services: Vec::new(),
        head_node: false,
        labels: Default::default(),
    };
    env.open_from("10.0.0.9:4000", "w2", Some(other_build));
    assert_eq!(
        explain(&mut env, queued).first(),
        Some(&Reason::SignatureDiffers {
            function: "g".into(),
            wanted: SIG.into(),
            offered: vec!["ffffffffffffffff".into()]
        })
    );
}

// ---- placement ----

fn labelled_worker(env: &mut Env, name: &str, resources: &str, labels: &str) -> SessionId {
    let offer = WorkerOffer {
        resources: Resources::parse(resources).expect("valid resources"),
        functions: vec![FunctionKey::new("f", SIG)],
        services: Vec::new(),
        head_node: false,
        labels: chia_core::placement::Labels::parse(labels).expect("valid labels"),
    };
    env.open(name, Some(offer))
}

fn group_spec(task: TaskId, bundles: &[&str], strategy: chia_core::placement::GroupStrategy) -> PeerToHead {
    PeerToHead::CreateGroup(chia_core::placement::GroupSpec {
        group: chia_core::placement::GroupId(task),
        bundles: bundles.iter().map(|b| Resources::parse(b).expect("valid")).collect(),
        strategy,
        detached: false,
        job: None,
    })
}

#[test]
fn a_worker_offering_group_resources_or_malformed_labels_is_refused() {
    let mut env = Env::new();
    let mut offer = WorkerOffer {
        resources: Resources::parse("CPU=1,group:0:any:CPU=4").expect("valid"),
        functions: Vec::new(),
        services: Vec::new(),
        head_node: false,
        labels: Default::default(),
    };
    let hello = |offer: &WorkerOffer| PeerToHead::Hello {
        protocol_version: PROTOCOL_VERSION,
        name: "w".into(),
        worker: Some(offer.clone()),
    };
    let rejection = env.core.open_session(env.now, "test", hello(&offer)).unwrap_err();
    assert!(rejection.reason.contains("group:0:any:CPU"), "{rejection}");
    offer.resources = Resources::parse("CPU=1").expect("valid");
    // Labels decoded from a frame skip the parser's checks: the head checks them.
    offer.labels = rmp_serde::from_slice(
        &rmp_serde::to_vec_named(
            &[("rack", "a b")].into_iter().collect::<std::collections::BTreeMap<_, _>>(),
        )
        .unwrap(),
    )
    .unwrap();
    let rejection = env.core.open_session(env.now, "test", hello(&offer)).unwrap_err();
    assert!(
        rejection.reason.contains("the worker's labels") && rejection.reason.contains("rack"),
        "{rejection}"
    );
    assert_eq!(env.core.stats().sessions, 0);
}

#[test]
fn ready_is_answered_when_the_group_is_placed_and_a_restart_keeps_the_group() {
    use chia_core::placement::{BundleRef, GroupId, GroupStrategy, Placement};
    let mut env = Env::with(journaled());
    let w1 = labelled_worker(&mut env, "w1", "CPU=2", "rack=a");
    let driver = env.driver();
    let group = TaskId::new(driver, 1);
    env.send(driver, group_spec(group, &["CPU=1", "CPU=1"], GroupStrategy::StrictSpread));
    assert_eq!(dones(&env.to(driver)), [(group, Done::Value(rmp_serde::to_vec_named(&()).unwrap()))]);
    // One node for two STRICT_SPREAD bundles: ready says why it cannot be placed.
    let ready = TaskId::new(driver, 2);
    env.send(driver, PeerToHead::GroupReady { task: ready, group: GroupId(group) });
    let answer = dones(&env.to(driver));
    let [(t, Done::Failed(TaskError::PlacementGroup { problem, .. }))] = answer.as_slice() else {
        panic!("{answer:?}")
    };
    assert_eq!(*t, ready);
    assert!(problem.to_string().contains("only 1 connected node(s) can hold one: w1"), "{problem}");
    // A call in it waits; a second worker makes it placeable, answering a waiting ready.
    let call = TaskId::new(driver, 3);
    let mut in_bundle = spec(call, "f", vec![]);
    in_bundle.placement = Placement {
        group: Some(BundleRef { group: GroupId(group), bundle: Some(1) }),
        ..Placement::default()
    }
    .boxed();
    env.send(driver, PeerToHead::Submit(in_bundle));
    assert!(env.to(driver).is_empty(), "{call} waits for its group, not reported infeasible");
    let w2 = labelled_worker(&mut env, "w2", "CPU=2", "rack=b");
    let ready = TaskId::new(driver, 4);
    env.send(driver, PeerToHead::GroupReady { task: ready, group: GroupId(group) });
    let answer = dones(&env.to(driver));
    let [(t, Done::Value(bytes))] = answer.as_slice() else { panic!("{answer:?}") };
    let nodes: Vec<String> = rmp_serde::from_slice(bytes).unwrap();
    assert_eq!(*t, ready);
    assert!(nodes.contains(&"w1".to_string()) && nodes.contains(&"w2".to_string()), "{nodes:?}");
    let (bundle_1, other) = if nodes[1] == "w1" { (w1, w2) } else { (w2, w1) };
    assert!(executes(&env.to(other)).is_empty());
    assert_eq!(executes(&env.to(bundle_1)), [(call, 1)], "the call runs where bundle 1 is");
    // A group that fits but not now: its ready waits, and is answered once room is back.
    let second = TaskId::new(driver, 6);
    env.send(driver, group_spec(second, &["CPU=2"], GroupStrategy::StrictPack));
    env.to(driver);
    let waiting = TaskId::new(driver, 7);
    env.send(driver, PeerToHead::GroupReady { task: waiting, group: GroupId(second) });
    assert!(env.to(driver).is_empty(), "it waits");
    // A restart from the journal keeps the group where it was.
    let mut env = env.restart();
    env.resume(driver, vec![], vec![]);
    env.resume(bundle_1, vec![TaskAttempt { task: call, attempt: 1 }], vec![]);
    env.resume(other, vec![], vec![]);
    let ready = TaskId::new(driver, 5);
    env.send(driver, PeerToHead::GroupReady { task: ready, group: GroupId(group) });
    assert_eq!(dones(&env.to(driver)), [(ready, Done::Value(rmp_serde::to_vec_named(&nodes).unwrap()))]);
    env.send(driver, PeerToHead::GroupReady { task: waiting, group: GroupId(second) });
    assert!(env.to(driver).is_empty(), "asked again after the restart, it waits again");
    env.send(driver, PeerToHead::RemoveGroup { task: TaskId::new(driver, 8), group: GroupId(group) });
    let answers = dones(&env.to(driver));
    assert_eq!(answers.len(), 2, "{answers:?}");
    assert!(answers.iter().any(|(t, done)| *t == waiting && matches!(done, Done::Value(_))), "{answers:?}");
    // Removed with its job when the driver leaves.
    env.core.close_session(env.now, driver, "gone");
    env.collect();
    assert_eq!(env.core.scheduler().group_count(), 0);
}
