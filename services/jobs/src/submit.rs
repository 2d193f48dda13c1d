//! Submitting a job, whatever API it comes through: one set of rules for what a job may ask,
//! one admission, one spooling of its prompt. A [`Submission`] begins with the job's header
//! (checked, then admitted: it holds its place among the jobs in flight while its prompt
//! arrives), takes the prompt as token ids or text in pieces, and images (a MiniMax-VL-01
//! model) in pieces between them, and ends by accepting the job.

use crate::auth::Caller;
use crate::bounds::{MAX_IDEMPOTENCY_KEY_BYTES, MAX_STOP_TOKENS, echo};
use crate::error::JobError;
use crate::manager::{JobManager, Permit};
use crate::record::{ImageInfo, JobRecord, JobState, Sampling, Timings, now_unix_ms};
use crate::store::SpoolWriter;
use ringbolt_model::SamplingParams;
use ringbolt_proto::v1 as pb;

fn invalid(msg: impl Into<String>) -> JobError {
    JobError::InvalidArgument(msg.into())
}

/// What a submission asks for, as one hash: its parameters and its prompt's token ids. A retry
/// under the same idempotency key must ask the same.
fn fingerprint(h: &pb::JobHeader, s: &Sampling, prompt_hash: u64) -> u64 {
    let mut x = xxhash_rust::xxh3::Xxh3::new();
    x.update(&h.max_new_tokens.to_le_bytes());
    x.update(&s.temperature.to_bits().to_le_bytes());
    x.update(&s.top_p.to_bits().to_le_bytes());
    x.update(&s.seed.to_le_bytes());
    x.update(&(s.stop_tokens.len() as u64).to_le_bytes());
    for t in &s.stop_tokens {
        x.update(&t.to_le_bytes());
    }
    x.update(&h.context_parallel.to_le_bytes());
    x.update(&[h.ignore_eos as u8]);
    x.update(&prompt_hash.to_le_bytes());
    x.digest()
}

/// Checks what `h` asks for against `mgr`'s limits and model; the job's sampling.
pub fn validate_header(mgr: &JobManager, h: &pb::JobHeader) -> Result<Sampling, JobError> {
    let limit = mgr.limits().max_new_tokens;
    if h.max_new_tokens == 0 || h.max_new_tokens > limit {
        return Err(invalid(format!(
            "max_new_tokens must be between 1 and {limit}, got {}",
            h.max_new_tokens
        )));
    }
    let s = h.sampling.clone().unwrap_or_default();
    let params = SamplingParams {
        temperature: s.temperature,
        top_p: if s.top_p == 0.0 { 1.0 } else { s.top_p },
        seed: s.seed,
    };
    params.validate().map_err(JobError::from_request)?;
    let vocab = mgr.model().vocab_size;
    if s.stop_tokens.len() > MAX_STOP_TOKENS {
        return Err(invalid(format!(
            "{} stop tokens were given; at most {MAX_STOP_TOKENS} are allowed",
            s.stop_tokens.len()
        )));
    }
    if h.idempotency_key.len() > MAX_IDEMPOTENCY_KEY_BYTES {
        return Err(invalid(format!(
            "the idempotency key is {} bytes; at most {MAX_IDEMPOTENCY_KEY_BYTES} are allowed",
            h.idempotency_key.len()
        )));
    }
    if let Some(&t) = s.stop_tokens.iter().find(|&&t| t as usize >= vocab) {
        return Err(invalid(format!(
            "stop token {t} is outside the vocabulary (size {vocab})"
        )));
    }
    let most = mgr.limits().context_parallel.max(1);
    if h.context_parallel > most {
        return Err(JobError::FailedPrecondition(format!(
            "context-parallel degree {} was requested, but this server splits a context \
             among at most {most} rank(s) (standalone --context-parallel)",
            h.context_parallel
        )));
    }
    Ok(Sampling {
        temperature: params.temperature,
        top_p: params.top_p,
        seed: params.seed,
        stop_tokens: s.stop_tokens,
    })
}

/// A job being submitted (see the module's docs).
pub struct Submission {
    mgr: JobManager,
    header: pb::JobHeader,
    sampling: Sampling,
    key: Option<String>,
    permit: Permit,
    id: String,
    spool: SpoolWriter,
    /// Text received so far (tokenized at the end).
    text: String,
    /// The longest prompt accepted.
    max_prompt: u64,
    /// Image placeholders among the token ids received.
    placeholders: u64,
    /// The images accepted so far (their files are spooled).
    images: Vec<ImageInfo>,
    /// The pieces of the image being received.
    image: Vec<u8>,
}

impl Submission {
    /// Checks `header` and admits the job for `caller`.
    pub fn begin(
        mgr: &JobManager,
        header: pb::JobHeader,
        caller: Option<Caller>,
    ) -> Result<Self, JobError> {
        let sampling = validate_header(mgr, &header)?;
        let key = (!header.idempotency_key.is_empty()).then(|| header.idempotency_key.clone());
        // Every upload takes a place among the admitted jobs before it starts (a retry of a
        // known key too, while it uploads), so admission is exact under concurrency.
        let permit = mgr.admit(caller)?;
        let max_prompt = mgr
            .limits()
            .max_prompt_tokens
            .min(mgr.model().max_position_embeddings as u64);
        let (id, spool) = mgr.new_upload()?;
        Ok(Submission {
            mgr: mgr.clone(),
            header,
            sampling,
            key,
            permit,
            id,
            spool,
            text: String::new(),
            max_prompt,
            placeholders: 0,
            images: Vec::new(),
            image: Vec::new(),
        })
    }

    /// More of an image's file; `last` ends the image, which is then decoded (off the async
    /// threads) to check it and count its features, and spooled.
    pub async fn push_image(&mut self, data: &[u8], last: bool) -> Result<(), JobError> {
        use ringbolt_model::image::{MAX_IMAGE_BYTES, Rgb};
        let Some(vision) = self.mgr.vision() else {
            return Err(invalid(
                "images need a MiniMax-VL-01 model, and this server's model takes none",
            ));
        };
        let limits = self.mgr.limits();
        let index = self.images.len() + 1;
        if index > limits.max_images {
            return Err(invalid(format!(
                "more than {} images: a prompt may hold at most {} (--max-images)",
                limits.max_images, limits.max_images
            )));
        }
        let held: u64 = self.images.iter().map(|i| i.bytes).sum();
        if held as usize + self.image.len() + data.len() > MAX_IMAGE_BYTES {
            return Err(invalid(format!(
                "the prompt's images are larger than the limit of {MAX_IMAGE_BYTES} bytes \
                 (all images together)"
            )));
        }
        self.image.extend_from_slice(data);
        if !last {
            return Ok(());
        }
        let bytes = std::mem::take(&mut self.image);
        let max_pixels = limits.max_image_pixels;
        let (bytes, decoded) = tokio::task::spawn_blocking(move || {
            let size = Rgb::decode(&bytes, max_pixels).map(|img| (img.width, img.height));
            (bytes, size)
        })
        .await
        .map_err(|e| JobError::Internal(format!("decoding image {index}: {e}")))?;
        let (width, height) = decoded.map_err(|e| invalid(format!("image {index}: {e}")))?;
        self.spool.write_image(&bytes)?;
        self.images.push(ImageInfo {
            bytes: bytes.len() as u64,
            width: width as u32,
            height: height as u32,
            features: vision.feature_count(height, width) as u64,
        });
        Ok(())
    }

    /// More of the prompt as token ids.
    pub fn push_ids(&mut self, ids: &[u32]) -> Result<(), JobError> {
        if !self.text.is_empty() {
            return Err(invalid("a prompt is either token ids or text, not both"));
        }
        let vocab = self.mgr.model().vocab_size;
        if let Some((i, &t)) = ids.iter().enumerate().find(|(_, t)| **t as usize >= vocab) {
            return Err(invalid(format!(
                "token id {t} at position {} is outside the vocabulary (size {vocab})",
                self.spool.tokens() + i as u64,
            )));
        }
        if self.spool.tokens() + ids.len() as u64 > self.max_prompt {
            return Err(invalid(format!(
                "the prompt is longer than the maximum of {} tokens",
                self.max_prompt
            )));
        }
        self.count_placeholders(ids);
        self.spool.write(ids)
    }

    fn count_placeholders(&mut self, ids: &[u32]) {
        if let Some(v) = self.mgr.vision() {
            self.placeholders += ids.iter().filter(|&&t| t == v.image_token).count() as u64;
        }
    }

    /// More of the prompt as text (tokenized once it is all in).
    pub fn push_text(&mut self, text: &str) -> Result<(), JobError> {
        if self.mgr.text().is_none() {
            return Err(JobError::FailedPrecondition(
                "text prompts need a tokenizer, and this server has none configured; send token ids"
                    .into(),
            ));
        }
        if self.spool.tokens() > 0 {
            return Err(invalid("a prompt is either token ids or text, not both"));
        }
        if (self.text.len() + text.len()) as u64 > self.max_prompt.saturating_mul(16) {
            return Err(invalid(format!(
                "the text prompt is longer than the maximum of {} tokens allows",
                self.max_prompt
            )));
        }
        self.text.push_str(text);
        Ok(())
    }

    /// Ends the prompt and accepts the job (or, for a known idempotency key asked the same,
    /// answers with that job).
    pub async fn finish(mut self) -> Result<pb::SubmitJobResponse, JobError> {
        let model = self.mgr.model().clone();
        if !self.text.is_empty()
            && let Some(text) = self.mgr.text()
        {
            let ids = text
                .encode(self.text.as_str())
                .map_err(|e| invalid(e.to_string()))?;
            if let Some((i, &t)) = ids
                .iter()
                .enumerate()
                .find(|(_, t)| **t as usize >= model.vocab_size)
            {
                return Err(invalid(format!(
                    "the tokenizer produced id {t} at position {i}, outside the model's vocabulary (size {})",
                    model.vocab_size
                )));
            }
            if ids.len() as u64 > self.max_prompt {
                return Err(invalid(format!(
                    "the prompt is longer than the maximum of {} tokens",
                    self.max_prompt
                )));
            }
            self.count_placeholders(&ids);
            self.spool.write(&ids)?;
        }
        if !self.image.is_empty() {
            return Err(invalid(format!(
                "image {} was not finished: the prompt ended before its last piece",
                self.images.len() + 1
            )));
        }
        let h = &self.header;
        let ids = self.spool.tokens();
        if ids == 0 {
            return Err(invalid("the prompt is empty"));
        }
        if h.expected_prompt_tokens != 0 && h.expected_prompt_tokens != ids {
            return Err(invalid(format!(
                "the header announced {} prompt tokens but {ids} arrived",
                h.expected_prompt_tokens
            )));
        }
        if let Some(v) = self.mgr.vision() {
            v.check_placeholders(self.placeholders as usize, self.images.len())
                .map_err(JobError::from_request)?;
        }
        let n = ids + crate::record::image_positions(&self.images);
        if n > self.max_prompt {
            return Err(invalid(format!(
                "the prompt takes {n} positions with its images' features, more than the \
                 maximum of {} tokens",
                self.max_prompt
            )));
        }
        if n as usize + h.max_new_tokens as usize > model.max_position_embeddings {
            return Err(invalid(format!(
                "{n} prompt tokens + {} new tokens exceed the model's {} positions",
                h.max_new_tokens, model.max_position_embeddings
            )));
        }
        let fp = fingerprint(h, &self.sampling, self.spool.prompt_hash());
        if let Some(k) = &self.key
            && let Some(existing) = self.mgr.lookup_idempotency_key(k)?
        {
            return existing_job(&self.mgr, k, existing, fp);
        }
        let record = JobRecord {
            id: self.id,
            state: JobState::Queued,
            prompt_tokens: n,
            max_new_tokens: h.max_new_tokens,
            sampling: self.sampling,
            idempotency_key: self.key.clone(),
            context_parallel: h.context_parallel,
            created_unix_ms: now_unix_ms(),
            finished_unix_ms: None,
            tokens: Vec::new(),
            finish_reason: None,
            error: None,
            timings: Timings::default(),
            fingerprint: Some(fp),
            ignore_eos: h.ignore_eos,
            cache_bytes_per_rank: Vec::new(),
            cached_tokens: 0,
            no_context_cache: h.no_context_cache,
            images: self.images,
        };
        let (job_id, existing) = self.mgr.accept(record, self.spool, self.permit).await?;
        if existing && let Some(k) = &self.key {
            return existing_job(&self.mgr, k, job_id, fp);
        }
        Ok(pb::SubmitJobResponse {
            job_id,
            prompt_tokens: n,
            existing,
        })
    }
}

/// The answer to a submission whose idempotency key names job `id`: that job, if it was asked
/// with the same prompt and parameters; ALREADY_EXISTS if not.
fn existing_job(
    mgr: &JobManager,
    key: &str,
    id: String,
    fp: u64,
) -> Result<pb::SubmitJobResponse, JobError> {
    let rec = mgr.get(&id)?;
    if rec.fingerprint.is_some_and(|f| f != fp) {
        return Err(JobError::AlreadyExists(format!(
            "idempotency key `{}` already names job {id}, which was submitted with a \
             different prompt or parameters; use a new key for a new job",
            echo(key)
        )));
    }
    Ok(pb::SubmitJobResponse {
        job_id: id,
        prompt_tokens: rec.prompt_tokens,
        existing: true,
    })
}
