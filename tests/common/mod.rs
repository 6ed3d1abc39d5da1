#![allow(dead_code)]

pub mod reference;

use std::path::{Path, PathBuf};

use phi4::synth::{self, Ftype, Spec};

/// A directory for test files, removed at the end of the test.
pub fn tmpdir() -> tempfile::TempDir {
    tempfile::Builder::new().prefix("phi4-test").tempdir().unwrap()
}

/// Write a synthetic model and return its path.
pub fn synth_model(dir: &Path, name: &str, spec: &Spec) -> PathBuf {
    let p = dir.join(name);
    synth::write(spec, &p).unwrap();
    p
}

pub fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name)
}

pub fn ftype(s: &str) -> Ftype {
    s.parse().unwrap()
}
