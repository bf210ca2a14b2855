//! The simulator's own acceptance tests: determinism, scheduling, time, bounds, storage
//! faults, failure reporting and replay.
//!
//! Tests that compare distinct seeds use fixed seeds; tests that only need *some* seed take it
//! from `DST_SEED` (or a random one) through `SimConfig::from_env_or_random`, so
//! `DST_SEED=7 DST_CHECK_DETERMINISM=1 cargo test -p kelpie-sim --test harness_dst` replays
//! them under seed 7 and runs each simulation twice.

use kelpie_core::Clock;
use kelpie_sim::{
    CasOutcome, FaultConfig, FaultType, SimConfig, SimEnv, SimError, SimReport, Simulation,
    StorageError,
};
use std::cell::RefCell;
use std::future::Future;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

/// Storage operations per fault in the rate test.
const FAULT_RATE_OPERATIONS: u64 = 10_000;
/// Probability configured in the rate test.
const FAULT_RATE_PROBABILITY: f64 = 0.1;
/// Allowed deviation from the expected count, in binomial standard deviations. Five keeps
/// the chance of a false failure for a random seed below one in a million per fault.
const FAULT_RATE_TOLERANCE_SIGMAS: f64 = 5.0;
/// Environment variable that makes the hidden canary test run (in a child process).
const CANARY_CHILD_ENV: &str = "KELPIE_DST_CANARY_CHILD";
/// Name of the hidden canary test, run as a child process.
const CANARY_CHILD_TEST: &str = "hidden_canary_child_process";

/// Runs `scenario`, returning the run's result and the value the scenario produced (from the
/// last run, when determinism is being checked).
fn run_with_output<T, F, Fut>(
    simulation: Simulation,
    scenario: F,
) -> (Result<SimReport, SimError>, Option<T>)
where
    T: 'static,
    F: Fn(SimEnv) -> Fut,
    Fut: Future<Output = Result<T, String>> + 'static,
{
    let output = Rc::new(RefCell::new(None));
    let slot = output.clone();
    let result = simulation.run(move |env| {
        let slot = slot.clone();
        let future = scenario(env);
        async move {
            let value = future.await?;
            *slot.borrow_mut() = Some(value);
            Ok::<(), String>(())
        }
    });
    let value = output.borrow_mut().take();
    (result, value)
}

/// Tasks doing storage writes after random sleeps: exercises scheduling, timers, storage and
/// the per-name rng streams.
async fn mixed_workload(env: SimEnv) -> Result<(), String> {
    let store = env.storage::<u64>();
    let mut handles = Vec::new();
    for task in 0..5u64 {
        let (env, store) = (env.clone(), store.clone());
        handles.push(env.clone().spawn(async move {
            let mut rng = env.rng(&format!("worker-{task}"));
            for round in 0..10u64 {
                env.sleep(Duration::from_millis(rng.gen_range(1..=50)))
                    .await;
                store
                    .put(&format!("key-{}", round % 3), task * 100 + round)
                    .await
                    .map_err(|e| e.to_string())?;
            }
            Ok::<(), String>(())
        }));
    }
    for handle in handles {
        handle.await.map_err(|e| e.to_string())??;
    }
    Ok(())
}

#[test]
fn test_same_seed_gives_same_trace_hash_and_different_seed_a_different_one() {
    let run = |seed| {
        Simulation::new(SimConfig::new(seed))
            .run(mixed_workload)
            .unwrap()
    };
    let first = run(1);
    let again = run(1);
    let other = run(2);
    assert_eq!(first.trace_hash, again.trace_hash);
    assert_eq!(first.steps, again.steps);
    assert_eq!(first.sim_time_ms, again.sim_time_ms);
    assert_ne!(
        first.trace_hash, other.trace_hash,
        "seeds 1 and 2 gave the same trace"
    );
    assert!(
        first.steps > 50,
        "the workload should take many steps, took {}",
        first.steps
    );
}

/// The order in which ten tasks, each yielding between three appends, append their ids.
fn interleaving_of_ten_tasks(seed: u64) -> Vec<usize> {
    let (result, order) =
        run_with_output(Simulation::new(SimConfig::new(seed)), |env| async move {
            let order = Rc::new(RefCell::new(Vec::new()));
            let handles: Vec<_> = (0..10)
                .map(|task| {
                    let (env, order) = (env.clone(), order.clone());
                    env.clone().spawn(async move {
                        for _ in 0..3 {
                            order.borrow_mut().push(task);
                            env.yield_now().await;
                        }
                    })
                })
                .collect();
            for handle in handles {
                handle.await.map_err(|e| e.to_string())?;
            }
            let order = order.borrow().clone();
            Ok(order)
        });
    result.unwrap();
    order.unwrap()
}

#[test]
fn test_seed_changes_interleaving_of_ten_tasks() {
    let first = interleaving_of_ten_tasks(11);
    assert_eq!(first.len(), 30);
    assert_eq!(
        first,
        interleaving_of_ten_tasks(11),
        "the same seed must give the same order"
    );
    let spawn_order: Vec<usize> = (0..3).flat_map(|_| 0..10).collect();
    assert_ne!(
        first, spawn_order,
        "the scheduler should not simply run tasks round robin"
    );
    let distinct: std::collections::BTreeSet<Vec<usize>> =
        (11..16).map(interleaving_of_ten_tasks).collect();
    assert_eq!(
        distinct.len(),
        5,
        "five seeds should give five different interleavings"
    );
}

/// The order in which ten tasks spawned detached, or spawned with their handles dropped,
/// append their ids, and the run's trace hash.
fn interleaving_of_ten_unjoined_tasks(seed: u64, detached: bool) -> (Vec<usize>, u64) {
    let (result, order) = run_with_output(
        Simulation::new(SimConfig::new(seed)),
        move |env| async move {
            let order = Rc::new(RefCell::new(Vec::new()));
            for task in 0..10 {
                let (env_in_task, order) = (env.clone(), order.clone());
                let appends = async move {
                    for _ in 0..3 {
                        order.borrow_mut().push(task);
                        env_in_task.yield_now().await;
                    }
                };
                match detached {
                    true => env.spawn_detached(appends),
                    false => drop(env.spawn(appends)),
                }
            }
            env.sleep(Duration::from_millis(1)).await;
            let order = order.borrow().clone();
            Ok(order)
        },
    );
    (order.unwrap(), result.unwrap().trace_hash)
}

/// A detached task runs to the end where a task whose handle was dropped would: same
/// interleaving, same trace.
#[test]
fn test_a_detached_task_runs_as_a_task_whose_handle_was_dropped() {
    let mut compared = 0;
    for seed in 21..26 {
        let (dropped, dropped_hash) = interleaving_of_ten_unjoined_tasks(seed, false);
        let (detached, detached_hash) = interleaving_of_ten_unjoined_tasks(seed, true);
        assert_eq!(detached.len(), 30, "every detached task ran to its end");
        assert_eq!(detached, dropped, "seed {seed}");
        assert_eq!(detached_hash, dropped_hash, "seed {seed}");
        compared += 1;
    }
    assert_eq!(compared, 5);
}

#[test]
// The real-time check measures that a simulated hour costs no real hour; it runs outside
// the simulated world.
#[allow(clippy::disallowed_methods)]
fn test_timers_fire_in_deadline_order_and_an_hour_passes_instantly() {
    let started = std::time::Instant::now();
    let (result, wakes) = run_with_output(
        Simulation::new(SimConfig::from_env_or_random()),
        |env| async move {
            let wakes = Rc::new(RefCell::new(Vec::new()));
            let handles: Vec<_> = [50u64, 10, 30, 20, 40, 10]
                .into_iter()
                .map(|delay_ms| {
                    let (env, wakes) = (env.clone(), wakes.clone());
                    env.clone().spawn(async move {
                        env.sleep(Duration::from_millis(delay_ms)).await;
                        wakes.borrow_mut().push((delay_ms, env.now_ms()));
                    })
                })
                .collect();
            for handle in handles {
                handle.await.map_err(|e| e.to_string())?;
            }
            let hour_start_ms = env.now_ms();
            env.sleep(Duration::from_secs(3600)).await;
            let hour_ms = env.now_ms() - hour_start_ms;
            let wakes = wakes.borrow().clone();
            Ok((wakes, hour_ms))
        },
    );
    let report = result.unwrap();
    let (wakes, hour_ms) = wakes.unwrap();
    let deadlines: Vec<u64> = wakes.iter().map(|(delay_ms, _)| *delay_ms).collect();
    assert_eq!(
        deadlines,
        vec![10, 10, 20, 30, 40, 50],
        "timers fired out of deadline order"
    );
    for (delay_ms, woke_ms) in &wakes {
        assert_eq!(
            delay_ms, woke_ms,
            "a timer fired at the wrong simulated instant"
        );
    }
    assert_eq!(hour_ms, 3_600_000);
    assert_eq!(report.sim_time_ms, 3_600_050);
    let real = started.elapsed();
    assert!(
        real < Duration::from_secs(5),
        "a simulated hour took {real:?} of real time"
    );
}

#[test]
fn test_step_bound_fails_clearly() {
    let config = SimConfig::new(3).with_steps_max(1_000);
    let err = Simulation::new(config)
        .run(|env| async move {
            loop {
                env.yield_now().await;
            }
            #[allow(unreachable_code)]
            Ok::<(), String>(())
        })
        .unwrap_err();
    assert!(
        matches!(
            err,
            SimError::StepLimit {
                seed: 3,
                steps_max: 1_000,
                ..
            }
        ),
        "{err:?}"
    );
    assert_eq!(err.step(), Some(1_000));
    let message = err.to_string();
    assert!(
        message.contains("step bound reached") && message.contains("with_steps_max"),
        "{message}"
    );
}

#[test]
fn test_time_bound_fails_clearly() {
    let config = SimConfig::new(3).with_sim_time_ms_max(1_000);
    let err = Simulation::new(config)
        .run(|env| async move {
            env.sleep(Duration::from_millis(999)).await;
            env.sleep(Duration::from_secs(2)).await;
            Ok::<(), String>(())
        })
        .unwrap_err();
    assert!(
        matches!(
            err,
            SimError::TimeLimit {
                seed: 3,
                sim_time_ms_max: 1_000,
                next_event_ms: 2_999,
                ..
            }
        ),
        "{err:?}"
    );
    assert!(err.to_string().contains("with_sim_time_ms_max"), "{err}");
}

#[test]
fn test_deadlock_fails_clearly() {
    let err = Simulation::new(SimConfig::from_env_or_random())
        .run(|env| async move {
            let stuck = env.spawn(std::future::pending::<()>());
            env.sleep(Duration::from_millis(5)).await;
            stuck.await.map_err(|e| e.to_string())?;
            Ok::<(), String>(())
        })
        .unwrap_err();
    let SimError::Deadlock {
        sim_time_ms,
        tasks_blocked,
        step,
        ..
    } = err
    else {
        panic!("expected a deadlock, got {err:?}");
    };
    assert_eq!(sim_time_ms, 5);
    assert_eq!(tasks_blocked, 1);
    assert!(step >= 2);
    assert!(
        err.to_string().contains("deadlock at step")
            && err.to_string().contains("nothing can ever wake it")
    );
}

/// Counts of one storage fault over [`FAULT_RATE_OPERATIONS`] sequential operations:
/// (observed by the caller, counted by the simulator, operations issued).
fn observe_storage_fault(fault: FaultType) -> (u64, u64, u64) {
    let simulation = Simulation::new(SimConfig::from_env_or_random())
        .with_fault(FaultConfig::new(fault, FAULT_RATE_PROBABILITY).unwrap());
    let (result, observed) = run_with_output(simulation, move |env| async move {
        let store = env.storage::<u64>();
        store
            .put("seed", 0)
            .await
            .or_else(|e| {
                if fault == FaultType::StorageReadFail {
                    Err(e)
                } else {
                    Ok(0)
                }
            })
            .map_err(|e| e.to_string())?;
        let max_ms = env.config().storage_latency_ms_max;
        let mut observed = 0;
        for op in 0..FAULT_RATE_OPERATIONS {
            let before = store.peek("k").map_or(0, |v| v.version);
            let started_ms = env.now_ms();
            let outcome = match fault {
                FaultType::StorageReadFail | FaultType::StorageLatency => {
                    store.get("k").await.map(|_| ())
                }
                _ => store.put("k", op).await.map(|_| ()),
            };
            let after = store.peek("k").map_or(0, |v| v.version);
            let fired = match (fault, outcome) {
                (FaultType::StorageLatency, _) => env.now_ms() - started_ms > max_ms,
                (FaultType::StorageWriteFail, Err(StorageError::WriteFailed { .. })) => {
                    assert_eq!(before, after, "a failed write was applied");
                    true
                }
                (FaultType::StorageCommitUnknown, Err(StorageError::CommitUnknown { .. })) => {
                    assert_eq!(before + 1, after, "a commit-unknown write was not applied");
                    true
                }
                (FaultType::StorageReadFail, Err(StorageError::ReadFailed { .. })) => true,
                (_, Ok(())) => false,
                (_, Err(other)) => return Err(format!("unexpected error {other}")),
            };
            observed += u64::from(fired);
        }
        Ok((observed, env.fault_fired(fault), store.operations()))
    });
    let report = result.unwrap();
    let (observed, counted, operations) = observed.unwrap();
    assert_eq!(report.fault_fired(fault), counted);
    (observed, counted, operations)
}

#[test]
fn test_storage_faults_fire_at_configured_rate() {
    let n = FAULT_RATE_OPERATIONS as f64;
    let p = FAULT_RATE_PROBABILITY;
    let expected = n * p;
    let tolerance = FAULT_RATE_TOLERANCE_SIGMAS * (n * p * (1.0 - p)).sqrt();
    for fault in [
        FaultType::StorageWriteFail,
        FaultType::StorageReadFail,
        FaultType::StorageCommitUnknown,
        FaultType::StorageLatency,
    ] {
        let (observed, counted, operations) = observe_storage_fault(fault);
        assert!(operations > FAULT_RATE_OPERATIONS);
        assert!(observed > 0, "{fault} never fired");
        let deviation = (observed as f64 - expected).abs();
        assert!(
            deviation <= tolerance,
            "{fault} fired {observed} times in {n} operations; expected {expected} ± {tolerance}"
        );
        // Every operation draws latency; writes and reads draw their own fault once each.
        let slack = if fault == FaultType::StorageLatency {
            0
        } else {
            counted - observed
        };
        assert!(
            counted >= observed && slack <= 1,
            "{fault}: counter {counted}, observed {observed}"
        );
    }
}

#[test]
fn test_commit_unknown_write_is_applied() {
    let simulation = Simulation::new(SimConfig::from_env_or_random())
        .with_fault(FaultConfig::new(FaultType::StorageCommitUnknown, 1.0).unwrap());
    let (result, checked) = run_with_output(simulation, |env| async move {
        let store = env.storage::<String>();
        let err = store.put("actor", "a".to_string()).await.unwrap_err();
        assert!(matches!(err, StorageError::CommitUnknown { .. }), "{err:?}");
        let stored = store
            .get("actor")
            .await
            .map_err(|e| e.to_string())?
            .expect("the write was applied");
        assert_eq!((stored.value.as_str(), stored.version), ("a", 1));
        let err = store
            .compare_and_swap("actor", Some(1), "b".to_string())
            .await
            .unwrap_err();
        assert!(matches!(err, StorageError::CommitUnknown { .. }));
        assert_eq!(
            store.peek("actor").map(|v| (v.value, v.version)),
            Some(("b".to_string(), 2))
        );
        // A retry that re-reads sees its own write: the conflict reveals it was applied.
        let retry = store
            .compare_and_swap("actor", Some(1), "b".to_string())
            .await;
        assert_eq!(
            retry,
            Ok(CasOutcome::Conflict {
                current_version: Some(2)
            })
        );
        Ok(env.fault_fired(FaultType::StorageCommitUnknown))
    });
    let report = result.unwrap();
    assert_eq!(checked, Some(2));
    assert_eq!(report.fault_fired(FaultType::StorageCommitUnknown), 2);
}

/// A deliberately failing scenario: ten tasks bump a counter in a seed-dependent order, and an
/// invariant fails the first time task 7 bumps it past a seed-dependent target.
fn canary(config: SimConfig) -> SimError {
    Simulation::new(config)
        .run(|env| async move {
            let target: u64 = env.rng("canary").gen_range(20..80);
            let state = Rc::new(RefCell::new((0u64, usize::MAX)));
            let observed = state.clone();
            env.add_invariant("task 7 never passes the target", move || {
                let (count, last) = *observed.borrow();
                if last == 7 && count > target {
                    Err(format!(
                        "task 7 bumped the counter to {count}, past {target}"
                    ))
                } else {
                    Ok(())
                }
            });
            let handles: Vec<_> = (0..10)
                .map(|task| {
                    let (env, state) = (env.clone(), state.clone());
                    env.clone().spawn(async move {
                        for _ in 0..20 {
                            {
                                let mut state = state.borrow_mut();
                                state.0 += 1;
                                state.1 = task;
                            }
                            env.yield_now().await;
                        }
                    })
                })
                .collect();
            for handle in handles {
                handle.await.map_err(|e| e.to_string())?;
            }
            Ok::<(), String>(())
        })
        .expect_err("the canary must fail")
}

#[test]
fn test_canary_failure_prints_seed_and_replays_at_same_step() {
    let config = SimConfig::from_env_or_random();
    let seed = config.seed;
    let first = canary(config);
    let SimError::InvariantViolated {
        step,
        ref message,
        ref invariant,
        ..
    } = first
    else {
        panic!("expected an invariant violation, got {first:?}");
    };
    assert_eq!(invariant, "task 7 never passes the target");
    let replay = canary(SimConfig::new(
        first.seed().expect("a run failure has a seed"),
    ));
    assert_eq!(replay, first, "replaying seed {seed} failed differently");
    assert_eq!(replay.step(), Some(step));
    assert!(message.contains("task 7"));
    // Different seeds fail at different steps.
    let steps: std::collections::BTreeSet<Option<u64>> = (100..105)
        .map(|s| canary(SimConfig::new(s)).step())
        .collect();
    assert!(
        steps.len() > 1,
        "the canary failed at the same step for five seeds: {steps:?}"
    );

    // The honest check of the banner: run the canary in a child process and read its stderr.
    let child = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            CANARY_CHILD_TEST,
            "--exact",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CANARY_CHILD_ENV, "1")
        .env("DST_SEED", seed.to_string())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&child.stderr);
    let mut lines = stderr.lines();
    assert_eq!(
        lines.next(),
        Some(format!("DST_SEED={seed}").as_str()),
        "stderr was:\n{stderr}"
    );
    let command = lines.next().unwrap_or_default();
    // Cargo sets CARGO_PKG_NAME when it runs the binary; run by hand, the command has no -p.
    let package = std::env::var("CARGO_PKG_NAME")
        .map(|p| format!(" -p {p}"))
        .unwrap_or_default();
    let expected = format!(
        "DST_SEED={seed} cargo test{package} --test harness_dst {CANARY_CHILD_TEST} -- --exact \
         --include-ignored"
    );
    assert!(
        command.ends_with(&expected),
        "reproduce command {command:?}, expected {expected:?}"
    );
    assert!(
        stderr.contains(&format!("at step {step}")),
        "stderr was:\n{stderr}"
    );
    assert!(
        child.status.success(),
        "the child canary test itself should pass: {stderr}"
    );
}

/// Runs the canary only when spawned by the test above; otherwise passes at once.
#[test]
fn hidden_canary_child_process() {
    if std::env::var_os(CANARY_CHILD_ENV).is_none() {
        return;
    }
    let err = canary(SimConfig::from_env_or_random());
    assert!(matches!(err, SimError::InvariantViolated { .. }));
}

#[test]
fn test_node_clocks_have_offset_and_drift() {
    let (result, checked) = run_with_output(
        Simulation::new(SimConfig::from_env_or_random()),
        |env| async move {
            let steady = env.node_clock(0, 0);
            let fast = env.node_clock(1_000, 100_000);
            let slow = env.node_clock(0, -200_000);
            env.sleep(Duration::from_secs(10)).await;
            assert_eq!(
                (steady.now_ms(), fast.now_ms(), slow.now_ms()),
                (10_000, 12_000, 8_000)
            );
            // 1100 ms on a clock running 10% fast take 1000 ms of true time.
            let start_ms = env.now_ms();
            let shared: Arc<dyn Clock> = Arc::new(fast.clone());
            shared.sleep(Duration::from_millis(1_100)).await;
            assert_eq!(env.now_ms() - start_ms, 1_000);
            // A jump forward ends a pending sleep on that clock at once.
            let sleeper = {
                let (env, slow) = (env.clone(), slow.clone());
                env.clone().spawn(async move {
                    slow.sleep_local(Duration::from_secs(100)).await;
                    env.now_ms()
                })
            };
            env.sleep(Duration::from_millis(10)).await;
            let jumped_at_ms = env.now_ms();
            slow.jump_forward(200_000);
            let woke_ms = sleeper.await.map_err(|e| e.to_string())?;
            assert_eq!(woke_ms, jumped_at_ms);
            Ok(slow.now_ms() > 200_000)
        },
    );
    result.unwrap();
    assert_eq!(checked, Some(true));
}

#[test]
fn test_storage_crash_and_restart_keep_acknowledged_writes() {
    let (result, checked) = run_with_output(
        Simulation::new(SimConfig::from_env_or_random()),
        |env| async move {
            let store = env.storage::<u64>();
            let mut acknowledged = Vec::new();
            for i in 0..20u64 {
                let key = format!("k{i}");
                let version = store.put(&key, i).await.map_err(|e| e.to_string())?;
                acknowledged.push((key, i, version));
            }
            // A write in flight when the store crashes: applied or not, never half-applied.
            let in_flight = {
                let store = store.clone();
                env.spawn(async move { store.put("in-flight", 99).await })
            };
            env.yield_now().await;
            store.crash();
            assert!(store.is_crashed());
            let during = store.get("k0").await;
            assert!(
                matches!(during, Err(StorageError::Unavailable { .. })),
                "{during:?}"
            );
            let in_flight = in_flight.await.map_err(|e| e.to_string())?;
            assert!(
                matches!(in_flight, Err(StorageError::Unavailable { .. })),
                "{in_flight:?}"
            );
            env.sleep(Duration::from_secs(1)).await;
            store.restart();
            for (key, value, version) in &acknowledged {
                let stored = store.get(key).await.map_err(|e| e.to_string())?;
                assert_eq!(
                    stored.map(|v| (v.value, v.version)),
                    Some((*value, *version)),
                    "lost {key}"
                );
            }
            let in_flight_version = store.peek("in-flight").map(|v| v.version);
            assert!(matches!(in_flight_version, None | Some(1)));
            Ok(store.keys().len())
        },
    );
    result.unwrap();
    assert!(matches!(checked, Some(20 | 21)));
}

#[test]
fn test_fault_config_rejects_probability_outside_zero_to_one_and_nan() {
    for bad in [-0.01, 1.01, f64::NAN, f64::INFINITY, f64::NEG_INFINITY] {
        let err = FaultConfig::new(FaultType::StorageWriteFail, bad).unwrap_err();
        assert!(matches!(
            err,
            SimError::InvalidProbability {
                fault: FaultType::StorageWriteFail,
                ..
            }
        ));
        assert!(err.to_string().contains("0..=1"), "{err}");
    }
    for good in [0.0, 0.5, 1.0] {
        assert_eq!(
            FaultConfig::new(FaultType::StorageWriteFail, good)
                .unwrap()
                .probability,
            good
        );
    }
    // The fields are public, so a run re-validates instead of trusting them.
    let sneaky = FaultConfig {
        fault: FaultType::NetworkDelay,
        probability: 2.0,
    };
    let err = Simulation::new(SimConfig::new(1))
        .with_fault(sneaky)
        .run(|_env| async { Ok::<(), String>(()) });
    assert!(matches!(
        err,
        Err(SimError::InvalidProbability {
            fault: FaultType::NetworkDelay,
            ..
        })
    ));
}

#[test]
fn test_every_configured_fault_fires_and_is_counted() {
    let mut simulation = Simulation::new(SimConfig::from_env_or_random());
    // Every fault a probability injects; the drop counters are refused one (fault.rs).
    for fault in FaultType::all().iter().filter(|f| f.is_injectable()) {
        simulation = simulation.with_fault(FaultConfig::new(*fault, 0.2).unwrap());
    }
    let (result, live) = run_with_output(simulation, |env| async move {
        let store = env.storage::<u64>();
        for i in 0..200u64 {
            let _ = store.put("k", i).await;
            let _ = store.get("k").await;
        }
        let network = env.network::<u64>(4);
        network.partition(&[0, 1], &[2, 3]);
        for i in 0..200u64 {
            network.send((i % 4) as usize, ((i + 1) % 4) as usize, i);
        }
        env.sleep(Duration::from_secs(1)).await;
        Ok(env.faults())
    });
    let report = result.unwrap();
    let live = live.unwrap();
    // The scenario-driven faults (crashes, clock jumps, partition windows) are fired by the
    // swarm's chaos task and asserted in swarm_dst; here every component-drawn fault, plus the
    // partition drop counter, must fire.
    let component_faults = FaultType::all()
        .iter()
        .filter(|f| f.is_drawn_by_components() || **f == FaultType::NetworkPartition);
    for fault in component_faults {
        assert!(
            report.fault_fired(*fault) > 0,
            "{fault} never fired: {report}"
        );
        assert_eq!(report.fault_fired(*fault), live.get(*fault));
    }
}

#[test]
fn test_invariant_violation_names_the_invariant_and_step() {
    let (result, _) = run_with_output(
        Simulation::new(SimConfig::from_env_or_random()),
        |env| async move {
            let counter = Rc::new(RefCell::new(0u64));
            let seen = counter.clone();
            env.add_invariant("counter stays below 5", move || {
                let value = *seen.borrow();
                if value < 5 {
                    Ok(())
                } else {
                    Err(format!("counter is {value}"))
                }
            });
            for _ in 0..10 {
                *counter.borrow_mut() += 1;
                env.yield_now().await;
            }
            Ok(())
        },
    );
    let (invariant, message, step) = violation(result.unwrap_err());
    assert_eq!(invariant, "counter stays below 5");
    assert_eq!(message, "counter is 5");
    assert_eq!(
        step, 5,
        "the main task is the only task, so bump n happens in step n"
    );

    let report = Simulation::new(SimConfig::from_env_or_random())
        .run(|env| async move {
            env.add_invariant("always true", || Ok(()));
            for _ in 0..9 {
                env.yield_now().await;
            }
            Ok::<(), String>(())
        })
        .unwrap();
    assert_eq!(report.steps, 10);
    assert_eq!(report.checks_evaluated, 10);
}

/// A group of invariants checked by one call reports a violation, or a panic, under the name
/// of the member that was running, and counts each member it ran as one evaluation.
#[test]
fn test_a_group_of_invariants_names_the_member_that_failed() {
    // Member `failing` of three fails (or panics) once the counter reaches 3.
    let run = |failing: usize, panics: bool| {
        Simulation::new(SimConfig::from_env_or_random()).run(move |env| async move {
            let counter = Rc::new(RefCell::new(0u64));
            let seen = counter.clone();
            let names = vec!["first", "second", "third"];
            env.add_invariants(names, move |at| {
                for member in 0..3 {
                    at.set(member);
                    let value = *seen.borrow();
                    if member == failing && value >= 3 {
                        if panics {
                            panic!("member {member} panicked at {value}");
                        }
                        return Err(format!("member {member} failed at {value}"));
                    }
                }
                Ok(())
            });
            for _ in 0..5 {
                *counter.borrow_mut() += 1;
                env.yield_now().await;
            }
            Ok::<(), String>(())
        })
    };
    let mut checked = 0;
    for (failing, name) in [(0, "first"), (1, "second"), (2, "third")] {
        for panics in [false, true] {
            let (invariant, message, step) = violation(run(failing, panics).unwrap_err());
            assert_eq!(invariant, name, "panics: {panics}");
            assert_eq!(step, 3, "the counter reaches 3 in step 3");
            let expected = match panics {
                true => format!("member {failing} panicked at 3"),
                false => format!("member {failing} failed at 3"),
            };
            assert!(message.contains(&expected), "{message}");
            assert_eq!(
                message.starts_with("the check panicked"),
                panics,
                "{message}"
            );
            checked += 1;
        }
    }
    assert_eq!(checked, 6);

    // Passing steps count every member; nothing fails when no member is set to.
    let report = run(usize::MAX, false).unwrap();
    assert_eq!(report.steps, 6);
    assert_eq!(report.checks_evaluated, 3 * 6);
}

/// An observer runs after every step, as invariants do, but is no check: it adds nothing to
/// the count of checks evaluated, and only a panic in it fails the run, under its name.
#[test]
fn test_an_observer_runs_after_every_step_uncounted() {
    let run = |panics_at: u64| {
        let observed = Rc::new(RefCell::new(Vec::new()));
        let seen = observed.clone();
        let result = Simulation::new(SimConfig::from_env_or_random()).run(move |env| {
            let observing = seen.clone();
            // Each run of the seed (two under DST_CHECK_DETERMINISM) observes afresh.
            observing.borrow_mut().clear();
            async move {
                let steps = env.clone();
                env.add_observer("the observer", move || {
                    let step = steps.step();
                    assert!(step != panics_at, "observed step {step}");
                    observing.borrow_mut().push(step);
                });
                env.add_invariant("one", || Ok(()));
                for _ in 0..5 {
                    env.yield_now().await;
                }
                Ok::<(), String>(())
            }
        });
        let observed = observed.borrow().clone();
        (result, observed)
    };
    let (report, observed) = run(u64::MAX);
    let report = report.unwrap();
    assert_eq!(report.steps, 6);
    assert_eq!(observed, [1, 2, 3, 4, 5, 6], "once after every step");
    assert_eq!(
        report.checks_evaluated, 6,
        "the invariant's, not the observer's"
    );

    let (error, observed) = run(4);
    let (invariant, message, step) = violation(error.unwrap_err());
    assert_eq!((invariant.as_str(), step), ("the observer", 4));
    assert!(message.contains("observed step 4"), "{message}");
    assert_eq!(observed, [1, 2, 3]);
}

/// A check may register another invariant while the list is being evaluated: the new one
/// is not evaluated in that pass, joins the list after it, is checked after every step from
/// the next one on, and its violation fails the run under its name.
#[test]
fn test_an_invariant_registered_by_a_check_joins_after_the_pass() {
    let registered_at = Rc::new(std::cell::Cell::new(None));
    let late_checked = Rc::new(RefCell::new(Vec::new()));
    let (registered, checked) = (registered_at.clone(), late_checked.clone());
    let config = SimConfig::new(1).with_check_determinism(false);
    let result = Simulation::new(config).run(move |env| {
        let (registered, checked) = (registered.clone(), checked.clone());
        async move {
            let registrar = env.clone();
            env.add_invariant("registrar", move || {
                if registered.get().is_none() {
                    registered.set(Some(registrar.step()));
                    let (late_env, checked) = (registrar.clone(), checked.clone());
                    registrar.add_invariant("late", move || {
                        let step = late_env.step();
                        checked.borrow_mut().push(step);
                        if step == 4 {
                            return Err("late fails at step 4".to_string());
                        }
                        Ok(())
                    });
                }
                Ok(())
            });
            for _ in 0..10 {
                env.yield_now().await;
            }
            Ok::<(), String>(())
        }
    });
    let (invariant, message, step) = violation(result.unwrap_err());
    assert_eq!((invariant.as_str(), step), ("late", 4), "{message}");
    assert_eq!(registered_at.get(), Some(1));
    assert_eq!(
        *late_checked.borrow(),
        [2, 3, 4],
        "from the step after it was added"
    );
}

/// The invariant, message and step of an invariant violation.
fn violation(err: SimError) -> (String, String, u64) {
    match err {
        SimError::InvariantViolated {
            invariant,
            message,
            step,
            ..
        } => (invariant, message, step),
        other => panic!("expected an invariant violation, got {other:?}"),
    }
}

#[test]
fn test_panic_in_a_task_fails_the_run_with_its_message_and_step() {
    let err = Simulation::new(SimConfig::from_env_or_random())
        .run(|env| async move {
            let task = env.spawn({
                let env = env.clone();
                async move {
                    env.sleep(Duration::from_millis(3)).await;
                    panic!("boom in a task");
                }
            });
            task.await.map_err(|e| e.to_string())?;
            Ok::<(), String>(())
        })
        .unwrap_err();
    let SimError::Panicked {
        message,
        sim_time_ms,
        step,
        ..
    } = err
    else {
        panic!("expected a panic failure, got {err:?}");
    };
    assert!(
        message.contains("boom in a task") && message.contains("harness_dst.rs"),
        "{message}"
    );
    assert_eq!(sim_time_ms, 3);
    assert!(step >= 3);
}

#[test]
fn test_scenario_error_fails_the_run() {
    let err = Simulation::new(SimConfig::new(5))
        .run(|env| async move {
            env.sleep(Duration::from_millis(7)).await;
            Err::<(), String>("the lease was lost".into())
        })
        .unwrap_err();
    assert_eq!(
        err,
        SimError::ScenarioFailed {
            seed: 5,
            step: 2,
            sim_time_ms: 7,
            message: "the lease was lost".into()
        }
    );
}

#[test]
fn test_join_handles_return_output_and_abort_cancels() {
    let (result, checked) = run_with_output(
        Simulation::new(SimConfig::from_env_or_random()),
        |env| async move {
            let answer = env.spawn(async { 42 });
            let sleeper = env.spawn({
                let env = env.clone();
                async move {
                    env.sleep(Duration::from_secs(60)).await;
                    1
                }
            });
            assert_eq!(answer.await, Ok(42));
            sleeper.abort();
            assert_eq!(sleeper.await, Err(kelpie_sim::Cancelled));
            // The aborted sleep's timer is gone, so time does not jump to it.
            env.sleep(Duration::from_millis(1)).await;
            Ok(env.now_ms())
        },
    );
    let report = result.unwrap();
    assert_eq!(checked, Some(1));
    assert_eq!(report.sim_time_ms, 1, "a cancelled timer still moved time");
}

#[test]
fn test_network_delivers_within_latency_and_partitions_drop() {
    let config = SimConfig::from_env_or_random().with_network_latency_ms(1, 20);
    let (result, checked) = run_with_output(Simulation::new(config), |env| async move {
        let network = env.network::<(u64, u64)>(4);
        let mut latencies = Vec::new();
        for i in 0..50u64 {
            network.send(0, 1, (i, env.now_ms()));
            let (from, (_, sent_ms)) = network.recv(1).await;
            assert_eq!(from, 0);
            latencies.push(env.now_ms() - sent_ms);
        }
        assert!(
            latencies.iter().all(|ms| (1..=20).contains(ms)),
            "{latencies:?}"
        );
        network.partition(&[0, 1], &[2, 3]);
        network.send(0, 2, (0, 0));
        network.send(3, 1, (0, 0));
        network.send(0, 1, (7, 0));
        env.sleep(Duration::from_millis(50)).await;
        assert_eq!(network.try_recv(2), None);
        assert_eq!(network.try_recv(1).map(|(_, (tag, _))| tag), Some(7));
        network.heal();
        network.send(0, 2, (8, 0));
        let (_, (tag, _)) = network.recv(2).await;
        assert_eq!(tag, 8);
        Ok((
            network.delivered(),
            network.dropped(),
            env.fault_fired(FaultType::NetworkPartition),
        ))
    });
    result.unwrap();
    assert_eq!(checked, Some((52, 2, 2)));
}

#[test]
fn test_nondeterminism_is_detected_at_the_first_divergent_step() {
    use std::sync::atomic::{AtomicU64, Ordering};
    // State outside the simulation that changes between the two runs: exactly the kind of
    // leak (like a real clock) the determinism check exists to catch.
    static RUNS: AtomicU64 = AtomicU64::new(0);
    let config = SimConfig::new(9).with_check_determinism(true);
    let err = Simulation::new(config)
        .run(|env| async move {
            let run = RUNS.fetch_add(1, Ordering::SeqCst);
            // Steps 1 to 3 are identical; step 4 folds the differing value into the trace.
            for _ in 0..3 {
                env.yield_now().await;
            }
            env.trace(run);
            env.yield_now().await;
            Ok::<(), String>(())
        })
        .unwrap_err();
    assert!(
        matches!(
            err,
            SimError::Nondeterministic {
                seed: 9,
                step: 4,
                ..
            }
        ),
        "{err:?}"
    );
    assert!(err.to_string().contains("diverged at step 4"));
}

/// Environment variable that makes the hidden malformed-seed test run (in a child process).
const SEED_CHILD_ENV: &str = "KELPIE_DST_SEED_CHILD";
/// Name of the hidden malformed-seed test, run as a child process.
const SEED_CHILD_TEST: &str = "hidden_malformed_seed_child_process";

#[test]
fn test_malformed_dst_seed_is_a_clear_error_not_a_random_seed() {
    // Run in a child process: setting DST_SEED here would race with the other tests.
    let child = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            SEED_CHILD_TEST,
            "--exact",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(SEED_CHILD_ENV, "1")
        .env("DST_SEED", "0x2a")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&child.stderr);
    assert!(
        !child.status.success(),
        "a malformed DST_SEED must fail the test: {stderr}"
    );
    assert!(
        stderr.contains("DST_SEED=\"0x2a\" is not a decimal u64 seed"),
        "stderr was:\n{stderr}"
    );
}

/// Checks the fallible and the panicking readers of a malformed `DST_SEED`, when spawned by
/// the test above; otherwise passes at once.
#[test]
fn hidden_malformed_seed_child_process() {
    if std::env::var_os(SEED_CHILD_ENV).is_none() {
        return;
    }
    let err = SimConfig::from_env().unwrap_err();
    assert_eq!(
        err,
        SimError::InvalidSeed {
            value: "0x2a".to_string()
        }
    );
    assert_eq!(SimConfig::seed_from_env(), Err(err));
    let _ = SimConfig::from_env_or_random();
}

#[test]
fn test_bounded_mailbox_drops_and_counts_overflow() {
    use kelpie_sim::NetworkConfig;
    let report = Simulation::new(SimConfig::new(3))
        .run(|env| async move {
            let config = NetworkConfig {
                hosts: 2,
                latency_ms_min: 1,
                latency_ms_max: 1,
                mailbox_capacity: 4,
            };
            let network = kelpie_sim::SimNetwork::<u32>::with_config(&env, config);
            for i in 0..10 {
                network.send(0, 1, i);
            }
            env.sleep(std::time::Duration::from_millis(5)).await;
            let mut received = Vec::new();
            while let Some((_, message)) = network.try_recv(1) {
                received.push(message);
            }
            if received != vec![0, 1, 2, 3] {
                return Err(format!("received {received:?}"));
            }
            Ok::<(), String>(())
        })
        .unwrap();
    assert_eq!(report.fault_fired(FaultType::NetworkQueueOverflow), 6);
}
