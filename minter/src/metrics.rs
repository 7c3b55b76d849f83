//! Prometheus metrics (`GET /metrics`, text exposition format): exchanges by outcome,
//! refusals by error and reason code, store latency, the feed's lag behind the shared store,
//! and whether the store is reachable. Labels are codes, never tokens or subjects.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Outcome {
    pub outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Refusal {
    pub error: &'static str,
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Op {
    pub op: &'static str,
}

pub struct Metrics {
    registry: Registry,
    pub exchanges: Family<Outcome, Counter>,
    pub refusals: Family<Refusal, Counter>,
    pub store_seconds: Family<Op, Histogram>,
    pub feed_lag_seconds: Gauge,
    pub store_up: Gauge,
    pub revocations: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("mandate_minter");
        let exchanges = Family::<Outcome, Counter>::default();
        let refusals = Family::<Refusal, Counter>::default();
        let store_seconds = Family::<Op, Histogram>::new_with_constructor(|| {
            Histogram::new([0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5])
        });
        let feed_lag_seconds = Gauge::default();
        let store_up = Gauge::default();
        let revocations = Gauge::default();
        registry.register("exchanges", "Token exchanges by outcome (issued, refused, store_unavailable)", exchanges.clone());
        registry.register("refusals", "Refused requests by OAuth error and mandate reason code", refusals.clone());
        registry.register("store_seconds", "Store write latency by operation", store_seconds.clone());
        registry.register("feed_lag_seconds", "Seconds since this replica last caught up with the shared store (0 with SQLite)", feed_lag_seconds.clone());
        registry.register("store_up", "1 when the store answered its last readiness probe", store_up.clone());
        registry.register("revocations", "Revocations known to this replica", revocations.clone());
        Metrics { registry, exchanges, refusals, store_seconds, feed_lag_seconds, store_up, revocations }
    }

    pub fn exchange(&self, outcome: &'static str) {
        self.exchanges.get_or_create(&Outcome { outcome }).inc();
    }

    pub fn refusal(&self, error: &'static str, reason: Option<&'static str>) {
        self.refusals.get_or_create(&Refusal { error, reason: reason.unwrap_or("") }).inc();
    }

    pub fn store_op(&self, op: &'static str, started: std::time::Instant) {
        self.store_seconds.get_or_create(&Op { op }).observe(started.elapsed().as_secs_f64());
    }

    /// The text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}
