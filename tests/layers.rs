//! The import graph of `src/` goes one way: every top-level module belongs to a layer, names
//! only modules of its own layer or below, and the top-level modules form no cycle. Tests inside
//! a module obey the rule too (they are read with the rest of the file). See docs/design.md,
//! "Module map and layers".

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::Path;

/// Each top-level module of `src/` and its layer, lowest first. A new module must be added here.
const LAYERS: &[(&str, &[&str])] = &[
    (
        "core",
        &[
            "contract",
            "limits",
            "exit",
            "stop",
            "pki",
            "materials",
            "manifest",
            "model",
            "checks",
            "plan",
            "writes",
            "restart_state",
            "doctor",
            "values",
        ],
    ),
    ("io", &["cluster", "redis", "probe", "generate"]),
    (
        "orchestration",
        &[
            "restart",
            "first_publication",
            "reconcile",
            "inspect",
            "agent",
            "metrics",
        ],
    ),
    ("top", &["commands", "cli", "fuzz"]),
];

/// Every top-level module, the files it is made of (its `X.rs`, or every file under `X/`).
fn modules(src: &Path) -> BTreeMap<String, Vec<String>> {
    let mut out = BTreeMap::new();
    for entry in fs::read_dir(src).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_stem().unwrap().to_string_lossy().to_string();
        if name == "lib" || name == "main" {
            continue;
        }
        let mut texts = Vec::new();
        collect(&path, &mut texts);
        out.entry(name).or_insert_with(Vec::new).extend(texts);
    }
    out
}

fn collect(path: &Path, texts: &mut Vec<String>) {
    if path.is_dir() {
        for entry in fs::read_dir(path).unwrap() {
            collect(&entry.unwrap().path(), texts);
        }
    } else if path.extension().is_some_and(|e| e == "rs") {
        texts.push(fs::read_to_string(path).unwrap());
    }
}

/// The top-level modules a source text names through `crate::` (comments left out).
fn named(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for line in text.lines() {
        let code = line.split("//").next().unwrap_or("");
        let mut rest = code;
        while let Some(i) = rest.find("crate::") {
            rest = &rest[i + "crate::".len()..];
            if let Some(group) = rest.strip_prefix('{') {
                let end = group.find('}').unwrap_or(group.len());
                for item in group[..end].split(',') {
                    let id = ident(item.trim());
                    if !id.is_empty() {
                        out.insert(id);
                    }
                }
            } else {
                let id = ident(rest);
                if !id.is_empty() {
                    out.insert(id);
                }
            }
        }
    }
    out
}

fn ident(s: &str) -> String {
    s.chars()
        .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
        .collect()
}

fn layer_of() -> BTreeMap<&'static str, (usize, &'static str)> {
    let mut out = BTreeMap::new();
    for (i, (layer, mods)) in LAYERS.iter().enumerate() {
        for m in *mods {
            out.insert(*m, (i, *layer));
        }
    }
    out
}

fn graph() -> BTreeMap<String, BTreeSet<String>> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    modules(&src)
        .into_iter()
        .map(|(m, texts)| {
            let mut deps: BTreeSet<String> = texts.iter().flat_map(|t| named(t)).collect();
            deps.remove(&m);
            (m, deps)
        })
        .collect()
}

/// A cycle through `start`, if any (depth-first search over the graph).
fn cycle(g: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    fn visit(
        g: &BTreeMap<String, BTreeSet<String>>,
        m: &str,
        path: &mut Vec<String>,
        done: &mut BTreeSet<String>,
    ) -> Option<Vec<String>> {
        if let Some(i) = path.iter().position(|p| p == m) {
            let mut c = path[i..].to_vec();
            c.push(m.to_string());
            return Some(c);
        }
        if done.contains(m) {
            return None;
        }
        path.push(m.to_string());
        for d in g.get(m).into_iter().flatten() {
            if let Some(c) = visit(g, d, path, done) {
                return Some(c);
            }
        }
        path.pop();
        done.insert(m.to_string());
        None
    }
    let mut done = BTreeSet::new();
    g.keys()
        .find_map(|m| visit(g, m, &mut Vec::new(), &mut done))
}

#[test]
fn every_module_has_a_layer_and_names_only_modules_of_its_layer_or_below() {
    let layers = layer_of();
    let mut wrong = Vec::new();
    for (m, deps) in graph() {
        let Some(&(mine, my_layer)) = layers.get(m.as_str()) else {
            wrong.push(format!(
                "src/{m} has no layer: add it to LAYERS in tests/layers.rs"
            ));
            continue;
        };
        for d in deps {
            match layers.get(d.as_str()) {
                None => wrong.push(format!(
                    "src/{m} names crate::{d}, which is not a top-level module (an old path \
                     kept in lib.rs for tests? name the module where it lives)"
                )),
                Some(&(theirs, their_layer)) if theirs > mine => wrong.push(format!(
                    "src/{m} ({my_layer}) names crate::{d} ({their_layer}), a layer above it"
                )),
                Some(_) => {}
            }
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}

#[test]
fn the_top_level_modules_form_no_cycle() {
    if let Some(c) = cycle(&graph()) {
        panic!(
            "import cycle among src/'s top-level modules: {}",
            c.join(" -> ")
        );
    }
}

#[test]
fn the_pure_core_never_names_the_cluster_or_redis() {
    let core = LAYERS[0].1;
    for (m, deps) in graph() {
        if core.contains(&m.as_str()) {
            for io in ["cluster", "redis", "probe"] {
                assert!(!deps.contains(io), "the pure src/{m} names crate::{io}");
            }
        }
    }
}

#[test]
fn the_reader_sees_every_form_of_crate_path() {
    let text =
        "use crate::a::B;\nuse crate::{b, c::D};\n// crate::commented\nlet x = crate::e::f();";
    let got: Vec<String> = named(text).into_iter().collect();
    assert_eq!(got, ["a", "b", "c", "e"]);
    let mut g = BTreeMap::new();
    g.insert("x".to_string(), BTreeSet::from(["y".to_string()]));
    g.insert("y".to_string(), BTreeSet::from(["x".to_string()]));
    assert!(cycle(&g).is_some());
    g.insert("y".to_string(), BTreeSet::new());
    assert!(cycle(&g).is_none());
}
