//! `POST /v1/completions` and `POST /v1/chat/completions`: one job per request, answered
//! whole or streamed as server-sent events ending with `data: [DONE]`. A client that goes
//! away cancels its job.

use crate::error::ApiError;
use crate::generate::{self, Finish, Piece};
use crate::request::{self, BodyBytes, Generation, Prompt};
use crate::{Shared, now_secs};
use axum::Extension;
use axum::extract::State;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use ringbolt_jobs::auth::Caller;
use serde_json::{Value, json};
use std::convert::Infallible;
use std::time::Duration;
use tokio::sync::mpsc;

/// Completions are legacy text; chat is messages through the model's chat template.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Text,
    Chat,
}

/// Most new tokens `/v1/completions` gives when the request does not say (OpenAI's 16).
const COMPLETION_DEFAULT_MAX_TOKENS: u32 = 16;

fn usage(prompt: u64, completion: u32, cached: u64) -> Value {
    json!({
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion as u64,
        "prompt_tokens_details": {"cached_tokens": cached},
    })
}

/// How one request's answers are written.
struct Reply {
    kind: Kind,
    id: String,
    created: u64,
    model: String,
}

impl Reply {
    fn object(&self, chunk: bool) -> &'static str {
        match (self.kind, chunk) {
            (Kind::Text, _) => "text_completion",
            (Kind::Chat, false) => "chat.completion",
            (Kind::Chat, true) => "chat.completion.chunk",
        }
    }

    fn envelope(&self, chunk: bool, choices: Value) -> Value {
        json!({
            "id": self.id,
            "object": self.object(chunk),
            "created": self.created,
            "model": self.model,
            "choices": choices,
        })
    }

    /// The whole answer.
    fn whole(&self, text: String, finish: Finish, usage_of: Value) -> Value {
        let choice = match self.kind {
            Kind::Text => json!({
                "index": 0, "text": text, "logprobs": null, "finish_reason": finish.as_str(),
            }),
            Kind::Chat => json!({
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "logprobs": null,
                "finish_reason": finish.as_str(),
            }),
        };
        let mut v = self.envelope(false, json!([choice]));
        v["usage"] = usage_of;
        v
    }

    /// A streamed chunk: text, and the finish reason in the last.
    fn chunk(&self, text: Option<&str>, finish: Option<Finish>, first: bool) -> Value {
        let reason = finish.map(Finish::as_str);
        let choice = match self.kind {
            Kind::Text => json!({
                "index": 0, "text": text.unwrap_or(""), "logprobs": null, "finish_reason": reason,
            }),
            Kind::Chat => {
                let mut delta = json!({});
                if first {
                    delta["role"] = "assistant".into();
                }
                if let Some(t) = text {
                    delta["content"] = t.into();
                }
                json!({"index": 0, "delta": delta, "logprobs": null, "finish_reason": reason})
            }
        };
        self.envelope(true, json!([choice]))
    }
}

fn data(v: &Value) -> Event {
    Event::default().data(v.to_string())
}

/// Writes a followed job as server-sent events.
async fn write_stream(
    reply: Reply,
    mut pieces: mpsc::Receiver<Piece>,
    include_usage: bool,
    tx: mpsc::Sender<Result<Event, Infallible>>,
) {
    let with_usage = |mut v: Value| {
        if include_usage {
            v["usage"] = Value::Null;
        }
        v
    };
    let mut first = true;
    if reply.kind == Kind::Chat {
        let v = with_usage(reply.chunk(Some(""), None, true));
        first = false;
        if tx.send(Ok(data(&v))).await.is_err() {
            return;
        }
    }
    loop {
        // A client that has gone is noticed here (its stream dropped), not only at the next
        // event: its job is cancelled at once, even in a long prefill.
        let p = tokio::select! {
            p = pieces.recv() => match p {
                Some(p) => p,
                None => return,
            },
            _ = tx.closed() => return,
        };
        let events = match p {
            Piece::Running => continue,
            Piece::Text(t) => {
                let v = with_usage(reply.chunk(Some(&t), None, first));
                first = false;
                vec![data(&v)]
            }
            Piece::Done {
                finish,
                prompt_tokens,
                completion_tokens,
                cached_tokens,
            } => {
                let mut out = vec![data(&with_usage(reply.chunk(None, Some(finish), first)))];
                if include_usage {
                    let mut v = reply.envelope(true, json!([]));
                    v["usage"] = usage(prompt_tokens, completion_tokens, cached_tokens);
                    out.push(data(&v));
                }
                out.push(Event::default().data("[DONE]"));
                out
            }
            // OpenAI's clients raise an error event's message.
            Piece::Failed(e) => vec![data(&e.body()), Event::default().data("[DONE]")],
        };
        for e in events {
            if tx.send(Ok(e)).await.is_err() {
                return;
            }
        }
    }
}

/// Submits the job, then answers whole or as a stream.
async fn generate(
    api: Shared,
    caller: Option<Caller>,
    kind: Kind,
    g: Generation,
    prompt: Prompt,
    images: Vec<Vec<u8>>,
) -> Result<Response, ApiError> {
    let sub = generate::submit(&api.mgr, g.header, g.max_field, caller, prompt, images).await?;
    let mut pieces = generate::follow(&api.mgr, &sub.id, g.stop, true)?;
    let reply = Reply {
        kind,
        id: match kind {
            Kind::Text => format!("cmpl-{}", sub.id),
            Kind::Chat => format!("chatcmpl-{}", sub.id),
        },
        created: now_secs(),
        model: api.model.clone(),
    };
    if g.stream {
        let (tx, rx) = mpsc::channel(64);
        tokio::spawn(write_stream(reply, pieces, g.include_usage, tx));
        let sse = Sse::new(tokio_stream::wrappers::ReceiverStream::new(rx))
            .keep_alive(KeepAlive::new().interval(Duration::from_secs(15)));
        return Ok(sse.into_response());
    }
    let mut text = String::new();
    while let Some(p) = pieces.recv().await {
        match p {
            Piece::Running => {}
            Piece::Text(t) => text.push_str(&t),
            Piece::Done {
                finish,
                prompt_tokens,
                completion_tokens,
                cached_tokens,
            } => {
                let u = usage(prompt_tokens, completion_tokens, cached_tokens);
                let v = reply.whole(text, finish, u);
                return Ok(axum::Json(v).into_response());
            }
            Piece::Failed(e) => return Err(e),
        }
    }
    Err(ApiError::from(ringbolt_jobs::JobError::Unavailable(
        "the job's events ended early".into(),
    )))
}

pub async fn completions(
    State(api): State<Shared>,
    caller: Option<Extension<Caller>>,
    body: BodyBytes,
) -> Result<Response, ApiError> {
    let (b, g) = request::read(&api, body, &["max_tokens"], COMPLETION_DEFAULT_MAX_TOKENS)?;
    if b.string("suffix")?.is_some_and(|s| !s.is_empty()) {
        return Err(ApiError::field("suffix", "suffix is not served"));
    }
    let prompt = request::prompt(b.raw("prompt"))?;
    generate(api, caller.map(|c| c.0), Kind::Text, g, prompt, Vec::new()).await
}

pub async fn chat(
    State(api): State<Shared>,
    caller: Option<Extension<Caller>>,
    body: BodyBytes,
) -> Result<Response, ApiError> {
    let max = default_max(&api);
    let (b, g) = request::read(&api, body, &["max_completion_tokens", "max_tokens"], max)?;
    let msgs = b
        .get("messages")
        .ok_or_else(|| ApiError::field("messages", "`messages` is required"))?;
    let chat = request::messages(&msgs, "messages")?;
    let prompt = chat_prompt(&api, &chat.messages)?;
    generate(api, caller.map(|c| c.0), Kind::Chat, g, prompt, chat.images).await
}

/// The prompt the model's chat template makes of `msgs`, ending where the answer begins.
pub fn chat_prompt(api: &Shared, msgs: &[ringbolt_text::Message]) -> Result<Prompt, ApiError> {
    let text = api.mgr.text().ok_or_else(|| {
        ApiError::invalid(
            "chat needs the model's tokenizer and chat template, and this checkpoint has no \
             tokenizer.json; use /v1/completions with token ids",
        )
    })?;
    Ok(Prompt::Text(text.template()?.render(msgs, true)?))
}

/// New tokens when a chat request does not bound them: the server's limit.
pub fn default_max(api: &Shared) -> u32 {
    api.mgr.limits().max_new_tokens
}
