//! One store per directory: two stores sharing a directory would each account only their own
//! writes, evict each other's files behind their backs and delete each other's temporary
//! files at open. An advisory `flock` on a lock file inside the directory makes the second
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

#[cfg(unix)]
fn lock_exclusive(file: &File, dir: &Path) -> Result<(), CacheError> {
    use std::io;
    use std::os::fd::AsRawFd;

    loop {
        // SAFETY: `file` owns a valid open descriptor for the duration of the call.
        let status = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        if status == 0 {
            return Ok(());
        }
        let error = io::Error::last_os_error();
        match error.kind() {
            io::ErrorKind::Interrupted => continue,
            io::ErrorKind::WouldBlock => return Err(CacheError::DirectoryLocked { dir: dir.to_owned() }),
            _ => return Err(CacheError::OpenDirectory { dir: dir.to_owned(), source: error }),
        }
    }
}

/// Elsewhere the directory is not locked; one store per directory is then the caller's duty.
#[cfg(not(unix))]
fn lock_exclusive(_file: &File, _dir: &Path) -> Result<(), CacheError> {
    Ok(())
}
