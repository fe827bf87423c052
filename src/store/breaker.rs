//! The store's circuit breaker: after a run of failed calls, stop waiting on a store that does not
//! answer, and let one call at a time find out whether it is back.
//!
//! ```text
//!   Closed ── `failures` timeouts/unavailable in a row ──> Open { until: now + open_for }
//!   Open ── a call after `until` ──> HalfOpen (that call is the one probe)
//!   HalfOpen ── probe answered ──> Closed        HalfOpen ── probe failed ──> Open { until }
//! ```
//!
//! While open, and while the probe is out, every other call is refused at once, without touching
//! the network. A store that never answered a call is not "failing": only timeouts and lost or
//! refused connections count; an answer the client did not expect (a protocol error) means the
//! store is there.
//!
//! The breaker only keeps the state; [`super::guarded::GuardedStore`] puts it in front of a store.
//! Time is tokio's clock, so the transitions are tested with paused time.

use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

/// When the breaker opens, and for how long.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BreakerSettings {
    /// Failed calls in a row that open the breaker.
    pub failures: u32,
    /// How long it stays open before one probe call may go through.
    pub open_for: Duration,
}

impl BreakerSettings {
    /// Default [`BreakerSettings::failures`].
    pub const DEFAULT_FAILURES: u32 = 5;
    /// Default [`BreakerSettings::open_for`]: short enough that a recovered store is used again
    /// within a second (open_for plus one probe), long enough that a store that is down costs a
    /// probe a couple of times a second, not a timeout per request.
    pub const DEFAULT_OPEN_FOR: Duration = Duration::from_millis(500);
}

impl Default for BreakerSettings {
    fn default() -> Self {
        Self {
            failures: Self::DEFAULT_FAILURES,
            open_for: Self::DEFAULT_OPEN_FOR,
        }
    }
}

/// Where the breaker is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum State {
    /// Calls go through; `failures` is the current run of failed ones.
    Closed { failures: u32 },
    /// Calls are refused until `until`; the first one after it is the probe.
    Open { until: Instant },
    /// The probe is out; every other call is refused until it answers.
    HalfOpen,
}

/// [`State`] without its data: the gauge's value and the transitions' label.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    Closed = 0,
    Open = 1,
    HalfOpen = 2,
}

impl Phase {
    /// Every phase, for metrics created at zero.
    pub const ALL: [Phase; 3] = [Phase::Closed, Phase::Open, Phase::HalfOpen];

    /// The metrics label and the word `/readyz` shows.
    pub fn name(self) -> &'static str {
        match self {
            Phase::Closed => "closed",
            Phase::Open => "open",
            Phase::HalfOpen => "half_open",
        }
    }
}

impl State {
    pub fn phase(&self) -> Phase {
        match self {
            State::Closed { .. } => Phase::Closed,
            State::Open { .. } => Phase::Open,
            State::HalfOpen => Phase::HalfOpen,
        }
    }
}

/// What kind of call the breaker let through.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pass {
    /// An ordinary call, with the breaker closed.
    Call,
    /// The one probe of a half-open breaker: its result decides.
    Probe,
}

/// Refused: the breaker is open (or its probe is out).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Refused;

/// A change of phase, for metrics and logs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Transition {
    pub from: Phase,
    pub to: Phase,
}

/// One store's breaker.
#[derive(Debug)]
pub struct Breaker {
    settings: BreakerSettings,
    /// Behind a plain mutex: held for a few instructions, never across an await.
    state: Mutex<State>,
}

impl Breaker {
    pub fn new(settings: BreakerSettings) -> Self {
        Self {
            settings,
            state: Mutex::new(State::Closed { failures: 0 }),
        }
    }

    pub fn settings(&self) -> BreakerSettings {
        self.settings
    }

    pub fn state(&self) -> State {
        *self.lock()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // The state is one small value, whole after any panic.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Whether a call may go out now, and as what.
    pub fn admit(&self, now: Instant) -> (Result<Pass, Refused>, Option<Transition>) {
        let mut state = self.lock();
        match *state {
            State::Closed { .. } => (Ok(Pass::Call), None),
            State::Open { until } if now < until => (Err(Refused), None),
            State::Open { .. } => {
                *state = State::HalfOpen;
                (
                    Ok(Pass::Probe),
                    Some(transition(Phase::Open, Phase::HalfOpen)),
                )
            }
            State::HalfOpen => (Err(Refused), None),
        }
    }

    /// Records how a call that was let through ended: `answered` when the store answered
    /// (whatever it said), false for a timeout or a lost connection.
    pub fn record(&self, pass: Pass, answered: bool, now: Instant) -> Option<Transition> {
        let mut state = self.lock();
        let from = state.phase();
        let next = match (pass, *state, answered) {
            (Pass::Probe, State::HalfOpen, true) => State::Closed { failures: 0 },
            (Pass::Probe, State::HalfOpen, false) => self.open(now),
            (Pass::Call, State::Closed { .. }, true) => State::Closed { failures: 0 },
            (Pass::Call, State::Closed { failures }, false) => {
                let failures = failures.saturating_add(1);
                if failures >= self.settings.failures {
                    self.open(now)
                } else {
                    State::Closed { failures }
                }
            }
            // A call let through before the breaker opened says nothing the probe does not.
            (Pass::Call, other, _) => other,
            // Cannot happen (only a half-open breaker hands out a probe, and only it ends one);
            // keep the state.
            (Pass::Probe, other, _) => other,
        };
        *state = next;
        (next.phase() != from).then(|| transition(from, next.phase()))
    }

    /// The probe went away without an answer (its caller was cancelled): the next call probes.
    pub fn probe_dropped(&self, now: Instant) -> Option<Transition> {
        let mut state = self.lock();
        if *state != State::HalfOpen {
            return None;
        }
        *state = State::Open { until: now };
        Some(transition(Phase::HalfOpen, Phase::Open))
    }

    fn open(&self, now: Instant) -> State {
        State::Open {
            until: now + self.settings.open_for,
        }
    }
}

fn transition(from: Phase, to: Phase) -> Transition {
    Transition { from, to }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    fn breaker() -> Breaker {
        Breaker::new(BreakerSettings {
            failures: 3,
            open_for: 500 * MS,
        })
    }

    /// Fails `n` calls in a row.
    fn fail(breaker: &Breaker, n: u32) -> Vec<Transition> {
        (0..n)
            .filter_map(|_| {
                let (pass, _) = breaker.admit(Instant::now());
                breaker.record(pass.expect("admitted"), false, Instant::now())
            })
            .collect()
    }

    #[tokio::test(start_paused = true)]
    async fn it_opens_after_the_configured_failures_in_a_row_and_not_before() {
        let breaker = breaker();
        assert!(fail(&breaker, 2).is_empty());
        assert_eq!(breaker.state(), State::Closed { failures: 2 });
        assert_eq!(
            fail(&breaker, 1),
            vec![transition(Phase::Closed, Phase::Open)]
        );
        assert_eq!(breaker.state().phase(), Phase::Open);
        assert_eq!(breaker.admit(Instant::now()).0, Err(Refused));
    }

    #[tokio::test(start_paused = true)]
    async fn an_answer_in_between_starts_the_count_again() {
        let breaker = breaker();
        fail(&breaker, 2);
        let (pass, _) = breaker.admit(Instant::now());
        assert_eq!(breaker.record(pass.unwrap(), true, Instant::now()), None);
        fail(&breaker, 2);
        assert_eq!(breaker.state(), State::Closed { failures: 2 });
    }

    #[tokio::test(start_paused = true)]
    async fn while_open_calls_are_refused_until_open_for_has_passed() {
        let breaker = breaker();
        fail(&breaker, 3);
        tokio::time::advance(499 * MS).await;
        assert_eq!(breaker.admit(Instant::now()).0, Err(Refused));
        tokio::time::advance(MS).await;
        let (pass, change) = breaker.admit(Instant::now());
        assert_eq!(pass, Ok(Pass::Probe));
        assert_eq!(change, Some(transition(Phase::Open, Phase::HalfOpen)));
    }

    #[tokio::test(start_paused = true)]
    async fn half_open_lets_exactly_one_probe_through() {
        let breaker = breaker();
        fail(&breaker, 3);
        tokio::time::advance(500 * MS).await;
        let passes: Vec<_> = (0..10).map(|_| breaker.admit(Instant::now()).0).collect();
        assert_eq!(passes[0], Ok(Pass::Probe));
        assert!(passes[1..].iter().all(|pass| *pass == Err(Refused)));
        assert_eq!(breaker.state(), State::HalfOpen);
    }

    #[tokio::test(start_paused = true)]
    async fn a_probe_that_answers_closes_the_breaker() {
        let breaker = breaker();
        fail(&breaker, 3);
        tokio::time::advance(500 * MS).await;
        let (pass, _) = breaker.admit(Instant::now());
        assert_eq!(
            breaker.record(pass.unwrap(), true, Instant::now()),
            Some(transition(Phase::HalfOpen, Phase::Closed))
        );
        assert_eq!(breaker.state(), State::Closed { failures: 0 });
        assert_eq!(breaker.admit(Instant::now()).0, Ok(Pass::Call));
    }

    #[tokio::test(start_paused = true)]
    async fn a_probe_that_fails_opens_it_again_for_open_for() {
        let breaker = breaker();
        fail(&breaker, 3);
        tokio::time::advance(500 * MS).await;
        let (pass, _) = breaker.admit(Instant::now());
        assert_eq!(
            breaker.record(pass.unwrap(), false, Instant::now()),
            Some(transition(Phase::HalfOpen, Phase::Open))
        );
        tokio::time::advance(499 * MS).await;
        assert_eq!(breaker.admit(Instant::now()).0, Err(Refused));
        tokio::time::advance(MS).await;
        assert_eq!(breaker.admit(Instant::now()).0, Ok(Pass::Probe));
    }

    #[tokio::test(start_paused = true)]
    async fn calls_let_through_before_it_opened_do_not_decide_anything() {
        let breaker = breaker();
        // Five calls go out together; three fail and open the breaker, then the other two end.
        let passes: Vec<_> = (0..5).map(|_| breaker.admit(Instant::now()).0).collect();
        for pass in &passes[..3] {
            breaker.record(pass.unwrap(), false, Instant::now());
        }
        assert_eq!(breaker.state().phase(), Phase::Open);
        assert_eq!(
            breaker.record(passes[3].unwrap(), true, Instant::now()),
            None
        );
        assert_eq!(
            breaker.record(passes[4].unwrap(), false, Instant::now()),
            None
        );
        assert_eq!(breaker.state().phase(), Phase::Open);
    }

    #[tokio::test(start_paused = true)]
    async fn a_dropped_probe_lets_the_next_call_probe_at_once() {
        let breaker = breaker();
        fail(&breaker, 3);
        tokio::time::advance(500 * MS).await;
        assert_eq!(breaker.admit(Instant::now()).0, Ok(Pass::Probe));
        assert_eq!(
            breaker.probe_dropped(Instant::now()),
            Some(transition(Phase::HalfOpen, Phase::Open))
        );
        assert_eq!(breaker.admit(Instant::now()).0, Ok(Pass::Probe));
    }
}
