//! `llmgenie run` without a prompt: a chat in the terminal that keeps the conversation.

use std::io::{BufRead, Write};

use anyhow::Result;
use llmgenie::chat::Message;
use llmgenie::engine::Engine;

use super::commands::generate;
use super::RunArgs;

pub fn interactive(engine: &Engine, args: &RunArgs, verbose: bool) -> Result<()> {
    let mut messages: Vec<Message> = Vec::new();
    if let Some(system) = &args.system {
        messages.push(Message::new("system", system));
    }
    eprintln!(
        "chatting with {} (empty line or Ctrl-D to quit, /clear to forget)",
        engine.info().name
    );
    let stdin = std::io::stdin();
    let mut lines = stdin.lock().lines();
    loop {
        eprint!(">>> ");
        std::io::stderr().flush()?;
        let Some(line) = lines.next() else { break };
        let line = line?;
        let line = line.trim();
        if line.is_empty() {
            break;
        }
        if line == "/clear" {
            messages.retain(|m| m.role == "system");
            continue;
        }
        messages.push(Message::new("user", line));
        let ids = if args.raw {
            engine.tokenizer().encode_prompt(line)?
        } else {
            engine
                .tokenizer()
                .encode_prompt(&engine.template().render(&messages, true)?)?
        };
        let answer = generate(engine, args, ids, verbose)?;
        println!();
        messages.push(Message::new("assistant", &answer));
    }
    Ok(())
}
