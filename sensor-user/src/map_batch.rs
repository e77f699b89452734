//! Reading a whole hash map with `BPF_MAP_LOOKUP_BATCH` (5.6+): one system call per
//! chunk of entries instead of two per entry (get-next-key, then lookup). The sweep
//! reads the flow table every half second, and at 250,000 flows the per-entry walk
//! is half a million system calls. aya has no batch operations, so this is the raw
//! call; the caller falls back to aya's walk when the kernel refuses it.

use std::{
    io,
    mem::{MaybeUninit, size_of},
    os::fd::{AsRawFd as _, BorrowedFd},
};

/// `BPF_MAP_LOOKUP_BATCH` in `enum bpf_cmd` (uapi/linux/bpf.h).
const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;
/// The kernel's ENOTSUPP (not in libc): a map type without batch operations.
const ENOTSUPP: i32 = 524;
/// Entries asked for per call; grown when one hash bucket holds more (ENOSPC).
const CHUNK: usize = 4096;

/// The `batch` member of `union bpf_attr`.
#[repr(C)]
#[derive(Default)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

/// Why a batch read did not happen.
#[derive(Debug, thiserror::Error)]
pub enum BatchError {
    /// This kernel or map type has no batch lookup: walk the map instead.
    #[error("batch lookup not supported")]
    Unsupported,
    #[error("BPF_MAP_LOOKUP_BATCH: {0}")]
    Io(#[from] io::Error),
}

/// Calls `f` with every entry of the hash map `map` (keys `K`, values `V`, both
/// plain old data of the map's key and value sizes). Entries added or removed
/// during the read may or may not be seen, as with a per-entry walk; none is seen
/// twice (the kernel walks bucket by bucket).
///
/// # Safety
/// `K` and `V` must be the map's key and value types: every bit pattern of their
/// sizes is a valid value of them.
pub unsafe fn lookup_all<K: Copy, V: Copy>(
    map: BorrowedFd<'_>,
    mut f: impl FnMut(K, V),
) -> Result<(), BatchError> {
    let mut chunk = CHUNK;
    let mut keys: Vec<MaybeUninit<K>> = Vec::new();
    let mut values: Vec<MaybeUninit<V>> = Vec::new();
    // The hash map's cursor is a bucket index (u32); `None` starts from the beginning.
    let mut cursor: Option<u32> = None;
    let mut next: u32 = 0;
    loop {
        keys.resize(chunk, MaybeUninit::uninit());
        values.resize(chunk, MaybeUninit::uninit());
        let mut attr = BatchAttr {
            in_batch: cursor.as_ref().map_or(0, |c| std::ptr::from_ref(c) as u64),
            out_batch: std::ptr::from_mut(&mut next) as u64,
            keys: keys.as_mut_ptr() as u64,
            values: values.as_mut_ptr() as u64,
            count: u32::try_from(chunk).unwrap_or(u32::MAX),
            map_fd: u32::try_from(map.as_raw_fd()).unwrap_or(u32::MAX),
            ..BatchAttr::default()
        };
        // SAFETY: `attr` is a valid `bpf_attr.batch` whose buffers hold `count`
        // keys and values of the map's sizes (the caller's contract) and outlive the
        // call; the kernel writes at most `count` of each and the cursor.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_MAP_LOOKUP_BATCH,
                std::ptr::from_mut(&mut attr),
                size_of::<BatchAttr>(),
            )
        };
        let err = (rc < 0).then(io::Error::last_os_error);
        let done = match err.as_ref().and_then(io::Error::raw_os_error) {
            None => false,
            // The end of the map; `count` says how many came with it.
            Some(libc::ENOENT) => true,
            // A bucket holds more entries than `count`: ask for more at once.
            Some(libc::ENOSPC) if chunk < 1 << 20 => {
                chunk *= 4;
                continue;
            }
            Some(libc::EINVAL | libc::EOPNOTSUPP | ENOTSUPP) if cursor.is_none() => {
                return Err(BatchError::Unsupported);
            }
            Some(_) => return Err(BatchError::Io(err.unwrap_or_else(io::Error::last_os_error))),
        };
        let n = (attr.count as usize).min(chunk);
        for (k, v) in keys.iter().zip(&values).take(n) {
            // SAFETY: the kernel filled the first `n` entries; every bit pattern is a
            // valid K and V (the caller's contract).
            f(unsafe { k.assume_init() }, unsafe { v.assume_init() });
        }
        if done {
            return Ok(());
        }
        cursor = Some(next);
    }
}
