//! Route tables: the HTTPRoutes and GRPCRoutes attached to each Service, compiled for
//! matching, with Gateway API's precedence and its consumer/producer split.
//!
//! - Every (rule, match) pair of every route attached to a Service is one entry; entries are
//!   ordered once, when config arrives: an exact path beats a prefix, a longer prefix a shorter
//!   one, then a method match, more header matches, more query matches; a tie goes to the older
//!   route, then to `namespace/name`, then to the order in the route.
//! - A route in the Service's own namespace is a *producer* route and applies to every client.
//!   A route in another namespace is a *consumer* route and applies only to clients in that
//!   namespace; a client whose namespace has consumer routes for the Service sees only those.
//! - A Service with routes for a port, none of which matches, answers 404; a Service with no
//!   route for the port is passed through unchanged.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use http::header::{HeaderName, HeaderValue};
use http::{HeaderMap, Method};
use mesh_proto::waypoint as pb;
use regex_lite::Regex;

/// A route resource that cannot be used, and why (the reply to istiod-lite names it).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct InvalidRoute(String);

fn invalid(msg: impl Into<String>) -> InvalidRoute {
    InvalidRoute(msg.into())
}

/// Which route a rule came from, for logs, metrics and tie-breaking.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteName {
    pub kind: &'static str,
    pub namespace: String,
    pub name: String,
}

impl std::fmt::Display for RouteName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}/{}", self.namespace, self.kind, self.name)
    }
}

/// A route resource, checked and compiled.
#[derive(Debug)]
pub struct Route {
    pub name: RouteName,
    pub created: i64,
    pub parents: Vec<(String, u16)>,
    pub rules: Vec<Arc<Rule>>,
    /// Per rule, its matches (index into `rules`).
    matches: Vec<(usize, Match)>,
}

#[derive(Debug)]
pub struct Rule {
    pub route: RouteName,
    /// Position of the rule in its route.
    pub index: usize,
    pub filters: Vec<Filter>,
    pub backends: Vec<Backend>,
    pub total_weight: u64,
    pub request_timeout: Option<Duration>,
    pub backend_timeout: Option<Duration>,
    pub retry: Option<Retry>,
}

#[derive(Debug, Clone)]
pub struct Retry {
    pub attempts: u32,
    pub codes: Vec<u16>,
    pub backoff: Duration,
}

impl Retry {
    pub fn retries_status(&self, status: u16) -> bool {
        self.codes.contains(&status)
    }
}

#[derive(Debug, Clone)]
pub struct Backend {
    /// The Service's hostname and port, or why the reference cannot be used.
    pub target: Result<(String, u16), String>,
    pub weight: u32,
    pub filters: Vec<Filter>,
}

#[derive(Debug, Clone)]
pub enum Filter {
    RequestHeaders(HeaderModifier),
    ResponseHeaders(HeaderModifier),
    Redirect(Redirect),
    Rewrite(Rewrite),
    Mirror { backend: Backend, percent: u32 },
}

#[derive(Debug, Clone, Default)]
pub struct HeaderModifier {
    pub set: Vec<(HeaderName, HeaderValue)>,
    pub add: Vec<(HeaderName, HeaderValue)>,
    pub remove: Vec<HeaderName>,
}

impl HeaderModifier {
    pub fn apply(&self, headers: &mut HeaderMap) {
        for (k, v) in &self.set {
            headers.insert(k.clone(), v.clone());
        }
        for (k, v) in &self.add {
            headers.append(k.clone(), v.clone());
        }
        for k in &self.remove {
            headers.remove(k);
        }
    }
}

#[derive(Debug, Clone)]
pub enum PathModifier {
    Full(String),
    Prefix(String),
}

impl PathModifier {
    /// The new path for `path` (without query), which matched `matched` (the match's prefix,
    /// when it was a prefix match).
    pub fn apply(&self, path: &str, matched: Option<&str>) -> String {
        match self {
            PathModifier::Full(p) => p.clone(),
            PathModifier::Prefix(replacement) => {
                let Some(prefix) = matched else {
                    // Not matched by a prefix: the whole path is the matched prefix.
                    return replacement.clone();
                };
                let prefix = prefix.trim_end_matches('/');
                let rest = path.get(prefix.len()..).unwrap_or_default();
                let mut out = replacement.trim_end_matches('/').to_owned();
                if !rest.is_empty() && !rest.starts_with('/') {
                    out.push('/');
                }
                out.push_str(rest);
                if out.is_empty() {
                    out.push('/');
                }
                out
            }
        }
    }
}

#[derive(Debug, Clone)]
pub struct Redirect {
    pub scheme: Option<String>,
    pub hostname: Option<String>,
    pub path: Option<PathModifier>,
    pub port: Option<u16>,
    pub status: u16,
}

#[derive(Debug, Clone)]
pub struct Rewrite {
    pub hostname: Option<HeaderValue>,
    pub path: Option<PathModifier>,
}

#[derive(Debug)]
struct Match {
    path: PathMatch,
    headers: Vec<(HeaderName, ValueMatch)>,
    query: Vec<(String, ValueMatch)>,
    method: Option<Method>,
}

#[derive(Debug)]
enum PathMatch {
    Exact(String),
    /// Without a trailing slash, except the root itself.
    Prefix(String),
    Regex(Regex),
}

#[derive(Debug)]
enum ValueMatch {
    Exact(String),
    Regex(Regex),
}

impl ValueMatch {
    fn matches(&self, v: &str) -> bool {
        match self {
            ValueMatch::Exact(e) => e == v,
            ValueMatch::Regex(r) => r.is_match(v),
        }
    }
}

/// The parts of a request a route looks at.
pub struct RequestView<'a> {
    pub method: &'a Method,
    pub path: &'a str,
    pub query: Option<&'a str>,
    pub headers: &'a HeaderMap,
}

impl Match {
    fn matches(&self, req: &RequestView<'_>) -> bool {
        let path_ok = match &self.path {
            PathMatch::Exact(p) => req.path == p,
            PathMatch::Prefix(p) => prefix_matches(p, req.path),
            PathMatch::Regex(r) => r.is_match(req.path),
        };
        path_ok
            && self.method.as_ref().is_none_or(|m| m == req.method)
            && self.headers.iter().all(|(name, m)| {
                req.headers
                    .get(name)
                    .and_then(|v| v.to_str().ok())
                    .is_some_and(|v| m.matches(v))
            })
            && self
                .query
                .iter()
                .all(|(name, m)| query_value(req.query, name).is_some_and(|v| m.matches(&v)))
    }

    fn matched_prefix(&self) -> Option<&str> {
        match &self.path {
            PathMatch::Prefix(p) => Some(p),
            _ => None,
        }
    }

    /// Gateway API precedence, larger first.
    fn rank(&self) -> (u8, usize, bool, usize, usize) {
        let (kind, len) = match &self.path {
            PathMatch::Exact(p) => (2, p.len()),
            PathMatch::Prefix(p) => (1, p.len()),
            PathMatch::Regex(_) => (0, 0),
        };
        (
            kind,
            len,
            self.method.is_some(),
            self.headers.len(),
            self.query.len(),
        )
    }
}

/// Element-wise prefix: "/foo" matches "/foo" and "/foo/bar", not "/foobar".
fn prefix_matches(prefix: &str, path: &str) -> bool {
    if prefix == "/" {
        return true;
    }
    match path.strip_prefix(prefix) {
        Some(rest) => rest.is_empty() || rest.starts_with('/'),
        None => false,
    }
}

/// The first value of query parameter `name`, percent-decoded.
fn query_value(query: Option<&str>, name: &str) -> Option<String> {
    query?.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        (percent_decode(k) == name).then(|| percent_decode(v))
    })
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).ok();
                match hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                    Some(b) => {
                        out.push(b);
                        i += 3;
                    }
                    None => {
                        out.push(b'%');
                        i += 1;
                    }
                }
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn anchored(pattern: &str, what: &str) -> Result<Regex, InvalidRoute> {
    Regex::new(&format!("^(?:{pattern})$")).map_err(|e| {
        invalid(format!(
            "{what}: invalid regular expression {pattern:?}: {e}"
        ))
    })
}

fn header_name(name: &str, what: &str) -> Result<HeaderName, InvalidRoute> {
    HeaderName::from_bytes(name.to_ascii_lowercase().as_bytes())
        .map_err(|_| invalid(format!("{what}: {name:?} is not a valid header name")))
}

fn header_value(value: &str, what: &str) -> Result<HeaderValue, InvalidRoute> {
    HeaderValue::from_str(value)
        .map_err(|_| invalid(format!("{what}: {value:?} is not a valid header value")))
}

fn value_match(kind: i32, value: &str, what: &str) -> Result<ValueMatch, InvalidRoute> {
    match pb::MatchKind::try_from(kind) {
        Ok(pb::MatchKind::Exact) => Ok(ValueMatch::Exact(value.to_owned())),
        Ok(pb::MatchKind::Regex) => Ok(ValueMatch::Regex(anchored(value, what)?)),
        _ => Err(invalid(format!(
            "{what}: match kind {kind} is not supported (exact or regex)"
        ))),
    }
}

fn compile_match(m: &pb::RouteMatch, what: &str) -> Result<Match, InvalidRoute> {
    let path = match &m.path {
        None => PathMatch::Prefix("/".to_owned()),
        Some(p) => match pb::MatchKind::try_from(p.kind) {
            Ok(pb::MatchKind::Exact) => {
                if !p.value.starts_with('/') {
                    return Err(invalid(format!(
                        "{what}: path {:?} must start with '/'",
                        p.value
                    )));
                }
                PathMatch::Exact(p.value.clone())
            }
            Ok(pb::MatchKind::Prefix) => {
                if !p.value.starts_with('/') {
                    return Err(invalid(format!(
                        "{what}: path prefix {:?} must start with '/'",
                        p.value
                    )));
                }
                let trimmed = p.value.trim_end_matches('/');
                PathMatch::Prefix(if trimmed.is_empty() {
                    "/".to_owned()
                } else {
                    trimmed.to_owned()
                })
            }
            Ok(pb::MatchKind::Regex) => {
                PathMatch::Regex(anchored(&p.value, &format!("{what} path"))?)
            }
            Err(_) => {
                return Err(invalid(format!(
                    "{what}: unknown path match kind {}",
                    p.kind
                )));
            }
        },
    };
    let headers = m
        .headers
        .iter()
        .map(|h| {
            let w = format!("{what} header {:?}", h.name);
            Ok((
                header_name(&h.name, &w)?,
                value_match(h.kind, &h.value, &w)?,
            ))
        })
        .collect::<Result<_, InvalidRoute>>()?;
    let query = m
        .query
        .iter()
        .map(|q| {
            let w = format!("{what} query parameter {:?}", q.name);
            Ok((q.name.clone(), value_match(q.kind, &q.value, &w)?))
        })
        .collect::<Result<_, InvalidRoute>>()?;
    let method = if m.method.is_empty() {
        None
    } else {
        Some(
            Method::from_bytes(m.method.as_bytes())
                .map_err(|_| invalid(format!("{what}: {:?} is not a method", m.method)))?,
        )
    };
    Ok(Match {
        path,
        headers,
        query,
        method,
    })
}

fn compile_headers(h: &pb::HeaderModifier, what: &str) -> Result<HeaderModifier, InvalidRoute> {
    let pairs = |list: &[pb::Header]| {
        list.iter()
            .map(|x| Ok((header_name(&x.name, what)?, header_value(&x.value, what)?)))
            .collect::<Result<Vec<_>, InvalidRoute>>()
    };
    Ok(HeaderModifier {
        set: pairs(&h.set)?,
        add: pairs(&h.add)?,
        remove: h
            .remove
            .iter()
            .map(|n| header_name(n, what))
            .collect::<Result<_, _>>()?,
    })
}

fn compile_path_modifier(p: &Option<pb::PathModifier>) -> Option<PathModifier> {
    match p.as_ref()?.kind.as_ref()? {
        pb::path_modifier::Kind::Full(f) => Some(PathModifier::Full(f.clone())),
        pb::path_modifier::Kind::Prefix(p) => Some(PathModifier::Prefix(p.clone())),
    }
}

fn compile_filter(f: &pb::Filter, what: &str) -> Result<Filter, InvalidRoute> {
    use pb::filter::Kind;
    let Some(kind) = &f.kind else {
        return Err(invalid(format!("{what}: empty filter")));
    };
    Ok(match kind {
        Kind::RequestHeaders(h) => Filter::RequestHeaders(compile_headers(h, what)?),
        Kind::ResponseHeaders(h) => Filter::ResponseHeaders(compile_headers(h, what)?),
        Kind::Redirect(r) => Filter::Redirect(Redirect {
            scheme: (!r.scheme.is_empty()).then(|| r.scheme.to_ascii_lowercase()),
            hostname: (!r.hostname.is_empty()).then(|| r.hostname.clone()),
            path: compile_path_modifier(&r.path),
            port: u16::try_from(r.port).ok().filter(|p| *p != 0),
            status: match r.status_code {
                0 => 302,
                c @ (301 | 302 | 303 | 307 | 308) => c as u16,
                c => {
                    return Err(invalid(format!(
                        "{what}: redirect status {c} is not a redirect"
                    )));
                }
            },
        }),
        Kind::Rewrite(r) => Filter::Rewrite(Rewrite {
            hostname: if r.hostname.is_empty() {
                None
            } else {
                Some(header_value(&r.hostname, what)?)
            },
            path: compile_path_modifier(&r.path),
        }),
        Kind::Mirror(m) => {
            let Some(b) = &m.backend else {
                return Err(invalid(format!("{what}: mirror without a backend")));
            };
            Filter::Mirror {
                backend: compile_backend(b, what)?,
                percent: if m.percent == 0 {
                    100
                } else {
                    m.percent.min(100)
                },
            }
        }
    })
}

fn compile_backend(b: &pb::Backend, what: &str) -> Result<Backend, InvalidRoute> {
    let target = if !b.invalid.is_empty() {
        Err(b.invalid.clone())
    } else {
        match u16::try_from(b.port) {
            Ok(p) if p != 0 && !b.hostname.is_empty() => Ok((b.hostname.clone(), p)),
            _ => Err(format!(
                "backend {:?} port {} is not usable",
                b.hostname, b.port
            )),
        }
    };
    Ok(Backend {
        target,
        weight: b.weight,
        filters: b
            .filters
            .iter()
            .map(|f| compile_filter(f, &format!("{what} backend {:?}", b.hostname)))
            .collect::<Result<_, _>>()?,
    })
}

impl Route {
    /// Checks and compiles a route resource.
    pub fn compile(r: &pb::Route) -> Result<Self, InvalidRoute> {
        let kind = match pb::RouteKind::try_from(r.kind) {
            Ok(pb::RouteKind::Grpc) => "grpcroute",
            _ => "httproute",
        };
        let name = RouteName {
            kind,
            namespace: r.namespace.clone(),
            name: r.name.clone(),
        };
        let mut rules = Vec::with_capacity(r.rules.len());
        let mut matches = Vec::new();
        for (i, rule) in r.rules.iter().enumerate() {
            let what = format!("rule {i}");
            if rule.matches.is_empty() {
                matches.push((i, compile_match(&pb::RouteMatch::default(), &what)?));
            }
            for m in &rule.matches {
                matches.push((i, compile_match(m, &what)?));
            }
            let backends: Vec<Backend> = rule
                .backends
                .iter()
                .map(|b| compile_backend(b, &what))
                .collect::<Result<_, _>>()?;
            let retry = rule.retry.as_ref().map(|r| Retry {
                attempts: r.attempts.min(10),
                codes: r
                    .codes
                    .iter()
                    .filter_map(|c| u16::try_from(*c).ok())
                    .collect(),
                backoff: Duration::from_millis(u64::from(r.backoff_ms)),
            });
            rules.push(Arc::new(Rule {
                route: name.clone(),
                index: i,
                filters: rule
                    .filters
                    .iter()
                    .map(|f| compile_filter(f, &what))
                    .collect::<Result<_, _>>()?,
                total_weight: backends.iter().map(|b| u64::from(b.weight)).sum(),
                backends,
                request_timeout: ms(rule.request_timeout_ms),
                backend_timeout: ms(rule.backend_timeout_ms),
                retry: retry.filter(|r| r.attempts > 0),
            }));
        }
        let parents = r
            .parents
            .iter()
            .map(|p| (p.hostname.clone(), u16::try_from(p.port).unwrap_or(0)))
            .collect();
        Ok(Self {
            name,
            created: r.created,
            parents,
            rules,
            matches,
        })
    }
}

fn ms(v: u32) -> Option<Duration> {
    (v > 0).then(|| Duration::from_millis(u64::from(v)))
}

/// One (rule, match) pair in a Service's table.
#[derive(Debug)]
struct Entry {
    route: Arc<Route>,
    match_index: usize,
    /// The Service port the route is limited to, 0 for all.
    port: u16,
}

impl Entry {
    fn m(&self) -> &Match {
        &self.route.matches[self.match_index].1
    }

    fn rule(&self) -> &Arc<Rule> {
        &self.route.rules[self.route.matches[self.match_index].0]
    }
}

/// The routes of one Service.
#[derive(Debug, Default)]
struct ServiceRoutes {
    producer: Vec<Entry>,
    /// By the namespace of the clients they apply to.
    consumer: HashMap<String, Vec<Entry>>,
}

/// What routing decided for a request.
#[derive(Debug)]
pub enum Decision {
    /// No route is attached to this Service port: send the request on unchanged.
    PassThrough,
    /// Routes are attached and none matches: 404.
    NoMatch,
    Matched {
        rule: Arc<Rule>,
        /// The path prefix the request matched, for prefix rewrites.
        prefix: Option<String>,
    },
}

/// Every Service's routes.
#[derive(Debug, Default)]
pub struct RouteTable {
    services: HashMap<String, ServiceRoutes>,
}

impl RouteTable {
    /// The table for `routes`; `namespace_of` gives a Service hostname's namespace (the
    /// namespace a route must be in to be a producer route).
    pub fn build<'a>(
        routes: impl IntoIterator<Item = &'a Arc<Route>>,
        namespace_of: impl Fn(&str) -> Option<String>,
    ) -> Self {
        let mut services: HashMap<String, ServiceRoutes> = HashMap::new();
        for r in routes {
            for (host, port) in &r.parents {
                let entries = (0..r.matches.len()).map(|i| Entry {
                    route: Arc::clone(r),
                    match_index: i,
                    port: *port,
                });
                let svc = services.entry(host.clone()).or_default();
                let producer = namespace_of(host).is_none_or(|ns| ns == r.name.namespace);
                if producer {
                    svc.producer.extend(entries);
                } else {
                    svc.consumer
                        .entry(r.name.namespace.clone())
                        .or_default()
                        .extend(entries);
                }
            }
        }
        for svc in services.values_mut() {
            sort(&mut svc.producer);
            for v in svc.consumer.values_mut() {
                sort(v);
            }
        }
        Self { services }
    }

    pub fn is_empty(&self) -> bool {
        self.services.is_empty()
    }

    /// Routes a request from a client in `client_ns` to `service`:`port`.
    pub fn decide(
        &self,
        service: &str,
        port: u16,
        client_ns: &str,
        req: &RequestView<'_>,
    ) -> Decision {
        let Some(svc) = self.services.get(service) else {
            return Decision::PassThrough;
        };
        fn for_port(entries: &[Entry], port: u16) -> Option<&[Entry]> {
            entries
                .iter()
                .any(|e| e.port == 0 || e.port == port)
                .then_some(entries)
        }
        let entries = svc
            .consumer
            .get(client_ns)
            .and_then(|v| for_port(v, port))
            .or_else(|| for_port(&svc.producer, port));
        let Some(entries) = entries else {
            return Decision::PassThrough;
        };
        entries
            .iter()
            .filter(|e| e.port == 0 || e.port == port)
            .find(|e| e.m().matches(req))
            .map_or(Decision::NoMatch, |e| Decision::Matched {
                rule: Arc::clone(e.rule()),
                prefix: e.m().matched_prefix().map(str::to_owned),
            })
    }
}

fn sort(entries: &mut [Entry]) {
    entries.sort_by(|a, b| {
        b.m()
            .rank()
            .cmp(&a.m().rank())
            .then(a.route.created.cmp(&b.route.created))
            .then_with(|| {
                (&a.route.name.namespace, &a.route.name.name)
                    .cmp(&(&b.route.name.namespace, &b.route.name.name))
            })
            .then(a.match_index.cmp(&b.match_index))
    });
}

#[cfg(test)]
mod tests;
