use mesh_proto::waypoint as pb;

use super::*;

fn path(kind: pb::MatchKind, value: &str) -> Option<pb::PathMatch> {
    Some(pb::PathMatch {
        kind: kind as i32,
        value: value.to_owned(),
    })
}

fn backend(host: &str, weight: u32) -> pb::Backend {
    pb::Backend {
        hostname: host.to_owned(),
        port: 80,
        weight,
        ..Default::default()
    }
}

/// A route named `name` in `ns` on `parent`, one rule per (matches, backend host).
fn route(
    ns: &str,
    name: &str,
    created: i64,
    parent: &str,
    rules: Vec<(Vec<pb::RouteMatch>, &str)>,
) -> Arc<Route> {
    let r = pb::Route {
        name: name.to_owned(),
        namespace: ns.to_owned(),
        kind: pb::RouteKind::Http as i32,
        parents: vec![pb::ParentService {
            hostname: parent.to_owned(),
            port: 0,
        }],
        rules: rules
            .into_iter()
            .map(|(matches, b)| pb::RouteRule {
                matches,
                backends: vec![backend(b, 1)],
                ..Default::default()
            })
            .collect(),
        created,
    };
    Arc::new(Route::compile(&r).unwrap())
}

fn m(p: Option<pb::PathMatch>) -> pb::RouteMatch {
    pb::RouteMatch {
        path: p,
        ..Default::default()
    }
}

const WEB: &str = "web.shop.svc.cluster.local";

fn ns_of(host: &str) -> Option<String> {
    host.split('.').nth(1).map(str::to_owned)
}

/// Which backend the request goes to: its hostname's first label, "404" or "pass".
fn decide(
    t: &RouteTable,
    client_ns: &str,
    method: &str,
    uri: &str,
    headers: &[(&str, &str)],
) -> String {
    let uri: http::Uri = uri.parse().unwrap();
    let mut h = HeaderMap::new();
    for (k, v) in headers {
        h.append(
            HeaderName::from_bytes(k.as_bytes()).unwrap(),
            v.parse().unwrap(),
        );
    }
    let method = Method::from_bytes(method.as_bytes()).unwrap();
    let view = RequestView {
        method: &method,
        path: uri.path(),
        query: uri.query(),
        headers: &h,
    };
    match t.decide(WEB, 80, client_ns, &view) {
        Decision::PassThrough => "pass".into(),
        Decision::NoMatch => "404".into(),
        Decision::Matched { rule, .. } => match &rule.backends[0].target {
            Ok((host, _)) => host.split('.').next().unwrap().to_owned(),
            Err(e) => format!("invalid: {e}"),
        },
    }
}

#[test]
fn exact_beats_prefix_and_longer_prefix_beats_shorter() {
    let r = route(
        "shop",
        "r",
        0,
        WEB,
        vec![
            (vec![m(path(pb::MatchKind::Prefix, "/"))], "root"),
            (vec![m(path(pb::MatchKind::Prefix, "/api"))], "api"),
            (vec![m(path(pb::MatchKind::Prefix, "/api/v2/"))], "v2"),
            (
                vec![m(path(pb::MatchKind::Exact, "/api/v2/special"))],
                "special",
            ),
        ],
    );
    let t = RouteTable::build([&r], ns_of);
    assert_eq!(decide(&t, "shop", "GET", "/", &[]), "root");
    assert_eq!(decide(&t, "shop", "GET", "/api", &[]), "api");
    assert_eq!(decide(&t, "shop", "GET", "/api/x", &[]), "api");
    // Element-wise: "/apix" is not under "/api".
    assert_eq!(decide(&t, "shop", "GET", "/apix", &[]), "root");
    assert_eq!(decide(&t, "shop", "GET", "/api/v2", &[]), "v2");
    assert_eq!(decide(&t, "shop", "GET", "/api/v2/other", &[]), "v2");
    assert_eq!(decide(&t, "shop", "GET", "/api/v2/special", &[]), "special");
}

#[test]
fn method_headers_and_query_rank_and_must_all_hold() {
    let with =
        |method: &str, headers: Vec<(&str, &str)>, query: Vec<(&str, &str)>| pb::RouteMatch {
            path: path(pb::MatchKind::Prefix, "/"),
            method: method.to_owned(),
            headers: headers
                .into_iter()
                .map(|(k, v)| pb::KeyMatch {
                    name: k.into(),
                    kind: pb::MatchKind::Exact as i32,
                    value: v.into(),
                })
                .collect(),
            query: query
                .into_iter()
                .map(|(k, v)| pb::KeyMatch {
                    name: k.into(),
                    kind: pb::MatchKind::Exact as i32,
                    value: v.into(),
                })
                .collect(),
        };
    let r = route(
        "shop",
        "r",
        0,
        WEB,
        vec![
            (vec![with("", vec![], vec![])], "any"),
            (vec![with("", vec![("version", "two")], vec![])], "header"),
            (
                vec![with(
                    "",
                    vec![("version", "two"), ("color", "blue")],
                    vec![],
                )],
                "two-headers",
            ),
            (vec![with("POST", vec![], vec![])], "post"),
            (vec![with("", vec![], vec![("debug", "on")])], "query"),
        ],
    );
    let t = RouteTable::build([&r], ns_of);
    assert_eq!(decide(&t, "shop", "GET", "/", &[]), "any");
    assert_eq!(
        decide(&t, "shop", "GET", "/", &[("version", "two")]),
        "header"
    );
    assert_eq!(
        decide(&t, "shop", "GET", "/", &[("Version", "three")]),
        "any"
    );
    assert_eq!(
        decide(
            &t,
            "shop",
            "GET",
            "/",
            &[("version", "two"), ("color", "blue")]
        ),
        "two-headers"
    );
    // A method match outranks header matches.
    assert_eq!(
        decide(&t, "shop", "POST", "/", &[("version", "two")]),
        "post"
    );
    assert_eq!(decide(&t, "shop", "GET", "/?a=1&debug=on", &[]), "query");
    assert_eq!(decide(&t, "shop", "GET", "/?debug=off", &[]), "any");
}

#[test]
fn regex_matches_the_whole_value() {
    let regex = pb::RouteMatch {
        path: path(pb::MatchKind::Regex, "/items/[0-9]+"),
        headers: vec![pb::KeyMatch {
            name: "x-user".into(),
            kind: pb::MatchKind::Regex as i32,
            value: "ad.*".into(),
        }],
        ..Default::default()
    };
    let r = route("shop", "r", 0, WEB, vec![(vec![regex], "re")]);
    let t = RouteTable::build([&r], ns_of);
    assert_eq!(
        decide(&t, "shop", "GET", "/items/42", &[("x-user", "admin")]),
        "re"
    );
    assert_eq!(
        decide(&t, "shop", "GET", "/items/42x", &[("x-user", "admin")]),
        "404"
    );
    assert_eq!(
        decide(&t, "shop", "GET", "/items/42", &[("x-user", "badmin")]),
        "404"
    );
}

#[test]
fn ties_go_to_the_older_route_then_the_name() {
    let young = route(
        "shop",
        "a-young",
        200,
        WEB,
        vec![(vec![m(path(pb::MatchKind::Prefix, "/"))], "young")],
    );
    let old = route(
        "shop",
        "z-old",
        100,
        WEB,
        vec![(vec![m(path(pb::MatchKind::Prefix, "/"))], "old")],
    );
    let t = RouteTable::build([&young, &old], ns_of);
    assert_eq!(decide(&t, "shop", "GET", "/", &[]), "old");
    let b = route(
        "shop",
        "b",
        100,
        WEB,
        vec![(vec![m(path(pb::MatchKind::Prefix, "/"))], "b")],
    );
    let a = route(
        "shop",
        "a",
        100,
        WEB,
        vec![(vec![m(path(pb::MatchKind::Prefix, "/"))], "a")],
    );
    let t = RouteTable::build([&b, &a], ns_of);
    assert_eq!(decide(&t, "shop", "GET", "/", &[]), "a");
}

#[test]
fn consumer_routes_apply_only_to_their_namespace() {
    let producer = route(
        "shop",
        "p",
        0,
        WEB,
        vec![(vec![m(path(pb::MatchKind::Prefix, "/"))], "producer")],
    );
    let consumer = route(
        "client-ns",
        "c",
        0,
        WEB,
        vec![(vec![m(path(pb::MatchKind::Prefix, "/"))], "consumer")],
    );
    let t = RouteTable::build([&producer, &consumer], ns_of);
    assert_eq!(decide(&t, "client-ns", "GET", "/", &[]), "consumer");
    assert_eq!(decide(&t, "shop", "GET", "/", &[]), "producer");
    assert_eq!(decide(&t, "elsewhere", "GET", "/", &[]), "producer");
    // Only a consumer route: others pass through unchanged.
    let t = RouteTable::build([&consumer], ns_of);
    assert_eq!(decide(&t, "elsewhere", "GET", "/", &[]), "pass");
}

#[test]
fn no_route_passes_through_and_routes_without_a_match_answer_404() {
    let t = RouteTable::build(std::iter::empty(), ns_of);
    assert_eq!(decide(&t, "shop", "GET", "/", &[]), "pass");
    let r = route(
        "shop",
        "r",
        0,
        WEB,
        vec![(vec![m(path(pb::MatchKind::Exact, "/only"))], "only")],
    );
    let t = RouteTable::build([&r], ns_of);
    assert_eq!(decide(&t, "shop", "GET", "/only", &[]), "only");
    assert_eq!(decide(&t, "shop", "GET", "/other", &[]), "404");
    // A route limited to another port leaves port 80 alone.
    let mut pb_route = pb::Route {
        name: "p".into(),
        namespace: "shop".into(),
        parents: vec![pb::ParentService {
            hostname: WEB.into(),
            port: 8080,
        }],
        rules: vec![pb::RouteRule {
            backends: vec![backend("x.shop", 1)],
            ..Default::default()
        }],
        ..Default::default()
    };
    let t = RouteTable::build([&Arc::new(Route::compile(&pb_route).unwrap())], ns_of);
    assert_eq!(decide(&t, "shop", "GET", "/", &[]), "pass");
    pb_route.parents[0].port = 80;
    let t = RouteTable::build([&Arc::new(Route::compile(&pb_route).unwrap())], ns_of);
    assert_eq!(decide(&t, "shop", "GET", "/", &[]), "x");
}

#[test]
fn bad_config_is_rejected_with_its_place() {
    let bad = |rule: pb::RouteRule| {
        Route::compile(&pb::Route {
            name: "r".into(),
            namespace: "shop".into(),
            rules: vec![pb::RouteRule::default(), rule],
            ..Default::default()
        })
        .unwrap_err()
        .to_string()
    };
    let e = bad(pb::RouteRule {
        matches: vec![m(path(pb::MatchKind::Regex, "(unclosed"))],
        ..Default::default()
    });
    assert!(
        e.contains("rule 1") && e.contains("regular expression"),
        "{e}"
    );
    let e = bad(pb::RouteRule {
        matches: vec![m(path(pb::MatchKind::Prefix, "no-slash"))],
        ..Default::default()
    });
    assert!(e.contains("must start with '/'"), "{e}");
    let e = bad(pb::RouteRule {
        filters: vec![pb::Filter {
            kind: Some(pb::filter::Kind::RequestHeaders(pb::HeaderModifier {
                set: vec![pb::Header {
                    name: "bad header".into(),
                    value: "v".into(),
                }],
                ..Default::default()
            })),
        }],
        ..Default::default()
    });
    assert!(e.contains("not a valid header name"), "{e}");
    let e = bad(pb::RouteRule {
        filters: vec![pb::Filter {
            kind: Some(pb::filter::Kind::Redirect(pb::Redirect {
                status_code: 200,
                ..Default::default()
            })),
        }],
        ..Default::default()
    });
    assert!(e.contains("not a redirect"), "{e}");
}

#[test]
fn prefix_replacement_follows_gateway_api() {
    let p = |replacement: &str, matched: &str, path: &str| {
        PathModifier::Prefix(replacement.into()).apply(path, Some(matched))
    };
    assert_eq!(p("/one", "/prefix/one", "/prefix/one/two"), "/one/two");
    assert_eq!(p("/", "/strip-prefix", "/strip-prefix/three"), "/three");
    assert_eq!(p("/", "/strip-prefix", "/strip-prefix"), "/");
    assert_eq!(p("/new", "/old", "/old"), "/new");
    assert_eq!(p("/new/", "/old/", "/old/x"), "/new/x");
    assert_eq!(
        PathModifier::Full("/full".into()).apply("/any/thing", None),
        "/full"
    );
}

#[test]
fn header_modifier_sets_adds_and_removes() {
    let mut h = HeaderMap::new();
    h.insert("keep", "1".parse().unwrap());
    h.insert("replace", "old".parse().unwrap());
    h.insert("drop", "x".parse().unwrap());
    h.insert("more", "a".parse().unwrap());
    let hm = HeaderModifier {
        set: vec![(
            HeaderName::from_static("replace"),
            HeaderValue::from_static("new"),
        )],
        add: vec![(
            HeaderName::from_static("more"),
            HeaderValue::from_static("b"),
        )],
        remove: vec![HeaderName::from_static("drop")],
    };
    hm.apply(&mut h);
    assert_eq!(h["keep"], "1");
    assert_eq!(h["replace"], "new");
    assert!(!h.contains_key("drop"));
    let more: Vec<_> = h.get_all("more").iter().collect();
    assert_eq!(more, vec!["a", "b"]);
}

#[test]
fn query_values_are_decoded() {
    assert_eq!(
        query_value(Some("a=1&b=two%20words&c"), "b").as_deref(),
        Some("two words")
    );
    assert_eq!(query_value(Some("a=1&c"), "c").as_deref(), Some(""));
    assert_eq!(query_value(Some("a=%zz"), "a").as_deref(), Some("%zz"));
    assert_eq!(query_value(None, "a"), None);
}
