//! Architecture: no import circle between the modules of `packager`, `boot` and `rootfs`.
//!
//! Every `.rs` file under `<crate>/src` is a module: `lib.rs`/`main.rs` the crate root, `a.rs`
//! and `a/mod.rs` are `a`, `a/b.rs` is `a::b`. A module refers to another when its code names a
//! path into it: `crate::a::b::X`, `super::X`, `self::child::X`, `child::f()` for a child the
//! file declares, each leaf of a use tree such as `use crate::{a::{b, c}, d}`. A path resolves to
//! the longest existing module it starts with. Inline `mod x { … }` blocks belong to their file's
//! module; `#[cfg(test)] mod …` blocks and files are ignored (tests may import anything), and so
//! is `mod child;` itself (a declaration, not an import). Every strongly connected component of
//! more than one module is an import circle, and fails the test.
//!
//! Not seen: paths that macros generate or that sit in strings (`#[serde(with = "crate::x")]`),
//! `#[path = …]` attributes, and re-exports: `crate::Item` re-exported by the root from `a` is a
//! reference to the root, not to `a`. `#[cfg(test)]` on anything but a `mod` is not special.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::path::Path;

const CRATES: [&str; 3] = ["packager", "boot", "rootfs"];

#[test]
fn no_import_circle_between_modules() {
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let mut circles = Vec::new();
    for krate in CRATES {
        let src = workspace.join(krate).join("src");
        let mut files = Vec::new();
        read_sources(&src, &src, &mut files);
        assert!(!files.is_empty(), "no sources under {}", src.display());
        circles.extend(import_circles(krate, &files));
    }
    assert!(
        circles.is_empty(),
        "{} import circle(s) between modules:\n\n{}\n",
        circles.len(),
        circles.join("\n\n")
    );
}

/// The packager's rooms and the rooms each may use: data flows `cli → build → image ← run`,
/// `cli → registry → image` (push and pull read and write the store), `cloud` (an image in a
/// cloud) reads `image` as `run` does, and `host` (fuse's state on the host) is used by all and
/// uses none.
const PACKAGER_ROOMS: [(&str, &[&str]); 7] = [
    (
        "cli",
        &["build", "image", "run", "registry", "cloud", "host"],
    ),
    ("build", &["image", "host"]),
    ("registry", &["image", "host"]),
    ("run", &["image", "host"]),
    ("cloud", &["image", "host"]),
    ("image", &["host"]),
    ("host", &[]),
];

#[test]
fn packager_rooms_depend_one_way() {
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let src = workspace.join("packager/src");
    let mut files = Vec::new();
    read_sources(&src, &src, &mut files);
    let graph = module_graph("packager", &files);
    let room = |module: &str| module.split("::").next().unwrap_or("crate").to_string();
    let mut wrong = Vec::new();
    for (from, edges) in &graph {
        let Some((_, allowed)) = PACKAGER_ROOMS.iter().find(|(r, _)| *r == room(from)) else {
            continue;
        };
        for (to, example) in edges {
            let target = room(to);
            if target != room(from) && !allowed.contains(&target.as_str()) {
                wrong.push(format!("{} -> {target}: {example}", room(from)));
            }
        }
    }
    let rooms: BTreeSet<String> = graph.keys().map(|m| room(m)).collect();
    for r in &rooms {
        let known = r == "crate" || PACKAGER_ROOMS.iter().any(|(name, _)| name == r);
        assert!(
            known,
            "packager/src/{r} is not a room of PACKAGER_ROOMS: add it, with its rule"
        );
    }
    assert!(
        wrong.is_empty(),
        "packager rooms used against the flow:\n{}",
        wrong.join("\n")
    );
}

/// Adds `(path relative to src, contents)` of every `.rs` file under `dir` to `out`.
fn read_sources(src: &Path, dir: &Path, out: &mut Vec<(String, String)>) {
    let entries = std::fs::read_dir(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
    let mut paths: Vec<_> = entries.map(|entry| entry.unwrap().path()).collect();
    paths.sort();
    for path in paths {
        if path.is_dir() {
            read_sources(src, &path, out);
        } else if path.extension().is_some_and(|ext| ext == "rs") {
            let rel = path.strip_prefix(src).unwrap().display().to_string();
            let code = std::fs::read_to_string(&path);
            out.push((
                rel,
                code.unwrap_or_else(|e| panic!("{}: {e}", path.display())),
            ));
        }
    }
}

/// Module -> module it refers to -> one example reference (`file:line uses path`).
type Graph = BTreeMap<String, BTreeMap<String, String>>;

/// One message per import circle between the modules of `files` (`(path in src, code)`).
fn import_circles(krate: &str, files: &[(String, String)]) -> Vec<String> {
    let graph = module_graph(krate, files);
    strongly_connected(&graph)
        .into_iter()
        .filter(|component| component.len() > 1)
        .map(|component| describe(krate, &graph, &component))
        .collect()
}

/// The references between the modules of `files` (`(path in src, code)`).
fn module_graph(krate: &str, files: &[(String, String)]) -> Graph {
    let parsed: Vec<_> = files
        .iter()
        .map(|(rel, code)| {
            let module = module_of(rel);
            let refs = parse_file(&module, code);
            (rel, module, refs)
        })
        .collect();
    let test_only: Vec<Vec<String>> = parsed
        .iter()
        .flat_map(|(_, module, refs)| refs.test_children.iter().map(|c| child(module, c)))
        .collect();
    let is_module = |m: &[String]| !test_only.iter().any(|t| m.starts_with(t));
    let modules: BTreeSet<String> = parsed
        .iter()
        .filter(|(_, module, _)| is_module(module))
        .map(|(_, module, _)| name(module))
        .collect();
    let mut graph: Graph = modules
        .iter()
        .map(|m| (m.clone(), BTreeMap::new()))
        .collect();
    for (rel, module, refs) in parsed.iter().filter(|(_, module, _)| is_module(module)) {
        for r in &refs.refs {
            let mut longest = (0..=r.target.len()).rev().map(|k| name(&r.target[..k]));
            let Some(target) = longest.find(|t| modules.contains(t)) else {
                continue;
            };
            if target != name(module) {
                let example = format!("{krate}/src/{rel}:{} uses {}", r.line, r.text);
                let edges = graph.get_mut(&name(module)).unwrap();
                edges.entry(target).or_insert(example);
            }
        }
    }
    graph
}

/// `a/b.rs` and `a/b/mod.rs` are `["a", "b"]`; `lib.rs` and `main.rs` are `[]`, the crate root.
fn module_of(rel: &str) -> Vec<String> {
    let mut module: Vec<String> = rel
        .trim_end_matches(".rs")
        .split('/')
        .map(Into::into)
        .collect();
    if module.last().is_some_and(|m| m == "mod") || module == ["lib"] || module == ["main"] {
        module.pop();
    }
    module
}

fn name(module: &[String]) -> String {
    if module.is_empty() {
        "crate".to_string()
    } else {
        module.join("::")
    }
}

fn child(module: &[String], name: &str) -> Vec<String> {
    let mut child = module.to_vec();
    child.push(name.to_string());
    child
}

/// `crate: import circle: a -> b -> a`, the component if the circle shown misses some of it, and
/// one example reference per edge inside the component.
fn describe(krate: &str, graph: &Graph, component: &BTreeSet<&str>) -> String {
    let inside = |from: &str| {
        graph[from]
            .iter()
            .filter(|(to, _)| component.contains(to.as_str()))
    };
    // The shortest circle through the first module, found breadth first.
    let start = *component.first().unwrap();
    let mut came_from = BTreeMap::new();
    let mut queue = VecDeque::from([start]);
    let mut circle = vec![start];
    'search: while let Some(from) = queue.pop_front() {
        for (to, _) in inside(from) {
            if to == start {
                let mut at = from;
                while at != start {
                    circle.push(at);
                    at = came_from[at];
                }
                circle.push(start);
                circle.reverse();
                break 'search;
            }
            if !came_from.contains_key(to.as_str()) {
                came_from.insert(to.as_str(), from);
                queue.push_back(to.as_str());
            }
        }
    }
    let mut message = format!("{krate}: import circle: {}", circle.join(" -> "));
    if circle.len() <= component.len() {
        let all: Vec<_> = component.iter().copied().collect();
        message += &format!("\n  in the component {}", all.join(", "));
    }
    for from in component {
        for (to, example) in inside(from) {
            message += &format!("\n  {from} -> {to}: {example}");
        }
    }
    message
}

/// Tarjan's strongly connected components of `graph`.
fn strongly_connected(graph: &Graph) -> Vec<BTreeSet<&str>> {
    struct Tarjan {
        successors: Vec<Vec<usize>>,
        index: Vec<Option<usize>>,
        low: Vec<usize>,
        stack: Vec<usize>,
        on_stack: Vec<bool>,
        visited: usize,
        components: Vec<Vec<usize>>,
    }
    impl Tarjan {
        fn visit(&mut self, v: usize) {
            self.index[v] = Some(self.visited);
            self.low[v] = self.visited;
            self.visited += 1;
            self.stack.push(v);
            self.on_stack[v] = true;
            for w in self.successors[v].clone() {
                match self.index[w] {
                    None => {
                        self.visit(w);
                        self.low[v] = self.low[v].min(self.low[w]);
                    }
                    Some(index) if self.on_stack[w] => self.low[v] = self.low[v].min(index),
                    Some(_) => {}
                }
            }
            if Some(self.low[v]) == self.index[v] {
                let at = self.stack.iter().rposition(|&w| w == v).unwrap();
                let component: Vec<usize> = self.stack.drain(at..).collect();
                component.iter().for_each(|&w| self.on_stack[w] = false);
                self.components.push(component);
            }
        }
    }
    let names: Vec<&str> = graph.keys().map(String::as_str).collect();
    let id = |name: &String| names.binary_search(&name.as_str()).unwrap();
    let n = names.len();
    let mut tarjan = Tarjan {
        successors: graph
            .values()
            .map(|edges| edges.keys().map(id).collect())
            .collect(),
        index: vec![None; n],
        low: vec![0; n],
        stack: Vec::new(),
        on_stack: vec![false; n],
        visited: 0,
        components: Vec::new(),
    };
    for v in 0..n {
        if tarjan.index[v].is_none() {
            tarjan.visit(v);
        }
    }
    let components = tarjan.components.into_iter();
    components
        .map(|c| c.into_iter().map(|v| names[v]).collect())
        .collect()
}

/// What a file refers to.
#[derive(Default)]
struct FileRefs {
    refs: Vec<Ref>,
    /// Children declared `#[cfg(test)] mod x;`: test-only modules.
    test_children: Vec<String>,
}

struct Ref {
    /// The path from the crate root, e.g. `["builder", "RootfsCompression"]`.
    target: Vec<String>,
    line: usize,
    /// The path as written, e.g. `super::builder::RootfsCompression`.
    text: String,
}

/// The paths into the crate in the code of `module`, outside `#[cfg(test)] mod`s.
fn parse_file(module: &[String], code: &str) -> FileRefs {
    let tokens = tokenize(&strip(code));
    let tok = |k: usize| tokens.get(k).map_or("", |t| t.text.as_str());
    let children: BTreeSet<&str> = (0..tokens.len())
        .filter(|&k| tok(k) == "mod" && tok(k + 2) == ";")
        .map(|k| tok(k + 1))
        .collect();
    const CFG_TEST: [&str; 7] = ["#", "[", "cfg", "(", "test", ")", "]"];
    let mut file = FileRefs::default();
    // The module the code at `i` is in: `module`, then any inline `mod x {` opened at `depths`.
    let mut scope = module.to_vec();
    let mut depths = Vec::new();
    let mut depth = 0;
    let mut i = 0;
    while i < tokens.len() {
        match tok(i) {
            "#" if (0..CFG_TEST.len()).map(|k| tok(i + k)).eq(CFG_TEST) => {
                let mut j = i + CFG_TEST.len();
                while tok(j) == "#" && tok(j + 1) == "[" {
                    j = closing(&tokens, j + 1) + 1;
                }
                if tok(j) == "pub" {
                    j += 1;
                    if tok(j) == "(" {
                        j = closing(&tokens, j) + 1;
                    }
                }
                i = match (tok(j), tok(j + 2)) {
                    ("mod", "{") => closing(&tokens, j + 2) + 1,
                    ("mod", ";") => {
                        file.test_children.push(tok(j + 1).to_string());
                        j + 3
                    }
                    _ => i + CFG_TEST.len(),
                };
            }
            "mod" if tok(i + 2) == "{" => {
                scope.push(tok(i + 1).to_string());
                depths.push(depth);
                depth += 1;
                i += 3;
            }
            "{" => {
                depth += 1;
                i += 1;
            }
            "}" => {
                depth -= 1;
                if depths.last() == Some(&depth) {
                    depths.pop();
                    scope.pop();
                }
                i += 1;
            }
            first
                if tok(i + 1) == "::"
                    && (i == 0 || tok(i - 1) != "::")
                    && (matches!(first, "crate" | "self" | "super")
                        || depths.is_empty() && children.contains(first)) =>
            {
                let mut paths = Vec::new();
                i = use_tree(&tokens, i, Vec::new(), &mut paths);
                for (path, line) in paths {
                    let target = absolute(&scope, &path);
                    file.refs.push(Ref {
                        target,
                        line,
                        text: path.join("::"),
                    });
                }
            }
            _ => i += 1,
        }
    }
    file
}

/// `path`, written in `scope`, from the crate root.
fn absolute(scope: &[String], path: &[String]) -> Vec<String> {
    let mut absolute = if path[0] == "crate" {
        Vec::new()
    } else {
        scope.to_vec()
    };
    for segment in path {
        match segment.as_str() {
            "crate" | "self" => {}
            "super" => {
                absolute.pop();
            }
            "*" => break,
            _ => absolute.push(segment.clone()),
        }
    }
    absolute
}

/// Adds the paths of the path or use tree at `tokens[i]` to `out` with their line, and returns
/// the index after it: `crate::{a::{b, c}, d as e}` is `crate::a::b`, `crate::a::c`, `crate::d`.
fn use_tree(
    tokens: &[Token],
    mut i: usize,
    mut prefix: Vec<String>,
    out: &mut Vec<(Vec<String>, usize)>,
) -> usize {
    let tok = |k: usize| tokens.get(k).map_or("", |t| t.text.as_str());
    let mut line = tokens[i].line;
    loop {
        match tok(i) {
            "{" => {
                i += 1;
                while !matches!(tok(i), "}" | "") {
                    i = use_tree(tokens, i, prefix.clone(), out).max(i + 1);
                    if tok(i) == "," {
                        i += 1;
                    }
                }
                return i + 1;
            }
            segment if segment == "*" || segment.starts_with(is_ident) => {
                if segment != "self" || prefix.is_empty() {
                    prefix.push(segment.to_string()); // `a::{self}` is `a`
                }
                line = tokens[i].line;
                i += 1;
            }
            _ => break, // e.g. the `<` of `crate::a::B::<T>`
        }
        if tok(i) != "::" {
            break;
        }
        i += 1;
    }
    if !prefix.is_empty() {
        out.push((prefix, line));
    }
    if tok(i) == "as" {
        i += 2;
    }
    i
}

/// The index of the bracket closing the one at `tokens[open]`.
fn closing(tokens: &[Token], open: usize) -> usize {
    let mut depth = 0;
    for (k, token) in tokens.iter().enumerate().skip(open) {
        match token.text.as_str() {
            "(" | "[" | "{" => depth += 1,
            ")" | "]" | "}" => depth -= 1,
            _ => {}
        }
        if depth == 0 {
            return k;
        }
    }
    tokens.len()
}

struct Token {
    text: String,
    line: usize,
}

/// Words (identifiers, keywords, numbers), `::`, and single punctuation characters.
fn tokenize(code: &str) -> Vec<Token> {
    let chars: Vec<char> = code.chars().collect();
    let mut tokens = Vec::new();
    let (mut i, mut line) = (0, 1);
    while i < chars.len() {
        let start = i;
        match chars[i] {
            '\n' => line += 1,
            c if c.is_whitespace() => {}
            c if is_ident(c) => {
                while chars.get(i + 1).is_some_and(|&c| is_ident(c)) {
                    i += 1;
                }
            }
            ':' if chars.get(i + 1) == Some(&':') => i += 1,
            _ => {}
        }
        i += 1;
        if !chars[start].is_whitespace() {
            tokens.push(Token {
                text: chars[start..i].iter().collect(),
                line,
            });
        }
    }
    tokens
}

fn is_ident(c: char) -> bool {
    c.is_alphanumeric() || c == '_'
}

/// `code` with comments, strings and char literals blanked out, newlines kept (lines still count).
fn strip(code: &str) -> String {
    let c: Vec<char> = code.chars().collect();
    let at = |k: usize| c.get(k).copied().unwrap_or('\0');
    let find = |from: usize, what: char| (from..c.len()).find(|&k| c[k] == what);
    let mut out = String::with_capacity(code.len());
    let mut i = 0;
    while i < c.len() {
        let end = match c[i] {
            '/' if at(i + 1) == '/' => find(i, '\n').unwrap_or(c.len()),
            '/' if at(i + 1) == '*' => {
                let (mut k, mut depth) = (i, 0); // block comments nest
                loop {
                    match (at(k), at(k + 1)) {
                        ('/', '*') => (k, depth) = (k + 2, depth + 1),
                        ('*', '/') => (k, depth) = (k + 2, depth - 1),
                        _ => k += 1,
                    }
                    if depth == 0 || k >= c.len() {
                        break k;
                    }
                }
            }
            '"' => {
                let mut k = i + 1;
                while k < c.len() && c[k] != '"' {
                    k += if c[k] == '\\' { 2 } else { 1 };
                }
                k + 1
            }
            '\'' if at(i + 1) == '\\' => find(i + 3, '\'').map_or(c.len(), |k| k + 1),
            '\'' if at(i + 2) == '\'' => i + 3, // 'x', and '"'; not the lifetime 'a
            ch if is_ident(ch) => {
                let mut end = i;
                while end < c.len() && is_ident(c[end]) {
                    end += 1;
                }
                let word: String = c[i..end].iter().collect();
                // r"…", r#"…"#, br##"…"##: blank the whole literal.
                let hashes = (end..c.len()).take_while(|&k| c[k] == '#').count();
                let raw = matches!(word.as_str(), "r" | "br" | "cr") && at(end + hashes) == '"';
                if !raw {
                    out.push_str(&word);
                    i = end;
                    continue;
                }
                let closes = |k: usize| c[k] == '"' && (1..=hashes).all(|h| at(k + h) == '#');
                let close = (end + hashes + 1..c.len()).find(|&k| closes(k));
                close.map_or(c.len(), |k| k + 1 + hashes)
            }
            ch => {
                out.push(ch);
                i += 1;
                continue;
            }
        };
        let end = end.min(c.len());
        out.extend(
            c[i..end]
                .iter()
                .map(|&ch| if ch == '\n' { '\n' } else { ' ' }),
        );
        i = end;
    }
    out
}

mod checker {
    use super::*;

    fn circles(files: &[(&str, &str)]) -> Vec<String> {
        let files: Vec<_> = files
            .iter()
            .map(|(p, c)| (p.to_string(), c.to_string()))
            .collect();
        import_circles("demo", &files)
    }

    #[test]
    fn a_two_module_circle_is_found() {
        let found = circles(&[
            ("lib.rs", "pub mod a;\npub mod b;\n"),
            ("a.rs", "use crate::b::B;\npub struct A(B);\n"),
            (
                "b.rs",
                "pub struct B;\n\npub fn f() -> crate::a::A { todo!() }\n",
            ),
        ]);
        assert_eq!(
            found,
            ["demo: import circle: a -> b -> a\n  \
              a -> b: demo/src/a.rs:1 uses crate::b::B\n  \
              b -> a: demo/src/b.rs:3 uses crate::a::A"]
        );
    }

    #[test]
    fn a_parent_declaring_a_child_is_no_circle_but_using_it_back_is() {
        let lib = ("lib.rs", "pub mod disk;\n");
        let gpt = ("disk/gpt.rs", "use super::Guid;\npub struct Table;\n");
        let declares = ("disk/mod.rs", "pub mod gpt;\npub struct Guid;\n");
        assert_eq!(circles(&[lib, declares, gpt]), Vec::<String>::new());
        let uses = (
            "disk/mod.rs",
            "pub mod gpt;\npub struct Guid;\nfn f(_: gpt::Table) {}\n",
        );
        let found = circles(&[lib, uses, gpt]);
        assert_eq!(found.len(), 1);
        assert!(found[0].starts_with("demo: import circle: disk -> disk::gpt -> disk\n"));
    }

    #[test]
    fn tests_comments_and_strings_are_ignored() {
        let a = r##"
            //! Uses crate::b::X, /* crate::b::Y, "crate::b::Z
            fn f<'a>(s: &'a str) -> char {
                let _ = "// \" crate::b::X";
                let _ = r#"crate::b::X "# ; let _ = b"crate::b::X";
                '"' // crate::b::X
            }
            /* crate::b::X /* nested */ crate::b::X */
            #[cfg(test)]
            #[allow(unused)]
            pub(crate) mod tests { use crate::b::X; fn g() { crate::b::f() } }
            pub fn h() {}
        "##;
        let files = [
            ("lib.rs", "mod a; mod b;"),
            ("a.rs", a),
            ("b.rs", "use crate::a::h;"),
        ];
        assert_eq!(circles(&files), Vec::<String>::new());
        // The literals end where they should: a reference after them is seen.
        let a = format!("{a}\nfn i() -> char {{ let _ = '\\''; let _ = \"\\\\\"; crate::b::j() }}");
        let found = circles(&[files[0], ("a.rs", &a), files[2]]);
        assert_eq!(found.len(), 1, "{found:?}");
        assert!(
            found[0].contains("a -> b: demo/src/a.rs:14 uses crate::b::j"),
            "{found:?}"
        );
    }

    #[test]
    fn nested_use_trees_are_parsed() {
        let code = "use crate::{a::{b::B, c}, d as e};\nuse super::{self, *};\n\
                    mod x { use super::X; }\nmod y;\nfn f() -> y::Y { self::y::g() }\n";
        let refs = parse_file(&["m".to_string()], code).refs;
        let seen: Vec<_> = refs
            .iter()
            .map(|r| (r.text.as_str(), r.target.join("::"), r.line))
            .collect();
        assert_eq!(
            seen,
            [
                ("crate::a::b::B", "a::b::B".to_string(), 1),
                ("crate::a::c", "a::c".to_string(), 1),
                ("crate::d", "d".to_string(), 1),
                ("super", "".to_string(), 2),
                ("super::*", "".to_string(), 2),
                ("super::X", "m::X".to_string(), 3),
                ("y::Y", "m::y::Y".to_string(), 5),
                ("self::y::g", "m::y::g".to_string(), 5),
            ]
        );
    }
}
