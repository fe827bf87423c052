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
        #[arg(long, env = "CORRAL_ADMIN", default_value = "http://127.0.0.1:8081")]
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
    },
    /// Exit 0 when the admin listener's /healthz answers 200, else 1 (for container health checks).
    Healthcheck {
        /// The URL to check.
        #[arg(
            long,
            env = "CORRAL_HEALTHCHECK_URL",
            default_value = "http://127.0.0.1:8081/healthz"
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
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| "corral=info".into());
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match cli.log_format {
        LogFormat::Text => logs.init(),
        LogFormat::Json => logs.json().init(),
    }
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("corral: cannot start the runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(run(cli.command))
}

async fn run(command: Command) -> ExitCode {
    match command {
        Command::Serve { config, watch } => {
            let Some(config) = load(&config) else {
                return ExitCode::from(EXIT_CONFIG);
            };
            serve(config, watch).await
        }
        Command::Check { config: path } => {
            let Some(config) = load(&path) else {
                return ExitCode::from(EXIT_CONFIG);
            };
            println!("{}: ok", path.display());
            print!("{}", config::describe(&config));
            ExitCode::SUCCESS
        }
        Command::Explain {
            config,
            method,
            headers,
            url,
        } => {
            let Some(config) = load(&config) else {
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
                    eprintln!("corral explain: {message}");
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
        } => purge(&admin, &token_env, url, method, route, prefix, tag).await,
        Command::Demo {
            requests,
            delay,
            replicas,
            redis,
            nats,
            serve,
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
                    eprintln!("corral demo: {error:#}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Healthcheck { url, timeout } => {
            match corral::admin::healthcheck(&url, timeout).await {
                Ok(()) => ExitCode::SUCCESS,
                Err(error) => {
                    eprintln!("corral healthcheck: {error}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::DemoUpstream { listen, delay } => demo_upstream(listen, delay).await,
    }
}

async fn demo_upstream(listen: std::net::SocketAddr, delay: Duration) -> ExitCode {
    let listener = match TcpListener::bind(listen).await {
        Ok(listener) => listener,
        Err(error) => {
            eprintln!("corral demo-upstream: cannot listen on {listen}: {error}");
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
            eprintln!("corral demo-upstream: {error}");
            ExitCode::FAILURE
        }
    }
}

/// `corral purge`: one purge through the admin API; prints its answer.
async fn purge(
    admin: &str,
    token_env: &str,
    url: Option<String>,
    method: Option<String>,
    route: Option<String>,
    prefix: Option<String>,
    tag: Option<String>,
) -> ExitCode {
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
            eprintln!("corral purge: name one of --url, --route (with or without --prefix), --tag");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    let token = match std::env::var(token_env) {
        Ok(token) if !token.is_empty() => token,
        _ => {
            eprintln!("corral purge: the admin token is not set: put it in ${token_env}");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    match corral::purge::send(admin, &token, &purge).await {
        Ok(answer) => {
            println!("{answer}");
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("corral purge: {error}");
            ExitCode::FAILURE
        }
    }
}

/// Loads and validates a config, printing every problem on failure.
fn load(path: &std::path::Path) -> Option<Config> {
    match config::load(path) {
        Ok(config) => Some(config),
        Err(errors) => {
            eprintln!("{errors}");
            eprintln!("corral: the configuration was refused; nothing was started");
            None
        }
    }
}

async fn serve(config: Config, watch: bool) -> ExitCode {
    let public = match TcpListener::bind(config.listen).await {
        Ok(listener) => listener,
        Err(error) => {
            eprintln!("corral: cannot listen on {}: {error}", config.listen);
            return ExitCode::FAILURE;
        }
    };
    let admin = match TcpListener::bind(config.admin.listen).await {
        Ok(listener) => listener,
        Err(error) => {
            eprintln!("corral: cannot listen on {}: {error}", config.admin.listen);
            return ExitCode::FAILURE;
        }
    };
    tracing::info!(
        public = %public.local_addr().map_or_else(|_| "?".into(), |a| a.to_string()),
        admin = %admin.local_addr().map_or_else(|_| "?".into(), |a| a.to_string()),
        "corral is starting: connecting to the store and the bus"
    );
    let backend = corral::server::backend_for(&config);
    let server = match corral::server::Server::connect(config, &backend).await {
        Ok(server) => server,
        Err(error) => {
            eprintln!("corral: {error}");
            return ExitCode::FAILURE;
        }
    };
    if let Some(reloader) = server.reloader() {
        if let Err(error) = corral::reload::on_sighup(reloader.clone()) {
            eprintln!("corral: cannot listen for SIGHUP: {error}");
            return ExitCode::FAILURE;
        }
        if watch {
            corral::reload::watch(reloader, corral::reload::WATCH_INTERVAL);
        }
    }
    match server.serve(public, admin, shutdown_signal()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("corral: {error}");
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
