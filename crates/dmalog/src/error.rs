//! The one error type of the logging core and its drivers, and its errno mapping.
//!
//! Every rule of SPEC section 3 fails with one of these variants; [`LogError::errno`] is
//! the single place where a variant becomes the errno a kernel ioctl or a vfio-user reply
//! carries.

/// Why a logging request or a driver operation failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LogError {
    /// A malformed or out-of-state request (EINVAL). The text says which rule.
    #[error("invalid argument: {0}")]
    Invalid(&'static str),
    /// More ranges than the core accepts (E2BIG).
    #[error("{num_ranges} ranges exceed the limit of {limit}")]
    TooManyRanges {
        /// Ranges in the request.
        num_ranges: u64,
        /// The configured maximum.
        limit: u64,
    },
    /// A vfio-user REPORT reply would not fit the negotiated transfer size (E2BIG).
    #[error("reply of {reply_bytes} bytes exceeds max_data_xfer_size {max_bytes}")]
    ReplyTooLarge {
        /// Bytes the reply would need.
        reply_bytes: u64,
        /// The negotiated maximum.
        max_bytes: u64,
    },
    /// `iova + len_bytes` wraps past 2^64 (EOVERFLOW).
    #[error("iova {iova:#x} + length {len_bytes:#x} overflows")]
    Overflow {
        /// Start of the range.
        iova: u64,
        /// Length in bytes.
        len_bytes: u64,
    },
    /// Unknown feature index, or the device has no DMA logging (ENOTTY).
    #[error("feature not supported: {0}")]
    NotSupported(&'static str),
    /// The tracker cannot cover the requested ranges (EOPNOTSUPP).
    #[error("tracker cannot cover the ranges: {0}")]
    Unsupported(&'static str),
    /// The tracker is in its error state (EIO) until STOP and a new START.
    #[error("tracker error: {0}")]
    TrackerError(&'static str),
    /// The tracking device went away (ENOTCONN).
    #[error("tracking device detached")]
    Detached,
    /// The log could not be allocated (ENOMEM).
    #[error("out of memory: {0}")]
    OutOfMemory(&'static str),
    /// A user pointer of a kernel-dialect request does not point to readable or writable
    /// memory of the right size (EFAULT).
    #[error("bad address {addr:#x} ({len} bytes)")]
    Fault {
        /// The user address.
        addr: u64,
        /// Bytes the access needed.
        len: u64,
    },
}

impl LogError {
    /// The errno this error is reported with on the wire or from the ioctl.
    pub fn errno(&self) -> i32 {
        match self {
            LogError::Invalid(_) => libc::EINVAL,
            LogError::TooManyRanges { .. } | LogError::ReplyTooLarge { .. } => libc::E2BIG,
            LogError::Overflow { .. } => libc::EOVERFLOW,
            LogError::NotSupported(_) => libc::ENOTTY,
            LogError::Unsupported(_) => libc::EOPNOTSUPP,
            LogError::TrackerError(_) => libc::EIO,
            LogError::Detached => libc::ENOTCONN,
            LogError::OutOfMemory(_) => libc::ENOMEM,
            LogError::Fault { .. } => libc::EFAULT,
        }
    }

    /// The error a peer's errno stands for, for consumers that receive errnos (a vfio-user
    /// error reply, an ioctl's return). Errnos dmalog never sends map to `Invalid`.
    pub fn from_errno(errno: i32) -> LogError {
        match errno {
            libc::E2BIG => LogError::TooManyRanges {
                num_ranges: 0,
                limit: 0,
            },
            libc::EOVERFLOW => LogError::Overflow {
                iova: 0,
                len_bytes: 0,
            },
            libc::ENOTTY => LogError::NotSupported("reported by the device"),
            libc::EOPNOTSUPP => LogError::Unsupported("reported by the device"),
            libc::EIO => LogError::TrackerError("reported by the device"),
            libc::ENOTCONN => LogError::Detached,
            libc::ENOMEM => LogError::OutOfMemory("reported by the device"),
            libc::EFAULT => LogError::Fault { addr: 0, len: 0 },
            _ => LogError::Invalid("reported by the device"),
        }
    }
}

/// Shorthand for results of the logging core and drivers.
pub type LogResult<T> = Result<T, LogError>;
