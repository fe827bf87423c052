//! The processes of a soak run: redis-server, nats-server and the `corral serve` replicas, each
//! started, killed, paused and restarted by its own PID, every step written to the fault journal.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::journal::{Action, Fault, Journal, now_ms};
use crate::origin::{Origin, PREFIX};
use crate::support::process::{ConfigFrom, CorralServe};
use crate::support::servers::free_port;
use crate::support::{TestNats, TestRedis};

/// The route policy every replica runs with; the checker reads its bounds from here.
#[derive(Clone, Copy, Debug)]
pub struct Policy {
    /// How long a committed answer is fresh, ms.
    pub ttl_ms: u64,
    /// Lease TTL, ms.
    pub lease_ttl_ms: u64,
    /// Safety poll of a waiting follower, ms.
    pub poll_ms: u64,
    /// The longest a request waits, ms (corral answers 504 past it).
    pub wait_timeout_ms: u64,
}

pub const POLICY: Policy = Policy {
    ttl_ms: 4_000,
    lease_ttl_ms: 2_000,
    poll_ms: 500,
    wait_timeout_ms: 3_000,
};

/// Which store the replicas share (the bus is NATS either way).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StoreKind {
    Redis,
    NatsKv,
}

/// One replica slot: fixed ports, a new process (and config and log file) per incarnation.
pub struct Replica {
    pub slot: usize,
    public: SocketAddr,
    admin: SocketAddr,
    /// 1 for the first process, counted up on every restart.
    pub incarnation: u32,
    process: Option<CorralServe>,
}

impl Replica {
    pub fn url(&self) -> String {
        format!("http://{}", self.public)
    }

    fn name(&self) -> String {
        format!("replica-{}", self.slot)
    }
}

/// Every process of the run.
pub struct Cluster {
    dir: PathBuf,
    store: StoreKind,
    pub redis: TestRedis,
    pub nats: TestNats,
    pub replicas: Vec<Replica>,
    /// Origin URL per replica slot.
    origin_urls: Vec<String>,
    faults: Arc<Journal>,
}

/// The log file of one incarnation of one replica.
pub fn replica_log(dir: &Path, slot: usize, incarnation: u32) -> PathBuf {
    config_path(dir, slot, incarnation).with_extension("output.log")
}

fn config_path(dir: &Path, slot: usize, incarnation: u32) -> PathBuf {
    dir.join(format!("replica-{slot}-{incarnation}.yaml"))
}

/// The config of replica `slot` (also used by the checker to compute key digests).
pub fn config_text(
    store: StoreKind,
    redis_url: &str,
    nats_url: &str,
    origin_url: &str,
    public: SocketAddr,
    admin: SocketAddr,
) -> String {
    let store = match store {
        StoreKind::Redis => format!("  kind: redis\n  url: {redis_url}\n"),
        StoreKind::NatsKv => format!("  kind: nats\n  url: {nats_url}\n"),
    };
    let Policy {
        ttl_ms,
        lease_ttl_ms,
        poll_ms,
        wait_timeout_ms,
    } = POLICY;
    format!(
        "listen: {public}
admin:
  listen: {admin}
namespace: chaos
store:
{store}bus:
  kind: nats
  url: {nats_url}
defaults:
  ttl: {ttl_ms}ms
  lease_ttl: {lease_ttl_ms}ms
  poll_interval: {poll_ms}ms
  wait_timeout: {wait_timeout_ms}ms
  on_wait_timeout: error
  max_fetch: 10s
  max_body: 1MiB
routes:
  - name: chaos
    match: {{ path_prefix: {PREFIX} }}
    upstream: {origin_url}
"
    )
}

fn loopback() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], free_port()))
}

impl Cluster {
    pub async fn start(
        dir: &Path,
        store: StoreKind,
        replicas: usize,
        origin: &Origin,
        faults: Arc<Journal>,
    ) -> Cluster {
        let redis = TestRedis::start().await;
        let nats = TestNats::start().await;
        let mut cluster = Cluster {
            dir: dir.to_path_buf(),
            store,
            redis,
            nats,
            replicas: Vec::new(),
            origin_urls: (0..replicas).map(|r| origin.url_for(r)).collect(),
            faults,
        };
        for slot in 0..replicas {
            let mut replica = Replica {
                slot,
                public: loopback(),
                admin: loopback(),
                incarnation: 0,
                process: None,
            };
            cluster.launch(&mut replica).await;
            cluster.replicas.push(replica);
        }
        cluster
    }

    /// The config file of replica `slot`'s first incarnation.
    pub fn first_config(&self, slot: usize) -> PathBuf {
        config_path(&self.dir, slot, 1)
    }

    /// Starts the next incarnation of `replica` on its fixed ports, with its own config and log.
    async fn launch(&self, replica: &mut Replica) {
        replica.incarnation += 1;
        let path = config_path(&self.dir, replica.slot, replica.incarnation);
        let text = config_text(
            self.store,
            &self.redis.url(),
            &self.nats.url(),
            &self.origin_urls[replica.slot],
            replica.public,
            replica.admin,
        );
        std::fs::write(&path, text).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
        let env = [
            ("CORRAL_LOG_FORMAT", "json"),
            // One line per lease won and per commit (see the checker).
            ("RUST_LOG", "corral=info,corral::lease=debug"),
        ];
        let process = CorralServe::start_with_env(
            &path,
            replica.public,
            replica.admin,
            ConfigFrom::Flag,
            &env,
        )
        .await;
        replica.process = Some(process);
    }

    /// Writes a fault step. A fault's start is stamped before the signal (`at_ms`), its healing
    /// after the process is back, so the window recorded covers the fault whole.
    fn record_at(&self, at_ms: u64, action: Action, target: String, pid: u32) {
        self.faults.write(&Fault {
            at_ms,
            action,
            target,
            pid,
        });
        self.faults.flush();
    }

    fn record(&self, action: Action, target: String, pid: u32) {
        self.record_at(now_ms(), action, target, pid);
    }

    // ------------------------------------------------------------ replica faults ----

    pub fn kill_replica(&mut self, slot: usize) {
        let replica = &mut self.replicas[slot];
        let process = replica.process.take().expect("a running replica");
        let pid = process.pid();
        let at = now_ms();
        // Dropping a CorralServe SIGKILLs and reaps its own child.
        drop(process);
        let name = replica.name();
        self.record_at(at, Action::Kill, name, pid);
    }

    pub async fn restart_replica(&mut self, slot: usize) {
        // Out of the list while it starts, so `launch` can borrow the rest of the cluster.
        let mut replica = self.replicas.remove(slot);
        self.launch(&mut replica).await;
        let pid = replica.process.as_ref().expect("launched").pid();
        let name = replica.name();
        self.replicas.insert(slot, replica);
        self.record(Action::Restart, name, pid);
    }

    pub fn pause_replica(&mut self, slot: usize) {
        let replica = &mut self.replicas[slot];
        let process = replica.process.as_mut().expect("a running replica");
        let at = now_ms();
        process.pause();
        let (pid, name) = (process.pid(), replica.name());
        self.record_at(at, Action::Pause, name, pid);
    }

    pub fn resume_replica(&mut self, slot: usize) {
        let replica = &mut self.replicas[slot];
        let process = replica.process.as_mut().expect("a running replica");
        process.resume();
        let (pid, name) = (process.pid(), replica.name());
        self.record(Action::Resume, name, pid);
    }

    // ------------------------------------------------------------ server faults ----

    pub fn kill_redis(&mut self) {
        let (pid, at) = (self.redis.pid(), now_ms());
        self.redis.kill();
        self.record_at(at, Action::Kill, "redis".into(), pid);
    }

    pub async fn restart_redis(&mut self) {
        self.redis.restart().await;
        let pid = self.redis.pid();
        self.record(Action::Restart, "redis".into(), pid);
    }

    pub fn pause_redis(&mut self) {
        let at = now_ms();
        self.redis.pause();
        let pid = self.redis.pid();
        self.record_at(at, Action::Pause, "redis".into(), pid);
    }

    pub fn resume_redis(&mut self) {
        self.redis.resume();
        let pid = self.redis.pid();
        self.record(Action::Resume, "redis".into(), pid);
    }

    pub fn kill_nats(&mut self) {
        let (pid, at) = (self.nats.pid(), now_ms());
        self.nats.kill();
        self.record_at(at, Action::Kill, "nats".into(), pid);
    }

    pub async fn restart_nats(&mut self) {
        self.nats.restart().await;
        let pid = self.nats.pid();
        self.record(Action::Restart, "nats".into(), pid);
    }

    pub fn pause_nats(&mut self) {
        let at = now_ms();
        self.nats.pause();
        let pid = self.nats.pid();
        self.record_at(at, Action::Pause, "nats".into(), pid);
    }

    pub fn resume_nats(&mut self) {
        self.nats.resume();
        let pid = self.nats.pid();
        self.record(Action::Resume, "nats".into(), pid);
    }

    /// Stops every replica (by its own PID), so their logs are complete.
    pub fn stop_replicas(&mut self) {
        for replica in &mut self.replicas {
            replica.process.take();
        }
    }
}
