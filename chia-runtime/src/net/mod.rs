//! The network layer: framed messages on QUIC streams ([`transport`]) and the cluster's
//! credentials and TLS configuration ([`tls`]). It knows nothing of tasks.

pub mod tls;
pub mod transport;
