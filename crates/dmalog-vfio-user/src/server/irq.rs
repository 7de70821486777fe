//! DEVICE_GET_IRQ_INFO and DEVICE_SET_IRQS: the device's interrupts as the client's
//! eventfds.

use std::os::fd::OwnedFd;

use super::{dev_err, Reply, Server};
use crate::wire::*;

impl Server {
    pub(super) fn irq_info(&mut self, payload: &[u8]) -> Result<Reply, i32> {
        let request = IrqInfoWire::decode(payload).map_err(|_| libc::EINVAL)?;
        if (request.argsz as usize) < IrqInfoWire::BYTES {
            return Err(libc::EINVAL);
        }
        let info = self.device.irq_info(request.index).ok_or(libc::EINVAL)?;
        Reply::payload(
            IrqInfoWire {
                argsz: IrqInfoWire::BYTES as u32,
                flags: info.flags,
                index: request.index,
                count: info.count,
            }
            .encode(),
        )
    }

    pub(super) fn set_irqs(&mut self, payload: &[u8], fds: Vec<OwnedFd>) -> Result<Reply, i32> {
        let request = SetIrqs::decode(payload).map_err(|_| libc::EINVAL)?;
        if (request.argsz as usize) < SetIrqs::BYTES {
            return Err(libc::EINVAL);
        }
        let data = request.flags & (IRQ_SET_DATA_NONE | IRQ_SET_DATA_BOOL | IRQ_SET_DATA_EVENTFD);
        let info = self.device.irq_info(request.index).ok_or(libc::EINVAL)?;
        match data {
            IRQ_SET_DATA_EVENTFD => {
                if fds.len() != request.count as usize {
                    return Err(libc::EINVAL);
                }
                let fds = fds.into_iter().map(Some).collect();
                self.device
                    .set_irq_eventfds(request.index, request.start, fds)
                    .map_err(dev_err)?;
            }
            IRQ_SET_DATA_NONE if request.count == 0 => {
                if !fds.is_empty() {
                    return Err(libc::EINVAL);
                }
                let none = (0..info.count).map(|_| None).collect();
                self.device
                    .set_irq_eventfds(request.index, 0, none)
                    .map_err(dev_err)?;
            }
            IRQ_SET_DATA_NONE | IRQ_SET_DATA_BOOL if fds.is_empty() => {
                let end = request
                    .start
                    .checked_add(request.count)
                    .ok_or(libc::EINVAL)?;
                if end > info.count {
                    return Err(libc::EINVAL);
                }
            }
            _ => return Err(libc::EINVAL),
        }
        Reply::payload(Vec::new())
    }
}
