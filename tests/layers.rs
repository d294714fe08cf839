//! The layers of `src/lib.rs` hold: no module imports one on its own layer or above.
//!
//! The list of layers is read from the "# Layers" section of `src/lib.rs`'s doc comment (the
//! map a newcomer reads), so the map and this check cannot drift apart. Every `crate::` path in
//! every file under `src/` is checked, including grouped `use crate::{a, b}` imports.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

fn src() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

/// Module name → layer number, from the numbered items of the "# Layers" section: every
/// module named in backticks (`name` or [`name`]) on an item belongs to that item's layer.
fn layers() -> BTreeMap<String, u32> {
    let lib = std::fs::read_to_string(src().join("lib.rs")).expect("src/lib.rs");
    let mut in_section = false;
    let mut layer = None;
    let mut map = BTreeMap::new();
    for line in lib.lines() {
        let Some(doc) = line.strip_prefix("//!") else {
            break;
        };
        let doc = doc.trim();
        if doc.starts_with("# ") {
            in_section = doc == "# Layers";
            continue;
        }
        if !in_section {
            continue;
        }
        if let Some((number, rest)) = doc.split_once(". ") {
            if let Ok(n) = number.parse::<u32>() {
                layer = Some((n, rest.to_string()));
            } else if let Some((_, text)) = &mut layer {
                text.push(' ');
                text.push_str(doc);
            }
        } else if let Some((_, text)) = &mut layer {
            text.push(' ');
            text.push_str(doc);
        }
        // Names are taken up to the first ':' of the item (what follows describes them).
        if let Some((n, text)) = &layer {
            let names = text.split(':').next().unwrap_or("");
            for name in names.split('`').skip(1).step_by(2) {
                if !name.contains("::") {
                    map.insert(name.to_string(), *n);
                }
            }
        }
    }
    map
}

/// The top-level module a file under `src/` belongs to (`proxy/relay.rs` → `proxy`).
fn module_of(path: &Path) -> String {
    let rel = path.strip_prefix(src()).expect("under src");
    let first = rel.components().next().expect("a path");
    first
        .as_os_str()
        .to_string_lossy()
        .trim_end_matches(".rs")
        .to_string()
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("read src") {
        let path = entry.expect("entry").path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// Every module a file names through `crate::`: `crate::a::b`, `crate::a`, `crate::{a, b::c}`.
fn crate_paths(text: &str) -> Vec<String> {
    let mut found = Vec::new();
    for (i, _) in text.match_indices("crate::") {
        // Skip `pub(crate)` and the like: only paths.
        let rest = &text[i + "crate::".len()..];
        if let Some(group) = rest.strip_prefix('{') {
            let inner = group.split('}').next().unwrap_or("");
            for item in inner.split(',') {
                let name: String = item
                    .trim()
                    .chars()
                    .take_while(|c| c.is_alphanumeric() || *c == '_')
                    .collect();
                if !name.is_empty() {
                    found.push(name);
                }
            }
        } else {
            let name: String = rest
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_')
                .collect();
            if !name.is_empty() {
                found.push(name);
            }
        }
    }
    found
}

#[test]
fn the_layer_list_names_every_module() {
    let layers = layers();
    let mut files = Vec::new();
    rust_files(&src(), &mut files);
    for file in &files {
        let module = module_of(file);
        if module == "lib" || module == "main" {
            continue;
        }
        assert!(
            layers.contains_key(&module),
            "src/lib.rs's \"# Layers\" list does not place module `{module}` ({}); layers: {layers:?}",
            file.display()
        );
    }
}

#[test]
fn no_module_imports_one_on_its_own_layer_or_above() {
    let layers = layers();
    assert!(
        layers.len() >= 10,
        "the layer list was not read: {layers:?}"
    );
    let mut files = Vec::new();
    rust_files(&src(), &mut files);
    let mut upward = Vec::new();
    for file in &files {
        let module = module_of(file);
        let Some(&own) = layers.get(&module) else {
            continue;
        };
        let text = std::fs::read_to_string(file).expect("read");
        for used in crate_paths(&text) {
            if used == module {
                continue;
            }
            match layers.get(&used) {
                Some(&layer) if layer < own => {}
                Some(&layer) => upward.push(format!(
                    "{}: `{module}` (layer {own}) uses `crate::{used}` (layer {layer})",
                    file.strip_prefix(src()).unwrap().display()
                )),
                // A re-export at the crate root (`crate::Snapshot`): not a module.
                None if used.chars().next().is_some_and(char::is_uppercase) => {}
                None => upward.push(format!(
                    "{}: `crate::{used}` is on no layer",
                    file.display()
                )),
            }
        }
    }
    assert!(
        upward.is_empty(),
        "imports that do not point down:\n{}",
        upward.join("\n")
    );
}

#[test]
fn the_check_sees_grouped_and_nested_paths() {
    let text =
        "use crate::a::B;\nuse crate::{c, d::e};\nfn f() { crate::g::h(); }\npub(crate) fn i() {}";
    assert_eq!(crate_paths(text), ["a", "c", "d", "g"]);
}
