//! The key/value store (`chia::kv`) over real loopback QUIC: drivers and tasks of an embedded
//! cluster, a head restarted on its state directory (in this process, and a `chia-head`
//! process), and the `chia kv` command line.

extern crate chia_runtime as chia;

mod common;

use chia::internals::Client;
use chia::internals::HeadOptions;
use chia::internals::HeadWithNode;
use chia::internals::tls::HeadCredentials;
use chia::kv::{self, Change, KvError};
use chia::{Context, Error, LocalCluster};
use common::{BOUND, HeadProcess, chia_cli, cluster, driver_of_process};
use serde::{Deserialize, Serialize};
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

/// Reads a setting inside a task, as a loop running on a worker does.
#[chia::function]
async fn read_setting(cx: &Context, key: String) -> Result<Option<u32>, Error> {
    kv::get(cx, &key).await
}

/// Runs until the setting `key` says stop, counting the states it saw on the way.
#[chia::function]
async fn run_until_stopped(cx: &Context, key: String) -> Result<u32, Error> {
    let mut stop = kv::watch::<bool>(cx, &key).await?;
    let mut seen = 0;
    loop {
        seen += 1;
        if stop.next().await? == Change::Set(true) {
            return Ok(seen);
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
struct Sweep {
    parallel: u32,
    stage: String,
    rates: Vec<f64>,
}

async fn bounded<T>(what: &str, future: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(BOUND, future)
        .await
        .unwrap_or_else(|_| panic!("{what} did not happen within {BOUND:?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_value_set_by_one_driver_is_read_by_a_task_of_another() {
    let (cluster, setter) = cluster(&["CPU=1"]).await;
    let reader = cluster.driver().await.unwrap();
    kv::set(&setter, "sweep/parallel", &4u32).await.unwrap();
    let sweep = Sweep { parallel: 2, stage: "warmup".into(), rates: vec![0.1, 0.01] };
    kv::set(&setter, "sweep/config", &sweep).await.unwrap();
    kv::set(&setter, "other", "x").await.unwrap();

    let read = read_setting::remote(&reader, "sweep/parallel".to_string());
    assert_eq!(read.get_timeout(BOUND).await.unwrap(), Some(4));
    let missing = read_setting::remote(&reader, "sweep/missing".to_string());
    assert_eq!(missing.get_timeout(BOUND).await.unwrap(), None);
    assert_eq!(kv::get::<Sweep>(&reader, "sweep/config").await.unwrap(), Some(sweep));
    assert_eq!(kv::get_or(&reader, "sweep/missing", 7u32).await.unwrap(), 7);
    assert_eq!(kv::get_or(&reader, "sweep/parallel", 7u32).await.unwrap(), 4);
    assert_eq!(kv::keys(&reader, "sweep/").await.unwrap(), ["sweep/config", "sweep/parallel"]);
    assert_eq!(kv::keys(&reader, "").await.unwrap().len(), 3);
    let entries = kv::entries::<u32>(&reader, "sweep/par").await.unwrap();
    assert_eq!(entries, [("sweep/parallel".to_string(), 4)]);

    // Set again, from the reader this time: the task sees the latest.
    kv::set(&reader, "sweep/parallel", &8u32).await.unwrap();
    let read = read_setting::remote(&setter, "sweep/parallel".to_string());
    assert_eq!(read.get_timeout(BOUND).await.unwrap(), Some(8));
    assert!(kv::delete(&setter, "sweep/parallel").await.unwrap());
    assert!(!kv::delete(&setter, "sweep/parallel").await.unwrap(), "nothing left to delete");
    assert_eq!(kv::get::<u32>(&reader, "sweep/parallel").await.unwrap(), None);

    // One store for the cluster, detached, on the head's node.
    let info = chia::lookup_info(&reader, kv::SERVICE_NAME, Some(kv::NAMESPACE)).await.unwrap().unwrap();
    assert_eq!(info.node, chia::internals::core::HEAD_NODE_NAME);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drivers_racing_to_use_the_store_first_share_one() {
    let (cluster, first) = cluster(&[]).await;
    let (second, third) = (cluster.driver().await.unwrap(), cluster.driver().await.unwrap());
    // None of them has used the store, so each starts it (get-if-exists) at the same time.
    let (a, b, c) = bounded("the first sets", async {
        tokio::join!(
            kv::set(&first, "racer/1", &1u32),
            kv::set(&second, "racer/2", &2u32),
            kv::set(&third, "racer/3", &3u32)
        )
    })
    .await;
    for result in [a, b, c] {
        result.unwrap();
    }
    for cx in [&first, &second, &third] {
        assert_eq!(kv::keys(cx, "racer/").await.unwrap(), ["racer/1", "racer/2", "racer/3"]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_yields_what_other_drivers_change() {
    let (cluster, operator) = cluster(&[]).await;
    let looping = cluster.driver().await.unwrap();
    let mut knob = kv::watch::<u32>(&looping, "loop/parallel").await.unwrap();
    assert_eq!(knob.key(), "loop/parallel");
    assert_eq!(bounded("the first state", knob.next()).await.unwrap(), Change::Unset, "never set");

    kv::set(&operator, "loop/parallel", &3u32).await.unwrap();
    assert_eq!(bounded("the set", knob.next()).await.unwrap(), Change::Set(3));
    // Setting another key changes nothing for this one; setting it again to a new value does.
    kv::set(&operator, "loop/other", &1u32).await.unwrap();
    kv::set(&operator, "loop/parallel", &5u32).await.unwrap();
    assert_eq!(bounded("the second set", knob.next()).await.unwrap(), Change::Set(5));
    assert!(kv::delete(&operator, "loop/parallel").await.unwrap());
    assert_eq!(bounded("the delete", knob.next()).await.unwrap(), Change::Unset);

    // A value of another type is an error naming the key, and the watch goes on after it.
    kv::set(&operator, "loop/parallel", "many").await.unwrap();
    let error = bounded("the wrong type", knob.next()).await.unwrap_err();
    assert!(matches!(&error, Error::Kv(KvError::WrongType { key, .. }) if key == "loop/parallel"), "{error}");
    kv::set(&operator, "loop/parallel", &6u32).await.unwrap();
    assert_eq!(bounded("the set after it", knob.next()).await.unwrap(), Change::Set(6));

    // A watch begun on a key that holds a value yields it first.
    let mut again = kv::watch::<u32>(&operator, "loop/parallel").await.unwrap();
    assert_eq!(bounded("the first state", again.next()).await.unwrap(), Change::Set(6));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_finds_the_store_again_after_it_was_stopped() {
    let (cluster, operator) = cluster(&[]).await;
    let looping = cluster.driver().await.unwrap();
    kv::set(&operator, "knob", &1u32).await.unwrap();
    let mut knob = kv::watch::<u32>(&looping, "knob").await.unwrap();
    assert_eq!(knob.next().await.unwrap(), Change::Set(1));
    kv::set(&operator, "knob", &2u32).await.unwrap();
    assert_eq!(bounded("the second set", knob.next()).await.unwrap(), Change::Set(2));
    // The watch's next call goes to the store it used, which is gone by then.
    assert!(chia::stop_service(&operator, kv::SERVICE_NAME, Some(kv::NAMESPACE)).await.unwrap());
    // Kept in memory (no state directory), the store starts again empty on its next use; its
    // first version is not the one the watch saw in the store before.
    assert_eq!(kv::get::<u32>(&operator, "knob").await.unwrap(), None);
    kv::set(&operator, "knob", &1u32).await.unwrap();
    assert_eq!(bounded("the set in the new store", knob.next()).await.unwrap(), Change::Set(1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_loops_until_a_setting_changed_by_its_driver_tells_it_to_stop() {
    let (_cluster, cx) = cluster(&["CPU=1"]).await;
    kv::set(&cx, "job/stop", &false).await.unwrap();
    let running = run_until_stopped::remote(&cx, "job/stop".to_string());
    // The task's watch yields `false` first; waiting for it to be running would need a signal
    // from it, and none is needed: whenever the watch begins, it ends on `true`.
    kv::set(&cx, "job/stop", &true).await.unwrap();
    let seen = running.get_timeout(BOUND).await.unwrap();
    assert!((1..=2).contains(&seen), "it saw {seen} states");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_types_bad_keys_and_oversized_values_are_errors_naming_the_key() {
    let (_cluster, cx) = cluster(&[]).await;
    kv::set(&cx, "stage", "warmup").await.unwrap();
    let error = kv::get::<u32>(&cx, "stage").await.unwrap_err();
    let text = error.to_string();
    assert!(
        matches!(&error, Error::Kv(KvError::WrongType { key, expected, .. }) if key == "stage" && expected == "u32"),
        "{error:?}"
    );
    assert!(text.contains("\"stage\"") && text.contains("u32"), "{text}");
    let error = kv::get_or(&cx, "stage", 2u32).await.unwrap_err();
    assert!(
        matches!(error, Error::Kv(KvError::WrongType { .. })),
        "a wrong type is not the default: {error}"
    );

    let long = "k".repeat(kv::MAX_KEY_BYTES + 1);
    for key in ["", long.as_str(), "tab\there", "bell\u{7}"] {
        let errors = [
            kv::set(&cx, key, &1u32).await.unwrap_err(),
            kv::get::<u32>(&cx, key).await.unwrap_err(),
            kv::delete(&cx, key).await.unwrap_err(),
            kv::watch::<u32>(&cx, key).await.unwrap_err(),
        ];
        for error in errors {
            assert!(
                matches!(&error, Error::Kv(KvError::BadKey { key: named, .. }) if named == key),
                "{error:?}"
            );
        }
    }
    let error = kv::set(&cx, "\n", &1u32).await.unwrap_err().to_string();
    assert!(error.contains("\"\\n\"") && error.contains("control character"), "{error}");

    let big = chia::Bytes::from(vec![7u8; kv::MAX_VALUE_BYTES]);
    let error = kv::set(&cx, "blob", &big).await.unwrap_err();
    assert!(matches!(&error, Error::Kv(KvError::ValueTooLarge { key, .. }) if key == "blob"), "{error}");
    assert_eq!(kv::get::<chia::Bytes>(&cx, "blob").await.unwrap(), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_store_refuses_to_grow_past_its_bound_and_says_so() {
    let (_cluster, cx) = cluster(&[]).await;
    // Values just under the cap each (their encoding adds a few bytes).
    let value = chia::Bytes::from(vec![1u8; kv::MAX_VALUE_BYTES - 16]);
    let fit = kv::MAX_TOTAL_BYTES / kv::MAX_VALUE_BYTES;
    for i in 0..fit {
        kv::set(&cx, &format!("big/{i}"), &value).await.unwrap();
    }
    let error = kv::set(&cx, "big/one-more", &value).await.unwrap_err();
    assert!(matches!(&error, Error::Kv(KvError::StoreFull { key, .. }) if key == "big/one-more"), "{error}");
    assert!(error.to_string().contains(&kv::MAX_TOTAL_BYTES.to_string()), "{error}");
    // Room is made by deleting, and replacing a value by a smaller one is always allowed.
    kv::set(&cx, "big/0", &1u8).await.unwrap();
    kv::set(&cx, "big/one-more", &value).await.unwrap();
    assert_eq!(kv::keys(&cx, "big/").await.unwrap().len(), fit + 1);
}

/// A head with its own node on `listen` and a state directory, started in this process.
async fn head_on(state_dir: &Path, listen: SocketAddr) -> HeadWithNode {
    let credentials = HeadCredentials::load_or_create(state_dir).unwrap();
    let options =
        HeadOptions { state_dir: Some(state_dir.to_path_buf()), resume_grace: BOUND, ..Default::default() };
    // A restarted head takes over its predecessor's port once the old socket is gone.
    let deadline = tokio::time::Instant::now() + BOUND;
    loop {
        match HeadWithNode::start(listen, credentials.clone(), options.clone()).await {
            Ok(head) => return head,
            Err(e) if tokio::time::Instant::now() < deadline => {
                tracing::debug!("head not started yet: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => panic!("the head does not start on {listen}: {e}"),
        }
    }
}

async fn driver_of(head: &HeadWithNode) -> Context {
    let members = head.head().cluster_credentials(&head.head().address().to_string());
    let (client, _) = Client::connect(&members, "driver", None).await.unwrap();
    Context::from_client(client)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_head_has_the_values_and_a_watch_goes_on_through_the_restart() {
    chia::init_logging("warn");
    let state = tempfile::tempdir().unwrap();
    let head = head_on(state.path(), "127.0.0.1:0".parse().unwrap()).await;
    let address = head.head().address();
    let cx = driver_of(&head).await;
    kv::set(&cx, "knob", &1u32).await.unwrap();
    assert!(state.path().join(kv::FILE_NAME).is_file(), "the store's file is in the head's state directory");
    let mut knob = kv::watch::<u32>(&cx, "knob").await.unwrap();
    assert_eq!(knob.next().await.unwrap(), Change::Set(1));

    // The watch waits through the restart: its call is in the store when the head stops.
    let waiting = tokio::spawn(async move { knob.next().await });
    head.head().shutdown();
    head.head().wait_stopped().await;
    drop(head);
    let head = head_on(state.path(), address).await;
    // A new driver of the restarted head sets it; the old driver's watch sees it.
    let late = driver_of(&head).await;
    assert_eq!(kv::get::<u32>(&late, "knob").await.unwrap(), Some(1), "the value survived the restart");
    kv::set(&late, "knob", &2u32).await.unwrap();
    let changed = bounded("the change after the restart", waiting).await.unwrap();
    assert_eq!(changed.unwrap(), Change::Set(2));
    assert_eq!(kv::get::<u32>(&cx, "knob").await.unwrap(), Some(2), "the old driver took up its session");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_store_file_is_an_error_naming_it_and_is_left_as_it_was() {
    let state = tempfile::tempdir().unwrap();
    let file = state.path().join(kv::FILE_NAME);
    std::fs::write(&file, b"not a kv store").unwrap();
    let options = HeadOptions { state_dir: Some(state.path().to_path_buf()), ..Default::default() };
    let cluster = LocalCluster::start_with(Vec::new(), options).await.unwrap();
    let cx = cluster.driver().await.unwrap();
    for error in
        [kv::get::<u32>(&cx, "knob").await.unwrap_err(), kv::set(&cx, "knob", &1u32).await.unwrap_err()]
    {
        let text = error.to_string();
        assert!(text.contains(&file.display().to_string()) && text.contains("cannot be used"), "{text}");
    }
    assert_eq!(std::fs::read(&file).unwrap(), b"not a kv store", "the file is not replaced");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chia_kv_on_the_command_line_and_a_killed_chia_head_restarted_on_its_state_directory() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let head = HeadProcess::start(&state, &[]);

    let (ok, out, err) = chia_cli(&state, &["kv", "set", "sweep/parallel", "4"]);
    assert!(ok, "{out}{err}");
    assert_eq!(out.trim(), "sweep/parallel = 4");
    let cx = driver_of_process(&state).await;
    assert_eq!(kv::get::<u32>(&cx, "sweep/parallel").await.unwrap(), Some(4), "a driver reads what chia set");
    let sweep = Sweep { parallel: 2, stage: "warmup".into(), rates: vec![0.5] };
    kv::set(&cx, "sweep/config", &sweep).await.unwrap();
    let (ok, out, err) = chia_cli(&state, &["kv", "get", "sweep/config"]);
    assert!(ok, "{out}{err}");
    let shown: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(shown, serde_json::json!({ "parallel": 2, "stage": "warmup", "rates": [0.5] }));
    let (ok, out, err) =
        chia_cli(&state, &["kv", "set", "sweep/config", r#"{"parallel": 3, "stage": "run", "rates": [1]}"#]);
    assert!(ok, "{out}{err}");
    let set_by_chia = Sweep { parallel: 3, stage: "run".into(), rates: vec![1.0] };
    assert_eq!(kv::get::<Sweep>(&cx, "sweep/config").await.unwrap(), Some(set_by_chia.clone()));

    // SIGKILLed: what was set before is on disk.
    drop(cx);
    drop(head);
    let _head = HeadProcess::start(&state, &[]);
    let cx = driver_of_process(&state).await;
    assert_eq!(kv::get::<u32>(&cx, "sweep/parallel").await.unwrap(), Some(4));
    assert_eq!(kv::get::<Sweep>(&cx, "sweep/config").await.unwrap(), Some(set_by_chia));

    let (ok, out, err) = chia_cli(&state, &["kv", "list", "sweep/"]);
    assert!(ok, "{out}{err}");
    let rows: Vec<&str> = out.lines().collect();
    assert_eq!(rows.len(), 3, "{out}");
    assert!(
        rows[0].starts_with("KEY") && rows[2].starts_with("sweep/parallel") && rows[2].ends_with('4'),
        "{out}"
    );
    let (ok, out, err) = chia_cli(&state, &["kv", "list", "--json"]);
    assert!(ok, "{out}{err}");
    let listed: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(listed["sweep/parallel"], 4, "{out}");

    let (ok, _, err) = chia_cli(&state, &["kv", "set", "stage", "warmup"]);
    assert!(!ok && err.contains("not JSON") && err.contains(r#"'"warmup"'"#), "{err}");
    let (ok, _, err) = chia_cli(&state, &["kv", "set", "a\tb", "1"]);
    assert!(!ok && err.contains("control character"), "{err}");
    let (ok, out, err) = chia_cli(&state, &["kv", "delete", "sweep/parallel"]);
    assert!(ok && out.contains("deleted sweep/parallel"), "{out}{err}");
    let (ok, _, err) = chia_cli(&state, &["kv", "get", "sweep/parallel"]);
    assert!(!ok && err.contains("no value under \"sweep/parallel\""), "{err}");
    assert_eq!(kv::get::<u32>(&cx, "sweep/parallel").await.unwrap(), None);
}
