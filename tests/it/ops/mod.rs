//! What operators and deployments rely on: the CLI, credentials, dashboards, the container files,
//! metrics, readiness and logs, reload and shutdown.

mod cli;
mod credentials;
mod dashboards;
mod deploy;
mod kubernetes;
mod metrics;
mod operations;
mod reload;
mod shutdown;
