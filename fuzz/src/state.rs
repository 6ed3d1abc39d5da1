//! Saved session states from arbitrary bytes (seeded with real states): a clear error or a
//! restored session, never a crash; a refused state leaves the session as it was.

use super::demo_session::session;

/// The check of one input.
pub fn run(data: &[u8]) {
    let mut s = session().lock().unwrap();
    s.reset();
    s.evaluate(&[1, 2, 3]).unwrap();
    match s.load_bytes(data) {
        Ok(n) => assert!(n <= 64 && s.history().len() == n),
        Err(_) => assert_eq!(s.history(), [1, 2, 3]),
    }
}
