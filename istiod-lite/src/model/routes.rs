//! HTTPRoute and GRPCRoute, typed, and the checks that make a broken one an error naming its
//! field (so the store keeps its last good version) rather than a surprise at the waypoint.

use std::collections::BTreeMap;

use serde::Deserialize;
use serde_json::Value;

use super::Metadata;

/// An HTTPRoute or a GRPCRoute.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct Route {
    pub metadata: Metadata,
    #[serde(default)]
    pub spec: RouteSpec,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RouteSpec {
    #[serde(default)]
    pub parent_refs: Vec<ParentRef>,
    #[serde(default)]
    pub hostnames: Vec<String>,
    #[serde(default)]
    pub rules: Vec<RouteRule>,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ParentRef {
    #[serde(default)]
    pub group: Option<String>,
    #[serde(default)]
    pub kind: Option<String>,
    pub name: String,
    #[serde(default)]
    pub namespace: Option<String>,
    #[serde(default)]
    pub port: Option<u16>,
    #[serde(default)]
    pub section_name: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RouteRule {
    #[serde(default)]
    pub matches: Vec<RouteMatch>,
    #[serde(default)]
    pub filters: Vec<RouteFilter>,
    #[serde(default)]
    pub backend_refs: Vec<BackendRef>,
    #[serde(default)]
    pub timeouts: Option<RouteTimeouts>,
    #[serde(default)]
    pub retry: Option<RouteRetry>,
    /// Fields the mesh does not act on (`name`, `sessionPersistence` …): reported in status.
    #[serde(flatten)]
    pub rest: BTreeMap<String, Value>,
}

/// An HTTPRoute or GRPCRoute match: HTTPRoutes use `path`, `queryParams` and a method name,
/// GRPCRoutes a `method` of service and method.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RouteMatch {
    #[serde(default)]
    pub path: Option<PathMatchSpec>,
    #[serde(default)]
    pub headers: Vec<KeyMatchSpec>,
    #[serde(default)]
    pub query_params: Vec<KeyMatchSpec>,
    #[serde(default)]
    pub method: Option<MethodMatchSpec>,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PathMatchSpec {
    /// `Exact`, `PathPrefix` (the default) or `RegularExpression`.
    #[serde(default, rename = "type")]
    pub type_: Option<String>,
    #[serde(default)]
    pub value: Option<String>,
}

/// A header or query parameter match.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct KeyMatchSpec {
    /// `Exact` (the default) or `RegularExpression`.
    #[serde(default, rename = "type")]
    pub type_: Option<String>,
    pub name: String,
    pub value: String,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(untagged)]
pub enum MethodMatchSpec {
    /// HTTPRoute: `GET`, `POST` …
    Http(String),
    /// GRPCRoute.
    Grpc(GrpcMethodSpec),
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct GrpcMethodSpec {
    /// `Exact` (the default) or `RegularExpression`.
    #[serde(default, rename = "type")]
    pub type_: Option<String>,
    #[serde(default)]
    pub service: Option<String>,
    #[serde(default)]
    pub method: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RouteFilter {
    #[serde(rename = "type")]
    pub type_: String,
    #[serde(default)]
    pub request_header_modifier: Option<HeaderModifierSpec>,
    #[serde(default)]
    pub response_header_modifier: Option<HeaderModifierSpec>,
    #[serde(default)]
    pub request_redirect: Option<RedirectSpec>,
    #[serde(default)]
    pub url_rewrite: Option<RewriteSpec>,
    #[serde(default)]
    pub request_mirror: Option<MirrorSpec>,
    /// `extensionRef`, `cors` …: refused by validation.
    #[serde(flatten)]
    pub rest: BTreeMap<String, Value>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HeaderModifierSpec {
    #[serde(default)]
    pub set: Vec<HeaderValueSpec>,
    #[serde(default)]
    pub add: Vec<HeaderValueSpec>,
    #[serde(default)]
    pub remove: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HeaderValueSpec {
    pub name: String,
    pub value: String,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RedirectSpec {
    #[serde(default)]
    pub scheme: Option<String>,
    #[serde(default)]
    pub hostname: Option<String>,
    #[serde(default)]
    pub path: Option<PathModifierSpec>,
    #[serde(default)]
    pub port: Option<u16>,
    #[serde(default)]
    pub status_code: Option<u16>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RewriteSpec {
    #[serde(default)]
    pub hostname: Option<String>,
    #[serde(default)]
    pub path: Option<PathModifierSpec>,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PathModifierSpec {
    /// `ReplaceFullPath` or `ReplacePrefixMatch`.
    #[serde(rename = "type")]
    pub type_: String,
    #[serde(default)]
    pub replace_full_path: Option<String>,
    #[serde(default)]
    pub replace_prefix_match: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct MirrorSpec {
    pub backend_ref: BackendRef,
    #[serde(default)]
    pub percent: Option<u32>,
    #[serde(default)]
    pub fraction: Option<FractionSpec>,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FractionSpec {
    pub numerator: u32,
    #[serde(default)]
    pub denominator: Option<u32>,
}

/// Gateway API durations (`10s`, `500ms`, `1m30s`).
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RouteTimeouts {
    #[serde(default)]
    pub request: Option<String>,
    #[serde(default)]
    pub backend_request: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteRetry {
    #[serde(default)]
    pub attempts: Option<u32>,
    #[serde(default)]
    pub codes: Vec<u16>,
    #[serde(default)]
    pub backoff: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BackendRef {
    #[serde(default)]
    pub group: Option<String>,
    #[serde(default)]
    pub kind: Option<String>,
    pub name: String,
    #[serde(default)]
    pub namespace: Option<String>,
    #[serde(default)]
    pub port: Option<u16>,
    #[serde(default)]
    pub weight: Option<u32>,
    /// Filters for requests sent to this backend only.
    #[serde(default)]
    pub filters: Vec<RouteFilter>,
}

/// Lets routes in other namespaces refer to objects in this one.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct ReferenceGrant {
    pub metadata: Metadata,
    pub spec: ReferenceGrantSpec,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReferenceGrantSpec {
    pub from: Vec<GrantFrom>,
    pub to: Vec<GrantTo>,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GrantFrom {
    pub group: String,
    pub kind: String,
    pub namespace: String,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GrantTo {
    pub group: String,
    pub kind: String,
    #[serde(default)]
    pub name: Option<String>,
}

impl ReferenceGrant {
    /// Whether this grant lets a `from_kind` route in `from_ns` use the Service `name` (of the
    /// grant's namespace).
    pub fn allows_service(&self, from_kind: &str, from_ns: &str, name: &str) -> bool {
        self.spec.from.iter().any(|f| {
            f.group == "gateway.networking.k8s.io" && f.kind == from_kind && f.namespace == from_ns
        }) && self.spec.to.iter().any(|t| {
            matches!(t.group.as_str(), "" | "core")
                && t.kind == "Service"
                && t.name.as_deref().is_none_or(|n| n == name)
        })
    }
}

/// Gateway API duration (`1h`, `10s`, `500ms`, `1m30s`: up to four number-unit pairs) in
/// milliseconds.
pub fn parse_duration_ms(s: &str) -> Option<u64> {
    let mut rest = s;
    let mut total: u64 = 0;
    let mut parts = 0;
    while !rest.is_empty() {
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 || digits > 5 {
            return None;
        }
        let n: u64 = rest[..digits].parse().ok()?;
        rest = &rest[digits..];
        let (unit, len) = if rest.starts_with("ms") {
            (1, 2)
        } else if rest.starts_with('s') {
            (1_000, 1)
        } else if rest.starts_with('m') {
            (60_000, 1)
        } else if rest.starts_with('h') {
            (3_600_000, 1)
        } else {
            return None;
        };
        rest = &rest[len..];
        total += n * unit;
        parts += 1;
    }
    (parts > 0 && parts <= 4).then_some(total)
}

/// An RFC 3339 time (`2024-05-01T10:00:00Z`, with optional fraction and offset) in seconds
/// since the epoch.
pub fn parse_timestamp(s: &str) -> Option<i64> {
    let b = s.as_bytes();
    if b.len() < 20 || b[4] != b'-' || b[7] != b'-' || !matches!(b[10], b'T' | b't' | b' ') {
        return None;
    }
    let num = |r: std::ops::Range<usize>| -> Option<i64> {
        let t = s.get(r)?;
        t.bytes()
            .all(|c| c.is_ascii_digit())
            .then(|| t.parse().ok())?
    };
    let (y, mo, d) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (h, mi, sec) = (num(11..13)?, num(14..16)?, num(17..19)?);
    if b[13] != b':' || b[16] != b':' || !(1..=12).contains(&mo) || !(1..=31).contains(&d) {
        return None;
    }
    let mut rest = &s[19..];
    if let Some(frac) = rest.strip_prefix('.') {
        let n = frac.bytes().take_while(u8::is_ascii_digit).count();
        if n == 0 {
            return None;
        }
        rest = &frac[n..];
    }
    let offset = match rest {
        "Z" | "z" => 0,
        _ => {
            let sign = match rest.as_bytes().first()? {
                b'+' => 1,
                b'-' => -1,
                _ => return None,
            };
            if rest.len() != 6 || rest.as_bytes()[3] != b':' {
                return None;
            }
            sign * (num(20..22)? * 3600 + num(23..25)? * 60)
        }
    };
    // Days from the civil date (proleptic Gregorian), after Howard Hinnant's algorithm.
    let y = if mo <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (mo + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some(days * 86_400 + h * 3600 + mi * 60 + sec - offset)
}

type Invalid = (String, String);

fn bad<T>(field: impl Into<String>, message: impl Into<String>) -> Result<T, Invalid> {
    Err((field.into(), message.into()))
}

fn check_regex(field: &str, re: &str) -> Result<(), Invalid> {
    regex_lite::Regex::new(re).map(drop).or_else(|e| {
        bad(
            field,
            format!("{re:?} is not a valid regular expression: {e}"),
        )
    })
}

fn check_header_name(field: &str, name: &str) -> Result<(), Invalid> {
    match http::HeaderName::from_bytes(name.as_bytes()) {
        Ok(_) => Ok(()),
        Err(_) => bad(field, format!("{name:?} is not a valid header name")),
    }
}

fn check_match_type(field: &str, t: Option<&str>) -> Result<(), Invalid> {
    match t {
        None | Some("Exact" | "RegularExpression") => Ok(()),
        Some(t) => bad(
            field,
            format!("{t:?} is not supported; use Exact or RegularExpression"),
        ),
    }
}

const HTTP_METHODS: [&str; 9] = [
    "GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH",
];

/// Checks what the types cannot: value formats, filter shapes, and which fields each kind of
/// route may use.
pub(super) fn validate(r: &Route, grpc: bool) -> Result<(), Invalid> {
    for (i, rule) in r.spec.rules.iter().enumerate() {
        let at = format!("spec.rules[{i}]");
        for (j, m) in rule.matches.iter().enumerate() {
            validate_match(&format!("{at}.matches[{j}]"), m, grpc)?;
        }
        validate_filters(&format!("{at}.filters"), &rule.filters, grpc)?;
        for (j, b) in rule.backend_refs.iter().enumerate() {
            let at = format!("{at}.backendRefs[{j}]");
            if b.weight.is_some_and(|w| w > 1_000_000) {
                return bad(format!("{at}.weight"), "must be at most 1000000");
            }
            validate_filters(&format!("{at}.filters"), &b.filters, grpc)?;
        }
        if let Some(t) = &rule.timeouts {
            if grpc {
                return bad(format!("{at}.timeouts"), "GRPCRoute has no timeouts");
            }
            let mut ms = [None, None];
            for (k, (name, v)) in [
                ("request", &t.request),
                ("backendRequest", &t.backend_request),
            ]
            .into_iter()
            .enumerate()
            {
                if let Some(v) = v {
                    ms[k] = Some(parse_duration_ms(v).map_or_else(
                        || {
                            bad(
                                format!("{at}.timeouts.{name}"),
                                format!("{v:?} is not a duration (e.g. 10s, 500ms, 1m30s)"),
                            )
                        },
                        Ok,
                    )?);
                }
            }
            if let [Some(req), Some(be)] = ms
                && req > 0
                && (be == 0 || be > req)
            {
                return bad(
                    format!("{at}.timeouts.backendRequest"),
                    "must not be longer than the request timeout",
                );
            }
        }
        if let Some(retry) = &rule.retry {
            for (k, c) in retry.codes.iter().enumerate() {
                if !(400..=599).contains(c) {
                    return bad(
                        format!("{at}.retry.codes[{k}]"),
                        format!("{c} is not a retriable status (400-599)"),
                    );
                }
            }
            if let Some(b) = &retry.backoff
                && parse_duration_ms(b).is_none()
            {
                return bad(
                    format!("{at}.retry.backoff"),
                    format!("{b:?} is not a duration (e.g. 100ms)"),
                );
            }
        }
    }
    Ok(())
}

fn validate_match(at: &str, m: &RouteMatch, grpc: bool) -> Result<(), Invalid> {
    if let Some(p) = &m.path {
        if grpc {
            return bad(
                format!("{at}.path"),
                "GRPCRoute matches by method, not path",
            );
        }
        let value = p.value.as_deref().unwrap_or("/");
        match p.type_.as_deref().unwrap_or("PathPrefix") {
            "Exact" | "PathPrefix" if !value.starts_with('/') => {
                return bad(format!("{at}.path.value"), "must start with \"/\"");
            }
            "Exact" | "PathPrefix" => {}
            "RegularExpression" => check_regex(&format!("{at}.path.value"), value)?,
            t => {
                return bad(
                    format!("{at}.path.type"),
                    format!("{t:?} is not supported; use Exact, PathPrefix or RegularExpression"),
                );
            }
        }
    }
    for (what, list) in [("headers", &m.headers), ("queryParams", &m.query_params)] {
        if grpc && what == "queryParams" && !list.is_empty() {
            return bad(
                format!("{at}.queryParams"),
                "GRPCRoute has no query matches",
            );
        }
        for (k, h) in list.iter().enumerate() {
            let at = format!("{at}.{what}[{k}]");
            check_match_type(&format!("{at}.type"), h.type_.as_deref())?;
            if what == "headers" {
                check_header_name(&format!("{at}.name"), &h.name)?;
            } else if h.name.is_empty() {
                return bad(format!("{at}.name"), "must not be empty");
            }
            if h.type_.as_deref() == Some("RegularExpression") {
                check_regex(&format!("{at}.value"), &h.value)?;
            }
        }
    }
    match (&m.method, grpc) {
        (None, _) => {}
        (Some(MethodMatchSpec::Http(method)), false) => {
            if !HTTP_METHODS.contains(&method.as_str()) {
                return bad(
                    format!("{at}.method"),
                    format!("{method:?} is not one of {}", HTTP_METHODS.join(", ")),
                );
            }
        }
        (Some(MethodMatchSpec::Grpc(g)), true) => {
            check_match_type(&format!("{at}.method.type"), g.type_.as_deref())?;
            if g.service.is_none() && g.method.is_none() {
                return bad(format!("{at}.method"), "needs a service, a method or both");
            }
            let regex = g.type_.as_deref() == Some("RegularExpression");
            for (name, v) in [("service", &g.service), ("method", &g.method)] {
                let Some(v) = v else { continue };
                if regex {
                    check_regex(&format!("{at}.method.{name}"), v)?;
                } else if v.is_empty() || v.contains('/') {
                    return bad(
                        format!("{at}.method.{name}"),
                        format!("{v:?} is not a gRPC {name} name"),
                    );
                }
            }
        }
        (Some(_), true) => {
            return bad(
                format!("{at}.method"),
                "a GRPCRoute method match is {service, method}",
            );
        }
        (Some(_), false) => {
            return bad(
                format!("{at}.method"),
                "an HTTPRoute method match is an HTTP method name",
            );
        }
    }
    Ok(())
}

fn validate_filters(at: &str, filters: &[RouteFilter], grpc: bool) -> Result<(), Invalid> {
    let has = |t: &str| filters.iter().any(|f| f.type_ == t);
    if has("RequestRedirect") && has("URLRewrite") {
        return bad(at, "RequestRedirect and URLRewrite cannot be used together");
    }
    for (k, f) in filters.iter().enumerate() {
        let at = format!("{at}[{k}]");
        let allowed: &[&str] = if grpc {
            &[
                "RequestHeaderModifier",
                "ResponseHeaderModifier",
                "RequestMirror",
            ]
        } else {
            &[
                "RequestHeaderModifier",
                "ResponseHeaderModifier",
                "RequestRedirect",
                "URLRewrite",
                "RequestMirror",
            ]
        };
        if !allowed.contains(&f.type_.as_str()) {
            return bad(
                format!("{at}.type"),
                format!(
                    "filter {:?} is not supported; the mesh supports {}",
                    f.type_,
                    allowed.join(", ")
                ),
            );
        }
        let missing = || {
            let field = {
                let mut c = f.type_.chars();
                let first = c.next().map(|c| c.to_ascii_lowercase()).unwrap_or_default();
                let rest: String = c.collect();
                if f.type_ == "URLRewrite" {
                    "urlRewrite".to_owned()
                } else {
                    format!("{first}{rest}")
                }
            };
            bad(format!("{at}.{field}"), "missing for a filter of this type")
        };
        match f.type_.as_str() {
            "RequestHeaderModifier" | "ResponseHeaderModifier" => {
                let m = if f.type_ == "RequestHeaderModifier" {
                    &f.request_header_modifier
                } else {
                    &f.response_header_modifier
                };
                let Some(m) = m else { return missing() };
                let field = if f.type_ == "RequestHeaderModifier" {
                    "requestHeaderModifier"
                } else {
                    "responseHeaderModifier"
                };
                for (what, list) in [("set", &m.set), ("add", &m.add)] {
                    for (n, h) in list.iter().enumerate() {
                        check_header_name(&format!("{at}.{field}.{what}[{n}].name"), &h.name)?;
                        if http::HeaderValue::from_str(&h.value).is_err() {
                            return bad(
                                format!("{at}.{field}.{what}[{n}].value"),
                                "is not a valid header value",
                            );
                        }
                    }
                }
                for (n, h) in m.remove.iter().enumerate() {
                    check_header_name(&format!("{at}.{field}.remove[{n}]"), h)?;
                }
            }
            "RequestRedirect" => {
                let Some(r) = &f.request_redirect else {
                    return missing();
                };
                if let Some(s) = &r.scheme
                    && s != "http"
                    && s != "https"
                {
                    return bad(
                        format!("{at}.requestRedirect.scheme"),
                        format!("{s:?} is not http or https"),
                    );
                }
                if let Some(c) = r.status_code
                    && ![301, 302, 303, 307, 308].contains(&c)
                {
                    return bad(
                        format!("{at}.requestRedirect.statusCode"),
                        format!("{c} is not a redirect status (301, 302, 303, 307, 308)"),
                    );
                }
                if let Some(p) = &r.path {
                    validate_path_modifier(&format!("{at}.requestRedirect.path"), p)?;
                }
            }
            "URLRewrite" => {
                let Some(r) = &f.url_rewrite else {
                    return missing();
                };
                if let Some(p) = &r.path {
                    validate_path_modifier(&format!("{at}.urlRewrite.path"), p)?;
                }
            }
            "RequestMirror" => {
                let Some(m) = &f.request_mirror else {
                    return missing();
                };
                if m.percent.is_some_and(|p| p > 100) {
                    return bad(format!("{at}.requestMirror.percent"), "must be 0-100");
                }
                if let Some(fr) = &m.fraction {
                    let den = fr.denominator.unwrap_or(100);
                    if den == 0 || fr.numerator > den {
                        return bad(
                            format!("{at}.requestMirror.fraction"),
                            "needs a numerator no larger than a non-zero denominator",
                        );
                    }
                }
                if m.percent.is_some() && m.fraction.is_some() {
                    return bad(
                        format!("{at}.requestMirror"),
                        "percent and fraction cannot be used together",
                    );
                }
            }
            _ => {}
        }
    }
    Ok(())
}

fn validate_path_modifier(at: &str, p: &PathModifierSpec) -> Result<(), Invalid> {
    let (field, value) = match p.type_.as_str() {
        "ReplaceFullPath" => ("replaceFullPath", &p.replace_full_path),
        "ReplacePrefixMatch" => ("replacePrefixMatch", &p.replace_prefix_match),
        t => {
            return bad(
                format!("{at}.type"),
                format!("{t:?} is not supported; use ReplaceFullPath or ReplacePrefixMatch"),
            );
        }
    };
    match value {
        None => bad(format!("{at}.{field}"), "missing for this type"),
        Some(v) if !v.starts_with('/') => bad(format!("{at}.{field}"), "must start with \"/\""),
        Some(_) => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_follow_the_gateway_api_format() {
        assert_eq!(parse_duration_ms("10s"), Some(10_000));
        assert_eq!(parse_duration_ms("500ms"), Some(500));
        assert_eq!(parse_duration_ms("1m30s"), Some(90_000));
        assert_eq!(parse_duration_ms("1h"), Some(3_600_000));
        assert_eq!(parse_duration_ms("0s"), Some(0));
        for bad in [
            "",
            "10",
            "s",
            "1.5s",
            "10us",
            "1h1m1s1ms1s",
            "123456s",
            "-1s",
        ] {
            assert_eq!(parse_duration_ms(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn timestamps_are_seconds_since_the_epoch() {
        assert_eq!(parse_timestamp("1970-01-01T00:00:00Z"), Some(0));
        assert_eq!(parse_timestamp("2024-02-29T12:00:00Z"), Some(1_709_208_000));
        assert_eq!(
            parse_timestamp("2024-02-29T12:00:00.123Z"),
            Some(1_709_208_000)
        );
        assert_eq!(
            parse_timestamp("2024-02-29T14:00:00+02:00"),
            Some(1_709_208_000)
        );
        for bad in [
            "",
            "2024-02-29",
            "2024-13-01T00:00:00Z",
            "2024-02-29T12:00:00",
        ] {
            assert_eq!(parse_timestamp(bad), None, "{bad:?}");
        }
    }
}
