//! Bypass end to end, on a real embedded cluster: the original's bypass cases, plus the file
//! server's limits and the errors a user sees.

extern crate chia_runtime as chia;

mod common;

use chia::Context;
use chia::bypass::{Bypass, BypassCall, BypassConfig, Decision, Provided, ProviderSpec, RunReason};
use common::cluster;
use std::sync::Mutex;

/// Sends `call` and says how it was dispatched, after checking that asking first
/// (`bypass_decision`, without submitting) gives the same decision.
fn decided<T: serde::de::DeserializeOwned>(
    cx: &Context,
    mut call: chia::Call<T>,
) -> (chia::ObjectRef<T>, Decision) {
    let asked = call.bypass_decision(cx).expect("the decision can be asked for");
    let (object, decision) = call.remote_with_decision(cx);
    assert_eq!(asked, decision, "bypass_decision and the real dispatch agree");
    (object, decision)
}

#[chia::function(resources(adder = 1))]
fn simple_add(x: i64, y: i64) -> i64 {
    x + y
}

#[chia::function]
fn simple_multiply(x: i64, y: i64) -> i64 {
    x * y
}

/// Needs the `special` resource, which one worker has.
#[chia::function(resources(special = 1))]
fn where_am_i(cx: &Context) -> String {
    format!("really ran on {}", cx.node_name())
}

#[chia::function]
fn summarize_perf() -> String {
    "computed for real".to_string()
}

/// Makes two nested calls with the tags it is given and returns both results.
#[chia::function]
async fn outer(cx: &Context, first_tag: String, second_tag: String) -> Result<(i64, i64), chia::Error> {
    let first = simple_add::call(1, 2).tag(first_tag).remote(cx);
    let second = simple_add::call(3, 4).tag(second_tag).remote(cx);
    Ok((first.get().await?, second.get().await?))
}

/// One nested call bypassed (`simple_add`), one not configured (`simple_multiply`).
#[chia::function]
async fn outer_mixed(cx: &Context) -> Result<(i64, i64), chia::Error> {
    let added = simple_add::call(1, 2).tag("iter0_nested").remote(cx);
    let multiplied = simple_multiply::call(3, 4).tag("iter0_nested").remote(cx);
    Ok((added.get().await?, multiplied.get().await?))
}

#[chia::provider]
fn provider_42(_call: &BypassCall) -> i64 {
    42
}

/// Says where it ran, to show a bypassed call is placed like the real one.
#[chia::provider]
fn provider_node(call: &BypassCall) -> String {
    format!("bypassed on {}", call.context().node_name())
}

/// A custom provider that reads the recorded file through the file server.
#[chia::provider]
async fn shouting_provider(call: &BypassCall) -> Result<String, chia::Error> {
    Ok(call.read_data().await?.to_uppercase())
}

/// Tries to read a file the configuration does not name.
#[chia::provider]
async fn snooping_provider(call: &BypassCall) -> Result<String, chia::Error> {
    let bytes = call.read_file("/etc/hostname".as_ref()).await?;
    Ok(String::from_utf8_lossy(&bytes).into_owned())
}

/// Returns the original arguments' sum times 100: providers receive the arguments.
#[chia::provider]
async fn provider_from_args(call: &BypassCall) -> Result<i64, chia::Error> {
    let x: i64 = call.arg(0).await?;
    let y: i64 = call.arg(1).await?;
    Ok((x + y) * 100)
}

/// A value of the wrong type, already encoded.
#[chia::provider]
fn provider_wrong_type(_call: &BypassCall) -> Provided {
    Provided::value("not a number").expect("a string encodes")
}

#[chia::condition]
fn always_true(_call: &BypassCall) -> bool {
    true
}

#[chia::condition]
fn always_false(_call: &BypassCall) -> bool {
    false
}

/// Tags the condition was asked about, so a test can see whether it ran.
static CONDITION_SAW: Mutex<Vec<String>> = Mutex::new(Vec::new());

#[chia::condition]
fn recording_condition(call: &BypassCall) -> bool {
    CONDITION_SAW.lock().unwrap().push(call.tag().unwrap_or("").to_string());
    true
}

/// Bypasses only calls whose first argument is even; also checks it sees the data path.
#[chia::condition]
async fn first_arg_is_even(call: &BypassCall) -> Result<bool, chia::Error> {
    let x: i64 = call.arg(0).await?;
    Ok(x % 2 == 0 && call.data_path().is_none() && call.function() == "simple_add")
}

#[chia::condition]
fn failing_condition(_call: &BypassCall) -> Result<bool, String> {
    Err("the oracle is down".to_string())
}

/// A provider spec that is not submitted to the registry: what a worker binary that does not
/// link the provider sees.
fn unlinked(_call: &BypassCall) -> chia::bypass::BoxFutureRef<'_, Result<Vec<u8>, String>> {
    Box::pin(async { Ok(Vec::new()) })
}
static NOT_LINKED: ProviderSpec = ProviderSpec { name: "not_linked_anywhere", run: unlinked };

const WORKERS: &[&str] = &["CPU=2,adder=1", "CPU=2,adder=1"];

async fn bypass(cx: &Context, yaml: &str) -> Bypass {
    let config = BypassConfig::from_yaml_str(yaml, "test.yaml").expect("test YAML loads");
    Bypass::with_config(cx, config).await.expect("bypass installs")
}

async fn add(cx: &Context, tag: Option<&str>) -> i64 {
    let call = simple_add::call(1, 2);
    let call = match tag {
        Some(tag) => call.tag(tag),
        None => call,
    };
    call.remote(cx).get_timeout(common::BOUND).await.expect("simple_add")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bypass_all_calls_when_no_tags_are_configured() {
    let (_cluster, cx) = cluster(WORKERS).await;
    let bypass = bypass(&cx, "bypass:\n  simple_add:\n    bypass: true\n").await;
    bypass.set_provider("simple_add", &provider_42::PROVIDER).unwrap();
    assert_eq!(add(&cx, None).await, 42);
    assert_eq!(add(&cx, Some("anything")).await, 42);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bypassed_call_is_placed_with_the_function_resources() {
    let (_cluster, cx) = cluster(&["CPU=2", "CPU=2,special=1", "CPU=2"]).await;
    let expected_node = where_am_i::remote(&cx).get_timeout(common::BOUND).await.unwrap();
    let node = expected_node.trim_start_matches("really ran on ").to_string();
    let bypass = bypass(&cx, "bypass:\n  where_am_i: true\n").await;
    bypass.set_provider("where_am_i", &provider_node::PROVIDER).unwrap();
    for _ in 0..4 {
        let (object, decision) = decided(&cx, where_am_i::call());
        assert_eq!(decision, Decision::Bypassed { provider: Some("provider_node".into()), data: None });
        assert_eq!(object.get_timeout(common::BOUND).await.unwrap(), format!("bypassed on {node}"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_calls_with_a_matching_tag_are_bypassed() {
    let (_cluster, cx) = cluster(WORKERS).await;
    let bypass = bypass(&cx, "bypass:\n  simple_add:\n    bypass: true\n    tags: [\"iter0_.*\"]\n").await;
    bypass.set_provider("simple_add", &provider_42::PROVIDER).unwrap();
    assert_eq!(add(&cx, Some("iter0_call1")).await, 42);
    assert_eq!(add(&cx, Some("iter1_call0")).await, 3);
    // A pattern matches the whole tag, and an untagged call never matches a tag pattern.
    assert_eq!(add(&cx, Some("xiter0_call1")).await, 3);
    assert_eq!(add(&cx, None).await, 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tag_patterns_are_regular_expressions() {
    let (_cluster, cx) = cluster(WORKERS).await;
    let yaml = "bypass:\n  simple_add:\n    bypass: true\n    tags: [\"iter[13]_call\\\\d+\", \"final\"]\n";
    let bypass = bypass(&cx, yaml).await;
    bypass.set_provider("simple_add", &provider_42::PROVIDER).unwrap();
    for (tag, expected) in
        [("iter1_call0", 42), ("iter3_call12", 42), ("final", 42), ("iter2_call0", 3), ("iter1_callx", 3)]
    {
        assert_eq!(add(&cx, Some(tag)).await, expected, "tag {tag}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_shorthand_without_a_tags_field_bypasses_every_call() {
    let (_cluster, cx) = cluster(WORKERS).await;
    let bypass = bypass(&cx, "bypass:\n  simple_add: true\n").await;
    bypass.set_provider("simple_add", &provider_42::PROVIDER).unwrap();
    assert_eq!(add(&cx, Some("iter7_call3")).await, 42);
    assert_eq!(add(&cx, None).await, 42);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn functions_not_listed_or_switched_off_run_for_real() {
    let (_cluster, cx) = cluster(WORKERS).await;
    let bypass = bypass(&cx, "bypass:\n  simple_add:\n    bypass: false\n  other: true\n").await;
    bypass.set_provider("simple_add", &provider_42::PROVIDER).unwrap();
    bypass.set_provider("simple_multiply", &provider_42::PROVIDER).unwrap();
    assert_eq!(add(&cx, Some("iter0")).await, 3);
    let (product, decision) = decided(&cx, simple_multiply::call(3, 4));
    assert_eq!(decision, Decision::Run(RunReason::NotBypassed));
    assert_eq!(product.get_timeout(common::BOUND).await.unwrap(), 12);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bypass_true_without_provider_or_data_runs_for_real() {
    let (_cluster, cx) = cluster(WORKERS).await;
    let _bypass = bypass(&cx, "bypass:\n  simple_add: true\n").await;
    let (sum, decision) = decided(&cx, simple_add::call(1, 2));
    assert_eq!(decision, Decision::Run(RunReason::NoProvider));
    assert_eq!(sum.get_timeout(common::BOUND).await.unwrap(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nested_calls_follow_the_driver_configuration_and_tags() {
    let (_cluster, cx) = cluster(WORKERS).await;
    let bypass = bypass(&cx, "bypass:\n  simple_add:\n    bypass: true\n    tags: [\"iter0_.*\"]\n").await;
    bypass.set_provider("simple_add", &provider_42::PROVIDER).unwrap();
    let nested = outer::remote(&cx, "iter0_inner".to_string(), "iter1_inner".to_string());
    assert_eq!(nested.get_timeout(common::BOUND).await.unwrap(), (42, 7));
    // A later change of the plan reaches the next tasks.
    bypass.set_provider("simple_add", &provider_from_args::PROVIDER).unwrap();
    let nested = outer::remote(&cx, "iter0_a".to_string(), "iter0_b".to_string());
    assert_eq!(nested.get_timeout(common::BOUND).await.unwrap(), (300, 700));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nested_calls_mix_bypassed_and_real_functions() {
    let (_cluster, cx) = cluster(WORKERS).await;
    let bypass = bypass(&cx, "bypass:\n  simple_add:\n    bypass: true\n    tags: [\"iter0_.*\"]\n").await;
    bypass.set_provider("simple_add", &provider_42::PROVIDER).unwrap();
    assert_eq!(outer_mixed::remote(&cx).get_timeout(common::BOUND).await.unwrap(), (42, 12));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_yaml_file_configures_bypass_and_no_file_configures_nothing() {
    let (_cluster, cx) = cluster(WORKERS).await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("loop.yaml");
    std::fs::write(
        &path,
        "# the loop's settings\ncache:\n  simple_add: true\nbypass:\n  simple_add:\n    bypass: yes\n    tags:\n      - \"iter[0-9]+_call0\"\n  simple_multiply: no\n",
    )
    .unwrap();
    let bypass = Bypass::load(&cx, Some(&path)).await.unwrap();
    bypass.set_provider("simple_add", &provider_42::PROVIDER).unwrap();
    bypass.set_provider("simple_multiply", &provider_42::PROVIDER).unwrap();
    assert_eq!(add(&cx, Some("iter12_call0")).await, 42);
    assert_eq!(add(&cx, Some("iter12_call1")).await, 3);
    assert_eq!(simple_multiply::remote(&cx, 2, 5).get_timeout(common::BOUND).await.unwrap(), 10);

    let (_cluster, cx) = cluster(WORKERS).await;
    let nothing = Bypass::load(&cx, None).await.unwrap();
    nothing.set_provider("simple_add", &provider_42::PROVIDER).unwrap();
    assert!(nothing.plan().is_empty());
    assert_eq!(add(&cx, None).await, 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalid_yaml_file_is_an_error_naming_the_file_and_function() {
    let (_cluster, cx) = cluster(WORKERS).await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("broken.yaml");
    std::fs::write(&path, "bypass:\n  simple_add:\n    bypass: true\n    data: 12\n").unwrap();
    let error = Bypass::load(&cx, Some(&path)).await.err().expect("a data: that is not a path");
    let message = error.to_string();
    assert!(message.contains("broken.yaml") && message.contains("simple_add"), "{message}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_default_provider_serves_the_data_file_through_the_file_server() {
    let (_cluster, cx) = cluster(WORKERS).await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("recorded")).unwrap();
    std::fs::write(dir.path().join("recorded/perf.md"), "# Perf\nipc: 1.7\n").unwrap();
    let path = dir.path().join("loop.yaml");
    std::fs::write(
        &path,
        "bypass:\n  summarize_perf:\n    bypass: true\n    data: recorded/perf.md\n  simple_add:\n    bypass: true\n    data: recorded/missing.md\n",
    )
    .unwrap();
    let _bypass = Bypass::load(&cx, Some(&path)).await.unwrap();
    let (text, decision) = decided(&cx, summarize_perf::call());
    assert!(matches!(decision, Decision::Bypassed { provider: None, .. }), "{decision:?}");
    assert_eq!(text.get_timeout(common::BOUND).await.unwrap(), "# Perf\nipc: 1.7\n");
    // A missing file fails that call, naming the path.
    let error = simple_add::remote(&cx, 1, 2).get_timeout(common::BOUND).await.unwrap_err().to_string();
    assert!(error.contains("recorded/missing.md") && error.contains("simple_add"), "{error}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_custom_provider_reads_through_the_file_server_and_only_configured_files() {
    let (_cluster, cx) = cluster(WORKERS).await;
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("perf.md");
    std::fs::write(&data, "ipc: 1.7").unwrap();
    let yaml = format!("bypass:\n  summarize_perf:\n    bypass: true\n    data: {}\n", data.display());
    let bypass = bypass(&cx, &yaml).await;
    bypass.set_provider("summarize_perf", &shouting_provider::PROVIDER).unwrap();
    assert_eq!(summarize_perf::remote(&cx).get_timeout(common::BOUND).await.unwrap(), "IPC: 1.7");
    bypass.set_provider("summarize_perf", &snooping_provider::PROVIDER).unwrap();
    let error = summarize_perf::remote(&cx).get_timeout(common::BOUND).await.unwrap_err().to_string();
    assert!(error.contains("/etc/hostname") && error.contains("reads only those"), "{error}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_file_server_never_reads_the_head_state_directory_even_when_configured() {
    chia::init_logging("warn");
    let state = tempfile::tempdir().unwrap();
    let credentials = chia::internals::tls::HeadCredentials::load_or_create(state.path()).unwrap();
    let options =
        chia::internals::HeadOptions { state_dir: Some(state.path().to_path_buf()), ..Default::default() };
    let head = chia::internals::HeadWithNode::start("127.0.0.1:0".parse().unwrap(), credentials, options)
        .await
        .unwrap();
    let members = head.head().cluster_credentials(&head.head().address().to_string());
    let _worker =
        chia::internals::Worker::connect(&members, "w", common::resources(WORKERS[0])).await.unwrap();
    let (client, _) = chia::internals::Client::connect(&members, "driver", None).await.unwrap();
    let cx = Context::from_client(client);
    let secret = state.path().join("secret.md");
    std::fs::write(&secret, "the CA key").unwrap();
    let _bypass = bypass(
        &cx,
        &format!("bypass:\n  summarize_perf:\n    bypass: true\n    data: {}\n", secret.display()),
    )
    .await;
    let error = summarize_perf::remote(&cx).get_timeout(common::BOUND).await.unwrap_err().to_string();
    assert!(error.contains("state directory, which is never served"), "{error}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_condition_gates_the_bypass() {
    let (_cluster, cx) = cluster(WORKERS).await;
    let bypass = bypass(&cx, "bypass:\n  simple_add: true\n").await;
    bypass.set_provider("simple_add", &provider_42::PROVIDER).unwrap();
    bypass.set_cond("simple_add", &always_true::CONDITION).unwrap();
    assert_eq!(add(&cx, None).await, 42);
    bypass.set_cond("simple_add", &always_false::CONDITION).unwrap();
    let (sum, decision) = decided(&cx, simple_add::call(1, 2));
    assert_eq!(decision, Decision::Run(RunReason::ConditionFalse { condition: "always_false".into() }));
    assert_eq!(sum.get_timeout(common::BOUND).await.unwrap(), 3);
    // A failing condition is not a failed call: the real function is always a right answer.
    bypass.set_cond("simple_add", &failing_condition::CONDITION).unwrap();
    let (sum, decision) = decided(&cx, simple_add::call(1, 2));
    assert!(
        matches!(&decision, Decision::Run(RunReason::ConditionFailed { message, .. }) if message.contains("oracle")),
        "{decision:?}"
    );
    assert_eq!(sum.get_timeout(common::BOUND).await.unwrap(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_condition_runs_only_after_the_tag_matched() {
    let (_cluster, cx) = cluster(WORKERS).await;
    let bypass = bypass(&cx, "bypass:\n  simple_add:\n    bypass: true\n    tags: [\"cond_yes_.*\"]\n").await;
    bypass.set_provider("simple_add", &provider_42::PROVIDER).unwrap();
    bypass.set_cond("simple_add", &recording_condition::CONDITION).unwrap();
    assert_eq!(add(&cx, Some("cond_no_1")).await, 3);
    assert_eq!(add(&cx, Some("cond_yes_1")).await, 42);
    let saw = CONDITION_SAW.lock().unwrap().clone();
    assert!(saw.contains(&"cond_yes_1".to_string()), "{saw:?}");
    assert!(!saw.contains(&"cond_no_1".to_string()), "the condition ran before the tag check: {saw:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_condition_the_bypass_proceeds() {
    let (_cluster, cx) = cluster(WORKERS).await;
    let bypass = bypass(&cx, "bypass:\n  simple_add: true\n").await;
    bypass.set_provider("simple_add", &provider_42::PROVIDER).unwrap();
    assert!(bypass.plan().conditions.is_empty());
    let (sum, decision) = decided(&cx, simple_add::call(1, 2));
    assert_eq!(decision, Decision::Bypassed { provider: Some("provider_42".into()), data: None });
    assert_eq!(sum.get_timeout(common::BOUND).await.unwrap(), 42);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_condition_and_the_provider_receive_the_call_arguments() {
    let (_cluster, cx) = cluster(WORKERS).await;
    let bypass = bypass(&cx, "bypass:\n  simple_add: true\n").await;
    bypass.set_provider("simple_add", &provider_from_args::PROVIDER).unwrap();
    bypass.set_cond("simple_add", &first_arg_is_even::CONDITION).unwrap();
    assert_eq!(simple_add::remote(&cx, 2, 5).get_timeout(common::BOUND).await.unwrap(), 700);
    assert_eq!(simple_add::remote(&cx, 3, 5).get_timeout(common::BOUND).await.unwrap(), 8);
    // An argument that is another call's result is waited for by the condition.
    let four = simple_multiply::remote(&cx, 2, 2);
    assert_eq!(simple_add::remote(&cx, &four, 1).get_timeout(common::BOUND).await.unwrap(), 500);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn provider_failures_are_clear_errors() {
    let (_cluster, cx) = cluster(WORKERS).await;
    let bypass = bypass(&cx, "bypass:\n  simple_add: true\n").await;
    bypass.set_provider("simple_add", &NOT_LINKED).unwrap();
    let error = simple_add::remote(&cx, 1, 2).get_timeout(common::BOUND).await.unwrap_err().to_string();
    assert!(error.contains("not_linked_anywhere") && error.contains("not linked into the worker"), "{error}");
    bypass.set_provider("simple_add", &provider_wrong_type::PROVIDER).unwrap();
    let error = simple_add::remote(&cx, 1, 2).get_timeout(common::BOUND).await.unwrap_err();
    assert!(matches!(error, chia::Error::Decode { .. }), "{error:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bypassed_results_are_cached_like_real_ones() {
    let (_cluster, cx) = cluster(WORKERS).await;
    let dir = tempfile::tempdir().unwrap();
    let yaml = dir.path().join("loop.yaml");
    std::fs::write(
        &yaml,
        "cache:\n  simple_add: true\nbypass:\n  simple_add:\n    bypass: true\n    tags: [\"replayed\"]\n",
    )
    .unwrap();
    let cache = chia::cache::start_cache(
        &cx,
        chia::cache::CacheOptions::in_dir(dir.path().join("cache")).size(1.0, "MiB").yaml_path(&yaml),
    )
    .await
    .unwrap();
    let bypass = Bypass::load(&cx, Some(&yaml)).await.unwrap();
    bypass.set_provider("simple_add", &provider_42::PROVIDER).unwrap();
    assert_eq!(add(&cx, Some("replayed")).await, 42);
    assert_eq!(add(&cx, Some("real")).await, 3);
    // The result is announced only after the cache stored it, so no waiting is needed here.
    assert_eq!(cache.read::<i64>("replayed").await.unwrap(), Some(42));
    assert_eq!(cache.read::<i64>("real").await.unwrap(), Some(3));
}

/// A condition blocks the caller's thread, which a current-thread runtime cannot give up.
#[tokio::test(flavor = "current_thread")]
async fn a_condition_on_a_current_thread_runtime_is_a_clear_error() {
    let (_cluster, cx) = cluster(WORKERS).await;
    let bypass = bypass(&cx, "bypass:\n  simple_add: true\n").await;
    bypass.set_provider("simple_add", &provider_42::PROVIDER).unwrap();
    bypass.set_cond("simple_add", &always_true::CONDITION).unwrap();
    let error = simple_add::remote(&cx, 1, 2).get_timeout(common::BOUND).await.unwrap_err().to_string();
    assert!(error.contains("always_true") && error.contains("multi-threaded runtime"), "{error}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn switching_bypass_off_reaches_nested_calls_too() {
    let (_cluster, cx) = cluster(WORKERS).await;
    let bypass = bypass(&cx, "bypass:\n  simple_add: true\n").await;
    bypass.set_provider("simple_add", &provider_42::PROVIDER).unwrap();
    let nested = || outer::remote(&cx, "a".to_string(), "b".to_string());
    assert_eq!(nested().get_timeout(common::BOUND).await.unwrap(), (42, 42));
    // A new, empty configuration replaces the job's: nested calls run for real again.
    let _off = Bypass::load(&cx, None).await.unwrap();
    assert_eq!(add(&cx, None).await, 3);
    assert_eq!(nested().get_timeout(common::BOUND).await.unwrap(), (3, 7));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_file_server_refuses_directories_even_when_configured() {
    let (_cluster, cx) = cluster(WORKERS).await;
    let dir = tempfile::tempdir().unwrap();
    let yaml = format!("bypass:\n  summarize_perf:\n    bypass: true\n    data: {}\n", dir.path().display());
    let _bypass = bypass(&cx, &yaml).await;
    let error = summarize_perf::remote(&cx).get_timeout(common::BOUND).await.unwrap_err().to_string();
    assert!(error.contains("not a regular file"), "{error}");
}

// ---------------------------------------------------------------------------- job isolation

#[chia::function]
fn sq(x: i64) -> i64 {
    x * x
}

/// `sq(x)` as a nested call: which job's plan it follows is what the isolation tests look at.
#[chia::function]
async fn nested_sq(cx: &Context, x: i64) -> Result<i64, chia::Error> {
    sq::remote(cx, x).get().await
}

/// Tries to install a bypass of `sq` (answered by `provider_42`) from inside a task; returns
/// the error, or "installed".
#[chia::function]
async fn install_bypass_inside(cx: &Context) -> String {
    let config = BypassConfig::from_yaml_str("bypass:\n  sq: true\n", "inside.yaml").expect("YAML loads");
    match Bypass::with_config(cx, config).await {
        Ok(bypass) => match bypass.set_provider("sq", &provider_42::PROVIDER) {
            Ok(()) => "installed".to_string(),
            Err(e) => e.to_string(),
        },
        Err(e) => e.to_string(),
    }
}

/// Set by `nested_sq_after_gate` once it runs; it then waits for `SQ_GATE`.
static SQ_STARTED: std::sync::LazyLock<tokio::sync::Notify> = std::sync::LazyLock::new(Default::default);
static SQ_GATE: std::sync::LazyLock<tokio::sync::Notify> = std::sync::LazyLock::new(Default::default);

/// Waits for the test to open the gate, then calls `nested_sq(x)`: a grandchild of the driver,
/// submitted after the task itself was dispatched.
#[chia::function]
async fn nested_sq_after_gate(cx: &Context, x: i64) -> Result<i64, chia::Error> {
    SQ_STARTED.notify_one();
    SQ_GATE.notified().await;
    nested_sq::remote(cx, x).get().await
}

/// The case found in the issue: on a one-worker cluster, a task of driver A that creates a
/// `Bypass` must not change what nested calls do in A's later tasks or in another driver's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bypass_created_inside_a_task_is_refused_and_reaches_no_job() {
    let (cluster, b) = cluster(&["CPU=2"]).await;
    let (client, _) =
        chia::internals::Client::connect(cluster.credentials(), "driver-a", None).await.unwrap();
    let a_job = client.session();
    let a = Context::from_client(client);
    let refused = install_bypass_inside::remote(&a).get_timeout(common::BOUND).await.unwrap();
    assert!(
        refused.contains("only by a driver")
            && refused.contains("install_bypass_inside")
            && refused.contains(&format!("job {a_job}")),
        "{refused}"
    );
    assert_eq!(
        nested_sq::remote(&b, 2).get_timeout(common::BOUND).await.unwrap(),
        4,
        "driver B's nested call"
    );
    assert_eq!(
        nested_sq::remote(&a, 3).get_timeout(common::BOUND).await.unwrap(),
        9,
        "driver A's nested call"
    );
    assert_eq!(sq::remote(&a, 5).get_timeout(common::BOUND).await.unwrap(), 25);
}

/// A nested call belongs to its parent's job, at any depth and even when the job's plan
/// changed after the parent was dispatched: never to the worker's session or another job's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nested_calls_belong_to_their_parents_job_at_any_depth() {
    let (cluster, a) = cluster(&["CPU=4"]).await;
    let b = cluster.driver().await.expect("second driver connects");
    // Dispatched while A has no bypass at all.
    let waiting = nested_sq_after_gate::remote(&a, 2);
    SQ_STARTED.notified().await;
    let a_bypass = bypass(&a, "bypass:\n  sq: true\n").await;
    a_bypass.set_provider("sq", &provider_42::PROVIDER).unwrap();
    // The plan reaches the head on A's stream and the grandchild's submission on the worker's:
    // a call of A's answered after the plan was sent shows the head has it, before the gate opens.
    assert_eq!(sq::remote(&a, 3).get_timeout(common::BOUND).await.unwrap(), 42, "A's own call");
    SQ_GATE.notify_one();
    // The grandchild was submitted after A's plan was installed: as a call of A's, it follows it.
    assert_eq!(waiting.get_timeout(common::BOUND).await.unwrap(), 42, "A's grandchild");
    assert_eq!(nested_sq::remote(&a, 2).get_timeout(common::BOUND).await.unwrap(), 42, "A's child");
    // B, on the same worker, has no bypass: none of A's reaches it.
    assert_eq!(nested_sq::remote(&b, 2).get_timeout(common::BOUND).await.unwrap(), 4, "B's child");
    assert_eq!(sq::remote(&b, 2).get_timeout(common::BOUND).await.unwrap(), 4, "B's own call");
}

/// A service that tries to install a bypass of `sq` from its method.
struct Installer;

#[chia::service]
impl Installer {
    pub fn new() -> Self {
        Installer
    }

    pub async fn install(&self, cx: &Context) -> String {
        install_bypass_inside(cx).await
    }
}

/// A service instance and a worker's own connection serve every job on the worker: a bypass
/// made there would reach all of them, so it is refused too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bypass_in_a_service_or_on_a_worker_connection_is_refused() {
    let (cluster, b) = cluster(&["CPU=2"]).await;
    let a = cluster.driver().await.expect("second driver connects");
    let installer = InstallerHandle::start(&a, chia::ServiceOptions::named("installer")).await.unwrap();
    let refused = installer.install().get_timeout(common::BOUND).await.unwrap();
    assert!(refused.contains("only by a driver") && refused.contains("a service's"), "{refused}");
    let worker = &cluster.workers()[0];
    let config = BypassConfig::from_yaml_str("bypass:\n  sq: true\n", "worker.yaml").unwrap();
    let refused = Bypass::with_config(worker.context(), config).await.err().expect("refused").to_string();
    assert!(refused.contains(&format!("on the connection of worker {}", worker.node_name())), "{refused}");
    assert_eq!(
        nested_sq::remote(&b, 2).get_timeout(common::BOUND).await.unwrap(),
        4,
        "driver B's nested call"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_saved_bypass_is_installed_again_with_its_providers_and_conditions() {
    let (cluster, cx) = cluster(&["CPU=2,adder=2"]).await;
    let saved = {
        let original = bypass(&cx, "bypass:\n  simple_add: {bypass: true, tags: ['even.*']}\n").await;
        original.set_provider("simple_add", &provider_42::PROVIDER).unwrap();
        original.set_cond("simple_add", &first_arg_is_even::CONDITION).unwrap();
        // Asked without sending: the condition decides (1 is odd, 2 is even).
        assert!(!original.is_bypassed(&mut simple_add::call(1, 2).tag("even1")).unwrap());
        assert!(original.is_bypassed(&mut simple_add::call(2, 2).tag("even1")).unwrap());
        assert!(
            !original.is_bypassed(&mut simple_add::call(2, 2).tag("odd1")).unwrap(),
            "the tag does not match"
        );
        original.state()
    };
    // Plain data: it travels (here through MessagePack) and is installed by another driver.
    let saved: chia::bypass::BypassState =
        rmp_serde::from_slice(&rmp_serde::to_vec_named(&saved).unwrap()).unwrap();
    let other = cluster.driver().await.unwrap();
    let restored = Bypass::from_state(&other, saved.clone()).await.expect("installs");
    assert_eq!(restored.state(), saved);
    let (sum, decision) = decided(&other, simple_add::call(2, 2).tag("even1"));
    assert_eq!(decision, Decision::Bypassed { provider: Some("provider_42".into()), data: None });
    assert_eq!(sum.get_timeout(common::BOUND).await.unwrap(), 42);
    let (sum, decision) = decided(&other, simple_add::call(1, 2).tag("even1"));
    assert_eq!(decision, Decision::Run(RunReason::ConditionFalse { condition: "first_arg_is_even".into() }));
    assert_eq!(sum.get_timeout(common::BOUND).await.unwrap(), 3);
    // A saved provider this binary does not link is named, and nothing is installed.
    let mut broken = saved;
    broken.providers.insert("simple_add".into(), "not_linked_here".into());
    let third = cluster.driver().await.unwrap();
    let error = Bypass::from_state(&third, broken).await.err().expect("refused");
    assert!(
        matches!(&error, chia::Error::NotLinked { kind: "provider", name, function }
            if name == "not_linked_here" && function == "simple_add"),
        "{error:?}"
    );
    assert_eq!(decided(&third, simple_add::call(2, 2).tag("even1")).1, Decision::Run(RunReason::NotBypassed));
}
