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

/// Everything the header declares stands inside its include guard, the trailer's macro too.
#[test]
fn everything_is_inside_the_include_guard() {
    let header = std::fs::read_to_string(common::root().join("include/phi4.h")).unwrap();
    let code: Vec<&str> = header
        .lines()
        .filter(|l| !l.trim().is_empty() && !l.starts_with(" *") && !l.starts_with("/*"))
        .collect();
    assert_eq!(
        code[..2],
        ["#ifndef PHI4_H", "#define PHI4_H"],
        "the guard opens first"
    );
    assert_eq!(code.last(), Some(&"#endif /* PHI4_H */"), "and closes last");
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

/// The comment block above each field of `struct name` in the header, by field name.
fn field_docs(header: &str, name: &str) -> Vec<(String, String)> {
    let start = header
        .find(&format!("typedef struct {name} {{"))
        .expect("struct in the header");
    let body = &header[start..start + header[start..].find('}').unwrap()];
    let mut docs = Vec::new();
    let mut doc = String::new();
    for line in body.lines().skip(1).map(str::trim) {
        if let Some(text) = line.strip_prefix("//") {
            doc.push_str(text.trim());
            doc.push(' ');
        } else if let Some(field) = line
            .strip_suffix(';')
            .and_then(|l| l.split_whitespace().last())
        {
            docs.push((
                field.trim_start_matches('*').to_string(),
                std::mem::take(&mut doc),
            ));
        }
    }
    docs
}

/// The "Default X" a field's comment states, when X is a number.
fn stated_default(doc: &str) -> Option<f64> {
    let rest = &doc[doc.find("Default ")? + "Default ".len()..];
    rest.split_whitespace()
        .next()?
        .trim_end_matches(['.', ':', ','])
        .parse()
        .ok()
}

/// Every number the header states as a generation default is the library's: its comments
/// restate the option table (src/sample.rs), so a changed default fails here until they do.
#[test]
fn stated_defaults_are_the_option_tables() {
    let header = std::fs::read_to_string(common::root().join("include/phi4.h")).unwrap();
    let sampling = phi4::SamplingParams::default();
    let gp = phi4::GenerateParams::default();
    let mut checked = 0;
    for (field, doc) in field_docs(&header, "phi4_generate_params") {
        let Some(stated) = stated_default(&doc) else {
            continue;
        };
        let ours = match field.as_str() {
            "max_tokens" => gp.max_tokens.to_string(),
            name => sampling
                .get(name)
                .unwrap_or_else(|| panic!("{name}: not in the option table")),
        };
        assert_eq!(
            stated,
            ours.parse::<f64>().unwrap(),
            "phi4_generate_params.{field}: {doc}"
        );
        checked += 1;
    }
    assert!(
        checked >= 9,
        "only {checked} defaults found in the header's comments"
    );
    // The session's numbers are named, not restated: the PHI4_* limits.
    for (field, doc) in field_docs(&header, "phi4_session_params") {
        assert!(
            stated_default(&doc).is_none(),
            "phi4_session_params.{field} restates a number: {doc}"
        );
    }
    for (name, value) in [
        ("PHI4_MAX_CONTEXT", phi4::limits::MAX_CONTEXT),
        ("PHI4_DEFAULT_CONTEXT", phi4::limits::DEFAULT_CONTEXT),
        ("PHI4_DEFAULT_BATCH", phi4::limits::DEFAULT_BATCH),
        ("PHI4_MAX_THREADS", phi4::limits::MAX_THREADS),
        ("PHI4_MAX_BATCH", phi4::limits::MAX_BATCH),
    ] {
        assert!(
            header.contains(&format!("#define {name} {value}")),
            "{name} is not {value} in the header"
        );
    }
}
