//! repd: runs one node of a resource in the foreground. (Helper D.)
fn main() {}
