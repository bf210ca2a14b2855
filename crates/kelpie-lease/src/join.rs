//! Awaiting several requests at once, answers in request order.

use std::future::Future;

use futures_util::StreamExt;

/// The most requests awaited together that are joined ([`futures_util::future::join_all`])
/// rather than put in a set that polls each only when it is woken. Measured on the keeper's
/// rounds in the lease swarm, before a round went to the simulated store as one message (the
/// keepers of the etcd backend and of the memory and SQLite stores still await each request
/// this way): for rounds of two to four, 2-3% less CPU per lease operation (`swarm_bench`,
/// medians of 21 alternated runs). Raised from 8: a sixth of the swarm's renewals went in rounds
/// of more than 8, and up to 16 the set's allocations and atomic operations per request cost
/// more time than polling the pending requests again, though the repolls take more
/// instructions (joined up to 16: about 1.5% less CPU over 200 seeds, 0.5% more instructions
/// per lease op).
pub(crate) const JOINED_REQUESTS_MAX: usize = 16;

/// Awaits every future at once; their outputs in the order the futures came.
pub(crate) async fn join_in_order<F: Future>(
    futures: impl ExactSizeIterator<Item = F>,
) -> Vec<F::Output> {
    let count = futures.len();
    // A few are joined: all polled again at each wake, with the caller's waker. A set gives
    // each its own task, waker and queue entry, whose atomic reference counts and queue cost
    // more than polling a few pending requests again.
    if count <= JOINED_REQUESTS_MAX {
        return futures_util::future::join_all(futures).await;
    }
    // More are polled each when it is woken, not all at every wake: n answers cost about n
    // polls, not n squared. Each is boxed before it joins the set. A set's task holds its
    // future, and building one copied the whole request future (hundreds of bytes) three times
    // on its way into the task's allocation; a boxed request is copied once.
    let mut in_flight: futures_util::stream::FuturesUnordered<_> = futures
        .enumerate()
        .map(|(i, future)| Box::pin(async move { (i, future.await) }))
        .collect();
    let mut answered = Vec::with_capacity(count);
    while let Some(answer) = in_flight.next().await {
        answered.push(answer);
    }
    answered.sort_unstable_by_key(|&(i, _)| i);
    answered.into_iter().map(|(_, output)| output).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::pin::Pin;
    use std::task::{Context, Poll, Waker};

    /// Ready with `value` after `polls_left` more polls, waking itself at each.
    struct ReadyAfter {
        polls_left: usize,
        value: usize,
    }

    impl Future for ReadyAfter {
        type Output = usize;

        fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<usize> {
            if self.polls_left == 0 {
                return Poll::Ready(self.value);
            }
            self.polls_left -= 1;
            cx.waker().wake_by_ref();
            Poll::Pending
        }
    }

    /// Joined or in a set, the outputs come in the futures' order, though the last finishes
    /// first.
    #[test]
    fn outputs_come_in_the_futures_order_however_they_finish() {
        for count in [0, 1, 2, JOINED_REQUESTS_MAX, JOINED_REQUESTS_MAX + 1, 40] {
            let futures = (0..count).map(|i| ReadyAfter {
                polls_left: count - i,
                value: i,
            });
            let mut joined = std::pin::pin!(join_in_order(futures));
            let mut context = Context::from_waker(Waker::noop());
            let mut polls = 0;
            let outputs = loop {
                if let Poll::Ready(outputs) = joined.as_mut().poll(&mut context) {
                    break outputs;
                }
                polls += 1;
                assert!(polls < 1_000, "{count} futures: still pending");
            };
            assert_eq!(outputs, (0..count).collect::<Vec<_>>(), "{count} futures");
        }
    }
}
