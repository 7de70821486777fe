//! The uAPI layouts and constants: the project-defined structs against `vfio-bindings` 0.7
//! (the kernel structs are the crate's own types, their codecs checked in `uapi`'s unit
//! tests), and everything against the system `<linux/vfio.h>` compiled with the system C
//! compiler.

use std::mem::{offset_of, size_of};

use dmalog::uapi::*;
use vfio_bindings::bindings::vfio as vb;

#[path = "support/system_header.rs"]
mod system_header;

#[test]
fn device_states_match_vfio_bindings() {
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
    assert_eq!(
        FEATURE_RESERVED_MASK,
        !(vb::VFIO_DEVICE_FEATURE_MASK
            | vb::VFIO_DEVICE_FEATURE_GET
            | vb::VFIO_DEVICE_FEATURE_SET
            | vb::VFIO_DEVICE_FEATURE_PROBE)
    );
}

#[test]
fn project_defined_layouts_match_vfio_bindings() {
    // The feature header: `vfio_device_feature` without its flexible `data[]`.
    assert_eq!(
        size_of::<FeatureHeader>(),
        size_of::<vb::vfio_device_feature>()
    );
    assert_eq!(
        FEATURE_HEADER_BYTES,
        offset_of!(vb::vfio_device_feature, data)
    );
    assert_eq!(
        offset_of!(FeatureHeader, argsz),
        offset_of!(vb::vfio_device_feature, argsz)
    );
    assert_eq!(
        offset_of!(FeatureHeader, flags),
        offset_of!(vb::vfio_device_feature, flags)
    );
    // vfio-user's inline forms: the kernel's control without its `ranges` pointer, and the
    // kernel's report without its `bitmap` pointer.
    type Control = vb::vfio_device_feature_dma_logging_control;
    type Report = vb::vfio_device_feature_dma_logging_report;
    assert_eq!(USER_CONTROL_BYTES, 16);
    assert_eq!(USER_CONTROL_BYTES, offset_of!(Control, ranges));
    assert_eq!(USER_REPORT_BYTES, offset_of!(Report, bitmap));
    assert_eq!(
        offset_of!(UserLoggingReport, iova),
        offset_of!(Report, iova)
    );
    assert_eq!(
        offset_of!(UserLoggingReport, length),
        offset_of!(Report, length)
    );
    assert_eq!(
        offset_of!(UserLoggingReport, page_size),
        offset_of!(Report, page_size)
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
    let Some(printed) = system_header::printed_values("dmalog-uapi", C_PROGRAM) else {
        return;
    };
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
