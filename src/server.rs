//! Running corral: the public proxy listener and the admin listener over one engine.
//!
//! Both take already-bound listeners and a shutdown future, so tests bind port 0 and production
//! passes ctrl-c.

use std::future::Future;

use tokio::net::TcpListener;

use crate::config::Config;
use crate::engine::Backend;

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
    let _ = (listener, admin, config, backend, shutdown);
    todo!()
}

/// The backend a config names.
pub fn backend_for(config: &Config) -> Backend {
    todo!("{config:?}")
}
