//! SDS from files: `tls_certificate_sds_secret_configs` and `validation_context_sds_secret_config` whose
//! `sds_config` is a `path_config_source` (or the deprecated `path`), the form sidecars use with a
//! certificate agent that writes the files.
//!
//! The file holds a `DiscoveryResponse` of `envoy.extensions.transport_sockets.tls.v3.Secret` resources; the
//! secret with the configured name is used. Lowering reads it once (a secret that cannot be read refuses the
//! config, with its path). Then one background thread polls every watched file's metadata (inode, size,
//! modification time, and the `watched_directory`'s) every [`POLL`]: on a change it reloads the file, and
//! every TLS context using a changed secret rebuilds its rustls configuration and swaps it in. New connections
//! get the new certificate; established ones keep theirs. A file that no longer parses, or a certificate that
//! does not load, is logged and counted; the last good secret stays.

use super::{Ca, Identity};
use crate::xds::file::{fingerprint, Fingerprint};
use arc_swap::ArcSwapOption;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::Duration;

/// How often watched files are looked at.
pub const POLL: Duration = Duration::from_millis(250);

/// Something built from secrets, rebuilt when one of them changes.
pub trait Dependent: Send + Sync {
    fn rebuild(&self);
}

/// A secret's value.
#[derive(Debug)]
pub enum Value {
    Identity(Arc<Identity>),
    Ca(Arc<Ca>),
}

/// One named secret from one file.
pub struct Secret {
    pub name: String,
    pub path: PathBuf,
    value: ArcSwapOption<Value>,
    dependents: Mutex<Vec<Weak<dyn Dependent>>>,
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Secret")
            .field("name", &self.name)
            .field("path", &self.path)
            .finish()
    }
}

impl Secret {
    pub fn identity(&self) -> Option<Arc<Identity>> {
        match self.value.load().as_deref() {
            Some(Value::Identity(i)) => Some(i.clone()),
            _ => None,
        }
    }

    pub fn ca(&self) -> Option<Arc<Ca>> {
        match self.value.load().as_deref() {
            Some(Value::Ca(c)) => Some(c.clone()),
            _ => None,
        }
    }

    pub fn subscribe(&self, d: Weak<dyn Dependent>) {
        let mut all = self.dependents.lock().unwrap_or_else(|e| e.into_inner());
        all.retain(|w| w.strong_count() > 0);
        all.push(d);
    }

    fn set(&self, v: Value) {
        self.value.store(Some(Arc::new(v)));
        let dependents: Vec<_> = {
            let all = self.dependents.lock().unwrap_or_else(|e| e.into_inner());
            all.iter().filter_map(|w| w.upgrade()).collect()
        };
        for d in dependents {
            d.rebuild();
        }
    }
}

/// How a file's secrets are read: (file text, file path, secret name) to the secret's value, or why not.
pub type Reader = fn(&str, &Path, &str) -> Result<Value, String>;

struct Watched {
    dir: Option<PathBuf>,
    seen: Fingerprint,
    secrets: Vec<Weak<Secret>>,
    read: Reader,
}

#[derive(Default)]
struct Registry {
    files: Mutex<HashMap<PathBuf, Watched>>,
}

fn registry() -> &'static Registry {
    static REGISTRY: OnceLock<Registry> = OnceLock::new();
    static WATCHER: OnceLock<()> = OnceLock::new();
    let r = REGISTRY.get_or_init(Registry::default);
    WATCHER.get_or_init(|| {
        let spawned = std::thread::Builder::new()
            .name("remora-sds".into())
            .spawn(|| loop {
                std::thread::sleep(POLL);
                poll(REGISTRY.get_or_init(Registry::default));
            });
        if let Err(e) = spawned {
            tracing::error!(error = %e, "cannot start the SDS file watcher; secrets will not rotate");
        }
    });
    r
}

/// The secret `name` from the file at `path`, read now and watched from now on. Secrets are shared: every
/// context naming the same file and secret gets the same one.
pub fn secret(path: &Path, dir: Option<&Path>, name: &str, read: Reader) -> Result<Arc<Secret>, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let reg = registry();
    let mut files = reg.files.lock().unwrap_or_else(|e| e.into_inner());
    let w = files.entry(path.to_path_buf()).or_insert_with(|| Watched {
        dir: dir.map(Path::to_path_buf),
        seen: fingerprint(path, dir),
        secrets: Vec::new(),
        read,
    });
    w.secrets.retain(|s| s.strong_count() > 0);
    if let Some(s) = w
        .secrets
        .iter()
        .filter_map(|s| s.upgrade())
        .find(|s| s.name == name)
    {
        return Ok(s);
    }
    let value = read(&text, path, name)?;
    let secret = Arc::new(Secret {
        name: name.to_string(),
        path: path.to_path_buf(),
        value: ArcSwapOption::from_pointee(value),
        dependents: Mutex::new(Vec::new()),
    });
    w.secrets.push(Arc::downgrade(&secret));
    Ok(secret)
}

/// One look at every watched file; changed ones are reloaded.
fn poll(reg: &Registry) {
    let changed: Vec<(PathBuf, Vec<Arc<Secret>>, Reader)> = {
        let mut files = reg.files.lock().unwrap_or_else(|e| e.into_inner());
        files.retain(|_, w| {
            w.secrets.retain(|s| s.strong_count() > 0);
            !w.secrets.is_empty()
        });
        files
            .iter_mut()
            .filter_map(|(path, w)| {
                let now = fingerprint(path, w.dir.as_deref());
                if now == w.seen {
                    return None;
                }
                w.seen = now;
                Some((
                    path.clone(),
                    w.secrets.iter().filter_map(|s| s.upgrade()).collect(),
                    w.read,
                ))
            })
            .collect()
    };
    for (path, secrets, read) in changed {
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "cannot read SDS file; keeping the last good secrets");
                continue;
            }
        };
        for s in secrets {
            match read(&text, &path, &s.name) {
                Ok(v) => {
                    tracing::info!(path = %path.display(), secret = %s.name, "SDS secret updated");
                    s.set(v);
                }
                Err(e) => tracing::warn!(
                    path = %path.display(), secret = %s.name, error = %e,
                    "SDS secret rejected; keeping the last good one"
                ),
            }
        }
    }
}
