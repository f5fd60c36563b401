//! The source layout the book's Development page describes, checked on every run: no import circles among
//! the files of either crate, no source folder over 15 files, and each crate's layers importing
//! only from the layers below them.
//!
//! A file's imports are the `crate::…` paths in its code (comments left out), resolved to the
//! longest module path that is a file of the crate.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

const MAX_FILES_PER_FOLDER: usize = 15;

/// The extension's layers, lowest first; `errors` and `settings` sit below them all.
const EXTENSION_LAYERS: &[&[&str]] = &[
    &["errors", "settings"],
    &["policy"],
    &["state"],
    &["catalog"],
    &["engine"],
    &["api"],
    &["background"],
];

/// The worker's layers, lowest first.
const WORKER_LAYERS: &[&[&str]] = &[
    &["config", "duration"],
    &["protocol"],
    &["providers"],
    &["db"],
    &["gateway"],
    &["http"],
    &["commands"],
];

type Graph = BTreeMap<String, BTreeSet<String>>;

fn src(krate: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(krate).join("src")
}

/// The module path of a source file: `a/b.rs` is `a::b`, `a/mod.rs` is `a`, `lib.rs` is `lib`.
fn module_of(rel: &Path) -> String {
    let mut parts: Vec<String> = rel.iter().map(|p| p.to_string_lossy().into_owned()).collect();
    let last = parts.pop().unwrap_or_default();
    let stem = last.trim_end_matches(".rs").to_string();
    if stem != "mod" || parts.is_empty() {
        parts.push(stem);
    }
    parts.join("::")
}

fn rust_files(dir: &Path, root: &Path, out: &mut Vec<(String, String)>) {
    let mut entries: Vec<_> = std::fs::read_dir(dir).expect("read source folder").flatten().collect();
    entries.sort_by_key(|e| e.path());
    for e in entries {
        let path = e.path();
        if path.is_dir() {
            rust_files(&path, root, out);
        } else if path.extension().is_some_and(|x| x == "rs") {
            let rel = path.strip_prefix(root).expect("under the root");
            out.push((
                module_of(rel),
                std::fs::read_to_string(&path).expect("read source file"),
            ));
        }
    }
}

/// The code of a file without its comments (line comments, doc comments included).
fn without_comments(text: &str) -> String {
    text.lines()
        .map(|l| match l.find("//") {
            // Not inside a string literal in practice: crate:: paths never follow `//` in one.
            Some(i) if !l[..i].contains('"') => &l[..i],
            _ => l,
        })
        .collect::<Vec<_>>()
        .join("\n")
}

fn is_ident(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'_'
}

/// Builds the import graph of a crate's files from (module, source) pairs.
fn graph(files: &[(String, String)]) -> Graph {
    let modules: BTreeSet<&str> = files.iter().map(|(m, _)| m.as_str()).collect();
    let mut g = Graph::new();
    for (module, text) in files {
        let code = without_comments(text);
        let bytes = code.as_bytes();
        let targets = g.entry(module.clone()).or_default();
        let mut at = 0;
        while let Some(i) = code[at..].find("crate::") {
            let start = at + i;
            at = start + "crate::".len();
            if start > 0 && (is_ident(bytes[start - 1]) || bytes[start - 1] == b':') {
                continue;
            }
            // The path: identifiers separated by `::`.
            let mut segments = Vec::new();
            let mut j = at;
            loop {
                let s = j;
                while j < bytes.len() && is_ident(bytes[j]) {
                    j += 1;
                }
                if j == s {
                    break;
                }
                segments.push(&code[s..j]);
                if code[j..].starts_with("::") {
                    j += 2;
                } else {
                    break;
                }
            }
            for n in (1..=segments.len()).rev() {
                let candidate = segments[..n].join("::");
                if modules.contains(candidate.as_str()) {
                    if &candidate != module && !module.starts_with(&format!("{candidate}::")) {
                        targets.insert(candidate);
                    }
                    break;
                }
            }
        }
    }
    g
}

/// The import circles: strongly connected sets of more than one file (Tarjan).
fn circles(g: &Graph) -> Vec<Vec<String>> {
    struct State<'a> {
        g: &'a Graph,
        index: BTreeMap<&'a str, usize>,
        low: BTreeMap<&'a str, usize>,
        stack: Vec<&'a str>,
        on_stack: BTreeSet<&'a str>,
        next: usize,
        found: Vec<Vec<String>>,
    }
    fn visit<'a>(s: &mut State<'a>, v: &'a str) {
        s.index.insert(v, s.next);
        s.low.insert(v, s.next);
        s.next += 1;
        s.stack.push(v);
        s.on_stack.insert(v);
        for w in s.g.get(v).into_iter().flatten() {
            let w = w.as_str();
            if !s.index.contains_key(w) {
                visit(s, w);
                let lw = s.low[w];
                let lv = s.low.get_mut(v).expect("visited");
                *lv = (*lv).min(lw);
            } else if s.on_stack.contains(w) {
                let iw = s.index[w];
                let lv = s.low.get_mut(v).expect("visited");
                *lv = (*lv).min(iw);
            }
        }
        if s.low[v] == s.index[v] {
            let mut set = Vec::new();
            while let Some(w) = s.stack.pop() {
                s.on_stack.remove(w);
                set.push(w.to_string());
                if w == v {
                    break;
                }
            }
            if set.len() > 1 {
                set.sort();
                s.found.push(set);
            }
        }
    }
    let mut s = State {
        g,
        index: BTreeMap::new(),
        low: BTreeMap::new(),
        stack: Vec::new(),
        on_stack: BTreeSet::new(),
        next: 0,
        found: Vec::new(),
    };
    for v in g.keys() {
        if !s.index.contains_key(v.as_str()) {
            visit(&mut s, v);
        }
    }
    s.found
}

/// Imports that point up: from a file of one layer to a file of a higher one.
fn upward(g: &Graph, layers: &[&[&str]]) -> Vec<String> {
    let rank = |m: &str| {
        let top = m.split("::").next().unwrap_or(m);
        layers.iter().position(|l| l.contains(&top))
    };
    let mut out = Vec::new();
    for (from, targets) in g {
        for to in targets {
            if let (Some(a), Some(b)) = (rank(from), rank(to)) {
                if b > a {
                    out.push(format!("{from} -> {to}"));
                }
            }
        }
    }
    out
}

fn crowded_folders(dir: &Path, out: &mut Vec<String>) {
    let entries: Vec<_> = std::fs::read_dir(dir).expect("read source folder").flatten().collect();
    let files = entries.iter().filter(|e| e.path().is_file()).count();
    if files > MAX_FILES_PER_FOLDER {
        out.push(format!("{} holds {files} files", dir.display()));
    }
    for e in entries.iter().filter(|e| e.path().is_dir()) {
        crowded_folders(&e.path(), out);
    }
}

fn check(krate: &str, layers: &[&[&str]]) {
    let root = src(krate);
    let mut files = Vec::new();
    rust_files(&root, &root, &mut files);
    assert!(
        files.len() > 10,
        "{krate}: only {} source files found under {}",
        files.len(),
        root.display()
    );
    let g = graph(&files);
    let c = circles(&g);
    assert!(c.is_empty(), "{krate}: import circles: {c:?}");
    let up = upward(&g, layers);
    assert!(up.is_empty(), "{krate}: imports that point up a layer: {up:?}");
    let mut crowded = Vec::new();
    crowded_folders(&root, &mut crowded);
    assert!(crowded.is_empty(), "{krate}: {crowded:?}");
    // Every top-level folder is a layer (a new folder must be placed in the order).
    for (module, _) in &files {
        if let Some((top, _)) = module.split_once("::") {
            assert!(
                layers.iter().any(|l| l.contains(&top)),
                "{krate}: folder {top} is in no layer of this test"
            );
        }
    }
}

#[test]
fn the_extension_has_no_import_circles_and_its_layers_import_downwards() {
    check("pg_keypool", EXTENSION_LAYERS);
}

#[test]
fn the_worker_has_no_import_circles_and_its_layers_import_downwards() {
    check("worker", WORKER_LAYERS);
}

/// The checks themselves find what they are for.
#[test]
fn the_checks_find_a_circle_and_an_upward_import() {
    let files = vec![
        ("lib".to_string(), "mod a; mod b;".to_string()),
        ("a::x".to_string(), "use crate::b::y::Thing; // crate::c".to_string()),
        ("b::y".to_string(), "fn f() { crate::a::x::g(); }".to_string()),
        ("b::z".to_string(), "use crate::b::y;".to_string()),
    ];
    let g = graph(&files);
    assert_eq!(circles(&g), vec![vec!["a::x".to_string(), "b::y".to_string()]]);
    assert_eq!(upward(&g, &[&["b"], &["a"]]), vec!["b::y -> a::x".to_string()]);
    // A comment is not an import; a path into a module of the file's own is not an edge.
    assert!(!g["a::x"].contains("c"));
    assert_eq!(module_of(Path::new("http/mod.rs")), "http");
    assert_eq!(module_of(Path::new("lib.rs")), "lib");
}
