//! PCI configuration space as a vfio-user client reads it (region 7 of a PCI device): the
//! identity (vendor, device, subsystem, class), the BAR registers and the capability list,
//! decoded the way `lspci -vv` shows them.
//!
//! The bytes come from the server, which may be buggy or hostile: every offset is checked
//! against the bytes actually read, and the capability walk stops at a pointer into the
//! header, a pointer it has seen before (a loop) or after 48 entries (the most that fit in
//! 192 bytes at 4 bytes each).

use serde::Serialize;

/// Bytes of the type-0 header that precede the device-specific area.
pub const PCI_HEADER_BYTES: usize = 0x40;
/// Bytes of conventional PCI configuration space.
pub const PCI_CONFIG_BYTES: usize = 0x100;
/// Most capabilities walked (48 x 4 bytes fill the 192-byte device area).
const MAX_CAPABILITIES: usize = 48;

const STATUS_OFFSET: usize = 0x06;
const STATUS_CAPABILITY_LIST: u16 = 1 << 4;
const CAPABILITY_POINTER_OFFSET: usize = 0x34;
const BAR0_OFFSET: usize = 0x10;
/// The number of BAR registers in a type-0 header.
pub const PCI_NUM_BARS: usize = 6;

/// Capability IDs dmalog names (PCI Local Bus spec, "Capability IDs").
const CAP_ID_POWER_MANAGEMENT: u8 = 0x01;
const CAP_ID_MSI: u8 = 0x05;
const CAP_ID_VENDOR: u8 = 0x09;
const CAP_ID_PCIE: u8 = 0x10;
const CAP_ID_MSIX: u8 = 0x11;

/// Why configuration space could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PciConfigError {
    /// Fewer bytes than the 64-byte type-0 header.
    #[error("configuration space of {0} bytes is shorter than the 64-byte header")]
    TooShort(usize),
}

/// One BAR register as configuration space describes it (the size comes from the region
/// info, since probing sizes by writing all-ones is not something a client should do to a
/// device it only inspects).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BarRegister {
    /// BAR index 0..5 (a 64-bit BAR occupies two registers and is listed once).
    pub index: usize,
    /// I/O space rather than memory.
    pub io: bool,
    /// A 64-bit memory BAR (takes the next register as its upper half).
    pub is_64bit: bool,
    /// Prefetchable memory.
    pub prefetchable: bool,
    /// The address programmed into it (0 before a guest assigns one).
    pub address: u64,
}

/// MSI capability details (message control register).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct MsiCapability {
    /// MSI enabled.
    pub enabled: bool,
    /// Vectors the function can request (1 << multiple-message-capable).
    pub vectors: u32,
    /// 64-bit message address.
    pub address_64bit: bool,
    /// Per-vector masking.
    pub per_vector_mask: bool,
}

/// MSI-X capability details.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct MsixCapability {
    /// MSI-X enabled.
    pub enabled: bool,
    /// Function mask set.
    pub masked: bool,
    /// Table entries.
    pub table_entries: u32,
    /// BAR holding the table.
    pub table_bar: u8,
    /// Byte offset of the table in that BAR.
    pub table_offset: u32,
    /// BAR holding the pending-bit array.
    pub pba_bar: u8,
    /// Byte offset of the pending-bit array in that BAR.
    pub pba_offset: u32,
}

/// One entry of the capability list.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Capability {
    /// Offset in configuration space.
    pub offset: u8,
    /// Capability ID.
    pub id: u8,
    /// What the ID stands for.
    pub name: &'static str,
    /// Decoded MSI fields, for an MSI capability.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub msi: Option<MsiCapability>,
    /// Decoded MSI-X fields, for an MSI-X capability.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub msix: Option<MsixCapability>,
}

/// The decoded type-0 header and capability list.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PciConfig {
    /// Vendor ID.
    pub vendor_id: u16,
    /// Device ID.
    pub device_id: u16,
    /// Subsystem vendor ID.
    pub subsystem_vendor_id: u16,
    /// Subsystem ID.
    pub subsystem_id: u16,
    /// Revision ID.
    pub revision: u8,
    /// Class code: base class, subclass, programming interface.
    pub class_code: [u8; 3],
    /// Header type (bit 7: multi-function).
    pub header_type: u8,
    /// Command register.
    pub command: u16,
    /// Status register.
    pub status: u16,
    /// Interrupt pin (0 none, 1 INTA# .. 4 INTD#).
    pub interrupt_pin: u8,
    /// The BAR registers in use (a 64-bit BAR listed once, at its lower index).
    pub bars: Vec<BarRegister>,
    /// The capability list in walk order.
    pub capabilities: Vec<Capability>,
    /// Why the walk stopped early, if it did (a loop or a pointer outside the space).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub capability_walk_error: Option<String>,
}

/// The VFIO PCI region index of configuration space.
pub const PCI_CONFIG_REGION_INDEX: u32 = 7;

/// Reads a PCI device's configuration space through `client` (region 7, at most the
/// 256 conventional bytes): one REGION_READ, or 4-byte reads when the server refuses a
/// large one (some servers only take dword accesses to configuration space).
pub fn read_config_space(client: &mut crate::Client) -> Result<Vec<u8>, crate::ClientError> {
    let region = client.region_info(PCI_CONFIG_REGION_INDEX)?;
    let len_bytes = region.info.size.min(PCI_CONFIG_BYTES as u64) as usize;
    let mut bytes = vec![0u8; len_bytes];
    if client
        .region_read(PCI_CONFIG_REGION_INDEX, 0, &mut bytes)
        .is_ok()
    {
        return Ok(bytes);
    }
    for (index, dword) in bytes.chunks_mut(4).enumerate() {
        client.region_read(PCI_CONFIG_REGION_INDEX, (index * 4) as u64, dword)?;
    }
    Ok(bytes)
}

fn u16_at(bytes: &[u8], offset: usize) -> Option<u16> {
    Some(u16::from_le_bytes(
        bytes.get(offset..offset.checked_add(2)?)?.try_into().ok()?,
    ))
}

fn u32_at(bytes: &[u8], offset: usize) -> Option<u32> {
    Some(u32::from_le_bytes(
        bytes.get(offset..offset.checked_add(4)?)?.try_into().ok()?,
    ))
}

/// The name of capability `id`.
pub fn capability_name(id: u8) -> &'static str {
    match id {
        CAP_ID_POWER_MANAGEMENT => "Power Management",
        0x02 => "AGP",
        0x03 => "VPD",
        0x04 => "Slot ID",
        CAP_ID_MSI => "MSI",
        0x06 => "CompactPCI Hot Swap",
        0x07 => "PCI-X",
        0x08 => "HyperTransport",
        CAP_ID_VENDOR => "Vendor Specific",
        0x0a => "Debug port",
        0x0c => "PCI Hot-Plug",
        0x0d => "Bridge subsystem vendor ID",
        0x0e => "AGP 8x",
        0x0f => "Secure Device",
        CAP_ID_PCIE => "PCI Express",
        CAP_ID_MSIX => "MSI-X",
        0x12 => "SATA",
        0x13 => "Advanced Features",
        0x14 => "Enhanced Allocation",
        0x15 => "Flattening Portal Bridge",
        _ => "unknown",
    }
}

impl PciConfig {
    /// Decodes `bytes` (at least the 64-byte header; the capability walk reads what is
    /// there, normally 256 bytes).
    pub fn parse(bytes: &[u8]) -> Result<PciConfig, PciConfigError> {
        if bytes.len() < PCI_HEADER_BYTES {
            return Err(PciConfigError::TooShort(bytes.len()));
        }
        let word = |offset| u16_at(bytes, offset).unwrap_or(0);
        let status = word(STATUS_OFFSET);
        let mut config = PciConfig {
            vendor_id: word(0x00),
            device_id: word(0x02),
            command: word(0x04),
            status,
            revision: bytes[0x08],
            class_code: [bytes[0x0b], bytes[0x0a], bytes[0x09]],
            header_type: bytes[0x0e],
            subsystem_vendor_id: word(0x2c),
            subsystem_id: word(0x2e),
            interrupt_pin: bytes[0x3d],
            bars: parse_bars(bytes),
            capabilities: Vec::new(),
            capability_walk_error: None,
        };
        if status & STATUS_CAPABILITY_LIST != 0 {
            config.walk_capabilities(bytes);
        }
        Ok(config)
    }

    fn walk_capabilities(&mut self, bytes: &[u8]) {
        let mut seen = [false; PCI_CONFIG_BYTES];
        // The low two bits of every pointer are reserved (PCI spec 6.7).
        let mut next = usize::from(bytes[CAPABILITY_POINTER_OFFSET] & !0x3);
        while next != 0 {
            if self.capabilities.len() == MAX_CAPABILITIES {
                self.capability_walk_error = Some(format!("more than {MAX_CAPABILITIES} entries"));
                return;
            }
            if next < PCI_HEADER_BYTES || next + 2 > bytes.len() {
                self.capability_walk_error = Some(format!("pointer {next:#x} outside the list"));
                return;
            }
            if std::mem::replace(&mut seen[next], true) {
                self.capability_walk_error = Some(format!("loop back to {next:#x}"));
                return;
            }
            let id = bytes[next];
            let mut capability = Capability {
                offset: next as u8,
                id,
                name: capability_name(id),
                msi: None,
                msix: None,
            };
            match id {
                CAP_ID_MSI => capability.msi = parse_msi(bytes, next),
                CAP_ID_MSIX => capability.msix = parse_msix(bytes, next),
                _ => {}
            }
            self.capabilities.push(capability);
            next = usize::from(bytes[next + 1] & !0x3);
        }
    }

    /// The class as `lspci` prints it when it has no name for it: `base:sub:prog-if`.
    pub fn class_text(&self) -> String {
        let [base, sub, prog_if] = self.class_code;
        format!("{base:02x}{sub:02x} (prog-if {prog_if:02x})")
    }
}

fn parse_bars(bytes: &[u8]) -> Vec<BarRegister> {
    let mut bars = Vec::new();
    let mut index = 0;
    while index < PCI_NUM_BARS {
        let low = u32_at(bytes, BAR0_OFFSET + 4 * index).unwrap_or(0);
        let io = low & 1 != 0;
        let is_64bit = !io && (low >> 1) & 0x3 == 0x2 && index + 1 < PCI_NUM_BARS;
        let address = if io {
            u64::from(low & !0x3)
        } else if is_64bit {
            let high = u32_at(bytes, BAR0_OFFSET + 4 * (index + 1)).unwrap_or(0);
            (u64::from(high) << 32) | u64::from(low & !0xf)
        } else {
            u64::from(low & !0xf)
        };
        bars.push(BarRegister {
            index,
            io,
            is_64bit,
            prefetchable: !io && low & 0x8 != 0,
            address,
        });
        index += if is_64bit { 2 } else { 1 };
    }
    bars
}

fn parse_msi(bytes: &[u8], offset: usize) -> Option<MsiCapability> {
    let control = u16_at(bytes, offset + 2)?;
    Some(MsiCapability {
        enabled: control & 1 != 0,
        // Multiple Message Capable is a 3-bit log2; values above 5 are reserved.
        vectors: 1 << ((control >> 1) & 0x7).min(5),
        address_64bit: control & (1 << 7) != 0,
        per_vector_mask: control & (1 << 8) != 0,
    })
}

fn parse_msix(bytes: &[u8], offset: usize) -> Option<MsixCapability> {
    let control = u16_at(bytes, offset + 2)?;
    let table = u32_at(bytes, offset + 4)?;
    let pba = u32_at(bytes, offset + 8)?;
    Some(MsixCapability {
        enabled: control & (1 << 15) != 0,
        masked: control & (1 << 14) != 0,
        table_entries: u32::from(control & 0x7ff) + 1,
        table_bar: (table & 0x7) as u8,
        table_offset: table & !0x7,
        pba_bar: (pba & 0x7) as u8,
        pba_offset: pba & !0x7,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(vendor: u16, device: u16) -> Vec<u8> {
        let mut bytes = vec![0u8; PCI_CONFIG_BYTES];
        bytes[0..2].copy_from_slice(&vendor.to_le_bytes());
        bytes[2..4].copy_from_slice(&device.to_le_bytes());
        bytes
    }

    #[test]
    fn identity_bars_and_capabilities() {
        let mut bytes = header(0x1b36, 0x10d1);
        bytes[0x08] = 0x02; // revision
        bytes[0x09..0x0c].copy_from_slice(&[0x01, 0x80, 0x05]); // class 05 80, prog-if 01
        bytes[0x2c..0x30].copy_from_slice(&[0xfe, 0xca, 0xbe, 0xba]);
        bytes[0x10..0x14].copy_from_slice(&0xfebf_0000u32.to_le_bytes()); // BAR0 32-bit mem
        bytes[0x14..0x18].copy_from_slice(&0x0000_000cu32.to_le_bytes()); // BAR1 64-bit pref
        bytes[0x18..0x1c].copy_from_slice(&0x0000_0001u32.to_le_bytes()); // BAR1 high half
        bytes[0x1c..0x20].copy_from_slice(&0x0000_c001u32.to_le_bytes()); // BAR3 I/O
        bytes[STATUS_OFFSET] = STATUS_CAPABILITY_LIST as u8;
        bytes[CAPABILITY_POINTER_OFFSET] = 0x40;
        // PM at 0x40 -> MSI at 0x50 -> MSI-X at 0x70 -> end.
        bytes[0x40..0x42].copy_from_slice(&[CAP_ID_POWER_MANAGEMENT, 0x50]);
        bytes[0x50..0x52].copy_from_slice(&[CAP_ID_MSI, 0x70]);
        bytes[0x52..0x54].copy_from_slice(&((3u16 << 1) | (1 << 7) | 1).to_le_bytes());
        bytes[0x70..0x72].copy_from_slice(&[CAP_ID_MSIX, 0x00]);
        bytes[0x72..0x74].copy_from_slice(&(15u16 | (1 << 15)).to_le_bytes());
        bytes[0x74..0x78].copy_from_slice(&0x2000_0004u32.to_le_bytes());
        bytes[0x78..0x7c].copy_from_slice(&0x3000_0004u32.to_le_bytes());

        let config = PciConfig::parse(&bytes).unwrap();
        assert_eq!((config.vendor_id, config.device_id), (0x1b36, 0x10d1));
        assert_eq!(
            (config.subsystem_vendor_id, config.subsystem_id),
            (0xcafe, 0xbabe)
        );
        assert_eq!(config.class_code, [0x05, 0x80, 0x01]);
        assert_eq!(config.class_text(), "0580 (prog-if 01)");
        assert_eq!(config.revision, 2);
        let bars: Vec<_> = config
            .bars
            .iter()
            .map(|b| (b.index, b.io, b.is_64bit, b.prefetchable, b.address))
            .collect();
        assert_eq!(
            bars,
            vec![
                (0, false, false, false, 0xfebf_0000),
                (1, false, true, true, 0x1_0000_0000),
                (3, true, false, false, 0xc000),
                (4, false, false, false, 0),
                (5, false, false, false, 0),
            ]
        );
        let ids: Vec<_> = config
            .capabilities
            .iter()
            .map(|c| (c.offset, c.id))
            .collect();
        assert_eq!(ids, vec![(0x40, 0x01), (0x50, 0x05), (0x70, 0x11)]);
        let msi = config.capabilities[1].msi.as_ref().unwrap();
        assert_eq!(
            (msi.enabled, msi.vectors, msi.address_64bit),
            (true, 8, true)
        );
        let msix = config.capabilities[2].msix.as_ref().unwrap();
        assert_eq!(
            (
                msix.enabled,
                msix.table_entries,
                msix.table_bar,
                msix.table_offset
            ),
            (true, 16, 4, 0x2000_0000)
        );
        assert_eq!((msix.pba_bar, msix.pba_offset), (4, 0x3000_0000));
        assert!(config.capability_walk_error.is_none());
    }

    #[test]
    fn hostile_capability_lists_end_with_a_reason() {
        // A loop: 0x40 -> 0x50 -> 0x40.
        let mut bytes = header(1, 2);
        bytes[STATUS_OFFSET] = STATUS_CAPABILITY_LIST as u8;
        bytes[CAPABILITY_POINTER_OFFSET] = 0x40;
        bytes[0x40..0x42].copy_from_slice(&[CAP_ID_VENDOR, 0x50]);
        bytes[0x50..0x52].copy_from_slice(&[CAP_ID_VENDOR, 0x40]);
        let config = PciConfig::parse(&bytes).unwrap();
        assert_eq!(config.capabilities.len(), 2);
        assert!(config.capability_walk_error.unwrap().contains("loop"));

        // A pointer into the header.
        bytes[0x50..0x52].copy_from_slice(&[CAP_ID_VENDOR, 0x10]);
        let config = PciConfig::parse(&bytes).unwrap();
        assert!(config.capability_walk_error.unwrap().contains("outside"));

        // Configuration space cut short after the header: the pointer is past the end.
        let config = PciConfig::parse(&bytes[..0x48]).unwrap();
        assert_eq!(config.capabilities.len(), 1);
        assert!(config.capability_walk_error.is_some());

        // An MSI-X capability whose fields run past the end is listed without details.
        let mut bytes = header(1, 2);
        bytes[STATUS_OFFSET] = STATUS_CAPABILITY_LIST as u8;
        bytes[CAPABILITY_POINTER_OFFSET] = 0xfc;
        bytes[0xfc..0xfe].copy_from_slice(&[CAP_ID_MSIX, 0x00]);
        let config = PciConfig::parse(&bytes).unwrap();
        assert_eq!(config.capabilities[0].id, CAP_ID_MSIX);
        assert!(config.capabilities[0].msix.is_none());

        // Every single-byte pointer value terminates (no panic, bounded length).
        for pointer in 0..=255u8 {
            bytes[CAPABILITY_POINTER_OFFSET] = pointer;
            let config = PciConfig::parse(&bytes).unwrap();
            assert!(config.capabilities.len() <= MAX_CAPABILITIES);
        }
        assert_eq!(
            PciConfig::parse(&[0u8; 63]).unwrap_err(),
            PciConfigError::TooShort(63)
        );
    }

    #[test]
    fn no_capability_list_bit_means_no_walk() {
        let mut bytes = header(0xdead, 0xbeef);
        bytes[CAPABILITY_POINTER_OFFSET] = 0x40;
        bytes[0x40] = CAP_ID_MSI;
        assert!(PciConfig::parse(&bytes).unwrap().capabilities.is_empty());
    }
}
