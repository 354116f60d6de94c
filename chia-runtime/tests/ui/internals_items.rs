//! What the generated code and the runtime use internally is not part of the user API:
//! building a `Call` from a spec, the encoded argument type, a sync provider's runner, and
//! the result watch of the cache service.
extern crate chia_runtime as chia;

#[chia::function]
fn double(x: i64) -> i64 {
    x * 2
}

async fn misuse(cx: &chia::Context) {
    let _input: chia::ArgInput = chia::IntoArg::<i64>::into_arg(1_i64);
    chia::bypass::run_sync(|| 1);
    let _ = cx.watch_results("write", Vec::new());
    let _call = chia::Call::<i64>::new;
}

fn main() {
    let _ = (double, misuse);
}
