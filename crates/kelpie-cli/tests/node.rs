//! `kelpie node` from the outside: its help, its refusals of bad input, and a node on a
//! temporary SQLite store that activates its actors, writes, serves metrics that a Prometheus
//! parser reads, and releases every lease on SIGTERM.

// A real process on the real clock: nothing here runs in the simulator.
#![allow(clippy::disallowed_methods)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// Longest a test waits for a line or a count it expects.
const WAIT_MS_MAX: u64 = 15_000;

fn kelpie() -> Command {
    Command::new(env!("CARGO_BIN_EXE_kelpie"))
}

/// Runs kelpie with `args` to its exit. A node that starts instead of refusing its options
/// would run until a signal, so it is killed after [`WAIT_MS_MAX`] and fails the test rather
/// than hanging it.
fn run(args: &[&str]) -> (i32, String, String) {
    let mut child = kelpie()
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("kelpie runs");
    let deadline = Instant::now() + Duration::from_millis(WAIT_MS_MAX);
    while child
        .try_wait()
        .expect("kelpie can be waited for")
        .is_none()
    {
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("kelpie {args:?} still ran after {WAIT_MS_MAX} ms");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let output = child.wait_with_output().expect("kelpie's output is read");
    let text = |b: Vec<u8>| String::from_utf8(b).expect("UTF-8");
    (
        output.status.code().expect("exited"),
        text(output.stdout),
        text(output.stderr),
    )
}

#[test]
fn node_help_documents_every_flag() {
    let (code, help, _) = run(&["node", "--help"]);
    assert_eq!(code, 0, "{help}");
    for flag in [
        "--node",
        "--store",
        "--state",
        "--actors",
        "--range",
        "--share",
        "--lease-ms",
        "--write-every-ms",
        "--store-timeout-ms",
        "--metrics-addr",
        "--log-format",
        "SIGTERM",
        "Exit codes",
        "drift",
    ] {
        assert!(help.contains(flag), "{flag} missing from:\n{help}");
    }
    assert!(!help.contains("bug"), "the planted bug is hidden:\n{help}");
}

#[test]
fn node_refuses_bad_input_with_exit_2_and_a_reason() {
    let dir = tempfile::tempdir().unwrap();
    let store = format!("sqlite:{}", dir.path().join("leases.db").display());
    let state = dir.path().join("state.db").display().to_string();
    let base = ["node", "--node", "n1", "--store", &store, "--state", &state];
    let cases: [(&[&str], &str); 12] = [
        (
            &[
                "node", "--store", &store, "--state", &state, "--actors", "a",
            ],
            "--node",
        ),
        (&base, "--actors"),
        (
            &[&base[..], &["--actors", "a", "--lease-ms", "5"]].concat(),
            "duration",
        ),
        (&[&base[..], &["--range", "acct"]].concat(), "NAME:COUNT"),
        // An empty NAME made actors `-0`, `-1`, ...
        (&[&base[..], &["--range", ":2"]].concat(), "NAME:COUNT"),
        (
            &[&base[..], &["--range", "acct:3", "--share", "3/3"]].concat(),
            "I/N",
        ),
        // --share picks from a --range; with --actors it would be ignored.
        (
            &[&base[..], &["--actors", "a", "--share", "0/2"]].concat(),
            "'--actors <ID,ID,...>' cannot be used with '--share <I/N>'",
        ),
        (&[&base[..], &["--share", "0/2"]].concat(), "--range"),
        (
            &[&base[..], &["--actors", "a", "--write-every-ms", "0"]].concat(),
            "write-every-ms",
        ),
        (
            &[
                "node", "--node", "n1", "--store", "bogus:x", "--state", &state, "--actors", "a",
            ],
            "unknown store",
        ),
        (
            &[
                "node", "--node", "n1", "--store", "memory", "--state", &state, "--actors", "a",
            ],
            "memory",
        ),
        (
            &[&base[..], &["--actors", "a", "--metrics-addr", "nowhere"]].concat(),
            "metrics-addr",
        ),
    ];
    for (args, expected) in cases {
        let (code, stdout, stderr) = run(args);
        assert_eq!(code, 2, "{args:?}: {stdout}{stderr}");
        assert!(
            stderr.contains(expected),
            "{args:?}: {expected} not in {stderr}"
        );
        assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
    }
    // A state path that is a directory, or under a missing directory, is a configuration
    // error too, named as the state store's (not the lease store's).
    let dir_state = dir.path().display().to_string();
    let orphan_state = dir.path().join("missing").join("state.db");
    let orphan_state = orphan_state.display().to_string();
    for state in [&dir_state, &orphan_state] {
        let args = [
            "node", "--node", "n1", "--store", &store, "--state", state, "--actors", "a",
        ];
        let (code, _, stderr) = run(&args);
        assert_eq!(code, 2, "{stderr}");
        let named = format!("--state: cannot open state store {state}: ");
        assert!(stderr.contains(&named), "{stderr}");
    }
}

/// A lease store that cannot be opened (a file of random bytes) is refused before the state
/// store is touched: the node created the state file, then exited 3, leaving it behind.
#[test]
fn a_bad_lease_store_is_refused_before_the_state_file_is_created() {
    let dir = tempfile::tempdir().unwrap();
    let leases = dir.path().join("leases.db");
    std::fs::write(&leases, [0x5a_u8; 4096]).unwrap();
    let state = dir.path().join("state.db");
    let store = format!("sqlite:{}", leases.display());
    let state_arg = state.display().to_string();
    let args = [
        "node", "--node", "n1", "--store", &store, "--state", &state_arg, "--actors", "a",
    ];
    let (code, stdout, stderr) = run(&args);
    assert_eq!(code, 3, "{stdout}{stderr}");
    assert!(stderr.contains("corrupt or not ours"), "{stderr}");
    assert!(!state.exists(), "the state file was created: {stderr}");
}

/// A running node and its stdout lines as JSON.
struct Node {
    child: Child,
    lines: mpsc::Receiver<serde_json::Value>,
}

impl Node {
    fn start(dir: &Path, store: &str, actors: &str) -> Node {
        let mut child = kelpie()
            .args(["node", "--node", "node-a", "--actors", actors])
            .args(["--store", store])
            .arg("--state")
            .arg(dir.join("state.db"))
            .args(["--lease-ms", "1000", "--write-every-ms", "20"])
            .args(["--metrics-addr", "127.0.0.1:0", "--log-format", "json"])
            .stdout(Stdio::piped())
            .spawn()
            .expect("kelpie node starts");
        let stdout = child.stdout.take().expect("piped");
        let (sender, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let value = serde_json::from_str(&line)
                    .unwrap_or_else(|e| panic!("not a JSON log line ({e}): {line}"));
                if sender.send(value).is_err() {
                    return;
                }
            }
        });
        Node { child, lines }
    }

    /// The next line whose message is `message` (and that `wanted` accepts).
    fn wait_for(
        &self,
        message: &str,
        wanted: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        let deadline = Instant::now() + Duration::from_millis(WAIT_MS_MAX);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = self
                .lines
                .recv_timeout(left)
                .unwrap_or_else(|_| panic!("no {message} line within {WAIT_MS_MAX} ms"));
            if line["message"] == message && wanted(&line) {
                return line;
            }
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn scrape(addr: &str) -> String {
    let mut stream = TcpStream::connect(addr).expect("the metrics endpoint accepts");
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: kelpie\r\n\r\n")
        .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let (head, body) = response.split_once("\r\n\r\n").expect("an HTTP response");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(head.contains("text/plain; version=0.0.4"), "{head}");
    body.to_string()
}

/// The sample of `name` (with `label=value`, if given) in a parsed scrape.
fn sample(scrape: &prometheus_parse::Scrape, name: &str, label: Option<(&str, &str)>) -> f64 {
    let found = scrape
        .samples
        .iter()
        .find(|s| s.metric == name && label.is_none_or(|(k, v)| s.labels.get(k) == Some(v)));
    match found.map(|s| &s.value) {
        Some(prometheus_parse::Value::Counter(v) | prometheus_parse::Value::Gauge(v)) => *v,
        Some(prometheus_parse::Value::Untyped(v)) => *v,
        other => panic!("{name} {label:?}: {other:?}"),
    }
}

#[test]
fn node_serves_metrics_while_it_writes_and_releases_every_lease_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let store = format!("sqlite:{}", dir.path().join("leases.db").display());
    let node = Node::start(dir.path(), &store, "acct-1,acct-2");
    let ready = node.wait_for("ready", |_| true);
    let addr = ready["metrics_addr"]
        .as_str()
        .expect("the bound address")
        .to_string();
    for actor in ["acct-1", "acct-2"] {
        node.wait_for("write", |l| {
            l["actor"] == actor && l["outcome"] == "accepted"
        });
    }
    // Renewals every third of the lease: wait for one, so the histogram has an observation.
    node.wait_for("lease-renewed", |_| true);
    let body = scrape(&addr);
    let lines = body.lines().map(|l| Ok(l.to_string()));
    let parsed = prometheus_parse::Scrape::parse(lines).expect("Prometheus text parses");
    assert_eq!(sample(&parsed, "kelpie_leases_held", None), 2.0, "{body}");
    assert!(
        sample(&parsed, "kelpie_lease_acquisitions_total", None) >= 2.0,
        "{body}"
    );
    assert!(
        sample(&parsed, "kelpie_actor_activations_total", None) >= 2.0,
        "{body}"
    );
    assert!(
        sample(&parsed, "kelpie_lease_renewals_total", None) >= 1.0,
        "{body}"
    );
    let accepted = Some(("outcome", "accepted"));
    assert!(
        sample(&parsed, "kelpie_fenced_writes_total", accepted) >= 2.0,
        "{body}"
    );
    let refused = Some(("outcome", "refused"));
    assert_eq!(
        sample(&parsed, "kelpie_fenced_writes_total", refused),
        0.0,
        "{body}"
    );
    // Every reason is exposed (`sample` panics on a missing series). A renewal refused on a
    // loaded machine is not a bug, so `refused` is only required to be there; the belief runs
    // out only after renewals kept failing, and a changed token is a store bug.
    let losses = |reason| {
        sample(
            &parsed,
            "kelpie_lease_losses_total",
            Some(("reason", reason)),
        )
    };
    assert!(losses("refused") >= 0.0, "{body}");
    for reason in ["belief_expired", "token_changed", "other"] {
        assert_eq!(losses(reason), 0.0, "{reason}: {body}");
    }
    let histogram = parsed
        .samples
        .iter()
        .find(|s| s.metric == "kelpie_lease_renewal_duration_seconds")
        .expect("the renewal latency histogram");
    match &histogram.value {
        prometheus_parse::Value::Histogram(buckets) => {
            assert!(buckets.len() >= 10, "{buckets:?}");
            let last = buckets.last().unwrap();
            assert!(
                last.less_than.is_infinite() && last.count >= 1.0,
                "{buckets:?}"
            );
        }
        other => panic!("not a histogram: {other:?}"),
    }
    let documented = parsed
        .docs
        .keys()
        .filter(|k| k.starts_with("kelpie_"))
        .count();
    assert!(documented >= 10, "every family has HELP: {:?}", parsed.docs);

    let pid = i32::try_from(node.child.id()).unwrap();
    // SAFETY: kill has no memory effects; the pid is our own unreaped child.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
    let shutdown = node.wait_for("shutdown", |_| true);
    // Released by the session's shutdown (or, racing it, by the actor's own deactivation):
    // the store lists none below.
    assert_eq!(shutdown["unanswered"], 0, "{shutdown}");
    let mut node = node;
    let status = node.child.wait().unwrap();
    assert_eq!(status.code(), Some(0), "SIGTERM exits 0");
    let (code, listed, _) = run(&["lease", "list", "--store", &store]);
    assert_eq!(code, 0);
    assert!(
        listed.contains("no valid leases"),
        "released on SIGTERM: {listed}"
    );
}

/// A lease store that stalls past the lease (another process holds its write lock for 2.5
/// leases): the node's renewals are answered too late, the session cancels its guards before
/// the beliefs end and releases the leases. Those leases are lost to the node, and the loss
/// metric says so: it stayed at 0, the losses showing up only as plain releases.
#[test]
fn leases_lost_to_a_stalled_store_are_counted_as_losses() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("leases.db");
    let store = format!("sqlite:{}", path.display());
    let node = Node::start(dir.path(), &store, "stall-1,stall-2");
    let ready = node.wait_for("ready", |_| true);
    let addr = ready["metrics_addr"].as_str().expect("the bound address");
    let addr = addr.to_string();
    for actor in ["stall-1", "stall-2"] {
        node.wait_for("write", |l| {
            l["actor"] == actor && l["outcome"] == "accepted"
        });
    }
    let blocker = rusqlite::Connection::open(&path).unwrap();
    blocker.execute_batch("BEGIN IMMEDIATE").unwrap();
    std::thread::sleep(Duration::from_millis(2_500));
    blocker.execute_batch("ROLLBACK").unwrap();
    let lost = node.wait_for("lease-lost", |_| true);
    // Back: the node holds its actors again, with new tokens.
    node.wait_for("lease-acquired", |l| {
        l["token"].as_u64() > lost["token"].as_u64()
    });
    let body = scrape(&addr);
    let lines = body.lines().map(|l| Ok(l.to_string()));
    let parsed = prometheus_parse::Scrape::parse(lines).expect("Prometheus text parses");
    let belief_expired = Some(("reason", "belief_expired"));
    let losses = sample(&parsed, "kelpie_lease_losses_total", belief_expired);
    assert!(losses >= 1.0, "{body}");
    let ended = sample(
        &parsed,
        "kelpie_lease_beliefs_ended_before_expiry_total",
        None,
    );
    assert_eq!(ended, losses, "the same count: {body}");
    // Two actors, each lost at most once per tenure: not counted twice.
    let acquired = sample(&parsed, "kelpie_lease_acquisitions_total", None);
    assert!(losses <= acquired, "{body}");
    assert!(
        sample(&parsed, "kelpie_lease_acquire_failures_total", None) >= 0.0,
        "{body}"
    );
}

/// The same node on etcd: it activates, writes and releases on SIGTERM. Skipped with a notice
/// without `KELPIE_ETCD_ENDPOINTS` (a failure under `CI=true`).
#[cfg(feature = "etcd")]
#[test]
fn node_on_etcd_activates_writes_and_releases_on_sigterm() {
    let Ok(endpoints) = std::env::var("KELPIE_ETCD_ENDPOINTS") else {
        kelpie_core::testing::missing_requirement(
            "node_on_etcd_activates_writes_and_releases_on_sigterm",
            "KELPIE_ETCD_ENDPOINTS not set",
            "run it under scripts/with-etcd",
        );
        return;
    };
    let hosts: Vec<&str> = endpoints
        .split(',')
        .map(|e| e.trim_start_matches("http://"))
        .collect();
    let store = format!("etcd://{}", hosts.join(","));
    let dir = tempfile::tempdir().unwrap();
    // Actor names of this run only: the shared etcd keeps other runs' keys.
    let actor = format!("node-test-{}", std::process::id());
    let node = Node::start(dir.path(), &store, &actor);
    node.wait_for("activated", |l| l["actor"] == actor.as_str());
    node.wait_for("write", |l| l["outcome"] == "accepted");
    let pid = i32::try_from(node.child.id()).unwrap();
    // SAFETY: kill has no memory effects; the pid is our own unreaped child.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
    let shutdown = node.wait_for("shutdown", |_| true);
    assert_eq!(shutdown["unanswered"], 0, "{shutdown}");
    let mut node = node;
    assert_eq!(
        node.child.wait().unwrap().code(),
        Some(0),
        "SIGTERM exits 0"
    );
    let (code, got, _) = run(&["lease", "get", "--store", &store, "--actor", &actor]);
    assert_eq!(code, 0);
    assert!(got.contains("no valid lease"), "released on SIGTERM: {got}");
}
