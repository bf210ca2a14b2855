//! The `kelpie` binary from the outside: determinism and replay of `sim`, the same report on
//! any number of jobs, shards merged into the whole sweep, the lease commands against a
//! temporary SQLite file, exit codes of bad input and unavailable stores, the timeline page,
//! `--help` everywhere, and a short `bench`.

use std::path::Path;

use assert_cmd::Command;
use kelpie_dst::mutations::Mutation;
use predicates::prelude::*;

fn kelpie() -> Command {
    let mut command = Command::cargo_bin("kelpie").expect("the kelpie binary is built");
    // A DST_SEED in the environment would turn a sweep into one seed.
    command.env_remove("DST_SEED");
    command.env_remove("DST_CHECK_DETERMINISM");
    command
}

/// Runs kelpie with `args`; returns exit code, stdout, stderr.
fn run(args: &[&str]) -> (i32, String, String) {
    let output = kelpie().args(args).output().expect("kelpie runs");
    let stdout = String::from_utf8(output.stdout).expect("stdout is UTF-8");
    let stderr = String::from_utf8(output.stderr).expect("stderr is UTF-8");
    (output.status.code().expect("exited"), stdout, stderr)
}

/// Runs `kelpie lease <verb> --node <node> --actor <actor> --store <store>`, then `extra`.
fn lease(
    verb: &str,
    node: &str,
    actor: &str,
    store: &str,
    extra: &[&str],
) -> (i32, String, String) {
    let mut args = vec![
        "lease", verb, "--node", node, "--actor", actor, "--store", store,
    ];
    args.extend_from_slice(extra);
    run(&args)
}

fn store_arg(dir: &Path) -> String {
    format!("sqlite:{}", dir.join("leases.db").display())
}

#[test]
fn sim_same_seed_twice_prints_identical_stdout() {
    let args = ["sim", "--seed", "42"];
    let (code, first, _) = run(&args);
    assert_eq!(code, 0, "{first}");
    let (_, second, _) = run(&args);
    assert_eq!(first, second);
    assert!(first.contains("seeds run:         1 (seed 42)"), "{first}");
    assert!(first.contains("violations:        0"), "{first}");
}

/// The test harness's DST_CHECK_DETERMINISM ran each seed twice under `kelpie sim` and
/// doubled every coverage count in the report.
#[test]
fn sim_ignores_the_test_harness_determinism_switch() {
    let args = ["sim", "--seeds", "3", "--base-seed", "7"];
    let (code, plain, _) = run(&args);
    assert_eq!(code, 0, "{plain}");
    let output = kelpie()
        .env("DST_CHECK_DETERMINISM", "1")
        .args(args)
        .output()
        .expect("kelpie runs");
    assert_eq!(String::from_utf8(output.stdout).unwrap(), plain);
    assert!(plain.contains("coverage marks"), "{plain}");
}

#[test]
fn sim_sweep_reports_figures_and_timing() {
    let (code, stdout, stderr) = run(&["sim", "--seeds", "5", "--base-seed", "100"]);
    assert_eq!(code, 0, "{stdout}{stderr}");
    for field in [
        "seeds run:         5",
        // Drift is no fault that fires: every seed's clocks drift, half at the bound.
        "clock drift up to 50000 ppm",
        "simulated time:",
        "lease operations:",
        "storage-write-fail",
        "checks evaluated:",
        "violations:        0",
        "PASS",
    ] {
        assert!(stdout.contains(field), "{field} missing from:\n{stdout}");
    }
    assert!(stderr.contains("per CPU second"), "{stderr}");
    assert!(stderr.contains("time compression"), "{stderr}");
    // Not a terminal: plain progress lines, no bar.
    assert!(stderr.contains("5/5 seeds"), "{stderr}");
}

/// A fault enabled but never taking effect says so in the report: the run passed without
/// testing it.
#[test]
fn a_fault_enabled_that_never_took_effect_is_pointed_out() {
    let args = [
        "sim",
        "--seeds",
        "3",
        "--base-seed",
        "1",
        "--faults",
        "node-crash=0.0001,storage-latency=0.5",
    ];
    let (code, stdout, stderr) = run(&args);
    assert_eq!(code, 0, "{stdout}{stderr}");
    let line = |fault: &str| {
        stdout
            .lines()
            .find(|l| l.trim_start().starts_with(fault))
            .unwrap_or_else(|| panic!("no {fault} line in {stdout}"))
            .to_string()
    };
    assert!(
        line("node-crash").contains("enabled in 3 of 3 seeds, never took effect"),
        "{stdout}"
    );
    assert!(
        !line("storage-latency").contains("never took effect"),
        "{stdout}"
    );
}

#[test]
fn sim_json_parses() {
    let (code, stdout, _) = run(&["sim", "--seed", "7", "--json"]);
    assert_eq!(code, 0);
    let value: serde_json::Value = serde_json::from_str(&stdout).expect("valid JSON");
    assert_eq!(value["seeds_run"], 1);
    assert_eq!(value["violations"], 0);
    assert!(value["failure"].is_null());
    assert!(value["faults"].as_array().is_some_and(|f| !f.is_empty()));
    assert_eq!(value["settings"]["clock_drift_ppm_max"], 50_000);
}

/// The invariant and step lines of a failure report.
#[test]
fn the_longest_lease_runs_its_liveness_phase_within_the_simulators_bounds() {
    // A day's lease stretches the liveness phase past a day of simulated time, and on etcd
    // past ten million steps: the bounds follow the run's planned length, so a seed passes
    // instead of failing on a bound meant for runs gone wrong.
    for store in ["protocol", "etcd"] {
        let (code, stdout, stderr) = run(&[
            "sim",
            "--seed",
            "1",
            "--lease-ms",
            "86400000",
            "--sim-secs",
            "5",
            "--store",
            store,
        ]);
        assert_eq!(code, 0, "{store}: {stdout}{stderr}");
        assert!(stdout.contains("violations:        0"), "{store}: {stdout}");
    }
}

fn failure_lines(stdout: &str) -> (String, String) {
    let line = |prefix: &str| {
        stdout
            .lines()
            .find(|l| l.starts_with(prefix))
            .unwrap_or_else(|| panic!("no {prefix} line in:\n{stdout}"))
            .to_string()
    };
    (line("invariant: "), line("step: "))
}

#[test]
fn an_injected_bug_fails_and_its_printed_replay_fails_the_same_way() {
    for mutation in Mutation::ALL {
        // The number of seeds `--inject-bug`'s help promises to fail.
        let mut args = vec![
            "sim",
            "--seeds",
            "100",
            "--base-seed",
            "1",
            "--inject-bug",
            mutation.name(),
        ];
        args.extend(mutation.sim_args());
        let (code, stdout, stderr) = run(&args);
        assert_eq!(code, 1, "{}: {stdout}{stderr}", mutation.name());
        let first = stdout.lines().next().unwrap_or_default();
        assert!(first.starts_with("DST_SEED="), "{first}");
        assert!(
            !stderr.contains("DST_SEED="),
            "the seed is printed once, on stdout, not again by the simulator: {stderr}"
        );
        let replay = stdout
            .lines()
            .find(|l| l.starts_with("kelpie sim --seed "))
            .expect("a replay command");
        assert!(replay.contains(&format!("--inject-bug {}", mutation.name())));
        // Run at the mutation's smallest size, or the default where that is larger.
        let size = mutation.sim_size_min();
        let (nodes, actors) = (size.nodes.max(3), size.actors.max(2));
        let sized = format!("--nodes {nodes} --actors {actors} ");
        assert!(replay.contains(&sized), "{replay}");
        if mutation.on_etcd() {
            assert!(replay.contains("--store etcd"), "{replay}");
        }
        let (invariant, step) = failure_lines(&stdout);
        let named = invariant.trim_start_matches("invariant: ");
        let expected = mutation.caught_first_by();
        assert!(
            expected.contains(&named),
            "{}: {invariant}, expected one of {expected:?}",
            mutation.name()
        );
        assert!(stdout.contains("last "), "events before the violation");
        // The failed seed returns no counts: the totals say whose they are.
        for counted in ["faults fired in", "checks evaluated:"] {
            let line = stdout.lines().find(|l| l.starts_with(counted));
            let line = line.unwrap_or_else(|| panic!("no {counted} line in:\n{stdout}"));
            assert!(line.contains(" in the seeds that finished"), "{line}");
        }

        let args: Vec<&str> = replay.split_whitespace().skip(1).collect();
        let (replay_code, replay_stdout, _) = run(&args);
        assert_eq!(replay_code, 1, "{replay_stdout}");
        assert_eq!(replay_stdout.lines().next(), Some(first));
        assert_eq!(failure_lines(&replay_stdout), (invariant, step));
    }
}

/// A small sweep: 24 seeds of two simulated seconds from base seed 100.
const SMALL_SWEEP: [&str; 7] = [
    "sim",
    "--seeds",
    "24",
    "--base-seed",
    "100",
    "--sim-secs",
    "2",
];

/// A sweep with a planted bug that fails some of its seeds.
const PLANTED_FAILURE_SWEEP: [&str; 7] = [
    "sim",
    "--seeds",
    "200",
    "--base-seed",
    "1",
    "--inject-bug",
    "renew-ignores-ownership",
];

/// `args` followed by `extra`.
fn with(args: &[&str], extra: &[&str]) -> Vec<String> {
    args.iter().chain(extra).map(|a| a.to_string()).collect()
}

fn run_owned(args: &[String]) -> (i32, String, String) {
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    run(&args)
}

#[test]
fn sim_prints_the_same_report_on_any_number_of_jobs() {
    let (code, one, _) = run_owned(&with(&SMALL_SWEEP, &["--jobs", "1"]));
    assert_eq!(code, 0, "{one}");
    assert!(one.contains("coverage marks hit:"), "{one}");
    assert!(one.contains("protocol.takeover_after_expiry"), "{one}");
    for jobs in ["2", "5"] {
        let (code, many, stderr) = run_owned(&with(&SMALL_SWEEP, &["--jobs", jobs]));
        assert_eq!(code, 0, "{many}{stderr}");
        assert_eq!(many, one, "--jobs {jobs}");
        assert!(stderr.contains(&format!("on {jobs} jobs")), "{stderr}");
    }
    let json = |jobs| run_owned(&with(&SMALL_SWEEP, &["--json", "--jobs", jobs])).1;
    assert_eq!(json("1"), json("3"));
}

/// Writes the `--json` report of each shard `I/count` of `args` into `dir`; returns the paths.
fn shard_reports(dir: &Path, args: &[String], count: u64) -> Vec<String> {
    (0..count)
        .map(|index| {
            let shard = format!("{index}/{count}");
            let (code, stdout, stderr) = run_owned(&with(
                &args.iter().map(String::as_str).collect::<Vec<_>>(),
                &["--json", "--shard", &shard],
            ));
            assert!(code == 0 || code == 1, "shard {shard}: {stdout}{stderr}");
            let path = dir.join(format!("shard-{index}.json"));
            std::fs::write(&path, stdout).unwrap();
            path.display().to_string()
        })
        .collect()
}

fn merge(files: &[String], json: bool) -> (i32, String, String) {
    let mut args = vec!["sim".to_string(), "merge".to_string()];
    if json {
        args.push("--json".to_string());
    }
    args.extend(files.iter().cloned());
    run_owned(&args)
}

#[test]
fn shards_merge_into_the_whole_sweeps_report() {
    let dir = tempfile::tempdir().unwrap();
    let whole = with(&SMALL_SWEEP, &[]);
    let files = shard_reports(dir.path(), &whole, 3);
    let shard: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&files[1]).unwrap()).unwrap();
    assert_eq!(shard["shard"], "1/3");
    assert_eq!(shard["seeds_run"], 8);
    let (code, merged_text, stderr) = merge(&files, false);
    assert_eq!(code, 0, "{merged_text}{stderr}");
    assert_eq!(merged_text, run_owned(&whole).1);
    // In any order, and as JSON too.
    let reversed: Vec<String> = files.iter().rev().cloned().collect();
    let (_, merged_json, _) = merge(&reversed, true);
    assert_eq!(merged_json, run_owned(&with(&SMALL_SWEEP, &["--json"])).1);
}

/// A mixed sweep says how many of its seeds ran on each store, and its shards add up to it.
#[test]
fn a_mixed_sweep_counts_its_seeds_on_each_store() {
    let args = |store: &str| {
        [
            "sim",
            "--seeds",
            "12",
            "--base-seed",
            "40",
            "--store",
            store,
        ]
        .map(String::from)
    };
    let sweep = |store: &str, extra: &[&str]| {
        let (code, stdout, stderr) = run_owned(&with(
            &args(store).iter().map(String::as_str).collect::<Vec<_>>(),
            extra,
        ));
        assert_eq!(code, 0, "{stdout}{stderr}");
        stdout
    };
    let on_etcd = |json: &str| {
        let value: serde_json::Value = serde_json::from_str(json).unwrap();
        assert_eq!(value["seeds_run"], 12);
        value["seeds_on_etcd"].as_u64().unwrap()
    };
    assert_eq!(on_etcd(&sweep("protocol", &["--json"])), 0);
    let mixed = on_etcd(&sweep("mixed", &["--json"]));
    assert!(0 < mixed && mixed < 12, "{mixed} of 12 seeds on etcd");
    let text = sweep("mixed", &[]);
    let line = format!(
        "stores:            {} seeds on protocol, {mixed} on etcd",
        12 - mixed
    );
    assert!(text.contains(&line), "{text}");
    assert!(!sweep("protocol", &[]).contains("stores:"));
    let dir = tempfile::tempdir().unwrap();
    let files = shard_reports(dir.path(), &args("mixed"), 3);
    let (code, merged, stderr) = merge(&files, false);
    assert_eq!(code, 0, "{merged}{stderr}");
    assert_eq!(merged, text);
}

#[test]
fn shards_of_a_failing_sweep_merge_into_its_keep_going_report() {
    let dir = tempfile::tempdir().unwrap();
    let whole = with(&PLANTED_FAILURE_SWEEP, &["--keep-going"]);
    let (code, expected, _) = run_owned(&whole);
    assert_eq!(code, 1, "{expected}");
    let files = shard_reports(dir.path(), &whole, 3);
    let (code, merged, stderr) = merge(&files, false);
    assert_eq!(
        code, 1,
        "a failing sweep merges into a failing report: {stderr}"
    );
    assert_eq!(merged, expected);
    assert!(merged.starts_with("DST_SEED="), "{merged}");
}

/// The failure's own lines: from `DST_SEED=` to the blank line after its events.
fn failure_block(stdout: &str) -> &str {
    assert!(stdout.starts_with("DST_SEED="), "{stdout}");
    stdout.split("\n\n").next().unwrap()
}

#[test]
fn a_planted_failure_is_reported_the_same_on_any_jobs_and_in_its_shard() {
    let sweep = PLANTED_FAILURE_SWEEP;
    let (code, one, stderr) = run_owned(&with(&sweep, &["--jobs", "1"]));
    assert_eq!(code, 1, "{one}{stderr}");
    let (code, two, _) = run_owned(&with(&sweep, &["--jobs", "2"]));
    assert_eq!((code, &two), (1, &one), "--jobs 2 reports the same failure");
    // The sweep stopped early: the range is what was planned, not what ran.
    assert!(
        one.contains(" of 200, planned seeds 1..=200 (base seed 1)\n"),
        "{one}"
    );
    let block = failure_block(&one);
    let seed: u64 = block.lines().next().unwrap()["DST_SEED=".len()..]
        .parse()
        .unwrap();
    assert!(block
        .lines()
        .nth(1)
        .unwrap()
        .starts_with(&format!("kelpie sim --seed {seed} ")));
    // The shard holding that seed reports it the same way, first.
    let shard = format!("{}/3", (seed - 1) % 3);
    let (code, sharded, _) = run_owned(&with(&sweep, &["--shard", &shard, "--jobs", "2"]));
    assert_eq!(code, 1, "{sharded}");
    assert_eq!(failure_block(&sharded), block);
    // With --keep-going it is the first of the seeds listed, and every one is listed.
    let (code, all, _) = run_owned(&with(&sweep, &["--keep-going", "--jobs", "2"]));
    assert_eq!(code, 1);
    assert_eq!(failure_block(&all), block);
    let listed: Vec<&str> = all
        .lines()
        .filter(|l| l.starts_with("  DST_SEED="))
        .collect();
    assert!(listed[0].starts_with(&format!("  DST_SEED={seed} RenewalRequiresOwnership: ")));
    assert!(
        all.contains(&format!("violations:        {}\n", listed.len())),
        "{all}"
    );
    assert!(
        listed.len() > 1,
        "the mutation fails more than one of 200 seeds"
    );
}

#[test]
fn a_time_budget_that_is_not_spent_runs_every_seed() {
    let (code, stdout, _) = run_owned(&with(&SMALL_SWEEP, &["--time-budget", "1h"]));
    assert_eq!(code, 0, "{stdout}");
    assert!(stdout.contains("seeds run:         24 of 24"), "{stdout}");
    assert!(
        stdout.contains("time budget:       1h, not spent"),
        "{stdout}"
    );
}

/// A budget spent before the first seed could start (1 ns) still runs that seed: it
/// reported a pass over 0 seeds before, exit 0, having checked nothing.
#[test]
fn a_budget_too_short_for_any_seed_still_runs_the_first() {
    let (code, stdout, stderr) = run(&["sim", "--time-budget", "1ns", "--base-seed", "5"]);
    assert_eq!(code, 0, "{stdout}{stderr}");
    assert!(
        stdout.contains("seeds run:         1 of 1000000: seeds 5..=5"),
        "{stdout}"
    );
    assert!(
        stdout.contains("PASS: no invariant violated in 1 seed"),
        "{stdout}"
    );
}

#[test]
fn a_spent_time_budget_reports_the_first_seeds_as_the_ones_run() {
    // The same sweep, ended by a budget here and by a count below.
    let sweep = ["--jobs", "2", "--base-seed", "77", "--sim-secs", "1"];
    let (code, stdout, stderr) = run_owned(&with(&["sim", "--time-budget", "1s"], &sweep));
    assert_eq!(code, 0, "{stdout}{stderr}");
    let line = |report: &str, prefix: &str| {
        let found = report.lines().find(|l| l.starts_with(prefix));
        found
            .unwrap_or_else(|| panic!("no {prefix} in:\n{report}"))
            .to_string()
    };
    let seeds_line = line(&stdout, "seeds run:");
    let ran: u64 = seeds_line["seeds run:".len()..]
        .split_whitespace()
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{seeds_line}"));
    assert!(ran > 0 && ran < 1_000_000, "{seeds_line}");
    // The seeds that ran, and the planned range labelled as such.
    assert_eq!(
        seeds_line,
        format!(
            "seeds run:         {ran} of 1000000: seeds 77..={}, the first {ran} of the planned \
             77..=1000076 (base seed 77)",
            76 + ran
        )
    );
    assert!(
        line(&stdout, "time budget:").ends_with(", spent, no further seed started"),
        "{stdout}"
    );
    // Those seeds, run by count, give the same figures: they are the seeds that ran.
    let count = ran.to_string();
    let (code, expected, _) = run_owned(&with(&["sim", "--seeds", &count], &sweep));
    assert_eq!(code, 0, "{expected}");
    let figures = |report: &str| -> Vec<String> {
        let own = ["seeds run:", "time budget:"];
        let lines = report
            .lines()
            .filter(|l| !own.iter().any(|p| l.starts_with(p)));
        lines.map(str::to_string).collect()
    };
    assert_eq!(figures(&stdout), figures(&expected));
}

#[test]
fn bad_sweep_options_and_merges_exit_2_with_a_clear_message() {
    let sweep = |extra: &[&str]| with(&SMALL_SWEEP, extra);
    let usage = |args: Vec<String>, expected: &str| {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        assert_usage_error(&args, expected);
    };
    usage(sweep(&["--shard", "3/3"]), "shard 3/3 does not exist");
    usage(sweep(&["--shard", "0/0"]), "cannot be split into 0 shards");
    usage(sweep(&["--shard", "x"]), "is not a shard I/N");
    usage(sweep(&["--jobs", "0"]), "0 is not in 1..=");
    usage(sweep(&["--time-budget", "abc"]), "is not a duration");
    usage(sweep(&["--time-budget", "0s"]), "runs no seed");
    usage(
        sweep(&["--shard", "0/2", "--time-budget", "1m"]),
        "--time-budget",
    );
    assert_usage_error(&["sim", "--seeds", "5", "--shard", "0/2"], "--base-seed");

    let dir = tempfile::tempdir().unwrap();
    let files = shard_reports(dir.path(), &sweep(&[]), 2);
    let other = shard_reports(&tempdir_in(dir.path()), &sweep(&["--nodes", "4"]), 2);
    let merge_error = |files: &[&String], expected: &str| {
        let mut args = vec!["sim", "merge"];
        args.extend(files.iter().map(|f| f.as_str()));
        assert_usage_error(&args, expected);
    };
    merge_error(&[&files[0], &other[1]], "is not a shard of the same sweep");
    merge_error(&[&files[0], &files[0]], "shard 0/2 is given twice");
    merge_error(&[&files[1]], "shard(s) 0/2 are missing");
    let corrupt = dir.path().join("corrupt.json");
    let text = std::fs::read_to_string(&files[0]).unwrap();
    std::fs::write(&corrupt, &text[..text.len() / 2]).unwrap();
    let corrupt = corrupt.display().to_string();
    merge_error(&[&corrupt, &files[1]], "is not a kelpie sim --json report");
    let missing = dir.path().join("nothing.json").display().to_string();
    merge_error(&[&missing], "cannot read");
    let single = dir.path().join("single.json");
    std::fs::write(&single, run(&["sim", "--seed", "3", "--json"]).1).unwrap();
    merge_error(&[&single.display().to_string()], "a single seed's report");
    // A report edited to 0 seeds is refused, not a panic in its seed range.
    let mut report: serde_json::Value = serde_json::from_str(&text).unwrap();
    report["seeds_asked"] = serde_json::json!(0);
    let no_seeds = dir.path().join("no-seeds.json");
    std::fs::write(&no_seeds, report.to_string()).unwrap();
    merge_error(&[&no_seeds.display().to_string()], "a sweep of 0 seeds");
    // More seeds on etcd than seeds run is refused, not a wrapped count of protocol seeds.
    let mut report: serde_json::Value = serde_json::from_str(&text).unwrap();
    report["seeds_on_etcd"] = serde_json::json!(1_000);
    let too_many = dir.path().join("too-many-on-etcd.json");
    std::fs::write(&too_many, report.to_string()).unwrap();
    merge_error(
        &[&too_many.display().to_string(), &files[1]],
        "1000 seeds run on etcd, of 12 seeds run",
    );
}

/// A fresh directory inside `parent`.
fn tempdir_in(parent: &Path) -> std::path::PathBuf {
    let dir = parent.join("other");
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A lease row whose expiry lies past the year 9999 (the file edited; SQLite's own checks
/// find nothing wrong) is shown, and refused, without a panic: formatting it as a wall-clock
/// time panicked, after a renewal had been applied.
#[test]
fn a_lease_expiring_past_the_year_9999_is_shown_without_a_panic() {
    let dir = tempfile::tempdir().unwrap();
    let store = store_arg(dir.path());
    assert_eq!(lease("acquire", "node-a", "actor-1", &store, &[]).0, 0);
    let path = dir.path().join("leases.db");
    let conn = rusqlite::Connection::open(&path).unwrap();
    let changed = conn
        .execute(
            // An hour into the year 10000: the wall clock and the store's differ by a few ms.
            "UPDATE leases SET expires_at_ms = 253402304400000 WHERE actor_id = 'actor-1'",
            [],
        )
        .unwrap();
    assert_eq!(changed, 1);
    drop(conn);
    let outside = "a wall-clock time outside 1970..=9999";
    for (args, code) in [
        (
            vec!["lease", "get", "--actor", "actor-1", "--store", &store],
            0,
        ),
        (vec!["lease", "list", "--store", &store], 0),
    ] {
        let (got, stdout, stderr) = run(&args);
        assert_eq!(got, code, "{args:?}: {stdout}{stderr}");
        assert!(stdout.contains(outside), "{args:?}: {stdout}");
    }
    let (code, _, stderr) = lease("acquire", "node-b", "actor-1", &store, &[]);
    assert_eq!(code, 1, "{stderr}");
    assert!(
        stderr.contains(outside) && !stderr.contains("panicked"),
        "{stderr}"
    );
    let (code, stdout, stderr) = lease("renew", "node-a", "actor-1", &store, &[]);
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains(outside), "{stdout}");
}

/// An answer that cannot be written to stdout (here a full device) exits 4 and says what was
/// done, where `println!` panicked (exit 101) after the lease had been acquired.
#[test]
fn an_answer_stdout_cannot_take_exits_4_and_says_what_was_done() {
    let dir = tempfile::tempdir().unwrap();
    let store = store_arg(dir.path());
    let full = std::fs::File::create("/dev/full").expect("Linux has /dev/full");
    let args = [
        "lease", "acquire", "--node", "n", "--actor", "a", "--store", &store,
    ];
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_kelpie"))
        .args(args)
        .stdout(full)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(4), "{stderr}");
    assert!(
        stderr.contains("the lease was acquired, but could not write the answer to stdout"),
        "{stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
    let (code, stdout, _) = run(&["lease", "get", "--actor", "a", "--store", &store]);
    assert_eq!(code, 0);
    assert!(
        stdout.contains("holder=n token=1"),
        "acquired all the same: {stdout}"
    );
}

#[test]
fn lease_commands_against_a_sqlite_file() {
    let dir = tempfile::tempdir().unwrap();
    let store = store_arg(dir.path());
    let op = |verb: &str, node: &str| lease(verb, node, "actor-1", &store, &[]);
    let (code, stdout, _) = op("acquire", "node-a");
    assert_eq!(code, 0);
    assert!(
        stdout.contains("acquired actor-1 holder=node-a token=1"),
        "{stdout}"
    );

    let (code, _, stderr) = op("acquire", "node-b");
    assert_eq!(code, 1);
    // The holder's expiry as a duration from now and a wall-clock time, not a store time.
    assert!(stderr.contains("held by node-a, expiring in "), "{stderr}");
    assert!(!stderr.contains("store time"), "{stderr}");
    let (code, _, stderr) = op("renew", "node-b");
    assert_eq!(code, 1);
    assert!(stderr.contains("node-a"), "{stderr}");
    assert_eq!(op("renew", "node-a").0, 0);

    let (code, stdout, _) = run(&["lease", "get", "--actor", "actor-1", "--store", &store]);
    assert_eq!(code, 0);
    assert!(stdout.contains("holder=node-a"), "{stdout}");
    // For a person: the expiry from now and on the wall clock (UTC, RFC 3339).
    assert!(stdout.contains(" expires in "), "{stdout}");
    let at = stdout
        .split("(at ")
        .nth(1)
        .and_then(|rest| rest.split(')').next());
    let at = at.unwrap_or_else(|| panic!("no wall-clock expiry in {stdout}"));
    assert!(
        at.len() == 24 && at.ends_with('Z') && at.as_bytes()[10] == b'T',
        "{at}"
    );
    let json = [
        "lease", "get", "--actor", "actor-1", "--store", &store, "--json",
    ];
    let (_, stdout, _) = run(&json);
    let lease: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(lease["holder"], "node-a");
    assert_eq!(lease["fencing_token"], 1);
    let (_, stdout, _) = run(&["lease", "list", "--store", &store, "--json"]);
    let leases: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(leases.as_array().map(Vec::len), Some(1));
    let (_, stdout, _) = run(&["lease", "list", "--node", "node-b", "--store", &store]);
    assert!(
        stdout.contains("no valid leases held by node-b"),
        "{stdout}"
    );

    assert_eq!(op("release", "node-b").0, 1);
    let (code, stdout, _) = op("release", "node-a");
    assert_eq!(code, 0);
    // The lease has ended: no expiry in the future (nor the one the release cut short).
    assert!(
        stdout.starts_with("released actor-1 holder=node-a token=1, acquired "),
        "{stdout}"
    );
    assert!(!stdout.contains("expire"), "{stdout}");
    let (_, stdout, _) = run(&json);
    assert_eq!(stdout.trim(), "null");
    let (code, stdout, _) = op("acquire", "node-b");
    assert_eq!(code, 0);
    assert!(
        stdout.contains("token=2"),
        "a new holder gets a larger token: {stdout}"
    );
    let release_json = [
        "lease", "release", "--node", "node-b", "--actor", "actor-1", "--store", &store, "--json",
    ];
    let (code, stdout, _) = run(&release_json);
    assert_eq!(code, 0, "{stdout}");
    let released: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(released["holder"], "node-b");
    assert_eq!(released["fencing_token"], 2);
    assert!(released.get("expires_at_ms").is_none(), "{stdout}");
}

#[test]
fn a_refusal_with_json_names_the_holder_on_stdout() {
    let dir = tempfile::tempdir().unwrap();
    let store = store_arg(dir.path());
    let acquire = |node: &str| {
        let args = [
            "lease", "acquire", "--node", node, "--actor", "a", "--store", &store,
        ];
        let mut args = args.to_vec();
        args.push("--json");
        run(&args)
    };
    let (code, stdout, _) = acquire("node-a");
    assert_eq!(code, 0);
    let lease: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(lease["actor_id"], "a");
    let (code, stdout, _) = acquire("node-b");
    assert_eq!(code, 1);
    let refusal: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(refusal["refused"], "held-by-other");
    assert_eq!(refusal["holder"], "node-a");
}

/// Asserts that `args` exit with 2 and a message containing `expected`, without a panic.
fn assert_usage_error(args: &[&str], expected: &str) {
    let (code, stdout, stderr) = run(args);
    assert_eq!(code, 2, "{args:?}: {stdout}{stderr}");
    assert!(stderr.contains(expected), "{args:?}: {stderr}");
    assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
}

#[test]
fn bad_inputs_exit_2_with_a_clear_message() {
    let dir = tempfile::tempdir().unwrap();
    let store = store_arg(dir.path());
    let acquire = |extra: &[&str]| {
        let mut args = vec!["lease", "acquire", "--node", "n", "--store", &store];
        args.extend_from_slice(extra);
        args.into_iter().map(String::from).collect::<Vec<_>>()
    };
    let args = acquire(&["--actor", "has space"]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    assert_usage_error(&args, "contains ' '");
    let args = acquire(&["--actor", "a", "--duration-ms", "0"]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    assert_usage_error(&args, "lease duration 0 ms is outside");
    let bogus = [
        "lease", "acquire", "--node", "n", "--actor", "a", "--store", "bogus:x",
    ];
    assert_usage_error(&bogus, "unknown store");
    // A release has no duration: the option is refused, not validated and ignored.
    let release = [
        "lease",
        "release",
        "--node",
        "n",
        "--actor",
        "a",
        "--duration-ms",
        "5",
    ];
    assert_usage_error(&release, "unexpected argument '--duration-ms'");
    assert_usage_error(&["sim", "--faults", "storage-write-fail=1.5"], "0..=1");
    assert_usage_error(
        &["sim", "--faults", "nosuchfault=0.1"],
        "no fault is called",
    );
    assert_usage_error(
        &["sim", "--faults", "crash=0.1"],
        "\"crash\" is short for more than one fault: node-crash, storage-crash",
    );
    assert_usage_error(&["sim", "--seeds", "0"], "0 is not in 1..=");
    assert_usage_error(
        &["sim", "--seeds", "3", "--timeline", "x.html"],
        "--timeline",
    );
    assert_usage_error(
        &["sim", "--timeline", "x.html"],
        "--timeline draws one seed: give it --seed <N>, or set DST_SEED",
    );
    assert_usage_error(&["sim", "--inject-bug", "nosuchbug"], "invalid value");
    assert_usage_error(
        &["sim", "--inject-bug", "etcd-blind-put"],
        "run it with --store etcd",
    );
    assert_usage_error(
        &[
            "sim",
            "--store",
            "etcd",
            "--inject-bug",
            "acquire-ignores-holder",
        ],
        "run it with --store protocol",
    );
    assert_usage_error(&["sim", "--store", "zookeeper"], "invalid value");
    assert_usage_error(&["sim", "--lease-ms", "5"], "--lease-ms");
    assert!(!dir.path().join("leases.db").exists(), "nothing was opened");
}

#[test]
fn a_sqlite_path_under_a_regular_file_is_a_configuration_error() {
    // Not "unavailable": no retry can make a file a directory, only a different --store.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("file");
    std::fs::write(&file, "not a directory").unwrap();
    let store = format!("sqlite:{}", file.join("leases.db").display());
    let args = [
        "lease", "acquire", "--node", "n", "--actor", "a", "--store", &store,
    ];
    assert_usage_error(&args, "cannot open lease store");
}

#[test]
fn reads_refuse_a_sqlite_path_no_write_could_open_and_create_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("file");
    std::fs::write(&file, "not a directory").unwrap();
    let missing_dir = dir.path().join("missing-dir");
    for path in [missing_dir.join("leases.db"), file.join("leases.db")] {
        let store = format!("sqlite:{}", path.display());
        let get = ["lease", "get", "--actor", "a", "--store", &store];
        let list = ["lease", "list", "--store", &store];
        for read in [&get[..], &list[..]] {
            // The same refusal (exit 2) as a write gets, not an empty store (exit 0).
            assert_usage_error(read, "cannot open lease store");
            let mut json = read.to_vec();
            json.push("--json");
            assert_usage_error(&json, "cannot open lease store");
        }
    }
    assert!(!missing_dir.exists(), "a read creates no directory");
    // A missing file in a directory that exists is an empty store, and stays missing; stderr
    // says so, since a mistyped path reads the same.
    let store = store_arg(dir.path());
    let absent = format!(
        "no lease store at {} yet (no write has created it): read as empty",
        dir.path().join("leases.db").display()
    );
    let (code, stdout, stderr) = run(&["lease", "get", "--actor", "a", "--store", &store]);
    assert_eq!((code, stdout.as_str()), (0, "a: no valid lease\n"));
    assert!(stderr.contains(&absent), "{stderr}");
    let (code, stdout, stderr) = run(&["lease", "list", "--store", &store, "--json"]);
    assert_eq!((code, stdout.as_str()), (0, "[]\n"));
    assert!(stderr.contains(&absent), "{stderr}");
    assert!(
        !dir.path().join("leases.db").exists(),
        "a read creates no file"
    );
}

#[test]
fn a_store_locked_past_the_timeout_is_unavailable() {
    let dir = tempfile::tempdir().unwrap();
    let store = store_arg(dir.path());
    let acquire = [
        "lease", "acquire", "--node", "n", "--actor", "a", "--store", &store,
    ];
    assert_eq!(run(&acquire).0, 0, "the file exists and is ours");
    let lock = rusqlite::Connection::open(dir.path().join("leases.db")).unwrap();
    lock.execute_batch("BEGIN IMMEDIATE").unwrap();
    let mut args = acquire.to_vec();
    args.extend(["--timeout-ms", "100"]);
    let (code, _, stderr) = run(&args);
    assert_eq!(code, 3, "{stderr}");
    assert!(stderr.contains("locked"), "{stderr}");
    lock.execute_batch("ROLLBACK").unwrap();
}

/// `list --node m1` lists the leases of `m1`'s incarnations (`m1@<n>`, how `kelpie node` and a
/// `LeaseSession` hold leases) with `m1`'s own, and no other node's (`m10`, `m1@x@7`).
#[test]
fn list_by_node_includes_the_node_s_incarnations() {
    let dir = tempfile::tempdir().unwrap();
    let store = store_arg(dir.path());
    for (node, actor) in [
        ("m1", "a1"),
        ("m1@42", "a2"),
        ("m10@42", "a3"),
        ("m1@x@7", "a4"),
    ] {
        assert_eq!(lease("acquire", node, actor, &store, &[]).0, 0, "{node}");
    }
    let (code, stdout, _) = run(&["lease", "list", "--node", "m1", "--store", &store, "--json"]);
    assert_eq!(code, 0, "{stdout}");
    let leases: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    let mut actors: Vec<&str> = leases
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["actor_id"].as_str().unwrap())
        .collect();
    actors.sort_unstable();
    assert_eq!(actors, ["a1", "a2"], "{stdout}");
}

/// Built without the `etcd` feature, `--store etcd://...` is a usage error (exit 2) that
/// names the build command adding the backend.
#[cfg(not(feature = "etcd"))]
#[test]
fn etcd_without_the_feature_exits_2_with_the_build_command() {
    let args = [
        "lease",
        "get",
        "--actor",
        "a",
        "--store",
        "etcd://127.0.0.1:2379",
    ];
    let (code, stdout, stderr) = run(&args);
    assert_eq!(code, 2, "{stderr}");
    assert!(stdout.is_empty(), "{stdout}");
    assert!(
        stderr.contains("cargo build --release -p kelpie-cli --features etcd"),
        "{stderr}"
    );
    let (code, _, stderr) = run(&["bench", "--store", "etcd://127.0.0.1:2379"]);
    assert_eq!(code, 2, "{stderr}");
}

#[cfg(feature = "etcd")]
#[test]
fn an_unreachable_etcd_is_unavailable() {
    let store = "etcd://127.0.0.1:1";
    let args = [
        "lease",
        "get",
        "--actor",
        "a",
        "--store",
        store,
        "--timeout-ms",
        "200",
    ];
    let (code, _, stderr) = run(&args);
    assert_eq!(code, 3, "{stderr}");
    assert!(stderr.contains("unavailable"), "{stderr}");
    // A timeout etcd's client refuses is a usage error, found before connecting.
    let args = [
        "lease",
        "get",
        "--actor",
        "a",
        "--store",
        store,
        "--timeout-ms",
        "1",
    ];
    assert_usage_error(&args, "connect_timeout_ms");
    // list needs --node on etcd: a usage error, found before the store is contacted.
    let args = ["lease", "list", "--store", store, "--timeout-ms", "200"];
    assert_usage_error(&args, "list needs --node");
}

/// The etcd endpoint of `scripts/with-etcd`, as a `--store` value; without one, `test` is
/// skipped with a notice (a failure under `CI=true`).
#[cfg(feature = "etcd")]
fn etcd_store(test: &str) -> Option<String> {
    let endpoints = std::env::var("KELPIE_ETCD_ENDPOINTS").ok();
    let first = endpoints.as_deref().and_then(|e| e.split(',').next());
    let Some(first) = first.map(str::trim).filter(|f| !f.is_empty()) else {
        kelpie_core::testing::missing_requirement(
            test,
            "KELPIE_ETCD_ENDPOINTS not set",
            "run it under scripts/with-etcd",
        );
        return None;
    };
    let host_port = first.trim_start_matches("http://");
    Some(format!("etcd://{host_port}"))
}

/// Runs under `scripts/with-etcd cargo test -p kelpie-cli --features etcd --test cli etcd`.
#[cfg(feature = "etcd")]
#[test]
fn lease_commands_against_etcd() {
    let Some(store) = etcd_store("lease_commands_against_etcd") else {
        return;
    };
    // Unique per run, so that leases left by an earlier run cannot interfere.
    let actor = format!("cli-test-{}", std::process::id());
    let op = |verb: &str, node: &str| lease(verb, node, &actor, &store, &[]);
    let (code, stdout, stderr) = op("acquire", "node-a");
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("holder=node-a"), "{stdout}");
    let (code, _, stderr) = op("acquire", "node-b");
    assert_eq!(code, 1);
    assert!(stderr.contains("node-a"), "{stderr}");
    let (code, stdout, _) = run(&["lease", "get", "--actor", &actor, "--store", &store]);
    assert_eq!(code, 0);
    assert!(stdout.contains("holder=node-a"), "{stdout}");
    // Another process's session: renewing is refused, with a note on what to do.
    let (code, _, stderr) = op("renew", "node-a");
    assert_eq!(code, 1);
    assert!(stderr.contains("acquire it again"), "{stderr}");
    assert_eq!(op("release", "node-b").0, 1);
    assert_eq!(op("release", "node-a").0, 0);
    let (_, stdout, _) = run(&[
        "lease", "get", "--actor", &actor, "--store", &store, "--json",
    ]);
    assert_eq!(stdout.trim(), "null");
}

/// etcd keeps no acquisition time and counts expiries on the reading process's clock: a lease
/// another process acquired is shown as acquired at an unknown time (null in JSON), a refusal
/// gives the holder's expiry as a duration from now, and a renewal refused because another
/// process of the same node holds the lease says so without naming the node as both.
#[cfg(feature = "etcd")]
#[test]
fn etcd_output_shows_only_what_etcd_knows() {
    let Some(store) = etcd_store("etcd_output_shows_only_what_etcd_knows") else {
        return;
    };
    let actor = format!("cli-output-{}", std::process::id());
    let node = format!("cli-node-{}", std::process::id());
    let op = |verb: &str, node: &str, json: bool| {
        let extra: &[&str] = if json { &["--json"] } else { &[] };
        lease(verb, node, &actor, &store, extra)
    };
    let (code, stdout, stderr) = op("acquire", &node, false);
    assert_eq!(code, 0, "{stderr}");
    // This command acquired it, so it knows when.
    assert!(stdout.contains(", acquired 0."), "{stdout}");
    let get = ["lease", "get", "--actor", &actor, "--store", &store];
    let (_, stdout, _) = run(&get);
    assert!(stdout.contains("acquired at an unknown time"), "{stdout}");
    assert!(!stdout.contains("s ago"), "{stdout}");
    let mut get_json = get.to_vec();
    get_json.push("--json");
    let (_, stdout, _) = run(&get_json);
    let lease: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert!(lease["acquired_at_ms"].is_null(), "{stdout}");
    assert_eq!(lease["holder"], node.as_str());
    let list = [
        "lease", "list", "--node", &node, "--store", &store, "--json",
    ];
    let (_, stdout, _) = run(&list);
    let leases: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert!(leases[0]["acquired_at_ms"].is_null(), "{stdout}");

    let (code, _, stderr) = op("acquire", "cli-other", false);
    assert_eq!(code, 1, "{stderr}");
    assert!(
        stderr.contains(&format!("held by {node}, expiring within ")),
        "{stderr}"
    );
    assert!(!stderr.contains("store time"), "{stderr}");
    let (_, stdout, _) = op("acquire", "cli-other", true);
    let refusal: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    let message = refusal["message"].as_str().unwrap();
    assert!(message.contains("expiring within "), "{message}");

    let (code, _, stderr) = op("renew", &node, false);
    assert_eq!(code, 1, "{stderr}");
    assert!(
        !stderr.contains(&format!("{node} does not hold")),
        "names the node as both refused and holder: {stderr}"
    );
    assert!(stderr.contains("another session"), "{stderr}");

    let (code, stdout, stderr) = op("release", &node, false);
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("acquired at an unknown time"), "{stdout}");
}

/// `list --node` on etcd finds the leases `kelpie node` holds, as `<node>@<incarnation>`.
#[cfg(feature = "etcd")]
#[test]
fn etcd_list_by_node_includes_the_node_s_incarnations() {
    let Some(store) = etcd_store("etcd_list_by_node_includes_the_node_s_incarnations") else {
        return;
    };
    let node = format!("cli-m{}", std::process::id());
    let incarnation = format!("{node}@42");
    let actor = format!("cli-incarnation-{}", std::process::id());
    assert_eq!(lease("acquire", &incarnation, &actor, &store, &[]).0, 0);
    let (code, stdout, stderr) = run(&["lease", "list", "--node", &node, "--store", &store]);
    assert_eq!(code, 0, "{stderr}");
    assert!(
        stdout.contains(&format!("{actor} holder={incarnation} ")),
        "{stdout}"
    );
    assert_eq!(lease("release", &incarnation, &actor, &store, &[]).0, 0);
}

/// `kelpie bench` on etcd works under a key prefix of its own and leaves no lease behind:
/// none under it, and no more benchmark leases under the production prefix than before.
#[cfg(feature = "etcd")]
#[test]
fn bench_on_etcd_leaves_no_lease_behind() {
    let Some(store) = etcd_store("bench_on_etcd_leaves_no_lease_behind") else {
        return;
    };
    let endpoints = std::env::var("KELPIE_ETCD_ENDPOINTS").expect("etcd_store read it");
    let callers_max = 3;
    let bench_leases = |prefix: &str| -> usize {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async {
            let options = kelpie_lease::EtcdOptions::new(endpoints.split(',').map(str::trim))
                .with_key_prefix(prefix);
            let manager = kelpie_lease::EtcdLeaseManager::connect(options)
                .await
                .unwrap();
            let mut held = 0;
            for index in 0..callers_max {
                let node = kelpie_core::NodeId::new(format!("bench-node-{index}")).unwrap();
                held += manager.leases_of_node(&node).await.unwrap().len();
            }
            held
        })
    };
    let default_prefix = kelpie_lease::limits::ETCD_KEY_PREFIX_DEFAULT;
    let before = bench_leases(default_prefix);
    let args = [
        "bench",
        "--store",
        &store,
        "--case-ms",
        "150",
        "--concurrency",
        "1,3",
        "--json",
    ];
    let (code, stdout, stderr) = run(&args);
    assert_eq!(code, 0, "{stdout}{stderr}");
    let report: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    let prefix = report["key_prefix"]
        .as_str()
        .unwrap_or_else(|| panic!("{stdout}"));
    assert!(prefix.starts_with("/kelpie/bench/"), "{prefix}");
    assert_eq!(bench_leases(prefix), 0, "leases left under {prefix}");
    assert_eq!(
        bench_leases(default_prefix),
        before,
        "leases left under {default_prefix}"
    );
}

#[test]
fn the_timeline_is_one_self_contained_page_with_a_row_per_actor() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("timeline.html");
    let path_arg = path.display().to_string();
    let args = [
        "sim",
        "--seed",
        "5",
        "--actors",
        "3",
        "--timeline",
        &path_arg,
    ];
    let (code, stdout, stderr) = run(&args);
    assert_eq!(code, 0, "{stdout}{stderr}");
    let html = std::fs::read_to_string(&path).unwrap();
    assert!(html.contains("<svg"));
    assert_eq!(html.matches("class=\"actor-row\"").count(), 3);
    assert!(!html.contains("http"), "no network references");
    assert!(html.contains("#1"), "bars are labelled with tokens");
}

#[test]
fn a_timeline_draws_the_seed_in_dst_seed() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("timeline.html");
    let path_arg = path.display().to_string();
    let output = kelpie()
        .env("DST_SEED", "5")
        .args(["sim", "--actors", "3", "--timeline", &path_arg])
        .output()
        .expect("kelpie runs");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(0), "{stderr}");
    let html = std::fs::read_to_string(&path).unwrap();
    assert_eq!(html.matches("class=\"actor-row\"").count(), 3);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(stdout.contains("seed 5"), "{stdout}");
}

#[test]
fn a_failing_seed_s_timeline_marks_the_violation() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("timeline.html");
    let path_arg = path.display().to_string();
    let (code, stdout, _) = run(&[
        "sim",
        "--seeds",
        "200",
        "--base-seed",
        "1",
        "--inject-bug",
        "acquire-ignores-holder",
    ]);
    assert_eq!(code, 1);
    let seed = stdout
        .lines()
        .next()
        .unwrap()
        .trim_start_matches("DST_SEED=")
        .to_string();
    let args = [
        "sim",
        "--seed",
        &seed,
        "--inject-bug",
        "acquire-ignores-holder",
        "--timeline",
        &path_arg,
    ];
    assert_eq!(run(&args).0, 1);
    let html = std::fs::read_to_string(&path).unwrap();
    assert!(html.contains("class=\"violation\""));
}

#[test]
fn every_subcommand_has_help() {
    let commands: [&[&str]; 10] = [
        &[],
        &["sim"],
        &["sim", "merge"],
        &["lease"],
        &["lease", "acquire"],
        &["lease", "renew"],
        &["lease", "release"],
        &["lease", "get"],
        &["lease", "list"],
        &["bench"],
    ];
    for command in commands {
        let mut args = command.to_vec();
        args.push("--help");
        let (code, stdout, _) = run(&args);
        assert_eq!(code, 0, "{args:?}");
        assert!(stdout.contains("Usage: kelpie"), "{args:?}: {stdout}");
        if command.first() == Some(&"lease") {
            assert!(stdout.contains("Exit codes:"), "{args:?}: {stdout}");
        }
    }
    // Documented in the README, so listed too, with the bugs it takes.
    kelpie()
        .args(["sim", "--help"])
        .assert()
        .success()
        .stdout(predicate::str::contains("--inject-bug <NAME>"))
        .stdout(predicate::str::contains("etcd-stale-reads"));
}

/// Ctrl-C (SIGINT) during a benchmark removes its file before the process exits: it was left
/// behind with its WAL, and the next run on that path was refused because it existed.
#[test]
#[allow(clippy::disallowed_methods)] // a real process on the real clock
fn an_interrupted_bench_removes_its_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bench.db");
    let store = format!("sqlite:{}", path.display());
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_kelpie"))
        .args(["bench", "--store", &store, "--case-ms", "5000"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("kelpie bench starts");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !path.exists() {
        assert!(std::time::Instant::now() < deadline, "no benchmark file");
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    // Past its start-up, into the measuring.
    std::thread::sleep(std::time::Duration::from_millis(300));
    let pid = i32::try_from(child.id()).unwrap();
    // SAFETY: kill has no memory effects; the pid is our own unreaped child.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGINT) }, 0);
    let output = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(130), "{stderr}");
    assert!(stderr.contains("stopped by SIGINT"), "{stderr}");
    for suffix in ["", "-wal", "-shm"] {
        let leftover = format!("{}{suffix}", path.display());
        assert!(!Path::new(&leftover).exists(), "{leftover} left behind");
    }
}

#[test]
fn bench_prints_a_table_and_leaves_no_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bench.db");
    let store = format!("sqlite:{}", path.display());
    let args = [
        "bench",
        "--store",
        &store,
        "--case-ms",
        "50",
        "--concurrency",
        "1,4",
    ];
    let (code, stdout, stderr) = run(&args);
    assert_eq!(code, 0, "{stdout}{stderr}");
    for operation in ["acquire", "renew", "release", "acquire+renew+release"] {
        assert!(stdout.contains(operation), "{stdout}");
    }
    assert!(!path.exists(), "the benchmark file is removed");
    let (code, stdout, _) = run(&["bench", "--store", "memory", "--case-ms", "20", "--json"]);
    assert_eq!(code, 0);
    let value: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(value["rows"].as_array().map(Vec::len), Some(8));
    std::fs::write(&path, "precious").unwrap();
    assert_usage_error(&args, "exists");
    assert_eq!(std::fs::read_to_string(&path).unwrap(), "precious");
}
