//! Node state machine. (Helper D: implement.)
