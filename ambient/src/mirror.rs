//! The copy of the user's YAML directory that istiod-lite reads in the testbed: identical,
//! except that a pod with no `status.podIP` gets the address the testbed allocated for it, as
//! a kubelet would report it. Files without such pods are copied byte for byte, so errors
//! istiod-lite reports point at the same document numbers. One more file,
//! [`GENERATED_FILE`], holds the objects the testbed makes itself (the waypoints' pods,
//! Services and ServiceAccounts).

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use anyhow::Context;
use serde_yaml::Value;
use tracing::warn;

/// The file in the copy with the objects the testbed makes; a file of this name in the user's
/// directory is not copied.
pub const GENERATED_FILE: &str = "ambient-generated.yaml";

/// Brings `dst` in line with `src`: every config file copied (pods given their allocated
/// address), files gone from `src` removed, and `generated` (YAML; empty for none) written
/// to [`GENERATED_FILE`]. `allocated` is by (namespace, name).
pub fn sync(
    src: &Path,
    dst: &Path,
    allocated: &BTreeMap<(String, String), IpAddr>,
    generated: &str,
) -> anyhow::Result<()> {
    std::fs::create_dir_all(dst).with_context(|| format!("creating {}", dst.display()))?;
    let mut wanted = Vec::new();
    if !generated.is_empty() {
        wanted.push(PathBuf::from(GENERATED_FILE));
        write_if_changed(&dst.join(GENERATED_FILE), generated)?;
    }
    for file in config_files(src)? {
        let rel = file.strip_prefix(src).unwrap_or(&file).to_owned();
        if rel == Path::new(GENERATED_FILE) {
            warn!(file = %file.display(), "this name is reserved for the objects the testbed makes; the file is not read, rename it");
            continue;
        }
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
        write_if_changed(&out, &text)?;
    }
    for old in config_files(dst)? {
        let rel = old.strip_prefix(dst).unwrap_or(&old);
        if !wanted.iter().any(|w| w == rel) {
            let _ = std::fs::remove_file(&old);
        }
    }
    Ok(())
}

/// Replaces `out` whole (a reader never sees half a file), unless it already holds `text`.
fn write_if_changed(out: &Path, text: &str) -> anyhow::Result<()> {
    if std::fs::read_to_string(out).ok().as_deref() == Some(text) {
        return Ok(());
    }
    if let Some(dir) = out.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let tmp = out.with_extension("tmp~");
    std::fs::write(&tmp, text).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, out).with_context(|| format!("writing {}", out.display()))
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

    /// A fresh directory under the system's temporary directory.
    fn scratch(tag: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "ambient-mirror-{tag}-{}-{}",
            std::process::id(),
            fastrand::u64(..)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn generated_objects_get_a_file_of_their_own() {
        let (src, dst) = (scratch("src"), scratch("dst"));
        std::fs::write(src.join("a.yaml"), "kind: Namespace\nmetadata: {name: a}\n").unwrap();
        // A file of the reserved name in the user's directory is not copied over ours.
        std::fs::write(
            src.join(GENERATED_FILE),
            "kind: Namespace\nmetadata: {name: x}\n",
        )
        .unwrap();
        let none = BTreeMap::new();
        sync(&src, &dst, &none, "kind: ServiceAccount\n").unwrap();
        assert_eq!(
            std::fs::read_to_string(dst.join(GENERATED_FILE)).unwrap(),
            "kind: ServiceAccount\n"
        );
        assert!(dst.join("a.yaml").exists());

        // Nothing generated any more: the file goes, as do files gone from the source.
        std::fs::remove_file(src.join("a.yaml")).unwrap();
        sync(&src, &dst, &none, "").unwrap();
        assert!(!dst.join(GENERATED_FILE).exists());
        assert!(!dst.join("a.yaml").exists());
        let _ = std::fs::remove_dir_all(&src);
        let _ = std::fs::remove_dir_all(&dst);
    }
}
