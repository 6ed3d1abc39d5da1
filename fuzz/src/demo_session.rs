//! The demo model's session that the generation targets share (one per process, behind a lock).

use std::sync::{Arc, Mutex, OnceLock};

use phi4::model::{LoadParams, Model};
use phi4::session::{Session, SessionParams};

pub fn session() -> &'static Mutex<Session> {
    static S: OnceLock<Mutex<Session>> = OnceLock::new();
    S.get_or_init(|| {
        let path = super::fixture("phi4-tiny-docs.gguf");
        let model = Arc::new(Model::load(path.as_ref(), LoadParams::default()).unwrap());
        Mutex::new(
            Session::new(
                model,
                &SessionParams {
                    n_ctx: 64,
                    n_threads: 1,
                    ..Default::default()
                },
            )
            .unwrap(),
        )
    })
}
