//! Renders a validated pipeline as a Mermaid flowchart or a Graphviz dot graph.

use std::fmt::Write;

use crate::registry::Class;
use crate::spec::{Pipeline, Port};

/// The output format of `tidewatch graph`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GraphFormat {
    /// A Mermaid `flowchart LR` (renders on GitHub and in most Markdown viewers).
    Mermaid,
    /// Graphviz dot.
    Dot,
}

fn edge_label(port: &Port, kind: Option<&str>) -> String {
    match (port, kind) {
        (Port::Main, Some(kind)) => kind.to_owned(),
        (Port::Main, None) => String::new(),
        (Port::Errors, _) => "errors".to_owned(),
        (Port::Late, _) => "late".to_owned(),
        (Port::Named(name), Some(kind)) => format!("{name}: {kind}"),
        (Port::Named(name), None) => name.to_string(),
    }
}

/// Data ports (main and named) are drawn solid, side outputs (errors, late) dashed.
fn is_side_output(port: &Port) -> bool {
    matches!(port, Port::Errors | Port::Late)
}

/// Renders `pipeline` in `format`.
pub fn render(pipeline: &Pipeline, format: GraphFormat) -> String {
    let mut out = String::new();
    let kind_of = |id: &str| {
        pipeline
            .component(id)
            .and_then(|component| component.output.as_ref())
            .map(|port| port.kind.name())
    };
    match format {
        GraphFormat::Mermaid => {
            let _ = writeln!(out, "flowchart LR");
            for component in &pipeline.components {
                let (open, close) = match component.class {
                    Class::Source => ("([", "])"),
                    Class::Transform => ("[", "]"),
                    Class::Sink => ("[(", ")]"),
                };
                let _ = writeln!(
                    out,
                    "    {}{}\"{}<br/><i>{}</i>\"{}",
                    component.id, open, component.id, component.type_name, close
                );
            }
            for component in &pipeline.components {
                for input in &component.inputs {
                    let label = edge_label(&input.port, kind_of(&input.component));
                    let arrow = if is_side_output(&input.port) { "-.->" } else { "-->" };
                    if label.is_empty() {
                        let _ = writeln!(out, "    {} {arrow} {}", input.component, component.id);
                    } else {
                        let _ = writeln!(
                            out,
                            "    {} {arrow}|{label}| {}",
                            input.component, component.id
                        );
                    }
                }
            }
        }
        GraphFormat::Dot => {
            let _ = writeln!(
                out,
                "digraph \"{}\" {{\n    rankdir=LR;",
                pipeline.info.name.replace('"', "'")
            );
            for component in &pipeline.components {
                let shape = match component.class {
                    Class::Source => "ellipse",
                    Class::Transform => "box",
                    Class::Sink => "cylinder",
                };
                let _ = writeln!(
                    out,
                    "    \"{0}\" [shape={shape}, label=\"{0}\\n{1}\"];",
                    component.id, component.type_name
                );
            }
            for component in &pipeline.components {
                for input in &component.inputs {
                    let label = edge_label(&input.port, kind_of(&input.component));
                    let style = if is_side_output(&input.port) { "dashed" } else { "solid" };
                    let _ = writeln!(
                        out,
                        "    \"{}\" -> \"{}\" [label=\"{label}\", style={style}];",
                        input.component, component.id
                    );
                }
            }
            let _ = writeln!(out, "}}");
        }
    }
    out
}
