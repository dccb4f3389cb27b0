//! Loads the shared known-answer vectors (copied into tests/data) and parses README.md's markdown
//! tables and prose, so that no vector value is copied into test code.

#![allow(dead_code)]

use serde::Deserialize;

pub const README: &str = include_str!("../data/README.md");
pub const DIVERSIFICATION: &str = include_str!("../data/diversification.json");

/// One `## ` section of README.md: its prose and its table rows (header and rule removed).
pub struct Section {
    pub heading: String,
    pub text: String,
    pub header: Vec<String>,
    pub rows: Vec<Vec<String>>,
}

fn split_row(line: &str) -> Vec<String> {
    let inner = line.trim().trim_start_matches('|').trim_end_matches('|');
    inner.split('|').map(|c| c.trim().to_owned()).collect()
}

fn is_rule(cells: &[String]) -> bool {
    cells
        .iter()
        .all(|c| !c.is_empty() && c.chars().all(|ch| ch == '-' || ch == ':'))
}

pub fn sections() -> Vec<Section> {
    let mut out: Vec<Section> = Vec::new();
    for line in README.lines() {
        if let Some(heading) = line.strip_prefix("## ") {
            out.push(Section {
                heading: heading.trim().to_owned(),
                text: String::new(),
                header: Vec::new(),
                rows: Vec::new(),
            });
            continue;
        }
        let Some(section) = out.last_mut() else {
            continue;
        };
        if line.trim_start().starts_with('|') {
            let cells = split_row(line);
            if section.header.is_empty() {
                section.header = cells;
            } else if !is_rule(&cells) {
                assert_eq!(
                    cells.len(),
                    section.header.len(),
                    "ragged table row in section {}",
                    section.heading
                );
                section.rows.push(cells);
            }
        } else {
            section.text.push_str(line);
            section.text.push(' ');
        }
    }
    out
}

/// The section whose heading starts with `prefix`.
pub fn section(prefix: &str) -> Section {
    sections()
        .into_iter()
        .find(|s| s.heading.starts_with(prefix))
        .unwrap_or_else(|| panic!("README.md has no section starting with {prefix:?}"))
}

/// Index of a column by its header name.
pub fn column(section: &Section, name: &str) -> usize {
    section
        .header
        .iter()
        .position(|h| h == name)
        .unwrap_or_else(|| panic!("section {} has no column {name:?}", section.heading))
}

/// Plain hex (spaces allowed) to bytes; not the crate's code parser.
pub fn hex(s: &str) -> Vec<u8> {
    let digits: Vec<u8> = s.bytes().filter(|b| !b.is_ascii_whitespace()).collect();
    data_encoding::HEXUPPER_PERMISSIVE
        .decode(&digits)
        .unwrap_or_else(|e| panic!("not hex in vector {s:?}: {e}"))
}

/// Upper-case hex.
pub fn to_hex(bytes: &[u8]) -> String {
    data_encoding::HEXUPPER.encode(bytes)
}

/// The note in parentheses of a cell, e.g. `3DES` from `24 x 00 (3DES)`.
pub fn note(cell: &str) -> Option<&str> {
    let start = cell.find('(')?;
    let end = cell[start..].find(')')? + start;
    Some(&cell[start + 1..end])
}

/// Interprets a README value cell: plain hex (optionally space-separated), `(empty)`,
/// `N x HH` (N copies of byte HH), a range `000102…1F` / `0102..08`, and a repeat suffix `xN`,
/// with any trailing `(note)` ignored.
pub fn expand(cell: &str) -> Vec<u8> {
    let cell = cell.trim();
    if cell == "(empty)" {
        return Vec::new();
    }
    let value = match cell.find('(') {
        Some(i) => cell[..i].trim(),
        None => cell,
    };
    let words: Vec<&str> = value.split_whitespace().collect();
    if let [count, "x", byte] = words.as_slice() {
        let count: usize = count.parse().expect("repeat count");
        return vec![hex(byte)[0]; count];
    }
    if let [body, repeat] = words.as_slice()
        && let Some(times) = repeat.strip_prefix('x')
        && let Ok(times) = times.parse::<usize>()
    {
        return expand(body).repeat(times);
    }
    for ellipsis in ["…", ".."] {
        if let Some((start, end)) = value.split_once(ellipsis) {
            let mut bytes = hex(start);
            let last = hex(end)[0];
            let mut next = *bytes.last().expect("range start");
            while next != last {
                next = next.wrapping_add(1);
                bytes.push(next);
            }
            return bytes;
        }
    }
    hex(value)
}

/// One entry of diversification.json.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiversificationVector {
    pub scheme: String,
    pub master_key: String,
    pub card_id: String,
    pub key_version: u32,
    pub admin_key: String,
    pub challenge: String,
    pub response: String,
    pub challenge_checksum: String,
    pub response_checksum: String,
}

pub fn diversification_vectors() -> Vec<DiversificationVector> {
    serde_json::from_str(DIVERSIFICATION).expect("diversification.json parses")
}

/// Every window of `n` characters of `s` (to check a message shares no run of secret digits).
pub fn windows(s: &str, n: usize) -> Vec<String> {
    let chars: Vec<char> = s.chars().collect();
    chars
        .windows(n.min(chars.len()).max(1))
        .map(|w| w.iter().collect())
        .collect()
}
