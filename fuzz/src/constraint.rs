//! Constraints from arbitrary text (a JSON Schema, a regex or a Lark grammar, by the first
//! byte) on a generation of the demo model: a reply or a constraint error, never a crash, a hang
//! or another error.

use super::demo_session::session;

use phi4::sample::SamplingParams;
use phi4::session::GenerateParams;
use phi4::Constraint;
use phi4::SessionError;

/// The check of one input.
pub fn run(data: &[u8]) {
    let Some((&kind, rest)) = data.split_first() else {
        return;
    };
    let text = String::from_utf8_lossy(rest).into_owned();
    let constraint = match kind % 4 {
        0 => Constraint::JsonSchema(text),
        1 => Constraint::Regex(text),
        2 => Constraint::Lark(text),
        _ => Constraint::Json,
    };
    let gp = GenerateParams {
        sampling: SamplingParams {
            seed: Some(kind as u64),
            ..Default::default()
        },
        max_tokens: 6,
        constraint: Some(constraint),
        ..Default::default()
    };
    let mut s = session().lock().unwrap();
    match s.generate(&[1, 2, 3], &gp, &mut |_, _| true) {
        Ok(_) | Err(SessionError::Constraint(_)) => {}
        Err(e) => panic!("{e}"),
    }
}
