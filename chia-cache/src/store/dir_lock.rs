//! One store per directory: two stores sharing a directory would each account only their own
//! writes, evict each other's files behind their backs and delete each other's temporary
//! files at open. An advisory lock (`flock`) on a lock file inside the directory makes the second
//! open fail instead; the kernel releases it when the process dies, however it dies.

use std::fs::File;
use std::path::Path;

use super::naming::LOCK_FILE_NAME;
use crate::CacheError;

#[derive(Debug)]
pub(crate) struct DirLock {
    /// Closing the file releases the lock.
    _file: File,
}

impl DirLock {
    pub(crate) fn acquire(dir: &Path) -> Result<Self, CacheError> {
        let open_error = |source| CacheError::OpenDirectory { dir: dir.to_owned(), source };
        let file = super::permissions::private_file_options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(dir.join(LOCK_FILE_NAME))
            .map_err(open_error)?;
        lock_exclusive(&file, dir)?;
        Ok(Self { _file: file })
    }
}

/// `flock` on Linux (std's file lock), so a store of another process, even one built with an
/// older version of this crate that called `flock` itself, holds the same lock.
fn lock_exclusive(file: &File, dir: &Path) -> Result<(), CacheError> {
    match file.try_lock() {
        Ok(()) => Ok(()),
        Err(std::fs::TryLockError::WouldBlock) => Err(CacheError::DirectoryLocked { dir: dir.to_owned() }),
        Err(std::fs::TryLockError::Error(source)) => {
            Err(CacheError::OpenDirectory { dir: dir.to_owned(), source })
        }
    }
}
