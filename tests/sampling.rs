//! Each sampler's effect on known logits; seeds; stop strings across pieces.

use phi4::sample::{Sampler, SamplingParams};
use phi4::session::StopMatcher;

/// Logits whose softmax is [0.5, 0.3, 0.15, 0.05] (then tiny).
fn logits() -> Vec<f32> {
    let mut l: Vec<f32> = [0.5f32, 0.3, 0.15, 0.05].iter().map(|p| p.ln()).collect();
    l.extend([-30.0; 4]);
    l
}

fn draws(p: SamplingParams, logits: &[f32], history: &[u32], n: usize) -> Vec<usize> {
    let mut counts = vec![0; logits.len()];
    for seed in 0..n as u64 {
        let mut s = Sampler::new(SamplingParams {
            seed: Some(seed),
            ..p.clone()
        });
        counts[s.sample(logits, history) as usize] += 1;
    }
    counts
}

fn plain(t: f32) -> SamplingParams {
    SamplingParams {
        temperature: t,
        ..SamplingParams::greedy()
    }
}

#[test]
fn greedy_takes_the_argmax() {
    assert_eq!(draws(plain(0.0), &logits(), &[], 50)[0], 50);
}

#[test]
fn temperature_one_follows_the_distribution() {
    let c = draws(plain(1.0), &logits(), &[], 4000);
    for (i, p) in [0.5, 0.3, 0.15, 0.05].iter().enumerate() {
        let f = c[i] as f64 / 4000.0;
        assert!((f - p).abs() < 0.03, "token {i}: {f} vs {p}");
    }
}

#[test]
fn low_temperature_sharpens_high_flattens() {
    let sharp = draws(plain(0.2), &logits(), &[], 2000);
    let flat = draws(plain(3.0), &logits(), &[], 2000);
    // p^5 normalised: token 0 holds 92.5% at temperature 0.2, 34% at 3.
    assert!(sharp[0] > 1800, "{sharp:?}");
    assert!(flat[3] > 200 && flat[0] < 1000, "{flat:?}");
}

#[test]
fn top_k_keeps_k() {
    let c = draws(
        SamplingParams {
            top_k: 2,
            ..plain(1.0)
        },
        &logits(),
        &[],
        2000,
    );
    assert!(
        c[0] > 0 && c[1] > 0 && c[2..].iter().all(|&n| n == 0),
        "{c:?}"
    );
}

#[test]
fn top_p_keeps_the_smallest_covering_set() {
    // 0.5 + 0.3 = 0.8 >= 0.75: tokens 0 and 1 only.
    let c = draws(
        SamplingParams {
            top_p: 0.75,
            ..plain(1.0)
        },
        &logits(),
        &[],
        2000,
    );
    assert!(
        c[0] > 0 && c[1] > 0 && c[2..].iter().all(|&n| n == 0),
        "{c:?}"
    );
}

#[test]
fn min_p_drops_the_unlikely() {
    // min_p 0.25: keep p >= 0.125, i.e. tokens 0, 1, 2.
    let c = draws(
        SamplingParams {
            min_p: 0.25,
            ..plain(1.0)
        },
        &logits(),
        &[],
        3000,
    );
    assert!(c[2] > 0 && c[3..].iter().all(|&n| n == 0), "{c:?}");
}

#[test]
fn repeat_penalty_moves_away_from_recent_tokens() {
    let l = vec![2.0, 1.9, 0.0];
    let mut s = Sampler::new(SamplingParams {
        repeat_penalty: 1.5,
        repeat_last_n: 4,
        ..plain(0.0)
    });
    assert_eq!(s.sample(&l, &[]), 0);
    assert_eq!(s.sample(&l, &[0]), 1); // 2.0 / 1.5 < 1.9
                                       // Outside the window, no penalty.
    assert_eq!(s.sample(&l, &[0, 2, 2, 2, 2]), 0);
    // Negative logits are multiplied, i.e. pushed further down.
    let neg = vec![-1.0, -1.2];
    assert_eq!(s.sample(&neg, &[0]), 1);
}

#[test]
fn frequency_and_presence_penalties() {
    let l = vec![2.0, 1.5];
    let mut f = Sampler::new(SamplingParams {
        frequency_penalty: 0.2,
        repeat_last_n: 64,
        ..plain(0.0)
    });
    assert_eq!(f.sample(&l, &[0, 0]), 0); // 2.0 - 0.4 = 1.6 > 1.5
    assert_eq!(f.sample(&l, &[0, 0, 0]), 1); // 2.0 - 0.6 < 1.5
    let mut p = Sampler::new(SamplingParams {
        presence_penalty: 0.6,
        repeat_last_n: 64,
        ..plain(0.0)
    });
    assert_eq!(p.sample(&l, &[0]), 1);
    assert_eq!(p.sample(&l, &[1]), 0);
}

#[test]
fn same_seed_same_tokens() {
    let l: Vec<f32> = (0..100).map(|i| (i as f32 * 0.37).sin()).collect();
    let run = |seed| {
        let mut s = Sampler::new(SamplingParams {
            seed,
            ..SamplingParams::default()
        });
        (0..64).map(|_| s.sample(&l, &[])).collect::<Vec<_>>()
    };
    assert_eq!(run(Some(7)), run(Some(7)));
    assert_ne!(run(Some(7)), run(Some(8)));
    // No seed: a fresh one per sampler, as Ollama draws one per request.
    assert_ne!(run(None), run(None));
}

#[test]
fn options_by_name_follow_the_struct() {
    let mut p = SamplingParams::default();
    for (name, _) in SamplingParams::OPTIONS {
        let v = p.get(name).unwrap();
        p.set(name, &v).unwrap();
    }
    assert_eq!(
        p,
        SamplingParams::default(),
        "the text form of every default reads back as itself"
    );
    p.set("top_k", "7").unwrap();
    p.set("seed", "42").unwrap();
    assert_eq!((p.top_k, p.seed), (7, Some(42)));
    assert!(p.set("top_k", "-1").unwrap_err().contains("top_k"));
    assert!(p.set("bogus", "1").unwrap_err().contains("bogus"));
    let mut g = phi4::GenerateParams::default();
    assert!(
        g.set("temperature", "-1").is_err() && g == phi4::GenerateParams::default(),
        "a bad value changes nothing"
    );
    g.set("num_predict", "5").unwrap();
    g.set("stop", "END").unwrap();
    assert_eq!((g.max_tokens, g.stop.clone()), (5, vec!["END".to_string()]));
}

#[test]
fn invalid_parameters_are_rejected() {
    for p in [
        SamplingParams {
            temperature: -1.0,
            ..Default::default()
        },
        SamplingParams {
            top_p: 0.0,
            ..Default::default()
        },
        SamplingParams {
            min_p: 1.5,
            ..Default::default()
        },
        SamplingParams {
            repeat_penalty: 0.0,
            ..Default::default()
        },
        SamplingParams {
            temperature: f32::NAN,
            ..Default::default()
        },
    ] {
        assert!(p.validate().is_err(), "{p:?}");
    }
}

#[test]
fn stop_strings_across_pieces() {
    let stops = vec!["<END>".to_string(), "\n\n".to_string()];
    let mut m = StopMatcher::new(&stops);
    let mut out = String::new();
    let mut stopped = false;
    for piece in ["Hello <", "E", "x", "> wor", "ld <E", "N", "D> never"] {
        let (emit, s) = m.push(piece);
        out.push_str(&emit);
        if s {
            stopped = true;
            break;
        }
    }
    assert!(stopped);
    assert_eq!(out, "Hello <Ex> world ");
    // Held-back text that turns out not to be a stop string is released at the end.
    let mut m = StopMatcher::new(&stops);
    let (a, _) = m.push("abc\n");
    assert_eq!(a, "abc");
    assert_eq!(m.finish(""), "\n");
    // Multi-byte stop strings.
    let mut m = StopMatcher::new(&["終わり".to_string()]);
    assert_eq!(m.push("これで終").0, "これで");
    assert_eq!(m.push("わり!"), (String::new(), true));
}
