//! Token id lists as the CLI takes them: ids separated by commas and/or whitespace.

use crate::error::{ModelError, Result};

pub fn parse_token_list(text: &str) -> Result<Vec<u32>> {
    text.split(|c: char| c == ',' || c.is_whitespace())
        .filter(|s| !s.is_empty())
        .enumerate()
        .map(|(i, s)| {
            s.parse::<u32>().map_err(|_| {
                ModelError::Invalid(format!(
                    "token {i} (`{s}`) is not a non-negative integer id"
                ))
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_commas_and_whitespace() {
        assert_eq!(
            parse_token_list("5,17, 3\n 9\t10,").unwrap(),
            vec![5, 17, 3, 9, 10]
        );
        assert!(
            parse_token_list("1,-2")
                .unwrap_err()
                .to_string()
                .contains("`-2`")
        );
        assert!(parse_token_list("").unwrap().is_empty());
    }
}
