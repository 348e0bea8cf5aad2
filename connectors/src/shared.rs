//! State shared by the workers' instances of one component in one process (one set of
//! metrics, one delivery queue), and collectors registered for as long as it lives.

use std::fmt;
use std::sync::Arc;

use prometheus::Registry;
use prometheus::core::Collector;
use tidewatch_api::{ComponentContext, ComponentError, MetricsRegistry};

/// The `T` of the component of `ctx` in this engine run and process
/// ([`ComponentContext::shared`]): the first worker's call makes it (`make` gets the engine's
/// metrics registry, if any), the others share it; it drops with the run.
pub(crate) fn per_component<T: Send + Sync + 'static>(
    ctx: &ComponentContext,
    make: impl FnOnce(Option<&MetricsRegistry>) -> Result<T, ComponentError>,
) -> Result<Arc<T>, ComponentError> {
    ctx.shared(|| make(ctx.metrics_registry()))
}

/// Collectors registered in a registry; dropping it unregisters them.
pub(crate) struct Registered {
    registry: Registry,
    collectors: Vec<Box<dyn Collector>>,
}

impl fmt::Debug for Registered {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Registered").field("collectors", &self.collectors.len()).finish()
    }
}

impl Registered {
    /// Registers every collector, or none: on a failure the ones registered are unregistered
    /// again and the error returned.
    pub(crate) fn all(
        registry: &Registry,
        collectors: Vec<Box<dyn Collector>>,
    ) -> Result<Registered, prometheus::Error> {
        let mut registered = Registered { registry: registry.clone(), collectors: Vec::new() };
        for collector in collectors {
            let handle = unregister_handle(&*collector);
            registry.register(collector)?;
            registered.collectors.push(handle);
        }
        Ok(registered)
    }
}

/// What `Registry::unregister` needs of a registered collector: its descriptors (it matches
/// by their ids). `Box<dyn Collector>` cannot be cloned, so this stand-in carries them.
fn unregister_handle(collector: &dyn Collector) -> Box<dyn Collector> {
    struct Same(Vec<prometheus::core::Desc>, Vec<prometheus::proto::MetricFamily>);
    impl Collector for Same {
        fn desc(&self) -> Vec<&prometheus::core::Desc> {
            self.0.iter().collect()
        }
        fn collect(&self) -> Vec<prometheus::proto::MetricFamily> {
            self.1.clone()
        }
    }
    Box::new(Same(collector.desc().into_iter().cloned().collect(), Vec::new()))
}

impl Drop for Registered {
    fn drop(&mut self) {
        for collector in self.collectors.drain(..) {
            let _ = self.registry.unregister(collector);
        }
    }
}
