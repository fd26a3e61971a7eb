//! Human-readable sizes and durations. (Helper D: implement.)
