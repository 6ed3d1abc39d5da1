fn main() {
    let bytes = std::fs::read("tests/fixtures/phi4-vocab.gguf").unwrap();
    let g = phi4::gguf::parse(&bytes).unwrap();
    let n = match g.get("tokenizer.ggml.tokens") { Some(phi4::gguf::Value::Array(_, t)) => t.len(), _ => 0 };
    let t = std::time::Instant::now();
    let tok = phi4::tokenizer::Tokenizer::from_gguf(&g, n).unwrap();
    println!("built in {:?}", t.elapsed());
    for s in ["Hello world", "<|im_start|>user", "  don't DON'T 12345\r\n\n  x"] {
        let ids = tok.encode(s, false);
        println!("{s:?} -> {ids:?} -> {:?}", tok.decode(&ids, true));
        println!("special: {:?}", tok.encode(s, true));
    }
}
