//! The C ABI from C: tests/c/api_test.c built against the shipped library (`make dist`), run
//! directly and under valgrind (natively: valgrind does not run under an emulator).

mod common;

use phi4_synth::Spec;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

fn malformed(dir: &Path) -> PathBuf {
    let p = dir.join("bad.gguf");
    let good = std::fs::read(common::fixture("phi4-tiny-docs.gguf")).unwrap();
    std::fs::write(&p, &good[..good.len() / 3]).unwrap();
    p
}

/// The CPUs this process may run on (Linux's `Cpus_allowed_list`: "0-1", "2,5-7", ...).
fn allowed_cpus() -> Vec<u32> {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let list = status
        .lines()
        .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
        .expect("Cpus_allowed_list in /proc/self/status");
    let mut cpus = Vec::new();
    for range in list.trim().split(',') {
        let (a, b) = range.split_once('-').unwrap_or((range, range));
        cpus.extend(a.parse::<u32>().unwrap()..=b.parse::<u32>().unwrap());
    }
    cpus
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
    // process may use), a third less time. The tests run in two parts, each in its own valgrind
    // on its own CPU (both on one when there is one).
    let cpus = allowed_cpus();
    let parts = ["1/2", "2/2"];
    let runs: Vec<_> = parts
        .iter()
        .enumerate()
        .map(|(i, part)| {
            Command::new("taskset")
                .args(["--cpu-list", &cpus[i % cpus.len()].to_string(), "valgrind"])
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
                // Valgrind runs the threads one at a time: shorter replies where threads compare
                // them.
                .args(["--short", "--part", part])
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    for (run, part) in runs.into_iter().zip(parts) {
        let out = run.wait_with_output().unwrap();
        let (stdout, err) = (
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
        );
        // The last 4000 bytes, cut before decoding: a cut in the decoded text may split a
        // character.
        let tail = String::from_utf8_lossy(&out.stderr[out.stderr.len().saturating_sub(4000)..]);
        assert!(
            out.status.success(),
            "valgrind, part {part}: {stdout}{tail}"
        );
        assert!(
            stdout.trim_end().ends_with(" passed, 0 failed"),
            "part {part}: {stdout}"
        );
        assert!(
            err.contains("ERROR SUMMARY: 0 errors"),
            "part {part}: {err}"
        );
        assert!(
            err.contains("definitely lost: 0 bytes") || err.contains("no leaks are possible"),
            "part {part}: {err}"
        );
    }
}
