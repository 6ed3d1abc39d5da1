//! The streaming decoder on arbitrary bytes in arbitrary chunks: every piece is whole UTF-8,
//! and all pieces together are exactly the lossy decoding of all the bytes.

use phi4::tokenizer::StreamDecoder;

/// The check of one input.
pub fn run(data: &[u8]) {
    let mut d = StreamDecoder::default();
    let mut out = String::new();
    let mut rest = data;
    // Chunk lengths come from the input itself: the first byte of each chunk.
    while let Some((&n, tail)) = rest.split_first() {
        let n = (n as usize % 7).min(tail.len());
        out.push_str(&d.push(&tail[..n]));
        rest = &tail[n..];
    }
    out.push_str(&d.finish());
    let bytes: Vec<u8> = {
        let mut v = Vec::new();
        let mut rest = data;
        while let Some((&n, tail)) = rest.split_first() {
            let n = (n as usize % 7).min(tail.len());
            v.extend_from_slice(&tail[..n]);
            rest = &tail[n..];
        }
        v
    };
    assert_eq!(out, String::from_utf8_lossy(&bytes));
}
