//! What the head does with peers that are not who they should be or do not speak the
//! protocol: each is refused or disconnected with a clear reason, and the head keeps serving.

extern crate chia_runtime as chia;

mod common;

use chia::LocalCluster;
use chia::internals::core::protocol::{HeadToPeer, PROTOCOL_VERSION, PeerToHead, decode_body};
use chia::internals::tls::{ClusterCredentials, HEAD_SERVER_NAME, HeadCredentials};
use chia::internals::transport::{FrameReader, FrameSender};
use rustls::pki_types::pem::PemObject;

/// Bounds a test that would otherwise hang; never used to wait for something to happen.
use common::BOUND;

#[chia::function]
fn echo(x: i64) -> i64 {
    x
}

async fn cluster() -> LocalCluster {
    LocalCluster::start(vec![chia::Resources::parse("CPU=1").unwrap()]).await.expect("cluster starts")
}

/// The cluster still runs tasks for a legitimate driver.
async fn still_serves(cluster: &LocalCluster) {
    let cx = cluster.driver().await.expect("a member still connects");
    assert_eq!(echo::remote(&cx, 7).get().await.unwrap(), 7);
}

/// A QUIC connection with `credentials`, its control stream and a reader on it.
async fn raw_connect(
    credentials: &ClusterCredentials,
) -> (quinn::Connection, quinn::SendStream, FrameReader) {
    let mut endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    endpoint.set_default_client_config(credentials.client_config().unwrap());
    let connection = endpoint
        .connect(credentials.address.parse().unwrap(), HEAD_SERVER_NAME)
        .unwrap()
        .await
        .expect("members complete the handshake");
    let (send, recv) = connection.open_bi().await.unwrap();
    (connection, send, FrameReader::new(recv))
}

async fn next_message(reader: &mut FrameReader) -> Option<HeadToPeer> {
    let frame = tokio::time::timeout(BOUND, reader.next_frame()).await.expect("the head answers");
    match frame {
        Ok(Some(body)) => Some(decode_body(body).expect("the head sends valid frames")),
        Ok(None) | Err(_) => None,
    }
}

fn hello(version: u32) -> PeerToHead {
    PeerToHead::Hello { protocol_version: version, name: "raw".into(), worker: None }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_of_another_cluster_is_rejected_in_the_handshake() {
    let cluster = cluster().await;
    let stranger = HeadCredentials::generate().unwrap().cluster(&cluster.credentials().address);
    let error = match chia::internals::Client::connect(&stranger, "stranger", None).await {
        Ok(_) => panic!("a stranger must not join"),
        Err(error) => error,
    };
    assert!(
        matches!(&error, chia::Error::Join { cause: chia::JoinError::Certificate { .. }, .. })
            && error.to_string().contains("is not the cluster of"),
        "{error}"
    );

    // Trusting the right CA is not enough: the client certificate must be the cluster's too.
    let mut impostor = cluster.credentials().clone();
    impostor.member_cert = stranger.member_cert.clone();
    impostor.member_key = stranger.member_key.clone();
    let error = match chia::internals::Client::connect(&impostor, "impostor", None).await {
        Ok(_) => panic!("a client certificate from another CA must be refused"),
        Err(error) => error.to_string(),
    };
    assert!(
        error.contains("refused the member certificate") && error.contains("not signed by the head's CA"),
        "{error}"
    );
    still_serves(&cluster).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_protocol_version_is_refused_with_both_versions() {
    let cluster = cluster().await;
    let (_connection, send, mut reader) = raw_connect(cluster.credentials()).await;
    FrameSender::spawn(send).send(&hello(PROTOCOL_VERSION + 98)).unwrap();
    match next_message(&mut reader).await {
        Some(HeadToPeer::Rejected { reason }) => {
            assert!(reason.contains(&format!("protocol version {}", PROTOCOL_VERSION + 98)), "{reason}");
            assert!(reason.contains(&format!("speaks version {PROTOCOL_VERSION}")), "{reason}");
        }
        other => panic!("expected a rejection, got {other:?}"),
    }
    assert!(next_message(&mut reader).await.is_none(), "the head ends the stream after rejecting");
    still_serves(&cluster).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_first_message_that_is_not_a_hello_is_refused() {
    let cluster = cluster().await;
    let (_connection, send, mut reader) = raw_connect(cluster.credentials()).await;
    FrameSender::spawn(send).send(&PeerToHead::Fetch { task: chia::TaskId(1) }).unwrap();
    match next_message(&mut reader).await {
        Some(HeadToPeer::Rejected { reason }) => assert!(reason.contains("must be a hello"), "{reason}"),
        other => panic!("expected a rejection, got {other:?}"),
    }
    still_serves(&cluster).await;
}

/// Says hello, then writes `bytes` raw; returns what the head does next.
async fn after_hello_send_raw(cluster: &LocalCluster, bytes: &[u8]) -> Option<HeadToPeer> {
    let (_connection, mut send, mut reader) = raw_connect(cluster.credentials()).await;
    let mut frame = Vec::new();
    chia::internals::core::protocol::encode_frame(&hello(PROTOCOL_VERSION), &mut frame).unwrap();
    send.write_all(&frame).await.unwrap();
    assert!(matches!(next_message(&mut reader).await, Some(HeadToPeer::Welcome { .. })));
    send.write_all(bytes).await.unwrap();
    next_message(&mut reader).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_frame_disconnects_the_peer_before_it_is_read() {
    let cluster = cluster().await;
    // A length prefix just past the cap; no body follows, so the head must refuse on the prefix.
    let prefix = ((chia::internals::core::protocol::MAX_FRAME_BYTES + 1) as u32).to_be_bytes();
    assert_eq!(after_hello_send_raw(&cluster, &prefix).await, None, "the head closes the connection");
    still_serves(&cluster).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_frame_disconnects_the_peer() {
    let cluster = cluster().await;
    let mut garbage = 5u32.to_be_bytes().to_vec();
    garbage.extend_from_slice(&[0xc1, 0xc1, 0xc1, 0xc1, 0xc1]);
    assert_eq!(after_hello_send_raw(&cluster, &garbage).await, None);
    still_serves(&cluster).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reports_about_tasks_a_peer_does_not_run_are_ignored() {
    let cluster = cluster().await;
    let cx = cluster.driver().await.unwrap();
    let pending = echo::remote(&cx, 5);
    // Another peer claims to have finished that task, and submits under a foreign session.
    let (_connection, send, mut reader) = raw_connect(cluster.credentials()).await;
    let sender = FrameSender::spawn(send);
    sender.send(&hello(PROTOCOL_VERSION)).unwrap();
    assert!(matches!(next_message(&mut reader).await, Some(HeadToPeer::Welcome { .. })));
    let forged = chia::internals::core::protocol::Outcome::Value(rmp_serde::to_vec_named(&666i64).unwrap());
    sender.send(&PeerToHead::Finished { task: pending.id(), attempt: 1, outcome: forged }).unwrap();
    assert_eq!(pending.get().await.unwrap(), 5, "only the node running a task can finish it");
    still_serves(&cluster).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn arguments_of_the_wrong_type_fail_the_task_not_the_worker() {
    use chia::internals::core::protocol::{Arg, Done, TaskSpec};
    let cluster = cluster().await;
    let (_connection, send, mut reader) = raw_connect(cluster.credentials()).await;
    let sender = FrameSender::spawn(send);
    sender.send(&hello(PROTOCOL_VERSION)).unwrap();
    let Some(HeadToPeer::Welcome { session, .. }) = next_message(&mut reader).await else {
        panic!("expected a welcome")
    };
    // `echo` takes an i64; send it a string.
    let task = chia::TaskId::new(session, 1);
    sender
        .send(&PeerToHead::Submit(TaskSpec {
            task,
            function: echo::SPEC.key(),
            args: vec![Arg::Value(rmp_serde::to_vec_named("not a number").unwrap())],
            request: chia::Resources::parse("CPU=1").unwrap(),
            tag: None,
            max_retries: chia::Retries::Never,
            retry_exceptions: false,
            bypass: None,
            job: None,
            timeout_ms: None,
            placement: None,
        }))
        .unwrap();
    match next_message(&mut reader).await {
        Some(HeadToPeer::Done {
            task: done,
            done: Done::Failed(chia::TaskError::BadArgument { function, index, .. }),
        }) => {
            assert_eq!((done, function.as_str(), index), (task, "echo", 0));
        }
        other => panic!("expected a bad-argument failure, got {other:?}"),
    }
    still_serves(&cluster).await;
}

// ---- Credentials: member certificates of their own, revocation, files and modes ----------

use common::HeadProcess;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Runs `chia-head ARGS`; its status and what it printed.
fn chia_head(args: &[&str]) -> (bool, String) {
    let output = Command::new(env!("CARGO_BIN_EXE_chia-head")).args(args).output().expect("chia-head runs");
    let text =
        format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
    (output.status.success(), text)
}

fn path_arg(path: &Path) -> &str {
    path.to_str().expect("temporary paths are UTF-8")
}

/// `chia-head issue-member` for `name`, into `dir/NAME.yaml`.
fn issue(state_dir: &Path, dir: &Path, name: &str, days: u32) -> PathBuf {
    let file = dir.join(format!("{name}.yaml"));
    let days = days.to_string();
    let (ok, text) = chia_head(&[
        "issue-member",
        "--name",
        name,
        "--valid-days",
        &days,
        "--state-dir",
        path_arg(state_dir),
        "-o",
        path_arg(&file),
    ]);
    assert!(ok, "issue-member {name} fails: {text}");
    file
}

fn mode(path: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).unwrap().permissions().mode() & 0o7777
}

/// A worker in this process (it offers `echo`) joined with the state directory's shared file.
async fn echo_worker(state_dir: &Path) -> chia::internals::Worker {
    let shared = ClusterCredentials::load(&state_dir.join("cluster.yaml")).unwrap();
    chia::internals::Worker::connect(&shared, "echo-worker", chia::Resources::parse("CPU=1").unwrap())
        .await
        .expect("a worker with the shared certificate joins")
}

async fn connect_driver(file: &Path) -> Result<chia::Context, chia::Error> {
    let credentials = ClusterCredentials::load(file).unwrap();
    let (client, _) = chia::internals::Client::connect(&credentials, "driver", None).await?;
    Ok(chia::Context::from_client(client))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_issued_member_file_joins_with_its_own_name_and_expiry() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let head = HeadProcess::start(&state, &[]);
    let before = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64;
    let file = issue(&state, dir.path(), "driver-7", 30);
    assert_eq!(mode(&file), 0o600, "a cluster file holds a private key");

    let credentials = ClusterCredentials::load(&file).unwrap();
    assert_eq!(credentials.address, head.address(), "the file dials the running head");
    let der = rustls::pki_types::CertificateDer::from_pem_slice(credentials.member_cert.as_bytes()).unwrap();
    let (_, cert) = x509_parser::parse_x509_certificate(&der).unwrap();
    let cn: Vec<&str> = cert.subject().iter_common_name().map(|cn| cn.as_str().unwrap()).collect();
    assert_eq!(cn, ["driver-7"]);
    let san = cert.subject_alternative_name().unwrap().expect("a SAN").value;
    assert_eq!(san.general_names, [x509_parser::extensions::GeneralName::DNSName("driver-7")]);
    let eku = cert.extended_key_usage().unwrap().expect("an extended key usage").value;
    assert!(eku.client_auth && !eku.server_auth, "a member certificate is for clients only");
    let after = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64;
    let not_after = cert.validity().not_after.timestamp();
    let thirty_days = 30 * 24 * 3600;
    assert!(
        (before + thirty_days - 1..=after + thirty_days).contains(&not_after),
        "valid for 30 days: not after {not_after}, issued between {before} and {after}"
    );

    let _worker = echo_worker(&state).await;
    let cx = connect_driver(&file).await.expect("the issued file joins");
    assert_eq!(echo::remote(&cx, 41).get_timeout(BOUND).await.unwrap(), 41);
    let members = chia::internals::members::issued_members(&state).unwrap();
    assert_eq!(members.iter().map(|m| m.name.as_str()).collect::<Vec<_>>(), ["driver-7"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_revoked_while_the_head_runs_is_refused_and_others_are_served() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let head = HeadProcess::start(&state, &[]);
    let _worker = echo_worker(&state).await;
    let file = issue(&state, dir.path(), "laptop-3", 5);
    let before = connect_driver(&file).await.expect("joins before it is revoked");
    assert_eq!(echo::remote(&before, 1).get_timeout(BOUND).await.unwrap(), 1);

    let (ok, text) = chia_head(&["revoke", "laptop-3", "--state-dir", path_arg(&state)]);
    assert!(ok, "revoke fails: {text}");
    assert!(text.contains("revoked laptop-3"), "{text}");
    let error = match connect_driver(&file).await {
        Ok(_) => panic!("a revoked member must not join"),
        Err(error) => error.to_string(),
    };
    assert!(error.contains("revoked"), "{error}");
    assert!(error.contains(&file.display().to_string()), "the error names the file: {error}");
    let (logged, _) = head.wait_for_line("refused member");
    assert!(logged.contains("\"laptop-3\"") && logged.contains("revoked"), "{logged}");

    // The head still serves: the shared certificate, and a certificate issued to the same
    // name after the revocation (revocation is by serial: a replaced key is welcome).
    let shared =
        connect_driver(&state.join("cluster.yaml")).await.expect("the shared certificate still joins");
    assert_eq!(echo::remote(&shared, 2).get_timeout(BOUND).await.unwrap(), 2);
    let reissued = dir.path().join("reissued");
    std::fs::create_dir(&reissued).unwrap();
    let file = issue(&state, &reissued, "laptop-3", 5);
    let again = connect_driver(&file).await.expect("a certificate issued after the revocation joins");
    assert_eq!(echo::remote(&again, 3).get_timeout(BOUND).await.unwrap(), 3);

    // A name never issued is an error with a suggestion, not a silent no-op.
    let (ok, text) = chia_head(&["revoke", "laptop-4", "--state-dir", path_arg(&state)]);
    assert!(
        !ok && text.contains("no member certificate named \"laptop-4\"") && text.contains("laptop-3"),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoking_the_shared_certificate_replaces_it() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let head = HeadProcess::start(&state, &[]);
    let old = dir.path().join("old-cluster.yaml");
    std::fs::copy(state.join("cluster.yaml"), &old).unwrap();
    let (ok, text) = chia_head(&["revoke", "chia-member", "--state-dir", path_arg(&state)]);
    assert!(ok, "{text}");
    let error = connect_driver(&old).await.err().expect("the old shared certificate is refused").to_string();
    assert!(error.contains("revoked"), "{error}");
    let _worker = echo_worker(&state).await;
    let cx = connect_driver(&state.join("cluster.yaml")).await.expect("the new shared certificate joins");
    assert_eq!(echo::remote(&cx, 5).get_timeout(BOUND).await.unwrap(), 5);
    // A head restarted on the directory starts: its own node joins with the new certificate.
    drop(head);
    let _restarted = HeadProcess::start(&state, &[]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_file_of_another_cluster_is_reported_as_such() {
    let cluster = cluster().await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("other-cluster.yaml");
    HeadCredentials::generate().unwrap().cluster(&cluster.credentials().address).save(&file).unwrap();
    let error = match connect_driver(&file).await {
        Ok(_) => panic!("another cluster's file must not join"),
        Err(error) => error.to_string(),
    };
    let expected = format!(
        "the head at {} is not the cluster of {} (its certificate is not signed by that file's CA",
        cluster.credentials().address,
        file.display()
    );
    assert!(error.contains(&expected), "{error}");
    still_serves(&cluster).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_state_directory_is_tightened_and_the_ca_key_kept_private() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    std::fs::create_dir(&state).unwrap();
    std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o755)).unwrap();
    let head = HeadProcess::start(&state, &[]);
    assert_eq!(mode(&state), 0o700);
    assert!(
        head.startup.iter().any(|line| line.contains("was mode 0755") && line.contains("set it to 0700")),
        "the head says it tightened the directory: {:#?}",
        head.startup
    );
    assert_eq!(mode(&state.join("ca-key.pem")), 0o600);
    assert_eq!(mode(&state.join("head-credentials.yaml")), 0o600);
    assert_eq!(mode(&state.join("cluster.yaml")), 0o600);
    drop(head);
    // A directory already private is left alone, and not logged about.
    let head = HeadProcess::start(&state, &[]);
    assert!(!head.startup.iter().any(|line| line.contains("was mode")), "{:#?}", head.startup);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_state_directory_without_a_ca_key_runs_but_cannot_issue() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    std::fs::create_dir(&state).unwrap();
    // What a head made before CA keys were kept left behind: credentials, no CA key.
    HeadCredentials::generate().unwrap().save(&state).unwrap();
    let _head = HeadProcess::start(&state, &[]);
    let out = dir.path().join("m.yaml");
    let (ok, text) = chia_head(&[
        "issue-member",
        "--name",
        "m",
        "--valid-days",
        "1",
        "--state-dir",
        path_arg(&state),
        "-o",
        path_arg(&out),
    ]);
    assert!(!ok, "issuing without a CA key must fail: {text}");
    assert!(text.contains("holds no CA key (ca-key.pem)"), "{text}");
    assert!(text.contains("fresh state directory"), "says how to fix it: {text}");
    assert!(!out.exists(), "nothing is written");
}

#[test]
fn a_member_name_is_validated_before_anything_is_issued() {
    let dir = tempfile::tempdir().unwrap();
    for (name, why) in [
        ("", "1 to 64"),
        ("has space", "only ASCII"),
        ("-dash", "start and end"),
        ("dash.", "start and end"),
        ("chia-member", "shared member"),
        ("chia-head", "head's own"),
    ] {
        let (ok, text) = chia_head(&[
            "issue-member",
            // `=`: a name starting with '-' is the name, not an option.
            &format!("--name={name}"),
            "--valid-days",
            "1",
            "--state-dir",
            path_arg(dir.path()),
        ]);
        assert!(!ok && text.contains("is not a valid member name") && text.contains(why), "{name:?}: {text}");
    }
}

#[test]
fn credential_parse_errors_name_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("broken-cluster.yaml");
    std::fs::write(&file, "address: [unclosed\n").unwrap();
    let error = ClusterCredentials::load(&file).unwrap_err().to_string();
    assert!(error.contains("broken-cluster.yaml") && !error.contains("<input>"), "{error}");
    std::fs::write(dir.path().join("head-credentials.yaml"), "ca_cert: [unclosed\n").unwrap();
    let error = HeadCredentials::load_or_create(dir.path()).unwrap_err().to_string();
    assert!(error.contains("head-credentials.yaml") && !error.contains("<input>"), "{error}");
}
