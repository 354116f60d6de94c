//! The simulator against the real core: many seeds with faults, determinism, and bugs planted
//! on purpose to show the invariants catch them.

use super::*;
use crate::planted::{PlantedBug, Sabotage, plant, sabotage};

/// A small cluster for seed `seed`: 3-8 workers, 2-3 drivers, 50-200 tasks, varied by seed so
/// that the seeds cover different shapes.
fn small(seed: u64) -> Config {
    let mut rng = Rng::new(seed ^ 0xc0ff_ee00);
    Config {
        seed,
        workers: rng.range(3, 8) as usize,
        drivers: rng.range(2, 3) as usize,
        tasks: rng.range(50, 200),
        ..Config::default()
    }
}

fn run_seeds(seeds: std::ops::Range<u64>, config: impl Fn(u64) -> Config) -> Vec<Report> {
    seeds
        .map(|seed| match run(&config(seed)) {
            Ok(report) => report,
            Err(failure) => panic!("{failure}"),
        })
        .collect()
}

/// The sum over `reports` of one of their placement-group counts.
fn group_total(reports: &[Report], count: fn(&GroupCounts) -> u64) -> u64 {
    reports.iter().map(|r| count(&r.groups)).sum()
}

/// Four tests of 55 seeds each (220 in all), so the harness runs them on every core.
#[test]
fn seeds_0_to_55_with_faults() {
    let reports = run_seeds(0..55, small);
    assert!(reports.iter().any(|r| r.faults.written_off > 0), "some seed has a worker written off");
    assert!(reports.iter().any(|r| r.faults.worker_crashes > 0 && r.faults.driver_crashes > 0));
    // Placement groups are placed, run tasks, lose bundles with their nodes and are placed
    // again, are found infeasible, and go.
    let seeds_with_groups = reports.iter().filter(|r| r.groups.created > 0).count();
    assert!(seeds_with_groups > 25, "{seeds_with_groups} seeds create groups");
    assert!(group_total(&reports, |g| g.tasks) > 100, "tasks run in bundles");
    assert!(group_total(&reports, |g| g.bundles_lost) > 10, "bundles are lost with their nodes");
    assert!(group_total(&reports, |g| g.placed) > group_total(&reports, |g| g.created) / 2);
    assert!(group_total(&reports, |g| g.infeasible) > 5, "groups are reported infeasible");
    assert!(group_total(&reports, |g| g.ready) > 0 && group_total(&reports, |g| g.removed) > 0);
}

#[test]
fn seeds_55_to_110_with_faults() {
    run_seeds(55..110, small);
}

#[test]
fn seeds_110_to_165_with_faults() {
    run_seeds(110..165, small);
}

#[test]
fn seeds_165_to_220_with_faults() {
    let reports = run_seeds(165..220, small);
    assert!(reports.iter().all(|r| r.tasks > 0 && r.dispatches > 0 && r.outcomes > 0));
    assert!(reports.iter().any(|r| r.late_frames > 0), "some seed feeds a late frame to the core");
}

#[test]
fn seeds_without_faults_see_no_lost_worker() {
    // With no faults, a `WorkerLost` outcome is a failure of the run (see the driver's checks).
    let reports = run_seeds(1000..1030, |seed| Config { faults: false, ..small(seed) });
    assert!(reports.iter().all(|r| r.faults == Faults::default()));
}

#[test]
fn one_seed_gives_one_run() {
    for seed in [3, 77, 4242] {
        let config = small(seed);
        let first = run(&config).unwrap_or_else(|f| panic!("{f}"));
        let second = run(&config).unwrap_or_else(|f| panic!("{f}"));
        assert_eq!(first, second, "seed {seed} ran two ways");
        assert_ne!(first.digest, 0);
    }
    let config = Config { head_crashes: true, ..small(5010) };
    let first = run(&config).unwrap_or_else(|f| panic!("{f}"));
    assert!(first.faults.head_crashes > 0);
    assert_eq!(first, run(&config).unwrap_or_else(|f| panic!("{f}")), "a run with head crashes ran two ways");
    let other = run(&small(4)).unwrap_or_else(|f| panic!("{f}"));
    assert_ne!(other.digest, run(&small(3)).unwrap_or_else(|f| panic!("{f}")).digest, "seeds differ");
}

/// Runs seeds with `bug` planted until one fails, and returns that failure.
fn first_failure(bug: PlantedBug, seeds: std::ops::Range<u64>) -> Failure {
    plant(Some(bug));
    let failure = seeds.clone().find_map(|seed| run(&small(seed)).err());
    plant(None);
    failure.unwrap_or_else(|| panic!("{bug:?} planted, yet seeds {seeds:?} all passed"))
}

#[test]
fn a_task_left_behind_in_its_queue_is_caught_by_the_watchdog() {
    let failure = first_failure(PlantedBug::NeverPlace("concat"), 0..20);
    assert!(failure.message.contains("the watchdog found"), "{failure}");
    assert!(failure.message.contains("concat"), "{failure}");
}

#[test]
fn a_result_lost_after_a_retry_is_caught() {
    let failure = first_failure(PlantedBug::ForgetDoneOnRetry, 0..20);
    assert!(failure.message.contains("did not drain"), "{failure}");
    // The failure replays: the same seed fails the same way at the same step.
    plant(Some(PlantedBug::ForgetDoneOnRetry));
    let again = run(&small(failure.seed)).expect_err("the seed fails again");
    plant(None);
    assert_eq!((again.step, &again.message), (failure.step, &failure.message));
}

/// Runs seeds with `what` sabotaged until one fails.
fn sabotaged_failure(what: Sabotage) -> Failure {
    let failure = (0..20).find_map(|seed| {
        sabotage(Some(what));
        let result = run(&small(seed));
        sabotage(None);
        result.err()
    });
    failure.unwrap_or_else(|| panic!("{what:?}, yet every seed passed"))
}

#[test]
fn a_wrong_value_is_caught() {
    let failure = sabotaged_failure(Sabotage::WrongValue);
    assert!(failure.message.contains("were expected"), "{failure}");
}

#[test]
fn a_task_the_head_forgets_is_caught() {
    // However it shows (the owner waits for ever, or a dependent is sent an empty argument and
    // returns a wrong value), a seed fails.
    sabotaged_failure(Sabotage::HeadForgetsATask);
}

/// Seed 214 of `cargo xtask simulate`'s default shape: a driver stops a service while the head
/// re-creates it after its node was lost. `stop_service` fails the not-yet-ready instance at
/// once, which frees its name, while its host goes on constructing it; another driver's start
/// under the same name is placed and named while the first instance, constructed meanwhile,
/// still serves (its `StopInstance` is on its way). A running instance keeps its name until its
/// host confirms the stop; one under construction should too.
#[test]
fn a_service_stopped_while_being_constructed_keeps_its_name() {
    run(&Config::at_scale(214, 16, 3, 2000)).unwrap_or_else(|failure| panic!("{failure}"));
}

/// The head crashes now and then (a fault among the others), and starts again from the
/// durable part of its journal: frames wait for the group commit of what caused them, peers take
/// up their sessions and send again what the head did not keep. Nothing a driver was told, nor
/// anything the head said was durable, may be lost, and a task runs again only when its worker
/// was lost or it failed with an application error.
fn with_head_crashes(seed: u64) -> Config {
    Config { head_crashes: true, ..small(seed) }
}

#[test]
fn seeds_with_head_crashes() {
    let reports = run_seeds(5000..5030, |seed| Config { services: false, ..with_head_crashes(seed) });
    let crashes: Vec<u64> = reports.iter().map(|r| r.faults.head_crashes).collect();
    assert!(crashes.iter().filter(|&&c| c > 0).count() > 20, "the head crashes: {crashes:?}");
    // A crashed worker's session is closed at once while the head runs; one that died while the
    // head was down is still held for it when its successor joins from the same host.
    assert!(
        reports.iter().any(|r| r.faults.replaced > 0),
        "some seed has a restarted worker replace the node the head held for its predecessor"
    );
}

#[test]
fn seeds_with_head_crashes_and_services() {
    let reports = run_seeds(5003..5033, with_head_crashes);
    let crashes: Vec<u64> = reports.iter().map(|r| r.faults.head_crashes).collect();
    assert!(crashes.iter().filter(|&&c| c > 1).count() > 10, "the head crashes again: {crashes:?}");
    // Groups outlive the head's crashes (kept in its journal and snapshots) and are placed.
    assert!(group_total(&reports, |g| g.placed) > 0 && group_total(&reports, |g| g.tasks) > 0);
}

#[test]
fn seeds_without_groups_create_none() {
    let config = Config { groups: false, ..small(7) };
    let report = run(&config).unwrap_or_else(|f| panic!("{f}"));
    assert_eq!(report.groups, GroupCounts::default());
    // No flag of `cargo xtask simulate` turns groups off: the replay is the configuration.
    assert!(config.replay().starts_with("sim::run(&Config {"), "{}", config.replay());
}

/// Seed 294: a driver creates a PACK group of `CPU=2`, `CPU=0.5,gpu=1` and `CPU=1,adder=1`
/// while the nodes `CPU=0.5`, `CPU=3,gpu=1` and `CPU=2,adder=3,gpu=1` are connected. No node
/// holds all three, and placing each bundle, largest first, on the first node with room (in
/// the scheduler's order, the one with `adder`) left `CPU=1,adder=1` nowhere to go: the head
/// reported the group infeasible, which the simulator's exhaustive search refuted (`CPU=2` and
/// the gpu bundle fit `CPU=3,gpu=1`, `CPU=1,adder=1` the other). Where the first fit strands a
/// bundle, the scheduler now tries the other ways too.
#[test]
fn a_group_the_first_fit_strands_is_placed() {
    run(&small(294)).unwrap_or_else(|failure| panic!("{failure}"));
}

/// Seed 5002: a driver stops a service whose instance was built, and the head crashes before
/// its `StopInstance` reaches the host. The restarted head must neither write the instance off
/// (the host still holds it) nor forget to stop it: it asks the host again when it resumes.
#[test]
fn a_stopping_instance_is_stopped_again_after_a_head_restart() {
    run(&with_head_crashes(5002)).unwrap_or_else(|failure| panic!("{failure}"));
}

/// Seed 5235 (`cargo xtask simulate --seed 5235 --workers 4 --drivers 3 --tasks 117 --window 12
/// --check-every-step --head-crashes`): a service with `max_restarts` 1 lost its node twice, and
/// the head took the budget left after its one restart for another. A head restarted from a
/// snapshot (where that budget reads back as none) wrote the service off instead, so the
/// instance the previous run had restarted was never stopped on its host.
#[test]
fn a_service_is_restarted_no_more_often_than_max_restarts_allows() {
    let config = Config {
        window: 12,
        check_every_step: true,
        head_crashes: true,
        ..Config::at_scale(5235, 4, 3, 117)
    };
    run(&config).unwrap_or_else(|failure| panic!("{failure}"));
}
