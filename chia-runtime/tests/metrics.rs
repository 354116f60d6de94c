//! The metrics endpoint of a real `chia-head` process (`--metrics`), scraped with plain HTTP
//! while a driver and a worker (in this process, over QUIC) run tasks and use the cache.

extern crate chia_runtime as chia;

use chia::internals::tls::ClusterCredentials;
use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::process::{Command, Stdio};
use std::time::Duration;

mod common;

use common::{BOUND, HeadProcess};

#[chia::function]
fn square(x: i64) -> i64 {
    x * x
}

/// Needs a resource no node has, so it stays queued.
#[chia::function(resources(unobtainium = 1))]
fn never_placed() -> u32 {
    7
}

/// A `chia-head` process on a fresh state directory, heartbeats every 100 ms, so workers'
/// figures (every fifth heartbeat) arrive twice a second.
struct Head {
    process: HeadProcess,
    state: tempfile::TempDir,
}

impl std::ops::Deref for Head {
    type Target = HeadProcess;

    fn deref(&self) -> &HeadProcess {
        &self.process
    }
}

impl Head {
    fn start(extra: &[&str]) -> Head {
        let state = tempfile::tempdir().unwrap();
        let args: Vec<&str> = ["--heartbeat-timeout", "1"].into_iter().chain(extra.iter().copied()).collect();
        Head { process: HeadProcess::start(state.path(), &args), state }
    }

    fn metrics_address(&self) -> String {
        self.ready_field("metrics=").unwrap_or_else(|| panic!("no metrics address in {:?}", self.ready))
    }

    fn credentials(&self) -> ClusterCredentials {
        ClusterCredentials::load(&self.state.path().join("cluster.yaml"))
            .expect("the head wrote its cluster file")
    }

    async fn driver(&self) -> chia::Context {
        let (client, _) = chia::internals::Client::connect(&self.credentials(), "driver", None)
            .await
            .expect("driver connects");
        chia::Context::from_client(client)
    }
}

/// An HTTP answer: its status line, headers (names lower-cased) and body.
struct Answer {
    status: String,
    headers: BTreeMap<String, String>,
    body: String,
}

/// `GET path` with a plain HTTP/1.1 request on a new connection.
fn http_get(address: &str, path: &str) -> Answer {
    let mut stream = std::net::TcpStream::connect(address).expect("the metrics endpoint accepts");
    stream.set_read_timeout(Some(BOUND)).unwrap();
    write!(stream, "GET {path} HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\n\r\n").unwrap();
    let mut text = String::new();
    stream.read_to_string(&mut text).expect("an answer");
    let (head, body) = text.split_once("\r\n\r\n").expect("headers, then a body");
    let mut lines = head.lines();
    let status = lines.next().unwrap_or_default().to_string();
    let headers = lines
        .filter_map(|line| line.split_once(':'))
        .map(|(name, value)| (name.trim().to_ascii_lowercase(), value.trim().to_string()))
        .collect();
    Answer { status, headers, body: body.to_string() }
}

/// The samples of an exposition: `(name, labels) → value`.
type Samples = BTreeMap<(String, BTreeMap<String, String>), f64>;

/// Parses the text format's sample lines: `name{label="value",...} number`, values quoted
/// with `\\`, `\"` and `\n` escaped.
fn samples(body: &str) -> Samples {
    let mut samples = Samples::new();
    for line in body.lines().filter(|l| !l.starts_with('#') && !l.trim().is_empty()) {
        let (series, value) = line.rsplit_once(' ').unwrap_or_else(|| panic!("a sample line: {line:?}"));
        let value: f64 = value.parse().unwrap_or_else(|_| panic!("a number in {line:?}"));
        let (name, labels) = match series.split_once('{') {
            Some((name, labels)) => {
                (name, parse_labels(labels.strip_suffix('}').expect("labels end with }")))
            }
            None => (series, BTreeMap::new()),
        };
        assert!(samples.insert((name.to_string(), labels), value).is_none(), "a series twice: {line}");
    }
    samples
}

fn parse_labels(mut text: &str) -> BTreeMap<String, String> {
    let mut labels = BTreeMap::new();
    while !text.is_empty() {
        let (key, rest) = text.split_once("=\"").unwrap_or_else(|| panic!("label=\"value\" in {text:?}"));
        let mut value = String::new();
        let mut chars = rest.char_indices();
        let end = loop {
            match chars.next() {
                Some((_, '\\')) => match chars.next() {
                    Some((_, 'n')) => value.push('\n'),
                    Some((_, escaped)) => value.push(escaped),
                    None => panic!("an escape at the end of {rest:?}"),
                },
                Some((at, '"')) => break at,
                Some((_, c)) => value.push(c),
                None => panic!("an unterminated label value in {rest:?}"),
            }
        };
        labels.insert(key.to_string(), value);
        text = rest[end + 1..].strip_prefix(',').unwrap_or(&rest[end + 1..]);
    }
    labels
}

/// The value of `name` whose labels are exactly `labels`.
fn value(samples: &Samples, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let labels: BTreeMap<String, String> =
        labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    samples.get(&(name.to_string(), labels)).copied()
}

/// Scrapes until `ready` holds for the samples (figures arrive with heartbeats), bounded.
fn scrape_until(address: &str, what: &str, ready: impl Fn(&Samples) -> bool) -> (Samples, String) {
    let deadline = std::time::Instant::now() + BOUND;
    loop {
        let body = http_get(address, "/metrics").body;
        let parsed = samples(&body);
        if ready(&parsed) {
            return (parsed, body);
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{what} never showed in {BOUND:?}; last scrape:\n{body}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `promtool check metrics` on `body`: `Err` with its complaints. Without promtool the check
/// is skipped, saying so — except under CI, where `.ci/run` installs it and its absence fails.
fn promtool_check(body: &str) -> Result<(), String> {
    let spawned = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn();
    let mut child = match spawned {
        Ok(child) => child,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            assert!(
                std::env::var_os("CI").is_none(),
                "promtool is not installed, and CI must check the exposition (.ci/run installs package prometheus)"
            );
            eprintln!(
                "SKIPPED promtool check metrics: promtool is not installed (apt-get install prometheus)"
            );
            return Ok(());
        }
        Err(e) => panic!("promtool cannot run: {e}"),
    };
    child.stdin.take().unwrap().write_all(body.as_bytes()).unwrap();
    let output = child.wait_with_output().unwrap();
    let said =
        format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
    if output.status.success() && said.trim().is_empty() { Ok(()) } else { Err(said) }
}

/// The TCP ports `pid` listens on: its socket descriptors matched against the kernel's table
/// of listening sockets (IPv4 and IPv6).
fn listening_ports(pid: u32) -> Vec<u16> {
    let inodes: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("the process's descriptors")
        .filter_map(|fd| std::fs::read_link(fd.ok()?.path()).ok())
        .filter_map(|link| {
            let link = link.to_string_lossy().into_owned();
            Some(link.strip_prefix("socket:[")?.strip_suffix(']')?.to_string())
        })
        .collect();
    let mut ports = Vec::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(text) = std::fs::read_to_string(table) else { continue };
        for row in text.lines().skip(1) {
            let fields: Vec<&str> = row.split_whitespace().collect();
            // local_address is fields[1] (ADDR:PORT in hex), st is fields[3] (0A: LISTEN),
            // inode is fields[9].
            if fields.len() > 9 && fields[3] == "0A" && inodes.iter().any(|inode| inode == fields[9]) {
                let port = fields[1].rsplit(':').next().and_then(|hex| u16::from_str_radix(hex, 16).ok());
                ports.extend(port);
            }
        }
    }
    ports.sort_unstable();
    ports
}

fn port_of(address: &str) -> u16 {
    address.rsplit(':').next().and_then(|port| port.parse().ok()).expect("HOST:PORT")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_metrics_follow_tasks_workers_and_the_cache_and_pass_promtool() {
    chia::init_logging("warn");
    let head = Head::start(&["--metrics", "127.0.0.1:0"]);
    let address = head.metrics_address();
    assert_eq!(
        listening_ports(head.child.id()),
        [port_of(&address)],
        "the metrics port is all it listens on"
    );

    let answer = http_get(&address, "/metrics");
    assert!(answer.status.contains(" 200 "), "{}", answer.status);
    assert_eq!(
        answer.headers.get("content-type").map(String::as_str),
        Some("text/plain; version=0.0.4; charset=utf-8")
    );
    let before = samples(&answer.body);
    let finished =
        |s: &Samples| value(s, "chia_tasks_ended_total", &[("function", "square"), ("outcome", "finished")]);
    assert_eq!(finished(&before), None, "no square has run yet");
    assert!(http_get(&address, "/other").status.contains(" 404 "));

    let worker = chia::internals::Worker::connect(
        &head.credentials(),
        "metrics-worker",
        chia::Resources::parse("CPU=2").unwrap(),
    )
    .await
    .expect("the worker joins");
    let cx = head.driver().await;
    const TASKS: i64 = 7;
    let calls: Vec<_> = (0..TASKS).map(|x| square::remote(&cx, x)).collect();
    for (x, call) in calls.iter().enumerate() {
        assert_eq!(call.get_timeout(BOUND).await.unwrap(), (x * x) as i64);
    }
    // The head counted each outcome before it told the driver.
    let after = samples(&http_get(&address, "/metrics").body);
    assert_eq!(finished(&after), Some(TASKS as f64));
    assert_eq!(value(&after, "chia_tasks_submitted_total", &[("function", "square")]), Some(TASKS as f64));
    assert_eq!(
        value(&after, "chia_task_queued_seconds_count", &[("function", "square")]),
        Some(TASKS as f64)
    );
    assert_eq!(
        value(&after, "chia_task_running_seconds_count", &[("function", "square")]),
        Some(TASKS as f64)
    );
    let worker_cpus = [("node", "metrics-worker"), ("resource", "CPU")];
    assert_eq!(value(&after, "chia_resource_capacity", &worker_cpus), Some(2.0));
    assert_eq!(value(&after, "chia_nodes", &[("state", "up")]), Some(2.0), "the head's node and the worker");
    assert_eq!(value(&after, "chia_jobs", &[]), Some(1.0));
    let shape = [("function", "never_placed"), ("request", "CPU=1,unobtainium=1")];
    assert_eq!(value(&after, "chia_queue_depth", &shape), None);
    let queued = never_placed::remote(&cx);
    // Submitted on the driver's connection: the head has it once a round trip on it is done.
    cx.ping().await.unwrap();
    let waiting = samples(&http_get(&address, "/metrics").body);
    assert_eq!(value(&waiting, "chia_queue_depth", &shape), Some(1.0));
    assert_eq!(value(&waiting, "chia_tasks", &[("state", "queued")]), Some(1.0));
    queued.cancel().unwrap();

    // The worker's figures come with its heartbeats.
    let node = [("node", "metrics-worker")];
    let (figures, _) = scrape_until(&address, "the worker's attempts", |s| {
        value(s, "chia_worker_attempts_total", &node) == Some(TASKS as f64)
    });
    assert!(value(&figures, "chia_worker_memory_bytes", &node).is_some_and(|bytes| bytes > 1e6));
    assert_eq!(value(&figures, "chia_worker_running", &node), Some(0.0));

    // The cache runs on the head's node, whose heartbeats carry its figures.
    let dir = tempfile::tempdir().unwrap();
    let cache = chia::cache::start_cache(
        &cx,
        chia::cache::CacheOptions::in_dir(dir.path().join("cache")).size(1.0, "MB"),
    )
    .await
    .unwrap();
    assert!(cache.write("present", &42u32).await.unwrap());
    assert_eq!(cache.read::<u32>("present").await.unwrap(), Some(42));
    assert_eq!(cache.read::<u32>("present").await.unwrap(), Some(42));
    assert_eq!(cache.read::<u32>("absent").await.unwrap(), None);
    let at_head = [("node", "head"), ("service", "ChiaCacheStore")];
    let (cached, body) = scrape_until(&address, "the cache's reads", |s| {
        value(s, "chia_cache_hits_total", &at_head) == Some(2.0)
            && value(s, "chia_cache_misses_total", &at_head) == Some(1.0)
    });
    assert_eq!(value(&cached, "chia_cache_writes_total", &at_head), Some(1.0));
    assert_eq!(value(&cached, "chia_cache_entries", &at_head), Some(1.0));
    assert!(value(&cached, "chia_cache_bytes", &at_head).is_some_and(|bytes| bytes > 0.0));
    assert_eq!(value(&cached, "chia_services", &[]), Some(1.0));
    // The counters only grow: the tasks counted before are still there, no more.
    assert_eq!(finished(&cached), Some(TASKS as f64));

    promtool_check(&body)
        .unwrap_or_else(|complaints| panic!("promtool check metrics:\n{complaints}\n{body}"));

    // A stopped instance's figures go with it.
    assert!(chia::cache::stop_cache(&cx, None).await.unwrap());
    scrape_until(&address, "the stopped cache's figures going away", |s| {
        value(s, "chia_services", &[]) == Some(0.0) && value(s, "chia_cache_hits_total", &at_head).is_none()
    });
    worker.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_the_option_the_head_listens_for_no_metrics() {
    let head = Head::start(&[]);
    assert_eq!(head.ready_field("metrics="), None, "{}", head.ready);
    assert_eq!(
        listening_ports(head.child.id()),
        Vec::<u16>::new(),
        "chia-head listens on TCP without --metrics"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_off_loopback_are_served_with_a_warning() {
    let head = Head::start(&["--metrics", "0.0.0.0:0"]);
    let address = head.metrics_address();
    // The warning comes just before the line saying where metrics are served.
    let logged = head.lines_through("serving metrics on");
    let warning = logged.iter().find(|line| line.contains("not a loopback address"));
    assert!(warning.is_some_and(|line| line.contains("unauthenticated")), "{logged:#?}");
    let loopback = Head::start(&["--metrics", "127.0.0.1:0"]);
    let logged = loopback.lines_through("serving metrics on");
    assert!(!logged.iter().any(|line| line.contains("not a loopback address")), "{logged:#?}");
    let answer = http_get(&format!("127.0.0.1:{}", port_of(&address)), "/metrics");
    assert!(answer.status.contains(" 200 "), "{}", answer.status);
}
