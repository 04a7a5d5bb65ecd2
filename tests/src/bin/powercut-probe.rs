//! Scripted file operations for the power-cut shim's own tests:
//! `powercut-probe OP ARGS... [OP ARGS...]`, then `ready` on stdout, then it waits to be killed.
//!
//! Handles name open files. Operations:
//! - `open H PATH` (read-write, created if missing), `create H PATH` (write-only, truncated),
//!   `append H PATH` (append, created if missing), `read H PATH` (read-only)
//! - `write H OFFSET TEXT` (pwrite), `seq H TEXT` (write at the current offset),
//!   `fill H OFFSET LEN BYTE` (LEN bytes of value BYTE at OFFSET)
//! - `fsync H`, `fdatasync H`, `setlen H LEN` (ftruncate), `close H`
//! - `dup NEW H` (dup), `dup2 NEW H` (dup2 onto a fresh fd), `clone NEW H` (fcntl F_DUPFD_CLOEXEC)
//! - `rename FROM TO`, `unlink PATH`, `mkdir PATH`, `rmdir PATH`, `rmtree PATH`
//! - `put PATH TEXT` (writes a whole file atomically: temporary file, rename), `sleep MS`
//! - `dirsync PATH` (opens the directory and fsyncs it), `sfr H` (sync_file_range of the whole
//!   file: data written, no durability)
//! - `mark TEXT` (prints `mark TEXT` on stdout: how far the script got before a cut)
//!
//! Tried operations report their result on stdout instead of panicking, one line each before
//! `ready`: the operation's name and the bytes written, `ok`, or `errno N`.
//! - `twrite H OFFSET TEXT` (one pwrite), `tseq H TEXT` (one write at the current offset),
//!   `twritev H OFFSET TEXT TEXT` (one pwritev of two buffers), `tappendv H TEXT TEXT` (one
//!   writev of two buffers at the current offset)
//! - `tfill H OFFSET LEN BYTE` (pwrites until LEN bytes landed or one fails: the bytes that
//!   landed, then `errno N` if one failed)
//! - `tsetlen H LEN` (ftruncate), `tfallocate H OFFSET LEN` (fallocate, mode 0)
//! - `tfsync H`, `tfdatasync H`

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::FileExt;

/// `dup(2)` or `dup2(2)` of `f` (onto `onto`'s fd); std has no safe wrapper for either.
#[allow(unsafe_code)]
fn dup(f: &File, onto: Option<File>) -> File {
    use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd};
    // SAFETY: `f` is open; `onto`'s fd is given up before dup2 replaces it; the result is a new
    // fd that nothing else owns.
    unsafe {
        let fd = match onto {
            None => libc::dup(f.as_raw_fd()),
            Some(target) => libc::dup2(f.as_raw_fd(), target.into_raw_fd()),
        };
        assert!(fd >= 0, "dup: {}", std::io::Error::last_os_error());
        File::from_raw_fd(fd)
    }
}

/// `pwritev(2)` of two buffers, or `writev(2)` when `offset` is `None`: std has no positional
/// vectored write, and its `write_vectored` is not sure to be one call.
#[allow(unsafe_code)]
fn vectored(f: &File, offset: Option<u64>, a: &[u8], b: &[u8]) -> std::io::Result<usize> {
    use std::os::fd::AsRawFd;
    let iov = [
        libc::iovec {
            iov_base: a.as_ptr() as *mut libc::c_void,
            iov_len: a.len(),
        },
        libc::iovec {
            iov_base: b.as_ptr() as *mut libc::c_void,
            iov_len: b.len(),
        },
    ];
    // SAFETY: two valid buffers that outlive the call; `f` is open.
    let n = unsafe {
        match offset {
            Some(off) => libc::pwritev(f.as_raw_fd(), iov.as_ptr(), 2, off as libc::off_t),
            None => libc::writev(f.as_raw_fd(), iov.as_ptr(), 2),
        }
    };
    if n < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

/// `fallocate(2)` with mode 0.
#[allow(unsafe_code)]
fn fallocate(f: &File, offset: u64, len: u64) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    // SAFETY: `f` is open; no memory is passed.
    let r = unsafe { libc::fallocate(f.as_raw_fd(), 0, offset as libc::off_t, len as libc::off_t) };
    if r < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// `sync_file_range(2)` of the whole file, waiting for the write-out.
#[allow(unsafe_code)]
fn sync_file_range(f: &File) {
    use std::os::fd::AsRawFd;
    let flags = libc::SYNC_FILE_RANGE_WAIT_BEFORE
        | libc::SYNC_FILE_RANGE_WRITE
        | libc::SYNC_FILE_RANGE_WAIT_AFTER;
    // SAFETY: `f` is open; no memory is passed.
    let r = unsafe { libc::sync_file_range(f.as_raw_fd(), 0, 0, flags) };
    assert!(
        r == 0,
        "sync_file_range: {}",
        std::io::Error::last_os_error()
    );
}

/// One result line of a tried operation.
fn report<T: std::fmt::Display>(op: &str, result: std::io::Result<T>) {
    match result {
        Ok(v) => say(&format!("{op} {v}")),
        Err(e) => say(&format!("{op} errno {}", e.raw_os_error().unwrap_or(-1))),
    }
}

fn say(line: &str) {
    let mut out = std::io::stdout();
    writeln!(out, "{line}").unwrap();
    out.flush().unwrap();
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut files: HashMap<String, File> = HashMap::new();
    let mut i = 0;
    let mut next = || {
        let a = args.get(i).cloned();
        i += 1;
        a
    };
    while let Some(op) = next() {
        let mut arg = || next().unwrap_or_else(|| panic!("`{op}` needs more arguments"));
        let num = |s: String| -> u64 { s.parse().unwrap_or_else(|_| panic!("not a number: {s}")) };
        match op.as_str() {
            "open" | "create" | "append" | "read" => {
                let (h, path) = (arg(), arg());
                let mut o = OpenOptions::new();
                match op.as_str() {
                    "open" => o.read(true).write(true).create(true).truncate(false),
                    "create" => o.write(true).create(true).truncate(true),
                    "append" => o.append(true).create(true),
                    _ => o.read(true),
                };
                let f = o.open(&path).unwrap_or_else(|e| panic!("{op} {path}: {e}"));
                files.insert(h, f);
            }
            "write" => {
                let (h, off, text) = (arg(), num(arg()), arg());
                files[&h].write_all_at(text.as_bytes(), off).unwrap();
            }
            "seq" => {
                let (h, text) = (arg(), arg());
                (&files[&h]).write_all(text.as_bytes()).unwrap();
            }
            "fill" => {
                let (h, off, len, byte) = (arg(), num(arg()), num(arg()), num(arg()));
                let chunk = vec![byte as u8; 1 << 20];
                let mut at = 0;
                while at < len {
                    let n = (len - at).min(chunk.len() as u64) as usize;
                    files[&h].write_all_at(&chunk[..n], off + at).unwrap();
                    at += n as u64;
                }
            }
            "fsync" => files[&arg()].sync_all().unwrap(),
            "fdatasync" => files[&arg()].sync_data().unwrap(),
            "setlen" => {
                let (h, len) = (arg(), num(arg()));
                files[&h].set_len(len).unwrap();
            }
            "close" => drop(files.remove(&arg())),
            "dup" | "dup2" | "clone" => {
                let (new, h) = (arg(), arg());
                let f = match op.as_str() {
                    "dup" => dup(&files[&h], None),
                    "dup2" => dup(&files[&h], Some(File::open("/dev/null").unwrap())),
                    _ => files[&h].try_clone().unwrap(),
                };
                files.insert(new, f);
            }
            "rename" => {
                let (from, to) = (arg(), arg());
                std::fs::rename(&from, &to).unwrap_or_else(|e| panic!("rename {from}: {e}"));
            }
            "unlink" => std::fs::remove_file(arg()).unwrap(),
            "mkdir" => std::fs::create_dir(arg()).unwrap(),
            "rmdir" => std::fs::remove_dir(arg()).unwrap(),
            "rmtree" => std::fs::remove_dir_all(arg()).unwrap(),
            "put" => {
                let (path, text) = (arg(), arg());
                let tmp = format!("{path}.tmp");
                std::fs::write(&tmp, text).unwrap();
                std::fs::rename(&tmp, &path).unwrap();
            }
            "dirsync" => {
                let path = arg();
                let d = File::open(&path).unwrap_or_else(|e| panic!("open {path}: {e}"));
                d.sync_all().unwrap_or_else(|e| panic!("fsync {path}: {e}"));
            }
            "sfr" => sync_file_range(&files[&arg()]),
            "mark" => say(&format!("mark {}", arg())),
            "sleep" => std::thread::sleep(std::time::Duration::from_millis(num(arg()))),
            "twrite" => {
                let (h, off, text) = (arg(), num(arg()), arg());
                report(&op, files[&h].write_at(text.as_bytes(), off));
            }
            "tseq" => {
                let (h, text) = (arg(), arg());
                report(&op, (&files[&h]).write(text.as_bytes()));
            }
            "twritev" => {
                let (h, off, a, b) = (arg(), num(arg()), arg(), arg());
                report(
                    &op,
                    vectored(&files[&h], Some(off), a.as_bytes(), b.as_bytes()),
                );
            }
            "tappendv" => {
                let (h, a, b) = (arg(), arg(), arg());
                report(&op, vectored(&files[&h], None, a.as_bytes(), b.as_bytes()));
            }
            "tfill" => {
                let (h, off, len, byte) = (arg(), num(arg()), num(arg()), num(arg()));
                let data = vec![byte as u8; len as usize];
                let mut at = 0;
                let mut failed = None;
                while at < data.len() {
                    match files[&h].write_at(&data[at..], off + at as u64) {
                        Ok(0) => break,
                        Ok(n) => at += n,
                        Err(e) => {
                            failed = Some(e);
                            break;
                        }
                    }
                }
                // The bytes that landed, then how it ended.
                match failed {
                    None => say(&format!("{op} {at}")),
                    Some(e) => say(&format!(
                        "{op} {at} errno {}",
                        e.raw_os_error().unwrap_or(-1)
                    )),
                }
            }
            "tsetlen" => {
                let (h, len) = (arg(), num(arg()));
                report(&op, files[&h].set_len(len).map(|()| "ok"));
            }
            "tfallocate" => {
                let (h, off, len) = (arg(), num(arg()), num(arg()));
                report(&op, fallocate(&files[&h], off, len).map(|()| "ok"));
            }
            "tfsync" => report(&op, files[&arg()].sync_all().map(|()| "ok")),
            "tfdatasync" => report(&op, files[&arg()].sync_data().map(|()| "ok")),
            other => panic!("unknown operation `{other}`"),
        }
    }
    println!("ready");
    std::io::stdout().flush().unwrap();
    loop {
        std::thread::sleep(std::time::Duration::from_secs(3600));
    }
}
