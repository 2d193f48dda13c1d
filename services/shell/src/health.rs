//! The gRPC health service every role serves (probes carry no token).

/// A server's gRPC health service: the services it names and the server as a whole ("") are
/// SERVING or NOT_SERVING together, as the server says. Every role serves one.
pub struct Health {
    reporter: tonic_health::server::HealthReporter,
    names: Vec<&'static str>,
}

impl Health {
    /// Starts NOT_SERVING for `services`, until [`Health::set`].
    pub async fn start(services: &[&'static str]) -> Self {
        let mut names = services.to_vec();
        names.push("");
        let h = Health {
            reporter: tonic_health::server::HealthReporter::new(),
            names,
        };
        h.set(false).await;
        h
    }

    pub fn service(
        &self,
    ) -> tonic_health::pb::health_server::HealthServer<tonic_health::server::HealthService> {
        tonic_health::pb::health_server::HealthServer::new(
            tonic_health::server::HealthService::from_health_reporter(self.reporter.clone()),
        )
    }

    pub async fn set(&self, serving: bool) {
        let status = if serving {
            tonic_health::ServingStatus::Serving
        } else {
            tonic_health::ServingStatus::NotServing
        };
        for name in &self.names {
            self.reporter.set_service_status(*name, status).await;
        }
    }
}
