//! The tracker that logs a served device's DMA writes: the server's caller builds it (a
//! driver factory), so a device author can serve any [`LogDriver`] of their own.

use std::sync::Arc;

use dmalog::{LiveLog, LogDriver, SoftDriver};

/// The tracker of a [`super::Server`]: the driver the logging features run on (or none) and
/// a hook called before each REPORT the server carries out.
pub struct ServedTracker {
    pub(super) driver: Option<Box<dyn LogDriver>>,
    pub(super) before_report: Option<Box<dyn FnMut() + Send>>,
}

impl std::fmt::Debug for ServedTracker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServedTracker")
            .field("logging", &self.driver.is_some())
            .field("before_report", &self.before_report.is_some())
            .finish()
    }
}

impl ServedTracker {
    /// `driver` logs the device's DMA writes. It must take them from the live log the
    /// factory was given (publish its marker there while started), the log the server's
    /// DMA space records every device write on.
    pub fn new(driver: impl LogDriver + 'static) -> Self {
        ServedTracker {
            driver: Some(Box::new(driver)),
            before_report: None,
        }
    }

    /// No DMA logging: PROBE, START, REPORT and STOP are ENOTTY.
    pub fn none() -> Self {
        ServedTracker {
            driver: None,
            before_report: None,
        }
    }

    /// The software tracker on `live`, with the default memory budget (what
    /// [`super::Server::new`] serves).
    pub fn soft(live: &Arc<LiveLog>) -> Self {
        Self::new(SoftDriver::with_live_log(Arc::clone(live)))
    }

    /// Calls `hook` before each REPORT the server carries out (a GET, not a PROBE, whose
    /// header is valid), before the REPORT is checked further: fault injection in a model,
    /// for tests of consumers' error paths.
    pub fn before_each_report(mut self, hook: impl FnMut() + Send + 'static) -> Self {
        self.before_report = Some(Box::new(hook));
        self
    }
}
