//! [`Client`]: the etcd v3 calls the store makes (KV range/put/delete/txn/compact, lease
//! grant/revoke/keep-alive, watch), as gRPC over one tonic channel with the messages of
//! [`super::rpc`]. Nothing here is generated at build time, so building needs no `protoc`.
//!
//! Calls return tonic's [`Status`]; deadlines and the mapping to the store's errors belong
//! to the caller ([`super::EtcdStore`]).

use std::time::Duration;

use http::uri::PathAndQuery;
use prost::Message;
use tokio_stream::StreamExt;
use tonic::client::Grpc;
use tonic::transport::{Channel, Endpoint};
use tonic::{Request, Status, Streaming};
use tonic_prost::ProstCodec;

use super::rpc;

/// One gRPC channel to an etcd cluster (balanced over its endpoints), connected lazily and
/// reconnected by tonic when it breaks. Cheap to clone: clones share the channel.
#[derive(Clone, Debug)]
pub struct Client {
    channel: Channel,
}

impl Client {
    /// A client for `endpoints` (`http://host:port`; a bare `host:port` means plain HTTP). It
    /// does not connect yet: the first call does, within `connect_timeout`. Errors name the
    /// endpoint that is not a usable URI.
    pub fn new(endpoints: &[String], connect_timeout: Duration) -> Result<Client, String> {
        let mut list = Vec::with_capacity(endpoints.len());
        for given in endpoints {
            let url = if given.contains("://") {
                given.clone()
            } else {
                format!("http://{given}")
            };
            let endpoint = Endpoint::from_shared(url)
                .map_err(|e| format!("etcd endpoint {given:?}: {e}"))?
                .connect_timeout(connect_timeout)
                .tcp_nodelay(true)
                // etcd (grpc-go) answers pings on idle connections and pings more often than
                // every 5 s with GOAWAY; only ping while a watch or call is open.
                .http2_keep_alive_interval(Duration::from_secs(10))
                .keep_alive_timeout(Duration::from_secs(5))
                .keep_alive_while_idle(false);
            list.push(endpoint);
        }
        let channel = match list.len() {
            0 => return Err("no etcd endpoints given".to_string()),
            1 => list[0].connect_lazy(),
            _ => Channel::balance_list(list.into_iter()),
        };
        Ok(Client { channel })
    }

    async fn ready(&self) -> Result<Grpc<Channel>, Status> {
        let mut grpc = Grpc::new(self.channel.clone());
        grpc.ready()
            .await
            .map_err(|e| Status::unavailable(format!("no connection: {e}")))?;
        Ok(grpc)
    }

    async fn unary<Req, Resp>(&self, path: &'static str, request: Req) -> Result<Resp, Status>
    where
        Req: Message + Send + Sync + 'static,
        Resp: Message + Default + Send + Sync + 'static,
    {
        let mut grpc = self.ready().await?;
        let response = grpc
            .unary(
                Request::new(request),
                PathAndQuery::from_static(path),
                ProstCodec::<Req, Resp>::default(),
            )
            .await?;
        Ok(response.into_inner())
    }

    /// Opens a bidirectional stream and sends `first` on it. The sending side stays open
    /// (etcd ends a watch whose client half-closed) until the returned stream is dropped,
    /// which cancels the call.
    async fn open_stream<Req, Resp>(
        &self,
        path: &'static str,
        first: Req,
    ) -> Result<Streaming<Resp>, Status>
    where
        Req: Message + Send + Sync + 'static,
        Resp: Message + Default + Send + Sync + 'static,
    {
        let mut grpc = self.ready().await?;
        let requests = tokio_stream::once(first).chain(tokio_stream::pending());
        let response = grpc
            .streaming(
                Request::new(requests),
                PathAndQuery::from_static(path),
                ProstCodec::<Req, Resp>::default(),
            )
            .await?;
        Ok(response.into_inner())
    }

    pub async fn range(&self, request: rpc::RangeRequest) -> Result<rpc::RangeResponse, Status> {
        self.unary("/etcdserverpb.KV/Range", request).await
    }

    pub async fn put(&self, request: rpc::PutRequest) -> Result<rpc::PutResponse, Status> {
        self.unary("/etcdserverpb.KV/Put", request).await
    }

    pub async fn delete_range(
        &self,
        request: rpc::DeleteRangeRequest,
    ) -> Result<rpc::DeleteRangeResponse, Status> {
        self.unary("/etcdserverpb.KV/DeleteRange", request).await
    }

    pub async fn txn(&self, request: rpc::TxnRequest) -> Result<rpc::TxnResponse, Status> {
        self.unary("/etcdserverpb.KV/Txn", request).await
    }

    pub async fn compact(
        &self,
        request: rpc::CompactionRequest,
    ) -> Result<rpc::CompactionResponse, Status> {
        self.unary("/etcdserverpb.KV/Compact", request).await
    }

    pub async fn lease_grant(
        &self,
        request: rpc::LeaseGrantRequest,
    ) -> Result<rpc::LeaseGrantResponse, Status> {
        self.unary("/etcdserverpb.Lease/LeaseGrant", request).await
    }

    pub async fn lease_revoke(
        &self,
        request: rpc::LeaseRevokeRequest,
    ) -> Result<rpc::LeaseRevokeResponse, Status> {
        self.unary("/etcdserverpb.Lease/LeaseRevoke", request).await
    }

    /// One keep-alive: opens the `LeaseKeepAlive` stream, sends one request, reads one
    /// answer and closes the stream again.
    pub async fn lease_keep_alive_once(
        &self,
        id: i64,
    ) -> Result<rpc::LeaseKeepAliveResponse, Status> {
        let mut stream = self
            .open_stream::<_, rpc::LeaseKeepAliveResponse>(
                "/etcdserverpb.Lease/LeaseKeepAlive",
                rpc::LeaseKeepAliveRequest { id },
            )
            .await?;
        stream
            .message()
            .await?
            .ok_or_else(|| Status::unavailable("the keep-alive stream closed without an answer"))
    }

    /// Opens a watch stream with one create request; its first message is etcd's "created"
    /// (or "canceled") answer.
    pub async fn watch(
        &self,
        create: rpc::WatchCreateRequest,
    ) -> Result<Streaming<rpc::WatchResponse>, Status> {
        let request = rpc::WatchRequest {
            request_union: Some(rpc::WatchRequestUnion::Create(create)),
        };
        self.open_stream("/etcdserverpb.Watch/Watch", request).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_are_checked_up_front() {
        assert!(Client::new(&[], Duration::from_secs(1)).is_err());
        let err = Client::new(&["http://bad host:1".to_string()], Duration::from_secs(1))
            .expect_err("a space is no URI");
        assert!(err.contains("bad host"), "{err}");
    }

    #[tokio::test]
    async fn nobody_listening_is_unavailable() {
        // A port that was free a moment ago: nothing answers there.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("a free port");
        let client = Client::new(&[format!("127.0.0.1:{port}")], Duration::from_secs(1))
            .expect("a valid endpoint");
        let err = client
            .range(rpc::RangeRequest::default())
            .await
            .expect_err("nothing listens");
        assert_eq!(err.code(), tonic::Code::Unavailable, "{err}");
    }
}
