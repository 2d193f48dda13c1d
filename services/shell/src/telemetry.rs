//! What a role exports about itself: Prometheus metrics, logs (text or JSON), and
//! OpenTelemetry traces over OTLP, with the trace context carried across roles (W3C
//! `traceparent`: gRPC metadata between roles, a field of the data plane's requests) so that
//! one job is one trace.

use clap::Args;
use opentelemetry::propagation::TextMapPropagator;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::Layer;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

/// What a serving role exports about itself.
#[derive(Args, Clone, Debug, Default)]
pub struct TelemetryArgs {
    /// Serve Prometheus metrics (text format) at http://ADDR/metrics.
    #[arg(long, env = "RINGBOLT_METRICS_LISTEN")]
    pub metrics_listen: Option<SocketAddr>,
    /// Export traces over OTLP/gRPC to this collector (e.g. http://otel-collector:4317): a
    /// span per job, job step, engine step and layer step, one trace per job across roles.
    #[arg(long, env = "RINGBOLT_OTLP_ENDPOINT")]
    pub otlp_endpoint: Option<String>,
}

/// Keeps the trace exporter running; dropping it flushes what is left.
pub struct LogGuard(Option<opentelemetry_sdk::trace::SdkTracerProvider>);

impl Drop for LogGuard {
    fn drop(&mut self) {
        if let Some(p) = self.0.take() {
            let _ = p.shutdown();
        }
    }
}

/// Starts this process's logs on stderr (`RUST_LOG` filter, default `warn`; JSON lines with
/// `RINGBOLT_LOG_FORMAT=json`, colour only at a terminal) and, with `otlp` (the role's
/// service name and the collector's URL), its trace export. Call once, inside a tokio
/// runtime.
pub fn init_logs(otlp: Option<(&str, &str)>) -> Result<LogGuard, crate::ShellError> {
    let filter =
        tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into());
    let provider = otlp
        .map(|(role, endpoint)| {
            let exporter = opentelemetry_otlp::SpanExporter::builder()
                .with_tonic()
                .with_endpoint(endpoint)
                .build()
                .map_err(|e| crate::ShellError::Endpoint(format!("--otlp-endpoint {endpoint}: {e}")))?;
            let batch =
                opentelemetry_sdk::trace::span_processor_with_async_runtime::BatchSpanProcessor::builder(
                    exporter,
                    opentelemetry_sdk::runtime::Tokio,
                )
                .build();
            Ok::<_, crate::ShellError>(
                opentelemetry_sdk::trace::SdkTracerProvider::builder()
                    .with_span_processor(batch)
                    .with_resource(
                        opentelemetry_sdk::Resource::builder()
                            .with_service_name(format!("ringbolt-{role}"))
                            .build(),
                    )
                    .build(),
            )
        })
        .transpose()?;
    opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
    let traces = provider
        .as_ref()
        .map(|p| tracing_opentelemetry::layer().with_tracer(p.tracer("ringbolt")));
    let json = std::env::var("RINGBOLT_LOG_FORMAT").is_ok_and(|f| f == "json");
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    // The filter applies to the logs only: spans reach the trace exporter whatever RUST_LOG
    // says.
    let logs = if json {
        tracing_subscriber::fmt::layer()
            .json()
            .with_writer(std::io::stderr)
            .with_filter(filter)
            .boxed()
    } else {
        tracing_subscriber::fmt::layer()
            .with_ansi(ansi)
            .with_writer(std::io::stderr)
            .with_filter(filter)
            .boxed()
    };
    let traces = traces.map(|t| t.with_filter(tracing_subscriber::filter::LevelFilter::INFO));
    tracing_subscriber::registry()
        .with(logs)
        .with(traces)
        .try_init()
        .map_err(|e| crate::ShellError::Endpoint(format!("logging: {e}")))?;
    Ok(LogGuard(provider))
}

/// The W3C `traceparent` of `span` (None when it is not part of a sampled trace).
pub fn traceparent(span: &tracing::Span) -> Option<String> {
    let mut carrier = HashMap::new();
    TraceContextPropagator::new().inject_context(&span.context(), &mut carrier);
    carrier.remove("traceparent")
}

/// Makes `span` a child of the remote span `traceparent` names (a malformed one is ignored).
pub fn set_remote_parent(span: &tracing::Span, traceparent: &str) {
    let carrier = HashMap::from([("traceparent".to_string(), traceparent.to_string())]);
    let cx = TraceContextPropagator::new().extract(&carrier);
    let _ = span.set_parent(cx);
}

/// Makes `span` a child of the trace in request `headers`, if any.
pub(crate) fn set_parent_from_headers(
    span: &tracing::Span,
    headers: &tonic::codegen::http::HeaderMap,
) {
    if let Some(tp) = headers.get("traceparent").and_then(|v| v.to_str().ok()) {
        set_remote_parent(span, tp);
    }
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
