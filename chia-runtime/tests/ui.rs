//! Compile-fail checks (`trybuild`): each `tests/ui/*.rs` must fail to compile with the error
//! in the `.stderr` beside it, so a mistake in user code is reported where it is and in words
//! that name it. Regenerate the expected errors with `TRYBUILD=overwrite` after reading them.

#[test]
fn user_mistakes_fail_to_compile_with_a_clear_error() {
    trybuild::TestCases::new().compile_fail("tests/ui/*.rs");
}
