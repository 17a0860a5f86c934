//! The crate's folders are layers, each importing only those below it:
//! protocol, then session, then client, then recipes. A session that knew a
//! lock (or a client that knew a recipe) would tie them in a circle again.

use std::fs;
use std::path::{Path, PathBuf};

/// Each layer, and the `crate::` paths its code must not name.
const LAYERS: &[(&str, &[&str])] = &[
    (
        "protocol",
        &[
            "crate::session",
            "crate::client",
            "crate::recipes",
            "crate::error",
            "crate::{",
        ],
    ),
    // The crate root re-exports every layer: a layer names what it uses by
    // its own path, never through the root.
    ("session", &["crate::client", "crate::recipes", "crate::{"]),
    ("client", &["crate::recipes"]),
];

fn sources(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in fs::read_dir(dir).expect("the source folder is readable") {
        let path = entry.expect("a folder entry").path();
        if path.is_dir() {
            sources(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

#[test]
fn each_layer_imports_only_the_layers_below_it() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut broken = Vec::new();
    for (layer, forbidden) in LAYERS {
        let mut files = Vec::new();
        sources(&src.join(layer), &mut files);
        assert!(!files.is_empty(), "no sources under src/{layer}");
        for file in files {
            let text = fs::read_to_string(&file).expect("a readable source file");
            for (n, line) in text.lines().enumerate() {
                if let Some(name) = forbidden.iter().find(|f| line.contains(*f)) {
                    broken.push(format!("{}:{}: names {name}", file.display(), n + 1));
                }
            }
        }
    }
    assert!(broken.is_empty(), "layering broken:\n{}", broken.join("\n"));
}
