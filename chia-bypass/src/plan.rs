//! The bypass decision of one call, without any I/O: which configured function, provider,
//! data file, tag patterns and condition apply, in the order the decision takes them.

use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::BypassConfig;

/// Everything a job's calls need to decide whether they are bypassed: the configuration, the
/// provider and condition each function uses (by the names they are registered under in the
/// binaries), and the service that serves the `data:` files.
///
/// A plan is plain data: the runtime ships it with the job's tasks so that a call made on a
/// worker decides exactly as a call made by the driver.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct BypassPlan {
    /// The `bypass:` section the plan follows.
    pub config: BypassConfig,
    /// Function name → provider name.
    pub providers: BTreeMap<String, String>,
    /// Function name → condition name.
    pub conditions: BTreeMap<String, String>,
    /// The name of the service that serves the configuration's `data:` files, once started.
    pub file_server: Option<String>,
}

/// The configuration's part of a decision, before any condition ran.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict<'a> {
    /// The call runs for real.
    Run(RunReason),
    /// The call is bypassed, if `condition` (when there is one) returns true.
    Bypass {
        /// The registered provider; `None` means the default provider, which serves `data`.
        provider: Option<&'a str>,
        /// The recorded file the default provider serves, from the function's `data:`.
        data: Option<&'a Path>,
        /// The registered condition, which decides last.
        condition: Option<&'a str>,
    },
}

/// Why a call runs for real.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RunReason {
    /// The function is not `bypass: true` (or no configuration is loaded).
    NotBypassed,
    /// `bypass: true`, but neither a provider nor a `data:` path.
    NoProvider,
    /// The function has `tags:` and the call's tag (if any) matches none of them.
    TagNotMatched,
    /// The condition returned false.
    ConditionFalse {
        /// The condition's registered name.
        condition: String,
    },
    /// The condition failed; running for real is always a correct answer.
    ConditionFailed {
        /// The condition's registered name.
        condition: String,
        /// Why it failed.
        message: String,
    },
}

/// How a call was dispatched, as a user may print it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    /// The call runs for real, for this reason.
    Run(RunReason),
    /// Bypassed: `provider` runs on the worker, or the default provider serves `data`.
    Bypassed {
        /// The registered provider; `None`: the default provider.
        provider: Option<String>,
        /// The recorded file the default provider serves.
        data: Option<String>,
    },
}

impl Decision {
    /// Whether the call was bypassed.
    pub fn is_bypassed(&self) -> bool {
        matches!(self, Decision::Bypassed { .. })
    }
}

impl BypassPlan {
    /// A plan of `config` with no provider, condition or file server yet.
    pub fn new(config: BypassConfig) -> BypassPlan {
        BypassPlan { config, ..BypassPlan::default() }
    }

    /// Decides a call to `function` tagged `tag`, up to the condition. The order is the
    /// original's: (1) the function is `bypass: true`, (2) it has a provider or a `data:` path,
    /// (3) with `tags:`, the call's tag matches one of them, and (4) the condition, which the
    /// caller runs last, only for a call that passed the first three.
    pub fn verdict(&self, function: &str, tag: Option<&str>) -> Verdict<'_> {
        let Some(rule) = self.config.rule(function) else { return Verdict::Run(RunReason::NotBypassed) };
        let provider = self.providers.get(function).map(String::as_str);
        if provider.is_none() && rule.data.is_none() {
            return Verdict::Run(RunReason::NoProvider);
        }
        if !rule.admits(tag) {
            return Verdict::Run(RunReason::TagNotMatched);
        }
        Verdict::Bypass {
            provider,
            data: rule.data.as_deref(),
            condition: self.conditions.get(function).map(String::as_str),
        }
    }

    /// Whether the plan bypasses nothing (no function is `bypass: true`).
    pub fn is_empty(&self) -> bool {
        self.config.is_empty()
    }
}

impl fmt::Display for RunReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RunReason::NotBypassed => f.write_str("not bypassed"),
            RunReason::NoProvider => f.write_str("bypass: true but no provider and no data: path"),
            RunReason::TagNotMatched => f.write_str("tag does not match the bypass tags"),
            RunReason::ConditionFalse { condition } => write!(f, "condition {condition} returned false"),
            RunReason::ConditionFailed { condition, message } => {
                write!(f, "condition {condition} failed ({message})")
            }
        }
    }
}

impl fmt::Display for Decision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Decision::Run(reason) => write!(f, "runs ({reason})"),
            Decision::Bypassed { provider: Some(provider), .. } => write!(f, "bypassed by {provider}"),
            Decision::Bypassed { provider: None, data } => {
                write!(f, "bypassed by the file server ({})", data.as_deref().unwrap_or("no data: path"))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(yaml: &str) -> BypassPlan {
        BypassPlan::new(BypassConfig::from_yaml_str(yaml, "test.yaml").unwrap())
    }

    const YAML: &str = r#"
bypass:
  everything: true
  tagged:
    bypass: true
    tags: ["iter[13]_.*"]
  served:
    bypass: true
    data: /recorded/perf.md
  off:
    bypass: false
"#;

    #[test]
    fn a_function_that_is_not_bypassed_runs() {
        let plan = plan(YAML);
        assert_eq!(plan.verdict("off", None), Verdict::Run(RunReason::NotBypassed));
        assert_eq!(plan.verdict("not_listed", Some("iter1_call0")), Verdict::Run(RunReason::NotBypassed));
        assert_eq!(BypassPlan::default().verdict("everything", None), Verdict::Run(RunReason::NotBypassed));
    }

    #[test]
    fn without_provider_or_data_the_call_runs_even_when_its_tag_matches() {
        let plan = plan(YAML);
        assert_eq!(plan.verdict("everything", None), Verdict::Run(RunReason::NoProvider));
        assert_eq!(plan.verdict("tagged", Some("iter1_call0")), Verdict::Run(RunReason::NoProvider));
    }

    #[test]
    fn data_alone_selects_the_default_provider() {
        let plan = plan(YAML);
        assert_eq!(
            plan.verdict("served", Some("any")),
            Verdict::Bypass { provider: None, data: Some(Path::new("/recorded/perf.md")), condition: None }
        );
    }

    #[test]
    fn tags_are_checked_after_the_provider_and_before_the_condition() {
        let mut plan = plan(YAML);
        plan.providers.insert("tagged".into(), "p".into());
        plan.conditions.insert("tagged".into(), "c".into());
        assert_eq!(plan.verdict("tagged", Some("iter0_call0")), Verdict::Run(RunReason::TagNotMatched));
        assert_eq!(plan.verdict("tagged", None), Verdict::Run(RunReason::TagNotMatched));
        assert_eq!(
            plan.verdict("tagged", Some("iter3_call2")),
            Verdict::Bypass { provider: Some("p"), data: None, condition: Some("c") }
        );
    }

    #[test]
    fn a_plan_survives_messagepack() {
        let mut plan = plan(YAML);
        plan.providers.insert("everything".into(), "provider_42".into());
        plan.file_server = Some("files".into());
        let back: BypassPlan = rmp_serde::from_slice(&rmp_serde::to_vec_named(&plan).unwrap()).unwrap();
        assert_eq!(back, plan);
        assert_eq!(
            back.verdict("everything", None),
            Verdict::Bypass { provider: Some("provider_42"), data: None, condition: None }
        );
    }

    #[test]
    fn decisions_read_well() {
        let run = Decision::Run(RunReason::ConditionFalse { condition: "chia.cache_hit".into() });
        assert_eq!(run.to_string(), "runs (condition chia.cache_hit returned false)");
        let served = Decision::Bypassed { provider: None, data: Some("/d.md".into()) };
        assert_eq!(served.to_string(), "bypassed by the file server (/d.md)");
        assert!(served.is_bypassed() && !run.is_bypassed());
    }
}
