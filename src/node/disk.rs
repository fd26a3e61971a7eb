//! The node's persistent disk state, kept in the volume's superblock.

use super::DiskState;
use crate::volume::{Volume, VolumeError};

/// The disk state recorded in the superblock.
pub fn load(volume: &Volume) -> DiskState {
    // MERGE: read from Volume::superblock() once the volume lands on main.
    let _ = volume;
    DiskState::Inconsistent
}

/// Records `state` in the superblock (durably).
pub fn store(volume: &Volume, state: DiskState) -> Result<(), VolumeError> {
    // MERGE: Volume::update_superblock once the volume lands on main.
    let _ = (volume, state);
    Err(VolumeError::Stopped("superblock updates are not part of this build yet".into()))
}
