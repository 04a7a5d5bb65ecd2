//! The file cut at its `[[devices]]` headers, so that each device is parsed, checked and
//! dropped in turn instead of the whole file being held as one TOML tree.
//!
//! # Design
//!
//! A TOML tree costs about 20 times its text: a 10k-tag file of 700 KB became a 14 MB
//! document while it was parsed and an 8 MB table after, on a box whose whole budget is
//! 16 MB. Almost all of such a file is its devices, and a device's tables never reach outside
//! it: from one `[[devices]]` header to the next header that is not under `devices`, every
//! line belongs to that one entry of the `devices` array. So the text is split there:
//!
//! - each device's **piece** (its header up to the next header outside `devices`, or the end)
//!   is parsed on its own when the checker comes to it, as a document whose `devices` array
//!   holds that one entry;
//! - within it, each of the device's own `[[devices.tags]]` entries (its header up to the next
//!   header not under `devices.tags`) is a **tag piece**, blanked out of the device's piece and
//!   parsed on its own when the checker comes to that tag: a one-device file of 10k OPC UA
//!   items is never one tree either (a unit's tags stay in their device's piece);
//! - the **rest** is the text with every piece blanked out (each byte but a newline made a
//!   space), so its lines and byte offsets are the file's; it is parsed once, up front.
//!
//! # Invariant
//!
//! When [`split`] returns a split, and the rest and every piece parse, the rest's table plus a
//! `devices` array of the pieces' entries (in order, each with a `tags` array of its tag
//! pieces' entries when it has any) is the table the whole text parses to. The same argument
//! holds a level down: a device piece that still names `tags` once its tag pieces are
//! blanked out is not used.
//! That holds because the cuts fall only at the start of a header line outside any value, a
//! header resets the table later lines belong to, and the rest must not name `devices` at
//! all (a `devices` key or table there could merge with or clash against the pieces' entries:
//! [`Split::rest_names_devices`] tells the caller to parse the whole text instead). Anything
//! the scan does not recognise (a quoted or dotted-with-quotes header key, a header under
//! `devices` before the first `[[devices]]`, a `[devices]` table, a bracket left open) gives
//! no split, and a piece or rest that does not parse sends the caller back to the whole text
//! too: syntax errors are always reported from the whole text, exactly as without the split.
//! The tests check the invariant on generated files, valid ones and ones made of header-like
//! lines and mistakes; the `config_loader` fuzz target runs the loader (and so the split) on
//! arbitrary text.

use std::ops::Range;

use toml_parser::lexer::{Lexer, TokenKind};
use toml_parser::Source;

/// A file cut into the rest and its devices' pieces.
pub(super) struct Split {
    /// The text without the devices' pieces: every byte of them but a newline is a space.
    pub(super) rest: String,
    /// Each `[[devices]]` entry's piece, in order.
    pub(super) pieces: Vec<Piece>,
}

/// One device's piece of the text, and its own tags' pieces in it.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct Piece {
    /// From its `[[devices]]` header up to the next header outside `devices`.
    pub(super) range: Range<usize>,
    /// Each `[[devices.tags]]` entry of the device: from its header up to the next header
    /// that is not under it (a one-device file of 10k OPC UA items is parsed a tag at a time).
    pub(super) tags: Vec<Range<usize>>,
}

impl Split {
    /// Whether the rest's table has a `devices` key: the pieces' entries could then not be
    /// added to it as the whole text would, so the whole text must be parsed.
    pub(super) fn rest_names_devices(rest: &toml::Table) -> bool {
        rest.contains_key(DEVICES)
    }
}

/// One device's entry, parsed from its piece without its tags' pieces (parsed one at a time
/// by [`parse_tag`]); `None` when the piece does not parse on its own (the whole text then
/// says why), or names `tags` besides its tags' pieces.
pub(super) fn parse_piece(src: &str, piece: &Piece) -> Option<toml::Value> {
    let text = src.get(piece.range.clone())?;
    let start = piece.range.start;
    let mut table: toml::Table = if piece.tags.is_empty() {
        toml::from_str(text).ok()?
    } else {
        let tags = piece.tags.iter().map(|t| t.start - start..t.end - start);
        toml::from_str(&blank(text, tags)?).ok()?
    };
    let entry = match table.remove(DEVICES)? {
        toml::Value::Array(mut entries) if entries.len() == 1 && table.is_empty() => {
            entries.pop()?
        }
        _ => return None,
    };
    if !piece.tags.is_empty() && entry.as_table()?.contains_key(TAGS) {
        return None;
    }
    Some(entry)
}

/// One `[[devices.tags]]` entry, parsed from its piece; `None` when it does not parse on its
/// own. Alone, the piece's header makes `devices` a table holding the `tags` array.
pub(super) fn parse_tag(src: &str, tag: &Range<usize>) -> Option<toml::Value> {
    let mut table: toml::Table = toml::from_str(src.get(tag.clone())?).ok()?;
    let toml::Value::Table(mut devices) = table.remove(DEVICES)? else {
        return None;
    };
    match devices.remove(TAGS)? {
        toml::Value::Array(mut entries)
            if entries.len() == 1 && devices.is_empty() && table.is_empty() =>
        {
            entries.pop()
        }
        _ => None,
    }
}

/// `text` with the bytes of `ranges` made spaces, newlines kept.
fn blank(text: &str, ranges: impl Iterator<Item = Range<usize>>) -> Option<String> {
    let mut bytes = text.as_bytes().to_vec();
    for range in ranges {
        for byte in bytes.get_mut(range)? {
            if *byte != b'\n' {
                *byte = b' ';
            }
        }
    }
    // Only whole UTF-8 sequences were replaced, each byte by an ASCII space.
    String::from_utf8(bytes).ok()
}

const DEVICES: &str = "devices";
const TAGS: &str = "tags";

/// Cuts `src` at its `[[devices]]` headers; `None` when it has none, or when the scan meets
/// anything it does not recognise (the whole text is then parsed as one).
pub(super) fn split(src: &str) -> Option<Split> {
    let pieces = pieces(src)?;
    if pieces.is_empty() {
        return None;
    }
    let rest = blank(src, pieces.iter().map(|p| p.range.clone()))?;
    Some(Split { rest, pieces })
}

/// What a header names, as far as the split cares.
#[derive(Debug, PartialEq)]
enum Header {
    /// `[[devices]]`: a new device.
    NewDevice,
    /// `[[devices.tags]]`: a new tag of the current device.
    NewTag,
    /// A table under `devices.tags` (`[devices.tags.x]`): part of the current tag.
    UnderTag,
    /// Any other table under `devices` (`[[devices.units]]`, `[devices.x]`): part of the
    /// current device.
    UnderDevices,
    /// A table outside `devices`.
    Other,
}

/// The devices' pieces.
fn pieces(src: &str) -> Option<Vec<Piece>> {
    let mut tokens = Source::new(src).lex();
    let mut pieces = Vec::new();
    // The current device's piece, its start and its tags so far.
    let mut open: Option<(usize, Vec<Range<usize>>)> = None;
    // The start of the current tag's piece.
    let mut tag: Option<usize> = None;
    // Brackets and braces open in the current value.
    let mut depth = 0usize;
    // Whether the next token starts an expression (a header or a key/value).
    let mut line_start = true;
    while let Some(token) = tokens.next() {
        match token.kind() {
            TokenKind::Eof => break,
            TokenKind::Whitespace | TokenKind::Comment => {}
            TokenKind::Newline => line_start = depth == 0,
            TokenKind::LeftSquareBracket if line_start && depth == 0 => {
                let at = token.span().start();
                let header = header(src, &mut tokens)?;
                if header != Header::UnderTag {
                    if let (Some(begin), Some((_, tags))) = (tag.take(), open.as_mut()) {
                        tags.push(begin..at);
                    }
                }
                match header {
                    Header::NewDevice => {
                        if let Some((begin, tags)) = open.replace((at, Vec::new())) {
                            pieces.push(Piece {
                                range: begin..at,
                                tags,
                            });
                        }
                    }
                    Header::NewTag | Header::UnderTag | Header::UnderDevices if open.is_none() => {
                        return None
                    }
                    Header::NewTag => tag = Some(at),
                    Header::UnderTag | Header::UnderDevices => {}
                    Header::Other => {
                        if let Some((begin, tags)) = open.take() {
                            pieces.push(Piece {
                                range: begin..at,
                                tags,
                            });
                        }
                    }
                }
                line_start = false;
            }
            TokenKind::LeftSquareBracket | TokenKind::LeftCurlyBracket => {
                depth += 1;
                line_start = false;
            }
            TokenKind::RightSquareBracket | TokenKind::RightCurlyBracket => {
                depth = depth.checked_sub(1)?;
                line_start = false;
            }
            _ => line_start = false,
        }
    }
    if depth != 0 {
        return None;
    }
    if let Some((begin, mut tags)) = open {
        if let Some(t) = tag {
            tags.push(t..src.len());
        }
        pieces.push(Piece {
            range: begin..src.len(),
            tags,
        });
    }
    Some(pieces)
}

/// Reads a header after its first `[`: `None` for anything but bare keys (`a.b-c_1`) closed
/// by the matching bracket(s).
fn header(src: &str, tokens: &mut Lexer<'_>) -> Option<Header> {
    let mut next = tokens.next()?;
    let array = next.kind() == TokenKind::LeftSquareBracket;
    if array {
        next = tokens.next()?;
    }
    let mut keys: Vec<&str> = Vec::new();
    let mut want_key = true;
    loop {
        let span = next.span();
        match next.kind() {
            TokenKind::Whitespace => {}
            TokenKind::Atom if want_key => {
                let key = src.get(span.start()..span.end())?;
                let bare = !key.is_empty()
                    && key
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
                if !bare {
                    return None;
                }
                keys.push(key);
                want_key = false;
            }
            TokenKind::Dot if !want_key => want_key = true,
            TokenKind::RightSquareBracket if !want_key => break,
            _ => return None,
        }
        next = tokens.next()?;
    }
    if array && tokens.next()?.kind() != TokenKind::RightSquareBracket {
        return None;
    }
    Some(match (keys.as_slice(), array) {
        ([DEVICES], true) => Header::NewDevice,
        // `[devices]` makes the array a table: the whole text says what is wrong.
        ([DEVICES], false) => return None,
        ([DEVICES, TAGS], true) => Header::NewTag,
        ([DEVICES, TAGS, _, ..], _) => Header::UnderTag,
        ([DEVICES, ..], _) => Header::UnderDevices,
        _ => Header::Other,
    })
}

#[cfg(test)]
mod tests;
