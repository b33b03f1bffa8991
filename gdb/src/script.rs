//! The gdb command file that comes with retrovisor (`gdb/retrovisor.gdb`, built into the binary): rv-seek,
//! which moves the replay by position and makes gdb forget the registers and memory it read before,
//! rv-when and rv-help. `replay --gdb` installs it at a path that stays the same from one run to the next,
//! and names that path in the `source` line it prints.

use std::os::unix::fs::{DirBuilderExt, MetadataExt};
use std::path::{Path, PathBuf};
use thiserror::Error;

/// The command file's text.
pub const SCRIPT: &str = include_str!("../retrovisor.gdb");

/// The file's name in the directory [`install`] chooses.
const FILE_NAME: &str = "retrovisor.gdb";

/// Errors from installing the command file.
#[derive(Debug, Error)]
pub enum ScriptError {
    /// The directory for it cannot be created or examined.
    #[error("cannot create directory {path} for retrovisor's gdb commands: {source}")]
    Dir {
        /// The directory.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The directory exists but another user could write to it, and so put commands of their own in it.
    #[error(
        "{path} is not a directory that only this user can write (owner uid {owner}, mode {mode:o}), so \
         gdb could be made to run commands someone else put there"
    )]
    NotPrivate {
        /// The directory.
        path: PathBuf,
        /// Its owner.
        owner: u32,
        /// Its permission bits.
        mode: u32,
    },
    /// The file cannot be written.
    #[error("cannot write retrovisor's gdb commands to {path}: {source}")]
    Write {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
}

/// Writes the command file to `$XDG_RUNTIME_DIR/retrovisor/retrovisor.gdb`, or without a runtime
/// directory to `retrovisor-UID/retrovisor.gdb` in the temporary directory, and returns its path.
pub fn install() -> Result<PathBuf, ScriptError> {
    let dir = match std::env::var_os("XDG_RUNTIME_DIR").filter(|d| !d.is_empty()) {
        Some(runtime) => PathBuf::from(runtime).join("retrovisor"),
        None => std::env::temp_dir().join(format!("retrovisor-{}", euid())),
    };
    install_in(&dir)
}

/// The effective user id.
fn euid() -> u32 {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() }
}

/// Writes the command file into `dir`, created private to this user if need be.
fn install_in(dir: &Path) -> Result<PathBuf, ScriptError> {
    let dir_err = |source| ScriptError::Dir {
        path: dir.to_path_buf(),
        source,
    };
    match std::fs::DirBuilder::new().mode(0o700).create(dir) {
        Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => return Err(dir_err(e)),
        _ => {}
    }
    // gdb runs whatever the file says, and a directory in a shared place may be someone else's.
    let meta = std::fs::symlink_metadata(dir).map_err(dir_err)?;
    if !meta.is_dir() || meta.uid() != euid() || meta.mode() & 0o022 != 0 {
        return Err(ScriptError::NotPrivate {
            path: dir.to_path_buf(),
            owner: meta.uid(),
            mode: meta.mode() & 0o7777,
        });
    }
    let path = dir.join(FILE_NAME);
    // Written whole under another name, then renamed: a gdb sourcing it meanwhile, or another retrovisor
    // installing it at the same time, sees a complete file.
    let partial = dir.join(format!(".{FILE_NAME}.{}", std::process::id()));
    std::fs::write(&partial, SCRIPT)
        .and_then(|()| std::fs::rename(&partial, &path))
        .map_err(|source| ScriptError::Write {
            path: path.clone(),
            source,
        })?;
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn installs_into_a_private_directory_and_refuses_a_shared_one() {
        let base =
            std::env::temp_dir().join(format!("retrovisor-script-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&base);
        std::fs::create_dir_all(&base).unwrap();
        let dir = base.join("private");
        let path = install_in(&dir).unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), SCRIPT);
        let mode = std::fs::metadata(&dir).unwrap().mode() & 0o777;
        assert_eq!(mode, 0o700);
        // Again, over the file already there.
        assert_eq!(install_in(&dir).unwrap(), path);

        let shared = base.join("shared");
        std::fs::create_dir(&shared).unwrap();
        std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o777)).unwrap();
        let err = install_in(&shared).unwrap_err();
        assert!(matches!(err, ScriptError::NotPrivate { .. }), "{err}");
        assert!(!shared.join(FILE_NAME).exists());
        std::fs::remove_dir_all(&base).unwrap();
    }
}
