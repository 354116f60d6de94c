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

/// Creates `dir` and its missing parents with exactly [`DIR_MODE`], or tightens an existing
/// `dir` to it. Parents that already existed are not the cache's and are left alone. A
/// directory this user may not change (someone else's) is left as it is, with a warning: its
/// owner chose who may read it.
///
/// Exactly means the special bits too. A new directory inherits the setgid bit of a setgid
/// parent (a shared project directory, say), and with it every entry would be created in that
/// parent's group: the group could not read a 0600 entry, but the directory would not be the
/// 0700 it is said to be, and the entries would already belong to the group should anyone
/// loosen their modes. So the bit is cleared, as are setuid and sticky.
pub(crate) fn create_private_dir(dir: &Path) -> io::Result<()> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::DirBuilderExt;

        // The missing directories, `dir` first: created one by one, so that each one made here
        // is known and set.
        let mut missing = Vec::new();
        let mut next = Some(dir);
        while let Some(path) = next.filter(|path| !path.as_os_str().is_empty()) {
            match fs::symlink_metadata(path) {
                Err(error) if error.kind() == io::ErrorKind::NotFound => missing.push(path),
                // There (or unreadable: creating below it reports why).
                _ => break,
            }
            next = path.parent();
        }
        let mut created_dir = false;
        for &path in missing.iter().rev() {
            match fs::DirBuilder::new().mode(DIR_MODE).create(path) {
                Ok(()) if path == dir => created_dir = true,
                Ok(()) => make_exact(path, true)?,
                // Made by someone else meanwhile: theirs, unless it is `dir` (tightened below).
                Err(error) if error.kind() == io::ErrorKind::AlreadyExists && path.is_dir() => {}
                Err(error) => return Err(error),
            }
        }
        make_exact(dir, created_dir)
    }
    #[cfg(not(unix))]
    {
        fs::create_dir_all(dir)
    }
}

/// Sets `dir` to exactly [`DIR_MODE`] if it is not; `created`: this process just made it (the
/// umask or an inherited setgid bit made the difference, which is not worth a log line).
#[cfg(unix)]
fn make_exact(dir: &Path, created: bool) -> io::Result<()> {
    use std::os::unix::fs::PermissionsExt;

    // All twelve bits: more than 0700 lets others in or carries a special bit; less (an odd
    // umask, say 0500) would keep the owner from writing the lock and the entries.
    let mode = fs::metadata(dir)?.permissions().mode() & 0o7777;
    if mode == DIR_MODE {
        return Ok(());
    }
    match fs::set_permissions(dir, fs::Permissions::from_mode(DIR_MODE)) {
        Ok(()) if created => {}
        Ok(()) => tracing::info!(
            dir = %dir.display(),
            "cache: directory was {mode:04o}; now {DIR_MODE:04o}, so only its owner can read the entries"
        ),
        Err(error) => tracing::warn!(
            dir = %dir.display(),
            %error,
            "cache: directory is {mode:04o} and cannot be made {DIR_MODE:04o}; other users may read its entries"
        ),
    }
    Ok(())
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
