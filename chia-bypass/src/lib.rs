//! `chia-bypass` owns chia's bypass: replacing a function's computation with pre-recorded data
//! while the call is still dispatched with its usual resources. For now it holds the
//! configuration, with no network and no dependency on the runtime:
//!
//! - [`BypassConfig`]: the `bypass:` section of the bypass/cache YAML, which says which
//!   functions are bypassed, for which call tags, and which recorded file (`data:`) to serve.
//!
//! Providers (the worker-side replacement functions and conditions) and the runtime
//! integration (the bypass decision at dispatch, the head-pinned file server) come next.
//!
//! ```
//! use chia_bypass::BypassConfig;
//!
//! # fn main() -> Result<(), chia_bypass::BypassError> {
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
mod error;

pub use chia_cache::TagPatterns;
pub use config::{BypassConfig, BypassRule};
pub use error::BypassError;
