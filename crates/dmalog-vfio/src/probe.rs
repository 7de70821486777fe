//! What `dmalog probe` finds out about a VFIO device: DMA logging, migration, PRE_COPY,
//! and optionally whether logging really starts over a given range.

use std::path::{Path, PathBuf};

use dmalog::uapi::{MIGRATION_P2P, MIGRATION_PRE_COPY, MIGRATION_STOP_COPY};
use dmalog::IovaRange;

use crate::device::{VfioDevice, VfioError};
use crate::seam::{IoctlCall, KernelIoctl, VfioIoctl};
use crate::uapi::{bind_iommufd_request, VFIO_DEVICE_BIND_IOMMUFD};

/// Where VFIO device cdevs live.
pub const VFIO_DEVICES_DIR: &str = "/dev/vfio/devices";
/// The iommufd character device.
pub const IOMMUFD_PATH: &str = "/dev/iommu";

/// Migration support of a device.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct MigrationSupport {
    /// The raw MIGRATION flags.
    pub flags: u64,
    /// STOP_COPY supported.
    pub stop_copy: bool,
    /// P2P states supported.
    pub p2p: bool,
    /// PRE_COPY supported.
    pub pre_copy: bool,
}

/// The outcome of `--try-start`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct TryStart {
    /// First IOVA logged.
    pub iova: u64,
    /// Bytes logged.
    pub length: u64,
    /// The page size asked for.
    pub page_size_hint: u64,
    /// The page size the device chose (None when START failed).
    pub chosen_page_size: Option<u64>,
    /// Whether a REPORT over the range succeeded.
    pub report_ok: bool,
    /// Whether STOP succeeded.
    pub stop_ok: bool,
    /// The first error, if any.
    pub error: Option<String>,
}

/// Everything `dmalog probe` prints about one device.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ProbeReport {
    /// The device path (or a label).
    pub device: String,
    /// DMA logging supported (PROBE of DMA_LOGGING_START).
    pub dma_logging: bool,
    /// Migration v2 support (None: the MIGRATION feature is ENOTTY).
    pub migration: Option<MigrationSupport>,
    /// The `--try-start` result.
    pub try_start: Option<TryStart>,
    /// Errors other than "not supported" met while probing.
    pub errors: Vec<String>,
}

/// Probes `device`; with `try_start`, starts logging over the range, reports once and stops.
pub fn probe_device<I: VfioIoctl>(
    label: &str,
    device: &mut VfioDevice<I>,
    try_start: Option<(IovaRange, u64)>,
) -> ProbeReport {
    let mut errors = Vec::new();
    let dma_logging = device.probe_dma_logging().unwrap_or_else(|err| {
        errors.push(format!("DMA logging probe: {err}"));
        false
    });
    let migration = match device.migration_flags() {
        Ok(flags) => Some(MigrationSupport {
            flags,
            stop_copy: flags & MIGRATION_STOP_COPY != 0,
            p2p: flags & MIGRATION_P2P != 0,
            pre_copy: flags & MIGRATION_PRE_COPY != 0,
        }),
        Err(VfioError::NoMigration) => None,
        Err(err) => {
            errors.push(format!("migration probe: {err}"));
            None
        }
    };
    let try_start = try_start.map(|(range, hint)| {
        let mut outcome = TryStart {
            iova: range.iova(),
            length: range.length(),
            page_size_hint: hint,
            chosen_page_size: None,
            report_ok: false,
            stop_ok: false,
            error: None,
        };
        match device.start_logging(&[range], hint) {
            Ok(chosen) => {
                outcome.chosen_page_size = Some(chosen);
                let bytes = dmalog::iova_bitmap::report_bytes(range.length(), chosen).unwrap_or(0);
                let mut bitmap = vec![0u8; bytes as usize];
                match device.report_bytes(range.iova(), range.length(), chosen, &mut bitmap) {
                    Ok(()) => outcome.report_ok = true,
                    Err(err) => outcome.error = Some(format!("REPORT: {err}")),
                }
            }
            Err(err) => outcome.error = Some(format!("START: {err}")),
        }
        match device.stop_logging() {
            Ok(()) => outcome.stop_ok = true,
            Err(err) => {
                outcome.error.get_or_insert(format!("STOP: {err}"));
            }
        }
        outcome
    });
    ProbeReport {
        device: label.to_string(),
        dma_logging,
        migration,
        try_start,
        errors,
    }
}

/// Why a device could not be opened for probing.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// The machine has no VFIO device cdevs.
    #[error("no VFIO on this machine: {0} does not exist (load vfio-pci, bind a device to it, and use a kernel with CONFIG_VFIO_DEVICE_CDEV)")]
    NoVfio(String),
    /// Opening a path failed.
    #[error("cannot open {path}: {source}")]
    Open {
        /// The path.
        path: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// VFIO_DEVICE_BIND_IOMMUFD failed.
    #[error("cannot bind {path} to {IOMMUFD_PATH}: {errno}")]
    Bind {
        /// The device path.
        path: String,
        /// The errno.
        errno: crate::seam::Errno,
    },
}

/// An opened VFIO cdev, bound to an iommufd that lives as long as it.
#[derive(Debug)]
pub struct BoundDevice {
    /// The device.
    pub device: VfioDevice<KernelIoctl>,
    _iommufd: KernelIoctl,
}

/// Lists the VFIO device cdevs of the machine, or says that there is no VFIO.
pub fn scan_devices(dir: &Path) -> Result<Vec<PathBuf>, OpenError> {
    let entries =
        std::fs::read_dir(dir).map_err(|_| OpenError::NoVfio(dir.display().to_string()))?;
    let mut devices: Vec<PathBuf> = entries.filter_map(|e| e.ok().map(|e| e.path())).collect();
    devices.sort();
    Ok(devices)
}

/// Opens a VFIO cdev and binds it to a fresh iommufd (needed before DEVICE_FEATURE).
pub fn open_cdev(path: &Path) -> Result<BoundDevice, OpenError> {
    if !path.exists() && !Path::new(VFIO_DEVICES_DIR).exists() {
        return Err(OpenError::NoVfio(VFIO_DEVICES_DIR.to_string()));
    }
    let open = |p: &Path| {
        KernelIoctl::open(p).map_err(|source| OpenError::Open {
            path: p.display().to_string(),
            source,
        })
    };
    let mut device = open(path)?;
    let iommufd = open(Path::new(IOMMUFD_PATH))?;
    let mut bind = bind_iommufd_request(iommufd.raw_fd());
    // SAFETY: BIND_IOMMUFD is a plain structure (`bind`, argsz its length) with no embedded
    // pointers; the iommufd it names stays open (owned by the returned `BoundDevice`).
    unsafe { device.ioctl(IoctlCall::device(VFIO_DEVICE_BIND_IOMMUFD, &mut bind)) }.map_err(
        |errno| OpenError::Bind {
            path: path.display().to_string(),
            errno,
        },
    )?;
    Ok(BoundDevice {
        device: VfioDevice::new(device),
        _iommufd: iommufd,
    })
}
