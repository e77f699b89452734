//! Reading a whole BPF hash map with `BPF_MAP_LOOKUP_BATCH` (5.6+): one syscall
//! per chunk of entries instead of two per entry (`get_next_key` + lookup), which
//! is what a sweep of the flow table cost.

use std::{
    io,
    os::fd::{AsRawFd as _, BorrowedFd},
};

/// `enum bpf_cmd` value of `BPF_MAP_LOOKUP_BATCH`.
const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;
/// The kernel's ENOTSUPP (not in libc): a map type without batch operations.
const ENOTSUPP: i32 = 524;

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

/// Calls `f` with every entry of the hash map `fd` (keys `K`, values `V`),
/// `chunk` entries per syscall. `ErrorKind::Unsupported` when this kernel or map
/// type has no batch lookup (before any entry was passed to `f`): read the map
/// key by key instead.
pub fn for_each<K: aya::Pod, V: aya::Pod>(
    fd: BorrowedFd<'_>,
    chunk: usize,
    mut f: impl FnMut(K, V),
) -> io::Result<()> {
    let mut chunk = chunk.max(1);
    let (ks, vs) = (size_of::<K>(), size_of::<V>());
    let mut keys = vec![0u8; chunk * ks];
    let mut values = vec![0u8; chunk * vs];
    // Hash maps resume from a bucket index (u32); none on the first call.
    let mut next: Option<u32> = None;
    loop {
        let mut in_batch = next.unwrap_or(0);
        let mut out_batch = 0u32;
        let mut attr = BatchAttr {
            in_batch: next.map_or(0, |_| (&raw mut in_batch) as u64),
            out_batch: (&raw mut out_batch) as u64,
            keys: keys.as_mut_ptr() as u64,
            values: values.as_mut_ptr() as u64,
            count: u32::try_from(chunk).unwrap_or(u32::MAX),
            map_fd: u32::try_from(fd.as_raw_fd()).map_err(io::Error::other)?,
            ..BatchAttr::default()
        };
        // SAFETY: `attr` is a valid bpf_attr prefix for this command; the key and
        // value buffers hold `count` entries; the batch tokens are live u32s.
        let r = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_MAP_LOOKUP_BATCH,
                &raw mut attr,
                size_of::<BatchAttr>(),
            )
        };
        let err = (r < 0).then(io::Error::last_os_error);
        let errno = err.as_ref().and_then(io::Error::raw_os_error);
        match errno {
            None | Some(libc::ENOENT) => {}
            // A bucket holds more entries than the chunk: a bigger one.
            Some(libc::ENOSPC) if attr.count == 0 => {
                chunk *= 2;
                keys.resize(chunk * ks, 0);
                values.resize(chunk * vs, 0);
                continue;
            }
            Some(libc::EINVAL | libc::EOPNOTSUPP | ENOTSUPP) if next.is_none() => {
                return Err(io::Error::new(
                    io::ErrorKind::Unsupported,
                    "no BPF_MAP_LOOKUP_BATCH for this map",
                ));
            }
            Some(_) => return Err(err.unwrap_or_else(|| io::Error::other("bpf"))),
        }
        for i in 0..(attr.count as usize).min(chunk) {
            // SAFETY: the kernel filled `count` entries; K and V are Pod (any bytes
            // are a value); unaligned reads from the byte buffers.
            let (k, v) = unsafe {
                (
                    keys.as_ptr().add(i * ks).cast::<K>().read_unaligned(),
                    values.as_ptr().add(i * vs).cast::<V>().read_unaligned(),
                )
            };
            f(k, v);
        }
        if errno == Some(libc::ENOENT) {
            return Ok(());
        }
        next = Some(out_batch);
    }
}

#[cfg(test)]
mod tests {
    #![expect(clippy::unwrap_used, reason = "tests")]

    use std::os::fd::{AsFd as _, FromRawFd as _, OwnedFd};

    use super::*;

    const BPF_MAP_CREATE: libc::c_long = 0;
    const BPF_MAP_UPDATE_ELEM: libc::c_long = 2;
    const BPF_MAP_TYPE_HASH: u32 = 1;
    const BPF_MAP_TYPE_LRU_HASH: u32 = 9;

    fn bpf<T>(cmd: libc::c_long, attr: &mut T) -> libc::c_long {
        // SAFETY: `attr` is the bpf_attr prefix `cmd` reads.
        unsafe { libc::syscall(libc::SYS_bpf, cmd, attr as *mut T, size_of::<T>()) }
    }

    /// A map of u64 -> [u64; 2]; None without the privilege to create one.
    fn create(map_type: u32, max: u32) -> Option<OwnedFd> {
        #[repr(C)]
        struct Create {
            map_type: u32,
            key_size: u32,
            value_size: u32,
            max_entries: u32,
        }
        let mut a = Create {
            map_type,
            key_size: 8,
            value_size: 16,
            max_entries: max,
        };
        let fd = bpf(BPF_MAP_CREATE, &mut a);
        // SAFETY: a new fd this test owns.
        (fd >= 0).then(|| unsafe { OwnedFd::from_raw_fd(fd as i32) })
    }

    fn insert(fd: &OwnedFd, k: u64, v: [u64; 2]) {
        #[repr(C)]
        struct Update {
            map_fd: u32,
            _pad: u32,
            key: u64,
            value: u64,
            flags: u64,
        }
        let mut a = Update {
            map_fd: fd.as_raw_fd() as u32,
            _pad: 0,
            key: (&raw const k) as u64,
            value: (&raw const v) as u64,
            flags: 0,
        };
        assert_eq!(bpf(BPF_MAP_UPDATE_ELEM, &mut a), 0);
    }

    #[test]
    fn reads_every_entry_in_chunks() {
        for map_type in [BPF_MAP_TYPE_HASH, BPF_MAP_TYPE_LRU_HASH] {
            let Some(fd) = create(map_type, 10_000) else {
                eprintln!("skipped: cannot create BPF maps (needs root)");
                return;
            };
            for k in 0..3000u64 {
                insert(&fd, k, [k * 3, !k]);
            }
            let mut seen = std::collections::HashMap::new();
            for_each::<u64, [u64; 2]>(fd.as_fd(), 64, |k, v| {
                assert!(seen.insert(k, v).is_none(), "{k} twice");
            })
            .unwrap();
            assert_eq!(seen.len(), 3000, "map type {map_type}");
            assert!(seen.iter().all(|(k, v)| *v == [k * 3, !k]));
        }
    }

    #[test]
    fn an_empty_map_has_no_entries() {
        let Some(fd) = create(BPF_MAP_TYPE_HASH, 16) else {
            return;
        };
        let mut n = 0;
        for_each::<u64, [u64; 2]>(fd.as_fd(), 4, |_, _| n += 1).unwrap();
        assert_eq!(n, 0);
    }
}
