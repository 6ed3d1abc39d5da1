//! Saved session state: restored sessions continue bit-identically (file, bytes, copy), a
//! partial match evaluates only the rest, and a damaged or foreign state is a clear error that
//! leaves the session as it was.

mod common;

use std::sync::Arc;

use phi4::model::{LoadParams, Model};
use phi4::session::{Session, SessionParams};
use phi4::{KvType, StateError};
use phi4_synth::Spec;

fn load(path: &std::path::Path) -> Arc<Model> {
    Arc::new(Model::load(path, LoadParams::default()).unwrap())
}

fn session(m: &Arc<Model>, n_ctx: usize) -> Session {
    session_kv(m, n_ctx, KvType::F16)
}

fn session_kv(m: &Arc<Model>, n_ctx: usize, kv_type: KvType) -> Session {
    Session::new(
        m.clone(),
        &SessionParams {
            n_ctx,
            n_batch: 16,
            n_threads: 2,
            kv_type,
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
/// (of the same KV cache type `kv`) continues with logits bit-identical to the session that
/// never stopped.
fn continues_bit_identically(path: &std::path::Path, kv: KvType) {
    let m = load(path);
    let session = |m: &Arc<Model>, n_ctx| session_kv(m, n_ctx, kv);
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
    for kv in KvType::ALL {
        continues_bit_identically(&common::fixture("phi4-tiny-docs.gguf"), kv);
    }
    for (i, ft) in ["f16", "q8_0", "q4_0", "q4_k_m"].iter().enumerate() {
        continues_bit_identically(
            &common::synth_model(
                dir.path(),
                &format!("{ft}.gguf"),
                &Spec::small(2, common::ftype(ft), 40 + i as u64),
            ),
            KvType::F16,
        );
    }
}

/// A state records its KV cache type: one of another type is a clear error (rows are not
/// converted), by file, bytes or copy, and the session keeps what it had.
#[test]
fn a_state_of_another_cache_type_is_refused() {
    let m = load(&common::fixture("phi4-tiny-docs.gguf"));
    let p = prompt(11, m.config.n_vocab, 6);
    let mut q8 = session_kv(&m, 64, KvType::Q8_0);
    q8.evaluate(&p).unwrap();
    let mut bytes = Vec::new();
    q8.save_to(&mut bytes, usize::MAX).unwrap();
    assert_eq!(bytes.len() as u64, q8.state_size(usize::MAX));
    let mut f16 = session(&m, 64);
    f16.evaluate(&p).unwrap();
    assert!(
        q8.state_size(usize::MAX) < f16.state_size(usize::MAX),
        "q8_0 rows are smaller"
    );
    for kv in [KvType::F16, KvType::Q4_0] {
        let mut other = session_kv(&m, 64, kv);
        let before = prompt(4, m.config.n_vocab, 7);
        other.evaluate(&before).unwrap();
        expect_invalid(&mut other, &bytes, "q8_0 KV cache", &before);
        match other.copy_from(&q8) {
            Err(StateError::Invalid(msg)) => assert!(msg.contains("different types"), "{msg}"),
            r => panic!("a copy across cache types: {r:?}"),
        }
        assert_eq!(other.history(), before.as_slice());
        assert_eq!(other.evaluate(&[1]).unwrap().len(), m.config.n_vocab);
    }
    let mut same = session_kv(&m, 64, KvType::Q8_0);
    assert_eq!(same.load_bytes(&bytes).unwrap(), p.len());
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
    expect_invalid(&mut b, &field(8, 1), "state version 1", &before);
    expect_invalid(&mut b, &field(8, 3), "state version 3", &before);
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

/// A small model and a session holding a prompt, for the save tests.
fn saved_session() -> (Arc<Model>, Session) {
    // The model stays mapped after its directory is gone.
    let dir = common::tmpdir();
    let spec = Spec::small(1, common::ftype("q8_0"), 3);
    let m = load(&common::synth_model(dir.path(), "save", &spec));
    let mut s = session(&m, 64);
    s.evaluate(&prompt(9, m.config.n_vocab, 4)).unwrap();
    (m, s)
}

/// Names a save's temporary file could have had before: beside the target, predictable.
fn planted_names(dir: &std::path::Path, name: &str) -> Vec<std::path::PathBuf> {
    let pid = std::process::id();
    vec![
        dir.join(format!(".{name}.{pid}.tmp")),
        dir.join(format!(".{name}.tmp")),
        dir.join(format!("{name}.tmp")),
    ]
}

/// Someone who can write the directory plants links where a temporary file might go: the save
/// never writes through them, and the file they point to keeps its bytes.
#[test]
fn a_save_never_follows_a_planted_link() {
    let (_, s) = saved_session();
    let dir = common::tmpdir();
    let precious = dir.path().join("precious.txt");
    std::fs::write(&precious, b"keep me").unwrap();
    for link in planted_names(dir.path(), "state.kv") {
        std::os::unix::fs::symlink(&precious, link).unwrap();
    }
    let target = dir.path().join("state.kv");
    s.save(&target, usize::MAX).unwrap();
    assert_eq!(std::fs::read(&precious).unwrap(), b"keep me");
    assert!(std::fs::symlink_metadata(&target).unwrap().is_file());
    let mode =
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&target).unwrap().permissions());
    assert_eq!(mode & 0o077, 0, "a state is its owner's alone: {mode:o}");
    // Only the state and what was planted are left: no temporary file.
    let left = std::fs::read_dir(dir.path()).unwrap().count();
    assert_eq!(left, 2 + planted_names(dir.path(), "state.kv").len());
}

/// A target that is not a regular file is refused, and stays what it was.
#[test]
fn a_save_replaces_only_a_regular_file() {
    let (_, s) = saved_session();
    let dir = common::tmpdir();
    let precious = dir.path().join("precious.txt");
    std::fs::write(&precious, b"keep me").unwrap();
    let link = dir.path().join("link.kv");
    std::os::unix::fs::symlink(&precious, &link).unwrap();
    let fifo = dir.path().join("fifo.kv");
    let made = std::process::Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap();
    assert!(made.success());
    let sub = dir.path().join("dir.kv");
    std::fs::create_dir(&sub).unwrap();
    for target in [&link, &fifo, &sub] {
        let err = s.save(target, usize::MAX).unwrap_err().to_string();
        assert!(
            err.contains("not a regular file"),
            "{}: {err}",
            target.display()
        );
    }
    assert!(std::fs::symlink_metadata(&link)
        .unwrap()
        .file_type()
        .is_symlink());
    assert_eq!(std::fs::read(&precious).unwrap(), b"keep me");
    use std::os::unix::fs::FileTypeExt;
    assert!(std::fs::metadata(&fifo).unwrap().file_type().is_fifo());
    assert!(std::fs::metadata(&sub).unwrap().is_dir());
    // A regular file is replaced.
    let plain = dir.path().join("plain.kv");
    std::fs::write(&plain, b"old").unwrap();
    s.save(&plain, usize::MAX).unwrap();
    assert_eq!(
        std::fs::read(&plain).unwrap().len() as u64,
        s.state_size(usize::MAX)
    );
}

/// Sessions saving to one path at once: every save lands whole or fails, none fails for the
/// others, and the file left is a whole state.
#[test]
fn concurrent_saves_to_one_path_each_land_whole() {
    let (m, a) = saved_session();
    let mut b = session(&m, 64);
    b.evaluate(&prompt(13, m.config.n_vocab, 5)).unwrap();
    let dir = common::tmpdir();
    let target = dir.path().join("shared.kv");
    std::thread::scope(|scope| {
        for s in [&a, &b] {
            let target = &target;
            scope.spawn(move || {
                for _ in 0..40 {
                    s.save(target, usize::MAX)
                        .expect("every concurrent save lands");
                }
            });
        }
    });
    let mut c = session(&m, 64);
    let n = c.load(&target).unwrap();
    assert!(
        n == 9 || n == 13,
        "one of the two states, whole: {n} tokens"
    );
    assert_eq!(
        std::fs::read_dir(dir.path()).unwrap().count(),
        1,
        "no temporary file left"
    );
}

/// A save killed midway leaves its temporary file; the next save into the directory removes it
/// once its process is gone (and never one of a live process).
#[test]
fn temporary_files_of_dead_saves_are_removed() {
    let (_, s) = saved_session();
    let dir = common::tmpdir();
    let mut child = std::process::Command::new("true").spawn().unwrap();
    let dead = child.id();
    child.wait().unwrap();
    let stale = dir
        .path()
        .join(format!(".x.kv.phi4-{dead}-0123456789abcdef.tmp"));
    let live = dir.path().join(format!(
        ".x.kv.phi4-{}-0123456789abcdef.tmp",
        std::process::id()
    ));
    let other = dir.path().join(".x.kv.notours.tmp");
    for f in [&stale, &live, &other] {
        std::fs::write(f, vec![0u8; 4096]).unwrap();
    }
    assert_eq!(
        phi4::state::temporary_owner(&stale.file_name().unwrap().to_string_lossy()),
        Some(dead)
    );
    assert_eq!(phi4::state::temporary_owner(".x.kv.notours.tmp"), None);
    s.save(&dir.path().join("x.kv"), usize::MAX).unwrap();
    let swept = phi4::state::sweep_temporaries(dir.path());
    assert_eq!(
        swept,
        phi4::state::Temporaries {
            removed: 0,
            remaining: 4096
        },
        "the live one is counted"
    );
    assert!(!stale.exists(), "a dead save's temporary file is removed");
    assert!(
        live.exists() && other.exists(),
        "a live process's and other files are not"
    );
}

/// Two models that differ only in the middle of one tensor's data are two models: a state of
/// one is refused by the other.
#[test]
fn a_model_differing_mid_tensor_refuses_the_others_state() {
    let dir = common::tmpdir();
    let a_path = common::synth_model(
        dir.path(),
        "a.gguf",
        &Spec::small(1, common::ftype("q8_0"), 7),
    );
    let b_path = dir.path().join("b.gguf");
    let mut bytes = std::fs::read(&a_path).unwrap();
    let g = phi4::gguf::parse_file(&a_path).unwrap();
    let t = g.tensors.iter().max_by_key(|t| t.size).unwrap();
    let mid = (t.file_offset + t.size / 2) as usize;
    bytes[mid] ^= 0x01;
    std::fs::write(&b_path, &bytes).unwrap();
    let (a, b) = (load(&a_path), load(&b_path));
    assert_ne!(
        a.fingerprint(),
        b.fingerprint(),
        "{} differs at byte {mid}",
        t.name
    );
    let mut sa = session(&a, 64);
    sa.evaluate(&prompt(9, a.config.n_vocab, 4)).unwrap();
    let mut state = Vec::new();
    sa.save_to(&mut state, usize::MAX).unwrap();
    let mut sb = session(&b, 64);
    let err = sb.load_bytes(&state).unwrap_err().to_string();
    assert!(err.contains("another model"), "{err}");
    assert_eq!(
        a.fingerprint(),
        load(&a_path).fingerprint(),
        "the same file, the same fingerprint"
    );
}
