//! `chia-bypass` will own bypass configuration and providers (issue 4). It is empty until then.
