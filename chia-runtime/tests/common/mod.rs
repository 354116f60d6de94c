//! Helpers shared by the end-to-end tests.

// Each test binary includes this module and uses a different subset of it.
#![allow(dead_code)]

use chia_runtime::{Context, LocalCluster, Resources};
use std::time::Duration;

/// Bounds a test that would otherwise hang; never used to wait for something to happen.
pub const BOUND: Duration = Duration::from_secs(60);

pub fn resources(text: &str) -> Resources {
    Resources::parse(text).expect("test resources parse")
}

/// An embedded cluster with one worker per entry of `workers` (their resources), and a driver.
pub async fn cluster(workers: &[&str]) -> (LocalCluster, Context) {
    chia_runtime::init_logging("warn");
    let cluster =
        LocalCluster::start(workers.iter().map(|w| resources(w)).collect()).await.expect("cluster starts");
    let cx = cluster.driver().await.expect("driver connects");
    (cluster, cx)
}

/// A `chia-head` process on a state directory, and every line it prints (stdout and logs).
/// Dropped, it is killed.
pub struct HeadProcess {
    pub child: std::process::Child,
    lines: std::sync::mpsc::Receiver<String>,
    /// Its ready line: the QUIC address, the cluster file, the metrics address if served.
    pub ready: String,
    /// What it printed before its ready line.
    pub startup: Vec<String>,
}

impl HeadProcess {
    /// Starts `chia-head --listen 127.0.0.1:0 --state-dir STATE_DIR EXTRA..` and waits for it
    /// to be ready.
    pub fn start(state_dir: &std::path::Path, extra: &[&str]) -> HeadProcess {
        use std::io::BufRead;
        use std::process::Stdio;
        let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_chia-head"))
            .args(["--listen", "127.0.0.1:0", "--state-dir"])
            .arg(state_dir)
            .args(extra)
            .env("RUST_LOG", "info")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("chia-head starts");
        let (send, lines) = std::sync::mpsc::channel();
        for stream in [
            Box::new(child.stdout.take().expect("piped")) as Box<dyn std::io::Read + Send>,
            Box::new(child.stderr.take().expect("piped")),
        ] {
            let send = send.clone();
            std::thread::spawn(move || {
                for line in std::io::BufReader::new(stream).lines().map_while(Result::ok) {
                    if send.send(line).is_err() {
                        return;
                    }
                }
            });
        }
        let mut head = HeadProcess { child, lines, ready: String::new(), startup: Vec::new() };
        (head.ready, head.startup) = head.wait_for_line("chia-head ready");
        head
    }

    /// The `key=` word of the ready line.
    pub fn ready_field(&self, key: &str) -> Option<String> {
        self.ready.split_whitespace().find_map(|w| w.strip_prefix(key)).map(str::to_string)
    }

    /// The QUIC address it listens on.
    pub fn address(&self) -> String {
        self.ready_field("address=").unwrap_or_else(|| panic!("no address in {:?}", self.ready))
    }

    /// Waits (bounded) for the next line containing `text`; returns it and the lines before.
    pub fn wait_for_line(&self, text: &str) -> (String, Vec<String>) {
        let deadline = std::time::Instant::now() + BOUND;
        let mut seen = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) if line.contains(text) => return (line, seen),
                Ok(line) => seen.push(line),
                Err(e) => panic!("no line with {text:?} from chia-head ({e}); it printed {seen:#?}"),
            }
        }
    }

    /// Every line up to the first containing `text`, which may have come before the ready
    /// line (stdout and the log are read apart, so their order is not kept between them).
    pub fn lines_through(&self, text: &str) -> Vec<String> {
        if let Some(at) = self.startup.iter().position(|line| line.contains(text)) {
            return self.startup[..=at].to_vec();
        }
        let (line, mut before) = self.wait_for_line(text);
        before.push(line);
        [self.startup.clone(), before].concat()
    }
}

impl Drop for HeadProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs the `chia` command against the cluster whose files are in `state_dir`: whether it
/// succeeded, its stdout and its stderr.
pub fn chia_cli(state_dir: &std::path::Path, args: &[&str]) -> (bool, String, String) {
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_chia"))
        .arg("--cluster-file")
        .arg(state_dir.join("cluster.yaml"))
        .args(args)
        .output()
        .expect("chia runs");
    let text = |bytes: Vec<u8>| String::from_utf8(bytes).expect("chia prints UTF-8");
    (output.status.success(), text(output.stdout), text(output.stderr))
}

/// A driver of the cluster whose files are in `state_dir` (a `chia-head` process).
pub async fn driver_of_process(state_dir: &std::path::Path) -> Context {
    let file = state_dir.join("cluster.yaml");
    let credentials =
        chia_runtime::internals::tls::ClusterCredentials::load(&file).expect("the cluster file");
    let (client, _) = chia_runtime::internals::Client::connect(&credentials, "driver", None)
        .await
        .expect("the driver joins");
    Context::from_client(client)
}
