//! The functions the examples call. They live in this library so that both the example
//! drivers and the examples' worker binary (`worker`) link them: a worker can only run the
//! functions linked into it.

use chia::Context;
use serde::{Deserialize, Serialize};

/// A value together with the node that computed it, so the examples can show placement.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Placed<T> {
    /// What the function computed.
    pub value: T,
    /// The name of the node whose worker computed it.
    pub node: String,
}

/// Adds two numbers on a node that has an `adder`.
#[chia::function(resources(adder = 1))]
pub fn simple_add(cx: &Context, x: i64, y: i64) -> Placed<i64> {
    Placed { value: x + y, node: cx.node_name().to_string() }
}

/// Multiplies on a node that has a `multiplier`; takes the output of `simple_add`, so the
/// two chain.
#[chia::function(resources(multiplier = 1))]
pub fn simple_multiply(cx: &Context, sum: Placed<i64>, factor: i64) -> Placed<i64> {
    Placed { value: sum.value * factor, node: cx.node_name().to_string() }
}

/// Squares a number on a node with an `adder`.
#[chia::function(resources(adder = 1))]
pub fn square(cx: &Context, x: i64) -> Placed<i64> {
    Placed { value: x * x, node: cx.node_name().to_string() }
}

/// A nested call: dispatches `square` for 1..=n from inside a task and adds the results.
/// Needs no `adder` itself, so it never competes with its children for one.
#[chia::function(num_cpus = 0.5)]
pub async fn sum_of_squares(cx: &Context, n: i64) -> Result<Placed<i64>, chia::Error> {
    let children: Vec<_> = (1..=n).map(|x| square::remote(cx, x)).collect();
    let mut total = 0;
    for child in &children {
        total += child.get().await?.value;
    }
    Ok(Placed { value: total, node: cx.node_name().to_string() })
}

/// How long one [`expensive_step()`] takes: long enough to see, short enough to run twice.
pub const EXPENSIVE_STEP: std::time::Duration = std::time::Duration::from_secs(1);

/// One expensive step of a loop (a build, a simulation): about a second, and it says so on
/// the node's standard output when it really runs, so a replayed run shows none of these lines.
#[chia::function]
pub fn expensive_step(iteration: u32, call: u32, x: i64) -> i64 {
    println!("[REAL RUN] iter{iteration} call{call}");
    std::thread::sleep(EXPENSIVE_STEP);
    x * x
}

/// A stand-in for a simulator run that takes `millis` milliseconds and yields `x * x`. Any
/// number of attempts gives the same answer, so a run that is repeated after its worker died
/// is indistinguishable from one that was not.
#[chia::function]
pub fn simulate(x: i64, millis: u64) -> i64 {
    println!("[SIMULATE] {x}");
    std::thread::sleep(std::time::Duration::from_millis(millis));
    x * x
}

/// A long run (a simulation, a build) that stops as soon as it is cancelled, or after
/// `millis`: what `chia cancel` ends.
#[chia::function]
pub async fn run_until_cancelled(cx: &Context, x: i64, millis: u64) -> i64 {
    tokio::select! {
        () = cx.cancelled() => {}
        () = tokio::time::sleep(std::time::Duration::from_millis(millis)) => {}
    }
    x
}

/// A running total kept on one node: a small stateful service (see the README's Services).
pub struct Tally {
    total: i64,
}

#[chia::service]
impl Tally {
    /// A tally starting at `start`.
    pub fn new(start: i64) -> Self {
        Tally { total: start }
    }

    /// Adds `x`; returns the new total.
    pub fn add(&mut self, x: i64) -> i64 {
        self.total += x;
        self.total
    }
}

pub mod tools;

/// Does nothing; a binary calls it so the linker keeps this library, and with it the
/// registrations of the functions above.
pub fn link() {}
