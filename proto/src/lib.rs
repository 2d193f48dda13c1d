//! Ringbolt's gRPC API (`proto/ringbolt/v1`): generated messages, clients and servers.

#[allow(clippy::all, clippy::pedantic)]
pub mod v1 {
    tonic::include_proto!("ringbolt.v1");
}

/// The internal control plane between the coordinator and workers (never tensors).
#[allow(clippy::all, clippy::pedantic)]
pub mod internal {
    tonic::include_proto!("ringbolt.internal.v1");
}

/// Packs token ids as little-endian u32 (the `PromptChunk.tokens` encoding).
pub fn pack_tokens(ids: &[u32]) -> Vec<u8> {
    ids.iter().flat_map(|t| t.to_le_bytes()).collect()
}

/// Unpacks `PromptChunk.tokens`; `None` when the length is not a multiple of 4.
pub fn unpack_tokens(bytes: &[u8]) -> Option<Vec<u32>> {
    if !bytes.len().is_multiple_of(4) {
        return None;
    }
    Some(
        bytes
            .chunks_exact(4)
            .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    #[test]
    fn tokens_round_trip() {
        let ids = [0u32, 1, 200_063, u32::MAX];
        assert_eq!(
            super::unpack_tokens(&super::pack_tokens(&ids)).unwrap(),
            ids
        );
        assert!(super::unpack_tokens(&[1, 2, 3]).is_none());
    }
}
