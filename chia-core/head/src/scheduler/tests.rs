//! Scenario tests: a small environment (like HyperQueue's test env) feeds events to a
//! [`Scheduler`] and returns the commands each one produced. Deterministic: no network, no sleeps.

use super::*;
use chia_core::placement::GroupProblem;
use chia_core::resources::CPU;
use std::time::Duration;

/// The scheduler under test, with the helpers a scenario needs.
struct Env {
    sched: Scheduler,
    now: Instant,
    /// Nodes acknowledge each dispatch at once, as live workers do; off, a dispatch stays
    /// unacknowledged until the scenario says so.
    acks: bool,
}

impl Env {
    fn new() -> Env {
        Env { sched: Scheduler::new(), now: Instant::now(), acks: true }
    }

    /// The connected nodes, sorted: picking from a hash map's order would make a seeded run
    /// differ from one process to the next.
    fn node_ids(&self) -> Vec<NodeId> {
        let mut ids: Vec<NodeId> = self.sched.node_index.keys().copied().collect();
        ids.sort_unstable();
        ids
    }

    /// Applies `event` and returns what it produced.
    fn event(&mut self, event: Event) -> Vec<Command> {
        self.sched.handle(self.now, event);
        let commands: Vec<Command> = self.sched.drain_commands().collect();
        if self.acks {
            for command in &commands {
                if let &Command::Dispatch { task, node, .. } = command {
                    self.sched.handle(self.now, Event::TaskStarted { task, node });
                    assert!(
                        self.sched.drain_commands().next().is_none(),
                        "an acknowledgement decides nothing"
                    );
                }
            }
        }
        commands
    }

    /// Node `id` named `w<id>`, with `resources` and functions named in `functions` (hash `h`).
    fn join(&mut self, id: u64, resources: &str, functions: &[&str]) -> Vec<Command> {
        let functions = functions.iter().map(|f| key(f)).collect();
        self.join_with(id, resources, functions)
    }

    fn join_with(&mut self, id: u64, resources: &str, functions: Vec<FunctionKey>) -> Vec<Command> {
        let resources = Resources::parse(resources).unwrap();
        let labels = Labels::new();
        self.event(Event::NodeJoined {
            node: NodeId(id),
            name: format!("w{id}"),
            resources,
            functions,
            labels,
            paused: false,
        })
    }

    fn lose(&mut self, id: u64) -> Vec<Command> {
        self.event(Event::NodeLost { node: NodeId(id) })
    }

    /// Submits a task that is never retried: scenarios about retries say how many they allow.
    fn submit(&mut self, task: TaskId, function: &str, request: &str, deps: &[TaskId]) -> Vec<Command> {
        self.submit_key(task, key(function), request, deps)
    }

    fn submit_key(
        &mut self,
        task: TaskId,
        function: FunctionKey,
        request: &str,
        deps: &[TaskId],
    ) -> Vec<Command> {
        let request = Resources::parse(request).unwrap();
        self.event(Event::TaskSubmitted {
            task,
            function,
            request,
            deps: deps.to_vec(),
            max_retries: chia_core::Retries::Never,
            retry_exceptions: false,
            placement: None,
        })
    }

    fn submit_retrying(
        &mut self,
        task: TaskId,
        function: &str,
        request: &str,
        max_retries: i32,
        retry_exceptions: bool,
    ) -> Vec<Command> {
        let request = Resources::parse(request).unwrap();
        let function = key(function);
        let deps = Vec::new();
        let placement = None;
        self.event(Event::TaskSubmitted {
            task,
            function,
            request,
            deps,
            max_retries: chia_core::Retries::from(i64::from(max_retries)),
            retry_exceptions,
            placement,
        })
    }

    /// The node `task` is leased to, as the node that reports it; one no task runs on if none.
    fn lease(&self, task: TaskId) -> NodeId {
        match self.sched.task_status(task) {
            Some(TaskStatus::Running { node }) => node,
            _ => NodeId(u64::MAX),
        }
    }

    /// `task` succeeded, as reported by the node it is leased to.
    fn finish(&mut self, task: TaskId) -> Vec<Command> {
        let node = self.lease(task);
        self.finish_on(task, node.0)
    }

    fn finish_on(&mut self, task: TaskId, node: u64) -> Vec<Command> {
        self.event(Event::TaskFinished { task, node: NodeId(node), error: None })
    }

    /// `task` failed with `error`, as reported by the node it is leased to.
    fn fail(&mut self, task: TaskId, error: TaskError) -> Vec<Command> {
        let node = self.lease(task);
        self.event(Event::TaskFinished { task, node, error: Some(error) })
    }

    fn cancel(&mut self, task: TaskId, force: bool) -> Vec<Command> {
        self.event(Event::TaskCancelled { task, force })
    }

    fn heard(&mut self, node: u64) -> Vec<Command> {
        self.event(Event::NodeHeard { node: NodeId(node) })
    }

    /// Moves the clock on by `ms` milliseconds.
    fn wait(&mut self, ms: u64) {
        self.now += Duration::from_millis(ms);
    }

    fn expire(&mut self, timeout_ms: u64) -> Vec<Command> {
        self.sched.expire_silent(self.now, Duration::from_millis(timeout_ms));
        self.sched.drain_commands().collect()
    }

    fn free(&self, node: u64) -> Resources {
        self.sched.node_free(NodeId(node)).unwrap()
    }
}

fn key(name: &str) -> FunctionKey {
    FunctionKey::new(name, "h")
}

/// Task `seq` of session 1.
fn t(seq: u64) -> TaskId {
    TaskId::new(SessionId(1), seq)
}

/// The first dispatch of `task` to `node`.
fn dispatch(task: TaskId, node: u64) -> Command {
    retry(task, node, 1)
}

/// Dispatch number `attempt` of `task`, to `node`.
fn retry(task: TaskId, node: u64, attempt: u32) -> Command {
    Command::Dispatch { task, node: NodeId(node), attempt }
}

/// The tasks dispatched in `commands`, with their nodes.
fn dispatched(commands: &[Command]) -> Vec<(TaskId, u64)> {
    commands
        .iter()
        .filter_map(|c| match c {
            Command::Dispatch { task, node, .. } => Some((*task, node.0)),
            _ => None,
        })
        .collect()
}

fn res(text: &str) -> Resources {
    Resources::parse(text).unwrap()
}

fn app_error(function: &str) -> TaskError {
    TaskError::Application { function: function.into(), message: "boom".into() }
}

#[test]
fn resources_are_matched_across_nodes() {
    let mut env = Env::new();
    env.join(1, "CPU=4", &["f"]);
    env.join(2, "CPU=4,gpu=1", &["f"]);
    assert_eq!(env.submit(t(1), "f", "CPU=1,gpu=1", &[]), [dispatch(t(1), 2)]);
    // The only GPU is taken: the second GPU task waits instead of landing on node 1.
    assert_eq!(env.submit(t(2), "f", "CPU=1,gpu=1", &[]), []);
    assert_eq!(env.submit(t(3), "f", "CPU=3", &[]).len(), 1);
    assert_eq!(env.sched.queued_len(), 1);
    assert_eq!(env.finish(t(1)), [dispatch(t(2), 2)]);
    assert_eq!(env.free(2), res("CPU=3,node:w2=1"));
}

#[test]
fn a_node_runs_only_as_many_tasks_as_its_capacity_holds() {
    let mut env = Env::new();
    env.join(1, "adder=8,CPU=8", &["add"]);
    let mut started = Vec::new();
    for i in 0..5 {
        started.extend(dispatched(&env.submit(t(i), "add", "adder=2", &[])));
    }
    assert_eq!(started, [(t(0), 1), (t(1), 1), (t(2), 1), (t(3), 1)]);
    assert_eq!(env.free(1).get("adder"), ResourceAmount::ZERO);
    assert_eq!(env.sched.task_status(t(4)), Some(TaskStatus::Queued));
    assert_eq!(env.finish(t(2)), [dispatch(t(4), 1)]);
    assert_eq!(env.sched.running_on(NodeId(1)), [t(0), t(1), t(3), t(4)]);
    for i in [0, 1, 3, 4] {
        env.finish(t(i));
    }
    assert_eq!(env.free(1), res("adder=8,CPU=8,node:w1=1"));
}

#[test]
fn same_shape_tasks_start_in_submission_order() {
    let mut env = Env::new();
    env.join(1, "CPU=1", &["f"]);
    for i in 0..4 {
        env.submit(t(i), "f", "CPU=1", &[]);
    }
    for i in 0..3 {
        assert_eq!(env.finish(t(i)), [dispatch(t(i + 1), 1)]);
    }
}

#[test]
fn a_big_task_does_not_block_smaller_ones_behind_it() {
    let mut env = Env::new();
    env.join(1, "CPU=4", &["f"]);
    assert_eq!(env.submit(t(1), "f", "CPU=2", &[]), [dispatch(t(1), 1)]);
    // Fits the node, but not now: it waits without being reported infeasible.
    assert_eq!(env.submit(t(2), "f", "CPU=4", &[]), []);
    assert_eq!(env.submit(t(3), "f", "CPU=1", &[]), [dispatch(t(3), 1)]);
    assert_eq!(env.submit(t(4), "f", "CPU=1", &[]), [dispatch(t(4), 1)]);
    assert_eq!(env.submit(t(5), "f", "CPU=1", &[]), []);
    // One CPU free: the small task behind the big one takes it.
    assert_eq!(env.finish(t(3)), [dispatch(t(5), 1)]);
    assert_eq!(env.finish(t(1)), []);
    assert_eq!(env.finish(t(4)), []);
    assert_eq!(env.finish(t(5)), [dispatch(t(2), 1)]);
    assert_eq!(env.sched.queued_len(), 0);
}

#[test]
fn freed_room_goes_to_the_oldest_queued_task_that_fits() {
    let mut env = Env::new();
    env.join(1, "CPU=2", &["f", "g"]);
    env.submit(t(1), "f", "CPU=2", &[]);
    env.submit(t(2), "g", "CPU=1", &[]);
    env.submit(t(3), "f", "CPU=1", &[]);
    env.submit(t(4), "g", "CPU=1", &[]);
    assert_eq!(env.finish(t(1)), [dispatch(t(2), 1), dispatch(t(3), 1)]);
}

#[test]
fn infeasible_is_reported_once_and_the_task_runs_when_a_capable_node_joins() {
    let mut env = Env::new();
    env.join(1, "CPU=2", &["f"]);
    let commands = env.submit(t(1), "f", "CPU=8", &[]);
    let [Command::Infeasible { task, reason }] = &commands[..] else { panic!("{commands:?}") };
    assert_eq!(*task, t(1));
    assert!(reason.contains("f (signature h)") && reason.contains("CPU=8 (has 2)"), "{reason}");
    let commands = env.submit(t(2), "f", "CPU=8", &[]);
    assert!(matches!(&commands[..], [Command::Infeasible { task, .. }] if *task == t(2)));
    // Unrelated activity does not repeat the report.
    assert_eq!(env.submit(t(3), "f", "CPU=1", &[]), [dispatch(t(3), 1)]);
    assert_eq!(env.finish(t(3)), []);
    assert_eq!(env.join(2, "CPU=4", &["f"]), []);
    assert_eq!(env.join(3, "CPU=16", &["g"]), []);
    assert_eq!(env.join(4, "CPU=16", &["f"]), [dispatch(t(1), 4), dispatch(t(2), 4)]);
}

#[test]
fn with_no_node_connected_tasks_wait_as_infeasible() {
    let mut env = Env::new();
    let commands = env.submit(t(1), "f", "CPU=1", &[]);
    let [Command::Infeasible { reason, .. }] = &commands[..] else { panic!("{commands:?}") };
    assert!(reason.contains("no node is connected"), "{reason}");
    assert_eq!(env.join(1, "CPU=1", &["f"]), [dispatch(t(1), 1)]);
}

#[test]
fn unknown_functions_and_signature_mismatches_fail_at_submit() {
    let mut env = Env::new();
    env.join_with(1, "CPU=1", vec![FunctionKey::new("f", "h1")]);
    assert_eq!(
        env.submit(t(1), "g", "CPU=1", &[]),
        [Command::Fail { task: t(1), error: TaskError::UnknownFunction { function: "g".into() } }]
    );
    env.join_with(2, "CPU=1", vec![FunctionKey::new("f", "h3")]);
    let mismatch = TaskError::SignatureMismatch {
        function: "f".into(),
        expected: "h2".into(),
        found: vec!["h1".into(), "h3".into()],
    };
    assert_eq!(
        env.submit_key(t(2), FunctionKey::new("f", "h2"), "CPU=1", &[]),
        [Command::Fail { task: t(2), error: mismatch }]
    );
    assert_eq!(env.submit_key(t(3), FunctionKey::new("f", "h3"), "CPU=1", &[]), [dispatch(t(3), 2)]);
    assert_eq!(env.sched.task_status(t(1)), Some(TaskStatus::Failed));
}

#[test]
fn a_task_waits_for_its_dependencies() {
    let mut env = Env::new();
    env.join(1, "CPU=4", &["f"]);
    env.submit(t(1), "f", "CPU=1", &[]);
    env.submit(t(2), "f", "CPU=1", &[]);
    assert_eq!(env.submit(t(3), "f", "CPU=1", &[t(1), t(2)]), []);
    assert_eq!(env.sched.task_status(t(3)), Some(TaskStatus::Waiting));
    assert_eq!(env.finish(t(1)), []);
    assert_eq!(env.finish(t(2)), [dispatch(t(3), 1)]);
    // A dependency that already finished counts as ready.
    assert_eq!(env.submit(t(4), "f", "CPU=1", &[t(1)]), [dispatch(t(4), 1)]);
}

#[test]
fn a_dependency_failure_propagates_down_the_chain() {
    let mut env = Env::new();
    env.join(1, "CPU=4", &["f", "g", "h"]);
    env.submit(t(1), "f", "CPU=1", &[]);
    env.submit(t(2), "g", "CPU=1", &[t(1)]);
    env.submit(t(3), "h", "CPU=1", &[t(2)]);
    env.submit(t(4), "h", "CPU=1", &[t(1), t(2)]);
    let cause = Box::new(app_error("f"));
    let failed = |task, function: &str, dependency| Command::Fail {
        task,
        error: TaskError::DependencyFailed { function: function.into(), dependency, cause: cause.clone() },
    };
    assert_eq!(
        env.fail(t(1), app_error("f")),
        [failed(t(2), "g", t(1)), failed(t(4), "h", t(1)), failed(t(3), "h", t(2))]
    );
    // Submitted after the failure: fails at once, with the original cause.
    assert_eq!(env.submit(t(5), "g", "CPU=1", &[t(3)]), [failed(t(5), "g", t(3))]);
    assert_eq!(env.free(1).get(CPU), ResourceAmount::whole(4));
}

#[test]
fn a_long_failed_chain_neither_recurses_nor_nests() {
    let mut env = Env::new();
    env.join(1, "CPU=1", &["f"]);
    env.submit(t(0), "f", "CPU=1", &[]);
    for i in 1..20_000 {
        env.submit(t(i), "f", "CPU=1", &[t(i - 1)]);
    }
    let commands = env.fail(t(0), app_error("f"));
    assert_eq!(commands.len(), 19_999);
    let Command::Fail { error: TaskError::DependencyFailed { cause, .. }, .. } = &commands[19_998] else {
        panic!()
    };
    assert_eq!(**cause, app_error("f"));
}

#[test]
fn unknown_or_forgotten_dependencies_fail() {
    let mut env = Env::new();
    env.join(1, "CPU=1", &["f"]);
    let unknown = |task, dependency| Command::Fail {
        task,
        error: TaskError::UnknownDependency { function: "f".into(), dependency },
    };
    assert_eq!(env.submit(t(1), "f", "CPU=1", &[t(99)]), [unknown(t(1), t(99))]);
    assert_eq!(env.submit(t(2), "f", "CPU=1", &[t(2)]), [unknown(t(2), t(2))]);
    env.submit(t(3), "f", "CPU=1", &[]);
    env.finish(t(3));
    env.event(Event::TaskForgotten { task: t(3) });
    assert_eq!(env.sched.task_status(t(3)), None);
    assert_eq!(env.submit(t(4), "f", "CPU=1", &[t(3)]), [unknown(t(4), t(3))]);
    // Forgotten while running: it still finishes, then is gone.
    env.submit(t(5), "f", "CPU=1", &[]);
    env.event(Event::TaskForgotten { task: t(5) });
    assert_eq!(env.submit(t(6), "f", "CPU=1", &[t(5)]), [unknown(t(6), t(5))]);
    env.finish(t(5));
    assert_eq!(env.sched.task_status(t(5)), None);
    assert_eq!(env.free(1).get(CPU), ResourceAmount::whole(1));
}

#[test]
fn losing_a_node_fails_its_tasks_and_reports_stranded_ones() {
    let mut env = Env::new();
    env.join(1, "CPU=1", &["f"]);
    env.join(2, "CPU=2,gpu=1", &["f"]);
    assert_eq!(env.submit(t(1), "f", "CPU=1,gpu=1", &[]), [dispatch(t(1), 2)]);
    assert_eq!(env.submit(t(2), "f", "CPU=1,gpu=1", &[]), []);
    assert_eq!(env.submit(t(3), "f", "CPU=1", &[]), [dispatch(t(3), 1)]);
    env.submit(t(4), "f", "CPU=1", &[t(1)]);
    let commands = env.lose(2);
    let lost = worker_lost(&["w2"]);
    assert_eq!(commands[0], Command::Fail { task: t(1), error: lost.clone() });
    assert_eq!(
        commands[1],
        Command::Fail {
            task: t(4),
            error: TaskError::DependencyFailed {
                function: "f".into(),
                dependency: t(1),
                cause: Box::new(lost)
            }
        }
    );
    let [Command::Infeasible { task, reason }] = &commands[2..] else { panic!("{commands:?}") };
    assert_eq!(*task, t(2));
    assert!(reason.contains("gpu=1 (has 0)"), "{reason}");
    // The lost node's late report changes nothing.
    assert_eq!(env.finish_on(t(1), 2), []);
    assert_eq!(env.sched.node_count(), 1);
    assert_eq!(env.join(3, "CPU=1,gpu=1", &["f"]), [dispatch(t(2), 3)]);
    env.finish(t(2));
    env.finish(t(2));
    assert_eq!(env.free(3), res("CPU=1,gpu=1,node:w3=1"));
    // Losing the last node with the function strands queued tasks again, once.
    env.submit(t(5), "f", "CPU=1", &[]);
    env.submit(t(6), "f", "CPU=1", &[]);
    env.lose(3);
    let commands = env.lose(1);
    assert_eq!(commands.len(), 2, "{commands:?}");
    assert!(matches!(&commands[1], Command::Infeasible { task, .. } if *task == t(6)));
}

#[test]
fn duplicate_and_unknown_reports_are_ignored() {
    let mut env = Env::new();
    env.join(1, "CPU=2", &["f"]);
    assert_eq!(env.submit(t(1), "f", "CPU=1", &[]), [dispatch(t(1), 1)]);
    assert_eq!(env.submit(t(1), "f", "CPU=1", &[]), []);
    assert_eq!(env.submit(t(1), "g", "CPU=5", &[t(77)]), []);
    assert_eq!(env.finish(t(1)), []);
    assert_eq!(env.finish(t(1)), []);
    assert_eq!(env.fail(t(1), app_error("f")), []);
    assert_eq!(env.sched.task_status(t(1)), Some(TaskStatus::Finished));
    assert_eq!(env.free(1).get(CPU), ResourceAmount::whole(2));
    for event in [
        Event::TaskFinished { task: t(50), node: NodeId(1), error: None },
        Event::TaskCancelled { task: t(50), force: true },
        Event::TaskCancelled { task: t(1), force: true },
        Event::NodeHeard { node: NodeId(50) },
        Event::TaskBlocked { task: t(50) },
        Event::TaskBlocked { task: t(1) },
        Event::TaskForgotten { task: t(50) },
        Event::NodeLost { node: NodeId(50) },
        Event::SessionClosed { session: SessionId(50) },
    ] {
        assert_eq!(env.event(event), []);
    }
    // A second join with a known node id is ignored too.
    assert_eq!(env.join(1, "CPU=64", &["f"]), []);
    assert_eq!(env.free(1).get(CPU), ResourceAmount::whole(2));
}

#[test]
fn a_blocked_task_gives_its_cpu_to_the_child_it_waits_on() {
    let mut env = Env::new();
    env.join(1, "CPU=1,mem=4", &["parent", "child"]);
    assert_eq!(env.submit(t(1), "parent", "CPU=1,mem=1", &[]), [dispatch(t(1), 1)]);
    assert_eq!(env.submit(t(2), "child", "CPU=1,mem=1", &[]), []);
    assert_eq!(env.event(Event::TaskBlocked { task: t(1) }), [dispatch(t(2), 1)]);
    assert_eq!(env.event(Event::TaskBlocked { task: t(1) }), []);
    env.finish(t(2));
    env.finish(t(1));
    // Only what the parent still held came back: nothing above capacity.
    assert_eq!(env.free(1), res("CPU=1,mem=4,node:w1=1"));
}

#[test]
fn closing_a_session_drops_its_unstarted_tasks_only() {
    let mut env = Env::new();
    let u = |seq| TaskId::new(SessionId(2), seq);
    env.join(1, "CPU=1", &["f"]);
    assert_eq!(env.submit(t(1), "f", "CPU=1", &[]), [dispatch(t(1), 1)]);
    env.submit(t(2), "f", "CPU=1", &[]);
    env.submit(t(3), "f", "CPU=1", &[t(1)]);
    env.submit(u(1), "f", "CPU=1", &[]);
    env.submit(u(2), "f", "CPU=1", &[t(3)]);
    assert_eq!(env.sched.queued_len(), 2);
    assert_eq!(
        env.event(Event::SessionClosed { session: SessionId(1) }),
        [Command::Fail {
            task: u(2),
            error: TaskError::UnknownDependency { function: "f".into(), dependency: t(3) }
        }]
    );
    assert_eq!(env.sched.queued_len(), 1);
    assert_eq!(env.sched.task_status(t(2)), None);
    assert_eq!(env.sched.task_status(t(1)), Some(TaskStatus::Running { node: NodeId(1) }));
    assert_eq!(env.finish(t(1)), [dispatch(u(1), 1)]);
    assert_eq!(env.sched.task_status(t(1)), Some(TaskStatus::Finished));
    // A dropped id may be submitted again, and its stale queue entry is not run twice.
    assert_eq!(env.submit(t(2), "f", "CPU=1", &[]), []);
    assert_eq!(env.finish(u(1)), [dispatch(t(2), 1)]);
    assert_eq!(env.finish(t(2)), []);
    assert_eq!(env.sched.queued_len(), 0);
}

#[test]
fn a_fan_out_spreads_over_nodes() {
    let mut env = Env::new();
    for id in 1..=4 {
        env.join(id, "CPU=4", &["f"]);
    }
    env.submit(t(0), "f", "CPU=1", &[]);
    env.finish(t(0));
    let mut per_node = [0; 5];
    for i in 1..=8 {
        for (_, node) in dispatched(&env.submit(t(i), "f", "CPU=1", &[])) {
            per_node[node as usize] += 1;
        }
    }
    assert_eq!(per_node, [0, 2, 2, 2, 2]);
    // Children made ready together by one parent spread as well.
    env.submit(t(100), "f", "CPU=1", &[]);
    for i in 101..109 {
        env.submit(t(i), "f", "CPU=1", &[t(100)]);
    }
    let commands = env.finish(t(100));
    let mut nodes: Vec<u64> = dispatched(&commands).into_iter().map(|(_, n)| n).collect();
    nodes.sort_unstable();
    nodes.dedup();
    assert_eq!(commands.len(), 8);
    assert_eq!(nodes, [1, 2, 3, 4]);
}

#[test]
fn fractional_requests_share_a_unit() {
    let mut env = Env::new();
    env.join(1, "CPU=1", &["f"]);
    assert_eq!(env.submit(t(1), "f", "CPU=0.5", &[]), [dispatch(t(1), 1)]);
    assert_eq!(env.submit(t(2), "f", "CPU=0.5", &[]), [dispatch(t(2), 1)]);
    assert_eq!(env.submit(t(3), "f", "CPU=0.5", &[]), []);
    assert_eq!(env.submit(t(4), "f", "CPU=0.25", &[]), []);
    assert_eq!(env.finish(t(1)), [dispatch(t(3), 1)]);
}

#[test]
fn a_task_can_be_pinned_to_a_node_by_name() {
    let mut env = Env::new();
    env.join(1, "CPU=4", &["f"]);
    env.join(2, "CPU=4", &["f"]);
    env.join(3, "CPU=4,node:w3=2", &["f"]);
    for i in 0..2 {
        assert_eq!(env.submit(t(i), "f", "node:w2=0.5", &[]), [dispatch(t(i), 2)]);
    }
    assert_eq!(env.free(3).get("node:w3"), ResourceAmount::whole(2));
    let commands = env.submit(t(5), "f", "node:w9=1", &[]);
    assert!(
        matches!(&commands[..], [Command::Infeasible { reason, .. }] if reason.contains("node:w9=1 (has 0)"))
    );
}

#[test]
fn shapes_are_dropped_when_no_task_uses_them() {
    let mut env = Env::new();
    env.join(1, "CPU=1", &["f"]);
    for i in 0..100 {
        env.submit(t(i), "f", &format!("mem={}", i + 1), &[]);
    }
    assert_eq!(env.sched.shapes.len(), 100);
    env.event(Event::SessionClosed { session: SessionId(1) });
    assert_eq!(env.sched.shapes.len(), 0);
    assert!(env.sched.node(NodeId(1)).unwrap().shapes.is_empty());
    env.join(2, "CPU=1,mem=200", &["f"]);
    assert_eq!(env.submit(t(200), "f", "mem=2", &[]), [dispatch(t(200), 2)]);
}

fn cancelled(function: &str) -> TaskError {
    TaskError::Cancelled { function: function.into() }
}

/// The error of a task whose runs were lost with `lost_on`, in order.
fn worker_lost(lost_on: &[&str]) -> TaskError {
    TaskError::WorkerLost {
        function: "f".into(),
        node: lost_on.last().copied().unwrap_or_default().into(),
        attempts: lost_on.len() as u32,
        lost_on: lost_on.iter().map(|n| n.to_string()).collect(),
    }
}

fn dependency_failed(task: TaskId, dependency: TaskId, cause: TaskError) -> Command {
    Command::Fail {
        task,
        error: TaskError::DependencyFailed { function: "f".into(), dependency, cause: Box::new(cause) },
    }
}

#[test]
fn a_running_task_on_a_lost_node_runs_again_elsewhere_in_submission_order() {
    let mut env = Env::new();
    env.join(1, "CPU=1", &["f"]);
    env.join(2, "CPU=1", &["f"]);
    assert_eq!(env.submit_retrying(t(1), "f", "CPU=1", 3, false), [dispatch(t(1), 1)]);
    // It runs, and waits on a child: its CPU goes to the next task on the same node.
    assert_eq!(env.event(Event::TaskBlocked { task: t(1) }), []);
    assert_eq!(env.submit_retrying(t(2), "f", "CPU=1", 3, false), [dispatch(t(2), 2)]);
    assert_eq!(env.submit_retrying(t(3), "f", "CPU=1", 3, false), [dispatch(t(3), 1)]);
    assert_eq!(env.submit(t(4), "f", "CPU=1", &[]), []);
    // Node 2 is full: both go back to the queue, ahead of the younger t4.
    assert_eq!(env.lose(1), []);
    assert_eq!(env.sched.task_status(t(1)), Some(TaskStatus::Queued));
    assert_eq!(env.sched.attempts(t(1)), Some(1));
    assert_eq!(env.sched.queued_len(), 3);
    assert_eq!(env.finish(t(2)), [retry(t(1), 2, 2)]);
    assert_eq!(env.finish(t(1)), [retry(t(3), 2, 2)]);
    assert_eq!(env.finish(t(3)), [dispatch(t(4), 2)]);
    assert_eq!(env.sched.task_status(t(1)), Some(TaskStatus::Finished));
    assert_eq!(env.sched.attempts(t(1)), Some(2));
    check_invariants(&env.sched);
}

#[test]
fn a_task_lost_right_after_its_dispatch_runs_again() {
    let mut env = Env::new();
    env.join(1, "CPU=1", &["f"]);
    env.join(2, "CPU=1", &["f"]);
    assert_eq!(env.submit_retrying(t(1), "f", "CPU=1", 3, false), [dispatch(t(1), 1)]);
    // No report yet: the node is lost with the lease; the idle node takes the task at once.
    assert_eq!(env.lose(1), [retry(t(1), 2, 2)]);
    // Alone and lost again, it waits for a node; the next one to join runs it.
    let commands = env.lose(2);
    assert!(matches!(&commands[..], [Command::Infeasible { task, .. }] if *task == t(1)), "{commands:?}");
    assert_eq!(env.join(3, "CPU=1", &["f"]), [retry(t(1), 3, 3)]);
    assert_eq!(env.finish(t(1)), []);
    assert_eq!(env.sched.task_status(t(1)), Some(TaskStatus::Finished));
}

#[test]
fn without_retries_a_lost_task_fails_after_one_attempt() {
    let mut env = Env::new();
    env.join(1, "CPU=1", &["f"]);
    env.join(2, "CPU=1", &["f"]);
    assert_eq!(env.submit_retrying(t(1), "f", "CPU=1", 0, true), [dispatch(t(1), 1)]);
    env.submit(t(2), "f", "CPU=1", &[t(1)]);
    assert_eq!(
        env.lose(1),
        [
            Command::Fail { task: t(1), error: worker_lost(&["w1"]) },
            dependency_failed(t(2), t(1), worker_lost(&["w1"])),
        ]
    );
    assert_eq!(env.sched.attempts(t(1)), Some(1));
    assert_eq!(env.free(2), res("CPU=1,node:w2=1"));
}

#[test]
fn retries_run_out_after_max_retries_plus_one_attempts() {
    let mut env = Env::new();
    env.join(1, "CPU=1", &["f"]);
    assert_eq!(env.submit_retrying(t(1), "f", "CPU=1", 2, false), [dispatch(t(1), 1)]);
    for id in 2..=3 {
        env.join(id, "CPU=1", &["f"]);
        assert_eq!(env.lose(id - 1), [retry(t(1), id, id as u32)]);
    }
    env.join(4, "CPU=1", &["f"]);
    let lost = worker_lost(&["w1", "w2", "w3"]);
    assert_eq!(env.lose(3), [Command::Fail { task: t(1), error: lost.clone() }]);
    assert_eq!(env.sched.task_status(t(1)), Some(TaskStatus::Failed));
    assert_eq!(env.free(4), res("CPU=1,node:w4=1"));
    let message = lost.to_string();
    assert!(
        message.contains("3 attempt(s) ran, lost with w1, w2 and w3") && message.contains("died"),
        "{message}"
    );
}

#[test]
fn a_dispatch_lost_before_its_node_acknowledged_it_costs_no_attempt() {
    let mut env = Env::new();
    env.acks = false;
    env.join(1, "CPU=1", &["f"]);
    assert_eq!(env.submit_retrying(t(1), "f", "CPU=1", 1, false), [dispatch(t(1), 1)]);
    // w1 died before it heard of the task: the next node runs it, with no retry spent.
    env.join(2, "CPU=1", &["f"]);
    assert_eq!(env.lose(1), [retry(t(1), 2, 2)]);
    assert_eq!((env.sched.attempts(t(1)), env.sched.runs(t(1))), (Some(2), Some(0)));
    // Acknowledged, the run counts: one retry is left after losing w2, none after w3.
    env.event(Event::TaskStarted { task: t(1), node: NodeId(2) });
    assert_eq!(env.sched.runs(t(1)), Some(1));
    env.join(3, "CPU=1", &["f"]);
    assert_eq!(env.lose(2), [retry(t(1), 3, 3)]);
    env.event(Event::TaskStarted { task: t(1), node: NodeId(3) });
    assert_eq!(env.lose(3), [Command::Fail { task: t(1), error: worker_lost(&["w2", "w3"]) }]);
}

#[test]
fn a_task_that_may_not_be_retried_is_never_sent_twice() {
    let mut env = Env::new();
    env.acks = false;
    env.join(1, "CPU=1", &["f"]);
    env.join(2, "CPU=1", &["f"]);
    assert_eq!(env.submit_retrying(t(1), "f", "CPU=1", 0, false), [dispatch(t(1), 1)]);
    // Its acknowledgement may only have been lost: it may have run, so it is not sent again.
    assert_eq!(env.lose(1), [Command::Fail { task: t(1), error: worker_lost(&["w1"]) }]);
}

#[test]
fn an_acknowledgement_from_another_node_or_twice_counts_once_or_not_at_all() {
    let mut env = Env::new();
    env.acks = false;
    env.join(1, "CPU=1", &["f"]);
    env.join(2, "CPU=1", &["f"]);
    assert_eq!(env.submit_retrying(t(1), "f", "CPU=1", 1, false), [dispatch(t(1), 1)]);
    env.event(Event::TaskStarted { task: t(1), node: NodeId(2) });
    assert_eq!(env.sched.runs(t(1)), Some(0), "w2 does not run it");
    env.event(Event::TaskStarted { task: t(1), node: NodeId(1) });
    env.event(Event::TaskStarted { task: t(1), node: NodeId(1) });
    assert_eq!(env.sched.runs(t(1)), Some(1));
    // A report without an acknowledgement before it counts as the run it is.
    assert_eq!(env.lose(1), [retry(t(1), 2, 2)]);
    assert_eq!(env.fail(t(1), app_error("f")), []);
    assert_eq!((env.sched.task_status(t(1)), env.sched.runs(t(1))), (Some(TaskStatus::Failed), Some(2)));
}

#[test]
fn a_task_whose_workers_always_die_unacknowledged_still_ends() {
    let mut env = Env::new();
    env.acks = false;
    env.join(1, "CPU=1", &["f"]);
    assert_eq!(env.submit_retrying(t(1), "f", "CPU=1", 1, false), [dispatch(t(1), 1)]);
    // The free losses run out; then each loss counts, and the second of those ends it.
    let limit = u64::from(UNACKNOWLEDGED_LOSSES);
    for id in 2..=limit + 2 {
        env.join(id, "CPU=1", &["f"]);
        assert_eq!(env.lose(id - 1), [retry(t(1), id, id as u32)], "loss {}", id - 1);
    }
    env.join(limit + 3, "CPU=1", &["f"]);
    let (last_but_one, last) = (format!("w{}", limit + 1), format!("w{}", limit + 2));
    assert_eq!(
        env.lose(limit + 2),
        [Command::Fail { task: t(1), error: worker_lost(&[&last_but_one, &last]) }]
    );
}

#[test]
fn a_negative_max_retries_retries_without_limit() {
    let mut env = Env::new();
    env.join(1, "CPU=2", &["f"]);
    assert_eq!(env.submit_retrying(t(1), "f", "CPU=1", -1, false), [dispatch(t(1), 1)]);
    // Other negative values a peer may send mean the same.
    assert_eq!(env.submit_retrying(t(2), "f", "CPU=1", i32::MIN, false), [dispatch(t(2), 1)]);
    for id in 2..=6 {
        env.join(id, "CPU=2", &["f"]);
        let attempt = id as u32;
        assert_eq!(env.lose(id - 1), [retry(t(1), id, attempt), retry(t(2), id, attempt)]);
    }
    assert_eq!(env.finish(t(1)), []);
    assert_eq!(env.finish(t(2)), []);
    assert_eq!(env.sched.attempts(t(2)), Some(6));
    assert_eq!(env.sched.task_status(t(2)), Some(TaskStatus::Finished));
}

#[test]
fn reports_from_a_node_the_task_is_not_leased_to_are_ignored() {
    let mut env = Env::new();
    env.join(1, "CPU=1", &["f"]);
    env.join(2, "CPU=2", &["f"]);
    assert_eq!(env.submit_retrying(t(1), "f", "CPU=2", 3, false), [dispatch(t(1), 2)]);
    assert_eq!(env.submit_retrying(t(2), "f", "CPU=1", 3, false), [dispatch(t(2), 1)]);
    // Lost while no other node has room: t2's old node reports while t2 is queued.
    assert_eq!(env.lose(1), []);
    assert_eq!(env.finish_on(t(2), 1), []);
    assert_eq!(env.sched.task_status(t(2)), Some(TaskStatus::Queued));
    assert_eq!(env.finish(t(1)), [retry(t(2), 2, 2)]);
    env.join(3, "CPU=1", &["f"]);
    // Now leased to node 2: the lost node's late report, or a report from any other node, is stale.
    assert_eq!(env.finish_on(t(2), 1), []);
    assert_eq!(
        env.event(Event::TaskFinished { task: t(2), node: NodeId(3), error: Some(app_error("f")) }),
        []
    );
    assert_eq!(env.sched.task_status(t(2)), Some(TaskStatus::Running { node: NodeId(2) }));
    assert_eq!(env.submit(t(3), "f", "CPU=1", &[]), [dispatch(t(3), 3)]);
    assert_eq!(env.submit(t(4), "f", "CPU=1", &[]), [dispatch(t(4), 2)]);
    assert_eq!(env.finish_on(t(2), 2), []);
    // A second report from the right node does not give the resources back twice.
    assert_eq!(env.finish_on(t(2), 2), []);
    assert_eq!(env.free(2).get(CPU), ResourceAmount::whole(1));
    assert_eq!(env.sched.task_status(t(2)), Some(TaskStatus::Finished));
    check_invariants(&env.sched);
}

#[test]
fn application_errors_run_again_only_with_retry_exceptions() {
    let mut env = Env::new();
    env.join(1, "CPU=1", &["f"]);
    assert_eq!(env.submit_retrying(t(1), "f", "CPU=1", 1, true), [dispatch(t(1), 1)]);
    env.submit(t(2), "f", "CPU=1", &[t(1)]);
    assert_eq!(env.submit(t(3), "f", "CPU=1", &[]), []);
    // It goes back to the front of the queue, so it takes its room back before t3.
    assert_eq!(env.fail(t(1), app_error("f")), [retry(t(1), 1, 2)]);
    assert_eq!(env.sched.task_status(t(2)), Some(TaskStatus::Waiting));
    // Out of attempts: the error stands (the head has it from the node), and t2 fails with it.
    assert_eq!(
        env.fail(t(1), app_error("f")),
        [dependency_failed(t(2), t(1), app_error("f")), dispatch(t(3), 1)]
    );
    assert_eq!(env.sched.task_status(t(1)), Some(TaskStatus::Failed));
    // Without retry_exceptions, or with another kind of error, the first failure is final.
    env.finish(t(3));
    assert_eq!(env.submit_retrying(t(4), "f", "CPU=1", 5, false), [dispatch(t(4), 1)]);
    assert_eq!(env.fail(t(4), app_error("f")), []);
    assert_eq!(env.sched.task_status(t(4)), Some(TaskStatus::Failed));
    assert_eq!(env.submit_retrying(t(5), "f", "CPU=1", 5, true), [dispatch(t(5), 1)]);
    let panic = TaskError::Panic { function: "f".into(), message: "oops".into() };
    assert_eq!(env.fail(t(5), panic), []);
    assert_eq!(env.sched.task_status(t(5)), Some(TaskStatus::Failed));
    assert_eq!(env.sched.attempts(t(5)), Some(1));
    assert_eq!(env.free(1), res("CPU=1,node:w1=1"));
}

#[test]
fn timed_out_runs_run_again_only_with_retry_exceptions_and_attempts_left() {
    let timed_out = |attempt| TaskError::TimedOut { function: "f".into(), timeout_ms: 2500, attempt };
    let mut env = Env::new();
    env.join(1, "CPU=1", &["f"]);
    assert_eq!(env.submit_retrying(t(1), "f", "CPU=1", 1, true), [dispatch(t(1), 1)]);
    env.submit(t(2), "f", "CPU=1", &[t(1)]);
    assert_eq!(env.submit(t(3), "f", "CPU=1", &[]), []);
    // Like an `Err`: back to the front of the queue, ahead of t3, as attempt 2.
    assert_eq!(env.fail(t(1), timed_out(1)), [retry(t(1), 1, 2)]);
    assert_eq!(env.sched.task_status(t(2)), Some(TaskStatus::Waiting));
    // No attempts left: the last run's timeout is the task's error, and its dependent's cause.
    assert_eq!(
        env.fail(t(1), timed_out(2)),
        [dependency_failed(t(2), t(1), timed_out(2)), dispatch(t(3), 1)]
    );
    assert_eq!(env.sched.task_status(t(1)), Some(TaskStatus::Failed));
    assert_eq!(env.sched.attempts(t(1)), Some(2));
    env.finish(t(3));
    // Without retry_exceptions a timeout is final, however many retries a lost worker would get.
    assert_eq!(env.submit_retrying(t(4), "f", "CPU=1", 5, false), [dispatch(t(4), 1)]);
    assert_eq!(env.fail(t(4), timed_out(1)), []);
    assert_eq!(env.sched.task_status(t(4)), Some(TaskStatus::Failed));
    assert_eq!(env.sched.attempts(t(4)), Some(1));
    // A cancelled task that then times out is cancelled, and is not run again.
    assert_eq!(env.submit_retrying(t(5), "f", "CPU=1", 5, true), [dispatch(t(5), 1)]);
    assert_eq!(env.cancel(t(5), false), [Command::Cancel { task: t(5), node: NodeId(1), force: false }]);
    assert_eq!(env.fail(t(5), timed_out(1)), [Command::Fail { task: t(5), error: cancelled("f") }]);
    assert_eq!(env.sched.attempts(t(5)), Some(1));
    assert_eq!(env.free(1), res("CPU=1,node:w1=1"));
    check_invariants(&env.sched);
}

#[test]
fn cancelling_a_task_that_has_not_started_fails_it_and_its_dependents() {
    let mut env = Env::new();
    env.join(1, "CPU=1", &["f"]);
    assert_eq!(env.submit(t(1), "f", "CPU=1", &[]), [dispatch(t(1), 1)]);
    assert_eq!(env.submit(t(2), "f", "CPU=1", &[]), []);
    env.submit(t(3), "f", "CPU=1", &[t(1)]);
    env.submit(t(4), "f", "CPU=1", &[t(3)]);
    assert_eq!(env.cancel(t(2), false), [Command::Fail { task: t(2), error: cancelled("f") }]);
    assert_eq!(env.sched.queued_len(), 0);
    assert_eq!(
        env.cancel(t(3), false),
        [Command::Fail { task: t(3), error: cancelled("f") }, dependency_failed(t(4), t(3), cancelled("f"))]
    );
    // Cancelling again, or cancelling what ended or is unknown, does nothing.
    assert_eq!(env.cancel(t(3), true), []);
    assert_eq!(env.cancel(t(99), true), []);
    assert_eq!(env.finish(t(1)), []);
    assert_eq!(env.cancel(t(1), true), []);
    assert_eq!(env.sched.task_status(t(1)), Some(TaskStatus::Finished));
    // A later task on the cancelled one fails at once.
    assert_eq!(env.submit(t(5), "f", "CPU=1", &[t(4)]), [dependency_failed(t(5), t(4), cancelled("f"))]);
    check_invariants(&env.sched);
}

#[test]
fn a_cancelled_running_task_ends_cancelled_whatever_it_reports() {
    let mut env = Env::new();
    env.join(1, "CPU=1", &["f"]);
    assert_eq!(env.submit_retrying(t(1), "f", "CPU=1", 3, true), [dispatch(t(1), 1)]);
    env.submit(t(2), "f", "CPU=1", &[t(1)]);
    assert_eq!(env.submit(t(3), "f", "CPU=1", &[]), []);
    let cancel = |force| Command::Cancel { task: t(1), node: NodeId(1), force };
    assert_eq!(env.cancel(t(1), false), [cancel(false)]);
    assert_eq!(env.cancel(t(1), false), []);
    // Asking again more firmly is passed on, once.
    assert_eq!(env.cancel(t(1), true), [cancel(true)]);
    assert_eq!(env.cancel(t(1), true), []);
    assert_eq!(env.cancel(t(1), false), []);
    // It holds its resources until its node reports.
    assert_eq!(env.sched.task_status(t(1)), Some(TaskStatus::Running { node: NodeId(1) }));
    assert_eq!(
        env.finish(t(1)),
        [
            Command::Fail { task: t(1), error: cancelled("f") },
            dependency_failed(t(2), t(1), cancelled("f")),
            dispatch(t(3), 1),
        ]
    );
    // Retried application errors are not retried once cancelled.
    env.finish(t(3));
    assert_eq!(env.submit_retrying(t(4), "f", "CPU=1", 3, true), [dispatch(t(4), 1)]);
    assert_eq!(env.cancel(t(4), true), [Command::Cancel { task: t(4), node: NodeId(1), force: true }]);
    assert_eq!(env.fail(t(4), app_error("f")), [Command::Fail { task: t(4), error: cancelled("f") }]);
    assert_eq!(env.sched.attempts(t(4)), Some(1));
    assert_eq!(env.free(1), res("CPU=1,node:w1=1"));
}

#[test]
fn a_cancelled_task_whose_node_is_lost_ends_cancelled() {
    let mut env = Env::new();
    env.join(1, "CPU=1", &["f"]);
    assert_eq!(env.submit_retrying(t(1), "f", "CPU=1", -1, false), [dispatch(t(1), 1)]);
    env.cancel(t(1), false);
    assert_eq!(env.lose(1), [Command::Fail { task: t(1), error: cancelled("f") }]);
    assert_eq!(env.join(2, "CPU=1", &["f"]), []);
    assert_eq!(env.sched.task_status(t(1)), Some(TaskStatus::Failed));
}

#[test]
fn silent_nodes_expire_and_their_tasks_run_again() {
    let mut env = Env::new();
    let start = env.now;
    let timeout = Duration::from_millis(1000);
    assert_eq!(env.sched.next_expiry(timeout), None);
    for id in 1..=3 {
        env.join(id, "CPU=1", &["f"]);
    }
    assert_eq!(env.submit_retrying(t(1), "f", "CPU=1", 3, false), [dispatch(t(1), 1)]);
    assert_eq!(env.submit_retrying(t(2), "f", "CPU=1", 3, false), [dispatch(t(2), 2)]);
    assert_eq!(env.sched.next_expiry(timeout), Some(start + timeout));
    env.wait(600);
    assert_eq!(env.heard(2), []);
    env.heard(3);
    env.heard(99);
    assert_eq!(env.sched.next_expiry(timeout), Some(start + timeout));
    env.wait(399);
    assert_eq!(env.expire(1000), []);
    env.wait(1);
    // Node 1 has been silent for the whole timeout; the others were heard since.
    assert_eq!(env.expire(1000), [Command::NodeExpired { node: NodeId(1) }, retry(t(1), 3, 2)]);
    assert_eq!(env.sched.node_count(), 2);
    assert_eq!(env.sched.next_expiry(timeout), Some(start + Duration::from_millis(1600)));
    assert_eq!(env.expire(1000), []);
    // Its late report and its heartbeat are too late: it stays lost.
    assert_eq!(env.finish_on(t(1), 1), []);
    assert_eq!(env.heard(1), []);
    assert_eq!(env.sched.task_status(t(1)), Some(TaskStatus::Running { node: NodeId(3) }));
    env.wait(600);
    let commands = env.expire(1000);
    let [
        Command::NodeExpired { node: NodeId(2) },
        Command::NodeExpired { node: NodeId(3) },
        Command::Infeasible { task: first, .. },
        Command::Infeasible { task: second, .. },
    ] = &commands[..]
    else {
        panic!("{commands:?}")
    };
    assert_eq!((*first, *second), (t(1), t(2)));
    assert_eq!(env.sched.next_expiry(timeout), None);
    assert_eq!(env.join(4, "CPU=1", &["f"]), [retry(t(1), 4, 3)]);
    assert_eq!(env.sched.next_expiry(timeout), Some(env.now + timeout));
}

#[test]
fn hearing_from_a_node_moves_its_deadline() {
    let mut env = Env::new();
    let start = env.now;
    let timeout = Duration::from_millis(100);
    for id in 1..=3 {
        env.join(id, "CPU=1", &["f"]);
    }
    env.wait(10);
    env.heard(1);
    env.wait(10);
    env.heard(3);
    // Node 2 is the oldest now, then 1, then 3.
    assert_eq!(env.sched.next_expiry(timeout), Some(start + timeout));
    env.wait(80);
    assert_eq!(env.expire(100), [Command::NodeExpired { node: NodeId(2) }]);
    assert_eq!(env.sched.next_expiry(timeout), Some(start + Duration::from_millis(110)));
    env.wait(10);
    assert_eq!(env.expire(100), [Command::NodeExpired { node: NodeId(1) }]);
    assert_eq!(env.sched.node_count(), 1);
    // An event dated in the past does not make a node look older than it is, nor older than
    // nodes heard before it.
    env.sched.handle(start, Event::NodeHeard { node: NodeId(3) });
    assert_eq!(env.sched.next_expiry(timeout), Some(start + Duration::from_millis(120)));
    env.join(4, "CPU=1", &["f"]);
    env.sched.handle(start, Event::NodeHeard { node: NodeId(3) });
    env.sched.handle(
        start,
        Event::NodeJoined {
            node: NodeId(5),
            name: "w5".into(),
            resources: res("CPU=1"),
            functions: vec![key("f")],
            labels: Labels::new(),
            paused: false,
        },
    );
    // Both count as heard when node 4 joined, and come after it in the list.
    assert_eq!(env.sched.next_expiry(timeout), Some(env.now + timeout));
    env.wait(100);
    assert_eq!(env.expire(100), [4, 3, 5].map(|id| Command::NodeExpired { node: NodeId(id) }));
}

#[test]
fn a_lost_nodes_resources_are_not_counted_any_more() {
    let mut env = Env::new();
    env.join(1, "CPU=4,gpu=1", &["f"]);
    env.join(2, "CPU=1", &["f"]);
    assert_eq!(env.submit_retrying(t(1), "f", "CPU=1,gpu=1", 3, false), [dispatch(t(1), 1)]);
    let commands = env.lose(1);
    let [Command::Infeasible { task, reason }] = &commands[..] else { panic!("{commands:?}") };
    assert_eq!(*task, t(1));
    assert!(reason.contains("gpu=1 (has 0)"), "{reason}");
    assert_eq!(env.sched.node_free(NodeId(1)), None);
    let commands = env.submit(t(2), "f", "CPU=2", &[]);
    assert!(
        matches!(&commands[..], [Command::Infeasible { reason, .. }] if reason.contains("CPU=2 (has 1)")),
        "{commands:?}"
    );
    assert_eq!(env.free(2), res("CPU=1,node:w2=1"));
    assert_eq!(env.join(3, "CPU=2,gpu=1", &["f"]), [retry(t(1), 3, 2)]);
    check_invariants(&env.sched);
}

#[test]
fn task_records_stay_small() {
    // Every submitted task has one; the benchmark's decision rate depends on touching little.
    assert!(std::mem::size_of::<Task>() <= 64, "{}", std::mem::size_of::<Task>());
}

/// Checks the scheduler's bookkeeping against a recomputation from its tasks.
fn check_invariants(sched: &Scheduler) {
    for (n, node) in sched.nodes.iter() {
        let mut expected = node.capacity.clone();
        for &slot in &node.running {
            let task = sched.tasks.get(slot).unwrap();
            let State::Running { shape, node: on, cpu_released, .. } = task.state else {
                panic!("not running")
            };
            assert_eq!(on, n);
            let mut held = sched.shapes.get(shape).unwrap().request.clone();
            if cpu_released {
                held.set(CPU, ResourceAmount::ZERO).unwrap();
            }
            assert!(expected.covers(&held), "node {} over-committed", node.name);
            expected.take(&held);
        }
        let free = sched.node_free(node.id).unwrap();
        assert!(expected.iter().all(|(name, amount)| free.get(name) == amount), "{free} != {expected}");
    }
    let mut queued = 0;
    for (s, shape) in sched.shapes.iter() {
        let live = shape.queue.iter().filter(|&&(seq, slot)| is_queued(&sched.tasks, slot, seq)).count();
        assert_eq!(live, shape.queued);
        queued += live;
        let refs = sched.tasks.iter().filter(|(_, t)| t.state.shape() == Some(s)).count();
        assert_eq!(refs, shape.refs);
        let mut capable: Vec<NodeSlot> = sched
            .nodes
            .iter()
            .filter(|(_, node)| {
                node.functions.contains(&shape.key.function) && node.pool.could_hold(&shape.key.need)
            })
            .map(|(n, _)| n)
            .collect();
        capable.sort_unstable();
        let mut listed = shape.capable.clone();
        listed.sort_unstable();
        assert_eq!(listed, capable);
        if shape.queued > 0 {
            for &n in &shape.capable {
                assert!(!sched.nodes.get(n).unwrap().pool.fits(&shape.key.need), "queued shape fits a node");
            }
        }
    }
    assert_eq!(queued, sched.queued);
    for (slot, task) in sched.tasks.iter() {
        assert_eq!(sched.task_index.get(&task.id), Some(&slot));
        assert!(task.max_attempts == UNLIMITED || task.runs <= task.max_attempts);
        assert!(task.runs <= task.attempts);
    }
    assert_eq!(sched.task_index.len(), sched.tasks.len());
    // The list by last-heard time holds every node once, oldest first, linked both ways.
    let (mut n, mut older, mut listed) = (sched.oldest_heard, None, 0);
    while let Some(node) = n.and_then(|n| sched.nodes.get(n)) {
        assert_eq!(node.older, older);
        if let Some(previous) = older.and_then(|o| sched.nodes.get(o)) {
            assert!(previous.heard <= node.heard);
        }
        (older, n, listed) = (n, node.newer, listed + 1);
    }
    assert_eq!((n, older, listed), (None, sched.newest_heard, sched.nodes.len()));
}

/// Random event sequences (seeded, so reproducible) keep the bookkeeping consistent, never
/// over-commit a node and never panic.
#[test]
fn random_events_keep_the_books_straight() {
    let (_, reached) = random_events(20_000);
    assert!(reached[1..].iter().all(|&n| n > 0), "{reached:?}");
}

/// One seed gives one run, as the simulator needs: each scheduler's hash maps get their own
/// random keys, so a decision that followed a map's iteration order would differ here.
#[test]
fn random_events_replay_exactly() {
    let (first, _) = random_events(5_000);
    let (second, _) = random_events(5_000);
    assert!(first.len() > 1000);
    assert!(first == second, "the same events produced different commands");
}

/// Feeds `steps` seeded random events to a fresh scheduler, checking its books as it goes.
/// Returns every command produced, and how often each kind the mix must reach was seen.
fn random_events(steps: u64) -> (Vec<Command>, [usize; 7]) {
    let mut state = 0x2545_f491_4f6c_dd1du64;
    let mut rand = move |n: u64| {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state % n
    };
    let mut env = Env::new();
    let mut running: Vec<TaskId> = Vec::new();
    let mut submitted: Vec<TaskId> = Vec::new();
    // Commands of the kinds the mix must reach: retries, cancels, expiries, cancelled and lost
    // tasks (after one attempt and after several).
    let mut reached = [0usize; 7];
    let shapes = ["CPU=1", "CPU=2", "CPU=0.5,gpu=1", "CPU=1,mem=3", "", "CPU=9"];
    let nodes = ["CPU=2", "CPU=4,gpu=1", "CPU=1,mem=4", "CPU=8,gpu=2,mem=8"];
    let mut log = Vec::new();
    for step in 0..steps {
        env.wait(rand(3));
        let commands = match rand(24) {
            0 => env.join(step, nodes[rand(4) as usize], [&["f", "g"][..], &["f"], &["g"]][rand(3) as usize]),
            1 => {
                let ids = env.node_ids();
                if ids.is_empty() { Vec::new() } else { env.lose(ids[rand(ids.len() as u64) as usize].0) }
            }
            2..=9 => {
                let task = TaskId::new(SessionId(rand(3)), step);
                let recent = submitted.len().min(30) as u64;
                let deps: Vec<TaskId> = (0..rand(3))
                    .map(|_| match rand(recent + 1) {
                        0 => t(rand(step + 1)),
                        back => submitted[submitted.len() - back as usize],
                    })
                    .collect();
                submitted.push(task);
                let function = ["f", "f", "g", "h"][rand(4) as usize];
                let request = Resources::parse(shapes[rand(shapes.len() as u64) as usize]).unwrap();
                let max_retries = [-1, 0, 1, 3][rand(4) as usize];
                let retry_exceptions = rand(2) == 0;
                let (function, deps) = (key(function), deps.clone());
                env.event(Event::TaskSubmitted {
                    task,
                    function,
                    request,
                    deps,
                    max_retries: chia_core::Retries::from(i64::from(max_retries)),
                    retry_exceptions,
                    placement: None,
                })
            }
            10..=15 if !running.is_empty() => {
                let task = running.swap_remove(rand(running.len() as u64) as usize);
                if rand(4) == 0 { env.fail(task, app_error("f")) } else { env.finish(task) }
            }
            16 if !running.is_empty() => env.event(Event::TaskBlocked { task: running[0] }),
            17 => env.event(Event::TaskForgotten { task: TaskId::new(SessionId(rand(3)), rand(step + 1)) }),
            18 if rand(10) == 0 => env.event(Event::SessionClosed { session: SessionId(rand(3)) }),
            19 => {
                let task = match running.len() as u64 {
                    0 => TaskId::new(SessionId(rand(3)), rand(step + 1)),
                    len => running[rand(len) as usize],
                };
                env.cancel(task, rand(2) == 0)
            }
            20 => {
                let ids = env.node_ids();
                if ids.is_empty() { Vec::new() } else { env.heard(ids[rand(ids.len() as u64) as usize].0) }
            }
            21 if rand(5) == 0 => env.expire(30),
            // A report from any node, mostly one the task is not leased to.
            22 => env.finish_on(TaskId::new(SessionId(rand(3)), rand(step + 1)), rand(step + 1)),
            _ => env.finish(TaskId::new(SessionId(rand(3)), rand(step + 1))),
        };
        log.extend(commands.iter().cloned());
        for command in commands {
            let seen = match command {
                Command::Dispatch { task, node, attempt } => {
                    assert_eq!(env.sched.task_status(task), Some(TaskStatus::Running { node }));
                    assert_eq!(env.sched.attempts(task), Some(attempt));
                    running.push(task);
                    usize::from(attempt > 1)
                }
                Command::Cancel { .. } => 2,
                Command::NodeExpired { .. } => 3,
                Command::Fail { error: TaskError::Cancelled { .. }, .. } => 4,
                Command::Fail { error: TaskError::WorkerLost { attempts, .. }, .. } => {
                    5 + usize::from(attempts > 1)
                }
                _ => 0,
            };
            reached[seen] += 1;
        }
        running.retain(|&task| matches!(env.sched.task_status(task), Some(TaskStatus::Running { .. })));
        if step % 50 == 0 {
            check_invariants(&env.sched);
        }
    }
    check_invariants(&env.sched);
    (log, reached)
}

// ---- labels, strategies, placement groups ----

use chia_core::placement::{BundleRef, GroupStrategy};

impl Env {
    fn join_labelled(&mut self, id: u64, resources: &str, labels: &str) -> Vec<Command> {
        let (resources, labels) = (res(resources), Labels::parse(labels).unwrap());
        let functions = vec![key("f")];
        self.event(Event::NodeJoined {
            node: NodeId(id),
            name: format!("w{id}"),
            resources,
            functions,
            labels,
            paused: false,
        })
    }

    fn submit_placed(&mut self, task: TaskId, request: &str, placement: Placement) -> Vec<Command> {
        self.event(Event::TaskSubmitted {
            task,
            function: key("f"),
            request: res(request),
            deps: Vec::new(),
            max_retries: chia_core::Retries::Never,
            retry_exceptions: false,
            placement: placement.boxed(),
        })
    }

    fn create_group(&mut self, seq: u64, bundles: &[&str], strategy: GroupStrategy) -> Vec<Command> {
        let spec = GroupSpec {
            group: group(seq),
            bundles: bundles.iter().map(|b| res(b)).collect(),
            strategy,
            detached: false,
            job: None,
        };
        let commands = self.event(Event::GroupCreated { spec, owner: SessionId(1) });
        self.sched.check_groups().unwrap();
        commands
    }
}

fn group(seq: u64) -> GroupId {
    GroupId(TaskId::new(SessionId(1), 1000 + seq))
}

fn labels(text: &str) -> Placement {
    Placement { labels: Labels::parse(text).unwrap(), ..Placement::default() }
}

fn in_bundle(g: u64, bundle: Option<u32>) -> Placement {
    Placement { group: Some(BundleRef { group: group(g), bundle }), ..Placement::default() }
}

#[test]
fn labels_choose_the_node_and_a_label_no_node_has_is_infeasible() {
    let mut env = Env::new();
    env.join_labelled(1, "CPU=4", "rack=a");
    env.join_labelled(2, "CPU=4", "rack=b,fpga=vu9p");
    for seq in 1..=3 {
        assert_eq!(env.submit_placed(t(seq), "CPU=1", labels("fpga=vu9p")), [dispatch(t(seq), 2)]);
    }
    // Plain tasks still go anywhere, round-robin.
    assert_eq!(dispatched(&env.submit(t(4), "f", "CPU=1", &[])).len(), 1);
    let commands = env.submit_placed(t(5), "CPU=1", labels("fpga=ku115"));
    let [Command::Infeasible { task, reason }] = commands.as_slice() else { panic!("{commands:?}") };
    assert_eq!(*task, t(5));
    assert!(reason.contains("asks for labels fpga=ku115"), "{reason}");
    assert!(reason.contains("w1 lacks fpga=ku115 (has none)"), "{reason}");
    assert!(reason.contains("w2 lacks fpga=ku115 (has fpga=vu9p)"), "{reason}");
    let reasons = env.sched.explain_queued(t(5), 8).unwrap();
    assert!(
        reasons.iter().any(|r| matches!(r, chia_core::inspect::Reason::LabelsDiffer { node, missing }
        if node == "w2" && missing == &["fpga=ku115 (has fpga=vu9p)".to_string()])),
        "{reasons:?}"
    );
    // A node with the label joins: the task runs there.
    assert_eq!(env.join_labelled(3, "CPU=1", "fpga=ku115"), [dispatch(t(5), 3)]);
    let nodes = env.sched.nodes_overview();
    assert_eq!(nodes[1].labels, Labels::parse("rack=b,fpga=vu9p").unwrap());
}

#[test]
fn pack_fills_one_node_and_spread_levels_them() {
    let mut env = Env::new();
    env.join(1, "CPU=4", &["f"]);
    env.join(2, "CPU=4", &["f"]);
    let pack = Placement { strategy: Strategy::Pack, ..Placement::default() };
    let mut on = Vec::new();
    for seq in 1..=4 {
        on.extend(dispatched(&env.submit_placed(t(seq), "CPU=1", pack.clone())).into_iter().map(|(_, n)| n));
    }
    assert_eq!(on, [1, 1, 1, 1], "packed onto the first node");
    assert_eq!(dispatched(&env.submit_placed(t(5), "CPU=1", pack.clone())), [(t(5), 2)]);
    // Spread goes to the node running the fewest, whatever the round-robin cursor says.
    let spread = Placement { strategy: Strategy::Spread, ..Placement::default() };
    let mut env = Env::new();
    env.join(1, "CPU=4", &["f"]);
    env.join(2, "CPU=4", &["f"]);
    env.submit(t(1), "f", "CPU=1", &[]);
    env.submit(t(2), "f", "CPU=2", &[]); // Another shape: its own cursor, also node 1.
    let mut on = Vec::new();
    for seq in 3..=6 {
        on.extend(
            dispatched(&env.submit_placed(t(seq), "CPU=0.5", spread.clone())).into_iter().map(|(_, n)| n),
        );
    }
    assert_eq!(on, [2, 2, 1, 2], "fewest running first: {on:?}");
}

#[test]
fn strict_pack_and_strict_spread_place_bundles_and_tasks_run_inside() {
    let mut env = Env::new();
    env.join(1, "CPU=4", &["f"]);
    env.join(2, "CPU=4", &["f"]);
    env.join(3, "CPU=2", &["f"]);
    let commands = env.create_group(1, &["CPU=1", "CPU=2"], GroupStrategy::StrictPack);
    assert_eq!(commands, [Command::GroupPlaced { group: group(1), nodes: vec!["w1".into(), "w1".into()] }]);
    assert_eq!(env.free(1), res("CPU=1,node:w1=1"), "the bundles' CPUs are reserved, not free");
    let commands = env.create_group(2, &["CPU=1", "CPU=1", "CPU=1"], GroupStrategy::StrictSpread);
    let [Command::GroupPlaced { nodes, .. }] = commands.as_slice() else { panic!("{commands:?}") };
    let mut distinct = nodes.clone();
    distinct.sort();
    distinct.dedup();
    assert_eq!(distinct.len(), 3, "{nodes:?}");
    // Tasks in bundle 1 of the packed group run on its node, two at a time (its 2 CPUs).
    assert_eq!(env.submit_placed(t(1), "CPU=1", in_bundle(1, Some(1))), [dispatch(t(1), 1)]);
    assert_eq!(env.submit_placed(t(2), "CPU=1", in_bundle(1, Some(1))), [dispatch(t(2), 1)]);
    assert_eq!(env.submit_placed(t(3), "CPU=1", in_bundle(1, Some(1))), []);
    // Any bundle: bundle 0's room is still there.
    assert_eq!(env.submit_placed(t(4), "CPU=1", in_bundle(1, None)), [dispatch(t(4), 1)]);
    // A plain task cannot use a reservation: node 1 has no CPU free for it.
    assert_eq!(env.free(1), res("node:w1=1"));
    assert_eq!(env.submit(t(5), "f", "CPU=1,node:w1=1", &[]), []);
    assert_eq!(env.finish(t(1)), [dispatch(t(3), 1)]);
    // A task requesting nothing still runs on its bundle's node.
    let on = &env.sched.group_status(group(2));
    let Some(GroupStatus::Placed { nodes }) = on else { panic!("{on:?}") };
    let commands = env.submit_placed(t(6), "", in_bundle(2, Some(2)));
    assert_eq!(dispatched(&commands), [(t(6), nodes[2].trim_start_matches('w').parse().unwrap())]);
    // Asking for more than a bundle holds, or a bundle it lacks, fails at once.
    let commands = env.submit_placed(t(7), "CPU=3", in_bundle(1, Some(0)));
    let [Command::Fail { error: TaskError::PlacementGroup { problem, .. }, .. }] = commands.as_slice() else {
        panic!("{commands:?}")
    };
    assert!(matches!(problem, GroupProblem::TooSmall { .. }), "{problem:?}");
    let commands = env.submit_placed(t(8), "CPU=1", in_bundle(1, Some(5)));
    assert!(
        matches!(
            commands.as_slice(),
            [Command::Fail {
                error: TaskError::PlacementGroup {
                    problem: GroupProblem::NoSuchBundle { bundle: 5, bundles: 2 },
                    ..
                },
                ..
            }]
        ),
        "{commands:?}"
    );
    let commands = env.submit_placed(t(9), "CPU=1", in_bundle(9, None));
    assert!(
        matches!(
            commands.as_slice(),
            [Command::Fail { error: TaskError::PlacementGroup { problem: GroupProblem::Unknown, .. }, .. }]
        ),
        "{commands:?}"
    );
}

#[test]
fn an_infeasible_strict_spread_is_reported_and_placed_when_a_node_joins() {
    let mut env = Env::new();
    env.join(1, "CPU=4", &["f"]);
    env.join(2, "CPU=4", &["f"]);
    let commands = env.create_group(1, &["CPU=1", "CPU=1", "CPU=1"], GroupStrategy::StrictSpread);
    let [Command::GroupInfeasible { group: g, reason }] = commands.as_slice() else { panic!("{commands:?}") };
    assert_eq!(*g, group(1));
    assert!(
        reason.contains("STRICT_SPREAD of 3 bundle(s) needs 3 distinct nodes")
            && reason.contains("only 2 connected node(s) can hold one: w1, w2"),
        "{reason}"
    );
    assert_eq!(
        env.sched.group_status(group(1)),
        Some(GroupStatus::Pending { infeasible: Some(reason.clone()) })
    );
    // Nothing was reserved, and a task in it waits without being reported infeasible itself.
    assert_eq!(env.free(1), res("CPU=4,node:w1=1"));
    assert_eq!(env.submit_placed(t(1), "CPU=1", in_bundle(1, Some(2))), []);
    let reasons = env.sched.explain_queued(t(1), 8).unwrap();
    assert!(matches!(&reasons[0], chia_core::inspect::Reason::WaitingForGroup { infeasible: Some(_), .. }));
    // Pending but feasible: reported nowhere; a third node makes it placeable, bundles first.
    let commands = env.join(3, "CPU=1", &["f"]);
    let [Command::GroupPlaced { nodes, .. }, Command::Dispatch { task, node, .. }] = commands.as_slice()
    else {
        panic!("{commands:?}")
    };
    assert_eq!((*task, nodes[2].clone()), (t(1), format!("w{}", node.0)));
    // STRICT_PACK larger than any node is infeasible, naming the sum.
    let commands = env.create_group(2, &["CPU=3", "CPU=3"], GroupStrategy::StrictPack);
    let [Command::GroupInfeasible { reason, .. }] = commands.as_slice() else { panic!("{commands:?}") };
    assert!(reason.contains("STRICT_PACK needs one node with CPU=6"), "{reason}");
    // PACK of the same fits across nodes.
    let commands = env.create_group(3, &["CPU=3", "CPU=3"], GroupStrategy::Pack);
    assert!(matches!(commands.as_slice(), [Command::GroupPlaced { .. }]), "{commands:?}");
}

#[test]
fn a_group_waits_for_room_and_removal_gives_it_back() {
    let mut env = Env::new();
    env.join(1, "CPU=2", &["f"]);
    env.submit(t(1), "f", "CPU=2", &[]);
    // Feasible, not placeable now: pending without a report.
    assert_eq!(env.create_group(1, &["CPU=2"], GroupStrategy::StrictPack), []);
    env.submit(t(2), "f", "CPU=1", &[]);
    // The freed room goes to the pending group before the queued plain task.
    let commands = env.finish(t(1));
    assert_eq!(commands, [Command::GroupPlaced { group: group(1), nodes: vec!["w1".into()] }]);
    assert_eq!(env.submit_placed(t(3), "CPU=1", in_bundle(1, Some(0))), [dispatch(t(3), 1)]);
    env.submit_placed(t(4), "CPU=1", in_bundle(1, Some(0)));
    env.submit_placed(t(5), "CPU=2", in_bundle(1, Some(0)));
    // Removal: queued tasks of the group fail, the running one is cancelled with force, the
    // room goes to the plain task.
    let commands = env.event(Event::GroupRemoved { group: group(1) });
    let removed = TaskError::PlacementGroup { group: group(1).to_string(), problem: GroupProblem::Removed };
    assert_eq!(
        commands,
        [
            Command::GroupRemoved { group: group(1) },
            Command::Cancel { task: t(3), node: NodeId(1), force: true },
            Command::Cancel { task: t(4), node: NodeId(1), force: true },
            Command::Fail { task: t(5), error: removed },
            dispatch(t(2), 1),
        ]
    );
    env.sched.check_groups().unwrap();
    assert_eq!(env.sched.group_status(group(1)), None);
    // The cancelled task's report returns nothing to the gone group.
    env.finish(t(3));
    assert_eq!(env.free(1), res("CPU=1,node:w1=1"));
    // A session's groups go with it, unless detached.
    env.create_group(2, &["CPU=1"], GroupStrategy::Pack);
    let spec = GroupSpec {
        group: group(3),
        bundles: vec![res("CPU=0.5")],
        strategy: GroupStrategy::Pack,
        detached: true,
        job: None,
    };
    env.event(Event::GroupCreated { spec, owner: SessionId(1) });
    let commands = env.event(Event::SessionClosed { session: SessionId(1) });
    assert!(commands.contains(&Command::GroupRemoved { group: group(2) }), "{commands:?}");
    assert_eq!(env.sched.group_count(), 1);
    assert_eq!(env.sched.group_status(group(3)), Some(GroupStatus::Placed { nodes: vec!["w1".into()] }));
}

#[test]
fn a_bundle_lost_with_its_node_is_placed_again_and_its_tasks_follow() {
    let mut env = Env::new();
    env.join(1, "CPU=2", &["f"]);
    env.join(2, "CPU=2", &["f"]);
    env.create_group(1, &["CPU=1", "CPU=1"], GroupStrategy::StrictSpread);
    let Some(GroupStatus::Placed { nodes }) = env.sched.group_status(group(1)) else { panic!() };
    let lost: u64 = nodes[0].trim_start_matches('w').parse().unwrap();
    let commands = env.submit_retrying_placed(t(1), in_bundle(1, Some(0)));
    assert_eq!(dispatched(&commands), [(t(1), lost)]);
    // Its node goes: the group waits (STRICT_SPREAD cannot share the other node), and so
    // does the task, without an infeasible report.
    let commands = env.lose(lost);
    assert!(matches!(commands.as_slice(), [Command::GroupInfeasible { .. }]), "{commands:?}");
    env.sched.check_groups().unwrap();
    let commands = env.join(3, "CPU=1", &["f"]);
    assert_eq!(
        commands,
        [
            Command::GroupPlaced { group: group(1), nodes: vec!["w3".into(), nodes[1].clone()] },
            retry(t(1), 3, 2),
        ]
    );
    env.sched.check_groups().unwrap();
}

impl Env {
    fn submit_retrying_placed(&mut self, task: TaskId, placement: Placement) -> Vec<Command> {
        self.event(Event::TaskSubmitted {
            task,
            function: key("f"),
            request: res("CPU=1"),
            deps: Vec::new(),
            max_retries: chia_core::Retries::UpTo(3),
            retry_exceptions: false,
            placement: placement.boxed(),
        })
    }
}

/// Found by the simulator's exhaustive check: PACK and SPREAD, when the bundles cannot all
/// go on one node (on distinct nodes), placed each bundle, largest first, on the first node
/// with room. `CPU=2` took the only gpu node, `CPU=0.5,gpu=1` then had nowhere to go, and the
/// group was reported infeasible ("more than the connected nodes can hold together") though
/// `CPU=2` fits the other node.
#[test]
fn a_group_that_fits_only_one_way_is_placed_not_reported_infeasible() {
    let mut env = Env::new();
    env.join(1, "CPU=2,gpu=1", &["f"]);
    env.join(2, "CPU=2", &["f"]);
    let commands = env.create_group(1, &["CPU=2", "CPU=0.5,gpu=1"], GroupStrategy::Pack);
    assert_eq!(commands, [Command::GroupPlaced { group: group(1), nodes: vec!["w2".into(), "w1".into()] }]);
    env.event(Event::GroupRemoved { group: group(1) });
    // SPREAD of more bundles than nodes shares them the same way.
    let commands = env.create_group(2, &["CPU=2", "CPU=0.5,gpu=1", "CPU=0.5"], GroupStrategy::Spread);
    let nodes = vec!["w2".into(), "w1".into(), "w1".into()];
    assert_eq!(commands, [Command::GroupPlaced { group: group(2), nodes }]);
    env.event(Event::GroupRemoved { group: group(2) });
    // What no division can hold is still reported, and says why.
    let infeasible = |commands: &[Command]| match commands {
        [Command::GroupInfeasible { reason, .. }] => reason.clone(),
        other => panic!("{other:?}"),
    };
    let reason = infeasible(&env.create_group(3, &["CPU=1.5", "CPU=1.5", "CPU=1.5"], GroupStrategy::Pack));
    assert!(reason.contains("more than the connected nodes can hold together"), "{reason}");
    let reason = infeasible(&env.create_group(4, &["CPU=1.5", "CPU=1.5", "CPU=1"], GroupStrategy::Spread));
    assert!(reason.contains("no way the scheduler tried of dividing them"), "{reason}");
    env.sched.check_groups().unwrap();
}
