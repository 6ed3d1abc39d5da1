//! The shipped artefacts (`make dist`): no llama.cpp code in the library binaries, a versioned
//! SONAME.

mod common;

use std::process::Command;

fn tool(cmd: &str, args: &[&str]) -> String {
    let out = Command::new(common::tool(cmd))
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{cmd}: {e}"));
    assert!(
        out.status.success(),
        "{cmd} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn shipped_libraries_hold_no_llama_symbols() {
    let dist = common::dist();
    let version = env!("CARGO_PKG_VERSION");
    let so = dist.join(format!("libphi4.so.{version}"));
    let a = dist.join("libphi4.a");

    let defined = |syms: &str| -> Vec<String> {
        syms.lines()
            .filter_map(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                (f.len() == 3 && f[1] != "U" && f[1] != "w").then(|| f[2].to_string())
            })
            .collect()
    };
    // (symbol that must be there, so that "no llama_*" is known to come from a real read)
    for (what, syms, must_have) in [
        (
            "libphi4.so (dynamic)",
            tool("nm", &["-D", "--defined-only", so.to_str().unwrap()]),
            "phi4_model_load",
        ),
        // (the shipped library is stripped: its symbol table is in its debug file)
        (
            "libphi4.so",
            tool("nm", &[&format!("{}.debug", so.display())]),
            "ggml_flash_attn_ext",
        ),
        (
            "libphi4.a",
            tool("nm", &["--defined-only", a.to_str().unwrap()]),
            "ggml_flash_attn_ext",
        ),
    ] {
        let d = defined(&syms);
        let llama: Vec<&String> = d.iter().filter(|s| s.starts_with("llama_")).collect();
        assert!(
            llama.is_empty(),
            "{what} defines {} llama_* symbols, e.g. {:?}",
            llama.len(),
            &llama[..llama.len().min(3)]
        );
        assert!(d.iter().any(|s| s == must_have), "{what} lacks {must_have}");
    }
    // The shared library exports the C API and nothing else.
    let exported = defined(&tool("nm", &["-D", "--defined-only", so.to_str().unwrap()]));
    assert!(
        exported
            .iter()
            .all(|s| !s.starts_with("ggml_") && !s.starts_with("gguf_")),
        "ggml symbols exported"
    );
    let foreign: Vec<&String> = exported
        .iter()
        .filter(|s| !s.starts_with("phi4_"))
        .collect();
    assert!(
        foreign.is_empty(),
        "libphi4.so exports more than phi4_*: {foreign:?}"
    );
    // Stripped, with the debug info beside it and linked.
    for f in [so.clone(), dist.join("phi4")] {
        let sections = tool("readelf", &["-S", "-W", f.to_str().unwrap()]);
        assert!(
            !sections.contains(".debug_info") && !sections.contains(".symtab"),
            "{} is not stripped",
            f.display()
        );
        assert!(
            sections.contains(".gnu_debuglink"),
            "{} has no debug link",
            f.display()
        );
        // (the symbols always; DWARF when the build has it: the boards' builds do not)
        let debug = tool("readelf", &["-S", "-W", &format!("{}.debug", f.display())]);
        assert!(
            debug.contains(".symtab"),
            "{}.debug holds no symbols",
            f.display()
        );
    }
    let dynamic = tool("readelf", &["-d", so.to_str().unwrap()]);
    let major = version.split('.').next().unwrap();
    assert!(
        dynamic.contains(&format!("Library soname: [libphi4.so.{major}]")),
        "{dynamic}"
    );
}
