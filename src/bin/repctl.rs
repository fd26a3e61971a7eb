//! repctl: talks to a node's control socket. (Helper D.)
fn main() {}
