//! A tokio service that holds actors under leases, the way a runtime embeds Kelpie: one
//! [`LeaseSession`] per process on the SQLite store, a campaign per wanted actor, the actor's
//! state written through a fenced state store with the lease's token while the guard is
//! valid, and on SIGTERM a shutdown that releases every lease before exiting 0.
//!
//! ```sh
//! cargo run -p kelpie-lease --example service -- --node node-a --actors a1,a2,a3 \
//!     --store /tmp/leases.db --state /tmp/state.db
//! ```
//!
//! Start two with different `--node`s on the same files: each actor is held by one of them at
//! a time, and `kill -TERM` on one hands its actors to the other. Every line on stdout is one
//! event, `key=value` separated, with `wall_ms` (ms since the UNIX epoch) last.
//!
//! Options: `--lease-ms` (default 1000), `--poll-ms` (a campaign's longest wait between
//! attempts, default 40), `--write-every-ms` (default 50), and `--work-ms` (time between
//! checking the lease and writing, default 0: the gap a stop-the-world pause falls into).

use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use kelpie_core::{ActorId, NodeId};
use kelpie_lease::{
    CancellationToken, FencedStateStore, LeaseConfig, LeaseSession, SessionConfig, SessionError,
    SqliteFencedStateStore, SqliteLeaseManager, SqliteLeaseStore, StateError,
};

struct Args {
    node: String,
    actors: Vec<String>,
    store: PathBuf,
    state: PathBuf,
    lease_ms: u64,
    poll_ms: u64,
    write_every_ms: u64,
    work_ms: u64,
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        node: String::new(),
        actors: Vec::new(),
        store: PathBuf::from("kelpie-leases.db"),
        state: PathBuf::from("kelpie-state.db"),
        lease_ms: 1_000,
        poll_ms: 40,
        write_every_ms: 50,
        work_ms: 0,
    };
    let mut given = std::env::args().skip(1);
    while let Some(flag) = given.next() {
        let value = given.next().ok_or(format!("{flag} needs a value"))?;
        let number = || {
            value
                .parse::<u64>()
                .map_err(|_| format!("{flag} takes a number"))
        };
        match flag.as_str() {
            "--node" => args.node = value.clone(),
            "--actors" => args.actors = value.split(',').map(str::to_string).collect(),
            "--store" => args.store = PathBuf::from(&value),
            "--state" => args.state = PathBuf::from(&value),
            "--lease-ms" => args.lease_ms = number()?,
            "--poll-ms" => args.poll_ms = number()?,
            "--write-every-ms" => args.write_every_ms = number()?,
            "--work-ms" => args.work_ms = number()?,
            other => return Err(format!("unknown option {other}")),
        }
    }
    if args.node.is_empty() || args.actors.is_empty() {
        return Err("--node and --actors are required".into());
    }
    Ok(args)
}

/// One event line on stdout, flushed at once (a parent process reads them as they come).
fn say(line: String) {
    // The wall clock, only to timestamp what is printed for a person or a test.
    #[allow(clippy::disallowed_methods)]
    let wall_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis());
    let mut stdout = std::io::stdout().lock();
    let _ = writeln!(stdout, "{line} wall_ms={wall_ms}");
    let _ = stdout.flush();
}

#[allow(clippy::disallowed_methods)] // a real process on the real clock
async fn pause(ms: u64) {
    tokio::time::sleep(Duration::from_millis(ms)).await;
}

#[tokio::main]
async fn main() {
    let args = match parse_args() {
        Ok(args) => args,
        Err(error) => {
            eprintln!("service: {error}");
            std::process::exit(2);
        }
    };
    if let Err(error) = run(args).await {
        eprintln!("service: {error}");
        std::process::exit(1);
    }
}

async fn run(args: Args) -> Result<(), Box<dyn std::error::Error>> {
    let store = SqliteLeaseStore::open(&args.store)?;
    let manager = Arc::new(SqliteLeaseManager::new(
        store,
        LeaseConfig::new(args.lease_ms)?,
    ));
    let config = SessionConfig::default().with_campaign_poll_ms_max(args.poll_ms);
    let session = LeaseSession::start(manager, NodeId::new(args.node.as_str())?, config)?;
    let state = Arc::new(SqliteFencedStateStore::open(&args.state)?);
    let stopping = CancellationToken::new();
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    say(format!("ready holder={}", session.holder_id()));
    let mut workers = Vec::new();
    for name in &args.actors {
        let actor = ActorId::new(name.as_str())?;
        let worker = hold(
            session.clone(),
            Arc::clone(&state),
            actor,
            stopping.clone(),
            (args.write_every_ms, args.work_ms),
        );
        workers.push(tokio::spawn(worker));
    }
    terminate.recv().await;
    stopping.cancel();
    let report = session.shutdown().await;
    say(format!(
        "shutdown released={} unanswered={}",
        report.released, report.unanswered
    ));
    for worker in workers {
        let _ = worker.await;
    }
    Ok(())
}

/// Holds `actor` whenever this process can: campaign, fence the state store with the new
/// token, write while the guard is valid, and campaign again when it is lost.
async fn hold(
    session: LeaseSession<SqliteLeaseManager>,
    state: Arc<SqliteFencedStateStore>,
    actor: ActorId,
    stopping: CancellationToken,
    (write_every_ms, work_ms): (u64, u64),
) {
    let mut writes = 0u64;
    loop {
        let guard = tokio::select! {
            guard = session.campaign(&actor) => guard,
            () = stopping.cancelled() => return,
        };
        let guard = match guard {
            Ok(guard) => guard,
            Err(SessionError::ShuttingDown) => return,
            Err(error) => {
                say(format!("campaign-failed actor={actor} error={error:?}"));
                pause(write_every_ms.max(10)).await;
                continue;
            }
        };
        let token = guard.fencing_token();
        say(format!("acquired actor={actor} token={token}"));
        // A new holder fences first, so every later write of an earlier holder is refused.
        if let Err(error) = state.fence(&actor, token).await {
            say(format!(
                "fence-refused actor={actor} token={token} error={error}"
            ));
            continue;
        }
        while guard.is_valid() {
            // The work between checking the lease and writing: a process paused here writes
            // late, with its old token, and the fenced store refuses it.
            pause(work_ms).await;
            writes += 1;
            let value = format!("write {writes} by {}", session.holder_id());
            match state.write(&actor, token, value.as_bytes()).await {
                Ok(()) => say(format!("write actor={actor} token={token} accepted")),
                Err(StateError::StaleToken { highest_token, .. }) => {
                    say(format!(
                        "write actor={actor} token={token} refused highest={highest_token}"
                    ));
                    break;
                }
                Err(error) => say(format!("write actor={actor} token={token} error={error}")),
            }
            tokio::select! {
                () = pause(write_every_ms) => {}
                () = guard.cancellation().cancelled() => {}
            }
        }
        say(format!("stopped actor={actor} token={token}"));
        // Dropping the guard releases the lease (if it is still this node's).
    }
}
