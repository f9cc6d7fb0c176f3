//! Inbound plaintext: connections from outside the mesh, redirected to 15006, forwarded to the
//! local workload they were addressed to.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpStream;
use tracing::warn;

use super::outbound::copy_plain;
use super::{ProxyState, orig_dst, reset};
use crate::metrics::{ConnectionRecord, Direction, Peer, RefusalReason, Reporter};

pub async fn serve(state: Arc<ProxyState>, client: TcpStream, peer: SocketAddr) {
    let Some(dst) = orig_dst::redirected_dst(&client, peer, "inbound_plaintext") else {
        return reset(client);
    };
    let (dst_workload, src_workload) = {
        let snap = state.store.snapshot();
        (
            snap.workload_by_ip(dst.ip())
                .filter(|w| w.node == state.cfg.node_name)
                .cloned(),
            snap.workload_by_ip(peer.ip()).cloned(),
        )
    };
    let Some(dst_workload) = dst_workload else {
        state
            .metrics
            .refused(Direction::inbound, RefusalReason::no_local_workload);
        warn!(%peer, %dst, component = "inbound_plaintext", "no local workload at the destination");
        return reset(client);
    };
    let upstream = match tokio::time::timeout(
        state.cfg.connect_timeout,
        state.dialer.connect(dst, None),
    )
    .await
    {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            state
                .metrics
                .refused(Direction::inbound, RefusalReason::upstream_connect_failed);
            warn!(%peer, %dst, error = %e, component = "inbound_plaintext", "upstream connect failed");
            return reset(client);
        }
        Err(_) => {
            state
                .metrics
                .refused(Direction::inbound, RefusalReason::upstream_connect_failed);
            warn!(%peer, %dst, component = "inbound_plaintext", "upstream connect timed out");
            return reset(client);
        }
    };
    let mut record = ConnectionRecord::open(
        &state.metrics,
        Reporter::destination,
        Direction::inbound,
        Peer {
            addr: Some(peer),
            workload: src_workload,
            identity: None,
        },
        Peer {
            addr: Some(dst),
            identity: Some(dst_workload.identity.to_string()),
            workload: Some(dst_workload),
        },
        None,
        false,
    );
    let bytes = record.bytes.clone();
    if let Err(e) = copy_plain(client, upstream, &bytes).await {
        record.fail(e);
    }
}
