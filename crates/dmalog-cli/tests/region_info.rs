//! DEVICE_GET_REGION_INFO as QEMU asks it (argsz 32 first, then the full size): a reply
//! without room for the capabilities claims no CAPS (cap_offset 0) and no MMAP (no fd
//! comes with it); a full reply has CAPS with cap_offset 32 and MMAP exactly when an fd
//! comes. Both devices, every region.

mod common;

use std::os::unix::net::UnixStream;

use common::ServerProcess;
use dmalog_device::device::{REGION_CAPS, REGION_MMAP};
use dmalog_vfio_user::transport::Transport;
use dmalog_vfio_user::wire::*;

/// One region info request with `argsz`: the reply's info, its bytes, and its fd count.
fn region_info(
    transport: &mut Transport,
    id: u16,
    index: u32,
    argsz: u32,
) -> (RegionInfoWire, Vec<u8>, usize) {
    let request = RegionInfoWire {
        argsz,
        index,
        ..RegionInfoWire::default()
    };
    let header = Header {
        msg_id: id,
        cmd: cmd::DEVICE_GET_REGION_INFO,
        msg_size: 0,
        flags: TYPE_COMMAND,
        error_no: 0,
    };
    transport.send(header, &request.encode(), &[]).unwrap();
    let reply = transport.recv().unwrap();
    assert_eq!(reply.header.flags & FLAG_ERROR, 0, "region {index}");
    let info = RegionInfoWire::decode(&reply.payload).unwrap();
    (info, reply.payload, reply.fds.len())
}

fn check_device(device: &str) {
    let server = ServerProcess::start_with("soft", &["--device", device]);
    server.wait_listening();
    let stream = UnixStream::connect(&server.socket).unwrap();
    stream
        .set_read_timeout(Some(std::time::Duration::from_secs(20)))
        .unwrap();
    let mut transport = Transport::new(stream, 2 << 20);
    let version = Version {
        major: 0,
        minor: 2,
        json: Some(serde_json::json!({"capabilities": {"max_msg_fds": 8}})),
    };
    let header = Header {
        msg_id: 1,
        cmd: cmd::VERSION,
        msg_size: 0,
        flags: TYPE_COMMAND,
        error_no: 0,
    };
    transport.send(header, &version.encode(), &[]).unwrap();
    assert_eq!(transport.recv().unwrap().header.flags & FLAG_ERROR, 0);
    let mut id = 1;
    let mut saw_caps = false;
    for index in 0..9 {
        id += 1;
        let (short, short_bytes, short_fds) =
            region_info(&mut transport, id, index, RegionInfoWire::BYTES as u32);
        assert_eq!(short_bytes.len(), RegionInfoWire::BYTES);
        let truncated = short.argsz as usize > RegionInfoWire::BYTES;
        if truncated {
            assert_eq!(
                short.flags & REGION_CAPS,
                0,
                "{device} region {index}: CAPS not in the reply"
            );
            assert_eq!(short.cap_offset, 0, "{device} region {index}");
            assert_eq!(
                short.flags & REGION_MMAP,
                0,
                "{device} region {index}: MMAP without an fd"
            );
            assert_eq!(short_fds, 0, "{device} region {index}");
        } else {
            assert_eq!(
                short.flags & REGION_MMAP != 0,
                short_fds == 1,
                "{device} region {index}: MMAP exactly when an fd comes"
            );
        }
        id += 1;
        let (full, full_bytes, full_fds) = region_info(&mut transport, id, index, short.argsz);
        assert_eq!(full.argsz, short.argsz, "{device} region {index}");
        assert_eq!(
            full_bytes.len(),
            full.argsz as usize,
            "{device} region {index}"
        );
        assert_eq!(full.size, short.size);
        assert_eq!(
            full.flags & REGION_MMAP != 0,
            full_fds == 1,
            "{device} region {index}: MMAP exactly when an fd comes"
        );
        if full.flags & REGION_CAPS != 0 {
            saw_caps = true;
            assert_eq!(full.cap_offset as usize, RegionInfoWire::BYTES);
            assert!(full.cap_offset < full.argsz);
            let areas = decode_sparse_mmap(&full_bytes, full.cap_offset as usize).unwrap();
            assert!(!areas.is_empty(), "{device} region {index}");
        } else {
            assert_eq!(full.cap_offset, 0);
            assert!(
                !truncated,
                "{device} region {index}: a larger argsz but no caps"
            );
        }
    }
    if device == "lvu-sample" {
        assert!(saw_caps, "BAR1 has a sparse mmap capability");
    }
}

#[test]
fn region_info_with_argsz_32_and_full_dma_engine() {
    check_device("dma-engine");
}

#[test]
fn region_info_with_argsz_32_and_full_lvu_sample() {
    check_device("lvu-sample");
}
