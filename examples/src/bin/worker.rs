//! A worker with the examples' functions linked in.
fn main() -> std::process::ExitCode {
    examples::link();
    chia::worker_main()
}
