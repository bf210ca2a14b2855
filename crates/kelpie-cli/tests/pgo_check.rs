//! `scripts/pgo --check`: the profile-guided build's own check (its step 5), shown rejecting
//! builds that report differently, fail, or are missing, and accepting builds that agree.
//!
//! The builds are stand-in scripts in a temporary `KELPIE_PGO_DIR`: the check runs the same
//! sweeps with the instrumented build (`gen/`) and the optimised one (`use/`) and compares what
//! they print, whatever prints it. One test, run in order, so that no other thread of this
//! binary forks while a stand-in is open for writing (an executable being written cannot run).

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The host triple, as `scripts/pgo` reads it from `rustc -vV`.
fn host() -> String {
    let output = Command::new("rustc")
        .arg("-vV")
        .output()
        .expect("rustc runs");
    let version = String::from_utf8(output.stdout).expect("rustc -vV prints UTF-8");
    version
        .lines()
        .find_map(|line| line.strip_prefix("host: "))
        .expect("rustc -vV names its host")
        .to_owned()
}

/// Writes `dir/<build>/<host>/release/kelpie`: a shell script with `body`.
fn stand_in(dir: &Path, host: &str, build: &str, body: &str) {
    let bin_dir = dir.join(build).join(host).join("release");
    std::fs::create_dir_all(&bin_dir).expect("create the build's directory");
    let path = bin_dir.join("kelpie");
    std::fs::write(&path, format!("#!/bin/sh\n{body}\n")).expect("write the stand-in");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755))
        .expect("make the stand-in executable");
}

/// Runs `scripts/pgo --check` on `dir`: exit code, stdout, stderr.
fn check(dir: &Path) -> (i32, String, String) {
    let script: PathBuf = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/pgo");
    let output = Command::new("bash")
        .arg(script)
        .arg("--check")
        .env("KELPIE_PGO_DIR", dir)
        .output()
        .expect("bash runs scripts/pgo");
    (
        output.status.code().expect("exited"),
        String::from_utf8(output.stdout).expect("stdout is UTF-8"),
        String::from_utf8(output.stderr).expect("stderr is UTF-8"),
    )
}

/// Runs the check on `dir`, asserts it rejected (exit 1, not "identical") with `message` on
/// stderr, and returns stderr.
fn rejected(dir: &Path, case: &str, message: &str) -> String {
    let (code, stdout, stderr) = check(dir);
    assert_eq!(code, 1, "{case}: {stdout}{stderr}");
    assert!(stderr.contains(message), "{case}: {stderr}");
    assert!(!stdout.contains("identical reports"), "{case}: {stdout}");
    stderr
}

#[test]
fn pgo_check_accepts_agreeing_builds_and_rejects_the_rest() {
    let host = host();
    let same = r#"echo "report of $*""#;

    // Both builds print the same reports: accepted.
    let dir = tempfile::tempdir().expect("temporary directory");
    stand_in(dir.path(), &host, "gen", same);
    stand_in(dir.path(), &host, "use", same);
    let (code, stdout, stderr) = check(dir.path());
    assert_eq!(code, 0, "agreeing builds: {stdout}{stderr}");
    assert!(
        stdout.contains("5 sweeps: identical reports"),
        "agreeing builds: {stdout}"
    );

    // The optimised build reports one sweep differently: rejected, naming the sweep and
    // showing the difference.
    stand_in(
        dir.path(),
        &host,
        "use",
        r#"case "$*" in *etcd*) echo "result: FAIL";; *) echo "report of $*";; esac"#,
    );
    let stderr = rejected(
        dir.path(),
        "a differing report",
        "'kelpie sim --seeds 40 --base-seed 900002000 --store etcd' reports differently with \
         and without PGO",
    );
    assert!(stderr.contains("> result: FAIL"), "the diff: {stderr}");

    // The optimised build fails a sweep: rejected.
    stand_in(dir.path(), &host, "use", "exit 3");
    rejected(dir.path(), "a failing build", "failed with the use build");

    // No optimised build at all: rejected before any sweep runs.
    let empty = tempfile::tempdir().expect("temporary directory");
    stand_in(empty.path(), &host, "gen", same);
    rejected(empty.path(), "a missing build", "no use build of kelpie");
    assert!(
        !empty.path().join("reports").exists(),
        "no sweep ran without a build to compare"
    );
}
