//! Hot reload, end to end: the config file changes under running replicas (three in this process
//! on a real Redis store and NATS bus, reloaded by calling their reloaders), and under a real
//! `corral serve` process sent SIGHUP.

use crate::support;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use corral::reload::Reloader;
use corral::server::{ServeError, Server, backend_for};
use support::http::Http;
use support::process::{ConfigFrom, CorralServe};
use support::proxy::fill;
use support::servers::free_port;
use support::upstream::Upstream;
use support::{TestNats, TestRedis, eventually};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// Two upstreams, `{{a}}` and `{{b}}`, and routes filled per version of the file.
const CONFIG: &str = r#"
listen: {{listen}}
admin: { listen: {{admin}}, token: secret }
namespace: reload
{{backing}}
defaults: { ttl: 60s, wait_timeout: 10s, lease_ttl: 10s, poll_interval: 1s }
routes:
{{routes}}
"#;

const REDIS_NATS: &str = r#"store: { kind: redis, url: "{{redis}}" }
bus: { kind: nats, url: "{{nats}}" }"#;

/// Before: only `/reports`, on upstream a.
const BEFORE: &str = r#"
  - name: reports
    match: { path_prefix: /reports }
    upstream: {{a}}
"#;

/// After: `/reports` moves to upstream b, and `/fresh` appears (on b).
const AFTER: &str = r#"
  - name: reports
    match: { path_prefix: /reports }
    upstream: {{b}}
  - name: fresh
    match: { path_prefix: /fresh }
    upstream: {{b}}
"#;

/// A file that does not pass the check (see [`broken_place`]).
const BROKEN: &str = r#"
  - name: reports
    ttl: 5 parsecs
    match: { path_prefix: /reports }
    upstream: {{a}}
"#;

fn temp_dir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("corral-reload-")
        .tempdir()
        .expect("a temporary directory")
}

/// Three replicas in this process, each loaded from `file` and holding its own [`Reloader`].
struct Replicas {
    replicas: Vec<Replica>,
    http: Http,
}

struct Replica {
    public: SocketAddr,
    admin: SocketAddr,
    reloader: Reloader,
    shutdown: Option<oneshot::Sender<()>>,
    task: JoinHandle<Result<(), ServeError>>,
}

impl Replicas {
    async fn start(n: usize, file: &Path) -> Replicas {
        let http = Http::new();
        let mut replicas = Vec::new();
        for _ in 0..n {
            let config = corral::config::load(file).expect("the first config is valid");
            let backend = backend_for(&config);
            let server = Server::connect(config, &backend)
                .await
                .expect("connect to the store and bus");
            let reloader = server.reloader().expect("a config from a file reloads");
            let public = TcpListener::bind("127.0.0.1:0").await.expect("bind");
            let admin = TcpListener::bind("127.0.0.1:0").await.expect("bind");
            let (public_addr, admin_addr) =
                (public.local_addr().unwrap(), admin.local_addr().unwrap());
            let (tx, rx) = oneshot::channel::<()>();
            let task = tokio::spawn(server.serve(public, admin, async move {
                let _ = rx.await;
            }));
            let ready = format!("http://{admin_addr}/readyz");
            eventually("the replica is ready", || {
                let call = http.get(&ready);
                async move { call.try_send().await.is_ok_and(|r| r.status == 200) }
            })
            .await;
            replicas.push(Replica {
                public: public_addr,
                admin: admin_addr,
                reloader,
                shutdown: Some(tx),
                task,
            });
        }
        Replicas { replicas, http }
    }

    fn url(&self, i: usize, path: &str) -> String {
        format!("http://{}{path}", self.replicas[i].public)
    }

    /// `POST /admin/purge` with `body` on replica `i`; answers the JSON of a 200.
    async fn purge(&self, i: usize, body: serde_json::Value) -> serde_json::Value {
        let url = format!("http://{}/admin/purge", self.replicas[i].admin);
        let reply = self
            .http
            .call(http::Method::POST, url)
            .bearer("secret")
            .json(&body)
            .send()
            .await;
        assert_eq!(reply.status, 200, "purge {body}: {}", reply.text());
        reply.json()
    }

    async fn stop(mut self) {
        for replica in &mut self.replicas {
            let _ = replica.shutdown.take().map(|tx| tx.send(()));
        }
        for replica in self.replicas {
            let stopped = tokio::time::timeout(support::patience(), replica.task).await;
            assert!(
                matches!(stopped, Ok(Ok(Ok(())))),
                "a replica did not stop cleanly: {stopped:?}"
            );
        }
    }
}

/// [`CONFIG`] with these routes, in front of upstreams `a` and `b`, on `backing`.
fn config_text(
    routes: &str,
    a: &Upstream,
    b: &Upstream,
    backing: &str,
    listen: (SocketAddr, SocketAddr),
) -> String {
    let routes = fill(routes, &[("a", &a.url()), ("b", &b.url())]);
    fill(
        CONFIG,
        &[
            ("routes", &routes),
            ("backing", backing),
            ("listen", &listen.0.to_string()),
            ("admin", &listen.1.to_string()),
        ],
    )
}

/// Where a file made with [`BROKEN`] is wrong: `file:line:column: routes[0].ttl`.
fn broken_place(file: &Path, text: &str) -> String {
    let (line, column) = text
        .lines()
        .enumerate()
        .find_map(|(i, line)| Some((i + 1, line.find("5 parsecs")? + 1)))
        .expect("the broken value is in the file");
    format!("{}:{line}:{column}: routes[0].ttl", file.display())
}

fn write(path: &Path, text: &str) {
    std::fs::write(path, text).expect("write the config file");
}

/// Upstreams `a` ("from a") and `b` ("from b"), a config file in a temporary directory, and
/// the backing the file names (a fresh Redis and NATS, or memory).
struct Setup {
    a: Upstream,
    b: Upstream,
    backing: String,
    file: PathBuf,
    _dir: tempfile::TempDir,
    /// Kept alive for the replicas; stopped when the test ends.
    _servers: Option<(TestRedis, TestNats)>,
}

impl Setup {
    async fn redis_nats() -> Setup {
        let (redis, nats) = tokio::join!(TestRedis::start(), TestNats::start());
        let backing = fill(
            REDIS_NATS,
            &[("redis", &redis.url()), ("nats", &nats.url())],
        );
        Setup::on(backing, Some((redis, nats))).await
    }

    async fn memory() -> Setup {
        Setup::on("store: { kind: memory }".into(), None).await
    }

    async fn on(backing: String, servers: Option<(TestRedis, TestNats)>) -> Setup {
        let a = Upstream::start().await.body("/", "from a");
        let b = Upstream::start().await.body("/", "from b");
        let dir = temp_dir();
        let file = dir.path().join("corral.yaml");
        Setup {
            a,
            b,
            backing,
            file,
            _dir: dir,
            _servers: servers,
        }
    }

    /// [`CONFIG`] with `routes`, listening where `listen` says.
    fn text(&self, routes: &str, listen: (SocketAddr, SocketAddr)) -> String {
        config_text(routes, &self.a, &self.b, &self.backing, listen)
    }

    /// Writes the file with `routes` (listen addresses unused: in-process replicas bind their own).
    fn write(&self, routes: &str) -> String {
        let unused = SocketAddr::from(([127, 0, 0, 1], 0));
        let text = self.text(routes, (unused, unused));
        write(&self.file, &text);
        text
    }
}

// ------------------------------------------------------------------------- in process ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_route_serves_after_a_reload_while_a_request_in_flight_finishes_under_the_old() {
    let setup = Setup::redis_nats().await;
    let (a, b) = (&setup.a, &setup.b);
    setup.write(BEFORE);
    let proxy = Replicas::start(3, &setup.file).await;
    let http = proxy.http.clone();

    for i in 0..3 {
        let reply = http.get(proxy.url(i, "/fresh/1")).send().await;
        assert_eq!(reply.status, 404, "no route for /fresh yet (replica {i})");
    }
    // A slow request, held by upstream a until the reload is done.
    let hold = a.hold("/reports/slow");
    let slow = tokio::spawn(http.get(proxy.url(0, "/reports/slow")).send());
    a.wait_for_hits("/reports/slow", 1).await;

    setup.write(AFTER);
    for replica in &proxy.replicas {
        let reloaded = replica
            .reloader
            .reload()
            .await
            .expect("the new file is valid");
        assert!(reloaded.needs_restart.is_empty(), "{reloaded:?}");
    }
    for i in 0..3 {
        let fresh = http.get(proxy.url(i, "/fresh/1")).send().await;
        assert_eq!(
            (fresh.status.as_u16(), fresh.text()),
            (200, "from b".into()),
            "replica {i}"
        );
        let moved = http.get(proxy.url(i, "/reports/other")).send().await;
        assert_eq!(moved.text(), "from b", "reports now go to b (replica {i})");
    }
    assert!(!slow.is_finished(), "the slow request is still held");

    hold.release();
    let slow = slow.await.expect("the slow request's task");
    assert_eq!(slow.status, 200, "{:?}", slow.text());
    // Upstream a's held prefix echoes the path; b would have said "from b".
    assert_eq!(
        slow.text(),
        "upstream body for /reports/slow",
        "it finished under the config it started with"
    );
    assert_eq!(b.hits("/reports/slow"), 0);
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalid_file_is_refused_and_the_old_routes_keep_working() {
    let setup = Setup::redis_nats().await;
    setup.write(BEFORE);
    let proxy = Replicas::start(3, &setup.file).await;

    let broken = setup.write(BROKEN);
    let place = broken_place(&setup.file, &broken);
    for replica in &proxy.replicas {
        let error = replica
            .reloader
            .reload()
            .await
            .expect_err("the broken file is refused");
        let shown = error.to_string();
        assert!(
            shown.starts_with(&place),
            "names the place {place}: {shown}"
        );
    }
    for i in 0..3 {
        let reply = proxy.http.get(proxy.url(i, "/reports/1")).send().await;
        assert_eq!(
            (reply.status.as_u16(), reply.text()),
            (200, "from a".into()),
            "replica {i}"
        );
    }
    proxy.stop().await;
}

/// A route purged as a whole while one replica did not have it: when a reload adds the route
/// there, that replica reads the route's generation from the store before serving, so the value
/// stored under the old generation is not served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_route_a_reload_adds_serves_with_the_generation_of_an_earlier_purge() {
    let setup = Setup::redis_nats().await;
    setup.write(AFTER);
    let knowing = Replicas::start(1, &setup.file).await;
    setup.write(BEFORE);
    let unaware = Replicas::start(1, &setup.file).await;
    let http = knowing.http.clone();

    let first = http.get(knowing.url(0, "/fresh/1")).send().await;
    assert_eq!((first.status.as_u16(), first.x_cache()), (200, "MISS"));
    let status = format!(
        "http://{}/admin/status?url=/fresh/1",
        knowing.replicas[0].admin
    );
    eventually("the answer is stored", || async {
        let reply = http.get(&status).bearer("secret").send().await;
        reply.status == 200 && reply.json()["status"] == "EXISTS"
    })
    .await;
    let unknown = http.get(unaware.url(0, "/fresh/1")).send().await;
    assert_eq!(unknown.status, 404, "no route for /fresh there yet");

    let purged = knowing
        .purge(0, serde_json::json!({"route": "fresh"}))
        .await;
    assert_eq!(purged["generation"], serde_json::json!(1), "{purged}");

    setup.write(AFTER);
    unaware.replicas[0]
        .reloader
        .reload()
        .await
        .expect("the new file is valid");
    let after = http.get(unaware.url(0, "/fresh/1")).send().await;
    assert_eq!(
        (after.status.as_u16(), after.x_cache()),
        (200, "MISS"),
        "the answer stored before the purge is not served"
    );
    assert_eq!(setup.b.hits("/fresh/1"), 2, "fetched again after the purge");
    knowing.stop().await;
    unaware.stop().await;
}

// ---------------------------------------------------------------------- real process ----

/// `corral serve` on `file`, with the ports the file names.
async fn serve(file: &Path, listen: (SocketAddr, SocketAddr)) -> CorralServe {
    CorralServe::start(file, listen.0, listen.1, ConfigFrom::Flag).await
}

#[allow(unsafe_code)] // test harness: signals and process limits, see SAFETY below
fn sighup(process: &CorralServe) {
    let pid = libc::pid_t::try_from(process.pid()).expect("a pid");
    // SAFETY: kill(2) with a valid signal number; it signals only our own child, by its PID.
    let sent = unsafe { libc::kill(pid, libc::SIGHUP) };
    assert_eq!(sent, 0, "kill -HUP {pid}");
}

/// The value of `corral_config_reloads_total{result="<result>"}` on the admin listener.
async fn reloads(http: &Http, process: &CorralServe, result: &str) -> u64 {
    let wanted = format!("corral_config_reloads_total{{result=\"{result}\"}}");
    scraped(http, process, &wanted).await as u64
}

/// The value of the unlabelled series `series` on the admin listener (0 when absent).
async fn scraped(http: &Http, process: &CorralServe, series: &str) -> f64 {
    let reply = http
        .get(format!("{}/metrics", process.admin_url()))
        .send()
        .await;
    let wanted = format!("{series} ");
    reply
        .text()
        .lines()
        .find_map(|line| line.strip_prefix(&wanted)?.trim().parse().ok())
        .unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_a_running_process_and_names_what_needs_a_restart() {
    let setup = Setup::redis_nats().await;
    let loopback = |port| SocketAddr::from(([127, 0, 0, 1], port));
    let listen = (loopback(free_port()), loopback(free_port()));
    let file = setup.file.clone();
    write(&file, &setup.text(BEFORE, listen));
    let process = serve(&file, listen).await;
    let http = Http::new();
    let url = |path: &str| format!("{}{path}", process.url());
    assert_eq!(http.get(url("/fresh/1")).send().await.status, 404);

    // A broken file: refused, logged at its place, and the old routes keep working.
    let broken = setup.text(BROKEN, listen);
    write(&file, &broken);
    sighup(&process);
    eventually("the broken reload is counted", || async {
        reloads(&http, &process, "refused").await == 1
    })
    .await;
    let place = broken_place(&file, &broken);
    eventually("the refusal is logged with its place", || {
        let found = process.output().contains(&place);
        async move { found }
    })
    .await;
    let old = http.get(url("/reports/1")).send().await;
    assert_eq!((old.status.as_u16(), old.text()), (200, "from a".into()));
    let last_success = "corral_config_last_reload_success_timestamp_seconds";
    assert_eq!(
        scraped(&http, &process, last_success).await,
        0.0,
        "no reload applied yet"
    );

    // A good file that also moves the public listener: the routes switch, the listener stays and
    // the log says it needs a restart.
    let moved = (loopback(free_port()), listen.1);
    write(&file, &setup.text(AFTER, moved));
    sighup(&process);
    eventually("the good reload is counted", || async {
        reloads(&http, &process, "applied").await == 1
    })
    .await;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("after 1970")
        .as_secs_f64();
    let applied_at = scraped(&http, &process, last_success).await;
    assert!(
        (now - 60.0..=now).contains(&applied_at),
        "the last applied reload is noted with its time: {applied_at} (now {now})"
    );
    let fresh = http.get(url("/fresh/1")).send().await;
    assert_eq!(
        (fresh.status.as_u16(), fresh.text()),
        (200, "from b".into())
    );
    let output = process.output();
    let line = output
        .lines()
        .find(|line| line.contains("need a restart"))
        .unwrap_or_else(|| panic!("no restart line in:\n{output}"));
    assert!(line.contains("listen"), "{line}");
    assert!(!line.contains("admin.listen"), "{line}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watching_the_file_reloads_when_it_changes() {
    let setup = Setup::memory().await;
    setup.write(BEFORE);
    let proxy = Replicas::start(1, &setup.file).await;
    let watcher = corral::reload::watch(
        proxy.replicas[0].reloader.clone(),
        std::time::Duration::from_millis(50),
    );
    assert_eq!(
        proxy.http.get(proxy.url(0, "/fresh/1")).send().await.status,
        404
    );

    setup.write(AFTER);
    eventually("the changed file is picked up", || async {
        proxy.http.get(proxy.url(0, "/fresh/1")).send().await.text() == "from b"
    })
    .await;
    watcher.abort();
    proxy.stop().await;
}
