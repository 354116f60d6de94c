//! `chia-bypass` owns chia's bypass: replacing a function's computation with pre-recorded data
//! while the call is still dispatched with its usual resources. It holds what needs no network
//! and no runtime:
//!
//! - [`BypassConfig`]: the `bypass:` section of the bypass/cache YAML, which says which
//!   functions are bypassed, for which call tags, and which recorded file (`data:`) to serve.
//! - [`BypassPlan`]: the configuration plus the providers and conditions registered for the
//!   job, and [`BypassPlan::verdict`], the decision for one call in the original's order.
//!
//! The runtime (`chia::bypass`) runs the decision at dispatch, the providers on workers and the
//! head-pinned file server.
//!
//! ```
//! use chia_bypass::BypassConfig;
//!
//! # fn main() -> Result<(), chia_bypass::SectionError> {
//! let config = BypassConfig::from_yaml_str(
//!     r#"
//! bypass:
//!   simple_add: true
//!   run_verilator_test:
//!     bypass: true
//!     tags: ["iter0_.*"]
//!   summarize_perf:
//!     bypass: true
//!     data: /path/to/recorded_perf.md
//! "#,
//!     "loop.yaml",
//! )?;
//!
//! assert!(config.matches("simple_add", None));
//! assert!(config.matches("run_verilator_test", Some("iter0_call3")));
//! assert!(!config.matches("run_verilator_test", Some("iter1_call3")));
//! assert!(!config.matches("not_listed", Some("iter0_call3")));
//! assert_eq!(config.data_paths().len(), 1);
//!
//! // No YAML at all: bypass is a no-op.
//! assert!(BypassConfig::default().is_empty());
//! # Ok(())
//! # }
//! ```

pub mod config;
pub mod plan;

/// Why the `bypass:` section could not be loaded: the error the `cache:` section has too.
pub use chia_cache::SectionError;
pub use chia_cache::TagPatterns;
pub use config::{BypassConfig, BypassRule};
pub use plan::{BypassPlan, Decision, RunReason, Verdict};
