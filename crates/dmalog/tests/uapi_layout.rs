//! The uAPI layouts and constants, checked against `vfio-bindings` 0.7 and against the
//! system `<linux/vfio.h>` compiled with the system C compiler.

use std::mem::{offset_of, size_of};
use std::process::Command;

use dmalog::uapi::*;
use vfio_bindings::bindings::vfio as vb;

#[test]
fn constants_match_vfio_bindings() {
    assert_eq!(u32::from(VFIO_TYPE), u32::from(vb::VFIO_TYPE));
    assert_eq!(VFIO_BASE, vb::VFIO_BASE);
    assert_eq!(FEATURE_MASK, vb::VFIO_DEVICE_FEATURE_MASK);
    assert_eq!(FEATURE_GET, vb::VFIO_DEVICE_FEATURE_GET);
    assert_eq!(FEATURE_SET, vb::VFIO_DEVICE_FEATURE_SET);
    assert_eq!(FEATURE_PROBE, vb::VFIO_DEVICE_FEATURE_PROBE);
    assert_eq!(FEATURE_MIGRATION, vb::VFIO_DEVICE_FEATURE_MIGRATION);
    assert_eq!(
        FEATURE_MIG_DEVICE_STATE,
        vb::VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE
    );
    assert_eq!(
        FEATURE_DMA_LOGGING_START,
        vb::VFIO_DEVICE_FEATURE_DMA_LOGGING_START
    );
    assert_eq!(
        FEATURE_DMA_LOGGING_STOP,
        vb::VFIO_DEVICE_FEATURE_DMA_LOGGING_STOP
    );
    assert_eq!(
        FEATURE_DMA_LOGGING_REPORT,
        vb::VFIO_DEVICE_FEATURE_DMA_LOGGING_REPORT
    );
    assert_eq!(FEATURE_MIG_DATA_SIZE, vb::VFIO_DEVICE_FEATURE_MIG_DATA_SIZE);
    assert_eq!(
        FEATURE_MIG_PRECOPY_INFO_V2,
        vb::VFIO_DEVICE_FEATURE_MIG_PRECOPY_INFOv2
    );
    assert_eq!(MIGRATION_STOP_COPY, u64::from(vb::VFIO_MIGRATION_STOP_COPY));
    assert_eq!(MIGRATION_P2P, u64::from(vb::VFIO_MIGRATION_P2P));
    assert_eq!(MIGRATION_PRE_COPY, u64::from(vb::VFIO_MIGRATION_PRE_COPY));
    let states = [
        (
            DeviceState::Error,
            vb::vfio_device_mig_state_VFIO_DEVICE_STATE_ERROR,
        ),
        (
            DeviceState::Stop,
            vb::vfio_device_mig_state_VFIO_DEVICE_STATE_STOP,
        ),
        (
            DeviceState::Running,
            vb::vfio_device_mig_state_VFIO_DEVICE_STATE_RUNNING,
        ),
        (
            DeviceState::StopCopy,
            vb::vfio_device_mig_state_VFIO_DEVICE_STATE_STOP_COPY,
        ),
        (
            DeviceState::Resuming,
            vb::vfio_device_mig_state_VFIO_DEVICE_STATE_RESUMING,
        ),
        (
            DeviceState::RunningP2p,
            vb::vfio_device_mig_state_VFIO_DEVICE_STATE_RUNNING_P2P,
        ),
        (
            DeviceState::PreCopy,
            vb::vfio_device_mig_state_VFIO_DEVICE_STATE_PRE_COPY,
        ),
        (
            DeviceState::PreCopyP2p,
            vb::vfio_device_mig_state_VFIO_DEVICE_STATE_PRE_COPY_P2P,
        ),
    ];
    for (ours, theirs) in states {
        assert_eq!(ours as u32, theirs);
        assert_eq!(DeviceState::from_u32(theirs), Some(ours));
    }
    assert_eq!(
        DeviceState::from_u32(vb::vfio_device_mig_state_VFIO_DEVICE_STATE_NR),
        None
    );
}

#[test]
fn sizes_and_offsets_match_vfio_bindings() {
    assert_eq!(FEATURE_HEADER_BYTES, size_of::<vb::vfio_device_feature>());
    assert_eq!(offset_of!(vb::vfio_device_feature, flags), 4);
    assert_eq!(
        KERNEL_CONTROL_BYTES,
        size_of::<vb::vfio_device_feature_dma_logging_control>()
    );
    assert_eq!(
        RANGE_BYTES,
        size_of::<vb::vfio_device_feature_dma_logging_range>()
    );
    assert_eq!(
        KERNEL_REPORT_BYTES,
        size_of::<vb::vfio_device_feature_dma_logging_report>()
    );
    assert_eq!(8, size_of::<vb::vfio_device_feature_mig_state>());
    // Field offsets: encode a value with distinct bytes per field and check where each lands.
    let control = KernelLoggingControl {
        page_size: 0x11,
        num_ranges: 0x22,
        reserved: 0x33,
        ranges_addr: 0x44,
    };
    let bytes = control.encode();
    assert_eq!(
        bytes[offset_of!(vb::vfio_device_feature_dma_logging_control, page_size)],
        0x11
    );
    assert_eq!(
        bytes[offset_of!(vb::vfio_device_feature_dma_logging_control, num_ranges)],
        0x22
    );
    assert_eq!(
        bytes[offset_of!(vb::vfio_device_feature_dma_logging_control, __reserved)],
        0x33
    );
    assert_eq!(
        bytes[offset_of!(vb::vfio_device_feature_dma_logging_control, ranges)],
        0x44
    );
    let report = KernelLoggingReport {
        iova: 0x11,
        length: 0x22,
        page_size: 0x33,
        bitmap_addr: 0x44,
    };
    let bytes = report.encode();
    assert_eq!(
        bytes[offset_of!(vb::vfio_device_feature_dma_logging_report, iova)],
        0x11
    );
    assert_eq!(
        bytes[offset_of!(vb::vfio_device_feature_dma_logging_report, length)],
        0x22
    );
    assert_eq!(
        bytes[offset_of!(vb::vfio_device_feature_dma_logging_report, page_size)],
        0x33
    );
    assert_eq!(
        bytes[offset_of!(vb::vfio_device_feature_dma_logging_report, bitmap)],
        0x44
    );
    let range = LoggingRange {
        iova: 0x11,
        length: 0x22,
    }
    .encode();
    assert_eq!(
        range[offset_of!(vb::vfio_device_feature_dma_logging_range, iova)],
        0x11
    );
    assert_eq!(
        range[offset_of!(vb::vfio_device_feature_dma_logging_range, length)],
        0x22
    );
    let state = MigDeviceStatePayload {
        device_state: 0x11,
        data_fd: 0x22,
    }
    .encode();
    assert_eq!(
        state[offset_of!(vb::vfio_device_feature_mig_state, device_state)],
        0x11
    );
    assert_eq!(
        state[offset_of!(vb::vfio_device_feature_mig_state, data_fd)],
        0x22
    );
}

const C_PROGRAM: &str = r#"
#include <stdio.h>
#include <stddef.h>
#include <linux/vfio.h>
#define P(name, value) printf("%s %llu\n", name, (unsigned long long)(value))
int main(void) {
    P("MASK", VFIO_DEVICE_FEATURE_MASK);
    P("GET", VFIO_DEVICE_FEATURE_GET);
    P("SET", VFIO_DEVICE_FEATURE_SET);
    P("PROBE", VFIO_DEVICE_FEATURE_PROBE);
    P("MIGRATION", VFIO_DEVICE_FEATURE_MIGRATION);
    P("MIG_DEVICE_STATE", VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE);
    P("START", VFIO_DEVICE_FEATURE_DMA_LOGGING_START);
    P("STOP", VFIO_DEVICE_FEATURE_DMA_LOGGING_STOP);
    P("REPORT", VFIO_DEVICE_FEATURE_DMA_LOGGING_REPORT);
    P("STOP_COPY", VFIO_MIGRATION_STOP_COPY);
    P("P2P", VFIO_MIGRATION_P2P);
#ifdef VFIO_MIGRATION_PRE_COPY
    P("PRE_COPY", VFIO_MIGRATION_PRE_COPY);
#endif
    P("sizeof_feature", sizeof(struct vfio_device_feature));
    P("sizeof_control", sizeof(struct vfio_device_feature_dma_logging_control));
    P("control_page_size", offsetof(struct vfio_device_feature_dma_logging_control, page_size));
    P("control_num_ranges", offsetof(struct vfio_device_feature_dma_logging_control, num_ranges));
    P("control_ranges", offsetof(struct vfio_device_feature_dma_logging_control, ranges));
    P("sizeof_range", sizeof(struct vfio_device_feature_dma_logging_range));
    P("range_length", offsetof(struct vfio_device_feature_dma_logging_range, length));
    P("sizeof_report", sizeof(struct vfio_device_feature_dma_logging_report));
    P("report_length", offsetof(struct vfio_device_feature_dma_logging_report, length));
    P("report_page_size", offsetof(struct vfio_device_feature_dma_logging_report, page_size));
    P("report_bitmap", offsetof(struct vfio_device_feature_dma_logging_report, bitmap));
    P("sizeof_mig_state", sizeof(struct vfio_device_feature_mig_state));
    P("STATE_RUNNING_P2P", VFIO_DEVICE_STATE_RUNNING_P2P);
    P("STATE_RESUMING", VFIO_DEVICE_STATE_RESUMING);
#ifdef VFIO_MIGRATION_PRE_COPY
    P("STATE_PRE_COPY_P2P", VFIO_DEVICE_STATE_PRE_COPY_P2P);
#endif
    return 0;
}
"#;

#[test]
fn layouts_match_the_system_header() {
    let header = std::path::Path::new("/usr/include/linux/vfio.h");
    let cc = std::env::var("CC").unwrap_or_else(|_| "cc".to_string());
    if !header.exists() || Command::new(&cc).arg("--version").output().is_err() {
        eprintln!("SKIPPED: no <linux/vfio.h> or no C compiler ({cc}) on this machine");
        return;
    }
    let dir = std::env::temp_dir().join(format!("dmalog-uapi-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let source = dir.join("layout.c");
    let binary = dir.join("layout");
    std::fs::write(&source, C_PROGRAM).unwrap();
    let compiled = Command::new(&cc)
        .arg("-o")
        .arg(&binary)
        .arg(&source)
        .output()
        .unwrap();
    assert!(
        compiled.status.success(),
        "cc failed: {}",
        String::from_utf8_lossy(&compiled.stderr)
    );
    let output = Command::new(&binary).output().unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    let text = String::from_utf8(output.stdout).unwrap();
    let printed: std::collections::HashMap<&str, u64> = text
        .lines()
        .filter_map(|line| line.split_once(' '))
        .map(|(name, value)| (name, value.parse().unwrap()))
        .collect();
    let expected: Vec<(&str, u64)> = vec![
        ("MASK", u64::from(FEATURE_MASK)),
        ("GET", u64::from(FEATURE_GET)),
        ("SET", u64::from(FEATURE_SET)),
        ("PROBE", u64::from(FEATURE_PROBE)),
        ("MIGRATION", u64::from(FEATURE_MIGRATION)),
        ("MIG_DEVICE_STATE", u64::from(FEATURE_MIG_DEVICE_STATE)),
        ("START", u64::from(FEATURE_DMA_LOGGING_START)),
        ("STOP", u64::from(FEATURE_DMA_LOGGING_STOP)),
        ("REPORT", u64::from(FEATURE_DMA_LOGGING_REPORT)),
        ("STOP_COPY", MIGRATION_STOP_COPY),
        ("P2P", MIGRATION_P2P),
        ("sizeof_feature", FEATURE_HEADER_BYTES as u64),
        ("sizeof_control", KERNEL_CONTROL_BYTES as u64),
        ("control_page_size", 0),
        ("control_num_ranges", 8),
        ("control_ranges", 16),
        ("sizeof_range", RANGE_BYTES as u64),
        ("range_length", 8),
        ("sizeof_report", KERNEL_REPORT_BYTES as u64),
        ("report_length", 8),
        ("report_page_size", 16),
        ("report_bitmap", 24),
        ("sizeof_mig_state", 8),
        ("STATE_RUNNING_P2P", DeviceState::RunningP2p as u64),
        ("STATE_RESUMING", DeviceState::Resuming as u64),
    ];
    for (name, value) in expected {
        assert_eq!(
            printed.get(name),
            Some(&value),
            "{name}: header says {:?}",
            printed.get(name)
        );
    }
    // Headers older than Linux 6.2 lack PRE_COPY; newer ones must agree.
    if let Some(pre_copy) = printed.get("PRE_COPY") {
        assert_eq!(*pre_copy, MIGRATION_PRE_COPY);
        assert_eq!(
            printed.get("STATE_PRE_COPY_P2P"),
            Some(&(DeviceState::PreCopyP2p as u64))
        );
    }
}
