use super::*;

#[test]
fn in_place_parts_are_the_bytes_of_the_built_ones() {
    let lists: [&[&[u8]]; 4] = [&[], &[b""], &[b"a=1"], &[b"a=1", b"", b"b=xyz"]];
    for list in lists {
        let mut built = KeyBuilder::new();
        built.push(&presence(list));
        built.push(&frame(list.iter().copied()));
        let mut in_place = KeyBuilder::new();
        in_place.push_presence(list);
        in_place.push_framed(list);
        assert_eq!(in_place.finish(), built.finish(), "{list:?}");
    }
}

#[test]
fn the_digest_alone_is_the_digest_of_the_key_explain_shows() {
    use crate::http::testing::headers;
    let route = route_with(|r| {
        r.key.query = QueryRule::Include(names(&["q", "page"]));
        r.key.headers = vec![header::ACCEPT];
        r.key.cookies = names(&["locale"]);
        r.key.body = true;
    });
    let uri: Uri = "/s?page=2&utm=x&%71=a+b&Q=1".parse().unwrap();
    let request = headers(&[("accept", "a/b"), ("cookie", "locale=en; other=1")]);
    for body in [None, Some(&b"{}"[..])] {
        assert_eq!(
            request_digest(&route, &Method::GET, &uri, &request, body),
            request_key(&route, &Method::GET, &uri, &request, body).key
        );
    }
}

#[test]
fn variant_keys_normalise_only_what_cannot_change_the_meaning() {
    use crate::http::testing::headers;
    let primary = KeyBuilder::new().part("p").finish().hash;
    let lang = [HeaderName::from_static("accept-language")];
    let of = |lines: &[(&str, &str)]| variant_key(&primary, "m1", &lang, &headers(lines)).hash;
    let en = of(&[("accept-language", "en, fr")]);
    assert_eq!(en, of(&[("accept-language", "en,fr ")]));
    assert_eq!(
        en,
        of(&[("accept-language", "en"), ("accept-language", "fr")])
    );
    assert_ne!(en, of(&[("accept-language", "fr, en")]), "order is meaning");
    assert_eq!(en, of(&[("accept-language", "EN, Fr")]), "case is not");
    let accept = [header::ACCEPT];
    let of_accept =
        |lines: &[(&str, &str)]| variant_key(&primary, "m1", &accept, &headers(lines)).hash;
    let json = of_accept(&[("accept", "application/json;q=0.9, text/html")]);
    assert_eq!(
        json,
        of_accept(&[("accept", "Text/HTML,application/json ; q = 0.9")])
    );
    assert_eq!(
        json,
        of_accept(&[
            ("accept", "text/html"),
            ("accept", "application/json;q=0.9")
        ]),
        "an Accept's order means nothing"
    );
    assert_ne!(
        json,
        of_accept(&[("accept", "application/json;q=0.8, text/html")])
    );
    assert_ne!(
        of(&[]),
        of(&[("accept-language", "")]),
        "absent is not empty"
    );
    assert_eq!(
        of(&[]),
        of(&[("accept-language", "en"), ("connection", "accept-language")]),
        "a hop-by-hop header is absent"
    );
    let other = KeyBuilder::new().part("q").finish().hash;
    let en_fr = headers(&[("accept-language", "en, fr")]);
    assert_ne!(
        en,
        variant_key(&other, "m1", &lang, &en_fr).hash,
        "variants of two keys never meet"
    );
    assert_ne!(
        en,
        variant_key(&primary, "m2", &lang, &en_fr).hash,
        "nor do those of two markers"
    );
}

#[test]
fn parts_are_length_prefixed_so_shifted_boundaries_differ() {
    let a = KeyBuilder::new().part("ab").part("c").finish();
    let b = KeyBuilder::new().part("a").part("bc").finish();
    assert_ne!(a.hash, b.hash);
}

#[test]
fn hex_round_trips_and_rejects_junk() {
    let k = KeyBuilder::new().part("x").finish();
    assert_eq!(KeyHash::from_hex(&k.hash.to_hex()), Some(k.hash));
    assert_eq!(k.hash.to_hex().len(), KeyHash::HEX_LEN);
    assert_eq!(KeyHash::from_hex("zz"), None);
    assert_eq!(KeyHash::from_hex(&"0".repeat(63)), None);
}

// -----------------------------------------------------------------------------------------
// Request keys

use http::{HeaderMap, HeaderName, Method, Uri};
use proptest::prelude::*;

use crate::config::{QueryRule, Route};
use crate::http::testing::{headers, names, route, route_with};

fn key_of(route: &Route, method: Method, uri: &str, lines: &[(&str, &str)]) -> KeyHash {
    key_with_body(route, method, uri, lines, None)
}

fn key_with_body(
    route: &Route,
    method: Method,
    uri: &str,
    lines: &[(&str, &str)],
    body: Option<&[u8]>,
) -> KeyHash {
    let uri: Uri = uri.parse().expect("uri");
    request_key(route, &method, &uri, &headers(lines), body)
        .key
        .hash
}

fn get(route: &Route, uri: &str) -> KeyHash {
    key_of(route, Method::GET, uri, &[])
}

fn include(list: &[&str]) -> Route {
    route_with(|r| r.key.query = QueryRule::Include(names(list)))
}

fn exclude(list: &[&str]) -> Route {
    route_with(|r| r.key.query = QueryRule::Exclude(names(list)))
}

fn keyed_headers(list: &[&'static str]) -> Route {
    route_with(|r| r.key.headers = list.iter().map(|n| HeaderName::from_static(n)).collect())
}

fn keyed_cookies(list: &[&str]) -> Route {
    route_with(|r| r.key.cookies = names(list))
}

fn body_keyed() -> Route {
    route_with(|r| r.key.body = true)
}

#[test]
fn no_part_of_a_request_can_shift_into_the_next() {
    let r = route();
    assert_ne!(get(&r, "/a?b=c"), get(&r, "/ab?=c"));
    assert_ne!(get(&r, "/a?b=c"), get(&r, "/a?bc"));
    assert_ne!(get(&r, "/a?b=c"), get(&r, "/a%3Fb=c"));
    assert_ne!(get(&r, "/a?b=1;c=2"), get(&r, "/a?b=1&;c=2"));
    assert_ne!(get(&r, "/a?b=1&c=2"), get(&r, "/a?b=1%26c=2"));

    // Header values holding what looks like the next header, a separator or a length.
    let two = keyed_headers(&["x-a", "x-b"]);
    let k = |lines: &[(&str, &str)]| key_of(&two, Method::GET, "/r", lines);
    assert_ne!(k(&[("x-a", "1"), ("x-b", "2")]), k(&[("x-a", "1, x-b: 2")]));
    assert_ne!(k(&[("x-a", "1x-b2")]), k(&[("x-a", "1"), ("x-b", "2")]));
    assert_ne!(k(&[("x-b", "1")]), k(&[("x-a", "1")]));
    assert_ne!(
        k(&[("x-a", "\t2"), ("x-b", "")]),
        k(&[("x-a", ""), ("x-b", "\t2")])
    );

    // Cookies: a value cannot carry another cookie's name into the key.
    let cookies = keyed_cookies(&["a", "b"]);
    let c = |cookie: &str| key_of(&cookies, Method::GET, "/r", &[("cookie", cookie)]);
    assert_ne!(c("a=1; b=2"), c("a=1 b=2"));
    assert_ne!(c("a=1; b=2"), c("a=1=b=2"));
}

#[test]
fn the_same_request_gets_the_same_key() {
    let r = route();
    assert_eq!(get(&r, "/reports/1?a=1"), get(&r, "/reports/1?a=1"));
}

#[test]
fn route_method_and_path_are_in_the_key() {
    let r = route();
    let other = route_with(|r| r.name = "other".into());
    assert_ne!(get(&r, "/x"), get(&other, "/x"));
    assert_ne!(
        key_of(&r, Method::GET, "/x", &[]),
        key_of(&r, Method::POST, "/x", &[])
    );
    assert_ne!(get(&r, "/x"), get(&r, "/y"));
}

#[test]
fn a_head_is_keyed_as_the_get_whose_entry_answers_it() {
    let r = route();
    assert_eq!(
        key_of(&r, Method::GET, "/x", &[]),
        key_of(&r, Method::HEAD, "/x", &[])
    );
}

#[test]
fn the_path_is_keyed_raw_so_distinct_resources_never_merge() {
    let r = route();
    assert_ne!(get(&r, "/a%2Fb"), get(&r, "/a/b"));
    assert_ne!(get(&r, "/a%62"), get(&r, "/ab"));
    assert_ne!(get(&r, "/A"), get(&r, "/a"));
    assert_ne!(get(&r, "/a/"), get(&r, "/a"));
    assert_ne!(get(&r, "/a//b"), get(&r, "/a/b"));
}

#[test]
fn query_all_ignores_the_order_of_different_names() {
    let r = route();
    assert_eq!(get(&r, "/r?a=1&b=2"), get(&r, "/r?b=2&a=1"));
    assert_eq!(get(&r, "/r?c=3&a=1&b=2"), get(&r, "/r?b=2&c=3&a=1"));
}

#[test]
fn query_all_keeps_every_value() {
    let r = route();
    assert_ne!(get(&r, "/r?a=1"), get(&r, "/r?a=2"));
    assert_ne!(get(&r, "/r?a=1"), get(&r, "/r?a=1&b=2"));
    assert_ne!(
        get(&r, "/r?a=1"),
        get(&r, "/r?a=1&a=1"),
        "duplicates are kept"
    );
    assert_ne!(get(&r, "/r?a=1"), get(&r, "/r?A=1"));
}

#[test]
fn repeated_names_keep_their_order() {
    // "first wins", "last wins" and ordered lists all read these differently.
    let r = route();
    assert_ne!(get(&r, "/r?a=1&a=2"), get(&r, "/r?a=2&a=1"));
    assert_eq!(get(&r, "/r?a=1&b=0&a=2"), get(&r, "/r?b=0&a=1&a=2"));
}

#[test]
fn reordering_spellings_of_one_name_changes_the_key() {
    // To an upstream that decodes names or ignores their case these are one repeated name.
    let r = route();
    assert_ne!(get(&r, "/r?a=1&%61=2"), get(&r, "/r?%61=2&a=1"));
    assert_ne!(get(&r, "/r?a=1&A=2"), get(&r, "/r?A=2&a=1"));
}

#[test]
fn a_name_without_equals_differs_from_an_empty_value() {
    let r = route();
    assert_ne!(get(&r, "/r?a"), get(&r, "/r?a="));
    assert_ne!(get(&r, "/r?a="), get(&r, "/r"));
    assert_ne!(get(&r, "/r?a"), get(&r, "/r"));
}

#[test]
fn query_values_are_not_decoded() {
    let r = route();
    assert_ne!(get(&r, "/r?q=a+b"), get(&r, "/r?q=a%20b"));
    assert_ne!(get(&r, "/r?q=%41"), get(&r, "/r?q=A"));
}

#[test]
fn empty_query_segments_are_skipped() {
    let r = route();
    assert_eq!(get(&r, "/r?a=1&&b=2&"), get(&r, "/r?a=1&b=2"));
    assert_eq!(get(&r, "/r?"), get(&r, "/r"));
}

#[test]
fn query_include_keeps_only_the_named_parameters() {
    let r = include(&["a"]);
    assert_eq!(get(&r, "/r?a=1&utm=x"), get(&r, "/r?utm=y&a=1"));
    assert_eq!(get(&r, "/r?a=1&utm=x"), get(&r, "/r?a=1"));
    assert_ne!(get(&r, "/r?a=1"), get(&r, "/r?a=2"));
    assert_ne!(get(&r, "/r?a=1"), get(&r, "/r"));
}

#[test]
fn query_include_cannot_be_dodged_by_spelling_the_name_differently() {
    let r = include(&["a"]);
    assert_ne!(get(&r, "/r?%61=evil"), get(&r, "/r"));
    assert_ne!(get(&r, "/r?A=evil"), get(&r, "/r"));
    // Upstreams that also split on ';' would see a=evil.
    assert_ne!(get(&r, "/r?utm=x;a=evil"), get(&r, "/r"));
}

#[test]
fn query_exclude_drops_only_the_named_parameters() {
    let r = exclude(&["utm"]);
    assert_eq!(get(&r, "/r?a=1&utm=x"), get(&r, "/r?utm=y&a=1"));
    assert_eq!(get(&r, "/r?a=1&utm=x"), get(&r, "/r?a=1"));
    assert_ne!(get(&r, "/r?a=1"), get(&r, "/r?a=2"));
    assert_ne!(get(&r, "/r?a=1&b=2"), get(&r, "/r?a=1"));
}

#[test]
fn query_exclude_keeps_anything_it_cannot_be_sure_of() {
    let r = exclude(&["utm"]);
    assert_ne!(get(&r, "/r?%75tm=x"), get(&r, "/r"));
    assert_ne!(get(&r, "/r?UTM=x"), get(&r, "/r"));
    assert_ne!(get(&r, "/r?utm=x;a=1"), get(&r, "/r"));
}

#[test]
fn query_none_ignores_the_query() {
    let r = route_with(|r| r.key.query = QueryRule::None);
    assert_eq!(get(&r, "/r?a=1"), get(&r, "/r?a=2"));
    assert_eq!(get(&r, "/r?a=1"), get(&r, "/r"));
}

#[test]
fn unkeyed_headers_are_ignored() {
    let r = keyed_headers(&["accept"]);
    assert_eq!(
        key_of(
            &r,
            Method::GET,
            "/r",
            &[("accept", "a/b"), ("user-agent", "x")]
        ),
        key_of(
            &r,
            Method::GET,
            "/r",
            &[("accept", "a/b"), ("user-agent", "y")]
        ),
    );
    let plain = route();
    assert_eq!(
        key_of(&plain, Method::GET, "/r", &[("accept", "a/b")]),
        key_of(&plain, Method::GET, "/r", &[]),
    );
}

#[test]
fn keyed_headers_change_the_key() {
    let r = keyed_headers(&["accept"]);
    assert_ne!(
        key_of(&r, Method::GET, "/r", &[("accept", "application/json")]),
        key_of(&r, Method::GET, "/r", &[("accept", "text/html")]),
    );
}

#[test]
fn an_absent_header_differs_from_an_empty_one() {
    let r = keyed_headers(&["accept"]);
    assert_ne!(
        key_of(&r, Method::GET, "/r", &[]),
        key_of(&r, Method::GET, "/r", &[("accept", "")]),
    );
}

#[test]
fn every_value_of_a_keyed_header_counts_in_order() {
    let r = keyed_headers(&["accept"]);
    let k = |lines: &[(&str, &str)]| key_of(&r, Method::GET, "/r", lines);
    assert_ne!(
        k(&[("accept", "a"), ("accept", "b")]),
        k(&[("accept", "b"), ("accept", "a")])
    );
    assert_ne!(
        k(&[("accept", "a"), ("accept", "b")]),
        k(&[("accept", "a")])
    );
    assert_ne!(
        k(&[("accept", "a"), ("accept", "b")]),
        k(&[("accept", "a, b")])
    );
}

#[test]
fn a_keyed_header_named_in_connection_counts_as_absent() {
    // It is stripped before the upstream sees it, so the answer is the "absent" one.
    let r = keyed_headers(&["accept"]);
    assert_eq!(
        key_of(
            &r,
            Method::GET,
            "/r",
            &[("accept", "application/json"), ("connection", "Accept")]
        ),
        key_of(&r, Method::GET, "/r", &[]),
    );
}

#[test]
fn keyed_cookies_change_the_key_and_others_do_not() {
    let r = keyed_cookies(&["lang"]);
    let k = |cookie: &str| key_of(&r, Method::GET, "/r", &[("cookie", cookie)]);
    assert_ne!(k("lang=en"), k("lang=fr"));
    assert_eq!(k("lang=en; theme=dark"), k("theme=light; lang=en"));
    assert_eq!(k("lang=en"), k(" lang = en ;"));
    assert_ne!(k("lang=en"), k("lang=\"en\""));
}

#[test]
fn an_absent_cookie_differs_from_an_empty_one() {
    let r = keyed_cookies(&["lang"]);
    assert_ne!(
        key_of(&r, Method::GET, "/r", &[]),
        key_of(&r, Method::GET, "/r", &[("cookie", "lang=")]),
    );
    assert_eq!(
        key_of(&r, Method::GET, "/r", &[]),
        key_of(&r, Method::GET, "/r", &[("cookie", "other=1")]),
    );
    // A pair without '=' is a nameless cookie, not "lang".
    assert_eq!(
        key_of(&r, Method::GET, "/r", &[("cookie", "lang")]),
        key_of(&r, Method::GET, "/r", &[]),
    );
}

#[test]
fn cookies_are_read_from_every_cookie_header_in_order() {
    let r = keyed_cookies(&["a", "b"]);
    let k = |lines: &[(&str, &str)]| key_of(&r, Method::GET, "/r", lines);
    assert_eq!(
        k(&[("cookie", "a=1"), ("cookie", "b=2")]),
        k(&[("cookie", "a=1; b=2")])
    );
    assert_ne!(k(&[("cookie", "a=1; a=2")]), k(&[("cookie", "a=2; a=1")]));
}

#[test]
fn the_body_digest_is_keyed_only_when_asked() {
    let r = body_keyed();
    let k = |body: Option<&[u8]>| key_with_body(&r, Method::POST, "/q", &[], body);
    assert_eq!(k(Some(b"{\"q\":1}")), k(Some(b"{\"q\":1}")));
    assert_ne!(k(Some(b"{\"q\":1}")), k(Some(b"{\"q\":2}")));
    assert_ne!(k(None), k(Some(b"")), "no body differs from an empty body");

    let plain = route();
    assert_eq!(
        key_with_body(&plain, Method::GET, "/q", &[], Some(b"1")),
        key_with_body(&plain, Method::GET, "/q", &[], Some(b"2")),
    );
}

#[test]
fn a_body_key_includes_how_to_read_the_body() {
    let r = body_keyed();
    let k = |lines: &[(&str, &str)]| key_with_body(&r, Method::POST, "/q", lines, Some(b"x"));
    assert_ne!(
        k(&[("content-type", "application/json")]),
        k(&[("content-type", "application/x-www-form-urlencoded")])
    );
    assert_ne!(k(&[("content-encoding", "gzip")]), k(&[]));
    assert_eq!(k(&[("content-length", "1")]), k(&[]));
}

#[test]
fn parts_explain_the_key_in_order() {
    let r = route_with(|r| {
        r.key.query = QueryRule::Include(names(&["a", "b"]));
        r.key.headers = vec![header::ACCEPT];
        r.key.cookies = names(&["session"]);
        r.key.body = true;
    });
    let uri: Uri = "/reports/1?b=2&utm=x&a=1".parse().unwrap();
    let key = request_key(
        &r,
        &Method::POST,
        &uri,
        &headers(&[("accept", "application/json"), ("accept", "text/plain")]),
        Some(b"hello"),
    );
    let parts: Vec<(&str, &str)> = key
        .parts
        .iter()
        .map(|(what, value)| (what.as_ref(), value.as_str()))
        .collect();
    let body = format!("blake3:{}", blake3::hash(b"hello").to_hex());
    assert_eq!(
        parts,
        [
            ("route", "reports"),
            ("method", "POST"),
            ("path", "/reports/1"),
            ("query", "a=1&b=2"),
            ("header accept", "application/json, text/plain"),
            ("header content-type", "<absent>"),
            ("header content-encoding", "<absent>"),
            ("cookie session", "<absent>"),
            ("body", body.as_str()),
        ]
    );
}

#[test]
fn a_request_key_never_equals_a_dictionary_key_of_the_same_words() {
    let r = route_with(|r| r.key.query = QueryRule::None);
    let uri: Uri = "/x".parse().unwrap();
    let request = request_key(&r, &Method::GET, &uri, &HeaderMap::new(), None);
    let dictionary = KeyBuilder::new()
        .part("dictionary")
        .part("reports")
        .part("GET")
        .finish();
    assert_ne!(request.key.hash, dictionary.hash);
}

#[test]
fn the_upstream_gets_only_the_query_the_key_kept() {
    let fwd = |rule: QueryRule, uri: &str| {
        let uri: Uri = uri.parse().unwrap();
        let route = route_with(|r| r.key.query = rule.clone());
        let (_, with_key) =
            request_digest_and_query(&route, &Method::GET, &uri, &HeaderMap::new(), None);
        let alone = forwarded_query(&rule, &uri);
        assert_eq!(with_key, alone, "one parsing of the query, or two, agree");
        alone
    };
    assert_eq!(
        fwd(QueryRule::Include(names(&["a"])), "/r?utm=x&a=1&debug=1"),
        Some("a=1".into())
    );
    assert_eq!(
        fwd(QueryRule::Exclude(names(&["utm"])), "/r?utm=x&b=2&a"),
        Some("a&b=2".into())
    );
    assert_eq!(
        fwd(QueryRule::All, "/r?b=2&a=1&a=0"),
        Some("a=1&a=0&b=2".into())
    );
    assert_eq!(fwd(QueryRule::None, "/r?a=1"), None);
    assert_eq!(fwd(QueryRule::Include(names(&["a"])), "/r?b=1"), None);
    assert_eq!(fwd(QueryRule::All, "/r"), None);
}

// -----------------------------------------------------------------------------------------
// Properties

/// Up to six parameters with distinct names, some without '='.
fn distinct_params() -> impl Strategy<Value = Vec<(String, Option<String>)>> {
    prop::collection::btree_map("[a-z]{1,3}", prop::option::of("[a-z0-9%+]{0,4}"), 1..6)
        .prop_map(|m| m.into_iter().collect())
}

fn query(params: &[(String, Option<String>)]) -> String {
    let segments: Vec<String> = params
        .iter()
        .map(|(n, v)| match v {
            Some(v) => format!("{n}={v}"),
            None => n.clone(),
        })
        .collect();
    format!("/r?{}", segments.join("&"))
}

proptest! {
    #[test]
    fn parameter_order_never_changes_an_all_key(
        (params, shuffled) in distinct_params()
            .prop_flat_map(|p| (Just(p.clone()), Just(p).prop_shuffle()))
    ) {
        let r = route();
        prop_assert_eq!(get(&r, &query(&params)), get(&r, &query(&shuffled)));
    }

    #[test]
    fn parameter_order_never_changes_an_include_key(
        (params, shuffled) in distinct_params()
            .prop_flat_map(|p| (Just(p.clone()), Just(p).prop_shuffle())),
        included in prop::collection::vec("[a-z]{1,3}", 0..4),
    ) {
        let included: Vec<&str> = included.iter().map(String::as_str).collect();
        let r = include(&included);
        prop_assert_eq!(get(&r, &query(&params)), get(&r, &query(&shuffled)));
    }

    #[test]
    fn changing_an_included_value_changes_the_key(
        params in distinct_params(),
        pick in any::<prop::sample::Index>(),
        new_value in prop::option::of("[a-z0-9%+]{0,4}"),
        include_all in any::<bool>(),
    ) {
        let i = pick.index(params.len());
        prop_assume!(params[i].1 != new_value);
        let mut changed = params.clone();
        changed[i].1 = new_value;
        let r = if include_all { route() } else { include(&[params[i].0.as_str()]) };
        prop_assert_ne!(get(&r, &query(&params)), get(&r, &query(&changed)));
    }

    #[test]
    fn changing_a_parameter_outside_include_keeps_the_key(
        params in distinct_params(),
        pick in any::<prop::sample::Index>(),
        new_value in prop::option::of("[a-z0-9]{0,4}"),
    ) {
        let i = pick.index(params.len());
        let mut changed = params.clone();
        changed[i].1 = new_value;
        let kept: Vec<&str> = params
            .iter()
            .enumerate()
            .filter(|(j, _)| *j != i)
            .map(|(_, (n, _))| n.as_str())
            .collect();
        let r = include(&kept);
        prop_assert_eq!(get(&r, &query(&params)), get(&r, &query(&changed)));
    }
}

#[test]
fn cookie_patterns_match_whole_names_with_stars_for_any_run() {
    for (pattern, name, matches) in [
        ("_ga*", "_ga", true),
        ("_ga*", "_ga_XYZ", true),
        ("_ga*", "x_ga", false),
        ("*_consent", "cookie_consent", true),
        ("*_consent", "cookie_consent2", false),
        ("a*b*c", "aXXbYYc", true),
        ("a*b*c", "aXXcYYb", false),
        ("*", "", true),
        ("*", "anything", true),
        ("_gid", "_gid", true),
        ("_gid", "_gidx", false),
        ("**a", "ba", true),
        ("", "", true),
        ("", "a", false),
    ] {
        assert_eq!(
            glob(pattern.as_bytes(), name.as_bytes()),
            matches,
            "{pattern} ~ {name}"
        );
    }
}
