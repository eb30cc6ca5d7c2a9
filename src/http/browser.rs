//! What a web page on the same machine can do to the API: nothing, unless
//! it is allowed.
//!
//! A server on loopback without a token is reachable by every page the user
//! opens. Two attacks follow, and are closed here as Jupyter closes them:
//!
//! - **DNS rebinding**: a page of `evil.example` makes its name resolve to
//!   127.0.0.1 and reads the API as its own origin. The browser still sends
//!   `Host: evil.example`, so only loopback names (and those configured)
//!   are accepted in `Host`.
//! - **Cross-site requests**: a page cannot read the answers, but it can
//!   send a form or a `text/plain` POST. Browsers send `Origin` with every
//!   such request, so a state-changing request from an origin other than
//!   the server's own (or one configured) is refused, and a start needs
//!   `Content-Type: application/json`, which a page cannot send cross-site
//!   without a preflight that is never granted.
//!
//! No CORS headers are sent unless origins are configured.

use std::net::IpAddr;
use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{HeaderMap, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::Response;

use super::{ApiError, AppState};

/// Who may reach the API from a browser.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BrowserPolicy {
    /// Host names (without port) accepted in `Host` besides the loopback
    /// ones (`localhost`, `*.localhost`, `127.0.0.0/8`, `[::1]`). When any
    /// are set, `Host` is checked even on a server with a token.
    pub allowed_hosts: Vec<String>,
    /// Web origins (`https://app.example:8443`) whose pages may call the API
    /// cross-site: they are allowed in `Origin` and get CORS headers.
    pub cors_origins: Vec<String>,
}

impl BrowserPolicy {
    /// Whether `Host` names a host the server answers to.
    fn accepts_host(&self, host: &str) -> bool {
        let name = host_name(host);
        is_loopback_name(name)
            || self
                .allowed_hosts
                .iter()
                .any(|allowed| allowed.eq_ignore_ascii_case(name))
    }

    /// Whether a state-changing request from `origin` may proceed, the
    /// request being addressed to `host`.
    fn accepts_origin(&self, origin: &str, host: Option<&str>) -> bool {
        if self.cors_origins.iter().any(|allowed| allowed == origin) {
            return true;
        }
        // The server's own pages: the origin is this very host.
        let authority = origin
            .strip_prefix("http://")
            .or_else(|| origin.strip_prefix("https://"));
        matches!((authority, host), (Some(authority), Some(host)) if authority.eq_ignore_ascii_case(host))
    }
}

/// The host name of a `Host` value, without its port.
fn host_name(host: &str) -> &str {
    if let Some(rest) = host.strip_prefix('[') {
        return rest.split_once(']').map_or(host, |(inside, _)| inside);
    }
    host.rsplit_once(':').map_or(host, |(name, _)| name)
}

fn is_loopback_name(name: &str) -> bool {
    let name = name.trim_end_matches('.').to_ascii_lowercase();
    name == "localhost"
        || name.ends_with(".localhost")
        || name.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// Refuses requests a page on another site could have sent.
pub(super) async fn guard(
    State(state): State<AppState>,
    request: Request,
    next: Next,
) -> Result<Response, ApiError> {
    let policy: &Arc<BrowserPolicy> = &state.browser;
    let headers = request.headers();
    let host = header_text(headers, header::HOST)
        .or_else(|| request.uri().authority().map(|a| a.as_str()));
    let check_host = state.token.is_none() || !policy.allowed_hosts.is_empty();
    if check_host
        && let Some(host) = host
        && !policy.accepts_host(host)
    {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "host_not_allowed",
            format!(
                "this server answers to loopback names only, not {:?}; add the name with \
                 --allowed-host to reach it under another",
                host_name(host)
            ),
        ));
    }
    let changes_state = !matches!(
        *request.method(),
        Method::GET | Method::HEAD | Method::OPTIONS
    );
    if changes_state
        && let Some(origin) = header_text(headers, header::ORIGIN)
        && !policy.accepts_origin(origin, host)
    {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "origin_not_allowed",
            format!(
                "requests from pages of {origin} are not allowed; add the origin with \
                 --cors-origin to allow them"
            ),
        ));
    }
    Ok(next.run(request).await)
}

fn header_text(headers: &HeaderMap, name: header::HeaderName) -> Option<&str> {
    headers.get(name).and_then(|value| value.to_str().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_names_are_accepted_with_or_without_a_port() {
        let policy = BrowserPolicy::default();
        for host in [
            "localhost",
            "localhost:8080",
            "LOCALHOST.",
            "app.localhost:3000",
            "127.0.0.1",
            "127.8.9.10:80",
            "[::1]:8080",
            "[::1]",
        ] {
            assert!(policy.accepts_host(host), "{host}");
        }
        for host in [
            "evil.example",
            "evil.example:8080",
            "localhost.evil.example",
            "127.0.0.1.nip.io",
            "10.0.0.1",
            "[::2]:80",
            "",
        ] {
            assert!(!policy.accepts_host(host), "{host}");
        }
    }

    #[test]
    fn configured_hosts_and_origins_are_accepted() {
        let policy = BrowserPolicy {
            allowed_hosts: vec!["runs.internal".into()],
            cors_origins: vec!["https://app.example".into()],
        };
        assert!(policy.accepts_host("runs.internal:8080"));
        assert!(policy.accepts_origin("https://app.example", Some("runs.internal")));
        assert!(policy.accepts_origin("http://localhost:8080", Some("localhost:8080")));
        assert!(!policy.accepts_origin("http://localhost:3000", Some("localhost:8080")));
        assert!(!policy.accepts_origin("null", Some("localhost:8080")));
        assert!(!policy.accepts_origin("https://evil.example", None));
    }
}
