//! `cargo xtask simulate`: runs seeds of the deterministic simulator around the real head core
//! (`chia_head_core::sim`) and prints what each did, and how fast: decisions (placements the
//! head sent) and steps per second of wall-clock time, the largest scheduler queue.
//!
//! `cargo xtask` is a debug build; the simulator is run from a release build of this tool
//! (built and started here) unless `--debug` is given.

use chia_head_core::sim::{self, Config, Report};
use std::collections::BTreeMap;
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// How many seeds to run, from --first-seed on.
    #[arg(long, default_value_t = 100)]
    seeds: u64,
    /// The first seed of the range --seeds runs.
    #[arg(long, default_value_t = 0)]
    first_seed: u64,
    /// Run this one seed (replay a failure); overrides --seeds.
    #[arg(long)]
    seed: Option<u64>,
    /// Simulated workers per seed.
    #[arg(long, default_value_t = 16)]
    workers: usize,
    /// Simulated drivers per seed.
    #[arg(long, default_value_t = 3)]
    drivers: usize,
    /// Function tasks per seed.
    #[arg(long, default_value_t = 2_000)]
    tasks: u64,
    /// Inject faults (the default).
    #[arg(long, overrides_with = "no_faults")]
    faults: bool,
    /// No faults: workers and drivers never crash or freeze.
    #[arg(long, overrides_with = "faults")]
    no_faults: bool,
    /// Drivers start, call and stop no services.
    #[arg(long)]
    no_services: bool,
    /// Service constructors never fail.
    #[arg(long)]
    no_constructor_failures: bool,
    /// Drivers never pass results of service calls to functions.
    #[arg(long)]
    no_call_refs: bool,
    /// Check only the head's registry for one instance per service name, not the nodes.
    #[arg(long)]
    no_strict_service_names: bool,
    /// Also crash the head and restart it from its journal; peers take up their sessions.
    #[arg(long)]
    head_crashes: bool,
    /// How often simulated workers send a heartbeat.
    #[arg(long)]
    heartbeat_ms: Option<u64>,
    /// How long the head waits for a silent worker before writing it off.
    #[arg(long)]
    heartbeat_timeout_ms: Option<u64>,
    /// Mean virtual time between injected faults.
    #[arg(long)]
    fault_interval_ms: Option<u64>,
    /// Tasks each driver keeps in flight.
    #[arg(long)]
    window: Option<usize>,
    /// How often (per thousand) a frame of a closed session still reaches the head.
    #[arg(long)]
    late_frames_per_mille: Option<u32>,
    /// Sweep the core's consistency after every step, whatever the size.
    #[arg(long)]
    check_every_step: bool,
    /// Seeds run at once (default: one per core).
    #[arg(long)]
    jobs: Option<usize>,
    /// One JSON object per seed and one for the totals, instead of text.
    #[arg(long)]
    json: bool,
    /// Run in this (debug) build instead of a release build.
    #[arg(long)]
    debug: bool,
    /// With a failure, print the last events whose description contains TEXT (a task id such
    /// as `task-2.100`, a session such as `session-7`), and the head's crashes and restarts.
    #[arg(long, value_name = "TEXT")]
    trace: Option<String>,
}

impl Args {
    fn config(&self, seed: u64) -> Config {
        let base = Config::at_scale(seed, self.workers, self.drivers, self.tasks);
        let ms = |value: Option<u64>, default: Duration| value.map_or(default, Duration::from_millis);
        Config {
            faults: !self.no_faults,
            services: !self.no_services,
            constructor_failures: !self.no_constructor_failures,
            refs_to_call_results: !self.no_call_refs,
            strict_service_names: !self.no_strict_service_names,
            heartbeat: ms(self.heartbeat_ms, base.heartbeat),
            heartbeat_timeout: ms(self.heartbeat_timeout_ms, base.heartbeat_timeout),
            fault_interval: ms(self.fault_interval_ms, base.fault_interval),
            window: self.window.unwrap_or(base.window),
            late_frames_per_mille: self.late_frames_per_mille.unwrap_or(base.late_frames_per_mille),
            check_every_step: self.check_every_step,
            head_crashes: self.head_crashes,
            trace: self.trace.clone(),
            ..base
        }
    }

    fn seeds(&self) -> std::ops::Range<u64> {
        match self.seed {
            Some(seed) => seed..seed + 1,
            None => self.first_seed..self.first_seed + self.seeds,
        }
    }
}

/// Runs the release build of this tool with the same arguments.
fn in_release() -> ExitCode {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let status = std::process::Command::new(&cargo)
        .args(["run", "--quiet", "--release", "--package", "xtask", "--"])
        .args(std::env::args_os().skip(1))
        .status();
    match status {
        Ok(status) if status.success() => ExitCode::SUCCESS,
        Ok(_) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("error: cannot run {cargo}: {e}");
            ExitCode::FAILURE
        }
    }
}

pub fn run(args: Args) -> ExitCode {
    if cfg!(debug_assertions) && !args.debug {
        return in_release();
    }
    let seeds = args.seeds();
    let jobs =
        args.jobs.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get())).max(1);
    let next = AtomicU64::new(seeds.start);
    let (results, finished) = mpsc::channel();
    let started = Instant::now();
    let mut totals = Totals::default();
    std::thread::scope(|scope| {
        for _ in 0..jobs.min((seeds.end - seeds.start) as usize) {
            let results = results.clone();
            let (next, args, end) = (&next, &args, seeds.end);
            scope.spawn(move || {
                loop {
                    let seed = next.fetch_add(1, Ordering::Relaxed);
                    if seed >= end {
                        break;
                    }
                    let wall = Instant::now();
                    let result = sim::run(&args.config(seed));
                    if results.send((seed, result, wall.elapsed())).is_err() {
                        break;
                    }
                }
            });
        }
        drop(results);
        // Printed in seed order, whichever thread finishes first.
        let mut waiting = BTreeMap::new();
        let mut print_next = seeds.start;
        for (seed, result, wall) in finished {
            waiting.insert(seed, (result, wall));
            while let Some((result, wall)) = waiting.remove(&print_next) {
                totals.add(print_next, &result, wall, args.json);
                print_next += 1;
            }
        }
    });
    totals.print(started.elapsed(), jobs, args.json);
    if totals.failed.is_empty() { ExitCode::SUCCESS } else { ExitCode::FAILURE }
}

fn per_second(count: u64, wall: Duration) -> f64 {
    count as f64 / wall.as_secs_f64().max(1e-9)
}

#[derive(Default)]
struct Totals {
    seeds: u64,
    steps: u64,
    dispatches: u64,
    largest_queue: usize,
    failed: Vec<u64>,
    /// Wall time the seeds took, summed over threads.
    busy: Duration,
}

impl Totals {
    fn add(&mut self, seed: u64, result: &Result<Report, sim::Failure>, wall: Duration, json: bool) {
        self.seeds += 1;
        self.busy += wall;
        match result {
            Ok(report) => {
                self.steps += report.steps;
                self.dispatches += report.dispatches;
                self.largest_queue = self.largest_queue.max(report.largest_queue);
                if json {
                    let line = serde_json::json!({
                        "seed": seed,
                        "ok": true,
                        "steps": report.steps,
                        "dispatches": report.dispatches,
                        "largest_queue": report.largest_queue,
                        "virtual_seconds": report.elapsed.as_secs_f64(),
                        "wall_seconds": wall.as_secs_f64(),
                        "steps_per_second": per_second(report.steps, wall),
                        "decisions_per_second": per_second(report.dispatches, wall),
                        "tasks": report.tasks,
                        "worker_crashes": report.faults.worker_crashes,
                        "freezes": report.faults.freezes,
                        "written_off": report.faults.written_off,
                        "replaced": report.faults.replaced,
                        "driver_crashes": report.faults.driver_crashes,
                        "head_crashes": report.faults.head_crashes,
                        "compactions": report.compactions,
                        "digest": format!("{:016x}", report.digest),
                    });
                    println!("{line}");
                } else {
                    println!(
                        "seed {seed}: ok, {} steps ({:.0}/s), {} decisions ({:.0}/s), largest queue {}, {:.1?} virtual in {:.2?}, {} tasks, faults: {} crashed, {} frozen, {} written off, {} replaced, {} drivers lost, {} head restarts, {} journal compactions",
                        report.steps,
                        per_second(report.steps, wall),
                        report.dispatches,
                        per_second(report.dispatches, wall),
                        report.largest_queue,
                        report.elapsed,
                        wall,
                        report.tasks,
                        report.faults.worker_crashes,
                        report.faults.freezes,
                        report.faults.written_off,
                        report.faults.replaced,
                        report.faults.driver_crashes,
                        report.faults.head_crashes,
                        report.compactions,
                    );
                }
            }
            Err(failure) => {
                self.failed.push(seed);
                if json {
                    let line = serde_json::json!({
                        "seed": seed,
                        "ok": false,
                        "step": failure.step,
                        "virtual_seconds": failure.at.as_secs_f64(),
                        "message": failure.message,
                        "replay": failure.replay,
                        "trace": failure.trace,
                    });
                    println!("{line}");
                } else {
                    println!("{failure}");
                }
            }
        }
    }

    fn print(&self, wall: Duration, jobs: usize, json: bool) {
        // Rates per thread-second: what one core does, whatever the number of jobs.
        let steps_per_core = per_second(self.steps, self.busy);
        let decisions_per_core = per_second(self.dispatches, self.busy);
        if json {
            let line = serde_json::json!({
                "totals": true,
                "seeds": self.seeds,
                "failed": self.failed,
                "steps": self.steps,
                "dispatches": self.dispatches,
                "largest_queue": self.largest_queue,
                "wall_seconds": wall.as_secs_f64(),
                "jobs": jobs,
                "seeds_per_second": per_second(self.seeds, wall),
                "steps_per_second": per_second(self.steps, wall),
                "decisions_per_second": per_second(self.dispatches, wall),
                "steps_per_second_per_core": steps_per_core,
                "decisions_per_second_per_core": decisions_per_core,
            });
            println!("{line}");
            return;
        }
        println!(
            "{} seed(s), {} failed{} in {wall:.2?} on {jobs} thread(s): {:.1} seeds/s, {:.0} steps/s ({steps_per_core:.0} per core), {:.0} decisions/s ({decisions_per_core:.0} per core), largest queue {}",
            self.seeds,
            self.failed.len(),
            if self.failed.is_empty() { String::new() } else { format!(" ({:?})", self.failed) },
            per_second(self.seeds, wall),
            per_second(self.steps, wall),
            per_second(self.dispatches, wall),
            self.largest_queue,
        );
    }
}
