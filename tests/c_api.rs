//! The C ABI from C: tests/c/api_test.c built against the shipped library (`make dist`), run
//! directly and under valgrind (natively: valgrind does not run under an emulator).

mod common;

use phi4_synth::Spec;

use std::path::{Path, PathBuf};
use std::process::Command;

fn malformed(dir: &Path) -> PathBuf {
    let p = dir.join("bad.gguf");
    let good = std::fs::read(common::fixture("phi4-tiny-docs.gguf")).unwrap();
    std::fs::write(&p, &good[..good.len() / 3]).unwrap();
    p
}

/// The first CPU this process may run on (Linux's `Cpus_allowed_list`: "0-1", "2,5", ...).
fn first_allowed_cpu() -> String {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let list = status
        .lines()
        .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
        .expect("Cpus_allowed_list in /proc/self/status");
    list.trim()
        .split(|c: char| !c.is_ascii_digit())
        .next()
        .unwrap()
        .to_string()
}

#[test]
fn c_api_tests_pass_and_are_clean_under_valgrind() {
    let dir = common::tmpdir();
    let exe = common::build_c(dir.path(), "api_test.c", "api_test", &[]);
    let bad = malformed(dir.path());
    let demo = common::fixture("phi4-tiny-docs.gguf");
    let quantized = common::synth_model(
        dir.path(),
        "q.gguf",
        &Spec::small(1, common::ftype("q4_k_m"), 3),
    );

    let out = common::target_command(&exe)
        .arg(&demo)
        .arg(&bad)
        .arg(&quantized)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.trim_end().ends_with(" passed, 0 failed"), "{stdout}");
    // The kernels in use: phi4's own kernels take Q4_K where they have a vector path (AVX2 and
    // up, ARM dotprod); plain NEON (Raspberry Pi 4) runs ggml's, which have no repacked Q4_K
    // layout there.
    let line = |key: &str| {
        stdout
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .unwrap_or_else(|| panic!("no {key} in {stdout}"))
            .to_string()
    };
    let (features, repacked, kernels) = (
        line("cpu features: "),
        line("repacked: "),
        line("cpu kernels: "),
    );
    eprintln!("cpu kernels: {kernels} ({features}); repacked: {repacked}");
    assert_eq!(
        kernels,
        phi4::cpu_variant(),
        "a C program gets the kernels this process chose"
    );
    let fast_q4_k = features.split(' ').any(|f| f == "AVX2" || f == "DOTPROD");
    assert_eq!(
        repacked.contains("q4_K tensors into phi4's 8-row groups"),
        fast_q4_k,
        "{features}: {repacked}"
    );

    if common::runner().is_some() {
        eprintln!("under an emulator: valgrind runs in the native test run");
        return;
    }
    if Command::new("valgrind").arg("--version").output().is_err() {
        panic!("valgrind is not installed (the README's set-up installs it)");
    }
    // Valgrind runs one thread at a time, and ggml's threads wait for each other by spinning: on
    // one CPU the library makes one thread per session (`n_threads` defaults to the CPUs this
    // process may use), a third less time.
    let out = Command::new("taskset")
        .args(["--cpu-list", &first_allowed_cpu(), "valgrind"])
        .args([
            "--error-exitcode=99",
            "--leak-check=full",
            "--errors-for-leak-kinds=definite",
            "--show-leak-kinds=definite",
        ])
        .arg(&exe)
        .arg(&demo)
        .arg(&bad)
        .arg(&quantized)
        // Valgrind runs the threads one at a time: shorter replies where threads compare them.
        .arg("--short")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "valgrind: {}",
        &err[err.len().saturating_sub(4000)..]
    );
    assert!(err.contains("ERROR SUMMARY: 0 errors"), "{err}");
    assert!(
        err.contains("definitely lost: 0 bytes") || err.contains("no leaks are possible"),
        "{err}"
    );
}
