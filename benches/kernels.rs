//! The packed int8 kernel and its driver on their own: one matmul of a 1536 x 768 matrix (a
//! small model's MLP projection) by 1, 8 and 64 activation rows, per weight format, with the
//! activations' quantization kept from the last call (as the Q/K/V projections share it) and
//! with it included. `cargo bench --bench kernels`; criterion's element rate is multiply-adds
//! per second. Compare runs of one sitting only: these machines are noisy.

use candle_core::quantized::GgmlDType;
use criterion::{black_box, criterion_group, criterion_main, Criterion, Throughput};
use llmgenie::model::kernel_bench::PackedMatmul;

const N: usize = 1536;
const K: usize = 768;

fn bench(c: &mut Criterion) {
    for dtype in [
        GgmlDType::Q4_1,
        GgmlDType::Q8_0,
        GgmlDType::Q6K,
        GgmlDType::Q4K,
    ] {
        let mut group = c.benchmark_group(format!("{dtype:?} {N}x{K}"));
        for rows in [1usize, 8, 64] {
            let m = match PackedMatmul::new(dtype, N, K, rows) {
                Ok(Some(m)) => m,
                Ok(None) => {
                    eprintln!("{dtype:?}: the packed kernel does not run on this CPU");
                    return;
                }
                Err(e) => panic!("{dtype:?}: {e}"),
            };
            group.throughput(Throughput::Elements(m.macs()));
            group.bench_function(format!("{rows} rows"), |b| b.iter(|| black_box(m.run())));
            group.bench_function(format!("{rows} rows, quantizing them"), |b| {
                b.iter(|| black_box(m.run_fresh()))
            });
        }
        group.finish();
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
