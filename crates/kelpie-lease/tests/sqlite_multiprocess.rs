//! Two processes contend for the same actors on one SQLite file. Each logs every lease it was
//! granted, extended or released with the store times the store decided; the parent checks
//! that for every actor no two holders' validity intervals overlap and that tokens strictly
//! increase from one holder to the next.
//!
//! The children are this test binary re-invoked to run only the `#[ignore]`d
//! `multiprocess_child_entry`, which does nothing unless [`CHILD_DB_ENV`] names a file.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use kelpie_core::limits::LEASE_DURATION_MS_MIN;
use kelpie_core::{ActorId, Clock, NodeId, TokioClock};
use kelpie_lease::{
    backend::LeaseOp, backend::LeaseRecord, backend::LeaseRequest, backend::LeaseStore,
    backend::SqliteLeaseStore,
};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// How long each child contends, on its own clock.
const CHILD_RUN_MS: u64 = 1_500;
/// Actors both children want.
const ACTOR_COUNT: usize = 3;
/// Longest pause between a holder's renewals; below the lease duration, so most succeed.
const HOLD_PAUSE_MS_MAX: u64 = 40;
/// Longest pause before retrying a refused acquire.
const RETRY_PAUSE_MS_MAX: u64 = 20;
/// Most renewals in one holding.
const RENEWALS_MAX: u32 = 3;

const CHILD_DB_ENV: &str = "KELPIE_MP_CHILD_DB";
const CHILD_NODE_ENV: &str = "KELPIE_MP_CHILD_NODE";
const CHILD_SEED_ENV: &str = "KELPIE_MP_CHILD_SEED";

#[test]
#[ignore = "a child process of two_processes_never_hold_the_same_lease; runs only when re-invoked"]
fn multiprocess_child_entry() {
    let Ok(db) = std::env::var(CHILD_DB_ENV) else {
        return;
    };
    let node = NodeId::new(std::env::var(CHILD_NODE_ENV).unwrap()).unwrap();
    let seed: u64 = std::env::var(CHILD_SEED_ENV).unwrap().parse().unwrap();
    // Ends the line libtest started ("test multiprocess_child_entry ... "), so that every
    // event below is on a line of its own.
    report("START");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_time()
        .build()
        .unwrap();
    runtime.block_on(async {
        let store = Arc::new(SqliteLeaseStore::open(&db).unwrap());
        let clock = Arc::new(TokioClock::new());
        let tasks: Vec<_> = (0..ACTOR_COUNT)
            .map(|index| {
                let actor = ActorId::new(format!("actor-{index}")).unwrap();
                let rng = ChaCha8Rng::seed_from_u64(seed.wrapping_add(index as u64));
                let (store, clock, node) = (Arc::clone(&store), Arc::clone(&clock), node.clone());
                tokio::spawn(contend(store, clock, actor, node, rng))
            })
            .collect();
        for task in tasks {
            task.await.unwrap();
        }
    });
    report("DONE");
}

/// Takes, holds and gives up (or abandons) one actor's lease until the run time is over.
async fn contend(
    store: Arc<SqliteLeaseStore>,
    clock: Arc<TokioClock>,
    actor: ActorId,
    node: NodeId,
    mut rng: ChaCha8Rng,
) {
    while clock.now_ms() < CHILD_RUN_MS {
        let Some(granted) = apply(&store, &actor, &node, LeaseOp::Acquire).await else {
            pause(&clock, rng.gen_range(0..=RETRY_PAUSE_MS_MAX)).await;
            continue;
        };
        log("GRANT", &actor, &node, &granted);
        for _ in 0..rng.gen_range(0..=RENEWALS_MAX) {
            pause(&clock, rng.gen_range(0..=HOLD_PAUSE_MS_MAX)).await;
            match apply(&store, &actor, &node, LeaseOp::Renew).await {
                Some(renewed) => log("EXTEND", &actor, &node, &renewed),
                None => break,
            }
        }
        if rng.gen_bool(0.7) {
            if let Some(released) = apply(&store, &actor, &node, LeaseOp::Release).await {
                log("END", &actor, &node, &released);
            }
        }
        // Otherwise the lease is abandoned, and the other process may take it once expired.
        pause(&clock, rng.gen_range(0..=RETRY_PAUSE_MS_MAX)).await;
    }
}

/// One operation through the store, returning the record written if it succeeded: its store
/// times are what the parent checks.
async fn apply(
    store: &SqliteLeaseStore,
    actor: &ActorId,
    node: &NodeId,
    op: LeaseOp,
) -> Option<LeaseRecord> {
    let request = LeaseRequest {
        fencing_token: None,
        op,
        node_id: node.clone(),
        lease_duration_ms: LEASE_DURATION_MS_MIN,
    };
    let decision = store.apply(actor, &request).await.unwrap();
    decision.reply.ok()?;
    Some(decision.write.expect("a successful operation writes"))
}

async fn pause(clock: &TokioClock, duration_ms: u64) {
    clock.sleep(Duration::from_millis(duration_ms)).await;
}

fn log(event: &str, actor: &ActorId, node: &NodeId, record: &LeaseRecord) {
    // For END the record is the released one, whose expiry is the moment of release.
    report(&format!(
        "{event} {actor} {node} {} {} {}",
        record.fencing_token, record.acquired_at_ms, record.expires_at_ms
    ));
}

fn report(line: &str) {
    let mut stdout = std::io::stdout().lock();
    writeln!(stdout, "{line}").unwrap();
    stdout.flush().unwrap();
}

/// Kills the child when dropped, so a failing parent leaves no process behind.
struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn spawn_child(db: &Path, node: &str, seed: u64) -> KillOnDrop {
    let child = Command::new(std::env::current_exe().unwrap())
        .args([
            "multiprocess_child_entry",
            "--exact",
            "--nocapture",
            "--ignored",
        ])
        .args(["--test-threads", "1"])
        .env(CHILD_DB_ENV, db)
        .env(CHILD_NODE_ENV, node)
        .env(CHILD_SEED_ENV, seed.to_string())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    KillOnDrop(child)
}

/// One holder's validity on the store clock: from its acquisition to its last known expiry,
/// or to its release.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Holding {
    node: String,
    start_ms: u64,
    end_ms: u64,
}

/// Holdings per actor, keyed by fencing token.
type Holdings = BTreeMap<String, BTreeMap<u64, Holding>>;

fn record_line(holdings: &mut Holdings, line: &str) -> bool {
    let fields: Vec<&str> = line.split(' ').collect();
    let [event, actor, node, token, acquired_at_ms, expires_at_ms] = fields[..] else {
        return false;
    };
    if !matches!(event, "GRANT" | "EXTEND" | "END") {
        return false;
    }
    let number = |field: &str| -> u64 { field.parse().unwrap() };
    let (token, start_ms, end_ms) = (number(token), number(acquired_at_ms), number(expires_at_ms));
    let by_token = holdings.entry(actor.to_string()).or_default();
    let holding = by_token.entry(token).or_insert_with(|| Holding {
        node: node.to_string(),
        start_ms,
        end_ms,
    });
    assert_eq!(
        (holding.node.as_str(), holding.start_ms),
        (node, start_ms),
        "{actor} token {token} was handed to two holdings: {holding:?} and {line:?}"
    );
    holding.end_ms = match event {
        // The last holder may release after its lease expired, so validity ended at whichever
        // came first.
        "END" => holding.end_ms.min(end_ms),
        _ => holding.end_ms.max(end_ms),
    };
    true
}

fn check_no_overlap(holdings: &Holdings) -> usize {
    let mut handovers = 0;
    for (actor, by_token) in holdings {
        let ordered: Vec<_> = by_token.iter().collect();
        for pair in ordered.windows(2) {
            let ((token_a, a), (token_b, b)) = (pair[0], pair[1]);
            assert!(token_a < token_b);
            assert!(
                a.end_ms <= b.start_ms,
                "{actor}: token {token_b} ({b:?}) granted while token {token_a} ({a:?}) was valid"
            );
            handovers += usize::from(a.node != b.node);
        }
    }
    handovers
}

#[test]
fn two_processes_never_hold_the_same_lease() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("leases.db");
    // Created first, so the children contend on leases rather than on creating the schema.
    drop(SqliteLeaseStore::open(&db).unwrap());
    let mut children = [
        spawn_child(&db, "node-p0", 1),
        spawn_child(&db, "node-p1", 2),
    ];
    let readers: Vec<_> = children
        .iter_mut()
        .map(|child| {
            let stdout = child.0.stdout.take().unwrap();
            std::thread::spawn(move || {
                BufReader::new(stdout)
                    .lines()
                    .map(Result::unwrap)
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    let outputs: Vec<Vec<String>> = readers.into_iter().map(|r| r.join().unwrap()).collect();
    for child in &mut children {
        assert!(child.0.wait().unwrap().success(), "a child failed");
    }
    let mut holdings = Holdings::new();
    for (index, lines) in outputs.iter().enumerate() {
        assert!(
            lines.iter().any(|l| l.ends_with("DONE")),
            "child {index} did not finish"
        );
        let events = lines
            .iter()
            .filter(|l| record_line(&mut holdings, l))
            .count();
        assert!(events > 0, "child {index} never held a lease");
    }
    let handovers = check_no_overlap(&holdings);
    let leases: usize = holdings.values().map(BTreeMap::len).sum();
    println!("two processes: {leases} holdings checked, {handovers} handovers between processes");
    assert!(
        handovers > 0,
        "the processes never took a lease from each other"
    );
}
