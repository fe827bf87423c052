//! What operators and deployments rely on: the CLI, credentials, dashboards, the container files,
//! metrics, readiness and logs, starting without the store or bus, reload and shutdown.

mod backends;
mod cli;
mod credentials;
mod dashboards;
mod deploy;
mod kubernetes;
mod logs;
mod metrics;
mod operations;
mod reload;
mod shutdown;
mod traces;
