//! The ioctl seam: every kernel call of the consumers goes through [`VfioIoctl`]. The real
//! implementation ([`KernelIoctl`]) calls the kernel; the test implementations in
//! `crate::fake` (feature `testing`) serve the same requests from the logging core in the
//! kernel dialect.
//!
//! A request is the struct the kernel would copy in (`arg`), plus the buffers its embedded
//! pointers point into (`lent`): START's range array, REPORT's bitmap. The kernel
//! reads and writes those through the pointers; a test implementation resolves each pointer
//! inside `lent` only, so a consumer that computes a wrong pointer or size gets
//! EFAULT, as from the kernel, instead of touching memory it did not lend.

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::os::raw::c_ulong;

use vmm_sys_util::ioctl::ioctl_with_mut_ptr;

#[cfg(feature = "testing")]
use dmalog::error::{LogError, LogResult};
#[cfg(feature = "testing")]
use dmalog::user_memory::{window_mut, UserMemory};

/// Which file descriptor an ioctl goes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IoctlTarget {
    /// The VFIO device fd (or the iommufd, for an iommufd seam).
    Device,
    /// A migration data fd returned by MIG_DEVICE_STATE.
    DataFd(RawFd),
}

/// An ioctl number (`_IO(type, nr)`), as `ioctl(2)` takes it.
pub type IoctlNr = c_ulong;

/// An ioctl failed with this errno.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("errno {0} ({msg})", msg = std::io::Error::from_raw_os_error(*.0))]
pub struct Errno(pub i32);

/// One ioctl request: where it goes, its number, the structure the kernel copies in and out
/// (`arg`), and the buffers the pointers inside `arg` point into (`lent`).
#[derive(Debug)]
pub struct IoctlCall<'a, 'b> {
    /// The file descriptor it goes to.
    pub target: IoctlTarget,
    /// The ioctl number.
    pub nr: IoctlNr,
    /// The whole structure (its size field at most `arg.len()`).
    pub arg: &'a mut [u8],
    /// The buffers `arg`'s embedded pointers point into (START's ranges, a REPORT bitmap).
    pub lent: &'a mut [&'b mut [u8]],
}

impl<'a, 'b> IoctlCall<'a, 'b> {
    /// A request on the device (or iommufd) fd whose structure has no embedded pointer.
    pub fn device(nr: IoctlNr, arg: &'a mut [u8]) -> Self {
        IoctlCall {
            target: IoctlTarget::Device,
            nr,
            arg,
            lent: &mut [],
        }
    }

    /// The same request sent to `target` instead.
    pub fn to(mut self, target: IoctlTarget) -> Self {
        self.target = target;
        self
    }

    /// The same request, lending `lent` to the pointers inside `arg`.
    pub fn lending(mut self, lent: &'a mut [&'b mut [u8]]) -> Self {
        self.lent = lent;
        self
    }
}

/// Issues ioctls. See the module documentation for `arg` and `lent`.
///
/// # Safety
///
/// Implementers promise what the kernel promises, because callers rely on it to stay
/// memory- and I/O-safe: an implementation reads and writes only `arg` and the buffers in
/// `lent` (never memory a pointer inside `arg` names outside them), and a file
/// descriptor it reports as created (MIG_DEVICE_STATE's `data_fd`) is a new descriptor in
/// this process's table that nothing else owns, so the caller may take ownership of it.
pub unsafe trait VfioIoctl: Send {
    /// Issues `call`; returns the ioctl's non-negative return value.
    ///
    /// # Safety
    ///
    /// `call.arg` holds the whole structure `call.nr` expects (its size field at most
    /// `arg.len()`); every user pointer stored in it points into one of `call.lent`, with
    /// room from there for every byte the request reads or writes through it (START: the
    /// `num_ranges` range entries; REPORT and GET_DIRTY_BITMAP: `ceil(length / page_size /
    /// 8)` bitmap bytes). For [`IoctlTarget::DataFd`], the fd is open for the whole call.
    /// The kernel does not check that user memory is meant for it: a wrong pointer or size
    /// makes it overwrite whatever lies there.
    unsafe fn ioctl(&mut self, call: IoctlCall<'_, '_>) -> Result<i32, Errno>;
}

/// The real kernel, through an open device (or iommufd) file descriptor.
#[derive(Debug)]
pub struct KernelIoctl {
    fd: OwnedFd,
}

impl KernelIoctl {
    /// Takes ownership of a device or iommufd file descriptor.
    pub fn new(fd: OwnedFd) -> Self {
        KernelIoctl { fd }
    }

    /// Opens a device path read-write (`/dev/vfio/devices/vfioN`, `/dev/iommu`).
    pub fn open(path: &std::path::Path) -> std::io::Result<Self> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)?;
        Ok(KernelIoctl { fd: file.into() })
    }

    /// The raw fd (to pass to `VFIO_DEVICE_BIND_IOMMUFD`).
    pub fn raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

// SAFETY: the kernel touches only the structures and buffers the request describes
// (which the caller vouches for) and returns fresh descriptors.
unsafe impl VfioIoctl for KernelIoctl {
    unsafe fn ioctl(&mut self, call: IoctlCall<'_, '_>) -> Result<i32, Errno> {
        let fd = match call.target {
            IoctlTarget::Device => self.fd.as_fd(),
            // SAFETY: by this function's contract a data fd stays open for the whole call,
            // and the borrow does not outlive it.
            IoctlTarget::DataFd(fd) => unsafe { BorrowedFd::borrow_raw(fd) },
        };
        // The kernel dereferences the pointers inside `arg`; they point into `lent`, which
        // stays mutably borrowed (alive, unaliased) until the call returns.
        let _ = &call.lent;
        // SAFETY: by this function's contract `arg` is a live, writable buffer holding the
        // whole structure the ioctl expects, and every pointer stored in it refers to a
        // slice of `lent`, mutably borrowed for this call with room for every byte the
        // request touches, so the kernel reads and writes only memory we own for the
        // call's duration.
        let ret = unsafe { ioctl_with_mut_ptr(&fd, call.nr, call.arg.as_mut_ptr()) };
        if ret < 0 {
            Err(Errno(vmm_sys_util::errno::Error::last().errno()))
        } else {
            Ok(ret)
        }
    }
}

/// [`UserMemory`] over the buffers a request lends: a user address resolves only inside one
/// of them, at its real address in this process. For the test implementations of the seam.
#[cfg(feature = "testing")]
pub struct BorrowedUserMemory<'r, 'b> {
    buffers: &'r mut [&'b mut [u8]],
}

#[cfg(feature = "testing")]
impl<'r, 'b> BorrowedUserMemory<'r, 'b> {
    /// Memory made of `buffers`.
    pub fn new(buffers: &'r mut [&'b mut [u8]]) -> Self {
        BorrowedUserMemory { buffers }
    }
}

#[cfg(feature = "testing")]
impl UserMemory for BorrowedUserMemory<'_, '_> {
    fn bytes_mut(&mut self, addr: u64, len: u64) -> LogResult<&mut [u8]> {
        self.buffers
            .iter_mut()
            .find_map(|buffer| {
                let base = buffer.as_ptr() as u64;
                window_mut(buffer, base, addr, len)
            })
            .ok_or(LogError::Fault { addr, len })
    }
}
