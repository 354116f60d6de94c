//! The network layer: framed messages on QUIC streams ([`transport`]) and the cluster's
//! credentials and TLS configuration ([`tls`]), member certificates and their revocation
//! ([`members`]). It knows nothing of tasks.

// What a peer sends must never panic this process: no `unwrap` outside tests (an `expect`
// states the invariant that makes it impossible).
#![cfg_attr(not(test), deny(clippy::unwrap_used))]

pub mod members;
pub mod tls;
pub mod transport;
