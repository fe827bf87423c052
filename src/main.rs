//! The `corral` command: a thin front end over the library.

#![forbid(unsafe_code)]

// The global allocator (the binary's alone, never the library's).
mod allocator;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use http::{HeaderMap, HeaderName, HeaderValue, Method, Uri};
use tokio::net::TcpListener;

use corral::config::{self, Config};

/// Exit code for a configuration that was refused (nothing was started).
const EXIT_CONFIG: u8 = 2;
/// Exit code for a command line that names nothing to do (`corral purge` without a form or token).
const EXIT_USAGE: u8 = 2;

#[derive(Parser)]
#[command(
    version,
    about = "A reverse proxy that coalesces identical requests across replicas"
)]
struct Cli {
    /// Log lines as text for people or JSON for log pipelines; RUST_LOG sets the levels.
    #[arg(
        long,
        global = true,
        env = "CORRAL_LOG_FORMAT",
        value_enum,
        default_value = "text"
    )]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Run the proxy and its admin listener. SIGHUP reloads the config.
    Serve {
        #[arg(long, env = "CORRAL_CONFIG")]
        config: PathBuf,
        /// Also reload whenever the config file changes (checked every second).
        #[arg(long, env = "CORRAL_WATCH")]
        watch: bool,
        /// Exit 1 when the store or the bus cannot be reached at start, instead of serving by
        /// each route's on_store_error and connecting them in the background.
        #[arg(long, env = "CORRAL_REQUIRE_BACKENDS")]
        require_backends: bool,
    },
    /// Validate a config and print the effective routes.
    Check {
        #[arg(long, env = "CORRAL_CONFIG")]
        config: PathBuf,
    },
    /// Show which route a request takes, its key, and whether it would be cached, and why.
    Explain {
        #[arg(long, env = "CORRAL_CONFIG")]
        config: PathBuf,
        /// The request method.
        #[arg(short = 'X', long = "request", default_value = "GET")]
        method: String,
        /// A request header, `Name: value`; repeatable.
        #[arg(short = 'H', long = "header")]
        headers: Vec<String>,
        /// The request URL (a path with query, or an absolute URL).
        url: String,
    },
    /// Purge cached answers through a running proxy's admin API, by URL, path prefix, route or tag.
    Purge {
        /// The admin listener's URL.
        #[arg(long, env = "CORRAL_ADMIN", default_value_t = config::default_admin_url())]
        admin: String,
        /// The environment variable that holds the admin token.
        #[arg(long, default_value = "CORRAL_ADMIN_TOKEN")]
        token_env: String,
        /// One request's key: a path with query, e.g. /reports?x=1.
        #[arg(long, conflicts_with_all = ["route", "tag"])]
        url: Option<String>,
        /// With --url: the request method (default GET).
        #[arg(short = 'X', long = "request", requires = "url")]
        method: Option<String>,
        /// A whole route by name, or with --prefix only its paths under the prefix.
        #[arg(long, conflicts_with = "tag")]
        route: Option<String>,
        /// With --route: a path prefix, e.g. /reports/2024/.
        #[arg(long, requires = "route")]
        prefix: Option<String>,
        /// Every key whose response carried this Surrogate-Key or Cache-Tag.
        #[arg(long)]
        tag: Option<String>,
    },
    /// Run a slow upstream, three replicas and a burst of identical requests, and show what happened.
    Demo {
        /// Requests in the burst.
        #[arg(long, default_value_t = 300)]
        requests: usize,
        /// How long the upstream takes to answer.
        #[arg(long, default_value = "500ms", value_parser = humantime::parse_duration)]
        delay: Duration,
        #[arg(long, default_value_t = 3)]
        replicas: usize,
        /// Use a real Redis store (e.g. redis://127.0.0.1:6379/).
        #[arg(long)]
        redis: Option<String>,
        /// With --redis: carry events on NATS (e.g. nats://127.0.0.1:4222).
        #[arg(long, requires = "redis")]
        nats: Option<String>,
        /// Keep running after the burst and print URLs to try.
        #[arg(long)]
        serve: bool,
        /// Also print the replicas' logs (an access line per request); RUST_LOG sets their levels.
        #[arg(long, short = 'v')]
        verbose: bool,
    },
    /// Exit 0 when the admin listener's /healthz answers 200, else 1 (for container health checks).
    Healthcheck {
        /// The URL to check.
        #[arg(
            long,
            env = "CORRAL_HEALTHCHECK_URL",
            default_value_t = format!("{}/healthz", config::default_admin_url())
        )]
        url: String,
        /// How long the check may take, connecting included.
        #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
        timeout: Duration,
    },
    /// Run the demo's slow upstream on its own: JSON answers carrying a fetch counter.
    DemoUpstream {
        /// Where to listen, ip:port (port 0 picks one; the address is printed).
        #[arg(long, default_value = "127.0.0.1:9000")]
        listen: std::net::SocketAddr,
        /// How long each answer takes.
        #[arg(long, default_value = "500ms", value_parser = humantime::parse_duration)]
        delay: Duration,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logs(cli.log_format, &cli.command);
    let report = Report(cli.log_format);
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(error) => {
            report.fatal(format_args!("corral: cannot start the runtime: {error}"));
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(run(cli.command, report))
}

/// Logs to stderr, as text or JSON lines. Text is coloured only for a terminal, and never when
/// `NO_COLOR` is set (<https://no-color.org>). JSON lines carry `timestamp`, `level`, `target`,
/// `message` and the event's own fields at the top level, so a log pipeline reads every field
/// without unnesting; an event inside a span carries that span's fields under `span`.
///
/// RUST_LOG sets the levels (default `corral=info`), except for `corral demo` without
/// `--verbose`, which prints its own report and only warnings besides.
fn init_logs(format: LogFormat, command: &Command) {
    use tracing_subscriber::EnvFilter;
    let quiet_demo = matches!(command, Command::Demo { verbose: false, .. });
    let filter = match EnvFilter::try_from_default_env() {
        Ok(filter) if !quiet_demo => filter,
        _ if quiet_demo => EnvFilter::new("corral=warn"),
        // The trace exporter's own warnings (a span queue that overflowed, a collector that
        // refused a batch) are corral's to report too.
        _ => EnvFilter::new("corral=info,opentelemetry_sdk=warn,opentelemetry_otlp=warn"),
    };
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => {
            let terminal = std::io::IsTerminal::is_terminal(&std::io::stderr());
            let no_color = std::env::var_os("NO_COLOR").is_some_and(|value| !value.is_empty());
            logs.with_ansi(terminal && !no_color).init();
        }
        LogFormat::Json => logs
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_span_list(false)
            .init(),
    }
}

/// Where a command's fatal errors go: a plain line for people, or an `ERROR` line shaped like
/// every other JSON log line for a log pipeline. Written directly rather than through the log
/// filter, so that no `RUST_LOG` can hide why the process stopped.
#[derive(Clone, Copy)]
struct Report(LogFormat);

impl Report {
    fn fatal(self, message: std::fmt::Arguments<'_>) {
        match self.0 {
            LogFormat::Text => eprintln!("{message}"),
            LogFormat::Json => error_line(&message.to_string(), serde_json::Map::new()),
        }
    }

    /// Every problem of a refused config, each at its `file:line:column`.
    fn refused(self, errors: &config::ConfigError) {
        match self.0 {
            LogFormat::Text => eprintln!("{errors}"),
            LogFormat::Json => {
                for problem in &errors.problems {
                    let mut place = serde_json::Map::new();
                    place.insert("file".into(), problem.file.clone().into());
                    place.insert("line".into(), problem.line.into());
                    place.insert("column".into(), problem.column.into());
                    error_line(&problem.to_string(), place);
                }
            }
        }
        self.fatal(format_args!(
            "corral: the configuration was refused; nothing was started"
        ));
    }
}

/// One JSON `ERROR` line on stderr, with the fields the JSON log lines carry.
fn error_line(message: &str, mut fields: serde_json::Map<String, serde_json::Value>) {
    let now = humantime::format_rfc3339_micros(std::time::SystemTime::now());
    fields.insert("timestamp".into(), now.to_string().into());
    fields.insert("level".into(), "ERROR".into());
    fields.insert("target".into(), "corral".into());
    fields.insert("message".into(), message.into());
    eprintln!("{}", serde_json::Value::Object(fields));
}

async fn run(command: Command, report: Report) -> ExitCode {
    match command {
        Command::Serve {
            config,
            watch,
            require_backends,
        } => {
            tracing::info!(
                phase = "starting",
                version = env!("CARGO_PKG_VERSION"),
                config = %config.display(),
                "starting corral {}",
                env!("CARGO_PKG_VERSION")
            );
            let Some(config) = load(&config, report) else {
                return ExitCode::from(EXIT_CONFIG);
            };
            let backends = if require_backends {
                Backends::Required
            } else {
                Backends::InBackground
            };
            serve(config, watch, backends, report).await
        }
        Command::Check { config: path } => {
            let Some(config) = load(&path, report) else {
                return ExitCode::from(EXIT_CONFIG);
            };
            println!(
                "{}: ok (digest {})",
                path.display(),
                config::digest(&config)
            );
            print!("{}", config::describe(&config));
            ExitCode::SUCCESS
        }
        Command::Explain {
            config,
            method,
            headers,
            url,
        } => {
            let Some(config) = load(&config, report) else {
                return ExitCode::from(EXIT_CONFIG);
            };
            match request(&method, &headers, &url) {
                Ok((method, uri, headers)) => {
                    print!(
                        "{}",
                        corral::explain::explain(&config, &method, &uri, &headers)
                    );
                    ExitCode::SUCCESS
                }
                Err(message) => {
                    report.fatal(format_args!("corral explain: {message}"));
                    ExitCode::from(EXIT_CONFIG)
                }
            }
        }
        Command::Purge {
            admin,
            token_env,
            url,
            method,
            route,
            prefix,
            tag,
        } => match purge(&admin, &token_env, url, method, route, prefix, tag).await {
            Ok(answer) => {
                println!("{answer}");
                ExitCode::SUCCESS
            }
            Err((code, message)) => {
                report.fatal(format_args!("corral purge: {message}"));
                code
            }
        },
        Command::Demo {
            requests,
            delay,
            replicas,
            redis,
            nats,
            serve,
            verbose: _,
        } => {
            let options = corral::demo::DemoOptions {
                requests,
                delay,
                replicas,
                redis,
                nats,
                serve,
            };
            match corral::demo::run(options).await {
                Ok(_) => ExitCode::SUCCESS,
                Err(error) => {
                    report.fatal(format_args!("corral demo: {error:#}"));
                    ExitCode::FAILURE
                }
            }
        }
        Command::Healthcheck { url, timeout } => {
            match corral::admin::healthcheck(&url, timeout).await {
                Ok(()) => ExitCode::SUCCESS,
                Err(error) => {
                    report.fatal(format_args!("corral healthcheck: {error}"));
                    ExitCode::FAILURE
                }
            }
        }
        Command::DemoUpstream { listen, delay } => demo_upstream(listen, delay, report).await,
    }
}

async fn demo_upstream(listen: std::net::SocketAddr, delay: Duration, report: Report) -> ExitCode {
    let listener = match TcpListener::bind(listen).await {
        Ok(listener) => listener,
        Err(error) => {
            report.fatal(format_args!(
                "corral demo-upstream: cannot listen on {listen}: {error}"
            ));
            return ExitCode::FAILURE;
        }
    };
    let bound = listener
        .local_addr()
        .map_or_else(|_| listen.to_string(), |a| a.to_string());
    println!(
        "corral demo-upstream: listening on {bound}, answering after {}",
        humantime::format_duration(delay)
    );
    match corral::demo::serve_upstream(listener, delay, shutdown_signal()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            report.fatal(format_args!("corral demo-upstream: {error}"));
            ExitCode::FAILURE
        }
    }
}

/// `corral purge`: one purge through the admin API; its answer, or the exit code and why not.
async fn purge(
    admin: &str,
    token_env: &str,
    url: Option<String>,
    method: Option<String>,
    route: Option<String>,
    prefix: Option<String>,
    tag: Option<String>,
) -> Result<String, (ExitCode, String)> {
    use corral::purge::Purge;
    let purge = match (url, route, prefix, tag) {
        (Some(url), None, None, None) => Purge::Url {
            url,
            method,
            headers: Default::default(),
            body: None,
        },
        (None, Some(route), Some(prefix), None) => Purge::Prefix { route, prefix },
        (None, Some(route), None, None) => Purge::Route { route },
        (None, None, None, Some(tag)) => Purge::Tag { tag },
        _ => {
            let usage = "name one of --url, --route (with or without --prefix), --tag";
            return Err((ExitCode::from(EXIT_USAGE), usage.to_owned()));
        }
    };
    let token = match std::env::var(token_env) {
        Ok(token) if !token.is_empty() => token,
        _ => {
            let unset = format!("the admin token is not set: put it in ${token_env}");
            return Err((ExitCode::from(EXIT_USAGE), unset));
        }
    };
    corral::purge::send(admin, &token, &purge)
        .await
        .map(|answer| answer.to_string())
        .map_err(|error| (ExitCode::FAILURE, error.to_string()))
}

/// Loads and validates a config, reporting every problem on failure.
fn load(path: &std::path::Path, report: Report) -> Option<Config> {
    match config::load(path) {
        Ok(config) => Some(config),
        Err(errors) => {
            report.refused(&errors);
            None
        }
    }
}

/// Whether `corral serve` needs its store and bus up to start.
#[derive(Clone, Copy)]
enum Backends {
    /// `--require-backends`: exit 1 naming the one that is down.
    Required,
    /// Serve degraded, connecting them in the background.
    InBackground,
}

async fn serve(config: Config, watch: bool, backends: Backends, report: Report) -> ExitCode {
    for warning in &config.warnings {
        tracing::warn!(%warning, "the configuration asks for something to think twice about");
    }
    let public = match TcpListener::bind(config.listen).await {
        Ok(listener) => listener,
        Err(error) => {
            report.fatal(format_args!(
                "corral: cannot listen on {}: {error}",
                config.listen
            ));
            return ExitCode::FAILURE;
        }
    };
    let admin = match TcpListener::bind(config.admin.listen).await {
        Ok(listener) => listener,
        Err(error) => {
            report.fatal(format_args!(
                "corral: cannot listen on {}: {error}",
                config.admin.listen
            ));
            return ExitCode::FAILURE;
        }
    };
    // Before the server starts, so its first request is traced; flushed once it has stopped.
    let exporting = match config.tracing.as_ref().map(corral::telemetry::start) {
        None => None,
        Some(Ok(exporting)) => Some(exporting),
        Some(Err(error)) => {
            report.fatal(format_args!("corral: cannot turn traces on: {error}"));
            return ExitCode::FAILURE;
        }
    };
    let backend = corral::server::backend_for(&config);
    let server = match backends {
        Backends::Required => corral::server::Server::connect(config, &backend).await,
        Backends::InBackground => corral::server::Server::start(config, &backend).await,
    };
    let server = match server {
        Ok(server) => server,
        Err(error) => {
            report.fatal(format_args!("corral: {error}"));
            return ExitCode::FAILURE;
        }
    };
    if let Some(reloader) = server.reloader() {
        if let Err(error) = corral::reload::on_sighup(reloader.clone()) {
            report.fatal(format_args!("corral: cannot listen for SIGHUP: {error}"));
            return ExitCode::FAILURE;
        }
        if watch {
            corral::reload::watch(reloader, corral::reload::WATCH_INTERVAL);
        }
    }
    let served = server.serve(public, admin, shutdown_signal()).await;
    if let Some(exporting) = exporting {
        exporting.shutdown().await;
    }
    match served {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            report.fatal(format_args!("corral: {error}"));
            ExitCode::FAILURE
        }
    }
}

/// Ctrl-C or SIGTERM.
async fn shutdown_signal() {
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = terminate => {}
    }
}

/// The request `explain` describes.
fn request(
    method: &str,
    headers: &[String],
    url: &str,
) -> Result<(Method, Uri, HeaderMap), String> {
    let method = Method::from_bytes(method.to_ascii_uppercase().as_bytes())
        .map_err(|e| format!("bad method {method:?}: {e}"))?;
    let uri: Uri = url.parse().map_err(|e| format!("bad url {url:?}: {e}"))?;
    let mut map = HeaderMap::new();
    for header in headers {
        let (name, value) = header
            .split_once(':')
            .ok_or_else(|| format!("bad header {header:?}: expected 'Name: value'"))?;
        let name = HeaderName::from_bytes(name.trim().as_bytes())
            .map_err(|e| format!("bad header name in {header:?}: {e}"))?;
        let value = HeaderValue::from_str(value.trim())
            .map_err(|e| format!("bad header value in {header:?}: {e}"))?;
        map.append(name, value);
    }
    if let Some(authority) = uri.authority()
        && !map.contains_key(http::header::HOST)
        && let Ok(host) = HeaderValue::from_str(authority.as_str())
    {
        map.insert(http::header::HOST, host);
    }
    Ok((method, uri, map))
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::{Cli, Command};

    /// The CLI clients look where a config without `admin.listen` listens.
    #[test]
    fn the_clients_default_to_the_admin_listeners_default_address() {
        let admin = corral::config::DEFAULT_ADMIN_LISTEN;
        let no_admin = "store: { kind: memory }\nroutes:\n  - name: r\n    \
                        match: { path_prefix: / }\n    upstream: http://127.0.0.1:9\n";
        let config = corral::config::parse(no_admin, "t.yaml").expect("a valid config");
        assert_eq!(config.admin.listen, admin);
        match Cli::try_parse_from(["corral", "healthcheck"]).map(|cli| cli.command) {
            Ok(Command::Healthcheck { url, .. }) => {
                assert_eq!(url, format!("http://{admin}/healthz"));
            }
            _ => panic!("corral healthcheck parses"),
        }
        match Cli::try_parse_from(["corral", "purge", "--tag", "t"]).map(|cli| cli.command) {
            Ok(Command::Purge { admin: url, .. }) => assert_eq!(url, format!("http://{admin}")),
            _ => panic!("corral purge parses"),
        }
    }
}
