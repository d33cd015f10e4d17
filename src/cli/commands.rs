//! The subcommands' bodies.

use std::io::Write;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use llmgenie::catalog::{models_dir, Catalog};
use llmgenie::chat::Message;
use llmgenie::engine::{Engine, Event, GenerateRequest};
use llmgenie::gguf::{summarize, GgufFile};
use llmgenie::model::select_device;

use super::{chat_loop, BenchArgs, Cli, Command, ModelArgs, RunArgs, RuntimeArgs};

pub fn dispatch(cli: Cli) -> Result<()> {
    let verbose = cli.verbose;
    match cli.command {
        Command::Run(args) => run(args, verbose),
        Command::Inspect { model } => inspect(&model),
        Command::Pull { name, models_dir } => pull(&name, models_dir),
        Command::List { models_dir } => list(models_dir),
        Command::Bench(args) => bench(args),
        Command::Serve(args) => super::serve::serve(args),
        Command::Train { what } => super::router_cmds::train(what),
        Command::Eval { what } => super::router_cmds::eval(what),
        Command::Classify { text, weights } => {
            super::router_cmds::classify(&text, weights.as_deref())
        }
    }
}

fn catalog(dir: Option<PathBuf>) -> Result<Catalog> {
    Ok(Catalog::load(&dir.unwrap_or_else(models_dir))?)
}

/// The process-wide runtime settings: compute threads, how KV caches store their values and
/// where packed weights are cached.
pub(super) fn apply_runtime(runtime: &RuntimeArgs) -> Result<()> {
    llmgenie::model::set_cache_type(runtime.kv_cache_type);
    llmgenie::model::set_pack_cache_dir(match &runtime.packed_cache {
        Some(dir) if dir.as_os_str() == "off" => None,
        Some(dir) => Some(dir.clone()),
        None => llmgenie::model::default_pack_cache_dir(),
    });
    set_threads(runtime.threads)
}

fn set_threads(threads: Option<usize>) -> Result<()> {
    let threads = threads.or_else(|| {
        // Without the variable, candle works out its default thread count (physical cores,
        // from /proc/cpuinfo) again at every operation: ~150 file reads per decode step.
        // Work it out once and pin it.
        std::env::var("RAYON_NUM_THREADS")
            .is_err()
            .then(candle_core::utils::get_num_threads)
    });
    if let Some(n) = threads {
        if n == 0 {
            bail!("--threads must be at least 1");
        }
        // candle sizes its work split from this variable; rayon's pool from the builder.
        std::env::set_var("RAYON_NUM_THREADS", n.to_string());
        rayon::ThreadPoolBuilder::new()
            .num_threads(n)
            .build_global()
            .context("cannot size the thread pool")?;
    }
    Ok(())
}

/// Resolve `--model`, fetching the default model on first use.
fn resolve(args: &ModelArgs) -> Result<(String, PathBuf)> {
    let cat = catalog(args.runtime.models_dir.clone())?;
    match cat.resolve(&args.model) {
        Ok(found) => Ok(found),
        Err(llmgenie::catalog::CatalogError::NotDownloaded { name, .. }) => {
            eprintln!("{name} is not downloaded yet; fetching it");
            let path = llmgenie::pull::pull(&cat, &name, true)?;
            Ok((name, path))
        }
        Err(e) => Err(e.into()),
    }
}

pub(super) fn start_engine(args: &ModelArgs, verbose: bool) -> Result<Engine> {
    apply_runtime(&args.runtime)?;
    let (name, path) = resolve(args)?;
    let device = select_device(args.runtime.device)?;
    let engine = Engine::start(&name, &path, device)?;
    if verbose {
        let info = engine.info();
        eprintln!(
            "loaded {} ({}, {} layers) on {} in {:.2}s",
            info.name,
            info.spec.architecture,
            info.spec.block_count,
            info.device,
            info.load_time.as_secs_f64()
        );
    }
    Ok(engine)
}

fn run(args: RunArgs, verbose: bool) -> Result<()> {
    let engine = start_engine(&args.model, verbose)?;
    let Some(prompt) = args.prompt.clone() else {
        return chat_loop::interactive(&engine, &args, verbose);
    };
    let ids = if args.raw {
        engine.tokenizer().encode_prompt(&prompt)?
    } else {
        let mut messages = Vec::new();
        if let Some(system) = &args.system {
            messages.push(Message::new("system", system));
        }
        messages.push(Message::new("user", &prompt));
        let rendered = engine.template().render(&messages, true)?;
        engine.tokenizer().encode_prompt(&rendered)?
    };
    generate(&engine, &args, ids, verbose)?;
    println!();
    Ok(())
}

/// Stream one answer to stdout; returns the text.
pub(super) fn generate(
    engine: &Engine,
    args: &RunArgs,
    prompt: Vec<u32>,
    verbose: bool,
) -> Result<String> {
    let request = GenerateRequest {
        prompt,
        params: args.sampling.params(),
        max_tokens: args.sampling.max_tokens,
        stop: args.sampling.stop.clone(),
        json: false,
    };
    let mut events = engine.submit(request)?;
    let mut stdout = std::io::stdout().lock();
    let mut answer = String::new();
    while let Some(event) = events.blocking_recv() {
        match event {
            Event::Token(t) => {
                stdout.write_all(t.text.as_bytes())?;
                stdout.flush()?;
                answer.push_str(&t.text);
            }
            Event::Done(done) => {
                if verbose {
                    let rate =
                        |n: usize, d: std::time::Duration| n as f64 / d.as_secs_f64().max(1e-9);
                    eprintln!(
                        "\n[prompt {} tokens, {:.1} tokens/s; generated {} tokens, {:.1} tokens/s; finish: {}]",
                        done.prompt_tokens,
                        rate(done.prompt_tokens, done.prompt_time),
                        done.generated_tokens,
                        rate(done.generated_tokens.saturating_sub(1), done.generation_time),
                        done.reason.as_str()
                    );
                }
                return Ok(answer);
            }
            Event::Error(e) => bail!("generation failed: {e}"),
        }
    }
    bail!("the model thread stopped before the answer was complete")
}

fn inspect(model: &str) -> Result<()> {
    let cat = catalog(None)?;
    let (_, path) = cat.resolve(model)?;
    let file = GgufFile::open(&path)?;
    let summary = summarize(&file)?;
    println!("file: {}", path.display());
    println!("{summary}");
    Ok(())
}

fn pull(name: &str, dir: Option<PathBuf>) -> Result<()> {
    let cat = catalog(dir)?;
    let path = llmgenie::pull::pull(&cat, name, true)?;
    println!("{}", path.display());
    Ok(())
}

fn list(dir: Option<PathBuf>) -> Result<()> {
    let cat = catalog(dir)?;
    for e in &cat.models {
        let present = if cat.path_of(e).is_file() {
            "downloaded"
        } else {
            "-"
        };
        let default = if e.name == cat.default {
            " (default)"
        } else {
            ""
        };
        println!(
            "{:<16} {:<11} {}{}",
            e.name, present, e.description, default
        );
    }
    Ok(())
}

fn bench(args: BenchArgs) -> Result<()> {
    if args.profile {
        llmgenie::model::phases::enable();
    }
    bench_run(&args)?;
    if args.profile {
        std::io::stdout().flush()?;
        print_phases();
    }
    Ok(())
}

/// The decode steps' time per phase, to stderr (`bench --profile`).
fn print_phases() {
    use llmgenie::model::phases::{totals, Phase};
    let totals = totals();
    let step = totals
        .iter()
        .find(|(p, _)| *p == Phase::Step)
        .map_or(0.0, |(_, d)| d.as_secs_f64());
    if step == 0.0 {
        eprintln!("no CPU decode steps ran: nothing to profile");
        return;
    }
    eprintln!("decode steps: {:.3} s in all; by phase:", step);
    let mut named = 0.0;
    for (phase, d) in totals.iter().filter(|(p, _)| *p != Phase::Step) {
        let s = d.as_secs_f64();
        named += s;
        eprintln!(
            "  {:<30} {:>8.3} s  {:>5.1}%",
            phase.name(),
            s,
            100.0 * s / step
        );
    }
    let rest = (step - named).max(0.0);
    eprintln!(
        "  {:<30} {:>8.3} s  {:>5.1}%",
        "the rest",
        rest,
        100.0 * rest / step
    );
}

fn bench_run(args: &BenchArgs) -> Result<()> {
    apply_runtime(&args.model.runtime)?;
    let (name, path) = resolve(&args.model)?;
    let device = select_device(args.model.runtime.device)?;
    let cfg = llmgenie::bench::BenchConfig {
        prompt_tokens: args.prompt_tokens,
        gen_tokens: args.gen_tokens,
        runs: args.runs,
    };
    if !args.batch.is_empty() {
        let report = llmgenie::bench::batch::run(&path, &name, &device, &args.batch, &cfg)?;
        if args.json {
            println!("{}", serde_json::to_string(&report)?);
            return Ok(());
        }
        println!(
            "model {}, {} threads, {}-token prompts, {} tokens each, median of {} runs",
            report.model, report.threads, report.prompt_tokens, report.gen_tokens, report.runs
        );
        println!("sequences  tokens/s  step ms  vs one");
        for p in &report.points {
            println!(
                "{:>9}  {:>8.1}  {:>7.1}  {:>5.2}x",
                p.sequences, p.tokens_per_s, p.step_ms, p.speedup
            );
        }
        return Ok(());
    }
    let report = llmgenie::bench::run(&path, &name, &device, &cfg)?;
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        println!("model            {}", report.model);
        println!("threads          {}", report.threads);
        println!("prompt tokens    {}", report.prompt_tokens);
        println!("generated tokens {}", report.gen_tokens);
        println!("runs             {}", report.runs);
        println!(
            "prefill          {:.1} tokens/s",
            report.prefill_tokens_per_s
        );
        println!(
            "decode           {:.1} tokens/s",
            report.decode_tokens_per_s
        );
        println!("load             {:.3} s", report.load_s);
        println!(
            "peak RSS         {:.1} MiB",
            report.peak_rss_bytes as f64 / (1024.0 * 1024.0)
        );
    }
    Ok(())
}
