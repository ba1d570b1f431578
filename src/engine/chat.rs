//! Chat templates: the model's Jinja `chat_template` rendered with minijinja in Hugging Face's
//! dialect: trim_blocks and lstrip_blocks, Python string methods (minijinja-contrib's pycompat),
//! loop controls, `raise_exception`, `strftime_now`, a Python-compatible `tojson`, and the
//! variables `messages`, `add_generation_prompt`, `bos_token`, `eos_token`.
//!
//! Templates come with downloaded models and are untrusted input: every render runs under
//! [`TemplateLimits`] (minijinja's fuel, which bounds both the instructions run and the bytes
//! created; a recursion limit; a cap on the output; a wall-clock budget checked as output is
//! written and at the end). Exceeding one fails that render with
//! [`EngineError::TemplateLimit`]; nothing keeps running. A template is also rendered once, on
//! sample conversations, when it is compiled, so a hostile one fails the load, not a user.

use std::{
    io,
    time::{Duration, Instant},
};

use minijinja::{context, Environment, Error, ErrorKind};
use serde::Serialize;

use super::EngineError;

/// One message of a conversation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

/// What one render may take.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TemplateLimits {
    /// minijinja fuel: about one per instruction and one per 64 bytes of data created.
    pub fuel: u64,
    /// minijinja's recursion limit (loops, macros and includes count).
    pub recursion: usize,
    /// Most bytes the rendered prompt may have.
    pub max_output_bytes: usize,
    /// Wall-clock budget of one render.
    pub time_budget: Duration,
}

impl Default for TemplateLimits {
    /// Far above what real chat templates need for hundreds of messages (they use well under
    /// 1% of this fuel), far below what hurts the server: about 0.1-0.5 s of one core and
    /// 128 MiB at most.
    fn default() -> Self {
        Self {
            fuel: 2_000_000,
            recursion: 100,
            max_output_bytes: 16 << 20,
            time_budget: Duration::from_secs(2),
        }
    }
}

/// A compiled chat template.
pub struct ChatTemplate {
    env: Environment<'static>,
    bos_token: String,
    eos_token: String,
    limits: TemplateLimits,
}

/// Marks the errors `raise_exception` produces: the template refusing a conversation, not
/// failing.
#[derive(Debug, thiserror::Error)]
#[error("raised by the template")]
struct Raised;

/// The render's output: refuses bytes past the cap or past the deadline, which stops the render.
struct Bounded {
    out: Vec<u8>,
    max: usize,
    deadline: Instant,
    exceeded: Option<String>,
}

impl io::Write for Bounded {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.out.len() + buf.len() > self.max {
            self.exceeded = Some(format!("the rendered prompt exceeds {} bytes", self.max));
        } else if Instant::now() > self.deadline {
            self.exceeded = Some("the render exceeded its time budget".to_owned());
        }
        if self.exceeded.is_some() {
            return Err(io::Error::other("template limit"));
        }
        self.out.extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Conversations a template must render within its limits at load time.
fn samples() -> [Vec<ChatMessage>; 2] {
    let m = |role: &str, content: &str| ChatMessage {
        role: role.into(),
        content: content.into(),
    };
    [
        vec![m("user", "Hello!")],
        vec![
            m("system", "You are a helpful assistant."),
            m("user", "What is 2 + 2?"),
            m("assistant", "4."),
            m("user", "And 3 + 3?"),
        ],
    ]
}

const TEMPLATE: &str = "chat";

fn raise_exception(message: String) -> Result<String, Error> {
    Err(Error::new(ErrorKind::InvalidOperation, message).with_source(Raised))
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
    /// Compiles `source` under the default limits and renders sample conversations with it;
    /// errors name what does not compile or which limit a sample exceeded.
    pub fn new(
        source: String,
        bos_token: Option<String>,
        eos_token: Option<String>,
    ) -> Result<Self, EngineError> {
        Self::with_limits(source, bos_token, eos_token, TemplateLimits::default())
    }

    /// [`ChatTemplate::new`] with explicit limits.
    pub fn with_limits(
        source: String,
        bos_token: Option<String>,
        eos_token: Option<String>,
        limits: TemplateLimits,
    ) -> Result<Self, EngineError> {
        let mut env = Environment::new();
        let syntax = minijinja::syntax::SyntaxConfig::builder()
            .trim_blocks(true)
            .lstrip_blocks(true)
            .build()
            .map_err(|e| EngineError::Load(format!("chat template syntax: {e}")))?;
        env.set_syntax(syntax);
        env.set_fuel(Some(limits.fuel));
        env.set_recursion_limit(limits.recursion);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", raise_exception);
        env.add_function("strftime_now", strftime_now);
        env.add_filter("tojson", tojson);
        env.add_template_owned(TEMPLATE, source)
            .map_err(|e| EngineError::Load(format!("the chat template does not compile: {e:#}")))?;
        let template = Self {
            env,
            bos_token: bos_token.unwrap_or_default(),
            eos_token: eos_token.unwrap_or_default(),
            limits,
        };
        // Templates may refuse a sample (a role they do not support): only limits fail a load.
        for sample in samples() {
            if let Err(EngineError::TemplateLimit(why)) = template.render(&sample, true) {
                return Err(EngineError::TemplateLimit(format!(
                    "rendering a {}-message sample conversation: {why}",
                    sample.len()
                )));
            }
        }
        Ok(template)
    }

    /// Renders a conversation within the limits.
    pub fn render(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<String, EngineError> {
        let template = self
            .env
            .get_template(TEMPLATE)
            .map_err(|e| EngineError::Load(format!("the chat template is gone: {e}")))?;
        let started = Instant::now();
        let mut out = Bounded {
            out: Vec::new(),
            max: self.limits.max_output_bytes,
            deadline: started + self.limits.time_budget,
            exceeded: None,
        };
        let result = template.render_captured_to(
            context! {
                messages => messages
                    .iter()
                    .map(|m| minijinja::Value::from_pairs([("role", m.role.as_str()), ("content", m.content.as_str())]))
                    .collect::<minijinja::Value>(),
                add_generation_prompt => add_generation_prompt,
                bos_token => self.bos_token.as_str(),
                eos_token => self.eos_token.as_str(),
            },
            &mut out,
        )
        .map(drop);
        if let Some(why) = out.exceeded.take() {
            return Err(EngineError::TemplateLimit(why));
        }
        if let Err(e) = result {
            return Err(self.render_error(e));
        }
        if started.elapsed() > self.limits.time_budget {
            return Err(EngineError::TemplateLimit(format!(
                "the render took {:?}, more than its budget of {:?}",
                started.elapsed(),
                self.limits.time_budget
            )));
        }
        String::from_utf8(out.out)
            .map_err(|_| EngineError::Template("the rendered prompt is not UTF-8".into()))
    }

    fn render_error(&self, e: Error) -> EngineError {
        let raised = std::error::Error::source(&e).is_some_and(|s| s.is::<Raised>());
        match e.kind() {
            ErrorKind::InvalidOperation if raised => EngineError::Validation {
                field: "messages",
                message: format!(
                    "the model's chat template refused the conversation: {}",
                    e.detail().unwrap_or("no reason given")
                ),
            },
            ErrorKind::OutOfFuel => EngineError::TemplateLimit(format!(
                "it ran out of fuel ({} units: too many steps or too much data)",
                self.limits.fuel
            )),
            ErrorKind::InvalidOperation
                if e.detail().is_some_and(|d| d.contains("recursion limit")) =>
            {
                EngineError::TemplateLimit(format!(
                    "it nested deeper than the recursion limit ({})",
                    self.limits.recursion
                ))
            }
            _ => EngineError::Template(format!("{e:#}")),
        }
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

    fn limited(source: &str, limits: TemplateLimits) -> Result<ChatTemplate, EngineError> {
        ChatTemplate::with_limits(source.into(), None, None, limits)
    }

    /// Templates that would spin or allocate without end: every one is refused at load, fast.
    pub(crate) const HOSTILE: &[&str] = &[
        "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
        "{% for i in range(100000) %}{% for j in range(100000) %}x{% endfor %}{% endfor %}",
        "{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}",
        "{% set s = 'x' * 100000000 %}{{ s }}{{ s }}",
        "{{ ('x' * 1000000) * 1000 }}",
        "{% for i in range(100000) %}{{ 'x' * 1000 }}{% endfor %}",
        "{% for i in range(100000) %}{{ messages | tojson }}{% endfor %}",
    ];

    #[test]
    fn hostile_templates_fail_the_load_within_the_limits() {
        for source in HOSTILE {
            let started = Instant::now();
            let result = ChatTemplate::new((*source).into(), None, None);
            assert!(
                matches!(&result, Err(EngineError::TemplateLimit(_))),
                "{source}: {:?}",
                result.err()
            );
            assert!(started.elapsed() < Duration::from_secs(5), "{source}");
        }
    }

    #[test]
    fn a_template_within_limits_at_load_is_still_bounded_per_request() {
        // Quadratic in the conversation: fine for the samples, not for 200 messages.
        let source = "{% for a in messages %}{% for b in messages %}{% for c in messages %}{{ c.content }}{% endfor %}{% endfor %}{% endfor %}";
        let t = limited(
            source,
            TemplateLimits {
                fuel: 200_000,
                ..TemplateLimits::default()
            },
        )
        .unwrap();
        let many: Vec<ChatMessage> = (0..200).map(|i| msg("user", &i.to_string())).collect();
        assert!(matches!(
            t.render(&many, true),
            Err(EngineError::TemplateLimit(_))
        ));
        assert!(t.render(&many[..3], true).is_ok());
    }

    #[test]
    fn output_and_time_budgets_stop_the_render() {
        let t = limited(
            "{% for m in messages %}{{ m.content }}{% endfor %}",
            TemplateLimits {
                max_output_bytes: 100,
                ..TemplateLimits::default()
            },
        )
        .unwrap();
        let big = [msg("user", &"y".repeat(200))];
        let err = t.render(&big, true).unwrap_err();
        assert!(
            matches!(&err, EngineError::TemplateLimit(m) if m.contains("100 bytes")),
            "{err}"
        );
        let slow = limited(
            "{% for i in range(100000) %}{{ i }}{% endfor %}",
            TemplateLimits {
                fuel: u64::MAX / 1024,
                time_budget: Duration::ZERO,
                ..TemplateLimits::default()
            },
        );
        assert!(matches!(slow, Err(EngineError::TemplateLimit(_))));
    }

    #[test]
    fn raise_exception_is_a_refusal_not_a_limit() {
        let t = ChatTemplate::new(
            "{% if messages[0].role == 'system' %}{{ raise_exception('no system') }}{% endif %}ok"
                .into(),
            None,
            None,
        )
        .unwrap();
        assert!(matches!(
            t.render(&[msg("system", "s")], true),
            Err(EngineError::Validation { .. })
        ));
    }

    #[test]
    fn strftime_now_is_available() {
        let t = ChatTemplate::new("{{ strftime_now('%Y') }}".into(), None, None).unwrap();
        let year = t.render(&[], false).unwrap();
        assert_eq!(year.len(), 4);
    }
}
