//! Breakers across instances: when one instance's breaker blocks a model, every instance
//! sharing its tier blocks it, and one probe decides for the fleet.
//!
//! The instance whose breaker opened writes `{prefix}b:{model}` (the cause, expiring with its
//! cooldown) and deletes it when its probe is answered. Every instance reads the fleet's held
//! models every [`SYNC_EVERY`] and holds them too ([`Breakers::hold`]) — for the time the key
//! has left plus [`MARGIN`], so that the instance that opened the breaker, whose own cooldown
//! ends first, is the one that probes; the others pass again when the key is gone. If that
//! instance dies meanwhile, the others' holds end a margin later and each probes on its own,
//! which is what an instance without a fleet does. A held model refuses at once, as a local
//! breaker does: the fleet's state is read in the background, never on the request path.
//!
//! Rescues ([`Breakers::admit_rescue`]) are the opener's too: an instance that holds a model
//! because of the fleet refuses at once, so the fleet tries a held model at most once a
//! `rescue_interval`, as one instance would, and a recovery the opener's rescue finds
//! releases every instance within a sync.

use std::sync::{Arc, Weak};
use std::time::Duration;

use tokio::sync::mpsc::UnboundedReceiver;
use tokio::time::Instant;

use super::Engine;
use crate::cache::SharedTier;
use crate::upstream::breaker::{Cause, Turn};

/// How often an instance reads the fleet's held models.
pub const SYNC_EVERY: Duration = Duration::from_millis(250);
/// How much longer than the fleet's key a hold lasts (see the module's doc): several syncs,
/// so that the opener's next verdict (a failed probe writes the key again) is seen in time.
pub const MARGIN: Duration = Duration::from_secs(1);

/// Starts the task that keeps `engine`'s breakers in step with the fleet's; it ends with the
/// engine.
pub(super) fn spawn(engine: &Arc<Engine>, shared: Arc<SharedTier>, turns: UnboundedReceiver<Turn>) {
    tokio::spawn(run(Arc::downgrade(engine), shared, turns));
}

async fn run(engine: Weak<Engine>, shared: Arc<SharedTier>, mut turns: UnboundedReceiver<Turn>) {
    let mut tick = tokio::time::interval(SYNC_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            turn = turns.recv() => match turn {
                Some(turn) => tell(&shared, turn).await,
                None => return, // the engine is gone
            },
            _ = tick.tick() => {
                let Some(engine) = engine.upgrade() else { return };
                sync(&engine, &shared).await;
            }
        }
    }
}

/// Writes one of this instance's breaker turns to the fleet.
async fn tell(shared: &Arc<SharedTier>, turn: Turn) {
    match turn {
        Turn::Opened {
            model,
            cause,
            cooldown,
        } => shared.open_breaker(&model, cause.as_str(), cooldown).await,
        Turn::Closed { model } => shared.close_breaker(&model).await,
    }
}

/// Holds what the fleet holds; releases what it no longer does. A tier that does not answer
/// changes nothing (holds end by themselves).
async fn sync(engine: &Engine, shared: &Arc<SharedTier>) {
    let Some(held) = shared.breakers().await else {
        return;
    };
    let now = Instant::now();
    for (model, cause, left) in &held {
        (engine.breakers).hold(model, Cause::from_name(cause), now + *left, MARGIN);
    }
    for model in engine.breakers.held_by_fleet() {
        if !held.iter().any(|(m, _, _)| *m == model) {
            engine.breakers.release(&model);
        }
    }
}
