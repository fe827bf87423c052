//! A route's pool: its servers (a host name stands for each of its addresses), where each one
//! stands, and which one a request goes to.
//!
//! A request goes to a server in rotation (up by its health checks, not ejected), chosen by the
//! route's `balance`: each in turn, the one with the fewest requests under way, or by rendezvous
//! hashing of the cache key (`key_hash`: every server scores the key, the highest score wins, so
//! a key's fetches, revalidations and refreshes reach one server on every replica, and a server
//! leaving moves only its own keys). A retry goes to a server not tried yet when one is in
//! rotation. When none is, the request still goes to one, the server whose last failure is the
//! oldest (a pool that is all down may be so only to corral's eyes; failing fast would turn a
//! blip into an outage), and its answer or error is the client's.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock};

use http::Uri;
use prometheus::{Histogram, IntCounter, IntGauge};
use tokio::task::AbortHandle;
use tokio::time::Instant;

use super::client::{ServerClient, client};
use super::outlier::{Change, Standing, max_ejected};
use super::resolve::host_name;
use super::retry::Budget;
use crate::config::{Balance, Route, UpstreamSettings};
use crate::metrics::{STATUS_CLASSES, UpstreamServerMetrics};

/// One route's servers and what is known of them. Kept across reloads while the route's upstream
/// settings do not change; dropping it stops its background task.
pub(super) struct Pool {
    pub route: String,
    pub settings: Arc<UpstreamSettings>,
    /// Which pool this is (a kept pool keeps its number), for the debug log and tests.
    pub id: u64,
    /// The servers as written (`servers:`, or the route's URL).
    members: Vec<Member>,
    /// The servers requests go to, in member order; replaced whole when a name resolves anew.
    servers: RwLock<Arc<[Arc<Server>]>>,
    /// Round robin's next turn.
    turn: AtomicUsize,
    pub budget: Budget,
    pub metrics: UpstreamServerMetrics,
    /// The health checks and re-resolution, when the pool has either.
    task: Mutex<Option<AbortHandle>>,
}

/// One server as written.
pub(super) struct Member {
    pub url: Uri,
    /// Its host name, when it is not an IP address.
    pub name: Option<String>,
}

/// One server requests go to: an IP literal as written, or one address of a name.
pub(super) struct Server {
    /// The `server` label: the URL's authority, or the resolved address.
    pub label: String,
    /// Its member's URL: the scheme, the authority as written (so `Host` and SNI keep the
    /// name) and the path requests are appended to.
    pub url: Uri,
    member: usize,
    /// The address its connections go to, when it is one address of a name.
    addr: Option<SocketAddr>,
    pub client: ServerClient,
    /// Requests under way (their response bodies included), for `least_requests`.
    in_flight: AtomicUsize,
    standing: Mutex<Standing>,
    /// The key `key_hash` scores against, from the label.
    seed: [u8; 32],
    handles: Handles,
}

/// A server's metric series, resolved once.
struct Handles {
    classes: [IntCounter; 6],
    duration: Histogram,
    healthy: IntGauge,
    ejections: IntCounter,
}

impl Pool {
    /// The pool of `route`. Its health checks and re-resolution are started by its owner
    /// ([`Pool::watched_by`]) when it [`Pool::wants_watching`].
    pub fn new(route: &Route, metrics: &UpstreamServerMetrics) -> Arc<Pool> {
        static MADE: AtomicU64 = AtomicU64::new(0);
        let settings = route.upstream_settings.clone();
        let written = match settings.pool.servers.is_empty() {
            true => vec![route.upstream.clone()],
            false => settings.pool.servers.clone(),
        };
        let members: Vec<Member> = written
            .into_iter()
            .map(|url| Member {
                name: host_name(&url).map(str::to_owned),
                url,
            })
            .collect();
        let pool = Arc::new(Pool {
            route: route.name.clone(),
            id: MADE.fetch_add(1, Ordering::Relaxed),
            budget: Budget::new(&settings.pool.retries),
            servers: RwLock::new(Arc::from(Vec::new())),
            turn: AtomicUsize::new(0),
            metrics: metrics.clone(),
            members,
            task: Mutex::new(None),
            settings,
        });
        // Each member as written until its name resolves (at once, by the background task).
        let servers: Vec<Arc<Server>> = (pool.members.iter().enumerate())
            .map(|(i, member)| pool.server(i, None, &member.url))
            .collect();
        *pool.servers.write().unwrap_or_else(PoisonError::into_inner) = Arc::from(servers);
        pool
    }

    /// Whether the pool has work in the background: health checks, or names to resolve.
    pub fn wants_watching(&self) -> bool {
        self.settings.pool.health.is_some() || self.has_names()
    }

    /// Keeps the task that watches this pool, stopped when the pool is dropped.
    pub fn watched_by(&self, task: AbortHandle) {
        *self.task.lock().unwrap_or_else(PoisonError::into_inner) = Some(task);
    }

    fn server(&self, member: usize, addr: Option<SocketAddr>, url: &Uri) -> Arc<Server> {
        let label = match addr {
            Some(addr) => addr.to_string(),
            None => url.authority().map_or(String::new(), |a| a.to_string()),
        };
        let (metrics, labels) = (&self.metrics, [self.route.as_str(), label.as_str()]);
        let handles = Handles {
            classes: STATUS_CLASSES
                .map(|class| (metrics.requests).with_label_values(&[labels[0], labels[1], class])),
            duration: metrics.duration.with_label_values(&labels),
            healthy: metrics.healthy.with_label_values(&labels),
            ejections: metrics.ejections.with_label_values(&labels),
        };
        handles.healthy.set(1);
        Arc::new(Server {
            seed: *blake3::hash(label.as_bytes()).as_bytes(),
            label,
            url: url.clone(),
            member,
            addr,
            client: client(&self.settings, addr),
            in_flight: AtomicUsize::new(0),
            standing: Mutex::new(Standing::default()),
            handles,
        })
    }

    pub fn members(&self) -> &[Member] {
        &self.members
    }

    pub fn has_names(&self) -> bool {
        self.members.iter().any(|m| m.name.is_some())
    }

    /// The servers requests go to now.
    pub fn servers(&self) -> Arc<[Arc<Server>]> {
        self.servers
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Member `member`'s name resolved to `addrs`: a server for each, those already known kept
    /// with their connections and standing, the others' series removed.
    pub fn resolved(&self, member: usize, addrs: &[SocketAddr]) {
        let mut servers = self.servers.write().unwrap_or_else(PoisonError::into_inner);
        let url = &self.members[member].url;
        let mut next = Vec::with_capacity(servers.len() + addrs.len());
        let mut placed = false;
        for server in servers.iter() {
            if server.member != member {
                next.push(server.clone());
                continue;
            }
            match server.addr {
                Some(addr) if addrs.contains(&addr) => {}
                _ => {
                    tracing::info!(route = %self.route, server = %server.label,
                        "an upstream server left the pool (its name no longer resolves to it)");
                    self.metrics.forget(&self.route, &server.label);
                }
            }
            if !placed {
                placed = true;
                for addr in addrs {
                    let known = servers
                        .iter()
                        .find(|s| s.member == member && s.addr == Some(*addr));
                    next.push(match known {
                        Some(known) => known.clone(),
                        None => self.server(member, Some(*addr), url),
                    });
                }
            }
        }
        *servers = Arc::from(next);
    }

    /// The labels of every server now, for removing those a reload dropped.
    pub fn labels(&self) -> Vec<String> {
        self.servers().iter().map(|s| s.label.clone()).collect()
    }

    /// The server for a try: see the module's doc. `affinity` is what `key_hash` hashes;
    /// `tried` the servers this request already went to.
    pub fn pick(&self, affinity: &[u8], tried: &[Arc<Server>]) -> Arc<Server> {
        let servers = self.servers();
        // A bare URL's one server: nothing to choose.
        if let [only] = &*servers {
            return only.clone();
        }
        let now = Instant::now();
        let fresh = |s: &&Arc<Server>| !tried.iter().any(|t| Arc::ptr_eq(t, s));
        let available: Vec<&Arc<Server>> = servers.iter().filter(|s| s.available(now)).collect();
        let mut candidates: Vec<&Arc<Server>> = available.iter().copied().filter(fresh).collect();
        if candidates.is_empty() {
            candidates = available;
        }
        if candidates.is_empty() {
            let oldest_failure = |s: &&Arc<Server>| s.standing().last_failure;
            let pick = servers.iter().filter(fresh).min_by_key(oldest_failure);
            let pick = pick.or_else(|| servers.iter().min_by_key(oldest_failure));
            return pick.expect("a pool has a server").clone();
        }
        let turn = self.turn.fetch_add(1, Ordering::Relaxed);
        let chosen = match self.settings.pool.balance {
            Balance::RoundRobin => candidates[turn % candidates.len()],
            Balance::LeastRequests => {
                // The fewest under way; ties taken in turn, so an idle pool still spreads.
                let n = candidates.len();
                (0..n)
                    .map(|i| candidates[(turn + i) % n])
                    .min_by_key(|s| s.in_flight.load(Ordering::Relaxed))
                    .expect("candidates is not empty")
            }
            Balance::KeyHash => candidates
                .iter()
                .copied()
                .max_by_key(|s| rendezvous(&s.seed, affinity))
                .expect("candidates is not empty"),
        };
        chosen.clone()
    }

    /// Records a try's outcome: a failure counts towards ejecting the server.
    pub fn outcome(&self, server: &Server, failed: bool) {
        let now = Instant::now();
        let outlier = &self.settings.pool.outlier;
        let change = if failed {
            // Counted before taking this server's lock: one lock at a time.
            // A lone server is never ejected: there is nowhere else to send its requests.
            let servers = self.servers();
            let ejected = servers.iter().filter(|s| s.standing().ejected(now)).count();
            let room = servers.len() > 1 && ejected < max_ejected(outlier, servers.len());
            server.standing().failed(now, outlier, room)
        } else {
            server.standing().succeeded(now, outlier);
            Change::None
        };
        if let Change::Ejected(length) = change {
            server.handles.ejections.inc();
            tracing::warn!(route = %self.route, server = %server.label,
                failures = outlier.failures, ejected_for = %humantime::format_duration(length),
                "an upstream server failed requests in a row and is ejected");
        }
        server.show(now);
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        if let Some(task) = self
            .task
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
        {
            task.abort();
        }
    }
}

/// A server's score for a key: the highest wins.
fn rendezvous(seed: &[u8; 32], affinity: &[u8]) -> u64 {
    let hash = blake3::keyed_hash(seed, affinity);
    let bytes: [u8; 8] = hash.as_bytes()[..8].try_into().expect("8 bytes");
    u64::from_le_bytes(bytes)
}

impl Server {
    pub fn standing(&self) -> MutexGuard<'_, Standing> {
        self.standing.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn available(&self, now: Instant) -> bool {
        self.standing().available(now)
    }

    /// Sets the health gauge to where the server stands.
    pub fn show(&self, now: Instant) {
        self.handles.healthy.set(i64::from(self.available(now)));
    }

    /// Counts a request under way until the returned guard drops.
    pub fn begin(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight(self.clone())
    }

    /// Counts one try by the class of its status (`None`: no answer) and its time to the head.
    pub fn observe(&self, status: Option<http::StatusCode>, asked: Instant) {
        let class = match status.map(|s| s.as_u16() / 100) {
            Some(class @ 1..=5) => usize::from(class) - 1,
            _ => 5,
        };
        self.handles.classes[class].inc();
        self.handles.duration.observe(asked.elapsed().as_secs_f64());
    }

    /// The URI of `uri` (built on the route's first server) on this server.
    pub fn target(&self, uri: &Uri) -> Uri {
        if uri.authority() == self.url.authority() {
            return uri.clone();
        }
        let mut parts = uri.clone().into_parts();
        parts.authority = self.url.authority().cloned();
        Uri::from_parts(parts).unwrap_or_else(|_| uri.clone())
    }
}

/// A request under way on a server.
pub(super) struct InFlight(Arc<Server>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seeds(n: usize) -> Vec<(String, [u8; 32])> {
        (0..n)
            .map(|i| {
                let label = format!("10.0.0.{i}:80");
                let seed = *blake3::hash(label.as_bytes()).as_bytes();
                (label, seed)
            })
            .collect()
    }

    fn owner<'a>(servers: &'a [(String, [u8; 32])], key: &[u8]) -> &'a str {
        let (label, _) = servers
            .iter()
            .max_by_key(|(_, seed)| rendezvous(seed, key))
            .unwrap();
        label
    }

    #[test]
    fn rendezvous_hashing_moves_only_the_keys_of_a_server_that_left() {
        let four = seeds(4);
        let three: Vec<_> = four[..3].to_vec();
        let keys: Vec<[u8; 32]> = (0..4000u32)
            .map(|i| *blake3::hash(&i.to_le_bytes()).as_bytes())
            .collect();
        let mut owned = [0usize; 4];
        let mut moved = 0;
        for key in &keys {
            let before = owner(&four, key);
            let after = owner(&three, key);
            let index = four.iter().position(|(l, _)| l == before).unwrap();
            owned[index] += 1;
            if before != after {
                moved += 1;
                assert_eq!(before, four[3].0, "a key moved off a server that stayed");
            }
        }
        assert_eq!(moved, owned[3]);
        // An even share: 1000 each, give or take.
        for count in owned {
            assert!((850..=1150).contains(&count), "{owned:?}");
        }
        // The same answer every time (and on every replica: nothing random).
        assert!(keys.iter().all(|k| owner(&four, k) == owner(&seeds(4), k)));
    }
}
