//! The in-process step queue: delayed delivery, visibility timeouts and redelivery of what is not
//! acknowledged, like SQS, so the runtime is exercised the same way locally. It is not durable: a
//! restarted process rebuilds its queue from the run store (see `Runtime::recover`).

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::sync::Mutex;
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;

use crate::engine::Task;
use crate::ports::{Delivery, QueueError, StepQueue};

struct Inner {
    /// Due time, sequence (FIFO among equals), task id.
    ready: BinaryHeap<Reverse<(Instant, u64, u64)>>,
    tasks: HashMap<u64, (Task, u32)>,
    /// Received and not yet acknowledged: task id -> visible again at.
    in_flight: HashMap<u64, Instant>,
    next_id: u64,
}

pub struct MemoryQueue {
    inner: Mutex<Inner>,
    notify: Notify,
    visibility: Duration,
}

impl MemoryQueue {
    pub fn new(visibility: Duration) -> MemoryQueue {
        MemoryQueue {
            inner: Mutex::new(Inner {
                ready: BinaryHeap::new(),
                tasks: HashMap::new(),
                in_flight: HashMap::new(),
                next_id: 0,
            }),
            notify: Notify::new(),
            visibility,
        }
    }

    /// Tasks waiting or in flight.
    pub fn len(&self) -> usize {
        self.inner.lock().map(|i| i.tasks.len()).unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lock(&self) -> Result<std::sync::MutexGuard<'_, Inner>, QueueError> {
        self.inner
            .lock()
            .map_err(|_| QueueError::Backend("queue lock poisoned".into()))
    }

    /// Takes due tasks; returns them or the time the next one is due.
    fn take(&self, max: usize) -> Result<(Vec<Delivery>, Option<Instant>), QueueError> {
        let now = Instant::now();
        let mut inner = self.lock()?;
        let expired: Vec<u64> = inner
            .in_flight
            .iter()
            .filter(|(_, at)| **at <= now)
            .map(|(id, _)| *id)
            .collect();
        for id in expired {
            inner.in_flight.remove(&id);
            let seq = inner.next_id;
            inner.next_id += 1;
            inner.ready.push(Reverse((now, seq, id)));
        }
        let mut out = Vec::new();
        while out.len() < max {
            match inner.ready.peek() {
                Some(Reverse((due, _, _))) if *due <= now => {}
                _ => break,
            }
            let Some(Reverse((_, _, id))) = inner.ready.pop() else {
                break;
            };
            let visible_again = now + self.visibility;
            let Some((task, count)) = inner.tasks.get_mut(&id) else {
                continue;
            };
            *count += 1;
            let delivery = Delivery {
                task: task.clone(),
                receipt: id.to_string(),
                receive_count: *count,
            };
            inner.in_flight.insert(id, visible_again);
            out.push(delivery);
        }
        let next_due = inner
            .ready
            .peek()
            .map(|Reverse((due, _, _))| *due)
            .into_iter()
            .chain(inner.in_flight.values().copied())
            .min();
        Ok((out, next_due))
    }
}

impl StepQueue for MemoryQueue {
    async fn send(&self, batch: Vec<(Task, Duration)>) -> Result<(), QueueError> {
        let now = Instant::now();
        {
            let mut inner = self.lock()?;
            for (task, delay) in batch {
                let id = inner.next_id;
                inner.next_id += 1;
                inner.tasks.insert(id, (task, 0));
                inner.ready.push(Reverse((now + delay, id, id)));
            }
        }
        self.notify.notify_waiters();
        self.notify.notify_one();
        Ok(())
    }

    async fn receive(&self, max: usize, wait: Duration) -> Result<Vec<Delivery>, QueueError> {
        let deadline = Instant::now() + wait;
        loop {
            let notified = self.notify.notified();
            let (out, next_due) = self.take(max)?;
            if !out.is_empty() {
                return Ok(out);
            }
            let now = Instant::now();
            if now >= deadline {
                return Ok(out);
            }
            let until = next_due.map_or(deadline, |d| d.min(deadline));
            tokio::select! {
                _ = notified => {}
                _ = tokio::time::sleep_until(until.max(now)) => {}
            }
        }
    }

    async fn ack(&self, receipt: &str) -> Result<(), QueueError> {
        let id: u64 = receipt
            .parse()
            .map_err(|_| QueueError::Backend(format!("bad receipt {receipt}")))?;
        let mut inner = self.lock()?;
        inner.in_flight.remove(&id);
        inner.tasks.remove(&id);
        Ok(())
    }

    async fn extend(&self, receipt: &str, visibility: Duration) -> Result<(), QueueError> {
        let id: u64 = receipt
            .parse()
            .map_err(|_| QueueError::Backend(format!("bad receipt {receipt}")))?;
        let mut inner = self.lock()?;
        if let Some(at) = inner.in_flight.get_mut(&id) {
            *at = Instant::now() + visibility;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::TaskKind;

    fn task(step: &str) -> Task {
        Task {
            run_id: "r".into(),
            step: step.into(),
            index: None,
            attempt: 1,
            kind: TaskKind::Execute,
        }
    }

    #[tokio::test]
    async fn delayed_tasks_arrive_after_their_delay_in_order() {
        let q = MemoryQueue::new(Duration::from_secs(30));
        q.send(vec![
            (task("late"), Duration::from_millis(80)),
            (task("now"), Duration::ZERO),
        ])
        .await
        .unwrap();
        let first = q.receive(10, Duration::from_millis(10)).await.unwrap();
        assert_eq!(first.len(), 1);
        assert_eq!(first[0].task.step, "now");
        let later = q.receive(10, Duration::from_secs(2)).await.unwrap();
        assert_eq!(later[0].task.step, "late");
    }

    #[tokio::test]
    async fn unacknowledged_tasks_are_redelivered_after_the_visibility_timeout() {
        let q = MemoryQueue::new(Duration::from_millis(50));
        q.send(vec![(task("a"), Duration::ZERO)]).await.unwrap();
        let first = q.receive(1, Duration::ZERO).await.unwrap();
        assert_eq!(first[0].receive_count, 1);
        let again = q.receive(1, Duration::from_secs(2)).await.unwrap();
        assert_eq!(again[0].task.step, "a");
        assert_eq!(again[0].receive_count, 2);
        q.ack(&again[0].receipt).await.unwrap();
        assert!(q.is_empty());
        let none = q.receive(1, Duration::from_millis(100)).await.unwrap();
        assert!(none.is_empty());
    }
}
