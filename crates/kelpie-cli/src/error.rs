//! The errors a `kelpie` command ends with, and the exit code each maps to.
//!
//! Exit codes are part of the command-line interface, so they are decided here in one place:
//! 0 done, 1 refused or a simulation failure, 2 bad usage or configuration, 3 store
//! unavailable, 4 done but the answer could not be written to stdout. Clap's own usage errors
//! already exit with 2.

use kelpie_core::IdError;
use kelpie_lease::{ConfigError, LeaseError, StoreError};

use crate::merge::MergeError;
use crate::store_url::StoreUrlError;

/// Exit code of a refused lease operation or of a simulation that found a violation.
pub const EXIT_REFUSED: u8 = 1;
/// Exit code of bad usage or configuration.
pub const EXIT_USAGE: u8 = 2;
/// Exit code of a store that could not be reached or failed the operation.
pub const EXIT_UNAVAILABLE: u8 = 3;
/// Exit code of a command whose answer could not be written to stdout (a full disk, a closed
/// pipe): what it did is done, its answer lost.
pub const EXIT_OUTPUT: u8 = 4;
/// Exit code of a command stopped by SIGINT or SIGTERM after it cleaned up (a shell's 128 + 2).
pub const EXIT_INTERRUPTED: u8 = 130;

/// Why a command failed.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// The options were inconsistent or out of range.
    #[error("{0}")]
    Usage(String),
    /// An actor or node id was refused.
    #[error(transparent)]
    Id(#[from] IdError),
    /// A lease setting was out of range.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// `--store` did not parse.
    #[error(transparent)]
    StoreUrl(#[from] StoreUrlError),
    /// The store refused the operation on the protocol's terms. `message` says so for a
    /// person (a lease command words the store's times as durations from now).
    #[error("refused: {message}")]
    Refused {
        /// The refusal.
        error: LeaseError,
        /// What to print.
        message: String,
    },
    /// The store given by `--store` cannot be used by this build: its path cannot be opened
    /// as a database, or a newer Kelpie wrote it. Retrying will not help; the option must
    /// change.
    #[error("{0}")]
    StoreConfig(StoreError),
    /// The store could not be reached, or failed the operation. The store's own message
    /// already says which ("lease store unavailable: ...", "... write failed ...").
    #[error("{0}")]
    StoreUnavailable(StoreError),
    /// The actors' fenced state store (`kelpie node --state`) failed: named by the option, as
    /// the node has two stores. Exits as the same error of the lease store would.
    #[error("--state: {0}")]
    StateStore(StoreError),
    /// `kelpie sim merge` was given reports that are not the shards of one sweep.
    #[error(transparent)]
    Merge(#[from] MergeError),
    /// A signal stopped the command; what it had written was cleaned up first.
    #[error("stopped by {signal}; {cleaned_up}")]
    Interrupted {
        /// The signal: "SIGINT" or "SIGTERM".
        signal: &'static str,
        /// What was cleaned up.
        cleaned_up: &'static str,
    },
    /// The command's answer could not be written to stdout. `done` says what was done
    /// already (a lease acquired, renewed or released), if anything was.
    #[error("{}could not write the answer to stdout: {source}", done.map_or(String::new(), |done| format!("{done}, but ")))]
    Output {
        /// What was done before the answer was lost, for a write.
        done: Option<&'static str>,
        /// Why.
        source: std::io::Error,
    },
    /// A file the command writes could not be written.
    #[error("cannot write {path}: {source}")]
    Write {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
}

impl CliError {
    /// The process exit code for this error.
    pub fn exit_code(&self) -> u8 {
        match self {
            CliError::Refused { .. } => EXIT_REFUSED,
            CliError::Interrupted { .. } => EXIT_INTERRUPTED,
            CliError::Output { .. } => EXIT_OUTPUT,
            CliError::StoreUnavailable(_) => EXIT_UNAVAILABLE,
            CliError::StateStore(error) if is_configuration(error) => EXIT_USAGE,
            CliError::StateStore(_) => EXIT_UNAVAILABLE,
            CliError::Usage(_)
            | CliError::Id(_)
            | CliError::Config(_)
            | CliError::StoreUrl(_)
            | CliError::StoreConfig(_)
            | CliError::Merge(_)
            | CliError::Write { .. } => EXIT_USAGE,
        }
    }
}

impl From<LeaseError> for CliError {
    fn from(error: LeaseError) -> Self {
        match error {
            LeaseError::Store(store) => CliError::from(store),
            error => CliError::Refused {
                message: error.to_string(),
                error,
            },
        }
    }
}

impl From<StoreError> for CliError {
    fn from(error: StoreError) -> Self {
        match is_configuration(&error) {
            true => CliError::StoreConfig(error),
            false => CliError::StoreUnavailable(error),
        }
    }
}

/// A path that cannot be opened, a store from a newer Kelpie, an option the store refuses and
/// refused credentials are configuration problems: only a different `--store` (or binary, or
/// credentials) fixes them. Everything else is the store failing or being out of reach at run
/// time, which a retry may get past.
fn is_configuration(error: &StoreError) -> bool {
    matches!(
        error,
        StoreError::Open { .. }
            | StoreError::SchemaTooNew { .. }
            | StoreError::InvalidOption { .. }
            | StoreError::AccessDenied { .. }
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use kelpie_core::{ActorId, NodeId};

    #[test]
    fn each_category_has_its_exit_code() {
        let actor_id = ActorId::new("a").unwrap();
        let holder = NodeId::new("n").unwrap();
        let refused = LeaseError::HeldByOther {
            actor_id,
            holder,
            expires_at_ms: 1,
        };
        assert_eq!(CliError::from(refused).exit_code(), EXIT_REFUSED);
        let open = StoreError::Open {
            store: "lease store",
            path: "x".into(),
            reason: "parent is a file".into(),
        };
        assert_eq!(CliError::from(open).exit_code(), EXIT_USAGE);
        let down = StoreError::Unavailable { reason: "x".into() };
        let down = CliError::from(LeaseError::Store(down));
        assert_eq!(down.exit_code(), EXIT_UNAVAILABLE);
        assert_eq!(CliError::Usage("x".into()).exit_code(), EXIT_USAGE);
    }

    #[test]
    fn a_state_store_error_names_the_state_store() {
        let open = StoreError::Open {
            store: "state store",
            path: "/s".into(),
            reason: "it is a directory".into(),
        };
        let state = CliError::StateStore(open);
        assert_eq!(
            state.to_string(),
            "--state: cannot open state store /s: it is a directory"
        );
        assert_eq!(state.exit_code(), EXIT_USAGE);
        let newer = StoreError::SchemaTooNew {
            store: "state store",
            path: "/s".into(),
            found_version: 9,
            supported_version: 1,
        };
        let newer = CliError::StateStore(newer);
        assert!(
            (newer.to_string()).starts_with("--state: state store /s has schema version 9"),
            "{newer}"
        );
        assert_eq!(newer.exit_code(), EXIT_USAGE);
        let down = CliError::StateStore(StoreError::Unavailable { reason: "x".into() });
        assert_eq!(down.exit_code(), EXIT_UNAVAILABLE);
    }
}
