//! `chia-bench`: the figures `cargo xtask bench` prints, measured through the public API as a
//! user calls it (run it through `cargo xtask bench`, which builds it in release mode).
//!
//! Each figure is one line `name value unit`; `--json` prints the same as JSON. Figures whose
//! feature has not landed yet are printed as `n/a` with the reason.

use chia::internals::core::{FunctionKey, NodeId, TaskId};
use chia::internals::scheduler::{Command, Event, Scheduler};
use chia::{Bytes, Context, LocalCluster, Resources};
use clap::Parser;
use std::collections::VecDeque;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command as Process, Stdio};
use std::sync::LazyLock;
use std::time::Instant;
use tokio::sync::Notify;

#[derive(Parser, Debug)]
#[command(about = "chia-rs benchmark (run it through `cargo xtask bench`)")]
struct Args {
    /// Print JSON instead of lines.
    #[arg(long)]
    json: bool,
    /// Only the figures whose names start with one of these (comma-separated), e.g. `sync,async`.
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
    /// Multiply every count by this (e.g. 0.1 for a quick run).
    #[arg(long, default_value_t = 1.0)]
    scale: f64,
    /// The release `chia-head` binary (for the head memory figure).
    #[arg(long)]
    head_bin: Option<PathBuf>,
    /// Every embedded head serves its metrics, scraped once a second while it is measured
    /// (what the figures cost with a Prometheus watching).
    #[arg(long)]
    metrics: bool,
    /// Internal: run as the child process whose start-up is measured.
    #[arg(long, hide = true)]
    first_task_child: bool,
}

/// An empty task. Deliberately a plain (sync) function, as most users write them: it runs on
/// the worker's blocking pool, which costs a thread hand-off per task.
#[chia::function]
fn empty() {}

#[chia::function]
fn increment(x: u64) -> u64 {
    x + 1
}

/// Answers a bypassed `increment` without running it.
#[chia::provider]
fn constant_provider(_call: &chia::bypass::BypassCall) -> u64 {
    7
}

#[chia::function]
fn make_bytes(len: usize) -> Bytes {
    Bytes::from(vec![7u8; len])
}

#[chia::function]
fn byte_len(data: Bytes) -> usize {
    data.len()
}

/// A service with one empty method (a plain, sync method, as with `empty`).
#[derive(Default)]
pub struct Echo;

#[chia::service]
impl Echo {
    /// The (stateless) instance.
    pub fn new() -> Self {
        Echo
    }

    /// Does nothing: a service call's round trip and no work.
    pub fn nothing(&self) {}
}

static RELEASE_HOLD: LazyLock<Notify> = LazyLock::new(Notify::new);

/// Occupies a worker's CPU until the benchmark lets it go.
#[chia::function]
async fn hold() {
    RELEASE_HOLD.notified().await;
}

struct Figure {
    name: &'static str,
    value: Option<f64>,
    unit: &'static str,
    note: Option<String>,
}

struct Bench {
    args: Args,
    figures: Vec<Figure>,
}

type BenchResult<T> = Result<T, Box<dyn std::error::Error>>;

impl Bench {
    fn wants(&self, names: &[&str]) -> bool {
        self.args.only.is_empty()
            || names.iter().any(|name| self.args.only.iter().any(|prefix| name.starts_with(prefix.as_str())))
    }

    fn count(&self, n: usize) -> usize {
        ((n as f64 * self.args.scale).round() as usize).max(1)
    }

    fn push(&mut self, figure: Figure) {
        if !self.args.json {
            match (figure.value, &figure.note) {
                (Some(value), _) => println!("{} {} {}", figure.name, format_value(value), figure.unit),
                (None, note) => {
                    println!("{} n/a {} ({})", figure.name, figure.unit, note.as_deref().unwrap_or(""))
                }
            }
        }
        self.figures.push(figure);
    }

    fn record(&mut self, name: &'static str, value: f64, unit: &'static str) {
        self.push(Figure { name, value: Some(value), unit, note: None });
    }

    /// Records a figure with a note that travels with it (shown in `--json`).
    fn record_noted(&mut self, name: &'static str, value: f64, unit: &'static str, note: &str) {
        self.push(Figure { name, value: Some(value), unit, note: Some(note.to_string()) });
    }

    fn not_yet(&mut self, name: &'static str, unit: &'static str, why: &str) {
        if self.wants(&[name]) {
            self.push(Figure { name, value: None, unit, note: Some(why.to_string()) });
        }
    }
}

fn format_value(value: f64) -> String {
    if value >= 100.0 { format!("{value:.0}") } else { format!("{value:.2}") }
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    chia::init_logging("error");
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("tokio runtime");
    let result = if args.first_task_child {
        runtime.block_on(first_task_child())
    } else {
        SCRAPE_METRICS.store(args.metrics, std::sync::atomic::Ordering::Relaxed);
        let mut bench = Bench { args, figures: Vec::new() };
        if !bench.args.json {
            println!("# {}", machine());
            if bench.args.metrics {
                println!("# metrics served and scraped every second");
            }
        }
        runtime.block_on(run(&mut bench)).map(|()| {
            if bench.args.json {
                println!("{}", to_json(&bench.figures));
            }
        })
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("chia-bench: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(bench: &mut Bench) -> BenchResult<()> {
    if bench.wants(&["time_to_first_task_ms"]) {
        let ms = time_to_first_task()?;
        bench.record("time_to_first_task_ms", ms, "ms");
    }
    if bench.wants(&["sync_task_p50_us", "sync_task_p99_us"]) {
        let (p50, p99) = sync_round_trips(bench.count(1_000), Journal::Off).await?;
        bench.record("sync_task_p50_us", p50, "us");
        bench.record("sync_task_p99_us", p99, "us");
    }
    if bench.wants(&["journal_sync_task_p50_us"]) {
        let (p50, _) = sync_round_trips(bench.count(1_000), Journal::On).await?;
        bench.record_noted(
            "journal_sync_task_p50_us",
            p50,
            "us",
            "the head keeps a journal (fdatasync per batch)",
        );
    }
    if bench.wants(&["head_round_trip_p50_us"]) {
        let p50 = head_round_trips(bench.count(1_000)).await?;
        bench.record_noted(
            "head_round_trip_p50_us",
            p50,
            "us",
            "diagnostic: one driver-head QUIC round trip",
        );
    }
    if bench.wants(&["async_tasks_per_s"]) {
        let rate = async_tasks(bench.count(100_000), Journal::Off).await?;
        bench.record("async_tasks_per_s", rate, "tasks/s");
    }
    if bench.wants(&["journal_async_tasks_per_s"]) {
        let rate = async_tasks(bench.count(100_000), Journal::On).await?;
        bench.record_noted("journal_async_tasks_per_s", rate, "tasks/s", "the head keeps a journal");
    }
    if bench.wants(&["chain_tasks_per_s"]) {
        let rate = chain(bench.count(10_000)).await?;
        bench.record("chain_tasks_per_s", rate, "tasks/s");
    }
    if bench.wants(&["service_call_p50_us", "service_calls_per_s"]) {
        let (p50, rate) = service_calls(bench.count(1_000), bench.count(10_000)).await?;
        bench.record("service_call_p50_us", p50, "us");
        bench.record("service_calls_per_s", rate, "calls/s");
    }
    if bench.wants(&["large_result_mb_per_s", "large_arg_mb_per_s"]) {
        let (result, arg) = large_values(bench.count(100) << 20).await?;
        bench.record("large_result_mb_per_s", result, "MB/s");
        bench.record("large_arg_mb_per_s", arg, "MB/s");
    }
    if bench.wants(&BYPASS_FIGURES) {
        let (bypassed, replayed, rate) = bypass_figures(bench.count(1_000), bench.count(10_000)).await?;
        bench.record("bypass_call_p50_us", bypassed, "us");
        bench.record("bypass_replay_p50_us", replayed, "us");
        bench.record("bypassed_tasks_per_s", rate, "tasks/s");
    }
    if bench.wants(&SMALL_CACHE_FIGURES) || bench.wants(&LARGE_CACHE_FIGURES) {
        cache_figures(bench).await?;
    }
    if bench.wants(&["cache_auto_write_overhead_us"]) {
        let overhead = auto_write_overhead(bench.count(1_000)).await?;
        bench.record_noted(
            "cache_auto_write_overhead_us",
            overhead,
            "us",
            "p50 of a cached, tagged empty task minus an untagged one (Durability::None: the hop, not the fsync)",
        );
    }
    if bench.wants(&["head_rss_mb_100k_queued", "head_bytes_per_queued_task"]) {
        match bench.args.head_bin.clone() {
            Some(head_bin) => {
                let (mb, per_task) = head_memory(&head_bin, bench.count(100_000)).await?;
                bench.record("head_rss_mb_100k_queued", mb, "MB");
                bench.record("head_bytes_per_queued_task", per_task, "B");
            }
            None => bench.not_yet(
                "head_rss_mb_100k_queued",
                "MB",
                "needs --head-bin (cargo xtask bench passes it)",
            ),
        }
    }
    if bench.wants(&STATUS_FIGURES) {
        let (status, page) = status_answers(bench.count(1_000_000));
        bench.record_noted(
            "status_ms_1m_queued",
            status,
            "ms",
            "chia status, answered and encoded by the head core",
        );
        bench.record_noted(
            "list_tasks_ms_1m_queued",
            page,
            "ms",
            "a page of 50 of chia list tasks --state queued",
        );
    }
    if bench.wants(&["scheduler_decisions_per_s_1000_workers"]) {
        let rate = scheduler_decisions(1_000, bench.count(1_000_000));
        bench.record("scheduler_decisions_per_s_1000_workers", rate, "decisions/s");
    }
    Ok(())
}

fn machine() -> String {
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let mem_gib = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map(|kib| kib / (1024.0 * 1024.0))
        .unwrap_or(0.0);
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name").and_then(|v| v.split_once(':')).map(|(_, m)| m.trim()))
        .unwrap_or("unknown CPU");
    format!("machine: {cores} cores, {mem_gib:.1} GiB, {model}; release build")
}

fn to_json(figures: &[Figure]) -> String {
    let figures: Vec<serde_json::Value> = figures
        .iter()
        .map(|f| serde_json::json!({ "name": f.name, "value": f.value, "unit": f.unit, "note": f.note }))
        .collect();
    serde_json::json!({ "machine": machine(), "figures": figures }).to_string()
}

fn resources(text: &str) -> Resources {
    Resources::parse(text).expect("benchmark resources parse")
}

/// Process start to first result: a fresh process starts an embedded cluster and runs one task.
fn time_to_first_task() -> BenchResult<f64> {
    let mut samples = Vec::new();
    for _ in 0..5 {
        let started = Instant::now();
        let mut child = Process::new(std::env::current_exe()?)
            .arg("--first-task-child")
            .env_remove("CHIA_ADDRESS")
            .env_remove("CHIA_CLUSTER_FILE")
            .stdout(Stdio::piped())
            .spawn()?;
        let stdout = child.stdout.take().ok_or("no stdout")?;
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line)?;
        let elapsed = started.elapsed();
        child.wait()?;
        if line.trim() != "first-result" {
            return Err(format!("the child printed {line:?}").into());
        }
        samples.push(elapsed.as_secs_f64() * 1e3);
    }
    Ok(percentile(&mut samples, 0.5))
}

async fn first_task_child() -> BenchResult<()> {
    let cx = chia::Init::new().local_workers(1).connect().await?;
    empty::remote(&cx).get().await?;
    println!("first-result");
    cx.shutdown().await;
    Ok(())
}

async fn cluster(workers: usize) -> Result<(LocalCluster, Context), chia::Error> {
    let cluster = LocalCluster::start(vec![resources(""); workers]).await?;
    watched(&cluster).await?;
    let cx = cluster.driver().await?;
    Ok((cluster, cx))
}

/// Set by `--metrics`: [`watched`] serves and scrapes every embedded head's metrics.
static SCRAPE_METRICS: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// With `--metrics`, `cluster`'s head serves its metrics and a task scrapes them once a second
/// until the head stops (each scrape takes the head's lock, as Prometheus's would).
async fn watched(cluster: &LocalCluster) -> Result<(), chia::Error> {
    if !SCRAPE_METRICS.load(std::sync::atomic::Ordering::Relaxed) {
        return Ok(());
    }
    let listen: std::net::SocketAddr = "127.0.0.1:0".parse().expect("a literal address");
    // Figures "with metrics" from an endpoint that does not serve (or answer) would be figures
    // without: the run stops instead. One scrape before measuring checks it answers.
    let unusable = |e: &dyn std::fmt::Display| -> ! {
        eprintln!("chia-bench --metrics: the head's metrics endpoint cannot be used: {e}");
        std::process::exit(1)
    };
    let address = cluster.head().serve_metrics(listen).await.unwrap_or_else(|e| unusable(&e));
    scrape(address).await.unwrap_or_else(|e| unusable(&e));
    tokio::spawn(async move {
        let mut ticks = tokio::time::interval(std::time::Duration::from_secs(1));
        ticks.tick().await;
        // Until the head stops (the endpoint with it).
        while scrape(address).await.is_ok() {
            ticks.tick().await;
        }
    });
    Ok(())
}

/// One `GET /metrics`, read to its end.
async fn scrape(address: std::net::SocketAddr) -> Result<(), String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(address).await.map_err(|e| e.to_string())?;
    let request = format!("GET /metrics HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.map_err(|e| e.to_string())?;
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer).await.map_err(|e| e.to_string())?;
    if !answer.starts_with(b"HTTP/1.1 200") {
        return Err(format!(
            "the metrics endpoint answered {:?}",
            String::from_utf8_lossy(&answer[..answer.len().min(40)])
        ));
    }
    Ok(())
}

/// Whether the head keeps a journal (in a temporary state directory) while it is measured.
#[derive(Clone, Copy)]
enum Journal {
    Off,
    On,
}

/// An embedded cluster whose head keeps a journal or not; the directory lives as long as it.
async fn cluster_with(
    workers: usize,
    journal: Journal,
) -> BenchResult<(LocalCluster, Context, Option<tempfile::TempDir>)> {
    let state = match journal {
        Journal::Off => None,
        Journal::On => Some(tempfile::tempdir()?),
    };
    let options = chia::internals::HeadOptions {
        state_dir: state.as_ref().map(|dir| dir.path().to_path_buf()),
        ..chia::internals::HeadOptions::default()
    };
    let cluster = LocalCluster::start_with(vec![resources(""); workers], options).await?;
    watched(&cluster).await?;
    let cx = cluster.driver().await?;
    Ok((cluster, cx, state))
}

async fn sync_round_trips(calls: usize, journal: Journal) -> BenchResult<(f64, f64)> {
    let (_cluster, cx, _state) = cluster_with(1, journal).await?;
    for _ in 0..200 {
        empty::remote(&cx).get().await?;
    }
    let mut samples = Vec::with_capacity(calls);
    for _ in 0..calls {
        let started = Instant::now();
        empty::remote(&cx).get().await?;
        samples.push(started.elapsed().as_secs_f64() * 1e6);
    }
    Ok((percentile(&mut samples, 0.5), percentile(&mut samples, 0.99)))
}

async fn head_round_trips(pings: usize) -> Result<f64, chia::Error> {
    let (_cluster, cx) = cluster(1).await?;
    for _ in 0..200 {
        cx.ping().await?;
    }
    let mut samples = Vec::with_capacity(pings);
    for _ in 0..pings {
        samples.push(cx.ping().await?.as_secs_f64() * 1e6);
    }
    Ok(percentile(&mut samples, 0.5))
}

async fn async_tasks(tasks: usize, journal: Journal) -> BenchResult<f64> {
    let (_cluster, cx, _state) = cluster_with(2, journal).await?;
    for _ in 0..200 {
        empty::remote(&cx).get().await?;
    }
    let started = Instant::now();
    let refs: Vec<_> = (0..tasks).map(|_| empty::remote(&cx)).collect();
    for r in &refs {
        r.get().await?;
    }
    Ok(tasks as f64 / started.elapsed().as_secs_f64())
}

async fn service_calls(sequential: usize, pipelined: usize) -> BenchResult<(f64, f64)> {
    let (_cluster, cx) = cluster(1).await?;
    let echo = EchoHandle::start(&cx, chia::ServiceOptions::named("bench-echo")).await?;
    for _ in 0..200 {
        echo.nothing().get().await?;
    }
    let mut samples = Vec::with_capacity(sequential);
    for _ in 0..sequential {
        let started = Instant::now();
        echo.nothing().get().await?;
        samples.push(started.elapsed().as_secs_f64() * 1e6);
    }
    let started = Instant::now();
    let calls: Vec<_> = (0..pipelined).map(|_| echo.nothing()).collect();
    for call in &calls {
        call.get().await?;
    }
    let rate = pipelined as f64 / started.elapsed().as_secs_f64();
    echo.stop().await?;
    Ok((percentile(&mut samples, 0.5), rate))
}

async fn chain(length: usize) -> BenchResult<f64> {
    let (_cluster, cx) = cluster(1).await?;
    increment::remote(&cx, 0).get().await?;
    let started = Instant::now();
    let mut last = increment::remote(&cx, 0);
    for _ in 1..length {
        last = increment::remote(&cx, &last);
    }
    let value = last.get().await?;
    let elapsed = started.elapsed();
    if value != length as u64 {
        return Err(format!("the chain computed {value}, expected {length}").into());
    }
    Ok(length as f64 / elapsed.as_secs_f64())
}

async fn large_values(len: usize) -> BenchResult<(f64, f64)> {
    let (_cluster, cx) = cluster(1).await?;
    let mut result_rates = Vec::new();
    let mut arg_rates = Vec::new();
    let payload = Bytes::from(vec![3u8; len]);
    for _ in 0..3 {
        let started = Instant::now();
        let value = make_bytes::remote(&cx, len).get().await?;
        result_rates.push(len as f64 / started.elapsed().as_secs_f64() / 1e6);
        if value.len() != len {
            return Err("the large result came back with the wrong length".into());
        }
        drop(value);
        let started = Instant::now();
        let echoed = byte_len::remote(&cx, payload.clone()).get().await?;
        arg_rates.push(len as f64 / started.elapsed().as_secs_f64() / 1e6);
        if echoed != len {
            return Err("the large argument arrived with the wrong length".into());
        }
    }
    Ok((percentile(&mut result_rates, 0.5), percentile(&mut arg_rates, 0.5)))
}

/// The head's resident memory with `tasks` queued behind a task that holds the only CPU.
async fn head_memory(head_bin: &Path, tasks: usize) -> BenchResult<(f64, f64)> {
    let state = tempfile::tempdir()?;
    let mut head = Process::new(head_bin)
        .args(["--listen", "127.0.0.1:0", "--state-dir"])
        .arg(state.path())
        .env("RUST_LOG", "error")
        .stdout(Stdio::piped())
        .spawn()?;
    let result = measure_head(&mut head, tasks).await;
    let _ = head.kill();
    let _ = head.wait();
    result
}

async fn measure_head(head: &mut std::process::Child, tasks: usize) -> BenchResult<(f64, f64)> {
    let mut line = String::new();
    BufReader::new(head.stdout.take().ok_or("no stdout")?).read_line(&mut line)?;
    let file =
        line.split_whitespace().find_map(|p| p.strip_prefix("cluster_file=")).ok_or("no ready line")?;
    let credentials = chia::internals::tls::ClusterCredentials::load(Path::new(file))?;
    let worker = chia::internals::Worker::connect(&credentials, "bench", resources("CPU=1")).await?;
    let (client, _) = chia::internals::Client::connect(&credentials, "driver", None).await?;
    let cx = Context::from_client(client);
    let held = hold::remote(&cx);
    // A zero-CPU probe runs past the queue; its result proves the head has taken in
    // everything submitted before it.
    let probe = || async { empty::call().num_cpus(0.0).remote(&cx).get().await };
    probe().await?;
    let before = rss_bytes(head.id())?;
    let queued: Vec<_> = (0..tasks).map(|_| empty::remote(&cx)).collect();
    probe().await?;
    let after = rss_bytes(head.id())?;
    RELEASE_HOLD.notify_one();
    held.get().await?;
    drop(queued);
    cx.shutdown().await;
    worker.shutdown().await;
    Ok((after as f64 / 1e6, after.saturating_sub(before) as f64 / tasks as f64))
}

const SMALL_CACHE_FIGURES: [&str; 4] =
    ["cache_write_1k_per_s", "cache_read_1k_per_s", "cache_has_p50_us", "cache_warm_start_10k_ms"];
const LARGE_CACHE_FIGURES: [&str; 2] = ["cache_write_1m_mb_per_s", "cache_warm_start_1m_ms"];

/// The cache figures, through the cache service as users call it (on the embedded cluster,
/// the cache pinned to the head node, default durability: fsync of file and directory per
/// write). Throughput figures pipeline their calls; `has` is one call at a time.
const STATUS_FIGURES: [&str; 2] = ["status_ms_1m_queued", "list_tasks_ms_1m_queued"];

const BYPASS_FIGURES: [&str; 3] = ["bypass_call_p50_us", "bypass_replay_p50_us", "bypassed_tasks_per_s"];

/// A bypassed call (a provider on the worker instead of the function), one at a time; a call
/// replayed from the cache (condition `has` on the driver, then the cached bytes read on the
/// worker), one at a time; and bypassed calls pipelined.
async fn bypass_figures(calls: usize, pipelined: usize) -> BenchResult<(f64, f64, f64)> {
    use chia::bypass::{Bypass, BypassConfig};
    let (_cluster, cx) = cluster(1).await?;
    let config = BypassConfig::from_yaml_str("bypass:\n  increment: true\n", "bench")?;
    let bypass = Bypass::with_config(&cx, config).await?;
    bypass.set_provider("increment", &constant_provider::PROVIDER)?;
    let mut samples = Vec::with_capacity(calls);
    for x in 0..calls as u64 {
        let started = Instant::now();
        if increment::remote(&cx, x).get().await? != 7 {
            return Err("a bypassed call ran for real".into());
        }
        samples.push(started.elapsed().as_secs_f64() * 1e6);
    }
    let bypassed = percentile(&mut samples, 0.5);
    let started = Instant::now();
    let refs: Vec<_> = (0..pipelined as u64).map(|x| increment::remote(&cx, x)).collect();
    for object in &refs {
        object.get().await?;
    }
    let rate = pipelined as f64 / started.elapsed().as_secs_f64();

    let dir = tempfile::tempdir()?;
    let cache = chia::cache::start_cache(
        &cx,
        chia::cache::CacheOptions::in_dir(dir.path())
            .size(1.0, "GiB")
            .durability(chia::cache::Durability::None),
    )
    .await?;
    let tags: Vec<String> = (0..calls).map(|i| format!("iter{i}")).collect();
    for (x, tag) in tags.iter().enumerate() {
        cache.write(tag, &(x as u64 + 1)).await?;
    }
    bypass.replay_from_cache("increment")?;
    let mut samples = Vec::with_capacity(calls);
    for (x, tag) in tags.iter().enumerate() {
        let started = Instant::now();
        let (object, decision) = increment::call(0).tag(tag).remote_with_decision(&cx);
        if object.get().await? != x as u64 + 1 || !decision.is_bypassed() {
            return Err("a replayed call did not return the cached value".into());
        }
        samples.push(started.elapsed().as_secs_f64() * 1e6);
    }
    Ok((bypassed, percentile(&mut samples, 0.5), rate))
}

/// What an automatic cache write adds to a call: a configured function's tagged calls are
/// written to the cache before their owner hears of the result, untagged ones are not. One call
/// at a time; each tagged call has a tag of its own, so each is written.
async fn auto_write_overhead(calls: usize) -> BenchResult<f64> {
    use chia::cache::{CacheOptions, Durability, start_cache};
    let (_cluster, cx) = cluster(1).await?;
    let dir = tempfile::tempdir()?;
    let yaml = dir.path().join("cache.yaml");
    std::fs::write(&yaml, "cache:\n  empty: true\n")?;
    let options = CacheOptions::in_dir(dir.path().join("store"))
        .size(1.0, "GiB")
        .yaml_path(&yaml)
        .durability(Durability::None);
    let cache = start_cache(&cx, options).await?;
    let mut untagged = Vec::with_capacity(calls);
    let mut tagged = Vec::with_capacity(calls);
    for i in 0..calls {
        let started = Instant::now();
        empty::remote(&cx).get().await?;
        untagged.push(started.elapsed().as_secs_f64() * 1e6);
        let tag = format!("auto{i}");
        let started = Instant::now();
        empty::call().tag(&tag).remote(&cx).get().await?;
        tagged.push(started.elapsed().as_secs_f64() * 1e6);
    }
    if !cache.has(&format!("auto{}", calls - 1)).await? {
        return Err("a tagged call of a cached function was not written to the cache".into());
    }
    Ok(percentile(&mut tagged, 0.5) - percentile(&mut untagged, 0.5))
}

async fn cache_figures(bench: &mut Bench) -> BenchResult<()> {
    use chia::cache::{CacheOptions, start_cache, stop_cache};
    let small = bench.count(10_000);
    let large = bench.count(200);
    let (_cluster, cx) = cluster(1).await?;
    if bench.wants(&SMALL_CACHE_FIGURES) {
        let dir = tempfile::tempdir()?;
        let cache = start_cache(&cx, CacheOptions::in_dir(dir.path()).size(64.0, "GiB")).await?;
        let payload = Bytes::from(vec![5u8; 1024]);
        let tags: Vec<String> = (0..small).map(|i| format!("iter{}_call{}", i / 100, i % 100)).collect();
        let started = Instant::now();
        let writes: Vec<_> =
            tags.iter().map(|tag| cache.handle().write(tag.clone(), payload.clone())).collect();
        for write in &writes {
            write.get().await?;
        }
        bench.record("cache_write_1k_per_s", small as f64 / started.elapsed().as_secs_f64(), "writes/s");
        let started = Instant::now();
        let reads: Vec<_> = tags.iter().map(|tag| cache.handle().read(tag.clone())).collect();
        for read in &reads {
            if read.get().await?.is_none() {
                return Err("a cache entry was not read back".into());
            }
        }
        bench.record("cache_read_1k_per_s", small as f64 / started.elapsed().as_secs_f64(), "reads/s");
        let mut samples = Vec::with_capacity(1_000);
        for tag in tags.iter().take(1_000) {
            let started = Instant::now();
            cache.has(tag).await?;
            samples.push(started.elapsed().as_secs_f64() * 1e6);
        }
        bench.record("cache_has_p50_us", percentile(&mut samples, 0.5), "us");
        stop_cache(&cx, None).await?;
        let started = Instant::now();
        let cache = start_cache(&cx, CacheOptions::in_dir(dir.path()).size(64.0, "GiB")).await?;
        let ms = started.elapsed().as_secs_f64() * 1e3;
        check_entries(&cache, small).await?;
        bench.record("cache_warm_start_10k_ms", ms, "ms");
        stop_cache(&cx, None).await?;
    }
    if bench.wants(&LARGE_CACHE_FIGURES) {
        let dir = tempfile::tempdir()?;
        let cache = start_cache(&cx, CacheOptions::in_dir(dir.path()).size(64.0, "GiB")).await?;
        let payload = Bytes::from(vec![6u8; 1 << 20]);
        let started = Instant::now();
        let writes: Vec<_> =
            (0..large).map(|i| cache.handle().write(format!("big{i}"), payload.clone())).collect();
        for write in &writes {
            write.get().await?;
        }
        let rate = (large << 20) as f64 / started.elapsed().as_secs_f64() / 1e6;
        bench.record("cache_write_1m_mb_per_s", rate, "MB/s");
        stop_cache(&cx, None).await?;
        let started = Instant::now();
        let cache = start_cache(&cx, CacheOptions::in_dir(dir.path()).size(64.0, "GiB")).await?;
        let ms = started.elapsed().as_secs_f64() * 1e3;
        check_entries(&cache, large).await?;
        bench.record("cache_warm_start_1m_ms", ms, "ms");
        stop_cache(&cx, None).await?;
    }
    Ok(())
}

/// A warm-started cache must have found every entry.
async fn check_entries(cache: &chia::cache::Cache, expected: usize) -> BenchResult<()> {
    let found = cache.keys().await?.len();
    if found != expected {
        return Err(format!("the warm start found {found} entries, expected {expected}").into());
    }
    Ok(())
}

fn rss_bytes(pid: u32) -> BenchResult<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .ok_or("no VmRSS")?;
    Ok(kib * 1024)
}

/// The scheduler state machine alone: `nodes` nodes, `tasks` identical tasks submitted at once,
/// then every finish frees room for the next dispatch. Dispatch decisions per second over the
/// whole run, submissions included; events are built before the clock starts.
/// Milliseconds the head core takes (median of 5) to answer `chia status` and one page of
/// `chia list tasks` while `tasks` tasks are queued on 100 busy nodes, encoding included: the
/// time the head's lock is held for them.
fn status_answers(tasks: usize) -> (f64, f64) {
    use chia::internals::core::inspect::{Query, TaskFilter, TaskState};
    use chia::internals::core::protocol::{PROTOCOL_VERSION, PeerToHead, TaskSpec, WorkerOffer};
    let now = Instant::now();
    let mut core = chia_head_core::HeadCore::new(now, chia_head_core::CoreOptions::default());
    let function = FunctionKey::new("f", "0000000000000000");
    for n in 0..100 {
        let offer = WorkerOffer {
            resources: resources("CPU=1"),
            functions: vec![function.clone()],
            services: Vec::new(),
            head_node: false,
            labels: Default::default(),
        };
        let hello = PeerToHead::Hello {
            protocol_version: PROTOCOL_VERSION,
            name: format!("w{n}"),
            worker: Some(offer),
        };
        core.open_session(now, &format!("10.0.0.{n}:4000"), hello).expect("a worker joins");
    }
    let hello = PeerToHead::Hello { protocol_version: PROTOCOL_VERSION, name: "driver".into(), worker: None };
    let driver = core.open_session(now, "10.0.1.1:4000", hello).expect("a driver joins");
    for seq in 0..tasks as u64 {
        let spec = TaskSpec {
            task: TaskId::new(driver, seq),
            function: function.clone(),
            args: Vec::new(),
            request: resources(if seq % 4 == 0 { "CPU=1,adder=1" } else { "CPU=1" }),
            tag: Some(format!("iter{}", seq % 1000)),
            max_retries: chia::Retries::UpTo(3),
            bypass: None,
            retry_exceptions: false,
            job: None,
            timeout_ms: None,
            placement: None,
        };
        core.handle(now, driver, PeerToHead::Submit(spec));
        while core.poll_action().is_some() {}
    }
    let queued = core.status().tasks.queued as usize;
    assert_eq!(queued, tasks.saturating_sub(100), "all but the 100 running are queued");
    let median = |query: &Query| {
        let mut times: Vec<f64> = (0..5)
            .map(|_| {
                let started = Instant::now();
                let answer = core.answer(driver, query);
                let encoded = rmp_serde::to_vec_named(&answer).expect("an answer encodes");
                std::hint::black_box(encoded);
                started.elapsed().as_secs_f64() * 1e3
            })
            .collect();
        times.sort_by(f64::total_cmp);
        times[2]
    };
    let page = TaskFilter { state: Some(TaskState::Queued), limit: 50, ..TaskFilter::default() };
    (median(&Query::Status), median(&Query::Tasks(page)))
}

fn scheduler_decisions(nodes: u64, tasks: usize) -> f64 {
    let mut scheduler = Scheduler::new();
    let now = Instant::now();
    let function = FunctionKey::new("f", "0000000000000000");
    for id in 0..nodes {
        scheduler.handle(
            now,
            Event::NodeJoined {
                node: NodeId(id),
                name: format!("w{id}"),
                resources: resources("CPU=8,adder=8"),
                functions: vec![function.clone()],
                labels: Default::default(),
                paused: false,
            },
        );
    }
    let request = resources("CPU=1,adder=2");
    let submits: Vec<Event> = (0..tasks as u64)
        .map(|i| Event::TaskSubmitted {
            task: TaskId(i),
            function: function.clone(),
            request: request.clone(),
            deps: Vec::new(),
            max_retries: chia::Retries::UpTo(3),
            retry_exceptions: false,
            placement: None,
        })
        .collect();
    let started = Instant::now();
    let mut running: VecDeque<(TaskId, NodeId)> = VecDeque::new();
    let mut decisions = 0usize;
    let mut take_dispatches = |scheduler: &mut Scheduler, running: &mut VecDeque<(TaskId, NodeId)>| {
        for command in scheduler.drain_commands() {
            if let Command::Dispatch { task, node, .. } = command {
                running.push_back((task, node));
                decisions += 1;
            }
        }
    };
    for event in submits {
        scheduler.handle(now, event);
        take_dispatches(&mut scheduler, &mut running);
    }
    while let Some((task, node)) = running.pop_front() {
        scheduler.handle(now, Event::TaskFinished { task, node, error: None });
        scheduler.handle(now, Event::TaskForgotten { task });
        take_dispatches(&mut scheduler, &mut running);
    }
    let elapsed = started.elapsed();
    debug_assert_eq!(decisions, tasks);
    decisions as f64 / elapsed.as_secs_f64()
}

fn percentile(samples: &mut [f64], q: f64) -> f64 {
    samples.sort_by(f64::total_cmp);
    let index = ((samples.len() as f64 - 1.0) * q).round() as usize;
    samples.get(index).copied().unwrap_or(f64::NAN)
}
