//! Placement end to end on an embedded cluster (a real head and three real workers over
//! loopback QUIC): node labels, per-call strategies, placement groups (STRICT_PACK,
//! STRICT_SPREAD, an infeasible STRICT_SPREAD, removal giving the reservation back, a group
//! ending with its job). Tests synchronise on answers from the head, never on sleeps.

extern crate chia_runtime as chia;

mod common;

use chia::placement::GroupProblem;
use chia::placement::{Bundle, PlacementGroup, PlacementStrategy, Strategy};
use chia::{Context, Error, TaskError};
use common::BOUND;
use std::time::Duration;

/// The node a call ran on.
#[chia::function]
fn where_am_i(cx: &Context) -> String {
    cx.node_name().to_string()
}

/// Three workers with 2 CPUs each: `local-1` has an FPGA, the others are on rack b.
async fn cluster() -> Context {
    chia::init_logging("warn");
    chia::Init::new()
        .local_workers(3)
        .local_resources("CPU=2")
        .local_labels(["rack=a,fpga=vu9p", "rack=b", "rack=b"])
        .connect()
        .await
        .expect("the embedded cluster starts")
}

async fn run(call: chia::Call<String>, cx: &Context) -> String {
    tokio::time::timeout(BOUND, call.remote(cx).get()).await.expect("bounded").expect("the call runs")
}

/// Waits for the head's infeasible report on `object` (short waits repeat until the report
/// has arrived: it is an event, not a delay).
async fn infeasible_reason<T: serde::de::DeserializeOwned + std::fmt::Debug>(
    object: &chia::ObjectRef<T>,
) -> String {
    tokio::time::timeout(BOUND, async {
        loop {
            match object.get_timeout(Duration::from_millis(50)).await {
                Err(Error::Timeout { infeasible: Some(reason), .. }) => break reason,
                Err(Error::Timeout { infeasible: None, .. }) => continue,
                other => panic!("expected an infeasible timeout, got {other:?}"),
            }
        }
    })
    .await
    .expect("the head reports the call infeasible")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_run_only_on_nodes_with_their_labels() {
    let cx = cluster().await;
    for _ in 0..4 {
        assert_eq!(run(where_am_i::call().label("fpga", "vu9p"), &cx).await, "local-1");
        let on_b = run(where_am_i::call().label("rack", "b"), &cx).await;
        assert!(on_b == "local-2" || on_b == "local-3", "{on_b}");
    }
    let mut spread = Vec::new();
    for _ in 0..2 {
        spread.push(run(where_am_i::call().label("rack", "b").strategy(Strategy::Spread), &cx).await);
    }
    assert!(spread.iter().all(|n| n == "local-2" || n == "local-3"), "{spread:?}");
    // No node has this label: reported infeasible, naming what each node lacks.
    let nowhere = where_am_i::call().label("fpga", "ku115").remote(&cx);
    let reason = infeasible_reason(&nowhere).await;
    assert!(reason.contains("asks for labels fpga=ku115"), "{reason}");
    assert!(reason.contains("local-1 lacks fpga=ku115 (has fpga=vu9p)"), "{reason}");
    assert!(reason.contains("local-2 lacks fpga=ku115 (has none)"), "{reason}");
    // A malformed label is refused before anything is sent.
    let bad = where_am_i::call().label("fpga", "two words").remote(&cx).get().await;
    assert!(matches!(bad, Err(Error::Task(TaskError::InvalidCall { .. }))), "{bad:?}");
    // `chia list nodes` shows the labels.
    let chia::inspect::Answer::Nodes(nodes) =
        chia::inspect::ask(&cx, chia::inspect::Query::Nodes).await.expect("nodes")
    else {
        panic!("not a node list")
    };
    let first = nodes.iter().find(|n| n.name == "local-1").expect("local-1 listed");
    assert_eq!(first.labels.to_string(), "fpga=vu9p,rack=a");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strict_pack_and_strict_spread_place_bundles_and_their_calls() {
    let cx = cluster().await;
    let packed = PlacementGroup::create(
        &cx,
        [Bundle::new().cpus(1.0), Bundle::new().cpus(1.0)],
        PlacementStrategy::StrictPack,
    );
    let nodes = tokio::time::timeout(BOUND, packed.ready()).await.expect("bounded").expect("placed");
    assert_eq!(nodes.len(), 2);
    assert_eq!(nodes[0], nodes[1], "STRICT_PACK: one node");
    // Asking again answers at once.
    assert_eq!(packed.ready().await.expect("still placed"), nodes);
    for (bundle, node) in nodes.iter().enumerate() {
        assert_eq!(&run(where_am_i::call().in_group(&packed, bundle), &cx).await, node);
    }
    assert_eq!(run(where_am_i::call().in_any_bundle(&packed), &cx).await, nodes[0]);
    packed.remove().await.expect("removed");

    let spread =
        PlacementGroup::create(&cx, (0..3).map(|_| Bundle::new().cpus(1.0)), PlacementStrategy::StrictSpread);
    let nodes = tokio::time::timeout(BOUND, spread.ready()).await.expect("bounded").expect("placed");
    let mut distinct = nodes.clone();
    distinct.sort();
    distinct.dedup();
    assert_eq!(distinct, ["local-1", "local-2", "local-3"], "STRICT_SPREAD: one bundle per node");
    for (bundle, node) in nodes.iter().enumerate() {
        assert_eq!(&run(where_am_i::call().in_group(&spread, bundle), &cx).await, node);
    }
    // More than a bundle holds, or a bundle it does not have: refused, saying so.
    let big = where_am_i::call().num_cpus(2.0).in_group(&spread, 0).remote(&cx).get().await;
    assert!(
        matches!(
            &big,
            Err(Error::Task(TaskError::PlacementGroup { problem: GroupProblem::TooSmall { .. }, .. }))
        ),
        "{big:?}"
    );
    let missing = where_am_i::call().in_group(&spread, 7).remote(&cx).get().await;
    assert!(
        matches!(&missing, Err(Error::Task(TaskError::InvalidCall { message, .. })) if message.contains("no bundle 7")),
        "{missing:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_infeasible_strict_spread_is_reported_as_such() {
    let cx = cluster().await;
    let group =
        PlacementGroup::create(&cx, (0..4).map(|_| Bundle::new().cpus(1.0)), PlacementStrategy::StrictSpread);
    let error = tokio::time::timeout(BOUND, group.ready()).await.expect("bounded").expect_err("infeasible");
    let Error::Task(TaskError::PlacementGroup { group: id, problem: GroupProblem::Infeasible { reason } }) =
        &error
    else {
        panic!("{error:?}")
    };
    assert_eq!(id, &group.id().to_string());
    assert!(reason.contains("STRICT_SPREAD of 4 bundle(s) needs 4 distinct nodes"), "{reason}");
    assert!(reason.contains("only 3 connected node(s) can hold one"), "{reason}");
    assert!(error.to_string().contains("cannot be placed"), "{error}");
    // An empty bundle is refused by the head's check, named.
    let empty = PlacementGroup::create(&cx, [Bundle::new()], PlacementStrategy::Pack);
    let refused = empty.ready().await;
    assert!(
        matches!(&refused, Err(Error::Task(TaskError::InvalidCall { message, .. })) if message.contains("bundle 0 reserves nothing")),
        "{refused:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn removing_a_group_gives_its_reservation_back() {
    let cx = cluster().await;
    // The whole of local-1 (the only FPGA node) is reserved: a plain FPGA call needing both
    // CPUs waits, and runs once the group is removed.
    let group = PlacementGroup::create(&cx, [Bundle::new().cpus(2.0)], PlacementStrategy::StrictPack);
    // Pinning the group is not possible by label, so it retries until it lands on local-1.
    let mut group = group;
    let mut others = Vec::new();
    loop {
        let nodes = tokio::time::timeout(BOUND, group.ready()).await.expect("bounded").expect("placed");
        if nodes[0] == "local-1" {
            break;
        }
        others.push(group);
        group = PlacementGroup::create(&cx, [Bundle::new().cpus(2.0)], PlacementStrategy::StrictPack);
    }
    let waiting = where_am_i::call().label("fpga", "vu9p").num_cpus(2.0).remote(&cx);
    let explained = tokio::time::timeout(BOUND, async {
        loop {
            let answer =
                chia::inspect::ask(&cx, chia::inspect::Query::Explain(waiting.id())).await.expect("explain");
            let chia::inspect::Answer::Explain(explanation) = answer else { panic!("not an explanation") };
            if let Some(reason) =
                explanation.reasons.iter().find(|r| matches!(r, chia::inspect::Reason::Busy { .. }))
            {
                break format!("{reason:?}");
            }
        }
    })
    .await
    .expect("the call is explained as waiting for room");
    assert!(explained.contains("local-1"), "{explained}");
    group.remove().await.expect("removed");
    assert_eq!(tokio::time::timeout(BOUND, waiting.get()).await.expect("bounded").expect("runs"), "local-1");
    // Removing again is not an error; ready() on a removed group says it is unknown.
    group.remove().await.expect("removing twice");
    let gone = group.ready().await;
    assert!(
        matches!(&gone, Err(Error::Task(TaskError::PlacementGroup { problem: GroupProblem::Unknown, .. }))),
        "{gone:?}"
    );
    for other in others {
        other.remove().await.expect("removed");
    }
}
