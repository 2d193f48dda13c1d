//! Reading OpenAI request bodies: typed fields with errors that name the field, unknown
//! fields ignored (as OpenAI does), and what every endpoint shares: the model, sampling, stop
//! sequences and the job header they make.

use crate::error::ApiError;
use ringbolt_proto::v1 as pb;
use ringbolt_text::Message;
use serde_json::Value;
use serde_json::value::RawValue;
use std::collections::HashMap;

/// A JSON object body, its fields kept as raw JSON and read on demand: a multi-million-token
/// prompt is parsed once, straight into token ids, never into a tree of JSON values.
pub struct Body(HashMap<String, Box<RawValue>>);

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

impl Body {
    pub fn parse(bytes: &[u8]) -> Result<Body, ApiError> {
        let first = bytes.iter().find(|b| !b.is_ascii_whitespace());
        if first.is_some_and(|&b| b != b'{') {
            let what = match serde_json::from_slice::<Value>(bytes) {
                Ok(v) => type_name(&v),
                Err(_) => "something else",
            };
            return Err(ApiError::invalid(format!(
                "the request body must be a JSON object, got {what}"
            )));
        }
        serde_json::from_slice(bytes)
            .map(Body)
            .map_err(|e| ApiError::invalid(format!("the request body is not valid JSON: {e}")))
    }

    /// Field `k` as raw JSON, absent when missing or null.
    pub fn raw(&self, k: &str) -> Option<&RawValue> {
        self.0.get(k).map(|r| &**r).filter(|r| r.get() != "null")
    }

    /// Field `k`, absent when missing or null.
    pub fn get(&self, k: &str) -> Option<Value> {
        self.raw(k).and_then(|r| serde_json::from_str(r.get()).ok())
    }

    pub fn string(&self, k: &'static str) -> Result<Option<String>, ApiError> {
        match self.get(k) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(v) => Err(wrong(k, "a string", &v)),
        }
    }

    pub fn bool(&self, k: &'static str) -> Result<Option<bool>, ApiError> {
        match self.get(k) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(b)),
            Some(v) => Err(wrong(k, "a boolean", &v)),
        }
    }

    pub fn f32(&self, k: &'static str) -> Result<Option<f32>, ApiError> {
        match self.get(k) {
            None => Ok(None),
            Some(Value::Number(n)) => Ok(n.as_f64().map(|x| x as f32)),
            Some(v) => Err(wrong(k, "a number", &v)),
        }
    }

    /// A non-negative integer (a larger one than `u32` holds is the limit's to refuse).
    pub fn count(&self, k: &'static str) -> Result<Option<u64>, ApiError> {
        match self.get(k) {
            None => Ok(None),
            Some(Value::Number(n)) => n
                .as_u64()
                .or_else(|| {
                    n.as_f64()
                        .filter(|f| f.fract() == 0.0 && *f >= 0.0)
                        .map(|f| f as u64)
                })
                .map(Some)
                .ok_or_else(|| {
                    ApiError::field(k, format!("`{k}` must be a non-negative integer, got {n}"))
                }),
            Some(v) => Err(wrong(k, "an integer", &v)),
        }
    }

    /// An integer, possibly negative (seeds).
    pub fn int(&self, k: &'static str) -> Result<Option<i64>, ApiError> {
        match self.get(k) {
            None => Ok(None),
            Some(Value::Number(n)) => n
                .as_i64()
                .or_else(|| n.as_u64().map(|u| u as i64))
                .map(Some)
                .ok_or_else(|| ApiError::field(k, format!("`{k}` must be an integer, got {n}"))),
            Some(v) => Err(wrong(k, "an integer", &v)),
        }
    }
}

fn wrong(k: &'static str, want: &str, got: &Value) -> ApiError {
    ApiError::field(k, format!("`{k}` must be {want}, got {}", type_name(got)))
}

/// The request body as an endpoint receives it (or why it could not be read).
pub type BodyBytes = Result<bytes::Bytes, axum::extract::rejection::BytesRejection>;

/// What every generating endpoint reads first: the body (413 beyond the limit), the model it
/// names, and the generation fields (`max_fields` bound the new tokens, `default_max` when
/// none is given); tools are refused.
pub fn read(
    api: &crate::Api,
    body: BodyBytes,
    max_fields: &[&'static str],
    default_max: u32,
) -> Result<(Body, Generation), ApiError> {
    let b = Body::parse(&crate::body(body)?)?;
    api.check_model(b.string("model")?.as_deref())?;
    if b.get("tools")
        .is_some_and(|t| t.as_array().is_none_or(|a| !a.is_empty()))
    {
        return Err(ApiError::field("tools", "tool calling is not served"));
    }
    let end_of_turn = api.mgr.text().map(|t| t.end_of_turn()).unwrap_or(&[]);
    let g = Generation::read(&b, max_fields, default_max, end_of_turn)?;
    Ok((b, g))
}

/// What a generation asks for, from the fields every endpoint shares.
pub struct Generation {
    pub header: pb::JobHeader,
    /// The field that bounds the new tokens in this request's API (for errors).
    pub max_field: &'static str,
    /// Stop sequences matched in the text.
    pub stop: Vec<String>,
    pub stream: bool,
    pub include_usage: bool,
}

/// Most stop sequences a request may give.
const MAX_STOP_SEQUENCES: usize = 16;
/// Longest stop sequence.
const MAX_STOP_BYTES: usize = 256;

/// A seed when the request gives none: generation is random, as OpenAI's is.
fn random_seed() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    std::collections::hash_map::RandomState::new()
        .build_hasher()
        .finish()
}

impl Generation {
    /// Reads the sampling, stop and stream fields; `max_fields` names the fields that bound
    /// the new tokens, the first present wins; `default_max` when none is.
    pub fn read(
        b: &Body,
        max_fields: &[&'static str],
        default_max: u32,
        end_of_turn: &[u32],
    ) -> Result<Generation, ApiError> {
        let mut max_new = None;
        let mut max_field = max_fields.first().copied().unwrap_or("max_tokens");
        for &f in max_fields {
            if let Some(n) = b.count(f)? {
                max_new = Some(n);
                max_field = f;
                break;
            }
        }
        let max_new_tokens = match max_new {
            None => default_max,
            // Above any limit: the job's validation says what the limit is.
            Some(n) => u32::try_from(n).unwrap_or(u32::MAX),
        };
        let temperature = b.f32("temperature")?.unwrap_or(1.0);
        let top_p = b.f32("top_p")?.unwrap_or(1.0);
        let seed = match b.int("seed")? {
            Some(s) => s as u64,
            None => random_seed(),
        };
        if let Some(n) = b.count("n")?
            && n != 1
        {
            return Err(ApiError::field(
                "n",
                "only one choice per request is served (n = 1)",
            ));
        }
        if b.count("best_of")?.is_some_and(|n| n > 1) {
            return Err(ApiError::field("best_of", "best_of above 1 is not served"));
        }
        if b.bool("echo")? == Some(true) {
            return Err(ApiError::field("echo", "echo is not served"));
        }
        let wants_logprobs = match b.get("logprobs") {
            None | Some(Value::Bool(false)) => false,
            Some(Value::Number(n)) => n.as_u64() != Some(0),
            Some(_) => true,
        };
        if wants_logprobs || b.get("top_logprobs").is_some_and(|v| v.as_u64() != Some(0)) {
            return Err(ApiError::field(
                "logprobs",
                "log probabilities are not computed by this server; leave `logprobs` unset",
            ));
        }
        for k in ["presence_penalty", "frequency_penalty"] {
            if b.f32(k)?.is_some_and(|x| x != 0.0) {
                return Err(ApiError::invalid(format!(
                    "`{k}` is not served; leave it unset or 0"
                )));
            }
        }
        if b.get("logit_bias")
            .is_some_and(|v| v.as_object().is_none_or(|m| !m.is_empty()))
        {
            return Err(ApiError::field("logit_bias", "logit_bias is not served"));
        }
        let ignore_eos = b.bool("ignore_eos")?.unwrap_or(false);
        // Ringbolt's extension: `"context_cache": false` bypasses the context cache.
        let no_context_cache = b.bool("context_cache")? == Some(false);
        let (stop, mut stop_tokens) = read_stop(b)?;
        if !ignore_eos {
            for &t in end_of_turn {
                if !stop_tokens.contains(&t) {
                    stop_tokens.push(t);
                }
            }
        }
        let stream = b.bool("stream")?.unwrap_or(false);
        let include_usage = match b.get("stream_options") {
            None => false,
            Some(Value::Object(o)) => match o.get("include_usage") {
                None | Some(Value::Null) => false,
                Some(Value::Bool(x)) => *x,
                Some(v) => return Err(wrong("stream_options", "{\"include_usage\": boolean}", v)),
            },
            Some(v) => return Err(wrong("stream_options", "an object", &v)),
        };
        Ok(Generation {
            header: pb::JobHeader {
                max_new_tokens,
                sampling: Some(pb::SamplingParams {
                    temperature,
                    top_p,
                    seed,
                    stop_tokens,
                }),
                idempotency_key: String::new(),
                context_parallel: 0,
                expected_prompt_tokens: 0,
                ignore_eos,
                no_context_cache,
            },
            max_field,
            stop,
            stream,
            include_usage,
        })
    }
}

/// `stop` (a string, or a list of strings and token ids) and `stop_token_ids`.
fn read_stop(b: &Body) -> Result<(Vec<String>, Vec<u32>), ApiError> {
    let mut strings = Vec::new();
    let mut ids = Vec::new();
    let id = |v: &Value, k: &'static str| {
        v.as_u64()
            .and_then(|t| u32::try_from(t).ok())
            .ok_or_else(|| ApiError::field(k, format!("`{k}` holds {v}, not a token id")))
    };
    match b.get("stop") {
        None => {}
        Some(Value::String(s)) => strings.push(s),
        Some(Value::Array(list)) => {
            for v in &list {
                match v {
                    Value::String(s) => strings.push(s.clone()),
                    Value::Number(_) => ids.push(id(v, "stop")?),
                    v => return Err(wrong("stop", "a string, or strings and token ids", v)),
                }
            }
        }
        Some(v) => return Err(wrong("stop", "a string or an array", &v)),
    }
    match b.get("stop_token_ids") {
        None => {}
        Some(Value::Array(list)) => {
            for v in &list {
                ids.push(id(v, "stop_token_ids")?);
            }
        }
        Some(v) => return Err(wrong("stop_token_ids", "an array of token ids", &v)),
    }
    if strings.len() > MAX_STOP_SEQUENCES {
        return Err(ApiError::field(
            "stop",
            format!(
                "{} stop sequences were given; at most {MAX_STOP_SEQUENCES} are allowed",
                strings.len()
            ),
        ));
    }
    if strings
        .iter()
        .any(|s| s.is_empty() || s.len() > MAX_STOP_BYTES)
    {
        return Err(ApiError::field(
            "stop",
            format!("a stop sequence must be 1 to {MAX_STOP_BYTES} bytes"),
        ));
    }
    Ok((strings, ids))
}

/// A prompt: text, or token ids.
pub enum Prompt {
    Text(String),
    Ids(Vec<u32>),
}

/// `/v1/completions`' `prompt`: a string, token ids, or a list of one of either. Token ids
/// are read straight from the raw JSON.
pub fn prompt(raw: Option<&RawValue>) -> Result<Prompt, ApiError> {
    let raw = raw.ok_or_else(|| ApiError::field("prompt", "`prompt` is required"))?;
    if raw.get().starts_with('[')
        && let Ok(ids) = serde_json::from_str::<Vec<u32>>(raw.get())
    {
        return Ok(Prompt::Ids(ids));
    }
    let v: Value = serde_json::from_str(raw.get())
        .map_err(|e| ApiError::field("prompt", format!("`prompt` is not valid JSON: {e}")))?;
    let ids = |list: &[Value]| -> Result<Vec<u32>, ApiError> {
        list.iter()
            .map(|t| {
                t.as_u64()
                    .and_then(|t| u32::try_from(t).ok())
                    .ok_or_else(|| {
                        ApiError::field(
                            "prompt",
                            format!(
                                "`prompt` must be text or token ids; it holds {}",
                                type_name(t)
                            ),
                        )
                    })
            })
            .collect()
    };
    match v {
        Value::String(s) => Ok(Prompt::Text(s)),
        Value::Array(list) => match list.first() {
            Some(Value::String(_) | Value::Array(_)) if list.len() > 1 => Err(ApiError::field(
                "prompt",
                "one prompt per request is served; send the others as their own requests",
            )),
            Some(Value::String(s)) => Ok(Prompt::Text(s.clone())),
            Some(Value::Array(inner)) => Ok(Prompt::Ids(ids(inner)?)),
            _ => Ok(Prompt::Ids(ids(&list)?)),
        },
        v => Err(wrong("prompt", "a string or an array of token ids", &v)),
    }
}

/// An image part's file, from its `data:` URL (URLs are never fetched).
fn data_url(url: &str, at: usize, field: &'static str) -> Result<Vec<u8>, ApiError> {
    use base64::Engine;
    let bad = |why: &str| ApiError::field(field, format!("message {at} has an image {why}"));
    let Some(rest) = url.strip_prefix("data:") else {
        return Err(bad(
            "URL that is not a data: URL; images are not fetched from the network: send the \
             image itself as data:image/png;base64,… or data:image/jpeg;base64,…",
        ));
    };
    let (meta, data) = rest
        .split_once(',')
        .ok_or_else(|| bad("data: URL without a comma before its data"))?;
    if !meta.ends_with(";base64") {
        return Err(bad("data: URL that is not base64 (`;base64,` is required)"));
    }
    base64::engine::general_purpose::STANDARD
        .decode(data.trim())
        .map_err(|e| bad(&format!("data: URL whose base64 does not decode: {e}")))
}

/// A message's content: a string, or a list of text and image parts. An image part becomes
/// the image placeholder's text in the content, its file the next of `images`.
fn content(
    v: Option<&Value>,
    at: usize,
    field: &'static str,
    images: &mut Vec<Vec<u8>>,
) -> Result<String, ApiError> {
    match v {
        None => Ok(String::new()),
        Some(Value::String(s)) => Ok(s.clone()),
        Some(Value::Array(parts)) => {
            let mut out = String::new();
            for p in parts {
                let kind = p.get("type").and_then(Value::as_str).unwrap_or("");
                // Chat Completions: {"image_url": {"url": …}}; Responses: {"image_url": "…"}.
                let url = p
                    .get("image_url")
                    .and_then(|u| u.as_str().or_else(|| u.get("url")?.as_str()));
                match (kind, p.get("text").and_then(Value::as_str), url) {
                    ("text" | "input_text" | "output_text", Some(t), _) => out.push_str(t),
                    ("image_url" | "input_image", _, Some(url)) => {
                        images.push(data_url(url, at, field)?);
                        out.push_str(ringbolt_model::vision::IMAGE_PLACEHOLDER);
                    }
                    ("image_url" | "input_image", _, None) => {
                        return Err(ApiError::field(
                            field,
                            format!("message {at} has an image part without an `image_url`"),
                        ));
                    }
                    _ => {
                        return Err(ApiError::field(
                            field,
                            format!(
                                "message {at} has a content part of type `{kind}`; text and \
                                 image parts are served"
                            ),
                        ));
                    }
                }
            }
            Ok(out)
        }
        Some(v) => Err(ApiError::field(
            "messages",
            format!(
                "message {at}'s content must be a string or a list of parts, got {}",
                type_name(v)
            ),
        )),
    }
}

/// Chat messages with the files of their image parts, in order.
pub struct Chat {
    pub messages: Vec<Message>,
    pub images: Vec<Vec<u8>>,
}

/// Chat messages (`messages`, or the Responses API's `input` list), roles checked.
pub fn messages(v: &Value, field: &'static str) -> Result<Chat, ApiError> {
    let list = v
        .as_array()
        .ok_or_else(|| wrong(field, "an array of messages", v))?;
    if list.is_empty() {
        return Err(ApiError::field(field, format!("`{field}` is empty")));
    }
    let mut images = Vec::new();
    let messages = list
        .iter()
        .enumerate()
        .map(|(i, m)| {
            let o = m.as_object().ok_or_else(|| {
                ApiError::field(field, format!("message {i} must be an object, got {}", type_name(m)))
            })?;
            let role = match o.get("role").and_then(Value::as_str) {
                Some("developer") => "system",
                Some(r @ ("system" | "user" | "assistant")) => r,
                Some(r) => {
                    return Err(ApiError::field(
                        field,
                        format!("message {i} has role `{r}`; system, developer, user and assistant are served"),
                    ));
                }
                None => {
                    return Err(ApiError::field(field, format!("message {i} has no `role`")));
                }
            };
            Ok(Message {
                role: role.into(),
                content: content(o.get("content"), i, field, &mut images)?,
                name: o.get("name").and_then(Value::as_str).map(str::to_string),
            })
        })
        .collect::<Result<_, _>>()?;
    Ok(Chat { messages, images })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body(s: &str) -> Body {
        Body::parse(s.as_bytes()).unwrap()
    }

    #[test]
    fn fields_are_typed_and_named_in_errors() {
        let e = Body::parse(b"[1]").err().unwrap();
        assert!(e.message.contains("got an array"), "{}", e.message);
        assert!(e.message.contains("JSON object"), "{}", e.message);
        let e = Body::parse(b"{\"a\":").err().unwrap();
        assert!(e.message.contains("not valid JSON"), "{}", e.message);
        let b = body(r#"{"max_tokens": "ten", "temperature": 0.5, "zzz": 1}"#);
        let e = b.count("max_tokens").unwrap_err();
        assert_eq!(e.param, Some("max_tokens"));
        assert!(e.message.contains("must be an integer, got a string"));
        assert_eq!(b.f32("temperature").unwrap(), Some(0.5));
        assert!(body(r#"{"max_tokens": -1}"#).count("max_tokens").is_err());
        assert_eq!(
            body(r#"{"max_tokens": 8.0}"#).count("max_tokens").unwrap(),
            Some(8)
        );
    }

    #[test]
    fn generation_reads_stops_and_limits() {
        let g = Generation::read(
            &body(r#"{"max_completion_tokens": 5, "max_tokens": 7, "stop": ["\n", 9], "stop_token_ids": [3], "seed": 4, "temperature": 0}"#),
            &["max_completion_tokens", "max_tokens"],
            16,
            &[2],
        )
        .unwrap();
        assert_eq!(g.header.max_new_tokens, 5);
        let s = g.header.sampling.unwrap();
        assert_eq!((s.seed, s.temperature), (4, 0.0));
        assert_eq!(s.stop_tokens, vec![9, 3, 2]);
        assert_eq!(g.stop, vec!["\n".to_string()]);
        let g =
            Generation::read(&body(r#"{"ignore_eos": true}"#), &["max_tokens"], 16, &[2]).unwrap();
        assert_eq!(g.header.max_new_tokens, 16);
        assert!(g.header.sampling.unwrap().stop_tokens.is_empty());
        for bad in [
            r#"{"n": 2}"#,
            r#"{"logprobs": true}"#,
            r#"{"logprobs": 2}"#,
            r#"{"stop": [""]}"#,
            r#"{"stop": {"a": 1}}"#,
            r#"{"presence_penalty": 0.5}"#,
            r#"{"stream_options": 1}"#,
        ] {
            assert!(
                Generation::read(&body(bad), &["max_tokens"], 16, &[]).is_err(),
                "{bad}"
            );
        }
    }

    #[test]
    fn prompts_and_messages() {
        let p = |s: &str| prompt(body(&format!("{{\"prompt\": {s}}}")).raw("prompt"));
        assert!(matches!(p("\"hi\"").unwrap(), Prompt::Text(t) if t == "hi"));
        assert!(matches!(p("[1, 2]").unwrap(), Prompt::Ids(i) if i == [1, 2]));
        assert!(matches!(p("[[1, 2]]").unwrap(), Prompt::Ids(i) if i == [1, 2]));
        assert!(matches!(p("[\"hi\"]").unwrap(), Prompt::Text(t) if t == "hi"));
        assert!(p("[\"a\", \"b\"]").is_err());
        assert!(p("[1, -2]").is_err());
        assert!(p("null").is_err());
        let m = messages(
            &serde_json::json!([
                {"role": "developer", "content": "be brief"},
                {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}
            ]),
            "messages",
        )
        .unwrap();
        assert_eq!(m.messages[0], Message::new("system", "be brief"));
        assert_eq!(m.messages[1].content, "ab");
        assert!(m.images.is_empty());
        // Image parts: their files in order, their placeholders where they were.
        let m = messages(
            &serde_json::json!([{"role": "user", "content": [
                {"type": "text", "text": "a"},
                {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAEC"}},
                {"type": "input_image", "image_url": "data:image/jpeg;base64,/w=="},
                {"type": "text", "text": "b"}
            ]}]),
            "messages",
        )
        .unwrap();
        assert_eq!(m.messages[0].content, "a<image><image>b");
        assert_eq!(m.images, vec![vec![0, 1, 2], vec![255]]);
        for (url, why) in [
            ("https://example.com/a.png", "not fetched"),
            ("data:image/png,abc", "base64"),
            ("data:image/png;base64,***", "does not decode"),
        ] {
            let e = messages(
                &serde_json::json!([{"role": "user", "content": [
                    {"type": "image_url", "image_url": {"url": url}}
                ]}]),
                "messages",
            )
            .err()
            .unwrap();
            assert!(e.message.contains(why), "{url}: {}", e.message);
        }
        for bad in [
            serde_json::json!([]),
            serde_json::json!({}),
            serde_json::json!([{"content": "x"}]),
            serde_json::json!([{"role": "tool", "content": "x"}]),
            serde_json::json!([{"role": "user", "content": [{"type": "image_url"}]}]),
        ] {
            assert!(messages(&bad, "messages").is_err(), "{bad}");
        }
    }
}
