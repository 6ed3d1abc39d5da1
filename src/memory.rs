//! The memory plan: what running a model would hold — its weights (in place in the file
//! mapping, or repacked), the sessions' KV caches, the compute and work buffers — worked out
//! before anything is allocated (on a declared model, [`Model::declare`]: graphs are built and
//! sized, never computed), and the memory this process may still have now (`MemAvailable`, the
//! cgroup's limit). A command compares the two before it loads the model, instead of being
//! killed by the kernel halfway through.

use std::path::Path;

use crate::forward;
use crate::kv_cache::{KvCache, KvType};
use crate::limits::{check_max_batch, check_threads, cpu_count, DEFAULT_BATCH};
use crate::model::{Model, Resident};
use crate::session::SessionParams;

/// Memory a process running phi4 holds beside its weights, caches and buffers: the tokenizer's
/// tables (≈ 30 MB for Phi-4's 100,352 tokens), the code, the threads' stacks, the allocator's
/// slack (measured: `phi4 run` on the demo model peaks 9 MB above its weights and buffers;
/// on the full-scale model, see the README's memory section).
pub const RUNTIME: u64 = 96 << 20;

/// What a plan is for: `sessions` sessions of `n_ctx` positions whose caches keep `kv_type`,
/// run on one scheduler of `n_threads` threads (its own for one session; shared, stepping them
/// together, for several), prompts in micro-batches of `n_batch`.
#[derive(Debug, Clone, PartialEq)]
pub struct PlanParams {
    /// 0: the default context ([`SessionParams::context_for`]).
    pub n_ctx: usize,
    pub kv_type: KvType,
    pub sessions: usize,
    pub n_batch: usize,
    pub n_threads: usize,
}

impl Default for PlanParams {
    fn default() -> PlanParams {
        let s = SessionParams::default();
        PlanParams {
            n_ctx: s.n_ctx,
            kv_type: s.kv_type,
            sessions: 1,
            n_batch: DEFAULT_BATCH,
            n_threads: cpu_count(),
        }
    }
}

/// Bytes a run would hold, by what holds them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Plan {
    /// The context each session gets (the parameters' 0 resolved).
    pub n_ctx: usize,
    pub kv_type: KvType,
    pub sessions: usize,
    pub weights: Resident,
    /// Every session's KV cache.
    pub kv_cache: u64,
    /// The scheduler's compute buffer: the largest graph's intermediate tensors.
    pub compute: u64,
    /// The scheduler's work buffer (tokens quantized for the products, per thread scratch).
    pub work: u64,
    /// [`RUNTIME`].
    pub runtime: u64,
}

impl Plan {
    pub fn total(&self) -> u64 {
        self.weights.total() + self.kv_cache + self.compute + self.work + self.runtime
    }
}

/// The plan of `p` on `model` (declared or loaded; nothing is allocated either way), or why the
/// parameters are invalid.
pub fn plan(model: &Model, p: &PlanParams) -> Result<Plan, String> {
    check_threads(p.n_threads)?;
    check_max_batch(p.sessions)?;
    if p.n_batch == 0 {
        return Err("n_batch must be at least 1".into());
    }
    p.kv_type.check(&model.config)?;
    let sp = SessionParams {
        n_ctx: p.n_ctx,
        ..Default::default()
    };
    let n_ctx = sp.context_for(model)?;
    let kv = KvCache::new(&model.config, n_ctx, p.kv_type, true)
        .map_err(|e| format!("declaring the KV cache: {e}"))?;
    let threads = p.n_threads.min(cpu_count());
    let (compute, work) = forward::measure(model, &kv, p.n_batch, threads, p.sessions);
    Ok(Plan {
        n_ctx,
        kv_type: p.kv_type,
        sessions: p.sessions,
        weights: model.resident,
        kv_cache: p.sessions as u64 * n_ctx as u64 * p.kv_type.bytes_per_token(&model.config),
        compute: compute as u64,
        work: work as u64,
        runtime: RUNTIME,
    })
}

/// The largest context of `p` (its `n_ctx` aside) whose plan fits in `budget` bytes, at most
/// the model's; 0 when not even one position does.
pub fn largest_context(model: &Model, p: &PlanParams, budget: u64) -> Result<usize, String> {
    let fits = |n: usize| -> Result<bool, String> {
        let q = PlanParams {
            n_ctx: n,
            ..p.clone()
        };
        Ok(plan(model, &q)?.total() <= budget)
    };
    let max = model.config.n_ctx_train.min(crate::limits::MAX_CONTEXT);
    if !fits(1)? {
        return Ok(0);
    }
    // The plan grows with the context: bisect on it (a few dozen graphs sized).
    let (mut lo, mut hi) = (1, max);
    while lo < hi {
        let mid = lo + (hi - lo).div_ceil(2);
        match fits(mid)? {
            true => lo = mid,
            false => hi = mid - 1,
        }
    }
    Ok(lo)
}

/// Memory this process may still take, and what says so.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Available {
    pub bytes: u64,
    /// "MemAvailable" (the system's estimate: free memory and what can be reclaimed without
    /// swapping), or "the cgroup's limit" (its limit less what its processes hold, page cache
    /// that can be dropped aside) when that is less.
    pub source: &'static str,
}

/// The environment variable that, set to a size ("7.5G", "8000M", bytes), is taken as the
/// memory available instead of the system's figure: to plan for another machine (an 8 GB
/// board) on this one, or to test a refusal.
pub const AVAILABLE_ENV: &str = "PHI4_MEMORY_AVAILABLE";

/// A size: bytes, or a number with K, M, G or T (powers of 1024; "GiB", "GB" read alike).
pub fn parse_size(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let at = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(at);
    let shift = match unit.trim().to_ascii_uppercase().as_str() {
        "" | "B" => 0,
        "K" | "KB" | "KIB" => 10,
        "M" | "MB" | "MIB" => 20,
        "G" | "GB" | "GIB" => 30,
        "T" | "TB" | "TIB" => 40,
        _ => return Err(format!("{text:?} is not a size (e.g. 7.5G, 8000M)")),
    };
    let n: f64 = num
        .parse()
        .map_err(|_| format!("{text:?} is not a size (e.g. 7.5G, 8000M)"))?;
    let bytes = n * (1u64 << shift) as f64;
    match bytes.is_finite() && bytes >= 0.0 && bytes < u64::MAX as f64 {
        true => Ok(bytes as u64),
        false => Err(format!("{text:?} is out of range")),
    }
}

/// The memory available now ([`AVAILABLE_ENV`] when set), or None where neither the system
/// nor a cgroup says (not Linux).
pub fn available() -> Result<Option<Available>, String> {
    match std::env::var(AVAILABLE_ENV) {
        Ok(v) => Ok(Some(Available {
            bytes: parse_size(&v).map_err(|e| format!("{AVAILABLE_ENV}: {e}"))?,
            source: AVAILABLE_ENV,
        })),
        Err(_) => Ok(measured()),
    }
}

/// The system's and the cgroup's figure, the smaller.
fn measured() -> Option<Available> {
    let system = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| kib_field(&m, "MemAvailable:"))
        .map(|bytes| Available {
            bytes,
            source: "MemAvailable",
        });
    let cgroup = cgroup_room().map(|bytes| Available {
        bytes,
        source: "the cgroup's limit",
    });
    match (system, cgroup) {
        (Some(s), Some(c)) => Some(if c.bytes < s.bytes { c } else { s }),
        (s, c) => s.or(c),
    }
}

/// `name value kB` in a /proc/meminfo-style text, in bytes.
fn kib_field(text: &str, name: &str) -> Option<u64> {
    let line = text.lines().find(|l| l.starts_with(name))?;
    let kib: u64 = line[name.len()..].split_whitespace().next()?.parse().ok()?;
    Some(kib * 1024)
}

/// `name value` (bytes) in a cgroup's memory.stat.
fn stat_field(text: &str, name: &str) -> Option<u64> {
    text.lines().find_map(|l| {
        let (k, v) = l.split_once(' ')?;
        (k == name).then(|| v.trim().parse().ok())?
    })
}

/// Room left under the limits of this process's cgroup and its ancestors (v2), or of its
/// memory cgroup (v1): the smallest limit less usage (inactive page cache counts as free).
fn cgroup_room() -> Option<u64> {
    let own = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    let read = |p: &Path, f: &str| std::fs::read_to_string(p.join(f)).ok();
    let mut room: Option<u64> = None;
    let mut take = |limit: Option<u64>, usage: Option<u64>, inactive: Option<u64>| {
        if let (Some(limit), Some(usage)) = (limit, usage) {
            let left = limit.saturating_sub(usage.saturating_sub(inactive.unwrap_or(0)));
            room = Some(room.map_or(left, |r| r.min(left)));
        }
    };
    for line in own.lines() {
        let mut parts = line.splitn(3, ':');
        let (_, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
        let path = path.trim_start_matches('/');
        if controllers.is_empty() {
            // v2: this cgroup and every ancestor up to the root's children.
            let mut dir = Path::new("/sys/fs/cgroup").join(path);
            while dir != Path::new("/sys/fs/cgroup") {
                let limit = read(&dir, "memory.max").and_then(|v| v.trim().parse().ok());
                let usage = read(&dir, "memory.current").and_then(|v| v.trim().parse().ok());
                let stat = read(&dir, "memory.stat").unwrap_or_default();
                take(limit, usage, stat_field(&stat, "inactive_file"));
                if !dir.pop() {
                    break;
                }
            }
        } else if controllers.split(',').any(|c| c == "memory") {
            let dir = Path::new("/sys/fs/cgroup/memory").join(path);
            // v1 reports "no limit" as a huge number: above the machine's memory, it is none.
            let limit = read(&dir, "memory.limit_in_bytes")
                .and_then(|v| v.trim().parse::<u64>().ok())
                .filter(|&l| l < 1 << 60);
            let usage = read(&dir, "memory.usage_in_bytes").and_then(|v| v.trim().parse().ok());
            let stat = read(&dir, "memory.stat").unwrap_or_default();
            take(limit, usage, stat_field(&stat, "total_inactive_file"));
        }
    }
    room
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields() {
        let meminfo = "MemTotal:       24608068 kB\nMemFree:        21000000 kB\nMemAvailable:   22512340 kB\n";
        assert_eq!(kib_field(meminfo, "MemAvailable:"), Some(22512340 * 1024));
        assert_eq!(kib_field(meminfo, "SwapFree:"), None);
        let stat = "anon 1000\nfile 5000\ninactive_file 3000\n";
        assert_eq!(stat_field(stat, "inactive_file"), Some(3000));
        assert_eq!(stat_field(stat, "active_file"), None);
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("8G"), Ok(8 << 30));
        assert_eq!(parse_size("7.5 GiB"), Ok(15 << 29));
        assert_eq!(parse_size("8000m"), Ok(8000 << 20));
        assert_eq!(parse_size("123"), Ok(123));
        for bad in ["", "G", "8X", "-1G", "1e400G", "1.2.3G"] {
            assert!(parse_size(bad).is_err(), "{bad}");
        }
    }
}
