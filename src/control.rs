//! Control socket protocol. (Helper D: implement.)
