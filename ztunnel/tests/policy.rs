//! L4 authorization on inbound HBONE: a CONNECT from a peer no policy allows is answered 401
//! with the reason, and an allowed one reaches the workload. Policies are put in the store
//! directly, as xDS would.

#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use mesh_core::SpiffeId;
use mesh_core::testing::{h2_connect, issue};
use ztunnel::Ztunnel;
use ztunnel::state::Snapshot;
use ztunnel::state::policy::{
    Authorization, Clause, Match, PolicyAction, PolicyScope, Rule, StringMatch,
};
use ztunnel::testing::{EOF_MARKER, TestMesh, echo_server, http_get};

fn id(sa: &str) -> SpiffeId {
    SpiffeId::new("cluster.local", "default", sa).unwrap()
}

/// Adds `policies` to what the ztunnel already knows.
fn install(z: &Ztunnel, policies: Vec<Authorization>) {
    let store = &z.state().store;
    let snap = store.snapshot();
    let workloads = snap.workloads().map(|w| (**w).clone()).collect();
    let services = snap.services().map(|s| (**s).clone()).collect();
    store.replace(Snapshot::with_policies(workloads, services, policies));
}

fn allow_client_only() -> Authorization {
    Authorization {
        name: "allow-client".into(),
        namespace: "default".into(),
        scope: PolicyScope::Namespace,
        action: PolicyAction::Allow,
        rules: vec![Rule {
            clauses: vec![Clause {
                matches: vec![Match {
                    principals: vec![StringMatch::Exact(
                        "cluster.local/ns/default/sa/client".into(),
                    )],
                    ..Default::default()
                }],
            }],
        }],
        dry_run: false,
    }
}

fn connect_req(authority: &str) -> Request<()> {
    Request::builder()
        .method(Method::CONNECT)
        .uri(authority)
        .body(())
        .unwrap()
}

#[tokio::test]
async fn a_connect_no_policy_allows_gets_401_and_an_allowed_one_goes_through() {
    let mesh = TestMesh::new();
    let b = mesh.ztunnel("node-b").await;
    let _echo = echo_server(SocketAddr::new(mesh.ip(20), 8080)).await;
    install(&b, vec![allow_client_only()]);
    let server = SocketAddr::new(mesh.ip(20), mesh.hbone_port);
    let target = format!("{}:8080", mesh.ip(20));

    // A peer with a valid mesh identity that the policy does not name.
    let cert = issue(&mesh.ca, &id("intruder"));
    let send = h2_connect(&cert, id("server"), server).await.unwrap();
    let mut ready = send.ready().await.unwrap();
    let (resp, _stream) = ready.send_request(connect_req(&target), false).unwrap();
    let resp = resp.await.unwrap();
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(
        resp.headers().get("x-mesh-reason").unwrap(),
        "no ALLOW policy matched (default/allow-client)"
    );

    // The named peer is let through, and bytes flow both ways.
    let cert = issue(&mesh.ca, &id("client"));
    let send = h2_connect(&cert, id("server"), server).await.unwrap();
    let mut ready = send.ready().await.unwrap();
    let (resp, mut stream) = ready.send_request(connect_req(&target), false).unwrap();
    let resp = resp.await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    stream
        .send_data(Bytes::from_static(b"hello"), true)
        .unwrap();
    let mut body = resp.into_body();
    let mut back = Vec::new();
    while let Some(chunk) = body.data().await {
        let chunk = chunk.unwrap();
        body.flow_control().release_capacity(chunk.len()).unwrap();
        back.extend_from_slice(&chunk);
    }
    assert_eq!(back, [b"hello".as_slice(), EOF_MARKER].concat());

    let metrics = http_get(b.addrs.metrics.unwrap(), "/metrics").await.1;
    assert!(
        metrics.contains(
            "ztunnel_connections_refused_total{direction=\"inbound\",reason=\"policy_denied\"} 1"
        ),
        "{metrics}"
    );
}
