//! The `phi4` binary as a user runs it.

mod common;

use std::path::Path;
use std::process::Output;

use common::reference::{top2_gap, Reference};
use phi4_synth::Spec;

fn phi4(args: &[&str]) -> Output {
    common::target_command(common::cli())
        .args(args)
        .output()
        .unwrap()
}

/// Runs `phi4 run --raw ... --json` and returns the NDJSON events.
fn run_json(model: &Path, prompt: &[u32], n: usize) -> Vec<serde_json::Value> {
    let ids: Vec<String> = prompt.iter().map(|t| t.to_string()).collect();
    // Compared with llama.cpp token by token: on llama.cpp's kernels.
    let out = common::target_command(common::cli())
        .env("PHI4_CPU_VARIANT", common::reference_kernels())
        .args([
            "run",
            "--model",
            model.to_str().unwrap(),
            "--raw",
            "--prompt-ids",
            &ids.join(","),
        ])
        .args([
            "-n",
            &n.to_string(),
            "--temperature",
            "0",
            "--repeat-penalty",
            "1",
            "--threads",
            "2",
            "--batch",
            "16",
            "--json",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn raw_json_greedy_equals_llama_cpp() {
    let dir = common::tmpdir();
    for (ft, seed) in [("q4_k_m", 11), ("q8_0", 12)] {
        let path = common::synth_model(
            dir.path(),
            &format!("{ft}.gguf"),
            &Spec::small(2, common::ftype(ft), seed),
        );
        let prompt: Vec<u32> = (0..37).map(|i| (i * 53 + 7) % 1000).collect();
        let events = run_json(&path, &prompt, 64);
        let (done, tokens) = events.split_last().unwrap();
        assert_eq!(done["done"], true);
        for key in ["load_duration", "prompt_eval_duration", "eval_duration"] {
            assert!(done[key].as_u64().unwrap() > 0, "{key}");
        }
        assert_eq!(done["prompt_eval_count"], prompt.len());
        let got: Vec<u32> = tokens
            .iter()
            .map(|e| e["token"].as_u64().unwrap() as u32)
            .collect();
        assert_eq!(done["eval_count"], got.len());

        // llama.cpp's greedy continuation, step by step.
        let mut rf = Reference::load(&path, 256, 16, 2);
        let mut logits = rf.eval(&prompt);
        for (i, &tok) in got.iter().enumerate() {
            let want = phi4::sample::argmax(&logits);
            if tok != want {
                // Logits each within the tolerance can swap places only within twice it.
                assert!(
                    top2_gap(&logits) < 2.0 * common::logit_tolerance(ft),
                    "{ft}: step {i}: phi4 {tok}, llama.cpp {want}"
                );
                break; // a tie: the continuations may differ from here on
            }
            logits = rf.eval(&[tok]);
        }
        if done["done_reason"] == "length" {
            assert_eq!(got.len(), 64);
        } else {
            assert_eq!(done["done_reason"], "stop");
        }
    }
}

/// Any bad file: one line on stderr, a failure exit code, no signal.
fn assert_clean_failure(out: &Output, want: &str) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.code().is_some_and(|c| c != 0),
        "status {:?}",
        out.status
    );
    assert_eq!(err.lines().count(), 1, "stderr: {err}");
    assert!(
        err.starts_with("phi4: ") && err.contains(want),
        "stderr {err:?} lacks {want:?}"
    );
}

#[test]
fn malformed_files_fail_cleanly() {
    let dir = common::tmpdir();
    let good = common::synth_model(
        dir.path(),
        "good.gguf",
        &Spec::small(1, common::ftype("q4_0"), 1),
    );
    let bytes = std::fs::read(&good).unwrap();
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("empty.gguf", vec![], "file truncated"),
        (
            "text.gguf",
            b"hello, not a model".to_vec(),
            "not a GGUF file",
        ),
        ("header.gguf", bytes[..200].to_vec(), "is impossible"),
        (
            "cut.gguf",
            bytes[..bytes.len() - 100].to_vec(),
            "past the end of the file",
        ),
    ];
    for (name, data, want) in cases {
        let p = dir.path().join(name);
        std::fs::write(&p, data).unwrap();
        let out = phi4(&[
            "run",
            "--model",
            p.to_str().unwrap(),
            "--raw",
            "--prompt-ids",
            "1,2",
            "-n",
            "2",
        ]);
        assert_clean_failure(&out, want);
    }
    let out = phi4(&[
        "run",
        "--model",
        "/nonexistent/m.gguf",
        "--raw",
        "--prompt-ids",
        "1",
    ]);
    assert_clean_failure(&out, "No such file");
    let out = phi4(&[
        "run",
        "--model",
        dir.path().to_str().unwrap(),
        "--raw",
        "--prompt-ids",
        "1",
    ]);
    assert_clean_failure(&out, "");
}

#[test]
fn bad_arguments_fail_cleanly() {
    let dir = common::tmpdir();
    let m = common::synth_model(
        dir.path(),
        "m.gguf",
        &Spec::small(1, common::ftype("f16"), 1),
    );
    let m = m.to_str().unwrap();
    assert_clean_failure(
        &phi4(&["run", "--model", m, "--raw", "--prompt-ids", "1,5000"]),
        "token id 5000 is outside the vocabulary",
    );
    assert_clean_failure(
        &phi4(&["run", "--model", m, "--raw"]),
        "--raw needs --prompt-ids",
    );
    assert_clean_failure(
        &phi4(&[
            "run",
            "--model",
            m,
            "--raw",
            "--prompt-ids",
            "1",
            "--threads",
            "0",
        ]),
        "at least 1",
    );
    assert_clean_failure(
        &phi4(&[
            "run",
            "--model",
            m,
            "--raw",
            "--prompt-ids",
            "1",
            "--temperature=-1",
        ]),
        "temperature",
    );
}

#[test]
fn info_reports_features_and_repacking() {
    let out = phi4(&["info"]);
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(out.status.success());
    let features = phi4::cpu_features().join(" ");
    assert!(
        text.contains(&format!("cpu features: {features}")),
        "{text}"
    );

    let dir = common::tmpdir();
    let m = common::synth_model(
        dir.path(),
        "m.gguf",
        &Spec::small(2, common::ftype("q4_k_m"), 3),
    );
    let model = phi4::model::Model::load(&m, Default::default()).unwrap();
    let out = phi4(&["info", "--model", m.to_str().unwrap()]);
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        text.contains("shape: 2 layers x 512, heads 4/1 of 128, FFN 1536"),
        "{text}"
    );
    assert!(
        text.contains("weights q5_K: 2 tensors") && text.contains("weights q6_K:"),
        "{text}"
    );
    // Whatever this CPU repacks, the report says exactly that.
    if model.repacked.is_empty() {
        assert!(text.contains("repacked: none"), "{text}");
    } else {
        assert!(
            text.contains(&format!("repacked: {} ", model.repacked.len()))
                || text.contains("tensors into phi4's 8-row groups")
                || text.contains("tensors into CPU_REPACK"),
            "{text}"
        );
    }
    let out = phi4(&["info", "--model", m.to_str().unwrap(), "--no-repack"]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("repacked: none"));
}

#[test]
fn out_of_range_values_are_errors_not_clamped() {
    let demo = common::fixture("phi4-tiny-docs.gguf");
    let m = demo.to_str().unwrap();
    assert_clean_failure(
        &phi4(&["run", "--model", m, "--ctx-size", "100000", "hi"]),
        "n_ctx 100000 must be in 1..=",
    );
    assert_clean_failure(
        &phi4(&["run", "--model", m, "--top-k", "-3", "hi"]),
        "--top-k: top_k takes a whole number",
    );
    assert_clean_failure(
        &phi4(&["run", "--model", m, "--top-p", "2", "hi"]),
        "top_p 2 must be in (0, 1]",
    );
    assert_clean_failure(
        &phi4(&["run", "--model", m, "--threads", "100000", "hi"]),
        "n_threads 100000 must be at least 1 and at most",
    );
}

#[test]
fn draft_flag_keeps_the_reply_and_reports_the_drafts() {
    let demo = common::fixture("phi4-tiny-docs.gguf");
    let m = demo.to_str().unwrap();
    let prompt = "The list type is mutable. The tuple type is immutable. The list type is mutable.";
    let run = |draft: &str, report: &str| {
        let out = phi4(&[
            "run",
            "--model",
            m,
            "--temperature",
            "0",
            "-n",
            "48",
            "--repeat-penalty",
            "1",
            "--draft",
            draft,
            report,
            prompt,
        ]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        (
            String::from_utf8(out.stdout).unwrap(),
            String::from_utf8(out.stderr).unwrap(),
        )
    };
    let events = |stdout: &str| -> (String, serde_json::Value) {
        let lines: Vec<serde_json::Value> = stdout
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        let text = lines.iter().filter_map(|v| v["piece"].as_str()).collect();
        (text, lines.last().unwrap().clone())
    };
    let (plain, plain_done) = events(&run("0", "--json").0);
    let (drafted, done) = events(&run("8", "--json").0);
    assert_eq!(plain, drafted);
    assert!(plain_done.get("draft_count").is_none(), "{plain_done}");
    let (n, accepted) = (
        done["draft_count"].as_u64(),
        done["draft_accepted"].as_u64(),
    );
    assert!(n.is_some_and(|n| n > 0) && accepted <= n, "{done}");
    let (_, verbose) = run("8", "--verbose");
    assert!(verbose.contains("draft accepted:"), "{verbose}");
    assert_clean_failure(
        &phi4(&["run", "--model", m, "--draft", "17", "hi"]),
        "--draft: draft takes 0..=16",
    );
}

#[test]
fn a_given_seed_reproduces_and_no_seed_draws_a_fresh_one() {
    let demo = common::fixture("phi4-tiny-docs.gguf");
    let reply = |seed: Option<&str>| {
        let mut args = vec![
            "run",
            "--model",
            demo.to_str().unwrap(),
            "--temperature",
            "1.5",
            "-n",
            "24",
            "--threads",
            "2",
        ];
        if let Some(s) = seed {
            args.extend(["--seed", s]);
        }
        args.push("Tell me about lists.");
        let out = phi4(&args);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    assert_eq!(reply(Some("5")), reply(Some("5")));
    let free: Vec<String> = (0..3).map(|_| reply(None)).collect();
    assert!(
        free[0] != free[1] || free[1] != free[2],
        "three unseeded replies were identical: {free:?}"
    );
}

#[test]
fn format_flags_constrain_the_reply() {
    let demo = common::fixture("phi4-tiny-docs.gguf");
    let m = demo.to_str().unwrap();
    let dir = common::tmpdir();
    let schema = dir.path().join("schema.json");
    std::fs::write(
        &schema,
        r#"{"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}"#,
    )
    .unwrap();
    let grammar = dir.path().join("yes-no.lark");
    std::fs::write(&grammar, "start: (\"yes\" | \"no\") \"!\"\n").unwrap();
    let text = |args: &[&str]| {
        let out = phi4(
            &[
                &["run", "--model", m, "-n", "60", "--temperature", "0.8"],
                args,
                &["Is it ok?"],
            ]
            .concat(),
        );
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout)
            .unwrap()
            .trim_end()
            .to_string()
    };
    let v: serde_json::Value =
        serde_json::from_str(&text(&["--format-schema", schema.to_str().unwrap()])).unwrap();
    assert!(
        v["ok"].is_boolean() && v.as_object().unwrap().len() == 1,
        "{v}"
    );
    let inline = text(&["--format", r#"{"enum": ["red", "green"]}"#]);
    assert!(inline == r#""red""# || inline == r#""green""#, "{inline}");
    let yes_no = text(&["--grammar", grammar.to_str().unwrap()]);
    assert!(yes_no == "yes!" || yes_no == "no!", "{yes_no}");
    let digits = text(&["--regex", "[0-9]{4}"]);
    assert!(
        digits.len() == 4 && digits.bytes().all(|b| b.is_ascii_digit()),
        "{digits}"
    );

    assert_clean_failure(
        &phi4(&["run", "--model", m, "--regex", "(", "hi"]),
        "format: the regex does not compile",
    );
    assert_clean_failure(
        &phi4(&["run", "--model", m, "--format", "yaml", "hi"]),
        "--format: \"yaml\" is neither json nor a JSON Schema",
    );
    assert_clean_failure(
        &phi4(&[
            "run",
            "--model",
            m,
            "--format-schema",
            "/nonexistent.json",
            "hi",
        ]),
        "--format-schema /nonexistent.json",
    );
    let both = phi4(&[
        "run", "--model", m, "--format", "json", "--regex", "a", "hi",
    ]);
    assert!(
        !both.status.success()
            && String::from_utf8_lossy(&both.stderr).contains("cannot be used with")
    );
}

/// `--prompt-cache`: the second run (a fresh process) restores the evaluated prompt and evaluates
/// one token of it; its reply is the first run's.
#[test]
fn prompt_cache_carries_the_prompt_across_processes() {
    let demo = common::fixture("phi4-tiny-docs.gguf");
    let dir = common::tmpdir();
    let cache = dir.path().join("system.kv");
    let system =
        "You are a Python tutor. Answer with examples from the standard library, short and exact.";
    let run = |question: &str| {
        let out = phi4(&[
            "run",
            "--model",
            demo.to_str().unwrap(),
            "--prompt-cache",
            cache.to_str().unwrap(),
            "--system",
            system,
            "--temperature",
            "0",
            "-n",
            "12",
            "--json",
            question,
        ]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let events: Vec<serde_json::Value> = String::from_utf8(out.stdout)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        let text: String = events.iter().filter_map(|e| e["piece"].as_str()).collect();
        (
            text,
            events.last().unwrap()["prompt_eval_count"]
                .as_u64()
                .unwrap(),
        )
    };
    let (first, n1) = run("How do I read a file?");
    assert!(cache.exists() && n1 > 20, "{n1}");
    let (second, n2) = run("How do I read a file?");
    assert_eq!(
        (second, n2),
        (first, 1),
        "restored: only the last prompt token is evaluated again"
    );
    // Another question shares the system turn: only the new turn is evaluated.
    let (_, n3) = run("And write one?");
    assert!(n3 < n1 && n3 <= 12, "{n3} of {n1}");
}

/// A full disk while saving: a clear message, the reply still given, the previous state intact
/// and no temporary file left. (The "disk" is a file-size limit on the process: no mount
/// needed; SIGXFSZ is ignored so that the write fails with an error instead of a signal.)
#[test]
fn a_full_disk_keeps_the_previous_state() {
    let demo = common::fixture("phi4-tiny-docs.gguf");
    let dir = common::tmpdir();
    let cache = dir.path().join("p.kv");
    let m = demo.to_str().unwrap();
    let args = |q: &'static str| {
        vec![
            "run",
            "--model",
            m,
            "--prompt-cache",
            cache.to_str().unwrap(),
            "--temperature",
            "0",
            "-n",
            "4",
            q,
        ]
    };
    assert!(phi4(&args("Hi")).status.success());
    let before = std::fs::read(&cache).unwrap();
    let long =
        "Tell me everything about the os module, the sys module, files, paths, and processes.";
    let cli = common::cli();
    let mut cmd = std::process::Command::new("prlimit");
    cmd.arg(format!("--fsize={}", before.len() + 1000)).args([
        "--",
        "sh",
        "-c",
        "trap '' XFSZ; exec \"$@\"",
        "sh",
    ]);
    if let Some(r) = common::runner() {
        cmd.args(r);
    }
    let out = cmd.arg(&cli).args(args(long)).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && !out.stdout.is_empty(),
        "the reply is still given: {err}"
    );
    assert!(
        err.contains("--prompt-cache: not saved") && err.contains("p.kv"),
        "{err}"
    );
    assert_eq!(
        std::fs::read(&cache).unwrap(),
        before,
        "the previous state is intact"
    );
    assert_eq!(
        std::fs::read_dir(dir.path()).unwrap().count(),
        1,
        "no temporary file is left"
    );
}

#[test]
fn kv_type_flag_quantizes_the_cache() {
    let demo = common::fixture("phi4-tiny-docs.gguf");
    let m = demo.to_str().unwrap();
    let dir = common::tmpdir();
    let state = dir.path().join("prompt.kv");
    let s = state.to_str().unwrap();
    let run = |kv: &str| {
        let out = phi4(&[
            "run",
            "--model",
            m,
            "--temperature",
            "0",
            "-n",
            "8",
            "--kv-type",
            kv,
            "--prompt-cache",
            s,
            "--verbose",
            "What is a tuple?",
        ]);
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(out.status.success(), "{kv}: {err}");
        assert!(!out.stdout.is_empty(), "{kv}: a reply");
        err
    };
    run("f16");
    let size = |p: &std::path::Path| std::fs::metadata(p).unwrap().len();
    let f16 = size(&state);
    // A state of another cache type is not used (said so), then replaced by one of this type.
    let err = run("q8_0");
    assert!(
        err.contains("not used") && err.contains("f16 KV cache"),
        "{err}"
    );
    assert!(size(&state) < f16, "q8_0 rows are smaller");
    let err = run("Q8_0");
    assert!(err.contains("restored"), "the same type is restored: {err}");
    run("q4_0");
    // A usage error (clap's: exit status 2) naming the types.
    let bad = phi4(&["run", "--model", m, "--kv-type", "q5_1", "hi"]);
    let err = String::from_utf8_lossy(&bad.stderr);
    assert_eq!(bad.status.code(), Some(2), "{err}");
    assert!(
        err.contains("unknown KV cache type \"q5_1\" (one of: f16, q8_0, q4_0)"),
        "{err}"
    );
}

/// `phi4 info` plans without loading: each holder, the largest context per cache type for the
/// memory given; `run` refuses a plan larger than the memory available (here as
/// PHI4_MEMORY_AVAILABLE says), unless --skip-memory-check.
#[test]
fn info_plans_memory_and_run_refuses_what_does_not_fit() {
    let demo = common::fixture("phi4-tiny-docs.gguf");
    let m = demo.to_str().unwrap();
    let info = |extra: &[&str]| {
        let mut args = vec!["info", "--model", m, "--threads", "2"];
        args.extend(extra);
        let out = phi4(&args);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    let text = info(&[
        "--ctx-size",
        "1000",
        "--kv-type",
        "q4_0",
        "--parallel",
        "2",
        "--available",
        "1G",
    ]);
    for want in [
        "kv cache bytes per position: f16 2048 (0.00 GiB at 2048), q8_0 1088",
        "for 2 session(s) of 1000 positions, KV cache q4_0",
        "kv cache: 1.1 MiB (576 bytes per position, q4_0: 1000 position(s) x 2 session(s))",
        "available: 1.00 GiB (--available)",
        "largest context that fits (2 session(s)): 2048 (f16), 2048 (q8_0), 2048 (q4_0)",
    ] {
        assert!(text.contains(want), "{want:?} in {text}");
    }
    // The runtime allowance alone is more than 50 MiB: no context fits.
    let text = info(&["--available", "50M"]);
    assert!(
        text.contains("none (f16), none (q8_0), none (q4_0)"),
        "{text}"
    );

    let run = |extra: &[&str]| {
        common::target_command(common::cli())
            .env("PHI4_MEMORY_AVAILABLE", "118M")
            .args(["run", "--model", m, "-n", "2", "--threads", "2"])
            .args(extra)
            .arg("hi")
            .output()
            .unwrap()
    };
    // 118 MiB: the demo model's plan at its whole context (≈ 124 MiB) does not fit, a shorter
    // context does (and the message says which).
    let out = run(&[]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.code() == Some(1)
            && err.contains("not enough memory")
            && err.contains("available (PHI4_MEMORY_AVAILABLE)")
            && err.contains("a smaller context (--ctx-size)"),
        "{err}"
    );
    let out = run(&["--ctx-size", "256"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = run(&["--skip-memory-check"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && err.contains("warning: not enough memory"),
        "{err}"
    );
}
