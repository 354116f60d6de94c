//! The network layer: framed messages on QUIC streams ([`transport`]) and the cluster's
//! credentials and TLS configuration ([`tls`]), member certificates and their revocation
//! ([`members`]). It knows nothing of tasks.

pub mod members;
pub mod tls;
pub mod transport;
