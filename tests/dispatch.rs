//! Runtime kernel selection: of the CPU kernel variants this build holds, the best one that the
//! CPU and the OS support runs (ports/qemu-test names the one each emulated CPU must get, in
//! PHI4_EXPECT_CPU_VARIANT), a variant may be asked for by name, and the x86_64 build runs its
//! baseline (AVX2) kernels on an AVX2-only CPU. tests/agreement.rs checks that the kernels chosen
//! decode as the others do.

mod common;

use std::process::Command;

/// An AVX2-only x86_64 CPU model of qemu-user (Haswell without TSX: AVX2, FMA, F16C, BMI2).
pub const AVX2_ONLY_CPU: &str = "Haswell-v4";

/// What `phi4 info` says of the kernels, run by `c`.
fn kernels_line(mut c: Command) -> String {
    let out = c.arg("info").output().expect("phi4 info");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix("cpu kernels: "))
        .unwrap_or_else(|| panic!("{text}"))
        .to_string()
}

#[test]
fn the_best_variant_the_machine_runs_is_chosen() {
    let all = phi4::cpu_variants();
    eprintln!(
        "variants: {all:?}; chosen: {} ({})",
        phi4::cpu_variant(),
        phi4::cpu_features().join(" ")
    );
    assert!(
        all.last().is_some_and(|(_, ok)| *ok),
        "the baseline always runs: {all:?}"
    );
    let best = all.iter().find(|(_, ok)| *ok).unwrap().0;
    assert_eq!(phi4::cpu_variant(), best);
    if let Ok(want) = std::env::var("PHI4_EXPECT_CPU_VARIANT") {
        assert_eq!(phi4::cpu_variant(), want, "on this CPU model");
    }
    // The shipped CLI (another process, the same library code) chooses the same.
    assert_eq!(kernels_line(common::target_command(common::cli())), best);
}

#[test]
fn a_variant_the_machine_runs_may_be_asked_for_and_others_are_not_taken() {
    for (name, ok) in phi4::cpu_variants() {
        let mut c = common::target_command(common::cli());
        c.env("PHI4_CPU_VARIANT", name);
        let got = kernels_line(c);
        if ok {
            assert_eq!(got, name);
        } else {
            assert_eq!(
                got,
                phi4::cpu_variant(),
                "{name} is not supported here: the best one runs"
            );
        }
    }
}

/// Greedy tokens of `c` (a `phi4` command) on the demo model: a short raw generation.
#[cfg(target_arch = "x86_64")]
fn greedy_tokens(c: Command) -> Vec<u32> {
    let prompt = [13, 100, 200, 300, 400, 500];
    let model = common::fixture("phi4-tiny-docs.gguf");
    common::cli_greedy(c, &model, &prompt, 6, &["--threads", "2"]).0
}

/// On an AVX2-only CPU the x86_64 build chooses its AVX2 kernels and runs them through a
/// generation (no instruction of a wider ISA reached), giving the tokens those kernels give
/// natively, where they are asked for (PHI4_CPU_VARIANT). (tests/agreement.rs compares them
/// with the best kernels, natively.)
#[cfg(target_arch = "x86_64")]
#[test]
fn the_x86_64_build_runs_its_avx2_kernels_on_an_avx2_only_cpu() {
    let emulated = || {
        let mut c = Command::new("qemu-x86_64");
        c.args(["-cpu", AVX2_ONLY_CPU]).arg(common::cli());
        c
    };
    assert_eq!(kernels_line(emulated()), "avx2");
    let mut native = Command::new(common::cli());
    native.env("PHI4_CPU_VARIANT", "avx2");
    let tokens = greedy_tokens(emulated());
    assert!(!tokens.is_empty());
    assert_eq!(
        tokens,
        greedy_tokens(native),
        "the same kernels, the same tokens"
    );
}
