//! Fault-injecting wrapper engine for tests. (Helper A: implement.)
