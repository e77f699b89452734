//! A YAML tree with a position on every node, and decoding helpers that collect
//! positioned diagnostics instead of stopping at the first problem.
//!
//! Built on `saphyr-parser`'s event stream: we keep scalars as text (with their
//! quoting) and decide their type where the field's type is known, so `"443"`
//! and `443` are both a port but `yes` is not a boolean.

use std::collections::HashMap;

use saphyr_parser::{Event, Parser, ScalarStyle, Span};

use super::{ConfigError, Diagnostic};

/// 1-based line and column.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Pos {
    pub line: usize,
    pub column: usize,
}

impl Pos {
    fn from_span(span: &Span) -> Pos {
        Pos {
            line: span.start.line(),
            column: span.start.col() + 1,
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Null,
    /// Scalar text; `plain` is false for quoted and block scalars.
    Scalar {
        text: String,
        plain: bool,
    },
    Seq(Vec<Node>),
    Map(Vec<(Node, Node)>),
}

#[derive(Debug, Clone, PartialEq)]
pub struct Node {
    pub pos: Pos,
    pub value: Value,
}

impl Node {
    /// What kind of value this is, for "expected X, found Y" messages.
    pub fn kind(&self) -> &'static str {
        match &self.value {
            Value::Null => "nothing (null)",
            Value::Scalar { text, plain } => {
                if *plain && text.parse::<i64>().is_ok() {
                    "a number"
                } else if *plain && (text == "true" || text == "false") {
                    "a boolean"
                } else {
                    "a string"
                }
            }
            Value::Seq(_) => "a list",
            Value::Map(_) => "a mapping",
        }
    }

    pub fn is_null(&self) -> bool {
        matches!(self.value, Value::Null)
    }
}

/// Nodes in the decoded tree, aliases expanded: a "billion laughs" file stops here.
/// A map with the most zones the kernel tables index (65535) is about 700k nodes.
pub const MAX_NODES: usize = 1_500_000;
/// Collections inside collections.
pub const MAX_DEPTH: usize = 64;

/// Parses one YAML document. An empty file gives a `Null` root. Alias expansion,
/// nesting and the node count are bounded ([`MAX_NODES`], [`MAX_DEPTH`]).
pub fn parse(file: &str, text: &str) -> Result<Node, ConfigError> {
    let mut parser = Parser::new_from_str(text);
    // (collection, pending map key, anchor, node count when it started)
    let mut stack: Vec<(Node, Option<Node>, usize, usize)> = Vec::new();
    // anchor id -> (node, its size in nodes)
    let mut anchors: HashMap<usize, (Node, usize)> = HashMap::new();
    let mut nodes = 0usize;
    let mut root: Option<Node> = None;
    let mut documents = 0usize;
    let syntax = |pos: Pos, info: &str| ConfigError {
        diagnostics: vec![Diagnostic {
            file: file.to_owned(),
            line: pos.line,
            column: pos.column,
            message: format!(
                "YAML syntax error: {info} — check the indentation, the `key: value` \
                 separators and the quoting on this line and the line before"
            ),
        }],
    };
    let limit = |pos: Pos, what: String| ConfigError {
        diagnostics: vec![Diagnostic {
            file: file.to_owned(),
            line: pos.line,
            column: pos.column,
            message: format!(
                "{what} — a conduit map needs far less; look for aliases (`*name`) that \
                 repeat large anchors"
            ),
        }],
    };
    while let Some(event) = parser.next_event() {
        let (event, span) = match event {
            Ok(ev) => ev,
            Err(e) => {
                let m = e.marker();
                return Err(syntax(
                    Pos {
                        line: m.line(),
                        column: m.col() + 1,
                    },
                    e.info(),
                ));
            }
        };
        let pos = Pos::from_span(&span);
        let added = match &event {
            Event::Alias(id) => anchors.get(id).map_or(1, |(_, size)| *size),
            Event::Scalar(..) | Event::SequenceStart(..) | Event::MappingStart(..) => 1,
            _ => 0,
        };
        nodes = nodes.saturating_add(added);
        if nodes > MAX_NODES {
            return Err(limit(
                pos,
                format!("more than {MAX_NODES} YAML nodes (aliases expanded)"),
            ));
        }
        if matches!(event, Event::SequenceStart(..) | Event::MappingStart(..))
            && stack.len() >= MAX_DEPTH
        {
            return Err(limit(
                pos,
                format!("collections nested deeper than {MAX_DEPTH} levels"),
            ));
        }
        let (complete, anchor, size) = match event {
            Event::StreamStart | Event::StreamEnd | Event::Nothing | Event::DocumentEnd => {
                continue;
            }
            Event::DocumentStart(_) => {
                documents += 1;
                if documents > 1 {
                    return Err(ConfigError {
                        diagnostics: vec![Diagnostic {
                            file: file.to_owned(),
                            line: pos.line,
                            column: pos.column,
                            message: "a second YAML document (`---`) in the file — keep \
                                      the whole configuration in one document"
                                .to_owned(),
                        }],
                    });
                }
                continue;
            }
            Event::Alias(id) => match anchors.get(&id) {
                Some((n, size)) => (
                    Node {
                        pos,
                        value: n.value.clone(),
                    },
                    0,
                    *size,
                ),
                None => return Err(syntax(pos, "alias to an unknown anchor")),
            },
            Event::Scalar(text, style, anchor, _tag) => {
                let plain = style == ScalarStyle::Plain;
                let value = if plain && matches!(&*text, "" | "~" | "null" | "Null" | "NULL") {
                    Value::Null
                } else {
                    Value::Scalar {
                        text: text.into_owned(),
                        plain,
                    }
                };
                (Node { pos, value }, anchor, 1)
            }
            Event::SequenceStart(anchor, _) => {
                stack.push((
                    Node {
                        pos,
                        value: Value::Seq(Vec::new()),
                    },
                    None,
                    anchor,
                    nodes,
                ));
                continue;
            }
            Event::MappingStart(anchor, _) => {
                stack.push((
                    Node {
                        pos,
                        value: Value::Map(Vec::new()),
                    },
                    None,
                    anchor,
                    nodes,
                ));
                continue;
            }
            Event::SequenceEnd | Event::MappingEnd => match stack.pop() {
                // Nodes counted since its start, itself included.
                Some((node, _, anchor, start)) => (node, anchor, nodes - start + 1),
                None => return Err(syntax(pos, "unbalanced end of collection")),
            },
        };
        if anchor != 0 {
            anchors.insert(anchor, (complete.clone(), size));
        }
        // Attach the finished node to its parent (or make it the root).
        match stack.last_mut() {
            None => root = Some(complete),
            Some((parent, pending_key, ..)) => match &mut parent.value {
                Value::Seq(items) => items.push(complete),
                Value::Map(entries) => match pending_key.take() {
                    None => *pending_key = Some(complete),
                    Some(key) => entries.push((key, complete)),
                },
                _ => return Err(syntax(pos, "internal: scalar parent")),
            },
        }
    }
    Ok(root.unwrap_or(Node {
        pos: Pos { line: 1, column: 1 },
        value: Value::Null,
    }))
}

/// Collects diagnostics for one file.
#[derive(Debug)]
pub struct Ctx {
    pub file: String,
    pub diags: Vec<Diagnostic>,
}

impl Ctx {
    pub fn new(file: impl Into<String>) -> Ctx {
        Ctx {
            file: file.into(),
            diags: Vec::new(),
        }
    }

    /// Records `message — fix` at `pos`.
    pub fn err(&mut self, pos: Pos, message: impl AsRef<str>, fix: impl AsRef<str>) {
        self.diags.push(Diagnostic {
            file: self.file.clone(),
            line: pos.line,
            column: pos.column,
            message: format!("{} — {}", message.as_ref(), fix.as_ref()),
        });
    }

    pub fn into_result<T>(mut self, value: T) -> Result<T, ConfigError> {
        if self.diags.is_empty() {
            Ok(value)
        } else {
            self.diags.sort_by_key(|d| (d.line, d.column));
            Err(ConfigError {
                diagnostics: self.diags,
            })
        }
    }

    // ---- typed accessors: each reports its own error and returns None ----

    pub fn str(&mut self, node: &Node, what: &str) -> Option<String> {
        match &node.value {
            Value::Scalar { text, .. } => Some(text.clone()),
            _ => {
                self.err(
                    node.pos,
                    format!("`{what}` must be a string, found {}", node.kind()),
                    format!("write `{}: some-text`", leaf(what)),
                );
                None
            }
        }
    }

    /// A non-empty string (ids, names).
    pub fn nonempty_str(&mut self, node: &Node, what: &str) -> Option<String> {
        let s = self.str(node, what)?;
        if s.trim().is_empty() {
            self.err(node.pos, format!("`{what}` is empty"), "give it a value");
            return None;
        }
        Some(s)
    }

    pub fn bool(&mut self, node: &Node, what: &str) -> Option<bool> {
        match &node.value {
            Value::Scalar { text, plain: true } if text == "true" => Some(true),
            Value::Scalar { text, plain: true } if text == "false" => Some(false),
            _ => {
                self.err(
                    node.pos,
                    format!("`{what}` must be true or false, found {}", describe(node)),
                    format!("write `{}: true` or `{}: false`", leaf(what), leaf(what)),
                );
                None
            }
        }
    }

    /// An unsigned integer within `min..=max`.
    pub fn uint(&mut self, node: &Node, what: &str, min: u64, max: u64) -> Option<u64> {
        let parsed = match &node.value {
            Value::Scalar { text, .. } => text.trim().replace('_', "").parse::<u64>().ok(),
            _ => None,
        };
        match parsed {
            Some(v) if (min..=max).contains(&v) => Some(v),
            _ => {
                self.err(
                    node.pos,
                    format!(
                        "`{what}` must be an integer from {min} to {max}, found {}",
                        describe(node)
                    ),
                    format!("write a number between {min} and {max}"),
                );
                None
            }
        }
    }

    /// A list; a null value counts as an empty list.
    pub fn seq<'n>(&mut self, node: &'n Node, what: &str) -> Option<&'n [Node]> {
        match &node.value {
            Value::Seq(items) => Some(items),
            Value::Null => Some(&[]),
            _ => {
                self.err(
                    node.pos,
                    format!("`{what}` must be a list, found {}", node.kind()),
                    format!("write `{}: [a, b]` or one `- item` per line", leaf(what)),
                );
                None
            }
        }
    }

    /// A mapping with only `allowed` keys; reports unknown, duplicate and
    /// non-string keys. A null value counts as an empty mapping.
    pub fn fields<'n>(
        &mut self,
        node: &'n Node,
        what: &str,
        allowed: &[&str],
    ) -> Option<Fields<'n>> {
        let entries: &'n [(Node, Node)] = match &node.value {
            Value::Map(entries) => entries,
            Value::Null => &[],
            _ => {
                self.err(
                    node.pos,
                    format!(
                        "`{what}` must be a mapping (`key: value` lines), found {}",
                        node.kind()
                    ),
                    format!("see the example file for the layout of `{}`", leaf(what)),
                );
                return None;
            }
        };
        let mut out: Vec<(&'n str, &'n Node, &'n Node)> = Vec::with_capacity(entries.len());
        for (k, v) in entries {
            let Value::Scalar { text: key, .. } = &k.value else {
                self.err(
                    k.pos,
                    format!("a key in `{what}` is {}, not a name", k.kind()),
                    "keys are plain names such as `id:`",
                );
                continue;
            };
            if !allowed.contains(&key.as_str()) {
                let fix = match suggest(key, allowed) {
                    Some(s) => format!("did you mean `{s}`? Allowed keys: {}", allowed.join(", ")),
                    None => format!("allowed keys: {}", allowed.join(", ")),
                };
                self.err(k.pos, format!("unknown key `{key}` in `{what}`"), fix);
                continue;
            }
            if let Some((_, first, _)) = out.iter().find(|(name, _, _)| *name == key.as_str()) {
                self.err(
                    k.pos,
                    format!(
                        "duplicate key `{key}` in `{what}` (first at line {})",
                        first.pos.line
                    ),
                    "keep only one of them",
                );
                continue;
            }
            out.push((key.as_str(), k, v));
        }
        Some(Fields {
            pos: node.pos,
            entries: out,
        })
    }
}

/// The checked keys of one mapping.
#[derive(Debug)]
pub struct Fields<'n> {
    pub pos: Pos,
    entries: Vec<(&'n str, &'n Node, &'n Node)>,
}

impl<'n> Fields<'n> {
    /// The value of `key`, if present and not null.
    pub fn get(&self, key: &str) -> Option<&'n Node> {
        self.entries
            .iter()
            .find(|(k, _, v)| *k == key && !v.is_null())
            .map(|(_, _, v)| *v)
    }

    /// Position of the key itself, for errors about the entry as a whole.
    pub fn key_pos(&self, key: &str) -> Option<Pos> {
        self.entries
            .iter()
            .find(|(k, _, _)| *k == key)
            .map(|(_, k, _)| k.pos)
    }

    /// The value of a required `key`; reports it missing at the mapping.
    pub fn required(&self, ctx: &mut Ctx, key: &str, what: &str) -> Option<&'n Node> {
        let v = self.get(key);
        if v.is_none() {
            ctx.err(
                self.pos,
                format!("missing field `{key}` in {what}"),
                format!("add `{key}: ...`"),
            );
        }
        v
    }
}

/// The last component of a dotted field path, for "write `x: ...`" hints.
fn leaf(what: &str) -> &str {
    let tail = what.rsplit('.').next().unwrap_or(what);
    tail.split('[').next().unwrap_or(tail)
}

/// The value as it appears in the file, for messages.
pub fn describe(node: &Node) -> String {
    match &node.value {
        Value::Scalar { text, .. } => format!("`{text}`"),
        _ => node.kind().to_owned(),
    }
}

/// The allowed key closest to a misspelt one (edit distance ≤ 2).
pub(crate) fn suggest<'a>(key: &str, allowed: &[&'a str]) -> Option<&'a str> {
    allowed
        .iter()
        .map(|a| (edit_distance(key, a), *a))
        .filter(|(d, _)| *d <= 2)
        .min_by_key(|(d, _)| *d)
        .map(|(_, a)| a)
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1; b.len() + 1];
        for (j, cb) in b.iter().enumerate() {
            let cost = usize::from(ca != *cb);
            cur[j + 1] = (prev[j] + cost).min(prev[j + 1] + 1).min(cur[j] + 1);
        }
        prev = cur;
    }
    prev[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_are_one_based() {
        let root = parse("t.yaml", "a: 1\nb:\n  - x\n  - y: 2\n").expect("parses");
        let Value::Map(entries) = &root.value else {
            panic!("map")
        };
        assert_eq!(entries[0].0.pos, Pos { line: 1, column: 1 });
        assert_eq!(entries[0].1.pos, Pos { line: 1, column: 4 });
        let Value::Seq(items) = &entries[1].1.value else {
            panic!("seq")
        };
        assert_eq!(items[0].pos, Pos { line: 3, column: 5 });
    }

    #[test]
    fn syntax_error_has_position() {
        let err = parse("t.yaml", "a: [1, 2\nb: 3\n").expect_err("broken");
        assert!(err.diagnostics[0].line >= 1);
        assert!(err.to_string().starts_with("t.yaml:"));
    }

    /// Issue 10, failure 14: "billion laughs" stops at the node cap, with a position.
    #[test]
    fn alias_bomb_is_refused_with_a_position() {
        let mut text = String::from("a0: &a0 [x, x, x, x, x, x, x, x, x, x]\n");
        for i in 1..10 {
            let prev = format!("*a{}", i - 1);
            text.push_str(&format!("a{i}: &a{i} [{}]\n", vec![prev; 10].join(", ")));
        }
        let err = parse("bomb.yaml", &text).expect_err("a bomb must be refused");
        let d = &err.diagnostics[0];
        assert!(d.message.contains("YAML nodes"), "{}", d.message);
        assert!(d.line >= 6 && d.column > 1, "{d:?}");
        assert!(err.to_string().starts_with("bomb.yaml:"));
    }

    #[test]
    fn deep_nesting_is_refused_with_a_position() {
        let text = format!("{}{}", "[".repeat(MAX_DEPTH + 1), "]".repeat(MAX_DEPTH + 1));
        let err = parse("deep.yaml", &text).expect_err("too deep");
        let d = &err.diagnostics[0];
        assert!(d.message.contains("nested deeper"), "{}", d.message);
        assert_eq!((d.line, d.column), (1, MAX_DEPTH + 1));
        // At the limit it parses.
        let ok = format!("{}{}", "[".repeat(MAX_DEPTH), "]".repeat(MAX_DEPTH));
        assert!(parse("deep.yaml", &ok).is_ok());
    }

    #[test]
    fn unknown_key_suggests() {
        let root = parse("t.yaml", "netwroks: []\n").expect("parses");
        let mut ctx = Ctx::new("t.yaml");
        let _ = ctx.fields(&root, "zone", &["id", "networks"]);
        assert_eq!(ctx.diags.len(), 1);
        assert!(ctx.diags[0].message.contains("did you mean `networks`"));
    }

    #[test]
    fn anchors_and_empty() {
        let root = parse("t.yaml", "a: &x [1]\nb: *x\n").expect("parses");
        let Value::Map(entries) = &root.value else {
            panic!("map")
        };
        assert_eq!(entries[0].1.value, entries[1].1.value);
        assert!(parse("t.yaml", "").expect("empty").is_null());
    }
}
