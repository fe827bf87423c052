//! Every caching setting, defined once.
//!
//! A route inherits each of these from `defaults:` and may override it. The table in
//! [`caching_settings!`] is the one place a setting is written: its name (the YAML key and the
//! field everywhere), its type once checked, its default, what the file holds, how its text is
//! checked, and how `corral check` shows it. Each consumer expands the table with a macro of its
//! own, so adding a setting is one entry here:
//!
//! - the file schema: `PolicyFile`, and the same fields in `RouteFile` (`schema.rs`);
//! - validation: one `Layer` of the values a part of the file sets, a layer over another, a
//!   layer's text checked (`validate.rs`);
//! - the effective [`super::RoutePolicy`] and its `Default` (`mod.rs`);
//! - `corral check`'s description of a route (`describe.rs`).
//!
//! The engine's own policy is a projection of the effective one, written once in
//! [`super::RoutePolicy::engine`].
//!
//! A `macro_rules!` table rather than a derive or generated code: the pieces are plain structs
//! whose fields differ only in type (`Option<Text>` in the file, `Option<Set<T>>` in a layer, `T`
//! in the policy), and a table in one file needs neither a proc-macro crate nor a build script.
//! The entries' `check` and `show` are expressions read where they are expanded: the checkers in
//! `validate.rs`, the formats in `describe.rs`.

/// Calls `$consumer!` with every caching setting, in the order the file documents them. Each
/// entry: `/// doc` `name: Type = default, file: FileType, check: checker, show: Show;`.
macro_rules! caching_settings {
    ($consumer:ident) => {
        $consumer! {
            /// Freshness when the upstream says nothing (or is not honoured).
            ttl: Duration = Duration::from_secs(60),
                file: Text, check: parsed(duration), show: Always(duration);
            /// `Sliding` carries `ttl` as its window.
            expiry: ExpiryMode = ExpiryMode::Absolute,
                file: Text, check: parsed(expiry), show: Always(expiry);
            /// The upstream's `s-maxage` / `max-age` set freshness (clamped by min_ttl/max_ttl);
            /// privacy directives are obeyed whatever this says.
            honor_cache_control: bool = true,
                file: Text, check: parsed(boolean), show: Always(yes_no);
            /// Lower bound of freshness taken from upstream headers.
            min_ttl: Duration = Duration::ZERO,
                file: Text, check: parsed(duration), show: Always(duration);
            /// Upper bound of freshness taken from upstream headers.
            max_ttl: Duration = Duration::from_secs(365 * 86_400),
                file: Text, check: parsed(duration), show: Always(duration);
            /// How long a lease lives without a renewal.
            lease_ttl: Duration = Duration::from_secs(10),
                file: Text, check: parsed(positive_duration), show: Always(duration);
            /// The longest a fetch may run before it is abandoned.
            max_fetch: Duration = Duration::from_secs(30),
                file: Text, check: parsed(positive_duration), show: Always(duration);
            /// The longest any request waits, the leader's client included.
            wait_timeout: Duration = Duration::from_secs(10),
                file: Text, check: parsed(positive_duration), show: Always(duration);
            /// What a request that waited `wait_timeout` gets.
            on_wait_timeout: OnWaitTimeout = OnWaitTimeout::Error,
                file: Text, check: parsed(on_wait_timeout), show: Always(on_wait_timeout);
            /// How often a follower looks at the store when no event came.
            poll_interval: Duration = Duration::from_secs(1),
                file: Text, check: parsed(positive_duration), show: Always(duration);
            /// Larger responses stream through and are not stored; also the largest request body
            /// read for a body key.
            max_body: u64 = 8 << 20,
                file: Text, check: parsed(size), show: Always(size);
            /// How long a hit-for-pass marker sends a key's requests straight through.
            pass_ttl: Duration = Duration::from_secs(120),
                file: Text, check: parsed(duration), show: Always(duration);
            /// Upstream statuses that may be stored.
            cache_statuses: Vec<u16> = vec![200, 203, 204, 300, 301, 404, 405, 410, 414, 501],
                file: Spanned<Vec<Text>>, check: Checker::statuses, show: Always(statuses);
            /// A client's `Cache-Control: no-store` sends its request straight through.
            honor_client_no_store: bool = true,
                file: Text, check: parsed(boolean), show: Always(yes_no);
            /// Each stored entry's TTL is cut by a random 0 to this many percent (0 to 100), so
            /// keys filled together do not all expire together.
            ttl_jitter: u8 = 0,
                file: Text, check: parsed(percent), show: WhenSet(percent_of);
            /// Negative caching: statuses stored for exactly this long, whether or not
            /// `cache_statuses` lists them and whatever the upstream's freshness says (privacy
            /// still applies). A 5xx listed here is stored and shared instead of failing the
            /// flight. Empty (the default): off.
            error_ttl: BTreeMap<u16, Duration> = BTreeMap::new(),
                file: Spanned<HashMap<Text, Text>>, check: Checker::error_ttl,
                show: WhenSet(error_ttl);
            /// What a `Vary` naming request headers outside the key does.
            vary: VaryMode = VaryMode::Key,
                file: Text, check: parsed(vary), show: WhenSet(vary);
            /// The most variants one key holds (`Vary` on request headers); a response that
            /// would make one more is passed (`detail=max-variants`).
            max_variants: usize = 16,
                file: Text, check: parsed(count), show: WhenSet(count);
            /// Content encoding on cacheable fetches: the codings asked of the upstream, and the
            /// identity answers compressed once when stored.
            encoding: Encoding = Encoding::default(),
                file: Spanned<EncodingFile>, check: Checker::encoding, show: WhenSet(encoding);
            /// How long past freshness a stored answer is served at once while one background
            /// refresh runs (zero: off). The upstream's `stale-while-revalidate` directive
            /// overrides it when the route honours `Cache-Control`.
            stale_while_revalidate: Duration = Duration::ZERO,
                file: Text, check: parsed(duration), show: WhenSet(duration);
            /// How long past freshness a stored answer stands in for a failed refresh (5xx,
            /// unreachable, timeout); zero: off. The upstream's `stale-if-error` directive
            /// overrides it likewise.
            stale_if_error: Duration = Duration::ZERO,
                file: Text, check: parsed(duration), show: WhenSet(duration);
            /// Early refresh (probabilistic early expiration): a hit may refresh a fresh answer
            /// in the background before it expires. `None`: off.
            early_refresh: Option<Beta> = None,
                file: Text, check: parsed(early_refresh), show: WhenSet(beta);
            /// Requests that may wait on one key's fetch on one replica besides the one that
            /// started it; beyond: a stale copy if the store has one, else 503 with
            /// `Retry-After`.
            max_followers: usize = 10_000,
                file: Text, check: parsed(count), show: HeadIfCached(count);
            /// Upstream requests of this route in flight at once on one replica (fetches under
            /// the lease, a request's own fetches and pass-throughs alike); beyond, a request
            /// waits for a slot within its wait timeout, then gets 503.
            max_upstream_fetches: usize = 512,
                file: Text, check: parsed(count), show: Head(count);
            /// Longest wait to connect to the upstream: TCP and, for https, the TLS handshake.
            /// At most `max_fetch`; left out, 5s or `max_fetch` if shorter.
            connect_timeout: Duration = Duration::from_secs(5),
                file: Text, check: parsed(positive_duration), show: Head(duration);
            /// Longest wait from sending a request upstream (its connect included) to the
            /// response head. At most `max_fetch`; left out, 30s or `max_fetch` if shorter.
            response_header_timeout: Duration = Duration::from_secs(30),
                file: Text, check: parsed(positive_duration), show: Head(duration);
            /// Longest silence between two chunks of an upstream response body. At most
            /// `max_fetch`; left out, 30s or `max_fetch` if shorter.
            read_timeout: Duration = Duration::from_secs(30),
                file: Text, check: parsed(positive_duration), show: Head(duration);
            /// What a cacheable request gets while the store cannot be reached: `Open` degrades
            /// to one fetch per key per replica, `Closed` answers 503.
            on_store_error: OnStoreError = OnStoreError::Open,
                file: Text, check: parsed(on_store_error), show: WhenSet(on_store_error);
            /// What the route follows: `Coalescing` (corral's own defaults: the route's `ttl`
            /// for answers without freshness) or `Rfc9111`, a standard shared cache whose
            /// freshness comes only from the upstream.
            semantics: Semantics = Semantics::Coalescing,
                file: Text, check: parsed(semantics), show: WhenSet(semantics);
            /// Heuristic freshness (RFC 9111 section 4.2.2): this percentage of the time since
            /// `Last-Modified`, for an answer the upstream gave no freshness; 0 (`off`): none.
            heuristic: u8 = 0,
                file: Text, check: parsed(heuristic), show: WhenSet(heuristic);
            /// The longest heuristic freshness.
            heuristic_max: Duration = Duration::from_secs(86_400),
                file: Text, check: parsed(positive_duration), show: WhenSet(duration);
            /// What a cacheable request's cookies outside the key do: bypass the cache, or be
            /// stripped (all, or those whose names match) from the shared fetch.
            cookies: CookieMode = CookieMode::Bypass,
                file: Spanned<CookiesFile>, check: Checker::cookie_mode,
                show: WhenSet(cookie_mode);
        }
    };
}

pub(super) use caching_settings;
