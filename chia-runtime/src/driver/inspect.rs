//! Questions about the cluster from any member (`chia status`, `list`, `show`, `explain`,
//! `cancel`): sent to the head like a lookup and answered from what it holds. The types are
//! [`chia_core::inspect`]'s.

use crate::driver::context::{Context, ObjectRef, send_request};
use crate::error::Error;
use chia_core::SessionId;
/// The questions ([`Query`]) and answers ([`Answer`]) the head knows, and what they hold.
pub use chia_core::inspect::*;
use chia_core::protocol::PeerToHead;

/// Asks the head `query`.
pub async fn ask(cx: &Context, query: Query) -> Result<Answer, Error> {
    let answer: ObjectRef<Answer> =
        send_request(cx, "inspect", Vec::new(), None, |task, _| PeerToHead::Inspect { task, query });
    answer.get().await
}

/// Cancels a task, or every unfinished task of a job, whoever submitted them (`force`: their
/// processes are killed at once).
pub async fn cancel(cx: &Context, target: CancelTarget, force: bool) -> Result<Cancelled, Error> {
    let cancelled: ObjectRef<Cancelled> = send_request(cx, "cancel", Vec::new(), None, |task, _| {
        PeerToHead::CancelTasks { task, target, force, stop_services: false }
    });
    cancelled.get().await
}

/// Stops a job and everything it started (`chia job stop`, the original's
/// `--kill-tracked-pids`): its unfinished tasks are cancelled (their process trees end with
/// them; `force`: at once) and, once none is left, the services it started that are not
/// detached are stopped. A job with many tasks takes several requests; this sends them.
pub async fn stop_job(cx: &Context, job: SessionId, force: bool) -> Result<Cancelled, Error> {
    let mut stopped = Cancelled::default();
    loop {
        let answer: ObjectRef<Cancelled> = send_request(cx, "stop job", Vec::new(), None, |task, _| {
            PeerToHead::CancelTasks { task, target: CancelTarget::Job(job), force, stop_services: true }
        });
        let batch = answer.get().await?;
        stopped.tasks.extend(batch.tasks);
        stopped.services.extend(batch.services);
        if !batch.more {
            return Ok(stopped);
        }
    }
}
