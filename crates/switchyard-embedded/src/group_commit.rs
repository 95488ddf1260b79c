//! What the bus writer and the store committer share: the directory lock and the
//! adaptive linger of a group commit.

use std::fs::{File, OpenOptions};
use std::path::Path;
use std::time::{Duration, Instant};

use switchyard::{Error, Result};

/// Creates `dir` and takes its `LOCK` file (held while the returned file lives or until
/// it is unlocked); [`Error::Locked`] when another process or instance holds it.
pub(crate) fn lock_dir(dir: &Path) -> Result<File> {
    std::fs::create_dir_all(dir)
        .map_err(|e| Error::storage(format!("creating directory {}", dir.display()), e))?;
    let lock_path = dir.join("LOCK");
    let lock_file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .map_err(|e| Error::storage(format!("opening {}", lock_path.display()), e))?;
    if lock_file.try_lock().is_err() {
        return Err(Error::Locked {
            path: dir.to_path_buf(),
        });
    }
    Ok(lock_file)
}

/// Adaptive linger of the group commit: waits for more requests only while the previous
/// group showed heavy concurrency, and never longer than a fraction of one write's cost.
#[derive(Debug)]
pub(crate) struct Linger {
    /// Requests in the previous group.
    pub(crate) last_requests: usize,
    /// How long one wait may take (a quarter of the last write-and-sync, capped).
    pub(crate) budget: Duration,
    /// When the current group started lingering.
    deadline: Option<Instant>,
}

impl Default for Linger {
    fn default() -> Self {
        Linger {
            last_requests: 0,
            budget: Duration::from_micros(50),
            deadline: None,
        }
    }
}

impl Linger {
    /// Requests in a group that count as heavy concurrency.
    const HEAVY: usize = 16;
    /// Longest total linger of one group.
    const MAX: Duration = Duration::from_micros(250);

    pub(crate) fn start_group(&mut self) {
        self.deadline = None;
    }

    pub(crate) fn should_wait(&mut self, have: usize) -> bool {
        if self.last_requests < Self::HEAVY || have >= self.last_requests {
            return false;
        }
        let now = Instant::now();
        let deadline = *self.deadline.get_or_insert(now + Self::MAX);
        now < deadline
    }

    pub(crate) fn observe(&mut self, write: Duration) {
        self.budget = (write / 4).clamp(Duration::from_micros(20), Self::MAX);
    }
}
