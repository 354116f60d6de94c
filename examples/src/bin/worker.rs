//! A worker with the examples' functions linked in: it joins a cluster and runs them (and
//! hosts their services) until Ctrl-C or SIGTERM. The command line is
//! [`chia::worker_main`]'s (`--help` lists it), e.g. on a worker machine with the head's
//! cluster file:
//!
//! ```sh
//! cargo run --release -p examples --bin worker -- --cluster-file cluster.yaml --resources adder=4,cpu=2
//! ```
//!
//! `cargo xtask cluster-local` starts this binary as its workers.
fn main() -> std::process::ExitCode {
    examples::link();
    chia::worker_main()
}
