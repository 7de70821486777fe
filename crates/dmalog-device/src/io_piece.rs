//! Byte ranges of shared memory handed to the kernel for vectored socket I/O (`writev`
//! from guest memory, `readv` into it), so that pages move between a socket and guest
//! memory without a copy through a Rust buffer, and without a Rust reference to memory
//! another process writes.

use std::marker::PhantomData;
use std::os::fd::{AsFd, AsRawFd};

use crate::shared_memory::{
    bulk_copy, kernel_copy, volatile_is_zero, CopyFault, CopyPath, SharedMapping,
};

/// Which way the kernel copies a [`Piece`]: it reads an [`IoPiece`] (`writev`).
#[derive(Debug, Clone, Copy)]
pub enum KernelReads {}

/// Which way the kernel copies a [`Piece`]: it writes an [`IoPieceMut`] (`readv`).
#[derive(Debug, Clone, Copy)]
pub enum KernelWrites {}

/// A byte range of a [`SharedMapping`] (or, to be read, of a Rust buffer), borrowed for
/// `'a` so that the memory stays mapped; `D` says which way the kernel copies it. It is
/// never a Rust reference to shared memory: the kernel copies it (the bytes may change as
/// it does; the copy is then some mix of old and new, which page migration tolerates: a
/// page written during the copy is dirty again and sent again).
#[derive(Debug)]
pub struct Piece<'a, D> {
    ptr: *mut u8,
    len: usize,
    /// The mapping's copy path (a Rust buffer: `Direct`).
    path: CopyPath,
    _borrow: PhantomData<(&'a [u8], D)>,
}

// Copy whatever the direction (a derive would ask it of `D`).
impl<D> Clone for Piece<'_, D> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<D> Copy for Piece<'_, D> {}

/// A byte range for the kernel to read (`writev`).
pub type IoPiece<'a> = Piece<'a, KernelReads>;

/// A byte range of a writable mapping for the kernel to fill (`readv`).
pub type IoPieceMut<'a> = Piece<'a, KernelWrites>;

impl<D> Piece<'_, D> {
    /// Bytes in the piece.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the piece is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Hints the CPU to bring the piece's first cache line in (x86-64; nothing elsewhere):
    /// a loop that looks at many pages one after the other (the migration's zero-page
    /// check) then finds the next pages' first lines arriving instead of waiting on each
    /// in turn, as the hardware prefetcher does not cross pages. A hint only: it never
    /// faults, even on a mapping that shrank.
    pub fn prefetch(&self) {
        #[cfg(target_arch = "x86_64")]
        {
            use core::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
            // SAFETY: a prefetch reads nothing architecturally and never faults, whatever
            // the address.
            unsafe { _mm_prefetch::<_MM_HINT_T0>(self.ptr.cast_const().cast()) };
        }
    }

    /// The piece's first `n_bytes` (all of it when `n_bytes >= len`).
    pub fn take(self, n_bytes: usize) -> Self {
        Piece {
            len: self.len.min(n_bytes),
            ..self
        }
    }

    /// The piece without its first `n_bytes` (all of it when `n_bytes >= len`).
    pub fn skip(self, n_bytes: usize) -> Self {
        let n = n_bytes.min(self.len);
        Piece {
            // SAFETY: `n <= len`: the result stays inside (or one past the end of) the
            // borrowed range.
            ptr: unsafe { self.ptr.add(n) },
            len: self.len - n,
            ..self
        }
    }
}

/// After a vectored call moved `n_bytes` of `pieces[*first..]`: moves `*first` past the
/// pieces done and cuts the done head off the next one (a short `writev`/`readv`).
pub fn advance<D>(pieces: &mut [Piece<'_, D>], first: &mut usize, n_bytes: usize) {
    let mut n = n_bytes;
    while *first < pieces.len() && n >= pieces[*first].len() {
        n -= pieces[*first].len();
        *first += 1;
    }
    if n > 0 {
        pieces[*first] = pieces[*first].skip(n);
    }
}

impl<'a> IoPiece<'a> {
    /// A Rust buffer as a piece.
    pub fn from_bytes(bytes: &'a [u8]) -> Self {
        Piece {
            // The kernel only reads a `KernelReads` piece: the pointer is never written.
            ptr: bytes.as_ptr().cast_mut(),
            len: bytes.len(),
            path: CopyPath::Direct,
            _borrow: PhantomData,
        }
    }

    /// Copies the piece into `out` (exactly `len` bytes long): a bulk copy that takes bytes,
    /// not words, from a sealed mapping, the kernel's fault-tolerant copy from any other.
    pub fn copy_to(&self, out: &mut [u8]) -> Result<(), CopyFault> {
        if out.len() != self.len {
            return Err(CopyFault { copied_bytes: 0 });
        }
        match self.path {
            // SAFETY: the piece is `len` readable bytes kept mapped by the borrow `'a`, and
            // `out` is a separate Rust buffer of the same length.
            CopyPath::Direct => unsafe { bulk_copy(out.as_mut_ptr(), self.ptr, self.len, false) },
            // SAFETY: as above; the kernel only reads the mapping and writes `out`.
            CopyPath::Guarded => unsafe {
                return kernel_copy(self.ptr, out.as_mut_ptr(), self.len, false);
            },
        }
        Ok(())
    }

    /// Whether every byte of the piece is zero, read as it is now (another writer may
    /// change it right after): volatile loads from a sealed mapping, the kernel's
    /// fault-tolerant copy (4 KiB at a time) from any other.
    pub fn is_zero(&self) -> Result<bool, CopyFault> {
        match self.path {
            // SAFETY: the piece is `len` readable bytes kept mapped by the borrow `'a`.
            CopyPath::Direct => Ok(unsafe { volatile_is_zero(self.ptr, self.len) }),
            CopyPath::Guarded => {
                let mut chunk = [0u8; 4096];
                let mut rest = *self;
                while !rest.is_empty() {
                    let n = rest.len().min(chunk.len());
                    let head = Piece { len: n, ..rest };
                    head.copy_to(&mut chunk[..n])?;
                    if chunk[..n].iter().any(|&b| b != 0) {
                        return Ok(false);
                    }
                    rest = rest.skip(n);
                }
                Ok(true)
            }
        }
    }
}

impl IoPieceMut<'_> {
    /// Copies `data` (at most `len` bytes) to the start of the piece: a bulk copy of bytes,
    /// not words, into a sealed mapping, the kernel's fault-tolerant copy into any other.
    pub fn copy_from(&self, data: &[u8]) -> Result<(), CopyFault> {
        if data.len() > self.len {
            return Err(CopyFault { copied_bytes: 0 });
        }
        match self.path {
            // SAFETY: `data.len() <= len` writable bytes kept mapped by the borrow `'a`;
            // `data` is a separate Rust buffer.
            CopyPath::Direct => unsafe { bulk_copy(self.ptr, data.as_ptr(), data.len(), true) },
            // SAFETY: as above; the kernel only reads `data` and writes the mapping.
            CopyPath::Guarded => unsafe {
                return kernel_copy(self.ptr, data.as_ptr().cast_mut(), data.len(), true);
            },
        }
        Ok(())
    }
}

/// Most pieces one [`write_pieces`] or [`read_pieces`] call hands the kernel (Linux's
/// `IOV_MAX`).
pub const MAX_PIECES: usize = 1024;

/// The iovecs of the first [`MAX_PIECES`] of `pieces`, and how many.
fn iovec_table<D>(pieces: &[Piece<'_, D>]) -> ([libc::iovec; MAX_PIECES], libc::c_int) {
    let mut iovecs = [libc::iovec {
        iov_base: std::ptr::null_mut(),
        iov_len: 0,
    }; MAX_PIECES];
    let mut count = 0;
    for (iov, piece) in iovecs.iter_mut().zip(pieces) {
        *iov = libc::iovec {
            iov_base: piece.ptr.cast(),
            iov_len: piece.len,
        };
        count += 1;
    }
    (iovecs, count)
}

/// Repeats `call` (a `readv`/`writev`) while a signal interrupts it: its byte count, or
/// the OS error.
fn retry_interrupted(mut call: impl FnMut() -> libc::ssize_t) -> std::io::Result<usize> {
    loop {
        let n = call();
        if n >= 0 {
            return Ok(n as usize);
        }
        let err = std::io::Error::last_os_error();
        if err.kind() != std::io::ErrorKind::Interrupted {
            return Err(err);
        }
    }
}

/// One `writev` of up to [`MAX_PIECES`] of `pieces` to `fd`: the kernel copies the bytes
/// straight from guest memory into the socket. Returns the bytes written (a short write is
/// the caller's to continue with [`advance`]). A piece of a mapping whose file shrank
/// makes the call fail with EFAULT, never a signal (the kernel's user copies fail cleanly).
pub fn write_pieces(fd: impl AsFd, pieces: &[IoPiece<'_>]) -> std::io::Result<usize> {
    let (iovecs, count) = iovec_table(pieces);
    retry_interrupted(|| {
        // SAFETY: each iovec describes a piece that its borrow keeps mapped and readable
        // for its whole length; `writev` only reads them. `count <= IOV_MAX`.
        unsafe { libc::writev(fd.as_fd().as_raw_fd(), iovecs.as_ptr(), count) }
    })
}

/// One `readv` from `fd` into up to [`MAX_PIECES`] of `pieces`: the kernel copies socket
/// bytes straight into guest memory, as a device's DMA would. Returns the bytes read (0:
/// the end of the stream). A piece of a mapping whose file shrank makes the call fail
/// with EFAULT, never a signal.
pub fn read_pieces(fd: impl AsFd, pieces: &[IoPieceMut<'_>]) -> std::io::Result<usize> {
    let (iovecs, count) = iovec_table(pieces);
    retry_interrupted(|| {
        // SAFETY: each iovec describes a piece of a writable mapping that its borrow keeps
        // mapped for its whole length; no Rust reference to those bytes exists, so the
        // kernel's stores race with nothing the compiler assumes. `count <= IOV_MAX`.
        unsafe { libc::readv(fd.as_fd().as_raw_fd(), iovecs.as_ptr(), count) }
    })
}

impl SharedMapping {
    /// `len` bytes at `offset` as a piece for the kernel, `None` when out of bounds.
    fn piece_of<D>(&self, offset: usize, len: usize) -> Option<Piece<'_, D>> {
        if !self.in_bounds(offset, len) {
            return None;
        }
        Some(Piece {
            // SAFETY: `offset + len <= self.len` (checked): inside the mapping.
            ptr: unsafe { self.ptr.as_ptr().add(offset) },
            len,
            path: self.path,
            _borrow: PhantomData,
        })
    }

    /// `len` bytes at `offset` as a piece for [`write_pieces`]; `None` when out of bounds.
    pub fn piece(&self, offset: usize, len: usize) -> Option<IoPiece<'_>> {
        self.piece_of(offset, len)
    }

    /// `len` bytes at `offset` as a piece for [`read_pieces`]; `None` when out of bounds or
    /// read-only.
    pub fn piece_mut(&self, offset: usize, len: usize) -> Option<IoPieceMut<'_>> {
        if !self.writable {
            return None;
        }
        self.piece_of(offset, len)
    }
}

/// Pieces over a vm-memory guest region (feature `vm-memory`): a VMM on vm-memory sends its
/// guest pages with [`write_pieces`] and receives them with [`read_pieces`], and reads them
/// with volatile loads, as from a [`SharedMapping`].
///
/// Copies through these pieces are direct (volatile loads and stores), as vm-memory's own
/// accesses to the region are: the file behind it (if any) must not shrink, or a page past
/// its end raises SIGBUS, here as in vm-memory. Guest memory shared with a device server is
/// a memfd sealed against shrinking ([`crate::sealed_memfd`]). Bytes the kernel writes into
/// an [`IoPieceMut`] are not marked in the region's dirty bitmap.
#[cfg(feature = "vm-memory")]
mod vm_memory_region {
    use super::*;
    use vm_memory::bitmap::Bitmap;
    use vm_memory::GuestRegionMmap;
    // Only the unix mmap backend is built on: with vm-memory's `xen` feature a region's
    // pointer may be mapped on demand, and this import stops the build.
    #[allow(unused_imports)]
    use vm_memory::mmap::MmapRegionBuilder as _;

    /// `len` bytes at `offset` of `region`, `None` when out of bounds or not readable (a
    /// volatile load from the piece would fault).
    fn piece_of<D, B: Bitmap>(
        region: &GuestRegionMmap<B>,
        offset: usize,
        len: usize,
    ) -> Option<Piece<'_, D>> {
        if offset.checked_add(len)? > region.size() || region.prot() & libc::PROT_READ == 0 {
            return None;
        }
        Some(Piece {
            // SAFETY: `offset + len <= size` (checked): inside the region's mapping, which
            // vm-memory keeps mapped for `size` bytes at `as_ptr` while the region lives
            // (its own mmap, or one `build_raw`'s caller promised), and the borrow of
            // `region` keeps it alive. vm-memory hands out no Rust reference to it.
            ptr: unsafe { region.as_ptr().add(offset) },
            len,
            path: CopyPath::Direct,
            _borrow: PhantomData,
        })
    }

    impl<'a> IoPiece<'a> {
        /// `len` bytes at region offset `offset` of `region`, for [`write_pieces`] and
        /// volatile reads; `None` when out of bounds or the region is not mapped readable.
        /// See the module docs on the file.
        pub fn of_region<B: Bitmap>(
            region: &'a GuestRegionMmap<B>,
            offset: usize,
            len: usize,
        ) -> Option<Self> {
            piece_of(region, offset, len)
        }
    }

    impl<'a> IoPieceMut<'a> {
        /// `len` bytes at region offset `offset` of `region`, for [`read_pieces`]; `None`
        /// when out of bounds or the region is not mapped readable and writable. The
        /// kernel's writes are not marked in the region's bitmap.
        pub fn of_region<B: Bitmap>(
            region: &'a GuestRegionMmap<B>,
            offset: usize,
            len: usize,
        ) -> Option<Self> {
            if region.prot() & libc::PROT_WRITE == 0 {
                return None;
            }
            piece_of(region, offset, len)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn advance_passes_the_pieces_done_and_cuts_the_next() {
        let (a, b, c) = ([1u8; 3], [2u8; 4], [3u8; 5]);
        let mut pieces = [
            IoPiece::from_bytes(&a),
            IoPiece::from_bytes(&b),
            IoPiece::from_bytes(&c),
        ];
        let mut first = 0;
        advance(&mut pieces, &mut first, 5);
        assert_eq!((first, pieces[1].len()), (1, 2));
        let mut rest = [0u8; 2];
        pieces[1].copy_to(&mut rest).unwrap();
        assert_eq!(rest, [2, 2]);
        advance(&mut pieces, &mut first, 2);
        assert_eq!(
            (first, pieces[2].len()),
            (2, 5),
            "a piece done exactly is passed"
        );
        advance(&mut pieces, &mut first, 5);
        assert_eq!(first, 3);
    }

    /// Pieces over a vm-memory region see what vm-memory wrote and write what it reads,
    /// stay inside the region, and a read-only region gives no piece to fill.
    #[cfg(feature = "vm-memory")]
    #[test]
    fn pieces_over_a_vm_memory_region() {
        use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

        let memory =
            GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(1 << 20), 3 * 4096)]).unwrap();
        let region = memory.iter().next().unwrap();
        memory
            .write_slice(&[7, 8, 9], GuestAddress((1 << 20) + 4095))
            .unwrap();
        assert_eq!(
            IoPiece::of_region(region, 0, 4095).unwrap().is_zero(),
            Ok(true)
        );
        assert_eq!(
            IoPiece::of_region(region, 0, 4096).unwrap().is_zero(),
            Ok(false)
        );
        let mut out = [0u8; 3];
        IoPiece::of_region(region, 4095, 3)
            .unwrap()
            .copy_to(&mut out)
            .unwrap();
        assert_eq!(out, [7, 8, 9]);
        assert!(
            IoPiece::of_region(region, 2 * 4096, 4097).is_none(),
            "past the end"
        );
        assert!(
            IoPiece::of_region(region, usize::MAX, 2).is_none(),
            "overflow"
        );
        let (a, mut b) = std::os::unix::net::UnixStream::pair().unwrap();
        std::io::Write::write_all(&mut b, &[1, 2]).unwrap();
        let into = [IoPieceMut::of_region(region, 3 * 4096 - 2, 2).unwrap()];
        assert_eq!(read_pieces(&a, &into).unwrap(), 2);
        let mut back = [0u8; 2];
        memory
            .read_slice(&mut back, GuestAddress((1 << 20) + 3 * 4096 - 2))
            .unwrap();
        assert_eq!(back, [1, 2]);
        let n = write_pieces(&b, &[IoPiece::of_region(region, 4096, 2).unwrap()]).unwrap();
        assert_eq!(n, 2);
        let mut got = [0u8; 2];
        std::io::Read::read_exact(&mut &a, &mut got).unwrap();
        assert_eq!(got, [8, 9]);

        let region = vm_memory::mmap::MmapRegionBuilder::<()>::new(4096)
            .with_mmap_prot(libc::PROT_READ)
            .with_mmap_flags(libc::MAP_ANONYMOUS | libc::MAP_PRIVATE)
            .build()
            .unwrap();
        let region = vm_memory::GuestRegionMmap::new(region, GuestAddress(0)).unwrap();
        assert!(IoPieceMut::of_region(&region, 0, 1).is_none(), "read-only");
        assert!(IoPiece::of_region(&region, 0, 1).is_some());
        // vm-memory's builder maps PROT_NONE unless told otherwise: no piece to fault on.
        let region = vm_memory::mmap::MmapRegionBuilder::<()>::new(4096)
            .with_mmap_flags(libc::MAP_ANONYMOUS | libc::MAP_PRIVATE)
            .build()
            .unwrap();
        let region = vm_memory::GuestRegionMmap::new(region, GuestAddress(0)).unwrap();
        assert!(IoPiece::of_region(&region, 0, 1).is_none(), "not readable");
    }

    /// Copies out of and into a sealed mapping (the bulk path), short and long, at
    /// unaligned ends: exactly the bytes asked for move, none beside them.
    #[test]
    fn bulk_copies_move_exactly_the_bytes_of_the_piece() {
        use crate::shared_memory::{sealed_memfd, SharedMapping};
        let fd = sealed_memfd("t", 4 * 4096).unwrap();
        let map = SharedMapping::map(&fd, 0, 4 * 4096, true).unwrap();
        for (offset, len) in [(0, 16384), (3, 1023), (5, 1024), (4093, 5000), (1, 7)] {
            let pattern: Vec<u8> = (0..len).map(|i| (i * 13 + offset) as u8 | 1).collect();
            assert!(map.write(0, &[0u8; 4 * 4096]));
            let piece = map.piece_mut(offset, len).unwrap();
            piece.copy_from(&pattern).unwrap();
            let mut all = vec![0xeeu8; 4 * 4096];
            assert!(map.read(0, &mut all));
            assert!(
                all[offset..offset + len] == pattern[..],
                "{offset}+{len} in"
            );
            assert!(
                all[..offset]
                    .iter()
                    .chain(&all[offset + len..])
                    .all(|&b| b == 0),
                "{offset}+{len}: nothing beside"
            );
            let mut out = vec![0u8; len];
            map.piece(offset, len).unwrap().copy_to(&mut out).unwrap();
            assert!(out == pattern, "{offset}+{len} out");
            // `take` and `skip` cut the piece: its middle alone.
            let mut middle = vec![0u8; len / 2];
            let cut = map.piece(offset, len).unwrap().skip(len / 4).take(len / 2);
            cut.copy_to(&mut middle).unwrap();
            assert!(middle[..] == pattern[len / 4..len / 4 + len / 2]);
        }
    }
}
