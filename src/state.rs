//! Saved session state: the tokens in a session's cache and their K/V rows, so that a long
//! prompt evaluated once is restored in the time it takes to read it back.
//!
//! The format (little-endian), version 2:
//!
//! ```text
//!   0  magic       "PHI4KV\r\n"
//!   8  version     u32 = 2 (1: a fingerprint of sampled tensor bytes)
//!  12  header crc  u32: CRC-32 of bytes 16 .. the end of the tokens
//!  16  model       16 bytes: the model's fingerprint (Model::fingerprint)
//!  32  kv type     u32: ggml type of the rows (1 = f16, 8 = q8_0, 2 = q4_0: the cache's)
//!  36  n_layer     u32
//!  40  row bytes   u32: one position's K (and V) in one layer
//!  44  n_tokens    u32: at most MAX_CONTEXT
//!  48  tokens      n_tokens x u32
//!      rows        per layer: K of the n_tokens positions, then V of them
//!      rows crc    u32: CRC-32 of the rows
//! ```
//!
//! A state is untrusted input. Every field is checked against the file's length and against the
//! session before anything is read into the session, the rows' checksum included (a first pass
//! over them); so a damaged file, one of another model, version or KV cache type, leaves the
//! session as it was. (Rows are not converted between cache types: quantizing f16 rows again
//! would give a session other values than evaluating the prompt with its own cache type.)
//! Saving writes a temporary file of its own beside the target (created exclusively, never
//! through a link), syncs it and renames it into place: a crash or a full disk never leaves a
//! half-written state under the target's name, and concurrent saves to one path each land whole.

use std::fs::File;
use std::io::{self, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::ggml;
use crate::kv_cache::{KvCache, KvType};
use crate::limits::MAX_CONTEXT;
use crate::model::Model;

pub const MAGIC: &[u8; 8] = b"PHI4KV\r\n";
pub const VERSION: u32 = 2;
const HEADER: usize = 48;
/// Rows move through a buffer of this size (not the whole state at once).
const CHUNK: usize = 4 << 20;

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// The file could not be read or written.
    #[error("{0}")]
    Io(String),
    /// Not a usable state for this session: damaged, another model's, another version's.
    #[error("{0}")]
    Invalid(String),
}

fn invalid(m: impl Into<String>) -> StateError {
    StateError::Invalid(m.into())
}

/// What every row of a state is, for a model and cache type: checked field by field when
/// reading.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Layout {
    ty: KvType,
    n_layer: usize,
    row: usize,
}

impl Layout {
    fn of(model: &Model, ty: KvType) -> Layout {
        Layout {
            ty,
            n_layer: model.config.n_layer,
            row: ty.row_bytes(&model.config) as usize,
        }
    }

    /// Bytes of a state of `n` tokens.
    fn len(self, n: usize) -> u64 {
        (HEADER + 4 * n + 4) as u64 + (2 * self.n_layer * n * self.row) as u64
    }
}

/// Bytes the state of `n` tokens takes.
pub(crate) fn size(model: &Model, ty: KvType, n: usize) -> u64 {
    Layout::of(model, ty).len(n)
}

/// Write the state of the first `tokens.len()` positions of `kv`.
pub(crate) fn write(
    model: &Model,
    kv: &KvCache,
    tokens: &[u32],
    w: &mut dyn Write,
) -> io::Result<()> {
    let layout = Layout::of(model, kv.ty);
    let mut head = Vec::with_capacity(HEADER + 4 * tokens.len());
    head.extend_from_slice(MAGIC);
    head.extend_from_slice(&VERSION.to_le_bytes());
    head.extend_from_slice(&[0; 4]); // the header crc, below
    head.extend_from_slice(&model.fingerprint());
    for v in [
        kv.ty.ggml().raw(),
        layout.n_layer as u32,
        layout.row as u32,
        tokens.len() as u32,
    ] {
        head.extend_from_slice(&v.to_le_bytes());
    }
    tokens
        .iter()
        .for_each(|t| head.extend_from_slice(&t.to_le_bytes()));
    let crc = crc32fast::hash(&head[16..]);
    head[12..16].copy_from_slice(&crc.to_le_bytes());
    w.write_all(&head)?;
    let mut crc = crc32fast::Hasher::new();
    let mut buf = vec![0u8; CHUNK.min(tokens.len() * layout.row).max(1)];
    for l in 0..layout.n_layer {
        for t in [kv.k[l], kv.v[l]] {
            for_chunks(tokens.len() * layout.row, buf.len(), |at, n| {
                ggml::tensor_read_bytes(kv.ctx.get(t), at, &mut buf[..n]);
                crc.update(&buf[..n]);
                w.write_all(&buf[..n])
            })?;
        }
    }
    w.write_all(&crc.finalize().to_le_bytes())
}

/// Call `f(offset, len)` over `total` bytes in pieces of at most `chunk`.
fn for_chunks<E>(
    total: usize,
    chunk: usize,
    mut f: impl FnMut(usize, usize) -> Result<(), E>,
) -> Result<(), E> {
    let mut at = 0;
    while at < total {
        let n = chunk.min(total - at);
        f(at, n)?;
        at += n;
    }
    Ok(())
}

/// What a temporary file of a save is called: `.NAME.phi4-PID-RANDOM.tmp`, beside the target.
/// The PID says whose it is (a save of a process that died is removed by the next save into
/// that directory); the random part makes it unpredictable and unique per save.
const TMP_TAG: &str = ".phi4-";
const TMP_SUFFIX: &str = ".tmp";

/// Save atomically: a temporary file of our own in the same directory (created exclusively,
/// never through a link, mode 0600), synced, renamed over `path`. The target must be absent or
/// a regular file: a link, a FIFO, a device or a directory there is refused (a link is not
/// followed: save to the file it names instead). Concurrent saves to one path each land whole
/// (the last rename wins); a crash leaves at most a temporary file, which the next save into
/// the directory removes once its process is gone.
pub(crate) fn save_file(
    path: &Path,
    write_state: impl FnOnce(&mut dyn Write) -> io::Result<()>,
) -> Result<(), StateError> {
    let io_err = |what: &Path, e: io::Error| StateError::Io(format!("{}: {e}", what.display()));
    let name = path
        .file_name()
        .ok_or_else(|| StateError::Io(format!("{}: not a file name", path.display())))?;
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    match std::fs::symlink_metadata(path) {
        Ok(m) if !m.file_type().is_file() => {
            return Err(StateError::Io(format!(
                "{}: not a regular file (saving never replaces a link, a FIFO, a device or a directory)",
                path.display()
            )))
        }
        Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(io_err(path, e)),
        _ => {}
    }
    sweep_temporaries(&dir);
    let (tmp, file) =
        create_temporary(&dir, &name.to_string_lossy()).map_err(|e| io_err(path, e))?;
    let result = (|| {
        let mut w = io::BufWriter::with_capacity(1 << 20, &file);
        write_state(&mut w)?;
        w.flush()?;
        drop(w);
        file.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if let Err(e) = result {
        let _ = std::fs::remove_file(&tmp);
        return Err(io_err(path, e));
    }
    // The rename itself is durable once the directory is synced (best effort: not every
    // file system lets a directory be opened for that).
    if let Ok(d) = File::open(&dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

/// A new temporary file for a save of `name` in `dir`: `O_CREAT | O_EXCL | O_NOFOLLOW`, mode
/// 0600, a name no one can predict (a name that exists, a planted link included, is never
/// opened: another is drawn).
fn create_temporary(dir: &Path, name: &str) -> io::Result<(PathBuf, File)> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut last = None;
    for _ in 0..16 {
        let tmp = dir.join(format!(
            ".{name}{TMP_TAG}{}-{:016x}{TMP_SUFFIX}",
            std::process::id(),
            random_u64()?
        ));
        match std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&tmp)
        {
            Ok(f) => return Ok((tmp, f)),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => last = Some(e),
            Err(e) => return Err(e),
        }
    }
    Err(last.unwrap_or_else(|| io::Error::other("no temporary name")))
}

/// 64 bits from the kernel's random source.
fn random_u64() -> io::Result<u64> {
    let mut b = [0u8; 8];
    io::Read::read_exact(&mut File::open("/dev/urandom")?, &mut b)?;
    Ok(u64::from_ne_bytes(b))
}

/// The process a save's temporary file belongs to, if `file_name` is one.
pub fn temporary_owner(file_name: &str) -> Option<u32> {
    let rest = file_name.strip_suffix(TMP_SUFFIX)?;
    let (_, owner) = rest.rsplit_once(TMP_TAG)?;
    let (pid, random) = owner.split_once('-')?;
    (file_name.starts_with('.') && random.len() == 16).then_some(())?;
    pid.parse().ok()
}

/// Bytes of saves' temporary files in a directory, after [`sweep_temporaries`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Temporaries {
    /// Of saves whose process is gone (killed mid-save): removed.
    pub removed: u64,
    /// Of saves under way in live processes: left.
    pub remaining: u64,
}

/// Remove the temporary files in `dir` left by saves whose process is gone, and count the
/// bytes of those still being written.
pub fn sweep_temporaries(dir: &Path) -> Temporaries {
    let mut t = Temporaries::default();
    // A process is gone when /proc no longer lists it (without /proc, none is known to be).
    let proc_known = Path::new("/proc/self").exists();
    let alive = |pid: u32| !proc_known || Path::new("/proc").join(pid.to_string()).exists();
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let name = entry.file_name();
        let Some(pid) = temporary_owner(&name.to_string_lossy()) else {
            continue;
        };
        let Ok(meta) = entry.metadata() else { continue };
        if !meta.is_file() {
            continue;
        }
        if alive(pid) {
            t.remaining += meta.len();
        } else if std::fs::remove_file(entry.path()).is_ok() {
            t.removed += meta.len();
        }
    }
    t
}

/// Open a state file for reading (regular files only: a FIFO or a device is refused, never
/// waited on).
pub(crate) fn open(path: &Path) -> Result<File, StateError> {
    use std::os::unix::fs::OpenOptionsExt;
    let err = |e: io::Error| StateError::Io(format!("{}: {e}", path.display()));
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
        .map_err(err)?;
    if !file.metadata().map_err(err)?.is_file() {
        return Err(StateError::Io(format!(
            "{}: not a regular file",
            path.display()
        )));
    }
    Ok(file)
}

/// Where a state is read from: a file (read twice: checked, then copied) or bytes.
pub(crate) trait Source {
    fn len(&self) -> io::Result<u64>;
    fn read_at(&self, at: u64, buf: &mut [u8]) -> io::Result<()>;
}

impl Source for File {
    fn len(&self) -> io::Result<u64> {
        Ok(self.metadata()?.len())
    }
    fn read_at(&self, at: u64, buf: &mut [u8]) -> io::Result<()> {
        self.read_exact_at(buf, at)
    }
}

impl Source for [u8] {
    fn len(&self) -> io::Result<u64> {
        Ok(<[u8]>::len(self) as u64)
    }
    fn read_at(&self, at: u64, buf: &mut [u8]) -> io::Result<()> {
        let at = usize::try_from(at).map_err(|_| io::ErrorKind::UnexpectedEof)?;
        let src = self
            .get(at..at + buf.len())
            .ok_or(io::ErrorKind::UnexpectedEof)?;
        buf.copy_from_slice(src);
        Ok(())
    }
}

/// A state read from a source: checked, not yet in any session.
pub(crate) struct Checked {
    pub tokens: Vec<u32>,
    layout: Layout,
    rows_crc: u32,
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

/// The tokens of the state file at `path`, its header checked against `model` and a session's
/// KV cache type `ty` (its rows are checked when it is loaded): to choose among saved states
/// without reading them.
pub fn tokens(model: &Model, ty: KvType, path: &Path) -> Result<Vec<u32>, StateError> {
    Ok(check_header(model, ty, &open(path)?)?.0)
}

/// Check everything about a state before any of it reaches a session: the header field by field,
/// the length, the header's checksum, the model, every token, and the rows' checksum.
pub(crate) fn check(
    model: &Model,
    ty: KvType,
    src: &(impl Source + ?Sized),
) -> Result<Checked, StateError> {
    let (tokens, want) = check_header(model, ty, src)?;
    let io = |e: io::Error| StateError::Io(format!("reading the state: {e}"));
    let (n, n_layer, row) = (tokens.len(), want.n_layer, want.row);
    // The rows' checksum, over all of them, before any row is used.
    let rows_at = (HEADER + 4 * n) as u64;
    let rows_len = (2 * n_layer * n * row) as u64;
    let mut stored = [0u8; 4];
    src.read_at(rows_at + rows_len, &mut stored).map_err(io)?;
    let mut buf = vec![0u8; CHUNK.min(rows_len as usize).max(1)];
    let mut crc = crc32fast::Hasher::new();
    for_chunks(rows_len as usize, buf.len(), |at, k| {
        src.read_at(rows_at + at as u64, &mut buf[..k])?;
        crc.update(&buf[..k]);
        Ok(())
    })
    .map_err(io)?;
    let rows_crc = u32::from_le_bytes(stored);
    if crc.finalize() != rows_crc {
        return Err(invalid("the K/V rows are damaged (checksum mismatch)"));
    }
    Ok(Checked {
        tokens,
        layout: want,
        rows_crc,
    })
}

/// The header of a state, checked: its tokens and layout.
fn check_header(
    model: &Model,
    ty: KvType,
    src: &(impl Source + ?Sized),
) -> Result<(Vec<u32>, Layout), StateError> {
    let io = |e: io::Error| StateError::Io(format!("reading the state: {e}"));
    let len = src.len().map_err(io)?;
    if len < HEADER as u64 {
        return Err(invalid(format!(
            "truncated: {len} bytes, less than a state's {HEADER}-byte header"
        )));
    }
    let mut head = [0u8; HEADER];
    src.read_at(0, &mut head).map_err(io)?;
    if &head[..8] != MAGIC {
        return Err(invalid("not a phi4 state (bad magic)"));
    }
    match u32_at(&head, 8) {
        VERSION => {}
        v => {
            return Err(invalid(format!(
                "state version {v}; this build reads version {VERSION}"
            )))
        }
    }
    let want = Layout::of(model, ty);
    let (kv_type, n_layer, row, n) = (
        u32_at(&head, 32),
        u32_at(&head, 36) as usize,
        u32_at(&head, 40) as usize,
        u32_at(&head, 44) as usize,
    );
    match KvType::from_ggml(kv_type) {
        Some(t) if t == ty => {}
        Some(t) => {
            return Err(invalid(format!(
                "saved from a {t} KV cache; this session keeps {ty} (make the session with \
                 the state's cache type to load it)"
            )))
        }
        None => {
            return Err(invalid(format!(
                "rows of ggml type {kv_type}, which no KV cache keeps"
            )))
        }
    }
    if n_layer != want.n_layer || row != want.row {
        return Err(invalid(format!(
            "made for a model of {n_layer} layers of {row}-byte rows; this one has {} of {}",
            want.n_layer, want.row
        )));
    }
    if n > MAX_CONTEXT {
        return Err(invalid(format!(
            "{n} tokens; a state holds at most {MAX_CONTEXT}"
        )));
    }
    if len != want.len(n) {
        return Err(invalid(format!(
            "{len} bytes; a state of {n} tokens has {} (truncated or extended)",
            want.len(n)
        )));
    }
    let mut rest = vec![0u8; 4 * n];
    src.read_at(HEADER as u64, &mut rest).map_err(io)?;
    let mut crc = crc32fast::Hasher::new();
    crc.update(&head[16..]);
    crc.update(&rest);
    if crc.finalize() != u32_at(&head, 12) {
        return Err(invalid("the header is damaged (checksum mismatch)"));
    }
    if head[16..32] != model.fingerprint() {
        return Err(invalid("made for another model (fingerprint mismatch)"));
    }
    let tokens: Vec<u32> = rest
        .chunks_exact(4)
        .map(|b| u32::from_le_bytes(b.try_into().expect("4 bytes")))
        .collect();
    if let Some(t) = tokens.iter().find(|&&t| t as usize >= model.config.n_vocab) {
        return Err(invalid(format!("token {t} is outside the vocabulary")));
    }
    Ok((tokens, want))
}

/// Copy the rows of the first `n` tokens of a checked state into `kv`. The rows are checked
/// again as they are copied; Err means the source changed after `check` and `kv`'s first `n`
/// positions hold a mix (the caller forgets them).
pub(crate) fn restore(
    checked: &Checked,
    src: &(impl Source + ?Sized),
    kv: &KvCache,
    n: usize,
) -> Result<(), StateError> {
    let Layout { n_layer, row, .. } = checked.layout;
    assert!(checked.layout.ty == kv.ty);
    let total = checked.tokens.len();
    assert!(n <= total && n <= kv.n_ctx);
    let rows_at = (HEADER + 4 * total) as u64;
    let block = total * row; // one tensor's rows in the state
    let mut buf = vec![0u8; CHUNK.min(block).max(1)];
    let mut crc = crc32fast::Hasher::new();
    let io = |e: io::Error| StateError::Io(format!("reading the state: {e}"));
    for l in 0..n_layer {
        for (i, t) in [kv.k[l], kv.v[l]].into_iter().enumerate() {
            let at0 = rows_at + ((2 * l + i) * block) as u64;
            for_chunks(block, buf.len(), |at, k| {
                src.read_at(at0 + at as u64, &mut buf[..k])?;
                crc.update(&buf[..k]);
                // Only the rows of the first n positions go into the cache.
                let keep = (n * row).saturating_sub(at).min(k);
                if keep > 0 {
                    ggml::tensor_write(kv.ctx.get(t), at, &buf[..keep]);
                }
                Ok(())
            })
            .map_err(io)?;
        }
    }
    if crc.finalize() != checked.rows_crc {
        return Err(invalid("the state changed while it was read"));
    }
    Ok(())
}

/// Copy the rows of the first `n` positions of `from` into `to` (caches of `model`'s shape).
pub(crate) fn copy(from: &KvCache, to: &KvCache, n: usize) {
    let row = from.row_bytes();
    assert!(n <= from.n_ctx && n <= to.n_ctx && from.k.len() == to.k.len() && from.ty == to.ty);
    let mut buf = vec![0u8; CHUNK.min(n * row).max(1)];
    for l in 0..from.k.len() {
        for (a, b) in [(from.k[l], to.k[l]), (from.v[l], to.v[l])] {
            let _ = for_chunks(n * row, buf.len(), |at, k| {
                ggml::tensor_read_bytes(from.ctx.get(a), at, &mut buf[..k]);
                ggml::tensor_write(to.ctx.get(b), at, &buf[..k]);
                Ok::<(), ()>(())
            });
        }
    }
}
