//! The mlx5 model's configuration: the tracker capabilities the device reports and the
//! faults tests inject.

/// Smallest receive ring, in bytes.
pub const MIN_RING_BYTES: u64 = 2 << 20;

/// The tracker capabilities the device reports (`pg_track_*` in the mlx5 HCA caps).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Mlx5Caps {
    /// Most ranges one tracker object covers (hardware: up to 255).
    pub max_num_range: u32,
    /// log2 of the smallest tracked page size.
    pub log_min_page_size: u8,
    /// log2 of the largest tracked page size.
    pub log_max_page_size: u8,
    /// log2 of the smallest address space (next power of two of the summed lengths).
    pub log_min_addr_space: u8,
    /// log2 of the largest address space.
    pub log_max_addr_space: u8,
    /// log2 of the report message size in bytes.
    pub log_max_msg_size: u8,
}

/// A capability string that does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CapsError {
    /// The preset name is not one of `cx7`, `tiny`, `unlimited`.
    #[error("unknown mlx5 preset {0:?} (known: cx7, tiny, unlimited)")]
    UnknownPreset(String),
    /// An override is not `field=value` with a known field and a number that fits it.
    #[error("bad mlx5 capability override {0:?}")]
    BadOverride(String),
    /// The capabilities contradict each other (min above max, sizes beyond 2^63).
    #[error("inconsistent mlx5 capabilities: {0}")]
    Inconsistent(&'static str),
}

impl Mlx5Caps {
    /// Modelled on a ConnectX-7 class VF: 255 ranges, 4 KiB to 1 GiB pages, address space
    /// up to 2^42 bytes (why QEMU plans a third range), 4 KiB messages (512 entries).
    pub const fn cx7() -> Self {
        Mlx5Caps {
            max_num_range: 255,
            log_min_page_size: 12,
            log_max_page_size: 30,
            log_min_addr_space: 12,
            log_max_addr_space: 42,
            log_max_msg_size: 12,
        }
    }

    /// Small limits for tests: 4 ranges, 2^32-byte address space, 4 KiB to 2 MiB pages,
    /// 512-byte messages (64 entries).
    pub const fn tiny() -> Self {
        Mlx5Caps {
            max_num_range: 4,
            log_min_page_size: 12,
            log_max_page_size: 21,
            log_min_addr_space: 12,
            log_max_addr_space: 32,
            log_max_msg_size: 9,
        }
    }

    /// No practical limit: for running the shared conformance suite unchanged.
    pub const fn unlimited() -> Self {
        Mlx5Caps {
            max_num_range: u32::MAX,
            log_min_page_size: 12,
            log_max_page_size: 30,
            log_min_addr_space: 0,
            log_max_addr_space: 64,
            log_max_msg_size: 12,
        }
    }

    /// A preset by name.
    pub fn preset(name: &str) -> Result<Self, CapsError> {
        match name {
            "cx7" => Ok(Self::cx7()),
            "tiny" => Ok(Self::tiny()),
            "unlimited" => Ok(Self::unlimited()),
            other => Err(CapsError::UnknownPreset(other.to_string())),
        }
    }

    /// Parses `PRESET[,field=value...]` (the part after `mlx5:`); an empty string is `cx7`.
    /// Example: `tiny,max_num_range=8,log_max_msg_size=12`.
    pub fn parse(spec: &str) -> Result<Self, CapsError> {
        let mut parts = spec.split(',');
        let name = parts.next().unwrap_or("").trim();
        let mut caps = if name.is_empty() {
            Self::cx7()
        } else {
            Self::preset(name)?
        };
        for part in parts {
            let bad = || CapsError::BadOverride(part.to_string());
            let (field, value) = part.split_once('=').ok_or_else(bad)?;
            let value: u64 = value.trim().parse().map_err(|_| bad())?;
            let small = || u8::try_from(value).map_err(|_| bad());
            match field.trim() {
                "max_num_range" => caps.max_num_range = u32::try_from(value).map_err(|_| bad())?,
                "log_min_page_size" => caps.log_min_page_size = small()?,
                "log_max_page_size" => caps.log_max_page_size = small()?,
                "log_min_addr_space" => caps.log_min_addr_space = small()?,
                "log_max_addr_space" => caps.log_max_addr_space = small()?,
                "log_max_msg_size" => caps.log_max_msg_size = small()?,
                _ => return Err(bad()),
            }
        }
        caps.check()?;
        Ok(caps)
    }

    /// Rejects contradictory capabilities.
    pub fn check(&self) -> Result<(), CapsError> {
        if self.max_num_range == 0 {
            return Err(CapsError::Inconsistent("max_num_range is 0"));
        }
        if self.log_min_page_size > self.log_max_page_size || self.log_max_page_size > 63 {
            return Err(CapsError::Inconsistent("page size bounds"));
        }
        if self.log_min_addr_space > self.log_max_addr_space || self.log_max_addr_space > 64 {
            return Err(CapsError::Inconsistent("address space bounds"));
        }
        if !(3..=30).contains(&self.log_max_msg_size) {
            return Err(CapsError::Inconsistent("message size must be 8 B to 1 GiB"));
        }
        Ok(())
    }

    /// Bytes of one report message.
    pub fn max_msg_size(&self) -> usize {
        1usize << self.log_max_msg_size
    }

    /// Bytes of the receive ring: `max(2 MiB, 4 x max_msg_size)`.
    pub fn ring_bytes(&self) -> u64 {
        MIN_RING_BYTES.max(4 * self.max_msg_size() as u64)
    }
}

/// A fault to inject at the next REPORT.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mlx5Fault {
    /// A completion-queue error event (the CQ overran or was misconfigured).
    CompletionQueueError,
    /// A catastrophic error event on a queue pair (WQ_CATAS).
    Catastrophic,
    /// The tracker object moves to ERROR without a completion; an "object changed" event
    /// makes the driver query it.
    ObjectChangedError,
    /// An "object changed" event while the object is fine (the driver queries, finds
    /// REPORTING or TRACKING, and carries on): not an error.
    ObjectChangedBenign,
    /// The first message of the report completes with the state ERROR.
    CompletionError,
    /// The first message's byte count is not a whole number of entries.
    MalformedMessage,
    /// The first message's byte count exceeds the receive buffer.
    OversizedMessage,
    /// The first message completes with an error opcode instead of SEND with immediate.
    BadOpcode,
}

impl std::str::FromStr for Mlx5Fault {
    type Err = String;

    /// `cq-error`, `catastrophic`, `object-changed-error`, `object-changed`,
    /// `completion-error`, `malformed`, `oversized`, `bad-opcode`.
    fn from_str(name: &str) -> Result<Self, String> {
        Ok(match name {
            "cq-error" => Mlx5Fault::CompletionQueueError,
            "catastrophic" => Mlx5Fault::Catastrophic,
            "object-changed-error" => Mlx5Fault::ObjectChangedError,
            "object-changed" => Mlx5Fault::ObjectChangedBenign,
            "completion-error" => Mlx5Fault::CompletionError,
            "malformed" => Mlx5Fault::MalformedMessage,
            "oversized" => Mlx5Fault::OversizedMessage,
            "bad-opcode" => Mlx5Fault::BadOpcode,
            other => return Err(format!("unknown mlx5 fault {other:?}")),
        })
    }
}
