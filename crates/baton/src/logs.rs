//! Logs of `baton up`, the proxy and the operator, through `tracing`: one event per
//! line, as text a person reads on a terminal (a rollout's events as `baton up` has
//! always printed them: the clock, the rollout, the message, who asked) or as JSON a
//! log pipeline reads (time, level, message, and each field at the top level:
//! `rollout`, `revision`, `reason`, `actor`).

use std::fmt;

use clap::ValueEnum;
use tracing::field::{Field, Visit};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::writer::MakeWriterExt;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::registry::LookupSpan;

use baton_local::machine::EVENT_TARGET;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// One line per event for a person: `12:00:01.250 web  promoted v2 [os:alice]`.
    Text,
    /// One JSON object per line: `timestamp`, `level`, `message`, `target` and the
    /// event's fields (`rollout`, `revision`, `reason`, `actor`).
    Json,
}

impl LogFormat {
    /// As `--log-format` takes it.
    pub fn as_str(self) -> &'static str {
        match self {
            LogFormat::Text => "text",
            LogFormat::Json => "json",
        }
    }
}

/// Installs the process' subscriber: `RUST_LOG` filters (default `info`); warnings
/// and errors go to stderr, the rest to stdout. A second call does nothing.
pub fn init(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let writer = std::io::stderr
        .with_max_level(Level::WARN)
        .or_else(std::io::stdout);
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer)
        .with_ansi(false);
    let _ = match format {
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .try_init(),
        LogFormat::Text => builder.event_format(Text).try_init(),
    };
}

/// The text format: a rollout's events as `baton up` has always printed them, anything
/// else as `HH:MM:SS.mmm LEVEL message field=value`.
struct Text;

#[derive(Default)]
struct Fields {
    message: String,
    rollout: Option<String>,
    actor: Option<String>,
    others: Vec<(String, String)>,
}

impl Visit for Fields {
    fn record_str(&mut self, field: &Field, value: &str) {
        match field.name() {
            "message" => self.message = value.to_string(),
            "rollout" => self.rollout = Some(value.to_string()),
            "actor" => self.actor = Some(value.to_string()),
            name => self.others.push((name.to_string(), value.to_string())),
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        match field.name() {
            "message" => self.message = format!("{value:?}"),
            name => self.others.push((name.to_string(), format!("{value:?}"))),
        }
    }
}

impl<S, N> FormatEvent<S, N> for Text
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        _: &FmtContext<'_, S, N>,
        mut w: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        use baton_driver::view::printable;
        let mut f = Fields::default();
        event.record(&mut f);
        let clock = baton_local::machine::clock(crate::now_ms());
        // Names and messages carry user text (names, versions, env values): escaped,
        // so they can neither forge a line nor send a terminal escape.
        let message = printable(&f.message);
        if event.metadata().target() == EVENT_TARGET {
            let rollout = f.rollout.unwrap_or_default();
            let who = match f.actor.as_deref() {
                None | Some("baton") => String::new(),
                Some(a) => format!(" [{}]", printable(a)),
            };
            return writeln!(w, "{clock} {:<12} {message}{who}", printable(&rollout));
        }
        write!(w, "{clock} {} {message}", event.metadata().level())?;
        let named = [("rollout", &f.rollout), ("actor", &f.actor)];
        for (k, v) in named
            .iter()
            .filter_map(|(k, v)| v.as_ref().map(|v| (*k, v)))
        {
            write!(w, " {k}={}", printable(v))?;
        }
        for (k, v) in &f.others {
            write!(w, " {k}={}", printable(v))?;
        }
        writeln!(w)
    }
}
