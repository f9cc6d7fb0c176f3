//! Plain-text tables in the style of `kubectl get` and `istioctl ztunnel-config`.

use std::fmt::Write as _;

/// Spaces between columns. `istioctl` uses one; two keep multi-word headers such as
/// `POD NAME` and `SERVICE VIP` readable when a column is exactly as wide as its header.
const GAP: usize = 2;

/// Lays out `rows` under `headers`: one line per row, each column left-aligned and as wide as
/// its widest cell, columns separated by spaces.
///
/// - Rows are printed in the order given; sort them first.
/// - Every line ends in `\n`, trailing spaces are trimmed, and a table with no rows is just
///   the header line.
/// - A row shorter than `headers` is padded with empty cells; cells past the last header
///   still get a column.
/// - Control characters in a cell (a newline in a pod name or an error message, an escape
///   sequence) are shown escaped (`\n`, `\u{1b}`), so a value cannot break the layout.
/// - Widths are counted in `char`s, which is exact for the ASCII that names and addresses use.
///
/// Headers are printed as given; by convention they are upper case (`NAMESPACE`, `POD NAME`).
pub fn table(headers: &[&str], rows: Vec<Vec<String>>) -> String {
    let rows: Vec<Vec<String>> = rows
        .into_iter()
        .map(|row| row.iter().map(|cell| escape(cell)).collect())
        .collect();
    let headers: Vec<String> = headers.iter().map(|h| escape(h)).collect();
    let columns = rows
        .iter()
        .map(Vec::len)
        .chain([headers.len()])
        .max()
        .unwrap_or(0);
    let mut widths = vec![0; columns];
    for row in rows.iter().chain([&headers]) {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    for row in [&headers].into_iter().chain(rows.iter()) {
        let mut line = String::new();
        for (i, width) in widths.iter().enumerate() {
            let cell = row.get(i).map(String::as_str).unwrap_or("");
            let pad = if i + 1 == columns { 0 } else { width + GAP };
            // Writing to a String cannot fail.
            let _ = write!(line, "{cell:<pad$}");
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

fn escape(cell: &str) -> String {
    if !cell.chars().any(char::is_control) {
        return cell.to_owned();
    }
    cell.chars()
        .map(|c| {
            if c.is_control() {
                c.escape_default().to_string()
            } else {
                c.to_string()
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(cells: &[&str]) -> Vec<String> {
        cells.iter().map(|c| c.to_string()).collect()
    }

    #[test]
    fn columns_align_and_lines_are_trimmed() {
        let t = table(
            &["NAME", "ADDRESS", "NODE"],
            vec![
                row(&["echo-v1", "10.0.0.1", "node-a"]),
                row(&["a", "10.0.0.100", ""]),
            ],
        );
        assert_eq!(
            t,
            "NAME     ADDRESS     NODE\n\
             echo-v1  10.0.0.1    node-a\n\
             a        10.0.0.100\n"
        );
    }

    #[test]
    fn no_rows_is_the_header_line() {
        assert_eq!(table(&["A", "B"], vec![]), "A  B\n");
    }

    #[test]
    fn ragged_rows_and_control_characters() {
        let t = table(
            &["A", "B"],
            vec![row(&["x"]), row(&["y", "two\nlines", "extra"])],
        );
        assert_eq!(t, "A  B\nx\ny  two\\nlines  extra\n");
    }
}
