//! Reading files from the plugins directory without trusting them: only
//! regular files, a symbolic link only where the module's manifest allows
//! one, and never more bytes than the limit, whatever the file's size says
//! (files such as `/proc/self/pagemap` report 0 and read without end).

use std::fs::File;
use std::io::{self, Read};
use std::path::Path;

/// Why a plugin file was not read.
#[derive(Debug)]
pub(crate) enum Unread {
    /// There is no such file.
    Missing,
    /// It is not what may be read, or could not be read; in words.
    Refused(String),
}

impl std::fmt::Display for Unread {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Unread::Missing => f.write_str("there is no such file"),
            Unread::Refused(why) => f.write_str(why),
        }
    }
}

impl From<Unread> for crate::error::LoadError {
    fn from(unread: Unread) -> crate::error::LoadError {
        match unread {
            Unread::Missing => crate::error::LoadError::Missing,
            Unread::Refused(why) => crate::error::LoadError::Unreadable(why),
        }
    }
}

impl From<io::Error> for Unread {
    fn from(e: io::Error) -> Unread {
        match e.kind() {
            io::ErrorKind::NotFound => Unread::Missing,
            _ => Unread::Refused(format!("cannot read it: {e}")),
        }
    }
}

/// How much is read at a time: a multiple of 8, as some files of `/proc`
/// require.
const CHUNK: usize = 64 << 10;

/// Reads `path` if it is a regular file (or, with `follow_symlink`, a
/// symbolic link to one) of at most `max` bytes.
pub(crate) fn read_regular(path: &Path, max: u64, follow_symlink: bool) -> Result<Vec<u8>, Unread> {
    let refused = Unread::Refused;
    if !follow_symlink && std::fs::symlink_metadata(path)?.file_type().is_symlink() {
        return Err(refused(
            "it is a symbolic link: copy the file into the plugins directory, or, for a \
             component, allow links in its manifest (`[component] allow_symlink = true`)"
                .into(),
        ));
    }
    let mut file = open_without_blocking(path, follow_symlink)?;
    let metadata = file.metadata()?;
    if !metadata.is_file() {
        return Err(refused(
            "it is not a regular file (a directory, a FIFO, a device or a socket)".into(),
        ));
    }
    if metadata.len() > max {
        return Err(refused(format!(
            "it is {} bytes, over the limit of {max} bytes",
            metadata.len()
        )));
    }
    let mut bytes = Vec::with_capacity(usize::try_from(metadata.len()).unwrap_or(0));
    let mut chunk = vec![0; CHUNK];
    loop {
        let read = file.read(&mut chunk)?;
        if read == 0 {
            return Ok(bytes);
        }
        bytes.extend_from_slice(&chunk[..read]);
        if bytes.len() as u64 > max {
            return Err(refused(format!(
                "it holds more than the limit of {max} bytes (though its size says {})",
                metadata.len()
            )));
        }
    }
}

/// Opens for reading without waiting: a FIFO put in place of a plugin would
/// otherwise block until something writes to it. Without `follow_symlink`,
/// a link swapped in after the check above is refused too.
#[cfg(unix)]
fn open_without_blocking(path: &Path, follow_symlink: bool) -> io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut flags = libc::O_NONBLOCK;
    if !follow_symlink {
        flags |= libc::O_NOFOLLOW;
    }
    File::options().read(true).custom_flags(flags).open(path)
}

#[cfg(not(unix))]
fn open_without_blocking(path: &Path, _follow_symlink: bool) -> io::Result<File> {
    File::open(path)
}
