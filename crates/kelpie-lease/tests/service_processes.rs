//! `examples/service.rs` as real processes on one SQLite store: the session API as a runtime
//! embeds it, with the system clock, tokio, SIGTERM, SIGSTOP and a restart.
//!
//! - Two instances started together share three actors, one holder at a time (fencing tokens
//!   increase, holding intervals never overlap), and SIGTERM on one hands its actors to the
//!   other within [`HANDOVER_MS_MAX`], measured between the processes' own timestamps.
//! - A process paused (SIGSTOP) longer than its lease, replaced by a restart under the same
//!   node id, and resumed: its late write carries the older token and is refused.

// Real processes on the real clock: nothing here runs in the simulator.
#![allow(clippy::disallowed_methods)]

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// Longest handover from the SIGTERMed process's finished shutdown to the other's grant.
const HANDOVER_MS_MAX: u64 = 100;
/// Lease of these tests' services.
const LEASE_MS: u64 = 1_000;
/// Longest a test waits for a line it expects.
const WAIT_MS_MAX: u64 = 15_000;

/// The example binary (target/<profile>/examples), rebuilt once per test run: `cargo test`
/// builds examples, but `cargo test --test service_processes` alone does not, and would run
/// a stale one.
fn service_binary() -> PathBuf {
    static BUILT: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    BUILT
        .get_or_init(|| {
            let exe = std::env::current_exe().expect("the test knows its path");
            let profile_dir = exe
                .parent()
                .and_then(Path::parent)
                .expect("tests run from target/<profile>/deps");
            let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
            let mut build = Command::new(cargo);
            build.args([
                "build",
                "--quiet",
                "-p",
                "kelpie-lease",
                "--example",
                "service",
            ]);
            // The same features as this test, so that the etcd variant can run.
            if cfg!(feature = "etcd") {
                build.args(["--features", "etcd"]);
            }
            if profile_dir
                .file_name()
                .is_some_and(|name| name == "release")
            {
                build.arg("--release");
            }
            let status = build.status().expect("cargo runs");
            assert!(status.success(), "building the service example failed");
            profile_dir.join("examples").join("service")
        })
        .clone()
}

/// One event line of a service: its words as `key=value` pairs, and the first word.
#[derive(Debug, Clone)]
struct Line {
    event: String,
    fields: BTreeMap<String, String>,
}

impl Line {
    fn parse(text: &str) -> Line {
        let mut words = text.split_whitespace();
        let event = words.next().unwrap_or_default().to_string();
        // `key=value` words, and bare words (`accepted`, `refused`) as keys without a value.
        let fields = words
            .map(|w| w.split_once('=').unwrap_or((w, "")))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Line { event, fields }
    }

    fn get(&self, key: &str) -> &str {
        self.fields.get(key).map_or("", String::as_str)
    }

    fn number(&self, key: &str) -> u64 {
        self.get(key)
            .parse()
            .unwrap_or_else(|_| panic!("{key} in {self:?}"))
    }
}

/// Where the services keep their leases. The state is the SQLite file `state.db` in the test's
/// directory with SQLite leases, and in etcd beside the leases on etcd (the example then
/// ignores the `--state` it is given).
#[derive(Clone)]
enum Store {
    /// `leases.db` in the test's directory.
    Sqlite,
    /// The etcd at these endpoints (`etcd://` URL without the scheme).
    #[cfg_attr(not(feature = "etcd"), allow(dead_code))]
    Etcd(String),
}

impl Store {
    fn argument(&self, dir: &Path) -> std::ffi::OsString {
        match self {
            Store::Sqlite => dir.join("leases.db").into_os_string(),
            Store::Etcd(endpoints) => format!("etcd://{endpoints}").into(),
        }
    }

    /// The lease duration the services use: etcd's TTLs count in whole seconds, at least two
    /// under its default election settings.
    fn lease_ms(&self) -> u64 {
        match self {
            Store::Sqlite => LEASE_MS,
            Store::Etcd(_) => 2 * LEASE_MS,
        }
    }
}

/// A running service and the lines it printed so far.
struct Service {
    name: &'static str,
    child: Child,
    lines: mpsc::Receiver<String>,
    seen: Vec<Line>,
}

impl Service {
    fn start(name: &'static str, node: &str, dir: &Path, actors: &str, extra: &[&str]) -> Service {
        Self::start_on(&Store::Sqlite, name, node, dir, actors, extra)
    }

    fn start_on(
        store: &Store,
        name: &'static str,
        node: &str,
        dir: &Path,
        actors: &str,
        extra: &[&str],
    ) -> Service {
        let mut child = Command::new(service_binary())
            .args(["--node", node, "--actors", actors])
            .arg("--store")
            .arg(store.argument(dir))
            .arg("--state")
            .arg(dir.join("state.db"))
            .args(["--lease-ms", &store.lease_ms().to_string()])
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("the service example was built by cargo test");
        let stdout = child.stdout.take().expect("piped");
        let (sender, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if sender.send(line).is_err() {
                    return;
                }
            }
        });
        Service {
            name,
            child,
            lines,
            seen: Vec::new(),
        }
    }

    /// Waits for the first line from now on that `wanted` accepts.
    fn wait_for(&mut self, what: &str, wanted: impl Fn(&Line) -> bool) -> Line {
        let from = self.seen.len();
        self.wait_for_since(from, what, wanted)
    }

    /// The first line printed since line `from` (seen already, or still to come) that
    /// `wanted` accepts.
    fn wait_for_since(&mut self, from: usize, what: &str, wanted: impl Fn(&Line) -> bool) -> Line {
        if let Some(line) = self.seen[from..].iter().find(|l| wanted(l)) {
            return line.clone();
        }
        let deadline = Instant::now() + Duration::from_millis(WAIT_MS_MAX);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let text = self.lines.recv_timeout(left).unwrap_or_else(|_| {
                panic!(
                    "{}: no {what} within {WAIT_MS_MAX} ms: {:?}",
                    self.name, self.seen
                )
            });
            let line = Line::parse(&text);
            self.seen.push(line.clone());
            if wanted(&line) {
                return line;
            }
        }
    }

    /// Every line printed until the process exits, then its exit code.
    fn finish(&mut self) -> i32 {
        let status = self.child.wait().expect("the service exits");
        while let Ok(text) = self.lines.recv_timeout(Duration::from_millis(500)) {
            self.seen.push(Line::parse(&text));
        }
        status.code().unwrap_or(-1)
    }

    fn signal(&self, signal: i32) {
        let pid = i32::try_from(self.child.id()).expect("pids fit in i32");
        // SAFETY: kill has no memory effects; the pid is our own child's.
        let status = unsafe { libc::kill(pid, signal) };
        assert_eq!(status, 0, "kill({pid}, {signal})");
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Holding intervals per actor from both services' lines: (token, holder, from, to) in wall ms.
fn intervals(services: &[&Service]) -> BTreeMap<String, Vec<(u64, &'static str, u64, u64)>> {
    let mut all: BTreeMap<String, Vec<(u64, &'static str, u64, u64)>> = BTreeMap::new();
    for service in services {
        let mut open: BTreeMap<String, (u64, u64)> = BTreeMap::new();
        for line in &service.seen {
            let actor = line.get("actor").to_string();
            match line.event.as_str() {
                "acquired" => {
                    open.insert(actor, (line.number("token"), line.number("wall_ms")));
                }
                "stopped" => {
                    if let Some((token, from)) = open.remove(&actor) {
                        let to = line.number("wall_ms");
                        all.entry(actor)
                            .or_default()
                            .push((token, service.name, from, to));
                    }
                }
                _ => {}
            }
        }
        assert!(open.is_empty(), "{}: held at exit: {open:?}", service.name);
    }
    for list in all.values_mut() {
        list.sort();
    }
    all
}

#[test]
fn two_services_share_three_actors_and_sigterm_hands_them_over() {
    two_services_share_three_actors(&Store::Sqlite, "a1,a2,a3");
}

/// The same on etcd, where the takeover waits by watch. Skipped with a notice without
/// `KELPIE_ETCD_ENDPOINTS` (a failure under `CI=true`).
#[cfg(feature = "etcd")]
#[test]
fn two_services_on_etcd_share_three_actors_and_sigterm_hands_them_over() {
    let Ok(endpoints) = std::env::var("KELPIE_ETCD_ENDPOINTS") else {
        kelpie_core::testing::missing_requirement(
            "two_services_on_etcd_share_three_actors_and_sigterm_hands_them_over",
            "KELPIE_ETCD_ENDPOINTS not set",
            "run it under scripts/with-etcd",
        );
        return;
    };
    // Actor names of this run only: the shared etcd keeps other runs' keys.
    let run = std::process::id();
    let actors = format!("svc-{run}-1,svc-{run}-2,svc-{run}-3");
    two_services_share_three_actors(&Store::Etcd(endpoints), &actors);
}

fn two_services_share_three_actors(store: &Store, actors: &str) {
    let dir = tempfile::tempdir().unwrap();
    let mut first = Service::start_on(store, "first", "node-a", dir.path(), actors, &[]);
    let mut second = Service::start_on(store, "second", "node-b", dir.path(), actors, &[]);
    first.wait_for("ready", |l| l.event == "ready");
    second.wait_for("ready", |l| l.event == "ready");
    // Both campaign for all three; whoever got each, every actor gets a holder.
    let deadline = Instant::now() + Duration::from_millis(WAIT_MS_MAX);
    // The actors a service holds now: acquired and not stopped since.
    let holder_of = |seen: &[Line]| -> Vec<String> {
        let mut held = std::collections::BTreeSet::new();
        for line in seen {
            match line.event.as_str() {
                "acquired" => held.insert(line.get("actor").to_string()),
                "stopped" => held.remove(line.get("actor")),
                _ => false,
            };
        }
        held.into_iter().collect()
    };
    loop {
        while let Ok(text) = first.lines.try_recv() {
            first.seen.push(Line::parse(&text));
        }
        while let Ok(text) = second.lines.try_recv() {
            second.seen.push(Line::parse(&text));
        }
        let mut held = holder_of(&first.seen);
        held.extend(holder_of(&second.seen));
        held.sort();
        held.dedup();
        if held.len() == 3 {
            break;
        }
        assert!(Instant::now() < deadline, "not every actor got a holder");
        std::thread::sleep(Duration::from_millis(5));
    }
    // Whichever holds more goes; the other must take over everything it held.
    let (leaving, staying) = match holder_of(&first.seen).len() >= holder_of(&second.seen).len() {
        true => (&mut first, &mut second),
        false => (&mut second, &mut first),
    };
    let handed: Vec<String> = holder_of(&leaving.seen);
    assert!(!handed.is_empty());
    let from = staying.seen.len();
    leaving.signal(libc::SIGTERM);
    let shutdown = leaving.wait_for("shutdown", |l| l.event == "shutdown");
    assert_eq!(shutdown.get("unanswered"), "0", "{shutdown:?}");
    let released_ms = shutdown.number("wall_ms");
    let mut handovers_ms = Vec::new();
    for actor in &handed {
        let taken = staying.wait_for_since(from, "the takeover", |l| {
            l.event == "acquired" && l.get("actor") == actor
        });
        handovers_ms.push(taken.number("wall_ms").saturating_sub(released_ms));
    }
    assert_eq!(leaving.finish(), 0, "SIGTERM exits 0");
    staying.signal(libc::SIGTERM);
    assert_eq!(staying.finish(), 0, "SIGTERM exits 0");
    println!("handover after SIGTERM, per actor: {handovers_ms:?} ms");
    let slowest_ms = handovers_ms.iter().max().copied().unwrap_or(0);
    assert!(
        slowest_ms <= HANDOVER_MS_MAX,
        "handover took {handovers_ms:?} ms (limit {HANDOVER_MS_MAX} ms)"
    );
    // One holder at a time: per actor, tokens increase and holding intervals do not overlap.
    for (actor, list) in intervals(&[&first, &second]) {
        for pair in list.windows(2) {
            let ((t1, h1, _, to1), (t2, h2, from2, _)) = (pair[0], pair[1]);
            assert!(t2 > t1, "{actor}: token {t1} by {h1} then {t2} by {h2}");
            assert!(
                from2 >= to1,
                "{actor}: {h2} held from {from2} before {h1} stopped at {to1}"
            );
        }
    }
    let writes = |s: &Service| s.seen.iter().filter(|l| l.event == "write").count();
    assert!(writes(&first) > 0 && writes(&second) > 0);
    let refused = |s: &Service| {
        s.seen
            .iter()
            .filter(|l| l.event == "write" && l.fields.contains_key("refused"))
            .count()
    };
    assert_eq!(
        refused(&first) + refused(&second),
        0,
        "a holder's write was refused"
    );
}

#[test]
fn a_paused_process_replaced_by_a_restart_cannot_land_its_late_write() {
    let dir = tempfile::tempdir().unwrap();
    // The writer spends its time between checking the lease and writing, as a process
    // doing work would: the pause lands there.
    let slow = ["--work-ms", "300", "--write-every-ms", "0"];
    let mut old = Service::start("old", "node-a", dir.path(), "x", &slow);
    let first = old.wait_for("the grant", |l| l.event == "acquired");
    old.wait_for("a write", |l| l.event == "write");
    let old_token = first.number("token");
    // Into the next 300 ms of work, between its check of the lease and its write.
    std::thread::sleep(Duration::from_millis(100));
    old.signal(libc::SIGSTOP);
    // The same node restarted: a new process lifetime, so a new holder with a newer token
    // once the paused one's lease expired.
    let mut new = Service::start("new", "node-a", dir.path(), "x", &[]);
    let taken = new.wait_for("the takeover", |l| l.event == "acquired");
    let new_token = taken.number("token");
    assert!(new_token > old_token, "token {new_token} after {old_token}");
    new.wait_for("a write", |l| {
        l.event == "write" && l.fields.contains_key("accepted")
    });
    old.signal(libc::SIGCONT);
    let late = old.wait_for("the late write", |l| l.event == "write");
    assert_eq!(late.number("token"), old_token, "{late:?}");
    assert!(
        late.fields.contains_key("refused"),
        "the paused process's write landed: {late:?}"
    );
    assert_eq!(late.number("highest"), new_token, "{late:?}");
    for service in [&mut old, &mut new] {
        service.signal(libc::SIGTERM);
        assert_eq!(service.finish(), 0, "{}: SIGTERM exits 0", service.name);
    }
    let accepted_after = old.seen.iter().filter(|l| {
        l.event == "write"
            && l.fields.contains_key("accepted")
            && l.number("wall_ms") >= late.number("wall_ms")
    });
    assert_eq!(
        accepted_after.count(),
        0,
        "the paused process landed a write"
    );
}
