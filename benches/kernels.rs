//! Speed of the bf16-weight kernels on the shapes of PaliGemma-3B's decoder (Gemma 2B), next
//! to the implementation they replaced and to candle's f32 matmul, and the machine's read
//! bandwidth that bounds decoding. Run with `cargo bench --bench kernels` on a quiet machine;
//! it rewrites the section of BENCHMARKS.md between `<!-- kernels:begin -->` and
//! `<!-- kernels:end -->` (or appends one).
//!
//! Every call reads its weights from memory, as decoding does: each shape cycles through
//! copies of its weights that together are larger than any cache.

use candle_core::{Device, Tensor};
use paligemma::ops::linear::quant::{ByteSlice, QuantFormat, QuantMatrix};
use paligemma::ops::linear::{self, Isa, baseline};
use rayon::prelude::*;
use std::hint::black_box;
use std::time::{Duration, Instant};

/// Bytes the weight copies of one shape (and the bandwidth test's buffer) add up to: well
/// past the last-level cache, which keeps part of a cyclic 1 GiB working set here (a 1 GiB
/// sum runs about a third faster than a 4 GiB one).
const WORKING_SET: usize = 4 << 30;
/// How long each measurement repeats for (at least `MIN_ITERS` calls).
const MEASURE: Duration = Duration::from_millis(1500);
const MIN_ITERS: usize = 5;

/// Decoder matrices `[n, k]` (out, in) of Gemma 2B, as in PaliGemma-3B.
const DECODER_SHAPES: [(&str, usize, usize); 5] = [
    ("q, o", 2048, 2048),
    ("k, v", 256, 2048),
    ("gate, up", 16384, 2048),
    ("down", 2048, 16384),
    ("vocab head", 257216, 2048),
];
/// Rows of `x` for decoding: one sequence, and four decoded together (`serve`'s batches).
const DECODE_ROWS: [usize; 2] = [1, 4];
/// Rows of `x` for prefill: 256 image tokens and a short prompt, and a longer sequence.
const PREFILL_ROWS: [usize; 2] = [260, 1024];

fn main() {
    let started = now_utc();
    let load_before = load_average();
    let bandwidth = read_bandwidth();
    println!("read bandwidth: {bandwidth:.1} GB/s");
    // `cargo bench --bench kernels -- quant`: only the quantized table, printed, not written.
    if std::env::args().any(|a| a == "quant") {
        quant_table(bandwidth);
        return;
    }
    // `cargo bench --bench kernels -- gemm`: only the many-row table, printed, not written.
    if std::env::args().any(|a| a == "gemm") {
        gemm_table();
        return;
    }
    let gemv = gemv_table(bandwidth);
    let quant = quant_table(bandwidth);
    let gemm = gemm_table();
    let load_after = load_average();
    let section = format!(
        "### Kernels: bf16 and quantized weights × f32 activations\n\n\
         Measured {started} UTC on {cpu}, {cores} cores, by `cargo bench --bench kernels` \
         (`benches/kernels.rs`); load average (1, 5, 15 min) {load_before} at the start and \
         {load_after} at the end (one-minute averages lag, and the benchmark itself adds about 2). Every call reads its \
         weights from memory: each shape cycles through copies of its weights adding up to \
         4 GiB. Times are medians.\n\n\
         Read bandwidth, two threads summing a 4 GiB buffer: **{bandwidth:.1} GB/s**.\n\n\
         #### Few rows (decoding): time per call, and GB/s of weights read\n\n\
         `AVX-512`, `AVX2` and `portable` are the kernels of `ops::linear` forced to one \
         instruction set (the model uses the fastest the CPU has); `before` is the \
         implementation they replaced (`ops::linear::baseline`); `candle f32` is candle's \
         matmul on the same weights in f32, which reads twice the bytes. `% of bandwidth` is \
         the fastest new kernel's GB/s over the read bandwidth above.\n\n{gemv}\n\
         #### Few rows, quantized weights (`--quant q8|q4`): time per call, and GB/s read\n\n\
         Group-wise q8 (8.5 bits per weight) and q4 (4.5 bits) of `ops::linear::quant`, per \
         instruction set, with `x` rounded to int8 per group for integer dot products \
         (`ops::linear::qgemv`: AVX-512 VNNI, AVX2, portable); the bytes include the f16 scales. `bf16` repeats the fastest bf16 \
         kernel for the ratio.\n\n{quant}\n\
         #### Many rows (prefill): GFLOP/s\n\n\
         `AVX-512` and `AVX2` are `matmul_bf16`'s register-tiled GEMM (`ops::linear::gemm`) \
         forced to one instruction set; `widened slabs` is what runs without either, slabs of \
         weights widened to f32 for the `gemm` crate; `candle f32` is candle's matmul with f32 \
         weights; `q8` and `q4` are `matmul_quant` on the same weights quantized (integer \
         dot products on AVX-512 VNNI, `ops::linear::qgemm`, with `x` rounded to int8 per \
         group; otherwise dequantized slabs for the `gemm` crate), counting multiply-adds as \
         two operations. The f32 FMA peak of the machine is {fma_peak:.0} GFLOP/s \
         (two threads of independent FMAs).\n\n{gemm}",
        fma_peak = fma_peak(),
        cpu = cpu_model(),
        cores = std::thread::available_parallelism().map_or(1, |n| n.get()),
    );
    write_section(&section);
}

/// GB/s two threads reach summing a 4 GiB buffer: the bound for any kernel that streams
/// weights once.
fn read_bandwidth() -> f64 {
    let buf: Vec<u64> = (0..WORKING_SET / 8).map(|i| i as u64).collect();
    let threads = rayon::current_num_threads();
    let part = buf.len().div_ceil(threads);
    let secs = median_secs(|_| {
        let s: u64 = buf.par_chunks(part).map(sum_u64).sum();
        black_box(s);
    });
    WORKING_SET as f64 / secs / 1e9
}

/// A sum with eight independent lanes, so that it runs at the speed of the loads.
fn sum_u64(v: &[u64]) -> u64 {
    let mut acc = [0u64; 8];
    let chunks = v.chunks_exact(8);
    let rest: u64 = chunks.remainder().iter().fold(0, |a, &b| a.wrapping_add(b));
    for c in chunks {
        for l in 0..8 {
            acc[l] = acc[l].wrapping_add(c[l]);
        }
    }
    acc.iter().fold(rest, |a, &b| a.wrapping_add(b))
}

fn gemv_table(bandwidth: f64) -> String {
    let isas: Vec<Isa> = Isa::ALL.into_iter().filter(|i| i.available()).collect();
    let mut table = String::from("| weight [n, k] | rows |");
    for isa in &isas {
        table += &format!(" {} |", isa_name(*isa));
    }
    table += " before | candle f32 | % of bandwidth |\n|---|---|";
    table += &"---|".repeat(isas.len() + 3);
    table += "\n";
    for &(name, n, k) in &DECODER_SHAPES {
        let weights = Weights::new(n, k);
        for &m in &DECODE_ROWS {
            let x = random_f32(m * k, 1);
            let bytes = (2 * n * k) as f64;
            let mut row = format!("| {name} [{n}, {k}] | {m} |");
            let mut best = 0f64;
            for &isa in &isas {
                let s = weights.time(|w| linear::matmul_bf16_on(isa, &x, m, k, w, n));
                best = best.max(bytes / s / 1e9);
                row += &cell(s, bytes);
            }
            row += &cell(weights.time(|w| baseline::gemv_bf16(&x, m, k, w, n)), bytes);
            row += &cell(candle_time(&weights, &x, m), 2.0 * bytes);
            row += &format!(" {:.0}% |", 100.0 * best / bandwidth);
            println!("{row}");
            table += &row;
            table += "\n";
        }
    }
    table
}

fn quant_table(bandwidth: f64) -> String {
    let isas: Vec<Isa> = Isa::ALL.into_iter().filter(|i| i.available()).collect();
    let mut table = String::from("| weight [n, k] | rows | format |");
    for isa in &isas {
        table += &format!(" {} |", isa_name(*isa));
    }
    table += " bf16 | % of bandwidth |\n|---|---|---|";
    table += &"---|".repeat(isas.len() + 2);
    table += "\n";
    for &(name, n, k) in &DECODER_SHAPES {
        let w = random_f32(n * k, 3);
        let bf16 = Weights::new(n, k);
        for format in [QuantFormat::Q8, QuantFormat::Q4] {
            let one = QuantMatrix::quantize(format, &w, n, k).expect("quantize");
            let bytes = (one.values().len() + one.scales().len()) as f64;
            let copies: Vec<QuantMatrix> = (0..(WORKING_SET as f64 / bytes).ceil() as usize)
                .map(|_| {
                    let part = |b: &[u8]| ByteSlice::owned(b.to_vec());
                    QuantMatrix::from_parts(format, n, k, part(one.values()), part(one.scales()))
                        .expect("copy")
                })
                .collect();
            for &m in &DECODE_ROWS {
                let x = random_f32(m * k, 1);
                let mut row = format!("| {name} [{n}, {k}] | {m} | {} |", format.name());
                let mut best = 0f64;
                for &isa in &isas {
                    let s = median_secs(|i| {
                        black_box(linear::matmul_quant_on(
                            isa,
                            &x,
                            m,
                            &copies[i % copies.len()],
                        ));
                    });
                    best = best.max(bytes / s / 1e9);
                    row += &cell(s, bytes);
                }
                let s = bf16.time(|wb| linear::matmul_bf16(&x, m, k, wb, n));
                row += &cell(s, (2 * n * k) as f64);
                row += &format!(" {:.0}% |", 100.0 * best / bandwidth);
                println!("{row}");
                table += &row;
                table += "\n";
            }
        }
    }
    table
}

fn gemm_table() -> String {
    let mut table = String::from(
        "| weight [n, k] | rows | AVX-512 | AVX2 | widened slabs | candle f32 | q8 | q4 |\n|---|---|---|---|---|---|---|---|\n",
    );
    for &(name, n, k) in DECODER_SHAPES.iter().filter(|s| s.0 != "vocab head") {
        let weights = Weights::new(n, k);
        let w = random_f32(n * k, 3);
        let quant = [QuantFormat::Q8, QuantFormat::Q4]
            .map(|f| QuantMatrix::quantize(f, &w, n, k).expect("quantize"));
        drop(w);
        for &m in &PREFILL_ROWS {
            let x = random_f32(m * k, 2);
            let flops = 2.0 * (m * n * k) as f64;
            let gflops = |secs: f64| format!("{:.1}", flops / secs / 1e9);
            let mut row = format!("| {name} [{n}, {k}] | {m} |");
            for isa in Isa::ALL {
                if isa.available() {
                    let secs = weights.time(|w| linear::matmul_bf16_on(isa, &x, m, k, w, n));
                    row += &format!(" {} |", gflops(secs));
                } else {
                    row += " - |";
                }
            }
            row += &format!(" {} |", gflops(candle_time(&weights, &x, m)));
            for q in &quant {
                let secs = median_secs(|_| {
                    black_box(linear::matmul_quant(&x, m, q));
                });
                row += &format!(" {} |", gflops(secs));
            }
            println!("{row}");
            table += &row;
            table += "\n";
        }
    }
    table
}

/// GFLOP/s of two threads running independent f32 FMAs on the widest vectors the CPU has:
/// the peak an f32 GEMM can approach.
fn fma_peak() -> f64 {
    const ITERS: usize = 10_000_000;
    let start = Instant::now();
    let flops: f64 = (0..rayon::current_num_threads())
        .into_par_iter()
        .map(|_| fma_loop(ITERS))
        .sum();
    flops / start.elapsed().as_secs_f64() / 1e9
}

/// Runs `iters` rounds of 12 independent vector FMAs; returns the flops done.
fn fma_loop(iters: usize) -> f64 {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::*;
        #[target_feature(enable = "avx512f")]
        fn zmm(iters: usize) -> f64 {
            let (a, b) = (_mm512_set1_ps(1.000_001), _mm512_set1_ps(1e-7));
            let mut acc = [_mm512_setzero_ps(); 12];
            for _ in 0..iters {
                for v in acc.iter_mut() {
                    *v = _mm512_fmadd_ps(*v, a, b);
                }
            }
            black_box(&acc);
            (iters * 12 * 16 * 2) as f64
        }
        #[target_feature(enable = "avx2,fma")]
        fn ymm(iters: usize) -> f64 {
            let (a, b) = (_mm256_set1_ps(1.000_001), _mm256_set1_ps(1e-7));
            let mut acc = [_mm256_setzero_ps(); 12];
            for _ in 0..iters {
                for v in acc.iter_mut() {
                    *v = _mm256_fmadd_ps(*v, a, b);
                }
            }
            black_box(&acc);
            (iters * 12 * 8 * 2) as f64
        }
        if Isa::Avx512.available() {
            // Safety: the CPU has AVX-512F.
            return unsafe { zmm(iters) };
        }
        if Isa::Avx2.available() {
            // Safety: the CPU has AVX2 and FMA.
            return unsafe { ymm(iters) };
        }
    }
    let mut acc = [0f32; 12];
    for _ in 0..iters {
        for v in acc.iter_mut() {
            *v = *v * 1.000_001 + 1e-7;
        }
    }
    black_box(&acc);
    (iters * 12 * 2) as f64
}

/// `" 1.23 ms (12.3 GB/s) |"`.
fn cell(secs: f64, bytes: f64) -> String {
    format!(" {:.3} ms ({:.1} GB/s) |", secs * 1e3, bytes / secs / 1e9)
}

fn isa_name(isa: Isa) -> &'static str {
    match isa {
        Isa::Avx512 => "AVX-512",
        Isa::Avx2 => "AVX2",
        Isa::Portable => "portable",
    }
}

/// Copies of one random bf16 matrix `[n, k]` adding up to at least [`WORKING_SET`] bytes.
struct Weights {
    n: usize,
    k: usize,
    copies: Vec<Vec<u16>>,
}

impl Weights {
    fn new(n: usize, k: usize) -> Self {
        let one: Vec<u16> = random_f32(n * k, 3)
            .into_iter()
            .map(|v| half::bf16::from_f32(v).to_bits())
            .collect();
        let count = WORKING_SET.div_ceil(2 * n * k);
        Self {
            n,
            k,
            copies: vec![one; count],
        }
    }

    /// Median seconds of `f`, each call on the next copy.
    fn time<T>(&self, mut f: impl FnMut(&[u16]) -> T) -> f64 {
        median_secs(|i| {
            black_box(f(&self.copies[i % self.copies.len()]));
        })
    }
}

/// Median seconds of candle's f32 `x Wᵀ` on copies of `weights` widened to f32 (the
/// copies cover the same working set, so half as many of them).
fn candle_time(weights: &Weights, x: &[f32], m: usize) -> f64 {
    let (n, k) = (weights.n, weights.k);
    let dev = Device::Cpu;
    let count = WORKING_SET.div_ceil(4 * n * k);
    let wide: Vec<f32> = weights.copies[0]
        .iter()
        .map(|&b| half::bf16::from_bits(b).to_f32())
        .collect();
    let one = Tensor::from_vec(wide, (n, k), &dev).expect("weight tensor");
    let copies: Vec<Tensor> = (0..count).map(|_| one.copy().expect("copy")).collect();
    drop(one);
    let xt = Tensor::from_slice(x, (m, k), &dev).expect("x tensor");
    median_secs(|i| {
        let w = &copies[i % copies.len()];
        black_box(xt.matmul(&w.t().expect("t")).expect("matmul"));
    })
}

/// Median seconds of `f(i)` for i = 0, 1, …, after one warm-up call, repeated for
/// [`MEASURE`] and at least [`MIN_ITERS`] times.
fn median_secs(mut f: impl FnMut(usize)) -> f64 {
    f(0);
    let start = Instant::now();
    let mut times = Vec::new();
    while times.len() < MIN_ITERS || start.elapsed() < MEASURE {
        let t = Instant::now();
        f(times.len() + 1);
        times.push(t.elapsed().as_secs_f64());
    }
    times.sort_by(f64::total_cmp);
    times[times.len() / 2]
}

/// Values in [-1, 1) from a xorshift generator: cheap enough for a gigabyte.
fn random_f32(len: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s >> 40) as f32 / (1u64 << 23) as f32 - 1.0
        })
        .collect()
}

/// `/proc/loadavg`'s 1, 5 and 15 minute averages, or `unknown`.
fn load_average() -> String {
    let text = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let avg: Vec<&str> = text.split_whitespace().take(3).collect();
    if avg.is_empty() {
        "unknown".into()
    } else {
        avg.join(" ")
    }
}

fn cpu_model() -> String {
    let info = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    info.lines()
        .find_map(|l| l.strip_prefix("model name"))
        .and_then(|l| l.split_once(':'))
        .map_or_else(|| "an unknown CPU".into(), |(_, v)| v.trim().to_string())
}

/// `YYYY-MM-DD HH:MM` now, in UTC.
fn now_utc() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let (days, rem) = (secs / 86400, secs % 86400);
    let (y, mo, d) = civil_from_days(days as i64);
    format!(
        "{y:04}-{mo:02}-{d:02} {:02}:{:02}",
        rem / 3600,
        rem % 3600 / 60
    )
}

/// The proleptic Gregorian date of a day count since 1970-01-01 (Howard Hinnant's method).
fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

/// Replaces the kernels section of BENCHMARKS.md, or appends one.
fn write_section(section: &str) {
    const BEGIN: &str = "<!-- kernels:begin -->";
    const END: &str = "<!-- kernels:end -->";
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/BENCHMARKS.md");
    let doc = std::fs::read_to_string(path).unwrap_or_default();
    let block = format!("{BEGIN}\n{section}{END}");
    let doc = match (doc.find(BEGIN), doc.find(END)) {
        (Some(b), Some(e)) if b < e => format!("{}{block}{}", &doc[..b], &doc[e + END.len()..]),
        _ => format!(
            "{}\n{block}\n",
            doc.trim_end_matches('\n').to_owned() + "\n"
        ),
    };
    std::fs::write(path, doc).expect("write BENCHMARKS.md");
    println!("wrote {path}");
}
