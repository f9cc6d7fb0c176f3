//! Inbound plaintext: connections from outside the mesh, redirected to 15006, forwarded to the
//! local workload they were addressed to.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpStream;
use tracing::warn;

use super::outbound::copy_plain;
use super::{ProxyState, orig_dst, reset};
use crate::metrics::{ConnectionRecord, Direction, Peer, RefusalReason, Reporter};
use crate::rbac::{self, Verdict};

pub async fn serve(state: Arc<ProxyState>, client: TcpStream, peer: SocketAddr) {
    let Some(dst) = orig_dst::redirected_dst(&client, peer, "inbound_plaintext") else {
        return reset(client);
    };
    let snap = state.store.snapshot();
    let src_workload = snap.workload_by_ip(peer.ip()).cloned();
    let Some(dst_workload) = snap
        .workload_by_ip(dst.ip())
        .filter(|w| w.node == state.cfg.node_name)
        .cloned()
    else {
        state
            .metrics
            .refused(Direction::inbound, RefusalReason::no_local_workload);
        warn!(%peer, %dst, component = "inbound_plaintext", "no local workload at the destination");
        return reset(client);
    };
    // Plaintext carries no identity: positive identity matches fail, `not_principals` match.
    let decided_on = rbac::Connection {
        src_identity: None,
        src_ip: peer.ip(),
        dst_ip: dst.ip(),
        dst_port: dst.port(),
    };
    // A workload with a waypoint takes nothing but HBONE from that waypoint, so plaintext to
    // it is refused before any policy is looked at.
    let (verdict, refusal) = match rbac::waypoint::check(&snap, &dst_workload, &decided_on) {
        Verdict::Allow => (
            rbac::evaluate(&snap, &dst_workload, &decided_on),
            RefusalReason::policy_denied,
        ),
        deny => (deny, RefusalReason::waypoint_bypassed),
    };
    let dst_uid = dst_workload.uid.clone();
    drop(snap);
    let src = Peer {
        addr: Some(peer),
        workload: src_workload,
        identity: None,
    };
    let dst_peer = Peer {
        addr: Some(dst),
        identity: Some(dst_workload.identity.to_string()),
        workload: Some(dst_workload),
    };
    let open_record = |src: Peer, dst: Peer| {
        ConnectionRecord::open(
            &state.metrics,
            Reporter::destination,
            Direction::inbound,
            src,
            dst,
            None,
            false,
        )
    };
    if let Verdict::Deny { policy, reason } = verdict {
        state.metrics.refused(Direction::inbound, refusal);
        warn!(%peer, %dst, %policy, %reason, component = "inbound_plaintext", "connection denied");
        let mut record = open_record(src, dst_peer);
        record.deny(&policy, &reason);
        drop(record);
        return reset(client);
    }
    let upstream = match tokio::time::timeout(
        state.cfg.connect_timeout,
        state.dialer.connect_for(dst, None, Some(dst.ip())),
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
    let mut record = open_record(src, dst_peer);
    let bytes = record.bytes.clone();
    let registration = state.authorized.register(&dst_uid, decided_on);
    let copy = copy_plain(client, upstream, &bytes);
    super::copy_while_allowed(copy, registration, &mut record).await;
}
