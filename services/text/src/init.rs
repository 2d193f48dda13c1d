//! The text files `init-checkpoint` writes beside random weights: a small byte-level BPE
//! tokenizer trained on a bundled text, and a `tokenizer_config.json` with MiniMax-01's chat
//! template and special tokens, so a demo checkpoint takes and gives text with no download.

use crate::TextError;
use std::path::Path;
use tokenizers::models::TrainerWrapper;
use tokenizers::models::bpe::{BPE, BpeTrainerBuilder};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::{AddedToken, Tokenizer};

/// The text the tokenizer is trained on.
pub const CORPUS: &str = include_str!("../assets/corpus.txt");

/// MiniMax-Text-01's chat template: system, user and assistant turns between
/// `<beginning_of_sentence>` and `<end_of_sentence>`, message contents as lists of typed parts.
pub const MINIMAX_TEXT01_TEMPLATE: &str = "{% for message in messages %}{% if message['role'] == 'system' %}{{ '<beginning_of_sentence>system ai_setting=assistant\\n' + message['content'][0]['text'] + '<end_of_sentence>\\n'}}{% elif message['role'] == 'user' %}{{ '<beginning_of_sentence>user name=user\\n' + message['content'][0]['text'] + '<end_of_sentence>\\n'}}{% elif message['role'] == 'assistant' %}{{ '<beginning_of_sentence>ai name=assistant\\n' }}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{% generation %}{{ content['text'] }}{% endgeneration %}{% endfor %}{{ '<end_of_sentence>\\n' }}{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '<beginning_of_sentence>ai name=assistant\\n' }}{% endif %}";

/// MiniMax-01's special tokens, given the first ids.
pub const SPECIAL_TOKENS: [&str; 3] = [
    "<end_of_document>",
    "<beginning_of_sentence>",
    "<end_of_sentence>",
];

/// Fewest ids a byte-level tokenizer needs: every byte and the special tokens.
pub const MIN_VOCAB: usize = 256 + SPECIAL_TOKENS.len();

/// Most ids the trained tokenizer has (the bundled text supports no more merges).
const MAX_VOCAB: usize = 4096;

/// A byte-level BPE tokenizer of at most `vocab` ids trained on `corpus` (deterministic).
pub fn train(corpus: &str, vocab: usize) -> Result<Tokenizer, TextError> {
    train_with(corpus, vocab, &[])
}

/// [`train`], with the special tokens `last` taking the vocabulary's last ids (a VL-01
/// model's `<image>` placeholder, say).
pub fn train_with(corpus: &str, vocab: usize, last: &[&str]) -> Result<Tokenizer, TextError> {
    let all = vocab;
    let vocab = vocab.saturating_sub(last.len());
    if vocab < MIN_VOCAB {
        return Err(TextError::Template(format!(
            "a byte-level tokenizer needs at least {MIN_VOCAB} ids; the model has {vocab}"
        )));
    }
    let trainer = BpeTrainerBuilder::new()
        .vocab_size(vocab.min(MAX_VOCAB))
        .min_frequency(2)
        .show_progress(false)
        .special_tokens(
            SPECIAL_TOKENS
                .iter()
                .map(|s| AddedToken::from(*s, true))
                .collect(),
        )
        .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
        .build();
    let mut tok = Tokenizer::new(BPE::default());
    let byte_level = ByteLevel::default().add_prefix_space(false);
    tok.with_pre_tokenizer(Some(byte_level));
    tok.with_decoder(Some(byte_level));
    tok.with_post_processor(Some(byte_level));
    tok.train(
        &mut TrainerWrapper::from(trainer),
        corpus.lines().map(|l| format!("{l}\n")),
    )
    .map_err(|e| TextError::Template(format!("training the tokenizer: {e}")))?;
    // The model's other ids are reserved tokens that decode to their names, so that whatever
    // a (random) model generates shows as text.
    let trained = tok.get_vocab_size(true);
    let reserved: Vec<AddedToken> = (trained..vocab)
        .map(|i| AddedToken::from(format!("<|reserved_{i}|>"), false))
        .collect();
    tok.add_tokens(reserved)
        .map_err(|e| TextError::Template(format!("reserving the model's other ids: {e}")))?;
    let last: Vec<AddedToken> = last.iter().map(|s| AddedToken::from(*s, true)).collect();
    tok.add_special_tokens(last)
        .map_err(|e| TextError::Template(format!("adding the last special tokens: {e}")))?;
    if tok.get_vocab_size(true) != all {
        return Err(TextError::Template(format!(
            "the tokenizer has {} ids, not the model's {all}",
            tok.get_vocab_size(true)
        )));
    }
    Ok(tok)
}

/// The `tokenizer_config.json` written beside the trained tokenizer (transformers loads it
/// with `AutoTokenizer`).
pub fn tokenizer_config() -> serde_json::Value {
    serde_json::json!({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<beginning_of_sentence>",
        "eos_token": "<end_of_sentence>",
        "unk_token": "<end_of_document>",
        "add_bos_token": false,
        "add_eos_token": false,
        "clean_up_tokenization_spaces": false,
        "model_max_length": 40960000,
        "chat_template": MINIMAX_TEXT01_TEMPLATE,
    })
}

/// Writes `tokenizer.json` and `tokenizer_config.json` into `dir` for a model of `vocab` ids,
/// the special tokens `last` taking its last ids.
pub fn write(dir: &Path, vocab: usize, last: &[&str]) -> Result<(), TextError> {
    let tok = train_with(CORPUS, vocab, last)?;
    let path = dir.join("tokenizer.json");
    tok.save(&path, true).map_err(|e| TextError::Write {
        path: path.clone(),
        msg: e.to_string(),
    })?;
    let path = dir.join("tokenizer_config.json");
    let body = serde_json::to_string_pretty(&tokenizer_config()).unwrap_or_default();
    std::fs::write(&path, body + "\n").map_err(|e| TextError::Write {
        path,
        msg: e.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn training_is_deterministic_and_fits_the_vocabulary() {
        let a = train(CORPUS, 512).unwrap();
        let b = train(CORPUS, 512).unwrap();
        assert_eq!(a.to_string(false).unwrap(), b.to_string(false).unwrap());
        assert_eq!(a.get_vocab_size(true), 512);
        assert_eq!(a.token_to_id("<end_of_document>"), Some(0));
        assert_eq!(a.token_to_id("<end_of_sentence>"), Some(2));
        // Common words are single tokens once merged; text round-trips.
        let enc = a.encode("the model", false).unwrap();
        assert!(enc.get_ids().len() < "the model".len());
        let big = train(CORPUS, 32_000).unwrap();
        assert_eq!(big.get_vocab_size(true), 32_000);
        assert!(big.get_vocab_size(false) <= MAX_VOCAB);
        assert_eq!(big.decode(&[31_999], true).unwrap(), "<|reserved_31999|>");
        assert!(train(CORPUS, 100).is_err());
        // A VL-01 model's placeholder takes the last id, and is one token in text.
        let vl = train_with(CORPUS, 512, &["<image>"]).unwrap();
        assert_eq!(vl.get_vocab_size(true), 512);
        assert_eq!(vl.token_to_id("<image>"), Some(511));
        let enc = vl.encode("a<image>b", false).unwrap();
        assert!(enc.get_ids().contains(&511), "{:?}", enc.get_ids());
    }
}
