use std::collections::HashSet;

use http::header::{ACCEPT, AUTHORIZATION};

use super::*;
use crate::http::testing::{headers, names, route, route_with};
use RequestVerdict::{Bypass, Cache};
use ResponseVerdict::Pass;

fn secs(n: u64) -> Duration {
    Duration::from_secs(n)
}

fn request(route: &Route, method: Method, lines: &[(&str, &str)]) -> RequestVerdict {
    request_verdict(route, &method, &headers(lines))
}

fn get(route: &Route, lines: &[(&str, &str)]) -> RequestVerdict {
    request(route, Method::GET, lines)
}

fn response(route: &Route, status: u16, lines: &[(&str, &str)]) -> ResponseVerdict {
    response_verdict(
        route,
        StatusCode::from_u16(status).expect("status"),
        &headers(lines),
    )
}

fn ok(lines: &[(&str, &str)]) -> ResponseVerdict {
    response(&route(), 200, lines)
}

fn stored(ttl: u64) -> ResponseVerdict {
    ResponseVerdict::Store { ttl: secs(ttl) }
}

// -----------------------------------------------------------------------------------------
// Stale windows

fn windows(r: &Route, lines: &[(&str, &str)]) -> (u64, u64) {
    let w = stale_windows(r, &headers(lines));
    (w.while_revalidate.as_secs(), w.if_error.as_secs())
}

fn stale_route() -> Route {
    route_with(|r| {
        r.policy.stale_while_revalidate = secs(30);
        r.policy.stale_if_error = secs(600);
    })
}

#[test]
fn stale_windows_come_from_the_route_or_the_upstream_when_honoured() {
    assert_eq!(windows(&route(), &[]), (0, 0));
    assert_eq!(windows(&stale_route(), &[]), (30, 600));
    let directives = [(
        "cache-control",
        "max-age=5, stale-while-revalidate=7, stale-if-error=9",
    )];
    assert_eq!(windows(&route(), &directives), (7, 9));
    let ignoring = route_with(|r| {
        r.policy.honor_cache_control = false;
        r.policy.stale_while_revalidate = secs(30);
    });
    assert_eq!(windows(&ignoring, &directives), (30, 0));
}

#[test]
fn revalidation_directives_forbid_serving_stale() {
    for forbids in ["must-revalidate", "proxy-revalidate", "no-cache"] {
        let line = format!("max-age=5, {forbids}, stale-if-error=9");
        assert_eq!(
            windows(&stale_route(), &[("cache-control", &line)]),
            (0, 0),
            "{forbids}"
        );
    }
    // s-maxage implies proxy-revalidate for a shared cache: no stale-if-error, but an explicit
    // stale-while-revalidate beside it stands.
    let shared = [("cache-control", "s-maxage=5, stale-while-revalidate=7")];
    assert_eq!(windows(&stale_route(), &shared), (7, 0));
}

#[test]
fn sliding_routes_have_no_stale_windows() {
    let sliding = route_with(|r| {
        r.policy.expiry = ExpiryMode::Sliding { window: secs(60) };
        r.policy.stale_while_revalidate = secs(30);
    });
    assert_eq!(windows(&sliding, &[]), (0, 0));
}

// -----------------------------------------------------------------------------------------
// Requests

#[test]
fn a_plain_get_or_head_is_cached() {
    assert_eq!(get(&route(), &[]), Cache);
    assert_eq!(request(&route(), Method::HEAD, &[]), Cache);
}

#[test]
fn a_route_without_cache_bypasses_everything() {
    let r = route_with(|r| r.cache = false);
    assert_eq!(get(&r, &[]), Bypass("route-not-cached"));
}

#[test]
fn post_is_cached_only_when_the_route_keys_the_body() {
    assert_eq!(request(&route(), Method::POST, &[]), Bypass("method"));
    let r = route_with(|r| r.key.body = true);
    assert_eq!(request(&r, Method::POST, &[("content-length", "5")]), Cache);
    for method in [Method::PUT, Method::DELETE, Method::PATCH, Method::OPTIONS] {
        assert_eq!(request(&r, method, &[]), Bypass("method"));
    }
}

#[test]
fn a_body_the_key_does_not_see_bypasses() {
    let r = route();
    assert_eq!(get(&r, &[("content-length", "12")]), Bypass("unkeyed-body"));
    assert_eq!(
        get(&r, &[("transfer-encoding", "chunked")]),
        Bypass("unkeyed-body")
    );
    assert_eq!(
        get(&r, &[("content-length", "junk")]),
        Bypass("unkeyed-body")
    );
    assert_eq!(get(&r, &[("content-length", "0")]), Cache);
}

#[test]
fn upgrades_bypass() {
    assert_eq!(
        get(
            &route(),
            &[("connection", "upgrade"), ("upgrade", "websocket")]
        ),
        Bypass("upgrade")
    );
}

#[test]
fn authorization_bypasses_unless_keyed() {
    assert_eq!(
        get(&route(), &[("authorization", "Bearer x")]),
        Bypass("authorization")
    );
    let keyed = route_with(|r| r.key.headers = vec![AUTHORIZATION]);
    assert_eq!(get(&keyed, &[("authorization", "Bearer x")]), Cache);
    let other = route_with(|r| r.key.headers = vec![ACCEPT]);
    assert_eq!(
        get(&other, &[("authorization", "Bearer x")]),
        Bypass("authorization")
    );
}

#[test]
fn cookies_bypass_unless_every_one_is_keyed() {
    assert_eq!(get(&route(), &[("cookie", "lang=en")]), Bypass("cookie"));
    assert_eq!(get(&route(), &[("cookie", "")]), Bypass("cookie"));

    let r = route_with(|r| r.key.cookies = names(&["lang"]));
    assert_eq!(get(&r, &[("cookie", "lang=en")]), Cache);
    assert_eq!(
        get(&r, &[("cookie", "lang=en"), ("cookie", "lang=fr")]),
        Cache
    );
    assert_eq!(get(&r, &[("cookie", "")]), Cache);
    assert_eq!(
        get(&r, &[("cookie", "lang=en; session=s3cr3t")]),
        Bypass("cookie")
    );
    assert_eq!(
        get(&r, &[("cookie", "lang=en"), ("cookie", "sid=1")]),
        Bypass("cookie")
    );
    assert_eq!(get(&r, &[("cookie", "LANG=en")]), Bypass("cookie"));
    assert_eq!(
        get(&r, &[("cookie", "lang")]),
        Bypass("cookie"),
        "a nameless cookie"
    );
}

#[test]
fn keying_the_whole_cookie_header_admits_any_cookie() {
    let r = route_with(|r| r.key.headers = vec![header::COOKIE]);
    assert_eq!(get(&r, &[("cookie", "session=s3cr3t; lang=en")]), Cache);
}

#[test]
fn client_no_store_bypasses_when_the_route_honours_it() {
    let lines = [("cache-control", "max-age=0, No-Store")];
    assert_eq!(get(&route(), &lines), Bypass("client-no-store"));
    let r = route_with(|r| r.policy.honor_client_no_store = false);
    assert_eq!(get(&r, &lines), Cache);
    assert_eq!(get(&route(), &[("cache-control", "no-cache")]), Cache);
}

#[test]
fn range_requests_bypass() {
    assert_eq!(get(&route(), &[("range", "bytes=0-99")]), Bypass("range"));
}

#[test]
fn bypass_reasons_fit_in_a_cache_status_detail() {
    let reasons = [
        get(&route_with(|r| r.cache = false), &[]),
        request(&route(), Method::PUT, &[]),
        get(&route(), &[("upgrade", "h2c")]),
        get(&route(), &[("content-length", "1")]),
        get(&route(), &[("authorization", "x")]),
        get(&route(), &[("cookie", "a=1")]),
        get(&route(), &[("cache-control", "no-store")]),
        get(&route(), &[("range", "bytes=0-1")]),
    ];
    for verdict in reasons {
        let Bypass(reason) = verdict else {
            panic!("expected a bypass, got {verdict:?}")
        };
        assert!(
            reason.bytes().all(|b| b.is_ascii_lowercase() || b == b'-'),
            "{reason}"
        );
    }
}

// -----------------------------------------------------------------------------------------
// Responses: privacy

#[test]
fn set_cookie_is_never_shared() {
    assert_eq!(ok(&[("set-cookie", "sid=1")]), Pass("set-cookie"));
    let ignoring = route_with(|r| r.policy.honor_cache_control = false);
    assert_eq!(
        response(&ignoring, 200, &[("set-cookie", "sid=1")]),
        Pass("set-cookie")
    );
}

#[test]
fn private_and_no_store_are_never_shared_even_when_cache_control_is_ignored() {
    let ignoring = route_with(|r| r.policy.honor_cache_control = false);
    for r in [route(), ignoring] {
        let v = |cc: &str| response(&r, 200, &[("cache-control", cc)]);
        assert_eq!(v("private"), Pass("private"));
        assert_eq!(v("PRIVATE, max-age=60"), Pass("private"));
        assert_eq!(
            v("private=\"set-cookie, x-user\", max-age=60"),
            Pass("private")
        );
        assert_eq!(v("no-store"), Pass("no-store"));
        assert_eq!(v("public, s-maxage=60, No-Store"), Pass("no-store"));
    }
}

#[test]
fn privacy_directives_count_in_any_cache_control_header() {
    assert_eq!(
        ok(&[
            ("cache-control", "max-age=60"),
            ("cache-control", "private")
        ]),
        Pass("private")
    );
}

#[test]
fn vary_star_is_never_shared() {
    assert_eq!(ok(&[("vary", "*")]), Pass("vary-star"));
    assert_eq!(
        ok(&[("vary", "accept"), ("vary", " * ")]),
        Pass("vary-star")
    );
}

#[test]
fn vary_outside_the_key_is_never_shared() {
    assert_eq!(ok(&[("vary", "Accept")]), Pass("vary"));
    let r = route_with(|r| r.key.headers = vec![ACCEPT]);
    assert_eq!(response(&r, 200, &[("vary", "Accept")]), stored(60));
    assert_eq!(response(&r, 200, &[("vary", "accept, ,")]), stored(60));
    assert_eq!(
        response(&r, 200, &[("vary", "accept"), ("vary", "user-agent")]),
        Pass("vary")
    );
}

#[test]
fn vary_accept_encoding_never_passes_nor_makes_variants() {
    assert_eq!(ok(&[("vary", "accept-encoding")]), stored(60));
    assert_eq!(ok(&[("vary", "Accept-Encoding"), ("vary", "")]), stored(60));
    let honor = route_with(|r| r.policy.vary = VaryMode::Honor);
    let lines = [("vary", "accept-encoding, x-a")];
    assert_eq!(
        vary_outside_key(&honor, &headers(&lines)),
        Some(vec![HeaderName::from_static("x-a")])
    );
    let r = route_with(|r| r.key.headers = vec![ACCEPT]);
    assert_eq!(
        response(&r, 200, &[("vary", "accept, accept-encoding")]),
        stored(60)
    );
    assert_eq!(ok(&[("vary", "accept-encoding, *")]), Pass("vary-star"));
}

#[test]
fn vary_on_a_header_the_route_forwards_makes_variants() {
    let r = route_with(|r| r.forward_unkeyed = vec![HeaderName::from_static("x-tenant")]);
    let lines = [("vary", "X-Tenant, accept-encoding")];
    assert_eq!(response(&r, 200, &lines), stored(60));
    assert_eq!(
        vary_outside_key(&r, &headers(&lines)),
        Some(vec![HeaderName::from_static("x-tenant")])
    );
    // One name it does not forward is enough to pass: the upstream was never sent it.
    assert_eq!(
        response(&r, 200, &[("vary", "x-tenant, user-agent")]),
        Pass("vary")
    );
}

#[test]
fn vary_on_what_the_key_reads_is_fine() {
    let cookies = route_with(|r| r.key.cookies = names(&["lang"]));
    assert_eq!(response(&cookies, 200, &[("vary", "Cookie")]), stored(60));
    let body = route_with(|r| r.key.body = true);
    assert_eq!(
        response(&body, 200, &[("vary", "content-type")]),
        stored(60)
    );
    assert_eq!(ok(&[("vary", "cookie")]), Pass("vary"));
}

// -----------------------------------------------------------------------------------------
// Responses: status and freshness

#[test]
fn only_listed_statuses_are_stored() {
    assert_eq!(response(&route(), 404, &[]), stored(60));
    assert_eq!(response(&route(), 302, &[]), Pass("status"));
    assert_eq!(response(&route(), 206, &[]), Pass("status"));
}

#[test]
fn without_directives_the_route_ttl_applies() {
    assert_eq!(ok(&[]), stored(60));
    assert_eq!(ok(&[("cache-control", "public")]), stored(60));
    assert_eq!(ok(&[("age", "30")]), stored(60));
}

#[test]
fn max_age_sets_freshness() {
    assert_eq!(ok(&[("cache-control", "max-age=300")]), stored(300));
    assert_eq!(ok(&[("cache-control", "MAX-AGE = \"120\"")]), stored(120));
}

#[test]
fn s_maxage_wins_over_max_age() {
    assert_eq!(
        ok(&[("cache-control", "max-age=10, s-maxage=300")]),
        stored(300)
    );
    assert_eq!(
        ok(&[("cache-control", "s-maxage=5, max-age=300")]),
        stored(5)
    );
}

#[test]
fn invalid_ages_are_ignored() {
    assert_eq!(ok(&[("cache-control", "max-age=abc")]), stored(60));
    assert_eq!(ok(&[("cache-control", "max-age=-5")]), stored(60));
    assert_eq!(ok(&[("cache-control", "max-age")]), stored(60));
    assert_eq!(
        ok(&[("cache-control", "s-maxage=x, max-age=30")]),
        stored(30)
    );
    assert_eq!(
        ok(&[("cache-control", "max-age=30"), ("age", "junk")]),
        stored(30)
    );
}

#[test]
fn a_repeated_max_age_takes_the_smaller() {
    assert_eq!(
        ok(&[("cache-control", "max-age=300, max-age=30")]),
        stored(30)
    );
}

#[test]
fn the_upstream_age_is_subtracted() {
    assert_eq!(
        ok(&[("cache-control", "max-age=300"), ("age", "100")]),
        stored(200)
    );
    assert_eq!(
        ok(&[("cache-control", "max-age=300"), ("age", "500")]),
        Pass("zero-ttl")
    );
}

#[test]
fn the_first_member_of_age_counts_and_an_invalid_one_is_ignored() {
    let fresh = |lines: &[(&str, &str)]| {
        let mut all = vec![("cache-control", "max-age=300")];
        all.extend_from_slice(lines);
        ok(&all)
    };
    // RFC 9111 section 5.1: a list's first member, on one line or several.
    assert_eq!(fresh(&[("age", "7200, 0")]), Pass("zero-ttl"));
    assert_eq!(fresh(&[("age", "100"), ("age", "500")]), stored(200));
    assert_eq!(fresh(&[("age", " 100 ,junk")]), stored(200));
    // An invalid first member: the field is ignored, not the next member taken.
    assert_eq!(fresh(&[("age", "junk, 100")]), stored(300));
    assert_eq!(fresh(&[("age", "-5")]), stored(300));
}

#[test]
fn the_corrected_age_adds_the_response_delay_to_the_upstreams() {
    let mut headers = HeaderMap::new();
    headers.append(header::AGE, HeaderValue::from_static("30, 4"));
    headers.append(header::AGE, HeaderValue::from_static("9"));
    correct_age(&mut headers, Duration::from_millis(2500));
    let ages: Vec<_> = headers.get_all(header::AGE).iter().collect();
    assert_eq!(ages, [HeaderValue::from_static("32")]);

    let mut quick = HeaderMap::new();
    correct_age(&mut quick, Duration::from_millis(300));
    assert!(!quick.contains_key(header::AGE), "{quick:?}");
}

#[test]
fn freshness_is_clamped_by_the_route() {
    let r = route_with(|r| {
        r.policy.min_ttl = secs(10);
        r.policy.max_ttl = secs(600);
    });
    let v = |lines: &[(&str, &str)]| response(&r, 200, lines);
    assert_eq!(v(&[("cache-control", "max-age=86400")]), stored(600));
    assert_eq!(v(&[("cache-control", "max-age=1")]), stored(10));
    assert_eq!(v(&[("cache-control", "max-age=0")]), stored(10));
    assert_eq!(
        v(&[("cache-control", "max-age=99999999999999999999999")]),
        stored(600)
    );
    assert_eq!(
        v(&[("cache-control", "max-age=100"), ("age", "95")]),
        stored(10)
    );
}

#[test]
fn no_cache_passes_when_honoured() {
    assert_eq!(
        ok(&[("cache-control", "no-cache, max-age=60")]),
        Pass("no-cache")
    );
    assert_eq!(
        ok(&[("cache-control", "no-cache=\"x-foo\"")]),
        Pass("no-cache")
    );
}

#[test]
fn expires_sets_freshness_from_the_date_header() {
    let at = |expires: &str| {
        ok(&[
            ("date", "Sun, 06 Nov 1994 08:49:37 GMT"),
            ("expires", expires),
        ])
    };
    assert_eq!(at("Sun, 06 Nov 1994 08:51:37 GMT"), stored(120));
    assert_eq!(at("Sunday, 06-Nov-94 08:51:37 GMT"), stored(120));
    assert_eq!(at("Sun, 06 Nov 1994 08:00:00 GMT"), Pass("zero-ttl"));
    assert_eq!(
        at("0"),
        Pass("zero-ttl"),
        "an invalid Expires is in the past"
    );
    assert_eq!(
        ok(&[
            ("date", "Sun, 06 Nov 1994 08:49:37 GMT"),
            ("expires", "Sun, 06 Nov 1994 08:51:37 GMT"),
            ("age", "20"),
        ]),
        stored(100)
    );
    assert_eq!(
        ok(&[
            ("cache-control", "max-age=30"),
            ("expires", "Sun, 06 Nov 1994 08:51:37 GMT"),
        ]),
        stored(30),
        "max-age wins over Expires"
    );
}

#[test]
fn not_honouring_cache_control_uses_the_route_ttl() {
    let r = route_with(|r| r.policy.honor_cache_control = false);
    let v = |lines: &[(&str, &str)]| response(&r, 200, lines);
    assert_eq!(v(&[("cache-control", "max-age=5")]), stored(60));
    assert_eq!(v(&[("cache-control", "no-cache")]), stored(60));
    assert_eq!(v(&[("expires", "0")]), stored(60));
    assert_eq!(v(&[("cache-control", "private")]), Pass("private"));
}

#[test]
fn a_zero_ttl_passes() {
    assert_eq!(ok(&[("cache-control", "max-age=0")]), Pass("zero-ttl"));
    let r = route_with(|r| r.policy.ttl = Duration::ZERO);
    assert_eq!(response(&r, 200, &[]), Pass("zero-ttl"));
}

#[test]
fn crossed_clamps_never_panic_and_max_wins() {
    let r = route_with(|r| {
        r.policy.min_ttl = secs(100);
        r.policy.max_ttl = secs(50);
    });
    assert_eq!(
        response(&r, 200, &[("cache-control", "max-age=70")]),
        stored(50)
    );
}

#[test]
fn an_error_ttl_stores_its_status_for_that_long() {
    let r = route_with(|r| {
        r.policy.error_ttl = [(404, secs(30)), (503, secs(2)), (429, secs(5))].into();
    });
    assert_eq!(response(&r, 404, &[]), stored(30));
    assert_eq!(
        response(&r, 404, &[("cache-control", "max-age=600")]),
        stored(30)
    );
    assert_eq!(response(&r, 503, &[]), stored(2));
    assert_eq!(response(&r, 429, &[]), stored(5), "not in cache_statuses");
    assert_eq!(response(&r, 410, &[]), stored(60), "not listed: as before");
    assert_eq!(
        response(&r, 404, &[("set-cookie", "a=1")]),
        Pass("set-cookie")
    );
    assert_eq!(
        response(&r, 503, &[("cache-control", "private")]),
        Pass("private")
    );
    assert_eq!(
        response(&r, 404, &[("cache-control", "no-store")]),
        Pass("no-store")
    );
    assert_eq!(response(&r, 404, &[("vary", "*")]), Pass("vary-star"));
}

#[test]
fn jitter_cuts_the_ttl_by_at_most_its_percentage() {
    use rand::SeedableRng;
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let ttl = secs(100);
    let draws: Vec<Duration> = (0..1000).map(|_| jittered(ttl, 10, &mut rng)).collect();
    for d in &draws {
        assert!(*d <= ttl && *d >= secs(90), "{d:?} outside [90s, 100s]");
    }
    let distinct: HashSet<Duration> = draws.iter().copied().collect();
    assert!(
        distinct.len() > 100,
        "only {} distinct TTLs",
        distinct.len()
    );
    assert!(draws.iter().any(|d| *d < secs(92)), "never near the bottom");
    assert!(draws.iter().any(|d| *d > secs(98)), "never near the top");

    assert_eq!(jittered(ttl, 0, &mut rng), ttl, "0% leaves it alone");
    for _ in 0..100 {
        let d = jittered(secs(1), 100, &mut rng);
        assert!(d >= Duration::from_millis(1) && d <= secs(1), "{d:?}");
    }
}

#[test]
fn vary_honor_stores_what_varies_outside_the_key_as_variants() {
    use crate::config::VaryMode;
    let r = route_with(|r| {
        r.key.headers = vec![ACCEPT];
        r.policy.vary = VaryMode::Honor;
    });
    let lines = [("vary", "Accept, Accept-Language, x-a, accept-language")];
    assert_eq!(response(&r, 200, &lines), stored(60));
    let names = vary_outside_key(&r, &headers(&lines)).expect("readable names");
    assert_eq!(names, ["accept-language", "x-a"]);
    assert_eq!(response(&r, 200, &[("vary", "*")]), Pass("vary-star"));
    assert_eq!(response(&r, 200, &[("vary", "a b")]), Pass("vary"));
    assert_eq!(
        vary_outside_key(&r, &headers(&[("vary", "accept")])),
        Some(vec![])
    );
    assert_eq!(
        response(&r, 200, &[("vary", "x-a"), ("set-cookie", "s=1")]),
        Pass("set-cookie")
    );
}

// -----------------------------------------------------------------------------------------
// Cache-Control parsing
