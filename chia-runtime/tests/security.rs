//! What the head does with peers that are not who they should be or do not speak the
//! protocol: each is refused or disconnected with a clear reason, and the head keeps serving.

extern crate chia_runtime as chia;

use chia::LocalCluster;
use chia::core::protocol::{HeadToPeer, PROTOCOL_VERSION, PeerToHead, decode_body};
use chia::tls::{ClusterCredentials, HEAD_SERVER_NAME, HeadCredentials};
use chia::transport::{FrameReader, FrameSender};
use std::time::Duration;

/// Bounds a test that would otherwise hang; never used to wait for something to happen.
const BOUND: Duration = Duration::from_secs(60);

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
    let error = match chia::client::Client::connect(&stranger, "stranger", None).await {
        Ok(_) => panic!("a stranger must not join"),
        Err(error) => error.to_string(),
    };
    assert!(error.contains("handshake failed"), "{error}");

    // Trusting the right CA is not enough: the client certificate must be the cluster's too.
    let mut impostor = cluster.credentials().clone();
    impostor.member_cert = stranger.member_cert.clone();
    impostor.member_key = stranger.member_key.clone();
    let connected = chia::client::Client::connect(&impostor, "impostor", None).await;
    assert!(connected.is_err(), "a client certificate from another CA must be refused");
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
    chia::core::protocol::encode_frame(&hello(PROTOCOL_VERSION), &mut frame).unwrap();
    send.write_all(&frame).await.unwrap();
    assert!(matches!(next_message(&mut reader).await, Some(HeadToPeer::Welcome { .. })));
    send.write_all(bytes).await.unwrap();
    next_message(&mut reader).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_frame_disconnects_the_peer_before_it_is_read() {
    let cluster = cluster().await;
    // A length prefix just past the cap; no body follows, so the head must refuse on the prefix.
    let prefix = ((chia::core::protocol::MAX_FRAME_BYTES + 1) as u32).to_be_bytes();
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
    let forged = chia::core::protocol::Outcome::Value(rmp_serde::to_vec_named(&666i64).unwrap());
    sender.send(&PeerToHead::Finished { task: pending.id(), attempt: 1, outcome: forged }).unwrap();
    assert_eq!(pending.get().await.unwrap(), 5, "only the node running a task can finish it");
    still_serves(&cluster).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn arguments_of_the_wrong_type_fail_the_task_not_the_worker() {
    use chia::core::protocol::{Arg, Done, TaskSpec};
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
            max_retries: 0,
            retry_exceptions: false,
            bypass: None,
            job: None,
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
