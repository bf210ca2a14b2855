//! Turning failures into something a person can replay: panic capture inside polls, the
//! failure banner whose first line is `DST_SEED=<n>`, and the reproduce command.

use crate::config::SimConfig;
use crate::error::SimError;
use std::any::Any;
use std::cell::{Cell, RefCell};
use std::panic::{self, AssertUnwindSafe};
use std::path::Path;
use std::sync::Once;

/// Length of the hash cargo appends to test binary names (`harness_dst-0123456789abcdef`).
const CARGO_BINARY_HASH_LENGTH: usize = 16;

thread_local! {
    /// Whether a panic on this thread happens inside a simulated poll.
    static CAPTURING: Cell<bool> = const { Cell::new(false) };
    /// The message and location of the last captured panic.
    static CAPTURED: RefCell<Option<String>> = const { RefCell::new(None) };
}

static INSTALL_HOOK: Once = Once::new();

/// Installs (once per process) a panic hook that, for panics inside simulated code, records
/// the message instead of printing it, so that `DST_SEED=<n>` is the first line a failed run
/// prints. Panics elsewhere go to the previous hook unchanged.
fn install_hook() {
    INSTALL_HOOK.call_once(|| {
        let previous = panic::take_hook();
        panic::set_hook(Box::new(move |info| {
            if CAPTURING.with(Cell::get) {
                let location = info
                    .location()
                    .map(|l| format!(" at {}:{}:{}", l.file(), l.line(), l.column()))
                    .unwrap_or_default();
                let message = format!("{}{location}", payload_message(info.payload()));
                CAPTURED.with(|captured| *captured.borrow_mut() = Some(message));
            } else {
                previous(info);
            }
        }));
    });
}

/// The text of a panic payload.
fn payload_message(payload: &(dyn Any + Send)) -> String {
    if let Some(message) = payload.downcast_ref::<&str>() {
        (*message).to_string()
    } else if let Some(message) = payload.downcast_ref::<String>() {
        message.clone()
    } else {
        "panic with a non-string payload".to_string()
    }
}

/// Runs `f`, turning a panic into `Err(message with location)`.
#[inline]
pub(crate) fn catch_panic<T>(f: impl FnOnce() -> T) -> Result<T, String> {
    install_hook();
    let was_capturing = CAPTURING.with(|capturing| capturing.replace(true));
    let result = panic::catch_unwind(AssertUnwindSafe(f));
    CAPTURING.with(|capturing| capturing.set(was_capturing));
    result.map_err(|payload| {
        CAPTURED
            .with(|captured| captured.borrow_mut().take())
            .unwrap_or_else(|| payload_message(payload.as_ref()))
    })
}

/// The command that reproduces a failed run: `config.reproduce_command` if set, otherwise
/// one derived from the running binary (`cargo test -p <pkg> --test <binary> <test> -- --exact
/// --include-ignored` for a test, `cargo run -p <pkg> --example <name>` for an example).
pub fn reproduce_command(config: &SimConfig) -> String {
    if let Some(command) = &config.reproduce_command {
        return command.clone();
    }
    let check = if config.check_determinism {
        "DST_CHECK_DETERMINISM=1 "
    } else {
        ""
    };
    let prefix = format!("{check}DST_SEED={}", config.seed);
    let package = std::env::var("CARGO_PKG_NAME").ok();
    let package_arg = package
        .as_deref()
        .map(|p| format!(" -p {p}"))
        .unwrap_or_default();
    let program = std::env::args_os().next().unwrap_or_default();
    let program = Path::new(&program);
    let binary = program
        .file_name()
        .map(|name| strip_hash(&name.to_string_lossy()))
        .unwrap_or_default();
    let in_examples = program
        .parent()
        .and_then(Path::file_name)
        .is_some_and(|dir| dir == "examples");
    if in_examples {
        return format!("{prefix} cargo run{package_arg} --example {binary}");
    }
    let is_lib = package.is_some_and(|p| p.replace('-', "_") == binary);
    let target = if is_lib {
        " --lib".to_string()
    } else {
        format!(" --test {binary}")
    };
    let filter = match std::thread::current().name() {
        // `--include-ignored`: the test may be a long run kept behind `#[ignore]` (a stress
        // sweep), which the harness would otherwise skip, replaying nothing.
        Some(name) if name != "main" => format!(" {name} -- --exact --include-ignored"),
        _ => String::new(),
    };
    format!("{prefix} cargo test{package_arg}{target}{filter}")
}

/// `name` without cargo's `-<16 hex digits>` suffix.
fn strip_hash(name: &str) -> String {
    match name.rsplit_once('-') {
        Some((base, hash))
            if hash.len() == CARGO_BINARY_HASH_LENGTH
                && hash.chars().all(|c| c.is_ascii_hexdigit()) =>
        {
            base.to_string()
        }
        _ => name.to_string(),
    }
}

/// The failure banner: `DST_SEED=<n>` first, then the reproduce command, then what failed.
pub fn render_failure(config: &SimConfig, error: &SimError) -> String {
    let seed = error.seed().unwrap_or(config.seed);
    let step = error
        .step()
        .map(|step| format!(" at step {step}"))
        .unwrap_or_default();
    format!(
        "DST_SEED={seed}\n{command}\nkelpie-sim: simulation failed ({kind}){step}\n{error}\n",
        command = reproduce_command(config),
        kind = error.kind(),
    )
}

/// Prints the failure banner to stderr in one write, through the test harness's capture.
pub(crate) fn print_failure(config: &SimConfig, error: &SimError) {
    if !config.print_failure_banner {
        return;
    }
    eprint!("{}", render_failure(config, error));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn panics_are_captured_with_location() {
        let err = catch_panic(|| panic!("boom {}", 7)).unwrap_err();
        assert!(err.starts_with("boom 7 at "), "{err}");
        assert!(err.contains("failure.rs"), "{err}");
        assert_eq!(catch_panic(|| 5), Ok(5));
    }

    #[test]
    fn banner_starts_with_the_seed_and_names_the_command() {
        let config = SimConfig::new(99).with_reproduce_command("replay me");
        let error = SimError::Deadlock {
            seed: 99,
            step: 3,
            sim_time_ms: 0,
            tasks_blocked: 0,
        };
        let text = render_failure(&config, &error);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[0], "DST_SEED=99");
        assert_eq!(lines[1], "replay me");
        assert!(lines[2].contains("deadlock") && lines[2].contains("step 3"));
    }

    #[test]
    fn derived_command_names_package_and_target() {
        assert_eq!(strip_hash("harness_dst-0123456789abcdef"), "harness_dst");
        assert_eq!(strip_hash("pingpong"), "pingpong");
        let command = reproduce_command(&SimConfig::new(5).with_check_determinism(false));
        assert!(command.starts_with("DST_SEED=5 cargo "), "{command}");
        assert!(command.contains(" --lib "), "{command}");
    }
}
