//! The copy of the user's YAML directory that istiod-lite reads in the testbed: identical,
//! except that a pod with no `status.podIP` gets the address the testbed allocated for it, as
//! a kubelet would report it. Files without such pods are copied byte for byte, so errors
//! istiod-lite reports point at the same document numbers.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use anyhow::Context;
use serde_yaml::Value;
use tracing::warn;

/// Brings `dst` in line with `src`: every config file copied (pods given their allocated
/// address), files gone from `src` removed. `allocated` is by (namespace, name).
pub fn sync(
    src: &Path,
    dst: &Path,
    allocated: &BTreeMap<(String, String), IpAddr>,
) -> anyhow::Result<()> {
    std::fs::create_dir_all(dst).with_context(|| format!("creating {}", dst.display()))?;
    let mut wanted = Vec::new();
    for file in config_files(src)? {
        let rel = file.strip_prefix(src).unwrap_or(&file).to_owned();
        let out = dst.join(&rel);
        wanted.push(rel);
        let text = match std::fs::read_to_string(&file) {
            Ok(t) => t,
            Err(e) => {
                warn!(file = %file.display(), error = %e, "cannot read; keeping the last copy");
                continue;
            }
        };
        let text = match with_addresses(&text, allocated) {
            Ok(Some(t)) => t,
            Ok(None) => text,
            // istiod-lite reports the parse error itself, from the copy.
            Err(_) => text,
        };
        if std::fs::read_to_string(&out).ok().as_deref() == Some(text.as_str()) {
            continue;
        }
        if let Some(dir) = out.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let tmp = out.with_extension("tmp~");
        std::fs::write(&tmp, &text).with_context(|| format!("writing {}", tmp.display()))?;
        std::fs::rename(&tmp, &out).with_context(|| format!("writing {}", out.display()))?;
    }
    for old in config_files(dst)? {
        let rel = old.strip_prefix(dst).unwrap_or(&old);
        if !wanted.iter().any(|w| w == rel) {
            let _ = std::fs::remove_file(&old);
        }
    }
    Ok(())
}

/// Config files below `dir` (as istiod-lite reads them: YAML and JSON, no hidden names).
fn config_files(dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        let entries = std::fs::read_dir(&d).with_context(|| format!("reading {}", d.display()))?;
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with('.') {
                continue;
            }
            let Ok(t) = e.file_type() else { continue };
            if t.is_dir() {
                stack.push(e.path());
            } else if t.is_file() && [".yaml", ".yml", ".json"].iter().any(|x| name.ends_with(x)) {
                out.push(e.path());
            }
        }
    }
    out.sort();
    Ok(out)
}

/// The file with allocated addresses filled in, or `None` when nothing needs one.
fn with_addresses(
    text: &str,
    allocated: &BTreeMap<(String, String), IpAddr>,
) -> Result<Option<String>, serde_yaml::Error> {
    use serde::Deserialize;
    let mut docs = Vec::new();
    let mut changed = false;
    for de in serde_yaml::Deserializer::from_str(text) {
        let mut doc = Value::deserialize(de)?;
        if doc.get("kind").and_then(Value::as_str) == Some("Pod") {
            let name = doc["metadata"]["name"]
                .as_str()
                .unwrap_or_default()
                .to_owned();
            let ns = doc["metadata"]["namespace"]
                .as_str()
                .unwrap_or("default")
                .to_owned();
            let has_ip = doc
                .get("status")
                .and_then(|s| s.get("podIP"))
                .is_some_and(|v| !v.is_null());
            if let (false, Some(ip)) = (has_ip, allocated.get(&(ns, name))) {
                if !doc.get("status").is_some_and(Value::is_mapping) {
                    doc["status"] = Value::Mapping(Default::default());
                }
                doc["status"]["podIP"] = Value::String(ip.to_string());
                changed = true;
            }
        }
        docs.push(doc);
    }
    if !changed {
        return Ok(None);
    }
    let mut out = String::new();
    for d in docs {
        if d.is_null() {
            continue;
        }
        out.push_str("---\n");
        out.push_str(&serde_yaml::to_string(&d)?);
    }
    Ok(Some(out))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_pods_without_an_address_are_changed() {
        let mut alloc = BTreeMap::new();
        alloc.insert(
            ("apps".to_owned(), "b".to_owned()),
            "198.18.1.100".parse().unwrap(),
        );
        let given =
            "kind: Pod\nmetadata: {name: a, namespace: apps}\nstatus: {podIP: 198.18.1.5}\n";
        assert!(with_addresses(given, &alloc).unwrap().is_none());
        let missing = "# comment\nkind: Namespace\nmetadata: {name: apps}\n---\nkind: Pod\nmetadata: {name: b, namespace: apps}\nspec: {nodeName: n}\n";
        let out = with_addresses(missing, &alloc).unwrap().unwrap();
        assert!(out.contains("podIP: 198.18.1.100"), "{out}");
        assert!(out.contains("kind: Namespace"), "{out}");
    }
}
