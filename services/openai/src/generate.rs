//! One generation, whatever endpoint asked: the job is submitted through the job API's one
//! submission path, then followed as text pieces, with the request's stop sequences matched
//! in the text (the job ends as a stop at the token that completes one).

use crate::error::ApiError;
use crate::request::Prompt;
use ringbolt_jobs::auth::Caller;
use ringbolt_jobs::submit::Submission;
use ringbolt_jobs::{JobError, JobManager};
use ringbolt_proto::v1 as pb;
use tokio::sync::mpsc;

/// A submitted job.
pub struct Submitted {
    pub id: String,
    pub prompt_tokens: u64,
}

/// Submits a job asking `header` for `prompt` (with `images`, in placeholder order);
/// `max_field` is what the request calls the header's `max_new_tokens` (errors say it in the
/// request's words).
pub async fn submit(
    mgr: &JobManager,
    header: pb::JobHeader,
    max_field: &'static str,
    caller: Option<Caller>,
    prompt: Prompt,
    images: Vec<Vec<u8>>,
) -> Result<Submitted, ApiError> {
    let named = |e: JobError| match e {
        JobError::InvalidArgument(m) if m.contains("max_new_tokens") => {
            ApiError::field(max_field, m.replace("max_new_tokens", max_field))
        }
        e => ApiError::from(e),
    };
    let mut sub = Submission::begin(mgr, header, caller).map_err(named)?;
    match &prompt {
        Prompt::Text(t) => sub.push_text(t)?,
        Prompt::Ids(ids) => sub.push_ids(ids)?,
    }
    for image in images {
        sub.push_image(&image, true).await?;
    }
    let r = sub.finish().await.map_err(named)?;
    Ok(Submitted {
        id: r.job_id,
        prompt_tokens: r.prompt_tokens,
    })
}

/// Why a generation ended, in OpenAI's words.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Finish {
    Stop,
    Length,
    Cancelled,
}

impl Finish {
    pub fn as_str(self) -> &'static str {
        match self {
            Finish::Stop => "stop",
            Finish::Length => "length",
            Finish::Cancelled => "cancelled",
        }
    }
}

/// What a followed job gives, in order.
#[derive(Debug)]
pub enum Piece {
    /// The job left the queue (given once, before any text).
    Running,
    /// Generated text (never a part of a stop sequence, never a split character).
    Text(String),
    Done {
        finish: Finish,
        prompt_tokens: u64,
        completion_tokens: u32,
        /// Prompt tokens the context cache had.
        cached_tokens: u64,
    },
    Failed(ApiError),
}

/// Matches stop sequences in a stream of text, holding back what could begin one.
pub struct StopMatcher {
    stops: Vec<String>,
    /// Text not given out yet.
    held: String,
    longest: usize,
}

impl StopMatcher {
    pub fn new(stops: Vec<String>) -> Self {
        let longest = stops.iter().map(String::len).max().unwrap_or(0);
        StopMatcher {
            stops,
            held: String::new(),
            longest,
        }
    }

    /// Takes `piece`; gives the text that is safe to send, and whether a stop sequence
    /// matched (the text before it is all that is given, and the stream is over).
    pub fn push(&mut self, piece: &str) -> (String, bool) {
        self.held.push_str(piece);
        if self.longest == 0 {
            return (std::mem::take(&mut self.held), false);
        }
        let first = self
            .stops
            .iter()
            .filter_map(|s| self.held.find(s.as_str()))
            .min();
        if let Some(at) = first {
            self.held.truncate(at);
            return (std::mem::take(&mut self.held), true);
        }
        // Keep the last `longest - 1` bytes (at a character boundary): a stop may begin there.
        let mut keep = self.held.len().saturating_sub(self.longest - 1);
        while !self.held.is_char_boundary(keep) {
            keep -= 1;
        }
        let rest = self.held.split_off(keep);
        (std::mem::replace(&mut self.held, rest), false)
    }

    /// The text held back when the stream ends without a stop.
    pub fn finish(&mut self) -> String {
        std::mem::take(&mut self.held)
    }
}

/// Follows job `id` as [`Piece`]s. `stops` are matched in its text. With `cancel_on_drop`,
/// the job is cancelled when the receiver goes away before it ends (its client left).
pub fn follow(
    mgr: &JobManager,
    id: &str,
    stops: Vec<String>,
    cancel_on_drop: bool,
) -> Result<mpsc::Receiver<Piece>, ApiError> {
    use pb::job_event::Event;
    let mut events = mgr.follow(id)?;
    let (tx, rx) = mpsc::channel(64);
    let (mgr, id) = (mgr.clone(), id.to_string());
    tokio::spawn(async move {
        let mut matcher = StopMatcher::new(stops);
        let mut running = false;
        let mut stopped = false;
        loop {
            let ev = tokio::select! {
                ev = events.recv() => ev,
                _ = tx.closed() => {
                    if cancel_on_drop {
                        tracing::info!(job = %id, "the client went away: cancelling its job");
                        let _ = mgr.cancel(&id);
                    }
                    return;
                }
            };
            let piece = match ev {
                None => Piece::Failed(ApiError::from(ringbolt_jobs::JobError::Unavailable(
                    "the job's event stream ended early".into(),
                ))),
                Some(Err(e)) => Piece::Failed(e.into()),
                Some(Ok(e)) => match e.event {
                    Some(Event::Progress(p)) if p.phase != pb::Phase::Queued as i32 => {
                        if running {
                            continue;
                        }
                        running = true;
                        Piece::Running
                    }
                    Some(Event::Token(t)) => {
                        if stopped {
                            continue;
                        }
                        if !running {
                            running = true;
                            if tx.send(Piece::Running).await.is_err() {
                                if cancel_on_drop {
                                    let _ = mgr.cancel(&id);
                                }
                                return;
                            }
                        }
                        let (text, matched) = matcher.push(t.text.as_deref().unwrap_or(""));
                        if matched {
                            stopped = true;
                            mgr.stop_after(&id, t.index as usize + 1);
                        }
                        if text.is_empty() {
                            continue;
                        }
                        Piece::Text(text)
                    }
                    Some(Event::Finished(f)) => {
                        let rest = if stopped {
                            String::new()
                        } else {
                            let (mut t, matched) = matcher.push(f.text.as_deref().unwrap_or(""));
                            stopped |= matched;
                            if !matched {
                                t.push_str(&matcher.finish());
                            }
                            t
                        };
                        if !rest.is_empty() {
                            let _ = tx.send(Piece::Text(rest)).await;
                        }
                        // A stop sequence ended the text, however the job ended (it may have
                        // finished before it heard of the stop).
                        let finish = match pb::FinishReason::try_from(f.reason) {
                            _ if stopped => Finish::Stop,
                            Ok(pb::FinishReason::Length) => Finish::Length,
                            Ok(pb::FinishReason::Cancelled) => Finish::Cancelled,
                            _ => Finish::Stop,
                        };
                        Piece::Done {
                            finish,
                            prompt_tokens: f.prompt_tokens,
                            completion_tokens: f.generated_tokens,
                            cached_tokens: f.cached_tokens,
                        }
                    }
                    Some(Event::Failed(f)) => Piece::Failed(ApiError::from_grpc(f.code, f.message)),
                    _ => continue,
                },
            };
            let last = matches!(piece, Piece::Done { .. } | Piece::Failed(_));
            if tx.send(piece).await.is_err() && !last && cancel_on_drop {
                let _ = mgr.cancel(&id);
                return;
            }
            if last {
                return;
            }
        }
    });
    Ok(rx)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(stops: &[&str], pieces: &[&str]) -> (String, bool) {
        let mut m = StopMatcher::new(stops.iter().map(|s| s.to_string()).collect());
        let mut out = String::new();
        for p in pieces {
            let (t, hit) = m.push(p);
            out.push_str(&t);
            if hit {
                return (out, true);
            }
        }
        out.push_str(&m.finish());
        (out, false)
    }

    #[test]
    fn stop_sequences_split_across_pieces_are_found_and_never_sent() {
        assert_eq!(
            run(&["END"], &["ab", "cE", "N", "Dxyz"]),
            ("abc".into(), true)
        );
        assert_eq!(run(&["\n\n", "END"], &["a\n", "\nb"]), ("a".into(), true));
        assert_eq!(run(&["END"], &["abEN", "x"]), ("abENx".into(), false));
        assert_eq!(run(&[], &["a", "b"]), ("ab".into(), false));
        // Held-back text is cut at character boundaries.
        assert_eq!(run(&["éé"], &["aé", "b"]), ("aéb".into(), false));
        assert_eq!(run(&["é!"], &["aé", "!"]), ("a".into(), true));
    }
}
