//! Quickstart: a resource-constrained fan-out, a chained pair of calls and a nested call.
//!
//! Runs on an embedded local cluster (two workers, each `adder=2,multiplier=1`) unless
//! CHIA_ADDRESS / CHIA_CLUSTER_FILE name a real one. Prints which node ran each task.
//!
//! ```sh
//! cargo run --release -p examples --bin quickstart
//! ```

use examples::{simple_add, simple_multiply, square, sum_of_squares};
use std::time::Instant;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    chia::init_logging("warn");
    let started = Instant::now();
    let cx = chia::Init::new().local_workers(2).local_resources("adder=2,multiplier=1").connect().await?;
    println!("connected as {} in {:?}", cx.node_name(), started.elapsed());

    println!("\n== fan-out: 8 squares, each needs adder=1 ==");
    let refs: Vec<_> = (1..=8).map(|x| square::call(x).tag(format!("square{x}")).remote(&cx)).collect();
    for (x, r) in (1..=8).zip(&refs) {
        let placed = r.get().await?;
        println!("square({x}) = {:>3}  ran on {}", placed.value, placed.node);
    }

    println!("\n== chain: simple_multiply(simple_add(1, 2), 10) ==");
    let sum = simple_add::remote(&cx, 1, 2);
    let product = simple_multiply::remote(&cx, &sum, 10);
    let (sum, product) = (sum.get().await?, product.get().await?);
    println!("simple_add(1, 2)      = {:>3}  ran on {}", sum.value, sum.node);
    println!("simple_multiply(.,10) = {:>3}  ran on {}", product.value, product.node);

    println!("\n== nested: sum_of_squares(5) dispatches square(1..=5) from a worker ==");
    let nested = sum_of_squares::remote(&cx, 5).get().await?;
    println!("sum_of_squares(5)     = {:>3}  ran on {}", nested.value, nested.node);

    println!("\ndone in {:?}", started.elapsed());
    cx.shutdown().await;
    Ok(())
}
