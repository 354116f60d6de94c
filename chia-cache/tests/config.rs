//! Budgets in units, and the YAML `cache:` section (the original `_load_cache_config` and
//! `is_cached`).

use chia_cache::config::section;
use chia_cache::config::yaml_value::YamlValue;
use std::time::Duration;

use chia_cache::{CacheConfig, CacheError, CacheRule, KeyFrom, SectionError, TagPatterns, parse_budget};

const ORIGIN: &str = "loop.yaml";

fn load(yaml: &str) -> CacheConfig {
    CacheConfig::from_yaml_str(yaml, ORIGIN).unwrap_or_else(|error| panic!("{yaml}\n-> {error}"))
}

fn load_error(yaml: &str) -> SectionError {
    match CacheConfig::from_yaml_str(yaml, ORIGIN) {
        Ok(config) => panic!("{yaml}\n-> parsed as {config:?}"),
        Err(error) => error,
    }
}

fn patterns(config: &CacheConfig, function: &str) -> Vec<String> {
    match config.rule(function).map(|rule| &rule.tags) {
        Some(Some(patterns)) => patterns.patterns().to_vec(),
        other => panic!("{function}: expected tag patterns, got {other:?}"),
    }
}

// ---------------------------------------------------------------------------- units

#[test]
fn every_unit_is_a_power_of_1024_in_any_case() {
    let cases = [
        ("B", 1u64),
        ("kb", 1 << 10),
        ("KiB", 1 << 10),
        ("MB", 1 << 20),
        ("mib", 1 << 20),
        ("Gb", 1 << 30),
        ("GIB", 1 << 30),
        ("TB", 1 << 40),
        ("tib", 1 << 40),
    ];
    for (units, bytes) in cases {
        assert_eq!(parse_budget(3.0, units).expect(units), 3 * bytes, "{units}");
    }
}

#[test]
fn fractional_sizes_truncate_like_python_int() {
    assert_eq!(parse_budget(1.5, "KB").expect("1.5 KB"), 1536);
    assert_eq!(parse_budget(0.0001, "KB").expect("tiny"), 0);
    assert_eq!(parse_budget(10.9, "B").expect("10.9 B"), 10);
    assert_eq!(parse_budget(0.0, "GB").expect("zero"), 0);
}

#[test]
fn unknown_units_list_the_sorted_choices() {
    let error = parse_budget(4.0, "GBs").expect_err("unknown units");
    assert!(matches!(&error, CacheError::UnknownUnits { units, .. } if units == "GBs"), "{error:?}");
    assert_eq!(
        error.to_string(),
        r#"unknown units "GBs"; choose from ["B", "GB", "GIB", "KB", "KIB", "MB", "MIB", "TB", "TIB"]"#
    );
}

#[test]
fn negative_nan_infinite_and_overflowing_sizes_are_errors() {
    for size in [-1.0, -0.5, f64::NAN, f64::INFINITY, f64::NEG_INFINITY] {
        let error = parse_budget(size, "MB").expect_err("invalid size");
        assert!(matches!(error, CacheError::InvalidSize { .. }), "{size}: {error:?}");
        assert!(error.to_string().contains("finite number >= 0"), "{error}");
    }
    let error = parse_budget(1e9, "TB").expect_err("overflow");
    assert!(matches!(error, CacheError::SizeOverflow { .. }), "{error:?}");
}

// ---------------------------------------------------------------------------- YAML

#[test]
fn the_documented_example_parses() {
    let config = load(
        r#"
cache:
  run_verilator_test:
    cache: true
    tags: ["iter.*"] # optional; mirror bypass tag patterns
  # shorthand (cache, no tags):
  build_megaboom: true
"#,
    );
    assert_eq!(config.len(), 2);
    assert_eq!(config.rule("build_megaboom"), Some(&CacheRule::all()));
    assert_eq!(patterns(&config, "run_verilator_test"), ["iter.*"]);
}

#[test]
fn tags_may_be_one_string_or_a_list() {
    let config = load(
        r#"
cache:
  one:
    cache: true
    tags: "iter0_.*"
  many:
    cache: true
    tags:
      - "iter0_.*"
      - "final"
"#,
    );
    assert_eq!(patterns(&config, "one"), ["iter0_.*"]);
    assert_eq!(patterns(&config, "many"), ["iter0_.*", "final"]);
    assert!(config.is_cached("many", Some("final")));
    assert!(config.is_cached("many", Some("iter0_3")));
    assert!(!config.is_cached("many", Some("iter1_3")));
}

#[test]
fn disabled_and_absent_functions_are_omitted() {
    let config = load(
        r#"
cache:
  off_shorthand: false
  off_explicit:
    cache: false
    tags: ["(unclosed"]
  off_by_default:
    tags: ["x"]
  enabled: true
"#,
    );
    assert_eq!(config.functions().map(|(name, _)| name).collect::<Vec<_>>(), ["enabled"]);
    assert!(!config.is_cached("off_shorthand", Some("x")));
    assert!(!config.is_cached("off_by_default", Some("x")));
    assert!(!config.is_cached("never_mentioned", None));
}

#[test]
fn spec_values_of_other_types_are_ignored_as_in_the_original() {
    let config = load(
        r#"
cache:
  a_string: "true"
  a_number: 1
  a_list: [true]
  a_null:
  kept: true
"#,
    );
    assert_eq!(config.functions().map(|(name, _)| name).collect::<Vec<_>>(), ["kept"]);
}

#[test]
fn yaml_1_1_booleans_read_as_pyyaml_read_them() {
    let config = load("cache:\n  shorthand: yes\n  nested:\n    cache: on\n  off: no\n");
    assert!(config.is_cached("shorthand", None));
    assert!(config.is_cached("nested", None));
    assert!(!config.is_cached("off", None));
}

#[test]
fn is_cached_follows_the_original() {
    let config = load(
        "cache:\n  all: true\n  tagged:\n    cache: true\n    tags: ['iter.*']\n  none:\n    cache: true\n    tags: []\n",
    );
    // No tag patterns: every call, tagged or not.
    assert!(config.is_cached("all", None));
    assert!(config.is_cached("all", Some("anything")));
    // Tag patterns: only tagged calls that match.
    assert!(!config.is_cached("tagged", None));
    assert!(config.is_cached("tagged", Some("iter0")));
    assert!(!config.is_cached("tagged", Some("final")));
    // An empty list matches nothing (the original's `if not spec`).
    assert!(!config.is_cached("none", Some("iter0")));
    assert!(!config.is_cached("none", None));
}

#[test]
fn patterns_must_match_the_whole_tag() {
    let config = load("cache:\n  f:\n    cache: true\n    tags: ['iter\\d', 'a|b']\n");
    assert!(config.is_cached("f", Some("iter3")));
    assert!(!config.is_cached("f", Some("iter3x")));
    assert!(!config.is_cached("f", Some("xiter3")));
    assert!(!config.is_cached("f", Some("iter3\n")));
    // The alternation is grouped before anchoring: "ab" is neither "a" nor "b".
    assert!(config.is_cached("f", Some("a")));
    assert!(config.is_cached("f", Some("b")));
    assert!(!config.is_cached("f", Some("ab")));
}

#[test]
fn an_invalid_pattern_names_the_file_the_function_and_the_pattern() {
    let error = load_error("cache:\n  run_test:\n    cache: true\n    tags: ['ok', 'iter(']\n");
    match &error {
        SectionError::InvalidTagPattern { origin, function, pattern, .. } => {
            assert_eq!((origin.as_str(), function.as_str(), pattern.as_str()), (ORIGIN, "run_test", "iter("));
        }
        other => panic!("expected InvalidTagPattern, got {other:?}"),
    }
    let message = error.to_string();
    for part in [ORIGIN, "run_test", "iter("] {
        assert!(message.contains(part), "{message}");
    }
}

#[test]
fn a_pattern_that_only_parses_once_wrapped_is_still_invalid() {
    let error = load_error("cache:\n  f:\n    cache: true\n    tags: ['a)|(b']\n");
    assert!(matches!(error, SectionError::InvalidTagPattern { .. }), "{error:?}");
}

#[test]
fn yaml_that_does_not_parse_names_the_file_and_line() {
    let error = load_error("cache:\n  f: true\n  g: [unclosed\n");
    match &error {
        SectionError::Parse { origin, line, .. } => {
            assert_eq!(origin, ORIGIN);
            assert_eq!(*line, Some(3), "{error}");
        }
        other => panic!("expected ConfigParse, got {other:?}"),
    }
    let message = error.to_string();
    assert!(message.contains(ORIGIN) && message.contains("line 3"), "{message}");
}

#[test]
fn values_of_the_wrong_type_name_the_function() {
    for yaml in [
        "cache:\n  f:\n    cache: 1\n",
        "cache:\n  f:\n    cache: true\n    tags: 5\n",
        "cache:\n  f:\n    cache: true\n    tags: ['ok', 5]\n",
    ] {
        let error = load_error(yaml);
        assert!(
            matches!(&error, SectionError::Shape { function: Some(function), .. } if function == "f"),
            "{yaml}: {error:?}"
        );
        assert!(error.to_string().contains("\"f\""), "{error}");
    }
    let error = load_error("cache: [f, g]\n");
    assert!(matches!(error, SectionError::Shape { function: None, .. }), "{error:?}");
}

#[test]
fn other_sections_are_ignored_and_missing_or_empty_sections_mean_nothing_is_cached() {
    let config = load(
        "bypass:\n  simple_add: true\n  summarize:\n    bypass: true\n    data: /tmp/x.md\ncache:\n  f: true\n",
    );
    assert_eq!(config.len(), 1);
    for yaml in ["", "# nothing\n", "bypass:\n  f: true\n", "cache:\n", "cache: {}\n"] {
        assert!(load(yaml).is_empty(), "{yaml:?}");
    }
}

#[test]
fn from_file_names_a_missing_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("absent.yaml");
    let error = CacheConfig::from_file(&path).expect_err("missing file");
    assert!(matches!(error, SectionError::Read { .. }), "{error:?}");
    assert!(error.to_string().contains("absent.yaml"), "{error}");
}

#[test]
fn from_file_uses_the_path_as_origin() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("loop.yaml");
    std::fs::write(&path, "cache:\n  f:\n    cache: true\n    tags: ['(']\n").expect("write yaml");
    let error = CacheConfig::from_file(&path).expect_err("invalid pattern");
    assert!(error.to_string().contains(&path.display().to_string()), "{error}");

    std::fs::write(&path, "cache:\n  f: true\n").expect("write yaml");
    assert!(CacheConfig::from_file(&path).expect("valid").is_cached("f", None));
}

#[test]
fn config_round_trips_through_serde_as_pattern_strings() {
    let config = load("cache:\n  all: true\n  tagged:\n    cache: true\n    tags: ['iter.*', 'final']\n");
    let bytes = rmp_serde::to_vec_named(&config).expect("encode");
    let decoded: CacheConfig = rmp_serde::from_slice(&bytes).expect("decode");
    assert_eq!(decoded, config);
    assert!(decoded.is_cached("tagged", Some("iter9")));
    assert!(!decoded.is_cached("tagged", Some("finale")));
}

#[test]
fn deserializing_an_invalid_pattern_fails() {
    let mut config = CacheConfig::new();
    config.insert("f", CacheRule::tagged(TagPatterns::new(["ok"]).expect("valid")));
    let mut bytes = rmp_serde::to_vec_named(&config).expect("encode");
    // Turn the pattern "ok" into "o(" on the wire.
    let at = bytes.windows(2).position(|window| window == b"ok").expect("pattern bytes");
    bytes[at + 1] = b'(';
    let error = rmp_serde::from_slice::<CacheConfig>(&bytes).expect_err("invalid pattern");
    assert!(error.to_string().contains("o("), "{error}");
}

// ---------------------------------------------------------------------------- ttl, key, single flight

#[test]
fn ttl_key_and_single_flight_are_read_per_function() {
    let config = load(
        r#"
cache:
  weekly:
    cache: true
    tags: ["iter.*"]
    ttl: 7d
  by_inputs:
    cache: true
    key: inputs
    single_flight: yes
  seconds:
    cache: true
    ttl: 90
  fractional:
    cache: true
    ttl: "1.5h"
  explicit_defaults:
    cache: true
    key: tag
    single_flight: false
    ttl: ~
  shorthand: true
"#,
    );
    let rule = |function: &str| config.rule(function).unwrap_or_else(|| panic!("{function}")).clone();
    assert_eq!(rule("weekly").ttl, Some(Duration::from_secs(7 * 86_400)));
    assert_eq!(patterns(&config, "weekly"), ["iter.*"]);
    assert_eq!(rule("by_inputs"), CacheRule::all().with_key(KeyFrom::Inputs).with_single_flight(true));
    assert_eq!(rule("seconds").ttl, Some(Duration::from_secs(90)));
    assert_eq!(rule("fractional").ttl, Some(Duration::from_secs(5400)));
    assert_eq!(rule("explicit_defaults"), CacheRule::all());
    assert_eq!(rule("shorthand"), CacheRule::all());
    assert_eq!(rule("shorthand").key, KeyFrom::Tag);
    assert!(!rule("shorthand").single_flight);
    assert_eq!(rule("weekly").write_options().ttl, Some(Duration::from_secs(7 * 86_400)));
    assert_eq!(rule("shorthand").write_options().ttl, None);
}

#[test]
fn an_input_key_caches_untagged_calls_that_tags_do_not_exclude() {
    let config = load(
        "cache:
  f:
    cache: true
    key: inputs
  g:
    cache: true
    key: inputs
    tags: ['iter.*']
  h:
    cache: true
    tags: ['iter.*']
",
    );
    // No tag needed for a key from the inputs; a tag, if any, must still match `tags:`.
    assert!(config.is_cached("f", None));
    assert!(config.is_cached("g", None));
    assert!(config.is_cached("g", Some("iter3")));
    assert!(!config.is_cached("g", Some("final")));
    // Keyed by tag, an untagged call has no key.
    assert!(!config.is_cached("h", None));
}

#[test]
fn bad_ttl_key_and_single_flight_values_name_the_function() {
    for (yaml, expected) in [
        ("ttl: 7w", "invalid duration \"7w\""),
        ("ttl: 0", "longer than zero"),
        ("ttl: 0s", "longer than zero"),
        ("ttl: -5", "positive number of seconds"),
        ("ttl: [1]", "`ttl:` must be a duration"),
        ("ttl: true", "`ttl:` must be a duration"),
        ("key: input", "`key:` must be `tag` or `inputs`, not \"input\" — did you mean `inputs`?"),
        ("key: name", "`key:` must be `tag` or `inputs`, not \"name\""),
        ("key: 1", "`key:` must be `tag` or `inputs`, not a number (1)"),
        ("single_flight: 1", "`single_flight:` must be true or false, not a number (1)"),
    ] {
        let error = load_error(&format!("cache:\n  run:\n    cache: true\n    {yaml}\n"));
        assert!(
            matches!(&error, SectionError::Shape { function: Some(function), .. } if function == "run"),
            "{yaml}: {error:?}"
        );
        let message = error.to_string();
        assert!(message.starts_with("cache config loop.yaml: function \"run\": "), "{message}");
        assert!(message.contains(expected), "{yaml}: {message}");
    }
}

#[test]
fn misspelt_new_fields_are_errors_with_the_closest_known_field() {
    for (field, suggestion) in [
        ("tll", "ttl"),
        ("keys", "key"),
        ("single_fligth", "single_flight"),
        ("singleflight", "single_flight"),
    ] {
        let (found, message) = unknown_field(&format!("cache:\n  f:\n    cache: true\n    {field}: x\n"));
        assert_eq!(found, (Some(4), "f".into(), field.into(), Some(suggestion)), "{message}");
    }
}

#[test]
fn the_new_settings_round_trip_through_serde() {
    let config = load(
        "cache:\n  f:\n    cache: true\n    tags: [a]\n    ttl: 12h\n    key: inputs\n    single_flight: true\n  g: true\n",
    );
    let bytes = rmp_serde::to_vec_named(&config).expect("encode");
    let decoded: CacheConfig = rmp_serde::from_slice(&bytes).expect("decode");
    assert_eq!(decoded, config);
    let rule = decoded.rule("f").expect("f");
    assert_eq!(
        (rule.ttl, rule.key, rule.single_flight),
        (Some(Duration::from_secs(43_200)), KeyFrom::Inputs, true)
    );
}

// ---------------------------------------------------------------------------- strictness

/// What an unknown-field error says: line, function, field and suggestion.
type UnknownField = (Option<u64>, String, String, Option<&'static str>);

/// The unknown-field error of `yaml`, and its message.
fn unknown_field(yaml: &str) -> (UnknownField, String) {
    let error = load_error(yaml);
    let message = error.to_string();
    match error {
        SectionError::UnknownField { origin, line, function, field, suggestion, .. } => {
            assert_eq!(origin, ORIGIN);
            ((line, function, field, suggestion), message)
        }
        other => panic!("{yaml}\n-> expected UnknownField, got {other:?}"),
    }
}

#[test]
fn a_misspelt_field_is_an_error_naming_the_file_the_line_and_the_closest_field() {
    let yaml = "# loop settings\ncache:\n  run_verilator_test:\n    cache: true\n    tag: [\"iter.*\"]\n";
    let (found, message) = unknown_field(yaml);
    assert_eq!(found, (Some(5), "run_verilator_test".into(), "tag".into(), Some("tags")));
    assert_eq!(
        message,
        "cache config loop.yaml, line 5: function \"run_verilator_test\": unknown field `tag:` — did you mean `tags:`?"
    );
}

#[test]
fn a_misspelt_flag_is_an_error_even_though_it_leaves_the_function_off() {
    // Without the check, `cahce: true` reads as a mapping without `cache:`: silently off.
    let (found, message) = unknown_field("cache:\n  f:\n    cahce: true\n");
    assert_eq!(found, (Some(3), "f".into(), "cahce".into(), Some("cache")));
    assert!(message.contains("line 3") && message.contains("did you mean `cache:`?"), "{message}");
    let (found, _) = unknown_field("cache:\n  f: {cache: false, Tags: x}\n");
    assert_eq!(found, (Some(2), "f".into(), "Tags".into(), Some("tags")));
}

#[test]
fn a_field_near_no_known_field_lists_the_known_ones() {
    let (found, message) = unknown_field("cache:\n  f:\n    cache: true\n    data: perf.md\n");
    assert_eq!(found, (Some(4), "f".into(), "data".into(), None));
    assert!(
        message.ends_with(
            "unknown field `data:` (the known fields are `cache:`, `tags:`, `ttl:`, `key:`, `single_flight:`)"
        ),
        "{message}"
    );
    // A key that is not a name is unknown too, and shown as written.
    let (found, _) = unknown_field("cache:\n  f:\n    cache: true\n    3: x\n");
    assert_eq!(found, (Some(4), "f".into(), "3".into(), None));
}

#[test]
fn from_file_names_the_path_and_line_of_a_misspelt_field() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("loop.yaml");
    std::fs::write(&path, "cache:\n  f:\n    cache: true\n    tgas: ['iter.*']\n").expect("write yaml");
    let message = CacheConfig::from_file(&path).expect_err("misspelt field").to_string();
    assert!(message.starts_with(&format!("cache config {}, line 4:", path.display())), "{message}");
    assert!(message.contains("`tgas:` — did you mean `tags:`?"), "{message}");
}

#[test]
fn a_parse_error_names_the_file_in_its_snippet_not_input() {
    let message = load_error("cache:\n  f: true\n  g: [unclosed\n").to_string();
    assert!(message.contains("--> loop.yaml:3:"), "{message}");
    assert!(!message.contains("<input>"), "{message}");
}

#[test]
fn a_top_level_key_near_cache_is_a_typo_and_other_sections_are_not() {
    let document = |yaml: &str| -> YamlValue { serde_saphyr::from_str(yaml).expect("YAML") };
    let yaml = "iterations: 4\ncahce:\n  f: true\nbypass:\n  f: true\nCache: {}\ncaches: 1\ncatch: 2\n";
    let found: Vec<(String, Option<u64>, &str)> =
        section::section_typos(&document(yaml), section::Section::Cache)
            .into_iter()
            .map(|typo| (typo.found, typo.line, typo.section.key()))
            .collect();
    assert_eq!(
        found,
        [
            ("cahce".to_string(), Some(2), "cache"),
            ("Cache".to_string(), Some(6), "cache"),
            ("caches".to_string(), Some(7), "cache"),
            ("catch".to_string(), Some(8), "cache"),
        ]
    );
    // The section itself, and sections more than two edits away, are not typos.
    assert!(
        section::section_typos(
            &document("cache: {}\nbypass: {}\nloop: {}\nchase: 1\n"),
            section::Section::Cache
        )
        .is_empty()
    );
    // A misspelt section is only warned about: the file still loads (with nothing cached).
    assert!(load(yaml).is_empty());
    assert_eq!(load("cahce:\n  f: true\ncache:\n  g: true\n").rule("g"), Some(&CacheRule::all()));
}

#[test]
fn a_misspelt_top_level_section_is_logged_as_a_warning_with_the_suggestion() {
    let logged = capture_logs(|| {
        assert!(load("bypass:\n  f: true\nchache:\n  f: true\n").is_empty());
    });
    assert!(logged.contains("WARN"), "{logged}");
    assert!(
        logged.contains("loop.yaml, line 3: top-level key `chache:` is not read — did you mean `cache:`?"),
        "{logged}"
    );
    // Each section warns about its own name only: `bypass:` is no typo of `cache:`.
    assert!(!logged.contains("`bypass:` is not read"), "{logged}");
}

#[test]
fn every_yaml_file_of_the_examples_loads_as_before() {
    let examples = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples");
    let files = yaml_files(&examples);
    assert!(!files.is_empty(), "no .yaml under {}", examples.display());
    for path in files {
        let config = CacheConfig::from_file(&path).unwrap_or_else(|error| panic!("{error}"));
        if path.ends_with("bypass_cache/bypass_cache.yaml") {
            assert_eq!(patterns(&config, "expensive_step"), ["iter.*"]);
        }
    }
}

fn yaml_files(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir(dir).expect("read examples") {
        let path = entry.expect("directory entry").path();
        if path.is_dir() {
            found.extend(yaml_files(&path));
        } else if path.extension().is_some_and(|extension| extension == "yaml" || extension == "yml") {
            found.push(path);
        }
    }
    found
}

/// What `body` logs, as the `fmt` subscriber prints it.
fn capture_logs(body: impl Fn()) -> String {
    // Another test thread may meet the same log line first, with no subscriber, and cache
    // that nobody listens to it, even while this one asks again: a few tries.
    for _ in 0..5 {
        let buffer = std::sync::Arc::new(std::sync::Mutex::new(Vec::<u8>::new()));
        let writer = buffer.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_ansi(false)
            .with_writer(move || SharedWriter(writer.clone()))
            .finish();
        tracing::subscriber::with_default(subscriber, || {
            tracing::callsite::rebuild_interest_cache();
            body()
        });
        let bytes = buffer.lock().expect("log buffer").clone();
        if !bytes.is_empty() {
            return String::from_utf8(bytes).expect("UTF-8 logs");
        }
    }
    String::new()
}

struct SharedWriter(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for SharedWriter {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0.lock().expect("log buffer").extend_from_slice(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}
