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
            other => panic!("unknown operation `{other}`"),
        }
    }
    println!("ready");
    std::io::stdout().flush().unwrap();
    loop {
        std::thread::sleep(std::time::Duration::from_secs(3600));
    }
}
