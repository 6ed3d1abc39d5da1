//! The host-language bindings against the shipped library (`make dist`): the C++ wrapper and its
//! program, the Go package's own tests, and the Swift package's module map (imported with
//! clang -fmodules, as no Swift compiler is available).

mod common;

use std::process::{Command, Output};

fn ok(out: Output, what: &str) -> String {
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{what}: {text}");
    text
}

fn link_args() -> Vec<String> {
    let d = common::dist();
    vec![
        format!("-I{}", common::root().join("include").display()),
        format!("-L{}", d.display()),
        format!("-Wl,-rpath,{}", d.display()),
        "-lphi4".into(),
    ]
}

#[test]
fn cpp_wrapper_program() {
    let dir = common::tmpdir();
    let exe = dir.path().join("chat");
    let src = common::root().join("examples/cpp/chat.cpp");
    ok(
        Command::new(common::tool("c++"))
            .args(["-std=c++17", "-Wall", "-Wextra", "-Wpedantic", "-Werror"])
            .arg(&src)
            .args(link_args())
            .arg("-o")
            .arg(&exe)
            .output()
            .unwrap(),
        "c++",
    );
    let out = common::target_command(&exe)
        .arg(common::fixture("phi4-tiny-docs.gguf"))
        .arg("How do I open a file?")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    let text = ok(out, "chat");
    assert!(
        stdout.split_whitespace().count() >= 3,
        "a streamed reply: {stdout:?}"
    );
    assert!(
        text.contains("done reason 1") && text.contains("expected error (3)"),
        "{text}"
    );
}

#[test]
fn go_package_tests() {
    let cache = common::tmpdir();
    let d = common::dist();
    let mut go = Command::new("go");
    go.args(["test", "-count=1"]);
    if let (Some(prefix), Some(runner)) = (common::cross(), common::runner()) {
        // cgo cross-build; `go test -exec` runs the test binary under the emulator.
        let arch = match prefix.split('-').next() {
            Some("aarch64") => "arm64",
            other => panic!("no Go architecture for {other:?}"),
        };
        go.env("GOARCH", arch)
            .env("CGO_ENABLED", "1")
            .env("CC", common::tool("cc"));
        go.arg(format!("-exec={}", runner.join(" ")));
    }
    let out = go
        .arg("./...")
        .current_dir(common::root().join("examples/go"))
        .env(
            "CGO_CFLAGS",
            format!("-I{}", common::root().join("include").display()),
        )
        .env(
            "CGO_LDFLAGS",
            format!("-L{} -Wl,-rpath,{}", d.display(), d.display()),
        )
        .env("GOCACHE", cache.path().join("cache"))
        .env("GOPATH", cache.path().join("path"))
        .env("GOFLAGS", "-mod=mod")
        .env("GOPROXY", "off")
        .env("PHI4_DEMO_MODEL", common::fixture("phi4-tiny-docs.gguf"))
        .output()
        .expect("go (Debian's golang-go) is needed: the README's set-up installs it");
    let text = ok(out, "go test");
    assert!(text.contains("ok  \texample.com/phi4go/phi4"), "{text}");
}

#[test]
fn swift_module_map_imports_with_clang_modules() {
    let dir = common::tmpdir();
    let exe = dir.path().join("module_import");
    let map = common::root().join("examples/swift/Sources/CPhi4/module.modulemap");
    let mut clang = Command::new("clang");
    if let Some(prefix) = common::cross() {
        clang.arg(format!("--target={prefix}"));
    }
    ok(
        clang
            .arg("-fmodules")
            .arg(format!(
                "-fmodules-cache-path={}",
                dir.path().join("mc").display()
            ))
            .arg(format!("-fmodule-map-file={}", map.display()))
            .args(["-Wall", "-Werror"])
            .arg(common::root().join("tests/c/module_import.c"))
            .args(link_args())
            .arg("-o")
            .arg(&exe)
            .output()
            .unwrap(),
        "clang -fmodules",
    );
    let text = ok(
        common::target_command(&exe)
            .arg(common::fixture("phi4-tiny-docs.gguf"))
            .output()
            .unwrap(),
        "module_import",
    );
    assert!(text.contains("via module CPhi4: load ok"), "{text}");
}
