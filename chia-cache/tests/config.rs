//! Budgets in units, and the YAML `cache:` section (the original `_load_cache_config` and
//! `is_cached`).

use chia_cache::{CacheConfig, CacheError, CacheRule, TagPatterns, parse_budget};

const ORIGIN: &str = "loop.yaml";

fn load(yaml: &str) -> CacheConfig {
    CacheConfig::from_yaml_str(yaml, ORIGIN).unwrap_or_else(|error| panic!("{yaml}\n-> {error}"))
}

fn load_error(yaml: &str) -> CacheError {
    match CacheConfig::from_yaml_str(yaml, ORIGIN) {
        Ok(config) => panic!("{yaml}\n-> parsed as {config:?}"),
        Err(error) => error,
    }
}

fn patterns(config: &CacheConfig, function: &str) -> Vec<String> {
    match config.rule(function) {
        Some(CacheRule::Tags(patterns)) => patterns.patterns().to_vec(),
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
    assert_eq!(config.rule("build_megaboom"), Some(&CacheRule::All));
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
        CacheError::InvalidTagPattern { origin, function, pattern, .. } => {
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
    assert!(matches!(error, CacheError::InvalidTagPattern { .. }), "{error:?}");
}

#[test]
fn yaml_that_does_not_parse_names_the_file_and_line() {
    let error = load_error("cache:\n  f: true\n  g: [unclosed\n");
    match &error {
        CacheError::ConfigParse { origin, line, .. } => {
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
            matches!(&error, CacheError::ConfigShape { function: Some(function), .. } if function == "f"),
            "{yaml}: {error:?}"
        );
        assert!(error.to_string().contains("\"f\""), "{error}");
    }
    let error = load_error("cache: [f, g]\n");
    assert!(matches!(error, CacheError::ConfigShape { function: None, .. }), "{error:?}");
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
    assert!(matches!(error, CacheError::ConfigRead { .. }), "{error:?}");
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
    config.insert("f", CacheRule::Tags(TagPatterns::new(["ok"]).expect("valid")));
    let mut bytes = rmp_serde::to_vec_named(&config).expect("encode");
    // Turn the pattern "ok" into "o(" on the wire.
    let at = bytes.windows(2).position(|window| window == b"ok").expect("pattern bytes");
    bytes[at + 1] = b'(';
    let error = rmp_serde::from_slice::<CacheConfig>(&bytes).expect_err("invalid pattern");
    assert!(error.to_string().contains("o("), "{error}");
}
