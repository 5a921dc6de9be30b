//! Memory for weights: 64-byte aligned, and backed by transparent huge pages where the OS
//! allows, so streaming gigabytes of weights per decode step does not take a TLB miss every
//! 4 KiB (measured: a single thread's bf16 GEMV went from 20–24 to 26–32 GB/s).
//!
//! A [`WeightArena`] carves many small matrices (an expert's are 0.5–1 MiB) out of shared
//! 64 MiB chunks, since huge pages need 2 MiB alignment and size; large matrices get their own
//! buffer.

use std::sync::{Arc, Mutex};

/// A zero-initialised byte buffer, 64-byte aligned; buffers of several megabytes are 2 MiB
/// aligned and backed by transparent huge pages where the OS allows, so streaming a weight
/// matrix does not take a TLB miss every 4 KiB.
pub struct AlignedBuf {
    ptr: std::ptr::NonNull<u8>,
    len: usize,
    layout: std::alloc::Layout,
}

// SAFETY: the buffer is plain bytes owned by this value.
unsafe impl Send for AlignedBuf {}
// SAFETY: shared access is read-only.
unsafe impl Sync for AlignedBuf {}

const HUGE_PAGE: usize = 2 << 20;

thread_local! {
    static SMALL_PAGES: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Weights allocated on this thread from now on use ordinary pages. For loads while serving:
/// a huge-page fault may compact memory, migrating other threads' pages under them, which
/// stalls the steps being served; ordinary pages cost a little speed on those weights instead.
pub fn use_small_pages_on_this_thread() {
    SMALL_PAGES.with(|s| s.set(true));
}

#[cfg(target_os = "linux")]
fn advise_huge_pages(ptr: *mut u8, len: usize) {
    const MADV_HUGEPAGE: i32 = 14;
    unsafe extern "C" {
        fn madvise(addr: *mut std::ffi::c_void, len: usize, advice: i32) -> i32;
    }
    // SAFETY: the range is one allocation we own; the advice only changes how the kernel
    // backs it. Failure (THP disabled) is harmless.
    let _ = unsafe { madvise(ptr.cast(), len, MADV_HUGEPAGE) };
}

#[cfg(not(target_os = "linux"))]
fn advise_huge_pages(_ptr: *mut u8, _len: usize) {}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        // SAFETY: allocated in `zeroed` with this layout.
        unsafe { std::alloc::dealloc(self.ptr.as_ptr(), self.layout) }
    }
}

impl AlignedBuf {
    pub fn zeroed(len: usize) -> Self {
        let align = if len >= 4 * HUGE_PAGE { HUGE_PAGE } else { 64 };
        let size = len.max(1).div_ceil(align) * align;
        let Ok(layout) = std::alloc::Layout::from_size_align(size, align) else {
            panic!("buffer of {len} bytes is too large");
        };
        // SAFETY: the layout has non-zero size.
        let raw = unsafe { std::alloc::alloc(layout) };
        let Some(ptr) = std::ptr::NonNull::new(raw) else {
            std::alloc::handle_alloc_error(layout)
        };
        if align == HUGE_PAGE && !SMALL_PAGES.with(|s| s.get()) {
            advise_huge_pages(raw, size);
        }
        // Zero after the advice, so the first touch faults in huge pages.
        // SAFETY: `raw` points at `size` writable bytes.
        unsafe { std::ptr::write_bytes(raw, 0, size) };
        AlignedBuf { ptr, len, layout }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn as_ptr(&self) -> *const u8 {
        self.ptr.as_ptr()
    }

    pub fn as_mut_ptr(&mut self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    /// The buffer as a slice of `T` (which must be plain data with alignment ≤ 64).
    pub fn as_slice<T: bytemuck_like::Pod>(&self) -> &[T] {
        // SAFETY: the buffer is 64-byte aligned, holds `len` initialised bytes, and `T` is one
        // of the plain-data element types below.
        unsafe { std::slice::from_raw_parts(self.as_ptr().cast(), self.len / size_of::<T>()) }
    }

    pub fn as_mut_slice<T: bytemuck_like::Pod>(&mut self) -> &mut [T] {
        // SAFETY: as for `as_slice`, and we hold the only reference.
        unsafe {
            std::slice::from_raw_parts_mut(self.as_mut_ptr().cast(), self.len / size_of::<T>())
        }
    }
}

/// The element types a packed buffer may be viewed as.
pub mod bytemuck_like {
    /// Plain data: any bit pattern is valid and alignment is at most 64.
    ///
    /// # Safety
    /// Implement only for integer and float primitives.
    pub unsafe trait Pod: Copy {}
    // SAFETY: primitives with no invalid bit patterns.
    unsafe impl Pod for u16 {}
    // SAFETY: as above.
    unsafe impl Pod for f32 {}
    // SAFETY: as above.
    unsafe impl Pod for u8 {}
}

/// A sub-range of a shared chunk owned by one matrix.
pub struct Region {
    chunk: Arc<AlignedBuf>,
    offset: usize,
    len: usize,
}

impl Region {
    /// A region with a buffer of its own (temporary packings).
    pub fn standalone(len: usize) -> Region {
        Region {
            chunk: Arc::new(AlignedBuf::zeroed(len)),
            offset: 0,
            len,
        }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn as_ptr(&self) -> *const u8 {
        self.chunk.as_ptr().wrapping_add(self.offset)
    }

    /// The region as a slice of `T` (plain data, alignment ≤ 64).
    pub fn as_slice<T: bytemuck_like::Pod>(&self) -> &[T] {
        // SAFETY: the region lies inside its chunk, starts 64-byte aligned, and is zeroed or
        // written plain data; no mutable view of it can exist while `&self` is borrowed.
        unsafe { std::slice::from_raw_parts(self.as_ptr().cast(), self.len / size_of::<T>()) }
    }

    /// The region as a mutable slice of `T`.
    pub fn as_mut_slice<T: bytemuck_like::Pod>(&mut self) -> &mut [T] {
        let ptr = self.chunk.as_ptr().wrapping_add(self.offset).cast_mut();
        // SAFETY: regions of one chunk never overlap and each is owned by exactly one
        // `Region`, so `&mut self` is the only access to these bytes; the chunk's memory is
        // owned through a raw pointer, not behind any shared reference.
        unsafe { std::slice::from_raw_parts_mut(ptr.cast(), self.len / size_of::<T>()) }
    }
}

/// Bump allocation of weight regions out of huge-page chunks; chunks are freed when the last
/// matrix in them is dropped.
pub struct WeightArena {
    current: Mutex<Option<(Arc<AlignedBuf>, usize)>>,
}

/// Size of one shared chunk.
const CHUNK: usize = 64 << 20;

impl Default for WeightArena {
    fn default() -> Self {
        WeightArena::new()
    }
}

impl WeightArena {
    pub fn new() -> Self {
        WeightArena {
            current: Mutex::new(None),
        }
    }

    /// A zeroed, 64-byte aligned region of `len` bytes.
    pub fn alloc(&self, len: usize) -> Region {
        if len >= CHUNK / 4 {
            return Region::standalone(len);
        }
        let size = len.div_ceil(64) * 64;
        let mut cur = self.current.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((chunk, used)) = cur.as_mut()
            && *used + size <= chunk.len()
        {
            let r = Region {
                chunk: chunk.clone(),
                offset: *used,
                len,
            };
            *used += size;
            return r;
        }
        let chunk = Arc::new(AlignedBuf::zeroed(CHUNK));
        *cur = Some((chunk.clone(), size));
        Region {
            chunk,
            offset: 0,
            len,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn regions_are_disjoint_aligned_and_zeroed() {
        let arena = WeightArena::new();
        let mut regions: Vec<Region> = (0..40).map(|i| arena.alloc(1000 + i * 4096 * 50)).collect();
        for (i, r) in regions.iter_mut().enumerate() {
            assert_eq!(r.as_ptr() as usize % 64, 0);
            assert!(r.as_slice::<u8>().iter().all(|b| *b == 0));
            r.as_mut_slice::<u8>().fill(i as u8 + 1);
        }
        for (i, r) in regions.iter().enumerate() {
            assert!(r.as_slice::<u8>().iter().all(|b| *b == i as u8 + 1));
        }
    }
}
