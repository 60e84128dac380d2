//! Stall detection that copes with the saw-tooth of remaining bytes.
//!
//! Within a pass, remaining bytes fall as pages are sent, then jump at the
//! next sync by what the guest dirtied meanwhile: "remaining went down" says
//! nothing. Progress is judged per pass, on the bytes left right after each
//! sync: a migration is stalled when the last `window` passes did not set a
//! new low (by at least 5 %) against all passes before them.

/// True when the last `window` post-sync values made no progress.
pub fn stalled(post_sync_remaining: &[f64], window: usize) -> bool {
    if window == 0 || post_sync_remaining.len() <= window {
        return false;
    }
    let (before, recent) = post_sync_remaining.split_at(post_sync_remaining.len() - window);
    let best_before = before.iter().copied().fold(f64::INFINITY, f64::min);
    let best_recent = recent.iter().copied().fold(f64::INFINITY, f64::min);
    best_recent > 0.95 * best_before
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_shrinking_series_is_not_stalled() {
        assert!(!stalled(&[256.0, 128.0, 64.0, 32.0, 16.0], 3));
    }

    #[test]
    fn a_flat_series_is_stalled_only_after_the_window() {
        assert!(!stalled(&[256.0, 256.0, 256.0], 3));
        assert!(stalled(&[256.0, 256.0, 256.0, 256.0], 3));
    }

    #[test]
    fn one_new_low_inside_the_window_is_progress() {
        assert!(!stalled(&[256.0, 250.0, 120.0, 250.0, 256.0], 3));
    }
}
