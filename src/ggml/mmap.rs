//! File mappings: regular files only, prefaulted or dropped by range.

use std::ffi::c_void;

/// Open and map the regular file at `path` read-only. Anything else (a FIFO, a device, a
/// directory) is refused before it is read: opening does not block (O_NONBLOCK), and the type
/// is checked on the open file.
pub fn map_path(path: &std::path::Path) -> std::io::Result<memmap2::Mmap> {
    use std::os::unix::fs::OpenOptionsExt;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)?;
    if !file.metadata()?.is_file() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "not a regular file",
        ));
    }
    map_file(&file)
}

/// Map a file read-only. The mapping is only ever read, and only in ranges that the GGUF reader
/// proved to lie inside the file.
fn map_file(file: &std::fs::File) -> std::io::Result<memmap2::Mmap> {
    // SAFETY: the map is read-only and private to phi4. Another process truncating the file
    // while it is mapped would fault on access; that is documented as the caller's contract
    // (like every mmap-based loader, llama.cpp's included).
    unsafe { memmap2::MmapOptions::new().map(file) }
}

/// Fault in a range of a file mapping now (one kernel call, no per-page faults where the kernel
/// supports MADV_POPULATE_READ; otherwise by reading one byte per page).
pub fn prefault(map: &memmap2::Mmap, offset: usize, len: usize) {
    let page = 4096;
    let start = offset / page * page;
    let end = (offset + len).min(map.len());
    // SAFETY: advisory call on a range inside our read-only mapping.
    let ok = end > start
        && unsafe {
            libc::madvise(
                map.as_ptr().add(start) as *mut c_void,
                end - start,
                libc::MADV_POPULATE_READ,
            )
        } == 0;
    if !ok {
        let mut acc = 0u8;
        for i in (offset..end).step_by(page) {
            acc ^= map[i];
        }
        std::hint::black_box(acc);
    }
}

/// Tell the kernel a range of a read-only file mapping will not be read again soon (its
/// weights now live repacked in another buffer), so its pages leave the resident set.
pub fn drop_pages(map: &memmap2::Mmap, offset: usize, len: usize) {
    let page = 4096;
    let start = offset.div_ceil(page) * page;
    let end = (offset + len) / page * page;
    if end > start {
        // SAFETY: MADV_DONTNEED on a read-only file-backed private mapping only discards
        // clean pages; a later read would fetch them from the file again. No Rust reference
        // into this range is held across this call by the loader.
        let _ = unsafe {
            map.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, start, end - start)
        };
    }
}
