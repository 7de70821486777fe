//! rust-vmm's `vfio_user` crate (0.1.7, cloud-hypervisor's vfio-user client) drives a
//! `dmalog serve` child process: VERSION, DEVICE_GET_INFO and every region's info (the
//! crate asks with argsz 32 first, then again with the size the reply names), DMA_MAP with
//! an fd, register reads and writes of the dma-engine, a FILL whose bytes are checked in the
//! shared memory, IRQ info and SET_IRQS with an eventfd that fires, DMA_UNMAP and RESET.
//!
//! The crate reads each reply by its fixed size and ignores the ERROR flag, so a reply of
//! the wrong shape does not fail a call: it stalls the crate on a read or desynchronises
//! the stream. Every step therefore runs under a hang guard, and the test checks results
//! (register values, bytes in memory, eventfd counts) rather than the crate's `Ok`.

mod common;

use std::os::fd::{AsFd, AsRawFd};
use std::sync::mpsc;
use std::time::Duration;

use common::{guest_memory, read_guest, reg, ServerProcess};
use vfio_bindings::bindings::vfio::{
    VFIO_IRQ_SET_ACTION_TRIGGER, VFIO_IRQ_SET_DATA_EVENTFD, VFIO_PCI_INTX_IRQ_INDEX,
    VFIO_REGION_INFO_FLAG_CAPS, VFIO_REGION_INFO_FLAG_MMAP,
};

const GUEST_BYTES: u64 = 4 << 20;
/// dma-engine's IRQ_CTRL register: bit 0 raises INTx after each doorbell op.
const IRQ_CTRL: u64 = 0x058;

fn read_u64(client: &mut vfio_user::Client, offset: u64) -> u64 {
    let mut bytes = [0u8; 8];
    client.region_read(0, offset, &mut bytes).unwrap();
    u64::from_le_bytes(bytes)
}

fn write_u64(client: &mut vfio_user::Client, offset: u64, value: u64) {
    client
        .region_write(0, offset, &value.to_le_bytes())
        .unwrap();
}

/// Runs `body` on its own thread; fails the test if it does not finish in 60 s (a reply of
/// the wrong size leaves the crate blocked on a read).
fn with_hang_guard(body: impl FnOnce() + Send + 'static) {
    let (done_tx, done_rx) = mpsc::channel();
    let worker = std::thread::spawn(move || {
        body();
        let _ = done_tx.send(());
    });
    match done_rx.recv_timeout(Duration::from_secs(60)) {
        Ok(()) => worker.join().unwrap(),
        Err(mpsc::RecvTimeoutError::Disconnected) => {
            if let Err(panic) = worker.join() {
                std::panic::resume_unwind(panic);
            }
        }
        Err(mpsc::RecvTimeoutError::Timeout) => {
            panic!("the vfio_user client is stuck: a reply had the wrong size or never came")
        }
    }
}

#[test]
fn rust_vmm_client_drives_dma_engine() {
    let server = ServerProcess::start("soft");
    server.wait_listening();
    let socket = server.socket.clone();
    with_hang_guard(move || {
        let mut client = vfio_user::Client::new(&socket).expect("VERSION and region infos");
        // Every region info arrived whole; BAR0 and config space have their sizes and
        // nothing claims an mmap without an fd or caps that are not there.
        let bar0 = client.region(0).expect("region 0");
        assert_eq!(bar0.size, 4096);
        assert_eq!(bar0.flags & VFIO_REGION_INFO_FLAG_MMAP, 0);
        assert_eq!(bar0.flags & VFIO_REGION_INFO_FLAG_CAPS, 0);
        assert!(bar0.file_offset.is_none());
        assert_eq!(client.region(7).expect("config space").size, 256);

        let mut ids = [0u8; 4];
        client.region_read(7, 0, &mut ids).unwrap();
        assert_eq!(ids, [0x36, 0x1b, 0xd1, 0x10], "vendor 1b36, device 10d1");
        assert_eq!(read_u64(&mut client, reg::MAGIC), 0x3130_474F_4C41_4D44);

        let memory = guest_memory(GUEST_BYTES);
        client
            .dma_map(0, 0, GUEST_BYTES, memory.as_fd().as_raw_fd())
            .unwrap();

        let intx = client.get_irq_info(VFIO_PCI_INTX_IRQ_INDEX).unwrap();
        assert_eq!((intx.index, intx.count), (VFIO_PCI_INTX_IRQ_INDEX, 1));
        let eventfd = rustix::event::eventfd(0, rustix::event::EventfdFlags::CLOEXEC).unwrap();
        client
            .set_irqs(
                VFIO_PCI_INTX_IRQ_INDEX,
                VFIO_IRQ_SET_DATA_EVENTFD | VFIO_IRQ_SET_ACTION_TRIGGER,
                0,
                1,
                &[eventfd.as_raw_fd()],
            )
            .unwrap();
        write_u64(&mut client, IRQ_CTRL, 1);

        // FILL 3 pages at 0x5000 with pattern 0x100: word k = 0x100 + k.
        for (offset, value) in [
            (reg::DST, 0x5000),
            (reg::LEN, 3 * 4096),
            (reg::PATTERN, 0x100),
            (reg::OP, 1),
        ] {
            write_u64(&mut client, offset, value);
        }
        write_u64(&mut client, reg::DOORBELL, 1);
        assert_eq!(read_u64(&mut client, reg::STATUS), 0, "FILL status");
        assert_eq!(read_u64(&mut client, reg::BYTES_WRITTEN), 3 * 4096);
        let bytes = read_guest(&memory, 0x5000, 3 * 4096);
        for (k, word) in bytes.chunks_exact(8).enumerate() {
            assert_eq!(
                u64::from_le_bytes(word.try_into().unwrap()),
                0x100 + k as u64
            );
        }
        assert_eq!(
            read_guest(&memory, 0x4ff8, 8),
            [0u8; 8],
            "nothing before DST"
        );

        let mut count = [0u8; 8];
        let fds = [rustix::event::PollFd::new(
            &eventfd,
            rustix::event::PollFlags::IN,
        )];
        let mut fds = fds;
        let timeout = rustix::fs::Timespec {
            tv_sec: 10,
            tv_nsec: 0,
        };
        assert_eq!(rustix::event::poll(&mut fds, Some(&timeout)).unwrap(), 1);
        rustix::io::read(&eventfd, &mut count).unwrap();
        assert_eq!(u64::from_ne_bytes(count), 1, "one INTx for one op");

        // After DMA_UNMAP the same FILL faults: the unmap took effect and its reply was
        // the size the crate reads.
        client.dma_unmap(0, GUEST_BYTES).unwrap();
        write_u64(&mut client, reg::DOORBELL, 1);
        assert_eq!(
            read_u64(&mut client, reg::STATUS),
            libc::EFAULT as u64,
            "FILL after unmap"
        );
        client.reset().unwrap();
        assert_eq!(read_u64(&mut client, reg::MAGIC), 0x3130_474F_4C41_4D44);
        client.shutdown().unwrap();
    });
}

#[test]
fn rust_vmm_client_reads_lvu_sample_regions_with_their_caps_and_fd() {
    let server = ServerProcess::start_with("soft", &["--device", "lvu-sample"]);
    server.wait_listening();
    let socket = server.socket.clone();
    with_hang_guard(move || {
        let client = vfio_user::Client::new(&socket).expect("VERSION and region infos");
        let bar1 = client.region(1).expect("BAR1");
        assert_eq!(bar1.size, 0x4000);
        assert_ne!(bar1.flags & VFIO_REGION_INFO_FLAG_CAPS, 0);
        assert_ne!(bar1.flags & VFIO_REGION_INFO_FLAG_MMAP, 0);
        let areas: Vec<(u64, u64)> = bar1
            .sparse_areas
            .iter()
            .map(|a| (a.offset, a.size))
            .collect();
        assert_eq!(areas, vec![(0, 0x1000), (0x2000, 0x1000)]);
        assert!(
            bar1.file_offset.is_some(),
            "BAR1's fd came with the full reply"
        );
        let bar0 = client.region(0).expect("BAR0");
        assert_eq!(bar0.size, 8);
        assert_eq!(
            bar0.flags & (VFIO_REGION_INFO_FLAG_CAPS | VFIO_REGION_INFO_FLAG_MMAP),
            0
        );
        client.shutdown().unwrap();
    });
}
