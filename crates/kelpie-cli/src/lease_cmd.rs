//! `kelpie lease acquire|renew|release|get|list` against a store.

use std::path::Path;
#[cfg(feature = "etcd")]
use std::sync::Arc;

use clap::{Args, Subcommand};
use kelpie_core::{ActorId, IdError, NodeId};
use kelpie_lease::is_node_or_incarnation;
use kelpie_lease::{backend::LeaseStore, Lease, LeaseConfig, LeaseError, LeaseManager};
use kelpie_lease::{backend::SqliteLeaseStore, SqliteLeaseManager, SqliteOptions};
use kelpie_lease::{limits::SQLITE_BUSY_TIMEOUT_MS_DEFAULT, limits::SQLITE_BUSY_TIMEOUT_MS_MAX};
#[cfg(feature = "etcd")]
use kelpie_lease::{EtcdLeaseManager, EtcdOptions};
use serde_json::json;

use crate::error::CliError;
use crate::store_url::{StoreUrl, STORE_DEFAULT};

/// The exit codes, shown under every lease command's `--help`.
pub const EXIT_CODES_HELP: &str = "\
Exit codes:
  0  done
  1  refused: another node holds the lease (acquire), or this node is not the holder
     (renew, release); the message names the holder
  2  bad usage or configuration: a bad actor or node id, a duration outside 100..=86400000
     ms, an unknown --store, a SQLite path that cannot be opened as a database (a
     directory, or a parent that is missing or a regular file), a store written by a newer
     Kelpie, or an option or credentials the store refuses
  3  store unavailable: the SQLite file stayed locked by another process past --timeout-ms,
     an I/O failure, a damaged store, or etcd unreachable within --timeout-ms
  4  done, but the answer could not be written to stdout (a full disk, a closed pipe): an
     acquire, renew or release was applied all the same, and stderr says which

With etcd, a lease hangs off an etcd session of the kelpie process that acquired it and
expires --duration-ms (rounded up to whole seconds) after that process's last keepalive.
A later kelpie process cannot renew it (refused, exit 1); acquiring it again from the same
node takes it over under the new process, with a new, larger token. etcd keeps no record of
when a lease was acquired, so get, list and release show that time as unknown. list needs
--node there.

list --node N also lists the leases held by N's incarnations, N@<number>: the holder ids
under which kelpie node and a LeaseSession hold leases.

--json prints a lease's fields: actor_id, holder, fencing_token, renewal_count, and
acquired_at_ms and expires_at_ms in ms on the store's clock (SQLite's: ms since the UNIX
epoch; etcd's: ms since this command connected). acquired_at_ms is null on etcd unless this
command acquired the lease. A refusal prints {refused, holder, message}.";

/// The lease commands.
#[derive(Debug, Subcommand)]
pub enum LeaseCommand {
    /// Take the lease on an actor, or confirm it if this node already holds it.
    #[command(after_help = EXIT_CODES_HELP)]
    Acquire(OpArgs),
    /// Extend this node's unexpired lease on an actor: it then expires --duration-ms from now,
    /// or when it did if that is later (a renewal never shortens a lease).
    #[command(after_help = EXIT_CODES_HELP)]
    Renew(OpArgs),
    /// Give up this node's lease on an actor.
    #[command(after_help = EXIT_CODES_HELP)]
    Release(ReleaseArgs),
    /// Show the valid lease on an actor, if any.
    #[command(after_help = EXIT_CODES_HELP)]
    Get(GetArgs),
    /// List the valid leases: all of them, or those --node holds.
    #[command(after_help = EXIT_CODES_HELP)]
    List(ListArgs),
}

/// Where the store is and how to print.
#[derive(Debug, Args)]
pub struct StoreArgs {
    /// Where the leases live: sqlite:PATH or etcd://HOST:PORT,HOST:PORT,... (TLS:
    /// ?ca=PATH, and for client certificates &cert=PATH&key=PATH)
    #[arg(long, value_name = "URL", default_value = STORE_DEFAULT)]
    pub store: StoreUrl,
    /// How long to wait for the store (another process's SQLite lock, an etcd connection or
    /// request), in ms.
    #[arg(
        long,
        value_name = "MS",
        default_value_t = SQLITE_BUSY_TIMEOUT_MS_DEFAULT,
        value_parser = clap::value_parser!(u64).range(1..=SQLITE_BUSY_TIMEOUT_MS_MAX)
    )]
    pub timeout_ms: u64,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

/// Options of acquire, renew and release.
#[derive(Debug, Args)]
pub struct OpArgs {
    /// The node asking.
    #[arg(long, value_name = "ID", value_parser = parse_node)]
    pub node: NodeId,
    /// The actor.
    #[arg(long, value_name = "ID", value_parser = parse_actor)]
    pub actor: ActorId,
    /// How long a granted or renewed lease lasts, on the store's clock.
    #[arg(long, value_name = "MS", default_value_t = kelpie_core::limits::LEASE_DURATION_MS_DEFAULT)]
    pub duration_ms: u64,
    #[command(flatten)]
    pub store: StoreArgs,
}

/// Options of release: those of acquire and renew but the duration, which a release has no use
/// for.
#[derive(Debug, Args)]
pub struct ReleaseArgs {
    /// The node asking.
    #[arg(long, value_name = "ID", value_parser = parse_node)]
    pub node: NodeId,
    /// The actor.
    #[arg(long, value_name = "ID", value_parser = parse_actor)]
    pub actor: ActorId,
    #[command(flatten)]
    pub store: StoreArgs,
}

impl From<ReleaseArgs> for OpArgs {
    fn from(args: ReleaseArgs) -> Self {
        OpArgs {
            node: args.node,
            actor: args.actor,
            // Unused by a release; any valid duration opens the store.
            duration_ms: kelpie_core::limits::LEASE_DURATION_MS_DEFAULT,
            store: args.store,
        }
    }
}

/// Options of get.
#[derive(Debug, Args)]
pub struct GetArgs {
    /// The actor.
    #[arg(long, value_name = "ID", value_parser = parse_actor)]
    pub actor: ActorId,
    #[command(flatten)]
    pub store: StoreArgs,
}

/// Options of list.
#[derive(Debug, Args)]
pub struct ListArgs {
    /// Only the leases this node holds.
    #[arg(long, value_name = "ID", value_parser = parse_node)]
    pub node: Option<NodeId>,
    #[command(flatten)]
    pub store: StoreArgs,
}

fn parse_node(value: &str) -> Result<NodeId, IdError> {
    NodeId::new(value)
}

fn parse_actor(value: &str) -> Result<ActorId, IdError> {
    ActorId::new(value)
}

/// The three writes.
#[derive(Debug, Clone, Copy)]
enum Op {
    Acquire,
    Renew,
    Release,
}

impl Op {
    /// What was done, for a person told its answer was lost.
    fn applied(self) -> &'static str {
        match self {
            Op::Acquire => "the lease was acquired",
            Op::Renew => "the lease was renewed",
            Op::Release => "the lease was released",
        }
    }

    fn done(self) -> &'static str {
        match self {
            Op::Acquire => "acquired",
            Op::Renew => "renewed",
            Op::Release => "released",
        }
    }
}

/// Runs a lease command.
pub fn run(command: LeaseCommand) -> Result<(), CliError> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|error| CliError::Usage(format!("cannot start the async runtime: {error}")))?;
    runtime.block_on(async move {
        match command {
            LeaseCommand::Acquire(args) => write_op(Op::Acquire, &args).await,
            LeaseCommand::Renew(args) => write_op(Op::Renew, &args).await,
            LeaseCommand::Release(args) => write_op(Op::Release, &args.into()).await,
            LeaseCommand::Get(args) => get(&args).await,
            LeaseCommand::List(args) => list(&args).await,
        }
    })
}

/// An open store.
// One is made per process and never moved in a loop, so the variants' sizes do not matter.
#[allow(clippy::large_enum_variant)]
enum Backend {
    Sqlite(SqliteLeaseManager),
    /// The manager, and the clock it stamps leases with (ms since it connected).
    #[cfg(feature = "etcd")]
    Etcd(EtcdLeaseManager, kelpie_core::SharedClock),
}

impl Backend {
    /// Whether a lease this command read (or, with `acquired_here`, acquired) carries the time
    /// it was acquired. SQLite stores it with the lease. etcd stores no such time: a lease
    /// acquired through another process's session (every lease a `get`, `list` or `release`
    /// sees, since each command is a process of its own) comes back with the time this
    /// command read it, which is not when it was acquired.
    #[cfg_attr(not(feature = "etcd"), allow(unused_variables))]
    fn knows_acquisition(&self, acquired_here: bool) -> bool {
        match self {
            Backend::Sqlite(_) => true,
            #[cfg(feature = "etcd")]
            Backend::Etcd(..) => acquired_here,
        }
    }

    /// Whether the store's expiries are upper bounds of the real ones rather than exact
    /// (etcd's, for a lease held through another process's session: see `EtcdLeaseManager`).
    fn expiry_is_upper_bound(&self) -> bool {
        match self {
            Backend::Sqlite(_) => false,
            #[cfg(feature = "etcd")]
            Backend::Etcd(..) => true,
        }
    }

    /// The store's clock now, to show a lease's times relative to now and on the wall clock.
    fn now(&self) -> StoreNow {
        let wall = wall_now();
        let store_ms = match self {
            // The SQLite store's own clock: ms since the UNIX epoch where it started, since
            // run on the monotonic clock, so not the wall clock after a step of it. If it
            // cannot be read now (the command's own read succeeded a moment ago), the wall
            // clock is the best guess for showing times.
            Backend::Sqlite(manager) => manager.store().now_ms().unwrap_or_else(|_| {
                wall.duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
            }),
            #[cfg(feature = "etcd")]
            Backend::Etcd(_, clock) => clock.now_ms(),
        };
        StoreNow { store_ms, wall }
    }
}

/// One instant on the store's clock and on the wall clock.
#[derive(Debug, Clone, Copy)]
struct StoreNow {
    store_ms: u64,
    wall: std::time::SystemTime,
}

/// The first instant RFC 3339 cannot show, in seconds since the UNIX epoch: 10000-01-01.
const RFC3339_END_S: u64 = 253_402_300_800;

impl StoreNow {
    /// `store_time_ms` as a wall-clock time (UTC, RFC 3339), for a person. The time comes
    /// from the store, which may hold anything a file can: one RFC 3339 cannot show (before
    /// 1970, after 9999) reads as such, where formatting it panicked.
    fn wall_text(&self, store_time_ms: u64) -> String {
        let offset = std::time::Duration::from_millis(store_time_ms.abs_diff(self.store_ms));
        let wall = match store_time_ms >= self.store_ms {
            true => self.wall.checked_add(offset),
            false => self.wall.checked_sub(offset),
        };
        let shown = wall.filter(|wall| {
            wall.duration_since(std::time::UNIX_EPOCH)
                .is_ok_and(|since| since.as_secs() < RFC3339_END_S)
        });
        match shown {
            Some(wall) => humantime::format_rfc3339_millis(wall).to_string(),
            None => "a wall-clock time outside 1970..=9999".to_string(),
        }
    }
}

/// The wall clock, read once per command to show times to a person; lease decisions never
/// use it here (the store reads its own clock).
#[allow(clippy::disallowed_methods)]
fn wall_now() -> std::time::SystemTime {
    std::time::SystemTime::now()
}

/// Opens a SQLite store, waiting up to `timeout_ms` for another process's write lock.
pub fn open_sqlite(path: &Path, timeout_ms: u64) -> Result<SqliteLeaseStore, CliError> {
    let options = SqliteOptions::default().with_busy_timeout_ms(timeout_ms);
    Ok(SqliteLeaseStore::open_with(path, options)?)
}

/// Whether a read (get, list) finds no store at `path` and so reads it as empty: the file is
/// missing from a directory that exists. A read creates nothing, not even the default file in
/// whatever directory it runs in; a path no write could open either (a parent that is missing
/// or a regular file) is refused as the writes refuse it, not read as an empty store. A store
/// read as empty says so on stderr: a mistyped path reads as "no valid lease" too.
fn sqlite_store_absent(path: &Path) -> Result<bool, CliError> {
    let absent = !SqliteLeaseStore::exists(path)?;
    if absent {
        eprintln!(
            "kelpie: no lease store at {} yet (no write has created it): read as empty",
            path.display()
        );
    }
    Ok(absent)
}

async fn open(args: &StoreArgs, config: LeaseConfig) -> Result<Backend, CliError> {
    match &args.store {
        StoreUrl::Sqlite(path) => {
            let store = open_sqlite(path, args.timeout_ms)?;
            Ok(Backend::Sqlite(SqliteLeaseManager::new(store, config)))
        }
        #[cfg(feature = "etcd")]
        StoreUrl::Etcd(url) => {
            let clock: kelpie_core::SharedClock = Arc::new(kelpie_core::TokioClock::new());
            let manager = connect_etcd(url, args.timeout_ms, config, Arc::clone(&clock)).await?;
            Ok(Backend::Etcd(manager, clock))
        }
        #[cfg(not(feature = "etcd"))]
        StoreUrl::Etcd(_) => Err(crate::store_url::StoreUrlError::EtcdNotBuilt.into()),
        StoreUrl::Memory => Err(CliError::Usage(
            "the memory store forgets every lease when kelpie exits; use sqlite:PATH here \
             (memory is for kelpie bench)"
                .to_string(),
        )),
    }
}

#[cfg(feature = "etcd")]
/// Connects to etcd (with TLS and a client certificate if the URL names them), waiting up to
/// `timeout_ms` for the connection and for each request.
pub async fn connect_etcd(
    url: &crate::store_url::EtcdUrl,
    timeout_ms: u64,
    config: LeaseConfig,
    clock: kelpie_core::SharedClock,
) -> Result<EtcdLeaseManager, CliError> {
    let options = etcd_options(url, timeout_ms, config, clock);
    Ok(EtcdLeaseManager::connect(options).await?)
}

#[cfg(feature = "etcd")]
/// The options [`connect_etcd`] connects with, under the default key prefix.
pub fn etcd_options(
    url: &crate::store_url::EtcdUrl,
    timeout_ms: u64,
    config: LeaseConfig,
    clock: kelpie_core::SharedClock,
) -> EtcdOptions {
    let mut options = EtcdOptions::new(url.endpoints.iter().cloned())
        .with_connect_timeout_ms(timeout_ms)
        .with_request_timeout_ms(timeout_ms)
        .with_lease_config(config)
        .with_clock(clock);
    if let Some(ca) = &url.ca {
        options = options.with_tls_ca_file(ca);
    }
    if let Some((cert, key)) = &url.identity {
        options = options.with_tls_client_identity(cert, key);
    }
    options
}

async fn write_op(op: Op, args: &OpArgs) -> Result<(), CliError> {
    let config = LeaseConfig::new(args.duration_ms)?;
    let backend = open(&args.store, config).await?;
    let result = match &backend {
        Backend::Sqlite(manager) => apply(manager, op, &args.actor, &args.node).await,
        #[cfg(feature = "etcd")]
        Backend::Etcd(manager, _) => apply(manager, op, &args.actor, &args.node).await,
    };
    match result {
        Ok(lease) => {
            let known = backend.knows_acquisition(matches!(op, Op::Acquire));
            let shown = Shown {
                lease: &lease,
                acquisition_known: known,
            };
            let answer = match (op, args.store.json) {
                (Op::Release, true) => json_text(&released_json(shown)),
                (Op::Release, false) => {
                    format!("{} {}", op.done(), describe_released(shown, backend.now()))
                }
                (_, true) => json_text(&lease_json(shown)),
                (_, false) => format!("{} {}", op.done(), describe(shown, backend.now())),
            };
            say(&answer).map_err(|error| match error {
                CliError::Output { source, .. } => CliError::Output {
                    done: Some(op.applied()),
                    source,
                },
                other => other,
            })
        }
        Err(error) => {
            let message = refusal_message(&error, &backend, backend.now());
            if args.store.json && error.is_refusal() {
                say(&json_text(&refusal_json(&error, &message)))?;
            }
            #[cfg(feature = "etcd")]
            if let (Backend::Etcd(..), LeaseError::NotHolder { holder, .. }) = (&backend, &error) {
                if holder.as_ref() == Some(&args.node) {
                    eprintln!(
                        "kelpie: note: with etcd the lease belongs to the session of the kelpie \
                         process that acquired it; acquire it again to take it over here"
                    );
                }
            }
            match error {
                LeaseError::Store(error) => Err(CliError::from(error)),
                error => Err(CliError::Refused { error, message }),
            }
        }
    }
}

async fn apply<M: LeaseManager>(
    manager: &M,
    op: Op,
    actor: &ActorId,
    node: &NodeId,
) -> Result<Lease, LeaseError> {
    match op {
        Op::Acquire => manager.acquire(actor, node).await,
        Op::Renew => manager.renew(actor, node).await,
        Op::Release => manager.release(actor, node).await,
    }
}

/// A refusal for a person: as the store words it, but with the store's times as durations
/// from now and wall-clock times, as `describe` shows a lease's (a time on the store's clock
/// means nothing to a reader: on etcd it counts from when this command connected).
fn refusal_message(error: &LeaseError, backend: &Backend, now: StoreNow) -> String {
    match error {
        LeaseError::HeldByOther {
            actor_id,
            holder,
            expires_at_ms,
        } => {
            let left_ms = expires_at_ms.saturating_sub(now.store_ms);
            let at = now.wall_text(*expires_at_ms);
            match backend.expiry_is_upper_bound() {
                false => format!(
                    "lease on {actor_id} is held by {holder}, expiring in {} (at {at})",
                    seconds(left_ms)
                ),
                true => format!(
                    "lease on {actor_id} is held by {holder}, expiring within {} (by {at}) \
                     unless its holder renews it",
                    seconds(left_ms)
                ),
            }
        }
        LeaseError::Expired {
            actor_id,
            node_id,
            expired_at_ms,
        } => format!(
            "lease on {actor_id} held by {node_id} expired {} ago",
            seconds(now.store_ms.saturating_sub(*expired_at_ms))
        ),
        other => other.to_string(),
    }
}

/// A refusal as JSON, so a script can read who holds the lease.
fn refusal_json(error: &LeaseError, message: &str) -> serde_json::Value {
    let (reason, holder) = match error {
        LeaseError::HeldByOther { holder, .. } => ("held-by-other", Some(holder.clone())),
        LeaseError::NotHolder { holder, .. } => ("not-holder", holder.clone()),
        LeaseError::Expired { .. } => ("expired", None),
        _ => ("refused", None),
    };
    json!({"refused": reason, "holder": holder, "message": message})
}

async fn get(args: &GetArgs) -> Result<(), CliError> {
    let found = match &args.store.store {
        StoreUrl::Sqlite(path) if sqlite_store_absent(path)? => None,
        _ => {
            let backend = open(&args.store, LeaseConfig::default()).await?;
            let lease = match &backend {
                Backend::Sqlite(manager) => manager.get(&args.actor).await?,
                #[cfg(feature = "etcd")]
                Backend::Etcd(manager, _) => manager.get(&args.actor).await?,
            };
            let known = backend.knows_acquisition(false);
            lease.map(|lease| (lease, known, backend.now()))
        }
    };
    let shown = found.as_ref().map(|(lease, known, now)| {
        let shown = Shown {
            lease,
            acquisition_known: *known,
        };
        (shown, *now)
    });
    let answer = match (shown, args.store.json) {
        (None, true) => json_text(&serde_json::Value::Null),
        (Some((shown, _)), true) => json_text(&lease_json(shown)),
        (Some((shown, now)), false) => describe(shown, now),
        (None, false) => format!("{}: no valid lease", args.actor),
    };
    say(&answer)
}

async fn list(args: &ListArgs) -> Result<(), CliError> {
    // A usage error is found before the store is contacted, so that it exits 2 whether or not
    // the store can be reached.
    if let (StoreUrl::Etcd(_), None) = (&args.store.store, &args.node) {
        return Err(CliError::Usage(
            "with etcd, list needs --node: the etcd backend lists one node's leases".to_string(),
        ));
    }
    let (leases, now, known) = match &args.store.store {
        StoreUrl::Sqlite(path) if sqlite_store_absent(path)? => (Vec::new(), None, true),
        _ => {
            let backend = open(&args.store, LeaseConfig::default()).await?;
            let leases = match (&backend, &args.node) {
                (Backend::Sqlite(manager), node) => {
                    let all = all_valid(manager.store()).await?;
                    let held = |l: &Lease| {
                        node.as_ref()
                            .is_none_or(|n| is_node_or_incarnation(&l.holder, n))
                    };
                    all.into_iter().filter(held).collect()
                }
                #[cfg(feature = "etcd")]
                (Backend::Etcd(manager, _), Some(node)) => manager.leases_of_node(node).await?,
                #[cfg(feature = "etcd")]
                (Backend::Etcd(..), None) => unreachable!("checked before opening the store"),
            };
            let known = backend.knows_acquisition(false);
            (leases, Some(backend.now()), known)
        }
    };
    let shown = leases.iter().map(|lease| Shown {
        lease,
        acquisition_known: known,
    });
    if args.store.json {
        say(&json_text(&serde_json::Value::Array(
            shown.map(lease_json).collect(),
        )))?;
    } else if leases.is_empty() {
        match &args.node {
            Some(node) => say(&format!("no valid leases held by {node}"))?,
            None => say("no valid leases")?,
        }
    } else {
        let now = now.expect("leases were read from an open store");
        for shown in shown {
            say(&describe(shown, now))?;
        }
    }
    Ok(())
}

/// Every valid lease in a store, in actor id order.
async fn all_valid<S: LeaseStore>(store: &S) -> Result<Vec<Lease>, LeaseError> {
    let snapshot = store.scan().await?;
    let now_ms = snapshot.store_now_ms;
    Ok(snapshot
        .records
        .iter()
        .filter_map(|(actor, record)| record.lease(actor))
        .filter(|lease| lease.is_valid_at(now_ms))
        .collect())
}

/// A lease to show, and whether its `acquired_at_ms` is when it was acquired (see
/// [`Backend::knows_acquisition`]).
#[derive(Clone, Copy)]
struct Shown<'a> {
    lease: &'a Lease,
    acquisition_known: bool,
}

impl Shown<'_> {
    /// How long ago the lease was acquired, for a person: `1.234 s ago`, or that it is unknown.
    fn acquired(&self, now: StoreNow) -> String {
        match self.acquisition_known {
            true => format!(
                "acquired {} ago",
                seconds(now.store_ms.saturating_sub(self.lease.acquired_at_ms))
            ),
            false => "acquired at an unknown time (etcd does not record it)".to_string(),
        }
    }
}

/// A lease as JSON: its fields, with `acquired_at_ms` null where the store does not know it.
fn lease_json(shown: Shown<'_>) -> serde_json::Value {
    let mut value = json!(shown.lease);
    if let (false, Some(fields)) = (shown.acquisition_known, value.as_object_mut()) {
        fields.insert("acquired_at_ms".to_string(), serde_json::Value::Null);
    }
    value
}

/// `actor-1 holder=node-a token=3 expires in 9.998 s (at ...), acquired ... ago, renewals=0`.
/// A lease for a person: its expiry as a duration from now and as a wall-clock time (UTC),
/// when it was acquired (if the store knows), and its renewals. `--json` keeps the store's
/// raw fields.
fn describe(shown: Shown<'_>, now: StoreNow) -> String {
    let lease = shown.lease;
    let expiry = match lease.expires_at_ms.checked_sub(now.store_ms) {
        Some(left_ms) => format!("expires in {}", seconds(left_ms)),
        None => format!(
            "expired {} ago",
            seconds(now.store_ms - lease.expires_at_ms)
        ),
    };
    format!(
        "{} holder={} token={} {expiry} (at {}), {}, renewals={}",
        lease.actor_id,
        lease.holder,
        lease.fencing_token,
        now.wall_text(lease.expires_at_ms),
        shown.acquired(now),
        lease.renewal_count
    )
}

/// A released lease for a person: whose it was, and since when. `release` answers with the
/// lease as it was before, so its expiry is the one the release cut short (the store wrote the
/// release instant instead); it is left out rather than shown as if the lease still ran.
fn describe_released(shown: Shown<'_>, now: StoreNow) -> String {
    let lease = shown.lease;
    format!(
        "{} holder={} token={}, {}, renewals={}",
        lease.actor_id,
        lease.holder,
        lease.fencing_token,
        shown.acquired(now),
        lease.renewal_count
    )
}

/// A released lease as JSON: the lease's fields but its expiry, for the reason given at
/// [`describe_released`].
fn released_json(shown: Shown<'_>) -> serde_json::Value {
    let mut value = lease_json(shown);
    if let Some(fields) = value.as_object_mut() {
        fields.remove("expires_at_ms");
    }
    value
}

/// `1234` ms as `1.234 s`.
fn seconds(ms: u64) -> String {
    format!("{}.{:03} s", ms / 1_000, ms % 1_000)
}

fn json_text(value: &serde_json::Value) -> String {
    serde_json::to_string_pretty(value).expect("a JSON value serializes")
}

/// Writes `text` and a newline to stdout. A failure (a full disk, a closed pipe) is an error
/// that says so, where `println!` panicked: after a write, that read as if nothing was done.
pub(crate) fn say(text: &str) -> Result<(), CliError> {
    use std::io::Write;
    let mut stdout = std::io::stdout().lock();
    writeln!(stdout, "{text}")
        .and_then(|()| stdout.flush())
        .map_err(|source| CliError::Output { done: None, source })
}
