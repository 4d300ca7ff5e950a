//! The circuit breaker, one per model of an upstream: stop sending a model requests while it
//! cannot answer, so that its overload is not made worse and callers get stale or fallback
//! answers at once instead of waiting out failures.
//!
//! # When it blocks
//! SPEC's rule is "`failures` consecutive failures". Alone, that rule abandons a model that
//! still answers half of its requests: at a 50% failure rate, five failures in a row come
//! about once every 64 answers, and each run would block the model for a whole cooldown. So
//! the breaker also asks that at least 90% of its last 32 answers failed. A dead model meets
//! both at once (five failures are 100% of a fresh window); a flaky one meets the second almost
//! never (29 of 32 at a 50% rate: about once in a million answers).
//!
//! States are named for what they do to requests: `Passing` lets them through, `Blocking`
//! turns them away until the cooldown ends, `Probing` lets exactly one through to decide.
//!
//! # Rescues: a held model is not a closed door
//! A cooldown is a guess at how long the model stays down. When the guess is long, the model
//! recovers while its breaker still holds it, and a request that has nowhere else to go (no
//! stale entry, every model of its chain held) gets an error although a try would have worked:
//! the overload scenario lost its recovery's first new questions that way, both models held
//! for their whole 30 s. So while a model is held, one such request per `rescue_interval`
//! (default 100 ms) may try it anyway ([`Breakers::admit_rescue`]), once and without retries:
//! the first new question after a recovery is answered, and its answer closes the breaker at
//! once. A failed rescue changes nothing (the breaker already knows the model fails).
//!
//! The interval is the longest a recovery goes unnoticed, and its inverse bounds what rescues
//! cost a dead model: at most ten calls a second, whatever the traffic. At 1 s (one probe a
//! second) the harder overload scenario still lost the recovery's first second of new
//! questions; at 100 ms it lost none, and the outage's calls per request rose from 0.09 to 0.32
//! (each request there with nowhere to go is tried once instead of retried five times, as it
//! would be without a breaker). Requests that have a stale entry or another model to go to are
//! never rescues: they are answered without the held model.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

/// Models tracked at most; past it, only a failure earns an entry, in a passing one's place.
const MAX_MODELS: usize = 256;
/// Answers kept for the failure-ratio test.
const WINDOW: usize = 32;
/// Share of failures among them needed to block.
const BLOCK_RATIO: f64 = 0.9;

/// What a breaker does to requests right now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BreakerState {
    /// Requests go through ("closed").
    Passing,
    /// Requests skip the upstream until the cooldown ends ("open").
    Blocking,
    /// One probe request is out; the rest skip the upstream ("half-open").
    Probing,
}

impl BreakerState {
    pub fn as_str(self) -> &'static str {
        match self {
            BreakerState::Passing => "passing",
            BreakerState::Blocking => "blocking",
            BreakerState::Probing => "probing",
        }
    }

    /// 0, 1, 2 for the metrics gauge.
    pub fn as_gauge(self) -> i64 {
        self as i64
    }
}

/// The breaker's answer to "may I call this model now?".
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    Pass,
    /// Go, as the one probe: the result decides whether the breaker passes again.
    Probe,
    /// Go, though the model is held: a request with nowhere else to go, at most one a
    /// `rescue_interval`. An answer closes the breaker; a failure changes nothing.
    Rescue,
    /// Skip the upstream; trying again makes sense in `retry_in`.
    Reject {
        retry_in: Duration,
        /// The failure that opened the breaker, so that the refusal names it.
        cause: Cause,
    },
}

/// What kind of failure a model's breaker counts: the refusal of a held model answers with the
/// kind that opened it (an overload as 529, never an overload it did not see).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cause {
    /// 529 `overloaded_error`.
    Overloaded,
    /// Another 5xx (or 408).
    ServerError,
    /// A timeout, or no connection.
    Unreachable,
}

impl Cause {
    /// The name the shared tier keeps a fleet's breaker under.
    pub fn as_str(self) -> &'static str {
        match self {
            Cause::Overloaded => "overloaded",
            Cause::ServerError => "server_error",
            Cause::Unreachable => "unreachable",
        }
    }

    /// The cause an [`Self::as_str`] name stands for (an unknown one: an overload).
    pub fn from_name(name: &str) -> Cause {
        match name {
            "server_error" => Cause::ServerError,
            "unreachable" => Cause::Unreachable,
            _ => Cause::Overloaded,
        }
    }
}

/// A breaker's turn that the other instances of a fleet must hear of
/// ([`Breakers::reporting_to`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Turn {
    /// This instance's breaker for the model blocked, for `cooldown`, for this cause.
    Opened {
        model: String,
        cause: Cause,
        cooldown: Duration,
    },
    /// This instance's probe (or rescue) was answered: the model passes again.
    Closed { model: String },
}

/// How an attempt went, as far as the breaker cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// The model answered (a 200, or a 4xx that is the request's fault).
    Answered,
    /// Overloaded, 5xx, timeout, no connection.
    Failed(Cause),
    /// Rate limited: says nothing about the model's health.
    Neutral,
}

#[derive(Debug)]
struct ModelBreaker {
    state: BreakerState,
    /// When `Blocking` ends, or when a `Probing` probe is given up for lost.
    until: Instant,
    consecutive_failures: u32,
    /// Last answers, newest at the back; true for a failure.
    recent: VecDeque<bool>,
    /// The latest failure: what opened the breaker when it blocks.
    cause: Cause,
    /// When the latest rescue was let through.
    rescued_at: Option<Instant>,
    /// Blocking because another instance's breaker blocks ([`Breakers::hold`]), not
    /// because of this instance's own failures.
    held_by_fleet: bool,
}

impl ModelBreaker {
    fn new(now: Instant) -> Self {
        ModelBreaker {
            state: BreakerState::Passing,
            until: now,
            consecutive_failures: 0,
            recent: VecDeque::with_capacity(WINDOW),
            cause: Cause::Overloaded,
            rescued_at: None,
            held_by_fleet: false,
        }
    }
}

/// Breakers of all models of one upstream.
#[derive(Debug)]
pub struct Breakers {
    failures: u32,
    cooldown: Duration,
    /// Time between two rescues of one held model; `None`: no rescues.
    rescue_interval: Option<Duration>,
    /// A std mutex: held for a map lookup and a few comparisons, never across an await.
    models: Mutex<HashMap<String, ModelBreaker>>,
    /// Where turns go for the fleet, when there is one.
    turns: Option<tokio::sync::mpsc::UnboundedSender<Turn>>,
}

impl Breakers {
    pub fn new(failures: u32, cooldown: Duration) -> Self {
        Breakers {
            failures: failures.max(1),
            cooldown,
            rescue_interval: None,
            models: Mutex::new(HashMap::new()),
            turns: None,
        }
    }

    /// Reports each breaker's own opening and closing to `turns`, for the other instances.
    pub fn reporting_to(mut self, turns: tokio::sync::mpsc::UnboundedSender<Turn>) -> Self {
        self.turns = Some(turns);
        self
    }

    /// Another instance's breaker blocks `model` until `until`: a passing breaker here
    /// blocks too, until `until + margin`, so that the instance that opened it, whose own
    /// cooldown ends first, is the fleet's one probe. A breaker already blocking or probing
    /// for its own failures keeps its own course.
    pub fn hold(&self, model: &str, cause: Cause, until: Instant, margin: Duration) {
        let mut models = self.models.lock().expect("breaker lock");
        if models.len() >= MAX_MODELS && !models.contains_key(model) {
            return;
        }
        let b = models
            .entry(model.to_owned())
            .or_insert_with(|| ModelBreaker::new(until));
        if b.state == BreakerState::Passing || b.held_by_fleet {
            b.state = BreakerState::Blocking;
            b.until = until + margin;
            b.cause = cause;
            b.held_by_fleet = true;
        }
    }

    /// The fleet no longer blocks `model` (its probe was answered): a breaker that blocks
    /// only because of the fleet passes again.
    pub fn release(&self, model: &str) {
        let mut models = self.models.lock().expect("breaker lock");
        if let Some(b) = models.get_mut(model) {
            if b.held_by_fleet && b.state == BreakerState::Blocking {
                pass_again(b);
            }
        }
    }

    /// The models whose breakers block only because of the fleet.
    pub fn held_by_fleet(&self) -> Vec<String> {
        let models = self.models.lock().expect("breaker lock");
        (models.iter())
            .filter(|(_, b)| b.held_by_fleet && b.state == BreakerState::Blocking)
            .map(|(name, _)| name.clone())
            .collect()
    }

    fn report(&self, turn: Turn) {
        if let Some(turns) = &self.turns {
            let _ = turns.send(turn); // the fleet's task ended with the engine
        }
    }

    /// Lets one request with nowhere else to go through a held model every `interval`
    /// ([`Self::admit_rescue`]); zero: never.
    pub fn rescuing_every(mut self, interval: Duration) -> Self {
        self.rescue_interval = (!interval.is_zero()).then_some(interval);
        self
    }

    /// A probe whose caller went away before the attempt ended (a cancelled request): nothing
    /// was learnt, so the next request may probe at once, instead of every request being
    /// refused until the abandoned probe's cooldown ends.
    pub fn abandon_probe(&self, model: &str, now: Instant) {
        let mut models = self.models.lock().expect("breaker lock");
        if let Some(b) = models.get_mut(model) {
            if b.state == BreakerState::Probing {
                b.until = now;
            }
        }
    }

    /// Whether a request for `model` may go upstream at `now`.
    pub fn admit(&self, model: &str, now: Instant) -> Admission {
        let mut models = self.models.lock().expect("breaker lock");
        let Some(b) = models.get_mut(model) else {
            return Admission::Pass;
        };
        match b.state {
            BreakerState::Passing => Admission::Pass,
            // A probe that never reported back (its caller went away) is replaced.
            BreakerState::Blocking | BreakerState::Probing if now >= b.until => {
                b.state = BreakerState::Probing;
                b.until = now + self.cooldown;
                Admission::Probe
            }
            BreakerState::Blocking => Admission::Reject {
                retry_in: b.until - now,
                cause: b.cause,
            },
            BreakerState::Probing => Admission::Reject {
                retry_in: Duration::from_secs(1),
                cause: b.cause,
            },
        }
    }

    /// [`Self::admit`] for a request that has nowhere else to go: where that would refuse, a
    /// [`Admission::Rescue`] if the model's last rescue is at least `rescue_interval` old.
    pub fn admit_rescue(&self, model: &str, now: Instant) -> Admission {
        let admission = self.admit(model, now);
        let (Admission::Reject { .. }, Some(interval)) = (admission, self.rescue_interval) else {
            return admission;
        };
        let mut models = self.models.lock().expect("breaker lock");
        let Some(b) = models.get_mut(model) else {
            return admission;
        };
        if b.held_by_fleet {
            return admission; // the instance whose breaker opened rescues for the fleet
        }
        match b.rescued_at {
            Some(at) if now < at + interval => admission,
            _ => {
                b.rescued_at = Some(now);
                Admission::Rescue
            }
        }
    }

    /// When the held `model`'s next rescue may go: `None` when it is not held, or rescues are
    /// off. A request that found the slot taken waits for the next one rather than fail at
    /// once: the rescue in flight may be the one that finds the model back.
    pub fn next_rescue(&self, model: &str, now: Instant) -> Option<Instant> {
        let interval = self.rescue_interval?;
        let Admission::Reject { .. } = self.admit(model, now) else {
            return None;
        };
        let models = self.models.lock().expect("breaker lock");
        let b = models.get(model).filter(|b| !b.held_by_fleet)?;
        Some((b.rescued_at? + interval).max(now))
    }

    /// Records how an attempt admitted by [`Self::admit`] went. Only the probe's own result
    /// (`admission` = [`Admission::Probe`]) decides a probing breaker: an attempt let through
    /// before the breaker blocked may finish late, and says nothing about the model now.
    /// `now` is when the attempt ended.
    pub fn record(&self, model: &str, admission: Admission, verdict: Verdict, now: Instant) {
        let probe = admission == Admission::Probe;
        let mut models = self.models.lock().expect("breaker lock");
        // Callers choose model names: past MAX_MODELS, only a failure earns a new entry, so
        // the map cannot be grown without bound by answers that say nothing. (Below it,
        // successes are kept from the first answer on: the failure ratio needs them.)
        let failed = matches!(verdict, Verdict::Failed(_));
        if models.len() >= MAX_MODELS && !models.contains_key(model) {
            // Full, and failures of new names must not grow it either (a thousand made-up model
            // names against a dead upstream): a failure takes the place of a passing entry,
            // which holds nothing a caller relies on; a blocking or probing one is never given
            // up. With none to give up, the new model goes untracked.
            let passing = models
                .iter()
                .find(|(_, b)| b.state == BreakerState::Passing)
                .map(|(name, _)| name.clone());
            match (failed, passing) {
                (true, Some(name)) => {
                    models.remove(&name);
                }
                _ => return,
            }
        }
        let b = models
            .entry(model.to_owned())
            .or_insert_with(|| ModelBreaker::new(now));
        let (was, until_was) = (b.state, b.until);
        if admission == Admission::Rescue && b.state != BreakerState::Passing {
            rescued(b, verdict);
        } else {
            self.judge(b, probe, verdict, now);
        }
        let turn = match (was, b.state) {
            (BreakerState::Passing, BreakerState::Passing) => return,
            (_, BreakerState::Passing) => Turn::Closed {
                model: model.to_owned(),
            },
            (_, BreakerState::Blocking) if b.until != until_was => Turn::Opened {
                model: model.to_owned(),
                cause: b.cause,
                cooldown: self.cooldown,
            },
            _ => return,
        };
        drop(models);
        self.report(turn);
    }

    /// Counts `verdict` into a breaker, blocking it when the failures say so.
    fn judge(&self, b: &mut ModelBreaker, probe: bool, verdict: Verdict, now: Instant) {
        let failed = matches!(verdict, Verdict::Failed(_));
        let probing = b.state == BreakerState::Probing;
        if probing && !probe {
            return;
        }
        match verdict {
            Verdict::Neutral if !probing => return,
            Verdict::Answered | Verdict::Neutral => {
                b.consecutive_failures = 0;
                if probing {
                    pass_again(b);
                }
            }
            Verdict::Failed(cause) => {
                b.consecutive_failures += 1;
                b.cause = cause;
            }
        }
        if b.recent.len() == WINDOW {
            b.recent.pop_front();
        }
        b.recent.push_back(failed);
        if failed && self.should_block(b) {
            b.state = BreakerState::Blocking;
            b.until = now + self.cooldown;
            b.consecutive_failures = 0;
            b.held_by_fleet = false;
        }
    }

    fn should_block(&self, b: &ModelBreaker) -> bool {
        if b.state == BreakerState::Probing {
            return true;
        }
        let failed = b.recent.iter().filter(|f| **f).count();
        b.state == BreakerState::Passing
            && b.consecutive_failures >= self.failures
            && failed as f64 >= BLOCK_RATIO * b.recent.len() as f64
    }

    /// The state of `model`'s breaker.
    pub fn state(&self, model: &str) -> BreakerState {
        let models = self.models.lock().expect("breaker lock");
        models.get(model).map_or(BreakerState::Passing, |b| b.state)
    }

    /// Every model seen, with its state (for metrics).
    pub fn states(&self) -> Vec<(String, BreakerState)> {
        let models = self.models.lock().expect("breaker lock");
        let mut out: Vec<_> = models.iter().map(|(m, b)| (m.clone(), b.state)).collect();
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }
}

/// A held model's rescue ended: an answer (or a rate limit, which an overloaded or dead model
/// does not send) closes the breaker; a failure tells it nothing new.
fn rescued(b: &mut ModelBreaker, verdict: Verdict) {
    match verdict {
        Verdict::Failed(cause) => b.cause = cause,
        Verdict::Answered | Verdict::Neutral => pass_again(b),
    }
}

/// Back to passing, with a fresh window: the failures that opened the breaker are over.
fn pass_again(b: &mut ModelBreaker) {
    b.state = BreakerState::Passing;
    b.held_by_fleet = false;
    b.consecutive_failures = 0;
    b.recent.clear();
}

#[cfg(test)]
mod tests {
    use super::*;

    const COOLDOWN: Duration = Duration::from_secs(30);

    #[tokio::test(start_paused = true)]
    async fn blocks_after_consecutive_failures_then_one_probe_decides() {
        let b = Breakers::new(5, COOLDOWN);
        for _ in 0..4 {
            assert_eq!(b.admit("a", Instant::now()), Admission::Pass);
            b.record(
                "a",
                Admission::Pass,
                Verdict::Failed(Cause::Overloaded),
                Instant::now(),
            );
        }
        assert_eq!(b.state("a"), BreakerState::Passing);
        b.record(
            "a",
            Admission::Pass,
            Verdict::Failed(Cause::Overloaded),
            Instant::now(),
        );
        assert_eq!(b.state("a"), BreakerState::Blocking);
        assert!(
            matches!(b.admit("a", Instant::now()), Admission::Reject { retry_in, .. } if retry_in <= COOLDOWN)
        );
        assert_eq!(
            b.admit("b", Instant::now()),
            Admission::Pass,
            "other models are not affected"
        );

        tokio::time::advance(COOLDOWN).await;
        assert_eq!(b.admit("a", Instant::now()), Admission::Probe);
        assert!(
            matches!(b.admit("a", Instant::now()), Admission::Reject { .. }),
            "only one probe"
        );
        // A late answer of a request let through before the breaker blocked decides nothing.
        b.record("a", Admission::Pass, Verdict::Answered, Instant::now());
        assert_eq!(b.state("a"), BreakerState::Probing);
        b.record(
            "a",
            Admission::Probe,
            Verdict::Failed(Cause::Overloaded),
            Instant::now(),
        );
        assert_eq!(
            b.state("a"),
            BreakerState::Blocking,
            "a failed probe blocks again"
        );

        tokio::time::advance(COOLDOWN).await;
        assert_eq!(b.admit("a", Instant::now()), Admission::Probe);
        b.record(
            "a",
            Admission::Pass,
            Verdict::Failed(Cause::Overloaded),
            Instant::now(),
        );
        assert_eq!(b.state("a"), BreakerState::Probing);
        b.record("a", Admission::Probe, Verdict::Answered, Instant::now());
        assert_eq!(b.state("a"), BreakerState::Passing);
        assert_eq!(b.admit("a", Instant::now()), Admission::Pass);
    }

    #[tokio::test(start_paused = true)]
    async fn a_model_answering_half_its_requests_is_not_abandoned() {
        let b = Breakers::new(5, COOLDOWN);
        // Runs of up to 8 failures between successes: 50% overall.
        for i in 0..2000u32 {
            let run = (i / 2) % 9;
            for _ in 0..run {
                b.record(
                    "a",
                    Admission::Pass,
                    Verdict::Failed(Cause::Overloaded),
                    Instant::now(),
                );
            }
            for _ in 0..run {
                b.record("a", Admission::Pass, Verdict::Answered, Instant::now());
            }
            assert_eq!(b.state("a"), BreakerState::Passing, "blocked at round {i}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn answers_before_the_first_failure_count_in_the_ratio() {
        let b = Breakers::new(5, COOLDOWN);
        for _ in 0..20 {
            b.record("a", Admission::Pass, Verdict::Answered, Instant::now());
        }
        for _ in 0..5 {
            b.record(
                "a",
                Admission::Pass,
                Verdict::Failed(Cause::Overloaded),
                Instant::now(),
            );
        }
        // Five in a row, but 5 of the last 25 answers: the model still answers.
        assert_eq!(b.state("a"), BreakerState::Passing);
    }

    #[tokio::test(start_paused = true)]
    async fn rate_limits_do_not_count() {
        let b = Breakers::new(2, COOLDOWN);
        for _ in 0..10 {
            b.record("a", Admission::Pass, Verdict::Neutral, Instant::now());
        }
        assert_eq!(b.state("a"), BreakerState::Passing);
    }

    #[tokio::test(start_paused = true)]
    async fn a_held_model_lets_one_rescue_through_an_interval_and_its_answer_closes_it() {
        let b = Breakers::new(1, COOLDOWN).rescuing_every(Duration::from_secs(1));
        let failed = Verdict::Failed(Cause::Overloaded);
        assert_eq!(
            b.admit_rescue("a", Instant::now()),
            Admission::Pass,
            "a passing model needs no rescue"
        );
        b.record("a", Admission::Pass, failed, Instant::now());
        assert_eq!(b.state("a"), BreakerState::Blocking);
        assert!(matches!(
            b.admit("a", Instant::now()),
            Admission::Reject { .. }
        ));
        assert_eq!(b.admit_rescue("a", Instant::now()), Admission::Rescue);
        assert!(
            matches!(
                b.admit_rescue("a", Instant::now()),
                Admission::Reject { .. }
            ),
            "one rescue an interval"
        );
        let taken = Instant::now();
        assert_eq!(
            b.next_rescue("a", taken),
            Some(taken + Duration::from_secs(1)),
            "a request that finds the slot taken learns when the next opens"
        );
        b.record("a", Admission::Rescue, failed, Instant::now());
        assert_eq!(
            b.state("a"),
            BreakerState::Blocking,
            "a failed rescue changes nothing"
        );
        assert!(matches!(
            b.admit("a", Instant::now()),
            Admission::Reject { retry_in, .. } if retry_in == COOLDOWN
        ));

        tokio::time::advance(Duration::from_secs(1)).await;
        assert_eq!(b.admit_rescue("a", Instant::now()), Admission::Rescue);
        b.record("a", Admission::Rescue, Verdict::Answered, Instant::now());
        assert_eq!(
            b.state("a"),
            BreakerState::Passing,
            "long before the cooldown"
        );
        assert_eq!(
            b.next_rescue("a", Instant::now()),
            None,
            "a passing model needs none"
        );
        assert_eq!(b.admit("a", Instant::now()), Admission::Pass);
    }

    #[tokio::test(start_paused = true)]
    async fn without_a_rescue_interval_a_held_model_is_held() {
        let b = Breakers::new(1, COOLDOWN).rescuing_every(Duration::ZERO);
        b.record(
            "a",
            Admission::Pass,
            Verdict::Failed(Cause::Overloaded),
            Instant::now(),
        );
        assert!(matches!(
            b.admit_rescue("a", Instant::now()),
            Admission::Reject { .. }
        ));
    }

    #[tokio::test(start_paused = true)]
    async fn a_lost_probe_is_replaced_after_a_cooldown() {
        let b = Breakers::new(1, COOLDOWN);
        b.record(
            "a",
            Admission::Pass,
            Verdict::Failed(Cause::Overloaded),
            Instant::now(),
        );
        tokio::time::advance(COOLDOWN).await;
        assert_eq!(b.admit("a", Instant::now()), Admission::Probe);
        tokio::time::advance(COOLDOWN).await;
        assert_eq!(b.admit("a", Instant::now()), Admission::Probe);
    }

    #[tokio::test(start_paused = true)]
    async fn a_refusal_names_the_failure_that_opened_the_breaker() {
        let b = Breakers::new(2, COOLDOWN);
        for cause in [Cause::Overloaded, Cause::Unreachable] {
            b.record("a", Admission::Pass, Verdict::Failed(cause), Instant::now());
        }
        assert!(matches!(
            b.admit("a", Instant::now()),
            Admission::Reject {
                cause: Cause::Unreachable,
                ..
            }
        ));
    }

    #[tokio::test(start_paused = true)]
    async fn made_up_model_names_cannot_grow_the_map_and_open_breakers_stay() {
        let b = Breakers::new(1, COOLDOWN);
        b.record(
            "real",
            Admission::Pass,
            Verdict::Failed(Cause::Overloaded),
            Instant::now(),
        );
        assert_eq!(b.state("real"), BreakerState::Blocking);
        for i in 0..1000 {
            let name = format!("made-up-{i}");
            let failure = Verdict::Failed(Cause::Unreachable);
            b.record(&name, Admission::Pass, failure, Instant::now());
        }
        assert!(
            b.states().len() <= MAX_MODELS,
            "{} entries",
            b.states().len()
        );
        assert_eq!(
            b.state("real"),
            BreakerState::Blocking,
            "an open breaker is kept"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn the_fleet_hears_of_openings_and_closings_and_its_holds_block_passing_breakers() {
        let (turns, mut heard) = tokio::sync::mpsc::unbounded_channel();
        let b = Breakers::new(1, COOLDOWN).reporting_to(turns);
        let failed = Verdict::Failed(Cause::Overloaded);
        b.record("a", Admission::Pass, failed, Instant::now());
        assert_eq!(
            heard.try_recv().unwrap(),
            Turn::Opened {
                model: "a".into(),
                cause: Cause::Overloaded,
                cooldown: COOLDOWN
            }
        );

        // Another instance holds b: b blocks here, a margin longer, as what opened it there.
        let margin = Duration::from_secs(1);
        let there = Instant::now() + Duration::from_secs(10);
        b.hold("b", Cause::ServerError, there, margin);
        assert_eq!(
            b.admit("b", Instant::now()),
            Admission::Reject {
                retry_in: Duration::from_secs(11),
                cause: Cause::ServerError
            }
        );
        assert_eq!(b.held_by_fleet(), ["b"]);
        let rescuing = Breakers::new(1, COOLDOWN).rescuing_every(Duration::from_millis(100));
        rescuing.hold("b", Cause::Overloaded, there, margin);
        assert!(
            matches!(
                rescuing.admit_rescue("b", Instant::now()),
                Admission::Reject { .. }
            ),
            "the instance whose breaker opened rescues for the fleet"
        );
        assert_eq!(rescuing.next_rescue("b", Instant::now()), None);
        // a blocks for its own failures and keeps its own course.
        b.hold("a", Cause::ServerError, there, margin);
        assert!(matches!(
            b.admit("a", Instant::now()),
            Admission::Reject { retry_in, cause: Cause::Overloaded } if retry_in == COOLDOWN
        ));
        b.release("b");
        assert_eq!(b.state("b"), BreakerState::Passing);
        assert!(
            heard.try_recv().is_err(),
            "a hold's end is not this instance's turn"
        );

        tokio::time::advance(COOLDOWN).await;
        assert_eq!(b.admit("a", Instant::now()), Admission::Probe);
        b.record("a", Admission::Probe, Verdict::Answered, Instant::now());
        assert_eq!(
            heard.try_recv().unwrap(),
            Turn::Closed { model: "a".into() }
        );
    }
}
