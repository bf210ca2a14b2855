//! For tests that need something beyond the Rust toolchain (an etcd server, Chromium, an
//! unprivileged user): one rule for what happens when it is missing.
//!
//! On a developer's machine such a test is skipped, and says so on the real stderr (libtest
//! captures `eprintln!` and shows it only for failures, so a skip would otherwise be silent).
//! Under `CI=true` the requirement is part of the contract (`.ci/run` provides every one), so
//! a missing one fails the test instead of letting it pass unseen.

use std::io::Write;

/// The variable CI sets to `true`.
pub const CI_ENV: &str = "CI";

/// Whether this process runs under CI (`CI=true`).
pub fn under_ci() -> bool {
    std::env::var(CI_ENV).is_ok_and(|value| value == "true")
}

/// Reports that `test` cannot run because `requirement` is missing: panics under `CI=true`,
/// otherwise prints a visible skip notice (with `hint`, how to provide it) and returns, so the
/// caller returns from the test.
///
/// # Panics
/// Under `CI=true`, always.
pub fn missing_requirement(test: &str, requirement: &str, hint: &str) {
    let message = format!("{test}: {requirement} ({hint})");
    assert!(
        !under_ci(),
        "CI=true and a test requirement is missing: {message}"
    );
    let _ = std::io::stderr().write_all(format!("skipping {message}\n").as_bytes());
}
