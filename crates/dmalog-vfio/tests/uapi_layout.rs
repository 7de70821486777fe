//! Layouts and ioctl numbers of the kernel consumers: the project-defined forms against
//! `vfio-bindings` 0.7 and the kernel's documented iommufd sizes, and everything against the
//! system headers (compiled with `cc`; skipped
//! with a message when absent; definitions newer than the headers are skipped one by one).

use std::mem::{offset_of, size_of};

use dmalog::uapi::UapiStruct;
use dmalog_vfio::uapi::*;
use vfio_bindings::bindings::vfio as vb;

#[path = "../../dmalog/tests/support/system_header.rs"]
mod system_header;

#[test]
fn ioctl_numbers() {
    assert_eq!(VFIO_DEVICE_FEATURE, 0x3b75);
    assert_eq!(VFIO_DEVICE_BIND_IOMMUFD, 0x3b76);
    assert_eq!(VFIO_MIG_GET_PRECOPY_INFO, 0x3b79);
    // iommufd: IOMMUFD_CMD_HWPT_SET_DIRTY_TRACKING 0x8b, GET_DIRTY_BITMAP 0x8c (SPEC 7).
    assert_eq!(IOMMU_HWPT_SET_DIRTY_TRACKING, 0x3b8b);
    assert_eq!(IOMMU_HWPT_GET_DIRTY_BITMAP, 0x3b8c);
}

#[test]
fn vfio_layouts_match_vfio_bindings() {
    // The 16-byte BIND form is the binding up to its token pointer.
    let bind = bind_iommufd_request(0x33);
    assert_eq!(BIND_IOMMUFD_BYTES, 16);
    assert_eq!(
        bind[offset_of!(vb::vfio_device_bind_iommufd, argsz)],
        BIND_IOMMUFD_BYTES as u8
    );
    assert_eq!(
        bind[offset_of!(vb::vfio_device_bind_iommufd, iommufd)],
        0x33
    );
    assert_eq!(offset_of!(vb::vfio_device_bind_iommufd, out_devid), 12);
    assert_eq!(PRECOPY_INFO_BYTES, 24);
    let info = precopy_info(0x11, 0x22).encode();
    assert_eq!(info[0], PRECOPY_INFO_BYTES as u8, "argsz");
    assert_eq!((info[8], info[16]), (0x11, 0x22));
}

#[test]
fn iommufd_layouts_match_the_documented_sizes() {
    // include/uapi/linux/iommufd.h: iommu_hwpt_set_dirty_tracking is 16 bytes
    // {size, flags, hwpt_id, __reserved}; iommu_hwpt_get_dirty_bitmap is 48 bytes
    // {size, hwpt_id, flags, __reserved, iova, length, page_size, data}.
    assert_eq!(size_of::<SetDirtyTracking>(), 16);
    let set = SetDirtyTracking::new(true, 0x44).encode();
    assert_eq!(set.len(), 16);
    assert_eq!((set[0], set[4], set[8], set[12]), (16, 1, 0x44, 0));
    assert_eq!(SetDirtyTracking::new(false, 0x44).encode()[4], 0);
    assert_eq!(size_of::<GetDirtyBitmap>(), 48);
    let get = GetDirtyBitmap {
        size: 48,
        hwpt_id: 0x44,
        flags: 1,
        reserved: 0x99,
        iova: 0x55,
        length: 0x66,
        page_size: 0x77,
        data: 0x88,
    }
    .encode();
    assert_eq!(get.len(), 48);
    assert_eq!(
        (get[0], get[4], get[8], get[12], get[16], get[24], get[32], get[40]),
        (48, 0x44, 1, 0x99, 0x55, 0x66, 0x77, 0x88)
    );
    assert_eq!(GetDirtyBitmap::decode(&get).unwrap().data, 0x88);
}

const C_PROGRAM: &str = r#"
#include <stdio.h>
#include <stddef.h>
#include <linux/vfio.h>
#if defined(__has_include)
#if __has_include(<linux/iommufd.h>)
#include <linux/iommufd.h>
#endif
#endif
#define P(name, value) printf("%s %llu\n", name, (unsigned long long)(value))
int main(void) {
    P("VFIO_DEVICE_FEATURE", VFIO_DEVICE_FEATURE);
#ifdef VFIO_MIG_GET_PRECOPY_INFO
    P("VFIO_MIG_GET_PRECOPY_INFO", VFIO_MIG_GET_PRECOPY_INFO);
    P("sizeof_precopy_info", sizeof(struct vfio_precopy_info));
#endif
#ifdef VFIO_DEVICE_BIND_IOMMUFD
    P("VFIO_DEVICE_BIND_IOMMUFD", VFIO_DEVICE_BIND_IOMMUFD);
    P("bind_out_devid", offsetof(struct vfio_device_bind_iommufd, out_devid));
#endif
#ifdef IOMMU_HWPT_GET_DIRTY_BITMAP
    P("IOMMU_HWPT_SET_DIRTY_TRACKING", IOMMU_HWPT_SET_DIRTY_TRACKING);
    P("IOMMU_HWPT_GET_DIRTY_BITMAP", IOMMU_HWPT_GET_DIRTY_BITMAP);
    P("sizeof_set_dirty", sizeof(struct iommu_hwpt_set_dirty_tracking));
    P("sizeof_get_dirty", sizeof(struct iommu_hwpt_get_dirty_bitmap));
#endif
    return 0;
}
"#;

#[test]
fn numbers_match_the_system_headers_where_they_exist() {
    let Some(printed) = system_header::printed_values("dmalog-vfio-uapi", C_PROGRAM) else {
        return;
    };
    assert_eq!(printed["VFIO_DEVICE_FEATURE"], VFIO_DEVICE_FEATURE);
    let optional: [(&str, u64); 8] = [
        ("VFIO_MIG_GET_PRECOPY_INFO", VFIO_MIG_GET_PRECOPY_INFO),
        ("sizeof_precopy_info", PRECOPY_INFO_BYTES as u64),
        ("VFIO_DEVICE_BIND_IOMMUFD", VFIO_DEVICE_BIND_IOMMUFD),
        ("bind_out_devid", 12),
        (
            "IOMMU_HWPT_SET_DIRTY_TRACKING",
            IOMMU_HWPT_SET_DIRTY_TRACKING,
        ),
        ("IOMMU_HWPT_GET_DIRTY_BITMAP", IOMMU_HWPT_GET_DIRTY_BITMAP),
        ("sizeof_set_dirty", SET_DIRTY_TRACKING_BYTES as u64),
        ("sizeof_get_dirty", GET_DIRTY_BITMAP_BYTES as u64),
    ];
    let mut checked = 1;
    for (name, ours) in optional {
        match printed.get(name) {
            Some(&theirs) => {
                assert_eq!(theirs, ours, "{name}");
                checked += 1;
            }
            None => eprintln!("SKIPPED {name}: the system header predates it"),
        }
    }
    eprintln!("{checked} values checked against the system headers");
}
