//! What the scheduler can say about itself without walking its tasks: nodes, queued demand
//! by shape, counts by state, and why one task is not placed (`chia status`, `chia explain`,
//! the watchdog, the metrics). Everything here reads; nothing changes a decision.

use super::{SERVICE_FUNCTION_PREFIX, Scheduler, Shape, State, Task, is_queued};
use chia_core::inspect::{Reason, Shortfall};
use chia_core::placement::Labels;
use chia_core::{FunctionKey, NodeId, Resources, TaskId};
use std::time::Instant;

/// A joined node as the scheduler sees it.
#[derive(Clone, Debug)]
pub struct NodeOverview {
    /// The node's id.
    pub id: NodeId,
    /// The node's name.
    pub name: String,
    /// As advertised, with `node:<name>`.
    pub capacity: Resources,
    /// What is free now, without the resources of placement-group bundles.
    pub free: Resources,
    /// Functions and service types (`service:<Type>`) it announced, sorted.
    pub functions: Vec<FunctionKey>,
    /// When the head last heard from it (after a restore: the restore's time).
    pub heard: Instant,
    /// Takes no new tasks ([`super::Event::NodePaused`]).
    pub paused: bool,
    /// Function tasks leased to it (service instances are not counted).
    pub running: usize,
    /// As offered by its worker.
    pub labels: Labels,
    /// Bundles of placement groups reserved on it (their resources are not in `free`).
    pub bundles: usize,
}

/// The queued tasks of one shape.
#[derive(Clone, Debug)]
pub struct ShapeOverview {
    /// The function of its tasks.
    pub function: FunctionKey,
    /// What each of its tasks requests (for a task in a placement group: under its
    /// bundle's `group:` names).
    pub request: Resources,
    /// How many of its tasks are queued.
    pub queued: usize,
    /// The oldest of them (the next to be placed).
    pub oldest: Option<TaskId>,
    /// No connected node could ever hold it, and why.
    pub infeasible: Option<String>,
    /// A node that has the function and room for it now, and takes tasks: by the scheduler's
    /// invariant there is none after any event, so one found here is a task left behind.
    pub fits_on: Option<String>,
}

/// Function tasks the scheduler holds by state.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StateCounts {
    /// Waiting for dependencies.
    pub waiting: usize,
    /// Ready, waiting for a node with room.
    pub queued: usize,
    /// Leased to a node.
    pub running: usize,
}

impl Scheduler {
    /// Every joined node, by name.
    pub fn nodes_overview(&self) -> Vec<NodeOverview> {
        let mut nodes: Vec<NodeOverview> = self
            .nodes
            .iter()
            .map(|(_, node)| NodeOverview {
                id: node.id,
                name: node.name.clone(),
                capacity: node.capacity.clone(),
                free: self.names.resources(node.pool.free().filter(|&(res, _)| !self.names.is_group(res))),
                functions: node.functions.iter().map(|&f| self.functions[f].key.clone()).collect(),
                heard: node.heard,
                paused: node.paused,
                running: node.running.iter().filter(|&&t| !self.runs_an_instance(t)).count(),
                labels: node.labels.clone(),
                bundles: node.bundles.len(),
            })
            .collect();
        nodes.sort_by(|a, b| a.name.cmp(&b.name));
        nodes
    }

    /// Shapes with queued tasks, the one waiting longest first. Costs a look at each shape
    /// with queued tasks and at the nodes that could hold it, not at the tasks.
    pub fn demand(&self) -> Vec<ShapeOverview> {
        let mut shapes: Vec<(u64, ShapeOverview)> = self
            .shapes
            .iter()
            .filter(|(_, shape)| shape.queued > 0)
            .map(|(_, shape)| {
                let oldest = shape.queue.iter().find(|&&(seq, slot)| is_queued(&self.tasks, slot, seq));
                let overview = ShapeOverview {
                    function: self.functions[shape.key.function].key.clone(),
                    request: shape.request.clone(),
                    queued: shape.queued,
                    oldest: oldest.and_then(|&(_, slot)| Some(self.tasks.get(slot)?.id)),
                    infeasible: shape.capable.is_empty().then(|| self.infeasible_reason(shape)),
                    fits_on: self.node_with_room(shape),
                };
                (oldest.map_or(u64::MAX, |&(seq, _)| seq), overview)
            })
            .collect();
        shapes.sort_by_key(|(seq, _)| *seq);
        shapes.into_iter().map(|(_, overview)| overview).collect()
    }

    /// Function tasks by state (service instances being placed count as queued; running
    /// instances are not counted). Kept as tasks move, but for running: one look per node
    /// at what it runs.
    pub fn state_counts(&self) -> StateCounts {
        let running = self
            .nodes
            .iter()
            .map(|(_, node)| node.running.iter().filter(|&&t| !self.runs_an_instance(t)).count())
            .sum();
        StateCounts { waiting: self.waiting, queued: self.queued, running }
    }

    /// Why `task`, queued, is not running: for each node with its function (at most `limit`),
    /// what it lacks, in all or now; with none, whether the function is offered at all. Also
    /// how many older tasks of its shape are ahead. `None` unless the task is queued.
    pub fn explain_queued(&self, task: TaskId, limit: usize) -> Option<Vec<Reason>> {
        let &slot = self.task_index.get(&task)?;
        let Task { state: State::Queued { shape: s }, seq, .. } = *self.tasks.get(slot)? else { return None };
        let shape = self.shapes.get(s)?;
        let function = &self.functions[shape.key.function];
        let mut reasons = Vec::new();
        if function.nodes.is_empty() {
            let offered: Vec<String> = self
                .functions_by_name
                .get(&function.key.name)
                .into_iter()
                .flatten()
                .map(|&f| &self.functions[f])
                .filter(|other| other.key.sig_hash != function.key.sig_hash && !other.nodes.is_empty())
                .map(|other| other.key.sig_hash.clone())
                .collect();
            reasons.push(if offered.is_empty() {
                Reason::NoNodeOffers { function: function.key.name.clone() }
            } else {
                Reason::SignatureDiffers {
                    function: function.key.name.clone(),
                    wanted: function.key.sig_hash.clone(),
                    offered,
                }
            });
        }
        if let Some((group, infeasible)) = self.waits_for_group(shape) {
            reasons.push(Reason::WaitingForGroup { group: group.to_string(), infeasible });
            return Some(reasons);
        }
        let placement = shape.key.placement.as_deref();
        let wanted = placement.map(|p| &p.labels).filter(|labels| !labels.is_empty());
        let in_group = placement.is_some_and(|p| p.group.is_some());
        let nodes = function
            .nodes
            .iter()
            .filter_map(|&n| self.nodes.get(n))
            // A task in a group can only run where its bundle is: the other nodes say nothing.
            .filter(|node| {
                !in_group || shape.capable.iter().any(|&c| self.nodes.get(c).is_some_and(|c| c.id == node.id))
            });
        for node in nodes.take(limit) {
            let name = node.name.clone();
            if let Some(wanted) = wanted
                && !node.labels.satisfy(wanted)
            {
                reasons.push(Reason::LabelsDiffer { node: name, missing: node.labels.missing(wanted) });
            } else if !node.pool.could_hold(&shape.key.need) {
                reasons.push(Reason::NeverFits {
                    node: name,
                    short: shortfalls(&node.capacity, &shape.request),
                });
            } else if node.paused {
                reasons.push(Reason::Paused { node: name });
            } else if !node.pool.fits(&shape.key.need) {
                let free = self.names.resources(node.pool.free());
                reasons.push(Reason::Busy { node: name, short: shortfalls(&free, &shape.request) });
            } else {
                reasons.push(Reason::FitsNow { node: name });
            }
        }
        let ahead = shape
            .queue
            .iter()
            .take_while(|&&(other, _)| other != seq)
            .filter(|&&(other, slot)| is_queued(&self.tasks, slot, other))
            .count();
        if ahead > 0 {
            reasons.push(Reason::Behind { queued_ahead: ahead as u64 });
        }
        Some(reasons)
    }

    /// A node that could take a task of `shape` now: it has the function, takes tasks, and
    /// its free resources cover the request.
    fn node_with_room(&self, shape: &Shape) -> Option<String> {
        shape
            .capable
            .iter()
            .filter_map(|&n| self.nodes.get(n))
            .find(|node| !node.paused && node.pool.fits(&shape.key.need))
            .map(|node| node.name.clone())
    }

    fn runs_an_instance(&self, slot: super::TaskSlot) -> bool {
        let Some(Task { state: State::Running { shape, .. }, .. }) = self.tasks.get(slot) else {
            return false;
        };
        self.shapes
            .get(*shape)
            .is_some_and(|s| self.functions[s.key.function].key.name.starts_with(SERVICE_FUNCTION_PREFIX))
    }

    /// Counts again what is kept as tasks move (after a restore from a snapshot, which does
    /// not keep it).
    pub(crate) fn recount(&mut self) {
        self.waiting = self.tasks.iter().filter(|(_, t)| matches!(t.state, State::Waiting { .. })).count();
    }

    /// The counts kept as tasks move agree with a walk of every task (for the simulator's
    /// invariants and tests).
    pub fn check_counts(&self) -> Result<(), String> {
        let waiting = self.tasks.iter().filter(|(_, t)| matches!(t.state, State::Waiting { .. })).count();
        let queued = self.tasks.iter().filter(|(_, t)| matches!(t.state, State::Queued { .. })).count();
        if waiting != self.waiting || queued != self.queued {
            return Err(format!(
                "the scheduler counts {} waiting and {} queued tasks, but holds {waiting} and {queued}",
                self.waiting, self.queued
            ));
        }
        Ok(())
    }
}

/// What `available` lacks of `request`, resource by resource.
fn shortfalls(available: &Resources, request: &Resources) -> Vec<Shortfall> {
    request
        .iter()
        .filter(|(name, amount)| available.get(name) < *amount)
        .map(|(name, amount)| Shortfall {
            resource: name.to_string(),
            requested: amount.to_string(),
            available: available.get(name).to_string(),
        })
        .collect()
}
