//! The dependency rule of docs/architecture.md ("Module map and dependency
//! rule"), checked on every `cargo test`: each top-level module of the
//! crate may import only the modules listed for it in [`RULE`].
//!
//! The check reads every non-test `.rs` file under `src/` and looks at the
//! paths it names: `use crate::x…`, `crate::x::…` anywhere in code (grouped
//! `use crate::{a, b}` too, over several lines), and `super::super::…`
//! chains that climb out of the file's top-level module. Comments (and so
//! doc links) are not imports. Test code is skipped: files declared under
//! `#[cfg(test)]`, files named `tests.rs` or `*_tests.rs`, and
//! `#[cfg(test)]` items inside a file. A violation names file:line, the
//! two modules and what the importer may use.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Who may import whom. A module not listed here fails the check (add it,
/// and a line in docs/architecture.md, when you add a module).
const RULE: &[(&str, &[&str])] = &[
    // Leaves: the shared vocabulary and small utilities.
    ("model", &[]),
    ("units", &[]),
    ("ports", &[]),
    ("errors", &[]),
    ("stats", &[]),
    ("tls", &[]),
    ("event", &["model"]),
    // The IO engine.
    ("io", &["model", "units"]),
    // Front end and control plane: independent of each other and of repl.
    ("nbd", &["model", "units", "tls"]),
    ("control", &["model", "units", "event"]),
    // Automatic failover's pure core (terms, leases, the witness's vote and
    // state file, the controller): no IO of its own beyond the state file.
    ("failover", &["model", "units"]),
    // The local volume.
    ("volume", &["io", "model", "units"]),
    // The config file: its defaults and limits come from the layers it
    // configures.
    ("config", &["model", "units", "io", "volume", "nbd", "failover", "tls"]),
    // Replication: never config, node or control.
    ("repl", &["model", "units", "event", "volume", "io", "failover", "tls"]),
    // The composition root.
    (
        "node",
        &[
            "model", "units", "errors", "stats", "event", "io", "volume", "nbd", "control", "config", "repl",
            "failover", "tls",
        ],
    ),
    // Man pages and completions of the binaries.
    ("clidoc", &[]),
    // Entry points of the fuzz targets: a harness over every parser.
    ("fuzzing", &["model", "units", "io", "volume", "nbd", "control", "config", "repl", "tls"]),
];

/// Files that may import anything: the crate root and the binaries.
fn unrestricted(module: &str) -> bool {
    module == "lib" || module == "bin"
}

#[derive(Debug, PartialEq, Eq)]
struct Violation {
    file: String,
    line: usize,
    from: String,
    to: String,
    text: String,
}

impl std::fmt::Display for Violation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let allowed = RULE.iter().find(|(m, _)| *m == self.from).map_or(&[][..], |(_, a)| a);
        let allowed = if allowed.is_empty() { "nothing in the crate".to_string() } else { allowed.join(", ") };
        write!(
            f,
            "{}:{}: `{}` may not import `{}` (it may import: {allowed}; docs/architecture.md): {}",
            self.file, self.line, self.from, self.to, self.text
        )
    }
}

/// `src/repl/decide/sim.rs` -> `["repl", "decide", "sim"]`; `mod.rs` and
/// `lib.rs` name their directory (the crate root is `["lib"]`).
fn module_path(rel: &Path) -> Vec<String> {
    let mut parts: Vec<String> = rel.iter().map(|p| p.to_string_lossy().into_owned()).collect();
    let last = parts.pop().unwrap_or_default();
    let stem = last.trim_end_matches(".rs").to_string();
    if stem != "mod" {
        parts.push(stem);
    }
    parts
}

/// The code of one line: without a `//` comment (a line that is all
/// comment gives ""), and with the contents of string literals dropped.
fn code_of(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut in_str = false;
    let mut prev = ' ';
    let mut chars = line.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '"' if prev != '\\' => {
                in_str = !in_str;
                out.push(c);
            }
            '/' if !in_str && chars.peek() == Some(&'/') => break,
            _ if in_str => {}
            _ => out.push(c),
        }
        prev = c;
    }
    out
}

fn ident_at(s: &str) -> &str {
    let end = s.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).unwrap_or(s.len());
    &s[..end]
}

/// The top-level modules named by grouped imports `crate::{a, b::c, …}`
/// starting at `text` (just after the `{`): the first segment of each item
/// at depth 0.
fn grouped(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut depth = 0;
    let mut item_start = true;
    let mut rest = text;
    while let Some(c) = rest.chars().next() {
        match c {
            '{' => depth += 1,
            '}' if depth == 0 => break,
            '}' => depth -= 1,
            ',' if depth == 0 => item_start = true,
            c if item_start && (c.is_ascii_alphabetic() || c == '_') => {
                out.push(ident_at(rest).to_string());
                item_start = false;
            }
            _ => {}
        }
        rest = &rest[c.len_utf8()..];
    }
    out
}

/// Lines of `src` that are test code (`#[cfg(test)]` items), to skip, and
/// the child module files declared under `#[cfg(test)]` (as given by
/// `#[path]` or by name).
fn test_code(src: &str) -> (BTreeSet<usize>, Vec<(Option<String>, String)>) {
    let lines: Vec<&str> = src.lines().collect();
    let mut skip = BTreeSet::new();
    let mut test_mods = Vec::new();
    let mut i = 0;
    while i < lines.len() {
        if lines[i].trim() != "#[cfg(test)]" {
            i += 1;
            continue;
        }
        skip.insert(i);
        let mut path_attr = None;
        let mut j = i + 1;
        while j < lines.len() && lines[j].trim_start().starts_with("#[") {
            let t = lines[j].trim();
            if let Some(p) = t.strip_prefix("#[path = \"").and_then(|p| p.strip_suffix("\"]")) {
                path_attr = Some(p.to_string());
            }
            skip.insert(j);
            j += 1;
        }
        let Some(item) = lines.get(j) else { break };
        let t = item.trim();
        let decl = t.strip_prefix("pub ").unwrap_or(t).strip_prefix("pub(crate) ").unwrap_or(t);
        if let Some(name) = decl.strip_prefix("mod ").and_then(|n| n.strip_suffix(';')) {
            test_mods.push((path_attr, name.to_string()));
            skip.insert(j);
            i = j + 1;
            continue;
        }
        // An item: skip to its closing line at the same indentation.
        let indent = item.len() - item.trim_start().len();
        skip.insert(j);
        if t.ends_with('{') {
            let mut k = j + 1;
            while k < lines.len() {
                skip.insert(k);
                let l = lines[k];
                if l.trim_start().starts_with('}') && l.len() - l.trim_start().len() == indent {
                    break;
                }
                k += 1;
            }
            j = k;
        }
        i = j + 1;
    }
    (skip, test_mods)
}

/// The violations of one file of module path `path` (e.g. `["repl",
/// "engine"]`).
fn check_source(file: &str, path: &[String], src: &str, skip: &BTreeSet<usize>) -> Vec<Violation> {
    let Some(top) = path.first().map(String::as_str) else { return Vec::new() };
    if unrestricted(top) {
        return Vec::new();
    }
    let allowed: BTreeSet<&str> = RULE.iter().find(|(m, _)| *m == top).map_or_else(
        || BTreeSet::from(["<module missing from RULE in src/layering_tests.rs>"]),
        |(_, a)| a.iter().copied().collect(),
    );
    let lines: Vec<&str> = src.lines().collect();
    let mut out = Vec::new();
    for (n, line) in lines.iter().enumerate() {
        if skip.contains(&n) {
            continue;
        }
        let code = code_of(line);
        let mut named: Vec<String> = Vec::new();
        // `crate::x`, `crate::{a, b}` (maybe continued on later lines).
        let mut rest = code.as_str();
        while let Some(at) = rest.find("crate::") {
            let before = rest[..at].chars().last();
            let after = &rest[at + "crate::".len()..];
            rest = after;
            if before.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_' || c == '$') {
                continue; // `$crate::`, `repblock_crate::`, …
            }
            if let Some(group) = after.strip_prefix('{') {
                let mut text = group.to_string();
                let mut k = n + 1;
                while text.matches('{').count() >= text.matches('}').count() && k < lines.len() {
                    text.push_str(&code_of(lines[k]));
                    k += 1;
                }
                named.extend(grouped(&text));
            } else {
                named.push(ident_at(after).to_string());
            }
        }
        // `super::super::…` climbing to the crate root.
        let mut rest = code.as_str();
        while let Some(at) = rest.find("super::") {
            let chain = &rest[at..];
            let mut s = chain;
            let mut k = 0;
            while let Some(r) = s.strip_prefix("super::") {
                s = r;
                k += 1;
            }
            // A file at depth d reaches the crate root with d supers.
            if k >= path.len() {
                named.push(ident_at(s).to_string());
            }
            rest = s;
        }
        for to in named {
            if to.is_empty() || to == top || to == "self" || allowed.contains(to.as_str()) {
                continue;
            }
            out.push(Violation {
                file: file.to_string(),
                line: n + 1,
                from: top.to_string(),
                to,
                text: line.trim().to_string(),
            });
        }
    }
    out
}

fn rs_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let mut entries: Vec<_> = std::fs::read_dir(dir).expect("read src/").flatten().map(|e| e.path()).collect();
    entries.sort();
    for p in entries {
        if p.is_dir() {
            rs_files(&p, out);
        } else if p.extension().is_some_and(|e| e == "rs") {
            out.push(p);
        }
    }
}

/// Every violation under `root` (the crate's `src/`).
fn check_tree(root: &Path) -> Vec<Violation> {
    let mut files = Vec::new();
    rs_files(root, &mut files);
    let sources: BTreeMap<PathBuf, String> =
        files.iter().map(|p| (p.clone(), std::fs::read_to_string(p).expect("read a source file"))).collect();
    // Files that only tests compile.
    let mut test_files = BTreeSet::new();
    for (p, src) in &sources {
        let (_, mods) = test_code(src);
        let dir = p.parent().unwrap_or(root);
        let is_mod_rs = matches!(p.file_name().and_then(|n| n.to_str()), Some("mod.rs" | "lib.rs"));
        let child_dir = if is_mod_rs { dir.to_path_buf() } else { dir.join(p.file_stem().unwrap_or_default()) };
        for (path_attr, name) in mods {
            match path_attr {
                Some(rel) => {
                    test_files.insert(dir.join(rel));
                }
                None => {
                    test_files.insert(child_dir.join(format!("{name}.rs")));
                    test_files.insert(child_dir.join(&name).join("mod.rs"));
                }
            }
        }
    }
    let mut out = Vec::new();
    for (p, src) in &sources {
        let name = p.file_name().and_then(|n| n.to_str()).unwrap_or_default();
        if test_files.contains(p) || name == "tests.rs" || name.ends_with("_tests.rs") {
            continue;
        }
        let rel = p.strip_prefix(root).unwrap_or(p);
        // A directory module's files belong to a test module too when it is one.
        if test_files.iter().any(|t| t.file_name() == Some("mod.rs".as_ref()) && p.starts_with(t.parent().unwrap())) {
            continue;
        }
        let (skip, _) = test_code(src);
        out.extend(check_source(&format!("src/{}", rel.display()), &module_path(rel), src, &skip));
    }
    out
}

#[test]
fn every_module_imports_only_what_the_dependency_rule_allows() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let violations = check_tree(&root);
    let report: Vec<String> = violations.iter().map(ToString::to_string).collect();
    assert!(report.is_empty(), "the dependency rule is broken:\n{}", report.join("\n"));
}

#[test]
fn every_top_level_module_has_a_rule() {
    let lib = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("src/lib.rs")).unwrap();
    for line in lib.lines() {
        let t = line.trim();
        let Some(name) = t.strip_prefix("pub mod ").or_else(|| t.strip_prefix("mod ")) else { continue };
        let name = name.trim_end_matches(';');
        if name.ends_with("_tests") {
            continue;
        }
        assert!(RULE.iter().any(|(m, _)| *m == name), "module `{name}` has no line in RULE (src/layering_tests.rs)");
    }
}

/// The checker itself: each kind of forbidden path is found, with its line.
#[test]
fn the_checker_finds_each_kind_of_forbidden_import() {
    let path = |s: &str| s.split('/').map(String::from).collect::<Vec<_>>();
    let src = "\
//! Docs may name [`crate::node::Node`].
use crate::model::Role;
use crate::node::DiskState;
use crate::{model::Lsn, config::Config,
    control::Event};
fn f() { let _ = crate::node::daemon::run(); } // crate::config in a comment
fn g() { let _ = super::super::node::x(); let _ = \"crate::config\"; }
#[cfg(test)]
mod tests {
    use crate::node::Role;
}
";
    let v = check_source("src/repl/engine.rs", &path("repl/engine"), src, &test_code(src).0);
    let got: Vec<(usize, &str)> = v.iter().map(|v| (v.line, v.to.as_str())).collect();
    assert_eq!(got, [(3, "node"), (4, "config"), (4, "control"), (6, "node"), (7, "node")], "{v:#?}");
    assert!(v[0].to_string().starts_with("src/repl/engine.rs:3: `repl` may not import `node`"), "{}", v[0]);
    // The same lines are fine for node; a leaf may import nothing.
    assert!(check_source("src/node/mod.rs", &path("node/mod"), src, &test_code(src).0).is_empty());
    let leaf = check_source("src/model.rs", &path("model"), "use crate::units::Size;\n", &BTreeSet::new());
    assert_eq!(leaf.len(), 1);
    assert!(leaf[0].to_string().contains("it may import: nothing in the crate"), "{}", leaf[0]);
    // `super::` inside the module is no escape.
    let inner = "use super::proto::Message;\nuse super::super::decide::X;\n";
    assert!(check_source("src/repl/decide/sim.rs", &path("repl/decide/sim"), inner, &BTreeSet::new()).is_empty());
}
