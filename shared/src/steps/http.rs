//! `http`: one HTTP request. Failures are classified here, where the status is known: 429 is
//! `rate_limited` (honouring `Retry-After`), 5xx, connection errors and timeouts are retryable, any
//! other 4xx is permanent. The output is `{status, headers, body}`, the body parsed when it is JSON.

use std::time::Duration;

use reqwest::header::{HeaderMap, HeaderName, HeaderValue};
use serde_json::{Map, Value, json};

use crate::failure::{ErrorClass, StepError};
use crate::steps::{StepAction, StepCall, StepFuture};

/// Default per-request timeout when neither the step nor the params set one.
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);
/// How much of an error body is kept in the failure details.
const ERROR_BODY_LIMIT: usize = 2048;

pub struct Http {
    client: reqwest::Client,
}

impl Http {
    pub fn new() -> Http {
        Http {
            client: reqwest::Client::builder()
                .user_agent(concat!("ai-orchestra/", env!("CARGO_PKG_VERSION")))
                .build()
                .unwrap_or_default(),
        }
    }
}

impl Default for Http {
    fn default() -> Self {
        Http::new()
    }
}

impl StepAction for Http {
    fn execute<'a>(&'a self, call: StepCall<'a>) -> StepFuture<'a> {
        Box::pin(async move { self.request(&call).await })
    }
}

fn text_of(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

impl Http {
    async fn request(&self, call: &StepCall<'_>) -> Result<Value, StepError> {
        let url = call.required_str("url")?;
        let method_name = call.str_param("method")?.unwrap_or("GET").to_uppercase();
        let method = reqwest::Method::from_bytes(method_name.as_bytes())
            .map_err(|_| StepError::permanent(format!("http: invalid method '{method_name}'")))?;
        let mut request = self.client.request(method, url);
        if let Some(headers) = call.param("headers") {
            let map = headers
                .as_object()
                .ok_or_else(|| StepError::permanent("http: headers must be an object"))?;
            let mut out = HeaderMap::new();
            for (k, v) in map {
                let name = HeaderName::from_bytes(k.as_bytes()).map_err(|_| {
                    StepError::permanent(format!("http: invalid header name '{k}'"))
                })?;
                let value = HeaderValue::from_str(&text_of(v)).map_err(|_| {
                    StepError::permanent(format!("http: invalid value for header '{k}'"))
                })?;
                out.insert(name, value);
            }
            request = request.headers(out);
        }
        if let Some(query) = call.param("query") {
            let map = query
                .as_object()
                .ok_or_else(|| StepError::permanent("http: query must be an object"))?;
            let pairs: Vec<(String, String)> =
                map.iter().map(|(k, v)| (k.clone(), text_of(v))).collect();
            request = request.query(&pairs);
        }
        match (call.param("json"), call.param("body")) {
            (Some(_), Some(_)) => {
                return Err(StepError::permanent(
                    "http: give either `json` or `body`, not both",
                ));
            }
            (Some(json_body), None) => request = request.json(json_body),
            (None, Some(body)) => request = request.body(text_of(body)),
            (None, None) => {}
        }
        let timeout = match call.param("timeout_s") {
            Some(v) => v
                .as_f64()
                .filter(|s| *s > 0.0 && s.is_finite())
                .map(Duration::from_secs_f64)
                .ok_or_else(|| StepError::permanent("http: timeout_s must be a positive number"))?,
            None => DEFAULT_TIMEOUT,
        };
        let response = request.timeout(timeout).send().await.map_err(|e| {
            let class = if e.is_timeout() {
                ErrorClass::Timeout
            } else if e.is_builder() {
                ErrorClass::Permanent
            } else {
                ErrorClass::Transient
            };
            StepError::new(class, format!("http: request to {url} failed: {e}"))
        })?;
        let status = response.status();
        let headers: Map<String, Value> = response
            .headers()
            .iter()
            .map(|(k, v)| {
                (
                    k.as_str().to_owned(),
                    Value::String(String::from_utf8_lossy(v.as_bytes()).into_owned()),
                )
            })
            .collect();
        let retry_after = response
            .headers()
            .get(reqwest::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<f64>().ok())
            .map(|secs| (secs.max(0.0) * 1000.0) as u64);
        let is_json = response
            .headers()
            .get(reqwest::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|ct| ct.contains("json"));
        let bytes = response.bytes().await.map_err(|e| {
            StepError::transient(format!("http: reading the response from {url} failed: {e}"))
        })?;
        let text = String::from_utf8_lossy(&bytes);
        let body = if is_json {
            serde_json::from_str(&text).unwrap_or_else(|_| Value::String(text.clone().into_owned()))
        } else {
            Value::String(text.clone().into_owned())
        };
        if status.is_success() {
            return Ok(json!({ "status": status.as_u16(), "headers": headers, "body": body }));
        }
        let class = match status.as_u16() {
            429 => ErrorClass::RateLimited,
            408 | 425 => ErrorClass::Transient,
            s if s >= 500 => ErrorClass::Transient,
            _ => ErrorClass::Permanent,
        };
        let excerpt: String = text.chars().take(ERROR_BODY_LIMIT).collect();
        let mut error = StepError::new(class, format!("http: {url} answered {status}"))
            .with_details(json!({ "status": status.as_u16(), "body": excerpt }));
        if class == ErrorClass::RateLimited {
            error.retry_after_ms = retry_after;
        }
        Err(error)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::secrets::Redactor;
    use wiremock::matchers::{method, path};
    use wiremock::{Mock, MockServer, ResponseTemplate};

    async fn run(params: Value) -> Result<Value, StepError> {
        let scope = Map::new();
        let r = Redactor::default();
        Http::new()
            .execute(StepCall {
                run_id: "r",
                step_id: "s",
                action: "request",
                params: params.as_object().cloned().unwrap_or_default(),
                scope: &scope,
                attempt: 1,
                index: None,
                redactor: &r,
            })
            .await
    }

    #[tokio::test]
    async fn json_responses_are_parsed_into_the_output() {
        let server = MockServer::start().await;
        Mock::given(method("POST"))
            .and(path("/items"))
            .respond_with(ResponseTemplate::new(201).set_body_json(json!({"id": 7})))
            .mount(&server)
            .await;
        let out = run(
            json!({"method": "post", "url": format!("{}/items", server.uri()), "json": {"a": 1}}),
        )
        .await
        .unwrap();
        assert_eq!(out["status"], 201);
        assert_eq!(out["body"], json!({"id": 7}));
    }

    #[tokio::test]
    async fn status_codes_are_classified_for_retries() {
        let server = MockServer::start().await;
        Mock::given(path("/slow-down"))
            .respond_with(ResponseTemplate::new(429).insert_header("retry-after", "3"))
            .mount(&server)
            .await;
        Mock::given(path("/broken"))
            .respond_with(ResponseTemplate::new(503))
            .mount(&server)
            .await;
        Mock::given(path("/missing"))
            .respond_with(ResponseTemplate::new(404).set_body_string("no such thing"))
            .mount(&server)
            .await;
        let e = run(json!({"url": format!("{}/slow-down", server.uri())}))
            .await
            .unwrap_err();
        assert_eq!(
            (e.class, e.retry_after_ms),
            (ErrorClass::RateLimited, Some(3000))
        );
        let e = run(json!({"url": format!("{}/broken", server.uri())}))
            .await
            .unwrap_err();
        assert_eq!(e.class, ErrorClass::Transient);
        let e = run(json!({"url": format!("{}/missing", server.uri())}))
            .await
            .unwrap_err();
        assert_eq!(e.class, ErrorClass::Permanent);
        assert_eq!(e.details.unwrap()["body"], "no such thing");
    }

    #[tokio::test]
    async fn a_request_slower_than_its_timeout_is_a_timeout() {
        let server = MockServer::start().await;
        Mock::given(path("/sleepy"))
            .respond_with(ResponseTemplate::new(200).set_delay(Duration::from_millis(800)))
            .mount(&server)
            .await;
        let e = run(json!({"url": format!("{}/sleepy", server.uri()), "timeout_s": 0.1}))
            .await
            .unwrap_err();
        assert_eq!(e.class, ErrorClass::Timeout);
    }
}
