//! What the proxy is configured with ([`ProxyConfig`]) and where an attention node is
//! ([`NodeUrl`]: `http://host:port[/prefix]`; plain HTTP, as inside a cluster).

use std::fmt;
use std::time::Duration;

/// The proxy's settings; [`ProxyConfig::new`] gives the defaults.
#[derive(Clone, Debug)]
pub struct ProxyConfig {
    /// The attention nodes' base URLs.
    pub nodes: Vec<String>,
    /// Accepted bearer tokens on `/v1`; empty: no authentication.
    pub api_keys: Vec<String>,
    /// Sent to the nodes as `Authorization: Bearer KEY` (the client's own header never is).
    pub upstream_api_key: Option<String>,
    /// Larger request bodies are refused with 413.
    pub max_body_bytes: usize,
    /// Time between two health checks of a node.
    pub health_interval: Duration,
    /// How long one health check may take (connection and answer).
    pub health_timeout: Duration,
    /// Consecutive failed health checks that take a healthy node out of rotation. A request
    /// that cannot connect takes it out at once.
    pub health_failures: u32,
    /// How long connecting to a node may take before the next node is tried.
    pub connect_timeout: Duration,
}

impl ProxyConfig {
    pub fn new(nodes: Vec<String>) -> Self {
        ProxyConfig {
            nodes,
            api_keys: Vec::new(),
            upstream_api_key: None,
            max_body_bytes: 32 << 20,
            health_interval: Duration::from_secs(1),
            health_timeout: Duration::from_millis(500),
            health_failures: 2,
            connect_timeout: Duration::from_secs(2),
        }
    }
}

/// Why the proxy cannot start with a configuration.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("no attention nodes given")]
    NoNodes,
    #[error("invalid attention node URL {url:?}: {reason}")]
    BadUrl { url: String, reason: String },
    #[error("the attention node {0} is listed twice")]
    Duplicate(String),
}

/// An attention node's address: `http://host[:port][/prefix]` (port 80 when none; a trailing
/// `/v1` is dropped, so both the server root and an OpenAI base URL work).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeUrl {
    host: String,
    port: u16,
    /// Path prefix without a trailing slash (usually empty).
    prefix: String,
}

impl NodeUrl {
    pub fn parse(url: &str) -> Result<Self, ProxyError> {
        let bad = |reason: &str| ProxyError::BadUrl {
            url: url.to_string(),
            reason: reason.to_string(),
        };
        // The `http` crate parses the URI (authority, IPv6 brackets, port range); what is
        // checked here is only what a node URL may be.
        let uri: hyper::Uri = url
            .trim()
            .parse()
            .map_err(|e: hyper::http::uri::InvalidUri| bad(&e.to_string()))?;
        if uri.scheme_str() != Some("http") {
            return Err(bad(
                "expected http://host:port (the proxy speaks plain HTTP to the nodes)",
            ));
        }
        let authority = uri.authority().ok_or_else(|| bad("no host"))?;
        if authority.as_str().contains('@') {
            return Err(bad("user information in the URL is not supported"));
        }
        if uri.query().is_some() {
            return Err(bad("a node URL takes no query or fragment"));
        }
        let host = authority
            .host()
            .trim_start_matches('[')
            .trim_end_matches(']');
        if host.is_empty() {
            return Err(bad("no host"));
        }
        let port = port_of(authority).ok_or_else(|| bad("bad port"))?;
        let mut prefix = uri.path().trim_end_matches('/');
        if let Some(p) = prefix.strip_suffix("/v1") {
            prefix = p;
        }
        Ok(NodeUrl {
            host: host.to_string(),
            port,
            prefix: prefix.to_string(),
        })
    }

    pub fn host(&self) -> &str {
        &self.host
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// `host:port`, as the `Host` header writes it.
    pub fn authority(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }

    /// The request target on this node for `path_and_query` (which starts with `/`).
    pub fn target(&self, path_and_query: &str) -> String {
        format!("{}{path_and_query}", self.prefix)
    }
}

/// The authority's port: 80 when none is written, `None` when it is not a number in 1-65535
/// (the `http` crate accepts any text there).
fn port_of(authority: &hyper::http::uri::Authority) -> Option<u16> {
    let written = &authority.as_str()[authority.host().len()..];
    match written.strip_prefix(':') {
        None => Some(80),
        Some(p) => p.parse::<u16>().ok().filter(|&p| p != 0),
    }
}

impl fmt::Display for NodeUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "http://{}{}", self.authority(), self.prefix)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn parses_node_urls() {
        let u = NodeUrl::parse("http://10.0.0.2:8001").unwrap();
        assert_eq!((u.host(), u.port()), ("10.0.0.2", 8001));
        assert_eq!(u.target("/v1/models"), "/v1/models");
        assert_eq!(u.to_string(), "http://10.0.0.2:8001");
        let u = NodeUrl::parse("http://node-a/api/v1/").unwrap();
        assert_eq!(
            (u.port(), u.target("/health").as_str()),
            (80, "/api/health")
        );
        let u = NodeUrl::parse("http://[::1]:9000").unwrap();
        assert_eq!(u.authority(), "[::1]:9000");
        for bad in [
            "https://a:1",
            "a:1",
            "http://:1",
            "http://a:x",
            "http://a:0",
            "http://u@a:1",
            "http://a:1/?q",
        ] {
            assert!(NodeUrl::parse(bad).is_err(), "{bad}");
        }
    }
}
