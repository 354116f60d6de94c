//! `max_retries` takes a number of retries or `forever`, never a sentinel such as Ray's `-1`.
extern crate chia_runtime as chia;

#[chia::function(max_retries = -1)]
fn with_a_sentinel(x: i64) -> i64 {
    x
}

#[chia::function(max_retries = always)]
fn with_a_word(x: i64) -> i64 {
    x
}

#[chia::function(max_retries = forever)]
fn retried_forever(x: i64) -> i64 {
    x
}

fn main() {
    let _ = (with_a_sentinel, with_a_word, retried_forever);
}
