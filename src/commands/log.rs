//! What goes to stderr: tracing in text or JSON, and the operator's lines (`fatal`, `notice`)
//! in the same format, so a JSON log stays JSON to its last line.

use std::io::IsTerminal;
use std::sync::OnceLock;

use crate::cli::LogFormat;

/// The log format, once known.
static LOG_FORMAT: OnceLock<LogFormat> = OnceLock::new();

pub fn init(format: LogFormat) {
    if LOG_FORMAT.set(format).is_err() {
        return;
    }
    let filter = tracing_subscriber::EnvFilter::try_from_env("DSSM_CERTS_LOG")
        // kube-client logs every failed HTTP status at ERROR; `call` reports them with the object.
        .unwrap_or_else(|_| {
            tracing_subscriber::EnvFilter::new("warn,kube_client::client::builder=off")
        });
    // Colour only for a person at a terminal, and never when NO_COLOR is set (no-color.org).
    let colour = std::io::stderr().is_terminal()
        && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(colour)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
}

/// `--log-format json` (or its variable) asked for, even on a command line clap refused.
pub fn json_requested() -> bool {
    let args: Vec<String> = std::env::args().collect();
    args.windows(2)
        .any(|w| w[0] == "--log-format" && w[1] == "json")
        || args.iter().any(|a| a == "--log-format=json")
        || std::env::var("DSSM_CERTS_LOG_FORMAT").is_ok_and(|v| v == "json")
}

/// The last line before a non-zero exit: `error: ...`, or an ERROR record in JSON.
pub fn fatal(message: &str) {
    match LOG_FORMAT.get() {
        Some(LogFormat::Json) => tracing::error!("{}", message.trim_end()),
        _ => eprintln!("error: {}", message.trim_end()),
    }
}

/// A line for the operator that is not an error (a signal, TMM restored, a note).
pub fn notice(message: &str) {
    match LOG_FORMAT.get() {
        Some(LogFormat::Json) => tracing::warn!("{message}"),
        _ => eprintln!("{message}"),
    }
}
