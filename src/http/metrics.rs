//! Prometheus metrics: one process-wide recorder from `metrics-exporter-prometheus`,
//! rendered by `GET /metrics`.

use std::sync::OnceLock;

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

static HANDLE: OnceLock<Option<PrometheusHandle>> = OnceLock::new();

/// Installs the global recorder on first use and returns its handle, or `None`
/// if another recorder was installed first (metrics are then not exported).
pub fn handle() -> Option<&'static PrometheusHandle> {
    HANDLE
        .get_or_init(|| match PrometheusBuilder::new().install_recorder() {
            Ok(h) => {
                describe();
                Some(h)
            }
            Err(e) => {
                tracing::warn!("metrics: cannot install the Prometheus recorder: {e}");
                None
            }
        })
        .as_ref()
}

fn describe() {
    metrics::describe_counter!(
        "netkit_chat_logins_total",
        "Chat logins, by how (password, session, token)"
    );
    metrics::describe_counter!(
        "netkit_chat_login_failures_total",
        "Chat logins refused (wrong password, bad session or application token), by how"
    );
    metrics::describe_counter!(
        "netkit_chat_logins_throttled_total",
        "Chat password logins refused by the per-account or per-address limit"
    );
    metrics::describe_counter!("netkit_chat_registrations_total", "Chat nicks registered");
    metrics::describe_gauge!("netkit_chat_clients", "Chat clients connected now");
    metrics::describe_counter!(
        "netkit_chat_connections_total",
        "Chat clients connected since start"
    );
    metrics::describe_counter!(
        "netkit_chat_messages_total",
        "Room messages stored and broadcast"
    );
    metrics::describe_counter!(
        "netkit_chat_clients_dropped_total",
        "Chat clients disconnected by the server, by reason"
    );
    metrics::describe_counter!(
        "netkit_chat_rate_limited_total",
        "Client messages refused by the rate limit"
    );
    metrics::describe_histogram!(
        "netkit_chat_batch_seconds",
        "Time to store and fan out one write batch"
    );
    metrics::describe_counter!(
        "netkit_http_requests_total",
        "HTTP requests, by status class"
    );
    metrics::describe_counter!(
        "netkit_conns_refused_per_ip_total",
        "Connections refused by a per-address cap (--max-conns-per-ip, --drop-max-pending-per-ip), by door"
    );
    metrics::describe_counter!(
        "netkit_transfer_refused_total",
        "File drop connections turned away before or at their preamble, by door and reason"
    );
    metrics::describe_counter!(
        "netkit_relay_pairs_total",
        "Pairs the transfer relay made (a sender and a receiver on one channel)"
    );
    metrics::describe_counter!(
        "netkit_relay_bytes_total",
        "Bytes the transfer relay copied between paired peers, both ways"
    );
    metrics::describe_counter!(
        "netkit_relay_refused_total",
        "Relay connections turned away, and pairs cut (idle_timeout, max_bytes), by reason"
    );
    metrics::describe_gauge!(
        "netkit_relay_waiting",
        "Relay peers waiting for their partner now"
    );
    metrics::describe_gauge!(
        "netkit_relay_pairs_active",
        "Pairs the transfer relay is copying now"
    );
    metrics::describe_counter!(
        "netkit_tls_handshake_failures_total",
        "TLS handshakes that failed or timed out, by door"
    );
}

/// The metrics in Prometheus text format.
pub fn render() -> String {
    match handle() {
        Some(h) => {
            h.run_upkeep();
            h.render()
        }
        None => "# metrics recorder not installed\n".into(),
    }
}
