//! Bounds on what a client may make the server store or echo. Every stored field is bounded so
//! that one job's record always fits a message, and echoed input is clipped so an error can
//! never grow past what a client can receive.

/// Longest idempotency key accepted, in bytes.
pub const MAX_IDEMPOTENCY_KEY_BYTES: usize = 256;
/// Most stop tokens one job may name.
pub const MAX_STOP_TOKENS: usize = 64;
/// Longest job id (or page token) looked up; real ids are 36-character UUIDs.
pub const MAX_JOB_ID_BYTES: usize = 64;
/// Longest error message kept in a job record.
pub const MAX_ERROR_BYTES: usize = 4096;
/// Largest `max_new_tokens` limit a server may be configured with: a finished job's tokens
/// (at most 5 bytes each on the wire) then always fit one 8 MiB message.
pub const MAX_NEW_TOKENS_CEILING: u32 = 1 << 20;
/// Jobs in one `ListJobs` page when the request asks for none, and at most.
pub const DEFAULT_PAGE: usize = 100;
pub const MAX_PAGE: usize = 1000;
/// Encoded bytes of the jobs in one `ListJobs` page (a page holds at least one job).
pub const PAGE_BYTES: usize = 4 << 20;
/// Characters of client input quoted back in an error message.
const ECHO_CHARS: usize = 64;

/// `s` as it may be quoted back to a client: at most 64 characters, with how long it was when
/// it was longer.
pub fn echo(s: &str) -> String {
    match s.char_indices().nth(ECHO_CHARS) {
        None => s.to_string(),
        Some((cut, _)) => format!("{}… ({} bytes)", &s[..cut], s.len()),
    }
}

/// `s` cut to at most `max` bytes on a character boundary.
pub fn clip(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// Checks a job id (or page token) a client sent before it is used or echoed.
pub fn check_job_id(id: &str) -> Result<(), String> {
    if id.is_empty() {
        return Err("the job id is empty".into());
    }
    if id.len() > MAX_JOB_ID_BYTES {
        return Err(format!(
            "job id `{}` is not a job id: ids are at most {MAX_JOB_ID_BYTES} bytes",
            echo(id)
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn echoed_input_is_clipped_and_says_how_long_it_was() {
        assert_eq!(echo("abc"), "abc");
        let long = "é".repeat(10_000);
        let e = echo(&long);
        assert!(e.len() < 200, "{e}");
        assert!(e.ends_with("(20000 bytes)"), "{e}");
        assert_eq!(clip("héllo", 2), "h");
        assert_eq!(clip("héllo", 3), "hé");
        assert!(check_job_id(&"x".repeat(10_000)).unwrap_err().len() < 200);
        assert!(check_job_id("").is_err());
        assert!(check_job_id("0193a3c4-7b1e-7000-8000-000000000000").is_ok());
    }
}
