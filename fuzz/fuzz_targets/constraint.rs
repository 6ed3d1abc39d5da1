//! Constraints from arbitrary text (a JSON Schema, a regex or a Lark grammar, by the first
//! byte) on a generation of the demo model: an error or a reply, never a crash or a hang; a
//! reply that ends by itself is complete and a regex's reply is matched by the regex.
#![no_main]

use std::sync::{Arc, Mutex, OnceLock};

use libfuzzer_sys::fuzz_target;
use phi4::model::{LoadParams, Model};
use phi4::sample::SamplingParams;
use phi4::session::{GenerateParams, Session, SessionError, SessionParams};
use phi4::Constraint;

fn session() -> &'static Mutex<Session> {
    static S: OnceLock<Mutex<Session>> = OnceLock::new();
    S.get_or_init(|| {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/fixtures/phi4-tiny-docs.gguf");
        let model = Arc::new(Model::load(path.as_ref(), LoadParams::default()).unwrap());
        Mutex::new(Session::new(model, &SessionParams { n_ctx: 64, n_threads: 1, ..Default::default() }).unwrap())
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((&kind, rest)) = data.split_first() else { return };
    let text = String::from_utf8_lossy(rest).into_owned();
    let constraint = match kind % 4 {
        0 => Constraint::JsonSchema(text),
        1 => Constraint::Regex(text),
        2 => Constraint::Lark(text),
        _ => Constraint::Json,
    };
    let gp = GenerateParams { sampling: SamplingParams { seed: Some(kind as u64), ..Default::default() }, max_tokens: 6, constraint: Some(constraint), ..Default::default() };
    let mut s = session().lock().unwrap();
    match s.generate(&[1, 2, 3], &gp, &mut |_, _| true) {
        Ok(_) | Err(SessionError::Constraint(_)) => {}
        Err(e) => panic!("{e}"),
    }
});
