//! `kelpie node`: a long-running process that holds actors under leases the way a runtime
//! embeds Kelpie. One [`LeaseSession`] on the store (`--store`), a [`Placement`] over it that
//! campaigns for each wanted actor and fences the actors' state store on each activation (the
//! SQLite file `--state`; on etcd, etcd itself unless `--state` is given), and, per active actor, a steady stream of fenced writes of its write log
//! ([`runs`]). SIGTERM (or SIGINT) releases every lease and exits 0.
//!
//! Logs go to stdout, one line per lease event (`--log-format json` for a harness that
//! records the node's history); `--metrics-addr` serves Prometheus text ([`metrics`]).

mod metered;
mod metrics;
mod runs;

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use clap::{Args, ValueEnum};
use kelpie_core::{ActorId, FencingToken, NodeId};
use kelpie_lease::{
    Activation, CancelReason, CancellationToken, FencedStateStore, KeeperEvent, LeaseConfig,
    LeaseManager, LeaseSession, LostReason, Placement, PlacementError, SessionConfig, SessionError,
    SessionEvent, SqliteFencedStateStore, SqliteLeaseManager, StateError,
};
use tracing::{error, info, warn};

use crate::error::CliError;
use crate::stop_signals::StopSignals;
use crate::store_url::StoreUrl;
use metered::MeteredManager;
use metrics::{bump, Metrics};
use runs::Runs;

/// Most actors one node may want.
pub const NODE_ACTORS_MAX: usize = 10_000;
/// Longest a stopping node waits for its actors' loops after the session shut down.
const WORKERS_STOP_TIMEOUT_MS: u64 = 5_000;

/// The help text's closing section.
pub const NODE_AFTER_HELP: &str = "\
Each wanted actor is campaigned for; once its lease is held and the state store fenced with
the new token, the node writes the actor's write log (one line per activation: token, holder,
first and last sequence number) through the activation every --write-every-ms, each write
carrying the lease's fencing token. A write refused as stale ends the activation.

Log lines (stdout): ready, activated, write, deactivated, acquire-failed, and the session's
lease events (lease-acquired, lease-renewed, renewal-failed, lease-released, lease-lost,
holder-changed, guard-cancelled; events-lagged when the log fell behind and missed some),
then stopping and shutdown. --log-format json prints one JSON object per line.

Signals: SIGTERM or SIGINT releases every lease (bounded by one lease duration) and exits 0.

Clock drift: the node's clock may run up to 1 % fast or slow against the store's (the
keeper's default drift bound); beyond that a node can outlive its lease (see docs/NODE.md).

Exit codes: 0 stopped by a signal, 2 bad usage or configuration, 3 store unavailable at start.";

/// How log lines are printed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// `time LEVEL message key=value ...`, for a person.
    Text,
    /// One JSON object per line, the fields at the top level, for a harness.
    Json,
}

/// Options of `kelpie node`.
#[derive(Debug, Args)]
#[command(group = clap::ArgGroup::new("wanted").required(true).args(["actors", "range"]))]
pub struct NodeArgs {
    /// This node's id. A restart with the same id is a new holder (a new incarnation) and
    /// gets new, larger fencing tokens.
    #[arg(long, value_name = "ID", value_parser = parse_node)]
    pub node: NodeId,
    /// Where the leases live: sqlite:PATH or etcd://HOST:PORT,HOST:PORT,... (TLS: ?ca=PATH,
    /// and for client certificates &cert=PATH&key=PATH; etcd needs a
    /// kelpie built with the `etcd` feature).
    #[arg(long, value_name = "URL")]
    pub store: StoreUrl,
    /// The SQLite file of the fenced state store the actors write to (created if missing;
    /// shared by the node processes of a host). Needed with sqlite:; on etcd the actors'
    /// state is kept in etcd beside the leases, fenced by the lease keys themselves, unless
    /// this is given.
    #[arg(long, value_name = "PATH")]
    pub state: Option<PathBuf>,
    /// The actors this node wants, comma-separated.
    #[arg(long, value_name = "ID,ID,...", value_delimiter = ',', value_parser = parse_actor)]
    pub actors: Vec<ActorId>,
    /// A named range of actors, NAME-0 .. NAME-(COUNT-1), instead of --actors.
    #[arg(long, value_name = "NAME:COUNT", conflicts_with = "actors")]
    pub range: Option<String>,
    /// With --range: only share I of N, the actors whose index is I modulo N.
    // `requires` alone lets `--actors` through: clap waives a requirement that conflicts with
    // an argument given, and --range conflicts with --actors.
    #[arg(
        long,
        value_name = "I/N",
        requires = "range",
        conflicts_with = "actors"
    )]
    pub share: Option<String>,
    /// How long a granted or renewed lease lasts, in ms (etcd rounds it up to whole seconds).
    #[arg(long, value_name = "MS", default_value_t = 2_000)]
    pub lease_ms: u64,
    /// Time between two writes of an active actor, in ms.
    #[arg(
        long,
        value_name = "MS",
        default_value_t = 100,
        value_parser = clap::value_parser!(u64).range(1..=60_000)
    )]
    pub write_every_ms: u64,
    /// How long to wait for etcd to connect and to answer each request, in ms.
    #[arg(
        long,
        value_name = "MS",
        default_value_t = 1_000,
        value_parser = clap::value_parser!(u64).range(100..=60_000)
    )]
    pub store_timeout_ms: u64,
    /// Serve Prometheus metrics at http://ADDR/metrics (port 0 picks a free port; the ready
    /// line names it).
    #[arg(long, value_name = "ADDR")]
    pub metrics_addr: Option<SocketAddr>,
    /// How log lines are printed.
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    /// Deliberately broken, for the node fault test only: ignore the loss of a lease and keep
    /// writing with its token.
    #[cfg(feature = "mutations")]
    #[arg(long, hide = true)]
    pub bug_ignore_lost: bool,
}

impl NodeArgs {
    fn bug_ignore_lost(&self) -> bool {
        #[cfg(feature = "mutations")]
        return self.bug_ignore_lost;
        #[cfg(not(feature = "mutations"))]
        false
    }

    /// The wanted actors, from --actors or --range and --share, without duplicates.
    fn wanted(&self) -> Result<Vec<ActorId>, CliError> {
        let mut actors = match &self.range {
            None => self.actors.clone(),
            Some(range) => range_actors(range, self.share.as_deref())?,
        };
        actors.sort();
        actors.dedup();
        if actors.is_empty() {
            return Err(CliError::Usage(
                "no actors wanted: --share leaves none".into(),
            ));
        }
        if actors.len() > NODE_ACTORS_MAX {
            return Err(CliError::Usage(format!(
                "{} actors wanted; at most {NODE_ACTORS_MAX}",
                actors.len()
            )));
        }
        Ok(actors)
    }
}

fn parse_node(value: &str) -> Result<NodeId, kelpie_core::IdError> {
    NodeId::new(value)
}

fn parse_actor(value: &str) -> Result<ActorId, kelpie_core::IdError> {
    ActorId::new(value)
}

/// `NAME:COUNT` and an optional `I/N` as actor ids.
fn range_actors(range: &str, share: Option<&str>) -> Result<Vec<ActorId>, CliError> {
    let usage = |what: String| CliError::Usage(what);
    let (name, count) = range
        .rsplit_once(':')
        .filter(|(name, _)| !name.is_empty())
        .ok_or_else(|| usage(format!("--range {range:?}: expected NAME:COUNT")))?;
    let count: usize = count
        .parse()
        .ok()
        .filter(|c| (1..=NODE_ACTORS_MAX).contains(c))
        .ok_or_else(|| {
            usage(format!(
                "--range {range:?}: COUNT must be 1..={NODE_ACTORS_MAX}"
            ))
        })?;
    let (index, of) = match share {
        None => (0, 1),
        Some(share) => {
            let parsed = share
                .split_once('/')
                .and_then(|(i, n)| Some((i.parse::<usize>().ok()?, n.parse::<usize>().ok()?)));
            match parsed {
                Some((i, n)) if n > 0 && i < n => (i, n),
                _ => return Err(usage(format!("--share {share:?}: expected I/N with I < N"))),
            }
        }
    };
    (0..count)
        .filter(|i| i % of == index)
        .map(|i| ActorId::new(format!("{name}-{i}")).map_err(CliError::from))
        .collect()
}

/// Runs the node until SIGTERM or SIGINT.
pub fn run(args: NodeArgs) -> Result<(), CliError> {
    let wanted = args.wanted()?;
    let lease = LeaseConfig::new(args.lease_ms)?;
    // Checks the session's settings against the lease before anything is opened.
    SessionConfig::default().timing_for(args.lease_ms)?;
    init_logging(args.log_format);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .build()
        .map_err(|e| CliError::Usage(format!("cannot start the async runtime: {e}")))?;
    runtime.block_on(open_and_serve(args, wanted, lease))
}

fn init_logging(format: LogFormat) {
    let builder = tracing_subscriber::fmt()
        .with_writer(std::io::stdout)
        .with_target(false)
        .with_ansi(false);
    // A second subscriber (a test calling run twice) is not an error worth stopping for.
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
}

async fn open_and_serve(
    args: NodeArgs,
    wanted: Vec<ActorId>,
    lease: LeaseConfig,
) -> Result<(), CliError> {
    let metrics = Arc::new(Metrics::default());
    match &args.store {
        StoreUrl::Sqlite(path) => {
            let Some(state_path) = &args.state else {
                return Err(CliError::Usage(
                    "--state PATH is needed with a sqlite: store (the actors' fenced state)".into(),
                ));
            };
            // The lease store first: a node that cannot open it must not leave a new state
            // file behind.
            let manager = SqliteLeaseManager::open(path, lease)?;
            let state = SqliteFencedStateStore::open(state_path).map_err(state_error)?;
            serve(
                MeteredManager::new(manager, Arc::clone(&metrics)),
                state,
                metrics,
                &args,
                wanted,
            )
            .await
        }
        #[cfg(feature = "etcd")]
        StoreUrl::Etcd(url) => {
            let clock: kelpie_core::SharedClock = Arc::new(kelpie_core::TokioClock::new());
            let manager =
                crate::lease_cmd::connect_etcd(url, args.store_timeout_ms, lease, clock).await?;
            if let Some(state_path) = &args.state {
                let state = SqliteFencedStateStore::open(state_path).map_err(state_error)?;
                return serve(
                    MeteredManager::new(manager, Arc::clone(&metrics)),
                    state,
                    metrics,
                    &args,
                    wanted,
                )
                .await;
            }
            let state = manager.fenced_state_store();
            serve(
                MeteredManager::new(manager, Arc::clone(&metrics)),
                state,
                metrics,
                &args,
                wanted,
            )
            .await
        }
        #[cfg(not(feature = "etcd"))]
        StoreUrl::Etcd(_) => Err(crate::store_url::StoreUrlError::EtcdNotBuilt.into()),
        StoreUrl::Memory => Err(CliError::Usage(
            "a node's leases must outlive it and be seen by other nodes: use sqlite:PATH or \
             etcd://..., not memory"
                .into(),
        )),
    }
}

/// What every actor loop of the node shares.
struct Node<M: LeaseManager + 'static, S: FencedStateStore + 'static> {
    placement: Placement<M, S>,
    metrics: Arc<Metrics>,
    stopping: CancellationToken,
    write_every_ms: u64,
    bug_ignore_lost: bool,
}

async fn serve<M: LeaseManager + 'static, S: FencedStateStore + 'static>(
    manager: M,
    state: S,
    metrics: Arc<Metrics>,
    args: &NodeArgs,
    wanted: Vec<ActorId>,
) -> Result<(), CliError> {
    let session = LeaseSession::start(
        Arc::new(manager),
        args.node.clone(),
        SessionConfig::default(),
    )?;
    let metrics_addr = match args.metrics_addr {
        Some(addr) => Some(start_metrics(addr, &session, Arc::clone(&metrics)).await?),
        None => None,
    };
    let mut stop = StopSignals::install()?;
    drop(tokio::spawn(log_events(
        session.clone(),
        Arc::clone(&metrics),
    )));
    let node = Arc::new(Node {
        placement: Placement::new(session.clone(), Arc::new(state)),
        metrics,
        stopping: CancellationToken::new(),
        write_every_ms: args.write_every_ms,
        bug_ignore_lost: args.bug_ignore_lost(),
    });
    info!(
        holder = %session.holder_id(),
        store = %args.store,
        lease_ms = args.lease_ms,
        actors = wanted.len(),
        metrics_addr = metrics_addr.map(|a| a.to_string()).unwrap_or_default(),
        bug_ignore_lost = node.bug_ignore_lost,
        "ready"
    );
    let workers: Vec<_> = wanted
        .into_iter()
        .map(|actor| tokio::spawn(hold(Arc::clone(&node), actor)))
        .collect();
    let signal_name = stop.first().await;
    info!(signal = signal_name, "stopping");
    // The session first: it cancels every activation and releases every lease at once, and
    // its campaigns end, so the actors' loops find nothing left to do.
    let report = session.shutdown().await;
    node.stopping.cancel();
    let stopped = futures_join(workers);
    let stopped = tokio::time::timeout(Duration::from_millis(WORKERS_STOP_TIMEOUT_MS), stopped);
    let _ = stopped.await;
    info!(
        released = report.released,
        unanswered = report.unanswered,
        "shutdown"
    );
    Ok(())
}

async fn futures_join(workers: Vec<tokio::task::JoinHandle<()>>) {
    for worker in workers {
        let _ = worker.await;
    }
}

/// Why the actors' state store (--state) could not be opened, in its own name.
fn state_error(error: StateError) -> CliError {
    match error {
        StateError::Store(store) => CliError::StateStore(store),
        other => CliError::Usage(format!("--state: {other}")),
    }
}

async fn start_metrics<M: LeaseManager + 'static>(
    addr: SocketAddr,
    session: &LeaseSession<M>,
    metrics: Arc<Metrics>,
) -> Result<SocketAddr, CliError> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| CliError::Usage(format!("--metrics-addr {addr}: {e}")))?;
    let bound = listener
        .local_addr()
        .map_err(|e| CliError::Usage(format!("--metrics-addr {addr}: {e}")))?;
    let keeper = Arc::clone(session.keeper());
    let render = Arc::new(move || metrics.render(keeper.beliefs().len()));
    drop(tokio::spawn(metrics::serve(listener, render)));
    Ok(bound)
}

/// One log line per session event (a failing campaign's, at its 1st, 2nd, 4th, 8th ...
/// failure in a row), and the counters they drive.
async fn log_events<M: LeaseManager + 'static>(session: LeaseSession<M>, metrics: Arc<Metrics>) {
    let mut events = session.events();
    let mut losses = Losses::default();
    loop {
        let event = match events.recv().await {
            Ok(event) => event,
            Err(kelpie_lease::EventsError::Lagged(missed)) => {
                warn!(missed, "events-lagged");
                continue;
            }
            Err(_) => return,
        };
        match event {
            SessionEvent::Lease(event) => log_keeper_event(event, &metrics, &mut losses),
            SessionEvent::HolderChanged { actor_id, holder } => {
                info!(actor = %actor_id, holder = %holder, "holder-changed");
            }
            SessionEvent::GuardCancelled {
                actor_id,
                fencing_token,
                reason: CancelReason::BeliefEnding,
            } => {
                // The lease is lost to this node, as surely as if its belief had run out: the
                // session releases it. The keeper reports no loss of its own (unless the belief
                // runs out before the release begins; `Losses` counts that once).
                if losses.first(&actor_id, fencing_token) {
                    metrics.count_loss(&LostReason::BeliefExpired);
                }
                warn!(
                    actor = %actor_id,
                    token = fencing_token.0,
                    reason = "no renewal was confirmed before the guard's cancel lead",
                    "lease-lost"
                );
                info!(actor = %actor_id, token = fencing_token.0, "guard-cancelled");
            }
            SessionEvent::GuardCancelled {
                actor_id,
                fencing_token,
                ..
            } => info!(actor = %actor_id, token = fencing_token.0, "guard-cancelled"),
            SessionEvent::AcquireFailed {
                actor_id,
                attempts,
                error,
            } => {
                bump(&metrics.acquire_failures);
                if attempts.is_power_of_two() {
                    warn!(actor = %actor_id, attempts, error = %error, "acquire-failed");
                }
            }
            other => info!(event = ?other, "session-event"),
        }
    }
}

/// The leases counted as lost, until the keeper's last word on them: a lease whose guard was
/// cancelled ahead of its belief's end is counted then, and not again if its belief then runs
/// out before the session's release begins.
#[derive(Default)]
struct Losses {
    counted: BTreeSet<(ActorId, FencingToken)>,
}

impl Losses {
    /// Whether this is the first loss reported for this lease (and remembers it).
    fn first(&mut self, actor_id: &ActorId, fencing_token: FencingToken) -> bool {
        self.counted.insert((actor_id.clone(), fencing_token))
    }

    /// The keeper's last word on the lease: forget it. Whether it was counted already.
    fn settled(&mut self, actor_id: &ActorId, fencing_token: FencingToken) -> bool {
        self.counted.remove(&(actor_id.clone(), fencing_token))
    }
}

fn log_keeper_event(event: KeeperEvent, metrics: &Metrics, losses: &mut Losses) {
    match event {
        KeeperEvent::Acquired {
            actor_id,
            fencing_token,
            until_local_ms,
        } => {
            bump(&metrics.acquisitions);
            info!(actor = %actor_id, token = fencing_token.0, until_local_ms, "lease-acquired");
        }
        KeeperEvent::Renewed {
            actor_id,
            fencing_token,
            until_local_ms,
        } => {
            bump(&metrics.renewals);
            info!(actor = %actor_id, token = fencing_token.0, until_local_ms, "lease-renewed");
        }
        KeeperEvent::RenewalFailed {
            actor_id,
            fencing_token,
            error,
        } => {
            bump(&metrics.renewal_failures);
            warn!(actor = %actor_id, token = fencing_token.0, error = %error, "renewal-failed");
        }
        KeeperEvent::Released {
            actor_id,
            fencing_token,
        } => {
            losses.settled(&actor_id, fencing_token);
            bump(&metrics.releases);
            info!(actor = %actor_id, token = fencing_token.0, "lease-released");
        }
        KeeperEvent::Lost {
            actor_id,
            fencing_token,
            reason,
        } => {
            if !losses.settled(&actor_id, fencing_token) {
                metrics.count_loss(&reason);
            }
            warn!(actor = %actor_id, token = fencing_token.0, reason = %reason, "lease-lost");
        }
        other => info!(event = ?other, "lease-event"),
    }
}

#[allow(clippy::disallowed_methods)] // a real process on the real clock
async fn pause_ms(duration_ms: u64) {
    tokio::time::sleep(Duration::from_millis(duration_ms)).await;
}

/// Holds `actor` whenever this node can: campaign, write while active, and campaign again
/// once the activation ends.
async fn hold<M: LeaseManager + 'static, S: FencedStateStore + 'static>(
    node: Arc<Node<M, S>>,
    actor: ActorId,
) {
    loop {
        let activation = tokio::select! {
            activation = node.placement.campaign(&actor) => activation,
            () = node.stopping.cancelled() => return,
        };
        let activation = match activation {
            Ok(activation) => activation,
            Err(PlacementError::Session(SessionError::ShuttingDown)) => return,
            Err(error) => {
                warn!(actor = %actor, error = %error, "activation-failed");
                pause_ms(node.write_every_ms).await;
                continue;
            }
        };
        bump(&node.metrics.activations);
        let reason = write_while_active(&node, &activation).await;
        info!(actor = %actor, token = activation.fencing_token().0, reason, "deactivated");
        // Releases the lease if it is still this node's; a refusal means it was not.
        let _ = node.placement.deactivate(&actor).await;
        if node.stopping.is_cancelled() {
            return;
        }
    }
}

/// Whether the node may act as the actor's holder now: its activation was not cancelled and
/// its belief in the lease holds on its clock now. The planted bug says yes regardless.
fn acting<M: LeaseManager + 'static, S: FencedStateStore + 'static>(
    node: &Node<M, S>,
    activation: &Activation<S>,
) -> bool {
    if node.bug_ignore_lost {
        return !node.stopping.is_cancelled();
    }
    let keeper = node.placement.session().keeper();
    activation.is_active()
        && keeper.holds(activation.actor_id()) == Some(activation.fencing_token())
}

/// Writes the actor's log while the activation lasts; returns why it ended.
async fn write_while_active<M: LeaseManager + 'static, S: FencedStateStore + 'static>(
    node: &Node<M, S>,
    activation: &Activation<S>,
) -> &'static str {
    let actor = activation.actor_id();
    let token = activation.fencing_token();
    let holder = node.placement.session().holder_id().to_string();
    let mut runs = match Runs::parse(activation.initial_state()) {
        Ok(runs) => runs,
        Err(reason) => {
            error!(actor = %actor, token = token.0, reason, "state-unreadable");
            return "state-unreadable";
        }
    };
    // What the fence read, in the store's order: the last write of the previous holders
    // (token 0 if none ever wrote). The fault test orders every accepted write against this
    // activation by it, not by when lines arrived.
    let (read_token, read_seq) = runs
        .last_written()
        .map_or((0, 0), |run| (run.token.0, run.last_seq));
    info!(actor = %actor, token = token.0, holder, read_token, read_seq, "activated");
    runs.begin(token, &holder);
    let mut seq = 0;
    loop {
        if !acting(node, activation) {
            return "lease-ended";
        }
        seq += 1;
        runs.extend(seq);
        let result = activation.write(&runs.encode()).await;
        // Checked after the store answered: a refusal while still acting means the node
        // believed it held the lease after the store had fenced a later token.
        let acting_after = acting(node, activation);
        match result {
            Ok(()) => {
                bump(&node.metrics.writes_accepted);
                info!(actor = %actor, token = token.0, seq, outcome = "accepted", "write");
            }
            Err(StateError::StaleToken { highest_token, .. }) => {
                bump(&node.metrics.writes_refused);
                warn!(
                    actor = %actor, token = token.0, seq, outcome = "refused",
                    highest = highest_token.0, acting_after, "write"
                );
                if !node.bug_ignore_lost {
                    return "write-refused";
                }
            }
            // The etcd state store checks the lease key itself: it is gone (expired or
            // released) and nobody holds it yet.
            Err(StateError::NotHolder { .. }) => {
                bump(&node.metrics.writes_refused);
                warn!(
                    actor = %actor, token = token.0, seq, outcome = "refused",
                    reason = "lease-gone", acting_after, "write"
                );
                if !node.bug_ignore_lost {
                    return "write-refused";
                }
            }
            Err(error) => {
                bump(&node.metrics.write_errors);
                warn!(actor = %actor, token = token.0, seq, outcome = "error", error = %error, "write");
            }
        }
        let ended = activation.cancellation().cancelled();
        tokio::select! {
            () = pause_ms(node.write_every_ms) => {}
            () = ended, if !node.bug_ignore_lost => {}
            () = node.stopping.cancelled() => return "stopping",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_range_and_a_share_name_the_actors() {
        let all = range_actors("acct:4", None).unwrap();
        let names: Vec<&str> = all.iter().map(|a| a.as_str()).collect();
        assert_eq!(names, ["acct-0", "acct-1", "acct-2", "acct-3"]);
        let share = range_actors("acct:5", Some("1/2")).unwrap();
        let names: Vec<&str> = share.iter().map(|a| a.as_str()).collect();
        assert_eq!(names, ["acct-1", "acct-3"]);
        for (range, share) in [
            ("acct", None),
            ("acct:0", None),
            ("acct:x", None),
            ("acct:3", Some("2/2")),
            ("acct:3", Some("1")),
        ] {
            assert!(range_actors(range, share).is_err(), "{range} {share:?}");
        }
    }
}
