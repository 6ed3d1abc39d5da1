//! The GGUF reader on arbitrary bytes: never a panic, and never more memory than a small
//! multiple of the input (libFuzzer's -rss_limit_mb and -malloc_limit_mb catch amplification;
//! fuzz/run sets them).

/// The check of one input.
pub fn run(data: &[u8]) {
    if let Ok(g) = phi4::gguf::parse(data) {
        // Whatever parsed is consistent: every tensor's data lies inside the input.
        for t in &g.tensors {
            assert!(t.file_offset + t.size <= data.len() as u64);
        }
    }
}
