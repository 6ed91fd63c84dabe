//! Logging through `tracing`, with the level changeable at run time (`/logging?level=`).

use std::sync::OnceLock;
use tracing_subscriber::filter::LevelFilter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::reload;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::Registry;

static HANDLE: OnceLock<reload::Handle<LevelFilter, Registry>> = OnceLock::new();
static CURRENT: std::sync::Mutex<String> = std::sync::Mutex::new(String::new());

/// Envoy's level names to tracing's (`critical` is `error`; `off` turns logging off).
pub fn level_filter(level: &str) -> Option<LevelFilter> {
    Some(match level {
        "trace" => LevelFilter::TRACE,
        "debug" => LevelFilter::DEBUG,
        "info" => LevelFilter::INFO,
        "warning" | "warn" => LevelFilter::WARN,
        "error" | "critical" => LevelFilter::ERROR,
        "off" => LevelFilter::OFF,
        _ => return None,
    })
}

/// Install the global subscriber, writing to stderr or to `path`.
pub fn init(level: &str, path: Option<&str>) -> std::io::Result<()> {
    let filter = level_filter(level).unwrap_or(LevelFilter::INFO);
    let (layer, handle) = reload::Layer::new(filter);
    let fmt = tracing_subscriber::fmt::layer()
        .with_target(false)
        .with_thread_names(true);
    match path {
        Some(p) => {
            let file = std::fs::OpenOptions::new().create(true).append(true).open(p)?;
            let fmt = fmt.with_ansi(false).with_writer(std::sync::Mutex::new(file));
            let _ = tracing_subscriber::registry().with(layer).with(fmt).try_init();
        }
        None => {
            let fmt = fmt.with_ansi(false).with_writer(std::io::stderr);
            let _ = tracing_subscriber::registry().with(layer).with(fmt).try_init();
        }
    }
    let _ = HANDLE.set(handle);
    set_current(level);
    Ok(())
}

fn set_current(level: &str) {
    let mut c = CURRENT.lock().unwrap_or_else(|e| e.into_inner());
    *c = level.to_string();
}

/// The current level's name.
pub fn current() -> String {
    CURRENT.lock().unwrap_or_else(|e| e.into_inner()).clone()
}

/// Change the level; `false` for an unknown level name.
pub fn set_level(level: &str) -> bool {
    let Some(f) = level_filter(level) else {
        return false;
    };
    if let Some(h) = HANDLE.get() {
        let _ = h.modify(|l| *l = f);
    }
    set_current(level);
    true
}
