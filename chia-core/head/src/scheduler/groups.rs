//! Placement groups: bundles of resources reserved together, on one node or on distinct nodes
//! ([`GroupStrategy`]), for a family of calls and service instances to run in.
//!
//! Reserving works as in Ray, on the scheduler's own resource pools, so placing a task in a
//! group costs nothing the plain path does not already do: a bundle reserved on a node takes
//! its resources out of the node's free amounts and offers them back under names only the
//! group's tasks ask for — `group:<n>:<bundle>:<resource>` for that bundle and
//! `group:<n>:any:<resource>` for any bundle of the group on that node, plus a marker
//! (`group:<n>:<bundle>`, `group:<n>:any`) of which every task in the group takes one unit, so
//! a task that requests nothing still runs on its bundle's node. A task in bundle `b` asks for
//! the bundle's names and the `any` names (so a task in any bundle cannot take what one in
//! bundle `b` was promised); a task in any bundle asks for the `any` names. Its request is
//! rewritten once, at submission, and from then on it is an ordinary shape: the shape's nodes
//! are the nodes holding its bundle, and the invariant of the module above holds as it is.
//! `<n>` numbers groups and is never reused, so a task of a removed group that still runs gives
//! nothing back to a later group.
//!
//! A group is placed as a whole or not at all (a group losing a bundle's node places that
//! bundle again, keeping the others where they are). Pending groups are tried again when room
//! may have appeared — a node joined or resumed, a task finished, a group went — before the
//! queued tasks are offered that room, so a group is not starved by a stream of small tasks.
//! A group no set of connected nodes could ever hold as its strategy asks is reported
//! infeasible once (until it is feasible again) and stays pending in case a node joins.

use super::index::{GroupSlot, NodeSlot, TaskSlot};
use super::pool::{Need, Pool, sum_needs};
use super::{Command, Scheduler, State};
use chia_core::placement::{BundleRef, GroupId, GroupProblem, GroupSpec, GroupStrategy};
use chia_core::{ResourceAmount, Resources, SessionId, TaskError};
use serde::{Deserialize, Serialize};

/// What a bundle's marker offers on its node (10^6 units) and each task in it takes (10^-4):
/// far more tasks than can ever run at once.
const MARKER_CAPACITY: ResourceAmount = ResourceAmount::whole(1_000_000);
const MARKER_TAKE: ResourceAmount = ResourceAmount::from_fixed(1);

/// A placement group and where its bundles are.
#[derive(Serialize, Deserialize)]
pub(super) struct Group {
    pub(super) id: GroupId,
    /// Numbers the resources its bundles offer; see the module documentation.
    number: u64,
    /// The job it belongs to: removed when that session closes, unless detached.
    owner: SessionId,
    detached: bool,
    strategy: GroupStrategy,
    bundles: Vec<Resources>,
    /// Each bundle, interned.
    needs: Vec<Need>,
    /// What each bundle offers on its node once reserved (interned group names, sorted).
    offers: Vec<Need>,
    /// The node each bundle is reserved on.
    pub(super) nodes: Vec<Option<NodeSlot>>,
    /// Why no connected nodes could ever hold it, as last reported (`None`: it may fit).
    infeasible: Option<String>,
}

impl Group {
    pub(super) fn placed(&self) -> bool {
        self.nodes.iter().all(Option::is_some)
    }
}

/// Where a placement group is, as the scheduler knows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum GroupStatus {
    /// Every bundle is reserved: the node name of each, in bundle order.
    Placed {
        /// The node name of each bundle, in bundle order.
        nodes: Vec<String>,
    },
    /// Some bundle is not reserved yet; `infeasible` says why the connected nodes could never
    /// hold it, if they could not.
    Pending {
        /// Why the connected nodes could never hold it; `None` while they might.
        infeasible: Option<String>,
    },
}

impl Scheduler {
    /// Where the group `id` is, or `None` if the scheduler does not know it.
    pub fn group_status(&self, id: GroupId) -> Option<GroupStatus> {
        let group = self.groups.get(*self.group_index.get(&id)?)?;
        Some(if group.placed() {
            let nodes = group
                .nodes
                .iter()
                .map(|n| n.and_then(|n| self.nodes.get(n)).map(|node| node.name.clone()).unwrap_or_default())
                .collect();
            GroupStatus::Placed { nodes }
        } else {
            GroupStatus::Pending { infeasible: group.infeasible.clone() }
        })
    }

    /// Placement groups the scheduler holds.
    pub fn group_count(&self) -> usize {
        self.groups.len()
    }

    pub(super) fn group_created(&mut self, spec: GroupSpec, owner: SessionId) {
        if self.group_index.contains_key(&spec.group) || spec.validate().is_err() {
            return; // The head checked it; a duplicate id keeps the first group.
        }
        let number = self.next_group;
        self.next_group += 1;
        let needs: Vec<Need> = spec.bundles.iter().map(|bundle| self.names.need(bundle)).collect();
        let offers: Vec<Need> = spec
            .bundles
            .iter()
            .enumerate()
            .map(|(b, bundle)| {
                let mut offer = Resources::new();
                for (name, amount) in bundle.iter() {
                    let _ = offer.set(&format!("group:{number}:{b}:{name}"), amount);
                    let _ = offer.set(&format!("group:{number}:any:{name}"), amount);
                }
                let _ = offer.set(&format!("group:{number}:{b}"), MARKER_CAPACITY);
                let _ = offer.set(&format!("group:{number}:any"), MARKER_CAPACITY);
                self.names.need(&offer)
            })
            .collect();
        let group = Group {
            id: spec.group,
            number,
            owner,
            detached: spec.detached,
            strategy: spec.strategy,
            nodes: vec![None; spec.bundles.len()],
            bundles: spec.bundles,
            needs,
            offers,
            infeasible: None,
        };
        let g = self.groups.insert(group);
        self.group_index.insert(spec.group, g);
        self.pending_groups.push(g);
        self.place_groups(true);
    }

    /// The request of a task in `bundle` of its group, rewritten to the names the bundle
    /// offers; an error if the group is unknown, has no such bundle, or no bundle it may use
    /// reserves that much.
    pub(super) fn group_request(
        &self,
        function: &str,
        bundle: BundleRef,
        request: &Resources,
    ) -> Result<Resources, TaskError> {
        let problem = |problem| TaskError::PlacementGroup { group: bundle.group.to_string(), problem };
        let group = self
            .group_index
            .get(&bundle.group)
            .and_then(|&g| self.groups.get(g))
            .ok_or_else(|| problem(GroupProblem::Unknown))?;
        let count = u32::try_from(group.bundles.len()).unwrap_or(u32::MAX);
        let fits = match bundle.bundle {
            Some(b) => {
                let holder = group
                    .bundles
                    .get(b as usize)
                    .ok_or_else(|| problem(GroupProblem::NoSuchBundle { bundle: b, bundles: count }))?;
                holder.covers(request)
            }
            None => group.bundles.iter().any(|holder| holder.covers(request)),
        };
        if !fits {
            let which = match bundle.bundle {
                Some(b) => format!("its bundle {b} ({})", group.bundles[b as usize]),
                None => "any of its bundles".to_string(),
            };
            return Err(problem(GroupProblem::TooSmall {
                function: function.to_string(),
                request: request.to_string(),
                which,
            }));
        }
        let number = group.number;
        let scope = bundle.bundle.map_or_else(|| "any".to_string(), |b| b.to_string());
        let mut out = Resources::new();
        for (name, amount) in request.iter() {
            let _ = out.set(&format!("group:{number}:any:{name}"), amount);
            if let Some(b) = bundle.bundle {
                let _ = out.set(&format!("group:{number}:{b}:{name}"), amount);
            }
        }
        let _ = out.set(&format!("group:{number}:{scope}"), MARKER_TAKE);
        Ok(out)
    }

    /// Whether the shape's tasks wait for their group's bundles to be reserved (then they are
    /// not reported infeasible: the group is).
    pub(super) fn waits_for_group(&self, shape: &super::Shape) -> Option<(GroupId, Option<String>)> {
        let bundle = shape.key.placement.as_deref()?.group?;
        let group = self.groups.get(*self.group_index.get(&bundle.group)?)?;
        let waits = match bundle.bundle {
            Some(b) => group.nodes.get(b as usize).is_some_and(Option::is_none),
            None => !group.placed(),
        };
        waits.then(|| (group.id, group.infeasible.clone()))
    }

    /// Removes the group `id` (asked for, or with its job): its reservations go back to their
    /// nodes, its tasks that have not started fail, those running are cancelled with force.
    pub(super) fn group_removed(&mut self, id: GroupId) {
        let Some(g) = self.group_index.remove(&id) else { return };
        let Some(group) = self.groups.remove(g) else { return };
        self.pending_groups.retain(|&p| p != g);
        let mut touched = Vec::new();
        for (b, n) in group.nodes.iter().enumerate() {
            let Some(node) = n.and_then(|n| self.nodes.get_mut(n)) else { continue };
            node.pool.remove(&group.offers[b]);
            node.pool.give_back(&group.needs[b], None);
            node.bundles.retain(|&(other, bundle)| (other, bundle as usize) != (g, b));
            touched.extend(*n);
        }
        touched.sort_unstable();
        touched.dedup();
        self.commands.push(Command::GroupRemoved { group: id });
        let in_group = |sched: &Scheduler, slot: TaskSlot| {
            let shape = sched.tasks.get(slot).and_then(|t| t.state.shape()).and_then(|s| sched.shapes.get(s));
            shape
                .and_then(|s| s.key.placement.as_deref())
                .and_then(|p| p.group)
                .is_some_and(|b| b.group == id)
        };
        let mut tasks: Vec<(u64, TaskSlot)> = self
            .tasks
            .iter()
            .filter(|&(slot, _)| in_group(self, slot))
            .map(|(slot, task)| (task.seq, slot))
            .collect();
        tasks.sort_unstable();
        for (_, slot) in tasks {
            let Some(task) = self.tasks.get(slot) else { continue };
            match task.state {
                State::Running { .. } => self.task_cancelled(task.id, true),
                State::Waiting { .. } | State::Queued { .. } => {
                    let error =
                        TaskError::PlacementGroup { group: id.to_string(), problem: GroupProblem::Removed };
                    self.settle(slot, Err(error), true);
                }
                State::Finished | State::Failed(_) => {}
            }
        }
        for &n in &touched {
            self.refresh_shapes(n);
        }
        self.place_groups(false);
        for n in touched {
            self.fill_node(n);
        }
        self.flush_ready();
    }

    /// Removes the groups of `session`'s job that are not detached, oldest first.
    pub(super) fn remove_groups_of(&mut self, session: SessionId) {
        if self.groups.is_empty() {
            return;
        }
        let ids: Vec<GroupId> = self
            .groups
            .iter()
            .filter(|(_, group)| group.owner == session && !group.detached)
            .map(|(_, group)| group.id)
            .collect();
        for id in ids {
            self.group_removed(id);
        }
    }

    /// The bundles reserved on node `n`, which is being lost: they wait to be reserved again
    /// elsewhere (the group's other bundles stay).
    pub(super) fn bundles_lost(&mut self, bundles: &[(GroupSlot, u32)]) {
        for &(g, b) in bundles {
            let Some(group) = self.groups.get_mut(g) else { continue };
            if let Some(slot) = group.nodes.get_mut(b as usize) {
                *slot = None;
            }
            if !self.pending_groups.contains(&g) {
                self.pending_groups.push(g);
            }
        }
    }

    /// Tries to reserve every pending group, oldest first; `capacity_changed`: nodes came or
    /// went, so groups reported infeasible are looked at again too (otherwise only room freed,
    /// which an infeasible group cannot use). Then offers the room left on the nodes that got
    /// bundles to the shapes that run there.
    pub(super) fn place_groups(&mut self, capacity_changed: bool) {
        if self.pending_groups.is_empty() {
            return;
        }
        let pending = std::mem::take(&mut self.pending_groups);
        let mut touched = Vec::new();
        for &g in &pending {
            let Some(group) = self.groups.get(g) else { continue };
            if group.infeasible.is_some() && !capacity_changed {
                self.pending_groups.push(g);
                continue;
            }
            let mut free: Vec<(NodeSlot, Pool)> = self
                .nodes
                .iter()
                .filter(|(_, node)| !node.paused)
                .map(|(n, node)| (n, node.pool.clone()))
                .collect();
            if let Some(assignment) = assign(group.strategy, &group.needs, &group.nodes, &mut free, false) {
                touched.extend(self.reserve(g, &assignment));
                continue;
            }
            self.pending_groups.push(g);
            let mut idle: Vec<(NodeSlot, Pool)> =
                self.nodes.iter().map(|(n, node)| (n, node.pool.idle())).collect();
            let feasible = assign(group.strategy, &group.needs, &group.nodes, &mut idle, true).is_some();
            let reason = (!feasible).then(|| self.group_infeasible_reason(group));
            let newly = reason.is_some() && group.infeasible.is_none();
            if let Some(group) = self.groups.get_mut(g) {
                group.infeasible = reason.clone();
                if let (true, Some(reason)) = (newly, reason) {
                    self.commands.push(Command::GroupInfeasible { group: group.id, reason });
                }
            }
        }
        touched.sort_unstable();
        touched.dedup();
        for n in touched {
            self.fill_node(n);
        }
    }

    /// Reserves the unplaced bundles of `g` on the nodes `assignment` names; returns the nodes
    /// that got one.
    fn reserve(&mut self, g: GroupSlot, assignment: &[NodeSlot]) -> Vec<NodeSlot> {
        let Some(group) = self.groups.get_mut(g) else { return Vec::new() };
        let mut touched = Vec::new();
        for (b, slot) in group.nodes.iter_mut().enumerate() {
            if slot.is_some() {
                continue;
            }
            let n = assignment[b];
            let Some(node) = self.nodes.get_mut(n) else { continue };
            node.pool.take(&group.needs[b]);
            node.pool.add(&group.offers[b]);
            node.bundles.push((g, b as u32));
            *slot = Some(n);
            touched.push(n);
        }
        group.infeasible = None;
        let id = group.id;
        touched.sort_unstable();
        touched.dedup();
        for &n in &touched {
            self.refresh_shapes(n);
        }
        if let Some(GroupStatus::Placed { nodes }) = self.group_status(id) {
            tracing::debug!(group = %id, ?nodes, "placement group placed");
            self.commands.push(Command::GroupPlaced { group: id, nodes });
        }
        touched
    }

    /// Node `n`'s resources changed shape (a bundle came or went): shapes it can now hold are
    /// linked to it, those it no longer can are unlinked.
    fn refresh_shapes(&mut self, n: NodeSlot) {
        let Some(node) = self.nodes.get_mut(n) else { return };
        for (s, shape) in self.shapes.iter_mut() {
            let can = node.functions.binary_search(&shape.key.function).is_ok() && node.can_host(&shape.key);
            let listed = shape.capable.contains(&n);
            if can && !listed {
                shape.capable.push(n);
                node.shapes.push(s);
            } else if !can && listed {
                shape.capable.retain(|&x| x != n);
                node.shapes.retain(|&x| x != s);
            }
        }
    }

    fn group_infeasible_reason(&self, group: &Group) -> String {
        const SHOWN: usize = 3;
        let names = |nodes: &[&super::Node]| {
            let mut text = nodes.iter().take(SHOWN).map(|n| n.name.as_str()).collect::<Vec<_>>().join(", ");
            if nodes.len() > SHOWN {
                text.push_str(&format!(" and {} more", nodes.len() - SHOWN));
            }
            text
        };
        let nodes: Vec<&super::Node> = self.nodes.iter().map(|(_, node)| node).collect();
        if nodes.is_empty() {
            return "no node is connected".to_string();
        }
        let todo: Vec<usize> = (0..group.bundles.len()).filter(|&b| group.nodes[b].is_none()).collect();
        for &b in &todo {
            if !nodes.iter().any(|node| node.pool.could_hold(&group.needs[b])) {
                let short: Vec<String> = nodes
                    .iter()
                    .take(SHOWN)
                    .map(|node| {
                        format!(
                            "{} is short of {}",
                            node.name,
                            node.capacity.shortfall(&group.bundles[b]).join(", ")
                        )
                    })
                    .collect();
                return format!(
                    "bundle {b} ({}) is larger than any connected node: {}",
                    group.bundles[b],
                    short.join("; ")
                );
            }
        }
        let k = todo.len();
        match group.strategy {
            GroupStrategy::StrictSpread => {
                let holding: Vec<&super::Node> = self
                    .nodes
                    .iter()
                    .filter(|&(n, _)| !group.nodes.contains(&Some(n)))
                    .filter(|(_, node)| todo.iter().any(|&b| node.pool.could_hold(&group.needs[b])))
                    .map(|(_, node)| node)
                    .collect();
                format!(
                    "STRICT_SPREAD of {k} bundle(s) needs {k} distinct nodes that can each hold its bundle, \
                     but only {} connected node(s) can hold one{}{}",
                    holding.len(),
                    if holding.is_empty() { "" } else { ": " },
                    names(&holding)
                )
            }
            GroupStrategy::StrictPack => {
                let sum: Resources = sum_resources(todo.iter().map(|&b| &group.bundles[b]));
                format!(
                    "STRICT_PACK needs one node with {sum} (the sum of its bundles), but no connected node has that much"
                )
            }
            GroupStrategy::Pack | GroupStrategy::Spread => {
                let sum: Resources = sum_resources(todo.iter().map(|&b| &group.bundles[b]));
                let total = sum_resources(nodes.iter().map(|node| &node.capacity));
                if total.covers(&sum) {
                    format!(
                        "its {k} bundle(s) need {sum} in all, and no way the scheduler tried of dividing them among the connected nodes gives each the room it needs"
                    )
                } else {
                    format!(
                        "its {k} bundle(s) need {sum} in all, more than the connected nodes can hold together"
                    )
                }
            }
        }
    }

    /// Checks what the simulator and tests rely on: each placed bundle's node exists and lists
    /// it, strict strategies hold, and nothing holds a bundle of a group that is gone.
    pub fn check_groups(&self) -> Result<(), String> {
        for (g, group) in self.groups.iter() {
            for (b, n) in group.nodes.iter().enumerate() {
                let Some(n) = n else { continue };
                let node =
                    self.nodes.get(*n).ok_or_else(|| format!("{} bundle {b} is on a lost node", group.id))?;
                if !node.bundles.contains(&(g, b as u32)) {
                    return Err(format!(
                        "{} bundle {b} is on {}, which does not list it",
                        group.id, node.name
                    ));
                }
            }
            if group.placed() {
                let mut nodes: Vec<NodeSlot> = group.nodes.iter().flatten().copied().collect();
                nodes.sort_unstable();
                nodes.dedup();
                let ok = match group.strategy {
                    GroupStrategy::StrictPack => nodes.len() == 1,
                    GroupStrategy::StrictSpread => nodes.len() == group.nodes.len(),
                    GroupStrategy::Pack | GroupStrategy::Spread => true,
                };
                if !ok {
                    return Err(format!(
                        "{} ({}) is placed on {} node(s)",
                        group.id,
                        group.strategy,
                        nodes.len()
                    ));
                }
            }
        }
        for (_, node) in self.nodes.iter() {
            for &(g, b) in &node.bundles {
                if self
                    .groups
                    .get(g)
                    .and_then(|group| group.nodes.get(b as usize).copied().flatten())
                    .is_none()
                {
                    return Err(format!(
                        "{} holds bundle {b} of a group that does not place it there",
                        node.name
                    ));
                }
            }
        }
        Ok(())
    }
}

fn sum_resources<'a>(bundles: impl Iterator<Item = &'a Resources>) -> Resources {
    let mut sum = Resources::new();
    for bundle in bundles {
        for (name, amount) in bundle.iter() {
            let total = sum.get(name).checked_add(amount).unwrap_or(ResourceAmount::MAX);
            let _ = sum.set(name, total);
        }
    }
    sum
}

/// Where the bundles of a group not reserved yet (`None` in `fixed`) go among `pools` (the
/// candidate nodes in slot order, their room taken as they are assigned), the others staying
/// where they are; `None` if its strategy cannot be met. With `take_fixed`, the bundles kept
/// are first taken from their nodes' pools (pools of idle nodes, to ask what could ever fit).
fn assign(
    strategy: GroupStrategy,
    needs: &[Need],
    fixed: &[Option<NodeSlot>],
    pools: &mut [(NodeSlot, Pool)],
    take_fixed: bool,
) -> Option<Vec<NodeSlot>> {
    let position = |pools: &[(NodeSlot, Pool)], n: NodeSlot| pools.iter().position(|&(m, _)| m == n);
    let mut at: Vec<Option<usize>> = Vec::with_capacity(fixed.len());
    for (b, n) in fixed.iter().enumerate() {
        let p = n.and_then(|n| position(pools, n));
        if n.is_some() && p.is_none() {
            return None; // A kept bundle's node takes no tasks now (paused): wait.
        }
        if let (true, Some(p)) = (take_fixed, p) {
            pools[p].1.take(&needs[b]);
        }
        at.push(p);
    }
    let mut todo: Vec<usize> = (0..needs.len()).filter(|&b| at[b].is_none()).collect();
    // Largest first, so a greedy pass does not fill a node with small bundles a large one needed.
    todo.sort_by_key(|&b| (std::cmp::Reverse(needs[b].iter().map(|&(_, a)| a).sum::<u64>()), b));
    match strategy {
        GroupStrategy::StrictPack | GroupStrategy::Pack => {
            let sum = sum_needs(todo.iter().map(|&b| &needs[b]));
            let kept = at.iter().flatten().next().copied();
            let one = match kept {
                Some(p) => pools[p].1.fits(&sum).then_some(p),
                None => (0..pools.len()).find(|&p| pools[p].1.fits(&sum)),
            };
            if let Some(p) = one {
                pools[p].1.take(&sum);
                for &b in &todo {
                    at[b] = Some(p);
                }
            } else if strategy == GroupStrategy::StrictPack || !share(&todo, needs, pools, &mut at, true) {
                return None;
            }
        }
        GroupStrategy::StrictSpread | GroupStrategy::Spread => {
            let candidates: Vec<Vec<usize>> = todo
                .iter()
                .map(|&b| {
                    (0..pools.len())
                        .filter(|&p| !at.contains(&Some(p)) && pools[p].1.fits(&needs[b]))
                        .collect()
                })
                .collect();
            if let Some(matched) = matching(&candidates, pools.len()) {
                for (i, &b) in todo.iter().enumerate() {
                    pools[matched[i]].1.take(&needs[b]);
                    at[b] = Some(matched[i]);
                }
            } else if strategy == GroupStrategy::StrictSpread || !share(&todo, needs, pools, &mut at, false) {
                return None;
            }
        }
    }
    at.into_iter().map(|p| p.map(|p| pools[p].0)).collect()
}

/// How many placements of one bundle [`share`] may try for a group before it gives up: a
/// group of a few bundles on a small cluster is searched to the end, a larger one as far as
/// this goes.
const SHARE_BUDGET: u32 = 1024;

/// Places each bundle of `todo` on a pool with room for it, pools shared, and records it in
/// `at`; false (`at` as it was) if none is found. The first choice of each bundle is the
/// greedy one — the pool holding the most of the group's bundles with `pack`, the fewest
/// without, ties to the first pool — and where that strands a later bundle the others are
/// tried, depth first, up to [`SHARE_BUDGET`] placements: a first fit can take what a later
/// bundle of other resources needed (`CPU=2` onto the only gpu node, then `CPU=0.5,gpu=1`
/// has nowhere to go, though `CPU=2` fits the other node).
fn share(
    todo: &[usize],
    needs: &[Need],
    pools: &mut [(NodeSlot, Pool)],
    at: &mut [Option<usize>],
    pack: bool,
) -> bool {
    // What does not fit at all, or not in the pools' room together, is not searched for.
    if todo.iter().any(|&b| !pools.iter().any(|(_, pool)| pool.fits(&needs[b]))) {
        return false;
    }
    let sum = sum_needs(todo.iter().map(|&b| &needs[b]));
    let short = sum.iter().any(|&(res, amount)| {
        let free: u64 = pools
            .iter()
            .map(|(_, pool)| pool.free().find(|&(r, _)| r == res).map_or(0, |(_, free)| free))
            .fold(0, u64::saturating_add);
        free < amount
    });
    if short {
        return false;
    }
    let mut budget = SHARE_BUDGET;
    share_from(todo, needs, pools, at, pack, &mut budget)
}

fn share_from(
    todo: &[usize],
    needs: &[Need],
    pools: &mut [(NodeSlot, Pool)],
    at: &mut [Option<usize>],
    pack: bool,
    budget: &mut u32,
) -> bool {
    let Some((&b, rest)) = todo.split_first() else { return true };
    let count_on = |at: &[Option<usize>], p: usize| at.iter().filter(|&&q| q == Some(p)).count();
    let mut candidates: Vec<usize> = (0..pools.len()).filter(|&p| pools[p].1.fits(&needs[b])).collect();
    if pack {
        candidates.sort_by_key(|&p| std::cmp::Reverse(count_on(at, p)));
    } else {
        candidates.sort_by_key(|&p| count_on(at, p));
    }
    for p in candidates {
        if *budget == 0 {
            return false;
        }
        *budget -= 1;
        pools[p].1.take(&needs[b]);
        at[b] = Some(p);
        if share_from(rest, needs, pools, at, pack, budget) {
            return true;
        }
        pools[p].1.give_back(&needs[b], None);
        at[b] = None;
    }
    false
}

/// A matching of each entry of `candidates` (a bundle) to a distinct one of its candidate
/// positions (nodes), or `None` if there is none: augmenting paths (Kuhn), exact where a
/// greedy choice could miss one.
fn matching(candidates: &[Vec<usize>], positions: usize) -> Option<Vec<usize>> {
    fn augment(b: usize, candidates: &[Vec<usize>], owner: &mut [Option<usize>], seen: &mut [bool]) -> bool {
        for &p in &candidates[b] {
            if std::mem::replace(&mut seen[p], true) {
                continue;
            }
            if owner[p].is_none_or(|other| augment(other, candidates, owner, seen)) {
                owner[p] = Some(b);
                return true;
            }
        }
        false
    }
    let mut owner = vec![None; positions];
    for b in 0..candidates.len() {
        let mut seen = vec![false; positions];
        if !augment(b, candidates, &mut owner, &mut seen) {
            return None;
        }
    }
    let mut matched = vec![0; candidates.len()];
    for (p, b) in owner.iter().enumerate() {
        if let Some(b) = b {
            matched[*b] = p;
        }
    }
    Some(matched)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matching_finds_what_greedy_misses() {
        // Bundle 0 fits both nodes, bundle 1 only node 0: greedy 0→0 would strand bundle 1.
        assert_eq!(matching(&[vec![0, 1], vec![0]], 2), Some(vec![1, 0]));
        assert_eq!(matching(&[vec![0], vec![0]], 2), None);
        assert_eq!(matching(&[], 0), Some(vec![]));
    }
}
