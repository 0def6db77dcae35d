//! `TaskerCore.task_graph` and `GET /api/tasks/<uuid>/graph.svg`: a task's DAG (its template's
//! steps and dependencies) with each step's state, as Mermaid, Graphviz DOT or SVG.
//!
//! The SVG is laid out here, without Graphviz: layers by longest path from the roots (a step sits
//! one layer below its deepest dependency), then a few barycenter sweeps to order each layer so
//! that fewer edges cross. Every name that reaches an output is escaped for that output's syntax
//! (a step named `a"<b>&` must not end a string, open a tag or start an entity).

use crate::events::{StepSnapshot, StepStatus, TaskSnapshot};
use crate::template::TaskTemplate;
use std::fmt::Write;

/// The three outputs of `task_graph`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GraphFormat {
    Mermaid,
    Dot,
    Svg,
}

impl GraphFormat {
    pub const NAMES: &'static str = ":mermaid, :dot, :svg";

    pub fn parse(text: &str) -> Option<Self> {
        Some(match text {
            "mermaid" => Self::Mermaid,
            "dot" => Self::Dot,
            "svg" => Self::Svg,
            _ => return None,
        })
    }
}

/// One box of the picture.
struct Node<'a> {
    name: &'a str,
    step: Option<&'a StepSnapshot>,
}

/// The steps (template order) and, for each, the indices of the steps it depends on.
struct Dag<'a> {
    nodes: Vec<Node<'a>>,
    dependencies: Vec<Vec<usize>>,
    /// Set when the template is not known here: the steps are drawn without their edges.
    note: Option<String>,
}

impl<'a> Dag<'a> {
    fn new(snapshot: &'a TaskSnapshot, template: Option<&'a TaskTemplate>) -> Self {
        let find = |name: &str| snapshot.steps.iter().find(|s| s.name == name);
        match template {
            Some(template) => Self {
                nodes: template
                    .steps
                    .iter()
                    .map(|def| Node {
                        name: &def.name,
                        step: find(&def.name),
                    })
                    .collect(),
                dependencies: template.dependencies.clone(),
                note: None,
            },
            None => Self {
                nodes: snapshot
                    .steps
                    .iter()
                    .map(|step| Node {
                        name: &step.name,
                        step: Some(step),
                    })
                    .collect(),
                dependencies: vec![Vec::new(); snapshot.steps.len()],
                note: Some(format!(
                    "template {}/{} {} is not loaded in this process: dependencies not shown",
                    snapshot.namespace, snapshot.name, snapshot.version
                )),
            },
        }
    }

    /// Each step's layer: 0 for a root, else one more than its deepest dependency.
    fn layers(&self) -> Vec<usize> {
        let mut layer = vec![usize::MAX; self.nodes.len()];
        fn visit(i: usize, deps: &[Vec<usize>], layer: &mut [usize], depth: usize) -> usize {
            if layer[i] != usize::MAX {
                return layer[i];
            }
            // Templates are validated acyclic; the depth bound keeps a bad one from recursing forever.
            if depth > deps.len() {
                return 0;
            }
            let l = deps[i]
                .iter()
                .map(|&d| visit(d, deps, layer, depth + 1) + 1)
                .max()
                .unwrap_or(0);
            layer[i] = l;
            l
        }
        for i in 0..self.nodes.len() {
            visit(i, &self.dependencies, &mut layer, 0);
        }
        layer
    }

    /// The steps of each layer, ordered to reduce crossings: barycenter of the neighbours in the
    /// layer above (downward sweeps) and below (upward sweeps), four rounds.
    fn ordered_layers(&self) -> Vec<Vec<usize>> {
        let layer = self.layers();
        let depth = layer.iter().copied().max().map_or(0, |m| m + 1);
        let mut rows: Vec<Vec<usize>> = vec![Vec::new(); depth];
        for (i, &l) in layer.iter().enumerate() {
            rows[l].push(i);
        }
        let mut dependents = vec![Vec::new(); self.nodes.len()];
        for (i, deps) in self.dependencies.iter().enumerate() {
            for &d in deps {
                dependents[d].push(i);
            }
        }
        let mut position = vec![0.0f64; self.nodes.len()];
        let place = |rows: &[Vec<usize>], position: &mut [f64]| {
            for row in rows {
                for (x, &i) in row.iter().enumerate() {
                    position[i] = x as f64;
                }
            }
        };
        place(&rows, &mut position);
        for _ in 0..4 {
            for (range, neighbours) in [
                ((1..depth).collect::<Vec<_>>(), &self.dependencies),
                ((0..depth.saturating_sub(1)).rev().collect(), &dependents),
            ] {
                for l in range {
                    let key = |i: &usize| {
                        let n = &neighbours[*i];
                        if n.is_empty() {
                            position[*i]
                        } else {
                            n.iter().map(|&j| position[j]).sum::<f64>() / n.len() as f64
                        }
                    };
                    let mut keyed: Vec<(f64, usize)> =
                        rows[l].iter().map(|i| (key(i), *i)).collect();
                    // Stable: equal barycenters keep template order.
                    keyed.sort_by(|a, b| a.0.total_cmp(&b.0));
                    rows[l] = keyed.into_iter().map(|(_, i)| i).collect();
                    for (x, &i) in rows[l].iter().enumerate() {
                        position[i] = x as f64;
                    }
                }
            }
        }
        rows
    }
}

fn status_of(node: &Node) -> &'static str {
    node.step.map_or("unknown", |s| s.status.as_str())
}

/// Fill and stroke for a step status.
fn colours(status: &str) -> (&'static str, &'static str) {
    match status {
        "complete" => ("#d8f3dc", "#2d6a4f"),
        "error" => ("#ffd6d6", "#b00020"),
        "in_progress" | "enqueued" => ("#dbeafe", "#1d4ed8"),
        "waiting_for_retry" => ("#fff3cd", "#b7791f"),
        "cancelled" | "skipped" => ("#e9ecef", "#6c757d"),
        _ => ("#ffffff", "#495057"),
    }
}

fn duration_text(step: &StepSnapshot) -> Option<String> {
    let (start, end) = (step.started_at_ns?, step.completed_at_ns?);
    let ms = end.saturating_sub(start) as f64 / 1e6;
    Some(if ms < 1000.0 {
        format!("{ms:.1} ms")
    } else {
        format!("{:.2} s", ms / 1000.0)
    })
}

/// The lines under a step's name: its status, attempts and duration.
fn detail_line(node: &Node) -> String {
    let Some(step) = node.step else {
        return "not in this task".into();
    };
    let mut line = step.status.as_str().to_string();
    if step.attempts > 0 || step.status != StepStatus::Pending {
        let _ = write!(
            line,
            " · {} attempt{}",
            step.attempts,
            if step.attempts == 1 { "" } else { "s" }
        );
    }
    if let Some(d) = duration_text(step) {
        let _ = write!(line, " · {d}");
    }
    line
}

/// Render `snapshot` (with `template`'s dependencies when known) in `format`.
pub fn render(
    snapshot: &TaskSnapshot,
    template: Option<&TaskTemplate>,
    format: GraphFormat,
) -> String {
    let dag = Dag::new(snapshot, template);
    match format {
        GraphFormat::Mermaid => mermaid(snapshot, &dag),
        GraphFormat::Dot => dot(snapshot, &dag),
        GraphFormat::Svg => svg(snapshot, &dag),
    }
}

/// Mermaid label text: quotes, angle brackets, ampersands and `#` as Mermaid entity codes, so a
/// name cannot end the `"..."` label or inject HTML.
fn mermaid_escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '"' => out.push_str("#quot;"),
            '<' => out.push_str("#lt;"),
            '>' => out.push_str("#gt;"),
            '&' => out.push_str("#amp;"),
            '#' => out.push_str("#35;"),
            '\n' | '\r' => out.push(' '),
            c => out.push(c),
        }
    }
    out
}

fn mermaid(snapshot: &TaskSnapshot, dag: &Dag) -> String {
    let mut out = String::from("flowchart TD\n");
    let _ = writeln!(
        out,
        "  %% task {} ({}/{} {}): {}",
        snapshot.task_uuid,
        mermaid_escape(&snapshot.namespace).replace('\n', " "),
        mermaid_escape(&snapshot.name),
        mermaid_escape(&snapshot.version),
        snapshot.status.as_str()
    );
    if let Some(note) = &dag.note {
        let _ = writeln!(out, "  %% {}", mermaid_escape(note));
    }
    for (i, node) in dag.nodes.iter().enumerate() {
        let _ = writeln!(
            out,
            "  s{i}[\"{}<br/>{}\"]",
            mermaid_escape(node.name),
            mermaid_escape(&detail_line(node))
        );
    }
    for (i, deps) in dag.dependencies.iter().enumerate() {
        for d in deps {
            let _ = writeln!(out, "  s{d} --> s{i}");
        }
    }
    let mut used: Vec<&str> = dag.nodes.iter().map(status_of).collect();
    used.sort_unstable();
    used.dedup();
    for status in used {
        let (fill, stroke) = colours(status);
        let _ = writeln!(
            out,
            "  classDef {status} fill:{fill},stroke:{stroke},color:#111"
        );
    }
    for (i, node) in dag.nodes.iter().enumerate() {
        let _ = writeln!(out, "  class s{i} {}", status_of(node));
    }
    out
}

/// A DOT quoted string's content: backslashes and quotes escaped, line breaks as `\n`.
fn dot_escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            '\r' => {}
            c => out.push(c),
        }
    }
    out
}

fn dot(snapshot: &TaskSnapshot, dag: &Dag) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "digraph \"task {}\" {{", snapshot.task_uuid);
    let _ = writeln!(
        out,
        "  label=\"{}/{} {}: {}{}\";",
        dot_escape(&snapshot.namespace),
        dot_escape(&snapshot.name),
        dot_escape(&snapshot.version),
        snapshot.status.as_str(),
        dag.note
            .as_ref()
            .map(|n| format!("\\n{}", dot_escape(n)))
            .unwrap_or_default()
    );
    out.push_str(
        "  rankdir=TB;\n  node [shape=box, style=\"rounded,filled\", fontname=\"Helvetica\"];\n",
    );
    for (i, node) in dag.nodes.iter().enumerate() {
        let (fill, stroke) = colours(status_of(node));
        let _ = writeln!(
            out,
            "  s{i} [label=\"{}\\n{}\", fillcolor=\"{fill}\", color=\"{stroke}\"];",
            dot_escape(node.name),
            dot_escape(&detail_line(node))
        );
    }
    for (i, deps) in dag.dependencies.iter().enumerate() {
        for d in deps {
            let _ = writeln!(out, "  s{d} -> s{i};");
        }
    }
    out.push_str("}\n");
    out
}

/// XML text and attribute content.
pub fn xml_escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            // Not allowed in XML 1.0 at all.
            c if (c as u32) < 0x20 && !matches!(c, '\t' | '\n' | '\r') => out.push('\u{fffd}'),
            c => out.push(c),
        }
    }
    out
}

const NODE_WIDTH: f64 = 200.0;
const NODE_HEIGHT: f64 = 54.0;
const GAP_X: f64 = 28.0;
const GAP_Y: f64 = 56.0;
const MARGIN: f64 = 16.0;
const TITLE_HEIGHT: f64 = 26.0;
/// Characters of a name that fit in a box (the full name is in the box's tooltip).
const NAME_FIT: usize = 26;

fn shorten(text: &str, fit: usize) -> String {
    if text.chars().count() <= fit {
        text.to_string()
    } else {
        let mut short: String = text.chars().take(fit - 1).collect();
        short.push('…');
        short
    }
}

fn svg(snapshot: &TaskSnapshot, dag: &Dag) -> String {
    let rows = dag.ordered_layers();
    let widest = rows.iter().map(Vec::len).max().unwrap_or(0).max(1) as f64;
    let width = MARGIN * 2.0 + widest * NODE_WIDTH + (widest - 1.0) * GAP_X;
    let note_height = if dag.note.is_some() { 18.0 } else { 0.0 };
    let top = MARGIN + TITLE_HEIGHT + note_height;
    let height = top + rows.len() as f64 * (NODE_HEIGHT + GAP_Y) - GAP_Y + MARGIN;
    let height = height.max(top + MARGIN);
    // Each layer centred: (x of the box's left edge, y of its top).
    let mut at = vec![(0.0, 0.0); dag.nodes.len()];
    for (l, row) in rows.iter().enumerate() {
        let row_width = row.len() as f64 * NODE_WIDTH + (row.len() as f64 - 1.0) * GAP_X;
        let left = (width - row_width) / 2.0;
        for (x, &i) in row.iter().enumerate() {
            at[i] = (
                left + x as f64 * (NODE_WIDTH + GAP_X),
                top + l as f64 * (NODE_HEIGHT + GAP_Y),
            );
        }
    }
    let mut out = String::new();
    let _ = writeln!(
        out,
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{width:.0}\" height=\"{height:.0}\" \
         viewBox=\"0 0 {width:.0} {height:.0}\" font-family=\"Helvetica, Arial, sans-serif\" \
         role=\"img\" aria-label=\"{}\">",
        xml_escape(&format!("steps of task {}", snapshot.task_uuid))
    );
    out.push_str(
        "<defs><marker id=\"arrow\" viewBox=\"0 0 10 10\" refX=\"10\" refY=\"5\" markerWidth=\"7\" \
         markerHeight=\"7\" orient=\"auto-start-reverse\"><path d=\"M 0 0 L 10 5 L 0 10 z\" fill=\"#6c757d\"/>\
         </marker></defs>\n",
    );
    let _ = writeln!(
        out,
        "<text x=\"{MARGIN}\" y=\"{:.0}\" font-size=\"14\" font-weight=\"bold\">{}</text>",
        MARGIN + 12.0,
        xml_escape(&format!(
            "{}/{} {} · {}",
            snapshot.namespace,
            snapshot.name,
            snapshot.version,
            snapshot.status.as_str()
        ))
    );
    if let Some(note) = &dag.note {
        let _ = writeln!(
            out,
            "<text x=\"{MARGIN}\" y=\"{:.0}\" font-size=\"11\" fill=\"#6c757d\">{}</text>",
            MARGIN + 12.0 + 18.0,
            xml_escape(note)
        );
    }
    for (i, deps) in dag.dependencies.iter().enumerate() {
        for &d in deps {
            let (x1, y1) = (at[d].0 + NODE_WIDTH / 2.0, at[d].1 + NODE_HEIGHT);
            let (x2, y2) = (at[i].0 + NODE_WIDTH / 2.0, at[i].1);
            let bend = (y2 - y1) / 2.0;
            let _ = writeln!(
                out,
                "<path class=\"edge\" d=\"M {x1:.1} {y1:.1} C {x1:.1} {:.1}, {x2:.1} {:.1}, {x2:.1} {y2:.1}\" \
                 fill=\"none\" stroke=\"#6c757d\" stroke-width=\"1.4\" marker-end=\"url(#arrow)\"/>",
                y1 + bend,
                y2 - bend
            );
        }
    }
    for (i, node) in dag.nodes.iter().enumerate() {
        let status = status_of(node);
        let (fill, stroke) = colours(status);
        let (x, y) = at[i];
        let _ = writeln!(
            out,
            "<g class=\"step {status}\" data-step=\"{}\" data-status=\"{status}\">\
             <title>{}</title>\
             <rect x=\"{x:.1}\" y=\"{y:.1}\" width=\"{NODE_WIDTH}\" height=\"{NODE_HEIGHT}\" rx=\"8\" \
             fill=\"{fill}\" stroke=\"{stroke}\" stroke-width=\"{}\"/>\
             <text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\" font-size=\"13\" font-weight=\"bold\">{}</text>\
             <text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\" font-size=\"11\" fill=\"{stroke}\">{}</text></g>",
            xml_escape(node.name),
            xml_escape(&format!("{}: {}", node.name, detail_line(node))),
            if status == "error" { 2.5 } else { 1.5 },
            x + NODE_WIDTH / 2.0,
            y + 22.0,
            xml_escape(&shorten(node.name, NAME_FIT)),
            x + NODE_WIDTH / 2.0,
            y + 41.0,
            xml_escape(&shorten(&detail_line(node), NAME_FIT + 8)),
        );
    }
    out.push_str("</svg>\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::TaskStatus;
    use std::path::Path;
    use uuid::Uuid;

    fn template(yaml: &str) -> TaskTemplate {
        TaskTemplate::from_yaml(yaml, Path::new("test.yaml")).expect("valid template")
    }

    fn snapshot_of(template: &TaskTemplate) -> TaskSnapshot {
        TaskSnapshot {
            task_uuid: Uuid::nil(),
            namespace: template.namespace.clone(),
            name: template.name.clone(),
            version: template.version.clone(),
            status: TaskStatus::Error,
            created_at_ns: Some(1),
            completed_at_ns: None,
            steps: template
                .steps
                .iter()
                .enumerate()
                .map(|(i, def)| StepSnapshot {
                    step_uuid: Uuid::nil(),
                    name: def.name.to_string(),
                    status: if i == 0 {
                        StepStatus::Complete
                    } else {
                        StepStatus::Error
                    },
                    attempts: 1,
                    result: None,
                    metadata: None,
                    error_message: None,
                    started_at_ns: Some(1_000_000),
                    completed_at_ns: Some(13_500_000),
                })
                .collect(),
            steps_retained: true,
        }
    }

    const DIAMOND: &str = r#"
name: diamond
namespace: test
version: 1.0.0
steps:
  - name: 'a"<b>&c'
    handler: { callable: A }
  - name: left
    handler: { callable: A }
    dependencies: ['a"<b>&c']
  - name: right
    handler: { callable: A }
    dependencies: ['a"<b>&c']
  - name: join
    handler: { callable: A }
    dependencies: [left, right]
"#;

    #[test]
    fn layers_follow_the_longest_path() {
        let t = template(DIAMOND);
        let s = snapshot_of(&t);
        let dag = Dag::new(&s, Some(&t));
        assert_eq!(dag.layers(), vec![0, 1, 1, 2]);
        assert_eq!(dag.ordered_layers().len(), 3);
    }

    #[test]
    fn names_are_escaped_in_every_format() {
        let t = template(DIAMOND);
        let s = snapshot_of(&t);
        let svg = render(&s, Some(&t), GraphFormat::Svg);
        assert!(svg.contains("a&quot;&lt;b&gt;&amp;c"));
        assert!(!svg.contains("a\"<b>"));
        let dot = render(&s, Some(&t), GraphFormat::Dot);
        assert!(dot.contains(r#"a\"<b>&c"#));
        let mermaid = render(&s, Some(&t), GraphFormat::Mermaid);
        assert!(mermaid.contains("a#quot;#lt;b#gt;#amp;c"));
        assert!(mermaid.contains("s0 --> s1"));
        assert!(svg.contains("12.5 ms"));
    }
}
