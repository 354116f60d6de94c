//! `chia`: see what a cluster runs. Joins it like a driver (with the cluster file's member
//! certificate; no other door) and asks the head, which answers from counts it keeps.

use chia_core::inspect::{
    Answer, CancelTarget, ClusterStatus, Explanation, JobView, NodeView, Query, Reason, ServiceView,
    Shortfall, TaskFilter, TaskState, TaskView,
};
use chia_core::{SessionId, TaskId};
use chia_runtime::internals::Client;
use chia_runtime::internals::tls::ClusterCredentials;
use chia_runtime::internals::{default_state_dir, env};
use chia_runtime::{Context, inspect, kv};
use clap::{Args, Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

/// See what a chia cluster runs: its nodes and what they have free, the tasks queued, running
/// and ended, why a task does not run, and cancel tasks; read and change its key/value store. Joins the cluster named by
/// --cluster-file (or CHIA_CLUSTER_FILE; else the cluster.yaml in the head's default state
/// directory) as a member.
#[derive(Parser, Debug)]
#[command(version)]
struct Cli {
    #[command(flatten)]
    cluster: ClusterArgs,
    /// Print the answer as JSON (one document) instead of a table.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Args, Debug)]
struct ClusterArgs {
    /// The cluster file (cluster.yaml) written by chia-head, or one from `chia-head issue-member`.
    #[arg(long, global = true, value_name = "FILE", env = env::CLUSTER_FILE)]
    cluster_file: Option<PathBuf>,
    /// The head's host:port, instead of the address in the cluster file.
    #[arg(long, global = true, value_name = "HOST:PORT", env = env::ADDRESS)]
    address: Option<String>,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Nodes (resources total, used and free; functions; last heard), queued demand by shape,
    /// tasks by state, services, jobs, and tasks the watchdog found stuck.
    Status,
    /// List tasks, nodes, services or jobs.
    List {
        #[command(subcommand)]
        what: ListCommand,
    },
    /// One task (its attempts, sizes, error) or one service.
    Show {
        #[command(subcommand)]
        what: ShowCommand,
    },
    /// Why a task is not running: the inputs it waits for, the resources short on each node
    /// with its function, or that no node offers the function.
    Explain {
        /// The task's id, as `task-3.7` (or `3.7`).
        task: TaskId,
    },
    /// Cancel a task or every unfinished task of a job, whoever submitted them.
    Cancel(CancelArgs),
    /// Jobs: `chia job stop JOB` ends a job and everything it started.
    Job {
        #[command(subcommand)]
        what: JobCommand,
    },
    /// The cluster's key/value store (`chia::kv`): settings a running loop reads. Values are
    /// shown and given as JSON.
    Kv {
        #[command(subcommand)]
        what: KvCommand,
    },
    /// The result cache on the head (`chia::cache`): its statistics, invalidation by tag
    /// pattern, and a check of every entry.
    Cache {
        /// The cache's namespace (default: the default namespace).
        #[arg(long)]
        namespace: Option<String>,
        #[command(subcommand)]
        what: CacheCommand,
    },
}

#[derive(Subcommand, Debug)]
enum CacheCommand {
    /// Entries, bytes, hits, misses, writes and evictions since the cache opened.
    Stats,
    /// Remove every entry whose whole tag the regex matches (as `tags:` patterns match).
    Evict {
        /// The tag pattern, e.g. 'iter1_.*'.
        #[arg(long)]
        tags: String,
    },
    /// Re-read every entry and check its checksums; remove the bad ones (exit status 1 when
    /// there were any).
    Verify {
        /// Only report the bad entries.
        #[arg(long)]
        dry_run: bool,
    },
}

#[derive(Subcommand, Debug)]
enum KvCommand {
    /// Print the value under KEY as JSON (exit status 1 when it holds none).
    Get { key: String },
    /// Store VALUE, read as JSON, under KEY: `4` is an integer, `"warmup"` (quoted, so
    /// `'"warmup"'` in a shell) a string, `{"lr": 0.1}` a map.
    Set {
        key: String,
        #[arg(value_parser = parse_json)]
        value: serde_json::Value,
    },
    /// Keys starting with PREFIX (all without one) and their values.
    List { prefix: Option<String> },
    /// Remove KEY (exit status 1 when it held nothing).
    Delete { key: String },
}

fn parse_json(text: &str) -> Result<serde_json::Value, String> {
    serde_json::from_str(text)
        .map_err(|e| format!("not JSON ({e}); a string is written in quotes, as '\"{text}\"' in a shell"))
}

#[derive(Subcommand, Debug)]
enum JobCommand {
    /// Cancel the job's queued and running tasks (their process trees end with them) and stop
    /// the services it started that are not detached. The driver stays connected.
    Stop {
        /// The job: `driver-3` (as `chia list jobs` shows it), or its number.
        #[arg(value_parser = parse_job)]
        job: SessionId,
        /// Kill the tasks' processes at once instead of asking them to stop.
        #[arg(long)]
        force: bool,
    },
}

#[derive(Subcommand, Debug)]
enum ListCommand {
    /// Tasks, newest first (ended ones while the head remembers them).
    Tasks(ListTasksArgs),
    Nodes,
    Services,
    /// Connected drivers and their tasks.
    Jobs,
}

#[derive(Args, Debug)]
struct ListTasksArgs {
    /// Only tasks in this state: waiting, queued, running, finished, failed, cancelled.
    #[arg(long)]
    state: Option<TaskState>,
    /// Only tasks of this function (its exact name).
    #[arg(long)]
    function: Option<String>,
    /// Only tasks whose tag matches this regular expression (the whole tag).
    #[arg(long, value_name = "REGEX")]
    tag: Option<String>,
    /// Only tasks of this job: `driver-3` (as listed), or its number.
    #[arg(long, value_parser = parse_job)]
    job: Option<SessionId>,
    /// Only tasks running (or last run) on this node.
    #[arg(long)]
    node: Option<String>,
    /// At most this many tasks (1 to 10000).
    #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u64).range(1..=chia_core::inspect::MAX_PAGE as u64))]
    limit: u64,
    /// Start after this position (printed as `next:` at the end of a page).
    #[arg(long, value_name = "POSITION")]
    after: Option<u64>,
}

#[derive(Subcommand, Debug)]
enum ShowCommand {
    Task {
        /// The task's id, as `task-3.7` (or `3.7`).
        task: TaskId,
    },
    Service {
        name: String,
        #[arg(long, default_value = "default")]
        namespace: String,
    },
}

#[derive(Args, Debug)]
#[command(group(clap::ArgGroup::new("target").required(true).args(["task", "job"])))]
struct CancelArgs {
    /// The task's id, as `task-3.7` (or `3.7`).
    task: Option<TaskId>,
    /// Every unfinished task of this job (`driver-3`, or its number).
    #[arg(long, value_parser = parse_job)]
    job: Option<SessionId>,
    /// Kill the tasks' processes at once instead of asking them to stop.
    #[arg(long)]
    force: bool,
}

fn parse_job(text: &str) -> Result<SessionId, String> {
    let number = text.strip_prefix("driver-").or_else(|| text.strip_prefix("session-")).unwrap_or(text);
    number
        .parse()
        .map(SessionId)
        .map_err(|_| format!("{text:?} is not a job; jobs look like driver-3 (see `chia list jobs`)"))
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    chia_runtime::init_logging("warn");
    chia_runtime::run_main(run(cli))
}

/// How long joining may take before the command gives up.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(15);

async fn connect(args: &ClusterArgs) -> Result<Context, String> {
    let default = default_state_dir().join("cluster.yaml");
    let file = match &args.cluster_file {
        Some(file) => file.clone(),
        None if default.exists() => default,
        None => {
            return Err(format!(
                "no cluster named: pass --cluster-file FILE or set {} to the cluster.yaml chia-head wrote (none at {})",
                env::CLUSTER_FILE,
                default.display()
            ));
        }
    };
    let mut credentials = ClusterCredentials::load(&file).map_err(|e| e.to_string())?;
    if let Some(address) = &args.address {
        credentials.address = address.clone();
    }
    let joined =
        tokio::time::timeout(CONNECT_TIMEOUT, Client::connect(&credentials, "chia", None)).await.map_err(
            |_| format!("the head at {} did not answer within {CONNECT_TIMEOUT:?}", credentials.address),
        )?;
    let (client, _) = joined.map_err(|e| e.to_string())?;
    Ok(Context::from_client(client))
}

async fn run(cli: Cli) -> Result<ExitCode, String> {
    let cx = connect(&cli.cluster).await?;
    let result = execute(&cx, &cli.command, cli.json).await;
    cx.shutdown().await;
    result
}

/// How long the head may take to answer (it may be restarting and waiting for its peers).
const ANSWER_TIMEOUT: Duration = Duration::from_secs(30);

async fn ask(cx: &Context, query: Query) -> Result<Answer, String> {
    let answer = tokio::time::timeout(ANSWER_TIMEOUT, inspect::ask(cx, query))
        .await
        .map_err(|_| format!("the head did not answer within {ANSWER_TIMEOUT:?}"))?;
    match answer.map_err(|e| e.to_string())? {
        Answer::Refused { reason } => Err(reason),
        answer => Ok(answer),
    }
}

fn unexpected(answer: &Answer) -> String {
    format!("the head answered something else than asked ({answer:?}); is it another version?")
}

fn print_json(value: &impl serde::Serialize) -> Result<(), String> {
    let text = serde_json::to_string_pretty(value).map_err(|e| e.to_string())?;
    println!("{text}");
    Ok(())
}

async fn execute(cx: &Context, command: &Command, json: bool) -> Result<ExitCode, String> {
    match command {
        Command::Status => {
            let answer = ask(cx, Query::Status).await?;
            let Answer::Status(status) = answer else { return Err(unexpected(&answer)) };
            if json { print_json(&status)? } else { print_status(&status) }
        }
        Command::List { what: ListCommand::Tasks(args) } => {
            let filter = TaskFilter {
                state: args.state,
                function: args.function.clone(),
                tag: args.tag.clone(),
                job: args.job,
                node: args.node.clone(),
                limit: args.limit as usize,
                after: args.after,
            };
            let answer = ask(cx, Query::Tasks(filter)).await?;
            let Answer::Tasks(page) = answer else { return Err(unexpected(&answer)) };
            if json {
                print_json(&page)?
            } else {
                print_tasks(&page.tasks);
                if let Some(next) = page.next {
                    println!("next: --after {next}");
                }
            }
        }
        Command::List { what: ListCommand::Nodes } => {
            let answer = ask(cx, Query::Nodes).await?;
            let Answer::Nodes(nodes) = answer else { return Err(unexpected(&answer)) };
            if json { print_json(&nodes)? } else { print_nodes(&nodes) }
        }
        Command::List { what: ListCommand::Services } => {
            let answer = ask(cx, Query::Services).await?;
            let Answer::Services(services) = answer else { return Err(unexpected(&answer)) };
            if json { print_json(&services)? } else { print_services(&services) }
        }
        Command::List { what: ListCommand::Jobs } => {
            let answer = ask(cx, Query::Jobs).await?;
            let Answer::Jobs(jobs) = answer else { return Err(unexpected(&answer)) };
            if json { print_json(&jobs)? } else { print_jobs(&jobs) }
        }
        Command::Show { what: ShowCommand::Task { task } } => {
            let answer = ask(cx, Query::Task(*task)).await?;
            let Answer::Task(view) = answer else { return Err(unexpected(&answer)) };
            let view = view.ok_or_else(|| {
                format!("the head knows no task {task} (never submitted, or ended long ago)")
            })?;
            if json { print_json(&view)? } else { print_task(&view) }
        }
        Command::Show { what: ShowCommand::Service { name, namespace } } => {
            let query = Query::Service { name: name.clone(), namespace: namespace.clone() };
            let answer = ask(cx, query).await?;
            let Answer::Service(view) = answer else { return Err(unexpected(&answer)) };
            let view = view.ok_or_else(|| format!("no service {name} runs in namespace {namespace}"))?;
            if json { print_json(&view)? } else { print_services(std::slice::from_ref(&view)) }
        }
        Command::Explain { task } => {
            let answer = ask(cx, Query::Explain(*task)).await?;
            let Answer::Explain(explanation) = answer else { return Err(unexpected(&answer)) };
            if json {
                print_json(&explanation)?
            } else {
                print_explanation(&explanation)
            }
            if explanation.reasons == [Reason::Unknown] {
                return Ok(ExitCode::FAILURE);
            }
        }
        Command::Job { what: JobCommand::Stop { job, force } } => {
            let stopped = tokio::time::timeout(ANSWER_TIMEOUT * 10, inspect::stop_job(cx, *job, *force))
                .await
                .map_err(|_| format!("the head did not stop the job within {:?}", ANSWER_TIMEOUT * 10))?
                .map_err(|e| e.to_string())?;
            if json {
                print_json(&stopped)?
            } else {
                println!("driver-{}: {} task(s) cancelled", job.0, stopped.tasks.len());
                for service in &stopped.services {
                    println!("stopped service {service}");
                }
            }
        }
        Command::Kv { what } => return kv_command(cx, what, json).await,
        Command::Cache { namespace, what } => {
            return cache_command(cx, namespace.as_deref(), what, json).await;
        }
        Command::Cancel(args) => {
            let target = match (args.task, args.job) {
                (Some(task), _) => CancelTarget::Task(task),
                (None, Some(job)) => CancelTarget::Job(job),
                (None, None) => return Err("name a task or --job".into()),
            };
            // A job's tasks are cancelled a batch per request, until none is left.
            let mut cancelled = chia_core::inspect::Cancelled::default();
            loop {
                let batch =
                    tokio::time::timeout(ANSWER_TIMEOUT, inspect::cancel(cx, target.clone(), args.force))
                        .await
                        .map_err(|_| format!("the head did not answer within {ANSWER_TIMEOUT:?}"))?
                        .map_err(|e| e.to_string())?;
                cancelled.tasks.extend(batch.tasks);
                cancelled.already_ended += batch.already_ended;
                if !batch.more {
                    break;
                }
            }
            if json {
                print_json(&cancelled)?
            } else {
                for task in &cancelled.tasks {
                    println!("cancelled {task}");
                }
                if cancelled.already_ended > 0 {
                    println!("{} task(s) had ended already", cancelled.already_ended);
                }
            }
            if cancelled.tasks.is_empty() && cancelled.already_ended == 0 {
                let what = match target {
                    CancelTarget::Task(task) => {
                        format!(
                            "nothing cancelled: the head knows no task {task} that can be (service calls cannot)"
                        )
                    }
                    CancelTarget::Job(job) => format!("the job driver-{} has no unfinished task", job.0),
                };
                eprintln!("{what}");
                return Ok(ExitCode::FAILURE);
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

async fn cache_command(
    cx: &Context,
    namespace: Option<&str>,
    command: &CacheCommand,
    json: bool,
) -> Result<ExitCode, String> {
    let failed = |e: chia_runtime::Error| e.to_string();
    let Some(cache) = chia_runtime::cache::get_active_cache(cx, namespace).await.map_err(failed)? else {
        return Err(format!("no cache runs in namespace {:?}", namespace.unwrap_or("default")));
    };
    match command {
        CacheCommand::Stats => {
            let stats = cache.stats().await.map_err(failed)?;
            let budget = cache.budget().await.map_err(failed)?;
            if json {
                let mut shown = serde_json::to_value(stats).map_err(|e| e.to_string())?;
                shown["budget"] = budget.into();
                return print_json(&shown).map(|()| ExitCode::SUCCESS);
            }
            let reads = stats.hits + stats.misses;
            let rate = if reads == 0 {
                "-".to_string()
            } else {
                format!("{:.1} %", 100.0 * stats.hits as f64 / reads as f64)
            };
            let rows = vec![
                vec!["entries".into(), stats.entries.to_string()],
                vec!["bytes".into(), format!("{} of {}", bytes(stats.bytes), bytes(budget))],
                vec!["hits".into(), stats.hits.to_string()],
                vec!["misses".into(), stats.misses.to_string()],
                vec!["hit rate".into(), rate],
                vec!["writes".into(), stats.writes.to_string()],
                vec!["evicted for room".into(), stats.evicted_for_room.to_string()],
                vec!["evicted on request".into(), stats.evicted_explicitly.to_string()],
                vec!["expired".into(), stats.expired.to_string()],
                vec!["dropped as damaged".into(), stats.dropped_damaged.to_string()],
            ];
            table(&["", "SINCE THE CACHE OPENED"], &rows);
        }
        CacheCommand::Evict { tags } => {
            let evicted = cache.evict_matching(tags).await.map_err(failed)?;
            if json {
                print_json(&evicted)?;
            } else {
                println!("evicted {} entr{}", evicted.len(), if evicted.len() == 1 { "y" } else { "ies" });
            }
        }
        CacheCommand::Verify { dry_run } => {
            let report = cache.verify(*dry_run).await.map_err(failed)?;
            if json {
                print_json(&report)?;
            } else {
                for bad in &report.bad {
                    println!("bad: {} ({}): {}", bad.tag, bad.path.display(), bad.reason);
                }
                println!(
                    "{} checked, {} ok, {} bad, {} removed, {} unreadable",
                    report.checked,
                    report.ok,
                    report.bad.len(),
                    report.removed,
                    report.unreadable
                );
            }
            if !report.bad.is_empty() {
                return Ok(ExitCode::FAILURE);
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

async fn kv_command(cx: &Context, command: &KvCommand, json: bool) -> Result<ExitCode, String> {
    let failed = |e: chia_runtime::Error| e.to_string();
    match command {
        KvCommand::Get { key } => match kv::get::<Shown>(cx, key).await.map_err(failed)? {
            Some(Shown(value)) => print_json(&value)?,
            None => {
                eprintln!("no value under {key:?}");
                return Ok(ExitCode::FAILURE);
            }
        },
        KvCommand::Set { key, value } => {
            kv::set(cx, key, value).await.map_err(failed)?;
            if json {
                print_json(&serde_json::json!({ "key": key, "value": value }))?
            } else {
                println!("{key} = {value}");
            }
        }
        KvCommand::List { prefix } => {
            let entries = kv::entries::<Shown>(cx, prefix.as_deref().unwrap_or("")).await.map_err(failed)?;
            if json {
                let map: serde_json::Map<String, serde_json::Value> =
                    entries.into_iter().map(|(key, Shown(value))| (key, value)).collect();
                print_json(&map)?
            } else {
                let rows: Vec<Vec<String>> =
                    entries.into_iter().map(|(key, Shown(value))| vec![key, value.to_string()]).collect();
                table(&["KEY", "VALUE"], &rows);
            }
        }
        KvCommand::Delete { key } => {
            let deleted = kv::delete(cx, key).await.map_err(failed)?;
            if json {
                print_json(&serde_json::json!({ "key": key, "deleted": deleted }))?
            } else if deleted {
                println!("deleted {key}");
            }
            if !deleted {
                eprintln!("no value under {key:?}");
                return Ok(ExitCode::FAILURE);
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Any stored value in its JSON form: what MessagePack has and JSON lacks is shown as JSON
/// can (binary as an array of byte values, a map key that is not text as its JSON text, a
/// float that is not finite as its name).
struct Shown(serde_json::Value);

impl<'de> serde::Deserialize<'de> for Shown {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Shown, D::Error> {
        deserializer.deserialize_any(ShownVisitor).map(Shown)
    }
}

struct ShownVisitor;

impl<'de> serde::de::Visitor<'de> for ShownVisitor {
    type Value = serde_json::Value;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("any value")
    }

    fn visit_bool<E>(self, v: bool) -> Result<Self::Value, E> {
        Ok(v.into())
    }

    fn visit_i64<E>(self, v: i64) -> Result<Self::Value, E> {
        Ok(v.into())
    }

    fn visit_u64<E>(self, v: u64) -> Result<Self::Value, E> {
        Ok(v.into())
    }

    fn visit_f64<E>(self, v: f64) -> Result<Self::Value, E> {
        Ok(serde_json::Number::from_f64(v).map_or_else(|| v.to_string().into(), serde_json::Value::Number))
    }

    fn visit_str<E>(self, v: &str) -> Result<Self::Value, E> {
        Ok(v.into())
    }

    fn visit_bytes<E>(self, v: &[u8]) -> Result<Self::Value, E> {
        Ok(v.iter().map(|&b| serde_json::Value::from(b)).collect())
    }

    fn visit_none<E>(self) -> Result<Self::Value, E> {
        Ok(serde_json::Value::Null)
    }

    fn visit_unit<E>(self) -> Result<Self::Value, E> {
        Ok(serde_json::Value::Null)
    }

    fn visit_some<D: serde::Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_any(ShownVisitor)
    }

    fn visit_newtype_struct<D: serde::Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_any(ShownVisitor)
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        let mut items = Vec::new();
        while let Some(Shown(item)) = seq.next_element()? {
            items.push(item);
        }
        Ok(items.into())
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut object = serde_json::Map::new();
        while let Some((Shown(key), Shown(value))) = map.next_entry()? {
            let key = match key {
                serde_json::Value::String(text) => text,
                other => other.to_string(),
            };
            object.insert(key, value);
        }
        Ok(object.into())
    }
}

/// `1.2s`, `3m04s`, `2h05m`: an age read at a glance.
fn age(ms: u64) -> String {
    let seconds = ms / 1000;
    match seconds {
        _ if ms < 1000 => format!("{ms}ms"),
        0..60 => format!("{}.{}s", seconds, (ms % 1000) / 100),
        60..3600 => format!("{}m{:02}s", seconds / 60, seconds % 60),
        _ => format!("{}h{:02}m", seconds / 3600, (seconds % 3600) / 60),
    }
}

fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = n as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 { format!("{n} B") } else { format!("{value:.1} {}", UNITS[unit]) }
}

/// Prints rows as columns padded to their widest cell.
fn table(header: &[&str], rows: &[Vec<String>]) {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let padded: Vec<String> =
            cells.iter().zip(&widths).map(|(cell, width)| format!("{cell:<width$}")).collect();
        println!("{}", padded.join("  ").trim_end());
    };
    line(header.to_vec());
    for row in rows {
        line(row.iter().map(String::as_str).collect());
    }
}

fn print_status(status: &ClusterStatus) {
    println!(
        "head up {}; {} node(s), {} job(s), {} service(s), {} of results held",
        age(status.head_up_ms),
        status.nodes.len(),
        status.jobs,
        status.services,
        bytes(status.result_bytes)
    );
    let counts = &status.tasks;
    let totals = &status.totals;
    println!(
        "tasks: {} waiting, {} queued, {} running, {} ended and held; since start: {} submitted, {} finished, {} failed, {} cancelled, {} retried, {} bypassed",
        counts.waiting,
        counts.queued,
        counts.running,
        counts.ended,
        totals.submitted,
        totals.finished,
        totals.failed,
        totals.cancelled,
        totals.retried,
        totals.bypassed
    );
    print_service_figures(&status.nodes);
    println!();
    print_nodes(&status.nodes);
    println!();
    if status.demand.is_empty() {
        println!("demand: nothing queued");
    } else {
        println!("demand:");
        let rows: Vec<Vec<String>> = status
            .demand
            .iter()
            .map(|d| {
                vec![
                    d.function.clone(),
                    d.request.to_string(),
                    d.queued.to_string(),
                    age(d.oldest_ms_ago),
                    d.infeasible.clone().unwrap_or_default(),
                ]
            })
            .collect();
        table(&["FUNCTION", "REQUEST", "QUEUED", "OLDEST", "INFEASIBLE"], &rows);
    }
    for stuck in &status.stuck {
        println!(
            "stuck: {} task(s) of {} ({}) waited {} although {} has room for them",
            stuck.queued,
            stuck.function,
            stuck.request,
            age(stuck.oldest_ms_ago),
            stuck.fits_on
        );
    }
}

/// What the services hosted on the nodes report (the cache's entries, bytes, hits ...), one
/// line per service, as of its node's latest heartbeat.
fn print_service_figures(nodes: &[NodeView]) {
    for node in nodes {
        let Some(figures) = &node.figures else { continue };
        let mut services: Vec<&str> = figures.services.iter().map(|f| f.service.as_str()).collect();
        services.dedup();
        for service in services {
            let parts: Vec<String> = figures
                .services
                .iter()
                .filter(|f| f.service == service)
                .map(|f| match f.name.as_str() {
                    name if name.ends_with("_bytes") => format!("{} {}", name, bytes(f.value)),
                    name => format!("{name} {}", f.value),
                })
                .collect();
            println!("service {service} on {}: {}", node.name, parts.join(", "));
        }
    }
}

fn print_nodes(nodes: &[NodeView]) {
    let rows: Vec<Vec<String>> = nodes
        .iter()
        .map(|n| {
            let mut offers = n.functions.clone();
            offers.extend(n.service_types.iter().map(|s| format!("service {s}")));
            vec![
                n.name.clone(),
                n.address.clone().unwrap_or_else(|| "-".into()),
                age(n.up_ms),
                age(n.last_heard_ms_ago),
                shown(&n.total),
                shown(&n.free),
                n.running.to_string(),
                if n.paused { "paused".into() } else { "up".into() },
                if n.labels.is_empty() { "-".into() } else { n.labels.to_string() },
                offers.join(" "),
            ]
        })
        .collect();
    table(
        &["NODE", "ADDRESS", "UP", "HEARD", "TOTAL", "FREE", "RUNNING", "STATE", "LABELS", "OFFERS"],
        &rows,
    );
}

fn print_tasks(tasks: &[TaskView]) {
    let rows: Vec<Vec<String>> = tasks
        .iter()
        .map(|t| {
            vec![
                t.task.to_string(),
                t.function.clone(),
                t.tag.clone().unwrap_or_default(),
                t.state.to_string(),
                t.job_name.clone().unwrap_or_else(|| format!("driver-{}", t.job.0)),
                t.node.clone().unwrap_or_default(),
                age(t.submitted_ms_ago),
            ]
        })
        .collect();
    table(&["TASK", "FUNCTION", "TAG", "STATE", "JOB", "NODE", "SUBMITTED"], &rows);
}

fn print_task(t: &TaskView) {
    println!("{} {} ({})", t.task, t.function, t.state);
    if let Some(tag) = &t.tag {
        println!("  tag: {tag}");
    }
    println!("  job: {}", t.job_name.clone().unwrap_or_else(|| format!("driver-{}", t.job.0)));
    println!("  submitted {} ago", age(t.submitted_ms_ago));
    println!("  arguments: {}", bytes(t.argument_bytes));
    if let Some(result) = t.result_bytes {
        println!("  result: {}", bytes(result));
    }
    if let Some(provider) = &t.bypassed {
        println!("  bypassed by {provider}");
    }
    if !t.waiting_for.is_empty() {
        let waiting: Vec<String> = t.waiting_for.iter().map(ToString::to_string).collect();
        println!("  waiting for: {}", waiting.join(", "));
    }
    if let Some(error) = &t.error {
        println!("  error: {error}");
    }
    for run in &t.attempts {
        println!(
            "  attempt {} on {}: sent {} ago, {}, {}",
            run.attempt,
            run.node,
            age(run.sent_ms_ago),
            run.started_ms_ago
                .map_or("not acknowledged".to_string(), |ms| format!("started {} ago", age(ms))),
            match (&run.outcome, run.ended_ms_ago) {
                (Some(outcome), Some(ms)) => format!("ended {} ago: {outcome}", age(ms)),
                _ => "running".to_string(),
            }
        );
    }
}

fn print_services(services: &[ServiceView]) {
    let rows: Vec<Vec<String>> = services
        .iter()
        .map(|s| {
            vec![
                s.name.clone(),
                s.namespace.clone(),
                s.type_name.clone(),
                s.node.clone().unwrap_or_else(|| "-".into()),
                s.state.clone(),
                if s.detached { "detached".into() } else { s.owner.clone().unwrap_or_default() },
            ]
        })
        .collect();
    table(&["SERVICE", "NAMESPACE", "TYPE", "NODE", "STATE", "OWNER"], &rows);
}

fn print_jobs(jobs: &[JobView]) {
    let rows: Vec<Vec<String>> = jobs
        .iter()
        .map(|j| vec![j.name.clone(), age(j.up_ms), j.unfinished.to_string(), j.submitted.to_string()])
        .collect();
    table(&["JOB", "UP", "UNFINISHED", "SUBMITTED"], &rows);
}

/// `adder: needs 2, has 1` + what `has` means (`in all`, `free now`).
fn shortfalls(short: &[Shortfall], has: &str) -> String {
    let parts: Vec<String> = short
        .iter()
        .map(|s| format!("{}: needs {}, has {} {has}", s.resource, s.requested, s.available))
        .collect();
    parts.join("; ")
}

/// Resources as a table shows them: without the `node:<name>` every node has.
fn shown(resources: &chia_core::Resources) -> String {
    let parts: Vec<String> = resources
        .iter()
        .filter(|(name, _)| !name.starts_with(chia_core::resources::NODE_PREFIX))
        .map(|(name, amount)| format!("{name}={amount}"))
        .collect();
    if parts.is_empty() { "-".into() } else { parts.join(",") }
}

fn print_explanation(explanation: &Explanation) {
    match explanation.state {
        Some(state) => println!("{} is {state}", explanation.task),
        None => println!("{}", explanation.task),
    }
    for reason in &explanation.reasons {
        let text = match reason {
            Reason::Unknown => "the head knows no such task (never submitted, or ended long ago)".to_string(),
            Reason::Running { node, attempt } => format!("it runs on {node} (attempt {attempt})"),
            Reason::Ended { state, error } => match error {
                Some(error) => format!("it ended {state}: {error}"),
                None => format!("it ended {state}"),
            },
            Reason::WaitingFor { tasks } => {
                let tasks: Vec<String> = tasks.iter().map(ToString::to_string).collect();
                format!("it waits for its inputs: {}", tasks.join(", "))
            }
            Reason::WaitingForService { service } => format!("it is a call of the service {service}"),
            Reason::NoNodeOffers { function } => format!("no connected node offers the function {function}"),
            Reason::SignatureDiffers { function, wanted, offered } => format!(
                "nodes offer {function} with signature {} but the call has {wanted}: rebuild the worker with the same code",
                offered.join(", ")
            ),
            Reason::NeverFits { node, short } => {
                format!("{node} can never hold it: {}", shortfalls(short, "in all"))
            }
            Reason::Busy { node, short } => format!("{node} is busy: {}", shortfalls(short, "free now")),
            Reason::Paused { node } => {
                format!("{node} takes no new tasks until its worker is back after the head's restart")
            }
            Reason::Behind { queued_ahead } => {
                format!("{queued_ahead} older task(s) of its kind are ahead of it")
            }
            Reason::FitsNow { node } => format!("{node} has room for it now: it should be placed at once"),
            Reason::LabelsDiffer { node, missing } => {
                format!("{node} lacks the label(s) {}", missing.join(", "))
            }
            Reason::WaitingForGroup { group, infeasible } => match infeasible {
                Some(reason) => format!("its placement group {group} cannot be placed: {reason}"),
                None => format!("it waits for its placement group {group} to be placed"),
            },
        };
        println!("  - {text}");
    }
}

#[cfg(test)]
mod tests {
    use super::Shown;
    use serde::Serialize;
    use std::collections::BTreeMap;

    fn shown(value: &impl Serialize) -> serde_json::Value {
        rmp_serde::from_slice::<Shown>(&rmp_serde::to_vec_named(value).unwrap()).unwrap().0
    }

    #[test]
    fn stored_values_show_as_json() {
        #[derive(Serialize)]
        struct Knobs {
            parallel: u32,
            stage: &'static str,
            rate: f64,
            skip: Option<Vec<i8>>,
        }
        let knobs = Knobs { parallel: 4, stage: "warmup", rate: 0.5, skip: Some(vec![-1, 2]) };
        assert_eq!(
            shown(&knobs),
            serde_json::json!({ "parallel": 4, "stage": "warmup", "rate": 0.5, "skip": [-1, 2] })
        );
        assert_eq!(shown(&serde_bytes::ByteBuf::from(vec![1u8, 255])), serde_json::json!([1, 255]));
        assert_eq!(shown(&BTreeMap::from([(3u8, "x")])), serde_json::json!({ "3": "x" }));
        assert_eq!(shown(&f64::NAN), serde_json::json!("NaN"));
        let json = serde_json::json!({ "a": [1, -2, 3.5, true, null, "s"] });
        assert_eq!(shown(&json), json, "what `chia kv set` stores shows as it was given");
    }
}
