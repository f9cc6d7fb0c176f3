use super::*;
use crate::routes::PathModifier;

#[test]
fn protocols_are_told_apart_from_the_first_bytes() {
    assert_eq!(classify(b""), None);
    assert_eq!(classify(b"PRI * HT"), None);
    assert_eq!(classify(b"PRI * HTTP/2.0\r\n"), Some(Detected::Http2));
    assert_eq!(classify(b"GE"), None);
    assert_eq!(classify(b"GET / HTTP/1.1\r\n"), Some(Detected::Http1));
    assert_eq!(classify(b"OPTIONS * HTTP/1.1"), Some(Detected::Http1));
    assert_eq!(classify(b"\x16\x03\x01"), Some(Detected::Tcp));
    assert_eq!(classify(b"GETX"), Some(Detected::Tcp));
    assert_eq!(classify(b"SSH-2.0"), Some(Detected::Tcp));
}

fn location(r: &Redirect, host: &str, uri: &str, prefix: Option<&str>, port: u16) -> (u16, String) {
    let resp = redirect(r, host, &uri.parse().unwrap(), prefix, port);
    (
        resp.status().as_u16(),
        resp.headers()[header::LOCATION]
            .to_str()
            .unwrap()
            .to_owned(),
    )
}

#[test]
fn redirects_follow_gateway_api_port_rules() {
    let base = Redirect {
        scheme: None,
        hostname: None,
        path: None,
        port: None,
        status: 302,
    };
    assert_eq!(
        location(&base, "echo:80", "/a?x=1", None, 80),
        (302, "http://echo/a?x=1".into())
    );
    // No scheme, no port: the service port, shown unless well known.
    assert_eq!(
        location(&base, "echo:8080", "/a", None, 8080),
        (302, "http://echo:8080/a".into())
    );
    let https = Redirect {
        scheme: Some("https".into()),
        status: 301,
        ..base.clone()
    };
    assert_eq!(
        location(&https, "echo:8080", "/a", None, 8080),
        (301, "https://echo/a".into())
    );
    let host_port = Redirect {
        hostname: Some("example.org".into()),
        port: Some(8443),
        path: Some(PathModifier::Prefix("/new".into())),
        ..base.clone()
    };
    assert_eq!(
        location(&host_port, "echo", "/old/x", Some("/old"), 80),
        (302, "http://example.org:8443/new/x".into())
    );
}

#[test]
fn hosts_lose_their_port_but_not_ipv6_brackets() {
    assert_eq!(host_without_port("echo:80"), "echo");
    assert_eq!(host_without_port("echo"), "echo");
    assert_eq!(host_without_port("[fd00::1]:80"), "[fd00::1]");
    assert_eq!(host_without_port("[fd00::1]"), "[fd00::1]");
}

#[test]
fn trace_context_keeps_the_trace_and_adds_a_hop() {
    let mut h = HeaderMap::new();
    trace_context(&mut h);
    let first = h["traceparent"].to_str().unwrap().to_owned();
    let parts: Vec<&str> = first.split('-').collect();
    assert_eq!(parts.len(), 4);
    assert_eq!(
        (parts[0], parts[1].len(), parts[2].len(), parts[3]),
        ("00", 32, 16, "01")
    );
    trace_context(&mut h);
    let second = h["traceparent"].to_str().unwrap().to_owned();
    let again: Vec<&str> = second.split('-').collect();
    assert_eq!(again[1], parts[1], "same trace");
    assert_ne!(again[2], parts[2], "new parent id");
    h.insert("traceparent", "garbage".parse().unwrap());
    trace_context(&mut h);
    assert_eq!(h["traceparent"].to_str().unwrap().split('-').count(), 4);
}

#[test]
fn hop_by_hop_headers_are_not_forwarded() {
    let mut h = HeaderMap::new();
    h.insert(header::CONNECTION, "keep-alive, x-private".parse().unwrap());
    h.insert("x-private", "1".parse().unwrap());
    h.insert("keep-alive", "timeout=5".parse().unwrap());
    h.insert(header::TE, "gzip".parse().unwrap());
    h.insert("x-kept", "1".parse().unwrap());
    strip_hop_by_hop(&mut h, false);
    assert!(!h.contains_key("x-private") && !h.contains_key("keep-alive"));
    assert!(!h.contains_key(header::CONNECTION) && !h.contains_key(header::TE));
    assert!(h.contains_key("x-kept"));
    let mut ws = HeaderMap::new();
    ws.insert(header::CONNECTION, "Upgrade".parse().unwrap());
    ws.insert(header::UPGRADE, "websocket".parse().unwrap());
    strip_hop_by_hop(&mut ws, true);
    assert_eq!(ws[header::UPGRADE], "websocket");
    assert_eq!(ws[header::CONNECTION], "Upgrade");
}

#[test]
fn upstream_requests_are_addressed_per_version() {
    let uri: Uri = "http://web.shop:80/a/b?c=d".parse().unwrap();
    assert_eq!(
        upstream_uri(&uri, "web.shop", Version::Http1).to_string(),
        "/a/b?c=d"
    );
    assert_eq!(
        upstream_uri(&uri, "web.shop", Version::Http2).to_string(),
        "http://web.shop/a/b?c=d"
    );
    let mut u: Uri = "/old?q=1".parse().unwrap();
    set_path(&mut u, "/new");
    assert_eq!(u.to_string(), "/new?q=1");
}
