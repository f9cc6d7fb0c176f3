//! `ambient ztunnel-config` rendering against golden files.
//!
//! Fixtures are ztunnel `/config_dump`s: `zconfig-standalone.json` captured from a standalone
//! ztunnel with live SOCKS5 connections, `zconfig-mesh.json` written by hand to cover what a
//! standalone run cannot show (policies, waypoints, in-pod capture, odd values).
//!
//! `UPDATE_GOLDEN=1 cargo nextest run -p ambient --test zconfig` rewrites the golden files
//! from the current output; review the diff before committing.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use ambient::zconfig::{Filter, Format, View, render, render_filtered, table};
use anyhow::{Context, bail};
use serde_json::{Value, json};

/// `now` for the hand-written dump: 2026-11-22T08:13:20Z. Its `batch` certificate is not valid
/// yet and its `cache` certificate has expired.
const MESH_NOW: u64 = 1_795_400_000;
/// A few seconds after the standalone ztunnel wrote its dump.
const STANDALONE_NOW: u64 = 1_795_331_400;

struct Case {
    fixture: &'static str,
    view: View,
    format: Format,
    filter: Option<(&'static str, Option<&'static str>, Option<&'static str>)>,
}

const fn case(fixture: &'static str, view: View, format: Format) -> Case {
    Case {
        fixture,
        view,
        format,
        filter: None,
    }
}

const CASES: &[Case] = &[
    case("mesh", View::Workloads, Format::Table),
    case("mesh", View::Services, Format::Table),
    case("mesh", View::Policies, Format::Table),
    case("mesh", View::Certificates, Format::Table),
    case("mesh", View::Connections, Format::Table),
    case("mesh", View::Pods, Format::Table),
    case("mesh", View::All, Format::Table),
    case("mesh", View::Workloads, Format::Json),
    case("mesh", View::Workloads, Format::Yaml),
    case("mesh", View::Policies, Format::Json),
    case("mesh", View::Policies, Format::Yaml),
    case("mesh", View::Connections, Format::Json),
    case("mesh", View::Connections, Format::Yaml),
    case("mesh", View::Pods, Format::Json),
    case("mesh", View::Pods, Format::Yaml),
    case("standalone", View::Workloads, Format::Table),
    case("standalone", View::Services, Format::Table),
    case("standalone", View::Policies, Format::Table),
    case("standalone", View::Certificates, Format::Table),
    case("standalone", View::Connections, Format::Table),
    case("standalone", View::Pods, Format::Table),
    case("standalone", View::All, Format::Table),
    case("standalone", View::Certificates, Format::Json),
    case("standalone", View::Certificates, Format::Yaml),
    case("standalone", View::Pods, Format::Json),
    Case {
        filter: Some(("namespace-apps-node-a", Some("apps"), Some("node-a"))),
        ..case("mesh", View::Workloads, Format::Table)
    },
    Case {
        filter: Some(("namespace-apps", Some("apps"), None)),
        ..case("mesh", View::All, Format::Table)
    },
    Case {
        filter: Some(("namespace-shared", Some("shared"), None)),
        ..case("mesh", View::Connections, Format::Json)
    },
];

impl Case {
    /// `mesh/workloads.table`, `mesh/all-namespace-apps.table`.
    fn golden(&self) -> String {
        let suffix = self
            .filter
            .map(|(name, _, _)| format!("-{name}"))
            .unwrap_or_default();
        format!("{}/{}{suffix}.{}", self.fixture, self.view, self.format)
    }

    fn render(&self) -> anyhow::Result<String> {
        let dump = fixture(self.fixture)?;
        let now = match self.fixture {
            "mesh" => MESH_NOW,
            _ => STANDALONE_NOW,
        };
        let filter = self
            .filter
            .map(|(_, namespace, node)| Filter {
                namespace: namespace.map(str::to_owned),
                node: node.map(str::to_owned),
            })
            .unwrap_or_default();
        render_filtered(&dump, self.view, self.format, now, &filter)
            .map_err(anyhow::Error::msg)
            .with_context(|| format!("rendering {}", self.golden()))
    }
}

fn fixture(name: &str) -> anyhow::Result<Value> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(format!("zconfig-{name}.json"));
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))
}

fn golden_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden/zconfig")
}

fn updating() -> bool {
    std::env::var_os("UPDATE_GOLDEN").is_some_and(|v| v == "1")
}

/// Compares `actual` with the golden file `name`, or rewrites it under `UPDATE_GOLDEN=1`.
/// Returns a description of the mismatch, if any.
fn check_golden(name: &str, actual: &str) -> anyhow::Result<Option<String>> {
    let path = golden_dir().join(name);
    if updating() {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        std::fs::write(&path, actual).with_context(|| format!("writing {}", path.display()))?;
        return Ok(None);
    }
    let expected = std::fs::read_to_string(&path).with_context(|| {
        format!(
            "reading {}; run with UPDATE_GOLDEN=1 to create it",
            path.display()
        )
    })?;
    Ok((expected != actual).then(|| {
        format!(
            "{} differs (- expected, + actual):\n{}",
            path.display(),
            diff(&expected, actual)
        )
    }))
}

/// Unchanged lines shown around each change.
const DIFF_CONTEXT: usize = 3;

/// A line diff: `-` only in `expected`, `+` only in `actual`, ` ` in both; long runs of
/// unchanged lines are cut to [`DIFF_CONTEXT`] lines around each change.
fn diff(expected: &str, actual: &str) -> String {
    let a: Vec<&str> = expected.lines().collect();
    let b: Vec<&str> = actual.lines().collect();
    // Longest common subsequence lengths of every pair of suffixes.
    let mut lcs = vec![vec![0usize; b.len() + 1]; a.len() + 1];
    for i in (0..a.len()).rev() {
        for j in (0..b.len()).rev() {
            lcs[i][j] = if a[i] == b[j] {
                lcs[i + 1][j + 1] + 1
            } else {
                lcs[i + 1][j].max(lcs[i][j + 1])
            };
        }
    }
    let mut lines: Vec<(char, &str)> = Vec::new();
    let (mut i, mut j) = (0, 0);
    while i < a.len() || j < b.len() {
        if i < a.len() && j < b.len() && a[i] == b[j] {
            lines.push((' ', a[i]));
            i += 1;
            j += 1;
        } else if j < b.len() && (i == a.len() || lcs[i][j + 1] >= lcs[i + 1][j]) {
            lines.push(('+', b[j]));
            j += 1;
        } else {
            lines.push(('-', a[i]));
            i += 1;
        }
    }
    let mut changed: Vec<usize> = (0..lines.len()).filter(|&k| lines[k].0 != ' ').collect();
    if changed.is_empty() {
        // Only the final newline differs: show the end.
        changed.push(lines.len());
    }
    let near_change = |k: usize| changed.iter().any(|&c| c.abs_diff(k) <= DIFF_CONTEXT);
    let mut out = String::new();
    let mut skipped = false;
    for (k, (mark, line)) in lines.iter().enumerate() {
        if near_change(k) {
            let _ = writeln!(out, "{mark} {line}");
            skipped = false;
        } else if !skipped {
            out.push_str("  ...\n");
            skipped = true;
        }
    }
    if expected.ends_with('\n') != actual.ends_with('\n') {
        out.push_str("(the files differ in their final newline)\n");
    }
    out
}

#[test]
fn golden_files() -> anyhow::Result<()> {
    let mut failures = Vec::new();
    for case in CASES {
        if let Some(mismatch) = check_golden(&case.golden(), &case.render()?)? {
            failures.push(mismatch);
        }
    }
    if !failures.is_empty() {
        bail!(
            "{} of {} golden files differ; if the change is intended, rerun with UPDATE_GOLDEN=1\n\n{}",
            failures.len(),
            CASES.len(),
            failures.join("\n")
        );
    }
    Ok(())
}

/// Every golden file belongs to a case, so none goes stale unnoticed.
#[test]
fn no_stale_golden_files() -> anyhow::Result<()> {
    if updating() {
        return Ok(());
    }
    let known: Vec<String> = CASES.iter().map(Case::golden).collect();
    let mut stale = Vec::new();
    for fixture in ["mesh", "standalone"] {
        let dir = golden_dir().join(fixture);
        for entry in
            std::fs::read_dir(&dir).with_context(|| format!("listing {}", dir.display()))?
        {
            let name = format!("{fixture}/{}", entry?.file_name().to_string_lossy());
            if !known.contains(&name) {
                stale.push(name);
            }
        }
    }
    anyhow::ensure!(stale.is_empty(), "golden files without a case: {stale:?}");
    Ok(())
}

#[test]
fn diff_marks_changed_lines() {
    assert_eq!(diff("a\nb\nc\n", "a\nx\nc\n"), "  a\n+ x\n- b\n  c\n");
    let long: String = (0..20).map(|n| format!("{n}\n")).collect();
    assert_eq!(
        diff(&long, &long.replace("10\n", "ten\n")),
        "  ...\n  7\n  8\n  9\n+ ten\n- 10\n  11\n  12\n  13\n  ...\n"
    );
    assert_eq!(
        diff("a\n", "a"),
        "  a\n(the files differ in their final newline)\n"
    );
}

/// `-o json|yaml` print the dump's own items: parsing the output gives them back.
#[test]
fn json_and_yaml_are_the_dump_section() -> anyhow::Result<()> {
    let dump = fixture("mesh")?;
    for view in View::EVERY {
        let want = match view {
            View::All => dump.clone(),
            v => dump[v.name()].clone(),
        };
        let json: Value = serde_json::from_str(
            &render(&dump, view, Format::Json, MESH_NOW).map_err(anyhow::Error::msg)?,
        )?;
        assert_eq!(json, want, "{view} -o json");
        let yaml: Value = serde_yaml::from_str(
            &render(&dump, view, Format::Yaml, MESH_NOW).map_err(anyhow::Error::msg)?,
        )?;
        assert_eq!(yaml, want, "{view} -o yaml");
    }
    Ok(())
}

#[test]
fn certificate_validity_follows_now() -> anyhow::Result<()> {
    let dump = fixture("mesh")?;
    let valid = |now: u64| -> anyhow::Result<Vec<String>> {
        let text =
            render(&dump, View::Certificates, Format::Table, now).map_err(anyhow::Error::msg)?;
        Ok(text
            .lines()
            .skip(1)
            .filter_map(|l| l.split_whitespace().nth(3).map(str::to_owned))
            .collect())
    };
    // batch (not yet valid), client, echo, cache (expired).
    assert_eq!(valid(MESH_NOW)?, ["false", "true", "true", "false"]);
    assert_eq!(valid(1_795_403_600)?, ["true", "true", "true", "false"]);
    assert_eq!(valid(1_795_418_092)?, ["true", "false", "false", "false"]);
    Ok(())
}

/// Breaks `dump` at `pointer` (a JSON pointer) with `replacement`, or removes the field.
fn broken(pointer: &str, replacement: Option<Value>) -> anyhow::Result<Value> {
    let mut dump = fixture("mesh")?;
    let (parent, key) = pointer.rsplit_once('/').context("pointer has a parent")?;
    let parent = dump
        .pointer_mut(parent)
        .with_context(|| format!("{pointer} is in the fixture"))?;
    match (replacement, parent) {
        (Some(v), Value::Array(items)) => items[key.parse::<usize>()?] = v,
        (Some(v), Value::Object(map)) => {
            map.insert(key.to_owned(), v);
        }
        (None, Value::Object(map)) => {
            map.remove(key)
                .with_context(|| format!("{pointer} exists"))?;
        }
        _ => bail!("cannot break {pointer}"),
    }
    Ok(dump)
}

#[test]
fn malformed_dumps_name_the_field() -> anyhow::Result<()> {
    let cases = [
        (
            "/workloads/1/node",
            None,
            View::Workloads,
            "config_dump field \"workloads[1].node\" is missing",
        ),
        (
            "/workloads/2/addresses/1",
            Some(json!(6)),
            View::Workloads,
            "config_dump field \"workloads[2].addresses[1]\" should be a string, found a number",
        ),
        (
            "/workloads/0/healthy",
            Some(json!("yes")),
            View::Services,
            "config_dump field \"workloads[0].healthy\" should be a boolean, found a string",
        ),
        (
            "/services/1/endpoints",
            Some(json!({})),
            View::Services,
            "config_dump field \"services[1].endpoints\" should be a list, found an object",
        ),
        (
            "/services/1/waypoint",
            Some(json!({"hbonePort": 15008})),
            View::Services,
            "config_dump field \"services[1].waypoint\" has neither \"hostname\" nor \"address\"",
        ),
        (
            "/policies/3/rules",
            None,
            View::Policies,
            "config_dump field \"policies[3].rules\" is missing",
        ),
        (
            "/certificates/0/notAfter",
            Some(json!("tomorrow")),
            View::Certificates,
            "config_dump field \"certificates[0].notAfter\" should be a non-negative integer, found a string",
        ),
        (
            "/connections/2/ageMs",
            Some(json!(-1)),
            View::Connections,
            "config_dump field \"connections[2].ageMs\" should be a non-negative integer, found a number",
        ),
        (
            "/connections",
            None,
            View::Connections,
            "config_dump has no field \"connections\"; is the ztunnel older than this CLI?",
        ),
        (
            "/pods/3/state",
            Some(json!(null)),
            View::Pods,
            "config_dump field \"pods[3].state\" should be a string, found null",
        ),
        (
            "/pods",
            Some(json!({"uid": "x"})),
            View::All,
            "config_dump field \"pods\" should be a list, found an object",
        ),
    ];
    for (pointer, replacement, view, want) in cases {
        let dump = broken(pointer, replacement)?;
        for format in Format::EVERY {
            assert_eq!(
                render(&dump, view, format, MESH_NOW),
                Err(want.to_owned()),
                "{view} -o {format} with {pointer} broken"
            );
        }
    }
    for not_a_dump in [json!(null), json!([]), json!("config")] {
        let err = render(&not_a_dump, View::All, Format::Table, 0).unwrap_err();
        assert!(err.starts_with("config_dump should be an object"), "{err}");
    }
    Ok(())
}

/// `pods` is `null` when the ztunnel does not run in-pod capture: a note, not an error.
#[test]
fn pods_without_in_pod_capture() -> anyhow::Result<()> {
    let dump = fixture("standalone")?;
    let text =
        render(&dump, View::Pods, Format::Table, STANDALONE_NOW).map_err(anyhow::Error::msg)?;
    assert_eq!(
        text,
        "in-pod capture is off on this ztunnel (\"pods\" is null)\n"
    );
    let json =
        render(&dump, View::Pods, Format::Json, STANDALONE_NOW).map_err(anyhow::Error::msg)?;
    assert_eq!(json, "null\n");
    Ok(())
}

#[test]
fn unknown_views_and_formats_list_the_valid_ones() {
    assert_eq!(
        "routes".parse::<View>(),
        Err(
            "unknown view \"routes\"; valid views: workloads, services, policies, \
             certificates, connections, pods, all"
                .to_owned()
        )
    );
    assert_eq!(
        "wide".parse::<Format>(),
        Err("unknown output format \"wide\"; valid formats: table, json, yaml".to_owned())
    );
    assert_eq!("workload".parse(), Ok(View::Workloads));
    assert_eq!("yaml".parse(), Ok(Format::Yaml));
}

#[test]
fn table_is_reusable() {
    let t = table(
        &["NODE", "READY"],
        vec![
            vec!["node-a".into(), "true".into()],
            vec!["b".into(), "false".into()],
        ],
    );
    assert_eq!(t, "NODE    READY\nnode-a  true\nb       false\n");
}
