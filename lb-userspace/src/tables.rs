//! The `TABLES` map, mmap'ed: a 65537-slot table is written with plain
//! stores instead of 65537 `bpf_map_update_elem` calls.

use std::{
    os::fd::{AsFd, AsRawFd},
    ptr::NonNull,
};

use thiserror::Error;

/// Why the tables could not be mapped or written.
#[derive(Debug, Error)]
pub enum TableError {
    /// `mmap` of the map failed.
    #[error("mmap of the TABLES map ({len} bytes) failed: {source}")]
    Mmap {
        /// Bytes requested.
        len: usize,
        /// The OS error.
        source: std::io::Error,
    },
    /// A table does not fit the map.
    #[error("table of {slots} slots at index {base} exceeds the TABLES map ({entries} entries)")]
    OutOfRange {
        /// First index written.
        base: u32,
        /// Slots written.
        slots: usize,
        /// Entries in the map.
        entries: u32,
    },
}

/// A shared, writable mapping of the `BPF_F_MMAPABLE` `TABLES` map: its
/// `[u32; 2]` elements make a dense `u32` array of slots.
pub struct TableMem {
    ptr: NonNull<u32>,
    entries: u32,
    len: usize,
}

// SAFETY: the mapping is plain memory owned by this value; the kernel reads
// it concurrently, which is the point (u32 stores are atomic on our targets).
unsafe impl Send for TableMem {}

impl TableMem {
    /// Maps `entries` u32 slots of the array behind `fd`.
    pub fn map(fd: impl AsFd, entries: u32) -> Result<Self, TableError> {
        let page = 4096usize;
        let len = (entries as usize * 4).div_ceil(page) * page;
        // SAFETY: a fresh shared mapping of a BPF array fd; checked below.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_fd().as_raw_fd(),
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(TableError::Mmap {
                len,
                source: std::io::Error::last_os_error(),
            });
        }
        let ptr = NonNull::new(p.cast::<u32>()).ok_or(TableError::Mmap {
            len,
            source: std::io::Error::other("mmap returned null"),
        })?;
        Ok(Self { ptr, entries, len })
    }

    /// Number of u32 slots.
    pub fn entries(&self) -> u32 {
        self.entries
    }

    /// The `slots`-long region starting at `base`, for writing a table in place.
    pub fn region_mut(&mut self, base: u32, slots: usize) -> Result<&mut [u32], TableError> {
        if base as usize + slots > self.entries as usize {
            return Err(TableError::OutOfRange {
                base,
                slots,
                entries: self.entries,
            });
        }
        // SAFETY: in bounds (checked), and &mut self makes this the only
        // userspace view; the kernel only reads.
        Ok(unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr().add(base as usize), slots) })
    }

    /// The `slots`-long region starting at `base`.
    pub fn region(&self, base: u32, slots: usize) -> Result<&[u32], TableError> {
        if base as usize + slots > self.entries as usize {
            return Err(TableError::OutOfRange {
                base,
                slots,
                entries: self.entries,
            });
        }
        // SAFETY: in bounds (checked).
        Ok(unsafe { std::slice::from_raw_parts(self.ptr.as_ptr().add(base as usize), slots) })
    }
}

impl Drop for TableMem {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly what `map` mapped.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}
