//! The kernel's `CONFIG` entry mapped into this process (the map is
//! BPF_F_MMAPABLE), so `replay` can stamp each packet's index into
//! `boot_offset_ns` with a store instead of a `bpf(BPF_MAP_UPDATE_ELEM)` call per
//! packet.

use std::{
    io,
    os::fd::{AsRawFd as _, BorrowedFd},
    ptr::NonNull,
};

use sensor_common::KernelConfig;

/// A shared, writable mapping of an array map whose element 0 is a [`KernelConfig`]
/// (or of any file laid out the same, as in the tests).
pub struct MappedConfig {
    ptr: NonNull<KernelConfig>,
    len: usize,
}

// SAFETY: the mapping is owned by this value; access goes through `&mut self`.
unsafe impl Send for MappedConfig {}

impl MappedConfig {
    /// Maps the first page of `fd` (element 0 of an mmapable array is at offset 0).
    pub fn map(fd: BorrowedFd<'_>) -> io::Result<MappedConfig> {
        // SAFETY: sysconf has no preconditions.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
        let len = usize::try_from(page)
            .ok()
            .filter(|&p| p >= size_of::<KernelConfig>())
            .ok_or_else(|| io::Error::other("page size"))?;
        // SAFETY: a fresh shared mapping of `len` bytes of a valid fd; the kernel
        // picks the address.
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                0,
            )
        };
        if addr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let ptr = NonNull::new(addr.cast::<KernelConfig>())
            .ok_or_else(|| io::Error::other("mmap returned null"))?;
        Ok(MappedConfig { ptr, len })
    }

    /// Stores `boot_offset_ns` where the programs read it. One aligned 8-byte
    /// store: a program never sees half of it; the next `BPF_PROG_TEST_RUN`
    /// (a syscall) orders it before the run.
    pub fn set_boot_offset(&mut self, ns: u64) {
        // SAFETY: `ptr` is a live, page-aligned mapping of at least one
        // KernelConfig; the field is 8-byte aligned (repr(C), offset 8).
        unsafe { std::ptr::write_volatile(&raw mut (*self.ptr.as_ptr()).boot_offset_ns, ns) }
    }

    /// The config as the programs see it.
    pub fn get(&self) -> KernelConfig {
        // SAFETY: as in `set_boot_offset`.
        unsafe { std::ptr::read_volatile(self.ptr.as_ptr()) }
    }
}

impl Drop for MappedConfig {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping `map` made; nothing refers to it after.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}

#[cfg(test)]
mod tests {
    #![expect(clippy::unwrap_used, reason = "tests")]

    use std::{
        io::{Read as _, Seek as _, Write as _},
        os::fd::AsFd as _,
    };

    use super::*;

    /// A file holding one config as the array map holds it, padded to a page.
    fn config_file(c: KernelConfig) -> std::fs::File {
        let mut f = tempfile::tempfile().unwrap();
        // SAFETY: KernelConfig is repr(C) plain data without padding holes.
        let bytes = unsafe {
            std::slice::from_raw_parts((&raw const c).cast::<u8>(), size_of::<KernelConfig>())
        };
        f.write_all(bytes).unwrap();
        f.set_len(65536).unwrap();
        f
    }

    #[test]
    fn stamps_only_the_boot_offset_in_place() {
        let before = KernelConfig {
            enforce: 1,
            policy_gen: 1,
            ring_no_wakeup: 1,
            boot_offset_ns: 7,
            ..KernelConfig::default()
        };
        let mut f = config_file(before);
        let mut m = MappedConfig::map(f.as_fd()).unwrap();
        assert_eq!(m.get(), before);
        let stamp = (5u64 << 32).wrapping_sub(123);
        m.set_boot_offset(stamp);
        drop(m);
        // Through the file, not the mapping: the store reached the shared pages.
        let mut raw = [0u8; 16];
        f.rewind().unwrap();
        f.read_exact(&mut raw).unwrap();
        assert_eq!(raw[..8], [1, 0, 0, 0, 1, 1, 0, 0]);
        assert_eq!(u64::from_ne_bytes(raw[8..].try_into().unwrap()), stamp);
    }
}
