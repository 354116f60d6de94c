//! Only the cache's owner may read it: entries are task results (a design, a report, a model's
//! answer) and the head's machine may be shared, so the directory is 0700 and every file in it
//! is created 0600. A directory that already exists with looser bits is tightened at open; the
//! entries a looser directory already holds keep their bits but are out of reach through it.
//! Elsewhere than on Unix, the platform's defaults apply.

use std::fs::{self, OpenOptions};
use std::io;
use std::path::Path;

/// The cache directory's mode: the owner only.
pub(crate) const DIR_MODE: u32 = 0o700;

/// The mode entries, temporary files and the lock file are created with.
pub(crate) const FILE_MODE: u32 = 0o600;

/// Creates `dir` and its missing parents with [`DIR_MODE`], or tightens an existing `dir` to
/// it. A directory this user may not change (someone else's) is left as it is, with a warning:
/// its owner chose who may read it.
pub(crate) fn create_private_dir(dir: &Path) -> io::Result<()> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::{DirBuilderExt, PermissionsExt};

        fs::DirBuilder::new().recursive(true).mode(DIR_MODE).create(dir)?;
        let mode = fs::metadata(dir)?.permissions().mode() & 0o777;
        // Exactly 0700: more lets others read; less (an odd umask, say 0500) would keep the
        // owner from writing the lock and the entries.
        if mode != DIR_MODE {
            match fs::set_permissions(dir, fs::Permissions::from_mode(DIR_MODE)) {
                Ok(()) => tracing::info!(
                    dir = %dir.display(),
                    "cache: directory was {mode:03o}; now {DIR_MODE:03o}, so only its owner can read the entries"
                ),
                Err(error) => tracing::warn!(
                    dir = %dir.display(),
                    %error,
                    "cache: directory is {mode:03o} and cannot be made {DIR_MODE:03o}; other users may read its entries"
                ),
            }
        }
        Ok(())
    }
    #[cfg(not(unix))]
    {
        fs::create_dir_all(dir)
    }
}

/// Options that create a file only its owner can read and write ([`FILE_MODE`]).
pub(crate) fn private_file_options() -> OpenOptions {
    #[allow(unused_mut)] // Only Unix sets a mode.
    let mut options = OpenOptions::new();
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(FILE_MODE);
    }
    options
}
