//! `setup =` takes a path, not an expression or a string.
extern crate chia_runtime as chia;

#[chia::function(setup = "prepare_tools")]
fn simulate(x: i64) -> i64 {
    x
}

fn main() {}
