#![allow(dead_code)]

pub mod reference;
pub mod server;

use std::path::{Path, PathBuf};

use phi4_synth::{Ftype, Spec, Vocab};

/// The demo model (tests/fixtures/phi4-tiny-docs.gguf), loaded.
pub fn demo() -> std::sync::Arc<phi4::Model> {
    let path = fixture("phi4-tiny-docs.gguf");
    std::sync::Arc::new(phi4::Model::load(&path, Default::default()).unwrap())
}

/// A directory for test files, removed at the end of the test.
pub fn tmpdir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("phi4-test")
        .tempdir()
        .unwrap()
}

/// Write a synthetic model and return its path. Under an emulator the native CLI writes it
/// (`PHI4_OTHER_CLI`, set by ports/qemu-test): ggml's quantizers run tens of times slower
/// emulated, the grid types' set-up above all (IQ2_S's takes 6 s natively).
pub fn synth_model(dir: &Path, name: &str, spec: &Spec) -> PathBuf {
    let p = dir.join(name);
    let native = std::env::var_os("PHI4_OTHER_CLI").filter(|_| runner().is_some());
    // The CLI writes every field of a Spec but the RoPE base, which it takes from Spec::small.
    match native {
        Some(cli) if spec.rope_theta == Spec::small(1, spec.ftype, 0).rope_theta => {
            let mut c = std::process::Command::new(cli);
            c.arg("synth").arg("-o").arg(&p);
            for (flag, v) in [
                ("--ftype", spec.ftype.to_string()),
                ("--layers", spec.n_layer.to_string()),
                ("--embd", spec.n_embd.to_string()),
                ("--ff", spec.n_ff.to_string()),
                ("--heads", spec.n_head.to_string()),
                ("--kv-heads", spec.n_head_kv.to_string()),
                ("--ctx", spec.n_ctx.to_string()),
                ("--seed", spec.seed.to_string()),
            ] {
                c.args([flag, &v]);
            }
            match &spec.vocab {
                Vocab::Tiny(n) => c.args(["--vocab", &n.to_string()]),
                Vocab::From(f) => c.arg("--vocab-from").arg(f),
            };
            let out = output(&mut c);
            assert!(
                out.status.success(),
                "phi4 synth: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        _ => {
            phi4_synth::write(spec, &p).unwrap();
        }
    }
    p
}

/// The repository's root.
pub fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

pub fn fixture(name: &str) -> PathBuf {
    root().join("tests/fixtures").join(name)
}

pub fn ftype(s: &str) -> Ftype {
    s.parse().unwrap()
}

// Cross-testing. ports/qemu-test runs this suite built for another architecture under an
// emulator; the programs the tests build must then come from that target's toolchain and start
// under the same emulator. Natively none of these variables is set.
//   PHI4_TEST_RUNNER  the command that runs a target program ("qemu-aarch64 -L … -cpu cortex-a72")
//   PHI4_TEST_CROSS   the target's GNU toolchain prefix ("aarch64-linux-gnu")
//   DIST              where `make dist` puts the shipped files (the Makefile reads it too)

/// The emulator command, when the tests run under one.
pub fn runner() -> Option<Vec<String>> {
    let r = std::env::var("PHI4_TEST_RUNNER").ok()?;
    Some(r.split_whitespace().map(String::from).collect())
}

/// `c.output()`. Under an emulator the test process is an emulated one with many threads, and
/// qemu-user (7.2) can leave the child of its fork hung before it reaches exec: a child that has
/// not ended within `SPAWN_WAIT` is stopped and started again (twice at most). For the short
/// native programs the tests start from there (the x86_64 CLI writing a model or decoding a
/// few tokens: seconds).
pub fn output(c: &mut std::process::Command) -> std::process::Output {
    const SPAWN_WAIT: std::time::Duration = std::time::Duration::from_secs(120);
    if runner().is_none() {
        return c.output().unwrap();
    }
    let dir = tmpdir();
    let (out, err) = (dir.path().join("stdout"), dir.path().join("stderr"));
    for _ in 0..3 {
        let mut child = c
            .stdout(std::fs::File::create(&out).unwrap())
            .stderr(std::fs::File::create(&err).unwrap())
            .spawn()
            .unwrap();
        let start = std::time::Instant::now();
        while start.elapsed() < SPAWN_WAIT {
            if let Some(status) = child.try_wait().unwrap() {
                return std::process::Output {
                    status,
                    stdout: std::fs::read(&out).unwrap(),
                    stderr: std::fs::read(&err).unwrap(),
                };
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        eprintln!("{c:?}: no end after {SPAWN_WAIT:?}: started again");
        let _ = child.kill();
        let _ = child.wait();
    }
    panic!("{c:?}: hung three times");
}

/// A command that starts a program built for the target (under the emulator when there is one).
pub fn target_command(program: impl AsRef<std::ffi::OsStr>) -> std::process::Command {
    match runner() {
        Some(r) => {
            let mut c = std::process::Command::new(&r[0]);
            c.args(&r[1..]).arg(program);
            c
        }
        None => std::process::Command::new(program),
    }
}

/// The target's GNU toolchain prefix, if it is not the host.
pub fn cross() -> Option<String> {
    std::env::var("PHI4_TEST_CROSS")
        .ok()
        .filter(|s| !s.is_empty())
}

/// A target tool: `cc`, `c++`, `nm`, `readelf` (Debian's cross tools are `<prefix>-gcc`, …).
pub fn tool(name: &str) -> String {
    match (cross(), name) {
        (None, _) => name.to_string(),
        (Some(p), "cc") => format!("{p}-gcc"),
        (Some(p), "c++") => format!("{p}-g++"),
        (Some(p), _) => format!("{p}-{name}"),
    }
}

/// Build a C test program from tests/c/SOURCE against the shipped library (`make dist`), with
/// extra compiler flags; returns its path.
pub fn build_c(dir: &Path, source: &str, name: &str, flags: &[&str]) -> PathBuf {
    let dist = dist();
    let exe = dir.join(name);
    let out = std::process::Command::new(tool("cc"))
        .args([
            "-std=c99",
            "-D_DEFAULT_SOURCE",
            "-Wall",
            "-Wextra",
            "-Werror",
            "-O1",
            "-g",
        ])
        .args(flags)
        .arg(format!("-I{}", root().join("include").display()))
        .arg(root().join("tests/c").join(source))
        .arg(format!("-L{}", dist.display()))
        .arg(format!("-Wl,-rpath,{}", dist.display()))
        .args(["-lphi4", "-lpthread", "-lm", "-o"])
        .arg(&exe)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "cc {source}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    exe
}

/// The `phi4` CLI as shipped (`make dist` builds it with the libraries).
pub fn cli() -> PathBuf {
    dist().join("phi4")
}

/// `make dist` once per test binary; returns the directory with the shipped files.
pub fn dist() -> PathBuf {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let st = std::process::Command::new("make")
            .args(["-s", "dist"])
            .current_dir(root())
            .status()
            .unwrap();
        assert!(st.success(), "make dist");
    });
    root().join(std::env::var("DIST").unwrap_or_else(|_| "dist".into()))
}

/// The CPU kernels llama.cpp (the reference engine, in this process) runs: ggml's baseline build.
/// Tests that compare numbers with llama.cpp run phi4 on the same kernels: a child process gets
/// this in `PHI4_CPU_VARIANT`; this process is switched to them here (call it before any phi4
/// work in the test binary — phi4 chooses its kernels once per process).
#[allow(dead_code)]
pub fn reference_kernels() -> &'static str {
    static ONCE: std::sync::Once = std::sync::Once::new();
    let name = phi4::cpu_variants().last().expect("the baseline").0;
    ONCE.call_once(|| std::env::set_var("PHI4_CPU_VARIANT", name));
    name
}

/// Greedy decoding by a `phi4` command `c` (a CLI build, maybe under an emulator): `phi4 run
/// --raw --json` at temperature 0 without repeat penalty, `n` tokens after the token ids
/// `prompt` of `model`, with `flags` (threads, batch, context). Returns the tokens and whether
/// it ended with an end-of-generation token (not printed) rather than after `n`.
#[allow(dead_code)]
pub fn cli_greedy(
    mut c: std::process::Command,
    model: &Path,
    prompt: &[u32],
    n: usize,
    flags: &[&str],
) -> (Vec<u32>, bool) {
    let ids: Vec<String> = prompt.iter().map(|t| t.to_string()).collect();
    c.args([
        "run",
        "--raw",
        "--json",
        "--temperature",
        "0",
        "--repeat-penalty",
        "1",
    ])
    .args(flags)
    .args([
        "-n",
        &n.to_string(),
        "--prompt-ids",
        &ids.join(","),
        "--model",
    ])
    .arg(model);
    let out = output(&mut c);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "phi4 run: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let events: Vec<serde_json::Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    let tokens = events
        .iter()
        .filter_map(|v| v.get("token")?.as_u64())
        .map(|t| t as u32)
        .collect();
    let stopped = events.last().and_then(|v| v.get("done_reason")?.as_str()) == Some("stop");
    (tokens, stopped)
}

/// The Euclidean length of `v`.
#[allow(dead_code)]
pub fn norm(v: &[f32]) -> f64 {
    v.iter().map(|&x| (x as f64).powi(2)).sum::<f64>().sqrt()
}

/// The cosine of the angle between `a` and `b` (embeddings compared).
#[allow(dead_code)]
pub fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let dot: f64 = a.iter().zip(b).map(|(&x, &y)| x as f64 * y as f64).sum();
    dot / (norm(a) * norm(b))
}

/// How far phi4's logits may be from llama.cpp's on a synthetic file of type `ft`. Where both
/// engines run the same ggml kernels on the same micro-batches (f32, f16) the logits are
/// expected to be bit-identical (and are, on x86_64 AVX2); 1e-4 allows for another float
/// summation order (a few ulps of a sum over n_embd terms, for logits of standard deviation ~1).
///
/// Quantized weights (q8_0, q4_0, q2_k, q3_k, q4_k_m, iq4_xs, iq3_s, iq3_xxs, iq2_s, iq2_xs, iq2_xxs) run phi4's own kernels: the same integer
/// products of the same q8 activations, summed in another order. The activations are quantized
/// again before every product, and one ulp of difference can flip a rounding step there, moving
/// a logit by ~1/127 of a block's range — in every layer. ggml's own AVX-512 build differs from
/// its AVX2 build (the reference) by as much, for the same reason: over tests/parity.rs's 32
/// steps, up to 0.052 (q8_0), 0.049 (q4_0), 0.062 (q4_k_m), 0.076 (q3_k), 0.085 (q2_k), 0.087
/// (iq4_xs), 0.084 (iq3_s), 0.074 (iq3_xxs), 0.070 (iq2_s), 0.066 (iq2_xs), 0.074 (iq2_xxs);
/// phi4's kernels up to 0.050, 0.046, 0.073, 0.077, 0.090, 0.076, 0.073, 0.074, 0.107, 0.064,
/// 0.082. Hence 0.1, and 0.15 where ggml's own builds already differ by more than 0.075 or the
/// weights are 2-bit (a rounding step of the tokens meets larger weight steps).
#[allow(dead_code)]
pub fn logit_tolerance(ft: &str) -> f32 {
    match ft {
        "f32" | "f16" => 1e-4,
        "q2_k" | "q3_k" | "iq4_xs" | "iq3_s" | "iq2_s" | "iq2_xs" | "iq2_xxs" => 0.15,
        _ => 0.1,
    }
}
