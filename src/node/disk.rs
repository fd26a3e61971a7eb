//! The node's persistent disk state, kept in the volume's superblock.

use super::DiskState;
use crate::volume::{self, Volume, VolumeError};

/// The superblock's byte and the node's vocabulary name the same states.
impl From<volume::DiskState> for DiskState {
    fn from(d: volume::DiskState) -> DiskState {
        match d {
            volume::DiskState::Uptodate => DiskState::UpToDate,
            volume::DiskState::Consistent => DiskState::Consistent,
            volume::DiskState::Outdated => DiskState::Outdated,
            volume::DiskState::Inconsistent => DiskState::Inconsistent,
            volume::DiskState::Diskless => DiskState::Diskless,
            volume::DiskState::Unknown => DiskState::Unknown,
        }
    }
}

impl From<DiskState> for volume::DiskState {
    fn from(d: DiskState) -> volume::DiskState {
        match d {
            DiskState::UpToDate => volume::DiskState::Uptodate,
            DiskState::Consistent => volume::DiskState::Consistent,
            DiskState::Outdated => volume::DiskState::Outdated,
            DiskState::Inconsistent => volume::DiskState::Inconsistent,
            DiskState::Diskless => volume::DiskState::Diskless,
            DiskState::Unknown => volume::DiskState::Unknown,
        }
    }
}

/// The disk state recorded in the superblock.
pub fn load(volume: &Volume) -> DiskState {
    DiskState::from(volume.superblock().disk_state)
}

/// Records `state` in the superblock (written and fdatasync'ed before this
/// returns).
pub fn store(volume: &Volume, state: DiskState) -> Result<(), VolumeError> {
    volume.update_superblock(|sb| sb.disk_state = state.into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_state_round_trips() {
        for d in [
            DiskState::UpToDate,
            DiskState::Consistent,
            DiskState::Outdated,
            DiskState::Inconsistent,
            DiskState::Diskless,
            DiskState::Unknown,
        ] {
            assert_eq!(DiskState::from(volume::DiskState::from(d)), d);
        }
    }
}
