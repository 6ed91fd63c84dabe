//! RTDS from a file (`rtds_config.path_config_source`): the file holds a `DiscoveryResponse` whose resources are
//! `envoy.service.runtime.v3.Runtime`s, loaded at start and again whenever the file (or its
//! `watched_directory`) changes, as [`crate::xds::file`] watches CDS and LDS files. There is no ACK or NACK: a
//! file that cannot be read counts `runtime.update_failure`, one that does not parse or holds a bad layer
//! `runtime.update_rejected`, and the last good layer stays.

use super::RUNTIME_TYPE;
use crate::config::descriptors;
use crate::config::load::{self, Format};
use crate::server::Shared;
use crate::xds::decode_resources;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Load the file now (the initial fetch ends whatever the outcome), then watch it in the background.
pub fn start(shared: &Arc<Shared>, path: PathBuf, dir: Option<PathBuf>, names: Vec<String>) {
    let mut last = crate::xds::file::fingerprint(&path, dir.as_deref());
    load(shared, &path);
    shared.runtime.rtds_initial_done(&names);
    let weak = Arc::downgrade(shared);
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(crate::xds::file::POLL);
        loop {
            tick.tick().await;
            let Some(shared) = weak.upgrade() else { break };
            let now = crate::xds::file::fingerprint(&path, dir.as_deref());
            if now != last {
                last = now;
                load(&shared, &path);
            }
        }
    });
}

fn load(shared: &Shared, path: &Path) {
    let rt = &shared.runtime;
    let what = path.display().to_string();
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) => {
            rt.rtds_stats.update_attempt.inc();
            rt.rtds_stats.update_failure.inc();
            tracing::warn!(path = %what, error = %e, "RTDS: cannot read the runtime file");
            return;
        }
    };
    let Some(desc) = descriptors::message("envoy.service.discovery.v3.DiscoveryResponse") else {
        return;
    };
    let parsed = load::message_from_text(&text, Format::detect(Some(&what), &text), &desc)
        .and_then(|m| decode_resources(&m, RUNTIME_TYPE));
    let result = match parsed {
        Ok(resources) => rt.apply_rtds(&resources, &[]),
        Err(e) => {
            rt.rtds_stats.update_attempt.inc();
            rt.rtds_stats.update_rejected.inc();
            Err(e)
        }
    };
    match result {
        Ok(()) => tracing::info!(path = %what, "RTDS: runtime file applied"),
        Err(e) => {
            tracing::warn!(path = %what, errors = %e.with_source(&what), "RTDS: runtime file rejected; keeping the last good layer")
        }
    }
}
