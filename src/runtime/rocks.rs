//! Opening a RocksDB database that another process may still hold for a moment: the state
//! store and the table store share this.

use std::path::Path;
use std::time::{Duration, Instant};

use rocksdb::{ColumnFamilyDescriptor, Options, DB};
use tracing::warn;

use super::backoff::Backoff;

/// How long a store held by another process is waited for.
const LOCK_PATIENCE: Duration = Duration::from_secs(60);

/// Opens the RocksDB database in `directory` with `families` (each with `family_options`).
/// Another process with the same instance may still hold it for a moment (a zombie being
/// fenced), so a held lock is waited for, up to a minute; any other error comes back at once.
pub(super) fn open_waiting_for_lock(
    options: &Options,
    directory: &Path,
    families: &[String],
    family_options: &dyn Fn(&str) -> Options,
    what: &str,
) -> Result<DB, rocksdb::Error> {
    let deadline = Instant::now() + LOCK_PATIENCE;
    let mut pauses = Backoff::new(Duration::from_millis(200), Duration::from_secs(2));
    loop {
        let descriptors = families.iter().map(|name| ColumnFamilyDescriptor::new(name, family_options(name)));
        match DB::open_cf_descriptors(options, directory, descriptors) {
            Err(error) if is_lock_held(&error) && Instant::now() < deadline => {
                warn!(path = %directory.display(), %error, "{what} is locked by another process; waiting");
                std::thread::sleep(pauses.pause());
            }
            opened => return opened,
        }
    }
}

/// Whether opening failed because another process holds the database's lock (RocksDB says
/// so only in the message).
pub(super) fn is_lock_held(error: &rocksdb::Error) -> bool {
    error.to_string().contains("lock")
}
