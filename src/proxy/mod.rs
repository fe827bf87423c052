//! The proxy: route match, key, policy, then the engine; or straight through. One phase a file,
//! in the order a request meets them:
//!
//! - `authority`: one canonical `Host` per request, before the route match reads it.
//! - `route`: which route a request takes.
//! - `handler`: one request from arrival to answer: verdict, key, the engine call, metrics and
//!   the access log.
//! - `fetch`: the leader's upstream call for a key, and what becomes of its answer.
//! - `variant`: answers that vary outside the key, stored as variants on `vary: honor` routes.
//! - `direct`: the pass-through for requests that may not use the cache.
//! - `respond`: the one place an answer or an error becomes a response, with `Age`, `X-Cache`
//!   and `Cache-Status`, and the [`Outcome`] the metrics count.
//! - `upstream`, `retire`, `slots`: the pooled client, connections taken out of the pool after a
//!   bad answer, and each route's upstream slots (fills and passes apart).
//! - `access`: the access log line, written once the response body is done.
//!
//! A cacheable request becomes a flight in the engine. The leader's upstream fetch is the flight's
//! build: a storable answer is committed and shared; a private one (Set-Cookie, `private`,
//! `no-store`, a `Vary` outside the key, a body over `max_body`) goes back to its own client only,
//! and every other waiting request fetches for itself; a 5xx or an unreachable upstream fails the
//! flight, and everyone who joined gets the same answer at once.
//!
//! Keys carry their route's generation (bumped by a whole-route purge), and the leader records
//! each key in the store's purge indexes (its route's path index when the fetch starts, so a
//! prefix purge during the fetch steals its lease; its surrogate tags once the answer is known).
//! A successful unsafe request (POST, PUT, PATCH, DELETE) that passed through a cached route
//! purges the GET and HEAD keys of its URL (RFC 9111 section 4.4).
//!
//! An answer that varies on request headers outside the key (any on a `vary: honor` route, those
//! it forwards unkeyed on others; never `Accept-Encoding`) is stored as a variant, at most
//! `max_variants` per key, and a request that finds a marker at its key resolves its own variant
//! next.
//!
//! Content encoding is corral's own on cacheable fetches: the upstream is asked for the route's
//! codings, an identity answer worth it is compressed once when stored, and each client gets a
//! stored representation it accepts, or one decoded as it streams (`encoding`).
//! Purge indexes name the request key (the variant marker's): purging it orphans its variants,
//! since every variant key holds the marker's id.

mod access;
mod authority;
mod direct;
mod encoding;
mod fetch;
mod handler;
mod ids;
mod respond;
mod retire;
mod route;
mod slots;
mod upstream;
mod variant;

use std::sync::{Arc, PoisonError, RwLock};

use axum::Router;
use http::{HeaderMap, Method, Uri};

use crate::config::Config;
use crate::engine::{Engine, Invalidation, Policy};
use crate::http::key::{request_digest, request_digest_and_query};
use crate::key::{Key, key_with_generation};
pub use handler::handle;
pub use respond::Outcome;
pub use respond::header_map;
pub use route::route_for;
use slots::UpstreamSlots;
use upstream::Upstream;

/// Everything a request needs; shared by every request of one replica.
pub struct Proxy {
    pub engine: Engine,
    upstream: Upstream,
    /// The config requests start under. A reload swaps in a whole new snapshot at once; a request
    /// holds the one it started with until it ends, so it never sees half of each.
    ///
    /// A lock around an `Arc` rather than a lock-free swap: readers hold it only to clone the
    /// `Arc` (one uncontended read lock per request), and writers come once per reload.
    live: RwLock<Arc<Snapshot>>,
    /// Whether the server serves its config yet (or is shutting down), for `/readyz`.
    pub lifecycle: crate::lifecycle::Lifecycle,
    /// Each route's upstream requests in flight on this replica (`max_upstream_fetches`).
    slots: UpstreamSlots,
}

/// Exports every route's series at zero from the start, so dashboards and rates see a route's
/// first requests (a route a reload adds included).
fn add_routes(engine: &Engine, config: &Config) {
    for route in &config.routes {
        engine.metrics().add_route(route.name.as_str());
    }
}

/// One config as requests use it: the routes, and each route's engine policy.
pub struct Snapshot {
    pub config: Arc<Config>,
    /// The engine policy of each route, in route order.
    policies: Vec<Policy>,
}

impl Snapshot {
    fn new(config: Arc<Config>) -> Self {
        let policies = config
            .routes
            .iter()
            .map(|route| route.policy.engine(&route.name))
            .collect();
        Self { config, policies }
    }
}

impl Proxy {
    pub fn new(config: Arc<Config>, engine: Engine) -> Self {
        add_routes(&engine, &config);
        Self {
            upstream: Upstream::new(&config, engine.metrics()),
            engine,
            live: RwLock::new(Arc::new(Snapshot::new(config))),
            lifecycle: crate::lifecycle::Lifecycle::new(),
            slots: UpstreamSlots::default(),
        }
    }

    /// The config new requests start under.
    pub fn config(&self) -> Arc<Config> {
        self.snapshot().config.clone()
    }

    /// The snapshot new requests start under.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        // A poisoned lock still holds a whole snapshot: the swap is one assignment.
        self.live
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Switches new requests to `config`; requests in flight finish under the one they started
    /// with. The caller has decided what of `config` may change without a restart.
    pub fn replace(&self, config: Config) {
        add_routes(&self.engine, &config);
        self.upstream.prepare(&config);
        let snapshot = Arc::new(Snapshot::new(Arc::new(config)));
        *self.live.write().unwrap_or_else(PoisonError::into_inner) = snapshot;
    }

    /// The key of a request on `route`, under the route's current generation.
    pub fn key(
        &self,
        route: &crate::config::Route,
        method: &Method,
        uri: &Uri,
        headers: &HeaderMap,
        body: Option<&[u8]>,
    ) -> Key {
        let key = request_digest(route, method, uri, headers, body);
        key_with_generation(key, self.engine.generation(&route.name))
    }

    /// [`Proxy::key`], and the query to forward ([`crate::http::key::forwarded_query`]) from the same
    /// parsing of the request's query.
    fn key_and_query(
        &self,
        route: &crate::config::Route,
        method: &Method,
        uri: &Uri,
        headers: &HeaderMap,
        body: Option<&[u8]>,
    ) -> (Key, Option<String>) {
        let (key, query) = request_digest_and_query(route, method, uri, headers, body);
        let key = key_with_generation(key, self.engine.generation(&route.name));
        (key, query)
    }

    /// Purges the GET and HEAD keys of `uri` (as this client would key them) on every replica,
    /// after a successful unsafe request to it. Only what the URL and these headers determine is
    /// purged: variants keyed on other header or cookie values stay until they expire. A HEAD
    /// keys as a GET, so where both methods take one route there is one key to purge.
    async fn invalidate_url(&self, uri: &Uri, headers: &HeaderMap) {
        let config = self.config();
        let mut routes = Vec::with_capacity(2);
        for method in [Method::GET, Method::HEAD] {
            let Some(index) = route_for(&config, &method, uri, headers) else {
                continue;
            };
            let route = &config.routes[index];
            if !route.cache || routes.contains(&index) {
                continue;
            }
            routes.push(index);
            let body = route.key.body.then_some(&[][..]);
            let key = self.key(route, &method, uri, headers, body);
            let metrics = self.engine.metrics();
            metrics.purges.with_label_values(&["unsafe_method"]).inc();
            // A store that does not take it now: the engine retries it and counts a loss.
            if let Invalidation::Purged { existed } =
                self.engine.invalidate(&route.name, &key.hash).await
            {
                metrics
                    .purged_keys
                    .with_label_values(&["unsafe_method"])
                    .inc_by(u64::from(existed));
            }
        }
    }
}

/// The router of the public listener: every path goes to [`handle`].
pub fn app(proxy: Arc<Proxy>) -> Router {
    Router::new().fallback(handle).with_state(proxy)
}
