//! When a task may be scheduled to run (`run_at`): the bounds, and the check the bridges make.

use std::time::{Duration, SystemTime};

/// The furthest ahead a task may be scheduled (`run_at`): ten years. Further is taken for a
/// mistake (seconds given as milliseconds, a sentinel date) and refused by the bridges.
pub const MAX_SCHEDULE_AHEAD: Duration = Duration::from_secs(10 * 365 * 24 * 3600);

/// The furthest in the past a `run_at` may be: one year. A time a little past runs at once (a
/// job's `wait_until` computed a moment ago); one far past is a mistake (the epoch, a year 1).
pub const MAX_SCHEDULE_BEHIND: Duration = Duration::from_secs(365 * 24 * 3600);

/// Check a task's `run_at`, given as seconds since the Unix epoch: finite and within
/// [`MAX_SCHEDULE_BEHIND`] .. [`MAX_SCHEDULE_AHEAD`] of now. The error says what is wrong.
pub fn schedule_time(epoch_seconds: f64) -> Result<SystemTime, String> {
    if !epoch_seconds.is_finite() {
        return Err(format!(
            "run_at: must be a finite time, got {epoch_seconds}"
        ));
    }
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs_f64();
    if epoch_seconds > now + MAX_SCHEDULE_AHEAD.as_secs_f64() {
        return Err(format!(
            "run_at: {epoch_seconds} seconds since the epoch is more than 10 years ahead"
        ));
    }
    if epoch_seconds < now - MAX_SCHEDULE_BEHIND.as_secs_f64() {
        return Err(format!(
            "run_at: {epoch_seconds} seconds since the epoch is more than a year in the past"
        ));
    }
    // Within ten years of now: positive and far from any overflow.
    Ok(SystemTime::UNIX_EPOCH + Duration::from_secs_f64(epoch_seconds))
}
