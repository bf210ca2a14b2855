//! SIGINT and SIGTERM, for the commands that clean up before they stop (`kelpie node` releases
//! its leases, `kelpie bench` removes its file): handlers installed up front, and the name of
//! the first of them to arrive.

use tokio::signal::unix::{signal, Signal, SignalKind};

use crate::error::CliError;

/// Handlers for SIGINT and SIGTERM. Until they are installed, either signal ends the process
/// at once, as usual; after, it is only noted, and the command decides what to do.
pub struct StopSignals {
    interrupt: Signal,
    terminate: Signal,
}

impl StopSignals {
    /// Installs both handlers.
    ///
    /// # Errors
    /// [`CliError::Usage`] if the operating system refuses a handler.
    pub fn install() -> Result<Self, CliError> {
        let handler = |kind| {
            signal(kind)
                .map_err(|e| CliError::Usage(format!("cannot install a signal handler: {e}")))
        };
        Ok(Self {
            interrupt: handler(SignalKind::interrupt())?,
            terminate: handler(SignalKind::terminate())?,
        })
    }

    /// Waits for the first of them: `"SIGINT"` or `"SIGTERM"`.
    pub async fn first(&mut self) -> &'static str {
        tokio::select! {
            _ = self.interrupt.recv() => "SIGINT",
            _ = self.terminate.recv() => "SIGTERM",
        }
    }
}
