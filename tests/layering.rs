//! The crate's layering, as `src/lib.rs` draws it, checked against the code.
//!
//! `src/lib.rs` has a map: rows of modules, each row above the rows it may
//! import, with the library's rows first and the clients' rows after a
//! `---` line. This test reads the map and every `crate::` path in each
//! module's source (comments skipped), and fails on:
//! - an import of a module on the same row or a row above (a cycle, or an
//!   upward edge), but for test code's use of `testing`;
//! - a library module importing a client, or anything importing the daemon
//!   but the daemon itself;
//! - a module missing from the map, or a name in the map that is no module;
//! - a crate named where only one module may name it (RocksDB, the HTTP
//!   client, the FUSE library).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// The map: module name → (section: 0 library / 1 clients, row from the
/// bottom of its section).
struct Map {
    at: BTreeMap<String, (usize, usize)>,
}

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn read_map(lib: &str) -> Map {
    let doc: Vec<&str> = lib.lines().filter_map(|l| l.strip_prefix("//!")).map(str::trim).collect();
    let start = doc.iter().position(|l| *l == "```text layering").expect("src/lib.rs has a ```text layering block");
    let end = start + 1 + doc[start + 1..].iter().position(|l| l.starts_with("```")).expect("the block ends");
    let mut sections: Vec<Vec<Vec<String>>> = vec![Vec::new()];
    for line in &doc[start + 1..end] {
        if line.starts_with("---") {
            sections.push(Vec::new());
            continue;
        }
        let names = line.split(" : ").next().unwrap_or("");
        let row: Vec<String> = names.split_whitespace().map(str::to_string).collect();
        if !row.is_empty() {
            sections.last_mut().unwrap().push(row);
        }
    }
    assert_eq!(sections.len(), 2, "the map has a library section, `---`, and a clients section");
    let mut at = BTreeMap::new();
    for (s, rows) in sections.iter().enumerate() {
        // Rows are written top (most dependent) first.
        for (r, row) in rows.iter().rev().enumerate() {
            for m in row {
                assert!(at.insert(m.clone(), (s, r)).is_none(), "{m} is in the map twice");
            }
        }
    }
    Map { at }
}

/// The modules `pub mod x;` declares in src/lib.rs.
fn declared(lib: &str) -> BTreeSet<String> {
    lib.lines().filter_map(|l| l.trim().strip_prefix("pub mod ")?.strip_suffix(';').map(str::to_string)).collect()
}

fn sources(module: &str) -> Vec<PathBuf> {
    let src = root().join("src");
    let mut out = Vec::new();
    let file = src.join(format!("{module}.rs"));
    if file.is_file() {
        out.push(file);
    }
    let mut dirs = vec![src.join(module)];
    while let Some(d) = dirs.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else { continue };
        for e in entries {
            let p = e.unwrap().path();
            if p.is_dir() {
                dirs.push(p);
            } else if p.extension().is_some_and(|x| x == "rs") {
                out.push(p);
            }
        }
    }
    assert!(!out.is_empty(), "no source for module {module}");
    out
}

/// Code lines of a file, comments dropped, each with whether it is test
/// code (a `tests.rs` file, or after a `#[cfg(test)]` line).
fn code(path: &Path) -> Vec<(usize, String, bool)> {
    let text = std::fs::read_to_string(path).unwrap();
    let mut test = path.file_name().is_some_and(|n| n == "tests.rs");
    let mut out = Vec::new();
    for (i, l) in text.lines().enumerate() {
        test |= l.trim() == "#[cfg(test)]";
        if !l.trim_start().starts_with("//") {
            out.push((i + 1, l.split(" // ").next().unwrap_or("").to_string(), test));
        }
    }
    out
}

/// The top-level modules a line names through `crate::`.
fn crate_refs(line: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = line;
    while let Some(i) = rest.find("crate::") {
        // `hyperbox_crate::` and the like are not ours.
        let before = rest[..i].chars().last();
        rest = &rest[i + "crate::".len()..];
        if before.is_some_and(|c| c.is_alphanumeric() || c == '_') {
            continue;
        }
        if let Some(group) = rest.strip_prefix('{') {
            let inner = &group[..group.find('}').unwrap_or(group.len())];
            out.extend(inner.split(',').filter_map(|item| ident(item.trim())));
        } else if let Some(m) = ident(rest) {
            out.push(m);
        }
    }
    out
}

fn ident(s: &str) -> Option<String> {
    let id: String = s.chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect();
    (!id.is_empty()).then_some(id)
}

/// Every upward or sideways import, as `file:line: a -> b (why)`.
fn violations(map: &Map) -> Vec<String> {
    let mut bad = Vec::new();
    for (module, &(section, row)) in &map.at {
        for file in sources(module) {
            let shown = file.strip_prefix(root()).unwrap().display().to_string();
            for (n, line, test) in code(&file) {
                for dep in crate_refs(&line) {
                    if &dep == module || dep == "self" || dep == "super" || (test && dep == "testing") {
                        continue;
                    }
                    let why = match map.at.get(&dep) {
                        None => Some("not a module in the map".to_string()),
                        Some(_) if dep == "daemon" => Some("nothing imports the daemon".into()),
                        Some(&(s, _)) if s > section => Some("the library never imports a client".into()),
                        Some(&(s, r)) if s == section && r >= row => {
                            Some(if r == row { "same row".into() } else { "upward".into() })
                        }
                        _ => None,
                    };
                    if let Some(why) = why {
                        bad.push(format!("{shown}:{n}: {module} -> {dep} ({why})"));
                    }
                }
            }
        }
    }
    bad
}

#[test]
fn imports_follow_the_map_in_lib_rs() {
    let lib = std::fs::read_to_string(root().join("src/lib.rs")).unwrap();
    let map = read_map(&lib);
    let declared = declared(&lib);
    let mapped: BTreeSet<String> = map.at.keys().cloned().collect();
    assert_eq!(declared, mapped, "src/lib.rs's `pub mod`s and its map differ");
    let bad = violations(&map);
    assert!(bad.is_empty(), "imports against the map in src/lib.rs:\n{}", bad.join("\n"));
}

/// The map check can fail: the same map with two rows swapped finds the
/// edges between them.
#[test]
fn an_upward_import_is_found() {
    let lib = std::fs::read_to_string(root().join("src/lib.rs")).unwrap();
    let mut map = read_map(&lib);
    // The store sits above the fetcher: the fetcher's imports of it go up.
    let fetcher = map.at["fetcher"];
    map.at.insert("store".into(), (fetcher.0, fetcher.1 + 1));
    let bad = violations(&map);
    assert!(bad.iter().any(|v| v.contains("fetcher -> store (upward)")), "not found: {bad:?}");
    assert_eq!(crate_refs("use crate::{digest::Digest, store};"), ["digest", "store"]);
    assert_eq!(crate_refs("let x = crate::oci::rfc3339(t); // crate::daemon"), ["oci", "daemon"]);
    assert!(crate_refs("use hyperbox_crate::x;").is_empty());
}

/// Only one module names each of these crates.
#[test]
fn one_module_names_each_backend() {
    let map = read_map(&std::fs::read_to_string(root().join("src/lib.rs")).unwrap());
    for (krate, owner) in [("rocksdb::", "store"), ("reqwest::", "registry"), ("fuser::", "")] {
        for module in map.at.keys() {
            if module == owner {
                continue;
            }
            for file in sources(module) {
                for (n, line, _) in code(&file) {
                    assert!(!line.contains(krate), "{}:{n} names {krate} (only {owner:?} may)", file.display());
                }
            }
        }
    }
}
