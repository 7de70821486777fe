//! A report split into many pipelined parts, with a server thread on a socket pair: every
//! part arrives in order, and a refused report leaves the stream in step.

use std::os::unix::net::UnixStream;

use dmalog::{DirtyTracker, IovaRange, TrackerError};
use dmalog_device::DmaEngine;
use dmalog_vfio_user::{Client, Server, ServerConfig};

const PAGE: u64 = 4096;
/// Small messages: a part holds 512 words (32768 pages), so a 1 GiB report takes 8 parts,
/// more than the pipeline depth.
const XFER_BYTES: u32 = 4096 + 40;

fn pair() -> (Client, std::thread::JoinHandle<()>, dmalog::WriteRecorder) {
    let config = ServerConfig {
        max_data_xfer_size: XFER_BYTES,
        ..ServerConfig::default()
    };
    let mut server = Server::new(config, |space| Box::new(DmaEngine::new(space)));
    let recorder = server.recorder();
    let (client_end, server_end) = UnixStream::pair().unwrap();
    let thread = std::thread::spawn(move || server.serve(server_end));
    (
        Client::with_stream(client_end, XFER_BYTES).unwrap(),
        thread,
        recorder,
    )
}

#[test]
fn split_reports_arrive_in_order_and_refusals_keep_the_stream_in_step() {
    let (mut client, server, mut dma) = pair();
    let span = 1u64 << 30;
    let mut words = vec![0u64; (span / PAGE / 64) as usize];

    // Before START every part is refused: one EINVAL, then the next command still works.
    let err = client
        .report(IovaRange::new(0, span).unwrap(), PAGE, &mut words)
        .unwrap_err();
    assert_eq!(err.errno(), libc::EINVAL, "{err}");
    assert!(client.probe().unwrap());

    client
        .start(&[IovaRange::new(0, span).unwrap()], PAGE)
        .unwrap();
    // Eight dirty pages per part, at different offsets in each.
    let pages: Vec<u64> = (0..span / PAGE).step_by(4096 + 7).collect();
    for &page in &pages {
        dma.record_write(page * PAGE, 1);
    }
    client
        .report(IovaRange::new(0, span).unwrap(), PAGE, &mut words)
        .unwrap();
    let reported: Vec<u64> = (0..span / PAGE)
        .filter(|&p| words[(p / 64) as usize] >> (p % 64) & 1 == 1)
        .collect();
    assert_eq!(reported, pages);

    // A report the caller's buffer cannot hold is refused before anything is sent.
    let mut short = vec![0u64; 1];
    assert!(matches!(
        client.report(IovaRange::new(0, span).unwrap(), PAGE, &mut short),
        Err(TrackerError::BufferTooSmall { .. })
    ));
    words.fill(0);
    client
        .report(IovaRange::new(0, span).unwrap(), PAGE, &mut words)
        .unwrap();
    assert!(words.iter().all(|&w| w == 0), "the first report cleared it");
    client.stop().unwrap();
    drop(client);
    server.join().unwrap();
}

#[test]
fn a_split_report_keeps_the_callers_bits_in_every_part() {
    // Parts still all zero in the caller's bitmap are received straight into it; parts with
    // bits of the caller's own are merged. Either way the report only adds bits.
    let (mut client, server, mut dma) = pair();
    let span = 1u64 << 30;
    client
        .start(&[IovaRange::new(0, span).unwrap()], PAGE)
        .unwrap();
    let dirty: Vec<u64> = (0..span / PAGE).step_by(4096 + 7).collect();
    for &page in &dirty {
        dma.record_write(page * PAGE, 1);
    }
    let part_words = 512;
    let mut words = vec![0u64; (span / PAGE / 64) as usize];
    // Parts 1 and 6 carry bits of the caller's; the others are fresh.
    words[part_words + 3] = 1 << 9;
    words[6 * part_words + 100] = u64::MAX;
    let mut expected: Vec<u64> = dirty.clone();
    expected.push((part_words as u64 + 3) * 64 + 9);
    expected.extend((6 * part_words as u64 + 100) * 64..(6 * part_words as u64 + 101) * 64);
    expected.sort_unstable();
    expected.dedup();
    client
        .report(IovaRange::new(0, span).unwrap(), PAGE, &mut words)
        .unwrap();
    let reported: Vec<u64> = (0..span / PAGE)
        .filter(|&p| words[(p / 64) as usize] >> (p % 64) & 1 == 1)
        .collect();
    assert_eq!(reported, expected);
    client.stop().unwrap();
    drop(client);
    server.join().unwrap();
}
