//! `RUST_LOG=chia=debug` follows one task across processes: a real `chia-head` and a real
//! worker log its id, function, node and attempt as fields, so one grep finds its whole path.

use std::io::{BufRead, Read};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

const BOUND: Duration = Duration::from_secs(120);

/// The `chia-head` binary that `cargo test --workspace` builds beside this test's binary.
fn head_binary() -> Option<PathBuf> {
    let test = std::env::current_exe().ok()?;
    let binary = test.parent()?.parent()?.join("chia-head");
    binary.exists().then_some(binary)
}

/// Kills the process when dropped and gives back what it wrote to stderr.
struct Logged {
    child: Child,
}

impl Logged {
    fn stderr(mut self) -> String {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let mut text = String::new();
        if let Some(mut stderr) = self.child.stderr.take() {
            let _ = stderr.read_to_string(&mut text);
        }
        text
    }
}

impl Drop for Logged {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Reads `child`'s stdout until a line holding `ready`, then keeps draining it.
fn wait_ready(child: &mut Child, ready: &str) -> String {
    let stdout = child.stdout.take().expect("piped");
    let (send, lines) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = send.send(line);
        }
    });
    loop {
        match lines.recv_timeout(BOUND) {
            Ok(line) if line.contains(ready) => return line,
            Ok(_) => {}
            Err(e) => panic!("no {ready:?} line: {e}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_task_is_followed_by_its_fields_from_the_head_to_the_worker() {
    examples::link();
    let Some(head_binary) = head_binary() else {
        println!(
            "SKIPPED: target/debug/chia-head is not built (cargo build -p chia-runtime --bin chia-head)"
        );
        return;
    };
    let state = tempfile::tempdir().expect("a state directory");
    let mut head = Command::new(head_binary)
        .args(["--listen", "127.0.0.1:0", "--state-dir"])
        .arg(state.path())
        .env("RUST_LOG", "chia=debug")
        .env("NO_COLOR", "1")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("chia-head starts");
    let ready = wait_ready(&mut head, "chia-head ready");
    let head = Logged { child: head };
    let cluster_file = ready.split("cluster_file=").nth(1).expect("a cluster file").trim().to_string();
    let mut worker = Command::new(env!("CARGO_BIN_EXE_worker"))
        .args(["--cluster-file", &cluster_file, "--name", "logged", "--resources", "CPU=1"])
        .env("RUST_LOG", "chia=debug")
        .env_remove("CHIA_ADDRESS")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the worker starts");
    wait_ready(&mut worker, "chia-worker ready");
    let worker = Logged { child: worker };

    let credentials = chia::internals::tls::ClusterCredentials::load(std::path::Path::new(&cluster_file))
        .expect("credentials");
    let (client, _) = chia::internals::Client::connect(&credentials, "driver", None).await.expect("joins");
    let cx = chia::Context::from_client(client);
    let result = examples::simulate::call(6, 1).tag("followed").remote(&cx);
    let task = result.id().to_string();
    assert_eq!(result.get().await.expect("runs"), 36);
    cx.shutdown().await;

    let head_log = head.stderr();
    let worker_log = worker.stderr();
    let field = format!("task={task}");
    let lines = |log: &str, what: &str| -> Vec<String> {
        log.lines().filter(|l| l.contains(&field) && l.contains(what)).map(str::to_string).collect()
    };
    let submitted = lines(&head_log, "task submitted");
    assert!(
        submitted.iter().any(|l| l.contains("function=simulate") && l.contains("tag=\"followed\"")),
        "the head logs the submission with its fields:\n{head_log}"
    );
    let dispatched = lines(&head_log, "task dispatched");
    assert!(
        dispatched.iter().any(|l| l.contains("node=\"logged\"") || l.contains("node=logged"))
            && dispatched[0].contains("attempt=1"),
        "the head logs where it sent it:\n{head_log}"
    );
    assert!(!lines(&head_log, "task reported").is_empty(), "{head_log}");
    // The worker's span carries the same id, so its events are found by the same field.
    let ran = lines(&worker_log, "run");
    assert!(
        ran.iter().any(|l| l.contains("run starts"))
            && ran.iter().any(|l| l.contains("run ends with a value")),
        "the worker logs the run in the task's span:\n{worker_log}"
    );
    assert!(ran.iter().all(|l| l.contains("function=simulate") && l.contains("attempt=1")), "{ran:#?}");
}
