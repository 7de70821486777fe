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

use crate::driver::LogDriver;
use crate::error::LogError;
use crate::iova_bitmap::report_bytes;
use crate::logging_core::{Dialect, LoggingCore};
use crate::ranges::DEFAULT_MAX_RANGES;
use crate::uapi::{
    DeviceState, FeatureHeader, KernelLoggingControl, KernelLoggingReport, LoggingRange,
    MigDeviceStatePayload, UapiStruct, UserLoggingControl, UserLoggingReport,
    FEATURE_DMA_LOGGING_REPORT, FEATURE_DMA_LOGGING_START, FEATURE_DMA_LOGGING_STOP, FEATURE_GET,
    FEATURE_HEADER_BYTES, FEATURE_MIGRATION, FEATURE_MIG_DATA_SIZE, FEATURE_MIG_DEVICE_STATE,
    FEATURE_RESERVED_MASK, FEATURE_SET, KERNEL_CONTROL_BYTES, KERNEL_REPORT_BYTES, RANGE_BYTES,
    USER_CONTROL_BYTES, USER_REPORT_BYTES,
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

/// The migration features of a device (its migration state machine): what MIGRATION,
/// MIG_DEVICE_STATE and MIG_DATA_SIZE are served by. Errors become the errno of the reply.
pub trait MigrationFeatures {
    /// MIGRATION GET: `MIGRATION_STOP_COPY | MIGRATION_P2P | MIGRATION_PRE_COPY` bits.
    fn migration_flags(&self) -> u64;
    /// MIG_DEVICE_STATE GET: the current state.
    fn device_state(&self) -> DeviceState;
    /// MIG_DEVICE_STATE SET: moves the device to `target`. Returns the data fd the kernel
    /// dialect hands the user (-1 when the arcs taken create none; vfio-user ignores it).
    fn set_device_state(&mut self, target: DeviceState) -> FeatureResult<i32>;
    /// Whether MIG_DATA_SIZE is served (ENOTTY otherwise).
    fn has_data_size(&self) -> bool {
        false
    }
    /// MIG_DATA_SIZE GET: bytes of migration data still to read.
    fn data_size(&mut self) -> FeatureResult<u64> {
        Err(LogError::NotSupported("no MIG_DATA_SIZE").into())
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

/// DMA_LOGGING_START (SET): decode the ranges (inline, or through the user pointer), start,
/// and answer the chosen page size in the payload's first 8 bytes.
fn logging_start<D: LogDriver>(
    core: &mut LoggingCore<D>,
    header: &FeatureHeader,
    payload: Payload<'_>,
) -> FeatureResult<()> {
    let dialect = payload.dialect();
    match payload {
        Payload::VfioUser { request, reply, .. } => {
            let data = &request[FEATURE_HEADER_BYTES..];
            if data.len() < USER_CONTROL_BYTES {
                return Err(LogError::Invalid("START payload shorter than 16 bytes").into());
            }
            let control = UserLoggingControl::decode(data)
                .map_err(|_| LogError::Invalid("START payload shorter than its ranges"))?;
            core.check_num_ranges(dialect, u64::from(control.num_ranges))?;
            let requested: Vec<LoggingRange> = control.ranges().collect();
            let chosen = core.start_requested(dialect, control.page_size, &requested)?;
            reply.extend_from_slice(request);
            reply[FEATURE_HEADER_BYTES..FEATURE_HEADER_BYTES + 8]
                .copy_from_slice(&chosen.to_le_bytes());
        }
        Payload::Kernel { request, user } => {
            let data = kernel_user_payload(request, header, KERNEL_CONTROL_BYTES)?;
            let control =
                KernelLoggingControl::decode(data).map_err(|_| user_fault(KERNEL_CONTROL_BYTES))?;
            core.check_num_ranges(dialect, u64::from(control.num_ranges))?;
            // Grown as ranges are read, not sized from num_ranges up front: a huge count
            // whose ranges are not there faults on the first missing one.
            let mut requested =
                Vec::with_capacity((control.num_ranges as usize).min(DEFAULT_MAX_RANGES as usize));
            let mut raw = [0u8; RANGE_BYTES];
            for index in 0..u64::from(control.num_ranges) {
                let addr = control
                    .ranges
                    .checked_add(index * RANGE_BYTES as u64)
                    .ok_or(LogError::Fault {
                        addr: control.ranges,
                        len: RANGE_BYTES as u64,
                    })?;
                user.read(addr, &mut raw)?;
                requested
                    .push(LoggingRange::decode_at(&raw, 0).map_err(|_| user_fault(RANGE_BYTES))?);
            }
            let chosen = core.start_requested(dialect, control.page_size, &requested)?;
            data[..8].copy_from_slice(&chosen.to_le_bytes());
        }
    }
    Ok(())
}

/// DMA_LOGGING_STOP (SET): always succeeds; vfio-user echoes the request.
fn logging_stop<D: LogDriver>(
    core: &mut LoggingCore<D>,
    payload: Payload<'_>,
) -> FeatureResult<()> {
    core.stop()?;
    if let Payload::VfioUser { request, reply, .. } = payload {
        reply.extend_from_slice(request);
    }
    Ok(())
}

/// DMA_LOGGING_REPORT (GET): the bitmap goes inline after the echoed request (vfio-user,
/// whole u64 words, bounded by the negotiated transfer size) or to the user's pointer
/// (kernel, exactly `ceil(bits / 8)` bytes).
fn logging_report<D: LogDriver>(
    core: &mut LoggingCore<D>,
    header: &FeatureHeader,
    payload: Payload<'_>,
) -> FeatureResult<()> {
    let dialect = payload.dialect();
    match payload {
        Payload::VfioUser {
            request,
            max_data_xfer_size,
            reply,
        } => {
            let report = UserLoggingReport::decode(&request[FEATURE_HEADER_BYTES..])
                .map_err(|_| LogError::Invalid("REPORT payload shorter than 24 bytes"))?;
            LoggingCore::<D>::check_report(dialect, report.iova, report.length, report.page_size)?;
            let bitmap_bytes = report_bytes(report.length, report.page_size)?.div_ceil(8) * 8;
            let reply_bytes = (FEATURE_HEADER_BYTES + USER_REPORT_BYTES) as u64 + bitmap_bytes;
            if u64::from(header.argsz) < reply_bytes {
                return Err(LogError::Invalid("argsz smaller than the report reply").into());
            }
            core.require_started()?;
            if reply_bytes > max_data_xfer_size || reply_bytes > usize::MAX as u64 {
                return Err(LogError::ReplyTooLarge {
                    reply_bytes,
                    max_bytes: max_data_xfer_size,
                }
                .into());
            }
            let reply_len = reply_bytes as usize;
            reply
                .try_reserve(reply_len)
                .map_err(|_| LogError::OutOfMemory("report reply"))?;
            let reply_header = FeatureHeader {
                argsz: reply_len as u32,
                flags: header.flags,
            };
            reply.extend_from_slice(&reply_header.encode());
            reply.extend_from_slice(&report.encode());
            reply.resize(reply_len, 0);
            let result = core.report_checked(
                report.iova,
                report.length,
                report.page_size,
                &mut reply[FEATURE_HEADER_BYTES + USER_REPORT_BYTES..],
            );
            if result.is_err() {
                reply.clear();
            }
            Ok(result?)
        }
        Payload::Kernel { request, user } => {
            let data = kernel_user_payload(request, header, KERNEL_REPORT_BYTES)?;
            let report =
                KernelLoggingReport::decode(data).map_err(|_| user_fault(KERNEL_REPORT_BYTES))?;
            LoggingCore::<D>::check_report(dialect, report.iova, report.length, report.page_size)?;
            core.require_started()?;
            let bytes = report_bytes(report.length, report.page_size)?;
            let bitmap = user.bytes_mut(report.bitmap, bytes)?;
            Ok(core.report_checked(report.iova, report.length, report.page_size, bitmap)?)
        }
    }
}

/// MIG_DEVICE_STATE: GET answers the state; SET moves the device there (vfio-user echoes
/// the request; the kernel answers the state reached and the data fd).
fn mig_device_state(
    migration: &mut dyn MigrationFeatures,
    header: &FeatureHeader,
    payload: Payload<'_>,
) -> FeatureResult<()> {
    let target =
        |raw: u32| DeviceState::from_u32(raw).ok_or(LogError::Invalid("unknown migration state"));
    if !header.is_set() {
        let state = MigDeviceStatePayload {
            device_state: migration.device_state() as u32,
            data_fd: -1,
        };
        return payload.get_reply(header, &state.encode());
    }
    match payload {
        Payload::VfioUser { request, reply, .. } => {
            let asked = MigDeviceStatePayload::decode(&request[FEATURE_HEADER_BYTES..])
                .map_err(|_| LogError::Invalid("MIG_DEVICE_STATE payload shorter than 8 bytes"))?;
            migration.set_device_state(target(asked.device_state)?)?;
            reply.extend_from_slice(request);
        }
        Payload::Kernel { request, .. } => {
            let short = LogError::Invalid("MIG_DEVICE_STATE payload shorter than 8 bytes");
            let data = kernel_payload(request, header, 8, short)?;
            let asked = MigDeviceStatePayload::decode(data)
                .map_err(|_| LogError::Invalid("MIG_DEVICE_STATE payload shorter than 8 bytes"))?;
            let data_fd = migration.set_device_state(target(asked.device_state)?)?;
            let reached = MigDeviceStatePayload {
                device_state: migration.device_state() as u32,
                data_fd,
            };
            data[..8].copy_from_slice(&reached.encode());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::soft::SoftDriver;
    use crate::uapi::{FEATURE_PROBE, MIGRATION_STOP_COPY};
    use crate::user_memory::SegmentedUserMemory;

    /// A migration side that records the states it was asked for.
    struct Machine {
        state: DeviceState,
        data_size: Option<u64>,
    }

    impl MigrationFeatures for Machine {
        fn migration_flags(&self) -> u64 {
            MIGRATION_STOP_COPY
        }
        fn device_state(&self) -> DeviceState {
            self.state
        }
        fn set_device_state(&mut self, target: DeviceState) -> FeatureResult<i32> {
            if target == DeviceState::Resuming {
                return Err(FeatureError::migration(libc::EBUSY, "busy"));
            }
            self.state = target;
            Ok(7)
        }
        fn has_data_size(&self) -> bool {
            self.data_size.is_some()
        }
        fn data_size(&mut self) -> FeatureResult<u64> {
            Ok(self.data_size.unwrap_or(0))
        }
    }

    fn feature(argsz: u32, flags: u32, data: &[u8]) -> Vec<u8> {
        let mut bytes = FeatureHeader { argsz, flags }.encode().to_vec();
        bytes.extend_from_slice(data);
        bytes
    }

    fn vfio_user(machine: Option<&mut Machine>, request: &[u8]) -> Result<Vec<u8>, i32> {
        let mut core = LoggingCore::new(SoftDriver::new());
        let mut reply = Vec::new();
        let request = FeatureRequest::vfio_user(request, 1 << 20).map_err(|e| e.errno())?;
        DeviceFeatures {
            logging: &mut core,
            migration: machine.map(|m| m as &mut dyn MigrationFeatures),
        }
        .vfio_user(request, &mut reply)
        .map_err(|e| e.errno())?;
        Ok(reply)
    }

    fn kernel(machine: Option<&mut Machine>, request: &mut [u8]) -> Result<(), i32> {
        let mut core = LoggingCore::new(SoftDriver::new());
        let request = FeatureRequest::kernel(request).map_err(|e| e.errno())?;
        DeviceFeatures {
            logging: &mut core,
            migration: machine.map(|m| m as &mut dyn MigrationFeatures),
        }
        .kernel(request, &mut SegmentedUserMemory::new())
        .map_err(|e| e.errno())
    }

    fn machine() -> Machine {
        Machine {
            state: DeviceState::Running,
            data_size: None,
        }
    }

    #[test]
    fn migration_features_without_a_migration_side_are_enotty_probe_included() {
        for index in [
            FEATURE_MIGRATION,
            FEATURE_MIG_DEVICE_STATE,
            FEATURE_MIG_DATA_SIZE,
        ] {
            let probe = feature(16, index | FEATURE_PROBE | FEATURE_GET, &[0; 8]);
            assert_eq!(vfio_user(None, &probe), Err(libc::ENOTTY), "{index}");
            assert_eq!(
                kernel(None, &mut probe.clone()),
                Err(libc::ENOTTY),
                "{index}"
            );
        }
        // MIG_DATA_SIZE needs a side that serves it.
        let get = feature(16, FEATURE_MIG_DATA_SIZE | FEATURE_GET, &[0; 8]);
        assert_eq!(vfio_user(Some(&mut machine()), &get), Err(libc::ENOTTY));
        let mut sized = Machine {
            data_size: Some(4096),
            ..machine()
        };
        let mut request = get.clone();
        assert_eq!(kernel(Some(&mut sized), &mut request), Ok(()));
        assert_eq!(request[8..16], 4096u64.to_le_bytes());
    }

    #[test]
    fn migration_get_answers_in_each_dialect() {
        let get = feature(16, FEATURE_MIGRATION | FEATURE_GET, &[]);
        let reply = vfio_user(Some(&mut machine()), &get).unwrap();
        assert_eq!(
            reply,
            feature(
                16,
                FEATURE_MIGRATION | FEATURE_GET,
                &MIGRATION_STOP_COPY.to_le_bytes()
            )
        );
        // The reply needs room in argsz (vfio-user) or in the payload (kernel).
        let short = feature(15, FEATURE_MIGRATION | FEATURE_GET, &[]);
        assert_eq!(vfio_user(Some(&mut machine()), &short), Err(libc::EINVAL));
        let mut short = feature(15, FEATURE_MIGRATION | FEATURE_GET, &[0; 7]);
        assert_eq!(kernel(Some(&mut machine()), &mut short), Err(libc::EINVAL));
        // SET is not an access MIGRATION has.
        let set = feature(16, FEATURE_MIGRATION | FEATURE_SET, &[0; 8]);
        assert_eq!(vfio_user(Some(&mut machine()), &set), Err(libc::EINVAL));
    }

    #[test]
    fn device_state_set_moves_the_machine_and_answers_per_dialect() {
        let stop = MigDeviceStatePayload {
            device_state: DeviceState::Stop as u32,
            data_fd: -1,
        }
        .encode();
        let set = feature(16, FEATURE_MIG_DEVICE_STATE | FEATURE_SET, &stop);
        let mut m = machine();
        assert_eq!(vfio_user(Some(&mut m), &set), Ok(set.clone()), "an echo");
        assert_eq!(m.state, DeviceState::Stop);
        let mut m = machine();
        let mut request = set.clone();
        kernel(Some(&mut m), &mut request).unwrap();
        let reached = MigDeviceStatePayload::decode(&request[8..]).unwrap();
        assert_eq!(
            (reached.device_state, reached.data_fd),
            (DeviceState::Stop as u32, 7)
        );
        // An unknown state is EINVAL; the side's own refusal keeps its errno.
        let bad = feature(
            16,
            FEATURE_MIG_DEVICE_STATE | FEATURE_SET,
            &[99, 0, 0, 0, 0, 0, 0, 0],
        );
        assert_eq!(vfio_user(Some(&mut machine()), &bad), Err(libc::EINVAL));
        let resuming = feature(
            16,
            FEATURE_MIG_DEVICE_STATE | FEATURE_SET,
            &[4, 0, 0, 0, 0, 0, 0, 0],
        );
        assert_eq!(vfio_user(Some(&mut machine()), &resuming), Err(libc::EBUSY));
        assert_eq!(
            kernel(Some(&mut machine()), &mut resuming.clone()),
            Err(libc::EBUSY)
        );
    }

    #[test]
    fn the_header_is_checked_before_the_feature_is_looked_up() {
        // A reserved bit on an unknown index: EINVAL (step 2) before ENOTTY (step 4).
        let request = feature(8, 1 << 19 | 0x77, &[]);
        assert_eq!(vfio_user(Some(&mut machine()), &request), Err(libc::EINVAL));
        let request = feature(8, FEATURE_GET | 0x77, &[]);
        assert_eq!(vfio_user(Some(&mut machine()), &request), Err(libc::ENOTTY));
        assert_eq!(
            kernel(Some(&mut machine()), &mut request.clone()),
            Err(libc::ENOTTY)
        );
    }
}
