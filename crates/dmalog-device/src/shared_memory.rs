//! Memory shared with another process (guest memory mapped from a DMA_MAP fd, a region
//! mmapped by the client): mmap, munmap, and copies in and out through raw pointers, never
//! through `&[u8]` (the other process writes it concurrently, so no Rust reference may
//! claim it is unchanging). The only `unsafe` of the device crate lives here.
//!
//! # Files that shrink (SPEC 8)
//! A page of a shared file mapping past the file's end raises SIGBUS when touched, and the
//! peer that shared the file can `ftruncate` it at any time. So each mapping takes one of
//! two copy paths, chosen when it is made:
//! - **direct**: the file is a memfd on tmpfs sealed with `F_SEAL_SHRINK` (a seal cannot be
//!   removed) and the mapping lies inside it: nothing can ever put a mapped page past the
//!   end, so copies are plain volatile loads and stores (the fast path). Files dmalog
//!   creates and hands out come from [`sealed_memfd`] (shrink, grow and the seals sealed).
//!   hugetlbfs memfds are excluded: there a fault can SIGBUS when the huge page pool is
//!   empty.
//! - **guarded**: anything else (an unsealed memfd, a regular file). Copies go through the
//!   kernel, `process_vm_writev`/`process_vm_readv` on our own pid with our own mapping as
//!   the "remote" side: the kernel resolves the pages with get_user_pages, and a page past
//!   the end of the file makes the call stop with a short count or EFAULT instead of a
//!   signal. The copy before the fault is done and reported ([`CopyFault::copied_bytes`]).
//!   Cost: one syscall per copy (per DMA piece; dma-engine ops copy 64 KiB pieces) plus page
//!   pinning; see the crate's measurements. Where a sandbox forbids these syscalls a
//!   guarded mapping cannot be made (its error is returned: seal the file instead).

use std::os::fd::{AsFd, OwnedFd};
use std::ptr::NonNull;
use std::sync::OnceLock;

/// How copies reach a mapping (see the module documentation).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CopyPath {
    /// Volatile loads and stores: the file cannot shrink under the mapping.
    Direct,
    /// Through the kernel (`process_vm_readv`/`writev`): a shrunk file gives a fault, not
    /// a signal.
    Guarded,
}

/// A copy that stopped early: out of bounds, read-only, or a page that is gone (the file
/// shrank). The first `copied_bytes` bytes were copied.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("shared memory copy stopped after {copied_bytes} bytes")]
pub struct CopyFault {
    /// Bytes copied before the fault.
    pub copied_bytes: usize,
}

/// `TMPFS_MAGIC` from `linux/magic.h`: memfds that are not hugetlbfs live on tmpfs.
const TMPFS_MAGIC: u64 = 0x0102_1994;

/// A memfd of `len_bytes` sealed against shrinking, growing and further seal changes: a
/// file dmalog can hand to a peer (a region fd) and map itself without any SIGBUS risk.
pub fn sealed_memfd(name: &str, len_bytes: u64) -> std::io::Result<OwnedFd> {
    let fd = rustix::fs::memfd_create(
        name,
        rustix::fs::MemfdFlags::CLOEXEC | rustix::fs::MemfdFlags::ALLOW_SEALING,
    )?;
    rustix::fs::ftruncate(&fd, len_bytes)?;
    rustix::fs::fcntl_add_seals(
        &fd,
        rustix::fs::SealFlags::SHRINK | rustix::fs::SealFlags::GROW | rustix::fs::SealFlags::SEAL,
    )?;
    Ok(fd)
}

/// The copy path for `len` bytes of `fd` at `offset`: direct only when the file can never
/// shrink below the mapping's end.
fn copy_path_for(fd: impl AsFd, offset: u64, len: usize) -> CopyPath {
    let fd = fd.as_fd();
    let sealed = rustix::fs::fcntl_get_seals(fd)
        .is_ok_and(|seals| seals.contains(rustix::fs::SealFlags::SHRINK));
    let on_tmpfs = rustix::fs::fstatfs(fd).is_ok_and(|st| st.f_type as u64 == TMPFS_MAGIC);
    let inside = rustix::fs::fstat(fd).is_ok_and(|st| {
        offset
            .checked_add(len as u64)
            .is_some_and(|end| end <= st.st_size as u64)
    });
    if sealed && on_tmpfs && inside {
        CopyPath::Direct
    } else {
        CopyPath::Guarded
    }
}

impl CopyPath {
    /// The path copies to a shared mapping of `len` bytes of `fd` at `offset` take: direct
    /// only when the file can never shrink below the mapping's end (a memfd on tmpfs sealed
    /// with `F_SEAL_SHRINK`, as [`sealed_memfd`] makes).
    pub fn for_file(fd: impl AsFd, offset: u64, len: usize) -> CopyPath {
        copy_path_for(fd, offset, len)
    }
}

/// Whether `process_vm_readv` works in this process (a sandbox may forbid it); probed once
/// on a local byte.
fn kernel_copy_available() -> std::io::Result<()> {
    static PROBE: OnceLock<Option<i32>> = OnceLock::new();
    let failed = *PROBE.get_or_init(|| {
        let source = 0x5au8;
        let mut target = 0u8;
        let local = libc::iovec {
            iov_base: (&raw mut target).cast(),
            iov_len: 1,
        };
        let remote = libc::iovec {
            iov_base: (&raw const source).cast_mut().cast(),
            iov_len: 1,
        };
        // SAFETY: both iovecs describe one live local byte each; the kernel writes only
        // `target` (through the local iovec) and reads only `source`.
        let n = unsafe { libc::process_vm_readv(libc::getpid(), &local, 1, &remote, 1, 0) };
        (n != 1).then(|| {
            std::io::Error::last_os_error()
                .raw_os_error()
                .unwrap_or(libc::EPERM)
        })
    });
    match failed {
        None => Ok(()),
        Some(errno) => Err(std::io::Error::from_raw_os_error(errno)),
    }
}

/// A shared mapping of `len` bytes, unmapped on drop.
#[derive(Debug)]
pub struct SharedMapping {
    pub(crate) ptr: NonNull<u8>,
    len: usize,
    pub(crate) writable: bool,
    pub(crate) path: CopyPath,
}

// SAFETY: the mapping is plain shared memory with no thread affinity; all access goes
// through the copy functions below, which take raw pointers and tolerate concurrent writers.
unsafe impl Send for SharedMapping {}
// SAFETY: as above: `&SharedMapping` only allows copies through raw pointers.
unsafe impl Sync for SharedMapping {}

impl SharedMapping {
    /// Maps `len` bytes of `fd` at `offset`, shared, readable and (if `writable`) writable.
    /// The copy path (direct or guarded) follows from the file's seals (module docs).
    pub fn map(fd: impl AsFd, offset: u64, len: usize, writable: bool) -> std::io::Result<Self> {
        Self::map_with(fd, offset, len, writable, false)
    }

    /// As [`SharedMapping::map`], faulting every page in now (guest memory that is about to
    /// be copied whole should not pay page faults on the way).
    pub fn map_populated(
        fd: impl AsFd,
        offset: u64,
        len: usize,
        writable: bool,
    ) -> std::io::Result<Self> {
        Self::map_with(fd, offset, len, writable, true)
    }

    fn map_with(
        fd: impl AsFd,
        offset: u64,
        len: usize,
        writable: bool,
        populate: bool,
    ) -> std::io::Result<Self> {
        if len == 0 {
            return Err(std::io::Error::from_raw_os_error(libc::EINVAL));
        }
        let path = copy_path_for(&fd, offset, len);
        if path == CopyPath::Guarded {
            kernel_copy_available()?;
        }
        let prot = if writable {
            rustix::mm::ProtFlags::READ | rustix::mm::ProtFlags::WRITE
        } else {
            rustix::mm::ProtFlags::READ
        };
        let flags = if populate {
            rustix::mm::MapFlags::SHARED | rustix::mm::MapFlags::POPULATE
        } else {
            rustix::mm::MapFlags::SHARED
        };
        // SAFETY: a fresh mapping chosen by the kernel (null hint) overlaps no Rust object;
        // `len` is non-zero; the result is checked before use.
        let ptr = unsafe { rustix::mm::mmap(std::ptr::null_mut(), len, prot, flags, fd, offset) }?;
        let ptr = NonNull::new(ptr.cast::<u8>())
            .ok_or_else(|| std::io::Error::from_raw_os_error(libc::ENOMEM))?;
        Ok(SharedMapping {
            ptr,
            len,
            writable,
            path,
        })
    }

    /// Bytes mapped.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Never empty (mapping zero bytes is refused).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Whether writes are allowed.
    pub fn writable(&self) -> bool {
        self.writable
    }

    /// How copies reach this mapping.
    pub fn copy_path(&self) -> CopyPath {
        self.path
    }

    pub(crate) fn in_bounds(&self, offset: usize, count: usize) -> bool {
        offset.checked_add(count).is_some_and(|end| end <= self.len)
    }

    /// Copies `data` to `offset`; stops at the first page that is gone (a shrunk file) with
    /// the bytes copied before it. Out of bounds or read-only: nothing is copied.
    pub fn try_write(&self, offset: usize, data: &[u8]) -> Result<(), CopyFault> {
        if !self.writable || !self.in_bounds(offset, data.len()) {
            return Err(CopyFault { copied_bytes: 0 });
        }
        // SAFETY: `offset + data.len() <= len` was checked, so the destination lies inside
        // the live mapping (it stays mapped while `self` is borrowed).
        let dst = unsafe { self.ptr.as_ptr().add(offset) };
        match self.path {
            // SAFETY: the destination is `data.len()` bytes inside the mapping (above), the
            // file is sealed against shrinking so every page stays backed, and `data` is a
            // separate Rust buffer, so the ranges cannot overlap.
            CopyPath::Direct => unsafe { volatile_store(dst, data.as_ptr(), data.len()) },
            // SAFETY: `dst` is in bounds (above); with `to_mapping` the kernel only reads
            // `data`, never writes it.
            CopyPath::Guarded => unsafe {
                return kernel_copy(dst, data.as_ptr().cast_mut(), data.len(), true);
            },
        }
        Ok(())
    }

    /// Copies `out.len()` bytes from `offset` into `out`, as [`SharedMapping::try_write`].
    pub fn try_read(&self, offset: usize, out: &mut [u8]) -> Result<(), CopyFault> {
        if !self.in_bounds(offset, out.len()) {
            return Err(CopyFault { copied_bytes: 0 });
        }
        // SAFETY: in bounds (checked above).
        let src = unsafe { self.ptr.as_ptr().add(offset) };
        match self.path {
            // SAFETY: the source is `out.len()` bytes inside the sealed mapping (above) and
            // `out` is a separate Rust buffer, so the ranges cannot overlap.
            CopyPath::Direct => unsafe { volatile_load(out.as_mut_ptr(), src, out.len()) },
            // SAFETY: `src` is in bounds (above) and only read; `out` is ours to write.
            CopyPath::Guarded => unsafe {
                return kernel_copy(src, out.as_mut_ptr(), out.len(), false);
            },
        }
        Ok(())
    }

    /// Copies `data` to `offset`; false when out of bounds, read-only or faulted (see
    /// [`SharedMapping::try_write`] for how much was copied).
    pub fn write(&self, offset: usize, data: &[u8]) -> bool {
        self.try_write(offset, data).is_ok()
    }

    /// Copies `out.len()` bytes from `offset` into `out`; false when out of bounds or
    /// faulted.
    pub fn read(&self, offset: usize, out: &mut [u8]) -> bool {
        self.try_read(offset, out).is_ok()
    }
}

impl SharedMapping {
    /// Whether the `len` bytes at `offset` are all zero, read as they are now (another
    /// writer may change them right after); `None` when out of bounds or faulted.
    pub fn is_zero(&self, offset: usize, len: usize) -> Option<bool> {
        if !self.in_bounds(offset, len) {
            return None;
        }
        if self.path == CopyPath::Guarded {
            let mut chunk = [0u8; 4096];
            let mut done = 0;
            while done < len {
                let n = (len - done).min(chunk.len());
                self.try_read(offset + done, &mut chunk[..n]).ok()?;
                if chunk[..n].iter().any(|&b| b != 0) {
                    return Some(false);
                }
                done += n;
            }
            return Some(true);
        }
        // SAFETY: in bounds (checked) of the sealed mapping (direct path).
        let start = unsafe { self.ptr.as_ptr().add(offset) };
        // SAFETY: `len` readable bytes at `start`, kept mapped by `&self`.
        Some(unsafe { volatile_is_zero(start, len) })
    }
}

/// Whether `len` bytes at `src` are zero, with volatile loads (8-byte words between byte
/// head and tail), stopping at the first non-zero word.
///
/// # Safety
/// `src` is valid for `len` bytes of reads.
pub(crate) unsafe fn volatile_is_zero(src: *const u8, len: usize) -> bool {
    let head = src.align_offset(8).min(len);
    let words = (len - head) / 8;
    // SAFETY (all loops): every index is below `len`; word loads at `src + head + 8k` are
    // 8-aligned by the choice of `head`.
    unsafe {
        for i in 0..head {
            if src.add(i).read_volatile() != 0 {
                return false;
            }
        }
        let src_words = src.add(head).cast::<u64>();
        let mut k = 0;
        // Four words a round, or-ed: one branch per 32 bytes.
        while k + 4 <= words {
            let any = src_words.add(k).read_volatile()
                | src_words.add(k + 1).read_volatile()
                | src_words.add(k + 2).read_volatile()
                | src_words.add(k + 3).read_volatile();
            if any != 0 {
                return false;
            }
            k += 4;
        }
        while k < words {
            if src_words.add(k).read_volatile() != 0 {
                return false;
            }
            k += 1;
        }
        for i in head + 8 * words..len {
            if src.add(i).read_volatile() != 0 {
                return false;
            }
        }
    }
    true
}

/// Copies `len` bytes from a Rust buffer to shared memory with volatile stores: aligned
/// 8-byte words between byte-wise head and tail. Volatile, because another process reads
/// and writes this memory behind the compiler's back: no access may be elided, merged,
/// or assumed to see what was last stored (DESIGN.md, invariant 2). Sound with that
/// concurrent writer: no Rust reference to the shared bytes ever exists, only these raw
/// volatile accesses (the accepted way to touch memory changed outside the program), and
/// whatever mix of old and new bytes they see is valid data (u8 and u64 have no invalid
/// values).
///
/// # Safety
/// `dst` is valid for `len` bytes of writes, `src` for `len` bytes of reads, and the two
/// do not overlap.
pub(crate) unsafe fn volatile_store(dst: *mut u8, src: *const u8, len: usize) {
    let head = dst.align_offset(8).min(len);
    let words = (len - head) / 8;
    // SAFETY (all three loops): every index is below `len`, inside both buffers as the
    // caller promised; word stores are at `dst + head + 8k`, 8-aligned by the choice of
    // `head`; word loads from `src` are unaligned reads of a plain Rust buffer.
    unsafe {
        for i in 0..head {
            dst.add(i).write_volatile(src.add(i).read());
        }
        let (dst_words, src_words) = (dst.add(head).cast::<u64>(), src.add(head));
        let mut k = 0;
        // One word a round: unrolling or 16-byte SSE stores measured no faster (the
        // stores are bandwidth-bound; memcpy's edge is `rep movsb` avoiding line reads).
        while k < words {
            let word = src_words.add(8 * k).cast::<u64>().read_unaligned();
            dst_words.add(k).write_volatile(word);
            k += 1;
        }
        for i in head + 8 * words..len {
            dst.add(i).write_volatile(src.add(i).read());
        }
    }
}

/// Copies `len` bytes from shared memory to a Rust buffer with volatile loads (as
/// [`volatile_store`], mirrored).
///
/// # Safety
/// `src` is valid for `len` bytes of reads, `dst` for `len` bytes of writes, no overlap.
pub(crate) unsafe fn volatile_load(dst: *mut u8, src: *const u8, len: usize) {
    let head = src.align_offset(8).min(len);
    let words = (len - head) / 8;
    // SAFETY (all three loops): indexes below `len`, inside both buffers; word loads at
    // `src + head + 8k` are 8-aligned; word stores into the Rust buffer are unaligned.
    unsafe {
        for i in 0..head {
            dst.add(i).write(src.add(i).read_volatile());
        }
        let (src_words, dst_words) = (src.add(head).cast::<u64>(), dst.add(head));
        let mut k = 0;
        while k < words {
            let word = src_words.add(k).read_volatile();
            dst_words.add(8 * k).cast::<u64>().write_unaligned(word);
            k += 1;
        }
        for i in head + 8 * words..len {
            dst.add(i).write(src.add(i).read_volatile());
        }
    }
}

/// Copies `len` bytes between shared memory and a Rust buffer (either way) for bulk data
/// whose readers take bytes, not words (guest pages a migration moves: a page torn by a
/// concurrent write is dirty again and sent again). On x86-64 one `rep movsb`, the CPU's
/// string copy, which the kernel's own copies use: it moves whole cache lines and, into
/// cold memory, does not read the lines it overwrites (measured: the word loops above
/// run about 1.4x slower on 1 GiB of guest memory). An `asm!` block is as opaque to the
/// compiler as a volatile access: it is never elided, merged or assumed to see what was
/// stored, so the concurrent writer is no data race in Rust's sense. Elsewhere, and for
/// short copies (where the string copy's start-up costs more than it saves), the volatile
/// word loops: `to_shared` picks [`volatile_store`] or [`volatile_load`].
///
/// # Safety
/// `dst` is valid for `len` bytes of writes, `src` for `len` bytes of reads, no overlap.
pub(crate) unsafe fn bulk_copy(dst: *mut u8, src: *const u8, len: usize, to_shared: bool) {
    /// Below this, the word loops.
    const STRING_COPY_BYTES: usize = 1024;
    #[cfg(target_arch = "x86_64")]
    if len >= STRING_COPY_BYTES {
        // SAFETY: `rep movsb` copies `rcx` bytes from `rsi` to `rdi` upwards (the ABI
        // keeps the direction flag clear), inside the buffers the caller vouches for; it
        // touches no stack and no flags.
        unsafe {
            core::arch::asm!(
                "rep movsb",
                inout("rcx") len => _,
                inout("rdi") dst => _,
                inout("rsi") src => _,
                options(nostack, preserves_flags),
            );
        }
        return;
    }
    // SAFETY: the caller's promise, passed on.
    unsafe {
        if to_shared {
            volatile_store(dst, src, len)
        } else {
            volatile_load(dst, src, len)
        }
    }
}

/// Copies `len` bytes between our mapping at `mapped` and a Rust buffer at `buffer`
/// through the kernel (`to_mapping`: buffer -> mapping, else mapping -> buffer). The kernel
/// resolves the mapping's pages itself, so a page past the end of a shrunk file ends the
/// copy with a short count or EFAULT instead of SIGBUS.
///
/// # Safety
/// `mapped` is valid for `len` bytes inside one of our shared mappings (written only when
/// `to_mapping`), `buffer` for `len` bytes of a Rust buffer (written only when not): the
/// kernel writes wherever the destination iovec points.
pub(crate) unsafe fn kernel_copy(
    mapped: *mut u8,
    buffer: *mut u8,
    len: usize,
    to_mapping: bool,
) -> Result<(), CopyFault> {
    let mut copied = 0usize;
    while copied < len {
        let local = libc::iovec {
            // SAFETY: `copied < len`: inside the caller's buffer.
            iov_base: unsafe { buffer.add(copied) }.cast(),
            iov_len: len - copied,
        };
        let remote = libc::iovec {
            // SAFETY: `copied < len`: inside the caller's in-bounds range of the mapping.
            iov_base: unsafe { mapped.add(copied) }.cast(),
            iov_len: len - copied,
        };
        // SAFETY: the iovecs describe exactly the caller's buffer and an in-bounds range of
        // our own live mapping; the kernel writes only the destination one (the mapping
        // for writev, the Rust buffer for readv) and fails cleanly on unbacked pages.
        let n = unsafe {
            if to_mapping {
                libc::process_vm_writev(libc::getpid(), &local, 1, &remote, 1, 0)
            } else {
                libc::process_vm_readv(libc::getpid(), &local, 1, &remote, 1, 0)
            }
        };
        if n <= 0 {
            if n < 0 && std::io::Error::last_os_error().raw_os_error() == Some(libc::EINTR) {
                continue;
            }
            return Err(CopyFault {
                copied_bytes: copied,
            });
        }
        copied += n as usize;
    }
    Ok(())
}

impl Drop for SharedMapping {
    fn drop(&mut self) {
        // SAFETY: `ptr`/`len` describe exactly the mapping created in `map`, and no copy can
        // be running: they borrow `self`, which is being dropped.
        let _ = unsafe { rustix::mm::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io_piece::{read_pieces, write_pieces, IoPiece};

    #[test]
    fn copies_stay_inside_the_mapping() {
        let fd = rustix::fs::memfd_create("t", rustix::fs::MemfdFlags::CLOEXEC).unwrap();
        rustix::fs::ftruncate(&fd, 8192).unwrap();
        let map = SharedMapping::map(&fd, 4096, 4096, true).unwrap();
        assert!(map.write(4000, &[7u8; 96]));
        assert!(!map.write(4001, &[7u8; 96]), "one byte past the end");
        assert!(!map.write(usize::MAX, &[1]), "overflowing offset");
        let mut out = [0u8; 96];
        assert!(map.read(4000, &mut out));
        assert_eq!(out, [7u8; 96]);
        // Another mapping of the same fd sees the write (it is shared memory).
        let other = SharedMapping::map(&fd, 0, 8192, false).unwrap();
        let mut byte = [0u8; 1];
        assert!(other.read(4096 + 4000, &mut byte));
        assert_eq!(byte[0], 7);
        assert!(!other.write(0, &[1]), "read-only mapping");
    }

    #[test]
    fn sealed_memfds_take_the_direct_path_and_others_the_guarded_one() {
        let sealed = sealed_memfd("t", 8192).unwrap();
        assert!(rustix::fs::ftruncate(&sealed, 0).is_err());
        let map = SharedMapping::map(&sealed, 0, 8192, true).unwrap();
        assert_eq!(map.copy_path(), CopyPath::Direct);
        let plain = rustix::fs::memfd_create("t", rustix::fs::MemfdFlags::CLOEXEC).unwrap();
        rustix::fs::ftruncate(&plain, 8192).unwrap();
        assert_eq!(
            SharedMapping::map(&plain, 0, 8192, true)
                .unwrap()
                .copy_path(),
            CopyPath::Guarded
        );
        // Sealed, but the mapping reaches past the end of the file: guarded.
        assert_eq!(
            SharedMapping::map(&sealed, 4096, 8192, true)
                .unwrap()
                .copy_path(),
            CopyPath::Guarded
        );
    }

    /// Every alignment and length around the 8-byte words, on both paths.
    #[test]
    fn copies_are_exact_at_every_alignment() {
        let sealed = sealed_memfd("t", 4096).unwrap();
        let plain = rustix::fs::memfd_create("t", rustix::fs::MemfdFlags::CLOEXEC).unwrap();
        rustix::fs::ftruncate(&plain, 4096).unwrap();
        for fd in [&sealed, &plain] {
            let map = SharedMapping::map(fd, 0, 4096, true).unwrap();
            let source: Vec<u8> = (0..64u8).map(|i| i.wrapping_mul(37) | 1).collect();
            for offset in 0..17 {
                for len in 0..40 {
                    let zeros = [0u8; 128];
                    assert!(map.write(0, &zeros));
                    assert!(map.write(offset, &source[1..1 + len]));
                    let mut back = [0u8; 128];
                    assert!(map.read(0, &mut back[1..]));
                    let mut expect = [0u8; 128];
                    expect[1 + offset..1 + offset + len].copy_from_slice(&source[1..1 + len]);
                    assert_eq!(back, expect, "offset {offset} len {len}");
                }
            }
        }
    }

    /// An unsealed file shrunk under the mapping: a copy stops at the lost page with the
    /// bytes before it copied, and no SIGBUS.
    #[test]
    fn a_shrunk_unsealed_file_faults_instead_of_signalling() {
        let fd = rustix::fs::memfd_create("t", rustix::fs::MemfdFlags::CLOEXEC).unwrap();
        rustix::fs::ftruncate(&fd, 4 * 4096).unwrap();
        let map = SharedMapping::map(&fd, 0, 4 * 4096, true).unwrap();
        assert_eq!(map.copy_path(), CopyPath::Guarded);
        assert!(map.write(0, &[1u8; 4 * 4096]));
        rustix::fs::ftruncate(&fd, 4096 + 100).unwrap();
        // Page 1 still exists (the file ends inside it); pages 2 and 3 are gone.
        assert_eq!(
            map.try_write(4000, &[2u8; 8000]),
            Err(CopyFault {
                copied_bytes: 2 * 4096 - 4000
            })
        );
        let mut out = [0u8; 4096];
        assert_eq!(
            map.try_read(3 * 4096, &mut out),
            Err(CopyFault { copied_bytes: 0 })
        );
        let mut head = [0u8; 8];
        rustix::io::pread(&fd, &mut head, 4000).unwrap();
        assert_eq!(head, [2u8; 8], "the bytes before the fault were written");
    }

    #[test]
    fn pieces_are_written_whole_and_zero_pages_are_seen() {
        let sealed = sealed_memfd("t", 3 * 4096).unwrap();
        let plain = rustix::fs::memfd_create("t", rustix::fs::MemfdFlags::CLOEXEC).unwrap();
        rustix::fs::ftruncate(&plain, 3 * 4096).unwrap();
        for fd in [&sealed, &plain] {
            let map = SharedMapping::map(fd, 0, 3 * 4096, true).unwrap();
            assert_eq!(map.is_zero(0, 3 * 4096), Some(true));
            assert!(map.write(4096 + 4095, &[9]));
            assert_eq!(map.is_zero(0, 4096), Some(true));
            assert_eq!(map.is_zero(4096, 4096), Some(false), "the last byte counts");
            assert_eq!(map.is_zero(4096 + 4095, 1), Some(false));
            assert_eq!(map.is_zero(8192, 4097), None, "out of bounds");
            // The same through pieces; 8 KiB takes the guarded path's second 4 KiB chunk.
            assert_eq!(map.piece(0, 4096).unwrap().is_zero(), Ok(true));
            assert_eq!(map.piece(0, 8192).unwrap().is_zero(), Ok(false));
            assert_eq!(map.piece(4096 + 4095, 1).unwrap().is_zero(), Ok(false));
            assert!(map.piece(8192, 4097).is_none());
            let head = [1u8, 2, 3];
            let pieces = [
                IoPiece::from_bytes(&head),
                map.piece(4096 + 4094, 2).unwrap(),
                map.piece(0, 5).unwrap().skip(3),
            ];
            let (mut a, b) = std::os::unix::net::UnixStream::pair().unwrap();
            let n = write_pieces(&b, &pieces).unwrap();
            assert_eq!(n, 7);
            let mut got = [0u8; 7];
            std::io::Read::read_exact(&mut a, &mut got).unwrap();
            assert_eq!(got, [1, 2, 3, 0, 9, 0, 0]);
            let (c, mut d) = std::os::unix::net::UnixStream::pair().unwrap();
            std::io::Write::write_all(&mut d, &[4, 5, 6]).unwrap();
            let into = [
                map.piece_mut(12001, 1).unwrap(),
                map.piece_mut(11999, 2).unwrap(),
            ];
            assert_eq!(read_pieces(&c, &into).unwrap(), 3);
            let mut back = [0u8; 3];
            assert!(map.read(11999, &mut back));
            assert_eq!(back, [5, 6, 4]);
            assert!(map.piece_mut(8192, 4097).is_none());
            map.piece_mut(100, 3)
                .unwrap()
                .skip(1)
                .copy_from(&[8, 9])
                .unwrap();
            assert!(map.piece_mut(100, 3).unwrap().copy_from(&[1; 4]).is_err());
            assert!(map.read(99, &mut back));
            assert_eq!(back, [0, 0, 8]);
            let mut copy = [0u8; 2];
            pieces[1].copy_to(&mut copy).unwrap();
            assert_eq!(copy, [0, 9]);
            assert!(pieces[1].copy_to(&mut [0u8; 3]).is_err(), "length differs");
        }
    }
}
