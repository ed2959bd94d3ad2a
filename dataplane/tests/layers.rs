//! The data plane's stage modules layer without cycles: a module's code (comments and
//! its tests aside) names only modules below it. A cycle means a stage cannot be reused
//! by another transport without dragging the pipeline in; this test names the cycle.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// `crate::NAME` references in `src`, comment lines and `#[cfg(test)]` items dropped.
fn references(src: &str) -> BTreeSet<String> {
    let code = src.split("#[cfg(test)]").next().unwrap_or("");
    let mut out = BTreeSet::new();
    for line in code.lines() {
        let line = line.trim_start();
        if line.starts_with("//") {
            continue;
        }
        let mut rest = line;
        while let Some(i) = rest.find("crate::") {
            rest = &rest[i + "crate::".len()..];
            let name: String = rest
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            if !name.is_empty() {
                out.insert(name);
            }
        }
    }
    out
}

/// Top-level module of every source file under `dir`, and what it references.
fn graph(src: &Path) -> BTreeMap<String, BTreeSet<String>> {
    let mut g: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut stack = vec![src.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
                continue;
            }
            let rel = path.strip_prefix(src).unwrap();
            let top = rel
                .components()
                .next()
                .unwrap()
                .as_os_str()
                .to_string_lossy()
                .trim_end_matches(".rs")
                .to_string();
            let file = rel.file_name().unwrap().to_string_lossy();
            if matches!(top.as_str(), "lib" | "main") || file == "tests.rs" {
                continue;
            }
            let refs = references(&std::fs::read_to_string(&path).unwrap());
            let e = g.entry(top.clone()).or_default();
            e.extend(refs.into_iter().filter(|r| *r != top));
        }
    }
    g
}

/// A cycle reachable from `start`, if any, as the path around it.
fn cycle_from(
    g: &BTreeMap<String, BTreeSet<String>>,
    node: &str,
    path: &mut Vec<String>,
    done: &mut BTreeSet<String>,
) -> Option<Vec<String>> {
    if let Some(i) = path.iter().position(|p| p == node) {
        let mut c = path[i..].to_vec();
        c.push(node.to_string());
        return Some(c);
    }
    if done.contains(node) {
        return None;
    }
    path.push(node.to_string());
    for next in g.get(node).into_iter().flatten() {
        if g.contains_key(next) {
            if let Some(c) = cycle_from(g, next, path, done) {
                return Some(c);
            }
        }
    }
    path.pop();
    done.insert(node.to_string());
    None
}

#[test]
fn stage_modules_have_no_import_cycle() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let g = graph(&src);
    assert!(g.contains_key("conn") && g.contains_key("handler"), "{g:?}");
    let mut done = BTreeSet::new();
    for node in g.keys() {
        if let Some(c) = cycle_from(&g, node, &mut Vec::new(), &mut done) {
            panic!("import cycle: {}", c.join(" -> "));
        }
    }
}

#[test]
fn handlers_see_neither_the_snapshot_nor_the_transport() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let handler = &graph(&src)["handler"];
    for forbidden in [
        "snapshot", "reauth", "authz", "routing", "conn", "session", "tls",
    ] {
        assert!(
            !handler.contains(forbidden),
            "handlers must not depend on `{forbidden}`: {handler:?}"
        );
    }
}

#[test]
fn a_cycle_is_found() {
    let mut g = BTreeMap::new();
    g.insert("a".to_string(), BTreeSet::from(["b".to_string()]));
    g.insert("b".to_string(), BTreeSet::from(["c".to_string()]));
    g.insert("c".to_string(), BTreeSet::from(["a".to_string()]));
    let c = cycle_from(&g, "a", &mut Vec::new(), &mut BTreeSet::new()).unwrap();
    assert_eq!(c, ["a", "b", "c", "a"]);
    assert_eq!(
        references(
            "use crate::x::Y;\n// crate::z\nfn f() { crate::w::g() }\n#[cfg(test)]\nuse crate::t;"
        ),
        BTreeSet::from(["x".to_string(), "w".to_string()])
    );
}
