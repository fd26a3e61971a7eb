//! NBD server. (Helper C: implement.)
