//! A hook path that names nothing is reported at the path.
extern crate chia_runtime as chia;

fn prepare_tools(_attempt: &chia::hooks::Attempt) {}

#[chia::function(setup = prepare_tool, cleanup = tools::remove_scratch)]
fn simulate(x: i64) -> i64 {
    x
}

fn main() {
    prepare_tools;
}
