use candle_core::{Device, Tensor};
use candle_core::quantized::gguf_file;
fn main() {
    let file = "models/SmolLM2-135M-Instruct.Q4_1.gguf";
    let mut f = std::fs::File::open(file).unwrap();
    let ct = gguf_file::Content::read(&mut f).unwrap();
    let mut m = candle_transformers::models::quantized_llama::ModelWeights::from_gguf(ct, &mut f, &Device::Cpu).unwrap();
    let r: serde_json::Value = serde_json::from_str(&std::fs::read_to_string("tests/data/reference_smollm2.json").unwrap()).unwrap();
    for case in r["chat"].as_array().unwrap() {
        let prompt: Vec<u32> = case["prompt_ids"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect();
        let want: Vec<u32> = case["greedy_ids"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect();
        let x = Tensor::new(prompt.as_slice(), &Device::Cpu).unwrap().unsqueeze(0).unwrap();
        let mut logits: Vec<f32> = m.forward(&x, 0).unwrap().squeeze(0).unwrap().to_vec1().unwrap();
        let mut pos = prompt.len();
        let mut got = vec![]; let mut info = String::new();
        for &w in &want {
            let (best, bl) = logits.iter().enumerate().fold((0, f32::MIN), |a, (i, &l)| if l > a.1 { (i, l) } else { a });
            got.push(best as u32);
            if best as u32 != w { info.push_str(&format!(" [step {} gap {:.3}]", got.len()-1, bl - logits[w as usize])); }
            let x = Tensor::new(&[w], &Device::Cpu).unwrap().unsqueeze(0).unwrap();
            logits = m.forward(&x, pos).unwrap().squeeze(0).unwrap().to_vec1().unwrap();
            pos += 1;
        }
        println!("candle smollm2: match={} {}", got == want, info);
    }
}
