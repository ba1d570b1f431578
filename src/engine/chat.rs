//! Chat templates: the model's Jinja `chat_template` rendered with minijinja in Hugging Face's
//! dialect: trim_blocks and lstrip_blocks, Python string methods (minijinja-contrib's pycompat),
//! loop controls, `raise_exception`, `strftime_now`, a Python-compatible `tojson`, and the
//! variables `messages`, `add_generation_prompt`, `bos_token`, `eos_token`.

use std::io;

use minijinja::{context, Environment, Error, ErrorKind};
use serde::Serialize;

use super::EngineError;

/// One message of a conversation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

/// A compiled chat template.
pub struct ChatTemplate {
    env: Environment<'static>,
    bos_token: String,
    eos_token: String,
}

const TEMPLATE: &str = "chat";

fn raise_exception(message: String) -> Result<String, Error> {
    Err(Error::new(ErrorKind::InvalidOperation, message))
}

fn strftime_now(format: String) -> String {
    chrono::Local::now().format(&format).to_string()
}

/// Python's `json.dumps` separators: ", " and ": ".
struct PythonFormatter;

impl serde_json::ser::Formatter for PythonFormatter {
    fn begin_array_value<W: ?Sized + io::Write>(
        &mut self,
        writer: &mut W,
        first: bool,
    ) -> io::Result<()> {
        if first {
            Ok(())
        } else {
            writer.write_all(b", ")
        }
    }
    fn begin_object_key<W: ?Sized + io::Write>(
        &mut self,
        writer: &mut W,
        first: bool,
    ) -> io::Result<()> {
        if first {
            Ok(())
        } else {
            writer.write_all(b", ")
        }
    }
    fn begin_object_value<W: ?Sized + io::Write>(&mut self, writer: &mut W) -> io::Result<()> {
        writer.write_all(b": ")
    }
}

/// `tojson` as transformers defines it (json.dumps with ensure_ascii=False), not minijinja's
/// HTML-escaping one.
fn tojson(value: minijinja::Value) -> Result<minijinja::Value, Error> {
    let mut out = Vec::new();
    let mut ser = serde_json::Serializer::with_formatter(&mut out, PythonFormatter);
    value
        .serialize(&mut ser)
        .map_err(|e| Error::new(ErrorKind::InvalidOperation, format!("tojson: {e}")))?;
    let text = String::from_utf8(out)
        .map_err(|e| Error::new(ErrorKind::InvalidOperation, e.to_string()))?;
    Ok(minijinja::Value::from_safe_string(text))
}

impl ChatTemplate {
    /// Compiles `source`; errors name what does not compile.
    pub fn new(
        source: String,
        bos_token: Option<String>,
        eos_token: Option<String>,
    ) -> Result<Self, EngineError> {
        let mut env = Environment::new();
        let syntax = minijinja::syntax::SyntaxConfig::builder()
            .trim_blocks(true)
            .lstrip_blocks(true)
            .build()
            .map_err(|e| EngineError::Load(format!("chat template syntax: {e}")))?;
        env.set_syntax(syntax);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", raise_exception);
        env.add_function("strftime_now", strftime_now);
        env.add_filter("tojson", tojson);
        env.add_template_owned(TEMPLATE, source)
            .map_err(|e| EngineError::Load(format!("the chat template does not compile: {e:#}")))?;
        Ok(Self {
            env,
            bos_token: bos_token.unwrap_or_default(),
            eos_token: eos_token.unwrap_or_default(),
        })
    }

    /// Renders a conversation.
    pub fn render(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<String, EngineError> {
        let template = self
            .env
            .get_template(TEMPLATE)
            .map_err(|e| EngineError::Load(format!("the chat template is gone: {e}")))?;
        template
            .render(context! {
                messages => messages
                    .iter()
                    .map(|m| minijinja::Value::from_pairs([("role", m.role.as_str()), ("content", m.content.as_str())]))
                    .collect::<minijinja::Value>(),
                add_generation_prompt => add_generation_prompt,
                bos_token => self.bos_token.as_str(),
                eos_token => self.eos_token.as_str(),
            })
            .map_err(|e| {
                if e.kind() == ErrorKind::InvalidOperation {
                    EngineError::Validation {
                        field: "messages",
                        message: format!("the model's chat template refused the conversation: {}", e.detail().unwrap_or("no reason given")),
                    }
                } else {
                    EngineError::Template(format!("{e:#}"))
                }
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CHATML: &str = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are helpful.<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

    fn msg(role: &str, content: &str) -> ChatMessage {
        ChatMessage {
            role: role.into(),
            content: content.into(),
        }
    }

    #[test]
    fn renders_chatml_with_and_without_generation_prompt() {
        let t = ChatTemplate::new(CHATML.into(), None, None).unwrap();
        let out = t.render(&[msg("user", "Hi")], true).unwrap();
        assert_eq!(
            out,
            "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
        );
        let out = t
            .render(&[msg("system", "S"), msg("user", "Hi")], false)
            .unwrap();
        assert_eq!(
            out,
            "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
        );
    }

    #[test]
    fn hf_dialect_features_work() {
        let source = "{{ bos_token }}{% for m in messages %}{% if m.role == 'skip' %}{% continue %}{% endif %}\
            {% if m.role not in ['user', 'assistant'] %}{{ raise_exception('bad role ' + m.role) }}{% endif %}\
            [{{ m.content.strip() | upper }}]{{ m | tojson }}{% endfor %}{{ eos_token }}";
        let t = ChatTemplate::new(source.into(), Some("<s>".into()), Some("</s>".into())).unwrap();
        let out = t
            .render(&[msg("user", "  hi  "), msg("skip", "x")], false)
            .unwrap();
        assert_eq!(
            out,
            "<s>[HI]{\"role\": \"user\", \"content\": \"  hi  \"}</s>"
        );
        let err = t.render(&[msg("robot", "x")], false).unwrap_err();
        assert!(
            matches!(&err, EngineError::Validation { field: "messages", message } if message.contains("bad role robot")),
            "{err}"
        );
    }

    #[test]
    fn templates_that_do_not_compile_are_load_errors() {
        assert!(matches!(
            ChatTemplate::new("{% for %}".into(), None, None),
            Err(EngineError::Load(_))
        ));
    }

    #[test]
    fn strftime_now_is_available() {
        let t = ChatTemplate::new("{{ strftime_now('%Y') }}".into(), None, None).unwrap();
        let year = t.render(&[], false).unwrap();
        assert_eq!(year.len(), 4);
    }
}
