//! What every emulated PCI device here shares, written once: its configuration space, the
//! fixed entries of its region table, and the buffers of its migration data stream (the
//! state saved for the VMM to read, the state the VMM loads).

use std::ops::Range;

use crate::device::{DeviceError, RegionInfo, PCI_CONFIG_REGION_INDEX, PCI_NUM_REGIONS};
use crate::device::{REGION_READ, REGION_WRITE};

/// Bytes of a (conventional) PCI configuration space.
pub const CONFIG_SPACE_BYTES: usize = 256;

/// A PCI configuration space: read whole by the VMM, written only where a device allows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigSpace {
    bytes: [u8; CONFIG_SPACE_BYTES],
}

impl ConfigSpace {
    /// All zero but the vendor and device IDs.
    pub fn new(vendor_id: u16, device_id: u16) -> Self {
        let mut space = ConfigSpace {
            bytes: [0; CONFIG_SPACE_BYTES],
        };
        space.set_u16(0x00, vendor_id);
        space.set_u16(0x02, device_id);
        space
    }

    /// Sets the little-endian 16-bit field at byte `offset` (below 255).
    pub fn set_u16(&mut self, offset: usize, value: u16) {
        self.bytes[offset..offset + 2].copy_from_slice(&value.to_le_bytes());
    }

    /// The region info of the configuration region: 256 bytes, readable and writable.
    pub fn region_info() -> RegionInfo {
        RegionInfo {
            size: CONFIG_SPACE_BYTES as u64,
            flags: REGION_READ | REGION_WRITE,
            ..RegionInfo::default()
        }
    }

    /// The bytes `[offset, offset + len)` of the space; EINVAL past its end.
    fn span(offset: u64, len: usize, what: &'static str) -> Result<Range<usize>, DeviceError> {
        let end = offset
            .checked_add(len as u64)
            .filter(|&end| end <= CONFIG_SPACE_BYTES as u64)
            .ok_or(DeviceError::Invalid(what))?;
        Ok(offset as usize..end as usize)
    }

    /// Copies `out.len()` bytes from `offset`; EINVAL past the end.
    pub fn read(&self, offset: u64, out: &mut [u8]) -> Result<(), DeviceError> {
        let span = Self::span(offset, out.len(), "config read out of range")?;
        out.copy_from_slice(&self.bytes[span]);
        Ok(())
    }

    /// Writes `data` at `offset`, keeping only the bytes inside `writable` (the rest of the
    /// space is read-only and ignores writes); EINVAL past the end.
    pub fn write(
        &mut self,
        offset: u64,
        data: &[u8],
        writable: Range<usize>,
    ) -> Result<(), DeviceError> {
        let span = Self::span(offset, data.len(), "config write out of range")?;
        for (at, &byte) in span.zip(data) {
            if writable.contains(&at) {
                self.bytes[at] = byte;
            }
        }
        Ok(())
    }
}

/// The region table of a VFIO PCI device: the BARs `bar` describes (`None`: an empty
/// region), the configuration region, empty regions up to [`PCI_NUM_REGIONS`], then none.
pub fn region_info(index: u32, bar: impl FnOnce(u32) -> Option<RegionInfo>) -> Option<RegionInfo> {
    match index {
        PCI_CONFIG_REGION_INDEX => Some(ConfigSpace::region_info()),
        i if i < PCI_NUM_REGIONS => Some(bar(i).unwrap_or_default()),
        _ => None,
    }
}

/// A device's migration data: the stream it saved for the VMM to read (with the VMM's
/// read position) and the bytes the VMM has loaded so far, bounded by `max_load_bytes`
/// (a peer decides how much it sends).
#[derive(Debug, Default)]
pub struct MigrationBuffers {
    save_stream: Vec<u8>,
    save_cursor: usize,
    load_buffer: Vec<u8>,
    max_load_bytes: usize,
    too_much: &'static str,
}

impl MigrationBuffers {
    /// Empty buffers that refuse a load past `max_load_bytes` with EINVAL(`too_much`).
    pub fn new(max_load_bytes: usize, too_much: &'static str) -> Self {
        MigrationBuffers {
            max_load_bytes,
            too_much,
            ..MigrationBuffers::default()
        }
    }

    /// Replaces the saved stream with `bytes`, read from its start.
    pub fn save(&mut self, bytes: Vec<u8>) {
        self.save_stream = bytes;
        self.save_cursor = 0;
    }

    /// Appends `bytes` to the saved stream.
    pub fn save_more(&mut self, bytes: &[u8]) {
        self.save_stream.extend_from_slice(bytes);
    }

    /// Drops the saved stream.
    pub fn clear_save(&mut self) {
        self.save(Vec::new());
    }

    /// Drops both the saved stream and the loaded bytes (a migration aborted).
    pub fn clear(&mut self) {
        self.clear_save();
        self.load_buffer.clear();
    }

    /// Copies the next saved bytes into `out`; returns how many (0 at the end).
    pub fn read_saved(&mut self, out: &mut [u8]) -> usize {
        let rest = &self.save_stream[self.save_cursor..];
        let n = rest.len().min(out.len());
        out[..n].copy_from_slice(&rest[..n]);
        self.save_cursor += n;
        n
    }

    /// Bytes of the saved stream not read yet.
    pub fn pending_bytes(&self) -> u64 {
        (self.save_stream.len() - self.save_cursor) as u64
    }

    /// Drops the loaded bytes (RESUMING starts afresh).
    pub fn clear_load(&mut self) {
        self.load_buffer.clear();
    }

    /// Adds `data` to the loaded bytes; EINVAL past the bound, nothing added.
    pub fn load(&mut self, data: &[u8]) -> Result<(), DeviceError> {
        if self.load_buffer.len() + data.len() > self.max_load_bytes {
            return Err(DeviceError::Invalid(self.too_much));
        }
        self.load_buffer.extend_from_slice(data);
        Ok(())
    }

    /// Takes the loaded bytes, leaving none.
    pub fn take_loaded(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.load_buffer)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_space_is_bounded_and_written_only_where_allowed() {
        let mut space = ConfigSpace::new(0x1234, 0x5678);
        let mut out = [0u8; 4];
        space.read(0, &mut out).unwrap();
        assert_eq!(out, [0x34, 0x12, 0x78, 0x56]);
        space.write(2, &[1, 2, 3, 4], 4..6).unwrap();
        space.read(2, &mut out).unwrap();
        assert_eq!(out, [0x78, 0x56, 3, 4], "only the writable bytes changed");
        assert!(space.read(253, &mut out).is_err());
        assert!(space.write(u64::MAX, &[1], 0..256).is_err());
        assert!(space.read(252, &mut out).is_ok());
    }

    #[test]
    fn the_region_table_has_the_config_region_and_ends() {
        let bar0 = |i| {
            (i == 0).then(|| RegionInfo {
                size: 8,
                ..RegionInfo::default()
            })
        };
        assert_eq!(region_info(0, bar0).unwrap().size, 8);
        assert_eq!(region_info(1, bar0).unwrap().size, 0);
        assert_eq!(
            region_info(PCI_CONFIG_REGION_INDEX, bar0).unwrap().size,
            256
        );
        assert!(region_info(PCI_NUM_REGIONS, bar0).is_none());
    }

    #[test]
    fn migration_buffers_read_in_pieces_and_bound_the_load() {
        let mut buffers = MigrationBuffers::new(4, "too much");
        buffers.save(vec![1, 2, 3]);
        buffers.save_more(&[4]);
        let mut out = [0u8; 3];
        assert_eq!(buffers.read_saved(&mut out), 3);
        assert_eq!(buffers.pending_bytes(), 1);
        assert_eq!(buffers.read_saved(&mut out), 1);
        assert_eq!(out[0], 4);
        buffers.load(&[1, 2, 3]).unwrap();
        assert_eq!(buffers.load(&[4, 5]), Err(DeviceError::Invalid("too much")));
        assert_eq!(buffers.take_loaded(), [1, 2, 3]);
        assert!(buffers.take_loaded().is_empty());
    }
}
