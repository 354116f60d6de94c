//! The runtime's internal modules are not reachable from a user crate: the head, the scheduler,
//! the transport, the client, credentials, the registry and the wire protocol are not API.
extern crate chia_runtime as chia;

use chia::head::HeadOptions;
use chia::scheduler::Scheduler;
use chia::transport::FrameSender;
use chia::client::Client;
use chia::tls::ClusterCredentials;
use chia::registry::FunctionSpec;
use chia::core::protocol::PeerToHead;
use chia::api::Context;

fn main() {}
