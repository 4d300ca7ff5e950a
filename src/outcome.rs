//! How a request was answered: one enum feeds the `x-fallthrough-cache` header, logs and metrics.

/// Where an answer came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Outcome {
    /// A fresh entry from the memory tier.
    Memory,
    /// A fresh entry from the disk tier (now promoted to memory).
    Disk,
    /// A fresh entry from the tier several instances share (now promoted to the local ones).
    Shared,
    /// Not cached (or not fresh): the upstream answered.
    Miss,
    /// A stale entry, served because the upstream could not answer.
    Stale,
    /// The cache was skipped on purpose (`cache-control: no-cache`, or a path never cached).
    Bypass,
}

impl Outcome {
    /// Every outcome, for metrics that list them all.
    pub const ALL: [Outcome; 6] = [
        Outcome::Memory,
        Outcome::Disk,
        Outcome::Shared,
        Outcome::Miss,
        Outcome::Stale,
        Outcome::Bypass,
    ];

    /// The name used in the header, logs and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Memory => "memory",
            Outcome::Disk => "disk",
            Outcome::Shared => "shared",
            Outcome::Miss => "miss",
            Outcome::Stale => "stale",
            Outcome::Bypass => "bypass",
        }
    }

    /// Whether the answer came from the cache.
    pub fn is_hit(self) -> bool {
        matches!(
            self,
            Outcome::Memory | Outcome::Disk | Outcome::Shared | Outcome::Stale
        )
    }
}

impl std::fmt::Display for Outcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}
