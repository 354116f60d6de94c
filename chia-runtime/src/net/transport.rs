//! Framed messages over one QUIC stream.
//!
//! [`FrameSender`] queues encoded frames for one writer task: small frames are packed together
//! so a burst leaves in one write, large ones are handed to QUIC as they are (no copy).
//! [`FrameReader`] reads small frames out of a reusable buffer and large ones straight into a
//! buffer of their own; every length prefix is checked against
//! [`MAX_FRAME_BYTES`](chia_core::protocol::MAX_FRAME_BYTES) before the body is read, and a
//! large body's buffer grows with the bytes that arrive, not with the length a peer declared.
//! A sender counts the bytes it has queued, so a reader of the other direction can wait for
//! a slow peer to take them ([`FrameSender::wait_for_backlog_below`]).

use bytes::Bytes;
use chia_core::protocol::{ProtocolError, encode_frame, frame_len};
use serde::Serialize;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use tokio::sync::Notify;

/// Why [`FrameReader::next_frame`] could not return a frame. Every one ends the stream: the
/// reader cannot find the next frame's start after it.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    /// A length prefix larger than a frame may be.
    #[error(transparent)]
    Protocol(#[from] ProtocolError),
    /// QUIC failed the read: the connection was lost or closed, or the peer reset the stream.
    #[error("stream read failed: {0}")]
    Read(#[from] quinn::ReadError),
    /// The peer finished the stream after part of a frame.
    #[error("the peer closed the stream in the middle of a frame")]
    Truncated,
}

/// Frames at least this large travel as their own chunk instead of being packed.
const LARGE_FRAME: usize = 64 << 10;

/// How long a closing writer waits for the peer to acknowledge the last frames.
const FLUSH_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Frames waiting for the writer, in order.
#[derive(Default)]
struct Pending {
    chunks: Vec<Bytes>,
    /// Small frames packed together after the last chunk.
    packed: Vec<u8>,
}

impl Pending {
    fn take(&mut self) -> Vec<Bytes> {
        self.seal_packed();
        std::mem::take(&mut self.chunks)
    }

    fn seal_packed(&mut self) {
        if !self.packed.is_empty() {
            self.chunks.push(Bytes::from(std::mem::take(&mut self.packed)));
        }
    }
}

struct SenderShared {
    pending: Mutex<Pending>,
    wake: Notify,
    /// Bytes queued and not yet handed to QUIC.
    backlog: AtomicUsize,
    /// Woken each time the writer has handed a batch to QUIC (or ended).
    drained: Notify,
    closed: AtomicBool,
    /// Set once the writer has ended (everything flushed and acknowledged, or the stream failed).
    finished: tokio::sync::watch::Sender<bool>,
}

/// The sending half of a control stream. Cheap to clone; all clones feed one writer task.
#[derive(Clone)]
pub struct FrameSender {
    shared: Arc<SenderShared>,
}

impl FrameSender {
    /// Starts the writer task for `stream`.
    pub fn spawn(mut stream: quinn::SendStream) -> FrameSender {
        let shared = Arc::new(SenderShared {
            pending: Mutex::new(Pending::default()),
            wake: Notify::new(),
            backlog: AtomicUsize::new(0),
            drained: Notify::new(),
            closed: AtomicBool::new(false),
            finished: tokio::sync::watch::Sender::new(false),
        });
        let writer = shared.clone();
        tokio::spawn(async move {
            write_loop(&writer, &mut stream).await;
            writer.finished.send_replace(true);
            writer.drained.notify_waiters();
        });
        FrameSender { shared }
    }

    /// Queues one message. Fails only if it cannot be encoded or is larger than a frame may
    /// be; a closed stream drops it silently (the reader side reports the disconnect).
    pub fn send<M: Serialize>(&self, message: &M) -> Result<(), ProtocolError> {
        if self.shared.closed.load(Ordering::Acquire) {
            return Ok(());
        }
        // Encode outside the lock, so a large message does not hold up other senders.
        let mut frame = Vec::with_capacity(256);
        encode_frame(message, &mut frame)?;
        self.send_frame(frame);
        Ok(())
    }

    /// Queues one frame encoded already (length prefix included), as the head core makes them.
    pub fn send_frame(&self, frame: Vec<u8>) {
        if self.shared.closed.load(Ordering::Acquire) {
            return;
        }
        self.shared.backlog.fetch_add(frame.len(), Ordering::AcqRel);
        {
            let mut pending = lock(&self.shared.pending);
            if frame.len() >= LARGE_FRAME {
                pending.seal_packed();
                pending.chunks.push(Bytes::from(frame));
            } else {
                pending.packed.extend_from_slice(&frame);
            }
        }
        self.shared.wake.notify_one();
    }

    /// Flushes what is queued, then finishes the stream.
    pub fn close(&self) {
        self.shared.closed.store(true, Ordering::Release);
        self.shared.wake.notify_one();
    }

    /// Like [`FrameSender::close`], and waits until the peer has everything (or the stream
    /// failed), so closing the connection afterwards loses nothing.
    pub async fn close_and_flush(&self) {
        self.close();
        let mut finished = self.shared.finished.subscribe();
        let _ = finished.wait_for(|f| *f).await;
    }

    /// Whether [`FrameSender::close`] was called or a write failed: what is sent from now on
    /// is dropped.
    pub fn is_closed(&self) -> bool {
        self.shared.closed.load(Ordering::Acquire)
    }

    /// Bytes queued that the writer has not handed to QUIC yet.
    pub fn backlog(&self) -> usize {
        self.shared.backlog.load(Ordering::Acquire)
    }

    /// Waits until at most `limit` bytes are queued (or the stream has ended): QUIC's flow
    /// control holds the writer back while the peer does not read, so this is how long the
    /// peer takes to catch up.
    pub async fn wait_for_backlog_below(&self, limit: usize) {
        loop {
            let drained = self.shared.drained.notified();
            let mut drained = std::pin::pin!(drained);
            drained.as_mut().enable();
            if self.backlog() <= limit || *self.shared.finished.borrow() {
                return;
            }
            drained.await;
        }
    }
}

async fn write_loop(shared: &SenderShared, stream: &mut quinn::SendStream) {
    loop {
        shared.wake.notified().await;
        loop {
            let mut chunks = lock(&shared.pending).take();
            if chunks.is_empty() {
                break;
            }
            let bytes: usize = chunks.iter().map(Bytes::len).sum();
            if let Err(e) = stream.write_all_chunks(&mut chunks).await {
                tracing::debug!("control stream write failed: {e}");
                shared.closed.store(true, Ordering::Release);
                return;
            }
            shared.backlog.fetch_sub(bytes, Ordering::AcqRel);
            shared.drained.notify_waiters();
        }
        if shared.closed.load(Ordering::Acquire) {
            // Finishing only queues the end; wait until the peer has read it all, or a
            // connection closed right after this would drop the last frames.
            let _ = stream.finish();
            let _ = tokio::time::timeout(FLUSH_TIMEOUT, stream.stopped()).await;
            return;
        }
    }
}

fn lock(pending: &Mutex<Pending>) -> std::sync::MutexGuard<'_, Pending> {
    // A panic while holding the lock leaves only whole frames queued (frames are encoded
    // before the lock is taken), so the data is still good.
    pending.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// The receiving half of a control stream.
pub struct FrameReader {
    stream: quinn::RecvStream,
    buf: Vec<u8>,
    start: usize,
    end: usize,
    /// The body of the last large frame.
    large: Vec<u8>,
}

const READ_CHUNK: usize = 256 << 10;

impl FrameReader {
    /// Reads frames from `stream`; nothing is read until [`FrameReader::next_frame`].
    pub fn new(stream: quinn::RecvStream) -> FrameReader {
        FrameReader { stream, buf: vec![0; READ_CHUNK], start: 0, end: 0, large: Vec::new() }
    }

    /// The next frame's body, or `None` when the peer finished the stream between frames.
    pub async fn next_frame(&mut self) -> Result<Option<&[u8]>, TransportError> {
        // The previous large body has been consumed by now: do not keep it around.
        if self.large.capacity() > 0 {
            self.large = Vec::new();
        }
        if !self.fill(4).await? {
            return if self.start == self.end { Ok(None) } else { Err(TransportError::Truncated) };
        }
        let prefix: [u8; 4] = self.buf[self.start..self.start + 4].try_into().expect("4 bytes were filled");
        let len = frame_len(prefix)?;
        self.start += 4;
        if len > READ_CHUNK {
            self.read_large(len).await?;
            return Ok(Some(&self.large));
        }
        if !self.fill(len).await? {
            return Err(TransportError::Truncated);
        }
        let body_start = self.start;
        self.start += len;
        Ok(Some(&self.buf[body_start..body_start + len]))
    }

    /// Reads a large body into its own buffer, taking QUIC's chunks as they come (no zeroing,
    /// one copy). The buffer grows as the chunks arrive (doubling, up to `len`): a peer that
    /// declares a huge frame and sends little of it holds little.
    async fn read_large(&mut self, len: usize) -> Result<(), TransportError> {
        self.large = Vec::with_capacity(READ_CHUNK.min(len));
        let buffered = (self.end - self.start).min(len);
        self.large.extend_from_slice(&self.buf[self.start..self.start + buffered]);
        self.start += buffered;
        while self.large.len() < len {
            match self.stream.read_chunk(len - self.large.len(), true).await? {
                Some(chunk) => {
                    if self.large.capacity() - self.large.len() < chunk.bytes.len() {
                        // Doubling keeps the copies linear; never past the declared length.
                        let wanted =
                            (self.large.capacity() * 2).max(self.large.len() + chunk.bytes.len()).min(len);
                        self.large.reserve_exact(wanted - self.large.len());
                    }
                    self.large.extend_from_slice(&chunk.bytes);
                }
                None => return Err(TransportError::Truncated),
            }
        }
        Ok(())
    }

    /// Reads until `need` unread bytes are buffered; false if the stream ended first.
    async fn fill(&mut self, need: usize) -> Result<bool, TransportError> {
        while self.end - self.start < need {
            if self.start == self.end {
                self.start = 0;
                self.end = 0;
            } else if self.buf.len() - self.start < need {
                self.buf.copy_within(self.start..self.end, 0);
                self.end -= self.start;
                self.start = 0;
            }
            match self.stream.read(&mut self.buf[self.end..]).await? {
                Some(n) => self.end += n,
                None => return Ok(false),
            }
        }
        Ok(true)
    }
}
