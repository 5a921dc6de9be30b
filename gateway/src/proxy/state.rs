//! [`ProxyState`]: what every proxy handler shares (configuration, node table, metrics).
//! Handlers depend on this module; it depends only on the leaf modules.

use super::config::{NodeUrl, ProxyConfig, ProxyError};
use super::metrics::ProxyMetrics;
use super::nodes::Nodes;

/// What every handler shares.
#[derive(Debug)]
pub struct ProxyState {
    pub(crate) config: ProxyConfig,
    pub(crate) nodes: Nodes,
    pub(crate) metrics: ProxyMetrics,
}

impl ProxyState {
    /// Checks the node URLs; every node starts out of rotation until a health check passes
    /// ([`check_health`] runs one round).
    pub fn new(config: ProxyConfig) -> Result<Self, ProxyError> {
        if config.nodes.is_empty() {
            return Err(ProxyError::NoNodes);
        }
        let mut urls: Vec<NodeUrl> = Vec::new();
        for u in &config.nodes {
            let url = NodeUrl::parse(u)?;
            if urls.contains(&url) {
                return Err(ProxyError::Duplicate(url.to_string()));
            }
            urls.push(url);
        }
        Ok(ProxyState {
            nodes: Nodes::new(urls),
            config,
            metrics: ProxyMetrics::default(),
        })
    }

    pub fn config(&self) -> &ProxyConfig {
        &self.config
    }

    /// The nodes' URLs, in the order given.
    pub fn node_urls(&self) -> Vec<String> {
        self.nodes.iter().map(|n| n.label.clone()).collect()
    }

    /// Nodes in rotation now.
    pub fn healthy_nodes(&self) -> usize {
        self.nodes.healthy_count()
    }
}
