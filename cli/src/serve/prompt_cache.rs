//! `--prompt-cache-dir`: evaluated system prompts kept on disk across restarts. After a chat
//! whose first message is a system message, the session's state up to the end of that turn is
//! saved (once per distinct system turn); a session about to serve a prompt starts from the
//! longest saved prefix of it when that is more than its own cache holds. The directory is
//! bounded in bytes (saves under way included): the least recently used states are removed
//! first. Files are named by the hash of their tokens (and the scope they belong to: a state is
//! restored only for requests of its scope), and the KV cache type when it is not f16 (states
//! of another type, another server's on the same directory, are left alone); no request names a
//! file. Saves killed midway leave temporary files: removed at start and by every save.

use std::path::PathBuf;
use std::sync::Mutex;
use std::time::SystemTime;

use phi4::{KvType, Session};

use super::job::Scope;

struct Entry {
    path: PathBuf,
    /// Whose it is: named in the file's name (`SCOPE-HASH.kv`; `HASH.kv` for the shared scope).
    scope: Scope,
    tokens: Vec<u32>,
    bytes: u64,
    used: SystemTime,
}

pub struct PromptCache {
    dir: PathBuf,
    max_bytes: u64,
    /// None until the model is loaded (states are checked against it).
    entries: Mutex<Option<Vec<Entry>>>,
}

impl PromptCache {
    pub fn new(dir: PathBuf, max_bytes: u64) -> Result<PromptCache, String> {
        std::fs::create_dir_all(&dir)
            .map_err(|e| format!("--prompt-cache-dir {}: {e}", dir.display()))?;
        let swept = phi4::state::sweep_temporaries(&dir);
        if swept.removed > 0 {
            eprintln!(
                "prompt cache: removed {:.1} MiB of saves interrupted earlier",
                swept.removed as f64 / 1048576.0
            );
        }
        Ok(PromptCache {
            dir,
            max_bytes,
            entries: Mutex::new(None),
        })
    }

    /// The index, read from the directory on first use: every state of the sessions' model and
    /// cache type (others, and damaged ones, are left alone and never used).
    fn with_entries<T>(&self, session: &Session, f: impl FnOnce(&mut Vec<Entry>) -> T) -> T {
        let (model, kv_type) = (session.model(), session.kv_type());
        let mut guard = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        let entries = guard.get_or_insert_with(|| {
            let files = std::fs::read_dir(&self.dir).into_iter().flatten().flatten();
            files
                .filter(|f| f.path().extension().is_some_and(|e| e == "kv"))
                .filter_map(|f| {
                    let meta = f.metadata().ok()?;
                    let tokens = phi4::state::tokens(model, kv_type, &f.path()).ok()?;
                    Some(Entry {
                        scope: scope_of(&f.file_name().to_string_lossy()),
                        path: f.path(),
                        tokens,
                        bytes: meta.len(),
                        used: meta.modified().unwrap_or(SystemTime::UNIX_EPOCH),
                    })
                })
                .collect()
        });
        f(entries)
    }

    /// Start `session` from the longest saved prefix of `prompt` in `scope`, if that is longer
    /// than what its cache already shares with the prompt. Returns the tokens restored.
    pub fn restore(&self, session: &mut Session, prompt: &[u32], scope: Scope) -> usize {
        let have = session.common_prefix(prompt);
        let best = self.with_entries(session, |entries| {
            let e = entries
                .iter_mut()
                .filter(|e| e.scope == scope && e.tokens.len() > have)
                .filter(|e| prompt.starts_with(&e.tokens))
                .max_by_key(|e| e.tokens.len())?;
            e.used = SystemTime::now();
            Some(e.path.clone())
        });
        let Some(path) = best else { return 0 };
        match session.load(&path) {
            Ok(n) => n,
            Err(e) => {
                eprintln!("prompt cache: {} not used: {e}", path.display());
                self.with_entries(session, |entries| entries.retain(|x| x.path != path));
                0
            }
        }
    }

    /// Save the first `n` tokens of `session` (a system turn) in `scope` unless a state of
    /// exactly those tokens is kept there already; then remove the least recently used states
    /// beyond the bound.
    pub fn keep(&self, session: &Session, n: usize, scope: Scope) {
        let Some(tokens) = session.history().get(..n) else {
            return;
        };
        let kept = |e: &Entry| e.scope == scope && e.tokens == tokens;
        if self.with_entries(session, |entries| entries.iter().any(kept)) {
            return;
        }
        let ty = match session.kv_type() {
            KvType::F16 => String::new(),
            t => format!(".{t}"),
        };
        let name = match scope {
            Scope(0) => format!("{:016x}{ty}.kv", hash(tokens)),
            Scope(s) => format!("{s:016x}-{:016x}{ty}.kv", hash(tokens)),
        };
        let path = self.dir.join(name);
        match session.save(&path, n) {
            Ok(bytes) => {
                eprintln!(
                    "prompt cache: saved a {n}-token prefix ({:.1} MiB)",
                    bytes as f64 / 1048576.0
                );
                self.with_entries(session, |entries| {
                    entries.retain(|e| e.path != path);
                    entries.push(Entry {
                        scope,
                        path: path.clone(),
                        tokens: tokens.to_vec(),
                        bytes,
                        used: SystemTime::now(),
                    });
                    // Saves under way (another server's, on this directory) count too.
                    let pending = phi4::state::sweep_temporaries(&self.dir).remaining;
                    evict(entries, self.max_bytes.saturating_sub(pending));
                });
            }
            Err(e) => eprintln!("prompt cache: not saved: {e}"),
        }
    }
}

/// Remove the least recently used states until the rest fit in `max_bytes`.
fn evict(entries: &mut Vec<Entry>, max_bytes: u64) {
    entries.sort_by_key(|e| std::cmp::Reverse(e.used));
    let mut total = 0;
    entries.retain(|e| {
        total += e.bytes;
        if total <= max_bytes {
            return true;
        }
        let _ = std::fs::remove_file(&e.path);
        false
    });
}

/// The scope a saved state's file name says it is of.
fn scope_of(file_name: &str) -> Scope {
    let scope = file_name.split_once('-').map(|(s, _)| s);
    Scope(
        scope
            .and_then(|s| u64::from_str_radix(s, 16).ok())
            .unwrap_or(0),
    )
}

/// FNV-1a over the tokens: a stable file name for a prefix.
fn hash(tokens: &[u32]) -> u64 {
    tokens
        .iter()
        .flat_map(|t| t.to_le_bytes())
        .fold(0xcbf2_9ce4_8422_2325, |h, b| {
            (h ^ b as u64).wrapping_mul(0x100_0000_01b3)
        })
}
