//! OpenAI's Responses API over durable jobs, for long ones: `background: true` answers at
//! once; `GET /v1/responses/{id}` polls (any job, whichever API submitted it); its stream can
//! be resumed after any event (`starting_after`), because a job's events are numbered the
//! same on every replay; `POST /v1/responses/{id}/cancel` cancels.
//!
//! A response's events, numbered from 0: `response.created`, `response.in_progress`; before
//! the first text, `response.output_item.added` and `response.content_part.added`; one
//! `response.output_text.delta` per text piece; at the end `response.output_text.done`,
//! `response.content_part.done`, `response.output_item.done` and `response.completed` (or
//! `response.cancelled`), or `response.failed`.

use crate::Shared;
use crate::completions::{chat_prompt, default_max};
use crate::error::ApiError;
use crate::generate::{self, Finish, Piece};
use crate::request::{self, Body, BodyBytes};
use axum::Extension;
use axum::extract::{Path, Query, State};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use ringbolt_jobs::auth::Caller;
use ringbolt_jobs::{FinishReason, JobRecord, JobState};
use ringbolt_text::Message;
use serde_json::{Value, json};
use std::convert::Infallible;
use std::time::Duration;
use tokio::sync::mpsc;

/// What a response object says of its job.
struct Object {
    id: String,
    created_at: u64,
    status: &'static str,
    text: Option<String>,
    input_tokens: u64,
    cached_tokens: u64,
    output_tokens: u64,
    max_output_tokens: u32,
    temperature: f32,
    top_p: f32,
    incomplete: bool,
    error: Option<String>,
}

fn item_id(id: &str) -> String {
    format!("msg_{id}")
}

fn message_item(id: &str, text: &str, done: bool) -> Value {
    json!({
        "id": item_id(id),
        "type": "message",
        "status": if done { "completed" } else { "in_progress" },
        "role": "assistant",
        "content": if done || !text.is_empty() { json!([text_part(text)]) } else { json!([]) },
    })
}

fn text_part(text: &str) -> Value {
    json!({"type": "output_text", "text": text, "annotations": [], "logprobs": []})
}

impl Object {
    fn of(rec: &JobRecord, text: Option<String>) -> Object {
        Object {
            id: rec.id.clone(),
            created_at: rec.created_unix_ms / 1000,
            status: status(rec.state),
            text,
            input_tokens: rec.prompt_tokens,
            cached_tokens: rec.cached_tokens,
            output_tokens: rec.tokens.len() as u64,
            max_output_tokens: rec.max_new_tokens,
            temperature: rec.sampling.temperature,
            top_p: rec.sampling.top_p,
            incomplete: rec.finish_reason == Some(FinishReason::Length),
            error: rec.error.as_ref().map(|e| e.1.clone()),
        }
    }

    fn json(&self, model: &str) -> Value {
        let output = match &self.text {
            Some(t) => json!([message_item(&self.id, t, self.status != "in_progress")]),
            None => json!([]),
        };
        json!({
            "id": self.id,
            "object": "response",
            "created_at": self.created_at,
            "status": self.status,
            "model": model,
            "output": output,
            "output_text": self.text.clone().unwrap_or_default(),
            "error": self.error.as_ref().map(|m| json!({"code": "server_error", "message": m})),
            "incomplete_details": if self.incomplete { json!({"reason": "max_output_tokens"}) } else { Value::Null },
            "instructions": null,
            "max_output_tokens": self.max_output_tokens,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "parallel_tool_calls": false,
            "tool_choice": "auto",
            "tools": [],
            "text": {"format": {"type": "text"}},
            "metadata": {},
            "usage": {
                "input_tokens": self.input_tokens,
                "input_tokens_details": {"cached_tokens": self.cached_tokens},
                "output_tokens": self.output_tokens,
                "output_tokens_details": {"reasoning_tokens": 0},
                "total_tokens": self.input_tokens + self.output_tokens,
            },
        })
    }
}

fn status(s: JobState) -> &'static str {
    match s {
        JobState::Queued => "queued",
        JobState::Running => "in_progress",
        JobState::Succeeded => "completed",
        JobState::Failed => "failed",
        JobState::Cancelled => "cancelled",
    }
}

fn record(api: &Shared, id: &str) -> Result<JobRecord, ApiError> {
    ringbolt_jobs::bounds::check_job_id(id).map_err(|_| {
        ApiError::not_found(format!(
            "no response with id `{}`",
            ringbolt_jobs::bounds::echo(id)
        ))
    })?;
    Ok(api.mgr.get(id)?)
}

fn object(api: &Shared, rec: &JobRecord) -> Value {
    let text = api.mgr.text().map(|t| t.decode(&rec.tokens));
    let text = match rec.state {
        JobState::Queued => None,
        _ => text.or(Some(String::new())),
    };
    Object::of(rec, text).json(&api.model)
}

/// Writes a response's numbered events, skipping those up to `starting_after`.
struct Writer {
    api: Shared,
    id: String,
    seq: u64,
    starting_after: Option<u64>,
    text: String,
    opened: bool,
    tx: mpsc::Sender<Result<Event, Infallible>>,
}

impl Writer {
    /// Sends the next event; false when the client has gone.
    async fn emit(&mut self, kind: &str, mut v: Value) -> bool {
        let seq = self.seq;
        self.seq += 1;
        if self.starting_after.is_some_and(|n| seq <= n) {
            return true;
        }
        v["type"] = kind.into();
        v["sequence_number"] = seq.into();
        self.tx
            .send(Ok(Event::default().event(kind).data(v.to_string())))
            .await
            .is_ok()
    }

    /// The response object as it stands, for the lifecycle events.
    fn current(&self, status: &'static str) -> Value {
        let mut v = match self.api.mgr.get(&self.id) {
            Ok(rec) => object(&self.api, &rec),
            Err(_) => json!({"id": self.id, "object": "response"}),
        };
        v["status"] = status.into();
        if status == "queued" || status == "in_progress" {
            // What the events before the end say is the same on every replay: nothing of
            // the job's progress.
            v["output"] = json!([]);
            v["output_text"] = "".into();
            v["usage"] = Value::Null;
            v["incomplete_details"] = Value::Null;
            v["error"] = Value::Null;
        }
        v
    }

    async fn open(&mut self) -> bool {
        if self.opened {
            return true;
        }
        self.opened = true;
        let item = message_item(&self.id, "", false);
        let item_id = item_id(&self.id);
        self.emit(
            "response.output_item.added",
            json!({"output_index": 0, "item": item}),
        )
        .await
            && self
                .emit(
                    "response.content_part.added",
                    json!({"item_id": item_id, "output_index": 0, "content_index": 0, "part": text_part("")}),
                )
                .await
    }

    async fn run(mut self, mut pieces: mpsc::Receiver<Piece>) {
        let created = self.current("queued");
        if !self
            .emit("response.created", json!({"response": created}))
            .await
        {
            return;
        }
        let progress = self.current("in_progress");
        if !self
            .emit("response.in_progress", json!({"response": progress}))
            .await
        {
            return;
        }
        let item_id = item_id(&self.id);
        loop {
            let p = tokio::select! {
                p = pieces.recv() => match p {
                    Some(p) => p,
                    None => return,
                },
                _ = self.tx.closed() => return,
            };
            match p {
                Piece::Running => {}
                Piece::Text(t) => {
                    if !self.open().await {
                        return;
                    }
                    self.text.push_str(&t);
                    let v = json!({"item_id": item_id, "output_index": 0, "content_index": 0, "delta": t, "logprobs": []});
                    if !self.emit("response.output_text.delta", v).await {
                        return;
                    }
                }
                Piece::Done { finish, .. } => {
                    if !self.open().await {
                        return;
                    }
                    let t = self.text.clone();
                    let steps = [
                        (
                            "response.output_text.done",
                            json!({"item_id": item_id, "output_index": 0, "content_index": 0, "text": t, "logprobs": []}),
                        ),
                        (
                            "response.content_part.done",
                            json!({"item_id": item_id, "output_index": 0, "content_index": 0, "part": text_part(&t)}),
                        ),
                        (
                            "response.output_item.done",
                            json!({"output_index": 0, "item": message_item(&self.id, &t, true)}),
                        ),
                    ];
                    for (kind, v) in steps {
                        if !self.emit(kind, v).await {
                            return;
                        }
                    }
                    let (kind, status) = match finish {
                        Finish::Cancelled => ("response.cancelled", "cancelled"),
                        _ => ("response.completed", "completed"),
                    };
                    let mut v = self.current(status);
                    // The streamed text is the response's (a character cut at the end is
                    // left out of streams).
                    v["output"] = json!([message_item(&self.id, &t, true)]);
                    v["output_text"] = t.into();
                    self.emit(kind, json!({"response": v})).await;
                    return;
                }
                Piece::Failed(e) => {
                    let mut v = self.current("failed");
                    v["error"] = json!({"code": "server_error", "message": e.message});
                    self.emit("response.failed", json!({"response": v})).await;
                    return;
                }
            }
        }
    }
}

fn stream(
    api: Shared,
    id: &str,
    starting_after: Option<u64>,
    cancel_on_drop: bool,
) -> Result<Response, ApiError> {
    let pieces = generate::follow(&api.mgr, id, Vec::new(), cancel_on_drop)?;
    let (tx, rx) = mpsc::channel(64);
    let w = Writer {
        api,
        id: id.to_string(),
        seq: 0,
        starting_after,
        text: String::new(),
        opened: false,
        tx,
    };
    tokio::spawn(w.run(pieces));
    Ok(Sse::new(tokio_stream::wrappers::ReceiverStream::new(rx))
        .keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
        .into_response())
}

/// `input` (text, or messages) after `instructions`, as chat messages (and their images).
fn input_messages(b: &Body) -> Result<request::Chat, ApiError> {
    let mut msgs = Vec::new();
    if let Some(i) = b.string("instructions")? {
        msgs.push(Message::new("system", &i));
    }
    let mut images = Vec::new();
    match b.get("input") {
        None => return Err(ApiError::field("input", "`input` is required")),
        Some(Value::String(s)) => msgs.push(Message::new("user", &s)),
        Some(v) => {
            let chat = request::messages(&v, "input")?;
            msgs.extend(chat.messages);
            images = chat.images;
        }
    }
    Ok(request::Chat {
        messages: msgs,
        images,
    })
}

pub async fn create(
    State(api): State<Shared>,
    caller: Option<Extension<Caller>>,
    body: BodyBytes,
) -> Result<Response, ApiError> {
    let (b, g) = request::read(&api, body, &["max_output_tokens"], default_max(&api))?;
    // The Responses API has no stop sequences (a resumed stream could not apply them).
    if b.get("stop").is_some() || b.get("stop_token_ids").is_some() {
        return Err(ApiError::field("stop", "the Responses API takes no `stop`"));
    }
    if b.get("previous_response_id").is_some() {
        return Err(ApiError::field(
            "previous_response_id",
            "previous_response_id is not served; send the whole conversation as `input`",
        ));
    }
    let background = b.bool("background")?.unwrap_or(false);
    let chat = input_messages(&b)?;
    let prompt = chat_prompt(&api, &chat.messages)?;
    let caller = caller.map(|c| c.0);
    let sub =
        generate::submit(&api.mgr, g.header, g.max_field, caller, prompt, chat.images).await?;
    if g.stream {
        return stream(api, &sub.id, None, !background);
    }
    if background {
        let rec = api.mgr.get(&sub.id)?;
        let mut v = object(&api, &rec);
        v["background"] = true.into();
        return Ok(axum::Json(v).into_response());
    }
    // Wait for the end; a client that leaves cancels.
    let mut pieces = generate::follow(&api.mgr, &sub.id, Vec::new(), true)?;
    while let Some(p) = pieces.recv().await {
        match p {
            Piece::Done { .. } => break,
            Piece::Failed(e) => return Err(e),
            _ => {}
        }
    }
    Ok(axum::Json(object(&api, &api.mgr.get(&sub.id)?)).into_response())
}

#[derive(serde::Deserialize)]
pub struct RetrieveQuery {
    stream: Option<bool>,
    starting_after: Option<u64>,
}

pub async fn retrieve(
    State(api): State<Shared>,
    Path(id): Path<String>,
    q: Result<Query<RetrieveQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(q) = q.map_err(|e| ApiError::invalid(format!("bad query: {}", e.body_text())))?;
    let rec = record(&api, &id)?;
    if q.stream == Some(true) {
        return stream(api, &rec.id, q.starting_after, false);
    }
    Ok(axum::Json(object(&api, &rec)).into_response())
}

pub async fn cancel(
    State(api): State<Shared>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    record(&api, &id)?;
    api.mgr.cancel(&id)?;
    // The engine stops a cancelled job between steps: wait for it (briefly) to say so.
    if let Ok(mut events) = api.mgr.follow(&id) {
        let _ = tokio::time::timeout(Duration::from_secs(10), async {
            while events.recv().await.is_some() {}
        })
        .await;
    }
    let rec = api.mgr.get(&id)?;
    Ok(axum::Json(object(&api, &rec)).into_response())
}
