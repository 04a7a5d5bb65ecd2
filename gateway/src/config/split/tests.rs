use proptest::prelude::*;

use super::*;

/// The table the split gives, or `None` where it sends the caller back to the whole text.
fn by_pieces(src: &str) -> Option<toml::Table> {
    let split = split(src)?;
    let mut rest: toml::Table = toml::from_str(&split.rest).ok()?;
    if Split::rest_names_devices(&rest) {
        return None;
    }
    let mut entries = Vec::new();
    for piece in &split.pieces {
        let mut entry = parse_piece(src, piece)?;
        if !piece.tags.is_empty() {
            let tags = piece
                .tags
                .iter()
                .map(|tag| parse_tag(src, tag))
                .collect::<Option<Vec<_>>>()?;
            let table = entry.as_table_mut()?;
            table.insert(TAGS.to_owned(), toml::Value::Array(tags));
        }
        entries.push(entry);
    }
    rest.insert(DEVICES.to_owned(), toml::Value::Array(entries));
    Some(rest)
}

const FILE: &str = r#"# a gateway
[gateway]
id = "line-3"

[[devices]]
name = "press"   # [[devices]] in a comment
protocol = "modbus_tcp"
note = """
[[devices]]
[mqtt]
"""
ranges = [
[1, 2],
[3],
]
  [[devices.tags]]
  name = "a"
  [[devices.tags]]
  name = "b"

[mqtt]
url = "mqtt://127.0.0.1:1883"

[[devices]]
name = "line"
[[devices.units]]
name = "u1"
[[devices.units.tags]]
name = "c"
[devices.extra]
x = { y = [1, [2]] }

[api]
listen = "127.0.0.1:9100"
"#;

#[test]
fn each_device_is_cut_from_its_header_to_the_next_header_outside_devices() {
    let split = split(FILE).unwrap();
    let texts: Vec<&str> = split
        .pieces
        .iter()
        .map(|p| &FILE[p.range.clone()])
        .collect();
    assert_eq!(texts.len(), 2);
    assert!(texts[0].starts_with("[[devices]]\nname = \"press\""));
    assert!(texts[0].ends_with("name = \"b\"\n\n"));
    assert!(texts[1].starts_with("[[devices]]\nname = \"line\""));
    assert!(texts[1].ends_with("x = { y = [1, [2]] }\n\n"));
}

#[test]
fn each_tag_of_a_device_is_cut_from_its_header_to_the_next_header_not_under_it() {
    let split = split(FILE).unwrap();
    let tags: Vec<&str> = split.pieces[0]
        .tags
        .iter()
        .map(|t| &FILE[t.clone()])
        .collect();
    assert_eq!(
        tags,
        [
            "[[devices.tags]]\n  name = \"a\"\n  ",
            "[[devices.tags]]\n  name = \"b\"\n\n"
        ]
    );
    assert!(
        split.pieces[1].tags.is_empty(),
        "a unit's tags stay in its device's piece"
    );
}

#[test]
fn the_rest_keeps_the_files_lines_and_offsets_and_holds_no_device() {
    let split = split(FILE).unwrap();
    assert_eq!(split.rest.len(), FILE.len());
    assert_eq!(split.rest.lines().count(), FILE.lines().count());
    assert_eq!(split.rest.find("[mqtt]\nurl"), FILE.find("[mqtt]\nurl"));
    assert!(!split.rest.contains("press"));
}

#[test]
fn the_pieces_and_the_rest_make_the_table_of_the_whole_file() {
    let whole: toml::Table = toml::from_str(FILE).unwrap();
    assert_eq!(by_pieces(FILE), Some(whole));
}

#[test]
fn a_file_without_devices_or_with_headers_the_scan_does_not_know_is_not_split() {
    for src in [
        "[gateway]\nid = \"a\"\n",
        "[\"devices\"]\nname = \"a\"\n",
        "[[devices]]\nname = \"a\"\n[[\"devices\".tags]]\n",
        "[[devices.tags]]\nname = \"a\"\n[[devices]]\n",
        "[devices]\nname = \"a\"\n",
        "[[devices]]\nx = [\n",
        "[[devices]]\nx = ]\n",
        "[[devices] ]\n",
    ] {
        assert!(split(src).is_none(), "{src:?}");
    }
}

#[test]
fn a_rest_that_names_devices_sends_the_caller_to_the_whole_file() {
    let src = "devices = []\n[[devices]]\nname = \"a\"\n";
    let split = split(src).unwrap();
    let rest: toml::Table = toml::from_str(&split.rest).unwrap();
    assert!(Split::rest_names_devices(&rest));
    assert!(toml::from_str::<toml::Table>(src).is_err());
}

#[test]
fn a_piece_that_does_not_parse_on_its_own_gives_no_entry() {
    for src in [
        "[[devices]]\nname = \"a\"\nname = \"b\"\n",
        "[[devices]] x = 1\n",
        "[[devices]]\ntags = []\n[[devices.tags]]\nname = \"a\"\n",
        "[[devices]]\n[devices.tags.x]\n[[devices.tags]]\nname = \"a\"\n",
    ] {
        let split = split(src).unwrap();
        assert_eq!(parse_piece(src, &split.pieces[0]), None, "{src:?}");
    }
    let src = "[[devices]]\n[[devices.tags]]\nname = \"a\"\nname = \"b\"\n";
    let split = split(src).unwrap();
    assert_eq!(parse_tag(src, &split.pieces[0].tags[0]), None);
}

/// Lines a generated file is made of: sections, devices and their tables, values that span
/// lines, strings and comments that look like headers, and mistakes.
const LINES: &[&str] = &[
    "[gateway]",
    "[mqtt]",
    "[[devices]]",
    "[[ devices ]]",
    "[[devices.tags]]",
    "[[devices.units]]",
    "[[devices.units.tags]]",
    "[devices.extra]",
    "[devices.tags.x]",
    "[[devices.tags.y]]",
    "[devices.tags]",
    "tags = []",
    "[devices]",
    "[\"devices\"]",
    "[a.devices]",
    "[[devices]] # a device",
    "devices = []",
    "devices.x = 1",
    "name = \"a\"",
    "name = \"b\"",
    "x = 1",
    "y = [",
    "[1],",
    "[[2]]",
    "]",
    "z = { a = [1, 2] }",
    "s = \"\"\"",
    "\"\"\"",
    "t = '[[devices]]'",
    "# [[devices]]",
    "",
    "  ",
    "[[devices]] x = 1",
    "[ [devices] ]",
    "k = \"é\"",
];

/// One `[[devices]]` entry of a valid file: its header's spelling, tags, units, a sub-table,
/// and a multi-line string holding header-like lines.
#[derive(Debug, Clone)]
struct Device {
    header: usize,
    tags: usize,
    units: usize,
    extra: bool,
    note: bool,
}

fn device() -> impl Strategy<Value = Device> {
    (
        0..4usize,
        0..3usize,
        0..3usize,
        any::<bool>(),
        any::<bool>(),
    )
        .prop_map(|(header, tags, units, extra, note)| Device {
            header,
            tags,
            units,
            extra,
            note,
        })
}

/// A valid file: devices with sections placed before, between and after them.
fn valid_file(devices: &[Device], slots: [usize; 3], crlf: bool, bom: bool) -> String {
    const HEADERS: [&str; 4] = [
        "[[devices]]",
        "[[ devices ]]",
        "[[\tdevices]] # d",
        "  [[devices]]",
    ];
    const SECTIONS: [&str; 3] = [
        "[gateway]\nid = \"g\"\n",
        "# the broker\n[mqtt]\nurl = \"mqtt://127.0.0.1:1883\"\n",
        "[api]\nlisten = \"127.0.0.1:9100\" # [[devices]]\n",
    ];
    let mut out = String::from(if bom { "\u{feff}" } else { "" });
    for (i, d) in devices.iter().enumerate() {
        for (s, &slot) in SECTIONS.iter().zip(&slots) {
            if slot == i {
                out.push_str(s);
            }
        }
        out.push_str(HEADERS[d.header]);
        out.push_str(&format!("\nname = \"d{i}\"\n"));
        if d.note {
            out.push_str("note = \"\"\"\n[[devices]]\n[mqtt]\n\"\"\"\n");
        }
        for t in 0..d.tags {
            out.push_str(&format!(
                "  [[devices.tags]]\n  name = \"t{t}\"\n  r = [\n[1],\n]\n"
            ));
        }
        for u in 0..d.units {
            out.push_str(&format!(
                "[[devices.units]]\nname = \"u{u}\"\n[[devices.units.tags]]\nname = \"a\"\n"
            ));
        }
        if d.extra {
            out.push_str("[devices.extra]\nx = { y = [1, [2]] }\n");
        }
    }
    for (s, &slot) in SECTIONS.iter().zip(&slots) {
        if slot >= devices.len() {
            out.push_str(s);
        }
    }
    if crlf {
        out = out.replace('\n', "\r\n");
    }
    out
}

proptest! {
    /// A valid file is always split (when it has devices), and the pieces give its table.
    #[test]
    fn a_valid_file_split_gives_the_whole_files_table(
        devices in prop::collection::vec(device(), 0..6),
        slots in prop::array::uniform3(0..7usize),
        crlf in any::<bool>(),
        bom in any::<bool>(),
    ) {
        let src = valid_file(&devices, slots, crlf, bom);
        let whole = toml::from_str::<toml::Table>(&src);
        prop_assert!(whole.is_ok(), "{}", src);
        if devices.is_empty() {
            prop_assert!(split(&src).is_none());
        } else {
            prop_assert_eq!(by_pieces(&src), whole.ok(), "{}", src);
        }
    }

    /// Where the split is used, it gives what the whole file gives; where the whole file does
    /// not parse, the split never gives a table either.
    #[test]
    fn the_split_gives_the_whole_files_table_or_nothing(
        lines in prop::collection::vec(prop::sample::select(LINES), 0..40),
        crlf in any::<bool>(),
    ) {
        let src = lines.join(if crlf { "\r\n" } else { "\n" });
        let whole = toml::from_str::<toml::Table>(&src).ok();
        match by_pieces(&src) {
            Some(table) => prop_assert_eq!(Some(table), whole, "{}", src),
            None => prop_assert!(whole.is_none() || split(&src).is_none(), "{}", src),
        }
    }
}
