//! `ambient ztunnel-config`: what one ztunnel knows and does, from its admin endpoint's
//! `GET /config_dump`, in the style of `istioctl ztunnel-config`.
//!
//! Everything here is a pure function of the dump (a [`serde_json::Value`]) and the time, so
//! the CLI fetches and prints while tests compare with golden files:
//!
//! ```text
//! $ ambient ztunnel-config workloads
//! NAMESPACE  POD NAME  ADDRESS     NODE    WAYPOINT  PROTOCOL
//! default    client    127.77.1.1  node-a  None      HBONE
//! ```
//!
//! Tables have upper-case headers and one row per item, sorted by namespace and name (by
//! identity for certificates, by workload then direction for connections). `-o json` prints
//! the dump's own section (its items that pass the filter, in dump order); `-o yaml` the same
//! as YAML; for [`View::All`] both print the whole dump with those sections filtered.
//!
//! The dump's fields are read by hand: a missing or mistyped one is an error that names it
//! (`config_dump field "workloads[3].node" is missing`), never a panic. Fields this does not
//! show are ignored, so a newer ztunnel still renders.

use std::fmt;
use std::str::FromStr;

use serde_json::Value;

use self::views::Section;

mod dump;
mod table;
pub mod time;
mod views;

pub use self::table::table;

/// What to show.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum View {
    Workloads,
    Services,
    Policies,
    Certificates,
    Connections,
    /// The pods the node agent handed over for in-pod capture (not in `istioctl`).
    Pods,
    /// Every view above, each under a heading.
    All,
}

/// How to show it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Format {
    /// Aligned columns for people.
    #[default]
    Table,
    /// The dump's section, pretty-printed.
    Json,
    /// The dump's section as YAML.
    Yaml,
}

/// Narrows what a view shows (`--namespace`, `--node`). The default shows everything.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Filter {
    /// Only items in this namespace: workloads, services, policies and pods by their own,
    /// certificates by their identity's, connections by their local workload's.
    pub namespace: Option<String>,
    /// Only workloads on this node; other views are all about the ztunnel's own node already.
    pub node: Option<String>,
}

impl View {
    /// Every view, in the order [`View::All`] shows them (`All` last).
    pub const EVERY: [View; 7] = [
        View::Workloads,
        View::Services,
        View::Policies,
        View::Certificates,
        View::Connections,
        View::Pods,
        View::All,
    ];

    /// The name on the command line.
    pub fn name(self) -> &'static str {
        match self {
            View::Workloads => "workloads",
            View::Services => "services",
            View::Policies => "policies",
            View::Certificates => "certificates",
            View::Connections => "connections",
            View::Pods => "pods",
            View::All => "all",
        }
    }

    /// The name in the singular, also accepted (`workload`), as in `istioctl`.
    fn singular(self) -> &'static str {
        match self {
            View::Workloads => "workload",
            View::Services => "service",
            View::Policies => "policy",
            View::Certificates => "certificate",
            View::Connections => "connection",
            View::Pods => "pod",
            View::All => "all",
        }
    }

    fn sections(
        self,
        dump: &Value,
        filter: &Filter,
        now_unix: u64,
    ) -> Result<Vec<Section>, String> {
        let one = match self {
            View::Workloads => views::workloads(dump, filter)?,
            View::Services => views::services(dump, filter)?,
            View::Policies => views::policies(dump, filter)?,
            View::Certificates => views::certificates(dump, filter, now_unix)?,
            View::Connections => views::connections(dump, filter)?,
            View::Pods => views::pods(dump, filter)?,
            View::All => {
                let mut all = Vec::new();
                // Every view but `All` itself, which is last.
                for v in &View::EVERY[..View::EVERY.len() - 1] {
                    all.extend(v.sections(dump, filter, now_unix)?);
                }
                return Ok(all);
            }
        };
        Ok(vec![one])
    }
}

impl fmt::Display for View {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for View {
    type Err = String;

    /// A view by name, plural or singular.
    fn from_str(s: &str) -> Result<Self, String> {
        View::EVERY
            .into_iter()
            .find(|v| s == v.name() || s == v.singular())
            .ok_or_else(|| {
                let names: Vec<_> = View::EVERY.iter().map(|v| v.name()).collect();
                format!("unknown view {s:?}; valid views: {}", names.join(", "))
            })
    }
}

impl Format {
    pub const EVERY: [Format; 3] = [Format::Table, Format::Json, Format::Yaml];

    /// The name on the command line (`-o`).
    pub fn name(self) -> &'static str {
        match self {
            Format::Table => "table",
            Format::Json => "json",
            Format::Yaml => "yaml",
        }
    }
}

impl fmt::Display for Format {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Format {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        Format::EVERY
            .into_iter()
            .find(|f| f.name() == s)
            .ok_or_else(|| {
                let names: Vec<_> = Format::EVERY.iter().map(|f| f.name()).collect();
                format!(
                    "unknown output format {s:?}; valid formats: {}",
                    names.join(", ")
                )
            })
    }
}

impl Filter {
    fn matches_namespace(&self, namespace: Option<&str>) -> bool {
        self.namespace
            .as_deref()
            .is_none_or(|want| namespace == Some(want))
    }

    fn matches_node(&self, node: &str) -> bool {
        self.node.as_deref().is_none_or(|want| node == want)
    }
}

/// Renders `view` of a ztunnel's `/config_dump` as `format`. `now_unix` (seconds since the
/// Unix epoch) decides which certificates are valid. The output ends in a newline.
///
/// Errors name the dump field that is missing or malformed.
pub fn render(dump: &Value, view: View, format: Format, now_unix: u64) -> Result<String, String> {
    render_filtered(dump, view, format, now_unix, &Filter::default())
}

/// [`render`], showing only what passes `filter`.
pub fn render_filtered(
    dump: &Value,
    view: View,
    format: Format,
    now_unix: u64,
    filter: &Filter,
) -> Result<String, String> {
    let sections = view.sections(dump, filter, now_unix)?;
    match format {
        Format::Table => Ok(text(view, sections)),
        Format::Json => serde_json::to_string_pretty(&data(view, dump, sections)?)
            .map(|s| s + "\n")
            .map_err(|e| format!("writing JSON: {e}")),
        Format::Yaml => serde_yaml::to_string(&data(view, dump, sections)?)
            .map_err(|e| format!("writing YAML: {e}")),
    }
}

/// The tables; for [`View::All`] each under a heading with its row count.
fn text(view: View, sections: Vec<Section>) -> String {
    if view != View::All {
        return sections.into_iter().map(body).collect();
    }
    let shown: Vec<String> = sections
        .into_iter()
        .map(|s| {
            let heading = match s.note {
                Some(_) => s.heading.to_owned(),
                None => format!("{} ({})", s.heading, s.rows.len()),
            };
            format!("{heading}\n{}", body(s))
        })
        .collect();
    shown.join("\n")
}

/// What `-o json|yaml` prints: the section's items, or for [`View::All`] the whole dump with
/// its sections filtered.
fn data(view: View, dump: &Value, sections: Vec<Section>) -> Result<Value, String> {
    if view != View::All {
        return Ok(sections
            .into_iter()
            .map(|s| s.items)
            .next()
            .unwrap_or_default());
    }
    let Value::Object(mut all) = dump.clone() else {
        return Err("config_dump should be an object".to_owned());
    };
    for s in sections {
        all.insert(s.key.to_owned(), s.items);
    }
    Ok(Value::Object(all))
}

/// A section's table, or its note when it does not apply.
fn body(section: Section) -> String {
    match section.note {
        Some(note) => format!("{note}\n"),
        None => table(section.headers, section.rows),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn views_by_name() {
        for v in View::EVERY {
            assert_eq!(v.name().parse::<View>(), Ok(v));
        }
        assert_eq!("workload".parse(), Ok(View::Workloads));
        assert_eq!("policy".parse(), Ok(View::Policies));
        assert_eq!("certificate".parse(), Ok(View::Certificates));
        assert_eq!(
            "bogus".parse::<View>(),
            Err(
                "unknown view \"bogus\"; valid views: workloads, services, policies, \
                 certificates, connections, pods, all"
                    .to_owned()
            )
        );
        assert!("".parse::<View>().is_err());
        assert!("al".parse::<View>().is_err());
        assert!("policie".parse::<View>().is_err());
    }

    #[test]
    fn formats_by_name() {
        for f in Format::EVERY {
            assert_eq!(f.name().parse::<Format>(), Ok(f));
        }
        assert_eq!(
            "xml".parse::<Format>(),
            Err("unknown output format \"xml\"; valid formats: table, json, yaml".to_owned())
        );
    }
}
