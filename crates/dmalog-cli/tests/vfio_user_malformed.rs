//! Malformed messages against `dmalog serve`: each gets an error reply with the right errno,
//! the stream stays in step, and the server goes on serving.

mod common;

use std::io::{Read, Write};
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::net::UnixStream;

use common::{guest_memory, ServerProcess};
use dmalog_vfio_user::transport::Transport;
use dmalog_vfio_user::wire::*;

struct Raw {
    transport: Transport,
    id: u16,
}

impl Raw {
    fn connect(server: &ServerProcess) -> Self {
        server.wait_listening();
        Raw {
            transport: Transport::new(UnixStream::connect(&server.socket).unwrap(), 2 << 20),
            id: 0,
        }
    }

    /// Sends a command; returns the reply's errno (0: success) and payload.
    fn send(&mut self, command: u16, payload: &[u8], fds: &[BorrowedFd<'_>]) -> (i32, Vec<u8>) {
        self.send_flags(command, TYPE_COMMAND, payload, fds)
    }

    fn send_flags(
        &mut self,
        command: u16,
        flags: u32,
        payload: &[u8],
        fds: &[BorrowedFd<'_>],
    ) -> (i32, Vec<u8>) {
        self.id = self.id.wrapping_add(1);
        let header = Header {
            msg_id: self.id,
            cmd: command,
            msg_size: 0,
            flags,
            error_no: 0,
        };
        self.transport.send(header, payload, fds).unwrap();
        self.reply()
    }

    fn reply(&mut self) -> (i32, Vec<u8>) {
        let reply = self.transport.recv().unwrap();
        assert_eq!(reply.header.kind(), TYPE_REPLY);
        let errno = if reply.header.flags & FLAG_ERROR != 0 {
            reply.header.error_no as i32
        } else {
            0
        };
        (errno, reply.payload)
    }

    /// DEVICE_GET_INFO with a 16-byte argsz: the errno and the reply.
    fn get_info(&mut self) -> (i32, Vec<u8>) {
        let info = DeviceInfo {
            argsz: 16,
            ..Default::default()
        };
        self.send(cmd::DEVICE_GET_INFO, &info.encode(), &[])
    }

    fn version(&mut self) {
        let v = Version {
            major: 0,
            minor: 2,
            json: Some(serde_json::json!({"capabilities": {"max_msg_fds": 8}})),
        };
        assert_eq!(self.send(cmd::VERSION, &v.encode(), &[]).0, 0);
    }
}

#[test]
fn every_malformed_message_gets_its_errno_and_the_server_keeps_serving() {
    let server = ServerProcess::start("soft");
    let mut raw = Raw::connect(&server);
    // Before VERSION, nothing else is accepted.
    assert_eq!(raw.get_info().0, libc::EINVAL);
    assert_eq!(
        raw.send(cmd::VERSION, b"\x01\0\x02\0", &[]).0,
        libc::ENOTSUP,
        "major 1"
    );
    assert_eq!(
        raw.send(cmd::VERSION, b"\0\0\x02\0{\"capabilities\":{}}", &[])
            .0,
        libc::EINVAL,
        "JSON without NUL"
    );
    assert_eq!(
        raw.send(cmd::VERSION, b"\0\0", &[]).0,
        libc::EINVAL,
        "truncated VERSION"
    );
    raw.version();
    assert_eq!(
        raw.send(
            cmd::VERSION,
            &Version {
                major: 0,
                minor: 2,
                json: None
            }
            .encode(),
            &[]
        )
        .0,
        libc::EINVAL,
        "second VERSION"
    );

    let memory = guest_memory(1 << 20);
    let fd = memory.as_fd();
    let map = |addr: u64, size: u64| {
        DmaMap {
            argsz: 32,
            flags: 3,
            offset: 0,
            addr,
            size,
        }
        .encode()
    };
    let rows: Vec<(&str, u16, Vec<u8>, bool, i32)> = vec![
        (
            "truncated DMA_MAP",
            cmd::DMA_MAP,
            map(0, 4096)[..10].to_vec(),
            false,
            libc::EINVAL,
        ),
        (
            "DMA_MAP argsz 8",
            cmd::DMA_MAP,
            DmaMap {
                argsz: 8,
                flags: 3,
                offset: 0,
                addr: 0,
                size: 4096,
            }
            .encode(),
            true,
            libc::EINVAL,
        ),
        (
            "DMA_MAP zero size",
            cmd::DMA_MAP,
            map(0, 0),
            true,
            libc::EINVAL,
        ),
        (
            "DMA_MAP wraps",
            cmd::DMA_MAP,
            map(u64::MAX - 4095, 8192),
            true,
            libc::EINVAL,
        ),
        (
            "DMA_MAP beyond the fd",
            cmd::DMA_MAP,
            DmaMap {
                argsz: 32,
                flags: 3,
                offset: 1 << 40,
                addr: 0,
                size: 4096,
            }
            .encode(),
            true,
            libc::EINVAL,
        ),
        (
            "DMA_UNMAP bad flags",
            cmd::DMA_UNMAP,
            DmaUnmap {
                argsz: 24,
                flags: 0x80,
                addr: 0,
                size: 4096,
            }
            .encode(),
            false,
            libc::EINVAL,
        ),
        (
            "DMA_UNMAP legacy bitmap",
            cmd::DMA_UNMAP,
            DmaUnmap {
                argsz: 24,
                flags: 1,
                addr: 0,
                size: 4096,
            }
            .encode(),
            false,
            libc::ENOTSUP,
        ),
        (
            "DMA_UNMAP no such mapping",
            cmd::DMA_UNMAP,
            DmaUnmap {
                argsz: 24,
                flags: 0,
                addr: 0,
                size: 4096,
            }
            .encode(),
            false,
            libc::EINVAL,
        ),
        (
            "DMA_UNMAP ALL with a range",
            cmd::DMA_UNMAP,
            DmaUnmap {
                argsz: 24,
                flags: 2,
                addr: 0,
                size: 4096,
            }
            .encode(),
            false,
            libc::EINVAL,
        ),
        (
            "GET_INFO argsz 8",
            cmd::DEVICE_GET_INFO,
            DeviceInfo {
                argsz: 8,
                ..Default::default()
            }
            .encode(),
            false,
            libc::EINVAL,
        ),
        (
            "GET_REGION_INFO no such region",
            cmd::DEVICE_GET_REGION_INFO,
            RegionInfoWire {
                argsz: 32,
                index: 99,
                ..Default::default()
            }
            .encode(),
            false,
            libc::EINVAL,
        ),
        (
            "GET_IRQ_INFO no such index",
            cmd::DEVICE_GET_IRQ_INFO,
            IrqInfoWire {
                argsz: 16,
                index: 9,
                ..Default::default()
            }
            .encode(),
            false,
            libc::EINVAL,
        ),
        (
            "REGION_READ with an fd",
            cmd::REGION_READ,
            RegionAccess {
                offset: 0,
                region: 0,
                count: 8,
            }
            .encode(),
            true,
            libc::EINVAL,
        ),
        (
            "REGION_READ too big",
            cmd::REGION_READ,
            RegionAccess {
                offset: 0,
                region: 0,
                count: 8 << 20,
            }
            .encode(),
            false,
            libc::EINVAL,
        ),
        (
            "REGION_READ bad region",
            cmd::REGION_READ,
            RegionAccess {
                offset: 0,
                region: 42,
                count: 8,
            }
            .encode(),
            false,
            libc::EINVAL,
        ),
        (
            "REGION_WRITE count mismatch",
            cmd::REGION_WRITE,
            [
                RegionAccess {
                    offset: 0,
                    region: 0,
                    count: 8,
                }
                .encode(),
                vec![0; 4],
            ]
            .concat(),
            false,
            libc::EINVAL,
        ),
        (
            "REGION_WRITE_MULTI empty",
            cmd::REGION_WRITE_MULTI,
            0u64.to_le_bytes().to_vec(),
            false,
            libc::EINVAL,
        ),
        (
            "SET_IRQS eventfd count mismatch",
            cmd::DEVICE_SET_IRQS,
            SetIrqs {
                argsz: 20,
                flags: IRQ_SET_DATA_EVENTFD | IRQ_SET_ACTION_TRIGGER,
                index: 0,
                start: 0,
                count: 2,
            }
            .encode(),
            true,
            libc::EINVAL,
        ),
        (
            "SET_IRQS vectors out of range",
            cmd::DEVICE_SET_IRQS,
            SetIrqs {
                argsz: 20,
                flags: IRQ_SET_DATA_NONE | IRQ_SET_ACTION_TRIGGER,
                index: 0,
                start: 5,
                count: 1,
            }
            .encode(),
            false,
            libc::EINVAL,
        ),
        (
            "legacy DIRTY_PAGES",
            cmd::DIRTY_PAGES,
            vec![0; 8],
            false,
            libc::ENOTSUP,
        ),
        ("unknown command", 99, vec![], false, libc::ENOSYS),
        (
            "DEVICE_FEATURE truncated",
            cmd::DEVICE_FEATURE,
            vec![1, 2, 3],
            false,
            libc::EINVAL,
        ),
        (
            "DEVICE_FEATURE unknown",
            cmd::DEVICE_FEATURE,
            dmalog::uapi::feature_request(16, 0x77 | dmalog::uapi::FEATURE_GET, &[0; 8]),
            false,
            libc::ENOTTY,
        ),
        (
            "MIG_DATA_READ while RUNNING",
            cmd::MIG_DATA_READ,
            MigData {
                argsz: 8 + 64,
                size: 64,
            }
            .encode(),
            false,
            libc::EINVAL,
        ),
        (
            "MIG_DATA_WRITE while RUNNING",
            cmd::MIG_DATA_WRITE,
            [MigData { argsz: 12, size: 4 }.encode(), vec![0; 4]].concat(),
            false,
            libc::EINVAL,
        ),
        (
            "MIG_DATA_WRITE size mismatch",
            cmd::MIG_DATA_WRITE,
            [MigData { argsz: 12, size: 9 }.encode(), vec![0; 4]].concat(),
            false,
            libc::EINVAL,
        ),
    ];
    for (name, command, payload, with_fd, errno) in rows {
        let fds: Vec<BorrowedFd<'_>> = if with_fd { vec![fd] } else { vec![] };
        assert_eq!(raw.send(command, &payload, &fds).0, errno, "{name}");
    }
    // Overlapping maps and mismatched unmaps.
    assert_eq!(raw.send(cmd::DMA_MAP, &map(0x10000, 0x8000), &[fd]).0, 0);
    assert_eq!(
        raw.send(cmd::DMA_MAP, &map(0x14000, 0x8000), &[fd]).0,
        libc::EEXIST
    );
    assert_eq!(
        raw.send(
            cmd::DMA_UNMAP,
            &DmaUnmap {
                argsz: 24,
                flags: 0,
                addr: 0x10000,
                size: 0x4000
            }
            .encode(),
            &[]
        )
        .0,
        libc::EINVAL
    );
    // A reply-type message from the client, and a message claiming less than a header.
    assert_eq!(
        raw.send_flags(cmd::DEVICE_GET_INFO, TYPE_REPLY, &[], &[]).0,
        libc::EINVAL
    );
    // NO_REPLY: nothing comes back; the next request's reply is its own.
    raw.id += 1;
    let header = Header {
        msg_id: raw.id,
        cmd: cmd::DEVICE_RESET,
        msg_size: 0,
        flags: FLAG_NO_REPLY,
        error_no: 0,
    };
    raw.transport.send(header, &[], &[]).unwrap();
    let (errno, info) = raw.get_info();
    assert_eq!(
        (errno, DeviceInfo::decode(&info).unwrap().num_regions),
        (0, 9)
    );
    // Oversized: the server reads it all and answers E2BIG; the stream stays in step.
    let big = vec![0u8; 3 << 20];
    assert_eq!(raw.send(cmd::REGION_WRITE, &big, &[]).0, libc::E2BIG);
    assert_eq!(raw.get_info().0, 0);
    drop(raw);

    // msg_size below the header, written by hand: an error reply, then a clean close.
    server.wait_listening();
    let mut stream = UnixStream::connect(&server.socket).unwrap();
    let header = Header {
        msg_id: 1,
        cmd: cmd::VERSION,
        msg_size: 4,
        flags: 0,
        error_no: 0,
    };
    stream.write_all(&header.encode()).unwrap();
    let mut reply = [0u8; 16];
    stream.read_exact(&mut reply).unwrap();
    assert_eq!(
        Header::decode(&reply).unwrap().error_no as i32,
        libc::EINVAL
    );
    drop(stream);
    // A peer that vanishes in the middle of a message does not take the server down.
    let mut stream = UnixStream::connect(&server.socket).unwrap();
    let header = Header {
        msg_id: 1,
        cmd: cmd::VERSION,
        msg_size: 1000,
        flags: 0,
        error_no: 0,
    };
    stream.write_all(&header.encode()).unwrap();
    drop(stream);
    let mut client = server.connect();
    assert_eq!(client.device_info().unwrap().num_irqs, 5, "still serving");
}
