//! include/phi4.h is what cbindgen generates from the source, and it compiles cleanly as C99 and
//! as C++ with every warning an error.

mod common;

use std::process::Command;

/// cbindgen reads only the C boundary (src/ffi), so nothing else of the crate reaches the header.
fn generate() -> String {
    let config = cbindgen::Config::from_file(common::root().join("cbindgen.toml")).unwrap();
    let mut out = Vec::new();
    cbindgen::Builder::new()
        .with_src(common::root().join("src/ffi/mod.rs"))
        .with_config(config)
        .generate()
        .expect("cbindgen")
        .write(&mut out);
    String::from_utf8(out).unwrap()
}

#[test]
fn committed_header_is_fresh() {
    let fresh = generate();
    let path = common::root().join("include/phi4.h");
    if std::env::var_os("PHI4_BLESS").is_some() {
        std::fs::write(&path, &fresh).unwrap();
    }
    let committed = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(committed == fresh, "include/phi4.h differs from a fresh cbindgen run: PHI4_BLESS=1 cargo test --release --test header");
}

#[test]
fn header_compiles_as_c99_and_cpp() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("use.c");
    std::fs::write(&src, "#include \"phi4.h\"\nint main(void) { phi4_model_params p; return phi4_model_default_params(&p) == PHI4_OK ? 0 : 1; }\n").unwrap();
    let inc = format!("-I{}", common::root().join("include").display());
    for (cc, std) in [("cc", "-std=c99"), ("c++", "-std=c++11")] {
        let lang: &[&str] = if cc == "c++" { &["-x", "c++"] } else { &[] };
        let out = Command::new(cc)
            .args(lang)
            .args([
                std,
                "-Wall",
                "-Wextra",
                "-Wpedantic",
                "-Werror",
                "-fsyntax-only",
                &inc,
            ])
            .arg(&src)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{cc} {std}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}
