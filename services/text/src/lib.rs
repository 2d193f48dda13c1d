//! Text in and out of token ids: the checkpoint's Hugging Face tokenizer (`tokenizer.json`),
//! incremental detokenization for streams ([`Detokenizer`]), the chat template of
//! `tokenizer_config.json` ([`ChatTemplate`]), and the small tokenizer `init-checkpoint` trains
//! ([`init`]).

pub mod chat;
pub mod init;

pub use chat::{ChatTemplate, Message};

use std::path::{Path, PathBuf};
use std::sync::Arc;
use tokenizers::Tokenizer;

#[derive(Debug, thiserror::Error)]
pub enum TextError {
    #[error("loading the tokenizer {path}: {msg}")]
    Load { path: PathBuf, msg: String },
    #[error("the text cannot be tokenized: {0}")]
    Encode(String),
    #[error("{0}")]
    Template(String),
    #[error("this model has no chat template (tokenizer_config.json has no `chat_template`)")]
    NoTemplate,
    #[error("writing {path}: {msg}")]
    Write { path: PathBuf, msg: String },
}

/// A model's text: its tokenizer, its chat template and its end-of-turn tokens.
pub struct Text {
    tokenizer: Tokenizer,
    template: Option<ChatTemplate>,
    /// Ids of `tokenizer_config.json`'s `eos_token` (where a chat turn ends).
    eos: Vec<u32>,
}

/// A token named in `tokenizer_config.json`: a string, or an added-token object.
fn token_name(v: Option<&serde_json::Value>) -> Option<String> {
    match v? {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Object(o) => o.get("content")?.as_str().map(str::to_string),
        _ => None,
    }
}

impl Text {
    /// The text of a checkpoint directory: `tokenizer` (default: the directory's
    /// `tokenizer.json`) and, beside it, `tokenizer_config.json` when present. None when there
    /// is no tokenizer.
    pub fn load(checkpoint: &Path, tokenizer: Option<&Path>) -> Result<Option<Text>, TextError> {
        let path = match tokenizer {
            Some(p) => p.to_path_buf(),
            None => {
                let p = checkpoint.join("tokenizer.json");
                if !p.exists() {
                    return Ok(None);
                }
                p
            }
        };
        let tok = Tokenizer::from_file(&path).map_err(|e| TextError::Load {
            path: path.clone(),
            msg: e.to_string(),
        })?;
        let cfg_path = path.with_file_name("tokenizer_config.json");
        let cfg: serde_json::Value = match std::fs::read_to_string(&cfg_path) {
            Ok(s) => serde_json::from_str(&s).map_err(|e| TextError::Load {
                path: cfg_path.clone(),
                msg: e.to_string(),
            })?,
            Err(_) => serde_json::Value::Null,
        };
        Text::new(tok, &cfg)
            .map_err(|e| TextError::Load {
                path: cfg_path,
                msg: e.to_string(),
            })
            .map(Some)
    }

    /// A text from a tokenizer and its `tokenizer_config.json` (Null: none).
    pub fn new(tokenizer: Tokenizer, config: &serde_json::Value) -> Result<Text, TextError> {
        let bos = token_name(config.get("bos_token"));
        let eos_name = token_name(config.get("eos_token"));
        let eos = eos_name
            .as_deref()
            .and_then(|e| tokenizer.token_to_id(e))
            .into_iter()
            .collect();
        let source = match config.get("chat_template") {
            Some(serde_json::Value::String(s)) => Some(s.clone()),
            // A list of named templates: the default one.
            Some(serde_json::Value::Array(list)) => list
                .iter()
                .find(|t| t.get("name").and_then(|n| n.as_str()) == Some("default"))
                .or(list.first())
                .and_then(|t| t.get("template"))
                .and_then(|t| t.as_str())
                .map(str::to_string),
            _ => None,
        };
        let template = source
            .map(|s| ChatTemplate::new(&s, bos, eos_name))
            .transpose()?;
        Ok(Text {
            tokenizer,
            template,
            eos,
        })
    }

    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    /// The token ids of `text` (special tokens written in it are read as such; nothing added).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, TextError> {
        let enc = self
            .tokenizer
            .encode(text, false)
            .map_err(|e| TextError::Encode(e.to_string()))?;
        Ok(enc.get_ids().to_vec())
    }

    /// The text of `ids`, special tokens left out. Ids the tokenizer does not know are left
    /// out too (a model's vocabulary is often larger than its tokenizer's).
    pub fn decode(&self, ids: &[u32]) -> String {
        let n = self.tokenizer.get_vocab_size(true) as u32;
        let known: Vec<u32> = ids.iter().copied().filter(|&t| t < n).collect();
        self.tokenizer.decode(&known, true).unwrap_or_default()
    }

    /// A decoder of one stream of tokens.
    pub fn detokenizer(self: &Arc<Self>) -> Detokenizer {
        Detokenizer {
            text: self.clone(),
            ids: Vec::new(),
            prefix: 0,
            read: 0,
        }
    }

    pub fn template(&self) -> Result<&ChatTemplate, TextError> {
        self.template.as_ref().ok_or(TextError::NoTemplate)
    }

    /// The tokens that end an assistant's turn (the config's `eos_token`).
    pub fn end_of_turn(&self) -> &[u32] {
        &self.eos
    }
}

/// Turns a stream of token ids into text pieces as they complete: a piece is given only once
/// its bytes form whole characters, and byte-level merges that change earlier text are waited
/// for, so the pieces joined equal the decoding of all ids.
pub struct Detokenizer {
    text: Arc<Text>,
    ids: Vec<u32>,
    /// Ids before `prefix` are settled; `prefix..read` gives the context the next piece is
    /// decoded against (decoders treat a sequence's first token specially).
    prefix: usize,
    read: usize,
}

impl Detokenizer {
    /// The text `id` completes (often empty: a character split across tokens).
    pub fn push(&mut self, id: u32) -> String {
        self.ids.push(id);
        let before = self.text.decode(&self.ids[self.prefix..self.read]);
        let now = self.text.decode(&self.ids[self.prefix..]);
        if now.len() > before.len() && !now.ends_with('\u{FFFD}') {
            let piece = match now.strip_prefix(before.as_str()) {
                Some(p) => p.to_string(),
                // A decoder that rewrote the context (rare): give what follows it.
                None => now.get(before.len()..).unwrap_or_default().to_string(),
            };
            self.prefix = self.read;
            self.read = self.ids.len();
            piece
        } else {
            String::new()
        }
    }

    /// What is left at the end of the stream (an incomplete character as U+FFFD).
    pub fn finish(&mut self) -> String {
        if self.read == self.ids.len() {
            return String::new();
        }
        let before = self.text.decode(&self.ids[self.prefix..self.read]);
        let now = self.text.decode(&self.ids[self.prefix..]);
        self.prefix = self.ids.len();
        self.read = self.ids.len();
        match now.strip_prefix(before.as_str()) {
            Some(p) => p.to_string(),
            None => now.get(before.len()..).unwrap_or_default().to_string(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text() -> Arc<Text> {
        let tok = init::train(init::CORPUS, 512).unwrap();
        Arc::new(Text::new(tok, &init::tokenizer_config()).unwrap())
    }

    #[test]
    fn pieces_join_to_the_whole_and_never_split_a_character() {
        let t = text();
        for s in [
            "Ringbolt serves very long contexts.",
            "naïve café — 東京 🚀 ok",
            "emoji 👩‍👩‍👧 and \u{1F600}\n\tend",
        ] {
            let ids = t.encode(s).unwrap();
            assert!(ids.len() > 3);
            let mut d = t.detokenizer();
            let mut out = String::new();
            for &id in &ids {
                let piece = d.push(id);
                assert!(!piece.contains('\u{FFFD}'), "{piece:?}");
                out.push_str(&piece);
            }
            out.push_str(&d.finish());
            assert_eq!(out, s);
            assert_eq!(t.decode(&ids), s);
        }
    }

    #[test]
    fn a_cut_character_ends_as_a_replacement() {
        let t = text();
        let ids = t.encode("東").unwrap();
        assert!(ids.len() > 1, "a rare CJK character is several byte tokens");
        let mut d = t.detokenizer();
        assert_eq!(d.push(ids[0]), "");
        assert_eq!(d.finish(), "\u{FFFD}");
    }

    #[test]
    fn special_tokens_are_read_from_text_and_left_out_of_decoding() {
        let t = text();
        let ids = t.encode("hi<end_of_sentence>").unwrap();
        assert_eq!(ids.last(), t.end_of_turn().last());
        assert_eq!(t.decode(&ids), "hi");
        // Ids beyond the tokenizer (a larger model vocabulary) decode to nothing.
        assert_eq!(t.decode(&[100_000]), "");
    }

    #[test]
    fn a_checkpoint_without_a_tokenizer_has_no_text() {
        let dir = std::env::temp_dir().join(format!("rb-text-none-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        assert!(Text::load(&dir, None).unwrap().is_none());
        std::fs::write(dir.join("tokenizer.json"), "{not json").unwrap();
        let e = Text::load(&dir, None).err().unwrap().to_string();
        assert!(e.contains("tokenizer.json"), "{e}");
        init::write(&dir, 512, &[]).unwrap();
        let t = Text::load(&dir, None).unwrap().unwrap();
        assert!(t.template().is_ok());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

#[cfg(test)]
mod reference {
    //! Against transformers: the fixture `scripts/reference/gen_text_fixtures.py` wrote with
    //! `AutoTokenizer` over the tokenizer `init-checkpoint` writes.
    use super::*;
    use serde_json::Value;

    fn fixture() -> (std::path::PathBuf, Value) {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/reference/text");
        let v = std::fs::read_to_string(dir.join("expected.json")).unwrap();
        (dir.clone(), serde_json::from_str(&v).unwrap())
    }

    fn ids(v: &Value) -> Vec<u32> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as u32)
            .collect()
    }

    #[test]
    fn init_checkpoint_writes_the_fixtures_tokenizer() {
        let (dir, _) = fixture();
        let out = std::env::temp_dir().join(format!("rb-text-ref-{}", std::process::id()));
        std::fs::create_dir_all(&out).unwrap();
        init::write(&out, 512, &[]).unwrap();
        for f in ["tokenizer.json", "tokenizer_config.json"] {
            assert_eq!(
                std::fs::read_to_string(out.join(f)).unwrap(),
                std::fs::read_to_string(dir.join(f)).unwrap(),
                "{f} differs from the fixture's: regenerate it (gen_text_fixtures.py)"
            );
        }
        std::fs::remove_dir_all(&out).unwrap();
    }

    #[test]
    fn encoding_and_decoding_match_transformers() {
        let (dir, v) = fixture();
        let t = Text::load(&dir, None).unwrap().unwrap();
        for case in v["encode"].as_array().unwrap() {
            let text = case["text"].as_str().unwrap();
            let want = ids(&case["ids"]);
            assert_eq!(t.encode(text).unwrap(), want, "{text:?}");
            assert_eq!(t.decode(&want), case["decoded"].as_str().unwrap());
        }
    }

    #[test]
    fn chat_templates_render_as_transformers_does() {
        let (dir, v) = fixture();
        let t = Text::load(&dir, None).unwrap().unwrap();
        for case in v["chat"].as_array().unwrap() {
            let msgs: Vec<Message> = case["messages"]
                .as_array()
                .unwrap()
                .iter()
                .map(|m| Message::new(m["role"].as_str().unwrap(), m["content"].as_str().unwrap()))
                .collect();
            let prompt = case["add_generation_prompt"].as_bool().unwrap();
            let rendered = match case["template"].as_str().unwrap() {
                "checkpoint" => t.template().unwrap().render(&msgs, prompt).unwrap(),
                src => ChatTemplate::new(src, None, None)
                    .unwrap()
                    .render(&msgs, prompt)
                    .unwrap(),
            };
            assert_eq!(rendered, case["rendered"].as_str().unwrap());
            assert_eq!(t.encode(&rendered).unwrap(), ids(&case["ids"]));
        }
    }
}
