//! What a role exports about itself: Prometheus metrics and its logs.

use clap::Args;
use std::net::SocketAddr;
use std::time::Duration;

/// What a serving role exports about itself.
#[derive(Args, Clone, Debug, Default)]
pub struct TelemetryArgs {
    /// Serve Prometheus metrics (text format) at http://ADDR/metrics.
    #[arg(long, env = "RINGBOLT_METRICS_LISTEN")]
    pub metrics_listen: Option<SocketAddr>,
}

impl TelemetryArgs {
    /// Starts the metrics endpoint, if asked for, with every series labelled `role`, and a
    /// task that keeps the process's resident memory current. Call inside a tokio runtime.
    pub fn start(&self, role: &str) -> Result<(), crate::ShellError> {
        let Some(addr) = self.metrics_listen else {
            return Ok(());
        };
        metrics_exporter_prometheus::PrometheusBuilder::new()
            .with_http_listener(addr)
            .add_global_label("role", role)
            .install()
            .map_err(|e| crate::ShellError::Listen(format!("metrics on {addr}: {e}")))?;
        tokio::spawn(async {
            // SAFETY: sysconf takes no pointers and only reads a system constant.
            let page = match unsafe { libc::sysconf(libc::_SC_PAGESIZE) } {
                p if p > 0 => p as u64,
                _ => 4096,
            };
            loop {
                // statm: size resident shared ... in pages.
                if let Some(rss) = std::fs::read_to_string("/proc/self/statm")
                    .ok()
                    .and_then(|s| s.split_whitespace().nth(1)?.parse::<u64>().ok())
                {
                    metrics::gauge!("ringbolt_process_resident_bytes").set((rss * page) as f64);
                }
                tokio::time::sleep(Duration::from_secs(2)).await;
            }
        });
        tracing::info!(%addr, "metrics at /metrics");
        Ok(())
    }
}
