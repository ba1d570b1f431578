//! `lmx generate <model> <prompt>` prints tokens as they stream; `lmx chat <model>` is an
//! interactive conversation (history kept; `/reset` clears it, `/exit` or end of input quits).

use std::{
    io::{BufRead, Write},
    process::ExitCode,
};

use clap::Args;
use futures::StreamExt;

use super::client::{describe, Client, ClientArgs};
use crate::pb;

/// Sampling flags shared by generate and chat.
#[derive(Debug, Clone, Args)]
pub struct SamplingArgs {
    /// Most tokens to generate.
    #[arg(long)]
    pub max_tokens: Option<i32>,
    /// 0 is greedy.
    #[arg(long)]
    pub temperature: Option<f32>,
    #[arg(long)]
    pub top_p: Option<f32>,
    #[arg(long)]
    pub top_k: Option<i32>,
    #[arg(long)]
    pub repetition_penalty: Option<f32>,
    /// Seed for reproducible sampling.
    #[arg(long)]
    pub seed: Option<u64>,
    /// Stop when the output contains this string (repeatable).
    #[arg(long)]
    pub stop: Vec<String>,
}

impl SamplingArgs {
    pub(super) fn parameters(&self) -> pb::GenerationParameters {
        pb::GenerationParameters {
            max_tokens: self.max_tokens,
            temperature: self.temperature,
            top_p: self.top_p,
            top_k: self.top_k,
            repetition_penalty: self.repetition_penalty,
            repetition_penalty_last_n: None,
            seed: self.seed,
            stop: self.stop.clone(),
            logprobs: false,
        }
    }
}

/// Flags of `lmx generate`.
#[derive(Debug, Clone, Args)]
pub struct GenerateArgs {
    /// The model_id it was loaded with.
    pub model: String,
    /// The text to complete.
    pub prompt: String,
    #[arg(long, default_value = "")]
    pub revision: String,
    /// Print each streamed item as one JSON line.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub sampling: SamplingArgs,
    #[command(flatten)]
    pub client: ClientArgs,
}

/// Flags of `lmx chat`.
#[derive(Debug, Clone, Args)]
pub struct ChatArgs {
    /// The model_id it was loaded with.
    pub model: String,
    #[arg(long, default_value = "")]
    pub revision: String,
    /// A system message to start the conversation with.
    #[arg(long)]
    pub system: Option<String>,
    #[command(flatten)]
    pub sampling: SamplingArgs,
    #[command(flatten)]
    pub client: ClientArgs,
}

/// What a stream ended with.
struct Outcome {
    text: String,
    completion: Option<pb::Completion>,
}

fn print_token(text: &str) {
    print!("{text}");
    let _ = std::io::stdout().flush();
}

fn stats(c: &pb::Completion) -> String {
    let reason = c
        .finish_reason()
        .as_str_name()
        .trim_start_matches("FINISH_REASON_")
        .to_lowercase();
    format!(
        "[{} prompt + {} generated tokens, {reason}, first token {:.0} ms, {:.1} tok/s]",
        c.prompt_tokens, c.completion_tokens, c.time_to_first_token_ms, c.tokens_per_second
    )
}

/// `lmx generate`.
pub async fn generate(args: GenerateArgs) -> anyhow::Result<ExitCode> {
    let client = args.client.connect().await?;
    let request = client.request(pb::GenerateRequest {
        model_id: args.model.clone(),
        revision: args.revision.clone(),
        prompt: args.prompt.clone(),
        parameters: Some(args.sampling.parameters()),
        add_special_tokens: false,
    });
    let mut stream = match client.inference().generate(request).await {
        Ok(r) => r.into_inner(),
        Err(status) => {
            eprintln!("lmx generate: {}", describe(&status));
            return Ok(ExitCode::from(1));
        }
    };
    while let Some(item) = stream.next().await {
        let item = match item {
            Ok(item) => item,
            Err(status) => {
                eprintln!("\nlmx generate: {}", describe(&status));
                return Ok(ExitCode::from(1));
            }
        };
        match item.item {
            Some(pb::generate_response::Item::Token(t)) if args.json => {
                println!(
                    "{}",
                    serde_json::json!({"token": {"id": t.id, "text": t.text, "special": t.special}})
                )
            }
            Some(pb::generate_response::Item::Token(t)) => print_token(&t.text),
            Some(pb::generate_response::Item::Completion(c)) if args.json => println!(
                "{}",
                serde_json::json!({"completion": {
                    "finish_reason": c.finish_reason().as_str_name(),
                    "prompt_tokens": c.prompt_tokens,
                    "completion_tokens": c.completion_tokens,
                    "time_to_first_token_ms": c.time_to_first_token_ms,
                    "tokens_per_second": c.tokens_per_second,
                    "text": c.text,
                }})
            ),
            Some(pb::generate_response::Item::Completion(c)) => {
                println!();
                eprintln!("{}", stats(&c));
            }
            None => {}
        }
    }
    Ok(ExitCode::SUCCESS)
}

async fn chat_turn(
    client: &Client,
    args: &ChatArgs,
    history: &[pb::ChatMessage],
) -> Result<Outcome, tonic::Status> {
    let request = client.request(pb::ChatRequest {
        model_id: args.model.clone(),
        revision: args.revision.clone(),
        messages: history.to_vec(),
        parameters: Some(args.sampling.parameters()),
    });
    let mut stream = client.inference().chat(request).await?.into_inner();
    let mut outcome = Outcome {
        text: String::new(),
        completion: None,
    };
    while let Some(item) = stream.next().await {
        match item?.item {
            Some(pb::chat_response::Item::Token(t)) => {
                print_token(&t.text);
                outcome.text.push_str(&t.text);
            }
            Some(pb::chat_response::Item::Completion(c)) => outcome.completion = Some(c),
            None => {}
        }
    }
    Ok(outcome)
}

/// `lmx chat`.
pub async fn chat(args: ChatArgs) -> anyhow::Result<ExitCode> {
    let client = args.client.connect().await?;
    let mut history: Vec<pb::ChatMessage> = Vec::new();
    let system = args.system.clone().map(|content| pb::ChatMessage {
        role: "system".into(),
        content,
    });
    history.extend(system.clone());
    let interactive = std::io::IsTerminal::is_terminal(&std::io::stdin());
    if interactive {
        eprintln!(
            "chatting with {} (/reset clears the history, /exit or Ctrl-D quits)",
            args.model
        );
    }
    let mut lines = std::io::stdin().lock().lines();
    loop {
        if interactive {
            eprint!("> ");
            let _ = std::io::stderr().flush();
        }
        let Some(line) = lines.next() else { break };
        let line = line?;
        match line.trim() {
            "" => continue,
            "/exit" | "/quit" => break,
            "/reset" => {
                history.clear();
                history.extend(system.clone());
                eprintln!("(history cleared)");
                continue;
            }
            _ => {}
        }
        history.push(pb::ChatMessage {
            role: "user".into(),
            content: line,
        });
        match chat_turn(&client, &args, &history).await {
            Ok(outcome) => {
                println!();
                if let Some(c) = &outcome.completion {
                    eprintln!("{}", stats(c));
                }
                history.push(pb::ChatMessage {
                    role: "assistant".into(),
                    content: outcome.text,
                });
            }
            Err(status) => {
                eprintln!("lmx chat: {}", describe(&status));
                history.pop();
                if !interactive {
                    return Ok(ExitCode::from(1));
                }
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
