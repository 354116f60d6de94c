//! Framed messages over one QUIC stream.
//!
//! [`FrameSender`] encodes messages straight into a shared buffer that one writer task
//! flushes, so many small messages leave in one write and no message is allocated twice.
//! [`FrameReader`] reads frames out of a reusable buffer and checks every length prefix
//! against [`MAX_FRAME_BYTES`](chia_core::protocol::MAX_FRAME_BYTES) before reading the body.

use chia_core::protocol::{ProtocolError, encode_frame, frame_len};
use serde::Serialize;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use tokio::sync::Notify;

#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error(transparent)]
    Protocol(#[from] ProtocolError),
    #[error("stream read failed: {0}")]
    Read(#[from] quinn::ReadError),
    #[error("stream write failed: {0}")]
    Write(#[from] quinn::WriteError),
    #[error("the peer closed the stream in the middle of a frame")]
    Truncated,
    #[error("connection failed: {0}")]
    Connection(#[from] quinn::ConnectionError),
    #[error("could not connect to {address}: {message}")]
    Connect { address: String, message: String },
    #[error("the connection is closed")]
    Closed,
}

struct SenderShared {
    pending: Mutex<Vec<u8>>,
    wake: Notify,
    closed: AtomicBool,
    /// Set once the writer has ended (everything flushed and acknowledged, or the stream failed).
    finished: tokio::sync::watch::Sender<bool>,
}

/// How long a closing writer waits for the peer to acknowledge the last frames.
const FLUSH_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// The sending half of a control stream. Cheap to clone; all clones feed one writer task.
#[derive(Clone)]
pub struct FrameSender {
    shared: Arc<SenderShared>,
}

impl FrameSender {
    /// Starts the writer task for `stream`.
    pub fn spawn(mut stream: quinn::SendStream) -> FrameSender {
        let shared = Arc::new(SenderShared {
            pending: Mutex::new(Vec::with_capacity(64 << 10)),
            wake: Notify::new(),
            closed: AtomicBool::new(false),
            finished: tokio::sync::watch::Sender::new(false),
        });
        let writer = shared.clone();
        tokio::spawn(async move {
            write_loop(&writer, &mut stream).await;
            writer.finished.send_replace(true);
        });
        FrameSender { shared }
    }

    /// Queues one message. Fails only if it cannot be encoded or is larger than a frame may
    /// be; a closed stream drops it silently (the reader side reports the disconnect).
    pub fn send<M: Serialize>(&self, message: &M) -> Result<(), ProtocolError> {
        if self.shared.closed.load(Ordering::Acquire) {
            return Ok(());
        }
        encode_frame(message, &mut lock(&self.shared.pending))?;
        self.shared.wake.notify_one();
        Ok(())
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

    pub fn is_closed(&self) -> bool {
        self.shared.closed.load(Ordering::Acquire)
    }
}

async fn write_loop(shared: &SenderShared, stream: &mut quinn::SendStream) {
    let mut batch = Vec::with_capacity(64 << 10);
    loop {
        shared.wake.notified().await;
        loop {
            std::mem::swap(&mut batch, &mut *lock(&shared.pending));
            if batch.is_empty() {
                break;
            }
            if let Err(e) = stream.write_all(&batch).await {
                tracing::debug!("control stream write failed: {e}");
                shared.closed.store(true, Ordering::Release);
                return;
            }
            batch.clear();
            if batch.capacity() > 4 << 20 {
                batch.shrink_to(64 << 10);
            }
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

fn lock(buffer: &Mutex<Vec<u8>>) -> std::sync::MutexGuard<'_, Vec<u8>> {
    // A panic while holding the lock leaves only whole frames in the buffer (encode_frame
    // truncates on failure), so the data is still good.
    buffer.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// The receiving half of a control stream.
pub struct FrameReader {
    stream: quinn::RecvStream,
    buf: Vec<u8>,
    start: usize,
    end: usize,
}

const READ_CHUNK: usize = 256 << 10;

impl FrameReader {
    pub fn new(stream: quinn::RecvStream) -> FrameReader {
        FrameReader { stream, buf: vec![0; READ_CHUNK], start: 0, end: 0 }
    }

    /// The next frame's body, or `None` when the peer finished the stream between frames.
    pub async fn next_frame(&mut self) -> Result<Option<&[u8]>, TransportError> {
        if !self.fill(4).await? {
            return if self.start == self.end { Ok(None) } else { Err(TransportError::Truncated) };
        }
        let prefix: [u8; 4] = self.buf[self.start..self.start + 4].try_into().expect("4 bytes were filled");
        let len = frame_len(prefix)?;
        if !self.fill(4 + len).await? {
            return Err(TransportError::Truncated);
        }
        let body_start = self.start + 4;
        self.start = body_start + len;
        Ok(Some(&self.buf[body_start..body_start + len]))
    }

    /// Reads until `need` unread bytes are buffered; false if the stream ended first.
    async fn fill(&mut self, need: usize) -> Result<bool, TransportError> {
        while self.end - self.start < need {
            if self.start == self.end {
                self.start = 0;
                self.end = 0;
                if self.buf.len() > 4 * READ_CHUNK && need <= READ_CHUNK {
                    self.buf.truncate(READ_CHUNK);
                    self.buf.shrink_to_fit();
                }
            } else if self.buf.len() - self.start < need {
                self.buf.copy_within(self.start..self.end, 0);
                self.end -= self.start;
                self.start = 0;
            }
            if self.buf.len() < need {
                self.buf.resize(need, 0);
            }
            if self.end == self.buf.len() {
                self.buf.resize(self.buf.len() + READ_CHUNK, 0);
            }
            match self.stream.read(&mut self.buf[self.end..]).await? {
                Some(n) => self.end += n,
                None => return Ok(false),
            }
        }
        Ok(true)
    }
}
