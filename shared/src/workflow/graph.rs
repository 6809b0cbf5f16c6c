//! The flow graph of a workflow: which step can lead to which. Validation uses it to find cycles,
//! unreachable steps and references to steps that cannot have run yet; the engine uses it to route.

use std::collections::{BTreeSet, HashMap, VecDeque};

use crate::workflow::{StepKind, Workflow};

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GraphError {
    /// Step ids along the cycle, the first repeated at the end.
    Cycle(Vec<String>),
    Unreachable(Vec<String>),
}

#[derive(Debug, Clone)]
pub struct Graph {
    pub index: HashMap<String, usize>,
    /// Where the flow goes after a step settles (explicit `next_step` or the following step).
    pub next: Vec<Option<usize>>,
    /// Choice rules' targets in rule order, and the default.
    pub choices: Vec<Vec<usize>>,
    pub choice_default: Vec<Option<usize>>,
    pub on_error: Vec<Option<usize>>,
    pub depends_on: Vec<Vec<usize>>,
    pub dependents: Vec<Vec<usize>>,
    /// Steps that start with the run.
    pub entries: Vec<usize>,
    preds: Vec<Vec<usize>>,
}

impl Graph {
    /// Builds the graph of a workflow whose step references all resolve (validation checks that first).
    pub fn build(wf: &Workflow) -> Result<Graph, GraphError> {
        let n = wf.steps.len();
        let index: HashMap<String, usize> = wf
            .steps
            .iter()
            .enumerate()
            .map(|(i, s)| (s.id.clone(), i))
            .collect();
        let id = |s: &str| index.get(s).copied();
        let mut g = Graph {
            next: vec![None; n],
            choices: vec![Vec::new(); n],
            choice_default: vec![None; n],
            on_error: vec![None; n],
            depends_on: vec![Vec::new(); n],
            dependents: vec![Vec::new(); n],
            entries: Vec::new(),
            preds: vec![Vec::new(); n],
            index: HashMap::new(),
        };
        for (i, step) in wf.steps.iter().enumerate() {
            if step.kind == StepKind::Choice {
                g.choices[i] = step
                    .choices
                    .iter()
                    .flatten()
                    .filter_map(|r| id(&r.next))
                    .collect();
                g.choice_default[i] = step.default.as_deref().and_then(id);
            } else {
                g.next[i] = match &step.next_step {
                    Some(Some(target)) => id(target),
                    Some(None) => None,
                    // A step that declares depends_on starts from its dependencies, not from the
                    // step above it.
                    None => wf
                        .steps
                        .get(i + 1)
                        .filter(|s| s.depends_on.is_none())
                        .map(|_| i + 1),
                };
            }
            g.on_error[i] = step.on_error.as_deref().and_then(id);
            if let Some(deps) = &step.depends_on {
                g.depends_on[i] = deps.iter().filter_map(|d| id(d)).collect();
                for &d in &g.depends_on[i] {
                    g.dependents[d].push(i);
                }
                if deps.is_empty() {
                    g.entries.push(i);
                }
            }
        }
        if wf.steps.first().is_some_and(|s| s.depends_on.is_none()) {
            g.entries.insert(0, 0);
        }
        for i in 0..n {
            for j in g.successors(i) {
                g.preds[j].push(i);
            }
        }
        g.index = index;
        g.check_acyclic(wf)?;
        g.check_reachable(wf)?;
        Ok(g)
    }

    /// Every step the flow can go to from `i`.
    pub fn successors(&self, i: usize) -> Vec<usize> {
        let mut out: Vec<usize> = self.next[i].into_iter().collect();
        out.extend(&self.choices[i]);
        out.extend(self.choice_default[i]);
        out.extend(self.on_error[i]);
        out.extend(&self.dependents[i]);
        out
    }

    /// Steps that may have run before step `i` starts.
    pub fn ancestors(&self, i: usize) -> BTreeSet<usize> {
        let mut seen = BTreeSet::new();
        let mut queue: VecDeque<usize> = self.preds[i].iter().copied().collect();
        while let Some(p) = queue.pop_front() {
            if seen.insert(p) {
                queue.extend(&self.preds[p]);
            }
        }
        seen
    }

    /// Whether `{{error}}` can be set when step `i` runs: it is reached through an on_error edge.
    pub fn error_in_scope(&self, i: usize) -> bool {
        let handler = |j: usize| self.on_error.contains(&Some(j));
        handler(i) || self.ancestors(i).into_iter().any(handler)
    }

    fn check_acyclic(&self, wf: &Workflow) -> Result<(), GraphError> {
        #[derive(Clone, Copy, PartialEq)]
        enum Mark {
            New,
            Open,
            Done,
        }
        let n = self.next.len();
        let mut mark = vec![Mark::New; n];
        for root in 0..n {
            if mark[root] != Mark::New {
                continue;
            }
            // Iterative DFS keeping the path so a cycle can be named.
            let mut stack: Vec<(usize, Vec<usize>, usize)> = vec![(root, self.successors(root), 0)];
            mark[root] = Mark::Open;
            while let Some((node, succ, pos)) = stack.last_mut() {
                if let Some(&next) = succ.get(*pos) {
                    *pos += 1;
                    match mark[next] {
                        Mark::New => {
                            mark[next] = Mark::Open;
                            let s = self.successors(next);
                            stack.push((next, s, 0));
                        }
                        Mark::Open => {
                            let start = stack.iter().position(|(n, _, _)| *n == next).unwrap_or(0);
                            let mut path: Vec<String> = stack[start..]
                                .iter()
                                .map(|(n, _, _)| wf.steps[*n].id.clone())
                                .collect();
                            path.push(wf.steps[next].id.clone());
                            return Err(GraphError::Cycle(path));
                        }
                        Mark::Done => {}
                    }
                } else {
                    mark[*node] = Mark::Done;
                    stack.pop();
                }
            }
        }
        Ok(())
    }

    fn check_reachable(&self, wf: &Workflow) -> Result<(), GraphError> {
        let n = self.next.len();
        let mut seen = vec![false; n];
        let mut queue: VecDeque<usize> = self.entries.iter().copied().collect();
        while let Some(i) = queue.pop_front() {
            if !std::mem::replace(&mut seen[i], true) {
                queue.extend(self.successors(i));
            }
        }
        let unreachable: Vec<String> = (0..n)
            .filter(|i| !seen[*i])
            .map(|i| wf.steps[i].id.clone())
            .collect();
        if unreachable.is_empty() {
            Ok(())
        } else {
            Err(GraphError::Unreachable(unreachable))
        }
    }
}
