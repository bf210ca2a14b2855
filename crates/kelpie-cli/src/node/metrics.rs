//! The node's Prometheus metrics: counters kept in atomics, rendered in the Prometheus text
//! exposition format (version 0.0.4) and served over plain HTTP at `--metrics-addr`.
//!
//! Written by hand rather than through a metrics crate: a dozen series, one histogram and a
//! `GET /metrics` need no registry, and the CLI test parses the output with an independent
//! Prometheus parser, which is what keeps the format honest.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use kelpie_lease::LostReason;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Upper bounds of the renewal latency buckets, in seconds (Prometheus' default buckets, with
/// a finer low end: renewals against a local SQLite file take about a millisecond).
pub const RENEWAL_BUCKETS_SECONDS: [f64; 12] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
];

/// Longest HTTP request head the metrics endpoint reads before answering.
const REQUEST_HEAD_BYTES_MAX: usize = 8 * 1024;
/// Longest the endpoint waits for a request head.
const REQUEST_READ_TIMEOUT_MS: u64 = 2_000;

/// Every `reason` label of `kelpie_lease_losses_total`, in the order rendered.
pub const LOSS_REASON_LABELS: [&str; 4] = ["refused", "belief_expired", "token_changed", "other"];

/// A cumulative histogram of durations.
#[derive(Debug, Default)]
pub struct Histogram {
    /// Observations at or below each bound of [`RENEWAL_BUCKETS_SECONDS`] (not cumulative
    /// here; rendering sums them).
    buckets: [AtomicU64; RENEWAL_BUCKETS_SECONDS.len()],
    count: AtomicU64,
    sum_micros: AtomicU64,
}

impl Histogram {
    /// Records one duration.
    pub fn observe(&self, duration: Duration) {
        let seconds = duration.as_secs_f64();
        if let Some(index) = RENEWAL_BUCKETS_SECONDS.iter().position(|b| seconds <= *b) {
            self.buckets[index].fetch_add(1, Ordering::Relaxed);
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        let micros = u64::try_from(duration.as_micros()).unwrap_or(u64::MAX);
        self.sum_micros.fetch_add(micros, Ordering::Relaxed);
    }
}

/// Everything the node counts. Shared with `Arc`; every field only grows.
#[derive(Debug, Default)]
pub struct Metrics {
    pub acquisitions: AtomicU64,
    pub renewals: AtomicU64,
    pub renewal_failures: AtomicU64,
    pub renewal_latency: Histogram,
    /// Campaign attempts that failed other than by the lease being held elsewhere
    /// (`SessionEvent::AcquireFailed`).
    pub acquire_failures: AtomicU64,
    /// Leases lost because the store refused a renewal (`LostReason::Refused`).
    pub losses_refused: AtomicU64,
    /// Leases lost because the store answered a renewal with another token
    /// (`LostReason::TokenChanged`: a store bug).
    pub losses_token_changed: AtomicU64,
    /// Leases lost for a reason newer than this code (`LostReason` is non-exhaustive).
    pub losses_other: AtomicU64,
    /// Beliefs that ran out (`LostReason::BeliefExpired`), or whose guard the session
    /// cancelled as they were about to (`CancelReason::BeliefEnding`): both
    /// `kelpie_lease_beliefs_ended_before_expiry_total` and the `belief_expired` loss.
    pub beliefs_ended_before_expiry: AtomicU64,
    pub releases: AtomicU64,
    pub activations: AtomicU64,
    pub writes_accepted: AtomicU64,
    pub writes_refused: AtomicU64,
    pub write_errors: AtomicU64,
}

/// Adds one to a counter.
pub fn bump(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

fn get(counter: &AtomicU64) -> u64 {
    counter.load(Ordering::Relaxed)
}

/// The `reason` label of `kelpie_lease_losses_total` that counts a loss for `reason`.
pub fn loss_reason_label(reason: &LostReason) -> &'static str {
    match reason {
        LostReason::Refused(_) => "refused",
        LostReason::BeliefExpired => "belief_expired",
        LostReason::TokenChanged { .. } => "token_changed",
        _ => "other",
    }
}

impl Metrics {
    /// Counts a lost lease under the label [`loss_reason_label`] gives its reason.
    pub fn count_loss(&self, reason: &LostReason) {
        bump(self.loss_counter(loss_reason_label(reason)));
    }

    /// The counter behind one `reason` label of `kelpie_lease_losses_total`.
    fn loss_counter(&self, label: &str) -> &AtomicU64 {
        match label {
            "refused" => &self.losses_refused,
            "belief_expired" => &self.beliefs_ended_before_expiry,
            "token_changed" => &self.losses_token_changed,
            _ => &self.losses_other,
        }
    }

    /// The text exposition, with `leases_held` (read from the keeper's beliefs at the scrape).
    pub fn render(&self, leases_held: usize) -> String {
        let mut out = String::new();
        let held = "kelpie_leases_held";
        let _ = writeln!(out, "# HELP {held} Leases this node believes it holds now.");
        let _ = writeln!(out, "# TYPE {held} gauge\n{held} {leases_held}");
        let counters: [(&str, &str, u64); 7] = [
            ("kelpie_lease_acquisitions_total", "Leases granted to this node.", get(&self.acquisitions)),
            (
                "kelpie_lease_acquire_failures_total",
                "Attempts to acquire that failed other than by the lease being held elsewhere: the store failed, or its grant came too late (retried).",
                get(&self.acquire_failures),
            ),
            ("kelpie_lease_renewals_total", "Renewals the store granted.", get(&self.renewals)),
            (
                "kelpie_lease_renewal_failures_total",
                "Renewals that failed at the store or in the network (retried while the belief lasts).",
                get(&self.renewal_failures),
            ),
            ("kelpie_lease_releases_total", "Releases the store answered.", get(&self.releases)),
            (
                "kelpie_lease_beliefs_ended_before_expiry_total",
                "Beliefs that ran out before the store's expiry, or whose guard was cancelled as they were about to, because no renewal was confirmed in time.",
                get(&self.beliefs_ended_before_expiry),
            ),
            (
                "kelpie_actor_activations_total",
                "Actors activated here (lease acquired and state store fenced).",
                get(&self.activations),
            ),
        ];
        for (name, help, value) in counters {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {value}"
            );
        }
        let losses = "kelpie_lease_losses_total";
        let _ = writeln!(
            out,
            "# HELP {losses} Leases lost, by reason: refused (the store refused a renewal), \
             belief_expired (no renewal was confirmed before the belief ran out, or before its guard's \
             cancel lead), token_changed (the store \
             answered a renewal with another token: a store bug), other (a reason newer than this \
             build's labels)."
        );
        let _ = writeln!(out, "# TYPE {losses} counter");
        for label in LOSS_REASON_LABELS {
            let value = get(self.loss_counter(label));
            let _ = writeln!(out, "{losses}{{reason=\"{label}\"}} {value}");
        }
        let writes = "kelpie_fenced_writes_total";
        let _ = writeln!(
            out,
            "# HELP {writes} Writes to the fenced state store, by outcome: accepted, refused (stale token), error."
        );
        let _ = writeln!(out, "# TYPE {writes} counter");
        for (outcome, counter) in [
            ("accepted", &self.writes_accepted),
            ("refused", &self.writes_refused),
            ("error", &self.write_errors),
        ] {
            let _ = writeln!(out, "{writes}{{outcome=\"{outcome}\"}} {}", get(counter));
        }
        self.render_histogram(&mut out);
        out
    }

    fn render_histogram(&self, out: &mut String) {
        let name = "kelpie_lease_renewal_duration_seconds";
        let histogram = &self.renewal_latency;
        let _ = writeln!(out, "# HELP {name} Time from sending a renewal to the store's answer.\n# TYPE {name} histogram");
        let mut cumulative = 0;
        for (bound, bucket) in RENEWAL_BUCKETS_SECONDS.iter().zip(&histogram.buckets) {
            cumulative += get(bucket);
            let _ = writeln!(out, "{name}_bucket{{le=\"{bound}\"}} {cumulative}");
        }
        let count = get(&histogram.count);
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {count}");
        let sum_seconds = get(&histogram.sum_micros) as f64 / 1e6;
        let _ = writeln!(out, "{name}_sum {sum_seconds}\n{name}_count {count}");
    }
}

/// Serves `GET /metrics` on `listener` until the process ends; `render` makes the body.
pub async fn serve(listener: TcpListener, render: Arc<dyn Fn() -> String + Send + Sync>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let render = Arc::clone(&render);
        drop(tokio::spawn(async move {
            let _ = answer(stream, render.as_ref()).await;
        }));
    }
}

/// Reads one request head (bounded in size and time) and answers it, then closes.
async fn answer(
    mut stream: TcpStream,
    render: &(dyn Fn() -> String + Send + Sync),
) -> std::io::Result<()> {
    let mut head = Vec::new();
    let mut buffer = [0u8; 1024];
    let reading = async {
        while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < REQUEST_HEAD_BYTES_MAX {
            let read = stream.read(&mut buffer).await?;
            if read == 0 {
                break;
            }
            head.extend_from_slice(&buffer[..read]);
        }
        Ok::<(), std::io::Error>(())
    };
    let timed = tokio::time::timeout(Duration::from_millis(REQUEST_READ_TIMEOUT_MS), reading);
    if timed.await.is_err() {
        return Ok(());
    }
    let request_line = head.split(|b| *b == b'\n').next().unwrap_or_default();
    let request_line = String::from_utf8_lossy(request_line);
    let mut words = request_line.split_whitespace();
    let (method, path) = (words.next().unwrap_or(""), words.next().unwrap_or(""));
    let (status, content_type, body) = match (method, path) {
        ("GET", "/metrics") => (
            "200 OK",
            "text/plain; version=0.0.4; charset=utf-8",
            render(),
        ),
        ("GET", _) => (
            "404 Not Found",
            "text/plain; charset=utf-8",
            "try /metrics\n".to_string(),
        ),
        _ => (
            "405 Method Not Allowed",
            "text/plain; charset=utf-8",
            "GET only\n".to_string(),
        ),
    };
    let response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(response.as_bytes()).await?;
    stream.shutdown().await
}

#[cfg(test)]
mod tests {
    use super::*;
    use kelpie_core::{ActorId, FencingToken, NodeId};
    use kelpie_lease::LeaseError;

    #[test]
    fn histogram_buckets_are_cumulative_and_counted() {
        let metrics = Metrics::default();
        metrics.renewal_latency.observe(Duration::from_micros(300));
        metrics.renewal_latency.observe(Duration::from_millis(3));
        metrics.renewal_latency.observe(Duration::from_secs(9));
        bump(&metrics.writes_accepted);
        let text = metrics.render(2);
        assert!(text.contains("kelpie_leases_held 2\n"), "{text}");
        assert!(
            text.contains("kelpie_lease_renewal_duration_seconds_bucket{le=\"0.0005\"} 1\n"),
            "{text}"
        );
        assert!(
            text.contains("kelpie_lease_renewal_duration_seconds_bucket{le=\"0.005\"} 2\n"),
            "{text}"
        );
        assert!(
            text.contains("kelpie_lease_renewal_duration_seconds_bucket{le=\"2.5\"} 2\n"),
            "{text}"
        );
        assert!(
            text.contains("kelpie_lease_renewal_duration_seconds_bucket{le=\"+Inf\"} 3\n"),
            "{text}"
        );
        assert!(
            text.contains("kelpie_lease_renewal_duration_seconds_count 3\n"),
            "{text}"
        );
        assert!(
            text.contains("kelpie_fenced_writes_total{outcome=\"accepted\"} 1\n"),
            "{text}"
        );
    }

    /// Each reason a keeper gives for a lost lease is counted under its own label; a store
    /// answering a renewal with another token is a store bug, not a refusal.
    #[test]
    fn losses_are_counted_by_reason() {
        let metrics = Metrics::default();
        let refusal = LeaseError::NotHolder {
            actor_id: ActorId::new("a1").unwrap(),
            node_id: NodeId::new("n1").unwrap(),
            holder: None,
        };
        let reasons = [
            (LostReason::Refused(refusal), "refused"),
            (LostReason::BeliefExpired, "belief_expired"),
            (
                LostReason::TokenChanged {
                    answered: FencingToken(7),
                },
                "token_changed",
            ),
        ];
        for (count, (reason, label)) in (1..).zip(&reasons) {
            assert_eq!(loss_reason_label(reason), *label);
            for _ in 0..count {
                metrics.count_loss(reason);
            }
        }
        let text = metrics.render(0);
        for (expected, label) in [
            (1, "refused"),
            (2, "belief_expired"),
            (3, "token_changed"),
            (0, "other"),
        ] {
            let line = format!("kelpie_lease_losses_total{{reason=\"{label}\"}} {expected}\n");
            assert!(text.contains(&line), "{line} in {text}");
        }
        assert!(
            text.contains("kelpie_lease_beliefs_ended_before_expiry_total 2\n"),
            "{text}"
        );
    }
}
