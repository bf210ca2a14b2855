//! `kelpie sim merge FILE...`: the `--json` reports of a sweep's shards, merged into the report
//! the whole sweep prints.
//!
//! The shards must be the same sweep (same options, base seed and number of seeds), split the
//! same way, each present once. Their figures are sums, the coverage marks too, and failing
//! seeds are put back in seed order. With `--keep-going` every shard ran every one of its
//! seeds, so the merge is exactly the whole sweep's report. Without it a shard stops at its
//! own first failure while the others go on, so the merged totals then cover the seeds the
//! shards ran, and the reported failure is the first in seed order.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use clap::Args;
use kelpie_sim::Shard;

use crate::report::{FaultRecord, OpsRecord, Report};
use crate::sim::print_stdout;

const MERGE_AFTER_HELP: &str = "\
The files must be every shard 0/N .. N-1/N of one sweep (same options, --base-seed, --seeds and
--keep-going), each once, in any order; the report printed is the whole sweep's, as
`kelpie sim` without --shard prints it. Without --keep-going a shard stops at its own first
failing seed while the others go on, so the merged totals then cover the seeds the shards ran;
the failure reported is still the first in seed order. Time-budgeted and single-seed reports
cannot be merged.

Exit codes: 0 no violation, 1 a seed failed, 2 bad usage or reports that cannot be merged.";

/// Options of `kelpie sim merge`.
#[derive(Debug, Args)]
#[command(after_help = MERGE_AFTER_HELP)]
pub struct MergeArgs {
    /// The shards' reports, as written by `kelpie sim --json --shard I/N`.
    #[arg(required = true, value_name = "FILE")]
    pub files: Vec<PathBuf>,
    /// Print the merged report as one JSON object.
    #[arg(long)]
    pub json: bool,
}

/// Why reports could not be merged.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MergeError {
    /// A file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// A file is not a `kelpie sim --json` report.
    #[error("{path} is not a kelpie sim --json report: {source}")]
    Parse {
        /// The file.
        path: String,
        /// Where and why it did not parse.
        source: serde_json::Error,
    },
    /// A report is of a single seed or a time-budgeted sweep, whose seeds depend on nothing
    /// the other shards know.
    #[error("{path} cannot be merged: it is {what}")]
    NotMergeable {
        /// The file.
        path: String,
        /// What it is.
        what: &'static str,
    },
    /// Two reports are of different sweeps.
    #[error(
        "{path} is not a shard of the same sweep as {first}: {field} is {found} there and \
         {expected} in {first}"
    )]
    DifferentSweep {
        /// The first report.
        first: String,
        /// The report that differs.
        path: String,
        /// The field that differs.
        field: &'static str,
        /// Its value in the first report.
        expected: String,
        /// Its value in this one.
        found: String,
    },
    /// The same shard was given twice.
    #[error("shard {shard} is given twice: {first} and {second}")]
    OverlappingShards {
        /// The shard.
        shard: Shard,
        /// One file.
        first: String,
        /// The other.
        second: String,
    },
    /// Not every shard of the sweep was given.
    #[error("the sweep is split into {count} shards but shard(s) {missing} are missing")]
    MissingShards {
        /// How many shards the sweep has.
        count: u64,
        /// The missing ones, comma-separated.
        missing: String,
    },
    /// A report contradicts itself (edited, or cut short).
    #[error("{path} is inconsistent: {reason}")]
    Inconsistent {
        /// The file.
        path: String,
        /// What does not add up.
        reason: String,
    },
}

/// Runs `kelpie sim merge`; `Ok(false)` when a seed failed.
pub fn run(args: MergeArgs) -> Result<bool, crate::error::CliError> {
    let reports = args
        .files
        .iter()
        .map(|path| read(path).map(|report| (path.display().to_string(), report)))
        .collect::<Result<Vec<_>, _>>()?;
    let merged = merge(reports)?;
    let failed = merged.failure.is_some();
    if let (true, Some(failure)) = (args.json, &merged.failure) {
        eprintln!("DST_SEED={}\n{}", failure.dst_seed, failure.replay);
    }
    let text = match args.json {
        true => merged.to_json(),
        false => merged.to_text(),
    };
    print_stdout(&text);
    Ok(!failed)
}

fn read(path: &Path) -> Result<Report, MergeError> {
    let name = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|source| MergeError::Read {
        path: name.clone(),
        source,
    })?;
    serde_json::from_str(&text).map_err(|source| MergeError::Parse { path: name, source })
}

/// Merges the reports (each with the name of its file) of every shard of one sweep into the
/// whole sweep's report.
pub fn merge(reports: Vec<(String, Report)>) -> Result<Report, MergeError> {
    for (path, report) in &reports {
        check_alone(path, report)?;
    }
    let (first_path, first) = reports.first().expect("clap requires a file");
    let count = first.shard.unwrap_or(Shard::WHOLE).count();
    let mut by_shard: BTreeMap<u64, &str> = BTreeMap::new();
    for (path, report) in &reports {
        check_same_sweep(first_path, first, path, report)?;
        let shard = report.shard.unwrap_or(Shard::WHOLE);
        if let Some(earlier) = by_shard.insert(shard.index(), path) {
            return Err(MergeError::OverlappingShards {
                shard,
                first: earlier.to_string(),
                second: path.clone(),
            });
        }
    }
    let missing: Vec<String> = (0..count)
        .filter(|index| !by_shard.contains_key(index))
        .map(|index| format!("{index}/{count}"))
        .collect();
    if !missing.is_empty() {
        return Err(MergeError::MissingShards {
            count,
            missing: missing.join(", "),
        });
    }
    Ok(sum(reports.into_iter().map(|(_, report)| report)))
}

/// What a report must be to be merged at all, and figures that must agree within it.
fn check_alone(path: &str, report: &Report) -> Result<(), MergeError> {
    let not_mergeable = |what| MergeError::NotMergeable {
        path: path.to_string(),
        what,
    };
    if report.single_seed {
        return Err(not_mergeable("a single seed's report, not a sweep's"));
    }
    if report.time_budget.is_some() {
        return Err(not_mergeable(
            "a time-budgeted sweep's report, whose seeds are not a shard's",
        ));
    }
    let inconsistent = |reason: String| MergeError::Inconsistent {
        path: path.to_string(),
        reason,
    };
    if report.seeds_asked == 0 {
        return Err(inconsistent(
            "a sweep of 0 seeds, which kelpie sim never runs".into(),
        ));
    }
    let shard = report.shard.unwrap_or(Shard::WHOLE);
    let seeds_in_shard = shard.seeds_in(report.seeds_asked);
    if report.seeds_run > seeds_in_shard {
        return Err(inconsistent(format!(
            "{} seeds run, but shard {shard} of {} seeds has {seeds_in_shard}",
            report.seeds_run, report.seeds_asked
        )));
    }
    if let Some(on_etcd) = report.seeds_on_etcd.filter(|&n| n > report.seeds_run) {
        return Err(inconsistent(format!(
            "{on_etcd} seeds run on etcd, of {} seeds run",
            report.seeds_run
        )));
    }
    if report.violations != report.failures.len() as u64
        || report.failure.is_some() != (report.violations > 0)
    {
        return Err(inconsistent(format!(
            "{} violations, {} failing seeds listed",
            report.violations,
            report.failures.len()
        )));
    }
    for failed in &report.failures {
        let index = failed.dst_seed.wrapping_sub(report.base_seed);
        if index >= report.seeds_asked || !shard.contains(index) {
            return Err(inconsistent(format!(
                "failing seed {} is not a seed of shard {shard}",
                failed.dst_seed
            )));
        }
    }
    let faults: Vec<&str> = report.faults.iter().map(|f| f.fault.as_str()).collect();
    let known: Vec<&str> = kelpie_sim::FaultType::all()
        .iter()
        .map(|f| f.name())
        .collect();
    if faults != known {
        return Err(inconsistent(
            "its faults are not this simulator's, in its order".to_string(),
        ));
    }
    Ok(())
}

fn check_same_sweep(
    first_path: &str,
    first: &Report,
    path: &str,
    report: &Report,
) -> Result<(), MergeError> {
    let differs = |field, expected: String, found: String| MergeError::DifferentSweep {
        first: first_path.to_string(),
        path: path.to_string(),
        field,
        expected,
        found,
    };
    let shards = |report: &Report| report.shard.unwrap_or(Shard::WHOLE).count().to_string();
    let checks = [
        (
            "settings",
            format!("{:?}", first.settings),
            format!("{:?}", report.settings),
        ),
        (
            "base_seed",
            first.base_seed.to_string(),
            report.base_seed.to_string(),
        ),
        (
            "seeds_asked",
            first.seeds_asked.to_string(),
            report.seeds_asked.to_string(),
        ),
        (
            "keep_going",
            first.keep_going.to_string(),
            report.keep_going.to_string(),
        ),
        ("the number of shards", shards(first), shards(report)),
    ];
    for (field, expected, found) in checks {
        if expected != found {
            return Err(differs(field, expected, found));
        }
    }
    Ok(())
}

/// The sum of shards already checked to be one sweep.
fn sum(reports: impl Iterator<Item = Report>) -> Report {
    let mut reports = reports;
    let mut total = reports.next().expect("at least one report");
    let base = total.base_seed;
    let earlier = |a: u64, b: u64| a.wrapping_sub(base) < b.wrapping_sub(base);
    for report in reports {
        total.seeds_run += report.seeds_run;
        // Known for the whole only if known for every part.
        total.seeds_on_etcd = total
            .seeds_on_etcd
            .zip(report.seeds_on_etcd)
            .map(|(a, b)| a + b);
        total.sim_time_ms += report.sim_time_ms;
        add_ops(&mut total.lease_ops, &report.lease_ops);
        add_faults(&mut total.faults, &report.faults);
        for (mark, hits) in report.coverage {
            *total.coverage.entry(mark).or_default() += hits;
        }
        total.checks_evaluated += report.checks_evaluated;
        total.steps += report.steps;
        total.violations += report.violations;
        total.failures.extend(report.failures);
        total.failure = match (total.failure.take(), report.failure) {
            (Some(a), Some(b)) if earlier(b.dst_seed, a.dst_seed) => Some(b),
            (a, b) => a.or(b),
        };
    }
    total
        .failures
        .sort_by_key(|failed| failed.dst_seed.wrapping_sub(base));
    total.shard = None;
    total
}

fn add_ops(total: &mut OpsRecord, ops: &OpsRecord) {
    total.total += ops.total;
    total.acquired += ops.acquired;
    total.renewed += ops.renewed;
    total.released += ops.released;
    total.refused += ops.refused;
    total.store_failed += ops.store_failed;
}

fn add_faults(total: &mut [FaultRecord], faults: &[FaultRecord]) {
    for (total, fault) in total.iter_mut().zip(faults) {
        assert_eq!(
            total.fault, fault.fault,
            "fault lists were checked to match"
        );
        total.seeds_enabled += fault.seeds_enabled;
        total.fired += fault.fired;
    }
}
