//! The `llmgenie` command line: a thin layer over the library.

mod cli;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    // The config file feeds the environment, so it must be read before the flags are parsed.
    if let Err(e) = cli::config_file::apply() {
        eprintln!("error: {e:#}");
        return ExitCode::FAILURE;
    }
    let args = cli::Cli::parse();
    let serving = matches!(args.command, cli::Command::Serve(_));
    cli::init_logging(args.verbose, args.log_format, serving);
    let result = cli::dispatch(args);
    // A packed-weight cache written during the run is kept only once it is on disk.
    if llmgenie::model::pack_caches_pending() {
        eprintln!(
            "finishing the packed-weight cache (once per model file; later loads map it; \
             --packed-cache off skips it)"
        );
    }
    llmgenie::model::wait_for_pack_caches();
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // One line, the whole cause chain, then exit status 1.
            let chain: Vec<String> = e.chain().map(|c| c.to_string()).collect();
            eprintln!("error: {}", chain.join(": "));
            ExitCode::FAILURE
        }
    }
}
