//! DEVICE_GET_INFO, DEVICE_GET_REGION_INFO and region access (REGION_READ, REGION_WRITE,
//! REGION_WRITE_MULTI), passed to the device.

use super::{dev_err, Reply, Server};
use crate::wire::*;

impl Server {
    pub(super) fn device_info(&mut self, payload: &[u8]) -> Result<Reply, i32> {
        let argsz = dmalog::uapi::read_u32(payload, 0).map_err(|_| libc::EINVAL)?;
        if (argsz as usize) < DeviceInfo::BYTES {
            return Err(libc::EINVAL);
        }
        let info = DeviceInfo {
            argsz: DeviceInfo::BYTES as u32,
            flags: self.device.flags(),
            num_regions: self.device.num_regions(),
            num_irqs: self.device.num_irqs(),
        };
        Reply::payload(info.encode())
    }

    pub(super) fn region_info(&mut self, payload: &[u8]) -> Result<Reply, i32> {
        let request = RegionInfoWire::decode(payload).map_err(|_| libc::EINVAL)?;
        if (request.argsz as usize) < RegionInfoWire::BYTES {
            return Err(libc::EINVAL);
        }
        let info = self.device.region_info(request.index).ok_or(libc::EINVAL)?;
        let caps = if info.sparse_mmap.is_empty() {
            Vec::new()
        } else {
            sparse_mmap_cap(&info.sparse_mmap)
        };
        let full = RegionInfoWire::BYTES + caps.len();
        let room = request.argsz as usize >= full;
        // A reply without room for the caps is only "ask again with argsz = full": it
        // claims no CAPS (QEMU refuses CAPS with cap_offset 0, which is what the kernel
        // sends) and no MMAP (its fd goes with the full answer only).
        let mut flags = info.flags;
        let mut cap_offset = 0;
        if !room {
            flags &= !dmalog_device::device::REGION_MMAP;
        } else if !caps.is_empty() {
            flags |= dmalog_device::device::REGION_CAPS;
            cap_offset = RegionInfoWire::BYTES as u32;
        }
        if info.mmap_fd.is_none() {
            flags &= !dmalog_device::device::REGION_MMAP; // MMAP means an fd comes with it
        }
        let reply = RegionInfoWire {
            argsz: full as u32,
            flags,
            index: request.index,
            cap_offset,
            size: info.size,
            offset: 0,
        };
        let mut bytes = reply.encode();
        if room {
            bytes.extend_from_slice(&caps);
        }
        // The fd goes with the complete answer only: a client that asked with room for the
        // fixed part alone is not ready to receive fds (libvfio-user's client is not).
        let fds = if room {
            info.mmap_fd.into_iter().collect()
        } else {
            Vec::new()
        };
        Ok(Reply {
            payload: bytes,
            fds,
        })
    }

    pub(super) fn region_read(&mut self, payload: &[u8]) -> Result<Reply, i32> {
        let request = RegionAccess::decode(payload).map_err(|_| libc::EINVAL)?;
        if payload.len() != RegionAccess::BYTES || request.count > self.config.max_data_xfer_size {
            return Err(libc::EINVAL);
        }
        let mut reply = request.encode();
        reply.resize(RegionAccess::BYTES + request.count as usize, 0);
        self.device
            .region_read(
                request.region,
                request.offset,
                &mut reply[RegionAccess::BYTES..],
            )
            .map_err(dev_err)?;
        Reply::payload(reply)
    }

    pub(super) fn region_write(&mut self, payload: &[u8]) -> Result<Reply, i32> {
        let request = RegionAccess::decode(payload).map_err(|_| libc::EINVAL)?;
        let data = &payload[RegionAccess::BYTES..];
        if data.len() != request.count as usize {
            return Err(libc::EINVAL);
        }
        self.device
            .region_write(request.region, request.offset, data)
            .map_err(dev_err)?;
        Reply::payload(request.encode())
    }

    pub(super) fn region_write_multi(&mut self, payload: &[u8]) -> Result<Reply, i32> {
        let count = dmalog::uapi::read_u64(payload, 0).map_err(|_| libc::EINVAL)?;
        if count == 0
            || count > WRITE_MULTI_MAX_ENTRIES
            || payload.len() != 8 + count as usize * WRITE_MULTI_ENTRY_BYTES
        {
            return Err(libc::EINVAL);
        }
        for entry in payload[8..].chunks_exact(WRITE_MULTI_ENTRY_BYTES) {
            let access = RegionAccess::decode(entry).map_err(|_| libc::EINVAL)?;
            if access.count == 0 || access.count > 8 {
                return Err(libc::EINVAL);
            }
            self.device
                .region_write(
                    access.region,
                    access.offset,
                    &entry[16..16 + access.count as usize],
                )
                .map_err(dev_err)?;
        }
        Reply::payload(payload[..8].to_vec())
    }
}
