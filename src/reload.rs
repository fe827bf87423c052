//! Hot reload: re-read the config file on SIGHUP (and, when asked, whenever the file changes) and
//! switch every new request to it at once.
//!
//! A reload is all or nothing. The new file is read and checked as at start; if anything is wrong,
//! every problem is logged at its `file:line:column` and the running config stays. Otherwise new
//! requests take the new routes and policies, while requests in flight finish under the config
//! they started with (see [`crate::proxy::Proxy::replace`]); no connection is dropped.
//!
//! Some settings are fixed for the life of the process: the listeners are bound, the store and bus
//! are connected (with the `limits` they took), and the namespace and L1 size shape what was
//! built on them. When a reload changes
//! one of those, the log names it as needing a restart and the running value is kept; the rest of
//! the file still applies.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::task::JoinHandle;

use crate::config::{self, Config, ConfigError};
use crate::proxy::Proxy;

/// How often `--watch` looks at the config file's modification time and size.
pub const WATCH_INTERVAL: Duration = Duration::from_secs(1);

/// Reloads one proxy's config from its file.
#[derive(Clone)]
pub struct Reloader {
    proxy: Arc<Proxy>,
    path: PathBuf,
}

/// What a reload that went through did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reloaded {
    /// Settings the file changed that keep their running value until a restart, by their name in
    /// the file.
    pub needs_restart: Vec<&'static str>,
}

impl Reloader {
    pub fn new(proxy: Arc<Proxy>, path: PathBuf) -> Self {
        Self { proxy, path }
    }

    /// The file this reloads from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Reads and checks the file, and switches new requests to it; on any problem, logs every
    /// one and keeps the running config. Counted in `corral_config_reloads_total{result}`.
    pub async fn reload(&self) -> Result<Reloaded, ConfigError> {
        let metrics = self.proxy.engine.metrics();
        let mut new = match config::load(&self.path) {
            Ok(new) => new,
            Err(error) => {
                tracing::error!(
                    reload = "refused",
                    file = %self.path.display(),
                    reason = %error,
                    running_digest = %config::digest(&self.proxy.config()),
                    "config reload refused, the running config stays:\n{error}"
                );
                // Counted after the log line, so whoever sees the count finds the line.
                metrics.reload_refused();
                return Err(error);
            }
        };
        let needs_restart = keep_fixed(&self.proxy.config(), &mut new);
        let routes = new.routes.len();
        // A route the new file adds may have been purged as a whole under an earlier config: its
        // keys take the store's generation before its first request.
        self.proxy
            .engine
            .track_generations(new.routes.iter().map(|route| route.name.as_str()))
            .await;
        let digest = config::digest(&new);
        self.proxy.replace(new);
        if needs_restart.is_empty() {
            tracing::info!(
                reload = "applied",
                file = %self.path.display(),
                routes,
                config_digest = %digest,
                "config reloaded"
            );
        } else {
            let settings = needs_restart.join(", ");
            tracing::warn!(
                reload = "applied",
                file = %self.path.display(),
                routes,
                config_digest = %digest,
                needs_restart = %settings,
                "config reloaded, but these changed settings need a restart to take effect: {settings}"
            );
        }
        metrics.reload_applied();
        Ok(Reloaded { needs_restart })
    }
}

/// Puts the running value back into `new` for every setting that cannot change without a
/// restart, and names those that `new` tried to change.
fn keep_fixed(running: &Config, new: &mut Config) -> Vec<&'static str> {
    let mut changed = Vec::new();
    if new.listen != running.listen {
        changed.push("listen");
        new.listen = running.listen;
    }
    if new.admin.listen != running.admin.listen {
        changed.push("admin.listen");
        new.admin.listen = running.admin.listen;
    }
    if new.namespace != running.namespace {
        changed.push("namespace");
        new.namespace = running.namespace.clone();
    }
    if new.store != running.store {
        changed.push("store");
        new.store = running.store.clone();
    }
    if new.bus != running.bus {
        changed.push("bus");
        new.bus = running.bus.clone();
    }
    // Credentials belong to the connections made at start: a rotated password is used from the
    // next restart.
    if new.store_credentials != running.store_credentials {
        changed.push("store credentials");
        new.store_credentials = running.store_credentials.clone();
    }
    if new.bus_credentials != running.bus_credentials {
        changed.push("bus credentials");
        new.bus_credentials = running.bus_credentials.clone();
    }
    if new.l1_max_bytes != running.l1_max_bytes {
        changed.push("l1.max_bytes");
        new.l1_max_bytes = running.l1_max_bytes;
    }
    // The listeners took their limits when they started.
    if new.limits != running.limits {
        changed.push("limits");
        new.limits = running.limits.clone();
    }
    changed
}

/// Reloads on every SIGHUP, for as long as the process runs. The handler is installed before
/// this returns, so a SIGHUP from then on reloads rather than ending the process.
pub fn on_sighup(reloader: Reloader) -> std::io::Result<JoinHandle<()>> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut hangups = signal(SignalKind::hangup())?;
    Ok(tokio::spawn(async move {
        while hangups.recv().await.is_some() {
            tracing::info!(file = %reloader.path().display(), "SIGHUP: reloading the config");
            let _ = reloader.reload().await;
        }
    }))
}

/// Reloads whenever the file's modification time or size changes, looking every `interval`. A
/// file that cannot be read is left alone until it changes again (the failed reload is logged).
pub fn watch(reloader: Reloader, interval: Duration) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut seen = stamp(reloader.path());
        let mut ticks = tokio::time::interval(interval);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticks.tick().await;
            let now = stamp(reloader.path());
            if now != seen {
                seen = now;
                tracing::info!(file = %reloader.path().display(), "the config file changed: reloading");
                let _ = reloader.reload().await;
            }
        }
    })
}

/// What `watch` compares: modification time and length, or `None` when the file is unreadable.
fn stamp(path: &Path) -> Option<(SystemTime, u64)> {
    let meta = std::fs::metadata(path).ok()?;
    Some((meta.modified().ok()?, meta.len()))
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &str = "listen: 127.0.0.1:8080
admin: { listen: 127.0.0.1:8081 }
namespace: a
store: { kind: redis, url: redis://127.0.0.1:6379 }
l1: { max_bytes: 1MiB }
routes:
  - { name: r, match: { path_prefix: / }, upstream: http://127.0.0.1:1 }
";

    fn parsed(text: &str) -> Config {
        config::parse(text, "corral.yaml").expect("a valid config")
    }

    #[test]
    fn fixed_settings_keep_their_running_value_and_are_named() {
        let running = parsed(BASE);
        let changed = BASE
            .replace("127.0.0.1:8081", "127.0.0.1:8082")
            .replace("127.0.0.1:8080", "127.0.0.1:8081")
            .replace("namespace: a", "namespace: b")
            .replace("6379", "6380")
            .replace("1MiB", "2MiB")
            .replace(
                "upstream: http://127.0.0.1:1",
                "upstream: http://127.0.0.1:2",
            );
        let mut new = parsed(&changed);
        let named = keep_fixed(&running, &mut new);
        assert_eq!(
            named,
            [
                "listen",
                "admin.listen",
                "namespace",
                "store",
                "bus",
                "l1.max_bytes"
            ]
        );
        assert_eq!(new.listen, running.listen);
        assert_eq!(new.admin.listen, running.admin.listen);
        assert_eq!(new.namespace, running.namespace);
        assert_eq!(new.store, running.store);
        assert_eq!(new.bus, running.bus);
        assert_eq!(new.l1_max_bytes, running.l1_max_bytes);
        assert_eq!(
            new.routes[0].upstream.port_u16(),
            Some(2),
            "the rest applies"
        );
    }

    #[test]
    fn an_unchanged_file_needs_no_restart() {
        let running = parsed(BASE);
        let mut new = parsed(BASE);
        assert!(keep_fixed(&running, &mut new).is_empty());
    }
}
