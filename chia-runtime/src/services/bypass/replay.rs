//! The built-in provider and condition behind [`Bypass::replay_from_cache`]: serve a call from
//! the value the cache holds under its tag, and only when it holds one.
//!
//! [`Bypass::replay_from_cache`]: super::Bypass::replay_from_cache

use super::{BypassCall, Provided};
use crate::error::Error;
use crate::services::cache::get_active_cache;

/// The cached bytes under the call's tag, passed on without decoding (the reader's `get`
/// decodes them as the function's type).
#[chia::provider(name = "chia.cache_replay")]
pub(super) async fn cache_replay(call: &BypassCall) -> Result<Provided, String> {
    let tag = call.tag().ok_or("the call has no tag, and cached values are stored by tag")?;
    let cache = get_active_cache(call.context(), None)
        .await
        .map_err(|e| e.to_string())?
        .ok_or("no cache is running (start one with chia::cache::start_cache)")?;
    match cache.read_bytes(tag).await.map_err(|e| e.to_string())? {
        Some(bytes) => Ok(Provided::encoded(bytes.into_vec())),
        None => Err(format!("cache miss for tag {tag:?}")),
    }
}

/// Whether the cache holds a value under the call's tag (false without a tag or a cache).
#[chia::condition(name = "chia.cache_hit")]
pub(super) async fn cache_hit(call: &BypassCall) -> Result<bool, Error> {
    let Some(tag) = call.tag() else { return Ok(false) };
    match get_active_cache(call.context(), None).await? {
        Some(cache) => cache.has(tag).await,
        None => Ok(false),
    }
}
