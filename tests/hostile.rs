//! The C ABI against a hostile host (tests/c/hostile_test.c): re-entrant callbacks, calls during
//! thread exit and atexit, racing error reads, FIFOs, allocation failures under an address-space
//! limit, and a stress run of 8 threads — natively also built with AddressSanitizer and
//! UndefinedBehaviorSanitizer, and a shorter stress run under valgrind.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use phi4::gguf::{Array, Value, Writer};

fn build(dir: &Path, name: &str, flags: &[&str]) -> PathBuf {
    common::build_c(dir, "hostile_test.c", name, flags)
}

fn check(what: &str, out: &Output) -> String {
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "{what}: {:?}\n{stdout}\n{}",
        out.status,
        &stderr[stderr.len().saturating_sub(6000)..]
    );
    assert!(stdout.contains(" passed, 0 failed"), "{what}: {stdout}");
    eprintln!(
        "{what}: {}",
        stdout
            .lines()
            .filter(|l| l.starts_with("stress") || l.contains("passed"))
            .collect::<Vec<_>>()
            .join("; ")
    );
    stdout
}

fn demo() -> PathBuf {
    common::fixture("phi4-tiny-docs.gguf")
}

#[test]
fn reentrant_callbacks_teardown_messages_and_fifos() {
    let dir = common::tmpdir();
    let exe = build(dir.path(), "hostile", &[]);
    let out = common::target_command(&exe)
        .arg("reentry")
        .arg(demo())
        .output()
        .unwrap();
    let stdout = check("reentry", &out);
    assert!(
        stdout.contains("atexit: ok"),
        "calls from an atexit handler: {stdout}"
    );
}

#[test]
fn allocation_failures_are_statuses() {
    if common::runner().is_some() {
        eprintln!(
            "under an emulator: address-space limits apply to the emulator; checked natively"
        );
        return;
    }
    // A GGUF file whose metadata is one 50 MB array: parsed in about 50 MB, so under a 1 GiB
    // address space it is a clean "not a Phi-4 model", not an abort.
    let dir = common::tmpdir();
    let big = dir.path().join("big-meta.gguf");
    let mut w = Writer::create(&big).unwrap();
    w.header(
        &[("big".into(), Value::Array(Array::U8(vec![7; 50 << 20])))],
        std::iter::empty(),
    )
    .unwrap();
    w.finish().unwrap();
    let exe = build(dir.path(), "hostile", &[]);
    let out = Command::new(&exe)
        .arg("limits")
        .arg(demo())
        .arg(&big)
        .output()
        .unwrap();
    let stdout = check("limits", &out);
    for l in stdout.lines().filter(|l| l.starts_with("headroom")) {
        eprintln!("  {l}");
    }
}

#[test]
fn stress_under_sanitizers_and_valgrind() {
    let dir = common::tmpdir();
    if common::runner().is_some() {
        let exe = build(dir.path(), "hostile", &[]);
        check(
            "stress (emulated)",
            &common::target_command(&exe)
                .arg("stress")
                .arg(demo())
                .arg("5")
                .output()
                .unwrap(),
        );
        return;
    }
    let asan = build(
        dir.path(),
        "hostile-asan",
        &[
            "-fsanitize=address,undefined",
            "-fno-sanitize-recover=all",
            "-fno-omit-frame-pointer",
        ],
    );
    // glibc's record of a thread-local destructor registered after the main thread's were run
    // (a Rust thread-local touched from the atexit handler): 32 bytes that exit never frees.
    let supp = dir.path().join("lsan.supp");
    std::fs::write(&supp, "leak:__cxa_thread_atexit_impl\n").unwrap();
    let lsan = format!("suppressions={}", supp.display());
    let env = [
        ("ASAN_OPTIONS", "detect_leaks=1:abort_on_error=1"),
        ("UBSAN_OPTIONS", "print_stacktrace=1:halt_on_error=1"),
        ("LSAN_OPTIONS", lsan.as_str()),
    ];
    check(
        "reentry (ASan+UBSan)",
        &Command::new(&asan)
            .arg("reentry")
            .arg(demo())
            .envs(env)
            .output()
            .unwrap(),
    );
    check(
        "stress (ASan+UBSan)",
        &Command::new(&asan)
            .arg("stress")
            .arg(demo())
            .arg("20")
            .envs(env)
            .output()
            .unwrap(),
    );

    let plain = build(dir.path(), "hostile", &[]);
    let out = Command::new("valgrind")
        .args([
            "--error-exitcode=99",
            "--leak-check=full",
            "--errors-for-leak-kinds=definite",
            "--show-leak-kinds=definite",
        ])
        .arg(&plain)
        .args(["stress".as_ref(), demo().as_os_str(), "8".as_ref()])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    check("stress (valgrind)", &out);
    assert!(
        err.contains("ERROR SUMMARY: 0 errors"),
        "{}",
        &err[err.len().saturating_sub(6000)..]
    );
}
