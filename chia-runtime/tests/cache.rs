//! The cache as a named, detached, head-pinned service, and its automatic writes.

extern crate chia_runtime as chia;

mod common;

use chia::Context;
use chia::cache::{CacheOptions, get_active_cache, is_cached, start_cache, stop_cache};
use common::cluster;

#[chia::function]
fn produce(x: u64) -> Vec<u64> {
    vec![x; 4]
}

#[chia::function]
fn untagged_is_fine(x: u64) -> u64 {
    x
}

#[chia::function]
fn always_fails(x: u64) -> Result<u64, String> {
    Err(format!("no {x}"))
}

/// Reads a cached value from inside a task, the way a bypass provider would.
#[chia::function]
async fn read_from_a_worker(cx: &Context, tag: String) -> Result<Option<Vec<u64>>, chia::Error> {
    match get_active_cache(cx, None).await? {
        Some(cache) => cache.read(&tag).await,
        None => Ok(None),
    }
}

/// Writes through a cache handle it was given, instead of looking the cache up.
#[chia::function]
async fn write_through(cache: chia::cache::Cache, tag: String, value: Vec<u64>) -> Result<bool, chia::Error> {
    cache.write(&tag, &value).await
}

const YAML: &str = "cache:\n  produce:\n    cache: true\n    tags: [\"iter.*\"]\n  untagged_is_fine: true\n  always_fails: true\n";

fn config_file(dir: &std::path::Path) -> std::path::PathBuf {
    let path = dir.join("loop.yaml");
    std::fs::write(&path, YAML).expect("write the YAML");
    path
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_driver_writes_and_reads_typed_values() {
    let (_cluster, cx) = cluster(&["CPU=2"]).await;
    let dir = tempfile::tempdir().unwrap();
    let cache =
        start_cache(&cx, CacheOptions::in_dir(dir.path().join("cache")).size(1.0, "MiB")).await.unwrap();
    assert_eq!(cache.service().node(), "head", "the cache is pinned to the head");
    assert!(cache.write("a", &vec![1u32, 2, 3]).await.unwrap());
    assert!(cache.write("b", &"text".to_string()).await.unwrap());
    assert_eq!(cache.read::<Vec<u32>>("a").await.unwrap(), Some(vec![1, 2, 3]));
    assert_eq!(cache.read::<String>("missing").await.unwrap(), None);
    assert!(cache.has("b").await.unwrap());
    // `a` was read last, so `b` is now the least recently used.
    assert_eq!(cache.keys().await.unwrap(), vec!["b".to_string(), "a".to_string()]);
    assert!(cache.evict("b").await.unwrap());
    assert!(!cache.has("b").await.unwrap());
    assert!(cache.size_bytes().await.unwrap() > 0);
    cache.flush().await.unwrap();
    assert!(cache.keys().await.unwrap().is_empty());
    // Larger than the whole budget: not stored.
    assert!(!cache.write("huge", &chia::Bytes::from(vec![0u8; 2 << 20])).await.unwrap());
    // A wrong type is a decode error, never wrong data.
    cache.write("n", &7u64).await.unwrap();
    assert!(matches!(cache.read::<String>("n").await, Err(chia::Error::Decode { .. })));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cache_is_found_by_name_from_workers_and_other_drivers_and_outlives_its_driver() {
    let (cluster, first) = cluster(&["CPU=2"]).await;
    let dir = tempfile::tempdir().unwrap();
    let cache = start_cache(&first, CacheOptions::in_dir(dir.path()).size(1.0, "MiB")).await.unwrap();
    cache.write("iter0", &vec![5u64, 6]).await.unwrap();
    // Idempotent: a second start returns the running cache.
    let again = start_cache(&first, CacheOptions::in_dir(dir.path()).size(1.0, "MiB")).await.unwrap();
    assert_eq!(again.service().id(), cache.service().id());
    assert_eq!(
        read_from_a_worker::remote(&first, "iter0".to_string()).get().await.unwrap(),
        Some(vec![5, 6])
    );
    first.shutdown().await;

    let second = cluster.driver().await.unwrap();
    let found = get_active_cache(&second, None).await.unwrap().expect("the cache outlives its driver");
    assert_eq!(found.read::<Vec<u64>>("iter0").await.unwrap(), Some(vec![5, 6]));
    assert!(stop_cache(&second, None).await.unwrap());
    assert!(get_active_cache(&second, None).await.unwrap().is_none());
    // A new cache on the same directory warm-starts with the entry.
    let restarted = start_cache(&second, CacheOptions::in_dir(dir.path()).size(1.0, "MiB")).await.unwrap();
    assert_eq!(restarted.read::<Vec<u64>>("iter0").await.unwrap(), Some(vec![5, 6]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rule_setting_the_automatic_writes_do_not_apply_yet_refuses_to_start() {
    let (_cluster, cx) = cluster(&["CPU=1"]).await;
    let dir = tempfile::tempdir().unwrap();
    for (line, field) in
        [("ttl: 7d", "ttl"), ("key: inputs", "key"), ("single_flight: true", "single_flight")]
    {
        let yaml = dir.path().join(format!("{field}.yaml"));
        std::fs::write(&yaml, format!("cache:\n  produce:\n    cache: true\n    {line}\n")).unwrap();
        let options = CacheOptions::in_dir(dir.path().join("c")).size(1.0, "MiB").yaml_path(&yaml);
        match start_cache(&cx, options).await {
            Err(chia::Error::CacheRuleNotApplied { path, function, field: refused }) => {
                assert_eq!((path, function.as_str(), refused), (yaml.clone(), "produce", field));
            }
            other => panic!("{line}: {other:?}"),
        }
    }
    assert!(get_active_cache(&cx, None).await.unwrap().is_none(), "nothing was started");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn results_of_configured_tagged_calls_are_written_automatically() {
    let (_cluster, cx) = cluster(&["CPU=2"]).await;
    let dir = tempfile::tempdir().unwrap();
    let yaml = config_file(dir.path());
    assert!(!is_cached(&cx, "produce", Some("iter0")).await.unwrap(), "no cache running yet");
    let cache =
        start_cache(&cx, CacheOptions::in_dir(dir.path().join("c")).size(1.0, "MiB").yaml_path(&yaml))
            .await
            .unwrap();
    assert!(is_cached(&cx, "produce", Some("iter3")).await.unwrap());
    // The configuration read back is made of types a user names from `chia` alone.
    let config: chia::cache::CacheConfig = cache.get_config().await.unwrap();
    let Some(chia::cache::CacheRule { tags: Some(patterns), .. }) = config.rule("produce") else {
        panic!("{config:?}")
    };
    let patterns: &chia::cache::TagPatterns = patterns;
    assert_eq!(patterns.patterns(), ["iter.*"]);
    assert_eq!(config.rule("untagged_is_fine"), Some(&chia::cache::CacheRule::all()));
    assert!(!is_cached(&cx, "produce", Some("other")).await.unwrap());
    assert!(!is_cached(&cx, "produce", None).await.unwrap());

    assert_eq!(produce::call(1).tag("iter0").remote(&cx).get().await.unwrap(), vec![1; 4]);
    produce::call(2).tag("other").remote(&cx).get().await.unwrap();
    produce::remote(&cx, 3).get().await.unwrap();
    untagged_is_fine::call(4).tag("any-tag").remote(&cx).get().await.unwrap();
    assert!(always_fails::call(5).tag("failed").remote(&cx).get().await.is_err());
    // The driver never asks for this one's value; it is cached all the same.
    let unread = produce::call(6).tag("iter6").remote(&cx);
    let (ready, _) = chia::wait(std::slice::from_ref(&unread), 1, None).await;
    assert_eq!(ready.len(), 1);

    let mut keys = cache.keys().await.unwrap();
    keys.sort();
    assert_eq!(keys, vec!["any-tag".to_string(), "iter0".to_string(), "iter6".to_string()]);
    assert_eq!(cache.read::<Vec<u64>>("iter0").await.unwrap(), Some(vec![1; 4]));
    assert_eq!(cache.read::<Vec<u64>>("iter6").await.unwrap(), Some(vec![6; 4]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn automatic_writes_evict_the_least_recently_used() {
    let (_cluster, cx) = cluster(&["CPU=2"]).await;
    let dir = tempfile::tempdir().unwrap();
    let yaml = config_file(dir.path());
    // Room for two or three entries of this size (each file is about 40 bytes); no fsync needed
    // to test eviction.
    let cache = chia::cache::start_cache(
        &cx,
        chia::cache::CacheOptions::in_dir(dir.path().join("c"))
            .size(100.0, "B")
            .yaml_path(&yaml)
            .durability(chia::cache::Durability::None),
    )
    .await
    .unwrap();
    for i in 0..6 {
        produce::call(i).tag(format!("iter{i}")).remote(&cx).get().await.unwrap();
    }
    let keys = cache.keys().await.unwrap();
    assert!(keys.len() < 6 && !keys.is_empty(), "{keys:?}");
    assert_eq!(keys.last().map(String::as_str), Some("iter5"), "the newest stays: {keys:?}");
    assert!(!keys.contains(&"iter0".to_string()), "the oldest went first: {keys:?}");
    assert!(cache.size_bytes().await.unwrap() <= 100);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_cache_settings_are_clear_errors() {
    let (_cluster, cx) = cluster(&["CPU=2"]).await;
    let dir = tempfile::tempdir().unwrap();
    let error = start_cache(&cx, CacheOptions::in_dir(dir.path()).size(1.0, "parsecs")).await.unwrap_err();
    assert!(
        matches!(&error, chia::Error::Cache(inner) if matches!(**inner, chia::cache::CacheError::UnknownUnits { .. })),
        "{error:?}"
    );
    let error = error.to_string();
    assert!(error.contains("parsecs") && error.contains("GIB"), "{error}");
    let yaml = dir.path().join("bad.yaml");
    std::fs::write(&yaml, "cache:\n  produce:\n    cache: true\n    tags: [\"iter(\"]\n").unwrap();
    let error = start_cache(&cx, CacheOptions::in_dir(dir.path()).size(1.0, "MiB").yaml_path(&yaml))
        .await
        .unwrap_err()
        .to_string();
    assert!(error.contains("produce") && error.contains("iter("), "{error}");

    // Without a size the budget is the documented default, which a second start must match.
    let default_dir = dir.path().join("default");
    start_cache(&cx, CacheOptions::in_dir(&default_dir)).await.unwrap();
    let sized = CacheOptions::in_dir(&default_dir).size(CacheOptions::DEFAULT_SIZE_GIB, "GiB");
    start_cache(&cx, sized).await.expect("the default is 10 GiB");
    match start_cache(&cx, CacheOptions::in_dir(&default_dir).size(1.0, "GiB")).await {
        Err(chia::Error::CacheConflict { running_budget, .. }) => assert_eq!(running_budget, 10 << 30),
        other => panic!("expected a conflict with the default budget, got {other:?}"),
    }
    assert!(stop_cache(&cx, None).await.unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_start_with_another_directory_or_budget_is_an_error_naming_both() {
    let (cluster, cx) = cluster(&["CPU=2"]).await;
    let dir = tempfile::tempdir().unwrap();
    let (first_dir, other_dir) = (dir.path().join("first"), dir.path().join("other"));
    let cache = start_cache(&cx, CacheOptions::in_dir(&first_dir).size(1.0, "MiB")).await.unwrap();
    cache.write("iter0", &1u64).await.unwrap();

    // The same directory (spelt with a trailing slash) and the same budget in other units:
    // the running cache, as before.
    let same_dir = format!("{}/", first_dir.display());
    let again = start_cache(&cx, CacheOptions::in_dir(&same_dir).size(1024.0, "KiB")).await.unwrap();
    assert_eq!(again.service().id(), cache.service().id());
    // A YAML whose rules the running cache does not follow is refused, naming the file.
    let yaml = config_file(dir.path());
    match start_cache(&cx, CacheOptions::in_dir(&first_dir).size(1.0, "MiB").yaml_path(&yaml)).await {
        Err(chia::Error::CacheConfigConflict { path }) => assert_eq!(path, yaml),
        other => panic!("expected CacheConfigConflict, got {:?}", other.map(|cache| cache.service().id())),
    }

    // Another directory, from another driver: an error naming both directories.
    let other_driver = cluster.driver().await.unwrap();
    match start_cache(&other_driver, CacheOptions::in_dir(&other_dir).size(1.0, "MiB")).await {
        Err(chia::Error::CacheConflict { running_dir, running_budget, requested_dir, requested_budget }) => {
            assert_eq!((running_dir, running_budget), (first_dir.clone(), 1 << 20));
            assert_eq!((requested_dir, requested_budget), (other_dir.clone(), 1 << 20));
        }
        other => panic!("expected CacheConflict, got {:?}", other.map(|cache| cache.service().id())),
    }
    let message =
        start_cache(&cx, CacheOptions::in_dir(&other_dir).size(1.0, "MiB")).await.unwrap_err().to_string();
    assert!(
        message
            .contains(&format!("running in {} with a budget of 1048576 bytes (1 MiB)", first_dir.display())),
        "{message}"
    );
    assert!(message.contains(&format!("asked for {} with 1048576 bytes", other_dir.display())), "{message}");
    assert!(!other_dir.exists(), "nothing was created in the directory that was refused");

    // Another budget, same directory: an error naming both budgets.
    let message =
        start_cache(&cx, CacheOptions::in_dir(&first_dir).size(2.0, "MiB")).await.unwrap_err().to_string();
    assert!(message.contains("a budget of 1048576 bytes (1 MiB)"), "{message}");
    assert!(message.contains("with 2097152 bytes (2 MiB)"), "{message}");

    // The running cache is untouched, and once stopped another one starts.
    assert_eq!(cache.read::<u64>("iter0").await.unwrap(), Some(1));
    assert!(stop_cache(&cx, None).await.unwrap());
    let other = start_cache(&cx, CacheOptions::in_dir(&other_dir).size(2.0, "MiB")).await.unwrap();
    assert!(other.write("iter1", &2u64).await.unwrap());
    assert!(other_dir.exists());
}

/// Unix paths are bytes: a cache directory whose name is not UTF-8 is opened under that very
/// name on the head, and starting the cache again with the same path is the running cache,
/// not a conflict between a path and its lossy spelling.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cache_directory_whose_name_is_not_utf8_is_used_as_named() {
    use std::os::unix::ffi::OsStrExt;
    let (_cluster, cx) = cluster(&["CPU=2"]).await;
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join(std::ffi::OsStr::from_bytes(b"cache-\xff\xfe"));
    let cache = start_cache(&cx, CacheOptions::in_dir(&dir).size(1.0, "MiB")).await.expect("the first start");
    cache.write("iter0", &7u64).await.unwrap();
    let again =
        start_cache(&cx, CacheOptions::in_dir(&dir).size(1.0, "MiB")).await.expect("the same path again");
    assert_eq!(again.service().id(), cache.service().id());
    let names: Vec<_> =
        std::fs::read_dir(root.path()).unwrap().map(|entry| entry.unwrap().file_name()).collect();
    assert_eq!(
        names,
        vec![dir.file_name().unwrap().to_owned()],
        "the directory on disk has the name asked for"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cache_handle_passed_to_a_task_writes_to_the_same_cache() {
    let (_cluster, cx) = cluster(&["CPU=2"]).await;
    let dir = tempfile::tempdir().unwrap();
    let cache =
        start_cache(&cx, CacheOptions::in_dir(dir.path().join("cache")).size(1.0, "MiB")).await.unwrap();
    let wrote = write_through::remote(&cx, cache.clone(), "from-a-task".to_string(), vec![7, 8]);
    assert!(wrote.get().await.unwrap());
    assert_eq!(cache.read::<Vec<u64>>("from-a-task").await.unwrap(), Some(vec![7, 8]));
    assert!(stop_cache(&cx, None).await.unwrap());
}

/// Hits and misses, writes and evictions are counted; `evict_matching` removes what its
/// pattern matches in full; `verify` finds an entry damaged behind the cache's back, reports
/// it on a dry run and removes it otherwise. Through the library, then `chia cache`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stats_evict_matching_and_verify_from_the_library_and_the_command_line() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let head = common::HeadProcess::start(&state, &[]);
    let cx = common::driver_of_process(&state).await;
    let store = dir.path().join("store");
    let cache = start_cache(&cx, CacheOptions::in_dir(&store).size(1.0, "MiB")).await.unwrap();
    for tag in ["iter1_a", "iter1_b", "iter2_a"] {
        assert!(cache.write(tag, &tag.len()).await.unwrap());
    }
    assert_eq!(cache.read::<usize>("iter2_a").await.unwrap(), Some(7));
    assert_eq!(cache.read::<usize>("absent").await.unwrap(), None);
    let stats = cache.stats().await.unwrap();
    assert_eq!((stats.entries, stats.writes, stats.hits, stats.misses), (3, 3, 1, 1), "{stats:?}");

    assert_eq!(cache.evict_matching("iter1_.*").await.unwrap(), ["iter1_a", "iter1_b"]);
    assert_eq!(cache.keys().await.unwrap(), ["iter2_a"]);
    assert!(cache.evict_matching("(unclosed").await.is_err(), "an invalid pattern is refused");
    assert_eq!(cache.stats().await.unwrap().evicted_explicitly, 2);

    // Damage the one entry left: flip its last byte (the payload's).
    let file = store.join(chia_cache::entry_file_name("iter2_a"));
    let mut bytes = std::fs::read(&file).unwrap();
    *bytes.last_mut().unwrap() ^= 0xff;
    std::fs::write(&file, &bytes).unwrap();
    let cli = |args: &[&str]| common::chia_cli(&state, args);
    let (ok, out, err) = cli(&["cache", "verify", "--dry-run"]);
    assert!(!ok && out.contains("bad: iter2_a") && out.contains("1 bad, 0 removed"), "{out}{err}");
    assert!(file.exists(), "a dry run removes nothing");
    let (ok, out, err) = cli(&["--json", "cache", "verify"]);
    let report: serde_json::Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}{err}"));
    assert!(!ok && report["removed"] == 1 && report["bad"][0]["tag"] == "iter2_a", "{report}");
    assert!(!file.exists(), "the bad entry is removed");

    cache.write("iter3_a", &1u8).await.unwrap();
    let (ok, out, err) = cli(&["cache", "evict", "--tags", "iter3_.*"]);
    assert!(ok && out.trim() == "evicted 1 entry", "{out}{err}");
    let (ok, out, err) = cli(&["--json", "cache", "stats"]);
    let stats: serde_json::Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}{err}"));
    assert!(ok && stats["entries"] == 0 && stats["writes"] == 4 && stats["dropped_damaged"] == 1, "{stats}");
    drop(head);
}
