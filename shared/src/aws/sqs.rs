//! [`StepQueue`] on SQS: one message per task (its JSON), `DelaySeconds` for backoff up to SQS's
//! 15 minutes (the runtime sends a task again when it arrives before its time, which chains longer
//! waits), batch sends of up to 10, visibility extension, and the receive count for dead-lettering.

use std::time::Duration;

use aws_sdk_sqs::Client;
use aws_sdk_sqs::types::{MessageSystemAttributeName, SendMessageBatchRequestEntry};

use crate::engine::Task;
use crate::ports::{Delivery, QueueError, StepQueue};

/// SQS's longest message delay.
pub const MAX_DELAY: Duration = Duration::from_secs(900);
const MAX_BATCH: usize = 10;

#[derive(Clone)]
pub struct SqsQueue {
    client: Client,
    url: String,
}

fn backend(e: impl std::fmt::Display) -> QueueError {
    QueueError::Backend(e.to_string())
}

impl SqsQueue {
    pub fn new(client: Client, url: &str) -> SqsQueue {
        SqsQueue {
            client,
            url: url.to_owned(),
        }
    }

    pub fn url(&self) -> &str {
        &self.url
    }
}

/// SQS delays are whole seconds: round up, so a task never arrives before its time (which would
/// only send it round again).
fn delay_seconds(delay: Duration) -> i32 {
    let secs = delay.as_millis().div_ceil(1000) as u64;
    secs.min(MAX_DELAY.as_secs()) as i32
}

/// Parses a message body; `None` for a body that is not a task (it can never succeed).
pub fn parse_task(body: &str) -> Option<Task> {
    serde_json::from_str(body).ok()
}

impl StepQueue for SqsQueue {
    async fn send(&self, batch: Vec<(Task, Duration)>) -> Result<(), QueueError> {
        for chunk in batch.chunks(MAX_BATCH) {
            let mut entries = Vec::with_capacity(chunk.len());
            for (n, (task, delay)) in chunk.iter().enumerate() {
                let body = serde_json::to_string(task).map_err(backend)?;
                let entry = SendMessageBatchRequestEntry::builder()
                    .id(n.to_string())
                    .message_body(body)
                    .delay_seconds(delay_seconds(*delay))
                    .build()
                    .map_err(backend)?;
                entries.push(entry);
            }
            let out = self
                .client
                .send_message_batch()
                .queue_url(&self.url)
                .set_entries(Some(entries))
                .send()
                .await
                .map_err(|e| backend(aws_sdk_sqs::error::DisplayErrorContext(e)))?;
            if let Some(failed) = out.failed().first() {
                return Err(QueueError::Backend(format!(
                    "SQS refused {} of {} messages: {}",
                    out.failed().len(),
                    chunk.len(),
                    failed.message().unwrap_or(failed.code())
                )));
            }
        }
        Ok(())
    }

    async fn receive(&self, max: usize, wait: Duration) -> Result<Vec<Delivery>, QueueError> {
        let out = self
            .client
            .receive_message()
            .queue_url(&self.url)
            .max_number_of_messages(max.clamp(1, MAX_BATCH) as i32)
            .wait_time_seconds(wait.as_secs().min(20) as i32)
            .message_system_attribute_names(MessageSystemAttributeName::ApproximateReceiveCount)
            .send()
            .await
            .map_err(|e| backend(aws_sdk_sqs::error::DisplayErrorContext(e)))?;
        let mut deliveries = Vec::new();
        for message in out.messages() {
            let (Some(body), Some(receipt)) = (message.body(), message.receipt_handle()) else {
                continue;
            };
            let receive_count = message
                .attributes()
                .and_then(|a| a.get(&MessageSystemAttributeName::ApproximateReceiveCount))
                .and_then(|v| v.parse().ok())
                .unwrap_or(1);
            match parse_task(body) {
                Some(task) => deliveries.push(Delivery {
                    task,
                    receipt: receipt.to_owned(),
                    receive_count,
                }),
                None => {
                    tracing::warn!(
                        message_id = message.message_id().unwrap_or_default(),
                        "dropping a message that is not a step task"
                    );
                    self.ack(receipt).await?;
                }
            }
        }
        Ok(deliveries)
    }

    async fn ack(&self, receipt: &str) -> Result<(), QueueError> {
        self.client
            .delete_message()
            .queue_url(&self.url)
            .receipt_handle(receipt)
            .send()
            .await
            .map_err(|e| backend(aws_sdk_sqs::error::DisplayErrorContext(e)))?;
        Ok(())
    }

    async fn extend(&self, receipt: &str, visibility: Duration) -> Result<(), QueueError> {
        self.client
            .change_message_visibility()
            .queue_url(&self.url)
            .receipt_handle(receipt)
            .visibility_timeout(visibility.as_secs().min(43_200) as i32)
            .send()
            .await
            .map_err(|e| backend(aws_sdk_sqs::error::DisplayErrorContext(e)))?;
        Ok(())
    }
}
