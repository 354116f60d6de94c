//! Placement groups as the simulator sees them from outside the scheduler: where the head holds
//! each bundle, an exhaustive answer to "could the connected nodes hold this group?", and the
//! checks of what the head reports against both.
//!
//! Where a bundle is comes from what the head shows (`Scheduler::group_status`, the answer a
//! `GroupReady` gets), read after every input: the scheduler reserves a group's unplaced
//! bundles all at once, and a reserved bundle stays on its node until that node is lost, so a
//! group seen placed and then pending holds exactly the bundles whose nodes are still
//! connected. When that chain is broken (two nodes lost in one input, which may hide a
//! re-placement in between; a head restart) the group is *unknown* until it is seen placed
//! again, and only the checks that need no positions are made.

use chia_core::Resources;
use chia_core::SessionId;
use chia_core::placement::GroupStrategy;

/// What the simulator knows of one placement group a driver created.
pub(super) struct GroupModel {
    /// The session that created it (its job): it goes with it.
    pub(super) owner: SessionId,
    pub(super) bundles: Vec<Resources>,
    pub(super) strategy: GroupStrategy,
    /// The node (by name) each bundle is reserved on; `None` while it is not (never placed,
    /// or its node was lost since).
    pub(super) nodes: Vec<Option<String>>,
    /// `nodes` is where the head holds the bundles (see the module documentation).
    pub(super) known: bool,
    /// The head was seen holding it.
    pub(super) seen: bool,
    /// Seen holding it, then no more: removed (by its driver or with its job).
    pub(super) gone: bool,
    /// Seen with every bundle reserved at the latest look.
    pub(super) placed: bool,
    /// The node epoch and positions of the latest exhaustive check of a pending group, so an
    /// unchanged group on an unchanged cluster is not searched again at every step.
    pub(super) checked: Option<(u64, Vec<Option<String>>)>,
}

impl GroupModel {
    pub(super) fn new(owner: SessionId, bundles: Vec<Resources>, strategy: GroupStrategy) -> GroupModel {
        let nodes = vec![None; bundles.len()];
        GroupModel {
            owner,
            bundles,
            strategy,
            nodes,
            known: true,
            seen: false,
            gone: false,
            placed: false,
            checked: None,
        }
    }

    /// What this group reserves on the node named `name`, as far as it is known.
    pub(super) fn reserved_on(&self, name: &str, into: &mut Resources) {
        for (bundle, node) in self.bundles.iter().zip(&self.nodes) {
            if node.as_deref() == Some(name) {
                add(into, bundle);
            }
        }
    }
}

/// Adds `more` to `sum`.
pub(super) fn add(sum: &mut Resources, more: &Resources) {
    for (name, amount) in more.iter() {
        let total = sum.get(name).checked_add(amount).unwrap_or(chia_core::ResourceAmount::MAX);
        let _ = sum.set(name, total);
    }
}

/// `capacity` less `used`, or `None` if `used` is more than it has.
pub(super) fn minus(capacity: &Resources, used: &Resources) -> Option<Resources> {
    if !capacity.covers(used) {
        return None;
    }
    let mut left = capacity.clone();
    left.take(used);
    Some(left)
}

/// Whether two lists hold the same amounts (an amount taken down to zero counts as absent).
pub(super) fn same(a: &Resources, b: &Resources) -> bool {
    a.covers(b) && b.covers(a)
}

/// Whether the bundles of a group can be reserved on nodes with `room` as `strategy` asks, those
/// kept (`Some(node)` in `kept`, an index into `room`) staying where they are: an exhaustive
/// search (groups here have at most a few bundles), so it answers what a greedy pass might miss.
/// `room` is what each node has for the group: its capacity when asking what could ever fit.
pub(super) fn feasible(
    strategy: GroupStrategy,
    bundles: &[Resources],
    kept: &[Option<usize>],
    room: &[Resources],
) -> bool {
    let mut room = room.to_vec();
    for (bundle, node) in bundles.iter().zip(kept) {
        let Some(&n) = node.as_ref() else { continue };
        match room.get(n).and_then(|r| minus(r, bundle)) {
            Some(left) => room[n] = left,
            None => return false,
        }
    }
    let todo: Vec<&Resources> =
        bundles.iter().zip(kept).filter(|(_, node)| node.is_none()).map(|(bundle, _)| bundle).collect();
    if todo.is_empty() {
        return true;
    }
    match strategy {
        GroupStrategy::StrictPack => {
            let mut sum = Resources::new();
            for bundle in &todo {
                add(&mut sum, bundle);
            }
            match kept.iter().flatten().next() {
                Some(&n) => room[n].covers(&sum),
                None => room.iter().any(|r| r.covers(&sum)),
            }
        }
        GroupStrategy::StrictSpread => {
            let mut taken: Vec<bool> = (0..room.len()).map(|n| kept.contains(&Some(n))).collect();
            spread(&todo, &room, &mut taken)
        }
        GroupStrategy::Pack | GroupStrategy::Spread => share(&todo, &mut room),
    }
}

/// Each bundle of `todo` on its own node of `room` not `taken`.
fn spread(todo: &[&Resources], room: &[Resources], taken: &mut [bool]) -> bool {
    let Some((first, rest)) = todo.split_first() else { return true };
    for n in 0..room.len() {
        if taken[n] || !room[n].covers(first) {
            continue;
        }
        taken[n] = true;
        let found = spread(rest, room, taken);
        taken[n] = false;
        if found {
            return true;
        }
    }
    false
}

/// The bundles of `todo` on nodes of `room`, sharing nodes as they fit.
fn share(todo: &[&Resources], room: &mut [Resources]) -> bool {
    let Some((first, rest)) = todo.split_first() else { return true };
    for n in 0..room.len() {
        let Some(left) = minus(&room[n], first) else { continue };
        let before = std::mem::replace(&mut room[n], left);
        let found = share(rest, room);
        room[n] = before;
        if found {
            return true;
        }
    }
    false
}

/// What is wrong with a placement the head reports for a group (`nodes`, by bundle), given the
/// capacity of each connected node by name (`None`: no such connected node): one node per
/// bundle, each connected, the strategy's promise kept, and no node given more of the group's
/// bundles than it has.
pub(super) fn check_placed<'a>(
    strategy: GroupStrategy,
    bundles: &[Resources],
    nodes: &[String],
    capacity: impl Fn(&str) -> Option<&'a Resources>,
) -> Result<(), String> {
    if nodes.len() != bundles.len() {
        return Err(format!("{} node(s) were named for {} bundle(s)", nodes.len(), bundles.len()));
    }
    let mut distinct: Vec<&str> = nodes.iter().map(String::as_str).collect();
    distinct.sort_unstable();
    distinct.dedup();
    match strategy {
        GroupStrategy::StrictPack if distinct.len() > 1 => {
            return Err(format!("STRICT_PACK bundles are on {} nodes: {nodes:?}", distinct.len()));
        }
        GroupStrategy::StrictSpread if distinct.len() < nodes.len() => {
            return Err(format!("STRICT_SPREAD bundles share nodes: {nodes:?}"));
        }
        _ => {}
    }
    for name in distinct {
        let Some(capacity) = capacity(name) else {
            return Err(format!("a bundle is on {name}, which is no connected node ({nodes:?})"));
        };
        let mut sum = Resources::new();
        for (bundle, node) in bundles.iter().zip(nodes) {
            if node == name {
                add(&mut sum, bundle);
            }
        }
        if !capacity.covers(&sum) {
            return Err(format!("{name} holds bundles of {sum} in all, more than its {capacity}"));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn res(text: &str) -> Resources {
        Resources::parse(text).unwrap()
    }

    #[test]
    fn the_search_finds_what_a_greedy_pass_misses_and_keeps_kept_bundles() {
        // Largest first onto the first node that fits strands the gpu bundle; swapped, both fit.
        let room = [res("CPU=2,gpu=1"), res("CPU=2")];
        let bundles = [res("CPU=2"), res("CPU=0.5,gpu=1")];
        assert!(feasible(GroupStrategy::Pack, &bundles, &[None, None], &room));
        assert!(feasible(GroupStrategy::StrictSpread, &bundles, &[None, None], &room));
        assert!(!feasible(GroupStrategy::StrictPack, &bundles, &[None, None], &room));
        // The CPU=2 bundle kept on the gpu node: the other has nowhere to go.
        assert!(!feasible(GroupStrategy::Pack, &bundles, &[Some(0), None], &room));
        assert!(!feasible(GroupStrategy::StrictSpread, &bundles, &[Some(0), None], &room));
        // STRICT_SPREAD needs as many nodes as bundles; STRICT_PACK one node with their sum.
        let three = [res("CPU=0.5"), res("CPU=0.5"), res("CPU=0.5")];
        assert!(!feasible(GroupStrategy::StrictSpread, &three, &[None; 3], &room));
        assert!(feasible(GroupStrategy::Spread, &three, &[None; 3], &room));
        assert!(feasible(GroupStrategy::StrictPack, &three, &[None; 3], &room));
        assert!(!feasible(GroupStrategy::StrictPack, &three, &[None; 3], &[res("CPU=1")]));
        assert!(feasible(GroupStrategy::Pack, &[res("CPU=1")], &[Some(1)], &room));
        assert!(!feasible(GroupStrategy::Pack, &[res("CPU=8")], &[None], &room));
    }

    #[test]
    fn a_placement_that_breaks_its_promise_is_caught() {
        let (a, b) = (res("CPU=2"), res("CPU=1"));
        let capacity = |name: &str| match name {
            "a" => Some(&a),
            "b" => Some(&b),
            _ => None,
        };
        let bundles = [res("CPU=1"), res("CPU=1")];
        let names = |list: &[&str]| list.iter().map(|n| n.to_string()).collect::<Vec<_>>();
        let check = |strategy, nodes: &[&str]| check_placed(strategy, &bundles, &names(nodes), capacity);
        assert!(check(GroupStrategy::StrictPack, &["a", "a"]).is_ok());
        assert!(check(GroupStrategy::StrictPack, &["a", "b"]).unwrap_err().contains("STRICT_PACK"));
        assert!(check(GroupStrategy::StrictSpread, &["a", "a"]).unwrap_err().contains("share"));
        assert!(check(GroupStrategy::Pack, &["b", "b"]).unwrap_err().contains("more than"));
        assert!(check(GroupStrategy::Spread, &["a", "c"]).unwrap_err().contains("no connected node"));
        assert!(check(GroupStrategy::Spread, &["a"]).unwrap_err().contains("1 node(s)"));
    }
}
