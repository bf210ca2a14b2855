//! A tokio service that holds actors under leases, the way a runtime embeds Kelpie: one
//! [`LeaseSession`] per process on the SQLite store, a [`Placement`] over it that campaigns
//! for each wanted actor and fences its state store on activation, the actor's state written
//! through the activation (with the lease's token) while it is active, and on SIGTERM a
//! shutdown that releases every lease before exiting 0.
//!
//! ```sh
//! cargo run -p kelpie-lease --example service -- --node node-a --actors a1,a2,a3 \
//!     --store /tmp/leases.db --state /tmp/state.db
//! ```
//!
//! Built with `--features etcd`, `--store etcd://HOST:PORT[,HOST:PORT...]` keeps the leases in
//! etcd instead (campaigns then wait by watch), and the actors' state beside them in etcd,
//! fenced by the lease keys themselves (`--state` is then unused).
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
    CancellationToken, FencedStateStore, LeaseConfig, LeaseManager, LeaseSession, Placement,
    PlacementError, SessionConfig, SessionError, SqliteFencedStateStore, SqliteLeaseManager,
    StateError,
};

type ServicePlacement<M, S> = Placement<M, S>;

struct Args {
    node: String,
    actors: Vec<String>,
    store: String,
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
        store: "kelpie-leases.db".into(),
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
            "--store" => args.store = value.clone(),
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
    let lease = LeaseConfig::new(args.lease_ms)?;
    if let Some(endpoints) = args.store.strip_prefix("etcd://") {
        return run_on_etcd(endpoints, lease, &args).await;
    }
    let manager = Arc::new(SqliteLeaseManager::open(&args.store, lease)?);
    let state = SqliteFencedStateStore::open(&args.state)?;
    serve(manager, state, &args).await
}

#[cfg(feature = "etcd")]
async fn run_on_etcd(
    endpoints: &str,
    lease: LeaseConfig,
    args: &Args,
) -> Result<(), Box<dyn std::error::Error>> {
    use kelpie_lease::{backend::parse_endpoints, EtcdLeaseManager, EtcdOptions};
    let options = EtcdOptions::new(parse_endpoints(endpoints)?).with_lease_config(lease);
    let manager = Arc::new(EtcdLeaseManager::connect(options).await?);
    let state = manager.fenced_state_store();
    serve(manager, state, args).await
}

#[cfg(not(feature = "etcd"))]
async fn run_on_etcd(
    _endpoints: &str,
    _lease: LeaseConfig,
    _args: &Args,
) -> Result<(), Box<dyn std::error::Error>> {
    Err("this build has no etcd backend: cargo run -p kelpie-lease --features etcd --example service".into())
}

/// Serves the wanted actors over `manager` until SIGTERM.
async fn serve<M: LeaseManager + 'static, S: FencedStateStore + 'static>(
    manager: Arc<M>,
    state: S,
    args: &Args,
) -> Result<(), Box<dyn std::error::Error>> {
    let config = SessionConfig::default().with_campaign_poll_ms_max(args.poll_ms);
    let session = LeaseSession::start(manager, NodeId::new(args.node.as_str())?, config)?;
    let state = Arc::new(state);
    let placement = Arc::new(Placement::new(session.clone(), state));
    let stopping = CancellationToken::new();
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    say(format!("ready holder={}", session.holder_id()));
    let mut workers = Vec::new();
    for name in &args.actors {
        let actor = ActorId::new(name.as_str())?;
        let worker = hold(
            Arc::clone(&placement),
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

/// Holds `actor` whenever this process can: campaign (the placement fences the state store
/// with the new token), write while the activation is active, and campaign again when it
/// ends.
async fn hold<M: LeaseManager + 'static, S: FencedStateStore + 'static>(
    placement: Arc<ServicePlacement<M, S>>,
    actor: ActorId,
    stopping: CancellationToken,
    (write_every_ms, work_ms): (u64, u64),
) {
    let mut writes = 0u64;
    loop {
        let activation = tokio::select! {
            activation = placement.campaign(&actor) => activation,
            () = stopping.cancelled() => return,
        };
        let activation = match activation {
            Ok(activation) => activation,
            Err(PlacementError::Session(SessionError::ShuttingDown)) => return,
            Err(error) => {
                say(format!("campaign-failed actor={actor} error={error:?}"));
                pause(write_every_ms.max(10)).await;
                continue;
            }
        };
        let token = activation.fencing_token();
        say(format!("acquired actor={actor} token={token}"));
        while activation.is_active() {
            // The work between checking the lease and writing: a process paused here writes
            // late, with its old token, and the fenced store refuses it.
            pause(work_ms).await;
            writes += 1;
            let holder = placement.session().holder_id();
            let value = format!("write {writes} by {holder}");
            match activation.write(value.as_bytes()).await {
                Ok(()) => say(format!("write actor={actor} token={token} accepted")),
                Err(StateError::StaleToken { highest_token, .. }) => {
                    say(format!(
                        "write actor={actor} token={token} refused highest={highest_token}"
                    ));
                    break;
                }
                // etcd checks the lease itself: released or expired, with no successor yet.
                Err(StateError::NotHolder { .. }) => {
                    say(format!("write actor={actor} token={token} lease-gone"));
                    break;
                }
                Err(error) => say(format!("write actor={actor} token={token} error={error}")),
            }
            tokio::select! {
                () = pause(write_every_ms) => {}
                () = activation.cancellation().cancelled() => {}
            }
        }
        say(format!("stopped actor={actor} token={token}"));
        // Releases the lease if it is still this node's.
        let _ = placement.deactivate(&actor).await;
    }
}
