//! Helpers shared by the tests against the reference implementation's fixtures.

/// |got − want| ≤ 1e-4 · max|want| everywhere (the bound the fixtures are held to).
pub fn assert_close(got: &[f32], want: &[f32], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let scale = want.iter().fold(0f32, |m, x| m.max(x.abs()));
    let err = got
        .iter()
        .zip(want)
        .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
    eprintln!("{what}: max error {err:e} (max|want| {scale})");
    assert!(
        err <= 1e-4 * scale,
        "{what}: max error {err:e} > 1e-4 × {scale}"
    );
}
