//! Running corral: the public proxy listener and the admin listener over one engine.
//!
//! Both take already-bound listeners and a shutdown future, so tests bind port 0 and production
//! passes ctrl-c.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::bus::memory::MemoryBusHub;
use crate::config::{BusSettings, Config, StoreSettings};
use crate::connections::Listener;
use crate::engine::{Backend, BusConfig, Engine, EngineConfig, StoreConfig};
use crate::lifecycle::Phase;
use crate::proxy::Proxy;
use crate::reload::Reloader;
use crate::store::memory::MemoryStore;

/// How long running builds get to abandon their leases at shutdown (a store call each).
const CLOSE_BOUND: Duration = Duration::from_secs(5);

/// How long connections still open after the engine closed get to deliver their last answers.
const LAST_WORDS: Duration = Duration::from_secs(1);

/// Why the server could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error(transparent)]
    Connect(#[from] crate::engine::ConnectError),
    #[error("listener failed: {0}")]
    Io(#[from] std::io::Error),
}

/// Serves `config` until `shutdown` completes, with the store and bus the config names.
pub async fn run(
    listener: TcpListener,
    admin: TcpListener,
    config: Config,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    let backend = backend_for(&config);
    run_on(listener, admin, config, backend, shutdown).await
}

/// Like [`run`], on a given backend (several in-process replicas sharing one memory store).
pub async fn run_on(
    listener: TcpListener,
    admin: TcpListener,
    config: Config,
    backend: Backend,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    Server::connect(config, &backend)
        .await?
        .serve(listener, admin, shutdown)
        .await
}

/// A proxy connected to its store and bus, not yet serving: the step between the two is where a
/// [`Reloader`] is taken.
pub struct Server {
    engine: Engine,
    proxy: Arc<Proxy>,
}

impl Server {
    /// Connects the engine for `config` on `backend`; a store or bus that cannot be reached is an
    /// error (`corral serve --require-backends`).
    pub async fn connect(config: Config, backend: &Backend) -> Result<Server, ServeError> {
        let engine = Engine::connect(engine_config(&config), backend).await?;
        Self::on(config, engine).await
    }

    /// Starts the engine for `config` on `backend` even when its store or bus cannot be reached
    /// now: it serves by each route's `on_store_error` meanwhile, reports the outage on `/readyz`,
    /// and connects them in the background (see [`Engine::start`]).
    pub async fn start(config: Config, backend: &Backend) -> Result<Server, ServeError> {
        let engine = Engine::start(engine_config(&config), backend).await?;
        Self::on(config, engine).await
    }

    async fn on(config: Config, engine: Engine) -> Result<Server, ServeError> {
        let proxy = Arc::new(Proxy::new(Arc::new(config), engine.clone()));
        // Before the first request: a route purged as a whole is keyed by its current generation.
        engine
            .track_generations(
                proxy
                    .config()
                    .routes
                    .iter()
                    .map(|route| route.name.as_str()),
            )
            .await;
        Ok(Server { engine, proxy })
    }

    /// Reloads this server's config from the file it was loaded from; `None` for a config that
    /// came from no file.
    pub fn reloader(&self) -> Option<Reloader> {
        let path = self.proxy.config().source.clone()?;
        Some(Reloader::new(self.proxy.clone(), path))
    }

    /// Serves both listeners until `shutdown` completes, then drains, every step bounded:
    ///
    /// 1. `/readyz` answers 503 and the public listener stops accepting (its socket closes, so new
    ///    connections are refused); idle connections close at once, busy ones after their
    ///    answer.
    /// 2. Requests in flight get `limits.shutdown_grace` to finish.
    /// 3. The engine closes: every lease still held is abandoned (other replicas' followers
    ///    re-elect at once rather than after `lease_ttl`) and requests still waiting get 503.
    /// 4. Connections still open get `LAST_WORDS` (1 s) to deliver those answers, then are closed;
    ///    the admin listener closes last.
    pub async fn serve(
        self,
        listener: TcpListener,
        admin: TcpListener,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), ServeError> {
        let Server { engine, proxy } = self;
        let addresses = (listener.local_addr(), admin.local_addr());
        let limits = proxy.config().limits.clone();
        let (stop, stopped) = watch::channel(false);
        // Weak: a server that stopped on its own must not be kept alive by a shutdown never sent.
        let serving = Arc::downgrade(&proxy);
        let grace = limits.shutdown_grace;
        tokio::spawn(async move {
            shutdown.await;
            if let Some(proxy) = serving.upgrade() {
                proxy.lifecycle.enter(Phase::Stopping);
            }
            tracing::info!(
                phase = "draining",
                grace = ?grace,
                "draining: /readyz answers 503, new connections are refused, requests in flight \
                 have {grace:?} to finish"
            );
            stop.send_replace(true);
        });
        let metrics = engine.metrics().clone();
        let public = Listener::new(
            listener,
            crate::proxy::app(proxy.clone()),
            limits.clone(),
            metrics.clone(),
        );
        // The config is loaded and both listeners are bound: from here `/readyz` asks the store and bus.
        proxy.lifecycle.enter(Phase::Serving);
        announce_ready(&proxy, addresses);
        // The admin listener outlives the drain, so `/readyz` says "shutting down" meanwhile.
        let (admin_stop, admin_stopped) = watch::channel(false);
        let admin = tokio::spawn(
            Listener::new(
                admin,
                crate::admin::app(proxy.clone()),
                limits.clone(),
                metrics,
            )
            .serve(admin_stopped),
        );
        let mut open = public.serve(stopped).await;
        if !open.closed_within(limits.shutdown_grace).await {
            tracing::warn!(
                connections = open.len(),
                grace = ?limits.shutdown_grace,
                "requests still in flight at the end of the shutdown grace; abandoning their leases"
            );
        }
        engine.close(CLOSE_BOUND).await;
        if !open.closed_within(LAST_WORDS).await {
            open.close().await;
        }
        admin_stop.send_replace(true);
        if let Ok(mut admin) = admin.await
            && !admin.closed_within(LAST_WORDS).await
        {
            admin.close().await;
        }
        tracing::info!(phase = "stopped", "stopped");
        Ok(())
    }
}

/// The "ready" lifecycle line: where it listens, what it serves (the config's digest, as
/// `corral check` prints it) and on which store and bus.
fn announce_ready(proxy: &Proxy, (public, admin): (Address, Address)) {
    let config = proxy.config();
    let address = |addr: Address| addr.map_or_else(|_| "?".to_owned(), |addr| addr.to_string());
    tracing::info!(
        phase = "ready",
        version = env!("CARGO_PKG_VERSION"),
        public = %address(public),
        admin = %address(admin),
        config_digest = %crate::config::digest(&config),
        routes = config.routes.len(),
        store = proxy.engine.store().kind(),
        "ready: serving the config"
    );
}

/// A listener's bound address, as `local_addr` answers it.
type Address = std::io::Result<std::net::SocketAddr>;

fn engine_config(config: &Config) -> EngineConfig {
    let mut engine_config = EngineConfig::new(config.namespace.clone());
    engine_config.l1_max_bytes = config.l1_max_bytes;
    engine_config
}

/// The longest a shutdown takes with `limits`: the grace for requests in flight, the bound on
/// abandoning leases, and the last words of the public and then the admin connections. A
/// supervisor's stop timeout (compose's `stop_grace_period`, Kubernetes'
/// `terminationGracePeriodSeconds`) must be at least this, or it kills the process mid-drain and
/// its leases are left to expire instead of being handed over.
pub fn drain_bound(limits: &crate::config::Limits) -> Duration {
    limits.shutdown_grace + CLOSE_BOUND + LAST_WORDS + LAST_WORDS
}

/// The backend a config names (a memory store is this process's own).
pub fn backend_for(config: &Config) -> Backend {
    let store = match &config.store {
        StoreSettings::Memory => StoreConfig::Memory(MemoryStore::new()),
        StoreSettings::Redis { url } => StoreConfig::Redis { url: url.clone() },
        StoreSettings::Nats { url } => StoreConfig::Nats { url: url.clone() },
    };
    let bus = match (&config.store, &config.bus) {
        // The NATS KV store carries its own events; validation refused any other bus for it.
        (StoreSettings::Nats { .. }, _) => BusConfig::Store,
        (_, BusSettings::Memory) => BusConfig::Memory(MemoryBusHub::new()),
        (_, BusSettings::Redis { url }) => BusConfig::Redis { url: url.clone() },
        (_, BusSettings::Nats { url }) => BusConfig::Nats { url: url.clone() },
    };
    let mut backend = Backend::new(store, bus);
    backend.connect_timeout = config.store_limits.connect_timeout;
    backend.response_timeout = config.store_limits.timeout;
    backend.breaker = config.store_limits.breaker;
    backend.store_credentials = config.store_credentials.clone();
    backend.bus_credentials = match &config.store {
        // The store's own events ride the store's connection.
        StoreSettings::Nats { .. } => config.store_credentials.clone(),
        _ => config.bus_credentials.clone(),
    };
    backend
}
