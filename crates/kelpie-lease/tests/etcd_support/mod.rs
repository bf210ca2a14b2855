//! Shared by the etcd tests: when to run, unique key prefixes, and etcd processes of their own
//! for the tests that must break, lock or restart the server.
//!
//! etcd tests run when `KELPIE_ETCD_ENDPOINTS` is set (`scripts/with-etcd` sets it) and say
//! they were skipped otherwise. Tests that start their own etcd also need its binary: `ETCD_BIN`
//! or `etcd` on `PATH`.

// Each test crate uses a different part of this module.
#![allow(dead_code)]

use std::io::Write;
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use kelpie_lease::{limits::ETCD_ENDPOINTS_ENV, EtcdOptions};

/// How long a started etcd member may take to accept connections.
const ETCD_START_TIMEOUT_MS: u64 = 20_000;

/// How often readiness is polled while starting.
const ETCD_START_POLL_MS: u64 = 50;

/// Writes `message` to the real stderr: libtest captures `eprintln!` and shows it only for
/// failed tests, but a skip should be visible in every run.
pub fn notice(message: &str) {
    let _ = std::io::stderr().write_all(format!("{message}\n").as_bytes());
}

/// Skips `test` for lack of `requirement` (fails instead under `CI=true`).
pub fn skip(test: &str, requirement: &str) {
    kelpie_core::testing::missing_requirement(
        test,
        requirement,
        "run it under scripts/with-etcd, which starts a throwaway etcd",
    );
}

/// Options for the shared etcd under a key prefix of the test's own, or `None` (after saying
/// the test was skipped) when `KELPIE_ETCD_ENDPOINTS` is not set.
pub fn shared_etcd(test: &str) -> Option<EtcdOptions> {
    let options = EtcdOptions::from_env().expect("KELPIE_ETCD_ENDPOINTS is malformed");
    let Some(options) = options else {
        skip(test, &format!("{ETCD_ENDPOINTS_ENV} not set"));
        return None;
    };
    Some(options.with_key_prefix(unique_prefix(test)))
}

/// The etcd binary, when etcd tests are enabled and the binary exists; otherwise `None`, after
/// saying the test was skipped.
pub fn private_etcd_binary(test: &str) -> Option<PathBuf> {
    if std::env::var_os(ETCD_ENDPOINTS_ENV).is_none() {
        skip(test, &format!("{ETCD_ENDPOINTS_ENV} not set"));
        return None;
    }
    etcd_binary(test)
}

/// The etcd binary (`ETCD_BIN` or `etcd` on `PATH`), or `None` after saying the test was
/// skipped.
pub fn etcd_binary(test: &str) -> Option<PathBuf> {
    let binary = std::env::var_os("ETCD_BIN").map_or_else(|| PathBuf::from("etcd"), PathBuf::from);
    let found = Command::new(&binary)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !found {
        skip(test, "no etcd binary (set ETCD_BIN)");
        return None;
    }
    Some(binary)
}

/// A key prefix no other test or run uses.
pub fn unique_prefix(test: &str) -> String {
    static PREFIXES: AtomicU64 = AtomicU64::new(0);
    format!(
        "/kelpie-test/{test}/{}-{}-{}/",
        wall_clock_ms(),
        std::process::id(),
        PREFIXES.fetch_add(1, Ordering::SeqCst)
    )
}

/// Wall-clock ms, so that prefixes differ between runs even if a process id repeats.
#[allow(clippy::disallowed_methods)]
fn wall_clock_ms() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis())
}

/// Real sleep: these tests run against a real etcd, never inside the simulator.
#[allow(clippy::disallowed_methods)]
pub async fn sleep_ms(duration_ms: u64) {
    tokio::time::sleep(Duration::from_millis(duration_ms)).await;
}

/// Real elapsed time, for timing assertions against a real etcd.
pub struct Stopwatch(std::time::Instant);

impl Stopwatch {
    /// Starts timing.
    #[allow(clippy::disallowed_methods)]
    pub fn start() -> Self {
        Self(std::time::Instant::now())
    }

    /// Milliseconds since the start.
    pub fn elapsed_ms(&self) -> u64 {
        u64::try_from(self.0.elapsed().as_millis()).unwrap_or(u64::MAX)
    }
}

/// A loopback port nobody listens on right now.
pub fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind an ephemeral loopback port");
    listener.local_addr().unwrap().port()
}

/// One etcd member on loopback, started and stopped by the test. Killed when dropped.
pub struct EtcdMember {
    binary: PathBuf,
    pub name: String,
    data_dir: PathBuf,
    pub client_port: u16,
    pub peer_port: u16,
    initial_cluster: String,
    extra_args: Vec<String>,
    log_path: PathBuf,
    child: Option<Child>,
    stopped: bool,
}

impl EtcdMember {
    /// A member of a cluster whose members are listed in `initial_cluster`
    /// (`name=http://127.0.0.1:<peer port>,...`). Not started yet.
    pub fn new(binary: &Path, dir: &Path, name: &str, ports: (u16, u16), cluster: &str) -> Self {
        Self {
            binary: binary.to_path_buf(),
            name: name.to_string(),
            data_dir: dir.join(format!("{name}.data")),
            client_port: ports.0,
            peer_port: ports.1,
            initial_cluster: cluster.to_string(),
            extra_args: Vec::new(),
            log_path: dir.join(format!("{name}.log")),
            child: None,
            stopped: false,
        }
    }

    /// A new cluster of `count` members named `m0`, `m1`, ..., each started (accepting
    /// connections) with `extra_args`; a leader may not be elected yet.
    pub fn start_cluster(
        binary: &Path,
        dir: &Path,
        count: usize,
        extra_args: &[&str],
    ) -> Vec<Self> {
        let ports: Vec<(u16, u16)> = (0..count).map(|_| (free_port(), free_port())).collect();
        let cluster = ports
            .iter()
            .enumerate()
            .map(|(i, (_, peer))| format!("m{i}=http://127.0.0.1:{peer}"))
            .collect::<Vec<_>>()
            .join(",");
        let mut members: Vec<Self> = ports
            .iter()
            .enumerate()
            .map(|(i, &p)| Self::new(binary, dir, &format!("m{i}"), p, &cluster))
            .collect();
        for member in &mut members {
            member.set_extra_args(extra_args);
            member.start();
        }
        members
    }

    /// A single-member cluster with `extra_args`, started and answering.
    pub fn start_single(binary: &Path, dir: &Path, scheme: &str, extra_args: &[&str]) -> Self {
        let (client_port, peer_port) = (free_port(), free_port());
        let cluster = format!("solo=http://127.0.0.1:{peer_port}");
        let mut member = Self::new(binary, dir, "solo", (client_port, peer_port), &cluster);
        member.extra_args = extra_args.iter().map(|a| a.to_string()).collect();
        member.start_with_scheme(scheme);
        member
    }

    /// Passes `args` to etcd on every (re)start.
    pub fn set_extra_args(&mut self, args: &[&str]) {
        self.extra_args = args.iter().map(|a| a.to_string()).collect();
    }

    /// The client URL, `http://127.0.0.1:<port>`.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.client_port)
    }

    /// Starts (or restarts) the member on its data directory and waits until its client port
    /// accepts connections. Panics with the member's log if it does not.
    pub fn start(&mut self) {
        self.start_with_scheme("http");
    }

    fn start_with_scheme(&mut self, scheme: &str) {
        assert!(self.child.is_none(), "{} is already running", self.name);
        let client_url = format!("{scheme}://127.0.0.1:{}", self.client_port);
        let peer_url = format!("http://127.0.0.1:{}", self.peer_port);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_path)
            .expect("open the member's log");
        let child = Command::new(&self.binary)
            .args(["--name", &self.name, "--data-dir"])
            .arg(&self.data_dir)
            .args(["--listen-client-urls", &client_url])
            .args(["--advertise-client-urls", &client_url])
            .args(["--listen-peer-urls", &peer_url])
            .args(["--initial-advertise-peer-urls", &peer_url])
            .args(["--initial-cluster", &self.initial_cluster])
            .args(["--initial-cluster-state", "new"])
            .args(["--initial-cluster-token", "kelpie-test"])
            .args(&self.extra_args)
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("spawn etcd");
        self.child = Some(child);
        self.stopped = false;
        self.wait_accepting();
    }

    #[allow(clippy::disallowed_methods)]
    fn wait_accepting(&mut self) {
        let started = Stopwatch::start();
        while started.elapsed_ms() < ETCD_START_TIMEOUT_MS {
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("{} exited with {status}; log:\n{}", self.name, self.log());
            }
            if TcpStream::connect(("127.0.0.1", self.client_port)).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(ETCD_START_POLL_MS));
        }
        panic!("{} did not start; log:\n{}", self.name, self.log());
    }

    /// The member's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// The member's process id, if it runs.
    pub fn pid(&self) -> Option<i32> {
        let id = self.child.as_ref()?.id();
        Some(i32::try_from(id).expect("pids fit in i32"))
    }

    /// Whether the member runs (stopped or not).
    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// Whether the member is SIGSTOPped.
    pub fn is_stopped(&self) -> bool {
        self.stopped
    }

    /// SIGKILLs the member and reaps it.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        self.stopped = false;
    }

    /// SIGSTOPs the member: it keeps its sockets but answers nothing.
    pub fn pause(&mut self) {
        self.signal(libc::SIGSTOP);
        self.stopped = true;
    }

    /// SIGCONTs a paused member.
    pub fn resume(&mut self) {
        self.signal(libc::SIGCONT);
        self.stopped = false;
    }

    fn signal(&self, signal: libc::c_int) {
        let pid = self.pid().expect("signal a running member");
        // SAFETY: `kill` has no memory-safety preconditions; the pid is our own child, not
        // yet reaped, so it cannot name another process.
        let result = unsafe { libc::kill(pid, signal) };
        assert_eq!(result, 0, "kill({pid}, {signal}) failed");
    }
}

impl Drop for EtcdMember {
    fn drop(&mut self) {
        // A stopped process dies of SIGKILL too.
        self.kill();
    }
}
