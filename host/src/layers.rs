//! Keeps the layer rule of ARCHITECTURE.md true: every `crate::` path in a
//! host module points to a module of a lower layer. The layers are read from
//! ARCHITECTURE.md itself, so the document and the rule cannot drift apart.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Module name → layer, from the "## Layers" table of ARCHITECTURE.md.
fn layers() -> BTreeMap<String, u32> {
    let doc = Path::new(env!("CARGO_MANIFEST_DIR")).join("../ARCHITECTURE.md");
    let text = std::fs::read_to_string(&doc).expect("ARCHITECTURE.md beside host/");
    let table = text
        .split("## Layers")
        .nth(1)
        .expect("ARCHITECTURE.md has a \"## Layers\" section")
        .split("\n## ")
        .next()
        .unwrap_or_default();
    let mut layers = BTreeMap::new();
    for row in table.lines().filter(|l| l.starts_with('|')) {
        let cells: Vec<&str> = row.split('|').map(str::trim).collect();
        let Some(Ok(layer)) = cells.get(1).map(|c| c.parse::<u32>()) else {
            continue;
        };
        for module in cells[2].split('`').skip(1).step_by(2) {
            layers.insert(module.to_owned(), layer);
        }
    }
    assert!(
        layers.len() > 5,
        "no layer table found in {}",
        doc.display()
    );
    layers
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The top-level module a file of `src/` belongs to.
fn module_of(src: &Path, file: &Path) -> String {
    let relative = file.strip_prefix(src).unwrap();
    let first = relative.components().next().unwrap().as_os_str();
    first.to_string_lossy().trim_end_matches(".rs").to_owned()
}

/// The modules a file's code names with `crate::`, leaving out comments and
/// the `#[cfg(test)]` part at its end.
fn references(code: &str) -> Vec<String> {
    let code = code.split("#[cfg(test)]").next().unwrap_or_default();
    let mut found = Vec::new();
    for line in code.lines().filter(|l| !l.trim_start().starts_with("//")) {
        for piece in line.split("crate::").skip(1) {
            let name: String = piece
                .chars()
                .take_while(|c| c.is_ascii_lowercase() || *c == '_')
                .collect();
            if !name.is_empty() {
                found.push(name);
            }
        }
    }
    found
}

#[test]
fn host_modules_import_only_from_lower_layers() {
    let layers = layers();
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    // The crate root, the binary and the test-only modules stand outside.
    let outside = ["lib", "main", "testing", "layers"];
    let mut violations = Vec::new();
    for file in &files {
        let module = module_of(&src, file);
        if outside.contains(&module.as_str()) {
            continue;
        }
        let Some(&own) = layers.get(&module) else {
            violations.push(format!(
                "module `{module}` is in no layer of ARCHITECTURE.md"
            ));
            continue;
        };
        let code = std::fs::read_to_string(file).unwrap();
        for target in references(&code) {
            if target == module {
                continue;
            }
            match layers.get(&target) {
                Some(&layer) if layer < own => {}
                Some(&layer) => violations.push(format!(
                    "{}: `{module}` (layer {own}) uses `crate::{target}` (layer {layer})",
                    file.strip_prefix(&src).unwrap().display()
                )),
                None => violations.push(format!(
                    "{}: `crate::{target}` is in no layer of ARCHITECTURE.md",
                    file.strip_prefix(&src).unwrap().display()
                )),
            }
        }
    }
    violations.sort();
    violations.dedup();
    assert!(violations.is_empty(), "{}", violations.join("\n"));
}

#[test]
fn the_check_sees_an_upward_import() {
    assert_eq!(
        references("use crate::relay::Relay;\n// crate::cli in a comment\n"),
        ["relay"]
    );
    assert!(references("#[cfg(test)]\nuse crate::testing::Peer;").is_empty());
}
