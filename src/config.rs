//! Resource configuration. (Helper D: implement.)
