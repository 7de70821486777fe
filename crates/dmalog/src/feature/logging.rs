//! The DMA logging features (START, STOP, REPORT) in both dialects, on a [`LoggingCore`].

use super::{kernel_user_payload, user_fault, FeatureResult, Payload};
use crate::driver::LogDriver;
use crate::error::LogError;
use crate::iova_bitmap::report_bytes;
use crate::logging_core::LoggingCore;
use crate::ranges::DEFAULT_MAX_RANGES;
use crate::uapi::{
    FeatureHeader, KernelLoggingControl, KernelLoggingReport, LoggingRange, UapiStruct,
    UserLoggingControl, UserLoggingReport, FEATURE_HEADER_BYTES, KERNEL_CONTROL_BYTES,
    KERNEL_REPORT_BYTES, RANGE_BYTES, USER_CONTROL_BYTES, USER_REPORT_BYTES,
};

/// DMA_LOGGING_START (SET): decode the ranges (inline, or through the user pointer), start,
/// and answer the chosen page size in the payload's first 8 bytes.
pub(super) fn logging_start<D: LogDriver>(
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
pub(super) fn logging_stop<D: LogDriver>(
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
pub(super) fn logging_report<D: LogDriver>(
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
