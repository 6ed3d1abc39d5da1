//! Malformed GGUF files: one test per bug class of llama.cpp's GGUF advisories, each checking the
//! error (not only that there is one), plus truncation and mutation sweeps that must never panic.

mod common;

use phi4::gguf::{parse, GgufError};
use phi4::model::{LoadParams, Model};

/// Builds GGUF bytes by hand, so that any field can be wrong.
#[derive(Default)]
struct B(Vec<u8>);

impl B {
    fn header(n_tensors: u64, n_kv: u64) -> B {
        let mut b = B(b"GGUF".to_vec());
        b.u32(3).u64(n_tensors).u64(n_kv);
        b
    }
    fn u32(&mut self, v: u32) -> &mut B {
        self.0.extend(v.to_le_bytes());
        self
    }
    fn u64(&mut self, v: u64) -> &mut B {
        self.0.extend(v.to_le_bytes());
        self
    }
    fn str(&mut self, s: &str) -> &mut B {
        self.u64(s.len() as u64);
        self.0.extend(s.as_bytes());
        self
    }
    fn kv_u32(&mut self, k: &str, v: u32) -> &mut B {
        self.str(k).u32(4).u32(v)
    }
    /// name, dims, type, offset
    fn tensor(&mut self, name: &str, dims: &[u64], ty: u32, offset: u64) -> &mut B {
        self.str(name).u32(dims.len() as u32);
        dims.iter().for_each(|&d| {
            self.u64(d);
        });
        self.u32(ty).u64(offset)
    }
    /// Pad to 32 and add `n` data bytes.
    fn data(&mut self, n: usize) -> Vec<u8> {
        let pad = self.0.len().div_ceil(32) * 32 - self.0.len();
        self.0.extend(vec![0u8; pad + n]);
        self.0.clone()
    }
}

const F32: u32 = 0;
const Q4_0: u32 = 2;

#[test]
fn valid_file_parses() {
    let mut b = B::header(2, 1);
    b.kv_u32("general.alignment", 32)
        .tensor("a", &[8], F32, 0)
        .tensor("b", &[8, 2], F32, 32);
    let g = parse(&b.data(96)).unwrap();
    assert_eq!(g.tensors.len(), 2);
    assert_eq!(g.tensors[1].size, 64);
}

#[test]
fn string_length_past_end_of_file() {
    // CVE-2024-23496: a key string whose length is larger than the file.
    let mut b = B::header(0, 1);
    b.u64(1 << 40).u32(0);
    let e = parse(&b.data(64)).unwrap_err();
    assert!(
        matches!(&e, GgufError::CountTooLarge { what, count, .. } if what.contains("string length") && *count == 1 << 40),
        "{e}"
    );
}

#[test]
fn array_count_past_end_of_file() {
    // CVE-2024-21825: an array claiming more elements than the file can hold.
    let mut b = B::header(0, 1);
    b.str("tokenizer.ggml.tokens")
        .u32(9)
        .u32(8)
        .u64(u64::MAX / 2);
    let e = parse(&b.0).unwrap_err();
    assert!(
        matches!(&e, GgufError::CountTooLarge { what, .. } if what.contains("array \"tokenizer.ggml.tokens\"")),
        "{e}"
    );
}

#[test]
fn absurd_tensor_count() {
    // CVE-2024-21836: n_tensors so large that allocating for it would overflow.
    let b = B::header(u64::MAX / 8, 0);
    let e = parse(&b.0).unwrap_err();
    assert!(
        matches!(&e, GgufError::CountTooLarge { what, count, .. } if what == "tensor" && *count == u64::MAX / 8),
        "{e}"
    );
}

#[test]
fn absurd_kv_count() {
    // CVE-2024-23605: n_kv so large that allocating for it would overflow.
    let b = B::header(0, u64::MAX);
    let e = parse(&b.0).unwrap_err();
    assert!(
        matches!(&e, GgufError::CountTooLarge { what, .. } if what.contains("metadata")),
        "{e}"
    );
}

#[test]
fn element_count_overflow() {
    // CVE-2024-21802: dimensions whose product overflows.
    let mut b = B::header(1, 0);
    b.tensor("big", &[1 << 32, 1 << 32, 1 << 4], F32, 0);
    let e = parse(&b.data(0)).unwrap_err();
    assert!(
        matches!(&e, GgufError::Overflow { what, detail } if what.contains("big") && detail.contains("element count")),
        "{e}"
    );
}

#[test]
fn byte_count_overflow() {
    // CVE-2026-33298: an element count that fits but whose byte size does not.
    let mut b = B::header(1, 0);
    b.tensor("wide", &[1 << 31, 1 << 31], F32, 0);
    let e = parse(&b.data(0)).unwrap_err();
    assert!(
        matches!(&e, GgufError::Overflow { what, detail } if what.contains("wide") && detail.contains("byte count")),
        "{e}"
    );
}

#[test]
fn offset_plus_size_wraps() {
    // CVE-2025-53630 / CVE-2026-27940: offset + size wrapping around to a small number.
    let mut b = B::header(1, 0);
    b.tensor("wrap", &[32], F32, u64::MAX - 63);
    let e = parse(&b.data(128)).unwrap_err();
    assert!(
        matches!(&e, GgufError::BadOffset { name, msg, .. } if name == "wrap" && msg.contains("overflows")),
        "{e}"
    );
}

#[test]
fn sizes_that_sum_past_the_file() {
    // Each tensor fits on its own, their sum does not.
    let mut b = B::header(2, 0);
    b.tensor("a", &[16], F32, 0).tensor("b", &[16], F32, 64);
    let e = parse(&b.data(100)).unwrap_err();
    assert!(
        matches!(&e, GgufError::BadOffset { name, msg, .. } if name == "b" && msg.contains("past the end")),
        "{e}"
    );
}

#[test]
fn unknown_and_negative_tensor_types() {
    for (ty, shown) in [
        (999u32, "999"),
        (u32::MAX, "-1"),
        (4, "4"), /* Q4_2, removed from ggml */
    ] {
        let mut b = B::header(1, 0);
        b.tensor("t", &[32], ty, 0);
        let e = parse(&b.data(32)).unwrap_err();
        assert_eq!(
            e,
            GgufError::BadTensor {
                name: "t".into(),
                msg: format!("unknown ggml type {shown}")
            }
        );
    }
}

#[test]
fn row_length_not_a_multiple_of_the_block() {
    let mut b = B::header(1, 0);
    b.tensor("q", &[20], Q4_0, 0);
    let e = parse(&b.data(32)).unwrap_err();
    assert!(
        matches!(&e, GgufError::BadTensor { msg, .. } if msg.contains("block size 32")),
        "{e}"
    );
}

#[test]
fn duplicate_keys() {
    let mut b = B::header(0, 2);
    b.kv_u32("phi3.block_count", 1)
        .kv_u32("phi3.block_count", 2);
    assert_eq!(
        parse(&b.0).unwrap_err(),
        GgufError::DuplicateKey("phi3.block_count".into())
    );
}

#[test]
fn duplicate_tensor_names() {
    let mut b = B::header(2, 0);
    b.tensor("w", &[8], F32, 0).tensor("w", &[8], F32, 32);
    assert_eq!(
        parse(&b.data(64)).unwrap_err(),
        GgufError::DuplicateTensor("w".into())
    );
}

#[test]
fn alignment_not_a_power_of_two() {
    let mut b = B::header(0, 1);
    b.kv_u32("general.alignment", 24);
    assert_eq!(
        parse(&b.0).unwrap_err(),
        GgufError::BadAlignment("24 is not a power of two".into())
    );
    let mut b = B::header(0, 1);
    b.kv_u32("general.alignment", 0);
    assert!(matches!(
        parse(&b.0).unwrap_err(),
        GgufError::BadAlignment(_)
    ));
}

#[test]
fn alignment_of_the_wrong_type() {
    let mut b = B::header(0, 1);
    b.str("general.alignment").u32(10).u64(32);
    assert_eq!(
        parse(&b.0).unwrap_err(),
        GgufError::BadAlignment("must be u32, found u64".into())
    );
}

#[test]
fn tensor_offsets_out_of_order() {
    let mut b = B::header(2, 0);
    b.tensor("a", &[8], F32, 32).tensor("b", &[8], F32, 0);
    let e = parse(&b.data(64)).unwrap_err();
    assert!(
        matches!(&e, GgufError::BadOffset { name, msg, .. } if name == "b" && msg.contains("out of order")),
        "{e}"
    );
}

#[test]
fn overlapping_tensors() {
    let mut b = B::header(2, 0);
    b.tensor("a", &[16], F32, 0).tensor("b", &[8], F32, 32);
    let e = parse(&b.data(96)).unwrap_err();
    assert!(
        matches!(&e, GgufError::BadOffset { name, .. } if name == "b"),
        "{e}"
    );
}

#[test]
fn tensor_offset_past_the_end() {
    let mut b = B::header(1, 0);
    b.tensor("far", &[8], F32, 1 << 20);
    let e = parse(&b.data(32)).unwrap_err();
    assert!(
        matches!(&e, GgufError::BadOffset { name, msg, .. } if name == "far" && msg.contains("past the end")),
        "{e}"
    );
}

#[test]
fn misaligned_tensor_offset() {
    let mut b = B::header(1, 0);
    b.tensor("odd", &[8], F32, 4);
    let e = parse(&b.data(64)).unwrap_err();
    assert!(
        matches!(&e, GgufError::BadOffset { msg, .. } if msg.contains("alignment")),
        "{e}"
    );
}

#[test]
fn bad_magic_and_version() {
    assert_eq!(
        parse(b"GGML\x03\0\0\0").unwrap_err(),
        GgufError::BadMagic(*b"GGML")
    );
    let mut b = B(b"GGUF".to_vec());
    b.u32(1).u64(0).u64(0);
    assert_eq!(parse(&b.0).unwrap_err(), GgufError::BadVersion(1));
    // A big-endian file reads as a huge version.
    let mut b = B(b"GGUF".to_vec());
    b.0.extend(3u32.to_be_bytes());
    assert!(matches!(parse(&b.0).unwrap_err(), GgufError::BadVersion(_)));
}

#[test]
fn unknown_value_type_and_bad_bool() {
    let mut b = B::header(0, 1);
    b.str("k").u32(13);
    assert!(
        matches!(parse(&b.data(64)).unwrap_err(), GgufError::BadValue { key, msg } if key == "k" && msg.contains("unknown value type 13"))
    );
    let mut b = B::header(0, 1);
    b.str("flag").u32(7);
    b.0.push(2);
    assert!(
        matches!(parse(&b.data(64)).unwrap_err(), GgufError::BadValue { key, msg } if key == "flag" && msg.contains("bool"))
    );
}

#[test]
fn deeply_nested_arrays() {
    let mut b = B::header(0, 1);
    b.str("nest").u32(9);
    for _ in 0..64 {
        b.u32(9).u64(1);
    }
    assert!(
        matches!(parse(&b.data(64)).unwrap_err(), GgufError::BadValue { msg, .. } if msg.contains("nested"))
    );
}

fn small_model_bytes() -> Vec<u8> {
    let dir = common::tmpdir();
    let spec = phi4_synth::Spec::small(1, common::ftype("q4_0"), 7);
    let p = common::synth_model(dir.path(), "m.gguf", &spec);
    std::fs::read(p).unwrap()
}

#[test]
fn every_truncation_of_a_model_is_an_error() {
    let bytes = small_model_bytes();
    let g = parse(&bytes).unwrap();
    // Every cut inside the header or the data is rejected, by the parser or the range checks.
    let mut cuts: Vec<usize> = (0..g.data_offset as usize + 64).collect();
    cuts.extend((g.data_offset as usize..bytes.len()).step_by(4099));
    for cut in cuts {
        assert!(
            parse(&bytes[..cut]).is_err(),
            "a file cut at {cut} of {} parsed",
            bytes.len()
        );
    }
}

#[test]
fn mutated_headers_never_panic() {
    let bytes = small_model_bytes();
    let header_len = parse(&bytes).unwrap().data_offset as usize;
    let mut rng = 0x1234_5678u64;
    let mut next = || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    let dir = common::tmpdir();
    let path = dir.path().join("mutant.gguf");
    for i in 0..3000 {
        let mut m = bytes.clone();
        for _ in 0..1 + next() % 4 {
            let at = (next() as usize) % header_len;
            m[at] = match next() % 3 {
                0 => next() as u8,
                1 => 0xff,
                _ => 0,
            };
        }
        let _ = parse(&m); // must return, Ok or Err
        if i % 50 == 0 {
            // Through the whole loader too (the mutation may leave a loadable model).
            std::fs::write(&path, &m).unwrap();
            let _ = Model::load(&path, LoadParams::default());
        }
    }
}

fn load_err(bytes: &[u8]) -> String {
    let dir = common::tmpdir();
    let p = dir.path().join("x.gguf");
    std::fs::write(&p, bytes).unwrap();
    match Model::load(&p, LoadParams::default()) {
        Err(e) => e.to_string(),
        Ok(_) => panic!("loaded"),
    }
}

#[test]
fn array_element_type_the_key_does_not_take() {
    // A real model with its token list retyped as an array of i32.
    let dir = common::tmpdir();
    let spec = phi4_synth::Spec::small(1, common::ftype("f16"), 1);
    let path = common::synth_model(dir.path(), "m.gguf", &spec);
    let g = parse(&std::fs::read(&path).unwrap()).unwrap();
    let mut kv = g.metadata.clone();
    for (k, v) in kv.iter_mut() {
        if k == "tokenizer.ggml.tokens" {
            *v = phi4::gguf::Value::Array(phi4::gguf::Array::I32(vec![0; 1024]));
        }
    }
    let bytes = rewrite(&std::fs::read(&path).unwrap(), &g, &kv);
    let e = load_err(&bytes);
    assert!(
        e.contains("tokenizer.ggml.tokens")
            && e.contains("must be an array of string, found an array of i32"),
        "{e}"
    );
}

/// The same file with other metadata (tensor data copied).
fn rewrite(bytes: &[u8], g: &phi4::gguf::Gguf, kv: &[(String, phi4::gguf::Value)]) -> Vec<u8> {
    let dir = common::tmpdir();
    let p = dir.path().join("re.gguf");
    let mut w = phi4::gguf::Writer::create(&p).unwrap();
    let shapes: Vec<Vec<u64>> = g.tensors.iter().map(|t| t.shape().to_vec()).collect();
    w.header(
        kv,
        g.tensors
            .iter()
            .zip(&shapes)
            .map(|(t, s)| (t.name.as_str(), s.as_slice(), t.ggml_type)),
    )
    .unwrap();
    for t in &g.tensors {
        w.tensor_data(&bytes[t.file_offset as usize..(t.file_offset + t.size) as usize])
            .unwrap();
    }
    w.finish().unwrap();
    std::fs::read(p).unwrap()
}

/// Metadata edits that make a well-formed file not a Phi-4 model.
#[test]
fn keys_that_do_not_match_phi4() {
    let dir = common::tmpdir();
    let spec = phi4_synth::Spec::small(2, common::ftype("f16"), 1);
    let path = common::synth_model(dir.path(), "m.gguf", &spec);
    let bytes = std::fs::read(&path).unwrap();
    let g = parse(&bytes).unwrap();
    let edit = |key: &str, v: Option<phi4::gguf::Value>| {
        let mut kv: Vec<_> = g
            .metadata
            .iter()
            .filter(|(k, _)| k != key)
            .cloned()
            .collect();
        if let Some(v) = v {
            kv.push((key.to_string(), v));
        }
        load_err(&rewrite(&bytes, &g, &kv))
    };
    use phi4::gguf::Value;
    let cases: Vec<(&str, Option<Value>, &str)> = vec![
        (
            "general.architecture",
            Some(Value::String(b"llama".to_vec())),
            "general.architecture is \"llama\"",
        ),
        (
            "general.architecture",
            None,
            "general.architecture\": missing",
        ),
        (
            "phi3.block_count",
            Some(Value::U32(3)),
            "tensor \"blk.2.attn_norm.weight\" is missing",
        ),
        (
            "phi3.block_count",
            Some(Value::String(b"2".to_vec())),
            "phi3.block_count\": must be an integer, found string",
        ),
        (
            "phi3.block_count",
            Some(Value::I32(-2)),
            "phi3.block_count\": -2 is out of range",
        ),
        (
            "phi3.embedding_length",
            Some(Value::U32(640)),
            "rope.dimension_count 128 must equal the head size 160",
        ),
        (
            "phi3.attention.head_count",
            Some(Value::U32(3)),
            "embedding_length 512 is not a multiple of head_count 3",
        ),
        (
            "phi3.attention.head_count_kv",
            Some(Value::U32(3)),
            "head_count 4 is not a multiple of head_count_kv 3",
        ),
        (
            "phi3.attention.head_count_kv",
            Some(Value::U32(2)),
            "tensor \"blk.0.attn_qkv.weight\" has shape [512, 768], expected [512, 1024]",
        ),
        (
            "phi3.feed_forward_length",
            Some(Value::U32(1024)),
            "tensor \"blk.0.ffn_up.weight\" has shape [512, 3072], expected [512, 2048]",
        ),
        (
            "phi3.rope.dimension_count",
            Some(Value::U32(64)),
            "rope.dimension_count 64 must equal the head size 128",
        ),
        (
            "phi3.attention.layer_norm_rms_epsilon",
            Some(Value::F32(f32::NAN)),
            "layer_norm_rms_epsilon NaN",
        ),
        (
            "phi3.attention.layer_norm_rms_epsilon",
            None,
            "layer_norm_rms_epsilon\": missing",
        ),
        (
            "phi3.rope.freq_base",
            Some(Value::F32(-1.0)),
            "rope.freq_base -1 is not a positive number",
        ),
        (
            "phi3.context_length",
            Some(Value::U32(0)),
            "phi3.context_length = 0 is outside",
        ),
    ];
    for (key, v, want) in cases {
        let e = edit(key, v);
        assert!(e.contains(want), "editing {key}: got {e:?}, want {want:?}");
    }
}

#[test]
fn tensors_that_do_not_match_phi4() {
    let dir = common::tmpdir();
    let spec = phi4_synth::Spec::small(1, common::ftype("f16"), 1);
    let path = common::synth_model(dir.path(), "m.gguf", &spec);
    let bytes = std::fs::read(&path).unwrap();
    let g = parse(&bytes).unwrap();
    // Rename a tensor: one unexpected, one missing.
    let dir2 = common::tmpdir();
    let p = dir2.path().join("r.gguf");
    let mut w = phi4::gguf::Writer::create(&p).unwrap();
    let shapes: Vec<Vec<u64>> = g.tensors.iter().map(|t| t.shape().to_vec()).collect();
    let names: Vec<String> = g
        .tensors
        .iter()
        .map(|t| t.name.replace("ffn_down", "ffn_gate"))
        .collect();
    w.header(
        &g.metadata,
        names
            .iter()
            .zip(&shapes)
            .zip(&g.tensors)
            .map(|((n, s), t)| (n.as_str(), s.as_slice(), t.ggml_type)),
    )
    .unwrap();
    for t in &g.tensors {
        w.tensor_data(&bytes[t.file_offset as usize..(t.file_offset + t.size) as usize])
            .unwrap();
    }
    w.finish().unwrap();
    let e = load_err(&std::fs::read(&p).unwrap());
    assert_eq!(
        e,
        "not a Phi-4 model: unexpected tensor \"blk.0.ffn_gate.weight\""
    );
}
