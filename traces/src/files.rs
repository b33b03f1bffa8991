//! Reading files whose names come from users or from traces: regular files only, never more than
//! a limit, and facts about the host that bound what a trace may ask for.
//!
//! A name can stand for anything. Opening a FIFO blocks until a writer appears, perhaps forever, and
//! a device such as `/dev/zero` reads without end. Files are therefore opened with `O_NONBLOCK`
//! (opening a FIFO then returns at once; for a regular file the flag changes nothing), checked
//! with `fstat` on the open descriptor (so nothing can be swapped in between the check and the
//! read), and read no further than a limit.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::path::Path;

/// Opens `path` for reading if it is a regular file, and returns it with its size. Anything else
/// (a FIFO, a device, a socket, a directory) is refused with an `InvalidInput` error saying what
/// it is, without blocking and without reading from it.
pub fn open_regular(path: &Path) -> io::Result<(File, u64)> {
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)?;
    let meta = file.metadata()?;
    let kind = meta.file_type();
    if kind.is_file() {
        return Ok((file, meta.len()));
    }
    let what = if kind.is_dir() {
        "a directory"
    } else if kind.is_fifo() {
        "a FIFO"
    } else if kind.is_char_device() {
        "a character device"
    } else if kind.is_block_device() {
        "a block device"
    } else if kind.is_socket() {
        "a socket"
    } else {
        "not a file"
    };
    Err(io::Error::new(
        io::ErrorKind::InvalidInput,
        format!("it is {what}, not a regular file"),
    ))
}

/// Reads the whole regular file at `path`, refusing anything that is not a regular file (see
/// [`open_regular`]) or that holds more than `max_len` bytes. Memory is reserved for the file's
/// size up front, fallibly, so a file too large for this process is an error and not an abort.
/// The errors are `io::Error`s that say what is wrong without repeating the path, so callers can
/// put them after "cannot read PATH: " as they would an error from `std::fs::read`.
pub fn read_regular_file(path: &Path, max_len: u64) -> io::Result<Vec<u8>> {
    let (file, size) = open_regular(path)?;
    let too_large = |size: u64| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("it is {size} bytes, more than the limit of {max_len} bytes"),
        )
    };
    if size > max_len {
        return Err(too_large(size));
    }
    let mut bytes = Vec::new();
    usize::try_from(size)
        .ok()
        .and_then(|n| bytes.try_reserve_exact(n).ok())
        .ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::OutOfMemory,
                format!("it is {size} bytes, more than this process can hold in memory"),
            )
        })?;
    // One byte past the limit, so a file that grew since fstat is noticed without reading it all.
    file.take(max_len.saturating_add(1))
        .read_to_end(&mut bytes)?;
    if bytes.len() as u64 > max_len {
        return Err(too_large(bytes.len() as u64));
    }
    Ok(bytes)
}

/// True if every byte from `file`'s current position to its end is zero. Holes (the unwritten
/// parts of a sparse file) are skipped with `SEEK_DATA`/`SEEK_HOLE` rather than read, so a
/// multi-gigabyte sparse file is checked in a few system calls; only data actually stored is read.
pub(crate) fn rest_is_zero(file: &mut File) -> io::Result<bool> {
    let end = file.metadata()?.len();
    let mut pos = file.stream_position()?;
    let mut buf = vec![0u8; 64 << 10];
    while pos < end {
        let fd = file.as_raw_fd();
        // SAFETY: lseek on a descriptor this File owns; it only moves the file offset.
        let data = unsafe { libc::lseek(fd, pos as libc::off_t, libc::SEEK_DATA) };
        if data < 0 {
            let e = io::Error::last_os_error();
            match e.raw_os_error() {
                // No data after `pos`: the rest is one hole.
                Some(libc::ENXIO) => return Ok(true),
                // The file system cannot tell holes apart: read everything.
                Some(libc::EINVAL) | Some(libc::EOPNOTSUPP) => {
                    file.seek(SeekFrom::Start(pos))?;
                    return read_is_zero(file, end - pos, &mut buf);
                }
                _ => return Err(e),
            }
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(fd, data, libc::SEEK_HOLE) };
        if hole < 0 {
            return Err(io::Error::last_os_error());
        }
        let (data, hole) = (data as u64, (hole as u64).min(end));
        file.seek(SeekFrom::Start(data))?;
        if !read_is_zero(file, hole.saturating_sub(data), &mut buf)? {
            return Ok(false);
        }
        pos = hole.max(data + 1);
    }
    Ok(true)
}

/// True if the next `len` bytes of `file` (or all up to its end, if fewer) are zero.
fn read_is_zero(file: &mut File, len: u64, buf: &mut [u8]) -> io::Result<bool> {
    let mut left = len;
    while left > 0 {
        let want = buf.len().min(usize::try_from(left).unwrap_or(usize::MAX));
        match file.read(&mut buf[..want])? {
            0 => return Ok(true),
            n if buf[..n].iter().any(|&b| b != 0) => return Ok(false),
            n => left -= n as u64,
        }
    }
    Ok(true)
}

/// This host's memory in bytes (`MemTotal` in `/proc/meminfo`), or `None` if it cannot be told.
/// Nothing a trace asks the reader to hold at once (guest RAM, one checkpoint, a disk copy) can be
/// larger and still be replayed here, so larger requests are refused before anything is
/// allocated for them.
pub fn host_memory() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemTotal:"))?;
    let mut words = line.split_whitespace().skip(1);
    let value: u64 = words.next()?.parse().ok()?;
    match words.next() {
        Some("kB") => value.checked_mul(1024),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(name: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("rv-files-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn only_regular_files_are_read_and_only_up_to_the_limit() {
        let dir = scratch("regular");
        let file = dir.join("f");
        std::fs::write(&file, b"12345").unwrap();
        assert_eq!(read_regular_file(&file, 5).unwrap(), b"12345");
        let err = read_regular_file(&file, 4).unwrap_err().to_string();
        assert!(err.contains("5 bytes, more than the limit of 4"), "{err}");

        let err = read_regular_file(&dir, 1 << 20).unwrap_err().to_string();
        assert!(err.contains("a directory, not a regular file"), "{err}");
        let err = read_regular_file(Path::new("/dev/zero"), 1 << 20)
            .unwrap_err()
            .to_string();
        assert!(err.contains("a character device"), "{err}");

        // A FIFO with no writer: a plain open would block here forever.
        let fifo = dir.join("fifo");
        let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        // SAFETY: mkfifo with a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        let err = read_regular_file(&fifo, 1 << 20).unwrap_err().to_string();
        assert!(err.contains("a FIFO"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn holes_are_skipped_and_data_is_read() {
        let dir = scratch("sparse");
        let path = dir.join("sparse");
        let mut f = OpenOptions::new()
            .create(true)
            .truncate(true)
            .read(true)
            .write(true)
            .open(&path)
            .unwrap();
        // 20 GiB of hole: reading it would take minutes, skipping it takes microseconds.
        f.set_len(20 << 30).unwrap();
        f.seek(SeekFrom::Start(16)).unwrap();
        let started = std::time::Instant::now();
        assert!(rest_is_zero(&mut f).unwrap());
        assert!(started.elapsed() < std::time::Duration::from_secs(5));

        // Stored zeros count as zeros; one stored non-zero byte far into the file is found.
        use std::io::Write;
        f.seek(SeekFrom::Start(1 << 30)).unwrap();
        f.write_all(&[0; 4096]).unwrap();
        f.seek(SeekFrom::Start(16)).unwrap();
        assert!(rest_is_zero(&mut f).unwrap());
        f.seek(SeekFrom::Start((10 << 30) + 5)).unwrap();
        f.write_all(&[1]).unwrap();
        f.seek(SeekFrom::Start(16)).unwrap();
        assert!(!rest_is_zero(&mut f).unwrap());
        drop(f);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn host_memory_is_known_on_linux() {
        let bytes = host_memory().expect("/proc/meminfo has MemTotal");
        assert!(bytes >= 64 << 20, "{bytes}");
    }
}
