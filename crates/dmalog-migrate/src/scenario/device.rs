//! The device as the scenario drives it over vfio-user: which device the server emulates
//! (its PCI IDs), dma-engine's DMA workload (started only on a dma-engine, or when asked,
//! through the typed registers of `dmalog_device::dma_engine`), and digests and fills of
//! device regions, so that a migration of any vfio-user device can be checked region by
//! region.

use dmalog::uapi::{DeviceState, MIGRATION_PRE_COPY};
use dmalog::{DirtyTracker, IovaRange, MigrationDevice, PendingBytes, TrackerError, TrackerResult};
use dmalog_device::dma_engine::{self, DmaEngineRegs, RegisterAccess, WorkloadConfig};
use dmalog_vfio_user::pci_config::{read_config_space, PciConfig};
use dmalog_vfio_user::{Client, ClientError};
use tracing::{info, warn};

use super::{ScenarioError, StepContext};
use crate::engine::SourceDevice;

/// Whether to start dma-engine's DMA workload on the source device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DeviceWorkload {
    /// When the device's PCI IDs say dma-engine.
    #[default]
    Auto,
    /// Always (the device must have dma-engine's workload registers).
    On,
    /// Never: the device does only what the guest (nobody, here) asks.
    Off,
}

/// Region 0 (BAR0) of the device behind a vfio-user client, as 8-byte registers.
#[derive(Debug)]
pub struct Bar0<'a>(pub &'a mut Client);

impl RegisterAccess for Bar0<'_> {
    type Error = ClientError;
    fn read_register(&mut self, offset: u64) -> Result<u64, ClientError> {
        self.0.read_u64(0, offset)
    }
    fn write_register(&mut self, offset: u64, value: u64) -> Result<(), ClientError> {
        self.0.write_u64(0, offset, value)
    }
}

/// dma-engine's registers through `client`.
pub fn dma_engine(client: &mut Client) -> DmaEngineRegs<Bar0<'_>> {
    DmaEngineRegs::new(Bar0(client))
}

/// Whether the device behind `client` is dma-engine, by its PCI vendor and device IDs. A
/// device without a readable configuration space is not.
pub fn is_dma_engine(client: &mut Client) -> bool {
    let ids = read_config_space(client)
        .map_err(|err| err.to_string())
        .and_then(|bytes| PciConfig::parse(&bytes).map_err(|err| err.to_string()));
    match ids {
        Ok(config) => {
            info!(
                vendor = format_args!("{:#06x}", config.vendor_id),
                device = format_args!("{:#06x}", config.device_id),
                "device identity"
            );
            (config.vendor_id, config.device_id) == (dma_engine::VENDOR_ID, dma_engine::DEVICE_ID)
        }
        Err(err) => {
            warn!(%err, "cannot read the device's PCI IDs: taken as not dma-engine");
            false
        }
    }
}

/// Whether `choice` starts the workload on the device behind `client`.
pub fn wanted(choice: DeviceWorkload, client: &mut Client) -> bool {
    match choice {
        DeviceWorkload::On => true,
        DeviceWorkload::Off => false,
        DeviceWorkload::Auto => is_dma_engine(client),
    }
}

/// Programs and starts dma-engine's workload: `span_bytes` from `base_iova`, at
/// `rate_bytes_per_sec` in 4 KiB writes.
pub fn start_workload(
    client: &mut Client,
    base_iova: u64,
    span_bytes: u64,
    rate_bytes_per_sec: u64,
) -> Result<(), ScenarioError> {
    let config = WorkloadConfig {
        base_iova,
        span_bytes,
        write_bytes: 4096,
        rate_bytes_per_sec,
        seed: 0x5eed,
    };
    dma_engine(client)
        .start_workload(&config)
        .step(|| "programming the dma-engine workload (BAR0 registers 0x80-0xa8)".into())
}

/// dma-engine's count of workload writes so far.
pub fn workload_writes(client: &mut Client) -> Result<u64, ScenarioError> {
    dma_engine(client)
        .workload_writes()
        .step(|| "reading the workload write counter".into())
}

/// Per region index, what was read of it: its CRC32C, or why not (so that one refusal
/// does not hide the others).
pub type RegionDigests = Vec<(u32, Result<u32, String>)>;

/// The byte sizes of regions `indices`, asked while the device runs (some servers answer
/// REGION_INFO in no other state; libvfio-user takes only region accesses in STOP).
pub fn region_sizes(client: &mut Client, indices: &[u32]) -> Vec<(u32, Result<u64, String>)> {
    indices
        .iter()
        .map(|&index| {
            let size = client
                .region_info(index)
                .map(|region| region.info.size)
                .map_err(|err| format!("region {index} info: {err}"));
            (index, size)
        })
        .collect()
}

/// The largest region a digest reads or a fill writes: these are for registers and small
/// BARs, not for streaming gigabytes over the socket.
const MAX_REGION_BYTES: u64 = 256 << 20;

/// The CRC32C of the `size_bytes` of region `index`, read through REGION_READ in pieces
/// the server takes (so a region mapped only through sparse areas is read whole too).
pub fn region_digest(client: &mut Client, index: u32, size_bytes: u64) -> Result<u32, String> {
    if size_bytes > MAX_REGION_BYTES {
        return Err(format!(
            "region {index} is {size_bytes} bytes, more than a digest reads"
        ));
    }
    let piece_bytes = u64::from(client.max_data_xfer_size()).clamp(8, 64 << 10);
    let mut buffer = vec![0u8; piece_bytes as usize];
    let mut crc = 0u32;
    let mut done = 0u64;
    while done < size_bytes {
        let n = (size_bytes - done).min(piece_bytes) as usize;
        client
            .region_read(index, done, &mut buffer[..n])
            .map_err(|err| {
                format!(
                    "reading region {index} at {done:#x}: {}",
                    super::chain_text(&err)
                )
            })?;
        crc = crc32c::crc32c_append(crc, &buffer[..n]);
        done += n as u64;
    }
    Ok(crc)
}

/// The digests of the regions `sizes` lists ([`region_sizes`], asked before).
pub fn region_digests(client: &mut Client, sizes: &[(u32, Result<u64, String>)]) -> RegionDigests {
    sizes
        .iter()
        .map(|(index, size)| {
            let digest = size
                .clone()
                .and_then(|size_bytes| region_digest(client, *index, size_bytes));
            (*index, digest)
        })
        .collect()
}

/// The byte [`fill_region`] writes at `offset` of region `index`: varies with both, so
/// that a region moved to the wrong place or truncated shows in its digest.
pub fn fill_byte(index: u32, offset: u64) -> u8 {
    (offset as u8).wrapping_mul(31) ^ (offset >> 8) as u8 ^ (index as u8).wrapping_mul(0x5b)
}

/// Writes [`fill_byte`]s over all of region `index` through REGION_WRITE: device contents
/// a migration must carry, for devices no guest programs here.
pub fn fill_region(client: &mut Client, index: u32) -> Result<(), ScenarioError> {
    let region = client
        .region_info(index)
        .step(|| format!("region {index} info"))?;
    let size_bytes = region.info.size;
    if size_bytes > MAX_REGION_BYTES {
        return Err(ScenarioError::Failed(format!(
            "region {index} is {size_bytes} bytes, more than a fill writes"
        )));
    }
    let piece_bytes = u64::from(client.max_data_xfer_size()).clamp(8, 4096);
    let mut done = 0u64;
    while done < size_bytes {
        let n = (size_bytes - done).min(piece_bytes);
        let piece: Vec<u8> = (done..done + n).map(|at| fill_byte(index, at)).collect();
        client
            .region_write(index, done, &piece)
            .step(|| format!("filling region {index} at {done:#x}"))?;
        done += n;
    }
    info!(index, size_bytes, "region filled");
    Ok(())
}

/// A 64-bit register write into a device region before the migration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RegisterWrite {
    /// Region index.
    pub index: u32,
    /// Byte offset in the region.
    pub offset: u64,
    /// The value written (little-endian, 8 bytes).
    pub value: u64,
}

/// The source device as the migration engine drives it: the vfio-user client, with its
/// PRE_COPY hidden when it is not to be used (its MIGRATION flags lose PRE_COPY, so the
/// engine moves its state in STOP_COPY only: for devices whose RESUMING takes the
/// STOP_COPY data alone, as libvfio-user's sample server), and dma-engine's workload
/// slowed through WL_RATE when auto-converge throttles.
pub struct MigratedDevice<'a> {
    client: &'a mut Client,
    pre_copy: bool,
    /// The workload's own rate, bytes per second, when this program started it (and so
    /// may slow it down); `None`: the device's DMA is not ours to slow.
    workload_rate: Option<u64>,
}

impl<'a> MigratedDevice<'a> {
    /// `client` with PRE_COPY used or not; `workload_rate`: see [`MigratedDevice`].
    pub fn new(client: &'a mut Client, pre_copy: bool, workload_rate: Option<u64>) -> Self {
        MigratedDevice {
            client,
            pre_copy,
            workload_rate,
        }
    }
}

/// The WL_RATE that takes `percent` of `rate` away. Never 0 (that is "unlimited").
pub fn throttled_rate(rate: u64, percent: u8) -> u64 {
    let keep = 100 - u64::from(percent.min(99));
    (rate / 100 * keep + rate % 100 * keep / 100).max(1)
}

impl DirtyTracker for MigratedDevice<'_> {
    fn probe(&mut self) -> Result<bool, TrackerError> {
        self.client.probe()
    }
    fn start(&mut self, ranges: &[IovaRange], page_size: u64) -> Result<u64, TrackerError> {
        self.client.start(ranges, page_size)
    }
    fn report(&mut self, range: IovaRange, page_size: u64, bitmap: &mut [u64]) -> TrackerResult {
        self.client.report(range, page_size, bitmap)
    }
    fn stop(&mut self) -> Result<(), TrackerError> {
        DirtyTracker::stop(self.client)
    }
}

impl MigrationDevice for MigratedDevice<'_> {
    fn migration_flags(&mut self) -> Result<u64, TrackerError> {
        let flags = self.client.migration_flags()?;
        Ok(if self.pre_copy {
            flags
        } else {
            flags & !MIGRATION_PRE_COPY
        })
    }
    fn device_state(&mut self) -> Result<DeviceState, TrackerError> {
        self.client.device_state()
    }
    fn set_device_state(&mut self, state: DeviceState) -> Result<(), TrackerError> {
        self.client.set_device_state(state)
    }
    fn read_migration_data(&mut self, buf: &mut [u8]) -> Result<usize, TrackerError> {
        self.client.read_migration_data(buf)
    }
    fn write_migration_data(&mut self, data: &[u8]) -> Result<(), TrackerError> {
        self.client.write_migration_data(data)
    }
    fn pending_migration_bytes(&mut self) -> Result<Option<PendingBytes>, TrackerError> {
        self.client.pending_migration_bytes()
    }
}

impl SourceDevice for MigratedDevice<'_> {
    /// dma-engine's WL_RATE, set to the share of its rate the throttle leaves (restored at
    /// 0). A workload running unlimited (rate 0) has no rate to take a share of.
    fn throttle_dma(&mut self, percent: u8) -> Result<bool, TrackerError> {
        let Some(rate) = self.workload_rate.filter(|&rate| rate > 0) else {
            return Ok(false);
        };
        let value = if percent == 0 {
            rate
        } else {
            throttled_rate(rate, percent)
        };
        dma_engine(self.client)
            .set_workload_rate(value)
            .map_err(TrackerError::from)?;
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_throttled_rate_keeps_the_rest_and_is_never_unlimited() {
        assert_eq!(throttled_rate(200_000_000, 20), 160_000_000);
        assert_eq!(throttled_rate(200_000_000, 99), 2_000_000);
        assert_eq!(throttled_rate(200_000_000, 100), 2_000_000, "capped at 99");
        assert_eq!(
            throttled_rate(50, 99),
            1,
            "0 would mean as fast as possible"
        );
        assert_eq!(throttled_rate(u64::MAX, 10), u64::MAX / 100 * 90 + 13);
    }
}
