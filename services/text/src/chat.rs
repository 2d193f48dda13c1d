//! A Hugging Face chat template (`tokenizer_config.json`'s `chat_template`, Jinja) rendered the
//! way transformers renders it: blocks trimmed, Python string and dict methods, loop controls,
//! `raise_exception`, and transformers' `{% generation %}` marker (which only marks text for
//! training masks) taken as plain text.

use crate::TextError;
use minijinja::{Environment, Error, ErrorKind, Value};
use serde::Serialize;

/// One chat message, its content as text.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Message {
    pub role: String,
    pub content: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

impl Message {
    pub fn new(role: &str, content: &str) -> Self {
        Message {
            role: role.into(),
            content: content.into(),
            name: None,
        }
    }
}

/// How a template reads a message's content.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ContentForm {
    /// A string (most templates).
    Text,
    /// A list of typed parts, `[{"type": "text", "text": …}]` (MiniMax-01's own templates).
    Parts,
}

pub struct ChatTemplate {
    env: Environment<'static>,
    form: ContentForm,
    bos: Option<String>,
    eos: Option<String>,
}

/// The template without transformers' generation markers.
fn strip_generation_tags(src: &str) -> String {
    let mut out = String::with_capacity(src.len());
    let mut rest = src;
    while let Some(start) = rest.find("{%") {
        let Some(len) = rest[start..].find("%}") else {
            break;
        };
        let tag = &rest[start + 2..start + len];
        let word = tag.trim_matches(|c: char| c == '-' || c == '+' || c.is_whitespace());
        out.push_str(&rest[..start]);
        if word != "generation" && word != "endgeneration" {
            out.push_str(&rest[start..start + len + 2]);
        }
        rest = &rest[start + len + 2..];
    }
    out.push_str(rest);
    out
}

/// Whether the template iterates over or indexes a message's content (the parts form).
fn content_form(src: &str) -> ContentForm {
    let s: String = src.chars().filter(|c| !c.is_whitespace()).collect();
    let s = s.replace('"', "'");
    let parts = [
        "message['content'][",
        "message.content[",
        "inmessage['content']",
        "inmessage.content",
    ]
    .iter()
    .any(|p| s.contains(p));
    if parts {
        ContentForm::Parts
    } else {
        ContentForm::Text
    }
}

fn raise_exception(msg: String) -> Result<Value, Error> {
    Err(Error::new(ErrorKind::InvalidOperation, msg))
}

impl ChatTemplate {
    /// `source` is the Jinja template; `bos` and `eos` the tokens it may name.
    pub fn new(
        source: &str,
        bos: Option<String>,
        eos: Option<String>,
    ) -> Result<ChatTemplate, TextError> {
        let mut env = Environment::new();
        // transformers renders with trim_blocks and lstrip_blocks.
        let syntax = minijinja::syntax::SyntaxConfig::builder()
            .trim_blocks(true)
            .lstrip_blocks(true)
            .build()
            .map_err(|e| TextError::Template(e.to_string()))?;
        env.set_syntax(syntax);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", raise_exception);
        let form = content_form(source);
        env.add_template_owned("chat", strip_generation_tags(source))
            .map_err(|e| TextError::Template(format!("the chat template does not parse: {e}")))?;
        Ok(ChatTemplate {
            env,
            form,
            bos,
            eos,
        })
    }

    /// The prompt for `messages`; with `add_generation_prompt`, it ends where the assistant's
    /// answer begins.
    pub fn render(
        &self,
        messages: &[Message],
        add_generation_prompt: bool,
    ) -> Result<String, TextError> {
        let msgs: Vec<serde_json::Value> = messages
            .iter()
            .map(|m| {
                let content = match self.form {
                    ContentForm::Text => serde_json::Value::String(m.content.clone()),
                    ContentForm::Parts => {
                        serde_json::json!([{"type": "text", "text": m.content}])
                    }
                };
                let mut v = serde_json::json!({"role": m.role, "content": content});
                if let Some(n) = &m.name {
                    v["name"] = n.clone().into();
                }
                v
            })
            .collect();
        let tmpl = self
            .env
            .get_template("chat")
            .map_err(|e| TextError::Template(e.to_string()))?;
        tmpl.render(minijinja::context! {
            messages => Value::from(minijinja::value::Serde(&msgs)),
            add_generation_prompt => add_generation_prompt,
            bos_token => self.bos.clone().unwrap_or_default(),
            eos_token => self.eos.clone().unwrap_or_default(),
        })
        .map_err(|e| {
            // `raise_exception`'s message is the template's own words.
            let detail = e
                .detail()
                .map(str::to_string)
                .unwrap_or_else(|| e.to_string());
            TextError::Template(format!("the chat template refused the messages: {detail}"))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn minimax_text01_renders_as_ms_swift_expects() {
        // ms-swift's MiniMax-Text-01 template test expects exactly this prompt.
        let t = ChatTemplate::new(crate::init::MINIMAX_TEXT01_TEMPLATE, None, None).unwrap();
        let out = t
            .render(
                &[
                    Message::new(
                        "system",
                        "You are a helpful assistant created by MiniMax based on MiniMax-Text-01 model.",
                    ),
                    Message::new("user", "Hello!"),
                ],
                true,
            )
            .unwrap();
        assert_eq!(
            out,
            "<beginning_of_sentence>system ai_setting=assistant\nYou are a helpful assistant \
             created by MiniMax based on MiniMax-Text-01 model.<end_of_sentence>\n\
             <beginning_of_sentence>user name=user\nHello!<end_of_sentence>\n\
             <beginning_of_sentence>ai name=assistant\n"
        );
    }

    #[test]
    fn string_templates_get_strings_and_python_methods_work() {
        let src = "{% for m in messages %}{{ m['role'].upper() }}: {{ m['content'].strip() }}\n\
                   {% endfor %}{% if add_generation_prompt %}{{ eos_token }}{% endif %}";
        let t = ChatTemplate::new(src, None, Some("</s>".into())).unwrap();
        assert_eq!(t.form, ContentForm::Text);
        let out = t.render(&[Message::new("user", "  hi ")], true).unwrap();
        assert_eq!(out, "USER: hi\n</s>");
    }

    #[test]
    fn generation_markers_and_exceptions() {
        let src = "{% for m in messages %}{% if m.role == 'tool' %}\
                   {{ raise_exception('tools are not supported') }}{% endif %}\
                   {%- generation -%}{{ m.content }}{%- endgeneration -%}{% endfor %}";
        let t = ChatTemplate::new(src, None, None).unwrap();
        assert_eq!(t.render(&[Message::new("user", "a")], false).unwrap(), "a");
        let e = t
            .render(&[Message::new("tool", "x")], false)
            .unwrap_err()
            .to_string();
        assert!(e.contains("tools are not supported"), "{e}");
        assert!(ChatTemplate::new("{% for %}", None, None).is_err());
    }
}
