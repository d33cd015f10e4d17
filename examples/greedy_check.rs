use candle_core::Device;
fn main() {
    for (file, name) in [("models/SmolLM2-135M-Instruct.Q4_1.gguf", "smollm2"), ("models/gemma-3-270m-q4_k_m.gguf", "gemma3")] {
        let t = std::time::Instant::now();
        let loaded = llmgenie::model::load(std::path::Path::new(file), &Device::Cpu).unwrap();
        eprintln!("{name}: loaded in {:?}, rss {}", t.elapsed(), std::fs::read_to_string("/proc/self/status").unwrap().lines().find(|l| l.starts_with("VmHWM")).unwrap());
        let r: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(format!("tests/data/reference_{name}.json")).unwrap()).unwrap();
        let lj: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(format!("tests/data/logits_{name}.json")).unwrap()).unwrap();
        let mut maxdiff = 0f32; let mut sumdiff = 0f32; let mut n = 0;
        for (ci, case) in r["chat"].as_array().unwrap().iter().enumerate() {
            let prompt: Vec<u32> = case["prompt_ids"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect();
            let want: Vec<u32> = case["greedy_ids"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect();
            let mut cache = loaded.weights.new_cache();
            let mut logits: Vec<f32> = loaded.weights.forward(&prompt, &mut cache).unwrap().to_vec1().unwrap();
            let mut got = vec![];
            let mut info = String::new();
            for (si, &w) in want.iter().enumerate() {
                let tops = lj["cases"][ci][si]["top"].as_array().unwrap();
                let t0 = tops[0][0].as_u64().unwrap() as usize; let l0 = tops[0][1].as_f64().unwrap() as f32;
                for pair in tops {
                    let t = pair[0].as_u64().unwrap() as usize; let l = pair[1].as_f64().unwrap() as f32;
                    let d = ((logits[t] - logits[t0]) - (l - l0)).abs(); if false { eprint!("({t} {} {l}) ", logits[t]); } maxdiff = maxdiff.max(d); sumdiff += d; n += 1;
                }
                let (best, bl) = logits.iter().enumerate().fold((0, f32::MIN), |a, (i, &l)| if l > a.1 { (i, l) } else { a });
                got.push(best as u32);
                if best as u32 != w {
                    let lc = tops.iter().find(|p| p[0].as_u64().unwrap() as usize == best).map(|p| l0 - p[1].as_f64().unwrap() as f32);
                    info.push_str(&format!(" [step {} gap {:.3} llama.cpp gap {:?}]", got.len()-1, bl - logits[w as usize], lc)); }
                logits = loaded.weights.forward(&[w], &mut cache).unwrap().to_vec1().unwrap();
            }
            println!("{name}: match={} {}", got == want, info);
        }
        println!("{name}: logit diff vs llama.cpp: max {maxdiff:.4} mean {:.4}", sumdiff / n as f32);
    }
}
