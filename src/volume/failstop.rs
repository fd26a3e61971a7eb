//! Why a volume stopped taking writes (fail-stop, design.md §3): a stable
//! kind callers match on, what was being done, and the errno that caused
//! it (after cloud-hypervisor's `block/src/error.rs`).
//!
//! The NBD backend answers by kind: `ENOSPC` for [`FailStopKind::NoSpace`],
//! `EIO` otherwise (node/backend.rs). The text (`Display`) is the reason
//! `status.failed` shows, the `failed` event carries and the log records:
//!
//! ```text
//! write batch (WAL /d/wal/00000003.wal, data /d/data) failed: No space left on device (os error 28) (errno 28)
//! ```
//!
//! A fail-stop has no `source()`: the OS error is rendered from its errno
//! once, in the message, so a chain renderer repeats nothing.

use std::fmt;
use std::io;

use super::VolumeError;

/// What kind of failure stopped the volume. Match on it rather than on the
/// message; new kinds may be added.
#[non_exhaustive]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailStopKind {
    /// The filesystem under the WAL, the data file or the metadata is full
    /// (`ENOSPC`, or `EDQUOT`: a quota).
    NoSpace,
    /// Any other failed read, write or fdatasync (`EIO`, `EROFS`, …): the
    /// disk failed.
    Io,
    /// The volume is closed (or closing): no disk failed.
    Closed,
    /// A task of the volume ended without an answer.
    Internal,
}

impl FailStopKind {
    /// The kind of a failure caused by `errno`.
    pub fn of_errno(errno: i32) -> FailStopKind {
        match errno {
            libc::ENOSPC | libc::EDQUOT => FailStopKind::NoSpace,
            _ => FailStopKind::Io,
        }
    }
}

/// Why the volume stopped taking writes. Cheap to clone: every request
/// refused after the failure carries the first one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FailStop {
    kind: FailStopKind,
    /// What was being done, naming the files: `fdatasync of WAL /d/wal/…`.
    op: String,
    /// The errno of the failed call (EIO when an IO error carried none).
    errno: Option<i32>,
    cause: Cause,
}

/// How the cause is rendered after `"{op} failed: "`.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Cause {
    /// Nothing failed: `op` says it all (the volume is closed).
    None,
    /// The OS's text for `errno`, then `(errno N)`.
    Os,
    /// An error's own text (an IO error without an errno, a task that
    /// ended), then `(errno N)` if there is one.
    Text(String),
    /// A volume error's text, which names its path and OS error already.
    Volume(String),
}

impl FailStop {
    /// `op` failed with the IO error `e`.
    pub fn io(op: impl Into<String>, e: &io::Error) -> FailStop {
        let errno = crate::io::errno_of(e);
        let cause = if e.raw_os_error().is_some() { Cause::Os } else { Cause::Text(e.to_string()) };
        FailStop { kind: FailStopKind::of_errno(errno), op: op.into(), errno: Some(errno), cause }
    }

    /// `op` failed with the volume error `e`; the errno of the IO error it
    /// carries, if any, decides the kind.
    pub fn volume(op: impl Into<String>, e: &VolumeError) -> FailStop {
        let (kind, errno) = match e {
            VolumeError::Stopped(f) => (f.kind, f.errno),
            VolumeError::Io { source, .. } => {
                let errno = crate::io::errno_of(source);
                (FailStopKind::of_errno(errno), Some(errno))
            }
            _ => (FailStopKind::Io, None),
        };
        FailStop { kind, op: op.into(), errno, cause: Cause::Volume(e.to_string()) }
    }

    /// The volume is closed: `what` says so.
    pub fn closed(what: impl Into<String>) -> FailStop {
        FailStop { kind: FailStopKind::Closed, op: what.into(), errno: None, cause: Cause::None }
    }

    /// `op`, a task of the volume, ended without an answer because of `why`.
    pub fn internal(op: impl Into<String>, why: impl fmt::Display) -> FailStop {
        FailStop { kind: FailStopKind::Internal, op: op.into(), errno: None, cause: Cause::Text(why.to_string()) }
    }

    pub fn kind(&self) -> FailStopKind {
        self.kind
    }

    /// What was being done.
    pub fn op(&self) -> &str {
        &self.op
    }

    /// The errno of the failed call, if an OS call failed.
    pub fn errno(&self) -> Option<i32> {
        self.errno
    }
}

impl fmt::Display for FailStop {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.op)?;
        match (&self.cause, self.errno) {
            (Cause::None, _) => Ok(()),
            (Cause::Os, Some(n)) => write!(f, " failed: {} (errno {n})", io::Error::from_raw_os_error(n)),
            (Cause::Os, None) => f.write_str(" failed"),
            (Cause::Text(d), Some(n)) => write!(f, " failed: {d} (errno {n})"),
            (Cause::Text(d) | Cause::Volume(d), _) => write!(f, " failed: {d}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kind_follows_the_errno_and_the_text_names_it_once() {
        let f = FailStop::io("fdatasync of WAL /d/wal/1.wal", &io::Error::from_raw_os_error(libc::EIO));
        assert_eq!((f.kind(), f.errno()), (FailStopKind::Io, Some(libc::EIO)));
        assert_eq!(f.to_string(), "fdatasync of WAL /d/wal/1.wal failed: Input/output error (os error 5) (errno 5)");
        let f = FailStop::io("write batch (WAL /w, data /d)", &io::Error::from_raw_os_error(libc::ENOSPC));
        assert_eq!(f.kind(), FailStopKind::NoSpace);
        assert!(f.to_string().ends_with("failed: No space left on device (os error 28) (errno 28)"), "{f}");
        assert_eq!(FailStop::io("x", &io::Error::from_raw_os_error(libc::EDQUOT)).kind(), FailStopKind::NoSpace);
        // No errno in the error: EIO, and the error's own words.
        let f = FailStop::io("write of /d", &io::Error::new(io::ErrorKind::WriteZero, "short write"));
        assert_eq!((f.kind(), f.to_string().as_str()), (FailStopKind::Io, "write of /d failed: short write (errno 5)"));
        let e = VolumeError::Io { path: "/d/meta".into(), source: io::Error::from_raw_os_error(libc::ENOSPC) };
        let f = FailStop::volume("superblock write", &e);
        assert_eq!((f.kind(), f.errno()), (FailStopKind::NoSpace, Some(libc::ENOSPC)));
        assert_eq!(f.to_string(), format!("superblock write failed: {e}"));
        let f = FailStop::closed("the volume is closed");
        assert_eq!((f.kind(), f.to_string().as_str()), (FailStopKind::Closed, "the volume is closed"));
        let f = FailStop::internal("data file sync task", "panicked");
        assert_eq!(
            (f.kind(), f.to_string().as_str()),
            (FailStopKind::Internal, "data file sync task failed: panicked")
        );
        assert!(std::error::Error::source(&VolumeError::Stopped(f)).is_none(), "the reason is not repeated");
    }
}
