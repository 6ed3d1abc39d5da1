//! The official clients, unchanged, against `phi4 serve` on the demo model: Ollama's Python
//! client and OpenAI's Python client (tests/clients/python_clients.py), Ollama's and OpenAI's
//! JavaScript clients under Node (tests/clients/js_clients.mjs); and the frameworks agents and
//! RAG apps are built with — LangChain, LlamaIndex, LiteLLM, instructor, the OpenAI Agents SDK,
//! the Anthropic SDK (tests/clients/frameworks.py, against a server whose `--tool-choice
//! alternate` makes the demo model call tools). Their pinned versions are installed by
//! .ci/setup: into target/clients/venv, target/clients/frameworks and tests/clients/node_modules.

mod common;

use std::process::Command;

fn run(what: &str, mut c: Command) {
    let out = c
        .output()
        .unwrap_or_else(|e| panic!("{what}: {e} (run .ci/setup)"));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{what}: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    eprint!("{stdout}");
}

#[test]
fn official_clients_work_unchanged() {
    if common::runner().is_some() {
        eprintln!("under an emulator: the clients run in the native test run");
        return;
    }
    let s = common::server::Server::start(&[]);
    let base = s.url("");
    let python = common::root().join("target/clients/venv/bin/python");
    let mut py = Command::new(&python);
    py.arg(common::root().join("tests/clients/python_clients.py"))
        .arg(&base);
    run("python clients", py);
    let mut js = Command::new("node");
    js.arg(common::root().join("tests/clients/js_clients.mjs"))
        .arg(&base);
    run("ollama-js and openai-node", js);
}

#[test]
fn frameworks_work_unchanged() {
    if common::runner().is_some() {
        eprintln!("under an emulator: the frameworks run in the native test run");
        return;
    }
    let s = common::server::Server::start(&["--tool-choice", "alternate"]);
    let python = common::root().join("target/clients/frameworks/bin/python");
    let mut py = Command::new(&python);
    py.arg(common::root().join("tests/clients/frameworks.py"))
        .arg(s.url(""))
        // No framework may reach out: telemetry and model-price lookups off.
        .env("LITELLM_LOCAL_MODEL_COST_MAP", "True")
        .env("ANONYMIZED_TELEMETRY", "False")
        .env("OPENAI_AGENTS_DISABLE_TRACING", "1");
    run("frameworks", py);
}
