//! The keyring: the numbered master keys that seal provider secrets, in a file that never
//! enters a table (`pg_keypool.master_key_file`, by default `pg_keypool.keyring` in the data
//! directory, mode 0600), the way pgsodium and Supabase Vault keep their root key out of the
//! database. Dumps, table files and logical replicas carry ciphertext only; a cluster needs the
//! file to read its secrets (pg_basebackup copies it with the data directory).
//!
//! The file is text, one key per line: `<number> <64 hex digits>`, plus `#` comments. Keys are
//! only ever added: the first one when a database first seals a secret and no keyring exists,
//! then one per `keypool_rotate_master_key()`. Writers hold an exclusive `flock` on the file and
//! replace it atomically (a new file renamed over the old), so a crash never leaves half a key.
//! Each backend caches what it read and reads again when it needs a number it has not seen.

use std::cell::RefCell;
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

use pgrx::pg_sys;

use crate::errors::{self, Code};
use crate::policy::seal::MasterKey;
use crate::settings;

const HEADER: &str = "\
# pg_keypool keyring: the master keys that seal this cluster's provider secrets.
# Keep it private (mode 0600) and safe: without it the sealed secrets cannot be read.
# Standbys and restored backups need it too (pg_basebackup copies it; copy it again after
# keypool_rotate_master_key()). One key per line: <number> <64 hex digits>. Never edit a key.
";

/// Parses a keyring file's text: its keys, in file order.
pub fn parse(text: &str) -> Result<Vec<MasterKey>, String> {
    let mut keys: Vec<MasterKey> = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let bad = || format!("line {} is not \"<number> <64 hex digits>\"", i + 1);
        let (number, hex) = line.split_once(char::is_whitespace).ok_or_else(bad)?;
        let number: u32 = number.parse().map_err(|_| bad())?;
        let hex = hex.trim();
        if number == 0 || hex.len() != 64 {
            return Err(bad());
        }
        let mut bytes = [0u8; 32];
        for (j, b) in bytes.iter_mut().enumerate() {
            *b = u8::from_str_radix(hex.get(2 * j..2 * j + 2).ok_or_else(bad)?, 16).map_err(|_| bad())?;
        }
        if keys.iter().any(|k| k.number == number) {
            return Err(format!("key {number} appears twice (line {})", i + 1));
        }
        keys.push(MasterKey::new(number, bytes));
    }
    Ok(keys)
}

/// The text of a keyring holding `keys`.
pub fn format(keys: &[MasterKey]) -> String {
    let mut out = String::from(HEADER);
    for k in keys {
        out.push_str(&k.number.to_string());
        out.push(' ');
        for b in k.bytes() {
            out.push_str(&format!("{b:02x}"));
        }
        out.push('\n');
    }
    out
}

/// The keyring file's path (`pg_keypool.master_key_file`, relative to the data directory).
pub fn path() -> PathBuf {
    let setting = settings::MASTER_KEY_FILE
        .get()
        .map(|s| s.to_string_lossy().into_owned())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| settings::DEFAULT_MASTER_KEY_FILE.to_string());
    let p = PathBuf::from(setting);
    if p.is_absolute() {
        return p;
    }
    let dir = unsafe { std::ffi::CStr::from_ptr(pg_sys::DataDir) };
    PathBuf::from(dir.to_string_lossy().into_owned()).join(p)
}

fn shown(path: &Path) -> String {
    path.display().to_string()
}

fn io_error(what: &str, path: &Path, e: std::io::Error) -> ! {
    errors::error(
        Code::ERRCODE_IO_ERROR,
        format!("could not {what} pg_keypool's keyring file \"{}\": {e}", shown(path)),
    )
    .hint("The keyring is set by pg_keypool.master_key_file; the server's operating-system user must be able to read and write it.")
    .raise()
}

/// Reads and checks the file: `None` when it does not exist.
fn read(path: &Path) -> Option<Vec<MasterKey>> {
    let mut file = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
        Err(e) => io_error("open", path, e),
    };
    let meta = file.metadata().unwrap_or_else(|e| io_error("inspect", path, e));
    // Like the data directory's own files: readable by the group only in a cluster initialised
    // with group access (initdb --allow-group-access; pg_basebackup then copies files 0640).
    let group_may_read = unsafe { pg_sys::data_directory_mode } & 0o040 != 0;
    let forbidden = if group_may_read { 0o027 } else { 0o077 };
    if meta.permissions().mode() & forbidden != 0 {
        errors::error(
            Code::ERRCODE_CONFIG_FILE_ERROR,
            format!("pg_keypool's keyring file \"{}\" is open to other users", shown(path)),
        )
        .detail("The keyring holds the master keys of every sealed provider secret.")
        .hint(format!("chmod 0600 {}", shown(path)))
        .raise();
    }
    let mut text = String::new();
    file.read_to_string(&mut text)
        .unwrap_or_else(|e| io_error("read", path, e));
    match parse(&text) {
        Ok(keys) => Some(keys),
        Err(why) => errors::error(
            Code::ERRCODE_CONFIG_FILE_ERROR,
            format!("pg_keypool's keyring file \"{}\" is damaged: {why}", shown(path)),
        )
        .hint("Restore it from a backup of the keyring; never edit a key by hand.")
        .raise(),
    }
}

thread_local! {
    /// What this backend last read: the path and its keys.
    static CACHE: RefCell<Option<(PathBuf, Vec<MasterKey>)>> = const { RefCell::new(None) };
}

fn cached(path: &Path) -> Option<Vec<MasterKey>> {
    CACHE.with_borrow(|c| c.as_ref().filter(|(p, _)| p == path).map(|(_, k)| k.clone()))
}

fn remember(path: &Path, keys: &[MasterKey]) {
    CACHE.with_borrow_mut(|c| *c = Some((path.to_path_buf(), keys.to_vec())));
}

/// Master key `number`, from the cache or the file; `Err` says why it is not there.
pub fn key(number: u32) -> Result<MasterKey, Missing> {
    let path = path();
    if let Some(k) = cached(&path).and_then(|keys| keys.into_iter().find(|k| k.number == number)) {
        return Ok(k);
    }
    match read(&path) {
        None => Err(Missing::File(path)),
        Some(keys) => {
            remember(&path, &keys);
            keys.into_iter().find(|k| k.number == number).ok_or(Missing::Key(path))
        }
    }
}

/// Why a master key could not be found.
pub enum Missing {
    /// The keyring file does not exist.
    File(PathBuf),
    /// The file exists but has no key of that number.
    Key(PathBuf),
}

/// The newest key of the keyring, creating the keyring with a first key when there is none.
/// Only for a database that has sealed nothing yet.
pub fn newest_or_first() -> MasterKey {
    let path = path();
    if let Some(keys) = read(&path) {
        remember(&path, &keys);
        if let Some(k) = keys.iter().max_by_key(|k| k.number) {
            return k.clone();
        }
    }
    let first = MasterKey::generate(1);
    let tmp = temporary(&path);
    write_new(&tmp, std::slice::from_ref(&first));
    // link() fails if another backend created the keyring meanwhile: then theirs stands.
    let linked = fs::hard_link(&tmp, &path);
    let _ = fs::remove_file(&tmp);
    match linked {
        Ok(()) => {
            sync_dir(&path);
            remember(&path, std::slice::from_ref(&first));
            first
        }
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            let keys = read(&path).unwrap_or_default();
            remember(&path, &keys);
            keys.into_iter()
                .max_by_key(|k| k.number)
                .unwrap_or_else(|| io_error("read", &path, std::io::Error::other("the keyring is empty")))
        }
        Err(e) => io_error("create", &path, e),
    }
}

/// Adds a new random key to the keyring (which must exist) and returns it.
pub fn add() -> MasterKey {
    let path = path();
    loop {
        let file = match OpenOptions::new().read(true).open(&path) {
            Ok(f) => f,
            Err(e) => io_error("open", &path, e),
        };
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) } != 0 {
            io_error("lock", &path, std::io::Error::last_os_error());
        }
        // Someone replaced the file while we waited for the lock: lock the new one.
        let locked = file.metadata().map(|m| m.ino()).ok();
        let current = fs::metadata(&path).map(|m| m.ino()).ok();
        if locked != current {
            continue;
        }
        let mut keys = read(&path).unwrap_or_default();
        let number = keys.iter().map(|k| k.number).max().unwrap_or(0) + 1;
        let new = MasterKey::generate(number);
        keys.push(new.clone());
        let tmp = temporary(&path);
        write_new(&tmp, &keys);
        if let Err(e) = fs::rename(&tmp, &path) {
            let _ = fs::remove_file(&tmp);
            io_error("replace", &path, e);
        }
        sync_dir(&path);
        remember(&path, &keys);
        drop(file);
        return new;
    }
}

fn temporary(path: &Path) -> PathBuf {
    let mut name = path.file_name().map(|n| n.to_os_string()).unwrap_or_default();
    name.push(format!(".tmp.{}", std::process::id()));
    path.with_file_name(name)
}

fn write_new(tmp: &Path, keys: &[MasterKey]) {
    let _ = fs::remove_file(tmp);
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(tmp)
        .unwrap_or_else(|e| io_error("create", tmp, e));
    f.write_all(format(keys).as_bytes())
        .and_then(|_| f.sync_all())
        .unwrap_or_else(|e| io_error("write", tmp, e));
}

fn sync_dir(path: &Path) {
    if let Some(dir) = path.parent() {
        if let Ok(d) = File::open(dir) {
            let _ = d.sync_all();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_keyring_reads_back_what_was_written() {
        let keys = vec![MasterKey::generate(1), MasterKey::generate(2)];
        let text = format(&keys);
        let back = parse(&text).unwrap();
        assert_eq!(back.len(), 2);
        for (a, b) in keys.iter().zip(&back) {
            assert_eq!(a.number, b.number);
            assert_eq!(a.bytes(), b.bytes());
        }
        assert!(text.starts_with("# pg_keypool keyring"));
    }

    #[test]
    fn damaged_keyrings_are_refused() {
        let good = "1 ".to_string() + &"ab".repeat(32);
        assert!(parse(&good).is_ok());
        assert!(parse("").unwrap().is_empty());
        assert!(parse(&("0 ".to_string() + &"ab".repeat(32))).is_err());
        assert!(parse(&("1 ".to_string() + &"ab".repeat(31))).is_err());
        assert!(parse(&("1 ".to_string() + &"zz".repeat(32))).is_err());
        assert!(parse(&("x ".to_string() + &"ab".repeat(32))).is_err());
        assert!(parse(&format!("{good}\n{good}")).unwrap_err().contains("twice"));
        assert!(parse("1").is_err());
    }
}
