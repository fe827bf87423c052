//! Production Redis topologies made of real processes: a primary with a replica watched by three
//! sentinels ([`TestSentinels`]), and a three-primary Redis Cluster ([`TestRedisCluster`]).
//!
//! Every process listens on 127.0.0.1 at an ephemeral port, keeps its config, log and data in its
//! own temporary directory, and is stopped by its own PID on `Drop` (SIGKILL, then reaped).
//! Binaries: `CORRAL_REDIS_SERVER` (default `redis-server`) and `CORRAL_REDIS_SENTINEL` (default
//! `redis-sentinel` on `PATH`, else `redis-server --sentinel`).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use redis::aio::MultiplexedConnection;
use redis::cluster::ClusterClientBuilder;
use redis::cluster_async::ClusterConnection;
use tempfile::TempDir;

use super::servers::{free_port, last_lines, read_lossy, spawn_child};
use super::{Deadline, patience};

/// Fresh ports tried per process before giving up.
const START_ATTEMPTS: usize = 5;
/// Pause between two looks at a process or topology that is getting ready.
const POLL: Duration = Duration::from_millis(50);
/// The name the sentinels monitor the primary under.
pub const MASTER: &str = "corral-main";
/// How long a sentinel waits before it calls an unanswering primary down. Short, so a test's
/// failover takes seconds; the client side does not depend on it.
const DOWN_AFTER_MS: u64 = 1000;
/// A failover that stalls is retried after this long.
const FAILOVER_TIMEOUT_MS: u64 = 3000;

/// A bounded poll: `check` every [`POLL`] until it yields `Some`, at most the test's patience (or
/// `longer`, if larger); panics naming `what`.
async fn poll<T, F, Fut>(what: &str, longer: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let patience = patience().max(longer);
    let deadline = Deadline::after(patience);
    let max_checks = patience.as_millis() / POLL.as_millis() + 1;
    for _ in 0..max_checks {
        if let Ok(Some(value)) = tokio::time::timeout(deadline.remaining(), check()).await {
            return value;
        }
        if deadline.expired() {
            break;
        }
        tokio::time::sleep(POLL).await;
    }
    panic!("timed out after {patience:?} waiting for: {what}");
}

fn redis_bin() -> PathBuf {
    std::env::var_os("CORRAL_REDIS_SERVER")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("redis-server"))
}

/// The sentinel command: `CORRAL_REDIS_SENTINEL`, else `redis-sentinel` on `PATH`, else
/// `redis-server --sentinel` (the same program in another mode).
fn sentinel_command(config: &Path) -> Command {
    let named = std::env::var_os("CORRAL_REDIS_SENTINEL").filter(|v| !v.is_empty());
    let on_path = || {
        std::env::var_os("PATH").and_then(|paths| {
            std::env::split_paths(&paths)
                .map(|dir| dir.join("redis-sentinel"))
                .find(|bin| bin.exists())
                .map(PathBuf::into_os_string)
        })
    };
    match named.or_else(on_path) {
        Some(bin) => {
            let mut cmd = Command::new(bin);
            cmd.arg(config);
            cmd
        }
        None => {
            let mut cmd = Command::new(redis_bin());
            cmd.arg(config).arg("--sentinel");
            cmd
        }
    }
}

/// What a [`Node`] runs as.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Role {
    Server,
    Sentinel,
}

/// One `redis-server` or sentinel child, configured by a file in its own directory.
pub struct Node {
    role: Role,
    port: u16,
    /// `user:password@` (or empty) for connections to it.
    userinfo: String,
    child: Option<Child>,
    pid: u32,
    dir: TempDir,
}

impl Node {
    /// Starts a process of `role` whose config file is `lines` plus port, bind, dir and log.
    async fn start(role: Role, lines: &[String]) -> Node {
        Node::start_as(role, lines, "").await
    }

    /// [`Node::start`], for a process whose clients must log in with `userinfo` (`user:pass@`).
    async fn start_as(role: Role, lines: &[String], userinfo: &str) -> Node {
        let dir = tempfile::Builder::new()
            .prefix("corral-topology-")
            .tempdir()
            .expect("create a temporary directory");
        let mut errors = Vec::new();
        for _ in 0..START_ATTEMPTS {
            let port = free_port();
            match Node::spawn(role, port, dir.path(), lines, userinfo).await {
                Ok(child) => {
                    return Node {
                        role,
                        port,
                        userinfo: userinfo.to_string(),
                        pid: child.id(),
                        child: Some(child),
                        dir,
                    };
                }
                Err(error) => errors.push(error),
            }
        }
        panic!("could not start a {role:?} process:\n{}", errors.join("\n"));
    }

    async fn spawn(
        role: Role,
        port: u16,
        dir: &Path,
        lines: &[String],
        userinfo: &str,
    ) -> Result<Child, String> {
        let config = dir.join("node.conf");
        let log = dir.join("node.log");
        let mut text = format!(
            "port {port}\nbind 127.0.0.1\ndaemonize no\ndir {}\nlogfile {}\n",
            dir.display(),
            log.display()
        );
        if role == Role::Server {
            text.push_str("save \"\"\nappendonly no\n");
        }
        for line in lines {
            text.push_str(line);
            text.push('\n');
        }
        std::fs::write(&config, text).map_err(|e| format!("write {}: {e}", config.display()))?;
        let mut cmd = match role {
            Role::Server => {
                let mut cmd = Command::new(redis_bin());
                cmd.arg(&config);
                cmd
            }
            Role::Sentinel => sentinel_command(&config),
        };
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let mut child = spawn_child(cmd).map_err(|e| format!("spawn on port {port}: {e}"))?;
        let deadline = Deadline::after(Duration::from_secs(5).max(patience() / 2));
        let url = format!("redis://{userinfo}127.0.0.1:{port}/");
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                return Err(format!(
                    "exited with {status} on port {port}; its log:\n{}",
                    last_lines(&read_lossy(&log), 20)
                ));
            }
            if let Ok(mut conn) = connect(&url).await
                && redis::cmd("PING")
                    .query_async::<String>(&mut conn)
                    .await
                    .is_ok()
            {
                return Ok(child);
            }
            if deadline.expired() {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!(
                    "no answer on port {port}; its log:\n{}",
                    last_lines(&read_lossy(&log), 20)
                ));
            }
            tokio::time::sleep(POLL).await;
        }
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// `redis://[user:password@]127.0.0.1:PORT/`
    pub fn url(&self) -> String {
        format!("redis://{}127.0.0.1:{}/", self.userinfo, self.port)
    }

    /// A fresh connection with 5 s timeouts.
    pub async fn client(&self) -> MultiplexedConnection {
        connect(&self.url())
            .await
            .unwrap_or_else(|e| panic!("connect to {:?} on {}: {e}", self.role, self.port))
    }

    /// SIGKILLs the process (by its own PID) and reaps it.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// The tail of its log.
    pub fn log_tail(&self, lines: usize) -> String {
        last_lines(&read_lossy(&self.dir.path().join("node.log")), lines)
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "--- {:?} on port {} (pid {}), last log lines:\n{}",
                self.role,
                self.port,
                self.pid,
                self.log_tail(30)
            );
        }
        self.kill();
    }
}

async fn connect(url: &str) -> redis::RedisResult<MultiplexedConnection> {
    let config = redis::AsyncConnectionConfig::new()
        .set_connection_timeout(Some(Duration::from_secs(5)))
        .set_response_timeout(Some(Duration::from_secs(5)));
    redis::Client::open(url)?
        .get_multiplexed_async_connection_with_config(&config)
        .await
}

/// `field:value` of an INFO-like text.
fn field<'a>(info: &'a str, name: &str) -> Option<&'a str> {
    info.lines()
        .find_map(|line| line.trim_end().strip_prefix(name)?.strip_prefix(':'))
}

// ------------------------------------------------------------------ Sentinel ----

/// A primary, its replica, and three sentinels monitoring the primary as [`MASTER`] with quorum 2.
pub struct TestSentinels {
    /// Password of the data nodes and of the sentinels, when they have one.
    passwords: Option<(String, String)>,
    /// `None` once killed.
    primary: Option<Node>,
    replica: Node,
    sentinels: Vec<Node>,
    /// Port of the primary at start.
    primary_port: u16,
}

impl TestSentinels {
    /// Starts them all and returns once the replica is in sync and every sentinel knows the
    /// replica and the two other sentinels (so a failover can reach its quorum).
    pub async fn start() -> TestSentinels {
        TestSentinels::start_with(None).await
    }

    /// Like [`TestSentinels::start`], with `node` as the data nodes' password and `sentinel` as
    /// the sentinels' own (`requirepass` in both).
    pub async fn with_passwords(node: &str, sentinel: &str) -> TestSentinels {
        TestSentinels::start_with(Some((node.to_string(), sentinel.to_string()))).await
    }

    async fn start_with(passwords: Option<(String, String)>) -> TestSentinels {
        let (mut data, mut watch) = (Vec::new(), Vec::new());
        let (mut data_login, mut watch_login) = (String::new(), String::new());
        if let Some((node, sentinel)) = &passwords {
            data = vec![format!("requirepass {node}"), format!("masterauth {node}")];
            watch = vec![
                format!("requirepass {sentinel}"),
                format!("sentinel sentinel-pass {sentinel}"),
            ];
            data_login = format!(":{node}@");
            watch_login = format!(":{sentinel}@");
        }
        let primary = Node::start_as(Role::Server, &data, &data_login).await;
        let mut replica_lines = data.clone();
        replica_lines.push(format!("replicaof 127.0.0.1 {}", primary.port()));
        let replica = Node::start_as(Role::Server, &replica_lines, &data_login).await;
        let mut monitor = vec![
            format!("sentinel monitor {MASTER} 127.0.0.1 {} 2", primary.port()),
            format!("sentinel down-after-milliseconds {MASTER} {DOWN_AFTER_MS}"),
            format!("sentinel failover-timeout {MASTER} {FAILOVER_TIMEOUT_MS}"),
            format!("sentinel parallel-syncs {MASTER} 1"),
        ];
        if let Some((node, _)) = &passwords {
            monitor.push(format!("sentinel auth-pass {MASTER} {node}"));
        }
        monitor.extend(watch);
        let (a, b, c) = tokio::join!(
            Node::start_as(Role::Sentinel, &monitor, &watch_login),
            Node::start_as(Role::Sentinel, &monitor, &watch_login),
            Node::start_as(Role::Sentinel, &monitor, &watch_login),
        );
        let this = TestSentinels {
            passwords,
            primary_port: primary.port(),
            primary: Some(primary),
            replica,
            sentinels: vec![a, b, c],
        };
        let replica = this.replica.client().await;
        poll("the replica to be in sync", Duration::ZERO, || {
            let mut replica = replica.clone();
            async move {
                let info: String = redis::cmd("INFO")
                    .arg("replication")
                    .query_async(&mut replica)
                    .await
                    .ok()?;
                (field(&info, "master_link_status") == Some("up")).then_some(())
            }
        })
        .await;
        // Sentinels find the replica and each other through the primary (hello messages every
        // 2 s), so this takes a few seconds.
        for sentinel in &this.sentinels {
            let conn = sentinel.client().await;
            poll(
                "every sentinel to know the replica and two other sentinels",
                Duration::from_secs(20),
                || {
                    let mut conn = conn.clone();
                    async move {
                        let master: std::collections::HashMap<String, String> =
                            redis::cmd("SENTINEL")
                                .arg("MASTER")
                                .arg(MASTER)
                                .query_async(&mut conn)
                                .await
                                .ok()?;
                        let known =
                            |name: &str| master.get(name).and_then(|v| v.parse::<u32>().ok());
                        (known("num-slaves") >= Some(1) && known("num-other-sentinels") >= Some(2))
                            .then_some(())
                    }
                },
            )
            .await;
        }
        this
    }

    /// `redis+sentinel://127.0.0.1:A,127.0.0.1:B,127.0.0.1:C/corral-main`
    pub fn url(&self) -> String {
        let hosts: Vec<String> = (self.sentinels.iter())
            .map(|s| format!("127.0.0.1:{}", s.port()))
            .collect();
        match &self.passwords {
            None => format!("redis+sentinel://{}/{MASTER}", hosts.join(",")),
            Some((node, sentinel)) => format!(
                "redis+sentinel://:{node}@{}/{MASTER}?sentinel_password={sentinel}",
                hosts.join(",")
            ),
        }
    }

    /// Port of the primary the topology started with.
    pub fn primary_port(&self) -> u16 {
        self.primary_port
    }

    /// Port of the replica (the primary after a failover).
    pub fn replica_port(&self) -> u16 {
        self.replica.port()
    }

    /// A connection to the replica.
    pub async fn replica_client(&self) -> MultiplexedConnection {
        self.replica.client().await
    }

    /// A connection to the primary the topology started with.
    pub async fn primary_client(&self) -> MultiplexedConnection {
        self.primary
            .as_ref()
            .expect("primary was killed")
            .client()
            .await
    }

    /// SIGKILLs the primary by its PID; returns the PID.
    pub fn kill_primary(&mut self) -> u32 {
        let mut primary = self.primary.take().expect("the primary is already killed");
        let pid = primary.pid();
        primary.kill();
        pid
    }

    /// Asks a sentinel for a failover while the primary stays up: the replica is promoted and
    /// the old primary is made its replica.
    pub async fn fail_over(&self) {
        let mut conn = self.sentinels[0].client().await;
        let _: () = redis::cmd("SENTINEL")
            .arg("FAILOVER")
            .arg(MASTER)
            .query_async(&mut conn)
            .await
            .expect("SENTINEL FAILOVER");
    }

    /// Waits (bounded) until the former replica, now the primary, has at least `n` client
    /// connections other than sentinels, replication links and the one asking.
    pub async fn wait_for_clients_on_new_primary(&self, n: usize) {
        let conn = self.replica.client().await;
        poll(
            "the clients to move to the new primary",
            Duration::ZERO,
            || {
                let mut conn = conn.clone();
                async move {
                    let own: i64 = redis::cmd("CLIENT")
                        .arg("ID")
                        .query_async(&mut conn)
                        .await
                        .ok()?;
                    let list: String = redis::cmd("CLIENT")
                        .arg("LIST")
                        .query_async(&mut conn)
                        .await
                        .ok()?;
                    let clients = (list.lines())
                        .filter(|line| !line.contains(&format!("id={own} ")))
                        .filter(|line| !line.contains(" name=sentinel-"))
                        .filter(|line| !line.contains(" flags=S") && !line.contains(" flags=M"))
                        .count();
                    (clients >= n).then_some(())
                }
            },
        )
        .await;
    }

    /// Waits (bounded) until the old primary, still running, has become a replica. Sentinels
    /// find it within 10 s (their INFO period) and close its clients' connections when they
    /// reconfigure it, so each look uses a new connection.
    pub async fn wait_for_old_primary_to_replicate(&self) {
        let url = self.primary.as_ref().expect("primary was killed").url();
        poll(
            "the old primary to become a replica",
            Duration::from_secs(30),
            || {
                let url = url.clone();
                async move {
                    let mut old = connect(&url).await.ok()?;
                    let info: String = redis::cmd("INFO")
                        .arg("replication")
                        .query_async(&mut old)
                        .await
                        .ok()?;
                    (field(&info, "role") == Some("slave")).then_some(())
                }
            },
        )
        .await;
    }

    /// Waits (bounded) until every sentinel names the former replica as the primary and the
    /// former replica says it is one.
    pub async fn wait_for_failover(&self) {
        let replica_port = self.replica.port().to_string();
        for sentinel in &self.sentinels {
            let conn = sentinel.client().await;
            poll(
                "the sentinels to promote the replica",
                Duration::from_secs(30),
                || {
                    let mut conn = conn.clone();
                    let replica_port = replica_port.clone();
                    async move {
                        let addr: Vec<String> = redis::cmd("SENTINEL")
                            .arg("GET-MASTER-ADDR-BY-NAME")
                            .arg(MASTER)
                            .query_async(&mut conn)
                            .await
                            .ok()?;
                        (addr.get(1) == Some(&replica_port)).then_some(())
                    }
                },
            )
            .await;
        }
        let replica = self.replica.client().await;
        poll(
            "the replica to take the primary role",
            Duration::ZERO,
            || {
                let mut replica = replica.clone();
                async move {
                    let info: String = redis::cmd("INFO")
                        .arg("replication")
                        .query_async(&mut replica)
                        .await
                        .ok()?;
                    (field(&info, "role") == Some("master")).then_some(())
                }
            },
        )
        .await;
    }
}

// ------------------------------------------------------------------- Cluster ----

/// Three primaries, no replicas, the 16384 slots split in three ranges.
pub struct TestRedisCluster {
    nodes: Vec<Node>,
    /// `user:password@` of the ACL user every client logs in as, or empty.
    userinfo: String,
}

/// Slots of a Redis Cluster.
const SLOTS: u16 = 16384;

impl TestRedisCluster {
    /// Starts three cluster-enabled servers, gives each a third of the slots, introduces them,
    /// and returns once every node reports `cluster_state:ok` and knows the other two.
    pub async fn start() -> TestRedisCluster {
        TestRedisCluster::start_as(None).await
    }

    /// Like [`TestRedisCluster::start`], where the default user is off and every client must
    /// log in as the ACL user `user` with `password`.
    pub async fn with_acl_user(user: &str, password: &str) -> TestRedisCluster {
        TestRedisCluster::start_as(Some((user, password))).await
    }

    async fn start_as(user: Option<(&str, &str)>) -> TestRedisCluster {
        let mut config = vec![
            "cluster-enabled yes".to_string(),
            "cluster-config-file nodes.conf".to_string(),
            "cluster-node-timeout 5000".to_string(),
        ];
        let mut userinfo = String::new();
        if let Some((user, password)) = user {
            config.push(format!("user {user} on >{password} ~* &* +@all"));
            config.push("user default off".to_string());
            userinfo = format!("{user}:{password}@");
        }
        let (a, b, c) = tokio::join!(
            Node::start_as(Role::Server, &config, &userinfo),
            Node::start_as(Role::Server, &config, &userinfo),
            Node::start_as(Role::Server, &config, &userinfo),
        );
        let nodes = vec![a, b, c];
        let third = SLOTS / 3;
        for (i, node) in nodes.iter().enumerate() {
            let first = third * i as u16;
            let last = if i == 2 { SLOTS - 1 } else { first + third - 1 };
            let mut conn = node.client().await;
            let _: () = redis::cmd("CLUSTER")
                .arg("ADDSLOTSRANGE")
                .arg(first)
                .arg(last)
                .query_async(&mut conn)
                .await
                .expect("CLUSTER ADDSLOTSRANGE");
        }
        let mut first = nodes[0].client().await;
        for node in &nodes[1..] {
            let _: () = redis::cmd("CLUSTER")
                .arg("MEET")
                .arg("127.0.0.1")
                .arg(node.port())
                .query_async(&mut first)
                .await
                .expect("CLUSTER MEET");
        }
        for node in &nodes {
            let conn = node.client().await;
            poll(
                "the cluster to be ok on every node",
                Duration::from_secs(20),
                || {
                    let mut conn = conn.clone();
                    async move {
                        let info: String = redis::cmd("CLUSTER")
                            .arg("INFO")
                            .query_async(&mut conn)
                            .await
                            .ok()?;
                        let ok = field(&info, "cluster_state") == Some("ok")
                            && field(&info, "cluster_known_nodes") == Some("3")
                            && field(&info, "cluster_slots_assigned") == Some("16384");
                        ok.then_some(())
                    }
                },
            )
            .await;
        }
        TestRedisCluster { nodes, userinfo }
    }

    /// `redis+cluster://127.0.0.1:A,127.0.0.1:B,127.0.0.1:C`
    pub fn url(&self) -> String {
        let hosts: Vec<String> = (self.nodes.iter())
            .map(|n| format!("127.0.0.1:{}", n.port()))
            .collect();
        format!("redis+cluster://{}{}", self.userinfo, hosts.join(","))
    }

    /// A cluster connection (follows MOVED/ASK), for inspecting keys.
    pub async fn client(&self) -> ClusterConnection {
        let seeds: Vec<String> = self.nodes.iter().map(Node::url).collect();
        ClusterClientBuilder::new(seeds)
            .connection_timeout(Duration::from_secs(5))
            .response_timeout(Duration::from_secs(5))
            .build()
            .expect("cluster client")
            .get_async_connection()
            .await
            .expect("connect to the test cluster")
    }

    /// How many keys each primary holds, in node order.
    pub async fn keys_per_node(&self) -> Vec<u64> {
        let mut counts = Vec::with_capacity(self.nodes.len());
        for node in &self.nodes {
            let mut conn = node.client().await;
            let n: u64 = redis::cmd("DBSIZE")
                .query_async(&mut conn)
                .await
                .expect("DBSIZE");
            counts.push(n);
        }
        counts
    }
}
