//! What identifies a remote function across processes.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::fmt;

/// A remote function as the cluster knows it: its stable name and a hash of its signature.
/// Two binaries agree on a function only when both parts are equal, so a driver never sends
/// arguments that a worker would decode as something else.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct FunctionKey {
    /// The registered name (the function's, or `name = ".."` of its attribute).
    pub name: String,
    /// [`signature_hash`] of its normalised signature.
    pub sig_hash: String,
}

impl FunctionKey {
    /// The key of the function `name` with signature hash `sig_hash`.
    pub fn new(name: impl Into<String>, sig_hash: impl Into<String>) -> FunctionKey {
        FunctionKey { name: name.into(), sig_hash: sig_hash.into() }
    }
}

impl fmt::Display for FunctionKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} (signature {})", self.name, self.sig_hash)
    }
}

/// The first 16 hex digits of SHA-256 over a normalised signature text such as
/// `simple_add(i64,i64)->i64`. The attribute macro computes it at compile time from the
/// tokens of the signature, so it changes exactly when the argument or result types do.
///
/// ```
/// let a = chia_core::signature_hash("f(i64)->i64");
/// assert_eq!(a.len(), 16);
/// assert_ne!(a, chia_core::signature_hash("f(u64)->i64"));
/// ```
pub fn signature_hash(signature: &str) -> String {
    let digest = Sha256::digest(signature.as_bytes());
    digest[..8].iter().map(|b| format!("{b:02x}")).collect()
}
