//! When to retry and how long to wait: backoff with full jitter, the upstream's `retry-after`,
//! and a retry budget.
//!
//! # Why a budget and not only `max_retries`
//! `max_retries` bounds one request, not the load on an upstream that is already failing: with
//! 4 retries every request becomes 5 attempts exactly when the upstream can least take them,
//! and every client that retries the same way multiplies that again. A budget ties retries to
//! the traffic that is actually arriving: over a sliding window, retries may be at most a share
//! (20%) of first attempts, plus a small floor so that a quiet client can still retry at all.
//! Under a storm of failures the upstream then sees at most 1.2 times the offered load.
//!
//! # Who may spend it
//! Not every retry is worth the same. A retry of a model with a fallback after it buys an
//! answer from the preferred model, sooner than the fallback would give one; a retry of the
//! last model of a chain is the request's last chance. When the budget runs short, first come
//! first served gives it to the first kind, because there are many more of them: in the harder
//! overload scenario (primary 50% 529, fallback 30% 529) the quick retries of the primary spent
//! every window's allowance, and each request lost in that phase was one whose fallback
//! failed once and found nothing left to retry with. So a retry that has a fallback after it
//! ([`Spend::BeforeFallback`]) may use only three fifths of the allowance; the rest is kept
//! for last chances ([`Spend::LastChance`]), which may use all of it. Measured on that
//! scenario with seed 2, three quarters lost 11 answerable requests and three fifths 7. The
//! price is paid in the easier scenario, where the fallback is healthy and a retry of the
//! primary would have answered: 19.9% of answers come from the fallback there instead of
//! 19.5% (three quarters), against a 20% target; half sent 20.1%.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

use http::HeaderMap;
use rand::Rng;
use tokio::time::Instant;

/// The delay before retry number `retry` (0 for the first retry): uniformly random in
/// `[0, min(max, base * 2^retry)]` ("full jitter"), so that clients that failed together do
/// not come back together.
pub fn backoff(base: Duration, max: Duration, retry: u32) -> Duration {
    let ceiling = base.saturating_mul(1u32 << retry.min(20)).min(max);
    let nanos = ceiling.as_nanos().min(u64::MAX as u128) as u64;
    Duration::from_nanos(rand::rng().random_range(0..=nanos))
}

/// How long the upstream asked to wait: `retry-after-ms`, else `retry-after` as seconds, else
/// as an HTTP date (relative to `now`). A date in the past means no wait.
pub fn retry_after(headers: &HeaderMap, now: SystemTime) -> Option<Duration> {
    let text = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::trim)
    };
    if let Some(ms) = text("retry-after-ms").and_then(|v| v.parse::<f64>().ok()) {
        if ms >= 0.0 {
            return Some(seconds(ms / 1000.0));
        }
    }
    let value = text("retry-after")?;
    if let Ok(secs) = value.parse::<f64>() {
        return (secs >= 0.0).then(|| seconds(secs));
    }
    let when = httpdate::parse_http_date(value).ok()?;
    Some(when.duration_since(now).unwrap_or(Duration::ZERO))
}

/// Seconds as a duration; one too large to represent (`1e300`, `inf`) saturates, so it is
/// simply longer than any wait we would make. The header is the upstream's: never trust it.
fn seconds(secs: f64) -> Duration {
    Duration::try_from_secs_f64(secs).unwrap_or(Duration::MAX)
}

/// The share of the allowance that retries before a fallback may use.
const BEFORE_FALLBACK_SHARE: f64 = 0.6;

/// The sliding window the budget counts over.
const WINDOW: Duration = Duration::from_secs(10);
/// The window is kept in buckets of this length.
const BUCKET: Duration = Duration::from_secs(1);

/// What a retry is for (see "Who may spend it" in the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Spend {
    /// A retry of a model that has a fallback after it: at most three fifths of the allowance.
    BeforeFallback,
    /// A retry of the last model of a chain: all of it.
    LastChance,
}

/// Caps retries at a share of first attempts over a sliding window (see the module docs).
#[derive(Debug)]
pub struct RetryBudget {
    ratio: f64,
    floor: u32,
    /// Buckets oldest first: (start, first attempts, retries). A std mutex: held for a few
    /// integer operations, never across an await.
    buckets: Mutex<VecDeque<(Instant, u32, u32)>>,
}

impl RetryBudget {
    pub fn new(ratio: f64, floor: u32) -> Self {
        RetryBudget {
            ratio,
            floor,
            buckets: Mutex::new(VecDeque::new()),
        }
    }

    /// Counts a first attempt made at `now`.
    pub fn deposit(&self, now: Instant) {
        let mut buckets = self.buckets.lock().expect("budget lock");
        Self::expire(&mut buckets, now);
        Self::current(&mut buckets, now).1 += 1;
    }

    /// Takes one retry of kind `spend` from the budget at `now`; false when it is spent.
    pub fn try_withdraw(&self, now: Instant, spend: Spend) -> bool {
        let mut buckets = self.buckets.lock().expect("budget lock");
        Self::expire(&mut buckets, now);
        let (firsts, retries) = buckets
            .iter()
            .fold((0u64, 0u64), |(f, r), b| (f + b.1 as u64, r + b.2 as u64));
        let allowance = self.floor as f64 + self.ratio * firsts as f64;
        let allowed = match spend {
            Spend::LastChance => allowance,
            Spend::BeforeFallback => allowance * BEFORE_FALLBACK_SHARE,
        };
        if (retries as f64) < allowed {
            Self::current(&mut buckets, now).2 += 1;
            true
        } else {
            false
        }
    }

    fn expire(buckets: &mut VecDeque<(Instant, u32, u32)>, now: Instant) {
        while buckets
            .front()
            .is_some_and(|b| now.duration_since(b.0) >= WINDOW)
        {
            buckets.pop_front();
        }
    }

    fn current(
        buckets: &mut VecDeque<(Instant, u32, u32)>,
        now: Instant,
    ) -> &mut (Instant, u32, u32) {
        if buckets
            .back()
            .is_none_or(|b| now.duration_since(b.0) >= BUCKET)
        {
            buckets.push_back((now, 0, 0));
        }
        buckets.back_mut().expect("just pushed")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    #[test]
    fn backoff_stays_under_its_ceiling() {
        let base = Duration::from_millis(500);
        let max = Duration::from_secs(30);
        for retry in 0..10 {
            let ceiling = (base * 2u32.pow(retry)).min(max);
            for _ in 0..50 {
                assert!(backoff(base, max, retry) <= ceiling);
            }
        }
        // Jitter really spreads: 100 draws are not all equal.
        let draws: std::collections::HashSet<_> = (0..100).map(|_| backoff(base, max, 3)).collect();
        assert!(draws.len() > 50);
    }

    #[test]
    fn retry_after_forms() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let mut h = HeaderMap::new();
        assert_eq!(retry_after(&h, now), None);
        h.insert("retry-after", HeaderValue::from_static("3"));
        assert_eq!(retry_after(&h, now), Some(Duration::from_secs(3)));
        let date = httpdate::fmt_http_date(now + Duration::from_secs(7));
        h.insert("retry-after", HeaderValue::from_str(&date).unwrap());
        assert_eq!(retry_after(&h, now), Some(Duration::from_secs(7)));
        let past = httpdate::fmt_http_date(now - Duration::from_secs(7));
        h.insert("retry-after", HeaderValue::from_str(&past).unwrap());
        assert_eq!(retry_after(&h, now), Some(Duration::ZERO));
        h.insert("retry-after-ms", HeaderValue::from_static("250"));
        assert_eq!(retry_after(&h, now), Some(Duration::from_millis(250)));
        h.remove("retry-after-ms");
        h.insert("retry-after", HeaderValue::from_static("soon"));
        assert_eq!(retry_after(&h, now), None);
        // Absurd values are the upstream's word, not a reason to panic.
        h.insert(
            "retry-after",
            HeaderValue::from_static("99999999999999999999999"),
        );
        assert_eq!(retry_after(&h, now), Some(Duration::MAX));
        h.insert("retry-after-ms", HeaderValue::from_static("1e300"));
        assert_eq!(retry_after(&h, now), Some(Duration::MAX));
        h.insert("retry-after-ms", HeaderValue::from_static("NaN"));
        h.insert("retry-after", HeaderValue::from_static("inf"));
        assert_eq!(retry_after(&h, now), Some(Duration::MAX));
    }

    #[tokio::test(start_paused = true)]
    async fn budget_allows_a_share_of_first_attempts_plus_a_floor() {
        let budget = RetryBudget::new(0.2, 2);
        for _ in 0..100 {
            budget.deposit(Instant::now());
        }
        let granted = (0..1000)
            .filter(|_| budget.try_withdraw(Instant::now(), Spend::LastChance))
            .count();
        assert_eq!(granted, 22);
        // The window slides: later, the old deposits no longer count.
        tokio::time::advance(WINDOW + BUCKET).await;
        let granted = (0..1000)
            .filter(|_| budget.try_withdraw(Instant::now(), Spend::LastChance))
            .count();
        assert_eq!(granted, 2);
    }

    #[tokio::test(start_paused = true)]
    async fn retries_before_a_fallback_leave_two_fifths_for_last_chances() {
        let budget = RetryBudget::new(0.2, 0);
        for _ in 0..100 {
            budget.deposit(Instant::now());
        }
        let before = |b: &RetryBudget| b.try_withdraw(Instant::now(), Spend::BeforeFallback);
        let granted = (0..1000).filter(|_| before(&budget)).count();
        assert_eq!(granted, 12, "three fifths of 20");
        let last = (0..1000)
            .filter(|_| budget.try_withdraw(Instant::now(), Spend::LastChance))
            .count();
        assert_eq!(last, 8, "the rest is there for last chances");
        assert!(!before(&budget));
    }
}
