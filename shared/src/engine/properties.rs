//! Property tests over random DAG workflows with random failures, duplicates and late deliveries,
//! plus unit tests pinning specific transitions.

use std::collections::{BTreeSet, HashMap};

use proptest::prelude::*;
use serde_json::{Value, json};

use super::*;
use crate::failure::{ErrorClass, StepError};
use crate::workflow::Plan;

#[derive(Debug, Clone)]
struct GenStep {
    deps: Vec<usize>,
    max_attempts: u32,
    continue_on_error: bool,
    for_each: Option<(usize, u32)>,
}

fn arb_steps() -> impl Strategy<Value = Vec<GenStep>> {
    (1..=10usize).prop_flat_map(|n| {
        prop::collection::vec(
            (
                any::<u16>(),
                1..=3u32,
                prop::bool::weighted(0.25),
                prop::option::weighted(0.3, (0..=3usize, 1..=2u32)),
            ),
            n,
        )
        .prop_map(|raw| {
            raw.into_iter()
                .enumerate()
                .map(
                    |(i, (mask, max_attempts, continue_on_error, for_each))| GenStep {
                        deps: (0..i).filter(|j| mask >> (j % 16) & 1 == 1).collect(),
                        max_attempts,
                        continue_on_error,
                        for_each,
                    },
                )
                .collect()
        })
    })
}

fn workflow(steps: &[GenStep]) -> Plan {
    let steps: Vec<Value> = steps
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let deps: Vec<String> = s.deps.iter().map(|d| format!("s{d}")).collect();
            let mut step = json!({
                "id": format!("s{i}"),
                "type": "transform",
                "depends_on": deps,
                "params": {"value": i},
                "retry": {"max_attempts": s.max_attempts, "initial_delay_s": 0.0, "max_delay_s": 1.0},
            });
            if s.continue_on_error {
                step["continue_on_error"] = json!(true);
            }
            if let Some((items, concurrency)) = s.for_each {
                step["for_each"] = json!((0..items).collect::<Vec<_>>());
                step["max_concurrency"] = json!(concurrency);
                step["params"] = json!({"value": "{{ item }}"});
            }
            step
        })
        .collect();
    let doc = json!({"id": "prop", "steps": steps});
    Plan::from_json(&doc.to_string(), "prop").expect("generated workflows are valid")
}

/// A simulated worker fleet driven by a stream of random choices.
struct Sim<'a> {
    plan: &'a Plan,
    state: RunState,
    history: Vec<HistoryEvent>,
    outstanding: Vec<Task>,
    late: Vec<Event>,
    past: Vec<Event>,
    now: u64,
    dice: std::vec::IntoIter<u32>,
    /// When false, every attempt succeeds (used after a resume).
    failures: bool,
}

impl<'a> Sim<'a> {
    fn new(plan: &'a Plan, dice: Vec<u32>) -> Sim<'a> {
        Sim {
            plan,
            state: RunState::new("run", "prop"),
            history: Vec::new(),
            outstanding: Vec::new(),
            late: Vec::new(),
            past: Vec::new(),
            now: 1_000,
            dice: dice.into_iter(),
            failures: true,
        }
    }

    fn roll(&mut self, sides: u32) -> u32 {
        self.dice.next().unwrap_or(0) % sides.max(1)
    }

    /// Feeds an event; checks that feeding it again right away changes nothing.
    fn feed(&mut self, event: Event) -> Transition {
        self.now += 1;
        let ctx = Ctx {
            now_ms: self.now,
            random: f64::from(self.roll(1000)) / 1000.0,
        };
        let tr = handle(self.plan, &mut self.state, event.clone(), ctx);
        let before = self.state.clone();
        let again = handle(self.plan, &mut self.state, event.clone(), ctx);
        assert!(
            again.is_noop(),
            "duplicate {event:?} was not a no-op: {again:?}"
        );
        assert_eq!(self.state, before, "duplicate {event:?} changed the state");
        self.history.extend(tr.history.iter().cloned());
        for action in &tr.actions {
            if let Action::Dispatch { task, .. } = action {
                self.outstanding.push(task.clone());
            }
        }
        self.past.push(event);
        tr
    }

    fn result_for(&mut self, task: &Task) -> Event {
        let (step, index, attempt) = (task.step.clone(), task.index, task.attempt);
        let roll = if self.failures { self.roll(10) } else { 0 };
        match roll {
            0..=5 => Event::StepSucceeded {
                step,
                index,
                attempt,
                output: json!({"attempt": attempt}),
            },
            6 | 7 => Event::StepFailed {
                step,
                index,
                attempt,
                error: StepError::transient("flaky"),
            },
            8 => Event::StepFailed {
                step,
                index,
                attempt,
                error: StepError::permanent("broken"),
            },
            _ => Event::StepTimedOut {
                step,
                index,
                attempt,
            },
        }
    }

    /// Runs until nothing is outstanding; returns false if the bound was hit.
    fn drive(&mut self, bound: usize) -> bool {
        for n in 0..bound {
            if n % 37 == 0 {
                let replayed = RunState::replay("run", "prop", &self.history);
                assert_eq!(replayed, self.state, "replay differs mid-run");
            }
            if !self.late.is_empty() && (self.outstanding.is_empty() || self.roll(3) == 0) {
                let i = self.roll(self.late.len() as u32) as usize;
                let event = self.late.remove(i);
                self.feed(event);
                continue;
            }
            if self.outstanding.is_empty() {
                return true;
            }
            // Now and then a past event arrives again, late: it must change nothing.
            if !self.past.is_empty() && self.roll(8) == 0 {
                let i = self.roll(self.past.len() as u32) as usize;
                let event = self.past[i].clone();
                let ctx = Ctx {
                    now_ms: self.now,
                    random: 0.5,
                };
                let before = self.state.clone();
                let tr = handle(self.plan, &mut self.state, event.clone(), ctx);
                assert!(tr.is_noop(), "a redelivered past {event:?} acted: {tr:?}");
                assert_eq!(self.state, before);
            }
            let i = self.roll(self.outstanding.len() as u32) as usize;
            // Sometimes a task is delivered and stays queued: a duplicate delivery.
            let task = if self.roll(5) == 0 {
                self.outstanding[i].clone()
            } else {
                self.outstanding.remove(i)
            };
            let claim = Event::StepStarted {
                step: task.step.clone(),
                index: task.index,
                attempt: task.attempt,
                lease_until_ms: u64::MAX / 2,
                steal: false,
            };
            if self.feed(claim).is_noop() {
                continue;
            }
            let result = self.result_for(&task);
            if self.roll(4) == 0 {
                self.late.push(result);
            } else {
                self.feed(result);
            }
        }
        false
    }
}

fn settled_ok(history: &[HistoryEvent]) -> BTreeSet<String> {
    history
        .iter()
        .filter_map(|e| match &e.kind {
            HistoryKind::StepSucceeded {
                step, index: None, ..
            }
            | HistoryKind::StepSkipped { step, .. } => Some(step.clone()),
            HistoryKind::StepFailed {
                step,
                index: None,
                disposition: Disposition::Continue,
                ..
            } => Some(step.clone()),
            _ => None,
        })
        .collect()
}

fn check_history(plan: &Plan, history: &[HistoryEvent]) {
    let mut successes: HashMap<(String, Option<u32>), usize> = HashMap::new();
    for (pos, event) in history.iter().enumerate() {
        match &event.kind {
            HistoryKind::StepSucceeded { step, index, .. } => {
                let n = successes.entry((step.clone(), *index)).or_default();
                *n += 1;
                assert_eq!(*n, 1, "{step}[{index:?}] succeeded twice");
            }
            HistoryKind::StepScheduled {
                step, attempt: 1, ..
            }
            | HistoryKind::StepExpanded { step, .. } => {
                let i = plan.step_index(step).expect("known step");
                let done = settled_ok(&history[..pos]);
                for &d in &plan.graph.depends_on[i] {
                    let dep = &plan.step(d).id;
                    assert!(
                        done.contains(dep),
                        "{step} started before its dependency {dep}"
                    );
                }
            }
            _ => {}
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    #[test]
    fn random_dags_terminate_respect_dependencies_and_replay(
        steps in arb_steps(),
        dice in prop::collection::vec(any::<u32>(), 4000),
    ) {
        let plan = workflow(&steps);
        let mut sim = Sim::new(&plan, dice);
        sim.feed(Event::Start { inputs: serde_json::Map::new() });
        prop_assert!(sim.drive(3000), "the run did not settle within the bound");
        let status = sim.state.status;
        prop_assert!(status.is_terminal(), "nothing outstanding but the run is {status:?}");

        check_history(&plan, &sim.history);
        prop_assert_eq!(&RunState::replay("run", "prop", &sim.history), &sim.state);

        let fatal = sim.history.iter().any(|e| matches!(
            e.kind,
            HistoryKind::StepFailed { index: None, disposition: Disposition::Fail, .. }
        ));
        prop_assert_eq!(status == RunStatus::Failed, fatal);

        // A finished run ignores everything it is sent again.
        for event in sim.past.clone() {
            let before = sim.state.clone();
            let tr = handle(&plan, &mut sim.state, event, Ctx { now_ms: sim.now, random: 0.1 });
            prop_assert!(tr.is_noop());
            prop_assert_eq!(&sim.state, &before);
        }

        if status == RunStatus::Failed {
            let done_before: BTreeSet<String> = sim.history.iter().filter_map(|e| match &e.kind {
                HistoryKind::StepSucceeded { step, index: None, .. } => Some(step.clone()),
                _ => None,
            }).collect();
            let mark = sim.history.len();
            sim.failures = false;
            sim.feed(Event::Resume);
            prop_assert!(sim.drive(3000));
            prop_assert_eq!(sim.state.status, RunStatus::Succeeded);
            check_history(&plan, &sim.history);
            for event in &sim.history[mark..] {
                if let HistoryKind::StepStarted { step, .. } = &event.kind {
                    prop_assert!(!done_before.contains(step), "{} ran again after resume", step);
                }
            }
            prop_assert_eq!(&RunState::replay("run", "prop", &sim.history), &sim.state);
        }
    }
}

// ---- unit tests of specific transitions ----

fn plan_of(doc: Value) -> Plan {
    Plan::from_json(&doc.to_string(), "unit").expect("valid")
}

fn ctx(now_ms: u64, random: f64) -> Ctx {
    Ctx { now_ms, random }
}

fn start(plan: &Plan) -> (RunState, Transition) {
    let mut state = RunState::new("r", "w");
    let tr = handle(
        plan,
        &mut state,
        Event::Start {
            inputs: json!({"n": 3}).as_object().cloned().unwrap_or_default(),
        },
        ctx(0, 0.5),
    );
    (state, tr)
}

fn dispatched(tr: &Transition) -> Vec<(String, Option<u32>, u32)> {
    tr.actions
        .iter()
        .filter_map(|a| match a {
            Action::Dispatch { task, .. } => Some((task.step.clone(), task.index, task.attempt)),
            _ => None,
        })
        .collect()
}

fn claim_and(
    plan: &Plan,
    state: &mut RunState,
    step: &str,
    index: Option<u32>,
    attempt: u32,
    result: Result<Value, StepError>,
    now: u64,
) -> Transition {
    let claim = Event::StepStarted {
        step: step.into(),
        index,
        attempt,
        lease_until_ms: now + 60_000,
        steal: false,
    };
    assert!(!handle(plan, state, claim, ctx(now, 0.5)).is_noop());
    let event = match result {
        Ok(output) => Event::StepSucceeded {
            step: step.into(),
            index,
            attempt,
            output,
        },
        Err(error) => Event::StepFailed {
            step: step.into(),
            index,
            attempt,
            error,
        },
    };
    handle(plan, state, event, ctx(now + 1, 0.5))
}

#[test]
fn retry_delay_is_full_jitter_within_the_exponential_ceiling_and_honours_retry_after() {
    let plan = plan_of(
        json!({"id": "w", "steps": [{"id": "a", "type": "transform", "params": {"value": 1},
        "retry": {"max_attempts": 5, "initial_delay_s": 1, "max_delay_s": 3}}]}),
    );
    let (mut state, _) = start(&plan);
    let mut now = 10;
    for (attempt, ceiling_ms) in [(1u32, 1000u64), (2, 2000), (3, 3000)] {
        let claim = Event::StepStarted {
            step: "a".into(),
            index: None,
            attempt,
            lease_until_ms: u64::MAX / 2,
            steal: false,
        };
        handle(&plan, &mut state, claim, ctx(now, 0.0));
        let tr = handle(
            &plan,
            &mut state,
            Event::StepFailed {
                step: "a".into(),
                index: None,
                attempt,
                error: StepError::transient("x"),
            },
            ctx(now, 0.999),
        );
        let delay = tr
            .history
            .iter()
            .find_map(|e| match &e.kind {
                HistoryKind::StepRetryScheduled { delay_ms, .. } => Some(*delay_ms),
                _ => None,
            })
            .expect("retried");
        assert!(
            delay <= ceiling_ms && delay >= ceiling_ms * 99 / 100,
            "attempt {attempt}: {delay} vs {ceiling_ms}"
        );
        now += 10_000;
    }
    // A 429 asking for 7 s wins over a shorter jittered delay.
    let claim = Event::StepStarted {
        step: "a".into(),
        index: None,
        attempt: 4,
        lease_until_ms: u64::MAX / 2,
        steal: false,
    };
    handle(&plan, &mut state, claim, ctx(now, 0.0));
    let mut limited = StepError::new(ErrorClass::RateLimited, "slow down");
    limited.retry_after_ms = Some(7_000);
    let tr = handle(
        &plan,
        &mut state,
        Event::StepFailed {
            step: "a".into(),
            index: None,
            attempt: 4,
            error: limited,
        },
        ctx(now, 0.0),
    );
    assert!(tr.actions.iter().any(
        |a| matches!(a, Action::Dispatch { not_before_ms, .. } if *not_before_ms == now + 7_000)
    ));
}

#[test]
fn permanent_errors_are_not_retried_unless_retry_on_all() {
    let plan = plan_of(
        json!({"id": "w", "steps": [{"id": "a", "type": "transform", "params": {"value": 1},
        "retry": {"max_attempts": 3}}]}),
    );
    let (mut state, _) = start(&plan);
    let tr = claim_and(
        &plan,
        &mut state,
        "a",
        None,
        1,
        Err(StepError::permanent("no")),
        5,
    );
    assert_eq!(state.status, RunStatus::Failed);
    assert!(dispatched(&tr).is_empty());
}

#[test]
fn a_false_when_skips_the_step_and_the_flow_continues() {
    let plan = plan_of(
        json!({"id": "w", "inputs": {"n": {"type": "integer"}}, "steps": [
            {"id": "a", "type": "transform", "params": {"value": 1}, "when": "inputs.n > 5"},
            {"id": "b", "type": "transform", "params": {"value": 2}}
        ]}),
    );
    let (state, tr) = start(&plan);
    assert_eq!(state.step_status("a"), StepStatus::Skipped);
    assert_eq!(dispatched(&tr), vec![("b".into(), None, 1)]);
}

#[test]
fn choice_routes_to_the_first_matching_rule_or_the_default() {
    let doc = |n: i64| {
        json!({"id": "w", "inputs": {"n": {"type": "integer", "default": n}}, "steps": [
            {"id": "pick", "type": "choice", "choices": [
                {"when": "inputs.n > 10", "next": "big"}, {"when": "inputs.n > 1", "next": "mid"}], "default": "small"},
            {"id": "big", "type": "transform", "params": {"value": "big"}, "next_step": null},
            {"id": "mid", "type": "transform", "params": {"value": "mid"}, "next_step": null},
            {"id": "small", "type": "transform", "params": {"value": "small"}}
        ]})
    };
    for (n, expected) in [(20, "big"), (3, "mid"), (0, "small")] {
        let plan = plan_of(doc(n));
        let mut state = RunState::new("r", "w");
        let inputs = json!({"n": n}).as_object().cloned().unwrap_or_default();
        let tr = handle(&plan, &mut state, Event::Start { inputs }, ctx(0, 0.5));
        assert_eq!(
            dispatched(&tr),
            vec![(expected.to_owned(), None, 1)],
            "n = {n}"
        );
        assert_eq!(
            state.step("pick").and_then(|s| s.output.clone()),
            Some(json!({"next": expected}))
        );
    }
}

#[test]
fn for_each_collects_outputs_in_item_order_when_items_finish_out_of_order() {
    let plan = plan_of(json!({"id": "w", "steps": [
        {"id": "each", "type": "transform", "for_each": ["a", "b", "c"], "max_concurrency": 3, "params": {"value": "{{ item }}"}}
    ]}));
    let (mut state, tr) = start(&plan);
    assert_eq!(dispatched(&tr).len(), 3);
    for (i, t) in [(2u32, 10u64), (0, 20), (1, 30)] {
        let item = ["A", "B", "C"][i as usize];
        claim_and(&plan, &mut state, "each", Some(i), 1, Ok(json!(item)), t);
    }
    assert_eq!(state.status, RunStatus::Succeeded);
    assert_eq!(state.output, Some(json!({"each": ["A", "B", "C"]})));
}

#[test]
fn for_each_respects_max_concurrency() {
    let plan = plan_of(json!({"id": "w", "steps": [
        {"id": "each", "type": "transform", "for_each": [1, 2, 3, 4], "max_concurrency": 2, "params": {"value": "{{ item }}"}}
    ]}));
    let (mut state, tr) = start(&plan);
    assert_eq!(
        dispatched(&tr),
        vec![("each".into(), Some(0), 1), ("each".into(), Some(1), 1)]
    );
    let tr = claim_and(&plan, &mut state, "each", Some(1), 1, Ok(json!(2)), 5);
    assert_eq!(dispatched(&tr), vec![("each".into(), Some(2), 1)]);
}

#[test]
fn on_error_routes_to_the_handler_with_the_error_in_scope() {
    let plan = plan_of(json!({"id": "w", "steps": [
        {"id": "risky", "type": "transform", "params": {"value": 1}, "on_error": "handler", "next_step": null},
        {"id": "handler", "type": "transform", "params": {"value": "{{ error.message }}"}, "when": "error.class == 'permanent'"}
    ]}));
    let (mut state, _) = start(&plan);
    let tr = claim_and(
        &plan,
        &mut state,
        "risky",
        None,
        1,
        Err(StepError::permanent("kaput")),
        5,
    );
    assert_eq!(dispatched(&tr), vec![("handler".into(), None, 1)]);
    assert_eq!(state.status, RunStatus::Running);
    assert_eq!(
        state.last_error.as_ref().map(|e| e["message"].clone()),
        Some(json!("kaput"))
    );
    claim_and(&plan, &mut state, "handler", None, 1, Ok(json!("kaput")), 9);
    assert_eq!(state.status, RunStatus::Succeeded);
}

#[test]
fn continue_on_error_sets_a_null_output_and_the_flow_continues() {
    let plan = plan_of(json!({"id": "w", "steps": [
        {"id": "a", "type": "transform", "params": {"value": 1}, "continue_on_error": true},
        {"id": "b", "type": "transform", "params": {"value": "{{ steps.a.output is none }}"}}
    ]}));
    let (mut state, _) = start(&plan);
    let tr = claim_and(
        &plan,
        &mut state,
        "a",
        None,
        1,
        Err(StepError::permanent("x")),
        5,
    );
    assert_eq!(dispatched(&tr), vec![("b".into(), None, 1)]);
    assert_eq!(
        state.step("a").and_then(|s| s.output.clone()),
        Some(Value::Null)
    );
}

#[test]
fn results_after_a_cancel_change_nothing() {
    let plan = plan_of(
        json!({"id": "w", "steps": [{"id": "a", "type": "transform", "params": {"value": 1}}]}),
    );
    let (mut state, _) = start(&plan);
    handle(
        &plan,
        &mut state,
        Event::StepStarted {
            step: "a".into(),
            index: None,
            attempt: 1,
            lease_until_ms: 99_999,
            steal: false,
        },
        ctx(1, 0.5),
    );
    let tr = handle(
        &plan,
        &mut state,
        Event::Cancel {
            reason: "stop".into(),
        },
        ctx(2, 0.5),
    );
    assert_eq!(tr.actions, vec![Action::CancelRun]);
    let before = state.clone();
    let tr = handle(
        &plan,
        &mut state,
        Event::StepSucceeded {
            step: "a".into(),
            index: None,
            attempt: 1,
            output: json!(1),
        },
        ctx(3, 0.5),
    );
    assert!(tr.is_noop());
    assert_eq!(state, before);
}

#[test]
fn a_running_attempt_can_be_taken_over_only_after_its_lease_or_when_stolen() {
    let plan = plan_of(
        json!({"id": "w", "steps": [{"id": "a", "type": "transform", "params": {"value": 1}}]}),
    );
    let (mut state, _) = start(&plan);
    let claim = |lease: u64, steal: bool| Event::StepStarted {
        step: "a".into(),
        index: None,
        attempt: 1,
        lease_until_ms: lease,
        steal,
    };
    assert!(!handle(&plan, &mut state, claim(1_000, false), ctx(10, 0.5)).is_noop());
    assert!(
        handle(&plan, &mut state, claim(2_000, false), ctx(500, 0.5)).is_noop(),
        "lease still held"
    );
    assert!(
        !handle(&plan, &mut state, claim(3_000, false), ctx(1_500, 0.5)).is_noop(),
        "lease expired"
    );
    assert!(
        !handle(&plan, &mut state, claim(9_000, true), ctx(1_600, 0.5)).is_noop(),
        "owner known dead"
    );
}

#[test]
fn wait_steps_schedule_a_timer_and_complete_when_it_fires() {
    let plan = plan_of(json!({"id": "w", "steps": [
        {"id": "pause", "type": "wait", "params": {"seconds": 1.5}},
        {"id": "after", "type": "transform", "params": {"value": 1}}
    ]}));
    let (mut state, tr) = start(&plan);
    let timer = tr.actions.iter().find_map(|a| match a {
        Action::Dispatch {
            task,
            not_before_ms,
        } => Some((task.kind, *not_before_ms)),
        _ => None,
    });
    assert_eq!(timer, Some((TaskKind::Timer, 1_500)));
    let tr = handle(
        &plan,
        &mut state,
        Event::TimerFired {
            step: "pause".into(),
            index: None,
            attempt: 1,
        },
        ctx(1_500, 0.5),
    );
    assert_eq!(dispatched(&tr), vec![("after".into(), None, 1)]);
    assert_eq!(state.step_status("pause"), StepStatus::Succeeded);
}

#[test]
fn joins_wait_for_every_dependency() {
    let plan = plan_of(json!({"id": "w", "steps": [
        {"id": "root", "type": "transform", "params": {"value": 1}},
        {"id": "left", "type": "transform", "depends_on": ["root"], "params": {"value": 1}},
        {"id": "right", "type": "transform", "depends_on": ["root"], "params": {"value": 1}},
        {"id": "join", "type": "transform", "depends_on": ["left", "right"], "params": {"value": "{{ steps.left.output + steps.right.output }}"}}
    ]}));
    let (mut state, _) = start(&plan);
    let tr = claim_and(&plan, &mut state, "root", None, 1, Ok(json!(1)), 5);
    assert_eq!(dispatched(&tr).len(), 2);
    let tr = claim_and(&plan, &mut state, "right", None, 1, Ok(json!(2)), 6);
    assert!(dispatched(&tr).is_empty());
    let tr = claim_and(&plan, &mut state, "left", None, 1, Ok(json!(3)), 7);
    assert_eq!(dispatched(&tr), vec![("join".into(), None, 1)]);
}

/// Guards the property test against vacuity: over fixed seeds the simulation must see successes,
/// failures, retries, duplicates refused, late results and resumes.
#[test]
fn the_simulation_exercises_failures_retries_and_resumes() {
    use proptest::strategy::ValueTree;
    let mut runner = proptest::test_runner::TestRunner::deterministic();
    let (mut succeeded, mut failed, mut retries, mut resumed) = (0, 0, 0, 0);
    for _ in 0..200 {
        let steps = arb_steps().new_tree(&mut runner).expect("steps").current();
        let dice = prop::collection::vec(any::<u32>(), 4000)
            .new_tree(&mut runner)
            .expect("dice")
            .current();
        let plan = workflow(&steps);
        let mut sim = Sim::new(&plan, dice);
        sim.feed(Event::Start {
            inputs: serde_json::Map::new(),
        });
        assert!(sim.drive(3000));
        retries += sim
            .history
            .iter()
            .filter(|e| matches!(e.kind, HistoryKind::StepRetryScheduled { .. }))
            .count();
        match sim.state.status {
            RunStatus::Succeeded => succeeded += 1,
            _ => {
                failed += 1;
                sim.failures = false;
                sim.feed(Event::Resume);
                assert!(sim.drive(3000));
                if sim.state.status == RunStatus::Succeeded {
                    resumed += 1;
                }
            }
        }
    }
    assert!(
        succeeded > 20 && failed > 20,
        "{succeeded} succeeded, {failed} failed"
    );
    assert!(retries > 50, "{retries} retries");
    assert_eq!(resumed, failed, "every failed run finished after resume");
}
