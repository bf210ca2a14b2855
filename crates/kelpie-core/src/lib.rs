//! The vocabulary every Kelpie crate shares: validated identifiers, fencing tokens, the
//! [`Clock`] trait through which all time is read, and the named limits.
//!
//! Nothing here performs I/O. Time enters only through [`Clock`], so the same code runs on
//! the real clock ([`TokioClock`]) in a process and on the simulated one in `kelpie-sim`.
//!
//! - [`id`]: [`ActorId`] and [`NodeId`], validated on construction.
//! - [`token`]: [`FencingToken`], strictly increasing per actor across holders.
//! - [`clock`]: the [`Clock`] trait and the real-time implementation.
//! - [`coverage`]: coverage marks the simulator checks were hit.
//! - [`limits`]: bounds with their units in their names.
//! - [`testing`]: what a test does when a requirement beyond Rust is missing (skip, or fail
//!   under `CI=true`).
//!
//! ```
//! use kelpie_core::{ActorId, NodeId};
//! let actor = ActorId::new("user/42").unwrap();
//! let node = NodeId::new("node-a").unwrap();
//! assert_eq!(actor.as_str(), "user/42");
//! assert!(NodeId::new("").is_err());
//! # let _ = node;
//! ```

#![warn(missing_docs)]

pub mod clock;
pub mod coverage;
pub mod id;
pub mod limits;
pub mod testing;
pub mod token;

#[cfg(feature = "tokio")]
pub use clock::TokioClock;
pub use clock::{Clock, ManualClock, SharedClock, SleepFuture};
pub use id::{ActorId, IdError, NodeId};
pub use token::FencingToken;
