//! Ending what is in flight to a capsule that is killed or paused. Its VM is gone, so
//! the guest never closes those connections: without this, a process output stream or
//! a file watch would hang until the client's own deadline.
//!
//! Every proxied request watches its capsule's [`Ended`] signal. A request still
//! waiting for its answer gets the proxy's "sandbox not found" error; a Connect stream
//! (envd's process, PTY and watch streams) is closed with a Connect end-of-stream
//! message carrying code `unavailable` and that message, which the E2B SDK reports as
//! `SandboxNotRunningException`; any other body, and upgraded connections, are cut off.

use axum::body::Body;
use bytes::{BufMut, Bytes, BytesMut};
use http_body::{Body as HttpBody, Frame, SizeHint};
use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::sync::watch;

/// Why a capsule's traffic ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reason {
    /// Destroyed: its last end, the capsule is forgotten.
    Killed,
    /// Paused: it may come back, in the next epoch.
    Paused,
}

impl std::fmt::Display for Reason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Reason::Killed => "killed",
            Reason::Paused => "paused",
        })
    }
}

/// One signal per capsule with traffic in flight, and each capsule's epoch: the number
/// of times its traffic was ended. The proxy's pooled connections are keyed by it, so a
/// connection to a guest from before a pause is never reused after the resume (a guest
/// booted afresh from its disk would reset it).
///
/// A request watches its capsule before it looks the capsule up, so an end that comes
/// after the lookup always reaches it; a capsule killed before the watch is remembered
/// for a while (capsule ids are never reused), so its watch starts out ended.
#[derive(Debug, Clone, Default)]
pub struct LiveStreams {
    inner: Arc<Inner>,
}

/// What ends a capsule's requests, with the reason.
type Signal = watch::Sender<Option<Reason>>;

#[derive(Debug)]
struct Inner {
    /// Each capsule's signal, numbered so a watcher knows its own.
    signals: Mutex<HashMap<String, (u64, Signal)>>,
    next_signal: std::sync::atomic::AtomicU64,
    epochs: Mutex<HashMap<String, u64>>,
    killed: moka::sync::Cache<String, ()>,
}

impl Default for Inner {
    fn default() -> Self {
        Inner {
            signals: Mutex::default(),
            next_signal: std::sync::atomic::AtomicU64::new(0),
            epochs: Mutex::default(),
            killed: moka::sync::Cache::builder()
                .max_capacity(100_000)
                .time_to_live(KILLED_REMEMBERED)
                .build(),
        }
    }
}

/// How long a killed capsule's end is remembered: far longer than any teardown, after
/// which its row says it is stopped.
const KILLED_REMEMBERED: Duration = Duration::from_secs(600);

impl LiveStreams {
    /// The signal a request to `capsule` watches, and the epoch the request is in.
    pub fn watch(&self, capsule: &str) -> Ended {
        if self.inner.killed.contains_key(capsule) {
            let (tx, rx) = watch::channel(Some(Reason::Killed));
            drop(tx);
            return Ended {
                rx,
                epoch: 0,
                owner: None,
            };
        }
        // The epoch is read under the signals' lock, which `end` takes after it
        // moves the epoch on: a watch never pairs an old epoch with a fresh signal.
        let Ok(mut m) = self.inner.signals.lock() else {
            // A poisoned map: this request is not cut off early (it still ends when
            // the guest's connection does).
            return Ended {
                rx: watch::channel(None).1,
                epoch: self.epoch(capsule),
                owner: None,
            };
        };
        let (signal, tx) = m.entry(capsule.to_string()).or_insert_with(|| {
            let n = self
                .inner
                .next_signal
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            (n, watch::channel(None).0)
        });
        Ended {
            rx: tx.subscribe(),
            epoch: self.epoch(capsule),
            owner: Some((self.inner.clone(), capsule.to_string(), *signal)),
        }
    }

    /// `capsule`'s epoch (0 until its traffic is first ended).
    pub fn epoch(&self, capsule: &str) -> u64 {
        self.inner
            .epochs
            .lock()
            .ok()
            .and_then(|m| m.get(capsule).copied())
            .unwrap_or(0)
    }

    /// Ends every request and stream in flight to `capsule` and starts its next epoch
    /// (a kill is its last: it is forgotten, and later watches start out ended).
    pub fn end(&self, capsule: &str, why: Reason) {
        if why == Reason::Killed {
            self.inner.killed.insert(capsule.to_string(), ());
        }
        if let Ok(mut m) = self.inner.epochs.lock() {
            if why == Reason::Killed {
                m.remove(capsule);
            } else {
                *m.entry(capsule.to_string()).or_insert(0) += 1;
            }
        }
        let sender = self
            .inner
            .signals
            .lock()
            .ok()
            .and_then(|mut m| m.remove(capsule));
        if let Some((_, tx)) = sender {
            tracing::debug!(
                capsule,
                %why,
                receivers = tx.receiver_count(),
                "ending proxied traffic"
            );
            let _ = tx.send(Some(why));
        }
    }

    /// A kill that did not happen (its host refused or could not be reached): later
    /// requests to `capsule` are served again.
    pub fn revive(&self, capsule: &str) {
        self.inner.killed.invalidate(capsule);
    }

    /// Capsules with a signal (for tests and leak checks).
    pub fn len(&self) -> usize {
        self.inner.signals.lock().map(|m| m.len()).unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A request's view of its capsule's signal. The last watcher of a signal that never
/// fired removes it when dropped.
#[derive(Debug)]
pub struct Ended {
    rx: watch::Receiver<Option<Reason>>,
    epoch: u64,
    /// Where its signal is kept, and its number.
    owner: Option<(Arc<Inner>, String, u64)>,
}

impl Ended {
    /// The capsule's epoch when the watch began.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// Resolves when the capsule's traffic is ended, with the reason. A signal whose
    /// sender went away without a reason never resolves: nothing ended it.
    pub async fn wait(&mut self) -> Reason {
        loop {
            // Copied out, so no borrow of the channel is held across an await.
            let current = *self.rx.borrow_and_update();
            if let Some(why) = current {
                return why;
            }
            if self.rx.changed().await.is_err() {
                return std::future::pending().await;
            }
        }
    }
}

impl Drop for Ended {
    fn drop(&mut self) {
        let Some((inner, capsule, signal)) = self.owner.take() else {
            return;
        };
        let Ok(mut m) = inner.signals.lock() else {
            return;
        };
        // Under the lock no watch can subscribe meanwhile; `self.rx` is still alive,
        // so a count of one means no one else watches this signal.
        if m.get(&capsule)
            .is_some_and(|(n, tx)| *n == signal && tx.receiver_count() <= 1)
        {
            m.remove(&capsule);
        }
    }
}

/// Where a Connect stream's envelope framing is (1 flag byte, 4-byte big-endian
/// length, payload): only between envelopes can an end-of-stream message be added.
#[derive(Debug, Default)]
struct Envelopes {
    header: [u8; 5],
    header_len: usize,
    payload_left: u64,
}

impl Envelopes {
    fn feed(&mut self, mut data: &[u8]) {
        while !data.is_empty() {
            if self.payload_left > 0 {
                let n = usize::try_from(self.payload_left)
                    .unwrap_or(usize::MAX)
                    .min(data.len());
                self.payload_left -= n as u64;
                data = &data[n..];
                continue;
            }
            let n = (5 - self.header_len).min(data.len());
            self.header[self.header_len..self.header_len + n].copy_from_slice(&data[..n]);
            self.header_len += n;
            data = &data[n..];
            if self.header_len == 5 {
                let len = [
                    self.header[1],
                    self.header[2],
                    self.header[3],
                    self.header[4],
                ];
                self.payload_left = u64::from(u32::from_be_bytes(len));
                self.header_len = 0;
            }
        }
    }

    fn at_boundary(&self) -> bool {
        self.header_len == 0 && self.payload_left == 0
    }
}

/// A Connect end-of-stream envelope (flag 0x02) with an `unavailable` error.
fn end_of_stream(message: &str) -> Bytes {
    let json =
        serde_json::json!({"error": {"code": "unavailable", "message": message}}).to_string();
    let mut b = BytesMut::with_capacity(5 + json.len());
    b.put_u8(0x02);
    b.put_u32(u32::try_from(json.len()).unwrap_or(u32::MAX));
    b.put_slice(json.as_bytes());
    b.freeze()
}

/// A proxied response body that ends when its capsule's traffic does.
pub struct CutBody {
    inner: Body,
    ended: Pin<Box<dyn Future<Output = Reason> + Send>>,
    capsule: String,
    connect: Option<Envelopes>,
    done: bool,
}

impl CutBody {
    /// `connect`: the body is a Connect stream (`application/connect+…`).
    pub fn new(inner: Body, mut ended: Ended, capsule: String, connect: bool) -> Self {
        CutBody {
            inner,
            ended: Box::pin(async move { ended.wait().await }),
            capsule,
            connect: connect.then(Envelopes::default),
            done: false,
        }
    }
}

impl HttpBody for CutBody {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = &mut *self;
        if this.done {
            return Poll::Ready(None);
        }
        if let Poll::Ready(why) = this.ended.as_mut().poll(cx) {
            this.done = true;
            // E2B's proxy's words for a sandbox that is gone; the SDK keys on them.
            let message = format!("The sandbox {} was not found: it was {why}", this.capsule);
            return Poll::Ready(Some(match &this.connect {
                Some(env) if env.at_boundary() => Ok(Frame::data(end_of_stream(&message))),
                _ => Err(axum::Error::new(std::io::Error::new(
                    std::io::ErrorKind::ConnectionAborted,
                    message,
                ))),
            }));
        }
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let (Some(env), Some(data)) = (this.connect.as_mut(), frame.data_ref()) {
                    env.feed(data);
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(None) => {
                this.done = true;
                Poll::Ready(None)
            }
            other => other,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.done
    }

    fn size_hint(&self) -> SizeHint {
        if self.connect.is_some() {
            SizeHint::default()
        } else {
            self.inner.size_hint()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    fn envelope(flags: u8, payload: &[u8]) -> Vec<u8> {
        let mut v = vec![flags];
        v.extend_from_slice(&u32::try_from(payload.len()).unwrap().to_be_bytes());
        v.extend_from_slice(payload);
        v
    }

    #[test]
    fn envelope_boundaries_across_chunks() {
        let mut e = Envelopes::default();
        assert!(e.at_boundary());
        let a = envelope(0, b"hello");
        e.feed(&a[..3]);
        assert!(!e.at_boundary());
        e.feed(&a[3..7]);
        assert!(!e.at_boundary());
        e.feed(&a[7..]);
        assert!(e.at_boundary());
        let two = [envelope(0, b""), envelope(0, b"xy")].concat();
        e.feed(&two);
        assert!(e.at_boundary());
    }

    #[tokio::test]
    async fn a_connect_stream_ends_with_an_unavailable_error() {
        let streams = LiveStreams::default();
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, std::io::Error>>(4);
        let inner = Body::from_stream(tokio_stream_from(rx));
        let mut body = CutBody::new(inner, streams.watch("cl-a"), "cl-a".into(), true);
        tx.send(Ok(Bytes::from(envelope(0, b"{\"x\":1}"))))
            .await
            .unwrap();
        let first = body.frame().await.unwrap().unwrap().into_data().unwrap();
        assert_eq!(&first[5..], b"{\"x\":1}");
        assert_eq!(streams.len(), 1);
        streams.end("cl-a", Reason::Killed);
        assert!(streams.is_empty());
        let last = body.frame().await.unwrap().unwrap().into_data().unwrap();
        assert_eq!(last[0], 0x02);
        let v: serde_json::Value = serde_json::from_slice(&last[5..]).unwrap();
        assert_eq!(v["error"]["code"], "unavailable");
        let msg = v["error"]["message"].as_str().unwrap();
        assert!(
            msg.contains("was not found") && msg.contains("killed"),
            "{msg}"
        );
        assert!(body.frame().await.is_none());
        drop(tx);
    }

    #[tokio::test]
    async fn other_bodies_are_cut_off_and_other_capsules_untouched() {
        let streams = LiveStreams::default();
        let (_tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, std::io::Error>>(1);
        let mut cut = CutBody::new(
            Body::from_stream(tokio_stream_from(rx)),
            streams.watch("cl-a"),
            "cl-a".into(),
            false,
        );
        let mut other = streams.watch("cl-b");
        streams.end("cl-a", Reason::Paused);
        assert!(cut.frame().await.unwrap().is_err());
        assert!(
            tokio::time::timeout(std::time::Duration::from_millis(50), other.wait())
                .await
                .is_err()
        );
        // A new request after the end watches a fresh signal, in the next epoch.
        assert_eq!((streams.epoch("cl-a"), streams.epoch("cl-b")), (1, 0));
        let mut again = streams.watch("cl-a");
        streams.end("cl-a", Reason::Killed);
        assert_eq!(again.wait().await, Reason::Killed);
        assert_eq!(streams.epoch("cl-a"), 0);
    }

    #[tokio::test]
    async fn a_watch_after_a_kill_starts_ended_and_watches_leave_nothing_behind() {
        let streams = LiveStreams::default();
        // A request that looked its capsule up and gave up leaves no signal.
        drop(streams.watch("cl-a"));
        assert!(streams.is_empty());
        let first = streams.watch("cl-a");
        let second = streams.watch("cl-a");
        drop(first);
        assert_eq!(streams.len(), 1, "another request still watches");
        drop(second);
        assert!(streams.is_empty());
        // A pause moves the epoch on; a watch after it carries the new one.
        streams.end("cl-a", Reason::Paused);
        assert_eq!(streams.watch("cl-a").epoch(), 1);
        // A request that found its capsule running just before the kill, and only
        // watches after it, is ended at once rather than waiting on a gone guest.
        streams.end("cl-a", Reason::Killed);
        let mut late = streams.watch("cl-a");
        let why = tokio::time::timeout(std::time::Duration::from_secs(1), late.wait()).await;
        assert_eq!(why.ok(), Some(Reason::Killed));
        drop(late);
        assert!(streams.is_empty());
        // A kill that failed: the capsule is watched afresh.
        streams.revive("cl-a");
        let mut again = streams.watch("cl-a");
        let why = tokio::time::timeout(std::time::Duration::from_millis(50), again.wait()).await;
        assert!(why.is_err(), "a revived capsule's watch is not ended");
    }

    fn tokio_stream_from(
        mut rx: tokio::sync::mpsc::Receiver<Result<Bytes, std::io::Error>>,
    ) -> impl futures_util::Stream<Item = Result<Bytes, std::io::Error>> {
        futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx))
    }
}
