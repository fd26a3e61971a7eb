//! Async NBD client for tests and benchmarks. (Helper C: implement.)
