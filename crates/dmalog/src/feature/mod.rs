//! The one DEVICE_FEATURE dispatcher, for both dialects (the kernel's
//! `vfio_ioctl_device_feature()`).
//!
//! [`FeatureRequest`] checks the 8-byte header once (SPEC 3.1 steps 1-4) and names the
//! feature; [`DeviceFeatures`] checks that the device has it and that the access is allowed
//! (steps 5-8), then hands it to one function per feature: the DMA logging features to the
//! [`LoggingCore`], the migration features to whatever implements [`MigrationFeatures`] (the
//! device's migration state machine). No I/O: a request is bytes, a reply is bytes (the
//! vfio-user message) or the request written in place (the kernel ioctl), and the kernel
//! dialect's pointers are reached through [`UserMemory`].
//!
//! `logging` holds the three DMA logging features, `migration` the migration features and
//! the [`MigrationFeatures`] trait.

mod logging;
mod migration;

use logging::{logging_report, logging_start, logging_stop};
use migration::mig_device_state;
pub use migration::MigrationFeatures;

use crate::driver::LogDriver;
use crate::error::LogError;
use crate::logging_core::{Dialect, LoggingCore};
use crate::uapi::{
    FeatureHeader, UapiStruct, FEATURE_DMA_LOGGING_REPORT, FEATURE_DMA_LOGGING_START,
    FEATURE_DMA_LOGGING_STOP, FEATURE_GET, FEATURE_HEADER_BYTES, FEATURE_MIGRATION,
    FEATURE_MIG_DATA_SIZE, FEATURE_MIG_DEVICE_STATE, FEATURE_RESERVED_MASK, FEATURE_SET,
};
use crate::user_memory::UserMemory;

/// Why a DEVICE_FEATURE failed; [`FeatureError::errno`] is what the ioctl or the vfio-user
/// error reply carries.
#[derive(Debug, thiserror::Error)]
pub enum FeatureError {
    /// A header, access or logging rule of SPEC 3 (its own errno).
    #[error(transparent)]
    Logging(#[from] LogError),
    /// The migration side refused (a state change it cannot make, its data stream failed).
    #[error("migration feature refused (errno {errno}): {reason}")]
    Migration {
        /// The errno to answer with.
        errno: i32,
        /// Why, for the log.
        reason: String,
    },
}

impl FeatureError {
    /// A refusal by the migration side, answered with `errno`.
    pub fn migration(errno: i32, reason: impl std::fmt::Display) -> Self {
        FeatureError::Migration {
            errno,
            reason: reason.to_string(),
        }
    }

    /// The errno this error is answered with.
    pub fn errno(&self) -> i32 {
        match self {
            FeatureError::Logging(err) => err.errno(),
            FeatureError::Migration { errno, .. } => *errno,
        }
    }
}

/// Shorthand for results of the dispatcher.
pub type FeatureResult<T> = Result<T, FeatureError>;

/// The DEVICE_FEATURE indexes the dispatcher knows; any other is ENOTTY.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Feature {
    /// MIGRATION (1): GET the migration flags.
    Migration,
    /// MIG_DEVICE_STATE (2): GET or SET the migration state.
    MigDeviceState,
    /// DMA_LOGGING_START (6): SET.
    DmaLoggingStart,
    /// DMA_LOGGING_STOP (7): SET.
    DmaLoggingStop,
    /// DMA_LOGGING_REPORT (8): GET.
    DmaLoggingReport,
    /// MIG_DATA_SIZE (9): GET the bytes of migration data left (kernel devices only).
    MigDataSize,
}

impl Feature {
    /// The feature of a header's index, if known.
    pub fn from_index(index: u32) -> Option<Feature> {
        Some(match index {
            FEATURE_MIGRATION => Feature::Migration,
            FEATURE_MIG_DEVICE_STATE => Feature::MigDeviceState,
            FEATURE_DMA_LOGGING_START => Feature::DmaLoggingStart,
            FEATURE_DMA_LOGGING_STOP => Feature::DmaLoggingStop,
            FEATURE_DMA_LOGGING_REPORT => Feature::DmaLoggingReport,
            FEATURE_MIG_DATA_SIZE => Feature::MigDataSize,
            _ => return None,
        })
    }

    /// Whether it is one of the three DMA logging features.
    pub fn is_logging(self) -> bool {
        matches!(
            self,
            Feature::DmaLoggingStart | Feature::DmaLoggingStop | Feature::DmaLoggingReport
        )
    }

    /// The accesses it supports (`FEATURE_GET`, `FEATURE_SET` or both).
    fn accesses(self) -> u32 {
        match self {
            Feature::DmaLoggingStart | Feature::DmaLoggingStop => FEATURE_SET,
            Feature::Migration | Feature::DmaLoggingReport | Feature::MigDataSize => FEATURE_GET,
            Feature::MigDeviceState => FEATURE_GET | FEATURE_SET,
        }
    }
}

/// A DEVICE_FEATURE request whose header passed SPEC 3.1 steps 1-4: the bytes (header then
/// payload; `&[u8]` in the vfio-user dialect, `&mut [u8]` in the kernel's, where replies are
/// written in place), the decoded header and the feature.
#[derive(Debug)]
pub struct FeatureRequest<B> {
    bytes: B,
    header: FeatureHeader,
    feature: Feature,
    dialect: Dialect,
}

impl<'r> FeatureRequest<&'r [u8]> {
    /// A vfio-user DEVICE_FEATURE payload, for a connection with this negotiated
    /// `max_data_xfer_size` (bytes; it bounds a REPORT reply).
    pub fn vfio_user(bytes: &'r [u8], max_data_xfer_size: u64) -> FeatureResult<Self> {
        Self::parse(bytes, Dialect::VfioUser { max_data_xfer_size })
    }
}

impl<'r> FeatureRequest<&'r mut [u8]> {
    /// The user's `struct vfio_device_feature` of a kernel ioctl (`argsz` bytes as the
    /// ioctl copies them, or fewer when the user's buffer is short).
    pub fn kernel(bytes: &'r mut [u8]) -> FeatureResult<Self> {
        Self::parse(bytes, Dialect::Kernel)
    }
}

impl<B: AsRef<[u8]>> FeatureRequest<B> {
    /// SPEC 3.1 steps 1-4, once for every feature.
    fn parse(bytes: B, dialect: Dialect) -> FeatureResult<Self> {
        let request = bytes.as_ref();
        let header = FeatureHeader::decode(request)
            .map_err(|_| LogError::Invalid("shorter than the feature header"))?;
        if (header.argsz as usize) < FEATURE_HEADER_BYTES {
            return Err(LogError::Invalid("argsz below the feature header").into());
        }
        // vfio-user: argsz is the largest reply the client accepts, and a SET or PROBE is
        // answered by an echo.
        if matches!(dialect, Dialect::VfioUser { .. })
            && (header.is_set() || header.is_probe())
            && (header.argsz as usize) < request.len()
        {
            return Err(LogError::Invalid("argsz below the size of the echoed reply").into());
        }
        if header.flags & FEATURE_RESERVED_MASK != 0 {
            return Err(LogError::Invalid("reserved flag bits set").into());
        }
        if header.is_get() && header.is_set() && !header.is_probe() {
            return Err(LogError::Invalid("GET and SET together without PROBE").into());
        }
        let feature = Feature::from_index(header.index())
            .ok_or(LogError::NotSupported("unknown feature index"))?;
        Ok(FeatureRequest {
            bytes,
            header,
            feature,
            dialect,
        })
    }

    /// The decoded header.
    pub fn header(&self) -> FeatureHeader {
        self.header
    }

    /// The feature asked for.
    pub fn feature(&self) -> Feature {
        self.feature
    }

    /// Whether this is a REPORT to carry out (GET, not PROBE): what a fault plan counts.
    pub fn is_report(&self) -> bool {
        self.feature == Feature::DmaLoggingReport && self.header.is_get() && !self.header.is_probe()
    }
}

/// What one device offers through DEVICE_FEATURE: its DMA logging and, if it migrates, its
/// migration side.
pub struct DeviceFeatures<'d, D> {
    /// The DMA logging state (a core without a driver answers ENOTTY to logging features).
    pub logging: &'d mut LoggingCore<D>,
    /// The migration side (None: the migration features are ENOTTY).
    pub migration: Option<&'d mut dyn MigrationFeatures>,
}

impl<D> std::fmt::Debug for DeviceFeatures<'_, D> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceFeatures")
            .field("logging", &self.logging)
            .field("migration", &self.migration.is_some())
            .finish()
    }
}

/// A request's payload and where its reply goes, in one of the two dialects.
enum Payload<'r> {
    /// The request is echoed or answered into `reply`.
    VfioUser {
        request: &'r [u8],
        max_data_xfer_size: u64,
        reply: &'r mut Vec<u8>,
    },
    /// The reply is written into the request; its pointers lead into `user`.
    Kernel {
        request: &'r mut [u8],
        user: &'r mut dyn UserMemory,
    },
}

impl Payload<'_> {
    fn dialect(&self) -> Dialect {
        match self {
            Payload::VfioUser {
                max_data_xfer_size, ..
            } => Dialect::VfioUser {
                max_data_xfer_size: *max_data_xfer_size,
            },
            Payload::Kernel { .. } => Dialect::Kernel,
        }
    }

    /// The reply of a GET with fixed-size `data`: vfio-user appends it with `argsz` set to
    /// the full size (EINVAL when the client's argsz has no room); the kernel writes it over
    /// the payload (EINVAL when argsz or the buffer is shorter).
    fn get_reply(self, header: &FeatureHeader, data: &[u8]) -> FeatureResult<()> {
        let full = FEATURE_HEADER_BYTES + data.len();
        match self {
            Payload::VfioUser { reply, .. } => {
                if (header.argsz as usize) < full {
                    return Err(LogError::Invalid("argsz below the GET reply").into());
                }
                let header = FeatureHeader {
                    argsz: full as u32,
                    flags: header.flags,
                };
                reply.extend_from_slice(&header.encode());
                reply.extend_from_slice(data);
            }
            Payload::Kernel { request, .. } => {
                kernel_payload(
                    request,
                    header,
                    data.len(),
                    LogError::Invalid("short payload"),
                )?[..data.len()]
                    .copy_from_slice(data);
            }
        }
        Ok(())
    }
}

/// The kernel dialect's payload of at least `minimum` bytes: EINVAL when `argsz` says it is
/// shorter, `short_buffer` when the bytes lent are.
fn kernel_payload<'a>(
    request: &'a mut [u8],
    header: &FeatureHeader,
    minimum: usize,
    short_buffer: LogError,
) -> FeatureResult<&'a mut [u8]> {
    if (header.argsz as usize) - FEATURE_HEADER_BYTES < minimum {
        return Err(LogError::Invalid("payload shorter than the feature's minimum").into());
    }
    match request.get_mut(FEATURE_HEADER_BYTES..) {
        Some(payload) if payload.len() >= minimum => Ok(payload),
        _ => Err(short_buffer.into()),
    }
}

/// [`kernel_payload`] for a payload the ioctl copies from the user: EFAULT when short.
fn kernel_user_payload<'a>(
    request: &'a mut [u8],
    header: &FeatureHeader,
    minimum: usize,
) -> FeatureResult<&'a mut [u8]> {
    kernel_payload(request, header, minimum, user_fault(minimum))
}

fn user_fault(len: usize) -> LogError {
    LogError::Fault {
        addr: 0,
        len: len as u64,
    }
}

impl<'d, D: LogDriver> DeviceFeatures<'d, D> {
    /// A device with DMA logging (or none, per `logging`) and no migration.
    pub fn logging_only(logging: &'d mut LoggingCore<D>) -> Self {
        DeviceFeatures {
            logging,
            migration: None,
        }
    }

    /// Carries out a vfio-user DEVICE_FEATURE. On success `reply` holds the reply's
    /// feature payload: the request echoed for SET and PROBE (with START's chosen page size
    /// written in), or for a GET the header with `argsz` set to the full size followed by
    /// the data (REPORT: the 24-byte request, then the bitmap as whole u64 words). `reply`
    /// is cleared first and may be reused across calls (no allocation once large enough).
    pub fn vfio_user(
        &mut self,
        request: FeatureRequest<&[u8]>,
        reply: &mut Vec<u8>,
    ) -> FeatureResult<()> {
        reply.clear();
        let FeatureRequest {
            bytes,
            header,
            feature,
            dialect,
        } = request;
        if self.admit(&header, feature)? {
            reply.extend_from_slice(bytes);
            return Ok(());
        }
        let max_data_xfer_size = match dialect {
            Dialect::VfioUser { max_data_xfer_size } => max_data_xfer_size,
            Dialect::Kernel => 0,
        };
        let payload = Payload::VfioUser {
            request: bytes,
            max_data_xfer_size,
            reply,
        };
        self.run(feature, &header, payload)
    }

    /// Carries out a kernel-dialect DEVICE_FEATURE: the reply (START's chosen page size, a
    /// GET's data, MIG_DEVICE_STATE's state and data fd) is written into the request; the
    /// ranges and the bitmap are reached through `user` (EFAULT when not there).
    pub fn kernel(
        &mut self,
        request: FeatureRequest<&mut [u8]>,
        user: &mut dyn UserMemory,
    ) -> FeatureResult<()> {
        let FeatureRequest {
            bytes,
            header,
            feature,
            ..
        } = request;
        if self.admit(&header, feature)? {
            return Ok(());
        }
        self.run(
            feature,
            &header,
            Payload::Kernel {
                request: bytes,
                user,
            },
        )
    }

    /// SPEC 3.1 steps 5-8: the device has the feature, the access is one it supports;
    /// `Ok(true)` for a PROBE (answered without a payload), `Ok(false)` to carry it out.
    fn admit(&self, header: &FeatureHeader, feature: Feature) -> FeatureResult<bool> {
        let present = match feature {
            _ if feature.is_logging() => self.logging.is_supported(),
            Feature::MigDataSize => self.migration.as_ref().is_some_and(|m| m.has_data_size()),
            _ => self.migration.is_some(),
        };
        if !present {
            return Err(LogError::NotSupported("the device has no such feature").into());
        }
        if header.flags & (FEATURE_GET | FEATURE_SET) & !feature.accesses() != 0 {
            return Err(LogError::Invalid("access not supported by this feature").into());
        }
        if header.is_probe() {
            return Ok(true);
        }
        if !header.is_get() && !header.is_set() {
            return Err(LogError::Invalid("neither GET nor SET").into());
        }
        Ok(false)
    }

    /// One function per feature.
    fn run(
        &mut self,
        feature: Feature,
        header: &FeatureHeader,
        payload: Payload<'_>,
    ) -> FeatureResult<()> {
        let no_migration = || LogError::NotSupported("no migration features");
        match feature {
            Feature::DmaLoggingStart => logging_start(self.logging, header, payload),
            Feature::DmaLoggingStop => logging_stop(self.logging, payload),
            Feature::DmaLoggingReport => logging_report(self.logging, header, payload),
            Feature::Migration => {
                let migration = self.migration.as_deref_mut().ok_or_else(no_migration)?;
                payload.get_reply(header, &migration.migration_flags().to_le_bytes())
            }
            Feature::MigDeviceState => {
                let migration = self.migration.as_deref_mut().ok_or_else(no_migration)?;
                mig_device_state(migration, header, payload)
            }
            Feature::MigDataSize => {
                let migration = self.migration.as_deref_mut().ok_or_else(no_migration)?;
                payload.get_reply(header, &migration.data_size()?.to_le_bytes())
            }
        }
    }
}

#[cfg(test)]
mod tests;
