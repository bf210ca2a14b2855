//! The test scripts' argument handling: a bad argument is refused with the usage (exit 2)
//! before anything is built or started, and `--help` answers without building or starting
//! anything. Each case exits before the script reaches cargo or etcd, so the test needs
//! neither.

use std::path::Path;
use std::process::Command;

/// Runs `scripts/<script>` with `args`: exit code, stdout, stderr.
fn run(script: &str, args: &[&str]) -> (i32, String, String) {
    run_with_env(script, args, &[])
}

/// Runs `scripts/<script>` with `args` and the environment variables `env` set.
fn run_with_env(script: &str, args: &[&str], env: &[(&str, &str)]) -> (i32, String, String) {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../scripts")
        .join(script);
    let output = Command::new("bash")
        .arg(path)
        .args(args)
        .envs(env.iter().copied())
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
    let cases: [(&str, &[&str]); 7] = [
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
        // It ignored every argument and ran all 25 configurations (after fetching TLC).
        ("tlc", &["--bogus"]),
        ("tlc", &["NoSuchSpec.cfg"]),
    ];
    for (script, args) in cases {
        let (code, stdout, stderr) = run(script, args);
        assert_eq!(code, 2, "{script} {args:?}: {stdout}{stderr}");
        assert!(stderr.contains("usage:"), "{script} {args:?}: {stderr}");
    }
}

#[test]
fn help_answers_without_running_anything() {
    for script in ["etcd-cluster-faults", "with-etcd", "tlc"] {
        let (code, stdout, stderr) = run(script, &["--help"]);
        assert_eq!(code, 0, "{script}: {stdout}{stderr}");
        assert!(stdout.contains("usage:"), "{script}: {stdout}");
        // with-etcd used to start etcd and run `--help` as the command.
        assert!(!stderr.contains("etcd (pid"), "{script}: {stderr}");
        // tlc used to fetch TLC and model-check everything.
        let ran_tlc = stdout.lines().any(|line| line.starts_with("TLC: "));
        assert!(!ran_tlc, "{script}: {stdout}");
    }
}

/// A bad TLC setting is refused before TLC is fetched or run: it used to fail each of the 25
/// configurations in turn, the cause buried in each one's output.
#[test]
fn tlc_refuses_bad_settings_up_front() {
    for (name, value) in [
        ("TLC_WORKERS", "zero"),
        ("TLC_TIMEOUT", "abc"),
        ("TLC_TIMEOUT", "0"),
    ] {
        let (code, _, stderr) = run_with_env("tlc", &[], &[(name, value)]);
        assert_eq!(code, 2, "{name}={value}: {stderr}");
        assert!(stderr.contains(name), "{name}={value}: {stderr}");
        assert!(stderr.contains("usage:"), "{name}={value}: {stderr}");
    }
}
