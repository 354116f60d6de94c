//! `chia-cache` will own the persistent, head-pinned result cache (issue 3). It is empty until then.
