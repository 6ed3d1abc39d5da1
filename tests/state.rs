//! Saved session state: restored sessions continue bit-identically (file, bytes, copy), a
//! partial match evaluates only the rest, and a damaged or foreign state is a clear error that
//! leaves the session as it was.

mod common;

use std::sync::Arc;

use phi4::model::{LoadParams, Model};
use phi4::session::{Session, SessionParams};
use phi4::StateError;
use phi4_synth::Spec;

fn load(path: &std::path::Path) -> Arc<Model> {
    Arc::new(Model::load(path, LoadParams::default()).unwrap())
}

fn session(m: &Arc<Model>, n_ctx: usize) -> Session {
    Session::new(
        m.clone(),
        &SessionParams {
            n_ctx,
            n_batch: 16,
            n_threads: 2,
            ..Default::default()
        },
    )
    .unwrap()
}

fn prompt(n: usize, n_vocab: usize, salt: usize) -> Vec<u32> {
    (0..n)
        .map(|i| ((i * 7919 + salt * 104_729 + 13) % (n_vocab - 8)) as u32)
        .collect()
}

fn bits(l: &[f32]) -> Vec<u32> {
    l.iter().map(|x| x.to_bits()).collect()
}

/// Save after a prompt; restore from the file, from bytes and by copying; every restored session
/// continues with logits bit-identical to the session that never stopped.
fn continues_bit_identically(path: &std::path::Path) {
    let m = load(path);
    let dir = common::tmpdir();
    let file = dir.path().join("prompt.kv");
    let p = prompt(37, m.config.n_vocab, 1);
    let mut a = session(&m, 256);
    a.evaluate(&p).unwrap();
    let written = a.save(&file, usize::MAX).unwrap();
    assert_eq!(written, std::fs::metadata(&file).unwrap().len());
    assert_eq!(written, a.state_size(usize::MAX));
    let mut bytes = Vec::new();
    a.save_to(&mut bytes, usize::MAX).unwrap();
    assert_eq!(
        bytes,
        std::fs::read(&file).unwrap(),
        "the file and the bytes are one format"
    );
    let mut copied = session(&m, 256);
    assert_eq!(copied.copy_from(&a).unwrap(), p.len());

    let next = prompt(5, m.config.n_vocab, 2);
    let want = bits(a.evaluate(&next).unwrap());
    let mut from_file = session(&m, 256);
    assert_eq!(from_file.load(&file).unwrap(), p.len());
    assert_eq!(from_file.history(), p.as_slice());
    let mut from_bytes = session(&m, 256);
    from_bytes.load_bytes(&bytes).unwrap();
    // The model loaded again from its file (as another process would): the state is its too.
    let again = load(path);
    let mut other = session(&again, 256);
    other.load(&file).unwrap();
    for (what, s) in [
        ("file", &mut from_file),
        ("bytes", &mut from_bytes),
        ("copy", &mut copied),
        ("file, model loaded again", &mut other),
    ] {
        assert_eq!(
            bits(s.evaluate(&next).unwrap()),
            want,
            "restored from {what}"
        );
        assert_eq!(s.history(), a.history());
    }
}

#[test]
fn restored_sessions_continue_bit_identically() {
    let dir = common::tmpdir();
    continues_bit_identically(&common::fixture("phi4-tiny-docs.gguf"));
    for (i, ft) in ["f16", "q8_0", "q4_0", "q4_k_m"].iter().enumerate() {
        continues_bit_identically(&common::synth_model(
            dir.path(),
            &format!("{ft}.gguf"),
            &Spec::small(2, common::ftype(ft), 40 + i as u64),
        ));
    }
}

/// A restored prompt that shares only a prefix with the next one: that prefix is kept, the rest
/// evaluated.
#[test]
fn a_partial_match_evaluates_only_the_rest() {
    let m = load(&common::fixture("phi4-tiny-docs.gguf"));
    let dir = common::tmpdir();
    let file = dir.path().join("p.kv");
    let p = prompt(40, m.config.n_vocab, 3);
    let mut a = session(&m, 256);
    a.evaluate(&p).unwrap();
    a.save(&file, usize::MAX).unwrap();
    let mut q = p[..25].to_vec();
    q.extend(prompt(10, m.config.n_vocab, 4));
    let mut b = session(&m, 256);
    b.load(&file).unwrap();
    assert_eq!(b.warm(&q).unwrap(), 10, "25 of 35 tokens restored");
    let mut fresh = session(&m, 256);
    assert_eq!(fresh.warm(&q).unwrap(), 35);
    // (Not bit-identical: the two caches' rows were computed in different micro-batches, which
    // some kernels sum in another order: close, as tests/parity.rs states for such orders.)
    let next = [q[0]];
    let (lb, lf) = (
        b.evaluate(&next).unwrap().to_vec(),
        fresh.evaluate(&next).unwrap().to_vec(),
    );
    let diff = lb
        .iter()
        .zip(&lf)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max);
    assert!(diff < 1e-2, "restored vs fresh logits differ by {diff}");
    // A state larger than the session's context: its first n_ctx tokens.
    let mut small = session(&m, 16);
    assert_eq!(small.load(&file).unwrap(), 16);
    assert_eq!(small.history(), &p[..16]);
    // Saving a prefix only.
    a.save(&file, 12).unwrap();
    assert_eq!(b.load(&file).unwrap(), 12);
}

fn expect_invalid(s: &mut Session, bytes: &[u8], says: &str, before: &[u32]) {
    match s.load_bytes(bytes) {
        Err(StateError::Invalid(m)) => {
            assert!(says.is_empty() || m.contains(says), "{m:?} lacks {says:?}")
        }
        other => panic!("expected an invalid state ({says}), got {other:?}"),
    }
    assert_eq!(s.history(), before, "the session is untouched");
}

/// Truncation at every header byte and in the rows, flipped bytes anywhere, another model's
/// state, another version, absurd counts: each a clear error; the session goes on.
#[test]
fn damaged_or_foreign_states_are_refused() {
    let m = load(&common::fixture("phi4-tiny-docs.gguf"));
    let mut a = session(&m, 128);
    a.evaluate(&prompt(9, m.config.n_vocab, 5)).unwrap();
    let mut good = Vec::new();
    a.save_to(&mut good, usize::MAX).unwrap();
    let head = 48 + 4 * 9;

    let mut b = session(&m, 128);
    b.evaluate(&prompt(4, m.config.n_vocab, 6)).unwrap();
    let before = b.history().to_vec();
    for cut in (0..head + 8).chain([good.len() / 2, good.len() - 5, good.len() - 1]) {
        expect_invalid(&mut b, &good[..cut], "", &before);
    }
    let mut extended = good.clone();
    extended.push(0);
    expect_invalid(&mut b, &extended, "truncated or extended", &before);
    // Every header byte flipped; then bytes spread over the rows.
    for i in (0..head).chain((head..good.len()).step_by(97)) {
        let mut bad = good.clone();
        bad[i] ^= 0x5a;
        expect_invalid(&mut b, &bad, "", &before);
    }
    let field = |at: usize, v: u32| {
        let mut bad = good.clone();
        bad[at..at + 4].copy_from_slice(&v.to_le_bytes());
        bad
    };
    expect_invalid(&mut b, &field(8, 2), "state version 2", &before);
    expect_invalid(&mut b, &field(44, u32::MAX), "at most 16384", &before);
    expect_invalid(&mut b, &field(36, 1 << 30), "layers", &before);
    expect_invalid(&mut b, &field(40, 7), "rows", &before);
    expect_invalid(&mut b, &field(32, 0), "ggml type 0", &before);
    expect_invalid(&mut b, &field(44, 8), "", &before);
    expect_invalid(
        &mut b,
        b"GGUF and more bytes than a state's header has, still not a state",
        "bad magic",
        &before,
    );

    // Another model of another shape; and one of the same shape, other weights: its
    // fingerprint differs.
    let dir = common::tmpdir();
    let spec = |seed| Spec::small(2, common::ftype("q8_0"), seed);
    let (x, y) = (
        load(&common::synth_model(dir.path(), "x.gguf", &spec(9))),
        load(&common::synth_model(dir.path(), "y.gguf", &spec(10))),
    );
    let mut sx = session(&x, 128);
    sx.evaluate(&[1, 2, 3]).unwrap();
    let mut foreign = Vec::new();
    sx.save_to(&mut foreign, usize::MAX).unwrap();
    expect_invalid(&mut b, &foreign, "made for a model of 2 layers", &before);
    let mut sy = session(&y, 128);
    sy.evaluate(&[4]).unwrap();
    match sy.load_bytes(&foreign) {
        Err(StateError::Invalid(m)) => assert!(m.contains("another model"), "{m}"),
        other => panic!("{other:?}"),
    }
    assert_eq!(sy.history(), [4]);
    assert!(
        matches!(sy.copy_from(&sx), Err(StateError::Invalid(_))),
        "no copying across models"
    );

    // Files: missing, a directory, a FIFO: errors, never a wait.
    assert!(matches!(
        b.load(&dir.path().join("missing.kv")),
        Err(StateError::Io(_))
    ));
    assert!(matches!(b.load(dir.path()), Err(StateError::Io(_))));
    let fifo = dir.path().join("fifo");
    assert!(std::process::Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap()
        .success());
    assert!(matches!(b.load(&fifo), Err(StateError::Io(m)) if m.contains("not a regular file")));

    // After all that, the session works and loads a good state.
    assert_eq!(b.history(), before);
    b.evaluate(&[5]).unwrap();
    assert_eq!(b.load_bytes(&good).unwrap(), 9);
}

/// A save into a directory that does not exist fails and leaves nothing behind (a full disk:
/// tests/cli.rs).
#[test]
fn a_failed_save_is_an_error() {
    let m = load(&common::fixture("phi4-tiny-docs.gguf"));
    let dir = common::tmpdir();
    let mut a = session(&m, 64);
    a.evaluate(&[1, 2, 3]).unwrap();
    assert!(
        matches!(a.save(&dir.path().join("no/such/dir.kv"), usize::MAX), Err(StateError::Io(m)) if m.contains("no/such/dir.kv"))
    );
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
}
