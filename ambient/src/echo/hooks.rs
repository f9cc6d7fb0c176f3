//! Test hooks: failures a test asks the server for, to check what retries, timeouts and
//! outlier detection in front of it do.
//!
//! - `?delay=MS` (0 to 60000) on an HTTP request: the answer comes that much later.
//! - Header `x-echo-fail-once: KEY`: the first request with a given key is answered 503, later
//!   ones normally. The last [`REMEMBERED_KEYS`] keys are remembered (as hashes, so memory
//!   stays bounded whatever the keys); a key forgotten since fails once more.
//! - `POST /echo/fail?status=NNN` (400 to 599): from then on every request (HTTP or gRPC)
//!   other than the switch itself is answered NNN, until `POST /echo/fail?status=0` or
//!   `DELETE /echo/fail`; `GET /echo/fail` says what is in force. The switch is per server,
//!   for all its ports.

use std::collections::{HashSet, VecDeque};
use std::hash::{BuildHasher, RandomState};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU16, Ordering};
use std::time::Duration;

use http::{HeaderMap, Method, StatusCode, Uri};

/// Request header whose value names a request that should fail the first time it is seen.
pub const FAIL_ONCE_HEADER: &str = "x-echo-fail-once";
/// The path of the failure switch.
pub const FAIL_SWITCH_PATH: &str = "/echo/fail";
/// The longest `?delay=` accepted.
pub const MAX_DELAY: Duration = Duration::from_secs(60);
/// How many fail-once keys are remembered.
pub const REMEMBERED_KEYS: usize = 1024;

/// The hooks' state, shared by every connection of a server.
#[derive(Debug, Default)]
pub(super) struct Hooks {
    fail_once: Mutex<FailOnce>,
    /// The status every request gets while the switch is on; 0 while it is off.
    failing: AtomicU16,
}

/// What a request to the failure switch asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Switch {
    /// Fail every request with this status from now on.
    Fail(StatusCode),
    /// Stop failing.
    Stop,
    /// Say what is in force.
    Show,
}

/// Keys seen, oldest first, at most [`REMEMBERED_KEYS`].
#[derive(Debug)]
struct FailOnce {
    hasher: RandomState,
    seen: HashSet<u64>,
    order: VecDeque<u64>,
    capacity: usize,
}

impl Hooks {
    /// The status every request gets now, if the switch is on.
    pub fn failing(&self) -> Option<StatusCode> {
        match self.failing.load(Ordering::Relaxed) {
            0 => None,
            code => StatusCode::from_u16(code).ok(),
        }
    }

    pub fn set_failing(&self, status: Option<StatusCode>) {
        self.failing
            .store(status.map_or(0, |s| s.as_u16()), Ordering::Relaxed);
    }

    /// Whether a request with these headers carries a fail-once key never seen before (which
    /// is remembered from now on).
    pub fn fails_once(&self, headers: &HeaderMap) -> bool {
        let Some(key) = headers.get(FAIL_ONCE_HEADER) else {
            return false;
        };
        self.fail_once
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .first_sight(key.as_bytes())
    }
}

impl Default for FailOnce {
    fn default() -> Self {
        Self::with_capacity(REMEMBERED_KEYS)
    }
}

impl FailOnce {
    fn with_capacity(capacity: usize) -> Self {
        Self {
            hasher: RandomState::new(),
            seen: HashSet::new(),
            order: VecDeque::new(),
            capacity,
        }
    }

    /// True the first time `key` is seen (or the first time since it was forgotten).
    fn first_sight(&mut self, key: &[u8]) -> bool {
        let h = self.hasher.hash_one(key);
        if !self.seen.insert(h) {
            return false;
        }
        self.order.push_back(h);
        while self.order.len() > self.capacity {
            if let Some(old) = self.order.pop_front() {
                self.seen.remove(&old);
            }
        }
        true
    }
}

/// `?delay=MS` of a request, zero when not asked for.
pub(super) fn requested_delay(uri: &Uri) -> Result<Duration, &'static str> {
    let Some(asked) = query_value(uri, "delay") else {
        return Ok(Duration::ZERO);
    };
    asked
        .parse::<u64>()
        .ok()
        .map(Duration::from_millis)
        .filter(|d| *d <= MAX_DELAY)
        .ok_or("delay must be a number of milliseconds from 0 to 60000")
}

/// What a request to [`FAIL_SWITCH_PATH`] asks for.
pub(super) fn switch(method: &Method, uri: &Uri) -> Result<Switch, &'static str> {
    match *method {
        Method::GET | Method::HEAD => Ok(Switch::Show),
        Method::DELETE => Ok(Switch::Stop),
        Method::POST => {
            const USAGE: &str = "POST /echo/fail?status=NNN fails every later request with NNN (400 to 599); status=0 stops";
            let asked = query_value(uri, "status").ok_or(USAGE)?;
            match asked.parse::<u16>() {
                Ok(0) => Ok(Switch::Stop),
                Ok(code @ 400..=599) => StatusCode::from_u16(code)
                    .map(Switch::Fail)
                    .map_err(|_| USAGE),
                _ => Err(USAGE),
            }
        }
        _ => Err("the failure switch takes GET, POST and DELETE"),
    }
}

/// The value of `name` in the query, if given.
pub(super) fn query_value<'a>(uri: &'a Uri, name: &str) -> Option<&'a str> {
    uri.query()?
        .split('&')
        .find_map(|pair| pair.strip_prefix(name)?.strip_prefix('='))
}

#[cfg(test)]
mod tests {
    use http::HeaderValue;

    use super::*;

    fn uri(s: &'static str) -> Uri {
        Uri::from_static(s)
    }

    #[test]
    fn delay_comes_from_the_query() {
        assert_eq!(requested_delay(&uri("/")), Ok(Duration::ZERO));
        assert_eq!(
            requested_delay(&uri("/?a=1&delay=250")),
            Ok(Duration::from_millis(250))
        );
        assert_eq!(requested_delay(&uri("/?delay=60000")), Ok(MAX_DELAY));
        // A parameter whose name only starts with "delay" is not it.
        assert_eq!(requested_delay(&uri("/?delays=5")), Ok(Duration::ZERO));
        for bad in ["/?delay=", "/?delay=-1", "/?delay=60001", "/?delay=1s"] {
            assert!(requested_delay(&Uri::from_static(bad)).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_key_fails_once() {
        let hooks = Hooks::default();
        let mut headers = HeaderMap::new();
        assert!(!hooks.fails_once(&headers), "no key, no failure");
        headers.insert(FAIL_ONCE_HEADER, HeaderValue::from_static("a"));
        assert!(hooks.fails_once(&headers));
        assert!(!hooks.fails_once(&headers));
        headers.insert(FAIL_ONCE_HEADER, HeaderValue::from_static("b"));
        assert!(hooks.fails_once(&headers));
    }

    #[test]
    fn remembered_keys_are_bounded() {
        let mut keys = FailOnce::with_capacity(3);
        for k in ["a", "b", "c", "d"] {
            assert!(keys.first_sight(k.as_bytes()), "{k}");
        }
        assert_eq!((keys.seen.len(), keys.order.len()), (3, 3));
        // "a" was forgotten to make room for "d": it fails once more; the rest are known.
        assert!(!keys.first_sight(b"d"));
        assert!(!keys.first_sight(b"b"));
        assert!(keys.first_sight(b"a"));
        assert!(keys.seen.len() <= 3);

        let many = FailOnce::default();
        assert_eq!(many.capacity, REMEMBERED_KEYS);
    }

    #[test]
    fn the_switch_is_read_from_method_and_query() {
        let cases: &[(Method, &'static str, Result<Switch, ()>)] = &[
            (
                Method::POST,
                "/echo/fail?status=503",
                Ok(Switch::Fail(StatusCode::SERVICE_UNAVAILABLE)),
            ),
            (Method::POST, "/echo/fail?status=0", Ok(Switch::Stop)),
            (Method::DELETE, "/echo/fail", Ok(Switch::Stop)),
            (Method::GET, "/echo/fail", Ok(Switch::Show)),
            (Method::POST, "/echo/fail", Err(())),
            (Method::POST, "/echo/fail?status=200", Err(())),
            (Method::POST, "/echo/fail?status=600", Err(())),
            (Method::PUT, "/echo/fail?status=503", Err(())),
        ];
        for (method, u, want) in cases {
            let got = switch(method, &Uri::from_static(u)).map_err(|_| ());
            assert_eq!(&got, want, "{method} {u}");
        }
    }

    #[test]
    fn the_switch_holds_until_turned_off() {
        let hooks = Hooks::default();
        assert_eq!(hooks.failing(), None);
        hooks.set_failing(Some(StatusCode::BAD_GATEWAY));
        assert_eq!(hooks.failing(), Some(StatusCode::BAD_GATEWAY));
        hooks.set_failing(None);
        assert_eq!(hooks.failing(), None);
    }
}
