//! The test scripts' argument handling: a bad argument is refused with the usage (exit 2)
//! before anything is built or started, and `--help` answers without building or starting
//! anything. Each case exits before the script reaches cargo or etcd, so the test needs
//! neither.

use std::path::Path;
use std::process::Command;

/// Runs `scripts/<script>` with `args`: exit code, stdout, stderr.
fn run(script: &str, args: &[&str]) -> (i32, String, String) {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../scripts")
        .join(script);
    let output = Command::new("bash")
        .arg(path)
        .args(args)
        .output()
        .expect("bash runs the script");
    (
        output.status.code().expect("exited"),
        String::from_utf8(output.stdout).expect("stdout is UTF-8"),
        String::from_utf8(output.stderr).expect("stderr is UTF-8"),
    )
}

#[test]
fn bad_arguments_are_refused_with_the_usage() {
    let cases: [(&str, &[&str]); 5] = [
        // Both modes at once: one was silently dropped.
        (
            "node-faults",
            &["sqlite", "--beyond-drift", "--planted-bug"],
        ),
        (
            "node-faults",
            &["sqlite", "--planted-bug", "--beyond-drift"],
        ),
        ("node-faults", &["bogus"]),
        // It takes no arguments, and ran its 90 s test whatever it was given.
        ("etcd-cluster-faults", &["bogus"]),
        ("with-etcd", &[]),
    ];
    for (script, args) in cases {
        let (code, stdout, stderr) = run(script, args);
        assert_eq!(code, 2, "{script} {args:?}: {stdout}{stderr}");
        assert!(stderr.contains("usage:"), "{script} {args:?}: {stderr}");
    }
}

#[test]
fn help_answers_without_running_anything() {
    for script in ["etcd-cluster-faults", "with-etcd"] {
        let (code, stdout, stderr) = run(script, &["--help"]);
        assert_eq!(code, 0, "{script}: {stdout}{stderr}");
        assert!(stdout.contains("usage:"), "{script}: {stdout}");
        // with-etcd used to start etcd and run `--help` as the command.
        assert!(!stderr.contains("etcd (pid"), "{script}: {stderr}");
    }
}
