//! Saved session states from arbitrary bytes (seeded with real states): a clear error or a
//! restored session, never a crash; a refused state leaves the session as it was.
#![no_main]

use std::sync::{Arc, Mutex, OnceLock};

use libfuzzer_sys::fuzz_target;
use phi4::model::{LoadParams, Model};
use phi4::session::{Session, SessionParams};

fn session() -> &'static Mutex<Session> {
    static S: OnceLock<Mutex<Session>> = OnceLock::new();
    S.get_or_init(|| {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/fixtures/phi4-tiny-docs.gguf");
        let model = Arc::new(Model::load(path.as_ref(), LoadParams::default()).unwrap());
        Mutex::new(Session::new(model, &SessionParams { n_ctx: 64, n_threads: 1, ..Default::default() }).unwrap())
    })
}

fuzz_target!(|data: &[u8]| {
    let mut s = session().lock().unwrap();
    s.reset();
    s.evaluate(&[1, 2, 3]).unwrap();
    match s.load_bytes(data) {
        Ok(n) => assert!(n <= 64 && s.history().len() == n),
        Err(_) => assert_eq!(s.history(), [1, 2, 3]),
    }
});
