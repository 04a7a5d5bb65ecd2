//! Problems and where they are: the field path of a value, the rendering of a problem list,
//! and the one way a line number is found ([`Locator`]), for syntax errors and field paths
//! alike.

use std::cell::OnceCell;
use std::fmt::{self, Write as _};
use std::io;
use std::ops::Range;
use std::sync::Arc;

use toml_edit::{Item, TableLike};

/// Every problem found in a config file.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{}", self.render())]
pub struct ConfigErrors {
    /// The file, as given to [`load`](super::load) or [`parse`](super::parse).
    pub file: String,
    /// The problems, ordered by line (problems without a line first).
    pub problems: Vec<Problem>,
    /// Why the file could not be read, when that is the problem.
    #[source]
    pub read_error: Option<Arc<io::Error>>,
}

impl PartialEq for ConfigErrors {
    /// The same file and problems; a read error is compared by its kind.
    fn eq(&self, other: &Self) -> bool {
        self.file == other.file
            && self.problems == other.problems
            && self.read_error.as_ref().map(|e| e.kind())
                == other.read_error.as_ref().map(|e| e.kind())
    }
}

impl ConfigErrors {
    /// One line per problem: `{file}:{line}: {field}: {message}`.
    pub fn render(&self) -> String {
        let mut out = String::new();
        for (i, problem) in self.problems.iter().enumerate() {
            if i > 0 {
                out.push('\n');
            }
            let separator = if problem.line.is_some() { ":" } else { ": " };
            let _ = write!(out, "{}{separator}{problem}", self.file);
        }
        out
    }

    /// The problems of one file, ordered by line; problems without a line come first.
    pub(super) fn new(file: &str, mut problems: Vec<Problem>) -> Self {
        problems.sort_by_key(|p| p.line);
        ConfigErrors {
            file: file.to_owned(),
            problems,
            read_error: None,
        }
    }

    /// One problem about the whole file (no field).
    pub(super) fn whole_file(file: &str, line: Option<usize>, message: String) -> Self {
        let problem = Problem {
            line,
            field: String::new(),
            message,
        };
        ConfigErrors::new(file, vec![problem])
    }

    /// The file could not be read.
    pub(super) fn unreadable(file: &str, error: io::Error) -> Self {
        let message = format!("cannot read the file: {error}");
        ConfigErrors {
            read_error: Some(Arc::new(error)),
            ..ConfigErrors::whole_file(file, None, message)
        }
    }

    /// A TOML syntax error, the only problem reported when there is one: its parser's message
    /// on one line, at the line of `span`.
    pub(super) fn syntax(src: &str, file: &str, message: &str, span: Option<Range<usize>>) -> Self {
        let message = message
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .collect::<Vec<_>>()
            .join("; ");
        let line = span.map(|s| Locator::new(src).line_at(s.start));
        ConfigErrors::whole_file(file, line, format!("TOML syntax error: {message}"))
    }
}

/// One problem: where and what.
#[derive(Debug, Clone, PartialEq)]
pub struct Problem {
    /// 1-based line in the file, if known.
    pub line: Option<usize>,
    /// Field path such as `devices[0].tags[2].address`; empty when about the whole file.
    pub field: String,
    /// What is wrong, and how to fix it when that is not obvious.
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(line) = self.line {
            write!(f, "{line}: ")?;
        }
        if !self.field.is_empty() {
            write!(f, "{}: ", self.field)?;
        }
        f.write_str(&self.message)
    }
}

// ---- Field paths -------------------------------------------------------------------------

/// Where a value lives in the document, e.g. `devices[0].tags[2].address`.
#[derive(Debug, Clone)]
pub(super) struct FieldPath(Vec<Segment>);

#[derive(Debug, Clone)]
enum Segment {
    Key(String),
    Index(usize),
}

impl FieldPath {
    /// A top-level key: a section such as `mqtt`.
    pub(super) fn top(key: &str) -> Self {
        FieldPath(vec![Segment::Key(key.to_owned())])
    }

    /// The key `key` of the table at this path.
    pub(super) fn key(&self, key: &str) -> Self {
        let mut path = self.clone();
        path.0.push(Segment::Key(key.to_owned()));
        path
    }

    /// Entry `index` of the array at this path.
    pub(super) fn index(&self, index: usize) -> Self {
        let mut path = self.clone();
        path.0.push(Segment::Index(index));
        path
    }

    /// The index this path ends with, if it names an array entry.
    pub(super) fn last_index(&self) -> Option<usize> {
        match self.0.last() {
            Some(Segment::Index(index)) => Some(*index),
            _ => None,
        }
    }
}

impl fmt::Display for FieldPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, segment) in self.0.iter().enumerate() {
            match segment {
                Segment::Key(key) if i == 0 => f.write_str(key)?,
                Segment::Key(key) => write!(f, ".{key}")?,
                Segment::Index(index) => write!(f, "[{index}]")?,
            }
        }
        Ok(())
    }
}

// ---- Lines -------------------------------------------------------------------------------

/// Finds the line of a byte offset or of a field path in one text.
///
/// Invariant: `line_starts` holds the byte offset of the start of every line of `src`, in
/// order, the first being 0; a line number is the count of line starts at or before an
/// offset, so it is always between 1 and the number of lines.
pub(super) struct Locator<'a> {
    src: &'a str,
    line_starts: Vec<usize>,
    /// The document with spans, parsed on the first look-up of a field path; `None` inside
    /// when the text does not parse (then no path has a line).
    doc: OnceCell<Option<toml_edit::ImDocument<&'a str>>>,
}

impl<'a> Locator<'a> {
    pub(super) fn new(src: &'a str) -> Self {
        Locator {
            src,
            line_starts: std::iter::once(0)
                .chain(src.match_indices('\n').map(|(i, _)| i + 1))
                .collect(),
            doc: OnceCell::new(),
        }
    }

    /// The 1-based line holding byte `offset`.
    pub(super) fn line_at(&self, offset: usize) -> usize {
        self.line_starts.partition_point(|&start| start <= offset)
    }

    /// The line of the value at `path`: see [`Locator::span_of`].
    pub(super) fn line_of(&self, path: &FieldPath) -> Option<usize> {
        self.span_of(path).map(|span| self.line_at(span.start))
    }

    /// The span of the deepest part of `path` found in the document: the key itself, or the
    /// header of the table that should hold it.
    fn span_of(&self, path: &FieldPath) -> Option<Range<usize>> {
        let doc = self
            .doc
            .get_or_init(|| toml_edit::ImDocument::parse(self.src).ok())
            .as_ref()?;
        let mut node = Node::Table(doc.as_table());
        let mut found = None;
        for segment in &path.0 {
            let next = match segment {
                Segment::Key(key) => node
                    .table_like()
                    .and_then(|table| table.get_key_value(key))
                    .map(|(key, item)| (key.span().or_else(|| item.span()), Node::Item(item))),
                Segment::Index(index) => node.element(*index),
            };
            let Some((span, next)) = next else { break };
            if span.is_some() {
                found = span;
            }
            node = next;
        }
        found
    }
}

/// A position while walking the `toml_edit` document.
#[derive(Clone, Copy)]
enum Node<'d> {
    Table(&'d toml_edit::Table),
    Item(&'d Item),
    Value(&'d toml_edit::Value),
}

impl<'d> Node<'d> {
    fn table_like(self) -> Option<&'d dyn TableLike> {
        match self {
            Node::Table(table) => Some(table),
            Node::Item(item) => item.as_table_like(),
            Node::Value(value) => value.as_inline_table().map(|t| t as &dyn TableLike),
        }
    }

    /// Entry `index` of an array (of tables), with its span.
    fn element(self, index: usize) -> Option<(Option<Range<usize>>, Node<'d>)> {
        let array = match self {
            Node::Item(Item::ArrayOfTables(tables)) => {
                let table = tables.get(index)?;
                return Some((table.span(), Node::Table(table)));
            }
            Node::Item(Item::Value(toml_edit::Value::Array(array)))
            | Node::Value(toml_edit::Value::Array(array)) => array,
            _ => return None,
        };
        let value = array.get(index)?;
        Some((value.span(), Node::Value(value)))
    }
}
