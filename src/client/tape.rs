//! A live stream's bytes, recorded as the upstream sends them and read by each caller at its
//! own pace. The relay writes without ever waiting for a reader, so a caller that reads
//! slowly (or not at all) never holds the upstream's connection or a concurrency permit: the
//! upstream is read at its pace, the answer stored, and the permit given back when it ends.
//! Identical streamed requests that join the flight read the same tape from its start, live.
//!
//! The tape is bounded by the answer (a Message's stream: at most a few megabytes); past
//! [`MAX_TAPE_BYTES`] its readers are cut off with an error while the relay goes on reading
//! the upstream to store the answer. A reader left behind by its caller goes away with it:
//! the proxy disconnects a caller that takes no bytes for `server.write_timeout`.

use std::io;
use std::sync::{Arc, Mutex};

use bytes::Bytes;

use super::stream::EventStream;

/// Most bytes one tape holds for its readers.
pub(super) const MAX_TAPE_BYTES: usize = 64 * 1024 * 1024;

/// See the module's doc.
#[derive(Default)]
pub(crate) struct Tape {
    state: Mutex<State>,
    grew: tokio::sync::Notify,
}

#[derive(Default)]
struct State {
    chunks: Vec<Bytes>,
    bytes: usize,
    /// How the stream ended: `Err` with why, for a stream cut short.
    end: Option<Result<(), String>>,
}

/// What a reader finds at its place on the tape.
enum At {
    Chunk(Bytes),
    End(Result<(), String>),
    NotYet,
}

impl Tape {
    pub(super) fn new() -> Arc<Self> {
        Arc::new(Tape::default())
    }

    /// Records a chunk for every reader, now and later. Past [`MAX_TAPE_BYTES`] the tape ends
    /// for its readers instead.
    pub(super) fn push(&self, chunk: Bytes) {
        let mut state = self.state.lock().expect("tape lock");
        if state.end.is_some() {
            return;
        }
        state.bytes += chunk.len();
        if state.bytes > MAX_TAPE_BYTES {
            state.end = Some(Err(format!(
                "the answer is larger than {MAX_TAPE_BYTES} bytes"
            )));
        } else {
            state.chunks.push(chunk);
        }
        drop(state);
        self.grew.notify_waiters();
    }

    /// Ends the tape: readers finish once they have read everything before this.
    pub(super) fn end(&self, result: Result<(), String>) {
        let mut state = self.state.lock().expect("tape lock");
        state.end.get_or_insert(result);
        drop(state);
        self.grew.notify_waiters();
    }

    fn at(&self, place: usize) -> At {
        let state = self.state.lock().expect("tape lock");
        match (state.chunks.get(place), &state.end) {
            (Some(chunk), _) => At::Chunk(chunk.clone()),
            (None, Some(end)) => At::End(end.clone()),
            (None, None) => At::NotYet,
        }
    }

    /// The tape from its start, as a caller's event stream: chunks as they are recorded, then
    /// the end (an I/O error for a stream cut short, so that the caller sees it cut too).
    pub(super) fn reader(self: &Arc<Self>) -> EventStream {
        let start = (self.clone(), 0usize);
        Box::pin(futures_util::stream::unfold(
            Some(start),
            |place| async move {
                let (tape, next) = place?;
                let found = loop {
                    // Registered before looking, so that a chunk pushed in between wakes it.
                    let grew = tape.grew.notified();
                    tokio::pin!(grew);
                    grew.as_mut().enable();
                    match tape.at(next) {
                        At::NotYet => grew.await,
                        found => break found,
                    }
                };
                match found {
                    At::Chunk(chunk) => Some((Ok(chunk), Some((tape, next + 1)))),
                    At::End(Err(why)) => Some((Err(io::Error::other(why)), None)),
                    At::End(Ok(())) | At::NotYet => None,
                }
            },
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::StreamExt;

    #[tokio::test]
    async fn readers_at_any_pace_read_the_whole_tape() {
        let tape = Tape::new();
        let early = tape.reader();
        tape.push(Bytes::from_static(b"a"));
        let reading = tokio::spawn(early.collect::<Vec<_>>());
        tape.push(Bytes::from_static(b"b"));
        tape.end(Ok(()));
        let late: Vec<_> = tape.reader().collect().await;
        for read in [reading.await.unwrap(), late] {
            let bytes: Vec<Bytes> = read.into_iter().map(Result::unwrap).collect();
            assert_eq!(bytes, [Bytes::from_static(b"a"), Bytes::from_static(b"b")]);
        }
    }

    #[tokio::test]
    async fn a_stream_cut_short_is_an_error_for_every_reader() {
        let tape = Tape::new();
        tape.push(Bytes::from_static(b"event: message_start\n"));
        tape.end(Err("upstream broke off".into()));
        let read: Vec<_> = tape.reader().collect().await;
        assert_eq!(read.len(), 2);
        assert!(read[0].is_ok());
        assert!(read[1].is_err());
    }
}
