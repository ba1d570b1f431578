//! `lmx run MODEL [PROMPT...]`, Ollama's habit: with a prompt (the words after the model, and/or
//! text piped on stdin), one answer is streamed to stdout and the command exits; with neither, on
//! a terminal, an interactive chat (`lmx chat`). The answer comes from Chat (the model's chat
//! template); a model without one is completed from the raw prompt with Generate instead.

use std::{
    io::{IsTerminal, Read, Write},
    process::ExitCode,
};

use clap::Args;
use futures::StreamExt;

use super::{
    client::{describe, Client, ClientArgs},
    generate::{self, ChatArgs, SamplingArgs},
};
use crate::pb;

/// Flags of `lmx run`.
#[derive(Debug, Clone, Args)]
pub struct RunArgs {
    /// A model reference (org/name, org/name@rev, org/name:Q4_K_M, an alias, a folder on the
    /// server); loaded on demand by the server when it is not loaded.
    pub model: String,
    /// The prompt (several words are joined with spaces). Without one: the text piped on stdin,
    /// or an interactive chat on a terminal.
    pub prompt: Vec<String>,
    #[arg(long, default_value = "")]
    pub revision: String,
    /// A system message to start with.
    #[arg(long)]
    pub system: Option<String>,
    /// Print the token counts and speed on stderr after the answer.
    #[arg(long)]
    pub verbose: bool,
    #[command(flatten)]
    pub sampling: SamplingArgs,
    #[command(flatten)]
    pub client: ClientArgs,
}

/// The prompt from the arguments and, when stdin is not a terminal, what is piped on it.
fn prompt(args: &RunArgs, stdin_is_terminal: bool) -> std::io::Result<String> {
    let mut prompt = args.prompt.join(" ");
    if !stdin_is_terminal {
        let mut piped = String::new();
        std::io::stdin().read_to_string(&mut piped)?;
        let piped = piped.trim_end();
        if !piped.is_empty() {
            prompt = if prompt.is_empty() {
                piped.to_owned()
            } else {
                format!("{prompt}\n\n{piped}")
            };
        }
    }
    Ok(prompt)
}

/// `lmx run`.
pub async fn run(args: RunArgs) -> anyhow::Result<ExitCode> {
    let stdin_is_terminal = std::io::stdin().is_terminal();
    let prompt = prompt(&args, stdin_is_terminal)?;
    if prompt.trim().is_empty() {
        if stdin_is_terminal {
            return generate::chat(ChatArgs {
                model: args.model,
                revision: args.revision,
                system: args.system,
                sampling: args.sampling,
                client: args.client,
            })
            .await;
        }
        eprintln!("lmx run: no prompt: give one after the model, or pipe it on stdin");
        return Ok(ExitCode::from(2));
    }
    let client = args.client.connect().await?;
    let result = match answer_chat(&client, &args, &prompt).await {
        Err(Failure {
            status,
            printed: false,
        }) if no_chat_template(&status) => answer_generate(&client, &args, &prompt).await,
        other => other,
    };
    match result {
        Ok(completion) => {
            println!();
            if args.verbose {
                if let Some(c) = completion {
                    eprintln!(
                        "[{} prompt + {} generated tokens, first token {:.0} ms, {:.1} tok/s]",
                        c.prompt_tokens,
                        c.completion_tokens,
                        c.time_to_first_token_ms,
                        c.tokens_per_second
                    );
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Err(failure) => {
            if failure.printed {
                println!();
            }
            eprintln!("lmx run: {}", describe(&failure.status));
            Ok(ExitCode::from(1))
        }
    }
}

struct Failure {
    status: tonic::Status,
    /// Whether part of the answer was printed already.
    printed: bool,
}

impl From<tonic::Status> for Failure {
    fn from(status: tonic::Status) -> Self {
        Self {
            status,
            printed: false,
        }
    }
}

fn no_chat_template(status: &tonic::Status) -> bool {
    use tonic_types::StatusExt;
    status
        .get_details_error_info()
        .is_some_and(|info| info.reason == "NO_CHAT_TEMPLATE")
}

fn print_token(text: &str) {
    print!("{text}");
    let _ = std::io::stdout().flush();
}

async fn answer_chat(
    client: &Client,
    args: &RunArgs,
    prompt: &str,
) -> Result<Option<pb::Completion>, Failure> {
    let mut messages: Vec<pb::ChatMessage> = args
        .system
        .iter()
        .map(|content| pb::ChatMessage {
            role: "system".into(),
            content: content.clone(),
        })
        .collect();
    messages.push(pb::ChatMessage {
        role: "user".into(),
        content: prompt.to_owned(),
    });
    let request = client.request(pb::ChatRequest {
        model_id: args.model.clone(),
        revision: args.revision.clone(),
        messages,
        parameters: Some(args.sampling.parameters()),
    });
    let mut stream = client.inference().chat(request).await?.into_inner();
    let mut printed = false;
    let mut completion = None;
    while let Some(item) = stream.next().await {
        match item.map_err(|status| Failure { status, printed })?.item {
            Some(pb::chat_response::Item::Token(t)) => {
                printed = true;
                print_token(&t.text);
            }
            Some(pb::chat_response::Item::Completion(c)) => completion = Some(c),
            None => {}
        }
    }
    Ok(completion)
}

async fn answer_generate(
    client: &Client,
    args: &RunArgs,
    prompt: &str,
) -> Result<Option<pb::Completion>, Failure> {
    let request = client.request(pb::GenerateRequest {
        model_id: args.model.clone(),
        revision: args.revision.clone(),
        prompt: prompt.to_owned(),
        parameters: Some(args.sampling.parameters()),
        add_special_tokens: true,
    });
    let mut stream = client.inference().generate(request).await?.into_inner();
    let mut printed = false;
    let mut completion = None;
    while let Some(item) = stream.next().await {
        match item.map_err(|status| Failure { status, printed })?.item {
            Some(pb::generate_response::Item::Token(t)) => {
                printed = true;
                print_token(&t.text);
            }
            Some(pb::generate_response::Item::Completion(c)) => completion = Some(c),
            None => {}
        }
    }
    Ok(completion)
}
