//! Per-step progress of a run on stderr: coloured on a terminal, plain lines when piped.

use std::io::{IsTerminal, Write};

use orchestra_core::engine::{Disposition, HistoryEvent, HistoryKind, RunState, StepStatus};
use orchestra_core::runtime::RunUpdate;
use tokio::sync::broadcast;

pub struct Printer {
    color: bool,
}

impl Printer {
    pub fn stderr() -> Printer {
        Printer {
            color: std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none(),
        }
    }

    fn paint(&self, code: &str, text: &str) -> String {
        if self.color {
            format!("\x1b[{code}m{text}\x1b[0m")
        } else {
            text.to_owned()
        }
    }

    /// One line for an event worth showing, if it is.
    pub fn line(&self, event: &HistoryEvent, state_start_ms: u64) -> Option<String> {
        let at = event.at_ms.saturating_sub(state_start_ms);
        let t = format!("{:>5}.{:03}s", at / 1000, at % 1000);
        let name = |step: &str, index: &Option<u32>| match index {
            Some(i) => format!("{step}[{i}]"),
            None => step.to_owned(),
        };
        let text = match &event.kind {
            HistoryKind::RunStarted { .. } => self.paint("1", "run started"),
            HistoryKind::StepStarted {
                step,
                index,
                attempt,
                ..
            } => {
                let retry = if *attempt > 1 {
                    format!(" (attempt {attempt})")
                } else {
                    String::new()
                };
                format!(
                    "{} {}{retry}",
                    self.paint("36", "started  "),
                    name(step, index)
                )
            }
            HistoryKind::StepSucceeded { step, index, .. } => {
                format!("{} {}", self.paint("32", "succeeded"), name(step, index))
            }
            HistoryKind::StepSkipped { step, .. } => {
                format!(
                    "{} {step} (its `when` did not hold)",
                    self.paint("2", "skipped  ")
                )
            }
            HistoryKind::StepFailed {
                step,
                index,
                attempt,
                error,
                disposition,
            } => {
                let what = match disposition {
                    Disposition::Retry => "will retry",
                    Disposition::Continue => "continuing (continue_on_error)",
                    Disposition::OnError => "going to its on_error step",
                    Disposition::Fail => "failed for good",
                };
                format!(
                    "{} {} attempt {attempt}: {error}; {what}",
                    self.paint("31", "failed   "),
                    name(step, index)
                )
            }
            HistoryKind::StepRetryScheduled {
                step,
                index,
                attempt,
                delay_ms,
                ..
            } => format!(
                "{} {} attempt {attempt} in {:.1}s",
                self.paint("33", "retrying "),
                name(step, index),
                *delay_ms as f64 / 1000.0
            ),
            HistoryKind::StepExpanded { step, items } => {
                format!(
                    "{} {step} over {} items",
                    self.paint("36", "for_each "),
                    items.len()
                )
            }
            HistoryKind::RunSucceeded { .. } => self.paint("1;32", "run succeeded"),
            HistoryKind::RunFailed { error } => {
                self.paint("1;31", &format!("run failed: {}", error.message))
            }
            HistoryKind::RunCancelled { reason } => {
                self.paint("1;33", &format!("run cancelled: {reason}"))
            }
            HistoryKind::RunResumed {} => self.paint("1", "run resumed"),
            HistoryKind::StepScheduled { .. } => return None,
        };
        Some(format!("{} {text}", self.paint("2", &t)))
    }

    /// Prints a run's updates until it finishes or the channel closes.
    pub async fn follow(
        &self,
        run_id: &str,
        start_ms: u64,
        mut updates: broadcast::Receiver<RunUpdate>,
    ) {
        let mut err = std::io::stderr();
        loop {
            match updates.recv().await {
                Ok(update) if update.run_id == run_id => {
                    for event in update.events.iter() {
                        if let Some(line) = self.line(event, start_ms) {
                            let _ = writeln!(err, "{line}");
                        }
                    }
                    if update.status.is_terminal() {
                        return;
                    }
                }
                Ok(_) => {}
                Err(broadcast::error::RecvError::Lagged(n)) => {
                    let _ = writeln!(err, "({n} progress events not shown)");
                }
                Err(broadcast::error::RecvError::Closed) => return,
            }
        }
    }
}

/// A one-line summary of the steps of a finished run.
pub fn summary(state: &RunState) -> String {
    let count = |s: StepStatus| state.steps.values().filter(|st| st.status == s).count();
    format!(
        "{} succeeded, {} failed, {} skipped",
        count(StepStatus::Succeeded),
        count(StepStatus::Failed),
        count(StepStatus::Skipped)
    )
}
