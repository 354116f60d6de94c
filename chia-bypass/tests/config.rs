//! The YAML `bypass:` section: the user guide's examples, the configuration's part of the bypass
//! decision, and the errors.

use std::path::Path;

use chia_bypass::{BypassConfig, BypassRule, SectionError, TagPatterns};
use chia_cache::config::section;
use chia_cache::config::yaml_value::YamlValue;

const ORIGIN: &str = "loop.yaml";

/// The user guide's example, plus a disabled function.
const GUIDE: &str = r#"
bypass:
  # Bypass every call to this function.
  simple_add:
    bypass: true
  # Bypass only calls whose _chia_tag matches one of these patterns.
  run_verilator_test:
    bypass: true
    tags: ["iter0_.*"]
  # Shorthand: bypass: true with no extra options.
  simple_multiply: true
  summarize_perf:
    bypass: true
    data: /path/to/recorded_perf.md # served to the worker as a string
  not_this: {bypass: false}
"#;

fn load(yaml: &str) -> BypassConfig {
    BypassConfig::from_yaml_str(yaml, ORIGIN).unwrap_or_else(|error| panic!("{yaml}\n-> {error}"))
}

fn load_error(yaml: &str) -> SectionError {
    match BypassConfig::from_yaml_str(yaml, ORIGIN) {
        Ok(config) => panic!("{yaml}\n-> parsed as {config:?}"),
        Err(error) => error,
    }
}

fn patterns(config: &BypassConfig, function: &str) -> Vec<String> {
    match config.rule(function).map(|rule| &rule.tags) {
        Some(Some(patterns)) => patterns.patterns().to_vec(),
        other => panic!("{function}: expected tag patterns, got {other:?}"),
    }
}

fn names(config: &BypassConfig) -> Vec<&str> {
    config.functions().map(|(name, _)| name).collect()
}

// ---------------------------------------------------------------------------- the guide

#[test]
fn the_guide_example_parses() {
    let config = load(GUIDE);
    assert_eq!(names(&config), ["run_verilator_test", "simple_add", "simple_multiply", "summarize_perf"]);
    assert_eq!(config.rule("simple_add"), Some(&BypassRule::default()));
    assert_eq!(config.rule("simple_multiply"), Some(&BypassRule::default()));
    assert_eq!(patterns(&config, "run_verilator_test"), ["iter0_.*"]);
    let summarize = config.rule("summarize_perf").expect("summarize_perf is bypassed");
    assert_eq!(summarize.tags, None);
    assert_eq!(summarize.data.as_deref(), Some(Path::new("/path/to/recorded_perf.md")));
    assert_eq!(config.rule("not_this"), None);
}

#[test]
fn the_guide_example_decides_as_documented() {
    let config = load(GUIDE);
    // No `tags:`: every call, tagged or not.
    for function in ["simple_add", "simple_multiply", "summarize_perf"] {
        assert!(config.matches(function, None), "{function}");
        assert!(config.matches(function, Some("anything")), "{function}");
    }
    // `tags:`: only tagged calls that match.
    assert!(config.matches("run_verilator_test", Some("iter0_call1")));
    assert!(!config.matches("run_verilator_test", Some("iter1_call1")));
    assert!(!config.matches("run_verilator_test", None));
    // Not listed, or `bypass: false`: runs normally.
    assert!(!config.matches("not_this", None));
    assert!(!config.matches("not_this", Some("iter0_call1")));
    assert!(!config.matches("never_mentioned", None));
}

#[test]
fn data_paths_lists_each_bypassed_functions_file_once() {
    let config = load(
        r#"
bypass:
  a: {bypass: true, data: /rec/a.md}
  b: {bypass: true, data: /rec/a.md}
  c: {bypass: true, data: rec/c.txt}
  off: {bypass: false, data: /etc/passwd}
  none: true
"#,
    );
    let paths: Vec<&Path> = config.data_paths().into_iter().collect();
    assert_eq!(paths, [Path::new("/rec/a.md"), Path::new("rec/c.txt")]);
    assert!(load(GUIDE).data_paths().contains(Path::new("/path/to/recorded_perf.md")));
}

#[test]
fn no_yaml_means_nothing_is_bypassed() {
    let config = BypassConfig::default();
    assert!(config.is_empty());
    assert_eq!(config.len(), 0);
    assert!(!config.matches("simple_add", None));
    assert!(config.data_paths().is_empty());
    for yaml in ["", "# nothing\n", "cache:\n  f: true\n", "bypass:\n", "bypass: {}\n"] {
        assert!(load(yaml).is_empty(), "{yaml:?}");
    }
}

// ---------------------------------------------------------------------------- reading rules

#[test]
fn tags_may_be_one_string_or_a_list() {
    let config = load(
        r#"
bypass:
  one:
    bypass: true
    tags: "iter0_.*"
  many:
    bypass: true
    tags:
      - "iter0_.*"
      - "final"
"#,
    );
    assert_eq!(patterns(&config, "one"), ["iter0_.*"]);
    assert_eq!(patterns(&config, "many"), ["iter0_.*", "final"]);
    assert!(config.matches("one", Some("iter0_x")));
    assert!(config.matches("many", Some("final")));
    assert!(config.matches("many", Some("iter0_3")));
    assert!(!config.matches("many", Some("iter1_3")));
}

#[test]
fn patterns_must_match_the_whole_tag() {
    let config = load(
        "bypass:\n  f:\n    bypass: true\n    tags: ['iter']\n  g:\n    bypass: true\n    tags: 'iter[13]_.*'\n",
    );
    assert!(config.matches("f", Some("iter")));
    assert!(!config.matches("f", Some("iter1")));
    assert!(!config.matches("f", Some("xiter")));
    assert!(config.matches("g", Some("iter1_call0")));
    assert!(config.matches("g", Some("iter3_x")));
    assert!(!config.matches("g", Some("iter2_x")));
    assert!(!config.matches("g", Some("iter1")));
}

#[test]
fn an_empty_tag_list_bypasses_nothing_and_null_tags_bypass_everything() {
    let config =
        load("bypass:\n  none:\n    bypass: true\n    tags: []\n  all:\n    bypass: true\n    tags:\n");
    assert!(!config.matches("none", Some("iter0")));
    assert!(!config.matches("none", None));
    assert!(config.matches("all", None));
    assert!(config.matches("all", Some("iter0")));
}

#[test]
fn disabled_functions_are_omitted_and_their_values_unchecked() {
    let config = load(
        r#"
bypass:
  off_shorthand: false
  off_explicit:
    bypass: false
    tags: ["(unclosed"]
    data: 5
  off_by_default:
    tags: ["x"]
  enabled: true
"#,
    );
    assert_eq!(names(&config), ["enabled"]);
    assert!(!config.matches("off_explicit", Some("x")));
    assert!(!config.matches("off_by_default", Some("x")));
}

#[test]
fn spec_values_of_other_types_are_ignored() {
    let config =
        load("bypass:\n  a_string: \"true\"\n  a_number: 1\n  a_list: [true]\n  a_null:\n  kept: true\n");
    assert_eq!(names(&config), ["kept"]);
}

#[test]
fn yaml_1_1_booleans_read_as_pyyaml_read_them() {
    let config = load("bypass:\n  shorthand: yes\n  nested:\n    bypass: on\n  off: no\n");
    assert!(config.matches("shorthand", None));
    assert!(config.matches("nested", None));
    assert!(!config.matches("off", None));
}

// ---------------------------------------------------------------------------- the example file

#[test]
fn the_bypass_cache_example_file_has_both_sections() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/bypass_cache/bypass_cache.yaml");

    let bypass = BypassConfig::from_file(&path).expect("bypass section");
    assert_eq!(names(&bypass), ["expensive_step"]);
    assert_eq!(patterns(&bypass, "expensive_step"), ["iter[13]_.*"]);
    assert!(bypass.matches("expensive_step", Some("iter1_call0")));
    assert!(bypass.matches("expensive_step", Some("iter3_call2")));
    assert!(!bypass.matches("expensive_step", Some("iter2_call0")));
    assert!(!bypass.matches("expensive_step", None));

    // The same file's `cache:` section, read by its own parser, writes every iteration.
    let cache = chia_cache::CacheConfig::from_file(&path).expect("cache section");
    assert_eq!(cache.len(), 1);
    assert!(cache.is_cached("expensive_step", Some("iter2_call0")));
    assert!(!cache.is_cached("expensive_step", Some("final")));
}

#[test]
fn from_file_uses_the_path_as_origin() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("loop.yaml");
    std::fs::write(&path, "bypass:\n  f:\n    bypass: true\n    tags: ['(']\n").expect("write yaml");
    let error = BypassConfig::from_file(&path).expect_err("invalid pattern");
    assert!(error.to_string().contains(&path.display().to_string()), "{error}");
}

#[test]
fn from_file_resolves_relative_data_paths_against_the_file_directory() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("loop.yaml");
    std::fs::write(
        &path,
        "bypass:\n  rel:\n    bypass: true\n    data: recorded/perf.md\n  abs:\n    bypass: true\n    data: /srv/perf.md\n",
    )
    .expect("write yaml");
    let config = BypassConfig::from_file(&path).expect("loads");
    let data = |function| config.rule(function).and_then(|rule| rule.data.clone());
    assert_eq!(data("rel"), Some(dir.path().join("recorded/perf.md")));
    assert_eq!(data("abs"), Some(std::path::PathBuf::from("/srv/perf.md")));
    // A configuration named by a relative path still yields absolute data paths (the head
    // reading them may run in another directory).
    let here = tempfile::tempdir_in(std::env::current_dir().unwrap()).expect("tempdir here");
    std::fs::write(here.path().join("loop.yaml"), "bypass:\n  rel:\n    bypass: true\n    data: perf.md\n")
        .expect("write yaml");
    let relative = Path::new(here.path().file_name().unwrap()).join("loop.yaml");
    let config = BypassConfig::from_file(&relative).expect("loads");
    let data = config.rule("rel").and_then(|rule| rule.data.clone()).unwrap();
    assert!(data.is_absolute(), "{}", data.display());
    assert_eq!(std::fs::canonicalize(data.parent().unwrap()).unwrap(), here.path().canonicalize().unwrap());
    // From a string there is no directory: the path stays as written.
    let config = load("bypass:\n  rel:\n    bypass: true\n    data: recorded/perf.md\n");
    assert_eq!(config.rule("rel").and_then(|rule| rule.data.clone()), Some("recorded/perf.md".into()));
}

#[test]
fn from_file_names_a_missing_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let error = BypassConfig::from_file(dir.path().join("absent.yaml")).expect_err("missing file");
    assert!(matches!(error, SectionError::Read { .. }), "{error:?}");
    assert!(error.to_string().contains("absent.yaml"), "{error}");
}

// ---------------------------------------------------------------------------- errors

#[test]
fn yaml_that_does_not_parse_names_the_file_and_line() {
    let error = load_error("bypass:\n  f: true\n  g: [unclosed\n");
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
fn an_invalid_pattern_names_the_file_the_function_and_the_pattern() {
    for yaml in [
        "bypass:\n  run_test:\n    bypass: true\n    tags: ['ok', 'iter(']\n",
        // Only valid once wrapped for whole-match anchoring: still rejected.
        "bypass:\n  run_test:\n    bypass: true\n    tags: 'a)|(b'\n",
    ] {
        let error = load_error(yaml);
        let SectionError::InvalidTagPattern { origin, function, pattern, .. } = &error else {
            panic!("expected InvalidTagPattern, got {error:?}");
        };
        assert_eq!((origin.as_str(), function.as_str()), (ORIGIN, "run_test"));
        let message = error.to_string();
        for part in [ORIGIN, "run_test", pattern.as_str()] {
            assert!(message.contains(part), "{message}");
        }
    }
}

#[test]
fn values_of_the_wrong_type_name_the_file_the_function_and_the_key() {
    for (yaml, key) in [
        ("bypass:\n  f:\n    bypass: 1\n", "`bypass:`"),
        ("bypass:\n  f:\n    bypass: 'true'\n", "`bypass:`"),
        ("bypass:\n  f:\n    bypass: true\n    data: 5\n", "`data:`"),
        ("bypass:\n  f:\n    bypass: true\n    data: [a.md]\n", "`data:`"),
        ("bypass:\n  f:\n    bypass: true\n    data: ''\n", "`data:`"),
        ("bypass:\n  f:\n    bypass: true\n    tags: 5\n", "`tags:`"),
        ("bypass:\n  f:\n    bypass: true\n    tags: {a: b}\n", "`tags:`"),
        ("bypass:\n  f:\n    bypass: true\n    tags: ['ok', 5]\n", "tag pattern"),
    ] {
        let error = load_error(yaml);
        assert!(
            matches!(&error, SectionError::Shape { function: Some(function), .. } if function == "f"),
            "{yaml}: {error:?}"
        );
        let message = error.to_string();
        for part in [ORIGIN, "\"f\"", key] {
            assert!(message.contains(part), "{yaml}: {message}");
        }
    }
    let error = load_error("bypass: [f, g]\n");
    assert!(matches!(error, SectionError::Shape { function: None, .. }), "{error:?}");
    assert!(error.to_string().contains("`bypass:` section"), "{error}");
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
    let yaml = "bypass:\n  run_verilator_test:\n    bypass: true\n    tag: [\"iter[13]_.*\"]\n";
    let (found, message) = unknown_field(yaml);
    assert_eq!(found, (Some(4), "run_verilator_test".into(), "tag".into(), Some("tags")));
    assert_eq!(
        message,
        "bypass config loop.yaml, line 4: function \"run_verilator_test\": unknown field `tag:` — did you mean `tags:`?"
    );
    let (found, _) = unknown_field("bypass:\n  f:\n    bypass: true\n    dta: perf.md\n");
    assert_eq!(found, (Some(4), "f".into(), "dta".into(), Some("data")));
}

#[test]
fn a_misspelt_flag_is_an_error_even_though_it_leaves_the_function_off() {
    // Without the check, `bypas: true` reads as a mapping without `bypass:`: bypass silently off.
    let (found, message) = unknown_field("bypass:\n  simple_add:\n    bypas: true\n");
    assert_eq!(found, (Some(3), "simple_add".into(), "bypas".into(), Some("bypass")));
    assert!(message.contains("line 3") && message.ends_with("did you mean `bypass:`?"), "{message}");
    let (found, _) = unknown_field("bypass:\n  f: {bypass: false, tgas: x}\n");
    assert_eq!(found, (Some(2), "f".into(), "tgas".into(), Some("tags")));
}

#[test]
fn a_field_near_no_known_field_lists_the_known_ones() {
    let (found, message) = unknown_field("bypass:\n  f:\n    bypass: true\n    provider: provider_42\n");
    assert_eq!(found, (Some(4), "f".into(), "provider".into(), None));
    assert!(
        message.ends_with("unknown field `provider:` (the known fields are `bypass:`, `tags:`, `data:`)"),
        "{message}"
    );
}

#[test]
fn from_file_names_the_path_and_line_of_a_misspelt_field() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("loop.yaml");
    std::fs::write(&path, "cache:\n  f: true\nbypass:\n  f:\n    bypass: true\n    tag: x\n")
        .expect("write yaml");
    let message = BypassConfig::from_file(&path).expect_err("misspelt field").to_string();
    assert!(message.starts_with(&format!("bypass config {}, line 6:", path.display())), "{message}");
    assert!(message.contains("`tag:` — did you mean `tags:`?"), "{message}");
}

#[test]
fn a_parse_error_names_the_file_in_its_snippet_not_input() {
    let message = load_error("bypass:\n  f: true\n  g: [unclosed\n").to_string();
    assert!(message.contains("--> loop.yaml:3:"), "{message}");
    assert!(!message.contains("<input>"), "{message}");
}

#[test]
fn a_top_level_key_near_bypass_is_a_typo_and_parsing_still_succeeds() {
    let yaml =
        "iterations: 4\nbypas:\n  simple_add: true\ncache:\n  simple_add: true\nBypass: {}\nbypasses: 1\n";
    let document: YamlValue = serde_saphyr::from_str(yaml).expect("YAML");
    let found: Vec<(String, Option<u64>, &str)> = section::section_typos(&document, section::Section::Bypass)
        .into_iter()
        .map(|typo| (typo.found, typo.line, typo.section.key()))
        .collect();
    assert_eq!(
        found,
        [
            ("bypas".to_string(), Some(2), "bypass"),
            ("Bypass".to_string(), Some(6), "bypass"),
            ("bypasses".to_string(), Some(7), "bypass"),
        ]
    );
    // Only a warning: the file loads, and bypasses nothing since `bypass:` is absent.
    assert!(load(yaml).is_empty());
    let document: YamlValue = serde_saphyr::from_str("bypass: {}\ncache: {}\nloop: {}\n").expect("YAML");
    assert!(section::section_typos(&document, section::Section::Bypass).is_empty());
}

#[test]
fn every_yaml_file_of_the_examples_loads_as_before() {
    let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples");
    let files = yaml_files(&examples);
    assert!(!files.is_empty(), "no .yaml under {}", examples.display());
    for path in files {
        BypassConfig::from_file(&path).unwrap_or_else(|error| panic!("{error}"));
    }
}

fn yaml_files(dir: &Path) -> Vec<std::path::PathBuf> {
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

// ---------------------------------------------------------------------------- shipping

#[test]
fn config_round_trips_through_serde() {
    let config = load(GUIDE);
    let bytes = rmp_serde::to_vec_named(&config).expect("encode");
    let decoded: BypassConfig = rmp_serde::from_slice(&bytes).expect("decode");
    assert_eq!(decoded, config);
    assert!(decoded.matches("run_verilator_test", Some("iter0_a")));
    assert!(!decoded.matches("run_verilator_test", Some("iter0")));
    assert_eq!(decoded.data_paths(), config.data_paths());
}

#[test]
fn rules_can_be_built_in_code() {
    let mut config = BypassConfig::new();
    let rule = BypassRule { tags: Some(TagPatterns::new(["iter[13]_.*"]).expect("valid")), data: None };
    assert_eq!(config.insert("f", rule.clone()), None);
    assert!(config.matches("f", Some("iter3_x")));
    assert_eq!(config.insert("f", BypassRule::default()), Some(rule));
    assert!(config.matches("f", None));
}
