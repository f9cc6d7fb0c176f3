#![allow(clippy::unwrap_used)]
//! End to end through a waypoint, in network namespaces: `examples/waypoint-mesh` (a shop whose
//! services use a waypoint) with real ztunnels, istiod-lite and the waypoint as a pod. Every
//! check is what a user would try by hand: requests from a pod, answers from the echo app.

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use ambient::echo::{self, Mode, Reply};
use ambient::netns;
use common::{Mesh, ONE_MESH, http, http_many, wait_until};

const WEB: &str = "http://198.18.100.10";
const WEB_HOST: &str = "web.shop.svc.cluster.local";
const FLAKY: &str = "http://198.18.100.15";

/// The waypoint pod's namespace.
fn waypoint_netns() -> String {
    netns::list_ours()
        .into_iter()
        .find(|n| n.starts_with("amb-p-shop.waypoint"))
        .expect("the waypoint runs as a pod in shop")
}

fn waypoint_dump() -> serde_json::Value {
    let (code, body) =
        netns::http_get(&waypoint_netns(), "127.0.0.1:15000", "/config_dump").unwrap();
    assert_eq!(code, 200, "{body}");
    serde_json::from_str(&body).unwrap()
}

/// Which pod answered each of `n` requests.
fn answered_by(
    pod: &str,
    url: &str,
    headers: &[(&str, &str)],
    n: usize,
) -> BTreeMap<String, usize> {
    let mut count = BTreeMap::new();
    for r in http_many(pod, url, headers, n) {
        let r = r.unwrap_or_else(|e| panic!("request from {pod} to {url} failed: {e}"));
        assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
        *count.entry(r.echo().unwrap().pod).or_insert(0) += 1;
    }
    count
}

#[test]
fn waypoint_routes_and_authorizes_real_traffic() {
    let _turn = ONE_MESH.lock().unwrap_or_else(|e| e.into_inner());
    let mesh = Mesh::start("waypoint-mesh", "waypoint");
    let host = [("host", WEB_HOST)];

    // The waypoint holds the routes and policies before anything is checked.
    wait_until(
        "the waypoint's routes and policies",
        Duration::from_secs(20),
        || {
            let d = waypoint_dump();
            d["config"]["routes"]
                .as_array()
                .is_some_and(|r| r.len() == 3)
                && d["config"]["policies"]
                    .as_array()
                    .is_some_and(|p| p.len() == 2)
                && d["waypoint"]["ready"] == true
        },
    );

    // A request passes the waypoint: a header its route sets reaches the app, and one its
    // route adds to the response reaches the client.
    let r = http("shop/client", Mode::Http1, &format!("{WEB}/"), &host).unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(r.headers["x-served-through"], "waypoint");
    let seen = r.echo().unwrap();
    assert_eq!(seen.headers["x-routed-by"], vec!["waypoint".to_owned()]);
    assert!(
        seen.headers.contains_key("traceparent"),
        "{:?}",
        seen.headers
    );

    // 90/10 split over 1,000 requests, within ±3 points.
    let split = answered_by("shop/client", &format!("{WEB}/"), &host, 1000);
    let v2 = split.get("web-v2").copied().unwrap_or(0);
    let v1 = split.get("web-v1").copied().unwrap_or(0);
    assert_eq!(v1 + v2, 1000, "{split:?}");
    assert!(
        (70..=130).contains(&v2),
        "web-v2 took {v2} of 1000, not 10% ± 3: {split:?}"
    );

    // Header routing.
    let by_header = answered_by(
        "shop/client",
        &format!("{WEB}/"),
        &[("host", WEB_HOST), ("x-version", "v2")],
        20,
    );
    assert_eq!(by_header, BTreeMap::from([("web-v2".to_owned(), 20)]));

    // Redirect and path rewrite.
    let r = http("shop/client", Mode::Http1, &format!("{WEB}/old?q=1"), &host).unwrap();
    assert_eq!(r.status, 301);
    assert_eq!(
        r.headers["location"],
        "http://web.shop.svc.cluster.local/new?q=1"
    );
    let r = http(
        "shop/client",
        Mode::Http1,
        &format!("{WEB}/v1-only/page"),
        &host,
    )
    .unwrap();
    let seen = r.echo().unwrap();
    assert_eq!(
        (seen.pod.as_str(), seen.path.as_str()),
        ("web-v1", "/rewritten/page")
    );

    // L7 authorization: DENY on /admin, other paths pass; the policy sees the original
    // client's identity (frontend's client is not shop's).
    for path in ["/admin", "/admin/users"] {
        let r = http("shop/client", Mode::Http1, &format!("{WEB}{path}"), &host).unwrap();
        assert_eq!(r.status, 403, "{path}");
    }
    let ok = http("shop/client", Mode::Http1, &format!("{WEB}/private"), &host).unwrap();
    assert_eq!(ok.status, 200);
    let denied = http(
        "frontend/client",
        Mode::Http1,
        &format!("{WEB}/private"),
        &host,
    )
    .unwrap();
    assert_eq!(denied.status, 403);

    // A consumer route: frontend's clients all go to web-v2; shop's are unaffected (above).
    let consumer = answered_by("frontend/client", &format!("{WEB}/"), &host, 20);
    assert_eq!(consumer, BTreeMap::from([("web-v2".to_owned(), 20)]));

    // gRPC routed by method.
    for (method, pod) in [("Echo", "api-v1"), ("EchoV2", "api-v2")] {
        let mut req = echo::Request::new(
            Mode::Grpc,
            &format!("198.18.100.13:9090/echo.Echo/{method}"),
        )
        .unwrap();
        req.data = Some("hi".into());
        match common::send("shop/client", req) {
            Ok(Reply::Grpc(g)) => assert_eq!(g.pod, pod, "{method}"),
            other => panic!("gRPC {method}: {other:?}"),
        }
    }

    // A retry recovers from a backend that fails the first attempt; without the retry rule
    // the failure reaches the client.
    let r = http(
        "shop/client",
        Mode::Http1,
        &format!("{WEB}/retry"),
        &[("host", WEB_HOST), ("x-echo-fail-once", "retry-1")],
    )
    .unwrap();
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let r = http(
        "shop/client",
        Mode::Http1,
        &format!("{WEB}/v1-only/x"),
        &[("host", WEB_HOST), ("x-echo-fail-once", "no-retry-1")],
    )
    .unwrap();
    assert_eq!(r.status, 503);

    // A mirrored request: web-v1 answers, and web-v2 gets a copy, body and all.
    let body = "m".repeat(200_000);
    let mut req = echo::Request::new(Mode::Http1, &format!("{WEB}/mirrored")).unwrap();
    req.headers.insert("host", WEB_HOST.parse().unwrap());
    req.data = Some(body.clone());
    match common::send("shop/client", req) {
        Ok(Reply::Http(r)) => {
            let seen = r.echo().unwrap();
            assert_eq!((r.status.as_u16(), seen.pod.as_str()), (200, "web-v1"));
            assert_eq!(seen.body.len(), body.len());
        }
        other => panic!("POST /mirrored: {other:?}"),
    }
    wait_until(
        "web-v2 to get the mirrored copy",
        Duration::from_secs(5),
        || {
            mesh.log("app-shop.web-v2").lines().any(|l| {
                l.contains("method=POST")
                    && l.contains("path=/mirrored")
                    && l.contains("body_bytes=200000")
            })
        },
    );

    // A WebSocket upgrade passes the waypoint, and bytes then flow both ways.
    let (head, echoed) = common::upgrade_exchange(
        "shop/client",
        "198.18.100.10:80",
        WEB_HOST,
        "/ws",
        b"over the upgraded connection",
    )
    .unwrap();
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    assert!(
        head.to_ascii_lowercase().contains("upgrade: websocket"),
        "{head}"
    );
    assert_eq!(echoed, b"over the upgraded connection");

    // HTTP/2 without TLS (h2c) is routed like HTTP/1.1, and stays HTTP/2 to the app.
    let r = http("shop/client", Mode::H2c, &format!("{WEB}/h2c"), &host).unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(r.headers["x-served-through"], "waypoint");
    assert_eq!(r.echo().unwrap().protocol, "HTTP/2");

    // Opaque TCP (a Service port named `tcp`) passes the waypoint as bytes.
    let mut req = echo::Request::new(Mode::Tcp, "198.18.100.16:6379").unwrap();
    req.data = Some("PING store".into());
    match common::send("shop/client", req) {
        Ok(Reply::Tcp(t)) => {
            let t = String::from_utf8_lossy(&t);
            assert!(
                t.starts_with("echo shop/store ") && t.ends_with("\nPING store"),
                "{t:?}"
            );
        }
        other => panic!("TCP to store: {other:?}"),
    }
    wait_until(
        "the waypoint's log of the TCP connection",
        Duration::from_secs(5),
        || {
            mesh.log("waypoint-shop.waypoint")
                .lines()
                .any(|l| l.contains("TCP connection") && l.contains("upstream=store"))
        },
    );

    // A request timeout gives 504, promptly.
    let started = Instant::now();
    let r = http(
        "shop/client",
        Mode::Http1,
        &format!("{WEB}/slow?delay=3000"),
        &host,
    )
    .unwrap();
    assert_eq!(r.status, 504);
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );

    // Outlier detection: flaky-1 fails every request; after a few failures it is ejected and
    // flaky-2 takes everything; once healthy and its ejection over, it takes traffic again.
    let fail = |status: &str| {
        let url = format!("http://198.18.1.23:8080/echo/fail?status={status}");
        let mut req = echo::Request::new(Mode::Http1, &url).unwrap();
        req.data = Some(String::new());
        match common::send("shop/client", req) {
            Ok(Reply::Http(h)) => assert_eq!(h.status, 200, "{}", String::from_utf8_lossy(&h.body)),
            other => panic!("switching flaky-1: {other:?}"),
        }
    };
    fail("503");
    let first = http_many(
        "shop/client",
        &format!("{FLAKY}/"),
        &[("host", "flaky.shop.svc.cluster.local")],
        30,
    );
    let failures = first
        .iter()
        .filter(|r| r.as_ref().is_ok_and(|h| h.status == 503))
        .count();
    assert!(failures <= 6, "{failures} failures before ejection");
    let after = answered_by(
        "shop/client",
        &format!("{FLAKY}/"),
        &[("host", "flaky.shop.svc.cluster.local")],
        20,
    );
    assert_eq!(
        after,
        BTreeMap::from([("flaky-2".to_owned(), 20)]),
        "flaky-1 is ejected"
    );
    let ejected = waypoint_dump()["endpoints"]
        .as_array()
        .unwrap()
        .iter()
        .any(|e| e["address"] == "198.18.1.23:8080" && e["ejectedForMs"].as_u64().unwrap_or(0) > 0);
    assert!(ejected, "{}", waypoint_dump()["endpoints"]);
    fail("0");
    std::thread::sleep(Duration::from_millis(5500));
    let back = answered_by(
        "shop/client",
        &format!("{FLAKY}/"),
        &[("host", "flaky.shop.svc.cluster.local")],
        40,
    );
    assert!(
        back.get("flaky-1").copied().unwrap_or(0) > 0,
        "flaky-1 takes traffic again: {back:?}"
    );

    // The waypoint counted requests with Istio's metric names.
    let (_, metrics) = netns::http_get(&waypoint_netns(), "127.0.0.1:15020", "/metrics").unwrap();
    assert!(metrics.contains("istio_requests_total{"), "{metrics}");
    assert!(metrics.contains("response_code=\"403\""), "{metrics}");
    assert!(metrics.contains("istio_request_duration_milliseconds_bucket{"));
    let denied_line = metrics
        .lines()
        .find(|l| {
            l.starts_with("istio_requests_total{")
                && l.contains("response_code=\"403\"")
                && l.contains("source_workload_namespace=\"shop\"")
        })
        .unwrap_or_else(|| panic!("no 403 from shop in {metrics}"));
    for label in [
        "source_workload=\"client\"",
        "source_principal=\"spiffe://cluster.local/ns/shop/sa/client\"",
        "destination_service=\"web.shop.svc.cluster.local\"",
    ] {
        assert!(denied_line.contains(label), "{label} in {denied_line}");
    }

    // One access-log event per request, naming the client's identity and the outcome.
    let log = mesh.log("waypoint-shop.waypoint");
    let admin: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("request") && l.contains("path=/admin/users"))
        .collect();
    assert_eq!(admin.len(), 1, "{admin:?}");
    assert!(
        admin[0].contains("status=403") && admin[0].contains("ns/shop/sa/client"),
        "{}",
        admin[0]
    );

    // A waypoint for workloads too: traffic addressed to a shop pod goes through it, a pod
    // labelled `istio.io/use-waypoint: none` is reached directly, and a client outside the
    // mesh, whose plaintext cannot pass the waypoint, is refused by the pod's ztunnel.
    edit(
        &mesh,
        "namespaces.yaml",
        "  name: waypoint\n  namespace: shop\n",
        "  name: waypoint\n  namespace: shop\n  labels: {istio.io/waypoint-for: all}\n",
    );
    edit(
        &mesh,
        "workloads.yaml",
        "labels: {app: web, version: v2}}",
        "labels: {app: web, version: v2, istio.io/use-waypoint: none}}",
    );
    const WEB_V1_POD: &str = "http://198.18.2.20:8080";
    const WEB_V2_POD: &str = "http://198.18.1.20:8080";
    let from_frontend = |url: String| http("frontend/client", Mode::Http1, &url, &[]);
    let through_waypoint = |path: &str| {
        mesh.log("waypoint-shop.waypoint")
            .lines()
            .any(|l| l.contains(&format!("path={path} ")))
    };
    wait_until(
        "traffic to the web-v1 pod to pass the waypoint",
        Duration::from_secs(10),
        || {
            from_frontend(format!("{WEB_V1_POD}/to-the-pod")).is_ok_and(|r| r.status == 200)
                && through_waypoint("/to-the-pod")
        },
    );
    let r = from_frontend(format!("{WEB_V2_POD}/opted-out")).unwrap();
    assert_eq!(r.echo().unwrap().pod, "web-v2");
    assert!(
        !through_waypoint("/opted-out"),
        "web-v2 opted out of the waypoint"
    );

    edit(
        &mesh,
        "namespaces.yaml",
        "  name: frontend\n  labels:\n    istio.io/dataplane-mode: ambient",
        "  name: frontend\n  labels:\n    istio.io/dataplane-mode: none",
    );
    wait_until(
        "frontend's client to leave the mesh and be refused by web-v1",
        Duration::from_secs(10),
        || from_frontend(format!("{WEB_V1_POD}/bypass")).is_err(),
    );
    assert!(
        mesh.log("ztunnel-node-b").contains(
            "traffic to shop/web-v1 must pass through waypoint shop/waypoint; \
             plaintext from 198.18.1.11 is not one of its pods"
        ),
        "the refusal is explained in the destination ztunnel's log"
    );
    let r = from_frontend(format!("{WEB_V2_POD}/plain")).unwrap();
    assert_eq!(
        r.echo().unwrap().pod,
        "web-v2",
        "a pod without a waypoint takes plaintext"
    );
    drop(mesh);
}

/// Replaces `from` (which must be there) with `to` in the mesh's copy of `file`.
fn edit(mesh: &Mesh, file: &str, from: &str, to: &str) {
    let path = mesh.config.join(file);
    let text = std::fs::read_to_string(&path).unwrap();
    assert!(text.contains(from), "{from:?} in {file}");
    std::fs::write(&path, text.replacen(from, to, 1)).unwrap();
}
