//! The demo scenario as a library: a VMM on both ends of a live migration of a vfio-user
//! device, as `dmalog demo` and `dmalog migrate source|destination` run it.
//!
//! - [`source`]: guest memory in memfds (prefilled), DMA-mapped into the device, the vCPU
//!   and device workloads running, then the migration to the first destination that takes
//!   it ([`failover`]).
//! - [`destination`]: one incoming migration, the device resumed, its workload watched.
//! - [`device`]: the device as the scenario drives it (dma-engine's workload through its
//!   typed registers, region digests and fills for any device).
//! - [`transport`]: the migration stream's TCP links, TLS or plaintext.
//!
//! The engine below knows no device register: dma-engine is programmed here, through
//! `dmalog_device::dma_engine::DmaEngineRegs`. Sizes are bytes, rates bytes per second.

use std::error::Error;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use dmalog_vfio_user::client::CLIENT_MAX_DATA_XFER;
use dmalog_vfio_user::Client;

use crate::MigrateError;

pub mod destination;
pub mod device;
pub mod failover;
pub mod source;
pub mod transport;

pub use destination::{run_destination, DestinationOptions, DestinationOutcome};
pub use device::{DeviceWorkload, RegionDigests, RegisterWrite};
pub use failover::{AllFailed, Attempt, VmState};
pub use source::{run_source, Progress, SourceOptions, SourceOutcome};
pub use transport::{ClientSide, Link, ServerSide};

/// Bytes of a MiB.
pub const MIB: u64 = 1 << 20;

/// Why a step of the scenario failed. Each variant's text is its own step only; the cause
/// is its [`Error::source`], so that a chain printer (`{:#}` of `anyhow`) shows
/// "step: cause: cause's cause".
#[derive(Debug, thiserror::Error)]
pub enum ScenarioError {
    /// A step that failed on its own terms (options that do not fit, a write refused).
    #[error("{0}")]
    Failed(String),
    /// A step that failed because of `source`.
    #[error("{what}")]
    Step {
        /// The step.
        what: String,
        /// Why.
        #[source]
        source: Box<dyn Error + Send + Sync + 'static>,
    },
    /// A socket operation with nothing to add.
    #[error(transparent)]
    Io(#[from] std::io::Error),
    /// The source's migration failed (the VM runs on here unless the destination had been
    /// told to resume it).
    #[error("migration")]
    Migration(#[source] MigrateError),
    /// The incoming migration failed.
    #[error("destination")]
    Destination(#[source] MigrateError),
    /// Every destination failed: the attempts, in order.
    #[error(transparent)]
    AllFailed(#[from] AllFailed),
}

/// `.step(...)`: a cause wrapped in the step it failed.
pub(crate) trait StepContext<T> {
    /// The error as the cause of `what`.
    fn step(self, what: impl FnOnce() -> String) -> Result<T, ScenarioError>;
}

impl<T, E: Error + Send + Sync + 'static> StepContext<T> for Result<T, E> {
    fn step(self, what: impl FnOnce() -> String) -> Result<T, ScenarioError> {
        self.map_err(|source| ScenarioError::Step {
            what: what(),
            source: Box::new(source),
        })
    }
}

/// `err` and its causes, joined by ": " (as `anyhow` prints `{:#}`).
pub fn chain_text(err: &(dyn Error + 'static)) -> String {
    let mut text = err.to_string();
    let mut cause = err.source();
    while let Some(next) = cause {
        text.push_str(": ");
        text.push_str(&next.to_string());
        cause = next.source();
    }
    text
}

/// The errors `err` is made of, itself first.
pub(crate) fn causes<'a>(
    err: &'a (dyn Error + 'static),
) -> impl Iterator<Item = &'a (dyn Error + 'static)> {
    std::iter::successors(Some(err), |e: &&'a (dyn Error + 'static)| (*e).source())
}

/// A client of the device server at `path` (retrying for 20 s while it starts), each of
/// its socket reads and writes bounded by `timeout`: a device server that stops answering
/// fails the migration instead of hanging it.
pub fn connect_device(path: &Path, timeout: Duration) -> Result<Client, ScenarioError> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let attempt = UnixStream::connect(path)
            .and_then(|stream| {
                stream.set_read_timeout(Some(timeout))?;
                stream.set_write_timeout(Some(timeout))?;
                Ok(stream)
            })
            .map_err(|err| Box::new(err) as Box<dyn Error + Send + Sync>)
            .and_then(|stream| {
                Client::with_stream(stream, CLIENT_MAX_DATA_XFER)
                    .map_err(|err| Box::new(err) as Box<dyn Error + Send + Sync>)
            });
        match attempt {
            Ok(client) => return Ok(client),
            Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(10)),
            Err(source) => {
                return Err(ScenarioError::Step {
                    what: "connecting to dmalog serve".into(),
                    source,
                })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_chain_prints_each_step_once() {
        let inner = std::io::Error::other("refused");
        let err = ScenarioError::Step {
            what: "connecting to the destination x".into(),
            source: Box::new(inner),
        };
        assert_eq!(chain_text(&err), "connecting to the destination x: refused");
        let io = ScenarioError::from(std::io::Error::other("plain"));
        assert_eq!(chain_text(&io), "plain");
    }
}
