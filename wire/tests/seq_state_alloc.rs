//! Hostile sizes never turn into allocations: a header over the receiver's limits is refused
//! by `Assembler::new` without allocating, and payloads that announce huge counts are refused
//! allocating far less than they announce. Counted by a global allocator, per thread (so the
//! test harness's own threads do not interfere).
#![allow(clippy::unwrap_used)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

use myriad_wire::{
    Assembler, KvDtype, LayerShape, Limits, Message, STATE_FORMAT_VERSION, StateBegin, StateChunk,
    StateLimits, WireError,
};

struct Counting;

thread_local! {
    /// Bytes this thread has allocated (reallocations count their new size).
    static ALLOCATED: Cell<u64> = const { Cell::new(0) };
}

fn count(bytes: usize) {
    let _ = ALLOCATED.try_with(|a| a.set(a.get() + bytes as u64));
}

// SAFETY: every call is passed on to `System` unchanged; the counter only observes sizes.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        count(layout.size());
        // SAFETY: the caller's contract for `layout` is passed on.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        count(layout.size());
        // SAFETY: as above.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` came from `System` with this layout.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        count(new_size);
        // SAFETY: as above.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// Runs `f`, returning its result and the bytes it allocated on this thread.
fn allocated<T>(f: impl FnOnce() -> T) -> (T, u64) {
    let before = ALLOCATED.with(Cell::get);
    let out = f();
    (out, ALLOCATED.with(Cell::get) - before)
}

fn le(parts: &[&[u8]]) -> Vec<u8> {
    parts.concat()
}

#[test]
fn hostile_sizes_do_not_allocate() {
    let (_, n) = allocated(|| vec![1u8; 4096]);
    assert!(n >= 4096, "the counter counts ({n})");

    // A header announcing 10 tokens × 64 Ki heads × 64 Ki dims of f32 (over 300 GiB).
    let begin = StateBegin {
        transfer_id: 1,
        state_version: STATE_FORMAT_VERSION,
        model_fingerprint: 7,
        position: 10,
        tokens: vec![0; 10],
        rng: [0; 4],
        generated: 0,
        layers: vec![LayerShape::Attention {
            kv_heads: 65536,
            head_dim: 65536,
            block_tokens: 1,
            dtype: KvDtype::F32,
        }],
    };
    let (got, bytes) = allocated(|| Assembler::new(begin, 7, &StateLimits::default()).err());
    assert!(
        matches!(
            got,
            Some(WireError::OverLimit {
                what: "StateBegin.state_bytes",
                ..
            })
        ),
        "{got:?}"
    );
    assert_eq!(bytes, 0, "refused before allocating anything");

    let l = Limits::default();
    // 2 Mi token ids announced, none sent.
    let head = le(&[
        &1u16.to_le_bytes(),
        &1u64.to_le_bytes(),
        &7u64.to_le_bytes(),
        &(1u64 << 21).to_le_bytes(),
        &0u32.to_le_bytes(),
        &[0; 32],
        &(1u64 << 21).to_le_bytes(),
    ]);
    let (got, bytes) = allocated(|| StateBegin::decode(&head, &l).err());
    assert!(matches!(got, Some(WireError::Truncated { .. })), "{got:?}");
    assert!(bytes < 1024, "{bytes} bytes allocated");

    // A million KV blocks announced, one byte sent; u32::MAX conv values announced.
    let blocks = le(&[
        &1u64.to_le_bytes(),
        &0u32.to_le_bytes(),
        &[1],
        &0u64.to_le_bytes(),
        &16u32.to_le_bytes(),
        &8u32.to_le_bytes(),
        &128u32.to_le_bytes(),
        &[1],
        &(1u32 << 20).to_le_bytes(),
        &[0],
    ]);
    let conv = le(&[
        &1u64.to_le_bytes(),
        &0u32.to_le_bytes(),
        &[0],
        &u32::MAX.to_le_bytes(),
    ]);
    for payload in [blocks, conv] {
        let (got, bytes) = allocated(|| StateChunk::decode(&payload, &l).err());
        assert!(matches!(got, Some(WireError::Truncated { .. })), "{got:?}");
        assert!(bytes < 1024, "{bytes} bytes allocated");
    }
}
