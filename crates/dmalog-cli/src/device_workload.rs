//! The device side of `dmalog demo` and `dmalog migrate`: which device the server emulates
//! (its PCI IDs), dma-engine's DMA workload (started only on a dma-engine, or when asked),
//! and digests of device regions, so that a migration of any vfio-user device can be
//! checked region by region.

use anyhow::Context;
use dmalog::uapi::{DeviceState, MIGRATION_PRE_COPY};
use dmalog::{DirtyTracker, IovaRange, MigrationDevice, PendingBytes, TrackerError, TrackerResult};
use dmalog_migrate::engine::SourceDevice;
use dmalog_vfio_user::pci_config::{read_config_space, PciConfig};
use dmalog_vfio_user::Client;
use tracing::{info, warn};

/// Whether to start dma-engine's DMA workload on the source device.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DeviceWorkload {
    /// When the device's PCI IDs say dma-engine.
    #[default]
    Auto,
    /// Always (the device must have dma-engine's workload registers).
    On,
    /// Never: the device does only what the guest (nobody, here) asks.
    Off,
}

// dma-engine workload registers in BAR0 (SPEC 6.1).
const WL_BASE: u64 = 0x80;
const WL_SPAN: u64 = 0x88;
const WL_SIZE: u64 = 0x90;
const WL_RATE: u64 = 0x98;
const WL_SEED: u64 = 0xa0;
const WL_CTRL: u64 = 0xa8;
const WL_WRITES: u64 = 0xb0;

/// The dma-engine workload: `span_bytes` of guest memory from `base`, written at
/// `rate_bytes_per_sec` in 4 KiB writes.
#[derive(Debug, Clone, Copy)]
pub struct WorkloadParams {
    /// First guest address the device writes.
    pub base: u64,
    /// Bytes of its working set.
    pub span_bytes: u64,
    /// Bytes per second.
    pub rate_bytes_per_sec: u64,
}

/// Whether the device behind `client` is dma-engine, by its PCI vendor and device IDs. A
/// device without a readable configuration space is not.
pub fn is_dma_engine(client: &mut Client) -> bool {
    let ids = read_config_space(client)
        .map_err(anyhow::Error::from)
        .and_then(|bytes| PciConfig::parse(&bytes).map_err(anyhow::Error::from));
    match ids {
        Ok(config) => {
            info!(
                vendor = format_args!("{:#06x}", config.vendor_id),
                device = format_args!("{:#06x}", config.device_id),
                "device identity"
            );
            (config.vendor_id, config.device_id)
                == (
                    dmalog_device::dma_engine::VENDOR_ID,
                    dmalog_device::dma_engine::DEVICE_ID,
                )
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

/// Programs and starts dma-engine's workload.
pub fn start(client: &mut Client, params: WorkloadParams) -> anyhow::Result<()> {
    for (offset, value) in [
        (WL_BASE, params.base),
        (WL_SPAN, params.span_bytes),
        (WL_SIZE, 4096),
        (WL_RATE, params.rate_bytes_per_sec),
        (WL_SEED, 0x5eed),
        (WL_CTRL, 1),
    ] {
        client
            .write_u64(0, offset, value)
            .context("programming the dma-engine workload (BAR0 registers 0x80-0xa8)")?;
    }
    Ok(())
}

/// dma-engine's count of workload writes so far.
pub fn writes(client: &mut Client) -> anyhow::Result<u64> {
    client
        .read_u64(0, WL_WRITES)
        .context("reading the workload write counter")
}

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

/// The CRC32C of the `size_bytes` of region `index`, read through REGION_READ in pieces
/// the server takes (so a region mapped only through sparse areas is read whole too).
pub fn region_digest(client: &mut Client, index: u32, size_bytes: u64) -> anyhow::Result<u32> {
    // A digest is for registers and small BARs: refuse to stream gigabytes over the socket.
    const MAX_DIGEST_BYTES: u64 = 256 << 20;
    if size_bytes > MAX_DIGEST_BYTES {
        anyhow::bail!("region {index} is {size_bytes} bytes, more than a digest reads");
    }
    let piece_bytes = u64::from(client.max_data_xfer_size()).clamp(8, 64 << 10);
    let mut buffer = vec![0u8; piece_bytes as usize];
    let mut crc = 0u32;
    let mut done = 0u64;
    while done < size_bytes {
        let n = (size_bytes - done).min(piece_bytes) as usize;
        client
            .region_read(index, done, &mut buffer[..n])
            .with_context(|| format!("reading region {index} at {done:#x}"))?;
        crc = crc32c::crc32c_append(crc, &buffer[..n]);
        done += n as u64;
    }
    Ok(crc)
}

/// The byte [`fill_region`] writes at `offset` of region `index`: varies with both, so
/// that a region moved to the wrong place or truncated shows in its digest.
pub fn fill_byte(index: u32, offset: u64) -> u8 {
    (offset as u8).wrapping_mul(31) ^ (offset >> 8) as u8 ^ (index as u8).wrapping_mul(0x5b)
}

/// Writes [`fill_byte`]s over all of region `index` through REGION_WRITE: device contents
/// a migration must carry, for devices no guest programs here.
pub fn fill_region(client: &mut Client, index: u32) -> anyhow::Result<()> {
    let region = client
        .region_info(index)
        .with_context(|| format!("region {index} info"))?;
    const MAX_FILL_BYTES: u64 = 256 << 20;
    let size_bytes = region.info.size;
    if size_bytes > MAX_FILL_BYTES {
        anyhow::bail!("region {index} is {size_bytes} bytes, more than a fill writes");
    }
    let piece_bytes = u64::from(client.max_data_xfer_size()).clamp(8, 4096);
    let mut done = 0u64;
    while done < size_bytes {
        let n = (size_bytes - done).min(piece_bytes);
        let piece: Vec<u8> = (done..done + n).map(|at| fill_byte(index, at)).collect();
        client
            .region_write(index, done, &piece)
            .with_context(|| format!("filling region {index} at {done:#x}"))?;
        done += n;
    }
    info!(index, size_bytes, "region filled");
    Ok(())
}

/// Digests of the regions `sizes` lists, as `index -> "0x…"` (a region that cannot be
/// read maps to its error, so that one refusal does not hide the others).
pub fn region_digests(
    client: &mut Client,
    sizes: &[(u32, Result<u64, String>)],
) -> serde_json::Map<String, serde_json::Value> {
    sizes
        .iter()
        .map(|(index, size)| {
            let digest = size.clone().and_then(|size_bytes| {
                region_digest(client, *index, size_bytes).map_err(|err| format!("{err:#}"))
            });
            let value = match digest {
                Ok(crc) => format!("{crc:#010x}"),
                Err(err) => format!("error: {err}"),
            };
            (index.to_string(), serde_json::Value::String(value))
        })
        .collect()
}

/// One `--region-write-u64 INDEX:OFFSET=VALUE`: a 64-bit register write before the
/// migration (numbers decimal or 0x-hex).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RegisterWrite {
    /// Region index.
    pub index: u32,
    /// Byte offset in the region.
    pub offset: u64,
    /// The value written (little-endian, 8 bytes).
    pub value: u64,
}

fn parse_number(text: &str) -> Result<u64, String> {
    let parsed = match text.strip_prefix("0x") {
        Some(hex) => u64::from_str_radix(hex, 16),
        None => text.parse(),
    };
    parsed.map_err(|err| format!("{text:?}: {err}"))
}

/// Parses `INDEX:OFFSET=VALUE`.
pub fn parse_register_write(text: &str) -> Result<RegisterWrite, String> {
    let (place, value) = text.split_once('=').ok_or("expected INDEX:OFFSET=VALUE")?;
    let (index, offset) = place.split_once(':').ok_or("expected INDEX:OFFSET=VALUE")?;
    Ok(RegisterWrite {
        index: u32::try_from(parse_number(index)?).map_err(|_| "region index too large")?,
        offset: parse_number(offset)?,
        value: parse_number(value)?,
    })
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
        self.client
            .write_u64(0, WL_RATE, value)
            .map_err(TrackerError::from)?;
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn register_writes_parse_and_refuse_garbage() {
        assert_eq!(
            parse_register_write("0:0=0x10").unwrap(),
            RegisterWrite {
                index: 0,
                offset: 0,
                value: 16
            }
        );
        assert_eq!(parse_register_write("1:0x8=7").unwrap().offset, 8);
        for bad in ["", "0:0", "0=1", "x:0=1", "0:0=", "4294967296:0=1"] {
            assert!(parse_register_write(bad).is_err(), "{bad}");
        }
    }

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
