fn main() {
    let path = std::env::args().nth(1).unwrap();
    let m = phi4::model::Model::load(std::path::Path::new(&path), Default::default()).unwrap();
    println!("{:?}\nrepacked {}", m.config, m.repacked.len());
    let mut st = phi4::forward::RunState::new(&m, 512, 64, 2).unwrap();
    let abort = std::sync::atomic::AtomicBool::new(false);
    let mut toks: Vec<u32> = vec![1, 2, 3, 4, 5];
    let mut past = 0;
    let mut new = toks.clone();
    for _ in 0..20 {
        st.eval(&m, &new, past, &abort).unwrap();
        past += new.len();
        let best = st.logits.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).unwrap().0 as u32;
        toks.push(best);
        new = vec![best];
    }
    println!("{toks:?}");
}
