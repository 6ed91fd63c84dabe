//! Filesystem subscriptions: `path_config_source` (and the deprecated `path`) for CDS and LDS, and for EDS
//! clusters' `eds_config` and connection managers' `rds.config_source` (one watcher per file and type, shared
//! by every cluster or connection manager that names it; it also reloads when one that names it appears, so
//! that a newcomer gets its resource from the file as it is).
//!
//! The file holds a `DiscoveryResponse` (YAML or JSON, `resources:` a list of `@type`d resources). A background
//! task polls the file's metadata (inode, size, modification time) and, with `watched_directory`, the
//! directory's, every [`POLL`]; any change reloads it. An atomic rename (`mv new.yaml cds.yaml`) gives the file
//! a new inode and so is seen like an edit. As the protocol says, there is no ACK or NACK: a file that cannot
//! be read counts `update_failure`, one that does not parse or lower counts `update_rejected`, and the last
//! good configuration stays.

use super::manager::Removal;
use super::{decode_resources, Source, CLUSTER_TYPE, ENDPOINT_TYPE, LISTENER_TYPE, ROUTE_TYPE};
use crate::config::descriptors;
use crate::config::load::{self, Format};
use crate::server::Shared;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

/// How often the file's metadata is looked at.
pub const POLL: Duration = Duration::from_millis(500);

/// Which resource type a file holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Cds,
    Lds,
    Eds,
    Rds,
}

impl Kind {
    pub fn type_url(self) -> &'static str {
        match self {
            Kind::Cds => CLUSTER_TYPE,
            Kind::Lds => LISTENER_TYPE,
            Kind::Eds => ENDPOINT_TYPE,
            Kind::Rds => ROUTE_TYPE,
        }
    }
}

/// A file's (inode, size, mtime) and its watched directory's (inode, mtime): what a change alters.
pub(crate) type Fingerprint = (Option<(u64, u64, i64, i64)>, Option<(u64, i64, i64)>);

pub(crate) fn fingerprint(path: &Path, dir: Option<&Path>) -> Fingerprint {
    let f = std::fs::metadata(path)
        .ok()
        .map(|m| (m.ino(), m.size(), m.mtime(), m.mtime_nsec()));
    let d = dir
        .and_then(|d| std::fs::metadata(d).ok())
        .map(|m| (m.ino(), m.mtime(), m.mtime_nsec()));
    (f, d)
}

/// Load the file now (the initial fetch), then watch it in the background.
pub async fn start(shared: &Arc<Shared>, kind: Kind, source: &Source) {
    let Source::Path {
        path,
        watched_directory,
    } = source
    else {
        return;
    };
    let path = path.clone();
    let dir = watched_directory.clone();
    let mut last = fingerprint(&path, dir.as_deref());
    let named = matches!(kind, Kind::Eds | Kind::Rds);
    let interest = |shared: &Shared| {
        if named {
            super::ads::interest(shared, kind.type_url(), source)
        } else {
            Vec::new()
        }
    };
    let mut names = interest(shared);
    load(shared, kind, &path);
    if !named {
        shared.dynamic.initial_done(kind == Kind::Cds);
    }
    let shared = shared.clone();
    let source = source.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(POLL);
        let mut changes = shared.dynamic.subscribe_changes();
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                changed = changes.changed(), if named => {
                    if changed.is_err() {
                        return;
                    }
                }
            }
            let now = fingerprint(&path, dir.as_deref());
            let now_names = if named {
                super::ads::interest(&shared, kind.type_url(), &source)
            } else {
                Vec::new()
            };
            // A cluster or connection manager that newly names this file gets its resource from it.
            let newcomer = now_names.iter().any(|n| !names.contains(n));
            names = now_names;
            if now != last || newcomer {
                last = now;
                load(&shared, kind, &path);
            }
        }
    });
}

/// Read, parse and apply the file once.
pub fn load(shared: &Shared, kind: Kind, path: &PathBuf) {
    let d = &shared.dynamic;
    // EDS and RDS count in the stats of the resources they carry, once applied.
    let stats = match kind {
        Kind::Cds => Some(&d.cds),
        Kind::Lds => Some(&d.lds),
        Kind::Eds | Kind::Rds => None,
    };
    let what = path.display().to_string();
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) => {
            if let Some(stats) = stats {
                stats.update_attempt.inc();
                stats.update_failure.inc();
            }
            tracing::warn!(path = %what, error = %e, "cannot read config file");
            return;
        }
    };
    let Some(desc) = descriptors::message("envoy.service.discovery.v3.DiscoveryResponse") else {
        return;
    };
    let type_url = kind.type_url();
    let parsed = load::message_from_text(&text, Format::detect(Some(&what), &text), &desc)
        .and_then(|m| decode_resources(&m, type_url).map(|r| (m, r)));
    let (msg, resources) = match parsed {
        Ok(x) => x,
        Err(e) => {
            if let Some(stats) = stats {
                stats.update_attempt.inc();
                stats.update_rejected.inc();
            }
            tracing::warn!(path = %what, errors = %e.with_source(&what), "config file rejected");
            return;
        }
    };
    let version = msg
        .get_field_by_name("version_info")
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_default();
    let resources: Vec<_> = resources
        .into_iter()
        .map(|mut r| {
            r.version = version.clone();
            r
        })
        .collect();
    let result = match kind {
        Kind::Cds => d.apply_clusters(shared, &resources, &Removal::Omitted, &version),
        Kind::Lds => d.apply_listeners(shared, &resources, &Removal::Omitted, &version),
        Kind::Eds => d.apply_endpoints(shared, &resources, &[], &version),
        Kind::Rds => d.apply_routes(shared, &resources, &version),
    };
    match result {
        Ok(()) => tracing::info!(path = %what, version = %version, "config file applied"),
        Err(e) => {
            tracing::warn!(path = %what, errors = %e, "config file rejected; keeping the last good config")
        }
    }
}
