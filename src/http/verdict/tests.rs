use std::collections::HashSet;

use http::header::{ACCEPT, AUTHORIZATION};

use super::*;
use crate::config::Semantics;
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
fn range_requests_use_the_cache() {
    assert_eq!(get(&route(), &[("range", "bytes=0-99")]), Cache);
    assert_eq!(
        get(&route(), &[("range", "bytes=0-1"), ("if-range", "\"v1\"")]),
        Cache
    );
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
fn a_206_is_never_stored_even_when_the_route_lists_it() {
    let listed = route_with(|r| {
        r.policy.cache_statuses.push(206);
        r.policy.error_ttl.insert(206, Duration::from_secs(5));
    });
    assert_eq!(response(&listed, 206, &[]), Pass("status"));
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
        stored(0)
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
    assert_eq!(fresh(&[("age", "7200, 0")]), stored(0));
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
fn no_cache_is_stored_without_freshness_when_honoured() {
    // Revalidated on every use; field names do not narrow it: the whole answer is revalidated.
    assert_eq!(ok(&[("cache-control", "no-cache, max-age=60")]), stored(0));
    assert_eq!(ok(&[("cache-control", "no-cache=\"x-foo\"")]), stored(0));
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
    assert_eq!(at("Sun, 06 Nov 1994 08:00:00 GMT"), stored(0));
    assert_eq!(at("0"), stored(0), "an invalid Expires is in the past");
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
fn a_zero_lifetime_is_stored_to_be_revalidated_on_every_use() {
    assert_eq!(ok(&[("cache-control", "max-age=0")]), stored(0));
    let r = route_with(|r| r.policy.ttl = Duration::ZERO);
    assert_eq!(response(&r, 200, &[]), stored(0));
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

// -----------------------------------------------------------------------------------------
// Cookies per route

#[test]
fn strip_shares_a_request_whatever_its_unkeyed_cookies() {
    use crate::config::CookieMode;
    let strip = route_with(|r| r.policy.cookies = CookieMode::Strip);
    assert_eq!(get(&strip, &[("cookie", "sid=1; _ga=GA1.2")]), Cache);
    assert_eq!(get(&strip, &[("cookie", "")]), Cache);
    // Keyed cookies are still keyed; the others are stripped.
    let keyed = route_with(|r| {
        r.policy.cookies = CookieMode::Strip;
        r.key.cookies = names(&["lang"]);
    });
    assert_eq!(get(&keyed, &[("cookie", "lang=en; sid=1")]), Cache);
    // Stripping never admits credentials.
    assert_eq!(
        get(&strip, &[("authorization", "Bearer x")]),
        Bypass("authorization")
    );
}

#[test]
fn strip_by_name_bypasses_any_cookie_it_does_not_name() {
    use crate::config::CookieMode;
    let r = route_with(|r| {
        r.policy.cookies = CookieMode::StripNamed(names(&["_ga*", "_gid", "*_consent"]));
        r.key.cookies = names(&["lang"]);
    });
    assert_eq!(
        get(&r, &[("cookie", "_ga=1; _ga_XYZ=2; _gid=3; lang=en")]),
        Cache
    );
    assert_eq!(get(&r, &[("cookie", "cookie_consent=yes")]), Cache);
    assert_eq!(
        get(&r, &[("cookie", "_ga=1; sid=s3cr3t")]),
        Bypass("cookie")
    );
    assert_eq!(get(&r, &[("cookie", "_gidx=1")]), Bypass("cookie"));
    assert_eq!(
        get(&r, &[("cookie", "_GA=1")]),
        Bypass("cookie"),
        "names are case-sensitive"
    );
    assert_eq!(get(&r, &[("cookie", "x_ga=1")]), Bypass("cookie"));
}

// -----------------------------------------------------------------------------------------
// RFC 9111 and RFC 9213

fn standard() -> Route {
    route_with(|r| r.policy.semantics = Semantics::Rfc9111)
}

#[test]
fn rfc9111_4_2_1_s_maxage_overrides_max_age() {
    let lines = [("cache-control", "max-age=600, s-maxage=30")];
    assert_eq!(response(&standard(), 200, &lines), stored(30));
    assert_eq!(ok(&lines), stored(30));
}

#[test]
fn rfc9111_4_2_1_expires_minus_date() {
    let lines = [
        ("date", "Sun, 06 Nov 1994 08:49:37 GMT"),
        ("expires", "Sun, 06 Nov 1994 08:50:37 GMT"),
    ];
    assert_eq!(response(&standard(), 200, &lines), stored(60));
}

#[test]
fn rfc9111_5_3_invalid_expires_is_stale() {
    for expires in ["0", "-1", "garbage", "Sun, 06 Nov 1994 08:00:00 GMT"] {
        let lines = [
            ("date", "Sun, 06 Nov 1994 08:49:37 GMT"),
            ("expires", expires),
        ];
        assert_eq!(
            response(&standard(), 200, &lines),
            stored(0),
            "{expires}: stored stale, revalidated on every use"
        );
    }
}

#[test]
fn rfc9111_4_2_no_freshness_is_not_stored_without_a_heuristic() {
    assert_eq!(response(&standard(), 200, &[]), Pass("no-freshness"));
    assert_eq!(ok(&[]), stored(60), "coalescing keeps the route's ttl");
}

#[test]
fn rfc9111_4_2_no_min_ttl_floor() {
    let r = route_with(|r| {
        r.policy.semantics = Semantics::Rfc9111;
        r.policy.min_ttl = secs(300);
        r.policy.max_ttl = secs(600);
    });
    let v = |cc: &str| response(&r, 200, &[("cache-control", cc)]);
    assert_eq!(v("max-age=5"), stored(5));
    assert_eq!(v("max-age=6000"), stored(600), "max_ttl still caps");
}

#[test]
fn rfc9111_4_2_2_heuristic_freshness_from_last_modified() {
    let r = route_with(|r| {
        r.policy.semantics = Semantics::Rfc9111;
        r.policy.heuristic = 10;
        r.policy.heuristic_max = secs(3600);
    });
    let modified = |last_modified: &str, status: u16, extra: &[(&'static str, &'static str)]| {
        let mut lines = vec![
            ("date", "Sun, 06 Nov 1994 08:49:37 GMT"),
            ("last-modified", last_modified),
        ];
        lines.extend_from_slice(extra);
        response(&r, status, &lines)
    };
    // Modified 1000 s before Date: 10% is 100 s.
    assert_eq!(
        modified("Sun, 06 Nov 1994 08:32:57 GMT", 200, &[]),
        stored(100)
    );
    // Modified long ago: capped.
    assert_eq!(
        modified("Tue, 06 Nov 1990 08:49:37 GMT", 200, &[]),
        stored(3600)
    );
    // Less the upstream's Age.
    assert_eq!(
        modified("Sun, 06 Nov 1994 08:32:57 GMT", 200, &[("age", "40")]),
        stored(60)
    );
    // Explicit freshness wins.
    assert_eq!(
        modified(
            "Tue, 06 Nov 1990 08:49:37 GMT",
            200,
            &[("cache-control", "max-age=7")]
        ),
        stored(7)
    );
    // After Date, or unreadable: no heuristic; stored stale, to be revalidated with the date.
    assert_eq!(
        modified("Sun, 06 Nov 1994 09:00:00 GMT", 200, &[]),
        stored(0)
    );
    assert_eq!(modified("yesterday", 200, &[]), stored(0));
    // Only for a heuristically cacheable status, or with `public`.
    let listed = route_with(|l| {
        *l = r.clone();
        l.policy.cache_statuses.push(302);
    });
    let lines = [
        ("date", "Sun, 06 Nov 1994 08:49:37 GMT"),
        ("last-modified", "Sun, 06 Nov 1994 08:32:57 GMT"),
    ];
    // Without it: no heuristic, stored stale to be revalidated with its date.
    assert_eq!(response(&listed, 302, &lines), stored(0));
    let public = [lines[0], lines[1], ("cache-control", "public")];
    assert_eq!(response(&listed, 302, &public), stored(100));
    // Off: no freshness, stored stale to be revalidated with its date.
    assert_eq!(response(&standard(), 200, &lines), stored(0));
}

#[test]
fn rfc9111_4_2_2_heuristic_on_a_coalescing_route_comes_before_the_ttl() {
    let r = route_with(|r| r.policy.heuristic = 50);
    let lines = [
        ("date", "Sun, 06 Nov 1994 08:49:37 GMT"),
        ("last-modified", "Sun, 06 Nov 1994 08:48:37 GMT"),
    ];
    assert_eq!(response(&r, 200, &lines), stored(30));
    assert_eq!(response(&r, 200, &lines[..1]), stored(60));
}

#[test]
fn rfc9111_5_2_2_8_proxy_revalidate_is_never_served_stale() {
    let r = route_with(|r| {
        r.policy.semantics = Semantics::Rfc9111;
        r.policy.stale_if_error = secs(600);
        r.policy.stale_while_revalidate = secs(60);
    });
    assert_eq!(
        windows(&r, &[("cache-control", "max-age=5, proxy-revalidate")]),
        (0, 0)
    );
    assert_eq!(
        response(&r, 200, &[("cache-control", "max-age=5, proxy-revalidate")]),
        stored(5)
    );
}

#[test]
fn rfc9111_5_2_2_3_must_understand_stores_an_understood_status_despite_no_store() {
    let lines = [("cache-control", "no-store, must-understand, max-age=60")];
    assert_eq!(response(&standard(), 200, &lines), stored(60));
    assert_eq!(ok(&lines), stored(60));
    // 302 is not one this route caches: not understood, not stored.
    assert_eq!(response(&standard(), 302, &lines), Pass("must-understand"));
    // Without must-understand, no-store stands; a route ignoring Cache-Control keeps it too.
    assert_eq!(
        ok(&[("cache-control", "no-store, max-age=60")]),
        Pass("no-store")
    );
    let ignoring = route_with(|r| r.policy.honor_cache_control = false);
    assert_eq!(response(&ignoring, 200, &lines), Pass("no-store"));
    // Privacy still wins.
    let private = [("cache-control", "private, must-understand, max-age=60")];
    assert_eq!(ok(&private), Pass("private"));
}

#[test]
fn rfc9111_5_2_1_client_no_store_and_no_cache_bypass() {
    let r = route_with(|r| {
        r.policy.semantics = Semantics::Rfc9111;
        r.policy.honor_client_no_store = false;
    });
    assert_eq!(
        get(&r, &[("cache-control", "no-store")]),
        Bypass("client-no-store")
    );
    assert_eq!(
        get(&r, &[("cache-control", "no-cache")]),
        Bypass("client-no-cache")
    );
    assert_eq!(
        get(&r, &[("pragma", "no-cache")]),
        Bypass("client-no-cache")
    );
    assert_eq!(
        get(
            &r,
            &[("pragma", "no-cache"), ("cache-control", "max-age=5")]
        ),
        Cache,
        "Pragma counts only without Cache-Control"
    );
    assert_eq!(get(&route(), &[("cache-control", "no-cache")]), Cache);
}

#[test]
fn rfc9213_cdn_cache_control_wins() {
    let lines = [
        ("cache-control", "max-age=5"),
        ("cdn-cache-control", "max-age=300"),
    ];
    assert_eq!(ok(&lines), stored(300));
    // Expires is ignored with a targeted field that gives no lifetime, as Cache-Control is.
    let no_lifetime = [
        ("cache-control", "max-age=5"),
        ("cdn-cache-control", "stale-if-error=60"),
        ("date", "Sun, 06 Nov 1994 08:49:37 GMT"),
        ("expires", "Sun, 06 Nov 1994 08:50:37 GMT"),
    ];
    assert_eq!(ok(&no_lifetime), stored(60), "the route's ttl");
    assert_eq!(
        response(&standard(), 200, &no_lifetime),
        Pass("no-freshness")
    );
    // An empty targeted field is not one.
    assert_eq!(
        ok(&[("cache-control", "max-age=5"), ("cdn-cache-control", " ")]),
        stored(5)
    );
    // no-cache in Cache-Control only concerns the caches Cache-Control targets.
    assert_eq!(
        ok(&[
            ("cache-control", "no-cache"),
            ("cdn-cache-control", "max-age=30")
        ]),
        stored(30)
    );
    // A route that ignores Cache-Control ignores the targeted fields too.
    let ignoring = route_with(|r| r.policy.honor_cache_control = false);
    assert_eq!(response(&ignoring, 200, &lines), stored(60));
}

#[test]
fn rfc9213_corral_cache_control_wins_over_cdn_cache_control() {
    let lines = [
        ("cache-control", "max-age=5"),
        ("cdn-cache-control", "max-age=300"),
        (
            "corral-cache-control",
            "max-age=20, stale-while-revalidate=9",
        ),
    ];
    assert_eq!(ok(&lines), stored(20));
    assert_eq!(windows(&route(), &lines), (9, 0));
}

#[test]
fn rfc9213_privacy_in_cache_control_holds_whatever_a_targeted_field_says() {
    for private in ["private", "no-store"] {
        let lines = [
            ("cache-control", private),
            ("cdn-cache-control", "max-age=300"),
        ];
        assert_eq!(ok(&lines), Pass(private), "{private}");
    }
    assert_eq!(
        ok(&[
            ("cache-control", "max-age=60"),
            ("cdn-cache-control", "no-store")
        ]),
        Pass("no-store")
    );
}

// -----------------------------------------------------------------------------------------
// Server errors

#[test]
fn a_listed_5xx_is_stored_only_with_explicit_freshness() {
    let r = route_with(|r| r.policy.cache_statuses.extend([501, 503]));
    let status = |code| StatusCode::from_u16(code).expect("status");
    let fresh = headers(&[("cache-control", "max-age=10")]);
    assert!(!shared_failure(&r, status(503), &fresh));
    assert_eq!(
        response(&r, 503, &[("cache-control", "max-age=10")]),
        stored(10)
    );
    assert!(shared_failure(&r, status(503), &HeaderMap::new()));
    let zero = headers(&[("cache-control", "max-age=0")]);
    assert!(shared_failure(&r, status(503), &zero), "a zero lifetime");
    assert!(
        !shared_failure(&r, status(501), &HeaderMap::new()),
        "501 needs none"
    );
    assert!(shared_failure(&route(), status(503), &fresh), "not listed");
    assert!(shared_failure(&r, status(500), &fresh), "not listed");
    assert!(!shared_failure(&r, status(200), &HeaderMap::new()));
    let error_ttl = route_with(|r| r.policy.error_ttl = [(500, secs(2))].into());
    assert!(!shared_failure(&error_ttl, status(500), &HeaderMap::new()));
}

#[test]
fn rfc9111_4_1_an_answer_varying_outside_the_key_is_a_variant() {
    let lines = [("cache-control", "max-age=60"), ("vary", "Accept-Language")];
    assert_eq!(response(&standard(), 200, &lines), stored(60));
    assert_eq!(ok(&lines), Pass("vary"), "vary: key on a coalescing route");
    assert_eq!(
        response(
            &standard(),
            200,
            &[("vary", "*"), ("cache-control", "max-age=60")]
        ),
        Pass("vary-star")
    );
}
