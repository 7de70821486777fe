//! dmalog's `Client` against rust-vmm's `vfio_user` crate (0.1.7) as the server, with a
//! small device backend written here: VERSION, DEVICE_GET_INFO, every region's info (a
//! mappable BAR with a sparse-mmap capability and its fd), region reads and writes, DMA_MAP
//! with an fd that the backend writes through, SET_IRQS with an eventfd the backend
//! signals, IRQ info, DMA_UNMAP and DEVICE_RESET.
//!
//! Where the crate departs from the vfio-user specification (see the README's
//! Interoperability section): it knows commands 1-14 only and answers DEVICE_FEATURE with
//! an error reply without reading the payload, so the stream loses its framing (no client
//! can be tolerant of that; this test does not send it); its error replies carry errno 0
//! unless the backend said EINVAL; it replies VERSION 0.0.

use dmalog::IovaRange;
use std::fs::File;
use std::io::Write;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{mpsc, Arc};
use std::time::Duration;

use dmalog_vfio_user::Client;
use vfio_bindings::bindings::vfio::{
    vfio_region_info, vfio_region_sparse_mmap_area, VFIO_IRQ_INFO_EVENTFD,
    VFIO_REGION_INFO_FLAG_CAPS, VFIO_REGION_INFO_FLAG_MMAP, VFIO_REGION_INFO_FLAG_READ,
    VFIO_REGION_INFO_FLAG_WRITE,
};
use vfio_user::{
    DmaMapFlags, DmaUnmapFlags, IrqInfo, Server, ServerBackend, ServerRegion, SparseArea,
};

/// The backend's registers in region 0: DST, LEN, then a doorbell that fills
/// `[DST, DST+LEN)` of DMA memory with FILL_BYTE and signals INTx.
const REG_DST: u64 = 0x0;
const REG_LEN: u64 = 0x8;
const REG_DOORBELL: u64 = 0x10;
const FILL_BYTE: u8 = 0xa5;
const BAR1_BYTES: u64 = 4096;
const CONFIG_IDS: [u8; 4] = [0xf4, 0x1a, 0x42, 0x10];

struct DmaMapping {
    iova: u64,
    size: u64,
    file_offset: u64,
    file: File,
}

#[derive(Default)]
struct TestDevice {
    dst: u64,
    len: u64,
    mappings: Vec<DmaMapping>,
    intx: Option<File>,
    resets: Arc<AtomicU32>,
}

fn invalid() -> std::io::Error {
    std::io::Error::from_raw_os_error(libc::EINVAL)
}

impl TestDevice {
    fn fill(&mut self) -> std::io::Result<()> {
        let mapping = self
            .mappings
            .iter()
            .find(|m| m.iova <= self.dst && self.dst + self.len <= m.iova + m.size)
            .ok_or_else(invalid)?;
        let bytes = vec![FILL_BYTE; self.len as usize];
        mapping
            .file
            .write_all_at(&bytes, mapping.file_offset + (self.dst - mapping.iova))?;
        if let Some(eventfd) = &mut self.intx {
            eventfd.write_all(&1u64.to_ne_bytes())?;
        }
        Ok(())
    }
}

impl ServerBackend for TestDevice {
    fn region_read(&mut self, region: u32, offset: u64, data: &mut [u8]) -> std::io::Result<()> {
        match (region, offset) {
            (0, REG_DST) => data.copy_from_slice(&self.dst.to_le_bytes()[..data.len()]),
            (0, REG_LEN) => data.copy_from_slice(&self.len.to_le_bytes()[..data.len()]),
            (7, 0) => data.copy_from_slice(&CONFIG_IDS[..data.len()]),
            _ => return Err(invalid()),
        }
        Ok(())
    }

    fn region_write(&mut self, region: u32, offset: u64, data: &[u8]) -> std::io::Result<()> {
        let value = u64::from_le_bytes(data.try_into().map_err(|_| invalid())?);
        match (region, offset) {
            (0, REG_DST) => self.dst = value,
            (0, REG_LEN) => self.len = value,
            (0, REG_DOORBELL) => self.fill()?,
            _ => return Err(invalid()),
        }
        Ok(())
    }

    fn dma_map(
        &mut self,
        flags: DmaMapFlags,
        offset: u64,
        address: u64,
        size: u64,
        fd: Option<File>,
    ) -> std::io::Result<()> {
        assert!(flags.contains(DmaMapFlags::READ_WRITE), "flags {flags:?}");
        self.mappings.push(DmaMapping {
            iova: address,
            size,
            file_offset: offset,
            file: fd.ok_or_else(invalid)?,
        });
        Ok(())
    }

    fn dma_unmap(&mut self, _flags: DmaUnmapFlags, address: u64, size: u64) -> std::io::Result<()> {
        let before = self.mappings.len();
        self.mappings
            .retain(|m| !(m.iova == address && m.size == size));
        if self.mappings.len() == before {
            return Err(invalid());
        }
        Ok(())
    }

    fn reset(&mut self) -> std::io::Result<()> {
        self.dst = 0;
        self.len = 0;
        self.resets.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }

    fn set_irqs(
        &mut self,
        index: u32,
        _flags: u32,
        start: u32,
        count: u32,
        mut fds: Vec<File>,
    ) -> std::io::Result<()> {
        if index != 0 || start != 0 || count != 1 || fds.len() != 1 {
            return Err(invalid());
        }
        self.intx = fds.pop();
        Ok(())
    }
}

fn region(index: u32, size: u64, flags: u32) -> vfio_region_info {
    vfio_region_info {
        argsz: std::mem::size_of::<vfio_region_info>() as u32,
        flags,
        index,
        cap_offset: 0,
        size,
        offset: 0,
    }
}

fn memfd(tag: &str, len_bytes: u64) -> OwnedFd {
    let fd = rustix::fs::memfd_create(tag, rustix::fs::MemfdFlags::CLOEXEC).unwrap();
    rustix::fs::ftruncate(&fd, len_bytes).unwrap();
    fd
}

#[test]
fn dmalog_client_drives_the_rust_vmm_server() {
    let dir = std::env::temp_dir().join(format!("dmalog-peer-server-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let socket = dir.join("sock");

    let bar1 = memfd("bar1", BAR1_BYTES);
    rustix::io::pwrite(&bar1, b"rust-vmm", 0).unwrap();
    let rw = VFIO_REGION_INFO_FLAG_READ | VFIO_REGION_INFO_FLAG_WRITE;
    let mut regions: Vec<ServerRegion> = (0..9)
        .map(|index| ServerRegion {
            region_info: region(index, 0, 0),
            sparse_areas: Vec::new(),
            mmap_fd: None,
        })
        .collect();
    regions[0].region_info = region(0, 0x100, rw);
    regions[1] = ServerRegion {
        region_info: region(1, BAR1_BYTES, rw | VFIO_REGION_INFO_FLAG_MMAP),
        sparse_areas: vec![SparseArea {
            area: vfio_region_sparse_mmap_area {
                offset: 0,
                size: BAR1_BYTES,
            },
        }],
        mmap_fd: Some(bar1.as_raw_fd()),
    };
    regions[7].region_info = region(7, 256, rw);
    let irqs = vec![IrqInfo {
        index: 0,
        flags: VFIO_IRQ_INFO_EVENTFD,
        count: 1,
    }];
    let server = Server::new(&socket, true, irqs, regions).unwrap();
    let resets = Arc::new(AtomicU32::new(0));
    let mut device = TestDevice {
        resets: Arc::clone(&resets),
        ..TestDevice::default()
    };
    let served = std::thread::spawn(move || server.run(&mut device).map_err(|e| e.to_string()));

    let (done_tx, done_rx) = mpsc::channel();
    let client_socket = socket.clone();
    let client = std::thread::spawn(move || {
        let mut client = Client::connect(&client_socket).expect("VERSION with the crate's reply");
        assert_eq!(client.server_version().major, 0);

        let info = client.device_info().unwrap();
        assert_eq!((info.num_regions, info.num_irqs), (9, 1));
        for index in 0..9 {
            client.region_info(index).expect("every region's info");
        }
        let bar1 = client.region_info(1).unwrap();
        assert_eq!(bar1.info.size, BAR1_BYTES);
        assert_ne!(bar1.info.flags & VFIO_REGION_INFO_FLAG_CAPS, 0);
        assert_eq!(bar1.sparse_mmap, vec![(0, BAR1_BYTES)]);
        let bar1_fd = bar1.fd.expect("BAR1's fd comes with the full reply");
        let mut head = [0u8; 8];
        rustix::io::pread(&bar1_fd, &mut head, 0).unwrap();
        assert_eq!(&head, b"rust-vmm", "the fd is the server's BAR1");

        let mut ids = [0u8; 4];
        client.region_read(7, 0, &mut ids).unwrap();
        assert_eq!(ids, CONFIG_IDS);

        let irq = client.irq_info(0).unwrap();
        assert_eq!(irq.count, 1);
        let eventfd = rustix::event::eventfd(0, rustix::event::EventfdFlags::CLOEXEC).unwrap();
        client.set_irq_eventfds(0, 0, &[eventfd.as_fd()]).unwrap();

        let guest = memfd("guest", 1 << 20);
        client
            .dma_map(
                IovaRange::new(0x10_0000, 1 << 20).unwrap(),
                Some(guest.as_fd()),
                0,
                true,
            )
            .unwrap();
        client.write_u64(0, REG_DST, 0x10_2000).unwrap();
        client.write_u64(0, REG_LEN, 64).unwrap();
        assert_eq!(client.read_u64(0, REG_LEN).unwrap(), 64);
        client.write_u64(0, REG_DOORBELL, 1).unwrap();
        let mut filled = [0u8; 66];
        rustix::io::pread(&guest, &mut filled, 0x1fff).unwrap();
        assert_eq!(filled[0], 0, "before DST");
        assert!(
            filled[1..65].iter().all(|&b| b == FILL_BYTE),
            "the DMA landed"
        );
        assert_eq!(filled[65], 0, "after DST+LEN");
        let mut count = [0u8; 8];
        rustix::io::read(&eventfd, &mut count).unwrap();
        assert_eq!(u64::from_ne_bytes(count), 1, "INTx through our eventfd");

        // An access the backend refuses comes back as an error reply with errno 0 (the
        // crate keeps only InvalidInput's EINVAL): dmalog reports it as EIO, and the stream
        // stays in step.
        let refused = client.read_u64(0, 0x40).unwrap_err();
        assert_eq!(refused.errno(), libc::EIO);
        assert_eq!(client.read_u64(0, REG_LEN).unwrap(), 64, "still in step");
        client
            .dma_unmap(IovaRange::new(0x10_0000, 1 << 20).unwrap())
            .unwrap();
        client.reset().unwrap();
        assert_eq!(client.read_u64(0, REG_LEN).unwrap(), 0, "reset cleared LEN");
        drop(client);
        let _ = done_tx.send(());
    });
    match done_rx.recv_timeout(Duration::from_secs(60)) {
        Ok(()) => client.join().unwrap(),
        Err(mpsc::RecvTimeoutError::Disconnected) => {
            if let Err(panic) = client.join() {
                std::panic::resume_unwind(panic);
            }
        }
        Err(mpsc::RecvTimeoutError::Timeout) => panic!("client stuck against the crate's server"),
    }
    served
        .join()
        .unwrap()
        .expect("the crate's server ran to the client's disconnect");
    assert_eq!(resets.load(Ordering::SeqCst), 1);
    let _ = std::fs::remove_dir_all(&dir);
}
