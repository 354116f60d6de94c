//! Hooks whose signature is not a hook's are reported at their path in the attribute.
extern crate chia_runtime as chia;

use chia::hooks::{Attempt, Ended};

/// Takes the wrong argument.
fn wants_a_number(_x: i32) {}

/// A cleanup hook takes the attempt and how it ended.
fn cleanup_without_ended(_attempt: &Attempt) {}

/// Returns neither `()` nor `Result<(), E>`.
fn returns_a_number(_attempt: &Attempt) -> i32 {
    1
}

/// An async hook's output must be `()` or `Result<(), E>` too.
async fn async_returns_a_string(_attempt: &Attempt, _ended: &Ended) -> String {
    String::new()
}

#[chia::function(setup = wants_a_number, cleanup = cleanup_without_ended)]
fn first(x: i64) -> i64 {
    x
}

#[chia::function(setup = returns_a_number, cleanup = async_returns_a_string)]
async fn second(x: i64) -> i64 {
    x
}

fn main() {}
